//! Execution log entries as the contract streams them: add the entry, send updates about once a
//! second while output arrives, then a final update with `exitCode` and `durationMs`. Output is
//! redacted on the raw bytes (a secret split across reads or lines is still caught), then framed
//! into `stdout: ` / `stderr: ` lines.
//!
//! Every update carries the entry's whole output, as the contract says (Sourcegraph replaces the
//! stored entry with each update and ignores fields it does not know), capped at
//! [`FULL_OUTPUT_CAP`]. Only a coordinator that advertised the append extension at dequeue
//! (`X-Executor-Extensions: log-append`, which only `executor queue serve` sends) gets deltas
//! (`"append": true`) instead; a refused update is an error, never a hint to switch modes.
//! Memory stays bounded however much a step prints: the producer waits for a flush when too
//! much is pending.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use chrono::Utc;

use crate::api::{ApiError, Client, JobAuth};
use crate::base::proc::{OutputSink, Stream};
use crate::base::redact::{Redactor, StreamRedactor};
use crate::protocol::ExecutionLogEntry;

/// How often a running entry is updated.
pub(crate) const UPDATE_INTERVAL: Duration = Duration::from_secs(1);
/// Pending output above which the producer flushes (and so waits for the coordinator).
pub(crate) const PENDING_CAP: usize = 4 << 20;
/// Longest partial line held back before it is sent as a line of its own.
pub(crate) const MAX_LINE: usize = 64 << 10;
/// Most output kept for full-replacement updates (coordinators without appends).
pub(crate) const FULL_OUTPUT_CAP: usize = 8 << 20;

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
        JobLogger { transport, redactor, append, on_entry: None, order: Arc::default() }
    }

    pub fn on_entry(mut self, f: EntryHook) -> Self {
        self.on_entry = Some(f);
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
        let state = Arc::new(Shared {
            state: Mutex::new(State {
                head,
                id: None,
                add_error: None,
                pending: Vec::new(),
                full: Vec::new(),
                truncated: false,
                stdout: Framer::new(self.redactor.stream(), "stdout: "),
                stderr: Framer::new(self.redactor.stream(), "stderr: "),
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
    /// Framed, redacted output not yet sent.
    pending: Vec<u8>,
    /// Everything sent so far, when updates carry the whole output (bounded).
    full: Vec<u8>,
    truncated: bool,
    stdout: Framer,
    stderr: Framer,
    last_error: Option<String>,
    closed: bool,
}

/// Redacts one stream and frames it into prefixed lines.
struct Framer {
    redactor: StreamRedactor,
    prefix: &'static str,
    partial: Vec<u8>,
}

impl Framer {
    fn new(redactor: StreamRedactor, prefix: &'static str) -> Self {
        Framer { redactor, prefix, partial: Vec::new() }
    }

    fn push(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let clean = self.redactor.push(data);
        self.frame(&clean, out);
    }

    fn frame(&mut self, mut clean: &[u8], out: &mut Vec<u8>) {
        while let Some(nl) = clean.iter().position(|&b| b == b'\n') {
            out.extend_from_slice(self.prefix.as_bytes());
            out.extend_from_slice(&self.partial);
            out.extend_from_slice(&clean[..=nl]);
            self.partial.clear();
            clean = &clean[nl + 1..];
        }
        self.partial.extend_from_slice(clean);
        if self.partial.len() >= MAX_LINE {
            out.extend_from_slice(self.prefix.as_bytes());
            out.append(&mut self.partial);
            out.push(b'\n');
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        let rest = self.redactor.finish();
        self.frame(&rest, out);
        if !self.partial.is_empty() {
            out.extend_from_slice(self.prefix.as_bytes());
            out.append(&mut self.partial);
            out.push(b'\n');
        }
    }
}

/// Sends what is pending (and, when `last`, the exit code and duration).
fn flush(st: &mut State, transport: &dyn LogTransport, append: bool, last: Option<(i32, i64)>) -> Result<()> {
    if st.pending.is_empty() && last.is_none() {
        return Ok(());
    }
    let mut entry = st.head.clone();
    if let Some((code, ms)) = last {
        entry.exit_code = Some(code);
        entry.duration_ms = Some(ms);
    }
    if append {
        // Framed output is almost always UTF-8: the bytes become the string without a copy.
        let delta = String::from_utf8(std::mem::take(&mut st.pending))
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        entry.out = if delta.is_empty() { None } else { Some(delta) };
        let Some(id) = st.id else { return Ok(()) };
        return match transport.update(id, &entry, true) {
            Ok(()) => Ok(()),
            Err(e) => {
                // Keep the delta for the next try.
                let mut rest = entry.out.take().map(String::into_bytes).unwrap_or_default();
                rest.extend_from_slice(&st.pending);
                st.pending = rest;
                Err(anyhow!("updating the log entry {}: {e}", st.head.key))
            }
        };
    }
    // The whole output so far, bounded; kept in `full` only once it was sent.
    let room = FULL_OUTPUT_CAP.saturating_sub(st.full.len());
    let take = st.pending.len().min(room);
    let mut out = Vec::with_capacity(st.full.len() + take + 64);
    out.extend_from_slice(&st.full);
    out.extend_from_slice(&st.pending[..take]);
    let truncated = st.truncated || take < st.pending.len();
    let mut text =
        String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    if truncated {
        text.push_str(TRUNCATED);
    }
    entry.out = if text.is_empty() { None } else { Some(text) };
    let Some(id) = st.id else { return Ok(()) };
    transport
        .update(id, &entry, false)
        .map_err(|e| anyhow!("updating the log entry {}: {e}", st.head.key))?;
    st.full.extend_from_slice(&st.pending[..take]);
    st.pending.clear();
    st.truncated = truncated;
    Ok(())
}

/// The line that ends a full output cut at [`FULL_OUTPUT_CAP`].
const TRUNCATED: &str = "stderr: [executor: output truncated here: more than 8 MiB]\n";

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
            let State { stdout, stderr, pending, .. } = &mut *st;
            stdout.finish(pending);
            stderr.finish(pending);
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
    fn output(&mut self, stream: Stream, data: &[u8]) {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let State { stdout, stderr, pending, .. } = &mut *st;
        match stream {
            Stream::Stdout => stdout.push(data, pending),
            Stream::Stderr => stderr.push(data, pending),
        }
        if st.pending.len() >= PENDING_CAP {
            // Back-pressure waits for the entry to exist first.
            st = self
                .shared
                .wake
                .wait_while(st, |s| s.id.is_none() && s.add_error.is_none())
                .unwrap_or_else(|p| p.into_inner());
        }
        if st.pending.len() >= PENDING_CAP {
            // Back-pressure: the step waits while its output goes out (nowhere, when the entry
            // could not be added).
            let sent = match st.add_error.clone() {
                Some(e) => Err(anyhow!(e)),
                None => flush(&mut st, &*self.transport, self.append, None),
            };
            if let Err(e) = sent {
                st.last_error = Some(format!("{e:#}"));
                if st.pending.len() >= 4 * PENDING_CAP {
                    // The coordinator is not taking output: keep the newest, say so.
                    let drop_to = st.pending.len() - PENDING_CAP;
                    st.pending.drain(..drop_to);
                    st.pending.extend_from_slice(
                        b"stderr: [executor: output dropped while the coordinator was unreachable]\n",
                    );
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
            assert!(st.pending.len() < PENDING_CAP + chunk.len() + 64 * 8);
            assert!(st.full.is_empty(), "appends work, so nothing is kept");
        }
        e.finish(0).unwrap();
        let entries = t.entries.lock().unwrap();
        assert_eq!(entries[0].out.as_ref().unwrap().len(), 300 * 64 * (999 + 1 + 8));
        assert!(*t.updates.lock().unwrap() >= 4);
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

    #[test]
    fn full_replacement_is_capped() {
        let t = Arc::new(MemoryLogs { sourcegraph: true, ..Default::default() });
        let l = logger(t.clone());
        let mut e = l.entry("k", None).unwrap();
        let chunk = vec![b'y'; 1 << 20];
        for _ in 0..12 {
            e.output(Stream::Stdout, &chunk);
        }
        e.finish(0).unwrap();
        let out = t.entries.lock().unwrap()[0].out.clone().unwrap();
        assert!(out.len() <= FULL_OUTPUT_CAP + 100, "{}", out.len());
        assert!(out.ends_with("truncated here: more than 8 MiB]\n"));
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

    /// What full resends cost: a step printing 10 MiB in one go sends it whole at most a few
    /// times (the pending cap flushes at 4 MiB), so about 8 MiB (the cap) per update.
    #[test]
    fn full_resends_send_the_whole_output_bounded() {
        let t = Arc::new(MemoryLogs { sourcegraph: true, ..Default::default() });
        let l = logger(t.clone());
        let mut e = l.entry("k", None).unwrap();
        let line = [vec![b'z'; 1023], vec![b'\n']].concat();
        for _ in 0..(10 << 10) {
            e.output(Stream::Stdout, &line);
        }
        e.finish(0).unwrap();
        let sent = *t.bytes_sent.lock().unwrap();
        let updates = *t.updates.lock().unwrap();
        assert!(sent <= updates * (FULL_OUTPUT_CAP + 100), "{sent} bytes in {updates} updates");
        assert!(t.entries.lock().unwrap()[0].out.as_ref().unwrap().ends_with(TRUNCATED));
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
