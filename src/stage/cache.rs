//! A job's dependency caches (docs/caches.md), on both ends of its steps: `setup.cache` (in
//! `run-steps`, before the first step) computes each cache's key from the workspace as cloned,
//! looks the key up, leases what it found and has the runtime attach it; `teardown.cache` (in
//! `complete`, once the sandbox is gone and before the workspace is) promotes what a trusted,
//! successful job wrote to a new version, evicts beyond the budget and gives the lease back.

use anyhow::Result;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::JobCtx;
use crate::base::units::format_bytes;
use crate::cache::rules::{self, CacheRules, CacheSpec};
use crate::cache::{CacheStore, Lookup};
use crate::document::{CacheRecord, RunDocument};
use crate::logs::LogEntry;
use crate::sandbox::{CacheMount, Runtime, SandboxRecord};

fn load_rules(ctx: &JobCtx) -> Result<CacheRules> {
    CacheRules::load(ctx.settings.cache_rules.as_deref())
}

/// What every step of a job with caches is told of them, as GitHub's `cache-hit` output tells a
/// workflow (so that a job may skip an install whose result it already has):
/// `EXECUTOR_CACHE_HIT_<PREFIX>` is `true` when that cache's key hit a saved version, `false`
/// otherwise (the prefix upper-cased, each character not a letter or digit an underscore), and
/// `EXECUTOR_CACHE_HIT` is `true` when every cache of the job hit. Nothing for a job without
/// caches.
pub(crate) fn step_env(caches: &[CacheRecord]) -> Vec<String> {
    if caches.is_empty() {
        return Vec::new();
    }
    let mut env: Vec<String> = caches
        .iter()
        .map(|c| {
            let name: String = c
                .prefix
                .chars()
                .map(|ch| if ch.is_ascii_alphanumeric() { ch.to_ascii_uppercase() } else { '_' })
                .collect();
            format!("EXECUTOR_CACHE_HIT_{name}={}", c.version.is_some())
        })
        .collect();
    env.dedup();
    env.push(format!("EXECUTOR_CACHE_HIT={}", caches.iter().all(|c| c.version.is_some())));
    env
}

/// Whether the job gets caches (then no step is made ahead: its spec needs their mounts).
pub(crate) fn applies(ctx: &JobCtx) -> bool {
    ctx.settings.caches != Some(false) && load_rules(ctx).is_ok_and(|r| rules::any(&ctx.job, &r))
}

fn store(ctx: &JobCtx) -> CacheStore {
    CacheStore::new(&ctx.settings.state_dir)
}

/// Whether a successful end of the job saves its caches, and why: its queue is one the operator
/// trusts, or its commit is the tip of its repository's default branch.
fn trust(ctx: &JobCtx, doc: &RunDocument) -> (bool, String) {
    if ctx.settings.cache_trusted_queues.iter().any(|q| !q.is_empty() && *q == doc.executor.queue) {
        return (true, format!("queue {} is trusted (EXECUTOR_CACHE_TRUSTED_QUEUES)", doc.executor.queue));
    }
    let auth = crate::git::GitAuth {
        token: ctx.job.token.clone(),
        job_id: ctx.job.id,
        executor_name: ctx.client.executor_name().to_string(),
        secret: Some(ctx.settings.password.clone()),
    };
    let tip = crate::git::default_branch_tip(
        ctx.client.base_url(),
        &ctx.job.repository_name,
        &auth,
        ctx.settings.frontend_ca.as_deref(),
        ctx.settings.git_timeout.min(Duration::from_secs(30)),
    );
    match tip {
        Ok(Some(tip)) if tip == ctx.job.commit => {
            (true, "the commit is the tip of the default branch".into())
        }
        Ok(Some(_)) => (false, "the commit is not the tip of the repository's default branch".into()),
        Ok(None) => (false, "the coordinator names no default branch".into()),
        Err(e) => (false, format!("the default branch is unknown ({})", ctx.redact(&format!("{e:#}")))),
    }
}

/// The lookups of a job's caches, before they are attached: what the document will record and
/// what the runtime is asked to attach.
pub(crate) struct Looked {
    /// `setup.cache`, while open.
    entry: Option<LogEntry>,
    records: Vec<CacheRecord>,
    mounts: Vec<CacheMount>,
    /// A microVM job's: the read-only disks of the versions it hit, for its boot, and the lease
    /// holder that keeps them until its VM exists.
    pub(crate) disks: Vec<PathBuf>,
    holder: Option<String>,
}

