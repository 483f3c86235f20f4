//! The pool's booter thread: keeps `size` VMs of the current key ready within the memory
//! budget, restoring several at once from the key's snapshot and booting cold one at a time
//! ([`to_start`]); discards VMs of an older key, and destroys VMs. Each VM is made on a thread of
//! its own (a maker), registered in the pool's `making` from before it starts.

use anyhow::{bail, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::super::snapshot::Snapshot;
use super::super::{AgentSilent, MicroVm};
use super::{Member, Pool, PoolKey};
use crate::api::metrics;
use crate::sandbox::Runtime;

/// The pause after a pool boot failed, before the next try.
const FAILURE_BACKOFF: Duration = Duration::from_secs(10);

/// The most VMs restored at once by default, whatever the host's CPU count: a restore under TCG
/// is a core's worth of work for about half a second, under KVM a read of the stream at memory
/// bandwidth, and the budget bounds them too.
const MAX_DEFAULT_RESTORES: usize = 4;

/// `EXECUTOR_VM_POOL_RESTORES` when unset: the host's CPU count, at most
/// [`MAX_DEFAULT_RESTORES`].
pub(crate) fn default_restores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, MAX_DEFAULT_RESTORES)
}

/// What the booter knows when it decides how many VMs to start making.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fill {
    /// The pool's size.
    pub size: usize,
    /// VMs of the current key ready.
    pub ready: usize,
    /// VMs being made now (booted, restored, or a template booted and saved).
    pub making: usize,
    /// How many more VMs fit in the memory budget, every VM being made counted already.
    pub room: usize,
    /// How many VMs may be restored at once (`EXECUTOR_VM_POOL_RESTORES`).
    pub restores: usize,
    /// Whether the VMs would be restored from an existing snapshot; else each boots cold (or is
    /// a template), one at a time.
    pub restore: bool,
}

/// How many VMs the booter starts making now: those missing to reach the size, no more than the
/// budget has room for, and no more than may be made at once (restores up to `restores`
/// together, a cold boot alone).
pub(super) fn to_start(f: Fill) -> usize {
    let missing = f.size.saturating_sub(f.ready + f.making);
    let at_once = if f.restore { f.restores.max(1) } else { 1 };
    missing.min(f.room).min(at_once.saturating_sub(f.making))
}

/// Kills the QEMU of the VM named `name`, wherever it is in its boot.
pub(super) fn kill_named(name: &str) {
    let Ok(procs) = std::fs::read_dir("/proc") else { return };
    for e in procs.flatten() {
        if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
            if super::super::teardown::process_is(pid, name) {
                super::super::teardown::kill_vm(pid, name);
            }
        }
    }
}

