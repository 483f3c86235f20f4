//! The client side of the OCI distribution protocol: image names normalised as Docker does
//! (`busybox` is `docker.io/library/busybox:latest`), registry endpoints (mirrors for Docker
//! Hub, plain HTTP only on loopback or for listed insecure registries), credentials from Docker
//! `config.json` documents, the anonymous / basic / bearer-token auth flow, and GETs with
//! jittered retries. Credentials are [`Secret`]s: never logged, stored or put in an error.
//!
//! Every request goes where [`super::destination`] allows (checked again on each redirect,
//! which this client follows itself, and for the token realm); an error names the registry and a
//! status or a fixed description, never what a registry's answer said.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine;

use super::destination::{Destinations, Refused, Url};
use crate::api::RetryPolicy;
use crate::base::cancel::Cancel;
use crate::base::http::{Agents, ProxyEnv};
use crate::base::secret::Secret;

/// Docker Hub's name in references and its API host.
pub(crate) const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "https://registry-1.docker.io";

/// What a registry answered that asking again does not change (a refusal, something it lacks, a
/// status that is not retried, an authentication that cannot work), or retries that ran out:
/// [`Session::get`] has done its own retries, so its caller gives up on this error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RegistryError {
    #[error("registry {registry} refused the credentials for {repository} (401)")]
    Refused { registry: String, repository: String },
    #[error("registry {registry} has no {repository} {path} (404)")]
    Missing { registry: String, repository: String, path: String },
    #[error("registry {registry} answered {code} for {repository} {path}")]
    Status { registry: String, code: u16, repository: String, path: String },
    #[error("registry {registry} failed {attempts} times for {repository} {path}: {last}")]
    GaveUp { registry: String, attempts: u32, repository: String, path: String, last: String },
    /// The bearer token could not be had: `problem` says how.
    #[error("registry {registry}: {problem}")]
    Token { registry: String, problem: String },
    #[error("registry {registry}: reading the token")]
    TokenRead {
        registry: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "registry {registry} needs credentials for {repository}: none are configured (EXECUTOR_DOCKER_AUTH_CONFIG or the job's docker auth config)"
    )]
    NoCredentials { registry: String, repository: String },
    #[error("registry {registry} asked for an unsupported authentication scheme")]
    UnsupportedAuth { registry: String },
    /// A destination the rules refuse (the registry itself, a redirect or the token realm).
    #[error("registry {registry}: {what}: {refused}")]
    Destination { registry: String, what: &'static str, refused: Refused },
    /// A redirect this client does not follow.
    #[error("registry {registry}: {problem}")]
    Redirect { registry: String, problem: &'static str },
    /// The job was cancelled, or the pull's deadline passed.
    #[error("registry {registry}: the pull stopped ({reason})")]
    Stopped { registry: String, reason: String },
}

/// An image reference with its registry made explicit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageName {
    /// `host[:port]`; `docker.io` for Docker Hub.
    pub registry: String,
    /// The repository path in the registry (`library/busybox`).
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl ImageName {
    /// Parses and normalises a reference as Docker does.
    pub(crate) fn parse(reference: &str) -> Result<ImageName> {
        let r = super::Reference::parse(reference)?;
        let (registry, repository) = match r.name.split_once('/') {
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), r.name.clone()),
        };
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            _ => registry,
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if repository.bytes().any(|b| b.is_ascii_uppercase()) || repository.contains(':') {
            bail!("image reference {reference:?}: a repository name is lowercase, without ':'");
        }
        let tag = match (&r.tag, &r.digest) {
            (None, None) => Some("latest".to_string()),
            (t, _) => t.clone(),
        };
        Ok(ImageName { registry, repository, tag, digest: r.digest })
    }

    /// `registry/repository`.
    pub(crate) fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// `registry/repository@digest` when pinned, else `registry/repository:tag`.
    pub(crate) fn canonical(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => format!("{}@{d}", self.name()),
            (None, Some(t)) => format!("{}:{t}", self.name()),
            (None, None) => format!("{}:latest", self.name()),
        }
    }

    /// What the manifest is asked for by: the digest when pinned, else the tag.
    pub(crate) fn manifest_ref(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }
}

