//! A pool of microVMs booted ahead of demand (`EXECUTOR_VM_POOL_SIZE`), so that a job's VM is
//! already running when the job is dequeued: the boot (seconds under TCG) moves off the job's
//! path. Each VM serves exactly one job and is destroyed after it; none is ever reused.
//!
//! A pool VM boots with the step images of the last job as its read-only disks and a blank sparse
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
//! Refilled several at a time: VMs restored from the key's snapshot are made up to
//! [`PoolSettings::restores`] at once (each counted in the budget as an idle VM from its start);
//! a cold boot (no snapshot yet, or the template being saved) goes alone ([`booter::to_start`]).
//!
//! Bounded: idle VMs count against the loop's memory budget ([`Budget`]); the pool is drained
//! (every VM killed, those being made too) when the loop stops; its VMs carry a `pool-owner` file naming the executor,
//! whose pool lock (`sandboxes/pool-<executor>.lock`) is held while it lives, so that a janitor
//! reclaims the VMs of an executor that was killed ([`live_members`]).

//!
//! One file per concern: `key` (what defines a VM, which images), `budget` (memory), `owner`
//! (the owner file and lock), `booter` (the thread that keeps the pool filled), `restore` (VMs
//! restored from the key's snapshot), `claim` (a job taking a VM). This file holds the pool's state and its public face.

mod booter;
mod budget;
mod claim;
mod key;
mod owner;
mod restore;

use anyhow::{Context, Result};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::channel::Channel;
use super::MicroVm;
use crate::api::metrics;
use crate::sandbox::{BootRequest, Limits, RuntimeOptions, SandboxRecord};
pub(crate) use booter::default_restores;
use booter::kill_named;
use budget::rss_bytes;
pub(crate) use budget::{Budget, IDLE_ESTIMATE};
use key::read_wanted;
pub(crate) use key::PoolKey;
use owner::lock_path;
pub(crate) use owner::{live_members, OWNER_FILE};

/// Settings of the pool.
#[derive(Clone)]
pub(crate) struct PoolSettings {
    /// How many idle VMs to keep.
    pub size: usize,
    /// `EXECUTOR_VM_PREFIX`: the VMs are named `<prefix>-<uuid>` like every VM of the runtime.
    pub prefix: String,
    /// The executor's name (the owner of the VMs).
    pub owner: String,
    pub limits: Limits,
    /// The coordinator's URL, which a networked VM may reach: pool VMs of `internet` mode boot
    /// with their network (TAP, slot and firewall entry) already made for it.
    pub coordinator: Option<String>,
    pub budget: Budget,
    /// `EXECUTOR_VM_POOL_RESTORES`: how many VMs may be restored from a snapshot at once (at
    /// least 1; cold boots go one at a time).
    pub restores: usize,
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
    /// The VMs being made (booted, restored, or booted as a template and saved), by the slot of
    /// the thread making each: the name of its VM now (a retry or a template has another).
    making: std::collections::HashMap<u64, String>,
    /// The slot of the next VM to make.
    next_slot: u64,
    /// After a failed boot or restore, no VM is started before this.
    backoff_until: Option<Instant>,
    /// The image references of the last job that asked (sorted): the next VMs carry exactly
    /// these.
    wanted: Vec<String>,
    /// The disks of the cache versions the last job hit, in its caches' order: the next VMs
    /// carry exactly these.
    wanted_caches: Vec<std::path::PathBuf>,
    stopped: bool,
    hits: u64,
    misses: u64,
    /// The key whose snapshot could not be saved, why, and when: its VMs boot cold for a while.
    save_failed: Option<(PoolKey, String, Instant)>,
    /// The key the booter filled the pool for last.
    last_key: Option<PoolKey>,
}

/// The pool's state, as `executor loop` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoolStatus {
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
pub(crate) enum Claim {
    /// A pool VM, its workspace mounted.
    Hit(Box<SandboxRecord>),
    /// The job boots its own VM, for this reason.
    Miss(String),
}

pub(crate) struct Pool {
    rt: MicroVm,
    cfg: PoolSettings,
    state: Mutex<State>,
    cv: Condvar,
    running_jobs: AtomicUsize,
    booter: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The threads making VMs (one per VM being made), started by the booter.
    makers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Held by a cold boot (a template's or a VM's): cold boots go one at a time, even when a
    /// failed restore falls back to one beside other restores.
    cold: Mutex<()>,
    _lock: crate::base::lock::Held,
}

