//! Where registry traffic may go. Pulls run on the host, outside the job's egress policy, for
//! images a job names: so they obey the same destination rules as the job (private, loopback,
//! link-local, shared, reserved and multicast addresses and the host's own addresses refused)
//! unless the operator listed the registry (`EXECUTOR_PRIVATE_REGISTRIES`,
//! `EXECUTOR_INSECURE_REGISTRIES`, or a mirror's host). The check runs on the addresses a name
//! resolves to, in the agent's resolver, so the connection goes to exactly the addresses that
//! were checked (no DNS rebinding between the check and the connect), and again on every
//! redirect and token realm (see `registry`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use crate::base::addr::refused_v4;

/// An IPv4 address carried inside an IPv6 one (mapped, compatible, NAT64, 6to4), which reaches
/// the IPv4 host it names.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, hi, lo] | [0, 0, 0, 0, 0, 0, hi, lo] => Some(v4(hi, lo)),
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(v4(hi, lo)),
        [0x2002, hi, lo, ..] => Some(v4(hi, lo)),
        _ => None,
    }
}

/// Whether `ip` is an address a job may not reach: a non-public range, or one of this host's
/// own addresses (the kernel lets a socket bind only to a local address, which is the same test
/// as the job policy's `fib daddr type local`).
pub(crate) fn non_public(ip: IpAddr) -> bool {
    let ranges = match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || first & 0xfe00 == 0xfc00 // unique local
                || first & 0xffc0 == 0xfe80 // link-local
                || first & 0xffc0 == 0xfec0 // site-local (deprecated)
                || (first == 0x0100 && v6.segments()[1..4] == [0, 0, 0]) // discard
                || embedded_v4(v6).is_some_and(|v4| v4.is_unspecified() || refused_v4(v4))
        }
    };
    ranges || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// `host` and `port` of a `host:port` network location (`[v6]:port` too).
pub(crate) fn split_netloc(netloc: &str) -> (&str, Option<u16>) {
    if let Some(rest) = netloc.strip_prefix('[') {
        let (host, after) = rest.split_once(']').unwrap_or((rest, ""));
        return (host, after.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match netloc.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, p.parse().ok()),
        _ => (netloc, None),
    }
}

/// The operator's exceptions: registries (`host` or `host:port`) that may be at any address.
#[derive(Debug, Clone, Default)]
pub(crate) struct Destinations {
    listed: Arc<Vec<String>>,
}

/// A refused destination: the message names the host (which a job or its registry chose) and
/// never anything the destination answered.
#[derive(Debug, thiserror::Error)]
#[error(
    "{netloc} resolves to a private, loopback, link-local or this host's address: refused (an operator lists such a registry in EXECUTOR_PRIVATE_REGISTRIES)"
)]
pub(crate) struct Refused {
    pub netloc: String,
}

impl Destinations {
    /// From the operator's lists (entries `host`, `host:port`, or URLs, whose host:port counts).
    pub(crate) fn new<'a>(listed: impl IntoIterator<Item = &'a String>) -> Destinations {
        let listed = listed
            .into_iter()
            .map(|e| {
                let e = e.trim();
                let e = e.split_once("://").map_or(e, |(_, rest)| rest);
                let e = e.split('/').next().unwrap_or(e);
                e.rsplit_once('@').map_or(e, |(_, h)| h).to_ascii_lowercase()
            })
            .filter(|e| !e.is_empty())
            .collect();
        Destinations { listed: Arc::new(listed) }
    }

    /// Whether the operator listed `netloc` (`host:port`) or its host.
    pub(crate) fn listed(&self, netloc: &str) -> bool {
        let netloc = netloc.to_ascii_lowercase();
        let (host, _) = split_netloc(&netloc);
        let bare = |e: &str| if e.starts_with('[') { split_netloc(e).0.to_string() } else { e.to_string() };
        self.listed.iter().any(|e| *e == netloc || bare(e) == host)
    }

    /// Resolves `netloc` and keeps the addresses the rules allow: all of them for a listed
    /// registry, else only public ones; none left is a [`Refused`].
    pub(crate) fn resolve(&self, netloc: &str) -> std::io::Result<Vec<SocketAddr>> {
        let addrs: Vec<SocketAddr> = netloc.to_socket_addrs()?.collect();
        if self.listed(netloc) {
            return Ok(addrs);
        }
        let public: Vec<SocketAddr> = addrs.into_iter().filter(|a| !non_public(a.ip())).collect();
        if public.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                Refused { netloc: netloc.to_string() },
            ));
        }
        Ok(public)
    }

    /// Checks the host of `url` before a request: the resolver checks again at connect time.
    pub(crate) fn check_url(&self, url: &str) -> Result<(), Refused> {
        let Some(u) = Url::parse(url) else { return Err(Refused { netloc: "a malformed URL".into() }) };
        match self.resolve(&u.netloc()) {
            Ok(_) => Ok(()),
            Err(e) => match e.into_inner().and_then(|i| i.downcast::<Refused>().ok()) {
                Some(r) => Err(*r),
                // A name that does not resolve is the transport's error to report.
                None => Ok(()),
            },
        }
    }

    /// The resolver for the registry agent.
    pub(crate) fn resolver(&self) -> impl ureq::Resolver + 'static {
        let me = self.clone();
        move |netloc: &str| me.resolve(netloc)
    }
}

