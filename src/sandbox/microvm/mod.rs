//! The `microvm` runtime: one QEMU `microvm` machine per job. The workspace is a virtio-blk disk
//! built from the host workspace directory, each step image a read-only disk, and the guest agent
//! (`crate::guest`) runs the steps and streams their output over a virtio-serial port. A job
//! with a network gets a virtio-net device on a TAP (net.rs); otherwise there is no network
//! device. QEMU runs in its own cgroup; everything coming out of the guest is treated as
//! hostile (bounded frames, timeouts, paths checked again on the host).
//!
//! One file per operation: `accel` (KVM or TCG), `boot` (the boot's steps), `qemu` (QEMU's
//! command line, pure), `requests` (talking to the agent), `workspace` (the workspace coming
//! back), `teardown` (a VM's end and the janitor's sweep), `caches` (dependency caches as disks), `pool` (VMs booted ahead), `snapshot` (pool
//! VMs restored from a saved template); below them
//! `disk`, `console`, `cgroup`, `channel`, `identity` and `net`; `engine` runs a cliSteps
//! job's `src` in the guest's container engine. This file holds the runtime
//! and its `Runtime` implementation.

mod accel;
mod boot;
mod caches;
pub(crate) mod cgroup;
pub(crate) mod channel;
pub mod console;
mod debug;
pub(crate) mod disk;
mod engine;
pub(crate) mod identity;
mod jail;
pub(crate) mod net;
pub(crate) mod pool;
pub(crate) mod qemu;
mod record;
mod requests;
pub(crate) mod snapshot;
mod teardown;
mod warm;
mod workspace;

use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    BootRequest, CliStepSpec, OutputSink, RecordDetails, Runtime, RuntimeKind, RuntimeOptions, SandboxRecord,
    StepEnd, StepSpec,
};
use crate::base::cancel::Cancel;
use crate::guest::protocol::*;
pub use accel::KvmProbe;
pub use boot::AgentSilent;
use boot::VmBoot;
pub use qemu::{MACHINE, QEMU};
pub use record::{Accel, BootPhases, ImageDisk, PoolClaim, Restored, VmDetails};
use requests::inside_data;
pub use workspace::unpack_workspace;

/// The file in a sandbox directory that marks it as this runtime's.
const MARKER: &str = "microvm";
/// How long the agent may stay silent while a request runs (it sends `Alive` every second).
const SILENCE_LIMIT: Duration = Duration::from_secs(30);
const DEFAULT_MEMORY: u64 = 512 << 20;
/// QEMU's own memory on top of the guest's, for its cgroup limit.
const QEMU_OVERHEAD: u64 = 384 << 20;

pub struct MicroVm {
    opts: RuntimeOptions,
}

impl MicroVm {
    pub fn new(mut opts: RuntimeOptions) -> Self {
        // QEMU runs in the sandbox directory: every path it is given must be absolute.
        if let Ok(abs) = std::path::absolute(&opts.state_dir) {
            opts.state_dir = abs;
        }
        MicroVm { opts }
    }

    fn vm_dir(&self) -> PathBuf {
        crate::vm::vm_dir(&self.opts.state_dir)
    }

    /// Resolves a step image to a digest and a root filesystem directory.
    fn resolve_image(&self, reference: &str) -> Result<(String, PathBuf)> {
        let store = crate::image::ImageStore::open(&self.opts.images_dir())?;
        let img = store.resolve(reference)?;
        Ok((img.digest, img.rootfs))
    }

    /// Boots the VM of a job: its workspace, its step images' disks, then `extra` (a cliSteps
    /// job's engine and src, the caches it hit), and its network.
    fn boot_job(&self, req: &BootRequest, extra: Vec<ImageDisk>) -> Result<SandboxRecord> {
        let (accel, why) = self.choose_accel()?;
        let timeout = if accel == Accel::Kvm { Duration::from_secs(20) } else { Duration::from_secs(120) };
        let boot = VmBoot::new(Some(req.workspace), &req.images, accel, why, req.limits, timeout)
            .with_network(net::request(&self.opts, req.reach()))
            .with_extra_disks(extra);
        self.boot_retrying(req.name_prefix, &boot)
            .with_context(|| format!("booting a VM for job {}", req.job_uid))
    }

    fn details(sandbox: &SandboxRecord) -> Result<VmDetails> {
        match VmDetails::of(sandbox)? {
            Some(d) => Ok(d),
            None => bail!("sandbox {} has no microvm details", sandbox.name),
        }
    }
}

