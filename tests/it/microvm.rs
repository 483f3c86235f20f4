//! The microvm runtime: real QEMU guests under TCG (KVM is not usable on these machines), the
//! guest agent, the workspace round trip, cancel and deadline, teardown, janitor, escape probes.
//! Every VM has a host-side watchdog so that a hung guest fails the test instead of hanging it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use executor::base::cancel::{Cancel, CancelReason};
use executor::sandbox::microvm::{Accel, MicroVm, VmDetails};
use executor::sandbox::{
    BootRequest, Limits, OutputSink, RecordDetails, Runtime, RuntimeOptions, StepEnd, StepSpec, Stream,
};

use crate::common::{self, Exec};

static INSTALL: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Why this machine cannot boot a VM, if it cannot.
pub(crate) fn missing() -> Option<String> {
    for bin in ["qemu-system-x86_64", "mkfs.ext4", "apt-get", "dpkg", "lz4"] {
        if which::which(bin).is_err() {
            return Some(format!("{bin} is not installed (scripts/apt-packages/microvm.txt)"));
        }
    }
    if !Path::new("/bin/busybox").is_file() {
        return Some("busybox-static is not installed".into());
    }
    None
}

/// The shared state directory with `install vm` done once for the whole test run.
pub(crate) fn state_dir() -> PathBuf {
    let mut g = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = &*g {
        return p.clone();
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("microvm-state");
    Exec::new().args(["install", "vm"]).env("EXECUTOR_STATE_DIR", &dir).run();
    // The step image of these tests, from the image store.
    Exec::new().args(["image", "build-busybox", IMAGE]).env("EXECUTOR_STATE_DIR", &dir).run();
    *g = Some(dir.clone());
    dir
}

pub(crate) fn runtime(state: &Path) -> MicroVm {
    MicroVm::new(RuntimeOptions {
        state_dir: state.to_path_buf(),
        allow_unisolated: false,
        oci_runtime: "runc".into(),
        vm_accel: Accel::Auto,
        vm_allow_tcg: true,
        ..Default::default()
    })
}

/// The step image of these tests (`executor image build-busybox`).
pub(crate) const IMAGE: &str = "microvm-busybox";

#[derive(Default)]
struct Collect {
    out: Vec<u8>,
    err: Vec<u8>,
}

impl OutputSink for Collect {
    fn output(&mut self, stream: Stream, data: &[u8]) {
        match stream {
            Stream::Stdout => self.out.extend_from_slice(data),
            Stream::Stderr => self.err.extend_from_slice(data),
        }
    }
}

/// Kills the test's VMs if the test is still running after `limit`.
pub(crate) fn watchdog(state: PathBuf, prefix: String, limit: Duration) -> std::sync::mpsc::Sender<()> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if rx.recv_timeout(limit) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            eprintln!("watchdog: killing the VMs of {prefix} after {limit:?}");
            let _ = runtime(&state).janitor(&prefix, &HashSet::new());
        }
    });
    tx
}

fn step<'a>(key: &'a str, image: &'a str, script: &'a str, env: &'a [String]) -> StepSpec<'a> {
    StepSpec { key, image, script, dir: "", env }
}

#[test]
fn microvm_install_vm_is_idempotent_and_test_vm_boots_the_guest_kernel() {
    if let Some(why) = missing() {
        return common::skip(
            "microvm_install_vm_is_idempotent_and_test_vm_boots_the_guest_kernel",
            "microvm",
            &why,
        );
    }
    let state = state_dir();
    // Again, with the state directory given relative to the working directory.
    Exec::new()
        .args(["install", "vm"])
        .current_dir(state.parent().unwrap())
        .env("EXECUTOR_STATE_DIR", state.file_name().unwrap())
        .stderr_has("already installed")
        .stderr_has("up to date")
        .run();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("vm/manifest.json")).unwrap()).unwrap();
    let kernel = manifest["kernelVersion"].as_str().unwrap().to_string();
    for f in ["vmlinux", "initramfs"] {
        assert!(Path::new(manifest[f].as_str().unwrap()).is_absolute(), "{manifest:#}");
    }

    // Without the operator's permission, auto refuses to fall back to TCG here.
    let refused = common::run(
        common::executor()
            .args(["test-vm", "--timeout", "5", "--", "true"])
            .env("EXECUTOR_STATE_DIR", &state),
    );
    let said = String::from_utf8_lossy(&refused.stderr);
    if said.contains("KVM is unusable") {
        assert!(!refused.status.success());
        assert!(said.contains("EXECUTOR_VM_ALLOW_TCG"), "{said}");
    }

    let out = Exec::new()
        .args(["test-vm", "--json", "--accel", "tcg", "--timeout", "90", "--", "uname -r"])
        .env("EXECUTOR_STATE_DIR", &state)
        .run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&kernel), "the guest runs its own kernel {kernel}: {err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["exitCode"], 0);
    assert!(v["phases"]["totalMs"].as_u64().unwrap() > 0);
}

