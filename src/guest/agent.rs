//! The guest agent: the `executor-guest-agent` binary as PID 1 (`/init`) of the microVM. It mounts
//! the guest's filesystems, loads the virtio modules, mounts the workspace disk at /data and the
//! image disks read-only, then serves the host over the virtio-serial port (see `protocol`).

use anyhow::{bail, Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::boot::WorkspaceMount;
use super::devices::{debug_time, load_modules, uptime_ms, wait_for, MODULES_LATE, MODULES_ORDER};
use super::protocol::*;
use super::root::{keep_layer, kept_root, pump, send, step_base, step_root, Port};

/// The loader of the late modules, joined by the first step that needs them.
static LATE: Mutex<Option<thread::JoinHandle<Result<()>>>> = Mutex::new(None);

/// Starts loading the late modules, once.
fn start_late_modules() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let t = uptime_ms();
        let h = thread::spawn(move || {
            // The job's network, if the host gave one (guest/net.rs), before the first step.
            let res = load_modules(MODULES_LATE).and_then(|()| super::net::configure());
            debug_time("late modules loaded", t);
            res
        });
        *LATE.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
    });
}

/// Waits for the late modules (started if the host never said hello, which cannot happen).
fn late_modules_loaded() -> Result<()> {
    start_late_modules();
    let handle = LATE.lock().unwrap_or_else(|p| p.into_inner()).take();
    match handle {
        Some(h) => h.join().map_err(|_| anyhow::anyhow!("loading the late modules panicked"))?,
        None => Ok(()),
    }
}

fn mount_fs(src: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) -> Result<()> {
    fs::create_dir_all(target).with_context(|| format!("creating {target}"))?;
    mount(Some(src), target, Some(fstype), flags, data)
        .with_context(|| format!("mounting {fstype} on {target}"))
}

fn find_port() -> Option<PathBuf> {
    for e in fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let name = fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if name.trim() == PORT_NAME {
            let dev = Path::new("/dev").join(e.file_name());
            if dev.exists() {
                return Some(dev);
            }
        }
    }
    None
}

fn find_disk(serial: &str) -> Option<PathBuf> {
    for e in fs::read_dir("/sys/block").ok()?.flatten() {
        let s = fs::read_to_string(e.path().join("serial")).unwrap_or_default();
        if s.trim() == serial {
            let dev = Path::new("/dev").join(e.file_name());
            if dev.exists() {
                return Some(dev);
            }
        }
    }
    None
}

