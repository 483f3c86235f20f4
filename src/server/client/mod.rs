//! The admin API client behind `executor queue submit|jobs|show|logs|cancel|executors|artifacts`:
//! the HTTP calls here, each command's load-then-print in `command`, and how answers print
//! (tables for people, `--json` for scripts) in `print`.

mod command;
mod print;

pub(crate) use command::run;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the server is and how to reach it.
#[derive(Clone)]
pub(crate) struct ClientOptions {
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
pub(crate) enum ClientCommand {
    Submit { queue: Option<String>, file: PathBuf },
    Jobs { queue: Option<String>, state: Option<String>, limit: Option<u32> },
    Show { id: i64 },
    Logs { id: i64, follow: bool },
    Cancel { id: i64 },
    Executors,
    Queues,
    Release { id: i64 },
    Artifacts { id: i64, output: Option<PathBuf> },
    RepoAdd { name: String, path: PathBuf },
    RepoLs,
    RepoRm { name: String },
    FilePut { bucket: String, key: String, file: PathBuf },
    FileLs,
}

/// A client of the admin API.
pub(crate) struct AdminClient {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl AdminClient {
    pub(crate) fn new(url: &str, token: &str, ca_cert: Option<&Path>) -> Result<AdminClient> {
        if url.is_empty() {
            bail!("no coordinator URL: set EXECUTOR_FRONTEND_URL or pass --url");
        }
        if token.is_empty() {
            bail!("no admin token: set EXECUTOR_QUEUE_ADMIN_TOKEN");
        }
        // The same trust (web roots, the system store, `--ca-cert`) and proxies as the executor.
        let make = || ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(10));
        let agents = crate::base::http::Agents::new(make, url.starts_with("https://"), ca_cert)?;
        Ok(AdminClient {
            base: url.trim_end_matches('/').to_string(),
            token: token.to_string(),
            agent: agents.for_url(url).clone(),
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

    /// The answer parsed as it is read: `into_string` refuses answers over 10 MB, and a job's
    /// answer holds its whole log.
    fn json(&self, what: &str, req: ureq::Request, body: Option<&Value>) -> Result<Value> {
        let resp = self.call(what, req, body)?;
        let reader = std::io::BufReader::with_capacity(64 << 10, resp.into_reader());
        serde_json::from_reader(reader).with_context(|| format!("{what}: reading the coordinator's answer"))
    }

    /// Submits a job; returns its id.
    pub(crate) fn submit(&self, job: &Value) -> Result<i64> {
        let v = self.json("submitting the job", self.request("POST", "/api/jobs"), Some(job))?;
        v.get("id").and_then(Value::as_i64).context("submitting the job: the answer has no id")
    }

    pub(crate) fn jobs(&self, queue: Option<&str>, state: Option<&str>, limit: Option<u32>) -> Result<Value> {
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

    pub(crate) fn job(&self, id: i64) -> Result<Value> {
        self.json(&format!("showing job {id}"), self.request("GET", &format!("/api/jobs/{id}")), None)
    }

    /// The job without its log entries (`logs` streams them).
    pub(crate) fn job_fields(&self, id: i64) -> Result<Value> {
        let req = self.request("GET", &format!("/api/jobs/{id}")).query("logs", "false");
        self.json(&format!("showing job {id}"), req, None)
    }

    pub(crate) fn cancel(&self, id: i64) -> Result<Value> {
        self.json(
            &format!("cancelling job {id}"),
            self.request("POST", &format!("/api/jobs/{id}/cancel")),
            None,
        )
    }

    /// Asks the executor keeping job `id`'s sandbox for debugging to release it.
    pub(crate) fn release(&self, id: i64) -> Result<Value> {
        self.json(
            &format!("releasing the kept sandbox of job {id}"),
            self.request("POST", &format!("/api/jobs/{id}/release")),
            None,
        )
    }

    pub(crate) fn executors(&self) -> Result<Value> {
        self.json("listing executors", self.request("GET", "/api/executors"), None)
    }

    pub(crate) fn queues(&self) -> Result<Value> {
        self.json("listing queues", self.request("GET", "/api/queues"), None)
    }

    /// Calls `each` for every log line (one entry state per line) until the stream ends.
    pub(crate) fn logs(
        &self,
        id: i64,
        follow: bool,
        mut each: impl FnMut(Value) -> Result<()>,
    ) -> Result<()> {
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
    pub(crate) fn repo_add(&self, name: &str, path: &Path) -> Result<Value> {
        let body = serde_json::json!({ "name": name, "path": path.to_string_lossy() });
        self.json(&format!("registering repository {name}"), self.request("POST", "/api/repos"), Some(&body))
    }

    pub(crate) fn repos(&self) -> Result<Value> {
        self.json("listing repositories", self.request("GET", "/api/repos"), None)
    }

    pub(crate) fn repo_rm(&self, name: &str) -> Result<()> {
        let req = self.request("DELETE", "/api/repos").query("name", name);
        self.call(&format!("removing repository {name}"), req, None).map(|_| ())
    }

    /// Stores `bytes` as `bucket/key` in the coordinator's files store.
    pub(crate) fn file_put(&self, bucket: &str, key: &str, bytes: &[u8]) -> Result<Value> {
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

    pub(crate) fn files(&self) -> Result<Value> {
        self.json("listing files", self.request("GET", "/api/files"), None)
    }

    /// Copies a job's artifacts tarball into `out`.
    pub(crate) fn artifacts(&self, id: i64, out: &mut dyn Write) -> Result<u64> {
        let what = format!("fetching the artifacts of job {id}");
        let resp = self.call(&what, self.request("GET", &format!("/api/jobs/{id}/artifacts")), None)?;
        let mut reader = resp.into_reader();
        std::io::copy(&mut reader, out).with_context(|| what.clone())
    }
}
