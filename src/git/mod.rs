//! Cloning a job's repository: the contract's `setup.git.*` sequence, the job token passed to git
//! only through the git child's environment (never argv, `.git/config`, logs or steps), and a
//! per-repository object cache on the executor host so the next job fetches only what is new.

mod cache;
mod progress;

pub(crate) use cache::ObjectCache;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::base::proc::PipeEvent;
use crate::base::proc::Stream;

/// Receives the log entries of the clone (one per git command).
pub(crate) trait CommandLog {
    /// Starts an entry with `key` and the argv shown for it.
    fn start(&mut self, key: &str, command: Option<Vec<String>>) -> Box<dyn LogWriter + '_>;
}

/// One log entry being written.
pub(crate) trait LogWriter {
    fn output(&mut self, stream: Stream, data: &[u8]);
    fn finish(&mut self, exit_code: i32);
}

/// How the executor authenticates to the coordinator's git routes for one job.
#[derive(Clone)]
pub(crate) struct GitAuth {
    /// The job's token (hex); empty on old coordinators and for `test-vm`.
    pub token: String,
    pub job_id: i64,
    pub executor_name: String,
    /// The executors' shared secret, sent (`token-executor`) only when `token` is empty, as
    /// the contract's fallback says.
    pub secret: Option<crate::base::secret::Secret>,
}

impl std::fmt::Debug for GitAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitAuth").field("token", &"[redacted]").field("job_id", &self.job_id).finish()
    }
}

impl GitAuth {
    /// `GIT_CONFIG_*` variables that add the job headers to every HTTP request of one git
    /// process. They live only in that child's environment.
    fn env(&self) -> Vec<(String, String)> {
        let authorization = match &self.secret {
            Some(secret) if self.token.is_empty() => {
                format!("Authorization: {} {}", crate::protocol::SCHEME_EXECUTOR, secret.expose())
            }
            _ => format!("Authorization: Bearer {}", self.token),
        };
        let headers = [
            authorization,
            format!("{}: {}", crate::protocol::HEADER_JOB_ID, self.job_id),
            format!("{}: {}", crate::protocol::HEADER_EXECUTOR_NAME, self.executor_name),
        ];
        let mut env = vec![("GIT_CONFIG_COUNT".to_string(), headers.len().to_string())];
        for (i, h) in headers.iter().enumerate() {
            env.push((format!("GIT_CONFIG_KEY_{i}"), "http.extraHeader".into()));
            env.push((format!("GIT_CONFIG_VALUE_{i}"), h.clone()));
        }
        env
    }
}

/// What to clone and where.
#[derive(Debug, Clone)]
pub(crate) struct CloneRequest {
    /// The coordinator's base URL (`EXECUTOR_FRONTEND_URL`).
    pub frontend_url: String,
    pub repository_name: String,
    pub commit: String,
    pub fetch_tags: bool,
    pub shallow: bool,
    pub sparse: Vec<String>,
    /// The clone target (workspace joined with `repositoryDirectory`, already confined).
    pub dir: PathBuf,
    pub auth: GitAuth,
    /// Per-repository object cache root; `None` disables the cache.
    pub cache: Option<ObjectCache>,
    /// Limit for each git command.
    pub step_timeout: Duration,
    /// CA bundle for an https coordinator with a private CA.
    pub ca_file: Option<PathBuf>,
    /// Workspace size cap in bytes (0 = none), checked after the fetch and the checkout.
    pub max_bytes: u64,
    /// The workspace root, for the size cap.
    pub workspace: PathBuf,
    /// Show a progress bar on stderr (a terminal).
    pub progress: bool,
    /// The job's cancel and deadline: a running git command is killed within 200 ms of either
    /// ([`CloneError::Interrupted`]); `None` for clones outside a job.
    pub cancel: Option<crate::base::cancel::Cancel>,
}

