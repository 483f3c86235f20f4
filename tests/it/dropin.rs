//! Operating as a drop-in for Sourcegraph's executor (issue 23): a unit whose `ExecStart` is the
//! bare binary, `run --verify`, Sourcegraph's settings (`EXECUTOR_MAXIMUM_RUNTIME_PER_JOB=0`,
//! `KUBERNETES_*`), its install commands, and its shutdown: SIGTERM and SIGHUP wait for the
//! running jobs, a forced stop leaves them unreported for the coordinator to requeue. All with the
//! shell runtime (explicit opt-in).

use crate::common::{self, Exec};
use crate::coordinator::Coordinator;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn configure(cmd: &mut Command, c: &Coordinator, state: &Path) {
    c.executor_env(cmd);
    cmd.env("EXECUTOR_QUEUE_NAME", "batches")
        .env("EXECUTOR_RUNTIME", "shell")
        .env("EXECUTOR_ALLOW_UNISOLATED", "1")
        .env("EXECUTOR_STATE_DIR", state)
        .env("EXECUTOR_HEARTBEAT_INTERVAL", "300ms")
        // No workspace disk: the mount of an executor a test kills would outlive its temp dir.
        .env("EXECUTOR_FIRECRACKER_DISK_SPACE", "0");
}

/// `executor ARGS` (none: the bare binary), configured for `c`, stderr piped.
fn spawn(c: &Coordinator, state: &Path, args: &[&str], env: &[(&str, &str)]) -> Child {
    let mut cmd = common::executor();
    configure(&mut cmd, c, state);
    cmd.args(args).envs(env.iter().copied()).stdout(Stdio::null()).stderr(Stdio::piped());
    cmd.spawn().expect("starting the executor")
}

fn signal(child: &Child, sig: &str) {
    Exec::program("kill").args(["-s", sig, &child.id().to_string()]).run();
}

fn entry<'a>(job: &'a Value, key: &str) -> Option<&'a Value> {
    job["logs"].as_array()?.iter().find(|e| e["key"] == key)
}

fn wait_for_output(c: &Coordinator, id: i64, needle: &str) {
    let mut job = Value::Null;
    let printed = common::poll_until(Duration::from_secs(20), || {
        job = c.job(id);
        entry(&job, "step.docker.0").and_then(|e| e["out"].as_str()).is_some_and(|o| o.contains(needle))
    });
    assert!(printed, "job {id} never printed {needle:?}: {job:#}");
}

/// The argv of a unit file's `ExecStart`, the binary replaced by the one under test.
fn exec_start(unit: &str) -> Vec<String> {
    let line = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("the unit has an ExecStart");
    line.split_whitespace().skip(1).map(String::from).collect()
}

/// Sourcegraph's unit (its executor's packaging runs the bare binary) and ours both start the
/// executor, which polls and runs a job.
#[test]
fn a_unit_whose_exec_start_is_the_bare_binary_polls_and_runs_jobs() {
    let sourcegraph = "[Service]\nExecStart=/usr/local/bin/executor\nRestart=on-failure\n";
    let ours = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/systemd/executor.service"),
    )
    .unwrap();
    assert_eq!(exec_start(sourcegraph), Vec::<String>::new());
    for unit in [sourcegraph, ours.as_str()] {
        let c = Coordinator::start();
        let state = tempfile::tempdir().unwrap();
        let args = exec_start(unit);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut ex = spawn(&c, state.path(), &args, &[("EXECUTOR_NUM_TOTAL_JOBS", "1")]);
        let id = c.submit(Coordinator::simple_job());
        c.wait_state(id, &["completed"], Duration::from_secs(30));
        let err = common::wait_exit_ok(&mut ex, Duration::from_secs(15));
        assert!(err.contains("polling batches"), "{unit}: {err}");
    }
}

#[test]
fn run_verify_checks_first_and_exits_1_when_a_check_fails() {
    let c = Coordinator::start();
    let state = tempfile::tempdir().unwrap();
    let id = c.submit(Coordinator::simple_job());
    let wrong = [("EXECUTOR_FRONTEND_PASSWORD", "a-wrong-secret-that-is-long-enough")];
    let mut ex = spawn(&c, state.path(), &["run", "--verify"], &wrong);
    let (status, err) = common::wait_exit(&mut ex, Duration::from_secs(15));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("refused the shared secret"), "{err}");
    assert_eq!(c.job(id)["state"], "queued", "nothing is dequeued after a failed check");

    let mut ex = spawn(&c, state.path(), &["run", "--verify"], &[("EXECUTOR_NUM_TOTAL_JOBS", "1")]);
    c.wait_state(id, &["completed"], Duration::from_secs(30));
    common::wait_exit_ok(&mut ex, Duration::from_secs(15));
}

