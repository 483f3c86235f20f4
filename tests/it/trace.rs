//! OpenTelemetry traces: a coordinator and an executor `loop` that export to a small OTLP/HTTP
//! collector this test runs on loopback (opentelemetry-proto's messages, decoded with prost)
//! make one trace of a job, from the submitter's span through the submit, the queue wait, the
//! stages and each step to the completion, with the right parents and no secret.

use crate::common;
use crate::coordinator::Coordinator;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The spans received, with the service that sent them.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

/// An OTLP/HTTP collector on loopback: takes `POST /v1/traces` (protobuf) and keeps the spans.
struct Collector {
    url: String,
    spans: Received,
}

impl Collector {
    fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let spans = Received::default();
        let kept = spans.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let kept = kept.clone();
                std::thread::spawn(move || serve(conn, &kept));
            }
        });
        Collector { url, spans }
    }

    fn spans(&self) -> Vec<(String, Span)> {
        self.spans.lock().unwrap().clone()
    }
}

/// Answers the requests of one connection (keep-alive) until it closes.
fn serve(conn: TcpStream, kept: &Received) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let request = line.trim().to_string();
        let mut length = 0usize;
        let mut content_type = String::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim();
            if h.is_empty() {
                break;
            }
            let (name, value) = h.split_once(':').unwrap_or((h, ""));
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap(),
                "content-type" => content_type = value.trim().to_string(),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        assert_eq!(request, "POST /v1/traces HTTP/1.1");
        assert_eq!(content_type, "application/x-protobuf");
        let req = ExportTraceServiceRequest::decode(body.as_slice()).expect("an OTLP trace export");
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| text(a.value.as_ref()?.value.as_ref()?))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                kept.lock().unwrap().extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        // An empty ExportTraceServiceResponse.
        let reply = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if conn.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

fn text(v: &Any) -> Option<String> {
    match v {
        Any::StringValue(s) => Some(s.clone()),
        Any::IntValue(i) => Some(i.to_string()),
        Any::BoolValue(b) => Some(b.to_string()),
        _ => None,
    }
}

fn attrs(s: &Span) -> HashMap<String, String> {
    s.attributes
        .iter()
        .filter_map(|a| Some((a.key.clone(), text(a.value.as_ref()?.value.as_ref()?)?)))
        .collect()
}

