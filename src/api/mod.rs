//! The coordinator client: one function per route of the executor protocol, the contract's auth
//! headers, and jittered exponential retries (transport errors, 5xx except 501, 429; never other
//! 4xx). Blocking (ureq), over HTTP or HTTPS, trusting and proxying as every client of the
//! executor does (`base::http`: the web roots, the system trust store, an optional private CA;
//! `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`).

pub(crate) mod metrics;

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use rand::Rng;

use crate::base::http;
use crate::base::secret::Secret;
use crate::protocol::{
    AddExecutionLogEntryRequest, DequeueRequest, ExecutionLogEntry, ExecutorTelemetry, HeartbeatRequest,
    HeartbeatRequestV1, HeartbeatResponse, Job, JobOperationRequest, MarkErrorRequest, QueueJobIds,
    EXTENSION_LOG_APPEND, HEADER_EXECUTOR_NAME, HEADER_EXTENSIONS, HEADER_JOB_ID, SCHEME_EXECUTOR,
};

/// The Sourcegraph release whose executor protocol this executor implements (the contract
/// covers 5.1 to 5.3). [`VERSION`] spells it out again (`concat!` takes only literals); a test
/// checks that they agree.
#[cfg(test)]
const PROTOCOL_VERSION: &str = "5.3.0";

/// The executor's version on the wire: the protocol version it speaks, which earns v2 job
/// payloads (`>= 4.3.0`) and is compared with the instance's on Sourcegraph's admin page, with
/// this build in the semver build metadata (ignored by every comparison): `5.3.0+executor.0.1.0`.
pub(crate) const VERSION: &str = concat!("5.3.0+executor.", env!("CARGO_PKG_VERSION"));

/// Largest response body read (a job with inline files can be big, but not unbounded).
const MAX_BODY: u64 = 128 << 20;

/// A failed call, typed so that callers can tell a lost job (404 on mark*) or an unsupported
/// extension (4xx on an append) from a broken connection.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{route}: unexpected status code {status}{detail}")]
    Status { route: String, status: u16, detail: String },
    #[error("{route}: {message}")]
    Transport { route: String, message: String },
    /// The coordinator was not reached: `kind` says how it failed, `advice` what to set.
    #[error("{route}: {kind}: {message}")]
    Unreachable { route: String, kind: &'static str, message: String, advice: String },
}

impl ApiError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            ApiError::Transport { .. } | ApiError::Unreachable { .. } => None,
        }
    }

    /// What the operator checks or sets about this failure, when there is something to say.
    pub(crate) fn advice(&self) -> Option<String> {
        match self {
            ApiError::Unreachable { advice, .. } => Some(advice.clone()),
            ApiError::Status { status: 401 | 403, .. } => Some(
                "the coordinator refuses the shared secret: check EXECUTOR_FRONTEND_PASSWORD (the \
                 instance's executors.accessToken)"
                    .into(),
            ),
            ApiError::Status { status: 407, .. } => Some(
                "the proxy asks for credentials: put them in the proxy URL (http://user:password@host:port)"
                    .into(),
            ),
            ApiError::Status { status: 404, .. } => {
                Some("check EXECUTOR_FRONTEND_URL: it is the instance's root URL, without a path".into())
            }
            _ => None,
        }
    }
}

/// What a job may use on this executor, sent with each dequeue (`numCPUs`, `memory`,
/// `diskSpace`): codeintel turns them into the steps' `VM_*` variables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Resources {
    pub num_cpus: i64,
    pub memory: String,
    pub disk_space: String,
}

/// A successful response.
struct Reply {
    status: u16,
    body: Vec<u8>,
    extensions: Extensions,
}

/// The protocol extensions a coordinator advertised ([`HEADER_EXTENSIONS`]); Sourcegraph
/// advertises none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Extensions {
    /// Log entry updates may carry deltas (`"append": true`).
    pub log_append: bool,
}

impl Extensions {
    pub(crate) fn parse(header: &str) -> Extensions {
        let names = || header.split(',').map(str::trim);
        Extensions { log_append: names().any(|n| n.eq_ignore_ascii_case(EXTENSION_LOG_APPEND)) }
    }
}

