//! The per-repository object cache on the executor host: a bare repository per
//! (coordinator, repository) that only the executor's own git writes, under an exclusive lock.
//! Workspaces receive *copies* of its pack files (no hard links, no alternates), so nothing a job
//! does to its workspace can change what another job reads, and a workspace works unchanged in a
//! sandbox where the cache's path does not exist.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

use super::{CommandLog, Git, LogWriter};

#[derive(Debug, Clone)]
pub(crate) struct ObjectCache {
    root: PathBuf,
}

/// An exclusive lock on one repository's cache, released on drop.
struct CacheLock {
    _lock: crate::base::lock::Held,
}

/// The workspace ref that marks the job's commit as complete (copied from the cache) during the
/// workspace's fetch.
pub(crate) const HINT_REF: &str = "refs/executor/from-cache";

/// Repacks the cache when it holds more packs than this (each warm update adds one).
const MAX_PACKS: usize = 16;

impl ObjectCache {
    /// A cache below `root` (`$EXECUTOR_STATE_DIR/cache/git`).
    pub(crate) fn new(root: impl Into<PathBuf>) -> Self {
        ObjectCache { root: root.into() }
    }

    fn name(frontend_url: &str, repository_name: &str) -> String {
        let mut h = Sha256::new();
        h.update(frontend_url.trim_end_matches('/').as_bytes());
        h.update(b"\0");
        h.update(repository_name.as_bytes());
        hex::encode(&h.finalize()[..16])
    }

    /// The bare repository caching `repository_name` of `frontend_url`.
    pub(crate) fn repo_dir(&self, frontend_url: &str, repository_name: &str) -> PathBuf {
        self.root.join(format!("{}.git", Self::name(frontend_url, repository_name)))
    }

    /// Whether the cache holds this repository.
    pub(crate) fn exists(&self, frontend_url: &str, repository_name: &str) -> bool {
        self.repo_dir(frontend_url, repository_name).join("HEAD").is_file()
    }

    fn lock(&self, frontend_url: &str, repository_name: &str) -> Result<CacheLock> {
        let path = self.root.join(format!("{}.lock", Self::name(frontend_url, repository_name)));
        Ok(CacheLock { _lock: crate::base::lock::lock(&path, true)? })
    }

    /// Brings the cache up to date with the job's commit from the coordinator (entry
    /// `setup.git.cache-fetch`: git negotiates with what the cache has, so only new objects
    /// travel), then copies its packs into the workspace's object directory.
    pub(crate) fn update_into(
        &self,
        git: &Git,
        log: &mut dyn CommandLog,
        url: &str,
        objects: &Path,
    ) -> Result<()> {
        let req = git.req;
        let _lock = self.lock(&req.frontend_url, &req.repository_name)?;
        let dir = self.repo_dir(&req.frontend_url, &req.repository_name);
        let d = dir.to_string_lossy().into_owned();
        self.fetch(git, log, url, &d)?;
        let (n, bytes) = copy_objects(&dir.join("objects"), objects)?;
        let mut w = log.start("setup.git.cache", None);
        let line = format!("copied {n} object files ({bytes} bytes) from the object cache\n");
        w.output(crate::base::proc::Stream::Stdout, line.as_bytes());
        w.finish(0);
        Ok(())
    }

    /// The cache's own fetch of the job's commit from the coordinator (the caller holds the
    /// lock), which leaves `refs/executor/<commit>` naming it; repacks a cache of many packs.
    fn fetch(&self, git: &Git, log: &mut dyn CommandLog, url: &str, d: &str) -> Result<()> {
        let req = git.req;
        let dir = Path::new(d);
        let refspec = format!("+{}:refs/executor/{}", req.commit, req.commit);
        git.run(
            log,
            "setup.git.cache-fetch",
            &[
                "-C",
                d,
                "-c",
                "protocol.version=2",
                "fetch",
                "--progress",
                "--no-tags",
                "--no-write-fetch-head",
                url,
                &refspec,
            ],
            &req.auth.env(),
        )
        .map_err(|e| super::missing_commit(e, req))?;
        let object = format!("{}^{{commit}}", req.commit);
        git.quiet(&["-C", d, "cat-file", "-e", &object])
            .context("the cache lacks the commit after its fetch")?;
        if count_packs(&dir.join("objects"))? > MAX_PACKS {
            git.quiet(&["-C", d, "repack", "-a", "-d", "-q"]).context("repacking the object cache")?;
        }
        Ok(())
    }

