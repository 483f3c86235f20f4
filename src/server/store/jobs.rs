//! The job state machine: submit, dequeue (job tokens kept as SHA-256 only), heartbeats and
//! the executors they register, mark*, cancel, the stalled-job reset, artifacts and the job
//! queries of the admin API.

use rusqlite::{params, OptionalExtension, Transaction};
use serde::Serialize;

use super::{ms_to_rfc3339, sha256_hex, JobState, Result, Store};

/// The failure message of a job whose executor stopped heartbeating too often.
pub const TOO_MANY_RESETS: &str = "job processor died while handling this message too many times";

/// `(job id, queue)` pairs.
pub type JobRefs = Vec<(i64, String)>;

/// One job as the admin API lists it (without payload and logs).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobRow {
    pub id: i64,
    pub queue: String,
    pub state: JobState,
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
    pub row: JobRow,
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

/// The most executors the coordinator keeps a row for.
pub const MAX_EXECUTORS: i64 = 1000;
/// How long an executor that stopped heartbeating keeps its row.
pub const EXECUTOR_EXPIRY_MS: i64 = 24 * 3_600_000;
/// The longest executor name or telemetry field a heartbeat may store.
pub const MAX_EXECUTOR_FIELD: usize = 256;

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
    AlreadyFinal(JobState),
    /// Queued: now canceled. Processing: flagged, the executor learns it from its heartbeat.
    Done(JobRow),
}

/// What requeueing a job did.
#[derive(Debug, Clone, PartialEq)]
pub enum RequeueResult {
    NotFound,
    /// The job has not finished: it is in this state.
    NotFinal(JobState),
    /// The finished job is queued again.
    Done(JobRow),
}

/// What a stalled-job sweep did to one job.
#[derive(Debug, Clone, PartialEq)]
pub struct Reset {
    pub id: i64,
    pub queue: String,
    pub new_state: JobState,
}

pub(super) const ROW_COLS: &str =
    "id, queue, state, repository_name, failure_message, num_resets, num_failures, \
     executor_name, created_at, started_at, finished_at, cancel";

