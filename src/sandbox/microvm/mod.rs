//! The `microvm` runtime: one QEMU `microvm` machine per job. The workspace is a virtio-blk disk
//! built from the host workspace directory, each step image a read-only disk, and the guest agent
//! (`crate::guest`) runs the steps and streams their output over a virtio-serial port. A job
//! with a network gets a virtio-net device on a TAP (net.rs); otherwise there is no network
//! device. QEMU runs in its own cgroup; everything coming out of the guest is treated as
//! hostile (bounded frames, timeouts, paths checked again on the host).
//!
//! Boot order: resolve kernel and initramfs, choose the accelerator, build the workspace disk,
//! build or reuse the image disks, start QEMU, put it in its cgroup, wait for the agent's hello.

pub mod cgroup;
pub mod channel;
pub mod console;
pub mod disk;
pub mod identity;
pub mod net;
pub mod pool;
mod record;
mod warm;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::{
    BootRequest, OutputSink, RecordDetails, Runtime, RuntimeKind, RuntimeOptions, SandboxRecord, StepEnd,
    StepSpec, Stream,
};
use crate::base::cancel::Cancel;
use crate::guest::protocol::*;
use channel::Channel;
pub use record::{Accel, BootPhases, ImageDisk, PoolClaim, VmDetails};

/// The QEMU binary; the small `-microvm` build is KVM-only, so TCG needs the full one.
pub const QEMU: &str = "qemu-system-x86_64";
/// The machine: no option ROMs. ACPI stays: the guest finds its virtio-mmio devices through it
/// (the Debian kernel cannot take them from its command line). The CMOS RTC stays too: without
/// it the kernel waits about two seconds of TCG time for an RTC update that never comes, and the
/// guest's clock starts in 1970.
pub const MACHINE: &str = "microvm,x-option-roms=off";
/// The file in a sandbox directory that marks it as this runtime's.
const MARKER: &str = "microvm";
/// How long the agent may stay silent while a request runs (it sends `Alive` every second).
const SILENCE_LIMIT: Duration = Duration::from_secs(30);
const DEFAULT_MEMORY: u64 = 512 << 20;
/// QEMU's own memory on top of the guest's, for its cgroup limit.
const QEMU_OVERHEAD: u64 = 384 << 20;

/// The cached answer of the KVM boot probe.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KvmProbe {
    pub works: bool,
    pub detail: String,
    pub kernel_version: String,
}

/// What one VM boot needs besides its name.
struct VmBoot<'a> {
    workspace: Option<&'a Path>,
    images: &'a [String],
    accel: Accel,
    accel_reason: String,
    limits: &'a super::Limits,
    timeout: Duration,
    /// A VM booted ahead of its job (`pool`): a blank workspace disk of this many bytes, which
    /// the agent mounts only when told, once the host wrote the job's filesystem into it.
    pool_disk_bytes: Option<u64>,
    /// The job's network, if it has one (net.rs).
    network: Option<net::NetRequest<'a>>,
}

impl<'a> VmBoot<'a> {
    /// The same boot with the job's network.
    fn with_network(mut self, network: Option<net::NetRequest<'a>>) -> Self {
        self.network = network;
        self
    }

    fn new(
        workspace: Option<&'a Path>,
        images: &'a [String],
        accel: Accel,
        accel_reason: String,
        limits: &'a super::Limits,
        timeout: Duration,
    ) -> Self {
        VmBoot {
            workspace,
            images,
            accel,
            accel_reason,
            limits,
            timeout,
            pool_disk_bytes: None,
            network: None,
        }
    }
}

/// The agent never said hello: the channel broke or stayed silent while the guest booted (QEMU
/// exited: the guest died during boot). A caller may boot a fresh VM instead.
#[derive(Debug, thiserror::Error)]
#[error("waiting for the agent of VM {vm} to start")]
pub struct AgentSilent {
    pub vm: String,
}

pub struct MicroVm {
    opts: RuntimeOptions,
}

/// Agent connections left clean (handshake done, or request answered), by VM name and socket,
/// kept for the next request to the same VM from any runtime instance of this process (`loop`'s
/// stages each open their own: `vm-boot`'s connection serves `run-steps`): a fresh connection
/// costs the guest a port reopening and a hello round trip. Teardown drops a VM's connection.
static IDLE: std::sync::Mutex<Vec<(String, PathBuf, Channel)>> = std::sync::Mutex::new(Vec::new());
/// Most connections kept (those of VMs torn down by another process are never taken).
const IDLE_MAX: usize = 64;

