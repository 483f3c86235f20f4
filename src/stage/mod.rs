//! The pipeline stages, one file each, and what they share: the job's context (settings, client,
//! opened job, logger, cancel token) and [`run_stage`], which records a failure in the document
//! instead of losing it and makes later stages skip. `loop` and the subcommands both call these.

mod cache;
pub(crate) mod cli_steps;
pub(crate) mod complete;
pub(crate) mod dequeue;
pub(crate) mod endpoints;
pub(crate) mod keep;
pub(crate) mod prepare_workspace;
pub(crate) mod run_steps;
pub(crate) mod traced;
pub(crate) mod upload;
pub(crate) mod vm_boot;

#[cfg(test)]
mod tests;

use anyhow::{Context, Result};
use chrono::Utc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::{Client, JobAuth};
use crate::base::cancel::{Cancel, CancelReason};
use crate::base::redact::Redactor;
use crate::config::Settings;
use crate::document::{FailureKind, RunDocument, StageRecord};
use crate::logs::{CoordinatorLogs, JobLogger};
use crate::protocol::Job;

/// The stages after `dequeue`, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    PrepareWorkspace,
    VmBoot,
    RunSteps,
    Upload,
    Complete,
}

impl Stage {
    pub(crate) const ALL: [Stage; 5] =
        [Stage::PrepareWorkspace, Stage::VmBoot, Stage::RunSteps, Stage::Upload, Stage::Complete];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Stage::PrepareWorkspace => "prepare-workspace",
            Stage::VmBoot => "vm-boot",
            Stage::RunSteps => "run-steps",
            Stage::Upload => "upload",
            Stage::Complete => "complete",
        }
    }
}

/// A failure whose kind is not the default (errored).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct StageFailure {
    pub kind: FailureKind,
    pub message: String,
}

/// A document that lacks what a stage needs (stages run out of order): exit status 3, and the
/// job is left as it was.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Incomplete(pub String);

/// Everything a stage needs about one job.
pub(crate) struct JobCtx {
    pub settings: Arc<Settings>,
    pub client: Client,
    pub job: Job,
    pub auth: JobAuth,
    pub logger: JobLogger,
    pub cancel: Cancel,
    /// `loop`'s sandboxes booted ahead of demand (the runtime's, if it boots any), which
    /// `vm-boot` takes one from.
    pub warm_pool: Option<Arc<dyn crate::sandbox::WarmPool>>,
    /// The runtime the stages use instead of the document's (a test's fake).
    #[cfg(test)]
    pub fake_runtime: Option<Arc<dyn crate::sandbox::Runtime>>,
}

impl JobCtx {
    /// Opens the document's job with the shared secret and connects to its coordinator as the
    /// executor that dequeued it. `cancel` gets the document's deadline.
    pub(crate) fn new(settings: Arc<Settings>, doc: &RunDocument, cancel: Option<Cancel>) -> Result<JobCtx> {
        let job = doc.open_job(settings.password.expose()).map_err(|e| {
            crate::base::exit::ExitError::new(
                crate::base::exit::BAD_DOCUMENT,
                format!("the run document's job cannot be opened: {e:#}"),
            )
        })?;
        let client = settings
            .client(&doc.executor.frontend_url, &doc.executor.name)
            .with_context(|| format!("connecting to {}", doc.executor.frontend_url))?;
        let auth = JobAuth::for_job(&job, &doc.executor.queue);
        let redactor =
            Redactor::for_job_with_token(settings.password.expose(), &job.token, &job.redacted_values);
        let logger = JobLogger::new(
            Arc::new(CoordinatorLogs { client: client.clone(), job: auth.clone() }),
            redactor,
            doc.executor.log_append,
        );
        let cancel = cancel.unwrap_or_else(|| Cancel::with_deadline(deadline_instant(doc)));
        Ok(JobCtx {
            settings,
            client,
            job,
            auth,
            logger,
            cancel,
            warm_pool: None,
            #[cfg(test)]
            fake_runtime: None,
        })
    }

    pub(crate) fn redact(&self, s: &str) -> String {
        self.logger.redactor().redact_str(s)
    }

