//! `vm-boot`: pulls the job's images the store lacks (`EXECUTOR_IMAGE_PULL`), then starts the
//! job's sandbox with the runtime the document names and records it.

use anyhow::{Context, Result};
use std::sync::Arc;

use super::{Incomplete, JobCtx};
use crate::document::RunDocument;
use crate::sandbox::{BootRequest, WarmClaim};

/// The runtime that boots the job's sandbox: the executor's, or one whose network is bounded
/// by the job's own `networkAllowHosts` (our coordinator's extension), which narrows and never
/// widens: an `allowlist` executor keeps the job's names its own list covers, an `internet`
/// one gives the job only its names, a `none` one ignores them. Lines for the log entry say
/// what was left out.
fn runtime_for_job(
    ctx: &JobCtx,
    doc: &RunDocument,
) -> Result<(std::sync::Arc<dyn crate::sandbox::Runtime>, Vec<String>)> {
    use crate::network::{hosts, Mode};
    let Some(list) = ctx.job.network_allow_hosts.as_deref() else { return Ok((ctx.runtime(doc)?, vec![])) };
    let mut opts = ctx.settings.runtime_options();
    let mut notes = Vec::new();
    match opts.network.mode {
        Mode::None => {
            notes.push(
                "the job's networkAllowHosts is ignored: EXECUTOR_NETWORK=none gives it no network".into(),
            );
            return Ok((ctx.runtime(doc)?, notes));
        }
        Mode::Internet => {
            let mut rules = Vec::new();
            for raw in list {
                match hosts::HostRule::parse(raw) {
                    Ok(r) => rules.push(r),
                    Err(e) => notes.push(format!("network: left out {e:#}")),
                }
            }
            opts.network.mode = Mode::Allowlist;
            opts.network.hosts = rules;
        }
        Mode::Allowlist => {
            let (kept, refused) = hosts::narrow(&opts.network.hosts, Some(list));
            for r in refused {
                notes.push(format!("network: left out {r}"));
            }
            opts.network.hosts = kept;
        }
    }
    notes.push(format!(
        "network: allowlist of this job: {}",
        opts.network.hosts.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ")
    ));
    Ok((std::sync::Arc::from(crate::sandbox::open(doc.executor.runtime, &opts)?), notes))
}

pub(crate) fn run(ctx: &JobCtx, doc: &mut RunDocument) -> Result<()> {
    if doc.workspace.is_none() {
        return Err(Incomplete(
            "the run document has no workspace: run `executor prepare-workspace` first".into(),
        )
        .into());
    }
    if doc.sandbox.is_some() {
        return Ok(());
    }
    let mut images: Vec<String> = Vec::new();
    for s in &ctx.job.docker_steps {
        if !images.contains(&s.image) {
            images.push(s.image.clone());
        }
    }
    let cli = !ctx.job.cli_steps.is_empty();
    if cli {
        // What `src batch exec` will run through the guest's engine, pulled here like any image.
        let ws = doc.workspace.as_ref().map(|w| w.path.clone()).unwrap_or_default();
        for i in super::cli_steps::step_images(&ctx.job, &ws)? {
            if !images.contains(&i) {
                images.push(i);
            }
        }
    }
    pull_images(ctx, doc, &images)?;
    let (runtime, net_notes) = runtime_for_job(ctx, doc)?;
    // The caches a job hits come to a microVM as disks at its boot: looked up first.
    let caches = if runtime.cache_disks_at_boot() && !cli {
        super::cache::before_boot(ctx, doc, &*runtime)?
    } else {
        None
    };
    let disks = caches.as_ref().map(|c| c.disks.clone()).unwrap_or_default();
    let ws = doc.workspace.as_ref().ok_or_else(|| Incomplete("the run document has no workspace".into()))?;
    let mut entry = ctx.logger.entry(&format!("setup.{}.start", runtime.name()), None)?;
    for note in &net_notes {
        entry.line(&ctx.redact(note));
    }
    let limits = ctx.settings.limits();
    // A sandbox of the shell runtime is the host: it reaches what the host reaches.
    let endpoints = if runtime.kind() == crate::sandbox::RuntimeKind::Shell {
        super::endpoints::Endpoints::default()
    } else {
        super::endpoints::plan(&ctx.job, ctx.settings.network.mode, &doc.executor.frontend_url)
    };
    for note in &endpoints.notes {
        entry.line(&ctx.redact(note));
    }
    let req = BootRequest {
        job_uid: &doc.job.uid,
        workspace: &ws.path,
        images,
        limits: &limits,
        name_prefix: &ctx.settings.vm_prefix,
        coordinator: Some(&doc.executor.frontend_url),
        endpoints: &endpoints.allow,
    };
    if let Some(warning) = runtime.boot_warning() {
        entry.line(warning);
    }
    // Held until the owner record names the new sandbox, so no janitor pass sees it unclaimed.
    let _janitor = crate::workspace::janitor_lock(&ctx.settings.state_dir, false)?;
    let started = std::time::Instant::now();
    // A cliSteps VM carries the engine's disks, which no VM booted ahead has; a job with its own
    // allowed hosts needs its own resolver's list, which no VM booted ahead has either. The
    // disks of the caches a job hit are the pool's to match (its next VMs carry them).
    let own_hosts = ctx.job.network_allow_hosts.is_some();
    let warm = ctx.warm_pool.as_ref().filter(|p| p.runtime() == runtime.kind() && !cli && !own_hosts);
    let claim = |p: &Arc<dyn crate::sandbox::WarmPool>| {
        let span = crate::base::trace::span("pool-claim");
        let claim = p.take(&req, &disks);
        span.set("executor.pool.hit", matches!(claim, WarmClaim::Hit { .. }));
        claim
    };
    let boot = || crate::base::trace::span("boot");
    let booted = match warm.map(claim) {
        Some(WarmClaim::Hit { record, note }) => {
            if let Some(note) = note {
                entry.line(&ctx.redact(&note));
            }
            Ok(*record)
        }
        Some(WarmClaim::Miss { note }) => {
            entry.line(&ctx.redact(&note));
            let _span = boot();
            if disks.is_empty() {
                runtime.boot(&req)
            } else {
                entry.line("booting a VM of its own with the disks of the caches the job hit");
                runtime.boot_with_cache_disks(&req, &disks)
            }
        }
        None if cli => {
            let _span = boot();
            runtime.boot_cli_steps(&req)
        }
        None => {
            let _span = boot();
            runtime.boot_with_cache_disks(&req, &disks)
        }
    }
    .with_context(|| format!("starting the {} sandbox", runtime.name()));
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
            match caches {
                Some(c) => super::cache::after_boot(ctx, doc, &*runtime, c),
                None => Ok(()),
            }
        }
        Err(e) => {
            entry.line(&format!("error: {}", ctx.redact(&format!("{e:#}"))));
            let _ = entry.finish(1);
            if let Some(c) = caches {
                super::cache::boot_failed(ctx, c);
            }
            Err(e)
        }
    }
}

