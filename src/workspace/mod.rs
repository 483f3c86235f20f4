//! Job workspaces under `$EXECUTOR_STATE_DIR/workspaces`: creating one, writing the job's inline
//! files and step scripts into it (confined, see [`files`]), the owner record the janitor reads,
//! and removal. Cloning the repository is [`clone_repository`]'s place; the workspace's own
//! size-capped filesystem is [`disk`]'s.

pub mod disk;
pub(crate) mod scripts;
pub(crate) mod template;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::logs::JobLogger;
use crate::protocol::Job;

/// Who owns a workspace, written beside it (outside the job's reach) as `<name>.owner.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Owner {
    pub executor: String,
    pub job_uid: String,
    pub deadline: Option<DateTime<Utc>>,
    #[serde(default)]
    pub sandbox: Option<String>,
    /// Whether `executor` holds its lifetime lock ([`hold_lifetime`]) while it lives: then a
    /// janitor that can take that lock knows the owner is gone and reclaims the workspace (and
    /// so its sandbox) at once instead of waiting for the deadline.
    #[serde(default)]
    pub lifetime_lock: bool,
}

/// The lifetime lock this process holds, with the executor name it holds it for.
static LIFETIME: std::sync::OnceLock<(String, crate::base::lock::Held)> = std::sync::OnceLock::new();

/// Where executor `name`'s lifetime lock lives: one file per executor in `owners/`, beside the
/// workspaces directory.
fn lifetime_lock_path(workspaces_dir: &Path, name: &str) -> PathBuf {
    let safe: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect();
    workspaces_dir.with_file_name("owners").join(format!("{safe}.lock"))
}

/// Takes executor `name`'s lifetime lock and holds it until this process ends (the kernel drops
/// it then, however the process dies): what lets a janitor tell a live owner from a dead one
/// exactly. `executor loop` takes it at start, before it creates any workspace.
pub fn hold_lifetime(workspaces_dir: &Path, name: &str) -> Result<()> {
    let held = crate::base::lock::try_lock(&lifetime_lock_path(workspaces_dir, name))?
        .ok_or_else(|| anyhow::anyhow!("the lifetime lock of executor {name} is held by another process"))?;
    LIFETIME
        .set((name.to_string(), held))
        .map_err(|_| anyhow::anyhow!("this process already holds a lifetime lock"))
}

/// Removes this process's lifetime lock file as it exits cleanly, its jobs done (the lock itself
/// goes with the process).
pub fn release_lifetime(workspaces_dir: &Path) {
    if let Some((name, _)) = LIFETIME.get() {
        let _ = std::fs::remove_file(lifetime_lock_path(workspaces_dir, name));
    }
}

/// Whether this process holds executor `name`'s lifetime lock.
fn holds_lifetime(name: &str) -> bool {
    LIFETIME.get().is_some_and(|(n, _)| n == name)
}

fn owner_path(ws: &Path) -> PathBuf {
    let mut name = ws.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".owner.json");
    ws.with_file_name(name)
}

/// Where the blank disk images and the workspace templates live: `templates/` beside the
/// workspaces directory (outside every job's reach, 0700).
pub fn templates_dir(workspaces_dir: &Path) -> PathBuf {
    workspaces_dir.with_file_name("templates")
}

/// Makes the blank disk image for workspaces of `disk_bytes` ahead of the first job (see
/// [`disk::blank_image`]), where workspaces get a disk: `executor loop` calls it as it starts, so
/// that no job waits for mkfs. Nothing to do without a cap or without root.
pub fn prepare_blank_disk(workspaces_dir: &Path, disk_bytes: u64) -> Result<()> {
    if disk_bytes < disk::MIN_DISK_BYTES || !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    // The workspaces' root directories are root's (created by this executor, as root).
    disk::blank_image(&templates_dir(workspaces_dir), disk_bytes, 0, 0).map(|_| ())
}