/// Opens `setup.cache` and looks the job's caches up (`None`: the job has none). A declaration
/// the job got wrong fails the job.
fn look_up(ctx: &JobCtx, doc: &RunDocument) -> Result<Option<Looked>> {
    if ctx.settings.caches == Some(false) || !doc.caches.is_empty() {
        return Ok(None);
    }
    let rules = load_rules(ctx)?;
    if !rules::any(&ctx.job, &rules) {
        return Ok(None);
    }
    let Some(ws) = doc.workspace.as_ref().map(|w| w.path.clone()) else { return Ok(None) };
    let mut entry = ctx.logger.entry("setup.cache", None)?;
    let images = crate::image::ImageStore::open(&ctx.settings.runtime_options().images_dir()).ok();
    let digest = |r: &str| {
        images
            .as_ref()
            .and_then(|s| s.resolve(r).ok())
            .map_or_else(|| format!("unresolved {r}"), |i| i.digest)
    };
    let specs = match rules::specs(&ctx.job, &rules, &ws, &digest) {
        Ok(s) => s,
        Err(e) => {
            entry.line(&format!("error: {}", ctx.redact(&format!("{e:#}"))));
            let _ = entry.finish(1);
            return Err(e.context("the job's cache declarations"));
        }
    };
    let (trusted, why) = trust(ctx, doc);
    let store = store(ctx);
    let mut mounts = Vec::new();
    let mut records = Vec::new();
    for spec in &specs {
        // The cache's overlay would hide what the repository has at a path of the workspace.
        if let Some((p, what)) = spec.paths.iter().find_map(|p| in_clone(&ws, p).map(|w| (p, w))) {
            entry.line(&format!(
                "cache {} key {}: not used: the repository has {what} at {p}, which the cache would hide",
                spec.prefix, spec.key
            ));
            continue;
        }
        let (version, miss) = match store.lookup(&spec.key) {
            Lookup::Hit { version, bytes } => {
                entry.line(&format!(
                    "cache {} key {}: hit, {} ({})",
                    spec.prefix,
                    spec.key,
                    format_bytes(bytes),
                    version.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
                ));
                (Some(version), String::new())
            }
            Lookup::Miss { why } => {
                entry.line(&format!("cache {} key {}: miss ({why})", spec.prefix, spec.key));
                (None, why)
            }
        };
        for m in &spec.made_of {
            entry.line(&format!("  key made of {}", ctx.redact(m)));
        }
        for (i, p) in spec.paths.iter().enumerate() {
            let lower = version.as_ref().map(|v| v.join("tree").join(format!("p{i}"))).filter(|t| t.is_dir());
            mounts.push(CacheMount { target: p.clone(), lower, workspace: ws.clone() });
        }
        records.push(CacheRecord {
            key: spec.key.clone(),
            repository: spec.repository.clone(),
            prefix: spec.prefix.clone(),
            paths: spec.paths.clone(),
            version,
            miss,
            uppers: Vec::new(),
            uid_base: 0,
            whiteout_files: false,
            trusted,
            trust: why.clone(),
            saved: None,
        });
    }
    if records.is_empty() {
        // Every cache was left out (the entry says why): the job has none.
        let _ = entry.finish(0);
        return Ok(None);
    }
    Ok(Some(Looked { entry: Some(entry), records, mounts, disks: Vec::new(), holder: None }))
}

/// What the clone put at a cache path relative to the workspace `ws` (`None`: nothing, or an
/// empty directory; absolute paths are the image's). Resolved beneath `ws` without following a
/// symlink: one on the way is something the repository has there too.
fn in_clone(ws: &std::path::Path, rel: &str) -> Option<String> {
    if rel.starts_with('/') {
        return None;
    }
    let ws = match crate::base::fs::Beneath::open(ws) {
        Ok(b) => b,
        Err(e) => return Some(format!("a workspace that cannot be read ({e:#})")),
    };
    let rel = std::path::Path::new(rel);
    match ws.lstat(rel) {
        Ok(m) if m.is_symlink() => Some("a symlink".to_string()),
        Ok(m) if !m.is_dir() => Some("a file".to_string()),
        Ok(_) => match ws.list(rel) {
            Ok(entries) => (!entries.is_empty()).then(|| "files".to_string()),
            Err(e) => Some(format!("a directory that cannot be read ({e})")),
        },
        Err(e) => match e.raw_os_error() {
            Some(libc::ENOENT) => None,
            Some(libc::ENOTDIR) => Some("a file".to_string()),
            Some(libc::ELOOP | libc::EXDEV) => Some("a symlink".to_string()),
            _ => Some(format!("something that cannot be opened ({e})")),
        },
    }
}

