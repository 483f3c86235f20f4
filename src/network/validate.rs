//! `validate`'s lines about the network: root, nftables, the pool against the host's addresses,
//! the resolvers, the bandwidth caps, forwarding and the table.

use anyhow::{bail, Context, Result};
use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Stdio;

use super::{
    guard, host_resolvers, missing, nft_list, table_exists, Cidr, Mode, Settings, IF_PREFIX, JOB_PREFIX,
    TABLE,
};

/// The line of `validate` about DNS: the resolvers, or why there are none and what to do.
fn dns_line(dns: &[Ipv4Addr], stubs: &[Ipv4Addr]) -> String {
    if !dns.is_empty() {
        return format!("network dns: {}", dns.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", "));
    }
    let why = if stubs.is_empty() {
        "/etc/resolv.conf names no IPv4 resolver: set EXECUTOR_DNS_SERVERS".to_string()
    } else {
        format!(
            "/etc/resolv.conf names only the loopback stub resolver {} (systemd-resolved or similar), which no \
             sandbox can reach: set EXECUTOR_DNS_SERVERS to the stub's upstream servers (`resolvectl status` \
             lists them)",
            stubs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
        )
    };
    format!("network dns: NONE: {why}; until then jobs reach addresses but resolve no names")
}

/// The host's IPv4 addresses inside `pool` that are not on a job link (`ip -o -4 addr`).
fn pool_conflicts(pool: &Cidr, ip_addr_output: &str) -> Vec<String> {
    let mut out = Vec::new();
    for l in ip_addr_output.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        let (Some(dev), Some(pos)) = (w.get(1), w.iter().position(|x| *x == "inet")) else { continue };
        let Some(addr) =
            w.get(pos + 1).and_then(|a| a.split('/').next()).and_then(|a| a.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        let mask = if pool.prefix == 0 { 0 } else { u32::MAX << (32 - pool.prefix) };
        if !dev.starts_with(IF_PREFIX) && u32::from(addr) & mask == u32::from(pool.addr) {
            out.push(format!("{addr} on {dev}"));
        }
    }
    out
}

/// `validate`'s lines about the network, or an error naming what is missing: root, nftables
/// (the command and the kernel's support), the pool (not overlapping the host's addresses),
/// forwarding, and the resolvers (a loopback stub resolver without `EXECUTOR_DNS_SERVERS`).
pub fn check(s: &Settings, state_dir: &Path) -> Result<Vec<String>> {
    let mut out = vec![format!("network: {:?}", s.mode).to_lowercase()];
    let (_, stubs) = host_resolvers(&fs::read_to_string("/etc/resolv.conf").unwrap_or_default());
    if s.mode == Mode::None {
        return Ok(out);
    }
    let mode = format!("{:?}", s.mode).to_lowercase();
    let missing = missing();
    if !missing.is_empty() {
        bail!(
            "EXECUTOR_NETWORK={mode} cannot work here: {} (or set EXECUTOR_NETWORK=none for loopback-only jobs)",
            missing.join("; ")
        );
    }
    if nft_list(&["tables"]).is_none() {
        bail!(
            "EXECUTOR_NETWORK={mode} cannot work here: `nft list tables` fails (the kernel lacks nf_tables, \
             or nftables is not permitted in this namespace)"
        );
    }
    let addrs = crate::base::proc::command("ip")
        .args(["-o", "-4", "addr", "show"])
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let conflicts = pool_conflicts(&s.pool, &addrs);
    if !conflicts.is_empty() {
        bail!(
            "EXECUTOR_NETWORK_CIDR {} overlaps the host's own addresses ({}): choose a pool no network of \
             this host uses",
            s.pool,
            conflicts.join(", ")
        );
    }
    out.push(format!(
        "network pool {}: {} job subnets of /{JOB_PREFIX}, free of host addresses",
        s.pool,
        s.slots()
    ));
    out.push(dns_line(&s.dns, &stubs));
    if s.mode == Mode::Allowlist {
        out.extend(allowlist_lines(s)?);
    }
    if let Some(b) = &s.bandwidth {
        if which::which("tc").is_err() {
            bail!("EXECUTOR_NETWORK_BANDWIDTH needs the tc command (apt-get install iproute2)");
        }
        out.push(format!(
            "network bandwidth caps: {} bit/s in, {} bit/s out per job (tc)",
            b.ingress, b.egress
        ));
    }
    out.push(guard::forwarding_line(state_dir));
    out.push(format!(
        "network nftables: works; table inet {TABLE} {}",
        if table_exists() { "present" } else { "not yet created (made at the first job)" }
    ));
    Ok(out)
}

