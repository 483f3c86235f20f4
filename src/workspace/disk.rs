//! The workspace's own filesystem: a sparse ext4 image beside the workspace directory,
//! loop-mounted on it, so that a job can never use more disk than its cap
//! (`EXECUTOR_FIRECRACKER_DISK_SPACE`), however many files it writes. Mounting needs root; an
//! executor that cannot mount falls back to checking the clone's size afterwards and says so.

use anyhow::{bail, Context, Result};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The smallest cap a filesystem is made for; below it mkfs cannot lay out an ext4.
pub const MIN_DISK_BYTES: u64 = 8 << 20;

/// How a workspace's size is bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cap {
    /// No cap configured.
    Unlimited,
    /// The workspace is its own filesystem of `bytes`; making and mounting it took `took`.
    Mounted { bytes: u64, took: Duration },
    /// The workspace is a plain directory: only the clone's size is checked, after the clone.
    PostHoc { bytes: u64, reason: String },
}

/// The image file of workspace `ws`: `<name>.img` beside it, outside the job's reach.
pub fn image_path(ws: &Path) -> PathBuf {
    let mut name = ws.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".img");
    ws.with_file_name(name)
}

/// Whether `ws` is the root of a filesystem other than its parent's (our mount).
pub fn is_mounted(ws: &Path) -> bool {
    let parent = match ws.parent() {
        Some(p) => p,
        None => return false,
    };
    match (std::fs::symlink_metadata(ws), std::fs::symlink_metadata(parent)) {
        (Ok(w), Ok(p)) => w.is_dir() && w.dev() != p.dev(),
        _ => false,
    }
}

/// Bytes the filesystem of `path` still has for unprivileged writers.
pub fn available_bytes(path: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// What a workspace filesystem is made with (mkfs and mount options, and how the image is laid
/// out): part of the name of every blank image and template, so that none made with other options
/// is ever used.
pub const FORMAT: &str = "ext4 -O ^has_journal,^resize_inode -m 0 -E lazy_itable_init=1,nodiscard; \
                          loop,nosuid,nodev,noinit_itable,nobarrier; v1";

/// Gives the empty directory `ws` a filesystem of `bytes`: a sparse image file beside it,
/// `mkfs.ext4` (no journal, lazily initialised inode tables, nothing reserved for root), mounted
/// with `loop,nosuid,nodev`. The filesystem's root keeps the directory's owner and mode.
pub fn mount(ws: &Path, bytes: u64) -> Result<Duration> {
    mount_with(ws, bytes, None)
}

/// [`mount`], with the image copied (sparse) from a blank one kept in `blanks` when there is one:
/// the same bytes mkfs would write, without running it for every job (see [`blank_image`]).
pub fn mount_with(ws: &Path, bytes: u64, blanks: Option<&Path>) -> Result<Duration> {
    let t = Instant::now();
    if bytes < MIN_DISK_BYTES {
        bail!("the workspace disk limit of {bytes} bytes is below the {MIN_DISK_BYTES} bytes a filesystem needs");
    }
    let md =
        std::fs::symlink_metadata(ws).with_context(|| format!("inspecting workspace {}", ws.display()))?;
    let img = image_path(ws);
    let made = match blanks {
        Some(dir) => blank_image(dir, bytes, md.uid(), md.gid()).and_then(|blank| {
            crate::base::fs::copy_sparse(&blank, &img, 0o600)
                .with_context(|| format!("creating the workspace disk {}", img.display()))
        }),
        None => make_fs(&img, bytes, md.uid(), md.gid()).map(|_| 0),
    };
    if let Err(e) = made {
        let _ = std::fs::remove_file(&img);
        return Err(e);
    }
    attach(ws, &md)?;
    Ok(t.elapsed())
}

/// Mounts the image that is already at [`image_path`]`(ws)` (a copy of a template) on `ws`,
/// which keeps its owner and mode.
pub fn mount_image(ws: &Path) -> Result<Duration> {
    let t = Instant::now();
    let md =
        std::fs::symlink_metadata(ws).with_context(|| format!("inspecting workspace {}", ws.display()))?;
    attach(ws, &md)?;
    Ok(t.elapsed())
}

/// A blank filesystem image of `bytes` for a root owned by `uid`:`gid`, made once with mkfs in
/// `dir` (private to root) and copied, sparse, for each workspace: mkfs of a 20 GiB image writes
/// a few MiB of metadata and costs a process and an fsync per job, a copy of those blocks does
/// not. Every copy carries the blank's filesystem UUID; nothing mounts workspaces by UUID.
pub fn blank_image(dir: &Path, bytes: u64, uid: u32, gid: u32) -> Result<PathBuf> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(format!("{FORMAT}\0{bytes}\0{uid}:{gid}").as_bytes());
    let path = dir.join(format!("blank-{}.img", hex::encode(&h.finalize()[..12])));
    if path.is_file() {
        return Ok(path);
    }
    crate::base::fs::private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".blank-{}.tmp", uuid::Uuid::new_v4().simple()));
    if let Err(e) = make_fs(&tmp, bytes, uid, gid) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // Two executors may race here; either blank is as good as the other.
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming {} into place", tmp.display()))?;
    Ok(path)
}

