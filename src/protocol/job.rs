//! The Job payload in both wire formats: v1 (file `content` as a string) and v2 (`content` as
//! base64 bytes, plus `dockerAuthConfig`). One in-memory type; the format follows `version`.

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;

/// Go's zero `time.Time`, which `modifiedAt` carries when unset.
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// A job as dequeued. `version == 2` selects the v2 wire format.
///
/// Our extension: `artifacts`, paths or globs relative to the workspace that `upload` packs.
/// Our coordinator's trace context (`traceparent`, `queuedAt`) rides along too; Sourcegraph
/// sends neither, and ignores them.
///
/// Our extension: `networkAllowHosts`, the names the job may reach (`EXECUTOR_NETWORK_ALLOW_HOSTS`
/// syntax), which bound the executor's own list: a job narrows, never widens.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Job {
    pub version: i32,
    pub id: i64,
    pub token: String,
    pub queue: String,
    pub repository_name: String,
    pub repository_directory: String,
    pub commit: String,
    pub fetch_tags: bool,
    pub shallow_clone: bool,
    pub sparse_checkout: Vec<String>,
    pub files: BTreeMap<String, VirtualMachineFile>,
    pub docker_steps: Vec<DockerStep>,
    pub cli_steps: Vec<CliStep>,
    pub redacted_values: BTreeMap<String, String>,
    /// v2 only; kept as raw JSON (`{"auths": {...}}`).
    pub docker_auth_config: Option<serde_json::Value>,
    pub artifacts: Vec<String>,
    /// Our extension (Sourcegraph ignores it): the key our coordinator's fair dequeue takes
    /// turns across within a queue; empty: the repository.
    pub tenant: String,
    /// The W3C `traceparent` of the coordinator's submit span (empty: none), which an
    /// executor's trace of the job continues.
    pub traceparent: String,
    /// When the job was submitted, by the coordinator's clock (its trace's queue wait).
    pub queued_at: Option<DateTime<Utc>>,
    /// Our extension (Sourcegraph sends none and ignores it): dependency caches the job's steps
    /// read and, for a trusted job, refresh (docs/caches.md).
    pub caches: Vec<CacheDecl>,
    /// Our coordinator's per-queue keep policy (`queue serve --keep-failed`): how long a failed
    /// job's sandbox may be kept for `executor debug`, at most the executor's own
    /// `EXECUTOR_KEEP_FAILED`; 0 keeps none. Absent (Sourcegraph): the executor's setting.
    pub keep_failed_seconds: Option<u64>,
    pub network_allow_hosts: Option<Vec<String>>,
}

/// One dependency cache a job declares: `paths` (absolute in the step's root, or relative to the
/// workspace) kept between jobs of the repository whose `key` is the same.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheDecl {
    #[serde(default)]
    pub key: CacheKeyDecl,
    #[serde(default, deserialize_with = "null_as_default")]
    pub paths: Vec<String>,
}

/// What a cache's key is made of besides the repository, the step images and the architecture:
/// a `prefix` naming it and the content of `files` (workspace-relative, as cloned).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheKeyDecl {
    #[serde(default, deserialize_with = "null_as_default")]
    pub files: Vec<String>,
    #[serde(default)]
    pub prefix: String,
}

impl Job {
    /// The record id used in heartbeats: `"<id>"`, or `"<id>-<queue>"` when `queue` is set.
    pub fn uid(&self) -> String {
        if self.queue.is_empty() {
            self.id.to_string()
        } else {
            format!("{}-{}", self.id, self.queue)
        }
    }
}

/// A file the executor writes into the workspace.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VirtualMachineFile {
    pub content: Vec<u8>,
    pub bucket: String,
    pub key: String,
    /// `None` is Go's zero time.
    pub modified_at: Option<DateTime<Utc>>,
}

/// A step: an image and the lines of a shell script, run in `dir` with `env` (`NAME=value`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DockerStep {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    #[serde(default)]
    pub image: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub commands: Vec<String>,
    #[serde(default)]
    pub dir: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub env: Vec<String>,
}

