//! The egress record of an `allowlist` job, gathered at teardown: every DNS question from the
//! resolver's log, and every connection the job started from two dynamic nftables sets that its
//! chain fills in the kernel (`egress_seen`, accepted; `egress_refused`, refused), with the
//! name each address came from. The kernel does the per-connection work (one set update per new
//! flow, no copy to user space), and teardown reads the sets once; the job's elements of every
//! set go with it, so the slot's next job starts clean. The record waits in the state directory
//! for the `complete` stage, which logs it (`teardown.network.egress`), keeps it in the run
//! document and counts it in the metrics.

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use super::dns::{self, key_hosts, key_ports};
use super::{netlink, nft_list, TABLE};

use super::dns::Question;
use crate::document::egress::{Connection, Egress, Lookup, ROWS};

/// The set of connections an allowlist job started and its chain accepted.
pub(crate) const SET_SEEN: &str = "egress_seen";
/// The set of connections it started and its chain refused.
pub(crate) const SET_REFUSED: &str = "egress_refused";
fn record_file(state_dir: &Path, sandbox: &str) -> PathBuf {
    state_dir.join("network").join("egress").join(format!("{sandbox}.json"))
}

/// The job's elements of a set, from `nft list set`: each element's fields after the job's
/// address (`A . B . tcp . 80` gives `[B, tcp, 80]`).
fn elements_of(set: &str, job: Ipv4Addr) -> Vec<Vec<String>> {
    let text = nft_list(&["set", "inet", TABLE, set]).unwrap_or_default();
    let Some(body) = text.split("elements = {").nth(1) else { return vec![] };
    let body = body.split('}').next().unwrap_or("");
    let job = job.to_string();
    body.split(',')
        .filter_map(|e| {
            let e = e.split(" timeout ").next()?.split(" expires ").next()?;
            let f: Vec<String> = e.split(" . ").map(|s| s.trim().to_string()).collect();
            (f.first() == Some(&job)).then(|| f[1..].to_vec())
        })
        .collect()
}

fn proto_number(p: &str) -> Option<u8> {
    match p {
        "tcp" | "6" => Some(6),
        "udp" | "17" => Some(17),
        other => other.parse().ok(),
    }
}

fn proto_name(n: u8) -> String {
    match n {
        6 => "tcp".into(),
        17 => "udp".into(),
        n => n.to_string(),
    }
}

/// The connections of one of the two record sets, each as (address, protocol, port), and
/// their keys for the delete.
fn connections_in(set: &str, job: Ipv4Addr) -> Vec<((Ipv4Addr, u8, u16), Vec<u8>)> {
    elements_of(set, job)
        .into_iter()
        .filter_map(|f| {
            let (a, p, port) = (
                f.first()?.parse::<Ipv4Addr>().ok()?,
                proto_number(f.get(1)?)?,
                f.get(2)?.parse::<u16>().ok()?,
            );
            let mut key = key_hosts(job, a);
            key.extend_from_slice(&[p, 0, 0, 0]);
            key.extend_from_slice(&port.to_be_bytes());
            key.extend_from_slice(&[0, 0]);
            Some(((a, p, port), key))
        })
        .collect()
}

/// Gathers the egress record of a job whose resolver has stopped, removes the job's elements
/// from every egress set, and keeps the record for [`take`]. Nothing when the job had no
/// resolver (not an allowlist job).
pub(crate) fn gather(state_dir: &Path, sandbox: &str, job: Ipv4Addr) -> Result<()> {
    let log = dns::log_file(state_dir, sandbox);
    let Ok(text) = fs::read_to_string(&log) else { return Ok(()) };
    let mut rec = Egress::default();
    let mut counts: HashMap<(String, String), usize> = HashMap::new();
    let mut names: HashMap<Ipv4Addr, String> = HashMap::new();
    for line in text.lines() {
        rec.lookups_total += 1;
        let Ok(q) = serde_json::from_str::<Question>(line) else {
            *counts.entry(("dns".into(), "not listed".into())).or_default() += 1;
            continue;
        };
        *counts.entry(("dns".into(), q.verdict.clone())).or_default() += 1;
        for a in &q.answers {
            names.insert(*a, q.name.clone());
        }
        if rec.lookups.len() < ROWS {
            rec.lookups.push(Lookup { name: q.name, kind: q.kind, verdict: q.verdict, answers: q.answers });
        }
    }
    let mut nf = netlink::Socket::netfilter()?;
    for (set, verdict) in [(SET_REFUSED, "refused"), (SET_SEEN, "accepted")] {
        for ((address, p, port), key) in connections_in(set, job) {
            rec.connections_total += 1;
            *counts.entry(("connection".into(), verdict.into())).or_default() += 1;
            if rec.connections.len() < ROWS {
                rec.connections.push(Connection {
                    address,
                    port,
                    protocol: proto_name(p),
                    name: names.get(&address).cloned(),
                    verdict: verdict.into(),
                });
            }
            let _ = nf.del_element_of(netlink::NFPROTO_INET, TABLE, set, &key);
        }
    }
    // What the resolver let the job reach: the slot's next job must not inherit it.
    for f in elements_of(dns::SET_HOSTS, job) {
        if let Some(a) = f.first().and_then(|a| a.parse().ok()) {
            let _ = nf.del_element_of(netlink::NFPROTO_INET, TABLE, dns::SET_HOSTS, &key_hosts(job, a));
        }
    }
    for f in elements_of(dns::SET_PORTS, job) {
        if let (Some(a), Some(p)) =
            (f.first().and_then(|a| a.parse().ok()), f.get(1).and_then(|p| p.parse().ok()))
        {
            let _ = nf.del_element_of(netlink::NFPROTO_INET, TABLE, dns::SET_PORTS, &key_ports(job, a, p));
        }
    }
    let mut verdicts: Vec<(String, String, usize)> =
        counts.into_iter().map(|((k, v), n)| (k, v, n)).collect();
    verdicts.sort();
    rec.verdicts = verdicts;
    let file = record_file(state_dir, sandbox);
    if let Some(d) = file.parent() {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    crate::base::fs::write_atomic(&file, &serde_json::to_vec(&rec)?)?;
    let _ = fs::remove_file(&log);
    Ok(())
}

/// The egress record that a teardown of `sandbox` gathered, taken out of the state directory.
pub fn take(state_dir: &Path, sandbox: &str) -> Option<Egress> {
    let file = record_file(state_dir, sandbox);
    let rec = serde_json::from_slice(&fs::read(&file).ok()?).ok();
    let _ = fs::remove_file(&file);
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_read_by_name_or_number() {
        assert_eq!(proto_number("tcp"), Some(6));
        assert_eq!(proto_number("17"), Some(17));
        assert_eq!(proto_name(17), "udp");
    }
}
