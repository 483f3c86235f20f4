//! Execution log entries as the contract streams them: add the entry, send updates while output
//! arrives, then a final update with `exitCode` and `durationMs`. Output is redacted on the raw
//! bytes (a secret split across reads or lines is still caught), then framed into `stdout: ` /
//! `stderr: ` lines.
//!
//! Every update carries the entry's whole output, as the contract says (Sourcegraph replaces the
//! stored entry with each update and ignores fields it does not know). Only a coordinator that
//! advertised the append extension at dequeue (`X-Executor-Extensions: log-append`, which only
//! `executor queue serve` sends) gets deltas (`"append": true`) instead; a refused update is an
//! error, never a hint to switch modes.
//!
//! Lines are kept whole up to [`MAX_LINE`] (100 MiB, the longest line Sourcegraph's executor
//! reads): Sourcegraph JSON-decodes each `stdout:` line of a batch job's `.post` entries, and one
//! line carries a step's whole result. A longer line is cut there, and a whole entry sent to a
//! replacing coordinator stops at [`ENTRY_CAP`]; either cap says so on a line of its own.
//!
//! What a big entry costs (the figures `scripts/bench-logs` measures):
//! - memory: each entry holds at most [`SPILL_AT`] (4 MiB) per buffer in memory (the unsent
//!   output, and one partial line per stream); past it the bytes go to an unlinked temporary
//!   file. Sending a whole entry reads it back for the request: about twice its size while the
//!   request is made.
//! - resends: after an update of a whole entry the next waits [`resend_interval`] of what it sent:
//!   one second per MiB (at least [`UPDATE_INTERVAL`], at most [`MAX_UPDATE_INTERVAL`]), so a
//!   20 MiB entry printed at once is sent twice (while it runs and at its end), and one growing
//!   steadily to 10 MiB over 10 s is sent at 1, 2, 4 and 8 s and at its end (25 MiB; the old
//!   8 MiB cap cost 52 MiB and lost the rest). Appends send each byte once.
//! - the producer waits (back-pressure) only for appends, when [`PENDING_CAP`] is pending.

mod spool;

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use chrono::Utc;

use crate::api::{ApiError, Client, JobAuth};
use crate::base::proc::{OutputSink, Stream};
use crate::base::redact::{Redactor, StreamRedactor};
use crate::protocol::ExecutionLogEntry;
use spool::Spool;

/// How often a running entry is updated, at least.
pub(crate) const UPDATE_INTERVAL: Duration = Duration::from_secs(1);
/// How seldom a running entry is resent whole, at most.
pub(crate) const MAX_UPDATE_INTERVAL: Duration = Duration::from_secs(30);
/// The bytes per second a whole-entry resend may average: a bigger entry waits longer.
pub(crate) const RESEND_BYTES_PER_SECOND: usize = 1 << 20;
/// Pending output above which the producer flushes an appending entry (and so waits).
pub(crate) const PENDING_CAP: usize = 4 << 20;
/// Longest line kept whole: Sourcegraph's executor reads lines of up to 100 MiB.
pub(crate) const MAX_LINE: usize = 100 << 20;
/// Most output one entry sends a replacing coordinator (a 100 MiB line and room around it).
pub(crate) const ENTRY_CAP: usize = 128 << 20;
/// Bytes of one buffer kept in memory; past it they go to disk.
pub(crate) const SPILL_AT: usize = 4 << 20;

/// The caps of a logger's entries ([`JobLogger::with_limits`]; the constants above by default).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogLimits {
    pub max_line: usize,
    pub entry_cap: usize,
    pub spill_at: usize,
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits { max_line: MAX_LINE, entry_cap: ENTRY_CAP, spill_at: SPILL_AT }
    }
}

/// How long a running entry waits for its next update after one that sent `len` bytes.
pub(crate) fn resend_interval(len: usize) -> Duration {
    let secs = len / RESEND_BYTES_PER_SECOND;
    Duration::from_secs(secs as u64).clamp(UPDATE_INTERVAL, MAX_UPDATE_INTERVAL)
}

/// `n` bytes as people read them in a marker line.
fn size(n: usize) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} bytes"),
    }
}

/// Where log entries go.
pub trait LogTransport: Send + Sync {
    fn add(&self, entry: &ExecutionLogEntry) -> Result<i64, ApiError>;
    fn update(&self, id: i64, entry: &ExecutionLogEntry, append: bool) -> Result<(), ApiError>;
}

/// The coordinator, with one job's credentials.
pub(crate) struct CoordinatorLogs {
    pub client: Client,
    pub job: JobAuth,
}

