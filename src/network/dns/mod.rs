//! The resolver of an `allowlist` job: a small DNS server of the executor's, one process per job
//! (`executor network-resolver`, started by the job's network setup and stopped by its
//! teardown, so that it outlives the stage process that made it), listening on the job's
//! gateway. It answers only the allowed names (others get NXDOMAIN), forwards those to the
//! host's upstream resolvers, and puts each answer's addresses into the job's nftables sets for
//! the record's TTL plus a grace, which is all the job's chain lets it reach by name. Every
//! question goes into the job's egress log (`egress.rs` reads it at teardown).

mod serve;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::BufRead;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::hosts::HostRule;

pub(crate) use serve::{Question, SET_HOSTS, SET_PORTS};

/// What one job's resolver serves, written by setup as `<sandbox>.json` beside its log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ResolverConfig {
    pub sandbox: String,
    /// The job's gateway, where the resolver listens (port 53).
    pub listen: Ipv4Addr,
    /// The job's address: the sets' elements start with it.
    pub job: Ipv4Addr,
    /// The job's host-side link: when it is gone, so is the job, and the resolver ends.
    pub host_if: String,
    pub upstream: Vec<Ipv4Addr>,
    pub hosts: Vec<HostRule>,
    /// Seconds an answer's addresses stay reachable past its TTL.
    pub grace_s: u64,
    /// Questions per second the resolver answers (a burst of as many); more are refused.
    pub rate: u32,
    /// The longest name (characters) the resolver forwards.
    pub max_name: usize,
    /// The egress log (JSON lines).
    pub log: PathBuf,
}

/// The directory of the resolvers' configurations, pid files and logs.
pub(crate) fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("network").join("dns")
}

fn pid_file(state_dir: &Path, sandbox: &str) -> PathBuf {
    dir(state_dir).join(format!("{sandbox}.pid"))
}

/// The egress log of a sandbox's resolver.
pub(crate) fn log_file(state_dir: &Path, sandbox: &str) -> PathBuf {
    dir(state_dir).join(format!("{sandbox}.log"))
}

fn config_file(state_dir: &Path, sandbox: &str) -> PathBuf {
    dir(state_dir).join(format!("{sandbox}.json"))
}

/// A resolver started ahead of the next allowlist job ([`keep_spare`]): `executor
/// network-resolver --spare DIR`, waiting for its configuration's path on its stdin. Starting
/// the process (exec, the runtime's start) is most of a resolver's start: a process that lives
/// across jobs (`executor loop`) keeps one spare, and a job's network takes it.
struct Spare {
    state_dir: PathBuf,
    child: std::process::Child,
}

static SPARE: std::sync::Mutex<Option<Spare>> = std::sync::Mutex::new(None);
/// The state directory whose jobs get spares, once [`keep_spare`] was called.
static SPARE_FOR: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// Keeps a spare resolver for the allowlist jobs of `state_dir` until the guard is dropped
/// (held by `executor loop`; a stage run alone starts its job's resolver itself). Should this
/// process die first, the spare ends with it: its stdin closes.
#[must_use]
pub fn keep_spare(state_dir: &Path) -> SpareGuard {
    *SPARE_FOR.lock().unwrap_or_else(|p| p.into_inner()) = Some(state_dir.to_path_buf());
    refill_spare();
    SpareGuard(())
}

/// Stops keeping spares when dropped, and ends the one that waits.
pub struct SpareGuard(());

impl Drop for SpareGuard {
    fn drop(&mut self) {
        *SPARE_FOR.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let spare = SPARE.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut s) = spare {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
    }
}

