//! The `shell` runtime: steps run on the host, with no isolation at all. For development only:
//! it refuses to start without `EXECUTOR_ALLOW_UNISOLATED=1` (`--allow-unisolated`) and says so
//! loudly when it does. Each step runs in its own process group, so that a cancel, the deadline or
//! the end of the step kills everything it started (a process that leaves the group with setsid
//! escapes this; only a real sandbox runtime contains that).

use anyhow::{bail, Context, Result};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::collections::HashSet;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::{
    BootRequest, OutputSink, RecordDetails, Runtime, RuntimeKind, RuntimeOptions, SandboxRecord, StepEnd,
    StepSpec, Stream,
};
use crate::base::cancel::Cancel;

/// The warning printed whenever a sandbox is started by this runtime.
pub(crate) const WARNING: &str =
    "WARNING: the shell runtime runs job steps directly on this host with NO ISOLATION \
(development only; never use it for code you do not trust)";

/// The shell runtime's record: where the steps run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ShellDetails {
    pub workspace: PathBuf,
}

impl RecordDetails for ShellDetails {
    const RUNTIME: RuntimeKind = RuntimeKind::Shell;
}

pub(crate) struct ShellRuntime {
    opts: RuntimeOptions,
}

impl ShellRuntime {
    pub(crate) fn new(opts: &RuntimeOptions) -> Self {
        ShellRuntime { opts: opts.clone() }
    }

    fn workspace(sandbox: &SandboxRecord) -> Result<PathBuf> {
        match ShellDetails::of(sandbox)? {
            Some(d) => Ok(d.workspace),
            None => bail!("sandbox {} records no workspace", sandbox.name),
        }
    }
}

/// The environment of a step: a minimal host PATH/HOME/USER plus the step's own `env`.
fn step_env(env: &[String]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    out.push((
        "PATH".into(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into()),
    ));
    for k in ["HOME", "USER"] {
        if let Ok(v) = std::env::var(k) {
            out.push((k.into(), v));
        }
    }
    for e in env {
        if let Some((k, v)) = e.split_once('=') {
            if !k.is_empty() {
                out.retain(|(n, _)| n != k);
                out.push((k.into(), v.into()));
            }
        }
    }
    out
}

fn kill_group(pgid: i32) {
    // ESRCH: the group is already gone, which is what we want.
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
}

