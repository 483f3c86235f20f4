//! Several coordinator replicas on one PostgreSQL database (a throwaway cluster this test
//! starts) behind a small loopback balancer, with real executors (shell runtime): every job runs
//! exactly once through a replica's SIGKILL and a database restart; a replica with a data
//! directory of its own is refused; requests during the outage get 503 and service resumes.

use crate::common::{self, Exec};
use crate::coordinator::Coordinator;
use serde_json::{json, Value};
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use testkit::cluster::Cluster;

/// A TCP balancer on loopback: each connection goes to the next replica that accepts one, as a
/// load balancer in front of the replicas would.
struct Balancer {
    url: String,
    stop: Arc<AtomicBool>,
}

impl Balancer {
    fn start(backends: Vec<String>) -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            let mut next = 0;
            for client in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                let upstream = (0..backends.len())
                    .find_map(|i| TcpStream::connect(&backends[(next + i) % backends.len()]).ok());
                next += 1;
                if let Some(upstream) = upstream {
                    pipe(client, upstream);
                }
            }
        });
        Balancer { url, stop }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.url.trim_start_matches("http://"));
    }
}

fn pipe(a: TcpStream, b: TcpStream) {
    let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let (mut a, mut b) = (a, b);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut a, &mut b);
        let _ = b.shutdown(std::net::Shutdown::Write);
    });
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut b2, &mut a2);
        let _ = a2.shutdown(std::net::Shutdown::Write);
    });
}

fn host_port(c: &Coordinator) -> String {
    c.url.trim_start_matches("http://").to_string()
}

/// A job that records its run in `runs` (one line with its token), takes a moment, and
/// uploads an artifact.
fn job(token: &str, runs: &Path) -> Value {
    json!({
        "dockerSteps": [{"key": "run", "image": "alpine", "dir": "", "env": [],
            "commands": [format!("echo {token} >> {}", runs.display()), "sleep 0.4", format!("echo {token} > out.txt")]}],
        "artifacts": ["out.txt"]
    })
}

fn spawn_executor(url: &str, secret: &str, state: &Path) -> Child {
    let mut cmd = common::executor();
    cmd.env("EXECUTOR_FRONTEND_URL", url)
        .env("EXECUTOR_FRONTEND_PASSWORD", secret)
        .env("EXECUTOR_QUEUE_NAME", "batches")
        .env("EXECUTOR_RUNTIME", "shell")
        .env("EXECUTOR_ALLOW_UNISOLATED", "1")
        .env("EXECUTOR_STATE_DIR", state)
        .env("EXECUTOR_HEARTBEAT_INTERVAL", "300ms")
        .env("EXECUTOR_QUEUE_POLL_INTERVAL", "200ms")
        .arg("loop")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd.spawn().expect("starting executor loop")
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_string).collect()
}

