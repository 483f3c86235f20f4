//! Jobs kept for `executor debug` (our extensions of the executor protocol, which Sourcegraph's
//! executor never sends and a Sourcegraph instance ignores): the `keptJobs` a heartbeat reports
//! and the `releaseIds` its answer carries, the `debugAttach` record of each attach (executor
//! secret), and the admin's `POST /api/jobs/{id}/release`.

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;

use super::auth::{AdminToken, ExecutorSecret, KnownQueue};
use super::{db, http_err, job_id_param, json_response, read_json, HttpResult, Shared};
use crate::protocol::{self, DebugAttach, ExecutionLogEntry, KeptJob};
use crate::server::store::StoreError;

/// Records the kept jobs of a heartbeat (`default_queue`: the single-queue route's, for uids
/// without one); returns the uids, as the executor sent them, that it should release.
pub(super) async fn heartbeat_kept(
    app: &Shared,
    executor: &str,
    kept: &[KeptJob],
    default_queue: Option<&str>,
) -> HttpResult<Vec<String>> {
    let mut rows = Vec::new();
    let mut uids = Vec::new();
    for k in kept {
        let (id, queue) = match (protocol::split_uid(&k.id), default_queue) {
            (Some((id, Some(q))), _) => (id, q.to_string()),
            (Some((id, None)), Some(q)) => (id, q.to_string()),
            _ => return Err(http_err(StatusCode::BAD_REQUEST, format!("invalid kept job id {:?}", k.id))),
        };
        let until = chrono::DateTime::parse_from_rfc3339(&k.until)
            .map_err(|e| http_err(StatusCode::BAD_REQUEST, format!("kept job {:?}: until: {e}", k.id)))?;
        rows.push((id, queue.clone(), until.timestamp_millis()));
        uids.push(((id, queue), k.id.clone()));
    }
    let executor = executor.to_string();
    let release = match app.store.call(move |s| s.heartbeat_kept(&executor, &rows)).await {
        Ok(r) => r,
        Err(StoreError::OverCap(why)) => return Err(http_err(StatusCode::PAYLOAD_TOO_LARGE, why)),
        Err(e) => return Err(e.into()),
    };
    Ok(uids.into_iter().filter(|(r, _)| release.contains(r)).map(|(_, uid)| uid).collect())
}

/// `POST /.executors/queue/{queue}/debugAttach`: one attach, as a `debug.attach` entry of the
/// job's log (redacted with the job's secrets as every entry is).
pub(super) async fn debug_attach(
    State(app): State<Shared>,
    KnownQueue(_queue): KnownQueue,
    _: ExecutorSecret,
    body: Body,
) -> HttpResult<Response> {
    let req: DebugAttach = read_json(body, app.json_limit).await?;
    let start = chrono::DateTime::parse_from_rfc3339(&req.started_at)
        .map_err(|e| http_err(StatusCode::BAD_REQUEST, format!("startedAt: {e}")))?
        .with_timezone(&chrono::Utc);
    let what = match &req.command {
        Some(c) => format!("ran `{c}`"),
        None => "opened a shell".to_string(),
    };
    let entry = ExecutionLogEntry {
        key: "debug.attach".into(),
        command: Some(vec!["executor".into(), "debug".into(), req.job_id.to_string()]),
        start_time: start,
        exit_code: Some(req.exit_code),
        out: Some(format!(
            "{} attached on {} at {} and {what} for {:.1} s (exit status {})\n",
            req.who,
            req.executor_name,
            start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            req.duration_ms as f64 / 1000.0,
            req.exit_code
        )),
        duration_ms: Some(req.duration_ms as i64),
    };
    let cap = app.cfg.log_cap_bytes;
    let (id, executor) = (req.job_id, req.executor_name.clone());
    let r = app.store.call(move |s| s.add_attach_log(id, &executor, &entry, cap)).await;
    if r.is_ok() {
        app.logs_changed.notify_waiters();
    }
    match r {
        Ok(entry_id) => json_response(StatusCode::OK, &entry_id),
        Err(StoreError::UnknownJob) => Err(http_err(
            StatusCode::CONFLICT,
            format!("job {} did not fail on {}", req.job_id, req.executor_name),
        )),
        Err(StoreError::OverCap(why)) => Err(http_err(StatusCode::PAYLOAD_TOO_LARGE, why)),
        Err(e) => Err(e.into()),
    }
}

/// `POST /api/jobs/{id}/release`: asks the executor keeping the job's sandbox to release it at
/// its next heartbeat.
pub(super) async fn release_job(
    State(app): State<Shared>,
    _: AdminToken,
    id: std::result::Result<Path<String>, PathRejection>,
) -> HttpResult<Response> {
    let id = job_id_param(id)?;
    match db(&app, move |s| s.request_release(id)).await? {
        Some(k) => json_response(StatusCode::OK, &k),
        None => Err(http_err(StatusCode::NOT_FOUND, format!("job {id} is not kept for debugging anywhere"))),
    }
}
