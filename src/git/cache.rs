//! The per-repository object cache on the executor host: a bare repository per
//! (coordinator, repository) that only the executor's own git writes, updated under an exclusive
//! lock, from which workspaces fetch over a local pack transfer (no object file is shared, so a
//! job can never alter what another job reads).

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::path::{Path, PathBuf};

use super::{CloneRequest, CommandLog, Git};

#[derive(Debug, Clone)]
pub struct ObjectCache {
    root: PathBuf,
}

/// An exclusive lock on one repository's cache, released on drop.
struct CacheLock {
    _lock: nix::fcntl::Flock<File>,
}

impl ObjectCache {
    /// A cache below `root` (`$EXECUTOR_STATE_DIR/cache/git`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
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
    pub fn repo_dir(&self, frontend_url: &str, repository_name: &str) -> PathBuf {
        self.root.join(format!("{}.git", Self::name(frontend_url, repository_name)))
    }

    fn lock(&self, frontend_url: &str, repository_name: &str) -> Result<CacheLock> {
        std::fs::create_dir_all(&self.root).with_context(|| format!("creating {}", self.root.display()))?;
        let path = self.root.join(format!("{}.lock", Self::name(frontend_url, repository_name)));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .with_context(|| format!("locking {}", path.display()))?;
        Ok(CacheLock { _lock: lock })
    }

    /// Brings the cache up to date with `commit` and returns its path. On a damaged cache it
    /// starts the cache afresh once (saying so in the log) before giving up.
    pub(crate) fn update(
        &self,
        git: &Git,
        log: &mut dyn CommandLog,
        url: &str,
        req: &CloneRequest,
    ) -> Result<PathBuf> {
        if !is_object_name(&req.commit) {
            bail!("only full commit hashes are cached, not {:?}", req.commit);
        }
        let _lock = self.lock(&req.frontend_url, &req.repository_name)?;
        let dir = self.repo_dir(&req.frontend_url, &req.repository_name);
        match self.fetch_into(git, log, &dir, url, req) {
            Ok(()) => Ok(dir),
            Err(e) if dir.exists() => {
                super::log_line(
                    log,
                    "setup.git.cache",
                    &format!(
                        "object cache {} is damaged ({e:#}); starting it afresh with a full fetch\n",
                        dir.display()
                    ),
                );
                remove_repo(&dir)?;
                self.fetch_into(git, log, &dir, url, req)?;
                Ok(dir)
            }
            Err(e) => Err(e),
        }
    }

    fn fetch_into(
        &self,
        git: &Git,
        log: &mut dyn CommandLog,
        dir: &Path,
        url: &str,
        req: &CloneRequest,
    ) -> Result<()> {
        let d = dir.to_string_lossy().into_owned();
        if !dir.join("HEAD").exists() {
            if dir.exists() {
                remove_repo(dir)?;
            }
            git.run(log, "setup.git.cache-init", &["init", "--bare", "--quiet", &d], &[])?;
            for (k, v) in [("gc.auto", "0"), ("uploadpack.allowAnySHA1InWant", "true"), ("core.fsync", "all")]
            {
                git.run(log, "setup.git.cache-init", &["-C", &d, "config", "--local", k, v], &[])?;
            }
        }
        let refspec = format!("+{}:refs/executor/{}", req.commit, req.commit);
        let auth = req.auth.env();
        git.run(
            log,
            "setup.git.cache-fetch",
            &[
                "-C",
                &d,
                "-c",
                "protocol.version=2",
                "fetch",
                "--progress",
                "--no-tags",
                "--no-write-fetch-head",
                url,
                &refspec,
            ],
            &auth,
        )?;
        let object = format!("{}^{{commit}}", req.commit);
        git.run(log, "setup.git.cache-verify", &["-C", &d, "cat-file", "-e", &object], &[])?;
        Ok(())
    }

    /// Removes the cache of one repository (after a workspace could not fetch from it).
    pub fn discard(&self, frontend_url: &str, repository_name: &str) -> Result<()> {
        let _lock = self.lock(frontend_url, repository_name)?;
        remove_repo(&self.repo_dir(frontend_url, repository_name))
    }
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

fn is_object_name(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.chars().all(|c| c.is_ascii_hexdigit())
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
}
