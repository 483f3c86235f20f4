//! The executors' side of the protocol under `/.executors/`: the credentials test, dequeue
//! (with its long poll), heartbeats, execution log entries, mark* and the artifacts upload.

use anyhow::Context;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

use super::auth::{CompletingCaller, ExecutorSecret, JobCaller, KnownQueue};
use super::{db, http_err, json_response, query_params, read_json, HttpError, HttpResult, Shared};
use crate::protocol::{self, Job};
use crate::server::store::{self, ExecutorInfo, Outcome, StoreError};
use crate::server::MAX_WAIT;

pub(super) async fn test_auth(_: ExecutorSecret) -> HttpResult<Response> {
    Ok((StatusCode::OK, "ok").into_response())
}

fn wait_param(query: &HashMap<String, String>) -> HttpResult<Duration> {
    match query.get("wait") {
        None => Ok(Duration::ZERO),
        Some(w) => crate::base::units::parse_duration(w)
            .map(|d| d.min(MAX_WAIT))
            .map_err(|e| http_err(StatusCode::BAD_REQUEST, format!("invalid wait parameter: {e:#}"))),
    }
}

pub(super) async fn dequeue_single(
    State(app): State<Shared>,
    KnownQueue(queue): KnownQueue,
    _: ExecutorSecret,
    query: std::result::Result<Query<HashMap<String, String>>, QueryRejection>,
    body: Body,
) -> HttpResult<Response> {
    let wait = wait_param(&query_params(query)?)?;
    let req: protocol::DequeueRequest = read_json(body, app.json_limit).await?;
    dequeue(app, vec![queue], req, wait, false).await
}

pub(super) async fn dequeue_multi(
    State(app): State<Shared>,
    _: ExecutorSecret,
    query: std::result::Result<Query<HashMap<String, String>>, QueryRejection>,
    body: Body,
) -> HttpResult<Response> {
    let wait = wait_param(&query_params(query)?)?;
    let req: protocol::DequeueRequest = read_json(body, app.json_limit).await?;
    for q in &req.queues {
        if !app.cfg.queues.contains(q) {
            return Err(http_err(StatusCode::BAD_REQUEST, format!("unknown queue {q:?}")));
        }
    }
    let queues = req.queues.clone();
    dequeue(app, queues, req, wait, true).await
}

fn queue_weight(queue: &str) -> u32 {
    // Sourcegraph's defaults: batches 4, codeintel 1.
    if queue == "batches" {
        4
    } else {
        1
    }
}

async fn dequeue(
    app: Shared,
    queues: Vec<String>,
    req: protocol::DequeueRequest,
    wait: Duration,
    multi: bool,
) -> HttpResult<Response> {
    let started = Instant::now();
    if req.executor_name.is_empty() {
        return Err(http_err(StatusCode::BAD_REQUEST, "executorName must not be empty"));
    }
    let v2 = protocol::wants_v2_payload(&req.version).map_err(|e| http_err(StatusCode::BAD_REQUEST, e))?;
    if queues.is_empty() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let deadline = started + wait;
    let mut shutdown = app.shutdown.subscribe();
    loop {
        let notified = app.jobs_changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (qs, name, order) = (queues.clone(), req.executor_name.clone(), app.order.clone());
        let got = db(&app, move |s| s.dequeue_in(&qs, &name, store::now_ms(), queue_weight, &order)).await?;
        if let Some(d) = got {
            let mut job: Job = serde_json::from_str(&d.payload)
                .with_context(|| format!("stored payload of job {} is unreadable", d.id))?;
            job.id = d.id;
            job.token = d.token;
            job.keep_failed_seconds = app.cfg.keep_failed.get(&d.queue).map(|k| k.as_secs());
            job.queue = if multi { d.queue } else { String::new() };
            job.version = if v2 { 2 } else { 0 };
            app.metrics.dequeue_job.observe(started.elapsed());
            app.logs_changed.notify_waiters();
            let mut resp = json_response(StatusCode::OK, &job)?;
            // The extensions this coordinator accepts: an executor uses one only when listed here.
            resp.headers_mut().insert(
                protocol::HEADER_EXTENSIONS,
                HeaderValue::from_static(protocol::EXTENSION_LOG_APPEND),
            );
            return Ok(resp);
        }
        let now = Instant::now();
        if now >= deadline || *shutdown.borrow() {
            app.metrics.dequeue_empty.observe(started.elapsed());
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        let wake = match app.recheck {
            Some(every) => deadline.min(Instant::now() + every),
            None => deadline,
        };
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = shutdown.changed() => {}
        }
    }
}