/// The contract's retry policy (section 3.8).
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base: Duration,
    pub max: Duration,
    pub retry_after_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 20,
            base: Duration::from_millis(50),
            max: Duration::from_secs(1),
            retry_after_max: Duration::from_secs(3),
        }
    }
}

impl RetryPolicy {
    /// Full jitter: a random delay between 0 and min(max, base * 2^attempt).
    pub fn delay(&self, attempt: u32) -> Duration {
        let cap = self.base.saturating_mul(1u32 << attempt.min(16)).min(self.max);
        let ms = cap.as_millis() as u64;
        Duration::from_millis(if ms == 0 { 0 } else { rand::thread_rng().gen_range(0..=ms) })
    }
}

/// Whether a status is worth retrying.
pub(crate) fn retryable_status(status: u16) -> bool {
    status == 429 || (500..600).contains(&status) && status != 501
}

/// The per-job credentials of job routes.
#[derive(Debug, Clone)]
pub(crate) struct JobAuth {
    pub id: i64,
    pub token: Secret,
    /// The route's `{queue}`.
    pub queue: String,
}

impl JobAuth {
    pub(crate) fn for_job(job: &Job, queue: &str) -> Self {
        JobAuth { id: job.id, token: Secret::new(job.token.clone()), queue: queue.to_string() }
    }
}

enum Auth<'a> {
    Executor,
    Job(&'a JobAuth),
}

enum Body<'a> {
    None,
    Json(Vec<u8>),
    File(&'a Path, &'a str),
}

/// A client for one coordinator, as one executor (name).
#[derive(Clone)]
pub(crate) struct Client {
    agent: ureq::Agent,
    /// The proxy (`host:port`) the agent goes through, for messages.
    proxy: Option<String>,
    base: String,
    secret: Secret,
    executor_name: String,
    retry: RetryPolicy,
    metrics_sources: Arc<metrics::Sources>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).field("executor", &self.executor_name).finish()
    }
}

/// `<hostname>-<uuid v4>`.
pub(crate) fn new_executor_name() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "executor".into());
    format!("{host}-{}", uuid::Uuid::new_v4())
}

