//! The executor pipeline against the real coordinator: the stages by hand (piped and resumed
//! from files), failures, bad documents, redaction, and `executor loop` with cancel, deadline,
//! SIGTERM drain and a SIGKILLed executor. All with the shell runtime (explicit opt-in).

use crate::common::{self, Exec};
use crate::coordinator::Coordinator;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The executor with the coordinator's URL and secret, the batches queue, the shell runtime.
fn exe(c: &Coordinator, state: &Path) -> Command {
    let mut cmd = common::executor();
    configure(&mut cmd, c, state);
    cmd
}

fn configure(cmd: &mut Command, c: &Coordinator, state: &Path) {
    c.executor_env(cmd);
    cmd.env("EXECUTOR_QUEUE_NAME", "batches")
        .env("EXECUTOR_RUNTIME", "shell")
        .env("EXECUTOR_ALLOW_UNISOLATED", "1")
        .env("EXECUTOR_STATE_DIR", state)
        .env("EXECUTOR_HEARTBEAT_INTERVAL", "300ms");
}

/// A stage (or any subcommand) of the executor, as `exe` configures it.
fn executor(c: &Coordinator, state: &Path) -> Exec {
    Exec::new().with(|cmd| configure(cmd, c, state))
}

/// Runs a stage whatever its status.
fn stage(c: &Coordinator, state: &Path, args: &[&str]) -> Output {
    executor(c, state).args(args).any_status().run()
}

/// Runs a stage that must succeed.
#[track_caller]
fn stage_ok(c: &Coordinator, state: &Path, args: &[&str]) -> Output {
    executor(c, state).args(args).run()
}

fn doc(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn entry<'a>(job: &'a Value, key: &str) -> Option<&'a Value> {
    job["logs"].as_array()?.iter().find(|e| e["key"] == key)
}

fn keys(job: &Value) -> Vec<String> {
    job["logs"]
        .as_array()
        .map(|a| a.iter().map(|e| e["key"].as_str().unwrap_or("").to_string()).collect())
        .unwrap_or_default()
}

fn workspaces_left(state: &Path) -> Vec<String> {
    std::fs::read_dir(state.join("workspaces"))
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

fn wait_for_output(c: &Coordinator, id: i64, key: &str, needle: &str) {
    let mut job = Value::Null;
    let printed = common::poll_until(Duration::from_secs(20), || {
        job = c.job(id);
        entry(&job, key).and_then(|e| e["out"].as_str()).is_some_and(|o| o.contains(needle))
    });
    assert!(printed, "job {id} never printed {needle:?} in {key}: {job:#}");
}

fn spawn_loop(c: &Coordinator, state: &Path, env: &[(&str, &str)]) -> Child {
    let mut cmd = exe(c, state);
    cmd.arg("loop").envs(env.iter().copied()).stdout(Stdio::null()).stderr(Stdio::piped());
    cmd.spawn().expect("starting executor loop")
}

fn signal(child: &Child, sig: &str) {
    Exec::program("kill").args(["-s", sig, &child.id().to_string()]).run();
}

fn sample_job() -> Value {
    json!({
        "files": {"in.txt": {"content": "hello-file"}},
        "dockerSteps": [
            {"key": "make", "image": "alpine", "dir": "", "env": ["GREETING=hi"],
             "commands": ["mkdir -p out", "tr a-z A-Z < in.txt > out/result.txt", "echo $GREETING built"]},
            {"image": "alpine", "dir": "out", "env": [], "commands": ["ls"]}
        ],
        "artifacts": ["out/*.txt"]
    })
}

#[test]
fn six_stages_piped_by_hand_complete_a_job() {
    let c = Coordinator::start();
    let state = tempfile::tempdir().unwrap();
    let id = c.submit(sample_job());
    let bin = common::bin();
    let b = bin.display();
    let pipeline = format!(
        "{b} dequeue | {b} prepare-workspace | {b} vm-boot | {b} run-steps | {b} upload | {b} complete"
    );
    let out =
        Exec::program("/bin/sh").with(|sh| configure(sh, &c, state.path())).args(["-c", &pipeline]).run();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("NO ISOLATION"), "the shell runtime must say so loudly: {stderr}");
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["completion"]["reported"], "completed", "{d:#}");
    assert!(d.get("outcome").is_none());
    let stages: Vec<&str> =
        d["history"].as_array().unwrap().iter().map(|h| h["stage"].as_str().unwrap()).collect();
    assert_eq!(stages, ["prepare-workspace", "vm-boot", "run-steps", "upload", "complete"]);

    let job = c.wait_state(id, &["completed"], Duration::from_secs(10));
    assert_eq!(
        keys(&job),
        [
            "setup.fs.extras",
            "setup.shell.start",
            "step.docker.make",
            "step.docker.1",
            "upload.artifacts",
            "teardown.shell.remove",
            "teardown.fs"
        ]
    );
    let make = entry(&job, "step.docker.make").unwrap();
    assert_eq!(make["exitCode"], 0);
    assert!(make["durationMs"].is_i64());
    let out = make["out"].as_str().unwrap();
    assert!(out.contains("stdout: hi built\n"), "{out}");
    assert!(out.contains("stderr: + echo hi built\n"), "commands are traced: {out}");
    assert!(entry(&job, "step.docker.1").unwrap()["out"].as_str().unwrap().contains("stdout: result.txt\n"));
    let files = c.artifacts(id);
    assert_eq!(files, vec![("out/result.txt".to_string(), b"HELLO-FILE".to_vec())]);
    assert!(workspaces_left(state.path()).is_empty(), "{:?}", workspaces_left(state.path()));
}

