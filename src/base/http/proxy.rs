//! The proxy variables as curl and Go read them: `http_proxy`/`HTTP_PROXY` for `http://`
//! destinations, `https_proxy`/`HTTPS_PROXY` for `https://` ones (lower case first), and
//! `no_proxy`/`NO_PROXY` for the destinations reached directly.

use std::net::IpAddr;

use anyhow::{bail, Result};

/// The proxy settings of this process, read once from its environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ProxyEnv {
    /// The proxy of `http://` destinations (a URL, as the variable gave it).
    pub http: Option<String>,
    /// The proxy of `https://` destinations.
    pub https: Option<String>,
    /// `NO_PROXY` as the variable gave it.
    pub no_proxy: String,
}

impl ProxyEnv {
    pub(crate) fn from_env() -> ProxyEnv {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    pub(crate) fn from_lookup(get: impl Fn(&str) -> Option<String>) -> ProxyEnv {
        let pick = |lower: &str, upper: &str| {
            get(lower).or_else(|| get(upper)).map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
        };
        ProxyEnv {
            http: pick("http_proxy", "HTTP_PROXY"),
            https: pick("https_proxy", "HTTPS_PROXY"),
            no_proxy: pick("no_proxy", "NO_PROXY").unwrap_or_default(),
        }
    }

    /// The proxy URL to reach `url` through, `None` to reach it directly.
    pub(crate) fn for_url(&self, url: &str) -> Option<&str> {
        let target = Target::parse(url)?;
        let proxy = match target.scheme.as_str() {
            "http" => self.http.as_deref(),
            "https" => self.https.as_deref(),
            _ => None,
        }?;
        (!no_proxy_matches(&self.no_proxy, &target.host, target.port)).then_some(proxy)
    }

    /// The variables git (libcurl) reads for the same choices, in the spelling it reads first
    /// (libcurl ignores an upper-case `HTTP_PROXY`).
    pub(crate) fn git_env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        if let Some(p) = &self.http {
            env.push(("http_proxy".to_string(), p.clone()));
        }
        if let Some(p) = &self.https {
            env.push(("https_proxy".to_string(), p.clone()));
        }
        if !self.no_proxy.is_empty() {
            env.push(("no_proxy".to_string(), self.no_proxy.clone()));
        }
        env
    }
}

/// Checks a proxy URL before an agent is built with it: the scheme ureq speaks (plain HTTP to
/// the proxy, `CONNECT` for https destinations) and a host.
pub(crate) fn check_proxy_url(var: &str, url: &str) -> Result<()> {
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    if scheme != "http" {
        bail!(
            "{var} names a proxy by {scheme}://, which the executor's clients cannot speak: give the \
             proxy's plain http:// address ({})",
            display(url)
        );
    }
    if Target::parse(&format!("http://{rest}")).is_none_or(|t| t.host.is_empty()) {
        bail!("{var} is not a proxy URL (http://[user:password@]host:port)");
    }
    Ok(())
}

/// `host:port` of a proxy URL: never its credentials.
pub(crate) fn display(url: &str) -> String {
    let with_scheme = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
    match Target::parse(&with_scheme) {
        Some(t) if t.host.contains(':') => format!("[{}]:{}", t.host, t.port),
        Some(t) => format!("{}:{}", t.host, t.port),
        None => "(an unreadable proxy URL)".into(),
    }
}

/// The parts of a URL that choose a proxy.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pub scheme: String,
    /// Lower case, without the brackets of an IPv6 literal.
    pub host: String,
    pub port: u16,
}

