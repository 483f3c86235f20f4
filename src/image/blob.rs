//! Layer downloads of a pull: several blobs at once into the store's `blobs/`, each hashed while
//! it streams, resumed with `Range` after a broken transfer, and bounded: by its manifest size,
//! by the image's download budget (a blob whose manifest says `size: 0` stops there too), by a
//! minimum transfer rate, and by the job's cancel and the pull's deadline.

use std::fs;
use std::io::{IsTerminal, Read, Seek, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use super::registry::{self, ImageName, Session};
use super::ImageStore;

/// Layers downloaded at once.
const PARALLEL: usize = 3;
/// The slowest transfer accepted: fewer bytes than this per second over a whole [`WINDOW`]
/// ends it (a registry trickling a byte a minute holds nothing for long).
pub(crate) const MIN_RATE: u64 = 1024;
/// The window [`MIN_RATE`] is measured over.
pub(crate) const WINDOW: Duration = Duration::from_secs(30);

/// A blob that is not the one its manifest describes, or a transfer that broke a bound:
/// downloading it again does not help.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BadBlob {
    #[error("blob {digest} from registry {registry} is larger than its manifest says ({size} bytes)")]
    Larger { digest: String, registry: String, size: u64 },
    #[error("blob {digest} from registry {registry} does not match its digest (got {got}): refused")]
    Digest { digest: String, registry: String, got: String },
    #[error("blob {digest} from registry {registry} is {written} bytes, not the {size} its manifest says")]
    Size { digest: String, registry: String, written: u64, size: u64 },
    #[error(
        "blob {digest} from registry {registry} goes past the image's download cap of {cap} (EXECUTOR_IMAGE_MAX_SIZE): refused"
    )]
    Cap { digest: String, registry: String, cap: String },
    #[error("{what} from registry {registry} came slower than {rate}/s for {secs} s: given up")]
    Slow { what: String, registry: String, rate: String, secs: u64 },
}

/// Bytes an image's downloads may still take, shared by its parallel downloads.
#[derive(Debug)]
pub(crate) struct Budget {
    left: AtomicU64,
    cap: u64,
}

impl Budget {
    pub(crate) fn new(cap: u64) -> Budget {
        Budget { left: AtomicU64::new(cap), cap }
    }

    /// Takes `n` bytes; false when they are not there.
    fn take(&self, n: u64) -> bool {
        self.left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| l.checked_sub(n)).is_ok()
    }

    /// Gives back `n` bytes of a transfer that started again.
    fn give(&self, n: u64) {
        self.left.fetch_add(n, Ordering::SeqCst);
    }
}

/// The minimum transfer rate, checked as bytes arrive.
pub(crate) struct Pace {
    since: Instant,
    bytes: u64,
}

impl Pace {
    pub(crate) fn new() -> Pace {
        Pace { since: Instant::now(), bytes: 0 }
    }

    /// Counts `n` more bytes; false when the last window came slower than [`MIN_RATE`].
    pub(crate) fn add(&mut self, n: usize) -> bool {
        self.bytes += n as u64;
        let spent = self.since.elapsed();
        if spent < WINDOW {
            return true;
        }
        let fast = self.bytes >= MIN_RATE * spent.as_secs();
        self.since = Instant::now();
        self.bytes = 0;
        fast
    }

    pub(crate) fn slow(what: &str, registry: &str) -> BadBlob {
        BadBlob::Slow {
            what: what.to_string(),
            registry: registry.to_string(),
            rate: crate::base::units::format_bytes(MIN_RATE),
            secs: WINDOW.as_secs(),
        }
    }
}

/// A layer as a pull downloads it.
pub(crate) struct Wanted<'a> {
    pub digest: &'a str,
    /// From the manifest; 0 when it does not say.
    pub size: u64,
}

