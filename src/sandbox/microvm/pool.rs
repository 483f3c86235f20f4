//! A pool of microVMs booted ahead of demand (`EXECUTOR_VM_POOL_SIZE`), so that a job's VM is
//! already running when the job is dequeued: the boot (seconds under TCG) moves off the job's
//! path. Each VM serves exactly one job and is destroyed after it; none is ever reused.
//!
//! A pool VM boots with the step images of recent jobs as its read-only disks and a blank sparse
//! workspace disk that its agent does not mount (`executor.workspace=2`). A job that takes it has
//! its workspace filesystem written into that same disk file (QEMU holds it open; the guest has
//! not read it beyond the kernel's probe) and the agent, told with a `Mount` request over the
//! channel of the boot, drops the blocks it cached and mounts it at /data.
//!
//! A VM is keyed by everything that defines it ([`PoolKey`]): kernel, initramfs, accelerator,
//! limits, workspace disk size, network mode and the images by digest. VMs whose key is no longer
//! the current one (a new `install vm`, other limits, an image tag that moved) are discarded.
//! In network mode `internet` a pool VM boots with its own network (TAP, slot, firewall entry)
//! for the loop's coordinator; a job of another coordinator is a miss.
//!
//! Bounded: idle VMs count against the loop's memory budget ([`Budget`]); the pool is drained
//! (every VM killed) when the loop stops; its VMs carry a `pool-owner` file naming the executor,
//! whose pool lock (`sandboxes/pool-<executor>.lock`) is held while it lives, so that a janitor
//! reclaims the VMs of an executor that was killed ([`live_members`]).

use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::channel::Channel;
use super::{disk, AgentSilent, MicroVm, PoolClaim, VmBoot, VmDetails, DEFAULT_MEMORY, QEMU_OVERHEAD};
use crate::api::metrics;
use crate::guest::protocol::*;
use crate::sandbox::{BootRequest, Limits, RecordDetails, Runtime, RuntimeOptions, SandboxRecord};

/// The file in a pool VM's sandbox directory naming the executor that owns it (removed when a
/// job takes the VM: the job's workspace owner record names it from then on).
pub const OWNER_FILE: &str = "pool-owner";
/// Most step images a pool VM carries (the most recently used first).
const MAX_IMAGES: usize = 8;
/// What an idle pool VM is assumed to hold in memory before it is measured (QEMU's resident
/// memory after a boot under TCG was about 230 MiB with a 512 MiB guest; plus its console
/// reader).
pub const IDLE_ESTIMATE: u64 = 320 << 20;
/// The workspace disk of a pool VM when there is no disk limit (sparse: only what the job's
/// files use takes space). A job whose workspace needs more is a miss.
pub const DEFAULT_POOL_DISK: u64 = 4 << 30;
/// How long the agent may take to mount the workspace.
const MOUNT_LIMIT: Duration = Duration::from_secs(30);
/// The pause after a pool boot failed, before the next try.
const FAILURE_BACKOFF: Duration = Duration::from_secs(10);

/// A log line sink (the loop's).
pub type Log = Arc<dyn Fn(&str) + Send + Sync>;

/// Memory the loop may commit to VMs: running jobs at their full size (guest memory plus
/// QEMU's overhead), idle pool VMs at their measured resident memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Three quarters of the host's `MemAvailable` when the loop started.
    pub total_bytes: u64,
    /// What one job's VM may grow to.
    pub job_bytes: u64,
}

impl Budget {
    /// The budget of this host for VMs of `limits`.
    pub fn for_host(limits: &Limits) -> Result<Budget> {
        Ok(Budget { total_bytes: mem_available()? / 4 * 3, job_bytes: vm_bytes(limits) })
    }

    /// The pool size when `EXECUTOR_VM_POOL_SIZE` is not set: as many idle VMs (at
    /// [`IDLE_ESTIMATE`] each) as fit beside `max_jobs` running jobs at their full size, but no
    /// more than `max_jobs` (more jobs than that cannot start at once).
    pub fn default_pool_size(&self, max_jobs: usize) -> usize {
        let left = self.total_bytes.saturating_sub(self.job_bytes.saturating_mul(max_jobs as u64));
        ((left / IDLE_ESTIMATE) as usize).min(max_jobs)
    }
}

