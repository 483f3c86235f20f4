//! Running one step: its bundle (the step's own writable root over its image, the workspace at
//! `/data`), the OCI runtime's `run` (or the start of a container made ahead, ahead.rs), the
//! supervision of its output, cgroup and workspace disk, and the judgement of how it ended and
//! which of the job's limits it hit.

use anyhow::{bail, Context, Result};
use std::fs;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::ahead::{prepared, step_fingerprint};
use super::teardown::{remove_dir_retrying, unmount_roots};
use super::{cgroup, rootfs, shim, spec, OciDetails, OciRuntime, KILL_GRACE, MARKER, RESOLV_CONF};
use crate::base::cancel::Cancel;
use crate::base::proc::PipeEvent;
use crate::sandbox::{OutputSink, SandboxRecord, StepEnd, StepSpec, Stream};

/// RLIMIT_NOFILE of a step.
const MAX_OPEN_FILES: u64 = 1024;
/// A workspace disk with less room than this after a step was filled by it.
const DISK_FULL_BELOW: u64 = 1 << 20;

/// Passes a step's output on and watches it for the kernel's word that a process ran out of
/// file descriptors (EMFILE), which no counter records.
struct FdWatch<'a> {
    inner: &'a mut dyn OutputSink,
    tail: Vec<u8>,
    seen: bool,
}

const EMFILE_TEXT: &[u8] = b"Too many open files";

impl OutputSink for FdWatch<'_> {
    fn output(&mut self, stream: Stream, data: &[u8]) {
        if !self.seen {
            self.tail.extend_from_slice(data);
            self.seen = self.tail.windows(EMFILE_TEXT.len()).any(|w| w == EMFILE_TEXT);
            let keep = EMFILE_TEXT.len() - 1;
            if self.tail.len() > keep {
                self.tail.drain(..self.tail.len() - keep);
            }
        }
        self.inner.output(stream, data);
    }
    fn limit_hit(&mut self, what: &str) {
        self.inner.limit_hit(what);
    }
}

/// What [`OciRuntime::supervise`] saw of one step.
struct StepRun {
    status: Option<std::process::ExitStatus>,
    /// Set when the executor stopped the step.
    stopped: Option<crate::base::cancel::CancelReason>,
    /// Cgroup counters of the step's own child cgroup, as high as they were seen.
    seen: cgroup::Counters,
    /// The least free space seen on the workspace disk (when it has its own).
    least_free: Option<u64>,
}

impl StepRun {
    fn note_disk(&mut self, d: &OciDetails) {
        if d.workspace_disk_bytes > 0 {
            if let Some(free) = crate::workspace::disk::available_bytes(&d.workspace) {
                self.least_free = Some(self.least_free.map_or(free, |l| l.min(free)));
            }
        }
    }
}