    /// The runtime that the document names.
    pub(crate) fn runtime(&self, doc: &RunDocument) -> Result<Arc<dyn crate::sandbox::Runtime>> {
        #[cfg(test)]
        if let Some(rt) = &self.fake_runtime {
            return Ok(rt.clone());
        }
        let kind = doc.sandbox.as_ref().map(|s| s.runtime).unwrap_or(doc.executor.runtime);
        crate::sandbox::open(kind, &self.settings.runtime_options()).map(Arc::from)
    }
}

/// The document's deadline as an `Instant`.
pub(crate) fn deadline_instant(doc: &RunDocument) -> Option<Instant> {
    doc.deadline.map(|d| {
        let left = (d - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        Instant::now() + left
    })
}

/// How a stage ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StageResult {
    Done,
    /// An earlier stage had failed; nothing was done.
    Skipped,
    /// This stage failed; the document says why.
    Failed,
}

/// Runs one stage on the document: skips when an earlier one failed, records a failure,
/// appends the stage to the history. `Err` only for [`Incomplete`] documents and for a
/// `complete` that could not reach the coordinator.
pub(crate) fn run_stage(stage: Stage, ctx: &JobCtx, doc: &mut RunDocument) -> Result<StageResult> {
    if stage != Stage::Complete && doc.failed() {
        return Ok(StageResult::Skipped);
    }
    let started_at = Utc::now();
    let span = crate::base::trace::span(stage.name());
    let res = match stage {
        Stage::PrepareWorkspace => prepare_workspace::run(ctx, doc),
        Stage::VmBoot => vm_boot::run(ctx, doc),
        // A legacy batch job's `src batch exec` comes after the docker steps, as the contract
        // orders them.
        Stage::RunSteps => run_steps::run(ctx, doc).and_then(|()| cli_steps::run(ctx, doc)),
        Stage::Upload => upload::run(ctx, doc),
        Stage::Complete => complete::run(ctx, doc),
    };
    let out = record(stage, ctx, doc, started_at, res);
    traced::stage_outcome(&span, stage.name(), doc);
    out
}

/// The loop's `prepare-workspace` and `vm-boot` at once, for a runtime whose sandbox needs only
/// the workspace's directory ([`crate::sandbox::Runtime::boots_during_clone`]): as soon as the workspace exists, the sandbox boots, its
/// images pulled, its network made and its first step's container created, while the
/// repository clones. Both stages are recorded as run, the clone first. `Err` as for
/// [`run_stage`].
pub(crate) fn prepare_and_boot(ctx: &JobCtx, doc: &mut RunDocument) -> Result<()> {
    if doc.failed() {
        return Ok(());
    }
    let started_at = Utc::now();
    // The boot's span is the job's child, beside the clone's stage, not inside it.
    let job_span = crate::base::trace::current();
    let created = match prepare_workspace::create(ctx, doc) {
        Ok(Some(created)) => created,
        Ok(None) => {
            run_stage(Stage::PrepareWorkspace, ctx, doc)?;
            run_stage(Stage::VmBoot, ctx, doc)?;
            return Ok(());
        }
        Err(e) => {
            record(Stage::PrepareWorkspace, ctx, doc, started_at, Err(e))?;
            return Ok(());
        }
    };
    let mut booting = doc.clone();
    // The first step's container is made once the clone is done when it writes its layer into
    // a workspace that the clone may still store as the repository's template (which must hold
    // the clean checkout only), or when it starts in a directory of the repository.
    let wait = created.may_make_template() || ctx.job.docker_steps.first().is_some_and(|s| !s.dir.is_empty());
    let (filled_tx, filled_rx) = std::sync::mpsc::channel::<bool>();
    let (filled, booted) = std::thread::scope(|s| {
        let booting = &mut booting;
        let boot = s.spawn(move || {
            let _job = job_span.attach();
            let span = crate::base::trace::span(Stage::VmBoot.name());
            let at = Utc::now();
            let res = vm_boot::run(ctx, booting);
            if let Err(e) = &res {
                span.fail(&ctx.redact(&format!("{e:#}")));
            }
            // Nothing is made ahead for a job whose clone failed.
            if res.is_ok() && (!wait || filled_rx.recv() == Ok(true)) {
                run_steps::prepare_first(ctx, booting);
            }
            (at, res)
        });
        let prepare = crate::base::trace::span_at(Stage::PrepareWorkspace.name(), started_at.into());
        let filled = prepare_workspace::fill(ctx, doc, created);
        if let Err(e) = &filled {
            prepare.fail(&ctx.redact(&format!("{e:#}")));
        }
        drop(prepare);
        let _ = filled_tx.send(filled.is_ok());
        (filled, boot.join())
    });
    // What the boot made is the document's, whatever failed, for `complete` to remove.
    doc.sandbox = booting.sandbox.take();
    doc.images = std::mem::take(&mut booting.images);
    record(Stage::PrepareWorkspace, ctx, doc, started_at, filled)?;
    let (at, res) =
        booted.unwrap_or_else(|_| (Utc::now(), Err(anyhow::anyhow!("the sandbox's boot panicked"))));
    record(Stage::VmBoot, ctx, doc, at, res)?;
    Ok(())
}

