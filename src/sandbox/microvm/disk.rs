//! Disks of a microVM: ext4 images built from host directories with `mkfs.ext4 -d` (no loop
//! mount, no root needed). Image disks are cached by the image's digest and shared read-only.

use anyhow::{bail, Context, Result};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// Bytes used by the files below `dir` (not following symlinks).
pub(crate) fn tree_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))?.flatten() {
            let md = e.metadata().with_context(|| format!("reading {}", e.path().display()))?;
            total += md.len().max(4096);
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok(total)
}

/// Makes an ext4 image of `size` bytes at `out` holding a copy of `dir`.
pub(crate) fn make_ext4(dir: &Path, out: &Path, size: u64, label: &str) -> Result<()> {
    let f = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    f.set_len(size).with_context(|| format!("sizing {}", out.display()))?;
    drop(f);
    let o = crate::base::proc::command("mkfs.ext4")
        .args(["-q", "-F", "-L", label, "-E", "root_owner=0:0", "-O", "^has_journal", "-m", "0", "-d"])
        .arg(dir)
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("running mkfs.ext4 (install e2fsprogs)")?;
    if !o.status.success() {
        let _ = fs::remove_file(out);
        bail!("mkfs.ext4 -d {} failed: {}", dir.display(), String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(())
}

/// The file name (without extension) of the VM disk of image `digest`.
fn disk_stem(digest: &str) -> String {
    digest.chars().filter(|c| c.is_ascii_alphanumeric()).take(64).collect()
}

/// The VM disks under `cache` whose image is no longer in the store (`digests`: the store's
/// trees): a disk is a copy of its image's tree, so it follows the tree out when `image prune`
/// or the janitor's budget pass removes the image. Returns each file removed (or, with
/// `dry_run`, that would be) and the bytes it takes on disk. A VM still running from a removed
/// disk keeps its open file; disks being built (dot files) are left alone.
pub(crate) fn remove_orphan_image_disks(
    cache: &Path,
    digests: &std::collections::HashSet<String>,
    dry_run: bool,
) -> Result<Vec<(String, u64)>> {
    let rd = match fs::read_dir(cache) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", cache.display())),
    };
    let keep: std::collections::HashSet<String> = digests.iter().map(|d| disk_stem(d)).collect();
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".ext4") else { continue };
        let stem = stem.strip_suffix(".ids").unwrap_or(stem);
        if name.starts_with('.') || keep.contains(stem) || !entry.file_type()?.is_file() {
            continue;
        }
        let bytes = entry.metadata()?.blocks() * 512;
        if !dry_run {
            fs::remove_file(entry.path()).with_context(|| format!("removing {}", entry.path().display()))?;
        }
        out.push((name, bytes));
    }
    out.sort();
    Ok(out)
}

/// The read-only disk of an image, built once per digest under `cache`.
pub(crate) fn image_disk(cache: &Path, digest: &str, rootfs: &Path) -> Result<PathBuf> {
    let safe = disk_stem(digest);
    if safe.is_empty() {
        bail!("image digest {digest:?} is not usable as a file name");
    }
    // `.ids`: built with the image's own owners (older disks had the store's shifted ones).
    let out = cache.join(format!("{safe}.ids.ext4"));
    if out.is_file() {
        return Ok(out);
    }
    fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let size = (tree_bytes(rootfs)? * 5 / 4 + (64 << 20)).next_multiple_of(1 << 20);
    let tmp = tempfile::Builder::new()
        .prefix(".disk-")
        .tempfile_in(cache)
        .with_context(|| format!("creating a temporary file in {}", cache.display()))?
        .into_temp_path();
    make_ext4_own_ids(rootfs, cache, &tmp, size, "image").with_context(|| format!("image {digest}"))?;
    // The same image's disk under the old name (shifted owners) is never used again.
    let _ = fs::remove_file(cache.join(format!("{safe}.ext4")));
    tmp.persist(&out).with_context(|| format!("installing {}", out.display()))?;
    Ok(out)
}

/// Makes an ext4 image of `size` bytes at `out` of `tree`, a tree of the store owned by its id
/// range (`ID_BASE + n`, images and cache versions alike), read through an idmapped mount at a
/// temporary directory in `scratch` so that the guest sees the owners `n` (a `User` of 1000 owns
/// its home). Without an idmapped mount the disk keeps the store's owners, and says so.
fn make_ext4_own_ids(tree: &Path, scratch: &Path, out: &Path, size: u64, label: &str) -> Result<()> {
    let src = tempfile::Builder::new()
        .prefix(".src-")
        .tempdir_in(scratch)
        .with_context(|| format!("creating a temporary directory in {}", scratch.display()))?;
    let ids = crate::image::ID_BASE;
    let mapped = crate::base::sys::userns_fd(ids, 0, crate::image::ID_COUNT)
        .and_then(|ns| crate::base::sys::idmapped_bind(tree, src.path(), &ns));
    match mapped {
        Ok(()) => {
            let r = make_ext4(src.path(), out, size, label);
            let _ = nix::mount::umount2(src.path(), nix::mount::MntFlags::MNT_DETACH);
            r
        }
        Err(e) => {
            tracing::warn!(
                "{}: no idmapped mount ({e}); its VM disk keeps the store's owners (uid {ids} + n), \
                 so a user other than root does not own its files there",
                tree.display()
            );
            make_ext4(tree, out, size, label)
        }
    }
}

/// Makes the read-only disk of a cache version's `tree` at `out` (a file the caller installs;
/// `scratch` is a directory of the same filesystem for the temporary mount point), owners as
/// the guest sees them.
pub(crate) fn cache_tree_disk(tree: &Path, scratch: &Path, out: &Path) -> Result<()> {
    let size = (tree_bytes(tree)? * 5 / 4 + (32 << 20)).next_multiple_of(1 << 20);
    make_ext4_own_ids(tree, scratch, out, size, "cache")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_disks_of_images_gone_from_the_store_go_too() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("images");
        fs::create_dir(&cache).unwrap();
        let kept = format!("sha256:{}", "a".repeat(64));
        let gone = format!("sha256:{}", "b".repeat(64));
        let files = [
            format!("{}.ids.ext4", disk_stem(&kept)),
            format!("{}.ids.ext4", disk_stem(&gone)),
            format!("{}.ext4", disk_stem(&gone)),
            ".disk-building".to_string(),
            "notes.txt".to_string(),
        ];
        for f in &files {
            fs::write(cache.join(f), vec![1u8; 8192]).unwrap();
        }
        let digests: std::collections::HashSet<String> = [kept.clone()].into();
        let want = vec![files[2].clone(), files[1].clone()];
        let dry = remove_orphan_image_disks(&cache, &digests, true).unwrap();
        assert_eq!(dry.iter().map(|(f, _)| f.clone()).collect::<Vec<_>>(), want);
        assert!(dry.iter().all(|(_, b)| *b >= 8192), "{dry:?}");
        assert!(cache.join(&files[1]).exists(), "a dry run removes nothing");
        let done = remove_orphan_image_disks(&cache, &digests, false).unwrap();
        assert_eq!(done, dry);
        let mut left: Vec<String> = fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec![".disk-building".to_string(), "notes.txt".to_string(), files[0].clone()]);
        assert!(remove_orphan_image_disks(&tmp.path().join("none"), &digests, false).unwrap().is_empty());
    }
}