impl MicroVm {
    pub fn new(mut opts: RuntimeOptions) -> Self {
        // QEMU runs in the sandbox directory: every path it is given must be absolute.
        if let Ok(abs) = std::path::absolute(&opts.state_dir) {
            opts.state_dir = abs;
        }
        MicroVm { opts }
    }

    fn keep_idle(&self, sandbox: &SandboxRecord, socket: &Path, ch: Channel) {
        let mut idle = IDLE.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|(name, _, _)| *name != sandbox.name);
        if idle.len() >= IDLE_MAX {
            idle.remove(0);
        }
        idle.push((sandbox.name.clone(), socket.to_path_buf(), ch));
    }

    fn take_idle(&self, sandbox: &SandboxRecord, socket: &Path) -> Option<Channel> {
        let mut idle = IDLE.lock().unwrap_or_else(|p| p.into_inner());
        let i = idle.iter().position(|(name, sock, _)| *name == sandbox.name && sock == socket)?;
        Some(idle.remove(i).2)
    }

    fn vm_dir(&self) -> PathBuf {
        crate::vm::vm_dir(&self.opts.state_dir)
    }

    /// Chooses the accelerator and says why.
    pub fn choose_accel(&self) -> Result<(Accel, String)> {
        match self.opts.vm_accel {
            Accel::Kvm => Ok((Accel::Kvm, "--accel kvm was asked for".into())),
            Accel::Tcg => Ok((Accel::Tcg, "--accel tcg was asked for (software emulation: slow)".into())),
            Accel::Auto => {
                let probe = self.kvm_probe()?;
                if probe.works {
                    Ok((Accel::Kvm, format!("the KVM boot probe passed ({})", probe.detail)))
                } else if self.opts.vm_allow_tcg {
                    Ok((
                        Accel::Tcg,
                        format!("KVM is unusable ({}); TCG allowed by EXECUTOR_VM_ALLOW_TCG", probe.detail),
                    ))
                } else {
                    bail!(
                        "KVM is unusable here ({}) and TCG is not allowed (set EXECUTOR_VM_ALLOW_TCG=1 or --accel tcg \
                         to accept slow software emulation)",
                        probe.detail
                    )
                }
            }
        }
    }

    /// The KVM boot probe, cached under `vm/kvm-probe.json` per guest kernel.
    pub fn kvm_probe(&self) -> Result<KvmProbe> {
        let manifest = crate::vm::installed(&self.opts.state_dir)?;
        let path = self.vm_dir().join("kvm-probe.json");
        if let Some(p) =
            fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str::<KvmProbe>(&t).ok())
        {
            if p.kernel_version == manifest.kernel_version {
                return Ok(p);
            }
        }
        let (works, detail) = if fs::File::options().read(true).write(true).open("/dev/kvm").is_err() {
            (false, "/dev/kvm cannot be opened".to_string())
        } else if Path::new("/sys/module/kvm_pvm").exists() {
            // KVM-PVM emulates an unmodified guest's ring 0 and then pauses the VM: see docs.
            (false, "/dev/kvm is KVM-PVM, which cannot run an unmodified guest kernel".to_string())
        } else {
            let start = Instant::now();
            let limits = super::Limits::default();
            let res = self.boot_vm(
                &format!("probe-{}", uuid::Uuid::new_v4()),
                &VmBoot::new(None, &[], Accel::Kvm, String::new(), &limits, Duration::from_secs(15)),
            );
            match res {
                Ok(rec) => {
                    let _ = self.teardown(&rec);
                    (true, format!("a KVM guest answered in {} ms", start.elapsed().as_millis()))
                }
                Err(e) => (false, format!("a KVM guest did not boot: {e:#}")),
            }
        };
        let p = KvmProbe { works, detail, kernel_version: manifest.kernel_version };
        fs::create_dir_all(self.vm_dir()).ok();
        let _ = crate::base::fs::write_atomic(&path, &serde_json::to_vec_pretty(&p).unwrap_or_default());
        Ok(p)
    }

    /// Resolves a step image to a digest and a root filesystem directory.
    fn resolve_image(&self, reference: &str) -> Result<(String, PathBuf)> {
        let store = crate::image::ImageStore::open(&self.opts.images_dir())?;
        let img = store.resolve(reference)?;
        Ok((img.digest, img.rootfs))
    }

    /// Boots a VM named `<prefix>-<uuid>`; when the agent channel breaks before the agent said
    /// hello (QEMU exited: the guest died during boot, seen under heavy load before
    /// `no_timer_check`; see docs/sandbox-microvm.md), that VM is torn down and one fresh VM is
    /// booted instead.
    fn boot_retrying(&self, prefix: &str, boot: &VmBoot) -> Result<SandboxRecord> {
        let name = format!("{prefix}-{}", uuid::Uuid::new_v4());
        match self.boot_vm(&name, boot) {
            Err(e) if e.downcast_ref::<AgentSilent>().is_some() => {
                eprintln!("executor: {e:#}; booting a fresh VM");
                let name = format!("{prefix}-{}", uuid::Uuid::new_v4());
                self.boot_vm(&name, boot)
            }
            other => other,
        }
    }

    fn boot_vm(&self, name: &str, boot: &VmBoot) -> Result<SandboxRecord> {
        let manifest = crate::vm::installed(&self.opts.state_dir)?;
        let dir = self.opts.sandboxes_dir().join(name);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::write(dir.join(MARKER), name).with_context(|| format!("writing {}", dir.display()))?;
        let mut rec = SandboxRecord::new(RuntimeKind::Microvm, name, dir.clone());
        match self.boot_in(&mut rec, &manifest, boot) {
            Ok(()) => Ok(rec),
            Err(e) => {
                let _ = self.teardown(&rec);
                Err(e)
            }
        }
    }

    fn boot_in(&self, rec: &mut SandboxRecord, manifest: &crate::vm::Manifest, boot: &VmBoot) -> Result<()> {
        let VmBoot {
            workspace,
            images,
            accel,
            ref accel_reason,
            limits,
            timeout: boot_timeout,
            pool_disk_bytes,
            network: _,
        } = *boot;
        let accel_reason = accel_reason.clone();
        let t0 = Instant::now();
        let dir = rec.state_dir.clone();
        let socket = dir.join("agent.sock");
        let mut det = VmDetails {
            accel,
            accel_reason,
            socket: socket.clone(),
            console: dir.join("console.log"),
            ..Default::default()
        };
        if let Some(ws) = workspace {
            let used = disk::tree_bytes(ws)?;
            let size = if limits.disk_bytes > 0 {
                limits.disk_bytes.max(used + (64 << 20))
            } else {
                used * 2 + (1 << 30)
            };
            det.workspace_disk = dir.join("workspace.ext4");
            det.workspace_disk_bytes = size.next_multiple_of(1 << 20);
            disk::make_ext4(ws, &det.workspace_disk, det.workspace_disk_bytes, "workspace")?;
        } else if let Some(size) = pool_disk_bytes {
            // Blank and sparse: the job's filesystem is written into this same file when a job
            // takes the VM (`pool::claim`), and the agent mounts it only then.
            det.workspace_disk = dir.join("workspace.ext4");
            det.workspace_disk_bytes = size.next_multiple_of(1 << 20);
            let f = fs::File::create(&det.workspace_disk)
                .with_context(|| format!("creating {}", det.workspace_disk.display()))?;
            f.set_len(det.workspace_disk_bytes)
                .with_context(|| format!("sizing {}", det.workspace_disk.display()))?;
        }
        let has_disk = workspace.is_some() || pool_disk_bytes.is_some();
        let workspace_mode = match (workspace.is_some(), pool_disk_bytes.is_some()) {
            (true, _) => 1,
            (false, true) => 2,
            (false, false) => 0,
        };
        for reference in images {
            let (digest, rootfs) = self.resolve_image(reference)?;
            let d = disk::image_disk(&self.vm_dir().join("images"), &digest, &rootfs)
                .with_context(|| format!("building the disk of image {reference}"))?;
            det.images.push(ImageDisk { reference: reference.clone(), digest, disk: d });
        }
        det.phases.disk_build_ms = t0.elapsed().as_millis() as u64;

        let cpus = if limits.cpus > 0 { limits.cpus } else { 1 };
        let mem = if limits.memory_bytes > 0 { limits.memory_bytes } else { DEFAULT_MEMORY };
        let debug = std::env::var_os("EXECUTOR_VM_DEBUG").is_some();
        let mut cmdline = kernel_cmdline(det.images.len(), workspace_mode, debug, tsc_khz());
        // The job's network, recorded at once so that a failed boot's teardown removes it.
        let vm_net = boot.network.as_ref().map(|r| net::setup(&self.opts, &rec.name, r)).transpose()?;
        if let Some(v) = &vm_net {
            det.network = Some(v.net.clone());
            det.store(rec);
            cmdline.push(' ');
            cmdline.push_str(&v.net.guest_cmdline());
        }
        let mut cmd = crate::base::proc::command(QEMU);
        cmd.args(["-name", &rec.name, "-M", MACHINE, "-nodefaults", "-no-user-config"]);
        cmd.args([
            "-display",
            "none",
            "-no-reboot",
            "-m",
            &format!("{}M", mem >> 20),
            "-smp",
            &cpus.to_string(),
        ]);
        match accel {
            Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
            _ => cmd.args(["-accel", "tcg", "-cpu", "max"]),
        };
        // QEMU runs as the VM user where there is one (see `qemu_user`); it reaches nothing of the
        // host by path but its own sandbox directory (its working directory, entered by an open
        // handle, so the directories above may stay closed to it). The kernel, the initramfs and
        // the shared image disks are handed over as open descriptors: read-only, the images
        // through QEMU's fd sets so that their files need not be readable by the user.
        let user = qemu_user(accel)?;
        if let Some(u) = &user {
            give_to(&dir, u, 0o700)?;
            if has_disk {
                give_to(&det.workspace_disk, u, 0o600)?;
            }
            det.qemu_user = Some(u.name.clone());
        }
        let open_ro =
            |p: &Path| fs::File::open(p).with_context(|| format!("opening {} for QEMU", p.display()));
        let (kernel, initrd) = (open_ro(&manifest.vmlinux)?, open_ro(&manifest.initramfs)?);
        let dir_handle = open_ro(&dir)?;
        let image_files = det.images.iter().map(|i| open_ro(&i.disk)).collect::<Result<Vec<_>>>()?;
        let fd_path_raw = |fd: i32| format!("/proc/self/fd/{fd}");
        let fd_path = |f: &fs::File| fd_path_raw(f.as_raw_fd());
        cmd.arg("-kernel").arg(fd_path(&kernel)).arg("-initrd").arg(fd_path(&initrd));
        cmd.args(["-append", &cmdline]);
        // The console goes through a pipe to a reader that keeps its first CONSOLE_CAP bytes.
        let console_pipe =
            console::start(&det.console, console::CONSOLE_CAP, user.as_ref().map(|u| (u.uid, u.gid)))?;
        cmd.args(["-serial", &format!("file:{}", fd_path_raw(console_pipe.as_raw_fd()))]);
        if has_disk {
            cmd.args(["-drive", "id=workspace,file=workspace.ext4,format=raw,if=none"]);
            cmd.args(["-device", "virtio-blk-device,drive=workspace,serial=workspace"]);
        }
        for (i, f) in image_files.iter().enumerate() {
            cmd.arg("-add-fd").arg(format!("fd={},set={},opaque=image{i}", f.as_raw_fd(), i + 1));
            cmd.arg("-drive")
                .arg(format!("id=image{i},file=/dev/fdset/{},format=raw,if=none,readonly=on", i + 1));
            cmd.args(["-device", &format!("virtio-blk-device,drive=image{i},serial=image{i}")]);
        }
        cmd.args(["-device", "virtio-serial-device"]);
        let mut keep: Vec<i32> = vec![kernel.as_raw_fd(), initrd.as_raw_fd(), console_pipe.as_raw_fd()];
        if let Some(v) = &vm_net {
            net::qemu_args(&mut cmd, v);
            keep.push(v.tap.as_raw_fd());
        }
        keep.extend(image_files.iter().map(|f| f.as_raw_fd()));
        crate::base::sys::start_in_dir_keeping(&mut cmd, dir_handle.as_raw_fd(), keep);
        if let Some(u) = &user {
            std::os::unix::process::CommandExt::uid(&mut cmd, u.uid);
            std::os::unix::process::CommandExt::gid(&mut cmd, u.gid);
        }
        // Relative to QEMU's working directory (the sandbox's): a socket address holds 108 bytes.
        cmd.args(["-chardev", "socket,id=agent,path=agent.sock,server=on,wait=off"]);
        cmd.args(["-device", &format!("virtserialport,chardev=agent,name={PORT_NAME}")]);
        let log =
            fs::File::create(dir.join("qemu.log")).with_context(|| format!("creating {}", dir.display()))?;
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        // Its own process group: a signal to the executor's group does not reach the VM.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().with_context(|| format!("starting {QEMU} (install qemu-system-x86)"))?;
        drop((kernel, initrd, dir_handle, image_files, console_pipe, vm_net));
        let pid = child.id() as i32;
        rec.pid = Some(pid);
        det.store(rec);
        let pids = if limits.pids > 0 { limits.pids } else { 256 };
        match cgroup::Cgroup::create(&rec.name, mem + QEMU_OVERHEAD, pids, cpus) {
            Ok(Some(cg)) => {
                cg.add(pid).with_context(|| format!("moving QEMU {pid} into its cgroup"))?;
                if pool_disk_bytes.is_some() {
                    // Booted ahead of demand: it yields the CPU to the VMs of running jobs.
                    cgroup::Cgroup::set_cpu_weight(&rec.name, true);
                }
            }
            Ok(None) => {}
            Err(e) => return Err(e.context(format!("creating the cgroup of VM {}", rec.name))),
        }
        let t_spawn = Instant::now();
        let mut ch = Channel::connect(&socket, Duration::from_secs(10))
            .map_err(|e| qemu_failed(&dir, &mut child, e))?;
        det.phases.qemu_start_ms = t_spawn.elapsed().as_millis() as u64;
        let hello = ch
            .handshake(boot_timeout)
            .context(AgentSilent { vm: rec.name.clone() })
            .map_err(|e| qemu_failed(&dir, &mut child, e))?;
        det.phases.kernel_boot_ms = hello.start_ms;
        det.phases.agent_ready_ms = hello.ready_ms.saturating_sub(hello.start_ms);
        det.phases.total_ms = t0.elapsed().as_millis() as u64;
        det.store(rec);
        self.keep_idle(rec, &socket, ch);
        Ok(())
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
            &VmBoot::new(workspace, &[], accel, why, &super::Limits::default(), timeout),
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
        };
        let res = self.request(&rec, req, sink, &cancel);
        let elapsed = t.elapsed();
        let _ = self.teardown(&rec);
        Ok((det.phases, res?, elapsed, accel))
    }

    fn details(sandbox: &SandboxRecord) -> Result<VmDetails> {
        match VmDetails::of(sandbox)? {
            Some(d) => Ok(d),
            None => bail!("sandbox {} has no microvm details", sandbox.name),
        }
    }

    fn connect(&self, sandbox: &SandboxRecord) -> Result<Channel> {
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

    fn request(
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

/// A guest-supplied message made safe to print: bounded, no control characters.
fn printable(s: &str) -> String {
    s.chars().take(500).map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// The last `lines` lines of at most the last 64 KiB of a file, joined with "; ".
fn file_tail(path: &Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut text = Vec::new();
    if let Ok(mut f) = fs::File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 << 10)));
        let _ = f.take(64 << 10).read_to_end(&mut text);
    }
    let text = String::from_utf8_lossy(&text);
    let mut tail: Vec<&str> =
        text.lines().map(str::trim).filter(|l| !l.is_empty()).rev().take(lines).collect();
    tail.reverse();
    tail.join("; ")
}

