//! Saving a template VM: boot it (`executor.template=1`, with a QMP monitor), then over QMP have
//! QEMU migrate it into a socket of its sandbox directory, whose stream the executor writes to
//! the snapshot's file while it hashes it; then the template is torn down. A save that fails
//! anywhere leaves no snapshot.

use anyhow::{bail, Context, Result};
use sha2::Digest;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use super::super::boot::VmBoot;
use super::super::qemu::QMP_SOCKET;
use super::super::MicroVm;
use super::{Meta, Snapshot, STATE};
use crate::sandbox::microvm::pool::PoolKey;
use crate::sandbox::Runtime;

/// The socket QEMU migrates the template into, in its sandbox directory.
const SAVE_SOCKET: &str = "save.sock";
/// How long a save may take under TCG (a few seconds on an idle host).
const SAVE_LIMIT: Duration = Duration::from_secs(120);

/// A QMP connection: one command at a time, events skipped.
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(sock: &Path) -> Result<Qmp> {
        let s = UnixStream::connect(sock).with_context(|| format!("connecting to {}", sock.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut q = Qmp { r: BufReader::new(s.try_clone()?), w: s };
        q.read()?;
        q.cmd("qmp_capabilities", serde_json::json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<serde_json::Value> {
        let mut line = String::new();
        if self.r.read_line(&mut line).context("reading QEMU's monitor")? == 0 {
            bail!("QEMU's monitor closed");
        }
        serde_json::from_str(&line).context("QEMU's monitor said something that is not JSON")
    }

    fn cmd(&mut self, execute: &str, arguments: serde_json::Value) -> Result<serde_json::Value> {
        let mut line = serde_json::to_vec(&serde_json::json!({"execute": execute, "arguments": arguments}))?;
        line.push(b'\n');
        self.w.write_all(&line).context("writing to QEMU's monitor")?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QEMU refused {execute}: {}", e.get("desc").and_then(|d| d.as_str()).unwrap_or("?"));
            }
        }
    }
}

impl MicroVm {
    /// Boots the template VM `name` for `key` with `boot` (made a template here), saves it into
    /// a new snapshot and tears it down.
    pub(in super::super) fn take_snapshot(
        &self,
        name: &str,
        boot: &VmBoot,
        key: &PoolKey,
    ) -> Result<Snapshot> {
        let t0 = Instant::now();
        let started = std::time::SystemTime::now();
        let mut template = boot.clone();
        template.template = true;
        let rec = self.boot_vm(name, &template)?;
        let boot_ms = t0.elapsed().as_millis() as u64;
        // The image disks the guest mounted: files made before the template started (one
        // replaced while it booted may not be the file QEMU opened) and unchanged by the save.
        let disks: Vec<std::path::PathBuf> = MicroVm::details(&rec)
            .map(|d| d.images.iter().map(|i| i.disk.clone()).collect())
            .unwrap_or_default();
        let ids = || disks.iter().map(|d| super::disk_id(d)).collect::<Result<Vec<_>>>();
        let fresh = disks
            .iter()
            .any(|d| std::fs::metadata(d).and_then(|m| m.modified()).map_or(true, |m| m >= started));
        let before = ids();
        // The template keeps no connection: the host talks to each restored VM anew.
        if let Ok(det) = MicroVm::details(&rec) {
            drop(self.take_idle(&rec, &det.socket));
        }
        let tmp = super::snapshots_dir(&self.opts.state_dir).join(format!("tmp-{}", uuid::Uuid::new_v4()));
        let saved = (|| {
            if fresh {
                bail!("an image disk was made while the template booted");
            }
            std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            let saved = save(&rec.state_dir, &tmp.join(STATE))?;
            if ids()? != before? {
                bail!("an image disk changed while the template was saved");
            }
            Ok(saved)
        })();
        let _ = self.teardown(&rec);
        let (bytes, sha256, save_ms) = match saved {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e.context(format!("saving template VM {name}")));
            }
        };
        let image_disks = ids()?;
        let meta = Meta {
            key: super::key_text(key),
            kernel: key.base.kernel.clone(),
            initramfs: key.base.initramfs.clone(),
            images: key.images.clone(),
            qemu: super::qemu_version()?,
            bytes,
            sha256,
            boot_ms,
            save_ms,
            image_disks,
        };
        super::install(&self.opts.state_dir, &tmp, key, &meta).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&tmp);
        })
    }
}

/// Migrates the running template of sandbox directory `dir` into `out`; returns the stream's
/// size, its SHA-256 and the time the save took.
fn save(dir: &Path, out: &Path) -> Result<(u64, String, u64)> {
    use std::os::unix::fs::PermissionsExt;
    let t = Instant::now();
    let sock = dir.join(SAVE_SOCKET);
    let listener = UnixListener::bind(&sock).with_context(|| format!("listening on {}", sock.display()))?;
    // QEMU's user connects; the directory (0700, its own) keeps everyone else out.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777))
        .with_context(|| format!("setting the mode of {}", sock.display()))?;
    let mut qmp = Qmp::connect(&dir.join(QMP_SOCKET))?;
    // An idle guest: one pass at full speed; the guest pauses for the rest.
    qmp.cmd(
        "migrate-set-parameters",
        serde_json::json!({"max-bandwidth": 1u64 << 40, "downtime-limit": 2000}),
    )?;
    listener.set_nonblocking(true)?;
    qmp.cmd("migrate", serde_json::json!({"uri": format!("unix:{SAVE_SOCKET}")}))?;
    let conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && t.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(e).context("waiting for QEMU to connect its migration stream"),
        }
    };
    conn.set_nonblocking(false)?;
    let out_path = out.to_path_buf();
    let writer = std::thread::spawn(move || write_stream(conn, &out_path));
    let status = loop {
        let r = qmp.cmd("query-migrate", serde_json::json!({}))?;
        let s = r.get("status").and_then(|s| s.as_str()).unwrap_or("").to_string();
        if matches!(s.as_str(), "completed" | "failed" | "cancelled") || t.elapsed() > SAVE_LIMIT {
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = qmp.cmd("quit", serde_json::json!({}));
    let written = writer.join().map_err(|_| anyhow::anyhow!("the snapshot writer panicked"))?;
    if status != "completed" {
        bail!("the migration ended {status:?}");
    }
    let (bytes, sum) = written?;
    Ok((bytes, sum, t.elapsed().as_millis() as u64))
}

/// Copies the migration stream into `out`, hashing it; synced before it counts as saved.
fn write_stream(mut conn: UnixStream, out: &Path) -> Result<(u64, String)> {
    conn.set_read_timeout(Some(SAVE_LIMIT))?;
    let mut f = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading the migration stream"),
        };
        hash.update(&buf[..n]);
        f.write_all(&buf[..n]).with_context(|| format!("writing {}", out.display()))?;
        total += n as u64;
    }
    f.sync_all().with_context(|| format!("syncing {}", out.display()))?;
    if total == 0 {
        bail!("QEMU sent an empty migration stream");
    }
    Ok((total, super::hex(&hash.finalize())))
}
