//! Conformance with Sourcegraph's executor protocol: a stand-in coordinator written from the
//! contract's semantics (not from our server's), and the real `executor run` against it with
//! real steps in the oci runtime: every output line kept, v2 payloads, binary files exact,
//! metrics in heartbeats that a strict Prometheus text parser accepts, cancel honoured, and the
//! Sourcegraph names (`executor run`, the startup script, typo warnings, cliSteps advice on oci). The
//! same job also runs through our own coordinator, whose `/metrics` then carries the
//! executor's metrics with an `executor` label.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use sha2::Digest as _;

use crate::common;
use crate::coordinator::Coordinator;

// ---------------------------------------------------------------------------------------------
// The stand-in coordinator.

/// One job as the stand-in holds it.
pub(crate) struct SgJob {
    pub(crate) id: i64,
    /// `batches` or `codeintel`.
    queue: &'static str,
    /// The job without id, token or version: `files` contents are raw bytes (base64 here,
    /// converted per payload version at dequeue).
    spec: Value,
    token: String,
    pub(crate) state: &'static str,
    worker: String,
    cancel: bool,
    /// `execution_logs`: entries as the contract's ExecutionLogEntry (unknown fields dropped).
    pub(crate) logs: Vec<Value>,
    pub(crate) failure: Option<String>,
    /// The payload version sent at dequeue (0 = v1).
    payload_version: i32,
    finished_at: Option<Instant>,
    /// A native batch job's result, as the batches store takes it at markComplete: the
    /// `CACHE_AFTER_STEP_RESULT` event of the highest step index.
    result: Option<Value>,
}

#[derive(Default)]
pub(crate) struct SgState {
    jobs: Vec<SgJob>,
    /// Executors that heartbeated (the `executor_heartbeats` rows).
    executors: Vec<String>,
    /// Every heartbeat body after the ping.
    pub(crate) heartbeats: Vec<Value>,
    /// The `version` of every dequeue request.
    dequeue_versions: Vec<String>,
    /// Update bodies that carried an `append` field (ignored, as Sourcegraph ignores it).
    append_fields_seen: usize,
    /// What node_exporter answers on `/node/metrics`.
    node_metrics: String,
    /// What `/.api/src-cli/src_linux_amd64` serves, and its `.sha256` (404 when `None`).
    pub(crate) src_cli: Option<(String, Option<String>)>,
}

/// A Sourcegraph-semantics coordinator on 127.0.0.1 (single-queue routes of `batches` and
/// `codeintel`).
pub(crate) struct StandIn {
    pub(crate) url: String,
    pub(crate) secret: String,
    pub(crate) state: Arc<Mutex<SgState>>,
}

impl StandIn {
    pub(crate) fn start() -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let secret = format!("sg-secret-{}", uuid::Uuid::new_v4().simple());
        let state = Arc::new(Mutex::new(SgState::default()));
        let (st, sec) = (state.clone(), secret.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (st, sec) = (st.clone(), sec.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &st, &sec);
                });
            }
        });
        StandIn { url, secret, state }
    }

    /// Queues a job; `spec` is the contract's Job without id/token/version, `files` contents
    /// base64.
    pub(crate) fn submit(&self, spec: Value) -> i64 {
        self.submit_to("batches", spec)
    }

    fn submit_to(&self, queue: &'static str, spec: Value) -> i64 {
        let mut s = self.state.lock().unwrap();
        let id = 100 + s.jobs.len() as i64;
        s.jobs.push(SgJob {
            id,
            queue,
            result: None,
            spec,
            token: String::new(),
            state: "queued",
            worker: String::new(),
            cancel: false,
            logs: Vec::new(),
            failure: None,
            payload_version: -1,
            finished_at: None,
        });
        id
    }

    pub(crate) fn with_job<T>(&self, id: i64, f: impl FnOnce(&mut SgJob) -> T) -> T {
        let mut s = self.state.lock().unwrap();
        f(s.jobs.iter_mut().find(|j| j.id == id).unwrap())
    }
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// One request per connection (answers carry `Connection: close`).
fn serve(stream: TcpStream, state: &Mutex<SgState>, secret: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut r = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut req = Request { method, path, headers, body: Vec::new() };
    if let Some(n) = req.header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        req.body = vec![0; n];
        r.read_exact(&mut req.body)?;
    } else if req.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            req.body.extend_from_slice(&chunk[..n]);
        }
    }
    let (status, body) = route(&req, state, secret);
    let reason = match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        _ => "Error",
    };
    let mut out = stream;
    if status == 204 {
        write!(out, "HTTP/1.1 204 {reason}\r\nConnection: close\r\n\r\n")?;
    } else {
        write!(
            out,
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )?;
        out.write_all(body.as_bytes())?;
    }
    out.flush()
}

fn err(status: u16, msg: &str) -> (u16, String) {
    (status, json!({ "error": msg }).to_string())
}

/// `CheckSourcegraphVersion(version, ">= 4.3.0-0", "2022-11-24")`: Some(v2?) or None when the
/// version is neither a dev build, a daily build nor semver (the dequeue then fails with 500).
fn wants_v2(version: &str) -> Option<bool> {
    if version == "dev" || version == "0.0.0+dev" {
        return Some(true);
    }
    // Daily builds: `<n>_<YYYY-MM-DD>_<hash>`.
    let daily: Vec<&str> = version.splitn(3, '_').collect();
    if daily.len() == 3 && daily[0].chars().all(|c| c.is_ascii_digit()) && daily[1].len() == 10 {
        return Some(daily[1] >= "2022-11-24");
    }
    let v = version.strip_prefix('v').unwrap_or(version);
    let core = v.split(['+', '-']).next().unwrap_or("");
    let nums: Vec<&str> = core.split('.').collect();
    if nums.is_empty()
        || nums.len() > 3
        || nums.iter().any(|n| n.is_empty() || !n.chars().all(|c| c.is_ascii_digit()))
    {
        return None;
    }
    let mut n = [0u64; 3];
    for (i, s) in nums.iter().enumerate() {
        n[i] = s.parse().ok()?;
    }
    Some((n[0], n[1], n[2]) >= (4, 3, 0))
}

