//! The coordinator's SQLite store: the connection and its thread, versioned migrations, the
//! job states and the store's one error type.
//!
//! One thread (`StoreThread`) owns the writer connection and runs the callers' store calls in the
//! order they arrive, first come first served; every state change is one transaction on it. A
//! second connection (`Checkpointer`) copies the WAL back into the database file off that thread.
//! What the calls do lives beside this file: `jobs.rs` (the job state machine, job tokens as
//! SHA-256 only, executors, artifacts), `logs.rs` (execution log entries with the per-job size
//! cap), `repos.rs` (served repositories and the files store), `console.rs` (the admin
//! console's paged queries), `queues.rs` (the fair dequeue's pick and the per-queue gauges)
//! and `time.rs` (times: milliseconds in the tables, `DateTime<Utc>` in the rows, RFC 3339
//! with milliseconds on the wire).

mod console;
pub(crate) mod db;
mod jobs;
mod kept;
mod logs;
pub(crate) mod pg;
pub(crate) mod pg_tls;
mod queues;
mod repos;
mod time;
#[cfg(test)]
use testkit::cluster as testcluster; // the throwaway PostgreSQL of the tests

pub(crate) use console::{JobFilter, JobPageRow};
pub(crate) use jobs::{
    ArtifactInfo, CancelResult, ExecutorInfo, ExecutorRow, JobDetail, JobRefs, JobRow, Outcome, RequeueResult,
};
pub(crate) use kept::KeptOn;
pub(crate) use logs::StoredLogEntry;
pub(crate) use pg::{PgOptions, PgPool};
pub(crate) use queues::{DequeueOrder, Fairness, QueueGauge};
pub(crate) use repos::{FileRow, RepoRow};

use db::{Dialect, SqliteTx, Tx};

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// One schema change, in the SQL of each backend. SQLite's `PRAGMA user_version` and
/// PostgreSQL's `executor_schema` table record how many ran.
pub(crate) struct Migration {
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

/// The migrations of both backends, one list: the same tables, with PostgreSQL's BIGINT for
/// SQLite's INTEGER, BIGSERIAL for AUTOINCREMENT, and an `id` column where SQLite has `rowid`.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        sqlite: r#"
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    state TEXT NOT NULL,
    payload TEXT NOT NULL,
    repository_name TEXT NOT NULL,
    failure_message TEXT,
    num_resets INTEGER NOT NULL DEFAULT 0,
    num_failures INTEGER NOT NULL DEFAULT 0,
    executor_name TEXT,
    token_sha256 TEXT,
    cancel INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    last_heartbeat_at INTEGER,
    log_bytes INTEGER NOT NULL DEFAULT 0,
    artifact_bytes INTEGER,
    artifact_sha256 TEXT
);
CREATE INDEX jobs_queue_state ON jobs (queue, state, id);
CREATE INDEX jobs_state_heartbeat ON jobs (state, last_heartbeat_at);
CREATE UNIQUE INDEX jobs_token ON jobs (token_sha256) WHERE token_sha256 IS NOT NULL;
CREATE TABLE log_entries (
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    entry_id INTEGER NOT NULL,
    key TEXT NOT NULL,
    command TEXT,
    start_time TEXT NOT NULL,
    exit_code INTEGER,
    out TEXT NOT NULL DEFAULT '',
    truncated INTEGER NOT NULL DEFAULT 0,
    duration_ms INTEGER,
    PRIMARY KEY (job_id, entry_id)
);
CREATE TABLE executors (
    name TEXT PRIMARY KEY,
    queue_name TEXT,
    queue_names TEXT NOT NULL,
    os TEXT NOT NULL,
    architecture TEXT NOT NULL,
    docker_version TEXT NOT NULL,
    executor_version TEXT NOT NULL,
    git_version TEXT NOT NULL,
    ignite_version TEXT NOT NULL,
    src_cli_version TEXT NOT NULL,
    first_seen_at INTEGER NOT NULL,
    last_seen_at INTEGER NOT NULL
);
"#,
        postgres: r#"
