//! What the microvm runtime records about a VM in the run document (the `details` of its
//! [`crate::sandbox::SandboxRecord`]), and the accelerator setting those records name.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use crate::network::JobNetwork;
use crate::sandbox::{RecordDetails, RuntimeKind};

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM where the cached boot probe proved it works, else TCG if allowed.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => bail!("unknown accelerator {s:?} (auto, kvm or tcg)"),
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// What the microvm runtime records about one VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmDetails {
    pub accel: Accel,
    pub accel_reason: String,
    pub socket: PathBuf,
    pub console: PathBuf,
    pub workspace_disk: PathBuf,
    pub workspace_disk_bytes: u64,
    /// Step images in disk order: the agent mounts disk `i` at `/images/i`.
    pub images: Vec<ImageDisk>,
    pub phases: BootPhases,
    /// The unprivileged user QEMU runs as (none: it runs as the executor's own user).
    #[serde(default)]
    pub qemu_user: Option<String>,
    /// The job's network (`EXECUTOR_NETWORK=internet`): its TAP device and addresses.
    #[serde(default)]
    pub network: Option<JobNetwork>,
    /// Set when the VM came from the pool of VMs booted ahead of demand (and so its boot was
    /// not on the job's path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolClaim>,
    /// Set when the VM was restored from a snapshot rather than booted (snapshot.rs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored: Option<Restored>,
    /// Why a VM that could have been restored from a snapshot was booted instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_boot: Option<String>,
    /// The job's dependency caches, given to every step (caches.rs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub caches: Vec<crate::guest::protocol::CacheBind>,
}

/// A VM restored from a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Restored {
    /// The snapshot's id (its key's).
    pub snapshot: String,
    /// Feeding its saved state to QEMU, checksum checked.
    pub feed_ms: u64,
}

impl RecordDetails for VmDetails {
    const RUNTIME: RuntimeKind = RuntimeKind::Microvm;
}

/// How a job took a VM of the pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolClaim {
    /// How long the VM had been waiting, booted, for a job.
    pub idle_ms: u64,
    /// Writing the job's workspace filesystem into the VM's disk.
    pub disk_build_ms: u64,
    /// The agent mounting it, asked over the channel of the boot.
    pub mount_ms: u64,
    /// Set when no VM was ready and one was restored from a snapshot on the job's path: the
    /// restore's time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_demand_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageDisk {
    pub reference: String,
    pub digest: String,
    pub disk: PathBuf,
}

/// Milliseconds spent in each boot phase.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BootPhases {
    pub disk_build_ms: u64,
    pub qemu_start_ms: u64,
    pub kernel_boot_ms: u64,
    pub agent_ready_ms: u64,
    pub total_ms: u64,
}
