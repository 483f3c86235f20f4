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

use super::{ImageDisk, MicroVm};
use crate::guest::protocol::{CacheBind, CACHE_LAYER_PREFIX};
use crate::sandbox::{AttachedCache, BootRequest, CacheMount, RecordDetails, SandboxRecord};

/// The reference a cache version's disk is recorded under among the VM's disks (no image
/// reference has a space).
const CACHE_DISK: &str = "executor cache";

impl MicroVm {
    /// Boots the VM of a job whose caches hit: its images' disks, then each cache version's.
    pub(super) fn boot_with_caches(&self, req: &BootRequest, disks: &[PathBuf]) -> Result<SandboxRecord> {
        self.boot_job(req, self::disks(disks))
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
                // The guest's owners come back in the image store's range (workspace.rs).
                uid_base: crate::image::ID_BASE,
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

/// The cache version disks `disks` as a VM's disks (after its images').
pub(super) fn disks(disks: &[PathBuf]) -> Vec<ImageDisk> {
    disks
        .iter()
        .map(|d| ImageDisk {
            reference: CACHE_DISK.into(),
            digest: version_of(d).map(|v| v.display().to_string()).unwrap_or_default(),
            disk: d.clone(),
        })
        .collect()
}

/// The cache version directory a disk belongs to (`<version>/disk.ext4`).
fn version_of(disk: &Path) -> Option<PathBuf> {
    disk.parent().map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::microvm::VmDetails;
    use crate::sandbox::RuntimeKind;

    /// Each cache path's bind names the VM's disk of its version (by the disk's directory) and
    /// its directory in the tree; a miss names none; a hit whose disk the VM lacks is refused;
    /// the uppers are in the host workspace's layers, whiteouts as files.
    #[test]
    fn binds_name_the_disk_of_each_version() {
        let vm = MicroVm::new(crate::sandbox::RuntimeOptions::default());
        let v = PathBuf::from("/s/caches/entries/k/v-1");
        let det = VmDetails {
            images: vec![
                ImageDisk {
                    reference: "busybox".into(),
                    digest: "sha256:x".into(),
                    disk: "/s/vm/images/x.ext4".into(),
                },
                ImageDisk { reference: CACHE_DISK.into(), digest: String::new(), disk: v.join("disk.ext4") },
            ],
            ..Default::default()
        };
        let mut sb = SandboxRecord::new(RuntimeKind::Microvm, "vm-1", PathBuf::from("/s/sandboxes/vm-1"));
        det.store(&mut sb);
        let ws = PathBuf::from("/s/workspaces/1");
        let mounts = [
            CacheMount { target: "/root/.npm".into(), lower: Some(v.join("tree/p0")), workspace: ws.clone() },
            CacheMount {
                target: "node_modules".into(),
                lower: Some(v.join("tree/p1")),
                workspace: ws.clone(),
            },
            CacheMount { target: "/root/.go".into(), lower: None, workspace: ws.clone() },
        ];
        let mut other = sb.clone();
        let attached = vm.attach(&mut sb, &mounts).unwrap();
        assert_eq!(attached[1].upper, ws.join(".executor-cache-1/upper"));
        assert!(attached.iter().all(|a| a.whiteout_files && a.uid_base == crate::image::ID_BASE));
        let binds = VmDetails::of(&sb).unwrap().unwrap().caches;
        let want = |target: &str, disk, sub: &str, layer: &str| CacheBind {
            target: target.into(),
            disk,
            sub: sub.into(),
            layer: layer.into(),
        };
        assert_eq!(
            binds,
            vec![
                want("/root/.npm", Some(1), "p0", ".executor-cache-0"),
                want("node_modules", Some(1), "p1", ".executor-cache-1"),
                want("/root/.go", None, "p2", ".executor-cache-2"),
            ]
        );
        assert!(vm.attach(&mut sb, &mounts).is_err(), "attached once");
        let lost = [CacheMount {
            target: "/x".into(),
            lower: Some(PathBuf::from("/s/caches/entries/k/v-2/tree/p0")),
            workspace: ws,
        }];
        let err = vm.attach(&mut other, &lost).unwrap_err();
        assert!(format!("{err:#}").contains("without the disk of cache"), "{err:#}");
    }
}
