//! The image store: content-addressed root filesystem trees under `$EXECUTOR_STATE_DIR/images`,
//! named by references (`name:tag`), safe for several processes importing and using images at
//! once.
//!
//! Layout:
//! - `rootfs/<hex>/`: an image's root tree, owned by the container uid range (see [`ID_BASE`]);
//!   `rootfs/<hex>.json` its metadata. `<hex>` is the image digest without `sha256:`.
//! - `refs.json`: `{"name:tag": "sha256:<hex>"}`, replaced atomically.
//! - `refs.json` also holds pinned names, `registry/repo@sha256:<hex>` (what a pull's tag
//!   resolved to).
//! - `blobs/sha256/<hex>`: pulled layer blobs as the registry served them (verified), shared
//!   between images (a later pull of an image with the same layer does not download it); they
//!   go with the last tree that lists them, and before any image when the store is over its
//!   budget (prune.rs).
//! - `locks/`: one lock per pulled reference, so that concurrent pulls download once.
//! - `users/<sandbox>`: the digests a live sandbox uses; `rm` never deletes those trees.
//! - `tmp/`: staging for imports and builds, renamed into `rootfs/` when complete.
//! - `.lock`: taken exclusively (flock) while refs change or trees are collected.

pub(crate) mod blob;
pub mod build;
pub(crate) mod destination;
pub mod import;
pub(crate) mod layer;
pub(crate) mod prune;
pub(crate) mod pull;
pub(crate) mod registry;
pub(crate) mod runas;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Host uid/gid that container uid 0 maps to; container ids `0..ID_COUNT` map to
/// `ID_BASE..ID_BASE+ID_COUNT`. Image trees are stored already shifted into this range, so a
/// container's root owns its image files without ever being host root.
pub const ID_BASE: u32 = 2_000_000_000;
/// Size of the mapped uid/gid range.
pub const ID_COUNT: u32 = 65536;

/// An image reference resolved against the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    /// The canonical `name:tag` (or `name@sha256:...` as asked).
    pub reference: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Read-only directory tree of the image.
    pub rootfs: PathBuf,
    /// The image's configured environment (`NAME=value`).
    pub env: Vec<String>,
    /// The image's configured working directory (`/` when unset).
    pub workdir: String,
    /// The image's configured user (`name`, `uid`, `name:group`, `uid:gid`; empty: root).
    pub user: String,
}

/// What the store records about one image tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageMeta {
    pub digest: String,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub workdir: String,
    /// The config's `User` (empty: root).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    /// Bytes of file content in the tree.
    pub size: u64,
    /// Bytes the tree takes on disk (allocated blocks), measured when it was committed.
    #[serde(default)]
    pub disk: u64,
    /// RFC 3339 time of the import or build.
    pub created: String,
    /// `import`, `pull`, `build-base` or `build-busybox`.
    pub source: String,
    /// The layer blobs (`sha256:...`, in `blobs/`) a pulled tree was made of.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<String>,
    /// Pulled with a job's own registry credentials: a later pull serves it only after the
    /// registry accepted that pull's credentials.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub private: bool,
}

/// One row of `executor image ls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageEntry {
    pub name: String,
    pub tag: String,
    pub digest: String,
    pub size: u64,
    pub created: String,
    pub source: String,
}

/// The image store in one directory.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

/// A parsed reference: `name`, `name:tag` or `name@sha256:<hex>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub name: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl Reference {
    pub fn parse(s: &str) -> Result<Reference> {
        let (rest, digest) = match s.split_once('@') {
            Some((n, d)) => {
                let hex = d.strip_prefix("sha256:").unwrap_or("");
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
                    bail!("image reference {s:?} has a malformed digest (want sha256:<64 hex digits>)");
                }
                (n, Some(d.to_string()))
            }
            None => (s, None),
        };
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(rest[last_slash + i + 1..].to_string())),
            None => (rest, None),
        };
        let name_ok = !name.is_empty()
            && name.len() <= 255
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/:".contains(&b))
            && !name.starts_with(['.', '-', '/'])
            && !name.split('/').any(|c| c.is_empty() || c == "." || c == "..");
        if !name_ok {
            bail!("image reference {s:?} has an invalid name");
        }
        if let Some(t) = &tag {
            if t.is_empty()
                || t.len() > 128
                || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                bail!("image reference {s:?} has an invalid tag");
            }
        }
        Ok(Reference { name: name.to_string(), tag, digest })
    }

    /// `name:tag`, with `latest` when no tag was given.
    pub fn key(&self) -> String {
        format!("{}:{}", self.name, self.tag.as_deref().unwrap_or("latest"))
    }

    /// The key in `refs.json`: `name@digest` when pinned, else [`key`](Self::key).
    pub fn ref_key(&self) -> String {
        match &self.digest {
            Some(d) => format!("{}@{d}", self.name),
            None => self.key(),
        }
    }
}

