//! Workspace templates: per repository, a copy of a job's workspace disk taken right after its
//! clean checkout, before any step ran. The next job of the repository starts from a sparse copy
//! of it (a reflink where the filesystem shares blocks), so that its clone fetches only the new
//! objects and its checkout writes only the files that differ between the two commits.
//!
//! - A template is only ever made from a pristine checkout ([`Templates::store`] is called by
//!   the clone, before the job's files, scripts and steps), so no job can see another's writes:
//!   each job works on its own copy, and nothing is shared between copies.
//! - They live in `templates/` beside `workspaces/` (0700, images 0600), at most
//!   [`Templates::max_count`] of them and [`Templates::max_bytes`] of allocated disk (a template
//!   and its spare copy, made after a job for the next one, counted together), the least
//!   recently used evicted first.
//! - Each has a lock file: a copy holds it shared, making or replacing or evicting one holds it
//!   exclusively (without waiting: a busy template is left alone), so two jobs of one repository
//!   at once both work, and no reader ever sees half a template.
//! - The name of a template covers the repository, its directory in the workspace, whether the
//!   job fetches all tags, whether it is shallow, the disk size and [`disk::FORMAT`]: a change of the disk limit or of the way disks are made never
//!   uses an old template.

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::disk;
use crate::protocol::Job;

/// A template older than this is replaced by the next job's pristine checkout, so that the
/// difference a checkout writes stays small as the repository moves on.
pub(crate) const REFRESH_AFTER: Duration = Duration::from_secs(10 * 60);

/// Temporary files older than this are a dead executor's and are removed by [`Templates::sweep`].
const STALE_TMP: Duration = Duration::from_secs(10 * 60);

/// What a template holds, written beside its image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    pub repository: String,
    pub repository_directory: String,
    /// The commit checked out in the template.
    pub commit: String,
    pub disk_bytes: u64,
    pub format: String,
    pub created_at: DateTime<Utc>,
}

/// Which template a job would use.
#[derive(Debug, Clone)]
pub struct Key {
    name: String,
    repository: String,
    repository_directory: String,
    disk_bytes: u64,
}

/// The templates of one state directory.
#[derive(Debug, Clone)]
pub struct Templates {
    dir: PathBuf,
    /// At most this many templates (0: none are made or used).
    pub max_count: usize,
    /// At most this many bytes of allocated disk over all templates.
    pub max_bytes: u64,
}

impl Templates {
    pub fn new(dir: impl Into<PathBuf>, max_count: usize, max_bytes: u64) -> Templates {
        Templates { dir: dir.into(), max_count, max_bytes }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The template of the job's repository, for a workspace disk of `disk_bytes`; `None` for a
    /// job that does not use templates: no repository, a sparse clone, or a ref rather than a
    /// commit hash (as for the object cache), or templates turned off. Shallow clones (every
    /// Sourcegraph job) have templates of their own: a shallow template serves only shallow
    /// jobs, whose depth-1 fetch then brings only the objects the template's commit lacks.
    pub fn key(&self, frontend_url: &str, job: &Job, disk_bytes: u64) -> Option<Key> {
        let full_commit = (job.commit.len() == 40 || job.commit.len() == 64)
            && job.commit.chars().all(|c| c.is_ascii_hexdigit());
        if self.max_count == 0
            || job.repository_name.is_empty()
            || !job.sparse_checkout.is_empty()
            || !full_commit
            || disk_bytes == 0
        {
            return None;
        }
        let repository_directory = job.repository_directory.trim_matches('/').to_string();
        let mut h = Sha256::new();
        for part in [
            disk::FORMAT,
            frontend_url.trim_end_matches('/'),
            &job.repository_name,
            &repository_directory,
            &disk_bytes.to_string(),
            // A template from a `--tags` fetch holds every tag; one from a plain fetch, only
            // those git followed: each kind of job gets what a clone of its own would have.
            if job.fetch_tags { "tags" } else { "" },
            // A shallow template has one commit and no history; a full one serves full jobs.
            if job.shallow_clone { "shallow" } else { "" },
        ] {
            h.update(part.as_bytes());
            h.update(b"\0");
        }
        Some(Key {
            name: hex::encode(&h.finalize()[..16]),
            repository: job.repository_name.clone(),
            repository_directory,
            disk_bytes,
        })
    }

    fn image(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.img"))
    }

    fn meta_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// A synced copy of the template made ahead ([`Templates::make_spare`]), which the next
    /// job takes by a rename.
    fn spare(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.spare.img"))
    }

    fn lock_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.lock"))
    }

