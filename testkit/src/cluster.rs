//! A throwaway PostgreSQL cluster for the tests (`scripts/bench-queue` starts its own the same
//! way, in shell): `initdb` into a temporary directory and `pg_ctl` on a free loopback port (as
//! the `postgres` user when this process is root: PostgreSQL refuses to run as root). Dropping it
//! stops the server and removes the directory; a reaper process does the same when this process
//! dies without dropping it (a panic that aborts, a kill, or a cluster shared through a
//! `static`).

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

/// `program` with an empty environment plus `PATH`, as the executor starts its children
/// (`executor::base::proc::command`): PostgreSQL's tools read `PG*` variables, which a test's
/// environment must not steer.
fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd
}

/// The newest installed PostgreSQL's `bin` directory (Debian's layout), if any.
pub fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

/// A running throwaway cluster; the superuser is `postgres`, trusted on loopback.
pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    /// `Some((uid, gid))` of the `postgres` user when this process is root.
    owner: Option<(u32, u32)>,
    reaper: Option<(Child, ChildStdin)>,
}

impl Cluster {
    /// Creates and starts a cluster; `Err` says why it cannot (PostgreSQL missing, ...).
    pub fn start() -> Result<Cluster, String> {
        let bin = bin_dir().ok_or("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb)")?;
        let owner = if crate::skip::is_root() {
            let user = nix::unistd::User::from_name("postgres")
                .map_err(|e| format!("looking up the postgres user: {e}"))?
                .ok_or("running as root needs a postgres user to run PostgreSQL as")?;
            Some((user.uid.as_raw(), user.gid.as_raw()))
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("executor-pg-")
            .tempdir()
            .map_err(|e| format!("creating a temporary directory: {e}"))?
            .keep();
        let mut cluster = Cluster { dir, bin, port: 0, owner, reaper: None };
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&cluster.dir, Some(uid), Some(gid))
                .map_err(|e| format!("handing {} to the postgres user: {e}", cluster.dir.display()))?;
        }
        cluster.spawn_reaper()?;
        let data = cluster.data();
        cluster.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-A".as_ref(),
                "trust".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--locale=C".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("finding a free loopback port: {e}"))?
            .port();
        cluster.port = port;
        cluster.start_server()?;
        Ok(cluster)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` for the superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates an empty database.
    pub fn create_database(&self, name: &str) -> Result<(), String> {
        let mut client = postgres::Client::connect(&self.url("postgres"), postgres::NoTls)
            .map_err(|e| format!("connecting to the test cluster: {e}"))?;
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .map_err(|e| format!("creating database {name}: {e}"))
    }

    /// Stops the server (fast shutdown: open connections are cut).
    pub fn stop(&self) -> Result<(), String> {
        let data = self.data();
        self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                "fast".as_ref(),
                "-w".as_ref(),
                "stop".as_ref(),
            ],
        )
    }

    /// Starts the stopped server again on the same port.
    pub fn start_server(&self) -> Result<(), String> {
        let data = self.data();
        let log = self.dir.join("server.log");
        let options = format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{}' -c max_connections=300 \
             -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            self.port,
            self.dir.display()
        );
        self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-o".as_ref(),
                options.as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "start".as_ref(),
            ],
        )
    }

    /// The server's log so far, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    fn tool(&self, name: &str) -> Command {
        let path = self.bin.join(name);
        match self.owner {
            Some(_) => {
                let mut c = command("runuser");
                c.args(["-u", "postgres", "--"]).arg(path);
                c
            }
            None => command(path),
        }
    }

    fn run(&self, tool: &str, args: &[&OsStr]) -> Result<(), String> {
        let out = self
            .tool(tool)
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running {tool}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{tool} failed ({}): {}{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            ));
        }
        Ok(())
    }

    /// A shell that waits for its stdin to close (when this `Cluster` drops, or this process
    /// ends however it ends), then stops the server and removes the directory.
    fn spawn_reaper(&mut self) -> Result<(), String> {
        let pg_ctl = self.bin.join("pg_ctl");
        let as_owner = if self.owner.is_some() { "runuser -u postgres -- " } else { "" };
        let script = format!(
            "read _ignored; {as_owner}\"$0\" -D \"$1/data\" -m immediate -w stop >/dev/null 2>&1; rm -rf \"$1\""
        );
        let mut child = command("sh")
            .arg("-c")
            .arg(script)
            .arg(&pg_ctl)
            .arg(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("starting the cleanup shell: {e}"))?;
        let stdin = child.stdin.take().ok_or("the cleanup shell has no stdin")?;
        self.reaper = Some((child, stdin));
        Ok(())
    }

    /// The cluster's directory (removed when it drops).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some((mut child, mut stdin)) = self.reaper.take() {
            let _ = stdin.write_all(b"\n");
            drop(stdin);
            let _ = child.wait();
        }
    }
}
