//! The egress policy as nftables scripts: the executor's table (a dispatch map from each job's
//! host-side veth to its chain, NAT out of the host) and one chain per job, whose rules go in
//! the order the docs list them: anti-spoofing, replies, DNS, the coordinator, operator
//! exceptions, then every non-public destination refused, then the internet.

use anyhow::{Context, Result};
use std::net::{Ipv4Addr, ToSocketAddrs};

use super::{Settings, IF_PREFIX, TABLE};

/// An IPv4 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub const ANY: Cidr = Cidr { addr: Ipv4Addr::UNSPECIFIED, prefix: 0 };

    /// `A.B.C.D/N` (the address masked to its network) or a bare address (a /32).
    pub fn parse(s: &str) -> Result<Cidr> {
        let (a, p) = s.trim().split_once('/').unwrap_or((s.trim(), "32"));
        let addr: Ipv4Addr = a.parse().with_context(|| format!("{s:?} is not an IPv4 address or network"))?;
        let prefix: u8 =
            p.parse().ok().filter(|p| *p <= 32).with_context(|| format!("{s:?} has a bad prefix length"))?;
        let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
        Ok(Cidr { addr: Ipv4Addr::from(u32::from(addr) & mask), prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// An operator's exception: a network, and optionally one port (TCP and UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allow {
    pub net: Cidr,
    pub port: Option<u16>,
}

impl Allow {
    /// `CIDR` or `CIDR:PORT` (`10.1.2.3:5000`, `10.8.0.0/16`, `10.8.0.0/16:443`).
    pub fn parse(s: &str) -> Result<Allow> {
        let (net, port) = match s.rsplit_once(':') {
            Some((n, p)) => {
                let port: u16 =
                    p.parse().ok().filter(|p| *p > 0).with_context(|| format!("{s:?} has a bad port"))?;
                (n, Some(port))
            }
            None => (s, None),
        };
        Ok(Allow { net: Cidr::parse(net)?, port })
    }
}

const REJECT: &str = "reject with icmpx type admin-prohibited";

/// The table, created once per host (network namespace) with the pool it NATs. The map `jobs`
/// holds one element per job, `"exn<n>" . <job address> : jump <policy chain>`: a packet of a
/// job link with any other source (spoofed, or IPv6, which has no `ip saddr`) matches no
/// element and is dropped by the next rule.
pub(crate) fn table_script(pool: &super::Cidr) -> String {
    let received = super::egress::SET_RECEIVED;
    format!(
        "table inet {TABLE} {{
  map jobs {{ type ifname . ipv4_addr : verdict; }}
  set {received} {{ {RECORD_SET} }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    {}
    iifname . ip saddr vmap @jobs
    iifname \"{IF_PREFIX}*\" drop
    oifname \"{IF_PREFIX}*\" ct state established,related accept
    oifname \"{IF_PREFIX}*\" drop
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname . ip saddr vmap @jobs
    iifname \"{IF_PREFIX}*\" drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {pool} oifname != \"{IF_PREFIX}*\" masquerade
  }}
}}
",
        received_rule()
    )
}

/// The type and bounds of the record's sets (`egress.rs`): one element per job, address,
/// protocol and port, an hour at most (a use starts it again), 64Ki elements for all jobs.
const RECORD_SET: &str =
    "type ipv4_addr . ipv4_addr . inet_proto . inet_service; flags dynamic,timeout; timeout 1h; size 65536;";

/// The conntrack mark's bit of a flow whose first packet an allowlist chain recorded as
/// accepted: the rest of its packets, both ways, go to the record's byte counters. Other bits
/// of the mark are left as they are.
pub(crate) const RECORDED: u32 = 0x4000_0000;

/// The forward chain's first rule: the bytes of every reply to a recorded flow, counted per
/// job, address, protocol and port (the reply's source), as the job's chain keys what it sent.
pub(crate) fn received_rule() -> String {
    format!(
        "oifname \"{IF_PREFIX}*\" ct mark & {RECORDED:#x} == {RECORDED:#x} meta l4proto {{ tcp, udp }} \
         update @{} {{ ip daddr . ip saddr . meta l4proto . th sport counter }}",
        super::egress::SET_RECEIVED
    )
}

