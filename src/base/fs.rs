//! File writes: atomic replacement of a whole file, and writing below a root (a workspace)
//! without ever leaving it: relative paths only, no `..`, and no symlink followed on the way (a
//! hostile repository may have checked one out).

use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Checks that `rel` is a plain relative path and returns it joined to `root`.
pub(crate) fn confined(root: &Path, rel: &str) -> Result<PathBuf> {
    let p = Path::new(rel);
    if rel.is_empty() {
        bail!("empty path");
    }
    let mut out = root.to_path_buf();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => bail!(
                "path {rel:?} leaves the workspace (..): refusing to write outside of working directory"
            ),
            Component::RootDir | Component::Prefix(_) => {
                bail!("path {rel:?} is absolute: refusing to write outside of working directory")
            }
        }
    }
    if out == root {
        bail!("path {rel:?} names the workspace itself");
    }
    Ok(out)
}

/// Creates the directories of `rel` below `root` (none of them may be a symlink) and returns the
/// full path of `rel`.
pub(crate) fn ensure_parent(root: &Path, rel: &str) -> Result<PathBuf> {
    let full = confined(root, rel)?;
    let tree = Beneath::open(root)?;
    tree.create_parent(Path::new(rel)).map_err(|e| refusal("write", rel, e))?;
    Ok(full)
}

/// Writes `content` to `rel` below `root` with `mode` (and `mtime` if given), never through a
/// symlink.
pub(crate) fn write_file(root: &Path, rel: &str, content: &[u8], mode: u32) -> Result<PathBuf> {
    write_file_at(root, rel, content, mode, None)
}

/// [`write_file`] that also sets the file's modification time (for `modifiedAt`).
pub(crate) fn write_file_at(
    root: &Path,
    rel: &str,
    content: &[u8],
    mode: u32,
    mtime: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<PathBuf> {
    let full = confined(root, rel)?;
    let tree = Beneath::open(root)?;
    let (dir, name) = tree.create_parent(Path::new(rel)).map_err(|e| refusal("write", rel, e))?;
    let fd = crate::base::sys::open_beneath(
        dir.as_fd(),
        Path::new(&name),
        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW | libc::O_NOCTTY,
        mode as libc::mode_t,
    )
    .map_err(|e| refusal("write", rel, e))?;
    let mut f = std::fs::File::from(fd);
    f.write_all(content).with_context(|| format!("writing {rel:?}"))?;
    // The mode given to open() is filtered by the umask; the contract wants it exactly.
    f.set_permissions(std::fs::Permissions::from_mode(mode)).with_context(|| format!("chmod {rel:?}"))?;
    if let Some(t) = mtime {
        f.set_modified(system_time(t)).with_context(|| format!("setting the mtime of {rel:?}"))?;
    }
    Ok(full)
}

/// Why resolving `rel` below a root failed, in words that name only `rel`: never what a symlink
/// points at, nor anything outside the root.
fn refusal(what: &str, rel: &str, e: std::io::Error) -> anyhow::Error {
    match e.raw_os_error() {
        Some(libc::ELOOP) => anyhow::anyhow!("refusing to {what} {rel:?}: it goes through a symlink"),
        Some(libc::EXDEV) => anyhow::anyhow!("refusing to {what} {rel:?}: it leaves the workspace"),
        Some(libc::ENOTDIR) => {
            anyhow::anyhow!("refusing to {what} {rel:?}: a component of it is not a directory")
        }
        Some(libc::EISDIR) => anyhow::anyhow!("refusing to {what} {rel:?}: it is a directory"),
        _ => anyhow::anyhow!("{what} {rel:?}: {e}"),
    }
}

/// What lstat says of an entry below a [`Beneath`] root.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub dev: u64,
    pub size: u64,
}

