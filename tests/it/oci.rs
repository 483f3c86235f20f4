//! The `oci` runtime through the `Runtime` trait: steps in real containers (runc, crun, runsc)
//! with the busybox image built by the real binary, output, limits, cancel, teardown, janitor,
//! and the escape probes.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use executor::base::cancel::{Cancel, CancelReason};
use executor::sandbox::oci::{OciDetails, OciRuntime};
use executor::sandbox::{
    BootRequest, Limits, OutputSink, RecordDetails, Runtime, RuntimeOptions, SandboxRecord, StepEnd,
    StepSpec, Stream,
};

use crate::common::{self, Exec};

/// A state directory with the busybox image, and a workspace.
pub(crate) struct Fixture {
    pub tmp: tempfile::TempDir,
    pub rt: OciRuntime,
}

#[derive(Default)]
pub(crate) struct Collect {
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
    pub(crate) fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out).into_owned()
    }
    pub(crate) fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err).into_owned()
    }
}

/// Whether this machine can run OCI containers; prints the skip notice when not.
pub(crate) fn can_run(test: &str, oci: &str) -> bool {
    if !common::is_root() {
        common::skip(test, "root", "needs root for user-namespaced containers");
        return false;
    }
    if which::which(oci).is_err() {
        common::skip(test, oci, &format!("{oci} is not installed (scripts/install-deps installs it)"));
        return false;
    }
    true
}

/// `can_run` with runc, and gcc to build the probe helper the probe jobs run.
fn can_run_probe_jobs(test: &str) -> bool {
    if !can_run(test, "runc") {
        return false;
    }
    if std::process::Command::new("gcc").arg("--version").output().is_err() {
        common::skip(test, "gcc", "gcc (build-essential) is needed to build the probe helper");
        return false;
    }
    true
}

impl Fixture {
    pub(crate) fn new(oci: &str) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        // Private like the systemd unit's state directory: the runtimes reach nothing through it.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let state = tmp.path().join("state");
        Exec::new().args(["image", "build-busybox"]).env("EXECUTOR_STATE_DIR", &state).run();
        std::fs::create_dir_all(tmp.path().join("ws/repo")).unwrap();
        let opts = RuntimeOptions { state_dir: state, oci_runtime: oci.to_string(), ..Default::default() };
        Fixture { rt: OciRuntime::new(opts).unwrap(), tmp }
    }

    pub(crate) fn workspace(&self) -> PathBuf {
        self.tmp.path().join("ws")
    }

    /// Gives the workspace its own filesystem of `bytes`, as `prepare-workspace` does.
    pub(crate) fn mount_workspace_disk(&self, bytes: u64) {
        executor::workspace::disk::mount(&self.workspace(), bytes).unwrap();
        std::fs::create_dir_all(self.workspace().join("repo")).unwrap();
    }

    pub(crate) fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    pub(crate) fn boot(&self, limits: &Limits) -> SandboxRecord {
        self.boot_as("ocitest", limits)
    }

    /// Boots with `prefix`: the janitor acts on every sandbox of a prefix on the host, so a test
    /// that runs it uses a prefix of its own.
    pub(crate) fn boot_as(&self, prefix: &str, limits: &Limits) -> SandboxRecord {
        let ws = self.workspace();
        let req = BootRequest {
            job_uid: "1",
            workspace: &ws,
            images: vec!["busybox".into()],
            limits,
            name_prefix: prefix,
            coordinator: None,
            endpoints: &[],
        };
        self.rt.boot(&req).unwrap()
    }

    /// Writes `script` as a step script and runs it.
    pub(crate) fn run(
        &self,
        sb: &SandboxRecord,
        script: &str,
        env: &[String],
        cancel: &Cancel,
    ) -> (StepEnd, Collect) {
        self.run_in(sb, "busybox", script, env, cancel)
    }

    pub(crate) fn run_in(
        &self,
        sb: &SandboxRecord,
        image: &str,
        script: &str,
        env: &[String],
        cancel: &Cancel,
    ) -> (StepEnd, Collect) {
        let name = format!(".step-{}.sh", uuid::Uuid::new_v4().simple());
        std::fs::write(self.workspace().join(&name), script).unwrap();
        let step = StepSpec { key: "step.0", image, script: &name, dir: "repo", env };
        let mut sink = Collect::default();
        let end = self.rt.run_step(sb, &step, &mut sink, cancel).unwrap();
        (end, sink)
    }
}

