//! The executor's own metrics (jobs, steps, boots, log bytes, errors) and what a heartbeat's
//! `prometheusMetrics` carries: them, plus node_exporter's and the registry mirror's when
//! configured, scraped with a 2 s timeout and without their `go_`, `promhttp_` and `process_`
//! families. A failed scrape leaves its part out; it never fails the heartbeat.

use std::sync::OnceLock;
use std::time::Duration;

use crate::base::metrics::{add_label, line_name, Def, Kind, Registry};

pub(crate) const JOBS: &str = "executor_jobs_total";
pub(crate) const RUNNING: &str = "executor_jobs_running";
pub(crate) const STEP_SECONDS: &str = "executor_step_duration_seconds";
pub(crate) const BOOT_SECONDS: &str = "executor_sandbox_boot_duration_seconds";
pub(crate) const LOG_BYTES: &str = "executor_log_bytes_sent_total";
pub(crate) const DEQUEUE_ERRORS: &str = "executor_dequeue_errors_total";
pub(crate) const HEARTBEAT_ERRORS: &str = "executor_heartbeat_errors_total";
pub(crate) const POOL_SIZE: &str = "executor_vm_pool_size";
pub(crate) const POOL_READY: &str = "executor_vm_pool_ready";
pub(crate) const POOL_BOOTING: &str = "executor_vm_pool_booting";
pub(crate) const POOL_IDLE_BYTES: &str = "executor_vm_pool_idle_resident_bytes";
pub(crate) const POOL_CLAIMS: &str = "executor_vm_pool_claims_total";
pub(crate) const POOL_DISCARDED: &str = "executor_vm_pool_discarded_total";
pub(crate) const POOL_BOOT_SECONDS: &str = "executor_vm_pool_boot_duration_seconds";
pub(crate) const EGRESS: &str = "executor_egress_total";
pub(crate) const EGRESS_BYTES: &str = "executor_egress_bytes_total";

// Sourcegraph's names (its executor's workerutil, command and API client metrics), which its
// Executor dashboard and alerts read (monitoring/definitions/executor.go): each `_total` counts
// every operation, `_errors_total` the failed ones, `_duration_seconds` times the successful ones.
pub(crate) const SG_PROCESSOR: &str = "src_executor_processor_total";
pub(crate) const SG_PROCESSOR_ERRORS: &str = "src_executor_processor_errors_total";
pub(crate) const SG_PROCESSOR_SECONDS: &str = "src_executor_processor_duration_seconds";
pub(crate) const SG_PROCESSOR_HANDLERS: &str = "src_executor_processor_handlers";
pub(crate) const SG_COMMAND: &str = "src_apiworker_command_total";
pub(crate) const SG_COMMAND_ERRORS: &str = "src_apiworker_command_errors_total";
pub(crate) const SG_COMMAND_SECONDS: &str = "src_apiworker_command_duration_seconds";
pub(crate) const SG_QUEUE_CLIENT: &str = "src_apiworker_apiclient_queue_total";
pub(crate) const SG_QUEUE_CLIENT_ERRORS: &str = "src_apiworker_apiclient_queue_errors_total";
pub(crate) const SG_QUEUE_CLIENT_SECONDS: &str = "src_apiworker_apiclient_queue_duration_seconds";
pub(crate) const SG_FILES_CLIENT: &str = "src_apiworker_apiclient_files_total";
pub(crate) const SG_FILES_CLIENT_ERRORS: &str = "src_apiworker_apiclient_files_errors_total";
pub(crate) const SG_FILES_CLIENT_SECONDS: &str = "src_apiworker_apiclient_files_duration_seconds";
pub(crate) const SG_VMS: &str = "src_executor_vms_total";

/// Sourcegraph's job duration buckets (30 s to 1 h).
const SG_JOB_BUCKETS: &[f64] =
    &[30.0, 60.0, 150.0, 300.0, 450.0, 600.0, 900.0, 1200.0, 1800.0, 2700.0, 3600.0];
