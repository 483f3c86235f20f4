//! The console's live log: `GET /admin/jobs/{id}/events`, the job's log stream (`follow.rs`)
//! encoded as server-sent events. `entry` carries an entry's new output as styled segments
//! (whole, with `reset`, the first time and after a replacement); `state` the job's state (the
//! stream ends after a final one).

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::time::Duration;

use super::ansi::{Ansi, Segment};
use super::render::{duration_text, exit_text};
use super::{ConsoleSession, PageError, PageResult};
use crate::server::http::follow::{log_stream, LogUpdate};
use crate::server::http::{job_id_param, Shared};
use crate::server::store::JobState;

/// What the page was sent of one entry: the fields it shows, and the styles open at the end of
/// the output (an escape sequence may span two appends).
struct Shown {
    fields: (String, Option<i32>, Option<i64>),
    ansi: Ansi,
}

/// The SSE encoder: keeps, per entry, what the page shows.
#[derive(Default)]
struct SseEncoder {
    shown: HashMap<i64, Shown>,
}

fn sse(event: &str, data: &serde_json::Value) -> bytes::Bytes {
    bytes::Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

fn segments_json(segs: Vec<Segment>) -> serde_json::Value {
    serde_json::Value::Array(segs.into_iter().map(|s| serde_json::json!([s.class, s.text])).collect())
}

impl SseEncoder {
    /// The event for an update, if it changes what the page shows.
    fn encode(&mut self, update: LogUpdate) -> Option<bytes::Bytes> {
        let (reset, e) = match update {
            LogUpdate::Whole(e) => (true, e),
            LogUpdate::Gained(e) => (false, e),
            LogUpdate::State(state) => {
                let name = state.map(|s| s.as_str()).unwrap_or("gone");
                let finished = state.map(JobState::is_final).unwrap_or(true);
                return Some(sse("state", &serde_json::json!({"state": name, "final": finished})));
            }
        };
        let out = e.entry.out.as_deref().unwrap_or_default();
        let fields = (e.entry.key.clone(), e.entry.exit_code, e.entry.duration_ms);
        let segs = match self.shown.get_mut(&e.entry_id) {
            Some(s) if !reset => {
                // The stream reports changes the page does not show (the command, say).
                if out.is_empty() && s.fields == fields {
                    return None;
                }
                s.fields = fields;
                s.ansi.feed(out)
            }
            _ => {
                let mut ansi = Ansi::new();
                let segs = ansi.feed(out);
                self.shown.insert(e.entry_id, Shown { fields, ansi });
                segs
            }
        };
        Some(sse(
            "entry",
            &serde_json::json!({
                "entry": e.entry_id,
                "key": e.entry.key,
                "exit": exit_text(e.entry.exit_code),
                "duration": duration_text(e.entry.duration_ms),
                "reset": reset,
                "segments": segments_json(segs),
            }),
        ))
    }
}

/// `GET /admin/jobs/{id}/events`.
pub(in crate::server::http) async fn job_events(
    State(app): State<Shared>,
    _s: ConsoleSession,
    id: Result<Path<String>, PathRejection>,
) -> PageResult {
    let id = job_id_param(id).map_err(PageError::Api)?;
    let mut encoder = SseEncoder::default();
    // The live log gathers appends for a shorter pause than an API follow: a person watches it.
    let events = log_stream(app, id, true, Duration::from_millis(20))
        .filter_map(move |u| std::future::ready(u.map(|u| encoder.encode(u)).transpose()));
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"))],
        Body::from_stream(events),
    )
        .into_response();
    super::secure(&mut resp);
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::http::follow::LogDiff;
    use crate::server::store::StoredLogEntry;

    fn at(out: &str, exit: Option<i32>) -> StoredLogEntry {
        StoredLogEntry {
            entry_id: 2,
            entry: crate::protocol::ExecutionLogEntry {
                key: "k".into(),
                out: Some(out.into()),
                exit_code: exit,
                ..Default::default()
            },
        }
    }

    fn event(b: Option<bytes::Bytes>) -> (String, serde_json::Value) {
        let text = String::from_utf8(b.unwrap().to_vec()).unwrap();
        let (head, data) = text.split_once("\ndata: ").unwrap();
        assert!(data.ends_with("\n\n"), "{text:?}");
        (head.trim_start_matches("event: ").to_string(), serde_json::from_str(data.trim()).unwrap())
    }

    #[test]
    fn events_send_an_entry_whole_then_what_it_gained() {
        let (mut diff, mut enc) = (LogDiff::default(), SseEncoder::default());
        let mut send = |e: StoredLogEntry| diff.update(e).and_then(|u| enc.encode(u));
        let (name, first) = event(send(at("a\x1b[3", None)));
        assert_eq!(name, "entry");
        assert_eq!(
            (first["entry"].as_i64(), first["reset"].as_bool(), first["segments"].clone()),
            (Some(2), Some(true), serde_json::json!([["", "a"]]))
        );
        assert_eq!(first["exit"], "running");
        assert!(send(at("a\x1b[3", None)).is_none());
        // The escape sequence split between two appends styles the new text.
        let (_, more) = event(send(at("a\x1b[32mb", Some(0))));
        assert_eq!((more["reset"].as_bool(), more["exit"].as_str()), (Some(false), Some("exit 0")));
        assert_eq!(more["segments"], serde_json::json!([["fg-2", "b"]]));
        let replaced = event(send(at("z", Some(0)))).1;
        assert_eq!(
            (replaced["reset"].as_bool(), replaced["segments"].clone()),
            (Some(true), serde_json::json!([["", "z"]]))
        );
    }

    #[test]
    fn a_change_the_page_does_not_show_sends_nothing() {
        let (mut diff, mut enc) = (LogDiff::default(), SseEncoder::default());
        let e = at("x", None);
        assert!(diff.update(e.clone()).and_then(|u| enc.encode(u)).is_some());
        let mut other = e.clone();
        other.entry.command = Some(vec!["true".into()]);
        let update = diff.update(other).unwrap();
        assert!(matches!(update, LogUpdate::Gained(_)));
        assert!(enc.encode(update).is_none());
    }

    #[test]
    fn the_state_event_names_the_state_and_whether_it_is_final() {
        let mut enc = SseEncoder::default();
        let (name, data) = event(enc.encode(LogUpdate::State(Some(JobState::Processing))));
        assert_eq!(
            (name.as_str(), data),
            ("state", serde_json::json!({"state": "processing", "final": false}))
        );
        let (_, gone) = event(enc.encode(LogUpdate::State(None)));
        assert_eq!(gone, serde_json::json!({"state": "gone", "final": true}));
    }
}