/// Downloads the layers the store lacks, several at once; returns the bytes downloaded and the
/// blobs' locks.
pub(crate) fn download_layers(
    store: &ImageStore,
    session: &Session,
    name: &ImageName,
    layers: &[Wanted<'_>],
    budget: &Budget,
) -> Result<(u64, Vec<crate::base::lock::Held>)> {
    let total: u64 = layers.iter().map(|l| l.size).sum();
    let terminal = std::io::stderr().is_terminal();
    let multi = indicatif::MultiProgress::with_draw_target(if terminal {
        indicatif::ProgressDrawTarget::stderr()
    } else {
        indicatif::ProgressDrawTarget::hidden()
    });
    let style = indicatif::ProgressStyle::with_template("{msg:20} [{bar:30}] {bytes}/{total_bytes}")
        .map(|s| s.progress_chars("=> "))
        .ok();
    let overall = multi.add(indicatif::ProgressBar::new(total));
    if let Some(s) = &style {
        overall.set_style(s.clone());
    }
    overall.set_message(format!("total ({} layers)", layers.len()));
    let next = AtomicUsize::new(0);
    let downloaded = AtomicU64::new(0);
    let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let locks = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL.min(layers.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(l) = layers.get(i) else { break };
                if failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                    break;
                }
                let bar = multi.insert_before(&overall, indicatif::ProgressBar::new(l.size));
                if let Some(s) = &style {
                    bar.set_style(s.clone());
                }
                let short = l.digest.trim_start_matches("sha256:").get(..12).unwrap_or("").to_string();
                bar.set_message(short.clone());
                match fetch_blob(store, session, l, budget, &bar, &overall) {
                    Ok((0, held)) => {
                        locks.lock().map(|mut l| l.push(held)).ok();
                        overall.inc(l.size);
                        if !terminal {
                            tracing::info!(target: "pull", "{}: layer {short} already in the store", name.canonical());
                        }
                    }
                    Ok((n, held)) => {
                        locks.lock().map(|mut l| l.push(held)).ok();
                        downloaded.fetch_add(n, Ordering::SeqCst);
                        if !terminal {
                            tracing::info!(
                                target: "pull",
                                "{}: layer {short} downloaded ({})",
                                name.canonical(),
                                crate::base::units::format_bytes(n)
                            );
                        }
                    }
                    Err(e) => {
                        if let Ok(mut f) = failure.lock() {
                            f.get_or_insert(e);
                        }
                    }
                }
                bar.finish_and_clear();
            });
        }
    });
    overall.finish_and_clear();
    if let Some(e) = failure.into_inner().ok().flatten() {
        return Err(e.context(format!("downloading the layers of {}", name.canonical())));
    }
    Ok((downloaded.into_inner(), locks.into_inner().unwrap_or_default()))
}