fn parse_ids(ids: &[String], queue: &str) -> HttpResult<Vec<(i64, String)>> {
    ids.iter()
        .map(|s| match protocol::split_uid(s) {
            Some((id, None)) => Ok((id, queue.to_string())),
            Some((id, Some(q))) if q == queue => Ok((id, queue.to_string())),
            _ => Err(http_err(StatusCode::BAD_REQUEST, format!("invalid job id {s:?} for queue {queue:?}"))),
        })
        .collect()
}

fn telemetry_info(name: &str, t: &protocol::ExecutorTelemetry) -> ExecutorInfo {
    ExecutorInfo {
        hostname: name.to_string(),
        queue_name: None,
        queue_names: Vec::new(),
        os: t.os.clone(),
        architecture: t.architecture.clone(),
        docker_version: t.docker_version.clone(),
        executor_version: t.executor_version.clone(),
        git_version: t.git_version.clone(),
        ignite_version: t.ignite_version.clone(),
        src_cli_version: t.src_cli_version.clone(),
    }
}

/// Largest `prometheusMetrics` an executor may send; a bigger heartbeat is refused with 413.
pub(super) const MAX_EXECUTOR_METRICS: usize = 256 << 10;

/// Refuses metrics over [`MAX_EXECUTOR_METRICS`].
fn check_metrics(text: &str) -> HttpResult<()> {
    if text.len() > MAX_EXECUTOR_METRICS {
        return Err(http_err(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the heartbeat's prometheusMetrics holds {} bytes, more than the {} accepted",
                text.len(),
                MAX_EXECUTOR_METRICS
            ),
        ));
    }
    Ok(())
}

/// Keeps an executor's latest metrics for `/metrics` (a ping's empty text keeps the last).
fn keep_metrics(app: &Shared, executor: &str, text: String) {
    if !text.is_empty() {
        let mut m = app.executor_metrics.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(executor.to_string(), (store::now_ms(), text));
    }
}

/// The largest heartbeat body: names, telemetry, the ids of the jobs an executor runs (256 KiB)
/// and its metrics ([`MAX_EXECUTOR_METRICS`]).
const HEARTBEAT_LIMIT: usize = (256 << 10) + MAX_EXECUTOR_METRICS;

