//! `executor image import`: a `docker save` tarball or an OCI image-layout tarball becomes a tree
//! in the store. Layers are applied in order with whiteouts; entries that would escape the root,
//! device nodes, hard links out of the tree and whiteouts of `.` or `..` are refused. Every blob
//! of an OCI layout (manifests, config, layers) is checked against its digest, and every layer
//! of a `docker save` tarball against its config's `diff_ids`, before the tree is keyed by them:
//! an imported tarball cannot stand in for an image a later pull or import names by digest.

use crate::base::fs::remove_any;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::fs;
use std::io::{BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use super::{ImageMeta, ImageStore, ResolvedImage};

/// Directories the sandbox mounts over.
const MOUNT_POINTS: &[&str] = &["proc", "sys", "dev", "tmp", "data"];

/// The largest JSON document (manifest, index, config) read from a tarball.
const MAX_JSON: u64 = 4 << 20;

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    layers: Vec<String>,
}

#[derive(Deserialize)]
struct OciIndex {
    manifests: Vec<OciDescriptor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciDescriptor {
    digest: String,
    #[serde(default)]
    media_type: String,
}

/// The config's `rootfs.diff_ids`: the digests of the uncompressed layer tars.
#[derive(Deserialize, Default)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Deserialize, Default)]
struct ConfigRootFs {
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Deserialize)]
struct OciManifest {
    config: OciDescriptor,
    layers: Vec<OciDescriptor>,
    #[serde(default)]
    manifests: Option<Vec<OciDescriptor>>,
}

