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