impl Pool {
    /// The booter: keeps `size` VMs of the current key ready within the budget, starting a
    /// maker for each VM to make ([`to_start`]); discards VMs of an older key.
    pub(super) fn keep_filled(self: Arc<Self>) {
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
            {
                let mut st = self.state();
                if let Some(old) = st.last_key.replace(key.clone()).filter(|old| old.base != key.base) {
                    drop(st);
                    // Another kernel, initramfs or limits: that key's snapshot serves nothing now (another
                    // image set's stays, for a job naming it again, until the janitor's budget).
                    super::super::snapshot::remove(&self.rt.opts.state_dir, &super::restore::snap_key(&old));
                }
            }
            for m in stale {
                self.log(&format!(
                    "VM pool: discarding VM {} (booted for another kernel, limits or images)",
                    m.rec.name
                ));
                metrics::registry().add(metrics::POOL_DISCARDED, &[], 1.0);
                self.destroy(m);
            }
            let fill = {
                let st = self.state();
                let waiting = st.stopped || st.backoff_until.is_some_and(|t| Instant::now() < t);
                Fill {
                    size: if waiting { 0 } else { self.cfg.size },
                    ready: st.ready.len(),
                    making: st.making.len(),
                    room: self.room(&st),
                    restores: self.cfg.restores,
                    restore: true,
                }
            };
            // The snapshot is looked for only when a restore would start.
            let snap = if to_start(fill) > 0 { self.restorable(&key) } else { None };
            let n = to_start(Fill { restore: snap.is_some(), ..fill });
            self.publish();
            if n == 0 {
                self.pause(Duration::from_secs(1));
                continue;
            }
            if n > 1 {
                if let Some(s) = &snap {
                    self.log(&format!(
                        "VM pool: restoring {n} VMs at once from snapshot {} ({} ready, {} being made, size {})",
                        s.id, fill.ready, fill.making, self.cfg.size
                    ));
                }
            }
            for _ in 0..n {
                if self.start_maker(&key, snap.clone()).is_err() {
                    return;
                }
            }
        }
    }

    /// The snapshot the VMs of `key` are restored from now, if it exists and may be used.
    fn restorable(&self, key: &PoolKey) -> Option<Snapshot> {
        if !self.rt.opts.vm_snapshots || self.save_failed_recently(key).is_some() {
            return None;
        }
        super::super::snapshot::find(&self.rt.opts.state_dir, &super::restore::snap_key(key)).ok().flatten()
    }

    /// Registers one VM to make (its slot in `making`, counted from now on) and starts its maker;
    /// fails only when the pool is stopping.
    fn start_maker(self: &Arc<Self>, key: &PoolKey, snap: Option<Snapshot>) -> Result<()> {
        let name = format!("{}-{}", self.cfg.prefix, uuid::Uuid::new_v4());
        let slot = {
            let mut st = self.state();
            if st.stopped {
                bail!("the pool is stopping");
            }
            let slot = st.next_slot;
            st.next_slot += 1;
            st.making.insert(slot, name.clone());
            slot
        };
        self.publish();
        let (p, key) = (self.clone(), key.clone());
        let started = std::thread::Builder::new()
            .name("vm-pool-maker".into())
            .spawn(move || p.make(slot, name, &key, snap.as_ref()));
        match started {
            Ok(h) => {
                let mut makers = self.makers.lock().unwrap_or_else(|p| p.into_inner());
                makers.retain(|h| !h.is_finished());
                makers.push(h);
            }
            Err(e) => {
                self.state().making.remove(&slot);
                self.log(&format!("VM pool: starting a thread to make a VM: {e}"));
                self.state().backoff_until = Some(Instant::now() + FAILURE_BACKOFF);
            }
        }
        Ok(())
    }

    /// A maker: makes VM `name` of slot `slot` (restored from `snap`, or booted cold one at a
    /// time); then the slot goes, and a failure holds every start back for a while.
    fn make(&self, slot: u64, name: String, key: &PoolKey, snap: Option<&Snapshot>) {
        let res = self.make_member(slot, name, key, snap);
        let stopped = {
            let mut st = self.state();
            st.making.remove(&slot);
            if res.is_err() && !st.stopped {
                st.backoff_until = Some(Instant::now() + FAILURE_BACKOFF);
            }
            st.stopped
        };
        self.publish();
        self.cv.notify_all();
        if let Err(e) = res {
            if !stopped {
                self.log(&format!("VM pool: a boot failed: {e:#}"));
            }
        }
    }

    /// Waits up to `d` for a change (a job taken, a new image, a stop).
    pub(super) fn pause(&self, d: Duration) {
        let st = self.state();
        if !st.stopped {
            let _ = self.cv.wait_timeout(st, d);
        }
    }

    /// Names VM `name` as slot `slot`'s VM now (stop kills it by that name); fails when the pool
    /// is stopping.
    pub(super) fn making_as(&self, slot: u64, name: &str) -> Result<()> {
        let mut st = self.state();
        if st.stopped {
            bail!("the pool is stopping");
        }
        st.making.insert(slot, name.to_string());
        Ok(())
    }

    /// Makes VM `name` of slot `slot`: restored from `snap` when there is one, else (a cold
    /// fill) from the key's snapshot saved now if need be, or booted cold; ready in the pool.
    fn make_member(&self, slot: u64, name: String, key: &PoolKey, snap: Option<&Snapshot>) -> Result<()> {
        let images = super::restore::key_images(key);
        let boot = self.member_boot(key, &images)?;
        let snap = match snap {
            Some(s) => Ok(s.clone()),
            None => self.snapshot_for(slot, key, &boot),
        };
        let started = Instant::now();
        let mut attempt = 0;
        let mut name = name;
        let rec = loop {
            self.making_as(slot, &name)?;
            let res = self.restore_or_boot(slot, &name, &boot, key, snap.as_ref().map_err(|e| e.clone()));
            if res.is_err() {
                // A boot that failed before QEMU started leaves the directory without its marker.
                let _ = std::fs::remove_dir_all(self.rt.opts.sandboxes_dir().join(&name));
            }
            match res {
                Ok(rec) => break rec,
                Err(e)
                    if e.downcast_ref::<AgentSilent>().is_some() && attempt == 0 && !self.state().stopped =>
                {
                    self.log(&format!("VM pool: {e:#}; booting a fresh VM"));
                    attempt += 1;
                    name = format!("{}-{}", self.cfg.prefix, uuid::Uuid::new_v4());
                }
                Err(e) => {
                    metrics::registry().observe(
                        metrics::POOL_BOOT_SECONDS,
                        &["failure"],
                        started.elapsed().as_secs_f64(),
                    );
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
            bail!("the pool is stopping");
        }
        // Ready and no longer being made, at once: the budget counts it all along.
        st.making.remove(&slot);
        let name = member.rec.name.clone();
        st.ready.push(member);
        let (ready, size) = (st.ready.len(), self.cfg.size);
        drop(st);
        self.publish();
        let caches = match key.caches.len() {
            0 => String::new(),
            1 => ", carrying 1 cache disk".to_string(),
            n => format!(", carrying {n} cache disks"),
        };
        self.log(&format!("VM pool: VM {name} ready after {secs:.1} s ({ready} of {size} ready{caches})"));
        Ok(())
    }

    pub(super) fn destroy(&self, m: Member) {
        drop(m.ch);
        if let Err(e) = self.rt.teardown(&m.rec) {
            self.log(&format!("VM pool: removing VM {}: {e:#}", m.rec.name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(size: usize, ready: usize, making: usize, room: usize, restores: usize) -> Fill {
        Fill { size, ready, making, room, restores, restore: true }
    }

    #[test]
    fn restores_fan_out_within_the_size_the_budget_and_the_cap() {
        // An empty pool of 4 with room and a cap of 4: all four restores start together.
        assert_eq!(to_start(fill(4, 0, 0, 10, 4)), 4);
        // Only what is missing: ready VMs and VMs being made count.
        assert_eq!(to_start(fill(4, 1, 0, 10, 4)), 3);
        assert_eq!(to_start(fill(4, 1, 2, 10, 4)), 1);
        assert_eq!(to_start(fill(4, 2, 2, 10, 4)), 0);
        assert_eq!(to_start(fill(2, 3, 0, 10, 4)), 0, "more ready than the size (a smaller pool)");
        // The cap counts the restores already running.
        assert_eq!(to_start(fill(8, 0, 0, 10, 3)), 3);
        assert_eq!(to_start(fill(8, 0, 2, 10, 3)), 1);
        assert_eq!(to_start(fill(8, 0, 3, 10, 3)), 0);
        assert_eq!(to_start(fill(8, 0, 5, 10, 3)), 0, "a cap lowered below those running");
        // The budget: room is what fits beside every VM ready or being made.
        assert_eq!(to_start(fill(4, 0, 0, 2, 4)), 2);
        assert_eq!(to_start(fill(4, 0, 1, 1, 4)), 1);
        assert_eq!(to_start(fill(4, 0, 0, 0, 4)), 0);
        // A cap of 0 is read as 1: the pool still fills.
        assert_eq!(to_start(fill(2, 0, 0, 10, 0)), 1);
        // A size of 0 (stopped, or backing off after a failure) starts nothing.
        assert_eq!(to_start(fill(0, 0, 0, 10, 4)), 0);
    }

    #[test]
    fn cold_boots_go_one_at_a_time() {
        let cold = |ready, making, room| to_start(Fill { restore: false, ..fill(4, ready, making, room, 4) });
        assert_eq!(cold(0, 0, 10), 1);
        assert_eq!(cold(0, 1, 10), 0, "no boot beside another boot or a template");
        assert_eq!(cold(3, 0, 10), 1);
        assert_eq!(cold(0, 0, 0), 0, "within the budget");
        assert_eq!(cold(4, 0, 10), 0);
    }

    #[test]
    fn the_default_cap_is_the_cpu_count_at_most_four() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(default_restores(), cpus.clamp(1, 4));
    }
}
