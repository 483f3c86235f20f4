//! What a failed contact was (DNS, refused, timeout, TLS, the proxy) and what the operator sets
//! about it, in one sentence each: said once when a client first fails, so that a broken
//! network never turns into a silent retry loop.

/// The kind of a transport failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The name (of the destination, or of the proxy) does not resolve.
    Dns,
    /// Nothing accepts connections there.
    Refused,
    /// No answer in time.
    Timeout,
    /// TLS refused a certificate (the destination's, or a TLS-inspecting proxy's).
    Certificate,
    /// Another TLS failure (the other side speaks no TLS, or none we share).
    Tls,
    /// The proxy refused the tunnel.
    Proxy,
    /// The proxy wants credentials.
    ProxyAuth,
    Other,
}

impl Failure {
    /// Classifies a ureq transport error (rustls's error rides inside an `io::Error` of its
    /// source chain).
    pub(crate) fn of(t: &ureq::Transport) -> Failure {
        match t.kind() {
            ureq::ErrorKind::Dns => return Failure::Dns,
            ureq::ErrorKind::ProxyConnect => return Failure::Proxy,
            ureq::ErrorKind::ProxyUnauthorized => return Failure::ProxyAuth,
            _ => {}
        }
        if let Some(tls) = tls_error(t) {
            return if refuses_certificate(tls) { Failure::Certificate } else { Failure::Tls };
        }
        let mut cause = std::error::Error::source(t);
        while let Some(c) = cause {
            if let Some(io) = c.downcast_ref::<std::io::Error>() {
                match io.kind() {
                    std::io::ErrorKind::ConnectionRefused => return Failure::Refused,
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => return Failure::Timeout,
                    _ => {}
                }
            }
            cause = c.source();
        }
        Failure::Other
    }

    /// One word for logs and metrics.
    pub(crate) fn word(self) -> &'static str {
        match self {
            Failure::Dns => "DNS",
            Failure::Refused => "connection refused",
            Failure::Timeout => "timeout",
            Failure::Certificate => "TLS certificate",
            Failure::Tls => "TLS",
            Failure::Proxy => "proxy",
            Failure::ProxyAuth => "proxy authentication",
            Failure::Other => "connection",
        }
    }

    /// What to check or set, for a contact with `target` (`host:port`) through `proxy`
    /// (`host:port`, never its credentials) when one was used; `ca_setting` is the client's own
    /// extra-CA setting (`EXECUTOR_FRONTEND_CA`, `EXECUTOR_REGISTRY_CA`).
    pub(crate) fn advice(self, target: &str, proxy: Option<&str>, ca_setting: &str) -> String {
        let via = |p: &str| format!("the proxy {p}");
        match (self, proxy) {
            (Failure::Dns, Some(p)) => format!("{} does not resolve: check HTTPS_PROXY/HTTP_PROXY", via(p)),
            (Failure::Dns, None) => format!(
                "{target} does not resolve from this host: check the name and the host's resolver, or \
                 set HTTPS_PROXY (HTTP_PROXY for http://) if only a proxy reaches it"
            ),
            (Failure::Refused, Some(p)) => {
                format!("{} refuses connections: check HTTPS_PROXY/HTTP_PROXY", via(p))
            }
            (Failure::Refused, None) => format!(
                "nothing accepts connections at {target}: check the URL, or set HTTPS_PROXY (HTTP_PROXY \
                 for http://) if this network reaches it only through a proxy"
            ),
            (Failure::Timeout, Some(p)) => format!("no answer from {} or through it from {target}", via(p)),
            (Failure::Timeout, None) => format!(
                "no answer from {target}: a firewall may drop the traffic; set HTTPS_PROXY (HTTP_PROXY \
                 for http://) if this network reaches it only through a proxy"
            ),
            (Failure::Certificate, _) => format!(
                "the certificate {target} presented is not trusted: behind a TLS-inspecting proxy or \
                 with a private CA, add that CA's certificate to the system trust store \
                 (update-ca-certificates, or point SSL_CERT_FILE or SSL_CERT_DIR at it) or set {ca_setting}"
            ),
            (Failure::Tls, _) => format!(
                "the TLS handshake with {target} failed: check that it speaks https (the URL's scheme)"
            ),
            (Failure::Proxy, Some(p)) => format!(
                "{} refused a tunnel to {target}: check that it allows it, or list the host in NO_PROXY \
                 to reach it directly",
                via(p)
            ),
            (Failure::ProxyAuth, Some(p)) => format!(
                "{} asks for credentials: put them in the proxy URL (http://user:password@host:port)",
                via(p)
            ),
            _ => format!("check the URL, the network to {target} and HTTPS_PROXY/HTTP_PROXY/NO_PROXY"),
        }
    }
}

/// rustls's error under a transport error, if there is one.
fn tls_error(t: &ureq::Transport) -> Option<&rustls::Error> {
    let mut cause = std::error::Error::source(t);
    while let Some(c) = cause {
        let inner = c.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref());
        if let Some(e) = c
            .downcast_ref::<rustls::Error>()
            .or_else(|| inner.and_then(|e| e.downcast_ref::<rustls::Error>()))
        {
            return Some(e);
        }
        cause = c.source();
    }
    None
}

/// Whether TLS refused a certificate (the other side's, by us, or ours, by it).
fn refuses_certificate(e: &rustls::Error) -> bool {
    use rustls::AlertDescription as A;
    match e {
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::InvalidCertRevocationList(_) => true,
        rustls::Error::AlertReceived(a) => matches!(
            a,
            A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::CertificateUnobtainable
                | A::BadCertificateStatusResponse
                | A::BadCertificateHashValue
                | A::CertificateRequired
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_names_what_to_set() {
        let t = "coordinator.example:443";
        let cert = Failure::Certificate.advice(t, Some("proxy:3128"), "EXECUTOR_FRONTEND_CA");
        for word in ["SSL_CERT_FILE", "SSL_CERT_DIR", "EXECUTOR_FRONTEND_CA", t] {
            assert!(cert.contains(word), "{cert}");
        }
        assert!(Failure::Dns.advice(t, None, "X").contains("HTTPS_PROXY"));
        assert!(Failure::Dns.advice(t, Some("proxy:3128"), "X").contains("proxy:3128"));
        assert!(Failure::Refused.advice(t, None, "X").contains("HTTPS_PROXY"));
        assert!(Failure::Proxy.advice(t, Some("proxy:3128"), "X").contains("NO_PROXY"));
        assert!(Failure::ProxyAuth.advice(t, Some("proxy:3128"), "X").contains("user:password@"));
        assert!(Failure::Other.advice(t, None, "X").contains("NO_PROXY"));
    }
}