CREATE TABLE jobs (
    id BIGSERIAL PRIMARY KEY,
    queue TEXT NOT NULL,
    state TEXT NOT NULL,
    payload TEXT NOT NULL,
    repository_name TEXT NOT NULL,
    failure_message TEXT,
    num_resets BIGINT NOT NULL DEFAULT 0,
    num_failures BIGINT NOT NULL DEFAULT 0,
    executor_name TEXT,
    token_sha256 TEXT,
    cancel BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    last_heartbeat_at BIGINT,
    log_bytes BIGINT NOT NULL DEFAULT 0,
    artifact_bytes BIGINT,
    artifact_sha256 TEXT
);
CREATE INDEX jobs_queue_state ON jobs (queue, state, id);
CREATE INDEX jobs_state_heartbeat ON jobs (state, last_heartbeat_at);
CREATE UNIQUE INDEX jobs_token ON jobs (token_sha256) WHERE token_sha256 IS NOT NULL;
CREATE TABLE log_entries (
    job_id BIGINT NOT NULL REFERENCES jobs (id),
    entry_id BIGINT NOT NULL,
    key TEXT NOT NULL,
    command TEXT,
    start_time TEXT NOT NULL,
    exit_code BIGINT,
    out TEXT NOT NULL DEFAULT '',
    truncated BIGINT NOT NULL DEFAULT 0,
    duration_ms BIGINT,
    PRIMARY KEY (job_id, entry_id)
);
CREATE TABLE executors (
    id BIGSERIAL UNIQUE,
    name TEXT PRIMARY KEY,
    queue_name TEXT,
    queue_names TEXT NOT NULL,
    os TEXT NOT NULL,
    architecture TEXT NOT NULL,
    docker_version TEXT NOT NULL,
    executor_version TEXT NOT NULL,
    git_version TEXT NOT NULL,
    ignite_version TEXT NOT NULL,
    src_cli_version TEXT NOT NULL,
    first_seen_at BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL
);
"#,
    },
    Migration {
        sqlite: r#"
CREATE TABLE repos (
    name TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    added_at INTEGER NOT NULL
);
CREATE TABLE files (
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (bucket, key)
);
"#,
        postgres: r#"
CREATE TABLE repos (
    name TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    added_at BIGINT NOT NULL
);
CREATE TABLE files (
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (bucket, key)
);
"#,
    },
    // Appended log output goes into rows of its own, so an append costs its own size instead of
    // a rewrite of the entry's whole output (`log_entries.out` keeps what a full update set).
    Migration {
        sqlite: r#"
CREATE TABLE log_chunks (
    job_id INTEGER NOT NULL,
    entry_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, entry_id, seq)
);
"#,
        postgres: r#"