/// The coordinator URL of a repository: `<frontend>/.executors/git/<name>`.
pub(crate) fn remote_url(frontend_url: &str, repository_name: &str) -> String {
    format!("{}/.executors/git/{}", frontend_url.trim_end_matches('/'), repository_name.trim_matches('/'))
}

/// Checks a repository name before it is put in a URL or a cache path.
pub(crate) fn validate_repository_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 512 {
        bail!("repository name {name:?} must have 1 to 512 characters");
    }
    let ok = name.split('/').all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg.chars().all(|c| c.is_ascii_alphanumeric() || "-_.~@+".contains(c))
    });
    if !ok {
        bail!("repository name {name:?} is not a path of plain segments (letters, digits, - _ . ~ @ +)");
    }
    Ok(())
}

/// Checks that a commit is a full or abbreviated hex object name or a plain ref name.
pub(crate) fn validate_commit(commit: &str) -> Result<()> {
    if commit.is_empty() || commit.len() > 256 || commit.starts_with('-') {
        bail!("commit {commit:?} is not a revision");
    }
    if !commit.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c)) || commit.contains("..") {
        bail!("commit {commit:?} is not a revision");
    }
    Ok(())
}

/// Runs the clone sequence; each git command is one log entry.
///
/// With the object cache (clones of a commit hash, not sparse): when the cache holds the
/// repository, it is brought up to date from the coordinator (only new objects travel) and its
/// packs are copied into the workspace before the fetch, which then finds the commit locally.
/// A shallow clone (every Sourcegraph job) is made from the cache alone, without the network
/// when the cache has the commit ([`shallow_from_cache`]). When the cache lacks the repository,
/// the workspace fetches from the coordinator as plain git would, and a full clone's freshly
/// verified packs seed the cache (a shallow one's cannot: the cache keeps whole histories). A
/// cache that fails in any way is removed and the clone starts again from the coordinator, with
/// a log line that says so.
pub(crate) fn clone(req: &CloneRequest, log: &mut dyn CommandLog) -> Result<()> {
    validate_repository_name(&req.repository_name)?;
    validate_commit(&req.commit)?;
    std::fs::create_dir_all(&req.dir).with_context(|| format!("creating {}", req.dir.display()))?;
    let url = remote_url(&req.frontend_url, &req.repository_name);
    let git = Git { req, base_env: base_env(req) };
    let cache = req
        .cache
        .as_ref()
        // A shallow fetch with `--tags` brings the tags' own commits: left to the coordinator.
        .filter(|_| {
            req.sparse.is_empty() && cache::is_object_name(&req.commit) && !(req.shallow && req.fetch_tags)
        });
    if let Some(cache) = cache {
        if cache.exists(&req.frontend_url, &req.repository_name) {
            let res = if req.shallow {
                shallow_from_cache(&git, log, &url, cache)
            } else {
                attempt(&git, log, &url, Some(cache))
            };
            match res {
                Ok(()) => return Ok(()),
                Err(e) if is_missing_commit(&e) || is_interrupted(&e) => return Err(e),
                Err(e) => {
                    log_line(
                        log,
                        "setup.git.cache",
                        &format!(
                            "the object cache of {} failed ({e:#}); removing it and cloning from the coordinator\n",
                            req.repository_name
                        ),
                    );
                    cache.discard(&req.frontend_url, &req.repository_name)?;
                    empty_dir(&req.dir)?;
                }
            }
        }
    }
    attempt(&git, log, &url, None)?;
    if let Some(cache) = cache.filter(|_| !req.shallow) {
        match cache.seed(&git, req) {
            Ok(Some(bytes)) => log_line(
                log,
                "setup.git.cache",
                &format!("seeded the object cache with {bytes} bytes of objects\n"),
            ),
            Ok(None) => {}
            // The clone is done and correct; a cache that could not be seeded only costs the next job.
            Err(e) => log_line(log, "setup.git.cache", &format!("could not seed the object cache: {e:#}\n")),
        }
    }
    Ok(())
}

