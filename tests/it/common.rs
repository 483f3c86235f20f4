//! Shared test helpers: the binary under test and a builder that runs it and asserts on its
//! status and output, polling instead of sleeping, shell scripts, and skip notices that
//! `EXECUTOR_TEST_REQUIRE` turns into failures.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The `executor` binary built for this test run.
pub(crate) fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_executor"))
}

/// Removes every `EXECUTOR_*` variable (and `OTEL_EXPORTER_OTLP_ENDPOINT`) of the test's own
/// environment from `cmd`, so that what a test sets is all the binary sees.
pub(crate) fn scrub(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars_os() {
        // The collector OpenTelemetry's own variable names would get every test's traces.
        if k.to_string_lossy().starts_with("EXECUTOR_") || k == "OTEL_EXPORTER_OTLP_ENDPOINT" {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// A command for the binary with a clean `EXECUTOR_*` environment, for tests that spawn it and
/// talk to it while it runs; `Exec` runs it to completion.
///
/// Pulls are off (`EXECUTOR_IMAGE_PULL=never`) unless a test turns them on: a job naming an
/// image the store lacks must never reach a real registry. Its jobs get loopback only
/// (`EXECUTOR_NETWORK=none`) whatever the default: only tests/it/network.rs, inside namespaces
/// of its own, gives a job a network.
pub(crate) fn executor() -> Command {
    let mut c = Command::new(bin());
    scrub(&mut c).stdin(Stdio::null()).env("EXECUTOR_IMAGE_PULL", "never");
    c.env("EXECUTOR_NETWORK", "none");
    c
}

/// Runs `cmd` to completion and returns its output, whatever its status.
pub(crate) fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("running {}: {e}", describe(cmd)))
}

/// What `Exec::run` expects of the exit status.
#[derive(Clone, Copy, Debug)]
enum Status {
    Code(i32),
    Failure,
    Any,
}

/// Runs a command to completion and checks its exit status (0 unless told otherwise) and output;
/// a failed check panics at the caller with the command, the status, stdout and stderr.
///
/// `Exec::new().args(["image", "ls"]).env("EXECUTOR_STATE_DIR", dir).stdout_has("NAME").run()`
pub(crate) struct Exec {
    cmd: Command,
    stdin: Option<Vec<u8>>,
    status: Status,
    stdout_has: Vec<String>,
    stderr_has: Vec<String>,
}

impl Default for Exec {
    fn default() -> Self {
        Self::new()
    }
}

impl Exec {
    /// The `executor` binary with a clean `EXECUTOR_*` environment.
    pub(crate) fn new() -> Exec {
        Exec::wrap(executor())
    }

    /// Any program (also with a clean `EXECUTOR_*` environment, and loopback-only jobs for an
    /// executor it starts, as `executor()`).
    pub(crate) fn program(program: impl AsRef<OsStr>) -> Exec {
        let mut cmd = Command::new(program);
        scrub(&mut cmd).stdin(Stdio::null()).env("EXECUTOR_NETWORK", "none");
        Exec::wrap(cmd)
    }

    /// The value the command's environment sets for `key`.
    pub(crate) fn env_value(&self, key: &str) -> Option<std::ffi::OsString> {
        self.cmd.get_envs().find(|(k, _)| *k == key).and_then(|(_, v)| v.map(|v| v.to_os_string()))
    }

    fn wrap(cmd: Command) -> Exec {
        Exec { cmd, stdin: None, status: Status::Code(0), stdout_has: Vec::new(), stderr_has: Vec::new() }
    }

    pub(crate) fn arg(mut self, arg: impl AsRef<OsStr>) -> Exec {
        self.cmd.arg(arg);
        self
    }

    pub(crate) fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Exec {
        self.cmd.args(args);
        self
    }

    pub(crate) fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Exec {
        self.cmd.env(key, value);
        self
    }

    pub(crate) fn env_remove(mut self, key: impl AsRef<OsStr>) -> Exec {
        self.cmd.env_remove(key);
        self
    }

    pub(crate) fn current_dir(mut self, dir: impl AsRef<Path>) -> Exec {
        self.cmd.current_dir(dir);
        self
    }

    /// Lets a fixture configure the command (`|c| coordinator.admin_env(c)`).
    pub(crate) fn with(mut self, f: impl FnOnce(&mut Command)) -> Exec {
        f(&mut self.cmd);
        self
    }

    /// Bytes for the command's stdin (otherwise it reads /dev/null).
    pub(crate) fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Exec {
        self.stdin = Some(bytes.into());
        self
    }

    /// Expects this exit code instead of 0.
    pub(crate) fn status(mut self, code: i32) -> Exec {
        self.status = Status::Code(code);
        self
    }

    /// Expects any unsuccessful exit.
    pub(crate) fn fails(mut self) -> Exec {
        self.status = Status::Failure;
        self
    }

    /// Checks no status: the test looks at the output itself.
    pub(crate) fn any_status(mut self) -> Exec {
        self.status = Status::Any;
        self
    }

    /// Expects stdout to contain `text`.
    pub(crate) fn stdout_has(mut self, text: impl Into<String>) -> Exec {
        self.stdout_has.push(text.into());
        self
    }

    /// Expects stderr to contain `text`.
    pub(crate) fn stderr_has(mut self, text: impl Into<String>) -> Exec {
        self.stderr_has.push(text.into());
        self
    }

    /// Runs the command to completion, checks what was asked, and returns its output.
    #[track_caller]
    pub(crate) fn run(mut self) -> Output {
        let o = match self.stdin.take() {
            None => run(&mut self.cmd),
            Some(bytes) => {
                self.cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
                let mut child =
                    self.cmd.spawn().unwrap_or_else(|e| panic!("running {}: {e}", describe(&self.cmd)));
                let mut input = child.stdin.take().expect("the child's stdin");
                let writer = std::thread::spawn(move || input.write_all(&bytes));
                let o = child.wait_with_output().expect("waiting for the child");
                // A command may exit without reading all of its input; that is for the status to say.
                let _ = writer.join();
                o
            }
        };
        let mut problems = Vec::new();
        match self.status {
            Status::Code(code) if o.status.code() != Some(code) => {
                problems.push(format!("expected exit status {code}"))
            }
            Status::Failure if o.status.success() => problems.push("expected a failure".to_string()),
            _ => {}
        }
        let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        for want in &self.stdout_has {
            if !stdout.contains(want.as_str()) {
                problems.push(format!("expected stdout to contain {want:?}"));
            }
        }
        for want in &self.stderr_has {
            if !stderr.contains(want.as_str()) {
                problems.push(format!("expected stderr to contain {want:?}"));
            }
        }
        if !problems.is_empty() {
            panic!("{}\n{}", problems.join("\n"), report(&describe(&self.cmd), &o));
        }
        o
    }
}

/// Asserts that a command the test ran itself (spawned, or a fixture's) exited 0.
#[track_caller]
pub(crate) fn assert_ok(o: &Output) {
    if !o.status.success() {
        panic!("expected success\n{}", report("(see the test)", o));
    }
}

/// The command line as a person would type it, with the variables the test set.
fn describe(cmd: &Command) -> String {
    let mut s = String::new();
    if let Some(dir) = cmd.get_current_dir() {
        let _ = write!(s, "(in {}) ", dir.display());
    }
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            let _ = write!(s, "{}={} ", k.to_string_lossy(), v.to_string_lossy());
        }
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        let _ = write!(s, " {}", a.to_string_lossy());
    }
    s
}

