//! How the admin client's answers print: tables for people, JSON for scripts. Text a job
//! controls (its output, keys, names, failure messages) is escaped for people unless `--raw`: a
//! job cannot drive the terminal (titles, screen clears) nor imitate the CLI's own `==>` headers.

use anyhow::Result;
use serde_json::Value;
use std::io::Write;

/// Whether `c` must not reach a terminal as it is: control characters (C0, DEL, C1) and the
/// Unicode controls that reorder or hide text (bidirectional overrides and isolates, zero-width
/// joiners and marks).
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

/// `c` written as an escape (`\x1b`, `\u{202e}`).
fn escaped(c: char, out: &mut String) {
    use std::fmt::Write as _;
    let n = c as u32;
    let _ = if n < 0x100 { write!(out, "\\x{n:02x}") } else { write!(out, "\\u{{{n:x}}}") };
}

/// One-line job-controlled text (a key, a name, a failure message) as a terminal may show it:
/// every unsafe character escaped, newlines and tabs too.
pub(crate) fn printable_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if is_unsafe(c) {
            escaped(c, &mut out);
        } else {
            out.push(c);
        }
    }
    out
}

/// Escapes a job's output for a terminal, piece by piece as it arrives: unsafe characters other
/// than newline and tab are escaped, and a line may not begin with `=` (written `\x3d`), so that
/// no output line can pass for one of the CLI's `==>` headers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutputEscaper {
    at_line_start: bool,
}

impl Default for OutputEscaper {
    fn default() -> Self {
        OutputEscaper { at_line_start: true }
    }
}

impl OutputEscaper {
    pub(crate) fn push(&mut self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        for c in text.chars() {
            if c == '\n' || c == '\t' {
                out.push(c);
            } else if is_unsafe(c) || (c == '=' && self.at_line_start) {
                escaped(c, &mut out);
            } else {
                out.push(c);
            }
            self.at_line_start = c == '\n';
        }
        out
    }
}