impl Drop for Fixture {
    /// A failed test never tore its sandboxes down: no mount of it (workspace disk, image
    /// roots) may outlive its temporary directory.
    fn drop(&mut self) {
        // Sandboxes a failed test left: their mounts outside the temporary directory first.
        if let Ok(rd) = std::fs::read_dir(self.state().join("sandboxes")) {
            for e in rd.flatten() {
                let _ = executor::sandbox::oci::rootfs::remove_reach(&e.file_name().to_string_lossy());
            }
        }
        let _ = executor::workspace::disk::unmount(&self.workspace());
        let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<PathBuf> = table
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
            .filter(|m| m.starts_with(self.tmp.path()))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in points {
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn limits() -> Limits {
    Limits { cpus: 1, memory_bytes: 256 << 20, disk_bytes: 64 << 20, pids: 128 }
}

fn assert_clean(f: &Fixture, sb: &SandboxRecord) {
    assert!(!sb.state_dir.exists(), "state dir left: {}", sb.state_dir.display());
    for h in ["memory", "pids", "cpu", "freezer", "devices"] {
        let p =
            Path::new("/sys/fs/cgroup").join(h).join(executor::sandbox::oci::cgroup::PARENT).join(&sb.name);
        assert!(!p.exists(), "cgroup left: {}", p.display());
    }
    let users = f.state().join("images/users").join(&sb.name);
    assert!(!users.exists(), "image use record left");
    let ps = std::process::Command::new("ps").args(["-eo", "args"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&ps.stdout).contains(&sb.name), "a process of {} is left", sb.name);
    assert_eq!(
        std::fs::read_dir(f.state().join("images/tmp")).unwrap().count(),
        0,
        "temp files left in the store"
    );
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
         echo w > /etc/x && echo root-is-writable; echo tmp > /tmp/t && echo tmp-writable; \
         git --version; exit 3",
        &env,
        &cancel,
    );
    let stdout = out.stdout();
    assert_eq!(end, StepEnd::Exited(3), "{stdout} {}", out.stderr());
    assert!(stdout.starts_with("hello\n/data/repo\n0\nfrom the host\n"), "{stdout}");
    assert!(stdout.contains("root-is-writable") && stdout.contains("tmp-writable"), "{stdout}");
    assert!(stdout.contains("git version"), "{stdout}");
    // A step that its 1-CPU quota held back (gVisor's start, on a busy host) also gets the CPU
    // limit's note after its output: that is the runtime's, not the step's.
    let stderr = out.stderr();
    let step_stderr = match stderr.split_once("\n\nexecutor: the step hit the job's CPU limit of 1 CPU: ") {
        Some((before, note)) if note.ends_with(" scheduling periods\n") => format!("{before}\n"),
        _ => stderr.clone(),
    };
    assert_eq!(step_stderr, "to-stderr\n");
    // The environment is the step's plus PATH and HOME (the shell adds PWD, SHLVL).
    let vars: Vec<&str> = stdout.lines().filter_map(|l| l.split_once('=').map(|(k, _)| k)).collect();
    for v in &vars {
        assert!(
            ["GREETING", "HOME", "PATH", "PWD", "SHLVL", "OLDPWD"].contains(v),
            "unexpected variable {v}"
        );
    }
    // Each step is its own `docker run --rm`: a fresh root, the workspace kept.
    let (end, out) = f.run(&sb, "cat /etc/x 2>/dev/null || echo fresh-root; ls -A /data", &[], &cancel);
    assert_eq!(end, StepEnd::Exited(0), "{}", out.stderr());
    assert!(out.stdout().starts_with("fresh-root\n"), "{}", out.stdout());
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
        coordinator: None,
        endpoints: &[],
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
    let deadline = Cancel::with_deadline(Some(Instant::now() + Duration::from_secs(3)));
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
    // A prefix of this run's own, so a leftover of an earlier run is not counted.
    let prefix = format!("ocijan{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let kept = f.boot_as(&prefix, &limits());
    let crashed = f.boot_as(&prefix, &limits());
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
    common::wait_until("the crashed executor's step to start", Duration::from_secs(10), || {
        !cg.pids().is_empty()
    });
    let live: HashSet<String> = [kept.name.clone()].into();
    let removed = f.rt.janitor(&prefix, &live).unwrap_or_else(|e| panic!("janitor: {e:#}"));
    assert_eq!(removed, vec![crashed.name.clone()]);
    let _ = runner.join().unwrap();
    assert_clean(&f, &crashed);
    assert!(kept.state_dir.exists());
    f.rt.teardown(&kept).unwrap();
    assert_clean(&f, &kept);
}

/// One hostile step: what it tries, what its output must show, and what contains it.
struct Probe {
    name: &'static str,
    script: String,
    /// Every string must appear in stdout+stderr.
    expect: Vec<&'static str>,
    /// None of these may appear.
    forbid: Vec<String>,
    end: fn(&StepEnd) -> bool,
    by: &'static str,
}

fn probe(name: &'static str, script: impl Into<String>, expect: &[&'static str], by: &'static str) -> Probe {
    Probe { name, script: script.into(), expect: expect.to_vec(), forbid: vec![], end: |_| true, by }
}

/// Compiles the probe helper (tests/it/fixtures/probe.c) statically into `dest`.
fn compile_probe(dest: &Path) -> bool {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/fixtures/probe.c");
    let out = std::process::Command::new("gcc").args(["-static", "-O1", "-o"]).arg(dest).arg(&src).output();
    matches!(out, Ok(o) if o.status.success())
}

/// Imports an image whose busybox is setuid root (inside the container), for the escalation probe.
fn import_suid_image(f: &Fixture) {
    let bb = std::fs::read(which::which("busybox").unwrap()).unwrap();
    let mut layer = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(bb.len() as u64);
    h.set_mode(0o4755);
    h.set_entry_type(tar::EntryType::Regular);
    layer.append_data(&mut h, "bin/busybox", &bb[..]).unwrap();
    for applet in ["sh", "ls", "grep"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        layer.append_link(&mut h, format!("bin/{applet}"), "busybox").unwrap();
    }
    let layer = layer.into_inner().unwrap();
    let mut t = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("manifest.json", br#"[{"Config":"c.json","Layers":["l/layer.tar"]}]"#.to_vec()),
        ("c.json", b"{}".to_vec()),
        ("l/layer.tar", layer),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        t.append_data(&mut h, name, &data[..]).unwrap();
    }
    let file = f.tmp.path().join("suid.tar");
    std::fs::write(&file, t.into_inner().unwrap()).unwrap();
    Exec::new().args(["image", "import", "suid"]).arg(&file).env("EXECUTOR_STATE_DIR", f.state()).run();
}

fn probe_suite(oci: &str, test: &str) {
    if !can_run(test, oci) {
        return;
    }
    let f = Fixture::new(oci);
    f.mount_workspace_disk(32 << 20);
    if !compile_probe(&f.workspace().join("probe")) {
        common::skip(
            test,
            "gcc",
            "gcc with static libc (build-essential) is needed to build the probe helper",
        );
        return;
    }
    import_suid_image(&f);
    // Host-side things the job must not reach.
    let secret = format!("probe-secret-{}", uuid::Uuid::new_v4().simple());
    std::env::set_var("EXECUTOR_PROBE_SHARED_SECRET", &secret);
    let host_file = f.tmp.path().join("coordinator-data.db");
    std::fs::write(&host_file, &secret).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let host_pid = std::process::id();
    let shadow_before = std::fs::symlink_metadata("/etc/shadow").ok().map(|m| {
        use std::os::unix::fs::MetadataExt;
        (m.uid(), m.mode())
    });

    // gVisor's own threads (the Sentry, one stub per guest process) count against the job's
    // process limit, so runsc needs more room.
    let pids = if oci == "runsc" { 256 } else { 64 };
    let limits = Limits { cpus: 1, memory_bytes: 128 << 20, disk_bytes: 32 << 20, pids };
    let ws = f.workspace();
    let sb =
        f.rt.boot(&BootRequest {
            job_uid: "probe",
            workspace: &ws,
            images: vec!["busybox".into(), "suid".into()],
            limits: &limits,
            name_prefix: "ocitest",
            coordinator: None,
            endpoints: &[],
        })
        .unwrap();

    let hf = host_file.display();
    let state = f.state();
    let st = state.display();
    // gVisor answers a refused clone3 with EPERM (its seccomp ignores a rule's own errno there) and
    // has no personality query (EINVAL: the filter let it through); runc and crun apply the profile to the host kernel as written.
    let (clone3, persona) = if oci == "runsc" {
        ("clone3: EPERM", "personality-query: EINVAL")
    } else {
        ("clone3: ENOSYS", "personality-query: ok")
    };
    let probes = vec![
        Probe {
            forbid: vec![secret.clone()],
            ..probe(
                "read a host file outside the workspace",
                format!("cat {hf} {st}/images/refs.json /etc/shadow 2>&1; ls {st} 2>&1"),
                &["No such file or directory"],
                "mount namespace: the root is the image, only /data is shared",
            )
        },
        Probe {
            forbid: vec![secret.clone(), "EXECUTOR_".into()],
            ..probe(
                "find the shared secret in env, /proc, command lines or fds",
                "env; cat /proc/*/environ /proc/*/cmdline 2>/dev/null | tr '\\0' '\\n'; echo fds: $(ls /proc/self/fd)",
                &["fds: 0 1 2 3"],
                "the step's environment is built from scratch; no executor fd is inherited",
            )
        },
        Probe {
            forbid: vec!["it-".into(), "cargo".into()],
            ..probe(
                "see or signal a host process",
                format!("echo procs: $(ls /proc | grep -c '^[0-9]'); cat /proc/*/cmdline | tr '\\0' ' '; /data/probe kill-pid {host_pid}"),
                &["kill-pid: ESRCH"],
                "pid namespace",
            )
        },
        probe(
            "ptrace a process",
            format!("/data/probe ptrace-init; /data/probe ptrace-pid {host_pid}"),
            &["ptrace-init: EPERM", "ptrace-pid: EPERM"],
            "seccomp (ptrace denied)",
        ),
        probe(
            "mount anything",
            "/data/probe mount; /data/probe cgroup-mount; mount -t tmpfs none /mnt 2>&1; echo",
            &["mount: EPERM", "cgroup-mount: EPERM"],
            "seccomp (mount denied), no CAP_SYS_ADMIN",
        ),
        probe(
            "create a user namespace",
            "/data/probe userns; /data/probe clone-userns",
            &["userns: EPERM", "clone-userns: EPERM"],
            "seccomp (unshare/clone with CLONE_NEWUSER denied)",
        ),
        probe(
            "syscalls outside the seccomp allow list",
            "for c in io-uring-setup io-uring-enter io-uring-register vsock personality-rie clone-newns \
             unshare-newns clone3 add-key keyctl; do /data/probe $c; done",
            &[
                "io-uring-setup: EPERM",
                "io-uring-enter: EPERM",
                "io-uring-register: EPERM",
                "vsock: EPERM",
                "personality-rie: EPERM",
                "clone-newns: EPERM",
                "unshare-newns: EPERM",
                clone3,
                "add-key: EPERM",
                "keyctl: EPERM",
            ],
            "seccomp allow list (Docker's default profile as the baseline, with its clone, socket and personality filters)",
        ),
        probe(
            "what the allow list keeps: sh, tar, git (dynamic), fork, sockets",
            "/data/probe fork; /data/probe unix-socket; /data/probe personality-query; sh -c 'echo sh-$((6*7))'; \
             mkdir -p /tmp/t && echo tarred > /tmp/t/f && tar -C /tmp -cf /tmp/t.tar t && rm -r /tmp/t && \
             tar -C /tmp -xf /tmp/t.tar && cat /tmp/t/f; git init -q /tmp/g && \
             git -C /tmp/g -c user.name=p -c user.email=p@p commit -q --allow-empty -m committed-$((1+1)) && \
             git -C /tmp/g log --format=%s",
            &["fork: ok", "unix-socket: ok", persona, "sh-42", "tarred", "committed-2"],
            "the allow list covers what ordinary programs and the dynamic loader use",
        ),
        probe(
            "load a kernel module, kexec",
            "/data/probe init-module; /data/probe finit-module; /data/probe kexec",
            &["init-module: EPERM", "finit-module: EPERM", "kexec: EPERM"],
            "seccomp",
        ),
        probe(
            "bpf, keyctl, perf_event_open, open_by_handle_at",
            "/data/probe bpf; /data/probe keyctl; /data/probe perf; /data/probe open-by-handle",
            &["bpf: EPERM", "keyctl: EPERM", "perf: EPERM", "open-by-handle: EPERM"],
            "seccomp",
        ),
        probe(
            "write /proc/sys, /sys, /proc/sysrq-trigger",
            "echo 1 > /proc/sys/kernel/sysrq; echo b > /proc/sysrq-trigger; echo x > /sys/kernel/uevent_helper; \
             echo 1 > /sys/class/net/lo/mtu; echo done",
            &["Read-only file system", "done"],
            "read-only /proc/sys, /proc/sysrq-trigger and /sys",
        ),
        probe(
            "open /dev/kvm, /dev/mem or a host block device",
            "cat /dev/kvm /dev/mem /dev/sda /dev/vda 2>&1; /data/probe mknod; echo devs: $(ls /dev)",
            &["'/dev/kvm': No such file", "'/dev/mem': No such file", "mknod: E"],
            "a private /dev with the standard set only; no CAP_MKNOD; device cgroup",
        ),
        probe(
            "open a raw socket",
            "/data/probe raw-socket; /data/probe packet-socket",
            &["raw-socket: EPERM", "packet-socket: EPERM"],
            "no CAP_NET_RAW",
        ),
        probe(
            "connect to the host's loopback",
            format!("/data/probe connect {port}; ip link 2>/dev/null || cat /proc/net/dev"),
            &["connect: ECONNREFUSED"],
            "network namespace with only its own lo",
        ),
        probe(
            "abuse a cgroup release_agent",
            "ls /sys/fs/cgroup 2>&1; cat /sys/fs/cgroup/*/release_agent 2>&1; /data/probe cgroup-mount",
            &["cgroup-mount: EPERM"],
            "no cgroupfs mounted, mount denied, /sys read-only",
        ),
        Probe {
            forbid: vec!["CapEff:\t0000003".into(), "CapEff:\t000001".into()],
            ..probe(
                "escalate through a setuid binary in the image",
                "ls -ln /bin/busybox 2>&1; /data/probe nnp; /bin/busybox grep -E 'NoNewPrivs|CapEff' /proc/self/status",
                &["no_new_privs=1", "CapEff:\t0000000000000000"],
                "no_new_privs, no capabilities, root only inside the user namespace",
            )
        },
        Probe {
            end: |e| !matches!(e, StepEnd::Exited(0)),
            ..probe(
                "fork bomb",
                format!("i=0; while [ $i -lt {} ]; do sleep 3 & i=$((i+1)); done; wait", pids * 3),
                &["hit the job's process limit"],
                "pids cgroup (the job's process limit)",
            )
        },
        Probe {
            end: |e| matches!(e, StepEnd::Signaled(9)),
            ..probe(
                "memory bomb",
                "dd if=/dev/zero of=/dev/null bs=300M count=1",
                &["hit the job's memory limit"],
                "memory cgroup (job limit 128 MiB): OOM kill",
            )
        },
        probe(
            "fill the disk past the cap",
            "i=0; while [ $i -lt 40 ]; do dd if=/dev/zero of=/tmp/f$i bs=1M count=1 2>/dev/null || { echo tmp-full; break; }; \
             i=$((i+1)); done; i=0; while [ $i -lt 40 ]; do dd if=/dev/zero of=/data/f$i bs=1M count=1 2>/dev/null || \
             { echo data-full; break; }; i=$((i+1)); done; echo files=$i; rm -f /data/f*; \
             dd if=/dev/zero of=/data/fill bs=1M count=64; echo rc=$?",
            &["tmp-full", "data-full", "No space left on device", "rc=1", "hit the job's workspace disk limit of 32 MiB"],
            "tmpfs size for /tmp; the workspace is its own 32 MiB filesystem (ENOSPC)",
        ),
        probe(
            "exhaust file descriptors",
            "/data/probe fds",
            &["opened 10", "fds: EMFILE", "hit the job's open file limit of 1024"],
            "RLIMIT_NOFILE 1024",
        ),
        Probe {
            end: |e| matches!(e, StepEnd::Stopped(CancelReason::Deadline)),
            ..probe(
                "spin the CPU",
                "echo spinning; while :; do :; done",
                &["spinning"],
                "cpu cgroup quota (1 CPU); the deadline kills it",
            )
        },
        probe(
            "leave a daemonised child behind",
            "setsid sleep 1000 </dev/null >/dev/null 2>&1 & (nohup sleep 1001 >/dev/null 2>&1 &); echo left",
            &["left"],
            "pid namespace: its init exited, the kernel killed the rest; then the job cgroup is emptied",
        ),
        probe(
            "symlink in the workspace to a host file",
            "ln -sf /etc/shadow /data/leak; ln -sf / /data/root-link; echo linked",
            &["linked"],
            "the runtime never follows workspace symlinks on the host (owner changes use lchown)",
        ),
    ];

    let mut table = vec![format!("{:<52} {:<10} BY", "PROBE", "CONTAINED")];
    let mut failures = Vec::new();
    for p in &probes {
        let cancel = if p.name == "spin the CPU" {
            Cancel::with_deadline(Some(Instant::now() + Duration::from_secs(2)))
        } else {
            Cancel::with_deadline(Some(Instant::now() + Duration::from_secs(60)))
        };
        let image = if p.name.contains("setuid") { "suid" } else { "busybox" };
        let (end, out) = f.run_in(&sb, image, &p.script, &[], &cancel);
        // The disk probe leaves the workspace full; the next probe's script needs room.
        let _ = std::fs::remove_file(f.workspace().join("fill"));
        let text = format!("{}{}", out.stdout(), out.stderr());
        let mut why = Vec::new();
        for e in &p.expect {
            if !text.contains(e) {
                why.push(format!("missing {e:?}"));
            }
        }
        for e in &p.forbid {
            if text.contains(e.as_str()) {
                why.push(format!("shows {e:?}"));
            }
        }
        if !(p.end)(&end) {
            why.push(format!("ended {end:?}"));
        }
        let leftover = executor::sandbox::oci::cgroup::JobCgroup::new(&sb.name).pids();
        if !leftover.is_empty() {
            why.push(format!("processes left: {leftover:?}"));
        }
        table.push(format!("{:<52} {:<10} {}", p.name, if why.is_empty() { "yes" } else { "NO" }, p.by));
        if !why.is_empty() {
            failures.push(format!("{}: {}\n--- output ---\n{text}", p.name, why.join(", ")));
        }
    }
    assert!(listener.accept().is_err(), "the host listener got a connection from the sandbox");
    f.rt.sync_workspace(&sb, &f.workspace()).unwrap();
    let shadow_after = std::fs::symlink_metadata("/etc/shadow").ok().map(|m| {
        use std::os::unix::fs::MetadataExt;
        (m.uid(), m.mode())
    });
    assert_eq!(shadow_before, shadow_after, "a host file changed through a workspace symlink");
    assert!(f.workspace().join("leak").is_symlink());
    f.rt.teardown(&sb).unwrap();
    assert_clean(&f, &sb);
    eprintln!("probe table ({oci}):\n{}", table.join("\n"));
    assert!(failures.is_empty(), "uncontained probes with {oci}:\n{}", failures.join("\n\n"));
}

#[test]
fn oci_runc_escape_probes_are_contained() {
    probe_suite("runc", "oci_runc_escape_probes_are_contained");
}

#[test]
fn oci_runsc_escape_probes_are_contained() {
    probe_suite("runsc", "oci_runsc_escape_probes_are_contained");
}

#[test]
fn oci_crun_escape_probes_are_contained() {
    probe_suite("crun", "oci_crun_escape_probes_are_contained");
}

/// An image with busybox (all applets), the probe helper at /usr/bin/probe and a setuid busybox.
fn import_probe_image(f: &Fixture) {
    let bb_path = which::which("busybox").unwrap();
    let bb = std::fs::read(&bb_path).unwrap();
    let probe = f.tmp.path().join("probe-bin");
    assert!(compile_probe(&probe), "gcc -static failed");
    let probe = std::fs::read(&probe).unwrap();
    let list = std::process::Command::new(&bb_path).arg("--list").output().unwrap();
    let mut layer = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8], mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_entry_type(tar::EntryType::Regular);
        layer.append_data(&mut h, path, data).unwrap();
    };
    add("bin/busybox", &bb, 0o755);
    add("bin/suid/busybox", &bb, 0o4755);
    add("usr/bin/probe", &probe, 0o755);
    for applet in String::from_utf8_lossy(&list.stdout).lines().filter(|a| !a.is_empty() && *a != "busybox") {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        layer.append_link(&mut h, format!("bin/{applet}"), "busybox").unwrap();
    }
    let layer = layer.into_inner().unwrap();
    let mut t = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("manifest.json", br#"[{"Config":"c.json","Layers":["l/layer.tar"]}]"#.to_vec()),
        ("c.json", br#"{"config":{"Env":["PATH=/usr/bin:/bin"]}}"#.to_vec()),
        ("l/layer.tar", layer),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        t.append_data(&mut h, name, &data[..]).unwrap();
    }
    let file = f.tmp.path().join("probe-image.tar");
    std::fs::write(&file, t.into_inner().unwrap()).unwrap();
    Exec::new().args(["image", "import", "probe:1"]).arg(&file).env("EXECUTOR_STATE_DIR", f.state()).run();
}

fn job_log(job: &serde_json::Value) -> String {
    job["logs"]
        .as_array()
        .map(|a| a.iter().map(|e| format!("[{}] {}\n", e["key"], e["out"].as_str().unwrap_or(""))).collect())
        .unwrap_or_default()
}

/// The escape probes as real jobs: the coordinator queues them, `executor loop` runs them in the
/// oci runtime with runc, and the job logs the coordinator stored show how each was contained.
#[test]
fn oci_probes_run_as_real_jobs_through_the_coordinator() {
    let test = "oci_probes_run_as_real_jobs_through_the_coordinator";
    if !can_run_probe_jobs(test) {
        return;
    }
    let c = crate::coordinator::Coordinator::start();
    let f = Fixture::new("runc");
    import_probe_image(&f);
    let port = c.url.rsplit(':').next().unwrap().trim_end_matches('/').to_string();
    let data_dir = c.data_dir.path().display().to_string();
    let state = f.state().display().to_string();
    let prefix = format!("ocijob{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let contained: Vec<(&str, String, &str)> = vec![
        ("hostfile", format!("cat {data_dir}/db/* {state}/images/refs.json 2>&1; ls {data_dir} 2>&1"), "No such file"),
        ("secrets", "env; cat /proc/*/environ /proc/*/cmdline 2>/dev/null | tr '\\0' '\\n'; echo fds: $(ls /proc/self/fd)".into(), "fds: 0 1 2 3"),
        ("ptrace", "probe ptrace-init".into(), "ptrace-init: EPERM"),
        ("mount", "probe mount".into(), "mount: EPERM"),
        ("module", "probe init-module".into(), "init-module: EPERM"),
        ("sysrq", "echo b > /proc/sysrq-trigger; echo 1 > /proc/sys/kernel/sysrq".into(), "can't create /proc/sysrq-trigger"),
        ("devices", "cat /dev/kvm /dev/mem 2>&1".into(), "'/dev/kvm': No such file"),
        ("rawsocket", "probe raw-socket".into(), "raw-socket: EPERM"),
        ("coordinator", format!("probe connect {port}"), "connect: ECONNREFUSED"),
        ("userns", "probe userns".into(), "userns: EPERM"),
        ("setuid", "/bin/suid/busybox grep CapEff /proc/self/status; probe nnp".into(), "CapEff:\t0000000000000000"),
        ("daemon", "setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo left".into(), "left"),
    ];
    let steps: Vec<serde_json::Value> = contained
        .iter()
        .map(|(k, script, _)| serde_json::json!({"key": k, "image": "probe:1", "dir": "", "env": [], "commands": [script, "true"]}))
        .collect();
    let probes = c.submit(serde_json::json!({"dockerSteps": steps}));
    let symlink = c.submit(serde_json::json!({"dockerSteps": [
        {"key": "link", "image": "probe:1", "dir": "", "env": [], "commands": ["ln -s /etc/shadow /data/shadow-link"]}
    ], "artifacts": ["shadow-link"]}));

    let run_loop = |jobs: &str, max_runtime: &str| {
        let mut cmd = common::executor();
        c.executor_env(&mut cmd);
        cmd.env("EXECUTOR_QUEUE_NAME", "batches")
            .env("EXECUTOR_RUNTIME", "oci")
            .env("EXECUTOR_OCI_RUNTIME", "runc")
            .env("EXECUTOR_STATE_DIR", f.state())
            .env("EXECUTOR_VM_PREFIX", &prefix)
            .env("EXECUTOR_JOB_MEMORY", "200M")
            .env("EXECUTOR_JOB_NUM_CPUS", "1")
            .env("EXECUTOR_NUM_TOTAL_JOBS", jobs)
            .env("EXECUTOR_MAXIMUM_RUNTIME_PER_JOB", max_runtime)
            .env("EXECUTOR_HEARTBEAT_INTERVAL", "300ms")
            .arg("loop");
        common::assert_ok(&common::run(&mut cmd));
    };
    run_loop("2", "60s");

    let job = c.wait_state(probes, &["completed", "failed", "errored"], Duration::from_secs(60));
    let log = job_log(&job);
    assert_eq!(job["state"], "completed", "{log}");
    for (key, _, want) in &contained {
        let entry = job["logs"].as_array().unwrap().iter().find(|e| e["key"] == format!("step.docker.{key}"));
        let out = entry.and_then(|e| e["out"].as_str()).unwrap_or_default();
        assert!(out.contains(want), "probe {key} should show {want:?}:\n{out}");
    }
    assert!(!log.contains("_REMOVED"), "a secret reached a sandbox (the redactor caught it):\n{log}");
    assert!(!log.contains(&c.secret) && !log.contains("EXECUTOR_"), "{log}");

    let job = c.wait_state(symlink, &["completed", "failed", "errored"], Duration::from_secs(60));
    let log = job_log(&job);
    // The job less its logs says how it ended, when the upload is missing.
    let mut ended = job.clone();
    ended["logs"] = serde_json::Value::Null;
    assert!(
        log.contains("skipping symlink shadow-link") && log.contains("uploaded 0 files"),
        "{ended}\n{log}"
    );
    assert!(!log.contains("root:"), "{log}");

    // Nothing of any job is left: sandboxes, cgroups, image use records, processes, workspaces.
    let left = |dir: &str| std::fs::read_dir(f.state().join(dir)).map(|r| r.count()).unwrap_or(0);
    assert_eq!((left("sandboxes"), left("images/users"), left("workspaces")), (0, 0, 0));
    let cgroups = executor::sandbox::oci::cgroup::existing_jobs();
    assert!(!cgroups.iter().any(|n| n.starts_with(&prefix)), "{cgroups:?}");
    let ps = std::process::Command::new("ps").args(["-eo", "args"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&ps.stdout).contains(&prefix));
}

#[test]
fn oci_check_reports_every_oci_runtime() {
    if !can_run("oci_check_reports_every_oci_runtime", "runc") {
        return;
    }
    let f = Fixture::new("runc");
    let lines = f.rt.check().unwrap();
    for which in ["runc", "crun", "runsc"] {
        assert!(lines.iter().any(|l| l.starts_with(&format!("oci runtime {which}: "))), "{lines:?}");
    }
    assert!(
        lines.iter().any(|l| l.starts_with("oci runtime runc: ") && l.ends_with(", selected")),
        "{lines:?}"
    );
    let opts = RuntimeOptions { state_dir: f.state(), oci_runtime: "docker".into(), ..Default::default() };
    let err = OciRuntime::new(opts).unwrap_err();
    assert!(format!("{err:#}").contains("unknown OCI runtime \"docker\""), "{err:#}");
}

/// Samples how long the host takes to start and reap a process, every 100 ms until stopped.
struct Responsiveness {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Duration>>,
}

impl Responsiveness {
    fn start() -> Responsiveness {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let ok = std::process::Command::new("true").status().map(|st| st.success()).unwrap_or(false);
                assert!(ok, "the host could not run `true`");
                samples.push(t.elapsed());
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        });
        Responsiveness { stop, thread }
    }

    /// (p50, max) of the samples.
    fn finish(self) -> (Duration, Duration, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut v = self.thread.join().unwrap();
        v.sort();
        (v[v.len() / 2], v[v.len() - 1], v.len())
    }
}