/// A `refs.json` key as name and tag; a pinned key (`name@digest`) has an empty tag.
fn split_key(key: &str) -> (&str, &str) {
    if let Some((name, _)) = key.split_once('@') {
        return (name, "");
    }
    key.rsplit_once(':').filter(|(_, t)| !t.contains('/')).unwrap_or((key, "latest"))
}

impl ImageStore {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<ImageStore> {
        for sub in ["", "rootfs", "tmp", "users", "blobs/sha256", "locks"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d)
                .with_context(|| format!("creating image store directory {}", d.display()))?;
        }
        // Only root reaches the trees: containers see them through mounts root makes.
        for sub in ["", "rootfs"] {
            let d = dir.join(sub);
            fs::set_permissions(&d, fs::Permissions::from_mode(0o700))
                .with_context(|| format!("setting the mode of {}", d.display()))?;
        }
        Ok(ImageStore { dir: dir.to_path_buf() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn refs_path(&self) -> PathBuf {
        self.dir.join("refs.json")
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    fn tree_path(&self, digest: &str) -> PathBuf {
        self.dir.join("rootfs").join(digest.trim_start_matches("sha256:"))
    }

    /// Where a pulled blob lives (whether or not it is there).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))
    }

    fn meta_path(&self, digest: &str) -> PathBuf {
        self.dir.join("rootfs").join(format!("{}.json", digest.trim_start_matches("sha256:")))
    }

    /// Takes the store's exclusive lock until the guard drops.
    pub(crate) fn lock(&self) -> Result<crate::base::lock::Held> {
        crate::base::lock::lock(&self.dir.join(".lock"), true)
    }

    fn read_refs(&self) -> Result<BTreeMap<String, String>> {
        let path = self.refs_path();
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("parsing {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn write_refs(&self, refs: &BTreeMap<String, String>) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(refs)?;
        crate::base::fs::write_atomic(&self.refs_path(), &bytes)
    }

    fn read_meta(&self, digest: &str) -> Result<ImageMeta> {
        let path = self.meta_path(digest);
        let b = fs::read(&path).with_context(|| format!("reading image metadata {}", path.display()))?;
        serde_json::from_slice(&b).with_context(|| format!("parsing image metadata {}", path.display()))
    }

    /// Resolves `name`, `name:tag` or `name@sha256:<hex>`: as written first (images imported or
    /// built under that name), then in its registry form (`busybox` is
    /// `docker.io/library/busybox:latest`, as pulled).
    pub fn resolve(&self, reference: &str) -> Result<ResolvedImage> {
        match self.resolve_exact(reference) {
            Ok(img) => Ok(img),
            Err(e) => match registry::ImageName::parse(reference) {
                Ok(n) if n.canonical() != reference => self.resolve_exact(&n.canonical()).map_err(|_| e),
                _ => Err(e),
            },
        }
    }

    fn resolve_exact(&self, reference: &str) -> Result<ResolvedImage> {
        let r = Reference::parse(reference)?;
        let refs = self.read_refs()?;
        let digest = match &r.digest {
            Some(_) if refs.contains_key(&r.ref_key()) => refs[&r.ref_key()].clone(),
            Some(d) => {
                let known = refs.iter().any(|(k, v)| v == d && split_key(k).0 == r.name);
                if !known {
                    bail!("unknown image {reference:?}: the store has no image {} with digest {d}", r.name);
                }
                d.clone()
            }
            None => match refs.get(&r.key()) {
                Some(d) => d.clone(),
                None => bail!("unknown image {reference:?}: import or build it with `executor image`"),
            },
        };
        let meta = self.read_meta(&digest).with_context(|| format!("image {reference:?}"))?;
        self.touch(&digest);
        let rootfs = self.tree_path(&digest);
        if !rootfs.is_dir() {
            bail!("image {reference:?} has no root tree at {}", rootfs.display());
        }
        let canonical = if r.digest.is_some() { format!("{}@{digest}", r.name) } else { r.key() };
        let workdir = if meta.workdir.is_empty() { "/".to_string() } else { meta.workdir };
        Ok(ResolvedImage { reference: canonical, digest, rootfs, env: meta.env, workdir, user: meta.user })
    }

    /// Every named image, sorted by name and tag.
    pub fn list(&self) -> Result<Vec<ImageEntry>> {
        let mut out = Vec::new();
        let refs = self.read_refs()?;
        for (key, digest) in &refs {
            let (name, tag) = split_key(key);
            // A pinned alias of a tag of the same image is not a row of its own.
            if tag.is_empty()
                && refs
                    .iter()
                    .any(|(k, v)| v == digest && !split_key(k).1.is_empty() && split_key(k).0 == name)
            {
                continue;
            }
            let digest = digest.clone();
            let meta = self.read_meta(&digest)?;
            out.push(ImageEntry {
                name: name.to_string(),
                tag: tag.to_string(),
                digest,
                size: meta.size,
                created: meta.created,
                source: meta.source,
            });
        }
        Ok(out)
    }

    /// Removes the reference `name` (`name:tag`; a bare name means `:latest`) and collects trees
    /// no reference and no live sandbox uses. Returns the removed digests.
    pub fn remove(&self, name: &str) -> Result<Vec<String>> {
        let r = Reference::parse(name)?;
        let _lock = self.lock()?;
        let mut refs = self.read_refs()?;
        let Some(digest) = refs.remove(&r.ref_key()) else {
            bail!("unknown image {name:?}");
        };
        // The pinned aliases of the name go with its last tag.
        let tagged =
            refs.iter().any(|(k, v)| *v == digest && split_key(k).0 == r.name && !split_key(k).1.is_empty());
        if !tagged {
            refs.retain(|k, v| !(*v == digest && split_key(k).0 == r.name));
        }
        self.write_refs(&refs)?;
        self.collect_locked(&refs)
    }

    /// Every image tree under `rootfs/` (named or not): its digest and directory.
    fn tree_dirs(&self) -> Result<Vec<(String, PathBuf)>> {
        let dir = self.dir.join("rootfs");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let fname = entry.file_name().to_string_lossy().to_string();
            if fname.ends_with(".json") || !entry.file_type()?.is_dir() {
                continue;
            }
            out.push((format!("sha256:{fname}"), entry.path()));
        }
        Ok(out)
    }

    /// The digests of every image tree in the store, named or not.
    pub fn tree_digests(&self) -> Result<HashSet<String>> {
        Ok(self.tree_dirs()?.into_iter().map(|(d, _)| d).collect())
    }

    fn collect_locked(&self, refs: &BTreeMap<String, String>) -> Result<Vec<String>> {
        let mut keep: HashSet<String> = refs.values().cloned().collect();
        keep.extend(self.digests_in_use()?);
        let mut removed = Vec::new();
        let mut keep_blobs: HashSet<String> = HashSet::new();
        for (digest, _) in self.tree_dirs()? {
            if keep.contains(&digest) {
                if let Ok(meta) = self.read_meta(&digest) {
                    keep_blobs.extend(meta.layers);
                }
                continue;
            }
            self.remove_tree(&digest)?;
            removed.push(digest);
        }
        // Blobs no kept tree lists (partial downloads have longer names).
        let blobs = self.dir.join("blobs/sha256");
        for entry in fs::read_dir(&blobs).with_context(|| format!("reading {}", blobs.display()))? {
            let entry = entry?;
            let fname = entry.file_name().to_string_lossy().to_string();
            if fname.len() != 64 || keep_blobs.contains(&format!("sha256:{fname}")) {
                continue;
            }
            // A pull holds the blob's lock from its download until its tree is committed.
            let Ok(f) = fs::File::open(entry.path().with_extension("lock")) else { continue };
            if let Ok(_held) = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(removed)
    }

    /// Whether the tree `digest` was pulled with a job's own credentials.
    pub(crate) fn is_private(&self, digest: &str) -> bool {
        self.read_meta(digest).map(|m| m.private).unwrap_or(false)
    }

    /// Whether `reference` names a stored image that is private (see [`ImageMeta::private`]).
    pub(crate) fn is_private_reference(&self, reference: &str) -> bool {
        self.resolve(reference).map(|i| self.is_private(&i.digest)).unwrap_or(false)
    }

    /// Marks the tree `reference` names as private (see [`ImageMeta::private`]).
    pub(crate) fn mark_private(&self, reference: &str) -> Result<()> {
        let digest = self.resolve_exact(reference)?.digest;
        let _lock = self.lock()?;
        let mut meta = self.read_meta(&digest)?;
        if !meta.private {
            meta.private = true;
            crate::base::fs::write_atomic(&self.meta_path(&digest), &serde_json::to_vec_pretty(&meta)?)?;
        }
        Ok(())
    }

    /// Points `reference` and `alias` (a pinned `name@digest`) at the tree `digest`, which must
    /// be in the store; used when a pull finds the tree already built.
    pub(crate) fn point(&self, reference: &str, digest: &str, alias: &str) -> Result<ResolvedImage> {
        let _lock = self.lock()?;
        if !self.tree_path(digest).is_dir() || !self.meta_path(digest).is_file() {
            bail!("the store has no tree {digest}");
        }
        let mut refs = self.read_refs()?;
        for key in [reference, alias] {
            refs.insert(Reference::parse(key)?.ref_key(), digest.to_string());
        }
        self.write_refs(&refs)?;
        drop(_lock);
        self.resolve_exact(reference)
    }

    fn digests_in_use(&self) -> Result<Vec<String>> {
        let dir = self.dir.join("users");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let text = fs::read_to_string(entry?.path()).unwrap_or_default();
            out.extend(text.lines().map(str::to_string));
        }
        Ok(out)
    }

    /// Records that sandbox `user` uses `digests`, so that `rm` keeps their trees.
    pub fn add_user(&self, user: &str, digests: &[String]) -> Result<()> {
        let _lock = self.lock()?;
        let path = self.dir.join("users").join(user);
        crate::base::fs::write_atomic(&path, digests.join("\n").as_bytes())
    }

    /// Drops the record made by [`add_user`](Self::add_user); missing is fine.
    pub fn remove_user(&self, user: &str) -> Result<()> {
        let _lock = self.lock()?;
        let path = self.dir.join("users").join(user);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => Ok(()),
        }
    }

    /// Sandboxes that hold a use record.
    pub fn users(&self) -> Result<Vec<String>> {
        let dir = self.dir.join("users");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            out.push(entry?.file_name().to_string_lossy().to_string());
        }
        Ok(out)
    }