impl LogTransport for CoordinatorLogs {
    fn add(&self, entry: &ExecutionLogEntry) -> Result<i64, ApiError> {
        let id = self.client.add_log_entry(&self.job, entry)?;
        count_sent(entry);
        Ok(id)
    }
    fn update(&self, id: i64, entry: &ExecutionLogEntry, append: bool) -> Result<(), ApiError> {
        self.client.update_log_entry(&self.job, id, entry, append)?;
        count_sent(entry);
        Ok(())
    }
}

/// Adds the output bytes of an entry the coordinator accepted to the log-bytes metric.
fn count_sent(entry: &ExecutionLogEntry) {
    let n = entry.out.as_ref().map_or(0, String::len);
    crate::api::metrics::registry().add(crate::api::metrics::LOG_BYTES, &[], n as f64);
}

/// Called with each entry's key when it starts.
pub(crate) type EntryHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Creates the log entries of one job.
#[derive(Clone)]
pub struct JobLogger {
    transport: Arc<dyn LogTransport>,
    redactor: Redactor,
    /// Whether the coordinator advertised the append extension.
    append: bool,
    limits: LogLimits,
    /// Called with each entry's key when it starts (the loop's progress view).
    on_entry: Option<EntryHook>,
    /// Keeps the coordinator's order of the entries the order they were made in.
    order: Arc<AddOrder>,
}

/// Entries are added to the coordinator in the background (the command an entry is for starts
/// at once instead of after a round trip), one after the other in the order they were made,
/// each by its own entry's updater thread when its turn comes.
#[derive(Default)]
struct AddOrder {
    /// Tickets issued, and the ticket whose turn it is.
    issued: Mutex<(u64, u64)>,
    turn: Condvar,
}

impl AddOrder {
    fn ticket(&self) -> u64 {
        let mut g = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        g.0 += 1;
        g.0 - 1
    }

    fn wait_turn(&self, ticket: u64) {
        let g = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        let _g = self.turn.wait_while(g, |g| g.1 < ticket).unwrap_or_else(|p| p.into_inner());
    }

    fn done(&self, ticket: u64) {
        let mut g = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        g.1 = g.1.max(ticket + 1);
        self.turn.notify_all();
    }
}

impl JobLogger {
    /// A logger sending full entries on every update, or deltas where `append` says the
    /// coordinator advertised the extension.
    pub fn new(transport: Arc<dyn LogTransport>, redactor: Redactor, append: bool) -> Self {
        JobLogger {
            transport,
            redactor,
            append,
            limits: LogLimits::default(),
            on_entry: None,
            order: Arc::default(),
        }
    }

    pub fn on_entry(mut self, f: EntryHook) -> Self {
        self.on_entry = Some(f);
        self
    }

    /// Other caps than the contract's (tests use small ones).
    #[cfg(test)]
    pub(crate) fn with_limits(mut self, limits: LogLimits) -> Self {
        self.limits = limits;
        self
    }

    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }

    /// Adds an entry; `command` is redacted here (`None` for `setup.fs.*`-style entries). The
    /// coordinator gets it in the background, in order; a failure to add it is the entry's
    /// failure, reported by [`LogEntry::finish`].
    pub fn entry(&self, key: &str, command: Option<Vec<String>>) -> Result<LogEntry> {
        if let Some(f) = &self.on_entry {
            f(key);
        }
        let command = command.map(|c| c.iter().map(|a| self.redactor.redact_str(a)).collect());
        let head =
            ExecutionLogEntry { key: key.to_string(), command, start_time: Utc::now(), ..Default::default() };
        let ticket = self.order.ticket();
        let l = self.limits;
        let state = Arc::new(Shared {
            state: Mutex::new(State {
                head,
                id: None,
                add_error: None,
                out: Lines {
                    text: Spool::new(l.spill_at),
                    emitted: 0,
                    cap: (!self.append).then_some(l.entry_cap),
                    capped: false,
                },
                sent_len: 0,
                last_sent: None,
                stdout: Framer::new(self.redactor.stream(), "stdout: ", l),
                stderr: Framer::new(self.redactor.stream(), "stderr: ", l),
                last_error: None,
                closed: false,
            }),
            wake: Condvar::new(),
        });
        let ticker = {
            let state = state.clone();
            let transport = self.transport.clone();
            let append = self.append;
            let order = self.order.clone();
            let spawned = std::thread::Builder::new().name(format!("log-{key}")).spawn(move || {
                add(&state, &*transport, &order, ticket);
                ticker(&state, &*transport, append)
            });
            match spawned {
                Ok(t) => t,
                Err(e) => {
                    // Its turn must still pass, or every later entry would wait for it.
                    self.order.done(ticket);
                    return Err(anyhow!("starting the log updater of {key}: {e}"));
                }
            }
        };
        Ok(LogEntry {
            shared: state,
            transport: self.transport.clone(),
            append: self.append,
            started: Instant::now(),
            ticker: Some(ticker),
        })
    }
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