/// Sourcegraph takes `EXECUTOR_MAXIMUM_RUNTIME_PER_JOB=0` as "no deadline"; so does this one
/// (it used to refuse to start). Sourcegraph's Kubernetes variables are named at start.
#[test]
fn sourcegraph_settings_zero_runtime_and_kubernetes_variables() {
    let c = Coordinator::start();
    let state = tempfile::tempdir().unwrap();
    let env = [
        ("EXECUTOR_NUM_TOTAL_JOBS", "1"),
        ("EXECUTOR_MAXIMUM_RUNTIME_PER_JOB", "0"),
        ("KUBERNETES_JOB_DEADLINE", "1200"),
        ("EXECUTOR_KUBERNETES_NAMESPACE", "executors"),
    ];
    let mut ex = spawn(&c, state.path(), &["run"], &env);
    let id = c.submit(Coordinator::simple_job());
    c.wait_state(id, &["completed"], Duration::from_secs(30));
    let err = common::wait_exit_ok(&mut ex, Duration::from_secs(15));
    for name in ["KUBERNETES_JOB_DEADLINE", "EXECUTOR_KUBERNETES_NAMESPACE"] {
        assert!(
            err.lines().any(|l| l.contains(name)
                && l.contains("no Kubernetes runtime")
                && l.contains("EXECUTOR_RUNTIME")),
            "{name} is not named with what replaces it:\n{err}"
        );
    }
}

#[test]
fn sourcegraph_install_commands_say_what_replaces_them() {
    for (args, says) in [
        (&["install", "ignite"][..], "ignite is not used"),
        (&["install", "cni", "--bin-dir", "/nonexistent"][..], "CNI plugins are not used"),
        (&["install", "image", "sandbox"][..], "sandbox image is not used"),
        (&["install", "iptables-rules", "--recreate-chain"][..], "no nftables table is needed"),
    ] {
        Exec::new().args(args).env("EXECUTOR_NETWORK", "none").stderr_has(says).run();
    }
}

/// SIGTERM, as a rolling restart sends it, waits for a running job as long as it takes (no
/// grace period by default, as Sourcegraph's executor); SIGHUP too.
#[test]
fn sigterm_and_sighup_let_a_long_job_finish() {
    let c = Coordinator::start();
    let state = tempfile::tempdir().unwrap();
    for sig in ["TERM", "HUP"] {
        let mut ex = spawn(&c, state.path(), &["run"], &[]);
        let long = if sig == "TERM" { "sleep 12" } else { "sleep 3" };
        let id = c.submit(json!({"dockerSteps": [{"image": "alpine", "commands": ["echo started", long, "echo finished"]}]}));
        wait_for_output(&c, id, "stdout: started");
        let t = Instant::now();
        signal(&ex, sig);
        let err = common::wait_exit_ok(&mut ex, Duration::from_secs(40));
        let job = c.wait_state(id, &["completed"], Duration::from_secs(1));
        assert!(entry(&job, "step.docker.0").unwrap()["out"].as_str().unwrap().contains("stdout: finished"));
        if sig == "TERM" {
            assert!(t.elapsed() >= Duration::from_secs(9), "exited after {:?}", t.elapsed());
        }
        assert!(
            err.contains(&format!("SIG{sig}: no more dequeues")) && err.contains("until they end"),
            "{err}"
        );
    }
}

/// Past `EXECUTOR_SHUTDOWN_GRACE`, or on a second signal, the running job is stopped and torn
/// down but not reported: the coordinator's stalled-job reset requeues it and another executor
/// runs it, where reporting it errored would fail it for good on Sourcegraph.
#[test]
fn a_forced_stop_leaves_the_job_to_the_coordinator_which_requeues_it() {
    let c = Coordinator::start_with(&["--stalled-max-age", "1s"]);
    let state = tempfile::tempdir().unwrap();
    for second_signal in [false, true] {
        let env: &[(&str, &str)] = if second_signal { &[] } else { &[("EXECUTOR_SHUTDOWN_GRACE", "1s")] };
        let mut ex = spawn(&c, state.path(), &["run"], env);
        // Slow the first time only: the requeued run finishes.
        let marker = state.path().join(format!("ran-{second_signal}"));
        let slow = format!("test -e {m} || {{ touch {m}; sleep 60; }}", m = marker.display());
        let id = c.submit(json!({"dockerSteps": [{"image": "alpine", "commands": ["echo started", slow, "echo finished"]}]}));
        wait_for_output(&c, id, "stdout: started");
        let first = c.job(id)["executorName"].clone();
        let t = Instant::now();
        signal(&ex, "TERM");
        if second_signal {
            std::thread::sleep(Duration::from_millis(300));
            signal(&ex, "INT");
        }
        let err = common::wait_exit_ok(&mut ex, Duration::from_secs(15));
        assert!(t.elapsed() < Duration::from_secs(8), "stopped after {:?}", t.elapsed());
        assert!(err.contains("without reporting them") && err.contains("requeues"), "{err}");
        let job = c.job(id);
        assert!(job["state"] == "processing" || job["state"] == "queued", "not reported: {job:#}");
        assert!(job["failureMessage"].is_null(), "{job:#}");
        // Another executor takes it once the coordinator requeues it.
        let mut second = spawn(&c, state.path(), &["run"], &[("EXECUTOR_NUM_TOTAL_JOBS", "1")]);
        let job = c.wait_state(id, &["completed"], Duration::from_secs(30));
        assert_ne!(job["executorName"], first, "{job:#}");
        common::wait_exit_ok(&mut second, Duration::from_secs(15));
    }
}