    fn read_meta(&self, key: &Key) -> Option<Meta> {
        let m: Meta = serde_json::from_slice(&std::fs::read(self.meta_path(&key.name)).ok()?).ok()?;
        (m.format == disk::FORMAT
            && m.disk_bytes == key.disk_bytes
            && m.repository == key.repository
            && m.repository_directory == key.repository_directory)
            .then_some(m)
    }

    /// Copies the key's template, if there is one, into the new file `img` (0600), under the
    /// template's shared lock, and marks the template used now (for eviction); takes the spare
    /// copy made ahead instead when there is one. `None` when there is no template.
    ///
    /// Why spares: a fresh copy's pages are dirty, and attaching the image to a loop device
    /// writes them all back first (7-20 ms for the 25 MiB of a 4,000-file repository), on top of
    /// the copy itself (about 7 ms). A spare was copied and synced after an earlier job.
    pub fn copy_into(&self, key: &Key, img: &Path) -> Result<Option<Meta>> {
        if !self.meta_path(&key.name).is_file() {
            return Ok(None);
        }
        let lock = crate::base::lock::lock(&self.lock_path(&key.name), false)?;
        let Some(meta) = self.read_meta(key) else { return Ok(None) };
        let src = self.image(&key.name);
        if !src.is_file() {
            return Ok(None);
        }
        // Replacing or removing the template removes its spare under the exclusive lock, so a
        // spare seen under the shared one is a copy of this template.
        match std::fs::rename(self.spare(&key.name), img) {
            Ok(()) => {}
            Err(_) => {
                crate::base::fs::copy_sparse(&src, img, 0o600)?;
            }
        }
        let now = nix::sys::time::TimeSpec::UTIME_NOW;
        let _ = nix::sys::stat::futimens(lock.as_raw_fd(), &now, &now);
        Ok(Some(meta))
    }