/// The ref that names a template's commit during the fetch of [`clone_from_template`].
const TEMPLATE_REF: &str = "refs/executor/template";

/// Brings the repository at `req.dir`, a copy of a template (the pristine checkout of an earlier
/// commit of the same repository, made by [`clone`] or by this function in an earlier job), to
/// `req.commit`: origin is pointed at the coordinator (`setup.git.add-remote`), the fetch
/// (`setup.git.fetch`, the contract's argv) negotiates with the template's commit so that only
/// new objects travel, and the checkout writes only the files that differ between the two
/// commits, its index being valid for the copy. The object cache is not involved.
pub(crate) fn clone_from_template(req: &CloneRequest, log: &mut dyn CommandLog) -> Result<()> {
    validate_repository_name(&req.repository_name)?;
    validate_commit(&req.commit)?;
    let url = remote_url(&req.frontend_url, &req.repository_name);
    let git = Git { req, base_env: base_env(req) };
    let r = req.dir.to_string_lossy().into_owned();
    settle_index(&req.dir.join(".git").join("index"))?;
    // Git offers the server only the commits of refs (not HEAD) as common ground; without this
    // ref the coordinator would send the whole history again.
    let head = std::fs::read_to_string(req.dir.join(".git").join("HEAD")).unwrap_or_default();
    git.set_ref(
        &req.dir,
        TEMPLATE_REF,
        Some(head.trim()).filter(|h| !h.starts_with("ref:")).or(Some("HEAD")),
    )?;
    git.run(log, "setup.git.add-remote", &["-C", &r, "remote", "set-url", "origin", &url], &[])?;
    fetch(&git, log, &r)?;
    git.set_ref(&req.dir, TEMPLATE_REF, None)?;
    check_size(req)?;
    git.run(log, "setup.git.checkout", &["-C", &r, "checkout", "--progress", "--force", &req.commit], &[])?;
    check_size(req)?;
    set_remote(&git, log, &r)
}

/// The contract's `setup.git.fetch` (the job's headers in git's environment only); a commit the
/// coordinator does not have is [`CloneError::MissingCommit`].
fn fetch(git: &Git, log: &mut dyn CommandLog, r: &str) -> Result<()> {
    let args = fetch_args(r, git.req);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    git.run(log, "setup.git.fetch", &args, &git.req.auth.env()).map_err(|e| missing_commit(e, git.req))
}

/// The contract's `setup.git.set-remote`: origin is left naming the repository, not the
/// coordinator's URL.
fn set_remote(git: &Git, log: &mut dyn CommandLog, r: &str) -> Result<()> {
    let name = git.req.repository_name.as_str();
    git.run(log, "setup.git.set-remote", &["-C", r, "remote", "set-url", "origin", name], &[])
}

/// Runs `f` (which copies the workspace disk that holds the repository at `repo` into a template)
/// with the repository's index dated one second after its own mtime, and restores its times
/// afterwards, so that the copy carries an index git trusts without re-reading every file (see
/// [`settle_index`]) while the job's own repository is left exactly as it was. Nothing writes
/// to the repository meanwhile: its clone is done and no step has run.
pub(crate) fn with_settled_index<T>(repo: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    use std::os::unix::fs::MetadataExt;
    let index = repo.join(".git").join("index");
    let md = match std::fs::metadata(&index) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return f(),
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", index.display())),
    };
    let set = |atime: nix::sys::time::TimeSpec, mtime: nix::sys::time::TimeSpec| {
        nix::sys::stat::utimensat(
            None,
            &index,
            &atime,
            &mtime,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .with_context(|| format!("dating {}", index.display()))
    };
    let atime = nix::sys::time::TimeSpec::new(md.atime(), md.atime_nsec());
    let mtime = nix::sys::time::TimeSpec::new(md.mtime(), md.mtime_nsec());
    set(atime, nix::sys::time::TimeSpec::new(md.mtime() + 1, 0))?;
    let res = f();
    set(atime, mtime)?;
    res
}