/// A TCP proxy on loopback in front of `upstream` (`host:port`) that sends what the upstream
/// answers at about `bytes_per_s` per connection: a slow link for the clone and the fetches,
/// while the small answers of the other routes still arrive at once.
fn throttled_proxy(upstream: String, bytes_per_s: usize) -> String {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in l.incoming().flatten() {
            let Ok(server) = std::net::TcpStream::connect(&upstream) else { continue };
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_in, &mut s_out);
                let _ = s_out.shutdown(std::net::Shutdown::Write);
            });
            let (mut s_in, mut c_out) = (server, client);
            std::thread::spawn(move || {
                let chunk = 4096;
                let mut buf = vec![0u8; chunk];
                loop {
                    match s_in.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if c_out.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            std::thread::sleep(Duration::from_secs_f64(n as f64 / bytes_per_s as f64));
                        }
                    }
                }
                let _ = c_out.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    format!("http://{addr}")
}

/// A cancel during the clone and during a file fetch, over a slow link, ends the job within
/// 2 s (git killed, the fetch abandoned), and the job's log says which command was interrupted.
#[test]
fn cancel_during_a_slow_clone_or_file_fetch_ends_within_2s() {
    let c = Coordinator::start();
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("big");
    std::fs::create_dir_all(&repo).unwrap();
    common::sh(
        &repo,
        "git init -q -b main . && head -c 3000000 /dev/urandom > big.bin && git add -A && git commit -qm big",
    );
    let commit = common::sh(&repo, "git rev-parse HEAD");
    let big = tmp.path().join("big.bin");
    std::fs::copy(repo.join("big.bin"), &big).unwrap();
    let admin = |args: &[&str]| Exec::new().with(|cmd| c.admin_env(cmd)).arg("queue").args(args).run();
    admin(&["repo", "add", "github.com/acme/big", repo.to_str().unwrap()]);
    admin(&["files", "put", "batch-changes", "spec/big.bin", big.to_str().unwrap()]);

    let upstream = c.url.trim_start_matches("http://").trim_end_matches('/').to_string();
    let slow = throttled_proxy(upstream, 64 << 10);
    let state = tempfile::tempdir().unwrap();
    let mut ex = spawn(
        &c,
        state.path(),
        &["run"],
        &[("EXECUTOR_FRONTEND_URL", &slow), ("EXECUTOR_NUM_TOTAL_JOBS", "2")],
    );
    let jobs = [
        (
            json!({"repositoryName": "github.com/acme/big", "commit": commit, "dockerSteps": [{"image": "alpine", "commands": ["true"]}]}),
            "setup.git.fetch",
        ),
        (
            json!({"files": {"big.bin": {"bucket": "batch-changes", "key": "spec/big.bin"}}, "dockerSteps": [{"image": "alpine", "commands": ["true"]}]}),
            "setup.fs.extras",
        ),
    ];
    for (job, key) in jobs {
        let id = c.submit(job);
        common::wait_until(&format!("job {id} to start {key}"), Duration::from_secs(30), || {
            entry(&c.job(id), key).is_some()
        });
        std::thread::sleep(Duration::from_millis(700));
        let t = Instant::now();
        let (code, body) = c.request("POST", &format!("/api/jobs/{id}/cancel"), Some(&c.admin_auth()), None);
        assert!(code < 300, "cancel: {code} {body}");
        let job = c.wait_state(id, &["canceled"], Duration::from_secs(10));
        let took = t.elapsed();
        assert!(took < Duration::from_secs(2), "{key}: canceled after {took:?}");
        let out = entry(&job, key).unwrap()["out"].as_str().unwrap_or("").to_string();
        assert!(out.contains("interrupted: the job was canceled"), "{key}: {out}");
        assert!(entry(&job, "step.docker.0").is_none(), "{job:#}");
    }
    common::wait_exit_ok(&mut ex, Duration::from_secs(15));
}