impl Runtime for ShellRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Shell
    }

    fn check(&self) -> Result<Vec<String>> {
        if !self.opts.allow_unisolated {
            bail!("the shell runtime needs EXECUTOR_ALLOW_UNISOLATED=1 (or --allow-unisolated): it does not isolate jobs");
        }
        if !Path::new("/bin/sh").exists() {
            bail!("/bin/sh is missing");
        }
        Ok(vec![
            "shell runtime: /bin/sh present; steps run on the host WITHOUT ISOLATION (allowed explicitly)"
                .into(),
        ])
    }

    fn boot(&self, req: &BootRequest) -> Result<SandboxRecord> {
        if !self.opts.allow_unisolated {
            bail!(
                "refusing to run job {} in the shell runtime without EXECUTOR_ALLOW_UNISOLATED=1 (or --allow-unisolated): \
                 it runs steps on the host with no isolation",
                req.job_uid
            );
        }
        tracing::warn!("{WARNING}");
        let name = format!("{}-{}", req.name_prefix, uuid::Uuid::new_v4());
        let state_dir = self.opts.sandboxes_dir().join(&name);
        std::fs::create_dir_all(&state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
        // Marks the directory as this runtime's, for the janitor.
        std::fs::write(state_dir.join("shell"), req.job_uid)
            .with_context(|| format!("writing {}", state_dir.join("shell").display()))?;
        let mut record = SandboxRecord::new(RuntimeKind::Shell, name, state_dir);
        ShellDetails { workspace: req.workspace.to_path_buf() }.store(&mut record);
        Ok(record)
    }

    fn step_command(&self, sandbox: &SandboxRecord, step: &StepSpec) -> Vec<String> {
        let ws = Self::workspace(sandbox).unwrap_or_default();
        vec!["/bin/sh".into(), ws.join(step.script).display().to_string()]
    }

    fn run_step(
        &self,
        sandbox: &SandboxRecord,
        step: &StepSpec,
        sink: &mut dyn OutputSink,
        cancel: &Cancel,
    ) -> Result<StepEnd> {
        let ws = Self::workspace(sandbox)?;
        let script = crate::base::fs::confined(&ws, step.script)?;
        let cwd = if step.dir.is_empty() || step.dir == "." {
            ws.clone()
        } else {
            let p = crate::base::fs::ensure_parent(&ws, &format!("{}/x", step.dir))
                .with_context(|| format!("step {}: working directory {:?}", step.key, step.dir))?;
            p.parent().map(Path::to_path_buf).unwrap_or(ws.clone())
        };
        let mut child = crate::base::proc::command("/bin/sh")
            .arg(&script)
            .current_dir(&cwd)
            .env_clear()
            .envs(step_env(step.env))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting step {} (/bin/sh {})", step.key, script.display()))?;
        let pgid = child.id() as i32;
        let mut out = child.stdout.take();
        let mut err = child.stderr.take();
        let mut buf = vec![0u8; 64 << 10];
        let mut status = None;
        let mut exited_at: Option<Instant> = None;
        let mut stopped = None;
        loop {
            if stopped.is_none() {
                if let Some(reason) = cancel.check() {
                    kill_group(pgid);
                    stopped = Some(reason);
                    exited_at.get_or_insert_with(Instant::now);
                }
            }
            if out.is_none() && err.is_none() {
                break;
            }
            if let Some(t) = exited_at {
                // The step is over but something still holds its pipes: it was started by the
                // step, so it dies with it.
                if t.elapsed() > Duration::from_millis(300) {
                    kill_group(pgid);
                }
                if t.elapsed() > Duration::from_secs(2) {
                    break;
                }
            }
            let (mut r_out, mut r_err) = (false, false);
            {
                let mut fds = Vec::with_capacity(2);
                if let Some(o) = &out {
                    fds.push(PollFd::new(o.as_fd(), PollFlags::POLLIN));
                }
                if let Some(e) = &err {
                    fds.push(PollFd::new(e.as_fd(), PollFlags::POLLIN));
                }
                match nix::poll::poll(&mut fds, PollTimeout::from(100u16)) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e).context("waiting for step output"),
                }
                let ready = |f: &PollFd| {
                    f.revents().is_some_and(|r| {
                        r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
                    })
                };
                let mut i = 0;
                if out.is_some() {
                    r_out = ready(&fds[i]);
                    i += 1;
                }
                if err.is_some() {
                    r_err = ready(&fds[i]);
                }
            }
            for (ready, pipe, stream) in
                [(r_out, &mut out as &mut dyn PipeSlot, Stream::Stdout), (r_err, &mut err, Stream::Stderr)]
            {
                if ready {
                    match pipe.read_into(&mut buf) {
                        Ok(0) => pipe.close(),
                        Ok(n) => sink.output(stream, &buf[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => pipe.close(),
                    }
                }
            }
            if status.is_none() {
                if let Some(s) = child.try_wait().context("waiting for the step")? {
                    status = Some(s);
                    exited_at.get_or_insert_with(Instant::now);
                }
            }
        }
        let status = match status {
            Some(s) => s,
            None => child.wait().context("waiting for the step")?,
        };
        kill_group(pgid);
        if let Some(reason) = stopped {
            return Ok(StepEnd::Stopped(reason));
        }
        Ok(match (status.code(), status.signal()) {
            (Some(c), _) => StepEnd::Exited(c),
            (None, Some(sig)) => StepEnd::Signaled(sig),
            (None, None) => StepEnd::Exited(-1),
        })
    }

    fn sync_workspace(&self, _sandbox: &SandboxRecord, _workspace: &Path) -> Result<()> {
        Ok(())
    }

    fn teardown(&self, sandbox: &SandboxRecord) -> Result<()> {
        match std::fs::remove_dir_all(&sandbox.state_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", sandbox.state_dir.display())),
        }
    }

    fn janitor(&self, prefix: &str, live: &HashSet<String>) -> Result<Vec<String>> {
        let dir = self.opts.sandboxes_dir();
        let mut removed = Vec::new();
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        for ent in rd.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
            let ours = name.strip_prefix(prefix).is_some_and(|r| r.starts_with('-'));
            // Only directories this runtime made (no marker of another runtime's state).
            if ours && !live.contains(&name) && ent.path().join("shell").exists() {
                std::fs::remove_dir_all(ent.path())
                    .with_context(|| format!("removing {}", ent.path().display()))?;
                removed.push(name);
            }
        }
        Ok(removed)
    }

    fn boot_warning(&self) -> Option<&'static str> {
        Some(WARNING)
    }

    fn runs_images(&self) -> bool {
        false
    }
}