/// Lets git trust the stat data of a template's index. Git re-reads every file whose mtime is
/// not older than the index file's ("racily clean" entries, whole seconds apart here), and a
/// checkout writes its files and its index within the same second: in a copy, that would be
/// every file read and hashed again. The copy's files are bit for bit those the index was
/// written for (the disk image was copied whole, with their inodes, sizes and times, before any
/// step ran), so the index is dated one second after its own mtime; only when that second is
/// already past, so that any later write to a file still gets a newer time than the index.
fn settle_index(index: &Path) -> Result<()> {
    let md = match std::fs::metadata(index) {
        Ok(m) => m,
        // No index: a template of a repository without files; nothing to settle.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", index.display())),
    };
    let mtime = std::os::unix::fs::MetadataExt::mtime(&md);
    let now = chrono::Utc::now().timestamp();
    if now > mtime {
        crate::base::fs::set_times(index, (mtime + 1, 0))?;
    }
    Ok(())
}

/// One pass of the sequence, from the cache's objects or not.
fn attempt(git: &Git, log: &mut dyn CommandLog, url: &str, cache: Option<&ObjectCache>) -> Result<()> {
    let req = git.req;
    let r = req.dir.to_string_lossy().into_owned();
    git.run(log, "setup.git.init", &["-C", &r, "init"], &[])?;
    if let Some(cache) = cache {
        cache.update_into(git, log, url, &req.dir.join(".git").join("objects"))?;
        // The cache's own fetch checked that the commit's history is complete there (against
        // the cache's refs, as git trusts any repository's refs). A ref to the commit tells the
        // workspace's fetch the same; without one, that fetch walks the whole history again to
        // check connectivity (1.1-1.5 s of a 1.8 s warm clone of 20,000 commits). The ref is
        // removed after the fetch. A cache missing objects of the commit's tree fails the
        // checkout, which sends the clone back to the coordinator; objects missing only from
        // older history (deleted by hand from the cache) are not noticed here.
        git.set_ref(&req.dir, cache::HINT_REF, Some(&req.commit))?;
    }
    git.run(log, "setup.git.add-remote", &["-C", &r, "remote", "add", "origin", url], &[])?;
    git.run(log, "setup.git.disable-gc", &["-C", &r, "config", "--local", "gc.auto", "0"], &[])?;
    fetch(git, log, &r)?;
    if cache.is_some() {
        git.set_ref(&req.dir, cache::HINT_REF, None)?;
    }
    check_size(req)?;
    if !req.sparse.is_empty() {
        git.run(
            log,
            "setup.git.sparse-checkout-config",
            &["-C", &r, "config", "--local", "core.sparseCheckout", "1"],
            &[],
        )?;
        let mut args = vec!["-C", &r, "sparse-checkout", "set", "--no-cone", "--"];
        args.extend(req.sparse.iter().map(String::as_str));
        git.run(log, "setup.git.sparse-checkout-set", &args, &[])?;
    }
    let checkout: Vec<&str> = if req.sparse.is_empty() {
        vec!["-C", &r, "checkout", "--progress", "--force", &req.commit]
    } else {
        vec!["-C", &r, "-c", "protocol.version=2", "checkout", "--progress", "--force", &req.commit]
    };
    // A sparse (partial) checkout fetches blobs lazily from origin, so it needs the job headers.
    let checkout_auth = if req.sparse.is_empty() { Vec::new() } else { req.auth.env() };
    git.run(log, "setup.git.checkout", &checkout, &checkout_auth)?;
    check_size(req)?;
    set_remote(git, log, &r)
}