/// Everything before serving: filesystems, modules, devices, disks. Returns the number of images
/// and whether the workspace disk waits for the host's `Mount` (a VM booted ahead of its job:
/// `executor.workspace=2`).
fn setup() -> Result<(u32, bool, bool)> {
    mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, None)?;
    mount_fs("proc", "/proc", "proc", MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC, None)?;
    mount_fs("sysfs", "/sys", "sysfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC, None)?;
    mount_fs("tmpfs", "/run", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"))?;
    mount_fs("tmpfs", "/tmp", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777"))?;
    // After /proc: the parameters are read once, and kept.
    let params = super::boot::current()?;
    let t = uptime_ms();
    load_modules(MODULES_ORDER)?;
    debug_time("modules loaded", t);
    let images = params.images;
    if params.workspace == WorkspaceMount::AtBoot {
        let dev = wait_for("the workspace disk", Duration::from_secs(30), || find_disk("workspace"))?;
        mount_fs(&dev.to_string_lossy(), "/data", "ext4", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, None)?;
    } else {
        fs::create_dir_all("/data").context("creating /data")?;
    }
    let deferred = params.workspace == WorkspaceMount::OnRequest;
    debug_time("workspace mounted", t);
    for i in 0..images {
        let dev = wait_for("an image disk", Duration::from_secs(30), || find_disk(&format!("image{i}")))?;
        mount_fs(
            &dev.to_string_lossy(),
            &format!("/images/{i}"),
            "ext4",
            MsFlags::MS_RDONLY,
            Some("noload"),
        )?;
    }
    // A cold-booted VM's own machine id; a template's is replaced by the host's `Reseed` in
    // each VM restored from it.
    super::identity::set_machine_id(&super::identity::new_machine_id()?)?;
    Ok((images, deferred, params.template))
}

/// Mounts the workspace disk of a VM booted ahead of its job at /data: the host wrote the job's
/// filesystem into the disk after the guest probed it, so the blocks the kernel read then are
/// dropped first.
fn mount_deferred_workspace() -> Result<()> {
    let dev = wait_for("the workspace disk", Duration::from_secs(10), || find_disk("workspace"))?;
    let f = File::open(&dev).with_context(|| format!("opening {}", dev.display()))?;
    crate::base::sys::flush_block_buffers(&f)
        .with_context(|| format!("dropping the cached blocks of {}", dev.display()))?;
    drop(f);
    mount_fs(&dev.to_string_lossy(), "/data", "ext4", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, None)
}

/// The entry point of `executor-guest-agent`, which runs only as PID 1 (arguments the kernel
/// passes to init are ignored).
pub fn main() -> i32 {
    // The agent's lines go to the guest's console, which the host keeps as the VM's log.
    crate::base::log::init_plain("executor-guest-agent");
    if std::process::id() != 1 {
        tracing::error!("runs only as PID 1 inside a microVM");
        return 2;
    }
    match run() {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            power_off()
        }
    }
}

/// The agent's main function, as PID 1 of the guest. It never returns normally: it powers off.
fn run() -> Result<i32> {
    let start_ms = uptime_ms();
    let (images, deferred, template) = match setup() {
        Ok(n) => n,
        Err(e) => {
            tracing::error!("{e:#}");
            power_off();
        }
    };
    let port_path = match wait_for("the agent port", Duration::from_secs(30), find_port) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("{e:#}");
            power_off();
        }
    };
    let ready_ms = uptime_ms();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&port_path)
        .with_context(|| format!("opening {}", port_path.display()))?;
    let reader = file.try_clone().context("duplicating the agent port")?;
    let port: Port = Arc::new(Mutex::new(file));
    let (tx, rx) = mpsc::channel::<Frame>();
    thread::spawn(move || read_loop(reader, tx));
    // A hello nobody asked for (nonce 0): should what the host sent before this port was open be
    // lost, this tells it to say its hello again now rather than at its next resend. Its own
    // thread: a write waits while no host is connected.
    let announce = Hello { version: PROTOCOL_VERSION, nonce: 0, start_ms, ready_ms };
    if let Ok(f) = Frame::json(Kind::Hello, &announce) {
        let port = port.clone();
        thread::spawn(move || send(&port, &f));
    }
    let mut agent = Agent {
        port,
        images,
        start_ms,
        ready_ms,
        running: None,
        workspace_pending: deferred,
        reseed_pending: template,
    };
    for frame in rx {
        agent.handle(frame);
    }
    power_off();
}