    /// Fetches the job's commit at depth 1 into the repository at `repo` from the cache, first
    /// bringing the cache to the commit from the coordinator (`url`) when it lacks it. The
    /// commit counts as present only with the ref the cache's own fetch (or its seed) wrote
    /// for it, which git wrote after checking that the commit's history is complete there.
    pub(crate) fn shallow_into(
        &self,
        git: &Git,
        log: &mut dyn CommandLog,
        url: &str,
        repo: &str,
    ) -> Result<()> {
        let req = git.req;
        let _lock = self.lock(&req.frontend_url, &req.repository_name)?;
        let dir = self.repo_dir(&req.frontend_url, &req.repository_name);
        let d = dir.to_string_lossy().into_owned();
        let hint = format!("refs/executor/{}", req.commit);
        let has =
            git.quiet(&["-C", &d, "rev-parse", "--verify", "--quiet", &format!("{hint}^{{commit}}")]).is_ok();
        if !has {
            self.fetch(git, log, url, &d)?;
        }
        let from = format!("file://{d}");
        git.run(
            log,
            "setup.git.cache-shallow",
            &[
                "-C",
                repo,
                "-c",
                "protocol.version=2",
                "fetch",
                "--no-tags",
                "--no-write-fetch-head",
                "--depth=1",
                &from,
                &req.commit,
            ],
            &[],
        )?;
        let mut w = log.start("setup.git.cache", None);
        let line = if has {
            "made the shallow clone from the object cache, which had the commit\n"
        } else {
            "made the shallow clone from the object cache, brought to the commit first\n"
        };
        w.output(crate::base::proc::Stream::Stdout, line.as_bytes());
        w.finish(0);
        Ok(())
    }

    /// Seeds an absent cache with the packs of a workspace that was just fetched and checked out
    /// (before any step ran, so they are the coordinator's, verified by git). Returns the bytes
    /// copied, or `None` when another job seeded it first.
    pub(crate) fn seed(&self, git: &Git, req: &super::CloneRequest) -> Result<Option<u64>> {
        let _lock = self.lock(&req.frontend_url, &req.repository_name)?;
        let dir = self.repo_dir(&req.frontend_url, &req.repository_name);
        if dir.join("HEAD").is_file() {
            return Ok(None);
        }
        if dir.exists() {
            remove_repo(&dir)?;
        }
        let tmp = dir.with_extension(format!("seed-{}", uuid::Uuid::new_v4().simple()));
        let t = tmp.to_string_lossy().into_owned();
        let res = (|| -> Result<u64> {
            git.quiet(&["init", "--bare", "--quiet", &t])?;
            for (k, v) in [("gc.auto", "0"), ("uploadpack.allowAnySHA1InWant", "true")] {
                git.quiet(&["-C", &t, "config", "--local", k, v])?;
            }
            let (_, bytes) = copy_objects(&req.dir.join(".git").join("objects"), &tmp.join("objects"))?;
            git.quiet(&["-C", &t, "update-ref", &format!("refs/executor/{}", req.commit), &req.commit])?;
            git.quiet(&["-C", &t, "cat-file", "-e", &format!("{}^{{commit}}", req.commit)])?;
            Ok(bytes)
        })();
        match res {
            Ok(bytes) => {
                std::fs::rename(&tmp, &dir)
                    .with_context(|| format!("renaming {} into place", tmp.display()))?;
                Ok(Some(bytes))
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    /// Removes the cache of one repository.
    pub(crate) fn discard(&self, frontend_url: &str, repository_name: &str) -> Result<()> {
        let _lock = self.lock(frontend_url, repository_name)?;
        remove_repo(&self.repo_dir(frontend_url, repository_name))
    }
}

fn count_packs(objects: &Path) -> Result<usize> {
    let rd = std::fs::read_dir(objects.join("pack"))
        .with_context(|| format!("listing {}/pack", objects.display()))?;
    Ok(rd.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "pack")).count())
}

/// Copies every pack (with its index) and every loose object from one object directory into
/// another, each through a temporary name so that git never sees half a file (small fetches
/// leave loose objects rather than a pack). Returns (files, bytes).
fn copy_objects(from: &Path, to: &Path) -> Result<(usize, u64)> {
    let src = from.join("pack");
    let dst = to.join("pack");
    std::fs::create_dir_all(&dst).with_context(|| format!("creating {}", dst.display()))?;
    let mut files = 0;
    let mut bytes = 0;
    let mut copy = |f: &Path, dir: &Path| -> Result<()> {
        let Some(name) = f.file_name() else { return Ok(()) };
        let tmp = dir.join(format!(".tmp-{}", name.to_string_lossy()));
        bytes += std::fs::copy(f, &tmp).with_context(|| format!("copying {}", f.display()))?;
        std::fs::rename(&tmp, dir.join(name)).with_context(|| format!("renaming into {}", dir.display()))?;
        files += 1;
        Ok(())
    };
    if src.is_dir() {
        for e in std::fs::read_dir(&src).with_context(|| format!("listing {}", src.display()))? {
            let pack = e?.path();
            if pack.extension().is_none_or(|x| x != "pack") {
                continue;
            }
            if !pack.with_extension("idx").is_file() {
                bail!("pack {} has no index", pack.display());
            }
            // The pack first, its index last: git only uses a pack once its index is there.
            for ext in ["pack", "rev", "idx"] {
                let f = pack.with_extension(ext);
                if f.is_file() {
                    copy(&f, &dst)?;
                }
            }
        }
    }
    for e in std::fs::read_dir(from).with_context(|| format!("listing {}", from.display()))? {
        let d = e?.path();
        let is_fanout = d
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.len() == 2 && n.chars().all(|c| c.is_ascii_hexdigit()));
        if !is_fanout || !d.is_dir() {
            continue;
        }
        let out = to.join(d.file_name().unwrap_or_default());
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        for o in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let o = o?.path();
            if o.is_file() && !o.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
                copy(&o, &out)?;
            }
        }
    }
    Ok((files, bytes))
}

