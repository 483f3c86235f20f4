//! The PostgreSQL backend's plumbing: the connection settings (the URL is a secret when it
//! carries a password), the pool with its timeouts, what counts as "the database is
//! unavailable" (a 503 for the caller), the migrations under an advisory lock, the marker that
//! proves every replica shares one data directory, and the `LISTEN` thread that wakes this
//! replica's waiting dequeues when another replica queues a job.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use super::pg_tls::{self, MakeRustls};
use super::{Result, StoreError, MIGRATIONS};
use crate::base::secret::Secret;

/// The channel `NOTIFY` wakes the replicas' dequeues on.
pub(crate) const JOBS_CHANNEL: &str = "executor_jobs";
/// Advisory lock keys (one 64-bit space per database; these spell "exec-mig" and "exec-swp").
pub(crate) const MIGRATION_LOCK: i64 = 0x6578_6563_2d6d_6967;
pub(crate) const SWEEP_LOCK: i64 = 0x6578_6563_2d73_7770;
/// How long a connection attempt, and a wait for a pooled connection, may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The most connections one replica holds.
pub(crate) const POOL_SIZE: u32 = 16;
/// The file in the data directory that must hold the database's marker.
pub(crate) const MARKER_FILE: &str = "database-marker";

/// Where the PostgreSQL database is: its URL (a secret: it may carry the password) and,
/// apart, a password read from a file.
#[derive(Clone)]
pub struct PgOptions {
    pub url: Secret,
    pub password: Option<Secret>,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.config() {
            Ok((_, target)) => write!(f, "PgOptions({target})"),
            Err(_) => f.write_str("PgOptions(<invalid>)"),
        }
    }
}

/// Whether `url` names a PostgreSQL database (rather than being a mistake for one).
pub(crate) fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

impl PgOptions {
    /// The client configuration with the store's timeouts, and `host:port/database` for
    /// messages (never the password).
    pub fn config(&self) -> std::result::Result<(postgres::Config, String), String> {
        self.client().map(|(config, target, _)| (config, target))
    }

    /// The client configuration, `host:port/database`, and the TLS connector the URL's
    /// `sslmode` and certificates ask for (see `pg_tls`).
    pub(crate) fn client(&self) -> std::result::Result<(postgres::Config, String, MakeRustls), String> {
        let url = self.url.expose();
        if !is_postgres_url(url) {
            return Err("the database URL must start with postgres:// or postgresql://".into());
        }
        let (url, tls) = pg_tls::split_url(url)?;
        // The parser's own messages may quote the URL, password included: say what is wrong
        // without them.
        let mut config = postgres::Config::from_str(&url).map_err(|_| {
            "the database URL does not parse: expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
                .to_string()
        })?;
        if let Some(p) = &self.password {
            config.password(p.expose());
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.keepalives(true).keepalives_idle(Duration::from_secs(30));
        config.application_name("executor-queue");
        let host = match config.get_hosts().first() {
            Some(postgres::config::Host::Tcp(h)) => h.clone(),
            Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let db = config.get_dbname().unwrap_or("").to_string();
        config.ssl_mode(tls.mode.client_mode());
        if config.get_user().is_none() {
            return Err(format!("the database URL for {host}:{port}/{db} names no user"));
        }
        let connector = MakeRustls::new(pg_tls::client_config(&tls)?);
        Ok((config, format!("{host}:{port}/{db}"), connector))
    }
}

/// A PostgreSQL failure as the store reports it: a lost or refused connection (or a server
/// shutting down) is `Unavailable`, which the HTTP side answers with 503; anything else is a
/// failure of the statement.
pub(crate) fn error(e: postgres::Error, target: &str) -> StoreError {
    let unavailable = e.is_closed()
        || std::error::Error::source(&e).is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some())
        || e.code().is_some_and(|c| {
            let c = c.code();
            c.starts_with("08") || c.starts_with("57P") || c == "53300"
        });
    if unavailable {
        StoreError::Unavailable(format!("the PostgreSQL database {target} is unavailable: {}", chain(&e)))
    } else {
        StoreError::Postgres { target: target.to_string(), source: e }
    }
}

/// The error with its causes: "error performing TLS handshake" alone does not say that the
/// certificate names another host.
fn chain(e: &postgres::Error) -> String {
    let mut why = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !why.ends_with(&text) {
            why = format!("{why}: {text}");
        }
        cause = c.source();
    }
    why
}

/// A connection that could not be made (a refused TLS handshake included): the database is
/// unavailable to this replica, whatever the reason, which the message gives.
fn connect_error(e: postgres::Error, target: &str) -> StoreError {
    StoreError::Unavailable(format!("the PostgreSQL database {target} is unavailable: {}", chain(&e)))
}

