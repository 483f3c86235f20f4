//! The coordinator's HTTP side: the shared state, the error answer (`HttpError`, always
//! `{"error": "..."}`), request helpers, the router, the stalled-job resetter and the listener
//! (plain or TLS). The routes live beside this file by concern: `auth.rs` (extractors),
//! `executor_routes.rs` (the `/.executors/queue/` protocol), `admin.rs` (the admin API and
//! `/metrics`), `follow.rs` (a job's log stream and the ndjson follow), `git.rs` (repositories),
//! `files.rs` (the files store) and `console/` (the admin console's pages under `/admin/`).

mod admin;
mod auth;
mod console;
mod executor_routes;
mod files;
mod follow;
mod git;
mod kept;

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use http_body_util::BodyExt;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};

use super::metrics::Metrics;
use super::store::{self, Store, StoreError, StoreThread};
use super::ServeConfig;
use admin::{
    cancel_job, get_artifacts, list_executors, list_jobs, list_queues, metrics, show_job, show_queue,
    submit_job,
};
use executor_routes::{
    add_log_entry, dequeue_multi, dequeue_single, heartbeat_multi, heartbeat_single, mark_complete,
    mark_errored, mark_failed, put_artifacts, test_auth, update_log_entry,
};
use files::{files_get, list_files, put_file};
use follow::job_logs;
use git::{add_repo, git_route, list_repos, remove_repo};

/// Shared server state.
pub(crate) struct App {
    cfg: Arc<ServeConfig>,
    store: StoreThread,
    /// Fired when a job may have become dequeueable (submit, reset, retry).
    jobs_changed: Notify,
    /// Fired when a log entry or a job's state changed (for log follows).
    logs_changed: Notify,
    shutdown: watch::Sender<bool>,
    metrics: Metrics,
    /// The latest `prometheusMetrics` of each executor, with when it came (ms).
    executor_metrics: std::sync::Mutex<std::collections::HashMap<String, (i64, String)>>,
    secret_digest: [u8; 32],
    admin_digest: [u8; 32],
    /// The read-only metrics token's digest, if one is set.
    metrics_digest: Option<[u8; 32]>,
    /// The order of each queue's jobs (with the fair order's cursors).
    order: store::DequeueOrder,
    artifact_dir: std::path::PathBuf,
    json_limit: usize,
    /// How often a waiting dequeue looks again without a wake-up: with PostgreSQL a
    /// notification lost while the listener reconnects must not strand it until its deadline.
    recheck: Option<Duration>,
}

pub(crate) type Shared = Arc<App>;

impl App {
    fn new(cfg: Arc<ServeConfig>, store: StoreThread, artifact_dir: std::path::PathBuf) -> App {
        let (shutdown, _) = watch::channel(false);
        let json_limit = (cfg.log_cap_bytes.saturating_mul(2) + (1 << 20)).max(8 << 20) as usize;
        App {
            secret_digest: auth::digest(cfg.secret.as_bytes()),
            admin_digest: auth::digest(cfg.admin_token.as_bytes()),
            metrics_digest: cfg.metrics_token.as_ref().map(|t| auth::digest(t.as_bytes())),
            order: if cfg.fair_dequeue {
                store::DequeueOrder::Fair(Arc::new(store::Fairness::new(cfg.tenant_max_running)))
            } else {
                store::DequeueOrder::Fifo
            },
            cfg,
            store,
            jobs_changed: Notify::new(),
            logs_changed: Notify::new(),
            shutdown,
            metrics: Metrics::default(),
            executor_metrics: Default::default(),
            artifact_dir,
            json_limit,
            recheck: None,
        }
    }

    /// An app on an in-memory store serving `batches`, for unit tests.
    #[cfg(test)]
    fn for_tests() -> Shared {
        let cfg = ServeConfig::for_tests();
        let store = StoreThread::start(Store::open_in_memory().unwrap()).unwrap();
        Arc::new(App::new(Arc::new(cfg), store, std::path::PathBuf::from("/nonexistent")))
    }
}