#[test]
fn document_saved_after_vm_boot_resumes_later_and_complete_twice_is_safe() {
    // A short stall timeout: only the stage processes' heartbeats keep the job.
    let c = Coordinator::start_with(&["--stalled-max-age", "2s"]);
    let state = tempfile::tempdir().unwrap();
    let mut job = sample_job();
    job["dockerSteps"][1]["commands"] = json!(["sleep 3", "ls"]);
    let id = c.submit(job);
    let d = state.path().join("doc.json");
    let ds = d.to_str().unwrap();
    stage_ok(&c, state.path(), &["dequeue", "-o", ds]);
    for s in ["prepare-workspace", "vm-boot"] {
        stage_ok(&c, state.path(), &[s, "-i", ds, "-o", ds]);
    }
    let saved = doc(&d);
    let ws = saved["workspace"]["path"].as_str().unwrap().to_string();
    assert!(Path::new(&ws).join("in.txt").exists());
    assert!(Path::new(saved["sandbox"]["stateDir"].as_str().unwrap()).exists());
    assert_eq!(c.job(id)["state"], "processing");
    // Later (a new process, nothing in memory): the rest of the stages.
    std::thread::sleep(Duration::from_millis(500));
    for s in ["run-steps", "upload", "complete"] {
        stage_ok(&c, state.path(), &[s, "-i", ds, "-o", ds]);
    }
    let done = doc(&d);
    assert_eq!(done["completion"]["reported"], "completed");
    assert_eq!(done["completion"]["workspaceRemoved"], true);
    assert!(!Path::new(&ws).exists());
    c.wait_state(id, &["completed"], Duration::from_secs(5));
    let again = stage_ok(&c, state.path(), &["complete", "-i", ds]);
    let again: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["completion"], done["completion"]);
    assert_eq!(c.job(id)["state"], "completed");
}

