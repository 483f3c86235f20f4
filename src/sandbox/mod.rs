//! The sandbox runtimes behind one trait: `shell` (no isolation, development only), `oci`
//! (a container per step) and `microvm` (a QEMU microVM per job). `vm-boot` starts a sandbox and
//! records it in the run document; `run-steps`, `upload` and `complete` find it again from there.

use anyhow::Result;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::base::cancel::{Cancel, CancelReason};
pub use crate::base::proc::{OutputSink, Stream};
pub use crate::document::sandbox::{RuntimeKind, SandboxRecord};

#[cfg(test)]
pub(crate) mod fake;
pub mod kept;
pub mod microvm;
pub mod oci;
mod settings;
pub(crate) mod shell;

pub use settings::OciRuntime;

/// The runtime an operator asks for: one runtime, or `auto` (microvm where KVM works, else oci).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RuntimeChoice {
    #[default]
    Auto,
    Only(RuntimeKind),
}

impl std::fmt::Display for RuntimeChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RuntimeChoice::Auto => f.write_str("auto"),
            RuntimeChoice::Only(k) => k.fmt(f),
        }
    }
}

impl std::str::FromStr for RuntimeChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(RuntimeChoice::Auto),
            _ => match s.parse() {
                Ok(k) => Ok(RuntimeChoice::Only(k)),
                Err(_) => anyhow::bail!("{s:?} is not one of auto, shell, oci, microvm"),
            },
        }
    }
}

/// A runtime's own record of its sandbox: the typed `details` of a [`SandboxRecord`], which the
/// run document carries as JSON it does not read. Each runtime decodes only its own.
pub trait RecordDetails: serde::Serialize + serde::de::DeserializeOwned {
    /// The runtime whose records these are.
    const RUNTIME: RuntimeKind;

    /// The details `sandbox` records; `None` while it records none (a microVM before QEMU
    /// started, an oci sandbox the janitor found without its record).
    fn of(sandbox: &SandboxRecord) -> Result<Option<Self>> {
        if sandbox.runtime != Self::RUNTIME {
            anyhow::bail!("sandbox {} is a {} sandbox, not {}", sandbox.name, sandbox.runtime, Self::RUNTIME);
        }
        if sandbox.details.is_null() {
            return Ok(None);
        }
        Self::deserialize(&sandbox.details)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("the {} sandbox's details: {e}", Self::RUNTIME))
    }

    /// Writes these details into `sandbox`'s record.
    fn store(&self, sandbox: &mut SandboxRecord) {
        // These types are plain data: encoding them to a JSON value cannot fail.
        sandbox.details = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
    }
}

/// Resource limits for one job's sandbox. Zero means unbounded.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Limits {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub pids: u64,
}

/// What `vm-boot` asks of a runtime.
#[derive(Debug, Clone)]
pub struct BootRequest<'a> {
    /// `"<id>"` or `"<id>-<queue>"`.
    pub job_uid: &'a str,
    /// Host directory holding the workspace (seen as `/data` inside).
    pub workspace: &'a Path,
    /// The distinct images the job's steps name, in step order.
    pub images: Vec<String>,
    pub limits: &'a Limits,
    /// Sandbox name prefix (`EXECUTOR_VM_PREFIX`, default `executor`).
    pub name_prefix: &'a str,
    /// The coordinator's URL, which a networked sandbox may reach (uploads).
    pub coordinator: Option<&'a str>,
    /// Other URLs the job's steps upload to (a code-intel upload's `SRC_ENDPOINT`), which a
    /// networked sandbox may reach as it reaches the coordinator.
    pub endpoints: &'a [String],
}

impl<'a> BootRequest<'a> {
    /// What the job's network may reach besides the public internet.
    pub(crate) fn reach(&self) -> crate::network::Reach<'a> {
        crate::network::Reach { coordinator: self.coordinator, endpoints: self.endpoints }
    }
}

/// The key of the operator's startup script (`EXECUTOR_VM_STARTUP_SCRIPT_PATH`), run by
/// `run-steps` as a step of its own before the job's steps. A runtime with a machine of its own
/// (the microVM's guest) runs it there, as root and outside any step image, as Sourcegraph runs
/// it on its VMs; the others run it as a step of the first step's image.
pub const STARTUP_SCRIPT_KEY: &str = "setup.startup-script";