/// A fork bomb, a memory bomb, a disk fill, file-descriptor exhaustion, a CPU spinner and a
/// repository larger than the workspace disk, each as a real job through the coordinator and
/// `executor loop` with runc: every job fails with a message that names the limit it hit, and the
/// host keeps answering meanwhile.
#[test]
fn oci_resource_bombs_fail_real_jobs_naming_the_limit() {
    let test = "oci_resource_bombs_fail_real_jobs_naming_the_limit";
    if !can_run_probe_jobs(test) {
        return;
    }
    if which::which("mkfs.ext4").is_err() {
        common::skip(test, "ext4", "mkfs.ext4 (e2fsprogs) is needed for the workspace disk");
        return;
    }
    let c = crate::coordinator::Coordinator::start();
    let f = Fixture::new("runc");
    import_probe_image(&f);
    // A repository whose content (incompressible) is larger than the workspace disk.
    let repo = f.tmp.path().join("big-repo");
    std::fs::create_dir_all(&repo).unwrap();
    let mut noise = vec![0u8; 40 << 20];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut noise).unwrap();
    std::fs::write(repo.join("noise.bin"), &noise).unwrap();
    common::sh(&repo, "git init -q -b main . && git add -A && git commit -qm big");
    let commit = common::sh(&repo, "git rev-parse HEAD");
    Exec::new()
        .with(|cmd| c.admin_env(cmd))
        .args(["queue", "repo", "add", "github.com/acme/big"])
        .arg(&repo)
        .run();

    let prefix = format!("ocibomb{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let step = |key: &str, cmd: &str| serde_json::json!({"dockerSteps": [{"key": key, "image": "probe:1", "dir": "", "env": [], "commands": [cmd]}]});
    let jobs = [
        (
            "fork bomb",
            c.submit(step("fork", "while :; do sleep 30 & done")),
            "process limit of 4096 processes",
        ),
        (
            "memory bomb",
            c.submit(step("mem", "dd if=/dev/zero of=/dev/null bs=1500M count=1")),
            "memory limit of 1 GiB",
        ),
        (
            "disk fill",
            c.submit(step("disk", "dd if=/dev/zero of=/data/fill bs=1M")),
            "workspace disk limit of 32 MiB",
        ),
        ("fd exhaustion", c.submit(step("fds", "probe fds")), "open file limit of 1024 per process"),
        (
            "repository over the disk",
            c.submit(serde_json::json!({"repositoryName": "github.com/acme/big", "commit": commit,
                "dockerSteps": [{"image": "probe:1", "commands": ["true"]}]})),
            "does not fit in the workspace disk limit of 32 MiB",
        ),
    ];
    let run_loop = |jobs: usize, max_runtime: &str| {
        let mut cmd = common::executor();
        c.executor_env(&mut cmd);
        cmd.env("EXECUTOR_QUEUE_NAME", "batches")
            .env("EXECUTOR_RUNTIME", "oci")
            .env("EXECUTOR_OCI_RUNTIME", "runc")
            .env("EXECUTOR_STATE_DIR", f.state())
            .env("EXECUTOR_VM_PREFIX", &prefix)
            .env("EXECUTOR_JOB_MEMORY", "1G")
            .env("EXECUTOR_JOB_NUM_CPUS", "1")
            .env("EXECUTOR_FIRECRACKER_DISK_SPACE", "32M")
            .env("EXECUTOR_MAXIMUM_NUM_JOBS", "2")
            .env("EXECUTOR_NUM_TOTAL_JOBS", jobs.to_string())
            .env("EXECUTOR_MAXIMUM_RUNTIME_PER_JOB", max_runtime)
            .env("EXECUTOR_HEARTBEAT_INTERVAL", "300ms")
            .arg("loop");
        common::assert_ok(&common::run(&mut cmd));
    };
    let host = Responsiveness::start();
    let t = Instant::now();
    run_loop(jobs.len(), "60s");
    let bombs_took = t.elapsed();
    let spinner = c.submit(step(
        "spin",
        // Sixteen spinners: more than the CPU limit even when other work shares the host's cores,
        // so the quota throttles them whatever the load.
        "echo spinning; i=0; while [ $i -lt 15 ]; do sh -c 'while :; do :; done' & i=$((i+1)); done; sh -c 'while :; do :; done'",
    ));
    run_loop(1, "3s");
    let (p50, max, n) = host.finish();
    eprintln!(
        "{test}: {} jobs in {bombs_took:?}; host `true` while they ran: p50 {p50:?}, max {max:?} ({n} samples)",
        jobs.len() + 1
    );
    // Liveness, not speed: the host still starts processes while every limit is being hit.
    assert!(max < Duration::from_secs(5), "the host stalled for {max:?}");

    let mut failures = Vec::new();
    for (what, id, want) in &jobs {
        let job = c.wait_state(*id, &["completed", "failed", "errored"], Duration::from_secs(30));
        let msg = job["failureMessage"].as_str().unwrap_or_default();
        if job["state"] == "completed" || !msg.contains(want) {
            failures.push(format!(
                "{what}: state {}, message {msg:?}, want {want:?}\n{}",
                job["state"],
                job_log(&job)
            ));
        } else {
            eprintln!("{what}: {msg}");
        }
    }
    let job = c.wait_state(spinner, &["failed", "errored"], Duration::from_secs(30));
    let msg = job["failureMessage"].as_str().unwrap_or_default();
    // The deadline is the limit that ends a spinner. The CPU quota is named too when it throttled
    // the step, which needs a host with a core to spare (unit test: `cpu_note_*`).
    let cpu_ok = msg == "job exceeded maximum execution time of 3s"
        || msg.starts_with(
            "job exceeded maximum execution time of 3s: the step hit the job's CPU limit of 1 CPU: throttled in ",
        );
    if !cpu_ok {
        failures.push(format!("CPU spinner: message {msg:?}\n{}", job_log(&job)));
    } else {
        eprintln!("CPU spinner: {msg}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    let left = |dir: &str| std::fs::read_dir(f.state().join(dir)).map(|r| r.count()).unwrap_or(0);
    assert_eq!((left("sandboxes"), left("images/users"), left("workspaces")), (0, 0, 0));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&f.state().display().to_string()), "a workspace disk is still mounted");
    let cgroups = executor::sandbox::oci::cgroup::existing_jobs();
    assert!(!cgroups.iter().any(|n| n.starts_with(&prefix)), "{cgroups:?}");
}