/// Creates a fresh workspace for the job, records its owner and, with a cap (`disk_bytes`
/// above 0), gives it its own filesystem of that size (see [`disk`]). Where that cannot be
/// done (the executor is not root, no loop device) the workspace is a plain directory, the
/// clone's size is checked afterwards instead, and the setup log entry `setup.fs.workspace`
/// says so. The disk starts as a copy of the job's template when there is one (returned, for
/// [`clone_repository_with`]), and otherwise as a copy of a blank image (see
/// [`disk::blank_image`]). A template that cannot be copied or mounted is left aside with a line
/// on stderr, and the disk starts blank.
pub fn create_for_job_from(
    workspaces_dir: &Path,
    owner: &Owner,
    disk_bytes: u64,
    logger: &JobLogger,
    template: Option<(&template::Templates, &template::Key)>,
) -> Result<(PathBuf, disk::Cap, Option<template::Meta>)> {
    let ws = create(workspaces_dir, owner)?;
    if disk_bytes == 0 {
        return Ok((ws, disk::Cap::Unlimited, None));
    }
    let why_not = if !nix::unistd::geteuid().is_root() {
        "the executor is not root, so it cannot mount one".to_string()
    } else {
        if let Some((templates, key)) = template {
            let t = Instant::now();
            let img = disk::image_path(&ws);
            let res = templates.copy_into(key, &img).and_then(|meta| match meta {
                Some(meta) => disk::mount_image(&ws).map(|_| Some(meta)),
                None => Ok(None),
            });
            match res {
                Ok(Some(meta)) => {
                    return Ok((ws, disk::Cap::Mounted { bytes: disk_bytes, took: t.elapsed() }, Some(meta)))
                }
                Ok(None) => {}
                Err(e) => {
                    let _ = std::fs::remove_file(&img);
                    tracing::warn!(job_id = %owner.job_uid, "the workspace template was not used: {e:#}");
                }
            }
        }
        match disk::mount_with(&ws, disk_bytes, Some(&templates_dir(workspaces_dir))) {
            Ok(took) => return Ok((ws, disk::Cap::Mounted { bytes: disk_bytes, took }, None)),
            Err(e) => format!("{e:#}"),
        }
    };
    let msg = format!(
        "workspace disk limit {}: no filesystem of its own ({why_not}); only the repository's size \
         is checked, after the clone, and steps are bounded per file only",
        crate::base::units::format_bytes(disk_bytes)
    );
    tracing::warn!(job_id = %owner.job_uid, "{msg}");
    let mut entry = logger.entry("setup.fs.workspace", None)?;
    entry.line(&msg);
    entry.finish(0)?;
    Ok((ws, disk::Cap::PostHoc { bytes: disk_bytes, reason: why_not }, None))
}

/// Creates a fresh workspace directory for the job and records its owner.
pub fn create(workspaces_dir: &Path, owner: &Owner) -> Result<PathBuf> {
    // The workspaces' parent may be searched (an OCI container's mapped root resolves its
    // workspace through it) but not listed; each workspace is its owner's alone: root's, or the
    // sandbox's mapped root's while its steps run. Its files keep the contract's 0777 inside.
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(workspaces_dir)
            .with_context(|| format!("creating {}", workspaces_dir.display()))?;
        let md = std::fs::metadata(workspaces_dir)
            .with_context(|| format!("inspecting {}", workspaces_dir.display()))?;
        if md.permissions().mode() & 0o066 != 0 {
            std::fs::set_permissions(workspaces_dir, std::fs::Permissions::from_mode(0o711))
                .with_context(|| format!("closing {} to other users", workspaces_dir.display()))?;
        }
    }
    let safe_uid: String =
        owner.job_uid.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    let rand = uuid::Uuid::new_v4().simple().to_string();
    let ws = workspaces_dir.join(format!("workspace-{safe_uid}-{}", &rand[..12]));
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&ws)
            .with_context(|| format!("creating the workspace {}", ws.display()))?;
        // Exactly 0700, whatever the umask.
        std::fs::set_permissions(&ws, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting the mode of the workspace {}", ws.display()))?;
    }
    let owner =
        Owner { lifetime_lock: owner.lifetime_lock || holds_lifetime(&owner.executor), ..owner.clone() };
    write_owner(&ws, &owner)?;
    Ok(ws)
}

/// Rewrites the owner record (vm-boot adds the sandbox name).
pub fn write_owner(ws: &Path, owner: &Owner) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(owner).context("encoding the workspace owner")?;
    crate::base::fs::write_atomic(&owner_path(ws), &bytes)
}