/// How a step ended, and which of the job's limits it hit (told to `sink`), from what was seen
/// of it and its cgroup's counters before and after.
fn judge(
    d: &OciDetails,
    run: &StepRun,
    before: &cgroup::Counters,
    after: &cgroup::Counters,
    fds_hit: bool,
    sink: &mut dyn OutputSink,
) -> StepEnd {
    if run.least_free.is_some_and(|f| f < DISK_FULL_BELOW) {
        sink.limit_hit(&format!(
            "workspace disk limit of {} (EXECUTOR_FIRECRACKER_DISK_SPACE): /data and the step's writable \
             root filled it up",
            crate::base::units::format_bytes(d.workspace_disk_bytes)
        ));
    }
    if fds_hit {
        sink.limit_hit(&format!("open file limit of {MAX_OPEN_FILES} per process: Too many open files"));
    }
    if let Some(note) = cpu_note(d.cpus, before, after) {
        sink.limit_hit(&note);
    }
    let pids_hit = run.seen.pids_max > 0
        || after.pids_max > before.pids_max
        || (after.pids_limit > 0
            && before.pids_peak < after.pids_limit
            && after.pids_peak >= after.pids_limit);
    if pids_hit {
        sink.limit_hit(&format!("process limit of {} processes: a fork failed", after.pids_limit));
    }
    if let Some(reason) = run.stopped {
        return StepEnd::Stopped(reason);
    }
    let (code, signal) = match run.status {
        Some(st) => (st.code(), st.signal()),
        None => (None, None),
    };
    let killed = code == Some(128 + libc::SIGKILL) || signal == Some(libc::SIGKILL);
    let oom = run.seen.oom_kills > 0
        || after.oom_kills > before.oom_kills
        || (killed && after.mem_failcnt > before.mem_failcnt)
        // gVisor enforces the limit inside its sandbox and may kill the step before the
        // kernel counts anything: a SIGKILL nobody sent, with the job at its limit.
        || (killed && after.mem_limit > 0 && after.mem_peak >= after.mem_limit / 10 * 9);
    if oom {
        let of = if after.mem_limit > 0 && after.mem_limit < 1 << 60 {
            format!(" of {}", crate::base::units::format_bytes(after.mem_limit))
        } else {
            String::new()
        };
        sink.limit_hit(&format!("memory limit{of} and was killed (out of memory)"));
        return StepEnd::Signaled(libc::SIGKILL);
    }
    match (code, signal) {
        // runc and crun report a step killed by signal N as 128+N.
        (Some(c), _) if c > 128 && c < 128 + 65 && (c - 128) == libc::SIGXFSZ => {
            sink.limit_hit(&format!(
                "file size limit of {} per file",
                crate::base::units::format_bytes(d.max_file_bytes)
            ));
            StepEnd::Signaled(c - 128)
        }
        (Some(c), _) => StepEnd::Exited(c),
        (None, Some(s)) => StepEnd::Signaled(s),
        (None, None) => StepEnd::Exited(-1),
    }
}

impl OciRuntime {
    /// Writes the bundle of one step container (a fresh id under the sandbox's `bundles/`) and
    /// mounts its writable root.
    pub(super) fn write_bundle(
        sandbox: &SandboxRecord,
        d: &OciDetails,
        step: &StepSpec,
    ) -> Result<(String, PathBuf, rootfs::StepRoot)> {
        Self::shift_workspace(&sandbox.state_dir, d)?;
        Self::write_bundle_unshifted(sandbox, d, step)
    }