fn report(command: &str, o: &Output) -> String {
    format!(
        "command: {command}\nstatus: {}\n--- stdout\n{}\n--- stderr\n{}\n---",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// How often `wait_until` and `poll_until` look.
const POLL: Duration = Duration::from_millis(20);

/// Polls `done` every 20 ms until it is true (true) or `timeout` passes (false).
pub(crate) fn poll_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// Polls `done` until it is true; panics with `what` (what the test waited for) after `timeout`.
#[track_caller]
pub(crate) fn wait_until(what: &str, timeout: Duration, done: impl FnMut() -> bool) {
    if !poll_until(timeout, done) {
        panic!("timed out after {timeout:?} waiting for {what}");
    }
}

/// Waits for `child` to exit; returns its status and its stderr (if piped). Kills it and panics
/// with its stderr when it is still running after `within`.
#[track_caller]
pub(crate) fn wait_exit(child: &mut Child, within: Duration) -> (ExitStatus, String) {
    let mut status = None;
    poll_until(within, || {
        status = child.try_wait().expect("waiting for the child");
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    match status {
        Some(st) => (st, err),
        None => panic!("{:?} did not exit within {within:?}; stderr:\n{err}", child.id()),
    }
}

/// `wait_exit`, and asserts that the child exited 0; returns its stderr.
#[track_caller]
pub(crate) fn wait_exit_ok(child: &mut Child, within: Duration) -> String {
    let (status, err) = wait_exit(child, within);
    assert!(status.success(), "expected success\nstatus: {status}\n--- stderr\n{err}\n---");
    err
}

/// Runs `script` with `bash -e` in `dir`, with a git identity and no global git configuration;
/// asserts that it succeeds and returns its trimmed stdout.
#[track_caller]
pub(crate) fn sh(dir: &Path, script: &str) -> String {
    let o = Exec::program("bash")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@t")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@t")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .run();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Says that `test` is skipped because this machine lacks `capability` (`why`); panics instead
/// when `EXECUTOR_TEST_REQUIRE` lists the capability (see `testkit::skip`).
#[track_caller]
pub(crate) fn skip(test: &str, capability: &str, why: &str) {
    testkit::skip::skip(test, capability, why)
}

pub(crate) fn is_root() -> bool {
    testkit::skip::is_root()
}

/// A CA and a certificate for 127.0.0.1 made with openssl; `None` (and a skip notice) without it.
pub(crate) fn make_ca(dir: &std::path::Path, test: &str) -> Option<(String, String, String)> {
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let (ca, cert, key) = (p("ca.pem"), p("cert.pem"), p("key.pem"));
    std::fs::write(p("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    let steps = [
        format!("req -x509 {ec} -days 1 -subj /CN=test-ca -keyout {} -out {ca}", p("ca.key")),
        format!("req {ec} -subj /CN=127.0.0.1 -keyout {key} -out {}", p("req.csr")),
        format!(
            "x509 -req -in {} -CA {ca} -CAkey {} -CAcreateserial -days 1 -extfile {} -out {cert}",
            p("req.csr"),
            p("ca.key"),
            p("ext.cnf")
        ),
    ];
    for step in steps {
        let args: Vec<&str> = step.split(' ').collect();
        match std::process::Command::new("openssl").args(&args).stderr(std::process::Stdio::null()).status() {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("openssl {step}: {s}"),
            Err(e) => {
                skip(test, "openssl", &format!("no openssl binary: {e}"));
                return None;
            }
        }
    }
    Some((ca, cert, key))
}

/// The list in `EXECUTOR_TEST_REQUIRE` names only capabilities some test knows: a typo must not
/// quietly require nothing.
#[test]
fn executor_test_require_names_known_capabilities() {
    if let Ok(list) = std::env::var(testkit::skip::REQUIRE_VAR) {
        if let Err(e) = testkit::skip::parse(&list) {
            panic!("{e}");
        }
    }
}

/// The builder's checks fail with the command and its output.
#[test]
fn exec_reports_the_command_and_its_output() {
    let o =
        Exec::program("sh").args(["-c", "echo out; echo err >&2; exit 3"]).status(3).stdout_has("out").run();
    assert_eq!(o.stderr, b"err\n");
    let failed = std::panic::catch_unwind(|| {
        Exec::program("sh")
            .args(["-c", "echo out; echo err >&2; exit 3"])
            .env("V", "1")
            .stderr_has("nope")
            .run()
    });
    let msg = *failed.unwrap_err().downcast::<String>().unwrap();
    for want in [
        "expected exit status 0",
        "expected stderr to contain \"nope\"",
        "V=1 sh -c",
        "exit status: 3",
        "out\n",
        "err\n",
    ] {
        assert!(msg.contains(want), "{want:?} missing from: {msg}");
    }
    let o = Exec::program("cat").stdin("piped in").run();
    assert_eq!(o.stdout, b"piped in");
}