#[test]
fn microvm_job_runs_in_a_guest_round_trips_the_workspace_and_stops_on_cancel_and_deadline() {
    let name = "microvm_job_runs_in_a_guest_round_trips_the_workspace_and_stops_on_cancel_and_deadline";
    if let Some(why) = missing() {
        return common::skip(name, "microvm", &why);
    }
    let state = state_dir();
    let tmp = tempfile::tempdir().unwrap();
    let image = IMAGE.to_string();
    let ws = tmp.path().join("workspace");
    std::fs::create_dir_all(ws.join("src")).unwrap();
    std::fs::write(ws.join("src/input.txt"), "from the host\n").unwrap();

    // Something listening on the host's loopback that the guest must not reach.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let secret = "hunter2-shared-secret-value";
    let host_marker = tmp.path().join("host-only-file");
    std::fs::write(&host_marker, secret).unwrap();

    std::fs::write(
        ws.join("step0.sh"),
        format!(
            "set -e\n\
             echo out: $(cat /data/src/input.txt)\n\
             echo err-line >&2\n\
             uname -r\n\
             mkdir -p /data/out && echo artifact-$GREETING > /data/out/result.txt\n\
             rm /data/src/input.txt\n\
             echo comms=$(cat /proc/[0-9]*/comm 2>/dev/null | sort -u | tr '\\n' ' ')\n\
             echo nets=$(ls /sys/class/net | tr '\\n' ' ')\n\
             if [ -e {marker} ]; then echo HOSTFILE-VISIBLE; fi\n\
             if env | grep -q hunter2; then echo SECRET-VISIBLE; fi\n\
             if nc -w 2 127.0.0.1 {port} </dev/null; then echo LOOPBACK-REACHED; else echo loopback-closed; fi\n",
            marker = host_marker.display(),
        ),
    )
    .unwrap();
    std::fs::write(ws.join("step1.sh"), "echo failing; exit 3\n").unwrap();
    std::fs::write(ws.join("step2.sh"), "echo started; sleep 300 & sleep 300\n").unwrap();
    std::fs::write(ws.join("step3.sh"), "echo started; sleep 300\n").unwrap();

    let prefix = format!("mvt{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let _dog = watchdog(state.clone(), prefix.clone(), Duration::from_secs(240));
    let rt = runtime(&state);
    let limits = Limits { cpus: 1, memory_bytes: 512 << 20, disk_bytes: 0, pids: 0 };
    let rec = rt
        .boot(&BootRequest {
            job_uid: "1",
            workspace: &ws,
            images: vec![image.clone()],
            limits: &limits,
            name_prefix: &prefix,
            coordinator: None,
            endpoints: &[],
        })
        .expect("boot");
    assert_eq!(rec.runtime, executor::sandbox::RuntimeKind::Microvm);
    let pid = rec.pid.unwrap();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    // QEMU never holds root (a uid of its own, tests/it/host_security.rs): its real, effective,
    // saved and fs uids.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uids: Vec<u32> = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    assert!(uids.len() == 4 && uids.iter().all(|&u| u != 0), "QEMU runs as root: {uids:?}");
    if nix::unistd::geteuid().is_root() {
        let Some(det) = VmDetails::of(&rec).unwrap() else { panic!("{:?}", rec.details) };
        assert_eq!(det.qemu_user, Some(format!("uid {}", uids[0])), "{det:?}");
        // Its directory (disks, socket, console) is its own and closed to everyone else.
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(&rec.state_dir).unwrap();
        assert_eq!((md.uid(), md.mode() & 0o777), (uids[0], 0o700));
        let disk = std::fs::metadata(rec.state_dir.join("workspace.ext4")).unwrap();
        assert_eq!((disk.uid(), disk.mode() & 0o077), (uids[0], 0));
    }
    let deadline = || Cancel::with_deadline(Some(Instant::now() + Duration::from_secs(90)));

    let env = vec!["GREETING=hello".to_string()];
    let mut c = Collect::default();
    let end = rt.run_step(&rec, &step("0", &image, "step0.sh", &env), &mut c, &deadline()).unwrap();
    let out = String::from_utf8_lossy(&c.out).into_owned();
    assert_eq!(end, StepEnd::Exited(0), "stdout: {out} stderr: {}", String::from_utf8_lossy(&c.err));
    assert!(out.contains("out: from the host"), "{out}");
    assert!(String::from_utf8_lossy(&c.err).starts_with("err-line\n"), "{}", String::from_utf8_lossy(&c.err));
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(!out.contains(host_kernel.trim()), "the step ran on the host kernel: {out}");
    assert!(!out.contains("HOSTFILE-VISIBLE") && !out.contains("SECRET-VISIBLE"), "{out}");
    assert!(out.contains("loopback-closed") && !out.contains("LOOPBACK-REACHED"), "{out}");
    assert!(out.lines().any(|l| l == "nets=lo"), "the guest has a network device: {out}");
    let comms = out.split("comms=").nth(1).unwrap().lines().next().unwrap();
    assert!(comms.contains("sh") && !comms.contains("qemu") && !comms.contains("cargo"), "{comms}");
    assert!(listener.accept().is_err(), "the guest reached the host's loopback");

    let mut c = Collect::default();
    let end = rt.run_step(&rec, &step("1", &image, "step1.sh", &[]), &mut c, &deadline()).unwrap();
    assert_eq!(end, StepEnd::Exited(3));
    assert_eq!(String::from_utf8_lossy(&c.out).trim(), "failing");

    // Cancel: the step and its background child are stopped.
    let cancel = deadline();
    let canceller = {
        let c = cancel.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(3));
            c.cancel(CancelReason::Canceled);
        })
    };
    let t = Instant::now();
    let mut c = Collect::default();
    let end = rt.run_step(&rec, &step("2", &image, "step2.sh", &[]), &mut c, &cancel).unwrap();
    canceller.join().unwrap();
    assert_eq!(end, StepEnd::Stopped(CancelReason::Canceled));
    assert!(t.elapsed() < Duration::from_secs(60));
    assert!(String::from_utf8_lossy(&c.out).contains("started"));

    // Deadline.
    let mut c = Collect::default();
    let short = Cancel::with_deadline(Some(Instant::now() + Duration::from_secs(4)));
    let end = rt.run_step(&rec, &step("3", &image, "step3.sh", &[]), &mut c, &short).unwrap();
    assert_eq!(end, StepEnd::Stopped(CancelReason::Deadline));

    // The VM still serves after a cancel: nothing of the killed steps is left running.
    std::fs::write(ws.join("ignored-by-guest.sh"), "echo never").unwrap();
    let mut c = Collect::default();
    let end = rt.run_step(&rec, &step("4", &image, "step1.sh", &[]), &mut c, &deadline()).unwrap();
    assert_eq!(end, StepEnd::Exited(3));

    rt.sync_workspace(&rec, &ws).unwrap();
    assert_eq!(std::fs::read_to_string(ws.join("out/result.txt")).unwrap(), "artifact-hello\n");
    assert!(!ws.join("src/input.txt").exists(), "a file the step removed came back");
    assert!(!ws.join("ignored-by-guest.sh").exists(), "the workspace is the guest's, not a merge");
    assert!(ws.join("step0.sh").exists());

    rt.teardown(&rec).unwrap();
    assert!(!rec.state_dir.exists());
    assert!(!std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default().starts_with(b"qemu"));
    rt.teardown(&rec).unwrap();
}

