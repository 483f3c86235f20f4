//! A small metrics registry (counters, gauges and histograms, each with a fixed set of label
//! names) rendered in the Prometheus text exposition format, version 0.0.4.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// What kind of family a [`Def`] describes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Kind {
    Counter,
    Gauge,
    /// Cumulative buckets with these upper bounds (seconds or any unit), ascending.
    Histogram(&'static [f64]),
}

/// One metric family: name, help text, kind and label names.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Def {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
}

#[derive(Clone, Debug)]
enum Series {
    Value(f64),
    Histogram { buckets: Vec<u64>, sum: f64, count: u64 },
}

/// Families known up front (so a family with no sample yet still has its HELP and TYPE), and
/// their series by label values.
pub(crate) struct Registry {
    defs: &'static [Def],
    series: Mutex<Vec<BTreeMap<Vec<String>, Series>>>,
}

impl Registry {
    /// A registry of `defs`; a family without labels starts with its one series at zero.
    pub(crate) fn new(defs: &'static [Def]) -> Registry {
        let series = defs
            .iter()
            .map(|d| {
                let mut m = BTreeMap::new();
                if d.labels.is_empty() {
                    let s = match d.kind {
                        Kind::Histogram(b) => {
                            Series::Histogram { buckets: vec![0; b.len()], sum: 0.0, count: 0 }
                        }
                        _ => Series::Value(0.0),
                    };
                    m.insert(Vec::new(), s);
                }
                m
            })
            .collect();
        Registry { defs, series: Mutex::new(series) }
    }

    /// Applies `f` to the series of `name` with these label values (in the order of the
    /// family's label names). An unknown name or a wrong number of values is a programming
    /// error: debug builds panic, release builds drop the sample.
    fn with(&self, name: &str, values: &[&str], f: impl FnOnce(&Def, &mut Series)) {
        let Some(i) = self.defs.iter().position(|d| d.name == name) else {
            debug_assert!(false, "unknown metric {name}");
            return;
        };
        let def = &self.defs[i];
        if def.labels.len() != values.len() {
            debug_assert!(false, "metric {name} takes {} labels", def.labels.len());
            return;
        }
        let mut all = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        let s = all[i].entry(key).or_insert_with(|| match def.kind {
            Kind::Histogram(b) => Series::Histogram { buckets: vec![0; b.len()], sum: 0.0, count: 0 },
            _ => Series::Value(0.0),
        });
        f(def, s);
    }

    /// Adds `by` to a counter or a gauge.
    pub(crate) fn add(&self, name: &str, values: &[&str], by: f64) {
        self.with(name, values, |_, s| {
            if let Series::Value(v) = s {
                *v += by;
            }
        });
    }

    /// Sets a gauge.
    pub(crate) fn set(&self, name: &str, values: &[&str], to: f64) {
        self.with(name, values, |_, s| {
            if let Series::Value(v) = s {
                *v = to;
            }
        });
    }

    /// Records one observation in a histogram.
    pub(crate) fn observe(&self, name: &str, values: &[&str], x: f64) {
        self.with(name, values, |def, s| {
            if let (Kind::Histogram(bounds), Series::Histogram { buckets, sum, count }) = (def.kind, s) {
                for (b, le) in buckets.iter_mut().zip(bounds) {
                    if x <= *le {
                        *b += 1;
                    }
                }
                *sum += x;
                *count += 1;
            }
        });
    }

    /// The current value of a counter or gauge series (None before its first sample).
    #[cfg(test)]
    fn value(&self, name: &str, values: &[&str]) -> Option<f64> {
        let i = self.defs.iter().position(|d| d.name == name)?;
        let all = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        match all[i].get(&key)? {
            Series::Value(v) => Some(*v),
            Series::Histogram { .. } => None,
        }
    }

    /// Every family in the text exposition format.
    pub(crate) fn render(&self) -> String {
        let all = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        for (def, series) in self.defs.iter().zip(all.iter()) {
            let kind = match def.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram(_) => "histogram",
            };
            let _ = writeln!(out, "# HELP {} {}", def.name, escape_help(def.help));
            let _ = writeln!(out, "# TYPE {} {kind}", def.name);
            for (values, s) in series {
                let labels: Vec<String> = def
                    .labels
                    .iter()
                    .zip(values)
                    .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
                    .collect();
                match (s, def.kind) {
                    (Series::Value(v), _) => {
                        let _ = writeln!(out, "{}{} {}", def.name, braces(&labels), number(*v));
                    }
                    (Series::Histogram { buckets, sum, count }, Kind::Histogram(bounds)) => {
                        for (n, le) in buckets.iter().zip(bounds) {
                            let mut l = labels.clone();
                            l.push(format!("le=\"{}\"", number(*le)));
                            let _ = writeln!(out, "{}_bucket{} {n}", def.name, braces(&l));
                        }
                        let mut l = labels.clone();
                        l.push("le=\"+Inf\"".into());
                        let _ = writeln!(out, "{}_bucket{} {count}", def.name, braces(&l));
                        let _ = writeln!(out, "{}_sum{} {}", def.name, braces(&labels), number(*sum));
                        let _ = writeln!(out, "{}_count{} {count}", def.name, braces(&labels));
                    }
                    (Series::Histogram { .. }, _) => {}
                }
            }
        }
        out
    }
}