fn remove_repo(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    // Rename first so that a crash mid-removal never leaves a half repository under the name.
    let trash = dir.with_extension(format!("trash-{}", uuid::Uuid::new_v4().simple()));
    std::fs::rename(dir, &trash).with_context(|| format!("moving {} aside", dir.display()))?;
    std::fs::remove_dir_all(&trash).with_context(|| format!("removing {}", trash.display()))
}

pub(crate) fn is_object_name(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// A log that drops everything, for the cache's own bookkeeping commands.
struct NullLog;
struct NullWriter;

impl CommandLog for NullLog {
    fn start(&mut self, _key: &str, _command: Option<Vec<String>>) -> Box<dyn LogWriter + '_> {
        Box::new(NullWriter)
    }
}

impl LogWriter for NullWriter {
    fn output(&mut self, _stream: crate::base::proc::Stream, _data: &[u8]) {}
    fn finish(&mut self, _exit_code: i32) {}
}

impl Git<'_> {
    /// Runs a bookkeeping git command without a log entry.
    pub(crate) fn quiet(&self, args: &[&str]) -> Result<()> {
        self.run(&mut NullLog, "cache", args, &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_cache_per_coordinator_and_repository() {
        let c = ObjectCache::new("/c");
        assert_eq!(c.repo_dir("http://a/", "r"), c.repo_dir("http://a", "r"));
        assert_ne!(c.repo_dir("http://a", "r"), c.repo_dir("http://b", "r"));
        assert_ne!(c.repo_dir("http://a", "r"), c.repo_dir("http://a", "s"));
        assert!(is_object_name(&"a".repeat(40)));
        assert!(!is_object_name("main"));
    }

    #[test]
    fn copies_packs_and_loose_objects_and_refuses_a_pack_without_index() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(a.path().join("pack")).unwrap();
        std::fs::write(a.path().join("pack/pack-1.pack"), b"PACK").unwrap();
        std::fs::write(a.path().join("pack/pack-1.idx"), b"IDX").unwrap();
        std::fs::create_dir_all(a.path().join("ab")).unwrap();
        std::fs::write(a.path().join("ab/cdef"), b"LOOSE").unwrap();
        assert_eq!(copy_objects(a.path(), b.path()).unwrap(), (3, 12));
        assert_eq!(std::fs::read(b.path().join("ab/cdef")).unwrap(), b"LOOSE");
        assert_eq!(std::fs::read(b.path().join("pack/pack-1.idx")).unwrap(), b"IDX");
        std::fs::write(a.path().join("pack/pack-2.pack"), b"PACK").unwrap();
        assert!(copy_objects(a.path(), b.path()).is_err());
    }
}