impl Target {
    pub(crate) fn parse(url: &str) -> Option<Target> {
        let (scheme, rest) = url.split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6.split_once(']')?;
            (h, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        let default = match scheme.as_str() {
            "https" => 443,
            _ => 80,
        };
        let port = match port {
            Some(p) if !p.is_empty() => p.parse().ok()?,
            _ => default,
        };
        Some(Target { scheme, host: host.trim_end_matches('.').to_ascii_lowercase(), port })
    }
}

/// Whether `NO_PROXY` sends `host` (lower case) and `port` directly: `*` matches everything; a
/// name matches itself and its subdomains (with or without a leading `.` or `*.`); an address
/// matches itself, a CIDR block its addresses; an entry with `:port` only that port.
pub(crate) fn no_proxy_matches(no_proxy: &str, host: &str, port: u16) -> bool {
    let ip: Option<IpAddr> = host.parse().ok();
    no_proxy.split([',', ' ']).map(str::trim).filter(|e| !e.is_empty()).any(|entry| {
        if entry == "*" {
            return true;
        }
        let entry = entry.to_ascii_lowercase();
        // `[v6]:port`, `name:port`, `v4:port`; a bare IPv6 address has colons of its own.
        let (name, want_port) = if let Some(v6) = entry.strip_prefix('[') {
            match v6.split_once(']') {
                Some((h, after)) => {
                    (h.to_string(), after.strip_prefix(':').and_then(|p| p.parse::<u16>().ok()))
                }
                None => return false,
            }
        } else if entry.matches(':').count() == 1 {
            let (h, p) = entry.split_once(':').unwrap_or((&entry, ""));
            (h.to_string(), p.parse::<u16>().ok())
        } else {
            (entry.clone(), None)
        };
        if want_port.is_some_and(|p| p != port) {
            return false;
        }
        if let Some((net, bits)) = name.split_once('/') {
            return match (ip, net.parse::<IpAddr>(), bits.parse::<u8>()) {
                (Some(ip), Ok(net), Ok(bits)) => in_cidr(ip, net, bits),
                _ => false,
            };
        }
        if let Ok(addr) = name.parse::<IpAddr>() {
            return ip == Some(addr);
        }
        let domain = name.trim_start_matches("*.").trim_start_matches('.').trim_end_matches('.');
        !domain.is_empty() && ip.is_none() && (host == domain || host.ends_with(&format!(".{domain}")))
    })
}

fn in_cidr(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) if bits <= 32 => {
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) if bits <= 128 => {
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> ProxyEnv {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        ProxyEnv::from_lookup(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    #[test]
    fn each_scheme_has_its_proxy_and_lower_case_wins() {
        let e = env(&[
            ("HTTP_PROXY", "http://upper:3128"),
            ("http_proxy", "http://lower:3128"),
            ("HTTPS_PROXY", "http://secure:3128"),
        ]);
        assert_eq!(e.for_url("http://example.com/x"), Some("http://lower:3128"));
        assert_eq!(e.for_url("https://example.com/x"), Some("http://secure:3128"));
        assert_eq!(env(&[("HTTP_PROXY", "http://p:1")]).for_url("https://example.com"), None);
        assert_eq!(env(&[]).for_url("https://example.com"), None);
        assert_eq!(env(&[("https_proxy", "  ")]).https, None);
    }

    #[test]
    fn no_proxy_matches_suffixes_addresses_blocks_ports_and_star() {
        let m = |list: &str, host: &str, port: u16| no_proxy_matches(list, host, port);
        assert!(m("example.com", "example.com", 443));
        assert!(m("example.com", "git.example.com", 443));
        assert!(m(".example.com", "git.example.com", 443));
        assert!(m(".example.com", "example.com", 443), "curl matches the domain itself too");
        assert!(m("*.example.com", "a.b.example.com", 443));
        assert!(!m("example.com", "badexample.com", 443));
        assert!(!m("example.com", "example.com.evil.net", 443));
        assert!(m("localhost, 127.0.0.1", "127.0.0.1", 80));
        assert!(!m("127.0.0.1", "127.0.0.2", 80));
        assert!(m("10.0.0.0/8", "10.20.30.40", 80));
        assert!(!m("10.0.0.0/8", "11.0.0.1", 80));
        assert!(!m("10.0.0.0/8", "ten.example", 80));
        assert!(m("::1", "::1", 80));
        assert!(m("fd00::/8", "fd12::5", 80));
        assert!(m("[::1]:8080", "::1", 8080) && !m("[::1]:8080", "::1", 80));
        assert!(m("example.com:8443", "example.com", 8443) && !m("example.com:8443", "example.com", 443));
        assert!(m("*", "anything.at.all", 1));
        assert!(!m("", "example.com", 443));
        let e = env(&[("https_proxy", "http://p:3128"), ("NO_PROXY", "internal.corp,10.0.0.0/8")]);
        assert_eq!(e.for_url("https://sourcegraph.internal.corp/.executors/"), None);
        assert_eq!(e.for_url("https://10.1.2.3:8443/"), None);
        assert_eq!(e.for_url("https://registry-1.docker.io/v2/"), Some("http://p:3128"));
    }

    #[test]
    fn urls_are_parsed_for_their_host_and_port() {
        let t = |u: &str| Target::parse(u).map(|t| (t.scheme, t.host, t.port));
        assert_eq!(t("https://Example.COM/a"), Some(("https".into(), "example.com".into(), 443)));
        assert_eq!(t("http://u:p@h:8080?x"), Some(("http".into(), "h".into(), 8080)));
        assert_eq!(t("https://[::1]:9/"), Some(("https".into(), "::1".into(), 9)));
        assert_eq!(t("https://[::1]"), Some(("https".into(), "::1".into(), 443)));
        assert_eq!(t("no-scheme"), None);
        assert_eq!(t("http://h:notaport/"), None);
    }

    #[test]
    fn proxy_urls_are_checked_and_shown_without_credentials() {
        check_proxy_url("HTTPS_PROXY", "http://user:pw@proxy:3128").unwrap();
        check_proxy_url("HTTPS_PROXY", "proxy:3128").unwrap();
        let e = check_proxy_url("HTTPS_PROXY", "https://user:pw@proxy:3128").unwrap_err().to_string();
        assert!(e.contains("https://") && e.contains("proxy:3128") && !e.contains("pw"), "{e}");
        assert!(check_proxy_url("HTTPS_PROXY", "http://").is_err());
        assert_eq!(display("http://user:secret@proxy.corp:3128/"), "proxy.corp:3128");
        assert_eq!(display("proxy.corp"), "proxy.corp:80");
    }

    #[test]
    fn git_gets_the_spelling_libcurl_reads() {
        let e = env(&[("HTTP_PROXY", "http://p:1"), ("HTTPS_PROXY", "http://p:2"), ("NO_PROXY", "corp")]);
        assert_eq!(
            e.git_env(),
            vec![
                ("http_proxy".to_string(), "http://p:1".to_string()),
                ("https_proxy".to_string(), "http://p:2".to_string()),
                ("no_proxy".to_string(), "corp".to_string()),
            ]
        );
    }
}
