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
                endpoints: &[],
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
    // The VMs' QEMUs were the loop's children, reaped before their cgroups went: none is left.
    let left = vm_cgroups(&prefix);
    let _ = runtime(&state).janitor(&prefix, &HashSet::new());
    assert!(left.is_empty(), "cgroups left by the loop's VMs: {left:?}");
}

/// The VM cgroups named with `prefix`, of every hierarchy.
fn vm_cgroups(prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for sub in ["executor", "memory/executor", "pids/executor", "cpu/executor", "cpu,cpuacct/executor"] {
        let dir = Path::new("/sys/fs/cgroup").join(sub);
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(prefix) {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}

/// An empty VM cgroup of a VM that is gone (a boot killed between its cgroup and its record)
/// is removed by the janitor; a live VM's stays.
#[test]
fn microvm_janitor_removes_empty_vm_cgroups() {
    let name = "microvm_janitor_removes_empty_vm_cgroups";
    if !common::is_root() {
        return common::skip(name, "root", "cgroups need root");
    }
    let state = tempfile::tempdir().unwrap();
    let prefix = format!("mvc{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let (gone, live) = (format!("{prefix}-gone"), format!("{prefix}-live"));
    let mut made = Vec::new();
    for sub in ["executor", "memory/executor", "pids/executor", "cpu/executor"] {
        let parent = Path::new("/sys/fs/cgroup").join(sub);
        if parent.parent().is_some_and(|p| p.join("cgroup.procs").is_file()) {
            for n in [&gone, &live] {
                if std::fs::create_dir_all(parent.join(n)).is_ok() {
                    made.push(parent.join(n));
                }
            }
        }
    }
    if made.is_empty() {
        return common::skip(name, "cgroup", "no writable cgroup hierarchy");
    }
    let removed = runtime(state.path()).janitor(&prefix, &HashSet::from([live.clone()])).unwrap();
    let left = vm_cgroups(&prefix);
    for d in &made {
        let _ = std::fs::remove_dir(d);
    }
    assert!(removed.contains(&gone), "{removed:?}");
    assert!(left.iter().all(|l| l.ends_with(&live)) && !left.is_empty(), "{left:?}");
}

/// Two namespaces of nobody's, each linked to the executor host, for the forwarding check;
/// removed when dropped.
struct Foreign(Vec<String>);

impl Drop for Foreign {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = std::process::Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Sends forged ARP requests for `gateway` from link `eth0` of namespace `ns`: senders
/// 203.0.113.`from`..`to`, each with its own made-up MAC address.
fn forge_arp(world: &crate::network::World, ns: &str, gateway: &str, from: u8, to: u8) {
    let py = "import socket,struct,sys\n\
              s=socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind(('eth0', 0))\n\
              for i in range(int(sys.argv[2]), int(sys.argv[3])):\n\
              \x20mac=bytes([2,0,0,0,0,i]); sip=socket.inet_aton('203.0.113.%d' % i)\n\
              \x20arp=struct.pack('!HHBBH',1,0x0800,6,4,1)+mac+sip+b'\\0'*6+socket.inet_aton(sys.argv[1])\n\
              \x20s.send(b'\\xff'*6+mac+b'\\x08\\x06'+arp)\n";
    let out = world
        .in_ns(ns, "python3")
        .args(["-c", py, gateway, &from.to_string(), &to.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    std::thread::sleep(Duration::from_millis(300));
}

/// The forged neighbours the executor host learnt.
fn forged_neighbours(world: &crate::network::World) -> Vec<String> {
    let out = world.in_ns(&world.host, "ip").args(["neigh", "show"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("203.0.113."))
        .map(str::to_string)
        .collect()
}

/// In a namespace world, one runc job with the network, on an executor host whose forwarding
/// was off: while it runs, forged ARP from the job's end of its link teaches the host no
/// neighbour; after it, the host holds no connection-tracking entry of the job's address, and a
/// packet between two foreign namespaces linked to the host is not forwarded (the executor
/// turned forwarding on). Each check is then shown to depend on its rule: without the ARP
/// filter the forged neighbours appear, without the forward chain's last rule the packet
/// passes.
#[test]
fn network_job_links_forge_no_arp_leave_no_flows_and_route_nothing_else() {
    use crate::network::{executor_env, sh, JobsGuard, World, HOST_INTERNET_SIDE, WEB};
    let test = "network_job_links_forge_no_arp_leave_no_flows_and_route_nothing_else";
    if !crate::network::can_build(test) || !crate::oci::can_run(test, "runc") {
        return;
    }
    let world = World::build();
    let h = world.host.clone();
    let tag = world.tag.clone();
    sh(&format!("nsenter --net=/run/netns/{h} sh -c 'echo 0 > /proc/sys/net/ipv4/ip_forward'"));
    let (fa, fb) = (format!("nt{tag}fa"), format!("nt{tag}fb"));
    let _foreign = Foreign(vec![fa.clone(), fb.clone()]);
    sh(&format!(
        "ip netns add {fa}; ip netns add {fb}
         ip link add ha{tag} netns {h} type veth peer name ah{tag} netns {fa}
         ip link add hb{tag} netns {h} type veth peer name bh{tag} netns {fb}
         ip -n {h} addr add 10.30.0.1/24 dev ha{tag}; ip -n {h} link set ha{tag} up
         ip -n {h} addr add 10.40.0.1/24 dev hb{tag}; ip -n {h} link set hb{tag} up
         ip -n {fa} addr add 10.30.0.2/24 dev ah{tag}; ip -n {fa} link set ah{tag} up
         ip -n {fb} addr add 10.40.0.2/24 dev bh{tag}; ip -n {fb} link set bh{tag} up
         ip -n {fa} route add default via 10.30.0.1; ip -n {fb} route add default via 10.40.0.1"
    ));
    let tmp = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let state = tmp.path().join("state");
    Exec::new().args(["image", "build-busybox"]).env("EXECUTOR_STATE_DIR", &state).run();
    let prefix = format!("neths{tag}");
    let exe = common::bin();
    let _guard = JobsGuard {
        host: h.clone(),
        exe: exe.clone(),
        oci: "runc".into(),
        state: state.clone(),
        prefix: prefix.clone(),
    };
    let ping = |from: &str| {
        world.in_ns(from, "ping").args(["-c", "1", "-W", "1", "10.40.0.2"]).output().unwrap().status.success()
    };
    world.on_host(|| {
        let c = crate::coordinator::Coordinator::start_listening(&format!("{HOST_INTERNET_SIDE}:0"));
        let script = format!("wget -q -O - http://{WEB}/hello.txt; echo fetched; sleep 20");
        let id = c.submit(serde_json::json!({"dockerSteps": [
            {"key": "net", "image": "busybox", "dir": "", "env": [], "commands": [script]}
        ]}));
        let mut cmd = world.in_ns(&h, exe.to_str().unwrap());
        executor_env(&mut cmd, &c.url, &c.secret, "runc", &state, &prefix);
        cmd.env("EXECUTOR_NUM_TOTAL_JOBS", "1").arg("loop").stdout(std::process::Stdio::null());
        cmd.stderr(std::process::Stdio::null());
        let mut lp = crate::network::KillOnDrop(cmd.spawn().unwrap());
        common::wait_until("the job to fetch", Duration::from_secs(60), || {
            c.job(id)["logs"]
                .as_array()
                .is_some_and(|l| l.iter().any(|e| e["out"].as_str().unwrap_or("").contains("fetched")))
        });
        let job_ns = std::fs::read_dir("/run/netns")
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with(&prefix))
            .expect("the job's network namespace");
        let slot = std::fs::read_dir(state.join("network/slots"))
            .unwrap()
            .flatten()
            .map(|e| std::fs::read_to_string(e.path()).unwrap())
            .find(|t| t.starts_with(&job_ns))
            .expect("the job's slot");
        let own: std::net::Ipv4Addr = slot.lines().nth(1).unwrap().parse().unwrap();
        let gateway = std::net::Ipv4Addr::from(u32::from(own) - 1).to_string();
        // While the job runs, the host tracks its fetch.
        let ct = world.in_ns(&h, "cat").arg("/proc/net/nf_conntrack").output().unwrap();
        let ct = String::from_utf8_lossy(&ct.stdout).into_owned();
        assert!(
            ct.contains(&format!("src={own} ")),
            "no connection-tracking entry of the job's fetch:\n{ct}"
        );
        forge_arp(&world, &job_ns, &gateway, 1, 40);
        let forged = forged_neighbours(&world);
        assert!(forged.is_empty(), "forged ARP taught the host neighbours: {forged:?}");
        // The control: without the filter the same ARP is learnt.
        sh(&format!("nsenter --net=/run/netns/{h} nft flush chain arp executor input"));
        forge_arp(&world, &job_ns, &gateway, 41, 45);
        assert!(!forged_neighbours(&world).is_empty(), "the forged ARP did not reach the host at all");

        common::wait_exit_ok(&mut lp.0, Duration::from_secs(90));
        let job = c.wait_state(id, &["completed", "failed", "errored"], Duration::from_secs(30));
        assert_eq!(job["state"], "completed", "{job:#}");
        // The job's flows (its HTTP fetch, in TIME_WAIT for two minutes) are gone with it.
        let ct = world.in_ns(&h, "cat").arg("/proc/net/nf_conntrack").output().unwrap();
        let ct = String::from_utf8_lossy(&ct.stdout).into_owned();
        let mine: Vec<&str> = ct.lines().filter(|l| l.contains(&format!("={own} "))).collect();
        assert!(mine.is_empty(), "connection-tracking entries of the job's address {own}: {mine:?}");
        let fwd = world.in_ns(&h, "cat").arg("/proc/sys/net/ipv4/ip_forward").output().unwrap();
        assert_eq!(String::from_utf8_lossy(&fwd.stdout).trim(), "1", "the executor turned forwarding on");
        assert!(!ping(&fa), "the executor host forwarded a packet between two foreign namespaces");
        // The control: without the forward chain's last rule the same packet passes.
        let chain = world
            .in_ns(&h, "nft")
            .args(["-a", "list", "chain", "inet", "executor", "forward"])
            .output()
            .unwrap();
        let chain = String::from_utf8_lossy(&chain.stdout).into_owned();
        let handle = chain
            .lines()
            .find(|l| l.contains("not a job's"))
            .and_then(|l| l.rsplit("handle ").next())
            .unwrap_or_else(|| panic!("no final drop in the forward chain:\n{chain}"))
            .trim()
            .to_string();
        sh(&format!("nsenter --net=/run/netns/{h} nft delete rule inet executor forward handle {handle}"));
        assert!(ping(&fa), "the foreign namespaces do not reach each other even without the rule");
    });
}

/// `/metrics` answers only with the admin token: a job's network may reach the coordinator's
/// port (for uploads), and neither no token, the executor secret nor a job token opens it.
#[test]
fn queue_metrics_are_refused_without_the_admin_token() {
    let c = crate::coordinator::Coordinator::start();
    let (code, _) = c.request("GET", "/metrics", None, None);
    assert_eq!(code, 401);
    let (code, _) = c.request("GET", "/metrics", Some(&format!("token-executor {}", c.secret)), None);
    assert_eq!(code, 401);
    let (code, _) = c.request("GET", "/metrics", Some("Bearer not-the-admin-token-at-all"), None);
    assert_ne!(code, 200);
    let (code, text) = c.request("GET", "/metrics", Some(&c.admin_auth()), None);
    assert_eq!(code, 200);
    assert!(text.contains("executor_queue_active_executors"), "{text}");
}
