//! The host's side of issue 24, one test per class: a pool VM carries only its job's images,
//! QEMU runs jailed (its own uid, namespaces, `no_new_privs`, seccomp), a job link cannot fill
//! the host's neighbour table with forged ARP, the executor host forwards nothing that is not a
//! job's, a job's connection-tracking entries go with it, empty VM cgroups are reaped, and the
//! coordinator's `/metrics` wants its token.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use executor::sandbox::microvm::VmDetails;
use executor::sandbox::{BootRequest, Limits, RecordDetails, Runtime};

use crate::common::{self, Exec};
use crate::microvm::{missing, pool_loop_env, runtime, state_dir, watchdog, IMAGE};

/// A `/proc/<pid>/status` field's words.
fn status_field(pid: i32, field: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in {status}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Two VMs at once: each QEMU has a uid of its own from the uid ranges (never root, never the
/// other's), `no_new_privs`, QEMU's seccomp filter, its own mount and network namespaces, and
/// a root that shows its own sandbox directory and none of the host's state; its uid range is
/// given back with the VM.
#[test]
fn microvm_qemu_runs_jailed_with_its_own_uid_seccomp_and_namespaces() {
    let name = "microvm_qemu_runs_jailed_with_its_own_uid_seccomp_and_namespaces";
    if let Some(why) = missing() {
        return common::skip(name, "microvm", &why);
    }
    if !common::is_root() {
        return common::skip(name, "root", "the jail needs a root executor");
    }
    let state = state_dir();
    let prefix = format!("mvj{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let _dog = watchdog(state.clone(), prefix.clone(), Duration::from_secs(300));
    let rt = runtime(&state);
    let limits = Limits { cpus: 1, memory_bytes: 256 << 20, disk_bytes: 0, pids: 0 };
    let tmp = tempfile::tempdir().unwrap();
    let mut recs = Vec::new();
    for i in 0..2 {
        let ws = tmp.path().join(format!("ws{i}"));
        std::fs::create_dir_all(&ws).unwrap();
        std::fs::write(ws.join("f"), "x").unwrap();
        let rec = rt
            .boot(&BootRequest {
                job_uid: "1",
                workspace: &ws,
                images: vec![IMAGE.to_string()],
                limits: &limits,
                name_prefix: &prefix,
                coordinator: None,
            })
            .expect("boot");
        recs.push(rec);
    }
    let host_ns = |ns: &str| std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
    let mut seen = HashSet::new();
    for rec in &recs {
        let pid = rec.pid.unwrap();
        let uids = status_field(pid, "Uid");
        assert!(uids.iter().all(|u| u == &uids[0]), "{uids:?}");
        let uid: u32 = uids[0].parse().unwrap();
        assert!(uid >= 2_000_000_000, "QEMU's uid {uid} is not from the uid ranges");
        assert!(seen.insert(uid), "two VMs share uid {uid}");
        assert_eq!(status_field(pid, "NoNewPrivs"), ["1"]);
        assert_eq!(status_field(pid, "Seccomp"), ["2"]);
        assert_eq!(status_field(pid, "Groups"), Vec::<String>::new(), "no supplementary groups");
        for ns in ["mnt", "net", "ipc", "uts"] {
            let vm = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
            assert_ne!(vm, host_ns(ns), "QEMU shares the host's {ns} namespace");
        }
        // Its root: the program directories, a few device nodes, its own procfs and its
        // directory; no state directory, no other VM.
        let root = Path::new("/proc").join(pid.to_string()).join("root");
        let mut top: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into())
            .collect();
        top.sort();
        for absent in ["tmp", "home", "root", "run", "var", "sys", "work"] {
            assert!(!top.contains(&absent.to_string()), "{absent} in QEMU's root: {top:?}");
        }
        assert!(root.join("vm/agent.sock").exists(), "its own directory at /vm: {top:?}");
        assert!(!root.join(state.strip_prefix("/").unwrap()).exists(), "the state directory is visible");
        let mut devs: Vec<String> = std::fs::read_dir(root.join("dev"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into())
            .collect();
        devs.sort();
        assert!(
            devs.iter().all(|d| ["kvm", "null", "random", "urandom", "zero"].contains(&d.as_str())),
            "{devs:?}"
        );
        let det = VmDetails::of(rec).unwrap().unwrap();
        assert_eq!(det.qemu_user, Some(format!("uid {uid}")));
        let argv = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(
            String::from_utf8_lossy(&argv)
                .contains("on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"),
            "QEMU's seccomp argument"
        );
    }
    // (Each boot's hello came over the agent socket QEMU made in its jail.)
    for rec in &recs {
        rt.teardown(rec).unwrap();
    }
    let ranges = state.join("uid-ranges");
    let left: Vec<String> = std::fs::read_dir(&ranges)
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .filter(|o| o.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "uid ranges of torn-down VMs: {left:?}");
}

/// Two jobs with different images on a pool of one VM, then the first job's image again: the
/// third job sees exactly one image disk, its own (today's pool would hand it a VM carrying both
/// images), and `vm/pool-images.json` names only the last job's image.
#[test]
fn microvm_pool_vm_carries_only_its_jobs_images() {
    let name = "microvm_pool_vm_carries_only_its_jobs_images";
    if let Some(why) = missing() {
        return common::skip(name, "microvm", &why);
    }
    let state = state_dir();
    let other = "microvm-busybox-other";
    Exec::new().args(["image", "build-busybox", other]).env("EXECUTOR_STATE_DIR", &state).run();
    let c = crate::coordinator::Coordinator::start();
    let prefix = format!("mvi{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let _dog = watchdog(state.clone(), prefix.clone(), Duration::from_secs(600));
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
    let done = ["completed", "failed", "errored", "canceled"];
    let disks = "echo DISKS $(grep -c ' vd' /proc/partitions)";
    let run = |image: &str| {
        let id = c.submit(serde_json::json!({"queue": "batches", "dockerSteps": [
            {"key": "disks", "image": image, "dir": "", "commands": [disks]}
        ]}));
        let j = c.wait_state(id, &done, Duration::from_secs(240));
        assert_eq!(j["state"], "completed", "{j:#}\n{}", log());
        let logs = j["logs"].as_array().unwrap();
        let out = |key: &str| {
            logs.iter().find(|e| e["key"] == key).and_then(|e| e["out"].as_str()).unwrap_or("").to_string()
        };
        (out("step.docker.disks"), out("setup.microvm.start"))
    };
    let (first, _) = run(IMAGE);
    let before = ready();
    let (second, _) = run(other);
    // The pool boots a VM for the second job's images; the third job names the first image.
    common::wait_until("a pool VM booted after the second job", Duration::from_secs(240), || {
        ready() > before
    });
    let (third, boot) = run(IMAGE);
    common::wait_exit_ok(&mut lp, Duration::from_secs(60));
    // Each job's VM: the workspace disk and one image disk.
    for (n, out) in [first, second, third].iter().enumerate() {
        assert!(out.contains("DISKS 2"), "job {} saw other image disks: {out}\n{boot}\n{}", n + 1, log());
    }
    let wanted = std::fs::read_to_string(state.join("vm/pool-images.json")).unwrap();
    assert_eq!(wanted, format!(r#"{{"images":["{IMAGE}"]}}"#));
    let _ = runtime(&state).janitor(&prefix, &HashSet::new());
}