/// Makes the sparse image `img` (0600, a new file) and an empty ext4 of `bytes` in it.
fn make_fs(img: &Path, bytes: u64, uid: u32, gid: u32) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(img)
        .with_context(|| format!("creating the workspace disk {}", img.display()))?;
    f.set_len(bytes).with_context(|| format!("sizing the workspace disk {}", img.display()))?;
    drop(f);
    let root_owner = format!("lazy_itable_init=1,nodiscard,root_owner={uid}:{gid}");
    run(crate::base::proc::command("mkfs.ext4")
        .args(["-q", "-F", "-L", "workspace", "-O", "^has_journal,^resize_inode", "-m", "0", "-E"])
        .arg(&root_owner)
        .arg(img))
    .context("running mkfs.ext4 (install e2fsprogs)")
}

/// Mounts [`image_path`]`(ws)` on `ws` and gives the filesystem's root the directory's mode
/// (`md`); on failure nothing stays mounted and the image is removed.
fn attach(ws: &Path, md: &std::fs::Metadata) -> Result<()> {
    let img = image_path(ws);
    let res = (|| -> Result<()> {
        // noinit_itable: the kernel does not zero the inode tables in the background, which
        // would write them all out into the sparse image. nobarrier: an fsync in the workspace
        // (git writing a ref, a job's build) does not make the loop device fsync the whole image
        // file to the host's disk; a workspace never outlives a crash of its host anyway.
        // What `mount -o loop` does, without a process: a loop device that goes with its last
        // user (the mount, once the fd below is closed).
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&img)
            .with_context(|| format!("opening {}", img.display()))?;
        let (dev, held) = crate::base::sys::loop_attach(&file)
            .with_context(|| format!("attaching {} to a loop device", img.display()))?;
        drop(file);
        let flags = nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV;
        nix::mount::mount(Some(&dev), ws, Some("ext4"), flags, Some("noinit_itable,nobarrier"))
            .with_context(|| format!("mounting {} ({}) on {}", img.display(), dev.display(), ws.display()))?;
        drop(held);
        // The job sees an empty workspace, as without a disk (a template has none left).
        let lf = ws.join("lost+found");
        match std::fs::remove_dir(&lf) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", lf.display())),
        }
        std::fs::set_permissions(ws, std::fs::Permissions::from_mode(md.mode() & 0o7777))
            .with_context(|| format!("setting the mode of {}", ws.display()))?;
        Ok(())
    })();
    if let Err(e) = res {
        let _ = unmount(ws);
        return Err(e);
    }
    Ok(())
}