/// Downloads one blob into the store's `blobs/` unless it is there, hashing while it streams
/// and resuming with `Range` after a broken transfer; returns the bytes downloaded and the
/// blob's lock, which keeps the store from collecting it until the tree is committed.
pub(crate) fn fetch_blob(
    store: &ImageStore,
    session: &Session,
    want: &Wanted<'_>,
    budget: &Budget,
    bar: &indicatif::ProgressBar,
    overall: &indicatif::ProgressBar,
) -> Result<(u64, crate::base::lock::Held)> {
    let (digest, size) = (want.digest, want.size);
    let dest = store.blob_path(digest);
    let lock = crate::base::lock::lock(&dest.with_extension("lock"), true)?;
    if dest.is_file() {
        return Ok((0, lock));
    }
    let partial = dest.with_extension("partial");
    let mut out = fs::File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let mut attempt = 0u32;
    let retry = session.retry();
    let mut buf = vec![0u8; 256 * 1024];
    let registry = || session.registry.clone();
    let result = loop {
        let step = (|| -> Result<bool> {
            let resp = session.get(&format!("blobs/{digest}"), "*/*", Some(written))?;
            if resp.status() != 206 && written > 0 {
                // The registry ignores ranges: start again.
                out.set_len(0)?;
                out.rewind()?;
                hasher = Sha256::new();
                overall.set_position(overall.position().saturating_sub(written));
                budget.give(written);
                written = 0;
                bar.set_position(0);
            }
            let mut body = resp.into_reader();
            let mut pace = Pace::new();
            loop {
                if let Some(e) = session.stopped() {
                    return Err(e.into());
                }
                let n = body.read(&mut buf).with_context(|| format!("reading blob {digest}"))?;
                if n == 0 {
                    return Ok(true);
                }
                written += n as u64;
                if size > 0 && written > size {
                    return Err(
                        BadBlob::Larger { digest: digest.to_string(), registry: registry(), size }.into()
                    );
                }
                if !budget.take(n as u64) {
                    let cap = crate::base::units::format_bytes(budget.cap);
                    return Err(BadBlob::Cap { digest: digest.to_string(), registry: registry(), cap }.into());
                }
                if !pace.add(n) {
                    return Err(Pace::slow(&format!("blob {digest}"), &session.registry).into());
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).with_context(|| format!("writing {}", partial.display()))?;
                bar.inc(n as u64);
                overall.inc(n as u64);
            }
        })();
        match step {
            Ok(_) => break Ok(()),
            Err(e) if e.downcast_ref::<BadBlob>().is_some() => break Err(e),
            Err(e) => {
                attempt += 1;
                // The registry's own answer (or its retries, which ran out) is final, and so
                // is a stop.
                if attempt >= retry.max_attempts
                    || e.downcast_ref::<registry::RegistryError>().is_some()
                    || session.stopped().is_some()
                {
                    break Err(e.context(format!("blob {digest}")));
                }
                session.stop().sleep(retry.delay(attempt));
            }
        }
    };
    if let Err(e) = result {
        let _ = fs::remove_file(&partial);
        return Err(e);
    }
    let got = format!("sha256:{}", hex::encode(hasher.finalize()));
    if got != digest {
        let _ = fs::remove_file(&partial);
        return Err(BadBlob::Digest { digest: digest.to_string(), registry: registry(), got }.into());
    }
    if size > 0 && written != size {
        let _ = fs::remove_file(&partial);
        return Err(BadBlob::Size { digest: digest.to_string(), registry: registry(), written, size }.into());
    }
    out.sync_all().ok();
    fs::rename(&partial, &dest).with_context(|| format!("moving {} into the store", partial.display()))?;
    Ok((written, lock))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::registry::RegistryOptions;
    use std::net::TcpListener;
    use std::sync::Arc;

    /// A registry on loopback whose `n`th answer (from 0) is `answer(n)`; returns its base URL and
    /// the count of requests it had.
    fn registry(answer: impl Fn(usize) -> Vec<u8> + Send + 'static) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).map(|n| n == 1).unwrap_or(false) {
                    head.push(byte[0]);
                }
                let n = seen.fetch_add(1, Ordering::SeqCst);
                let _ = conn.write_all(&answer(n));
            }
        });
        (url, count)
    }

    fn ok(status: &str, body: &[u8], length: usize) -> Vec<u8> {
        let mut r = format!("HTTP/1.1 {status}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n")
            .into_bytes();
        r.extend_from_slice(body);
        r
    }

    /// Fetches the blob `body` claims to be (with `size` from the manifest) from `url`, within
    /// a download budget of `cap` bytes.
    fn fetch_capped(url: &str, body: &[u8], size: u64, cap: u64) -> Result<u64> {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let retry = crate::api::RetryPolicy { max_attempts: 3, base: Duration::ZERO, ..Default::default() };
        let netloc = url.trim_start_matches("http://").to_string();
        let opts = RegistryOptions { retry, private: vec![netloc], ..Default::default() };
        let name = ImageName::parse("127.0.0.1:1/team/img:v1").unwrap();
        let session = Session::new(&registry::agent(&opts).unwrap(), url, &name, &opts);
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(body)));
        let bar = indicatif::ProgressBar::hidden();
        let want = Wanted { digest: &digest, size };
        fetch_blob(&store, &session, &want, &Budget::new(cap), &bar, &bar).map(|(n, _)| n)
    }

    fn fetch(url: &str, body: &[u8], size: u64) -> Result<u64> {
        fetch_capped(url, body, size, u64::MAX)
    }

    #[test]
    fn a_blob_larger_than_its_manifest_is_not_asked_for_again() {
        let (url, count) = registry(|_| ok("200 OK", b"0123456789", 10));
        let err = fetch(&url, b"0123", 4).unwrap_err();
        assert!(matches!(err.downcast_ref::<BadBlob>(), Some(BadBlob::Larger { size: 4, .. })), "{err:#}");
        assert!(format!("{err:#}").ends_with("is larger than its manifest says (4 bytes)"), "{err:#}");
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_blob_of_unknown_size_stops_at_the_images_cap() {
        // The manifest says `size: 0`; the registry streams 8 MiB against a 1 MiB budget.
        let big = vec![0u8; 8 << 20];
        let served = big.clone();
        let (url, count) = registry(move |_| ok("200 OK", &served, served.len()));
        let err = fetch_capped(&url, &big, 0, 1 << 20).unwrap_err();
        assert!(matches!(err.downcast_ref::<BadBlob>(), Some(BadBlob::Cap { .. })), "{err:#}");
        assert!(format!("{err:#}").contains("download cap of 1 MiB"), "{err:#}");
        assert_eq!(count.load(Ordering::SeqCst), 1, "not asked for again");
    }

    #[test]
    fn the_registrys_refusal_is_final_and_a_broken_transfer_is_retried() {
        let (url, count) = registry(|_| ok("404 Not Found", b"", 0));
        let err = fetch(&url, b"0123", 4).unwrap_err();
        assert!(format!("{err:#}").contains("registry 127.0.0.1:"), "{err:#}");
        assert!(format!("{err:#}").ends_with("(404)"), "{err:#}");
        assert_eq!(count.load(Ordering::SeqCst), 1, "asked once: a 404 does not go away");

        // The first answer stops after 2 of its 4 bytes; the second is whole.
        let (url, count) =
            registry(|n| if n == 0 { ok("200 OK", b"01", 4) } else { ok("200 OK", b"0123", 4) });
        assert_eq!(fetch(&url, b"0123", 4).unwrap(), 4);
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn redirects_to_unlisted_private_addresses_are_refused_before_any_request() {
        // A listed registry that redirects a blob to a loopback service it was not listed for.
        let hit = Arc::new(AtomicUsize::new(0));
        let seen = hit.clone();
        let inner = TcpListener::bind("127.0.0.1:0").unwrap();
        let inner_port = inner.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for c in inner.incoming() {
                drop(c);
                seen.fetch_add(1, Ordering::SeqCst);
            }
        });
        let location = format!("http://127.0.0.1:{inner_port}/internal");
        let (url, _) = registry(move |_| {
            format!("HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .into_bytes()
        });
        let err = fetch(&url, b"0123", 4).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains(&format!("127.0.0.1:{inner_port} resolves to a private")), "{text}");
        assert!(!text.contains("/internal"), "{text}");
        assert_eq!(hit.load(Ordering::SeqCst), 0, "the service saw a connection");
    }
}