CREATE TABLE log_chunks (
    job_id BIGINT NOT NULL,
    entry_id BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, entry_id, seq)
);
"#,
    },
    // The admin console's jobs page: newest first under each filter, by index alone.
    Migration {
        sqlite: r#"
CREATE INDEX jobs_queue_id ON jobs (queue, id);
CREATE INDEX jobs_state_id ON jobs (state, id);
CREATE INDEX jobs_repository_id ON jobs (repository_name, id);
CREATE INDEX jobs_executor_state ON jobs (executor_name, state);
"#,
        postgres: r#"
CREATE INDEX jobs_queue_id ON jobs (queue, id);
CREATE INDEX jobs_state_id ON jobs (state, id);
CREATE INDEX jobs_repository_id ON jobs (repository_name, id);
CREATE INDEX jobs_executor_state ON jobs (executor_name, state);
"#,
    },
    // The admin console's sessions, in the store so that every replica knows every sign-in.
    Migration {
        sqlite: r#"
CREATE TABLE console_sessions (
    digest TEXT PRIMARY KEY,
    csrf TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
"#,
        postgres: r#"
CREATE TABLE console_sessions (
    digest TEXT PRIMARY KEY,
    csrf TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
"#,
    },
    // A completed job keeps the digest of the token it completed with, so that a markComplete
    // retried after its commit (the answer was lost with the connection) is recognised and
    // answered with success. Only markComplete accepts it; the job routes, git and files refuse.
    Migration {
        sqlite: "ALTER TABLE jobs ADD COLUMN done_token_sha256 TEXT;",
        postgres: "ALTER TABLE jobs ADD COLUMN done_token_sha256 TEXT;",
    },
    // Fair dequeue (migration 7): each job's tenant key (its `tenant` field, else its
    // repository), and partial indexes on the queued jobs by tenant (the round-robin pick seeks
    // the next tenant and its oldest job) and on the running jobs by tenant (the per-tenant cap).
    Migration {
        sqlite: r#"
ALTER TABLE jobs ADD COLUMN tenant TEXT NOT NULL DEFAULT '';
UPDATE jobs SET tenant = repository_name;
CREATE INDEX jobs_queued_tenant ON jobs (queue, tenant, id) WHERE state = 'queued';
CREATE INDEX jobs_processing_tenant ON jobs (queue, tenant) WHERE state = 'processing';
"#,
        postgres: r#"
ALTER TABLE jobs ADD COLUMN tenant TEXT NOT NULL DEFAULT '';
UPDATE jobs SET tenant = repository_name;
CREATE INDEX jobs_queued_tenant ON jobs (queue, tenant, id) WHERE state = 'queued';
CREATE INDEX jobs_processing_tenant ON jobs (queue, tenant) WHERE state = 'processing';
"#,
    },
    // A failed job whose sandbox an executor keeps for `executor debug` (its heartbeat says
    // so: kept.rs), until when, and an admin's request to release it (`executor queue release`),
    // which the executor's next heartbeat answer carries.
    Migration {
        sqlite: r#"
ALTER TABLE jobs ADD COLUMN kept_on TEXT;
ALTER TABLE jobs ADD COLUMN kept_until INTEGER;
ALTER TABLE jobs ADD COLUMN kept_release INTEGER NOT NULL DEFAULT 0;
CREATE INDEX jobs_kept_on ON jobs (kept_on);
"#,
        postgres: r#"
ALTER TABLE jobs ADD COLUMN kept_on TEXT;
ALTER TABLE jobs ADD COLUMN kept_until BIGINT;
ALTER TABLE jobs ADD COLUMN kept_release BIGINT NOT NULL DEFAULT 0;
CREATE INDEX jobs_kept_on ON jobs (kept_on);
"#,
    },
];

/// Why a store call failed. `UnknownJob` and `UnknownEntry` are answers a caller branches on;
/// the rest are failures of the store itself.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A log call for a job that is not processing or not this executor's.
    #[error("unknown job")]
    UnknownJob,
    /// A log update of an entry the job does not have.
    #[error("unknown log entry {0}")]
    UnknownEntry(i64),
    /// What the client asked to store does not fit its cap (the message says which).
    #[error("{0}")]
    OverCap(String),
    #[error("making {} readable by the coordinator only", path.display())]
    PrivateFile { path: PathBuf, source: std::io::Error },
    #[error("creating data directory {}", path.display())]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("initialising database {}", path.display())]
    Init { path: PathBuf, source: Box<StoreError> },
    #[error("database schema version {found} is newer than this binary knows ({known})")]
    TooNew { found: i64, known: usize },
    /// An SQLite failure with what the store was doing.
    #[error("{what}")]
    Db { what: String, source: rusqlite::Error },
    /// The PostgreSQL database cannot be reached (or is shutting down): the HTTP side answers
    /// 503; the pool reconnects by itself once it is back. The message names the database's
    /// host, port and name, never the password.
    #[error("{0}")]
    Unavailable(String),
    /// A statement PostgreSQL refused.
    #[error("PostgreSQL database {target}")]
    Postgres { target: String, source: postgres::Error },
    /// The database settings do not work (the message says why).
    #[error("{0}")]
    Config(String),
    /// The data directory is not the one the database's other replicas share.
    #[error("{0}")]
    Marker(String),
    /// A stored value that does not read back.
    #[error("{what}")]
    Corrupt { what: String, source: Box<dyn std::error::Error + Send + Sync> },
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// The store thread is gone.
    #[error("the store is closed")]
    Closed,
    /// The call panicked on the store thread.
    #[error("a store task failed")]
    Panicked,
}

