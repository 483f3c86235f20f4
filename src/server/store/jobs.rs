//! The job state machine: submit, dequeue (job tokens kept as SHA-256 only), heartbeats and
//! the executors they register, mark*, cancel, the stalled-job reset, artifacts and the job
//! queries of the admin API.

use serde::Serialize;

use super::db::{p, Dialect, Row, Tx};
use super::queues::{self, DequeueOrder};
use super::time::{self, from_ms};
use super::{sha256_hex, JobState, Result, Store};
use chrono::{DateTime, Utc};

/// The failure message of a job whose executor stopped heartbeating too often.
pub(crate) const TOO_MANY_RESETS: &str = "job processor died while handling this message too many times";

/// `(job id, queue)` pairs.
pub(crate) type JobRefs = Vec<(i64, String)>;

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
    #[serde(serialize_with = "time::serialize")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "time::serialize_opt")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "time::serialize_opt")]
    pub finished_at: Option<DateTime<Utc>>,
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
pub(super) const MAX_EXECUTORS: i64 = 1000;
/// How long an executor that stopped heartbeating keeps its row.
pub(super) const EXECUTOR_EXPIRY_MS: i64 = 24 * 3_600_000;
/// The longest executor name or telemetry field a heartbeat may store.
pub(super) const MAX_EXECUTOR_FIELD: usize = 256;

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
    #[serde(serialize_with = "time::serialize")]
    pub first_seen_at: DateTime<Utc>,
    #[serde(serialize_with = "time::serialize")]
    pub last_seen_at: DateTime<Utc>,
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

pub(super) fn job_row(row: &Row<'_>) -> Result<JobRow> {
    Ok(JobRow {
        id: row.get(0)?,
        queue: row.get(1)?,
        state: row.get(2)?,
        repository_name: row.get(3)?,
        failure_message: row.get(4)?,
        num_resets: row.get(5)?,
        num_failures: row.get(6)?,
        executor_name: row.get(7)?,
        created_at: from_ms(row.get(8)?),
        started_at: row.get::<Option<i64>>(9)?.map(from_ms),
        finished_at: row.get::<Option<i64>>(10)?.map(from_ms),
        cancel: row.get(11)?,
    })
}

/// The index of the queue to try first: at random, weighted by `weight(queue)`.
fn weighted_pick(candidates: &[String], weight: &impl Fn(&str) -> u32) -> usize {
    use rand::Rng;
    if candidates.len() <= 1 {
        return 0;
    }
    let total: u32 = candidates.iter().map(|q| weight(q).max(1)).sum();
    let mut pick = rand::thread_rng().gen_range(0..total);
    for (i, q) in candidates.iter().enumerate() {
        let w = weight(q).max(1);
        if pick < w {
            return i;
        }
        pick -= w;
    }
    0
}

/// The queues among `queues` that have a queued job.
fn nonempty_queues(t: &mut dyn Tx, queues: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for q in queues {
        if t.exists("SELECT 1 FROM jobs WHERE queue = ?1 AND state = 'queued' LIMIT 1", p![q])? {
            out.push(q.clone());
        }
    }
    Ok(out)
}

impl Store {
    /// Adds a queued job; `payload` is the validated job JSON without id and token. Its tenant
    /// (for the fair order) is its repository.
    pub fn submit(&mut self, queue: &str, payload: &str, repository_name: &str, now: i64) -> Result<i64> {
        self.submit_for(queue, payload, repository_name, repository_name, now)
    }

    /// [`Store::submit`] with the job's tenant key for the fair order.
    pub fn submit_for(
        &mut self,
        queue: &str,
        payload: &str,
        repository_name: &str,
        tenant: &str,
        now: i64,
    ) -> Result<i64> {
        self.tx(|t| {
            let id = t.one(
                "INSERT INTO jobs (queue, state, payload, repository_name, tenant, created_at) \
                 VALUES (?1, 'queued', ?2, ?3, ?4, ?5) RETURNING id",
                p![queue, payload, repository_name, tenant, now],
                |r| r.get(0),
            )?;
            t.notify_jobs()?;
            Ok(id)
        })
    }