#[test]
fn failing_step_errors_the_job_and_keeps_its_output() {
    let c = Coordinator::start();
    let state = tempfile::tempdir().unwrap();
    let id = c.submit(json!({
        "dockerSteps": [
            {"image": "alpine", "commands": ["echo before", "exit 3"]},
            {"image": "alpine", "commands": ["echo never"]}
        ],
        "artifacts": ["*"]
    }));
    let d = state.path().join("doc.json");
    let ds = d.to_str().unwrap();
    stage_ok(&c, state.path(), &["dequeue", "-o", ds]);
    let mut codes = Vec::new();
    for s in ["prepare-workspace", "vm-boot", "run-steps", "upload", "complete"] {
        codes.push(stage(&c, state.path(), &[s, "-i", ds, "-o", ds]).status.code().unwrap());
    }
    assert_eq!(codes, [0, 0, 1, 0, 1], "run-steps fails, upload skips, complete reports errored");
    let done = doc(&d);
    assert_eq!(done["outcome"]["stage"], "run-steps");
    assert_eq!(done["outcome"]["kind"], "errored");
    assert_eq!(done["completion"]["reported"], "errored");
    assert_eq!(done["steps"][0]["exitCode"], 3);
    assert!(done.get("artifacts").is_none());
    // markErrored without retries ends as failed on the coordinator, as on Sourcegraph.
    let job = c.wait_state(id, &["failed", "errored"], Duration::from_secs(5));
    assert!(job["failureMessage"].as_str().unwrap().contains("exit code 3"), "{job:#}");
    let step = entry(&job, "step.docker.0").unwrap();
    assert_eq!(step["exitCode"], 3);
    assert!(step["out"].as_str().unwrap().contains("stdout: before\n"));
    assert!(entry(&job, "step.docker.1").is_none());
    assert!(entry(&job, "teardown.fs").is_some());
    assert!(workspaces_left(state.path()).is_empty());
}

