//! Tearing a sandbox down: the steps made ahead dropped, every process of its cgroup killed, its
//! containers deleted, the workspace given back, its image mounts, uid range, network and state
//! directory removed. Safe to run twice, and on a sandbox half booted.

use anyhow::{bail, Context, Result};
use std::fs;
use std::path::Path;
use std::time::Duration;

use super::ahead::drop_prepared;
use super::rootfs::mounts_below;
use super::{cgroup, rootfs, uids, OciRuntime, MARKER};
use crate::sandbox::{Runtime, SandboxRecord};

impl OciRuntime {
    pub(super) fn remove_sandbox(&self, sandbox: &SandboxRecord) -> Result<()> {
        drop_prepared(&sandbox.name);
        let d = Self::details(sandbox).ok();
        let which = d.as_ref().map(|d| d.oci_runtime.clone()).unwrap_or_else(|| self.oci_runtime.clone());
        let cg = cgroup::JobCgroup::new(&sandbox.name);
        cg.kill_all(100);
        if sandbox.state_dir.exists() {
            self.delete_containers(&which, &sandbox.state_dir);
        }
        cg.remove()?;
        // The steps' roots and the workspace's bind go before the workspace is given back.
        rootfs::remove_reach(&sandbox.name)?;
        if let Some(d) = &d {
            if d.workspace.exists() {
                rootfs::remove_step_roots(&sandbox.name, &d.workspace);
                self.sync_workspace(sandbox, &d.workspace)?;
                rootfs::remove_kept(&d.workspace)?;
            }
        }
        self.store()?.remove_user(&sandbox.name)?;
        // The image mounts go before anything below them is removed; then the uid range is free.
        unmount_roots(&sandbox.state_dir);
        let roots = sandbox.state_dir.join("roots");
        if !mounts_below(&roots).is_empty() {
            bail!("an image is still mounted in {}", roots.display());
        }
        uids::UidRanges::new(&self.opts.state_dir).release(&sandbox.name)?;
        if let Some(net) = d.as_ref().and_then(|d| d.network.as_ref()) {
            crate::network::teardown(&self.opts.state_dir, net)?;
        }
        // The marker goes first: a step still finishing in another process sees the sandbox gone.
        let _ = fs::remove_file(sandbox.state_dir.join(MARKER));
        remove_dir_retrying(&sandbox.state_dir)
            .with_context(|| format!("removing sandbox directory {}", sandbox.state_dir.display()))
    }

    /// Deletes every container of the sandbox (they are its steps) by their state directories.
    pub(super) fn delete_containers(&self, which: &str, state_dir: &Path) {
        let mut ids = Vec::new();
        if let Ok(out) = self.quiet({
            let mut c = self.runtime_cmd(which, state_dir);
            c.args(["list", "-q"]);
            c
        }) {
            ids.extend(String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim().to_string()));
        }
        for id in ids.into_iter().filter(|i| !i.is_empty()) {
            let mut c = self.runtime_cmd(which, state_dir);
            c.args(["delete", "--force", &id]);
            let _ = self.quiet(c);
        }
    }
}

/// Unmounts every image mount (`roots/*`) of a sandbox, lazily: a dying runtime may still hold
/// one, and the mount then goes with it.
pub(super) fn unmount_roots(state_dir: &Path) {
    for p in mounts_below(&state_dir.join("roots")) {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Removes a directory tree that another process may be writing into or removing at the same
/// time: a failed pass (a file appeared, an entry vanished under it) is tried again, 10 times
/// 20 ms apart. Gone already is success.
pub(super) fn remove_dir_retrying(dir: &Path) -> std::io::Result<()> {
    let mut last = None;
    for _ in 0..10 {
        match fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => last = Some(e),
            _ => return Ok(()),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    last.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{ID_BASE, ID_COUNT};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn idmapped_image_mounts_belong_to_the_sandbox_range_and_go_at_teardown() {
        if !crate::base::skip::is_root() {
            return crate::base::skip::skip(
                "idmapped_image_mounts_belong_to_the_sandbox_range_and_go_at_teardown",
                "root",
                "needs root for idmapped mounts",
            );
        }
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("tree");
        fs::create_dir_all(src.join("bin")).unwrap();
        std::os::unix::fs::chown(src.join("bin"), Some(ID_BASE + 5), Some(ID_BASE + 5)).unwrap();
        let base = uids::base(3);
        let userns = crate::base::sys::userns_fd(ID_BASE, base, ID_COUNT).unwrap();
        let dst = d.path().join("state/roots/x");
        fs::create_dir_all(&dst).unwrap();
        crate::base::sys::idmapped_bind(&src, &dst, &userns).unwrap();
        let md = fs::metadata(dst.join("bin")).unwrap();
        assert_eq!((md.uid(), md.gid()), (base + 5, base + 5));
        assert!(fs::write(dst.join("new"), "x").is_err(), "the image mount is read-only");
        assert_eq!(mounts_below(&d.path().join("state")), vec![dst.clone()]);
        unmount_roots(&d.path().join("state"));
        assert!(mounts_below(&d.path().join("state")).is_empty());
        assert_eq!(fs::metadata(src.join("bin")).unwrap().uid(), ID_BASE + 5, "the store is unchanged");
    }
}
