//! The workspace's hand-over: given to the container's root (the sandbox's uid range) before a
//! step runs, its top directory opened for a step made ahead, and given back to its owner, with
//! its mode, when the steps are done (`sync_workspace`) or the sandbox goes.

use anyhow::{Context, Result};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{cgroup, rootfs, OciDetails, OciRuntime, OPENED, SHIFTED};
use crate::sandbox::SandboxRecord;

impl OciRuntime {
    /// Gives the workspace to the container's root (the sandbox's uid base) if it is not already.
    pub(super) fn shift_workspace(state_dir: &Path, d: &OciDetails) -> Result<()> {
        let marker = state_dir.join(SHIFTED);
        if marker.exists() {
            return Ok(());
        }
        let opened = state_dir.join(OPENED);
        let mode = match fs::read_to_string(&opened) {
            Ok(m) => m.trim().to_string(),
            Err(_) => format!("{:o}", Self::workspace_mode(d)?),
        };
        // The caches' layers are host root's (their upper directories the container root's already).
        let layers: Vec<String> = d.caches.iter().map(|c| c.layer.clone()).collect();
        chown_tree(&d.workspace, &layers, |_, _| (d.uid_base, d.uid_base))?;
        Self::open_to_others(d)?;
        fs::write(&marker, mode).with_context(|| format!("writing {}", marker.display()))?;
        match fs::remove_file(&opened) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", opened.display()))
            }
            _ => Ok(()),
        }
    }

    /// Lets the container's root into the workspace's top directory (search permission for
    /// others, as [`Self::shift_workspace`] gives), which a container made ahead enters as its
    /// working directory while the clone still fills the workspace. The owner stays root's: git
    /// refuses a repository whose top directory another user owns, and the shift before the
    /// step starts gives the container's root the whole tree.
    pub(super) fn open_workspace_top(state_dir: &Path, d: &OciDetails) -> Result<()> {
        let opened = state_dir.join(OPENED);
        if state_dir.join(SHIFTED).exists() || opened.exists() {
            return Ok(());
        }
        let mode = Self::workspace_mode(d)?;
        fs::write(&opened, format!("{mode:o}")).with_context(|| format!("writing {}", opened.display()))?;
        Self::open_to_others(d)
    }

    fn workspace_mode(d: &OciDetails) -> Result<u32> {
        Ok(fs::metadata(&d.workspace)
            .with_context(|| format!("inspecting workspace {}", d.workspace.display()))?
            .mode()
            & 0o7777)
    }

    /// /data is searchable by the image's other users, as a Docker bind mount of a 0755
    /// directory is, where a directory above it (the state directory) is closed to every host
    /// user but root.
    fn open_to_others(d: &OciDetails) -> Result<()> {
        if closed_to_others(&d.workspace) {
            let mode = Self::workspace_mode(d)?;
            fs::set_permissions(&d.workspace, fs::Permissions::from_mode(mode | 0o755))
                .with_context(|| format!("setting the mode of workspace {}", d.workspace.display()))?;
        }
        Ok(())
    }

    pub(super) fn give_back_workspace(&self, sandbox: &SandboxRecord, workspace: &Path) -> Result<()> {
        let d = Self::details(sandbox)?;
        // Shifted by a step, or only opened for one made ahead that never ran.
        let Some(marker) = [SHIFTED, OPENED].iter().map(|m| sandbox.state_dir.join(m)).find(|m| m.exists())
        else {
            return Ok(());
        };
        if !workspace.exists() {
            return Ok(());
        }
        // Every process of the job is gone, so nothing can swap a path while the owner changes.
        cgroup::JobCgroup::new(&sandbox.name).kill_all(50);
        rootfs::remove_step_roots(&sandbox.name, workspace);
        // The caches' layers keep the job's owners: what is promoted from them is shifted from
        // the sandbox's range (cache/tree.rs).
        let layers: Vec<String> = d.caches.iter().map(|c| c.layer.clone()).collect();
        chown_tree(workspace, &layers, |_, _| (d.workspace_uid, d.workspace_gid))?;
        let mode = fs::read_to_string(&marker).ok().and_then(|m| u32::from_str_radix(m.trim(), 8).ok());
        if let Some(mode) = mode {
            let tree = crate::base::fs::Beneath::open(workspace)?;
            tree.chmod(Path::new(""), mode)
                .with_context(|| format!("restoring the mode of workspace {}", workspace.display()))?;
        }
        fs::remove_file(&marker).with_context(|| format!("removing {}", marker.display()))
    }
}

