//! `executor debug`: a failed `oci` job's sandbox kept (`EXECUTOR_KEEP_FAILED`) by a real
//! `executor run` against our coordinator, attached to with `--command`, shown by `queue show`,
//! released by the cap, by `queue release` through the heartbeat, and at shutdown. One executor
//! and four short jobs do every check, to keep the suite lean.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{self, Exec};
use crate::coordinator::Coordinator;

const SECRET: &str = "s3cret-debug-value";

fn failing_job(marker: &str) -> Value {
    json!({
        "queue": "batches",
        "dockerSteps": [{
            "key": "build", "image": "busybox", "dir": "",
            "env": ["PLAIN=visible", format!("TOKEN={SECRET}")],
            "commands": [format!("echo {marker} > /data/out.txt"), "echo in-the-layer > /layer.txt", "exit 3"]
        }],
        "redactedValues": {SECRET: "[TOKEN]"}
    })
}

fn kept_file(state: &Path, id: i64) -> std::path::PathBuf {
    state.join("kept").join(format!("{id}.json"))
}

fn debug(c: &Coordinator, state: &Path) -> Exec {
    Exec::new()
        .arg("debug")
        .env("EXECUTOR_STATE_DIR", state)
        .env("EXECUTOR_FRONTEND_PASSWORD", &c.secret)
        .env("EXECUTOR_OCI_RUNTIME", "runc")
}

fn queue(c: &Coordinator, args: &[&str]) -> String {
    let o = Exec::new().arg("queue").args(args).with(|cmd| {
        c.admin_env(cmd);
    });
    String::from_utf8_lossy(&o.run().stdout).into_owned()
}

/// `executor debug JOB` with no command, on a terminal (`script` gives the attach a pty): a shell
/// whose `tty` is a pseudo-terminal, `TERM` set, and its exit status passed on.
fn interactive_attach(test: &str, c: &Coordinator, state: &Path, job: i64) {
    if which::which("script").is_err() {
        return common::skip(test, "script", "util-linux's script gives the interactive attach a terminal");
    }
    let o = Exec::program("script")
        .args(["-qec", &format!("{} debug {job}", common::bin().display()), "/dev/null"])
        .env("EXECUTOR_STATE_DIR", state)
        .env("EXECUTOR_FRONTEND_PASSWORD", &c.secret)
        .stdin("tty; echo TERM=$TERM; exit 4\n")
        .status(4)
        .run();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("/dev/pts/") && out.contains("TERM=xterm"), "{out}");
}

