//! The admin console's queries: a page of jobs under filters, newest first, by keyset (`id <
//! before`) on the indexes of migration 4, and the jobs each executor is running.

use std::collections::HashMap;

use super::db::{p, Dialect};
use super::jobs::{job_row, ROW_COLS};
use super::{JobRow, JobState, Result, Store};

/// The filters of the jobs page; `None` is "any".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobFilter {
    pub queue: Option<String>,
    pub state: Option<JobState>,
    pub repository: Option<String>,
    /// Only jobs with a smaller id (the last id of the previous page).
    pub before: Option<i64>,
}

/// One row of the jobs page: the admin row and the commit of the job's payload.
#[derive(Debug, Clone, PartialEq)]
pub struct JobPageRow {
    pub row: JobRow,
    pub commit: String,
}

impl Store {
    /// At most `limit` jobs matching `filter`, newest first. Each filter has an index ending in
    /// `id` (`jobs_queue_id`, `jobs_state_id`, `jobs_repository_id`), so a page reads about
    /// `limit` rows whatever the table holds.
    pub fn job_page(&mut self, filter: &JobFilter, limit: i64) -> Result<Vec<JobPageRow>> {
        // One statement per combination keeps each one's plan on the best index; only the
        // filters given are parameters (PostgreSQL must know each one's type).
        use super::db::{ToVal, Val};
        let mut clauses = Vec::new();
        let mut params: Vec<Val<'_>> = Vec::new();
        let filters: [(&str, Option<Val<'_>>); 4] = [
            ("queue", filter.queue.as_ref().map(|q| q.to_val())),
            ("state", filter.state.as_ref().map(|s| s.to_val())),
            ("repository_name", filter.repository.as_ref().map(|r| r.to_val())),
            ("id <", filter.before.map(Val::Int)),
        ];
        for (column, value) in filters {
            if let Some(v) = value {
                params.push(v);
                let op = if column.ends_with('<') { "" } else { " =" };
                clauses.push(format!("{column}{op} ?{}", params.len()));
            }
        }
        params.push(Val::Int(limit));
        let cond =
            if clauses.is_empty() { String::new() } else { format!("WHERE {}", clauses.join(" AND ")) };
        let commit = match self.dialect() {
            Dialect::Sqlite => "json_extract(payload, '$.commit')",
            Dialect::Postgres => "(payload::jsonb ->> 'commit')",
        };
        let sql = format!(
            "SELECT {ROW_COLS}, COALESCE({commit}, '') FROM jobs {cond} ORDER BY id DESC LIMIT ?{}",
            params.len()
        );
        self.read(|t| t.all(&sql, &params, |r| Ok(JobPageRow { row: job_row(r)?, commit: r.get(12)? })))
    }

    /// Opens a console session: `digest` is the SHA-256 (hex) of the cookie's value, never the
    /// value itself. Drops the expired sessions on the way.
    pub fn open_session(&mut self, digest: &str, csrf: &str, expires_at: i64, now: i64) -> Result<()> {
        self.tx(|t| {
            t.exec("DELETE FROM console_sessions WHERE expires_at <= ?1", p![now])?;
            t.exec(
                "INSERT INTO console_sessions (digest, csrf, expires_at) VALUES (?1, ?2, ?3)",
                p![digest, csrf, expires_at],
            )?;
            Ok(())
        })
    }

    /// The CSRF token of the live session of this cookie digest.
    pub fn session(&mut self, digest: &str, now: i64) -> Result<Option<String>> {
        self.read(|t| {
            t.opt(
                "SELECT csrf FROM console_sessions WHERE digest = ?1 AND expires_at > ?2",
                p![digest, now],
                |r| r.get(0),
            )
        })
    }

    /// Ends a console session.
    pub fn close_session(&mut self, digest: &str) -> Result<()> {
        self.tx(|t| t.exec("DELETE FROM console_sessions WHERE digest = ?1", p![digest]).map(|_| ()))
    }

    /// The ids of the processing jobs by executor name.
    pub fn running_by_executor(&mut self) -> Result<HashMap<String, Vec<i64>>> {
        let rows: Vec<(String, i64)> = self.read(|t| {
            t.all(
                "SELECT executor_name, id FROM jobs WHERE state = 'processing' AND executor_name IS NOT NULL \
                 ORDER BY id",
                p![],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })?;
        let mut out: HashMap<String, Vec<i64>> = HashMap::new();
        for (name, id) in rows {
            out.entry(name).or_default().push(id);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::store::both_backends;

    both_backends!(pages_follow_the_filters_newest_first, |s| {
        for i in 0..10 {
            let queue = if i % 2 == 0 { "batches" } else { "codeintel" };
            let payload = format!(r#"{{"commit":"c{i}"}}"#);
            s.submit(queue, &payload, if i < 5 { "a" } else { "b" }, i).unwrap();
        }
        fn ids_of(s: &mut Store, f: &JobFilter, n: i64) -> Vec<i64> {
            s.job_page(f, n).unwrap().iter().map(|r| r.row.id).collect()
        }
        assert_eq!(ids_of(s, &JobFilter::default(), 3), [10, 9, 8]);
        let f = JobFilter { before: Some(8), ..Default::default() };
        assert_eq!(ids_of(s, &f, 3), [7, 6, 5]);
        let f =
            JobFilter { queue: Some("batches".into()), repository: Some("b".into()), ..Default::default() };
        assert_eq!(ids_of(s, &f, 10), [9, 7]);
        let f = JobFilter { repository: Some("a".into()), before: Some(4), ..Default::default() };
        assert_eq!(ids_of(s, &f, 10), [3, 2, 1]);
        assert!(matches!(s.cancel(4, 1).unwrap(), crate::server::store::CancelResult::Done(_)));
        let f = JobFilter { state: Some(JobState::Canceled), ..Default::default() };
        assert_eq!(ids_of(s, &f, 10), [4]);
        assert_eq!(s.job_page(&JobFilter::default(), 1).unwrap()[0].commit, "c9");
    });

    /// SQLite only: PostgreSQL's migrations create the same indexes, and its planner picks by
    /// the table's statistics.
    #[test]
    fn each_filter_reads_through_an_index() {
        let s = Store::open_in_memory().unwrap();
        let super::super::Backend::Sqlite(conn) = &s.backend else { unreachable!() };
        for (cond, index) in [
            ("queue = 'q'", "jobs_queue_id"),
            ("state = 'queued'", "jobs_state_id"),
            ("repository_name = 'r'", "jobs_repository_id"),
        ] {
            let plan: Vec<String> = conn
                .prepare(&format!(
                    "EXPLAIN QUERY PLAN SELECT id FROM jobs WHERE {cond} ORDER BY id DESC LIMIT 50"
                ))
                .unwrap()
                .query_map([], |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            let plan = plan.join("; ");
            assert!(plan.contains(index) && !plan.contains("TEMP B-TREE"), "{cond}: {plan}");
        }
    }

    both_backends!(console_sessions_open_expire_and_close, |s| {
        s.open_session("d1", "c1", 100, 0).unwrap();
        s.open_session("d2", "c2", 50, 0).unwrap();
        assert_eq!(s.session("d1", 10).unwrap().as_deref(), Some("c1"));
        assert_eq!(s.session("d2", 50).unwrap(), None, "expired");
        assert_eq!(s.session("c1", 10).unwrap(), None);
        s.close_session("d1").unwrap();
        assert_eq!(s.session("d1", 10).unwrap(), None);
    });

    both_backends!(a_finished_job_requeues_and_a_running_one_does_not, |s| {
        use crate::server::store::{Outcome, RequeueResult};
        let a = s.submit("batches", "{}", "r", 1).unwrap();
        assert_eq!(s.requeue(a).unwrap(), RequeueResult::NotFinal(JobState::Queued));
        s.dequeue(&["batches".to_string()], "e", 2, |_| 1).unwrap().unwrap();
        assert_eq!(s.running_by_executor().unwrap().get("e"), Some(&vec![a]));
        assert_eq!(s.requeue(a).unwrap(), RequeueResult::NotFinal(JobState::Processing));
        assert!(s.mark(a, "e", &Outcome::Failed("boom".into()), 0, 3).unwrap());
        let RequeueResult::Done(row) = s.requeue(a).unwrap() else { panic!("not requeued") };
        assert_eq!((row.state, row.failure_message, row.executor_name), (JobState::Queued, None, None));
        assert!(s.running_by_executor().unwrap().is_empty());
        assert_eq!(s.dequeue(&["batches".to_string()], "e2", 4, |_| 1).unwrap().map(|d| d.id), Some(a));
        assert_eq!(s.requeue(999).unwrap(), RequeueResult::NotFound);
    });
}