/// A boot failure with what tells its cause: whether QEMU is gone (a guest that panicked or
/// powered off ends it, and the host's connection is then reset), QEMU's own last words and the
/// guest console's last lines (the kernel's and the agent's; no step has run yet).
fn qemu_failed(dir: &Path, child: &mut std::process::Child, e: anyhow::Error) -> anyhow::Error {
    let mut e = e;
    // A reset connection comes as QEMU exits: give it a moment to be seen gone.
    for _ in 0..20 {
        if let Ok(Some(status)) = child.try_wait() {
            e = e.context(format!("QEMU exited ({status})"));
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let console = file_tail(&dir.join("console.log"), 3);
    if !console.is_empty() {
        e = e.context(format!("guest console: {}", printable(&console)));
    }
    let log = file_tail(&dir.join("qemu.log"), 5);
    if !log.is_empty() {
        e = e.context(format!("qemu said: {}", printable(&log)));
    }
    e
}

fn base_env() -> Vec<String> {
    vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(), "HOME=/root".into()]
}

/// The host TSC frequency in kHz: microvm has no HPET or PM timer to calibrate against.
fn tsc_khz() -> Option<u64> {
    if let Ok(s) = fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz") {
        if let Ok(v) = s.trim().parse() {
            return Some(v);
        }
    }
    let info = fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info.lines().find(|l| l.starts_with("cpu MHz"))?.split(':').nth(1)?.trim().parse().ok()?;
    Some((mhz * 1000.0) as u64)
}