/// The executor, killed when a check panics.
struct Loop(Child);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_loop(c: &Coordinator, state: &Path, log: &Path) -> Loop {
    let mut cmd = common::executor();
    c.executor_env(&mut cmd);
    cmd.arg("run")
        .env("EXECUTOR_QUEUE_NAME", "batches")
        .env("EXECUTOR_RUNTIME", "oci")
        .env("EXECUTOR_OCI_RUNTIME", "runc")
        .env("EXECUTOR_STATE_DIR", state)
        .env("EXECUTOR_VM_PREFIX", format!("dbg{}", &uuid::Uuid::new_v4().simple().to_string()[..8]))
        .env("EXECUTOR_JOB_MEMORY", "256M")
        .env("EXECUTOR_JOB_NUM_CPUS", "1")
        .env("EXECUTOR_HEARTBEAT_INTERVAL", "300ms")
        // Janitor passes while jobs are kept: a kept sandbox is owned, not stale.
        .env("EXECUTOR_CLEANUP_TASK_INTERVAL", "1s")
        .env("EXECUTOR_KEEP_FAILED", "10m")
        .env("EXECUTOR_KEEP_FAILED_MAX", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    Loop(cmd.spawn().expect("starting the executor"))
}

#[test]
fn a_failed_oci_job_is_kept_attached_and_released() {
    let test = "a_failed_oci_job_is_kept_attached_and_released";
    if !crate::oci::can_run(test, "runc") {
        return;
    }
    let f = crate::oci::Fixture::new("runc");
    let state = f.state();
    // The queue's policy shortens the executor's 10 minutes.
    let c = Coordinator::start_with(&["--keep-failed", "batches=5m"]);
    let log = f.tmp.path().join("executor.log");
    let mut child = spawn_loop(&c, &state, &log);
    let wait = |what: &str, done: &mut dyn FnMut() -> bool| {
        if !common::poll_until(Duration::from_secs(90), done) {
            panic!("{what}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        }
    };

    // A successful job is never kept; a failed one is, and the coordinator says where.
    let ok = c.submit(json!({"queue": "batches", "dockerSteps": [
        {"key": "ok", "image": "busybox", "dir": "", "env": [], "commands": ["true"]}]}));
    let b = c.submit(failing_job("from-b"));
    c.wait_state(ok, &["completed"], Duration::from_secs(90));
    c.wait_state(b, &["failed"], Duration::from_secs(90));
    wait("job b was not kept", &mut || kept_file(&state, b).exists());
    assert!(!kept_file(&state, ok).exists(), "a successful job is never kept");
    let k: Value = serde_json::from_slice(&std::fs::read(kept_file(&state, b)).unwrap()).unwrap();
    let at = |f: &str| chrono::DateTime::parse_from_rfc3339(k[f].as_str().unwrap()).unwrap();
    assert_eq!((at("until") - at("keptAt")).num_seconds(), 300, "{k}");
    assert!(!k.to_string().contains(SECRET), "{k}");
    wait("the coordinator never learnt that b is kept", &mut || {
        c.job(b)["kept"]["message"].as_str().is_some_and(|m| m.contains("kept for debugging on"))
    });
    let shown = queue(&c, &["show", &b.to_string()]);
    assert!(shown.contains(&format!("run `executor debug {b}` on that host")), "{shown}");

    std::thread::sleep(Duration::from_millis(1500));
    assert!(kept_file(&state, b).exists(), "a janitor pass left the kept sandbox alone");

    // The shell sees what the step left, its environment less the secret, and no network; its
    // exit status comes back.
    let script = format!(
        "cat /data/out.txt /layer.txt; echo PLAIN=$PLAIN TOKEN=${{TOKEN:-unset}}; pwd; \
         tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; echo {SECRET} >/dev/null; exit 7"
    );
    let o = debug(&c, &state).args([&b.to_string(), "--command", &script]).status(7).run();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        out,
        "from-b\nin-the-layer\nPLAIN=visible TOKEN=unset\n/data\nlo\n",
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Interactive: a shell on a terminal (`script` gives the attach a pty), its status passed on.
    interactive_attach(test, &c, &state, b);
    let listed = debug(&c, &state).arg("--list").run();
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&format!("{b} ")), "{listed:?}");
    // The attach is in the job's log, redacted.
    let logs = c.job(b)["logs"].to_string();
    assert!(logs.contains("debug.attach") && logs.contains("exit status 7"), "{logs}");
    assert!(!logs.contains(SECRET) && logs.contains("[TOKEN]"), "{logs}");

    // The cap (one kept) releases the oldest for the next failure; then the coordinator's release.
    let d = c.submit(failing_job("from-d"));
    c.wait_state(d, &["failed"], Duration::from_secs(90));
    wait("job d was not kept", &mut || kept_file(&state, d).exists());
    assert!(!kept_file(&state, b).exists(), "the oldest goes for the cap");
    wait("the coordinator never learnt that d is kept", &mut || c.job(d)["kept"].is_object());
    assert!(queue(&c, &["release", &d.to_string()]).contains("at its next heartbeat"));
    wait("the release never reached the executor", &mut || !kept_file(&state, d).exists());
    wait("the coordinator still shows d kept", &mut || c.job(d)["kept"].is_null());

    // A shutdown releases everything kept.
    let e = c.submit(failing_job("from-e"));
    c.wait_state(e, &["failed"], Duration::from_secs(90));
    wait("job e was not kept", &mut || kept_file(&state, e).exists());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.0.id() as i32), nix::sys::signal::SIGTERM)
        .unwrap();
    let (status, _) = common::wait_exit(&mut child.0, Duration::from_secs(60));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "{text}");
    assert!(!kept_file(&state, e).exists(), "{text}");
    let left: Vec<_> =
        std::fs::read_dir(state.join("sandboxes")).map(|r| r.flatten().count()).into_iter().collect();
    assert_eq!(left, vec![0], "no sandbox is left: {text}");
    let gone = debug(&c, &state).args([&e.to_string(), "--command", "true"]).fails().run();
    assert!(String::from_utf8_lossy(&gone.stderr).contains("no sandbox is kept for job"));
}

/// The QEMU of a kept VM (its pid from the registry) and whether it is stopped (`T`).
fn qemu_stopped(state: &Path, id: i64) -> (i32, bool) {
    let k: Value = serde_json::from_slice(&std::fs::read(kept_file(state, id)).unwrap()).unwrap();
    let pid = k["sandbox"]["pid"].as_i64().expect("a kept VM's pid") as i32;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state_char = stat.rsplit(')').next().and_then(|s| s.split_whitespace().next()).unwrap_or("");
    (pid, state_char == "T")
}

