//! Per-job networks (`EXECUTOR_NETWORK=internet`) in a world the test builds of its own network
//! namespaces, so that no packet can leave the machine whatever the firewall does: an *executor
//! host* namespace (the coordinator and the executor run there) whose default route leads into
//! an *internet* namespace (documentation addresses with HTTP and DNS, and a metadata responder
//! at 169.254.169.254), and a *corporate* namespace at 10.20.0.0/16. Real jobs in oci (runc,
//! crun, runsc) fetch from the internet by name and address, reach the coordinator, and are
//! refused everything else; nothing of their networks is left, also after a killed executor and
//! a janitor pass.

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common;

pub(crate) const WEB: &str = "198.51.100.10";
const DNS: &str = "198.51.100.53";
const METADATA: &str = "169.254.169.254";
const CORPORATE: &str = "10.20.0.10";
pub(crate) const HOST_INTERNET_SIDE: &str = "192.0.2.1";
const HOST_CORPORATE_SIDE: &str = "10.20.0.1";
/// Two job subnets (/30 each): job addresses .2 and .6, gateways .1 and .5.
const POOL: &str = "10.255.0.0/29";
const HOST_PORT: u16 = 8000;

/// Whether this machine can build the world; prints the skip notice when not.
pub(crate) fn can_build(test: &str) -> bool {
    if !common::is_root() {
        common::skip(test, "root", "network namespaces need root");
        return false;
    }
    for bin in ["ip", "nft", "dnsmasq", "python3", "nsenter"] {
        if which::which(bin).is_err() {
            common::skip(
                test,
                "netns",
                &format!("{bin} is not installed (scripts/apt-packages/network.txt)"),
            );
            return false;
        }
    }
    true
}

pub(crate) fn sh(script: &str) -> String {
    let out = Command::new("sh").args(["-ec", script]).output().unwrap();
    assert!(out.status.success(), "{script}\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The test's namespaces and the servers in them; dropping it removes everything.
pub(crate) struct World {
    pub host: String,
    pub internet: String,
    corporate: String,
    pub tag: String,
    dir: tempfile::TempDir,
    servers: Vec<Child>,
}

impl World {
    pub(crate) fn build() -> World {
        let tag = uuid::Uuid::new_v4().simple().to_string()[..6].to_string();
        let (h, i, c) = (format!("nt{tag}h"), format!("nt{tag}i"), format!("nt{tag}c"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut w = World {
            host: h.clone(),
            internet: i.clone(),
            corporate: c.clone(),
            tag: tag.clone(),
            dir,
            servers: vec![],
        };
        sh(&format!(
            "ip netns add {h}; ip netns add {i}; ip netns add {c}
             ip link add hi{tag} netns {h} type veth peer name ih{tag} netns {i}
             ip link add hc{tag} netns {h} type veth peer name ch{tag} netns {c}
             for n in {h} {i} {c}; do ip -n $n link set lo up; done
             ip -n {h} addr add {HOST_INTERNET_SIDE}/24 dev hi{tag}; ip -n {h} link set hi{tag} up
             ip -n {i} addr add 192.0.2.254/24 dev ih{tag}; ip -n {i} link set ih{tag} up
             ip -n {h} route add default via 192.0.2.254
             ip -n {h} addr add {HOST_CORPORATE_SIDE}/24 dev hc{tag}; ip -n {h} link set hc{tag} up
             ip -n {c} addr add {CORPORATE}/24 dev ch{tag}; ip -n {c} link set ch{tag} up
             ip -n {c} route add default via {HOST_CORPORATE_SIDE}
             for a in {WEB} {DNS} {METADATA}; do ip -n {i} addr add $a/32 dev lo; done"
        ));
        let serve = |w: &mut World, ns: &str, name: &str, bind: &str, port: u16, file: &str, text: &str| {
            let d = w.dir.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(file), text).unwrap();
            let child = w
                .in_ns(ns, "python3")
                .args(["-m", "http.server", "--bind", bind, &port.to_string(), "--directory"])
                .arg(&d)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            w.servers.push(child);
        };
        serve(&mut w, &i, "web", WEB, 80, "hello.txt", "hello-from-the-internet\n");
        let big = w.dir.path().join("web/big.bin");
        std::fs::write(&big, vec![7u8; 64 << 20]).unwrap();
        serve(&mut w, &i, "metadata", METADATA, 80, "latest", "metadata-secret\n");
        serve(&mut w, &c, "corporate", CORPORATE, 80, "secret.txt", "corporate-secret\n");
        serve(&mut w, &h, "hostsvc", "0.0.0.0", HOST_PORT, "secret.txt", "host-secret\n");
        let dnsmasq = w
            .in_ns(&i, "dnsmasq")
            .args(["-k", "--no-resolv", "--no-hosts", "--bind-interfaces", "--port=53", "--pid-file"])
            .arg(format!("--listen-address={DNS}"))
            .arg(format!("--address=/web.test/{WEB}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        w.servers.push(dnsmasq);
        for (ns, probe) in [
            (&i, format!("curl -sf -m 1 -o /dev/null http://{WEB}/hello.txt")),
            (&i, format!("curl -sf -m 1 -o /dev/null http://{METADATA}/latest")),
            (&c, format!("curl -sf -m 1 -o /dev/null http://{CORPORATE}/secret.txt")),
            (&h, format!("curl -sf -m 1 -o /dev/null http://127.0.0.1:{HOST_PORT}/secret.txt")),
            (&i, format!("busybox nslookup web.test {DNS} | grep -q {WEB}")),
        ] {
            common::wait_until(&format!("{probe} in {ns}"), Duration::from_secs(20), || {
                w.in_ns(ns, "sh").args(["-c", &probe]).output().is_ok_and(|o| o.status.success())
            });
        }
        w
    }

    /// Puts a file on the internet namespace's web server.
    pub(crate) fn web_file(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.dir.path().join("web").join(name), bytes).unwrap();
    }

    /// A command run in namespace `ns` (only the network namespace changes: cgroups stay).
    pub(crate) fn in_ns(&self, ns: &str, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}")).arg(program);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs `f` on a thread inside the executor host's namespace: what it starts (the
    /// coordinator) and the sockets it opens (the test's requests) stay in the world.
    pub(crate) fn on_host<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = std::fs::File::open(format!("/run/netns/{}", self.host)).unwrap();
        std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap()
        })
    }

    /// What the executor host still has of jobs: host-side veths, namespaces, and (with
    /// `elements`) map elements.
    pub(crate) fn leftovers(&self, prefix: &str, elements: bool) -> Vec<String> {
        let mut left = Vec::new();
        let links = self.in_ns(&self.host, "ip").args(["-o", "link"]).output().unwrap();
        for l in String::from_utf8_lossy(&links.stdout).lines() {
            if l.contains(": exn") {
                left.push(format!("link {l}"));
            }
        }
        let nft = self.in_ns(&self.host, "nft").args(["list", "table", "inet", "executor"]).output().unwrap();
        let nft = String::from_utf8_lossy(&nft.stdout).into_owned();
        if elements && nft.contains(": jump policy_") {
            left.push(format!("nft {nft}"));
        }
        for e in std::fs::read_dir("/run/netns").unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with(prefix) {
                left.push(format!("netns {}", e.file_name().to_string_lossy()));
            }
        }
        left
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        for ns in [&self.host, &self.internet, &self.corporate] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A child killed if the test fails before it does.
pub(crate) struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes what the executor's jobs left in the world (sandboxes, cgroups, networks) when the
/// test ends, also when it fails half-way: an `executor janitor` pass in the executor host
/// namespace, then any namespace of the test's sandbox prefix. Declared after the `World` and
/// the state directory, so it runs before they go.
pub(crate) struct JobsGuard {
    pub host: String,
    pub exe: std::path::PathBuf,
    pub oci: String,
    pub state: std::path::PathBuf,
    pub prefix: String,
}

impl Drop for JobsGuard {
    fn drop(&mut self) {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.host)).arg(&self.exe);
        executor_env(
            &mut cmd,
            "http://127.0.0.1:9",
            "the-test-guard-needs-no-coordinator",
            &self.oci,
            &self.state,
            &self.prefix,
        );
        let _ = cmd.arg("janitor").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status();
        for e in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&self.prefix) {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
        }
    }
}

