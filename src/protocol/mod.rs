//! Wire types of Sourcegraph's executor protocol, shared by the client and the server so that
//! they cannot disagree. Field names follow `shared/docs/sourcegraph-protocol.md` exactly.

mod job;

pub use job::{CacheDecl, CacheKeyDecl, CliStep, DockerStep, Job, VirtualMachineFile, ZERO_TIME};

use serde::{Deserialize, Deserializer, Serialize};

/// Queue names Sourcegraph's server accepts (`ValidQueueNames`).
pub const SOURCEGRAPH_QUEUES: &[&str] = &["batches", "codeintel"];

/// Minimum length of the executors' shared secret (site config pattern `^.{20,}$`).
pub const MIN_SECRET_LEN: usize = 20;

/// The `Authorization` scheme executors use with the shared secret.
pub const SCHEME_EXECUTOR: &str = "token-executor";
/// Header naming the job on job routes.
pub const HEADER_JOB_ID: &str = "X-Sourcegraph-Job-ID";
/// Header naming the executor on job routes.
pub const HEADER_EXECUTOR_NAME: &str = "X-Sourcegraph-Executor-Name";
/// Response header of a dequeue in which `executor queue serve` (and nothing of Sourcegraph's)
/// lists the protocol extensions it accepts, comma-separated. An executor uses an extension only
/// when it is listed here: it never infers one from an error.
pub const HEADER_EXTENSIONS: &str = "X-Executor-Extensions";
/// The extension for `updateExecutionLogEntry` bodies with `"append": true` (`out` is a delta).
pub const EXTENSION_LOG_APPEND: &str = "log-append";

/// Body of both dequeue routes. `queues` is only sent in multi-queue mode.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DequeueRequest {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<String>,
    #[serde(default)]
    pub executor_name: String,
    #[serde(default)]
    pub version: String,
    #[serde(default, skip_serializing_if = "is_zero_i64", rename = "numCPUs")]
    pub num_cpus: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub memory: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub disk_space: String,
}

fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}

/// Telemetry every heartbeat (and ping) carries; flattened into both heartbeat shapes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecutorTelemetry {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub docker_version: String,
    #[serde(default)]
    pub executor_version: String,
    #[serde(default)]
    pub git_version: String,
    #[serde(default)]
    pub ignite_version: String,
    #[serde(default)]
    pub src_cli_version: String,
    #[serde(default)]
    pub prometheus_metrics: String,
    /// Our extension (Sourcegraph ignores it): the jobs whose sandboxes this executor keeps for
    /// `executor debug`, so that the coordinator shows them and can ask for their release.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept_jobs: Vec<KeptJob>,
}

/// A job whose sandbox an executor keeps for debugging, as its heartbeat reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeptJob {
    /// `"<id>"` or `"<id>-<queue>"`.
    pub id: String,
    /// RFC 3339: when the executor releases it.
    pub until: String,
}

/// Our extension: one `executor debug` attach to a kept job's sandbox, recorded in the job's log
/// (`POST /.executors/queue/{queue}/debugAttach`, executor secret). Sourcegraph has no such route.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DebugAttach {
    pub executor_name: String,
    pub job_id: i64,
    /// The host user who attached.
    pub who: String,
    /// RFC 3339.
    pub started_at: String,
    pub duration_ms: u64,
    /// The `--command` run; none for an interactive shell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    pub exit_code: i32,
}

/// Single-queue heartbeat body (`POST /.executors/queue/{queue}/heartbeat`). `jobIds` are
/// integers on the wire, but the server also accepts strings and floats.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatRequestV1 {
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub executor_name: String,
    #[serde(
        default,
        rename = "jobIds",
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "ids_lenient"
    )]
    pub job_ids: Vec<String>,
    #[serde(flatten)]
    pub telemetry: ExecutorTelemetry,
}

impl HeartbeatRequestV1 {
    /// Serialises with integer job ids, as the Go executor does for old servers.
    pub fn to_wire(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(obj) = v.as_object_mut() {
            if !self.job_ids.is_empty() {
                let ids: Vec<serde_json::Value> = self
                    .job_ids
                    .iter()
                    .map(|s| match s.parse::<i64>() {
                        Ok(n) => serde_json::Value::from(n),
                        Err(_) => serde_json::Value::from(s.as_str()),
                    })
                    .collect();
                obj.insert("jobIds".into(), serde_json::Value::Array(ids));
            }
        }
        v
    }
}