/// Why the pool could not make a connection (the error with its causes).
#[derive(Debug)]
pub struct ConnectError(String);

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConnectError {}

/// One pooled connection with its prepared statements.
pub struct PgConn {
    pub client: PgClient,
    pub cache: HashMap<String, postgres::Statement>,
}

/// A blocking client that may be dropped anywhere: `postgres::Client` closes its connection by
/// running its own small runtime, which panics on a thread that drives async tasks (the pool
/// going away in `queue serve`'s async code, for instance when a replica refuses to start); such
/// a drop hands the client to a short-lived thread instead.
pub struct PgClient(Option<postgres::Client>);

impl std::ops::Deref for PgClient {
    type Target = postgres::Client;
    fn deref(&self) -> &postgres::Client {
        self.0.as_ref().expect("a PgClient holds its client until it is dropped")
    }
}

impl std::ops::DerefMut for PgClient {
    fn deref_mut(&mut self) -> &mut postgres::Client {
        self.0.as_mut().expect("a PgClient holds its client until it is dropped")
    }
}

impl Drop for PgClient {
    fn drop(&mut self) {
        let Some(client) = self.0.take() else { return };
        if tokio::runtime::Handle::try_current().is_ok() {
            // If the thread cannot start, the client is dropped with the closure here, which
            // is what would have happened anyway.
            let _ = std::thread::Builder::new().name("pg-close".into()).spawn(move || drop(client));
        }
    }
}

pub struct Manager {
    config: postgres::Config,
    tls: MakeRustls,
}

impl r2d2::ManageConnection for Manager {
    type Connection = PgConn;
    type Error = ConnectError;

    fn connect(&self) -> std::result::Result<PgConn, ConnectError> {
        let client = self.config.connect(self.tls.clone()).map_err(|e| ConnectError(chain(&e)))?;
        Ok(PgConn { client: PgClient(Some(client)), cache: HashMap::new() })
    }

    fn is_valid(&self, conn: &mut PgConn) -> std::result::Result<(), ConnectError> {
        conn.client.simple_query("").map(|_| ()).map_err(|e| ConnectError(chain(&e)))
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        conn.client.is_closed()
    }
}

/// The replica's connection pool: cheap to clone.
#[derive(Clone)]
pub struct PgPool {
    pub(super) pool: r2d2::Pool<Manager>,
    pub(super) config: postgres::Config,
    tls: MakeRustls,
    /// Set once [`PgPool::prepare`] succeeded: until then the schema may be behind, and every
    /// store call is `Unavailable` (a replica that started while its database was down).
    ready: Arc<std::sync::atomic::AtomicBool>,
    /// `host:port/database`, for messages.
    pub target: Arc<str>,
}

impl PgPool {
    /// A pool on `opts` (no connection is made yet). A checkout waits at most
    /// [`CONNECT_TIMEOUT`] for a free or new connection.
    pub fn new(opts: &PgOptions) -> Result<PgPool> {
        let (config, target, tls) = opts.client().map_err(StoreError::Config)?;
        let pool = r2d2::Pool::builder()
            .max_size(POOL_SIZE)
            .min_idle(Some(POOL_SIZE / 2))
            .connection_timeout(CONNECT_TIMEOUT)
            .test_on_check_out(false)
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build_unchecked(Manager { config: config.clone(), tls: tls.clone() });
        Ok(PgPool { pool, config, tls, ready: Default::default(), target: target.into() })
    }

    /// A connection from the pool, or `Unavailable` after [`CONNECT_TIMEOUT`] (at once before
    /// the database was prepared).
    pub fn get(&self) -> Result<r2d2::PooledConnection<Manager>> {
        if !self.is_ready() {
            return Err(StoreError::Unavailable(format!(
                "the PostgreSQL database {} is unavailable: not reached since this coordinator started",
                self.target
            )));
        }
        self.pool.get().map_err(|e| {
            StoreError::Unavailable(format!("the PostgreSQL database {} is unavailable: {e}", self.target))
        })
    }

    /// A connection of its own, outside the pool.
    pub fn connect(&self) -> Result<postgres::Client> {
        self.config.connect(self.tls.clone()).map_err(|e| connect_error(e, &self.target))
    }

    /// Runs the pending migrations under an advisory lock, so replicas starting at once take
    /// turns, then checks (or, first, sets) the marker that ties `data_dir` to this database.
    pub fn prepare(&self, data_dir: &Path) -> Result<()> {
        let mut client = self.connect()?;
        let target = self.target.clone();
        let e = |e| error(e, &target);
        client.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK})")).map_err(e)?;
        let done = migrate(&mut client, &target).and_then(|_| check_marker(&mut client, &target, data_dir));
        let unlocked =
            client.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})")).map_err(e);
        done?;
        unlocked?;
        self.ready.store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Whether [`PgPool::prepare`] succeeded.
    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Brings the schema to `MIGRATIONS.len()`; `executor_schema` records how many ran.
