//! The admin API under `/api/jobs` and `/api/executors` (submit, list, show, cancel, artifacts,
//! executors), and `/metrics` and `/api/queues` (admin or metrics token). Submitted jobs are
//! validated here.

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;

use super::auth::{AdminToken, MetricsReader};
use super::{db, http_err, job_id_param, json_response, query_params, read_json, HttpResult, Shared};
use crate::base::trace;
use crate::protocol::Job;
use crate::server::store::{self, CancelResult, JobState};

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
    "tenant",
    "traceparent",
    "caches",
    "networkAllowHosts",
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

/// The longest `tenant` a job may carry.
const MAX_TENANT: usize = 256;

/// A submitted job, validated: its queue, normalised payload, repository name and tenant key
/// (its `tenant`, else its repository).
#[derive(Debug)]
struct Submission {
    queue: String,
    payload: String,
    repository: String,
    tenant: String,
}

/// Validates a submitted job, lets `stamp` add what the coordinator adds (its queue is the
/// first argument).
fn validate_submission(
    value: serde_json::Value,
    queues: &[String],
    stamp: impl FnOnce(&str, &mut Job),
) -> std::result::Result<Submission, String> {
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
    for h in job.network_allow_hosts.iter().flatten() {
        crate::network::hosts::HostRule::parse(h).map_err(|e| format!("networkAllowHosts: {e:#}"))?;
    }
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
    if job.tenant.len() > MAX_TENANT || job.tenant.chars().any(char::is_control) {
        return Err(format!("tenant must be at most {MAX_TENANT} bytes without control characters"));
    }
    if !job.traceparent.is_empty() && !crate::base::trace::valid_traceparent(&job.traceparent) {
        return Err("traceparent must be a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)".into());
    }
    job.version = 2;
    job.id = 0;
    job.token = String::new();
    job.queue = String::new();
    stamp(&queue, &mut job);
    let payload = serde_json::to_string(&job).map_err(|e| format!("encoding the job: {e}"))?;
    let tenant = if job.tenant.is_empty() { job.repository_name.clone() } else { job.tenant };
    Ok(Submission { queue, payload, repository: job.repository_name, tenant })
}

pub(super) async fn submit_job(
    State(app): State<Shared>,
    _: AdminToken,
    headers: axum::http::HeaderMap,
    body: Body,
) -> HttpResult<Response> {
    let value: serde_json::Value = read_json(body, app.json_limit).await?;
    // The submit span continues the submitter's trace (its `traceparent` header, else the job's
    // field); the job carries the submit span's context (or the submitter's, when this
    // coordinator exports no traces) and its submit time to the executor.
    let header =
        headers.get("traceparent").and_then(|v| v.to_str().ok()).filter(|v| trace::valid_traceparent(v));
    let mut submit = None;
    let sub = validate_submission(value, &app.cfg.queues, |queue, job| {
        let now = chrono::Utc::now();
        job.queued_at = Some(now);
        let parent = header.map(str::to_string).or(Some(std::mem::take(&mut job.traceparent)));
        let span = trace::Trace::start(
            "submit",
            parent.as_deref(),
            trace::SpanKind::Producer,
            now.into(),
            vec![
                trace::KeyValue::new("executor.queue", queue.to_string()),
                trace::KeyValue::new("executor.repository", job.repository_name.clone()),
            ],
        );
        job.traceparent = span.traceparent().or(parent).unwrap_or_default();
        submit = Some(span);
    })
    .map_err(|e| http_err(StatusCode::BAD_REQUEST, e))?;
    let id = db(&app, move |s| {
        s.submit_for(&sub.queue, &sub.payload, &sub.repository, &sub.tenant, store::now_ms())
    })
    .await?;
    if let Some(span) = &submit {
        span.set("executor.job.id", id);
    }
    app.metrics.jobs_submitted.fetch_add(1, Ordering::Relaxed);
    app.jobs_changed.notify_waiters();
    json_response(StatusCode::CREATED, &serde_json::json!({ "id": id }))
}