/// One queue's running ids in a multi-queue heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueJobIds {
    pub queue_name: String,
    #[serde(default, deserialize_with = "ids_lenient")]
    pub job_ids: Vec<String>,
}

/// Multi-queue heartbeat body (`POST /.executors/queue/heartbeat`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatRequest {
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub executor_name: String,
    #[serde(default)]
    pub queue_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub job_ids_by_queue: Vec<QueueJobIds>,
    #[serde(flatten)]
    pub telemetry: ExecutorTelemetry,
}

/// Heartbeat answer. Either list may be `null`; ids are strings (`"<id>"` single-queue,
/// `"<id>-<queue>"` multi-queue). Decoding accepts `knownIDs`/`cancelIDs` and numbers too.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatResponse {
    pub known_ids: Vec<String>,
    pub cancel_ids: Vec<String>,
    /// Our coordinator's extension: kept jobs whose sandboxes the executor should release now
    /// (`executor queue release`). Absent from Sourcegraph's answer and from ours when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub release_ids: Vec<String>,
}

impl<'de> Deserialize<'de> for HeartbeatResponse {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        let mut out = HeartbeatResponse::default();
        for (k, v) in map {
            let list = match k.to_ascii_lowercase().as_str() {
                "knownids" => &mut out.known_ids,
                "cancelids" => &mut out.cancel_ids,
                "releaseids" => &mut out.release_ids,
                _ => continue,
            };
            *list = lenient_list(v).map_err(serde::de::Error::custom)?;
        }
        Ok(out)
    }
}

fn lenient_list(v: serde_json::Value) -> Result<Vec<String>, String> {
    match v {
        serde_json::Value::Null => Ok(Vec::new()),
        serde_json::Value::Array(items) => items.into_iter().map(lenient_id).collect(),
        other => Err(format!("expected a list of ids, got {other}")),
    }
}

fn lenient_id(v: serde_json::Value) -> Result<String, String> {
    match v {
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(i.to_string())
            } else if let Some(f) = n.as_f64() {
                if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    Ok((f as i64).to_string())
                } else {
                    Err(format!("job id {f} is not a whole number"))
                }
            } else {
                Err(format!("job id {n} is out of range"))
            }
        }
        other => Err(format!("job id must be a string or a number, got {other}")),
    }
}

fn ids_lenient<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    lenient_list(v).map_err(serde::de::Error::custom)
}

/// An execution log entry: one setup or step command and its accumulated output.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecutionLogEntry {
    pub key: String,
    /// argv as run (redacted); `null` for the `setup.fs.*` and `teardown.fs` entries.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    pub start_time: chrono::DateTime<chrono::Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Full accumulated output so far, not a delta.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<i64>,
}

/// `{executorName, jobId}`: the part every job-route body starts with.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobOperationRequest {
    #[serde(default)]
    pub executor_name: String,
    #[serde(default)]
    pub job_id: i64,
}

/// Body of `addExecutionLogEntry`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddExecutionLogEntryRequest {
    #[serde(flatten)]
    pub op: JobOperationRequest,
    #[serde(flatten)]
    pub entry: ExecutionLogEntry,
}

/// Body of `updateExecutionLogEntry`. Our extension: with `append: true`, `out` is a delta
/// appended to the stored output instead of a full replacement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateExecutionLogEntryRequest {
    #[serde(flatten)]
    pub op: JobOperationRequest,
    pub entry_id: i64,
    #[serde(flatten)]
    pub entry: ExecutionLogEntry,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub append: bool,
}

/// Body of `markErrored` and `markFailed`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MarkErrorRequest {
    #[serde(flatten)]
    pub op: JobOperationRequest,
    #[serde(default)]
    pub error_message: String,
}