impl StoreError {
    /// Whether this is the store's answer about the request (`UnknownJob`, `UnknownEntry`,
    /// `OverCap`) rather than a failure of the store.
    pub fn is_refusal(&self) -> bool {
        matches!(self, StoreError::UnknownJob | StoreError::UnknownEntry(_) | StoreError::OverCap(_))
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

fn db_err(what: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> StoreError {
    let what = what.into();
    move |source| StoreError::Db { what, source }
}

/// The states of a job, stored as their lowercase names (the same names in JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Processing,
    Completed,
    /// Only passed through: an errored job is requeued or ends `failed` (see `Store::mark`).
    Errored,
    Failed,
    Canceled,
}

impl JobState {
    /// Every state, in the order they are listed.
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Processing,
        JobState::Completed,
        JobState::Errored,
        JobState::Failed,
        JobState::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Processing => "processing",
            JobState::Completed => "completed",
            JobState::Errored => "errored",
            JobState::Failed => "failed",
            JobState::Canceled => "canceled",
        }
    }

    /// The state of this name, if there is one.
    pub fn from_name(name: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Whether a job never leaves this state.
    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Processing)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ToSql for JobState {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for JobState {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let name = value.as_str()?;
        JobState::from_name(name)
            .ok_or_else(|| FromSqlError::Other(format!("unknown job state {name:?}").into()))
    }
}

/// SHA-256 of a job token (or any secret), hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Copies the WAL back into the database file from its own connection, so that the fsyncs of
/// checkpoints never run on the store thread.
pub struct Checkpointer {
    conn: Connection,
}

impl Checkpointer {
    pub fn open(dir: &Path) -> Result<Checkpointer> {
        let path = dir.join("queue.db");
        let conn = Connection::open(&path).map_err(db_err(format!("opening database {}", path.display())))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Checkpointer { conn })
    }

    /// A passive checkpoint: copies what it can without blocking the writer.
    pub fn checkpoint(&self) -> Result<()> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .map_err(db_err("checkpointing the WAL"))
    }
}

/// The store: an SQLite connection, or a PostgreSQL session that takes a connection from the
/// replica's pool at its first statement and gives it back when dropped. Its calls are in
/// `jobs.rs`, `logs.rs`, `repos.rs` and `console.rs`, written once for both (see `db.rs`).
pub struct Store {
    backend: Backend,
}

enum Backend {
    Sqlite(Connection),
    Postgres(Box<PgSession>),
}

struct PgSession {
    pool: PgPool,
    conn: Option<r2d2::PooledConnection<pg::Manager>>,
}

