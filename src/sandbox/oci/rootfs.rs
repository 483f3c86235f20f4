//! Where a step's container gets its root and its workspace from.
//!
//! - **The writable root**: each step (one `docker run --rm` in Sourcegraph's executor) gets the
//!   image under an overlayfs layer of its own: the image (the sandbox's idmapped read-only
//!   mount of it, or the store's tree) is the lower layer; the upper and work directories live in
//!   `.executor-root-<id>` at the top of the workspace, on the job's workspace disk, so the disk
//!   cap counts what a step writes anywhere. That directory belongs to host root (mode 0700), is
//!   hidden in the container under an empty read-only tmpfs, and is removed when the step ends.
//!   Its upper layer starts with the `/etc/resolv.conf`, `/etc/hosts` and `/etc/hostname` that
//!   `docker run` always gives a container ([`EtcFiles`]), whether the image has them or not.
//! - **The reach directory** `/run/executor-oci/<sandbox>`: the state directory is 0700, so the
//!   container's mapped root cannot resolve paths inside it. Host root mounts what the runtime
//!   needs (the workspace at `data`, each step's overlay at `root-<id>`) in this directory, which
//!   belongs to the sandbox's container root with mode 0700: no other host user can enter it.

use anyhow::{bail, Context, Result};
use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
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

/// The files `docker run` always provides in `/etc` (Sourcegraph's steps get them): written into
/// the step's upper layer before the overlay is mounted, so they shadow the image's own without
/// touching the image, exist in an image that has no `/etc` at all (`FROM scratch`,
/// distroless), and are the container root's to change, as under Docker.
#[derive(Debug, Clone)]
pub struct EtcFiles {
    pub resolv_conf: String,
    pub hosts: String,
    pub hostname: String,
}

impl EtcFiles {
    /// The files of a container called `hostname`, whose own address is `address` (the job
    /// network's, or `None` on loopback only), resolving with `resolv_conf`.
    pub fn new(hostname: &str, address: Option<std::net::Ipv4Addr>, resolv_conf: String) -> EtcFiles {
        // Docker's /etc/hosts, with Debian's 127.0.1.1 for the name of a container without a
        // network (Docker leaves the name out then, so that `hostname -i` fails).
        let own = address.map_or_else(|| "127.0.1.1".to_string(), |a| a.to_string());
        let hosts = format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\n\
             ff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n{own}\t{hostname}\n"
        );
        EtcFiles { resolv_conf, hosts, hostname: format!("{hostname}\n") }
    }
}

/// One step's writable root, mounted.
#[derive(Debug)]
pub struct StepRoot {
    /// The overlay mount: the container's root.
    pub path: PathBuf,
    /// Whether the root has the [`EtcFiles`] (not when the image's `/etc` is no directory).
    pub etc: bool,
    /// The layer directory in the workspace (host path).
    layer: PathBuf,
    /// The layer directory as the container sees it (hidden under a tmpfs there).
    pub mask: String,
}

/// Mounts the writable root of step `id`: `lower` (the image) under a fresh layer in the
/// workspace, at `root-<id>` in the reach directory. The upper layer's top is made
/// with the image root's owner and mode, so the merged root looks like the image's, and holds
/// `etc` (see [`EtcFiles`]).
pub fn mount_step(
    sandbox: &str,
    workspace: &Path,
    lower: &Path,
    id: &str,
    etc: &EtcFiles,
) -> Result<StepRoot> {
    let name = format!("{LAYER_PREFIX}{}", id.rsplit('-').next().unwrap_or(id));
    let layer = workspace.join(&name);
    // A fresh name in the workspace's top directory, which only this (root) process changes
    // while no step runs: `create_dir` fails rather than follow anything the job left there.
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&layer)
        .with_context(|| format!("creating the step's writable layer {}", layer.display()))?;
    let res = (|| -> Result<(PathBuf, bool)> {
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
        let wrote_etc = write_etc(&upper, lower, &lower_md, etc)?;
        let merged = reach_dir(sandbox).join(format!("root-{id}"));
        fs::create_dir(&merged).with_context(|| format!("creating {}", merged.display()))?;
        // The layer is thrown away with the step, so nothing is ever synced to disk.
        mount_overlay(lower, &upper, &work, &merged, "the step's writable root")?;
        Ok((merged, wrote_etc))
    })();
    match res {
        Ok((path, etc)) => Ok(StepRoot { path, etc, layer, mask: format!("/data/{name}") }),
        Err(e) => {
            let _ = fs::remove_dir(reach_dir(sandbox).join(format!("root-{id}")));
            let _ = fs::remove_dir_all(&layer);
            Err(e)
        }
    }
}