/// Starts a spare in the background, if spares are kept and none waits.
fn refill_spare() {
    let Some(state_dir) = SPARE_FOR.lock().unwrap_or_else(|p| p.into_inner()).clone() else { return };
    std::thread::spawn(move || {
        let child = match spawn(&state_dir, None) {
            Ok(c) => c,
            Err(e) => return tracing::warn!("starting a spare resolver: {e:#}"),
        };
        // Kept only while spares still are (the guard may have gone meanwhile), and one at a time.
        let wanted = SPARE_FOR.lock().unwrap_or_else(|p| p.into_inner()).as_ref() == Some(&state_dir);
        let mut slot = SPARE.lock().unwrap_or_else(|p| p.into_inner());
        match slot.as_ref() {
            None if wanted => *slot = Some(Spare { state_dir, child }),
            _ => {
                drop(slot);
                let mut c = child;
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    });
}

/// `executor network-resolver` for `conf`, or a spare (`None`) that reads its configuration's
/// path from stdin. The process is in a group of its own, so that a signal to the stage that
/// started it does not reach it.
fn spawn(state_dir: &Path, conf: Option<&Path>) -> Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let mut cmd = crate::base::proc::command(executor_binary()?);
    cmd.arg("network-resolver");
    match conf {
        Some(c) => cmd.arg(c).stdin(std::process::Stdio::null()),
        None => cmd.arg("--spare").arg(dir(state_dir)).stdin(std::process::Stdio::piped()),
    };
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting the job's resolver (executor network-resolver)")
}

/// The spare of `state_dir`, handed `conf`, once it said it listens; `None` when there is no
/// spare or it failed (it is killed, and the caller starts a resolver as it would without).
fn take_spare(state_dir: &Path, conf: &Path) -> Option<u32> {
    use std::io::Write;
    let spare = {
        let mut slot = SPARE.lock().unwrap_or_else(|p| p.into_inner());
        match slot.take() {
            Some(s) if s.state_dir == state_dir => s,
            other => {
                *slot = other;
                return None;
            }
        }
    };
    refill_spare();
    let mut child = spare.child;
    let handed = child.stdin.take().is_some_and(|mut i| writeln!(i, "{}", conf.display()).is_ok());
    if handed && ready(&mut child) {
        return Some(child.id());
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Whether the resolver said `ready` on its stdout (it does once it listens).
fn ready(child: &mut std::process::Child) -> bool {
    let mut line = String::new();
    let read = child.stdout.take().map(|o| std::io::BufReader::new(o).read_line(&mut line));
    matches!(read, Some(Ok(n)) if n > 0) && line.trim() == "ready"
}

/// Starts the resolver of a job (the spare, where one waits) and waits until it listens.
pub(crate) fn start(state_dir: &Path, cfg: &ResolverConfig) -> Result<u32> {
    let d = dir(state_dir);
    fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    let conf = config_file(state_dir, &cfg.sandbox);
    crate::base::fs::write_atomic(&conf, &serde_json::to_vec(cfg)?)
        .with_context(|| format!("writing {}", conf.display()))?;
    let _ = fs::remove_file(&cfg.log);
    if let Some(pid) = take_spare(state_dir, &conf) {
        fs::write(pid_file(state_dir, &cfg.sandbox), pid.to_string())
            .context("writing the resolver's pid file")?;
        return Ok(pid);
    }
    let mut child = spawn(state_dir, Some(&conf))?;
    let pid = child.id();
    if !ready(&mut child) {
        let _ = child.kill();
        let status = child.wait().ok();
        bail!(
            "the job's resolver did not start ({status:?}): see `executor network-resolver {}`",
            conf.display()
        );
    }
    fs::write(pid_file(state_dir, &cfg.sandbox), pid.to_string())
        .context("writing the resolver's pid file")?;
    // The child is reaped by `stop` (or by init once this process ends).
    std::mem::forget(child);
    Ok(pid)
}

/// The `executor` binary: this one, or (for a program linking the library, such as the
/// benchmarks under target/*/examples) the one beside it or one directory up.
fn executor_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this executable")?;
    if exe.file_name().is_some_and(|n| n == "executor") {
        return Ok(exe);
    }
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    [dir.join("executor"), dir.join("../executor")].into_iter().find(|p| p.is_file()).with_context(|| {
        format!(
            "no executor binary beside {} to serve the job's DNS (executor network-resolver)",
            exe.display()
        )
    })
}

/// Sends a sandbox's resolver, if it runs, SIGKILL, and removes its pid file and
/// configuration; returns its pid for [`reap`]. Once the signal is sent it answers no further
/// question (what it was writing may still land until [`reap`] returns).
pub(crate) fn kill(state_dir: &Path, sandbox: &str) -> Option<i32> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let pf = pid_file(state_dir, sandbox);
    let conf = config_file(state_dir, sandbox);
    let mut killed = None;
    if let Some(pid) = fs::read_to_string(&pf).ok().and_then(|t| t.trim().parse::<i32>().ok()) {
        // Only a resolver of this state directory (a pid can be reused): one started for this
        // sandbox's configuration names it, a spare names the directory.
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let ours = String::from_utf8_lossy(&cmdline).contains(&*dir(state_dir).to_string_lossy());
        if ours && kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
            killed = Some(pid);
        }
    }
    let _ = fs::remove_file(&pf);
    let _ = fs::remove_file(&conf);
    killed
}

/// Waits until a resolver [`kill`] signalled is gone (reaped, when it is this process's child).
pub(crate) fn reap(pid: i32) {
    use nix::sys::wait::{waitpid, WaitPidFlag};
    use nix::unistd::Pid;
    // A killed process is gone in well under a millisecond: polled every 100 µs, for 200 ms at
    // most.
    let tick = Duration::from_micros(100);
    for _ in 0..2000 {
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => std::thread::sleep(tick),
            // Not this process's child: gone when /proc says so.
            Err(_) if Path::new(&format!("/proc/{pid}")).exists() => std::thread::sleep(tick),
            _ => break,
        }
    }
}

/// `executor network-resolver --spare DIR`: waits for a configuration's path (a file of DIR) on
/// stdin, then serves it; stdin closed first (the process that keeps spares ended) ends it.
pub(crate) fn serve_spare(dir: &Path) -> Result<()> {
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line).context("reading the configuration's path")? == 0 {
        return Ok(());
    }
    let config = PathBuf::from(line.trim_end_matches('\n'));
    if config.parent() != Some(dir) {
        bail!("{} is not a resolver configuration of {}", config.display(), dir.display());
    }
    serve_main(&config)
}

/// `executor network-resolver CONFIG`: serves until the job's link is gone or it is killed.
pub(crate) fn serve_main(config: &Path) -> Result<()> {
    let text = fs::read(config).with_context(|| format!("reading {}", config.display()))?;
    let cfg: ResolverConfig =
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", config.display()))?;
    serve::Resolver::new(cfg)?.run()
}
