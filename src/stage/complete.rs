//! `complete`: always tears down the sandbox, removes the workspace (unless keep-workspaces) and
//! reports the outcome: markComplete, or markErrored / markFailed by the contract's table. Safe to
//! run twice: what is gone stays gone, and a job already reported is not reported again.

use anyhow::Result;
use chrono::Utc;

use super::JobCtx;
use crate::api::Mark;
use crate::base::exit::{ExitError, TEMPFAIL};
use crate::document::{CompletionRecord, FailureKind, RunDocument};

/// The mark* call for the document's outcome, and its message.
pub(crate) fn mark_for(doc: &RunDocument) -> (Mark, String) {
    match &doc.outcome {
        None => (Mark::Complete, String::new()),
        Some(f) => match f.kind {
            FailureKind::Errored => (Mark::Errored, f.message.clone()),
            FailureKind::Failed | FailureKind::Canceled => (Mark::Failed, f.message.clone()),
        },
    }
}

/// After the report, off every job's path: the spare copy of the repository's workspace
/// template that the next job of the repository takes (template.rs). A failure costs only that.
fn make_spare(ctx: &JobCtx) {
    let templates = ctx.settings.templates();
    let Some(key) = templates.key(ctx.client.base_url(), &ctx.job, ctx.settings.limits().disk_bytes) else {
        return;
    };
    if let Err(e) = templates.make_spare(&key) {
        tracing::warn!(job_id = %ctx.job.uid(), "no spare copy of the workspace template: {e:#}");
    }
}

/// Whether the job was stopped by the executor's own shutdown (`loop` past its grace period, or
/// a second signal): it is not reported, as Sourcegraph's executor does not report it, so that
/// the coordinator's stalled-job reset gives it to another executor instead of failing it for
/// good (an errored job is never retried by Sourcegraph's queues). A job that ended before the
/// stop is reported as usual.
fn left_for_requeue(ctx: &JobCtx, doc: &RunDocument) -> bool {
    ctx.cancel.check() == Some(crate::base::cancel::CancelReason::Shutdown) && doc.outcome.is_some()
}

/// An allowlist job's egress record, which its network's teardown gathered: the
/// `teardown.network.egress` entry, the run document and the metrics.
fn egress_record(ctx: &JobCtx, doc: &mut RunDocument, sandbox: &str) {
    let Some(rec) = crate::network::egress::take(&ctx.settings.state_dir, sandbox) else { return };
    if let Ok(mut e) = ctx.logger.entry("teardown.network.egress", None) {
        for l in rec.lines() {
            e.line(&ctx.redact(&l));
        }
        let _ = e.finish(0);
    }
    crate::api::metrics::egress_done(&rec.verdicts, (rec.bytes_sent_total, rec.bytes_received_total));
    doc.egress = Some(rec);
}

