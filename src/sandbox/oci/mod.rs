//! The `oci` runtime: one fresh container per step, made by an OCI runtime from the distribution
//! (`runc` by default, `crun`, or gVisor's `runsc`), with the step's image under a writable
//! layer of the step's own as its root (rootfs.rs) and the workspace at `/data`. The sandbox of a job is its state directory (the runtime's
//! container state, the bundles), its cgroup (the job's limits) and a use record in the image
//! store; `teardown` and `janitor` remove all three.

pub mod cgroup;
mod record;
pub mod rootfs;
pub mod shim;
pub mod spec;
pub mod uids;

use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::base::cancel::Cancel;
use crate::base::proc::PipeEvent;
use crate::image::{ImageStore, ID_BASE, ID_COUNT};
use crate::sandbox::{
    BootRequest, Limits, OutputSink, RecordDetails, Runtime, RuntimeKind, RuntimeOptions, SandboxRecord,
    StepEnd, StepSpec, Stream,
};
pub use record::{OciDetails, OciImage};

/// The OCI runtimes this backend can drive.
pub const OCI_RUNTIMES: &[&str] = &["runc", "crun", "runsc"];
/// The OCI runtime used when none is configured.
pub const DEFAULT_OCI_RUNTIME: &str = "runc";
/// Marks a sandbox state directory as this runtime's.
const MARKER: &str = "oci-sandbox.json";
/// The resolv.conf a networked sandbox's steps see at /etc/resolv.conf.
const RESOLV_CONF: &str = "resolv.conf";
/// Present while the workspace is owned by the container's root; holds its mode before.
const SHIFTED: &str = "workspace-shifted";
/// Present while only the workspace's top directory is open to the container's root (a step
/// made ahead, the clone still filling the workspace); holds its mode before.
const OPENED: &str = "workspace-opened";
/// How long a kill may take before the step is reported as not stopped.
const KILL_GRACE: Duration = Duration::from_secs(2);
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

/// `EXECUTOR_OCI_RUNTIME`, or the default.
pub fn oci_runtime_from_env() -> String {
    std::env::var("EXECUTOR_OCI_RUNTIME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_OCI_RUNTIME.into())
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

/// A step's container made ahead ([`Runtime::prepare_step`]): created by a shim (shim.rs) that
/// waits for the byte that starts it.
struct Prepared {
    sandbox: String,
    /// What the bundle was written for: the step's key, image, script, directory and variables.
    step: String,
    id: String,
    bundle: PathBuf,
    root: rootfs::StepRoot,
    shim: std::process::Child,
}

/// The containers made ahead in this process, until their step takes them or their sandbox goes.
static PREPARED: std::sync::Mutex<Vec<Prepared>> = std::sync::Mutex::new(Vec::new());

fn prepared() -> std::sync::MutexGuard<'static, Vec<Prepared>> {
    PREPARED.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a prepared container must match to run `step` (hashed: the variables may hold secrets).
fn step_fingerprint(step: &StepSpec) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(format!("{:?}", (step.key, step.image, step.script, step.dir, step.env))))
}

/// Drops the containers made ahead for `sandbox`: each shim, its input closed, deletes its
/// unstarted container and exits; one that does not within the grace period is killed. Their
/// roots and bundles go with the sandbox's.
fn drop_prepared(sandbox: &str) {
    let mine: Vec<Prepared> = {
        let mut all = prepared();
        let (mine, rest) = std::mem::take(&mut *all).into_iter().partition(|p| p.sandbox == sandbox);
        *all = rest;
        mine
    };
    for p in mine {
        p.discard();
    }
}