/// The parts of an image config file (`{"config": {...}}`) the store keeps.
#[derive(Deserialize, Default)]
pub(crate) struct ImageConfigFile {
    #[serde(default)]
    pub config: Option<ImageConfig>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ImageConfig {
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

/// Imports `file` as `name`, reporting progress on stderr when it is a terminal.
pub fn import(store: &ImageStore, name: &str, file: &Path) -> Result<ResolvedImage> {
    super::Reference::parse(name)?;
    let staging = store.staging("import")?;
    let src = staging.path().join("src");
    let tree = staging.path().join("tree");
    fs::create_dir(&src)?;
    fs::create_dir(&tree)?;
    unpack_outer(file, &src).with_context(|| format!("reading image tarball {}", file.display()))?;

    // Each layer with its media type ("" for a docker save layer, told by its magic bytes) and
    // the digest its uncompressed tar must have (docker save), if any.
    let is_docker_save = src.join("manifest.json").is_file();
    let (digest, config_path, layers, diff_ids) = if is_docker_save {
        let ms: Vec<DockerManifest> = read_json(&src, "manifest.json")?;
        let m = ms.into_iter().next().context("manifest.json lists no image")?;
        let config_path = safe_join(&src, &m.config)?;
        let digest = sha256_file(&config_path)?;
        let layers =
            m.layers.iter().map(|l| Ok((safe_join(&src, l)?, String::new()))).collect::<Result<Vec<_>>>()?;
        let cfg: ConfigRootFs = serde_json::from_slice(&read_limited(&config_path)?).map_err(|e| {
            anyhow::anyhow!("the image config of {} does not parse (line {})", file.display(), e.line())
        })?;
        // The tree is keyed by the config's digest: a config that names its layers' digests
        // (every real one does) gets them checked; one that names none is keyed by its layers'
        // digests too (below), so that two such images with one config never share a tree.
        let diff_ids = cfg.rootfs.unwrap_or_default().diff_ids;
        let diff_ids: Vec<Option<String>> = match diff_ids.len() {
            0 => vec![None; layers.len()],
            n if n == layers.len() => diff_ids.into_iter().map(Some).collect(),
            n => bail!(
                "the image config of {} lists {n} layer digests for {} layers",
                file.display(),
                layers.len()
            ),
        };
        (digest, config_path, layers, diff_ids)
    } else if src.join("index.json").is_file() {
        let index: OciIndex = read_json(&src, "index.json")?;
        let mut desc = index.manifests.into_iter().next().context("index.json lists no manifest")?;
        // A nested index (multi-platform): take its first manifest.
        let mut manifest: OciManifest;
        loop {
            manifest = read_verified_json(&src, &desc.digest)?;
            match manifest.manifests.take() {
                Some(list) if desc.media_type.contains("index") || manifest.layers.is_empty() => {
                    desc = list.into_iter().next().context("nested image index lists no manifest")?;
                }
                _ => break,
            }
        }
        let config_path = verified_blob(&src, &manifest.config.digest)?;
        let layers = manifest
            .layers
            .iter()
            .map(|l| Ok((verified_blob(&src, &l.digest)?, l.media_type.clone())))
            .collect::<Result<Vec<_>>>()?;
        let none = vec![None; layers.len()];
        (desc.digest, config_path, layers, none)
    } else {
        bail!(
            "{} is neither a docker save tarball (manifest.json) nor an OCI layout (index.json)",
            file.display()
        );
    };

    let cfg: ImageConfigFile = serde_json::from_slice(&read_limited(&config_path)?).map_err(|e| {
        anyhow::anyhow!("the image config of {} does not parse (line {})", file.display(), e.line())
    })?;
    let cfg = cfg.config.unwrap_or_default();

    let total: u64 = layers.iter().filter_map(|(l, _)| fs::metadata(l).ok()).map(|m| m.len()).sum();
    let bar = indicatif::ProgressBar::with_draw_target(Some(total), indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes}") {
        bar.set_style(style.progress_chars("=> "));
    }
    let mut size = 0;
    let mut layer_digests = Vec::new();
    for (i, ((layer, media_type), diff_id)) in layers.iter().zip(&diff_ids).enumerate() {
        bar.set_message(format!("layer {}/{}", i + 1, layers.len()));
        let f = fs::File::open(layer).with_context(|| format!("opening layer {}", layer.display()))?;
        let tar = super::layer::decompress(f, media_type)
            .with_context(|| format!("layer {} of {}", i + 1, file.display()))?;
        let hasher = std::rc::Rc::new(std::cell::RefCell::new(<sha2::Sha256 as sha2::Digest>::new()));
        let hashed = Hashed { inner: tar, hasher: hasher.clone() };
        size += apply_layer(bar.wrap_read(hashed), &tree)
            .with_context(|| format!("applying layer {} of {}", i + 1, file.display()))?;
        let got = format!("sha256:{}", hex::encode(sha2::Digest::finalize(hasher.take())));
        if let Some(want) = diff_id {
            if &got != want {
                bail!(
                    "layer {} of {} does not match its digest {want} in the image config: refused",
                    i + 1,
                    file.display()
                );
            }
        }
        layer_digests.push(got);
    }
    bar.finish_and_clear();
    finish_tree(&tree)?;
    let digest = if is_docker_save && diff_ids.iter().all(Option::is_none) && !layers.is_empty() {
        let keyed = format!("{digest}\n{}", layer_digests.join("\n"));
        format!("sha256:{}", hex::encode(<sha2::Sha256 as sha2::Digest>::digest(keyed)))
    } else {
        digest
    };
    let meta = ImageMeta {
        digest,
        env: cfg.env.unwrap_or_default(),
        workdir: cfg.working_dir.unwrap_or_default(),
        user: cfg.user.unwrap_or_default(),
        size,
        disk: 0,
        created: super::now(),
        source: "import".into(),
        layers: Vec::new(),
        private: false,
    };
    let img = store.commit_tree(&tree, &meta, name)?;
    drop(staging);
    Ok(img)
}

/// Readies an unpacked tree for the store: the mount points the runtime needs (so that it never
/// has to create them in the shared tree), and ownership shifted into the container range.
pub(crate) fn finish_tree(tree: &Path) -> Result<()> {
    for d in MOUNT_POINTS {
        let p = tree.join(d);
        if fs::symlink_metadata(&p).is_err() {
            fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        }
    }
    super::shift_ownership(tree)
}

fn blob_path(digest: &str) -> Result<String> {
    match digest.split_once(':') {
        Some((alg, hex))
            if alg.bytes().all(|b| b.is_ascii_alphanumeric())
                && hex.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            Ok(format!("blobs/{alg}/{hex}"))
        }
        _ => bail!("malformed digest {digest:?}"),
    }
}

/// Reads a stream and hashes what it yields (the uncompressed tar of a layer).
struct Hashed {
    inner: Box<dyn Read>,
    hasher: std::rc::Rc<std::cell::RefCell<sha2::Sha256>>,
}

impl Read for Hashed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        sha2::Digest::update(&mut *self.hasher.borrow_mut(), &buf[..n]);
        Ok(n)
    }
}

/// The path of the layout's blob `digest`, after checking that its content has that digest.
fn verified_blob(root: &Path, digest: &str) -> Result<PathBuf> {
    let path = safe_join(root, &blob_path(digest)?)?;
    if !digest.starts_with("sha256:") {
        bail!("blob {digest:?}: only sha256 digests are supported");
    }
    let got = sha256_file(&path)?;
    if got != digest {
        bail!("blob {digest} of the OCI layout does not match its digest (got {got}): refused");
    }
    Ok(path)
}