/// Whether `registry` (`host[:port]`) may be spoken to over plain HTTP: loopback hosts, and the
/// operator's list of insecure registries (host or host:port), as dockerd decides.
pub(crate) fn plain_http_allowed(registry: &str, insecure: &[String]) -> bool {
    let host = host_of(registry);
    let loopback =
        host == "localhost" || host.parse::<std::net::IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(false);
    loopback || insecure.iter().any(|i| i.trim() == registry || i.trim() == host)
}

fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    registry.rsplit_once(':').map(|(h, _)| h).unwrap_or(registry)
}

/// Registry credentials by registry (`host[:port]`), from Docker `config.json` documents.
#[derive(Clone, Default)]
pub struct Credentials {
    by_registry: BTreeMap<String, (String, Secret)>,
    /// The registries whose credentials came from the job (not the executor's settings).
    from_job: std::collections::BTreeSet<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("registries", &self.by_registry.keys()).finish()
    }
}

/// The registry a `config.json` key names (`https://index.docker.io/v1/` is Docker Hub).
fn auth_key(key: &str) -> String {
    let k = key.trim();
    let k = k.strip_prefix("https://").or_else(|| k.strip_prefix("http://")).unwrap_or(k);
    let host = k.split('/').next().unwrap_or(k);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => DOCKER_HUB.to_string(),
        h => h.to_string(),
    }
}

impl Credentials {
    /// Adds the `auths` of a Docker `config.json` (`{"auths": {"reg": {"auth": "base64
    /// user:pass"}}}`, or `username`/`password` fields); earlier additions win. `what` names the
    /// document in errors, which never quote its content.
    pub fn add_config(&mut self, json: &serde_json::Value, what: &str) -> Result<()> {
        let Some(auths) = json.get("auths") else { return Ok(()) };
        let auths = auths.as_object().with_context(|| format!("{what}: \"auths\" is not an object"))?;
        for (key, entry) in auths {
            let registry = auth_key(key);
            let pair = if let Some(a) = entry.get("auth").and_then(|a| a.as_str()).filter(|a| !a.is_empty()) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(a.trim())
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .with_context(|| {
                        format!("{what}: the auth of registry {registry} is not base64 user:password")
                    })?;
                let (user, pass) = decoded
                    .split_once(':')
                    .with_context(|| format!("{what}: the auth of registry {registry} has no ':'"))?;
                (user.to_string(), Secret::new(pass))
            } else {
                match (
                    entry.get("username").and_then(|u| u.as_str()),
                    entry.get("password").and_then(|p| p.as_str()),
                ) {
                    (Some(u), Some(p)) => (u.to_string(), Secret::new(p)),
                    _ => continue,
                }
            };
            self.by_registry.entry(registry).or_insert(pair);
        }
        Ok(())
    }

    /// [`add_config`](Self::add_config) for the job's own docker auth config: images pulled
    /// with these credentials are private to jobs the registry accepts.
    pub fn add_job_config(&mut self, json: &serde_json::Value, what: &str) -> Result<()> {
        let before: Vec<String> = self.by_registry.keys().cloned().collect();
        self.add_config(json, what)?;
        let added: Vec<String> = self.by_registry.keys().filter(|k| !before.contains(k)).cloned().collect();
        self.from_job.extend(added);
        Ok(())
    }

    /// Whether the credentials for `registry` are the job's own.
    pub(crate) fn is_jobs(&self, registry: &str) -> bool {
        self.from_job.contains(&auth_key(registry))
    }

    /// Parses `text` as a Docker `config.json` and adds it (see [`add_config`](Self::add_config)).
    pub fn add_config_text(&mut self, text: &str, what: &str) -> Result<()> {
        if text.trim().is_empty() {
            return Ok(());
        }
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| anyhow::anyhow!("{what} is not JSON (line {})", e.line()))?;
        self.add_config(&v, what)
    }

    pub fn get(&self, registry: &str) -> Option<&(String, Secret)> {
        self.by_registry.get(&auth_key(registry))
    }
}

/// How a pull reaches registries.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    pub credentials: Credentials,
    /// Docker Hub mirrors (base URLs), tried in order before Docker Hub itself.
    pub mirrors: Vec<String>,
    /// Registries (`host` or `host:port`) that may be spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// Registries (`host` or `host:port`) that may be at private, loopback, link-local or this
    /// host's addresses (the insecure registries and the mirrors may be too).
    pub private: Vec<String>,
    /// Extra CA certificates (PEM) for registries' TLS.
    pub ca: Option<PathBuf>,
    pub retry: RetryPolicy,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            credentials: Credentials::default(),
            mirrors: Vec::new(),
            insecure: Vec::new(),
            private: Vec::new(),
            ca: None,
            retry: RetryPolicy {
                max_attempts: 5,
                base: Duration::from_millis(200),
                max: Duration::from_secs(2),
                retry_after_max: Duration::from_secs(3),
            },
        }
    }
}

