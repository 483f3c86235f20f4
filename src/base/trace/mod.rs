//! OpenTelemetry traces: one trace per job, exported over OTLP/HTTP (protobuf) when
//! `EXECUTOR_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_ENDPOINT`) names a collector, and nothing at
//! all otherwise. [`install`] starts the exporter for the process; a [`Trace`] is the span a
//! job's work hangs from (its parent, when there is one, a W3C `traceparent` from the
//! coordinator); [`span`] opens a child of the span current on this thread.
//!
//! The current span is the thread's (OpenTelemetry's context stack): a job runs on its own
//! thread, and work moved to another thread takes it along ([`current`], [`Current::attach`]).
//! Attributes name the job, its queue, repository, runtime, steps and images, never a secret.

mod export;

pub(crate) use export::{install, Installed};

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::SystemTime;

use opentelemetry::propagation::TextMapPropagator;
pub(crate) use opentelemetry::trace::SpanKind;
use opentelemetry::trace::{Span as _, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, ContextGuard};
pub(crate) use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracer;

/// The tracer [`install`] made; unset while tracing is off.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get()
}

/// Whether spans go anywhere in this process.
pub(crate) fn enabled() -> bool {
    tracer().is_some()
}

/// Whether `s` is a W3C `traceparent` of version 00: `00-<32 hex>-<16 hex>-<2 hex>`, lowercase,
/// neither id all zeros. (OpenTelemetry's parser takes ids of any length.)
pub(crate) fn valid_traceparent(s: &str) -> bool {
    let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let zero = |p: &str| p.bytes().all(|b| b == b'0');
    let parts: Vec<&str> = s.split('-').collect();
    matches!(parts.as_slice(), [v, t, p, f]
        if *v == "00" && hex(t, 32) && hex(p, 16) && hex(f, 2) && !zero(t) && !zero(p))
}