fn route(req: &Request, state: &Mutex<SgState>, secret: &str) -> (u16, String) {
    let mut s = state.lock().unwrap();
    if req.method == "GET" && req.path == "/node/metrics" {
        return (200, s.node_metrics.clone());
    }
    // Every instance serves src-cli's binary; recent ones a checksum beside it.
    if req.method == "GET" && req.path.starts_with("/.api/src-cli/src_linux_amd64") {
        return match (&s.src_cli, req.path.strip_prefix("/.api/src-cli/src_linux_amd64")) {
            (Some((body, _)), Some("")) => (200, body.clone()),
            (Some((_, Some(sum))), Some(".sha256")) => (200, sum.clone()),
            _ => err(404, "not found"),
        };
    }
    // Routing is by path; a query string (our long-poll `?wait=`) is ignored, as by Go's mux.
    let path = req.path.split('?').next().unwrap_or("");
    let Some((queue, rest)) = path.strip_prefix("/.executors/queue/").and_then(|r| r.split_once('/')) else {
        return err(404, "no such route");
    };
    if !["batches", "codeintel"].contains(&queue) {
        return err(404, "no such route");
    }
    let body: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => return (400, format!("invalid body: {e}")),
    };
    let executor_routes = ["dequeue", "heartbeat"];
    if executor_routes.contains(&rest) {
        let Some((scheme, token)) = req.header("authorization").and_then(|a| a.split_once(' ')) else {
            return err(401, "no authorization");
        };
        if scheme != "token-executor" || token != secret {
            return err(401, "invalid token");
        }
        let name = body["executorName"].as_str().unwrap_or("").to_string();
        if name.is_empty() {
            return err(500, "executorName is empty");
        }
        if rest == "heartbeat" {
            if !s.executors.contains(&name) {
                s.executors.push(name.clone());
            }
            let ids: Vec<i64> = body["jobIds"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_i64().or_else(|| v.as_str().and_then(|t| t.parse().ok())))
                        .collect()
                })
                .unwrap_or_default();
            if body["version"] == "V2" {
                s.heartbeats.push(body.clone());
            }
            let mine = |j: &SgJob| j.state == "processing" && j.worker == name && ids.contains(&j.id);
            let known: Vec<String> = s.jobs.iter().filter(|j| mine(j)).map(|j| j.id.to_string()).collect();
            let cancel: Vec<String> =
                s.jobs.iter().filter(|j| mine(j) && j.cancel).map(|j| j.id.to_string()).collect();
            return (200, json!({"knownIds": known, "cancelIds": cancel}).to_string());
        }
        // dequeue
        let version = body["version"].as_str().unwrap_or("").to_string();
        s.dequeue_versions.push(version.clone());
        let v2 = if version.is_empty() {
            false
        } else {
            match wants_v2(&version) {
                Some(v) => v,
                None => return err(500, &format!("failed to check version {version:?}")),
            }
        };
        let Some(job) = s.jobs.iter_mut().find(|j| j.state == "queued" && j.queue == queue) else {
            return (204, String::new());
        };
        job.state = "processing";
        job.worker = name;
        job.token = uuid::Uuid::new_v4().simple().to_string();
        job.payload_version = if v2 { 2 } else { 0 };
        let mut payload = job.spec.clone();
        payload["id"] = json!(job.id);
        payload["token"] = json!(job.token);
        if v2 {
            payload["version"] = json!(2);
        }
        if let Some(files) = payload["files"].as_object_mut() {
            for f in files.values_mut() {
                if !v2 {
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(f["content"].as_str().unwrap_or(""))
                        .unwrap();
                    f["content"] = json!(String::from_utf8_lossy(&raw));
                }
                f["modifiedAt"] = json!("0001-01-01T00:00:00Z");
            }
        }
        return (200, payload.to_string());
    }

    // Job routes: Bearer token + job id + executor name; the executor must have heartbeated.
    let Some((scheme, token)) = req.header("authorization").and_then(|a| a.split_once(' ')) else {
        return err(401, "no authorization");
    };
    if scheme != "Bearer" || token.is_empty() {
        return err(401, "invalid authorization");
    }
    let Some(job_id) = req.header("x-sourcegraph-job-id").and_then(|v| v.parse::<i64>().ok()) else {
        return err(400, "job ID not provided in header");
    };
    let executor = req.header("x-sourcegraph-executor-name").unwrap_or("").to_string();
    if executor.is_empty() {
        return err(400, "executor name not provided in header");
    }
    let Some(owner) = s.jobs.iter().find(|j| !j.token.is_empty() && j.token == token).map(|j| j.id) else {
        return err(401, "invalid token");
    };
    if owner != job_id || s.jobs.iter().any(|j| j.id == job_id && j.queue != queue) {
        return err(403, "invalid token");
    }
    if !s.executors.contains(&executor) {
        return err(401, "executor never heartbeated");
    }
    let job = s.jobs.iter_mut().find(|j| j.id == job_id).unwrap();
    let owned = job.state == "processing" && job.worker == executor;
    // The contract's ExecutionLogEntry: its fields only, anything else ignored.
    let entry = |b: &Value| {
        let mut e = serde_json::Map::new();
        for k in ["key", "command", "startTime", "exitCode", "out", "durationMs"] {
            if let Some(v) = b.get(k).filter(|v| !v.is_null()) {
                e.insert(k.into(), v.clone());
            }
        }
        Value::Object(e)
    };
    match rest {
        "addExecutionLogEntry" => {
            if !owned {
                return err(500, "unknown job");
            }
            job.logs.push(entry(&body));
            (200, job.logs.len().to_string())
        }
        "updateExecutionLogEntry" => {
            if !owned {
                return err(500, "unknown job");
            }
            let seen_append = body.get("append").is_some();
            let i = body["entryId"].as_i64().unwrap_or(0);
            if i < 1 || i as usize > job.logs.len() {
                return err(500, "unknown entry");
            }
            job.logs[i as usize - 1] = entry(&body);
            if seen_append {
                s.append_fields_seen += 1;
            }
            (204, String::new())
        }
        "markComplete" | "markErrored" | "markFailed" => {
            if !owned {
                return err(404, "unknown job");
            }
            job.state = match rest {
                "markComplete" => "completed",
                "markErrored" => "errored",
                _ => "failed",
            };
            job.failure = body["errorMessage"].as_str().map(String::from);
            job.finished_at = Some(Instant::now());
            if rest == "markComplete" && queue == "batches" && job.logs.iter().any(post_entry) {
                match step_result(&job.logs) {
                    Some(r) => job.result = Some(r),
                    None => {
                        job.state = "failed";
                        job.failure = Some("found no step results".into());
                    }
                }
            }
            (204, String::new())
        }
        _ => err(404, "no such route"),
    }
}