impl Pool {
    /// Starts the pool: takes its owner lock and starts the thread that keeps `cfg.size` VMs
    /// booted.
    pub(crate) fn start(opts: RuntimeOptions, cfg: PoolSettings) -> Result<Arc<Pool>> {
        let rt = MicroVm::new(opts);
        let sandboxes = rt.opts.sandboxes_dir();
        let lock = crate::base::lock::try_lock(&lock_path(&sandboxes, &cfg.owner))?.with_context(|| {
            format!("the VM pool lock of executor {} is held by another process", cfg.owner)
        })?;
        let wanted = read_wanted(&rt.opts.state_dir);
        let pool = Arc::new(Pool {
            rt,
            cfg,
            state: Mutex::new(State { wanted, ..Default::default() }),
            cv: Condvar::new(),
            running_jobs: AtomicUsize::new(0),
            booter: Mutex::new(None),
            makers: Mutex::new(Vec::new()),
            cold: Mutex::new(()),
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

    /// The pool's lines are the loop's: they name no job unless a job's thread writes them.
    fn log(&self, msg: &str) {
        tracing::info!("{msg}")
    }

    pub(crate) fn budget(&self) -> Budget {
        self.cfg.budget
    }

    /// Tells the pool how many jobs run now (for the memory budget).
    pub(crate) fn set_running_jobs(&self, n: usize) {
        self.running_jobs.store(n, Ordering::SeqCst);
        self.cv.notify_all();
    }

    fn idle_bytes(st: &State) -> u64 {
        st.ready.iter().map(|m| rss_bytes(m.rec.pid)).sum::<u64>() + IDLE_ESTIMATE * st.making.len() as u64
    }

    pub(crate) fn status(&self) -> PoolStatus {
        let st = self.state();
        PoolStatus {
            size: self.cfg.size,
            ready: st.ready.len(),
            booting: st.making.len(),
            hits: st.hits,
            misses: st.misses,
            idle_bytes: Self::idle_bytes(&st),
        }
    }

    /// Whether the loop may take one more job with `running` jobs running: always when none
    /// runs; otherwise when the running jobs at their full size, the idle VMs at their resident
    /// memory (less one ready VM, which the job takes) and the new job fit in the budget.
    pub(crate) fn admits(&self, running: usize) -> bool {
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

    /// How many more idle VMs (at [`IDLE_ESTIMATE`] each) fit in the budget beside the running
    /// jobs at their full size, the ready VMs and the VMs being made.
    fn room(&self, st: &State) -> usize {
        self.cfg.budget.room(self.running_jobs.load(Ordering::SeqCst), Self::idle_bytes(st))
    }

    fn publish(&self) {
        let s = self.status();
        let r = metrics::registry();
        r.set(metrics::POOL_SIZE, &[], s.size as f64);
        r.set(metrics::POOL_READY, &[], s.ready as f64);
        r.set(metrics::POOL_BOOTING, &[], s.booting as f64);
        r.set(metrics::POOL_IDLE_BYTES, &[], s.idle_bytes as f64);
    }

    /// A VM for the job of `req`, its workspace written into the VM's disk and mounted, or why
    /// the job must boot its own. The caller holds the janitor lock (shared) until the job's
    /// owner record names the VM.
    pub(crate) fn claim(&self, req: &BootRequest, cache_disks: &[std::path::PathBuf]) -> Claim {
        let claim = self.try_claim(req, cache_disks);
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

    /// Stops booting (every VM being made is killed; its boot or restore fails at once and its
    /// thread removes what it made). The ready VMs stay for the jobs dequeued already; returns
    /// how many VMs being made were stopped.
    pub(crate) fn stop_booting(&self) -> usize {
        let stopped = {
            let mut st = self.state();
            st.stopped = true;
            st.making.len()
        };
        self.cv.notify_all();
        // The booter first (it starts no maker once stopped), then every maker it started.
        let mut threads: Vec<_> =
            self.booter.lock().unwrap_or_else(|p| p.into_inner()).take().into_iter().collect();
        let t = Instant::now();
        loop {
            threads.extend(self.makers.lock().unwrap_or_else(|p| p.into_inner()).drain(..));
            threads.retain(|h| !h.is_finished());
            if threads.is_empty() || t.elapsed() > Duration::from_secs(30) {
                break;
            }
            // Until each is done: a QEMU may not have started at the first try, and a retry or
            // a template has a name of its own.
            let names: Vec<String> = self.state().making.values().cloned().collect();
            for name in &names {
                kill_named(name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for h in threads {
            let _ = h.join();
        }
        // A maker the booter started as it saw the stop (it fails at once).
        let late: Vec<_> = self.makers.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
        for h in late {
            let _ = h.join();
        }
        self.publish();
        stopped
    }

    /// Stops booting and destroys every VM of the pool; returns how many it destroyed.
    pub(crate) fn drain(&self) -> usize {
        let stopped = self.stop_booting();
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