impl Runtime for MicroVm {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Microvm
    }

    fn boots_ahead(&self) -> bool {
        true
    }

    fn start_warm_pool(
        &self,
        req: super::WarmPoolRequest,
    ) -> Result<Option<std::sync::Arc<dyn super::WarmPool>>> {
        warm::start(self, req)
    }

    fn booted_ahead(&self) -> Result<HashSet<String>> {
        warm::live(self)
    }

    fn check(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let qemu =
            which::which(QEMU).with_context(|| format!("{QEMU} not found (install qemu-system-x86)"))?;
        out.push(format!("qemu: {}", qemu.display()));
        which::which("mkfs.ext4").context("mkfs.ext4 not found (install e2fsprogs)")?;
        out.push("mkfs.ext4: found".into());
        let m = crate::vm::installed(&self.opts.state_dir)?;
        out.push(format!("guest kernel {}: {}", m.kernel_version, m.vmlinux.display()));
        let (accel, why) = self.choose_accel()?;
        out.push(format!("accelerator: {accel} ({why})"));
        out.push(snapshot::support(self.opts.vm_snapshots));
        Ok(out)
    }

    fn boot(&self, req: &BootRequest) -> Result<SandboxRecord> {
        self.boot_job(req, Vec::new())
    }

    fn step_command(&self, sandbox: &SandboxRecord, step: &StepSpec) -> Vec<String> {
        vec![
            "microvm".into(),
            sandbox.name.clone(),
            step.image.to_string(),
            "/bin/sh".into(),
            inside_data(step.script).unwrap_or_else(|_| step.script.to_string()),
        ]
    }

    fn run_step(
        &self,
        sandbox: &SandboxRecord,
        step: &StepSpec,
        sink: &mut dyn OutputSink,
        cancel: &Cancel,
    ) -> Result<StepEnd> {
        if step.key == crate::sandbox::STARTUP_SCRIPT_KEY {
            // As Sourcegraph runs it: once per VM, as root, in the guest itself.
            let req = RunRequest {
                id: rand::random::<u32>() % (u32::MAX - 1),
                image: u32::MAX,
                argv: vec!["/bin/sh".into(), inside_data(step.script)?],
                cwd: inside_data(step.dir)?,
                env: requests::base_env(),
                user: None,
                engine: None,
                ..RunRequest::default()
            };
            return self
                .request(sandbox, req, sink, cancel)
                .context("running the startup script in the guest");
        }
        let det = Self::details(sandbox)?;
        let image = det
            .images
            .iter()
            .position(|i| i.reference == step.image)
            .with_context(|| format!("image {} has no disk in VM {}", step.image, sandbox.name))?;
        let (env, user) = identity::step_identity(&self.opts.images_dir(), step.image, step.env)
            .with_context(|| format!("step {}", step.key))?;
        let req = RunRequest {
            id: rand::random::<u32>() % (u32::MAX - 1),
            image: image as u32,
            argv: vec!["/bin/sh".into(), inside_data(step.script)?],
            cwd: inside_data(step.dir)?,
            env,
            user,
            engine: None,
            keep_failed: self.opts.keep_failed,
            caches: det.caches.clone(),
            ..RunRequest::default()
        };
        self.request(sandbox, req, sink, cancel).with_context(|| format!("running step {}", step.key))
    }

    fn cli_steps(&self) -> Result<Vec<String>> {
        self.cli_steps_check()
    }

    fn boot_cli_steps(&self, req: &BootRequest) -> Result<SandboxRecord> {
        self.boot_cli(req)
    }

    fn cli_step_command(&self, sandbox: &SandboxRecord, step: &CliStepSpec) -> Vec<String> {
        let mut argv = vec!["microvm".into(), sandbox.name.clone(), "engine".into(), "src".into()];
        argv.extend(step.args.iter().cloned());
        argv
    }

    fn run_cli_step(
        &self,
        sandbox: &SandboxRecord,
        step: &CliStepSpec,
        sink: &mut dyn OutputSink,
        cancel: &Cancel,
    ) -> Result<StepEnd> {
        self.run_cli(sandbox, step, sink, cancel)
    }

    fn cache_disks_at_boot(&self) -> bool {
        true
    }

    fn make_cache_disk(&self, tree: &Path, scratch: &Path, out: &Path) -> Result<()> {
        disk::cache_tree_disk(tree, scratch, out)
    }

    fn boot_with_cache_disks(&self, req: &BootRequest, disks: &[PathBuf]) -> Result<SandboxRecord> {
        if disks.is_empty() {
            return self.boot(req);
        }
        self.boot_with_caches(req, disks)
    }

    fn attach_caches(
        &self,
        sandbox: &mut SandboxRecord,
        mounts: &[super::CacheMount],
    ) -> Result<Vec<super::AttachedCache>> {
        self.attach(sandbox, mounts)
    }

    fn fetch_cache_layers(&self, sandbox: &SandboxRecord, workspace: &Path) -> Result<()> {
        self.fetch_layers(sandbox, workspace)
    }

    fn sync_workspace(&self, sandbox: &SandboxRecord, workspace: &Path) -> Result<()> {
        self.fetch_workspace(sandbox, workspace)
    }

    fn teardown(&self, sandbox: &SandboxRecord) -> Result<()> {
        self.remove_vm(sandbox)
    }

    fn keep(&self, sandbox: &SandboxRecord) -> Result<SandboxRecord> {
        self.keep_vm(sandbox)
    }

    fn debug(
        &self,
        sandbox: &SandboxRecord,
        step: &super::kept::KeptStep,
        command: Option<&str>,
        tty: bool,
    ) -> Result<i32> {
        self.attach_debug(sandbox, step, command, tty)
    }

    fn janitor(&self, prefix: &str, live: &HashSet<String>) -> Result<Vec<String>> {
        let removed = self.sweep(prefix, live)?;
        snapshot::janitor(self);
        Ok(removed)
    }
}

/// A guest-supplied message made safe to print: bounded, no control characters.
pub(super) fn printable(s: &str) -> String {
    s.chars().take(500).map(|c| if c.is_control() { ' ' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_strips_control_and_bounds() {
        let s = format!("a\x1b[31mb\n{}", "x".repeat(1000));
        let p = printable(&s);
        assert!(!p.contains('\x1b') && !p.contains('\n'));
        assert_eq!(p.chars().count(), 500);
    }
}