/// A JSON blob of the layout, checked against its digest.
fn read_verified_json<T: serde::de::DeserializeOwned>(root: &Path, digest: &str) -> Result<T> {
    let path = verified_blob(root, digest)?;
    serde_json::from_slice(&read_limited(&path)?)
        .map_err(|e| anyhow::anyhow!("blob {digest} does not parse (line {})", e.line()))
}

fn read_limited(path: &Path) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    fs::File::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .take(MAX_JSON)
        .read_to_end(&mut buf)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(buf)
}

fn read_json<T: serde::de::DeserializeOwned>(root: &Path, rel: &str) -> Result<T> {
    let path = safe_join(root, rel)?;
    serde_json::from_slice(&read_limited(&path)?).with_context(|| format!("parsing {rel}"))
}

fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// Unpacks the outer tarball: only regular files and directories, nothing escaping `dest`.
fn unpack_outer(file: &Path, dest: &Path) -> Result<()> {
    let f = fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let mut ar = tar::Archive::new(maybe_gunzip(BufReader::new(f))?);
    for entry in ar.entries()? {
        let mut entry = entry?;
        let rel = normalize(&entry.path()?)?;
        let Some(rel) = rel else { continue };
        let path = dest.join(&rel);
        check_parents(dest, &rel)?;
        match entry.header().entry_type() {
            tar::EntryType::Directory => fs::create_dir_all(&path)?,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(p) = path.parent() {
                    fs::create_dir_all(p)?;
                }
                let mut out =
                    fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
                std::io::copy(&mut entry, &mut out)?;
            }
            // Old docker save tarballs link identical layers; those links are skipped since
            // manifest.json names the real files.
            _ => {}
        }
    }
    Ok(())
}

fn maybe_gunzip<R: std::io::BufRead + 'static>(mut r: R) -> Result<Box<dyn Read>> {
    let head = r.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::GzDecoder::new(r)))
    } else {
        Ok(Box::new(r))
    }
}

/// `entry` as a relative path inside the root, `None` for the root itself; an entry that would
/// escape the root is an error.
fn normalize(entry: &Path) -> Result<Option<PathBuf>> {
    let mut out = PathBuf::new();
    for c in entry.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) | Component::ParentDir => {
                bail!("refusing entry {:?}: it escapes the image root", entry.display().to_string())
            }
        }
    }
    Ok(if out.as_os_str().is_empty() { None } else { Some(out) })
}

fn safe_join(root: &Path, rel: &str) -> Result<PathBuf> {
    match normalize(Path::new(rel))? {
        Some(r) => {
            check_parents(root, &r)?;
            Ok(root.join(r))
        }
        None => bail!("refusing the empty path {rel:?}"),
    }
}

/// Refuses a path whose parent directories pass through a symlink (which could lead out).
fn check_parents(root: &Path, rel: &Path) -> Result<()> {
    let mut cur = root.to_path_buf();
    let parent = rel.parent().unwrap_or(Path::new(""));
    for c in parent.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(md) if md.file_type().is_symlink() => {
                bail!("refusing entry {:?}: its parent {:?} is a symlink", rel.display().to_string(), c)
            }
            Ok(md) if !md.is_dir() => {
                bail!("refusing entry {:?}: a parent is not a directory", rel.display().to_string())
            }
            _ => {}
        }
    }
    Ok(())
}