/// Writes `files` into `upper/etc` (a fresh upper layer, which nothing else can have changed),
/// the directory with the owner and mode of the image's `/etc` (or of its root when it has none)
/// so that the merged `/etc` looks like the image's, the files 0644 and the container root's.
/// An image whose `/etc` is no directory (a symlink) keeps it: `false`.
fn write_etc(upper: &Path, lower: &Path, lower_md: &fs::Metadata, files: &EtcFiles) -> Result<bool> {
    use std::io::Write;
    let image_etc = lower.join("etc");
    let (uid, gid, mode) = match fs::symlink_metadata(&image_etc) {
        Ok(m) if m.is_dir() => (m.uid(), m.gid(), m.mode() & 0o7777),
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (lower_md.uid(), lower_md.gid(), 0o755),
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", image_etc.display())),
    };
    let etc = upper.join("etc");
    fs::DirBuilder::new().mode(0o700).create(&etc).with_context(|| format!("creating {}", etc.display()))?;
    std::os::unix::fs::chown(&etc, Some(uid), Some(gid))
        .with_context(|| format!("changing the owner of {}", etc.display()))?;
    fs::set_permissions(&etc, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", etc.display()))?;
    for (name, text) in
        [("resolv.conf", &files.resolv_conf), ("hosts", &files.hosts), ("hostname", &files.hostname)]
    {
        let path = etc.join(name);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
        f.set_permissions(fs::Permissions::from_mode(0o644))
            .with_context(|| format!("setting the mode of {}", path.display()))?;
        std::os::unix::fs::fchown(&f, Some(lower_md.uid()), Some(lower_md.gid()))
            .with_context(|| format!("changing the owner of {}", path.display()))?;
    }
    Ok(true)
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

/// The failed step's layer kept for `executor debug` at the top of the workspace, host root's
/// (mode 0700) like every layer, and hidden in a debug container as the step's own layer is.
pub const KEPT_LAYER: &str = ".executor-kept";

/// Unmounts a failed step's root and keeps its layer as the sandbox's [`KEPT_LAYER`] (replacing
/// an earlier one), with what the step wrote into its root, for `executor debug`.
pub fn keep_step(root: StepRoot, workspace: &Path) -> Result<()> {
    let _ = nix::mount::umount2(&root.path, nix::mount::MntFlags::MNT_DETACH);
    let _ = fs::remove_dir(&root.path);
    let kept = workspace.join(KEPT_LAYER);
    remove_layer(&kept)?;
    fs::rename(&root.layer, &kept)
        .with_context(|| format!("keeping the failed step's layer as {}", kept.display()))?;
    // A layer made ahead was given to the container's root with the workspace; the kept one is
    // host root's alone, as a layer is meant to be.
    std::os::unix::fs::lchown(&kept, Some(0), Some(0))
        .with_context(|| format!("changing the owner of {}", kept.display()))?;
    fs::set_permissions(&kept, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting the mode of {}", kept.display()))
}

/// Mounts the kept layer (see [`keep_step`]) over `lower` as the root of debug container `id`:
/// what the failed step wrote is there as it left it, and what the debug shell writes adds to it.
pub fn mount_kept(sandbox: &str, workspace: &Path, lower: &Path, id: &str) -> Result<StepRoot> {
    let layer = workspace.join(KEPT_LAYER);
    let md = fs::symlink_metadata(&layer)
        .with_context(|| format!("the kept layer {} (was the sandbox kept?)", layer.display()))?;
    if !md.is_dir() || md.uid() != 0 {
        bail!("{} is not the executor's kept layer", layer.display());
    }
    // A fresh work directory: a volatile overlay refuses one that an earlier mount used.
    let work = layer.join("work");
    remove_layer(&work)?;
    fs::create_dir(&work).with_context(|| format!("creating {}", work.display()))?;
    let merged = reach_dir(sandbox).join(format!("root-{id}"));
    fs::create_dir(&merged).with_context(|| format!("creating {}", merged.display()))?;
    if let Err(e) = mount_overlay(lower, &layer.join("upper"), &work, &merged, "the kept root") {
        let _ = fs::remove_dir(&merged);
        return Err(e);
    }
    Ok(StepRoot { path: merged, etc: true, layer, mask: format!("/data/{KEPT_LAYER}") })
}

/// Mounts `upper` (with its overlay work directory `work`) over `lower` on `merged`, nosuid and
/// nodev; `what` names the mount in errors. The mount is volatile: each caller's upper layer is
/// thrown away with its step or workspace, or read by the executor before a crash could matter.
pub(super) fn mount_overlay(
    lower: &Path,
    upper: &Path,
    work: &Path,
    merged: &Path,
    what: &str,
) -> Result<()> {
    for p in [lower, upper, work] {
        if p.to_string_lossy().contains([',', ':', '\\']) {
            bail!("cannot use {} in an overlay mount: the path has a comma, colon or backslash", p.display());
        }
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},volatile",
        lower.display(),
        upper.display(),
        work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        merged,
        Some("overlay"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .with_context(|| format!("mounting {what} (overlay {opts}) on {}", merged.display()))
}

/// Unmounts a debug container's root, keeping the layer.
pub fn unmount_kept(root: &StepRoot) {
    let _ = nix::mount::umount2(&root.path, nix::mount::MntFlags::MNT_DETACH);
    let _ = fs::remove_dir(&root.path);
}

/// Removes the kept layer of `workspace`, if any.
pub fn remove_kept(workspace: &Path) -> Result<()> {
    remove_layer(&workspace.join(KEPT_LAYER))
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

    fn etc_files() -> EtcFiles {
        EtcFiles::new("sandbox", None, "# none\n".into())
    }

    #[test]
    fn etc_files_name_localhost_and_the_container() {
        let f = etc_files();
        assert_eq!(f.hostname, "sandbox\n");
        assert!(f.hosts.starts_with("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost"), "{}", f.hosts);
        assert!(f.hosts.ends_with("\n127.0.1.1\tsandbox\n"), "{}", f.hosts);
        let net = EtcFiles::new("sandbox", Some(std::net::Ipv4Addr::new(10, 255, 0, 2)), String::new());
        assert!(net.hosts.ends_with("\n10.255.0.2\tsandbox\n"), "{}", net.hosts);
    }

    #[test]
    fn etc_is_written_into_the_upper_layer_like_the_images() {
        let tmp = tempfile::tempdir().unwrap();
        let (lower, upper) = (tmp.path().join("lower"), tmp.path().join("upper"));
        fs::create_dir(&lower).unwrap();
        // An image without /etc: the directory gets the root's owner and 0755.
        fs::create_dir(&upper).unwrap();
        let md = fs::metadata(&lower).unwrap();
        assert!(write_etc(&upper, &lower, &md, &etc_files()).unwrap());
        let etc = fs::metadata(upper.join("etc")).unwrap();
        assert_eq!((etc.uid(), etc.mode() & 0o7777), (md.uid(), 0o755));
        for (name, text) in [("resolv.conf", "# none\n"), ("hostname", "sandbox\n")] {
            assert_eq!(fs::read_to_string(upper.join("etc").join(name)).unwrap(), text);
            let m = fs::metadata(upper.join("etc").join(name)).unwrap();
            assert_eq!((m.uid(), m.mode() & 0o7777), (md.uid(), 0o644));
        }
        assert!(fs::read_to_string(upper.join("etc/hosts")).unwrap().contains("localhost"));
        // An image with /etc: its mode is kept, so the merged /etc looks like the image's.
        fs::create_dir(lower.join("etc")).unwrap();
        fs::set_permissions(lower.join("etc"), fs::Permissions::from_mode(0o751)).unwrap();
        fs::write(lower.join("etc/hosts"), "image's own\n").unwrap();
        fs::remove_dir_all(&upper).unwrap();
        fs::create_dir(&upper).unwrap();
        assert!(write_etc(&upper, &lower, &md, &etc_files()).unwrap());
        assert_eq!(fs::metadata(upper.join("etc")).unwrap().mode() & 0o7777, 0o751);
        assert!(fs::read_to_string(upper.join("etc/hosts")).unwrap().contains("127.0.0.1\tlocalhost"));
        // An /etc that is a symlink is left as the image has it.
        fs::remove_dir_all(lower.join("etc")).unwrap();
        std::os::unix::fs::symlink("/", lower.join("etc")).unwrap();
        fs::remove_dir_all(&upper).unwrap();
        fs::create_dir(&upper).unwrap();
        assert!(!write_etc(&upper, &lower, &md, &etc_files()).unwrap());
        assert!(!upper.join("etc").exists());
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mountinfo("/a\\040b/c\\134d"), "/a b/c\\d");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\04"), "/end\\04");
    }
}