    /// Makes the spare copy of the key's template that [`Templates::copy_into`] takes next:
    /// copied and synced under the template's shared lock, then renamed into place. Nothing
    /// when there is no template or already a spare. Returns whether it made one.
    pub fn make_spare(&self, key: &Key) -> Result<bool> {
        let spare = self.spare(&key.name);
        if spare.exists() || !self.meta_path(&key.name).is_file() {
            return Ok(false);
        }
        let _lock = crate::base::lock::lock(&self.lock_path(&key.name), false)?;
        let src = self.image(&key.name);
        if self.read_meta(key).is_none() || !src.is_file() || spare.exists() {
            return Ok(false);
        }
        let tmp = self.dir.join(format!(".{}.tmp-{}", key.name, uuid::Uuid::new_v4().simple()));
        let res = (|| -> Result<()> {
            crate::base::fs::copy_sparse(&src, &tmp, 0o600)?;
            let f = std::fs::File::open(&tmp).with_context(|| format!("opening {}", tmp.display()))?;
            nix::unistd::fdatasync(f.as_raw_fd()).with_context(|| format!("syncing {}", tmp.display()))?;
            std::fs::rename(&tmp, &spare).with_context(|| format!("renaming {} into place", tmp.display()))
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res.map(|_| true)
    }

    /// Makes the key's template from workspace `ws`, whose disk holds the pristine checkout of
    /// `commit` (nothing but the clone has written to it yet): the workspace's filesystem is
    /// synced and its image copied, sparse, under the template's exclusive lock. Returns the
    /// bytes of data copied, or `None` when another job holds the template (making or using it).
    /// Evicts the least recently used templates beyond the bounds afterwards.
    pub fn store(&self, key: &Key, ws: &Path, repo: &Path, commit: &str) -> Result<Option<u64>> {
        crate::base::fs::private_dir(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let Some(lock) = crate::base::lock::try_lock(&self.lock_path(&key.name))? else {
            return Ok(None);
        };
        let tmp = self.dir.join(format!(".{}.tmp-{}", key.name, uuid::Uuid::new_v4().simple()));
        let res = (|| -> Result<u64> {
            let bytes = crate::git::with_settled_index(repo, || {
                // Everything git wrote reaches the image file (through the loop device) first.
                let dir = std::fs::File::open(ws).with_context(|| format!("opening {}", ws.display()))?;
                nix::unistd::syncfs(dir.as_raw_fd()).with_context(|| format!("syncing {}", ws.display()))?;
                crate::base::fs::copy_sparse(&disk::image_path(ws), &tmp, 0o600)
            })?;
            disk::mark_clean(&tmp)?;
            let meta = Meta {
                repository: key.repository.clone(),
                repository_directory: key.repository_directory.clone(),
                commit: commit.to_string(),
                disk_bytes: key.disk_bytes,
                format: disk::FORMAT.to_string(),
                created_at: Utc::now(),
            };
            // The old metadata goes first: a crash in between leaves no template, never a
            // template with the wrong metadata.
            let _ = std::fs::remove_file(self.meta_path(&key.name));
            let _ = std::fs::remove_file(self.spare(&key.name));
            std::fs::rename(&tmp, self.image(&key.name))
                .with_context(|| format!("renaming {} into place", tmp.display()))?;
            let json = serde_json::to_vec_pretty(&meta).context("encoding the template's metadata")?;
            crate::base::fs::write_atomic(&self.meta_path(&key.name), &json)?;
            Ok(bytes)
        })();
        let _ = std::fs::remove_file(&tmp);
        let now = nix::sys::time::TimeSpec::UTIME_NOW;
        let _ = nix::sys::stat::futimens(lock.as_raw_fd(), &now, &now);
        drop(lock);
        let bytes = res?;
        self.evict()?;
        Ok(Some(bytes))
    }

    /// Removes the least recently used templates while there are more than `max_count` or they
    /// take more than `max_bytes`; a template in use is skipped. Returns the names removed.
    pub fn evict(&self) -> Result<Vec<String>> {
        let mut all: Vec<(std::time::SystemTime, String, u64)> = Vec::new();
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("listing {}", self.dir.display())),
        };
        for e in rd.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_suffix(".json") else { continue };
            let used = std::fs::metadata(self.lock_path(name))
                .or_else(|_| e.metadata())
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            let size = [self.image(name), self.spare(name)]
                .iter()
                .map(|p| std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0))
                .sum::<u64>();
            all.push((used, name.to_string(), size));
        }
        all.sort_by_key(|t| std::cmp::Reverse(t.0));
        let (mut count, mut bytes) = (0usize, 0u64);
        let mut removed = Vec::new();
        for (_, name, size) in all {
            if count < self.max_count && bytes + size <= self.max_bytes {
                count += 1;
                bytes += size;
                continue;
            }
            let Some(_lock) = crate::base::lock::try_lock(&self.lock_path(&name))? else { continue };
            self.remove(&name)?;
            removed.push(name);
        }
        Ok(removed)
    }

    fn remove(&self, name: &str) -> Result<()> {
        for p in [self.meta_path(name), self.spare(name), self.image(name), self.lock_path(name)] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
            }
        }
        Ok(())
    }

    /// The janitor's part: removes what an executor that died while making a template or a
    /// blank image left (temporary files older than ten minutes), and evicts beyond the bounds.
    pub fn sweep(&self) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
            Err(e) => return Err(e).with_context(|| format!("listing {}", self.dir.display())),
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let tmp = name.starts_with('.') && (name.contains(".tmp-") || name.ends_with(".tmp"));
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .map(|m| m.elapsed().map(|d| d > STALE_TMP).unwrap_or(false))
                .unwrap_or(false);
            if tmp && old && std::fs::remove_file(e.path()).is_ok() {
                removed.push(e.path());
            }
        }
        removed.extend(self.evict()?.into_iter().map(|n| self.image(&n)));
        Ok(removed)
    }
}