/// One job's probe script: each probe prints `REACHED name` or `BLOCKED name` (and exits 0),
/// bounded by short timeouts; the job also listens on 7000 for the other job's probe.
fn probe_script(coordinator_port: &str) -> String {
    format!(
        r#"p() {{ n=$1; shift; if "$@" >/tmp/o 2>&1 </dev/null; then echo "REACHED $n: $(head -c 120 /tmp/o)"; else echo "BLOCKED $n: $(head -c 120 /tmp/o)"; fi; }}
(timeout 25 nc -l -p 7000 </dev/null >/dev/null 2>&1 &)
me=$(ip -4 -o addr show dev eth0 | awk '{{print $4}}' | cut -d/ -f1)
echo "job address $me"; cat /etc/resolv.conf
p name timeout 5 wget -q -O - http://web.test/hello.txt
p address timeout 5 wget -q -O - http://{WEB}/hello.txt
if timeout 5 wget -S --post-data=upload -O /dev/null http://{HOST_INTERNET_SIDE}:{coordinator_port}/.executors/queue/batches/dequeue 2>&1 | grep -q 'HTTP/1'; then echo "REACHED coordinator"; else echo "BLOCKED coordinator"; fi
p corporate timeout 3 wget -q -O - http://{CORPORATE}/secret.txt
p metadata timeout 3 wget -q -O - http://{METADATA}/latest
p metadata-dns nslookup web.test {METADATA}
for a in {HOST_INTERNET_SIDE} {HOST_CORPORATE_SIDE} 10.255.0.1 10.255.0.5; do p host-$a timeout 3 wget -q -O - http://$a:{HOST_PORT}/secret.txt; done
p host-coordinator-other-address nc -w 3 {HOST_CORPORATE_SIDE} {coordinator_port}
p spoof-address ip addr add 10.255.0.99/32 dev eth0
sleep 6
for a in 10.255.0.2 10.255.0.6; do [ "$a" = "$me" ] || p other-job nc -w 3 $a 7000; done
echo probes-done
"#
    )
}

/// The destination classes of `scripts/probe-sandbox`'s network table: (class, probe, expected).
const CLASSES: &[(&str, &str, &str)] = &[
    ("internet by name (web.test)", "name", "reached"),
    ("internet by address (198.51.100.10)", "address", "reached"),
    ("coordinator (192.0.2.1, its port)", "coordinator", "reached"),
    ("corporate (10.20.0.10)", "corporate", "blocked"),
    ("metadata HTTP (169.254.169.254)", "metadata", "blocked"),
    ("metadata DNS (169.254.169.254:53)", "metadata-dns", "blocked"),
    ("host port, internet side (192.0.2.1:8000)", "host-192.0.2.1", "blocked"),
    ("host port, corporate side (10.20.0.1:8000)", "host-10.20.0.1", "blocked"),
    ("host port, a job gateway (10.255.0.1:8000)", "host-10.255.0.1", "blocked"),
    ("host port, the other gateway (10.255.0.5:8000)", "host-10.255.0.5", "blocked"),
    ("coordinator's port on another host address", "host-coordinator-other-address", "blocked"),
    ("other job (its listener)", "other-job", "blocked"),
];

/// One row per class from a job's log: class, what happened (and how), expected.
fn table_rows(log: &str) -> Vec<(String, String, String)> {
    CLASSES
        .iter()
        .map(|(class, probe, want)| {
            let got = log
                .lines()
                .find_map(|l| {
                    let l = l.strip_prefix("stdout: ").unwrap_or(l);
                    if let Some(r) = l.strip_prefix(&format!("REACHED {probe}")) {
                        (r.is_empty() || r.starts_with(':')).then(|| "reached".to_string())
                    } else if let Some(r) = l.strip_prefix(&format!("BLOCKED {probe}")) {
                        (r.is_empty() || r.starts_with(':')).then(|| {
                            // The error's last part: "Connection refused", "No route to host"...
                            let msg = r.trim_start_matches(':').trim();
                            let how: String =
                                msg.rsplit(": ").next().unwrap_or(msg).chars().take(40).collect();
                            if how.is_empty() {
                                "blocked".to_string()
                            } else {
                                format!("blocked ({how})")
                            }
                        })
                    } else {
                        None
                    }
                })
                .unwrap_or_else(|| "not probed".into());
            (class.to_string(), got, want.to_string())
        })
        .collect()
}

fn print_table(kind: &str, rows: &[(String, String, String)]) {
    println!("network table ({kind})");
    println!("{:<48} | {:<50} | expected", "destination class", "result");
    for (c, g, w) in rows {
        println!("{c:<48} | {g:<50} | {w}");
    }
    println!();
}

fn job_log(job: &serde_json::Value) -> String {
    job["logs"]
        .as_array()
        .map(|a| a.iter().map(|e| format!("[{}] {}\n", e["key"], e["out"].as_str().unwrap_or(""))).collect())
        .unwrap_or_default()
}