#[test]
fn garbage_wrong_version_foreign_and_incomplete_documents_exit_3() {
    let c = Coordinator::start();
    let state = tempfile::tempdir().unwrap();
    let dir = state.path();
    let cases: [(&str, &[u8], &str); 4] = [
        ("garbage", b"this is not json", "not JSON"),
        ("empty", b"", "empty"),
        ("version", br#"{"version": 99}"#, "version 99"),
        ("shape", br#"{"version": 1, "job": 3}"#, "not a valid run document"),
    ];
    for (name, bytes, want) in cases {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        let o = stage(&c, dir, &["run-steps", "-i", p.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(3), "{name}: {err}");
        assert!(err.contains(want), "{name}: {err}");
        assert!(o.stdout.is_empty());
    }
    c.submit(Coordinator::simple_job());
    let d = dir.join("doc.json");
    stage_ok(&c, dir, &["dequeue", "-o", d.to_str().unwrap()]);
    // Out of order: run-steps before prepare-workspace and vm-boot.
    let o = stage(&c, dir, &["run-steps", "-i", d.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stderr).contains("prepare-workspace"));
    // Another coordinator's secret does not open it.
    let mut cmd = exe(&c, dir);
    cmd.env("EXECUTOR_FRONTEND_PASSWORD", "another-secret-of-enough-length").args([
        "complete",
        "-i",
        d.to_str().unwrap(),
    ]);
    let o = common::run(&mut cmd);
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stderr).contains("shared secret"));
    // No job: status 4 and no document.
    let o = stage(&c, dir, &["dequeue"]);
    assert_eq!(o.status.code(), Some(4));
    assert!(o.stdout.is_empty());
}

#[test]
fn secrets_never_reach_logs_documents_or_artifacts() {
    let c = Coordinator::start();
    let state = tempfile::tempdir().unwrap();
    let value = "hunter2-redacted-value";
    let multi = "split-secret-first\nsplit-secret-second";
    let id = c.submit(json!({
        "redactedValues": {value: "PASSWORD_REMOVED", multi: "MULTILINE_REMOVED"},
        "dockerSteps": [{"image": "alpine", "env": [format!("TOKEN={value}")], "commands": [
            // Split across reads (a pause mid-secret) and across lines.
            "printf 'hunter2-red'; sleep 0.3; printf 'acted-value\\n'",
            "printf 'split-secret-first\\nsplit-'; sleep 0.3; echo 'secret-second'",
            format!("echo '{}' \"$TOKEN\"", c.secret),
            "mkdir -p out",
            format!("echo '{}' \"$TOKEN\" > out/leak.txt", c.secret),
            "printf 'split-secret-first\\nsplit-secret-second\\n' >> out/leak.txt",
        ]}],
        "artifacts": ["out"]
    }));
    let d = state.path().join("doc.json");
    let ds = d.to_str().unwrap();
    let mut docs = Vec::new();
    stage_ok(&c, state.path(), &["dequeue", "-o", ds]);
    docs.push(std::fs::read_to_string(&d).unwrap());
    for s in ["prepare-workspace", "vm-boot", "run-steps", "upload", "complete"] {
        stage_ok(&c, state.path(), &[s, "-i", ds, "-o", ds]);
        docs.push(std::fs::read_to_string(&d).unwrap());
    }
    let job = c.wait_state(id, &["completed"], Duration::from_secs(5));
    let logs = serde_json::to_string(&job["logs"]).unwrap();
    let files = c.artifacts(id);
    assert_eq!(files.len(), 1);
    let leak = String::from_utf8(files[0].1.clone()).unwrap();
    // The trace of `set -x` shows the pieces the script printed separately, never a whole secret.
    // JSON texts (logs, documents) hold the multi-line secret with an escaped newline.
    let multi_json = serde_json::to_string(multi).unwrap();
    let multi_json = multi_json.trim_matches('"');
    for text in std::iter::once(logs.as_str()).chain(docs.iter().map(String::as_str)) {
        for secret in [value, c.secret.as_str(), multi_json] {
            assert!(!text.contains(secret), "{secret:?} leaked into {text}");
        }
    }
    for secret in [value, c.secret.as_str(), multi] {
        assert!(!leak.contains(secret), "{secret:?} leaked into the artifact: {leak}");
    }
    let out = entry(&job, "step.docker.0").unwrap()["out"].as_str().unwrap();
    assert!(out.contains("stdout: PASSWORD_REMOVED\n"), "{out}");
    assert!(out.contains("stdout: MULTILINE_REMOVED\n"), "{out}");
    assert!(out.contains("stdout: SECRET_REMOVED PASSWORD_REMOVED\n"), "{out}");
    assert!(leak.contains("SECRET_REMOVED PASSWORD_REMOVED"), "{leak}");
}

#[test]
fn loop_cancel_stops_a_long_step_within_2s() {
    let c = Coordinator::start();
    let state = tempfile::tempdir().unwrap();
    let mut lp = spawn_loop(&c, state.path(), &[("EXECUTOR_NUM_TOTAL_JOBS", "1")]);
    let id =
        c.submit(json!({"dockerSteps": [{"image": "alpine", "commands": ["echo started", "sleep 30"]}]}));
    wait_for_output(&c, id, "step.docker.0", "stdout: started");
    let t = Instant::now();
    let (code, body) = c.request("POST", &format!("/api/jobs/{id}/cancel"), Some(&c.admin_auth()), None);
    assert!(code < 300, "cancel: {code} {body}");
    let job = c.wait_state(id, &["canceled"], Duration::from_secs(10));
    let took = t.elapsed();
    assert!(took < Duration::from_secs(2), "canceled after {took:?}");
    assert!(entry(&job, "teardown.fs").is_some(), "{job:#}");
    let err = common::wait_exit_ok(&mut lp, Duration::from_secs(10));
    assert!(err.contains("canceled by the coordinator"), "{err}");
}

#[test]
fn loop_deadline_errors_the_job() {
    let c = Coordinator::start();
    let state = tempfile::tempdir().unwrap();
    let mut lp = spawn_loop(
        &c,
        state.path(),
        &[("EXECUTOR_NUM_TOTAL_JOBS", "1"), ("EXECUTOR_MAXIMUM_RUNTIME_PER_JOB", "1s")],
    );
    let id = c.submit(json!({"dockerSteps": [{"image": "alpine", "commands": ["sleep 30"]}]}));
    let job = c.wait_state(id, &["failed", "errored"], Duration::from_secs(15));
    assert_eq!(job["failureMessage"], "job exceeded maximum execution time of 1s", "{job:#}");
    common::wait_exit_ok(&mut lp, Duration::from_secs(10));
    assert!(workspaces_left(state.path()).is_empty());
}

#[test]
fn loop_sigterm_drains_then_stops_unreported_and_a_second_signal_is_immediate() {
    let c = Coordinator::start();
    let state = tempfile::tempdir().unwrap();
    // A job that finishes within the grace period completes.
    let mut lp = spawn_loop(&c, state.path(), &[("EXECUTOR_SHUTDOWN_GRACE", "20s")]);
    let id = c.submit(json!({"dockerSteps": [{"image": "alpine", "commands": ["echo started", "sleep 1", "echo finished"]}]}));
    wait_for_output(&c, id, "step.docker.0", "stdout: started");
    signal(&lp, "TERM");
    common::wait_exit_ok(&mut lp, Duration::from_secs(15));
    c.wait_state(id, &["completed"], Duration::from_secs(1));

    // One that does not is stopped after the grace period, torn down, and left unreported for
    // the coordinator to requeue (tests/it/dropin.rs sees another executor finish it).
    let mut lp = spawn_loop(&c, state.path(), &[("EXECUTOR_SHUTDOWN_GRACE", "1s")]);
    let id =
        c.submit(json!({"dockerSteps": [{"image": "alpine", "commands": ["echo started", "sleep 30"]}]}));
    wait_for_output(&c, id, "step.docker.0", "stdout: started");
    let t = Instant::now();
    signal(&lp, "TERM");
    let err = common::wait_exit_ok(&mut lp, Duration::from_secs(15));
    assert!(
        t.elapsed() >= Duration::from_secs(1) && t.elapsed() < Duration::from_secs(6),
        "{:?}",
        t.elapsed()
    );
    let job = c.job(id);
    assert_eq!(job["state"], "processing", "{job:#}");
    assert!(entry(&job, "teardown.fs").is_some(), "{job:#}");
    assert!(err.contains("left unmarked"), "{err}");

    // A second signal does not wait for the grace period.
    let mut lp = spawn_loop(&c, state.path(), &[("EXECUTOR_SHUTDOWN_GRACE", "60s")]);
    let id =
        c.submit(json!({"dockerSteps": [{"image": "alpine", "commands": ["echo started", "sleep 30"]}]}));
    wait_for_output(&c, id, "step.docker.0", "stdout: started");
    let t = Instant::now();
    signal(&lp, "TERM");
    std::thread::sleep(Duration::from_millis(200));
    signal(&lp, "INT");
    common::wait_exit_ok(&mut lp, Duration::from_secs(10));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(c.job(id)["state"], "processing");
    assert!(workspaces_left(state.path()).is_empty());
}

#[test]
fn sigkilled_executor_job_is_reset_and_finished_by_another() {
    let c = Coordinator::start_with(&["--stalled-max-age", "1s"]);
    let state = tempfile::tempdir().unwrap();
    // No workspace disk for the executor killed here: its mount would outlive the test's temp dir.
    let mut first = spawn_loop(&c, state.path(), &[("EXECUTOR_FIRECRACKER_DISK_SPACE", "0")]);
    let id = c.submit(json!({"dockerSteps": [{"image": "alpine", "commands": ["echo started", "sleep 2", "echo finished"]}]}));
    wait_for_output(&c, id, "step.docker.0", "stdout: started");
    let first_name = c.job(id)["executorName"].clone();
    first.kill().unwrap();
    first.wait().unwrap();
    let mut second = spawn_loop(&c, state.path(), &[("EXECUTOR_NUM_TOTAL_JOBS", "1")]);
    let job = c.wait_state(id, &["completed"], Duration::from_secs(30));
    assert_ne!(job["executorName"], first_name, "{job:#}");
    assert!(entry(&job, "step.docker.0").unwrap()["out"].as_str().unwrap().contains("stdout: finished"));
    common::wait_exit_ok(&mut second, Duration::from_secs(10));
}

#[test]
fn shell_runtime_needs_the_opt_in_and_validate_reports() {
    let c = Coordinator::start();
    let state = tempfile::tempdir().unwrap();
    let id = c.submit(Coordinator::simple_job());
    let mut cmd = exe(&c, state.path());
    cmd.env_remove("EXECUTOR_ALLOW_UNISOLATED").arg("dequeue");
    let o = common::run(&mut cmd);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("EXECUTOR_ALLOW_UNISOLATED"));
    assert_eq!(c.job(id)["state"], "queued", "no job is taken by an executor that cannot run it");

    let o = stage_ok(&c, state.path(), &["validate"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("accepts the shared secret") && out.contains("All checks passed!"), "{out}");
    assert!(!out.contains(&c.secret));
    let mut cmd = exe(&c, state.path());
    cmd.env("EXECUTOR_FRONTEND_PASSWORD", "a-wrong-secret-that-is-long-enough").arg("validate");
    let o = common::run(&mut cmd);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("refused the shared secret") && !err.contains("a-wrong-secret"), "{err}");
}