#[test]
fn microvm_janitor_removes_vms_no_live_job_owns_and_guest_garbage_is_refused() {
    let name = "microvm_janitor_removes_vms_no_live_job_owns_and_guest_garbage_is_refused";
    if let Some(why) = missing() {
        return common::skip(name, "microvm", &why);
    }
    let state = state_dir();
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    let prefix = format!("mvj{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let _dog = watchdog(state.clone(), prefix.clone(), Duration::from_secs(180));
    let rt = runtime(&state);
    let limits = Limits::default();
    let req = BootRequest {
        job_uid: "2",
        workspace: &ws,
        images: vec![],
        limits: &limits,
        name_prefix: &prefix,
        coordinator: None,
        endpoints: &[],
    };
    let live = rt.boot(&req).expect("boot live");
    let ghost = rt.boot(&req).expect("boot ghost");
    let live_set: HashSet<String> = [live.name.clone()].into_iter().collect();
    let removed = rt.janitor(&prefix, &live_set).unwrap();
    assert_eq!(removed, vec![ghost.name.clone()]);
    assert!(!ghost.state_dir.exists());
    assert!(live.state_dir.exists());
    // Another prefix is not ours to touch.
    assert!(rt.janitor("someone-else", &HashSet::new()).unwrap().is_empty());

    // A peer that speaks garbage on the agent socket: the host refuses it instead of hanging.
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("agent.sock");
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let _ = std::io::Write::write_all(&mut s, &[0xff; 64]);
            std::thread::sleep(Duration::from_secs(5));
        }
    });
    let mut fake = live.clone();
    if let Some(mut det) = VmDetails::of(&fake).unwrap() {
        det.socket = sock.clone();
        det.store(&mut fake);
    }
    let t = Instant::now();
    let err = rt.sync_workspace(&fake, &ws).unwrap_err();
    assert!(format!("{err:#}").contains("frame length"), "{err:#}");
    assert!(t.elapsed() < Duration::from_secs(5));

    rt.teardown(&live).unwrap();
    assert!(rt.janitor(&prefix, &HashSet::new()).unwrap().is_empty());
}

/// Processes whose command line carries `needle`.
pub(crate) fn processes_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if !e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            found.push(cmd);
        }
    }
    found
}