impl Prepared {
    /// Closes the shim's input (it deletes its unstarted container and exits), kills it if it
    /// has not exited within the grace period, and removes the step's root and bundle.
    fn discard(mut self) {
        drop(self.shim.stdin.take());
        let start = Instant::now();
        while !matches!(self.shim.try_wait(), Ok(Some(_))) {
            if start.elapsed() > KILL_GRACE {
                let _ = self.shim.kill();
                let _ = self.shim.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = rootfs::unmount_step(&self.root);
        let _ = fs::remove_dir_all(&self.bundle);
    }
}

/// The `oci` runtime.
#[derive(Debug, Clone)]
pub struct OciRuntime {
    opts: RuntimeOptions,
    oci_runtime: String,
}

impl OciRuntime {
    /// A runtime driving `opts.oci_runtime` (`runc`, `crun` or `runsc`; empty means `runc`).
    pub fn new(opts: RuntimeOptions) -> Result<OciRuntime> {
        let oci_runtime =
            if opts.oci_runtime.is_empty() { DEFAULT_OCI_RUNTIME } else { opts.oci_runtime.as_str() };
        if !OCI_RUNTIMES.contains(&oci_runtime) {
            bail!("unknown OCI runtime {oci_runtime:?} (want one of {})", OCI_RUNTIMES.join(", "));
        }
        let oci_runtime = oci_runtime.to_string();
        Ok(OciRuntime { opts, oci_runtime })
    }

    fn store(&self) -> Result<ImageStore> {
        ImageStore::open(&self.opts.images_dir())
    }

    /// Writes the bundle of one step container (a fresh id under the sandbox's `bundles/`) and
    /// mounts its writable root.
    fn write_bundle(
        sandbox: &SandboxRecord,
        d: &OciDetails,
        step: &StepSpec,
    ) -> Result<(String, PathBuf, rootfs::StepRoot)> {
        Self::shift_workspace(&sandbox.state_dir, d)?;
        Self::write_bundle_unshifted(sandbox, d, step)
    }

    /// [`Self::write_bundle`] without giving the workspace to the container's root: for a step
    /// made ahead while the repository is still being cloned into the workspace.
    fn write_bundle_unshifted(
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
        let root = rootfs::mount_step(&sandbox.name, &d.workspace, &lower, &id)?;
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
        };
        let network = d.network.as_ref().map(|n| spec::StepNetwork {
            netns: n.netns_path(),
            // A bind mount needs a file as its target; an image whose /etc/resolv.conf is not
            // one resolves no names (docs/network.md).
            resolv_conf: fs::symlink_metadata(lower.join("etc/resolv.conf"))
                .is_ok_and(|m| m.is_file())
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

    fn details(sandbox: &SandboxRecord) -> Result<OciDetails> {
        match OciDetails::of(sandbox)? {
            Some(d) => Ok(d),
            None => bail!("sandbox {} has no oci details", sandbox.name),
        }
    }

    /// The OCI runtime command with its global flags (state root, platform).
    fn runtime_cmd(&self, which: &str, state_dir: &Path) -> Command {
        self.runtime_cmd_net(which, state_dir, false)
    }

    /// [`Self::runtime_cmd`] for a step of a sandbox with a job network when `networked`.
    fn runtime_cmd_net(&self, which: &str, state_dir: &Path, networked: bool) -> Command {
        let mut cmd = crate::base::proc::command(which);
        cmd.arg("--root").arg(state_dir.join("runtime"));
        match which {
            "runsc" if networked => {
                // gVisor's own network stack on the job's veth, in the namespace the spec
                // names. Debian's runsc (2022-12) takes every namespace of a newer kernel for
                // the host's (its check is whether /proc/sys/net/core/rmem_default exists) and
                // refuses: it runs where /proc/sys/net is hidden (docs/network.md).
                cmd.args(["--platform=ptrace", "--network=sandbox", "--oci-seccomp"]);
                cmd.arg("--debug-log").arg(state_dir.join("runsc-logs/"));
                crate::base::sys::hide_net_sysctls(&mut cmd);
            }
            "runsc" => {
                cmd.args(["--platform=ptrace", "--network=none", "--oci-seccomp"]);
                cmd.arg("--debug-log").arg(state_dir.join("runsc-logs/"));
            }
            "crun"
                if cgroup::layout() == cgroup::Layout::V1 && Path::new("/sys/fs/cgroup/unified").exists() =>
            {
                crate::base::sys::hide_unified_cgroup(&mut cmd);
            }
            _ => {}
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    /// The shim (shim.rs) that makes the container `id` of `bundle` ahead with `which` (runc or
    /// crun: runsc's networked start needs a mount namespace of its own per command), its
    /// standard input, output and error piped, in a process group of its own.
    fn shim_cmd(&self, which: &str, state_dir: &Path, bundle: &Path, id: &str) -> Command {
        // The running binary itself, even after an upgrade replaced its file.
        let exe = Path::new("/proc/self/exe");
        let runtime = [which.into(), "--root".into(), state_dir.join("runtime").into_os_string()];
        let mut cmd = shim::command(exe, bundle, id, &runtime);
        // The shim's mount namespace is its runtime commands'.
        if which == "crun"
            && cgroup::layout() == cgroup::Layout::V1
            && Path::new("/sys/fs/cgroup/unified").exists()
        {
            crate::base::sys::hide_unified_cgroup(&mut cmd);
        }
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.env("PATH", spec::DEFAULT_PATH);
        cmd.process_group(0);
        cmd
    }

    fn quiet(&self, mut cmd: Command) -> Result<std::process::Output> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.output().context("running the OCI runtime")
    }

    /// Deletes every container of the sandbox (they are its steps) by their state directories.
    fn delete_containers(&self, which: &str, state_dir: &Path) {
        let mut ids = Vec::new();
        if let Ok(out) = self.quiet({
            let mut c = self.runtime_cmd(which, state_dir);
            c.args(["list", "-q"]);
            c
        }) {
            ids.extend(String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim().to_string()));
        }
        for id in ids.into_iter().filter(|i| !i.is_empty()) {
            let mut c = self.runtime_cmd(which, state_dir);
            c.args(["delete", "--force", &id]);
            let _ = self.quiet(c);
        }
    }

    /// Gives the sandbox a host uid range of its own (uids.rs) and an idmapped read-only mount
    /// of each image in it, where the image's files (stored owned by `ID_BASE + n`) belong to
    /// that range. On failure nothing of it is left and the sandbox keeps the shared range.
    fn map_ids(&self, name: &str, state_dir: &Path, d: &mut OciDetails) -> Result<()> {
        let ranges = uids::UidRanges::new(&self.opts.state_dir);
        let slot = ranges.allocate(name)?;
        let base = uids::base(slot);
        let res = (|| -> Result<BTreeMap<String, OciImage>> {
            let userns = crate::base::sys::userns_fd(ID_BASE, base, ID_COUNT)
                .context("making a user namespace for the idmapped image mounts")?;
            let mut images = d.images.clone();
            for img in images.values_mut() {
                let hex: String = img.digest.chars().filter(|c| c.is_ascii_hexdigit()).take(64).collect();
                let root = state_dir.join("roots").join(hex);
                if !root.exists() {
                    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
                    crate::base::sys::idmapped_bind(&img.rootfs, &root, &userns).with_context(|| {
                        format!("idmapped mount of {} on {}", img.rootfs.display(), root.display())
                    })?;
                }
                img.root = Some(root);
            }
            Ok(images)
        })();
        match res {
            Ok(images) => {
                d.images = images;
                d.uid_base = base;
                Ok(())
            }
            Err(e) => {
                unmount_roots(state_dir);
                ranges.release(name)?;
                Err(e)
            }
        }
    }

    /// Gives the workspace to the container's root (the sandbox's uid base) if it is not already.
    fn shift_workspace(state_dir: &Path, d: &OciDetails) -> Result<()> {
        let marker = state_dir.join(SHIFTED);
        if marker.exists() {
            return Ok(());
        }
        let opened = state_dir.join(OPENED);
        let mode = match fs::read_to_string(&opened) {
            Ok(m) => m.trim().to_string(),
            Err(_) => format!("{:o}", Self::workspace_mode(d)?),
        };
        chown_tree(&d.workspace, |_, _| (d.uid_base, d.uid_base))?;
        Self::open_to_others(d)?;
        fs::write(&marker, mode).with_context(|| format!("writing {}", marker.display()))?;
        match fs::remove_file(&opened) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", opened.display()))
            }
            _ => Ok(()),
        }
    }

    /// Lets the container's root into the workspace's top directory (search permission for
    /// others, as [`Self::shift_workspace`] gives), which a container made ahead enters as its
    /// working directory while the clone still fills the workspace. The owner stays root's: git
    /// refuses a repository whose top directory another user owns, and the shift before the
    /// step starts gives the container's root the whole tree.
    fn open_workspace_top(state_dir: &Path, d: &OciDetails) -> Result<()> {
        let opened = state_dir.join(OPENED);
        if state_dir.join(SHIFTED).exists() || opened.exists() {
            return Ok(());
        }
        let mode = Self::workspace_mode(d)?;
        fs::write(&opened, format!("{mode:o}")).with_context(|| format!("writing {}", opened.display()))?;
        Self::open_to_others(d)
    }

    fn workspace_mode(d: &OciDetails) -> Result<u32> {
        Ok(fs::metadata(&d.workspace)
            .with_context(|| format!("inspecting workspace {}", d.workspace.display()))?
            .mode()
            & 0o7777)
    }

    /// /data is searchable by the image's other users, as a Docker bind mount of a 0755
    /// directory is, where a directory above it (the state directory) is closed to every host
    /// user but root.
    fn open_to_others(d: &OciDetails) -> Result<()> {
        if closed_to_others(&d.workspace) {
            let mode = Self::workspace_mode(d)?;
            fs::set_permissions(&d.workspace, fs::Permissions::from_mode(mode | 0o755))
                .with_context(|| format!("setting the mode of workspace {}", d.workspace.display()))?;
        }
        Ok(())
    }
}

/// Changes the owner of every entry below `root` (and `root`) without following symlinks or
/// leaving the filesystem: every path is resolved beneath `root` with no symlink on the way, so a
/// directory swapped for a symlink while the walk runs stops the walk there instead of sending it
/// out of the workspace.
fn chown_tree(root: &Path, owner: impl Fn(u32, u32) -> (u32, u32)) -> Result<()> {
    let tree = crate::base::fs::Beneath::open(root)
        .with_context(|| format!("opening workspace {}", root.display()))?;
    let top =
        tree.lstat(Path::new("")).with_context(|| format!("inspecting workspace {}", root.display()))?;
    let chown = |rel: &Path, md: &crate::base::fs::Meta| -> Result<()> {
        let (u, g) = owner(md.uid, md.gid);
        if (u, g) != (md.uid, md.gid) {
            tree.chown(rel, u, g)
                .with_context(|| format!("changing the owner of {} in the workspace", rel.display()))?;
        }
        Ok(())
    };
    chown(Path::new(""), &top)?;
    let mut stack = vec![PathBuf::new()];
    while let Some(dir) = stack.pop() {
        let entries = match tree.list(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("listing {} in the workspace", dir.display())),
        };
        for (name, md) in entries {
            if md.dev != top.dev {
                continue;
            }
            let rel = dir.join(name);
            chown(&rel, &md)?;
            if md.is_dir() {
                stack.push(rel);
            }
        }
    }
    Ok(())
}

/// Whether a directory above `path` is root's and closed to other users (no o+x).
fn closed_to_others(path: &Path) -> bool {
    path.ancestors()
        .skip(1)
        .any(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_dir() && m.uid() == 0 && m.mode() & 0o001 == 0))
}