pub fn read_owner(ws: &Path) -> Option<Owner> {
    std::fs::read(owner_path(ws)).ok().and_then(|b| serde_json::from_slice(&b).ok())
}

/// Removes the workspace (its filesystem first, if it has one) and its owner record; fine when
/// they are already gone.
pub fn remove(ws: &Path) -> Result<()> {
    // Never delete through a mount: the disk goes first, whole.
    disk::unmount(ws)?;
    match std::fs::remove_dir_all(ws) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing the workspace {}", ws.display())),
    }
    match std::fs::remove_file(owner_path(ws)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing the owner record of {}", ws.display())),
    }
}

/// What a clone needs besides the job: where the coordinator is, who we are, and the limits.
pub struct CloneContext<'a> {
    pub frontend_url: &'a str,
    pub executor_name: &'a str,
    /// The shared secret, used only for a job without a token (the contract's fallback).
    pub secret: Option<&'a crate::base::secret::Secret>,
    pub ca_file: Option<&'a Path>,
    /// Root of the per-repository object caches (`$EXECUTOR_STATE_DIR/cache/git`).
    pub cache_dir: Option<PathBuf>,
    /// Workspace size cap in bytes (0 = none).
    pub max_bytes: u64,
    pub git_timeout: std::time::Duration,
    /// The job's cancel and deadline, which stop the clone's git commands.
    pub cancel: Option<&'a crate::base::cancel::Cancel>,
}

/// Clones the job's repository into the workspace (the `setup.git.*` entries, see
/// `docs/workspace.md`). Returns whether there was a repository to clone.
pub fn clone_repository(job: &Job, ws: &Path, logger: &JobLogger, cx: &CloneContext) -> Result<bool> {
    clone_repository_with(job, ws, logger, cx, None)
}

/// The job's template, for [`clone_repository_with`]: which one, and the one its disk started
/// from ([`create_for_job_from`]), if any.
pub struct TemplateUse<'a> {
    pub templates: &'a template::Templates,
    pub key: &'a template::Key,
    pub from: Option<template::Meta>,
    /// The workspace disk's size, to start over from a blank disk when the template fails.
    pub disk_bytes: u64,
}