/// A native batch job's result entries: their keys end in `.post`.
fn post_entry(e: &Value) -> bool {
    e["key"].as_str().is_some_and(|k| k.ends_with(".post"))
}

/// What the batches store reads at markComplete (`logEventsFromLogEntries`): each `stdout: `
/// line of the `.post` entries, JSON-decoded (a line that does not decode is skipped, silently),
/// and of the `CACHE_AFTER_STEP_RESULT` events the one of the highest step index.
fn step_result(logs: &[Value]) -> Option<Value> {
    let mut best: Option<Value> = None;
    for e in logs.iter().filter(|e| post_entry(e)) {
        for line in e["out"].as_str().unwrap_or("").lines() {
            let Some(json) = line.strip_prefix("stdout: ") else { continue };
            let Ok(ev) = serde_json::from_str::<Value>(json) else { continue };
            if ev["operation"] != "CACHE_AFTER_STEP_RESULT" || ev["status"] != "SUCCESS" {
                continue;
            }
            let index = ev["metadata"]["value"]["stepIndex"].as_i64().unwrap_or(-1);
            if best
                .as_ref()
                .is_none_or(|b| b["metadata"]["value"]["stepIndex"].as_i64().unwrap_or(-1) < index)
            {
                best = Some(ev);
            }
        }
    }
    best
}

// ---------------------------------------------------------------------------------------------
// A strict parser of the Prometheus text exposition format (0.0.4).

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn valid_name(s: &str, colon: bool) -> bool {
    let mut cs = s.chars();
    let ok_first = |c: char| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':');
    cs.next().is_some_and(ok_first) && cs.all(|c| ok_first(c) || c.is_ascii_digit())
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse::<f64>().map_err(|_| format!("bad value {s:?}")),
    }
}

/// Parses `text`; errors name the line. Checks: names and label syntax, escapes, each family's
/// TYPE at most once and before its samples, families not interleaved, no duplicate series,
/// histogram buckets cumulative with `+Inf` equal to `_count`.
fn parse_prometheus(text: &str) -> Result<Vec<Sample>, String> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helps: BTreeMap<String, ()> = BTreeMap::new();
    let mut closed: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    let mut samples: Vec<Sample> = Vec::new();
    let mut seen_series = std::collections::HashSet::new();
    let family_of = |name: &str, types: &BTreeMap<String, String>| -> String {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if types.get(base).is_some_and(|t| t == "histogram" || t == "summary") {
                    return base.to_string();
                }
            }
        }
        name.to_string()
    };
    for (n, line) in text.lines().enumerate() {
        let at = |m: String| format!("line {}: {m}: {line:?}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            let words: Vec<&str> = c.trim_start().splitn(3, ' ').collect();
            match words.first().copied() {
                Some("HELP") | Some("TYPE") => {
                    let name = words.get(1).copied().unwrap_or("");
                    if !valid_name(name, true) {
                        return Err(at("bad metric name".into()));
                    }
                    if closed.iter().any(|f| f == name) {
                        return Err(at(format!("family {name} appears twice")));
                    }
                    if current.as_deref() != Some(name) {
                        if let Some(c) = current.take() {
                            closed.push(c);
                        }
                        current = Some(name.to_string());
                    }
                    if words[0] == "TYPE" {
                        let t = words.get(2).copied().unwrap_or("");
                        if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) {
                            return Err(at(format!("bad type {t:?}")));
                        }
                        if types.insert(name.to_string(), t.to_string()).is_some() {
                            return Err(at("second TYPE".into()));
                        }
                    } else if helps.insert(name.to_string(), ()).is_some() {
                        return Err(at("second HELP".into()));
                    }
                }
                _ => {}
            }
            continue;
        }
        // name{labels} value [timestamp]
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !valid_name(name, true) {
            return Err(at("bad metric name".into()));
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices().peekable();
            let mut end = None;
            loop {
                while chars.peek().is_some_and(|(_, c)| *c == ' ') {
                    chars.next();
                }
                match chars.peek() {
                    Some((i, '}')) => {
                        end = Some(*i);
                        break;
                    }
                    None => break,
                    _ => {}
                }
                let mut key = String::new();
                while let Some((_, c)) = chars.peek().copied() {
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                    chars.next();
                }
                if !valid_name(&key, false) {
                    return Err(at(format!("bad label name {key:?}")));
                }
                if chars.next().map(|x| x.1) != Some('=') || chars.next().map(|x| x.1) != Some('"') {
                    return Err(at("label value must be quoted".into()));
                }
                let mut val = String::new();
                loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, '\\')) => val.push('\\'),
                            Some((_, '"')) => val.push('"'),
                            Some((_, 'n')) => val.push('\n'),
                            _ => return Err(at("bad escape".into())),
                        },
                        Some((_, '"')) => break,
                        Some((_, '\n')) | None => return Err(at("unterminated label value".into())),
                        Some((_, c)) => val.push(c),
                    }
                }
                if labels.insert(key.clone(), val).is_some() {
                    return Err(at(format!("label {key} twice")));
                }
                match chars.peek() {
                    Some((_, ',')) => {
                        chars.next();
                    }
                    Some((_, '}')) => {}
                    _ => return Err(at("expected , or }".into())),
                }
            }
            let end = end.ok_or_else(|| at("unterminated labels".into()))?;
            rest = &r[end + 1..];
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if !rest.starts_with(' ') || fields.is_empty() || fields.len() > 2 {
            return Err(at("expected ' value [timestamp]'".into()));
        }
        let value = parse_value(fields[0]).map_err(at)?;
        if fields.len() == 2 && fields[1].parse::<i64>().is_err() {
            return Err(at("bad timestamp".into()));
        }
        let family = family_of(name, &types);
        if closed.contains(&family) {
            return Err(at(format!("family {family} interleaved with another")));
        }
        if current.as_deref() != Some(family.as_str()) {
            if let Some(c) = current.take() {
                closed.push(c);
            }
            current = Some(family.clone());
        }
        if !seen_series.insert(format!("{name}{labels:?}")) {
            return Err(at("duplicate series".into()));
        }
        samples.push(Sample { name: name.to_string(), labels, value });
    }
    // Histograms: cumulative buckets ending in +Inf == _count.
    for (family, t) in &types {
        if t != "histogram" {
            continue;
        }
        let mut by_series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for s in samples.iter().filter(|s| s.name == format!("{family}_bucket")) {
            let le = s.labels.get("le").ok_or(format!("{family}: bucket without le"))?;
            let mut rest = s.labels.clone();
            rest.remove("le");
            by_series.entry(format!("{rest:?}")).or_default().push((parse_value(le)?, s.value));
        }
        for (series, mut buckets) in by_series {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            if buckets.windows(2).any(|w| w[1].1 < w[0].1) {
                return Err(format!("{family}{series}: buckets are not cumulative"));
            }
            let inf =
                buckets.last().filter(|b| b.0.is_infinite()).ok_or(format!("{family}{series}: no +Inf"))?;
            let count = samples
                .iter()
                .find(|s| {
                    s.name == format!("{family}_count") && {
                        let mut l = s.labels.clone();
                        l.remove("le");
                        format!("{l:?}") == series
                    }
                })
                .ok_or(format!("{family}{series}: no _count"))?;
            if count.value != inf.1 {
                return Err(format!("{family}{series}: +Inf bucket {} != count {}", inf.1, count.value));
            }
        }
    }
    Ok(samples)
}

