//! Where a step's container gets its root and its workspace from.
//!
//! - **The writable root**: each step (one `docker run --rm` in Sourcegraph's executor) gets the
//!   image under an overlayfs layer of its own: the image (the sandbox's idmapped read-only
//!   mount of it, or the store's tree) is the lower layer; the upper and work directories live in
//!   `.executor-root-<id>` at the top of the workspace, on the job's workspace disk, so the disk
//!   cap counts what a step writes anywhere. That directory belongs to host root (mode 0700), is
//!   hidden in the container under an empty read-only tmpfs, and is removed when the step ends.
//! - **The reach directory** `/run/executor-oci/<sandbox>`: the state directory is 0700, so the
//!   container's mapped root cannot resolve paths inside it. Host root mounts what the runtime
//!   needs (the workspace at `data`, each step's overlay at `root-<id>`) in this directory, which
//!   belongs to the sandbox's container root with mode 0700: no other host user can enter it.

use anyhow::{bail, Context, Result};
use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The parent of every sandbox's reach directory.
pub const REACH_DIR: &str = "/run/executor-oci";
/// The prefix of a step's layer directory at the top of the workspace.
pub const LAYER_PREFIX: &str = ".executor-root-";

/// The reach directory of `sandbox`.
pub fn reach_dir(sandbox: &str) -> PathBuf {
    Path::new(REACH_DIR).join(sandbox)
}

/// Where the workspace is bound in the reach directory.
pub fn reach_workspace(sandbox: &str) -> PathBuf {
    reach_dir(sandbox).join("data")
}

/// Creates the sandbox's reach directory (owned by `owner`, the container's root, mode 0700)
/// with the workspace bound at `data`.
pub fn make_reach(sandbox: &str, workspace: &Path, owner: u32) -> Result<PathBuf> {
    let top = Path::new(REACH_DIR);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(top)
        .with_context(|| format!("creating {}", top.display()))?;
    fs::set_permissions(top, fs::Permissions::from_mode(0o711))
        .with_context(|| format!("setting the mode of {}", top.display()))?;
    let dir = reach_dir(sandbox);
    fs::DirBuilder::new().mode(0o700).create(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::os::unix::fs::chown(&dir, Some(owner), Some(owner))
        .with_context(|| format!("changing the owner of {}", dir.display()))?;
    let data = dir.join("data");
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&data)
        .with_context(|| format!("creating {}", data.display()))?;
    nix::mount::mount(
        Some(workspace),
        &data,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC,
        None::<&str>,
    )
    .with_context(|| format!("binding the workspace {} on {}", workspace.display(), data.display()))?;
    Ok(dir)
}

/// Unmounts everything in the sandbox's reach directory and removes it; a directory that is
/// still not empty after the unmounts is left (never a recursive removal through a mount).
pub fn remove_reach(sandbox: &str) -> Result<()> {
    let dir = reach_dir(sandbox);
    let mut points = mounts_below(&dir);
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for e in rd.flatten() {
        let p = e.path();
        let res =
            if e.file_type().is_ok_and(|t| t.is_dir()) { fs::remove_dir(&p) } else { fs::remove_file(&p) };
        match res {
            // A step's background unmount removed it meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            r => r.with_context(|| format!("removing {} (still mounted?)", p.display()))?,
        }
    }
    fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))
}

/// The reach directories of sandboxes named by `owned`, for the janitor.
pub fn reach_sandboxes(owned: impl Fn(&str) -> bool) -> Vec<String> {
    fs::read_dir(REACH_DIR)
        .map(|rd| {
            rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| owned(n)).collect()
        })
        .unwrap_or_default()
}

/// One step's writable root, mounted.
#[derive(Debug)]
pub struct StepRoot {
    /// The overlay mount: the container's root.
    pub path: PathBuf,
    /// The layer directory in the workspace (host path).
    layer: PathBuf,
    /// The layer directory as the container sees it (hidden under a tmpfs there).
    pub mask: String,
}

