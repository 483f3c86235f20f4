//! `prepare-workspace`: creates the job's workspace, clones its repository (where the job names
//! one) and writes its files and one script per step.

use anyhow::{Context, Result};

use super::JobCtx;
use crate::document::{FailureKind, RunDocument, WorkspaceRecord};
use crate::workspace;

pub(crate) fn run(ctx: &JobCtx, doc: &mut RunDocument) -> Result<()> {
    match create(ctx, doc)? {
        Some(created) => fill(ctx, doc, created),
        None => Ok(()),
    }
}

/// A workspace made by [`create`], to be filled by [`fill`].
pub(crate) struct Created {
    path: std::path::PathBuf,
    key: Option<workspace::template::Key>,
    from: Option<workspace::template::Meta>,
    disk_bytes: u64,
}

impl Created {
    /// Whether [`fill`] may store the workspace's disk as its repository's template (it did not
    /// start from one): nothing but the clone may write to the workspace until it has.
    pub(crate) fn may_make_template(&self) -> bool {
        self.key.is_some() && self.from.is_none() && self.disk_bytes > 0
    }
}

/// Makes the job's workspace (its disk mounted, a template's copy when there is one) and records
/// it in the document; `None` when the document's workspace already exists.
pub(crate) fn create(ctx: &JobCtx, doc: &mut RunDocument) -> Result<Option<Created>> {
    if let Some(ws) = &doc.workspace {
        if ws.path.exists() {
            // Already prepared (the stage ran twice on this document): nothing to redo.
            return Ok(None);
        }
    }
    if !ctx.job.cli_steps.is_empty() {
        // A runtime with no container engine in its sandbox fails the job at once, saying what
        // helps; one that has it says what it will use.
        let checked = ctx.runtime(doc).and_then(|rt| rt.cli_steps());
        let entry = ctx.logger.entry("setup.cli-steps", None).ok();
        match checked {
            Ok(lines) => {
                if let Some(mut entry) = entry {
                    for l in lines {
                        entry.line(&l);
                    }
                    let _ = entry.finish(0);
                }
            }
            Err(e) => {
                let message = format!("job {} has cliSteps: {e:#}", ctx.job.id);
                if let Some(mut entry) = entry {
                    entry.line(&message);
                    let _ = entry.finish(1);
                }
                return Err(super::StageFailure { kind: FailureKind::Failed, message }.into());
            }
        }
    }
    let owner = workspace::Owner {
        executor: doc.executor.name.clone(),
        job_uid: doc.job.uid.clone(),
        deadline: doc.deadline,
        sandbox: None,
        lifetime_lock: false,
    };
    let disk_bytes = ctx.settings.limits().disk_bytes;
    let templates = ctx.settings.templates();
    let key = templates.key(ctx.client.base_url(), &ctx.job, disk_bytes);
    let (path, _cap, from) = workspace::create_for_job_from(
        &ctx.settings.workspaces_dir(),
        &owner,
        disk_bytes,
        &ctx.logger,
        key.as_ref().map(|k| (&templates, k)),
    )?;
    // Recorded before anything can fail, so that `complete` removes it whatever happens next.
    doc.workspace = Some(WorkspaceRecord {
        path: path.clone(),
        scripts: Vec::new(),
        repository_cloned: false,
        startup_script: None,
    });
    Ok(Some(Created { path, key, from, disk_bytes }))
}

/// Clones the repository into the workspace [`create`] made and writes the job's files and
/// scripts.
pub(crate) fn fill(ctx: &JobCtx, doc: &mut RunDocument, created: Created) -> Result<()> {
    let Created { path, key, from, disk_bytes } = created;
    let templates = ctx.settings.templates();
    let cx = workspace::CloneContext {
        frontend_url: ctx.client.base_url(),
        executor_name: ctx.client.executor_name(),
        secret: Some(&ctx.settings.password),
        ca_file: ctx.settings.frontend_ca.as_deref(),
        cache_dir: Some(ctx.settings.state_dir.join("cache").join("git")),
        max_bytes: ctx.settings.limits().disk_bytes,
        git_timeout: ctx.settings.git_timeout,
        cancel: Some(&ctx.cancel),
    };
    let cloning = !ctx.job.repository_name.is_empty();
    let span = if cloning { crate::base::trace::span("clone") } else { crate::base::trace::Span::none() };
    if span.recording() {
        // Whether the clone starts from the repository's workspace template, and whether the
        // object cache already holds the repository.
        let template = match (&key, &from) {
            (Some(_), Some(_)) => "hit",
            (Some(_), None) => "miss",
            (None, _) => "off",
        };
        span.set("executor.clone.template", template);
        let cached = cx.cache_dir.clone().map(crate::git::ObjectCache::new).map(|c| {
            if c.exists(cx.frontend_url, &ctx.job.repository_name) {
                "hit"
            } else {
                "miss"
            }
        });
        span.set("executor.clone.cache", cached.unwrap_or("off"));
    }
    let template =
        key.as_ref().map(|key| workspace::TemplateUse { templates: &templates, key, from, disk_bytes });
    let cloned = workspace::clone_repository_with(&ctx.job, &path, &ctx.logger, &cx, template)?;
    drop(span);
    // A fetch in flight is abandoned at a cancel or the deadline (ureq cannot be interrupted
    // mid-read): the job moves on within 100 ms, the request ends at its own timeout.
    let fetch = |bucket: &str, key: &str| -> Result<Vec<u8>> {
        let (client, auth, bucket, key) =
            (ctx.client.clone(), ctx.auth.clone(), bucket.to_string(), key.to_string());
        ctx.cancel.run_abandonable("file-fetch", move || {
            client.fetch_file(&auth, &bucket, &key).map_err(|e| anyhow::anyhow!("{e}"))
        })
    };
    let scripts = workspace::write_files_and_scripts(&ctx.job, &path, &ctx.logger, &fetch)?;
    let startup_script = match &ctx.settings.vm_startup_script {
        Some(host) => Some(copy_startup_script(host, &path)?),
        None => None,
    };
    doc.workspace = Some(WorkspaceRecord { path, scripts, repository_cloned: cloned, startup_script });
    Ok(())
}

/// Largest startup script copied into a workspace.
const MAX_STARTUP_SCRIPT: u64 = 1 << 20;

/// Copies the operator's startup script into the workspace's scripts directory.
fn copy_startup_script(host: &std::path::Path, ws: &std::path::Path) -> Result<String> {
    use std::io::Read;
    let mut body = Vec::new();
    std::fs::File::open(host)
        .and_then(|f| f.take(MAX_STARTUP_SCRIPT + 1).read_to_end(&mut body))
        .with_context(|| format!("reading the startup script {}", host.display()))?;
    if body.len() as u64 > MAX_STARTUP_SCRIPT {
        anyhow::bail!("the startup script {} is larger than 1 MiB", host.display());
    }
    let rel = format!("{}/startup-script.sh", workspace::scripts::SCRIPTS_DIR);
    crate::base::fs::ensure_parent(ws, &rel)?;
    crate::base::fs::write_file(ws, &rel, &body, 0o755)?;
    Ok(rel)
}