/// Records a heartbeat; what does not fit its caps is refused with 413 and the reason.
async fn heartbeat_store(
    app: &Shared,
    info: ExecutorInfo,
    ids: Vec<(i64, String)>,
) -> HttpResult<(store::JobRefs, store::JobRefs)> {
    match app.store.call(move |s| s.heartbeat(&info, &ids, store::now_ms())).await {
        Ok(r) => Ok(r),
        Err(StoreError::OverCap(why)) => Err(http_err(StatusCode::PAYLOAD_TOO_LARGE, why)),
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn heartbeat_single(
    State(app): State<Shared>,
    KnownQueue(queue): KnownQueue,
    _: ExecutorSecret,
    body: Body,
) -> HttpResult<Response> {
    let req: protocol::HeartbeatRequestV1 = read_json(body, HEARTBEAT_LIMIT).await?;
    if req.executor_name.is_empty() {
        return Err(http_err(StatusCode::BAD_REQUEST, "executorName must not be empty"));
    }
    check_metrics(&req.telemetry.prometheus_metrics)?;
    let ids = parse_ids(&req.job_ids, &queue)?;
    let mut info = telemetry_info(&req.executor_name, &req.telemetry);
    info.queue_name = Some(queue.clone());
    info.queue_names = vec![queue];
    let (known, cancel) = heartbeat_store(&app, info.clone(), ids).await?;
    let release_ids = super::kept::heartbeat_kept(
        &app,
        &req.executor_name,
        &req.telemetry.kept_jobs,
        info.queue_name.as_deref(),
    )
    .await?;
    keep_metrics(&app, &req.executor_name, req.telemetry.prometheus_metrics);
    let resp = protocol::HeartbeatResponse {
        known_ids: known.iter().map(|(id, _)| id.to_string()).collect(),
        cancel_ids: cancel.iter().map(|(id, _)| id.to_string()).collect(),
        release_ids,
    };
    json_response(StatusCode::OK, &resp)
}

pub(super) async fn heartbeat_multi(
    State(app): State<Shared>,
    _: ExecutorSecret,
    body: Body,
) -> HttpResult<Response> {
    let req: protocol::HeartbeatRequest = read_json(body, HEARTBEAT_LIMIT).await?;
    if req.executor_name.is_empty() {
        return Err(http_err(StatusCode::BAD_REQUEST, "executorName must not be empty"));
    }
    check_metrics(&req.telemetry.prometheus_metrics)?;
    if req.queue_names.is_empty() {
        return Err(http_err(StatusCode::BAD_REQUEST, "queueNames must not be empty"));
    }
    for q in &req.queue_names {
        if !app.cfg.queues.contains(q) {
            return Err(http_err(StatusCode::BAD_REQUEST, format!("unknown queue {q:?}")));
        }
    }
    let mut ids = Vec::new();
    for group in &req.job_ids_by_queue {
        if !req.queue_names.contains(&group.queue_name) {
            return Err(http_err(
                StatusCode::BAD_REQUEST,
                format!("job ids for queue {:?}, which is not in queueNames", group.queue_name),
            ));
        }
        ids.extend(parse_ids(&group.job_ids, &group.queue_name)?);
    }
    let mut info = telemetry_info(&req.executor_name, &req.telemetry);
    info.queue_names = req.queue_names.clone();
    let (known, cancel) = heartbeat_store(&app, info, ids).await?;
    let release_ids =
        super::kept::heartbeat_kept(&app, &req.executor_name, &req.telemetry.kept_jobs, None).await?;
    keep_metrics(&app, &req.executor_name, req.telemetry.prometheus_metrics);
    let resp = protocol::HeartbeatResponse {
        known_ids: known.iter().map(|(id, q)| format!("{id}-{q}")).collect(),
        cancel_ids: cancel.iter().map(|(id, q)| format!("{id}-{q}")).collect(),
        release_ids,
    };
    json_response(StatusCode::OK, &resp)
}

/// The body's `{executorName, jobId}` must agree with the authenticated headers.
fn check_op(caller: &JobCaller, op: &protocol::JobOperationRequest) -> HttpResult<()> {
    if op.job_id != caller.id {
        return Err(http_err(
            StatusCode::BAD_REQUEST,
            format!("jobId {} in the body does not match X-Sourcegraph-Job-ID {}", op.job_id, caller.id),
        ));
    }
    if !op.executor_name.is_empty() && op.executor_name != caller.executor {
        return Err(http_err(
            StatusCode::BAD_REQUEST,
            "executorName in the body does not match X-Sourcegraph-Executor-Name",
        ));
    }
    Ok(())
}

/// Wakes the log follows after a log call the store answered, a refusal included; a failure of
/// the store changed nothing to follow.
fn notify_unless_failed<T>(app: &Shared, r: &Result<T, StoreError>) {
    if r.as_ref().err().is_none_or(StoreError::is_refusal) {
        app.logs_changed.notify_waiters();
    }
}

pub(super) async fn add_log_entry(
    State(app): State<Shared>,
    caller: JobCaller,
    body: Body,
) -> HttpResult<Response> {
    let req: protocol::AddExecutionLogEntryRequest = read_json(body, app.json_limit).await?;
    check_op(&caller, &req.op)?;
    let cap = app.cfg.log_cap_bytes;
    let r = app.store.call(move |s| s.add_log(caller.id, &caller.executor, &req.entry, cap)).await;
    notify_unless_failed(&app, &r);
    match r {
        Ok(entry_id) => json_response(StatusCode::OK, &entry_id),
        Err(StoreError::UnknownJob) => Err(http_err(StatusCode::INTERNAL_SERVER_ERROR, "unknown job")),
        Err(StoreError::OverCap(why)) => Err(http_err(StatusCode::PAYLOAD_TOO_LARGE, why)),
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn update_log_entry(
    State(app): State<Shared>,
    caller: JobCaller,
    body: Body,
) -> HttpResult<Response> {
    let req: protocol::UpdateExecutionLogEntryRequest = read_json(body, app.json_limit).await?;
    check_op(&caller, &req.op)?;
    let cap = app.cfg.log_cap_bytes;
    let r = app
        .store
        .call(move |s| s.update_log(caller.id, &caller.executor, req.entry_id, &req.entry, req.append, cap))
        .await;
    notify_unless_failed(&app, &r);
    match r {
        Ok(()) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err(StoreError::UnknownJob) => Err(http_err(StatusCode::INTERNAL_SERVER_ERROR, "unknown job")),
        Err(StoreError::OverCap(why)) => Err(http_err(StatusCode::PAYLOAD_TOO_LARGE, why)),
        Err(StoreError::UnknownEntry(entry_id)) => {
            Err(http_err(StatusCode::NOT_FOUND, format!("unknown log entry {entry_id}")))
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(Clone, Copy)]
enum MarkKind {
    Complete,
    Errored,
    Failed,
}

/// The longest failure message stored; a longer one keeps its start and says it was cut.
const MAX_FAILURE_MESSAGE: usize = 16 << 10;

fn capped_failure_message(mut message: String) -> String {
    if message.len() > MAX_FAILURE_MESSAGE {
        let mut end = MAX_FAILURE_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message
            .push_str(&format!("\n[coordinator: failure message truncated at {MAX_FAILURE_MESSAGE} bytes]"));
    }
    message
}

async fn mark(app: Shared, kind: MarkKind, caller: JobCaller, body: Body) -> HttpResult<Response> {
    let req: protocol::MarkErrorRequest = read_json(body, app.json_limit).await?;
    check_op(&caller, &req.op)?;
    let message = capped_failure_message(req.error_message);
    let outcome = match kind {
        MarkKind::Complete => Outcome::Complete,
        MarkKind::Errored => Outcome::Errored(message),
        MarkKind::Failed => Outcome::Failed(message),
    };
    let retries = app.cfg.max_retries;
    let id = caller.id;
    let done = db(&app, move |s| s.mark(id, &caller.executor, &outcome, retries, store::now_ms())).await?;
    if !done {
        return Err(http_err(
            StatusCode::NOT_FOUND,
            format!("unknown job {id}: not processing or not this executor's"),
        ));
    }
    app.logs_changed.notify_waiters();
    app.jobs_changed.notify_waiters();
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn mark_complete(
    State(app): State<Shared>,
    CompletingCaller(caller): CompletingCaller,
    body: Body,
) -> HttpResult<Response> {
    mark(app, MarkKind::Complete, caller, body).await
}

pub(super) async fn mark_errored(
    State(app): State<Shared>,
    caller: JobCaller,
    body: Body,
) -> HttpResult<Response> {
    mark(app, MarkKind::Errored, caller, body).await
}

pub(super) async fn mark_failed(
    State(app): State<Shared>,
    caller: JobCaller,
    body: Body,
) -> HttpResult<Response> {
    mark(app, MarkKind::Failed, caller, body).await
}

pub(super) async fn put_artifacts(
    State(app): State<Shared>,
    caller: JobCaller,
    headers: HeaderMap,
    body: Body,
) -> HttpResult<Response> {
    let max = app.cfg.artifact_max_bytes;
    let too_large =
        || http_err(StatusCode::PAYLOAD_TOO_LARGE, format!("artifacts are larger than {max} bytes"));
    if let Some(len) = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
    {
        if len > max {
            return Err(too_large());
        }
    }
    let (id, executor) = (caller.id, caller.executor.clone());
    if !db(&app, move |s| s.is_owned(id, &executor)).await? {
        return Err(http_err(
            StatusCode::NOT_FOUND,
            format!("unknown job {id}: not processing or not this executor's"),
        ));
    }
    let tmp = app.artifact_dir.join(format!(".upload-{id}-{}", uuid::Uuid::new_v4()));
    let result = receive_to_file(body, &tmp, max).await;
    let (bytes, sha) = match result {
        Ok(Some(v)) => v,
        Ok(None) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(too_large());
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
    };
    let dest = app.artifact_dir.join(format!("{id}.tar.gz"));
    let dir = app.artifact_dir.clone();
    let executor = caller.executor;
    let tmp2 = tmp.clone();
    let stored: HttpResult<bool> = app
        .store
        .call(move |s| -> anyhow::Result<bool> {
            if !s.is_owned(id, &executor)? {
                return Ok(false);
            }
            std::fs::rename(&tmp2, &dest)
                .with_context(|| format!("moving artifacts of job {id} into place"))?;
            if let Ok(d) = std::fs::File::open(&dir) {
                let _ = d.sync_all();
            }
            Ok(s.set_artifacts(id, &executor, bytes as i64, &sha)?)
        })
        .await
        .map_err(HttpError::from);
    match stored {
        Ok(true) => Ok(StatusCode::NO_CONTENT.into_response()),
        Ok(false) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(http_err(
                StatusCode::NOT_FOUND,
                format!("unknown job {id}: not processing or not this executor's"),
            ))
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(e)
        }
    }
}

/// Streams `body` into `path` (fsynced). `None` when it exceeds `max` bytes.
async fn receive_to_file(body: Body, path: &std::path::Path, max: u64) -> HttpResult<Option<(u64, String)>> {
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .await
        .with_context(|| format!("creating {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut total: u64 = 0;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| http_err(StatusCode::BAD_REQUEST, format!("reading the upload: {e}")))?;
        if let Ok(data) = frame.into_data() {
            total += data.len() as u64;
            if total > max {
                return Ok(None);
            }
            hasher.update(&data);
            file.write_all(&data).await.with_context(|| format!("writing {}", path.display()))?;
        }
    }
    file.sync_all().await.with_context(|| format!("syncing {}", path.display()))?;
    Ok(Some((total, hex::encode(hasher.finalize()))))
}