impl Meta {
    fn of(st: &nix::sys::stat::FileStat) -> Meta {
        Meta {
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            dev: st.st_dev,
            size: st.st_size.max(0) as u64,
        }
    }
    pub(crate) fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }
    pub(crate) fn is_file(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFREG
    }
    pub(crate) fn is_symlink(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFLNK
    }
}

/// A directory (a workspace) opened once: every path below it is resolved with openat2 beneath
/// it, following no symlink at all, so that whatever a job left there (a symlink to `/`, a
/// directory swapped for one between two calls) never sends the host outside it. Paths are
/// relative; the empty path is the root itself.
pub(crate) struct Beneath {
    root: OwnedFd,
}

impl Beneath {
    /// Opens `root` itself (it must not be a symlink).
    pub(crate) fn open(root: &Path) -> Result<Beneath> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(root)
            .with_context(|| format!("opening the directory {}", root.display()))?;
        Ok(Beneath { root: OwnedFd::from(f) })
    }

    fn at(&self, rel: &Path, flags: libc::c_int) -> std::io::Result<OwnedFd> {
        let rel = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
        crate::base::sys::open_beneath(self.root.as_fd(), rel, flags, 0)
    }

    /// The entry `rel` itself (a symlink is reported as one, not followed).
    pub(crate) fn lstat(&self, rel: &Path) -> std::io::Result<Meta> {
        let fd = self.at(rel, libc::O_PATH | libc::O_NOFOLLOW)?;
        Ok(Meta::of(&nix::sys::stat::fstat(fd.as_raw_fd())?))
    }

    /// Opens the regular file `rel` for reading (never a FIFO or device, which could block or
    /// have effects on open).
    pub(crate) fn open_file(&self, rel: &Path) -> std::io::Result<std::fs::File> {
        let fd = self.at(rel, libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)?;
        let f = std::fs::File::from(fd);
        if !f.metadata()?.is_file() {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"));
        }
        Ok(f)
    }

    /// The entries of the directory `rel` (sorted by name, without `.` and `..`), each with its
    /// lstat.
    pub(crate) fn list(&self, rel: &Path) -> std::io::Result<Vec<(OsString, Meta)>> {
        let fd = self.at(rel, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW)?;
        let mut dir = nix::dir::Dir::from(fd)?;
        let raw = dir.as_raw_fd();
        let mut out = Vec::new();
        for e in dir.iter() {
            let e = e?;
            let name = e.file_name();
            if name.to_bytes() == b"." || name.to_bytes() == b".." {
                continue;
            }
            let st = match nix::sys::stat::fstatat(Some(raw), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            {
                Ok(st) => st,
                Err(nix::errno::Errno::ENOENT) => continue,
                Err(e) => return Err(e.into()),
            };
            out.push((OsString::from_vec(name.to_bytes().to_vec()), Meta::of(&st)));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The directory holding `rel`, open, and `rel`'s last component.
    fn parent_of(&self, rel: &Path) -> std::io::Result<(OwnedFd, OsString)> {
        let name = rel
            .file_name()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"))?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        Ok((self.at(parent, libc::O_PATH | libc::O_DIRECTORY)?, name.to_os_string()))
    }

    /// Removes the file (or symlink) `rel`, never what a symlink points at.
    pub(crate) fn remove_file(&self, rel: &Path) -> std::io::Result<()> {
        let (dir, name) = self.parent_of(rel)?;
        nix::unistd::unlinkat(
            Some(dir.as_raw_fd()),
            name.as_os_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        )?;
        Ok(())
    }

    /// Changes the mode of the directory or file `rel` itself (never through a symlink).
    pub(crate) fn chmod(&self, rel: &Path, mode: u32) -> std::io::Result<()> {
        let fd = self.at(rel, libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)?;
        std::fs::File::from(fd).set_permissions(std::fs::Permissions::from_mode(mode))
    }

    /// Changes the owner of `rel` itself (a symlink's own owner, not its target's).
    pub(crate) fn chown(&self, rel: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
        let fd = self.at(rel, libc::O_PATH | libc::O_NOFOLLOW)?;
        nix::unistd::fchownat(
            Some(fd.as_raw_fd()),
            "",
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
            nix::fcntl::AtFlags::AT_EMPTY_PATH,
        )?;
        Ok(())
    }

    /// Creates the directories above `rel` that are missing, each one a real directory below
    /// the root, and returns the last one open with `rel`'s last component.
    fn create_parent(&self, rel: &Path) -> std::io::Result<(OwnedFd, OsString)> {
        let name = rel
            .file_name()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"))?;
        let mut cur = self.at(Path::new(""), libc::O_PATH | libc::O_DIRECTORY)?;
        for c in rel.parent().unwrap_or(Path::new("")).components() {
            let Component::Normal(c) = c else { continue };
            match nix::sys::stat::mkdirat(
                Some(cur.as_raw_fd()),
                c,
                nix::sys::stat::Mode::from_bits_truncate(0o777),
            ) {
                Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                Err(e) => return Err(e.into()),
            }
            let next = crate::base::sys::open_beneath(
                cur.as_fd(),
                Path::new(c),
                libc::O_PATH | libc::O_NOFOLLOW,
                0,
            )?;
            let m = Meta::of(&nix::sys::stat::fstat(next.as_raw_fd())?);
            if m.is_symlink() {
                return Err(std::io::Error::from_raw_os_error(libc::ELOOP));
            }
            if !m.is_dir() {
                return Err(std::io::Error::from_raw_os_error(libc::ENOTDIR));
            }
            cur = next;
        }
        Ok((cur, name.to_os_string()))
    }
}

/// Removes what `path` names, a directory with all it holds or anything else, without
/// following a symlink; nothing there is not an error.
pub(crate) fn remove_any(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => {
            std::fs::remove_dir_all(path).with_context(|| format!("removing {}", path.display()))
        }
        Ok(_) => std::fs::remove_file(path).with_context(|| format!("removing {}", path.display())),
        Err(_) => Ok(()),
    }
}

/// Sets the access and modification times of what `path` names (a symlink itself, never what
/// it points at) to `(seconds, nanoseconds)` since the epoch: the times a layer or a cache
/// records for its entries, which tools compare (Python's bytecode cache holds its source's
/// mtime, make compares them, git's index trusts them).
pub(crate) fn set_times(path: &Path, (secs, nsecs): (i64, i64)) -> Result<()> {
    let t = nix::sys::time::TimeSpec::new(secs, nsecs);
    nix::sys::stat::utimensat(None, path, &t, &t, nix::sys::stat::UtimensatFlags::NoFollowSymlink)
        .with_context(|| format!("dating {}", path.display()))
}

/// Creates `dir` (and its missing parents) readable by its owner only, and makes an existing one
/// so: for directories that hold secrets or job data (the coordinator's data directory).
pub(crate) fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let m = std::fs::symlink_metadata(dir)?;
    if !m.is_dir() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a directory"));
    }
    if m.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Makes the regular file `path` readable by its owner only, creating it empty if it is missing;
