//! The run document: one versioned JSON value that each pipeline stage reads, extends and writes.
//!
//! It never holds a secret in the clear. The job as dequeued (with its token, `redactedValues`
//! and step environments) is sealed with a key derived from the executors' shared secret, which
//! every stage has anyway; the document shows a redacted summary for people.

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::base::cancel::CancelReason;
use crate::base::exit::{ExitError, BAD_DOCUMENT};

pub mod egress;
pub(crate) mod sandbox;
use crate::protocol::Job;
pub use sandbox::SandboxRecord;

/// The document format this build reads and writes.
pub const DOCUMENT_VERSION: u32 = 1;

/// Largest document a stage reads; a bigger input is refused rather than buffered.
pub const MAX_DOCUMENT_BYTES: u64 = 64 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunDocument {
    pub version: u32,
    pub executor: ExecutorIdentity,
    pub job: JobSummary,
    /// The full job, sealed: see [`seal_job`].
    pub sealed_job: String,
    /// When the job must be finished (dequeue time plus the maximum runtime per job).
    pub deadline: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<WorkspaceRecord>,
    /// Images vm-boot pulled from their registries, with what their references resolved to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<ImageRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<SandboxRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifacts: Option<ArtifactsRecord>,
    /// The first failure of any stage; later stages skip their work when it is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Failure>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion: Option<CompletionRecord>,
    /// Stages that ran on this document, in order.
    #[serde(default)]
    pub history: Vec<StageRecord>,
    /// The dependency caches `run-steps` attached, which `complete` saves or not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub caches: Vec<CacheRecord>,
    /// What an `allowlist` job asked of DNS and connected to (`teardown.network.egress`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<egress::Egress>,
}

/// One dependency cache of the job (docs/caches.md): what its key was made of, whether a
/// version was found and attached, where the job's writes to it collect, and its save.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CacheRecord {
    pub key: String,
    pub repository: String,
    pub prefix: String,
    pub paths: Vec<String>,
    /// The version attached (its directory in the store); `None` on a miss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<PathBuf>,
    /// Why there was no version (`no version yet`, `corrupted: ...`), on a miss.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub miss: String,
    /// The overlay upper directory of each path, once attached, and the first host id of the
    /// range its owners are in.
    #[serde(default)]
    pub uppers: Vec<PathBuf>,
    #[serde(default)]
    pub uid_base: u32,
    /// The uppers hold whiteouts as the OCI layer format's files (they came back from a guest).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub whiteout_files: bool,
    /// Whether a successful end saves what the job wrote, and why (or why not).
    pub trusted: bool,
    pub trust: String,
    /// What `complete` did: `saved ...`, `not saved: ...`; `None` until it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved: Option<String>,
}

/// Who holds the job: everything a later stage needs to talk to the coordinator again,
/// except the shared secret, which comes from the environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecutorIdentity {
    /// `<hostname>-<uuid>`: job routes only accept the executor that dequeued the job.
    pub name: String,
    pub frontend_url: String,
    /// The queue the job came from (the route's `{queue}`).
    pub queue: String,
    /// Whether the executor dequeued in multi-queue mode (heartbeats use `<id>-<queue>` ids).
    pub multi_queue: bool,
    pub runtime: sandbox::RuntimeKind,
    pub version: String,
    /// The coordinator advertised the log-append extension at dequeue; without it every log
    /// update carries the entry's whole output.
    #[serde(default)]
    pub log_append: bool,
}

