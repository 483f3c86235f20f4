//! The coordinator (`executor queue ...`) against real HTTP on loopback: every protocol route's
//! success and failure statuses, the admin API and CLI, durability across SIGKILL, races,
//! stalled jobs, cancellation, long polls, the log cap and TLS.

use crate::common::{self, Exec};
use crate::coordinator::Coordinator;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn entry_body(name: &str, id: i64, out: &str) -> Value {
    json!({"executorName": name, "jobId": id, "key": "step.docker.0", "command": ["sh", "-c", "x"],
           "startTime": "2024-01-02T03:04:05Z", "out": out})
}

#[test]
fn queue_walks_a_job_through_its_life() {
    let c = Coordinator::start();
    let mut job = Coordinator::simple_job();
    job["files"] = json!({"in.txt": {"content": "hello"}});
    job["redactedValues"] = json!({"hunter2-secret": "PASSWORD_REMOVED"});
    job["dockerSteps"][0]["commands"] = json!(["echo hunter2-secret"]);
    let id = c.submit(job);
    assert_eq!(c.job(id)["state"], "queued");

    let ex = c.executor("host-1");
    ex.heartbeat("batches", &[]);
    let got = ex.dequeue("batches", "").expect("a job");
    assert_eq!(got["id"], id);
    assert_eq!(got["version"], 2);
    assert_eq!(got["files"]["in.txt"]["content"], "aGVsbG8=", "v2 content is base64");
    assert!(got.get("queue").is_none(), "single-queue dequeue sets no queue");
    let token = got["token"].as_str().unwrap();
    assert_eq!(token.len(), 40);
    assert!(token.chars().all(|c| c.is_ascii_hexdigit()));
    assert!(ex.dequeue("batches", "").is_none(), "nothing else queued");

    let hb = ex.heartbeat("batches", &[id]);
    assert_eq!(hb["knownIds"], json!([id.to_string()]));
    assert_eq!(hb["cancelIds"], json!([]));

    let (code, body) =
        ex.job_call("batches", &got, "addExecutionLogEntry", entry_body("host-1", id, "stdout: a\n"));
    assert_eq!((code, body.as_str()), (200, "1"));
    let mut upd = entry_body("host-1", id, "stdout: b\n");
    upd["entryId"] = json!(1);
    upd["append"] = json!(true);
    upd["exitCode"] = json!(0);
    upd["durationMs"] = json!(12);
    assert_eq!(ex.job_call("batches", &got, "updateExecutionLogEntry", upd).0, 204);

    let art = b"not really a tarball";
    assert_eq!(ex.put_artifacts("batches", &got, b"first"), 204);
    assert_eq!(ex.put_artifacts("batches", &got, art), 204, "a second PUT replaces the first");

    assert_eq!(ex.mark("batches", &got, "markComplete", ""), 204);
    // A retried completion succeeds again; the spent token opens nothing else.
    assert_eq!(ex.mark("batches", &got, "markComplete", ""), 204, "a retried markComplete");
    assert_eq!(ex.mark("batches", &got, "markFailed", "late"), 401, "token spent at mark*");
    assert_eq!(ex.put_artifacts("batches", &got, b"late"), 401, "token spent at mark*");

    let shown = c.job(id);
    assert_eq!(shown["state"], "completed");
    assert_eq!(shown["executorName"], "host-1");
    assert!(shown["finishedAt"].is_string());
    assert_eq!(shown["logs"][0]["out"], "stdout: a\nstdout: b\n");
    assert_eq!(shown["logs"][0]["exitCode"], 0);
    assert_eq!(shown["artifacts"]["bytes"], art.len());
    let text = shown.to_string();
    assert!(!text.contains(token), "the token is never shown");
    assert!(!text.contains("hunter2-secret"), "redacted values are never shown: {text}");

    let resp = c
        .agent()
        .get(&format!("{}/api/jobs/{id}/artifacts", c.url))
        .set("Authorization", &c.admin_auth())
        .call()
        .unwrap();
    let mut back = Vec::new();
    std::io::Read::read_to_end(&mut resp.into_reader(), &mut back).unwrap();
    assert_eq!(back, art);

    let (code, list) =
        c.request("GET", "/api/jobs?state=completed&queue=batches", Some(&c.admin_auth()), None);
    assert_eq!(code, 200);
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["jobs"][0]["id"], id);
    let (_, list) = c.request("GET", "/api/jobs?state=queued", Some(&c.admin_auth()), None);
    assert_eq!(serde_json::from_str::<Value>(&list).unwrap()["jobs"], json!([]));

    let (code, execs) = c.request("GET", "/api/executors", Some(&c.admin_auth()), None);
    assert_eq!(code, 200);
    let execs: Value = serde_json::from_str(&execs).unwrap();
    let e = &execs["executors"][0];
    assert_eq!(e["hostname"], "host-1");
    assert_eq!(e["os"], "linux");
    assert_eq!(e["active"], true);
    assert_eq!(e["queueName"], "batches");
    assert!(e["firstSeenAt"].is_string() && e["lastSeenAt"].is_string());
}