    /// Hands the oldest queued job of one of `queues` to `executor` ([`DequeueOrder::Fifo`]).
    pub fn dequeue(
        &mut self,
        queues: &[String],
        executor: &str,
        now: i64,
        weight: impl Fn(&str) -> u32,
    ) -> Result<Option<Dequeued>> {
        self.dequeue_in(queues, executor, now, weight, &DequeueOrder::Fifo)
    }

    /// Hands a queued job of one of `queues` to `executor`: with several non-empty queues one
    /// is picked at random, weighted by `weight(queue)`; within it, the job `order` names (see
    /// `queues.rs`). On PostgreSQL the job's row is taken with `FOR UPDATE SKIP LOCKED`:
    /// replicas dequeueing at once each get another job.
    pub fn dequeue_in(
        &mut self,
        queues: &[String],
        executor: &str,
        now: i64,
        weight: impl Fn(&str) -> u32,
        order: &DequeueOrder,
    ) -> Result<Option<Dequeued>> {
        use rand::Rng;
        if self.dialect() == Dialect::Postgres {
            return self.dequeue_pg(queues, executor, now, weight, order);
        }
        let pick = "SELECT id, payload FROM jobs WHERE queue = ?1 AND state = 'queued' ORDER BY id LIMIT 1";
        self.tx(|t| {
            let mut candidates = nonempty_queues(t, queues)?;
            // The picked queue first, then the others: a queue whose queued jobs other replicas
            // hold locked right now (or whose tenants are all at their cap) must not hide the
            // jobs of the next.
            while !candidates.is_empty() {
                let queue = candidates.remove(weighted_pick(&candidates, &weight));
                let row: Option<(i64, String)> = match order {
                    DequeueOrder::Fifo => t.opt(pick, p![queue], |r| Ok((r.get(0)?, r.get(1)?)))?,
                    DequeueOrder::Fair(fair) => queues::pick_sqlite(t, &queue, fair)?.map(|(id, payload, tenant)| {
                        fair.advance(&queue, &tenant);
                        (id, payload)
                    }),
                };
                let Some((id, payload)) = row else { continue };
                let mut raw = [0u8; 20];
                rand::thread_rng().fill(&mut raw);
                let token = hex::encode(raw);
                let changed = t.exec(
                    "UPDATE jobs SET state = 'processing', executor_name = ?2, token_sha256 = ?3, started_at = ?4, \
                     last_heartbeat_at = ?4, failure_message = NULL, finished_at = NULL, log_bytes = 0 \
                     WHERE id = ?1 AND state = 'queued'",
                    p![id, executor, sha256_hex(&raw), now],
                )?;
                if changed != 1 {
                    return Ok(None);
                }
                t.exec("DELETE FROM log_entries WHERE job_id = ?1", p![id])?;
                t.exec("DELETE FROM log_chunks WHERE job_id = ?1", p![id])?;
                return Ok(Some(Dequeued { id, queue, payload, token }));
            }
            Ok(None)
        })
    }

