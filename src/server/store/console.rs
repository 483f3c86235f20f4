//! The admin console's queries: a page of jobs under filters, newest first, by keyset (`id <
//! before`) on the indexes of migration 4, and the jobs each executor is running.

use rusqlite::params;
use std::collections::HashMap;

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
    pub fn job_page(&self, filter: &JobFilter, limit: i64) -> Result<Vec<JobPageRow>> {
        // One statement per combination keeps each one's plan on the best index.
        let mut clauses = Vec::new();
        if filter.queue.is_some() {
            clauses.push("queue = ?1");
        }
        if filter.state.is_some() {
            clauses.push("state = ?2");
        }
        if filter.repository.is_some() {
            clauses.push("repository_name = ?3");
        }
        if filter.before.is_some() {
            clauses.push("id < ?4");
        }
        let cond =
            if clauses.is_empty() { String::new() } else { format!("WHERE {}", clauses.join(" AND ")) };
        let sql = format!(
            "SELECT {ROW_COLS}, COALESCE(json_extract(payload, '$.commit'), '') FROM jobs {cond} \
             ORDER BY id DESC LIMIT ?5"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt
            .query_map(params![filter.queue, filter.state, filter.repository, filter.before, limit], |r| {
                Ok(JobPageRow { row: job_row(r)?, commit: r.get(12)? })
            })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The ids of the processing jobs by executor name.
    pub fn running_by_executor(&self) -> Result<HashMap<String, Vec<i64>>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT executor_name, id FROM jobs WHERE state = 'processing' AND executor_name IS NOT NULL \
             ORDER BY id",
        )?;
        let mut out: HashMap<String, Vec<i64>> = HashMap::new();
        for r in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
            let (name, id) = r?;
            out.entry(name).or_default().push(id);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_follow_the_filters_newest_first() {
        let mut s = Store::open_in_memory().unwrap();
        for i in 0..10 {
            let queue = if i % 2 == 0 { "batches" } else { "codeintel" };
            let payload = format!(r#"{{"commit":"c{i}"}}"#);
            s.submit(queue, &payload, if i < 5 { "a" } else { "b" }, i).unwrap();
        }
        fn ids_of(s: &Store, f: &JobFilter, n: i64) -> Vec<i64> {
            s.job_page(f, n).unwrap().iter().map(|r| r.row.id).collect()
        }
        assert_eq!(ids_of(&s, &JobFilter::default(), 3), [10, 9, 8]);
        let f = JobFilter { before: Some(8), ..Default::default() };
        assert_eq!(ids_of(&s, &f, 3), [7, 6, 5]);
        let f =
            JobFilter { queue: Some("batches".into()), repository: Some("b".into()), ..Default::default() };
        assert_eq!(ids_of(&s, &f, 10), [9, 7]);
        assert!(matches!(s.cancel(4, 1).unwrap(), super::super::CancelResult::Done(_)));
        let f = JobFilter { state: Some(JobState::Canceled), ..Default::default() };
        assert_eq!(ids_of(&s, &f, 10), [4]);
        assert_eq!(s.job_page(&JobFilter::default(), 1).unwrap()[0].commit, "c9");
    }

    #[test]
    fn each_filter_reads_through_an_index() {
        let s = Store::open_in_memory().unwrap();
        for (cond, index) in [
            ("queue = 'q'", "jobs_queue_id"),
            ("state = 'queued'", "jobs_state_id"),
            ("repository_name = 'r'", "jobs_repository_id"),
        ] {
            let plan: Vec<String> = s
                .conn
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

    #[test]
    fn a_finished_job_requeues_and_a_running_one_does_not() {
        use super::super::{Outcome, RequeueResult};
        let mut s = Store::open_in_memory().unwrap();
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
    }
}