fn value_of(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .filter(|s| {
            s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .reduce(|a, b| a + b)
}

#[test]
fn prometheus_parser_is_strict() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\\\"q\"} 3\n\
                # TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3.5\nh_count 2\n";
    let s = parse_prometheus(good).unwrap();
    assert_eq!(value_of(&s, "a_total", &[("x", "1\"q")]), Some(3.0));
    for bad in [
        "a{x=1} 3\n",
        "a{x=\"1\"} three\n",
        "# TYPE a counter\n# TYPE a gauge\n",
        "a 1\nb 2\na 3\n",
        "a 1\na 2\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 3\n",
        "a{x=\"\\q\"} 1\n",
        "1a 1\n",
    ] {
        assert!(parse_prometheus(bad).is_err(), "accepted {bad:?}");
    }
}

#[test]
fn stand_in_follows_the_contract() {
    let sg = StandIn::start();
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
    let post = |path: &str, auth: &str, headers: &[(&str, String)], body: Value| -> (u16, String) {
        let mut r = agent.post(&format!("{}{path}", sg.url)).set("Authorization", auth);
        for (k, v) in headers {
            r = r.set(k, v);
        }
        match r.set("Content-Type", "application/json").send_string(&body.to_string()) {
            Ok(resp) => {
                assert!(resp.header("X-Executor-Extensions").is_none());
                (resp.status(), resp.into_string().unwrap_or_default())
            }
            Err(ureq::Error::Status(c, resp)) => (c, resp.into_string().unwrap_or_default()),
            Err(e) => panic!("{path}: {e}"),
        }
    };
    let exec = format!("token-executor {}", sg.secret);
    let q = "/.executors/queue/batches";
    assert_eq!(
        post(&format!("{q}/dequeue"), &exec, &[], json!({"executorName": "e", "version": "5.3.0"})).0,
        204
    );
    assert_eq!(
        post(&format!("{q}/dequeue"), "token-executor wrong", &[], json!({"executorName": "e"})).0,
        401
    );
    let id = sg.submit(json!({"dockerSteps": [], "files": {"f": {"content": "/w=="}}}));
    let (st, body) =
        post(&format!("{q}/dequeue"), &exec, &[], json!({"executorName": "e", "version": "0.1"}));
    assert_eq!(st, 200);
    let job: Value = serde_json::from_str(&body).unwrap();
    assert!(job.get("version").is_none(), "0.1 earns v1: {job}");
    assert_eq!(job["files"]["f"]["content"], "\u{fffd}", "v1 content is lossy text");
    sg.submit(json!({"dockerSteps": []}));
    assert_eq!(
        post(&format!("{q}/dequeue"), &exec, &[], json!({"executorName": "e", "version": "banana"})).0,
        500
    );
    let (_, body) = post(
        &format!("{q}/dequeue"),
        &exec,
        &[],
        json!({"executorName": "e", "version": "5.3.0+executor.0.1.0"}),
    );
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["version"], 2);

    let token = job["token"].as_str().unwrap();
    let job_headers = |id: i64, name: &str| {
        vec![("X-Sourcegraph-Job-ID", id.to_string()), ("X-Sourcegraph-Executor-Name", name.to_string())]
    };
    let bearer = format!("Bearer {token}");
    let entry = json!({"executorName": "e", "jobId": id, "key": "k", "command": ["x"], "startTime": "2024-01-01T00:00:00Z"});
    // Not heartbeated yet.
    assert_eq!(
        post(&format!("{q}/addExecutionLogEntry"), &bearer, &job_headers(id, "e"), entry.clone()).0,
        401
    );
    let (st, hb) = post(
        &format!("{q}/heartbeat"),
        &exec,
        &[],
        json!({"executorName": "e", "jobIds": [id], "version": "V2"}),
    );
    assert_eq!(
        (st, serde_json::from_str::<Value>(&hb).unwrap()["knownIds"].clone()),
        (200, json!([id.to_string()]))
    );
    assert_eq!(
        post(&format!("{q}/addExecutionLogEntry"), &bearer, &job_headers(id + 1, "e"), entry.clone()).0,
        403
    );
    assert_eq!(
        post(&format!("{q}/addExecutionLogEntry"), "Bearer nope", &job_headers(id, "e"), entry.clone()).0,
        401
    );
    let (st, eid) = post(&format!("{q}/addExecutionLogEntry"), &bearer, &job_headers(id, "e"), entry.clone());
    assert_eq!((st, eid.as_str()), (200, "1"));
    let mut upd = entry.clone();
    upd["entryId"] = json!(1);
    upd["out"] = json!("stdout: first\n");
    assert_eq!(
        post(&format!("{q}/updateExecutionLogEntry"), &bearer, &job_headers(id, "e"), upd.clone()).0,
        204
    );
    upd["out"] = json!("stdout: second\n");
    upd["append"] = json!(true);
    assert_eq!(post(&format!("{q}/updateExecutionLogEntry"), &bearer, &job_headers(id, "e"), upd).0, 204);
    assert_eq!(
        sg.with_job(id, |j| j.logs[0]["out"].clone()),
        "stdout: second\n",
        "an update replaces the entry"
    );
    let done = json!({"executorName": "e", "jobId": id});
    assert_eq!(post(&format!("{q}/markComplete"), &bearer, &job_headers(id, "e"), done.clone()).0, 204);
    assert_eq!(post(&format!("{q}/markComplete"), &bearer, &job_headers(id, "e"), done).0, 404);
}

