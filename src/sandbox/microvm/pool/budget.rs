//! The memory the pool may use: running jobs' VMs at their full size, idle pool VMs at their
//! measured resident memory, within three quarters of what the host had available.

use anyhow::{Context, Result};

use super::super::{DEFAULT_MEMORY, QEMU_OVERHEAD};
use crate::sandbox::Limits;

/// What an idle pool VM is assumed to hold in memory before it is measured (QEMU's resident
/// memory after a boot under TCG was about 230 MiB with a 512 MiB guest; plus its console
/// reader).
pub(crate) const IDLE_ESTIMATE: u64 = 320 << 20;

/// Memory the loop may commit to VMs: running jobs at their full size (guest memory plus
/// QEMU's overhead), idle pool VMs at their measured resident memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Budget {
    /// Three quarters of the host's `MemAvailable` when the loop started.
    pub total_bytes: u64,
    /// What one job's VM may grow to.
    pub job_bytes: u64,
}

impl Budget {
    /// The budget of this host for VMs of `limits`.
    pub(crate) fn for_host(limits: &Limits) -> Result<Budget> {
        Ok(Budget { total_bytes: mem_available()? / 4 * 3, job_bytes: vm_bytes(limits) })
    }

    /// The pool size when `EXECUTOR_VM_POOL_SIZE` is not set: as many idle VMs (at
    /// [`IDLE_ESTIMATE`] each) as fit beside `max_jobs` running jobs at their full size, but no
    /// more than `max_jobs` (more jobs than that cannot start at once).
    pub(crate) fn default_pool_size(&self, max_jobs: usize) -> usize {
        let left = self.total_bytes.saturating_sub(self.job_bytes.saturating_mul(max_jobs as u64));
        ((left / IDLE_ESTIMATE) as usize).min(max_jobs)
    }

    /// How many more idle VMs (at [`IDLE_ESTIMATE`] each) fit beside `running` jobs at their
    /// full size and `idle_bytes` of VMs ready or being made.
    pub(crate) fn room(&self, running: usize, idle_bytes: u64) -> usize {
        let committed = self.job_bytes.saturating_mul(running as u64).saturating_add(idle_bytes);
        (self.total_bytes.saturating_sub(committed) / IDLE_ESTIMATE) as usize
    }
}

/// What one job's VM may use: guest memory plus QEMU's own (its cgroup's limit).
pub(crate) fn vm_bytes(limits: &Limits) -> u64 {
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

pub(super) fn rss_bytes(pid: Option<i32>) -> u64 {
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn room_counts_jobs_and_every_vm_ready_or_being_made() {
        let b = Budget { total_bytes: 10 * IDLE_ESTIMATE, job_bytes: 3 * IDLE_ESTIMATE };
        assert_eq!(b.room(0, 0), 10);
        assert_eq!(b.room(2, 0), 4);
        // Two VMs being made (each at the estimate) and one ready of half the estimate.
        assert_eq!(b.room(2, 2 * IDLE_ESTIMATE + IDLE_ESTIMATE / 2), 1);
        assert_eq!(b.room(3, 2 * IDLE_ESTIMATE), 0);
        assert_eq!(b.room(4, 0), 0, "jobs over the budget leave no room, never a wrap");
    }
}
