//! The admin API client behind `executor queue submit|jobs|show|logs|cancel|executors|artifacts`,
//! and how those commands print (tables for people, `--json` for scripts). Text a job controls
//! (its output, keys, names, failure messages) is escaped for people unless `--raw`: a job cannot
//! drive the terminal (titles, screen clears) nor imitate the CLI's own `==>` headers.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Where the server is and how to reach it.
#[derive(Clone)]
pub struct ClientOptions {
    pub url: String,
    pub token: String,
    pub ca_cert: Option<PathBuf>,
    pub json: bool,
    /// Job-controlled text printed as it is, not escaped.
    pub raw: bool,
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions").field("url", &self.url).field("token", &"<redacted>").finish()
    }
}

/// One client command.
#[derive(Debug, Clone)]
pub enum ClientCommand {
    Submit { queue: Option<String>, file: PathBuf },
    Jobs { queue: Option<String>, state: Option<String>, limit: Option<u32> },
    Show { id: i64 },
    Logs { id: i64, follow: bool },
    Cancel { id: i64 },
    Executors,
    Artifacts { id: i64, output: Option<PathBuf> },
    RepoAdd { name: String, path: PathBuf },
    RepoLs,
    RepoRm { name: String },
    FilePut { bucket: String, key: String, file: PathBuf },
    FileLs,
}

/// A client of the admin API.
pub struct AdminClient {
    base: String,
    token: String,
    agent: ureq::Agent,
}