    /// A fresh staging directory inside the store (same filesystem, so it can be renamed in).
    pub(crate) fn staging(&self, what: &str) -> Result<tempfile::TempDir> {
        tempfile::Builder::new()
            .prefix(&format!("{what}-"))
            .tempdir_in(self.tmp_dir())
            .with_context(|| format!("creating a staging directory in {}", self.tmp_dir().display()))
    }

    /// Moves a finished tree into the store under `meta.digest` (keeping an existing identical
    /// tree) and points `reference` at it.
    pub(crate) fn commit_tree(
        &self,
        tree: &Path,
        meta: &ImageMeta,
        reference: &str,
    ) -> Result<ResolvedImage> {
        if Reference::parse(reference)?.digest.is_some() {
            bail!("image name {reference:?} must not carry a digest");
        }
        self.commit_tree_as(tree, meta, reference)
    }

    /// [`commit_tree`](Self::commit_tree) under any reference, pinned ones too (pulls).
    pub(crate) fn commit_tree_as(
        &self,
        tree: &Path,
        meta: &ImageMeta,
        reference: &str,
    ) -> Result<ResolvedImage> {
        let r = Reference::parse(reference)?;
        fs::set_permissions(tree, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("setting the mode of {}", tree.display()))?;
        let _lock = self.lock()?;
        let dest = self.tree_path(&meta.digest);
        let mut meta = meta.clone();
        meta.disk = prune::tree_disk_bytes(tree)?;
        let meta = &meta;
        if dest.exists() {
            fs::remove_dir_all(tree).with_context(|| format!("removing {}", tree.display()))?;
        } else {
            crate::base::fs::write_atomic(&self.meta_path(&meta.digest), &serde_json::to_vec_pretty(meta)?)?;
            fs::rename(tree, &dest)
                .with_context(|| format!("moving {} to {}", tree.display(), dest.display()))?;
        }
        let mut refs = self.read_refs()?;
        refs.insert(r.ref_key(), meta.digest.clone());
        self.write_refs(&refs)?;
        self.collect_locked(&refs)?;
        drop(_lock);
        self.resolve_exact(&r.ref_key())
    }
}