/// What a table of an executor before the byte counts gets: the received bytes' set, and its
/// rule first in the forward chain.
pub(crate) fn received_upgrade_script() -> String {
    format!(
        "add set inet {TABLE} {} {{ {RECORD_SET} }}\ninsert rule inet {TABLE} forward {}\n",
        super::egress::SET_RECEIVED,
        received_rule()
    )
}

/// The map's type, as `nft list map` prints it: a table of another layout is made again.
pub(crate) const MAP_TYPE: &str = "type ifname . ipv4_addr : verdict";

/// Addresses and a TCP port a job may reach besides the public internet.
pub(crate) type Target = (Vec<Ipv4Addr>, u16);

/// The addresses and port of a URL that a job could reach (none for a host that resolves only
/// to loopback, which no sandbox reaches).
pub(crate) fn url_target(url: &str) -> Result<Option<Target>> {
    let (scheme, rest) = url.split_once("://").with_context(|| format!("the URL {url:?} has no scheme"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => {
            (h, p.parse::<u16>().with_context(|| format!("the URL {url:?} has a bad port"))?)
        }
        _ => (authority, if scheme == "https" { 443 } else { 80 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        anyhow::bail!("the URL {url:?} has no host");
    }
    let addrs: Vec<Ipv4Addr> = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("resolving the host {host}"))?
        .filter_map(|a| match a.ip() {
            std::net::IpAddr::V4(v) if !v.is_loopback() => Some(v),
            _ => None,
        })
        .collect();
    Ok((!addrs.is_empty()).then_some((addrs, port)))
}

/// The URLs a job may reach besides the public internet.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reach<'a> {
    /// The coordinator's (its uploads).
    pub coordinator: Option<&'a str>,
    /// The instance URLs the job's steps upload to (`SRC_ENDPOINT`).
    pub endpoints: &'a [String],
}

/// What a job may reach besides the public internet, resolved now (at the sandbox's boot): the
/// coordinator (a failure to resolve it fails the boot, as the job needs it) and the upload
/// endpoints (one that does not resolve is left out, and `vm-boot` has said so in the job's
/// log).
pub(crate) fn targets(reach: Reach) -> Result<Vec<Target>> {
    let mut out: Vec<Target> = Vec::new();
    if let Some(t) = reach.coordinator.map(url_target).transpose()?.flatten() {
        out.push(t);
    }
    for url in reach.endpoints {
        match url_target(url) {
            Ok(Some(t)) if !out.contains(&t) => out.push(t),
            Ok(_) => {}
            Err(e) => tracing::warn!("a step's upload endpoint gets no egress allowance: {e:#}"),
        }
    }
    Ok(out)
}

fn set(items: impl IntoIterator<Item = String>) -> String {
    format!("{{ {} }}", items.into_iter().collect::<Vec<_>>().join(", "))
}

/// The policy chain shared by every job of one executor's settings: its name (`policy_` and a
/// digest of its rules, so that executors with other settings get their own chain and a chain
/// never changes under a job) and the nft script that (re)creates it in one transaction.
pub(crate) fn policy_chain(s: &Settings, targets: &[Target]) -> (String, String) {
    let mut rules: Vec<String> = vec![
        // 1. Replies to what the job started. (Anti-spoofing and IPv6 are the map's key.)
        "ct state established,related accept".into(),
        "ct state invalid drop".into(),
    ];
    let allowlist = s.mode == super::Mode::Allowlist;
    // What an allowlist job's chain records of the connections it starts (`egress.rs`): the
    // first packet of each flow goes into one of the sets with a counter of its own bytes, and
    // an accepted flow is marked so that its later packets count too.
    let key = "ip saddr . ip daddr . meta l4proto . th dport";
    let seen = |set: &str| format!("add @{set} {{ {key} counter }}");
    let accepted = format!("{} ct mark set ct mark | {RECORDED:#x}", seen(super::egress::SET_SEEN));
    if allowlist {
        // 0. The bytes the job sends on a recorded flow, every packet after the first.
        rules.insert(
            0,
            format!(
                "ct mark & {RECORDED:#x} == {RECORDED:#x} ct state established meta l4proto {{ tcp, udp }} \
                 update @{} {{ {key} counter }}",
                super::egress::SET_SEEN
            ),
        );
    }
    // 2. DNS: an allowlist job's own resolver on its gateway (an address of the link the packet
    //    came in by), and no other; else the resolvers the sandbox is given.
    if allowlist {
        rules.push("meta l4proto { tcp, udp } th dport 53 fib daddr . iif type local accept".into());
        rules.push(format!(
            "meta l4proto {{ tcp, udp }} th dport 53 {} {REJECT}",
            seen(super::egress::SET_REFUSED)
        ));
    } else if !s.dns.is_empty() {
        rules.push(format!(
            "ip daddr {} meta l4proto {{ tcp, udp }} th dport 53 accept",
            set(s.dns.iter().map(|a| a.to_string()))
        ));
    }
    // 3. The coordinator and the instance's upload endpoints, for uploads.
    for (addrs, port) in targets {
        rules.push(format!("ip daddr {} tcp dport {port} accept", set(addrs.iter().map(|a| a.to_string()))));
    }
    // 4. The operator's exceptions.
    for a in &s.allow {
        match a.port {
            Some(p) => {
                rules.push(format!("ip daddr {} meta l4proto {{ tcp, udp }} th dport {p} accept", a.net))
            }
            None => rules.push(format!("ip daddr {} accept", a.net)),
        }
    }
    // 5. Refused: every address of the host (any interface, the gateway too), the non-public
    //    ranges and the other jobs' subnets, broadcast and multicast of any kind.
    rules.push(format!("fib daddr type local {REJECT}"));
    // Destinations no job may reach unless allowed above them (`base::addr`).
    let mut refused = crate::base::addr::refused_v4_cidrs();
    refused.push(s.pool.to_string());
    rules.push(format!("ip daddr {} {REJECT}", set(refused)));
    rules.push("fib daddr type { broadcast, multicast, anycast } drop".into());
    rules.push("meta pkttype != unicast drop".into());
    if allowlist {
        // 6. The addresses the job's resolver answered for its allowed names (any port, or
        //    the name's port), each recorded; everything else refused and recorded.
        let hosts = super::dns::SET_HOSTS;
        let ports = super::dns::SET_PORTS;
        rules.push(format!("meta l4proto {{ tcp, udp }} ip saddr . ip daddr @{hosts} {accepted} accept"));
        rules.push(format!("ip saddr . ip daddr @{hosts} accept"));
        rules.push(format!(
            "meta l4proto {{ tcp, udp }} ip saddr . ip daddr . th dport @{ports} {accepted} accept"
        ));
        rules.push(format!("meta l4proto {{ tcp, udp }} {} {REJECT}", seen(super::egress::SET_REFUSED)));
        rules.push(REJECT.into());
    } else {
        // 6. The public internet.
        rules.push("accept".into());
    }
    let digest = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(rules.join("\n").as_bytes());
        if let Some(b) = &s.bandwidth {
            h.update(format!("\negress {}", b.egress).as_bytes());
        }
        h.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let c = format!("policy_{digest}");
    // 0. The job's egress cap, before anything is accepted: a meter keeps one token bucket
    //    per job link (EXECUTOR_NETWORK_BANDWIDTH; the ingress cap is tc's, on the link).
    if let Some(b) = &s.bandwidth {
        rules.insert(
            0,
            format!(
                "meter bw_{digest} size 65535 {{ iifname limit rate over {} bytes/second burst {} bytes }} drop",
                b.egress / 8,
                super::Bandwidth::burst(b.egress)
            ),
        );
    }
    let mut script = String::new();
    if allowlist {
        script.push_str(&sets_script());
    }
    script.push_str(&format!("add chain inet {TABLE} {c}\nflush chain inet {TABLE} {c}\n"));
    for r in rules {
        script.push_str(&format!("add rule inet {TABLE} {c} {r}\n"));
    }
    (c, script)
}

/// The sets of the allowlist jobs, shared by all of them and keyed by the job's address first:
/// what their resolvers let them reach (with the answers' timeouts), and what their chains
/// saw (an hour at most, 64Ki elements; teardown takes a job's out).
fn sets_script() -> String {
    let (hosts, ports) = (super::dns::SET_HOSTS, super::dns::SET_PORTS);
    let (seen, refused) = (super::egress::SET_SEEN, super::egress::SET_REFUSED);
    let received = super::egress::SET_RECEIVED;
    let mut s = format!(
        "add set inet {TABLE} {hosts} {{ type ipv4_addr . ipv4_addr; flags timeout; }}
add set inet {TABLE} {ports} {{ type ipv4_addr . ipv4_addr . inet_service; flags timeout; }}
"
    );
    for set in [seen, refused, received] {
        s.push_str(&format!("add set inet {TABLE} {set} {{ {RECORD_SET} }}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_and_exceptions_parse() {
        assert_eq!(Cidr::parse("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(Cidr::parse("10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
        assert!(Cidr::parse("10.1.2.3/33").is_err());
        assert!(Cidr::parse("fd00::1").is_err());
        assert_eq!(Allow::parse("10.8.0.0/16:443").unwrap().port, Some(443));
        assert_eq!(Allow::parse("10.8.0.1").unwrap().port, None);
        assert!(Allow::parse("10.8.0.1:0").is_err());
    }

    #[test]
    fn the_policy_chain_refuses_before_it_accepts() {
        let s = Settings::parse(
            Some("internet"),
            Some("10.255.0.0/16"),
            Some("10.5.0.0/16:8080"),
            Some("198.51.100.53"),
        )
        .unwrap();
        let coord = (vec!["192.0.2.1".parse().unwrap()], 3080);
        let (chain, script) = policy_chain(&s, std::slice::from_ref(&coord));
        let pos =
            |needle: &str| script.find(needle).unwrap_or_else(|| panic!("{needle:?} missing:\n{script}"));
        assert!(pos("ct state established") < pos("ip daddr { 198.51.100.53 }"));
        assert!(pos("ip daddr { 198.51.100.53 }") < pos("fib daddr type local"));
        assert!(pos("ip daddr { 192.0.2.1 } tcp dport 3080 accept") < pos("fib daddr type local"));
        assert!(
            pos("ip daddr 10.5.0.0/16 meta l4proto { tcp, udp } th dport 8080 accept") < pos("10.0.0.0/8")
        );
        for r in crate::base::addr::refused_v4_cidrs() {
            assert!(script.contains(&r), "{r}");
        }
        assert!(script.contains("10.255.0.0/16 }"), "other jobs' subnets are refused");
        assert!(script.ends_with(&format!("add rule inet executor {chain} accept\n")));
        // Other settings, another chain; the same settings, the same chain.
        assert_eq!(policy_chain(&s, std::slice::from_ref(&coord)).0, chain);
        assert_ne!(policy_chain(&s, &[]).0, chain);
        // A bandwidth cap: its own chain, the meter first.
        let capped = s.clone().with_bandwidth(Some("8mbit/4mbit")).unwrap();
        let (c2, script2) = policy_chain(&capped, std::slice::from_ref(&coord));
        assert_ne!(c2, chain);
        let first = script2.lines().nth(2).unwrap();
        assert!(
            first.contains("iifname limit rate over 500000 bytes/second burst 32768 bytes } drop"),
            "{first}"
        );
    }

    /// The allowlist chain: DNS only to the job's own resolver, the refusals before the names'
    /// sets, nothing else accepted, and the sets made with the chain.
    #[test]
    fn the_allowlist_chain_accepts_only_answers_after_the_refusals() {
        let s = Settings::parse(Some("allowlist"), None, Some("10.5.0.0/16"), Some("198.51.100.53"))
            .unwrap()
            .with_hosts(Some("web.test,port.test:8080"), super::super::DnsLimits::default())
            .unwrap();
        let (chain, script) = policy_chain(&s, &[]);
        let pos =
            |needle: &str| script.find(needle).unwrap_or_else(|| panic!("{needle:?} missing:\n{script}"));
        assert!(pos("add set inet executor egress_hosts") < pos("add chain"));
        assert!(
            pos("th dport 53 fib daddr . iif type local accept") < pos("th dport 53 add @egress_refused")
        );
        assert!(!script.contains("ip daddr { 198.51.100.53 }"), "no DNS to the upstream from the job");
        assert!(pos("10.0.0.0/8") < pos("ip saddr . ip daddr @egress_hosts"), "the refusals win");
        assert!(pos("ip daddr 10.5.0.0/16 accept") < pos("10.0.0.0/8"), "operator exceptions stay");
        assert!(pos("@egress_hosts") < pos("ip saddr . ip daddr . th dport @egress_ports"));
        assert!(script.ends_with(&format!("add rule inet executor {chain} {REJECT}\n")), "{script}");
        // The bytes: the first packet of a flow counted where it is judged (and an accepted
        // flow marked), the rest of an accepted flow's before the replies' accept.
        assert!(pos("update @egress_seen") < pos("ct state established,related accept"), "{script}");
        let marked =
            script.lines().filter(|l| l.contains("counter } ct mark set ct mark | 0x40000000 accept"));
        assert_eq!(marked.count(), 2, "{script}");
        assert!(pos("add @egress_refused { ip saddr . ip daddr . meta l4proto . th dport counter }") > 0);
        assert!(pos("add set inet executor egress_received") < pos("add chain"));
        assert!(!script.contains(&format!("{chain} accept\n")), "nothing else is accepted");
        let internet = Settings { mode: super::super::Mode::Internet, ..s.clone() };
        assert_ne!(policy_chain(&internet, &[]).0, chain);
    }

    #[test]
    fn the_table_keys_jobs_by_link_and_source_address() {
        let t = table_script(&Cidr::parse("10.255.0.0/16").unwrap());
        assert!(t.contains(MAP_TYPE.trim_start_matches("type ").split(" :").next().unwrap()));
        assert!(t.contains("iifname . ip saddr vmap @jobs\n    iifname \"exn*\" drop"));
        // What replies bring to a recorded flow, counted before the replies' accept.
        assert!(t.find("@egress_received").unwrap() < t.find("ct state established,related accept").unwrap());
        assert!(t.find("set egress_received").unwrap() < t.find("chain forward").unwrap());
        assert!(received_upgrade_script()
            .contains(&format!("insert rule inet executor forward {}", received_rule())));
    }

    /// A step's upload endpoint gets the coordinator's allowance (its address and port, only
    /// those), once; one on loopback or that does not resolve gets none and fails nothing.
    #[test]
    fn upload_endpoints_get_the_coordinators_allowance() {
        let s = Settings::parse(Some("internet"), Some("10.255.0.0/16"), None, None).unwrap();
        let endpoints: Vec<String> =
            ["https://10.9.0.7", "http://192.0.2.1:3080/x", "http://127.0.0.1:9", "nonsense"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let t = targets(Reach { coordinator: Some("http://192.0.2.1:3080"), endpoints: &endpoints }).unwrap();
        assert_eq!(
            t,
            vec![(vec!["192.0.2.1".parse().unwrap()], 3080), (vec!["10.9.0.7".parse().unwrap()], 443)]
        );
        let (_, script) = policy_chain(&s, &t);
        let accepts: Vec<&str> = script.lines().filter(|l| l.contains("tcp dport")).collect();
        assert_eq!(accepts.len(), 2, "{script}");
        assert!(accepts[1].ends_with("ip daddr { 10.9.0.7 } tcp dport 443 accept"), "{}", accepts[1]);
        assert!(script.find("10.9.0.7").unwrap() < script.find("10.0.0.0/8").unwrap(), "before the refusals");
        let bad = Reach { coordinator: Some("nonsense"), endpoints: &[] };
        assert!(targets(bad).is_err(), "the coordinator still must resolve");
    }

    #[test]
    fn a_loopback_coordinator_gets_no_rule() {
        assert_eq!(url_target("http://127.0.0.1:3080").unwrap(), None);
        assert_eq!(
            url_target("http://192.0.2.1:3080").unwrap(),
            Some((vec!["192.0.2.1".parse().unwrap()], 3080))
        );
        assert_eq!(url_target("https://192.0.2.1").unwrap().map(|c| c.1), Some(443));
    }
}
