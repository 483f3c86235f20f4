//! Dependency caches attached to a sandbox (docs/caches.md): for each cache path, the cache's
//! version tree (stored owned by the image store's id range) through an idmapped read-only mount
//! of the sandbox's own range, as the images are, at `roots/cache-<N>` in the state directory;
//! an overlay of it under a layer of the job's own, `.executor-cache-<N>` at the top of the
//! workspace (so the workspace's disk cap counts what the steps write, and the layer is hidden in
//! the containers as the steps' own layers are), mounted at `cache-<N>` in the reach directory
//! and bound by every step's spec at the cache's path. A miss is the same overlay over an empty
//! lower directory. Nothing here copies the cache: attaching costs a few mounts whatever its size.
//! The layers are made before the first step gives the workspace to the container's root, and
//! every hand-over of the workspace (workspace.rs) leaves them as they are.

use anyhow::{bail, Context, Result};
use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{rootfs, OciCache, OciRuntime, MARKER};
use crate::image::{ID_BASE, ID_COUNT};
use crate::sandbox::{AttachedCache, CacheMount, RecordDetails, SandboxRecord};

/// The prefix of a cache layer's directory at the top of the workspace (the guest's too).
pub(crate) use crate::guest::protocol::CACHE_LAYER_PREFIX;

impl OciRuntime {
    pub(super) fn attach(
        &self,
        sandbox: &mut SandboxRecord,
        mounts: &[CacheMount],
    ) -> Result<Vec<AttachedCache>> {
        let mut d = Self::details(sandbox)?;
        if !d.caches.is_empty() {
            bail!("sandbox {} has its caches attached already", sandbox.name);
        }
        // A step made ahead has no cache mounts in its spec: it is made again.
        super::ahead::drop_prepared(&sandbox.name);
        // The workspace goes to the container's root with the first step, around the layers
        // (workspace.rs), which keep their owners when it is given back too.
        let userns = if d.uid_base == ID_BASE {
            None
        } else {
            Some(
                crate::base::sys::userns_fd(ID_BASE, d.uid_base, ID_COUNT)
                    .context("making a user namespace for the idmapped cache mounts")?,
            )
        };
        let mut out = Vec::new();
        let res = (|| -> Result<()> {
            for (i, m) in mounts.iter().enumerate() {
                let lower = sandbox.state_dir.join("roots").join(format!("cache-{i}"));
                fs::create_dir_all(&lower).with_context(|| format!("creating {}", lower.display()))?;
                let lower = match (&m.lower, &userns) {
                    (Some(tree), Some(ns)) => {
                        crate::base::sys::idmapped_bind(tree, &lower, ns).with_context(|| {
                            format!("idmapped mount of cache tree {} on {}", tree.display(), lower.display())
                        })?;
                        lower
                    }
                    (Some(tree), None) => tree.clone(),
                    (None, _) => {
                        std::os::unix::fs::chown(&lower, Some(d.uid_base), Some(d.uid_base))
                            .with_context(|| format!("changing the owner of {}", lower.display()))?;
                        fs::set_permissions(&lower, fs::Permissions::from_mode(0o755))
                            .with_context(|| format!("setting the mode of {}", lower.display()))?;
                        lower
                    }
                };
                let layer = format!("{CACHE_LAYER_PREFIX}{i}");
                let upper = mount_cache(&sandbox.name, &d.workspace, &lower, &layer, i)?;
                d.caches.push(OciCache {
                    target: m.target.clone(),
                    merged: rootfs::reach_dir(&sandbox.name).join(format!("cache-{i}")),
                    layer,
                });
                out.push(AttachedCache { upper, uid_base: d.uid_base, whiteout_files: false });
            }
            Ok(())
        })();
        // Recorded even when it failed half way, so that the teardown knows every layer.
        d.store(sandbox);
        crate::base::fs::write_atomic(
            &sandbox.state_dir.join(MARKER),
            &serde_json::to_vec_pretty(&*sandbox)?,
        )?;
        res.map(|()| out)
    }
}

/// Mounts the overlay of cache path `i`: `lower` under the layer `name` in the workspace, at
/// `cache-<i>` in the reach directory; returns the upper directory.
fn mount_cache(sandbox: &str, workspace: &Path, lower: &Path, name: &str, i: usize) -> Result<PathBuf> {
    let layer = workspace.join(name);
    // A fresh name at the top of the workspace that only this (root) process changes while no
    // step runs: `create` fails rather than follow anything the job's clone left there.
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&layer)
        .with_context(|| format!("creating the cache layer {}", layer.display()))?;
    let (upper, work) = (layer.join("upper"), layer.join("work"));
    fs::create_dir(&upper).with_context(|| format!("creating {}", upper.display()))?;
    fs::create_dir(&work).with_context(|| format!("creating {}", work.display()))?;
    let md = fs::metadata(lower).with_context(|| format!("inspecting the cache tree {}", lower.display()))?;
    std::os::unix::fs::chown(&upper, Some(md.uid()), Some(md.gid()))
        .with_context(|| format!("changing the owner of {}", upper.display()))?;
    fs::set_permissions(&upper, fs::Permissions::from_mode(md.mode() & 0o7777))
        .with_context(|| format!("setting the mode of {}", upper.display()))?;
    let merged = rootfs::reach_dir(sandbox).join(format!("cache-{i}"));
    fs::create_dir(&merged).with_context(|| format!("creating {}", merged.display()))?;
    // Nothing needs to reach the disk before the promotion reads the upper layer, and a layer of
    // a crashed host is thrown away with its workspace.
    rootfs::mount_overlay(lower, &upper, &work, &merged, "the cache overlay")?;
    Ok(upper)
}

/// The bind mounts and masks a step's spec gets for the sandbox's caches: (destination in the
/// container, source) and the layer directories to hide.
pub(super) fn step_mounts(caches: &[OciCache]) -> (Vec<(String, PathBuf)>, Vec<String>) {
    let binds = caches
        .iter()
        .map(|c| {
            let dest =
                if c.target.starts_with('/') { c.target.clone() } else { format!("/data/{}", c.target) };
            (dest, c.merged.clone())
        })
        .collect();
    let masks = caches.iter().map(|c| format!("/data/{}", c.layer)).collect();
    (binds, masks)
}
