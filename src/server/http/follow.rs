//! The one log stream of a job and its ndjson encoder. The stream wakes on a log change (or
//! every second), reads the job's entries and state, and reports what changed since the last
//! read as `LogUpdate`s, until the job ends or the server stops. Two thin encoders read it:
//! `GET /api/jobs/{id}/logs[?follow=true]` here (ndjson) and the console's live log
//! (`console/events.rs`, server-sent events).

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use std::collections::{HashMap, VecDeque};
use std::time::Duration;
use tokio::sync::watch;

use super::auth::AdminToken;
use super::{db, http_err, job_id_param, query_params, HttpResult, Shared};
use crate::protocol::ExecutionLogEntry;
use crate::server::store::{JobState, StoredLogEntry};

/// What a log stream reports, in the order it learned it.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum LogUpdate {
    /// An entry whole: the first time it is seen, and whenever its output was replaced by
    /// something that does not extend what was reported.
    Whole(StoredLogEntry),
    /// An entry that changed since it was last reported: its fields, with `out` only the output
    /// it gained (maybe empty).
    Gained(StoredLogEntry),
    /// The job's state changed (`None`: there is no such job); after the entries of that read.
    State(Option<JobState>),
}

/// What was reported of one entry: its fields but `out`, and the length and digest of the output.
struct Reported {
    fields: ExecutionLogEntry,
    out_len: usize,
    out_sha: [u8; 32],
}

/// The entries reported so far, and what each read adds to them.
#[derive(Default)]
pub(super) struct LogDiff {
    reported: HashMap<i64, Reported>,
}

impl LogDiff {
    /// The update an entry's current state makes, if it changed since it was last reported.
    pub(super) fn update(&mut self, mut entry: StoredLogEntry) -> Option<LogUpdate> {
        use sha2::Digest;
        let digest = |b: &[u8]| -> [u8; 32] { sha2::Sha256::digest(b).into() };
        let out = entry.entry.out.take().unwrap_or_default();
        let extends = self.reported.get(&entry.entry_id).filter(|p| {
            out.len() >= p.out_len
                && out.is_char_boundary(p.out_len)
                && digest(&out.as_bytes()[..p.out_len]) == p.out_sha
        });
        let update = match extends {
            Some(p) if p.out_len == out.len() && p.fields == entry.entry => return None,
            Some(p) => {
                let mut gained = entry.clone();
                gained.entry.out = Some(out[p.out_len..].to_string());
                LogUpdate::Gained(gained)
            }
            None => {
                let mut whole = entry.clone();
                whole.entry.out = Some(out.clone());
                LogUpdate::Whole(whole)
            }
        };
        let reported = Reported { fields: entry.entry, out_len: out.len(), out_sha: digest(out.as_bytes()) };
        self.reported.insert(entry.entry_id, reported);
        Some(update)
    }
}

struct Follow {
    app: Shared,
    id: i64,
    follow: bool,
    gather: Duration,
    diff: LogDiff,
    last_state: Option<JobState>,
    pending: VecDeque<LogUpdate>,
    done: bool,
    shutdown: watch::Receiver<bool>,
}

async fn follow_step(mut st: Follow) -> Option<(Result<LogUpdate, std::io::Error>, Follow)> {
    loop {
        if let Some(update) = st.pending.pop_front() {
            return Some((Ok(update), st));
        }
        if st.done {
            return None;
        }
        let app = st.app.clone();
        let notified = app.logs_changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let id = st.id;
        let fetched = db(&app, move |s| Ok((s.logs(id)?, s.state(id)?))).await;
        let (logs, state) = match fetched {
            Ok(v) => v,
            Err(e) => return Some((Err(std::io::Error::other(e.message)), Follow { done: true, ..st })),
        };
        for entry in logs {
            if let Some(update) = st.diff.update(entry) {
                st.pending.push_back(update);
            }
        }
        if state != st.last_state {
            st.last_state = state;
            st.pending.push_back(LogUpdate::State(state));
        }
        let finished = state.map(JobState::is_final).unwrap_or(true);
        if !st.follow || finished || *st.shutdown.borrow() {
            st.done = true;
            continue;
        }
        if st.pending.is_empty() {
            tokio::select! {
                // Any job's log change wakes every stream: a short pause (`gather`) collects a
                // burst of appends into one read.
                _ = &mut notified => tokio::time::sleep(st.gather).await,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = st.shutdown.changed() => {}
            }
        }
    }
}

/// The updates of job `id`'s log: what it holds now, then (when `follow`) what changes, until
/// the job ends or the server stops. A failed read ends the stream with its error.
pub(super) fn log_stream(
    app: Shared,
    id: i64,
    follow: bool,
    gather: Duration,
) -> impl Stream<Item = Result<LogUpdate, std::io::Error>> + Send + 'static {
    let shutdown = app.shutdown.subscribe();
    let st = Follow {
        app,
        id,
        follow,
        gather,
        diff: LogDiff::default(),
        last_state: None,
        pending: VecDeque::new(),
        done: false,
        shutdown,
    };
    futures_util::stream::unfold(st, follow_step)
}

