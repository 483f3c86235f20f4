//! The guest's serial console, capped: QEMU writes it into a pipe, and a small reader process
//! copies the first [`CONSOLE_CAP`] bytes to `console.log` and drains the rest, so a guest that
//! prints without end cannot grow a host file, and never blocks on a full pipe either.

use anyhow::{Context, Result};
use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Stdio;

/// Most bytes of the guest's console kept on the host (the kernel's boot messages and the
/// agent's lines fit many times over; what failures quote is its first lines).
pub const CONSOLE_CAP: u64 = 1 << 20;

/// The reader: the first `$0` bytes of its stdin to its stdout (`console.log`), then the rest to
/// /dev/null until QEMU closes the pipe (when it exits).
const READER: &str = "head -c \"$0\"; exec cat >/dev/null";

/// Creates `log` (0600, empty) and starts the reader of a new pipe that fills it up to `cap`
/// bytes; returns the pipe's write end for QEMU, given to `owner` (uid, gid) when QEMU runs as
/// another user so that it may open it as `/proc/self/fd/N`. The reader runs in its own process
/// group and ends when the last write end closes; a thread reaps it.
pub fn start(log: &Path, cap: u64, owner: Option<(u32, u32)>) -> Result<OwnedFd> {
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(log)
        .with_context(|| format!("creating console log {}", log.display()))?;
    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating the console pipe")?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&write, Some(uid), Some(gid))
            .with_context(|| format!("giving the console pipe to uid {uid}"))?;
    }
    let mut cmd = crate::base::proc::command("sh");
    cmd.args(["-c", READER, &cap.to_string()]);
    cmd.stdin(Stdio::from(read)).stdout(Stdio::from(file)).stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().context("starting the console reader (sh, head, cat)")?;
    std::thread::Builder::new()
        .name("console-reader".into())
        .spawn(move || {
            let _ = child.wait();
        })
        .context("starting the console reader's reaper")?;
    Ok(write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn keeps_the_first_bytes_up_to_the_cap_and_drains_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("console.log");
        let write = start(&log, 1000, None).unwrap();
        let mut w = fs::File::from(write);
        // Far more than a pipe holds: a reader that stopped at the cap would block this.
        let chunk = vec![b'x'; 64 << 10];
        w.write_all(b"first line\n").unwrap();
        for _ in 0..64 {
            w.write_all(&chunk).unwrap();
        }
        drop(w);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while fs::metadata(&log).unwrap().len() < 1000 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let text = fs::read(&log).unwrap();
        assert_eq!(text.len(), 1000);
        assert!(text.starts_with(b"first line\n"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&log).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
