//! The coordinator's HTTP side: listener (plain or TLS), authentication, the `/.executors/`
//! protocol routes, the admin API, `/metrics`, long polls, log follows and the stalled-job
//! resetter. Every 4xx/5xx answer is `{"error": "..."}`.

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::{watch, Notify};

use super::metrics::Metrics;
use super::store::{self, CancelResult, ExecutorInfo, JobState, Outcome, Store, StoreError, StoreThread};
use super::{ServeConfig, ACTIVE_WINDOW, MAX_WAIT};
use crate::protocol::{self, Job};

/// Shared server state.
struct App {
    cfg: Arc<ServeConfig>,
    store: StoreThread,
    /// Fired when a job may have become dequeueable (submit, reset, retry).
    jobs_changed: Notify,
    /// Fired when a log entry or a job's state changed (for log follows).
    logs_changed: Notify,
    shutdown: watch::Sender<bool>,
    metrics: Metrics,
    secret_digest: [u8; 32],
    admin_digest: [u8; 32],
    artifact_dir: std::path::PathBuf,
    json_limit: usize,
}

type Shared = Arc<App>;

/// An error answer: status plus a message for `{"error": ...}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

fn api_err(status: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError { status, message: message.into() }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message });
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        eprintln!("executor queue: internal error: {e:#}");
        api_err(StatusCode::INTERNAL_SERVER_ERROR, format!("internal error: {e:#}"))
    }
}

type ApiResult<T> = std::result::Result<T, ApiError>;

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        anyhow::Error::from(e).into()
    }
}

/// Runs `f` on the store thread.
async fn db<T, F>(app: &Shared, f: F) -> ApiResult<T>
where
    T: Send + 'static,
    F: FnOnce(&mut Store) -> store::Result<T> + Send + 'static,
{
    Ok(app.store.call(f).await?)
}

fn digest(s: &[u8]) -> [u8; 32] {
    Sha256::digest(s).into()
}

