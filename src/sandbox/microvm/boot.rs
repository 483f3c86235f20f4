//! Booting one microVM, as a sequence of named steps ([`MicroVm::boot_in`]): build the disks,
//! make the job's network, hand the sandbox to QEMU's user, build QEMU's command line
//! (qemu.rs) and start it, put it in its cgroup, and wait for the agent's hello. A boot that
//! fails anywhere is torn down whole (`boot_vm`); one whose agent never said hello is tried once
//! more (`boot_retrying`).

use anyhow::{bail, Context, Result};
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::channel::Channel;
use super::jail::{self, QemuUser};
use super::qemu::{QemuConfig, AGENT_SOCKET, QEMU, WORKSPACE_DISK};
use super::snapshot::Snapshot;
use super::{cgroup, console, disk, net, Accel, ImageDisk, MicroVm, VmDetails, MARKER};
use super::{DEFAULT_MEMORY, QEMU_OVERHEAD};
use crate::guest::boot::{BootParams, WorkspaceMount};
use crate::sandbox::{Limits, RecordDetails, Runtime, RuntimeKind, SandboxRecord};

/// What one VM boot needs besides its name.
#[derive(Clone)]
pub(super) struct VmBoot<'a> {
    pub workspace: Option<&'a Path>,
    pub images: &'a [String],
    pub accel: Accel,
    pub accel_reason: String,
    pub limits: &'a Limits,
    pub timeout: Duration,
    /// A VM booted ahead of its job (`pool`): a blank workspace disk of this many bytes, which
    /// the agent mounts only when told, once the host wrote the job's filesystem into it.
    pub pool_disk_bytes: Option<u64>,
    /// The job's network, if it has one (net.rs).
    pub network: Option<net::NetRequest<'a>>,
    /// Disks attached after the images' (a cliSteps VM's engine and src, engine.rs).
    pub extra_disks: Vec<ImageDisk>,
    /// A snapshot template (snapshot.rs): booted with `executor.template=1` and a QMP monitor.
    pub template: bool,
    /// Restore this snapshot instead of booting: the template's command line, its stream fed
    /// through `-incoming`, its RAM mapped copy-on-write, then the agent reseeded.
    pub restore: Option<&'a Snapshot>,
    /// A template's RAM (snapshot/ram.rs), which the template writes into.
    pub template_ram: Option<std::sync::Arc<OwnedFd>>,
}

impl<'a> VmBoot<'a> {
    /// The same boot with the job's network.
    pub(super) fn with_network(mut self, network: Option<net::NetRequest<'a>>) -> Self {
        self.network = network;
        self
    }

    /// The same boot with more read-only disks after the images'.
    pub(super) fn with_extra_disks(mut self, disks: Vec<ImageDisk>) -> Self {
        self.extra_disks = disks;
        self
    }

