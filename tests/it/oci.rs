//! The `oci` runtime through the `Runtime` trait: steps in real containers (runc, crun, runsc)
//! with the busybox image built by the real binary, output, limits, cancel, teardown, janitor,
//! and the escape probes.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use executor::cancel::{Cancel, CancelReason};
use executor::sandbox::oci::OciRuntime;
use executor::sandbox::{BootRequest, Limits, OutputSink, Runtime, RuntimeOptions, SandboxRecord, StepEnd, StepSpec, Stream};

use crate::common;

/// A state directory with the busybox image, and a workspace.
pub struct Fixture {
    pub tmp: tempfile::TempDir,
    pub rt: OciRuntime,
    pub oci: String,
}

#[derive(Default)]
pub struct Collect {
    pub out: Vec<u8>,
    pub err: Vec<u8>,
    pub first_at: Option<Instant>,
}

impl OutputSink for Collect {
    fn output(&mut self, stream: Stream, data: &[u8]) {
        self.first_at.get_or_insert_with(Instant::now);
        match stream {
            Stream::Stdout => self.out.extend_from_slice(data),
            Stream::Stderr => self.err.extend_from_slice(data),
        }
    }
}

impl Collect {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err).into_owned()
    }
}

/// Whether this machine can run OCI containers; prints the skip notice when not.
pub fn can_run(test: &str, oci: &str) -> bool {
    if !common::is_root() {
        common::skip(test, "needs root for user-namespaced containers");
        return false;
    }
    if which::which(oci).is_err() {
        common::skip(test, &format!("{oci} is not installed (scripts/install-deps installs it)"));
        return false;
    }
    true
}

impl Fixture {
    pub fn new(oci: &str) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let state = tmp.path().join("state");
        let out = common::run(
            common::executor().args(["image", "build-busybox"]).env("EXECUTOR_STATE_DIR", &state),
        );
        assert!(out.status.success(), "build-busybox: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::create_dir_all(tmp.path().join("ws/repo")).unwrap();
        let opts = RuntimeOptions { state_dir: state, allow_unisolated: false, oci_runtime: oci.to_string() };
        Fixture { rt: OciRuntime::new(opts).unwrap(), tmp, oci: oci.to_string() }
    }

    pub fn workspace(&self) -> PathBuf {
        self.tmp.path().join("ws")
    }

    pub fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    pub fn boot(&self, limits: &Limits) -> SandboxRecord {
        let ws = self.workspace();
        let req = BootRequest {
            job_uid: "1",
            workspace: &ws,
            images: vec!["busybox".into()],
            limits,
            name_prefix: "ocitest",
        };
        self.rt.boot(&req).unwrap()
    }

    /// Writes `script` as a step script and runs it.
    pub fn run(&self, sb: &SandboxRecord, script: &str, env: &[String], cancel: &Cancel) -> (StepEnd, Collect) {
        let name = format!(".step-{}.sh", uuid::Uuid::new_v4().simple());
        std::fs::write(self.workspace().join(&name), script).unwrap();
        let step = StepSpec { key: "step.0", image: "busybox", script: &name, dir: "repo", env };
        let mut sink = Collect::default();
        let end = self.rt.run_step(sb, &step, &mut sink, cancel).unwrap();
        (end, sink)
    }
}

fn limits() -> Limits {
    Limits { cpus: 1, memory_bytes: 256 << 20, disk_bytes: 64 << 20, pids: 128 }
}

fn assert_clean(f: &Fixture, sb: &SandboxRecord) {
    assert!(!sb.state_dir.exists(), "state dir left: {}", sb.state_dir.display());
    for h in ["memory", "pids", "cpu", "freezer", "devices"] {
        let p = Path::new("/sys/fs/cgroup").join(h).join("executor").join(&sb.name);
        assert!(!p.exists(), "cgroup left: {}", p.display());
    }
    let users = f.state().join("images/users").join(&sb.name);
    assert!(!users.exists(), "image use record left");
    let ps = std::process::Command::new("ps").args(["-eo", "args"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&ps.stdout).contains(&sb.name), "a process of {} is left", sb.name);
    assert_eq!(std::fs::read_dir(f.state().join("images/tmp")).unwrap().count(), 0, "temp files left in the store");
}

fn steps_run_isolated(oci: &str, test: &str) {
    if !can_run(test, oci) {
        return;
    }
    let f = Fixture::new(oci);
    std::fs::write(f.workspace().join("repo/input.txt"), "from the host\n").unwrap();
    let sb = f.boot(&limits());
    let cancel = Cancel::new();
    let env = vec!["GREETING=hello".to_string()];
    let (end, out) = f.run(
        &sb,
        "echo \"$GREETING\"; pwd; id -u; cat input.txt; echo made > output.txt; env | sort; echo to-stderr >&2; \
         touch /etc/x 2>/dev/null || echo root-is-read-only; echo tmp > /tmp/t && echo tmp-writable; \
         git --version; exit 3",
        &env,
        &cancel,
    );
    let stdout = out.stdout();
    assert_eq!(end, StepEnd::Exited(3), "{stdout} {}", out.stderr());
    assert!(stdout.starts_with("hello\n/data/repo\n0\nfrom the host\n"), "{stdout}");
    assert!(stdout.contains("root-is-read-only") && stdout.contains("tmp-writable"), "{stdout}");
    assert!(stdout.contains("git version"), "{stdout}");
    assert_eq!(out.stderr(), "to-stderr\n");
    // The environment is the step's plus PATH and HOME (the shell adds PWD, SHLVL).
    let vars: Vec<&str> = stdout.lines().filter_map(|l| l.split_once('=').map(|(k, _)| k)).collect();
    for v in &vars {
        assert!(["GREETING", "HOME", "PATH", "PWD", "SHLVL", "OLDPWD"].contains(v), "unexpected variable {v}");
    }
    f.rt.sync_workspace(&sb, &f.workspace()).unwrap();
    let out_file = f.workspace().join("repo/output.txt");
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), "made\n");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&out_file).unwrap().uid(), 0, "workspace owner restored");
    f.rt.teardown(&sb).unwrap();
    f.rt.teardown(&sb).unwrap();
    assert_clean(&f, &sb);
}