impl Client {
    /// A client for `base_url` (no trailing slash) that trusts the extra CA certificates in the
    /// PEM file `ca` (if any) and authenticates with the executors' shared `secret`.
    pub(crate) fn new(
        ca: Option<&Path>,
        secret: &Secret,
        base_url: &str,
        executor_name: &str,
    ) -> Result<Client> {
        let make = || {
            ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(10))
                .timeout_read(Duration::from_secs(90))
                .timeout_write(Duration::from_secs(90))
                .redirects(0)
                .user_agent(&format!("executor/{VERSION}"))
        };
        let agents = http::Agents::new(make, base_url.starts_with("https://"), ca)?;
        Ok(Client {
            agent: agents.for_url(base_url).clone(),
            proxy: agents.proxy_for(base_url),
            base: base_url.trim_end_matches('/').to_string(),
            secret: secret.clone(),
            executor_name: executor_name.to_string(),
            retry: RetryPolicy::default(),
            metrics_sources: Arc::new(metrics::Sources::default()),
        })
    }

    /// Exporters whose metrics each heartbeat forwards after the executor's own.
    pub(crate) fn with_metrics_sources(mut self, sources: metrics::Sources) -> Self {
        self.metrics_sources = Arc::new(sources);
        self
    }

    #[cfg(test)]
    fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub(crate) fn executor_name(&self) -> &str {
        &self.executor_name
    }

    pub(crate) fn base_url(&self) -> &str {
        &self.base
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        auth: Auth,
        body: Body,
        timeout: Option<Duration>,
    ) -> Result<(u16, Vec<u8>), ApiError> {
        self.call_reply(method, path, auth, body, timeout).map(|r| (r.status, r.body))
    }

    /// [`Client::call`], with the extensions the response advertised.
    fn call_reply(
        &self,
        method: &str,
        path: &str,
        auth: Auth,
        body: Body,
        timeout: Option<Duration>,
    ) -> Result<Reply, ApiError> {
        let route = format!("{method} {}", path.split('?').next().unwrap_or(path));
        let started = std::time::Instant::now();
        let res = self.call_attempts(method, path, auth, body, timeout, route.clone());
        metrics::request_done(&route, res.is_ok(), started.elapsed().as_secs_f64());
        res
    }

    /// [`Client::call_reply`]'s attempts, retried by the client's policy.
    fn call_attempts(
        &self,
        method: &str,
        path: &str,
        auth: Auth,
        body: Body,
        timeout: Option<Duration>,
        route: String,
    ) -> Result<Reply, ApiError> {
        let url = format!("{}{}", self.base, path);
        let mut attempt = 0;
        loop {
            let mut req = self.agent.request(method, &url);
            if let Some(t) = timeout {
                req = req.timeout(t);
            }
            req = match auth {
                Auth::Executor => {
                    req.set("Authorization", &format!("{SCHEME_EXECUTOR} {}", self.secret.expose()))
                }
                Auth::Job(job) => {
                    let value = if job.token.expose().is_empty() {
                        format!("{SCHEME_EXECUTOR} {}", self.secret.expose())
                    } else {
                        format!("Bearer {}", job.token.expose())
                    };
                    req.set("Authorization", &value)
                        .set(HEADER_JOB_ID, &job.id.to_string())
                        .set(HEADER_EXECUTOR_NAME, &self.executor_name)
                }
            };
            let res = match &body {
                Body::None => req.call(),
                Body::Json(b) => req.set("Content-Type", "application/json").send_bytes(b),
                Body::File(p, ctype) => match std::fs::File::open(p) {
                    Ok(f) => {
                        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                        req.set("Content-Type", ctype).set("Content-Length", &len.to_string()).send(f)
                    }
                    Err(e) => {
                        return Err(ApiError::Transport {
                            route,
                            message: format!("opening {}: {e}", p.display()),
                        })
                    }
                },
            };
            let (retry, err, retry_after) = match res {
                Ok(resp) => {
                    let status = resp.status();
                    let extensions = Extensions::parse(resp.header(HEADER_EXTENSIONS).unwrap_or(""));
                    let mut bytes = Vec::new();
                    resp.into_reader().take(MAX_BODY).read_to_end(&mut bytes).map_err(|e| {
                        ApiError::Transport {
                            route: route.clone(),
                            message: format!("reading the response: {e}"),
                        }
                    })?;
                    if status == 200 || status == 201 || status == 204 {
                        return Ok(Reply { status, body: bytes, extensions });
                    }
                    // 1xx/3xx: the contract treats anything but 200/204 as an error.
                    (false, ApiError::Status { route: route.clone(), status, detail: String::new() }, None)
                }
                Err(ureq::Error::Status(status, resp)) => {
                    let retry_after = resp
                        .header("Retry-After")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let mut text = String::new();
                    let _ = resp.into_reader().take(2048).read_to_string(&mut text);
                    let detail = error_detail(&text);
                    (
                        retryable_status(status),
                        ApiError::Status { route: route.clone(), status, detail },
                        retry_after,
                    )
                }
                Err(ureq::Error::Transport(t)) => {
                    let failure = http::Failure::of(&t);
                    let retry = match t.kind() {
                        ureq::ErrorKind::InvalidUrl
                        | ureq::ErrorKind::UnknownScheme
                        | ureq::ErrorKind::TooManyRedirects
                        | ureq::ErrorKind::InsecureRequestHttpsOnly => false,
                        // DNS not-found is given up after 3 attempts.
                        ureq::ErrorKind::Dns => attempt < 2,
                        // An unknown TLS authority does not get better by asking again.
                        _ if failure == http::Failure::Certificate => false,
                        _ => true,
                    };
                    (retry, self.unreachable(&route, &url, failure, &t), None)
                }
            };
            attempt += 1;
            if !retry || attempt >= self.retry.max_attempts {
                return Err(err);
            }
            let delay = match retry_after {
                Some(d) if d <= self.retry.retry_after_max => d,
                _ => self.retry.delay(attempt),
            };
            std::thread::sleep(delay);
        }
    }

    /// A transport failure, with what to set about it.
    fn unreachable(&self, route: &str, url: &str, failure: http::Failure, t: &ureq::Transport) -> ApiError {
        let target = match http::Target::parse(url) {
            Some(t) if t.host.contains(':') => format!("[{}]:{}", t.host, t.port),
            Some(t) => format!("{}:{}", t.host, t.port),
            None => url.to_string(),
        };
        ApiError::Unreachable {
            route: route.to_string(),
            kind: failure.word(),
            message: t.to_string(),
            advice: failure.advice(&target, self.proxy.as_deref(), "EXECUTOR_FRONTEND_CA"),
        }
    }

    fn post_json<T: serde::Serialize>(
        &self,
        path: &str,
        auth: Auth,
        body: &T,
        timeout: Option<Duration>,
    ) -> Result<(u16, Vec<u8>), ApiError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ApiError::Transport {
            route: path.to_string(),
            message: format!("encoding the request: {e}"),
        })?;
        self.call("POST", path, auth, Body::Json(bytes), timeout)
    }

    /// `GET /.executors/test/auth`: whether the coordinator accepts the shared secret.
    pub(crate) fn test_auth(&self) -> Result<(), ApiError> {
        self.call("GET", "/.executors/test/auth", Auth::Executor, Body::None, None).map(|_| ())
    }

    /// Dequeues one job (`None` = no job). `wait` asks for the coordinator's long poll; a
    /// coordinator that does not offer it answers at once.
    pub(crate) fn dequeue(
        &self,
        queues: &[String],
        multi: bool,
        resources: &Resources,
        wait: Option<Duration>,
    ) -> Result<Option<(Job, Extensions)>, ApiError> {
        let req = DequeueRequest {
            queues: if multi { queues.to_vec() } else { Vec::new() },
            executor_name: self.executor_name.clone(),
            version: VERSION.to_string(),
            num_cpus: resources.num_cpus,
            memory: resources.memory.clone(),
            disk_space: resources.disk_space.clone(),
        };
        let mut path = if multi {
            "/.executors/queue/dequeue".to_string()
        } else {
            format!("/.executors/queue/{}/dequeue", queues.first().map(String::as_str).unwrap_or(""))
        };
        let mut timeout = None;
        if let Some(w) = wait.filter(|w| !w.is_zero()) {
            path.push_str(&format!("?wait={}ms", w.as_millis()));
            timeout = Some(w + Duration::from_secs(30));
        }
        let bytes = serde_json::to_vec(&req).map_err(|e| ApiError::Transport {
            route: path.clone(),
            message: format!("encoding the request: {e}"),
        })?;
        let reply = self.call_reply("POST", &path, Auth::Executor, Body::Json(bytes), timeout)?;
        if reply.status == 204 || reply.body.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(None);
        }
        let job: Job = serde_json::from_slice(&reply.body).map_err(|e| ApiError::Transport {
            route: "POST dequeue".into(),
            message: format!("the coordinator sent a job that does not decode: {e}"),
        })?;
        Ok(Some((job, reply.extensions)))
    }

    /// Heartbeats with the running job uids (`"<id>"` or `"<id>-<queue>"`).
    pub(crate) fn heartbeat(
        &self,
        queues: &[String],
        multi: bool,
        uids: &[String],
    ) -> Result<HeartbeatResponse, ApiError> {
        self.heartbeat_with(queues, multi, uids, Vec::new())
    }

    fn heartbeat_with(
        &self,
        queues: &[String],
        multi: bool,
        uids: &[String],
        kept: Vec<crate::protocol::KeptJob>,
    ) -> Result<HeartbeatResponse, ApiError> {
        let mut telemetry = telemetry();
        telemetry.prometheus_metrics = metrics::gather(&self.metrics_sources);
        telemetry.kept_jobs = kept;
        let (status, body) = if multi {
            let mut groups: Vec<QueueJobIds> = Vec::new();
            for uid in uids {
                let (id, queue) = uid.split_once('-').ok_or_else(|| ApiError::Transport {
                    route: "POST heartbeat".into(),
                    message: format!("job uid {uid:?} names no queue"),
                })?;
                match groups.iter_mut().find(|g| g.queue_name == queue) {
                    Some(g) => g.job_ids.push(id.to_string()),
                    None => groups.push(QueueJobIds { queue_name: queue.into(), job_ids: vec![id.into()] }),
                }
            }
            groups.sort_by(|a, b| a.queue_name.cmp(&b.queue_name));
            let req = HeartbeatRequest {
                version: String::new(),
                executor_name: self.executor_name.clone(),
                queue_names: queues.to_vec(),
                job_ids_by_queue: groups,
                telemetry,
            };
            self.post_json("/.executors/queue/heartbeat", Auth::Executor, &req, None)?
        } else {
            let req = HeartbeatRequestV1 {
                version: "V2".into(),
                executor_name: self.executor_name.clone(),
                job_ids: uids.to_vec(),
                telemetry,
            };
            let path =
                format!("/.executors/queue/{}/heartbeat", queues.first().map(String::as_str).unwrap_or(""));
            self.post_json(&path, Auth::Executor, &req.to_wire(), None)?
        };
        if status == 204 || body.is_empty() {
            return Ok(HeartbeatResponse::default());
        }
        serde_json::from_slice(&body).map_err(|e| ApiError::Transport {
            route: "POST heartbeat".into(),
            message: format!("the heartbeat answer does not decode: {e}"),
        })
    }

    /// [`Self::heartbeat`] that also reports the jobs kept for debugging here (our extension).
    pub(crate) fn heartbeat_kept(
        &self,
        queues: &[String],
        multi: bool,
        uids: &[String],
        kept: &[crate::protocol::KeptJob],
    ) -> Result<HeartbeatResponse, ApiError> {
        self.heartbeat_with(queues, multi, uids, kept.to_vec())
    }

    /// Records an `executor debug` attach in the kept job's log (our extension); `false` when
    /// the coordinator has no such route (Sourcegraph) or no longer knows the job.
    pub(crate) fn debug_attach(
        &self,
        queue: &str,
        attach: &crate::protocol::DebugAttach,
    ) -> Result<bool, ApiError> {
        match self.post_json(&format!("/.executors/queue/{queue}/debugAttach"), Auth::Executor, attach, None)
        {
            Ok(_) => Ok(true),
            Err(ApiError::Status { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The minimal heartbeat that registers the executor before its first dequeue.
    pub(crate) fn ping(&self, queues: &[String], multi: bool) -> Result<(), ApiError> {
        if multi {
            let req = HeartbeatRequest {
                executor_name: self.executor_name.clone(),
                queue_names: queues.to_vec(),
                ..Default::default()
            };
            self.post_json("/.executors/queue/heartbeat", Auth::Executor, &req, None).map(|_| ())
        } else {
            let req = HeartbeatRequestV1 { executor_name: self.executor_name.clone(), ..Default::default() };
            let path =
                format!("/.executors/queue/{}/heartbeat", queues.first().map(String::as_str).unwrap_or(""));
            self.post_json(&path, Auth::Executor, &req.to_wire(), None).map(|_| ())
        }
    }

    fn op(&self, job: &JobAuth) -> JobOperationRequest {
        JobOperationRequest { executor_name: self.executor_name.clone(), job_id: job.id }
    }

    /// `addExecutionLogEntry`: returns the entry id.
    pub(crate) fn add_log_entry(&self, job: &JobAuth, entry: &ExecutionLogEntry) -> Result<i64, ApiError> {
        let req = AddExecutionLogEntryRequest { op: self.op(job), entry: entry.clone() };
        let path = format!("/.executors/queue/{}/addExecutionLogEntry", job.queue);
        let (_, body) = self.post_json(&path, Auth::Job(job), &req, None)?;
        let text = String::from_utf8_lossy(&body);
        text.trim().parse::<i64>().map_err(|_| ApiError::Transport {
            route: "POST addExecutionLogEntry".into(),
            message: format!("the entry id {:?} is not a number", text.chars().take(40).collect::<String>()),
        })
    }

    /// `updateExecutionLogEntry`; with `append`, `entry.out` is a delta (our extension).
    pub(crate) fn update_log_entry(
        &self,
        job: &JobAuth,
        entry_id: i64,
        entry: &ExecutionLogEntry,
        append: bool,
    ) -> Result<(), ApiError> {
        // The protocol's request with the entry borrowed: a big entry's output is not copied.
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Update<'a> {
            #[serde(flatten)]
            op: JobOperationRequest,
            entry_id: i64,
            #[serde(flatten)]
            entry: &'a ExecutionLogEntry,
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            append: bool,
        }
        let req = Update { op: self.op(job), entry_id, entry, append };
        let path = format!("/.executors/queue/{}/updateExecutionLogEntry", job.queue);
        self.post_json(&path, Auth::Job(job), &req, None).map(|_| ())
    }

    /// markComplete / markErrored / markFailed. `Ok(false)` on 404: the job is no longer ours.
    pub(crate) fn mark(&self, job: &JobAuth, mark: Mark, message: &str) -> Result<bool, ApiError> {
        let path = format!("/.executors/queue/{}/{}", job.queue, mark.route());
        let res = match mark {
            Mark::Complete => self.post_json(&path, Auth::Job(job), &self.op(job), None),
            Mark::Errored | Mark::Failed => {
                let req = MarkErrorRequest { op: self.op(job), error_message: message.to_string() };
                self.post_json(&path, Auth::Job(job), &req, None)
            }
        };
        match res {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(404) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `PUT /.executors/queue/{queue}/artifacts`: the job's artifacts as a tar.gz.
    /// `GET /.executors/files/{bucket}/{key}`: a file of the coordinator's files store.
    pub(crate) fn fetch_file(&self, job: &JobAuth, bucket: &str, key: &str) -> Result<Vec<u8>, ApiError> {
        let path = format!("/.executors/files/{bucket}/{key}");
        self.call("GET", &path, Auth::Job(job), Body::None, None).map(|(_, body)| body)
    }

    pub(crate) fn upload_artifacts(&self, job: &JobAuth, archive: &Path) -> Result<(), ApiError> {
        let path = format!("/.executors/queue/{}/artifacts", job.queue);
        self.call("PUT", &path, Auth::Job(job), Body::File(archive, "application/gzip"), None).map(|_| ())
    }
}

/// The kind of terminal call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mark {
    Complete,
    Errored,
    Failed,
}

impl Mark {
    fn route(self) -> &'static str {
        match self {
            Mark::Complete => "markComplete",
            Mark::Errored => "markErrored",
            Mark::Failed => "markFailed",
        }
    }
    /// The word the run document records.
    pub(crate) fn word(self) -> &'static str {
        match self {
            Mark::Complete => "completed",
            Mark::Errored => "errored",
            Mark::Failed => "failed",
        }
    }
}

fn error_detail(text: &str) -> String {
    let msg = serde_json::from_str::<crate::protocol::ErrorBody>(text)
        .map(|b| b.error)
        .unwrap_or_else(|_| text.trim().to_string());
    let msg: String = msg.chars().filter(|c| !c.is_control()).take(200).collect();
    if msg.is_empty() {
        String::new()
    } else {
        format!(": {msg}")
    }
}

/// What heartbeats report about this host; gathered once per process, at its first heartbeat:
/// asking git its version costs a process, which a stage that sends no heartbeat (such as
/// `prepare-workspace`, whose clone is on the path to the first step) should not pay.
fn telemetry() -> ExecutorTelemetry {
    static CACHE: std::sync::OnceLock<ExecutorTelemetry> = std::sync::OnceLock::new();
    CACHE.get_or_init(gather_telemetry).clone()
}

/// The version of the `src` this executor's jobs run when that is not the one on PATH (the
/// microvm runtime runs the one `executor install src-cli` put in the state directory); set by
/// the loop before its first heartbeat.
static SRC_CLI_VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Reports `version` as the heartbeats' `srcCliVersion` instead of asking the `src` on PATH.
pub(crate) fn report_src_cli_version(version: String) {
    let _ = SRC_CLI_VERSION.set(version);
}

fn gather_telemetry() -> ExecutorTelemetry {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    };
    ExecutorTelemetry {
        os: std::env::consts::OS.into(),
        architecture: arch.into(),
        executor_version: VERSION.into(),
        git_version: tool_version("git", &["version"], "git version "),
        // Only when src-cli is installed: the one in the state directory, else the one on PATH.
        src_cli_version: match SRC_CLI_VERSION.get() {
            Some(v) => v.clone(),
            None => tool_version("src", &["version", "-client-only"], "Current version: "),
        },
        // No Docker daemon and no ignite: steps run in this executor's own sandboxes.
        docker_version: String::new(),
        ignite_version: String::new(),
        prometheus_metrics: String::new(),
        kept_jobs: Vec::new(),
    }
}