struct State {
    head: ExecutionLogEntry,
    /// The coordinator's id of the entry, once added.
    id: Option<i64>,
    /// Why the entry could not be added.
    add_error: Option<String>,
    /// Framed, redacted output: with appends what is not sent yet, otherwise all of it.
    out: Lines,
    /// Without appends: how much of `out` the coordinator has, and when it got it.
    sent_len: usize,
    last_sent: Option<Instant>,
    stdout: Framer,
    stderr: Framer,
    last_error: Option<String>,
    closed: bool,
}

/// Framed lines of both streams, in the order they ended, under the entry's cap.
struct Lines {
    text: Spool,
    /// Bytes framed so far (sent or not).
    emitted: usize,
    /// The entry's cap (replacing coordinators only: an append sends each byte once).
    cap: Option<usize>,
    /// The cap was reached: the marker is written and the rest is not kept.
    capped: bool,
}

impl Lines {
    /// One line: `prefix`, the held-back `partial` (emptied), `tail`, a newline.
    fn line(&mut self, prefix: &str, partial: &mut Spool, tail: &[u8]) {
        let n = prefix.len() + partial.len() + tail.len() + 1;
        if let Some(cap) = self.cap {
            if self.capped {
                partial.clear();
                return;
            }
            if self.emitted + n + ENTRY_CAPPED_ROOM > cap {
                self.capped = true;
                partial.clear();
                let marker = format!(
                    "stderr: [executor: output truncated here: the entry reached its cap of {}; \
                     the rest of the step's output is not kept]\n",
                    size(cap)
                );
                self.emitted += marker.len();
                self.text.push(marker.as_bytes());
                return;
            }
        }
        self.text.push(prefix.as_bytes());
        self.text.append(partial);
        self.text.push(tail);
        self.text.push(b"\n");
        self.emitted += n;
    }

    /// A line of the executor's own, past the cap too (it is short).
    fn note(&mut self, text: &str) {
        self.emitted += text.len();
        self.text.push(text.as_bytes());
    }
}

/// Room an entry keeps under its cap for the marker that says it was reached.
const ENTRY_CAPPED_ROOM: usize = 256;

/// Redacts one stream and frames it into prefixed lines of at most `max_line` bytes.
struct Framer {
    redactor: StreamRedactor,
    prefix: &'static str,
    /// The line so far (at most `max_line` bytes).
    partial: Spool,
    max_line: usize,
}

impl Framer {
    fn new(redactor: StreamRedactor, prefix: &'static str, l: LogLimits) -> Self {
        Framer { redactor, prefix, partial: Spool::new(l.spill_at), max_line: l.max_line.max(1) }
    }

    fn push(&mut self, data: &[u8], out: &mut Lines) {
        let clean = self.redactor.push(data);
        self.frame(&clean, out);
    }

    fn frame(&mut self, mut clean: &[u8], out: &mut Lines) {
        while !clean.is_empty() {
            let room = self.max_line - self.partial.len();
            // A newline within `room + 1` bytes ends a line that fits.
            let look = clean.len().min(room + 1);
            if let Some(nl) = clean[..look].iter().position(|&b| b == b'\n') {
                out.line(self.prefix, &mut self.partial, &clean[..nl]);
                clean = &clean[nl + 1..];
            } else if clean.len() <= room {
                self.partial.push(clean);
                return;
            } else {
                // The line goes past `max_line`: cut there, say so, and go on with the rest.
                self.partial.push(&clean[..room]);
                out.line(self.prefix, &mut self.partial, b"");
                if !out.capped {
                    out.note(&format!(
                        "stderr: [executor: the {} line above was longer than {} and is cut there; \
                         the rest of it follows as lines of its own]\n",
                        self.prefix.trim_end_matches(": "),
                        size(self.max_line)
                    ));
                }
                clean = &clean[room..];
            }
        }
    }

    fn finish(&mut self, out: &mut Lines) {
        let rest = self.redactor.finish();
        self.frame(&rest, out);
        if !self.partial.is_empty() {
            out.line(self.prefix, &mut self.partial, b"");
        }
    }
}

