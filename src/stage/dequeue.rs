//! `dequeue`: takes one job from the coordinator and starts its run document (or reports that
//! there is none).

use anyhow::Result;
use chrono::Utc;
use std::time::Duration;

use crate::api::{ApiError, Client, VERSION};
use crate::config::Settings;
use crate::document::{ExecutorIdentity, RunDocument};
use crate::sandbox::RuntimeKind;

/// Dequeues one job and returns its new document, or `None` when the coordinator has none.
/// `runtime` is the concrete runtime name recorded for the later stages.
pub(crate) fn run(
    settings: &Settings,
    client: &Client,
    runtime: RuntimeKind,
    wait: Option<Duration>,
) -> Result<Option<RunDocument>, ApiError> {
    let Some((job, extensions)) =
        client.dequeue(&settings.queues, settings.multi_queue, &settings.resources(), wait)?
    else {
        return Ok(None);
    };
    let queue = if job.queue.is_empty() {
        settings.queues.first().cloned().unwrap_or_default()
    } else {
        job.queue.clone()
    };
    let identity = ExecutorIdentity {
        name: client.executor_name().to_string(),
        frontend_url: client.base_url().to_string(),
        queue,
        multi_queue: settings.multi_queue,
        runtime,
        version: VERSION.to_string(),
        log_append: extensions.log_append,
    };
    // EXECUTOR_MAXIMUM_RUNTIME_PER_JOB=0: no deadline, as in Sourcegraph's executor.
    let deadline =
        settings.max_runtime_per_job.and_then(|d| chrono::Duration::from_std(d).ok()).map(|d| Utc::now() + d);
    let doc = RunDocument::new(identity, &job, settings.password.expose(), deadline).map_err(|e| {
        ApiError::Transport {
            route: "dequeue".into(),
            message: format!("creating the run document of job {}: {e:#}", job.id),
        }
    })?;
    Ok(Some(doc))
}
