//! Log follows: `GET /api/jobs/{id}/logs[?follow=true]` streams a job's log entries as ndjson,
//! then (following) what each entry gains, until the job ends or the server stops.

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::collections::{HashMap, VecDeque};
use std::time::Duration;
use tokio::sync::watch;

use super::auth::AdminToken;
use super::{db, http_err, job_id_param, query_params, HttpResult, Shared};
use crate::server::store::{self, JobState};

/// What a follow sent of one entry: its fields but `out`, and the length and digest of the output.
struct Sent {
    meta: String,
    out_len: usize,
    out_sha: [u8; 32],
}

struct FollowState {
    app: Shared,
    id: i64,
    follow: bool,
    sent: HashMap<i64, Sent>,
    pending: VecDeque<bytes::Bytes>,
    done: bool,
    shutdown: watch::Receiver<bool>,
}

async fn follow_step(
    mut st: FollowState,
) -> Option<(std::result::Result<bytes::Bytes, std::io::Error>, FollowState)> {
    loop {
        if let Some(line) = st.pending.pop_front() {
            return Some((Ok(line), st));
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
            Err(e) => return Some((Err(std::io::Error::other(e.message)), FollowState { done: true, ..st })),
        };
        for entry in logs {
            if let Some(line) = follow_line(&mut st.sent, entry) {
                st.pending.push_back(bytes::Bytes::from(line));
            }
        }
        let finished = state.map(JobState::is_final).unwrap_or(true);
        if !st.follow || finished || *st.shutdown.borrow() {
            st.done = true;
            continue;
        }
        if st.pending.is_empty() {
            tokio::select! {
                // Any job's log change wakes every follow: a short pause gathers a burst of
                // appends into one read.
                _ = &mut notified => tokio::time::sleep(Duration::from_millis(100)).await,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = st.shutdown.changed() => {}
            }
        }
    }
}

/// The ndjson line a follow sends for the current state of one entry, if it changed: the whole
/// entry the first time (and whenever its output was replaced by something that does not extend
/// what was sent), otherwise its fields with only the new output and `"append": true`.
fn follow_line(sent: &mut HashMap<i64, Sent>, entry: store::StoredLogEntry) -> Option<String> {
    use sha2::Digest;
    let out = entry.entry.out.clone().unwrap_or_default();
    let mut bare = entry.clone();
    bare.entry.out = None;
    let meta = serde_json::to_string(&bare).ok()?;
    let digest = |b: &[u8]| -> [u8; 32] { sha2::Sha256::digest(b).into() };
    let extends = sent.get(&entry.entry_id).filter(|p| {
        out.len() >= p.out_len
            && out.is_char_boundary(p.out_len)
            && digest(&out.as_bytes()[..p.out_len]) == p.out_sha
    });
    let mut line = match extends {
        Some(p) if p.out_len == out.len() && p.meta == meta => return None,
        Some(p) => {
            let mut v = serde_json::to_value(&bare).ok()?;
            v["out"] = serde_json::Value::String(out[p.out_len..].to_string());
            v["append"] = serde_json::Value::Bool(true);
            v.to_string()
        }
        None => serde_json::to_string(&entry).ok()?,
    };
    sent.insert(entry.entry_id, Sent { meta, out_len: out.len(), out_sha: digest(out.as_bytes()) });
    line.push('\n');
    Some(line)
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
    let shutdown = app.shutdown.subscribe();
    let st = FollowState {
        app,
        id,
        follow,
        sent: HashMap::new(),
        pending: VecDeque::new(),
        done: false,
        shutdown,
    };
    let stream = futures_util::stream::unfold(st, follow_step);
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"))],
        Body::from_stream(stream),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follow_sends_an_entry_once_then_what_it_gained() {
        let mut sent = HashMap::new();
        let at = |out: &str, exit: Option<i32>| store::StoredLogEntry {
            entry_id: 3,
            entry: crate::protocol::ExecutionLogEntry {
                key: "step.0".into(),
                out: Some(out.into()),
                exit_code: exit,
                ..Default::default()
            },
        };
        let line =
            |s: Option<String>| -> Option<serde_json::Value> { s.map(|l| serde_json::from_str(&l).unwrap()) };
        let first = line(follow_line(&mut sent, at("abc", None))).unwrap();
        assert_eq!((first["out"].as_str(), first.get("append")), (Some("abc"), None));
        assert!(follow_line(&mut sent, at("abc", None)).is_none(), "nothing changed");
        let more = line(follow_line(&mut sent, at("abcdé", None))).unwrap();
        assert_eq!((more["out"].as_str(), more["append"].as_bool()), (Some("dé"), Some(true)));
        let ended = line(follow_line(&mut sent, at("abcdé", Some(0)))).unwrap();
        assert_eq!((ended["out"].as_str(), ended["exitCode"].as_i64()), (Some(""), Some(0)));
        // A replacement that does not extend what was sent is sent whole.
        let replaced = line(follow_line(&mut sent, at("xbcdéf", Some(0)))).unwrap();
        assert_eq!((replaced["out"].as_str(), replaced.get("append")), (Some("xbcdéf"), None));
    }
}