/// Whether a template should be replaced by the pristine checkout of a job that used it.
pub(crate) fn stale(meta: &Meta) -> bool {
    (Utc::now() - meta.created_at).to_std().map(|age| age > REFRESH_AFTER).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(repo: &str, commit: &str) -> Job {
        Job { id: 1, repository_name: repo.into(), commit: commit.into(), ..Default::default() }
    }

    #[test]
    fn keys_cover_repository_directory_size_and_eligibility() {
        let t = Templates::new("/t", 4, 1 << 30);
        let c = "a".repeat(40);
        let k = |j: &Job, bytes| t.key("http://c/", j, bytes).map(|k| k.name);
        let base = k(&job("r", &c), 1 << 30).unwrap();
        assert_eq!(
            Some(base.clone()),
            k(&job("r", &"b".repeat(40)), 1 << 30),
            "any commit of the repository"
        );
        assert_eq!(Some(base.clone()), t.key("http://c", &job("r", &c), 1 << 30).map(|k| k.name));
        assert_ne!(Some(base.clone()), k(&job("s", &c), 1 << 30));
        assert_ne!(Some(base.clone()), k(&job("r", &c), 2 << 30), "another disk size");
        let mut tags = job("r", &c);
        tags.fetch_tags = true;
        assert_ne!(Some(base.clone()), k(&tags, 1 << 30));
        let mut sub = job("r", &c);
        sub.repository_directory = "src".into();
        assert_ne!(Some(base.clone()), k(&sub, 1 << 30));
        assert!(k(&job("r", "main"), 1 << 30).is_none(), "a ref");
        assert!(k(&job("", &c), 1 << 30).is_none());
        assert!(k(&job("r", &c), 0).is_none(), "no disk");
        let mut shallow = job("r", &c);
        shallow.shallow_clone = true;
        let shallow = k(&shallow, 1 << 30).expect("shallow clones have templates");
        assert_ne!(shallow, base, "of their own");
        let mut sparse = job("r", &c);
        sparse.sparse_checkout = vec!["a/*".into()];
        assert!(k(&sparse, 1 << 30).is_none());
        assert!(Templates::new("/t", 0, 1 << 30).key("http://c", &job("r", &c), 1 << 30).is_none(), "off");
    }

    /// Writes a fake template (an image of `size` data bytes and its metadata) used at `used`.
    fn fake(t: &Templates, key: &Key, size: usize, used: i64) {
        std::fs::create_dir_all(&t.dir).unwrap();
        std::fs::write(t.image(&key.name), vec![1u8; size]).unwrap();
        let meta = Meta {
            repository: key.repository.clone(),
            repository_directory: key.repository_directory.clone(),
            commit: "c".into(),
            disk_bytes: key.disk_bytes,
            format: disk::FORMAT.into(),
            created_at: Utc::now(),
        };
        std::fs::write(t.meta_path(&key.name), serde_json::to_vec(&meta).unwrap()).unwrap();
        std::fs::write(t.lock_path(&key.name), "").unwrap();
        crate::base::fs::set_times(&t.lock_path(&key.name), (used, 0)).unwrap();
    }

    #[test]
    fn eviction_keeps_the_most_recently_used_within_count_and_size() {
        let d = tempfile::tempdir().unwrap();
        let t = Templates::new(d.path().join("t"), 2, 1 << 20);
        let c = "a".repeat(40);
        let keys: Vec<Key> =
            ["a", "b", "c"].iter().map(|r| t.key("http://c", &job(r, &c), 1 << 30).unwrap()).collect();
        fake(&t, &keys[0], 4096, 1_000);
        fake(&t, &keys[1], 4096, 3_000);
        fake(&t, &keys[2], 4096, 2_000);
        assert_eq!(t.evict().unwrap(), vec![keys[0].name.clone()], "the least recently used beyond 2");
        assert!(!t.image(&keys[0].name).exists() && t.image(&keys[1].name).exists());
        // A template in use (its lock held shared) is not evicted.
        let held = crate::base::lock::lock(&t.lock_path(&keys[2].name), false).unwrap();
        let small = Templates { max_count: 1, ..t.clone() };
        assert!(small.evict().unwrap().is_empty());
        drop(held);
        assert_eq!(small.evict().unwrap(), vec![keys[2].name.clone()]);
        // The size bound.
        let tiny = Templates { max_bytes: 1024, ..t.clone() };
        assert_eq!(tiny.evict().unwrap(), vec![keys[1].name.clone()]);
        assert_eq!(std::fs::read_dir(&t.dir).unwrap().count(), 0);
    }

    #[test]
    fn the_janitor_removes_a_dead_makers_old_temporary_files_only() {
        let d = tempfile::tempdir().unwrap();
        let t = Templates::new(d.path().join("t"), 4, 1 << 30);
        std::fs::create_dir_all(&t.dir).unwrap();
        let old_tmp = t.dir.join(".abc.tmp-123");
        let old_blank = t.dir.join(".blank-456.tmp");
        let new_tmp = t.dir.join(".abc.tmp-789");
        let blank = t.dir.join("blank-0123.img");
        for p in [&old_tmp, &old_blank, &new_tmp, &blank] {
            std::fs::write(p, "x").unwrap();
        }
        for p in [&old_tmp, &old_blank, &blank] {
            crate::base::fs::set_times(p, (1_000_000, 0)).unwrap();
        }
        let mut removed = t.sweep().unwrap();
        removed.sort();
        let mut want = vec![old_tmp.clone(), old_blank.clone()];
        want.sort();
        assert_eq!(removed, want);
        assert!(new_tmp.exists() && blank.exists(), "a maker at work and the blank image stay");
    }

    #[test]
    fn a_copy_needs_matching_metadata_and_marks_the_template_used() {
        let d = tempfile::tempdir().unwrap();
        let t = Templates::new(d.path().join("t"), 4, 1 << 30);
        let key = t.key("http://c", &job("r", &"a".repeat(40)), 1 << 30).unwrap();
        assert!(t.copy_into(&key, &d.path().join("none.img")).unwrap().is_none());
        fake(&t, &key, 8192, 1_000);
        let out = d.path().join("ws.img");
        let meta = t.copy_into(&key, &out).unwrap().unwrap();
        assert_eq!(meta.commit, "c");
        assert_eq!(std::fs::read(&out).unwrap(), vec![1u8; 8192]);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o600);
        let used = std::fs::metadata(t.lock_path(&key.name)).unwrap().modified().unwrap();
        assert!(used.elapsed().unwrap() < Duration::from_secs(60), "marked used");
        // Another format (or disk size) is never used.
        let mut meta = meta;
        meta.format = "older".into();
        std::fs::write(t.meta_path(&key.name), serde_json::to_vec(&meta).unwrap()).unwrap();
        assert!(t.copy_into(&key, &d.path().join("other.img")).unwrap().is_none());
    }

    #[test]
    fn a_spare_is_taken_once_and_goes_with_its_template() {
        let d = tempfile::tempdir().unwrap();
        let t = Templates::new(d.path().join("t"), 4, 1 << 30);
        let key = t.key("http://c", &job("r", &"a".repeat(40)), 1 << 30).unwrap();
        assert!(!t.make_spare(&key).unwrap(), "no template, no spare");
        fake(&t, &key, 8192, 1_000);
        assert!(t.make_spare(&key).unwrap());
        assert!(!t.make_spare(&key).unwrap(), "one spare per template");
        let spare = t.spare(&key.name);
        let ino = std::fs::metadata(&spare).unwrap().ino();
        let out = d.path().join("ws.img");
        t.copy_into(&key, &out).unwrap().unwrap();
        assert_eq!(std::fs::metadata(&out).unwrap().ino(), ino, "the spare itself was taken");
        assert_eq!(std::fs::read(&out).unwrap(), vec![1u8; 8192]);
        assert!(!spare.exists());
        // Without a spare, a copy.
        let again = d.path().join("ws2.img");
        t.copy_into(&key, &again).unwrap().unwrap();
        assert_ne!(std::fs::metadata(&again).unwrap().ino(), ino);
        // A spare counts against the budget and goes with its template.
        t.make_spare(&key).unwrap();
        let small = Templates { max_bytes: 12 << 10, ..t.clone() };
        assert_eq!(small.evict().unwrap(), vec![key.name.clone()], "8 KiB + 8 KiB > 12 KiB");
        assert!(!spare.exists() && !t.image(&key.name).exists());
    }
}