/// One step to run inside a sandbox.
#[derive(Debug, Clone)]
pub struct StepSpec<'a> {
    pub key: &'a str,
    pub image: &'a str,
    /// The step's script, relative to the workspace.
    pub script: &'a str,
    /// Working directory relative to the workspace (`/data/<dir>` inside).
    pub dir: &'a str,
    /// `NAME=value` strings: the step's whole environment besides a minimal PATH and HOME.
    pub env: &'a [String],
}

/// One step of a `cliSteps` job (Sourcegraph's legacy batch path): `src <args>` in `dir`, with
/// a container engine beside it that the step images were handed to.
#[derive(Debug, Clone)]
pub struct CliStepSpec<'a> {
    pub key: &'a str,
    /// The arguments to `src` (the step's `command`).
    pub args: &'a [String],
    /// Working directory relative to the workspace.
    pub dir: &'a str,
    /// `NAME=value` strings added to a minimal PATH and HOME.
    pub env: &'a [String],
}

/// Why a runtime without a container engine in its sandbox refuses a `cliSteps` job, and what
/// helps: the instance decides between cliSteps and native steps by a feature flag, not by the
/// executor's version.
pub(crate) fn cli_steps_advice(runtime: &str) -> String {
    format!(
        "the {runtime} runtime cannot run cliSteps: they are `src batch exec`, which runs each batch \
         step's container through a container engine inside the sandbox, and no engine can nest in \
         this runtime's sandboxes. Sourcegraph sends a server-side batch change as cliSteps while the \
         instance's `native-ssbc-execution` feature flag is off (its default). Either turn that \
         feature flag on (Site admin > Feature flags: the jobs then come as native docker steps, \
         which every runtime runs), or run the batches queue on an executor with \
         EXECUTOR_RUNTIME=microvm (after `executor install vm --engine` and `executor install src-cli`)"
    )
}

/// One path of a dependency cache to attach to every step of a sandbox (docs/caches.md).
#[derive(Debug, Clone)]
pub struct CacheMount {
    /// Where the steps see it: absolute in the step's root, or relative to the workspace.
    pub target: String,
    /// The cache version's tree for this path (owned by the image store's id range, as image
    /// trees are); `None` starts empty.
    pub lower: Option<PathBuf>,
    /// The job's workspace on the host, where a runtime whose layers live in its sandbox brings
    /// them back.
    pub workspace: PathBuf,
}

/// What a runtime made for one [`CacheMount`]: `upper` collects what the steps write there; once
/// the sandbox is torn down it holds an overlay upper layer (whiteouts, opaque directories) whose
/// owners are in the range whose first id is `uid_base`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachedCache {
    pub upper: PathBuf,
    pub uid_base: u32,
    /// The upper layer's whiteouts and opaque directories come as the OCI layer format's files
    /// (`.wh.<name>`, `.wh..wh..opq`): it came back from a guest as a tar.
    #[serde(default)]
    pub whiteout_files: bool,
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepEnd {
    Exited(i32),
    /// Killed by a signal it did not ask for (an OOM kill, for example).
    Signaled(i32),
    /// Stopped by the executor; every process of the step is gone.
    Stopped(CancelReason),
}