/// A shallow clone made from the object cache: the cache is brought to the commit from the
/// coordinator only when it lacks it (`setup.git.cache-fetch`), then the workspace fetches the
/// commit at depth 1 from the cache itself (`setup.git.cache-shallow`, git's own shallow
/// fetch over `file://`, so `.git/shallow` names the commit and only the commit and its tree
/// travel, as from the coordinator), and the contract's remaining steps follow without a fetch
/// from the coordinator.
fn shallow_from_cache(git: &Git, log: &mut dyn CommandLog, url: &str, cache: &ObjectCache) -> Result<()> {
    let req = git.req;
    let r = req.dir.to_string_lossy().into_owned();
    git.run(log, "setup.git.init", &["-C", &r, "init"], &[])?;
    cache.shallow_into(git, log, url, &r)?;
    git.run(log, "setup.git.add-remote", &["-C", &r, "remote", "add", "origin", url], &[])?;
    git.run(log, "setup.git.disable-gc", &["-C", &r, "config", "--local", "gc.auto", "0"], &[])?;
    check_size(req)?;
    git.run(log, "setup.git.checkout", &["-C", &r, "checkout", "--progress", "--force", &req.commit], &[])?;
    check_size(req)?;
    set_remote(git, log, &r)
}

/// Removes everything inside `dir` (a failed attempt's repository), keeping `dir`.
fn empty_dir(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        let md = p.symlink_metadata()?;
        if md.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) }
            .with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(())
}

/// The fetch argv, flags inserted before `origin` in the contract's order.
fn fetch_args(r: &str, req: &CloneRequest) -> Vec<String> {
    let mut a: Vec<String> =
        ["-C", r, "-c", "protocol.version=2", "fetch", "--progress", "--no-recurse-submodules"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    if req.fetch_tags {
        a.push("--tags".into());
    }
    if req.shallow {
        if !req.fetch_tags {
            a.push("--no-tags".into());
        }
        a.push("--depth=1".into());
    }
    if !req.sparse.is_empty() {
        a.push("--filter=blob:none".into());
    }
    a.push("origin".into());
    a.push(req.commit.clone());
    a
}

/// A clone failure a caller branches on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CloneError {
    /// The coordinator does not have the commit: no retry elsewhere can help.
    #[error("commit {commit} does not exist in repository {repository}: {detail}")]
    MissingCommit { commit: String, repository: String, detail: String },
    /// The job was canceled, or reached its deadline, while git ran `key`; git was killed. Not
    /// a reason to drop the cache or a template, nor to clone again.
    #[error("{key} interrupted: {}", reason.describe())]
    Interrupted { key: String, reason: crate::base::cancel::CancelReason },
}

/// Whether `e` is [`CloneError::Interrupted`].
pub(crate) fn is_interrupted(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<CloneError>(), Some(CloneError::Interrupted { .. }))
}

fn is_missing_commit(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<CloneError>(), Some(CloneError::MissingCommit { .. }))
}

/// Turns git's own words for an unknown commit into [`CloneError::MissingCommit`].
fn missing_commit(e: anyhow::Error, req: &CloneRequest) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("not our ref")
        || text.contains("couldn't find remote ref")
        || text.contains("unadvertised object")
        || text.contains("not a valid object")
    {
        anyhow::Error::new(CloneError::MissingCommit {
            commit: req.commit.clone(),
            repository: req.repository_name.clone(),
            detail: text,
        })
    } else {
        e
    }
}

fn check_size(req: &CloneRequest) -> Result<()> {
    if req.max_bytes == 0 {
        return Ok(());
    }
    let used = dir_size(&req.workspace);
    if used > req.max_bytes {
        bail!(
            "repository {} at {} needs {} bytes in the workspace, over the workspace cap of {} bytes",
            req.repository_name,
            req.commit,
            used,
            req.max_bytes
        );
    }
    Ok(())
}

/// Bytes used by regular files below `dir` (symlinks not followed).
pub(crate) fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(md) = e.path().symlink_metadata() else { continue };
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                total += md.len();
            }
        }
    }
    total
}