impl PgSession {
    fn conn(&mut self) -> Result<&mut pg::PgConn> {
        if self.conn.is_none() {
            self.conn = Some(self.pool.get()?);
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    /// A pooled connection can have died while it sat idle (a database restart): a call whose
    /// first round trip finds it closed, before anything ran, takes the next one. The pool
    /// drops closed connections when they come back.
    const ATTEMPTS: u32 = pg::POOL_SIZE + 1;

    fn tx<T>(&mut self, f: impl FnOnce(&mut dyn Tx) -> Result<T>) -> Result<T> {
        let target = self.pool.target.clone();
        let mut f = Some(f);
        for attempt in 1.. {
            let pg::PgConn { client, cache } = self.conn()?;
            let (result, begun) = match client.transaction() {
                Ok(mut tx) => {
                    let f = f.take().expect("runs once");
                    let r = f(&mut db::PgTx { client: &mut tx, cache, target: &target });
                    let r = match r {
                        Ok(v) => tx.commit().map(|_| v).map_err(|e| pg::error(e, &target)),
                        Err(e) => Err(e),
                    };
                    (r, true)
                }
                Err(e) => (Err(pg::error(e, &target)), false),
            };
            if matches!(result, Err(StoreError::Unavailable(_))) {
                self.conn = None;
                if !begun && attempt < Self::ATTEMPTS {
                    continue;
                }
            }
            return result;
        }
        unreachable!("the attempts loop returns")
    }

    fn read<T>(&mut self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<T>) -> Result<T> {
        let target = self.pool.target.clone();
        for attempt in 1.. {
            let pg::PgConn { client, cache } = self.conn()?;
            let result = f(&mut db::PgTx { client: &mut **client, cache, target: &target });
            if matches!(result, Err(StoreError::Unavailable(_))) {
                self.conn = None;
                if attempt < Self::ATTEMPTS {
                    continue;
                }
            }
            return result;
        }
        unreachable!("the attempts loop returns")
    }
}

impl Store {
    /// Opens (creating if needed) `dir/queue.db`, sets WAL mode and runs pending migrations.
    pub fn open(dir: &Path) -> Result<Store> {
        // The database holds every job's `redactedValues` (its secrets): the directory and its
        // files are the owner's alone, whatever the umask and however an older version left them.
        // SQLite gives the WAL and the shared memory file the database file's mode.
        crate::base::fs::private_dir(dir)
            .map_err(|source| StoreError::CreateDir { path: dir.to_path_buf(), source })?;
        let path = dir.join("queue.db");
        for f in [path.clone(), dir.join("queue.db-wal"), dir.join("queue.db-shm")] {
            if f == path || f.exists() {
                crate::base::fs::private_file(&f)
                    .map_err(|source| StoreError::PrivateFile { path: f.clone(), source })?;
            }
        }
        let conn = Connection::open(&path).map_err(db_err(format!("opening database {}", path.display())))?;
        Self::init(conn).map_err(|e| StoreError::Init { path, source: Box::new(e) })
    }

    /// An in-memory store, for unit tests.
    #[cfg(test)]
    pub(crate) fn open_in_memory() -> Result<Store> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Store> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // WAL + NORMAL: a committed transaction survives the death of this process (the WAL is in
        // the OS page cache) but not necessarily a power loss. See docs/coordinator.md.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Checkpoints (the only fsyncs under NORMAL) run on a second connection off the request
        // path (`Checkpointer`), so no request waits for one.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version as usize > MIGRATIONS.len() {
            return Err(StoreError::TooNew { found: version, known: MIGRATIONS.len() });
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(m.sqlite).map_err(db_err(format!("running migration {}", i + 1)))?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(Store { backend: Backend::Sqlite(conn) })
    }

    /// A store session on the PostgreSQL pool (migrated by [`PgPool::prepare`]).
    pub fn postgres(pool: PgPool) -> Store {
        Store { backend: Backend::Postgres(Box::new(PgSession { pool, conn: None })) }
    }

    /// Which backend this is.
    pub fn dialect(&self) -> Dialect {
        match self.backend {
            Backend::Sqlite(_) => Dialect::Sqlite,
            Backend::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Runs `f` in one transaction: committed when it returns `Ok`, rolled back otherwise.
    pub(crate) fn tx<T>(&mut self, f: impl FnOnce(&mut dyn Tx) -> Result<T>) -> Result<T> {
        match &mut self.backend {
            Backend::Sqlite(conn) => {
                let tx = conn.transaction()?;
                let v = f(&mut SqliteTx(&tx))?;
                tx.commit()?;
                Ok(v)
            }
            Backend::Postgres(s) => s.tx(f),
        }
    }

    /// Runs `f`'s statements each in its own implicit transaction: for a call that is one
    /// statement, which saves PostgreSQL the BEGIN and COMMIT round trips. Like [`Store::read`],
    /// `f` may run again on another connection when the first was found closed; a statement
    /// that committed just as its connection died then runs twice, so use it only where a
    /// second run changes nothing (it finds its rows already changed).
    pub(crate) fn autocommit<T>(&mut self, f: impl FnMut(&mut dyn Tx) -> Result<T>) -> Result<T> {
        self.read(f)
    }

    /// Runs the reads of `f` outside a transaction (each statement sees the latest commits).
    /// On PostgreSQL `f` may run again on another connection when the first was found closed.
    pub(crate) fn read<T>(&mut self, mut f: impl FnMut(&mut dyn Tx) -> Result<T>) -> Result<T> {
        match &mut self.backend {
            Backend::Sqlite(conn) => f(&mut SqliteTx(conn)),
            Backend::Postgres(s) => s.read(&mut f),
        }
    }
}

pub type StoreTask = Box<dyn FnOnce(&mut Store) + Send>;

/// Runs the requests' store calls. SQLite: one thread owns the store and runs the calls in the
/// order they arrive. A mutex handed the connection to whichever blocked thread woke first, so
/// under 16 busy executors some requests waited behind dozens of later ones (dequeue p99 25 ms
/// against p50 3 ms); a queue serves them first come, first served. PostgreSQL: each call runs
/// on the blocking pool with a connection of the replica's pool (the database orders them).
pub enum StoreThread {
    Sqlite(std::sync::mpsc::Sender<StoreTask>),
    Postgres(Box<PgPool>),
}

impl StoreThread {
    pub fn start(mut store: Store) -> std::io::Result<StoreThread> {
        if let Backend::Postgres(s) = &store.backend {
            return Ok(StoreThread::Postgres(Box::new(s.pool.clone())));
        }
        let (tasks, rx) = std::sync::mpsc::channel::<StoreTask>();
        std::thread::Builder::new().name("queue-store".into()).spawn(move || {
            for task in rx {
                // A panicking call fails its own request (its answer channel drops), not the store.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| task(&mut store)));
            }
        })?;
        Ok(StoreThread::Sqlite(tasks))
    }

    /// Runs `f` on a store and waits for its answer. `f` may return any error that a
    /// `StoreError` converts into, so that a caller can mix store calls with its own work.
    pub async fn call<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&mut Store) -> Result<T, E> + Send + 'static,
    {
        match self {
            StoreThread::Sqlite(tasks) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                tasks
                    .send(Box::new(move |s: &mut Store| {
                        let _ = tx.send(f(s));
                    }))
                    .map_err(|_| StoreError::Closed)?;
                rx.await.map_err(|_| StoreError::Panicked)?
            }
            StoreThread::Postgres(pool) => {
                let pool = PgPool::clone(pool);
                tokio::task::spawn_blocking(move || f(&mut Store::postgres(pool)))
                    .await
                    .map_err(|_| StoreError::Panicked)?
            }
        }
    }
}

/// Runs a store test on both backends: `both_backends!(name, |s| { ... })` makes the tests
/// `name::sqlite` (an in-memory database) and `name::postgres` (a fresh database on the test
/// binary's throwaway cluster; skipped through the `postgres` capability without one).
#[cfg(test)]
macro_rules! both_backends {
    ($name:ident, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            const BODY: fn(&mut $crate::server::store::Store) = $body;
            #[test]
            fn sqlite() {
                BODY(&mut $crate::server::store::Store::open_in_memory().unwrap());
            }
            #[test]
            fn postgres() {
                if let Some(mut s) = $crate::server::store::testing::pg_store(module_path!()) {
                    BODY(&mut s);
                }
            }
        }
    };
}
#[cfg(test)]
pub(crate) use both_backends;