/// Applies one layer onto `root`; returns the bytes of file content. `reader` yields the plain
/// tar (the caller decompressed it, once): it is read to its end, so a cap or a hash around it
/// sees every byte.
pub fn apply_layer(reader: impl Read + 'static, root: &Path) -> Result<u64> {
    let mut ar = tar::Archive::new(BufReader::new(reader));
    let mut size = 0;
    // A directory is dated once its entries are in place: adding one changes its mtime.
    let mut dirs = Vec::new();
    for entry in ar.entries()? {
        let mut entry = entry?;
        let times = entry_times(&mut entry);
        let raw = entry.path()?.into_owned();
        let Some(rel) = normalize(&raw)? else { continue };
        check_parents(root, &rel)?;
        let path = root.join(&rel);
        let fname = rel.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        if fname == ".wh..wh..opq" {
            let dir = path.parent().unwrap_or(root);
            if let Ok(rd) = fs::read_dir(dir) {
                for e in rd {
                    remove_any(&e?.path())?;
                }
            }
            continue;
        }
        if let Some(hidden) = fname.strip_prefix(".wh.") {
            // `.wh..` and `.wh...` would hide the directory itself or its parent.
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                bail!(
                    "refusing whiteout {:?}: it names no entry of its directory",
                    rel.display().to_string()
                );
            }
            remove_any(&path.with_file_name(hidden))?;
            continue;
        }
        let header = entry.header();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let (uid, gid) = (header.uid().unwrap_or(0), header.gid().unwrap_or(0));
        let kind = header.entry_type();
        if let Some(p) = path.parent() {
            fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
        }
        match kind {
            tar::EntryType::Directory => {
                if fs::symlink_metadata(&path).map(|m| !m.is_dir()).unwrap_or(false) {
                    remove_any(&path)?;
                }
                if !path.exists() {
                    fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                remove_any(&path)?;
                let mut out =
                    fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
                size += std::io::copy(&mut entry, &mut out)?;
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name()?.context("symlink without a target")?.into_owned();
                remove_any(&path)?;
                std::os::unix::fs::symlink(&target, &path)
                    .with_context(|| format!("creating symlink {}", path.display()))?;
            }
            tar::EntryType::Link => {
                let target = entry.link_name()?.context("hard link without a target")?.into_owned();
                let target_rel = match normalize(&target) {
                    Ok(Some(t)) => t,
                    _ => bail!(
                        "refusing hard link {:?} to {:?}: it points out of the image tree",
                        rel.display().to_string(),
                        target.display().to_string()
                    ),
                };
                check_parents(root, &target_rel)?;
                let src = root.join(&target_rel);
                let md = fs::symlink_metadata(&src).with_context(|| {
                    format!(
                        "hard link {:?} names {:?}, which the tree does not hold",
                        rel.display().to_string(),
                        target_rel
                    )
                })?;
                if md.is_dir() {
                    bail!("refusing hard link {:?} to a directory", rel.display().to_string());
                }
                remove_any(&path)?;
                fs::hard_link(&src, &path)
                    .with_context(|| format!("creating hard link {}", path.display()))?;
                continue;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                bail!("refusing device node {:?}", rel.display().to_string())
            }
            tar::EntryType::Fifo => {
                remove_any(&path)?;
                nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .with_context(|| format!("creating fifo {}", path.display()))?;
            }
            // pax and GNU long-name headers are consumed by the tar reader; others carry nothing.
            _ => continue,
        }
        std::os::unix::fs::lchown(&path, Some(uid as u32), Some(gid as u32))
            .with_context(|| format!("changing the owner of {}", path.display()))?;
        if kind != tar::EntryType::Symlink {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .with_context(|| format!("setting the mode of {}", path.display()))?;
        }
        if kind == tar::EntryType::Directory {
            dirs.push((path, times));
        } else {
            crate::base::fs::set_times(&path, times)?;
        }
    }
    for (dir, times) in dirs.iter().rev() {
        // Gone if a later entry of this layer replaced it; a path below the root, checked above.
        if fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
            crate::base::fs::set_times(dir, *times)?;
        }
    }
    // The end-of-archive blocks and anything after them: read, so that the cap counts them.
    std::io::copy(&mut ar.into_inner(), &mut std::io::sink()).context("reading the layer to its end")?;
    Ok(size)
}

