//! `executor image pull`: an image from a registry becomes a tree in the store. The manifest
//! (Docker v2 schema 2 or OCI; a manifest list or OCI index picks this host's linux platform) and
//! every blob are verified against their digests while they stream in; layers (gzip, zstd or
//! plain tar) are kept content-addressed under `blobs/` and shared between images, then applied
//! with whiteouts by [`super::import::apply_layer`] under a cap on unpacked bytes.

use std::cell::Cell;
use std::fs;
use std::io::{BufRead, BufReader, IsTerminal, Read, Seek, Write};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::registry::{self, ImageName, RegistryOptions, Session};
use super::{ImageMeta, ImageStore, ResolvedImage};

/// The largest manifest, index or config accepted.
pub(crate) const MAX_MANIFEST: u64 = 4 << 20;
/// The most layers an image may have (Docker's own limit is 127 for overlay storage).
pub(crate) const MAX_LAYERS: usize = 500;
/// Layers downloaded at once.
const PARALLEL: usize = 3;

const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// A blob that is not the one its manifest describes: downloading it again does not help.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BadBlob {
    #[error("blob {digest} from registry {registry} is larger than its manifest says ({size} bytes)")]
    Larger { digest: String, registry: String, size: u64 },
    #[error("blob {digest} from registry {registry} does not match its digest (got {got}): refused")]
    Digest { digest: String, registry: String, got: String },
    #[error("blob {digest} from registry {registry} is {written} bytes, not the {size} its manifest says")]
    Size { digest: String, registry: String, written: u64, size: u64 },
}

/// When `vm-boot` pulls a job's images (`EXECUTOR_IMAGE_PULL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum PullPolicy {
    /// Only images the store lacks (the default).
    #[default]
    Missing,
    /// Every image, every job (the store still skips layers it has).
    Always,
    /// Never: an image not in the store fails the job.
    Never,
}

impl PullPolicy {
    pub(crate) fn parse(s: &str) -> Result<PullPolicy> {
        match s.trim() {
            "" | "missing" => Ok(PullPolicy::Missing),
            "always" => Ok(PullPolicy::Always),
            "never" => Ok(PullPolicy::Never),
            other => bail!("EXECUTOR_IMAGE_PULL {other:?} is not one of missing, always, never"),
        }
    }
}

/// The executor's registry settings, validated; the job's own credentials join them per pull.
#[derive(Debug, Clone, Default)]
pub struct PullSettings {
    /// `EXECUTOR_DOCKER_AUTH_CONFIG`: a Docker config.json (checked when the settings load).
    pub docker_auth_config: Option<crate::base::secret::Secret>,
    pub mirrors: Vec<String>,
    pub insecure: Vec<String>,
    pub ca: Option<std::path::PathBuf>,
    pub max_unpacked: u64,
}