/// A sandbox backend.
pub trait Runtime: Send + Sync {
    fn kind(&self) -> RuntimeKind;
    fn name(&self) -> &'static str {
        self.kind().name()
    }
    /// Checks that the runtime can work on this host; returns what it checked.
    fn check(&self) -> Result<Vec<String>>;
    /// Starts a sandbox for one job.
    fn boot(&self, req: &BootRequest) -> Result<SandboxRecord>;
    /// The argv a log entry shows for a step (redacted by the caller).
    fn step_command(&self, sandbox: &SandboxRecord, step: &StepSpec) -> Vec<String>;
    /// Makes `step`'s sandboxed process ahead, up to its start, so that [`Runtime::run_step`]
    /// of the same step in this process only starts it; returns whether it did. Nothing of the
    /// step runs, and the workspace may still be filling. The default makes nothing ahead.
    fn prepare_step(&self, _sandbox: &SandboxRecord, _step: &StepSpec) -> Result<bool> {
        Ok(false)
    }
    /// Runs one step to its end, streaming its output; `cancel` stops it and all it started.
    fn run_step(
        &self,
        sandbox: &SandboxRecord,
        step: &StepSpec,
        sink: &mut dyn OutputSink,
        cancel: &Cancel,
    ) -> Result<StepEnd>;
    /// Whether `cliSteps` jobs run here (`src` beside a container engine in the sandbox);
    /// returns what it checked, or an error saying why not and what helps.
    fn cli_steps(&self) -> Result<Vec<String>> {
        anyhow::bail!("{}", cli_steps_advice(self.name()))
    }
    /// Starts the sandbox of a `cliSteps` job ([`Runtime::cli_steps`]).
    fn boot_cli_steps(&self, _req: &BootRequest) -> Result<SandboxRecord> {
        anyhow::bail!("{}", cli_steps_advice(self.name()))
    }
    /// The argv a log entry shows for a cliStep (redacted by the caller).
    fn cli_step_command(&self, sandbox: &SandboxRecord, step: &CliStepSpec) -> Vec<String> {
        let mut argv = vec![self.name().to_string(), sandbox.name.clone(), "src".into()];
        argv.extend(step.args.iter().cloned());
        argv
    }
    /// Runs one cliStep to its end, streaming its output ([`Runtime::cli_steps`]).
    fn run_cli_step(
        &self,
        _sandbox: &SandboxRecord,
        _step: &CliStepSpec,
        _sink: &mut dyn OutputSink,
        _cancel: &Cancel,
    ) -> Result<StepEnd> {
        anyhow::bail!("{}", cli_steps_advice(self.name()))
    }
    /// Attaches dependency caches to every later step of `sandbox` (before the first), in time
    /// independent of their size, and records them in its record. The default attaches none.
    fn attach_caches(
        &self,
        _sandbox: &mut SandboxRecord,
        _mounts: &[CacheMount],
    ) -> Result<Vec<AttachedCache>> {
        anyhow::bail!("the {} runtime does not attach dependency caches", self.name())
    }
    /// Whether the caches a job hits must be given to its sandbox at the boot, as read-only
    /// disks of their versions ([`Runtime::boot_with_cache_disks`]); the runtime then attaches
    /// them in `vm-boot`, right after the boot. None by default: they attach to a running sandbox.
    fn cache_disks_at_boot(&self) -> bool {
        false
    }
    /// Makes the read-only disk of a cache version's `tree` at `out` (`scratch`: a directory
    /// beside it for temporary files), for [`Runtime::boot_with_cache_disks`].
    fn make_cache_disk(&self, _tree: &Path, _scratch: &Path, _out: &Path) -> Result<()> {
        anyhow::bail!("the {} runtime takes no cache disks", self.name())
    }
    /// Starts a sandbox for one job with the read-only disks of the cache versions it hit
    /// (`disks`, see [`Runtime::cache_disks_at_boot`]).
    fn boot_with_cache_disks(&self, req: &BootRequest, disks: &[PathBuf]) -> Result<SandboxRecord> {
        if !disks.is_empty() {
            anyhow::bail!("the {} runtime takes no cache disks", self.name());
        }
        self.boot(req)
    }
    /// Brings what the steps wrote to the caches into the host workspace, before the sandbox
    /// goes (a no-op where it is there already).
    fn fetch_cache_layers(&self, _sandbox: &SandboxRecord, _workspace: &Path) -> Result<()> {
        Ok(())
    }
    /// Makes what the steps wrote visible in the host workspace (a no-op where it already is).
    fn sync_workspace(&self, sandbox: &SandboxRecord, workspace: &Path) -> Result<()>;
    /// Stops the sandbox and removes what it left; safe to call twice.
    fn teardown(&self, sandbox: &SandboxRecord) -> Result<()>;
    /// Removes sandboxes named with `prefix` that are not in `live`; returns their names.
    fn janitor(&self, prefix: &str, live: &HashSet<String>) -> Result<Vec<String>>;
    /// Whether a sandbox needs only the workspace's directory, not what the clone puts in it,
    /// so that it may boot (and make its first step ahead) while the repository clones. The
    /// default waits for the workspace.
    fn boots_during_clone(&self) -> bool {
        false
    }
    /// A line the boot's log entry opens with (the shell runtime's warning that nothing is
    /// isolated); none by default.
    fn boot_warning(&self) -> Option<&'static str> {
        None
    }
    /// Whether the steps run in their images, which `vm-boot` pulls first (every runtime but
    /// the shell's).
    fn runs_images(&self) -> bool {
        true
    }
    /// Whether the runtime can boot sandboxes ahead of demand for a loop
    /// ([`Runtime::start_warm_pool`]); none by default.
    fn boots_ahead(&self) -> bool {
        false
    }
    /// Starts booting sandboxes ahead of demand for a loop, as `req` asks; `None` where the
    /// runtime boots none.
    fn start_warm_pool(&self, _req: WarmPoolRequest) -> Result<Option<std::sync::Arc<dyn WarmPool>>> {
        Ok(None)
    }
    /// The sandboxes booted ahead of demand, for a live executor and with no job yet, in this
    /// runtime's state: no janitor may take them for abandoned.
    fn booted_ahead(&self) -> Result<HashSet<String>> {
        Ok(HashSet::new())
    }
    /// Keeps the sandbox of a failed job for `executor debug` instead of tearing it down:
    /// nothing of it runs, its network is gone, its failed step's state stays; returns the
    /// record to keep (`teardown` of it releases it). The default keeps nothing.
    fn keep(&self, sandbox: &SandboxRecord) -> Result<SandboxRecord> {
        anyhow::bail!("the {} runtime cannot keep sandbox {} for debugging", self.name(), sandbox.name)
    }
    /// Runs `command` (an interactive shell when `None`, on a terminal when `tty`) in the kept
    /// sandbox in the state its failed `step` left, with no network; returns its exit status.
    fn debug(
        &self,
        sandbox: &SandboxRecord,
        _step: &kept::KeptStep,
        _command: Option<&str>,
        _tty: bool,
    ) -> Result<i32> {
        anyhow::bail!("the {} runtime cannot attach to kept sandbox {}", self.name(), sandbox.name)
    }
}

