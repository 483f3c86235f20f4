//! A job's dependency caches (docs/caches.md), on both ends of its steps: `setup.cache` (in
//! `run-steps`, before the first step) computes each cache's key from the workspace as cloned,
//! looks the key up, leases what it found and has the runtime attach it; `teardown.cache` (in
//! `complete`, once the sandbox is gone and before the workspace is) promotes what a trusted,
//! successful job wrote to a new version, evicts beyond the budget and gives the lease back.

use anyhow::Result;
use std::time::{Duration, Instant};

use super::JobCtx;
use crate::base::units::format_bytes;
use crate::cache::rules::{self, CacheRules, CacheSpec};
use crate::cache::{CacheStore, Lookup};
use crate::document::{CacheRecord, RunDocument};
use crate::sandbox::{CacheMount, Runtime, SandboxRecord};

fn load_rules(ctx: &JobCtx) -> Result<CacheRules> {
    CacheRules::load(ctx.settings.cache_rules.as_deref())
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

/// `setup.cache`: attaches the job's caches to `sandbox` and records them in `doc`. A cache
/// that cannot be attached costs only itself: the job runs without it, and the entry says why.
/// A declaration the job got wrong fails the job.
pub(crate) fn setup(
    ctx: &JobCtx,
    doc: &mut RunDocument,
    runtime: &dyn Runtime,
    sandbox: &mut SandboxRecord,
) -> Result<()> {
    if ctx.settings.caches == Some(false) || !doc.caches.is_empty() {
        return Ok(());
    }
    let rules = load_rules(ctx)?;
    if !rules::any(&ctx.job, &rules) {
        return Ok(());
    }
    let Some(ws) = doc.workspace.as_ref().map(|w| w.path.clone()) else { return Ok(()) };
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
            mounts.push(CacheMount { target: p.clone(), lower });
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
            trusted,
            trust: why.clone(),
            saved: None,
        });
    }
    let versions: Vec<_> = records.iter().filter_map(|r| r.version.clone()).collect();
    store.lease(&sandbox.name, &versions)?;
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
                    }
                }
            }
            entry.line(&format!(
                "attached {} paths of {} caches in {:.1} ms",
                mounts.len(),
                records.len(),
                started.elapsed().as_secs_f64() * 1000.0
            ));
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

/// `teardown.cache`: after the sandbox is gone, saves the caches of a trusted job that
/// succeeded, says why not otherwise, and gives back the lease. Runs once per document.
pub(crate) fn teardown(ctx: &JobCtx, doc: &mut RunDocument, sandbox_removed: bool) {
    if doc.caches.iter().all(|c| c.saved.is_some()) {
        return;
    }
    let Ok(mut entry) = ctx.logger.entry("teardown.cache", None) else { return };
    let store = store(ctx);
    let job = doc.job.uid.clone();
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
            None
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
                match store.promote(&spec, c.version.as_deref(), &c.uppers, c.uid_base, &job) {
                    Ok(Some(bytes)) => format!(
                        "saved a new version, {} in {} ms",
                        format_bytes(bytes),
                        started.elapsed().as_millis()
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
