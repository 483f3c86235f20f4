//! The console's views: what each page shows, built by pure functions from the store's typed
//! rows and the job's typed payload (redacted as the admin API shows it). Times stay
//! `DateTime<Utc>` here; `render.rs` formats them.

use anyhow::Context;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::time::Duration;

use super::html::url_encode;
use crate::protocol::Job;
use crate::server::store::{
    ArtifactInfo, ExecutorRow, JobDetail, JobFilter, JobPageRow, JobState, StoredLogEntry,
};

/// Jobs on one page of the jobs list.
pub(super) const PAGE_SIZE: i64 = 50;

/// One executor as the executors page lists it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ExecutorView {
    pub(super) name: String,
    pub(super) queues: String,
    /// `os / architecture`.
    pub(super) platform: String,
    pub(super) versions: String,
    pub(super) first_seen: DateTime<Utc>,
    pub(super) last_seen: DateTime<Utc>,
    pub(super) running: Vec<i64>,
    /// The figures of its last metrics push, one line each.
    pub(super) figures: Vec<String>,
}

/// A section of the executors page.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ExecutorGroup {
    pub(super) title: &'static str,
    pub(super) id: &'static str,
    pub(super) executors: Vec<ExecutorView>,
}

/// The executors page: the active executors, then the inactive ones.
pub(super) fn executor_groups(
    rows: &[ExecutorRow],
    running: &HashMap<String, Vec<i64>>,
    figures: &HashMap<String, Vec<String>>,
) -> [ExecutorGroup; 2] {
    let view = |r: &ExecutorRow| {
        let i = &r.info;
        let queues = if i.queue_names.is_empty() {
            i.queue_name.clone().unwrap_or_default()
        } else {
            i.queue_names.join(", ")
        };
        let versions: Vec<String> = [
            ("executor", &i.executor_version),
            ("git", &i.git_version),
            ("docker", &i.docker_version),
            ("ignite", &i.ignite_version),
            ("src-cli", &i.src_cli_version),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(name, v)| format!("{name} {v}"))
        .collect();
        ExecutorView {
            name: i.hostname.clone(),
            queues,
            platform: format!("{} / {}", i.os, i.architecture),
            versions: versions.join(", "),
            first_seen: r.first_seen_at,
            last_seen: r.last_seen_at,
            running: running.get(&i.hostname).cloned().unwrap_or_default(),
            figures: figures.get(&i.hostname).cloned().unwrap_or_default(),
        }
    };
    let group = |title, id, active| ExecutorGroup {
        title,
        id,
        executors: rows.iter().filter(|r| r.active == active).map(view).collect(),
    };
    [group("Active", "active-executors", true), group("Inactive", "inactive-executors", false)]
}

/// When a job was created, started and finished, and how long it ran (`None`: it has not
/// started, or the clock went back).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Times {
    pub(super) created: DateTime<Utc>,
    pub(super) started: Option<DateTime<Utc>>,
    pub(super) finished: Option<DateTime<Utc>>,
    pub(super) duration: Option<Duration>,
}

impl Times {
    /// A running job's duration runs to `now`.
    fn new(
        created: DateTime<Utc>,
        started: Option<DateTime<Utc>>,
        finished: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Times {
        let duration = started
            .and_then(|a| (finished.unwrap_or(now) - a).to_std().ok())
            .map(|d| Duration::from_millis(d.as_millis() as u64));
        Times { created, started, finished, duration }
    }
}

/// `repo@commit` with the commit cut to 12 characters; `None` for a job without a repository.
fn repo_at(repo: &str, commit: &str) -> Option<String> {
    match (repo.is_empty(), commit.is_empty()) {
        (true, _) => None,
        (false, true) => Some(repo.to_string()),
        (false, false) => Some(format!(
            "{repo}@{}",
            &commit[..commit.char_indices().nth(12).map(|(i, _)| i).unwrap_or(commit.len())]
        )),
    }
}

/// One row of the jobs page.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct JobListRow {
    pub(super) id: i64,
    pub(super) state: JobState,
    pub(super) queue: String,
    pub(super) repo: Option<String>,
    pub(super) executor: Option<String>,
    pub(super) times: Times,
}

/// The jobs page: its filters, a page of jobs and the links to the newest and the next page.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct JobsView {
    /// The server's queues, the choices of the queue filter.
    pub(super) queues: Vec<String>,
    pub(super) filter: JobFilter,
    pub(super) rows: Vec<JobListRow>,
    pub(super) newest: String,
    pub(super) older: Option<String>,
}

/// The query string of a filter, as the page's links carry it.
fn filter_query(f: &JobFilter) -> String {
    let mut parts = Vec::new();
    if let Some(q) = &f.queue {
        parts.push(format!("queue={}", url_encode(q)));
    }
    if let Some(s) = f.state {
        parts.push(format!("state={}", s.as_str()));
    }
    if let Some(r) = &f.repository {
        parts.push(format!("repository={}", url_encode(r)));
    }
    if let Some(b) = f.before {
        parts.push(format!("before={b}"));
    }
    parts.join("&")
}