/// Prometheus's default buckets, which Sourcegraph's operation metrics use.
const SG_OP_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// One of Sourcegraph's RED families: (total, errors, duration).
type Red = (&'static str, &'static str, &'static str);
const SG_COMMAND_RED: Red = (SG_COMMAND, SG_COMMAND_ERRORS, SG_COMMAND_SECONDS);
const SG_QUEUE_RED: Red = (SG_QUEUE_CLIENT, SG_QUEUE_CLIENT_ERRORS, SG_QUEUE_CLIENT_SECONDS);
const SG_FILES_RED: Red = (SG_FILES_CLIENT, SG_FILES_CLIENT_ERRORS, SG_FILES_CLIENT_SECONDS);

const STEP_BUCKETS: &[f64] =
    &[0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];
const BOOT_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

static DEFS: &[Def] = &[
    Def {
        name: JOBS,
        help: "Jobs finished by this executor, by queue and reported outcome.",
        kind: Kind::Counter,
        labels: &["queue", "outcome"],
    },
    Def { name: RUNNING, help: "Jobs this executor runs now.", kind: Kind::Gauge, labels: &[] },
    Def {
        name: STEP_SECONDS,
        help: "Duration of job steps, by runtime and whether the step exited 0.",
        kind: Kind::Histogram(STEP_BUCKETS),
        labels: &["runtime", "result"],
    },
    Def {
        name: BOOT_SECONDS,
        help: "Time to start a job's sandbox, by runtime and result.",
        kind: Kind::Histogram(BOOT_BUCKETS),
        labels: &["runtime", "result"],
    },
    Def {
        name: LOG_BYTES,
        help: "Bytes of step output sent in execution log entries.",
        kind: Kind::Counter,
        labels: &[],
    },
    Def { name: DEQUEUE_ERRORS, help: "Dequeue requests that failed.", kind: Kind::Counter, labels: &[] },
    Def { name: HEARTBEAT_ERRORS, help: "Heartbeats that failed.", kind: Kind::Counter, labels: &[] },
    Def {
        name: POOL_SIZE,
        help: "Idle microVMs the pool keeps booted ahead of demand (EXECUTOR_VM_POOL_SIZE).",
        kind: Kind::Gauge,
        labels: &[],
    },
    Def {
        name: POOL_READY,
        help: "Pool microVMs booted and waiting for a job.",
        kind: Kind::Gauge,
        labels: &[],
    },
    Def {
        name: POOL_BOOTING,
        help: "Pool microVMs being booted or restored now.",
        kind: Kind::Gauge,
        labels: &[],
    },
    Def {
        name: POOL_IDLE_BYTES,
        help: "Resident memory of the idle pool microVMs (QEMU), in bytes.",
        kind: Kind::Gauge,
        labels: &[],
    },
    Def {
        name: POOL_CLAIMS,
        help: "microVM jobs that took a pool VM (hit) or booted their own (miss).",
        kind: Kind::Counter,
        labels: &["result"],
    },
    Def {
        name: POOL_DISCARDED,
        help: "Pool microVMs destroyed unused because their kernel, limits or images changed.",
        kind: Kind::Counter,
        labels: &[],
    },
    Def {
        name: POOL_BOOT_SECONDS,
        help: "Time to boot a pool microVM, off any job's path, by result.",
        kind: Kind::Histogram(BOOT_BUCKETS),
        labels: &["result"],
    },
    Def {
        name: SG_PROCESSOR,
        help: "Jobs handled, by queue (Sourcegraph's name).",
        kind: Kind::Counter,
        labels: &["queue"],
    },
    Def {
        name: SG_PROCESSOR_ERRORS,
        help: "Jobs that ended errored or failed, by queue (Sourcegraph's name).",
        kind: Kind::Counter,
        labels: &["queue"],
    },
    Def {
        name: SG_PROCESSOR_SECONDS,
        help: "Duration of the jobs that completed, by queue (Sourcegraph's name).",
        kind: Kind::Histogram(SG_JOB_BUCKETS),
        labels: &["queue"],
    },
    Def {
        name: SG_PROCESSOR_HANDLERS,
        help: "Jobs running now, by queue (Sourcegraph's name).",
        kind: Kind::Gauge,
        labels: &["queue"],
    },
    Def {
        name: SG_COMMAND,
        help:
            "Commands of jobs (log entries: setup.*, exec for steps, teardown.*), by op (Sourcegraph's name).",
        kind: Kind::Counter,
        labels: &["op"],
    },
    Def {
        name: SG_COMMAND_ERRORS,
        help: "Commands that failed, by op (Sourcegraph's name).",
        kind: Kind::Counter,
        labels: &["op"],
    },
    Def {
        name: SG_COMMAND_SECONDS,
        help: "Duration of the commands that succeeded, by op (Sourcegraph's name).",
        kind: Kind::Histogram(SG_OP_BUCKETS),
        labels: &["op"],
    },
    Def {
        name: SG_QUEUE_CLIENT,
        help: "Requests to the coordinator's queue routes, by op (Sourcegraph's name).",
        kind: Kind::Counter,
        labels: &["op"],
    },
    Def {
        name: SG_QUEUE_CLIENT_ERRORS,
        help: "Failed requests to the coordinator's queue routes, by op (Sourcegraph's name).",
        kind: Kind::Counter,
        labels: &["op"],
    },
    Def {
        name: SG_QUEUE_CLIENT_SECONDS,
        help: "Duration of successful requests to the queue routes, by op (Sourcegraph's name).",
        kind: Kind::Histogram(SG_OP_BUCKETS),
        labels: &["op"],
    },
    Def {
        name: SG_FILES_CLIENT,
        help: "Requests to the coordinator's files routes, by op (Sourcegraph's name).",
        kind: Kind::Counter,
        labels: &["op"],
    },
    Def {
        name: SG_FILES_CLIENT_ERRORS,
        help: "Failed requests to the coordinator's files routes, by op (Sourcegraph's name).",
        kind: Kind::Counter,
        labels: &["op"],
    },
    Def {
        name: SG_FILES_CLIENT_SECONDS,
        help: "Duration of successful requests to the files routes, by op (Sourcegraph's name).",
        kind: Kind::Histogram(SG_OP_BUCKETS),
        labels: &["op"],
    },
    Def {
        name: SG_VMS,
        help: "Job microVMs running now (Sourcegraph's name; 0 under other runtimes).",
        kind: Kind::Gauge,
        labels: &[],
    },
    Def {
        name: EGRESS,
        help: "DNS questions (kind dns) and connections (kind connection) of allowlist jobs, by verdict.",
        kind: Kind::Counter,
        labels: &["kind", "verdict"],
    },
    Def {
        name: EGRESS_BYTES,
        help: "Bytes of the accepted connections of allowlist jobs (IP packets, headers included), sent by the jobs or received by them.",
        kind: Kind::Counter,
        labels: &["direction"],
    },
];

fn red((total, errors, seconds): Red, op: &str, ok: bool, secs: f64) {
    let r = registry();
    r.add(total, &[op], 1.0);
    if ok {
        r.observe(seconds, &[op], secs);
    } else {
        r.add(errors, &[op], 1.0);
    }
}

/// An allowlist job's egress record: its DNS questions and connections by verdict.
/// `verdicts`: (kind, verdict, count); `bytes`: (sent, received) over its accepted connections.
pub(crate) fn egress_done(verdicts: &[(String, String, usize)], bytes: (u64, u64)) {
    for (kind, verdict, n) in verdicts {
        registry().add(EGRESS, &[kind, verdict], *n as f64);
    }
    registry().add(EGRESS_BYTES, &["sent"], bytes.0 as f64);
    registry().add(EGRESS_BYTES, &["received"], bytes.1 as f64);
}

/// A job's log entry ended: Sourcegraph's command metrics, its steps under the op `exec`.
pub(crate) fn command_done(key: &str, exit_code: i32, ms: i64) {
    let op = if key.starts_with("step.") { "exec" } else { key };
    red(SG_COMMAND_RED, op, exit_code == 0, ms as f64 / 1000.0);
}

/// A request to the coordinator ended: Sourcegraph's API client metrics for the routes its
/// executor names (`route` is `METHOD /path`).
pub(crate) fn request_done(route: &str, ok: bool, secs: f64) {
    let path = route.split_once(' ').map_or(route, |(_, p)| p);
    if path.starts_with("/.executors/files/") {
        return red(SG_FILES_RED, "Get", ok, secs);
    }
    let Some(last) = path.strip_prefix("/.executors/queue/").and_then(|p| p.rsplit('/').next()) else {
        return;
    };
    let op = match last {
        "dequeue" => "Dequeue",
        "heartbeat" => "Heartbeat",
        "addExecutionLogEntry" => "AddExecutionLogEntry",
        "updateExecutionLogEntry" => "UpdateExecutionLogEntry",
        "markComplete" => "MarkComplete",
        "markErrored" => "MarkErrored",
        "markFailed" => "MarkFailed",
        _ => return,
    };
    red(SG_QUEUE_RED, op, ok, secs);
}

/// A job ended as `outcome` (`completed`, `errored`, `failed` or `not_reported`) after `secs`:
/// Sourcegraph's processor metrics. A job left unreported (the executor stopped) is counted
/// neither way: the coordinator requeues it.
pub(crate) fn job_done(queue: &str, outcome: &str, secs: f64) {
    let r = registry();
    match outcome {
        "completed" => {
            r.add(SG_PROCESSOR, &[queue], 1.0);
            r.observe(SG_PROCESSOR_SECONDS, &[queue], secs);
        }
        "errored" | "failed" => {
            r.add(SG_PROCESSOR, &[queue], 1.0);
            r.add(SG_PROCESSOR_ERRORS, &[queue], 1.0);
        }
        _ => {}
    }
}

/// This process's registry.
pub(crate) fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| Registry::new(DEFS))
}