#[test]
fn oci_runc_runs_steps_isolated() {
    steps_run_isolated("runc", "oci_runc_runs_steps_isolated");
}

#[test]
fn oci_crun_runs_steps_isolated() {
    steps_run_isolated("crun", "oci_crun_runs_steps_isolated");
}

#[test]
fn oci_runsc_runs_steps_isolated() {
    steps_run_isolated("runsc", "oci_runsc_runs_steps_isolated");
}

#[test]
fn oci_unknown_image_fails_boot_naming_it() {
    if !can_run("oci_unknown_image_fails_boot_naming_it", "runc") {
        return;
    }
    let f = Fixture::new("runc");
    let ws = f.workspace();
    let req = BootRequest {
        job_uid: "1",
        workspace: &ws,
        images: vec!["busybox".into(), "no-such-image:1.0".into()],
        limits: &limits(),
        name_prefix: "ocitest",
    };
    let err = f.rt.boot(&req).unwrap_err();
    assert!(format!("{err:#}").contains("unknown image \"no-such-image:1.0\""), "{err:#}");
    assert_eq!(std::fs::read_dir(f.state().join("sandboxes")).map(|r| r.count()).unwrap_or(0), 0);
}

fn cancel_kills(oci: &str, test: &str) {
    if !can_run(test, oci) {
        return;
    }
    let f = Fixture::new(oci);
    let sb = f.boot(&limits());
    let cancel = Cancel::new();
    let c2 = cancel.clone();
    let started = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        c2.cancel(CancelReason::Canceled);
        Instant::now()
    });
    let (end, _) = f.run(&sb, "sleep 1000 & (sleep 1000 &) ; echo started; sleep 1000", &[], &cancel);
    let took = started.join().unwrap().elapsed();
    assert_eq!(end, StepEnd::Stopped(CancelReason::Canceled));
    assert!(took < Duration::from_secs(2), "the kill took {took:?}");
    assert!(executor::sandbox::oci::cgroup::JobCgroup::new(&sb.name).pids().is_empty());

    // A deadline stops the next step the same way.
    let deadline = Cancel::with_deadline(Some(Instant::now() + Duration::from_millis(500)));
    let (end, out) = f.run(&sb, "echo tick; while :; do :; done", &[], &deadline);
    assert_eq!(end, StepEnd::Stopped(CancelReason::Deadline));
    assert_eq!(out.stdout(), "tick\n");
    f.rt.teardown(&sb).unwrap();
    assert_clean(&f, &sb);
}

#[test]
fn oci_runc_cancel_and_deadline_kill_everything() {
    cancel_kills("runc", "oci_runc_cancel_and_deadline_kill_everything");
}

#[test]
fn oci_runsc_cancel_and_deadline_kill_everything() {
    cancel_kills("runsc", "oci_runsc_cancel_and_deadline_kill_everything");
}

#[test]
fn oci_janitor_removes_what_a_crashed_executor_left() {
    if !can_run("oci_janitor_removes_what_a_crashed_executor_left", "runc") {
        return;
    }
    let f = Fixture::new("runc");
    let kept = f.boot(&limits());
    let crashed = f.boot(&limits());
    // A step of the "crashed" executor still running when it died.
    let rt = f.rt.clone();
    let crashed2 = crashed.clone();
    let script = ".janitor-step.sh";
    std::fs::write(f.workspace().join(script), "echo up; sleep 1000").unwrap();
    let runner = std::thread::spawn(move || {
        let step = StepSpec { key: "s", image: "busybox", script, dir: "", env: &[] };
        let mut sink = Collect::default();
        let cancel = Cancel::with_deadline(Some(Instant::now() + Duration::from_secs(20)));
        rt.run_step(&crashed2, &step, &mut sink, &cancel)
    });
    let cg = executor::sandbox::oci::cgroup::JobCgroup::new(&crashed.name);
    let t = Instant::now();
    while cg.pids().is_empty() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!cg.pids().is_empty(), "the step did not start");
    let live: HashSet<String> = [kept.name.clone()].into();
    let removed = f.rt.janitor("ocitest", &live).unwrap();
    assert_eq!(removed, vec![crashed.name.clone()]);
    let _ = runner.join().unwrap();
    assert_clean(&f, &crashed);
    assert!(kept.state_dir.exists());
    f.rt.teardown(&kept).unwrap();
    assert_clean(&f, &kept);
}