/// The destinations the operator listed: private registries, insecure ones, the mirrors, and
/// the proxies of this process's environment (behind a proxy the resolver sees its address).
pub(crate) fn destinations(opts: &RegistryOptions) -> Destinations {
    let env = ProxyEnv::from_env();
    let proxies: Vec<String> = [env.http, env.https].into_iter().flatten().collect();
    Destinations::new(opts.private.iter().chain(&opts.insecure).chain(&opts.mirrors).chain(&proxies))
}

/// The agents shared by a pull's sessions: TLS roots and proxies as every client of the
/// executor has them (`base::http`), the registry CA added; each URL goes through the proxy
/// `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` choose for it. Their resolver hands the connection
/// only the addresses the destination rules allow; redirects are followed by [`Session`],
/// which checks each one.
pub(crate) fn agent(opts: &RegistryOptions) -> Result<Agents> {
    let destinations = destinations(opts);
    let make = || {
        ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(Duration::from_secs(30))
            .redirects(0)
            .resolver(destinations.resolver())
            .user_agent(&format!("executor/{}", crate::api::VERSION))
    };
    Agents::new(make, true, opts.ca.as_deref())
}

/// Most redirects one request follows.
const MAX_REDIRECTS: usize = 5;

/// A transport error as a fixed description: its kind, and the cause our side saw (a refused
/// destination, a TLS or socket error), never the URL or anything the other side sent.
pub(crate) fn describe_transport(t: &ureq::Transport) -> String {
    use std::error::Error;
    let kind = t.kind();
    let mut cause = t.source();
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<Refused>()) {
                return format!("the destination was refused: {r}");
            }
        }
        cause = c.source();
    }
    match kind {
        ureq::ErrorKind::BadStatus | ureq::ErrorKind::BadHeader => format!("{kind} (not an HTTP answer)"),
        _ => match t.source() {
            Some(s) => format!("{kind}: {s}"),
            None => kind.to_string(),
        },
    }
}

/// The base URLs to try for `name`, in order.
pub(crate) fn endpoints(agent: &Agents, name: &ImageName, opts: &RegistryOptions) -> Vec<String> {
    if name.registry == DOCKER_HUB {
        let mut out: Vec<String> = opts
            .mirrors
            .iter()
            .map(|m| m.trim().trim_end_matches('/').to_string())
            .filter(|m| !m.is_empty())
            .collect();
        out.push(DOCKER_HUB_API.to_string());
        return out;
    }
    let https = format!("https://{}", name.registry);
    if !plain_http_allowed(&name.registry, &opts.insecure) {
        return vec![https];
    }
    // dockerd's rule for insecure registries: HTTPS when the registry speaks it, else HTTP. A
    // TLS server answers plain HTTP with 400: it stays HTTPS, so that its TLS error is the one
    // reported.
    // The status a GET of `/v2/` answers, `None` when the transport failed.
    let probe = |url: &str| match agent
        .for_url(url)
        .get(&format!("{url}/v2/"))
        .timeout(Duration::from_secs(5))
        .call()
    {
        Ok(r) => Some(r.status()),
        Err(ureq::Error::Status(code, _)) => Some(code),
        Err(ureq::Error::Transport(_)) => None,
    };
    if probe(&https).is_some() {
        return vec![https];
    }
    let http = format!("http://{}", name.registry);
    match probe(&http) {
        Some(code) if code != 400 => vec![http],
        _ => vec![https],
    }
}

/// One registry endpoint and repository, with the auth state of a pull.
pub(crate) struct Session {
    agent: Agents,
    /// The base URL (`https://host:port`).
    pub base: String,
    /// The registry's name for messages (`host:port`, never with credentials).
    pub registry: String,
    repository: String,
    credentials: Option<(String, Secret)>,
    authorization: Mutex<Option<Secret>>,
    retry: RetryPolicy,
    destinations: Destinations,
    insecure: Vec<String>,
    /// The job's cancel and the pull's deadline.
    stop: Stop,
    /// Whether `credentials` are the job's own, and whether they were sent.
    job_credentials: bool,
    sent_job_credentials: std::sync::atomic::AtomicBool,
}