/// The same on `microvm`: the failed job's VM is kept paused with the failed step's layer in it;
/// an attach resumes it, runs in the step's image over that layer (its stdin forwarded, a
/// terminal when it has one) and pauses it again; the coordinator's release kills it.
#[test]
fn a_failed_microvm_job_is_kept_paused_attached_and_released() {
    let test = "a_failed_microvm_job_is_kept_paused_attached_and_released";
    if let Some(why) = crate::microvm::missing() {
        return common::skip(test, "microvm", &why);
    }
    let state = crate::microvm::state_dir();
    let tmp = tempfile::tempdir().unwrap();
    let c = Coordinator::start_with(&["--keep-failed", "batches=5m"]);
    let log = tmp.path().join("executor.log");
    let prefix = format!("dbv{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let _dog = crate::microvm::watchdog(state.clone(), prefix.clone(), Duration::from_secs(400));
    let mut cmd = common::executor();
    crate::microvm::pool_loop_env(&mut cmd, &c, &prefix, &state);
    cmd.arg("run")
        .env("EXECUTOR_HEARTBEAT_INTERVAL", "300ms")
        .env("EXECUTOR_CLEANUP_TASK_INTERVAL", "1s")
        .env("EXECUTOR_KEEP_FAILED", "10m")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut child = Loop(cmd.spawn().expect("starting the executor"));
    let wait = |what: &str, done: &mut dyn FnMut() -> bool| {
        if !common::poll_until(Duration::from_secs(240), done) {
            panic!("{what}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        }
    };
    let mut job = failing_job("from-vm");
    job["dockerSteps"][0]["image"] = json!(crate::microvm::IMAGE);
    let b = c.submit(job);
    c.wait_state(b, &["failed"], Duration::from_secs(240));
    wait("the VM of job b was not kept", &mut || kept_file(&state, b).exists());
    let (pid, stopped) = qemu_stopped(&state, b);
    assert!(stopped, "a kept VM is paused (QEMU {pid})");
    wait("the coordinator never learnt that b is kept", &mut || c.job(b)["kept"].is_object());
    let debug = || {
        Exec::new()
            .arg("debug")
            .env("EXECUTOR_STATE_DIR", &state)
            .env("EXECUTOR_FRONTEND_PASSWORD", &c.secret)
            .env("EXECUTOR_RUNTIME", "microvm")
    };

    // What the step left, its environment less the secret, only loopback; the status comes back.
    let script = format!(
        "cat /data/out.txt /layer.txt; echo PLAIN=$PLAIN TOKEN=${{TOKEN:-unset}}; pwd; \
         ls /sys/class/net; echo {SECRET} >/dev/null; exit 7"
    );
    let o = debug().args([&b.to_string(), "--command", &script]).status(7).run();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "from-vm\nin-the-layer\nPLAIN=visible TOKEN=unset\n/data\nlo\n",
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(qemu_stopped(&state, b), (pid, true), "paused again after the attach");
    // Standard input reaches the command; what it writes stays for the next attach.
    let o = debug()
        .args([&b.to_string(), "--command", "read x; echo got-$x | tee /second.txt"])
        .stdin("abc\n")
        .run();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "got-abc\n");
    let o = debug().args([&b.to_string(), "--command", "cat /second.txt /layer.txt"]).run();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "got-abc\nin-the-layer\n");
    // Interactive: a terminal in the guest, its status passed on.
    interactive_attach(test, &c, &state, b);
    let logs = c.job(b)["logs"].to_string();
    assert!(logs.contains("debug.attach") && logs.contains("exit status 7"), "{logs}");
    assert!(!logs.contains(SECRET), "{logs}");

    // The coordinator's release kills the VM and frees everything.
    assert!(queue(&c, &["release", &b.to_string()]).contains("at its next heartbeat"));
    wait("the release never reached the executor", &mut || !kept_file(&state, b).exists());
    wait("the kept VM's QEMU still runs", &mut || {
        std::fs::read_to_string(format!("/proc/{pid}/cmdline")).map_or(true, |c| !c.contains(&prefix))
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.0.id() as i32), nix::sys::signal::SIGTERM)
        .unwrap();
    let (status, _) = common::wait_exit(&mut child.0, Duration::from_secs(60));
    assert!(status.success(), "{}", std::fs::read_to_string(&log).unwrap_or_default());
}