/// The modification time a layer gives an entry, as (seconds, nanoseconds): a PAX `mtime`
/// record where there is one (it may carry a fraction), else the header's whole seconds.
fn entry_times<R: Read>(entry: &mut tar::Entry<R>) -> (i64, i64) {
    let header = entry.header().mtime().map(|s| (s.min(i64::MAX as u64) as i64, 0)).unwrap_or((0, 0));
    let Ok(Some(pax)) = entry.pax_extensions() else { return header };
    for ext in pax.flatten() {
        if ext.key() != Ok("mtime") {
            continue;
        }
        let Ok(v) = ext.value() else { break };
        let (whole, frac) = v.split_once('.').unwrap_or((v, ""));
        let Ok(secs) = whole.parse::<i64>() else { break };
        let digits: String = frac.chars().take(9).collect();
        let nanos = format!("{digits:0<9}").parse::<i64>().unwrap_or(0);
        // -1.5 is 2 s before the epoch plus 0.5 s.
        return if whole.starts_with('-') && nanos > 0 {
            (secs - 1, 1_000_000_000 - nanos)
        } else {
            (secs, nanos)
        };
    }
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, data).unwrap();
    }

    fn raw(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, link: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o644);
        h.set_entry_type(kind);
        // Set the name bytes directly so that `..` reaches the reader unfiltered.
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        if !link.is_empty() {
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_cksum();
        b.append(&h, std::io::empty()).unwrap();
    }

    #[test]
    fn layers_apply_in_order_with_whiteouts() {
        let root = tempfile::tempdir().unwrap();
        let l1 = layer(|b| {
            file(b, "etc/a", b"a");
            file(b, "etc/b", b"b");
            file(b, "opt/x/1", b"1");
        });
        let l2 = layer(|b| {
            file(b, "etc/.wh.a", b"");
            file(b, "opt/x/.wh..wh..opq", b"");
            file(b, "opt/x/2", b"2");
            raw(b, tar::EntryType::Link, "etc/c", "etc/b");
            raw(b, tar::EntryType::Symlink, "etc/passwd-link", "/etc/passwd");
        });
        apply_layer(std::io::Cursor::new(l1), root.path()).unwrap();
        apply_layer(std::io::Cursor::new(l2), root.path()).unwrap();
        let r = root.path();
        assert!(!r.join("etc/a").exists());
        assert_eq!(fs::read_to_string(r.join("etc/c")).unwrap(), "b");
        assert!(!r.join("opt/x/1").exists());
        assert!(r.join("opt/x/2").exists());
        assert_eq!(fs::read_link(r.join("etc/passwd-link")).unwrap(), Path::new("/etc/passwd"));
    }

    /// Entries keep the times their layer gives them, a directory too although entries are
    /// written into it after it (Python's bytecode cache is valid only for its source's mtime);
    /// a symlink is dated itself, and a PAX record's fraction is kept.
    #[test]
    fn layers_keep_their_entries_times() {
        use std::os::unix::fs::MetadataExt;
        let dated = |b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, mtime: u64| {
            let mut h = tar::Header::new_gnu();
            h.set_size(if kind == tar::EntryType::Regular { 1 } else { 0 });
            h.set_mode(0o755);
            h.set_entry_type(kind);
            h.set_mtime(mtime);
            if kind == tar::EntryType::Symlink {
                h.set_link_name("/nowhere").unwrap();
            }
            let data: &[u8] = if kind == tar::EntryType::Regular { b"x" } else { b"" };
            b.append_data(&mut h, path, data).unwrap();
        };
        let l = layer(|b| {
            dated(b, tar::EntryType::Directory, "lib", 1_000);
            dated(b, tar::EntryType::Regular, "lib/a.py", 2_000);
            dated(b, tar::EntryType::Symlink, "lib/l", 3_000);
            b.append_pax_extensions([("mtime", &b"1700000000.25"[..])]).unwrap();
            dated(b, tar::EntryType::Regular, "lib/b.py", 4_000);
            b.append_pax_extensions([("mtime", &b"-1.5"[..])]).unwrap();
            dated(b, tar::EntryType::Regular, "lib/c.py", 5_000);
        });
        let root = tempfile::tempdir().unwrap();
        apply_layer(std::io::Cursor::new(l), root.path()).unwrap();
        let times = |p: &str| {
            let md = fs::symlink_metadata(root.path().join(p)).unwrap();
            (md.mtime(), md.mtime_nsec())
        };
        assert_eq!(times("lib"), (1_000, 0));
        assert_eq!(times("lib/a.py"), (2_000, 0));
        assert_eq!(times("lib/l"), (3_000, 0));
        assert_eq!(times("lib/b.py"), (1_700_000_000, 250_000_000));
        assert_eq!(times("lib/c.py"), (-2, 500_000_000));
    }

    #[test]
    fn hostile_entries_are_refused() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (layer(|b| raw(b, tar::EntryType::Regular, "../escape", "")), "escapes the image root"),
            (layer(|b| raw(b, tar::EntryType::Regular, "/abs", "")), "escapes the image root"),
            (layer(|b| raw(b, tar::EntryType::Char, "dev/mem", "")), "device node"),
            (layer(|b| raw(b, tar::EntryType::Block, "dev/sda", "")), "device node"),
            (layer(|b| raw(b, tar::EntryType::Link, "x", "../../etc/shadow")), "out of the image tree"),
            (layer(|b| file(b, "etc/.wh..", b"")), "refusing whiteout"),
            (layer(|b| file(b, "etc/sub/.wh...", b"")), "refusing whiteout"),
            (layer(|b| file(b, ".wh.", b"")), "refusing whiteout"),
            (
                layer(|b| {
                    raw(b, tar::EntryType::Symlink, "up", "/");
                    file(b, "up/etc/evil", b"x");
                }),
                "is a symlink",
            ),
        ];
        for (bytes, want) in cases {
            let root = tempfile::tempdir().unwrap();
            let err = apply_layer(std::io::Cursor::new(bytes), root.path()).unwrap_err();
            assert!(format!("{err:#}").contains(want), "{err:#} should say {want}");
        }
    }
}