impl PullSettings {
    /// Validates the raw values (the auth config parses, the size is a size).
    pub fn new(
        docker_auth_config: Option<&str>,
        mirrors: &[String],
        insecure: &[String],
        ca: Option<&std::path::Path>,
        max_size: Option<&str>,
    ) -> Result<PullSettings> {
        let docker_auth_config =
            docker_auth_config.filter(|t| !t.trim().is_empty()).map(crate::base::secret::Secret::new);
        if let Some(text) = &docker_auth_config {
            super::registry::Credentials::default()
                .add_config_text(text.expose(), "EXECUTOR_DOCKER_AUTH_CONFIG")?;
        }
        let max = max_size.unwrap_or("32G");
        let max_unpacked = crate::base::units::parse_size(max)
            .map_err(|e| anyhow::anyhow!("EXECUTOR_IMAGE_MAX_SIZE {max:?}: {e}"))?;
        let list = |v: &[String]| -> Vec<String> {
            v.iter()
                .flat_map(|s| s.split(','))
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        Ok(PullSettings {
            docker_auth_config,
            mirrors: list(mirrors),
            insecure: list(insecure),
            ca: ca.map(|p| p.to_path_buf()),
            max_unpacked,
        })
    }

    /// The options of one pull; the job's docker auth config (v2 payloads) wins over the
    /// executor's.
    pub fn options(&self, job_auth: Option<&serde_json::Value>) -> Result<PullOptions> {
        let mut credentials = super::registry::Credentials::default();
        if let Some(job) = job_auth {
            credentials.add_config(job, "the job's docker auth config")?;
        }
        if let Some(text) = &self.docker_auth_config {
            credentials.add_config_text(text.expose(), "EXECUTOR_DOCKER_AUTH_CONFIG")?;
        }
        Ok(PullOptions {
            registry: RegistryOptions {
                credentials,
                mirrors: self.mirrors.clone(),
                insecure: self.insecure.clone(),
                ca: self.ca.clone(),
                ..Default::default()
            },
            max_unpacked: self.max_unpacked,
            always: false,
        })
    }
}

/// What a pull may do.
#[derive(Debug, Clone)]
pub struct PullOptions {
    pub registry: RegistryOptions,
    /// The cap on the bytes an image's layers unpack to (a decompression bomb stops here).
    pub max_unpacked: u64,
    /// Download again even when the store already has the tag.
    pub always: bool,
}

/// A finished pull.
#[derive(Debug, Clone)]
pub(crate) struct Pulled {
    /// `registry/repository:tag` (or `@digest`).
    pub reference: String,
    /// The digest the reference resolved to (an index's when the tag names an index).
    pub digest: String,
    /// Bytes downloaded (0 when everything was in the store).
    pub bytes: u64,
    pub elapsed: Duration,
    /// The registry (or mirror) it came from.
    pub registry: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    #[serde(default)]
    schema_version: u32,
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// This host's architecture as images name it.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    }
}

fn check_digest(digest: &str) -> Result<&str> {
    match digest.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) => {
            Ok(h)
        }
        _ => bail!("unsupported or malformed digest {digest:?} (want sha256:<64 hex digits>)"),
    }
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Pulls `reference` into `store` and names it by its canonical reference (and, for a tag, by
/// `name@digest` too).
pub(crate) fn pull(store: &ImageStore, reference: &str, opts: &PullOptions) -> Result<Pulled> {
    let name = ImageName::parse(reference)?;
    let canonical = name.canonical();
    let started = Instant::now();
    // One pull of an image at a time across processes; the second finds the first's work.
    let lock_name = hex::encode(Sha256::digest(canonical.as_bytes()));
    let _lock = crate::base::lock::lock(&store.dir().join("locks").join(lock_name), true)?;
    if !opts.always {
        if let Ok(image) = store.resolve(&canonical) {
            let digest = name.digest.clone().unwrap_or_else(|| image.digest.clone());
            return Ok(Pulled {
                reference: canonical,
                digest,
                bytes: 0,
                elapsed: started.elapsed(),
                registry: name.registry.clone(),
            });
        }
    }
    let agent = registry::agent(&opts.registry)?;
    let endpoints = registry::endpoints(&agent, &name, &opts.registry);
    let mut last = None;
    for (i, base) in endpoints.iter().enumerate() {
        let session = Session::new(&agent, base, &name, &opts.registry);
        match pull_from(store, &session, &name, opts) {
            Ok((_, digest, bytes)) => {
                return Ok(Pulled {
                    reference: canonical,
                    digest,
                    bytes,
                    elapsed: started.elapsed(),
                    registry: session.registry.clone(),
                })
            }
            Err(e) => {
                if i + 1 < endpoints.len() {
                    tracing::warn!(target: "pull", "{canonical}: {} failed, trying the next: {e:#}", session.registry);
                }
                last = Some(e.context(format!("pulling {canonical} from {}", session.registry)));
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("pulling {canonical}: no registry to ask")))
}

/// Reads a JSON document of at most [`MAX_MANIFEST`] bytes and checks it against `want`.
fn fetch_document(
    session: &Session,
    path: &str,
    accept: &str,
    want: Option<&str>,
) -> Result<(Vec<u8>, String, String)> {
    let resp = session.get(path, accept, None)?;
    let content_type = resp.content_type().to_string();
    if let Some(len) = resp.header("content-length").and_then(|l| l.parse::<u64>().ok()) {
        if len > MAX_MANIFEST {
            bail!("{path} of registry {} is {len} bytes, over the cap of {MAX_MANIFEST}", session.registry);
        }
    }
    let mut body = Vec::new();
    resp.into_reader()
        .take(MAX_MANIFEST + 1)
        .read_to_end(&mut body)
        .with_context(|| format!("reading {path} from registry {}", session.registry))?;
    if body.len() as u64 > MAX_MANIFEST {
        bail!("{path} of registry {} is over the cap of {MAX_MANIFEST} bytes", session.registry);
    }
    let digest = sha256(&body);
    if let Some(w) = want {
        if w != digest {
            bail!("{path} from registry {} does not match its digest {w} (got {digest})", session.registry);
        }
    }
    Ok((body, content_type, digest))
}

fn pull_from(
    store: &ImageStore,
    session: &Session,
    name: &ImageName,
    opts: &PullOptions,
) -> Result<(ResolvedImage, String, u64)> {
    let accept = [MT_OCI_INDEX, MT_DOCKER_LIST, MT_OCI_MANIFEST, MT_DOCKER_MANIFEST].join(", ");
    let r = name.manifest_ref().to_string();
    let (body, content_type, top_digest) =
        fetch_document(session, &format!("manifests/{r}"), &accept, name.digest.as_deref())?;
    let mut manifest: Manifest = serde_json::from_slice(&body)
        .with_context(|| format!("parsing the manifest of {}", name.canonical()))?;
    let mut manifest_digest = top_digest.clone();
    let kind = if manifest.media_type.is_empty() { content_type } else { manifest.media_type.clone() };
    if let Some(list) = manifest.manifests.take().filter(|_| manifest.layers.is_empty()) {
        if list.len() > MAX_LAYERS {
            bail!(
                "the index of {} lists {} manifests, over the cap of {MAX_LAYERS}",
                name.canonical(),
                list.len()
            );
        }
        let arch = host_arch();
        let pick = list
            .iter()
            .find(|d| d.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == arch))
            .with_context(|| format!("{} has no linux/{arch} image in its index", name.canonical()))?;
        check_digest(&pick.digest)?;
        let (body, _, digest) =
            fetch_document(session, &format!("manifests/{}", pick.digest), &accept, Some(&pick.digest))?;
        manifest = serde_json::from_slice(&body)
            .with_context(|| format!("parsing the linux/{arch} manifest of {}", name.canonical()))?;
        manifest_digest = digest;
        if manifest.manifests.is_some() && manifest.layers.is_empty() {
            bail!("{} nests an index in its index", name.canonical());
        }
    } else if manifest.schema_version == 1
        || kind.contains("manifest.v1+prettyjws")
        || kind.ends_with("manifest.v1+json") && !kind.contains("oci")
    {
        bail!("{} has a Docker schema 1 manifest, which is not supported", name.canonical());
    }
    if manifest.layers.len() > MAX_LAYERS {
        bail!(
            "the manifest of {} lists {} layers, over the cap of {MAX_LAYERS}",
            name.canonical(),
            manifest.layers.len()
        );
    }
    let config = manifest
        .config
        .as_ref()
        .with_context(|| format!("the manifest of {} has no config", name.canonical()))?;
    check_digest(&config.digest)?;
    for l in &manifest.layers {
        check_digest(&l.digest)?;
        if !(l.media_type.is_empty() || l.media_type.contains("tar") || l.media_type.contains("layer")) {
            bail!(
                "layer {} of {} has the unsupported media type {:?}",
                l.digest,
                name.canonical(),
                l.media_type
            );
        }
    }

    // Already built from this manifest: only the names are new.
    if let Ok(image) = store.point(&name_key(name), &manifest_digest, &alias(name, &top_digest)) {
        return Ok((image, top_digest, 0));
    }

    let (cfg_body, _, _) =
        fetch_document(session, &format!("blobs/{}", config.digest), "*/*", Some(&config.digest))?;
    let cfg: super::import::ImageConfigFile = serde_json::from_slice(&cfg_body)
        .with_context(|| format!("parsing the image config of {}", name.canonical()))?;
    let cfg = cfg.config.unwrap_or_default();

    let (bytes, _blob_locks) = download_layers(store, session, name, &manifest.layers)?;

    let staging = store.staging("pull")?;
    let tree = staging.path().join("tree");
    fs::create_dir(&tree)?;
    let budget = Rc::new(Cell::new(opts.max_unpacked));
    let mut size = 0;
    for (i, l) in manifest.layers.iter().enumerate() {
        let blob = store.blob_path(&l.digest);
        let f = fs::File::open(&blob).with_context(|| format!("opening layer blob {}", blob.display()))?;
        let capped = Capped { inner: decompress(f)?, left: budget.clone(), cap: opts.max_unpacked };
        size += super::import::apply_layer(capped, &tree).with_context(|| {
            format!(
                "applying layer {} ({}/{}) of {}",
                l.digest,
                i + 1,
                manifest.layers.len(),
                name.canonical()
            )
        })?;
    }
    let meta = ImageMeta {
        digest: manifest_digest,
        env: cfg.env.unwrap_or_default(),
        workdir: cfg.working_dir.unwrap_or_default(),
        user: cfg.user.unwrap_or_default(),
        size,
        disk: 0,
        created: super::now(),
        source: "pull".into(),
        layers: manifest.layers.iter().map(|l| l.digest.clone()).collect(),
    };
    super::import::finish_tree(&tree)?;
    store.commit_tree_as(&tree, &meta, &name_key(name))?;
    let image = store.point(&name_key(name), &meta.digest, &alias(name, &top_digest))?;
    drop(staging);
    Ok((image, top_digest, bytes))
}

/// The store key a pull names: `registry/repo:tag`, or `registry/repo@digest` when pinned.
fn name_key(name: &ImageName) -> String {
    name.canonical()
}

/// `registry/repo@digest`, the pinned alias of a pull.
fn alias(name: &ImageName, digest: &str) -> String {
    format!("{}@{digest}", name.name())
}

/// Caps the bytes a layer stream yields, across all the layers of one image.
struct Capped {
    inner: Box<dyn Read>,
    left: Rc<Cell<u64>>,
    cap: u64,
}

impl Read for Capped {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let left = self.left.get();
        if n as u64 > left {
            return Err(std::io::Error::other(format!(
                "the image unpacks to more than {} (the cap, EXECUTOR_IMAGE_MAX_SIZE): refusing a decompression bomb",
                crate::base::units::format_bytes(self.cap)
            )));
        }
        self.left.set(left - n as u64);
        Ok(n)
    }
}