/// `setup.cache`: attaches the job's caches to `sandbox` and records them in `doc`. A cache
/// that cannot be attached costs only itself: the job runs without it, and the entry says why.
/// A declaration the job got wrong fails the job. A runtime that takes them as disks at its
/// boot has them attached by `vm-boot` ([`before_boot`]).
pub(crate) fn setup(
    ctx: &JobCtx,
    doc: &mut RunDocument,
    runtime: &dyn Runtime,
    sandbox: &mut SandboxRecord,
) -> Result<()> {
    if runtime.cache_disks_at_boot() {
        return Ok(());
    }
    let Some(looked) = look_up(ctx, doc)? else { return Ok(()) };
    let versions: Vec<_> = looked.records.iter().filter_map(|r| r.version.clone()).collect();
    store(ctx).lease(&sandbox.name, &versions)?;
    attach(ctx, doc, runtime, sandbox, looked)
}

/// `setup.cache` of a runtime that takes the caches a job hits as read-only disks at its boot
/// ([`Runtime::cache_disks_at_boot`]): the lookups, a lease until the sandbox exists, and each
/// hit version's disk, made now if it was never made (that costs this job a copy of the cache,
/// once per version, and the entry says so). [`after_boot`] attaches them (`setup.cache.attach`).
/// A declaration the job got wrong fails the job.
pub(crate) fn before_boot(ctx: &JobCtx, doc: &RunDocument, runtime: &dyn Runtime) -> Result<Option<Looked>> {
    let Some(mut looked) = look_up(ctx, doc)? else { return Ok(None) };
    let Some(mut entry) = looked.entry.take() else { return Ok(None) };
    let store = store(ctx);
    let uid: String = doc
        .job
        .uid
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' })
        .collect();
    let holder = format!("{}{uid}", crate::cache::BOOT_LEASE_PREFIX);
    let versions: Vec<_> = looked.records.iter().filter_map(|r| r.version.clone()).collect();
    store.lease(&holder, &versions)?;
    looked.holder = Some(holder);
    let mut first = 0;
    for r in &mut looked.records {
        let n = r.paths.len();
        let Some(version) = r.version.clone() else {
            first += n;
            continue;
        };
        match crate::cache::vm_disk(&version, &|t, s, o| runtime.make_cache_disk(t, s, o)) {
            Ok((disk, built)) => {
                if let Some(t) = built {
                    entry.line(&format!(
                        "cache {} key {}: made the version's read-only disk in {} ms (once per version)",
                        r.prefix,
                        r.key,
                        t.as_millis()
                    ));
                }
                looked.disks.push(disk);
            }
            Err(e) => {
                // This cache costs only itself: the job runs without its version.
                entry.line(&format!(
                    "cache {} key {}: its version's disk could not be made, the job runs without it: {}",
                    r.prefix,
                    r.key,
                    ctx.redact(&format!("{e:#}"))
                ));
                r.version = None;
                r.miss = "its microVM disk could not be made".into();
                for m in &mut looked.mounts[first..first + n] {
                    m.lower = None;
                }
            }
        }
        first += n;
    }
    entry.line(&if looked.disks.is_empty() {
        "nothing hit: no cache disk, the job may take a VM booted ahead".to_string()
    } else {
        format!(
            "{} read-only cache disks for the VM's boot (a VM of its own: no VM booted ahead has them)",
            looked.disks.len()
        )
    });
    let _ = entry.finish(0);
    Ok(Some(looked))
}

/// The end of [`before_boot`] once the sandbox is up: its own lease replaces the job's, and the
/// caches are attached.
pub(crate) fn after_boot(
    ctx: &JobCtx,
    doc: &mut RunDocument,
    runtime: &dyn Runtime,
    looked: Looked,
) -> Result<()> {
    let Some(mut sandbox) = doc.sandbox.clone() else { return Ok(()) };
    let store = store(ctx);
    let versions: Vec<_> = looked.records.iter().filter_map(|r| r.version.clone()).collect();
    store.lease(&sandbox.name, &versions)?;
    if let Some(h) = &looked.holder {
        let _ = store.release(h);
    }
    attach(ctx, doc, runtime, &mut sandbox, looked)
}

/// The end of [`before_boot`] when no sandbox came to be.
pub(crate) fn boot_failed(ctx: &JobCtx, looked: Looked) {
    if let Some(h) = &looked.holder {
        let _ = store(ctx).release(h);
    }
}

