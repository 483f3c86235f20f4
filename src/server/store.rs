//! The coordinator's SQLite store: versioned migrations, the job state machine, job tokens (as
//! SHA-256 only), execution log entries with the per-job size cap, executors and artifacts.
//!
//! Every method is synchronous and runs on the one writer connection; the HTTP layer calls it
//! from `spawn_blocking` behind a mutex, so every state change is one serialised transaction.

use anyhow::{Context, Result};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;

use crate::protocol::ExecutionLogEntry;

/// The job states, as stored and as shown.
pub const STATES: &[&str] = &["queued", "processing", "completed", "errored", "failed", "canceled"];
/// States a job never leaves.
pub const FINAL_STATES: &[&str] = &["completed", "errored", "failed", "canceled"];

/// Versioned migrations; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    state TEXT NOT NULL,
    payload TEXT NOT NULL,
    repository_name TEXT NOT NULL,
    failure_message TEXT,
    num_resets INTEGER NOT NULL DEFAULT 0,
    num_failures INTEGER NOT NULL DEFAULT 0,
    executor_name TEXT,
    token_sha256 TEXT,
    cancel INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    last_heartbeat_at INTEGER,
    log_bytes INTEGER NOT NULL DEFAULT 0,
    artifact_bytes INTEGER,
    artifact_sha256 TEXT
);
CREATE INDEX jobs_queue_state ON jobs (queue, state, id);
CREATE INDEX jobs_state_heartbeat ON jobs (state, last_heartbeat_at);
CREATE UNIQUE INDEX jobs_token ON jobs (token_sha256) WHERE token_sha256 IS NOT NULL;
CREATE TABLE log_entries (
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    entry_id INTEGER NOT NULL,
    key TEXT NOT NULL,
    command TEXT,
    start_time TEXT NOT NULL,
    exit_code INTEGER,
    out TEXT NOT NULL DEFAULT '',
    truncated INTEGER NOT NULL DEFAULT 0,
    duration_ms INTEGER,
    PRIMARY KEY (job_id, entry_id)
);
CREATE TABLE executors (
    name TEXT PRIMARY KEY,
    queue_name TEXT,
    queue_names TEXT NOT NULL,
    os TEXT NOT NULL,
    architecture TEXT NOT NULL,
    docker_version TEXT NOT NULL,
    executor_version TEXT NOT NULL,
    git_version TEXT NOT NULL,
    ignite_version TEXT NOT NULL,
    src_cli_version TEXT NOT NULL,
    first_seen_at INTEGER NOT NULL,
    last_seen_at INTEGER NOT NULL
);
"#,
    r#"
CREATE TABLE repos (
    name TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    added_at INTEGER NOT NULL
);
CREATE TABLE files (
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (bucket, key)
);
"#,
    // Appended log output goes into rows of its own, so an append costs its own size instead of
    // a rewrite of the entry's whole output (`log_entries.out` keeps what a full update set).
    r#"
CREATE TABLE log_chunks (
    job_id INTEGER NOT NULL,
    entry_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, entry_id, seq)
);
"#,
];

/// The failure message of a job whose executor stopped heartbeating too often.
pub const TOO_MANY_RESETS: &str = "job processor died while handling this message too many times";

/// `(job id, queue)` pairs.
pub type JobRefs = Vec<(i64, String)>;

/// SHA-256 of a job token (or any secret), hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// One job as the admin API shows it (without payload and logs).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobSummary {
    pub id: i64,
    pub queue: String,
    pub state: String,
    pub repository_name: String,
    pub failure_message: Option<String>,
    pub num_resets: i64,
    pub num_failures: i64,
    pub executor_name: Option<String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub cancel: bool,
}

/// Size and digest of a job's stored artifacts.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ArtifactInfo {
    pub bytes: i64,
    pub sha256: String,
}

/// A job with everything the admin API shows.
#[derive(Debug, Clone)]
pub struct JobDetail {
    pub summary: JobSummary,
    pub payload: String,
    pub artifacts: Option<ArtifactInfo>,
}

/// A job handed to an executor.
#[derive(Debug, Clone)]
pub struct Dequeued {
    pub id: i64,
    pub queue: String,
    pub payload: String,
    /// The clear job token; only its hash is stored.
    pub token: String,
}

/// What an executor reports about itself in a heartbeat.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExecutorInfo {
    pub hostname: String,
    pub queue_name: Option<String>,
    pub queue_names: Vec<String>,
    pub os: String,
    pub architecture: String,
    pub docker_version: String,
    pub executor_version: String,
    pub git_version: String,
    pub ignite_version: String,
    pub src_cli_version: String,
}

/// An executor row as the admin API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExecutorRow {
    pub id: i64,
    #[serde(flatten)]
    pub info: ExecutorInfo,
    pub first_seen_at: String,
    pub last_seen_at: String,
    pub active: bool,
}

/// A stored log entry with its 1-based id.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StoredLogEntry {
    pub entry_id: i64,
    #[serde(flatten)]
    pub entry: ExecutionLogEntry,
}

/// How an executor ends a job.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Complete,
    Errored(String),
    Failed(String),
}

/// What cancelling a job did.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelResult {
    NotFound,
    /// The job had already finished in this state.
    AlreadyFinal(String),
    /// Queued: now canceled. Processing: flagged, the executor learns it from its heartbeat.
    Done(JobSummary),
}

