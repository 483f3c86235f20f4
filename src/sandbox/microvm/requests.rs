//! The host's side of the conversation with a VM's agent: connections (kept idle between
//! requests), a step's run request with its output, cancellation and silence limit, and
//! `test-vm`'s one-off command.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::boot::VmBoot;
use super::channel::Channel;
use super::{printable, Accel, BootPhases, MicroVm, SILENCE_LIMIT};
use crate::base::cancel::Cancel;
use crate::guest::protocol::*;
use crate::sandbox::{Limits, OutputSink, Runtime, SandboxRecord, StepEnd, Stream};

/// Agent connections left clean (handshake done, or request answered), by VM name and socket,
/// kept for the next request to the same VM from any runtime instance of this process (`loop`'s
/// stages each open their own: `vm-boot`'s connection serves `run-steps`): a fresh connection
/// costs the guest a port reopening and a hello round trip. Teardown drops a VM's connection.
static IDLE: std::sync::Mutex<Vec<(String, PathBuf, Channel)>> = std::sync::Mutex::new(Vec::new());
/// Most connections kept (those of VMs torn down by another process are never taken).
const IDLE_MAX: usize = 64;

impl MicroVm {
    pub(super) fn keep_idle(&self, sandbox: &SandboxRecord, socket: &Path, ch: Channel) {
        let mut idle = IDLE.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|(name, _, _)| *name != sandbox.name);
        if idle.len() >= IDLE_MAX {
            idle.remove(0);
        }
        idle.push((sandbox.name.clone(), socket.to_path_buf(), ch));
    }

    pub(super) fn take_idle(&self, sandbox: &SandboxRecord, socket: &Path) -> Option<Channel> {
        let mut idle = IDLE.lock().unwrap_or_else(|p| p.into_inner());
        let i = idle.iter().position(|(name, sock, _)| *name == sandbox.name && sock == socket)?;
        Some(idle.remove(i).2)
    }

    /// Boots a VM (with `workspace` as its `/data`, if given) and runs `argv` in its initramfs,
    /// from `/data` when there is a workspace (for `test-vm`).
    pub fn test_vm(
        &self,
        argv: &[String],
        workspace: Option<&Path>,
        sink: &mut dyn OutputSink,
        timeout: Duration,
    ) -> Result<(BootPhases, StepEnd, Duration, Accel)> {
        let (accel, why) = self.choose_accel()?;
        let rec = self.boot_retrying(
            "executor-test",
            &VmBoot::new(workspace, &[], accel, why, &Limits::default(), timeout),
        )?;
        let det = Self::details(&rec).unwrap_or_default();
        let t = Instant::now();
        let cancel = Cancel::with_deadline(Some(Instant::now() + timeout));
        let cwd = if workspace.is_some() { "/data" } else { "/" };
        let req = RunRequest {
            id: 1,
            image: u32::MAX,
            argv: argv.to_vec(),
            cwd: cwd.into(),
            env: base_env(),
            user: None,
            engine: None,
            ..RunRequest::default()
        };
        let res = self.request(&rec, req, sink, &cancel);
        let elapsed = t.elapsed();
        let _ = self.teardown(&rec);
        Ok((det.phases, res?, elapsed, accel))
    }

    pub(super) fn connect(&self, sandbox: &SandboxRecord) -> Result<Channel> {
        let det = Self::details(sandbox)?;
        if let Some(ch) = self.take_idle(sandbox, &det.socket) {
            return Ok(ch);
        }
        let mut ch = Channel::connect(&det.socket, Duration::from_secs(5))
            .with_context(|| format!("reaching VM {}", sandbox.name))?;
        ch.handshake(Duration::from_secs(15))
            .with_context(|| format!("greeting the agent of VM {}", sandbox.name))?;
        Ok(ch)
    }

    pub(super) fn request(
        &self,
        sandbox: &SandboxRecord,
        req: RunRequest,
        sink: &mut dyn OutputSink,
        cancel: &Cancel,
    ) -> Result<StepEnd> {
        let mut ch = self.connect(sandbox)?;
        let id = req.id;
        ch.send(&Frame::json(Kind::Run, &req)?)?;
        let mut last_seen = Instant::now();
        let mut canceled: Option<(crate::base::cancel::CancelReason, Instant)> = None;
        loop {
            if canceled.is_none() {
                if let Some(reason) = cancel.check() {
                    let _ = ch.send(&Frame::json(Kind::Cancel, &Control { id })?);
                    canceled = Some((reason, Instant::now()));
                }
            }
            if let Some((reason, at)) = canceled {
                if at.elapsed() > Duration::from_secs(10) {
                    // The agent did not confirm the kill: the VM goes, and the step with it.
                    let _ = self.teardown(sandbox);
                    return Ok(StepEnd::Stopped(reason));
                }
            }
            if last_seen.elapsed() > SILENCE_LIMIT {
                bail!("the agent of VM {} was silent for {SILENCE_LIMIT:?}", sandbox.name);
            }
            let Some(f) = ch
                .recv(Duration::from_millis(100))
                .with_context(|| format!("running request {id} in VM {}", sandbox.name))?
            else {
                continue;
            };
            match f.kind {
                Kind::Stdout | Kind::Stderr | Kind::Alive => {
                    let (fid, data) = f.split_data()?;
                    if fid != id {
                        continue;
                    }
                    last_seen = Instant::now();
                    if !data.is_empty() && f.kind != Kind::Alive {
                        sink.output(
                            if f.kind == Kind::Stdout { Stream::Stdout } else { Stream::Stderr },
                            data,
                        );
                    }
                }
                Kind::Exit => {
                    let r: ExitReport = f.parse()?;
                    if r.id != id {
                        continue;
                    }
                    if let Some((reason, _)) = canceled {
                        return Ok(StepEnd::Stopped(reason));
                    }
                    if let Some(us) = r.caches_us {
                        sink.note(&format!("caches attached in the guest in {:.1} ms", us as f64 / 1000.0));
                    }
                    let end = match (r.code, r.signal) {
                        (Some(c), _) => StepEnd::Exited(c),
                        (None, Some(s)) => StepEnd::Signaled(s),
                        (None, None) => {
                            bail!("the agent of VM {} reported an exit with no status", sandbox.name)
                        }
                    };
                    if let Ok(det) = Self::details(sandbox) {
                        self.keep_idle(sandbox, &det.socket, ch);
                    }
                    return Ok(end);
                }
                Kind::Error => {
                    let r: ErrorReport = f.parse()?;
                    if r.id == id {
                        bail!("the agent of VM {} failed the step: {}", sandbox.name, printable(&r.message));
                    }
                }
                _ => {}
            }
        }
    }
}

pub(super) fn base_env() -> Vec<String> {
    vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(), "HOME=/root".into()]
}

/// A relative path from the job that must stay below /data.
pub(super) fn inside_data(rel: &str) -> Result<String> {
    let rel = rel.trim_start_matches("./");
    if rel.split('/').any(|c| c == "..") || rel.starts_with('/') {
        bail!("path {rel:?} leaves the workspace");
    }
    Ok(if rel.is_empty() || rel == "." {
        "/data".into()
    } else {
        format!("/data/{}", rel.trim_end_matches('/'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_paths_stay_below_data() {
        assert_eq!(inside_data("").unwrap(), "/data");
        assert_eq!(inside_data(".").unwrap(), "/data");
        assert_eq!(inside_data("a/b/").unwrap(), "/data/a/b");
        assert_eq!(inside_data("./x.sh").unwrap(), "/data/x.sh");
        assert!(inside_data("../etc").is_err());
        assert!(inside_data("a/../../b").is_err());
        assert!(inside_data("/etc").is_err());
    }
}
