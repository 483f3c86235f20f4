//! The cache budget (`EXECUTOR_IMAGE_CACHE_SIZE`): what the store really takes on disk (image
//! trees by their allocated blocks, and the layer blobs of pulls in progress), and `prune`, which
//! removes the least recently used pulled images until the store fits.
//!
//! Rules:
//! - an image a sandbox uses (its `users/` record, written while `vm-boot` holds the janitor lock
//!   shared) is never removed; callers prune under that lock taken exclusively, so a boot between
//!   resolving an image and recording its use cannot be overtaken;
//! - only pulled images are removed for the budget: a later job pulls them again, where an
//!   imported or built image would be lost; they count in the total all the same;
//! - trees no name and no sandbox use, and blobs no pull holds and no named tree lists, go
//!   whatever the budget; blobs named trees list (kept so that later pulls share layers) go
//!   before any image once the store is over the budget;
//! - "used" is the last time the store resolved the image (the mtime of its metadata file).

use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::SystemTime;

use super::ImageStore;

/// One image (tree) `prune` removed, or would remove with `--dry-run`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PrunedImage {
    pub digest: String,
    /// The names that pointed at it (empty: it had none left).
    pub names: Vec<String>,
    /// Bytes it took on disk.
    pub bytes: u64,
}

/// What a prune did.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PruneReport {
    pub images: Vec<PrunedImage>,
    /// Blobs (`sha256:...`) removed and their bytes.
    pub blobs: Vec<(String, u64)>,
    /// What the store took before and after.
    pub before: u64,
    pub after: u64,
    /// Images over the budget that stayed because a sandbox uses them or they cannot be pulled again.
    pub kept: Vec<String>,
}

impl PruneReport {
    pub fn freed(&self) -> u64 {
        self.before.saturating_sub(self.after)
    }
}

/// Bytes allocated to a tree: every entry's blocks, a file with several links once; never
/// following symlinks.
pub(crate) fn tree_disk_bytes(root: &Path) -> Result<u64> {
    let mut total = 0u64;
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = fs::symlink_metadata(&p).with_context(|| format!("inspecting {}", p.display()))?;
        if md.nlink() > 1 && !md.is_dir() && !seen.insert((md.dev(), md.ino())) {
            continue;
        }
        total += md.blocks() * 512;
        if md.is_dir() {
            for e in fs::read_dir(&p).with_context(|| format!("reading {}", p.display()))? {
                stack.push(e?.path());
            }
        }
    }
    Ok(total)
}

struct Tree {
    digest: String,
    bytes: u64,
    used: SystemTime,
    pullable: bool,
    layers: Vec<String>,
}

impl ImageStore {
    /// Marks `digest` as used now (for the least-recently-used order); best effort.
    pub(crate) fn touch(&self, digest: &str) {
        if let Ok(f) = fs::File::options().write(true).open(self.meta_path(digest)) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    fn trees(&self) -> Result<Vec<Tree>> {
        let mut out = Vec::new();
        for (digest, path) in self.tree_dirs()? {
            let meta = self.read_meta(&digest).ok();
            let used = fs::metadata(self.meta_path(&digest))
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let bytes = match meta.as_ref().map(|m| m.disk).filter(|d| *d > 0) {
                Some(d) => d,
                None => tree_disk_bytes(&path)?,
            };
            let pullable = meta.as_ref().is_some_and(|m| m.source == "pull");
            let layers = meta.map(|m| m.layers).unwrap_or_default();
            out.push(Tree { digest, bytes, used, pullable, layers });
        }
        Ok(out)
    }

    /// Blob files (name, bytes, whether a pull holds it, mtime).
    fn blobs(&self) -> Result<Vec<(String, u64, bool, SystemTime)>> {
        let dir = self.dir.join("blobs/sha256");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let fname = entry.file_name().to_string_lossy().to_string();
            let Ok(md) = entry.metadata() else { continue };
            if fname.ends_with(".lock") {
                continue;
            }
            // Partial downloads (longer names) belong to a pull that holds the blob's lock.
            let hex = fname.get(..64).unwrap_or(&fname);
            let held = match fs::File::open(dir.join(format!("{hex}.lock"))) {
                Ok(f) => nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err(),
                Err(_) => false,
            };
            let mtime = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            out.push((fname, md.blocks() * 512, held || entry.file_name().len() != 64, mtime));
        }
        Ok(out)
    }

    /// Bytes the store takes on disk: trees and blobs.
    #[cfg(test)]
    fn disk_usage(&self) -> Result<u64> {
        let trees: u64 = self.trees()?.iter().map(|t| t.bytes).sum();
        let blobs: u64 = self.blobs()?.iter().map(|b| b.1).sum();
        Ok(trees + blobs)
    }