/// A redacted view of the job for people reading the document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobSummary {
    pub id: i64,
    pub uid: String,
    pub payload_version: i32,
    pub repository_name: String,
    pub repository_directory: String,
    pub commit: String,
    pub files: Vec<String>,
    pub steps: Vec<StepSummary>,
    pub artifacts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StepSummary {
    pub key: String,
    pub image: String,
    pub dir: String,
    /// Redacted script lines.
    pub commands: Vec<String>,
    /// Names of the environment variables (values are sealed).
    pub env_names: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkspaceRecord {
    /// Host directory that is the job's workspace (`/data` inside the sandbox).
    pub path: PathBuf,
    /// Scripts, one per step, relative to the workspace.
    pub scripts: Vec<String>,
    #[serde(default)]
    pub repository_cloned: bool,
    /// The operator's startup script (`EXECUTOR_VM_STARTUP_SCRIPT_PATH`) copied into the
    /// workspace, relative to it; run before the first step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_script: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StepRecord {
    pub key: String,
    pub exit_code: Option<i32>,
    pub duration_ms: i64,
    /// How the step ended when it did not exit by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_by: Option<EndedBy>,
}

/// Why a step ended when it did not exit by itself; in JSON `killed`, `canceled`, `deadline` or
/// `shutdown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndedBy {
    /// Killed by a signal it did not ask for (an OOM kill, for example).
    Killed,
    /// Stopped by the executor.
    #[serde(untagged)]
    Stopped(CancelReason),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ArtifactsRecord {
    pub files: Vec<String>,
    pub bytes: u64,
    pub sha256: String,
    pub uploaded: bool,
}

/// What `complete` should report when a stage failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureKind {
    /// markErrored: a step failed, the deadline passed, infrastructure broke.
    Errored,
    /// markFailed: a non-retryable error.
    Failed,
    /// markFailed after a cancel; the coordinator records it as `canceled`.
    Canceled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Failure {
    pub stage: String,
    pub kind: FailureKind,
    /// Already redacted.
    pub message: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompletionRecord {
    /// `completed`, `errored` or `failed`: the mark* call that was made.
    pub reported: String,
    /// False when the coordinator no longer knew the job as ours (404 on mark*).
    pub accepted: bool,
    pub at: DateTime<Utc>,
    pub sandbox_removed: bool,
    pub workspace_removed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StageRecord {
    pub stage: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

/// One image pulled for the job: the reference a step names, the registry reference it
/// normalised to, and the digest the tag resolved to (pinning it repeats the job's image).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageRecord {
    pub reference: String,
    pub resolved: String,
    pub digest: String,
    pub bytes: u64,
    pub millis: u64,
}

impl RunDocument {
    /// Creates the document for a freshly dequeued job.
    pub fn new(
        executor: ExecutorIdentity,
        job: &Job,
        secret: &str,
        deadline: Option<DateTime<Utc>>,
    ) -> Result<Self> {
        Ok(RunDocument {
            version: DOCUMENT_VERSION,
            executor,
            job: summarize(job, secret),
            sealed_job: seal_job(job, secret)?,
            deadline,
            workspace: None,
            images: Vec::new(),
            sandbox: None,
            steps: Vec::new(),
            artifacts: None,
            outcome: None,
            completion: None,
            history: Vec::new(),
            caches: Vec::new(),
            egress: None,
        })
    }

    /// The job as dequeued, token and secrets included.
    pub fn open_job(&self, secret: &str) -> Result<Job> {
        unseal_job(&self.sealed_job, secret)
    }

    /// Records the first failure; later ones are dropped because the first is the cause.
    pub fn fail(&mut self, stage: &str, kind: FailureKind, message: impl Into<String>) {
        if self.outcome.is_none() {
            self.outcome =
                Some(Failure { stage: stage.to_string(), kind, message: message.into(), at: Utc::now() });
        }
    }

    pub fn failed(&self) -> bool {
        self.outcome.is_some()
    }
}

/// The redacted summary of a job.
pub fn summarize(job: &Job, secret: &str) -> JobSummary {
    let redactor = crate::base::redact::Redactor::for_job(secret, &job.redacted_values);
    JobSummary {
        id: job.id,
        uid: job.uid(),
        payload_version: job.version,
        repository_name: job.repository_name.clone(),
        repository_directory: job.repository_directory.clone(),
        commit: job.commit.clone(),
        files: job.files.keys().cloned().collect(),
        steps: job
            .docker_steps
            .iter()
            .enumerate()
            .map(|(i, s)| StepSummary {
                key: if s.key.is_empty() { i.to_string() } else { s.key.clone() },
                image: s.image.clone(),
                dir: s.dir.clone(),
                commands: s.commands.iter().map(|c| redactor.redact_str(c)).collect(),
                env_names: s.env.iter().map(|e| e.split('=').next().unwrap_or("").to_string()).collect(),
            })
            // Sourcegraph's legacy batch jobs carry `src` invocations instead of docker steps; their
            // keys are those of the steps' log entries (`step.src.KEY`).
            .chain(job.cli_steps.iter().enumerate().map(|(i, s)| StepSummary {
                key: format!("src.{}", if s.key.is_empty() { i.to_string() } else { s.key.clone() }),
                image: String::new(),
                dir: s.dir.clone(),
                commands: vec![redactor.redact_str(&format!("src {}", s.command.join(" ")))],
                env_names: s.env.iter().map(|e| e.split('=').next().unwrap_or("").to_string()).collect(),
            }))
            .collect(),
        artifacts: job.artifacts.clone(),
    }
}

fn sealing_key(secret: &str) -> Key {
    let mut h = Sha256::new();
    h.update(b"executor run document v1\0");
    h.update(secret.as_bytes());
    let digest = h.finalize();
    *Key::from_slice(&digest)
}

/// Seals the job as `base64(nonce || ChaCha20-Poly1305(job JSON))` under a key derived from
/// the shared secret: the document can sit in a file without exposing the job token.
pub fn seal_job(job: &Job, secret: &str) -> Result<String> {
    let plain = serde_json::to_vec(job).context("encoding the job")?;
    let cipher = ChaCha20Poly1305::new(&sealing_key(secret));
    let nonce_bytes: [u8; 12] = rand::random();
    let sealed = cipher
        .encrypt(Nonce::from_slice(&nonce_bytes), plain.as_slice())
        .map_err(|_| anyhow::anyhow!("sealing the job failed"))?;
    let mut out = nonce_bytes.to_vec();
    out.extend_from_slice(&sealed);
    Ok(base64::engine::general_purpose::STANDARD.encode(out))
}

pub fn unseal_job(sealed: &str, secret: &str) -> Result<Job> {
    let raw =
        base64::engine::general_purpose::STANDARD.decode(sealed.trim()).context("sealedJob is not base64")?;
    if raw.len() < 12 + 16 {
        bail!("sealedJob is too short to hold a sealed job");
    }
    let (nonce, body) = raw.split_at(12);
    let cipher = ChaCha20Poly1305::new(&sealing_key(secret));
    let plain = cipher.decrypt(Nonce::from_slice(nonce), body).map_err(|_| {
        anyhow::anyhow!("sealedJob does not open with this executor's shared secret (sealed by another executor, or altered)")
    })?;
    serde_json::from_slice(&plain).context("the sealed job is not a valid job")
}

/// Why a document could not be read: exit status 3.
fn unreadable(message: String) -> ExitError {
    ExitError::new(BAD_DOCUMENT, message)
}

/// Reads a document from `path` or, when `None` or `-`, from stdin.
pub fn read(path: Option<&Path>) -> Result<RunDocument> {
    let (what, mut bytes) =
        (path.map(|p| p.display().to_string()).unwrap_or_else(|| "standard input".into()), Vec::new());
    let res = match path {
        Some(p) if p != Path::new("-") => {
            std::fs::File::open(p).and_then(|f| f.take(MAX_DOCUMENT_BYTES + 1).read_to_end(&mut bytes))
        }
        _ => std::io::stdin().lock().take(MAX_DOCUMENT_BYTES + 1).read_to_end(&mut bytes),
    };
    res.map_err(|e| unreadable(format!("reading the run document from {what}: {e}")))?;
    parse(&bytes).map_err(|e| unreadable(format!("run document from {what}: {e:#}")).into())
}

/// Parses and checks a document.
pub fn parse(bytes: &[u8]) -> Result<RunDocument> {
    if bytes.len() as u64 > MAX_DOCUMENT_BYTES {
        bail!("larger than {} MiB", MAX_DOCUMENT_BYTES >> 20);
    }
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        bail!("empty (did the previous stage fail before writing it?)");
    }
    let value: serde_json::Value = serde_json::from_slice(bytes).context("not JSON")?;
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(v) if v == DOCUMENT_VERSION as u64 => {}
        Some(v) => {
            bail!("document version {v} is not supported (this executor reads version {DOCUMENT_VERSION})")
        }
        None => bail!("no \"version\" field: not a run document"),
    }
    serde_json::from_value(value).context("not a valid run document")
}

/// Writes the document to `path` atomically (temporary file, fsync, rename) or to stdout.
pub fn write(doc: &RunDocument, path: Option<&Path>) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(doc).context("encoding the run document")?;
    bytes.push(b'\n');
    match path {
        Some(p) if p != Path::new("-") => crate::base::fs::write_atomic(p, &bytes),
        _ => {
            let mut out = std::io::stdout().lock();
            match out.write_all(&bytes).and_then(|_| out.flush()) {
                Ok(()) => Ok(()),
                // A closed pipe means the reader went away; not our error to report.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                Err(e) => Err(e).context("writing the run document to standard output"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> ExecutorIdentity {
        ExecutorIdentity {
            name: "host-1".into(),
            frontend_url: "http://127.0.0.1:1".into(),
            queue: "batches".into(),
            multi_queue: false,
            runtime: sandbox::RuntimeKind::Shell,
            version: "0.1.0".into(),
            log_append: false,
        }
    }

    fn job() -> Job {
        let mut j = Job { id: 5, token: "ab".repeat(20), ..Default::default() };
        j.redacted_values.insert("hunter2hunter2".into(), "PASSWORD_REMOVED".into());
        j.docker_steps.push(crate::protocol::DockerStep {
            image: "alpine".into(),
            commands: vec!["echo hunter2hunter2".into()],
            env: vec!["TOKEN=hunter2hunter2".into()],
            ..Default::default()
        });
        j
    }

    #[test]
    fn document_holds_no_secret_in_the_clear() {
        let secret = "s".repeat(24);
        let doc = RunDocument::new(identity(), &job(), &secret, None).unwrap();
        let text = serde_json::to_string(&doc).unwrap();
        assert!(!text.contains("hunter2hunter2"));
        assert!(!text.contains(&"ab".repeat(20)));
        assert!(!text.contains(&secret));
        assert!(text.contains("PASSWORD_REMOVED"));
        assert_eq!(doc.open_job(&secret).unwrap(), job());
        let err = doc.open_job(&"t".repeat(24)).unwrap_err().to_string();
        assert!(err.contains("shared secret"), "{err}");
    }

    #[test]
    fn summary_lists_cli_steps_redacted() {
        let mut j = job();
        j.docker_steps.clear();
        j.cli_steps.push(crate::protocol::CliStep {
            key: "batch-exec".into(),
            command: vec!["batch".into(), "exec".into(), "-token".into(), "hunter2hunter2".into()],
            dir: ".".into(),
            env: vec!["SRC_TOKEN=x".into()],
        });
        let s = summarize(&j, &"s".repeat(24));
        assert_eq!(s.steps.len(), 1);
        assert_eq!(s.steps[0].key, "src.batch-exec");
        assert_eq!(s.steps[0].commands, vec!["src batch exec -token PASSWORD_REMOVED".to_string()]);
        assert_eq!(s.steps[0].env_names, vec!["SRC_TOKEN".to_string()]);
    }

    #[test]
    fn parse_rejects_wrong_version_and_garbage() {
        assert!(parse(b"").unwrap_err().to_string().contains("empty"));
        assert!(parse(b"{").unwrap_err().to_string().contains("not JSON"));
        assert!(parse(br#"{"version":9}"#).unwrap_err().to_string().contains("version 9"));
        assert!(parse(br#"{"a":1}"#).unwrap_err().to_string().contains("version"));
        let secret = "s".repeat(24);
        let doc = RunDocument::new(identity(), &job(), &secret, None).unwrap();
        let bytes = serde_json::to_vec(&doc).unwrap();
        assert_eq!(parse(&bytes).unwrap(), doc);
    }

    #[test]
    fn ended_by_reads_as_before() {
        for (e, text) in [
            (EndedBy::Killed, "killed"),
            (EndedBy::Stopped(CancelReason::Canceled), "canceled"),
            (EndedBy::Stopped(CancelReason::Deadline), "deadline"),
            (EndedBy::Stopped(CancelReason::Shutdown), "shutdown"),
        ] {
            assert_eq!(serde_json::to_value(e).unwrap(), text);
            assert_eq!(serde_json::from_value::<EndedBy>(text.into()).unwrap(), e);
        }
        assert!(serde_json::from_value::<EndedBy>("exploded".into()).is_err());
    }

    #[test]
    fn first_failure_wins() {
        let secret = "s".repeat(24);
        let mut doc = RunDocument::new(identity(), &job(), &secret, None).unwrap();
        doc.fail("run-steps", FailureKind::Errored, "step 0 failed");
        doc.fail("upload", FailureKind::Failed, "later");
        assert_eq!(doc.outcome.as_ref().unwrap().stage, "run-steps");
    }
}