pub(crate) fn run(ctx: &JobCtx, doc: &mut RunDocument) -> Result<()> {
    // Kept for `executor debug`: the sandbox and the workspace are the kept registry's now.
    let kept = super::keep::keep_if_failed(ctx, doc);
    let mut sandbox_removed =
        kept || doc.sandbox.is_none() || doc.completion.as_ref().is_some_and(|c| c.sandbox_removed);
    // What a microVM's steps wrote to the caches is in its guest, which goes next.
    let unfetched = if sandbox_removed { None } else { super::cache::fetch_layers(ctx, doc) };
    if let (Some(sb), false) = (doc.sandbox.clone(), sandbox_removed) {
        let mut entry = ctx.logger.entry(&format!("teardown.{}.remove", sb.runtime), None).ok();
        match ctx.runtime(doc).and_then(|rt| rt.teardown(&sb)) {
            Ok(()) => {
                sandbox_removed = true;
                if let Some(e) = entry.as_mut() {
                    e.line(&format!("removed sandbox {}", sb.name));
                }
            }
            Err(err) => {
                let msg = ctx.redact(&format!("tearing down sandbox {}: {err:#}", sb.name));
                tracing::error!("{msg}");
                if let Some(e) = entry.as_mut() {
                    e.line(&format!("error: {msg}"));
                }
            }
        }
        if let Some(e) = entry {
            let _ = e.finish(if sandbox_removed { 0 } else { 1 });
        }
    }
    // What the job wrote to its caches is in the workspace, which goes next.
    super::cache::teardown(ctx, doc, sandbox_removed, unfetched);
    if let Some(sb) = doc.sandbox.as_ref().filter(|_| sandbox_removed) {
        egress_record(ctx, doc, &sb.name.clone());
    }
    let mut workspace_removed =
        kept || doc.workspace.is_none() || doc.completion.as_ref().is_some_and(|c| c.workspace_removed);
    if let (Some(ws), false) = (doc.workspace.clone(), workspace_removed) {
        let mut entry = ctx.logger.entry("teardown.fs", None).ok();
        if ctx.settings.keep_workspaces {
            if let Some(e) = entry.as_mut() {
                e.line(&format!("keeping the workspace at {} (keep-workspaces)", ws.path.display()));
            }
        } else {
            match crate::workspace::remove(&ws.path) {
                Ok(()) => workspace_removed = true,
                Err(err) => {
                    tracing::error!("{err:#}");
                    if let Some(e) = entry.as_mut() {
                        e.line(&format!("error: {err:#}"));
                    }
                }
            }
        }
        // The contract finalizes teardown.fs with 0 whatever happened.
        if let Some(e) = entry {
            let _ = e.finish(0);
        }
    }
    if let Some(c) = doc.completion.as_mut() {
        c.sandbox_removed = sandbox_removed;
        c.workspace_removed = workspace_removed;
        return Ok(());
    }
    if left_for_requeue(ctx, doc) {
        tracing::warn!(
            "job {} left unmarked: the executor stopped it while shutting down; the coordinator \
             requeues it once its heartbeat stops",
            doc.job.uid
        );
        return Ok(());
    }
    let (mark, message) = mark_for(doc);
    match ctx.client.mark(&ctx.auth, mark, &message) {
        Ok(accepted) => {
            if !accepted {
                tracing::warn!(
                    "the coordinator no longer knows job {} as ours (reset or taken over); its {} was not recorded",
                    doc.job.uid,
                    mark.word()
                );
            }
            doc.completion = Some(CompletionRecord {
                reported: mark.word().into(),
                accepted,
                at: Utc::now(),
                sandbox_removed,
                workspace_removed,
            });
            make_spare(ctx);
            Ok(())
        }
        Err(e) => {
            Err(ExitError::new(TEMPFAIL, format!("reporting job {} as {}: {e}", doc.job.uid, mark.word()))
                .into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::document::{ExecutorIdentity, RunDocument};

    #[test]
    fn outcome_maps_to_the_contracts_mark_calls() {
        let id = ExecutorIdentity {
            name: "h-1".into(),
            frontend_url: "http://127.0.0.1:1".into(),
            queue: "batches".into(),
            multi_queue: false,
            runtime: crate::sandbox::RuntimeKind::Shell,
            version: "0.1.0".into(),
            log_append: false,
        };
        let job = crate::protocol::Job { id: 3, ..Default::default() };
        let mut doc = RunDocument::new(id, &job, &"s".repeat(24), None).unwrap();
        assert_eq!(mark_for(&doc), (Mark::Complete, String::new()));
        for (kind, mark) in [
            (FailureKind::Errored, Mark::Errored),
            (FailureKind::Failed, Mark::Failed),
            (FailureKind::Canceled, Mark::Failed),
        ] {
            doc.outcome = None;
            doc.fail("run-steps", kind, "why");
            assert_eq!(mark_for(&doc), (mark, "why".to_string()));
        }
    }
}
