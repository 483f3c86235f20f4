//! Test fixture: a real `executor queue serve` on 127.0.0.1 with random secrets and a temporary
//! data directory, plus helpers to submit jobs and to act as an executor. Used by every area.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// A running coordinator. Dropping it kills the server.
pub(crate) struct Coordinator {
    pub url: String,
    pub secret: String,
    pub admin_token: String,
    pub data_dir: tempfile::TempDir,
    child: Option<Child>,
    extra_args: Vec<String>,
    env: Vec<(String, String)>,
    /// `--data-dir`: `data_dir/db`, or a directory several replicas share.
    data_path: std::path::PathBuf,
}

fn random_secret(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

impl Coordinator {
    /// 127.0.0.1:0, random secrets, default queues.
    pub(crate) fn start() -> Coordinator {
        Self::start_with(&[])
    }

    /// Listening on `listen` (an address of a test's own network namespace).
    pub(crate) fn start_listening(listen: &str) -> Coordinator {
        let mut c = Self::start_with_at(&[], None);
        c.spawn(listen);
        c
    }

    /// Like `start`, with extra `serve` flags (e.g. `--stalled-max-age 1s`).
    pub(crate) fn start_with(extra_args: &[&str]) -> Coordinator {
        Self::start_with_at(extra_args, Some("127.0.0.1:0"))
    }

    /// [`Coordinator::start`] with these variables set for `queue serve`.
    pub(crate) fn start_with_env(env: &[(&str, &str)]) -> Coordinator {
        let mut c = Self::start_with_at(&[], None);
        c.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        c.spawn("127.0.0.1:0");
        c
    }

    /// A replica on a shared PostgreSQL database and data directory, with the secrets of
    /// `peer` (the first replica when `None`).
    pub(crate) fn start_replica(
        peer: Option<(&str, &str)>,
        database: &str,
        shared: &std::path::Path,
        extra_args: &[&str],
    ) -> Coordinator {
        let data_dir = tempfile::tempdir().expect("creating the replica's own dir");
        let mut c = Coordinator {
            url: String::new(),
            secret: peer.map_or_else(|| random_secret("secret"), |p| p.0.to_string()),
            admin_token: peer.map_or_else(|| random_secret("admin"), |p| p.1.to_string()),
            data_dir,
            child: None,
            extra_args: ["--database", database].iter().chain(extra_args).map(|s| s.to_string()).collect(),
            env: Vec::new(),
            data_path: shared.to_path_buf(),
        };
        c.spawn("127.0.0.1:0");
        c
    }

    fn start_with_at(extra_args: &[&str], listen: Option<&str>) -> Coordinator {
        let data_dir = tempfile::tempdir().expect("creating the coordinator's data dir");
        let mut c = Coordinator {
            url: String::new(),
            secret: random_secret("secret"),
            admin_token: random_secret("admin"),
            data_path: data_dir.path().join("db"),
            data_dir,
            child: None,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
        };
        if let Some(l) = listen {
            c.spawn(l);
        }
        c
    }

    fn spawn(&mut self, listen: &str) {
        let addr_file = self.data_dir.path().join("addr");
        let _ = std::fs::remove_file(&addr_file);
        let mut cmd = crate::common::executor();
        cmd.args(["queue", "serve", "--listen", listen, "--data-dir"])
            .arg(&self.data_path)
            .arg("--addr-file")
            .arg(&addr_file)
            .args(&self.extra_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("EXECUTOR_FRONTEND_PASSWORD", &self.secret)
            .env("EXECUTOR_QUEUE_ADMIN_TOKEN", &self.admin_token)
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("COORDINATOR_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            });
        let mut child = cmd.spawn().expect("starting executor queue serve");
        crate::common::wait_until(
            "executor queue serve to announce its address",
            Duration::from_secs(20),
            || {
                if let Ok(text) = std::fs::read_to_string(&addr_file) {
                    if text.ends_with('\n') {
                        self.url = text.trim().to_string();
                        return true;
                    }
                }
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("executor queue serve exited early: {status}");
                }
                false
            },
        );
        self.child = Some(child);
    }

    /// The ureq agent used by the helpers (trusting the fixture's CA when TLS is on).
    pub(crate) fn agent(&self) -> ureq::Agent {
        ureq::AgentBuilder::new().timeout(Duration::from_secs(90)).build()
    }

    /// `Authorization` value of the admin API.
    pub(crate) fn admin_auth(&self) -> String {
        format!("Bearer {}", self.admin_token)
    }

    /// `Authorization` value of the executor routes.
    pub(crate) fn executor_auth(&self) -> String {
        format!("token-executor {}", self.secret)
    }

    /// Submits a job through the admin API; the queue is `job["queue"]` or batches.
    pub(crate) fn submit(&self, job: Value) -> i64 {
        let resp = self
            .agent()
            .post(&format!("{}/api/jobs", self.url))
            .set("Authorization", &self.admin_auth())
            .set("Content-Type", "application/json")
            .send_string(&job.to_string())
            .unwrap_or_else(|e| panic!("submitting {job}: {}", describe(e)));
        assert_eq!(resp.status(), 201);
        let v: Value = serde_json::from_str(&resp.into_string().unwrap()).unwrap();
        v["id"].as_i64().expect("id in the submit answer")
    }

    /// GET /api/jobs/{id}.
    pub(crate) fn job(&self, id: i64) -> Value {
        let resp = self
            .agent()
            .get(&format!("{}/api/jobs/{id}", self.url))
            .set("Authorization", &self.admin_auth())
            .call()
            .unwrap_or_else(|e| panic!("reading job {id}: {}", describe(e)));
        // Read as a stream: `into_string` refuses more than 10 MB, and a job holds its log.
        serde_json::from_reader(std::io::BufReader::new(resp.into_reader())).unwrap()
    }

    /// Polls the job until its state is one of `states`; panics with the job at the timeout.
    pub(crate) fn wait_state(&self, id: i64, states: &[&str], timeout: Duration) -> Value {
        let mut job = Value::Null;
        let reached = crate::common::poll_until(timeout, || {
            job = self.job(id);
            states.iter().any(|s| job["state"] == *s)
        });
        assert!(reached, "job {id} did not reach {states:?} within {timeout:?}: {job:#}");
        job
    }

    /// SIGKILLs the server.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts on the same data dir, on the same port if it is still free.
    pub(crate) fn restart(&mut self) {
        self.kill();
        let old = self.url.rsplit("://").next().unwrap_or("").to_string();
        // The old port frees up shortly after the kill; a new one does if it does not.
        crate::common::poll_until(Duration::from_secs(1), || std::net::TcpListener::bind(&old).is_ok());
        let listen = if std::net::TcpListener::bind(&old).is_ok() { old } else { "127.0.0.1:0".to_string() };
        self.spawn(&listen);
    }

    /// Sets `EXECUTOR_FRONTEND_URL` and `EXECUTOR_FRONTEND_PASSWORD`.
    pub(crate) fn executor_env(&self, cmd: &mut Command) {
        cmd.env("EXECUTOR_FRONTEND_URL", &self.url).env("EXECUTOR_FRONTEND_PASSWORD", &self.secret);
    }

    /// Sets `EXECUTOR_FRONTEND_URL` and `EXECUTOR_QUEUE_ADMIN_TOKEN`.
    pub(crate) fn admin_env(&self, cmd: &mut Command) {
        cmd.env("EXECUTOR_FRONTEND_URL", &self.url).env("EXECUTOR_QUEUE_ADMIN_TOKEN", &self.admin_token);
    }

    /// A minimal valid job (no repository, one step).
    pub(crate) fn simple_job() -> Value {
        serde_json::json!({
            "dockerSteps": [{"key": "hello", "image": "alpine", "commands": ["echo hello"], "dir": "", "env": []}]
        })
    }

    /// A raw request with the given auth; returns (status, body text). Never panics on 4xx/5xx.
    pub(crate) fn request(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: Option<&str>,
    ) -> (u16, String) {
        let mut req = self.agent().request(method, &format!("{}{path}", self.url));
        if let Some(a) = auth {
            req = req.set("Authorization", a);
        }
        let r = match body {
            Some(b) => req.set("Content-Type", "application/json").send_string(b),
            None => req.call(),
        };
        match r {
            Ok(resp) => (resp.status(), resp.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap_or_default()),
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }

    /// The artifacts the coordinator holds for job `id`, as (path, bytes).
    pub(crate) fn artifacts(&self, id: i64) -> Vec<(String, Vec<u8>)> {
        use std::io::Read;
        let resp = self
            .agent()
            .get(&format!("{}/api/jobs/{id}/artifacts", self.url))
            .set("Authorization", &self.admin_auth())
            .call()
            .unwrap_or_else(|e| panic!("artifacts of job {id}: {e}"));
        let mut bytes = Vec::new();
        resp.into_reader().read_to_end(&mut bytes).unwrap();
        let mut out = Vec::new();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(bytes.as_slice()));
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().display().to_string();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            out.push((name, data));
        }
        out
    }

    /// A protocol client acting as one executor.
    pub(crate) fn executor(&self, name: &str) -> ExecutorClient {
        ExecutorClient {
            url: self.url.clone(),
            secret: self.secret.clone(),
            name: name.to_string(),
            agent: self.agent(),
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill();
    }
}

fn describe(e: ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, resp) => {
            format!("status {code}: {}", resp.into_string().unwrap_or_default())
        }
        other => other.to_string(),
    }
}