fn read_loop(file: File, tx: mpsc::Sender<Frame>) {
    loop {
        // A fresh decoder per connection: a half frame from a host that went away is dropped.
        let mut r = FrameReader::new(&file);
        loop {
            match r.read_frame() {
                Ok(Some(f)) => {
                    if tx.send(f).is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::error!("{e:#}");
                    break;
                }
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
}

struct Running {
    id: u32,
    canceled: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    /// The request's standard input ([`RunRequest::stdin`]): each `Stdin` frame's bytes, an
    /// empty one closing it.
    stdin: Option<mpsc::Sender<Vec<u8>>>,
}

struct Agent {
    port: Port,
    images: u32,
    start_ms: u64,
    ready_ms: u64,
    running: Option<Running>,
    /// The workspace disk waits for the host's `Mount`; requests that need /data are refused
    /// until then.
    workspace_pending: bool,
    /// A VM of a snapshot template (`executor.template=1`): its RNG state, clock and machine id
    /// are the snapshot's until the host's `Reseed`; `Mount` and `Run` are refused until then.
    reseed_pending: bool,
}

impl Agent {
    fn busy(&self) -> bool {
        self.running.as_ref().is_some_and(|r| !r.done.load(Ordering::SeqCst))
    }

    fn error(&self, id: u32, message: String) {
        if let Ok(f) = Frame::json(Kind::Error, &ErrorReport { id, message }) {
            send(&self.port, &f);
        }
    }

    fn handle(&mut self, frame: Frame) {
        match frame.kind {
            Kind::Hello => {
                let Ok(h) = frame.parse::<Hello>() else { return };
                let reply = Hello {
                    version: PROTOCOL_VERSION,
                    nonce: h.nonce,
                    start_ms: self.start_ms,
                    ready_ms: self.ready_ms,
                };
                if let Ok(f) = Frame::json(Kind::Hello, &reply) {
                    send(&self.port, &f);
                }
                // The host has its answer: what only steps need loads while it goes on.
                start_late_modules();
            }
            Kind::Reseed => {
                let Ok(r) = frame.parse::<Reseed>() else { return };
                if self.busy() {
                    return self.error(r.id, "another request is running".into());
                }
                // Entropy, clock and machine id first; then the VM's own address, once the
                // template's device (loaded with the late modules) is there.
                let res = super::identity::reseed(&r).and_then(|()| match &r.net {
                    Some(net) => late_modules_loaded().and_then(|()| super::net::readdress(net)),
                    None => Ok(()),
                });
                match res {
                    Ok(()) => {
                        self.reseed_pending = false;
                        if let Ok(f) = Frame::json(Kind::Reseeded, &Control { id: r.id }) {
                            send(&self.port, &f);
                        }
                    }
                    Err(e) => self.error(r.id, format!("reseeding the VM: {e:#}")),
                }
            }
            Kind::Mount => {
                let Ok(c) = frame.parse::<Control>() else { return };
                if self.reseed_pending {
                    return self.error(c.id, "the VM was not reseeded after its restore".into());
                }
                if !self.workspace_pending {
                    return self.error(c.id, "no workspace disk waits to be mounted".into());
                }
                if self.busy() {
                    return self.error(c.id, "another request is running".into());
                }
                let t = uptime_ms();
                match mount_deferred_workspace() {
                    Ok(()) => {
                        self.workspace_pending = false;
                        debug_time("workspace mounted on request", t);
                        if let Ok(f) = Frame::json(Kind::Mounted, &Control { id: c.id }) {
                            send(&self.port, &f);
                        }
                    }
                    Err(e) => self.error(c.id, format!("mounting the workspace: {e:#}")),
                }
            }
            Kind::Run => {
                let req = match frame.parse::<RunRequest>() {
                    Ok(r) => r,
                    Err(e) => return self.error(0, format!("{e:#}")),
                };
                if self.reseed_pending {
                    return self.error(req.id, "the VM was not reseeded after its restore".into());
                }
                if self.workspace_pending {
                    return self.error(req.id, "the workspace is not mounted yet".into());
                }
                if self.busy() {
                    return self.error(req.id, "another request is running".into());
                }
                if req.image != u32::MAX && req.image >= self.images {
                    return self.error(req.id, format!("no image disk {}", req.image));
                }
                reap();
                let canceled = Arc::new(AtomicBool::new(false));
                let done = Arc::new(AtomicBool::new(false));
                let (stdin, input) = match req.stdin {
                    true => {
                        let (tx, rx) = mpsc::channel();
                        (Some(tx), Some(rx))
                    }
                    false => (None, None),
                };
                self.running =
                    Some(Running { id: req.id, canceled: canceled.clone(), done: done.clone(), stdin });
                let port = self.port.clone();
                thread::spawn(move || {
                    let id = req.id;
                    let frame = match run_step(&port, req, input, &canceled) {
                        Ok(report) => Frame::json(Kind::Exit, &report),
                        Err(e) => Frame::json(Kind::Error, &ErrorReport { id, message: format!("{e:#}") }),
                    };
                    // Free before answering: the host sends its next request as soon as it reads this.
                    done.store(true, Ordering::SeqCst);
                    if let Ok(f) = frame {
                        send(&port, &f);
                    }
                });
            }
            Kind::Stdin => {
                let Ok((id, bytes)) = frame.split_data() else { return };
                if let Some(r) = &self.running {
                    if let (true, Some(tx)) = (r.id == id, &r.stdin) {
                        let _ = tx.send(bytes.to_vec());
                    }
                }
            }
            Kind::Cancel => {
                let Ok(c) = frame.parse::<Control>() else { return };
                if let Some(r) = &self.running {
                    if r.id == c.id && !r.done.load(Ordering::SeqCst) {
                        r.canceled.store(true, Ordering::SeqCst);
                        kill_all();
                    }
                }
            }
            Kind::Sync => {
                let Ok(c) = frame.parse::<SyncRequest>() else { return };
                if self.workspace_pending {
                    return self.error(c.id, "the workspace is not mounted yet".into());
                }
                if self.busy() {
                    return self.error(c.id, "a step is still running".into());
                }
                let done = Arc::new(AtomicBool::new(false));
                self.running = Some(Running {
                    id: c.id,
                    canceled: Arc::new(AtomicBool::new(false)),
                    done: done.clone(),
                    stdin: None,
                });
                let port = self.port.clone();
                thread::spawn(move || {
                    let frame = match sync_data(&port, c.id, c.caches_only) {
                        Ok(bytes) => Frame::json(Kind::SyncEnd, &SyncEnd { id: c.id, bytes }),
                        Err(e) => {
                            Frame::json(Kind::Error, &ErrorReport { id: c.id, message: format!("{e:#}") })
                        }
                    };
                    done.store(true, Ordering::SeqCst);
                    if let Ok(f) = frame {
                        send(&port, &f);
                    }
                });
            }
            Kind::Shutdown => {
                kill_all();
                power_off();
            }
            // Guest-to-host kinds coming the other way are ignored.
            _ => {}
        }
    }
}

/// Kills every process of the guest but the agent: the guest runs one job, so "every process
/// of the step" is everything else. Kernel threads ignore the signal.
pub(crate) fn kill_all() {
    let Ok(dir) = fs::read_dir("/proc") else { return };
    for e in dir.flatten() {
        if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
            if pid > 1 {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// Collects orphans that were re-parented to the agent (PID 1).
pub(crate) fn reap() {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    while let Ok(s) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if s == WaitStatus::StillAlive {
            break;
        }
    }
}

/// Unmounts a step's root and removes its layer.
fn drop_step_root(root: &Path) {
    unmount_step_root(root);
    // The layer's directory was a mount point only in the step's /data, gone with it.
    if let Some(base) = root.parent() {
        let _ = fs::remove_dir_all(base);
    }
}

/// Unmounts a step's root, its layer left as it is.
fn unmount_step_root(root: &Path) {
    // What the step's engine mounted below its root (its containers' layers) goes first.
    super::engine::unmount_below(root);
    for d in ["dev/pts", "tmp", "dev", "sys", "proc", "data", ""] {
        let _ = umount2(&root.join(d), MntFlags::MNT_DETACH);
    }
}

fn run_step(
    port: &Port,
    req: RunRequest,
    stdin: Option<mpsc::Receiver<Vec<u8>>>,
    canceled: &AtomicBool,
) -> Result<ExitReport> {
    let id = req.id;
    if req.image != u32::MAX {
        late_modules_loaded().context("loading the overlay module")?;
    }
    let kept = req.kept && req.image != u32::MAX && req.engine.is_none();
    let made = match &req.engine {
        _ if req.image == u32::MAX => Ok(None),
        Some(engine) => super::engine::engine_root(port, id, req.image, engine).map(Some),
        None if kept => kept_root(&format!("/images/{}", req.image)).map(Some),
        None => step_root(id, &format!("/images/{}", req.image)).map(Some),
    };
    // The job's caches, in a docker step's root (neither an engine's nor a debug shell's).
    let binds: &[CacheBind] = if req.engine.is_none() && !kept { &req.caches } else { &[] };
    let attaching = Instant::now();
    let made = match made {
        Ok(Some(r)) if !binds.is_empty() => match super::caches::bind(&r, binds) {
            Ok(()) => Ok(Some(r)),
            Err(e) => {
                super::caches::unbind(&r, binds);
                Err(e.context("attaching the job's caches"))
            }
        },
        other => other,
    };
    let caches_us = (!binds.is_empty()).then(|| attaching.elapsed().as_micros() as u64);
    let root = {
        match made {
            Ok(r) => r,
            Err(e) => {
                // Nothing of a half-made root stays (in /data it would go back to the host); the
                // kept layer does.
                if kept {
                    unmount_step_root(&Path::new("/data").join(KEPT_LAYER).join("root"));
                } else {
                    drop_step_root(&step_base(id).0.join("root"));
                }
                return Err(e);
            }
        }
    };
    if req.tty.is_some() {
        mount_ptys(root.as_deref())?;
    }
    let result = spawn_and_wait(port, &req, root.as_deref().unwrap_or(Path::new("/")), stdin, canceled)
        .map(|r| ExitReport { caches_us, ..r });
    if let Some(r) = &root {
        super::caches::unbind(r, binds);
        let failed = result.as_ref().is_ok_and(|e| e.code != Some(0) && !e.canceled);
        if kept {
            unmount_step_root(r);
        } else if req.keep_failed && req.engine.is_none() && failed && step_base(id).1 {
            // Kept for `executor debug` until the VM goes.
            unmount_step_root(r);
            if let Err(e) = keep_layer(&step_base(id).0) {
                tracing::error!("keeping the failed step's layer: {e:#}");
                drop_step_root(r);
            }
        } else {
            drop_step_root(r);
        }
    }
    result
}

/// The guest's pseudo-terminals (devpts at /dev/pts, mounted once), bound into a step's root.
fn mount_ptys(root: Option<&Path>) -> Result<()> {
    let pts = Path::new("/dev/pts");
    if !pts.join("ptmx").exists() {
        fs::create_dir_all(pts).context("creating /dev/pts")?;
        mount(
            Some("devpts"),
            pts,
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("ptmxmode=0666,mode=0620"),
        )
        .context("mounting /dev/pts")?;
    }
    let Some(root) = root else { return Ok(()) };
    let inside = root.join("dev/pts");
    fs::create_dir_all(&inside).context("creating /dev/pts in the step's root")?;
    mount(Some(pts), &inside, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .context("binding /dev/pts into the step's root")
}

fn spawn_and_wait(
    port: &Port,
    req: &RunRequest,
    root: &Path,
    stdin: Option<mpsc::Receiver<Vec<u8>>>,
    canceled: &AtomicBool,
) -> Result<ExitReport> {
    let Some((program, args)) = req.argv.split_first() else { bail!("the step has an empty command") };
    let mut cmd = crate::base::proc::command(program);
    cmd.args(args);
    crate::base::sys::enter_root(&mut cmd, root, &req.cwd).context("the step's root or directory")?;
    if let Some(u) = &req.user {
        // The image's user works in /data as under Docker's bind mount of a 0755 directory.
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions("/data", fs::Permissions::from_mode(0o755));
        crate::base::sys::switch_user(&mut cmd, u.uid, u.gid, &u.groups);
    }
    cmd.env_clear();
    for kv in &req.env {
        if let Some((k, v)) = kv.split_once('=') {
            if !k.is_empty() {
                cmd.env(k, v);
            }
        }
    }
    // On a terminal: the pty's far end as all three streams and the controlling terminal, its
    // near end read as the output and written with the input.
    let pty = match req.tty {
        Some(size) => {
            let ws = nix::pty::Winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 };
            let p = nix::pty::openpty(Some(&ws), None).context("opening a terminal")?;
            let far = |fd: &std::os::fd::OwnedFd| {
                fd.try_clone().map(Stdio::from).context("duplicating the terminal")
            };
            cmd.stdin(far(&p.slave)?).stdout(far(&p.slave)?).stderr(far(&p.slave)?);
            crate::base::sys::controlling_terminal(&mut cmd);
            Some(File::from(p.master))
        }
        None => {
            let input = if stdin.is_some() { Stdio::piped() } else { Stdio::null() };
            cmd.stdin(input).stdout(Stdio::piped()).stderr(Stdio::piped());
            None
        }
    };
    let spawned = cmd.spawn();
    // The parent's copies of the terminal's far end close: its near end reads EOF once the step's
    // processes are gone.
    drop(cmd);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            // As a shell says it: on the step's stderr, with status 127.
            let msg = format!("executor-guest-agent: cannot start {program} in {}: {e}\n", req.cwd);
            send(port, &Frame::data(Kind::Stderr, req.id, msg.as_bytes()));
            return Ok(ExitReport {
                id: req.id,
                code: Some(127),
                signal: None,
                canceled: false,
                caches_us: None,
            });
        }
    };
    let input: Option<Box<dyn Write + Send>> = match (&pty, child.stdin.take()) {
        (Some(t), _) => Some(Box::new(t.try_clone().context("duplicating the terminal")?)),
        (None, Some(i)) => Some(Box::new(i)),
        (None, None) => None,
    };
    if let (Some(mut w), Some(rx)) = (input, stdin) {
        // Detached: it ends with the request's input (an empty frame, or the next request).
        thread::spawn(move || {
            for bytes in rx {
                if bytes.is_empty() || w.write_all(&bytes).and_then(|_| w.flush()).is_err() {
                    return;
                }
            }
        });
    }
    let out = match pty {
        Some(t) => {
            let (p, id) = (port.clone(), req.id);
            Some(thread::spawn(move || pump(p, id, Kind::Stdout, t)))
        }
        None => child.stdout.take().map(|o| {
            let p = port.clone();
            let id = req.id;
            thread::spawn(move || pump(p, id, Kind::Stdout, o))
        }),
    };
    let err = child.stderr.take().map(|o| {
        let p = port.clone();
        let id = req.id;
        thread::spawn(move || pump(p, id, Kind::Stderr, o))
    });
    let (stop_ticker, ticks) = mpsc::channel::<()>();
    let ticker = {
        let (p, id) = (port.clone(), req.id);
        thread::spawn(move || loop {
            send(&p, &Frame::data(Kind::Alive, id, b""));
            if ticks.recv_timeout(Duration::from_secs(1)) != Err(mpsc::RecvTimeoutError::Timeout) {
                return;
            }
        })
    };
    let status = child.wait().context("waiting for the step");
    // What the step left running dies with it, so that its pipes close and nothing outlives it.
    kill_all();
    for t in [out, err].into_iter().flatten() {
        let _ = t.join();
    }
    drop(stop_ticker);
    let _ = ticker.join();
    reap();
    let status = status?;
    Ok(ExitReport {
        id: req.id,
        code: status.code(),
        signal: status.signal(),
        canceled: canceled.load(Ordering::SeqCst),
        caches_us: None,
    })
}

/// Streams a tar of /data (or only of its cache layers) to the host in `SyncData` frames, after
/// flushing the disk.
fn sync_data(port: &Port, id: u32, caches_only: bool) -> Result<u64> {
    nix::unistd::sync();
    struct Chunker<'a> {
        port: &'a Port,
        id: u32,
        buf: Vec<u8>,
        total: u64,
    }
    impl Write for Chunker<'_> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.buf.extend_from_slice(b);
            while self.buf.len() >= MAX_CHUNK {
                let rest = self.buf.split_off(MAX_CHUNK);
                send(self.port, &Frame::data(Kind::SyncData, self.id, &self.buf));
                self.total += self.buf.len() as u64;
                self.buf = rest;
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            if !self.buf.is_empty() {
                send(self.port, &Frame::data(Kind::SyncData, self.id, &self.buf));
                self.total += self.buf.len() as u64;
                self.buf.clear();
            }
            Ok(())
        }
    }
    let mut chunker = Chunker { port, id, buf: Vec::new(), total: 0 };
    {
        let mut tar = tar::Builder::new(&mut chunker);
        tar.follow_symlinks(false);
        for e in fs::read_dir("/data").context("listing /data")?.flatten() {
            let name = e.file_name();
            // The kept layer (a failed step's, for `executor debug`) stays in the VM.
            if name == "lost+found" || name == KEPT_LAYER {
                continue;
            }
            let path = e.path();
            let dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
            let layer = dir && name.to_string_lossy().starts_with(CACHE_LAYER_PREFIX);
            if layer {
                super::caches::append_layer(&mut tar, Path::new(&name), &path)?;
            } else if caches_only {
                continue;
            } else if dir {
                tar.append_dir_all(&name, &path).with_context(|| format!("packing {}", path.display()))?;
            } else {
                tar.append_path_with_name(&path, &name)
                    .with_context(|| format!("packing {}", path.display()))?;
            }
        }
        tar.finish().context("finishing the workspace tar")?;
    }
    chunker.flush().context("sending the workspace")?;
    Ok(chunker.total)
}

fn power_off() -> ! {
    nix::unistd::sync();
    let _ = umount2("/data", MntFlags::MNT_DETACH);
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    std::process::exit(1)
}