/// a symlink is refused.
pub(crate) fn private_file(path: &Path) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    if f.metadata()?.permissions().mode() & 0o077 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file in the same directory, so that a reader
/// never sees half a file and a crash leaves the old one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".executor-doc-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes).with_context(|| format!("writing {}", path.display()))?;
    tmp.as_file().sync_all().with_context(|| format!("syncing {}", path.display()))?;
    tmp.persist(path).map_err(|e| e.error).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// Copies the regular file `from` into a new file `to` (created with `mode`, never replacing
/// one) keeping its holes: only the data extents are copied, with `copy_file_range`, which shares
/// the blocks instead where the filesystem can (XFS, btrfs reflinks) and copies them in the
/// kernel where it cannot (ext4). Returns the bytes of data copied. A partial copy is removed.
pub(crate) fn copy_sparse(from: &Path, to: &Path, mode: u32) -> Result<u64> {
    use nix::unistd::{lseek, Whence};
    let src = std::fs::File::open(from).with_context(|| format!("opening {}", from.display()))?;
    let len = src.metadata().with_context(|| format!("inspecting {}", from.display()))?.len();
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(to)
        .with_context(|| format!("creating {}", to.display()))?;
    let res = (|| -> Result<u64> {
        dst.set_len(len)?;
        let mut copied = 0u64;
        let mut pos: i64 = 0;
        let end = len as i64;
        while pos < end {
            let data = match lseek(src.as_raw_fd(), pos, Whence::SeekData) {
                Ok(d) => d,
                // No data after `pos`: the rest is a hole.
                Err(nix::errno::Errno::ENXIO) => break,
                Err(e) => return Err(e.into()),
            };
            let hole = lseek(src.as_raw_fd(), data, Whence::SeekHole)?.min(end);
            let (mut off_in, mut off_out) = (data, data);
            while off_in < hole {
                let want = (hole - off_in) as usize;
                let n = nix::fcntl::copy_file_range(&src, Some(&mut off_in), &dst, Some(&mut off_out), want)?;
                if n == 0 {
                    bail!("{} shrank while it was copied", from.display());
                }
                copied += n as u64;
            }
            pos = hole;
        }
        Ok(copied)
    })();
    match res {
        Ok(n) => Ok(n),
        Err(e) => {
            drop(dst);
            let _ = std::fs::remove_file(to);
            Err(e.context(format!("copying {} to {}", from.display(), to.display())))
        }
    }
}