/// The remote span a `traceparent` names, as a context to start children in.
fn remote_parent(traceparent: &str) -> Option<Context> {
    if !valid_traceparent(traceparent) {
        return None;
    }
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// The `traceparent` of the span in `cx`, or `None` when it has none.
fn traceparent_of(cx: &Context) -> Option<String> {
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    carrier.remove("traceparent")
}

/// A span that starts a unit of work (a job on an executor, a submit on the coordinator): a
/// child of a remote `traceparent`, or the root of a new trace. Ended when dropped. With tracing
/// off it is empty and costs nothing.
pub(crate) struct Trace {
    cx: Option<Context>,
}

impl Trace {
    /// Starts span `name` at `start`, a child of `parent` (a `traceparent`; an invalid one is
    /// ignored, and the trace starts anew).
    pub(crate) fn start(
        name: &'static str,
        parent: Option<&str>,
        kind: SpanKind,
        start: SystemTime,
        attributes: Vec<KeyValue>,
    ) -> Trace {
        let Some(tracer) = tracer() else { return Trace { cx: None } };
        let parent = parent.and_then(remote_parent).unwrap_or_default();
        let span = tracer
            .span_builder(name)
            .with_kind(kind)
            .with_start_time(start)
            .with_attributes(attributes)
            .start_with_context(tracer, &parent);
        Trace { cx: Some(parent.with_span(span)) }
    }

    /// The `traceparent` that makes other work this span's child (`None` with tracing off).
    pub(crate) fn traceparent(&self) -> Option<String> {
        self.cx.as_ref().and_then(traceparent_of)
    }

    /// Records a finished child, `start` to `end`, of this span (a wait measured elsewhere).
    pub(crate) fn record(
        &self,
        name: &'static str,
        start: SystemTime,
        end: SystemTime,
        attributes: Vec<KeyValue>,
    ) {
        let (Some(tracer), Some(cx)) = (tracer(), &self.cx) else { return };
        let mut span = tracer
            .span_builder(name)
            .with_start_time(start)
            .with_attributes(attributes)
            .start_with_context(tracer, cx);
        span.end_with_timestamp(end.max(start));
    }

    /// Makes this span the thread's current one (the parent of [`span`]) until the guard drops.
    pub(crate) fn enter(&self) -> Entered {
        Entered(self.cx.clone().map(Context::attach))
    }

    pub(crate) fn set(&self, key: &'static str, value: impl Into<Value>) {
        if let Some(cx) = &self.cx {
            cx.span().set_attribute(KeyValue::new(key, value));
        }
    }

    /// Marks the span failed with `message` (already redacted).
    pub(crate) fn fail(&self, message: &str) {
        if let Some(cx) = &self.cx {
            cx.span().set_status(Status::error(message.to_string()));
        }
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        if let Some(cx) = &self.cx {
            cx.span().end();
        }
    }
}

/// The thread's current span while it lives ([`Trace::enter`], [`Current::attach`]).
pub(crate) struct Entered(#[allow(dead_code)] Option<ContextGuard>);

/// A child of the thread's current span, current itself until it ends (when dropped). Empty
/// when tracing is off or no span is current (a stage run outside `loop`).
pub(crate) struct Span {
    cx: Option<(Context, ContextGuard)>,
}

/// Opens span `name` now, a child of the current span.
pub(crate) fn span(name: impl Into<Cow<'static, str>>) -> Span {
    span_at(name, SystemTime::now())
}

/// [`span`] that started at `start`.
pub(crate) fn span_at(name: impl Into<Cow<'static, str>>, start: SystemTime) -> Span {
    let Some(tracer) = tracer() else { return Span { cx: None } };
    let parent = Context::current();
    if !parent.has_active_span() {
        return Span { cx: None };
    }
    let span = tracer.span_builder(name).with_start_time(start).start_with_context(tracer, &parent);
    let cx = parent.with_span(span);
    let guard = cx.clone().attach();
    Span { cx: Some((cx, guard)) }
}

impl Span {
    /// A span that is not there (for work that did not happen).
    pub(crate) fn none() -> Span {
        Span { cx: None }
    }

    /// Whether the span is exported (worth computing attributes for).
    pub(crate) fn recording(&self) -> bool {
        self.cx.is_some()
    }

    pub(crate) fn set(&self, key: &'static str, value: impl Into<Value>) {
        if let Some((cx, _)) = &self.cx {
            cx.span().set_attribute(KeyValue::new(key, value));
        }
    }

    /// Marks the span failed with `message` (already redacted).
    pub(crate) fn fail(&self, message: &str) {
        if let Some((cx, _)) = &self.cx {
            cx.span().set_status(Status::error(message.to_string()));
        }
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some((cx, guard)) = self.cx.take() {
            cx.span().end();
            drop(guard);
        }
    }
}

/// The thread's current span, to carry to another thread.
#[derive(Clone)]
pub(crate) struct Current(Option<Context>);

/// [`Current`] of this thread.
pub(crate) fn current() -> Current {
    Current(enabled().then(Context::current))
}

impl Current {
    /// Makes this span current on the calling thread until the guard drops.
    pub(crate) fn attach(self) -> Entered {
        Entered(self.0.map(Context::attach))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_checked() {
        assert!(valid_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-abc-def-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(!valid_traceparent(bad), "{bad}");
        }
    }

    #[test]
    fn a_remote_parent_round_trips() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = remote_parent(tp).unwrap();
        assert_eq!(traceparent_of(&cx).as_deref(), Some(tp));
        assert_eq!(traceparent_of(&Context::new()), None);
    }

    #[test]
    fn without_install_nothing_is_recorded() {
        // This test binary never installs an exporter (the integration tests do).
        assert!(!enabled());
        let t = Trace::start("job", None, SpanKind::Consumer, SystemTime::now(), Vec::new());
        assert_eq!(t.traceparent(), None);
        let _in = t.enter();
        let s = span("step");
        assert!(!s.recording());
    }
}
