//! `EXECUTOR_NETWORK=allowlist` in the namespace world of `network.rs`: the *internet* gets a
//! second resolver (the executor's upstream, answers with a 1 s TTL) and more web hosts, and two
//! oci jobs run at once, one with the executor's list and one whose payload narrows it (and
//! tries to widen it). Each probe's verdict is checked in the job's output and again in the
//! job's egress record (`teardown.network.egress`).

use std::process::Stdio;
use std::time::Duration;

use crate::common;
use crate::network::{can_run_on, executor_env, sh, JobsGuard, KillOnDrop, World, WEB};

/// The executor's upstream resolver, in the *internet* namespace.
const UPSTREAM: &str = "198.51.100.54";
/// The outside resolver a job must not reach (the world's own).
const OUTSIDE_DNS: &str = "198.51.100.53";
const HOSTS: &str = "web.test,two.test,*.cdn.test,port.test:8080";
/// The size of the file job B downloads from web.test, whose bytes its record must show.
const DOWNLOAD: usize = 1 << 20;

const SERVERS: &str = r#"
import http.server, sys, threading, functools
h = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
for a in sys.argv[2:]:
    addr, port = a.split(":")
    s = http.server.ThreadingHTTPServer((addr, int(port)), h)
    threading.Thread(target=s.serve_forever, daemon=True).start()
threading.Event().wait()
"#;

/// Job A's probes; `lookups` questions in a row trip the resolver's rate (more in a VM, whose
/// emulated CPU asks more slowly).
fn script_a(lookups: u32) -> String {
    let long = "x".repeat(60);
    format!(
        r#"p() {{ n=$1; shift; if "$@" >/tmp/o 2>&1 </dev/null; then echo "REACHED $n: $(head -c 200 /tmp/o | tr '\n' ' ')"; else echo "BLOCKED $n: $(head -c 200 /tmp/o | tr '\n' ' ')"; fi; }}
cat /etc/resolv.conf
p address-first timeout 3 wget -q -O - http://{WEB}/hello.txt
p name timeout 5 wget -q -O - http://web.test/hello.txt
p second-a-lookup nslookup two.test
p second-a timeout 3 wget -q -O - http://198.51.100.11/hello.txt
p wildcard timeout 5 wget -q -O - http://a.cdn.test/hello.txt
p port-allowed timeout 5 wget -q -O - http://port.test:8080/hello.txt
p port-other timeout 3 wget -q -O - http://198.51.100.13/hello.txt
p refused-name nslookup evil.test
p refused-address timeout 3 wget -q -O - http://198.51.100.14/hello.txt
p outside-dns nslookup web.test {OUTSIDE_DNS}
p too-long nslookup {long}.cdn.test
sleep 4
p expired timeout 3 wget -q -O - http://198.51.100.11/hello.txt
i=0; while [ $i -lt {lookups} ]; do nslookup web.test >/dev/null 2>&1; i=$((i+1)); done
echo probes-done
"#
    )
}

const SCRIPT_B: &str = r#"p() { n=$1; shift; if "$@" >/tmp/o 2>&1 </dev/null; then echo "REACHED $n: $(head -c 200 /tmp/o | tr '\n' ' ')"; else echo "BLOCKED $n: $(head -c 200 /tmp/o | tr '\n' ' ')"; fi; }
p name timeout 5 wget -q -O - http://web.test/hello.txt
p download timeout 30 wget -q -O /dev/null http://web.test/bytes.bin
p widen nslookup evil.test
p narrowed nslookup two.test
echo probes-done
"#;

fn job_log(job: &serde_json::Value) -> String {
    job["logs"]
        .as_array()
        .map(|a| a.iter().map(|e| format!("[{}] {}\n", e["key"], e["out"].as_str().unwrap_or(""))).collect())
        .unwrap_or_default()
}

fn expect(log: &str, reached: &[&str], blocked: &[&str]) {
    for r in reached {
        assert!(log.contains(&format!("REACHED {r}:")), "{r} should be reached:\n{log}");
    }
    for b in blocked {
        assert!(log.contains(&format!("BLOCKED {b}:")), "{b} should be blocked:\n{log}");
    }
}