/// The bytes of a request's `out`: framed output is almost always UTF-8, and then the bytes
/// become the string without a copy.
fn text_of(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Sends what is pending (and, when `last`, the exit code and duration). Without appends the
/// whole entry is sent, and a running one only once per [`resend_interval`] of its size.
fn flush(st: &mut State, transport: &dyn LogTransport, append: bool, last: Option<(i32, i64)>) -> Result<()> {
    let mut entry = st.head.clone();
    if let Some((code, ms)) = last {
        entry.exit_code = Some(code);
        entry.duration_ms = Some(ms);
    }
    if append {
        if st.out.text.is_empty() && last.is_none() {
            return Ok(());
        }
        let Some(id) = st.id else { return Ok(()) };
        let delta = st
            .out
            .text
            .read_all()
            .map_err(|e| anyhow!("reading back the output of log entry {}: {e}", st.head.key))?;
        st.out.text.clear();
        // In requests of at most PENDING_CAP (a 100 MiB line must fit the coordinator's body
        // limit): appended, the pieces make the line whole again. Cut between characters, and
        // the exit code goes with the last piece only.
        let mut rest = &delta[..];
        loop {
            let mut n = rest.len().min(PENDING_CAP);
            while n > 0 && n < rest.len() && (rest[n] & 0xC0) == 0x80 {
                n -= 1;
            }
            let piece = &rest[..n];
            let mut e = entry.clone();
            if n < rest.len() {
                e.exit_code = None;
                e.duration_ms = None;
            }
            e.out = if piece.is_empty() { None } else { Some(text_of(piece.to_vec())) };
            if let Err(err) = transport.update(id, &e, true) {
                // Keep what was not sent for the next try (nothing was framed since: the lock
                // is held).
                st.out.text.push(rest);
                return Err(anyhow!("updating the log entry {}: {err}", st.head.key));
            }
            rest = &rest[n..];
            if rest.is_empty() {
                return Ok(());
            }
        }
    }
    let len = st.out.text.len();
    if last.is_none() {
        // Timed by what the last update sent: a steadily growing entry still gets updates, at
        // 1, 2, 4, 8... s, each wait as long in seconds as the last update was in MiB.
        let due = st.last_sent.is_none_or(|t| t.elapsed() >= resend_interval(st.sent_len));
        if len == st.sent_len || !due {
            return Ok(());
        }
    }
    let Some(id) = st.id else { return Ok(()) };
    let text = st
        .out
        .text
        .read_all()
        .map_err(|e| anyhow!("reading back the output of log entry {}: {e}", st.head.key))?;
    entry.out = if text.is_empty() { None } else { Some(text_of(text)) };
    transport
        .update(id, &entry, false)
        .map_err(|e| anyhow!("updating the log entry {}: {e}", st.head.key))?;
    st.sent_len = len;
    st.last_sent = Some(Instant::now());
    Ok(())
}

/// Adds the entry to the coordinator when its turn comes; wakes whoever waits for its id.
fn add(shared: &Shared, transport: &dyn LogTransport, order: &AddOrder, ticket: u64) {
    order.wait_turn(ticket);
    let head = shared.state.lock().unwrap_or_else(|p| p.into_inner()).head.clone();
    let res = transport.add(&head);
    order.done(ticket);
    let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
    match res {
        Ok(id) => st.id = Some(id),
        Err(e) => st.add_error = Some(format!("adding the log entry {}: {e}", head.key)),
    }
    shared.wake.notify_all();
}

fn ticker(shared: &Shared, transport: &dyn LogTransport, append: bool) {
    let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        // Checked before waiting too: `close` may have run before this thread first got the lock.
        if st.closed {
            return;
        }
        st = shared
            .wake
            .wait_timeout_while(st, UPDATE_INTERVAL, |s| !s.closed)
            .unwrap_or_else(|p| p.into_inner())
            .0;
        if st.closed {
            return;
        }
        if let Err(e) = flush(&mut st, transport, append, None) {
            // A failed non-final update is only a warning; the final one decides.
            st.last_error = Some(format!("{e:#}"));
        }
    }
}

/// One open log entry: an [`OutputSink`] for a step, or a place for setup lines.
pub struct LogEntry {
    shared: Arc<Shared>,
    transport: Arc<dyn LogTransport>,
    append: bool,
    started: Instant,
    ticker: Option<std::thread::JoinHandle<()>>,
}

impl LogEntry {
    /// Writes one line of the executor's own (it is redacted too).
    pub fn line(&mut self, text: &str) {
        let mut t = text.to_string();
        t.push('\n');
        self.output(Stream::Stdout, t.as_bytes());
    }

    /// Ends the entry: the rest of the output, then `exitCode` and `durationMs`.
    pub fn finish(mut self, exit_code: i32) -> Result<()> {
        self.close(exit_code)
    }