/// The account QEMU runs as.
struct QemuUser {
    name: String,
    uid: u32,
    gid: u32,
}

/// The user QEMU runs as: none when the executor is not root (QEMU then runs as the executor's
/// own unprivileged user); the VM user `install vm` made, when the executor is root. Under KVM its
/// group is `kvm` where that group exists, for /dev/kvm. A root executor without that user is
/// refused rather than giving QEMU root.
fn qemu_user(accel: Accel) -> Result<Option<QemuUser>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let name = crate::vm::VM_USER;
    let u = nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .with_context(|| format!("no user {name} for QEMU to run as (run `executor install vm` as root)"))?;
    let mut gid = u.gid.as_raw();
    if accel == Accel::Kvm {
        if let Ok(Some(g)) = nix::unistd::Group::from_name("kvm") {
            gid = g.gid.as_raw();
        }
    }
    Ok(Some(QemuUser { name: name.to_string(), uid: u.uid.as_raw(), gid }))
}

/// Hands `path` to the QEMU user with `mode`: its sandbox directory and its workspace disk.
fn give_to(path: &Path, user: &QemuUser, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    nix::unistd::chown(path, Some(user.uid.into()), Some(user.gid.into()))
        .with_context(|| format!("giving {} to user {}", path.display(), user.name))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

/// The guest kernel's command line. Each parameter is there for boot time or for a boot that
/// must not hang; `scripts/bench-vm` boots its bare baseline with the same line.
/// - `tsc_early_khz`: microvm has no HPET or PM timer to calibrate the TSC against (without it
///   about one boot in twenty hangs);
/// - `tsc=reliable`: keeps the TSC as the clocksource. Under TCG it is the host's clock, and the
///   clocksource watchdog, comparing it with jiffies that lag behind, would otherwise switch the
///   guest to jiffies (4 ms resolution) half-way through the boot;
/// - `no_timer_check`: a loaded host may delay TCG's timer interrupts past the kernel's IO-APIC
///   timer check, which then panics the guest;
/// - `cryptomgr.notests`: the crypto self-tests cost about half a second under TCG;
/// - `panic=-1 reboot=t` with QEMU's `-no-reboot`: a panic ends QEMU.
/// - `executor.workspace`: 0 no workspace disk, 1 mount it at boot, 2 mount it when the host
///   says so (a VM booted ahead of its job).
fn kernel_cmdline(images: usize, workspace: u8, debug: bool, tsc_khz: Option<u64>) -> String {
    let mut line = String::from("console=ttyS0");
    if !debug {
        line.push_str(" quiet");
    }
    line.push_str(" panic=-1 reboot=t tsc=reliable no_timer_check cryptomgr.notests");
    if let Some(khz) = tsc_khz {
        line.push_str(&format!(" tsc_early_khz={khz}"));
    }
    line.push_str(&format!(" executor.images={images} executor.workspace={workspace}"));
    if debug {
        line.push_str(" executor.debug=1");
    }
    line
}

/// A relative path from the job that must stay below /data.
fn inside_data(rel: &str) -> Result<String> {
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

fn process_is(pid: i32, name: &str) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(2).any(|w| w[0] == b"-name" && w[1] == name.as_bytes())
}

fn kill_vm(pid: i32, name: &str) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    if !process_is(pid, name) {
        return;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        // Reaps it when it is our child; otherwise waits for its parent (init) to.
        let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        if !process_is(pid, name) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
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
        Ok(out)
    }

    fn boot(&self, req: &BootRequest) -> Result<SandboxRecord> {
        let (accel, why) = self.choose_accel()?;
        let timeout = if accel == Accel::Kvm { Duration::from_secs(20) } else { Duration::from_secs(120) };
        self.boot_retrying(
            req.name_prefix,
            &VmBoot::new(Some(req.workspace), &req.images, accel, why, req.limits, timeout)
                .with_network(net::request(&self.opts, req.coordinator)),
        )
        .with_context(|| format!("booting a VM for job {}", req.job_uid))
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
        };
        self.request(sandbox, req, sink, cancel).with_context(|| format!("running step {}", step.key))
    }

    fn sync_workspace(&self, sandbox: &SandboxRecord, workspace: &Path) -> Result<()> {
        let det = Self::details(sandbox)?;
        let limit = det.workspace_disk_bytes.max(64 << 20) * 2;
        let mut ch = self.connect(sandbox)?;
        let id = rand::random::<u32>() % (u32::MAX - 1);
        ch.send(&Frame::json(Kind::Sync, &Control { id })?)?;
        let mut tarfile = tempfile::tempfile_in(&sandbox.state_dir)
            .with_context(|| format!("creating a temporary file in {}", sandbox.state_dir.display()))?;
        let mut total = 0u64;
        let mut last_seen = Instant::now();
        loop {
            if last_seen.elapsed() > SILENCE_LIMIT {
                bail!(
                    "the agent of VM {} was silent for {SILENCE_LIMIT:?} while sending the workspace",
                    sandbox.name
                );
            }
            let Some(f) = ch.recv(Duration::from_millis(200))? else { continue };
            match f.kind {
                Kind::SyncData => {
                    let (fid, data) = f.split_data()?;
                    if fid != id {
                        continue;
                    }
                    last_seen = Instant::now();
                    total += data.len() as u64;
                    if total > limit {
                        bail!("VM {} sent more than {limit} bytes of workspace", sandbox.name);
                    }
                    std::io::Write::write_all(&mut tarfile, data).context("buffering the workspace")?;
                }
                Kind::SyncEnd => {
                    let end: SyncEnd = f.parse()?;
                    if end.id == id {
                        break;
                    }
                }
                Kind::Error => {
                    let r: ErrorReport = f.parse()?;
                    if r.id == id {
                        bail!(
                            "the agent of VM {} could not send the workspace: {}",
                            sandbox.name,
                            printable(&r.message)
                        );
                    }
                }
                _ => {}
            }
        }
        std::io::Seek::rewind(&mut tarfile).context("rewinding the workspace tar")?;
        unpack_workspace(tarfile, workspace)
    }

    fn teardown(&self, sandbox: &SandboxRecord) -> Result<()> {
        if let Ok(det) = Self::details(sandbox) {
            drop(self.take_idle(sandbox, &det.socket));
        }
        if let Some(pid) = sandbox.pid {
            kill_vm(pid, &sandbox.name);
        }
        cgroup::Cgroup::remove(&sandbox.name);
        if let Some(n) = Self::details(sandbox).ok().and_then(|d| d.network) {
            net::teardown(&self.opts, &n)?;
        }
        // Only a directory of ours: the record could have been altered.
        if sandbox.state_dir.join(MARKER).is_file()
            && sandbox.state_dir.starts_with(self.opts.sandboxes_dir())
        {
            fs::remove_dir_all(&sandbox.state_dir)
                .with_context(|| format!("removing {}", sandbox.state_dir.display()))?;
        }
        Ok(())
    }

    fn janitor(&self, prefix: &str, live: &HashSet<String>) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let want = format!("{prefix}-");
        if let Ok(procs) = fs::read_dir("/proc") {
            for e in procs.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
                let Ok(cmdline) = fs::read(e.path().join("cmdline")) else { continue };
                let args: Vec<String> =
                    cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
                if !args.first().is_some_and(|a| a.ends_with(QEMU)) {
                    continue;
                }
                if let Some(name) = args.windows(2).find(|w| w[0] == "-name").map(|w| w[1].clone()) {
                    // Only VMs of this state directory: QEMU processes are host-wide, and another
                    // executor's (or another state directory's) VMs are not ours to judge.
                    let ours = self.opts.sandboxes_dir().join(&name).exists();
                    if name.starts_with(&want) && !live.contains(&name) && ours {
                        kill_vm(pid, &name);
                        cgroup::Cgroup::remove(&name);
                        removed.push(name);
                    }
                }
            }
        }
        if let Ok(dirs) = fs::read_dir(self.opts.sandboxes_dir()) {
            for e in dirs.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&want) && !live.contains(&name) && e.path().join(MARKER).is_file() {
                    fs::remove_dir_all(e.path())
                        .with_context(|| format!("removing {}", e.path().display()))?;
                    cgroup::Cgroup::remove(&name);
                    if !removed.contains(&name) {
                        removed.push(name);
                    }
                }
            }
        }
        // Networks of VMs that are gone (a TAP goes with its QEMU; the slot and element stay).
        let owned = |n: &str| n.starts_with(&want) && !live.contains(n);
        for name in crate::network::janitor(&self.opts.state_dir, owned)? {
            if !removed.contains(&name) {
                removed.push(name);
            }
        }
        Ok(removed)
    }
}