/// What one job's VM may use: guest memory plus QEMU's own (its cgroup's limit).
pub fn vm_bytes(limits: &Limits) -> u64 {
    (if limits.memory_bytes > 0 { limits.memory_bytes } else { DEFAULT_MEMORY }) + QEMU_OVERHEAD
}

fn mem_available() -> Result<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    info.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .context("/proc/meminfo has no MemAvailable line")
}

/// Everything that defines a pool VM but its images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseKey {
    pub kernel: String,
    pub initramfs: String,
    pub accel: String,
    pub limits: Limits,
    pub disk_bytes: u64,
    pub network: String,
}

/// Everything that defines a pool VM: a VM serves a job only when its base key is the current
/// one and it carries each of the job's images at the digest the image store resolves now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolKey {
    pub base: BaseKey,
    /// (reference, digest), sorted.
    pub images: Vec<(String, String)>,
}

impl PoolKey {
    /// Whether a VM of this key may serve a job that needs `images` (reference, digest) on a
    /// host whose current base key is `base`.
    pub fn serves(&self, base: &BaseKey, images: &[(String, String)]) -> bool {
        self.base == *base && images.iter().all(|i| self.images.contains(i))
    }
}

/// A file's identity for a key: path, size and modification time.
fn file_id(p: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(p) {
        Ok(m) => format!("{} {} {}.{}", p.display(), m.len(), m.mtime(), m.mtime_nsec()),
        Err(_) => format!("{} missing", p.display()),
    }
}

/// Settings of the pool.
#[derive(Clone)]
pub struct PoolSettings {
    /// How many idle VMs to keep.
    pub size: usize,
    /// `EXECUTOR_VM_PREFIX`: the VMs are named `<prefix>-<uuid>` like every VM of the runtime.
    pub prefix: String,
    /// The executor's name (the owner of the VMs).
    pub owner: String,
    pub limits: Limits,
    pub network: crate::network::Mode,
    /// The coordinator's URL, which a networked VM may reach: pool VMs of `internet` mode boot
    /// with their network (TAP, slot and firewall entry) already made for it.
    pub coordinator: Option<String>,
    pub budget: Budget,
    pub log: Log,
}

struct Member {
    rec: SandboxRecord,
    key: PoolKey,
    /// The connection of the boot, kept so that taking the VM needs no new hello.
    ch: Option<Channel>,
    ready_at: Instant,
}

#[derive(Default)]
struct State {
    ready: Vec<Member>,
    /// The name of the VM being booted.
    booting: Option<String>,
    /// Image references of recent jobs, most recent first.
    wanted: Vec<String>,
    stopped: bool,
    hits: u64,
    misses: u64,
}

/// The pool's state, as `executor loop` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStatus {
    pub size: usize,
    pub ready: usize,
    pub booting: usize,
    pub hits: u64,
    pub misses: u64,
    pub idle_bytes: u64,
}

impl std::fmt::Display for PoolStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VM pool: size {}, {} ready, {} booting ({} hits, {} misses, idle memory {})",
            self.size,
            self.ready,
            self.booting,
            self.hits,
            self.misses,
            crate::base::units::format_bytes(self.idle_bytes)
        )
    }
}

/// How a job's request for a VM ended.
pub enum Claim {
    /// A pool VM, its workspace mounted.
    Hit(Box<SandboxRecord>),
    /// The job boots its own VM, for this reason.
    Miss(String),
}

pub struct Pool {
    rt: MicroVm,
    cfg: PoolSettings,
    state: Mutex<State>,
    cv: Condvar,
    running_jobs: AtomicUsize,
    booter: Mutex<Option<std::thread::JoinHandle<()>>>,
    _lock: crate::base::lock::Held,
}

fn lock_path(sandboxes: &Path, owner: &str) -> PathBuf {
    let safe: String = owner
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect();
    sandboxes.join(format!("pool-{safe}.lock"))
}

fn wanted_path(state_dir: &Path) -> PathBuf {
    crate::vm::vm_dir(state_dir).join("pool-images.json")
}