/// When a pull stops: the job's cancel (coordinator, deadline, shutdown) and the pull's own
/// deadline.
#[derive(Debug, Clone, Default)]
pub(crate) struct Stop {
    pub cancel: Cancel,
    pub deadline: Option<std::time::Instant>,
}

impl Stop {
    /// Why to stop now, if at all.
    pub(crate) fn reason(&self) -> Option<String> {
        if let Some(r) = self.cancel.check() {
            return Some(format!("the job's {r}"));
        }
        match self.deadline {
            Some(d) if std::time::Instant::now() >= d => Some("the pull's deadline passed".into()),
            _ => None,
        }
    }

    /// The time left to the deadline; `None` when there is none.
    pub(crate) fn left(&self) -> Option<Duration> {
        self.deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()))
    }

    /// Sleeps `delay`, or less when the job is cancelled; whether to go on.
    pub(crate) fn sleep(&self, delay: Duration) -> bool {
        let delay = self.left().map_or(delay, |l| l.min(delay));
        self.cancel.wait(delay).is_none() && self.reason().is_none()
    }
}

/// How one [`Session::call`] failed.
enum CallError {
    Ureq(Box<ureq::Error>),
    Registry(RegistryError),
    Redirect(&'static str),
}

/// A challenge from `WWW-Authenticate`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Challenge {
    pub scheme: String,
    pub params: BTreeMap<String, String>,
}

/// Parses `Bearer realm="https://auth",service="reg",scope="repository:a:pull,push"`.
pub(crate) fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = BTreeMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        if key.is_empty() || chars.next() != Some('=') {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = std::iter::from_fn(|| chars.next_if(|c| *c != ',')).collect();
        }
        params.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    Some(Challenge { scheme: scheme.to_ascii_lowercase(), params })
}

