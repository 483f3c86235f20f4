//! `EXECUTOR_NETWORK_ALLOW_HOSTS`: the names an `allowlist` job may resolve and reach, each
//! exact (`registry.npmjs.org`) or a wildcard of the names under a domain (`*.github.com`), with
//! an optional port (`proxy.golang.org:443`, TCP and UDP); and a job's own list, which can only
//! narrow the executor's.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// One allowed name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRule {
    /// Lowercase, without the trailing dot; for a wildcard, the domain after `*.`.
    pub name: String,
    /// `*.name`: any name below `name` (not `name` itself).
    pub wildcard: bool,
    pub port: Option<u16>,
}

impl HostRule {
    /// `NAME`, `*.NAME`, either with `:PORT`.
    pub fn parse(s: &str) -> Result<HostRule> {
        let s = s.trim();
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => match p.parse::<u16>() {
                Ok(p) if p > 0 => (h, Some(p)),
                _ => bail!("allowed host {s:?} has a bad port (want 1 to 65535)"),
            },
            None => (s, None),
        };
        let (wildcard, name) = match host.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, host),
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                && !l.starts_with('-')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            bail!("allowed host {s:?} is not a host name (want NAME, *.NAME, either with :PORT)");
        }
        if name.parse::<std::net::Ipv4Addr>().is_ok() {
            bail!("allowed host {s:?} is an address: addresses go into EXECUTOR_NETWORK_ALLOW");
        }
        Ok(HostRule { name, wildcard, port })
    }

    /// Whether `qname` (lowercase, no trailing dot) is this rule's.
    pub fn matches(&self, qname: &str) -> bool {
        if self.wildcard {
            qname.len() > self.name.len()
                && qname.ends_with(&self.name)
                && qname.as_bytes()[qname.len() - self.name.len() - 1] == b'.'
        } else {
            qname == self.name
        }
    }

    /// Whether everything this rule allows, `bound` allows too.
    fn within(&self, bound: &HostRule) -> bool {
        let port_ok = bound.port.is_none() || bound.port == self.port;
        let name_ok = if self.wildcard {
            bound.wildcard && (self.name == bound.name || bound.matches(&self.name))
        } else {
            bound.matches(&self.name)
        };
        port_ok && name_ok
    }
}

impl std::fmt::Display for HostRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.name)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

/// A comma-separated list (empty entries ignored).
pub fn parse_list(s: &str) -> Result<Vec<HostRule>> {
    s.split(',').map(str::trim).filter(|e| !e.is_empty()).map(HostRule::parse).collect()
}

/// What a name may reach: `None` when no rule has it; else the ports (`None` in the list: any).
pub fn verdict(rules: &[HostRule], qname: &str) -> Option<Vec<Option<u16>>> {
    let ports: Vec<Option<u16>> = rules.iter().filter(|r| r.matches(qname)).map(|r| r.port).collect();
    (!ports.is_empty()).then_some(ports)
}

/// A job's own list bounded by the executor's: each of the job's rules that the executor's
/// list covers whole is kept, each other one is left out and named in the second list (a job
/// narrows, never widens). A job without a list gets the executor's.
pub fn narrow(executor: &[HostRule], job: Option<&[String]>) -> (Vec<HostRule>, Vec<String>) {
    let Some(job) = job else { return (executor.to_vec(), vec![]) };
    let mut kept = Vec::new();
    let mut refused = Vec::new();
    for raw in job {
        match HostRule::parse(raw) {
            Ok(r) if executor.iter().any(|b| r.within(b)) => kept.push(r),
            Ok(r) => refused.push(format!("{r} (not within the executor's EXECUTOR_NETWORK_ALLOW_HOSTS)")),
            Err(e) => refused.push(format!("{e:#}")),
        }
    }
    (kept, refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_match() {
        let r = parse_list("registry.npmjs.org, *.GitHub.com ,proxy.golang.org:443,").unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[1], HostRule { name: "github.com".into(), wildcard: true, port: None });
        assert_eq!(r[2].port, Some(443));
        assert!(r[0].matches("registry.npmjs.org") && !r[0].matches("x.registry.npmjs.org"));
        assert!(r[1].matches("api.github.com") && r[1].matches("a.b.github.com"));
        assert!(!r[1].matches("github.com") && !r[1].matches("evilgithub.com"));
        assert_eq!(verdict(&r, "proxy.golang.org"), Some(vec![Some(443)]));
        assert_eq!(verdict(&r, "example.com"), None);
        for bad in ["", "*.", "a..b", "x:0", "x:99999", "1.2.3.4", "bad host", "-a.com"] {
            assert!(HostRule::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            r.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(","),
            "registry.npmjs.org,*.github.com,proxy.golang.org:443"
        );
    }

    #[test]
    fn a_job_narrows_and_never_widens() {
        let exec = parse_list("*.github.com,npm.test,go.test:443").unwrap();
        let job: Vec<String> =
            ["api.github.com:443", "*.x.github.com", "npm.test", "go.test", "evil.test", "*.com"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let (kept, refused) = narrow(&exec, Some(&job));
        let kept: Vec<String> = kept.iter().map(|r| r.to_string()).collect();
        assert_eq!(kept, vec!["api.github.com:443", "*.x.github.com", "npm.test"]);
        assert_eq!(refused.len(), 3, "{refused:?}");
        assert!(refused[0].starts_with("go.test "), "a port-restricted name stays restricted");
        assert_eq!(narrow(&exec, None).0, exec);
        assert!(narrow(&exec, Some(&[])).0.is_empty(), "an empty list narrows to nothing");
    }
}
