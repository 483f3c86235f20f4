//! The egress record of an `allowlist` job, gathered at teardown: every DNS question from the
//! resolver's log, and every connection the job started from two dynamic nftables sets that its
//! chain fills in the kernel (`egress_seen`, accepted; `egress_refused`, refused), with the
//! name each address came from. The kernel does the per-connection work (one set update per new
//! flow, no copy to user space), and teardown reads the sets once; the job's elements of every
//! set go with it, so the slot's next job starts clean. Each element carries a counter: the
//! bytes the job sent (every packet of an accepted flow, the first packets of a refused one),
//! and a third set, `egress_received`, filled by the table's forward chain, has the bytes the
//! replies brought (the chain marks an accepted flow's conntrack entry, `policy::RECORDED`, so
//! that its later packets, both ways, are counted without another lookup). The record waits in the state directory
//! for the `complete` stage, which logs it (`teardown.network.egress`), keeps it in the run
//! document and counts it in the metrics.

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use super::dns;
use super::{netlink, TABLE};

use super::dns::Question;
use crate::document::egress::{Connection, Egress, Lookup, ROWS};

/// The set of connections an allowlist job started and its chain accepted.
pub(crate) const SET_SEEN: &str = "egress_seen";
/// The set of connections it started and its chain refused.
pub(crate) const SET_REFUSED: &str = "egress_refused";
/// The bytes that replies to the accepted connections brought, keyed as `egress_seen`.
pub(crate) const SET_RECEIVED: &str = "egress_received";
fn record_file(state_dir: &Path, sandbox: &str) -> PathBuf {
    state_dir.join("network").join("egress").join(format!("{sandbox}.json"))
}

fn proto_name(n: u8) -> String {
    match n {
        6 => "tcp".into(),
        17 => "udp".into(),
        n => n.to_string(),
    }
}

/// One recorded connection's key: (address, protocol, port).
type Flow = (Ipv4Addr, u8, u16);

/// The job's connections in one of the record sets, each as (address, protocol, port), its
/// bytes (none for an element without a counter, made by an executor before the byte counts),
/// and its key for the delete (`job . address . protocol . port`, each field 4 bytes).
fn connections_in(elems: &[netlink::SetElement], job: Ipv4Addr) -> Vec<(Flow, Option<u64>, Vec<u8>)> {
    elems
        .iter()
        .filter(|e| e.key.len() == 16 && e.key[..4] == job.octets())
        .map(|e| {
            let k = &e.key;
            let a = Ipv4Addr::new(k[4], k[5], k[6], k[7]);
            ((a, k[8], u16::from_be_bytes([k[12], k[13]])), e.counter.map(|c| c.0), k.clone())
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
    // What the replies brought, read first: its elements go last (below), once nothing marks
    // them any more.
    let received: HashMap<Flow, Option<u64>> =
        connections_in(&nf.set_elements(TABLE, SET_RECEIVED).unwrap_or_default(), job)
            .into_iter()
            .map(|(flow, bytes, _)| (flow, bytes))
            .collect();
    for (set, verdict) in [(SET_REFUSED, "refused"), (SET_SEEN, "accepted")] {
        let elems = nf.set_elements(TABLE, set).unwrap_or_default();
        for (flow, sent, key) in connections_in(&elems, job) {
            let (address, p, port) = flow;
            // An accepted flow that no reply reached received nothing; a refused one, nothing.
            let got =
                if verdict == "accepted" { received.get(&flow).copied().unwrap_or(Some(0)) } else { None };
            rec.connections_total += 1;
            if verdict == "accepted" {
                rec.bytes_sent_total += sent.unwrap_or(0);
                rec.bytes_received_total += got.unwrap_or(0);
            }
            *counts.entry(("connection".into(), verdict.into())).or_default() += 1;
            if rec.connections.len() < ROWS {
                rec.connections.push(Connection {
                    address,
                    port,
                    protocol: proto_name(p),
                    name: names.get(&address).cloned(),
                    verdict: verdict.into(),
                    bytes_sent: sent,
                    bytes_received: got,
                });
            }
            let _ = nf.del_element_of(netlink::NFPROTO_INET, TABLE, set, &key);
        }
    }
    forget_answers_with(&mut nf, job);
    forget_received_with(&mut nf, job);
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

/// Takes the job's elements out of the sets its resolver fills (what the resolver let it
/// reach): the slot's next job must not inherit them.
pub(crate) fn forget_answers(job: Ipv4Addr) -> Result<()> {
    forget_answers_with(&mut netlink::Socket::netfilter()?, job);
    Ok(())
}

/// Takes the job's elements out of `egress_received` again once its flows are forgotten: a
/// late reply to a flow still tracked (the job gone, its link not yet) puts one back after
/// the record was read, which the slot's next job must not inherit.
pub(crate) fn forget_received(job: Ipv4Addr) -> Result<()> {
    forget_received_with(&mut netlink::Socket::netfilter()?, job);
    Ok(())
}

fn forget_received_with(nf: &mut netlink::Socket, job: Ipv4Addr) {
    for key in nf.set_keys(TABLE, SET_RECEIVED).unwrap_or_default() {
        if key.len() == 16 && key[..4] == job.octets() {
            let _ = nf.del_element_of(netlink::NFPROTO_INET, TABLE, SET_RECEIVED, &key);
        }
    }
}

fn forget_answers_with(nf: &mut netlink::Socket, job: Ipv4Addr) {
    for set in [dns::SET_HOSTS, dns::SET_PORTS] {
        for key in nf.set_keys(TABLE, set).unwrap_or_default() {
            if key.len() >= 8 && key[..4] == job.octets() {
                let _ = nf.del_element_of(netlink::NFPROTO_INET, TABLE, set, &key);
            }
        }
    }
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
    fn the_jobs_connections_are_read_from_the_set_keys() {
        let job = Ipv4Addr::new(10, 255, 0, 2);
        let mut mine = vec![10, 255, 0, 2, 198, 51, 100, 10];
        mine.extend_from_slice(&[6, 0, 0, 0, 0, 80, 0, 0]);
        let mut old = vec![10, 255, 0, 2, 198, 51, 100, 11];
        old.extend_from_slice(&[17, 0, 0, 0, 0, 53, 0, 0]);
        let mut other = vec![10, 255, 0, 6, 198, 51, 100, 10];
        other.extend_from_slice(&[17, 0, 0, 0, 0, 53, 0, 0]);
        let e = |key: &Vec<u8>, counter| netlink::SetElement { key: key.clone(), counter };
        let elems = [
            e(&mine, Some((1_048_700, 800))),
            e(&old, None),
            e(&other, Some((1, 1))),
            e(&vec![1, 2, 3], None),
        ];
        let got = connections_in(&elems, job);
        assert_eq!(
            got,
            vec![
                ((Ipv4Addr::new(198, 51, 100, 10), 6, 80), Some(1_048_700), mine),
                ((Ipv4Addr::new(198, 51, 100, 11), 17, 53), None, old),
            ]
        );
        assert_eq!(proto_name(6), "tcp");
        assert_eq!(proto_name(17), "udp");
    }
}