    /// [`Self::write_bundle`] without giving the workspace to the container's root: for a step
    /// made ahead while the repository is still being cloned into the workspace.
    pub(super) fn write_bundle_unshifted(
        sandbox: &SandboxRecord,
        d: &OciDetails,
        step: &StepSpec,
    ) -> Result<(String, PathBuf, rootfs::StepRoot)> {
        let image = d.images.get(step.image).with_context(|| {
            format!("step {} names image {:?}, which the sandbox did not boot with", step.key, step.image)
        })?;
        let script = safe_rel(step.script, "step script")?;
        let dir = safe_rel(step.dir, "step directory")?;
        let id = format!("{}-{}", sandbox.name, &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let bundle = sandbox.state_dir.join("bundles").join(&id);
        fs::create_dir_all(&bundle).with_context(|| format!("creating bundle {}", bundle.display()))?;
        let lower = image.root.clone().unwrap_or_else(|| image.rootfs.clone());
        let user = crate::image::runas::resolve(&lower, &image.user)
            .with_context(|| format!("step {} in image {:?}", step.key, step.image))?;
        let env = crate::image::runas::environment(&image.env, step.env, spec::DEFAULT_PATH, &user.home);
        let etc = rootfs::EtcFiles::new(
            spec::HOSTNAME,
            d.network.as_ref().map(|n| n.address),
            match &d.network {
                Some(n) => n.resolv_conf(),
                None => "# written by the executor: this job has no network (EXECUTOR_NETWORK=none)\n".into(),
            },
        );
        let root = rootfs::mount_step(&sandbox.name, &d.workspace, &lower, &id, &etc)?;
        let (caches, cache_masks) = super::caches::step_mounts(&d.caches);
        let container = spec::StepContainer {
            rootfs: root.path.clone(),
            readonly_root: false,
            mask: Some(root.mask.clone()),
            uid: user.uid,
            gid: user.gid,
            groups: user.groups,
            id_base: d.uid_base,
            workspace: rootfs::reach_workspace(&sandbox.name),
            // The contract's working directory (`-w /data/<dir>`) wins over the image's.
            cwd: if dir.is_empty() { "/data".into() } else { format!("/data/{dir}") },
            args: vec!["/bin/sh".into(), format!("/data/{script}")],
            env,
            cgroups_path: cgroup::JobCgroup::new(&sandbox.name).child_path(&id),
            tmp_bytes: d.tmp_bytes,
            max_file_bytes: d.max_file_bytes,
            max_open_files: MAX_OPEN_FILES,
            caches,
            cache_masks,
        };
        let network = d.network.as_ref().map(|n| spec::StepNetwork {
            netns: n.netns_path(),
            // A bind mount needs a file as its target: the root has one unless the image's /etc
            // is no directory (see rootfs::EtcFiles).
            resolv_conf: (root.etc
                || fs::symlink_metadata(lower.join("etc/resolv.conf")).is_ok_and(|m| m.is_file()))
            .then(|| rootfs::reach_dir(&sandbox.name).join(RESOLV_CONF)),
        });
        let config = spec::bundle_config(&container, network.as_ref());
        if let Err(e) = fs::write(bundle.join("config.json"), serde_json::to_vec_pretty(&config)?) {
            let _ = rootfs::unmount_step(&root);
            return Err(e).with_context(|| format!("writing {}", bundle.join("config.json").display()));
        }
        Ok((id, bundle, root))
    }

    /// Streams the step's output until the runtime exits, watching its cgroup, the workspace
    /// disk and `cancel` (which stops the step and all it started).
    #[allow(clippy::too_many_arguments)]
    fn supervise(
        &self,
        sandbox: &SandboxRecord,
        d: &OciDetails,
        id: &str,
        cg: &cgroup::JobCgroup,
        child: &mut std::process::Child,
        sink: &mut FdWatch,
        cancel: &Cancel,
    ) -> Result<StepRun> {
        let mut pipes = crate::base::proc::Pipes::spawn(child);
        let mut run =
            StepRun { status: None, stopped: None, seen: cgroup::Counters::default(), least_free: None };
        run.note_disk(d);
        let mut open = true;
        let status = loop {
            let now = cg.child_counters(id);
            run.seen.oom_kills = run.seen.oom_kills.max(now.oom_kills);
            run.seen.pids_max = run.seen.pids_max.max(now.pids_max);
            run.note_disk(d);
            if run.stopped.is_none() {
                if let Some(reason) = cancel.check() {
                    run.stopped = Some(reason);
                    self.stop_step(&d.oci_runtime, &sandbox.state_dir, id, cg, child);
                }
            }
            if open {
                match pipes.next(Duration::from_millis(50)) {
                    PipeEvent::Data(s, data) => sink.output(s, &data),
                    PipeEvent::Idle => {}
                    PipeEvent::Closed => open = false,
                }
                continue;
            }
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) => {
                    // The runtime exits a few ms after the step's pipes close (it removes the
                    // container first): a short poll, not to add its period to every step.
                    let _ = cancel.wait(Duration::from_millis(2));
                }
                Err(e) => {
                    pipes.join();
                    return Err(e).context("waiting for the OCI runtime");
                }
            }
        };
        pipes.join();
        run.status = Some(status);
        Ok(run)
    }

    /// Removes what the step's container left in the sandbox (its runtime state, its bundle).
    fn remove_step(&self, sandbox: &SandboxRecord, which: &str, id: &str, bundle: &Path) {
        // A teardown or janitor may have removed the sandbox meanwhile; the runtime would
        // recreate its state directory, so only a sandbox that still exists is cleaned here.
        if sandbox.state_dir.join(MARKER).exists() {
            // `run` deletes its container when it exits normally; another runtime process (about
            // 10 ms) is only needed when it left state behind (it was killed, or failed).
            let left = fs::read_dir(sandbox.state_dir.join("runtime"))
                .map(|rd| rd.flatten().any(|e| e.file_name().to_string_lossy().contains(id)))
                .unwrap_or(false);
            if left {
                let mut del = self.runtime_cmd(which, &sandbox.state_dir);
                del.args(["delete", "--force", id]);
                let _ = self.quiet(del);
            }
            let _ = fs::remove_dir_all(bundle);
        } else {
            // Torn down while the step ran: whatever the dying runtime wrote after the teardown
            // (its state, the bundle) is ours to remove. The teardown may be removing the same
            // tree at this moment, so a removal that races it is tried again.
            let _ = rootfs::remove_reach(&sandbox.name);
            unmount_roots(&sandbox.state_dir);
            let _ = remove_dir_retrying(&sandbox.state_dir);
        }
    }

    pub(super) fn step_argv(&self, sandbox: &SandboxRecord, step: &StepSpec) -> Vec<String> {
        let which =
            Self::details(sandbox).map(|d| d.oci_runtime).unwrap_or_else(|_| self.oci_runtime.clone());
        // A container made ahead is only started.
        let fingerprint = step_fingerprint(step);
        let ahead = prepared().iter_mut().any(|p| {
            p.sandbox == sandbox.name && p.step == fingerprint && matches!(p.shim.try_wait(), Ok(None))
        });
        let verb = if ahead { "start" } else { "run" };
        vec![which, verb.into(), step.image.to_string(), "/bin/sh".into(), format!("/data/{}", step.script)]
    }

    pub(super) fn run_one_step(
        &self,
        sandbox: &SandboxRecord,
        step: &StepSpec,
        sink: &mut dyn OutputSink,
        cancel: &Cancel,
    ) -> Result<StepEnd> {
        let d = Self::details(sandbox)?;
        let which = d.oci_runtime.as_str();
        let cg = cgroup::JobCgroup::new(&sandbox.name);
        let fingerprint = step_fingerprint(step);
        let mut ahead = {
            let mut all = prepared();
            let at = all.iter().position(|p| p.sandbox == sandbox.name && p.step == fingerprint);
            at.map(|i| all.remove(i))
        };
        // A shim that is gone lost its container (killed with the job's cgroup after an earlier
        // step, or never created): the step runs as usual.
        if let Some(p) = ahead.take_if(|p| !matches!(p.shim.try_wait(), Ok(None))) {
            let mut del = self.runtime_cmd(which, &sandbox.state_dir);
            del.args(["delete", "--force", &p.id]);
            p.discard();
            let _ = self.quiet(del);
        }
        let (id, bundle, root, before, mut child) = match ahead {
            Some(mut p) => {
                if let Err(e) = Self::shift_workspace(&sandbox.state_dir, &d) {
                    p.discard();
                    return Err(e);
                }
                let before = cg.counters();
                // A shim that is gone (its create failed) has said why on the step's output.
                if let Some(mut input) = p.shim.stdin.take() {
                    use std::io::Write;
                    let _ = input.write_all(&[shim::GO]);
                }
                (p.id, p.bundle, p.root, before, p.shim)
            }
            None => {
                let (id, bundle, root) = Self::write_bundle(sandbox, &d, step)?;
                let before = cg.counters();
                let mut cmd = self.runtime_cmd_net(which, &sandbox.state_dir, d.network.is_some());
                cmd.arg("run").arg("--bundle").arg(&bundle).arg(&id);
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).env_clear().env("PATH", spec::DEFAULT_PATH);
                cmd.process_group(0);
                let child = match cmd.spawn() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = rootfs::unmount_step(&root);
                        return Err(e).with_context(|| format!("starting {which} for step {}", step.key));
                    }
                };
                (id, bundle, root, before, child)
            }
        };
        let mut watch = FdWatch { inner: sink, tail: Vec::new(), seen: false };
        let run = self.supervise(sandbox, &d, &id, &cg, &mut child, &mut watch, cancel);
        // Whatever the step left behind (a daemon that escaped its session) dies with it.
        cg.kill_all(50);
        self.remove_step(sandbox, which, &id, &bundle);
        let after = cg.counters();
        let mut run = run?;
        // The disk is judged before the step's layer goes: what it wrote there counts.
        run.note_disk(&d);
        let end = judge(&d, &run, &before, &after, watch.seen, watch.inner);
        let failed = matches!(end, StepEnd::Exited(c) if c != 0) || matches!(end, StepEnd::Signaled(_));
        if failed && self.opts.keep_failed {
            // Kept for `executor debug` until the sandbox goes (kept.rs).
            if let Err(e) = rootfs::keep_step(root, &d.workspace) {
                tracing::warn!("step {}: its layer is not kept for debugging: {e:#}", step.key);
            }
        } else {
            rootfs::unmount_step_later(root);
        }
        Ok(end)
    }

    /// Stops a running step: the runtime's kill, then SIGKILL to every process in the job's
    /// cgroup, then the runtime process itself if it has not exited within the grace period.
    fn stop_step(
        &self,
        which: &str,
        state_dir: &Path,
        id: &str,
        cg: &cgroup::JobCgroup,
        child: &mut std::process::Child,
    ) {
        let mut kill = self.runtime_cmd(which, state_dir);
        kill.args(["kill", "--all", id, "KILL"]);
        let _ = self.quiet(kill);
        let start = Instant::now();
        while start.elapsed() < KILL_GRACE {
            cg.kill_all(1);
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The CPU limit's note for a step whose quota throttled it in at least a tenth of its CFS
/// periods (the quota held it back, not luck). A step on a host too busy to give it its quota
/// is never throttled, and gets no note.
fn cpu_note(cpus: u32, before: &cgroup::Counters, after: &cgroup::Counters) -> Option<String> {
    let throttled = after.cpu_throttled.saturating_sub(before.cpu_throttled);
    let periods = after.cpu_periods.saturating_sub(before.cpu_periods);
    (cpus > 0 && throttled > 0 && throttled * 10 >= periods).then(|| {
        format!(
            "CPU limit of {cpus} CPU{}: throttled in {throttled} of {periods} scheduling periods",
            if cpus == 1 { "" } else { "s" }
        )
    })
}

fn safe_rel(rel: &str, what: &str) -> Result<String> {
    let p = Path::new(rel);
    if p.components().any(|c| !matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir)) {
        bail!("{what} {rel:?} is not a relative path inside the workspace");
    }
    Ok(rel.trim_start_matches("./").trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_note_only_when_the_quota_held_the_step_back() {
        let at = |periods, throttled| cgroup::Counters {
            cpu_periods: periods,
            cpu_throttled: throttled,
            ..Default::default()
        };
        assert_eq!(
            cpu_note(1, &at(10, 2), &at(40, 29)).as_deref(),
            Some("CPU limit of 1 CPU: throttled in 27 of 30 scheduling periods")
        );
        assert_eq!(
            cpu_note(2, &at(0, 0), &at(10, 1)).as_deref(),
            Some("CPU limit of 2 CPUs: throttled in 1 of 10 scheduling periods")
        );
        assert_eq!(cpu_note(1, &at(0, 0), &at(30, 2)), None, "throttled now and then is luck");
        assert_eq!(cpu_note(1, &at(0, 0), &at(30, 0)), None);
        assert_eq!(cpu_note(0, &at(0, 0), &at(30, 30)), None, "no CPU limit");
    }
}