pub(super) fn job_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    Ok(JobRow {
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

impl Store {
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
    /// and returns (known, cancel) as `(id, queue)` pairs. What a heartbeat stores is bounded:
    /// each field at most [`MAX_EXECUTOR_FIELD`] bytes, at most [`MAX_EXECUTORS`] names, the
    /// executors silent for [`EXECUTOR_EXPIRY_MS`] dropped first (`OverCap` otherwise).
    pub fn heartbeat(
        &mut self,
        info: &ExecutorInfo,
        jobs: &[(i64, String)],
        now: i64,
    ) -> Result<(JobRefs, JobRefs)> {
        let fields = [
            ("executorName", &info.hostname),
            ("os", &info.os),
            ("architecture", &info.architecture),
            ("dockerVersion", &info.docker_version),
            ("executorVersion", &info.executor_version),
            ("gitVersion", &info.git_version),
            ("igniteVersion", &info.ignite_version),
            ("srcCliVersion", &info.src_cli_version),
        ];
        for (name, value) in fields {
            if value.len() > MAX_EXECUTOR_FIELD {
                return Err(super::StoreError::OverCap(format!(
                    "the heartbeat's {name} is longer than {MAX_EXECUTOR_FIELD} bytes"
                )));
            }
        }
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM executors WHERE last_seen_at < ?1", [now - EXECUTOR_EXPIRY_MS])?;
        let known_name =
            tx.prepare_cached("SELECT 1 FROM executors WHERE name = ?1")?.exists([&info.hostname])?;
        if !known_name {
            let n: i64 = tx.query_row("SELECT COUNT(*) FROM executors", [], |r| r.get(0))?;
            if n >= MAX_EXECUTORS {
                return Err(super::StoreError::OverCap(format!(
                    "the coordinator already keeps {MAX_EXECUTORS} executors seen in the last {} hours; \
                     a new executor name is refused until one expires",
                    EXECUTOR_EXPIRY_MS / 3_600_000
                )));
            }
        }
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

    pub(super) fn owned(tx: &Transaction<'_>, id: i64, executor: &str) -> Result<bool> {
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
            Outcome::Complete => (JobState::Completed, None, failures),
            Outcome::Errored(m) if cancel => (JobState::Canceled, Some(m.as_str()), failures),
            Outcome::Errored(m) if failures + 1 >= max_retries => {
                (JobState::Failed, Some(m.as_str()), failures + 1)
            }
            Outcome::Errored(m) => (JobState::Queued, Some(m.as_str()), failures + 1),
            Outcome::Failed(m) if cancel => (JobState::Canceled, Some(m.as_str()), failures),
            Outcome::Failed(m) => (JobState::Failed, Some(m.as_str()), failures),
        };
        let finished = if state == JobState::Queued { None } else { Some(now) };
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
        let state: Option<JobState> =
            tx.query_row("SELECT state FROM jobs WHERE id = ?1", [id], |r| r.get(0)).optional()?;
        match state {
            None => return Ok(CancelResult::NotFound),
            Some(JobState::Queued) => {
                tx.execute(
                    "UPDATE jobs SET state = 'canceled', cancel = 1, finished_at = ?2 WHERE id = ?1",
                    params![id, now],
                )?;
            }
            Some(JobState::Processing) => {
                tx.execute("UPDATE jobs SET cancel = 1 WHERE id = ?1", [id])?;
            }
            Some(other) => return Ok(CancelResult::AlreadyFinal(other)),
        }
        let summary = tx.query_row(&format!("SELECT {ROW_COLS} FROM jobs WHERE id = ?1"), [id], job_row)?;
        tx.commit()?;
        Ok(CancelResult::Done(summary))
    }

    /// Puts a finished job (completed, failed, canceled) back in its queue as if just submitted:
    /// the next dequeue runs it again from the start (its old log goes at that dequeue).
    pub fn requeue(&mut self, id: i64) -> Result<RequeueResult> {
        let tx = self.conn.transaction()?;
        let state: Option<JobState> =
            tx.query_row("SELECT state FROM jobs WHERE id = ?1", [id], |r| r.get(0)).optional()?;
        match state {
            None => return Ok(RequeueResult::NotFound),
            Some(s) if !s.is_final() => return Ok(RequeueResult::NotFinal(s)),
            Some(_) => {}
        }
        tx.execute(
            "UPDATE jobs SET state = 'queued', cancel = 0, failure_message = NULL, executor_name = NULL, \
             token_sha256 = NULL, started_at = NULL, finished_at = NULL, last_heartbeat_at = NULL, \
             num_resets = 0, num_failures = 0 WHERE id = ?1",
            [id],
        )?;
        let row = tx.query_row(&format!("SELECT {ROW_COLS} FROM jobs WHERE id = ?1"), [id], job_row)?;
        tx.commit()?;
        Ok(RequeueResult::Done(row))
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
            let (state, message): (JobState, Option<String>) = if cancel != 0 {
                (
                    JobState::Canceled,
                    Some(format!("canceled; the executor stopped heartbeating for {age_text}")),
                )
            } else if resets < max_resets {
                (JobState::Queued, None)
            } else {
                (
                    JobState::Failed,
                    Some(format!(
                        "{TOO_MANY_RESETS}: no heartbeat for {age_text}, already reset {resets} times (limit {max_resets})"
                    )),
                )
            };
            let finished = if state == JobState::Queued { None } else { Some(now) };
            tx.execute(
                "UPDATE jobs SET state = ?2, failure_message = ?3, finished_at = ?4, token_sha256 = NULL, \
                 num_resets = num_resets + CASE WHEN ?2 = 'queued' THEN 1 ELSE 0 END, \
                 executor_name = CASE WHEN ?2 = 'queued' THEN NULL ELSE executor_name END \
                 WHERE id = ?1",
                params![id, state, message, finished],
            )?;
            out.push(Reset { id, queue, new_state: state });
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
                    "SELECT {ROW_COLS}, payload, artifact_bytes, artifact_sha256 FROM jobs WHERE id = ?1"
                ),
                [id],
                |r| {
                    let row = job_row(r)?;
                    let bytes: Option<i64> = r.get(13)?;
                    let sha: Option<String> = r.get(14)?;
                    Ok(JobDetail {
                        row,
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
    pub fn state(&self, id: i64) -> Result<Option<JobState>> {
        Ok(self
            .conn
            .prepare_cached("SELECT state FROM jobs WHERE id = ?1")?
            .query_row([id], |r| r.get(0))
            .optional()?)
    }

    /// Jobs, newest first, filtered by queue and state.
    pub fn list(&self, queue: Option<&str>, state: Option<JobState>, limit: i64) -> Result<Vec<JobRow>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {ROW_COLS} FROM jobs WHERE (?1 IS NULL OR queue = ?1) AND (?2 IS NULL OR state = ?2) \
             ORDER BY id DESC LIMIT ?3"
        ))?;
        let rows = stmt.query_map(params![queue, state, limit], job_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
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
    pub fn counts(&self) -> Result<Vec<(String, JobState, i64)>> {
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

    /// The submitted payload of a job.
    pub fn payload(&self, id: i64) -> Result<Option<String>> {
        Ok(self
            .conn
            .prepare_cached("SELECT payload FROM jobs WHERE id = ?1")?
            .query_row([id], |r| r.get(0))
            .optional()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str) -> ExecutorInfo {
        ExecutorInfo { hostname: name.into(), queue_names: vec!["batches".into()], ..Default::default() }
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
        let j = s.job(a).unwrap().unwrap().row;
        assert_eq!((j.state, j.num_failures), (JobState::Failed, 1));
        assert_eq!(j.failure_message.as_deref(), Some("boom"));

        let b = s.submit("batches", "{}", "r", 1).unwrap();
        s.dequeue(&q(&["batches"]), "e", 2, |_| 1).unwrap().unwrap();
        assert!(matches!(s.cancel(b, 3).unwrap(), CancelResult::Done(_)));
        let (known, cancel) = s.heartbeat(&info("e"), &[(b, "batches".into())], 4).unwrap();
        assert_eq!(known, vec![(b, "batches".to_string())]);
        assert_eq!(cancel, known);
        assert!(s.mark(b, "e", &Outcome::Failed("canceled".into()), 0, 5).unwrap());
        assert_eq!(s.state(b).unwrap(), Some(JobState::Canceled));
        assert_eq!(s.cancel(b, 6).unwrap(), CancelResult::AlreadyFinal(JobState::Canceled));

        let c = s.submit("batches", "{}", "r", 1).unwrap();
        assert!(matches!(s.cancel(c, 3).unwrap(), CancelResult::Done(j) if j.state == JobState::Canceled));
        assert!(s.dequeue(&q(&["batches"]), "e", 2, |_| 1).unwrap().is_none());
    }

    #[test]
    fn stalled_jobs_are_reset_then_failed() {
        let mut s = Store::open_in_memory().unwrap();
        let a = s.submit("batches", "{}", "r", 0).unwrap();
        for round in 0..3 {
            s.dequeue(&q(&["batches"]), "e", 10, |_| 1).unwrap().unwrap();
            let r = s.reset_stalled(100, 2, "25s", 100).unwrap();
            let want = if round < 2 { JobState::Queued } else { JobState::Failed };
            assert_eq!(r, vec![Reset { id: a, queue: "batches".into(), new_state: want }]);
        }
        let j = s.job(a).unwrap().unwrap().row;
        assert_eq!(j.num_resets, 2);
        assert!(j.failure_message.unwrap().starts_with(TOO_MANY_RESETS));
    }
}