/// Host uids of the processes in a sandbox's job cgroup.
fn host_uids(sb: &SandboxRecord) -> Vec<u32> {
    executor::sandbox::oci::cgroup::JobCgroup::new(&sb.name)
        .pids()
        .into_iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2)?.parse().ok())
        })
        .collect()
}

/// Two sandboxes running at once: their container roots are different unprivileged host uid
/// ranges (each its own slot, released at teardown), and each still owns its image's files.
fn uid_ranges_are_per_job(oci: &str, test: &str) {
    if !can_run(test, oci) {
        return;
    }
    let f = Fixture::new(oci);
    let ws_b = f.tmp.path().join("ws-b");
    std::fs::create_dir_all(ws_b.join("repo")).unwrap();
    let a = f.boot(&limits());
    let b =
        f.rt.boot(&BootRequest {
            job_uid: "2",
            workspace: &ws_b,
            images: vec!["busybox".into()],
            limits: &limits(),
            name_prefix: "ocitest",
            coordinator: None,
            endpoints: &[],
        })
        .unwrap();
    let base = |sb: &SandboxRecord| match OciDetails::of(sb) {
        Ok(Some(d)) => d.uid_base,
        other => panic!("{other:?}"),
    };
    let (ba, bb) = (base(&a), base(&b));
    let count = executor::image::ID_COUNT;
    assert!(ba >= executor::image::ID_BASE + count && bb >= executor::image::ID_BASE + count, "{ba} {bb}");
    assert!(ba + count <= bb || bb + count <= ba, "ranges overlap: {ba} {bb}");

    let ws_a = f.workspace();
    let script = "stat -c 'image-owner=%u' /bin/busybox; touch /data/mine; echo ready; sleep 2";
    std::fs::write(ws_b.join(".s.sh"), script).unwrap();
    let rt = f.rt.clone();
    let b2 = b.clone();
    let other = std::thread::spawn(move || {
        let step = StepSpec { key: "b", image: "busybox", script: ".s.sh", dir: "repo", env: &[] };
        let mut sink = Collect::default();
        let end = rt.run_step(&b2, &step, &mut sink, &Cancel::new()).unwrap();
        (end, sink.stdout())
    });
    let rt = f.rt.clone();
    let a2 = a.clone();
    std::fs::write(f.workspace().join(".s.sh"), script).unwrap();
    let mine = std::thread::spawn(move || {
        let step = StepSpec { key: "a", image: "busybox", script: ".s.sh", dir: "repo", env: &[] };
        let mut sink = Collect::default();
        let end = rt.run_step(&a2, &step, &mut sink, &Cancel::new()).unwrap();
        (end, sink.stdout())
    });
    // While both run: every process of each job is a host uid of its own range.
    let (mut ua, mut ub) = (Vec::new(), Vec::new());
    // Sampled once both steps run their script (runc's own init is briefly host root before it
    // execs the step).
    common::wait_until("both steps to run their script", Duration::from_secs(20), || {
        ws_a.join("mine").exists() && ws_b.join("mine").exists()
    });
    common::poll_until(Duration::from_secs(20), || {
        ua = host_uids(&a);
        ub = host_uids(&b);
        !(ua.is_empty() || ub.is_empty())
    });
    for (uids, base) in [(&ua, ba), (&ub, bb)] {
        assert!(!uids.is_empty(), "no process seen");
        assert!(uids.iter().all(|u| *u >= base && *u < base + count), "{uids:?} outside {base}");
    }
    eprintln!("{test}: job a runs as host uids {ua:?}, job b as {ub:?}");
    for (h, ws, base) in [(mine, &ws_a, ba), (other, &ws_b, bb)] {
        let (end, out) = h.join().unwrap();
        assert_eq!(end, StepEnd::Exited(0), "{out}");
        assert!(out.contains("image-owner=0\n"), "the image belongs to container root: {out}");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(ws.join("mine")).unwrap().uid(), base);
    }
    f.rt.teardown(&a).unwrap();
    f.rt.teardown(&b).unwrap();
    assert_clean(&f, &a);
    assert_clean(&f, &b);
    let slots = std::fs::read_dir(f.state().join("uid-ranges"))
        .unwrap()
        .filter(|e| e.as_ref().map(|e| e.file_name() != ".lock").unwrap_or(false));
    assert_eq!(slots.count(), 0, "a uid range is still taken");
}