#[test]
fn replicas_on_postgres_run_every_job_once_through_a_kill_and_a_restart() {
    let test = "replicas_on_postgres_run_every_job_once_through_a_kill_and_a_restart";
    let cluster = match Cluster::start() {
        Ok(c) => c,
        Err(why) => return common::skip(test, "postgres", &why),
    };
    cluster.create_database("queue").unwrap();
    let database = cluster.url("queue");
    let shared = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    // The shell runtime's jobs (this test's own files) write here as whatever user runs them.
    std::fs::set_permissions(work.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let runs = work.path().join("runs");
    let args = ["--stalled-max-age", "10s"];

    // Three replicas starting at once on the empty database.
    let first = Coordinator::start_replica(None, &database, shared.path(), &args);
    let peer = (first.secret.clone(), first.admin_token.clone());
    let others: Vec<Coordinator> = (0..2)
        .map(|_| {
            let (peer, database, shared) = (peer.clone(), database.clone(), shared.path().to_path_buf());
            std::thread::spawn(move || {
                Coordinator::start_replica(Some((&peer.0, &peer.1)), &database, &shared, &args)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let mut replicas = vec![first];
    replicas.extend(others);

    // A replica whose data directory is its own is refused before it serves.
    let local = tempfile::tempdir().unwrap();
    // (Under `timeout`: a replica that wrongly starts would serve until killed.)
    let out = Exec::program("timeout")
        .arg("60")
        .arg(common::bin())
        .args(["queue", "serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(local.path())
        .args(["--database", &database])
        .env("EXECUTOR_FRONTEND_PASSWORD", &peer.0)
        .env("EXECUTOR_QUEUE_ADMIN_TOKEN", &peer.1)
        .fails()
        .stderr_has("is not the one the other coordinators")
        .run();
    drop(out);

    // A console sign-in through one replica holds on another (the sessions are in the store).
    let agent = ureq::AgentBuilder::new().redirects(0).build();
    let signed_in = agent
        .post(&format!("{}/admin/sign-in", replicas[0].url))
        .send_form(&[("token", peer.1.as_str())])
        .unwrap();
    assert_eq!(signed_in.status(), 303);
    let cookie = signed_in.header("set-cookie").unwrap().split(';').next().unwrap().to_string();
    let page = |r: &Coordinator, cookie: Option<&str>| {
        let mut req = agent.get(&format!("{}/admin/jobs", r.url));
        if let Some(c) = cookie {
            req = req.set("Cookie", c);
        }
        req.call().map(|r| r.status()).unwrap_or_else(|e| panic!("console page: {e}"))
    };
    assert_eq!(page(&replicas[2], None), 303, "no session: to the sign-in form");
    assert_eq!(page(&replicas[2], Some(&cookie)), 200, "the session of replica 0 on replica 2");

    let balancer = Balancer::start(replicas.iter().map(host_port).collect());
    let tokens: Vec<String> = (0..24).map(|i| format!("job-{i}-{}", uuid::Uuid::new_v4().simple())).collect();
    let ids: Vec<i64> = tokens.iter().map(|t| replicas[0].submit(job(t, &runs))).collect();
    let states: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut executors: Vec<Child> =
        states.iter().map(|s| spawn_executor(&balancer.url, &peer.0, s.path())).collect();

    // SIGKILL a replica while jobs run.
    common::wait_until("four jobs to start", Duration::from_secs(60), || lines(&runs).len() >= 4);
    replicas[1].kill();

    // Restart PostgreSQL mid-run: the replicas answer 503 meanwhile, naming the database.
    common::wait_until("ten jobs to start", Duration::from_secs(60), || lines(&runs).len() >= 10);
    cluster.stop().unwrap();
    let (code, body) =
        replicas[2].request("GET", &format!("/api/jobs/{}", ids[0]), Some(&replicas[2].admin_auth()), None);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(&format!("127.0.0.1:{}/queue", cluster.port())), "{body}");
    std::thread::sleep(Duration::from_millis(500));
    cluster.start_server().unwrap();
    // Service resumes by itself.
    common::wait_until("the replicas to reach the database again", Duration::from_secs(30), || {
        replicas[2].request("GET", &format!("/api/jobs/{}", ids[0]), Some(&replicas[2].admin_auth()), None).0
            == 200
    });

    let done = common::poll_until(Duration::from_secs(180), || {
        ids.iter().all(|id| replicas[0].job(*id)["state"] == "completed")
    });
    let ran = lines(&runs);
    for e in &mut executors {
        let _ = Exec::program("kill").args(["-s", "TERM", &e.id().to_string()]).any_status().run();
    }
    for e in &mut executors {
        common::wait_exit(e, Duration::from_secs(30));
    }
    let states_left: Vec<Value> = ids.iter().map(|id| replicas[0].job(*id)["state"].clone()).collect();
    assert!(done, "not every job completed: {states_left:?}\n{}", cluster.log());
    for t in &tokens {
        let n = ran.iter().filter(|l| *l == t).count();
        assert_eq!(n, 1, "job {t} ran {n} times: {ran:#?}");
    }
    assert_eq!(ran.len(), tokens.len(), "{ran:#?}");
    // Artifacts uploaded through any replica are there through every other one.
    let last = *ids.last().unwrap();
    for r in [&replicas[0], &replicas[2]] {
        let files = r.artifacts(last);
        assert_eq!(files.len(), 1, "{files:?}");
        assert_eq!(String::from_utf8_lossy(&files[0].1).trim(), tokens.last().unwrap());
    }
    let _ = std::io::stderr().flush();
}