/// A pipe that can be read and closed in place (so stdout and stderr share one loop body).
trait PipeSlot {
    fn read_into(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    fn close(&mut self);
}

impl<R: Read> PipeSlot for Option<R> {
    fn read_into(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Some(r) => r.read(buf),
            None => Ok(0),
        }
    }
    fn close(&mut self) {
        *self = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::cancel::CancelReason;

    struct Collect(Vec<(Stream, Vec<u8>)>);
    impl OutputSink for Collect {
        fn output(&mut self, stream: Stream, data: &[u8]) {
            self.0.push((stream, data.to_vec()));
        }
    }
    impl Collect {
        fn text(&self, s: Stream) -> String {
            self.0
                .iter()
                .filter(|(st, _)| *st == s)
                .map(|(_, d)| String::from_utf8_lossy(d).into_owned())
                .collect()
        }
    }

    fn setup(script: &str) -> (tempfile::TempDir, ShellRuntime, SandboxRecord) {
        let d = tempfile::tempdir().unwrap();
        let ws = d.path().join("ws");
        std::fs::create_dir_all(ws.join(".sourcegraph-executor")).unwrap();
        std::fs::write(ws.join(".sourcegraph-executor/s.sh"), script).unwrap();
        let rt = ShellRuntime::new(&RuntimeOptions {
            state_dir: d.path().join("state"),
            allow_unisolated: true,
            ..Default::default()
        });
        let limits = super::super::Limits::default();
        let sb = rt
            .boot(&BootRequest {
                job_uid: "1",
                workspace: &ws,
                images: vec![],
                limits: &limits,
                name_prefix: "executor",
                coordinator: None,
                endpoints: &[],
            })
            .unwrap();
        (d, rt, sb)
    }

    fn spec<'a>(env: &'a [String]) -> StepSpec<'a> {
        StepSpec { key: "step.docker.0", image: "", script: ".sourcegraph-executor/s.sh", dir: "sub", env }
    }

    #[test]
    fn refuses_without_opt_in() {
        let d = tempfile::tempdir().unwrap();
        let rt = ShellRuntime::new(&RuntimeOptions {
            state_dir: d.path().into(),
            allow_unisolated: false,
            ..Default::default()
        });
        let limits = super::super::Limits::default();
        let err = rt
            .boot(&BootRequest {
                job_uid: "1",
                workspace: d.path(),
                images: vec![],
                limits: &limits,
                name_prefix: "e",
                coordinator: None,
                endpoints: &[],
            })
            .unwrap_err();
        assert!(err.to_string().contains("EXECUTOR_ALLOW_UNISOLATED"), "{err}");
        assert!(rt.check().is_err());
    }

    #[test]
    fn streams_both_outputs_with_env_and_dir() {
        std::env::set_var("EXECUTOR_FRONTEND_PASSWORD_TEST_LEAK", "leak");
        let (_d, rt, sb) = setup("echo out-$FOO; echo err >&2; pwd; env | grep -c LEAK; exit 7\n");
        let env = vec!["FOO=bar".to_string()];
        let mut sink = Collect(Vec::new());
        let end = rt.run_step(&sb, &spec(&env), &mut sink, &Cancel::new()).unwrap();
        assert_eq!(end, StepEnd::Exited(7));
        let out = sink.text(Stream::Stdout);
        assert!(out.starts_with("out-bar\n"), "{out}");
        assert!(out.contains("/ws/sub\n"), "{out}");
        assert!(out.ends_with("0\n"), "the executor's environment leaked: {out}");
        assert_eq!(sink.text(Stream::Stderr), "err\n");
        rt.teardown(&sb).unwrap();
        rt.teardown(&sb).unwrap();
    }

    #[test]
    fn cancel_kills_the_whole_group_quickly() {
        let d0 = tempfile::tempdir().unwrap();
        let marker = d0.path().join("alive");
        let script = format!("(sleep 3; touch {}) &\nsleep 30\n", marker.display());
        let (_d, rt, sb) = setup(&script);
        let cancel = Cancel::new();
        let c2 = cancel.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            c2.cancel(CancelReason::Canceled);
        });
        let t = Instant::now();
        let mut sink = Collect(Vec::new());
        let end = rt.run_step(&sb, &spec(&[]), &mut sink, &cancel).unwrap();
        assert_eq!(end, StepEnd::Stopped(CancelReason::Canceled));
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        std::thread::sleep(Duration::from_millis(3500));
        assert!(!marker.exists(), "a child of the step survived the cancel");
    }

    #[test]
    fn background_children_die_with_the_step() {
        let d0 = tempfile::tempdir().unwrap();
        let marker = d0.path().join("alive");
        let script = format!("(sleep 2; touch {}) >/dev/null 2>&1 &\necho done\n", marker.display());
        let (_d, rt, sb) = setup(&script);
        let mut sink = Collect(Vec::new());
        assert_eq!(rt.run_step(&sb, &spec(&[]), &mut sink, &Cancel::new()).unwrap(), StepEnd::Exited(0));
        std::thread::sleep(Duration::from_millis(2500));
        assert!(!marker.exists());
    }

    #[test]
    fn janitor_removes_only_dead_shell_sandboxes() {
        let (_d, rt, sb) = setup("true\n");
        let live: HashSet<String> = [sb.name.clone()].into_iter().collect();
        assert!(rt.janitor("executor", &live).unwrap().is_empty());
        assert_eq!(rt.janitor("executor", &HashSet::new()).unwrap(), vec![sb.name.clone()]);
        assert!(!sb.state_dir.exists());
    }
}