/// Why a log call was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum LogError {
    UnknownJob,
    UnknownEntry,
}

/// What a stalled-job sweep did to one job.
#[derive(Debug, Clone, PartialEq)]
pub struct Reset {
    pub id: i64,
    pub queue: String,
    pub new_state: String,
}

/// Copies the WAL back into the database file from its own connection, so that the fsyncs of
/// checkpoints never run while the writer's lock is held.
pub struct Checkpointer {
    conn: Connection,
}

impl Checkpointer {
    pub fn open(dir: &Path) -> Result<Checkpointer> {
        let path = dir.join("queue.db");
        let conn = Connection::open(&path).with_context(|| format!("opening database {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Checkpointer { conn })
    }

    /// A passive checkpoint: copies what it can without blocking the writer.
    pub fn checkpoint(&self) -> Result<()> {
        self.conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())).context("checkpointing the WAL")
    }
}

/// The store: one SQLite connection.
pub struct Store {
    conn: Connection,
}

fn ms_to_rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

const SUMMARY_COLS: &str = "id, queue, state, repository_name, failure_message, num_resets, num_failures, \
     executor_name, created_at, started_at, finished_at, cancel";

fn summary_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<JobSummary> {
    Ok(JobSummary {
        id: row.get(0)?,
        queue: row.get(1)?,
        state: row.get(2)?,
        repository_name: row.get(3)?,
        failure_message: row.get(4)?,
        num_resets: row.get(5)?,
        num_failures: row.get(6)?,
        executor_name: row.get(7)?,
        created_at: ms_to_rfc3339(row.get(8)?),
        started_at: row.get::<_, Option<i64>>(9)?.map(ms_to_rfc3339),
        finished_at: row.get::<_, Option<i64>>(10)?.map(ms_to_rfc3339),
        cancel: row.get::<_, i64>(11)? != 0,
    })
}