/// A digest of a directory tree: paths, types, modes, owners, link targets and contents, in
/// sorted order. Used for images built here (imports use the image's own digest).
pub fn tree_digest(root: &Path) -> Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut size = 0u64;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let rel_path = rel.join(&name);
            let path = root.join(&rel_path);
            let md = fs::symlink_metadata(&path).with_context(|| format!("inspecting {}", path.display()))?;
            h.update(rel_path.to_string_lossy().as_bytes());
            h.update(format!("\0{:o}\0{}\0{}\0", md.mode(), md.uid(), md.gid()).as_bytes());
            let ft = md.file_type();
            if ft.is_symlink() {
                h.update(fs::read_link(&path)?.to_string_lossy().as_bytes());
            } else if ft.is_file() {
                size += md.len();
                let mut f = fs::File::open(&path).with_context(|| format!("reading {}", path.display()))?;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
            } else if ft.is_dir() {
                subdirs.push(rel_path);
            }
            h.update(b"\n");
        }
        // Depth-first in sorted order: push in reverse so the smallest name is visited first.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok((format!("sha256:{}", hex::encode(h.finalize())), size))
}

/// Shifts a tree's ownership into the container range: owner `u` becomes `ID_BASE + u`.
/// Never follows symlinks; ids outside the range become the range's `nobody` (65534).
pub fn shift_ownership(root: &Path) -> Result<()> {
    let shift = |id: u32| ID_BASE + if id < ID_COUNT { id } else { 65534 };
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let md = fs::symlink_metadata(&path).with_context(|| format!("inspecting {}", path.display()))?;
        // chown clears set-id bits; keep the mode as the image has it.
        let mode = md.mode() & 0o7777;
        std::os::unix::fs::lchown(&path, Some(shift(md.uid())), Some(shift(md.gid())))
            .with_context(|| format!("changing the owner of {}", path.display()))?;
        if md.is_dir() {
            for e in fs::read_dir(&path).with_context(|| format!("reading {}", path.display()))? {
                stack.push(e?.path());
            }
        }
        if !md.file_type().is_symlink() && mode & 0o6000 != 0 {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .with_context(|| format!("setting the mode of {}", path.display()))?;
        }
    }
    Ok(())
}