/// The ndjson line of an update: the whole entry, or its fields with only the new output and
/// `"append": true`; the job's state is not sent.
fn ndjson_line(update: LogUpdate) -> Option<bytes::Bytes> {
    let mut line = match update {
        LogUpdate::Whole(entry) => serde_json::to_string(&entry).ok()?,
        LogUpdate::Gained(mut entry) => {
            let out = entry.entry.out.take().unwrap_or_default();
            let mut v = serde_json::to_value(&entry).ok()?;
            v["out"] = serde_json::Value::String(out);
            v["append"] = serde_json::Value::Bool(true);
            v.to_string()
        }
        LogUpdate::State(_) => return None,
    };
    line.push('\n');
    Some(bytes::Bytes::from(line))
}

pub(super) async fn job_logs(
    State(app): State<Shared>,
    _: AdminToken,
    id: std::result::Result<Path<String>, PathRejection>,
    query: std::result::Result<Query<HashMap<String, String>>, QueryRejection>,
) -> HttpResult<Response> {
    let id = job_id_param(id)?;
    let q = query_params(query)?;
    let follow = match q.get("follow").map(String::as_str) {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") | Some("") => true,
        Some(other) => {
            return Err(http_err(StatusCode::BAD_REQUEST, format!("invalid follow value {other:?}")))
        }
    };
    if db(&app, move |s| s.state(id)).await?.is_none() {
        return Err(http_err(StatusCode::NOT_FOUND, format!("no job {id}")));
    }
    let lines = log_stream(app, id, follow, Duration::from_millis(100))
        .filter_map(|u| std::future::ready(u.map(ndjson_line).transpose()));
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"))],
        Body::from_stream(lines),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(out: &str, exit: Option<i32>) -> StoredLogEntry {
        StoredLogEntry {
            entry_id: 3,
            entry: ExecutionLogEntry {
                key: "step.0".into(),
                out: Some(out.into()),
                exit_code: exit,
                ..Default::default()
            },
        }
    }

    #[test]
    fn the_stream_reports_an_entry_whole_then_what_it_gained() {
        let mut diff = LogDiff::default();
        let out = |u: Option<LogUpdate>| match u {
            Some(LogUpdate::Whole(e)) => ("whole", e.entry.out.unwrap()),
            Some(LogUpdate::Gained(e)) => ("gained", e.entry.out.unwrap()),
            other => panic!("{other:?}"),
        };
        assert_eq!(out(diff.update(at("abc", None))), ("whole", "abc".into()));
        assert_eq!(diff.update(at("abc", None)), None, "nothing changed");
        assert_eq!(out(diff.update(at("abcdé", None))), ("gained", "dé".into()));
        assert_eq!(out(diff.update(at("abcdé", Some(0)))), ("gained", "".into()));
        // A replacement that does not extend what was reported is reported whole, and so is a
        // cut inside a character.
        assert_eq!(out(diff.update(at("xbcdéf", Some(0)))), ("whole", "xbcdéf".into()));
        assert_eq!(out(diff.update(at("xbcd\u{e9}f!", Some(0)))), ("gained", "!".into()));
    }

    #[test]
    fn a_follow_sends_an_entry_once_then_what_it_gained() {
        let mut diff = LogDiff::default();
        let mut line = |e: StoredLogEntry| -> Option<serde_json::Value> {
            let b = diff.update(e).and_then(ndjson_line)?;
            assert!(b.ends_with(b"\n"));
            Some(serde_json::from_slice(&b).unwrap())
        };
        let first = line(at("abc", None)).unwrap();
        assert_eq!((first["out"].as_str(), first.get("append")), (Some("abc"), None));
        assert!(line(at("abc", None)).is_none(), "nothing changed");
        let more = line(at("abcdé", None)).unwrap();
        assert_eq!((more["out"].as_str(), more["append"].as_bool()), (Some("dé"), Some(true)));
        let ended = line(at("abcdé", Some(0))).unwrap();
        assert_eq!((ended["out"].as_str(), ended["exitCode"].as_i64()), (Some(""), Some(0)));
        let replaced = line(at("xbcdéf", Some(0))).unwrap();
        assert_eq!((replaced["out"].as_str(), replaced.get("append")), (Some("xbcdéf"), None));
        assert_eq!(ndjson_line(LogUpdate::State(Some(JobState::Completed))), None);
    }

    #[test]
    fn ndjson_lines_keep_the_wire_format() {
        let mut e = at("abc", Some(1));
        e.entry.start_time = chrono::DateTime::from_timestamp(1_767_323_045, 0).unwrap();
        let whole = ndjson_line(LogUpdate::Whole(e.clone())).unwrap();
        assert_eq!(
            std::str::from_utf8(&whole).unwrap(),
            "{\"entryId\":3,\"key\":\"step.0\",\"command\":null,\"startTime\":\"2026-01-02T03:04:05Z\",\
             \"exitCode\":1,\"out\":\"abc\"}\n"
        );
        let gained = ndjson_line(LogUpdate::Gained(e)).unwrap();
        assert_eq!(
            std::str::from_utf8(&gained).unwrap(),
            "{\"append\":true,\"command\":null,\"entryId\":3,\"exitCode\":1,\"key\":\"step.0\",\
             \"out\":\"abc\",\"startTime\":\"2026-01-02T03:04:05Z\"}\n"
        );
    }
}