/// Records how `stage`, started at `started_at`, ended: its failure (the first one wins) and its
/// place in the history.
fn record(
    stage: Stage,
    ctx: &JobCtx,
    doc: &mut RunDocument,
    started_at: chrono::DateTime<Utc>,
    res: Result<()>,
) -> Result<StageResult> {
    let out = match res {
        Ok(()) => StageResult::Done,
        Err(e) if e.downcast_ref::<Incomplete>().is_some() || stage == Stage::Complete => return Err(e),
        Err(e) => {
            let (kind, message) = classify(ctx, &e);
            doc.fail(stage.name(), kind, ctx.redact(&message));
            StageResult::Failed
        }
    };
    doc.history.push(StageRecord { stage: stage.name().into(), started_at, finished_at: Utc::now() });
    Ok(out)
}

fn classify(ctx: &JobCtx, e: &anyhow::Error) -> (FailureKind, String) {
    if let Some(f) = e.downcast_ref::<StageFailure>() {
        return (f.kind, f.message.clone());
    }
    match ctx.cancel.check() {
        Some(CancelReason::Canceled) => (FailureKind::Canceled, "job canceled".into()),
        Some(CancelReason::Deadline) => (FailureKind::Errored, deadline_message(&ctx.settings)),
        Some(CancelReason::Shutdown) => {
            (FailureKind::Errored, "executor shut down while the job was running".into())
        }
        None => (FailureKind::Errored, format!("{e:#}")),
    }
}

/// The contract's message for a job past its deadline.
pub(crate) fn deadline_message(settings: &Settings) -> String {
    match settings.max_runtime_per_job {
        Some(d) => {
            format!("job exceeded maximum execution time of {}", crate::base::units::format_duration(d))
        }
        // A document made by an executor with a deadline, resumed by one without.
        None => "job exceeded maximum execution time".into(),
    }
}

/// Heartbeats for one job while a stage process works on it (the loop has its own, for all its
/// jobs). A `cancelIds` entry for the job cancels `cancel`; a job missing from `knownIds` is
/// warned about once and left to run, as the contract says (its final mark* finds it is no
/// longer ours). Stops when dropped.
pub(crate) struct JobHeartbeat {
    stop: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl JobHeartbeat {
    pub(crate) fn start(
        client: Client,
        doc: &RunDocument,
        cancel: Cancel,
        interval: Duration,
    ) -> JobHeartbeat {
        let stop = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let queues = vec![doc.executor.queue.clone()];
        let multi = doc.executor.multi_queue;
        let uid = doc.job.uid.clone();
        let stop2 = stop.clone();
        let mut lost = false;
        let thread = std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || loop {
                match client.heartbeat(&queues, multi, std::slice::from_ref(&uid)) {
                    Ok(r) => {
                        if r.cancel_ids.contains(&uid) {
                            tracing::info!("the coordinator canceled job {uid}");
                            cancel.cancel(CancelReason::Canceled);
                        }
                        if !r.known_ids.contains(&uid) && !std::mem::replace(&mut lost, true) {
                            tracing::warn!("the coordinator no longer knows job {uid} as ours");
                        }
                    }
                    Err(e) => tracing::warn!("heartbeat for job {uid} failed: {e}"),
                }
                let (m, cv) = &*stop2;
                let guard = m.lock().unwrap_or_else(|p| p.into_inner());
                let (guard, _) =
                    cv.wait_timeout_while(guard, interval, |s| !*s).unwrap_or_else(|p| p.into_inner());
                if *guard {
                    return;
                }
            })
            .ok();
        JobHeartbeat { stop, thread }
    }
}

impl Drop for JobHeartbeat {
    fn drop(&mut self) {
        let (m, cv) = &*self.stop;
        *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
