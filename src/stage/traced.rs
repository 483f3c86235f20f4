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
/// its answer came. The span starts at the submit (the coordinator's `queuedAt`) or at `asked`,
/// whichever came first (a long poll may wait for the submit); a job without `queuedAt` (a
/// Sourcegraph job) has no queue wait, nor has one whose `queuedAt` is later than its dequeue
/// (a skewed clock).
pub(crate) fn start(ctx: &JobCtx, doc: &RunDocument, asked: SystemTime, got: SystemTime) -> Trace {
    let (begin, queued) = window(ctx.job.queued_at.map(SystemTime::from), asked, got);
    let parent = Some(ctx.job.traceparent.as_str()).filter(|p| !p.is_empty());
    let trace = Trace::start("job", parent, SpanKind::Consumer, begin, attributes(ctx, doc));
    if let Some(q) = queued {
        trace.record("queue-wait", q, got, Vec::new());
    }
    trace.record("dequeue", asked, got, Vec::new());
    trace
}

/// When the job's span begins, and when its queue wait does (if it has one).
fn window(
    queued_at: Option<SystemTime>,
    asked: SystemTime,
    got: SystemTime,
) -> (SystemTime, Option<SystemTime>) {
    let queued = queued_at.filter(|q| *q <= got);
    (queued.map_or(asked, |q| q.min(asked)), queued)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_job_span_begins_at_the_submit_or_the_dequeue_whichever_came_first() {
        let t = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        // Queued before the long poll began, or while it waited.
        assert_eq!(window(Some(t(1)), t(5), t(9)), (t(1), Some(t(1))));
        assert_eq!(window(Some(t(7)), t(5), t(9)), (t(5), Some(t(7))));
        // A Sourcegraph job, and a coordinator clock ahead of ours.
        assert_eq!(window(None, t(5), t(9)), (t(5), None));
        assert_eq!(window(Some(t(10)), t(5), t(9)), (t(5), None));
    }
}