/// [`clone_repository`] with templates: a disk that started from a template is brought to the
/// job's commit by [`crate::git::clone_from_template`] (falling back to a blank disk and a full
/// clone when that fails for any reason but a missing commit); a full clone on a disk makes the
/// repository's template, and so does a template-based one whose template is old
/// ([`template::REFRESH_AFTER`]). Both happen here, before the job's files, scripts and steps.
pub fn clone_repository_with(
    job: &Job,
    ws: &Path,
    logger: &JobLogger,
    cx: &CloneContext,
    template: Option<TemplateUse>,
) -> Result<bool> {
    if job.repository_name.is_empty() {
        return Ok(false);
    }
    let dir = if job.repository_directory.trim_matches('/').is_empty() {
        ws.to_path_buf()
    } else {
        crate::base::fs::confined(ws, &job.repository_directory)
            .with_context(|| format!("repositoryDirectory {:?}", job.repository_directory))?
    };
    let mounted = disk::is_mounted(ws);
    let req = crate::git::CloneRequest {
        frontend_url: cx.frontend_url.to_string(),
        repository_name: job.repository_name.clone(),
        commit: job.commit.clone(),
        fetch_tags: job.fetch_tags,
        shallow: job.shallow_clone,
        sparse: job.sparse_checkout.clone(),
        dir,
        auth: crate::git::GitAuth {
            token: job.token.clone(),
            job_id: job.id,
            executor_name: cx.executor_name.to_string(),
            secret: cx.secret.cloned(),
        },
        cache: cx.cache_dir.clone().map(crate::git::ObjectCache::new),
        step_timeout: cx.git_timeout,
        ca_file: cx.ca_file.map(Path::to_path_buf),
        // On its own filesystem the workspace cannot outgrow the cap: no walk afterwards.
        max_bytes: if mounted { 0 } else { cx.max_bytes },
        workspace: ws.to_path_buf(),
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        cancel: cx.cancel.cloned(),
    };
    let mut log = GitLog { logger, error: None };
    let mut store = template.as_ref().is_some_and(|t| mounted && t.from.is_none());
    let mut res = None;
    if let Some(t) = template.as_ref() {
        if let Some(from) = &t.from {
            let started = Instant::now();
            let r = crate::git::clone_from_template(&req, &mut log);
            let line = match &r {
                Ok(()) => format!(
                    "the workspace disk started as a copy of the template of {} at {} (made {}); \
                     brought to {} in {} ms",
                    from.repository,
                    from.commit,
                    from.created_at.format("%Y-%m-%dT%H:%M:%SZ"),
                    job.commit,
                    started.elapsed().as_millis()
                ),
                Err(e) if crate::git::is_interrupted(e) => String::new(),
                Err(e) => format!("the workspace template failed ({e:#}); cloning onto a blank disk"),
            };
            if !line.is_empty() {
                log_line(logger, "setup.git.template", &line);
            }
            match r {
                Ok(()) => {
                    store = template::stale(from);
                    res = Some(Ok(()));
                }
                Err(e)
                    if crate::git::is_interrupted(&e)
                        || matches!(e.downcast_ref(), Some(crate::git::CloneError::MissingCommit { .. })) =>
                {
                    res = Some(Err(e));
                }
                Err(_) => {
                    disk::unmount(ws)?;
                    disk::mount_with(ws, t.disk_bytes, Some(t.templates.dir()))
                        .context("making a blank workspace disk after the template failed")?;
                    store = true;
                }
            }
        }
    }
    let res = res.unwrap_or_else(|| crate::git::clone(&req, &mut log));
    res.map_err(|e| {
        if mounted && cx.max_bytes > 0 && disk::is_disk_full(&e) {
            e.context(format!(
                "repository {} at {} does not fit in the workspace disk limit of {} \
                 (EXECUTOR_FIRECRACKER_DISK_SPACE)",
                job.repository_name,
                job.commit,
                crate::base::units::format_bytes(cx.max_bytes)
            ))
        } else {
            e.context(format!("cloning {} at {}", job.repository_name, job.commit))
        }
    })?;
    if let Some(t) = template.filter(|_| store && disk::is_mounted(ws)) {
        let started = Instant::now();
        let line = match t.templates.store(t.key, ws, &req.dir, &job.commit) {
            Ok(Some(bytes)) => Some(format!(
                "made the workspace template of {} at {} ({} of data) in {} ms",
                job.repository_name,
                job.commit,
                crate::base::units::format_bytes(bytes),
                started.elapsed().as_millis()
            )),
            // Another job of the repository is making or using it.
            Ok(None) => None,
            // The clone is done and correct; a template that could not be made only costs the next job.
            Err(e) => Some(format!("could not make the workspace template: {e:#}")),
        };
        if let Some(line) = line {
            log_line(logger, "setup.git.template", &line);
        }
    }
    Ok(true)
}

/// A log entry of one line, without a command.
fn log_line(logger: &JobLogger, key: &str, line: &str) {
    if let Ok(mut entry) = logger.entry(key, None) {
        entry.line(line);
        let _ = entry.finish(0);
    }
}

/// The clone's log entries, through the job's logger.
struct GitLog<'a> {
    logger: &'a JobLogger,
    error: Option<anyhow::Error>,
}

struct GitEntry {
    entry: Option<crate::logs::LogEntry>,
}

impl crate::git::CommandLog for GitLog<'_> {
    fn start(&mut self, key: &str, command: Option<Vec<String>>) -> Box<dyn crate::git::LogWriter + '_> {
        match self.logger.entry(key, command) {
            Ok(entry) => Box::new(GitEntry { entry: Some(entry) }),
            Err(e) => {
                // The clone goes on; the logger reports its own failures when the job completes.
                self.error = Some(e);
                Box::new(GitEntry { entry: None })
            }
        }
    }
}

impl crate::git::LogWriter for GitEntry {
    fn output(&mut self, stream: crate::base::proc::Stream, data: &[u8]) {
        if let Some(e) = self.entry.as_mut() {
            crate::base::proc::OutputSink::output(e, stream, data);
        }
    }
    fn finish(&mut self, exit_code: i32) {
        if let Some(e) = self.entry.take() {
            let _ = e.finish(exit_code);
        }
    }
}

/// Where a job file's bytes come from when it references the coordinator's files store.
pub type FileFetcher<'a> = &'a dyn Fn(&str, &str) -> Result<Vec<u8>>;

