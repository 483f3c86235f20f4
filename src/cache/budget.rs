//! The store's budget and its operator commands: listing (`executor cache ls`), removing a key
//! (`cache rm`), evicting the least recently used versions beyond `EXECUTOR_CACHE_SIZE` (`cache
//! prune`, the janitor, and every promotion), never a version a running job has leased.

use anyhow::{Context, Result};
use serde::Serialize;
use std::fs;
use std::path::Path;
use std::time::SystemTime;

use super::{read_meta, CacheStore};

/// One version, as `executor cache ls` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Listed {
    pub key: String,
    pub version: String,
    pub repository: String,
    pub prefix: String,
    pub paths: Vec<String>,
    pub bytes: u64,
    pub files: u64,
    pub current: bool,
    pub in_use: bool,
    /// Why the version is no longer used (`corrupted: …`), if it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bad: Option<String>,
    pub last_used: Option<chrono::DateTime<chrono::Utc>>,
}

/// What an eviction removed.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Evicted {
    pub version: String,
    pub bytes: u64,
    pub why: String,
}

impl CacheStore {
    /// Every version, least recently used first.
    pub(crate) fn list(&self) -> Result<Vec<Listed>> {
        let (leased, _) = self.leased();
        let mut out = Vec::new();
        for (key, dir) in self.versions()? {
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let current = fs::read_to_string(dir.with_file_name("current")).is_ok_and(|c| c.trim() == name);
            let meta = read_meta(&dir);
            let bad = fs::read_to_string(dir.join("bad"))
                .ok()
                .map(|w| format!("corrupted: {}", w.trim()))
                .or_else(|| meta.as_ref().err().map(|e| format!("corrupted: {e:#}")));
            let meta = meta.ok();
            out.push(Listed {
                version: format!("{key}/{name}"),
                in_use: leased.contains(&format!("{key}/{name}")),
                key,
                repository: meta.as_ref().map(|m| m.repository.clone()).unwrap_or_default(),
                prefix: meta.as_ref().map(|m| m.prefix.clone()).unwrap_or_default(),
                paths: meta.as_ref().map(|m| m.paths.clone()).unwrap_or_default(),
                // The microVM disk counts with its tree (its blocks on the host's disk).
                bytes: meta.as_ref().map_or_else(|| du(&dir), |m| m.bytes + disk_bytes(&dir)),
                files: meta.as_ref().map_or(0, |m| m.files),
                current,
                bad,
                last_used: last_used(&dir).map(chrono::DateTime::<chrono::Utc>::from),
            });
        }
        out.sort_by_key(|l| l.last_used);
        Ok(out)
    }

    /// Removes every version of the keys starting with `key` (at least 8 characters) that no
    /// running job holds; returns what went and what stays in use.
    pub(crate) fn remove(&self, key: &str) -> Result<(Vec<Evicted>, Vec<String>)> {
        if key.len() < 8 || !key.chars().all(|c| c.is_ascii_hexdigit()) {
            anyhow::bail!("cache key {key:?}: give at least 8 hex digits of a key `executor cache ls` shows");
        }
        let _lock = self.lock()?;
        let (leased, _) = self.leased();
        let (mut gone, mut kept) = (Vec::new(), Vec::new());
        for l in self.list()?.into_iter().filter(|l| l.key.starts_with(key)) {
            if leased.contains(&l.version) {
                kept.push(l.version);
                continue;
            }
            self.remove_version(&l.version)?;
            gone.push(Evicted { version: l.version, bytes: l.bytes, why: "removed".into() });
        }
        Ok((gone, kept))
    }

    fn remove_version(&self, version: &str) -> Result<()> {
        let dir = self.entries().join(version);
        let entry = dir.parent().map(Path::to_path_buf).unwrap_or_default();
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if fs::read_to_string(entry.join("current")).is_ok_and(|c| c.trim() == name) {
            let _ = fs::remove_file(entry.join("current"));
        }
        fs::remove_dir_all(&dir).with_context(|| format!("removing cache version {}", dir.display()))?;
        // The key's directory goes with its last version.
        let _ = fs::remove_dir(&entry);
        Ok(())
    }

    /// The janitor's pass: leases of sandboxes that `gone` says no longer exist, half-built
    /// versions, replaced or corrupted versions nobody holds, then the least recently used
    /// versions until the store fits `budget` bytes (0: no budget). `all` removes every
    /// unleased version (`executor cache prune --all`).
    pub(crate) fn prune(&self, budget: u64, all: bool, gone: impl Fn(&str) -> bool) -> Result<Vec<Evicted>> {
        let _lock = self.lock()?;
        let (_, holders) = self.leased();
        let lapsed = |h: &str| {
            fs::metadata(self.leases().join(format!("{h}.json")))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > super::BOOT_LEASE_LIFE)
        };
        let stale = |h: &str| if h.starts_with(super::BOOT_LEASE_PREFIX) { lapsed(h) } else { gone(h) };
        for h in holders.iter().filter(|h| stale(h)) {
            let _ = fs::remove_file(self.leases().join(format!("{h}.json")));
        }
        let (leased, _) = self.leased();
        let mut out = Vec::new();
        for e in fs::read_dir(self.entries()).into_iter().flatten().flatten() {
            for v in fs::read_dir(e.path()).into_iter().flatten().flatten() {
                let n = v.file_name().to_string_lossy().into_owned();
                let old = v.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
                if n.starts_with(".tmp-") && old.is_some_and(|a| a.as_secs() > 3600) {
                    let _ = fs::remove_dir_all(v.path());
                }
                // A microVM disk whose build was cut short.
                for t in fs::read_dir(v.path()).into_iter().flatten().flatten() {
                    let old = t.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
                    if t.file_name().to_string_lossy().starts_with(".disk-")
                        && old.is_some_and(|a| a.as_secs() > 3600)
                    {
                        let _ = fs::remove_file(t.path());
                    }
                }
            }
        }
        let mut listed = self.list()?;
        let mut total: u64 = listed.iter().map(|l| l.bytes).sum();
        listed.retain(|l| !leased.contains(&l.version));
        for l in listed {
            let why = if all {
                "prune --all"
            } else if l.bad.is_some() {
                "corrupted"
            } else if !l.current {
                "replaced by a newer version"
            } else if budget > 0 && total > budget {
                "least recently used, over EXECUTOR_CACHE_SIZE"
            } else {
                continue;
            };
            self.remove_version(&l.version)?;
            total = total.saturating_sub(l.bytes);
            out.push(Evicted { version: l.version, bytes: l.bytes, why: why.into() });
        }
        Ok(out)
    }
}

fn last_used(dir: &Path) -> Option<SystemTime> {
    fs::metadata(dir.join("used")).or_else(|_| fs::metadata(dir)).and_then(|m| m.modified()).ok()
}

/// The bytes a version's microVM disk takes on the host's disk (none without one).
fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(dir.join(super::VM_DISK)).map_or(0, |m| m.blocks() * 512)
}

/// The bytes of the files below `dir` (a version whose meta is unreadable).
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}
