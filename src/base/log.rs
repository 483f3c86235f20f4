//! The output of the log facade (`tracing`): one line per event, built from its message, its
//! fields and the fields of the spans it happened in (a job's span gives each of its lines the
//! job id), written to stderr or through a terminal view that redraws around it. `cli` picks the
//! format and the level ([`init`]); the other entry points, the oci shim and the guest agent,
//! take [`init_plain`].
//!
//! A span whose fields a line needs is made with `error_span!`: a span below the level is
//! disabled, and a warning inside a disabled job span would lose its job id.

use std::fmt;
use std::io::Write;
use std::sync::{Arc, RwLock};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

pub(crate) use tracing::level_filters::LevelFilter;

/// The field (on an event or a span) naming the job a line is about.
pub(crate) const JOB_ID: &str = "job_id";

/// How a line looks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Format {
    /// `[HH:MM:SS.mmm ]NAME: [job ID: ]MESSAGE[ key=value...]`: NAME is the program's, or the
    /// event's target where a call site names one (`tracing::info!(target: "pull", ..)`); the
    /// clock (UTC) where `time` asks for it. Span fields other than the job id are left out.
    Human { name: String, time: bool },
    /// One JSON object a line: time, level, target, message and every field of the event and
    /// its spans.
    Json,
}

/// Sends every event at `level` or above to stderr, formatted as `format`. Fails when a
/// subscriber is already installed.
pub(crate) fn init(
    format: Format,
    level: LevelFilter,
) -> Result<(), tracing::subscriber::SetGlobalDefaultError> {
    let subscriber = tracing_subscriber::registry().with(level).with(Lines::new(format, emit));
    tracing::subscriber::set_global_default(subscriber)
}

/// [`init`] for an entry point that has no command line of its own (the oci shim, the guest
/// agent): human lines named `name`, at info, without the clock. A second call changes nothing.
pub(crate) fn init_plain(name: &str) {
    let _ = init(Format::Human { name: name.to_string(), time: false }, LevelFilter::INFO);
}

type Sink = Arc<dyn Fn(&str) + Send + Sync>;

/// Where lines go instead of stderr while a [`Routed`] lives.
static ROUTE: RwLock<Option<Sink>> = RwLock::new(None);

/// Lines go through a terminal view while this lives; dropping it sends them to stderr again.
pub(crate) struct Routed(());

/// Sends each line (without its newline) to `sink` until the returned guard drops: a terminal
/// view with live progress prints lines above it instead of through it.
pub(crate) fn route_lines(sink: impl Fn(&str) + Send + Sync + 'static) -> Routed {
    if let Ok(mut r) = ROUTE.write() {
        *r = Some(Arc::new(sink));
    }
    Routed(())
}

impl Drop for Routed {
    fn drop(&mut self) {
        if let Ok(mut r) = ROUTE.write() {
            *r = None;
        }
    }
}

fn emit(line: &str) {
    let routed = ROUTE.read().ok().and_then(|r| r.clone());
    match routed {
        Some(sink) => sink(line),
        None => {
            // One write a line, so that lines of concurrent threads do not interleave.
            let _ = std::io::stderr().lock().write_all(format!("{line}\n").as_bytes());
        }
    }
}

/// The message and the other fields of an event or a span, in the order they were recorded.
#[derive(Debug, Default, Clone)]
struct Fields {
    message: Option<String>,
    pairs: Vec<(&'static str, String)>,
}

impl Fields {
    fn put(&mut self, name: &'static str, value: String) {
        if name == "message" {
            self.message = Some(value);
        } else if let Some(p) = self.pairs.iter_mut().find(|(n, _)| *n == name) {
            p.1 = value;
        } else {
            self.pairs.push((name, value));
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field.name(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field.name(), value.to_string());
    }
}

/// The layer that formats events into lines and hands them to `write`.
struct Lines {
    format: Format,
    write: Box<dyn Fn(&str) + Send + Sync>,
}

impl Lines {
    fn new(format: Format, write: impl Fn(&str) + Send + Sync + 'static) -> Lines {
        Lines { format, write: Box::new(write) }
    }

    fn human(&self, name: &str, time: bool, event: &Event<'_>, own: &Fields, spans: &Fields) -> String {
        let mut line = String::new();
        if time {
            line.push_str(&chrono::Utc::now().format("%H:%M:%S%.3f ").to_string());
        }
        let target = event.metadata().target();
        // A module path is this program's line; a target a call site named is its own.
        let from_module = target.split("::").next().is_some_and(|root| root == env!("CARGO_CRATE_NAME"));
        line.push_str(if from_module { name } else { target });
        line.push_str(": ");
        if let Some(job) = own.get(JOB_ID).or_else(|| spans.get(JOB_ID)) {
            line.push_str(&format!("job {job}: "));
        }
        line.push_str(own.message.as_deref().unwrap_or(""));
        for (k, v) in own.pairs.iter().filter(|(k, _)| *k != JOB_ID) {
            line.push_str(&format!(" {k}={v}"));
        }
        line
    }