/// Marks the ext4 in image `img` (a copy of a mounted workspace disk, taken after a sync) as
/// cleanly unmounted, as unmounting it would have: a filesystem without a journal is marked
/// unclean while mounted, and the kernel warns each time such a copy is mounted.
pub fn mark_clean(img: &Path) -> Result<()> {
    run(crate::base::proc::command("debugfs").args(["-w", "-R", "ssv state 1"]).arg(img))
        .with_context(|| format!("marking {} clean with debugfs (install e2fsprogs)", img.display()))
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).output()?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Unmounts the workspace's filesystem (lazily when something still holds it; the loop device
/// goes with its last user) and deletes its image. Fine when neither exists.
pub fn unmount(ws: &Path) -> Result<()> {
    if is_mounted(ws) {
        let flags = nix::mount::MntFlags::empty();
        let mut res = nix::mount::umount2(ws, flags);
        for _ in 0..10 {
            if res != Err(nix::errno::Errno::EBUSY) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            res = nix::mount::umount2(ws, flags);
        }
        if res == Err(nix::errno::Errno::EBUSY) {
            res = nix::mount::umount2(ws, nix::mount::MntFlags::MNT_DETACH);
        }
        match res {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => bail!("unmounting the workspace disk from {}: {e}", ws.display()),
        }
        if is_mounted(ws) {
            bail!("the workspace disk is still mounted on {}", ws.display());
        }
    }
    let img = image_path(ws);
    match std::fs::remove_file(&img) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing the workspace disk {}", img.display())),
    }
}

/// Whether an error from filling the workspace says the disk was full.
pub fn is_disk_full(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}");
    text.contains("No space left on device")
        || e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>().and_then(|io| io.raw_os_error()) == Some(libc::ENOSPC)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_disk_errors_are_recognised() {
        let io = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(is_disk_full(&anyhow::Error::new(io).context("copying objects")));
        assert!(is_disk_full(&anyhow::anyhow!(
            "git exited with status 128: fatal: write error: No space left on device"
        )));
        assert!(!is_disk_full(&anyhow::anyhow!("git exited with status 128: fatal: not a git repository")));
    }

    #[test]
    fn a_mounted_workspace_is_capped_and_unmounts_clean() {
        let test = "a_mounted_workspace_is_capped_and_unmounts_clean";
        if !crate::base::skip::is_root() {
            return crate::base::skip::skip(test, "root", "needs root to loop-mount the disk");
        }
        if which::which("mkfs.ext4").is_err() {
            return crate::base::skip::skip(test, "ext4", "mkfs.ext4 (e2fsprogs) is not installed");
        }
        let d = tempfile::tempdir().unwrap();
        let ws = d.path().join("workspace-t");
        std::fs::create_dir(&ws).unwrap();
        assert!(!is_mounted(&ws));
        assert!(mount(&ws, 4 << 20).is_err(), "below the minimum");
        mount(&ws, 16 << 20).unwrap();
        assert!(is_mounted(&ws) && image_path(&ws).exists());
        assert_eq!(std::fs::read_dir(&ws).unwrap().count(), 0, "lost+found is gone");
        let big = vec![1u8; 1 << 20];
        let mut err = None;
        for i in 0..32 {
            if let Err(e) = std::fs::write(ws.join(format!("f{i}")), &big) {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err.and_then(|e| e.raw_os_error()), Some(libc::ENOSPC));
        assert!(available_bytes(&ws).unwrap() < 1 << 20);
        // Busy (a file held open): unmounted lazily, the image still goes.
        let held = std::fs::File::open(ws.join("f0")).unwrap();
        unmount(&ws).unwrap();
        drop(held);
        assert!(!is_mounted(&ws) && !image_path(&ws).exists());
        assert_eq!(std::fs::read_dir(&ws).unwrap().count(), 0);
        unmount(&ws).unwrap();
    }
}