pub(super) async fn list_jobs(
    State(app): State<Shared>,
    _: AdminToken,
    query: std::result::Result<Query<HashMap<String, String>>, QueryRejection>,
) -> HttpResult<Response> {
    let q = query_params(query)?;
    let queue = q.get("queue").cloned();
    if let Some(queue) = &queue {
        if !app.cfg.queues.contains(queue) {
            return Err(http_err(StatusCode::BAD_REQUEST, format!("unknown queue {queue:?}")));
        }
    }
    let state = q.get("state").cloned();
    let state = match state {
        None => None,
        Some(name) => match JobState::from_name(&name) {
            Some(state) => Some(state),
            None => {
                let names: Vec<_> = JobState::ALL.iter().map(|s| s.as_str()).collect();
                return Err(http_err(
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
            _ => return Err(http_err(StatusCode::BAD_REQUEST, format!("invalid limit {l:?}: 1 to 100000"))),
        },
    };
    let jobs = db(&app, move |s| s.list(queue.as_deref(), state, limit)).await?;
    json_response(StatusCode::OK, &serde_json::json!({ "jobs": jobs }))
}

/// The stored payload as the admin API shows it: `redactedValues` replaced by their count,
/// `dockerAuthConfig` and file contents by their length and SHA-256, and every string with a
/// secret in it redacted.
pub(super) fn admin_payload(payload: &str) -> Result<serde_json::Value> {
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
    // What is, or may hold, a secret shows as its length and digest: registry credentials and
    // the files a job writes (a key, a token file).
    fn digest(bytes: &[u8]) -> serde_json::Value {
        use sha2::Digest;
        serde_json::json!({"bytes": bytes.len(), "sha256": hex::encode(sha2::Sha256::digest(bytes))})
    }
    let v2 = v.get("version").and_then(serde_json::Value::as_i64) == Some(2);
    if let Some(obj) = v.as_object_mut() {
        obj.remove("redactedValues");
        obj.remove("id");
        obj.remove("token");
        obj.insert("redactedValueCount".into(), secrets.len().into());
        if let Some(auth) = obj.get_mut("dockerAuthConfig").filter(|a| !a.is_null()) {
            *auth = digest(auth.to_string().as_bytes());
        }
        if let Some(files) = obj.get_mut("files").and_then(serde_json::Value::as_object_mut) {
            for f in files.values_mut() {
                if let Some(c) = f.as_object_mut().and_then(|f| f.remove("content")) {
                    let text = c.as_str().map(str::to_string).unwrap_or_else(|| c.to_string());
                    // Version 2 payloads hold the content in base64: the digest is of the bytes.
                    let bytes = if v2 {
                        use base64::Engine;
                        base64::engine::general_purpose::STANDARD
                            .decode(&text)
                            .unwrap_or_else(|_| text.clone().into_bytes())
                    } else {
                        text.into_bytes()
                    };
                    if let Some(f) = f.as_object_mut() {
                        f.insert("content".into(), digest(&bytes));
                    }
                }
            }
        }
    }
    walk(&mut v, &redactor);
    Ok(v)
}

/// `GET /api/jobs/{id}`: the job, its payload as the admin API shows it, its artifacts and
/// (unless `?logs=false`, for a client that streams them from `/logs`) its log entries,
/// serialised straight from the rows: a job with tens of megabytes of log is one copy of it.
pub(super) async fn show_job(
    State(app): State<Shared>,
    _: AdminToken,
    id: std::result::Result<Path<String>, PathRejection>,
    query: std::result::Result<Query<HashMap<String, String>>, QueryRejection>,
) -> HttpResult<Response> {
    let id = job_id_param(id)?;
    let with_logs = match query_params(query)?.get("logs").map(String::as_str) {
        None | Some("true") | Some("1") => true,
        Some("false") | Some("0") => false,
        Some(other) => {
            return Err(http_err(StatusCode::BAD_REQUEST, format!("invalid logs value {other:?}")))
        }
    };
    let found = db(&app, move |s| match s.job(id)? {
        Some(job) => Ok(Some((job, if with_logs { Some(s.logs(id)?) } else { None }, s.kept_on(id)?))),
        None => Ok(None),
    })
    .await?;
    let Some((job, logs, kept)) = found else {
        return Err(http_err(StatusCode::NOT_FOUND, format!("no job {id}")));
    };
    #[derive(serde::Serialize)]
    struct JobView<'a> {
        #[serde(flatten)]
        row: &'a store::JobRow,
        job: serde_json::Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        logs: Option<&'a [store::StoredLogEntry]>,
        artifacts: &'a Option<store::ArtifactInfo>,
        #[serde(skip_serializing_if = "Option::is_none")]
        kept: Option<&'a store::KeptOn>,
    }
    let view = JobView {
        row: &job.row,
        job: admin_payload(&job.payload)?,
        logs: logs.as_deref(),
        artifacts: &job.artifacts,
        kept: kept.as_ref(),
    };
    json_response(StatusCode::OK, &view)
}

pub(super) async fn cancel_job(
    State(app): State<Shared>,
    _: AdminToken,
    id: std::result::Result<Path<String>, PathRejection>,
) -> HttpResult<Response> {
    let id = job_id_param(id)?;
    match db(&app, move |s| s.cancel(id, store::now_ms())).await? {
        CancelResult::NotFound => Err(http_err(StatusCode::NOT_FOUND, format!("no job {id}"))),
        CancelResult::AlreadyFinal(state) => {
            Err(http_err(StatusCode::CONFLICT, format!("job {id} already finished: it is {state}")))
        }
        CancelResult::Done(summary) => {
            app.logs_changed.notify_waiters();
            json_response(StatusCode::OK, &summary)
        }
    }
}

pub(super) async fn list_executors(State(app): State<Shared>, _: AdminToken) -> HttpResult<Response> {
    let active = app.cfg.active_window.as_millis() as i64;
    let rows = db(&app, move |s| s.executors(store::now_ms(), active)).await?;
    json_response(StatusCode::OK, &serde_json::json!({ "executors": rows }))
}

pub(super) async fn get_artifacts(
    State(app): State<Shared>,
    _: AdminToken,
    id: std::result::Result<Path<String>, PathRejection>,
) -> HttpResult<Response> {
    let id = job_id_param(id)?;
    artifacts_of(&app, id).await
}

/// The stored artifacts tarball of job `id` as a streamed answer.
pub(super) async fn artifacts_of(app: &Shared, id: i64) -> HttpResult<Response> {
    let detail = db(app, move |s| s.job(id)).await?;
    let Some(detail) = detail else { return Err(http_err(StatusCode::NOT_FOUND, format!("no job {id}"))) };
    if detail.artifacts.is_none() {
        return Err(http_err(StatusCode::NOT_FOUND, format!("job {id} has no artifacts")));
    }
    let path = app.artifact_dir.join(format!("{id}.tar.gz"));
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| http_err(StatusCode::NOT_FOUND, format!("artifacts of job {id} are gone: {e}")))?;
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

/// How long an executor's last metrics stay on `/metrics` after its last heartbeat.
const EXECUTOR_METRICS_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(300);

/// Each served queue's gauges now.
async fn gauges(app: &Shared) -> HttpResult<Vec<store::QueueGauge>> {
    let now = store::now_ms();
    let since = now - app.cfg.active_window.as_millis() as i64;
    let queues = app.cfg.queues.clone();
    db(app, move |s| s.queue_gauges(&queues, now, since)).await
}

/// `GET /api/queues`: each queue's depth, oldest queued job, running jobs and executors, for
/// an autoscaler (KEDA's `metrics-api` scaler: docs/coordinator.md).
pub(super) async fn list_queues(State(app): State<Shared>, _: MetricsReader) -> HttpResult<Response> {
    json_response(StatusCode::OK, &serde_json::json!({ "queues": gauges(&app).await? }))
}

/// `GET /api/queues/{queue}`: one queue's gauges.
pub(super) async fn show_queue(
    State(app): State<Shared>,
    _: MetricsReader,
    queue: std::result::Result<Path<String>, PathRejection>,
) -> HttpResult<Response> {
    let queue = super::path_param(queue)?;
    match gauges(&app).await?.into_iter().find(|g| g.name == queue) {
        Some(g) => json_response(StatusCode::OK, &g),
        None => Err(http_err(StatusCode::NOT_FOUND, format!("unknown queue {queue:?}"))),
    }
}

/// `/metrics` wants the admin token or the read-only metrics token: every job's network may
/// reach the coordinator's port (for uploads), and the text names executors, queues and load.
/// Prometheus sends it with `authorization: {type: Bearer, credentials_file: ...}`
/// (docs/coordinator.md).
pub(super) async fn metrics(State(app): State<Shared>, _: MetricsReader) -> HttpResult<Response> {
    let since = store::now_ms() - app.cfg.active_window.as_millis() as i64;
    let (counts, active) = db(&app, move |s| Ok((s.counts()?, s.active_executors(since)?))).await?;
    let gauges = gauges(&app).await?;
    let mut text = app.metrics.render(&counts, &app.cfg.queues, active, &gauges);
    let latest: Vec<(String, String)> = {
        let mut m = app.executor_metrics.lock().unwrap_or_else(|p| p.into_inner());
        // An executor silent for this long is gone; its last numbers go with it.
        let oldest = store::now_ms() - EXECUTOR_METRICS_MAX_AGE.as_millis() as i64;
        m.retain(|_, (at, _)| *at >= oldest);
        let mut v: Vec<(String, String)> = m.iter().map(|(k, (_, t))| (k.clone(), t.clone())).collect();
        v.sort();
        v
    };
    text.push_str(&crate::server::metrics::merge_executor_metrics(&latest));
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"))],
        text,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submissions_are_validated() {
        let qs = vec!["batches".to_string(), "codeintel".to_string()];
        let ok = serde_json::json!({"repositoryName": "r", "commit": "c",
            "dockerSteps": [{"image": "alpine", "commands": ["true"], "dir": "", "env": ["A=b"]}]});
        let sub = validate_submission(ok.clone(), &qs, |_, _| {}).unwrap();
        assert_eq!((sub.queue.as_str(), sub.repository.as_str(), sub.tenant.as_str()), ("batches", "r", "r"));
        assert!(sub.payload.contains("\"version\":2"));
        let mut team = ok.clone();
        team["tenant"] = "team-a".into();
        assert_eq!(validate_submission(team, &qs, |_, _| {}).unwrap().tenant, "team-a");
        let bad = |patch: serde_json::Value| {
            let mut v = ok.clone();
            for (k, val) in patch.as_object().unwrap() {
                v[k] = val.clone();
            }
            validate_submission(v, &qs, |_, _| {}).unwrap_err()
        };
        assert!(bad(serde_json::json!({"queue": "nope"})).contains("unknown queue"));
        assert!(bad(serde_json::json!({"token": "abc"})).contains("token"));
        assert!(bad(serde_json::json!({"id": 5})).contains("id"));
        assert!(bad(serde_json::json!({"files": {"../x": {"content": "a"}}})).contains("relative"));
        assert!(bad(serde_json::json!({"repositoryDirectory": "/etc"})).contains("relative"));
        assert!(bad(serde_json::json!({"dockerStep": []})).contains("unknown job field"));
        assert!(bad(serde_json::json!({"dockerSteps": 3})).contains("invalid job"));
        assert!(bad(serde_json::json!({"tenant": "a\nb"})).contains("tenant"));
        assert!(bad(serde_json::json!({"tenant": "t".repeat(257)})).contains("tenant"));
        assert!(validate_submission(serde_json::json!([1]), &qs, |_, _| {}).is_err());
        // The trace context: a submitter's traceparent is checked; queuedAt is the server's.
        assert!(bad(serde_json::json!({"traceparent": "00-abc-def-01"})).contains("W3C traceparent"));
        assert!(bad(serde_json::json!({"queuedAt": "2026-01-01T00:00:00Z"})).contains("unknown job field"));
        let mut traced = ok.clone();
        traced["traceparent"] = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into();
        let payload = validate_submission(traced, &qs, |q, job| {
            assert_eq!(q, "batches");
            job.queued_at = Some(chrono::Utc::now());
        })
        .unwrap()
        .payload;
        let stored: Job = serde_json::from_str(&payload).unwrap();
        assert!(stored.queued_at.is_some());
        assert_eq!(stored.traceparent, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert!(bad(serde_json::json!({"networkAllowHosts": ["ok.test", "bad host"]}))
            .contains("networkAllowHosts"));
        let mut hosts = ok.clone();
        hosts["networkAllowHosts"] = serde_json::json!(["*.github.com", "proxy.golang.org:443"]);
        let payload = validate_submission(hosts, &qs, |_, _| {}).unwrap().payload;
        assert!(
            payload.contains(r#""networkAllowHosts":["*.github.com","proxy.golang.org:443"]"#),
            "{payload}"
        );
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
}