    /// Removes what no one needs (trees without names or users, blobs no pull holds), then the
    /// least recently used pulled images not in use until the store takes at most `budget` bytes.
    /// With `dry_run` only reports. The caller holds the janitor lock exclusively.
    pub fn prune(&self, budget: Option<u64>, dry_run: bool) -> Result<PruneReport> {
        let _lock = self.lock()?;
        let mut refs = self.read_refs()?;
        let in_use: HashSet<String> = self.digests_in_use()?.into_iter().collect();
        let mut names: HashMap<String, Vec<String>> = HashMap::new();
        for (k, v) in &refs {
            names.entry(v.clone()).or_default().push(k.clone());
        }
        let mut trees = self.trees()?;
        let blobs = self.blobs()?;
        let before = trees.iter().map(|t| t.bytes).sum::<u64>() + blobs.iter().map(|b| b.1).sum::<u64>();
        let mut report = PruneReport { before, after: before, ..Default::default() };
        // Blobs: those no named tree lists always go; the rest (kept so that later pulls share
        // layers) go before any image when the store is over the budget, oldest first.
        let listed: HashSet<String> = trees
            .iter()
            .filter(|t| names.contains_key(&t.digest) || in_use.contains(&t.digest))
            .flat_map(|t| t.layers.iter().cloned())
            .collect();
        let mut blobs = blobs;
        blobs.sort_by_key(|b| (listed.contains(&format!("sha256:{}", b.0)), b.3));
        for (name, bytes, held, _) in blobs {
            let over = budget.is_some_and(|b| report.after > b);
            if held || (listed.contains(&format!("sha256:{name}")) && !over) {
                continue;
            }
            if !dry_run {
                let _ = fs::remove_file(self.dir.join("blobs/sha256").join(&name));
            }
            report.after -= bytes;
            report.blobs.push((format!("sha256:{name}"), bytes));
        }
        // Oldest first; trees without a name before everything else.
        trees.sort_by_key(|t| (names.contains_key(&t.digest), t.used, t.digest.clone()));
        for t in trees {
            let named = names.contains_key(&t.digest);
            if in_use.contains(&t.digest) {
                if budget.is_some_and(|b| report.after > b) {
                    report.kept.push(format!("{} (in use)", t.digest));
                }
                continue;
            }
            let over = budget.is_some_and(|b| report.after > b);
            if named && !over {
                continue;
            }
            if named && !t.pullable {
                report.kept.push(format!("{} (imported or built here: cannot be pulled again)", t.digest));
                continue;
            }
            let tree_names = names.get(&t.digest).cloned().unwrap_or_default();
            if !dry_run {
                refs.retain(|_, v| *v != t.digest);
                self.write_refs(&refs)?;
                self.remove_tree(&t.digest)?;
            }
            report.after -= t.bytes;
            report.images.push(PrunedImage { digest: t.digest, names: tree_names, bytes: t.bytes });
        }
        Ok(report)
    }

