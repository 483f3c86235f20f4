//! The pool's booter thread: keeps `size` VMs of the current key ready, one boot at a time and
//! within the memory budget, discards VMs of an older key, and destroys VMs.

use anyhow::{bail, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::super::{AgentSilent, MicroVm};
use super::{Member, Pool, PoolKey};
use crate::api::metrics;
use crate::sandbox::Runtime;

/// The pause after a pool boot failed, before the next try.
const FAILURE_BACKOFF: Duration = Duration::from_secs(10);

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
    /// The booter: keeps `size` VMs of the current key ready, one boot at a time, within the
    /// budget; discards VMs of an older key.
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
    pub(super) fn pause(&self, d: Duration) {
        let st = self.state();
        if !st.stopped {
            let _ = self.cv.wait_timeout(st, d);
        }
    }

    pub(super) fn boot_member(&self, key: &PoolKey) -> Result<()> {
        let images = super::restore::key_images(key);
        let boot = self.member_boot(key, &images)?;
        let snap = self.snapshot_for(key, &boot);
        if self.state().stopped {
            bail!("the pool is stopping");
        }
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
            let res = self.restore_or_boot(&name, &boot, key, snap.as_ref().map_err(|e| e.clone()));
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

    pub(super) fn destroy(&self, m: Member) {
        drop(m.ch);
        if let Err(e) = self.rt.teardown(&m.rec) {
            self.log(&format!("VM pool: removing VM {}: {e:#}", m.rec.name));
        }
    }
}