fn migrate(client: &mut postgres::Client, target: &str) -> Result<()> {
    let e = |e| error(e, target);
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS executor_schema (version BIGINT NOT NULL); \
             CREATE TABLE IF NOT EXISTS executor_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        )
        .map_err(e)?;
    let version: Option<i64> =
        client.query_opt("SELECT version FROM executor_schema", &[]).map_err(e)?.map(|r| r.get(0));
    let version = match version {
        Some(v) => v,
        None => {
            client.execute("INSERT INTO executor_schema (version) VALUES (0)", &[]).map_err(e)?;
            0
        }
    };
    if version as usize > MIGRATIONS.len() {
        return Err(StoreError::TooNew { found: version, known: MIGRATIONS.len() });
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let mut tx = client.transaction().map_err(e)?;
        tx.batch_execute(m.postgres).map_err(|source| StoreError::Postgres {
            target: format!("{target}: running migration {}", i + 1),
            source,
        })?;
        tx.execute("UPDATE executor_schema SET version = $1", &[&((i + 1) as i64)]).map_err(e)?;
        tx.commit().map_err(e)?;
    }
    Ok(())
}

/// The first replica on a database puts a random marker in the database and in `data_dir`;
/// every later one must find the database's marker in its `data_dir`, or it would keep
/// artifacts and files where the other replicas never look.
fn check_marker(client: &mut postgres::Client, target: &str, data_dir: &Path) -> Result<()> {
    let e = |e| error(e, target);
    let file = data_dir.join(MARKER_FILE);
    let stored: Option<String> = client
        .query_opt("SELECT value FROM executor_meta WHERE key = 'data_dir_marker'", &[])
        .map_err(e)?
        .map(|r| r.get(0));
    match stored {
        None => {
            use rand::RngCore;
            let mut raw = [0u8; 16];
            rand::thread_rng().fill_bytes(&mut raw);
            let marker = hex::encode(raw);
            crate::base::fs::write_atomic(&file, format!("{marker}\n").as_bytes())
                .map_err(|source| StoreError::Marker(format!("writing {}: {source:#}", file.display())))?;
            client
                .execute("INSERT INTO executor_meta (key, value) VALUES ('data_dir_marker', $1)", &[&marker])
                .map_err(e)?;
            Ok(())
        }
        Some(marker) => {
            let found = std::fs::read_to_string(&file).ok().map(|s| s.trim().to_string());
            if found.as_deref() == Some(marker.as_str()) {
                return Ok(());
            }
            let what = match found {
                None => format!("{} does not exist", file.display()),
                Some(_) => format!("{} holds the marker of another database", file.display()),
            };
            Err(StoreError::Marker(format!(
                "the data directory {} is not the one the other coordinators of database {target} use ({what}): \
                 with PostgreSQL every replica needs --data-dir on one shared directory, or artifacts and \
                 files stored through one replica are missing on the others; mount the directory the \
                 first replica used",
                data_dir.display()
            )))
        }
    }
}

/// Starts the thread that `LISTEN`s on [`JOBS_CHANNEL`] and calls `wake` for each
/// notification, and once after each (re)connection, since notifications sent while it was
/// disconnected are lost. It reconnects by itself after a database restart.
pub(crate) fn spawn_listener(pool: &PgPool, wake: impl Fn() + Send + 'static) -> std::io::Result<()> {
    let pool = pool.clone();
    std::thread::Builder::new().name("queue-listen".into()).spawn(move || {
        let mut reported = false;
        loop {
            let mut client = match pool.connect() {
                Ok(c) => c,
                Err(e) => {
                    if !reported {
                        tracing::warn!("job notifications paused: {e}");
                        reported = true;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            if client.batch_execute(&format!("LISTEN {JOBS_CHANNEL}")).is_err() {
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            if reported {
                tracing::info!("job notifications from {} resumed", pool.target);
                reported = false;
            }
            wake();
            loop {
                use postgres::fallible_iterator::FallibleIterator;
                let next = client.notifications().timeout_iter(Duration::from_secs(5)).next();
                match next {
                    Ok(Some(_)) => wake(),
                    // A quiet channel: make sure the connection still stands.
                    Ok(None) if client.simple_query("").is_ok() => {}
                    _ => break,
                }
            }
        }
    })?;
    Ok(())
}