/// The job's egress record: the lines of its `teardown.network.egress` entry.
fn egress(log: &str) -> Vec<String> {
    let Some(start) = log.find("[\"teardown.network.egress\"] ") else { return vec![] };
    let rest = &log[start..];
    let end = rest[1..].find("\n[\"").map_or(rest.len(), |e| e + 1);
    rest[..end]
        .lines()
        .map(|l| l.split_once("stdout: ").map_or(l, |(_, r)| r))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

fn has(lines: &[String], want: &str, log: &str) {
    assert!(lines.iter().any(|l| l.contains(want)), "egress record lacks {want:?}:\n{log}");
}

#[test]
fn network_allowlist_jobs_reach_only_allowed_names() {
    allowlist_jobs("runc", "network_allowlist_jobs_reach_only_allowed_names");
}

#[test]
fn network_allowlist_crun_jobs_reach_only_allowed_names() {
    allowlist_jobs("crun", "network_allowlist_crun_jobs_reach_only_allowed_names");
}

/// gVisor's own network stack in the job's namespace: the same chain and resolver outside it.
#[test]
fn network_allowlist_runsc_jobs_reach_only_allowed_names() {
    allowlist_jobs("runsc", "network_allowlist_runsc_jobs_reach_only_allowed_names");
}

/// The same probes in microVMs: the guest's resolv.conf, the TAP's chain and the record.
#[test]
fn network_allowlist_microvm_jobs_reach_only_allowed_names() {
    allowlist_jobs("microvm", "network_allowlist_microvm_jobs_reach_only_allowed_names");
}

fn allowlist_jobs(rt: &str, test: &str) {
    let vm = rt == "microvm";
    if !can_run_on(test, rt) {
        return;
    }
    let _vm_network = vm.then(|| crate::network::VM_NETWORK.lock().unwrap_or_else(|p| p.into_inner()));
    let world = World::build();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
    let i = world.internet.clone();
    sh(&format!(
        "for a in {UPSTREAM} 198.51.100.11 198.51.100.12 198.51.100.13 198.51.100.14; do ip -n {i} addr add $a/32 dev lo; done"
    ));
    world.web_file("bytes.bin", &vec![b'x'; DOWNLOAD]);
    let web = tmp.path().join("web");
    std::fs::create_dir_all(&web).unwrap();
    std::fs::write(web.join("hello.txt"), "hello-from-the-internet\n").unwrap();
    let hosts = tmp.path().join("hosts");
    std::fs::write(&hosts, format!("{WEB} web.test two.test\n198.51.100.11 two.test\n198.51.100.13 port.test\n198.51.100.14 evil.test\n")).unwrap();
    let _servers = KillOnDrop(
        world
            .in_ns(&i, "python3")
            .args(["-c", SERVERS])
            .arg(&web)
            .args([
                "198.51.100.11:80",
                "198.51.100.12:80",
                "198.51.100.13:80",
                "198.51.100.13:8080",
                "198.51.100.14:80",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let _dns = KillOnDrop(
        world
            .in_ns(&i, "dnsmasq")
            .args(["-k", "--no-resolv", "--no-hosts", "--bind-interfaces", "--port=53", "--local-ttl=1"])
            .arg("--pid-file")
            .arg(format!("--listen-address={UPSTREAM}"))
            .arg(format!("--addn-hosts={}", hosts.display()))
            .arg("--address=/cdn.test/198.51.100.12")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    common::wait_until("the upstream resolver and web hosts", Duration::from_secs(20), || {
        let probe = format!(
            "busybox nslookup two.test {UPSTREAM} | grep -q 198.51.100.11 && curl -sf -m 1 -o /dev/null http://198.51.100.13:8080/hello.txt"
        );
        world.in_ns(&i, "sh").args(["-c", &probe]).output().is_ok_and(|o| o.status.success())
    });
    let (state, image) = crate::network::job_state(vm, tmp.path());
    let prefix = format!("na{}{}", &rt[..2], world.tag);
    let exe = common::bin();
    let wait = Duration::from_secs(if vm { 300 } else { 60 });
    let _guard = JobsGuard {
        host: world.host.clone(),
        exe: exe.clone(),
        oci: rt.into(),
        state: state.clone(),
        prefix: prefix.clone(),
    };
    world.on_host(|| {
        let c = crate::coordinator::Coordinator::start_listening(&format!("{}:0", crate::network::HOST_INTERNET_SIDE));
        let step = |script: &str| serde_json::json!([{"key": "probe", "image": image, "dir": "", "env": [], "commands": [script]}]);
        let a = c.submit(serde_json::json!({"dockerSteps": step(&script_a(if vm { 150 } else { 40 }))}));
        let b = c.submit(serde_json::json!({
            "dockerSteps": step(SCRIPT_B),
            "networkAllowHosts": ["web.test", "evil.test"],
        }));
        let allowlist = |cmd: &mut std::process::Command| {
            executor_env(cmd, &c.url, &c.secret, rt, &state, &prefix);
            cmd.env("EXECUTOR_NETWORK", "allowlist")
                .env("EXECUTOR_NETWORK_ALLOW_HOSTS", HOSTS)
                .env("EXECUTOR_DNS_SERVERS", UPSTREAM);
        };
        let mut cmd = world.in_ns(&world.host, exe.to_str().unwrap());
        allowlist(&mut cmd);
        let v = common::run(cmd.arg("validate"));
        let text = format!("{}{}", String::from_utf8_lossy(&v.stdout), String::from_utf8_lossy(&v.stderr));
        assert!(v.status.success(), "{text}");
        assert!(text.contains(&format!("network allowlist: {}", HOSTS.replace(',', ", "))), "{text}");
        assert!(text.contains("nftables sets with timeouts, dynamic sets and fib work"), "{text}");
        let mut cmd = world.in_ns(&world.host, exe.to_str().unwrap());
        allowlist(&mut cmd);
        cmd.env("EXECUTOR_NETWORK", "allowlist")
            .env("EXECUTOR_NETWORK_ALLOW_HOSTS", HOSTS)
            .env("EXECUTOR_DNS_SERVERS", UPSTREAM)
            .env("EXECUTOR_NETWORK_DNS_GRACE", "1s")
            .env("EXECUTOR_NETWORK_DNS_RATE", "20")
            .env("EXECUTOR_NETWORK_DNS_MAX_NAME", "40")
            .env("EXECUTOR_MAXIMUM_NUM_JOBS", "2")
            .env("EXECUTOR_NUM_TOTAL_JOBS", "2")
            // The world has two job slots, both for these jobs: no pool VM holds one.
            .env("EXECUTOR_VM_POOL_SIZE", "0")
            .arg("loop");
        common::assert_ok(&common::run(&mut cmd));

        let job = c.wait_state(a, &["completed", "failed", "errored"], wait);
        let log = job_log(&job);
        assert_eq!(job["state"], "completed", "{log}");
        assert!(log.contains("probes-done"), "{log}");
        assert!(log.contains("nameserver 10.255.0."), "the job asks its own resolver:\n{log}");
        expect(
            &log,
            &["name", "second-a-lookup", "second-a", "wildcard", "port-allowed"],
            &["address-first", "port-other", "refused-name", "refused-address", "outside-dns", "too-long", "expired"],
        );
        assert!(log.contains("NXDOMAIN"), "a refused name gets NXDOMAIN:\n{log}");
        let rec = egress(&log);
        has(&rec, "dns too-long: 2", &log); // its A and AAAA questions
        has(&rec, "dns rate-limited:", &log);
        has(&rec, "allowed A web.test 198.51.100.10", &log);
        assert!(
            rec.iter().any(|l| l.starts_with("allowed A two.test") && l.contains("198.51.100.11") && l.contains(WEB)),
            "both A records of two.test:\n{log}"
        );
        has(&rec, "refused A evil.test", &log);
        has(&rec, "accepted tcp 198.51.100.10:80 web.test", &log);
        has(&rec, "accepted tcp 198.51.100.12:80 a.cdn.test", &log);
        has(&rec, "accepted tcp 198.51.100.13:8080 port.test", &log);
        has(&rec, "refused tcp 198.51.100.13:80 port.test", &log);
        has(&rec, "refused tcp 198.51.100.14:80 -", &log);
        has(&rec, &format!("refused udp {OUTSIDE_DNS}:53 -"), &log);

        let job = c.wait_state(b, &["completed", "failed", "errored"], wait);
        let log = job_log(&job);
        assert_eq!(job["state"], "completed", "{log}");
        expect(&log, &["name", "download"], &["widen", "narrowed"]);
        assert!(log.contains("left out evil.test (not within"), "a job cannot widen the list:\n{log}");
        let rec = egress(&log);
        has(&rec, "refused A two.test", &log);
        // The bytes of its two flows to web.test: the download's whole body (and more, the
        // headers) came in; the requests went out (at least the two SYNs and a request line).
        let row = rec.iter().find(|l| l.starts_with("accepted tcp 198.51.100.10:80 web.test ")).unwrap_or_else(|| panic!("no row:\n{log}"));
        let n: Vec<u64> = row.split(' ').skip(4).map(|w| w.parse().unwrap_or_else(|_| panic!("{row}"))).collect();
        let (sent, received) = (n[0], n[1]);
        eprintln!("job B's record of web.test, a {DOWNLOAD}-byte download and a small one: {row}");
        assert!((DOWNLOAD as u64..2 * DOWNLOAD as u64).contains(&received), "received {received}: {row}\n{log}");
        assert!((150..DOWNLOAD as u64 / 4).contains(&sent), "sent {sent}: {row}\n{log}");
        has(&rec, &format!("{sent} bytes sent, {received} received"), &log);

        // Nothing of the jobs is left: no resolver, none of their set elements.
        let procs = sh("ps -eo args");
        let state_text = state.to_string_lossy();
        let left = procs.lines().any(|l| l.contains("network-resolver") && l.contains(&*state_text));
        assert!(!left, "a resolver is left:\n{procs}");
        for set in ["egress_hosts", "egress_ports", "egress_seen", "egress_refused", "egress_received"] {
            let out = world.in_ns(&world.host, "nft").args(["list", "set", "inet", "executor", set]).output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(out.status.success() && !text.contains("10.255.0."), "set {set} keeps job elements:\n{text}");
        }
    });
}