/// Now as RFC 3339.
pub(crate) fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse() {
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(r.key(), "busybox:latest");
        let r = Reference::parse("localhost:5000/team/img:v1.2").unwrap();
        assert_eq!((r.name.as_str(), r.tag.as_deref()), ("localhost:5000/team/img", Some("v1.2")));
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("img@{d}")).unwrap();
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
        assert!(Reference::parse("img@sha256:abc").is_err());
        assert!(Reference::parse("../etc").is_err());
        assert!(Reference::parse("a//b").is_err());
        assert!(Reference::parse("img:").is_err());
        assert!(Reference::parse("").is_err());
    }

    #[test]
    fn store_commits_resolves_lists_and_removes() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::open(&tmp.path().join("images")).unwrap();
        let err = store.resolve("nothing:here").unwrap_err();
        assert!(format!("{err:#}").contains("unknown image \"nothing:here\""), "{err:#}");

        let stage = store.staging("t").unwrap().keep();
        fs::write(stage.join("hello"), "hi").unwrap();
        let (digest, size) = tree_digest(&stage).unwrap();
        assert_eq!(size, 2);
        let meta = ImageMeta {
            digest: digest.clone(),
            env: vec!["A=1".into()],
            workdir: String::new(),
            user: String::new(),
            size,
            disk: 0,
            created: now(),
            source: "test".into(),
            layers: Vec::new(),
            private: false,
        };
        let img = store.commit_tree(&stage, &meta, "t:v1").unwrap();
        assert_eq!(img.digest, digest);
        assert_eq!(img.workdir, "/");
        assert_eq!(fs::read_to_string(img.rootfs.join("hello")).unwrap(), "hi");
        assert_eq!(store.resolve(&format!("t@{digest}")).unwrap().rootfs, img.rootfs);
        assert!(store.resolve("t").is_err(), "t means t:latest");
        assert!(store.resolve(&format!("other@{digest}")).is_err());
        assert_eq!(store.list().unwrap().len(), 1);

        store.add_user("sb-1", std::slice::from_ref(&digest)).unwrap();
        assert_eq!(store.remove("t:v1").unwrap(), Vec::<String>::new(), "in use: kept");
        assert!(img.rootfs.exists());
        store.remove_user("sb-1").unwrap();
        assert!(store.remove("t:v1").is_err(), "already gone");
        let stage = store.staging("t").unwrap().keep();
        fs::write(stage.join("hello"), "hi").unwrap();
        store.commit_tree(&stage, &meta, "t:v2").unwrap();
        assert_eq!(store.remove("t:v2").unwrap(), vec![digest]);
        assert!(!img.rootfs.exists());
        assert!(store.list().unwrap().is_empty());
    }
}
