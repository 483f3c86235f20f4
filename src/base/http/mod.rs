//! How every HTTP client of the executor reaches the network: the coordinator client, the admin
//! CLI, registry pulls and git's clones trust the same roots (the compiled-in web roots, the
//! operating system's trust store, and an operator's extra CA file) and take the same proxies
//! (`HTTP_PROXY`, `HTTPS_PROXY`, `NO_PROXY`, as curl reads them). A failed contact is described
//! by [`Failure`], with what to set.

mod failure;
mod proxy;
mod trust;

pub(crate) use failure::Failure;
pub(crate) use proxy::{display as display_proxy, ProxyEnv, Target};
pub(crate) use trust::SystemTrust;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Context, Result};

/// The system trust store's certificates, read once per process (only by a client that speaks
/// TLS: an executor whose coordinator is plain HTTP reads no bundle).
fn system_certificates() -> Result<Arc<Vec<rustls::pki_types::CertificateDer<'static>>>> {
    static CERTS: OnceLock<
        std::result::Result<Arc<Vec<rustls::pki_types::CertificateDer<'static>>>, String>,
    > = OnceLock::new();
    CERTS
        .get_or_init(|| {
            let trust = SystemTrust::from_env();
            let certs = trust.certificates().map_err(|e| format!("{e:#}"))?;
            tracing::debug!("trusting {} certificates of {}", certs.len(), trust.describe());
            Ok(Arc::new(certs))
        })
        .clone()
        .map_err(|e| anyhow::anyhow!("the system trust store: {e}"))
}

