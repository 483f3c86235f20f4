//! What defines a pool VM ([`PoolKey`]: kernel, initramfs, accelerator, limits, disk size,
//! network mode and its exact set of images by digest), and the images the pool boots its next
//! VMs with: the set of the last job that asked, remembered across restarts in
//! `vm/pool-images.json`. A VM serves only a job naming exactly its images: every image disk is
//! readable by root in the guest, so a VM must never carry an image its job did not name (one
//! pulled with another job's credentials, say). The same holds for the disks of dependency
//! caches (caches.rs): the next VMs carry those the last job hit, in memory only, and a VM
//! carrying them serves only a job that hit exactly those cache versions (another repository's
//! job never sees them).

use anyhow::Result;
use std::path::{Path, PathBuf};

use super::Pool;
use crate::sandbox::Limits;

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
/// one and its images are exactly the job's, at the digests the image store resolves now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PoolKey {
    pub base: BaseKey,
    /// (reference, digest), sorted.
    pub images: Vec<(String, String)>,
    /// The read-only disks of the cache versions a job hit, in its caches' order.
    pub caches: Vec<PathBuf>,
}

impl PoolKey {
    /// Whether a VM of this key may serve a job that needs `images` (reference, digest; sorted
    /// and without duplicates, as [`Pool::resolve`] gives them) on a host whose current base
    /// key is `base` and whose caches hit the versions of the disks `caches`: the same base,
    /// the very same images and cache disks, no more.
    pub(crate) fn serves(&self, base: &BaseKey, images: &[(String, String)], caches: &[PathBuf]) -> bool {
        self.base == *base && self.images == images && self.caches == caches
    }
}

pub(super) fn wanted_path(state_dir: &Path) -> PathBuf {
    crate::vm::vm_dir(state_dir).join("pool-images.json")
}

/// `vm/pool-images.json`: `{"images": [...]}`, the one set the next VMs boot with. The file of
/// an older executor (a bare list: the union of several jobs' references) is not read.
#[derive(serde::Serialize, serde::Deserialize)]
struct Wanted {
    images: Vec<String>,
}

pub(super) fn read_wanted(state_dir: &Path) -> Vec<String> {
    std::fs::read(wanted_path(state_dir))
        .ok()
        .and_then(|b| serde_json::from_slice::<Wanted>(&b).ok())
        .map(|w| image_set(&w.images))
        .unwrap_or_default()
}

fn write_wanted(state_dir: &Path, images: &[String]) {
    if let Ok(bytes) = serde_json::to_vec(&Wanted { images: images.to_vec() }) {
        let _ = crate::base::fs::write_atomic(&wanted_path(state_dir), &bytes);
    }
}

/// A job's image references as one set: sorted, without duplicates.
pub(super) fn image_set(images: &[String]) -> Vec<String> {
    let mut v = images.to_vec();
    v.sort();
    v.dedup();
    v
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
        let (kernel, initramfs) = super::super::snapshot::installed_ids(&self.rt.opts.state_dir)?;
        let (accel, _) = self.rt.choose_accel()?;
        Ok(BaseKey {
            kernel,
            initramfs,
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

    /// The key of the VMs to make now: the wanted images, and the wanted cache disks while
    /// each of them still exists (a version evicted or replaced is wanted no more).
    pub(super) fn current_key(&self) -> Result<PoolKey> {
        let (wanted, mut caches) = {
            let st = self.state();
            (st.wanted.clone(), st.wanted_caches.clone())
        };
        if !caches.iter().all(|d| d.is_file()) {
            caches.clear();
            self.state().wanted_caches.clear();
        }
        Ok(PoolKey { base: self.base_key()?, images: self.resolve(&wanted), caches })
    }

    /// Remembers a job's image set and the disks of the caches it hit, and only them, for the
    /// VMs booted next: VMs of the previous set are discarded by the booter (they could serve no
    /// job but one naming that set and hitting those caches).
    pub(super) fn want(&self, images: &[String], caches: &[PathBuf]) {
        let mut st = self.state();
        let wanted = image_set(images);
        let changed = wanted != st.wanted || caches != st.wanted_caches;
        st.wanted_caches = caches.to_vec();
        if wanted != st.wanted {
            st.wanted = wanted.clone();
            drop(st);
            write_wanted(&self.rt.opts.state_dir, &wanted);
        } else {
            drop(st);
        }
        if changed {
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
            caches: vec![],
        };
        let both = [img("alpine", "sha256:a"), img("busybox", "sha256:b")];
        assert!(key.serves(&base(512 << 20), &both, &[]));
        // A job naming fewer images than the VM carries would see the others' disks: a miss.
        assert!(!key.serves(&base(512 << 20), &[img("busybox", "sha256:b")], &[]));
        assert!(!key.serves(&base(512 << 20), &[], &[]));
        // An image tag that moved to another digest, an image it lacks, other limits, another
        // kernel or initramfs, another network mode: all misses.
        assert!(!key.serves(
            &base(512 << 20),
            &[img("alpine", "sha256:a"), img("busybox", "sha256:new")],
            &[]
        ));
        assert!(!key.serves(&base(512 << 20), &[img("alpine", "sha256:a"), img("debian", "sha256:d")], &[]));
        assert!(!key.serves(&base(1 << 30), &both, &[]));
        let mut other = base(512 << 20);
        other.kernel = "6.1 vmlinux 1 9.9".into();
        assert!(!key.serves(&other, &both, &[]));
        let mut other = base(512 << 20);
        other.initramfs = "def initramfs 4 5.6".into();
        assert!(!key.serves(&other, &both, &[]));
        let mut other = base(512 << 20);
        other.network = "internet".into();
        assert!(!key.serves(&other, &both, &[]));
        let empty = PoolKey { base: base(512 << 20), images: vec![], caches: vec![] };
        assert!(empty.serves(&base(512 << 20), &[], &[]) && !empty.serves(&base(512 << 20), &both[..1], &[]));
        // Cache disks: exactly the job's hits, in its order; none for a job that hit none.
        let v = |n: &str| PathBuf::from(format!("/s/caches/entries/k/{n}/disk.ext4"));
        let cached = PoolKey { base: base(512 << 20), images: vec![], caches: vec![v("v-1"), v("v-2")] };
        assert!(cached.serves(&base(512 << 20), &[], &[v("v-1"), v("v-2")]));
        assert!(!cached.serves(&base(512 << 20), &[], &[]));
        assert!(!cached.serves(&base(512 << 20), &[], &[v("v-1")]));
        assert!(!cached.serves(&base(512 << 20), &[], &[v("v-2"), v("v-1")]));
        assert!(!empty.serves(&base(512 << 20), &[], &[v("v-1")]));
    }

    #[test]
    fn the_pool_remembers_one_jobs_image_set() {
        let set = image_set(&["b".into(), "a".into(), "b".into()]);
        assert_eq!(set, ["a", "b"]);
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(crate::vm::vm_dir(d.path())).unwrap();
        // The file of an older executor: a union of many jobs' references, dropped.
        std::fs::write(wanted_path(d.path()), br#"["a","b","c"]"#).unwrap();
        assert!(read_wanted(d.path()).is_empty());
        write_wanted(d.path(), &set);
        assert_eq!(read_wanted(d.path()), set);
        let text = std::fs::read_to_string(wanted_path(d.path())).unwrap();
        assert_eq!(text, r#"{"images":["a","b"]}"#);
    }
}