    fn close(&mut self, exit_code: i32) -> Result<()> {
        let ms = self.started.elapsed().as_millis() as i64;
        let res = {
            let st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
            // The entry's own updater adds it first.
            let mut st = self
                .shared
                .wake
                .wait_while(st, |s| s.id.is_none() && s.add_error.is_none())
                .unwrap_or_else(|p| p.into_inner());
            if st.closed {
                return Ok(());
            }
            crate::api::metrics::command_done(&st.head.key, exit_code, ms);
            if let Some(e) = st.add_error.clone() {
                st.closed = true;
                self.shared.wake.notify_all();
                drop(st);
                if let Some(t) = self.ticker.take() {
                    let _ = t.join();
                }
                return Err(anyhow!(e));
            }
            st.closed = true;
            let State { stdout, stderr, out, .. } = &mut *st;
            stdout.finish(out);
            stderr.finish(out);
            let mut res = flush(&mut st, &*self.transport, self.append, Some((exit_code, ms)));
            if res.is_err() {
                // One retry of the final update after a pause: it decides whether the job's log is whole.
                std::thread::sleep(Duration::from_millis(200));
                res = flush(&mut st, &*self.transport, self.append, Some((exit_code, ms)));
            }
            self.shared.wake.notify_all();
            res
        };
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
        res
    }
}

impl OutputSink for LogEntry {
    /// A line of its own among the step's, as the entry's other notes are.
    fn note(&mut self, line: &str) {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        st.out.note(&format!("stderr: [executor: {line}]\n"));
    }

    fn output(&mut self, stream: Stream, data: &[u8]) {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let State { stdout, stderr, out, .. } = &mut *st;
        match stream {
            Stream::Stdout => stdout.push(data, out),
            Stream::Stderr => stderr.push(data, out),
        }
        // A replacing coordinator's entry waits on disk for its next resend; appends are sent
        // as they come, the producer waiting when too much is pending.
        if !self.append || st.out.text.len() < PENDING_CAP {
            return;
        }
        // Back-pressure waits for the entry to exist first.
        st = self
            .shared
            .wake
            .wait_while(st, |s| s.id.is_none() && s.add_error.is_none())
            .unwrap_or_else(|p| p.into_inner());
        if st.out.text.len() < PENDING_CAP {
            return;
        }
        // The step waits while its output goes out (nowhere, when the entry could not be added).
        let sent = match st.add_error.clone() {
            Some(e) => Err(anyhow!(e)),
            None => flush(&mut st, &*self.transport, self.append, None),
        };
        if let Err(e) = sent {
            st.last_error = Some(format!("{e:#}"));
            if st.out.text.len() >= 4 * PENDING_CAP {
                // The coordinator is not taking output: keep the newest lines, say so.
                if let Ok(all) = st.out.text.read_all() {
                    let from = all.len() - PENDING_CAP;
                    let from = all[from..].iter().position(|&b| b == b'\n').map_or(from, |i| from + i + 1);
                    st.out.text.clear();
                    st.out.note(
                        "stderr: [executor: output dropped here while the coordinator was unreachable]\n",
                    );
                    st.out.text.push(&all[from..]);
                }
            }
        }
    }
}

