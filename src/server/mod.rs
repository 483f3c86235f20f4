//! The coordinator (`executor queue ...`): an HTTP server speaking the `/.executors/` protocol
//! plus an admin API, backed by SQLite or (for several replicas) PostgreSQL; and the admin client the `queue` client commands use.
//! It knows nothing about sandboxes.

pub(crate) mod client;
mod http;
mod metrics;
pub mod store;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Queues served when `--queue` is not given.
pub const DEFAULT_QUEUES: &[&str] = &["batches", "codeintel"];
/// Default per-job cap on the stored log output.
pub const DEFAULT_LOG_CAP: u64 = 16 * 1024 * 1024;
/// Default cap on one job's artifacts upload.
pub const DEFAULT_ARTIFACT_MAX: u64 = 100 * 1024 * 1024;
/// Longest a dequeue may wait for a job.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// The tests' `active_window` (3 x the 5 s heartbeat, as `--active-window`'s default).
#[cfg(test)]
pub(crate) const ACTIVE_WINDOW: Duration = Duration::from_secs(15);

/// Everything `serve` needs, validated.
#[derive(Clone)]
pub struct ServeConfig {
    pub listen: String,
    pub data_dir: PathBuf,
    pub addr_file: Option<PathBuf>,
    pub queues: Vec<String>,
    pub stalled_max_age: Duration,
    pub max_resets: i64,
    pub max_retries: i64,
    pub log_cap_bytes: u64,
    pub artifact_max_bytes: u64,
    pub secret: String,
    pub admin_token: String,
    pub tls: Option<(PathBuf, PathBuf)>,
    /// An executor is active when it heartbeated within this long.
    pub active_window: Duration,
    /// The PostgreSQL database the replicas share; `None`: SQLite in `data_dir`.
    pub database: Option<store::PgOptions>,
    /// A read-only token for `/metrics` and `/api/queues` (an autoscaler's), besides the admin
    /// token; `None`: the admin token only.
    pub metrics_token: Option<String>,
    /// Round-robin across tenants within a queue (`false`: oldest first).
    pub fair_dequeue: bool,
    /// With the fair order, at most this many running jobs per tenant and queue; 0: no cap.
    pub tenant_max_running: i64,
    /// Per-queue keep policy (`--keep-failed`), sent with each job as `keepFailedSeconds`.
    pub keep_failed: std::collections::BTreeMap<String, Duration>,
}

impl std::fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeConfig")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("queues", &self.queues)
            .field("database", &self.database)
            .field("secret", &"<redacted>")
            .field("admin_token", &"<redacted>")
            .field("metrics_token", &self.metrics_token.as_ref().map(|_| "<redacted>"))
            .field("fair_dequeue", &self.fair_dequeue)
            .field("tenant_max_running", &self.tenant_max_running)
            .finish_non_exhaustive()
    }
}

/// Reads a secret from a file (trailing newline trimmed) or the environment variable.
pub fn read_secret(file: Option<&Path>, env: &str, what: &str) -> Result<Option<String>> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the {what} from {}", path.display()))?;
        return Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()));
    }
    Ok(std::env::var(env).ok().filter(|s| !s.is_empty()))
}

/// Checks the secrets and queue names.
pub fn validate(cfg: &ServeConfig) -> Result<()> {
    check(cfg)
        .map_err(|e| crate::base::exit::ExitError::new(crate::base::exit::USAGE, format!("{e:#}")).into())
}

fn check(cfg: &ServeConfig) -> Result<()> {
    let min = crate::protocol::MIN_SECRET_LEN;
    if cfg.secret.chars().count() < min {
        bail!("the executors' shared secret (EXECUTOR_FRONTEND_PASSWORD or --secret-file) must be at least {min} characters");
    }
    if cfg.admin_token.chars().count() < min {
        bail!("the admin token (EXECUTOR_QUEUE_ADMIN_TOKEN or --admin-token-file) must be at least {min} characters");
    }
    if cfg.admin_token == cfg.secret {
        bail!("the admin token must differ from the executors' shared secret");
    }
    if let Some(t) = &cfg.metrics_token {
        if t.chars().count() < min {
            bail!("the metrics token (EXECUTOR_QUEUE_METRICS_TOKEN or --metrics-token-file) must be at least {min} characters");
        }
        if *t == cfg.secret || *t == cfg.admin_token {
            bail!("the metrics token must differ from the shared secret and the admin token");
        }
    }
    if cfg.tenant_max_running < 0 {
        bail!("--tenant-max-running must not be negative");
    }
    if cfg.tenant_max_running > 0 && !cfg.fair_dequeue {
        bail!("--tenant-max-running needs the fair order (--dequeue-order fair)");
    }
    if cfg.queues.is_empty() {
        bail!("at least one queue is needed");
    }
    for q in &cfg.queues {
        if q.is_empty() || q.len() > 64 || !q.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("queue name {q:?} must be 1 to 64 letters, digits or underscores");
        }
    }
    if cfg.active_window.is_zero() {
        bail!("--active-window must be longer than zero");
    }
    if let Some(db) = &cfg.database {
        db.config().map_err(|e| anyhow::anyhow!("--database: {e}"))?;
    }
    if cfg.max_resets < 0 || cfg.max_retries < 0 {
        bail!("--max-resets and --max-retries must not be negative");
    }
    Ok(())
}

/// Runs the server until SIGINT/SIGTERM.
pub fn serve(cfg: ServeConfig) -> Result<()> {
    validate(&cfg)?;
    // Everything the coordinator writes (the database, artifacts, job files) is its own alone,
    // from the first byte, whatever started it: this process only serves.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("queue")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(http::serve(Arc::new(cfg)))
}

/// The configuration of unit tests: one queue, `batches`, on loopback, fair dequeue, no
/// database, no TLS.
#[cfg(test)]
impl ServeConfig {
    pub(crate) fn for_tests() -> ServeConfig {
        ServeConfig {
            listen: "127.0.0.1:0".into(),
            data_dir: PathBuf::from("/nonexistent"),
            addr_file: None,
            queues: vec!["batches".into()],
            stalled_max_age: Duration::from_secs(25),
            max_resets: 3,
            max_retries: 0,
            log_cap_bytes: 1 << 20,
            artifact_max_bytes: 1 << 20,
            secret: "executor-secret-0123456789abcdef".into(),
            admin_token: "admin-token-0123456789abcdef0123".into(),
            tls: None,
            active_window: ACTIVE_WINDOW,
            database: None,
            metrics_token: None,
            fair_dequeue: true,
            tenant_max_running: 0,
            keep_failed: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ServeConfig {
        ServeConfig {
            metrics_token: Some("metrics-token-0123456789abcdef".into()),
            tenant_max_running: 2,
            ..ServeConfig::for_tests()
        }
    }

    #[test]
    fn the_metrics_token_and_the_tenant_cap_are_checked() {
        check(&cfg()).unwrap();
        let err = |f: fn(&mut ServeConfig)| {
            let mut c = cfg();
            f(&mut c);
            format!("{:#}", check(&c).unwrap_err())
        };
        assert!(err(|c| c.metrics_token = Some("short".into())).contains("at least 20"));
        assert!(err(|c| c.metrics_token = Some(c.admin_token.clone())).contains("must differ"));
        assert!(err(|c| c.metrics_token = Some(c.secret.clone())).contains("must differ"));
        assert!(err(|c| c.tenant_max_running = -1).contains("negative"));
        assert!(err(|c| c.fair_dequeue = false).contains("fair order"));
        let text = format!("{:?}", cfg());
        assert!(!text.contains("metrics-token-0123"), "{text}");
    }
}