/// The `{"error": "..."}` body of failed responses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// Whether an executor `version` string earns the v2 job payload (`CheckSourcegraphVersion`).
/// `Err` when the version is neither empty, dev, a daily build nor semver: the server answers
/// 500 in that case.
pub fn wants_v2_payload(version: &str) -> Result<bool, String> {
    let v = version.trim();
    if v.is_empty() {
        return Ok(false);
    }
    if v == "dev" || v == "0.0.0+dev" {
        return Ok(true);
    }
    // Daily builds: <n>_<YYYY-MM-DD>_<hash>
    let parts: Vec<&str> = v.split('_').collect();
    if parts.len() >= 3 && parts[0].chars().all(|c| c.is_ascii_digit()) {
        if let Ok(date) = chrono::NaiveDate::parse_from_str(parts[1], "%Y-%m-%d") {
            let cutoff = chrono::NaiveDate::from_ymd_opt(2022, 11, 24).unwrap_or(date);
            return Ok(date >= cutoff);
        }
    }
    let core = v.trim_start_matches('v');
    let core = core.split(['+']).next().unwrap_or(core);
    let (main, _pre) = match core.split_once('-') {
        Some((m, p)) => (m, Some(p)),
        None => (core, None),
    };
    let nums: Vec<&str> = main.split('.').collect();
    if nums.len() != 3 || nums.iter().any(|n| n.is_empty() || !n.chars().all(|c| c.is_ascii_digit())) {
        return Err(format!("version {v:?} is not semver"));
    }
    let parse = |s: &str| s.parse::<u64>().map_err(|_| format!("version {v:?} is not semver"));
    let (major, minor) = (parse(nums[0])?, parse(nums[1])?);
    parse(nums[2])?;
    // `>= 4.3.0-0` admits every 4.3.0 prerelease, so only major.minor matter.
    Ok((major, minor) >= (4, 3))
}

/// Splits an internal record id `"<id>-<queue>"` at the first `-`.
pub fn split_uid(uid: &str) -> Option<(i64, Option<&str>)> {
    match uid.split_once('-') {
        Some((id, queue)) => id.parse().ok().map(|id| (id, Some(queue))),
        None => uid.parse().ok().map(|id| (id, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_negotiation_follows_the_contract() {
        assert_eq!(wants_v2_payload(""), Ok(false));
        assert_eq!(wants_v2_payload("dev"), Ok(true));
        assert_eq!(wants_v2_payload("0.0.0+dev"), Ok(true));
        assert_eq!(wants_v2_payload("5.2.0"), Ok(true));
        assert_eq!(wants_v2_payload("4.3.0-rc.1"), Ok(true));
        assert_eq!(wants_v2_payload("4.2.9"), Ok(false));
        assert_eq!(wants_v2_payload("123_2022-11-24_abcdef"), Ok(true));
        assert_eq!(wants_v2_payload("123_2022-11-23_abcdef"), Ok(false));
        assert!(wants_v2_payload("banana").is_err());
    }

    #[test]
    fn heartbeat_response_is_lenient() {
        let r: HeartbeatResponse =
            serde_json::from_str(r#"{"knownIDs":[1,"2-batches",3.0],"cancelIds":null}"#).unwrap();
        assert_eq!(r.known_ids, vec!["1", "2-batches", "3"]);
        assert!(r.cancel_ids.is_empty());
        assert!(serde_json::from_str::<HeartbeatResponse>(r#"{"knownIds":[1.5]}"#).is_err());
    }

    #[test]
    fn v1_heartbeat_sends_integer_ids() {
        let hb = HeartbeatRequestV1 {
            version: "V2".into(),
            executor_name: "h-1".into(),
            job_ids: vec!["17".into(), "18".into()],
            telemetry: ExecutorTelemetry::default(),
        };
        let v = hb.to_wire();
        assert_eq!(v["jobIds"], serde_json::json!([17, 18]));
        let back: HeartbeatRequestV1 = serde_json::from_value(v).unwrap();
        assert_eq!(back.job_ids, vec!["17", "18"]);
    }

    #[test]
    fn log_update_flattens() {
        let req = UpdateExecutionLogEntryRequest {
            op: JobOperationRequest { executor_name: "e".into(), job_id: 42 },
            entry_id: 3,
            entry: ExecutionLogEntry {
                key: "step.docker.0".into(),
                command: Some(vec!["sh".into()]),
                start_time: chrono::DateTime::parse_from_rfc3339("2024-01-02T03:04:05.123456789Z")
                    .unwrap()
                    .into(),
                exit_code: Some(0),
                out: Some("stdout: done\n".into()),
                duration_ms: Some(5123),
            },
            append: false,
        };
        let v = serde_json::to_value(&req).unwrap();
        assert_eq!(v["jobId"], 42);
        assert_eq!(v["entryId"], 3);
        assert_eq!(v["key"], "step.docker.0");
        assert_eq!(v["startTime"], "2024-01-02T03:04:05.123456789Z");
        assert!(v.get("append").is_none());
    }

    #[test]
    fn uid_split() {
        assert_eq!(split_uid("17"), Some((17, None)));
        assert_eq!(split_uid("17-batches"), Some((17, Some("batches"))));
        assert_eq!(split_uid("x-batches"), None);
    }
}