/// What a loop asks of a runtime's sandboxes booted ahead of demand ([`Runtime::start_warm_pool`]).
#[derive(Clone)]
pub struct WarmPoolRequest {
    /// How many idle sandboxes to keep.
    pub size: usize,
    /// `EXECUTOR_VM_PREFIX`: they are named `<prefix>-<uuid>` like every sandbox of the runtime.
    pub prefix: String,
    /// The executor's name (their owner until a job takes one).
    pub owner: String,
    pub limits: Limits,
    /// The coordinator's URL, which a networked sandbox may reach.
    pub coordinator: Option<String>,
    /// The memory the idle sandboxes and the running jobs share, and what one job may use.
    pub budget_bytes: u64,
    pub job_bytes: u64,
    /// How many sandboxes it may make at once where making one is cheap (microVMs restored from
    /// a snapshot; cold boots go one at a time).
    pub concurrency: usize,
}

/// How a job's request for a sandbox booted ahead of demand ended ([`WarmPool::take`]).
#[derive(Debug)]
pub enum WarmClaim {
    /// A sandbox booted ahead is the job's now; `note` is the line its boot's log entry gets.
    Hit { record: Box<SandboxRecord>, note: Option<String> },
    /// None fits the job: it boots its own; `note` says why, for the boot's log entry.
    Miss { note: String },
}

/// Sandboxes a runtime boots ahead of demand for one loop (the microVM pool): `vm-boot` takes
/// one for a job instead of booting it, and the loop tells it how many jobs run, asks it whether
/// another job fits beside it, and stops it at the end. A stage sees only this trait, whatever
/// the runtime behind it.
pub trait WarmPool: Send + Sync {
    /// The runtime whose sandboxes these are: only a job of that runtime takes one.
    fn runtime(&self) -> RuntimeKind;
    /// A sandbox for `req`, its workspace attached, or why there is none; `cache_disks`: the
    /// disks of the cache versions the job hit ([`Runtime::cache_disks_at_boot`]), which the
    /// sandbox must carry, exactly those.
    fn take(&self, req: &BootRequest, cache_disks: &[PathBuf]) -> WarmClaim;
    /// Whether one more job fits in the memory budget beside `running` jobs and the idle pool.
    fn admits(&self, running: usize) -> bool;
    /// The memory budget the pool and the jobs share, in bytes.
    fn budget_bytes(&self) -> u64;
    /// Tells the pool how many jobs run now.
    fn set_running_jobs(&self, n: usize);
    /// Its state, as one log line.
    fn status_line(&self) -> String;
    /// Stops booting more; returns how many sandboxes were being made (and were stopped).
    fn stop_booting(&self) -> usize;
    /// Destroys the idle sandboxes; returns how many.
    fn drain(&self) -> usize;
}