impl JobsView {
    /// `rows` as read with a limit of `PAGE_SIZE + 1`: one more than the page says there is an
    /// older page.
    pub(super) fn new(
        queues: &[String],
        filter: JobFilter,
        rows: Vec<JobPageRow>,
        now: DateTime<Utc>,
    ) -> JobsView {
        let more = rows.len() as i64 > PAGE_SIZE;
        let rows: Vec<JobListRow> = rows
            .into_iter()
            .take(PAGE_SIZE as usize)
            .map(|r| {
                let j = r.row;
                JobListRow {
                    id: j.id,
                    state: j.state,
                    repo: repo_at(&j.repository_name, &r.commit),
                    queue: j.queue,
                    executor: j.executor_name,
                    times: Times::new(j.created_at, j.started_at, j.finished_at, now),
                }
            })
            .collect();
        let newest = format!("/admin/jobs?{}", filter_query(&filter));
        let older = match rows.last() {
            Some(last) if more => {
                let next = JobFilter { before: Some(last.id), ..filter.clone() };
                Some(format!("/admin/jobs?{}", filter_query(&next)))
            }
            _ => None,
        };
        JobsView { queues: queues.to_vec(), filter, rows, newest, older }
    }
}

/// A step of a job as the job page lists it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct StepView {
    pub(super) key: String,
    pub(super) image: String,
    pub(super) command: String,
}

/// The job page.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct JobView {
    pub(super) id: i64,
    pub(super) state: JobState,
    /// A cancel was asked for and the job has not ended yet.
    pub(super) cancel_requested: bool,
    pub(super) queue: String,
    pub(super) repo: Option<String>,
    pub(super) executor: Option<String>,
    pub(super) times: Times,
    pub(super) num_resets: i64,
    pub(super) num_failures: i64,
    pub(super) failure: Option<String>,
    pub(super) artifacts: Option<ArtifactInfo>,
    pub(super) steps: Vec<StepView>,
    /// The paths of the files the job writes (never their contents).
    pub(super) files: Vec<String>,
    pub(super) logs: Vec<StoredLogEntry>,
    /// "kept for debugging on <executor> until <time>" with the command to run there.
    pub(super) kept: Option<String>,
}

impl JobView {
    /// The view of a stored job. What the payload shows is redacted as the admin API shows it:
    /// every string with a secret in it.
    pub(super) fn new(
        job: JobDetail,
        logs: Vec<StoredLogEntry>,
        now: DateTime<Utc>,
    ) -> anyhow::Result<JobView> {
        let j = job.row;
        let payload: Job = serde_json::from_str(&job.payload)
            .with_context(|| format!("stored payload of job {} is unreadable", j.id))?;
        let redactor = crate::base::redact::Redactor::new(payload.redacted_values.iter());
        let r = |s: &str| redactor.redact_str(s);
        let joined = |lines: &[String]| lines.iter().map(|l| r(l)).collect::<Vec<_>>().join(" && ");
        let key =
            |key: &str, kind: &str, i: usize| if key.is_empty() { format!("{kind}.{i}") } else { r(key) };
        let docker = payload.docker_steps.iter().enumerate().map(|(i, s)| StepView {
            key: key(&s.key, "docker", i),
            image: r(&s.image),
            command: joined(&s.commands),
        });
        let cli = payload.cli_steps.iter().enumerate().map(|(i, s)| StepView {
            key: key(&s.key, "cli", i),
            image: "src-cli".into(),
            command: joined(&s.command),
        });
        let steps = docker.chain(cli).collect();
        Ok(JobView {
            id: j.id,
            cancel_requested: j.cancel && !j.state.is_final(),
            state: j.state,
            repo: repo_at(&j.repository_name, &r(&payload.commit)),
            queue: j.queue,
            executor: j.executor_name,
            times: Times::new(j.created_at, j.started_at, j.finished_at, now),
            num_resets: j.num_resets,
            num_failures: j.num_failures,
            failure: j.failure_message,
            artifacts: job.artifacts,
            steps,
            files: payload.files.keys().cloned().collect(),
            logs,
            kept: None,
        })
    }

