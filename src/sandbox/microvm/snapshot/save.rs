//! Saving a running template VM (booted by the pool with `executor.template=1` and a QMP
//! monitor, pool/restore.rs): over QMP QEMU migrates it into a socket of its sandbox directory,
//! whose stream the executor writes to the snapshot's file while it hashes it. The stream holds
//! the devices' state only: the guest's RAM is shared (`x-ignore-shared`, ram.rs).

use anyhow::{bail, Context, Result};
use sha2::Digest;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use super::super::qemu::QMP_SOCKET;
use super::qmp::Qmp;

/// The socket QEMU migrates the template into, in its sandbox directory.
const SAVE_SOCKET: &str = "save.sock";
/// How long a save may take under TCG (a few seconds on an idle host).
const SAVE_LIMIT: Duration = Duration::from_secs(120);

/// Migrates the running template of sandbox directory `dir` into `out`; returns the stream's
/// size, its SHA-256 and the time the save took.
pub(crate) fn save(dir: &Path, out: &Path) -> Result<(u64, String, u64)> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::PermissionsExt;
    let t = Instant::now();
    let sock = dir.join(SAVE_SOCKET);
    // Both sockets through an open handle on the directory: a socket address holds 108 bytes,
    // fewer than a long state directory's paths.
    let handle = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let short = |name: &str| Path::new("/proc/self/fd").join(handle.as_raw_fd().to_string()).join(name);
    let listener =
        UnixListener::bind(short(SAVE_SOCKET)).with_context(|| format!("listening on {}", sock.display()))?;
    // QEMU's user connects; the directory (0700, its own) keeps everyone else out.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777))
        .with_context(|| format!("setting the mode of {}", sock.display()))?;
    let mut qmp = Qmp::connect(&short(QMP_SOCKET))
        .with_context(|| format!("connecting to {}", dir.join(QMP_SOCKET).display()))?;
    // An idle guest: one pass at full speed; the guest pauses for the rest.
    qmp.cmd(
        "migrate-set-parameters",
        serde_json::json!({"max-bandwidth": 1u64 << 40, "downtime-limit": 2000}),
    )?;
    // The guest's RAM is the template's memfd (ram.rs): it stays out of the stream.
    qmp.cmd("migrate-set-capabilities", super::qmp::ignore_shared())?;
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
