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

/// Starts the resolver of a job and waits until it listens. The process is in a group of its
/// own, so that a signal to the stage that started it does not reach it.
pub(crate) fn start(state_dir: &Path, cfg: &ResolverConfig) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    let d = dir(state_dir);
    fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    let conf = config_file(state_dir, &cfg.sandbox);
    crate::base::fs::write_atomic(&conf, &serde_json::to_vec(cfg)?)
        .with_context(|| format!("writing {}", conf.display()))?;
    let _ = fs::remove_file(&cfg.log);
    let mut child = crate::base::proc::command(executor_binary()?)
        .arg("network-resolver")
        .arg(&conf)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting the job's resolver (executor network-resolver)")?;
    let pid = child.id();
    let mut line = String::new();
    let ready = child
        .stdout
        .take()
        .map(|o| std::io::BufReader::new(o).read_line(&mut line))
        .transpose()
        .context("waiting for the job's resolver")?;
    if ready.unwrap_or(0) == 0 || line.trim() != "ready" {
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

/// Stops a sandbox's resolver, if it runs; its log stays for the egress record.
pub(crate) fn stop(state_dir: &Path, sandbox: &str) {
    use nix::sys::signal::{kill, Signal};
    use nix::sys::wait::{waitpid, WaitPidFlag};
    use nix::unistd::Pid;
    let pf = pid_file(state_dir, sandbox);
    let conf = config_file(state_dir, sandbox);
    if let Some(pid) = fs::read_to_string(&pf).ok().and_then(|t| t.trim().parse::<i32>().ok()) {
        // Only the process that serves this sandbox's configuration (a pid can be reused).
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let ours = String::from_utf8_lossy(&cmdline).contains(&*conf.to_string_lossy());
        if ours && kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
            for _ in 0..200 {
                match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                    Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    // Not this process's child: gone when /proc says so.
                    Err(_) if Path::new(&format!("/proc/{pid}")).exists() => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    _ => break,
                }
            }
        }
    }
    let _ = fs::remove_file(&pf);
    let _ = fs::remove_file(&conf);
}

/// `executor network-resolver CONFIG`: serves until the job's link is gone or it is killed.
pub(crate) fn serve_main(config: &Path) -> Result<()> {
    let text = fs::read(config).with_context(|| format!("reading {}", config.display()))?;
    let cfg: ResolverConfig =
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", config.display()))?;
    serve::Resolver::new(cfg)?.run()
}