pub(crate) fn executor_env(
    cmd: &mut Command,
    url: &str,
    secret: &str,
    oci: &str,
    state: &std::path::Path,
    prefix: &str,
) {
    common::scrub(cmd);
    cmd.env("EXECUTOR_FRONTEND_URL", url)
        .env("EXECUTOR_FRONTEND_PASSWORD", secret)
        .env("EXECUTOR_QUEUE_NAME", "batches")
        .env("EXECUTOR_RUNTIME", if oci == "microvm" { "microvm" } else { "oci" })
        .env("EXECUTOR_OCI_RUNTIME", if oci == "microvm" { "runc" } else { oci })
        .env("EXECUTOR_VM_ALLOW_TCG", "1")
        .env("EXECUTOR_STATE_DIR", state)
        .env("EXECUTOR_VM_PREFIX", prefix)
        .env("EXECUTOR_NETWORK", "internet")
        .env("EXECUTOR_NETWORK_CIDR", POOL)
        .env("EXECUTOR_DNS_SERVERS", DNS)
        .env("EXECUTOR_JOB_MEMORY", "300M")
        .env("EXECUTOR_JOB_NUM_CPUS", "1")
        .env("EXECUTOR_MAXIMUM_RUNTIME_PER_JOB", "300s")
        .env("EXECUTOR_HEARTBEAT_INTERVAL", "300ms");
}

/// The microVM's extra probes: root in the guest may add any address, so the spoofed packet
/// is sent from inside (the internet namespace counts what arrives), and ICMP reaches the
/// internet.
const VM_PROBES: &str = r#"
p spoof-send ping -c 1 -W 2 -I 10.255.0.99 198.51.100.10
p own-ping ping -c 1 -W 3 198.51.100.10
"#;

/// Held by a networked microVM test for its whole run: those tests share the installed VM's
/// state directory (tests/it/microvm.rs), and with it the job network's slot files, while each
/// world has the same two slots.
pub(crate) static VM_NETWORK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The state directory and step image of a test's jobs: the installed microVM's, shared by
/// every test (tests/it/microvm.rs), or a fresh one under `tmp` with a busybox image.
pub(crate) fn job_state(vm: bool, tmp: &std::path::Path) -> (std::path::PathBuf, &'static str) {
    if vm {
        return (crate::microvm::state_dir(), crate::microvm::IMAGE);
    }
    let state = tmp.join("state");
    common::Exec::new().args(["image", "build-busybox"]).env("EXECUTOR_STATE_DIR", &state).run();
    (state, "busybox")
}

/// Whether `test` can build its world and run jobs on `rt` (an OCI runtime, or `microvm`);
/// otherwise it has said why it skips.
pub(crate) fn can_run_on(test: &str, rt: &str) -> bool {
    if !can_build(test) {
        return false;
    }
    if rt == "microvm" {
        if let Some(why) = crate::microvm::missing() {
            common::skip(test, "microvm", &why);
            return false;
        }
        return true;
    }
    crate::oci::can_run(test, rt)
}