fn braces(labels: &[String]) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", labels.join(","))
    }
}

/// A sample value: integers without a fraction, everything else as Rust prints it.
fn number(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// A label value with `\`, `"` and newlines escaped.
pub(crate) fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The metric name a line of exposition text is about: a sample's name, or the name a
/// `# HELP` / `# TYPE` line describes; None for other comments and blank lines.
pub(crate) fn line_name(line: &str) -> Option<&str> {
    if let Some(rest) = line.strip_prefix("# HELP ").or_else(|| line.strip_prefix("# TYPE ")) {
        return rest.split_whitespace().next();
    }
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let end = line.find(|c: char| c == '{' || c.is_whitespace()).unwrap_or(line.len());
    Some(&line[..end])
}

/// A sample line with the label `key="value"` added first; comments and blank lines unchanged.
/// A sample that already has `key` keeps its own value.
pub(crate) fn add_label(line: &str, key: &str, value: &str) -> String {
    let Some(name) = line_name(line).filter(|_| !line.starts_with('#')) else {
        return line.to_string();
    };
    let rest = &line[name.len()..];
    let label = format!("{key}=\"{}\"", escape_label(value));
    if let Some(inner) = rest.strip_prefix('{') {
        let has_key =
            inner.trim_start().starts_with(&format!("{key}=")) || inner.contains(&format!(",{key}="));
        if has_key {
            return line.to_string();
        }
        let sep = if inner.trim_start().starts_with('}') { "" } else { "," };
        format!("{name}{{{label}{sep}{inner}")
    } else {
        format!("{name}{{{label}}}{rest}")
    }
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    static DEFS: &[Def] = &[
        Def { name: "t_jobs_total", help: "Jobs.", kind: Kind::Counter, labels: &["queue", "outcome"] },
        Def { name: "t_running", help: "Running.", kind: Kind::Gauge, labels: &[] },
        Def { name: "t_seconds", help: "Durations.", kind: Kind::Histogram(&[0.5, 1.0]), labels: &["k"] },
    ];

    #[test]
    fn renders_families_with_labels_and_cumulative_buckets() {
        let r = Registry::new(DEFS);
        r.add("t_jobs_total", &["batches", "completed"], 1.0);
        r.add("t_jobs_total", &["batches", "completed"], 2.0);
        r.add("t_jobs_total", &["code\"intel", "failed"], 1.0);
        r.set("t_running", &[], 3.0);
        r.observe("t_seconds", &["a"], 0.25);
        r.observe("t_seconds", &["a"], 0.75);
        r.observe("t_seconds", &["a"], 5.0);
        let text = r.render();
        assert!(text.contains("# TYPE t_jobs_total counter\n"), "{text}");
        assert!(text.contains("t_jobs_total{queue=\"batches\",outcome=\"completed\"} 3\n"), "{text}");
        assert!(text.contains("t_jobs_total{queue=\"code\\\"intel\",outcome=\"failed\"} 1\n"), "{text}");
        assert!(text.contains("t_running 3\n"), "{text}");
        assert!(text.contains("t_seconds_bucket{k=\"a\",le=\"0.5\"} 1\n"), "{text}");
        assert!(text.contains("t_seconds_bucket{k=\"a\",le=\"1\"} 2\n"), "{text}");
        assert!(text.contains("t_seconds_bucket{k=\"a\",le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("t_seconds_sum{k=\"a\"} 6\n"), "{text}");
        assert!(text.contains("t_seconds_count{k=\"a\"} 3\n"), "{text}");
        assert_eq!(r.value("t_running", &[]), Some(3.0));
        assert!(Registry::new(DEFS).render().contains("\nt_running 0\n"));
    }

    #[test]
    fn add_label_keeps_existing_labels_and_comments() {
        assert_eq!(add_label("a 1", "executor", "e1"), "a{executor=\"e1\"} 1");
        assert_eq!(add_label("a{} 1", "executor", "e1"), "a{executor=\"e1\"} 1");
        assert_eq!(add_label("a{x=\"y\"} 1 123", "executor", "e1"), "a{executor=\"e1\",x=\"y\"} 1 123");
        assert_eq!(add_label("a{executor=\"z\"} 1", "executor", "e1"), "a{executor=\"z\"} 1");
        assert_eq!(add_label("# TYPE a counter", "executor", "e1"), "# TYPE a counter");
        assert_eq!(line_name("# HELP node_load1 Load."), Some("node_load1"));
        assert_eq!(line_name("go_goroutines{a=\"b\"} 3"), Some("go_goroutines"));
        assert_eq!(line_name("# some comment"), None);
    }
}