    fn json(event: &Event<'_>, own: &Fields, spans: &Fields) -> String {
        let meta = event.metadata();
        let mut obj = serde_json::Map::new();
        obj.insert("time".into(), chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string().into());
        obj.insert("level".into(), meta.level().as_str().into());
        obj.insert("target".into(), meta.target().into());
        obj.insert("message".into(), own.message.clone().unwrap_or_default().into());
        for (k, v) in spans.pairs.iter().chain(&own.pairs) {
            obj.insert((*k).into(), v.clone().into());
        }
        serde_json::Value::Object(obj).to_string()
    }
}

impl<S> Layer<S> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(fields) = span.extensions_mut().get_mut::<Fields>() {
                values.record(fields);
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut own = Fields::default();
        event.record(&mut own);
        // Outermost first, so that an inner span's field wins.
        let mut spans = Fields::default();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(f) = span.extensions().get::<Fields>() {
                    for (k, v) in &f.pairs {
                        spans.put(k, v.clone());
                    }
                }
            }
        }
        let line = match &self.format {
            Format::Human { name, time } => self.human(name, *time, event, &own, &spans),
            Format::Json => Lines::json(event, &own, &spans),
        };
        (self.write)(&line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Runs `f` under a subscriber of `format` at info; returns the lines it logged.
    fn lines(format: Format, f: impl FnOnce()) -> Vec<String> {
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let layer = Lines::new(format, move |l: &str| sink.lock().unwrap().push(l.to_string()));
        let subscriber = tracing_subscriber::registry().with(LevelFilter::INFO).with(layer);
        tracing::subscriber::with_default(subscriber, f);
        let v = out.lock().unwrap().clone();
        v
    }

    fn human(name: &str) -> Format {
        Format::Human { name: name.into(), time: false }
    }

    #[test]
    fn human_lines_are_todays() {
        let got = lines(human("executor queue"), || {
            tracing::info!("serving batches on http://127.0.0.1:1");
            tracing::warn!(target: "pull", "busybox: layer abc already in the store");
            tracing::debug!("below the level");
        });
        assert_eq!(
            got,
            [
                "executor queue: serving batches on http://127.0.0.1:1",
                "pull: busybox: layer abc already in the store"
            ]
        );
    }

    #[test]
    fn a_job_span_names_the_job_and_an_events_own_id_wins() {
        let got = lines(human("executor"), || {
            let _job = tracing::error_span!("job", job_id = 7, runtime = "oci").entered();
            let _stage = tracing::error_span!("stage", stage = "setup").entered();
            tracing::info!("dequeued (2 steps)");
            tracing::warn!(job_id = 8, "canceled by the coordinator");
            tracing::info!(took_ms = 5, "booted");
        });
        assert_eq!(
            got,
            [
                "executor: job 7: dequeued (2 steps)",
                "executor: job 8: canceled by the coordinator",
                "executor: job 7: booted took_ms=5",
            ]
        );
    }

    #[test]
    fn the_clock_comes_first_when_asked() {
        let got = lines(Format::Human { name: "executor".into(), time: true }, || tracing::info!("x"));
        let (clock, rest) = got[0].split_once(' ').unwrap();
        assert_eq!(rest, "executor: x");
        assert!(chrono::NaiveTime::parse_from_str(clock, "%H:%M:%S%.3f").is_ok(), "{clock}");
        assert_eq!(clock.len(), "12:34:56.789".len());
    }

    #[test]
    fn json_lines_carry_every_field() {
        let got = lines(Format::Json, || {
            let _job = tracing::error_span!("job", job_id = 7).entered();
            let _stage = tracing::error_span!("stage", stage = "setup").entered();
            tracing::warn!(runtime = "oci", "a \"quoted\" word");
        });
        let v: serde_json::Value = serde_json::from_str(&got[0]).unwrap();
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["message"], "a \"quoted\" word");
        assert_eq!((&v["job_id"], &v["stage"], &v["runtime"]), (&"7".into(), &"setup".into(), &"oci".into()));
        assert!(v["target"].as_str().unwrap().starts_with("executor::base::log"));
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn a_route_takes_lines_until_it_drops() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let routed = route_lines(move |l| sink.lock().unwrap().push(l.to_string()));
        emit("through the view");
        drop(routed);
        assert!(ROUTE.read().unwrap().is_none());
        assert_eq!(*out.lock().unwrap(), ["through the view"]);
    }
}
