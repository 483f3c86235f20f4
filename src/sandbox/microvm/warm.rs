//! The microVM pool behind the runtime-neutral [`WarmPool`] trait, so that `vm-boot` and the
//! loop take a VM booted ahead without naming the pool: a claim's hit or miss becomes the line
//! the boot's log entry has always had.

use anyhow::Result;
use std::collections::HashSet;
use std::sync::Arc;

use super::pool::{Budget, Claim, Pool, PoolSettings};
use super::{MicroVm, VmDetails};
use crate::sandbox::{BootRequest, RecordDetails, RuntimeKind, WarmClaim, WarmPool, WarmPoolRequest};

/// [`crate::sandbox::Runtime::start_warm_pool`] of the microvm runtime: the pool of VMs booted
/// ahead, in the runtime's network mode.
pub(super) fn start(rt: &MicroVm, req: WarmPoolRequest) -> Result<Option<Arc<dyn WarmPool>>> {
    let pool = Pool::start(
        rt.opts.clone(),
        PoolSettings {
            size: req.size,
            prefix: req.prefix,
            owner: req.owner,
            limits: req.limits,
            coordinator: req.coordinator,
            budget: Budget { total_bytes: req.budget_bytes, job_bytes: req.job_bytes },
            restores: req.concurrency.max(1),
        },
    )?;
    Ok(Some(pool as Arc<dyn WarmPool>))
}

/// [`crate::sandbox::Runtime::booted_ahead`] of the microvm runtime: the pool VMs of executors
/// that still live.
pub(super) fn live(rt: &MicroVm) -> Result<HashSet<String>> {
    super::pool::live_members(&rt.opts.sandboxes_dir())
}

impl WarmPool for Pool {
    fn runtime(&self) -> RuntimeKind {
        RuntimeKind::Microvm
    }

    fn take(&self, req: &BootRequest, cache_disks: &[std::path::PathBuf]) -> WarmClaim {
        match self.claim(req, cache_disks) {
            Claim::Hit(record) => {
                let note = VmDetails::of(&record).ok().flatten().and_then(|d| hit_note(&record.name, &d));
                WarmClaim::Hit { record, note }
            }
            Claim::Miss(why) => WarmClaim::Miss { note: miss_note(&why) },
        }
    }

    fn admits(&self, running: usize) -> bool {
        Pool::admits(self, running)
    }

    fn budget_bytes(&self) -> u64 {
        self.budget().total_bytes
    }

    fn set_running_jobs(&self, n: usize) {
        Pool::set_running_jobs(self, n)
    }

    fn status_line(&self) -> String {
        self.status().to_string()
    }

    fn stop_booting(&self) -> usize {
        Pool::stop_booting(self)
    }

    fn drain(&self) -> usize {
        Pool::drain(self)
    }
}

/// The boot log's line for a job that took a VM of the pool: how the VM came to be (restored
/// from a snapshot, or booted and why not restored) and what taking it cost.
fn hit_note(name: &str, d: &VmDetails) -> Option<String> {
    let c = d.pool?;
    let how = match (&d.restored, &d.cold_boot, c.on_demand_ms) {
        (Some(r), _, Some(ms)) => format!(
            "no VM was ready: restored from snapshot {} on the job's path in {ms} ms, its state checked in {} ms",
            r.snapshot, r.feed_ms
        ),
        (Some(r), _, None) => {
            format!("restored ahead from snapshot {}, idle for {} ms", r.snapshot, c.idle_ms)
        }
        (None, Some(why), _) => format!("booted ahead cold ({why}), idle for {} ms", c.idle_ms),
        (None, None, _) => format!("booted ahead, idle for {} ms", c.idle_ms),
    };
    Some(format!(
        "took VM {name} from the pool ({how}; workspace disk written in {} ms, mounted in {} ms)",
        c.disk_build_ms, c.mount_ms
    ))
}

/// The boot log's line for a job that found no VM of the pool.
fn miss_note(why: &str) -> String {
    format!("no VM of the pool for this job ({why}): booting one")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hit_says_how_its_vm_came_to_be() {
        let mut d = VmDetails {
            pool: Some(crate::sandbox::microvm::PoolClaim {
                idle_ms: 5,
                disk_build_ms: 6,
                mount_ms: 7,
                on_demand_ms: None,
            }),
            ..Default::default()
        };
        assert_eq!(
            hit_note("vm-1", &d).unwrap(),
            "took VM vm-1 from the pool (booted ahead, idle for 5 ms; workspace disk written in 6 ms, mounted in 7 ms)"
        );
        d.cold_boot = Some("restoring snapshot k failed: snapshot k is corrupted".into());
        assert!(hit_note("vm-1", &d).unwrap().contains("booted ahead cold (restoring snapshot k failed"));
        d.restored = Some(crate::sandbox::microvm::Restored { snapshot: "k".into(), feed_ms: 40 });
        assert!(hit_note("vm-1", &d).unwrap().contains("restored ahead from snapshot k, idle for 5 ms"));
        d.pool.as_mut().unwrap().on_demand_ms = Some(300);
        assert!(hit_note("vm-1", &d)
            .unwrap()
            .contains("restored from snapshot k on the job's path in 300 ms"));
    }

    #[test]
    fn a_miss_reads_as_it_always_did() {
        assert_eq!(miss_note("no VM ready"), "no VM of the pool for this job (no VM ready): booting one");
    }
}