fn log_line(log: &mut dyn CommandLog, key: &str, line: &str) {
    let mut w = log.start(key, None);
    w.output(Stream::Stderr, line.as_bytes());
    w.finish(0);
}

/// The environment of every git command: nothing of the host's but PATH, the proxy variables
/// and the trust store (`base::http::git_env`: git reaches the coordinator as the executor's own
/// client does), and no host or user git configuration.
fn base_env(req: &CloneRequest) -> Vec<(String, String)> {
    base_env_for(req.ca_file.as_deref())
}

fn base_env_for(ca_file: Option<&Path>) -> Vec<(String, String)> {
    let mut env = vec![
        ("PATH".to_string(), std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into())),
        ("GIT_TERMINAL_PROMPT".into(), "0".into()),
        ("GIT_LFS_SKIP_SMUDGE".into(), "1".into()),
        ("GIT_CONFIG_NOSYSTEM".into(), "1".into()),
        ("GIT_CONFIG_GLOBAL".into(), "/dev/null".into()),
        ("HOME".into(), "/nonexistent".into()),
        ("LC_ALL".into(), "C".into()),
        // What `-c` would set, without changing the contract's argv: no advice noise in the logs,
        // no `git maintenance` process after each fetch (gc is off in every workspace anyway),
        // and a parallel checkout. Writing files dominates the checkout of a large tree and waits
        // on the disk more than on a CPU: 4 workers checked out 4,000 files in 0.47-0.59 s where
        // one took 0.92-1.03 s (2 cores, loaded), so more workers than cores still pay.
        (
            "GIT_CONFIG_PARAMETERS".into(),
            "'advice.detachedhead'='false' 'init.defaultbranch'='main' 'checkout.workers'='4' \
             'maintenance.auto'='false'"
                .into(),
        ),
    ];
    env.extend(crate::base::http::git_env(ca_file));
    env
}

/// The commit the repository's default branch (the coordinator's `HEAD`) points at, asked with
/// `git ls-remote` and the job's credentials; `None` when the coordinator advertises no `HEAD`.
/// Bounded by `timeout`.
pub(crate) fn default_branch_tip(
    frontend_url: &str,
    repository_name: &str,
    auth: &GitAuth,
    ca_file: Option<&Path>,
    timeout: Duration,
) -> Result<Option<String>> {
    validate_repository_name(repository_name)?;
    let url = remote_url(frontend_url, repository_name);
    let mut cmd = crate::base::proc::command("git");
    cmd.args(["ls-remote", "--", &url, "HEAD"]).env_clear().envs(base_env_for(ca_file)).envs(auth.env());
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().context("running git ls-remote")?;
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().context("waiting for git ls-remote")? {
            break s;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("git ls-remote of {repository_name} took longer than {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        std::io::Read::read_to_string(&mut o, &mut out).context("reading git ls-remote's output")?;
    }
    if !status.success() {
        anyhow::bail!("git ls-remote of {repository_name} failed ({status})");
    }
    Ok(out.lines().find_map(|l| l.strip_suffix("\tHEAD")).map(|c| c.trim().to_string()))
}

/// Runs git commands with the clone's environment, timeouts and logging.
pub(crate) struct Git<'a> {
    req: &'a CloneRequest,
    base_env: Vec<(String, String)>,
}

