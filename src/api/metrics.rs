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
    Def { name: POOL_BOOTING, help: "Pool microVMs booting now.", kind: Kind::Gauge, labels: &[] },
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
];

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
