//! `vm-boot`: starts the job's sandbox with the runtime the document names and records it.

use anyhow::{Context, Result};

use super::{Incomplete, JobCtx};
use crate::document::RunDocument;
use crate::sandbox::BootRequest;

pub fn run(ctx: &JobCtx, doc: &mut RunDocument) -> Result<()> {
    let ws = doc.workspace.as_ref().ok_or_else(|| {
        Incomplete("the run document has no workspace: run `executor prepare-workspace` first".into())
    })?;
    if doc.sandbox.is_some() {
        return Ok(());
    }
    let runtime = ctx.runtime(doc)?;
    let mut entry = ctx.logger.entry(&format!("setup.{}.start", runtime.name()), None)?;
    let mut images: Vec<String> = Vec::new();
    for s in &ctx.job.docker_steps {
        if !images.contains(&s.image) {
            images.push(s.image.clone());
        }
    }
    let limits = ctx.settings.limits();
    let req = BootRequest {
        job_uid: &doc.job.uid,
        workspace: &ws.path,
        images,
        limits: &limits,
        name_prefix: &ctx.settings.vm_prefix,
        coordinator: Some(&doc.executor.frontend_url),
    };
    if runtime.kind() == crate::sandbox::RuntimeKind::Shell {
        entry.line(crate::sandbox::shell::WARNING);
    }
    // Held until the owner record names the new sandbox, so no janitor pass sees it unclaimed.
    let _janitor = crate::workspace::janitor_lock(&ctx.settings.state_dir, false)?;
    let started = std::time::Instant::now();
    let booted = runtime.boot(&req).with_context(|| format!("starting the {} sandbox", runtime.name()));
    crate::api::metrics::registry().observe(
        crate::api::metrics::BOOT_SECONDS,
        &[runtime.name(), if booted.is_ok() { "success" } else { "failure" }],
        started.elapsed().as_secs_f64(),
    );
    match booted {
        Ok(record) => {
            entry.line(&format!("started sandbox {}", record.name));
            let _ = entry.finish(0);
            if let Some(mut owner) = crate::workspace::read_owner(&ws.path) {
                owner.sandbox = Some(record.name.clone());
                crate::workspace::write_owner(&ws.path, &owner)?;
            }
            doc.sandbox = Some(record);
            Ok(())
        }
        Err(e) => {
            entry.line(&format!("error: {}", ctx.redact(&format!("{e:#}"))));
            let _ = entry.finish(1);
            Err(e)
        }
    }
}
