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

    fn take(&self, req: &BootRequest) -> WarmClaim {
        match self.claim(req) {
            Claim::Hit(record) => {
                let note = VmDetails::of(&record).ok().flatten().and_then(|d| d.pool).map(|c| {
                    format!(
                        "took VM {} from the pool (booted ahead, idle for {} ms; workspace disk written in \
                         {} ms, mounted in {} ms)",
                        record.name, c.idle_ms, c.disk_build_ms, c.mount_ms
                    )
                });
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

    fn stop_booting(&self) -> bool {
        Pool::stop_booting(self)
    }

    fn drain(&self) -> usize {
        Pool::drain(self)
    }
}

/// The boot log's line for a job that found no VM of the pool.
fn miss_note(why: &str) -> String {
    format!("no VM of the pool for this job ({why}): booting one")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_miss_reads_as_it_always_did() {
        assert_eq!(miss_note("no VM ready"), "no VM of the pool for this job (no VM ready): booting one");
    }
}