/// Replaces the workspace's contents with the tar the guest sent. The tar is hostile: only
/// regular files, directories and symlinks are taken (no device nodes, no FIFOs), each through
/// `unpack_in`, which refuses paths that leave the workspace (`..`, absolute, or through a
/// symlink), and their modes lose setuid, setgid and sticky bits.
pub fn unpack_workspace(tarfile: fs::File, workspace: &Path) -> Result<()> {
    for e in fs::read_dir(workspace).with_context(|| format!("listing {}", workspace.display()))?.flatten() {
        let p = e.path();
        let res = if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        res.with_context(|| format!("clearing {}", p.display()))?;
    }
    let mut ar = tar::Archive::new(tarfile);
    ar.set_preserve_permissions(true);
    // Modes come back without setuid, setgid or sticky bits: the guest's root made these files,
    // and on the host they are root's.
    ar.set_mask(0o7000);
    ar.set_preserve_ownerships(false);
    ar.set_unpack_xattrs(false);
    ar.set_overwrite(true);
    for entry in ar.entries().context("reading the workspace tar from the VM")? {
        let mut entry = entry.context("reading the workspace tar from the VM")?;
        let t = entry.header().entry_type();
        if !(t.is_file() || t.is_dir() || t.is_symlink()) {
            continue;
        }
        let path = entry.path().map(|p| p.display().to_string()).unwrap_or_default();
        let inside = entry.unpack_in(workspace).with_context(|| format!("unpacking {path} from the VM"))?;
        if !inside {
            bail!("the VM's workspace holds {path:?}, which leaves the workspace");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finding 8 of the security review: the workspace copied back from a guest kept setuid and
    /// setgid bits on what are, on the host, root-owned files.
    #[test]
    fn workspace_from_a_guest_loses_special_modes_and_devices() {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |path: &str, kind: tar::EntryType, mode: u32, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(data.len() as u64);
            h.set_uid(0);
            h.set_gid(0);
            b.append_data(&mut h, path, data).unwrap();
        };
        add("suid", tar::EntryType::Regular, 0o4755, b"#!/bin/sh\n");
        add("sgid-dir", tar::EntryType::Directory, 0o3775, b"");
        add("sgid-dir/f", tar::EntryType::Regular, 0o2777, b"x");
        add("null", tar::EntryType::Char, 0o666, b"");
        let bytes = b.into_inner().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &bytes).unwrap();
        std::io::Seek::rewind(&mut f).unwrap();
        let ws = tempfile::tempdir().unwrap();
        unpack_workspace(f, ws.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &str| fs::symlink_metadata(ws.path().join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("suid"), 0o755);
        assert_eq!(mode("sgid-dir"), 0o775);
        assert_eq!(mode("sgid-dir/f"), 0o777);
        assert!(!ws.path().join("null").exists(), "no device node comes back");
    }

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

    #[test]
    fn kernel_cmdline_carries_the_boot_parameters() {
        let l = kernel_cmdline(2, 1, false, Some(1_996_250));
        for p in ["console=ttyS0", " quiet", "panic=-1", "reboot=t", "tsc=reliable", "no_timer_check"] {
            assert!(l.contains(p), "{p} missing from {l}");
        }
        assert!(l.contains("tsc_early_khz=1996250") && l.contains("cryptomgr.notests"), "{l}");
        assert!(l.ends_with("executor.images=2 executor.workspace=1"), "{l}");
        let d = kernel_cmdline(0, 0, true, None);
        assert!(kernel_cmdline(1, 2, false, None).ends_with("executor.workspace=2"));
        assert!(
            !d.contains("quiet") && !d.contains("tsc_early_khz") && d.ends_with("executor.debug=1"),
            "{d}"
        );
        // Nothing for init: the agent binary is /init and takes no arguments from the kernel.
        assert!(!l.contains(" -- "), "{l}");
    }

    #[test]
    fn accel_parses_and_prints() {
        for a in [Accel::Auto, Accel::Kvm, Accel::Tcg] {
            assert_eq!(a.to_string().parse::<Accel>().unwrap(), a);
        }
        assert!("hvf".parse::<Accel>().is_err());
    }

    #[test]
    fn hostile_workspace_tar_cannot_escape() {
        let ws = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(ws.path().join("old"), "x").unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "link", outside.path()).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(4);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "link/evil", &b"evil"[..]).unwrap();
        let bytes = b.into_inner().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &bytes).unwrap();
        std::io::Seek::rewind(&mut f).unwrap();
        let res = unpack_workspace(f, ws.path());
        assert!(res.is_err() || !outside.path().join("evil").exists());
        assert!(!outside.path().join("evil").exists());
        assert!(!ws.path().join("old").exists());
    }

    #[test]
    fn printable_strips_control_and_bounds() {
        let s = format!("a\x1b[31mb\n{}", "x".repeat(1000));
        let p = printable(&s);
        assert!(!p.contains('\x1b') && !p.contains('\n'));
        assert_eq!(p.chars().count(), 500);
    }
}