    pub(super) fn new(
        workspace: Option<&'a Path>,
        images: &'a [String],
        accel: Accel,
        accel_reason: String,
        limits: &'a Limits,
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
            extra_disks: Vec::new(),
            template: false,
            restore: None,
            template_ram: None,
        }
    }

    /// What the guest does with its workspace disk.
    fn workspace_mount(&self) -> WorkspaceMount {
        match (self.workspace.is_some(), self.pool_disk_bytes.is_some()) {
            (true, _) => WorkspaceMount::AtBoot,
            (false, true) => WorkspaceMount::OnRequest,
            (false, false) => WorkspaceMount::None,
        }
    }

    /// The guest's CPUs and memory.
    fn cpus(&self) -> u32 {
        if self.limits.cpus > 0 {
            self.limits.cpus
        } else {
            1
        }
    }

    pub(super) fn memory_bytes(&self) -> u64 {
        if self.limits.memory_bytes > 0 {
            self.limits.memory_bytes
        } else {
            DEFAULT_MEMORY
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

/// What QEMU is handed open; each stays open in the executor until QEMU has started.
struct Handles {
    kernel: fs::File,
    initrd: fs::File,
    /// The sandbox directory, QEMU's working directory.
    dir: fs::File,
    images: Vec<fs::File>,
    /// The console pipe's write end (console.rs).
    console: OwnedFd,
    /// The job network's TAP.
    net: Option<net::VmNet>,
    /// A restore's pipe (read end), its saved state coming through it.
    incoming: Option<OwnedFd>,
    /// The guest's RAM (a template's, or the snapshot's that a restore maps).
    ram: Option<std::sync::Arc<OwnedFd>>,
}

impl MicroVm {
    /// Boots a VM named `<prefix>-<uuid>`; when the agent channel breaks before the agent said
    /// hello (QEMU exited: the guest died during boot, seen under heavy load before
    /// `no_timer_check`; see docs/sandbox-microvm.md), that VM is torn down and one fresh VM is
    /// booted instead.
    pub(super) fn boot_retrying(&self, prefix: &str, boot: &VmBoot) -> Result<SandboxRecord> {
        let name = format!("{prefix}-{}", uuid::Uuid::new_v4());
        match self.boot_vm(&name, boot) {
            Err(e) if e.downcast_ref::<AgentSilent>().is_some() => {
                tracing::warn!("{e:#}; booting a fresh VM");
                let name = format!("{prefix}-{}", uuid::Uuid::new_v4());
                self.boot_vm(&name, boot)
            }
            other => other,
        }
    }

    /// Boots VM `name` in a new sandbox directory; on failure, whatever was made is torn down.
    pub(super) fn boot_vm(&self, name: &str, boot: &VmBoot) -> Result<SandboxRecord> {
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

    /// The boot's steps. `rec` records each thing made as soon as it exists, so that the
    /// teardown of a failed boot finds it.
    fn boot_in(&self, rec: &mut SandboxRecord, manifest: &crate::vm::Manifest, boot: &VmBoot) -> Result<()> {
        let t0 = Instant::now();
        let dir = rec.state_dir.clone();
        let mut det = VmDetails {
            accel: boot.accel,
            accel_reason: boot.accel_reason.clone(),
            socket: dir.join(AGENT_SOCKET),
            console: dir.join("console.log"),
            ..Default::default()
        };
        self.build_disks(&dir, boot, &mut det)?;
        if let Some(snap) = boot.restore {
            let disks: Vec<std::path::PathBuf> = det.images.iter().map(|i| i.disk.clone()).collect();
            super::snapshot::check_disks(snap, &disks)?;
        }
        det.phases.disk_build_ms = t0.elapsed().as_millis() as u64;
        let mut params = BootParams {
            images: det.images.len() as u32,
            workspace: boot.workspace_mount(),
            debug: std::env::var_os("EXECUTOR_VM_DEBUG").is_some(),
            tsc_khz: tsc_khz(),
            net: None,
            nic: false,
            // A restore gets the template's line: the guest is the template's.
            template: boot.template || boot.restore.is_some(),
        };
        let vm_net = self.make_network(rec, boot, &mut det)?;
        let guest_net = vm_net.as_ref().map(|v| net::guest_net(&v.net));
        if params.template {
            // One line for the template and every VM restored from it: the device only, each
            // VM's own address coming with its `Reseed`.
            params.nic = guest_net.is_some();
        } else {
            params.net = guest_net.clone();
        }
        let user = hand_to_qemu_user(&self.opts.state_dir, &rec.name, &dir, boot, &mut det)?;
        let (incoming, feed_end) = match boot.restore {
            Some(_) => {
                let (r, w) =
                    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("making the restore pipe")?;
                (Some(r), Some(fs::File::from(w)))
            }
            None => (None, None),
        };
        let mut handles = open_handles(manifest, &dir, &det, user.as_ref(), vm_net)?;
        handles.incoming = incoming;
        // A restore's stream and RAM are checked before QEMU starts.
        let stream = boot.restore.map(super::snapshot::stream).transpose()?;
        handles.ram = match boot.restore {
            Some(snap) => Some(super::snapshot::ram::load(snap)?),
            None => boot.template_ram.clone(),
        };
        let config = QemuConfig {
            name: rec.name.clone(),
            accel: boot.accel,
            memory_bytes: boot.memory_bytes(),
            cpus: boot.cpus(),
            kernel_fd: handles.kernel.as_raw_fd(),
            initrd_fd: handles.initrd.as_raw_fd(),
            cmdline: params.to_cmdline(),
            console_fd: handles.console.as_raw_fd(),
            workspace_disk: boot.workspace_mount() != WorkspaceMount::None,
            image_fds: handles.images.iter().map(|f| f.as_raw_fd()).collect(),
            tap_fd: handles.net.as_ref().map(|v| v.tap.as_raw_fd()),
            monitor: boot.template || boot.restore.is_some(),
            incoming_fd: handles.incoming.as_ref().map(|f| f.as_raw_fd()),
            ram: handles.ram.as_ref().map(|f| (f.as_raw_fd(), boot.restore.is_none())),
        };
        let incoming_fd = config.incoming_fd;
        let jail_root =
            user.as_ref().filter(|u| u.jailed).map(|_| jail::root_dir(&self.opts.state_dir)).transpose()?;
        let mut child = spawn_qemu(&dir, &config, handles, user.as_ref(), jail_root.as_deref(), boot.accel)?;
        let pid = child.id() as i32;
        rec.pid = Some(pid);
        det.store(rec);
        place_in_cgroup(&rec.name, pid, boot)?;
        if let (Some(snap), Some(stream), Some(to), Some(fd)) = (boot.restore, stream, feed_end, incoming_fd)
        {
            let t = Instant::now();
            start_incoming(&dir, fd).map_err(|e| qemu_failed(&dir, &mut child, e))?;
            super::snapshot::feed(&stream, to).map_err(|e| qemu_failed(&dir, &mut child, e))?;
            det.restored =
                Some(super::Restored { snapshot: snap.id.clone(), feed_ms: t.elapsed().as_millis() as u64 });
        }
        let mut ch = wait_for_agent(rec, &mut det, &mut child, boot.timeout)?;
        if boot.restore.is_some() {
            reseed(&rec.name, &mut ch, guest_net.as_ref())?;
        }
        det.phases.total_ms = t0.elapsed().as_millis() as u64;
        det.store(rec);
        self.keep_idle(rec, &det.socket, ch);
        Ok(())
    }

    /// Step 1, the disks: the workspace disk (the job's files, or blank for a VM booted ahead
    /// of its job) and each step image's read-only disk, built or reused.
    fn build_disks(&self, dir: &Path, boot: &VmBoot, det: &mut VmDetails) -> Result<()> {
        if let Some(ws) = boot.workspace {
            let used = disk::tree_bytes(ws)?;
            let size = if boot.limits.disk_bytes > 0 {
                boot.limits.disk_bytes.max(used + (64 << 20))
            } else {
                used * 2 + (1 << 30)
            };
            det.workspace_disk = dir.join(WORKSPACE_DISK);
            det.workspace_disk_bytes = size.next_multiple_of(1 << 20);
            disk::make_ext4(ws, &det.workspace_disk, det.workspace_disk_bytes, "workspace")?;
        } else if let Some(size) = boot.pool_disk_bytes {
            // Blank and sparse: the job's filesystem is written into this same file when a job
            // takes the VM (`pool::claim`), and the agent mounts it only then.
            det.workspace_disk = dir.join(WORKSPACE_DISK);
            det.workspace_disk_bytes = size.next_multiple_of(1 << 20);
            let f = fs::File::create(&det.workspace_disk)
                .with_context(|| format!("creating {}", det.workspace_disk.display()))?;
            f.set_len(det.workspace_disk_bytes)
                .with_context(|| format!("sizing {}", det.workspace_disk.display()))?;
        }
        for reference in boot.images {
            let (digest, d) = self.image_disk(reference)?;
            det.images.push(ImageDisk { reference: reference.clone(), digest, disk: d });
        }
        det.images.extend(boot.extra_disks.iter().cloned());
        Ok(())
    }

    /// The digest and read-only disk of image `reference`, the disk built if it is not yet.
    pub(super) fn image_disk(&self, reference: &str) -> Result<(String, std::path::PathBuf)> {
        let (digest, rootfs) = self.resolve_image(reference)?;
        let d = disk::image_disk(&self.vm_dir().join("images"), &digest, &rootfs)
            .with_context(|| format!("building the disk of image {reference}"))?;
        Ok((digest, d))
    }

    /// Step 2, the job's network (a TAP), recorded at once so that a failed boot's teardown
    /// removes it.
    fn make_network(
        &self,
        rec: &mut SandboxRecord,
        boot: &VmBoot,
        det: &mut VmDetails,
    ) -> Result<Option<net::VmNet>> {
        let vm_net = boot.network.as_ref().map(|r| net::setup(&self.opts, &rec.name, r)).transpose()?;
        if let Some(v) = &vm_net {
            det.network = Some(v.net.clone());
            det.store(rec);
        }
        Ok(vm_net)
    }
}

/// Step 3: QEMU runs as a uid of its own where the executor is root (jail.rs), which owns its
/// sandbox directory and its workspace disk; in its jail it reaches nothing of the host by path
/// but that directory.
fn hand_to_qemu_user(
    state_dir: &Path,
    name: &str,
    dir: &Path,
    boot: &VmBoot,
    det: &mut VmDetails,
) -> Result<Option<QemuUser>> {
    let user = jail::qemu_user(state_dir, name, boot.accel)?;
    if let Some(u) = &user {
        give_to(dir, u, 0o700)?;
        if boot.workspace_mount() != WorkspaceMount::None {
            give_to(&det.workspace_disk, u, 0o600)?;
        }
        det.qemu_user = Some(u.name.clone());
    }
    Ok(user)
}

/// Step 4: the kernel, the initramfs and the shared image disks are handed over as open
/// descriptors, read-only (the images through QEMU's fd sets so that their files need not be
/// readable by QEMU's user); the console goes through a pipe to a reader that keeps its first
/// `CONSOLE_CAP` bytes.
fn open_handles(
    manifest: &crate::vm::Manifest,
    dir: &Path,
    det: &VmDetails,
    user: Option<&QemuUser>,
    net: Option<net::VmNet>,
) -> Result<Handles> {
    let open_ro = |p: &Path| fs::File::open(p).with_context(|| format!("opening {} for QEMU", p.display()));
    let (kernel, initrd) = (open_ro(&manifest.vmlinux)?, open_ro(&manifest.initramfs)?);
    let dir = open_ro(dir)?;
    let images = det.images.iter().map(|i| open_ro(&i.disk)).collect::<Result<Vec<_>>>()?;
    let console = console::start(&det.console, console::CONSOLE_CAP, user.map(|u| (u.uid, u.gid)))?;
    Ok(Handles { kernel, initrd, dir, images, console, net, incoming: None, ram: None })
}

/// Starts a restored VM's incoming migration from descriptor `fd` over QMP, with shared RAM left
/// out of the stream as the template left it out (`-incoming defer`: a capability must be set
/// before the stream starts).
fn start_incoming(dir: &Path, fd: i32) -> Result<()> {
    use std::os::fd::AsRawFd;
    let handle = fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let sock = Path::new("/proc/self/fd").join(handle.as_raw_fd().to_string()).join(super::qemu::QMP_SOCKET);
    let t = Instant::now();
    let mut qmp = loop {
        match super::snapshot::Qmp::connect(&sock) {
            Ok(q) => break q,
            Err(_) if t.elapsed() < Duration::from_secs(30) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(e).context("reaching the restoring QEMU's monitor"),
        }
    };
    qmp.cmd("migrate-set-capabilities", super::snapshot::ignore_shared())?;
    qmp.cmd("migrate-incoming", serde_json::json!({"uri": format!("fd:{fd}")}))?;
    Ok(())
}

/// Step 5: starts QEMU in the sandbox directory, in its jail as its own user (jail.rs; with only
/// `no_new_privs` for an unprivileged executor), under its seccomp filter (`-sandbox`), in its
/// own process group (a signal to the executor's group does not reach the VM), keeping only the
/// handed-over descriptors; its output goes to `qemu.log`. The handles close here once QEMU has
/// them.
fn spawn_qemu(
    dir: &Path,
    config: &QemuConfig,
    handles: Handles,
    user: Option<&QemuUser>,
    jail_root: Option<&Path>,
    accel: Accel,
) -> Result<Child> {
    let mut cmd = crate::base::proc::command(QEMU);
    cmd.args(config.argv());
    let h = &handles;
    let mut keep: Vec<i32> = vec![h.kernel.as_raw_fd(), h.initrd.as_raw_fd(), h.console.as_raw_fd()];
    keep.extend(h.net.as_ref().map(|v| v.tap.as_raw_fd()));
    keep.extend(h.images.iter().map(|f| f.as_raw_fd()));
    keep.extend(h.incoming.as_ref().map(|f| f.as_raw_fd()));
    keep.extend(h.ram.as_ref().map(|f| f.as_raw_fd()));
    crate::base::sys::start_in_dir_keeping(&mut cmd, h.dir.as_raw_fd(), keep);
    match (user, jail_root) {
        (Some(u), Some(root)) => {
            let plan = jail::plan(root, dir, accel);
            crate::base::sys::jail(&mut cmd, &plan, u.uid, u.gid)
                .with_context(|| format!("preparing the jail of QEMU in {}", dir.display()))?;
        }
        (Some(u), None) => {
            std::os::unix::process::CommandExt::uid(&mut cmd, u.uid);
            std::os::unix::process::CommandExt::gid(&mut cmd, u.gid);
            crate::base::sys::no_new_privs(&mut cmd);
        }
        (None, _) => crate::base::sys::no_new_privs(&mut cmd),
    }
    let log =
        fs::File::create(dir.join("qemu.log")).with_context(|| format!("creating {}", dir.display()))?;
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = cmd.spawn().with_context(|| format!("starting {QEMU} (install qemu-system-x86)"))?;
    drop(handles);
    Ok(child)
}

/// Step 6: QEMU's cgroup, sized for the guest plus QEMU's own memory; a VM booted ahead of
/// demand yields the CPU to the VMs of running jobs.
fn place_in_cgroup(name: &str, pid: i32, boot: &VmBoot) -> Result<()> {
    let pids = if boot.limits.pids > 0 { boot.limits.pids } else { 256 };
    match cgroup::Cgroup::create(name, boot.memory_bytes() + QEMU_OVERHEAD, pids, boot.cpus()) {
        Ok(Some(cg)) => {
            cg.add(pid).with_context(|| format!("moving QEMU {pid} into its cgroup"))?;
            if boot.pool_disk_bytes.is_some() {
                cgroup::Cgroup::set_cpu_weight(name, true);
            }
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e.context(format!("creating the cgroup of VM {name}"))),
    }
}

/// Step 7: connects to the agent's socket and waits for its hello, recording the boot's phases;
/// the connection is the VM's first.
fn wait_for_agent(
    rec: &SandboxRecord,
    det: &mut VmDetails,
    child: &mut Child,
    timeout: Duration,
) -> Result<Channel> {
    let t_spawn = Instant::now();
    let qemu = &mut *child;
    let connected = Channel::connect_while(&det.socket, Duration::from_secs(10), || {
        !matches!(qemu.try_wait(), Ok(Some(_)))
    });
    let mut ch = connected.map_err(|e| qemu_failed(&rec.state_dir, child, e))?;
    det.phases.qemu_start_ms = t_spawn.elapsed().as_millis() as u64;
    let hello = ch
        .handshake(timeout)
        .context(AgentSilent { vm: rec.name.clone() })
        .map_err(|e| qemu_failed(&rec.state_dir, child, e))?;
    det.phases.kernel_boot_ms = hello.start_ms;
    det.phases.agent_ready_ms = hello.ready_ms.saturating_sub(hello.start_ms);
    Ok(ch)
}

/// Makes a restored VM its own before anything else reaches it: host entropy, clock, machine
/// id (guest/identity.rs) and its own network (guest/net.rs); its agent refuses any job until
/// this is done.
fn reseed(name: &str, ch: &mut Channel, net: Option<&crate::guest::boot::GuestNet>) -> Result<()> {
    use crate::guest::protocol::{ErrorReport, Frame, Kind};
    const ID: u32 = u32::MAX - 1;
    let r = crate::guest::identity::host_reseed(ID, net)?;
    ch.send(&Frame::json(Kind::Reseed, &r)?)?;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        let Some(f) = ch.recv(Duration::from_secs(30))? else { continue };
        match f.kind {
            Kind::Reseeded => return Ok(()),
            Kind::Error => {
                let e: ErrorReport = f.parse()?;
                if e.id == ID {
                    bail!("the agent of VM {name}: {}", super::printable(&e.message));
                }
            }
            _ => {}
        }
    }
    bail!("the agent of VM {name} did not confirm its reseed")
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
fn qemu_failed(dir: &Path, child: &mut Child, e: anyhow::Error) -> anyhow::Error {
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
        e = e.context(format!("guest console: {}", super::printable(&console)));
    }
    let log = file_tail(&dir.join("qemu.log"), 5);
    if !log.is_empty() {
        e = e.context(format!("qemu said: {}", super::printable(&log)));
    }
    e
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

/// Hands `path` to the QEMU user with `mode`: its sandbox directory and its workspace disk.
fn give_to(path: &Path, user: &QemuUser, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    nix::unistd::chown(path, Some(user.uid.into()), Some(user.gid.into()))
        .with_context(|| format!("giving {} to user {}", path.display(), user.name))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_is_told_what_to_do_with_its_workspace_disk() {
        let limits = Limits::default();
        let ws = Path::new("/tmp/ws");
        let b = VmBoot::new(Some(ws), &[], Accel::Tcg, String::new(), &limits, Duration::ZERO);
        assert_eq!(b.workspace_mount(), WorkspaceMount::AtBoot);
        let mut b = VmBoot::new(None, &[], Accel::Tcg, String::new(), &limits, Duration::ZERO);
        assert_eq!(b.workspace_mount(), WorkspaceMount::None);
        b.pool_disk_bytes = Some(1 << 30);
        assert_eq!(b.workspace_mount(), WorkspaceMount::OnRequest);
        assert_eq!((b.cpus(), b.memory_bytes()), (1, DEFAULT_MEMORY));
        let big = Limits { cpus: 4, memory_bytes: 2 << 30, disk_bytes: 0, pids: 0 };
        let b = VmBoot::new(None, &[], Accel::Tcg, String::new(), &big, Duration::ZERO);
        assert_eq!((b.cpus(), b.memory_bytes()), (4, 2 << 30));
    }
}
