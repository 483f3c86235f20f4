//! A job's dependency caches in the guest (docs/caches.md): each cache path is an overlay of a
//! directory of its cache version's read-only disk (mounted at `/images/N` by the boot, as the
//! step images are) under a layer of the job's own in `/data/.executor-cache-<N>` (on the
//! workspace disk, so the job's disk cap counts what the steps write), mounted once per VM at
//! `/run/caches/<layer>` and bound into every step's root at the cache's path, the layer hidden
//! in the step's /data. A miss is the same overlay over an empty directory. Nothing is copied.
//!
//! And the layer's way back: the workspace tar carries only files, directories and symlinks to
//! the host, so a layer's overlay whiteouts go as empty `.wh.<name>` files and an opaque
//! directory holds an empty `.wh..wh..opq` (the OCI layer format), which the promotion reads.

use anyhow::{bail, Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use super::protocol::{CacheBind, CACHE_LAYER_PREFIX, OPAQUE_MARKER, WHITEOUT_PREFIX};

/// The layers whose overlay is mounted in this VM.
static MOUNTED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Refuses a bind the host could not have meant: a layer or directory name of another shape,
/// a target with `..` or nothing in it.
fn check(b: &CacheBind) -> Result<()> {
    let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    if !b.layer.strip_prefix(CACHE_LAYER_PREFIX).is_some_and(digits) {
        bail!("cache layer {:?} is not {CACHE_LAYER_PREFIX}<N>", b.layer);
    }
    if !b.sub.strip_prefix('p').is_some_and(digits) {
        bail!("cache directory {:?} is not p<N>", b.sub);
    }
    let rel = b.target.trim_start_matches('/');
    if rel.is_empty() || Path::new(rel).components().any(|c| !matches!(c, Component::Normal(_))) {
        bail!("cache path {:?} is not usable", b.target);
    }
    Ok(())
}

/// Mounts the overlay of `b` once per VM; returns where it is mounted.
fn overlay(b: &CacheBind) -> Result<PathBuf> {
    let dir = Path::new("/run/caches").join(&b.layer);
    let merged = dir.join("merged");
    let mut mounted = MOUNTED.lock().unwrap_or_else(|p| p.into_inner());
    if mounted.contains(&b.layer) {
        return Ok(merged);
    }
    fs::create_dir_all(&merged).with_context(|| format!("creating {}", merged.display()))?;
    let lower = match b.disk {
        Some(d) => Path::new("/images").join(d.to_string()).join(&b.sub),
        None => {
            let empty = dir.join("empty");
            fs::create_dir_all(&empty).with_context(|| format!("creating {}", empty.display()))?;
            empty
        }
    };
    let lmd =
        fs::symlink_metadata(&lower).with_context(|| format!("the cache's lower {}", lower.display()))?;
    if !lmd.is_dir() {
        bail!("the cache's lower {} is not a directory", lower.display());
    }
    let base = Path::new("/data").join(&b.layer);
    let (upper, work) = (base.join("upper"), base.join("work"));
    {
        use std::os::unix::fs::DirBuilderExt;
        // A fresh name at the top of /data: `create` fails rather than follow what a step left.
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&base)
            .with_context(|| format!("creating the cache layer {}", base.display()))?;
    }
    fs::create_dir(&upper).with_context(|| format!("creating {}", upper.display()))?;
    fs::create_dir(&work).with_context(|| format!("creating {}", work.display()))?;
    // The merged top keeps the lower's owner and mode (a cache of a non-root user stays its).
    nix::unistd::chown(&upper, Some(lmd.uid().into()), Some(lmd.gid().into()))
        .with_context(|| format!("changing the owner of {}", upper.display()))?;
    fs::set_permissions(&upper, fs::Permissions::from_mode(lmd.mode() & 0o7777))
        .with_context(|| format!("setting the mode of {}", upper.display()))?;
    let opts =
        format!("lowerdir={},upperdir={},workdir={}", lower.display(), upper.display(), work.display());
    mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .with_context(|| format!("mounting the overlay of cache layer {}", b.layer))?;
    mounted.insert(b.layer.clone());
    Ok(merged)
}

/// Where `b` is in a step's root.
fn destination(root: &Path, b: &CacheBind) -> PathBuf {
    match b.target.strip_prefix('/') {
        Some(abs) => root.join(abs),
        None => root.join("data").join(&b.target),
    }
}