/// Changes the owner of every entry below `root` (and `root`) without following symlinks or
/// leaving the filesystem: every path is resolved beneath `root` with no symlink on the way, so a
/// directory swapped for a symlink while the walk runs stops the walk there instead of sending it
/// out of the workspace. The top-level entries named in `skip` are left as they are.
fn chown_tree(root: &Path, skip: &[String], owner: impl Fn(u32, u32) -> (u32, u32)) -> Result<()> {
    let tree = crate::base::fs::Beneath::open(root)
        .with_context(|| format!("opening workspace {}", root.display()))?;
    let top =
        tree.lstat(Path::new("")).with_context(|| format!("inspecting workspace {}", root.display()))?;
    let chown = |rel: &Path, md: &crate::base::fs::Meta| -> Result<()> {
        let (u, g) = owner(md.uid, md.gid);
        if (u, g) != (md.uid, md.gid) {
            tree.chown(rel, u, g)
                .with_context(|| format!("changing the owner of {} in the workspace", rel.display()))?;
        }
        Ok(())
    };
    chown(Path::new(""), &top)?;
    let mut stack = vec![PathBuf::new()];
    while let Some(dir) = stack.pop() {
        let entries = match tree.list(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("listing {} in the workspace", dir.display())),
        };
        for (name, md) in entries {
            // The kept layer keeps its owners (what the failed step left, as it left it).
            if md.dev != top.dev
                || (dir.as_os_str().is_empty()
                    && (name == rootfs::KEPT_LAYER || skip.iter().any(|s| name == s.as_str())))
            {
                continue;
            }
            let rel = dir.join(name);
            chown(&rel, &md)?;
            if md.is_dir() {
                stack.push(rel);
            }
        }
    }
    Ok(())
}

/// Whether a directory above `path` is root's and closed to other users (no o+x).
fn closed_to_others(path: &Path) -> bool {
    path.ancestors()
        .skip(1)
        .any(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_dir() && m.uid() == 0 && m.mode() & 0o001 == 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chown_tree_stays_inside_and_on_symlinks() {
        if !crate::base::skip::is_root() {
            return crate::base::skip::skip("chown_tree_stays_inside_and_on_symlinks", "root", "not root");
        }
        let ws = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        std::fs::write(host.path().join("hostfile"), "x").unwrap();
        std::fs::create_dir_all(ws.path().join("a/b")).unwrap();
        std::fs::write(ws.path().join("a/b/f"), "x").unwrap();
        std::os::unix::fs::symlink(host.path(), ws.path().join("a/dirlink")).unwrap();
        std::os::unix::fs::symlink(host.path().join("hostfile"), ws.path().join("filelink")).unwrap();
        chown_tree(ws.path(), &[], |_, _| (54321, 54321)).unwrap();
        for rel in ["", "a", "a/b", "a/b/f", "a/dirlink", "filelink"] {
            let md = fs::symlink_metadata(ws.path().join(rel)).unwrap();
            assert_eq!((md.uid(), md.gid()), (54321, 54321), "{rel:?}");
        }
        for p in [host.path().to_path_buf(), host.path().join("hostfile")] {
            assert_eq!(fs::metadata(&p).unwrap().uid(), 0, "{} left alone", p.display());
        }
    }
}
