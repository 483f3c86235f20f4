//! The clap types of `executor queue ...` (the coordinator and its admin client), and their
//! conversion into `server::ServeConfig` / `server::client::ClientCommand`.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

use crate::base::secret::Secret;
use crate::server::{self, client};

#[derive(Debug, Args)]
pub struct QueueArgs {
    #[command(subcommand)]
    pub command: QueueCommand,
}

/// Options every client command shares.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Base URL of the coordinator
    #[arg(long, env = "EXECUTOR_FRONTEND_URL", global = true, hide_env_values = true)]
    pub url: Option<String>,
    /// PEM file of the CA that signed the coordinator's TLS certificate (default: the web PKI)
    #[arg(long, env = "EXECUTOR_QUEUE_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Print JSON instead of tables
    #[arg(long, global = true)]
    pub json: bool,
    /// Print job-controlled text (logs, names, failure messages) as it is, control characters
    /// included, instead of escaped
    #[arg(long, global = true)]
    pub raw: bool,
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Run the coordinator: the executor protocol, the admin API and /metrics, backed by SQLite
    /// or, for several replicas behind a load balancer, one PostgreSQL database (--database)
    ///
    /// The executors' shared secret comes from EXECUTOR_FRONTEND_PASSWORD (or --secret-file) and
    /// must be at least 20 characters; the admin API's token comes from EXECUTOR_QUEUE_ADMIN_TOKEN
    /// (or --admin-token-file), also at least 20 characters and different from the secret.
    Serve(Box<ServeArgs>),
    /// Submit a job (the protocol's job JSON without id and token, plus "queue"); prints its id
    Submit {
        /// Queue to submit to (overrides "queue" in the file; default batches)
        #[arg(long)]
        queue: Option<String>,
        /// Job file, or - for stdin
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List jobs, newest first
    Jobs {
        #[arg(long)]
        queue: Option<String>,
        /// queued, processing, completed, errored, failed or canceled
        #[arg(long)]
        state: Option<String>,
        /// At most this many jobs (default 100)
        #[arg(long)]
        limit: Option<u32>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a job with its log entries
    Show {
        id: i64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a job's log entries; with --follow, until the job finishes
    Logs {
        id: i64,
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancel a job (a running one ends when its executor notices)
    Cancel {
        id: i64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Release a job's sandbox kept for debugging (the executor does at its next heartbeat)
    Release {
        id: i64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List the executors that heartbeated, with their versions and whether they are active
    Executors {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Each queue's queued jobs, oldest queued job's age, running jobs and executors (what an
    /// autoscaler reads from /api/queues)
    Queues {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Register, list and remove the git repositories the coordinator serves to jobs
    #[command(subcommand)]
    Repo(RepoCommand),
    /// The files store jobs reference by bucket and key
    #[command(subcommand)]
    Files(FilesCommand),
    /// Download a job's artifacts tarball (stdout unless -o; never to a terminal)
    Artifacts {
        id: i64,
        #[arg(long, short)]
        output: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `executor queue repo ...`
#[derive(Debug, Subcommand)]
pub enum RepoCommand {
    /// Serve the git repository at PATH (on the coordinator's host) as NAME
    ///
    /// Executors clone it at /.executors/git/NAME with the token of a job whose repositoryName is
    /// NAME; no other credential reads it.
    Add {
        name: String,
        path: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List the served repositories
    Ls {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stop serving a repository
    Rm {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `executor queue files ...`
#[derive(Debug, Subcommand)]
pub enum FilesCommand {
    /// Store FILE as BUCKET/KEY; a job's files entry {"bucket", "key"} then fetches it
    Put {
        bucket: String,
        key: String,
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List the stored files
    Ls {
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; see --addr-file)
    #[arg(long, default_value = "127.0.0.1:3190")]
    pub listen: String,
    /// Directory of the SQLite database, the artifacts and the files store (with --database: one
    /// directory every replica shares)
    #[arg(long)]
    pub data_dir: PathBuf,
    /// PostgreSQL database for several replicas, postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE
    /// (default: SQLite in --data-dir)
    #[arg(long, env = "EXECUTOR_QUEUE_DATABASE", hide_env_values = true, value_name = "URL",
          value_parser = secret_value)]
    pub database: Option<Secret>,
    /// File holding the PostgreSQL password (instead of one in the --database URL)
    #[arg(long, requires = "database", value_name = "FILE")]
    pub database_password_file: Option<PathBuf>,
    /// Write the base URL here (atomically) once the socket listens
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
    /// A queue to serve (repeatable; replaces the default set batches, codeintel)
    #[arg(long = "queue")]
    pub queues: Vec<String>,
    /// A processing job without a heartbeat for this long goes back to the queue
    #[arg(long, default_value = "25s", value_parser = crate::base::units::parse_duration)]
    pub stalled_max_age: Duration,
    /// An executor counts as active while its last heartbeat is at most this old
    #[arg(long, default_value = "15s", value_parser = crate::base::units::parse_duration)]
    pub active_window: Duration,
    /// How often a stalled job is requeued before it fails
    #[arg(long, default_value_t = 3)]
    pub max_resets: i64,
    /// How often an errored job (markErrored) is retried before it fails (contract: 0)
    #[arg(long, default_value_t = 0)]
    pub max_retries: i64,
    /// Cap on a job's stored log output, over all its entries
    #[arg(long, default_value_t = server::DEFAULT_LOG_CAP)]
    pub log_cap_bytes: u64,
    /// Cap on a job's artifacts upload
    #[arg(long, default_value_t = server::DEFAULT_ARTIFACT_MAX)]
    pub artifact_max_bytes: u64,
    /// File holding the executors' shared secret (instead of EXECUTOR_FRONTEND_PASSWORD)
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// File holding the admin API token (instead of EXECUTOR_QUEUE_ADMIN_TOKEN)
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// PEM certificate chain: serve HTTPS
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// File holding a read-only token for /metrics and /api/queues, for an autoscaler (instead
    /// of EXECUTOR_QUEUE_METRICS_TOKEN; default: those need the admin token)
    #[arg(long, value_name = "FILE")]
    pub metrics_token_file: Option<PathBuf>,
    /// The order of a queue's jobs: fair (round-robin across tenants: a job's "tenant", else its
    /// repository) or fifo (oldest first)
    #[arg(long, default_value = "fair", value_parser = ["fair", "fifo"])]
    pub dequeue_order: String,
    /// With the fair order, at most this many running jobs per tenant in each queue (0: no cap)
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub tenant_max_running: i64,
    /// A queue's keep policy, QUEUE=DURATION (repeatable): its failed jobs' sandboxes are kept
    /// for `executor debug` this long at most (0: never), within each executor's own
    /// EXECUTOR_KEEP_FAILED
    #[arg(long = "keep-failed", value_name = "QUEUE=DURATION")]
    pub keep_failed: Vec<String>,
}

/// `--keep-failed` values by queue; every queue named must be served.
fn keep_policy(values: &[String], queues: &[String]) -> Result<std::collections::BTreeMap<String, Duration>> {
    let mut out = std::collections::BTreeMap::new();
    for v in values {
        let (q, d) =
            v.split_once('=').with_context(|| format!("--keep-failed {v:?} is not QUEUE=DURATION"))?;
        if !queues.iter().any(|s| s == q) {
            anyhow::bail!("--keep-failed {v:?} names queue {q:?}, which is not served");
        }
        let d = crate::base::units::parse_duration(d).with_context(|| format!("--keep-failed {v:?}"))?;
        out.insert(q.to_string(), d);
    }
    Ok(out)
}

/// A command-line value kept as a secret from the start (it may carry a password).
fn secret_value(s: &str) -> std::result::Result<Secret, String> {
    Ok(Secret::new(s))
}

impl ServeArgs {
    pub fn into_config(self) -> Result<server::ServeConfig> {
        let database = match self.database {
            None => None,
            Some(url) => {
                let password = match &self.database_password_file {
                    Some(path) => {
                        server::read_secret(Some(path), "", "PostgreSQL password")?.map(Secret::new)
                    }
                    None => None,
                };
                Some(server::store::PgOptions { url, password })
            }
        };
        let secret =
            server::read_secret(self.secret_file.as_deref(), "EXECUTOR_FRONTEND_PASSWORD", "shared secret")?
                .unwrap_or_default();
        let admin_token = server::read_secret(
            self.admin_token_file.as_deref(),
            "EXECUTOR_QUEUE_ADMIN_TOKEN",
            "admin token",
        )?
        .unwrap_or_default();
        let metrics_token = server::read_secret(
            self.metrics_token_file.as_deref(),
            "EXECUTOR_QUEUE_METRICS_TOKEN",
            "metrics token",
        )?;
        let queues = if self.queues.is_empty() {
            server::DEFAULT_QUEUES.iter().map(|s| s.to_string()).collect()
        } else {
            let mut q = self.queues;
            q.dedup();
            q
        };
        let keep_failed = keep_policy(&self.keep_failed, &queues)?;
        Ok(server::ServeConfig {
            keep_failed,
            listen: self.listen,
            data_dir: self.data_dir,
            addr_file: self.addr_file,
            queues,
            stalled_max_age: self.stalled_max_age,
            max_resets: self.max_resets,
            max_retries: self.max_retries,
            log_cap_bytes: self.log_cap_bytes,
            artifact_max_bytes: self.artifact_max_bytes,
            secret,
            admin_token,
            tls: self.tls_cert.zip(self.tls_key),
            active_window: self.active_window,
            database,
            metrics_token,
            fair_dequeue: self.dequeue_order == "fair",
            tenant_max_running: self.tenant_max_running,
        })
    }
}

fn options(c: ClientArgs) -> client::ClientOptions {
    client::ClientOptions {
        url: c.url.unwrap_or_default(),
        token: std::env::var("EXECUTOR_QUEUE_ADMIN_TOKEN").unwrap_or_default(),
        ca_cert: c.ca_cert,
        json: c.json,
        raw: c.raw,
    }
}

/// Runs `executor queue ...`.
pub(crate) fn run(args: QueueArgs) -> Result<i32> {
    use client::ClientCommand as C;
    let (opts, cmd) = match args.command {
        QueueCommand::Serve(s) => {
            let config = s.into_config()?;
            let _traces = super::install_traces("executor-queue")?;
            server::serve(config)?;
            return Ok(crate::base::exit::OK);
        }
        QueueCommand::Submit { queue, file, client } => (options(client), C::Submit { queue, file }),
        QueueCommand::Jobs { queue, state, limit, client } => {
            (options(client), C::Jobs { queue, state, limit })
        }
        QueueCommand::Show { id, client } => (options(client), C::Show { id }),
        QueueCommand::Logs { id, follow, client } => (options(client), C::Logs { id, follow }),
        QueueCommand::Cancel { id, client } => (options(client), C::Cancel { id }),
        QueueCommand::Executors { client } => (options(client), C::Executors),
        QueueCommand::Queues { client } => (options(client), C::Queues),
        QueueCommand::Release { id, client } => (options(client), C::Release { id }),
        QueueCommand::Artifacts { id, output, client } => (options(client), C::Artifacts { id, output }),
        QueueCommand::Repo(RepoCommand::Add { name, path, client }) => {
            (options(client), C::RepoAdd { name, path })
        }
        QueueCommand::Repo(RepoCommand::Ls { client }) => (options(client), C::RepoLs),
        QueueCommand::Repo(RepoCommand::Rm { name, client }) => (options(client), C::RepoRm { name }),
        QueueCommand::Files(FilesCommand::Put { bucket, key, file, client }) => {
            (options(client), C::FilePut { bucket, key, file })
        }
        QueueCommand::Files(FilesCommand::Ls { client }) => (options(client), C::FileLs),
    };
    client::run(&opts, cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_policies_name_served_queues() {
        let queues = vec!["batches".to_string(), "codeintel".to_string()];
        let p = keep_policy(&["batches=10m".into(), "codeintel=0".into()], &queues).unwrap();
        assert_eq!(p["batches"], Duration::from_secs(600));
        assert_eq!(p["codeintel"], Duration::ZERO);
        let e = format!("{:#}", keep_policy(&["other=1m".into()], &queues).unwrap_err());
        assert!(e.contains("not served"), "{e}");
        assert!(keep_policy(&["batches".into()], &queues).is_err());
        assert!(keep_policy(&["batches=soon".into()], &queues).is_err());
    }
}