/// Binds the caches into a step's root (its /data bound already) and hides their layers in
/// its /data.
pub(crate) fn bind(root: &Path, binds: &[CacheBind]) -> Result<()> {
    for b in binds {
        check(b)?;
        let src = overlay(b)?;
        let dest = destination(root, b);
        fs::create_dir_all(&dest).with_context(|| format!("creating {} in the step's root", b.target))?;
        mount(Some(&src), &dest, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .with_context(|| format!("binding cache layer {} at {}", b.layer, b.target))?;
    }
    for b in binds {
        mount(
            Some("tmpfs"),
            &root.join("data").join(&b.layer),
            Some("tmpfs"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("mode=000,size=4k"),
        )
        .with_context(|| format!("hiding cache layer {} in /data", b.layer))?;
    }
    Ok(())
}

/// Unbinds the caches from a step's root before it goes (its layer's removal must never walk
/// into a cache).
pub(crate) fn unbind(root: &Path, binds: &[CacheBind]) {
    for b in binds.iter().rev() {
        let _ = umount2(&root.join("data").join(&b.layer), MntFlags::MNT_DETACH);
        if check(b).is_ok() {
            let _ = umount2(&destination(root, b), MntFlags::MNT_DETACH);
        }
    }
}

/// Appends cache layer `name` (a directory at the top of /data) to the workspace tar: its
/// upper layer, whiteouts and opaque directories as OCI layer files; the overlay's work
/// directory stays.
pub(crate) fn append_layer<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    name: &Path,
    dir: &Path,
) -> Result<()> {
    tar.append_path_with_name(dir, name).with_context(|| format!("packing {}", dir.display()))?;
    let upper = dir.join("upper");
    if fs::symlink_metadata(&upper).is_ok_and(|m| m.is_dir()) {
        append_upper(tar, &name.join("upper"), &upper)?;
    }
    Ok(())
}

fn append_upper<W: std::io::Write>(tar: &mut tar::Builder<W>, name: &Path, dir: &Path) -> Result<()> {
    tar.append_path_with_name(dir, name).with_context(|| format!("packing {}", dir.display()))?;
    if is_opaque(dir) {
        append_empty(tar, &name.join(OPAQUE_MARKER))?;
    }
    for e in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        let (path, inside) = (e.path(), name.join(e.file_name()));
        let md = fs::symlink_metadata(&path).with_context(|| format!("inspecting {}", path.display()))?;
        let t = md.file_type();
        if t.is_char_device() && md.rdev() == 0 {
            let mut wh = std::ffi::OsString::from(WHITEOUT_PREFIX);
            wh.push(e.file_name());
            append_empty(tar, &name.join(wh))?;
        } else if t.is_dir() {
            append_upper(tar, &inside, &path)?;
        } else if t.is_file() || t.is_symlink() {
            tar.append_path_with_name(&path, &inside)
                .with_context(|| format!("packing {}", path.display()))?;
        }
        // Other devices, FIFOs and sockets are not kept in a cache.
    }
    Ok(())
}

fn append_empty<W: std::io::Write>(tar: &mut tar::Builder<W>, name: &Path) -> Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(0);
    h.set_mode(0o600);
    tar.append_data(&mut h, name, std::io::empty()).with_context(|| format!("packing {}", name.display()))
}

/// Whether `dir` is opaque in its upper layer (`trusted.overlay.opaque=y`).
fn is_opaque(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return false };
    let mut v = [0u8; 4];
    crate::base::sys::lgetxattr(&c, c"trusted.overlay.opaque", &mut v).is_some_and(|n| n >= 1 && v[0] == b'y')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(target: &str, sub: &str, layer: &str) -> CacheBind {
        CacheBind { target: target.into(), disk: Some(0), sub: sub.into(), layer: layer.into() }
    }

    #[test]
    fn binds_the_host_could_not_have_meant_are_refused() {
        assert!(check(&bind("/root/.npm", "p0", ".executor-cache-0")).is_ok());
        assert!(check(&bind("node_modules", "p1", ".executor-cache-12")).is_ok());
        for b in [
            bind("/root/../etc", "p0", ".executor-cache-0"),
            bind("/", "p0", ".executor-cache-0"),
            bind("a/../b", "p0", ".executor-cache-0"),
            bind("/x", "../p0", ".executor-cache-0"),
            bind("/x", "p0", ".executor-cache-../x"),
            bind("/x", "p0", ".executor-root-1"),
        ] {
            assert!(check(&b).is_err(), "{b:?}");
        }
        let root = Path::new("/r");
        assert_eq!(destination(root, &bind("/root/.npm", "p0", "")), Path::new("/r/root/.npm"));
        assert_eq!(destination(root, &bind("deps", "p0", "")), Path::new("/r/data/deps"));
    }

    #[test]
    fn a_layer_travels_with_its_whiteouts_as_files() {
        let tmp = tempfile::tempdir().unwrap();
        let layer = tmp.path().join(".executor-cache-0");
        fs::create_dir_all(layer.join("upper/d")).unwrap();
        fs::create_dir_all(layer.join("work/work")).unwrap();
        fs::write(layer.join("upper/d/f"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", layer.join("upper/l")).unwrap();
        let mut tar = tar::Builder::new(Vec::new());
        tar.follow_symlinks(false);
        append_layer(&mut tar, Path::new(".executor-cache-0"), &layer).unwrap();
        // A whiteout needs mknod; its translation is appended as the agent appends it.
        append_empty(&mut tar, Path::new(".executor-cache-0/upper/.wh.gone")).unwrap();
        let bytes = tar.into_inner().unwrap();
        let mut names: Vec<String> = tar::Archive::new(&bytes[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                ".executor-cache-0",
                ".executor-cache-0/upper",
                ".executor-cache-0/upper/.wh.gone",
                ".executor-cache-0/upper/d",
                ".executor-cache-0/upper/d/f",
                ".executor-cache-0/upper/l"
            ]
        );
    }
}