#[test]
fn committed_man_pages_and_completions_match_the_binary() {
    let out = tempfile::tempdir().unwrap();
    Exec::new().args(["generate-docs", "--out"]).arg(out.path()).run();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in ["man", "completions"] {
        let mut generated: Vec<String> = std::fs::read_dir(out.path().join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let mut committed: Vec<String> = std::fs::read_dir(root.join(dir))
            .unwrap_or_else(|e| panic!("{dir}/ is missing: {e}; run `executor generate-docs`"))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        generated.sort();
        committed.sort();
        assert_eq!(committed, generated, "{dir}/ differs: run `cargo run -- generate-docs` and commit");
        for name in generated {
            let a = std::fs::read(out.path().join(dir).join(&name)).unwrap();
            let b = std::fs::read(root.join(dir).join(&name)).unwrap();
            assert!(a == b, "{dir}/{name} is stale: run `cargo run -- generate-docs` and commit");
        }
    }
}

#[test]
fn https_coordinator_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let Some((ca, cert, key)) = common::make_ca(dir.path(), "https_coordinator_with_a_private_ca") else {
        return;
    };
    let c = Coordinator::start_with(&["--tls-cert", &cert, "--tls-key", &key]);
    assert!(c.url.starts_with("https://"));
    let state = tempfile::tempdir().unwrap();
    // Without the CA: refused at once (an unknown authority is not retried).
    let t = Instant::now();
    let o = stage(&c, state.path(), &["validate"]);
    assert!(!o.status.success());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    executor(&c, state.path()).env("EXECUTOR_FRONTEND_CA", &ca).arg("validate").run();
    // A whole job over https (the fixture's own agent does not trust the CA: submit by the CLI).
    let job = dir.path().join("job.json");
    std::fs::write(&job, Coordinator::simple_job().to_string()).unwrap();
    Exec::new().with(|cmd| c.admin_env(cmd)).args(["queue", "submit", "--ca-cert", &ca]).arg(&job).run();
    executor(&c, state.path())
        .env("EXECUTOR_FRONTEND_CA", &ca)
        .env("EXECUTOR_NUM_TOTAL_JOBS", "1")
        .arg("loop")
        .stderr_has("job 1: completed")
        .run();
}

