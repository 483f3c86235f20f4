//! Execution log entries: add, update (replace or append, appends kept as chunks of their own)
//! and read back, within per-job caps on what a job's log stores: its output (the configured
//! cap, cut with a marker), the keys and commands of its entries ([`MAX_LOG_META_BYTES`], refused
//! past it) and the number of entries ([`MAX_LOG_ENTRIES`]).

use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

use super::db::{p, Tx};
use super::{Result, Store, StoreError};
use crate::base::redact::Redactor;
use crate::protocol::ExecutionLogEntry;

/// A stored log entry with its 1-based id.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StoredLogEntry {
    pub entry_id: i64,
    #[serde(flatten)]
    pub entry: ExecutionLogEntry,
}

/// Cuts `s` to at most `max` bytes at a character boundary.
fn cut_at_boundary(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The most log entries one job may have (a real job has a few dozen).
pub(super) const MAX_LOG_ENTRIES: i64 = 1000;

/// The most bytes the keys and commands of one job's log entries may take together (a real
/// entry's are well under a kilobyte). Apart from the output cap, so that a job whose output
/// filled its cap can still log its next steps.
pub(super) const MAX_LOG_META_BYTES: i64 = 1 << 20;

/// The bytes an entry's key and command take in the store.
fn meta_bytes(key: &str, command: &Option<String>) -> i64 {
    (key.len() + command.as_ref().map_or(0, String::len)) as i64
}

/// The refusal of an entry whose key and command do not fit what is left of their cap.
fn meta_over_cap(id: i64, meta: i64, used: i64) -> StoreError {
    StoreError::OverCap(format!(
        "the log entry's key and command ({meta} bytes) do not fit the log cap of job {id} for keys \
         and commands ({MAX_LOG_META_BYTES} bytes, {used} used)"
    ))
}

/// The marker that ends a truncated entry's output.
pub(crate) fn truncation_marker(cap: u64) -> String {
    format!("\n[executor: log truncated at {cap} bytes]\n")
}

impl Store {
    /// Bytes of log output the job holds (markers not counted).
    fn log_bytes(t: &mut dyn Tx, id: i64) -> Result<i64> {
        t.one("SELECT log_bytes FROM jobs WHERE id = ?1", p![id], |r| r.get(0))
    }

    /// Bytes the keys and commands of the job's log entries hold.
    fn meta_bytes_used(t: &mut dyn Tx, id: i64) -> Result<i64> {
        t.one(
            "SELECT COALESCE(SUM(octet_length(key) + COALESCE(octet_length(command), 0)), 0) \
             FROM log_entries WHERE job_id = ?1",
            p![id],
            |r| r.get(0),
        )
    }

    fn set_log_bytes(t: &mut dyn Tx, id: i64, bytes: i64) -> Result<()> {
        t.exec("UPDATE jobs SET log_bytes = ?2 WHERE id = ?1", p![id, bytes])?;
        Ok(())
    }

    /// Fits `out` into a budget of `budget` bytes: the kept text (with the marker when cut), whether
    /// it was cut, and how many bytes of output it keeps.
    fn fit(out: &str, budget: i64, cap: u64) -> (String, bool, i64) {
        let budget = budget.max(0) as usize;
        if out.len() <= budget {
            return (out.to_string(), false, out.len() as i64);
        }
        let kept = cut_at_boundary(out, budget);
        (format!("{kept}{}", truncation_marker(cap)), true, kept.len() as i64)
    }

    /// The output bytes one entry holds, in its row and its appended chunks, markers not counted.
    fn entry_bytes(t: &mut dyn Tx, id: i64, entry_id: i64, cap: u64) -> Result<i64> {
        t.one(
            "SELECT octet_length(out) + (SELECT COALESCE(SUM(octet_length(data)), 0) \
             FROM log_chunks WHERE job_id = ?1 AND entry_id = ?2) - truncated * octet_length(CAST(?3 AS TEXT)) \
             FROM log_entries WHERE job_id = ?1 AND entry_id = ?2",
            p![id, entry_id, truncation_marker(cap)],
            |r| r.get(0),
        )
    }

    /// The redactor of job `id`'s `redactedValues`: the coordinator applies them again to what it
    /// stores and shows, whatever the executor did.
    fn job_redactor(t: &mut dyn Tx, id: i64) -> Result<Redactor> {
        #[derive(serde::Deserialize)]
        struct Secrets {
            #[serde(default, rename = "redactedValues")]
            redacted_values: BTreeMap<String, String>,
        }
        let payload: Option<String> =
            t.opt("SELECT payload FROM jobs WHERE id = ?1", p![id], |r| r.get(0))?;
        let secrets = payload
            .and_then(|p| serde_json::from_str::<Secrets>(&p).ok())
            .map(|s| s.redacted_values)
            .unwrap_or_default();
        Ok(Redactor::new(secrets.iter()))
    }

    /// `entry` with the job's secrets replaced in its key, command and output.
    fn redacted(entry: &ExecutionLogEntry, r: &Redactor) -> ExecutionLogEntry {
        if r.is_empty() {
            return entry.clone();
        }
        ExecutionLogEntry {
            key: r.redact_str(&entry.key),
            command: entry.command.as_ref().map(|c| c.iter().map(|a| r.redact_str(a)).collect()),
            out: entry.out.as_ref().map(|o| r.redact_str(o)),
            ..entry.clone()
        }
    }

    /// addExecutionLogEntry: returns the new 1-based entry id; `UnknownJob` when the job is not
    /// `executor`'s processing job.
    pub fn add_log(&mut self, id: i64, executor: &str, entry: &ExecutionLogEntry, cap: u64) -> Result<i64> {
        self.add_log_if(id, entry, cap, |t| Self::owned(t, id, executor))
    }

    /// [`Self::add_log`] where `allowed` says whether the job takes the entry.
    pub(super) fn add_log_if(
        &mut self,
        id: i64,
        entry: &ExecutionLogEntry,
        cap: u64,
        allowed: impl FnOnce(&mut dyn Tx) -> Result<bool>,
    ) -> Result<i64> {
        self.tx(|t| {
            if !allowed(t)? {
                return Err(StoreError::UnknownJob);
            }
            let entry = &Self::redacted(entry, &Self::job_redactor(t, id)?);
            let entry_id: i64 = t.one(
                "SELECT COALESCE(MAX(entry_id), 0) + 1 FROM log_entries WHERE job_id = ?1",
                p![id],
                |r| r.get(0),
            )?;
            if entry_id > MAX_LOG_ENTRIES {
                return Err(StoreError::OverCap(format!(
                    "job {id} already has {MAX_LOG_ENTRIES} log entries, the most a job may have"
                )));
            }
            let command = entry.command.as_ref().map(serde_json::to_string).transpose()?;
            let meta = meta_bytes(&entry.key, &command);
            let meta_used = Self::meta_bytes_used(t, id)?;
            if meta_used + meta > MAX_LOG_META_BYTES {
                return Err(meta_over_cap(id, meta, meta_used));
            }
            let used = Self::log_bytes(t, id)?;
            let (out, truncated, kept) = Self::fit(entry.out.as_deref().unwrap_or(""), cap as i64 - used, cap);
            t.exec(
                "INSERT INTO log_entries (job_id, entry_id, key, command, start_time, exit_code, out, truncated, duration_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                p![
                    id,
                    entry_id,
                    entry.key,
                    command,
                    entry.start_time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                    entry.exit_code,
                    out,
                    truncated,
                    entry.duration_ms
                ],
            )?;
            Self::set_log_bytes(t, id, used + kept)?;
            Ok(entry_id)
        })
    }

    /// updateExecutionLogEntry: replaces the entry, or with `append` appends `out` to it;
    /// `UnknownJob` as `add_log`, `UnknownEntry` when the job has no such entry.
    pub fn update_log(
        &mut self,
        id: i64,
        executor: &str,
        entry_id: i64,
        entry: &ExecutionLogEntry,
        append: bool,
        cap: u64,
    ) -> Result<()> {
        self.tx(|t| {
            if !Self::owned(t, id, executor)? {
                return Err(StoreError::UnknownJob);
            }
            // Each piece is redacted as it comes; a secret split across two appends is caught when
            // the entry is read back whole (`logs`).
            let entry = &Self::redacted(entry, &Self::job_redactor(t, id)?);
            let current: Option<(bool, i64)> = t.opt(
                "SELECT truncated, octet_length(key) + COALESCE(octet_length(command), 0) \
                 FROM log_entries WHERE job_id = ?1 AND entry_id = ?2",
                p![id, entry_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let Some((mut truncated, old_meta)) = current else { return Err(StoreError::UnknownEntry(entry_id)) };
            let delta = entry.out.as_deref().unwrap_or("");
            let command = entry.command.as_ref().map(serde_json::to_string).transpose()?;
            let meta = meta_bytes(&entry.key, &command);
            if meta > old_meta {
                let others = Self::meta_bytes_used(t, id)? - old_meta;
                if others + meta > MAX_LOG_META_BYTES {
                    return Err(meta_over_cap(id, meta, others));
                }
            }
            let used = Self::log_bytes(t, id)?;
            if append {
                // Past a cut nothing more is kept; otherwise the delta becomes a chunk of its own.
                if !truncated && !delta.is_empty() {
                    let (data, cut, kept) = Self::fit(delta, cap as i64 - used, cap);
                    t.exec(
                        "INSERT INTO log_chunks (job_id, entry_id, seq, data) VALUES (?1, ?2, \
                         (SELECT COALESCE(MAX(seq), 0) + 1 FROM log_chunks WHERE job_id = ?1 AND entry_id = ?2), ?3)",
                        p![id, entry_id, data],
                    )?;
                    truncated = cut;
                    Self::set_log_bytes(t, id, used + kept)?;
                }
            } else {
                let held = Self::entry_bytes(t, id, entry_id, cap)?;
                // A full replacement at least as long as what a cut kept keeps the cut; any other
                // replaces the entry's output, chunks included.
                if !(truncated && delta.len() as i64 >= held) {
                    let others = used - held;
                    let (out, cut, kept) = Self::fit(delta, cap as i64 - others, cap);
                    t.exec("DELETE FROM log_chunks WHERE job_id = ?1 AND entry_id = ?2", p![id, entry_id])?;
                    t.exec(
                        "UPDATE log_entries SET out = ?3 WHERE job_id = ?1 AND entry_id = ?2",
                        p![id, entry_id, out],
                    )?;
                    truncated = cut;
                    Self::set_log_bytes(t, id, others + kept)?;
                }
            }
            t.exec(
                "UPDATE log_entries SET key = ?3, command = ?4, start_time = ?5, exit_code = ?6, \
                 truncated = ?7, duration_ms = ?8 WHERE job_id = ?1 AND entry_id = ?2",
                p![
                    id,
                    entry_id,
                    entry.key,
                    command,
                    entry.start_time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                    entry.exit_code,
                    truncated,
                    entry.duration_ms
                ],
            )?;
            Ok(())
        })
    }

    /// A job's log entries in order.
    pub fn logs(&mut self, id: i64) -> Result<Vec<StoredLogEntry>> {
        type Raw = (i64, String, Option<String>, String, Option<i32>, String, Option<i64>);
        let (rows, chunks, redactor) = self.read(|t| {
            let rows: Vec<Raw> = t.all(
                "SELECT entry_id, key, command, start_time, exit_code, out, duration_ms FROM log_entries \
                 WHERE job_id = ?1 ORDER BY entry_id",
                p![id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
            )?;
            let chunks: Vec<(i64, String)> = t.all(
                "SELECT entry_id, data FROM log_chunks WHERE job_id = ?1 ORDER BY entry_id, seq",
                p![id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            Ok((rows, chunks, Self::job_redactor(t, id)?))
        })?;
        let mut appended: HashMap<i64, String> = HashMap::new();
        for (entry_id, data) in chunks {
            appended.entry(entry_id).or_default().push_str(&data);
        }
        let mut out = Vec::new();
        for (entry_id, key, command, start, exit_code, mut text, duration_ms) in rows {
            if let Some(more) = appended.remove(&entry_id) {
                text.push_str(&more);
            }
            let text = if redactor.is_empty() { text } else { redactor.redact_str(&text) };
            let command =
                command.map(|c| serde_json::from_str::<Vec<String>>(&c)).transpose().map_err(|e| {
                    StoreError::Corrupt {
                        what: format!("log entry {entry_id} of job {id}: stored command is not a list"),
                        source: Box::new(e),
                    }
                })?;
            let start_time = chrono::DateTime::parse_from_rfc3339(&start)
                .map_err(|e| StoreError::Corrupt {
                    what: format!("log entry {entry_id} of job {id}: stored start time {start:?}"),
                    source: Box::new(e),
                })?
                .with_timezone(&chrono::Utc);
            out.push(StoredLogEntry {
                entry_id,
                entry: ExecutionLogEntry {
                    key,
                    command,
                    start_time,
                    exit_code,
                    out: if text.is_empty() { None } else { Some(text) },
                    duration_ms,
                },
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::store::both_backends;

    fn entry(out: &str) -> ExecutionLogEntry {
        ExecutionLogEntry {
            key: "step.0".into(),
            command: Some(vec!["sh".into()]),
            start_time: chrono::Utc::now(),
            exit_code: None,
            out: Some(out.into()),
            duration_ms: None,
        }
    }

    fn q(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    both_backends!(logs_append_and_cap_with_a_marker, |s| {
        let a = s.submit("batches", "{}", "r", 0).unwrap();
        s.dequeue(&q(&["batches"]), "e", 1, |_| 1).unwrap().unwrap();
        assert!(matches!(s.add_log(a, "x", &entry("hi"), 10), Err(StoreError::UnknownJob)));
        let e1 = s.add_log(a, "e", &entry("abc"), 10).unwrap();
        assert_eq!(e1, 1);
        s.update_log(a, "e", e1, &entry("def"), true, 10).unwrap();
        assert_eq!(s.logs(a).unwrap()[0].entry.out.as_deref(), Some("abcdef"));
        s.update_log(a, "e", e1, &entry("abcdefgh"), false, 10).unwrap();
        let e2 = s.add_log(a, "e", &entry("123456"), 10).unwrap();
        assert_eq!(e2, 2);
        let logs = s.logs(a).unwrap();
        assert_eq!(logs[1].entry.out.as_deref(), Some(format!("12{}", truncation_marker(10)).as_str()));
        s.update_log(a, "e", e2, &entry("more"), true, 10).unwrap();
        assert_eq!(s.logs(a).unwrap()[1].entry.out, logs[1].entry.out, "nothing past the marker");
        assert!(matches!(s.update_log(a, "e", 9, &entry(""), false, 10), Err(StoreError::UnknownEntry(9))));
    });

    both_backends!(appended_chunks_read_back_in_order_and_share_the_budget_with_replacements, |s| {
        let a = s.submit("batches", "{}", "r", 0).unwrap();
        s.dequeue(&q(&["batches"]), "e", 1, |_| 1).unwrap().unwrap();
        let e1 = s.add_log(a, "e", &entry("a"), 20).unwrap();
        for part in ["b", "c", "d", "e"] {
            s.update_log(a, "e", e1, &entry(part), true, 20).unwrap();
        }
        assert_eq!(s.logs(a).unwrap()[0].entry.out.as_deref(), Some("abcde"));
        // A full replacement drops the chunks and frees their budget for the next entry.
        s.update_log(a, "e", e1, &entry("xy"), false, 20).unwrap();
        assert_eq!(s.logs(a).unwrap()[0].entry.out.as_deref(), Some("xy"));
        let e2 = s.add_log(a, "e", &entry("0123456789"), 20).unwrap();
        s.update_log(a, "e", e2, &entry("abcdefghij"), true, 20).unwrap();
        let logs = s.logs(a).unwrap();
        let marker = truncation_marker(20);
        assert_eq!(logs[1].entry.out.as_deref(), Some(format!("0123456789abcdefgh{marker}").as_str()));
        // A shorter replacement of the cut entry is kept whole: it fits the budget again.
        s.update_log(a, "e", e2, &entry("short"), false, 20).unwrap();
        assert_eq!(s.logs(a).unwrap()[1].entry.out.as_deref(), Some("short"));
        s.update_log(a, "e", e2, &entry("+more"), true, 20).unwrap();
        assert_eq!(s.logs(a).unwrap()[1].entry.out.as_deref(), Some("short+more"));
    });

    // Finding 5 of the security review: key and command were stored uncounted and the number
    // of entries was unbounded (40 entries with a 1 MiB command each grew the store by 40 MiB
    // past a 16 MiB cap).
    both_backends!(keys_commands_and_the_entry_count_have_caps, |s| {
        let a = s.submit("batches", "{}", "r", 0).unwrap();
        s.dequeue(&q(&["batches"]), "e", 1, |_| 1).unwrap().unwrap();
        let cap = 1000;
        let big = |key: &str, arg: usize, out: &str| ExecutionLogEntry {
            key: key.into(),
            command: Some(vec!["x".repeat(arg)]),
            ..entry(out)
        };
        // 100 KiB commands: each one is well under the cap, eleven are not.
        let mut stored = 0;
        let mut refused = None;
        for i in 0..40 {
            match s.add_log(a, "e", &big(&format!("k{i}"), 100 << 10, ""), cap) {
                Ok(_) => stored += 1,
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        let Some(StoreError::OverCap(why)) = refused else { panic!("never refused: {refused:?}") };
        assert!(why.contains("log cap of job 1 for keys and commands (1048576 bytes"), "{why}");
        assert_eq!(stored, 10, "ten entries of 2 + 102404 bytes fit 1 MiB");
        // The output cap is apart: a job whose keys and commands took theirs still logs output.
        s.update_log(a, "e", 1, &big("k0", 100 << 10, &"o".repeat(1200)), true, cap).unwrap();
        let out = s.logs(a).unwrap()[0].entry.out.clone().unwrap_or_default();
        assert_eq!(out, format!("{}{}", "o".repeat(1000), truncation_marker(cap)));
        // An update may not grow its key or command past the cap either; a shrinking one may.
        let err = s.update_log(a, "e", 2, &big("k1", 200 << 10, ""), false, cap).unwrap_err();
        assert!(matches!(err, StoreError::OverCap(_)), "{err}");
        s.update_log(a, "e", 2, &big("k1", 100 << 10, ""), false, cap).unwrap();
        s.update_log(a, "e", 2, &big("k1", 10, ""), false, cap).unwrap();
        s.add_log(a, "e", &big("k9", 80 << 10, ""), cap).unwrap();

        // The number of entries is capped whatever their size.
        let b = s.submit("batches", "{}", "r", 0).unwrap();
        s.dequeue(&q(&["batches"]), "e", 1, |_| 1).unwrap().unwrap();
        for _ in 0..MAX_LOG_ENTRIES {
            s.add_log(b, "e", &entry(""), cap).unwrap();
        }
        let err = s.add_log(b, "e", &entry(""), cap).unwrap_err();
        assert!(matches!(&err, StoreError::OverCap(w) if w.contains("1000 log entries")), "{err}");
    });

    #[test]
    fn cut_respects_utf8() {
        assert_eq!(cut_at_boundary("héllo", 2), "h");
        assert_eq!(cut_at_boundary("abc", 5), "abc");
    }
}