#[test]
fn oci_runc_uid_ranges_are_per_job() {
    uid_ranges_are_per_job("runc", "oci_runc_uid_ranges_are_per_job");
}

#[test]
fn oci_crun_uid_ranges_are_per_job() {
    uid_ranges_are_per_job("crun", "oci_crun_uid_ranges_are_per_job");
}

/// Finding 3 of the security review: children inherited the executor's environment, with the
/// coordinator's shared secret in it. Every kind of child an OCI job starts (git for the clone,
/// mkfs.ext4 for the blank workspace disk, debugfs for the workspace template, the OCI runtime;
/// the disk is mounted without a process) is wrapped by a script first in
/// PATH that saves `/proc/self/environ` as the child starts, then execs the real program.
#[test]
fn oci_children_never_see_the_executors_environment() {
    let test = "oci_children_never_see_the_executors_environment";
    if !can_run(test, "runc") {
        return;
    }
    if which::which("mkfs.ext4").is_err() {
        common::skip(test, "ext4", "mkfs.ext4 (e2fsprogs) is needed for the workspace disk");
        return;
    }
    let c = crate::coordinator::Coordinator::start();
    let f = Fixture::new("runc");
    let repo = f.tmp.path().join("env-repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("README"), "hi\n").unwrap();
    common::sh(&repo, "git init -q -b main . && git add -A && git commit -qm one");
    let commit = common::sh(&repo, "git rev-parse HEAD");
    Exec::new()
        .with(|cmd| c.admin_env(cmd))
        .args(["queue", "repo", "add", "github.com/acme/env"])
        .arg(&repo)
        .run();

    let wrap = f.tmp.path().join("wrap");
    let seen = f.tmp.path().join("seen");
    std::fs::create_dir_all(&wrap).unwrap();
    std::fs::create_dir_all(&seen).unwrap();
    let kinds = ["git", "mkfs.ext4", "debugfs", "runc"];
    for name in kinds {
        let real = which::which(name).unwrap();
        let script = format!(
            "#!/bin/sh\ncat /proc/$$/environ > '{}/{name}.'$$\nexec '{}' \"$@\"\n",
            seen.display(),
            real.display()
        );
        std::fs::write(wrap.join(name), script).unwrap();
        std::fs::set_permissions(wrap.join(name), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let id = c.submit(serde_json::json!({"repositoryName": "github.com/acme/env", "commit": commit,
        "dockerSteps": [{"image": "busybox", "commands": ["cat README"]}]}));
    let path = format!("{}:{}", wrap.display(), std::env::var("PATH").unwrap_or_default());
    let marker = "unrelated-env-marker-7f3a";
    let prefix = format!("ocienv{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut cmd = oci_loop(&c, &f, "runc", &prefix, 1);
    cmd.env("PATH", &path).env("SOME_OPERATOR_TOKEN", marker);
    common::assert_ok(&common::run(&mut cmd));
    let job = c.wait_state(id, &["completed", "failed", "errored"], Duration::from_secs(30));
    assert_eq!(job["state"], "completed", "{}", job_log(&job));

    for name in kinds {
        let mut n = 0;
        for e in std::fs::read_dir(&seen).unwrap() {
            let e = e.unwrap();
            if !e.file_name().to_string_lossy().starts_with(&format!("{name}.")) {
                continue;
            }
            n += 1;
            let env = String::from_utf8_lossy(&std::fs::read(e.path()).unwrap()).replace('\0', "\n");
            for secret in [c.secret.as_str(), marker, "EXECUTOR_"] {
                assert!(!env.contains(secret), "{name} started with {secret:?} in its environment:\n{env}");
            }
        }
        assert!(n > 0, "the executor never started {name}");
    }
}

/// Finding 2 of the security review: another local user read a running job's secret file and
/// appended to its next step's script (run as the job). Checked as `nobody` while a real job's
/// first step runs: nothing of the workspace can be listed, read or changed, the workspace disk
/// image cannot be read, and the job's next step runs what the job wrote, unchanged.
#[test]
fn oci_other_users_cannot_touch_a_running_job() {
    let test = "oci_other_users_cannot_touch_a_running_job";
    if !can_run(test, "runc") {
        return;
    }
    if which::which("mkfs.ext4").is_err() {
        common::skip(test, "ext4", "mkfs.ext4 (e2fsprogs) is needed for the workspace disk");
        return;
    }
    let c = crate::coordinator::Coordinator::start();
    let f = Fixture::new("runc");
    let id = c.submit(serde_json::json!({
        "files": {"secret.txt": {"content": "job-secret-content"}},
        "dockerSteps": [
            {"key": "wait", "image": "busybox", "commands": ["echo started", "sleep 4", "cat secret.txt"]},
            {"key": "next", "image": "busybox", "commands": ["echo next ran", "ls -la /data >/dev/null"]}
        ]
    }));
    let prefix = format!("ociprv{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut cmd = oci_loop(&c, &f, "runc", &prefix, 1);
    cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let mut executor = cmd.spawn().unwrap();
    common::wait_until("the first step to start", Duration::from_secs(30), || {
        let job = c.job(id);
        job["logs"].as_array().is_some_and(|l| {
            l.iter().any(|e| {
                e["key"] == "step.docker.wait" && e["out"].as_str().unwrap_or("").contains("started")
            })
        })
    });
    let workspaces = f.state().join("workspaces");
    let ws = std::fs::read_dir(&workspaces)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .expect("the job's workspace");
    let img = workspaces.join(format!("{}.img", ws.file_name().unwrap().to_string_lossy()));
    let scripts: Vec<PathBuf> = std::fs::read_dir(ws.join(".sourcegraph-executor"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sh"))
        .collect();
    assert_eq!(scripts.len(), 2, "{scripts:?}");
    let as_nobody = |script: &str| {
        let o = Exec::program("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", script])
            .any_status()
            .run();
        (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let mut attempts = vec![
        format!("ls '{}'", workspaces.display()),
        format!("cat '{}/secret.txt'", ws.display()),
        format!("ls '{}'", ws.display()),
        format!("head -c 4096 '{}' >/dev/null", img.display()),
        format!("touch '{}/planted'", ws.display()),
    ];
    for s in &scripts {
        attempts.push(format!("echo 'echo INJECTED' >> '{}'", s.display()));
    }
    for a in &attempts {
        let (ok, out) = as_nobody(a);
        assert!(!ok, "nobody could `{a}` during a job: {out}");
    }
    let st = executor.wait().unwrap();
    assert!(st.success());
    let job = c.wait_state(id, &["completed", "failed", "errored"], Duration::from_secs(30));
    let log = job_log(&job);
    assert_eq!(job["state"], "completed", "the job still reads and runs its own files: {log}");
    assert!(log.contains("job-secret-content") && log.contains("next ran"), "{log}");
    assert!(!log.contains("INJECTED"), "{log}");
}

/// Finding 10 of the security review: after `kill -9` of `executor loop` in the middle of an OCI
/// step, `executor janitor` on the same state directory removed nothing (the dead executor's
/// workspace waited for its job's deadline, 30 minutes), so the orphaned container ran on. The
/// loop holds a lifetime lock; the janitor that can take it reclaims everything at once.
#[test]
fn oci_janitor_reclaims_a_killed_loops_job_at_once() {
    let test = "oci_janitor_reclaims_a_killed_loops_job_at_once";
    if !can_run(test, "runc") {
        return;
    }
    let c = crate::coordinator::Coordinator::start();
    let f = Fixture::new("runc");
    let prefix = format!("ocikill{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let id = c.submit(serde_json::json!({"dockerSteps": [
        {"key": "long", "image": "busybox", "commands": ["echo started", "sleep 1000"]}
    ]}));
    let env = |cmd: &mut std::process::Command| {
        c.executor_env(cmd);
        cmd.env("EXECUTOR_QUEUE_NAME", "batches")
            .env("EXECUTOR_RUNTIME", "oci")
            .env("EXECUTOR_OCI_RUNTIME", "runc")
            .env("EXECUTOR_STATE_DIR", f.state())
            .env("EXECUTOR_VM_PREFIX", &prefix)
            .env("EXECUTOR_MAXIMUM_RUNTIME_PER_JOB", "30m")
            .env("EXECUTOR_HEARTBEAT_INTERVAL", "300ms");
    };
    let mut cmd = common::executor();
    env(&mut cmd);
    cmd.arg("loop").stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let mut lp = cmd.spawn().unwrap();
    common::wait_until("the step to start", Duration::from_secs(30), || {
        c.job(id)["logs"].as_array().is_some_and(|l| {
            l.iter().any(|e| {
                e["key"] == "step.docker.long" && e["out"].as_str().unwrap_or("").contains("started")
            })
        })
    });
    lp.kill().unwrap();
    lp.wait().unwrap();
    let running = || {
        let ps = std::process::Command::new("ps").args(["-eo", "args"]).output().unwrap();
        String::from_utf8_lossy(&ps.stdout).lines().filter(|l| l.contains(&prefix)).count()
    };
    assert!(running() > 0, "the orphaned container runs on after the kill");
    let mut cmd = common::executor();
    env(&mut cmd);
    let out = common::run(cmd.arg("janitor"));
    common::assert_ok(&out);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains("removed workspace") && said.contains("sandbox"), "{said}");
    let left = |dir: &str| {
        std::fs::read_dir(f.state().join(dir))
            .map(|r| r.flatten().filter(|e| !e.file_name().to_string_lossy().starts_with('.')).count())
            .unwrap_or(0)
    };
    assert_eq!((left("workspaces"), left("sandboxes"), left("owners")), (0, 0, 0), "{said}");
    common::wait_until("the orphan's processes to end", Duration::from_secs(10), || running() == 0);
    let cgroups = executor::sandbox::oci::cgroup::existing_jobs();
    assert!(!cgroups.iter().any(|n| n.starts_with(&prefix)), "{cgroups:?}");
}

/// `executor loop` for `jobs` jobs of the coordinator `c` in the oci runtime with `oci`, on the
/// fixture's state directory, with a 32 MiB workspace disk and sandboxes named `prefix-…`.
fn oci_loop(
    c: &crate::coordinator::Coordinator,
    f: &Fixture,
    oci: &str,
    prefix: &str,
    jobs: usize,
) -> std::process::Command {
    let mut cmd = common::executor();
    c.executor_env(&mut cmd);
    cmd.env("EXECUTOR_QUEUE_NAME", "batches")
        .env("EXECUTOR_RUNTIME", "oci")
        .env("EXECUTOR_OCI_RUNTIME", oci)
        .env("EXECUTOR_STATE_DIR", f.state())
        .env("EXECUTOR_VM_PREFIX", prefix)
        .env("EXECUTOR_FIRECRACKER_DISK_SPACE", "32M")
        .env("EXECUTOR_NUM_TOTAL_JOBS", jobs.to_string())
        .env("EXECUTOR_MAXIMUM_RUNTIME_PER_JOB", "60s")
        .env("EXECUTOR_HEARTBEAT_INTERVAL", "300ms")
        .arg("loop");
    cmd
}

/// #15: in the loop, an oci sandbox boots while the repository clones and its first step's
/// container is made ahead (created by the shim, only started when the step runs). Five jobs on
/// one loop: one whose clone fails (nothing made ahead); a cold one (the template is made first, the container after it) whose first step
/// writes into a cloned file and exits 3; a warm one (from the template, the container made
/// during the clone) that finds no other job's layer in the workspace; one whose first step
/// starts in a directory of the repository; one canceled while its first step runs. Each step
/// is shown as started (`<runtime> start`) rather than run, ends as `runc run` would have
/// reported it, and nothing is left after the loop.
fn first_step_made_ahead(oci: &str, test: &str) {
    if !can_run(test, oci) {
        return;
    }
    if which::which("mkfs.ext4").is_err() {
        common::skip(test, "ext4", "mkfs.ext4 (e2fsprogs) is needed for the workspace disk");
        return;
    }
    let c = crate::coordinator::Coordinator::start();
    let f = Fixture::new(oci);
    let repo = f.tmp.path().join("ahead-repo");
    std::fs::create_dir_all(repo.join("sub")).unwrap();
    std::fs::write(repo.join("README"), "cloned\n").unwrap();
    std::fs::write(repo.join("sub/inner.txt"), "inner file\n").unwrap();
    common::sh(&repo, "git init -q -b main . && git add -A && git commit -qm one");
    let first = common::sh(&repo, "git rev-parse HEAD");
    common::sh(&repo, "echo more >> README && git commit -qam two");
    let second = common::sh(&repo, "git rev-parse HEAD");
    Exec::new()
        .with(|cmd| c.admin_env(cmd))
        .args(["queue", "repo", "add", "github.com/acme/ahead"])
        .arg(&repo)
        .run();
    let job = |commit: &str, dir: &str, commands: &[&str]| {
        c.submit(serde_json::json!({"repositoryName": "github.com/acme/ahead", "commit": commit,
            "dockerSteps": [{"image": "busybox", "dir": dir, "commands": commands}]}))
    };
    // A clone that fails first (the repository has no template yet): nothing is made ahead.
    let missing = job(&"0".repeat(40), "", &["echo never"]);
    let cold = job(&first, "", &["echo appended >> README", "cat README", "exit 3"]);
    let warm = job(
        &second,
        "",
        &["echo appended >> README && echo wrote", "echo layers=$(ls -a /data | grep -c executor-root)"],
    );
    let in_dir = job(&second, "sub", &["cat inner.txt"]);
    let canceled = job(&second, "", &["echo waiting", "sleep 30"]);
    let prefix = format!("ociahd{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut cmd = oci_loop(&c, &f, oci, &prefix, 5);
    cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let mut executor = cmd.spawn().unwrap();
    common::wait_until("the last job's step to start", Duration::from_secs(60), || {
        job_log(&c.job(canceled)).contains("waiting")
    });
    let (code, body) =
        c.request("POST", &format!("/api/jobs/{canceled}/cancel"), Some(&c.admin_auth()), None);
    assert!(code < 300, "cancel: {code} {body}");
    assert!(executor.wait().unwrap().success());
    let ended =
        |id: i64| c.wait_state(id, &["completed", "failed", "errored", "canceled"], Duration::from_secs(30));
    let entry = |job: &serde_json::Value, key: &str| {
        job["logs"].as_array().and_then(|l| l.iter().find(|e| e["key"] == key).cloned()).unwrap_or_default()
    };
    for (id, state, says) in [
        (cold, "failed", "exit code 3"),
        (warm, "completed", "layers=1"),
        (in_dir, "completed", "inner file"),
        (canceled, "canceled", "waiting"),
    ] {
        let job = ended(id);
        let log = format!("{}{}", job_log(&job), job["failureMessage"].as_str().unwrap_or(""));
        assert_eq!(job["state"], state, "job {id}: {log}");
        assert!(log.contains(says), "job {id} should say {says:?}: {log}");
        let ahead = entry(&job, "setup.oci.ahead");
        assert_eq!(ahead["exitCode"], 0, "job {id}'s first step was not made ahead: {log}");
        let step = entry(&job, "step.docker.0");
        assert_eq!(step["command"][1], "start", "job {id}'s first step was run, not started: {step}");
    }
    let missing = ended(missing);
    assert_ne!(missing["state"], "completed", "{}", job_log(&missing));
    assert!(
        entry(&missing, "setup.oci.ahead").is_null(),
        "made ahead for a failed clone: {}",
        job_log(&missing)
    );
    let cold_log = job_log(&ended(cold));
    assert!(
        cold_log.contains("stdout: cloned\nstdout: appended"),
        "the step wrote into a file of the clone: {cold_log}"
    );
    let warm_log = job_log(&ended(warm));
    assert!(warm_log.contains("workspace disk started as a copy of the template"), "{warm_log}");
    let left = |d: &str| std::fs::read_dir(f.state().join(d)).map(|r| r.count()).unwrap_or(0);
    assert_eq!((left("workspaces"), left("sandboxes")), (0, 0), "the loop left a workspace or a sandbox");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&prefix), "a mount of the loop's sandboxes is left:\n{mounts}");
}

#[test]
fn oci_runc_first_step_is_made_ahead() {
    first_step_made_ahead("runc", "oci_runc_first_step_is_made_ahead");
}

#[test]
fn oci_crun_first_step_is_made_ahead() {
    first_step_made_ahead("crun", "oci_crun_first_step_is_made_ahead");
}

/// Imports `name`, an image of nothing but a static busybox and a few of its applets: no `/etc`
/// at all, as a `FROM scratch` image or a distroless one.
pub(crate) fn import_scratch_image(state: &Path, name: &str) {
    let bb = std::fs::read(which::which("busybox").unwrap()).unwrap();
    let mut layer = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(bb.len() as u64);
    h.set_mode(0o755);
    h.set_entry_type(tar::EntryType::Regular);
    layer.append_data(&mut h, "bin/busybox", &bb[..]).unwrap();
    for applet in ["sh", "cat", "ls", "hostname", "nslookup", "wget", "echo", "stat"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        layer.append_link(&mut h, format!("bin/{applet}"), "busybox").unwrap();
    }
    let layer = layer.into_inner().unwrap();
    let mut t = tar::Builder::new(Vec::new());
    for (file, data) in [
        ("manifest.json", br#"[{"Config":"c.json","Layers":["l/layer.tar"]}]"#.to_vec()),
        ("c.json", br#"{"config":{"Env":["PATH=/bin"]}}"#.to_vec()),
        ("l/layer.tar", layer),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        t.append_data(&mut h, file, &data[..]).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{name}.tar"));
    std::fs::write(&file, t.into_inner().unwrap()).unwrap();
    Exec::new().args(["image", "import", name]).arg(&file).env("EXECUTOR_STATE_DIR", state).run();
}

/// `docker run` parity: a step always has `/etc/resolv.conf`, `/etc/hosts` and `/etc/hostname`,
/// even in an image without any `/etc`, root's and writable as under Docker, and the image keeps
/// nothing of what a step wrote there.
fn etc_files_exist_in_an_image_without_etc(oci: &str, test: &str) {
    if !can_run(test, oci) {
        return;
    }
    let f = Fixture::new(oci);
    import_scratch_image(&f.state(), "scratch");
    let ws = f.workspace();
    let limits = limits();
    let req = BootRequest {
        job_uid: "etc",
        workspace: &ws,
        images: vec!["scratch".into()],
        limits: &limits,
        name_prefix: "ocitest",
        coordinator: None,
        endpoints: &[],
    };
    let sb = f.rt.boot(&req).unwrap();
    let script = "cat /etc/hostname /etc/hosts /etc/resolv.conf; echo host=$(hostname); \
                  stat -c '%n %u %a' /etc/hosts /etc/hostname /etc/resolv.conf; \
                  echo changed > /etc/hosts && echo writable";
    for _ in 0..2 {
        let (end, out) = f.run_in(&sb, "scratch", script, &[], &Cancel::new());
        let text = out.stdout();
        assert_eq!(end, StepEnd::Exited(0), "{text}\n{}", out.stderr());
        assert!(text.starts_with("sandbox\n127.0.0.1\tlocalhost\n"), "{text}");
        assert!(text.contains("\n127.0.1.1\tsandbox\n"), "{text}");
        assert!(text.contains("EXECUTOR_NETWORK=none"), "{text}");
        assert!(text.contains("host=sandbox\n"), "{text}");
        for name in ["/etc/hosts 0 644", "/etc/hostname 0 644", "/etc/resolv.conf 0 644"] {
            assert!(text.contains(name), "{name}: {text}");
        }
        // The second step sees the generated file again, not the first one's change.
        assert!(text.contains("writable"), "{text}");
    }
    f.rt.teardown(&sb).unwrap();
    assert_clean(&f, &sb);
}

#[test]
fn oci_runc_etc_files_exist_in_an_image_without_etc() {
    etc_files_exist_in_an_image_without_etc("runc", "oci_runc_etc_files_exist_in_an_image_without_etc");
}

#[test]
fn oci_crun_etc_files_exist_in_an_image_without_etc() {
    etc_files_exist_in_an_image_without_etc("crun", "oci_crun_etc_files_exist_in_an_image_without_etc");
}

#[test]
fn oci_runsc_etc_files_exist_in_an_image_without_etc() {
    etc_files_exist_in_an_image_without_etc("runsc", "oci_runsc_etc_files_exist_in_an_image_without_etc");
}
