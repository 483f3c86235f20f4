//! Dependency caches (docs/caches.md): directories such as `/root/.npm` or `node_modules` kept
//! between jobs of one repository whose key (repository, prefix, the key files as cloned, the
//! step images and the architecture) is the same, attached read-only as the lower layer of an
//! overlay at the declared paths and refreshed only by trusted jobs.
//!
//! The store lives at `<state_dir>/caches/`:
//! - `entries/<key>/v-<id>/` one immutable version each: `tree/p<N>` (path N of the declaration,
//!   owned by the image store's id range, `ID_BASE + n`, as image trees are), `manifest` (every
//!   entry with its type, mode, owner, size and content hash) and `meta.json` (what the key was
//!   made of, the sizes and the manifest's hash, sealed by a checksum of its own);
//!   `entries/<key>/current` names the version a lookup finds, replaced atomically;
//!   `v-<id>/used` is touched at every hit (its mtime orders the LRU eviction); `v-<id>/bad`
//!   marks a version whose tree no longer matches its manifest (a miss from then on).
//!   `v-<id>/disk.ext4` is the version's read-only disk for the microVM runtime (its tree as an
//!   ext4 image, made once when a microVM job first needs it or promotes it; `disk.sha256` is its
//!   hash), counted in the version's size and removed with it.
//! - `leases/<sandbox>.json`: the versions a running job has attached; no eviction, removal or
//!   promotion ever touches a leased version. `leases/boot-<job>.json` holds a microVM job's
//!   versions from its lookup until its VM exists (then its sandbox holds them), and lapses
//!   after an hour.
//! - `.lock`: promotion, eviction and leases change the store under this exclusive lock.
//!
//! rules.rs maps a job (its declarations, or the operator's rules for its step images) to
//! [`CacheSpec`]s; tree.rs copies, merges, shifts and hashes trees; budget.rs lists, removes and
//! evicts.

pub(crate) mod budget;
pub(crate) mod rules;
mod tree;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs;
use std::path::{Path, PathBuf};

use rules::CacheSpec;

/// A version's read-only disk for the microVM runtime, and its sha256 (see the module doc).
pub(crate) const VM_DISK: &str = "disk.ext4";
pub(crate) const VM_DISK_SHA256: &str = "disk.sha256";
/// The lease holder names of jobs whose sandbox does not exist yet (`boot-<job>`).
pub(crate) const BOOT_LEASE_PREFIX: &str = "boot-";
/// How long a lease of a job whose sandbox never came to be holds its versions.
const BOOT_LEASE_LIFE: std::time::Duration = std::time::Duration::from_secs(3600);

/// The sha256 of a file, hex.
pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    tree::hash_file(path)
}

/// A cache version's lookup result for one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// The current version of the key: its directory (with `tree/`) and its size in bytes.
    Hit { version: PathBuf, bytes: u64 },
    /// No usable version, and why (`no version yet`, `corrupted: ...`).
    Miss { why: String },
}

/// What a version records about itself; `checksum` seals the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Meta {
    pub key: String,
    pub repository: String,
    pub prefix: String,
    pub paths: Vec<String>,
    pub created: chrono::DateTime<chrono::Utc>,
    pub bytes: u64,
    pub files: u64,
    /// sha256 of the `manifest` file.
    pub manifest_sha256: String,
    /// The job that saved it.
    pub job: String,
    #[serde(default)]
    pub checksum: String,
}

impl Meta {
    fn seal(&self) -> String {
        let mut unsealed = self.clone();
        unsealed.checksum.clear();
        let bytes = serde_json::to_vec(&unsealed).unwrap_or_default();
        hex::encode(Sha256::digest(&bytes))
    }
}

/// The host's dependency cache store.
#[derive(Debug, Clone)]
pub(crate) struct CacheStore {
    dir: PathBuf,
}

/// Where a version's directories are, as a lease names it (`<key>/v-<id>`).
fn version_name(version: &Path) -> String {
    let mut parts: Vec<String> =
        version.iter().rev().take(2).map(|p| p.to_string_lossy().into_owned()).collect();
    parts.reverse();
    parts.join("/")
}

