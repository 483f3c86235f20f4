//! The exporter behind [`super::Trace`]: OpenTelemetry's batch span processor (its own thread)
//! and OTLP/HTTP protobuf encoder, sending through the executor's own HTTP client (ureq with the
//! trust roots and proxies of `base::http`) rather than a second client and TLS stack.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;

use crate::base::http::Agents;

/// How long one export may take (the batch processor's thread waits, never a job).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest collector reply read.
const MAX_REPLY: u64 = 1 << 20;

/// The exporter of this process while it lives: dropping it sends the spans still queued
/// (waiting up to [`EXPORT_TIMEOUT`]). Empty when tracing is off.
#[must_use = "dropping it stops the exporter"]
pub(crate) struct Installed(Option<SdkTracerProvider>);

impl Drop for Installed {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            if let Err(e) = p.shutdown_with_timeout(EXPORT_TIMEOUT) {
                tracing::warn!("sending the last spans: {e}");
            }
        }
    }
}

/// The URL spans are posted to: `endpoint` is the collector's base URL (as
/// `OTEL_EXPORTER_OTLP_ENDPOINT`), to which `/v1/traces` is added unless it ends so already.
pub(crate) fn traces_url(endpoint: &str) -> Result<String> {
    let e = endpoint.trim();
    if !(e.starts_with("http://") || e.starts_with("https://")) {
        anyhow::bail!("the OTLP endpoint must be an http:// or https:// URL");
    }
    if e.trim_end_matches('/').ends_with("/v1/traces") {
        return Ok(e.trim_end_matches('/').to_string());
    }
    Ok(format!("{}/v1/traces", e.trim_end_matches('/')))
}

/// The endpoint's scheme, host and port, for messages (its path or user info may hold a key).
fn shown(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let host = rest.split('/').next().unwrap_or("");
    let host = host.rsplit('@').next().unwrap_or(host);
    format!("{scheme}://{host}")
}

/// Starts exporting this process's spans to `endpoint` as service `service`; with no endpoint,
/// tracing stays off. Only the first call of a process installs anything.
pub(crate) fn install(service: &'static str, endpoint: Option<&str>) -> Result<Installed> {
    let Some(endpoint) = endpoint.filter(|e| !e.trim().is_empty()) else { return Ok(Installed(None)) };
    if super::enabled() {
        return Ok(Installed(None));
    }
    let url = traces_url(endpoint)?;
    let agents = Agents::new(
        || ureq::AgentBuilder::new().timeout(EXPORT_TIMEOUT).redirects(0),
        url.starts_with("https:"),
        None,
    )
    .context("the OTLP exporter's HTTP client")?;
    let client = UreqClient { agents, failing: AtomicBool::new(false), shown: shown(&url) };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| anyhow::anyhow!("the OTLP exporter for {}: {e}", shown(&url)))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service).build())
        .build();
    let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "executor");
    if super::TRACER.set(tracer).is_err() {
        return Ok(Installed(None));
    }
    tracing::info!("exporting traces to {} (OTLP/HTTP)", shown(&url));
    Ok(Installed(Some(provider)))
}

/// OTLP's HTTP client: a blocking ureq call, made on the batch processor's own thread.
struct UreqClient {
    agents: Agents,
    /// The last export failed (one warning per run of failures).
    failing: AtomicBool,
    shown: String,
}

impl std::fmt::Debug for UreqClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UreqClient").field("endpoint", &self.shown).finish()
    }
}

impl UreqClient {
    fn send(&self, request: &Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        use std::io::Read;
        let url = request.uri().to_string();
        let mut req = self.agents.for_url(&url).request(request.method().as_str(), &url);
        for (name, value) in request.headers() {
            if let Ok(v) = value.to_str() {
                req = req.set(name.as_str(), v);
            }
        }
        let resp = match req.send_bytes(request.body()) {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(format!("posting spans to {}: {}", self.shown, e.kind()).into()),
        };
        let status = resp.status();
        let mut body = Vec::new();
        resp.into_reader().take(MAX_REPLY).read_to_end(&mut body)?;
        Ok(Response::builder().status(status).body(Bytes::from(body))?)
    }
}

#[async_trait::async_trait]
impl HttpClient for UreqClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let res = self.send(&request);
        let failed = match &res {
            Ok(r) => !r.status().is_success(),
            Err(_) => true,
        };
        if failed && !self.failing.swap(true, Ordering::Relaxed) {
            match &res {
                Ok(r) => tracing::warn!("the OTLP collector at {} answered {}", self.shown, r.status()),
                Err(e) => tracing::warn!("{e}"),
            }
        } else if !failed && self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!("the OTLP collector at {} takes spans again", self.shown);
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_become_the_traces_url() {
        assert_eq!(traces_url("http://127.0.0.1:4318").unwrap(), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/").unwrap(), "http://c:4318/v1/traces");
        assert_eq!(traces_url("https://c/otlp").unwrap(), "https://c/otlp/v1/traces");
        assert_eq!(traces_url("http://c:4318/v1/traces").unwrap(), "http://c:4318/v1/traces");
        assert!(traces_url("c:4318").is_err());
    }

    #[test]
    fn messages_show_no_user_info_or_path() {
        assert_eq!(shown("https://user:key@collector:4318/v1/traces"), "https://collector:4318");
    }

    #[test]
    fn no_endpoint_installs_nothing() {
        assert!(install("t", None).unwrap().0.is_none());
        assert!(install("t", Some(" ")).unwrap().0.is_none());
        assert!(!super::super::enabled());
    }
}