/// TLS settings that trust the web PKI (compiled in), the system trust store and the PEM
/// certificates in `extra_ca` (if any); made once per `extra_ca` per process.
pub(crate) fn tls_config(extra_ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>> {
    type Made = Vec<(Option<PathBuf>, Arc<rustls::ClientConfig>)>;
    static MADE: OnceLock<Mutex<Made>> = OnceLock::new();
    let made = MADE.get_or_init(|| Mutex::new(Vec::new()));
    let key = extra_ca.map(Path::to_path_buf);
    if let Some((_, c)) = made.lock().unwrap_or_else(|p| p.into_inner()).iter().find(|(k, _)| *k == key) {
        return Ok(c.clone());
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // A bundle may hold certificates webpki cannot use as anchors: those are skipped.
    let (_, ignored) = roots.add_parsable_certificates(system_certificates()?.iter().cloned());
    if ignored > 0 {
        tracing::debug!("the system trust store has {ignored} certificates rustls cannot use");
    }
    if let Some(path) = extra_ca {
        let certs =
            trust::read_pem(path).with_context(|| format!("reading the CA file {}", path.display()))?;
        if certs.is_empty() {
            anyhow::bail!("the CA file {} holds no PEM certificate", path.display());
        }
        for cert in certs {
            roots.add(cert).with_context(|| format!("adding a certificate of {}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("configuring TLS")?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    made.lock().unwrap_or_else(|p| p.into_inner()).push((key, config.clone()));
    Ok(config)
}

/// The ureq agents of one client: one that connects directly and one per proxy the
/// environment names, all with the same settings and TLS roots; [`Agents::for_url`] picks the
/// one `NO_PROXY` and the URL's scheme ask for. (ureq 2 takes one proxy per agent and knows no
/// `NO_PROXY`.) A redirect is followed by the agent of the first URL.
#[derive(Clone)]
pub(crate) struct Agents {
    direct: ureq::Agent,
    http: Option<ureq::Agent>,
    https: Option<ureq::Agent>,
    proxies: Arc<ProxyEnv>,
}

impl std::fmt::Debug for Agents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agents")
            .field("http_proxy", &self.proxies.http.as_deref().map(display_proxy))
            .field("https_proxy", &self.proxies.https.as_deref().map(display_proxy))
            .finish()
    }
}

impl Agents {
    /// Agents made by `make` (timeouts, redirects, user agent), trusting [`tls_config`]`(extra_ca)`
    /// when `tls` (a client of `http://` only needs no roots), with the proxies of this
    /// process's environment.
    pub(crate) fn new(
        make: impl Fn() -> ureq::AgentBuilder,
        tls: bool,
        extra_ca: Option<&Path>,
    ) -> Result<Agents> {
        Self::with_proxies(make, tls, extra_ca, ProxyEnv::from_env())
    }

    pub(crate) fn with_proxies(
        make: impl Fn() -> ureq::AgentBuilder,
        tls: bool,
        extra_ca: Option<&Path>,
        proxies: ProxyEnv,
    ) -> Result<Agents> {
        let tls = if tls { Some(tls_config(extra_ca)?) } else { None };
        let build = |proxy: Option<(&str, &str)>| -> Result<ureq::Agent> {
            let mut b = make();
            if let Some(c) = &tls {
                b = b.tls_config(c.clone());
            }
            if let Some((var, url)) = proxy {
                proxy::check_proxy_url(var, url)?;
                let p = ureq::Proxy::new(url).map_err(|_| {
                    anyhow::anyhow!("{var} is not a proxy URL (http://[user:password@]host:port)")
                })?;
                b = b.proxy(p);
            }
            Ok(b.build())
        };
        Ok(Agents {
            direct: build(None)?,
            http: proxies.http.as_deref().map(|u| build(Some(("HTTP_PROXY", u)))).transpose()?,
            https: proxies.https.as_deref().map(|u| build(Some(("HTTPS_PROXY", u)))).transpose()?,
            proxies: Arc::new(proxies),
        })
    }

    /// The agent that reaches `url`.
    pub(crate) fn for_url(&self, url: &str) -> &ureq::Agent {
        let proxied = match self.proxies.for_url(url) {
            None => None,
            Some(_) if url.starts_with("https:") => self.https.as_ref(),
            Some(_) => self.http.as_ref(),
        };
        proxied.unwrap_or(&self.direct)
    }

    /// The proxy (`host:port`) that [`Agents::for_url`] goes through for `url`.
    pub(crate) fn proxy_for(&self, url: &str) -> Option<String> {
        self.proxies.for_url(url).map(display_proxy)
    }
}

/// What a git child needs to reach an `https://` or `http://` remote as this process's clients
/// do: the proxy variables (libcurl reads them itself) and the trust store. Git's libcurl reads
/// its own default bundle (the distribution's) but not `SSL_CERT_FILE`/`SSL_CERT_DIR`, so those
/// become `GIT_SSL_CAINFO`/`GIT_SSL_CAPATH`; an `extra_ca` (`EXECUTOR_FRONTEND_CA`) is the
/// CA file instead of `SSL_CERT_FILE`, as before.
pub(crate) fn git_env(extra_ca: Option<&Path>) -> Vec<(String, String)> {
    git_env_with(&ProxyEnv::from_env(), &SystemTrust::from_env(), extra_ca)
}

fn git_env_with(proxies: &ProxyEnv, trust: &SystemTrust, extra_ca: Option<&Path>) -> Vec<(String, String)> {
    let mut env = proxies.git_env();
    let trust = trust.clone();
    let file = extra_ca.map(Path::to_path_buf).or(trust.file.filter(|_| trust.from_env));
    if let Some(f) = file {
        env.push(("GIT_SSL_CAINFO".into(), f.to_string_lossy().into_owned()));
    }
    if let Ok(dirs) = std::env::join_paths(&trust.dirs) {
        if !trust.dirs.is_empty() {
            env.push(("GIT_SSL_CAPATH".into(), dirs.to_string_lossy().into_owned()));
        }
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agents(proxies: ProxyEnv) -> Agents {
        Agents::with_proxies(ureq::AgentBuilder::new, false, None, proxies).unwrap()
    }

    #[test]
    fn each_url_gets_the_agent_of_its_proxy() {
        let a = agents(ProxyEnv {
            http: Some("http://p:1".into()),
            https: Some("http://user:pw@q:2".into()),
            no_proxy: "internal.corp".into(),
        });
        assert_eq!(a.proxy_for("https://sourcegraph.example.com/x"), Some("q:2".into()));
        assert_eq!(a.proxy_for("http://sourcegraph.example.com/x"), Some("p:1".into()));
        assert_eq!(a.proxy_for("https://git.internal.corp/x"), None);
        assert!(!format!("{a:?}").contains("pw"));
        let none = agents(ProxyEnv::default());
        assert_eq!(none.proxy_for("https://example.com"), None);
    }

    #[test]
    fn git_gets_the_proxies_and_the_trust_store() {
        let proxies =
            ProxyEnv { https: Some("http://p:3128".into()), no_proxy: "corp".into(), ..Default::default() };
        let trust = SystemTrust {
            file: Some("/corp/ca.pem".into()),
            dirs: vec!["/a".into(), "/b".into()],
            from_env: true,
        };
        let env = git_env_with(&proxies, &trust, None);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("https_proxy"), Some("http://p:3128"));
        assert_eq!(get("no_proxy"), Some("corp"));
        assert_eq!(get("GIT_SSL_CAINFO"), Some("/corp/ca.pem"));
        assert_eq!(get("GIT_SSL_CAPATH"), Some("/a:/b"));
        // The operator's coordinator CA is the CA file; the distribution's bundle is git's own
        // default and needs no variable.
        let env = git_env_with(&proxies, &trust, Some(Path::new("/etc/executor/ca.pem")));
        assert!(env.contains(&("GIT_SSL_CAINFO".into(), "/etc/executor/ca.pem".into())));
        let distro =
            SystemTrust { file: Some("/etc/ssl/certs/ca-certificates.crt".into()), ..Default::default() };
        let env = git_env_with(&ProxyEnv::default(), &distro, None);
        assert!(env.is_empty(), "{env:?}");
    }

    #[test]
    fn a_proxy_the_clients_cannot_speak_is_refused_by_name() {
        let e = Agents::with_proxies(
            ureq::AgentBuilder::new,
            false,
            None,
            ProxyEnv { https: Some("socks5://p:1080".into()), ..Default::default() },
        )
        .unwrap_err();
        assert!(e.to_string().contains("HTTPS_PROXY"), "{e}");
    }
}