#[test]
fn dequeue_wait_uses_the_long_poll() {
    let c = Coordinator::start();
    let state = tempfile::tempdir().unwrap();
    let mut cmd = exe(&c, state.path());
    cmd.args(["dequeue", "--wait", "10s"]).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let t = Instant::now();
    let id = c.submit(Coordinator::simple_job());
    let o = child.wait_with_output().unwrap();
    common::assert_ok(&o);
    assert!(t.elapsed() < Duration::from_secs(3), "the long poll answered after {:?}", t.elapsed());
    let d: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(d["job"]["id"], id);
    assert_eq!(d["executor"]["runtime"], "shell");
    // The job stays ours while nothing heartbeats only until the stall timeout: complete it now.
    executor(&c, state.path()).arg("complete").stdin(o.stdout).run();
    c.wait_state(id, &["completed"], Duration::from_secs(5));
}

#[test]
fn sigterm_to_a_stage_stops_the_step_and_records_it() {
    let c = Coordinator::start();
    let state = tempfile::tempdir().unwrap();
    let id =
        c.submit(json!({"dockerSteps": [{"image": "alpine", "commands": ["echo started", "sleep 30"]}]}));
    let d = state.path().join("doc.json");
    let ds = d.to_str().unwrap();
    for s in ["dequeue", "prepare-workspace", "vm-boot"] {
        let args: Vec<&str> = if s == "dequeue" { vec![s, "-o", ds] } else { vec![s, "-i", ds, "-o", ds] };
        stage_ok(&c, state.path(), &args);
    }
    let mut cmd = exe(&c, state.path());
    cmd.args(["run-steps", "-i", ds, "-o", ds]).stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    wait_for_output(&c, id, "step.docker.0", "stdout: started");
    signal(&child, "TERM");
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let doc = doc(&d);
    assert_eq!(doc["steps"][0]["endedBy"], "shutdown");
    assert!(doc["outcome"]["message"].as_str().unwrap().contains("shut down"));
    let o = stage(&c, state.path(), &["complete", "-i", ds]);
    assert_eq!(o.status.code(), Some(1));
    c.wait_state(id, &["failed", "errored"], Duration::from_secs(5));
}

