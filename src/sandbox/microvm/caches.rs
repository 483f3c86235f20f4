//! Dependency caches on the microVM (docs/caches.md). The `microvm` machine has no disk hotplug,
//! so a cache version reaches the guest as a read-only ext4 disk of its tree (made once per
//! version beside it in the store, disk.rs) given to QEMU at the boot, after the images'; a job
//! whose caches all miss needs no disk and may take a pool VM. Attaching only records, for each
//! cache path, which disk and directory is its lower and which layer at the top of /data is its
//! upper; every step's `Run` carries that list and the agent mounts each overlay once and binds
//! it into the step's root (guest/caches.rs). Nothing is copied: a hit costs its disk at the boot
//! and a few mounts in the guest. Before the VM goes, a job that saves its caches fetches the
//! layers back (a `Sync` of them only, whiteouts as OCI layer files), unpacked as hostile input.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::boot::VmBoot;
use super::{ImageDisk, MicroVm};
use crate::guest::protocol::{CacheBind, CACHE_LAYER_PREFIX};
use crate::sandbox::{AttachedCache, BootRequest, CacheMount, RecordDetails, SandboxRecord};

/// The reference a cache version's disk is recorded under among the VM's disks (no image
/// reference has a space).
const CACHE_DISK: &str = "executor cache";

impl MicroVm {
    /// Boots the VM of a job whose caches hit: its images' disks, then each cache version's.
    pub(super) fn boot_with_caches(&self, req: &BootRequest, disks: &[PathBuf]) -> Result<SandboxRecord> {
        let extra = disks
            .iter()
            .map(|d| ImageDisk {
                reference: CACHE_DISK.into(),
                digest: version_of(d).map(|v| v.display().to_string()).unwrap_or_default(),
                disk: d.clone(),
            })
            .collect();
        let (accel, why) = self.choose_accel()?;
        let timeout =
            if accel == super::Accel::Kvm { Duration::from_secs(20) } else { Duration::from_secs(120) };
        let boot = VmBoot::new(Some(req.workspace), &req.images, accel, why, req.limits, timeout)
            .with_network(super::net::request(&self.opts, req.reach()))
            .with_extra_disks(extra);
        self.boot_retrying(req.name_prefix, &boot)
            .with_context(|| format!("booting a VM for job {}", req.job_uid))
    }

    /// Records the caches in the VM's details for every later step (see the module doc).
    pub(super) fn attach(
        &self,
        sandbox: &mut SandboxRecord,
        mounts: &[CacheMount],
    ) -> Result<Vec<AttachedCache>> {
        let mut det = Self::details(sandbox)?;
        if !det.caches.is_empty() {
            bail!("VM {} has its caches attached already", sandbox.name);
        }
        let mut binds = Vec::new();
        let mut out = Vec::new();
        for (i, m) in mounts.iter().enumerate() {
            let (disk, sub) = match &m.lower {
                Some(lower) => {
                    let version = lower.parent().and_then(Path::parent).map(Path::to_path_buf);
                    let sub = lower.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    let disk = det
                        .images
                        .iter()
                        .position(|d| d.reference == CACHE_DISK && version_of(&d.disk) == version)
                        .with_context(|| {
                            format!(
                                "VM {} was booted without the disk of cache {}",
                                sandbox.name,
                                lower.display()
                            )
                        })?;
                    (Some(disk as u32), sub)
                }
                None => (None, format!("p{i}")),
            };
            let layer = format!("{CACHE_LAYER_PREFIX}{i}");
            out.push(AttachedCache {
                upper: m.workspace.join(&layer).join("upper"),
                // The guest's owners come back as the host's root (the workspace tar keeps none).
                uid_base: 0,
                whiteout_files: true,
            });
            binds.push(CacheBind { target: m.target.clone(), disk, sub, layer });
        }
        det.caches = binds;
        det.store(sandbox);
        Ok(out)
    }

    /// Brings the VM's cache layers into the host workspace (only them).
    pub(super) fn fetch_layers(&self, sandbox: &SandboxRecord, workspace: &Path) -> Result<()> {
        if Self::details(sandbox)?.caches.is_empty() {
            return Ok(());
        }
        super::workspace::unpack_cache_layers(self.sync_stream(sandbox, true)?, workspace)
    }
}

/// The cache version directory a disk belongs to (`<version>/disk.ext4`).
fn version_of(disk: &Path) -> Option<PathBuf> {
    disk.parent().map(Path::to_path_buf)
}
