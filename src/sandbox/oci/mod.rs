//! The `oci` runtime: one fresh container per step, made by an OCI runtime from the distribution
//! (`runc` by default, `crun`, or gVisor's `runsc`), with the step's image under a writable
//! layer of the step's own as its root (rootfs.rs) and the workspace at `/data`. The sandbox of a
//! job is its state directory (the runtime's container state, the bundles), its cgroup (the
//! job's limits) and a use record in the image store; `teardown` and `janitor` remove all three.
//!
//! One file per operation, as youki has one per container operation: boot.rs (the sandbox made),
//! caches.rs (dependency caches attached),
//! step.rs (one step run and judged), ahead.rs (a step's container made ahead), workspace.rs (the
//! workspace handed to the containers and back), teardown.rs and janitor.rs, debug.rs (a failed
//! job's sandbox kept, and `executor debug` attached to it). This file holds the
//! runtime itself, the OCI runtime's command lines, and the [`Runtime`] impl dispatching to them.

mod ahead;
mod boot;
mod caches;
pub mod cgroup;
mod debug;
mod janitor;
mod record;
pub mod rootfs;
pub(crate) mod shim;
pub(crate) mod spec;
mod step;
mod teardown;
pub(crate) mod uids;
mod workspace;

use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::base::cancel::Cancel;
use crate::image::{ImageStore, ID_BASE};
use crate::sandbox::{
    AttachedCache, BootRequest, CacheMount, OutputSink, RecordDetails, Runtime, RuntimeKind, RuntimeOptions,
    SandboxRecord, StepEnd, StepSpec,
};
pub use record::{OciCache, OciDetails, OciImage};

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
        self.boot_sandbox(req)
    }

    fn step_command(&self, sandbox: &SandboxRecord, step: &StepSpec) -> Vec<String> {
        self.step_argv(sandbox, step)
    }

    fn prepare_step(&self, sandbox: &SandboxRecord, step: &StepSpec) -> Result<bool> {
        self.make_ahead(sandbox, step)
    }

    fn run_step(
        &self,
        sandbox: &SandboxRecord,
        step: &StepSpec,
        sink: &mut dyn OutputSink,
        cancel: &Cancel,
    ) -> Result<StepEnd> {
        self.run_one_step(sandbox, step, sink, cancel)
    }

    fn attach_caches(
        &self,
        sandbox: &mut SandboxRecord,
        mounts: &[CacheMount],
    ) -> Result<Vec<AttachedCache>> {
        self.attach(sandbox, mounts)
    }

    fn sync_workspace(&self, sandbox: &SandboxRecord, workspace: &Path) -> Result<()> {
        self.give_back_workspace(sandbox, workspace)
    }

    fn teardown(&self, sandbox: &SandboxRecord) -> Result<()> {
        self.remove_sandbox(sandbox)
    }

    fn janitor(&self, prefix: &str, live: &HashSet<String>) -> Result<Vec<String>> {
        self.sweep(prefix, live)
    }

    fn keep(&self, sandbox: &SandboxRecord) -> Result<SandboxRecord> {
        self.keep_sandbox(sandbox)
    }

    fn debug(
        &self,
        sandbox: &SandboxRecord,
        step: &crate::sandbox::kept::KeptStep,
        command: Option<&str>,
        tty: bool,
    ) -> Result<i32> {
        self.attach_debug(sandbox, step, command, tty)
    }

    /// A container's root is the step's image and its workspace a bind mount of the directory:
    /// nothing of the boot waits for the clone.
    fn boots_during_clone(&self) -> bool {
        true
    }
}