fn safe_rel(rel: &str, what: &str) -> Result<String> {
    let p = Path::new(rel);
    if p.components().any(|c| !matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir)) {
        bail!("{what} {rel:?} is not a relative path inside the workspace");
    }
    Ok(rel.trim_start_matches("./").trim_end_matches('/').to_string())
}

impl Runtime for OciRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Oci
    }

    fn check(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        // Every OCI runtime this host has, so an operator sees which `--oci-runtime` would work.
        for which in OCI_RUNTIMES {
            let version = which::which(which).ok().and_then(|bin| {
                let v =
                    crate::base::proc::command(&bin).arg("--version").stdin(Stdio::null()).output().ok()?;
                let line = String::from_utf8_lossy(&v.stdout).lines().next().unwrap_or("").to_string();
                Some(format!("{} ({line})", bin.display()))
            });
            let chosen = if *which == self.oci_runtime { ", selected" } else { "" };
            match version {
                Some(v) => out.push(format!("oci runtime {which}: {v}{chosen}")),
                None if chosen.is_empty() => out.push(format!("oci runtime {which}: not installed")),
                None => bail!("the selected OCI runtime {which} is not installed"),
            }
        }
        if !nix::unistd::geteuid().is_root() {
            bail!("the oci runtime needs root (it maps container root to host uids from {ID_BASE})");
        }
        out.push(format!("cgroup layout: {:?}", cgroup::layout()));
        let store = self.store()?;
        out.push(format!("image store {}: {} images", store.dir().display(), store.list()?.len()));
        Ok(out)
    }

    fn boot(&self, req: &BootRequest) -> Result<SandboxRecord> {
        let which = self.oci_runtime.as_str();
        which::which(which).with_context(|| format!("the OCI runtime {which} is not installed"))?;
        crate::sandbox::private_state_dir(&self.opts.state_dir)?;
        let store = self.store()?;
        // Every image first: an unknown image fails the job before anything is created.
        let mut images = BTreeMap::new();
        for r in &req.images {
            let img = store.resolve(r)?;
            images.insert(
                r.clone(),
                OciImage {
                    digest: img.digest,
                    rootfs: img.rootfs,
                    root: None,
                    env: img.env,
                    user: img.user,
                    workdir: img.workdir,
                },
            );
        }
        let name = format!("{}-{}", req.name_prefix, uuid::Uuid::new_v4().simple());
        let state_dir = self.opts.sandboxes_dir().join(&name);
        fs::create_dir_all(state_dir.join("runtime"))
            .with_context(|| format!("creating sandbox directory {}", state_dir.display()))?;
        let ws_md = fs::metadata(req.workspace)
            .with_context(|| format!("inspecting workspace {}", req.workspace.display()))?;
        let cg = cgroup::JobCgroup::new(&name);
        let limits = req.limits;
        let details = OciDetails {
            oci_runtime: which.to_string(),
            workspace: req.workspace.to_path_buf(),
            workspace_uid: ws_md.uid(),
            workspace_gid: ws_md.gid(),
            images: images.clone(),
            cgroup: cg.rel.clone(),
            tmp_bytes: if limits.disk_bytes > 0 { limits.disk_bytes.min(1 << 30) } else { 256 << 20 },
            max_file_bytes: limits.disk_bytes,
            workspace_disk_bytes: if crate::workspace::disk::is_mounted(req.workspace) {
                limits.disk_bytes
            } else {
                0
            },
            cpus: limits.cpus,
            uid_base: ID_BASE,
            network: None,
        };
        let mut record = SandboxRecord::new(RuntimeKind::Oci, name.clone(), state_dir.clone());
        details.store(&mut record);
        // The marker goes first, so that a crash from here on leaves something the janitor finds.
        crate::base::fs::write_atomic(&state_dir.join(MARKER), &serde_json::to_vec_pretty(&record)?)?;
        let mut details = details;
        let setup = (|| -> Result<()> {
            let digests: Vec<String> = images.values().map(|i| i.digest.clone()).collect();
            store.add_user(&name, &digests)?;
            cg.create(&Limits { pids: if limits.pids > 0 { limits.pids } else { 4096 }, ..limits.clone() })?;
            if let Err(e) = self.map_ids(&name, &state_dir, &mut details) {
                eprintln!(
                    "executor: sandbox {name} gets no uid range of its own ({e:#}): its container root is \
                     host uid {ID_BASE}, shared with every other job in the same case"
                );
            }
            details.store(&mut record);
            crate::base::fs::write_atomic(&state_dir.join(MARKER), &serde_json::to_vec_pretty(&record)?)?;
            rootfs::make_reach(&name, req.workspace, details.uid_base)?;
            // The network last, recorded at once: a failure here fails the job before any
            // step runs (fail closed), and what was made is in the record for the teardown.
            if self.opts.network.mode == crate::network::Mode::Internet {
                let net =
                    crate::network::setup(&self.opts.state_dir, &name, &self.opts.network, req.coordinator)
                        .context("setting up the job's network (EXECUTOR_NETWORK=internet)")?;
                let resolv = rootfs::reach_dir(&name).join(RESOLV_CONF);
                fs::write(&resolv, net.resolv_conf())
                    .with_context(|| format!("writing {}", resolv.display()))?;
                details.network = Some(net);
                details.store(&mut record);
                crate::base::fs::write_atomic(&state_dir.join(MARKER), &serde_json::to_vec_pretty(&record)?)?;
            }
            // The workspace goes to the container's root with the first step (write_bundle), not
            // here: the loop boots this sandbox while the repository is still being cloned.
            Ok(())
        })();
        if let Err(e) = setup {
            let _ = self.teardown(&record);
            return Err(e.context(format!("booting oci sandbox for job {}", req.job_uid)));
        }
        Ok(record)
    }

    fn step_command(&self, sandbox: &SandboxRecord, step: &StepSpec) -> Vec<String> {
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

    fn prepare_step(&self, sandbox: &SandboxRecord, step: &StepSpec) -> Result<bool> {
        let d = Self::details(sandbox)?;
        let which = d.oci_runtime.as_str();
        if which == "runsc" {
            return Ok(false);
        }
        Self::open_workspace_top(&sandbox.state_dir, &d)?;
        let (id, bundle, root) = Self::write_bundle_unshifted(sandbox, &d, step)?;
        let shim = self
            .shim_cmd(which, &sandbox.state_dir, &bundle, &id)
            .spawn()
            .with_context(|| format!("starting the shim of step {}", step.key));
        match shim {
            Ok(shim) => {
                prepared().push(Prepared {
                    sandbox: sandbox.name.clone(),
                    step: step_fingerprint(step),
                    id,
                    bundle,
                    root,
                    shim,
                });
                Ok(true)
            }
            Err(e) => {
                let _ = rootfs::unmount_step(&root);
                let _ = fs::remove_dir_all(&bundle);
                Err(e)
            }
        }
    }

    fn run_step(
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
        rootfs::unmount_step_later(root);
        Ok(judge(&d, &run, &before, &after, watch.seen, watch.inner))
    }

    fn sync_workspace(&self, sandbox: &SandboxRecord, workspace: &Path) -> Result<()> {
        let d = Self::details(sandbox)?;
        // Shifted by a step, or only opened for one made ahead that never ran.
        let Some(marker) = [SHIFTED, OPENED].iter().map(|m| sandbox.state_dir.join(m)).find(|m| m.exists())
        else {
            return Ok(());
        };
        if !workspace.exists() {
            return Ok(());
        }
        // Every process of the job is gone, so nothing can swap a path while the owner changes.
        cgroup::JobCgroup::new(&sandbox.name).kill_all(50);
        rootfs::remove_step_roots(&sandbox.name, workspace);
        chown_tree(workspace, |_, _| (d.workspace_uid, d.workspace_gid))?;
        let mode = fs::read_to_string(&marker).ok().and_then(|m| u32::from_str_radix(m.trim(), 8).ok());
        if let Some(mode) = mode {
            let tree = crate::base::fs::Beneath::open(workspace)?;
            tree.chmod(Path::new(""), mode)
                .with_context(|| format!("restoring the mode of workspace {}", workspace.display()))?;
        }
        fs::remove_file(&marker).with_context(|| format!("removing {}", marker.display()))
    }

    fn teardown(&self, sandbox: &SandboxRecord) -> Result<()> {
        drop_prepared(&sandbox.name);
        let d = Self::details(sandbox).ok();
        let which = d.as_ref().map(|d| d.oci_runtime.clone()).unwrap_or_else(|| self.oci_runtime.clone());
        let cg = cgroup::JobCgroup::new(&sandbox.name);
        cg.kill_all(100);
        if sandbox.state_dir.exists() {
            self.delete_containers(&which, &sandbox.state_dir);
        }
        cg.remove()?;
        // The steps' roots and the workspace's bind go before the workspace is given back.
        rootfs::remove_reach(&sandbox.name)?;
        if let Some(d) = &d {
            if d.workspace.exists() {
                rootfs::remove_step_roots(&sandbox.name, &d.workspace);
                self.sync_workspace(sandbox, &d.workspace)?;
            }
        }
        self.store()?.remove_user(&sandbox.name)?;
        // The image mounts go before anything below them is removed; then the uid range is free.
        unmount_roots(&sandbox.state_dir);
        let roots = sandbox.state_dir.join("roots");
        if !mounts_below(&roots).is_empty() {
            bail!("an image is still mounted in {}", roots.display());
        }
        uids::UidRanges::new(&self.opts.state_dir).release(&sandbox.name)?;
        if let Some(net) = d.as_ref().and_then(|d| d.network.as_ref()) {
            crate::network::teardown(&self.opts.state_dir, net)?;
        }
        // The marker goes first: a step still finishing in another process sees the sandbox gone.
        let _ = fs::remove_file(sandbox.state_dir.join(MARKER));
        remove_dir_retrying(&sandbox.state_dir)
            .with_context(|| format!("removing sandbox directory {}", sandbox.state_dir.display()))
    }

    fn janitor(&self, prefix: &str, live: &HashSet<String>) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let dir = self.opts.sandboxes_dir();
        let owned = |n: &str| n.starts_with(&format!("{prefix}-")) && !live.contains(n);
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let marker = e.path().join(MARKER);
                if !owned(&name) || !marker.exists() {
                    continue;
                }
                let record: SandboxRecord =
                    match fs::read(&marker).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
                        Some(r) => r,
                        None => SandboxRecord::new(RuntimeKind::Oci, name.clone(), e.path()),
                    };
                self.teardown(&record).with_context(|| format!("removing stale sandbox {name}"))?;
                removed.push(name);
            }
        }
        // Cgroups of sandboxes of this state directory that lost their marker (a crash between
        // the steps of boot or teardown). The cgroup hierarchy is host-wide: a cgroup with no
        // directory here belongs to another executor (or another state directory) and is left
        // alone, whatever its name.
        let stale: Vec<String> = cgroup::existing_jobs()
            .into_iter()
            .filter(|n| owned(n) && !removed.contains(n) && dir.join(n).exists())
            .collect();
        for name in stale {
            let cg = cgroup::JobCgroup::new(&name);
            cg.kill_all(100);
            cg.remove()?;
            removed.push(name);
        }
        // uid ranges of sandboxes of this state directory that are gone.
        let freed =
            uids::UidRanges::new(&self.opts.state_dir).reclaim(|n| owned(n) && !dir.join(n).exists())?;
        for name in freed {
            if !removed.contains(&name) {
                removed.push(name);
            }
        }
        // Networks whose sandbox record is gone or never named them (killed during setup).
        for name in crate::network::janitor(&self.opts.state_dir, owned)? {
            if !removed.contains(&name) {
                removed.push(name);
            }
        }
        let store = self.store()?;
        for name in store.users()?.into_iter().filter(|n| owned(n)) {
            store.remove_user(&name)?;
            if !removed.contains(&name) {
                removed.push(name);
            }
        }
        Ok(removed)
    }
}

