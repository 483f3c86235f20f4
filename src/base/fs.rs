//! File writes: atomic replacement of a whole file, and writing below a root (a workspace)
//! without ever leaving it: relative paths only, no `..`, and no symlink followed on the way (a
//! hostile repository may have checked one out).

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Checks that `rel` is a plain relative path and returns it joined to `root`.
pub fn confined(root: &Path, rel: &str) -> Result<PathBuf> {
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

/// Creates the directories of `rel` below `root` (each one checked not to be a symlink) and
/// returns the full path of `rel`.
pub fn ensure_parent(root: &Path, rel: &str) -> Result<PathBuf> {
    let full = confined(root, rel)?;
    let parent_rel =
        full.strip_prefix(root).ok().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
    let mut cur = root.to_path_buf();
    for c in parent_rel.components() {
        cur.push(c);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                bail!(
                    "refusing to write {rel:?}: {} is a symlink",
                    cur.strip_prefix(root).unwrap_or(&cur).display()
                )
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => bail!(
                "refusing to write {rel:?}: {} is not a directory",
                cur.strip_prefix(root).unwrap_or(&cur).display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&cur).with_context(|| format!("creating {}", cur.display()))?;
            }
            Err(e) => return Err(e).with_context(|| format!("inspecting {}", cur.display())),
        }
    }
    Ok(full)
}

/// Writes `content` to `rel` below `root` with `mode`, never through a symlink.
pub fn write_file(root: &Path, rel: &str, content: &[u8], mode: u32) -> Result<PathBuf> {
    let full = ensure_parent(root, rel)?;
    if let Ok(m) = std::fs::symlink_metadata(&full) {
        if m.file_type().is_symlink() || m.is_dir() {
            bail!("refusing to write {rel:?}: it exists as a symlink or a directory");
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&full)
        .with_context(|| format!("opening {}", full.display()))?;
    f.write_all(content).with_context(|| format!("writing {}", full.display()))?;
    // The mode given to open() is filtered by the umask; the contract wants it exactly.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", full.display()))?;
    Ok(full)
}

/// Writes `bytes` to `path` through a temporary file in the same directory, so that a reader
/// never sees half a file and a crash leaves the old one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
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

/// Sets a file's modification time (for `modifiedAt`).
pub fn set_mtime(path: &Path, t: chrono::DateTime<chrono::Utc>) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let st = std::time::UNIX_EPOCH
        + std::time::Duration::from_nanos(t.timestamp_nanos_opt().unwrap_or(0).max(0) as u64);
    f.set_modified(st).with_context(|| format!("setting the mtime of {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let p = write_file(d.path(), "a/b/c.txt", b"hi", 0o777).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"hi");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o777);
        let t =
            chrono::DateTime::parse_from_rfc3339("2020-01-02T03:04:05Z").unwrap().with_timezone(&chrono::Utc);
        set_mtime(&p, t).unwrap();
        let m = std::fs::metadata(&p).unwrap().modified().unwrap();
        assert_eq!(m.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(), t.timestamp() as u64);
    }
}