#[test]
fn a_job_is_one_trace_from_submit_to_completion() {
    let collector = Collector::start();
    let endpoint = collector.url.clone();
    // The batch processor sends within 100 ms rather than 5 s.
    let c = Coordinator::start_with_env(&[
        ("EXECUTOR_OTLP_ENDPOINT", &endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let (repo, _, commit) = crate::gitserve::make_repo(tmp.path(), "origin");
    common::Exec::new()
        .with(|cmd| c.admin_env(cmd))
        .args(["queue", "repo", "add", "github.com/acme/traced", repo.to_str().unwrap()])
        .run();
    let secret = "tr4ce-s3cret-value";
    // The submitter's own span, which the whole job continues.
    let submitter = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let id = c.submit(json!({
        "repositoryName": "github.com/acme/traced", "commit": commit, "traceparent": submitter,
        "dockerSteps": [
            {"key": "first", "image": "alpine", "dir": "", "env": [format!("TOKEN={secret}")], "commands": ["cat a.txt"]},
            {"key": "second", "image": "alpine", "dir": "", "env": [], "commands": ["true"]}
        ],
        "redactedValues": {secret: "[SECRET]"}
    }));
    let state = tempfile::tempdir().unwrap();
    let mut cmd = common::executor();
    c.executor_env(&mut cmd);
    cmd.env("EXECUTOR_QUEUE_NAME", "batches")
        .env("EXECUTOR_RUNTIME", "shell")
        .env("EXECUTOR_ALLOW_UNISOLATED", "1")
        .env("EXECUTOR_STATE_DIR", state.path())
        .env("EXECUTOR_NUM_TOTAL_JOBS", "1")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .arg("loop")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut lp = cmd.spawn().expect("starting executor loop");
    let (status, stderr) = common::wait_exit(&mut lp, Duration::from_secs(120));
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("exporting traces to http://127.0.0.1:"), "{stderr}");
    let job = c.wait_state(id, &["completed", "failed", "errored"], Duration::from_secs(10));
    assert_eq!(job["state"], "completed", "{job:#}");

    // The executor sent its spans before it exited; the coordinator's come within 100 ms.
    let wanted = ["submit", "job", "queue-wait", "dequeue", "prepare-workspace", "clone", "vm-boot", "boot"];
    common::wait_until("the spans of the job", Duration::from_secs(10), || {
        let got = collector.spans();
        wanted.iter().all(|w| got.iter().any(|(_, s)| s.name == *w))
    });
    let spans = collector.spans();
    let names: Vec<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
    let one = |name: &str| -> &(String, Span) {
        let found: Vec<_> = spans.iter().filter(|(_, s)| s.name == name).collect();
        assert_eq!(found.len(), 1, "one {name} span: {names:?}");
        found[0]
    };
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();

    // One trace: the submitter's.
    for (_, s) in &spans {
        assert_eq!(hex(&s.trace_id), "0af7651916cd43dd8448eb211c80319c", "{} is of another trace", s.name);
    }
    let (service, submit) = one("submit");
    assert_eq!(service, "executor-queue");
    assert_eq!(hex(&submit.parent_span_id), "b7ad6b7169203331", "submit continues the submitter's span");
    assert_eq!(attrs(submit)["executor.job.id"], id.to_string());
    let (service, job_span) = one("job");
    assert_eq!(service, "executor");
    assert_eq!(job_span.parent_span_id, submit.span_id, "the executor's job is the submit's child");
    let a = attrs(job_span);
    assert_eq!(a["executor.job.id"], id.to_string());
    assert_eq!(a["executor.queue"], "batches");
    assert_eq!(a["executor.repository"], "github.com/acme/traced");
    assert_eq!(a["executor.runtime"], "shell");
    assert_eq!(a["executor.outcome"], "completed");

    // The job's children, in the order they began (the queue wait from the submit on).
    let child_of = |parent: &Span| -> Vec<&Span> {
        let mut c: Vec<&Span> =
            spans.iter().map(|(_, s)| s).filter(|s| s.parent_span_id == parent.span_id).collect();
        c.sort_by_key(|s| (s.start_time_unix_nano, s.end_time_unix_nano));
        c
    };
    let order: Vec<&str> = child_of(job_span).iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        order,
        ["queue-wait", "dequeue", "prepare-workspace", "vm-boot", "run-steps", "upload", "complete"],
        "{names:?}"
    );
    let wait = &one("queue-wait").1;
    assert!(wait.start_time_unix_nano >= submit.start_time_unix_nano);
    assert_eq!(
        wait.start_time_unix_nano, job_span.start_time_unix_nano,
        "the job's span starts at its submit"
    );
    for s in child_of(job_span) {
        assert!(
            s.end_time_unix_nano >= s.start_time_unix_nano
                && s.end_time_unix_nano <= job_span.end_time_unix_nano
        );
    }
    // Inside the stages.
    let clone = &one("clone").1;
    assert_eq!(clone.parent_span_id, one("prepare-workspace").1.span_id);
    let a = attrs(clone);
    assert_eq!((a["executor.clone.cache"].as_str(), a["executor.clone.template"].as_str()), ("miss", "miss"));
    assert_eq!(one("boot").1.parent_span_id, one("vm-boot").1.span_id);
    let steps: Vec<(&str, String)> = child_of(&one("run-steps").1)
        .iter()
        .map(|s| (s.name.as_str(), attrs(s)["executor.step.exit_code"].clone()))
        .collect();
    assert_eq!(steps, [("step.docker.first", "0".to_string()), ("step.docker.second", "0".to_string())]);

    // No secret anywhere in what was exported.
    for (_, s) in &spans {
        let shown = format!("{s:?}");
        assert!(!shown.contains(secret) && !shown.contains(&c.secret), "{shown}");
    }
}