impl CacheStore {
    /// The store of the state directory `state_dir` (nothing is created until it is used).
    pub(crate) fn new(state_dir: &Path) -> CacheStore {
        CacheStore { dir: state_dir.join("caches") }
    }

    fn entries(&self) -> PathBuf {
        self.dir.join("entries")
    }

    fn leases(&self) -> PathBuf {
        self.dir.join("leases")
    }

    fn lock(&self) -> Result<crate::base::lock::Held> {
        crate::base::lock::lock(&self.dir.join(".lock"), true)
    }

    /// The current version of `key`, checked in constant time: its meta is whole and sealed, it
    /// is not marked bad, its tree is there. A full check of the tree against its manifest is
    /// [`CacheStore::verify`]'s (the janitor's and `executor cache verify`'s), which marks a
    /// corrupted version so that every later lookup misses.
    pub(crate) fn lookup(&self, key: &str) -> Lookup {
        let entry = self.entries().join(key);
        let current = match fs::read_to_string(entry.join("current")) {
            Ok(c) => c.trim().to_string(),
            Err(_) => return Lookup::Miss { why: "no version yet".into() },
        };
        if !current.starts_with("v-") || current.contains('/') {
            return Lookup::Miss { why: format!("corrupted: the current version name {current:?}") };
        }
        let version = entry.join(&current);
        if let Ok(why) = fs::read_to_string(version.join("bad")) {
            return Lookup::Miss { why: format!("corrupted: {}", why.trim()) };
        }
        let meta = match read_meta(&version) {
            Ok(m) => m,
            Err(e) => return Lookup::Miss { why: format!("corrupted: {e:#}") },
        };
        if meta.key != key {
            return Lookup::Miss { why: "corrupted: the version belongs to another key".into() };
        }
        if !version.join("tree").is_dir() {
            return Lookup::Miss { why: "corrupted: the version has no tree".into() };
        }
        Lookup::Hit { version, bytes: meta.bytes }
    }

    /// Records that `sandbox` uses `versions` (and touches each one's LRU stamp): until
    /// [`CacheStore::release`], nothing removes them.
    pub(crate) fn lease(&self, sandbox: &str, versions: &[PathBuf]) -> Result<()> {
        let _lock = self.lock()?;
        let names: Vec<String> = versions.iter().map(|v| version_name(v)).collect();
        for v in versions {
            touch(&v.join("used"));
        }
        let path = self.leases().join(format!("{sandbox}.json"));
        fs::create_dir_all(self.leases()).with_context(|| format!("creating {}", self.leases().display()))?;
        crate::base::fs::write_atomic(&path, &serde_json::to_vec(&names)?)
    }