/// Host-wide settings the runtimes need, from the executor's configuration.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// `$EXECUTOR_STATE_DIR` (default `/var/lib/executor`): `sandboxes/`, `images/`, `vm/` live here.
    pub state_dir: PathBuf,
    /// The shell runtime runs only with this explicit opt-in (`EXECUTOR_ALLOW_UNISOLATED=1`).
    pub allow_unisolated: bool,
    /// The OCI runtime the `oci` sandbox drives: `runc` (default), `crun` or `runsc`
    /// (`EXECUTOR_OCI_RUNTIME`, `--oci-runtime`).
    pub oci_runtime: String,
    /// microvm: `--accel` / `EXECUTOR_VM_ACCEL`.
    pub vm_accel: microvm::Accel,
    /// microvm: `EXECUTOR_VM_ALLOW_TCG=1` lets `auto` fall back to slow software emulation.
    pub vm_allow_tcg: bool,
    /// Every job's network (`EXECUTOR_NETWORK` and the settings beside it).
    pub network: crate::network::Settings,
    /// Failed sandboxes may be kept for `executor debug` (`EXECUTOR_KEEP_FAILED`): a failed
    /// step's writable root is kept until the sandbox goes.
    pub keep_failed: bool,
    /// microvm: `EXECUTOR_VM_SNAPSHOTS` (default true): pool VMs are restored from a snapshot.
    pub vm_snapshots: bool,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            state_dir: PathBuf::from("/var/lib/executor"),
            allow_unisolated: false,
            oci_runtime: "runc".into(),
            vm_accel: microvm::Accel::Auto,
            vm_allow_tcg: false,
            network: crate::network::Settings::default(),
            keep_failed: false,
            vm_snapshots: true,
        }
    }
}

impl RuntimeOptions {
    /// Where runtimes keep per-sandbox state.
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.state_dir.join("sandboxes")
    }
    /// The image store.
    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("images")
    }
}

/// The `auto` choice: `microvm` where the KVM boot probe passed (TCG is never picked
/// automatically: it is too slow to choose silently), `oci` otherwise. Returns the runtime and why.
pub fn choose_auto(opts: &RuntimeOptions) -> Result<(Box<dyn Runtime>, String)> {
    let vm = microvm::MicroVm::new(RuntimeOptions { vm_accel: microvm::Accel::Auto, ..opts.clone() });
    let microvm_no = match vm.check() {
        Ok(_) => match vm.kvm_probe() {
            Ok(p) if p.works => {
                return Ok((
                    Box::new(microvm::MicroVm::new(opts.clone())),
                    format!("KVM works ({})", p.detail),
                ))
            }
            Ok(p) => format!("KVM is unusable: {}", p.detail),
            Err(e) => format!("{e:#}"),
        },
        Err(e) => format!("{e:#}"),
    };
    let oci = oci::OciRuntime::new(opts.clone())?;
    match oci.check() {
        Ok(_) => Ok((Box::new(oci), format!("no microVM ({microvm_no}); containers with {}", opts.oci_runtime))),
        Err(e) => anyhow::bail!(
            "no sandbox runtime works on this host (microvm: {microvm_no}; oci: {e:#}); the shell runtime (no isolation) must be chosen explicitly"
        ),
    }
}

/// Makes the state directory private to root (0700): creates it so, and tightens an existing one
/// that other users could search, saying so. Nothing in it needs another user's access: the OCI
/// runtimes reach their roots and workspaces through `/run/executor-oci` (oci/rootfs.rs), QEMU
/// gets open descriptors and its own directory's handle.
pub fn private_state_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let before = std::fs::symlink_metadata(dir).ok().map(|m| m.permissions().mode() & 0o7777);
    crate::base::fs::private_dir(dir).map_err(|e| {
        anyhow::anyhow!(
            "making the state directory {} private (0700, owned by root): {e}; set EXECUTOR_STATE_DIR \
             to a directory that root owns",
            dir.display()
        )
    })?;
    if let Some(mode) = before.filter(|m| m & 0o077 != 0) {
        tracing::warn!(
            "the state directory {} was mode {mode:04o}; it is now 0700 (other users must reach \
             nothing of the jobs in it)",
            dir.display()
        );
    }
    Ok(())
}

