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
}