impl Git<'_> {
    /// Points the ref `name` (`refs/…`) of the repository at `repo` at the object `value`, or
    /// deletes it (`None`), without a git process where git keeps the repository's refs as files
    /// and `value` is a full object name: the repository is the executor's own (a fresh clone, or
    /// a template's copy) and nothing else runs in it, so the loose ref file is all there is to
    /// write (no reflog is kept for refs outside heads, remotes and notes). Otherwise, and for a
    /// `HEAD` that names a branch, `git update-ref`.
    pub(crate) fn set_ref(&self, repo: &Path, name: &str, value: Option<&str>) -> Result<()> {
        let git_dir = repo.join(".git");
        let loose = git_dir.join(name);
        let files = git_dir.join("refs").is_dir() && !git_dir.join("reftable").exists();
        let hex = |v: &str| (v.len() == 40 || v.len() == 64) && v.chars().all(|c| c.is_ascii_hexdigit());
        let r = repo.to_string_lossy();
        match value {
            Some(v) if files && hex(v) => {
                crate::base::fs::ensure_parent(&git_dir, name)?;
                std::fs::write(&loose, format!("{v}\n"))
                    .with_context(|| format!("writing {}", loose.display()))
            }
            Some(v) => self.quiet(&["-C", &r, "update-ref", name, v]),
            None if files => match std::fs::remove_file(&loose) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(e).with_context(|| format!("removing {}", loose.display()))
                }
                _ => {
                    // As git does: no empty directory of refs is left behind (refs/executor).
                    if let Some(dir) = loose.parent().filter(|d| *d != git_dir.join("refs")) {
                        let _ = std::fs::remove_dir(dir);
                    }
                    Ok(())
                }
            },
            None => self.quiet(&["-C", &r, "update-ref", "-d", name]),
        }
    }

    /// Runs `git <args>` as the log entry `key`. `secret_env` is added to the child's
    /// environment only. Fails with `failed <key>: ...` on a non-zero exit or the timeout.
    pub(crate) fn run(
        &self,
        log: &mut dyn CommandLog,
        key: &str,
        args: &[&str],
        secret_env: &[(String, String)],
    ) -> Result<()> {
        let mut argv = vec!["git".to_string()];
        argv.extend(args.iter().map(|s| s.to_string()));
        let mut entry = log.start(key, Some(argv.clone()));
        let mut cmd = crate::base::proc::command("git");
        cmd.args(args).env_clear().stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, v) in self.base_env.iter().chain(secret_env) {
            cmd.env(k, v);
        }
        process_group(&mut cmd);
        let started = Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                entry.output(Stream::Stderr, format!("cannot start git: {e}\n").as_bytes());
                entry.finish(1);
                bail!("failed {key}: cannot start git: {e}");
            }
        };
        let mut pipes = crate::base::proc::Pipes::spawn(&mut child);
        let mut bar = progress::Progress::new(self.req.progress, key);
        // Keeps only the tail of stderr for the error message.
        let mut tail: Vec<u8> = Vec::new();
        let mut timed_out = false;
        let mut interrupted = None;
        loop {
            if let Some(reason) = self.req.cancel.as_ref().and_then(|c| c.check()) {
                interrupted = Some(reason);
                kill_group(&child);
                break;
            }
            let left = self.req.step_timeout.saturating_sub(started.elapsed());
            match pipes.next(left.min(Duration::from_millis(200))) {
                PipeEvent::Data(stream, data) => {
                    bar.feed(&data);
                    entry.output(stream, &data);
                    if stream == Stream::Stderr {
                        tail.extend_from_slice(&data);
                        if tail.len() > 4096 {
                            tail.drain(..tail.len() - 4096);
                        }
                    }
                }
                PipeEvent::Closed => break,
                PipeEvent::Idle => {
                    if started.elapsed() >= self.req.step_timeout {
                        timed_out = true;
                        kill_group(&child);
                        break;
                    }
                }
            }
        }
        pipes.join();
        let status = child.wait().with_context(|| format!("waiting for git ({key})"))?;
        bar.finish();
        let code = status.code().unwrap_or(-1);
        if let Some(reason) = interrupted {
            entry.output(Stream::Stderr, format!("interrupted: {}\n", reason.describe()).as_bytes());
            entry.finish(code);
            return Err(CloneError::Interrupted { key: key.to_string(), reason }.into());
        }
        if timed_out {
            entry.output(Stream::Stderr, format!("timed out after {:?}\n", self.req.step_timeout).as_bytes());
            entry.finish(code);
            bail!("failed {key}: git timed out after {} s", self.req.step_timeout.as_secs());
        }
        entry.finish(code);
        if !status.success() {
            let text = String::from_utf8_lossy(&tail);
            let last: Vec<&str> =
                text.split(['\n', '\r']).map(str::trim).filter(|l| !l.is_empty()).rev().take(3).collect();
            let last: Vec<&str> = last.into_iter().rev().collect();
            bail!("failed {key}: git exited with status {code}: {}", last.join("; "));
        }
        Ok(())
    }
}