/// A minimal executor speaking the protocol, for tests.
pub(crate) struct ExecutorClient {
    pub url: String,
    pub secret: String,
    pub name: String,
    pub agent: ureq::Agent,
}

impl ExecutorClient {
    pub(crate) fn post(&self, path: &str, body: &Value) -> (u16, String) {
        let r = self
            .agent
            .post(&format!("{}/.executors/queue/{path}", self.url))
            .set("Authorization", &format!("token-executor {}", self.secret))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string());
        match r {
            Ok(resp) => (resp.status(), resp.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap_or_default()),
            Err(e) => panic!("POST {path}: {e}"),
        }
    }

    /// Single-queue heartbeat with these job ids; returns the response JSON.
    pub(crate) fn heartbeat(&self, queue: &str, ids: &[i64]) -> Value {
        let (code, body) = self.post(
            &format!("{queue}/heartbeat"),
            &serde_json::json!({"executorName": self.name, "version": "V2", "jobIds": ids, "os": "linux",
                "architecture": "amd64", "executorVersion": "0.1.0"}),
        );
        assert_eq!(code, 200, "heartbeat: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Single-queue dequeue (`wait` like "5s", or "" for none); `None` on 204.
    pub(crate) fn dequeue(&self, queue: &str, wait: &str) -> Option<Value> {
        let path =
            if wait.is_empty() { format!("{queue}/dequeue") } else { format!("{queue}/dequeue?wait={wait}") };
        let (code, body) =
            self.post(&path, &serde_json::json!({"executorName": self.name, "version": "5.2.0"}));
        match code {
            200 => Some(serde_json::from_str(&body).unwrap()),
            204 => None,
            _ => panic!("dequeue: {code} {body}"),
        }
    }

    /// A job route call with the job's token; returns (status, body).
    pub(crate) fn job_call(&self, queue: &str, job: &Value, route: &str, body: Value) -> (u16, String) {
        let id = job["id"].as_i64().unwrap();
        let r = self
            .agent
            .post(&format!("{}/.executors/queue/{queue}/{route}", self.url))
            .set("Authorization", &format!("Bearer {}", job["token"].as_str().unwrap()))
            .set("X-Sourcegraph-Job-ID", &id.to_string())
            .set("X-Sourcegraph-Executor-Name", &self.name)
            .set("Content-Type", "application/json")
            .send_string(&body.to_string());
        match r {
            Ok(resp) => (resp.status(), resp.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap_or_default()),
            Err(e) => panic!("{route}: {e}"),
        }
    }

    /// PUT the artifacts tarball of `job`; returns the status.
    pub(crate) fn put_artifacts(&self, queue: &str, job: &Value, bytes: &[u8]) -> u16 {
        let r = self
            .agent
            .put(&format!("{}/.executors/queue/{queue}/artifacts", self.url))
            .set("Authorization", &format!("Bearer {}", job["token"].as_str().unwrap()))
            .set("X-Sourcegraph-Job-ID", &job["id"].as_i64().unwrap().to_string())
            .set("X-Sourcegraph-Executor-Name", &self.name)
            .send_bytes(bytes);
        match r {
            Ok(resp) => resp.status(),
            Err(ureq::Error::Status(code, _)) => code,
            Err(e) => panic!("PUT artifacts: {e}"),
        }
    }

    /// markComplete / markErrored / markFailed; returns the status.
    pub(crate) fn mark(&self, queue: &str, job: &Value, route: &str, message: &str) -> u16 {
        let id = job["id"].as_i64().unwrap();
        self.job_call(
            queue,
            job,
            route,
            serde_json::json!({"executorName": self.name, "jobId": id, "errorMessage": message}),
        )
        .0
    }
}