/// Finding 1 of the security review: after its steps, a job's workspace may hold symlinks out of
/// it where the executor (root) looks next: `skip.json` after a `.pre` step and the artifact
/// patterns. Neither may read, list or remove anything outside, nor show it in a message.
#[test]
fn workspace_symlinks_never_lead_the_host_outside() {
    let c = Coordinator::start();
    let state = tempfile::tempdir().unwrap();
    let host = tempfile::tempdir().unwrap();
    std::fs::create_dir(host.path().join("private")).unwrap();
    std::fs::write(host.path().join("skip.json"), "host-only-content").unwrap();
    std::fs::write(host.path().join("private/host-only-name"), "x").unwrap();
    let h = host.path().display();
    let skip = c.submit(json!({"dockerSteps": [
        {"key": "0.pre", "image": "alpine", "dir": "sub", "commands": [format!("cd .. && rm -rf sub && ln -s {h} sub")]},
        {"key": "1", "image": "alpine", "commands": ["true"]}
    ]}));
    let glob = c.submit(json!({
        "dockerSteps": [{"image": "alpine", "commands": [format!("ln -s {h} escape"), "mkdir -p out", "echo in > out/in.txt"]}],
        "artifacts": ["escape/private/*", "escape/**", "out/*.txt"]
    }));
    for _ in 0..2 {
        let d = state.path().join("doc.json");
        let ds = d.to_str().unwrap();
        stage_ok(&c, state.path(), &["dequeue", "-o", ds]);
        for s in ["prepare-workspace", "vm-boot", "run-steps", "upload", "complete"] {
            stage(&c, state.path(), &[s, "-i", ds, "-o", ds]);
        }
    }
    let job = c.wait_state(skip, &["completed", "failed", "errored"], Duration::from_secs(5));
    let text = job.to_string();
    assert_eq!(job["state"], "failed", "{job:#}");
    assert!(job["failureMessage"].as_str().unwrap().contains("symlink"), "{job:#}");
    assert!(!text.contains("host-only-content"), "{text}");
    assert_eq!(std::fs::read_to_string(host.path().join("skip.json")).unwrap(), "host-only-content");

    let job = c.wait_state(glob, &["completed"], Duration::from_secs(5));
    let text = job.to_string();
    assert!(!text.contains("host-only-name"), "{text}");
    let files = c.artifacts(glob);
    assert_eq!(files, vec![("out/in.txt".to_string(), b"in\n".to_vec())]);
}