/// A layer blob as a plain tar stream: gzip and zstd are told by their magic bytes.
fn decompress(f: fs::File) -> Result<Box<dyn Read>> {
    let mut r = BufReader::with_capacity(256 * 1024, f);
    let head = r.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(r)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(zstd::stream::read::Decoder::with_buffer(r).context("starting zstd")?))
    } else {
        Ok(Box::new(r))
    }
}

/// Downloads the layers the store lacks, several at once; returns the bytes downloaded and the
/// blobs' locks.
fn download_layers(
    store: &ImageStore,
    session: &Session,
    name: &ImageName,
    layers: &[Descriptor],
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
                match fetch_blob(store, session, &l.digest, l.size, &bar, &overall) {
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
fn fetch_blob(
    store: &ImageStore,
    session: &Session,
    digest: &str,
    size: u64,
    bar: &indicatif::ProgressBar,
    overall: &indicatif::ProgressBar,
) -> Result<(u64, crate::base::lock::Held)> {
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
    loop {
        let step = (|| -> Result<bool> {
            let resp = session.get(&format!("blobs/{digest}"), "*/*", Some(written))?;
            if resp.status() != 206 && written > 0 {
                // The registry ignores ranges: start again.
                out.set_len(0)?;
                out.rewind()?;
                hasher = Sha256::new();
                overall.set_position(overall.position().saturating_sub(written));
                written = 0;
                bar.set_position(0);
            }
            let mut body = resp.into_reader();
            loop {
                let n = body.read(&mut buf).with_context(|| format!("reading blob {digest}"))?;
                if n == 0 {
                    return Ok(true);
                }
                written += n as u64;
                if size > 0 && written > size {
                    let registry = session.registry.clone();
                    return Err(BadBlob::Larger { digest: digest.to_string(), registry, size }.into());
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).with_context(|| format!("writing {}", partial.display()))?;
                bar.inc(n as u64);
                overall.inc(n as u64);
            }
        })();
        match step {
            Ok(_) => break,
            Err(e) if e.downcast_ref::<BadBlob>().is_some() => {
                let _ = fs::remove_file(&partial);
                return Err(e);
            }
            Err(e) => {
                attempt += 1;
                // The registry's own answer (or its retries, which ran out) is final.
                if attempt >= retry.max_attempts || e.downcast_ref::<registry::RegistryError>().is_some() {
                    let _ = fs::remove_file(&partial);
                    return Err(e.context(format!("blob {digest}")));
                }
                std::thread::sleep(retry.delay(attempt));
            }
        }
    }
    let got = format!("sha256:{}", hex::encode(hasher.finalize()));
    if got != digest {
        let _ = fs::remove_file(&partial);
        return Err(
            BadBlob::Digest { digest: digest.to_string(), registry: session.registry.clone(), got }.into()
        );
    }
    if size > 0 && written != size {
        let _ = fs::remove_file(&partial);
        let registry = session.registry.clone();
        return Err(BadBlob::Size { digest: digest.to_string(), registry, written, size }.into());
    }
    out.sync_all().ok();
    fs::rename(&partial, &dest).with_context(|| format!("moving {} into the store", partial.display()))?;
    Ok((written, lock))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::atomic::AtomicUsize;
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

    /// Fetches the blob `body` claims to be (with `size` from the manifest) from `url`.
    fn fetch(url: &str, body: &[u8], size: u64) -> Result<u64> {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let retry = crate::api::RetryPolicy { max_attempts: 3, base: Duration::ZERO, ..Default::default() };
        let opts = RegistryOptions { retry, ..Default::default() };
        let name = ImageName::parse("127.0.0.1:1/team/img:v1").unwrap();
        let session = Session::new(&registry::agent(&opts).unwrap(), url, &name, &opts);
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(body)));
        let bar = indicatif::ProgressBar::hidden();
        fetch_blob(&store, &session, &digest, size, &bar, &bar).map(|(n, _)| n)
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
}
