//! The order a queue's jobs go out in and the figures autoscalers read. The fair order hands
//! jobs out round-robin across tenants (a job's `tenant` field, else its repository: the
//! `tenant` column of migration 7), with an optional cap on each tenant's running jobs, in the
//! SQL of both backends; the gauges are each queue's depth, the age of its oldest queued job,
//! its running jobs and the executors that take jobs from it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::db::{p, Tx};
use super::{Result, Store};

/// In which order a queue's jobs go out.
#[derive(Clone, Default)]
pub enum DequeueOrder {
    /// Oldest first, whoever submitted it.
    #[default]
    Fifo,
    /// Round-robin across the queue's tenants, each tenant's oldest job first.
    Fair(Arc<Fairness>),
}

/// The fair order's cap and, per queue, the tenant served last: the next dequeue takes the
/// oldest job of the next tenant (in name order, wrapping around) that has one queued. The
/// cursor is this replica's own, in memory: a shared row would be written by every dequeue, and
/// on PostgreSQL concurrent dequeues would wait for each other's commit on its lock. So on
/// PostgreSQL dequeues running at the same instant may serve one tenant twice in a round (each
/// still gets another job), and a restart starts the round over. The cap is exact on both
/// (see [`lock_capped_queue`]).
pub struct Fairness {
    /// At most this many running jobs per tenant in a queue; 0: no cap.
    pub max_running: i64,
    cursors: Mutex<HashMap<String, String>>,
}

impl Fairness {
    pub fn new(max_running: i64) -> Fairness {
        Fairness { max_running: max_running.max(0), cursors: Mutex::new(HashMap::new()) }
    }

    fn cursor(&self, queue: &str) -> String {
        let c = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
        c.get(queue).cloned().unwrap_or_default()
    }

    pub(super) fn advance(&self, queue: &str, tenant: &str) {
        let mut c = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
        match c.get_mut(queue) {
            Some(t) => tenant.clone_into(t),
            None => {
                c.insert(queue.to_string(), tenant.to_string());
            }
        }
    }
}

/// A tenant at its cap is passed over: `?3` on SQLite, `?6` in PostgreSQL's statement.
fn cap_clause(param: u8) -> String {
    format!(
        " AND tenant NOT IN (SELECT tenant FROM jobs WHERE queue = ?1 AND state = 'processing' \
         GROUP BY tenant HAVING COUNT(*) >= ?{param})"
    )
}

