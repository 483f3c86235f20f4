//! The file work of a cache version: a version's tree copied by hard links (its files are never
//! written in place: a later job's overlay copies them up), a job's overlay upper layer applied
//! on top (whiteouts delete, opaque directories replace, the rest is copied), owners shifted from
//! the job's id range to the store's, and the manifest that the integrity check compares.
//! Nothing here follows a symlink: an upper layer is the job's, and may hold anything.

use crate::base::fs::remove_any;
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use crate::image::{ID_BASE, ID_COUNT};

/// The store's owner for a host id written by a job whose container root was `uid_base`: its
/// place in the job's range, moved to the store's; anything else becomes the store's root.
fn shift(id: u32, uid_base: u32) -> u32 {
    if (uid_base..uid_base.saturating_add(ID_COUNT)).contains(&id) {
        ID_BASE + (id - uid_base)
    } else if (ID_BASE..ID_BASE + ID_COUNT).contains(&id) {
        id
    } else {
        ID_BASE
    }
}

/// Whether `dir` has no entry (a missing directory counts as empty).
pub(super) fn is_empty_dir(dir: &Path) -> bool {
    fs::read_dir(dir).map(|mut rd| rd.next().is_none()).unwrap_or(true)
}

fn set_owner_mode(path: &Path, md: &fs::Metadata, uid_base: u32) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(shift(md.uid(), uid_base)), Some(shift(md.gid(), uid_base)))
        .with_context(|| format!("changing the owner of {}", path.display()))?;
    if !md.file_type().is_symlink() {
        // No set-id bits survive into a cache: it is read by later jobs.
        fs::set_permissions(path, fs::Permissions::from_mode(md.mode() & 0o1777))
            .with_context(|| format!("setting the mode of {}", path.display()))?;
    }
    Ok(())
}

/// Gives `path` the times of `md` (a cache keeps the mtimes its job wrote: Python's bytecode
/// cache and make compare them). A directory is dated after its entries are in place.
fn date_like(path: &Path, md: &fs::Metadata) -> Result<()> {
    crate::base::fs::set_times(path, (md.mtime(), md.mtime_nsec()))
}

/// Creates `dst` with `like`'s owner (shifted) and mode, or the store's root and 0755 when
/// `like` is not a directory.
pub(super) fn make_dir_like(like: &Path, dst: &Path, uid_base: u32) -> Result<()> {
    fs::create_dir(dst).with_context(|| format!("creating {}", dst.display()))?;
    match fs::symlink_metadata(like) {
        Ok(md) if md.is_dir() => set_owner_mode(dst, &md, uid_base),
        _ => {
            std::os::unix::fs::lchown(dst, Some(ID_BASE), Some(ID_BASE))
                .with_context(|| format!("changing the owner of {}", dst.display()))?;
            fs::set_permissions(dst, fs::Permissions::from_mode(0o755))
                .with_context(|| format!("setting the mode of {}", dst.display()))
        }
    }
}

/// Copies the version tree `src` to `dst`: directories made anew (owner, mode and times kept),
/// files hard-linked, symlinks recreated.
pub(super) fn link_copy(src: &Path, dst: &Path) -> Result<()> {
    let md = fs::symlink_metadata(src).with_context(|| format!("inspecting {}", src.display()))?;
    fs::create_dir(dst).with_context(|| format!("creating {}", dst.display()))?;
    set_owner_mode(dst, &md, ID_BASE)?;
    for e in fs::read_dir(src).with_context(|| format!("listing {}", src.display()))? {
        let e = e.with_context(|| format!("listing {}", src.display()))?;
        let (from, to) = (e.path(), dst.join(e.file_name()));
        let t = e.file_type().with_context(|| format!("inspecting {}", from.display()))?;
        if t.is_dir() {
            link_copy(&from, &to)?;
        } else if t.is_symlink() {
            let target = fs::read_link(&from).with_context(|| format!("reading {}", from.display()))?;
            std::os::unix::fs::symlink(&target, &to).with_context(|| format!("creating {}", to.display()))?;
            let md = fs::symlink_metadata(&from).with_context(|| format!("inspecting {}", from.display()))?;
            set_owner_mode(&to, &md, ID_BASE)?;
            date_like(&to, &md)?;
        } else {
            fs::hard_link(&from, &to)
                .with_context(|| format!("linking {} to {}", to.display(), from.display()))?;
        }
    }
    date_like(dst, &md)
}

/// Whether `md` is an overlay whiteout (a character device 0:0).
fn is_whiteout(md: &fs::Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

/// Whether the directory `path` is opaque in its upper layer (`trusted.overlay.opaque=y`).
fn is_opaque(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return false };
    let name = c"trusted.overlay.opaque";
    let mut v = [0u8; 4];
    crate::base::sys::lgetxattr(&c, name, &mut v).is_some_and(|n| n >= 1 && v[0] == b'y')
}

/// What a name of an upper layer that came back from a guest means: the OCI layer format's
/// opaque marker, a whiteout of a name (never `.`, `..` or empty), or itself.
enum WhiteoutFile<'a> {
    Opaque,
    Whiteout(&'a std::ffi::OsStr),
    Plain,
}