fn system_time(t: chrono::DateTime<chrono::Utc>) -> std::time::SystemTime {
    std::time::UNIX_EPOCH
        + std::time::Duration::from_nanos(t.timestamp_nanos_opt().unwrap_or(0).max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copies_keep_holes_and_never_replace() {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let mut f = std::fs::File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all(b"head").unwrap();
        f.seek(SeekFrom::Start(32 << 20)).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        drop(f);
        let dst = d.path().join("dst");
        assert!(copy_sparse(&src, &dst, 0o600).unwrap() >= 8196);
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        let md = std::fs::metadata(&dst).unwrap();
        assert_eq!(md.len(), 64 << 20);
        assert!(md.blocks() * 512 < 1 << 20, "the holes stay holes: {} bytes allocated", md.blocks() * 512);
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        assert!(copy_sparse(&src, &dst, 0o600).is_err(), "an existing file is never replaced");
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    }

    #[test]
    fn refuses_escapes() {
        let d = tempfile::tempdir().unwrap();
        for bad in ["/etc/passwd", "../x", "a/../../x", ""] {
            assert!(write_file(d.path(), bad, b"x", 0o644).is_err(), "{bad}");
        }
        let err = write_file(d.path(), "../x", b"x", 0o644).unwrap_err().to_string();
        assert!(err.contains("refusing to write outside"), "{err}");
    }

    #[test]
    fn never_follows_a_symlink() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("evil")).unwrap();
        let err = write_file(d.path(), "evil/passwd", b"x", 0o644).unwrap_err().to_string();
        assert!(err.contains("symlink"), "{err}");
        std::os::unix::fs::symlink(outside.path().join("f"), d.path().join("link")).unwrap();
        assert!(write_file(d.path(), "link", b"x", 0o644).is_err());
        assert!(!outside.path().join("passwd").exists());
        assert!(!outside.path().join("f").exists());
    }

    #[test]
    fn writes_nested_with_mode() {
        let d = tempfile::tempdir().unwrap();
        let t =
            chrono::DateTime::parse_from_rfc3339("2020-01-02T03:04:05Z").unwrap().with_timezone(&chrono::Utc);
        let p = write_file_at(d.path(), "a/b/c.txt", b"hi", 0o777, Some(t)).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"hi");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o777);
        let m = std::fs::metadata(&p).unwrap().modified().unwrap();
        assert_eq!(m.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(), t.timestamp() as u64);
    }
}
