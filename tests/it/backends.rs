//! One walk through the coordinator's features, run against SQLite and against PostgreSQL (a
//! throwaway cluster this test starts): every admin API route, every `executor queue`
//! subcommand and every console page, with filters, paging, cancel, requeue, artifacts, files,
//! repositories, executors, sessions, metrics and the autoscaling gauges (fair turns across
//! tenants, a queue without executors); a job with a 20 MB log shown by `queue show`
//! (text and JSON); a retried markComplete; and a replica that starts while its database is
//! down, answers 503, and recovers.

use crate::common;
use crate::coordinator::{Coordinator, ExecutorClient};
use serde_json::{json, Value};
use std::io::Read;
use std::process::Output;
use std::time::Duration;
use testkit::cluster::Cluster;

/// A log bigger than what `into_string` reads (10 MB), under the cap the walk serves with.
const BIG_LOG: usize = 20 << 20;
const SERVE_ARGS: &[&str] = &["--log-cap-bytes", "33554432"];

fn cli(c: &Coordinator, args: &[&str]) -> Output {
    let mut cmd = common::executor();
    c.admin_env(&mut cmd);
    cmd.arg("queue").args(args);
    common::run(&mut cmd)
}

/// `queue ARGS` that must succeed; its stdout.
#[track_caller]
fn ok(c: &Coordinator, args: &[&str]) -> String {
    let out = cli(c, args);
    assert!(out.status.success(), "queue {args:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn ok_json(c: &Coordinator, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    serde_json::from_str(&ok(c, &args)).unwrap()
}

fn ids(v: &Value) -> Vec<i64> {
    v["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_i64().unwrap()).collect()
}

fn tarball(name: &str, data: &[u8]) -> Vec<u8> {
    let mut ar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    ar.append_data(&mut h, name, data).unwrap();
    ar.into_inner().unwrap().finish().unwrap()
}

fn entry(ex: &ExecutorClient, id: i64, out: &str) -> Value {
    json!({"executorName": ex.name, "jobId": id, "key": "step.docker.0", "command": ["sh", "-c", "x"],
           "startTime": "2024-01-02T03:04:05Z", "out": out})
}

/// GET `path` with a console session; (status, body).
fn page(c: &Coordinator, cookie: &str, path: &str) -> (u16, String) {
    let agent = ureq::AgentBuilder::new().redirects(0).build();
    match agent.get(&format!("{}{path}", c.url)).set("Cookie", cookie).call() {
        Ok(r) => {
            let (status, mut body) = (r.status(), Vec::new());
            // A job's page holds its whole log: more than `into_string` reads; artifacts are
            // bytes.
            r.into_reader().read_to_end(&mut body).unwrap();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("GET {path}: {e}"),
    }
}

fn walk(c: &Coordinator) {
    let dir = tempfile::tempdir().unwrap();
    let job_file = dir.path().join("job.json");
    std::fs::write(&job_file, Coordinator::simple_job().to_string()).unwrap();
    let file = job_file.to_str().unwrap();
    let submit = |queue: &str| -> i64 { ok(c, &["submit", "--queue", queue, file]).trim().parse().unwrap() };
    let (a, b, d) = (submit("batches"), submit("codeintel"), submit("batches"));
    let e = submit("batches");

    // Filters and paging, text and JSON.
    assert_eq!(ids(&ok_json(c, &["jobs"])), vec![e, d, b, a]);
    assert_eq!(ids(&ok_json(c, &["jobs", "--limit", "2"])), vec![e, d]);
    assert_eq!(ids(&ok_json(c, &["jobs", "--queue", "codeintel"])), vec![b]);
    assert_eq!(ids(&ok_json(c, &["jobs", "--state", "queued", "--queue", "batches"])), vec![e, d, a]);
    assert_eq!(ids(&ok_json(c, &["jobs", "--state", "completed"])), Vec::<i64>::new());
    assert!(ok(c, &["jobs", "--queue", "codeintel"]).contains("codeintel  queued"));
    let bad = cli(c, &["jobs", "--state", "done"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("400"), "{bad:?}");

    // An executor: a 20 MB log, artifacts, completion (and its retry), a failure.
    let ex = c.executor("walker-1");
    ex.heartbeat("batches", &[]);
    let ja = ex.dequeue("batches", "").expect("job a");
    assert_eq!(ja["id"], a);
    let big: String = "0123456789abcdef\n".repeat(BIG_LOG / 17 + 1);
    let (code, body) = ex.job_call("batches", &ja, "addExecutionLogEntry", entry(&ex, a, &big));
    assert_eq!(code, 200, "{body}");
    assert_eq!(ex.put_artifacts("batches", &ja, &tarball("out.txt", b"artifact of a")), 204);
    assert_eq!(ex.mark("batches", &ja, "markComplete", ""), 204);
    // Its answer lost: the retry succeeds; the spent token opens nothing else.
    assert_eq!(ex.mark("batches", &ja, "markComplete", ""), 204);
    assert_eq!(c.job(a)["state"], "completed");
    let (code, _) = ex.job_call("batches", &ja, "addExecutionLogEntry", entry(&ex, a, "late"));
    assert_eq!(code, 401);
    assert_eq!(ex.mark("batches", &ja, "markFailed", "late"), 401);
    let jd = ex.dequeue("batches", "").expect("job d");
    assert_eq!(jd["id"], d);
    assert_eq!(ex.mark("batches", &jd, "markFailed", "it broke"), 204);

    // Cancel: a queued job at once; a finished one refused.
    assert_eq!(ok_json(c, &["cancel", &e.to_string()])["state"], "canceled");
    assert!(String::from_utf8_lossy(&cli(c, &["cancel", &a.to_string()]).stderr).contains("409"));
    for (state, want) in
        [("completed", vec![a]), ("failed", vec![d]), ("canceled", vec![e]), ("queued", vec![b])]
    {
        assert_eq!(ids(&ok_json(c, &["jobs", "--state", state])), want, "--state {state}");
    }

    // The big job: text (the log streamed) and JSON.
    let text = ok(c, &["show", &a.to_string()]);
    assert!(text.contains("state           completed"), "{}", &text[..400.min(text.len())]);
    assert!(text.contains("==> [0] step.docker.0") || text.contains("==> [1] step.docker.0"));
    assert!(text.len() > BIG_LOG, "{} bytes", text.len());
    let v = ok_json(c, &["show", &a.to_string()]);
    assert_eq!(v["logs"][0]["out"].as_str().unwrap().len(), big.len());
    assert!(v["artifacts"]["bytes"].as_i64().is_some(), "{}", v["artifacts"]);
    assert!(ok(c, &["logs", &a.to_string()]).len() > BIG_LOG);
    let (code, fields) = c.request("GET", &format!("/api/jobs/{a}?logs=false"), Some(&c.admin_auth()), None);
    assert_eq!(code, 200);
    assert!(fields.len() < 10_000 && !fields.contains("\"logs\""), "{fields}");
    let out = dir.path().join("a.tar.gz");
    ok(c, &["artifacts", &a.to_string(), "-o", out.to_str().unwrap()]);
    let mut names = Vec::new();
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(std::fs::File::open(&out).unwrap()));
    for f in ar.entries().unwrap() {
        let mut f = f.unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        names.push((f.path().unwrap().display().to_string(), s));
    }
    assert_eq!(names, vec![("out.txt".to_string(), "artifact of a".to_string())]);

    // Executors, repositories, files.
    let execs = ok_json(c, &["executors"]);
    assert_eq!(execs["executors"][0]["hostname"], "walker-1", "{execs}");
    assert!(ok(c, &["executors"]).contains("walker-1"));
    let repo = dir.path().join("repo");
    common::sh(
        dir.path(),
        "git init -q repo && git -C repo -c user.email=t@t -c user.name=t commit -q --allow-empty -m x",
    );
    ok(c, &["repo", "add", "walk-repo", repo.to_str().unwrap()]);
    assert_eq!(ok_json(c, &["repo", "ls"])["repos"][0]["name"], "walk-repo");
    ok(c, &["repo", "rm", "walk-repo"]);
    assert_eq!(ok_json(c, &["repo", "ls"])["repos"], json!([]));
    let blob = dir.path().join("blob");
    std::fs::write(&blob, b"file contents").unwrap();
    assert_eq!(ok_json(c, &["files", "put", "bkt", "dir/key.txt", blob.to_str().unwrap()])["size"], 13);
    let files = ok_json(c, &["files", "ls"]);
    assert_eq!(
        (&files["files"][0]["bucket"], &files["files"][0]["key"]),
        (&json!("bkt"), &json!("dir/key.txt"))
    );
    assert!(ok(c, &["files", "ls"]).contains("dir/key.txt"));

    // Metrics count what happened.
    let (code, metrics) = c.request("GET", "/metrics", Some(&c.admin_auth()), None);
    assert_eq!(code, 200, "{metrics}");
    assert!(metrics.lines().any(|l| l.contains("completed") && l.ends_with(" 1")), "{metrics}");
    fleet_signals(c, &ex);

    // The console: a session, every page, a requeue from the job's page.
    let agent = ureq::AgentBuilder::new().redirects(0).build();
    let signed_in = agent
        .post(&format!("{}/admin/sign-in", c.url))
        .send_form(&[("token", c.admin_token.as_str())])
        .unwrap();
    assert_eq!(signed_in.status(), 303);
    let cookie = signed_in.header("set-cookie").unwrap().split(';').next().unwrap().to_string();
    assert_eq!(page(c, &cookie, "/admin/").0, 303, "the home page leads to the jobs");
    for path in [
        "/admin/jobs".to_string(),
        "/admin/jobs?state=completed".into(),
        "/admin/jobs?queue=codeintel".into(),
        format!("/admin/jobs/{a}"),
        format!("/admin/jobs/{d}"),
        "/admin/executors".into(),
        "/admin/repos".into(),
        "/admin/files".into(),
    ] {
        let (code, body) = page(c, &cookie, &path);
        assert_eq!(code, 200, "{path}: {body}");
    }
    let (_, jobs_page) = page(c, &cookie, "/admin/jobs?state=failed");
    assert!(
        jobs_page.contains(&format!("/admin/jobs/{d}")) && !jobs_page.contains(&format!("/admin/jobs/{a}\""))
    );
    let (_, job_page) = page(c, &cookie, &format!("/admin/jobs/{d}"));
    let at = job_page.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    let csrf = &job_page[at..at + job_page[at..].find('"').unwrap()];
    let r = agent
        .post(&format!("{}/admin/jobs/{d}/requeue", c.url))
        .set("Cookie", &cookie)
        .set("Content-Type", "application/x-www-form-urlencoded")
        .send_string(&format!("csrf={csrf}"));
    let status = match r {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("requeue: {e}"),
    };
    assert_eq!(status, 303);
    assert_eq!(c.job(d)["state"], "queued");
    let (code, _) = page(c, &cookie, &format!("/admin/jobs/{a}/artifacts"));
    assert_eq!(code, 200);
}

/// The autoscaling gauges (`/api/queues` with the read-only metrics token, `/metrics`) follow
/// submits and dequeues; codeintel, which no executor serves, keeps its job queued; within a
/// queue the tenants take turns.
fn fleet_signals(c: &Coordinator, ex: &ExecutorClient) {
    // The walk took longer than the active window: the executor says it is still there.
    ex.heartbeat("batches", &[]);
    let reader = format!("Bearer {METRICS_TOKEN}");
    let gauge = |queue: &str| -> Value {
        let (code, body) = c.request("GET", &format!("/api/queues/{queue}"), Some(&reader), None);
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    let (code, body) = c.request("GET", "/api/queues", Some(&reader), None);
    assert_eq!(code, 200, "{body}");
    let all: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(all["queues"][1]["name"], "codeintel", "{all}");
    assert_eq!(
        (&all["queues"][1]["queued"], &all["queues"][1]["executors"]),
        (&json!(1), &json!(0)),
        "{all}"
    );
    assert_eq!(
        (&all["queues"][0]["queued"], &all["queues"][0]["executors"]),
        (&json!(0), &json!(1)),
        "{all}"
    );
    assert_eq!(c.request("GET", "/api/queues/nope", Some(&reader), None).0, 404);
    assert_eq!(c.request("GET", "/api/queues", None, None).0, 401);
    assert_eq!(c.request("GET", "/api/queues", Some("Bearer not-the-metrics-token-at-all"), None).0, 403);
    assert_eq!(ok_json(c, &["queues"])["queues"][1]["queued"], 1);
    let text = ok(c, &["queues"]);
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows[0], ["QUEUE", "QUEUED", "OLDEST", "RUNNING", "EXECUTORS"], "{text}");
    assert_eq!((rows[1][0], rows[1][1], rows[1][4]), ("batches", "0", "1"), "{text}");
    assert_eq!((rows[2][0], rows[2][1], rows[2][3], rows[2][4]), ("codeintel", "1", "0", "0"), "{text}");
    assert_eq!(
        c.request("GET", "/api/jobs", Some(&reader), None).0,
        403,
        "the metrics token opens nothing else"
    );

    let job = |tenant: &str| {
        let mut j = Coordinator::simple_job();
        j["tenant"] = json!(tenant);
        c.submit(j)
    };
    let (a1, _a2, b1) = (job("team-a"), job("team-a"), job("team-b"));
    assert_eq!((&gauge("batches")["queued"], &gauge("batches")["running"]), (&json!(3), &json!(0)));
    let got = [
        ex.dequeue("batches", "").expect("a job")["id"].clone(),
        ex.dequeue("batches", "").expect("a job")["id"].clone(),
    ];
    assert_eq!(got, [json!(a1), json!(b1)], "team-b's job before team-a's second");
    let g = gauge("batches");
    assert_eq!((&g["queued"], &g["running"]), (&json!(1), &json!(2)), "{g}");
    assert!(g["oldestQueuedSeconds"].as_f64().unwrap() >= 0.0, "{g}");
    let (code, metrics) = c.request("GET", "/metrics", Some(&reader), None);
    assert_eq!(code, 200, "{metrics}");
    for line in [
        "executor_queue_depth{queue=\"batches\"} 1",
        "executor_queue_running_jobs{queue=\"batches\"} 2",
        "executor_queue_executors{queue=\"batches\"} 1",
        "executor_queue_depth{queue=\"codeintel\"} 1",
        "executor_queue_executors{queue=\"codeintel\"} 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
}

/// The walk's read-only metrics token (passed in a file).
const METRICS_TOKEN: &str = "metrics-token-0123456789abcdef";

/// [`SERVE_ARGS`] with the metrics token's file, which lives as long as the directory.
fn serve_args() -> (tempfile::TempDir, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metrics-token");
    std::fs::write(&file, format!("{METRICS_TOKEN}\n")).unwrap();
    let mut args: Vec<String> = SERVE_ARGS.iter().map(|s| s.to_string()).collect();
    args.extend(["--metrics-token-file".to_string(), file.display().to_string()]);
    (dir, args)
}

#[test]
fn every_feature_on_sqlite() {
    let (_dir, args) = serve_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    walk(&Coordinator::start_with(&args));
}

#[test]
fn every_feature_on_postgres() {
    let cluster = match Cluster::start() {
        Ok(c) => c,
        Err(why) => return common::skip("every_feature_on_postgres", "postgres", &why),
    };
    cluster.create_database("walk").unwrap();
    let shared = tempfile::tempdir().unwrap();
    let (_dir, args) = serve_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    walk(&Coordinator::start_replica(None, &cluster.url("walk"), shared.path(), &args));
}

/// A replica started while its database is down serves 503 (naming the database), and serves
/// once the database is back, without a restart.
#[test]
fn a_replica_starts_without_its_database_and_recovers() {
    let test = "a_replica_starts_without_its_database_and_recovers";
    let cluster = match Cluster::start() {
        Ok(c) => c,
        Err(why) => return common::skip(test, "postgres", &why),
    };
    cluster.create_database("late").unwrap();
    cluster.stop().unwrap();
    let shared = tempfile::tempdir().unwrap();
    let c = Coordinator::start_replica(None, &cluster.url("late"), shared.path(), &[]);
    let (code, body) = c.request("GET", "/api/jobs", Some(&c.admin_auth()), None);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(&format!("127.0.0.1:{}/late", cluster.port())), "{body}");
    let ex = c.executor("early");
    let (code, _) = ex.post("batches/dequeue", &json!({"executorName": "early", "version": "5.2.0"}));
    assert_eq!(code, 503);
    cluster.start_server().unwrap();
    common::wait_until("the replica to reach its database", Duration::from_secs(30), || {
        c.request("GET", "/api/jobs", Some(&c.admin_auth()), None).0 == 200
    });
    let id = c.submit(Coordinator::simple_job());
    ex.heartbeat("batches", &[]);
    assert_eq!(ex.dequeue("batches", "").expect("the job")["id"], id);
    // The schema was made by the late preparation: a second replica finds the marker.
    let second = Coordinator::start_replica(
        Some((&c.secret, &c.admin_token)),
        &cluster.url("late"),
        shared.path(),
        &[],
    );
    assert_eq!(second.job(id)["state"], "processing");
}