impl Drop for LogEntry {
    fn drop(&mut self) {
        if self.ticker.is_some() {
            // An entry dropped without finish (an error path) still gets its final update.
            let _ = self.close(-1);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Records entries in memory, as a coordinator would store them: with `sourcegraph`, as
    /// Sourcegraph does (an update replaces the entry; `append` is a field it does not know).
    #[derive(Default)]
    pub(crate) struct MemoryLogs {
        pub entries: Mutex<Vec<ExecutionLogEntry>>,
        pub sourcegraph: bool,
        pub updates: Mutex<usize>,
        pub bytes_sent: Mutex<usize>,
    }

    impl LogTransport for MemoryLogs {
        fn add(&self, entry: &ExecutionLogEntry) -> Result<i64, ApiError> {
            let mut e = self.entries.lock().unwrap();
            e.push(entry.clone());
            Ok(e.len() as i64)
        }
        fn update(&self, id: i64, entry: &ExecutionLogEntry, append: bool) -> Result<(), ApiError> {
            *self.updates.lock().unwrap() += 1;
            *self.bytes_sent.lock().unwrap() += entry.out.as_ref().map_or(0, String::len);
            let append = append && !self.sourcegraph;
            let mut e = self.entries.lock().unwrap();
            let slot = &mut e[id as usize - 1];
            let old = slot.out.take().unwrap_or_default();
            let mut next = entry.clone();
            if append {
                next.out = Some(old + entry.out.as_deref().unwrap_or(""));
            }
            *slot = next;
            Ok(())
        }
    }

    fn logger(t: Arc<MemoryLogs>) -> JobLogger {
        let append = !t.sourcegraph;
        let mut m = BTreeMap::new();
        m.insert("hunter2hunter2".to_string(), "PASSWORD_REMOVED".to_string());
        JobLogger::new(t, Redactor::for_job("the-shared-secret-0123456789", &m), append)
    }

    #[test]
    fn frames_redacts_and_finishes() {
        for sourcegraph in [false, true] {
            let t = Arc::new(MemoryLogs { sourcegraph, ..Default::default() });
            let l = logger(t.clone());
            let mut e = l
                .entry("step.docker.0", Some(vec!["sh".into(), "-c".into(), "echo hunter2hunter2".into()]))
                .unwrap();
            e.output(Stream::Stdout, b"hello hunt");
            e.output(Stream::Stderr, b"warn\n");
            e.output(Stream::Stdout, b"er2hunter2 world\nthe-shared-");
            e.output(Stream::Stdout, b"secret-0123456789\npartial");
            e.finish(3).unwrap();
            let entries = t.entries.lock().unwrap();
            let got = &entries[0];
            assert_eq!(got.command.as_ref().unwrap()[2], "echo PASSWORD_REMOVED");
            assert_eq!(
                got.out.as_deref().unwrap(),
                "stderr: warn\nstdout: hello PASSWORD_REMOVED world\nstdout: SECRET_REMOVED\nstdout: partial\n",
                "sourcegraph={sourcegraph}"
            );
            assert_eq!(got.exit_code, Some(3));
            assert!(got.duration_ms.is_some());
        }
    }

    #[test]
    fn big_output_is_flushed_in_bounded_chunks() {
        let t = Arc::new(MemoryLogs::default());
        let l = logger(t.clone());
        let mut e = l.entry("step.docker.0", None).unwrap();
        let line = vec![b'x'; 999];
        let mut chunk = Vec::new();
        for _ in 0..64 {
            chunk.extend_from_slice(&line);
            chunk.push(b'\n');
        }
        for _ in 0..300 {
            e.output(Stream::Stdout, &chunk);
        }
        {
            let st = e.shared.state.lock().unwrap();
            assert!(st.out.text.len() < PENDING_CAP + chunk.len() + 64 * 8);
        }
        e.finish(0).unwrap();
        let entries = t.entries.lock().unwrap();
        assert_eq!(entries[0].out.as_ref().unwrap().len(), 300 * 64 * (999 + 1 + 8));
        assert!(*t.updates.lock().unwrap() >= 4);
    }

    /// Appends carry a line longer than one request in several: the coordinator's body limit
    /// holds, and the appended pieces make the line whole, a character cut never.
    #[test]
    fn appends_carry_a_long_line_in_pieces() {
        let t = Arc::new(MemoryLogs::default());
        let l = logger(t.clone());
        let mut e = l.entry("k", None).unwrap();
        let line = "é".repeat(5 << 20);
        e.output(Stream::Stdout, line.as_bytes());
        e.output(Stream::Stdout, b"\n");
        e.finish(0).unwrap();
        let out = t.entries.lock().unwrap()[0].out.clone().unwrap();
        assert_eq!(out, format!("stdout: {line}\n"));
        assert!(*t.updates.lock().unwrap() >= 3, "10 MiB in pieces of at most 4 MiB");
        assert_eq!(t.entries.lock().unwrap()[0].exit_code, Some(0));
    }

    #[test]
    fn updates_arrive_while_the_step_runs() {
        let t = Arc::new(MemoryLogs::default());
        let l = logger(t.clone());
        let mut e = l.entry("step.docker.0", None).unwrap();
        e.output(Stream::Stdout, b"early\n");
        std::thread::sleep(UPDATE_INTERVAL + Duration::from_millis(300));
        assert_eq!(t.entries.lock().unwrap()[0].out.as_deref(), Some("stdout: early\n"));
        e.finish(0).unwrap();
    }

    fn small(t: Arc<MemoryLogs>, max_line: usize, entry_cap: usize) -> JobLogger {
        logger(t).with_limits(LogLimits { max_line, entry_cap, spill_at: 1024 })
    }

    #[test]
    fn full_replacement_is_capped_with_a_marker_line() {
        let t = Arc::new(MemoryLogs { sourcegraph: true, ..Default::default() });
        let l = small(t.clone(), 1 << 20, 64 << 10);
        let mut e = l.entry("k", None).unwrap();
        for i in 0..5000 {
            e.output(Stream::Stdout, format!("line {i:04}\n").as_bytes());
        }
        e.finish(0).unwrap();
        let out = t.entries.lock().unwrap()[0].out.clone().unwrap();
        assert!(out.len() <= 64 << 10, "{}", out.len());
        let lines: Vec<&str> = out.lines().collect();
        let last = lines.last().unwrap();
        assert!(
            last.starts_with("stderr: [executor: output truncated here: the entry reached its cap of 64 KiB"),
            "{last}"
        );
        assert!(
            lines[..lines.len() - 1].iter().enumerate().all(|(i, l)| *l == format!("stdout: line {i:04}")),
            "whole lines before the marker"
        );
    }

    /// The line framing at its real size: a 200 KB JSON line (a batch step's result) is one
    /// line, over more reads than any old cap, and through the spill file.
    #[test]
    fn a_200_kb_line_stays_one_line() {
        for sourcegraph in [true, false] {
            let t = Arc::new(MemoryLogs { sourcegraph, ..Default::default() });
            let l = logger(t.clone()).with_limits(LogLimits { spill_at: 16 << 10, ..LogLimits::default() });
            let mut e = l.entry("step.docker.step.0.post", None).unwrap();
            let diff = "a".repeat(200_000);
            let json = format!(
                "{{\"operation\":\"CACHE_AFTER_STEP_RESULT\",\"metadata\":{{\"diff\":\"{diff}\"}}}}\n"
            );
            e.output(Stream::Stderr, b"before\n");
            for chunk in json.as_bytes().chunks(4096) {
                e.output(Stream::Stdout, chunk);
                e.output(Stream::Stderr, b"progress\n");
            }
            e.finish(0).unwrap();
            let out = t.entries.lock().unwrap()[0].out.clone().unwrap();
            let stdout: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("stdout: ")).collect();
            assert_eq!(stdout.len(), 1, "sourcegraph={sourcegraph}");
            let v: serde_json::Value = serde_json::from_str(stdout[0]).unwrap();
            assert_eq!(v["metadata"]["diff"].as_str().unwrap().len(), 200_000);
            assert_eq!(out.lines().filter(|l| *l == "stderr: progress").count(), json.len().div_ceil(4096));
        }
    }

    /// The cut at the line cap, exactly: a line of `max_line` bytes passes whole, one byte more
    /// is cut with a marker line of its own and goes on as the next line.
    #[test]
    fn a_line_past_the_cap_is_cut_with_a_marker() {
        let t = Arc::new(MemoryLogs { sourcegraph: true, ..Default::default() });
        let l = small(t.clone(), 10, 1 << 20);
        let mut e = l.entry("k", None).unwrap();
        e.output(Stream::Stdout, b"0123456789\n");
        e.output(Stream::Stdout, b"01234");
        e.output(Stream::Stdout, b"56789");
        e.output(Stream::Stdout, b"\nabcdefghijKLM\n");
        e.output(Stream::Stderr, b"xxxxxxxxxxxxxxxxxxxxxx");
        e.finish(0).unwrap();
        let out = t.entries.lock().unwrap()[0].out.clone().unwrap();
        let marker = |s: &str| {
            format!("stderr: [executor: the {s} line above was longer than 10 bytes and is cut there; the rest of it follows as lines of its own]")
        };
        let want = [
            "stdout: 0123456789".to_string(),
            "stdout: 0123456789".into(),
            "stdout: abcdefghij".into(),
            marker("stdout"),
            "stdout: KLM".into(),
            "stderr: xxxxxxxxxx".into(),
            marker("stderr"),
            "stderr: xxxxxxxxxx".into(),
            marker("stderr"),
            "stderr: xx".into(),
        ];
        assert_eq!(out.lines().collect::<Vec<_>>(), want);
    }

    #[test]
    fn resends_back_off_with_the_entry_size() {
        assert_eq!(resend_interval(0), UPDATE_INTERVAL);
        assert_eq!(resend_interval(1 << 20), UPDATE_INTERVAL);
        assert_eq!(resend_interval(20 << 20), Duration::from_secs(20));
        assert_eq!(resend_interval(1 << 30), MAX_UPDATE_INTERVAL);
    }

    /// The data loss Sourcegraph's semantics caused when updates carried deltas: every line a
    /// step prints over several update intervals must be in the stored entry.
    #[test]
    fn a_replacing_coordinator_keeps_every_line() {
        for sourcegraph in [true, false] {
            let t = Arc::new(MemoryLogs { sourcegraph, ..Default::default() });
            let l = logger(t.clone());
            let mut e = l.entry("step.docker.0", None).unwrap();
            for i in 0..300 {
                e.output(Stream::Stdout, format!("line {i}\n").as_bytes());
                if i % 100 == 99 {
                    std::thread::sleep(UPDATE_INTERVAL + Duration::from_millis(200));
                }
            }
            e.finish(0).unwrap();
            let out = t.entries.lock().unwrap()[0].out.clone().unwrap_or_default();
            let lines: Vec<&str> = out.lines().collect();
            assert_eq!(lines.len(), 300, "sourcegraph={sourcegraph}: {} lines kept", lines.len());
            assert!(lines.iter().enumerate().all(|(i, l)| *l == format!("stdout: line {i}")));
            assert!(*t.updates.lock().unwrap() >= 3, "updates arrived while the step ran");
        }
    }

    /// What full resends cost: a step printing 10 MiB in one go is sent whole once while it
    /// runs (the next resend waits 10 s) and once at its end, and the entry holds no more than
    /// its spill threshold in memory meanwhile.
    #[test]
    fn full_resends_are_few_and_spilled() {
        let t = Arc::new(MemoryLogs { sourcegraph: true, ..Default::default() });
        let l = logger(t.clone());
        let mut e = l.entry("k", None).unwrap();
        let line = [vec![b'z'; 1023], vec![b'\n']].concat();
        // One write: the updater cannot send half of it.
        e.output(Stream::Stdout, &line.repeat(10 << 10));
        std::thread::sleep(UPDATE_INTERVAL + Duration::from_millis(500));
        {
            let st = e.shared.state.lock().unwrap();
            assert!(st.out.text.spilled(), "10 MiB is on disk");
            assert_eq!(st.sent_len, st.out.text.len(), "sent once while it runs");
        }
        e.output(Stream::Stdout, b"one more\n");
        std::thread::sleep(UPDATE_INTERVAL + Duration::from_millis(500));
        e.finish(0).unwrap();
        let updates = *t.updates.lock().unwrap();
        assert_eq!(updates, 2, "one resend while running, one final");
        let out = t.entries.lock().unwrap()[0].out.clone().unwrap();
        assert_eq!(out.len(), (10 << 20) + (10 << 10) * 8 + "stdout: one more\n".len());
    }

    /// An entry is added in the background (its command does not wait for the round trip), and
    /// the coordinator still gets the entries in the order they were made, even when an earlier
    /// one's add is the slower; a failed add is the entry's failure at its end.
    #[test]
    fn entries_are_added_in_the_background_in_order() {
        struct Slow(Arc<MemoryLogs>);
        impl LogTransport for Slow {
            fn add(&self, entry: &ExecutionLogEntry) -> Result<i64, ApiError> {
                match entry.key.as_str() {
                    "first" => std::thread::sleep(Duration::from_millis(300)),
                    "refused" => {
                        return Err(ApiError::Transport { route: "add".into(), message: "refused".into() })
                    }
                    _ => {}
                }
                self.0.add(entry)
            }
            fn update(&self, id: i64, entry: &ExecutionLogEntry, append: bool) -> Result<(), ApiError> {
                self.0.update(id, entry, append)
            }
        }
        let mem = Arc::new(MemoryLogs::default());
        let log = JobLogger::new(
            Arc::new(Slow(mem.clone())),
            Redactor::for_job("s".repeat(24).as_str(), &BTreeMap::new()),
            true,
        );
        let t = Instant::now();
        let mut first = log.entry("first", None).unwrap();
        let mut second = log.entry("second", None).unwrap();
        assert!(t.elapsed() < Duration::from_millis(200), "entry() waited for the add: {:?}", t.elapsed());
        second.line("two");
        first.line("one");
        second.finish(0).unwrap();
        first.finish(0).unwrap();
        let keys: Vec<String> = mem.entries.lock().unwrap().iter().map(|e| e.key.clone()).collect();
        assert_eq!(keys, ["first", "second"]);
        let out: Vec<String> =
            mem.entries.lock().unwrap().iter().map(|e| e.out.clone().unwrap_or_default()).collect();
        assert_eq!(out, ["stdout: one\n", "stdout: two\n"]);
        let refused = log.entry("refused", None).unwrap();
        let err = refused.finish(1).unwrap_err();
        assert!(format!("{err:#}").contains("adding the log entry refused"), "{err:#}");
        log.entry("after", None).unwrap().finish(0).unwrap();
        assert_eq!(
            mem.entries.lock().unwrap().last().unwrap().key,
            "after",
            "a refused add holds nothing up"
        );
    }
}