    /// PostgreSQL's dequeue: one statement per queue tried (no transaction round trips): the
    /// oldest queued row not locked by another replica's dequeue (`FOR UPDATE SKIP LOCKED`),
    /// or in the fair order the first such row after the cursor in (tenant, id) order, becomes
    /// processing and loses its old log (with a tenant cap: in a transaction behind the queue's
    /// cap lock, `queues.rs`). With one queue there is nothing to choose, so
    /// no look first. A statement that fails with a lost connection may run again on another
    /// connection: at worst the first took a job whose answer never came back, which the
    /// stalled-job reset requeues (that job never ran, so it still runs once).
    fn dequeue_pg(
        &mut self,
        queues: &[String],
        executor: &str,
        now: i64,
        weight: impl Fn(&str) -> u32,
        order: &DequeueOrder,
    ) -> Result<Option<Dequeued>> {
        use rand::Rng;
        let mut candidates =
            if queues.len() == 1 { queues.to_vec() } else { self.read(|t| nonempty_queues(t, queues))? };
        while !candidates.is_empty() {
            let queue = candidates.remove(weighted_pick(&candidates, &weight));
            let mut raw = [0u8; 20];
            rand::thread_rng().fill(&mut raw);
            let hash = sha256_hex(&raw);
            let taken: Option<(i64, String)> = match order {
                DequeueOrder::Fair(fair) if fair.max_running > 0 => self.tx(|t| {
                    queues::lock_capped_queue(t, &queue)?;
                    queues::take_pg(t, &queue, executor, &hash, now, fair)
                })?,
                DequeueOrder::Fair(fair) => {
                    self.autocommit(|t| queues::take_pg(t, &queue, executor, &hash, now, fair))?
                }
                DequeueOrder::Fifo => self.autocommit(|t| {
                    t.opt(
                    "WITH picked AS (SELECT id FROM jobs WHERE queue = ?1 AND state = 'queued' ORDER BY id \
                     LIMIT 1 FOR UPDATE SKIP LOCKED), \
                     taken AS (UPDATE jobs SET state = 'processing', executor_name = ?2, token_sha256 = ?3, \
                     started_at = ?4, last_heartbeat_at = ?4, failure_message = NULL, finished_at = NULL, \
                     log_bytes = 0 FROM picked WHERE jobs.id = picked.id RETURNING jobs.id, jobs.payload), \
                     entries AS (DELETE FROM log_entries WHERE job_id IN (SELECT id FROM taken)), \
                     chunks AS (DELETE FROM log_chunks WHERE job_id IN (SELECT id FROM taken)) \
                     SELECT id, payload FROM taken",
                    p![queue, executor, hash, now],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                })?,
            };
            if let Some((id, payload)) = taken {
                return Ok(Some(Dequeued { id, queue, payload, token: hex::encode(raw) }));
            }
        }
        Ok(None)
    }

    /// The job (id, queue, repository) a token belongs to, by the SHA-256 of its decoded bytes.
    pub fn job_for_token(&mut self, token_sha256: &str) -> Result<Option<(i64, String, String)>> {
        self.read(|t| {
            t.opt(
                "SELECT id, queue, repository_name FROM jobs WHERE token_sha256 = ?1",
                p![token_sha256],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
        })
    }

    /// The queue of completed job `id` if `token_sha256` is the digest of the token it completed
    /// with: only a retried markComplete may use a finished job's token.
    pub fn completed_with_token(&mut self, id: i64, token_sha256: &str) -> Result<Option<String>> {
        self.read(|t| {
            t.opt(
                "SELECT queue FROM jobs WHERE id = ?1 AND state = 'completed' AND done_token_sha256 = ?2",
                p![id, token_sha256],
                |r| r.get(0),
            )
        })
    }

    /// Whether an executor of this name ever heartbeated.
    pub fn executor_known(&mut self, name: &str) -> Result<bool> {
        self.read(|t| t.exists("SELECT 1 FROM executors WHERE name = ?1", p![name]))
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
        let queue_names = serde_json::to_string(&info.queue_names)?;
        self.tx(|t| {
            let known_name = t.exists("SELECT 1 FROM executors WHERE name = ?1", p![info.hostname])?;
            if !known_name {
                // Expired executors make room only when a new name needs it: the sweep drops
                // them otherwise (one replica at a time on PostgreSQL).
                t.exec("DELETE FROM executors WHERE last_seen_at < ?1", p![now - EXECUTOR_EXPIRY_MS])?;
                let n: i64 = t.one("SELECT COUNT(*) FROM executors", p![], |r| r.get(0))?;
                if n >= MAX_EXECUTORS {
                    return Err(super::StoreError::OverCap(format!(
                        "the coordinator already keeps {MAX_EXECUTORS} executors seen in the last {} hours; \
                         a new executor name is refused until one expires",
                        EXECUTOR_EXPIRY_MS / 3_600_000
                    )));
                }
            }
            t.exec(
                "INSERT INTO executors (name, queue_name, queue_names, os, architecture, docker_version, \
                 executor_version, git_version, ignite_version, src_cli_version, first_seen_at, last_seen_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11) \
                 ON CONFLICT (name) DO UPDATE SET queue_name = ?2, queue_names = ?3, os = ?4, architecture = ?5, \
                 docker_version = ?6, executor_version = ?7, git_version = ?8, ignite_version = ?9, \
                 src_cli_version = ?10, last_seen_at = ?11",
                p![
                    info.hostname,
                    info.queue_name,
                    queue_names,
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
            // Rows are locked in id order, as the sweep locks them, so that a heartbeat and a
            // sweep on two PostgreSQL replicas never wait for each other in a circle.
            let mut order: Vec<usize> = (0..jobs.len()).collect();
            order.sort_by_key(|&i| jobs[i].0);
            let mut flags = vec![None; jobs.len()];
            for i in order {
                let (id, queue) = &jobs[i];
                flags[i] = t.opt(
                    "UPDATE jobs SET last_heartbeat_at = ?4 WHERE id = ?1 AND queue = ?2 AND executor_name = ?3 \
                     AND state = 'processing' RETURNING cancel",
                    p![id, queue, info.hostname, now],
                    |r| r.get::<bool>(0),
                )?;
            }
            let mut known = Vec::new();
            let mut cancel = Vec::new();
            for ((id, queue), flag) in jobs.iter().zip(flags) {
                if let Some(flag) = flag {
                    known.push((*id, queue.clone()));
                    if flag {
                        cancel.push((*id, queue.clone()));
                    }
                }
            }
            Ok((known, cancel))
        })
    }

    /// Whether `executor` is processing job `id`; on PostgreSQL the job's row stays locked until
    /// the transaction ends, so that the caller's changes and a concurrent mark or sweep on
    /// another replica take turns.
    pub(super) fn owned(t: &mut dyn Tx, id: i64, executor: &str) -> Result<bool> {
        let sql = format!(
            "SELECT 1 FROM jobs WHERE id = ?1 AND executor_name = ?2 AND state = 'processing'{}",
            t.for_update()
        );
        t.exists(&sql, p![id, executor])
    }

    /// Whether `executor` is processing job `id`.
    pub fn is_owned(&mut self, id: i64, executor: &str) -> Result<bool> {
        self.read(|t| {
            t.exists(
                "SELECT 1 FROM jobs WHERE id = ?1 AND executor_name = ?2 AND state = 'processing'",
                p![id, executor],
            )
        })
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
        if *outcome == Outcome::Complete {
            // Completed whatever the cancel flag and the counts: one statement. A retry of a
            // completion that committed (its answer lost with the connection) finds the job
            // completed by this executor, and succeeds again.
            return self.autocommit(|t| {
                let n = t.exec(
                    "UPDATE jobs SET state = 'completed', failure_message = NULL, finished_at = ?3, \
                     done_token_sha256 = token_sha256, token_sha256 = NULL \
                     WHERE id = ?1 AND executor_name = ?2 AND state = 'processing'",
                    p![id, executor, now],
                )?;
                Ok(n == 1
                    || t.exists(
                        "SELECT 1 FROM jobs WHERE id = ?1 AND executor_name = ?2 AND state = 'completed'",
                        p![id, executor],
                    )?)
            });
        }
        self.tx(|t| {
            let sql = format!(
                "SELECT cancel, num_failures FROM jobs WHERE id = ?1 AND executor_name = ?2 \
                 AND state = 'processing'{}",
                t.for_update()
            );
            let row: Option<(bool, i64)> = t.opt(&sql, p![id, executor], |r| Ok((r.get(0)?, r.get(1)?)))?;
            let Some((cancel, failures)) = row else { return Ok(false) };
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
            t.exec(
                "UPDATE jobs SET state = ?2, failure_message = ?3, num_failures = ?4, finished_at = ?5, \
                 token_sha256 = NULL, executor_name = CASE WHEN ?2 = 'queued' THEN NULL ELSE executor_name END \
                 WHERE id = ?1",
                p![id, state, message, failures, finished],
            )?;
            if state == JobState::Queued {
                t.notify_jobs()?;
            }
            Ok(true)
        })
    }

    /// The state of job `id`, its row locked on PostgreSQL until the transaction ends.
    fn locked_state(t: &mut dyn Tx, id: i64) -> Result<Option<JobState>> {
        let sql = format!("SELECT state FROM jobs WHERE id = ?1{}", t.for_update());
        t.opt(&sql, p![id], |r| r.get(0))
    }

    /// Cancels a job: queued ones at once, processing ones through the heartbeat.
    pub fn cancel(&mut self, id: i64, now: i64) -> Result<CancelResult> {
        self.tx(|t| {
            match Self::locked_state(t, id)? {
                None => return Ok(CancelResult::NotFound),
                Some(JobState::Queued) => {
                    t.exec(
                        "UPDATE jobs SET state = 'canceled', cancel = 1, finished_at = ?2 WHERE id = ?1",
                        p![id, now],
                    )?;
                }
                Some(JobState::Processing) => {
                    t.exec("UPDATE jobs SET cancel = 1 WHERE id = ?1", p![id])?;
                }
                Some(other) => return Ok(CancelResult::AlreadyFinal(other)),
            }
            let summary = t.one(&format!("SELECT {ROW_COLS} FROM jobs WHERE id = ?1"), p![id], job_row)?;
            Ok(CancelResult::Done(summary))
        })
    }

    /// Puts a finished job (completed, failed, canceled) back in its queue as if just submitted:
    /// the next dequeue runs it again from the start (its old log goes at that dequeue).
    pub fn requeue(&mut self, id: i64) -> Result<RequeueResult> {
        self.tx(|t| {
            match Self::locked_state(t, id)? {
                None => return Ok(RequeueResult::NotFound),
                Some(s) if !s.is_final() => return Ok(RequeueResult::NotFinal(s)),
                Some(_) => {}
            }
            t.exec(
                "UPDATE jobs SET state = 'queued', cancel = 0, failure_message = NULL, executor_name = NULL, \
                 token_sha256 = NULL, started_at = NULL, finished_at = NULL, last_heartbeat_at = NULL, \
                 num_resets = 0, num_failures = 0 WHERE id = ?1",
                p![id],
            )?;
            let row = t.one(&format!("SELECT {ROW_COLS} FROM jobs WHERE id = ?1"), p![id], job_row)?;
            t.notify_jobs()?;
            Ok(RequeueResult::Done(row))
        })
    }

    /// Requeues (or fails, past `max_resets`) every processing job whose last heartbeat is
    /// older than `cutoff`. A cancelled job ends `canceled` instead. Also drops the executors
    /// silent for [`EXECUTOR_EXPIRY_MS`]. On PostgreSQL one replica at a time sweeps (a
    /// transaction-scoped advisory lock; the others find it taken and do nothing).
    pub fn reset_stalled(
        &mut self,
        cutoff: i64,
        max_resets: i64,
        age_text: &str,
        now: i64,
    ) -> Result<Vec<Reset>> {
        self.tx(|t| {
            if t.dialect() == Dialect::Postgres {
                let ours: bool = t.one(
                    &format!("SELECT pg_try_advisory_xact_lock({})", super::pg::SWEEP_LOCK),
                    p![],
                    |r| r.get(0),
                )?;
                if !ours {
                    return Ok(Vec::new());
                }
            }
            t.exec("DELETE FROM executors WHERE last_seen_at < ?1", p![now - EXECUTOR_EXPIRY_MS])?;
            let sql = format!(
                "SELECT id, queue, num_resets, cancel FROM jobs WHERE state = 'processing' \
                 AND last_heartbeat_at < ?1 ORDER BY id{}",
                t.for_update()
            );
            let stalled: Vec<(i64, String, i64, bool)> =
                t.all(&sql, p![cutoff], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
            let mut out = Vec::new();
            for (id, queue, resets, cancel) in stalled {
                let (state, message): (JobState, Option<String>) = if cancel {
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
                t.exec(
                    "UPDATE jobs SET state = ?2, failure_message = ?3, finished_at = ?4, token_sha256 = NULL, \
                     num_resets = num_resets + CASE WHEN ?2 = 'queued' THEN 1 ELSE 0 END, \
                     executor_name = CASE WHEN ?2 = 'queued' THEN NULL ELSE executor_name END \
                     WHERE id = ?1",
                    p![id, state, message, finished],
                )?;
                out.push(Reset { id, queue, new_state: state });
            }
            if out.iter().any(|r| r.new_state == JobState::Queued) {
                t.notify_jobs()?;
            }
            Ok(out)
        })
    }

    /// One job with its payload and artifact info.
    pub fn job(&mut self, id: i64) -> Result<Option<JobDetail>> {
        let sql =
            format!("SELECT {ROW_COLS}, payload, artifact_bytes, artifact_sha256 FROM jobs WHERE id = ?1");
        self.read(|t| {
            t.opt(&sql, p![id], |r| {
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
            })
        })
    }

    /// The state of a job, if it exists.
    pub fn state(&mut self, id: i64) -> Result<Option<JobState>> {
        self.read(|t| t.opt("SELECT state FROM jobs WHERE id = ?1", p![id], |r| r.get(0)))
    }

    /// Jobs, newest first, filtered by queue and state.
    pub fn list(&mut self, queue: Option<&str>, state: Option<JobState>, limit: i64) -> Result<Vec<JobRow>> {
        // The casts give PostgreSQL the parameters' type: `$1 IS NULL` alone has none, and it
        // refuses the statement ("could not determine data type of parameter $1").
        let sql = format!(
            "SELECT {ROW_COLS} FROM jobs WHERE (CAST(?1 AS TEXT) IS NULL OR queue = ?1) \
             AND (CAST(?2 AS TEXT) IS NULL OR state = ?2) ORDER BY id DESC LIMIT ?3"
        );
        self.read(|t| t.all(&sql, p![queue, state, limit], job_row))
    }

    /// Every executor row; `active` = seen within `active_ms` of `now`.
    pub fn executors(&mut self, now: i64, active_ms: i64) -> Result<Vec<ExecutorRow>> {
        let rowid = match self.dialect() {
            Dialect::Sqlite => "rowid",
            Dialect::Postgres => "id",
        };
        let sql = format!(
            "SELECT {rowid}, name, queue_name, queue_names, os, architecture, docker_version, executor_version, \
             git_version, ignite_version, src_cli_version, first_seen_at, last_seen_at FROM executors \
             ORDER BY last_seen_at DESC"
        );
        self.read(|t| {
            t.all(&sql, p![], |r| {
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
                    first_seen_at: from_ms(r.get(11)?),
                    last_seen_at: from_ms(last),
                    active: now - last <= active_ms,
                })
            })
        })
    }

    /// Records a job's artifacts (already renamed into place by the caller).
    /// `false` when the job is not `executor`'s processing job.
    pub fn set_artifacts(&mut self, id: i64, executor: &str, bytes: i64, sha256: &str) -> Result<bool> {
        self.tx(|t| {
            let n = t.exec(
                "UPDATE jobs SET artifact_bytes = ?3, artifact_sha256 = ?4 WHERE id = ?1 AND executor_name = ?2 \
                 AND state = 'processing'",
                p![id, executor, bytes, sha256],
            )?;
            Ok(n == 1)
        })
    }

    /// (queue, state, count) for every pair with jobs.
    pub fn counts(&mut self) -> Result<Vec<(String, JobState, i64)>> {
        self.read(|t| {
            t.all("SELECT queue, state, COUNT(*) FROM jobs GROUP BY queue, state", p![], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
        })
    }

    /// Executors seen since `since`.
    pub fn active_executors(&mut self, since: i64) -> Result<i64> {
        self.read(|t| {
            t.one("SELECT COUNT(*) FROM executors WHERE last_seen_at >= ?1", p![since], |r| r.get(0))
        })
    }

    /// The submitted payload of a job.
    pub fn payload(&mut self, id: i64) -> Result<Option<String>> {
        self.read(|t| t.opt("SELECT payload FROM jobs WHERE id = ?1", p![id], |r| r.get(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::store::both_backends;

    fn info(name: &str) -> ExecutorInfo {
        ExecutorInfo { hostname: name.into(), queue_names: vec!["batches".into()], ..Default::default() }
    }

    fn q(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    both_backends!(dequeue_hands_each_job_once_and_tokens_are_hashed, |s| {
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
        // A retried completion succeeds again; another executor's does not, nor a failure.
        assert!(s.mark(a, "e1", &Outcome::Complete, 0, 3).unwrap());
        assert_eq!(s.state(a).unwrap(), Some(JobState::Completed));
        assert!(!s.mark(a, "e2", &Outcome::Complete, 0, 3).unwrap());
        assert!(!s.mark(a, "e1", &Outcome::Failed("late".into()), 0, 3).unwrap());
        let digest = sha256_hex(&hex::decode(&d.token).unwrap());
        assert_eq!(s.completed_with_token(a, &digest).unwrap().as_deref(), Some("batches"));
        assert_eq!(s.completed_with_token(b, &digest).unwrap(), None);
    });

    // PostgreSQL refused the list with one filter unset ("could not determine data type").
    both_backends!(lists_filter_by_queue_and_state_each_alone_or_together, |s| {
        let a = s.submit("batches", "{}", "r", 1).unwrap();
        let b = s.submit("codeintel", "{}", "r", 1).unwrap();
        let c = s.submit("batches", "{}", "r", 1).unwrap();
        s.cancel(c, 2).unwrap();
        let ids = |rows: Vec<JobRow>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(s.list(None, None, 10).unwrap()), vec![c, b, a]);
        assert_eq!(ids(s.list(None, None, 2).unwrap()), vec![c, b]);
        assert_eq!(ids(s.list(Some("batches"), None, 10).unwrap()), vec![c, a]);
        assert_eq!(ids(s.list(None, Some(JobState::Canceled), 10).unwrap()), vec![c]);
        assert_eq!(ids(s.list(Some("batches"), Some(JobState::Queued), 10).unwrap()), vec![a]);
        assert_eq!(ids(s.list(Some("codeintel"), Some(JobState::Completed), 10).unwrap()), Vec::<i64>::new());
    });

    both_backends!(errored_ends_failed_and_cancel_ends_canceled, |s| {
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
    });

    both_backends!(rows_carry_typed_times_sent_with_milliseconds, |s| {
        // 2026-01-02T03:04:05Z, then 7 ms and 2 s later.
        let t0 = 1_767_323_045_000;
        let a = s.submit("batches", "{}", "r", t0).unwrap();
        s.dequeue(&q(&["batches"]), "e", t0 + 7, |_| 1).unwrap().unwrap();
        assert!(s.mark(a, "e", &Outcome::Complete, 0, t0 + 2000).unwrap());
        let j = s.job(a).unwrap().unwrap().row;
        let at = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).unwrap();
        assert_eq!(
            (j.created_at, j.started_at, j.finished_at),
            (at(t0), Some(at(t0 + 7)), Some(at(t0 + 2000)))
        );
        let v = serde_json::to_value(&j).unwrap();
        assert_eq!(
            (&v["createdAt"], &v["startedAt"], &v["finishedAt"]),
            (
                &serde_json::json!("2026-01-02T03:04:05.000Z"),
                &serde_json::json!("2026-01-02T03:04:05.007Z"),
                &serde_json::json!("2026-01-02T03:04:07.000Z")
            )
        );
        let queued = s.submit("batches", "{}", "r", t0).unwrap();
        let v = serde_json::to_value(&s.job(queued).unwrap().unwrap().row).unwrap();
        assert_eq!((v["startedAt"].is_null(), v["finishedAt"].is_null()), (true, true));
        s.heartbeat(&info("e"), &[], t0 + 5).unwrap();
        let e = &s.executors(t0 + 5, 1000).unwrap()[0];
        assert_eq!((e.first_seen_at, e.last_seen_at), (at(t0 + 5), at(t0 + 5)));
        s.add_repo("r", "/srv/r", t0).unwrap();
        assert_eq!(s.repos().unwrap()[0].added_at, at(t0));
        s.put_file("b", "k", "ff", 3, t0 + 1).unwrap();
        assert_eq!(
            serde_json::to_value(&s.files().unwrap()[0]).unwrap()["createdAt"],
            "2026-01-02T03:04:05.001Z"
        );
    });

    both_backends!(stalled_jobs_are_reset_then_failed, |s| {
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
    });
}