/// The allowlist mode's lines: an upstream for the jobs' resolvers, the names, the bounds, and
/// the kernel's support for what the jobs' chains use (sets with timeouts filled from the
/// packet path, `fib` by the incoming link), checked with `nft --check` in a scratch table.
fn allowlist_lines(s: &Settings) -> Result<Vec<String>> {
    if s.dns.is_empty() {
        bail!(
            "EXECUTOR_NETWORK=allowlist needs an upstream resolver for the jobs' resolvers: set \
             EXECUTOR_DNS_SERVERS"
        );
    }
    let scratch = "executor_validate";
    let script = format!(
        "table inet {scratch} {{
  set h {{ type ipv4_addr . ipv4_addr; flags timeout; }}
  set seen {{ type ipv4_addr . ipv4_addr . inet_proto . inet_service; flags dynamic,timeout; timeout 1h; size 65536; }}
  chain c {{
    meta l4proto {{ tcp, udp }} th dport 53 fib daddr . iif type local accept
    meta l4proto {{ tcp, udp }} ip saddr . ip daddr @h add @seen {{ ip saddr . ip daddr . meta l4proto . th dport }} accept
  }}
}}
"
    );
    let mut cmd = crate::base::proc::command("nft");
    cmd.args(["--check", "-f", "-"]);
    super::run(cmd, "checking the allowlist's nftables rules", Some(&script)).context(
        "EXECUTOR_NETWORK=allowlist cannot work here: the kernel's nftables lacks sets with timeouts, \
         dynamic sets or fib",
    )?;
    let names = if s.hosts.is_empty() {
        "none (jobs reach only the coordinator and EXECUTOR_NETWORK_ALLOW)".to_string()
    } else {
        s.hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>().join(", ")
    };
    let l = &s.dns_limits;
    Ok(vec![
        format!("network allowlist: {names}"),
        format!(
            "network allowlist resolver: one per job on its gateway, forwarding to the upstreams above; \
             answers reachable for their TTL + {}s; at most {} questions/s and names of {} characters",
            l.grace_s, l.rate, l.max_name
        ),
        "network allowlist rules: nftables sets with timeouts, dynamic sets and fib work".into(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_explains_a_loopback_stub_and_finds_pool_conflicts() {
        let line = dns_line(&[], &["127.0.0.53".parse().unwrap()]);
        assert!(line.contains("127.0.0.53") && line.contains("EXECUTOR_DNS_SERVERS"), "{line}");
        assert_eq!(dns_line(&["10.0.0.2".parse().unwrap()], &[]), "network dns: 10.0.0.2");
        let ip = "1: lo    inet 127.0.0.1/8 scope host lo\n2: eth0    inet 10.255.3.4/24 brd x\n\
                  9: exn0    inet 10.255.0.1/30 scope global exn0\n3: eth1    inet 192.0.2.1/24\n";
        let pool = Cidr::parse("10.255.0.0/16").unwrap();
        assert_eq!(pool_conflicts(&pool, ip), vec!["10.255.3.4 on eth0".to_string()]);
        assert!(pool_conflicts(&Cidr::parse("10.254.0.0/16").unwrap(), ip).is_empty());
    }
}