/// The names of pool VMs (in `sandboxes`) whose owning executor still lives (holds its pool
/// lock): the janitor leaves them. The VMs of an executor that is gone are not listed, so the
/// janitor reclaims them like any VM no job owns; the dead executor's lock file goes too.
pub fn live_members(sandboxes: &Path) -> Result<HashSet<String>> {
    let mut live = HashSet::new();
    let rd = match std::fs::read_dir(sandboxes) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(live),
        Err(e) => return Err(e).with_context(|| format!("listing {}", sandboxes.display())),
    };
    let mut gone: Vec<(String, crate::base::lock::Held)> = Vec::new();
    let mut alive: HashSet<String> = HashSet::new();
    for e in rd.flatten() {
        let Some(owner) = read_owner_file(&e.path().join(OWNER_FILE)) else { continue };
        let owner = owner.trim().to_string();
        if alive.contains(&owner) {
            live.insert(e.file_name().to_string_lossy().into_owned());
            continue;
        }
        if gone.iter().any(|(o, _)| *o == owner) {
            continue;
        }
        match crate::base::lock::try_lock(&lock_path(sandboxes, &owner))? {
            Some(held) => gone.push((owner, held)),
            None => {
                alive.insert(owner);
                live.insert(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    for (owner, _held) in gone {
        let _ = std::fs::remove_file(lock_path(sandboxes, &owner));
    }
    Ok(live)
}

/// A pool VM's owner file: at most 256 bytes, never through a symlink (the directory belongs to
/// the VM's user).
fn read_owner_file(path: &Path) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut text = String::new();
    f.take(256).read_to_string(&mut text).ok()?;
    Some(text.trim().to_string())
}

/// Writes the job's workspace filesystem (`mkfs.ext4 -d`) into the pool VM's disk file, in place:
/// the same inode QEMU holds open, truncated and re-extended to the same size (the guest's disk
/// cannot change size). The file lives in a directory that belongs to the VM's (unprivileged)
/// user, who could have replaced it with a symlink or a hard link to a file of root's: it is
/// opened without following a symlink, must be a regular file with one link and the size it was
/// made with, and `mkfs` (run as root) gets that open file (`/proc/self/fd/N`), never the path.
fn write_disk_in_place(workspace: &Path, disk: &Path, size: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(disk)
        .with_context(|| format!("opening the pool VM's disk {}", disk.display()))?;
    let md = f.metadata().with_context(|| format!("reading {}", disk.display()))?;
    if !md.is_file() || md.nlink() != 1 || md.len() != size {
        bail!(
            "{} is no longer the pool VM's disk (a regular file with one link of {size} bytes)",
            disk.display()
        );
    }
    f.set_len(0).and_then(|()| f.set_len(size)).with_context(|| format!("clearing {}", disk.display()))?;
    let dir = std::fs::File::open(workspace).with_context(|| format!("opening {}", workspace.display()))?;
    let mut cmd = crate::base::proc::command("mkfs.ext4");
    cmd.args(["-q", "-F", "-L", "workspace", "-E", "root_owner=0:0", "-O", "^has_journal", "-m", "0", "-d"])
        .arg(workspace)
        .arg(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // The disk's descriptor reaches mkfs only (cleared close-on-exec in the child alone).
    crate::base::sys::start_in_dir_keeping(&mut cmd, dir.as_raw_fd(), vec![f.as_raw_fd()]);
    let o = cmd.output().context("running mkfs.ext4 (install e2fsprogs)")?;
    if !o.status.success() {
        bail!(
            "mkfs.ext4 -d {} into {} failed: {}",
            workspace.display(),
            disk.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

/// Kills the QEMU of the VM named `name`, wherever it is in its boot.
fn kill_named(name: &str) {
    let Ok(procs) = std::fs::read_dir("/proc") else { return };
    for e in procs.flatten() {
        if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
            if super::process_is(pid, name) {
                super::kill_vm(pid, name);
            }
        }
    }
}

fn rss_bytes(pid: Option<i32>) -> u64 {
    let Some(pid) = pid else { return IDLE_ESTIMATE };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(IDLE_ESTIMATE)
}

impl Pool {
    /// Starts the pool: takes its owner lock and starts the thread that keeps `cfg.size` VMs
    /// booted.
    pub fn start(opts: RuntimeOptions, cfg: PoolSettings) -> Result<Arc<Pool>> {
        let rt = MicroVm::new(opts);
        let sandboxes = rt.opts.sandboxes_dir();
        let lock = crate::base::lock::try_lock(&lock_path(&sandboxes, &cfg.owner))?.with_context(|| {
            format!("the VM pool lock of executor {} is held by another process", cfg.owner)
        })?;
        let wanted: Vec<String> = std::fs::read(wanted_path(&rt.opts.state_dir))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let pool = Arc::new(Pool {
            rt,
            cfg,
            state: Mutex::new(State { wanted, ..Default::default() }),
            cv: Condvar::new(),
            running_jobs: AtomicUsize::new(0),
            booter: Mutex::new(None),
            _lock: lock,
        });
        pool.publish();
        let p = pool.clone();
        let handle = std::thread::Builder::new()
            .name("vm-pool".into())
            .spawn(move || p.keep_filled())
            .context("starting the VM pool thread")?;
        *pool.booter.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(pool)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn log(&self, msg: &str) {
        (self.cfg.log)(msg)
    }

    pub fn size(&self) -> usize {
        self.cfg.size
    }

    pub fn budget(&self) -> Budget {
        self.cfg.budget
    }

    /// Tells the pool how many jobs run now (for the memory budget).
    pub fn set_running_jobs(&self, n: usize) {
        self.running_jobs.store(n, Ordering::SeqCst);
        self.cv.notify_all();
    }

    fn idle_bytes(st: &State) -> u64 {
        st.ready.iter().map(|m| rss_bytes(m.rec.pid)).sum::<u64>()
            + if st.booting.is_some() { IDLE_ESTIMATE } else { 0 }
    }

    pub fn status(&self) -> PoolStatus {
        let st = self.state();
        PoolStatus {
            size: self.cfg.size,
            ready: st.ready.len(),
            booting: usize::from(st.booting.is_some()),
            hits: st.hits,
            misses: st.misses,
            idle_bytes: Self::idle_bytes(&st),
        }
    }

    /// Whether the loop may take one more job with `running` jobs running: always when none
    /// runs; otherwise when the running jobs at their full size, the idle VMs at their resident
    /// memory (less one ready VM, which the job takes) and the new job fit in the budget.
    pub fn admits(&self, running: usize) -> bool {
        if running == 0 {
            return true;
        }
        let st = self.state();
        let taken = st.ready.iter().map(|m| rss_bytes(m.rec.pid)).max().unwrap_or(0);
        let b = self.cfg.budget;
        let committed =
            b.job_bytes.saturating_mul(running as u64 + 1) + Self::idle_bytes(&st).saturating_sub(taken);
        committed <= b.total_bytes
    }

    fn room_for_one_more(&self, st: &State) -> bool {
        let b = self.cfg.budget;
        let running = self.running_jobs.load(Ordering::SeqCst) as u64;
        b.job_bytes.saturating_mul(running) + Self::idle_bytes(st) + IDLE_ESTIMATE <= b.total_bytes
    }

    fn publish(&self) {
        let s = self.status();
        let r = metrics::registry();
        r.set(metrics::POOL_SIZE, &[], s.size as f64);
        r.set(metrics::POOL_READY, &[], s.ready as f64);
        r.set(metrics::POOL_BOOTING, &[], s.booting as f64);
        r.set(metrics::POOL_IDLE_BYTES, &[], s.idle_bytes as f64);
    }

    fn disk_bytes(&self) -> u64 {
        if self.cfg.limits.disk_bytes > 0 {
            self.cfg.limits.disk_bytes
        } else {
            DEFAULT_POOL_DISK
        }
    }

    /// The base key of a VM booted now.
    pub fn base_key(&self) -> Result<BaseKey> {
        let m = crate::vm::installed(&self.rt.opts.state_dir)?;
        let (accel, _) = self.rt.choose_accel()?;
        Ok(BaseKey {
            kernel: format!("{} {}", m.kernel_version, file_id(&m.vmlinux)),
            initramfs: format!("{} {}", m.initramfs_inputs, file_id(&m.initramfs)),
            accel: accel.to_string(),
            limits: self.cfg.limits.clone(),
            disk_bytes: self.disk_bytes(),
            network: format!("{:?}", self.rt.opts.network.mode).to_lowercase(),
        })
    }

    /// (reference, digest) of each image, sorted; images that do not resolve are left out.
    fn resolve(&self, images: &[String]) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = images
            .iter()
            .filter_map(|r| self.rt.resolve_image(r).ok().map(|(digest, _)| (r.clone(), digest)))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    fn current_key(&self) -> Result<PoolKey> {
        let wanted = self.state().wanted.clone();
        Ok(PoolKey { base: self.base_key()?, images: self.resolve(&wanted) })
    }

    /// Remembers a job's images (most recent first), for the VMs booted next.
    fn want(&self, images: &[String]) {
        let mut st = self.state();
        let mut wanted: Vec<String> = images.to_vec();
        for w in &st.wanted {
            if !wanted.contains(w) {
                wanted.push(w.clone());
            }
        }
        wanted.truncate(MAX_IMAGES);
        if wanted != st.wanted {
            st.wanted = wanted.clone();
            drop(st);
            let path = wanted_path(&self.rt.opts.state_dir);
            if let Ok(bytes) = serde_json::to_vec(&wanted) {
                let _ = crate::base::fs::write_atomic(&path, &bytes);
            }
            self.cv.notify_all();
        }
    }

    /// The booter: keeps `size` VMs of the current key ready, one boot at a time, within the
    /// budget; discards VMs of an older key.
    fn keep_filled(self: Arc<Self>) {
        loop {
            if self.state().stopped {
                return;
            }
            let key = match self.current_key() {
                Ok(k) => k,
                Err(e) => {
                    self.log(&format!("VM pool: cannot boot VMs ahead: {e:#}"));
                    self.pause(FAILURE_BACKOFF);
                    continue;
                }
            };
            let stale: Vec<Member> = {
                let mut st = self.state();
                let (keep, stale) = std::mem::take(&mut st.ready).into_iter().partition(|m| m.key == key);
                st.ready = keep;
                stale
            };
            for m in stale {
                self.log(&format!(
                    "VM pool: discarding VM {} (booted for another kernel, limits or images)",
                    m.rec.name
                ));
                metrics::registry().add(metrics::POOL_DISCARDED, &[], 1.0);
                self.destroy(m);
            }
            let boot = {
                let st = self.state();
                !st.stopped
                    && st.ready.len() < self.cfg.size
                    && st.booting.is_none()
                    && self.room_for_one_more(&st)
            };
            self.publish();
            if !boot {
                self.pause(Duration::from_secs(1));
                continue;
            }
            match self.boot_member(&key) {
                Ok(()) => {}
                Err(e) => {
                    if self.state().stopped {
                        return;
                    }
                    self.log(&format!("VM pool: a boot failed: {e:#}"));
                    self.pause(FAILURE_BACKOFF);
                }
            }
        }
    }

    /// Waits up to `d` for a change (a job taken, a new image, a stop).
    fn pause(&self, d: Duration) {
        let st = self.state();
        if !st.stopped {
            let _ = self.cv.wait_timeout(st, d);
        }
    }

    fn boot_member(&self, key: &PoolKey) -> Result<()> {
        let (accel, why) = self.rt.choose_accel()?;
        let timeout =
            if accel == super::Accel::Kvm { Duration::from_secs(20) } else { Duration::from_secs(120) };
        let images: Vec<String> = key.images.iter().map(|(r, _)| r.clone()).collect();
        let mut boot = VmBoot::new(None, &images, accel, why, &self.cfg.limits, timeout)
            .with_network(super::net::request(&self.rt.opts, self.cfg.coordinator.as_deref()));
        boot.pool_disk_bytes = Some(key.base.disk_bytes);
        let started = Instant::now();
        let mut attempt = 0;
        let rec = loop {
            let name = format!("{}-{}", self.cfg.prefix, uuid::Uuid::new_v4());
            {
                let mut st = self.state();
                if st.stopped {
                    bail!("the pool is stopping");
                }
                st.booting = Some(name.clone());
            }
            self.publish();
            let res = self.own(&name).and_then(|()| self.rt.boot_vm(&name, &boot));
            if res.is_err() {
                // A boot that failed before QEMU started leaves the directory without its marker.
                let _ = std::fs::remove_dir_all(self.rt.opts.sandboxes_dir().join(&name));
            }
            self.state().booting = None;
            match res {
                Ok(rec) => break rec,
                Err(e)
                    if e.downcast_ref::<AgentSilent>().is_some() && attempt == 0 && !self.state().stopped =>
                {
                    self.log(&format!("VM pool: {e:#}; booting a fresh VM"));
                    attempt += 1;
                }
                Err(e) => {
                    metrics::registry().observe(
                        metrics::POOL_BOOT_SECONDS,
                        &["failure"],
                        started.elapsed().as_secs_f64(),
                    );
                    self.publish();
                    return Err(e);
                }
            }
        };
        let secs = started.elapsed().as_secs_f64();
        metrics::registry().observe(metrics::POOL_BOOT_SECONDS, &["success"], secs);
        let socket = MicroVm::details(&rec).map(|d| d.socket).unwrap_or_default();
        let ch = self.rt.take_idle(&rec, &socket);
        let member = Member { rec, key: key.clone(), ch, ready_at: Instant::now() };
        let mut st = self.state();
        if st.stopped {
            drop(st);
            self.destroy(member);
            self.publish();
            bail!("the pool is stopping");
        }
        let name = member.rec.name.clone();
        st.ready.push(member);
        let (ready, size) = (st.ready.len(), self.cfg.size);
        drop(st);
        self.publish();
        self.log(&format!("VM pool: VM {name} ready after {secs:.1} s ({ready} of {size} ready)"));
        Ok(())
    }

    /// Creates the sandbox directory of pool VM `name` with its owner file, under the janitor
    /// lock: a janitor pass sees either no directory or an owned one (the lock is not held for
    /// the boot itself, which would hold every janitor pass for seconds).
    fn own(&self, name: &str) -> Result<()> {
        let _held = crate::workspace::janitor_lock(&self.rt.opts.state_dir, false)?;
        let dir = self.rt.opts.sandboxes_dir().join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join(OWNER_FILE), &self.cfg.owner)
            .with_context(|| format!("writing the pool owner of VM {name}"))
    }

    fn destroy(&self, m: Member) {
        drop(m.ch);
        if let Err(e) = self.rt.teardown(&m.rec) {
            self.log(&format!("VM pool: removing VM {}: {e:#}", m.rec.name));
        }
    }

    /// A VM for the job of `req`, its workspace written into the VM's disk and mounted, or why
    /// the job must boot its own. The caller holds the janitor lock (shared) until the job's
    /// owner record names the VM.
    pub fn claim(&self, req: &BootRequest) -> Claim {
        let claim = self.try_claim(req);
        let r = metrics::registry();
        match &claim {
            Claim::Hit(_) => {
                self.state().hits += 1;
                r.add(metrics::POOL_CLAIMS, &["hit"], 1.0);
            }
            Claim::Miss(_) => {
                self.state().misses += 1;
                r.add(metrics::POOL_CLAIMS, &["miss"], 1.0);
            }
        }
        self.publish();
        self.cv.notify_all();
        claim
    }

    fn try_claim(&self, req: &BootRequest) -> Claim {
        if self.rt.opts.network.mode != crate::network::Mode::None
            && req.coordinator != self.cfg.coordinator.as_deref()
        {
            return Claim::Miss("the job's coordinator is not the one the pool's VMs may reach".into());
        }
        if *req.limits != self.cfg.limits {
            return Claim::Miss("the job's limits are not the pool's".into());
        }
        self.want(&req.images);
        let base = match self.base_key() {
            Ok(b) => b,
            Err(e) => return Claim::Miss(format!("{e:#}")),
        };
        let images = self.resolve(&req.images);
        if images.len() != req.images.iter().collect::<HashSet<_>>().len() {
            return Claim::Miss("not every image of the job resolves in the image store".into());
        }
        let used = match disk::tree_bytes(req.workspace) {
            Ok(u) => u,
            Err(e) => return Claim::Miss(format!("{e:#}")),
        };
        let mut member = {
            let mut st = self.state();
            if st.ready.is_empty() {
                return Claim::Miss(if st.booting.is_some() {
                    "no VM of the pool is ready yet (one is booting)".into()
                } else {
                    "no VM of the pool is ready".into()
                });
            }
            let Some(i) = st.ready.iter().position(|m| m.key.serves(&base, &images)) else {
                return Claim::Miss("no ready VM of the pool has the job's kernel, limits and images".into());
            };
            if used + (64 << 20) > st.ready[i].key.base.disk_bytes {
                return Claim::Miss(format!(
                    "the workspace ({}) does not fit the pool's disks",
                    crate::base::units::format_bytes(used)
                ));
            }
            st.ready.remove(i)
        };
        match self.attach(&mut member, req.workspace) {
            Ok(claim) => {
                let mut rec = member.rec.clone();
                if let Ok(Some(mut det)) = VmDetails::of(&rec) {
                    det.pool = Some(claim);
                    det.store(&mut rec);
                }
                // For the job's next request (its first step), from this process.
                if let (Some(ch), Ok(det)) = (member.ch.take(), MicroVm::details(&rec)) {
                    self.rt.keep_idle(&rec, &det.socket, ch);
                }
                Claim::Hit(Box::new(rec))
            }
            Err(e) => {
                let why = format!("attaching the workspace to pool VM {} failed: {e:#}", member.rec.name);
                self.destroy(member);
                Claim::Miss(why)
            }
        }
    }

    /// Writes the job's workspace filesystem into the VM's workspace disk (the same file QEMU
    /// holds open, rewritten in place) and has the agent mount it.
    fn attach(&self, m: &mut Member, workspace: &Path) -> Result<PoolClaim> {
        let idle_ms = m.ready_at.elapsed().as_millis() as u64;
        // A job's VM from now on: the CPU weight of any VM.
        super::cgroup::Cgroup::set_cpu_weight(&m.rec.name, false);
        let det = MicroVm::details(&m.rec)?;
        let t = Instant::now();
        write_disk_in_place(workspace, &det.workspace_disk, det.workspace_disk_bytes)?;
        let disk_build_ms = t.elapsed().as_millis() as u64;
        // From now on the job's workspace owner record names this VM.
        std::fs::remove_file(m.rec.state_dir.join(OWNER_FILE))
            .with_context(|| format!("removing the pool owner of VM {}", m.rec.name))?;
        let t = Instant::now();
        let mut ch = match m.ch.take() {
            Some(ch) => ch,
            None => self.rt.connect(&m.rec)?,
        };
        let id = rand::random::<u32>() % (u32::MAX - 1);
        ch.send(&Frame::json(Kind::Mount, &Control { id })?)?;
        let until = Instant::now() + MOUNT_LIMIT;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("the agent of VM {} did not mount the workspace within {MOUNT_LIMIT:?}", m.rec.name);
            }
            let Some(f) = ch.recv(left.min(Duration::from_millis(200)))? else { continue };
            match f.kind {
                Kind::Mounted if f.parse::<Control>()?.id == id => break,
                Kind::Error => {
                    let r: ErrorReport = f.parse()?;
                    if r.id == id {
                        bail!("the agent of VM {}: {}", m.rec.name, super::printable(&r.message));
                    }
                }
                _ => {}
            }
        }
        m.ch = Some(ch);
        Ok(PoolClaim { idle_ms, disk_build_ms, mount_ms: t.elapsed().as_millis() as u64 })
    }

    /// Stops booting (the VM booting now is killed; its boot fails at once and the booter
    /// removes what it made). The ready VMs stay for the jobs dequeued already; returns whether
    /// a boot was stopped.
    pub fn stop_booting(&self) -> bool {
        let booting = {
            let mut st = self.state();
            st.stopped = true;
            st.booting.clone()
        };
        self.cv.notify_all();
        if let Some(h) = self.booter.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // Until the booter is done: its QEMU may not have started at the first try.
            let t = Instant::now();
            while !h.is_finished() && t.elapsed() < Duration::from_secs(30) {
                if let Some(name) = &booting {
                    kill_named(name);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = h.join();
        }
        self.publish();
        booting.is_some()
    }

    /// Stops booting and destroys every VM of the pool; returns how many it destroyed.
    pub fn drain(&self) -> usize {
        let stopped = usize::from(self.stop_booting());
        let members = std::mem::take(&mut self.state().ready);
        let n = members.len() + stopped;
        for m in members {
            self.destroy(m);
        }
        // Nothing of this pool is left: its lock file goes (the lock itself with the process).
        let _ = std::fs::remove_file(lock_path(&self.rt.opts.sandboxes_dir(), &self.cfg.owner));
        self.publish();
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(mem: u64) -> BaseKey {
        BaseKey {
            kernel: "6.1 vmlinux 1 2.3".into(),
            initramfs: "abc initramfs 4 5.6".into(),
            accel: "tcg".into(),
            limits: Limits { cpus: 1, memory_bytes: mem, disk_bytes: 0, pids: 0 },
            disk_bytes: DEFAULT_POOL_DISK,
            network: "none".into(),
        }
    }

    #[test]
    fn a_vm_serves_only_jobs_of_its_key_and_images() {
        let img = |r: &str, d: &str| (r.to_string(), d.to_string());
        let key = PoolKey {
            base: base(512 << 20),
            images: vec![img("alpine", "sha256:a"), img("busybox", "sha256:b")],
        };
        assert!(key.serves(&base(512 << 20), &[img("busybox", "sha256:b")]));
        assert!(key.serves(&base(512 << 20), &[]));
        // An image tag that moved to another digest, an image it lacks, other limits, another
        // kernel or initramfs, another network mode: all misses.
        assert!(!key.serves(&base(512 << 20), &[img("busybox", "sha256:new")]));
        assert!(!key.serves(&base(512 << 20), &[img("debian", "sha256:d")]));
        assert!(!key.serves(&base(1 << 30), &[]));
        let mut other = base(512 << 20);
        other.kernel = "6.1 vmlinux 1 9.9".into();
        assert!(!key.serves(&other, &[]));
        let mut other = base(512 << 20);
        other.initramfs = "def initramfs 4 5.6".into();
        assert!(!key.serves(&other, &[]));
        let mut other = base(512 << 20);
        other.network = "internet".into();
        assert!(!key.serves(&other, &[]));
    }

    #[test]
    fn the_disk_is_written_in_place_and_never_through_a_link() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let ws = d.path().join("ws");
        std::fs::create_dir_all(&ws).unwrap();
        std::fs::write(ws.join("f"), "job file").unwrap();
        let disk = d.path().join("workspace.ext4");
        let size = 64u64 << 20;
        std::fs::File::create(&disk).unwrap().set_len(size).unwrap();
        let ino = std::fs::metadata(&disk).unwrap().ino();
        write_disk_in_place(&ws, &disk, size).unwrap();
        let md = std::fs::metadata(&disk).unwrap();
        assert_eq!((md.ino(), md.len()), (ino, size), "the same file, the same size");
        let head = std::fs::read(&disk).unwrap();
        assert_eq!(&head[1080..1082], &[0x53, 0xef], "an ext4 superblock");
        // A symlink or a second hard link in its place (the VM's user owns the directory).
        let victim = d.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::fs::remove_file(&disk).unwrap();
        std::os::unix::fs::symlink(&victim, &disk).unwrap();
        assert!(write_disk_in_place(&ws, &disk, size).is_err());
        std::fs::remove_file(&disk).unwrap();
        std::fs::hard_link(&victim, &disk).unwrap();
        assert!(write_disk_in_place(&ws, &disk, size).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        // A size other than the one QEMU knows.
        std::fs::remove_file(&disk).unwrap();
        std::fs::File::create(&disk).unwrap().set_len(size / 2).unwrap();
        assert!(write_disk_in_place(&ws, &disk, size).is_err());
    }

    #[test]
    fn default_pool_size_follows_memory() {
        let gib = 1u64 << 30;
        let b = Budget { total_bytes: 16 * gib, job_bytes: 512 * (1 << 20) + QEMU_OVERHEAD };
        assert_eq!(b.default_pool_size(1), 1);
        assert_eq!(b.default_pool_size(4), 4);
        // Jobs that may take all the memory leave none for idle VMs.
        let big = Budget { total_bytes: 16 * gib, job_bytes: 12 * gib + QEMU_OVERHEAD };
        assert_eq!(big.default_pool_size(1), 1);
        assert_eq!(big.default_pool_size(2), 0);
        assert_eq!(Budget { total_bytes: gib, job_bytes: gib }.default_pool_size(1), 0);
        assert_eq!(vm_bytes(&Limits::default()), DEFAULT_MEMORY + QEMU_OVERHEAD);
    }

    #[test]
    fn live_members_keeps_a_live_owners_vms_and_gives_up_a_dead_ones() {
        let d = tempfile::tempdir().unwrap();
        let held = crate::base::lock::try_lock(&lock_path(d.path(), "alive")).unwrap().unwrap();
        for (vm, owner) in [("vm-a", "alive"), ("vm-b", "dead"), ("vm-c", "alive")] {
            std::fs::create_dir_all(d.path().join(vm)).unwrap();
            std::fs::write(d.path().join(vm).join(OWNER_FILE), owner).unwrap();
        }
        std::fs::create_dir_all(d.path().join("vm-job")).unwrap();
        std::fs::write(lock_path(d.path(), "dead"), "").unwrap();
        let live = live_members(d.path()).unwrap();
        assert_eq!(live, ["vm-a", "vm-c"].iter().map(|s| s.to_string()).collect());
        assert!(!lock_path(d.path(), "dead").exists(), "a dead owner's lock file goes");
        drop(held);
        assert!(live_members(d.path()).unwrap().is_empty());
    }
}
