//! Forgetting a job's connection-tracking entries when its network goes: the host's conntrack
//! table holds the job's flows (NATed out of the host) for minutes after the job, and a later
//! job given the same address would inherit them (replies of the old flows reach it, and
//! `ct state established` lets them in). Done over ctnetlink in-process (a dump of the IPv4
//! table, then one delete per entry of the address), with no `conntrack` binary.

use anyhow::{Context, Result};
use nix::errno::Errno;
use std::net::Ipv4Addr;

use super::netlink::{attrs, Msg, Socket, F_REQUEST_ACK, F_REQUEST_DUMP};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const AF_INET: u8 = 2;

/// The source and destination of a tuple attribute's data.
fn tuple_addrs(tuple: &[u8]) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for (kind, _, data) in attrs(tuple) {
        if kind == CTA_TUPLE_IP {
            for (k, _, a) in attrs(data) {
                if (k == CTA_IP_V4_SRC || k == CTA_IP_V4_DST) && a.len() == 4 {
                    out.push(Ipv4Addr::new(a[0], a[1], a[2], a[3]));
                }
            }
        }
    }
    out
}

/// The attributes that name one entry for its delete (its original tuple and its zone), when
/// either of its tuples has `addr` as a source or a destination.
fn entry_of(payload: &[u8], addr: Ipv4Addr) -> Option<Vec<u8>> {
    // The payload starts with the 4-byte nfgenmsg.
    let a = attrs(payload.get(4..)?);
    let involved = a
        .iter()
        .filter(|(k, ..)| *k == CTA_TUPLE_ORIG || *k == CTA_TUPLE_REPLY)
        .any(|(_, _, data)| tuple_addrs(data).contains(&addr));
    if !involved {
        return None;
    }
    let mut key = Vec::new();
    for (k, whole, _) in &a {
        if *k == CTA_TUPLE_ORIG || *k == CTA_ZONE {
            key.extend_from_slice(whole);
            while !key.len().is_multiple_of(4) {
                key.push(0);
            }
        }
    }
    Some(key)
}

/// Deletes every IPv4 conntrack entry of this network namespace that `addr` is a party to;
/// returns how many went. An entry gone meanwhile is not an error; a kernel without conntrack
/// has none.
pub(crate) fn forget(addr: Ipv4Addr) -> Result<usize> {
    let mut sock = Socket::netfilter()?;
    let mut dump = Msg::new((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET, F_REQUEST_DUMP);
    dump.raw(&[AF_INET, 0, 0, 0]);
    let entries = match sock.dump(dump) {
        Ok(e) => e,
        Err(Errno::ENOENT | Errno::EOPNOTSUPP | Errno::EPROTONOSUPPORT) => return Ok(0),
        Err(e) => return Err(e).context("listing the connection-tracking table"),
    };
    let keys: Vec<Vec<u8>> = entries.iter().filter_map(|(_, p)| entry_of(p, addr)).collect();
    let mut gone = 0;
    for chunk in keys.chunks(64) {
        let msgs = chunk
            .iter()
            .map(|k| {
                let mut m = Msg::new((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE, F_REQUEST_ACK);
                m.raw(&[AF_INET, 0, 0, 0]).raw(k);
                m
            })
            .collect();
        for r in sock.each(msgs).context("deleting connection-tracking entries")? {
            match r {
                Ok(()) => gone += 1,
                Err(Errno::ENOENT) => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("deleting a connection-tracking entry of {addr}"))
                }
            }
        }
    }
    Ok(gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nla(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut v = ((4 + data.len()) as u16).to_ne_bytes().to_vec();
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(data);
        while !v.len().is_multiple_of(4) {
            v.push(0);
        }
        v
    }

    fn tuple(kind: u16, src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let ip = nla(CTA_TUPLE_IP | 0x8000, &[nla(CTA_IP_V4_SRC, &src), nla(CTA_IP_V4_DST, &dst)].concat());
        let proto = nla(2 | 0x8000, &nla(1, &[6]));
        nla(kind | 0x8000, &[ip, proto].concat())
    }

    #[test]
    fn entries_of_the_address_are_picked_by_either_tuple() {
        let job: Ipv4Addr = "10.255.0.2".parse().unwrap();
        // A NATed flow of the job: original from it, reply to the host's address.
        let orig = tuple(CTA_TUPLE_ORIG, [10, 255, 0, 2], [198, 51, 100, 10]);
        let reply = tuple(CTA_TUPLE_REPLY, [198, 51, 100, 10], [192, 0, 2, 1]);
        let zone = nla(CTA_ZONE, &0u16.to_be_bytes());
        let payload =
            [vec![AF_INET, 0, 0, 0], orig.clone(), reply.clone(), nla(3, &[0, 0, 0, 8]), zone.clone()]
                .concat();
        let key = entry_of(&payload, job).expect("the job's flow");
        assert_eq!(key, [orig.clone(), zone].concat(), "the delete names the original tuple and the zone");
        // Another job's flow, and the host's own: not the job's.
        assert!(entry_of(&payload, "10.255.0.6".parse().unwrap()).is_none());
        let other =
            [vec![AF_INET, 0, 0, 0], tuple(CTA_TUPLE_ORIG, [192, 0, 2, 1], [198, 51, 100, 10])].concat();
        assert!(entry_of(&other, job).is_none());
        // Truncated or garbage input picks nothing and does not panic.
        assert!(entry_of(&payload[..7], job).is_none());
        assert!(entry_of(&[0xff; 40], job).is_none());
    }
}