fn jobs_reach_the_internet_and_nothing_else(oci: &str, test: &str) {
    let vm = oci == "microvm";
    if !can_run_on(test, oci) {
        return;
    }
    let _vm_network = vm.then(|| VM_NETWORK.lock().unwrap_or_else(|p| p.into_inner()));
    let started = Instant::now();
    let world = World::build();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let (state, image) = job_state(vm, tmp.path());
    if vm {
        // Counters in the internet namespace for the guest's own probes (VM_PROBES).
        let counter = "add table ip vmprobe; add chain ip vmprobe c { type filter hook input priority 0; }; \
                       add rule ip vmprobe c ip saddr 10.255.0.99 counter; \
                       add rule ip vmprobe c icmp type echo-request counter";
        assert!(world.in_ns(&world.internet, "nft").arg(counter).status().unwrap().success());
    }
    let prefix = format!("net{}{}", &oci[..2], world.tag);
    let exe = common::bin();
    let _guard = JobsGuard {
        host: world.host.clone(),
        exe: exe.clone(),
        oci: oci.to_string(),
        state: state.clone(),
        prefix: prefix.clone(),
    };
    world.on_host(|| {
        let c = crate::coordinator::Coordinator::start_listening(&format!("{HOST_INTERNET_SIDE}:0"));
        let port = c.url.rsplit(':').next().unwrap().trim_end_matches('/').to_string();
        let mut script = probe_script(&port);
        if vm {
            script = script.replace("echo probes-done", &format!("{VM_PROBES}echo probes-done"));
        }
        let ids: Vec<i64> = (0..2)
            .map(|_| {
                c.submit(serde_json::json!({"dockerSteps": [
                    {"key": "probe", "image": image, "dir": "", "env": [], "commands": [script]}
                ]}))
            })
            .collect();
        // Two jobs at once, so that each probes the other's sandbox while it runs.
        let mut cmd = world.in_ns(&world.host, exe.to_str().unwrap());
        executor_env(&mut cmd, &c.url, &c.secret, oci, &state, &prefix);
        cmd.env("EXECUTOR_MAXIMUM_NUM_JOBS", "2").env("EXECUTOR_NUM_TOTAL_JOBS", "2").arg("loop");
        if vm {
            // Booted cold here; the pool's VMs restored from a snapshot are probed below.
            cmd.env("EXECUTOR_VM_POOL_SIZE", "0");
        }
        common::assert_ok(&common::run(&mut cmd));
        let mut table = Vec::new();
        let check_jobs = |ids: Vec<i64>, table: &mut Vec<(String, String, String)>| -> Vec<String> {
            let mut logs = Vec::new();
            for id in ids {
                let job = c.wait_state(
                    id,
                    &["completed", "failed", "errored"],
                    Duration::from_secs(if vm { 300 } else { 60 }),
                );
                let log = job_log(&job);
                assert_eq!(job["state"], "completed", "{log}");
                assert!(log.contains("probes-done"), "{log}");
                let reached = ["name", "address", "coordinator"];
                assert!(log.contains(&format!("nameserver {DNS}")), "the job's resolv.conf:\n{log}");
                for r in reached {
                    assert!(log.contains(&format!("REACHED {r}")), "{oci}: {r} should be reached:\n{log}");
                }
                assert!(log.contains("hello-from-the-internet"), "{log}");
                let blocked = [
                    "corporate",
                    "metadata",
                    "metadata-dns",
                    &format!("host-{HOST_INTERNET_SIDE}"),
                    &format!("host-{HOST_CORPORATE_SIDE}"),
                    "host-10.255.0.1",
                    "host-10.255.0.5",
                    "host-coordinator-other-address",
                    // Root in a guest may add an address: what matters is that nothing leaves
                    // from it (spoof-send, counted below).
                    if vm { "spoof-send" } else { "spoof-address" },
                    "other-job",
                ];
                for b in blocked {
                    assert!(log.contains(&format!("BLOCKED {b}")), "{oci}: {b} should be blocked:\n{log}");
                    assert!(!log.contains(&format!("REACHED {b}")), "{oci}: {b} was reached:\n{log}");
                }
                for secret in ["corporate-secret", "metadata-secret", "host-secret"] {
                    assert!(!log.contains(secret), "{oci}: {secret} reached a job:\n{log}");
                }
                if vm {
                    assert!(log.contains("REACHED own-ping"), "{log}");
                }
                if table.is_empty() {
                    *table = table_rows(&log);
                }
                logs.push(log);
            }
            logs
        };
        check_jobs(ids, &mut table);
        if vm {
            // The pool's VMs (its default): restored from a template that booted with a network
            // device and no address; each restored VM gets its own address at restore. One job
            // at a time: the world's two slots are the running job's and the pool's next VM's.
            let out = tmp.path().join("pool-loop.log");
            let mut cmd = world.in_ns(&world.host, exe.to_str().unwrap());
            executor_env(&mut cmd, &c.url, &c.secret, oci, &state, &prefix);
            cmd.env("EXECUTOR_MAXIMUM_NUM_JOBS", "1")
                .env("EXECUTOR_NUM_TOTAL_JOBS", "2")
                .env("EXECUTOR_VM_POOL_SIZE", "1")
                .arg("loop")
                .stdout(std::fs::File::create(&out).unwrap())
                .stderr(std::fs::File::create(tmp.path().join("pool-loop.err")).unwrap());
            // The image set the pool boots with is the last job's, remembered in this file
            // across restarts: as on a host that ran this image before.
            let wanted = serde_json::json!({ "images": [image] }).to_string();
            std::fs::write(state.join("vm/pool-images.json"), wanted).unwrap();
            let mut lp = KillOnDrop(cmd.spawn().unwrap());
            let snapshots = state.join("vm/snapshots");
            let waited = Instant::now();
            let loop_err = || std::fs::read_to_string(tmp.path().join("pool-loop.err")).unwrap_or_default();
            while !std::fs::read_dir(&snapshots).into_iter().flatten().flatten().any(|e| {
                std::fs::read_to_string(e.path().join("meta.json"))
                    .is_ok_and(|m| m.contains("internet") && m.contains(image))
            }) {
                let exited = lp.0.try_wait().unwrap();
                assert!(
                    exited.is_none() && waited.elapsed() < Duration::from_secs(300),
                    "no networked snapshot after {:?} (loop: {exited:?}):\n{}",
                    waited.elapsed(),
                    loop_err()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            let ids: Vec<i64> = (0..2)
                .map(|_| {
                    c.submit(serde_json::json!({"dockerSteps": [
                        {"key": "probe", "image": image, "dir": "", "env": [], "commands": [script]}
                    ]}))
                })
                .collect();
            let logs = check_jobs(ids, &mut table);
            for log in &logs {
                let line = log.lines().find(|l| l.contains("from snapshot"));
                assert!(line.is_some_and(|l| l.contains("restored")), "a restored VM:\n{log}");
                eprintln!("networked pool VM: {}", line.unwrap_or_default());
            }
            let status = lp.0.wait().unwrap();
            assert!(status.success(), "the pool's loop: {status}\n{}", loop_err());
            table.push((
                "the same probes in 2 VMs restored from one snapshot".into(),
                "as above, each VM its address given at restore".into(),
                "as above".into(),
            ));
        }
        if vm {
            let out = world
                .in_ns(&world.internet, "nft")
                .args(["list", "chain", "ip", "vmprobe", "c"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let n = |what: &str| {
                text.lines()
                    .find(|l| l.contains(what))
                    .and_then(|l| l.split("packets ").nth(1))
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            assert_eq!(n("10.255.0.99"), 0, "a spoofed packet left a guest:\n{text}");
            assert!(n("echo-request") >= 2, "each guest's own ping arrives:\n{text}");
            table.push((
                "spoofed source (root in the guest adds one)".into(),
                "blocked (0 packets arrived; own address: arrived)".into(),
                "blocked".into(),
            ));
        }
        // The kernel removes a job's veth in the background once its namespace is gone; the
        // slot's map element stays until a janitor pass (docs/network.md).
        let gone = Instant::now();
        while !world.leftovers(&prefix, false).is_empty() && gone.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let left = world.leftovers(&prefix, false);
        assert!(left.is_empty(), "left after the jobs: {left:?}");
        let slots = std::fs::read_dir(state.join("network/slots")).map(|r| r.count()).unwrap_or(0);
        assert_eq!(slots, 0, "network slots left");

        // An executor killed mid-job leaves its network; `executor janitor` removes it.
        let id = c.submit(serde_json::json!({"dockerSteps": [
            {"key": "long", "image": image, "dir": "", "env": [], "commands": ["echo started", "sleep 300"]}
        ]}));
        let mut cmd = world.in_ns(&world.host, exe.to_str().unwrap());
        executor_env(&mut cmd, &c.url, &c.secret, oci, &state, &prefix);
        cmd.env("EXECUTOR_NUM_TOTAL_JOBS", "1").arg("loop").stdout(Stdio::null()).stderr(Stdio::null());
        let mut lp = KillOnDrop(cmd.spawn().unwrap());
        common::wait_until("the long step to start", Duration::from_secs(if vm { 240 } else { 60 }), || {
            c.job(id)["logs"].as_array().is_some_and(|l| {
                l.iter().any(|e| {
                    e["key"] == "step.docker.long" && e["out"].as_str().unwrap_or("").contains("started")
                })
            })
        });
        if !vm {
            // Anti-spoofing, past the container's missing capabilities: root in the job's namespace
            // adds an address the job does not own and sends UDP from both; the internet
            // namespace counts what arrives (a reply would not tell: an unrouted source loses it).
            let job_ns = std::fs::read_dir("/run/netns")
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .find(|n| n.starts_with(&prefix))
                .expect("the long job's network namespace");
            let counter = "add table ip probe; add chain ip probe c { type filter hook input priority 0; }; \
                           add rule ip probe c udp dport 9999 ip saddr 10.255.0.99 counter; \
                           add rule ip probe c udp dport 9998 counter";
            assert!(world.in_ns(&world.internet, "nft").arg(counter).status().unwrap().success());
            let send = |src: &str, port: u16| {
                let py = "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
                          s.bind((sys.argv[1], 0)); s.sendto(b'x', (sys.argv[2], int(sys.argv[3])))";
                let out = world
                    .in_ns(&job_ns, "python3")
                    .args(["-c", py, src, WEB, &port.to_string()])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{out:?}");
                std::thread::sleep(Duration::from_millis(300));
            };
            let counted = || {
                let out = world
                    .in_ns(&world.internet, "nft")
                    .args(["list", "chain", "ip", "probe", "c"])
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let n = |port: &str| {
                    text.lines()
                        .find(|l| l.contains(port))
                        .and_then(|l| l.split("packets ").nth(1))
                        .and_then(|r| r.split_whitespace().next())
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                (n("9999"), n("9998"))
            };
            // The job's address from its slot file (runsc's gVisor takes eth0's addresses and
            // routes out of the namespace's own stack: they are put back for the test's sends).
            let own = std::fs::read_dir(state.join("network/slots"))
                .unwrap()
                .flatten()
                .map(|e| std::fs::read_to_string(e.path()).unwrap())
                .find(|t| t.starts_with(&job_ns))
                .and_then(|t| t.lines().nth(1).map(str::to_string))
                .expect("the long job's slot");
            let gateway = std::net::Ipv4Addr::from(u32::from(own.parse::<std::net::Ipv4Addr>().unwrap()) - 1);
            sh(&format!(
                "ip -n {job_ns} addr add {own}/32 dev eth0 2>/dev/null || true
                 ip -n {job_ns} route replace default via {gateway} dev eth0 onlink"
            ));
            send(&own, 9998);
            sh(&format!("ip -n {job_ns} addr add 10.255.0.99/32 dev eth0"));
            send("10.255.0.99", 9999);
            assert_eq!(counted(), (0, 1), "from its own address one packet arrives, from a spoofed one none");
            table.push((
                "spoofed source (root of the namespace adds one)".into(),
                "blocked (0 packets arrived; own address: 1)".into(),
                "blocked".into(),
            ));
        }
        lp.0.kill().unwrap();
        lp.0.wait().unwrap();
        let left = world.leftovers(&prefix, false);
        // The killed executor's job network: the namespace (oci), or the TAP its QEMU holds.
        let kind = if vm { "link" } else { "netns" };
        assert!(left.iter().any(|l| l.starts_with(kind)), "the killed executor's job network: {left:?}");
        let mut cmd = world.in_ns(&world.host, exe.to_str().unwrap());
        executor_env(&mut cmd, &c.url, &c.secret, oci, &state, &prefix);
        let out = common::run(cmd.arg("janitor"));
        common::assert_ok(&out);
        let left = world.leftovers(&prefix, true);
        assert!(left.is_empty(), "left after the janitor: {left:?}");
        table.push((
            "left behind after the jobs and a janitor pass".into(),
            "nothing".into(),
            "nothing".into(),
        ));
        print_table(oci, &table);
    });
    assert!(started.elapsed() < Duration::from_secs(if vm { 900 } else { 300 }), "bounded duration");
}

#[test]
fn network_runc_jobs_reach_the_internet_and_nothing_else() {
    jobs_reach_the_internet_and_nothing_else("runc", "network_runc_jobs_reach_the_internet_and_nothing_else");
}

#[test]
fn network_crun_jobs_reach_the_internet_and_nothing_else() {
    jobs_reach_the_internet_and_nothing_else("crun", "network_crun_jobs_reach_the_internet_and_nothing_else");
}

#[test]
fn network_runsc_jobs_reach_the_internet_and_nothing_else() {
    jobs_reach_the_internet_and_nothing_else(
        "runsc",
        "network_runsc_jobs_reach_the_internet_and_nothing_else",
    );
}

#[test]
fn network_microvm_jobs_reach_the_internet_and_nothing_else() {
    jobs_reach_the_internet_and_nothing_else(
        "microvm",
        "network_microvm_jobs_reach_the_internet_and_nothing_else",
    );
}

/// `EXECUTOR_NETWORK_BANDWIDTH=8mbit/4mbit`: a job's 4 MiB download and 2 MiB upload (an HTTP
/// POST answered once the whole body arrived) each take at least 3 s (capped they need about
/// 4 s; uncapped, well under a second). Only
/// the cap's side is asserted: a loaded machine makes a transfer slower, never faster.
#[test]
fn network_bandwidth_caps_a_jobs_download_and_upload() {
    let test = "network_bandwidth_caps_a_jobs_download_and_upload";
    if !can_build(test) || !crate::oci::can_run(test, "runc") {
        return;
    }
    if which::which("tc").is_err() {
        return common::skip(
            test,
            "netns",
            "tc is not installed (iproute2, scripts/apt-packages/network.txt)",
        );
    }
    let world = World::build();
    world.web_file("cap.bin", &vec![1u8; 4 << 20]);
    // An HTTP sink that answers a POST once it has read the whole body.
    let py = "import http.server as h\n\
              class H(h.BaseHTTPRequestHandler):\n\
              \x20def do_POST(s):\n\
              \x20 n=int(s.headers['Content-Length'])\n\
              \x20 while n>0: n-=len(s.rfile.read(min(n,65536)) or b'x'*n)\n\
              \x20 s.send_response(200); s.end_headers(); s.wfile.write(b'ok')\n\
              h.HTTPServer(('198.51.100.10',9000),H).serve_forever()\n";
    let sink = world
        .in_ns(&world.internet, "python3")
        .args(["-c", py])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _sink = KillOnDrop(sink);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let state = tmp.path().join("state");
    common::Exec::new().args(["image", "build-busybox"]).env("EXECUTOR_STATE_DIR", &state).run();
    let prefix = format!("netbw{}", world.tag);
    let exe = common::bin();
    let _guard = JobsGuard {
        host: world.host.clone(),
        exe: exe.clone(),
        oci: "runc".into(),
        state: state.clone(),
        prefix: prefix.clone(),
    };
    world.on_host(|| {
        let c = crate::coordinator::Coordinator::start_listening(&format!("{HOST_INTERNET_SIDE}:0"));
        // Not zeros: busybox wget sends a --post-file as a C string.
        let script = format!(
            "s=$(date +%s); wget -q -O /dev/null http://{WEB}/cap.bin; e=$(date +%s); echo \"DOWN $((e-s))\"
             head -c 2097152 /dev/zero | tr '\\0' x > /tmp/up
             s=$(date +%s); wget -q -O /dev/null --post-file=/tmp/up http://{WEB}:9000/; r=$?; e=$(date +%s); echo \"UP $((e-s)) (wget: $r)\""
        );
        let id = c.submit(serde_json::json!({"dockerSteps": [
            {"key": "cap", "image": "busybox", "dir": "", "env": [], "commands": [script]}
        ]}));
        let mut cmd = world.in_ns(&world.host, exe.to_str().unwrap());
        executor_env(&mut cmd, &c.url, &c.secret, "runc", &state, &prefix);
        cmd.env("EXECUTOR_NETWORK_BANDWIDTH", "8mbit/4mbit").env("EXECUTOR_NUM_TOTAL_JOBS", "1").arg("loop");
        common::assert_ok(&common::run(&mut cmd));
        let job = c.wait_state(id, &["completed", "failed", "errored"], Duration::from_secs(60));
        let log = job_log(&job);
        assert_eq!(job["state"], "completed", "{log}");
        let secs = |what: &str| -> u64 {
            log.lines()
                .find_map(|l| l.strip_prefix(&format!("stdout: {what} ")))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("no {what} figure in the log:\n{log}"))
        };
        assert!(secs("DOWN") >= 3, "the 4 MiB download was not capped at 8 mbit:\n{log}");
        assert!(log.contains("(wget: 0)"), "the upload failed:\n{log}");
        assert!(secs("UP") >= 3, "the 2 MiB upload was not capped at 4 mbit:\n{log}");
    });
}

/// `docker run` parity: an image without any `/etc` (`FROM scratch`, distroless) still gets
/// the job network's `/etc/resolv.conf`, and so resolves names, as it would under Docker.
#[test]
fn network_an_image_without_etc_resolves_names() {
    let test = "network_an_image_without_etc_resolves_names";
    if !can_build(test) || !crate::oci::can_run(test, "runc") {
        return;
    }
    let world = World::build();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let state = tmp.path().join("state");
    crate::oci::import_scratch_image(&state, "scratch");
    let prefix = format!("netetc{}", world.tag);
    let exe = common::bin();
    let _guard = JobsGuard {
        host: world.host.clone(),
        exe: exe.clone(),
        oci: "runc".into(),
        state: state.clone(),
        prefix: prefix.clone(),
    };
    world.on_host(|| {
        let c = crate::coordinator::Coordinator::start_listening(&format!("{HOST_INTERNET_SIDE}:0"));
        // busybox's own resolver (its static glibc's getaddrinfo needs NSS modules the image
        // lacks: that is the binary's business, not the container's).
        let script = "cat /etc/resolv.conf; nslookup -type=a web.test && echo RESOLVED";
        let id = c.submit(serde_json::json!({"dockerSteps": [
            {"key": "dns", "image": "scratch", "dir": "", "env": [], "commands": [script]}
        ]}));
        let mut cmd = world.in_ns(&world.host, exe.to_str().unwrap());
        executor_env(&mut cmd, &c.url, &c.secret, "runc", &state, &prefix);
        cmd.env("EXECUTOR_NUM_TOTAL_JOBS", "1").arg("loop");
        common::assert_ok(&common::run(&mut cmd));
        let job = c.wait_state(id, &["completed", "failed", "errored"], Duration::from_secs(60));
        let log = job_log(&job);
        assert_eq!(job["state"], "completed", "{log}");
        assert!(log.contains(&format!("nameserver {DNS}")), "{log}");
        assert!(log.contains(&format!("Address: {WEB}")) && log.contains("RESOLVED"), "{log}");
    });
}

/// Outside the world above no job may have a network: the harness starts every executor with
/// `EXECUTOR_NETWORK=none`, every script that runs jobs exports it, and no other test module
/// asks for `internet`.
#[test]
fn network_every_other_job_launch_is_loopback_only() {
    let cmd = common::executor();
    let none =
        cmd.get_envs().any(|(k, v)| k == "EXECUTOR_NETWORK" && v == Some(std::ffi::OsStr::new("none")));
    assert!(none, "common::executor() must set EXECUTOR_NETWORK=none");
    for e in [common::Exec::new(), common::Exec::program("/bin/sh")] {
        assert_eq!(e.env_value("EXECUTOR_NETWORK").as_deref(), Some(std::ffi::OsStr::new("none")));
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut checked = 0;
    for e in std::fs::read_dir(root.join("scripts")).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // bench-network and bench-cache run their executor inside a world of namespaces they make.
        let worlds = ["install-deps", "build-deb", "bench-network", "bench-cache"];
        if e.path().is_dir() || worlds.contains(&name.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap();
        assert!(
            text.contains("export EXECUTOR_NETWORK=none"),
            "scripts/{name} runs jobs without EXECUTOR_NETWORK=none"
        );
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} scripts seen");
    for e in std::fs::read_dir(root.join("tests/it")).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if e.path().is_dir() {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap();
        if name != "network.rs" {
            assert!(
                !text.contains("\"internet\""),
                "tests/it/{name} asks for a job network outside a test world"
            );
        }
    }
}

/// A code-intel upload step posts to `SRC_ENDPOINT`, the instance's `executors.frontendURL`,
/// which need not be the coordinator's URL: a job whose step names one on a private address
/// reaches that address and port as it reaches the coordinator, and nothing else is newly
/// allowed (not the same host on another port, not the host, not the metadata address, not the
/// next job). A job whose `SRC_ENDPOINT` is loopback says in its log why its upload cannot work.
#[test]
fn network_an_upload_step_reaches_its_src_endpoint_and_nothing_else() {
    let test = "network_an_upload_step_reaches_its_src_endpoint_and_nothing_else";
    if !can_build(test) || !crate::oci::can_run(test, "runc") {
        return;
    }
    let world = World::build();
    // The same corporate host on a port the endpoint does not name.
    let other = world
        .in_ns(&world.corporate, "python3")
        .args(["-m", "http.server", "--bind", CORPORATE, "8081", "--directory"])
        .arg(world.dir.path().join("corporate"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _other = KillOnDrop(other);
    let probe = format!("curl -sf -m 1 -o /dev/null http://{CORPORATE}:8081/secret.txt");
    common::wait_until("the second corporate server", Duration::from_secs(20), || {
        world.in_ns(&world.corporate, "sh").args(["-c", &probe]).output().is_ok_and(|o| o.status.success())
    });
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let state = tmp.path().join("state");
    common::Exec::new().args(["image", "build-busybox"]).env("EXECUTOR_STATE_DIR", &state).run();
    let prefix = format!("netup{}", world.tag);
    let exe = common::bin();
    let _guard = JobsGuard {
        host: world.host.clone(),
        exe: exe.clone(),
        oci: "runc".into(),
        state: state.clone(),
        prefix: prefix.clone(),
    };
    let script = format!(
        "p() {{ if timeout 5 wget -q -O - \"$2\" >/dev/null 2>&1; then echo \"REACHED $1\"; else echo \"BLOCKED $1\"; fi; }}
         p endpoint \"$SRC_ENDPOINT/secret.txt\"
         p corporate http://{CORPORATE}/secret.txt
         p endpoint-other-port http://{CORPORATE}:8081/secret.txt
         p host http://{HOST_CORPORATE_SIDE}:{HOST_PORT}/secret.txt
         p metadata http://{METADATA}/latest
         p internet http://{WEB}/hello.txt"
    );
    world.on_host(|| {
        let c = crate::coordinator::Coordinator::start_listening(&format!("{HOST_INTERNET_SIDE}:0"));
        let step = |endpoint: &str| {
            serde_json::json!({"dockerSteps": [
                {"key": "indexer", "image": "busybox", "dir": "", "env": [], "commands": ["true"]},
                {"key": "upload", "image": "busybox", "dir": "", "commands": [script.clone()],
                 "env": [format!("SRC_ENDPOINT={endpoint}"), "SRC_HEADER_AUTHORIZATION=token-executor x"]}
            ]})
        };
        let upload = c.submit(step(&format!("http://{CORPORATE}")));
        let loopback = c.submit(step(&format!("http://127.0.0.1:{HOST_PORT}")));
        let mut cmd = world.in_ns(&world.host, exe.to_str().unwrap());
        executor_env(&mut cmd, &c.url, &c.secret, "runc", &state, &prefix);
        cmd.env("EXECUTOR_NUM_TOTAL_JOBS", "2").env("EXECUTOR_MAXIMUM_NUM_JOBS", "1").arg("loop");
        common::assert_ok(&common::run(&mut cmd));
        let states = ["completed", "failed", "errored"];
        let up = job_log(&c.wait_state(upload, &states, Duration::from_secs(60)));
        let lo = job_log(&c.wait_state(loopback, &states, Duration::from_secs(60)));
        eprintln!("upload job:\n{up}\nloopback job:\n{lo}");
        for (log, want) in [
            (&up, "REACHED endpoint"),
            (&up, "BLOCKED endpoint-other-port"),
            (&up, "BLOCKED host"),
            (&up, "BLOCKED metadata"),
            (&up, "REACHED internet"),
            (&up, "REACHED corporate"),
            (&lo, "BLOCKED endpoint"),
            (&lo, "BLOCKED corporate"),
            (&lo, "BLOCKED endpoint-other-port"),
            (&lo, "REACHED internet"),
        ] {
            assert!(log.contains(&format!("stdout: {want}\n")), "{want}:\n{log}");
        }
        assert!(
            lo.contains(&format!(
                "step.docker.upload uploads to SRC_ENDPOINT=http://127.0.0.1:{HOST_PORT}, which resolves only to \
                 loopback"
            )),
            "{lo}"
        );
        assert!(!up.contains("cannot"), "no warning for a reachable endpoint:\n{up}");
    });
}

/// A failed job's sandbox kept for `executor debug` (`EXECUTOR_KEEP_FAILED`) loses its network
/// when it is kept: the job reached the internet, the debug shell does not, and the host has no
/// link or namespace of it left while it is kept.
fn a_kept_sandbox_has_no_network(rt: &str, test: &str) {
    let vm = rt == "microvm";
    if !can_run_on(test, rt) {
        return;
    }
    let _vm_network = vm.then(|| VM_NETWORK.lock().unwrap_or_else(|p| p.into_inner()));
    let world = World::build();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let (state, image) = job_state(vm, tmp.path());
    let prefix = format!("kn{}{}", &rt[..2], world.tag);
    let exe = common::bin();
    let _guard = JobsGuard {
        host: world.host.clone(),
        exe: exe.clone(),
        oci: rt.to_string(),
        state: state.clone(),
        prefix: prefix.clone(),
    };
    world.on_host(|| {
        let c = crate::coordinator::Coordinator::start_listening(&format!("{HOST_INTERNET_SIDE}:0"));
        let probe = format!(
            "if timeout 5 wget -q -O - http://{WEB}/hello.txt >/dev/null 2>&1; then echo REACHED; else echo BLOCKED; fi"
        );
        let id = c.submit(serde_json::json!({"dockerSteps": [{"key": "fail", "image": image, "dir": "",
            "env": [], "commands": [format!("{probe}; echo left > /data/out.txt; exit 3")]}]}));
        let mut cmd = world.in_ns(&world.host, exe.to_str().unwrap());
        executor_env(&mut cmd, &c.url, &c.secret, rt, &state, &prefix);
        let log = tmp.path().join("executor.log");
        cmd.env("EXECUTOR_KEEP_FAILED", "10m")
            .env("EXECUTOR_VM_POOL_SIZE", "0")
            .arg("run")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut lp = KillOnDrop(cmd.spawn().unwrap());
        let job = c.wait_state(id, &["completed", "failed", "errored"], Duration::from_secs(300));
        let out = job_log(&job);
        assert_eq!(job["state"], "failed", "{out}");
        assert!(out.contains("REACHED"), "the job had the internet: {out}");
        let kept = state.join("kept").join(format!("{id}.json"));
        assert!(
            common::poll_until(Duration::from_secs(60), || kept.exists()),
            "not kept: {out}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        // (The free slot's map element stays until a janitor pass, as after any job.)
        let left = world.leftovers(&prefix, false);
        assert!(left.is_empty(), "a kept sandbox holds no network: {left:?}");
        let mut dbg = world.in_ns(&world.host, exe.to_str().unwrap());
        common::scrub(&mut dbg);
        let o = dbg
            .args(["debug", &id.to_string(), "--command", &format!("cat /data/out.txt; {probe}")])
            .env("EXECUTOR_STATE_DIR", &state)
            .env("EXECUTOR_FRONTEND_PASSWORD", &c.secret)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&o.stdout), "left\nBLOCKED\n", "{o:?}");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(lp.0.id() as i32), nix::sys::signal::SIGTERM)
            .unwrap();
        let (status, _) = common::wait_exit(&mut lp.0, Duration::from_secs(60));
        assert!(status.success(), "{}", std::fs::read_to_string(&log).unwrap_or_default());
        assert!(!kept.exists(), "released at shutdown");
    });
}

#[test]
fn network_a_kept_runc_sandbox_has_no_network() {
    a_kept_sandbox_has_no_network("runc", "network_a_kept_runc_sandbox_has_no_network");
}

#[test]
fn network_a_kept_microvm_has_no_network() {
    a_kept_sandbox_has_no_network("microvm", "network_a_kept_microvm_has_no_network");
}

/// A process that defers the end of its teardowns (`executor loop`) frees a job's slot only
/// once the host has forgotten the job's flows. In a pool of one slot: the network set up right
/// after a teardown gets the same address (its setup waits for the pending cleanup rather than
/// calling the pool full) and none of the old job's flows; and at the moment a torn-down
/// network's slot file goes, the host tracks none of its flows. Checked: with the slot freed
/// when the teardown returns and the flows forgotten on a thread, the job's TCP connection
/// (TIME_WAIT for two minutes) and UDP packet are still tracked when the slot is free.
#[test]
fn network_a_deferred_teardown_frees_its_slot_only_once_its_flows_are_gone() {
    let test = "network_a_deferred_teardown_frees_its_slot_only_once_its_flows_are_gone";
    if !can_build(test) {
        return;
    }
    let (world, _tmp, state, prefix, _namespaces) = host_world("ntdf");
    world.on_host(|| {
        use executor::network::{defer_cleanup, setup, teardown, JobNetwork, Settings};
        // The host's table as this thread (in the executor host's namespace) sees it, at once.
        let flows_of = |addr: std::net::Ipv4Addr| -> Vec<String> {
            let ct = std::fs::read_to_string("/proc/thread-self/net/nf_conntrack").unwrap();
            ct.lines().filter(|l| l.contains(&format!("={addr} "))).map(str::to_string).collect()
        };
        // A job's flows: an HTTP fetch from the internet namespace and a UDP packet.
        let make_flows = |net: &JobNetwork| {
            let ns = std::fs::File::open(net.netns_path()).unwrap();
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                let web = format!("{WEB}:80").parse().unwrap();
                let mut c = std::net::TcpStream::connect_timeout(&web, Duration::from_secs(5)).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                c.write_all(b"GET /hello.txt HTTP/1.0\r\n\r\n").unwrap();
                let mut body = String::new();
                let _ = c.read_to_string(&mut body);
                assert!(body.contains("hello-from-the-internet"), "{body}");
                std::net::UdpSocket::bind("0.0.0.0:0").unwrap().send_to(b"x", format!("{WEB}:9")).unwrap();
            })
            .join()
            .unwrap();
            let flows = flows_of(net.address);
            assert!(flows.len() >= 2, "the job's flows are not tracked: {flows:?}");
        };
        // One /30: one slot, so the next network can only have the same address.
        let s = Settings::parse(Some("internet"), Some("10.255.0.0/30"), None, Some(DNS)).unwrap();
        let slot = state.join("network/slots/0");
        let guard = defer_cleanup(&state);
        let a = setup(&state, &format!("{prefix}-a"), &s, Default::default()).unwrap();
        make_flows(&a);
        teardown(&state, &a).unwrap();
        let b = setup(&state, &format!("{prefix}-b"), &s, Default::default())
            .expect("the next network of a pool of one slot, once the old job's flows are forgotten");
        assert_eq!(b.address, a.address);
        let left = flows_of(b.address);
        assert!(left.is_empty(), "the slot's next job inherits the old job's flows: {left:?}");
        make_flows(&b);
        teardown(&state, &b).unwrap();
        // The moment the slot is free, the flows are gone.
        let t = Instant::now();
        while slot.exists() {
            assert!(t.elapsed() < Duration::from_secs(10), "the slot was never freed");
            std::hint::spin_loop();
        }
        let left = flows_of(b.address);
        assert!(left.is_empty(), "the slot was free with the job's flows still tracked: {left:?}");
        // Dropping the guard waits for what is queued: then no slot is taken.
        drop(guard);
        let slots: Vec<_> = std::fs::read_dir(state.join("network/slots")).unwrap().flatten().collect();
        assert!(slots.is_empty(), "slots left after the cleanup: {slots:?}");
    });
}

/// The table as an executor from before the byte counts made it.
const TABLE_BEFORE_BYTES: &str = r#"table inet executor {
  map jobs { type ifname . ipv4_addr : verdict; }
  chain forward {
    type filter hook forward priority filter; policy accept;
    iifname . ip saddr vmap @jobs
    iifname "exn*" drop
    oifname "exn*" ct state established,related accept
    oifname "exn*" drop
  }
  chain input {
    type filter hook input priority filter; policy accept;
    iifname . ip saddr vmap @jobs
    iifname "exn*" drop
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr 10.255.0.0/29 oifname != "exn*" masquerade
  }
}"#;

/// A table of an executor from before the byte counts gets the rule that counts what allowlist
/// jobs receive, and its set, at the first job of a new policy chain: first in the forward
/// chain, and once, whatever chains come after.
#[test]
fn network_an_older_table_gets_the_received_bytes_rule_once() {
    let test = "network_an_older_table_gets_the_received_bytes_rule_once";
    if !can_build(test) {
        return;
    }
    let (world, _tmp, state, prefix, _namespaces) = host_world("ntup");
    world.on_host(|| {
        use executor::network::{setup, teardown, Settings};
        // This thread's children are in the executor host's namespace, as is the executor's nft.
        sh(&format!(
            "nft delete table inet executor 2>/dev/null || true; nft -f - <<'EOF'\n{TABLE_BEFORE_BYTES}\nEOF"
        ));
        let forward = || sh("nft list chain inet executor forward");
        assert!(!forward().contains("egress_received"), "{}", forward());
        for (i, allow) in [None, Some("10.5.0.0/16")].into_iter().enumerate() {
            // Other settings each time: another policy chain, made at its first job.
            let s = Settings::parse(Some("internet"), Some(POOL), allow, Some(DNS)).unwrap();
            let net = setup(&state, &format!("{prefix}-{i}"), &s, Default::default()).unwrap();
            teardown(&state, &net).unwrap();
            let f = forward();
            assert_eq!(f.matches("update @egress_received").count(), 1, "{f}");
            let (rule, replies) =
                (f.find("@egress_received").unwrap(), f.find("ct state established").unwrap());
            assert!(rule < replies, "the count comes before the replies' accept:\n{f}");
        }
        let set = sh("nft list set inet executor egress_received");
        assert!(set.contains("flags dynamic,timeout") && set.contains("size 65536"), "{set}");
    });
}

/// A world for a test that makes job networks itself in its executor host namespace: the world,
/// a temporary directory (0711) holding the state directory, the sandbox prefix (`tag` and the
/// world's), and the guard of the job namespaces of that prefix.
fn host_world(tag: &str) -> (World, tempfile::TempDir, std::path::PathBuf, String, NetnsOfPrefix) {
    let world = World::build();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let state = tmp.path().join("state");
    let prefix = format!("{tag}{}", world.tag);
    let guard = NetnsOfPrefix(prefix.clone());
    (world, tmp, state, prefix, guard)
}

/// Removes the test's job namespaces (by the sandbox prefix) if it fails half-way.
struct NetnsOfPrefix(String);

impl Drop for NetnsOfPrefix {
    fn drop(&mut self) {
        for e in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&self.0) {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
        }
    }
}
