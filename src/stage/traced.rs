//! A job's trace as `loop` runs it (see `docs/tracing.md`): the `job` span, a child of
//! the coordinator's submit span where the payload names one, with the queue wait and the
//! dequeue recorded from their timestamps; the stages, and what they do inside, are its
//! children through [`crate::base::trace::span`].

use std::time::SystemTime;

use super::JobCtx;
use crate::base::trace::{KeyValue, SpanKind, Trace};
use crate::document::RunDocument;

/// The attributes every job span carries: nothing secret (no token, no environment, no script).
fn attributes(ctx: &JobCtx, doc: &RunDocument) -> Vec<KeyValue> {
    vec![
        KeyValue::new("executor.job.id", ctx.job.id),
        KeyValue::new("executor.queue", doc.executor.queue.clone()),
        KeyValue::new("executor.repository", ctx.job.repository_name.clone()),
        KeyValue::new("executor.runtime", doc.executor.runtime.to_string()),
        KeyValue::new("executor.name", doc.executor.name.clone()),
    ]
}

/// Starts the job's trace: `asked` is when the dequeue that returned it was sent, `got` when
/// its answer came. The span starts at the submit (the coordinator's `queuedAt`) when known,
/// at `asked` otherwise (a Sourcegraph job: no queue wait is known).
pub(crate) fn start(ctx: &JobCtx, doc: &RunDocument, asked: SystemTime, got: SystemTime) -> Trace {
    let queued = ctx.job.queued_at.map(SystemTime::from).filter(|q| *q <= asked);
    let parent = Some(ctx.job.traceparent.as_str()).filter(|p| !p.is_empty());
    let trace =
        Trace::start("job", parent, SpanKind::Consumer, queued.unwrap_or(asked), attributes(ctx, doc));
    if let Some(q) = queued {
        trace.record("queue-wait", q, got, Vec::new());
    }
    trace.record("dequeue", asked, got, Vec::new());
    trace
}

/// Ends the job's trace with its outcome.
pub(crate) fn finish(trace: Trace, doc: &RunDocument) {
    let reported = doc.completion.as_ref().map_or("not_reported", |c| c.reported.as_str());
    trace.set("executor.outcome", reported.to_string());
    if let Some(f) = &doc.outcome {
        trace.fail(&f.message);
    }
}

/// Marks `span` (a stage's) failed when the document's failure is this stage's.
pub(crate) fn stage_outcome(span: &crate::base::trace::Span, stage: &str, doc: &RunDocument) {
    if let Some(f) = doc.outcome.as_ref().filter(|f| f.stage == stage) {
        span.fail(&f.message);
    }
}