/// Exporters whose metrics heartbeats forward (`NODE_EXPORTER_URL`,
/// `DOCKER_REGISTRY_NODE_EXPORTER_URL`): base URLs without the path.
#[derive(Clone, Debug, Default)]
pub(crate) struct Sources {
    pub node_exporter: Option<String>,
    pub registry_exporter: Option<String>,
}

/// Scrape timeout of each exporter, as Sourcegraph's executor uses.
pub(crate) const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// Families of scraped text that are dropped.
const DROPPED: &[&str] = &["go_", "promhttp_", "process_"];

/// The text a heartbeat carries: the registry, then each configured exporter's families
/// (scraped in parallel; a failed scrape is left out).
pub(crate) fn gather(sources: &Sources) -> String {
    let mut out = registry().render();
    let mut targets: Vec<(String, Option<&str>)> = Vec::new();
    if let Some(u) = &sources.node_exporter {
        targets.push((format!("{}/metrics", u.trim_end_matches('/')), None));
    }
    if let Some(u) = &sources.registry_exporter {
        for module in ["registry", "node"] {
            targets.push((
                format!("{}/proxy?module={module}", u.trim_end_matches('/')),
                Some("docker-registry"),
            ));
        }
    }
    if targets.is_empty() {
        return out;
    }
    let agent = ureq::AgentBuilder::new().timeout(SCRAPE_TIMEOUT).redirects(0).build();
    let parts: Vec<Option<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = targets
            .iter()
            .map(|(url, instance)| {
                let agent = agent.clone();
                s.spawn(move || scrape(&agent, url).map(|text| filter(&text, *instance)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().ok().flatten()).collect()
    });
    for text in parts.into_iter().flatten() {
        if !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&text);
    }
    out
}

