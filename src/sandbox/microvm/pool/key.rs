//! What defines a pool VM ([`PoolKey`]: kernel, initramfs, accelerator, limits, disk size,
//! network mode and images by digest), and the images the pool boots its next VMs with: those
//! of recent jobs, remembered across restarts in `vm/pool-images.json`.

use anyhow::Result;
use std::path::{Path, PathBuf};

use super::Pool;
use crate::sandbox::Limits;

/// Most step images a pool VM carries (the most recently used first).
const MAX_IMAGES: usize = 8;

/// The workspace disk of a pool VM when there is no disk limit (sparse: only what the job's
/// files use takes space). A job whose workspace needs more is a miss.
pub(crate) const DEFAULT_POOL_DISK: u64 = 4 << 30;

/// Everything that defines a pool VM but its images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BaseKey {
    pub kernel: String,
    pub initramfs: String,
    pub accel: String,
    pub limits: Limits,
    pub disk_bytes: u64,
    pub network: String,
}

/// Everything that defines a pool VM: a VM serves a job only when its base key is the current
/// one and it carries each of the job's images at the digest the image store resolves now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PoolKey {
    pub base: BaseKey,
    /// (reference, digest), sorted.
    pub images: Vec<(String, String)>,
}

impl PoolKey {
    /// Whether a VM of this key may serve a job that needs `images` (reference, digest) on a
    /// host whose current base key is `base`.
    pub(crate) fn serves(&self, base: &BaseKey, images: &[(String, String)]) -> bool {
        self.base == *base && images.iter().all(|i| self.images.contains(i))
    }
}

/// A file's identity for a key: path, size and modification time.
fn file_id(p: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(p) {
        Ok(m) => format!("{} {} {}.{}", p.display(), m.len(), m.mtime(), m.mtime_nsec()),
        Err(_) => format!("{} missing", p.display()),
    }
}

pub(super) fn wanted_path(state_dir: &Path) -> PathBuf {
    crate::vm::vm_dir(state_dir).join("pool-images.json")
}

impl Pool {
    pub(super) fn disk_bytes(&self) -> u64 {
        if self.cfg.limits.disk_bytes > 0 {
            self.cfg.limits.disk_bytes
        } else {
            DEFAULT_POOL_DISK
        }
    }

    /// The base key of a VM booted now.
    pub(crate) fn base_key(&self) -> Result<BaseKey> {
        let m = crate::vm::installed(&self.rt.opts.state_dir)?;
        let (accel, _) = self.rt.choose_accel()?;
        Ok(BaseKey {
            kernel: format!("{} {}", m.kernel_version, file_id(&m.vmlinux)),
            initramfs: format!("{} {}", m.initramfs_inputs, file_id(&m.initramfs)),
            accel: accel.to_string(),
            limits: self.cfg.limits.clone(),
            disk_bytes: self.disk_bytes(),
            network: format!("{:?}", self.rt.opts.network.mode).to_lowercase(),
        })
    }

    /// (reference, digest) of each image, sorted; images that do not resolve are left out.
    pub(super) fn resolve(&self, images: &[String]) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = images
            .iter()
            .filter_map(|r| self.rt.resolve_image(r).ok().map(|(digest, _)| (r.clone(), digest)))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    pub(super) fn current_key(&self) -> Result<PoolKey> {
        let wanted = self.state().wanted.clone();
        Ok(PoolKey { base: self.base_key()?, images: self.resolve(&wanted) })
    }

    /// Remembers a job's images (most recent first), for the VMs booted next.
    pub(super) fn want(&self, images: &[String]) {
        let mut st = self.state();
        let mut wanted: Vec<String> = images.to_vec();
        for w in &st.wanted {
            if !wanted.contains(w) {
                wanted.push(w.clone());
            }
        }
        wanted.truncate(MAX_IMAGES);
        if wanted != st.wanted {
            st.wanted = wanted.clone();
            drop(st);
            let path = wanted_path(&self.rt.opts.state_dir);
            if let Ok(bytes) = serde_json::to_vec(&wanted) {
                let _ = crate::base::fs::write_atomic(&path, &bytes);
            }
            self.cv.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(mem: u64) -> BaseKey {
        BaseKey {
            kernel: "6.1 vmlinux 1 2.3".into(),
            initramfs: "abc initramfs 4 5.6".into(),
            accel: "tcg".into(),
            limits: Limits { cpus: 1, memory_bytes: mem, disk_bytes: 0, pids: 0 },
            disk_bytes: DEFAULT_POOL_DISK,
            network: "none".into(),
        }
    }

    #[test]
    fn a_vm_serves_only_jobs_of_its_key_and_images() {
        let img = |r: &str, d: &str| (r.to_string(), d.to_string());
        let key = PoolKey {
            base: base(512 << 20),
            images: vec![img("alpine", "sha256:a"), img("busybox", "sha256:b")],
        };
        assert!(key.serves(&base(512 << 20), &[img("busybox", "sha256:b")]));
        assert!(key.serves(&base(512 << 20), &[]));
        // An image tag that moved to another digest, an image it lacks, other limits, another
        // kernel or initramfs, another network mode: all misses.
        assert!(!key.serves(&base(512 << 20), &[img("busybox", "sha256:new")]));
        assert!(!key.serves(&base(512 << 20), &[img("debian", "sha256:d")]));
        assert!(!key.serves(&base(1 << 30), &[]));
        let mut other = base(512 << 20);
        other.kernel = "6.1 vmlinux 1 9.9".into();
        assert!(!key.serves(&other, &[]));
        let mut other = base(512 << 20);
        other.initramfs = "def initramfs 4 5.6".into();
        assert!(!key.serves(&other, &[]));
        let mut other = base(512 << 20);
        other.network = "internet".into();
        assert!(!key.serves(&other, &[]));
    }
}