fn tls_config(ca_cert: &Path) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let pem =
        std::fs::read(ca_cert).with_context(|| format!("reading CA certificate {}", ca_cert.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.with_context(|| format!("parsing CA certificate {}", ca_cert.display()))?;
        roots.add(cert).with_context(|| format!("adding CA certificate {}", ca_cert.display()))?;
    }
    if roots.is_empty() {
        bail!("no certificate in {}", ca_cert.display());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("configuring TLS")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

impl AdminClient {
    pub fn new(url: &str, token: &str, ca_cert: Option<&Path>) -> Result<AdminClient> {
        if url.is_empty() {
            bail!("no coordinator URL: set EXECUTOR_FRONTEND_URL or pass --url");
        }
        if token.is_empty() {
            bail!("no admin token: set EXECUTOR_QUEUE_ADMIN_TOKEN");
        }
        let mut builder = ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(10));
        if let Some(ca) = ca_cert {
            builder = builder.tls_config(tls_config(ca)?);
        }
        Ok(AdminClient {
            base: url.trim_end_matches('/').to_string(),
            token: token.to_string(),
            agent: builder.build(),
        })
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        self.agent
            .request(method, &format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.token))
    }

    fn call(&self, what: &str, req: ureq::Request, body: Option<&Value>) -> Result<ureq::Response> {
        let r = match body {
            Some(b) => req.set("Content-Type", "application/json").send_string(&b.to_string()),
            None => req.call(),
        };
        match r {
            Ok(resp) => Ok(resp),
            Err(ureq::Error::Status(code, resp)) => {
                let text = resp.into_string().unwrap_or_default();
                let msg = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or(text);
                bail!("{what}: the coordinator answered {code}: {msg}")
            }
            Err(e) => {
                Err(anyhow::Error::new(e)
                    .context(format!("{what}: reaching the coordinator at {}", self.base)))
            }
        }
    }

    fn json(&self, what: &str, req: ureq::Request, body: Option<&Value>) -> Result<Value> {
        let resp = self.call(what, req, body)?;
        let text = resp.into_string().with_context(|| format!("{what}: reading the coordinator's answer"))?;
        serde_json::from_str(&text).with_context(|| format!("{what}: the coordinator's answer is not JSON"))
    }

    /// Submits a job; returns its id.
    pub fn submit(&self, job: &Value) -> Result<i64> {
        let v = self.json("submitting the job", self.request("POST", "/api/jobs"), Some(job))?;
        v.get("id").and_then(Value::as_i64).context("submitting the job: the answer has no id")
    }

    pub fn jobs(&self, queue: Option<&str>, state: Option<&str>, limit: Option<u32>) -> Result<Value> {
        let mut req = self.request("GET", "/api/jobs");
        if let Some(q) = queue {
            req = req.query("queue", q);
        }
        if let Some(s) = state {
            req = req.query("state", s);
        }
        if let Some(l) = limit {
            req = req.query("limit", &l.to_string());
        }
        self.json("listing jobs", req, None)
    }

    pub fn job(&self, id: i64) -> Result<Value> {
        self.json(&format!("showing job {id}"), self.request("GET", &format!("/api/jobs/{id}")), None)
    }

    pub fn cancel(&self, id: i64) -> Result<Value> {
        self.json(
            &format!("cancelling job {id}"),
            self.request("POST", &format!("/api/jobs/{id}/cancel")),
            None,
        )
    }

    pub fn executors(&self) -> Result<Value> {
        self.json("listing executors", self.request("GET", "/api/executors"), None)
    }

    /// Calls `each` for every log line (one entry state per line) until the stream ends.
    pub fn logs(&self, id: i64, follow: bool, mut each: impl FnMut(Value) -> Result<()>) -> Result<()> {
        let what = format!("reading the logs of job {id}");
        let req = self
            .request("GET", &format!("/api/jobs/{id}/logs"))
            .query("follow", if follow { "true" } else { "false" });
        let resp = self.call(&what, req, None)?;
        let reader = std::io::BufReader::new(resp.into_reader());
        for line in reader.lines() {
            let line = line.with_context(|| what.clone())?;
            if line.trim().is_empty() {
                continue;
            }
            each(serde_json::from_str(&line).with_context(|| format!("{what}: a line is not JSON"))?)?;
        }
        Ok(())
    }

    /// Registers the git repository at `path` (on the coordinator's host) as `name`.
    pub fn repo_add(&self, name: &str, path: &Path) -> Result<Value> {
        let body = serde_json::json!({ "name": name, "path": path.to_string_lossy() });
        self.json(&format!("registering repository {name}"), self.request("POST", "/api/repos"), Some(&body))
    }

    pub fn repos(&self) -> Result<Value> {
        self.json("listing repositories", self.request("GET", "/api/repos"), None)
    }

    pub fn repo_rm(&self, name: &str) -> Result<()> {
        let req = self.request("DELETE", "/api/repos").query("name", name);
        self.call(&format!("removing repository {name}"), req, None).map(|_| ())
    }

    /// Stores `bytes` as `bucket/key` in the coordinator's files store.
    pub fn file_put(&self, bucket: &str, key: &str, bytes: &[u8]) -> Result<Value> {
        let what = format!("storing file {bucket}/{key}");
        let resp = match self.request("PUT", &format!("/api/files/{bucket}/{key}")).send_bytes(bytes) {
            Ok(r) => r,
            Err(ureq::Error::Status(code, resp)) => {
                let text = resp.into_string().unwrap_or_default();
                bail!("{what}: the coordinator answered {code}: {text}")
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("{what}: reaching the coordinator"))),
        };
        let text = resp.into_string().with_context(|| what.clone())?;
        serde_json::from_str(&text).with_context(|| format!("{what}: the answer is not JSON"))
    }

    pub fn files(&self) -> Result<Value> {
        self.json("listing files", self.request("GET", "/api/files"), None)
    }

    /// Copies a job's artifacts tarball into `out`.
    pub fn artifacts(&self, id: i64, out: &mut dyn Write) -> Result<u64> {
        let what = format!("fetching the artifacts of job {id}");
        let resp = self.call(&what, self.request("GET", &format!("/api/jobs/{id}/artifacts")), None)?;
        let mut reader = resp.into_reader();
        std::io::copy(&mut reader, out).with_context(|| what.clone())
    }
}

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
pub fn printable_line(text: &str) -> String {
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
pub struct OutputEscaper {
    at_line_start: bool,
}

impl Default for OutputEscaper {
    fn default() -> Self {
        OutputEscaper { at_line_start: true }
    }
}

impl OutputEscaper {
    pub fn push(&mut self, text: &str) -> String {
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

fn s(v: &Value, key: &str) -> String {
    match v.get(key) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// Left-aligned columns separated by two spaces; cells hold job-controlled text, so they are
/// escaped ([`printable_line`]) unless `raw`.
fn table(headers: &[&str], rows: &[Vec<String>], raw: bool) -> String {
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

fn print_json(v: &Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

fn summary_row(j: &Value) -> Vec<String> {
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

const SUMMARY_HEADERS: &[&str] = &["ID", "QUEUE", "STATE", "REPOSITORY", "EXECUTOR", "CREATED", "FAILURE"];

/// `v[key]` for a terminal: escaped unless `raw`.
fn shown(v: &Value, key: &str, raw: bool) -> String {
    if raw {
        s(v, key)
    } else {
        printable_line(&s(v, key))
    }
}

fn print_log_entry(e: &Value, out: &mut dyn Write, raw: bool) -> Result<()> {
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
struct FollowView {
    last: Option<i64>,
    ended: std::collections::HashSet<i64>,
    /// Whether the output printed last ended a line.
    at_line_start: bool,
    /// Print job-controlled text as it is.
    raw: bool,
}

impl FollowView {
    fn print(&mut self, e: &Value, out: &mut dyn Write) -> Result<()> {
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

/// Runs one client command; returns the exit status.
pub fn run(opts: &ClientOptions, cmd: ClientCommand) -> Result<i32> {
    let client = AdminClient::new(&opts.url, &opts.token, opts.ca_cert.as_deref())?;
    let mut stdout = std::io::stdout().lock();
    match cmd {
        ClientCommand::Submit { queue, file } => {
            let text = if file.as_os_str() == "-" {
                let mut t = String::new();
                std::io::stdin().read_to_string(&mut t).context("reading the job from stdin")?;
                t
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading job file {}", file.display()))?
            };
            let mut job: Value = serde_json::from_str(&text)
                .with_context(|| format!("job file {} is not JSON", file.display()))?;
            if let Some(q) = queue {
                match job.as_object_mut() {
                    Some(obj) => {
                        obj.insert("queue".into(), Value::String(q));
                    }
                    None => bail!("job file {} must hold a JSON object", file.display()),
                }
            }
            let id = client.submit(&job)?;
            if opts.json {
                writeln!(stdout, "{}", serde_json::json!({ "id": id }))?;
            } else {
                writeln!(stdout, "{id}")?;
            }
        }
        ClientCommand::Jobs { queue, state, limit } => {
            let v = client.jobs(queue.as_deref(), state.as_deref(), limit)?;
            if opts.json {
                print_json(&v)?;
            } else {
                let rows: Vec<Vec<String>> =
                    v["jobs"].as_array().map(|a| a.iter().map(summary_row).collect()).unwrap_or_default();
                stdout.write_all(table(SUMMARY_HEADERS, &rows, opts.raw).as_bytes())?;
            }
        }
        ClientCommand::Show { id } => {
            let v = client.job(id)?;
            if opts.json {
                print_json(&v)?;
            } else {
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
                let rows: Vec<Vec<String>> = fields.iter().map(|f| vec![f.to_string(), s(&v, f)]).collect();
                stdout.write_all(table(&["FIELD", "VALUE"], &rows, opts.raw).as_bytes())?;
                match v.get("artifacts") {
                    Some(a) if !a.is_null() => {
                        writeln!(stdout, "artifacts: {} bytes, sha256 {}", s(a, "bytes"), s(a, "sha256"))?
                    }
                    _ => writeln!(stdout, "artifacts: none")?,
                }
                for e in v["logs"].as_array().cloned().unwrap_or_default() {
                    print_log_entry(&e, &mut stdout, opts.raw)?;
                }
            }
        }
        ClientCommand::Logs { id, follow } => {
            let mut view = FollowView { raw: opts.raw, ..Default::default() };
            client.logs(id, follow, |e| {
                if opts.json {
                    writeln!(stdout, "{e}")?;
                } else {
                    view.print(&e, &mut stdout)?;
                }
                stdout.flush()?;
                Ok(())
            })?;
        }
        ClientCommand::Cancel { id } => {
            let v = client.cancel(id)?;
            if opts.json {
                print_json(&v)?;
            } else {
                stdout.write_all(table(SUMMARY_HEADERS, &[summary_row(&v)], opts.raw).as_bytes())?;
            }
        }
        ClientCommand::Executors => {
            let v = client.executors()?;
            if opts.json {
                print_json(&v)?;
            } else {
                let rows: Vec<Vec<String>> = v["executors"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|e| {
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
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                stdout.write_all(
                    table(
                        &["HOSTNAME", "QUEUES", "PLATFORM", "VERSION", "ACTIVE", "LAST SEEN"],
                        &rows,
                        opts.raw,
                    )
                    .as_bytes(),
                )?;
            }
        }
        ClientCommand::RepoAdd { name, path } => {
            let abs = std::fs::canonicalize(&path)
                .with_context(|| format!("repository path {}", path.display()))?;
            let v = client.repo_add(&name, &abs)?;
            if opts.json {
                print_json(&v)?;
            } else {
                writeln!(stdout, "serving {} as {name}", abs.display())?;
            }
        }
        ClientCommand::RepoLs => {
            let v = client.repos()?;
            if opts.json {
                print_json(&v)?;
            } else {
                let rows: Vec<Vec<String>> = v["repos"]
                    .as_array()
                    .map(|a| a.iter().map(|r| vec![s(r, "name"), s(r, "path"), s(r, "addedAt")]).collect())
                    .unwrap_or_default();
                stdout.write_all(table(&["NAME", "PATH", "ADDED"], &rows, opts.raw).as_bytes())?;
            }
        }
        ClientCommand::RepoRm { name } => {
            client.repo_rm(&name)?;
            if !opts.json {
                writeln!(stdout, "no longer serving {name}")?;
            }
        }
        ClientCommand::FilePut { bucket, key, file } => {
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let v = client.file_put(&bucket, &key, &bytes)?;
            if opts.json {
                print_json(&v)?;
            } else {
                writeln!(stdout, "{bucket}/{key}: {} bytes, sha256 {}", s(&v, "size"), s(&v, "sha256"))?;
            }
        }
        ClientCommand::FileLs => {
            let v = client.files()?;
            if opts.json {
                print_json(&v)?;
            } else {
                let rows: Vec<Vec<String>> = v["files"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|f| vec![s(f, "bucket"), s(f, "key"), s(f, "size"), s(f, "sha256")])
                            .collect()
                    })
                    .unwrap_or_default();
                stdout.write_all(table(&["BUCKET", "KEY", "SIZE", "SHA256"], &rows, opts.raw).as_bytes())?;
            }
        }
        ClientCommand::Artifacts { id, output } => match output {
            Some(path) => {
                let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
                let mut tmp = tempfile::NamedTempFile::new_in(dir)
                    .with_context(|| format!("creating a file in {}", dir.display()))?;
                client.artifacts(id, tmp.as_file_mut())?;
                tmp.persist(&path).with_context(|| format!("writing {}", path.display()))?;
            }
            None => {
                if std::io::stdout().is_terminal() {
                    bail!("refusing to write the binary artifacts of job {id} to a terminal; use -o FILE or a pipe");
                }
                client.artifacts(id, &mut stdout)?;
            }
        },
    }
    stdout.flush()?;
    Ok(crate::base::exit::OK)
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