pub(super) fn s(v: &Value, key: &str) -> String {
    match v.get(key) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// Left-aligned columns separated by two spaces; cells hold job-controlled text, so they are
/// escaped ([`printable_line`]) unless `raw`.
pub(super) fn table(headers: &[&str], rows: &[Vec<String>], raw: bool) -> String {
    let rows: Vec<Vec<String>> = if raw {
        rows.to_vec()
    } else {
        rows.iter().map(|r| r.iter().map(|c| printable_line(c)).collect()).collect()
    };
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
    out
}

pub(super) fn print_json(v: &Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

pub(super) fn summary_row(j: &Value) -> Vec<String> {
    vec![
        s(j, "id"),
        s(j, "queue"),
        s(j, "state"),
        s(j, "repositoryName"),
        s(j, "executorName"),
        s(j, "createdAt"),
        s(j, "failureMessage"),
    ]
}

pub(super) const SUMMARY_HEADERS: &[&str] =
    &["ID", "QUEUE", "STATE", "REPOSITORY", "EXECUTOR", "CREATED", "FAILURE"];

/// `v[key]` for a terminal: escaped unless `raw`.
fn shown(v: &Value, key: &str, raw: bool) -> String {
    if raw {
        s(v, key)
    } else {
        printable_line(&s(v, key))
    }
}

pub(super) fn print_log_entry(e: &Value, out: &mut dyn Write, raw: bool) -> Result<()> {
    let exit = match e.get("exitCode") {
        Some(Value::Number(n)) => format!("exit {n}"),
        _ => "running".into(),
    };
    writeln!(out, "==> [{}] {} ({exit})", shown(e, "entryId", raw), shown(e, "key", raw))?;
    if let Some(text) = e.get("out").and_then(Value::as_str) {
        let text = if raw { text.to_string() } else { OutputEscaper::default().push(text) };
        out.write_all(text.as_bytes())?;
        if !text.ends_with('\n') {
            writeln!(out)?;
        }
    }
    Ok(())
}

/// Prints a log follow for people: an entry's header once, then only its new output as it
/// arrives (a header again when another entry spoke in between), and its exit when it ends.
#[derive(Default)]
pub(super) struct FollowView {
    last: Option<i64>,
    ended: std::collections::HashSet<i64>,
    /// Whether the output printed last ended a line.
    at_line_start: bool,
    /// Print job-controlled text as it is.
    raw: bool,
}

impl FollowView {
    pub(super) fn new(raw: bool) -> FollowView {
        FollowView { raw, ..Default::default() }
    }

    pub(super) fn print(&mut self, e: &Value, out: &mut dyn Write) -> Result<()> {
        let id = e["entryId"].as_i64().unwrap_or_default();
        let append = e["append"].as_bool().unwrap_or(false);
        let raw = self.raw;
        let text = e["out"].as_str().unwrap_or("");
        // Every piece printed here starts a line or continues the line `at_line_start` says.
        let text = if raw {
            text.to_string()
        } else {
            let mut esc =
                OutputEscaper { at_line_start: !append || self.at_line_start || self.last != Some(id) };
            esc.push(text)
        };
        let text = text.as_str();
        if !self.at_line_start && self.last.is_some() && (self.last != Some(id) || !append) {
            writeln!(out)?;
            self.at_line_start = true;
        }
        if !append {
            writeln!(out, "==> [{id}] {}", shown(e, "key", raw))?;
            self.ended.remove(&id);
        } else if self.last != Some(id) && !text.is_empty() {
            writeln!(out, "==> [{id}] {} (continued)", shown(e, "key", raw))?;
        }
        if !text.is_empty() {
            out.write_all(text.as_bytes())?;
            self.at_line_start = text.ends_with('\n');
        }
        self.last = Some(id);
        if let Some(code) = e.get("exitCode").and_then(Value::as_i64) {
            if self.ended.insert(id) {
                if !self.at_line_start {
                    writeln!(out)?;
                    self.at_line_start = true;
                }
                let took = e
                    .get("durationMs")
                    .and_then(Value::as_i64)
                    .map(|d| format!(", {d} ms"))
                    .unwrap_or_default();
                writeln!(out, "==> [{id}] {}: exit {code}{took}", shown(e, "key", raw))?;
            }
        }
        Ok(())
    }
}

/// `queue jobs`: one summary row a job.
pub(super) fn jobs_table(v: &Value, raw: bool) -> String {
    let rows: Vec<Vec<String>> =
        v["jobs"].as_array().map(|a| a.iter().map(summary_row).collect()).unwrap_or_default();
    table(SUMMARY_HEADERS, &rows, raw)
}

/// `queue show`: the job's fields, its artifacts and the log entries it holds (none when it
/// was fetched without them).
pub(super) fn print_job(v: &Value, out: &mut dyn Write, raw: bool) -> Result<()> {
    let fields = [
        "id",
        "queue",
        "state",
        "failureMessage",
        "numResets",
        "numFailures",
        "executorName",
        "createdAt",
        "startedAt",
        "finishedAt",
        "cancel",
    ];
    let rows: Vec<Vec<String>> = fields.iter().map(|f| vec![f.to_string(), s(v, f)]).collect();
    out.write_all(table(&["FIELD", "VALUE"], &rows, raw).as_bytes())?;
    match v.get("artifacts") {
        Some(a) if !a.is_null() => {
            writeln!(out, "artifacts: {} bytes, sha256 {}", s(a, "bytes"), s(a, "sha256"))?
        }
        _ => writeln!(out, "artifacts: none")?,
    }
    if v["kept"]["message"].is_string() {
        // The executor's name is the executor's word: escaped as job text is.
        writeln!(out, "{}", shown(&v["kept"], "message", raw))?;
    }
    for e in v["logs"].as_array().map(Vec::as_slice).unwrap_or_default() {
        print_log_entry(e, out, raw)?;
    }
    Ok(())
}

/// `queue executors`: one row an executor heard from.
pub(super) fn executors_table(v: &Value, raw: bool) -> String {
    let row = |e: &Value| {
        let queues = e["queueNames"]
            .as_array()
            .map(|q| q.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","))
            .unwrap_or_default();
        vec![
            s(e, "hostname"),
            queues,
            format!("{}/{}", s(e, "os"), s(e, "architecture")),
            s(e, "executorVersion"),
            s(e, "active"),
            s(e, "lastSeenAt"),
        ]
    };
    let rows: Vec<Vec<String>> =
        v["executors"].as_array().map(|a| a.iter().map(row).collect()).unwrap_or_default();
    table(&["HOSTNAME", "QUEUES", "PLATFORM", "VERSION", "ACTIVE", "LAST SEEN"], &rows, raw)
}

/// `queue queues`: the oldest queued job's age in whole seconds.
pub(super) fn queues_table(v: &Value, raw: bool) -> String {
    let row = |q: &Value| {
        let age = q["oldestQueuedSeconds"].as_f64().map_or("-".to_string(), |a| format!("{:.0}s", a.floor()));
        vec![s(q, "name"), s(q, "queued"), age, s(q, "running"), s(q, "executors")]
    };
    let rows: Vec<Vec<String>> =
        v["queues"].as_array().map(|a| a.iter().map(row).collect()).unwrap_or_default();
    table(&["QUEUE", "QUEUED", "OLDEST", "RUNNING", "EXECUTORS"], &rows, raw)
}

/// `queue repo ls`.
pub(super) fn repos_table(v: &Value, raw: bool) -> String {
    let rows: Vec<Vec<String>> = v["repos"]
        .as_array()
        .map(|a| a.iter().map(|r| vec![s(r, "name"), s(r, "path"), s(r, "addedAt")]).collect())
        .unwrap_or_default();
    table(&["NAME", "PATH", "ADDED"], &rows, raw)
}

/// `queue file ls`.
pub(super) fn files_table(v: &Value, raw: bool) -> String {
    let rows: Vec<Vec<String>> = v["files"]
        .as_array()
        .map(|a| a.iter().map(|f| vec![s(f, "bucket"), s(f, "key"), s(f, "size"), s(f, "sha256")]).collect())
        .unwrap_or_default();
    table(&["BUCKET", "KEY", "SIZE", "SHA256"], &rows, raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(
            &["ID", "STATE"],
            &[vec!["1".into(), "queued".into()], vec!["100".into(), "failed".into()]],
            false,
        );
        assert_eq!(t, "ID   STATE\n1    queued\n100  failed\n");
    }

    #[test]
    fn job_text_cannot_drive_the_terminal_or_forge_headers() {
        assert_eq!(
            printable_line("a\x1b]0;title\x07b\nc\td\u{202e}e"),
            "a\\x1b]0;title\\x07b\\x0ac\\x09d\\u{202e}e"
        );
        let mut esc = OutputEscaper::default();
        let mut out = esc.push("ok\t1\n==> [9] forged: exit 0\n\x1b[2Jx =");
        // Split across pieces: a line start is remembered.
        out += &esc.push("= still the line\n");
        out += &esc.push("=");
        out += &esc.push("=> [9] forged\n\u{9b}31m");
        assert_eq!(
            out,
            "ok\t1\n\\x3d=> [9] forged: exit 0\n\\x1b[2Jx == still the line\n\\x3d=> [9] forged\n\\x9b31m"
        );
        assert!(!out.lines().any(|l| l.starts_with("==>")));
        let mut v = FollowView::default();
        let mut buf = Vec::new();
        let e = serde_json::json!({"entryId": 1, "key": "k\x1b[31m", "out": "partial ="});
        v.print(&e, &mut buf).unwrap();
        let e = serde_json::json!({"entryId": 1, "key": "k", "append": true, "out": "=\n==> [2] x\n", "exitCode": 0});
        v.print(&e, &mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert_eq!(text, "==> [1] k\\x1b[31m\npartial ==\n\\x3d=> [2] x\n==> [1] k: exit 0\n");
    }
}
