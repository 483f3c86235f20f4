//! Prometheus text metrics of the coordinator: jobs per queue and state, each queue's
//! autoscaling gauges, dequeue latency, active executors, and a few counters. No client library: the exposition format is simple.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// A fixed-bucket histogram of durations.
#[derive(Default)]
pub(super) struct Histogram {
    buckets: [AtomicU64; 16],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub(super) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        for (i, le) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"{le}\"}} {}",
                self.buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// The server's counters.
#[derive(Default)]
pub(super) struct Metrics {
    /// Dequeues that returned a job: time from request to answer (long-poll wait included).
    pub dequeue_job: Histogram,
    /// Dequeues that answered 204.
    pub dequeue_empty: Histogram,
    pub jobs_submitted: AtomicU64,
    pub jobs_reset: AtomicU64,
}

impl Metrics {
    /// Renders everything; `counts` and `active` come from the store at scrape time.
    pub(super) fn render(
        &self,
        counts: &[(String, super::store::JobState, i64)],
        queues: &[String],
        active: i64,
        gauges: &[super::store::QueueGauge],
    ) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP executor_queue_jobs Jobs per queue and state.\n# TYPE executor_queue_jobs gauge\n",
        );
        for q in queues {
            for s in super::store::JobState::ALL {
                let n = counts.iter().find(|(cq, cs, _)| cq == q && *cs == s).map(|c| c.2).unwrap_or(0);
                let _ = writeln!(out, "executor_queue_jobs{{queue=\"{q}\",state=\"{s}\"}} {n}");
            }
        }
        // What autoscalers scale on, one family each (docs/coordinator.md).
        type Figure = fn(&super::store::QueueGauge) -> f64;
        let families: [(&str, &str, Figure); 4] = [
            ("executor_queue_depth", "Queued jobs per queue.", |g| g.queued as f64),
            (
                "executor_queue_oldest_queued_age_seconds",
                "Age of the oldest queued job per queue (0 with none queued).",
                |g| g.oldest_queued_seconds,
            ),
            ("executor_queue_running_jobs", "Jobs executors are running, per queue.", |g| g.running as f64),
            (
                "executor_queue_executors",
                "Executors seen within the active window that take jobs from the queue.",
                |g| g.executors as f64,
            ),
        ];
        for (name, help, figure) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for g in gauges {
                let _ = writeln!(out, "{name}{{queue=\"{}\"}} {}", g.name, figure(g));
            }
        }
        out.push_str(
            "# HELP executor_queue_dequeue_duration_seconds Time to answer a dequeue, by result.\n\
             # TYPE executor_queue_dequeue_duration_seconds histogram\n",
        );
        self.dequeue_job.render(&mut out, "executor_queue_dequeue_duration_seconds", "result=\"job\"");
        self.dequeue_empty.render(&mut out, "executor_queue_dequeue_duration_seconds", "result=\"empty\"");
        out.push_str(
            "# HELP executor_queue_active_executors Executors seen in the last 15 s.\n\
             # TYPE executor_queue_active_executors gauge\n",
        );
        let _ = writeln!(out, "executor_queue_active_executors {active}");
        for (name, help, v) in [
            ("executor_queue_jobs_submitted_total", "Jobs submitted since start.", &self.jobs_submitted),
            (
                "executor_queue_stalled_resets_total",
                "Stalled jobs reset or failed since start.",
                &self.jobs_reset,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        out
    }
}