/// The parts of an absolute `http(s)` URL the checks need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Url {
    pub scheme: String,
    pub host: String,
    pub port: u16,
    /// Path and query, from the first `/` (or `/`).
    pub rest: String,
}

impl Url {
    pub(crate) fn parse(url: &str) -> Option<Url> {
        let (scheme, after) = url.split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        let default = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return None,
        };
        let cut = after.find(['/', '?', '#']).unwrap_or(after.len());
        let (authority, rest) = after.split_at(cut);
        if authority.contains('@') || authority.is_empty() {
            return None;
        }
        let (host, port) = split_netloc(authority);
        let port = match authority.rsplit_once(':') {
            Some((_, p)) if !p.contains(']') => port?,
            _ => default,
        };
        let rest = if rest.starts_with('/') { rest.to_string() } else { format!("/{rest}") };
        Some(Url { scheme, host: host.to_ascii_lowercase(), port, rest })
    }

    /// `host:port` (`[v6]:port`).
    pub(crate) fn netloc(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Scheme, host and port.
    pub(crate) fn origin(&self) -> String {
        format!("{}://{}", self.scheme, self.netloc())
    }

    /// A `Location` header resolved against this URL.
    pub(crate) fn join(&self, location: &str) -> Option<Url> {
        let location = location.trim();
        if location.contains("://") {
            return Url::parse(location);
        }
        if let Some(rest) = location.strip_prefix("//") {
            return Url::parse(&format!("{}://{rest}", self.scheme));
        }
        let rest = if location.starts_with('/') {
            location.to_string()
        } else {
            let path = self.rest.split(['?', '#']).next().unwrap_or("/");
            let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
            format!("{dir}/{location}")
        };
        Some(Url { rest, ..self.clone() })
    }

    pub(crate) fn to_url(&self) -> String {
        format!("{}{}", self.origin(), self.rest)
    }
}

/// A host's site: its name without the first label when it has three or more (so
/// `registry-1.docker.io` and `auth.docker.io` share `docker.io`), else the host itself; an
/// address is its own site.
fn site(host: &str) -> &str {
    if host.parse::<IpAddr>().is_ok() || host.matches('.').count() < 2 {
        return host;
    }
    host.split_once('.').map_or(host, |(_, rest)| rest)
}

/// Whether `realm_host` is on the registry's own site: the same host, or a name under the
/// registry's site.
pub(crate) fn same_site(registry_host: &str, realm_host: &str) -> bool {
    let (r, t) = (registry_host.to_ascii_lowercase(), realm_host.to_ascii_lowercase());
    let s = site(&r);
    r == t || t == s || t.ends_with(&format!(".{s}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_public_addresses_are_the_job_policys() {
        for a in [
            "10.1.2.3",
            "127.0.0.1",
            "169.254.169.254",
            "172.20.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "2002:a00:1::",
        ] {
            assert!(non_public(a.parse().unwrap()), "{a}");
        }
        for a in ["198.51.100.10", "8.8.8.8", "2001:4860::8888", "::ffff:8.8.8.8"] {
            assert!(!non_public(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn only_listed_registries_resolve_to_non_public_addresses() {
        let d = Destinations::new(&["127.0.0.1:5000".to_string(), "https://mirror.test:8443/x".into()]);
        assert!(d.listed("127.0.0.1:5000") && !d.listed("127.0.0.1:5001"));
        assert!(d.listed("mirror.test:8443") && !d.listed("mirror.test:443"));
        assert_eq!(d.resolve("127.0.0.1:5000").unwrap().len(), 1);
        let err = d.resolve("127.0.0.1:5001").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("127.0.0.1:5001 resolves to a private"), "{err}");
        assert!(d.resolve("localhost:22").is_err());
        assert!(d.check_url("http://[::1]:80/x").is_err());
        assert!(d.check_url("http://10.0.0.1/").is_err());
        let any_port = Destinations::new(&["localhost".to_string()]);
        assert!(any_port.listed("localhost:5001") && any_port.listed("LOCALHOST:1"));
    }

    #[test]
    fn urls_split_and_join_as_redirects_need() {
        let u = Url::parse("https://Reg.Example:5000/v2/a/blobs/x?y=1").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.rest.as_str()), ("reg.example", 5000, "/v2/a/blobs/x?y=1"));
        assert_eq!(u.join("/other").unwrap().to_url(), "https://reg.example:5000/other");
        assert_eq!(u.join("c").unwrap().to_url(), "https://reg.example:5000/v2/a/blobs/c");
        assert_eq!(u.join("//cdn.test/z").unwrap().to_url(), "https://cdn.test:443/z");
        assert_eq!(u.join("http://[::1]:9/q").unwrap().netloc(), "[::1]:9");
        assert!(Url::parse("ftp://x/").is_none() && Url::parse("http://u:p@x/").is_none());
        assert_eq!(Url::parse("http://x").unwrap().to_url(), "http://x:80/");
    }

    #[test]
    fn realms_on_the_registrys_site() {
        assert!(same_site("registry-1.docker.io", "auth.docker.io"));
        assert!(same_site("ghcr.io", "ghcr.io"));
        assert!(same_site("registry.gitlab.com", "gitlab.com"));
        assert!(!same_site("ghcr.io", "evil.io"));
        assert!(!same_site("registry.example.com", "example.org"));
        assert!(!same_site("127.0.0.1", "127.0.0.2"));
    }
}