    /// Gives back what `sandbox` leased.
    pub(crate) fn release(&self, sandbox: &str) -> Result<()> {
        let _lock = self.lock()?;
        let path = self.leases().join(format!("{sandbox}.json"));
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => Ok(()),
        }
    }

    /// Every leased version (`<key>/v-<id>`) and the sandboxes holding leases.
    fn leased(&self) -> (std::collections::BTreeSet<String>, Vec<String>) {
        let mut versions = std::collections::BTreeSet::new();
        let mut holders = Vec::new();
        for e in fs::read_dir(self.leases()).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(sandbox) = name.strip_suffix(".json") else { continue };
            holders.push(sandbox.to_string());
            let names: Vec<String> =
                fs::read(e.path()).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
            versions.extend(names);
        }
        (versions, holders)
    }

    /// Promotes `uppers` (what a job wrote over each path of the cache, after its overlays are
    /// gone) to a new current version of `spec`'s key: the `base` version's tree with the
    /// uppers applied, owners shifted from the job's id range (`uid_base`) to the store's.
    /// Atomic: the version is built aside and named current by one rename; the version it
    /// replaces stays until no lease holds it. Returns the new version's size, or `None` when
    /// the job changed nothing (on a miss: wrote nothing).
    pub(crate) fn promote(
        &self,
        spec: &CacheSpec,
        base: Option<&Path>,
        uppers: &[PathBuf],
        uid_base: u32,
        whiteout_files: bool,
        job: &str,
    ) -> Result<Option<u64>> {
        if uppers.iter().all(|u| tree::is_empty_dir(u)) {
            return Ok(None);
        }
        // A version built on a base that went would lose the base's files.
        if let Some(b) = base.filter(|b| !b.join("tree").is_dir()) {
            anyhow::bail!("the version it was based on ({}) is gone", version_name(b));
        }
        let entry = self.entries().join(&spec.key);
        fs::create_dir_all(&entry).with_context(|| format!("creating {}", entry.display()))?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let tmp = entry.join(format!(".tmp-{id}"));
        let built = (|| -> Result<Meta> {
            let tree_dir = tmp.join("tree");
            fs::create_dir_all(&tree_dir).with_context(|| format!("creating {}", tree_dir.display()))?;
            for (i, upper) in uppers.iter().enumerate() {
                let dst = tree_dir.join(format!("p{i}"));
                match base.map(|b| b.join("tree").join(format!("p{i}"))).filter(|p| p.is_dir()) {
                    Some(lower) => tree::link_copy(&lower, &dst)?,
                    None => tree::make_dir_like(upper, &dst, uid_base)?,
                }
                tree::apply_upper(upper, &dst, uid_base, whiteout_files)?;
            }
            let (manifest, bytes, files) = tree::manifest(&tree_dir)?;
            fs::write(tmp.join("manifest"), &manifest)
                .with_context(|| format!("writing {}", tmp.join("manifest").display()))?;
            let mut meta = Meta {
                key: spec.key.clone(),
                repository: spec.repository.clone(),
                prefix: spec.prefix.clone(),
                paths: spec.paths.clone(),
                created: chrono::Utc::now(),
                bytes,
                files,
                manifest_sha256: hex::encode(Sha256::digest(&manifest)),
                job: job.to_string(),
                checksum: String::new(),
            };
            meta.checksum = meta.seal();
            fs::write(tmp.join("meta.json"), serde_json::to_vec_pretty(&meta)?)
                .with_context(|| format!("writing {}", tmp.join("meta.json").display()))?;
            touch(&tmp.join("used"));
            Ok(meta)
        })();
        let meta = match built {
            Ok(m) => m,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        let _lock = self.lock()?;
        let name = format!("v-{id}");
        fs::rename(&tmp, entry.join(&name))
            .with_context(|| format!("naming {}", entry.join(&name).display()))?;
        let before = fs::read_to_string(entry.join("current")).ok();
        crate::base::fs::write_atomic(&entry.join("current"), name.as_bytes())?;
        // The version replaced goes now unless a running job holds it (then the janitor takes it).
        if let Some(old) =
            before.map(|b| b.trim().to_string()).filter(|b| b.starts_with("v-") && !b.contains('/'))
        {
            let (leased, _) = self.leased();
            if !leased.contains(&format!("{}/{old}", spec.key)) {
                let _ = fs::remove_dir_all(entry.join(old));
            }
        }
        Ok(Some(meta.bytes))
    }

    /// Checks every version's tree against its manifest; a version that differs is marked bad
    /// (every later lookup misses). Returns `(version, why)` for each one found bad now.
    pub(crate) fn verify(&self) -> Result<Vec<(String, String)>> {
        self.verify_due(std::time::Duration::ZERO, usize::MAX)
    }

    /// [`CacheStore::verify`] of at most `limit` versions not checked within `max_age` (the
    /// janitor's share of the work: every version is read in full now and then, never all at
    /// once). A version that matches is stamped `verified`.
    pub(crate) fn verify_due(
        &self,
        max_age: std::time::Duration,
        limit: usize,
    ) -> Result<Vec<(String, String)>> {
        let mut bad = Vec::new();
        let recent = |v: &Path| {
            fs::metadata(v.join("verified"))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age < max_age)
        };
        let due = self.versions()?.into_iter().filter(|(_, v)| !v.join("bad").exists() && !recent(v));
        for (_, version) in due.take(limit) {
            match check(&version) {
                Some(why) => {
                    let _ = fs::write(version.join("bad"), &why);
                    bad.push((version_name(&version), why));
                }
                None => touch(&version.join("verified")),
            }
        }
        Ok(bad)
    }

    /// Every version directory, with its key.
    fn versions(&self) -> Result<Vec<(String, PathBuf)>> {
        let mut out = Vec::new();
        let rd = match fs::read_dir(self.entries()) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("listing {}", self.entries().display())),
        };
        for e in rd.flatten() {
            let key = e.file_name().to_string_lossy().into_owned();
            for v in fs::read_dir(e.path()).into_iter().flatten().flatten() {
                if v.file_name().to_string_lossy().starts_with("v-") {
                    out.push((key.clone(), v.path()));
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// The read-only disk of the cache version `version` for the microVM runtime (`disk.ext4`, its
/// sha256 in `disk.sha256` for [`CacheStore::verify`]), made once by `build` (which writes an
/// image of the tree, its first argument, to the file its third names; the second is a scratch
/// directory) and then reused: attaching never copies the cache. Returns the disk and, when it
/// was made now, how long that took. The caller holds a lease on the version.
pub(crate) fn vm_disk(
    version: &Path,
    build: &dyn Fn(&Path, &Path, &Path) -> Result<()>,
) -> Result<(PathBuf, Option<std::time::Duration>)> {
    let out = version.join(VM_DISK);
    if out.is_file() {
        return Ok((out, None));
    }
    // One builder per version: two disks of one tree differ (mkfs's UUID and times), and the
    // recorded sha256 must be the installed disk's.
    let _lock = crate::base::lock::lock(&version.join(".disk.lock"), true)?;
    if out.is_file() {
        return Ok((out, None));
    }
    let t = std::time::Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix(".disk-")
        .tempfile_in(version)
        .with_context(|| format!("creating a temporary file in {}", version.display()))?
        .into_temp_path();
    build(&version.join("tree"), version, &tmp)
        .with_context(|| format!("making the disk of cache version {}", version_name(version)))?;
    let sha = sha256_file(&tmp)?;
    crate::base::fs::write_atomic(&version.join(VM_DISK_SHA256), sha.as_bytes())?;
    tmp.persist(&out).with_context(|| format!("installing {}", out.display()))?;
    Ok((out, Some(t.elapsed())))
}

/// Why `version`'s tree does not match its manifest, or `None` when it does.
fn check(version: &Path) -> Option<String> {
    let meta = match read_meta(version) {
        Ok(m) => m,
        Err(e) => return Some(format!("{e:#}")),
    };
    let manifest = match tree::manifest(&version.join("tree")) {
        Ok((m, _, _)) => m,
        Err(e) => return Some(format!("{e:#}")),
    };
    let stored = fs::read(version.join("manifest")).unwrap_or_default();
    if hex::encode(Sha256::digest(&stored)) != meta.manifest_sha256 {
        Some("the manifest does not match its recorded hash".into())
    } else if manifest != stored {
        Some("the tree does not match its manifest".into())
    } else {
        check_disk(version)
    }
}

/// Why the version's microVM disk does not match its recorded hash, if it has one.
fn check_disk(version: &Path) -> Option<String> {
    let disk = version.join(VM_DISK);
    if !disk.exists() {
        return None;
    }
    let recorded = fs::read_to_string(version.join(VM_DISK_SHA256)).unwrap_or_default();
    match sha256_file(&disk) {
        Ok(h) if h == recorded.trim() => None,
        Ok(_) => Some("the microVM disk does not match its recorded hash".into()),
        Err(e) => Some(format!("{e:#}")),
    }
}

/// The meta of `version`, refused when it does not parse or its seal does not match.
fn read_meta(version: &Path) -> Result<Meta> {
    let bytes = fs::read(version.join("meta.json"))
        .with_context(|| format!("reading {}/meta.json", version.display()))?;
    let meta: Meta =
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}/meta.json", version.display()))?;
    if meta.checksum != meta.seal() {
        anyhow::bail!("{}/meta.json does not match its checksum", version.display());
    }
    Ok(meta)
}

fn touch(path: &Path) {
    let _ = fs::write(path, b"");
}

#[cfg(test)]
mod tests;