/// Constant-time comparison (of digests, so the length of the secret does not leak either).
fn secret_matches(given: &str, want: &[u8; 32]) -> bool {
    let got = digest(given.as_bytes());
    got.iter().zip(want.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// `Authorization: <scheme> <token>`; anything else is 401.
fn parse_auth(headers: &HeaderMap) -> ApiResult<(String, String)> {
    let unauthorized = || api_err(StatusCode::UNAUTHORIZED, "missing or malformed Authorization header");
    let value = headers.get(header::AUTHORIZATION).ok_or_else(unauthorized)?;
    let value = value.to_str().map_err(|_| unauthorized())?;
    let mut parts = value.split(' ');
    let (Some(scheme), Some(token), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(unauthorized());
    };
    if scheme.is_empty() || token.is_empty() {
        return Err(unauthorized());
    }
    Ok((scheme.to_string(), token.to_string()))
}

fn executor_auth(app: &App, headers: &HeaderMap) -> ApiResult<()> {
    let (scheme, token) = parse_auth(headers)?;
    if scheme != protocol::SCHEME_EXECUTOR || !secret_matches(&token, &app.secret_digest) {
        return Err(api_err(StatusCode::UNAUTHORIZED, "invalid executor credentials"));
    }
    Ok(())
}

fn admin_auth(app: &App, headers: &HeaderMap) -> ApiResult<()> {
    let (scheme, token) = parse_auth(headers)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(api_err(
            StatusCode::UNAUTHORIZED,
            "the admin API needs Authorization: Bearer <admin token>",
        ));
    }
    if !secret_matches(&token, &app.admin_digest) {
        return Err(api_err(StatusCode::FORBIDDEN, "invalid admin token"));
    }
    Ok(())
}

/// Who calls a job route.
struct JobCaller {
    id: i64,
    executor: String,
}

async fn job_auth(app: &Shared, headers: &HeaderMap, queue: &str) -> ApiResult<JobCaller> {
    let (scheme, token) = parse_auth(headers)?;
    let id = headers
        .get(protocol::HEADER_JOB_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .ok_or_else(|| {
            api_err(StatusCode::BAD_REQUEST, "missing or non-integer X-Sourcegraph-Job-ID header")
        })?;
    let executor = headers
        .get(protocol::HEADER_EXECUTOR_NAME)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| api_err(StatusCode::BAD_REQUEST, "missing X-Sourcegraph-Executor-Name header"))?;
    let bearer = scheme.eq_ignore_ascii_case("bearer");
    if !bearer && scheme != protocol::SCHEME_EXECUTOR {
        return Err(api_err(StatusCode::UNAUTHORIZED, format!("unknown Authorization scheme {scheme:?}")));
    }
    let hash = if bearer {
        let raw = hex::decode(&token).map_err(|_| api_err(StatusCode::UNAUTHORIZED, "invalid token"))?;
        Some(store::sha256_hex(&raw))
    } else {
        None
    };
    // One store round trip for both lookups.
    let name = executor.clone();
    let (found, known) = db(app, move |s| {
        let found = match hash {
            Some(h) => s.job_for_token(&h)?,
            None => None,
        };
        Ok((found, s.executor_known(&name)?))
    })
    .await?;
    if bearer {
        let Some((token_job, token_queue, _repo)) = found else {
            return Err(api_err(StatusCode::UNAUTHORIZED, "invalid token"));
        };
        if token_job != id || token_queue != queue {
            return Err(api_err(StatusCode::FORBIDDEN, "invalid token"));
        }
    } else if !secret_matches(&token, &app.secret_digest) {
        return Err(api_err(StatusCode::FORBIDDEN, "invalid executor credentials"));
    }
    if !known {
        return Err(api_err(
            StatusCode::UNAUTHORIZED,
            format!("unknown executor {executor:?}; heartbeat first"),
        ));
    }
    Ok(JobCaller { id, executor })
}

/// Reads a JSON body of at most `limit` bytes.
async fn read_json<T: serde::de::DeserializeOwned>(body: Body, limit: usize) -> ApiResult<T> {
    let bytes = read_limited(body, limit).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| api_err(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

async fn read_limited(body: Body, limit: usize) -> ApiResult<bytes::Bytes> {
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(api_err(StatusCode::PAYLOAD_TOO_LARGE, format!("request body is larger than {limit} bytes")))
        }
        Err(e) => Err(api_err(StatusCode::BAD_REQUEST, format!("reading the request body: {e}"))),
    }
}

fn known_queue(app: &App, queue: &str) -> ApiResult<()> {
    if app.cfg.queues.iter().any(|q| q == queue) {
        Ok(())
    } else {
        Err(api_err(StatusCode::NOT_FOUND, format!("unknown queue {queue:?}")))
    }
}

fn path_param(p: std::result::Result<Path<String>, PathRejection>) -> ApiResult<String> {
    p.map(|Path(s)| s).map_err(|e| api_err(StatusCode::BAD_REQUEST, format!("invalid path: {e}")))
}

fn query_params(
    q: std::result::Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult<HashMap<String, String>> {
    q.map(|Query(m)| m).map_err(|e| api_err(StatusCode::BAD_REQUEST, format!("invalid query string: {e}")))
}

fn job_id_param(p: std::result::Result<Path<String>, PathRejection>) -> ApiResult<i64> {
    let s = path_param(p)?;
    match s.parse::<i64>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(api_err(
            StatusCode::BAD_REQUEST,
            format!("invalid job id {s:?}: expected a positive integer"),
        )),
    }
}

fn json_response(status: StatusCode, value: &impl serde::Serialize) -> ApiResult<Response> {
    let body = serde_json::to_vec(value).map_err(|e| anyhow::anyhow!("encoding the response: {e}"))?;
    Ok((status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response())
}

// ---------------------------------------------------------------------------------------------
// Protocol routes

async fn test_auth(State(app): State<Shared>, headers: HeaderMap) -> ApiResult<Response> {
    executor_auth(&app, &headers)?;
    Ok((StatusCode::OK, "ok").into_response())
}

fn wait_param(query: &HashMap<String, String>) -> ApiResult<Duration> {
    match query.get("wait") {
        None => Ok(Duration::ZERO),
        Some(w) => crate::base::units::parse_duration(w)
            .map(|d| d.min(MAX_WAIT))
            .map_err(|e| api_err(StatusCode::BAD_REQUEST, format!("invalid wait parameter: {e:#}"))),
    }
}

async fn dequeue_single(
    State(app): State<Shared>,
    queue: std::result::Result<Path<String>, PathRejection>,
    query: std::result::Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let queue = path_param(queue)?;
    known_queue(&app, &queue)?;
    executor_auth(&app, &headers)?;
    let wait = wait_param(&query_params(query)?)?;
    let req: protocol::DequeueRequest = read_json(body, app.json_limit).await?;
    dequeue(app, vec![queue], req, wait, false).await
}

async fn dequeue_multi(
    State(app): State<Shared>,
    query: std::result::Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    executor_auth(&app, &headers)?;
    let wait = wait_param(&query_params(query)?)?;
    let req: protocol::DequeueRequest = read_json(body, app.json_limit).await?;
    for q in &req.queues {
        if !app.cfg.queues.contains(q) {
            return Err(api_err(StatusCode::BAD_REQUEST, format!("unknown queue {q:?}")));
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
) -> ApiResult<Response> {
    let started = Instant::now();
    if req.executor_name.is_empty() {
        return Err(api_err(StatusCode::BAD_REQUEST, "executorName must not be empty"));
    }
    let v2 = protocol::wants_v2_payload(&req.version).map_err(|e| api_err(StatusCode::BAD_REQUEST, e))?;
    if queues.is_empty() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let deadline = started + wait;
    let mut shutdown = app.shutdown.subscribe();
    loop {
        let notified = app.jobs_changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (qs, name) = (queues.clone(), req.executor_name.clone());
        let got = db(&app, move |s| s.dequeue(&qs, &name, store::now_ms(), queue_weight)).await?;
        if let Some(d) = got {
            let mut job: Job = serde_json::from_str(&d.payload)
                .with_context(|| format!("stored payload of job {} is unreadable", d.id))?;
            job.id = d.id;
            job.token = d.token;
            job.queue = if multi { d.queue } else { String::new() };
            job.version = if v2 { 2 } else { 0 };
            app.metrics.dequeue_job.observe(started.elapsed());
            app.logs_changed.notify_waiters();
            return json_response(StatusCode::OK, &job);
        }
        let now = Instant::now();
        if now >= deadline || *shutdown.borrow() {
            app.metrics.dequeue_empty.observe(started.elapsed());
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(deadline.into()) => {}
            _ = shutdown.changed() => {}
        }
    }
}

fn parse_ids(ids: &[String], queue: &str) -> ApiResult<Vec<(i64, String)>> {
    ids.iter()
        .map(|s| match protocol::split_uid(s) {
            Some((id, None)) => Ok((id, queue.to_string())),
            Some((id, Some(q))) if q == queue => Ok((id, queue.to_string())),
            _ => Err(api_err(StatusCode::BAD_REQUEST, format!("invalid job id {s:?} for queue {queue:?}"))),
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

async fn heartbeat_single(
    State(app): State<Shared>,
    queue: std::result::Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let queue = path_param(queue)?;
    known_queue(&app, &queue)?;
    executor_auth(&app, &headers)?;
    let req: protocol::HeartbeatRequestV1 = read_json(body, app.json_limit).await?;
    if req.executor_name.is_empty() {
        return Err(api_err(StatusCode::BAD_REQUEST, "executorName must not be empty"));
    }
    let ids = parse_ids(&req.job_ids, &queue)?;
    let mut info = telemetry_info(&req.executor_name, &req.telemetry);
    info.queue_name = Some(queue.clone());
    info.queue_names = vec![queue];
    let (known, cancel) = db(&app, move |s| s.heartbeat(&info, &ids, store::now_ms())).await?;
    let resp = protocol::HeartbeatResponse {
        known_ids: known.iter().map(|(id, _)| id.to_string()).collect(),
        cancel_ids: cancel.iter().map(|(id, _)| id.to_string()).collect(),
    };
    json_response(StatusCode::OK, &resp)
}

async fn heartbeat_multi(State(app): State<Shared>, headers: HeaderMap, body: Body) -> ApiResult<Response> {
    executor_auth(&app, &headers)?;
    let req: protocol::HeartbeatRequest = read_json(body, app.json_limit).await?;
    if req.executor_name.is_empty() {
        return Err(api_err(StatusCode::BAD_REQUEST, "executorName must not be empty"));
    }
    if req.queue_names.is_empty() {
        return Err(api_err(StatusCode::BAD_REQUEST, "queueNames must not be empty"));
    }
    for q in &req.queue_names {
        if !app.cfg.queues.contains(q) {
            return Err(api_err(StatusCode::BAD_REQUEST, format!("unknown queue {q:?}")));
        }
    }
    let mut ids = Vec::new();
    for group in &req.job_ids_by_queue {
        if !req.queue_names.contains(&group.queue_name) {
            return Err(api_err(
                StatusCode::BAD_REQUEST,
                format!("job ids for queue {:?}, which is not in queueNames", group.queue_name),
            ));
        }
        ids.extend(parse_ids(&group.job_ids, &group.queue_name)?);
    }
    let mut info = telemetry_info(&req.executor_name, &req.telemetry);
    info.queue_names = req.queue_names.clone();
    let (known, cancel) = db(&app, move |s| s.heartbeat(&info, &ids, store::now_ms())).await?;
    let resp = protocol::HeartbeatResponse {
        known_ids: known.iter().map(|(id, q)| format!("{id}-{q}")).collect(),
        cancel_ids: cancel.iter().map(|(id, q)| format!("{id}-{q}")).collect(),
    };
    json_response(StatusCode::OK, &resp)
}

/// The body's `{executorName, jobId}` must agree with the authenticated headers.
fn check_op(caller: &JobCaller, op: &protocol::JobOperationRequest) -> ApiResult<()> {
    if op.job_id != caller.id {
        return Err(api_err(
            StatusCode::BAD_REQUEST,
            format!("jobId {} in the body does not match X-Sourcegraph-Job-ID {}", op.job_id, caller.id),
        ));
    }
    if !op.executor_name.is_empty() && op.executor_name != caller.executor {
        return Err(api_err(
            StatusCode::BAD_REQUEST,
            "executorName in the body does not match X-Sourcegraph-Executor-Name",
        ));
    }
    Ok(())
}

async fn add_log_entry(
    State(app): State<Shared>,
    queue: std::result::Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let queue = path_param(queue)?;
    known_queue(&app, &queue)?;
    let caller = job_auth(&app, &headers, &queue).await?;
    let req: protocol::AddExecutionLogEntryRequest = read_json(body, app.json_limit).await?;
    check_op(&caller, &req.op)?;
    let cap = app.cfg.log_cap_bytes;
    let r = app.store.call(move |s| s.add_log(caller.id, &caller.executor, &req.entry, cap)).await;
    app.logs_changed.notify_waiters();
    match r {
        Ok(entry_id) => json_response(StatusCode::OK, &entry_id),
        Err(StoreError::UnknownJob) => Err(api_err(StatusCode::INTERNAL_SERVER_ERROR, "unknown job")),
        Err(e) => Err(e.into()),
    }
}

async fn update_log_entry(
    State(app): State<Shared>,
    queue: std::result::Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let queue = path_param(queue)?;
    known_queue(&app, &queue)?;
    let caller = job_auth(&app, &headers, &queue).await?;
    let req: protocol::UpdateExecutionLogEntryRequest = read_json(body, app.json_limit).await?;
    check_op(&caller, &req.op)?;
    let cap = app.cfg.log_cap_bytes;
    let r = app
        .store
        .call(move |s| s.update_log(caller.id, &caller.executor, req.entry_id, &req.entry, req.append, cap))
        .await;
    app.logs_changed.notify_waiters();
    match r {
        Ok(()) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err(StoreError::UnknownJob) => Err(api_err(StatusCode::INTERNAL_SERVER_ERROR, "unknown job")),
        Err(StoreError::UnknownEntry(entry_id)) => {
            Err(api_err(StatusCode::NOT_FOUND, format!("unknown log entry {entry_id}")))
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

async fn mark(
    app: Shared,
    kind: MarkKind,
    queue: std::result::Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let queue = path_param(queue)?;
    known_queue(&app, &queue)?;
    let caller = job_auth(&app, &headers, &queue).await?;
    let req: protocol::MarkErrorRequest = read_json(body, app.json_limit).await?;
    check_op(&caller, &req.op)?;
    let outcome = match kind {
        MarkKind::Complete => Outcome::Complete,
        MarkKind::Errored => Outcome::Errored(req.error_message),
        MarkKind::Failed => Outcome::Failed(req.error_message),
    };
    let retries = app.cfg.max_retries;
    let id = caller.id;
    let done = db(&app, move |s| s.mark(id, &caller.executor, &outcome, retries, store::now_ms())).await?;
    if !done {
        return Err(api_err(
            StatusCode::NOT_FOUND,
            format!("unknown job {id}: not processing or not this executor's"),
        ));
    }
    app.logs_changed.notify_waiters();
    app.jobs_changed.notify_waiters();
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn mark_complete(
    State(app): State<Shared>,
    queue: std::result::Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    mark(app, MarkKind::Complete, queue, headers, body).await
}

async fn mark_errored(
    State(app): State<Shared>,
    queue: std::result::Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    mark(app, MarkKind::Errored, queue, headers, body).await
}

async fn mark_failed(
    State(app): State<Shared>,
    queue: std::result::Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    mark(app, MarkKind::Failed, queue, headers, body).await
}

async fn put_artifacts(
    State(app): State<Shared>,
    queue: std::result::Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let queue = path_param(queue)?;
    known_queue(&app, &queue)?;
    let caller = job_auth(&app, &headers, &queue).await?;
    let max = app.cfg.artifact_max_bytes;
    let too_large =
        || api_err(StatusCode::PAYLOAD_TOO_LARGE, format!("artifacts are larger than {max} bytes"));
    if let Some(len) = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
    {
        if len > max {
            return Err(too_large());
        }
    }
    let (id, executor) = (caller.id, caller.executor.clone());
    if !db(&app, move |s| s.is_owned(id, &executor)).await? {
        return Err(api_err(
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
    let stored: ApiResult<bool> = app
        .store
        .call(move |s| -> Result<bool> {
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
        .map_err(ApiError::from);
    match stored {
        Ok(true) => Ok(StatusCode::NO_CONTENT.into_response()),
        Ok(false) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(api_err(
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
async fn receive_to_file(body: Body, path: &std::path::Path, max: u64) -> ApiResult<Option<(u64, String)>> {
    let mut file =
        tokio::fs::File::create(path).await.with_context(|| format!("creating {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut total: u64 = 0;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| api_err(StatusCode::BAD_REQUEST, format!("reading the upload: {e}")))?;
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

// ---------------------------------------------------------------------------------------------
// Admin API

const JOB_FIELDS: &[&str] = &[
    "version",
    "id",
    "token",
    "queue",
    "repositoryName",
    "repositoryDirectory",
    "commit",
    "fetchTags",
    "shallowClone",
    "sparseCheckout",
    "files",
    "dockerSteps",
    "cliSteps",
    "redactedValues",
    "dockerAuthConfig",
    "artifacts",
];

/// A relative path that stays inside the workspace.
fn check_relative(what: &str, p: &str, allow_empty: bool) -> std::result::Result<(), String> {
    if p.is_empty() {
        return if allow_empty { Ok(()) } else { Err(format!("{what} must not be empty")) };
    }
    let path = std::path::Path::new(p);
    if path.is_absolute()
        || path
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir))
        || p.contains('\0')
    {
        return Err(format!("{what} {p:?} must be a relative path inside the workspace"));
    }
    Ok(())
}

/// Validates a submitted job. Returns (queue, normalised payload, repository name).
fn validate_submission(
    value: serde_json::Value,
    queues: &[String],
) -> std::result::Result<(String, String, String), String> {
    let serde_json::Value::Object(mut obj) = value else {
        return Err("the job must be a JSON object".into());
    };
    let queue = match obj.remove("queue") {
        None | Some(serde_json::Value::Null) => "batches".to_string(),
        Some(serde_json::Value::String(q)) => q,
        Some(other) => return Err(format!("queue must be a string, got {other}")),
    };
    if !queues.contains(&queue) {
        return Err(format!("unknown queue {queue:?} (this server has {})", queues.join(", ")));
    }
    for key in obj.keys() {
        if !JOB_FIELDS.contains(&key.as_str()) {
            return Err(format!("unknown job field {key:?}"));
        }
    }
    if obj.get("id").is_some_and(|v| v.as_i64() != Some(0)) {
        return Err("a submitted job must not carry an id: the server assigns it".into());
    }
    if obj.get("token").is_some_and(|v| v.as_str() != Some("")) {
        return Err("a submitted job must not carry a token: the server makes one at dequeue".into());
    }
    let version = obj.get("version").cloned().unwrap_or(serde_json::Value::from(0));
    if version != 0 && version != 1 && version != 2 {
        return Err(format!("version must be 1 or 2, got {version}"));
    }
    let mut job: Job =
        serde_json::from_value(serde_json::Value::Object(obj)).map_err(|e| format!("invalid job: {e}"))?;
    check_relative("repositoryDirectory", &job.repository_directory, true)?;
    for path in job.files.keys() {
        check_relative("file path", path, false)?;
    }
    for (i, step) in job.docker_steps.iter().enumerate() {
        check_relative(&format!("dockerSteps[{i}].dir"), &step.dir, true)?;
        if step.image.is_empty() {
            return Err(format!("dockerSteps[{i}].image must not be empty"));
        }
        for e in &step.env {
            if !e.contains('=') {
                return Err(format!("dockerSteps[{i}].env entry {e:?} is not NAME=value"));
            }
        }
    }
    for (i, step) in job.cli_steps.iter().enumerate() {
        check_relative(&format!("cliSteps[{i}].dir"), &step.dir, true)?;
    }
    for a in &job.artifacts {
        check_relative("artifact path", a, false)?;
    }
    if !job.repository_name.is_empty() && job.commit.is_empty() {
        return Err("commit must be set when repositoryName is".into());
    }
    job.version = 2;
    job.id = 0;
    job.token = String::new();
    job.queue = String::new();
    let payload = serde_json::to_string(&job).map_err(|e| format!("encoding the job: {e}"))?;
    Ok((queue, payload, job.repository_name))
}

async fn submit_job(State(app): State<Shared>, headers: HeaderMap, body: Body) -> ApiResult<Response> {
    admin_auth(&app, &headers)?;
    let value: serde_json::Value = read_json(body, app.json_limit).await?;
    let (queue, payload, repo) =
        validate_submission(value, &app.cfg.queues).map_err(|e| api_err(StatusCode::BAD_REQUEST, e))?;
    let id = db(&app, move |s| s.submit(&queue, &payload, &repo, store::now_ms())).await?;
    app.metrics.jobs_submitted.fetch_add(1, Ordering::Relaxed);
    app.jobs_changed.notify_waiters();
    json_response(StatusCode::CREATED, &serde_json::json!({ "id": id }))
}

async fn list_jobs(
    State(app): State<Shared>,
    query: std::result::Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    admin_auth(&app, &headers)?;
    let q = query_params(query)?;
    let queue = q.get("queue").cloned();
    if let Some(queue) = &queue {
        if !app.cfg.queues.contains(queue) {
            return Err(api_err(StatusCode::BAD_REQUEST, format!("unknown queue {queue:?}")));
        }
    }
    let state = q.get("state").cloned();
    let state = match state {
        None => None,
        Some(name) => match JobState::from_name(&name) {
            Some(state) => Some(state),
            None => {
                let names: Vec<_> = JobState::ALL.iter().map(|s| s.as_str()).collect();
                return Err(api_err(
                    StatusCode::BAD_REQUEST,
                    format!("unknown state {name:?} (one of {})", names.join(", ")),
                ));
            }
        },
    };
    let limit = match q.get("limit") {
        None => 100,
        Some(l) => match l.parse::<i64>() {
            Ok(n) if (1..=100_000).contains(&n) => n,
            _ => return Err(api_err(StatusCode::BAD_REQUEST, format!("invalid limit {l:?}: 1 to 100000"))),
        },
    };
    let jobs = db(&app, move |s| s.list(queue.as_deref(), state, limit)).await?;
    json_response(StatusCode::OK, &serde_json::json!({ "jobs": jobs }))
}

/// The stored payload as the admin API shows it: `redactedValues` replaced by their count and
/// every string with a secret in it redacted.
fn admin_payload(payload: &str) -> Result<serde_json::Value> {
    let mut v: serde_json::Value = serde_json::from_str(payload).context("stored payload is unreadable")?;
    let secrets: BTreeMap<String, String> =
        v.get("redactedValues").and_then(|r| serde_json::from_value(r.clone()).ok()).unwrap_or_default();
    let redactor = crate::base::redact::Redactor::new(secrets.iter());
    fn walk(v: &mut serde_json::Value, r: &crate::base::redact::Redactor) {
        match v {
            serde_json::Value::String(s) => *s = r.redact_str(s),
            serde_json::Value::Array(a) => a.iter_mut().for_each(|x| walk(x, r)),
            serde_json::Value::Object(o) => o.values_mut().for_each(|x| walk(x, r)),
            _ => {}
        }
    }
    if let Some(obj) = v.as_object_mut() {
        obj.remove("redactedValues");
        obj.remove("id");
        obj.remove("token");
        obj.insert("redactedValueCount".into(), secrets.len().into());
    }
    walk(&mut v, &redactor);
    Ok(v)
}

async fn show_job(
    State(app): State<Shared>,
    id: std::result::Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    admin_auth(&app, &headers)?;
    let id = job_id_param(id)?;
    let found = db(&app, move |s| match s.job(id)? {
        Some(job) => Ok(Some((job, s.logs(id)?))),
        None => Ok(None),
    })
    .await?;
    let Some((job, logs)) = found else { return Err(api_err(StatusCode::NOT_FOUND, format!("no job {id}"))) };
    let mut v = serde_json::to_value(&job.summary).map_err(|e| anyhow::anyhow!("encoding job {id}: {e}"))?;
    if let Some(obj) = v.as_object_mut() {
        obj.insert("job".into(), admin_payload(&job.payload)?);
        obj.insert("logs".into(), serde_json::to_value(&logs).map_err(|e| anyhow::anyhow!("{e}"))?);
        obj.insert(
            "artifacts".into(),
            serde_json::to_value(&job.artifacts).map_err(|e| anyhow::anyhow!("{e}"))?,
        );
    }
    json_response(StatusCode::OK, &v)
}

async fn cancel_job(
    State(app): State<Shared>,
    id: std::result::Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    admin_auth(&app, &headers)?;
    let id = job_id_param(id)?;
    match db(&app, move |s| s.cancel(id, store::now_ms())).await? {
        CancelResult::NotFound => Err(api_err(StatusCode::NOT_FOUND, format!("no job {id}"))),
        CancelResult::AlreadyFinal(state) => {
            Err(api_err(StatusCode::CONFLICT, format!("job {id} already finished: it is {state}")))
        }
        CancelResult::Done(summary) => {
            app.logs_changed.notify_waiters();
            json_response(StatusCode::OK, &summary)
        }
    }
}

async fn list_executors(State(app): State<Shared>, headers: HeaderMap) -> ApiResult<Response> {
    admin_auth(&app, &headers)?;
    let active = ACTIVE_WINDOW.as_millis() as i64;
    let rows = db(&app, move |s| s.executors(store::now_ms(), active)).await?;
    json_response(StatusCode::OK, &serde_json::json!({ "executors": rows }))
}

async fn get_artifacts(
    State(app): State<Shared>,
    id: std::result::Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    admin_auth(&app, &headers)?;
    let id = job_id_param(id)?;
    let detail = db(&app, move |s| s.job(id)).await?;
    let Some(detail) = detail else { return Err(api_err(StatusCode::NOT_FOUND, format!("no job {id}"))) };
    if detail.artifacts.is_none() {
        return Err(api_err(StatusCode::NOT_FOUND, format!("job {id} has no artifacts")));
    }
    let path = app.artifact_dir.join(format!("{id}.tar.gz"));
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| api_err(StatusCode::NOT_FOUND, format!("artifacts of job {id} are gone: {e}")))?;
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let stream = tokio_util::io::ReaderStream::new(file);
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/gzip")),
            (header::CONTENT_LENGTH, HeaderValue::from(len)),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// What a follow sent of one entry: its fields but `out`, and the length and digest of the output.
struct Sent {
    meta: String,
    out_len: usize,
    out_sha: [u8; 32],
}

struct FollowState {
    app: Shared,
    id: i64,
    follow: bool,
    sent: HashMap<i64, Sent>,
    pending: VecDeque<bytes::Bytes>,
    done: bool,
    shutdown: watch::Receiver<bool>,
}

async fn follow_step(
    mut st: FollowState,
) -> Option<(std::result::Result<bytes::Bytes, std::io::Error>, FollowState)> {
    loop {
        if let Some(line) = st.pending.pop_front() {
            return Some((Ok(line), st));
        }
        if st.done {
            return None;
        }
        let app = st.app.clone();
        let notified = app.logs_changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let id = st.id;
        let fetched = db(&app, move |s| Ok((s.logs(id)?, s.state(id)?))).await;
        let (logs, state) = match fetched {
            Ok(v) => v,
            Err(e) => return Some((Err(std::io::Error::other(e.message)), FollowState { done: true, ..st })),
        };
        for entry in logs {
            if let Some(line) = follow_line(&mut st.sent, entry) {
                st.pending.push_back(bytes::Bytes::from(line));
            }
        }
        let finished = state.map(JobState::is_final).unwrap_or(true);
        if !st.follow || finished || *st.shutdown.borrow() {
            st.done = true;
            continue;
        }
        if st.pending.is_empty() {
            tokio::select! {
                // Any job's log change wakes every follow: a short pause gathers a burst of
                // appends into one read.
                _ = &mut notified => tokio::time::sleep(Duration::from_millis(100)).await,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = st.shutdown.changed() => {}
            }
        }
    }
}

/// The ndjson line a follow sends for the current state of one entry, if it changed: the whole
/// entry the first time (and whenever its output was replaced by something that does not extend
/// what was sent), otherwise its fields with only the new output and `"append": true`.
fn follow_line(sent: &mut HashMap<i64, Sent>, entry: store::StoredLogEntry) -> Option<String> {
    use sha2::Digest;
    let out = entry.entry.out.clone().unwrap_or_default();
    let mut bare = entry.clone();
    bare.entry.out = None;
    let meta = serde_json::to_string(&bare).ok()?;
    let digest = |b: &[u8]| -> [u8; 32] { sha2::Sha256::digest(b).into() };
    let extends = sent.get(&entry.entry_id).filter(|p| {
        out.len() >= p.out_len
            && out.is_char_boundary(p.out_len)
            && digest(&out.as_bytes()[..p.out_len]) == p.out_sha
    });
    let mut line = match extends {
        Some(p) if p.out_len == out.len() && p.meta == meta => return None,
        Some(p) => {
            let mut v = serde_json::to_value(&bare).ok()?;
            v["out"] = serde_json::Value::String(out[p.out_len..].to_string());
            v["append"] = serde_json::Value::Bool(true);
            v.to_string()
        }
        None => serde_json::to_string(&entry).ok()?,
    };
    sent.insert(entry.entry_id, Sent { meta, out_len: out.len(), out_sha: digest(out.as_bytes()) });
    line.push('\n');
    Some(line)
}

async fn job_logs(
    State(app): State<Shared>,
    id: std::result::Result<Path<String>, PathRejection>,
    query: std::result::Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    admin_auth(&app, &headers)?;
    let id = job_id_param(id)?;
    let q = query_params(query)?;
    let follow = match q.get("follow").map(String::as_str) {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") | Some("") => true,
        Some(other) => {
            return Err(api_err(StatusCode::BAD_REQUEST, format!("invalid follow value {other:?}")))
        }
    };
    if db(&app, move |s| s.state(id)).await?.is_none() {
        return Err(api_err(StatusCode::NOT_FOUND, format!("no job {id}")));
    }
    let shutdown = app.shutdown.subscribe();
    let st = FollowState {
        app,
        id,
        follow,
        sent: HashMap::new(),
        pending: VecDeque::new(),
        done: false,
        shutdown,
    };
    let stream = futures_util::stream::unfold(st, follow_step);
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"))],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn metrics(State(app): State<Shared>) -> ApiResult<Response> {
    let since = store::now_ms() - ACTIVE_WINDOW.as_millis() as i64;
    let (counts, active) = db(&app, move |s| Ok((s.counts()?, s.active_executors(since)?))).await?;
    let text = app.metrics.render(&counts, &app.cfg.queues, active);
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"))],
        text,
    )
        .into_response())
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    api_err(StatusCode::NOT_FOUND, format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    api_err(StatusCode::METHOD_NOT_ALLOWED, format!("method {method} is not allowed on {}", uri.path()))
}

fn router(app: Shared) -> Router {
    Router::new()
        .route("/.executors/test/auth", get(test_auth))
        .route("/.executors/queue/dequeue", post(dequeue_multi))
        .route("/.executors/queue/heartbeat", post(heartbeat_multi))
        .route("/.executors/queue/:queue/dequeue", post(dequeue_single))
        .route("/.executors/queue/:queue/heartbeat", post(heartbeat_single))
        .route("/.executors/queue/:queue/addExecutionLogEntry", post(add_log_entry))
        .route("/.executors/queue/:queue/updateExecutionLogEntry", post(update_log_entry))
        .route("/.executors/queue/:queue/markComplete", post(mark_complete))
        .route("/.executors/queue/:queue/markErrored", post(mark_errored))
        .route("/.executors/queue/:queue/markFailed", post(mark_failed))
        .route("/.executors/queue/:queue/artifacts", put(put_artifacts))
        .route("/api/jobs", post(submit_job).get(list_jobs))
        .route("/api/jobs/:id", get(show_job))
        .route("/api/jobs/:id/logs", get(job_logs))
        .route("/api/jobs/:id/cancel", post(cancel_job))
        .route("/api/jobs/:id/artifacts", get(get_artifacts))
        .route("/api/executors", get(list_executors))
        .route("/.executors/git/*path", get(git_route).post(git_route))
        .route("/.executors/files/:bucket/*key", get(files_get))
        .route("/api/repos", get(list_repos).post(add_repo).delete(remove_repo))
        .route("/api/files", get(list_files))
        .route("/api/files/:bucket/*key", put(put_file))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Bodies are limited per route by `read_limited` and the artifact cap.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(app)
}

async fn stalled_resetter(app: Shared) {
    let age = app.cfg.stalled_max_age;
    let period = (age / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    let age_text = crate::base::units::format_duration(age);
    let mut shutdown = app.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.changed() => return,
        }
        let (max, text) = (app.cfg.max_resets, age_text.clone());
        let now = store::now_ms();
        let cutoff = now - age.as_millis() as i64;
        match db(&app, move |s| s.reset_stalled(cutoff, max, &text, now)).await {
            Ok(resets) if !resets.is_empty() => {
                for r in &resets {
                    eprintln!(
                        "executor queue: job {} ({}) stalled: no heartbeat for {age_text}; now {}",
                        r.id, r.queue, r.new_state
                    );
                }
                app.metrics.jobs_reset.fetch_add(resets.len() as u64, Ordering::Relaxed);
                app.jobs_changed.notify_waiters();
                app.logs_changed.notify_waiters();
            }
            Ok(_) => {}
            Err(e) => eprintln!("executor queue: stalled-job sweep failed: {}", e.message),
        }
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

fn load_tls(cert: &std::path::Path, key: &std::path::Path) -> Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::{pem, pem::PemObject, CertificateDer, PrivateKeyDer};
    let cert_pem =
        std::fs::read(cert).with_context(|| format!("reading TLS certificate {}", cert.display()))?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .with_context(|| format!("parsing TLS certificate {}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("no certificate in {}", cert.display());
    }
    let key_pem = std::fs::read(key).with_context(|| format!("reading TLS key {}", key.display()))?;
    let key_der = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(k) => k,
        Err(pem::Error::NoItemsFound) => anyhow::bail!("no private key in {}", key.display()),
        Err(e) => return Err(e).with_context(|| format!("parsing TLS key {}", key.display())),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("configuring TLS")?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .with_context(|| {
            format!("TLS certificate {} does not match key {}", cert.display(), key.display())
        })?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

fn write_addr_file(path: &std::path::Path, url: &str) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    std::io::Write::write_all(&mut tmp, format!("{url}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Binds, announces the address, and serves until a signal.
pub async fn serve(cfg: Arc<ServeConfig>) -> Result<()> {
    let tls = match &cfg.tls {
        Some((cert, key)) => Some(load_tls(cert, key)?),
        None => None,
    };
    let data_dir = cfg.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&data_dir)).await??;
    let artifact_dir = cfg.data_dir.join("artifacts");
    std::fs::create_dir_all(&artifact_dir).with_context(|| format!("creating {}", artifact_dir.display()))?;
    // Leftovers of uploads interrupted by a crash.
    if let Ok(rd) = std::fs::read_dir(&artifact_dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(".upload-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let (shutdown_tx, _) = watch::channel(false);
    let json_limit = (cfg.log_cap_bytes.saturating_mul(2) + (1 << 20)).max(8 << 20) as usize;
    let app = Arc::new(App {
        secret_digest: digest(cfg.secret.as_bytes()),
        admin_digest: digest(cfg.admin_token.as_bytes()),
        cfg: cfg.clone(),
        store: StoreThread::start(store).context("starting the store thread")?,
        jobs_changed: Notify::new(),
        logs_changed: Notify::new(),
        shutdown: shutdown_tx,
        metrics: Metrics::default(),
        artifact_dir,
        json_limit,
    });
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let local = listener.local_addr().context("reading the listening address")?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{local}");
    if let Some(path) = &cfg.addr_file {
        write_addr_file(path, &url)?;
    }
    eprintln!(
        "executor queue: serving {} on {url} (data in {})",
        cfg.queues.join(", "),
        cfg.data_dir.display()
    );
    tokio::spawn(stalled_resetter(app.clone()));
    let data_dir = cfg.data_dir.clone();
    let checkpointer = tokio::task::spawn_blocking(move || store::Checkpointer::open(&data_dir)).await??;
    let checkpointer = Arc::new(Mutex::new(checkpointer));
    let mut stop = app.shutdown.subscribe();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.changed() => return,
            }
            let c = checkpointer.clone();
            let r = tokio::task::spawn_blocking(move || match c.lock() {
                Ok(c) => c.checkpoint(),
                Err(_) => Ok(()),
            })
            .await;
            if let Ok(Err(e)) = r {
                eprintln!("executor queue: {e:#}");
            }
        }
    });
    let routes = router(app.clone());
    let shutdown_app = app.clone();
    let on_signal = async move {
        shutdown_signal().await;
        eprintln!("executor queue: shutting down");
        let _ = shutdown_app.shutdown.send(true);
    };
    match tls {
        None => {
            axum::serve(listener, routes).with_graceful_shutdown(on_signal).await.context("serving HTTP")?;
        }
        Some(acceptor) => {
            tokio::pin!(on_signal);
            loop {
                let (tcp, _) = tokio::select! {
                    _ = &mut on_signal => break,
                    r = listener.accept() => match r {
                        Ok(v) => v,
                        Err(e) => {
                            eprintln!("executor queue: accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let acceptor = acceptor.clone();
                let svc = hyper_util::service::TowerToHyperService::new(routes.clone());
                tokio::spawn(async move {
                    let Ok(Ok(tls)) =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    let io = hyper_util::rt::TokioIo::new(tls);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follow_sends_an_entry_once_then_what_it_gained() {
        let mut sent = HashMap::new();
        let at = |out: &str, exit: Option<i32>| store::StoredLogEntry {
            entry_id: 3,
            entry: crate::protocol::ExecutionLogEntry {
                key: "step.0".into(),
                out: Some(out.into()),
                exit_code: exit,
                ..Default::default()
            },
        };
        let line =
            |s: Option<String>| -> Option<serde_json::Value> { s.map(|l| serde_json::from_str(&l).unwrap()) };
        let first = line(follow_line(&mut sent, at("abc", None))).unwrap();
        assert_eq!((first["out"].as_str(), first.get("append")), (Some("abc"), None));
        assert!(follow_line(&mut sent, at("abc", None)).is_none(), "nothing changed");
        let more = line(follow_line(&mut sent, at("abcdé", None))).unwrap();
        assert_eq!((more["out"].as_str(), more["append"].as_bool()), (Some("dé"), Some(true)));
        let ended = line(follow_line(&mut sent, at("abcdé", Some(0)))).unwrap();
        assert_eq!((ended["out"].as_str(), ended["exitCode"].as_i64()), (Some(""), Some(0)));
        // A replacement that does not extend what was sent is sent whole.
        let replaced = line(follow_line(&mut sent, at("xbcdéf", Some(0)))).unwrap();
        assert_eq!((replaced["out"].as_str(), replaced.get("append")), (Some("xbcdéf"), None));
    }

    #[test]
    fn submissions_are_validated() {
        let qs = vec!["batches".to_string(), "codeintel".to_string()];
        let ok = serde_json::json!({"repositoryName": "r", "commit": "c",
            "dockerSteps": [{"image": "alpine", "commands": ["true"], "dir": "", "env": ["A=b"]}]});
        let (q, payload, repo) = validate_submission(ok.clone(), &qs).unwrap();
        assert_eq!((q.as_str(), repo.as_str()), ("batches", "r"));
        assert!(payload.contains("\"version\":2"));
        let bad = |patch: serde_json::Value| {
            let mut v = ok.clone();
            for (k, val) in patch.as_object().unwrap() {
                v[k] = val.clone();
            }
            validate_submission(v, &qs).unwrap_err()
        };
        assert!(bad(serde_json::json!({"queue": "nope"})).contains("unknown queue"));
        assert!(bad(serde_json::json!({"token": "abc"})).contains("token"));
        assert!(bad(serde_json::json!({"id": 5})).contains("id"));
        assert!(bad(serde_json::json!({"files": {"../x": {"content": "a"}}})).contains("relative"));
        assert!(bad(serde_json::json!({"repositoryDirectory": "/etc"})).contains("relative"));
        assert!(bad(serde_json::json!({"dockerStep": []})).contains("unknown job field"));
        assert!(bad(serde_json::json!({"dockerSteps": 3})).contains("invalid job"));
        assert!(validate_submission(serde_json::json!([1]), &qs).is_err());
    }

    #[test]
    fn admin_view_hides_secrets() {
        let payload = r#"{"version":2,"dockerSteps":[{"image":"a","commands":["echo s3cr3t-value"],"dir":"","env":[]}],
            "redactedValues":{"s3cr3t-value":"PASSWORD_REMOVED"}}"#;
        let v = admin_payload(payload).unwrap();
        let text = v.to_string();
        assert!(!text.contains("s3cr3t-value"), "{text}");
        assert!(text.contains("PASSWORD_REMOVED"));
        assert_eq!(v["redactedValueCount"], 1);
    }

    #[test]
    fn secrets_compare_by_digest() {
        let want = digest(b"correct horse battery staple");
        assert!(secret_matches("correct horse battery staple", &want));
        assert!(!secret_matches("correct horse battery stapl", &want));
    }
}

// ---------------------------------------------------------------------------------------------
// Repositories (git smart HTTP) and the files store

/// Job authentication for routes that are not under a queue (git, files): the bearer job token
/// with the job and executor headers. Returns the caller, the token's queue and repository.
async fn token_auth(app: &Shared, headers: &HeaderMap) -> ApiResult<(JobCaller, String, String)> {
    let (scheme, token) = parse_auth(headers)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(api_err(
            StatusCode::UNAUTHORIZED,
            "this route needs the job's token (Authorization: Bearer)",
        ));
    }
    let id = headers
        .get(protocol::HEADER_JOB_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .ok_or_else(|| {
            api_err(StatusCode::BAD_REQUEST, "missing or non-integer X-Sourcegraph-Job-ID header")
        })?;
    let executor = headers
        .get(protocol::HEADER_EXECUTOR_NAME)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| api_err(StatusCode::BAD_REQUEST, "missing X-Sourcegraph-Executor-Name header"))?;
    let raw = hex::decode(&token).map_err(|_| api_err(StatusCode::UNAUTHORIZED, "invalid token"))?;
    let hash = store::sha256_hex(&raw);
    let Some((token_job, queue, repo)) = db(app, move |s| s.job_for_token(&hash)).await? else {
        return Err(api_err(StatusCode::UNAUTHORIZED, "invalid token"));
    };
    if token_job != id {
        return Err(api_err(StatusCode::FORBIDDEN, "invalid token"));
    }
    Ok((JobCaller { id, executor }, queue, repo))
}

/// `GET .../info/refs?service=git-upload-pack` and `POST .../git-upload-pack` of a registered
/// repository, for the token of a job whose `repositoryName` is that repository.
async fn git_route(
    State(app): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let path = uri.path().strip_prefix("/.executors/git/").unwrap_or("");
    let Some((name, route)) = crate::githttp::GitRoute::split(path) else {
        return Err(api_err(StatusCode::NOT_FOUND, format!("no git route for {}", uri.path())));
    };
    let (_caller, _queue, token_repo) = token_auth(&app, &headers).await?;
    if token_repo != name {
        return Err(api_err(StatusCode::FORBIDDEN, "invalid token for this repository"));
    }
    let lookup = name.to_string();
    let Some(dir) = db(&app, move |s| s.repo_path(&lookup)).await? else {
        return Err(api_err(StatusCode::NOT_FOUND, format!("repository {name:?} is not served here")));
    };
    let dir = std::path::PathBuf::from(dir);
    Ok(crate::githttp::serve(&dir, route, &method, uri.query(), &headers, body).await)
}

/// Checks a files-store bucket or key: plain path segments only.
fn file_name_ok(what: &str, s: &str) -> ApiResult<()> {
    let ok = !s.is_empty()
        && s.len() <= 1024
        && s.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg.chars().all(|c| c.is_ascii_alphanumeric() || "-_.~@+=".contains(c))
        });
    if ok {
        Ok(())
    } else {
        Err(api_err(StatusCode::BAD_REQUEST, format!("malformed {what} {s:?}")))
    }
}

fn file_blob_path(app: &App, sha256: &str) -> std::path::PathBuf {
    app.cfg.data_dir.join("files").join(sha256)
}

/// `GET`/`HEAD /.executors/files/{bucket}/{key}`: a file the job's own payload references.
async fn files_get(
    State(app): State<Shared>,
    params: std::result::Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let (bucket, key) = params
        .map(|Path(p)| p)
        .map_err(|e| api_err(StatusCode::BAD_REQUEST, format!("invalid path: {e}")))?;
    file_name_ok("bucket", &bucket)?;
    file_name_ok("key", &key)?;
    let (caller, _queue, _repo) = token_auth(&app, &headers).await?;
    let (b, k) = (bucket.clone(), key.clone());
    let (payload, file) = db(&app, move |s| Ok((s.payload(caller.id)?, s.file(&b, &k)?))).await?;
    let referenced = payload
        .and_then(|p| serde_json::from_str::<serde_json::Value>(&p).ok())
        .and_then(|v| v.get("files").and_then(|f| f.as_object()).cloned())
        .map(|files| {
            files.values().any(|f| {
                f.get("bucket").and_then(|x| x.as_str()) == Some(bucket.as_str())
                    && f.get("key").and_then(|x| x.as_str()) == Some(key.as_str())
            })
        })
        .unwrap_or(false);
    if !referenced {
        return Err(api_err(StatusCode::FORBIDDEN, "the job does not reference this file"));
    }
    let Some((sha, size)) = file else {
        return Err(api_err(StatusCode::NOT_FOUND, format!("no file {bucket}/{key}")));
    };
    let f = tokio::fs::File::open(file_blob_path(&app, &sha))
        .await
        .with_context(|| format!("opening the stored file {bucket}/{key}"))?;
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream")),
            (header::CONTENT_LENGTH, HeaderValue::from(size)),
        ],
        Body::from_stream(tokio_util::io::ReaderStream::new(f)),
    )
        .into_response())
}

/// `PUT /api/files/{bucket}/{key}`: stores a file (admin), content-addressed on disk.
async fn put_file(
    State(app): State<Shared>,
    params: std::result::Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    admin_auth(&app, &headers)?;
    let (bucket, key) = params
        .map(|Path(p)| p)
        .map_err(|e| api_err(StatusCode::BAD_REQUEST, format!("invalid path: {e}")))?;
    file_name_ok("bucket", &bucket)?;
    file_name_ok("key", &key)?;
    let bytes = read_limited(body, app.cfg.artifact_max_bytes as usize).await?;
    let sha = hex::encode(Sha256::digest(&bytes));
    let dir = app.cfg.data_dir.join("files");
    let dest = file_blob_path(&app, &sha);
    let size = bytes.len() as i64;
    tokio::task::spawn_blocking(move || -> Result<()> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        crate::base::fs::write_atomic(&dest, &bytes)
    })
    .await
    .map_err(|e| anyhow::anyhow!("file store task failed: {e}"))??;
    let (b, k, s2) = (bucket.clone(), key.clone(), sha.clone());
    db(&app, move |s| s.put_file(&b, &k, &s2, size, store::now_ms())).await?;
    json_response(
        StatusCode::CREATED,
        &serde_json::json!({"bucket": bucket, "key": key, "sha256": sha, "size": size}),
    )
}

async fn list_files(State(app): State<Shared>, headers: HeaderMap) -> ApiResult<Response> {
    admin_auth(&app, &headers)?;
    let files = db(&app, |s| s.files()).await?;
    json_response(StatusCode::OK, &serde_json::json!({ "files": files }))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AddRepo {
    name: String,
    path: String,
}

/// `POST /api/repos {"name", "path"}`: serves the git repository at `path` (on this host) as
/// `name`. The path must be an existing git repository.
async fn add_repo(State(app): State<Shared>, headers: HeaderMap, body: Body) -> ApiResult<Response> {
    admin_auth(&app, &headers)?;
    let req: AddRepo = read_json(body, app.json_limit).await?;
    crate::git::validate_repository_name(&req.name)
        .map_err(|e| api_err(StatusCode::BAD_REQUEST, format!("{e:#}")))?;
    let path = std::path::PathBuf::from(&req.path);
    if !path.is_absolute() {
        return Err(api_err(
            StatusCode::BAD_REQUEST,
            format!("repository path {:?} must be absolute", req.path),
        ));
    }
    let check = tokio::process::Command::new("git")
        .arg("-C")
        .arg(&path)
        .args(["rev-parse", "--git-dir"])
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .await
        .context("running git rev-parse")?;
    if !check.status.success() {
        return Err(api_err(StatusCode::BAD_REQUEST, format!("{} is not a git repository", path.display())));
    }
    let (name, p) = (req.name.clone(), path.to_string_lossy().into_owned());
    db(&app, move |s| s.add_repo(&name, &p, store::now_ms())).await?;
    json_response(StatusCode::CREATED, &serde_json::json!({"name": req.name, "path": req.path}))
}

async fn list_repos(State(app): State<Shared>, headers: HeaderMap) -> ApiResult<Response> {
    admin_auth(&app, &headers)?;
    let repos = db(&app, |s| s.repos()).await?;
    json_response(StatusCode::OK, &serde_json::json!({ "repos": repos }))
}

/// `DELETE /api/repos?name=NAME`.
async fn remove_repo(
    State(app): State<Shared>,
    query: std::result::Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    admin_auth(&app, &headers)?;
    let q = query_params(query)?;
    let name = q.get("name").cloned().ok_or_else(|| api_err(StatusCode::BAD_REQUEST, "missing ?name="))?;
    let n = name.clone();
    if db(&app, move |s| s.remove_repo(&n)).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(api_err(StatusCode::NOT_FOUND, format!("repository {name:?} is not registered")))
    }
}
