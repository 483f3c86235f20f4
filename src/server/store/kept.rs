//! Jobs kept for `executor debug` on an executor: what its heartbeats report (`keptJobs`, our
//! extension), an admin's request to release one (answered in that executor's next heartbeat as
//! `releaseIds`), and each attach recorded in the job's log, redacted as every entry is.

use serde::Serialize;

use super::db::p;
use super::jobs::JobRefs;
use super::time::{self, from_ms};
use super::{Result, Store, StoreError};
use crate::protocol::ExecutionLogEntry;
use chrono::{DateTime, Utc};

/// The most kept jobs one heartbeat may report.
pub(crate) const MAX_KEPT_JOBS: usize = 1000;

/// Where a job's sandbox is kept, as the admin API and the console show it.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KeptOn {
    pub executor: String,
    #[serde(serialize_with = "time::serialize")]
    pub until: DateTime<Utc>,
    /// An admin asked for its release; the executor's next heartbeat carries it.
    pub release_requested: bool,
    /// The line `queue show` and the console show, with the command to run on that host.
    pub message: String,
}

impl KeptOn {
    fn new(id: i64, executor: String, until: DateTime<Utc>, release_requested: bool) -> KeptOn {
        let message = format!(
            "kept for debugging on {executor} until {}: run `executor debug {id}` on that host{}",
            until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            if release_requested { " (release requested)" } else { "" }
        );
        KeptOn { executor, until, release_requested, message }
    }
}

impl Store {
    /// Records which of `executor`'s jobs it keeps (`(id, queue, until ms)`, its heartbeat's whole
    /// list: a job no longer in it is no longer kept); returns those an admin asked to release.
    pub fn heartbeat_kept(&mut self, executor: &str, kept: &[(i64, String, i64)]) -> Result<JobRefs> {
        if kept.len() > MAX_KEPT_JOBS {
            return Err(StoreError::OverCap(format!(
                "the heartbeat reports {} kept jobs, more than the {MAX_KEPT_JOBS} accepted",
                kept.len()
            )));
        }
        self.tx(|t| {
            let had: Vec<(i64, String)> =
                t.all("SELECT id, queue FROM jobs WHERE kept_on = ?1 ORDER BY id", p![executor], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
            for (id, q) in &had {
                if !kept.iter().any(|(k, kq, _)| k == id && kq == q) {
                    t.exec(
                        "UPDATE jobs SET kept_on = NULL, kept_until = NULL, kept_release = 0 WHERE id = ?1",
                        p![id],
                    )?;
                }
            }
            let mut release = Vec::new();
            for (id, q, until) in kept {
                // Only a job this executor ran: another's word about it is ignored.
                let n = t.exec(
                    "UPDATE jobs SET kept_on = ?2, kept_until = ?3 \
                     WHERE id = ?1 AND queue = ?4 AND executor_name = ?2",
                    p![id, executor, until, q],
                )?;
                if n > 0 && t.exists("SELECT 1 FROM jobs WHERE id = ?1 AND kept_release <> 0", p![id])? {
                    release.push((*id, q.clone()));
                }
            }
            Ok(release)
        })
    }

    /// Where job `id` is kept, if it is.
    pub fn kept_on(&mut self, id: i64) -> Result<Option<KeptOn>> {
        let row: Option<(Option<String>, Option<i64>, i64)> = self.read(|t| {
            t.opt("SELECT kept_on, kept_until, kept_release FROM jobs WHERE id = ?1", p![id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
        })?;
        Ok(match row {
            Some((Some(executor), Some(until), release)) => {
                Some(KeptOn::new(id, executor, from_ms(until), release != 0))
            }
            _ => None,
        })
    }

    /// Asks for job `id`'s kept sandbox to be released; `None` when it is kept nowhere.
    pub fn request_release(&mut self, id: i64) -> Result<Option<KeptOn>> {
        let n = self.tx(|t| {
            t.exec("UPDATE jobs SET kept_release = 1 WHERE id = ?1 AND kept_on IS NOT NULL", p![id])
        })?;
        if n == 0 {
            return Ok(None);
        }
        self.kept_on(id)
    }

    /// Records an `executor debug` attach in job `id`'s log; `UnknownJob` unless `executor` ran
    /// the job and keeps it (or its heartbeat has yet to say so: the job failed there).
    pub fn add_attach_log(
        &mut self,
        id: i64,
        executor: &str,
        entry: &ExecutionLogEntry,
        cap: u64,
    ) -> Result<i64> {
        self.add_log_if(id, entry, cap, |t| {
            t.exists(
                "SELECT 1 FROM jobs WHERE id = ?1 AND executor_name = ?2 \
                 AND (kept_on = ?2 OR state IN ('failed', 'errored'))",
                p![id, executor],
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::store::{both_backends, Outcome};

    both_backends!(heartbeats_keep_and_release_a_failed_job, |s| {
        let id = s.submit("batches", "{}", "r", 1).unwrap();
        s.dequeue(&["batches".to_string()], "e1", 2, |_| 1).unwrap().unwrap();
        assert!(s.mark(id, "e1", &Outcome::Failed("step failed".into()), 0, 3).unwrap());
        let entry =
            ExecutionLogEntry { key: "debug.attach".into(), out: Some("x".into()), ..Default::default() };
        assert!(s.add_attach_log(id, "e1", &entry, 1 << 20).is_ok(), "before its heartbeat says kept");
        let until = chrono::Utc::now().timestamp_millis() + 600_000;
        assert!(s.heartbeat_kept("e2", &[(id, "batches".into(), until)]).unwrap().is_empty());
        assert_eq!(s.kept_on(id).unwrap(), None, "another executor's word is ignored");
        assert!(s.heartbeat_kept("e1", &[(id, "batches".into(), until)]).unwrap().is_empty());
        let k = s.kept_on(id).unwrap().unwrap();
        assert_eq!((k.executor.as_str(), k.release_requested), ("e1", false));
        assert!(k.message.starts_with("kept for debugging on e1 until "), "{}", k.message);
        assert!(k.message.ends_with(&format!("run `executor debug {id}` on that host")), "{}", k.message);
        assert!(matches!(s.add_attach_log(id, "e2", &entry, 1 << 20), Err(StoreError::UnknownJob)));
        assert!(s.add_attach_log(id, "e1", &entry, 1 << 20).unwrap() > 0);
        assert!(s.request_release(id).unwrap().unwrap().release_requested);
        assert_eq!(
            s.heartbeat_kept("e1", &[(id, "batches".into(), until)]).unwrap(),
            [(id, "batches".into())]
        );
        assert!(s.heartbeat_kept("e1", &[]).unwrap().is_empty());
        assert_eq!(s.kept_on(id).unwrap(), None, "released: no longer reported");
        assert_eq!(s.request_release(id).unwrap(), None);
    });
}