/// Has the runtime attach what was looked up, records it in `doc` and closes `setup.cache` (or,
/// after a boot with cache disks, `setup.cache.attach`).
fn attach(
    ctx: &JobCtx,
    doc: &mut RunDocument,
    runtime: &dyn Runtime,
    sandbox: &mut SandboxRecord,
    looked: Looked,
) -> Result<()> {
    let Looked { entry, mut records, mounts, .. } = looked;
    let mut entry = match entry {
        Some(e) => e,
        None => ctx.logger.entry("setup.cache.attach", None)?,
    };
    let store = store(ctx);
    let before = sandbox.clone();
    let started = Instant::now();
    match runtime.attach_caches(sandbox, &mounts) {
        Ok(attached) => {
            let mut it = attached.into_iter();
            for r in &mut records {
                for _ in &r.paths {
                    if let Some(a) = it.next() {
                        r.uppers.push(a.upper);
                        r.uid_base = a.uid_base;
                        r.whiteout_files = a.whiteout_files;
                    }
                }
            }
            entry.line(&format!(
                "attached {} paths of {} caches in {:.1} ms",
                mounts.len(),
                records.len(),
                started.elapsed().as_secs_f64() * 1000.0
            ));
            if runtime.cache_disks_at_boot() {
                entry.line("the guest mounts each overlay at the first step");
            }
            let (trusted, why) = records.first().map(|r| (r.trusted, r.trust.clone())).unwrap_or_default();
            entry.line(&format!(
                "{} ({why})",
                if trusted {
                    "a successful end saves what the job writes to them"
                } else {
                    "read only: this job never saves them"
                }
            ));
            doc.caches = records;
            doc.sandbox = Some(sandbox.clone());
            entry.finish(0)
        }
        Err(e) => {
            entry.line(&format!(
                "caches not attached, the job runs without them: {}",
                ctx.redact(&format!("{e:#}"))
            ));
            // The steps get none of what was attached before the failure; the teardown removes
            // it with the rest of the sandbox's mounts.
            *sandbox = before;
            let _ = store.release(&sandbox.name);
            entry.finish(0)
        }
    }
}

/// Before the sandbox goes: brings what the steps wrote to the caches a successful, trusted
/// job saves into the host workspace (the microVM's layers live in its guest). Returns why it
/// could not, for `teardown.cache` to say.
pub(crate) fn fetch_layers(ctx: &JobCtx, doc: &RunDocument) -> Option<String> {
    let saves = doc.outcome.is_none() && doc.caches.iter().any(|c| c.trusted && c.saved.is_none());
    let (Some(sb), Some(ws), true) = (&doc.sandbox, &doc.workspace, saves) else { return None };
    let res = ctx.runtime(doc).and_then(|rt| rt.fetch_cache_layers(sb, &ws.path));
    res.err().map(|e| ctx.redact(&format!("bringing its layer back from the sandbox: {e:#}")))
}

/// `teardown.cache`: after the sandbox is gone, saves the caches of a trusted job that
/// succeeded, says why not otherwise, and gives back the lease. Runs once per document.
pub(crate) fn teardown(
    ctx: &JobCtx,
    doc: &mut RunDocument,
    sandbox_removed: bool,
    unfetched: Option<String>,
) {
    if doc.caches.iter().all(|c| c.saved.is_some()) {
        return;
    }
    let Ok(mut entry) = ctx.logger.entry("teardown.cache", None) else { return };
    let store = store(ctx);
    let job = doc.job.uid.clone();
    // A runtime that boots with cache disks gets a saved version's disk made now, off the next
    // job's path.
    let disks = ctx.runtime(doc).ok().filter(|rt| rt.cache_disks_at_boot());
    for c in doc.caches.iter_mut().filter(|c| c.saved.is_none()) {
        let not = if doc.outcome.is_some() {
            Some("the job did not succeed".to_string())
        } else if !c.trusted {
            Some(format!("the job is not trusted: {}", c.trust))
        } else if !sandbox_removed {
            Some("the sandbox was not torn down".to_string())
        } else if c.uppers.len() != c.paths.len() {
            Some("it was not attached".to_string())
        } else {
            unfetched.clone()
        };
        let said = match not {
            Some(why) => format!("not saved: {why}"),
            None => {
                let spec = CacheSpec {
                    key: c.key.clone(),
                    repository: c.repository.clone(),
                    prefix: c.prefix.clone(),
                    paths: c.paths.clone(),
                    made_of: Vec::new(),
                };
                let started = Instant::now();
                let promoted =
                    store.promote(&spec, c.version.as_deref(), &c.uppers, c.uid_base, c.whiteout_files, &job);
                match promoted {
                    Ok(Some(bytes)) => format!(
                        "saved a new version, {} in {} ms{}",
                        format_bytes(bytes),
                        started.elapsed().as_millis(),
                        match &disks {
                            Some(rt) => vm_disk(&store, &c.key, &**rt),
                            None => String::new(),
                        }
                    ),
                    Ok(None) => "not saved: the job changed nothing in it".to_string(),
                    Err(e) => format!("not saved: {}", ctx.redact(&format!("{e:#}"))),
                }
            }
        };
        entry.line(&format!("cache {} key {}: {said}", c.prefix, c.key));
        c.saved = Some(said);
    }
    if let Some(sb) = &doc.sandbox {
        if let Err(e) = store.release(&sb.name) {
            entry.line(&format!("error: giving back the lease: {e:#}"));
        }
    }
    if ctx.settings.cache_bytes > 0 {
        let sandboxes = ctx.settings.runtime_options().sandboxes_dir();
        match store.prune(ctx.settings.cache_bytes, false, |s| !sandboxes.join(s).exists()) {
            Ok(gone) => {
                for g in gone {
                    entry.line(&format!("evicted {} {} ({})", g.version, format_bytes(g.bytes), g.why));
                }
            }
            Err(e) => entry.line(&format!("error: evicting: {e:#}")),
        }
    }
    let _ = entry.finish(0);
}