fn process_group(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
}

fn kill_group(child: &std::process::Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> CloneRequest {
        CloneRequest {
            frontend_url: "http://127.0.0.1:1/".into(),
            repository_name: "github.com/acme/widgets".into(),
            commit: "4b1d".into(),
            fetch_tags: false,
            shallow: false,
            sparse: vec![],
            dir: "/w/r".into(),
            auth: GitAuth {
                token: "t".repeat(40),
                job_id: 7,
                executor_name: "e".into(),
                secret: Some(crate::base::secret::Secret::new("s".repeat(24))),
            },
            cache: None,
            step_timeout: Duration::from_secs(1),
            ca_file: None,
            max_bytes: 0,
            workspace: "/w".into(),
            progress: false,
            cancel: None,
        }
    }

    #[test]
    fn fetch_flags_follow_the_contract_order() {
        let mut r = req();
        let base = "-C /w/r -c protocol.version=2 fetch --progress --no-recurse-submodules";
        assert_eq!(fetch_args("/w/r", &r).join(" "), format!("{base} origin 4b1d"));
        r.fetch_tags = true;
        assert_eq!(fetch_args("/w/r", &r).join(" "), format!("{base} --tags origin 4b1d"));
        r.fetch_tags = false;
        r.shallow = true;
        assert_eq!(fetch_args("/w/r", &r).join(" "), format!("{base} --no-tags --depth=1 origin 4b1d"));
        r.fetch_tags = true;
        r.sparse = vec!["a/*".into()];
        assert_eq!(
            fetch_args("/w/r", &r).join(" "),
            format!("{base} --tags --depth=1 --filter=blob:none origin 4b1d")
        );
    }

    #[test]
    fn auth_travels_only_in_git_config_env() {
        let env = req().auth.env();
        assert_eq!(env[0], ("GIT_CONFIG_COUNT".to_string(), "3".to_string()));
        assert!(env.iter().any(|(_, v)| v == &format!("Authorization: Bearer {}", "t".repeat(40))));
        assert!(env.iter().any(|(_, v)| v == "X-Sourcegraph-Job-ID: 7"));
        assert!(!env.iter().any(|(_, v)| v.contains("token-executor")), "the secret only without a token");
        assert!(!format!("{:?}", req().auth).contains(&"t".repeat(40)));
        let mut fallback = req().auth;
        fallback.token.clear();
        let env = fallback.env();
        assert!(env.iter().any(|(_, v)| v == &format!("Authorization: token-executor {}", "s".repeat(24))));
        assert!(!format!("{fallback:?}").contains(&"s".repeat(24)));
    }

    #[test]
    fn names_and_commits_are_checked() {
        assert!(validate_repository_name("github.com/acme/widgets").is_ok());
        for bad in ["", "../x", "a//b", "a/../b", "a b", "a?b", "/abs"] {
            assert!(validate_repository_name(bad).is_err(), "{bad}");
        }
        assert!(validate_commit("4b1d").is_ok());
        assert!(validate_commit("refs/heads/main").is_ok());
        for bad in ["", "--upload-pack=x", "a..b", "a b"] {
            assert!(validate_commit(bad).is_err(), "{bad}");
        }
        assert_eq!(remote_url("http://h:1/", "/a/b/"), "http://h:1/.executors/git/a/b");
    }
}

#[cfg(test)]
mod http_tests;