/// Largest scraped body kept.
const MAX_SCRAPE: u64 = 4 << 20;

fn scrape(agent: &ureq::Agent, url: &str) -> Option<String> {
    use std::io::Read;
    let resp = agent.get(url).call().ok()?;
    let mut text = String::new();
    resp.into_reader().take(MAX_SCRAPE).read_to_string(&mut text).ok()?;
    Some(text)
}

/// Scraped text without the dropped families; with `sg_instance` on each sample when given.
pub(crate) fn filter(text: &str, instance: Option<&str>) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let name = line_name(line);
        if name.is_some_and(|n| DROPPED.iter().any(|p| n.starts_with(p))) {
            continue;
        }
        if name.is_none() && !line.starts_with('#') {
            continue;
        }
        match instance {
            Some(i) => out.push_str(&add_label(line, "sg_instance", i)),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Executor dashboard's queries on the executor's own metrics, as Sourcegraph's
    /// monitoring generator writes them (monitoring/definitions/executor.go and the shared
    /// Standard/Workerutil constructors: `sum%s(increase(src_%s_total{%s}[5m]))`, ...), with the
    /// executor groups' filters. `sg_job` and `sg_instance` are added by the instance to every
    /// sample of a heartbeat, never by an executor.
    const DASHBOARD: &[&str] = &[
        r#"sum(src_executor_processor_handlers{queue=~"${queue:regex}",sg_job=~"^sourcegraph-executors.*"})"#,
        r#"sum(increase(src_executor_processor_total{queue=~"${queue:regex}",sg_job=~"^sourcegraph-executors.*"}[5m]))"#,
        r#"histogram_quantile(0.99, sum by (le)(rate(src_executor_processor_duration_seconds_bucket{queue=~"${queue:regex}",sg_job=~"^sourcegraph-executors.*"}[5m])))"#,
        r#"sum(increase(src_executor_processor_errors_total{queue=~"${queue:regex}",sg_job=~"^sourcegraph-executors.*"}[5m]))"#,
        r#"sum(increase(src_executor_processor_errors_total{queue=~"${queue:regex}",sg_job=~"^sourcegraph-executors.*"}[5m])) / (sum(increase(src_executor_processor_total{queue=~"${queue:regex}",sg_job=~"^sourcegraph-executors.*"}[5m])) + sum(increase(src_executor_processor_errors_total{queue=~"${queue:regex}",sg_job=~"^sourcegraph-executors.*"}[5m]))) * 100"#,
        r#"sum by (op)(increase(src_apiworker_apiclient_queue_total{sg_job=~"^sourcegraph-executors.*"}[5m]))"#,
        r#"histogram_quantile(0.99, sum by (le,op)(rate(src_apiworker_apiclient_queue_duration_seconds_bucket{sg_job=~"^sourcegraph-executors.*"}[5m])))"#,
        r#"sum by (op)(increase(src_apiworker_apiclient_queue_errors_total{sg_job=~"^sourcegraph-executors.*"}[5m]))"#,
        r#"sum by (op)(increase(src_apiworker_apiclient_files_total{sg_job=~"^sourcegraph-executors.*"}[5m]))"#,
        r#"histogram_quantile(0.99, sum by (le,op)(rate(src_apiworker_apiclient_files_duration_seconds_bucket{sg_job=~"^sourcegraph-executors.*"}[5m])))"#,
        r#"sum by (op)(increase(src_apiworker_apiclient_files_errors_total{sg_job=~"^sourcegraph-executors.*"}[5m]))"#,
        r#"sum by (op)(increase(src_apiworker_command_total{op=~"setup.*",sg_job=~"^sourcegraph-executors.*"}[5m]))"#,
        r#"histogram_quantile(0.99, sum by (le,op)(rate(src_apiworker_command_duration_seconds_bucket{op=~"setup.*",sg_job=~"^sourcegraph-executors.*"}[5m])))"#,
        r#"sum by (op)(increase(src_apiworker_command_errors_total{op=~"setup.*",sg_job=~"^sourcegraph-executors.*"}[5m]))"#,
        r#"sum by (op)(increase(src_apiworker_command_total{op=~"exec.*",sg_job=~"^sourcegraph-executors.*"}[5m]))"#,
        r#"histogram_quantile(0.99, sum by (le,op)(rate(src_apiworker_command_duration_seconds_bucket{op=~"exec.*",sg_job=~"^sourcegraph-executors.*"}[5m])))"#,
        r#"sum by (op)(increase(src_apiworker_command_total{op=~"teardown.*",sg_job=~"^sourcegraph-executors.*"}[5m]))"#,
        r#"sum by (op)(increase(src_apiworker_command_errors_total{op=~"teardown.*",sg_job=~"^sourcegraph-executors.*"}[5m]))"#,
        r#"sum(src_executor_vms_total{sg_job=~"^sourcegraph-executors.*"})"#,
    ];

    /// A metric name and its label matchers.
    type Selector = (String, Vec<(String, String)>);

    /// Each `src_…{matchers}` selector of a query, and the labels of its `by (…)` clauses.
    fn selectors(q: &str) -> (Vec<Selector>, Vec<String>) {
        let mut sels = Vec::new();
        let mut rest = q;
        while let Some(i) = rest.find("src_") {
            let tail = &rest[i..];
            let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            let name = tail[..end].to_string();
            let mut matchers = Vec::new();
            if let Some(b) = tail[end..].strip_prefix('{') {
                // The selector ends at the first `}` outside a quoted value.
                let mut quoted = false;
                let close = b
                    .char_indices()
                    .find(|(_, c)| {
                        quoted ^= *c == '"';
                        *c == '}' && !quoted
                    })
                    .map_or(b.len(), |(i, _)| i);
                for m in b[..close].split("\",").filter(|m| !m.is_empty()) {
                    let (k, v) = m.split_once("=~").or_else(|| m.split_once('=')).unwrap();
                    matchers.push((k.trim().to_string(), v.trim().trim_matches('"').to_string()));
                }
            }
            sels.push((name, matchers));
            rest = &tail[end..];
        }
        let mut by = Vec::new();
        let mut rest = q;
        while let Some(i) = rest.find("by (") {
            let tail = &rest[i + 4..];
            let (inner, after) = tail.split_once(')').unwrap();
            by.extend(inner.split(',').map(|l| l.trim().to_string()));
            rest = after;
        }
        (sels, by)
    }

    #[test]
    fn egress_records_count_by_kind_and_verdict() {
        egress_done(
            &[("dns".into(), "refused".into(), 2), ("connection".into(), "accepted".into(), 5)],
            (100, 4096),
        );
        egress_done(&[("dns".into(), "refused".into(), 1)], (20, 0));
        let text = registry().render();
        assert!(text.contains(r#"executor_egress_total{kind="dns",verdict="refused"} 3"#), "{text}");
        assert!(text.contains(r#"executor_egress_total{kind="connection",verdict="accepted"} 5"#), "{text}");
        assert!(text.contains(r#"executor_egress_bytes_total{direction="sent"} 120"#), "{text}");
        assert!(text.contains(r#"executor_egress_bytes_total{direction="received"} 4096"#), "{text}");
    }

    #[test]
    fn sourcegraph_dashboard_queries_find_these_metrics() {
        // One job of each kind of work the dashboard shows.
        command_done("setup.git.fetch", 0, 120);
        command_done("step.docker.0", 1, 900);
        command_done("step.docker.1", 0, 700);
        command_done("teardown.fs", 0, 3);
        command_done("setup.git.checkout", 128, 40);
        command_done("teardown.shell.remove", 1, 2);
        request_done("POST /.executors/queue/batches/dequeue", true, 0.01);
        request_done("POST /.executors/queue/batches/markErrored", false, 0.01);
        request_done("GET /.executors/files/batch-changes/spec/x", true, 0.02);
        request_done("GET /.executors/files/batch-changes/spec/y", false, 0.02);
        request_done("PUT /.executors/queue/batches/artifacts", true, 0.02);
        job_done("batches", "completed", 42.0);
        job_done("batches", "errored", 1.0);
        registry().add(SG_PROCESSOR_HANDLERS, &["batches"], 1.0);
        registry().add(SG_VMS, &[], 1.0);
        let text = registry().render();
        let samples: Vec<Selector> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (series, _) = l.rsplit_once(' ').unwrap();
                let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
                let labels = labels
                    .trim_end_matches('}')
                    .split("\",")
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p.split_once('=').unwrap();
                        (k.to_string(), v.trim_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            })
            .collect();
        let from_instance = ["sg_job", "sg_instance"];
        for q in DASHBOARD {
            let (sels, by) = selectors(q);
            assert!(!sels.is_empty(), "{q}");
            for (name, matchers) in sels {
                let family = name.trim_end_matches("_bucket");
                let def = DEFS
                    .iter()
                    .find(|d| d.name == family)
                    .unwrap_or_else(|| panic!("no family {family}: {q}"));
                for l in by.iter().filter(|l| *l != "le" && !from_instance.contains(&l.as_str())) {
                    assert!(def.labels.contains(&l.as_str()), "{family} lacks label {l}: {q}");
                }
                // A sample of the family that the query's matchers select.
                let found = samples.iter().any(|(n, labels)| {
                    n == &name
                        && matchers.iter().filter(|(k, _)| !from_instance.contains(&k.as_str())).all(
                            |(k, v)| {
                                let got = labels.iter().find(|(lk, _)| lk == k).map(|(_, lv)| lv.as_str());
                                match (got, v.as_str()) {
                                    (Some(_), "${queue:regex}") => true,
                                    (Some(g), pat) if pat.ends_with(".*") => {
                                        g.starts_with(pat.trim_end_matches(".*"))
                                    }
                                    (Some(g), pat) => g == pat,
                                    (None, _) => false,
                                }
                            },
                        )
                });
                assert!(found, "no sample of {name} matches {matchers:?} ({q}):\n{text}");
            }
        }
        // Only the routes Sourcegraph's clients name are counted.
        assert!(!text.contains("artifacts"), "{text}");
        assert!(text.contains("src_apiworker_command_total{op=\"exec\"} "), "{text}");
    }
    use std::io::{BufRead, BufReader, Write};

    #[test]
    fn filter_drops_runtime_families_and_labels_the_registry() {
        let text = "# HELP go_goroutines Goroutines.\n# TYPE go_goroutines gauge\ngo_goroutines 7\n\
                    # HELP node_load1 Load.\n# TYPE node_load1 gauge\nnode_load1 0.5\n\
                    process_cpu_seconds_total 3\npromhttp_metric_handler_requests_total{code=\"200\"} 1\n";
        assert_eq!(filter(text, None), "# HELP node_load1 Load.\n# TYPE node_load1 gauge\nnode_load1 0.5\n");
        assert!(filter(text, Some("docker-registry"))
            .contains("node_load1{sg_instance=\"docker-registry\"} 0.5\n"));
    }

    #[test]
    fn gather_appends_node_exporter_and_survives_a_dead_one() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let seen = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut line = String::new();
            let mut r = BufReader::new(s.try_clone().unwrap());
            r.read_line(&mut line).unwrap();
            loop {
                let mut h = String::new();
                r.read_line(&mut h).unwrap();
                if h.trim().is_empty() {
                    break;
                }
            }
            let body = "# TYPE node_load1 gauge\nnode_load1 0.25\ngo_gc_duration_seconds 1\n";
            write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                .unwrap();
            line
        });
        registry().add(DEQUEUE_ERRORS, &[], 1.0);
        let text = gather(&Sources { node_exporter: Some(url), registry_exporter: None });
        assert!(seen.join().unwrap().starts_with("GET /metrics "));
        assert!(text.contains("# TYPE executor_dequeue_errors_total counter\n"), "{text}");
        assert!(text.contains("node_load1 0.25\n") && !text.contains("go_gc"), "{text}");

        // Nothing listens there any more: the registry alone, at once.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", dead.local_addr().unwrap());
        drop(dead);
        let t = std::time::Instant::now();
        let text = gather(&Sources { node_exporter: Some(url), registry_exporter: None });
        assert!(t.elapsed() < SCRAPE_TIMEOUT + Duration::from_secs(1));
        assert!(text.contains("executor_jobs_running") && !text.contains("node_load1"), "{text}");
    }
}