/// Mounts the writable root of step `id`: `lower` (the image) under a fresh layer in the
/// workspace, at `root-<id>` in the reach directory. The upper layer's top is made
/// with the image root's owner and mode, so the merged root looks like the image's.
pub fn mount_step(sandbox: &str, workspace: &Path, lower: &Path, id: &str) -> Result<StepRoot> {
    let name = format!("{LAYER_PREFIX}{}", id.rsplit('-').next().unwrap_or(id));
    let layer = workspace.join(&name);
    // A fresh name in the workspace's top directory, which only this (root) process changes
    // while no step runs: `create_dir` fails rather than follow anything the job left there.
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&layer)
        .with_context(|| format!("creating the step's writable layer {}", layer.display()))?;
    let res = (|| -> Result<PathBuf> {
        let upper = layer.join("upper");
        let work = layer.join("work");
        fs::create_dir(&upper).with_context(|| format!("creating {}", upper.display()))?;
        fs::create_dir(&work).with_context(|| format!("creating {}", work.display()))?;
        let lower_md =
            fs::metadata(lower).with_context(|| format!("inspecting the image root {}", lower.display()))?;
        std::os::unix::fs::chown(&upper, Some(lower_md.uid()), Some(lower_md.gid()))
            .with_context(|| format!("changing the owner of {}", upper.display()))?;
        fs::set_permissions(&upper, fs::Permissions::from_mode(lower_md.mode() & 0o7777))
            .with_context(|| format!("setting the mode of {}", upper.display()))?;
        let merged = reach_dir(sandbox).join(format!("root-{id}"));
        fs::create_dir(&merged).with_context(|| format!("creating {}", merged.display()))?;
        for p in [lower, &upper, &work] {
            let s = p.to_string_lossy();
            if s.contains([',', ':', '\\']) {
                bail!(
                    "cannot use {} in an overlay mount: the path has a comma, colon or backslash",
                    p.display()
                );
            }
        }
        // volatile: the layer is thrown away with the step, so nothing is ever synced to disk.
        let opts = format!(
            "lowerdir={},upperdir={},workdir={},volatile",
            lower.display(),
            upper.display(),
            work.display()
        );
        nix::mount::mount(
            Some("overlay"),
            &merged,
            Some("overlay"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(opts.as_str()),
        )
        .with_context(|| {
            format!("mounting the step's writable root (overlay {opts}) on {}", merged.display())
        })?;
        Ok(merged)
    })();
    match res {
        Ok(path) => Ok(StepRoot { path, layer, mask: format!("/data/{name}") }),
        Err(e) => {
            let _ = fs::remove_dir(reach_dir(sandbox).join(format!("root-{id}")));
            let _ = fs::remove_dir_all(&layer);
            Err(e)
        }
    }
}

/// Unmounts a step's root and removes its layer (every process of the step is gone by now).
pub fn unmount_step(root: &StepRoot) -> Result<()> {
    let _ = nix::mount::umount2(&root.path, nix::mount::MntFlags::MNT_DETACH);
    let _ = fs::remove_dir(&root.path);
    remove_layer(&root.layer)
}

/// [`unmount_step`] off the step's path: an unmount waits for an RCU grace period (10 to 20 ms,
/// most of what the layer costs), which the step's end need not wait for. A layer this leaves
/// (the process exits first) goes with [`remove_step_roots`], called by `sync_workspace` and
/// the teardown.
pub fn unmount_step_later(root: StepRoot) {
    std::thread::spawn(move || {
        let _ = unmount_step(&root);
    });
}

/// Unmounts every step root left in the sandbox's reach directory and removes the layers left
/// at the top of `workspace`.
pub fn remove_step_roots(sandbox: &str, workspace: &Path) {
    let dir = reach_dir(sandbox);
    for p in mounts_below(&dir) {
        if p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("root-")) {
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
            let _ = fs::remove_dir(&p);
        }
    }
    remove_layers(workspace);
}

/// Removes a layer directory (never following a symlink inside it).
fn remove_layer(layer: &Path) -> Result<()> {
    match fs::remove_dir_all(layer) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing the step's writable layer {}", layer.display()))
        }
        _ => Ok(()),
    }
}

/// Removes the layers steps of a crashed or stopped sandbox left at the top of `workspace`.
pub fn remove_layers(workspace: &Path) {
    let Ok(rd) = fs::read_dir(workspace) else { return };
    for e in rd.flatten() {
        let is_layer = e.file_name().to_string_lossy().starts_with(LAYER_PREFIX)
            && e.metadata().is_ok_and(|m| m.is_dir() && m.uid() == 0 && !m.file_type().is_symlink());
        if is_layer {
            // A background unmount may be removing the same tree: try again.
            for _ in 0..10 {
                if remove_layer(&e.path()).is_ok() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

/// Mount points at or below `dir` in this mount namespace (a bind mount has the device of its
/// source, so only the mount table tells).
pub(super) fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let table = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(dir))
        .collect()
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo` octal escapes.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mountinfo("/a\\040b/c\\134d"), "/a b/c\\d");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\04"), "/end\\04");
    }
}