// ---------------------------------------------------------------------------------------------
// The executor against the stand-in and against our coordinator.

/// All 256 byte values, the binary file of the jobs.
fn all_bytes() -> Vec<u8> {
    (0..=255u8).collect()
}

const LINES: usize = 300;

/// Steps of the main job: 300 numbered lines over ~3 s, the binary file's digest and size from
/// inside the sandbox, and a pause so that a heartbeat follows the steps.
fn main_steps() -> Value {
    json!([
        {"key": "count", "image": "busybox", "dir": "", "env": [],
         "commands": [format!("i=1; while [ $i -le {LINES} ]; do echo \"line $i\"; i=$((i+1)); sleep 0.01; done")]},
        {"key": "bytes", "image": "busybox", "dir": "", "env": [],
         "commands": ["sha256sum bin.dat", "echo size=$(wc -c < bin.dat)", "echo on-stderr >&2"]},
        {"key": "pause", "image": "busybox", "dir": "", "env": [], "commands": ["sleep 1"]}
    ])
}

fn entry_out<'a>(logs: &'a [Value], key: &str) -> &'a str {
    logs.iter().find(|e| e["key"] == key).and_then(|e| e["out"].as_str()).unwrap_or("")
}

/// Checks the main job's stored log: all lines, the exact bytes, stderr kept.
fn check_main_logs(logs: &[Value], via: &str) {
    let out = entry_out(logs, "step.docker.count");
    let kept = (1..=LINES).filter(|i| out.lines().any(|l| l == format!("stdout: line {i}"))).count();
    assert_eq!(kept, LINES, "{via}: {kept} of {LINES} lines stored:\n{out}");
    let digest = hex(&sha2::Sha256::digest(all_bytes()));
    let bytes = entry_out(logs, "step.docker.bytes");
    assert!(
        bytes.contains(&format!("stdout: {digest}  bin.dat")),
        "{via}: the file is not byte-exact:\n{bytes}"
    );
    assert!(bytes.contains("stdout: size=256") && bytes.contains("stderr: on-stderr"), "{via}:\n{bytes}");
    for key in ["step.docker.count", "step.docker.bytes", "step.docker.pause"] {
        let e = logs.iter().find(|e| e["key"] == key).unwrap_or_else(|| panic!("{via}: no {key}: {logs:#?}"));
        assert_eq!(e["exitCode"], 0, "{via}: {key} {e}");
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The oci runtime with runc and the busybox image, or None (skip notice printed).
fn oci_fixture(test: &str) -> Option<crate::oci::Fixture> {
    if !crate::oci::can_run(test, "runc") {
        return None;
    }
    Some(crate::oci::Fixture::new("runc"))
}

fn spawn_executor(
    command: &str,
    url: &str,
    secret: &str,
    state: &Path,
    log: &Path,
    env: &[(&str, String)],
) -> Child {
    let mut cmd = common::executor();
    cmd.arg(command)
        .env("EXECUTOR_FRONTEND_URL", url)
        .env("EXECUTOR_FRONTEND_PASSWORD", secret)
        .env("EXECUTOR_QUEUE_NAME", "batches")
        .env("EXECUTOR_RUNTIME", "oci")
        .env("EXECUTOR_OCI_RUNTIME", "runc")
        .env("EXECUTOR_STATE_DIR", state)
        .env("EXECUTOR_VM_PREFIX", format!("conf{}", &uuid::Uuid::new_v4().simple().to_string()[..8]))
        .env("EXECUTOR_JOB_MEMORY", "256M")
        .env("EXECUTOR_JOB_NUM_CPUS", "1")
        .env("EXECUTOR_MAXIMUM_RUNTIME_PER_JOB", "120s")
        .env("EXECUTOR_HEARTBEAT_INTERVAL", "300ms")
        .env_remove("NODE_EXPORTER_URL")
        .env_remove("DOCKER_REGISTRY_NODE_EXPORTER_URL")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    cmd.spawn().expect("starting the executor")
}

fn wait_exit_logged(child: &mut Child, log: &Path, within: Duration) -> String {
    let exited = common::poll_until(within, || child.try_wait().unwrap().is_some());
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(exited, "the executor did not exit within {within:?}:\n{text}");
    let status = child.wait().unwrap();
    assert!(status.success(), "executor exited {status}:\n{text}");
    text
}

#[test]
fn executor_run_against_a_sourcegraph_stand_in() {
    let test = "executor_run_against_a_sourcegraph_stand_in";
    let Some(f) = oci_fixture(test) else { return };
    let sg = StandIn::start();
    sg.state.lock().unwrap().node_metrics = "# HELP go_goroutines Goroutines.\n# TYPE go_goroutines gauge\n\
         go_goroutines 12\n# HELP node_conformance_probe A node_exporter family.\n\
         # TYPE node_conformance_probe gauge\nnode_conformance_probe 42\nprocess_open_fds 9\n"
        .into();
    let bin = base64::engine::general_purpose::STANDARD.encode(all_bytes());
    let main = sg.submit(json!({"files": {"bin.dat": {"content": bin}}, "dockerSteps": main_steps(),
        "repositoryName": "", "commit": "", "redactedValues": {}}));
    let cli = sg.submit(crate::clisteps::legacy_spec(None));
    let cancel = sg.submit(json!({"dockerSteps": [
        {"key": "long", "image": "busybox", "dir": "", "env": [], "commands": ["echo started", "sleep 60"]}]}));

    let startup = f.tmp.path().join("startup.sh");
    std::fs::write(&startup, "echo startup-script-ran\n").unwrap();
    let log = f.tmp.path().join("executor.log");
    let mut child = spawn_executor(
        "run",
        &sg.url,
        &sg.secret,
        &f.state(),
        &log,
        &[
            ("EXECUTOR_NUM_TOTAL_JOBS", "3".into()),
            ("EXECUTOR_VM_STARTUP_SCRIPT_PATH", startup.display().to_string()),
            ("EXECUTOR_MAXIMUM_NUM_JOB", "1".into()),
            ("NODE_EXPORTER_URL", format!("{}/node", sg.url)),
        ],
    );

    // Cancel the third job once its step printed.
    let started = common::poll_until(Duration::from_secs(120), || {
        sg.with_job(cancel, |j| entry_out(&j.logs, "step.docker.long").contains("started"))
    });
    if !started {
        let _ = child.kill();
        let _ = child.wait();
        let s = sg.state.lock().unwrap();
        let states: Vec<(i64, &str, &Option<String>)> =
            s.jobs.iter().map(|j| (j.id, j.state, &j.failure)).collect();
        panic!(
            "the long step never started: {states:?}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let canceled_at = Instant::now();
    sg.with_job(cancel, |j| j.cancel = true);
    let stderr = wait_exit_logged(&mut child, &log, Duration::from_secs(60));

    let s = sg.state.lock().unwrap();
    // v2 payloads, earned by a semver version.
    assert!(!s.dequeue_versions.is_empty());
    for v in &s.dequeue_versions {
        assert_eq!(wants_v2(v), Some(true), "version {v:?}");
    }
    let job = |id: i64| s.jobs.iter().find(|j| j.id == id).unwrap();
    assert_eq!(job(main).payload_version, 2);
    assert_eq!(s.append_fields_seen, 0, "appends were never advertised");

    // Every line, exact bytes, startup script before the first step.
    let m = job(main);
    assert_eq!(m.state, "completed", "{:?} {:#?}", m.failure, m.logs);
    check_main_logs(&m.logs, "stand-in");
    let keys: Vec<&str> = m.logs.iter().map(|e| e["key"].as_str().unwrap_or("")).collect();
    let pos = |k: &str| keys.iter().position(|x| *x == k).unwrap_or_else(|| panic!("no {k} in {keys:?}"));
    assert!(pos("setup.startup-script") < pos("step.docker.count"), "{keys:?}");
    assert!(entry_out(&m.logs, "setup.startup-script").contains("stdout: startup-script-ran"));

    // cliSteps (the legacy batches payload, what a default instance sends): failed with the
    // advice that helps, the feature flag or the microvm runtime, in the failure and in the log.
    let c = job(cli);
    assert_eq!(c.state, "failed");
    for advice in ["native-ssbc-execution", "EXECUTOR_RUNTIME=microvm", "the oci runtime cannot run cliSteps"]
    {
        assert!(c.failure.as_deref().unwrap_or("").contains(advice), "{:?}", c.failure);
        assert!(entry_out(&c.logs, "setup.cli-steps").contains(advice), "{:#?}", c.logs);
    }
    assert!(!c.failure.as_deref().unwrap_or("").contains("upgrade"), "{:?}", c.failure);

    // Cancel: markFailed, soon.
    let k = job(cancel);
    assert_eq!(k.state, "failed", "{:?}", k.failure);
    let took = k.finished_at.unwrap().duration_since(canceled_at);
    assert!(took < Duration::from_secs(10), "markFailed {took:?} after the cancel");
    eprintln!("conformance: canceled job marked failed {:.2}s after cancelIds", took.as_secs_f64());

    // The typo'd variable was named with the closest one.
    assert!(
        stderr.contains("EXECUTOR_MAXIMUM_NUM_JOB is not a variable this executor reads; did you mean EXECUTOR_MAXIMUM_NUM_JOBS?"),
        "{stderr}"
    );

    // Heartbeats: telemetry and metrics, parseable, with node_exporter's minus go_/process_.
    let hb = s.heartbeats.last().expect("no heartbeat");
    let git = common::sh(f.tmp.path(), "git version");
    assert_eq!(hb["gitVersion"].as_str().map(|v| format!("git version {v}")), Some(git));
    assert!(hb["executorVersion"].as_str().unwrap_or("").contains("+executor."), "{hb}");
    assert_eq!((hb["os"].as_str(), hb["dockerVersion"].as_str()), (Some("linux"), Some("")));
    let with_jobs: Vec<&Value> = s.heartbeats.iter().filter(|h| h["jobIds"] == json!([cancel])).collect();
    let text = with_jobs.last().expect("a heartbeat during the canceled job")["prometheusMetrics"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let samples = parse_prometheus(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let v = |n: &str, l: &[(&str, &str)]| {
        value_of(&samples, n, l).unwrap_or_else(|| panic!("no {n} {l:?}:\n{text}"))
    };
    assert_eq!(v("executor_jobs_total", &[("queue", "batches"), ("outcome", "completed")]), 1.0);
    assert_eq!(v("executor_jobs_total", &[("queue", "batches"), ("outcome", "failed")]), 1.0);
    assert_eq!(v("executor_jobs_running", &[]), 1.0);
    assert!(v("executor_step_duration_seconds_count", &[("runtime", "oci"), ("result", "success")]) >= 3.0);
    let slow = v(
        "executor_step_duration_seconds_bucket",
        &[("runtime", "oci"), ("result", "success"), ("le", "2.5")],
    );
    let all = v(
        "executor_step_duration_seconds_bucket",
        &[("runtime", "oci"), ("result", "success"), ("le", "+Inf")],
    );
    assert!(slow < all, "the 3 s counting step is above the 2.5 s bucket:\n{text}");
    assert!(
        v("executor_sandbox_boot_duration_seconds_count", &[("runtime", "oci"), ("result", "success")])
            >= 2.0
    );
    assert!(v("executor_log_bytes_sent_total", &[]) > (LINES * 10) as f64);
    assert_eq!(v("executor_dequeue_errors_total", &[]), 0.0);
    assert_eq!(v("node_conformance_probe", &[]), 42.0);
    assert!(!text.contains("go_goroutines") && !text.contains("process_open_fds"), "{text}");
    eprintln!(
        "conformance: {} heartbeats, last metrics {} bytes, {} log bytes sent",
        s.heartbeats.len(),
        text.len(),
        v("executor_log_bytes_sent_total", &[])
    );
}

#[test]
fn executor_loop_through_our_coordinator_and_its_metrics() {
    let test = "executor_loop_through_our_coordinator_and_its_metrics";
    let Some(f) = oci_fixture(test) else { return };
    let c = Coordinator::start();
    let bin = base64::engine::general_purpose::STANDARD.encode(all_bytes());
    let id =
        c.submit(json!({"version": 2, "files": {"bin.dat": {"content": bin}}, "dockerSteps": main_steps()}));
    let log = f.tmp.path().join("executor.log");
    let mut child = spawn_executor(
        "loop",
        &c.url,
        &c.secret,
        &f.state(),
        &log,
        &[("EXECUTOR_NUM_TOTAL_JOBS", "1".into())],
    );
    wait_exit_logged(&mut child, &log, Duration::from_secs(120));
    let job = c.wait_state(id, &["completed", "failed", "errored"], Duration::from_secs(10));
    assert_eq!(job["state"], "completed", "{job:#}");
    check_main_logs(job["logs"].as_array().unwrap(), "our coordinator");

    // /metrics: the coordinator's own families and the executor's, labelled.
    let (st, text) = c.request("GET", "/metrics", Some(&c.admin_auth()), None);
    assert_eq!(st, 200);
    let samples = parse_prometheus(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let steps: Vec<&Sample> =
        samples.iter().filter(|s| s.name == "executor_step_duration_seconds_count").collect();
    assert!(!steps.is_empty(), "{text}");
    for s in &steps {
        let name = s.labels.get("executor").map(String::as_str).unwrap_or("");
        assert!(!name.is_empty() && s.labels.get("runtime").is_some_and(|r| r == "oci"), "{s:?}");
    }
    assert!(steps.iter().map(|s| s.value).sum::<f64>() >= 2.0, "{text}");
    assert!(value_of(&samples, "executor_queue_jobs", &[("state", "completed")]).is_some_and(|n| n >= 1.0));

    // A heartbeat whose metrics exceed 256 KiB is refused.
    let big = json!({"executorName": "big", "version": "V2", "prometheusMetrics": "x".repeat(300 << 10)});
    let (st, body) = c.request(
        "POST",
        "/.executors/queue/batches/heartbeat",
        Some(&c.executor_auth()),
        Some(&big.to_string()),
    );
    assert_eq!(st, 413, "{body}");
}

// ---------------------------------------------------------------------------------------------
// Real job shapes: a native batch job (`native-ssbc-execution` on) and an auto-indexing job, as
// a 5.x instance marshals them, with busybox standing in for the step images.

/// A step's result as batcheshelper's `post` prints it: one JSON event on one line, the diff
/// (base64 in the real thing) `diff_len` bytes long.
fn post_script(step: usize, diff_len: usize) -> String {
    format!(
        "d=$(head -c {diff_len} /dev/zero | tr '\\0' a); \
         printf '{{\"operation\":\"CACHE_AFTER_STEP_RESULT\",\"timestamp\":\"2024-05-14T09:21:33Z\",\
         \"status\":\"SUCCESS\",\"metadata\":{{\"key\":\"k{step}\",\"value\":{{\"stepIndex\":{step},\
         \"diff\":\"%s\",\"outputs\":{{}}}}}}}}\\n' \"$d\""
    )
}

/// The native batch payload's shape: `step.<i>.pre|run|post` triples; the first step's result
/// is a 200 KB line, and `step.1.pre` says (as batcheshelper does when a dynamic `if:` skips
/// the rest) that the next step is `step.2.pre`, one past the last.
fn native_batch_job() -> Value {
    let env = json!(["GITHUB_TOKEN=ghp_Xk29dLq7Vb3nT8sRw1Yz5Pc0Hm4Jf6Ge2Ua9"]);
    let input =
        base64::engine::general_purpose::STANDARD.encode(r#"{"steps":[{"run":"true"},{"run":"true"}]}"#);
    json!({
        "repositoryName": "", "repositoryDirectory": "", "commit": "", "fetchTags": false,
        "shallowClone": true, "sparseCheckout": null,
        "files": {"input.json": {"content": input}},
        "dockerSteps": [
            {"key": "step.0.pre", "image": "busybox", "commands": ["echo pre 0 $GITHUB_TOKEN"], "dir": ".", "env": env},
            {"key": "step.0.run", "image": "busybox",
             "commands": ["{ set +x; } 2>/dev/null", "echo changed > changed.txt"], "dir": "", "env": null},
            {"key": "step.0.post", "image": "busybox", "commands": [post_script(0, 200_000)], "dir": ".", "env": env},
            {"key": "step.1.pre", "image": "busybox",
             "commands": ["echo '{\"nextStep\":\"step.2.pre\"}' > skip.json"], "dir": ".", "env": env},
            {"key": "step.1.run", "image": "busybox", "commands": ["echo step-1-ran"], "dir": "", "env": null},
            {"key": "step.1.post", "image": "busybox", "commands": [post_script(1, 10)], "dir": ".", "env": env}
        ],
        "cliSteps": null,
        "redactedValues": {"ghp_Xk29dLq7Vb3nT8sRw1Yz5Pc0Hm4Jf6Ge2Ua9": "${{ secrets.GITHUB_TOKEN }}"},
        "dockerAuthConfig": {}
    })
}

/// The auto-indexing payload's shape: pre-index, indexer, and the upload step with the
/// instance's `SRC_ENDPOINT` and the executor token its `src` sends.
fn codeintel_job() -> Value {
    let vm = json!(["VM_CPUS=4", "VM_MEM=12.0 GB", "VM_MEM_GB=12", "VM_MEM_MB=12288", "VM_DISK=20.0 GB"]);
    json!({
        "repositoryName": "", "repositoryDirectory": "", "commit": "", "fetchTags": false,
        "shallowClone": true, "sparseCheckout": null, "files": {},
        "dockerSteps": [
            {"key": "pre-index.0", "image": "busybox", "commands": ["echo pre-index"], "dir": "", "env": vm},
            {"key": "indexer", "image": "busybox", "commands": ["echo index > index.scip"], "dir": "", "env": vm},
            {"key": "upload", "image": "busybox",
             "commands": ["echo would upload index.scip to $SRC_ENDPOINT"], "dir": "",
             "env": ["SRC_ENDPOINT=https://sourcegraph.acme.internal",
                     "SRC_HEADER_AUTHORIZATION=token-executor 0b2f5c9e7a1d4e8f6c3b9a2d5e7f1c4a"]}
        ],
        "cliSteps": null,
        "redactedValues": {
            "0b2f5c9e7a1d4e8f6c3b9a2d5e7f1c4a": "PASSWORD_REMOVED",
            "token-executor 0b2f5c9e7a1d4e8f6c3b9a2d5e7f1c4a": "token-executor REDACTED"
        },
        "dockerAuthConfig": {}
    })
}

/// A native batch job's 200 KB result line arrives whole, so the instance finds the step's
/// result (it fails a job with none, and takes a lower step's result when a higher one is cut);
/// a skip past the last step completes the job; an auto-indexing job without network says in
/// its log why its upload cannot reach the instance.
#[test]
fn sourcegraph_job_shapes_run_to_the_end() {
    let test = "sourcegraph_job_shapes_run_to_the_end";
    let Some(f) = oci_fixture(test) else { return };
    let sg = StandIn::start();
    let batch = sg.submit_to("batches", native_batch_job());
    let ci = sg.submit_to("codeintel", codeintel_job());
    for (queue, id) in [("batches", batch), ("codeintel", ci)] {
        let log = f.tmp.path().join(format!("executor-{queue}.log"));
        let mut child = spawn_executor(
            "run",
            &sg.url,
            &sg.secret,
            &f.state(),
            &log,
            &[("EXECUTOR_NUM_TOTAL_JOBS", "1".into()), ("EXECUTOR_QUEUE_NAME", queue.into())],
        );
        wait_exit_logged(&mut child, &log, Duration::from_secs(180));
        assert!(sg.with_job(id, |j| j.finished_at.is_some()), "{queue} job {id} did not finish");
    }
    let s = sg.state.lock().unwrap();
    let job = |id: i64| s.jobs.iter().find(|j| j.id == id).unwrap();

    let b = job(batch);
    assert_eq!(b.state, "completed", "{:?}\n{:#?}", b.failure, b.logs);
    let result = b.result.as_ref().expect("the instance found a step result");
    assert_eq!(result["metadata"]["value"]["stepIndex"], 0);
    assert_eq!(result["metadata"]["value"]["diff"].as_str().map(str::len), Some(200_000));
    let post = entry_out(&b.logs, "step.docker.step.0.post");
    assert_eq!(post.lines().filter(|l| l.starts_with("stdout: ")).count(), 1, "one result line");
    let keys: Vec<&str> = b.logs.iter().filter_map(|e| e["key"].as_str()).collect();
    assert!(keys.contains(&"step.docker.step.1.pre"), "{keys:?}");
    assert!(
        !keys.iter().any(|k| *k == "step.docker.step.1.run" || *k == "step.docker.step.1.post"),
        "the steps past the skip ran: {keys:?}"
    );
    assert!(entry_out(&b.logs, "step.docker.step.0.pre").contains("${{ secrets.GITHUB_TOKEN }}"));

    let c = job(ci);
    assert_eq!(c.state, "completed", "{:?}\n{:#?}", c.failure, c.logs);
    let boot = entry_out(&c.logs, "setup.oci.start");
    assert!(
        boot.contains(
            "step.docker.upload uploads to SRC_ENDPOINT=https://sourcegraph.acme.internal, but the job has \
             no network (EXECUTOR_NETWORK=none): the upload cannot reach the instance. Set \
             EXECUTOR_NETWORK=internet on this executor."
        ),
        "{boot}"
    );
    let upload = entry_out(&c.logs, "step.docker.upload");
    assert!(upload.contains("would upload index.scip to https://sourcegraph.acme.internal"), "{upload}");
    assert!(!format!("{:?}", c.logs).contains("0b2f5c9e7a1d4e8f6c3b9a2d5e7f1c4a"), "the token is redacted");
}