#[test]
fn microvm_loop_runs_a_coordinator_job_in_a_guest_and_uploads_its_artifact() {
    let name = "microvm_loop_runs_a_coordinator_job_in_a_guest_and_uploads_its_artifact";
    if let Some(why) = missing() {
        return common::skip(name, "microvm", &why);
    }
    let state = state_dir();
    let c = crate::coordinator::Coordinator::start();
    let prefix = format!("mvl{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let _dog = watchdog(state.clone(), prefix.clone(), Duration::from_secs(240));
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let id = c.submit(serde_json::json!({
        "queue": "batches",
        "files": {"in.txt": {"content": "hello-from-the-job"}},
        "dockerSteps": [
            {"key": "build", "image": IMAGE, "dir": "", "env": ["GREETING=hi"],
             "commands": ["mkdir -p out", "tr a-z A-Z < in.txt > out/result.txt",
                          "uname -r > out/kernel.txt", "echo $GREETING from $(uname -r)"]}
        ],
        "artifacts": ["out/*.txt"]
    }));
    let mut cmd = common::executor();
    c.executor_env(&mut cmd);
    cmd.arg("loop")
        .env("EXECUTOR_QUEUE_NAME", "batches")
        .env("EXECUTOR_RUNTIME", "microvm")
        .env("EXECUTOR_VM_ALLOW_TCG", "1")
        .env("EXECUTOR_VM_PREFIX", &prefix)
        .env("EXECUTOR_STATE_DIR", &state)
        .env("EXECUTOR_NUM_TOTAL_JOBS", "1")
        .env("EXECUTOR_HEARTBEAT_INTERVAL", "1s")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut lp = cmd.spawn().expect("starting executor loop");
    // Finding 3 of the security review: QEMU (which runs as the less trusted VM user) had the
    // executor's environment, shared secret included. Read its environment while it runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (stop, prefix) = (stop.clone(), prefix.clone());
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for e in std::fs::read_dir("/proc").unwrap().flatten() {
                    let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
                    let args = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                    if args.split(' ').next().is_some_and(|a| a.ends_with("qemu-system-x86_64"))
                        && args.contains(&prefix)
                    {
                        if let Ok(env) = std::fs::read(e.path().join("environ")) {
                            seen.push(String::from_utf8_lossy(&env).replace('\0', "\n"));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            seen
        })
    };
    let job = c.wait_state(id, &["completed", "failed", "errored", "canceled"], Duration::from_secs(200));
    // The loop exits after its one job.
    let err = common::wait_exit_ok(&mut lp, Duration::from_secs(30));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let qemu_envs = watcher.join().unwrap();
    assert_eq!(job["state"], "completed", "{job:#}\n{err}");
    assert!(!qemu_envs.is_empty(), "never saw the job's QEMU running");
    for env in &qemu_envs {
        assert!(!env.contains(&c.secret) && !env.contains("EXECUTOR_"), "QEMU's environment:\n{env}");
    }

    let logs = job["logs"].as_array().unwrap();
    let boot = logs.iter().find(|e| e["key"] == "setup.microvm.start").expect("setup.microvm.start");
    let sandbox = boot["out"].as_str().unwrap().split("started sandbox ").nth(1).unwrap().trim().to_string();
    assert!(sandbox.starts_with(&prefix), "{sandbox}");
    let step = logs.iter().find(|e| e["key"] == "step.docker.build").expect("step.docker.build");
    let out = step["out"].as_str().unwrap();
    assert!(out.contains("hi from "), "{out}");
    assert!(!out.contains(host_kernel.trim()), "the step ran on the host kernel: {out}");

    let arts = c.artifacts(id);
    let get =
        |n: &str| arts.iter().find(|(p, _)| p == n).map(|(_, d)| String::from_utf8_lossy(d).into_owned());
    assert_eq!(get("out/result.txt").as_deref(), Some("HELLO-FROM-THE-JOB"), "{arts:?}");
    let guest_kernel = get("out/kernel.txt").unwrap();
    assert!(out.contains(guest_kernel.trim()) && guest_kernel.trim() != host_kernel.trim(), "{guest_kernel}");

    // Nothing of the VM is left: no QEMU with its name, no sandbox directory.
    let down = logs.iter().find(|e| e["key"] == "teardown.microvm.remove").expect("teardown.microvm.remove");
    assert_eq!(down["exitCode"], 0, "{down:#}");
    assert!(processes_with(&sandbox).is_empty(), "{:?}", processes_with(&sandbox));
    assert_no_sandbox_left(&state, &prefix);
}

/// `test-vm --repo NAME --revision REV` clones the repository from the coordinator (with the
/// contract's shared-secret fallback, as Sourcegraph's test-vm does) into the VM's /data.
#[test]
fn test_vm_clones_a_repository_into_its_workspace() {
    let name = "test_vm_clones_a_repository_into_its_workspace";
    if let Some(why) = missing() {
        return common::skip(name, "microvm", &why);
    }
    let state = state_dir();
    let c = crate::coordinator::Coordinator::start();
    let tmp = tempfile::tempdir().unwrap();
    let (repo, c1, c2) = crate::gitserve::make_repo(tmp.path(), "widgets");
    Exec::new()
        .with(|cmd| c.admin_env(cmd))
        .args(["queue", "repo", "add", "github.com/acme/widgets", repo.to_str().unwrap()])
        .run();
    let test_vm = |rev: &str| {
        Exec::new()
            .args(["test-vm", "--accel", "tcg", "--timeout", "120", "--repo", "github.com/acme/widgets"])
            .args(["--revision", rev, "--", "cat a.txt; cat sub/s.txt 2>&1; git rev-parse HEAD 2>&1; pwd"])
            .env("EXECUTOR_STATE_DIR", &state)
            .env("EXECUTOR_FRONTEND_URL", &c.url)
            .env("EXECUTOR_FRONTEND_PASSWORD", &c.secret)
    };
    let out = test_vm(&c2).stderr_has("test-vm: cloned github.com/acme/widgets at").run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\ntwo\ns\n") && err.contains("/data"), "the second commit's tree in /data: {err}");
    assert!(!err.contains(&c.secret), "the secret never printed");
    let out = test_vm(&c1).run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\none\n") && err.contains("sub/s.txt"), "the first commit has no sub/: {err}");
    // Without the coordinator's secret there is no clone, and the error says why.
    Exec::new()
        .args(["test-vm", "--accel", "tcg", "--repo", "github.com/acme/widgets", "--revision", &c2])
        .env("EXECUTOR_STATE_DIR", &state)
        .env("EXECUTOR_FRONTEND_URL", &c.url)
        .env("EXECUTOR_FRONTEND_PASSWORD", "a-wrong-secret-of-enough-length")
        .fails()
        .stderr_has("registering with the coordinator")
        .run();
}

/// Finding 8 of the security review: the guest's serial console (`console.log` in the VM's
/// directory) grew with whatever the guest printed. A step that prints half a MiB more than the
/// cap to the console leaves exactly the cap on the host, and the guest is not blocked by it.
#[test]
fn microvm_guest_console_cannot_grow_past_its_cap() {
    let name = "microvm_guest_console_cannot_grow_past_its_cap";
    if let Some(why) = missing() {
        return common::skip(name, "microvm", &why);
    }
    let state = state_dir();
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path().join("workspace");
    std::fs::create_dir_all(&ws).unwrap();
    let cap = executor::sandbox::microvm::console::CONSOLE_CAP;
    let flood = cap + (512 << 10);
    std::fs::write(
        ws.join("flood.sh"),
        format!(
            "for tty in /dev/ttyS0 /dev/console; do\n\
             if [ -w $tty ]; then head -c {flood} /dev/zero | tr '\\0' x > $tty && echo flooded $tty; break; fi\n\
             done\n"
        ),
    )
    .unwrap();
    std::fs::write(ws.join("after.sh"), "echo still-running\n").unwrap();
    let prefix = format!("mvc{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let _dog = watchdog(state.clone(), prefix.clone(), Duration::from_secs(240));
    let rt = runtime(&state);
    let limits = Limits { cpus: 1, memory_bytes: 256 << 20, disk_bytes: 0, pids: 0 };
    let rec = rt
        .boot(&BootRequest {
            job_uid: "1",
            workspace: &ws,
            images: vec![IMAGE.into()],
            limits: &limits,
            name_prefix: &prefix,
            coordinator: None,
            endpoints: &[],
        })
        .expect("boot");
    let console = rec.state_dir.join("console.log");
    let deadline = || Cancel::with_deadline(Some(Instant::now() + Duration::from_secs(180)));
    let t = Instant::now();
    let mut c = Collect::default();
    let end = rt.run_step(&rec, &step("0", IMAGE, "flood.sh", &[]), &mut c, &deadline()).unwrap();
    let out = String::from_utf8_lossy(&c.out).into_owned();
    assert_eq!(end, StepEnd::Exited(0), "{out}{}", String::from_utf8_lossy(&c.err));
    assert!(out.contains("flooded /dev/"), "the step found no console to write: {out}");
    eprintln!("{name}: {flood} bytes to the console in {:?}", t.elapsed());
    let mut c = Collect::default();
    let end = rt.run_step(&rec, &step("1", IMAGE, "after.sh", &[]), &mut c, &deadline()).unwrap();
    assert_eq!(end, StepEnd::Exited(0));
    assert!(String::from_utf8_lossy(&c.out).contains("still-running"));
    let waited = Instant::now();
    while std::fs::metadata(&console).unwrap().len() < cap && waited.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let size = std::fs::metadata(&console).unwrap().len();
    assert_eq!(size, cap, "console.log holds {size} bytes after the guest printed {flood}");
    rt.teardown(&rec).unwrap();
    assert!(!rec.state_dir.exists());
}

/// Asserts that no sandbox directory named with `prefix` is left in `state`.
fn assert_no_sandbox_left(state: &Path, prefix: &str) {
    let left: Vec<String> = std::fs::read_dir(state.join("sandboxes"))
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(!left.iter().any(|n| n.starts_with(prefix)), "{left:?}");
}

/// The environment of an executor on coordinator `c` running microVMs named `prefix` in `state`
/// with a pool of one VM (512 MiB, one vCPU).
pub(crate) fn pool_loop_env(
    cmd: &mut std::process::Command,
    c: &crate::coordinator::Coordinator,
    prefix: &str,
    state: &Path,
) {
    c.executor_env(cmd);
    cmd.env("EXECUTOR_QUEUE_NAME", "batches")
        .env("EXECUTOR_RUNTIME", "microvm")
        .env("EXECUTOR_VM_ALLOW_TCG", "1")
        .env("EXECUTOR_VM_PREFIX", prefix)
        .env("EXECUTOR_STATE_DIR", state)
        .env("EXECUTOR_VM_POOL_SIZE", "1")
        .env("EXECUTOR_JOB_MEMORY", "512M")
        .env("EXECUTOR_JOB_NUM_CPUS", "1");
}

/// Where a job can write outside its workspace: the step's root and /tmp (per step), and what
/// lives as long as its VM: /dev (devtmpfs, one per kernel), the agent's own root filesystem and
/// its /tmp and /run. The first job writes a marker to each; the check prints what it sees.
const MARKERS: &str =
    "/marker /tmp/marker /dev/shm/marker /proc/1/root/marker /proc/1/root/tmp/marker /proc/1/root/run/marker";

/// The microVM pool (`EXECUTOR_VM_POOL_SIZE`): jobs take VMs booted ahead of them, each VM serves
/// one job and is destroyed after it, so nothing a job leaves in its VM (root filesystem, /tmp,
/// memory-backed files) is seen by a later job; the loop prints the pool's state, drains it when
/// it stops, and leaves no VM behind.
#[test]
fn microvm_pool_gives_each_job_a_fresh_vm_booted_ahead_of_it() {
    let name = "microvm_pool_gives_each_job_a_fresh_vm_booted_ahead_of_it";
    if let Some(why) = missing() {
        return common::skip(name, "microvm", &why);
    }
    let state = state_dir();
    let c = crate::coordinator::Coordinator::start();
    let prefix = format!("mvp{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let _dog = watchdog(state.clone(), prefix.clone(), Duration::from_secs(500));
    let write = format!(
        "for p in {MARKERS}; do mkdir -p $(dirname $p) && echo leaked > $p || echo cannot-write:$p; done; echo wrote"
    );
    let check =
        format!("for p in {MARKERS}; do if [ -e $p ]; then echo SEEN:$p; else echo clean:$p; fi; done");
    let job =
        |steps: serde_json::Value| c.submit(serde_json::json!({"queue": "batches", "dockerSteps": steps}));
    let step =
        |key: &str, cmd: &str| serde_json::json!({"key": key, "image": IMAGE, "dir": "", "commands": [cmd]});
    let tmp = tempfile::tempdir().unwrap();
    let log_path = tmp.path().join("loop.log");
    let mut cmd = common::executor();
    pool_loop_env(&mut cmd, &c, &prefix, &state);
    cmd.arg("loop")
        .env("EXECUTOR_NUM_TOTAL_JOBS", "3")
        .env("EXECUTOR_HEARTBEAT_INTERVAL", "1s")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap());
    let mut lp = cmd.spawn().expect("starting executor loop");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let ready = || log().matches("ready after").count();

    // The first job writes its markers, and its second step sees those that live as long as
    // the VM: the check can see a marker where one is left.
    let first = job(serde_json::json!([step("write", &write), step("check", &check)]));
    let done = ["completed", "failed", "errored", "canceled"];
    let j1 = c.wait_state(first, &done, Duration::from_secs(200));
    assert_eq!(j1["state"], "completed", "{j1:#}\n{}", log());
    let mut outputs = Vec::new();
    let mut sandboxes = Vec::new();
    let take = |j: &serde_json::Value, outputs: &mut Vec<String>, sandboxes: &mut Vec<String>| {
        let logs = j["logs"].as_array().unwrap();
        let boot = logs.iter().find(|e| e["key"] == "setup.microvm.start").expect("setup.microvm.start");
        let out = boot["out"].as_str().unwrap().to_string();
        let sandbox = out.split("started sandbox ").nth(1).unwrap().trim().to_string();
        sandboxes.push(sandbox);
        let check = logs.iter().find(|e| e["key"] == "step.docker.check").expect("step.docker.check");
        outputs.push(check["out"].as_str().unwrap().to_string());
        out
    };
    // Pool VMs taken so far that came ready into the pool ("ready after": booted or restored
    // ahead; the first job may have found one from the images of an earlier run in this state
    // directory). A VM restored on the job's path went to the job straight away.
    let mut taken = usize::from(take(&j1, &mut outputs, &mut sandboxes).contains(" ahead"));
    let write_out = j1["logs"].as_array().unwrap().iter().find(|e| e["key"] == "step.docker.write").unwrap()
        ["out"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(write_out.contains("wrote") && !write_out.contains("cannot-write"), "{write_out}");
    for p in ["/dev/shm/marker", "/proc/1/root/marker", "/proc/1/root/tmp/marker", "/proc/1/root/run/marker"]
    {
        assert!(
            outputs[0].contains(&format!("SEEN:{p}")),
            "within one VM the marker {p} stays: {}",
            outputs[0]
        );
    }

    // Two more jobs, each once the pool has a VM ready for it.
    for n in 0..2 {
        common::wait_until("a pool VM ready", Duration::from_secs(200), || ready() > taken);
        taken += 1;
        let id = job(serde_json::json!([step("check", &check)]));
        let j = c.wait_state(id, &done, Duration::from_secs(200));
        assert_eq!(j["state"], "completed", "{j:#}\n{}", log());
        let boot = take(&j, &mut outputs, &mut sandboxes);
        assert!(boot.contains("from the pool"), "job {} took no pool VM: {boot}\n{}", n + 2, log());
    }
    let err = common::wait_exit_ok(&mut lp, Duration::from_secs(60));
    let err = format!("{}{err}", log());
    for (i, out) in outputs.iter().enumerate().skip(1) {
        assert!(!out.contains("SEEN:"), "job {} saw what job 1 left: {out}", i + 1);
        assert_eq!(out.matches("stdout: clean:").count(), 6, "{out}");
    }
    let distinct: HashSet<&String> = sandboxes.iter().collect();
    assert_eq!(distinct.len(), 3, "each job had its own VM: {sandboxes:?}");
    assert!(err.contains("VM pool: size 1"), "{err}");
    assert!(err.contains("2 hits") || err.contains("3 hits"), "{err}");
    assert!(err.contains("VM pool: destroyed"), "{err}");
    // The pool's metrics came with the heartbeats (the coordinator labels them by executor).
    let (st, metrics) = c.request("GET", "/metrics", Some(&c.admin_auth()), None);
    assert_eq!(st, 200);
    let line = |name: &str, has: &str| {
        metrics.lines().find(|l| l.starts_with(&format!("{name}{{")) && l.contains(has)).map(str::to_string)
    };
    let hits = line("executor_vm_pool_claims_total", "result=\"hit\"").unwrap_or_else(|| panic!("{metrics}"));
    let n: f64 = hits.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 1.0, "{hits}");
    assert!(
        line("executor_vm_pool_boot_duration_seconds_count", "result=\"success\"").is_some(),
        "{metrics}"
    );
    assert!(line("executor_vm_pool_size", "").is_some(), "{metrics}");
    // Nothing of the pool is left: no QEMU, no sandbox directory.
    assert!(processes_with(&prefix).iter().all(|p| !p.contains("qemu")), "{:?}", processes_with(&prefix));
    assert_no_sandbox_left(&state, &prefix);
}

/// The pool's VMs stay while their executor lives (a janitor pass of another process leaves
/// them), are reclaimed by the next janitor pass once it was killed (SIGKILL: no drain), and go
/// with the loop when it stops on SIGTERM.
#[test]
fn microvm_pool_vms_of_a_killed_executor_are_reclaimed_and_sigterm_drains_the_pool() {
    let name = "microvm_pool_vms_of_a_killed_executor_are_reclaimed_and_sigterm_drains_the_pool";
    if let Some(why) = missing() {
        return common::skip(name, "microvm", &why);
    }
    let state = state_dir();
    let c = crate::coordinator::Coordinator::start();
    let prefix = format!("mvk{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let _dog = watchdog(state.clone(), prefix.clone(), Duration::from_secs(400));
    let tmp = tempfile::tempdir().unwrap();
    let with_env = |cmd: &mut std::process::Command| pool_loop_env(cmd, &c, &prefix, &state);
    let start_loop = |log: &Path| {
        let mut cmd = common::executor();
        with_env(&mut cmd);
        cmd.arg("loop").stdout(std::process::Stdio::null()).stderr(std::fs::File::create(log).unwrap());
        cmd.spawn().expect("starting executor loop")
    };
    let janitor = || {
        let mut cmd = common::executor();
        with_env(&mut cmd);
        let out = common::run(cmd.arg("janitor"));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let qemus = || processes_with(&prefix).into_iter().filter(|p| p.starts_with("qemu")).count();
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();

    let log_a = tmp.path().join("a.log");
    let mut a = start_loop(&log_a);
    common::wait_until("the pool's VM ready", Duration::from_secs(200), || {
        read(&log_a).contains("ready after")
    });
    assert_eq!(qemus(), 1, "{}", read(&log_a));
    let out = janitor();
    assert!(!out.contains(&prefix), "a live executor's pool VM was reclaimed: {out}");
    assert_eq!(qemus(), 1);
    // Killed: nothing drains its pool; the next janitor pass reclaims the VM.
    a.kill().unwrap();
    a.wait().unwrap();
    assert_eq!(qemus(), 1, "the VM outlives its killed executor until a janitor pass");
    let out = janitor();
    assert!(out.contains(&format!("microvm sandbox {prefix}-")), "{out}");
    assert_eq!(qemus(), 0, "{:?}", processes_with(&prefix));

    let log_b = tmp.path().join("b.log");
    let mut b = start_loop(&log_b);
    common::wait_until("the pool's VM ready", Duration::from_secs(200), || {
        read(&log_b).contains("ready after")
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(b.id() as i32), nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    common::wait_exit_ok(&mut b, Duration::from_secs(60));
    let said = read(&log_b);
    assert!(said.contains("VM pool: destroyed 1 idle VMs"), "{said}");
    assert_eq!(qemus(), 0, "{:?}", processes_with(&prefix));
    assert_no_sandbox_left(&state, &prefix);
}

/// The image config in a guest as under Docker (and the `oci` runtime): `Env` under the step's
/// variables, `User` from the image's passwd and group (supplementary groups too), `HOME` from
/// its entry, the contract's working directory over `WorkingDir`; the root is writable and each
/// step starts from the image again.
#[test]
fn microvm_steps_get_the_image_env_user_and_home() {
    let name = "microvm_steps_get_the_image_env_user_and_home";
    if let Some(why) = missing() {
        return common::skip(name, "microvm", &why);
    }
    let state = state_dir();
    let tmp = tempfile::tempdir().unwrap();
    crate::oci_root::import_app_image_to(&state, tmp.path());
    let ws = tmp.path().join("workspace");
    std::fs::create_dir_all(ws.join("repo")).unwrap();
    std::fs::write(ws.join("repo/input.txt"), "from the host\n").unwrap();
    std::fs::write(
        ws.join("step0.sh"),
        "echo \"uid=$(id -u) gid=$(id -g) groups=$(id -G)\"; echo \"home=$HOME\"; pwd; \
         echo \"path=$PATH mode=$APP_MODE override=$OVERRIDE\"; cat input.txt; \
         echo mine > \"$HOME/.rc\" && cat \"$HOME/.rc\"; touch /usr/local/x 2>/dev/null || echo usr-denied; \
         stat -c %Y /usr/share/doc/readme\n",
    )
    .unwrap();
    std::fs::write(ws.join("step1.sh"), "test -e \"$HOME/.rc\" && echo still-there || echo fresh\n").unwrap();
    std::fs::write(
        ws.join("step2.sh"),
        "ls -A /data | grep -c executor-root; dd if=/dev/zero of=/home/app/big bs=1M count=100\n",
    )
    .unwrap();
    let prefix = format!("mvu{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let _dog = watchdog(state.clone(), prefix.clone(), Duration::from_secs(240));
    let rt = runtime(&state);
    // A 64 MiB workspace disk: the steps' layers are on it, so it caps writes to the root too
    // (a tmpfs layer would take the 100 MiB below in the VM's memory).
    let limits = Limits { cpus: 1, memory_bytes: 512 << 20, disk_bytes: 64 << 20, pids: 0 };
    let rec = rt
        .boot(&BootRequest {
            job_uid: "1",
            workspace: &ws,
            images: vec!["app:1".into()],
            limits: &limits,
            name_prefix: &prefix,
            coordinator: None,
            endpoints: &[],
        })
        .expect("boot");
    let env = vec!["OVERRIDE=step".to_string()];
    let mut out = Collect::default();
    let s0 = StepSpec { key: "step.0", image: "app:1", script: "step0.sh", dir: "repo", env: &env };
    let end = rt.run_step(&rec, &s0, &mut out, &Cancel::new());
    let mut out1 = Collect::default();
    let s1 = StepSpec { key: "step.1", image: "app:1", script: "step1.sh", dir: "repo", env: &[] };
    let end1 = rt.run_step(&rec, &s1, &mut out1, &Cancel::new());
    let mut out2 = Collect::default();
    let s2 = StepSpec { key: "step.2", image: "app:1", script: "step2.sh", dir: "", env: &[] };
    let end2 = rt.run_step(&rec, &s2, &mut out2, &Cancel::new());
    let synced = rt.sync_workspace(&rec, &ws);
    let _ = rt.teardown(&rec);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert_eq!(end.unwrap(), StepEnd::Exited(0), "{}", text(&out.err));
    assert_eq!(
        text(&out.out),
        "uid=1000 gid=1000 groups=1000 50\nhome=/home/app\n/data/repo\n\
         path=/usr/local/bin:/usr/bin:/bin mode=image override=step\nfrom the host\nmine\nusr-denied\n\
         1500000000\n",
        "{}",
        text(&out.err)
    );
    assert_eq!(end1.unwrap(), StepEnd::Exited(0));
    assert_eq!(text(&out1.out), "fresh\n", "each step starts from the image");
    assert_ne!(end2.unwrap(), StepEnd::Exited(0), "{}", text(&out2.err));
    assert_eq!(text(&out2.out), "1\n", "only the running step's layer is in /data");
    assert!(text(&out2.err).contains("No space left on device"), "{}", text(&out2.err));
    synced.unwrap();
    let left: Vec<_> = std::fs::read_dir(&ws)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".executor-root-"))
        .collect();
    assert!(left.is_empty(), "a layer came back to the host: {left:?}");
}

/// The operator's startup script runs as Sourcegraph runs it on its VMs: as root in the guest
/// itself (outside the step image), before the job's steps; what it writes there stays for the
/// VM's life (the guest is the job's alone).
#[test]
fn microvm_startup_script_runs_as_root_in_the_guest() {
    let name = "microvm_startup_script_runs_as_root_in_the_guest";
    if let Some(why) = missing() {
        return common::skip(name, "microvm", &why);
    }
    let state = state_dir();
    let tmp = tempfile::tempdir().unwrap();
    crate::oci_root::import_app_image_to(&state, tmp.path());
    let ws = tmp.path().join("workspace");
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::write(
        ws.join("startup.sh"),
        "echo \"uid=$(id -u)\"; test -d /home/app && echo in-image || echo in-guest; pwd\n",
    )
    .unwrap();
    std::fs::write(ws.join("step0.sh"), "echo \"uid=$(id -u)\"; test -d /home/app && echo in-image\n")
        .unwrap();
    let prefix = format!("mvs{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let _dog = watchdog(state.clone(), prefix.clone(), Duration::from_secs(240));
    let rt = runtime(&state);
    let limits = Limits { cpus: 1, memory_bytes: 512 << 20, disk_bytes: 0, pids: 0 };
    let rec = rt
        .boot(&BootRequest {
            job_uid: "1",
            workspace: &ws,
            images: vec!["app:1".into()],
            limits: &limits,
            name_prefix: &prefix,
            coordinator: None,
            endpoints: &[],
        })
        .expect("boot");
    let key = executor::sandbox::STARTUP_SCRIPT_KEY;
    let mut out = Collect::default();
    let s = StepSpec { key, image: "app:1", script: "startup.sh", dir: "", env: &[] };
    let end = rt.run_step(&rec, &s, &mut out, &Cancel::new());
    let mut out0 = Collect::default();
    let s0 = StepSpec { key: "step.0", image: "app:1", script: "step0.sh", dir: "", env: &[] };
    let end0 = rt.run_step(&rec, &s0, &mut out0, &Cancel::new());
    let _ = rt.teardown(&rec);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert_eq!(end.unwrap(), StepEnd::Exited(0), "{}", text(&out.err));
    assert_eq!(text(&out.out), "uid=0\nin-guest\n/data\n", "{}", text(&out.err));
    assert_eq!(end0.unwrap(), StepEnd::Exited(0), "{}", text(&out0.err));
    assert_eq!(text(&out0.out), "uid=1000\nin-image\n", "the job's steps still run in their image");
}

/// The pool's VMs made, from its log: (start, ready) in ms of the day, from each "VM NAME ready
/// after S s" line (its clock and S).
fn ready_intervals(log: &str) -> Vec<(i64, i64)> {
    log.lines()
        .filter_map(|l| {
            let (clock, rest) = l.split_once(' ')?;
            let secs: f64 = rest.split("ready after ").nth(1)?.split(' ').next()?.parse().ok()?;
            let mut hms = clock.split(':');
            let (h, m): (i64, i64) = (hms.next()?.parse().ok()?, hms.next()?.parse().ok()?);
            let s: f64 = hms.next()?.parse().ok()?;
            let end = (h * 3600 + m * 60) * 1000 + (s * 1000.0) as i64;
            Some((end - (secs * 1000.0) as i64, end))
        })
        .collect()
}

/// Pool VMs come from a snapshot of the pool's key (issue 25): two VMs restored from one
/// snapshot read different `/dev/urandom` bytes and machine ids and the host's clock; the
/// janitor removes a snapshot whose kernel is no longer installed; a corrupted snapshot is
/// detected, the VM boots cold and the job's start entry says why. Limits of their own (448 MiB)
/// give this test its own key, hence its own snapshot. The pool is of 2, restoring 2 at once:
/// its VMs' restores overlap in time; a corrupted snapshot fails both restores started together,
/// and their cold boots go one at a time.
#[test]
fn microvm_pool_vms_restored_from_one_snapshot_are_unique_and_a_corrupt_one_boots_cold() {
    let name = "microvm_pool_vms_restored_from_one_snapshot_are_unique_and_a_corrupt_one_boots_cold";
    if let Some(why) = missing() {
        return common::skip(name, "microvm", &why);
    }
    let state = state_dir();
    let c = crate::coordinator::Coordinator::start();
    let prefix = format!("mvs{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let _dog = watchdog(state.clone(), prefix.clone(), Duration::from_secs(600));
    let probe = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' '; cat /etc/machine-id; date +%s";
    let done = ["completed", "failed", "errored", "canceled"];
    let tmp = tempfile::tempdir().unwrap();
    // One loop of `jobs` jobs, each submitted once the pool has a VM ready; the jobs' start
    // entries and probe outputs, and the loop's log.
    let run_loop = |jobs: usize, log_name: &str| -> (Vec<(String, String)>, String) {
        let log_path = tmp.path().join(log_name);
        let mut cmd = common::executor();
        pool_loop_env(&mut cmd, &c, &prefix, &state);
        cmd.arg("loop")
            .env("EXECUTOR_VM_POOL_SIZE", "2")
            .env("EXECUTOR_VM_POOL_RESTORES", "2")
            .env("EXECUTOR_JOB_MEMORY", "448M")
            .env("EXECUTOR_NUM_TOTAL_JOBS", jobs.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap());
        let mut lp = cmd.spawn().expect("starting executor loop");
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        let mut seen = Vec::new();
        for n in 0..jobs {
            common::wait_until("a pool VM ready", Duration::from_secs(300), || {
                log().matches("ready after").count() > n
            });
            let id = c.submit(serde_json::json!({"queue": "batches", "dockerSteps": [
                {"key": "probe", "image": IMAGE, "dir": "", "commands": [probe]}]}));
            let j = c.wait_state(id, &done, Duration::from_secs(200));
            assert_eq!(j["state"], "completed", "{j:#}\n{}", log());
            let logs = j["logs"].as_array().unwrap();
            let entry = |key: &str| {
                logs.iter().find(|e| e["key"] == key).unwrap_or_else(|| panic!("{key}: {j:#}"))["out"]
                    .as_str()
                    .unwrap()
                    .to_string()
            };
            seen.push((entry("setup.microvm.start"), entry("step.docker.probe")));
        }
        let err = common::wait_exit_ok(&mut lp, Duration::from_secs(60));
        (seen, format!("{}{err}", log()))
    };

    // The pool's first VMs carry the jobs' image (as after an earlier job named it).
    std::fs::write(state.join("vm/pool-images.json"), format!(r#"{{"images":["{IMAGE}"]}}"#)).unwrap();
    let (seen, log1) = run_loop(2, "loop1.log");
    let mut probes = Vec::new();
    for (start, out) in &seen {
        assert!(start.contains("restored ahead from snapshot"), "{start}\n{log1}");
        let lines: Vec<&str> =
            out.lines().filter_map(|l| l.split("stdout: ").nth(1)).map(str::trim).collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines[0].len() == 32 && lines[1].len() == 32, "{out}");
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let guest: i64 = lines[2].parse().unwrap();
        assert!((now - guest).abs() < 300, "the guest's clock is the host's: {guest} against {now}");
        probes.push((lines[0].to_string(), lines[1].to_string()));
    }
    assert_ne!(probes[0].0, probes[1].0, "two restores of one snapshot read the same random bytes");
    assert_ne!(probes[0].1, probes[1].1, "two restores of one snapshot have one machine id");
    // The pool of 2 filled by restores at once: the first VM's (after its template was saved)
    // and the second's, started as the snapshot appeared, overlap in time.
    let made = ready_intervals(&log1);
    assert!(made.len() >= 2, "{log1}");
    let ((s0, e0), (s1, e1)) = (made[0], made[1]);
    assert!(s0.max(s1) < e0.min(e1), "the first two restores did not overlap: {made:?}\n{log1}");
    let id = log1
        .split("saved snapshot ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("{log1}"));
    let snaps = state.join("vm/snapshots");
    let snap = snaps.join(id);
    assert!(snap.join("state").is_file(), "{}", snap.display());

    // The janitor: a snapshot of a kernel no longer installed goes; the current one stays.
    let stale = snaps.join("ffffffffffffffff");
    std::fs::create_dir_all(&stale).unwrap();
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("meta.json")).unwrap()).unwrap();
    meta["kernel"] = "6.1.0-0-gone vmlinux missing".into();
    std::fs::write(stale.join("meta.json"), meta.to_string()).unwrap();
    std::fs::write(stale.join("state"), b"x").unwrap();
    runtime(&state).janitor(&prefix, &HashSet::new()).unwrap();
    assert!(!stale.exists() && snap.join("state").is_file());

    // One byte flipped in the middle of the stream: the restore fails, the VM boots cold.
    let mut bytes = std::fs::read(snap.join("state")).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(snap.join("state"), &bytes).unwrap();
    let (seen, log2) = run_loop(1, "loop2.log");
    assert!(log2.contains(&format!("restoring 2 VMs at once from snapshot {id}")), "{log2}");
    let start = &seen[0].0;
    assert!(
        start.contains("booted ahead cold (restoring snapshot") && start.contains("is corrupted"),
        "{start}\n{log2}"
    );
    assert!(seen[0].1.contains("stdout: "), "{:?}", seen[0]);
    assert!(log2.contains(&format!("snapshot {id} is corrupted")), "{log2}");
    assert!(processes_with(&prefix).iter().all(|p| !p.contains("qemu")), "{:?}", processes_with(&prefix));
    assert_no_sandbox_left(&state, &prefix);
}