/// Pulls the images the policy asks for, one log entry (`setup.image.pull`) for all of them, and
/// records each in the document. A runtime that runs no image ([`crate::sandbox::Runtime::runs_images`])
/// gets none pulled.
fn pull_images(ctx: &JobCtx, doc: &mut RunDocument, images: &[String]) -> Result<()> {
    use crate::image::pull::PullPolicy;
    let policy = ctx.settings.image_pull;
    if images.is_empty() || !ctx.runtime(doc)?.runs_images() {
        return Ok(());
    }
    let store = crate::image::ImageStore::open(&ctx.settings.state_dir.join("images"))?;
    // An image pulled with another job's credentials is this job's only once its registry
    // accepted this job's credentials for it: pulled again (the store keeps its layers).
    let private = |i: &String| store.is_private_reference(i);
    if policy == PullPolicy::Never {
        if let Some(i) = images.iter().find(|i| private(i)) {
            anyhow::bail!(
                "image {i} was pulled with another job's registry credentials: with EXECUTOR_IMAGE_PULL=never this job's access cannot be checked"
            );
        }
        return Ok(());
    }
    let wanted: Vec<&String> = images
        .iter()
        .filter(|i| policy == PullPolicy::Always || store.resolve(i).is_err() || private(i))
        .filter(|i| !doc.images.iter().any(|r| &r.reference == *i))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let mut entry = ctx.logger.entry("setup.image.pull", None)?;
    let result = (|| -> Result<()> {
        let mut opts = ctx.settings.pull.options(ctx.job.docker_auth_config.as_ref())?;
        opts.always = policy == PullPolicy::Always;
        opts.deadline = super::deadline_instant(doc);
        for image in wanted {
            entry.line(&format!("pulling {image}"));
            let span = crate::base::trace::span("image-pull");
            span.set("executor.image", image.clone());
            let pulled = crate::image::pull::pull(&store, image, &opts, &ctx.cancel)?;
            span.set("executor.image.bytes", pulled.bytes as i64);
            drop(span);
            entry.line(&format!(
                "pulled {image} as {} from {}: digest {}, {} downloaded in {}",
                pulled.reference,
                pulled.registry,
                pulled.digest,
                crate::base::units::format_bytes(pulled.bytes),
                crate::base::units::format_duration(pulled.elapsed)
            ));
            doc.images.push(crate::document::ImageRecord {
                reference: image.clone(),
                resolved: pulled.reference,
                digest: pulled.digest,
                bytes: pulled.bytes,
                millis: pulled.elapsed.as_millis() as u64,
            });
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            let _ = entry.finish(0);
            Ok(())
        }
        Err(e) => {
            entry.line(&format!("error: {}", ctx.redact(&format!("{e:#}"))));
            let _ = entry.finish(1);
            Err(e)
        }
    }
}