    /// Whether the page follows the job's live log (until it ends).
    pub(super) fn live(&self) -> bool {
        !self.state.is_final()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::server::store::{ExecutorInfo, JobRow};

    pub(in crate::server::http::console) fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    pub(in crate::server::http::console) fn row(id: i64, state: JobState) -> JobRow {
        JobRow {
            id,
            queue: "batches".into(),
            state,
            repository_name: "github.com/acme/widgets".into(),
            failure_message: None,
            num_resets: 0,
            num_failures: 0,
            executor_name: None,
            created_at: t("2026-01-02T03:04:05.678Z"),
            started_at: Some(t("2026-01-02T03:04:06Z")),
            finished_at: None,
            cancel: false,
        }
    }

    #[test]
    fn a_job_view_shows_the_payload_redacted_and_steps_named() {
        let payload = serde_json::json!({
            "version": 2, "repositoryName": "github.com/acme/widgets", "commit": "0123456789abcdef0123",
            "dockerSteps": [{"image": "alpine", "commands": ["echo hunter2", "true"]},
                            {"key": "build", "image": "img", "commands": []}],
            "cliSteps": [{"command": ["batch", "preview"]}],
            "files": {"b.txt": {"content": ""}, "a.txt": {"content": "aGk="}},
            "redactedValues": {"hunter2": "PASSWORD"},
        });
        let mut r = row(7, JobState::Processing);
        r.cancel = true;
        let detail = JobDetail { row: r, payload: payload.to_string(), artifacts: None };
        let v = JobView::new(detail, vec![], t("2026-01-02T03:05:06.5Z")).unwrap();
        assert_eq!(v.repo.as_deref(), Some("github.com/acme/widgets@0123456789ab"));
        let steps: Vec<_> = v.steps.iter().map(|s| (&*s.key, &*s.image, &*s.command)).collect();
        assert_eq!(
            steps,
            [
                ("docker.0", "alpine", "echo PASSWORD && true"),
                ("build", "img", ""),
                ("cli.0", "src-cli", "batch && preview")
            ]
        );
        assert_eq!(v.files, ["a.txt", "b.txt"]);
        assert!(v.cancel_requested && v.live());
        // Running: the duration runs to now, cut to milliseconds.
        assert_eq!(v.times.duration, Some(Duration::from_millis(60_500)));
        let bad = JobDetail { row: row(8, JobState::Queued), payload: "{".into(), artifacts: None };
        assert!(JobView::new(bad, vec![], Utc::now()).is_err());
    }

    #[test]
    fn the_jobs_view_pages_by_the_last_id_under_the_same_filters() {
        let filter =
            JobFilter { queue: Some("batches".into()), repository: Some("a b".into()), ..Default::default() };
        let rows: Vec<_> = (0..=PAGE_SIZE)
            .map(|i| JobPageRow { row: row(1000 - i, JobState::Completed), commit: String::new() })
            .collect();
        let v = JobsView::new(&["batches".into()], filter.clone(), rows, Utc::now());
        assert_eq!(v.rows.len() as i64, PAGE_SIZE);
        assert_eq!(v.newest, "/admin/jobs?queue=batches&repository=a%20b");
        assert_eq!(v.older.as_deref(), Some("/admin/jobs?queue=batches&repository=a%20b&before=951"));
        assert_eq!(v.rows[0].repo.as_deref(), Some("github.com/acme/widgets"));
        let one = vec![JobPageRow { row: row(3, JobState::Queued), commit: "abc".into() }];
        let v = JobsView::new(&[], JobFilter::default(), one, Utc::now());
        assert_eq!((v.newest.as_str(), v.older), ("/admin/jobs?", None));
        assert_eq!(v.rows[0].repo.as_deref(), Some("github.com/acme/widgets@abc"));
        let (mut ended, now) = (row(4, JobState::Completed), t("2026-01-02T04:00:00Z"));
        ended.finished_at = Some(t("2026-01-02T03:04:05Z"));
        let v =
            JobsView::new(&[], JobFilter::default(), vec![JobPageRow { row: ended, commit: "".into() }], now);
        assert_eq!(v.rows[0].times.duration, None, "finished before it started");
    }

    #[test]
    fn executors_are_grouped_with_their_jobs_and_figures() {
        let at = t("2026-01-02T03:04:05Z");
        let exec = |name: &str, active: bool| ExecutorRow {
            id: 1,
            info: ExecutorInfo {
                hostname: name.into(),
                queue_name: Some("batches".into()),
                os: "linux".into(),
                architecture: "amd64".into(),
                git_version: "2.43".into(),
                executor_version: "1.0".into(),
                ..Default::default()
            },
            first_seen_at: at,
            last_seen_at: at,
            active,
        };
        let running = HashMap::from([("a".to_string(), vec![4, 5])]);
        let figures = HashMap::from([("b".to_string(), vec!["running: 0".to_string()])]);
        let [active, inactive] = executor_groups(&[exec("a", true), exec("b", false)], &running, &figures);
        assert_eq!((active.id, active.executors.len(), inactive.executors.len()), ("active-executors", 1, 1));
        let a = &active.executors[0];
        assert_eq!((a.queues.as_str(), a.platform.as_str()), ("batches", "linux / amd64"));
        assert_eq!((a.versions.as_str(), a.running.as_slice()), ("executor 1.0, git 2.43", &[4, 5][..]));
        assert_eq!(inactive.executors[0].figures, ["running: 0"]);
    }
}