/// Writes the job's inline files and one script per docker step (log entry `setup.fs.extras`).
/// Returns the scripts, relative to the workspace.
pub fn write_files_and_scripts(
    job: &Job,
    ws: &Path,
    logger: &JobLogger,
    fetch: FileFetcher,
) -> Result<Vec<String>> {
    let scripts: Vec<(String, String)> = job
        .docker_steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                scripts::script_path(job.id, i, &job.repository_name, &job.commit),
                scripts::script_body(&s.commands),
            )
        })
        .collect();
    if job.files.is_empty() && scripts.is_empty() {
        return Ok(Vec::new());
    }
    let mut entry = logger.entry("setup.fs.extras", None)?;
    let res = (|| -> Result<()> {
        crate::base::fs::ensure_parent(ws, &format!("{}/x", scripts::SCRIPTS_DIR))?;
        for (rel, f) in &job.files {
            let t = Instant::now();
            let fetched;
            let content: &[u8] = if !f.bucket.is_empty() && !f.key.is_empty() {
                fetched = fetch(&f.bucket, &f.key).with_context(|| {
                    format!("fetching job file {rel:?} from the files store ({}/{})", f.bucket, f.key)
                })?;
                &fetched
            } else {
                &f.content
            };
            crate::base::fs::write_file_at(ws, rel, content, 0o777, f.modified_at)
                .with_context(|| format!("writing job file {rel:?}"))?;
            entry.line(&format!("Wrote {rel} in {:?}", t.elapsed()));
        }
        for (rel, body) in &scripts {
            let t = Instant::now();
            crate::base::fs::write_file(ws, rel, body.as_bytes(), 0o777)?;
            entry.line(&format!("Wrote {rel} in {:?}", t.elapsed()));
        }
        Ok(())
    })();
    match res {
        Ok(()) => {
            entry.finish(0)?;
            Ok(scripts.into_iter().map(|(p, _)| p).collect())
        }
        Err(e) => {
            entry.line(&format!("error: {e:#}"));
            let _ = entry.finish(1);
            Err(e)
        }
    }
}

/// Serialises janitor passes against sandbox boots on one state directory (the lock file sits
/// in it), across processes: a boot holds it shared from before its sandbox exists until the workspace's owner
/// record names that sandbox; a janitor pass holds it exclusively, so that it never finds a
/// sandbox that no owner record claims yet.
pub fn janitor_lock(state_dir: &Path, exclusive: bool) -> Result<crate::base::lock::Held> {
    crate::base::lock::lock(&state_dir.join("janitor.lock"), exclusive)
}