/// The first line a tool prints for `args`, without `prefix`; empty when it is missing, fails
/// or takes longer than 5 s.
fn tool_version(tool: &str, args: &[&str], prefix: &str) -> String {
    let Ok(path) = which::which(tool) else {
        return String::new();
    };
    let child = crate::base::proc::command(path)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return String::new();
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    // `git version` answers in about a millisecond: poll often first, then less.
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return String::new();
            }
        }
    }
    let mut out = String::new();
    if let Some(mut so) = child.stdout.take() {
        let _ = so.read_to_string(&mut out);
    }
    out.lines().next().unwrap_or("").trim().trim_start_matches(prefix).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::Mutex;

    /// A tiny loopback HTTP server answering canned statuses and recording requests.
    /// (request line, lower-cased headers, body) of each request.
    type Seen = Arc<Mutex<Vec<(String, Vec<(String, String)>, String)>>>;

    struct Fake {
        url: String,
        seen: Seen,
    }

    fn fake(answers: Vec<(u16, &'static str)>) -> Fake {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            let mut answers = answers.into_iter();
            for stream in l.incoming() {
                let mut s = stream.unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let mut headers = Vec::new();
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    let h = h.trim_end().to_string();
                    if h.is_empty() {
                        break;
                    }
                    let (k, v) = h.split_once(": ").unwrap();
                    if k.eq_ignore_ascii_case("content-length") {
                        len = v.parse().unwrap();
                    }
                    headers.push((k.to_ascii_lowercase(), v.to_string()));
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                seen2.lock().unwrap().push((
                    line.trim().to_string(),
                    headers,
                    String::from_utf8(body).unwrap(),
                ));
                let (status, body) = answers.next().unwrap_or((500, ""));
                let resp = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(resp.as_bytes()).unwrap();
            }
        });
        Fake { url, seen }
    }

    fn resources() -> Resources {
        Resources { num_cpus: 4, memory: "12G".into(), disk_space: "20G".into() }
    }

    fn client(url: &str) -> Client {
        Client::new(None, &Secret::new("a-shared-secret-of-24-chars"), url, "host-1")
            .unwrap()
            .with_retry(RetryPolicy { max_attempts: 4, base: Duration::from_millis(1), ..Default::default() })
    }

    /// A loopback server that answers each TLS hello with the fatal alert `alert`; returns its
    /// https URL and the count of connections it had.
    fn alerting(alert: u8) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}", l.local_addr().unwrap());
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = count.clone();
        std::thread::spawn(move || {
            for stream in l.incoming() {
                let Ok(mut s) = stream else { return };
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = s.read(&mut [0u8; 4096]);
                // A TLS 1.2 record: alert, fatal, then the description.
                let _ = s.write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, alert]);
            }
        });
        (url, count)
    }

    #[test]
    fn a_refused_certificate_is_not_retried_and_other_tls_failures_are() {
        let attempts = |alert: u8| {
            let (url, count) = alerting(alert);
            let err = client(&url).test_auth().unwrap_err();
            assert!(matches!(err, ApiError::Unreachable { .. }), "{err}");
            (count.load(std::sync::atomic::Ordering::SeqCst), err.to_string())
        };
        let (n, err) = attempts(0x2a);
        assert_eq!(n, 1, "bad_certificate is final: {err}");
        assert!(err.contains("BadCertificate"), "{err}");
        let (n, err) = attempts(0x28);
        assert_eq!(n, 4, "handshake_failure is retried: {err}");
    }

    #[test]
    fn retries_5xx_and_429_but_not_4xx_or_501() {
        let f = fake(vec![(503, ""), (429, ""), (204, "")]);
        let c = client(&f.url);
        assert!(c.dequeue(&["batches".into()], false, &resources(), None).unwrap().is_none());
        assert_eq!(f.seen.lock().unwrap().len(), 3);

        let f = fake(vec![(400, r#"{"error":"bad json"}"#), (204, "")]);
        let err = client(&f.url).dequeue(&["batches".into()], false, &resources(), None).unwrap_err();
        assert_eq!(err.status(), Some(400));
        assert!(err.to_string().contains("bad json"), "{err}");
        assert_eq!(f.seen.lock().unwrap().len(), 1);

        let f = fake(vec![(501, ""), (204, "")]);
        assert_eq!(client(&f.url).test_auth().unwrap_err().status(), Some(501));
        assert_eq!(f.seen.lock().unwrap().len(), 1);
    }

    #[test]
    fn job_routes_carry_the_contract_headers_and_404_means_lost() {
        let f = fake(vec![(200, "3"), (404, "")]);
        let c = client(&f.url);
        let job = JobAuth { id: 42, token: Secret::new("ab".repeat(20)), queue: "batches".into() };
        let entry = ExecutionLogEntry {
            key: "step.docker.0".into(),
            start_time: chrono::Utc::now(),
            ..Default::default()
        };
        assert_eq!(c.add_log_entry(&job, &entry).unwrap(), 3);
        assert!(!c.mark(&job, Mark::Complete, "").unwrap());
        let seen = f.seen.lock().unwrap();
        let (line, headers, body) = &seen[0];
        assert_eq!(line, "POST /.executors/queue/batches/addExecutionLogEntry HTTP/1.1");
        let h = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_default();
        assert_eq!(h("authorization"), format!("Bearer {}", "ab".repeat(20)));
        assert_eq!(h("x-sourcegraph-job-id"), "42");
        assert_eq!(h("x-sourcegraph-executor-name"), "host-1");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["jobId"], 42);
        assert_eq!(v["executorName"], "host-1");
        assert_eq!(v["key"], "step.docker.0");
        assert_eq!(seen[1].0, "POST /.executors/queue/batches/markComplete HTTP/1.1");
    }

    #[test]
    fn extensions_are_read_from_the_header_only() {
        assert!(Extensions::parse("log-append").log_append);
        assert!(Extensions::parse("other, Log-Append").log_append);
        assert!(!Extensions::parse("").log_append);
        assert!(!Extensions::parse("log-append-v2").log_append);
    }

    #[test]
    fn dequeue_and_heartbeat_shapes() {
        let f = fake(vec![
            (200, r#"{"version":2,"id":7,"token":"t"}"#),
            (200, r#"{"knownIds":["7-batches"],"cancelIds":null}"#),
        ]);
        let c = client(&f.url);
        let (job, extensions) = c
            .dequeue(
                &["batches".into(), "codeintel".into()],
                true,
                &resources(),
                Some(Duration::from_secs(2)),
            )
            .unwrap()
            .unwrap();
        assert_eq!(job.id, 7);
        assert!(!extensions.log_append, "nothing advertised, nothing assumed");
        let hb = c.heartbeat(&["batches".into(), "codeintel".into()], true, &["7-batches".into()]).unwrap();
        assert_eq!(hb.known_ids, vec!["7-batches"]);
        let seen = f.seen.lock().unwrap();
        assert_eq!(seen[0].0, "POST /.executors/queue/dequeue?wait=2000ms HTTP/1.1");
        let auth = seen[0].1.iter().find(|(k, _)| k == "authorization").unwrap().1.clone();
        assert_eq!(auth, "token-executor a-shared-secret-of-24-chars");
        let d: serde_json::Value = serde_json::from_str(&seen[0].2).unwrap();
        assert_eq!(d["queues"], serde_json::json!(["batches", "codeintel"]));
        assert_eq!(d["version"], VERSION);
        assert!(VERSION.starts_with(PROTOCOL_VERSION) && VERSION.contains(env!("CARGO_PKG_VERSION")));
        assert_eq!(crate::protocol::wants_v2_payload(VERSION), Ok(true), "our version earns v2 payloads");
        let v: serde_json::Value = serde_json::from_str(&seen[1].2).unwrap();
        assert_eq!(v["jobIdsByQueue"], serde_json::json!([{"queueName":"batches","jobIds":["7"]}]));
    }

    #[test]
    fn transport_errors_are_retried_then_reported() {
        // A port nobody listens on: connection refused on every attempt.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        drop(l);
        let err = client(&url).test_auth().unwrap_err();
        assert!(matches!(err, ApiError::Unreachable { kind: "connection refused", .. }), "{err}");
        assert!(err.advice().unwrap().contains("HTTPS_PROXY"), "{err}");
        assert!(!err.to_string().contains("a-shared-secret"), "{err}");
    }
}