impl OciRuntime {
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

/// Unmounts every image mount (`roots/*`) of a sandbox, lazily: a dying runtime may still hold
/// one, and the mount then goes with it.
fn unmount_roots(state_dir: &Path) {
    for p in mounts_below(&state_dir.join("roots")) {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Mount points at or below `dir` in this mount namespace (a bind mount has the device of its
/// source, so only the mount table tells).
fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let table = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(dir))
        .collect()
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo` octal escapes.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes a directory tree that another process may be writing into or removing at the same
/// time: a failed pass (a file appeared, an entry vanished under it) is tried again, 10 times
/// 20 ms apart. Gone already is success.
fn remove_dir_retrying(dir: &Path) -> std::io::Result<()> {
    let mut last = None;
    for _ in 0..10 {
        match fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => last = Some(e),
            _ => return Ok(()),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    last.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chown_tree_stays_inside_and_on_symlinks() {
        if !crate::base::skip::is_root() {
            return crate::base::skip::skip("chown_tree_stays_inside_and_on_symlinks", "root", "not root");
        }
        let ws = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        std::fs::write(host.path().join("hostfile"), "x").unwrap();
        std::fs::create_dir_all(ws.path().join("a/b")).unwrap();
        std::fs::write(ws.path().join("a/b/f"), "x").unwrap();
        std::os::unix::fs::symlink(host.path(), ws.path().join("a/dirlink")).unwrap();
        std::os::unix::fs::symlink(host.path().join("hostfile"), ws.path().join("filelink")).unwrap();
        chown_tree(ws.path(), |_, _| (54321, 54321)).unwrap();
        for rel in ["", "a", "a/b", "a/b/f", "a/dirlink", "filelink"] {
            let md = fs::symlink_metadata(ws.path().join(rel)).unwrap();
            assert_eq!((md.uid(), md.gid()), (54321, 54321), "{rel:?}");
        }
        for p in [host.path().to_path_buf(), host.path().join("hostfile")] {
            assert_eq!(fs::metadata(&p).unwrap().uid(), 0, "{} left alone", p.display());
        }
    }

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

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mountinfo("/a\\040b/c\\134d"), "/a b/c\\d");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\04"), "/end\\04");
    }

    #[test]
    fn idmapped_image_mounts_belong_to_the_sandbox_range_and_go_at_teardown() {
        if !crate::base::skip::is_root() {
            return crate::base::skip::skip(
                "idmapped_image_mounts_belong_to_the_sandbox_range_and_go_at_teardown",
                "root",
                "needs root for idmapped mounts",
            );
        }
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("tree");
        fs::create_dir_all(src.join("bin")).unwrap();
        std::os::unix::fs::chown(src.join("bin"), Some(ID_BASE + 5), Some(ID_BASE + 5)).unwrap();
        let base = uids::base(3);
        let userns = crate::base::sys::userns_fd(ID_BASE, base, ID_COUNT).unwrap();
        let dst = d.path().join("state/roots/x");
        fs::create_dir_all(&dst).unwrap();
        crate::base::sys::idmapped_bind(&src, &dst, &userns).unwrap();
        let md = fs::metadata(dst.join("bin")).unwrap();
        assert_eq!((md.uid(), md.gid()), (base + 5, base + 5));
        assert!(fs::write(dst.join("new"), "x").is_err(), "the image mount is read-only");
        assert_eq!(mounts_below(&d.path().join("state")), vec![dst.clone()]);
        unmount_roots(&d.path().join("state"));
        assert!(mounts_below(&d.path().join("state")).is_empty());
        assert_eq!(fs::metadata(src.join("bin")).unwrap().uid(), ID_BASE + 5, "the store is unchanged");
    }
}