/// Opens the runtime `kind`.
pub fn open(kind: RuntimeKind, opts: &RuntimeOptions) -> Result<Box<dyn Runtime>> {
    private_state_dir(&opts.state_dir)?;
    match kind {
        RuntimeKind::Shell => Ok(Box::new(shell::ShellRuntime::new(opts))),
        RuntimeKind::Oci => Ok(Box::new(oci::OciRuntime::new(opts.clone())?)),
        RuntimeKind::Microvm => Ok(Box::new(microvm::MicroVm::new(opts.clone()))),
    }
}

/// Opens the runtime an operator chose (`auto`: see [`choose_auto`]).
pub fn open_choice(choice: RuntimeChoice, opts: &RuntimeOptions) -> Result<Box<dyn Runtime>> {
    match choice {
        RuntimeChoice::Only(kind) => open(kind, opts),
        RuntimeChoice::Auto => {
            let (rt, why) = choose_auto(opts)?;
            tracing::info!("runtime auto picked {}: {why}", rt.name());
            Ok(rt)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_choices_round_trip() {
        for k in RuntimeKind::ALL {
            assert_eq!(k.to_string().parse::<RuntimeChoice>().unwrap(), RuntimeChoice::Only(k));
        }
        assert_eq!("auto".parse::<RuntimeChoice>().unwrap(), RuntimeChoice::Auto);
        assert_eq!(RuntimeChoice::Auto.to_string(), "auto");
        assert!("docker"
            .parse::<RuntimeChoice>()
            .unwrap_err()
            .to_string()
            .contains("auto, shell, oci, microvm"));
    }

    #[test]
    fn each_runtime_decodes_its_own_record() {
        let mut rec = SandboxRecord::new(RuntimeKind::Shell, "executor-1", "/s/executor-1");
        assert_eq!(shell::ShellDetails::of(&rec).unwrap(), None);
        shell::ShellDetails { workspace: "/w".into() }.store(&mut rec);
        assert_eq!(rec.details, serde_json::json!({"workspace": "/w"}));
        assert_eq!(shell::ShellDetails::of(&rec).unwrap().unwrap().workspace, Path::new("/w"));
        // Another runtime's record is refused, not misread.
        let err = oci::OciDetails::of(&rec).unwrap_err().to_string();
        assert!(err.contains("is a shell sandbox, not oci"), "{err}");
        // Details of the wrong shape name the runtime whose they were.
        let mut wrong = SandboxRecord::new(RuntimeKind::Oci, "n", "/s");
        wrong.details = serde_json::json!({"x": 1});
        let err = oci::OciDetails::of(&wrong).unwrap_err().to_string();
        assert!(err.contains("oci sandbox's details"), "{err}");
        // A microVM record keeps its JSON shape through the typed view.
        let booted = serde_json::json!({"runtime": "microvm", "name": "n", "stateDir": "/s", "pid": 7,
            "details": {"accel": "kvm", "accelReason": "r", "socket": "/s/a", "console": "/s/c",
                        "workspaceDisk": "/s/w", "workspaceDiskBytes": 1, "images": [],
                        "phases": {"diskBuildMs": 1, "qemuStartMs": 2, "kernelBootMs": 3,
                                   "agentReadyMs": 4, "totalMs": 10},
                        "qemuUser": null, "network": null, "pool": {"idleMs": 5, "diskBuildMs": 6, "mountMs": 7}}});
        let mut rec: SandboxRecord = serde_json::from_value(booted.clone()).unwrap();
        let det = microvm::VmDetails::of(&rec).unwrap().unwrap();
        assert_eq!(det.accel, microvm::Accel::Kvm);
        assert_eq!(det.pool.unwrap().mount_ms, 7);
        det.store(&mut rec);
        assert_eq!(serde_json::to_value(&rec).unwrap(), booted);
    }
}