impl Session {
    pub(crate) fn new(agent: &Agents, base: &str, name: &ImageName, opts: &RegistryOptions) -> Session {
        let registry = base.split("://").nth(1).unwrap_or(base).trim_end_matches('/').to_string();
        // A mirror answers with Docker Hub's images but is its own registry for credentials.
        let (credentials, job_credentials) = match opts.credentials.get(&registry) {
            Some(c) => (Some(c), opts.credentials.is_jobs(&registry)),
            None => (opts.credentials.get(&name.registry), opts.credentials.is_jobs(&name.registry)),
        };
        Session {
            agent: agent.clone(),
            base: base.trim_end_matches('/').to_string(),
            registry,
            repository: name.repository.clone(),
            credentials: credentials.cloned(),
            authorization: Mutex::new(None),
            retry: opts.retry,
            destinations: destinations(opts),
            insecure: opts.insecure.clone(),
            stop: Stop::default(),
            job_credentials: job_credentials && credentials.is_some(),
            sent_job_credentials: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether this session presented the job's own credentials (to the registry or its token
    /// service): what it pulled is then private to jobs the registry accepts.
    pub(crate) fn sent_job_credentials(&self) -> bool {
        self.sent_job_credentials.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn note_credentials_sent(&self) {
        if self.job_credentials {
            self.sent_job_credentials.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The session stops when `stop` says so.
    pub(crate) fn with_stop(mut self, stop: Stop) -> Session {
        self.stop = stop;
        self
    }

    pub(crate) fn retry(&self) -> RetryPolicy {
        self.retry
    }

    pub(crate) fn stop(&self) -> &Stop {
        &self.stop
    }

    /// The error of a pull that stopped, when it did.
    pub(crate) fn stopped(&self) -> Option<RegistryError> {
        self.stop.reason().map(|reason| RegistryError::Stopped { registry: self.registry.clone(), reason })
    }

    fn refused(&self, what: &'static str, refused: Refused) -> RegistryError {
        RegistryError::Destination { registry: self.registry.clone(), what, refused }
    }

    /// One GET of `url`, following redirects here: each hop's destination is checked, plain
    /// HTTP only to a registry that may speak it, and `authorization` goes only to the
    /// registry's own origin (a blob store a registry redirects to gets no registry token).
    fn call(
        &self,
        url: &str,
        headers: &[(&str, String)],
        authorization: Option<&Secret>,
    ) -> Result<ureq::Response, CallError> {
        let origin = Url::parse(&self.base).map(|u| u.origin());
        let mut url = Url::parse(url).ok_or(CallError::Redirect("a URL that is not http(s)"))?;
        for _ in 0..=MAX_REDIRECTS {
            if let Some(e) = self.stopped() {
                return Err(CallError::Registry(e));
            }
            self.destinations
                .check_url(&url.to_url())
                .map_err(|r| CallError::Registry(self.refused("a request", r)))?;
            if url.scheme == "http" && !plain_http_allowed(&url.netloc(), &self.insecure) {
                return Err(CallError::Redirect("a redirect to plain HTTP, which this registry may not use"));
            }
            let target = url.to_url();
            let mut req = self.agent.for_url(&target).get(&target);
            if let Some(left) = self.stop.left() {
                req = req.timeout(left.max(Duration::from_millis(1)));
            }
            for (k, v) in headers {
                req = req.set(k, v);
            }
            if let Some(auth) = authorization.filter(|_| Some(url.origin()) == origin) {
                req = req.set("Authorization", auth.expose());
            }
            match req.call() {
                Ok(resp) if (300..400).contains(&resp.status()) => {
                    let next = resp.header("location").and_then(|l| url.join(l));
                    url = next.ok_or(CallError::Redirect("a redirect without a usable Location"))?;
                }
                Ok(resp) => return Ok(resp),
                Err(e) => return Err(CallError::Ureq(Box::new(e))),
            }
        }
        Err(CallError::Redirect("more than 5 redirects"))
    }

    /// GETs `/v2/<repository>/<path>`, authenticating on a 401 challenge and retrying transport
    /// errors, 429 and 5xx. A 206 or 200 answer is returned; any other status is an error.
    pub(crate) fn get(&self, path: &str, accept: &str, range_from: Option<u64>) -> Result<ureq::Response> {
        let url = format!("{}/v2/{}/{path}", self.base, self.repository);
        let mut authenticated = false;
        let mut attempt = 0;
        loop {
            let mut headers = vec![("Accept", accept.to_string())];
            if let Some(from) = range_from.filter(|f| *f > 0) {
                headers.push(("Range", format!("bytes={from}-")));
            }
            let auth = self.authorization.lock().ok().and_then(|a| a.clone());
            let err = match self.call(&url, &headers, auth.as_ref()) {
                Ok(resp) => return Ok(resp),
                Err(CallError::Registry(e)) => return Err(e.into()),
                Err(CallError::Redirect(problem)) => {
                    return Err(RegistryError::Redirect { registry: self.registry.clone(), problem }.into())
                }
                Err(CallError::Ureq(e)) => *e,
            };
            let err = match err {
                ureq::Error::Status(401, resp) if !authenticated => {
                    authenticated = true;
                    self.authenticate(resp.header("www-authenticate").unwrap_or(""))?;
                    continue;
                }
                ureq::Error::Status(401, _) => {
                    return Err(RegistryError::Refused {
                        registry: self.registry.clone(),
                        repository: self.repository.clone(),
                    }
                    .into())
                }
                ureq::Error::Status(404, _) => {
                    return Err(RegistryError::Missing {
                        registry: self.registry.clone(),
                        repository: self.repository.clone(),
                        path: path.to_string(),
                    }
                    .into())
                }
                ureq::Error::Status(code, _) if crate::api::retryable_status(code) => {
                    format!("status code {code}")
                }
                ureq::Error::Status(code, _) => {
                    return Err(RegistryError::Status {
                        registry: self.registry.clone(),
                        code,
                        repository: self.repository.clone(),
                        path: path.to_string(),
                    }
                    .into())
                }
                ureq::Error::Transport(t) => describe_transport(&t),
            };
            if let Some(e) = self.stopped() {
                return Err(e.into());
            }
            attempt += 1;
            if attempt >= self.retry.max_attempts {
                return Err(RegistryError::GaveUp {
                    registry: self.registry.clone(),
                    attempts: attempt,
                    repository: self.repository.clone(),
                    path: path.to_string(),
                    last: err,
                }
                .into());
            }
            if !self.stop.sleep(self.retry.delay(attempt)) {
                if let Some(e) = self.stopped() {
                    return Err(e.into());
                }
            }
        }
    }

    /// Answers a 401 challenge: basic credentials, or a bearer token from the realm.
    fn authenticate(&self, header: &str) -> Result<(), RegistryError> {
        let token = |problem: String| RegistryError::Token { registry: self.registry.clone(), problem };
        let challenge = parse_challenge(header);
        let basic = self.credentials.as_ref().map(|(u, p)| {
            let raw = format!("{u}:{}", p.expose());
            Secret::new(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw)))
        });
        let value = match challenge {
            Some(c) if c.scheme == "bearer" => {
                let realm = c
                    .params
                    .get("realm")
                    .ok_or_else(|| token("a bearer challenge without a realm".into()))?;
                let realm_url = Url::parse(realm)
                    .ok_or_else(|| token("the bearer realm is not an http(s) URL".into()))?;
                self.destinations.check_url(realm).map_err(|r| self.refused("the token realm", r))?;
                if realm_url.scheme == "http" && !plain_http_allowed(&realm_url.netloc(), &self.insecure) {
                    return Err(token("the bearer realm is plain HTTP on a host that may not use it".into()));
                }
                // Credentials go only to an HTTPS realm (plain HTTP only where the registry
                // itself is spoken to over it) on the registry's own site.
                if basic.is_some() {
                    let registry_url = Url::parse(&self.base);
                    let registry_http = registry_url.as_ref().is_some_and(|u| u.scheme == "http");
                    let registry_host = registry_url.map(|u| u.host).unwrap_or_default();
                    if realm_url.scheme != "https" && !registry_http {
                        return Err(token(
                            "the bearer realm is not HTTPS: the credentials are not sent there".into(),
                        ));
                    }
                    if !super::destination::same_site(&registry_host, &realm_url.host) {
                        return Err(token(format!(
                            "the bearer realm {} is not on the registry's own site: the credentials are not sent there",
                            realm_url.host
                        )));
                    }
                }
                let realm = realm_url.to_url();
                let mut req = self.agent.for_url(&realm).get(&realm).timeout(Duration::from_secs(30));
                if let Some(left) = self.stop.left() {
                    req = req.timeout(left.clamp(Duration::from_millis(1), Duration::from_secs(30)));
                }
                if let Some(service) = c.params.get("service") {
                    req = req.query("service", service);
                }
                let scope = c
                    .params
                    .get("scope")
                    .cloned()
                    .unwrap_or_else(|| format!("repository:{}:pull", self.repository));
                req = req.query("scope", &scope);
                if let Some(b) = &basic {
                    req = req.set("Authorization", b.expose());
                    self.note_credentials_sent();
                }
                let resp = match req.call() {
                    Ok(r) if r.status() == 200 => r,
                    Ok(r) => return Err(token(format!("the token service answered {}", r.status()))),
                    Err(ureq::Error::Status(code @ (401 | 403), _)) => {
                        return Err(token(format!(
                            "the token service refused the credentials for {} ({code})",
                            self.repository
                        )))
                    }
                    Err(ureq::Error::Status(code, _)) => {
                        return Err(token(format!("the token service answered {code}")))
                    }
                    Err(ureq::Error::Transport(t)) => {
                        return Err(token(format!(
                            "the token service is unreachable: {}",
                            describe_transport(&t)
                        )))
                    }
                };
                let mut body = Vec::new();
                std::io::Read::read_to_end(&mut std::io::Read::take(resp.into_reader(), 1 << 20), &mut body)
                    .map_err(|source| RegistryError::TokenRead { registry: self.registry.clone(), source })?;
                let v: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|_| token("the token service sent no JSON".into()))?;
                let bearer = v
                    .get("token")
                    .or_else(|| v.get("access_token"))
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| token("the token service sent no token".into()))?;
                Secret::new(format!("Bearer {bearer}"))
            }
            Some(c) if c.scheme == "basic" => match basic {
                Some(b) => {
                    self.note_credentials_sent();
                    b
                }
                None => {
                    return Err(RegistryError::NoCredentials {
                        registry: self.registry.clone(),
                        repository: self.repository.clone(),
                    })
                }
            },
            // Nothing of what the registry sent is repeated.
            _ => return Err(RegistryError::UnsupportedAuth { registry: self.registry.clone() }),
        };
        if let Ok(mut a) = self.authorization.lock() {
            *a = Some(value);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_normalise_like_docker() {
        let n = ImageName::parse("busybox").unwrap();
        assert_eq!(n.canonical(), "docker.io/library/busybox:latest");
        let n = ImageName::parse("sourcegraph/batcheshelper:5.2.0").unwrap();
        assert_eq!(n.canonical(), "docker.io/sourcegraph/batcheshelper:5.2.0");
        let n = ImageName::parse("index.docker.io/library/alpine:3").unwrap();
        assert_eq!(n.canonical(), "docker.io/library/alpine:3");
        let n = ImageName::parse("127.0.0.1:5000/team/img:v1").unwrap();
        assert_eq!((n.registry.as_str(), n.repository.as_str()), ("127.0.0.1:5000", "team/img"));
        let d = format!("sha256:{}", "a".repeat(64));
        let n = ImageName::parse(&format!("localhost/x@{d}")).unwrap();
        assert_eq!(n.canonical(), format!("localhost/x@{d}"));
        assert_eq!(n.manifest_ref(), d);
        assert!(ImageName::parse("ghcr.io/Upper/x").is_err());
    }

    #[test]
    fn plain_http_only_on_loopback_or_listed() {
        assert!(plain_http_allowed("127.0.0.1:5000", &[]));
        assert!(plain_http_allowed("localhost:5000", &[]));
        assert!(plain_http_allowed("[::1]:5000", &[]));
        assert!(!plain_http_allowed("registry.example:5000", &[]));
        assert!(plain_http_allowed("registry.example:5000", &["registry.example".into()]));
        assert!(!plain_http_allowed("10.0.0.1", &["10.0.0.2".into()]));
    }

    #[test]
    fn docker_hub_images_try_the_mirrors_in_order_first() {
        // Docker Hub's endpoints are decided without any request.
        let opts = RegistryOptions {
            mirrors: vec![" http://127.0.0.1:5001/ ".into(), String::new(), "https://mirror.example".into()],
            ..Default::default()
        };
        let agent = agent(&opts).unwrap();
        let hub = ImageName::parse("busybox").unwrap();
        assert_eq!(
            endpoints(&agent, &hub, &opts),
            ["http://127.0.0.1:5001", "https://mirror.example", "https://registry-1.docker.io"]
        );
        let other = ImageName::parse("ghcr.io/a/b").unwrap();
        assert_eq!(endpoints(&agent, &other, &opts), ["https://ghcr.io"], "mirrors are for Docker Hub only");
        let mut c = Credentials::default();
        c.add_config_text(r#"{"auths":{"127.0.0.1:5001":{"auth":"bTpw"}}}"#, "t").unwrap();
        let opts = RegistryOptions { credentials: c, ..opts };
        let s = Session::new(&agent, "http://127.0.0.1:5001", &hub, &opts);
        assert_eq!(s.registry, "127.0.0.1:5001");
        assert_eq!(s.credentials.as_ref().map(|(u, _)| u.as_str()), Some("m"), "a mirror's own credentials");
    }

    #[test]
    fn challenges_parse_with_quoted_commas() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.example/token");
        assert_eq!(c.params["scope"], "repository:a/b:pull,push");
        assert_eq!(parse_challenge(r#"Basic realm="x""#).unwrap().scheme, "basic");
    }

    #[test]
    fn credentials_come_from_docker_config_and_never_print() {
        let mut c = Credentials::default();
        let job = r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpodW50ZXIy"}}}"#;
        c.add_config_text(job, "the job's docker auth config").unwrap();
        c.add_config_text(
            r#"{"auths":{"docker.io":{"auth":"b3RoZXI6eA=="},"r.example":{"username":"u","password":"p"}}}"#,
            "env",
        )
        .unwrap();
        let (user, pass) = c.get("docker.io").unwrap();
        assert_eq!((user.as_str(), pass.expose()), ("user", "hunter2"), "the job's config wins");
        assert_eq!(c.get("r.example").unwrap().1.expose(), "p");
        assert!(!format!("{c:?}").contains("hunter2"));
        let err = Credentials::default()
            .add_config_text(r#"{"auths":{"r":{"auth":"not base64 hunter2"}}}"#, "env")
            .unwrap_err();
        assert!(!format!("{err:#}").contains("hunter2") && format!("{err:#}").contains("registry r"));
    }
}