/// SQLite's fair pick, inside the dequeue's transaction (the one writer makes it exact): the
/// oldest queued job of the first tenant after the cursor, else of the first tenant at all.
/// Both are seeks on `jobs_queued_tenant`. `(id, payload, tenant)`.
pub(super) fn pick_sqlite(
    t: &mut dyn Tx,
    queue: &str,
    fair: &Fairness,
) -> Result<Option<(i64, String, String)>> {
    let cursor = fair.cursor(queue);
    for op in [">", "<="] {
        let base = format!(
            "SELECT id, payload, tenant FROM jobs WHERE queue = ?1 AND state = 'queued' AND tenant {op} ?2"
        );
        let row = if fair.max_running > 0 {
            let sql = format!("{base}{} ORDER BY tenant, id LIMIT 1", cap_clause(3));
            t.opt(&sql, p![queue, cursor, fair.max_running], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        } else {
            let sql = format!("{base} ORDER BY tenant, id LIMIT 1");
            t.opt(&sql, p![queue, cursor], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        };
        if row.is_some() {
            return Ok(row);
        }
    }
    Ok(None)
}

/// PostgreSQL's fair dequeue as one statement (parameters: queue, executor, token digest, now,
/// cursor and, with a cap, the cap): the first unlocked queued job after the cursor in
/// (tenant, id) order, else from the start (`FOR UPDATE SKIP LOCKED` in both, so concurrent
/// replicas each take another job), becomes processing and loses its old log.
pub(super) fn dequeue_pg_sql(capped: bool) -> String {
    let cap = if capped { cap_clause(6) } else { String::new() };
    format!(
        "WITH after AS (SELECT id FROM jobs WHERE queue = ?1 AND state = 'queued' AND tenant > ?5{cap} \
         ORDER BY tenant, id LIMIT 1 FOR UPDATE SKIP LOCKED), \
         wrapped AS (SELECT id FROM jobs WHERE queue = ?1 AND state = 'queued' AND tenant <= ?5{cap} \
         AND NOT EXISTS (SELECT 1 FROM after) ORDER BY tenant, id LIMIT 1 FOR UPDATE SKIP LOCKED), \
         picked AS (SELECT id FROM after UNION ALL SELECT id FROM wrapped), \
         taken AS (UPDATE jobs SET state = 'processing', executor_name = ?2, token_sha256 = ?3, \
         started_at = ?4, last_heartbeat_at = ?4, failure_message = NULL, finished_at = NULL, \
         log_bytes = 0 FROM picked WHERE jobs.id = picked.id RETURNING jobs.id, jobs.payload, jobs.tenant), \
         entries AS (DELETE FROM log_entries WHERE job_id IN (SELECT id FROM taken)), \
         chunks AS (DELETE FROM log_chunks WHERE job_id IN (SELECT id FROM taken)) \
         SELECT id, payload, tenant FROM taken"
    )
}

/// The first key of the capped dequeue's lock (PostgreSQL's two-key advisory locks, a space
/// apart from the one-key locks of `pg.rs`); the second is the queue name's hash.
const CAP_LOCK: i32 = 0x6578_6361;

/// PostgreSQL with a per-tenant cap: takes the queue's capped-dequeue lock for the rest of the
/// transaction. The dequeue statement after it starts with a snapshot that holds every capped
/// dequeue of the queue committed before, so that two replicas never both see a tenant's last
/// free slot (concurrent dequeues of a capped queue take turns; uncapped ones never wait).
pub(super) fn lock_capped_queue(t: &mut dyn Tx, queue: &str) -> Result<()> {
    t.exec(&format!("SELECT pg_advisory_xact_lock({CAP_LOCK}, hashtext(?1))"), p![queue])?;
    Ok(())
}

/// Runs [`dequeue_pg_sql`] for `queue`; `(id, payload)` of the job taken, the cursor advanced.
pub(super) fn take_pg(
    t: &mut dyn Tx,
    queue: &str,
    executor: &str,
    hash: &str,
    now: i64,
    fair: &Fairness,
) -> Result<Option<(i64, String)>> {
    let cursor = fair.cursor(queue);
    let row = |r: &super::db::Row<'_>| Ok((r.get(0)?, r.get(1)?, r.get(2)?));
    let taken: Option<(i64, String, String)> = if fair.max_running > 0 {
        t.opt(&dequeue_pg_sql(true), p![queue, executor, hash, now, cursor, fair.max_running], row)?
    } else {
        t.opt(&dequeue_pg_sql(false), p![queue, executor, hash, now, cursor], row)?
    };
    Ok(taken.map(|(id, payload, tenant)| {
        fair.advance(queue, &tenant);
        (id, payload)
    }))
}

/// What an autoscaler reads about one queue (`/metrics` and `/api/queues`).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct QueueGauge {
    pub name: String,
    /// Jobs waiting for an executor.
    pub queued: i64,
    /// Seconds since the oldest queued job was submitted; 0 with none queued.
    pub oldest_queued_seconds: f64,
    /// Jobs an executor is running.
    pub running: i64,
    /// Executors that heartbeated within the active window and take jobs from this queue.
    pub executors: i64,
}

impl Store {
    /// The gauges of each of `queues` at `now`; executors count when seen since `active_since`.
    /// Each figure is an index range (`jobs_queued_tenant`, `jobs_processing_tenant`) or seek.
    pub fn queue_gauges(
        &mut self,
        queues: &[String],
        now: i64,
        active_since: i64,
    ) -> Result<Vec<QueueGauge>> {
        self.read(|t| {
            let lists: Vec<String> =
                t.all("SELECT queue_names FROM executors WHERE last_seen_at >= ?1", p![active_since], |r| {
                    r.get(0)
                })?;
            let mut executors: HashMap<String, i64> = HashMap::new();
            for list in lists {
                let names: Vec<String> = serde_json::from_str(&list).unwrap_or_default();
                for n in names {
                    *executors.entry(n).or_default() += 1;
                }
            }
            let mut out = Vec::with_capacity(queues.len());
            for q in queues {
                let queued: i64 =
                    t.one("SELECT COUNT(*) FROM jobs WHERE queue = ?1 AND state = 'queued'", p![q], |r| {
                        r.get(0)
                    })?;
                // Ids grow with submit times, and a requeued job keeps both: the smallest queued
                // id is the oldest queued job.
                let oldest: Option<i64> = t.opt(
                    "SELECT created_at FROM jobs WHERE queue = ?1 AND state = 'queued' ORDER BY id LIMIT 1",
                    p![q],
                    |r| r.get(0),
                )?;
                let running: i64 = t.one(
                    "SELECT COUNT(*) FROM jobs WHERE queue = ?1 AND state = 'processing'",
                    p![q],
                    |r| r.get(0),
                )?;
                out.push(QueueGauge {
                    name: q.clone(),
                    queued,
                    oldest_queued_seconds: oldest.map_or(0.0, |at| (now - at).max(0) as f64 / 1000.0),
                    running,
                    executors: executors.get(q).copied().unwrap_or(0),
                });
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::store::jobs::{ExecutorInfo, Outcome};
    use crate::server::store::{both_backends, JobState};

    fn fair(cap: i64) -> DequeueOrder {
        DequeueOrder::Fair(Arc::new(Fairness::new(cap)))
    }

    fn take(s: &mut Store, order: &DequeueOrder) -> Option<i64> {
        s.dequeue_in(&["batches".to_string()], "e", 5, |_| 1, order).unwrap().map(|d| d.id)
    }

    // Tenant A holds 1,000 queued jobs; B's one job, submitted last, goes out within the next
    // round (two dequeues), where oldest-first would hand out A's 1,000 first.
    both_backends!(a_tenants_thousand_jobs_do_not_hold_back_anothers_one, |s| {
        let a: Vec<i64> =
            (0..1000).map(|_| s.submit_for("batches", "{}", "r", "team-a", 1).unwrap()).collect();
        let b = s.submit_for("batches", "{}", "r", "team-b", 2).unwrap();
        let order = fair(0);
        let first_round = [take(s, &order), take(s, &order)];
        assert!(first_round.contains(&Some(b)), "{first_round:?}");
        assert!(first_round.contains(&Some(a[0])), "A's oldest job goes out in the same round");
        let mut rest: Vec<i64> = std::iter::from_fn(|| take(s, &order)).collect();
        rest.sort();
        assert_eq!(rest, a[1..], "every other job once");
        // The same queue oldest-first: B's job waits behind all of A's.
        let fifo: Vec<i64> =
            (0..3).map(|_| s.submit_for("batches", "{}", "r", "team-a", 3).unwrap()).collect();
        let late = s.submit_for("batches", "{}", "r", "team-b", 4).unwrap();
        let got: Vec<i64> = (0..4).filter_map(|_| take(s, &DequeueOrder::Fifo)).collect();
        assert_eq!(got, [fifo[0], fifo[1], fifo[2], late]);
    });

    // Three tenants take turns, each its oldest job first; the default tenant is the repository.
    both_backends!(tenants_take_turns_in_rounds, |s| {
        let mut ids = std::collections::HashMap::new();
        for (t, n) in [("x", 3), ("y", 1), ("z", 2)] {
            let v: Vec<i64> = (0..n).map(|_| s.submit("batches", "{}", t, 1).unwrap()).collect();
            ids.insert(t, v);
        }
        let order = fair(0);
        let got: Vec<i64> = std::iter::from_fn(|| take(s, &order)).collect();
        let want = [ids["x"][0], ids["y"][0], ids["z"][0], ids["x"][1], ids["z"][1], ids["x"][2]];
        assert_eq!(got, want);
    });

    // With a cap of one running job per tenant, a tenant at its cap is passed over; its next job
    // goes out once its running one ends.
    both_backends!(a_tenant_at_its_cap_waits, |s| {
        let a1 = s.submit_for("batches", "{}", "r", "a", 1).unwrap();
        let a2 = s.submit_for("batches", "{}", "r", "a", 1).unwrap();
        let b1 = s.submit_for("batches", "{}", "r", "b", 1).unwrap();
        let order = fair(1);
        assert_eq!((take(s, &order), take(s, &order)), (Some(a1), Some(b1)));
        assert_eq!(take(s, &order), None, "a is at its cap, b has nothing queued");
        assert_eq!(s.state(a2).unwrap(), Some(JobState::Queued));
        assert!(s.mark(a1, "e", &Outcome::Complete, 0, 6).unwrap());
        assert_eq!(take(s, &order), Some(a2));
    });

    // The gauges follow submits and dequeues; a queue without an executor keeps its jobs queued
    // through stalled-job sweeps.
    both_backends!(gauges_follow_submits_and_dequeues, |s| {
        let qs = vec!["batches".to_string(), "codeintel".to_string()];
        let g = |s: &mut Store, now| s.queue_gauges(&qs, now, now - 15_000).unwrap();
        let zero = |name: &str| QueueGauge {
            name: name.into(),
            queued: 0,
            oldest_queued_seconds: 0.0,
            running: 0,
            executors: 0,
        };
        assert_eq!(g(s, 1000), [zero("batches"), zero("codeintel")]);
        let a = s.submit("batches", "{}", "r", 1000).unwrap();
        s.submit("batches", "{}", "r", 3000).unwrap();
        let c = s.submit("codeintel", "{}", "r", 2000).unwrap();
        let info =
            ExecutorInfo { hostname: "e".into(), queue_names: vec!["batches".into()], ..Default::default() };
        s.heartbeat(&info, &[], 4000).unwrap();
        let now = g(s, 5500);
        assert_eq!(
            (now[0].queued, now[0].oldest_queued_seconds, now[0].running, now[0].executors),
            (2, 4.5, 0, 1)
        );
        assert_eq!((now[1].queued, now[1].oldest_queued_seconds, now[1].executors), (1, 3.5, 0));
        assert_eq!(take(s, &fair(0)), Some(a));
        let now = g(s, 6000);
        assert_eq!((now[0].queued, now[0].oldest_queued_seconds, now[0].running), (1, 3.0, 1));
        // The executor stops heartbeating: it no longer counts; nobody takes codeintel's job,
        // and sweeps long after leave it queued (only processing jobs stall).
        assert_eq!(g(s, 60_000)[0].executors, 0);
        for now in [100_000, 10_000_000] {
            s.reset_stalled(now, 0, "25s", now).unwrap();
        }
        assert_eq!(s.state(c).unwrap(), Some(JobState::Queued));
        assert_eq!(g(s, 10_000_000)[1].queued, 1);
    });

    /// The fair pick is a seek on the partial index, not a scan and sort of the queued jobs.
    #[test]
    fn the_fair_pick_reads_the_tenant_index() {
        let s = Store::open_in_memory().unwrap();
        let super::super::Backend::Sqlite(conn) = &s.backend else { unreachable!() };
        for capped in [false, true] {
            let cap = if capped { cap_clause(3) } else { String::new() };
            let sql = format!(
                "EXPLAIN QUERY PLAN SELECT id, payload, tenant FROM jobs WHERE queue = ?1 AND state = 'queued' \
                 AND tenant > ?2{cap} ORDER BY tenant, id LIMIT 1"
            );
            let mut stmt = conn.prepare(&sql).unwrap();
            let plan: Vec<String> = stmt
                .query_map(
                    rusqlite::params_from_iter(["batches", "t", "1"].iter().take(if capped { 3 } else { 2 })),
                    |r| r.get::<_, String>(3),
                )
                .unwrap()
                .map(|r| r.unwrap())
                .collect();
            let text = plan.join("\n");
            assert!(text.contains("USING INDEX jobs_queued_tenant"), "{text}");
            assert!(!text.contains("TEMP B-TREE"), "no sort: {text}");
        }
    }

    /// Eight replicas dequeueing fairly at once from ten tenants' 200 jobs: each job goes out
    /// once and no dequeue comes back empty while jobs are queued (`SKIP LOCKED` in both picks).
    #[test]
    fn concurrent_fair_dequeues_each_get_another_job() {
        let test = "concurrent_fair_dequeues_each_get_another_job";
        let Some(pool) = crate::server::store::testing::pg_pool(test) else { return };
        let mut s = Store::postgres(pool.clone());
        let mut want: Vec<i64> = (0..200)
            .map(|i| s.submit_for("batches", "{}", "r", &format!("t{}", i % 10), 1).unwrap())
            .collect();
        drop(s);
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (pool, barrier) = (pool.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let order = fair(0);
                    barrier.wait();
                    let mut got = Vec::new();
                    for _ in 0..25 {
                        let mut s = Store::postgres(pool.clone());
                        let d = s
                            .dequeue_in(&["batches".to_string()], &format!("e{i}"), 2, |_| 1, &order)
                            .unwrap();
                        got.push(d.expect("a job was queued but the dequeue came back empty").id);
                    }
                    got
                })
            })
            .collect();
        let mut all: Vec<i64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        all.sort();
        want.sort();
        assert_eq!(all, want, "every job exactly once");
    }

    /// Eight replicas dequeueing at once with a cap of one running job per tenant: ten tenants,
    /// so ten jobs go out, one each, however the dequeues interleave.
    #[test]
    fn concurrent_capped_dequeues_keep_the_cap() {
        let test = "concurrent_capped_dequeues_keep_the_cap";
        let Some(pool) = crate::server::store::testing::pg_pool(test) else { return };
        let mut s = Store::postgres(pool.clone());
        for i in 0..100 {
            s.submit_for("batches", "{}", "r", &format!("t{}", i % 10), 1).unwrap();
        }
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (pool, barrier) = (pool.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let order = fair(1);
                    barrier.wait();
                    let mut n = 0;
                    let mut s = Store::postgres(pool);
                    while s
                        .dequeue_in(&["batches".to_string()], &format!("e{i}"), 2, |_| 1, &order)
                        .unwrap()
                        .is_some()
                    {
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let taken: i64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(taken, 10);
        let g = s.queue_gauges(&["batches".to_string()], 2, 0).unwrap();
        assert_eq!((g[0].running, g[0].queued), (10, 90));
    }
}