#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use std::sync::OnceLock;

    static CLUSTER: OnceLock<std::result::Result<testcluster::Cluster, String>> = OnceLock::new();

    /// The test binary's cluster (started by the first test that asks; the reaper stops it
    /// when the binary exits), or why there is none.
    pub(crate) fn cluster() -> std::result::Result<&'static testcluster::Cluster, String> {
        CLUSTER.get_or_init(testcluster::Cluster::start).as_ref().map_err(|e| e.clone())
    }

    /// A migrated store on a fresh database of the shared cluster; `None` (after the skip
    /// notice) when PostgreSQL cannot run here.
    pub(crate) fn pg_store(test: &str) -> Option<Store> {
        let pool = pg_pool(test)?;
        Some(Store::postgres(pool))
    }

    /// A migrated pool on a fresh database, as [`pg_store`].
    pub(crate) fn pg_pool(test: &str) -> Option<PgPool> {
        let cluster = match cluster() {
            Ok(c) => c,
            Err(why) => {
                crate::base::skip::skip(test, "postgres", &why);
                return None;
            }
        };
        let name = fresh_database(cluster);
        let pool = PgPool::new(&PgOptions {
            url: crate::base::secret::Secret::new(cluster.url(&name)),
            password: None,
        })
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        pool.prepare(dir.path()).unwrap();
        Some(pool)
    }

    /// Creates a database no other test uses; its name.
    pub(crate) fn fresh_database(cluster: &testcluster::Cluster) -> String {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("t{}", N.fetch_add(1, Ordering::Relaxed));
        cluster.create_database(&name).unwrap();
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_states_keep_their_stored_and_json_names() {
        for s in JobState::ALL {
            assert_eq!(JobState::from_name(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), serde_json::json!(s.as_str()));
        }
        let names: Vec<_> = JobState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(names, ["queued", "processing", "completed", "errored", "failed", "canceled"]);
        assert!(JobState::from_name("Queued").is_none());
        let finals: Vec<_> = JobState::ALL.into_iter().filter(|s| s.is_final()).collect();
        assert_eq!(finals, [JobState::Completed, JobState::Errored, JobState::Failed, JobState::Canceled]);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let conn = Connection::open(dir.path().join("queue.db")).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let Err(StoreError::Init { source, .. }) = Store::open(dir.path()) else { panic!("opened") };
        assert!(matches!(*source, StoreError::TooNew { found: 99, .. }), "{source}");
    }

    fn pg_or_skip(test: &str) -> Option<(&'static testcluster::Cluster, String)> {
        match testing::cluster() {
            Ok(c) => Some((c, testing::fresh_database(c))),
            Err(why) => {
                crate::base::skip::skip(test, "postgres", &why);
                None
            }
        }
    }

    fn options(url: String) -> PgOptions {
        PgOptions { url: crate::base::secret::Secret::new(url), password: None }
    }

    /// Three replicas starting at once on an empty database: the advisory lock makes them take
    /// turns (without it two `CREATE TABLE`s race and one replica fails to start).
    #[test]
    fn replicas_starting_at_once_migrate_once() {
        let Some((cluster, db)) = pg_or_skip("replicas_starting_at_once_migrate_once") else { return };
        let dir = tempfile::tempdir().unwrap();
        let url = cluster.url(&db);
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(3));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (url, dir, barrier) = (url.clone(), dir.path().to_path_buf(), barrier.clone());
                std::thread::spawn(move || {
                    let pool = PgPool::new(&options(url)).unwrap();
                    barrier.wait();
                    pool.prepare(&dir)
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let rows = client.query("SELECT version FROM executor_schema", &[]).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].get::<_, i64>(0), MIGRATIONS.len() as i64);
    }

    /// Eight replicas dequeueing 200 jobs at once: each job goes out once, and no dequeue comes
    /// back empty while jobs are queued (`SKIP LOCKED` passes over the rows others hold; plain
    /// `FOR UPDATE` would wait and then find the job taken).
    #[test]
    fn concurrent_dequeues_each_get_another_job() {
        let Some(pool) = testing::pg_pool("concurrent_dequeues_each_get_another_job") else { return };
        let mut s = Store::postgres(pool.clone());
        for _ in 0..200 {
            s.submit("batches", "{}", "r", 1).unwrap();
        }
        drop(s);
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (pool, barrier) = (pool.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let mut got = Vec::new();
                    for _ in 0..25 {
                        let mut s = Store::postgres(pool.clone());
                        let d = s.dequeue(&["batches".to_string()], &format!("e{i}"), 2, |_| 1).unwrap();
                        got.push(d.expect("a job was queued but the dequeue came back empty").id);
                    }
                    got
                })
            })
            .collect();
        let mut all: Vec<i64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        all.sort();
        assert_eq!(all, (1..=200).collect::<Vec<i64>>(), "every job exactly once");
    }

    /// A job row another replica holds locked (mid-dequeue) is passed over, not waited for.
    #[test]
    fn a_dequeue_passes_over_a_locked_job() {
        let Some((cluster, db)) = pg_or_skip("a_dequeue_passes_over_a_locked_job") else { return };
        let dir = tempfile::tempdir().unwrap();
        let pool = PgPool::new(&options(cluster.url(&db))).unwrap();
        pool.prepare(dir.path()).unwrap();
        let mut s = Store::postgres(pool.clone());
        let (a, b) = (s.submit("batches", "{}", "r", 0).unwrap(), s.submit("batches", "{}", "r", 0).unwrap());
        let mut other = postgres::Client::connect(&cluster.url(&db), postgres::NoTls).unwrap();
        let mut held = other.transaction().unwrap();
        held.query("SELECT id FROM jobs WHERE id = $1 FOR UPDATE", &[&a]).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(s.dequeue(&["batches".to_string()], "e", 1, |_| 1).map(|d| d.map(|d| d.id)));
        });
        // A dequeue that waited for the lock would answer only after the rollback below.
        let got = rx.recv_timeout(std::time::Duration::from_secs(20));
        held.rollback().unwrap();
        assert_eq!(got.expect("the dequeue waited for the locked row").unwrap(), Some(b));
    }

    /// The `LISTEN` thread wakes its replica once it listens, then for every job another
    /// replica queues (a submit here, through the pool, as another replica's would be).
    #[test]
    fn a_submit_elsewhere_wakes_the_listener() {
        let Some(pool) = testing::pg_pool("a_submit_elsewhere_wakes_the_listener") else { return };
        let (tx, rx) = std::sync::mpsc::channel();
        pg::spawn_listener(&pool, move || {
            let _ = tx.send(());
        })
        .unwrap();
        let wait = std::time::Duration::from_secs(20);
        rx.recv_timeout(wait).expect("no wake-up once listening");
        let mut s = Store::postgres(pool);
        s.submit("batches", "{}", "r", 1).unwrap();
        rx.recv_timeout(wait).expect("no wake-up for the submit");
        let a = s.dequeue(&["batches".to_string()], "e", 2, |_| 1).unwrap().unwrap().id;
        while rx.try_recv().is_ok() {}
        s.mark(a, "e", &Outcome::Errored("again".into()), 5, 3).unwrap();
        rx.recv_timeout(wait).expect("no wake-up for a retried job");
    }

    /// While another replica holds the sweep lock a sweep does nothing; then it resets.
    #[test]
    fn one_replica_at_a_time_sweeps() {
        let Some((cluster, db)) = pg_or_skip("one_replica_at_a_time_sweeps") else { return };
        let dir = tempfile::tempdir().unwrap();
        let pool = PgPool::new(&options(cluster.url(&db))).unwrap();
        pool.prepare(dir.path()).unwrap();
        let mut s = Store::postgres(pool.clone());
        let a = s.submit("batches", "{}", "r", 0).unwrap();
        s.dequeue(&["batches".to_string()], "e", 10, |_| 1).unwrap().unwrap();
        let mut other = postgres::Client::connect(&cluster.url(&db), postgres::NoTls).unwrap();
        other.batch_execute(&format!("SELECT pg_advisory_lock({})", pg::SWEEP_LOCK)).unwrap();
        assert_eq!(s.reset_stalled(100, 2, "25s", 100).unwrap(), vec![]);
        assert_eq!(s.state(a).unwrap(), Some(JobState::Processing));
        other.batch_execute(&format!("SELECT pg_advisory_unlock({})", pg::SWEEP_LOCK)).unwrap();
        let r = s.reset_stalled(100, 2, "25s", 100).unwrap();
        assert_eq!(r, vec![jobs::Reset { id: a, queue: "batches".into(), new_state: JobState::Queued }]);
    }

    /// A replica whose data directory lacks the database's marker refuses to start.
    #[test]
    fn a_replica_on_another_data_directory_is_refused() {
        let Some((cluster, db)) = pg_or_skip("a_replica_on_another_data_directory_is_refused") else {
            return;
        };
        let (shared, local) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let pool = PgPool::new(&options(cluster.url(&db))).unwrap();
        pool.prepare(shared.path()).unwrap();
        pool.prepare(shared.path()).unwrap();
        let err = pool.prepare(local.path()).unwrap_err();
        assert!(matches!(err, StoreError::Marker(_)), "{err}");
        let text = err.to_string();
        assert!(text.contains("does not exist") && text.contains("shared directory"), "{text}");
        std::fs::write(local.path().join(pg::MARKER_FILE), "0123\n").unwrap();
        assert!(pool.prepare(local.path()).unwrap_err().to_string().contains("another database"));
    }

    /// No server: a store call fails as `Unavailable`, naming the database but not the password.
    #[test]
    fn an_unreachable_database_is_unavailable_without_the_password() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("postgres://queue:hunter2-password@127.0.0.1:{port}/jobsdb");
        let opts = options(url);
        assert_eq!(format!("{opts:?}"), format!("PgOptions(127.0.0.1:{port}/jobsdb)"));
        let mut s = Store::postgres(PgPool::new(&opts).unwrap());
        let err = s.state(1).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, StoreError::Unavailable(_)), "{text}");
        assert!(text.contains(&format!("127.0.0.1:{port}/jobsdb")) && !text.contains("hunter2"), "{text}");
        let tls = options("postgres://queue@db.example/x?sslmode=verify-full".into());
        assert!(tls.config().unwrap_err().contains("needs sslrootcert"));
        let bad = options("postgres://queue:hunter2-password@127.0.0.1:notaport/x".into());
        let why = bad.config().unwrap_err();
        assert!(!why.contains("hunter2"), "{why}");
    }
}