/// Cuts `s` to at most `max` bytes at a character boundary.
fn cut_at_boundary(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The marker that ends a truncated entry's output.
pub fn truncation_marker(cap: u64) -> String {
    format!("\n[executor: log truncated at {cap} bytes]\n")
}

impl Store {
    /// Opens (creating if needed) `dir/queue.db`, sets WAL mode and runs pending migrations.
    pub fn open(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating data directory {}", dir.display()))?;
        let path = dir.join("queue.db");
        let conn = Connection::open(&path).with_context(|| format!("opening database {}", path.display()))?;
        Self::init(conn).with_context(|| format!("initialising database {}", path.display()))
    }

    /// An in-memory store, for unit tests.
    pub fn open_in_memory() -> Result<Store> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Store> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // WAL + NORMAL: a committed transaction survives the death of this process (the WAL is in
        // the OS page cache) but not necessarily a power loss. See docs/coordinator.md.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Checkpoints (the only fsyncs under NORMAL) run on a second connection off the request
        // path (`Checkpointer`), so no request waits for one.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version as usize > MIGRATIONS.len() {
            anyhow::bail!(
                "database schema version {version} is newer than this binary knows ({})",
                MIGRATIONS.len()
            );
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql).with_context(|| format!("running migration {}", i + 1))?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(Store { conn })
    }

    /// Adds a queued job; `payload` is the validated job JSON without id and token.
    pub fn submit(&mut self, queue: &str, payload: &str, repository_name: &str, now: i64) -> Result<i64> {
        self.conn.execute(
            "INSERT INTO jobs (queue, state, payload, repository_name, created_at) VALUES (?1, 'queued', ?2, ?3, ?4)",
            params![queue, payload, repository_name, now],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Number of queued jobs per queue among `queues`.
    fn queued_counts(tx: &Transaction<'_>, queues: &[String]) -> Result<Vec<(String, i64)>> {
        let mut out = Vec::new();
        let mut stmt =
            tx.prepare_cached("SELECT EXISTS (SELECT 1 FROM jobs WHERE queue = ?1 AND state = 'queued')")?;
        for q in queues {
            let n: i64 = stmt.query_row([q], |r| r.get(0))?;
            if n > 0 {
                out.push((q.clone(), n));
            }
        }
        Ok(out)
    }

    /// Hands the oldest queued job of one of `queues` to `executor`. With several non-empty
    /// queues one is picked at random, weighted by `weight(queue)`.
    pub fn dequeue(
        &mut self,
        queues: &[String],
        executor: &str,
        now: i64,
        weight: impl Fn(&str) -> u32,
    ) -> Result<Option<Dequeued>> {
        use rand::Rng;
        let tx = self.conn.transaction()?;
        let candidates = Self::queued_counts(&tx, queues)?;
        let queue = match candidates.len() {
            0 => return Ok(None),
            1 => candidates[0].0.clone(),
            _ => {
                let total: u32 = candidates.iter().map(|(q, _)| weight(q).max(1)).sum();
                let mut pick = rand::thread_rng().gen_range(0..total);
                let mut chosen = candidates[0].0.clone();
                for (q, _) in &candidates {
                    let w = weight(q).max(1);
                    if pick < w {
                        chosen = q.clone();
                        break;
                    }
                    pick -= w;
                }
                chosen
            }
        };
        let row: Option<(i64, String)> = tx
            .query_row(
                "SELECT id, payload FROM jobs WHERE queue = ?1 AND state = 'queued' ORDER BY id LIMIT 1",
                [&queue],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((id, payload)) = row else { return Ok(None) };
        let mut raw = [0u8; 20];
        rand::thread_rng().fill(&mut raw);
        let token = hex::encode(raw);
        let changed = tx.execute(
            "UPDATE jobs SET state = 'processing', executor_name = ?2, token_sha256 = ?3, started_at = ?4, \
             last_heartbeat_at = ?4, failure_message = NULL, finished_at = NULL, log_bytes = 0 \
             WHERE id = ?1 AND state = 'queued'",
            params![id, executor, sha256_hex(&raw), now],
        )?;
        if changed != 1 {
            return Ok(None);
        }
        tx.execute("DELETE FROM log_entries WHERE job_id = ?1", [id])?;
        tx.execute("DELETE FROM log_chunks WHERE job_id = ?1", [id])?;
        tx.commit()?;
        Ok(Some(Dequeued { id, queue, payload, token }))
    }

    /// The job (id, queue, repository) a token belongs to, by the SHA-256 of its decoded bytes.
    pub fn job_for_token(&self, token_sha256: &str) -> Result<Option<(i64, String, String)>> {
        Ok(self
            .conn
            .prepare_cached("SELECT id, queue, repository_name FROM jobs WHERE token_sha256 = ?1")?
            .query_row([token_sha256], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?)
    }

    /// Whether an executor of this name ever heartbeated.
    pub fn executor_known(&self, name: &str) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM executors WHERE name = ?1")?
            .query_row([name], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Upserts the executor's row, refreshes the heartbeat of the listed jobs it still owns,
    /// and returns (known, cancel) as `(id, queue)` pairs.
    pub fn heartbeat(
        &mut self,
        info: &ExecutorInfo,
        jobs: &[(i64, String)],
        now: i64,
    ) -> Result<(JobRefs, JobRefs)> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO executors (name, queue_name, queue_names, os, architecture, docker_version, \
             executor_version, git_version, ignite_version, src_cli_version, first_seen_at, last_seen_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11) \
             ON CONFLICT (name) DO UPDATE SET queue_name = ?2, queue_names = ?3, os = ?4, architecture = ?5, \
             docker_version = ?6, executor_version = ?7, git_version = ?8, ignite_version = ?9, \
             src_cli_version = ?10, last_seen_at = ?11",
            params![
                info.hostname,
                info.queue_name,
                serde_json::to_string(&info.queue_names)?,
                info.os,
                info.architecture,
                info.docker_version,
                info.executor_version,
                info.git_version,
                info.ignite_version,
                info.src_cli_version,
                now
            ],
        )?;
        let mut known = Vec::new();
        let mut cancel = Vec::new();
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE jobs SET last_heartbeat_at = ?4 WHERE id = ?1 AND queue = ?2 AND executor_name = ?3 \
                 AND state = 'processing' RETURNING cancel",
            )?;
            for (id, queue) in jobs {
                let flag: Option<i64> =
                    stmt.query_row(params![id, queue, info.hostname, now], |r| r.get(0)).optional()?;
                if let Some(flag) = flag {
                    known.push((*id, queue.clone()));
                    if flag != 0 {
                        cancel.push((*id, queue.clone()));
                    }
                }
            }
        }
        tx.commit()?;
        Ok((known, cancel))
    }

    fn owned(tx: &Transaction<'_>, id: i64, executor: &str) -> Result<bool> {
        Ok(tx
            .prepare_cached(
                "SELECT 1 FROM jobs WHERE id = ?1 AND executor_name = ?2 AND state = 'processing'",
            )?
            .query_row(params![id, executor], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Whether `executor` is processing job `id`.
    pub fn is_owned(&mut self, id: i64, executor: &str) -> Result<bool> {
        let tx = self.conn.transaction()?;
        Self::owned(&tx, id, executor)
    }

    /// Bytes of log output the job holds (markers not counted).
    fn log_bytes(tx: &Transaction<'_>, id: i64) -> Result<i64> {
        Ok(tx.query_row("SELECT log_bytes FROM jobs WHERE id = ?1", [id], |r| r.get(0))?)
    }

    fn set_log_bytes(tx: &Transaction<'_>, id: i64, bytes: i64) -> Result<()> {
        tx.execute("UPDATE jobs SET log_bytes = ?2 WHERE id = ?1", params![id, bytes])?;
        Ok(())
    }

    /// Fits `out` into a budget of `budget` bytes: the kept text (with the marker when cut), whether
    /// it was cut, and how many bytes of output it keeps.
    fn fit(out: &str, budget: i64, cap: u64) -> (String, bool, i64) {
        let budget = budget.max(0) as usize;
        if out.len() <= budget {
            return (out.to_string(), false, out.len() as i64);
        }
        let kept = cut_at_boundary(out, budget);
        (format!("{kept}{}", truncation_marker(cap)), true, kept.len() as i64)
    }

    /// The output bytes one entry holds, in its row and its appended chunks, markers not counted.
    fn entry_bytes(tx: &Transaction<'_>, id: i64, entry_id: i64, cap: u64) -> Result<i64> {
        Ok(tx.query_row(
            "SELECT LENGTH(CAST(out AS BLOB)) + (SELECT COALESCE(SUM(LENGTH(CAST(data AS BLOB))), 0) \
             FROM log_chunks WHERE job_id = ?1 AND entry_id = ?2) - truncated * LENGTH(CAST(?3 AS BLOB)) \
             FROM log_entries WHERE job_id = ?1 AND entry_id = ?2",
            params![id, entry_id, truncation_marker(cap)],
            |r| r.get(0),
        )?)
    }

    /// addExecutionLogEntry: returns the new 1-based entry id.
    pub fn add_log(
        &mut self,
        id: i64,
        executor: &str,
        entry: &ExecutionLogEntry,
        cap: u64,
    ) -> Result<std::result::Result<i64, LogError>> {
        let tx = self.conn.transaction()?;
        if !Self::owned(&tx, id, executor)? {
            return Ok(Err(LogError::UnknownJob));
        }
        let entry_id: i64 = tx.query_row(
            "SELECT COALESCE(MAX(entry_id), 0) + 1 FROM log_entries WHERE job_id = ?1",
            [id],
            |r| r.get(0),
        )?;
        let used = Self::log_bytes(&tx, id)?;
        let (out, truncated, kept) = Self::fit(entry.out.as_deref().unwrap_or(""), cap as i64 - used, cap);
        tx.execute(
            "INSERT INTO log_entries (job_id, entry_id, key, command, start_time, exit_code, out, truncated, duration_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                id,
                entry_id,
                entry.key,
                entry.command.as_ref().map(serde_json::to_string).transpose()?,
                entry.start_time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                entry.exit_code,
                out,
                truncated,
                entry.duration_ms
            ],
        )?;
        Self::set_log_bytes(&tx, id, used + kept)?;
        tx.commit()?;
        Ok(Ok(entry_id))
    }

    /// updateExecutionLogEntry: replaces the entry, or with `append` appends `out` to it.
    pub fn update_log(
        &mut self,
        id: i64,
        executor: &str,
        entry_id: i64,
        entry: &ExecutionLogEntry,
        append: bool,
        cap: u64,
    ) -> Result<std::result::Result<(), LogError>> {
        let tx = self.conn.transaction()?;
        if !Self::owned(&tx, id, executor)? {
            return Ok(Err(LogError::UnknownJob));
        }
        let current: Option<bool> = tx
            .query_row(
                "SELECT truncated FROM log_entries WHERE job_id = ?1 AND entry_id = ?2",
                params![id, entry_id],
                |r| r.get(0),
            )
            .optional()?;
        let Some(mut truncated) = current else { return Ok(Err(LogError::UnknownEntry)) };
        let delta = entry.out.as_deref().unwrap_or("");
        let used = Self::log_bytes(&tx, id)?;
        if append {
            // Past a cut nothing more is kept; otherwise the delta becomes a chunk of its own.
            if !truncated && !delta.is_empty() {
                let (data, cut, kept) = Self::fit(delta, cap as i64 - used, cap);
                tx.execute(
                    "INSERT INTO log_chunks (job_id, entry_id, seq, data) VALUES (?1, ?2, \
                     (SELECT COALESCE(MAX(seq), 0) + 1 FROM log_chunks WHERE job_id = ?1 AND entry_id = ?2), ?3)",
                    params![id, entry_id, data],
                )?;
                truncated = cut;
                Self::set_log_bytes(&tx, id, used + kept)?;
            }
        } else {
            let held = Self::entry_bytes(&tx, id, entry_id, cap)?;
            // A full replacement at least as long as what a cut kept keeps the cut; any other
            // replaces the entry's output, chunks included.
            if !(truncated && delta.len() as i64 >= held) {
                let others = used - held;
                let (out, cut, kept) = Self::fit(delta, cap as i64 - others, cap);
                tx.execute(
                    "DELETE FROM log_chunks WHERE job_id = ?1 AND entry_id = ?2",
                    params![id, entry_id],
                )?;
                tx.execute(
                    "UPDATE log_entries SET out = ?3 WHERE job_id = ?1 AND entry_id = ?2",
                    params![id, entry_id, out],
                )?;
                truncated = cut;
                Self::set_log_bytes(&tx, id, others + kept)?;
            }
        }
        tx.execute(
            "UPDATE log_entries SET key = ?3, command = ?4, start_time = ?5, exit_code = ?6, \
             truncated = ?7, duration_ms = ?8 WHERE job_id = ?1 AND entry_id = ?2",
            params![
                id,
                entry_id,
                entry.key,
                entry.command.as_ref().map(serde_json::to_string).transpose()?,
                entry.start_time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                entry.exit_code,
                truncated,
                entry.duration_ms
            ],
        )?;
        tx.commit()?;
        Ok(Ok(()))
    }

    /// markComplete / markErrored / markFailed. `false` when the job is not `executor`'s or not
    /// processing. markErrored ends `failed` once `num_failures + 1 >= max_retries` (the contract's
    /// MaxNumRetries; the default 0 never retries); below that limit the job goes straight back to
    /// `queued` with its failure message kept, so `errored` is never a resting state.
    pub fn mark(
        &mut self,
        id: i64,
        executor: &str,
        outcome: &Outcome,
        max_retries: i64,
        now: i64,
    ) -> Result<bool> {
        let tx = self.conn.transaction()?;
        let row: Option<(i64, i64)> = tx
            .query_row(
                "SELECT cancel, num_failures FROM jobs WHERE id = ?1 AND executor_name = ?2 AND state = 'processing'",
                params![id, executor],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((cancel, failures)) = row else { return Ok(false) };
        let cancel = cancel != 0;
        let (state, message, failures) = match outcome {
            Outcome::Complete => ("completed", None, failures),
            Outcome::Errored(m) if cancel => ("canceled", Some(m.as_str()), failures),
            Outcome::Errored(m) if failures + 1 >= max_retries => ("failed", Some(m.as_str()), failures + 1),
            Outcome::Errored(m) => ("queued", Some(m.as_str()), failures + 1),
            Outcome::Failed(m) if cancel => ("canceled", Some(m.as_str()), failures),
            Outcome::Failed(m) => ("failed", Some(m.as_str()), failures),
        };
        let finished = if state == "queued" { None } else { Some(now) };
        tx.execute(
            "UPDATE jobs SET state = ?2, failure_message = ?3, num_failures = ?4, finished_at = ?5, \
             token_sha256 = NULL, executor_name = CASE WHEN ?2 = 'queued' THEN NULL ELSE executor_name END \
             WHERE id = ?1",
            params![id, state, message, failures, finished],
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// Cancels a job: queued ones at once, processing ones through the heartbeat.
    pub fn cancel(&mut self, id: i64, now: i64) -> Result<CancelResult> {
        let tx = self.conn.transaction()?;
        let state: Option<String> =
            tx.query_row("SELECT state FROM jobs WHERE id = ?1", [id], |r| r.get(0)).optional()?;
        match state.as_deref() {
            None => return Ok(CancelResult::NotFound),
            Some("queued") => {
                tx.execute(
                    "UPDATE jobs SET state = 'canceled', cancel = 1, finished_at = ?2 WHERE id = ?1",
                    params![id, now],
                )?;
            }
            Some("processing") => {
                tx.execute("UPDATE jobs SET cancel = 1 WHERE id = ?1", [id])?;
            }
            Some(other) => return Ok(CancelResult::AlreadyFinal(other.to_string())),
        }
        let summary =
            tx.query_row(&format!("SELECT {SUMMARY_COLS} FROM jobs WHERE id = ?1"), [id], summary_from_row)?;
        tx.commit()?;
        Ok(CancelResult::Done(summary))
    }

    /// Requeues (or fails, past `max_resets`) every processing job whose last heartbeat is
    /// older than `cutoff`. A cancelled job ends `canceled` instead.
    pub fn reset_stalled(
        &mut self,
        cutoff: i64,
        max_resets: i64,
        age_text: &str,
        now: i64,
    ) -> Result<Vec<Reset>> {
        let tx = self.conn.transaction()?;
        let stalled: Vec<(i64, String, i64, i64)> = {
            let mut stmt = tx.prepare_cached(
                "SELECT id, queue, num_resets, cancel FROM jobs WHERE state = 'processing' AND last_heartbeat_at < ?1",
            )?;
            let rows = stmt.query_map([cutoff], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let mut out = Vec::new();
        for (id, queue, resets, cancel) in stalled {
            let (state, message): (&str, Option<String>) = if cancel != 0 {
                ("canceled", Some(format!("canceled; the executor stopped heartbeating for {age_text}")))
            } else if resets < max_resets {
                ("queued", None)
            } else {
                (
                    "failed",
                    Some(format!(
                        "{TOO_MANY_RESETS}: no heartbeat for {age_text}, already reset {resets} times (limit {max_resets})"
                    )),
                )
            };
            let finished = if state == "queued" { None } else { Some(now) };
            tx.execute(
                "UPDATE jobs SET state = ?2, failure_message = ?3, finished_at = ?4, token_sha256 = NULL, \
                 num_resets = num_resets + CASE WHEN ?2 = 'queued' THEN 1 ELSE 0 END, \
                 executor_name = CASE WHEN ?2 = 'queued' THEN NULL ELSE executor_name END \
                 WHERE id = ?1",
                params![id, state, message, finished],
            )?;
            out.push(Reset { id, queue, new_state: state.to_string() });
        }
        tx.commit()?;
        Ok(out)
    }

    /// One job with its payload and artifact info.
    pub fn job(&self, id: i64) -> Result<Option<JobDetail>> {
        Ok(self
            .conn
            .query_row(
                &format!(
                    "SELECT {SUMMARY_COLS}, payload, artifact_bytes, artifact_sha256 FROM jobs WHERE id = ?1"
                ),
                [id],
                |r| {
                    let summary = summary_from_row(r)?;
                    let bytes: Option<i64> = r.get(13)?;
                    let sha: Option<String> = r.get(14)?;
                    Ok(JobDetail {
                        summary,
                        payload: r.get(12)?,
                        artifacts: match (bytes, sha) {
                            (Some(bytes), Some(sha256)) => Some(ArtifactInfo { bytes, sha256 }),
                            _ => None,
                        },
                    })
                },
            )
            .optional()?)
    }

    /// The state of a job, if it exists.
    pub fn state(&self, id: i64) -> Result<Option<String>> {
        Ok(self
            .conn
            .prepare_cached("SELECT state FROM jobs WHERE id = ?1")?
            .query_row([id], |r| r.get(0))
            .optional()?)
    }

    /// Jobs, newest first, filtered by queue and state.
    pub fn list(&self, queue: Option<&str>, state: Option<&str>, limit: i64) -> Result<Vec<JobSummary>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {SUMMARY_COLS} FROM jobs WHERE (?1 IS NULL OR queue = ?1) AND (?2 IS NULL OR state = ?2) \
             ORDER BY id DESC LIMIT ?3"
        ))?;
        let rows = stmt.query_map(params![queue, state, limit], summary_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// A job's log entries in order.
    pub fn logs(&self, id: i64) -> Result<Vec<StoredLogEntry>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT entry_id, key, command, start_time, exit_code, out, duration_ms FROM log_entries \
             WHERE job_id = ?1 ORDER BY entry_id",
        )?;
        let rows = stmt.query_map([id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<i32>>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, Option<i64>>(6)?,
            ))
        })?;
        let rows: Vec<_> = rows.collect::<rusqlite::Result<_>>()?;
        let mut chunks = self.conn.prepare_cached(
            "SELECT entry_id, data FROM log_chunks WHERE job_id = ?1 ORDER BY entry_id, seq",
        )?;
        let mut appended: HashMap<i64, String> = HashMap::new();
        for c in chunks.query_map([id], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))? {
            let (entry_id, data) = c?;
            appended.entry(entry_id).or_default().push_str(&data);
        }
        let mut out = Vec::new();
        for (entry_id, key, command, start, exit_code, mut text, duration_ms) in rows {
            if let Some(more) = appended.remove(&entry_id) {
                text.push_str(&more);
            }
            let command = command
                .map(|c| serde_json::from_str::<Vec<String>>(&c))
                .transpose()
                .with_context(|| format!("log entry {entry_id} of job {id}: stored command is not a list"))?;
            let start_time = chrono::DateTime::parse_from_rfc3339(&start)
                .with_context(|| format!("log entry {entry_id} of job {id}: stored start time {start:?}"))?
                .with_timezone(&chrono::Utc);
            out.push(StoredLogEntry {
                entry_id,
                entry: ExecutionLogEntry {
                    key,
                    command,
                    start_time,
                    exit_code,
                    out: if text.is_empty() { None } else { Some(text) },
                    duration_ms,
                },
            });
        }
        Ok(out)
    }

    /// Every executor row; `active` = seen within `active_ms` of `now`.
    pub fn executors(&self, now: i64, active_ms: i64) -> Result<Vec<ExecutorRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT rowid, name, queue_name, queue_names, os, architecture, docker_version, executor_version, \
             git_version, ignite_version, src_cli_version, first_seen_at, last_seen_at FROM executors \
             ORDER BY last_seen_at DESC",
        )?;
        let rows = stmt.query_map([], |r| {
            let queue_names: String = r.get(3)?;
            let last: i64 = r.get(12)?;
            Ok(ExecutorRow {
                id: r.get(0)?,
                info: ExecutorInfo {
                    hostname: r.get(1)?,
                    queue_name: r.get(2)?,
                    queue_names: serde_json::from_str(&queue_names).unwrap_or_default(),
                    os: r.get(4)?,
                    architecture: r.get(5)?,
                    docker_version: r.get(6)?,
                    executor_version: r.get(7)?,
                    git_version: r.get(8)?,
                    ignite_version: r.get(9)?,
                    src_cli_version: r.get(10)?,
                },
                first_seen_at: ms_to_rfc3339(r.get(11)?),
                last_seen_at: ms_to_rfc3339(last),
                active: now - last <= active_ms,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Records a job's artifacts (already renamed into place by the caller under this lock).
    /// `false` when the job is not `executor`'s processing job.
    pub fn set_artifacts(&mut self, id: i64, executor: &str, bytes: i64, sha256: &str) -> Result<bool> {
        let n = self.conn.execute(
            "UPDATE jobs SET artifact_bytes = ?3, artifact_sha256 = ?4 WHERE id = ?1 AND executor_name = ?2 \
             AND state = 'processing'",
            params![id, executor, bytes, sha256],
        )?;
        Ok(n == 1)
    }

    /// (queue, state, count) for every pair with jobs.
    pub fn counts(&self) -> Result<Vec<(String, String, i64)>> {
        let mut stmt =
            self.conn.prepare_cached("SELECT queue, state, COUNT(*) FROM jobs GROUP BY queue, state")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Executors seen since `since`.
    pub fn active_executors(&self, since: i64) -> Result<i64> {
        Ok(self
            .conn
            .query_row("SELECT COUNT(*) FROM executors WHERE last_seen_at >= ?1", [since], |r| r.get(0))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str) -> ExecutorInfo {
        ExecutorInfo { hostname: name.into(), queue_names: vec!["batches".into()], ..Default::default() }
    }

    fn entry(out: &str) -> ExecutionLogEntry {
        ExecutionLogEntry {
            key: "step.0".into(),
            command: Some(vec!["sh".into()]),
            start_time: chrono::Utc::now(),
            exit_code: None,
            out: Some(out.into()),
            duration_ms: None,
        }
    }

    fn q(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn dequeue_hands_each_job_once_and_tokens_are_hashed() {
        let mut s = Store::open_in_memory().unwrap();
        let a = s.submit("batches", "{}", "r", 1).unwrap();
        let b = s.submit("codeintel", "{}", "r", 1).unwrap();
        assert!(b > a, "one id sequence across queues");
        let d = s.dequeue(&q(&["batches"]), "e1", 2, |_| 1).unwrap().unwrap();
        assert_eq!(d.id, a);
        assert_eq!(d.token.len(), 40);
        assert!(s.dequeue(&q(&["batches"]), "e1", 2, |_| 1).unwrap().is_none());
        let (id, queue, _) = s.job_for_token(&sha256_hex(&hex::decode(&d.token).unwrap())).unwrap().unwrap();
        assert_eq!((id, queue.as_str()), (a, "batches"));
        assert!(s.job_for_token(&d.token).unwrap().is_none(), "the clear token is not stored");
        assert!(s.mark(a, "e1", &Outcome::Complete, 0, 3).unwrap());
        assert!(
            s.job_for_token(&sha256_hex(&hex::decode(&d.token).unwrap())).unwrap().is_none(),
            "token deleted"
        );
        assert!(!s.mark(a, "e1", &Outcome::Complete, 0, 3).unwrap());
    }

    #[test]
    fn errored_ends_failed_and_cancel_ends_canceled() {
        let mut s = Store::open_in_memory().unwrap();
        let a = s.submit("batches", "{}", "r", 1).unwrap();
        s.dequeue(&q(&["batches"]), "e", 2, |_| 1).unwrap().unwrap();
        assert!(!s.mark(a, "other", &Outcome::Errored("x".into()), 0, 3).unwrap());
        assert!(s.mark(a, "e", &Outcome::Errored("boom".into()), 0, 3).unwrap());
        let j = s.job(a).unwrap().unwrap().summary;
        assert_eq!((j.state.as_str(), j.num_failures), ("failed", 1));
        assert_eq!(j.failure_message.as_deref(), Some("boom"));

        let b = s.submit("batches", "{}", "r", 1).unwrap();
        s.dequeue(&q(&["batches"]), "e", 2, |_| 1).unwrap().unwrap();
        assert!(matches!(s.cancel(b, 3).unwrap(), CancelResult::Done(_)));
        let (known, cancel) = s.heartbeat(&info("e"), &[(b, "batches".into())], 4).unwrap();
        assert_eq!(known, vec![(b, "batches".to_string())]);
        assert_eq!(cancel, known);
        assert!(s.mark(b, "e", &Outcome::Failed("canceled".into()), 0, 5).unwrap());
        assert_eq!(s.state(b).unwrap().as_deref(), Some("canceled"));
        assert_eq!(s.cancel(b, 6).unwrap(), CancelResult::AlreadyFinal("canceled".into()));

        let c = s.submit("batches", "{}", "r", 1).unwrap();
        assert!(matches!(s.cancel(c, 3).unwrap(), CancelResult::Done(j) if j.state == "canceled"));
        assert!(s.dequeue(&q(&["batches"]), "e", 2, |_| 1).unwrap().is_none());
    }

    #[test]
    fn stalled_jobs_are_reset_then_failed() {
        let mut s = Store::open_in_memory().unwrap();
        let a = s.submit("batches", "{}", "r", 0).unwrap();
        for round in 0..3 {
            s.dequeue(&q(&["batches"]), "e", 10, |_| 1).unwrap().unwrap();
            let r = s.reset_stalled(100, 2, "25s", 100).unwrap();
            let want = if round < 2 { "queued" } else { "failed" };
            assert_eq!(r, vec![Reset { id: a, queue: "batches".into(), new_state: want.into() }]);
        }
        let j = s.job(a).unwrap().unwrap().summary;
        assert_eq!(j.num_resets, 2);
        assert!(j.failure_message.unwrap().starts_with(TOO_MANY_RESETS));
    }

    #[test]
    fn logs_append_and_cap_with_a_marker() {
        let mut s = Store::open_in_memory().unwrap();
        let a = s.submit("batches", "{}", "r", 0).unwrap();
        s.dequeue(&q(&["batches"]), "e", 1, |_| 1).unwrap().unwrap();
        assert_eq!(s.add_log(a, "x", &entry("hi"), 10).unwrap(), Err(LogError::UnknownJob));
        let e1 = s.add_log(a, "e", &entry("abc"), 10).unwrap().unwrap();
        assert_eq!(e1, 1);
        s.update_log(a, "e", e1, &entry("def"), true, 10).unwrap().unwrap();
        assert_eq!(s.logs(a).unwrap()[0].entry.out.as_deref(), Some("abcdef"));
        s.update_log(a, "e", e1, &entry("abcdefgh"), false, 10).unwrap().unwrap();
        let e2 = s.add_log(a, "e", &entry("123456"), 10).unwrap().unwrap();
        assert_eq!(e2, 2);
        let logs = s.logs(a).unwrap();
        assert_eq!(logs[1].entry.out.as_deref(), Some(format!("12{}", truncation_marker(10)).as_str()));
        s.update_log(a, "e", e2, &entry("more"), true, 10).unwrap().unwrap();
        assert_eq!(s.logs(a).unwrap()[1].entry.out, logs[1].entry.out, "nothing past the marker");
        assert_eq!(s.update_log(a, "e", 9, &entry(""), false, 10).unwrap(), Err(LogError::UnknownEntry));
    }

    #[test]
    fn appended_chunks_read_back_in_order_and_share_the_budget_with_replacements() {
        let mut s = Store::open_in_memory().unwrap();
        let a = s.submit("batches", "{}", "r", 0).unwrap();
        s.dequeue(&q(&["batches"]), "e", 1, |_| 1).unwrap().unwrap();
        let e1 = s.add_log(a, "e", &entry("a"), 20).unwrap().unwrap();
        for part in ["b", "c", "d", "e"] {
            s.update_log(a, "e", e1, &entry(part), true, 20).unwrap().unwrap();
        }
        assert_eq!(s.logs(a).unwrap()[0].entry.out.as_deref(), Some("abcde"));
        // A full replacement drops the chunks and frees their budget for the next entry.
        s.update_log(a, "e", e1, &entry("xy"), false, 20).unwrap().unwrap();
        assert_eq!(s.logs(a).unwrap()[0].entry.out.as_deref(), Some("xy"));
        let e2 = s.add_log(a, "e", &entry("0123456789"), 20).unwrap().unwrap();
        s.update_log(a, "e", e2, &entry("abcdefghij"), true, 20).unwrap().unwrap();
        let logs = s.logs(a).unwrap();
        let marker = truncation_marker(20);
        assert_eq!(logs[1].entry.out.as_deref(), Some(format!("0123456789abcdefgh{marker}").as_str()));
        // A shorter replacement of the cut entry is kept whole: it fits the budget again.
        s.update_log(a, "e", e2, &entry("short"), false, 20).unwrap().unwrap();
        assert_eq!(s.logs(a).unwrap()[1].entry.out.as_deref(), Some("short"));
        s.update_log(a, "e", e2, &entry("+more"), true, 20).unwrap().unwrap();
        assert_eq!(s.logs(a).unwrap()[1].entry.out.as_deref(), Some("short+more"));
    }

    #[test]
    fn cut_respects_utf8() {
        assert_eq!(cut_at_boundary("héllo", 2), "h");
        assert_eq!(cut_at_boundary("abc", 5), "abc");
    }
}

/// A repository the coordinator serves over git's smart HTTP protocol.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RepoRow {
    pub name: String,
    pub path: String,
    pub added_at: String,
}

/// A file in the coordinator's files store.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FileRow {
    pub bucket: String,
    pub key: String,
    pub sha256: String,
    pub size: i64,
    pub created_at: String,
}

impl Store {
    /// Registers (or re-points) a repository.
    pub fn add_repo(&mut self, name: &str, path: &str, now: i64) -> Result<()> {
        self.conn.execute(
            "INSERT INTO repos (name, path, added_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (name) DO UPDATE SET path = excluded.path, added_at = excluded.added_at",
            params![name, path, now],
        )?;
        Ok(())
    }

    /// Removes a repository; false when it was not registered.
    pub fn remove_repo(&mut self, name: &str) -> Result<bool> {
        Ok(self.conn.execute("DELETE FROM repos WHERE name = ?1", [name])? > 0)
    }

    pub fn repo_path(&self, name: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .prepare_cached("SELECT path FROM repos WHERE name = ?1")?
            .query_row([name], |r| r.get(0))
            .optional()?)
    }

    pub fn repos(&self) -> Result<Vec<RepoRow>> {
        let mut stmt = self.conn.prepare_cached("SELECT name, path, added_at FROM repos ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok(RepoRow { name: r.get(0)?, path: r.get(1)?, added_at: ms_to_rfc3339(r.get(2)?) })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Records a stored file (its bytes are already in place under its digest).
    pub fn put_file(&mut self, bucket: &str, key: &str, sha256: &str, size: i64, now: i64) -> Result<()> {
        self.conn.execute(
            "INSERT INTO files (bucket, key, sha256, size, created_at) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (bucket, key) DO UPDATE SET sha256 = excluded.sha256, size = excluded.size, \
             created_at = excluded.created_at",
            params![bucket, key, sha256, size, now],
        )?;
        Ok(())
    }

    /// `(sha256, size)` of a stored file.
    pub fn file(&self, bucket: &str, key: &str) -> Result<Option<(String, i64)>> {
        Ok(self
            .conn
            .prepare_cached("SELECT sha256, size FROM files WHERE bucket = ?1 AND key = ?2")?
            .query_row([bucket, key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?)
    }

    pub fn files(&self) -> Result<Vec<FileRow>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT bucket, key, sha256, size, created_at FROM files ORDER BY bucket, key")?;
        let rows = stmt.query_map([], |r| {
            Ok(FileRow {
                bucket: r.get(0)?,
                key: r.get(1)?,
                sha256: r.get(2)?,
                size: r.get(3)?,
                created_at: ms_to_rfc3339(r.get(4)?),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// The submitted payload of a job.
    pub fn payload(&self, id: i64) -> Result<Option<String>> {
        Ok(self
            .conn
            .prepare_cached("SELECT payload FROM jobs WHERE id = ?1")?
            .query_row([id], |r| r.get(0))
            .optional()?)
    }
}
