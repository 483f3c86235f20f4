//! `prepare-workspace`: creates the job's workspace, clones its repository (where the job names
//! one) and writes its files and one script per step.

use anyhow::Result;

use super::JobCtx;
use crate::document::{RunDocument, WorkspaceRecord};
use crate::workspace;

pub fn run(ctx: &JobCtx, doc: &mut RunDocument) -> Result<()> {
    if let Some(ws) = &doc.workspace {
        if ws.path.exists() {
            // Already prepared (the stage ran twice on this document): nothing to redo.
            return Ok(());
        }
    }
    if !ctx.job.cli_steps.is_empty() {
        anyhow::bail!("job {} has cliSteps (src-cli steps), which this executor does not run", ctx.job.id);
    }
    let owner = workspace::Owner {
        executor: doc.executor.name.clone(),
        job_uid: doc.job.uid.clone(),
        deadline: doc.deadline,
        sandbox: None,
    };
    let (path, _cap) = workspace::create_for_job(
        &ctx.settings.workspaces_dir(),
        &owner,
        ctx.settings.limits().disk_bytes,
        &ctx.logger,
    )?;
    // Recorded before anything can fail, so that `complete` removes it whatever happens next.
    doc.workspace =
        Some(WorkspaceRecord { path: path.clone(), scripts: Vec::new(), repository_cloned: false });
    let cx = workspace::CloneContext {
        frontend_url: ctx.client.base_url(),
        executor_name: ctx.client.executor_name(),
        ca_file: ctx.settings.frontend_ca.as_deref(),
        cache_dir: Some(ctx.settings.state_dir.join("cache").join("git")),
        max_bytes: ctx.settings.limits().disk_bytes,
        git_timeout: ctx.settings.git_timeout,
    };
    let cloned = workspace::clone_repository(&ctx.job, &path, &ctx.logger, &cx)?;
    let fetch = |bucket: &str, key: &str| -> Result<Vec<u8>> {
        ctx.client.fetch_file(&ctx.auth, bucket, key).map_err(|e| anyhow::anyhow!("{e}"))
    };
    let scripts = workspace::write_files_and_scripts(&ctx.job, &path, &ctx.logger, &fetch)?;
    doc.workspace = Some(WorkspaceRecord { path, scripts, repository_cloned: cloned });
    Ok(())
}