/// Makes the microVM disk of the version a microVM job just saved, so that the next job of the
/// key does not make it on its path; says how it went.
fn vm_disk(store: &CacheStore, key: &str, runtime: &dyn Runtime) -> String {
    let Lookup::Hit { version, .. } = store.lookup(key) else { return String::new() };
    match crate::cache::vm_disk(&version, &|t, s, o| runtime.make_cache_disk(t, s, o)) {
        Ok((_, Some(t))) => format!(", its microVM disk made in {} ms", t.as_millis()),
        Ok((_, None)) => String::new(),
        Err(e) => format!(", its microVM disk not made ({e:#}): the next job makes it"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(prefix: &str, hit: bool) -> CacheRecord {
        let mut v = serde_json::json!({"key": "k", "repository": "r", "prefix": prefix, "paths": ["p"],
            "trusted": false, "trust": ""});
        if hit {
            v["version"] = serde_json::json!("/state/caches/v-1");
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_cache_path_where_the_clone_has_something_is_not_used() {
        let ws = tempfile::tempdir().unwrap();
        let p = ws.path();
        std::fs::create_dir_all(p.join("empty")).unwrap();
        std::fs::create_dir_all(p.join("vendor/lib")).unwrap();
        std::fs::write(p.join("vendor/lib/a.js"), "a").unwrap();
        std::fs::write(p.join("file"), "f").unwrap();
        std::os::unix::fs::symlink("/etc", p.join("link")).unwrap();
        std::os::unix::fs::symlink("vendor", p.join("dirlink")).unwrap();
        assert_eq!(in_clone(p, "/root/.npm"), None, "absolute paths are the image's");
        assert_eq!(in_clone(p, "node_modules"), None);
        assert_eq!(in_clone(p, "a/b/node_modules"), None);
        assert_eq!(in_clone(p, "empty"), None);
        assert_eq!(in_clone(p, "vendor").as_deref(), Some("files"));
        assert_eq!(in_clone(p, "vendor/lib").as_deref(), Some("files"));
        assert_eq!(in_clone(p, "file").as_deref(), Some("a file"));
        assert_eq!(in_clone(p, "file/x").as_deref(), Some("a file"));
        assert_eq!(in_clone(p, "link").as_deref(), Some("a symlink"));
        assert_eq!(in_clone(p, "dirlink/lib").as_deref(), Some("a symlink"));
    }

    #[test]
    fn steps_are_told_which_caches_hit() {
        assert!(step_env(&[]).is_empty(), "a job without caches gets nothing");
        assert_eq!(
            step_env(&[record("npm", true), record("go-mod", false)]),
            ["EXECUTOR_CACHE_HIT_NPM=true", "EXECUTOR_CACHE_HIT_GO_MOD=false", "EXECUTOR_CACHE_HIT=false"]
        );
        assert_eq!(
            step_env(&[record("pip", true)]),
            ["EXECUTOR_CACHE_HIT_PIP=true", "EXECUTOR_CACHE_HIT=true"]
        );
    }
}