fn whiteout_file(name: &std::ffi::OsStr) -> WhiteoutFile<'_> {
    use crate::guest::protocol::{OPAQUE_MARKER, WHITEOUT_PREFIX};
    use std::os::unix::ffi::OsStrExt;
    let b = name.as_bytes();
    if b == OPAQUE_MARKER.as_bytes() {
        return WhiteoutFile::Opaque;
    }
    match b.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
        Some(rest) if !rest.is_empty() && rest != b"." && rest != b".." => {
            WhiteoutFile::Whiteout(std::ffi::OsStr::from_bytes(rest))
        }
        _ => WhiteoutFile::Plain,
    }
}

/// Applies the overlay upper layer `upper` onto the tree `dst` (see the module doc). With
/// `whiteout_files` (an upper that came back from a guest as a tar), its whiteouts and opaque
/// directories are the OCI layer format's files instead of devices and extended attributes.
pub(super) fn apply_upper(upper: &Path, dst: &Path, uid_base: u32, whiteout_files: bool) -> Result<()> {
    let Ok(top) = fs::symlink_metadata(upper) else { return Ok(()) };
    if !top.is_dir() {
        return Ok(());
    }
    set_owner_mode(dst, &top, uid_base)?;
    for e in fs::read_dir(upper).with_context(|| format!("listing {}", upper.display()))? {
        let e = e.with_context(|| format!("listing {}", upper.display()))?;
        let (from, to) = (e.path(), dst.join(e.file_name()));
        let md = fs::symlink_metadata(&from).with_context(|| format!("inspecting {}", from.display()))?;
        let t = md.file_type();
        let name = e.file_name();
        let marker = if whiteout_files { whiteout_file(&name) } else { WhiteoutFile::Plain };
        if let WhiteoutFile::Whiteout(gone) = marker {
            // A single name of this directory: the parent `dst` is a directory this walk made
            // or kept, never a symlink.
            remove_any(&dst.join(gone))?;
        } else if matches!(marker, WhiteoutFile::Opaque) {
            // Applied with its directory, below.
        } else if is_whiteout(&md) {
            remove_any(&to)?;
        } else if t.is_dir() {
            let opaque = is_opaque(&from)
                || (whiteout_files
                    && fs::symlink_metadata(from.join(crate::guest::protocol::OPAQUE_MARKER))
                        .is_ok_and(|m| m.is_file()));
            let keep = !opaque && fs::symlink_metadata(&to).is_ok_and(|m| m.is_dir());
            if !keep {
                remove_any(&to)?;
                fs::create_dir(&to).with_context(|| format!("creating {}", to.display()))?;
            }
            apply_upper(&from, &to, uid_base, whiteout_files)?;
        } else if t.is_symlink() {
            remove_any(&to)?;
            let target = fs::read_link(&from).with_context(|| format!("reading {}", from.display()))?;
            std::os::unix::fs::symlink(&target, &to).with_context(|| format!("creating {}", to.display()))?;
            set_owner_mode(&to, &md, uid_base)?;
            date_like(&to, &md)?;
        } else if t.is_file() {
            remove_any(&to)?;
            copy_file(&from, &to)?;
            set_owner_mode(&to, &md, uid_base)?;
            date_like(&to, &md)?;
        }
        // FIFOs, sockets and devices are not kept.
    }
    date_like(dst, &top)
}

fn copy_file(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut src = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(from)
        .with_context(|| format!("opening {}", from.display()))?;
    let mut dst = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .with_context(|| format!("creating {}", to.display()))?;
    std::io::copy(&mut src, &mut dst)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// The manifest of `tree` (one line per entry, sorted by path: type, mode, owner, size, content
/// hash, path) with the bytes and files it counts.
pub(super) fn manifest(tree: &Path) -> Result<(Vec<u8>, u64, u64)> {
    let mut lines = Vec::new();
    let (mut bytes, mut files) = (0u64, 0u64);
    let mut stack = vec![std::path::PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = tree.join(&rel);
        for e in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let e = e.with_context(|| format!("listing {}", dir.display()))?;
            let r = rel.join(e.file_name());
            let md = fs::symlink_metadata(e.path())
                .with_context(|| format!("inspecting {}", e.path().display()))?;
            let (kind, hash) = if md.is_dir() {
                stack.push(r.clone());
                ("d", String::new())
            } else if md.file_type().is_symlink() {
                let target =
                    fs::read_link(e.path()).with_context(|| format!("reading {}", e.path().display()))?;
                ("l", hex::encode(Sha256::digest(target.as_os_str().as_encoded_bytes())))
            } else {
                files += 1;
                bytes += md.len();
                ("f", hash_file(&e.path())?)
            };
            let size = if md.is_file() { md.len() } else { 0 };
            let line = format!(
                "{kind} {:o} {} {} {size} {hash} {}",
                md.mode() & 0o7777,
                md.uid(),
                md.gid(),
                r.display()
            );
            lines.push((r, line));
        }
    }
    lines.sort();
    let mut out = Vec::new();
    for (_, line) in lines {
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    Ok((out, bytes, files))
}

pub(super) fn hash_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}