/// A legacy src-cli step (`command` is singular on the wire).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CliStep {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub command: Vec<String>,
    #[serde(default)]
    pub dir: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub env: Vec<String>,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireFile {
    #[serde(default)]
    content: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    bucket: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    key: String,
    #[serde(default)]
    modified_at: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireJob {
    #[serde(default, skip_serializing_if = "is_zero")]
    version: i32,
    #[serde(default)]
    id: i64,
    #[serde(default)]
    token: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    queue: String,
    #[serde(default)]
    repository_name: String,
    #[serde(default)]
    repository_directory: String,
    #[serde(default)]
    commit: String,
    #[serde(default)]
    fetch_tags: bool,
    #[serde(default)]
    shallow_clone: bool,
    #[serde(default)]
    sparse_checkout: Option<Vec<String>>,
    #[serde(default)]
    files: Option<BTreeMap<String, WireFile>>,
    #[serde(default)]
    docker_steps: Option<Vec<DockerStep>>,
    #[serde(default)]
    cli_steps: Option<Vec<CliStep>>,
    #[serde(default)]
    redacted_values: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    docker_auth_config: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    artifacts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    tenant: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    traceparent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    queued_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    caches: Option<Vec<CacheDecl>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    keep_failed_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    network_allow_hosts: Option<Vec<String>>,
}

fn is_zero(v: &i32) -> bool {
    *v == 0
}

impl Serialize for Job {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v2 = self.version == 2;
        let files = self
            .files
            .iter()
            .map(|(path, f)| {
                let content = if v2 {
                    base64::engine::general_purpose::STANDARD.encode(&f.content)
                } else {
                    String::from_utf8_lossy(&f.content).into_owned()
                };
                let modified_at = match f.modified_at {
                    Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                    None => ZERO_TIME.to_string(),
                };
                (
                    path.clone(),
                    WireFile {
                        content: Some(content),
                        bucket: f.bucket.clone(),
                        key: f.key.clone(),
                        modified_at: Some(modified_at),
                    },
                )
            })
            .collect();
        let wire = WireJob {
            version: self.version,
            id: self.id,
            token: self.token.clone(),
            queue: self.queue.clone(),
            repository_name: self.repository_name.clone(),
            repository_directory: self.repository_directory.clone(),
            commit: self.commit.clone(),
            fetch_tags: self.fetch_tags,
            shallow_clone: self.shallow_clone,
            sparse_checkout: if self.sparse_checkout.is_empty() {
                None
            } else {
                Some(self.sparse_checkout.clone())
            },
            files: Some(files),
            docker_steps: Some(self.docker_steps.clone()),
            cli_steps: if self.cli_steps.is_empty() { None } else { Some(self.cli_steps.clone()) },
            redacted_values: Some(self.redacted_values.clone()),
            docker_auth_config: if v2 {
                Some(self.docker_auth_config.clone().unwrap_or_else(|| serde_json::json!({})))
            } else {
                None
            },
            artifacts: if self.artifacts.is_empty() { None } else { Some(self.artifacts.clone()) },
            tenant: self.tenant.clone(),
            traceparent: self.traceparent.clone(),
            queued_at: self.queued_at,
            caches: if self.caches.is_empty() { None } else { Some(self.caches.clone()) },
            keep_failed_seconds: self.keep_failed_seconds,
            network_allow_hosts: self.network_allow_hosts.clone(),
        };
        wire.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Job {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let w = WireJob::deserialize(d)?;
        let v2 = w.version == 2;
        let mut files = BTreeMap::new();
        for (path, f) in w.files.unwrap_or_default() {
            let content = match f.content {
                None => Vec::new(),
                Some(c) if v2 => base64::engine::general_purpose::STANDARD
                    .decode(c.as_bytes())
                    .map_err(|e| D::Error::custom(format!("file {path:?}: content is not base64: {e}")))?,
                Some(c) => c.into_bytes(),
            };
            let modified_at = match f.modified_at.as_deref() {
                None | Some("") => None,
                Some(t) => {
                    let parsed = DateTime::parse_from_rfc3339(t)
                        .map_err(|e| D::Error::custom(format!("file {path:?}: modifiedAt {t:?}: {e}")))?
                        .with_timezone(&Utc);
                    if t == ZERO_TIME || parsed.timestamp() <= -62135596800 {
                        None
                    } else {
                        Some(parsed)
                    }
                }
            };
            files.insert(path, VirtualMachineFile { content, bucket: f.bucket, key: f.key, modified_at });
        }
        Ok(Job {
            version: w.version,
            id: w.id,
            token: w.token,
            queue: w.queue,
            repository_name: w.repository_name,
            repository_directory: w.repository_directory,
            commit: w.commit,
            fetch_tags: w.fetch_tags,
            shallow_clone: w.shallow_clone,
            sparse_checkout: w.sparse_checkout.unwrap_or_default(),
            files,
            docker_steps: w.docker_steps.unwrap_or_default(),
            cli_steps: w.cli_steps.unwrap_or_default(),
            redacted_values: w.redacted_values.unwrap_or_default(),
            docker_auth_config: if v2 { w.docker_auth_config.filter(|v| !v.is_null()) } else { None },
            artifacts: w.artifacts.unwrap_or_default(),
            tenant: w.tenant,
            traceparent: w.traceparent,
            queued_at: w.queued_at,
            caches: w.caches.unwrap_or_default(),
            keep_failed_seconds: w.keep_failed_seconds,
            network_allow_hosts: w.network_allow_hosts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_content_is_base64_and_round_trips() {
        let raw = r#"{"version":2,"id":1201,"token":"ab","queue":"codeintel","repositoryName":"r",
            "repositoryDirectory":"","commit":"c","fetchTags":false,"shallowClone":true,"sparseCheckout":null,
            "files":{"hello.txt":{"content":"aGk=","modifiedAt":"0001-01-01T00:00:00Z"}},
            "dockerSteps":[{"key":"indexer","image":"alpine","commands":["echo hi"],"dir":"","env":["A=b"]}],
            "cliSteps":null,"redactedValues":{"s3cr3t":"PASSWORD_REMOVED"},"dockerAuthConfig":{}}"#;
        let job: Job = serde_json::from_str(raw).unwrap();
        assert_eq!(job.files["hello.txt"].content, b"hi");
        assert_eq!(job.files["hello.txt"].modified_at, None);
        assert_eq!(job.uid(), "1201-codeintel");
        let back = serde_json::to_value(&job).unwrap();
        assert_eq!(back["files"]["hello.txt"]["content"], "aGk=");
        assert_eq!(back["files"]["hello.txt"]["modifiedAt"], ZERO_TIME);
        let again: Job = serde_json::from_value(back).unwrap();
        assert_eq!(again, job);
    }

    #[test]
    fn v1_content_is_text() {
        let raw = r#"{"id":7,"files":{"a":{"content":"aGk=","modifiedAt":"2024-01-02T03:04:05Z"}}}"#;
        let job: Job = serde_json::from_str(raw).unwrap();
        assert_eq!(job.files["a"].content, b"aGk=");
        assert!(job.files["a"].modified_at.is_some());
        let v = serde_json::to_value(&job).unwrap();
        assert!(v.get("version").is_none());
        assert!(v.get("dockerAuthConfig").is_none());
        assert_eq!(v["files"]["a"]["content"], "aGk=");
        assert!(v.get("tenant").is_none(), "no tenant, no field: the payload stays Sourcegraph's");
        let with: Job = serde_json::from_str(r#"{"id":7,"tenant":"team-a"}"#).unwrap();
        assert_eq!(with.tenant, "team-a");
        assert_eq!(serde_json::to_value(&with).unwrap()["tenant"], "team-a");
    }

    #[test]
    fn trace_context_is_sent_only_when_set() {
        let job: Job = serde_json::from_str(r#"{"id":7}"#).unwrap();
        let v = serde_json::to_value(&job).unwrap();
        assert!(v.get("traceparent").is_none() && v.get("queuedAt").is_none(), "{v}");
        let raw = r#"{"id":7,"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "queuedAt":"2026-01-02T03:04:05.678Z"}"#;
        let job: Job = serde_json::from_str(raw).unwrap();
        assert_eq!(job.traceparent, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(job.queued_at.unwrap().timestamp_millis(), 1767323045678);
        let again: Job = serde_json::from_value(serde_json::to_value(&job).unwrap()).unwrap();
        assert_eq!(again, job);
    }

    #[test]
    fn caches_are_our_extension_and_round_trip() {
        let raw = r#"{"id":7,"caches":[{"key":{"files":["package-lock.json"],"prefix":"npm"},
            "paths":["/root/.npm","node_modules"]}]}"#;
        let job: Job = serde_json::from_str(raw).unwrap();
        assert_eq!(job.caches[0].key.files, ["package-lock.json"]);
        assert_eq!(job.caches[0].key.prefix, "npm");
        assert_eq!(job.caches[0].paths, ["/root/.npm", "node_modules"]);
        let back = serde_json::to_value(&job).unwrap();
        assert_eq!(serde_json::from_value::<Job>(back).unwrap(), job);
        let none: Job = serde_json::from_str(r#"{"id":7}"#).unwrap();
        assert!(serde_json::to_value(&none).unwrap().get("caches").is_none());
    }

    #[test]
    fn bad_base64_names_the_file() {
        let raw = r#"{"version":2,"id":7,"files":{"x/y":{"content":"!!!"}}}"#;
        let err = serde_json::from_str::<Job>(raw).unwrap_err().to_string();
        assert!(err.contains("x/y"), "{err}");
    }
}