/// The metrics executors sent in their heartbeats, as one exposition: each family once (HELP
/// and TYPE from the first executor that described it), every sample with `executor="<name>"`
/// added to its own labels. Families named like the coordinator's own (`executor_queue_`) are
/// left out so that no family appears twice.
pub(super) fn merge_executor_metrics(per_executor: &[(String, String)]) -> String {
    use crate::base::metrics::{add_label, line_name};
    struct Family {
        help: Option<String>,
        kind: Option<String>,
        samples: Vec<String>,
    }
    let mut order: Vec<String> = Vec::new();
    let mut fams: std::collections::HashMap<String, Family> = std::collections::HashMap::new();
    for (executor, text) in per_executor {
        let mut current: Option<String> = None;
        for line in text.lines() {
            let Some(name) = line_name(line) else { continue };
            let family = if line.starts_with('#') {
                name.to_string()
            } else {
                match &current {
                    Some(c)
                        if name == c || name.strip_prefix(c.as_str()).is_some_and(|r| r.starts_with('_')) =>
                    {
                        c.clone()
                    }
                    _ => name.to_string(),
                }
            };
            if family.starts_with("executor_queue_") {
                continue;
            }
            current = Some(family.clone());
            let f = fams.entry(family.clone()).or_insert_with(|| {
                order.push(family.clone());
                Family { help: None, kind: None, samples: Vec::new() }
            });
            if line.starts_with("# HELP ") {
                f.help.get_or_insert_with(|| line.to_string());
            } else if line.starts_with("# TYPE ") {
                f.kind.get_or_insert_with(|| line.to_string());
            } else {
                f.samples.push(add_label(line, "executor", executor));
            }
        }
    }
    let mut out = String::new();
    for name in order {
        let Some(f) = fams.get(&name) else { continue };
        for l in f.help.iter().chain(f.kind.iter()).chain(f.samples.iter()) {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// A few figures for people from one executor's heartbeat metrics (the console's executors
/// page): jobs by outcome, running jobs, steps and boots with their mean time, log bytes sent
/// and errors. Samples of other families, and unparsable lines, are passed over.
pub(super) fn executor_figures(text: &str) -> Vec<String> {
    use crate::api::metrics as m;
    use crate::base::metrics::line_name;
    let mut outcomes: Vec<(String, f64)> = Vec::new();
    let mut sums: std::collections::HashMap<&str, f64> = std::collections::HashMap::new();
    for line in text.lines() {
        let Some(name) = line_name(line).filter(|_| !line.starts_with('#')) else { continue };
        let Some(value) = line.rsplit(char::is_whitespace).next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        if !value.is_finite() {
            continue;
        }
        if name == m::JOBS {
            let outcome = line
                .split("outcome=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("other")
                .to_string();
            match outcomes.iter_mut().find(|(o, _)| *o == outcome) {
                Some((_, n)) => *n += value,
                None => outcomes.push((outcome, value)),
            }
            continue;
        }
        for key in [
            m::RUNNING,
            m::LOG_BYTES,
            m::DEQUEUE_ERRORS,
            m::HEARTBEAT_ERRORS,
            "executor_step_duration_seconds_count",
            "executor_step_duration_seconds_sum",
            "executor_sandbox_boot_duration_seconds_count",
            "executor_sandbox_boot_duration_seconds_sum",
        ] {
            if name == key {
                *sums.entry(key).or_default() += value;
            }
        }
    }
    let get = |k: &str| sums.get(k).copied();
    let mut out = Vec::new();
    if !outcomes.is_empty() {
        outcomes.sort_by(|a, b| a.0.cmp(&b.0));
        let parts: Vec<String> = outcomes.iter().map(|(o, n)| format!("{n:.0} {o}")).collect();
        out.push(format!("jobs: {}", parts.join(", ")));
    }
    if let Some(n) = get(m::RUNNING) {
        out.push(format!("running: {n:.0}"));
    }
    for (what, count, sum) in [
        ("steps", "executor_step_duration_seconds_count", "executor_step_duration_seconds_sum"),
        (
            "boots",
            "executor_sandbox_boot_duration_seconds_count",
            "executor_sandbox_boot_duration_seconds_sum",
        ),
    ] {
        if let (Some(c), Some(s)) = (get(count), get(sum)) {
            if c > 0.0 {
                out.push(format!("{what}: {c:.0}, mean {:.2} s", s / c));
            }
        }
    }
    if let Some(b) = get(m::LOG_BYTES) {
        out.push(format!("log sent: {}", crate::base::units::format_bytes(b as u64)));
    }
    let errors = get(m::DEQUEUE_ERRORS).unwrap_or(0.0) + get(m::HEARTBEAT_ERRORS).unwrap_or(0.0);
    if errors > 0.0 {
        out.push(format!("errors: {errors:.0}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executor_metrics_merge_by_family_with_an_executor_label() {
        let a = "# HELP executor_jobs_total Jobs.\n# TYPE executor_jobs_total counter\n\
                 executor_jobs_total{queue=\"batches\",outcome=\"completed\"} 2\n\
                 # TYPE executor_step_duration_seconds histogram\n\
                 executor_step_duration_seconds_bucket{le=\"+Inf\"} 1\nexecutor_step_duration_seconds_count 1\n\
                 executor_queue_jobs 99\n";
        let b = "# HELP executor_jobs_total Jobs.\n# TYPE executor_jobs_total counter\n\
                 executor_jobs_total{queue=\"batches\",outcome=\"failed\"} 1\nnode_load1 0.5\n";
        let text = merge_executor_metrics(&[("e-a".into(), a.into()), ("e-b".into(), b.into())]);
        assert_eq!(
            text,
            "# HELP executor_jobs_total Jobs.\n# TYPE executor_jobs_total counter\n\
             executor_jobs_total{executor=\"e-a\",queue=\"batches\",outcome=\"completed\"} 2\n\
             executor_jobs_total{executor=\"e-b\",queue=\"batches\",outcome=\"failed\"} 1\n\
             # TYPE executor_step_duration_seconds histogram\n\
             executor_step_duration_seconds_bucket{executor=\"e-a\",le=\"+Inf\"} 1\n\
             executor_step_duration_seconds_count{executor=\"e-a\"} 1\n\
             node_load1{executor=\"e-b\"} 0.5\n"
        );
    }

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.dequeue_job.observe(Duration::from_micros(700));
        m.dequeue_job.observe(Duration::from_millis(20));
        let text = m.render(
            &[("batches".into(), crate::server::store::JobState::Queued, 3)],
            &["batches".into()],
            1,
            &[crate::server::store::QueueGauge {
                name: "batches".into(),
                queued: 3,
                oldest_queued_seconds: 12.5,
                running: 2,
                executors: 0,
            }],
        );
        assert!(
            text.contains("# TYPE executor_queue_depth gauge\nexecutor_queue_depth{queue=\"batches\"} 3\n")
        );
        assert!(text.contains("executor_queue_oldest_queued_age_seconds{queue=\"batches\"} 12.5\n"));
        assert!(text.contains("executor_queue_running_jobs{queue=\"batches\"} 2\n"));
        assert!(text.contains("executor_queue_executors{queue=\"batches\"} 0\n"));
        assert!(text.contains("executor_queue_jobs{queue=\"batches\",state=\"queued\"} 3"), "{text}");
        assert!(text.contains("executor_queue_jobs{queue=\"batches\",state=\"failed\"} 0"));
        assert!(text.contains("result=\"job\",le=\"0.001\"} 1"));
        assert!(text.contains("result=\"job\",le=\"0.025\"} 2"));
        assert!(text.contains("executor_queue_active_executors 1"));
    }

    #[test]
    fn figures_for_people_from_an_executors_metrics() {
        let text = "# TYPE executor_jobs_total counter\n\
executor_jobs_total{queue=\"batches\",outcome=\"completed\"} 3\n\
executor_jobs_total{queue=\"codeintel\",outcome=\"completed\"} 2\n\
executor_jobs_total{queue=\"batches\",outcome=\"errored\"} 1\n\
executor_jobs_running 2\n\
executor_step_duration_seconds_bucket{runtime=\"oci\",le=\"+Inf\"} 4\n\
executor_step_duration_seconds_sum{runtime=\"oci\",result=\"ok\"} 3\n\
executor_step_duration_seconds_count{runtime=\"oci\",result=\"ok\"} 4\n\
executor_log_bytes_sent_total 2097152\n\
executor_dequeue_errors_total 0\n\
node_load1 NaN\n\
garbage line\n";
        assert_eq!(
            executor_figures(text),
            ["jobs: 5 completed, 1 errored", "running: 2", "steps: 4, mean 0.75 s", "log sent: 2 MiB"]
        );
        assert!(executor_figures("").is_empty());
    }
}