/// An error answer: status plus a message for `{"error": ...}`. (Not `api::ApiError`, the
/// client's error.)
#[derive(Debug)]
pub(crate) struct HttpError {
    status: StatusCode,
    message: String,
}

fn http_err(status: StatusCode, message: impl Into<String>) -> HttpError {
    HttpError { status, message: message.into() }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message });
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        // A refusal made before the request's body was read: the server drops the connection
        // after answering, so say so, or a client's pool reuses it and its next request on it
        // fails with an unexpected EOF.
        if matches!(
            self.status,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::PAYLOAD_TOO_LARGE
        ) {
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

impl From<anyhow::Error> for HttpError {
    fn from(e: anyhow::Error) -> Self {
        // The database is down or restarting: the client retries later; the pool reconnects.
        if let Some(StoreError::Unavailable(why)) = e.downcast_ref::<StoreError>() {
            return http_err(StatusCode::SERVICE_UNAVAILABLE, why.clone());
        }
        tracing::error!("internal error: {e:#}");
        http_err(StatusCode::INTERNAL_SERVER_ERROR, format!("internal error: {e:#}"))
    }
}

type HttpResult<T> = std::result::Result<T, HttpError>;

impl From<StoreError> for HttpError {
    fn from(e: StoreError) -> Self {
        anyhow::Error::from(e).into()
    }
}

/// Runs `f` on the store thread.
pub(crate) async fn db<T, F>(app: &Shared, f: F) -> HttpResult<T>
where
    T: Send + 'static,
    F: FnOnce(&mut Store) -> store::Result<T> + Send + 'static,
{
    Ok(app.store.call(f).await?)
}

/// Reads a JSON body of at most `limit` bytes.
async fn read_json<T: serde::de::DeserializeOwned>(body: Body, limit: usize) -> HttpResult<T> {
    let bytes = read_limited(body, limit).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| http_err(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

/// Reads a body of at most `limit` bytes. A larger one is read to its end and dropped (up to
/// [`DRAIN_CAP`] bytes, for at most [`DRAIN_TIME`]) before the 413: answering while the client
/// still sends makes it see a broken pipe instead of the answer.
pub(crate) async fn read_limited(body: Body, limit: usize) -> HttpResult<bytes::Bytes> {
    let failed = |e: axum::Error| http_err(StatusCode::BAD_REQUEST, format!("reading the request body: {e}"));
    let mut body = body;
    let mut kept = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(failed)?.into_data() else { continue };
        if kept.len() + data.len() <= limit {
            kept.extend_from_slice(&data);
            continue;
        }
        let mut seen = kept.len() + data.len();
        let drain = async {
            while let Some(Ok(frame)) = body.frame().await {
                seen += frame.into_data().map(|d| d.len()).unwrap_or(0);
                if seen > DRAIN_CAP {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
        return Err(http_err(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than {limit} bytes"),
        ));
    }
    Ok(kept.freeze())
}

/// How much of a body over its limit is read and dropped before the 413.
const DRAIN_CAP: usize = 64 << 20;
/// How long a body over its limit is read before the 413.
const DRAIN_TIME: Duration = Duration::from_secs(10);

pub(crate) fn path_param(p: std::result::Result<Path<String>, PathRejection>) -> HttpResult<String> {
    p.map(|Path(s)| s).map_err(|e| http_err(StatusCode::BAD_REQUEST, format!("invalid path: {e}")))
}

pub(crate) fn query_params(
    q: std::result::Result<Query<HashMap<String, String>>, QueryRejection>,
) -> HttpResult<HashMap<String, String>> {
    q.map(|Query(m)| m).map_err(|e| http_err(StatusCode::BAD_REQUEST, format!("invalid query string: {e}")))
}

pub(crate) fn job_id_param(p: std::result::Result<Path<String>, PathRejection>) -> HttpResult<i64> {
    let s = path_param(p)?;
    match s.parse::<i64>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(http_err(
            StatusCode::BAD_REQUEST,
            format!("invalid job id {s:?}: expected a positive integer"),
        )),
    }
}

fn json_response(status: StatusCode, value: &impl serde::Serialize) -> HttpResult<Response> {
    let body = serde_json::to_vec(value).map_err(|e| anyhow::anyhow!("encoding the response: {e}"))?;
    Ok((status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response())
}

async fn not_found(method: Method, uri: Uri) -> HttpError {
    http_err(StatusCode::NOT_FOUND, format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> HttpError {
    http_err(StatusCode::METHOD_NOT_ALLOWED, format!("method {method} is not allowed on {}", uri.path()))
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
        .route("/.executors/queue/:queue/debugAttach", post(kept::debug_attach))
        .route("/api/jobs/:id/release", post(kept::release_job))
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
        .route("/api/queues", get(list_queues))
        .route("/api/queues/:queue", get(show_queue))
        .route("/admin", get(|| async { console_redirect() }))
        .route("/admin/", get(console::home))
        .route("/admin/sign-in", post(console::sign_in))
        .route("/admin/sign-out", post(console::sign_out))
        .route("/admin/executors", get(console::executors))
        .route("/admin/jobs", get(console::jobs))
        .route("/admin/jobs/:id", get(console::job))
        .route("/admin/jobs/:id/events", get(console::job_events))
        .route("/admin/jobs/:id/artifacts", get(console::artifacts))
        .route("/admin/jobs/:id/cancel", post(console::cancel))
        .route("/admin/jobs/:id/requeue", post(console::requeue))
        .route("/admin/repos", get(console::repos))
        .route("/admin/files", get(console::files))
        .route("/admin/assets/:name", get(console::asset))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Bodies are limited per route by `read_limited` and the artifact cap.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(app)
}

fn console_redirect() -> Response {
    (StatusCode::MOVED_PERMANENTLY, [(header::LOCATION, HeaderValue::from_static("/admin/"))]).into_response()
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
                    tracing::warn!(
                        "job {} ({}) stalled: no heartbeat for {age_text}; now {}",
                        r.id,
                        r.queue,
                        r.new_state
                    );
                }
                app.metrics.jobs_reset.fetch_add(resets.len() as u64, Ordering::Relaxed);
                app.jobs_changed.notify_waiters();
                app.logs_changed.notify_waiters();
            }
            Ok(_) => {}
            Err(e) => tracing::error!("stalled-job sweep failed: {}", e.message),
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
pub(super) async fn serve(cfg: Arc<ServeConfig>) -> Result<()> {
    let tls = match &cfg.tls {
        Some((cert, key)) => Some(load_tls(cert, key)?),
        None => None,
    };
    let data_dir = cfg.data_dir.clone();
    let pool = match &cfg.database {
        None => None,
        Some(opts) => {
            let pool = store::PgPool::new(opts)?;
            crate::base::fs::private_dir(&data_dir)
                .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
            let (p, dir) = (pool.clone(), data_dir.clone());
            match tokio::task::spawn_blocking(move || p.prepare(&dir)).await? {
                Ok(()) => {}
                // The database is down (or not up yet): serve anyway, answering 503 until a
                // background attempt prepares it. A wrong marker or a newer schema still stop
                // the replica here, before it serves.
                Err(StoreError::Unavailable(why)) => {
                    tracing::warn!(
                        "starting without the database, answering 503 until it is reachable: {why}"
                    );
                    tokio::spawn(prepare_later(pool.clone(), data_dir.clone()));
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("preparing the PostgreSQL database {}", pool.target))
                }
            }
            Some(pool)
        }
    };
    let store = match &pool {
        None => tokio::task::spawn_blocking(move || Store::open(&data_dir)).await??,
        Some(pool) => Store::postgres(pool.clone()),
    };
    let artifact_dir = cfg.data_dir.join("artifacts");
    crate::base::fs::private_dir(&artifact_dir)
        .with_context(|| format!("creating the artifacts directory {}", artifact_dir.display()))?;
    // Leftovers of uploads interrupted by a crash. (With several replicas sharing the
    // directory, only old ones: another replica may be writing a young one right now.)
    if let Ok(rd) = std::fs::read_dir(&artifact_dir) {
        for e in rd.flatten() {
            let old = pool.is_none()
                || e.metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > Duration::from_secs(24 * 3600)));
            if old && e.file_name().to_string_lossy().starts_with(".upload-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let mut app =
        App::new(cfg.clone(), StoreThread::start(store).context("starting the store thread")?, artifact_dir);
    if pool.is_some() {
        app.recheck = Some(PG_RECHECK);
    }
    let app = Arc::new(app);
    if let Some(pool) = &pool {
        let waker = app.clone();
        store::pg::spawn_listener(pool, move || waker.jobs_changed.notify_waiters())
            .context("starting the notification listener")?;
    }
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let local = listener.local_addr().context("reading the listening address")?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{local}");
    if let Some(path) = &cfg.addr_file {
        write_addr_file(path, &url)?;
    }
    let database = match &pool {
        Some(p) => format!("PostgreSQL database {}, ", p.target),
        None => String::new(),
    };
    tracing::info!(
        "serving {} on {url} ({database}data in {})",
        cfg.queues.join(", "),
        cfg.data_dir.display()
    );
    tokio::spawn(stalled_resetter(app.clone()));
    if pool.is_none() {
        start_checkpointer(&app, cfg.data_dir.clone()).await?;
    }
    serve_http(app, listener, tls).await
}

/// Prepares the database of a replica that started without it, once it is reachable. A
/// failure other than "unavailable" (another database's marker, a newer schema) would serve
/// wrong answers: the replica stops.
async fn prepare_later(pool: store::PgPool, data_dir: std::path::PathBuf) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (p, dir) = (pool.clone(), data_dir.clone());
        match tokio::task::spawn_blocking(move || p.prepare(&dir)).await {
            Ok(Ok(())) => {
                tracing::info!("the PostgreSQL database {} is reachable: serving", pool.target);
                return;
            }
            Ok(Err(StoreError::Unavailable(_))) => {}
            Ok(Err(e)) => {
                tracing::error!("preparing the PostgreSQL database {}: {e:#}; stopping", pool.target);
                std::process::exit(1); // as `main` ends on an error
            }
            Err(e) => {
                tracing::error!("preparing the PostgreSQL database {}: {e}; stopping", pool.target);
                std::process::exit(1); // as `main` ends on an error
            }
        }
    }
}

/// How often a waiting dequeue looks again on PostgreSQL without a notification.
const PG_RECHECK: Duration = Duration::from_secs(2);

/// Copies SQLite's WAL back into the database every half second, off the store thread.
async fn start_checkpointer(app: &Shared, data_dir: std::path::PathBuf) -> Result<()> {
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
                tracing::error!("{e:#}");
            }
        }
    });
    Ok(())
}

async fn serve_http(
    app: Shared,
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Result<()> {
    let routes = router(app.clone());
    let shutdown_app = app.clone();
    let on_signal = async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = shutdown_app.shutdown.send(true);
    };
    match tls {
        None => {
            // Without TCP_NODELAY, a response's last small write (the end of a chunked git
            // body) waits for the client's delayed ACK: 40 ms per git request on loopback.
            axum::serve(listener, routes)
                .tcp_nodelay(true)
                .with_graceful_shutdown(on_signal)
                .await
                .context("serving HTTP")?;
        }
        Some(acceptor) => {
            tokio::pin!(on_signal);
            loop {
                let (tcp, _) = tokio::select! {
                    _ = &mut on_signal => break,
                    r = listener.accept() => match r {
                        Ok(v) => v,
                        Err(e) => {
                            tracing::warn!("accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                // As above: no Nagle delay on a response's last write.
                let _ = tcp.set_nodelay(true);
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