    /// Removes the tree `digest` and its metadata; the store lock is held.
    pub(crate) fn remove_tree(&self, digest: &str) -> Result<()> {
        let tree = self.tree_path(digest);
        // Rename first so that a half-deleted tree is never visible under its digest.
        let doomed = self.tmp_dir().join(format!("rm-{}", uuid::Uuid::new_v4().simple()));
        fs::rename(&tree, &doomed).with_context(|| format!("moving {}", tree.display()))?;
        let _ = fs::remove_file(self.meta_path(digest));
        fs::remove_dir_all(&doomed).with_context(|| format!("removing {}", doomed.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ImageMeta;

    fn add(store: &ImageStore, name: &str, content: &str, source: &str) -> String {
        let stage = store.staging("t").unwrap().keep();
        fs::write(stage.join("f"), content.repeat(20_000)).unwrap();
        let (digest, size) = crate::image::tree_digest(&stage).unwrap();
        let meta = ImageMeta {
            digest: digest.clone(),
            env: vec![],
            workdir: String::new(),
            user: String::new(),
            size,
            disk: 0,
            created: crate::image::now(),
            source: source.into(),
            layers: vec![],
            private: false,
        };
        store.commit_tree_as(&stage, &meta, name).unwrap();
        digest
    }

    fn set_used(store: &ImageStore, digest: &str, secs: u64) {
        let f = fs::File::options().write(true).open(store.meta_path(digest)).unwrap();
        f.set_modified(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs)).unwrap();
    }

    #[test]
    fn prune_removes_least_recently_used_pulled_images_not_in_use() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(&tmp.path().join("images")).unwrap();
        let old = add(&store, "reg.example/old:1", "a", "pull");
        let mid = add(&store, "reg.example/mid:1", "b", "pull");
        let new = add(&store, "reg.example/new:1", "c", "pull");
        let own = add(&store, "mine:1", "d", "import");
        let used = add(&store, "reg.example/used:1", "e", "pull");
        for (d, t) in [(&own, 1), (&used, 2), (&old, 10), (&mid, 20), (&new, 30)] {
            set_used(&store, d, t);
        }
        store.add_user("sb-1", std::slice::from_ref(&used)).unwrap();
        let each = store.trees().unwrap()[0].bytes;
        assert!(each >= 20_000, "counted by blocks: {each}");
        let total = store.disk_usage().unwrap();
        assert_eq!(total, 5 * each);

        // A budget for three images: the two oldest pulled, unused ones go (dry run first).
        let dry = store.prune(Some(3 * each), true).unwrap();
        assert_eq!(
            dry.images.iter().map(|i| i.digest.clone()).collect::<Vec<_>>(),
            vec![old.clone(), mid.clone()]
        );
        assert_eq!(dry.freed(), 2 * each);
        assert_eq!(store.list().unwrap().len(), 5, "a dry run removes nothing");
        let done = store.prune(Some(3 * each), false).unwrap();
        assert_eq!(done.images, dry.images);
        assert_eq!(done.images[0].names, vec!["reg.example/old:1".to_string()]);
        assert_eq!(store.disk_usage().unwrap(), 3 * each);
        assert!(store.resolve("reg.example/old:1").is_err() && store.resolve("reg.example/new:1").is_ok());

        // Nothing fits under a tiny budget: the used and the imported images stay, and say why.
        let tiny = store.prune(Some(1), false).unwrap();
        assert_eq!(tiny.images.iter().map(|i| i.digest.clone()).collect::<Vec<_>>(), vec![new]);
        assert_eq!(tiny.kept.len(), 2, "{:?}", tiny.kept);
        assert!(store.resolve("mine:1").is_ok() && store.resolve("reg.example/used:1").is_ok());

        // Resolving marks an image as used: it outlives an older one.
        store.remove_user("sb-1").unwrap();
        let a = add(&store, "reg.example/a:1", "f", "pull");
        set_used(&store, &a, 5);
        set_used(&store, &used, 4);
        store.resolve("reg.example/used:1").unwrap();
        let one = store.prune(Some(store.disk_usage().unwrap() - 1), false).unwrap();
        assert_eq!(one.images.iter().map(|i| i.digest.clone()).collect::<Vec<_>>(), vec![a]);
        // Without a budget only what no one needs goes.
        assert!(store.prune(None, false).unwrap().images.is_empty());
    }

    #[test]
    fn prune_removes_blobs_no_pull_holds() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(&tmp.path().join("images")).unwrap();
        let free = store.blob_path(&format!("sha256:{}", "a".repeat(64)));
        let held = store.blob_path(&format!("sha256:{}", "b".repeat(64)));
        fs::write(&free, vec![1u8; 10_000]).unwrap();
        fs::write(&held, vec![1u8; 10_000]).unwrap();
        let _lock = crate::base::lock::lock(&held.with_extension("lock"), true).unwrap();
        let r = store.prune(None, false).unwrap();
        assert_eq!(r.blobs.len(), 1, "{:?}", r.blobs);
        assert!(!free.exists() && held.exists());
        drop(_lock);
        // A blob a named tree lists stays without a budget and goes first over one.
        let stage = store.staging("t").unwrap().keep();
        fs::write(stage.join("f"), "x".repeat(50_000)).unwrap();
        let (digest, size) = crate::image::tree_digest(&stage).unwrap();
        let layer = format!("sha256:{}", "b".repeat(64));
        let meta = ImageMeta {
            digest,
            env: vec![],
            workdir: String::new(),
            user: String::new(),
            size,
            disk: 0,
            created: crate::image::now(),
            source: "pull".into(),
            layers: vec![layer.clone()],
            private: false,
        };
        store.commit_tree_as(&stage, &meta, "reg.example/x:1").unwrap();
        assert!(store.prune(None, false).unwrap().blobs.is_empty() && held.exists());
        let r = store.prune(Some(store.disk_usage().unwrap() - 1), false).unwrap();
        assert_eq!(r.blobs.iter().map(|b| b.0.clone()).collect::<Vec<_>>(), vec![layer]);
        assert!(r.images.is_empty(), "the blob was enough");
        assert!(!held.exists());
    }
}