#[test]
fn queue_multi_queue_routes_use_uids() {
    let c = Coordinator::start();
    let a = c.submit(
        json!({"queue": "codeintel", "dockerSteps": [{"image": "i", "commands": [], "dir": "", "env": []}]}),
    );
    let ex = c.executor("multi-1");
    let auth = c.executor_auth();
    let (code, _) = c.request(
        "POST",
        "/.executors/queue/heartbeat",
        Some(&auth),
        Some(&json!({"executorName": "multi-1", "queueNames": ["batches", "codeintel"]}).to_string()),
    );
    assert_eq!(code, 200);
    let (code, body) = c.request(
        "POST",
        "/.executors/queue/dequeue",
        Some(&auth),
        Some(
            &json!({"executorName": "multi-1", "version": "", "queues": ["batches", "codeintel"]})
                .to_string(),
        ),
    );
    assert_eq!(code, 200, "{body}");
    let job: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((job["id"].as_i64(), job["queue"].as_str()), (Some(a), Some("codeintel")));
    assert!(job.get("version").is_none(), "empty version gets the v1 payload");
    let (code, body) = c.request(
        "POST",
        "/.executors/queue/heartbeat",
        Some(&auth),
        Some(
            &json!({"executorName": "multi-1", "queueNames": ["batches", "codeintel"],
                "jobIdsByQueue": [{"queueName": "codeintel", "jobIds": [a.to_string()]}]})
            .to_string(),
        ),
    );
    assert_eq!(code, 200);
    let hb: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(hb["knownIds"], json!([format!("{a}-codeintel")]));
    // A job token is scoped to its queue.
    assert_eq!(ex.mark("batches", &job, "markComplete", "").clone(), 403);
    assert_eq!(ex.mark("codeintel", &job, "markErrored", "boom"), 204);
    let shown = c.job(a);
    assert_eq!(shown["state"], "failed", "MaxNumRetries = 0: an errored job fails");
    assert_eq!(shown["failureMessage"], "boom");
    // Empty queues: 204. Unknown queue: 400. Group not in queueNames: 400.
    let (code, _) = c.request(
        "POST",
        "/.executors/queue/dequeue",
        Some(&auth),
        Some(r#"{"executorName":"m","queues":[]}"#),
    );
    assert_eq!(code, 204);
    let (code, body) = c.request(
        "POST",
        "/.executors/queue/dequeue",
        Some(&auth),
        Some(r#"{"executorName":"m","queues":["nope"]}"#),
    );
    assert_eq!(code, 400);
    assert!(body.contains("unknown queue"), "{body}");
    let (code, _) = c.request(
        "POST",
        "/.executors/queue/heartbeat",
        Some(&auth),
        Some(r#"{"executorName":"m","queueNames":["batches"],"jobIdsByQueue":[{"queueName":"codeintel","jobIds":["1"]}]}"#),
    );
    assert_eq!(code, 400);
    let (code, _) = c.request(
        "POST",
        "/.executors/queue/heartbeat",
        Some(&auth),
        Some(r#"{"executorName":"m","queueNames":[]}"#),
    );
    assert_eq!(code, 400);
}

#[test]
fn queue_auth_statuses_follow_the_contract() {
    let c = Coordinator::start();
    let id = c.submit(Coordinator::simple_job());
    let ex = c.executor("auth-1");
    let exec = c.executor_auth();
    let admin = c.admin_auth();
    // test/auth
    assert_eq!(c.request("GET", "/.executors/test/auth", Some(&exec), None), (200, "ok".into()));
    assert_eq!(
        c.request("GET", "/.executors/test/auth", Some("token-executor wrong-secret-xxxxxxxxxxxx"), None).0,
        401
    );
    assert_eq!(c.request("GET", "/.executors/test/auth", Some("token-executor"), None).0, 401);
    assert_eq!(c.request("GET", "/.executors/test/auth", None, None).0, 401);
    assert_eq!(
        c.request("GET", "/.executors/test/auth", Some(&admin), None).0,
        401,
        "admin token is not an executor secret"
    );
    let deq = r#"{"executorName":"auth-1"}"#;
    assert_eq!(c.request("POST", "/.executors/queue/batches/dequeue", Some(&admin), Some(deq)).0, 401);
    // Admin API refuses the executors' secret.
    assert_eq!(c.request("GET", &format!("/api/jobs/{id}"), Some(&exec), None).0, 401);
    assert_eq!(
        c.request("GET", &format!("/api/jobs/{id}"), Some(&format!("Bearer {}", c.secret)), None).0,
        403
    );
    assert_eq!(c.request("POST", "/api/jobs", Some(&exec), Some("{}")).0, 401);
    assert_eq!(c.request("GET", "/api/jobs", None, None).0, 401);

    // Job routes.
    ex.heartbeat("batches", &[]);
    let job = ex.dequeue("batches", "").unwrap();
    let token = job["token"].as_str().unwrap().to_string();
    let body = entry_body("auth-1", id, "x").to_string();
    let call = |headers: &[(&str, &str)]| {
        let mut req = c.agent().post(&format!("{}/.executors/queue/batches/addExecutionLogEntry", c.url));
        for (k, v) in headers {
            req = req.set(k, v);
        }
        match req.send_string(&body) {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(code, _)) => code,
            Err(e) => panic!("{e}"),
        }
    };
    let bearer = format!("Bearer {token}");
    let ids = id.to_string();
    assert_eq!(
        call(&[("Authorization", &bearer), ("X-Sourcegraph-Executor-Name", "auth-1")]),
        400,
        "no job id"
    );
    assert_eq!(
        call(&[
            ("Authorization", &bearer),
            ("X-Sourcegraph-Job-ID", "abc"),
            ("X-Sourcegraph-Executor-Name", "auth-1")
        ]),
        400
    );
    assert_eq!(call(&[("Authorization", &bearer), ("X-Sourcegraph-Job-ID", &ids)]), 400, "no executor name");
    let unknown = format!("Bearer {}", "ab".repeat(20));
    assert_eq!(
        call(&[
            ("Authorization", &unknown),
            ("X-Sourcegraph-Job-ID", &ids),
            ("X-Sourcegraph-Executor-Name", "auth-1")
        ]),
        401
    );
    assert_eq!(
        call(&[
            ("Authorization", &bearer),
            ("X-Sourcegraph-Job-ID", "999"),
            ("X-Sourcegraph-Executor-Name", "auth-1")
        ]),
        403,
        "token of another job"
    );
    let wrong_fallback = "token-executor not-the-secret-at-all-xx";
    assert_eq!(
        call(&[
            ("Authorization", wrong_fallback),
            ("X-Sourcegraph-Job-ID", &ids),
            ("X-Sourcegraph-Executor-Name", "auth-1")
        ]),
        403
    );
    assert_eq!(
        call(&[
            ("Authorization", &bearer),
            ("X-Sourcegraph-Job-ID", &ids),
            ("X-Sourcegraph-Executor-Name", "never-seen")
        ]),
        401,
        "an executor must heartbeat first"
    );
    assert_eq!(
        call(&[
            ("Authorization", &exec),
            ("X-Sourcegraph-Job-ID", &ids),
            ("X-Sourcegraph-Executor-Name", "auth-1")
        ]),
        200,
        "the shared secret works as the fallback"
    );
    assert_eq!(
        call(&[
            ("Authorization", &bearer),
            ("X-Sourcegraph-Job-ID", &ids),
            ("X-Sourcegraph-Executor-Name", "auth-1")
        ]),
        200
    );
    // Ownership: another (known) executor gets unknown job: 500 on logs, 404 on mark*.
    let other = c.executor("auth-2");
    other.heartbeat("batches", &[]);
    let mut stolen = job.clone();
    stolen["token"] = json!("00".repeat(20));
    let fallback_call = |route: &str, body: Value| {
        let r = c
            .agent()
            .post(&format!("{}/.executors/queue/batches/{route}", c.url))
            .set("Authorization", &exec)
            .set("X-Sourcegraph-Job-ID", &ids)
            .set("X-Sourcegraph-Executor-Name", "auth-2")
            .send_string(&body.to_string());
        match r {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("{e}"),
        }
    };
    let (code, body) = fallback_call("addExecutionLogEntry", entry_body("auth-2", id, "x"));
    assert_eq!((code, body.as_str()), (500, r#"{"error":"unknown job"}"#));
    let (code, body) = fallback_call("markComplete", json!({"executorName": "auth-2", "jobId": id}));
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("error"));
}

#[test]
fn queue_rejects_bad_input_with_json_errors() {
    let c = Coordinator::start_with(&["--artifact-max-bytes", "1000", "--log-cap-bytes", "100000"]);
    let admin = c.admin_auth();
    let exec = c.executor_auth();
    let check = |method: &str, path: &str, auth: &str, body: Option<&str>, want: u16, needle: &str| {
        let (code, text) = c.request(method, path, Some(auth), body);
        assert_eq!(code, want, "{method} {path}: {text}");
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{method} {path}: not JSON: {text}"));
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains(needle), "{method} {path}: {msg:?} lacks {needle:?}");
    };
    check("POST", "/api/jobs", &admin, Some("{not json"), 400, "invalid JSON");
    check("POST", "/api/jobs", &admin, Some(r#"{"queue":"nope"}"#), 400, "unknown queue");
    check("POST", "/api/jobs", &admin, Some(r#"{"dockerSteps":"x"}"#), 400, "invalid job");
    check("POST", "/api/jobs", &admin, Some(r#"{"files":{"/etc/passwd":{"content":"x"}}}"#), 400, "relative");
    check(
        "POST",
        "/api/jobs",
        &admin,
        Some(r#"{"version":2,"files":{"a":{"content":"!!"}}}"#),
        400,
        "base64",
    );
    check("POST", "/api/jobs", &admin, Some(r#"{"token":"abc"}"#), 400, "token");
    let huge = format!(r#"{{"commit":"{}"}}"#, "a".repeat(9 << 20));
    check("POST", "/api/jobs", &admin, Some(&huge), 413, "larger than");
    check("GET", "/api/jobs/abc", &admin, None, 400, "invalid job id");
    check("GET", "/api/jobs/-4", &admin, None, 400, "invalid job id");
    check("GET", "/api/jobs/12345", &admin, None, 404, "no job 12345");
    check("GET", "/api/jobs?state=bogus", &admin, None, 400, "unknown state");
    check("GET", "/api/jobs?limit=0", &admin, None, 400, "invalid limit");
    check("POST", "/api/jobs/77/cancel", &admin, None, 404, "no job 77");
    check("GET", "/api/jobs/77/artifacts", &admin, None, 404, "no job 77");
    check("POST", "/.executors/queue/nope/dequeue", &exec, Some("{}"), 404, "unknown queue");
    check("POST", "/.executors/queue/batches/dequeue", &exec, Some("[1,2"), 400, "invalid JSON");
    check(
        "POST",
        "/.executors/queue/batches/dequeue",
        &exec,
        Some(r#"{"executorName":""}"#),
        400,
        "executorName",
    );
    check(
        "POST",
        "/.executors/queue/batches/dequeue",
        &exec,
        Some(r#"{"executorName":"e","version":"banana"}"#),
        400,
        "semver",
    );
    check(
        "POST",
        "/.executors/queue/batches/dequeue?wait=forever",
        &exec,
        Some(r#"{"executorName":"e"}"#),
        400,
        "wait",
    );
    check(
        "POST",
        "/.executors/queue/batches/heartbeat",
        &exec,
        Some(r#"{"executorName":"e","jobIds":["x"]}"#),
        400,
        "",
    );
    check("GET", "/no/such/route", &admin, None, 404, "no route");
    check("DELETE", "/api/jobs", &admin, None, 405, "not allowed");
    let (code, list) = c.request("GET", "/api/jobs", Some(&admin), None);
    assert_eq!(code, 200);
    assert_eq!(serde_json::from_str::<Value>(&list).unwrap()["jobs"], json!([]), "no half-written job");

    // Artifacts over the cap: 413, nothing stored.
    let id = c.submit(Coordinator::simple_job());
    let ex = c.executor("bad-1");
    ex.heartbeat("batches", &[]);
    let job = ex.dequeue("batches", "").unwrap();
    let put = |bytes: Vec<u8>| ex.put_artifacts("batches", &job, &bytes);
    assert_eq!(put(vec![7u8; 1001]), 413);
    assert!(c.job(id)["artifacts"].is_null());
    assert_eq!(put(vec![7u8; 1000]), 204);
    assert_eq!(c.job(id)["artifacts"]["bytes"], 1000);
    let leftovers: Vec<_> = std::fs::read_dir(c.data_dir.path().join("db/artifacts"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leftovers, vec![format!("{id}.tar.gz")]);
    // Body/header mismatch on a job route.
    let (code, _) =
        ex.job_call("batches", &job, "markComplete", json!({"executorName": "bad-1", "jobId": id + 1}));
    assert_eq!(code, 400);
}

#[test]
fn queue_refuses_to_start_without_good_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let run = |secret: Option<&str>, admin: Option<&str>| {
        let mut cmd = common::executor();
        cmd.args(["queue", "serve", "--listen", "127.0.0.1:0", "--data-dir"]).arg(dir.path());
        if let Some(s) = secret {
            cmd.env("EXECUTOR_FRONTEND_PASSWORD", s);
        }
        if let Some(a) = admin {
            cmd.env("EXECUTOR_QUEUE_ADMIN_TOKEN", a);
        }
        common::run(&mut cmd)
    };
    let long = "x".repeat(24);
    let out = run(None, Some(&long));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 20 characters"));
    let out = run(Some("short"), Some(&long));
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("short"), "the secret is not echoed");
    let out = run(Some(&"y".repeat(24)), None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin token"));
    let out = run(Some(&long), Some(&long));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must differ"));
}

#[test]
fn queue_race_32_dequeuers_take_1000_jobs_once_each() {
    let c = Coordinator::start();
    let n = 1000;
    let mut ids: Vec<i64> = (0..n).map(|_| c.submit(Coordinator::simple_job())).collect();
    ids.sort();
    let taken = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for w in 0..32 {
            let c = &c;
            let taken = &taken;
            s.spawn(move || {
                let ex = c.executor(&format!("racer-{w}"));
                ex.heartbeat("batches", &[]);
                while let Some(job) = ex.dequeue("batches", "") {
                    assert_eq!(ex.mark("batches", &job, "markComplete", ""), 204);
                    taken.lock().unwrap().push(job["id"].as_i64().unwrap());
                }
            });
        }
    });
    let mut taken = taken.into_inner().unwrap();
    taken.sort();
    assert_eq!(taken.len(), n, "each job dequeued exactly once");
    assert_eq!(taken, ids);
    let (_, list) = c.request("GET", "/api/jobs?state=completed&limit=5000", Some(&c.admin_auth()), None);
    assert_eq!(serde_json::from_str::<Value>(&list).unwrap()["jobs"].as_array().unwrap().len(), n);
}

#[test]
fn queue_survives_sigkill_with_nothing_lost() {
    let mut c = Coordinator::start_with(&["--stalled-max-age", "1s", "--max-resets", "3"]);
    let ids: Vec<i64> = (0..20).map(|_| c.submit(Coordinator::simple_job())).collect();
    let ex = c.executor("crash-1");
    ex.heartbeat("batches", &[]);
    let running = ex.dequeue("batches", "").unwrap();
    let rid = running["id"].as_i64().unwrap();
    let (code, _) =
        ex.job_call("batches", &running, "addExecutionLogEntry", entry_body("crash-1", rid, "acked\n"));
    assert_eq!(code, 200);
    c.restart();
    // Every job is still there; the acknowledged log entry too.
    for id in &ids {
        let j = c.job(*id);
        assert!(j["state"] == "queued" || j["state"] == "processing", "{j}");
    }
    assert_eq!(c.job(rid)["logs"][0]["out"], "acked\n");
    // The executor keeps going after the restart (same port), and finishes its job.
    let ex = c.executor("crash-1");
    assert_eq!(ex.heartbeat("batches", &[rid])["knownIds"], json!([rid.to_string()]));
    assert_eq!(ex.mark("batches", &running, "markComplete", ""), 204);
    // Kill mid-flight again, with a job processing whose executor vanishes: it is requeued.
    let lost = ex.dequeue("batches", "").unwrap();
    c.kill();
    c.restart();
    let lid = lost["id"].as_i64().unwrap();
    c.wait_state(lid, &["queued"], Duration::from_secs(10));
    let ex = c.executor("crash-2");
    ex.heartbeat("batches", &[]);
    let mut done = 1;
    while let Some(job) = ex.dequeue("batches", "") {
        assert_eq!(ex.mark("batches", &job, "markComplete", ""), 204);
        done += 1;
    }
    assert_eq!(done, ids.len());
    for id in &ids {
        assert_eq!(c.job(*id)["state"], "completed");
    }
}

#[test]
fn queue_resets_stalled_jobs_then_fails_them() {
    let c = Coordinator::start_with(&["--stalled-max-age", "300ms", "--max-resets", "2"]);
    let id = c.submit(Coordinator::simple_job());
    let ex = c.executor("stall-1");
    ex.heartbeat("batches", &[]);
    // A job kept alive by heartbeats is not reset.
    let job = ex.dequeue("batches", "").unwrap();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(ex.heartbeat("batches", &[id])["knownIds"], json!([id.to_string()]));
    }
    assert_eq!(c.job(id)["state"], "processing");
    // Without heartbeats it goes back to the queue, twice, then fails.
    for resets in 1..=2 {
        let j = c.wait_state(id, &["queued"], Duration::from_secs(10));
        assert_eq!(j["numResets"], resets);
        let again = ex.dequeue("batches", "").expect("the reset job");
        assert_eq!(again["id"], id);
        assert_ne!(again["token"], job["token"], "a new token per dequeue");
    }
    let j = c.wait_state(id, &["failed"], Duration::from_secs(10));
    let msg = j["failureMessage"].as_str().unwrap();
    assert!(
        msg.contains("died while handling this message too many times") && msg.contains("300ms"),
        "{msg}"
    );
    // The stale executor lost the job.
    assert_eq!(ex.mark("batches", &job, "markComplete", ""), 401);
}

#[test]
fn queue_cancels_queued_and_processing_jobs() {
    let c = Coordinator::start();
    let admin = c.admin_auth();
    let queued = c.submit(Coordinator::simple_job());
    let (code, body) = c.request("POST", &format!("/api/jobs/{queued}/cancel"), Some(&admin), None);
    assert_eq!(code, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["state"], "canceled");
    let (code, body) = c.request("POST", &format!("/api/jobs/{queued}/cancel"), Some(&admin), None);
    assert_eq!(code, 409, "{body}");

    let id = c.submit(Coordinator::simple_job());
    let ex = c.executor("cancel-1");
    ex.heartbeat("batches", &[]);
    let job = ex.dequeue("batches", "").unwrap();
    assert_eq!(job["id"], id, "the canceled job is never dequeued");
    assert_eq!(ex.heartbeat("batches", &[id])["cancelIds"], json!([]));
    let (code, body) = c.request("POST", &format!("/api/jobs/{id}/cancel"), Some(&admin), None);
    assert_eq!(code, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["state"].as_str(), v["cancel"].as_bool()), (Some("processing"), Some(true)));
    let hb = ex.heartbeat("batches", &[id]);
    assert_eq!(hb["cancelIds"], json!([id.to_string()]));
    assert_eq!(ex.mark("batches", &job, "markFailed", "canceled by the coordinator"), 204);
    assert_eq!(c.job(id)["state"], "canceled");
}

#[test]
fn queue_long_poll_answers_when_a_job_arrives() {
    let c = Coordinator::start();
    let ex = c.executor("poll-1");
    ex.heartbeat("batches", &[]);
    // Without a job, the wait runs out and answers 204.
    let t = Instant::now();
    assert!(ex.dequeue("batches", "300ms").is_none());
    assert!(t.elapsed() >= Duration::from_millis(290));
    // A job submitted while the executor waits is handed over at once.
    std::thread::scope(|s| {
        let waiter = s.spawn(|| ex.dequeue("batches", "20s"));
        std::thread::sleep(Duration::from_millis(300));
        let id = c.submit(Coordinator::simple_job());
        let got = waiter.join().unwrap().expect("the long poll gets the job");
        assert_eq!(got["id"], id);
    });
    // Multi-queue long poll.
    let auth = c.executor_auth();
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            c.request(
                "POST",
                "/.executors/queue/dequeue?wait=20s",
                Some(&auth),
                Some(r#"{"executorName":"poll-1","queues":["codeintel"]}"#),
            )
        });
        std::thread::sleep(Duration::from_millis(200));
        c.submit(json!({"queue": "batches", "dockerSteps": []}));
        let id = c.submit(json!({"queue": "codeintel", "dockerSteps": []}));
        let (code, body) = waiter.join().unwrap();
        assert_eq!(code, 200);
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["id"], id);
    });
}

#[test]
fn queue_caps_logs_with_an_explicit_marker() {
    let c = Coordinator::start_with(&["--log-cap-bytes", "64"]);
    let id = c.submit(Coordinator::simple_job());
    let ex = c.executor("cap-1");
    ex.heartbeat("batches", &[]);
    let job = ex.dequeue("batches", "").unwrap();
    let (_, e1) =
        ex.job_call("batches", &job, "addExecutionLogEntry", entry_body("cap-1", id, &"a".repeat(40)));
    assert_eq!(e1, "1");
    let mut upd = entry_body("cap-1", id, &"b".repeat(40));
    upd["entryId"] = json!(1);
    upd["append"] = json!(true);
    assert_eq!(ex.job_call("batches", &job, "updateExecutionLogEntry", upd.clone()).0, 204);
    assert_eq!(ex.job_call("batches", &job, "updateExecutionLogEntry", upd).0, 204);
    let out = c.job(id)["logs"][0]["out"].as_str().unwrap().to_string();
    assert_eq!(out, format!("{}{}\n[executor: log truncated at 64 bytes]\n", "a".repeat(40), "b".repeat(24)));
    let (_, e2) = ex.job_call("batches", &job, "addExecutionLogEntry", entry_body("cap-1", id, "late"));
    assert_eq!(e2, "2");
    assert_eq!(c.job(id)["logs"][1]["out"], "\n[executor: log truncated at 64 bytes]\n");
    let mut bad = entry_body("cap-1", id, "x");
    bad["entryId"] = json!(9);
    assert_eq!(ex.job_call("batches", &job, "updateExecutionLogEntry", bad).0, 404);
}

#[test]
fn queue_follows_logs_until_the_job_ends() {
    let c = Coordinator::start();
    let id = c.submit(Coordinator::simple_job());
    let ex = c.executor("follow-1");
    ex.heartbeat("batches", &[]);
    let job = ex.dequeue("batches", "").unwrap();
    ex.job_call("batches", &job, "addExecutionLogEntry", entry_body("follow-1", id, "one\n"));
    let follow = |json: bool| {
        let mut cmd = common::executor();
        c.admin_env(&mut cmd);
        cmd.args(["queue", "logs", &id.to_string(), "--follow"]).stdout(std::process::Stdio::piped());
        if json {
            cmd.arg("--json");
        }
        Follower::start(cmd.spawn().unwrap())
    };
    let (as_json, as_text) = (follow(true), follow(false));
    // Each update goes out once both followers have printed the one before, so that each is
    // seen on its own.
    let both_printed = |text: &str| {
        common::wait_until(&format!("both followers to print {text:?}"), Duration::from_secs(10), || {
            as_json.printed().contains(text) && as_text.printed().contains(text)
        })
    };
    both_printed("one");
    let mut upd = entry_body("follow-1", id, "two\n");
    upd["entryId"] = json!(1);
    upd["append"] = json!(true);
    assert_eq!(ex.job_call("batches", &job, "updateExecutionLogEntry", upd.clone()).0, 204);
    both_printed("two");
    upd["out"] = json!("three\n");
    upd["exitCode"] = json!(0);
    upd["durationMs"] = json!(7);
    assert_eq!(ex.job_call("batches", &job, "updateExecutionLogEntry", upd).0, 204);
    both_printed("three");
    assert_eq!(ex.mark("batches", &job, "markComplete", ""), 204);
    let stdout = as_json.finish();
    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // The whole entry once, then only what each update added.
    assert_eq!(lines.first().unwrap()["out"], "one\n");
    assert!(lines.first().unwrap().get("append").is_none());
    let appended: String = lines[1..].iter().map(|l| l["out"].as_str().unwrap()).collect();
    assert_eq!(appended, "two\nthree\n");
    assert!(lines[1..].iter().all(|l| l["append"] == true && l["entryId"] == 1), "{lines:?}");
    assert_eq!(lines.last().unwrap()["exitCode"], 0);
    let stdout = as_text.finish();
    assert_eq!(stdout, "==> [1] step.docker.0\none\ntwo\nthree\n==> [1] step.docker.0: exit 0, 7 ms\n");
}

/// A child whose stdout a thread collects while it runs, so that a test can wait for what it
/// has printed so far.
struct Follower {
    child: std::process::Child,
    out: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    reader: std::thread::JoinHandle<()>,
}

impl Follower {
    fn start(mut child: std::process::Child) -> Follower {
        let mut stdout = child.stdout.take().expect("a piped stdout");
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = out.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut stdout, &mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Follower { child, out, reader }
    }

    fn printed(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Waits for the child to exit 0; all it printed.
    #[track_caller]
    fn finish(mut self) -> String {
        let status = self.child.wait().unwrap();
        self.reader.join().unwrap();
        let out = String::from_utf8(self.out.lock().unwrap().clone()).unwrap();
        assert!(status.success(), "{status}; stdout:\n{out}");
        out
    }
}

#[test]
fn queue_cli_submits_lists_shows_and_cancels() {
    let c = Coordinator::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.json");
    std::fs::write(&file, Coordinator::simple_job().to_string()).unwrap();
    let cli = |args: &[&str]| {
        let mut cmd = common::executor();
        c.admin_env(&mut cmd);
        cmd.arg("queue").args(args);
        common::run(&mut cmd)
    };
    let out = Exec::new()
        .with(|cmd| c.admin_env(cmd))
        .args(["queue", "submit", "--queue", "codeintel", file.to_str().unwrap()])
        .run();
    let id: i64 = String::from_utf8(out.stdout).unwrap().trim().parse().unwrap();
    assert_eq!(c.job(id)["queue"], "codeintel");
    let out = cli(&["jobs"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("ID  QUEUE"), "{text}");
    assert!(text.contains("codeintel  queued"), "{text}");
    let out = cli(&["jobs", "--json", "--state", "queued"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["jobs"][0]["id"], id);
    let out = cli(&["show", &id.to_string()]);
    assert!(String::from_utf8(out.stdout).unwrap().contains("state           queued"));
    let out = cli(&["cancel", &id.to_string(), "--json"]);
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap()["state"], "canceled");
    let out = cli(&["cancel", &id.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("409") && err.contains("already finished"), "{err}");
    assert!(!err.contains(&c.admin_token));
    let out = cli(&["executors", "--json"]);
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap()["executors"], json!([]));
    let out = cli(&["artifacts", &id.to_string(), "-o", dir.path().join("a.tgz").to_str().unwrap()]);
    assert!(String::from_utf8(out.stderr).unwrap().contains("404"));
    // Wrong token: a clear error, no secret echoed.
    let mut cmd = common::executor();
    cmd.env("EXECUTOR_FRONTEND_URL", &c.url)
        .env("EXECUTOR_QUEUE_ADMIN_TOKEN", &c.secret)
        .args(["queue", "jobs"]);
    let out = common::run(&mut cmd);
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("403") && !err.contains(&c.secret), "{err}");
}

#[test]
fn queue_metrics_count_jobs_and_executors() {
    let c = Coordinator::start();
    c.submit(Coordinator::simple_job());
    c.submit(Coordinator::simple_job());
    let ex = c.executor("metrics-1");
    ex.heartbeat("batches", &[]);
    ex.dequeue("batches", "").unwrap();
    ex.dequeue("codeintel", "");
    let (code, text) = c.request("GET", "/metrics", Some(&c.admin_auth()), None);
    assert_eq!(code, 200);
    assert!(text.contains("executor_queue_jobs{queue=\"batches\",state=\"queued\"} 1"), "{text}");
    assert!(text.contains("executor_queue_jobs{queue=\"batches\",state=\"processing\"} 1"));
    assert!(text.contains("executor_queue_active_executors 1"));
    assert!(text.contains("executor_queue_dequeue_duration_seconds_count{result=\"job\"} 1"));
    assert!(text.contains("executor_queue_dequeue_duration_seconds_count{result=\"empty\"} 1"));
}

#[test]
fn queue_serves_https_with_a_given_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let Some((ca, cert, key)) = common::make_ca(dir.path(), "queue_serves_https_with_a_given_certificate")
    else {
        return;
    };
    let c = Coordinator::start_with(&["--tls-cert", &cert, "--tls-key", &key]);
    assert!(c.url.starts_with("https://127.0.0.1:"), "{}", c.url);
    let job = dir.path().join("job.json");
    std::fs::write(&job, Coordinator::simple_job().to_string()).unwrap();
    let out =
        Exec::new().with(|cmd| c.admin_env(cmd)).args(["queue", "submit", "--ca-cert", &ca]).arg(&job).run();
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), "1");
    // Without trusting the CA the client refuses.
    let mut cmd = common::executor();
    c.admin_env(&mut cmd);
    cmd.args(["queue", "jobs"]);
    let out = common::run(&mut cmd);
    assert!(!out.status.success());
    // Plain HTTP to the TLS port does not work either.
    let plain = c.url.replace("https://", "http://");
    assert!(ureq::get(&format!("{plain}/metrics")).timeout(Duration::from_secs(5)).call().is_err());
}

/// Every entry below `dir` (and `dir`) that anyone but the owner may read, write or search.
fn open_to_others(dir: &std::path::Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.permissions().mode() & 0o077 != 0 {
            out.push(format!("{} {:o}", p.display(), m.permissions().mode() & 0o7777));
        }
        if m.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out
}

/// Finding 6 of the security review: the data directory (0755), `queue.db` and its WAL (0644,
/// with every job's `redactedValues`) and artifacts (0644) were readable by every local user.
#[test]
fn coordinator_data_is_private_from_the_first_byte() {
    use std::os::unix::fs::PermissionsExt;
    let mut c = Coordinator::start();
    let mut job = Coordinator::simple_job();
    job["redactedValues"] = json!({"hunter2-secret": "PASSWORD_REMOVED"});
    let id = c.submit(job);
    let ex = c.executor("host-1");
    ex.heartbeat("batches", &[]);
    let got = ex.dequeue("batches", "").expect("a job");
    assert_eq!(got["id"], id);
    assert_eq!(ex.put_artifacts("batches", &got, b"artifact bytes"), 204);
    let db = c.data_dir.path().join("db");
    for f in ["queue.db", "queue.db-wal", "artifacts"] {
        assert!(db.join(f).exists(), "{f} missing");
    }
    assert!(std::fs::read_dir(db.join("artifacts")).unwrap().count() > 0, "no artifact stored");
    assert_eq!(open_to_others(&db), Vec::<String>::new());

    // What an older version (or another umask) left is closed at the next start.
    c.kill();
    let mut stack = vec![db.clone()];
    while let Some(p) = stack.pop() {
        let dir = p.is_dir();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(if dir { 0o755 } else { 0o644 }))
            .unwrap();
        if dir {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    c.restart();
    let left = open_to_others(&db);
    assert!(!left.iter().any(|l| l.starts_with(&format!("{} ", db.display()))), "{left:?}");
    for f in ["queue.db", "queue.db-wal", "queue.db-shm"] {
        let p = db.join(f);
        if p.exists() {
            assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o077, 0, "{f}");
        }
    }
}

/// Finding 7 of the security review: `queue logs` wrote a job's OSC title and screen-clear
/// sequences to the terminal as they were, and a job could print lines that pass for the CLI's
/// own `==>` headers. Job-controlled text (output, keys, failure messages, executor names) is
/// escaped unless `--raw`.
#[test]
fn admin_cli_escapes_what_a_job_controls() {
    let c = Coordinator::start();
    let id = c.submit(Coordinator::simple_job());
    let ex = c.executor("host-1");
    ex.heartbeat("batches", &[]);
    let got = ex.dequeue("batches", "").expect("a job");
    let hostile =
        "stdout: \u{1b}]0;pwned\u{7}\u{1b}[2Jcleared\n==> [9] step.docker.9: exit 0\n\u{202e}txt.exe\n";
    let mut body = entry_body("host-1", id, hostile);
    body["key"] = json!("step.docker.\u{1b}[31mred");
    assert_eq!(ex.job_call("batches", &got, "addExecutionLogEntry", body).0, 200);
    assert_eq!(ex.mark("batches", &got, "markFailed", "failed \u{1b}[1A\u{1b}[2Kok"), 204);
    let cli = |args: &[&str]| {
        let o = Exec::new().with(|cmd| c.admin_env(cmd)).args(["queue"]).args(args).run();
        String::from_utf8(o.stdout).unwrap()
    };
    let id = id.to_string();
    for args in [vec!["logs", id.as_str()], vec!["show", id.as_str()], vec!["jobs"], vec!["executors"]] {
        let out = cli(&args);
        assert!(
            !out.contains('\u{1b}') && !out.contains('\u{7}') && !out.contains('\u{202e}'),
            "{args:?}:\n{out}"
        );
        assert!(!out.lines().any(|l| l.starts_with("==> [9]")), "{args:?}: a forged header:\n{out}");
    }
    let logs = cli(&["logs", &id]);
    assert!(logs.contains("\\x1b]0;pwned\\x07\\x1b[2Jcleared"), "{logs}");
    assert!(logs.contains("\\x3d=> [9] step.docker.9: exit 0"), "{logs}");
    assert!(logs.contains("==> [1] step.docker.\\x1b[31mred"), "{logs}");
    assert!(cli(&["jobs"]).contains("failed \\x1b[1A\\x1b[2Kok"));
    let raw = cli(&["logs", &id, "--raw"]);
    assert!(raw.contains(hostile.trim_start_matches("stdout: ")), "--raw prints the bytes:\n{raw}");
}

/// Finding 5 of the security review: the log cap counted output only (40 entries with a 1 MiB
/// command each grew the data directory by 40 MiB past a 16 MiB cap), and heartbeats stored any
/// number of executor names of any size. Everything a client makes the coordinator store counts.
#[test]
fn every_byte_a_client_stores_counts_against_a_cap() {
    let c = Coordinator::start();
    let id = c.submit(Coordinator::simple_job());
    let ex = c.executor("host-1");
    ex.heartbeat("batches", &[]);
    let got = ex.dequeue("batches", "").expect("a job");
    let mut codes = Vec::new();
    let mut refusal = String::new();
    for i in 0..40 {
        let mut body = entry_body("host-1", id, "");
        body["key"] = json!(format!("step.docker.{i}"));
        body["command"] = json!(["sh", "-c", "x".repeat(256 << 10)]);
        let (code, text) = ex.job_call("batches", &got, "addExecutionLogEntry", body);
        if code != 200 {
            refusal = text;
        }
        codes.push(code);
    }
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 3, "{codes:?}");
    assert!(codes[3..].iter().all(|c| *c == 413), "{codes:?}");
    assert!(refusal.contains("log cap"), "{refusal}");
    let stored: usize = c.job(id)["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap().len() + e["command"].to_string().len())
        .sum();
    assert!(stored <= 1 << 20, "{stored} bytes of keys and commands stored past their cap of 1 MiB");
    // A failure message is cut, not stored whole.
    assert_eq!(ex.mark("batches", &got, "markFailed", &"m".repeat(1 << 20)), 204);
    let msg = c.job(id)["failureMessage"].as_str().unwrap().to_string();
    assert!(msg.len() < 17 << 10 && msg.ends_with("truncated at 16384 bytes]"), "{} bytes", msg.len());

    // Heartbeats: a field too long, a body too large, too many names.
    let hb = |name: &str, extra: usize| {
        c.executor(name).post(
            "batches/heartbeat",
            &json!({"executorName": name, "version": "V2", "jobIds": [], "os": "linux",
                    "architecture": "amd64", "executorVersion": "x".repeat(extra)}),
        )
    };
    let (code, text) = hb("host-2", 300);
    assert_eq!(code, 413, "{text}");
    assert!(text.contains("executorVersion"), "{text}");
    // A body past the limit: 413, or the connection closed while the client still sent it.
    let big = json!({"executorName": "host-2", "version": "V2", "jobIds": [], "os": "x".repeat(1 << 20)});
    let sent = ureq::post(&format!("{}/.executors/queue/batches/heartbeat", c.url))
        .set("Authorization", &format!("token-executor {}", c.secret))
        .set("Content-Type", "application/json")
        .send_string(&big.to_string());
    match sent {
        Ok(r) => panic!("a 1 MiB heartbeat was accepted: {}", r.status()),
        Err(ureq::Error::Status(code, r)) => {
            assert_eq!(code, 413, "{}", r.into_string().unwrap_or_default())
        }
        Err(ureq::Error::Transport(_)) => {}
    }
    for i in 0..999 {
        let (code, text) = hb(&format!("many-{i}"), 0);
        assert_eq!(code, 200, "executor {i}: {text}");
    }
    let (code, text) = hb("one-too-many", 0);
    assert_eq!(code, 413, "{text}");
    assert!(text.contains("1000 executors"), "{text}");
    assert_eq!(hb("many-5", 0).0, 200, "a known executor still heartbeats");
}

/// Finding 9 of the security review, defence in depth: the coordinator stored whatever output an
/// executor sent, secrets included, and its admin views showed registry credentials and job
/// file contents in clear. It applies the job's `redactedValues` again to what it stores and
/// shows (a secret split across two appends included), and shows lengths and digests instead.
#[test]
fn coordinator_redacts_again_and_admin_views_show_no_secret() {
    let c = Coordinator::start();
    let mut job = Coordinator::simple_job();
    job["redactedValues"] = json!({"hunter2-secret": "PASSWORD_REMOVED"});
    job["version"] = json!(2);
    // Version 2: contents in base64 ("file-secret-content").
    job["files"] = json!({"key.pem": {"content": "ZmlsZS1zZWNyZXQtY29udGVudA=="}});
    job["dockerAuthConfig"] = json!({"auths": {"registry.example": {"auth": "docker-auth-secret"}}});
    let id = c.submit(job);
    let ex = c.executor("host-1");
    ex.heartbeat("batches", &[]);
    let got = ex.dequeue("batches", "").expect("a job");
    let mut body = entry_body("host-1", id, "stdout: the value is hunter2-secret\nstdout: split hunter2-");
    body["command"] = json!(["sh", "-c", "echo hunter2-secret"]);
    assert_eq!(ex.job_call("batches", &got, "addExecutionLogEntry", body).0, 200);
    let mut upd = entry_body("host-1", id, "secret here\n");
    upd["entryId"] = json!(1);
    upd["append"] = json!(true);
    upd["command"] = json!(["sh", "-c", "echo hunter2-secret"]);
    assert_eq!(ex.job_call("batches", &got, "updateExecutionLogEntry", upd).0, 204);
    let shown = c.job(id);
    let text = shown.to_string();
    for secret in ["hunter2-secret", "ZmlsZS1zZWNyZXQtY29udGVudA", "docker-auth-secret"] {
        assert!(!text.contains(secret), "{secret} in the admin view: {text}");
    }
    let out = shown["logs"][0]["out"].as_str().unwrap();
    assert!(
        out.contains("the value is PASSWORD_REMOVED") && out.contains("split PASSWORD_REMOVED here"),
        "{out}"
    );
    assert_eq!(shown["logs"][0]["command"][2], "echo PASSWORD_REMOVED");
    assert_eq!(shown["job"]["files"]["key.pem"]["content"]["bytes"], 19, "{text}");
    assert!(shown["job"]["dockerAuthConfig"]["sha256"].is_string(), "{text}");
    // The executor still gets what it needs.
    assert!(got.to_string().contains("docker-auth-secret"));
    // Nor does the follow show it.
    let o = Exec::new().with(|cmd| c.admin_env(cmd)).args(["queue", "logs", &id.to_string(), "--json"]).run();
    let follow = String::from_utf8_lossy(&o.stdout);
    assert!(!follow.contains("hunter2-secret") && follow.contains("PASSWORD_REMOVED"), "{follow}");
}