/// One janitor pass over the workspaces directory. A workspace is removed when its owner is
/// `me` and its job is not in `live` (the uids of the jobs `me` runs now), when its owner held a
/// lifetime lock that this pass could take (the owner is gone), or (whoever owns it) when its
/// deadline passed more than `grace` ago, or when it has no owner record and is older than `grace`. Returns the removed paths and
/// the sandbox names that live workspaces claim (so the sandbox janitor keeps them).
pub fn sweep(
    workspaces_dir: &Path,
    me: &str,
    live: &HashSet<String>,
    grace: std::time::Duration,
) -> Result<(Vec<PathBuf>, HashSet<String>)> {
    let mut removed = Vec::new();
    let mut claimed = HashSet::new();
    let rd = match std::fs::read_dir(workspaces_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((removed, claimed)),
        Err(e) => return Err(e).with_context(|| format!("listing {}", workspaces_dir.display())),
    };
    let now = Utc::now();
    let grace_c = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
    // Executors found gone in this pass (their lifetime lock taken), with the lock held until
    // their workspaces are removed.
    let mut gone: std::collections::HashMap<String, Option<crate::base::lock::Held>> =
        std::collections::HashMap::new();
    let mut owner_gone = |executor: &str| -> Result<bool> {
        if let Some(held) = gone.get(executor) {
            return Ok(held.is_some());
        }
        let held = crate::base::lock::try_lock(&lifetime_lock_path(workspaces_dir, executor))?;
        let dead = held.is_some();
        gone.insert(executor.to_string(), held);
        Ok(dead)
    };
    for ent in rd.flatten() {
        let path = ent.path();
        let name = ent.file_name().to_string_lossy().into_owned();
        if let Some(dir) = name.strip_suffix(".img").filter(|n| n.starts_with("workspace-")) {
            // A disk whose workspace is gone (a crash inside `remove`); not one that this pass
            // already removed with its workspace, listed before it.
            let dir = workspaces_dir.join(dir);
            if !dir.exists() && path.exists() {
                disk::unmount(&dir)?;
                removed.push(path);
            }
            continue;
        }
        if !name.starts_with("workspace-") || name.ends_with(".owner.json") {
            continue;
        }
        let dead = match read_owner(&path) {
            Some(o) if o.executor == me => !live.contains(&o.job_uid),
            Some(o) => {
                (o.lifetime_lock && owner_gone(&o.executor)?)
                    || match o.deadline {
                        Some(d) => d + grace_c < now,
                        None => false,
                    }
            }
            None => ent
                .metadata()
                .and_then(|m| m.modified())
                .map(|m| m.elapsed().map(|e| e > grace).unwrap_or(false))
                .unwrap_or(false),
        };
        if dead {
            remove(&path)?;
            removed.push(path);
        } else if let Some(s) = read_owner(&path).and_then(|o| o.sandbox) {
            claimed.insert(s);
        }
    }
    // A dead executor's lock file goes with its workspaces (unlinked while held: a janitor that
    // opened it before takes the lock on the unlinked file, and also finds the owner gone).
    for (executor, held) in gone {
        if held.is_some() {
            let _ = std::fs::remove_file(lifetime_lock_path(workspaces_dir, &executor));
        }
    }
    Ok((removed, claimed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn owner(exec: &str, uid: &str, deadline: Option<DateTime<Utc>>) -> Owner {
        Owner {
            lifetime_lock: false,
            executor: exec.into(),
            job_uid: uid.into(),
            deadline,
            sandbox: Some(format!("sb-{exec}-{uid}")),
        }
    }

    /// Finding 10 of the security review: a crashed executor's workspace (and so its sandbox)
    /// stayed until 60 s after its job's deadline. An owner that held a lifetime lock is gone
    /// exactly when the lock can be taken.
    #[test]
    fn sweep_reclaims_a_dead_owners_workspace_at_once() {
        let d = tempfile::tempdir().unwrap();
        let future = Some(Utc::now() + chrono::Duration::hours(1));
        let alive = crate::base::lock::try_lock(&lifetime_lock_path(d.path(), "alive")).unwrap().unwrap();
        let dying = crate::base::lock::try_lock(&lifetime_lock_path(d.path(), "dying")).unwrap().unwrap();
        let locked = |exec: &str, uid: &str| Owner { lifetime_lock: true, ..owner(exec, uid, future) };
        let a = create(d.path(), &locked("alive", "1")).unwrap();
        let b1 = create(d.path(), &locked("dying", "2")).unwrap();
        let b2 = create(d.path(), &locked("dying", "3")).unwrap();
        let (removed, claimed) = sweep(d.path(), "me", &HashSet::new(), Duration::from_secs(60)).unwrap();
        assert!(removed.is_empty(), "{removed:?}");
        assert_eq!(claimed.len(), 3);
        drop(dying); // the process died: the kernel released its lock
        let (removed, claimed) = sweep(d.path(), "me", &HashSet::new(), Duration::from_secs(60)).unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(a.exists() && !b1.exists() && !b2.exists());
        assert!(claimed.contains("sb-alive-1") && !claimed.contains("sb-dying-2"));
        assert!(!lifetime_lock_path(d.path(), "dying").exists(), "its lock file goes too");
        drop(alive);
        // A record without the flag (written by a piped stage) still waits for its deadline.
        let piped = create(d.path(), &owner("piped", "4", future)).unwrap();
        let (removed, _) = sweep(d.path(), "me", &HashSet::new(), Duration::from_secs(60)).unwrap();
        assert!(piped.exists() && removed.iter().all(|r| r != &piped), "{removed:?}");
        // This process's own lifetime lock marks the workspaces it creates.
        hold_lifetime(d.path(), "me-now").unwrap();
        let mine = create(d.path(), &owner("me-now", "5", future)).unwrap();
        assert!(read_owner(&mine).unwrap().lifetime_lock);
        assert!(crate::base::lock::try_lock(&lifetime_lock_path(d.path(), "me-now")).unwrap().is_none());
    }

    #[test]
    fn sweep_keeps_live_and_foreign_unexpired_workspaces() {
        let d = tempfile::tempdir().unwrap();
        let future = Some(Utc::now() + chrono::Duration::hours(1));
        let past = Some(Utc::now() - chrono::Duration::hours(1));
        let mine_live = create(d.path(), &owner("me", "1", future)).unwrap();
        let mine_dead = create(d.path(), &owner("me", "2", future)).unwrap();
        let other_running = create(d.path(), &owner("other", "1", future)).unwrap();
        let other_expired = create(d.path(), &owner("gone", "3", past)).unwrap();
        // A running job is live from its dequeue on, before its workspace path is known.
        let live: HashSet<String> = ["1".to_string()].into_iter().collect();
        let (removed, claimed) = sweep(d.path(), "me", &live, Duration::from_secs(60)).unwrap();
        assert!(mine_live.exists() && other_running.exists());
        assert!(!mine_dead.exists() && !other_expired.exists());
        assert_eq!(removed.len(), 2);
        assert!(claimed.contains("sb-me-1") && claimed.contains("sb-other-1"));
        assert!(read_owner(&mine_dead).is_none());
        remove(&mine_dead).unwrap();
    }

    #[test]
    fn sweep_unmounts_a_crashed_executors_workspace_disk() {
        let test = "sweep_unmounts_a_crashed_executors_workspace_disk";
        if !crate::base::skip::is_root() {
            return crate::base::skip::skip(test, "root", "needs root to loop-mount the disk");
        }
        if which::which("mkfs.ext4").is_err() {
            return crate::base::skip::skip(test, "ext4", "mkfs.ext4 (e2fsprogs) is not installed");
        }
        let d = tempfile::tempdir().unwrap();
        let past = Some(Utc::now() - chrono::Duration::hours(1));
        let crashed = create(d.path(), &owner("gone", "7", past)).unwrap();
        disk::mount(&crashed, 16 << 20).unwrap();
        std::fs::write(crashed.join("file"), "x").unwrap();
        // A disk whose workspace directory is gone.
        let orphan = d.path().join("workspace-9-orphan.img");
        std::fs::write(&orphan, "").unwrap();
        let (removed, _) = sweep(d.path(), "me", &HashSet::new(), Duration::from_secs(60)).unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(!crashed.exists() && !disk::image_path(&crashed).exists() && !orphan.exists());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn janitor_lock_excludes_boots_and_boots_share_it() {
        let d = tempfile::tempdir().unwrap();
        let boot_a = janitor_lock(d.path(), false).unwrap();
        let _boot_b = janitor_lock(d.path(), false).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let dir = d.path().to_path_buf();
        let janitor = std::thread::spawn(move || {
            let _pass = janitor_lock(&dir, true).unwrap();
            tx.send(()).unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "a pass ran during a boot");
        drop(boot_a);
        drop(_boot_b);
        rx.recv_timeout(Duration::from_secs(5)).expect("the pass runs once the boots end");
        janitor.join().unwrap();
    }
}

#[cfg(test)]
mod clone_tests {
    use super::*;

    #[test]
    fn repository_directory_is_confined() {
        let ws = tempfile::tempdir().unwrap();
        let logger = crate::logs::JobLogger::new(
            std::sync::Arc::new(crate::logs::tests::MemoryLogs::default()),
            crate::base::redact::Redactor::default(),
            true,
        );
        let cx = CloneContext {
            frontend_url: "http://127.0.0.1:1",
            executor_name: "e",
            secret: None,
            ca_file: None,
            cache_dir: None,
            max_bytes: 0,
            git_timeout: std::time::Duration::from_secs(5),
            cancel: None,
        };
        for bad in ["../out", "/abs", "a/../../b"] {
            let job = Job {
                id: 1,
                repository_name: "r".into(),
                repository_directory: bad.into(),
                commit: "c".into(),
                ..Default::default()
            };
            let err = format!("{:#}", clone_repository(&job, ws.path(), &logger, &cx).unwrap_err());
            assert!(err.contains("repositoryDirectory") && err.contains("outside"), "{bad}: {err}");
        }
    }
}
