//! The few netlink requests a job network needs, made in-process instead of through `ip` and
//! `nft` child processes (each of which costs about 10 ms): network namespaces (what `ip netns
//! add/del` does), a veth pair with its peer in the job's namespace, addresses, links up, a
//! default route (rtnetlink), and adding or removing one element of an nftables map
//! (nfnetlink, in a batch). All through safe `nix` sockets: no unsafe code here.

use anyhow::{anyhow, bail, Context, Result};
use nix::errno::Errno;
use nix::sys::socket::{
    bind, recv, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::{TimeVal, TimeValLike};
use std::fs;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const F_REQUEST: u16 = 1;
const F_ACK: u16 = 4;
const F_EXCL: u16 = 0x200;
const F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 0x8000;

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const IFF_UP: u32 = 1;
const AF_INET: u8 = 2;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFT_MSG_GETSETELEM: u16 = 13;
pub(crate) const NFPROTO_INET: u8 = 1;
pub(crate) const NFPROTO_ARP: u8 = 3;
const F_DUMP: u16 = 0x300;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_SET_ELEM_EXPR: u16 = 7;
const NFTA_SET_ELEM_EXPRESSIONS: u16 = 11;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFT_JUMP: i32 = -3;

/// An attribute type without its nested and byte-order flags.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// The attributes of a netlink payload: (type without flags, the whole attribute, its data).
pub(crate) fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8], &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        if len < 4 || len > b.len() {
            break;
        }
        let kind = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        out.push((kind, &b[..len], &b[4..len]));
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    out
}

/// One element of a set, as a dump gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SetElement {
    pub key: Vec<u8>,
    /// Its counter's (bytes, packets), when it has one.
    pub counter: Option<(u64, u64)>,
}

/// The elements of one `NFT_MSG_NEWSETELEM` message of a dump (its attributes after the
/// nfgenmsg): each element's key and its counter, whether the kernel nests it as the one
/// expression (`NFTA_SET_ELEM_EXPR`) or in a list of them (`NFTA_SET_ELEM_EXPRESSIONS`).
pub(crate) fn set_elements_of(list_attrs: &[u8]) -> Vec<SetElement> {
    let mut out = Vec::new();
    for (k, _, list) in attrs(list_attrs) {
        if k != NFTA_SET_ELEM_LIST_ELEMENTS {
            continue;
        }
        for (_, _, elem) in attrs(list) {
            let (mut key, mut counter) = (None, None);
            for (ek, _, v) in attrs(elem) {
                match ek {
                    NFTA_SET_ELEM_KEY => {
                        key = attrs(v)
                            .into_iter()
                            .find(|(dk, _, _)| *dk == NFTA_DATA_VALUE)
                            .map(|a| a.2.to_vec())
                    }
                    NFTA_SET_ELEM_EXPR => counter = counter.or(counter_of(v)),
                    NFTA_SET_ELEM_EXPRESSIONS => {
                        for (_, _, e) in attrs(v).into_iter().filter(|a| a.0 == NFTA_LIST_ELEM) {
                            counter = counter.or(counter_of(e));
                        }
                    }
                    _ => {}
                }
            }
            if let Some(key) = key {
                out.push(SetElement { key, counter });
            }
        }
    }
    out
}

/// A `counter` expression's (bytes, packets): its name, then its data (64-bit big-endian).
fn counter_of(expr: &[u8]) -> Option<(u64, u64)> {
    let a = attrs(expr);
    a.iter().find(|x| x.0 == NFTA_EXPR_NAME).filter(|x| x.2.split(|b| *b == 0).next() == Some(b"counter"))?;
    let data = a.iter().find(|x| x.0 == NFTA_EXPR_DATA)?.2;
    let be64 = |want: u16| {
        attrs(data)
            .into_iter()
            .find(|x| x.0 == want)
            .and_then(|x| x.2.try_into().ok())
            .map(u64::from_be_bytes)
    };
    Some((be64(NFTA_COUNTER_BYTES)?, be64(NFTA_COUNTER_PACKETS)?))
}

/// Interface names are at most 15 bytes and a NUL.
const IFNAMSIZ: usize = 16;

/// One netlink message being built: the header, a fixed struct, then attributes.
pub(crate) struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

pub(crate) const F_REQUEST_ACK: u16 = F_REQUEST | F_ACK;
pub(crate) const F_REQUEST_DUMP: u16 = F_REQUEST | F_DUMP;

impl Msg {
    pub(crate) fn new(kind: u16, flags: u16) -> Msg {
        let mut buf = vec![0u8; 16];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        Msg { buf, nests: vec![] }
    }
    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }
    pub(crate) fn raw(&mut self, b: &[u8]) -> &mut Msg {
        self.buf.extend_from_slice(b);
        self.pad();
        self
    }
    pub(crate) fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Msg {
        self.buf.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.raw(data)
    }
    fn attr_str(&mut self, kind: u16, s: &str) -> &mut Msg {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.attr(kind, &v)
    }
    fn begin(&mut self, kind: u16) -> &mut Msg {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }
    fn end(&mut self) -> &mut Msg {
        let start = self.nests.pop().expect("a nested attribute to end");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }
    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

/// The fixed header of link messages (`struct ifinfomsg`).
fn ifinfomsg(index: i32, flags: u32, change: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[4..8].copy_from_slice(&index.to_ne_bytes());
    b[8..12].copy_from_slice(&flags.to_ne_bytes());
    b[12..16].copy_from_slice(&change.to_ne_bytes());
    b
}

/// A netlink socket of one protocol, bound to the network namespace of the thread that made it.
pub(crate) struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    fn open(proto: SockProtocol) -> Result<Socket> {
        let fd = socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, proto)
            .context("opening a netlink socket")?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).context("binding a netlink socket")?;
        // A kernel that does not answer is an error, not a hang.
        setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::seconds(10))
            .context("setting a netlink socket's timeout")?;
        Ok(Socket { fd, seq: 0 })
    }

    /// An rtnetlink socket (links, addresses, routes) in the calling thread's namespace.
    pub(crate) fn route() -> Result<Socket> {
        Socket::open(SockProtocol::NetlinkRoute)
    }

    /// An nfnetlink socket (nftables) in the calling thread's namespace.
    pub(crate) fn netfilter() -> Result<Socket> {
        Socket::open(SockProtocol::NetlinkNetFilter)
    }

    /// Sends `msgs` as one datagram; those flagged `F_ACK` are answered. Returns the payloads
    /// of the non-error replies, or the first error the kernel reports.
    fn request(&mut self, msgs: Vec<Msg>) -> Result<Vec<Vec<u8>>, Errno> {
        let mut out = Vec::new();
        let mut waiting = Vec::new();
        for m in msgs {
            self.seq = self.seq.wrapping_add(1);
            let flags = u16::from_ne_bytes([m.buf[6], m.buf[7]]);
            if flags & F_ACK != 0 {
                waiting.push(self.seq);
            }
            out.extend_from_slice(&m.finish(self.seq));
        }
        send(self.fd.as_raw_fd(), &out, MsgFlags::empty())?;
        let mut replies = Vec::new();
        let mut first_err = None;
        let mut buf = vec![0u8; 65536];
        while !waiting.is_empty() {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            let mut at = 0;
            while at + 16 <= n {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or_default()) as usize;
                if len < 16 || at + len > n {
                    return Err(Errno::EBADMSG);
                }
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                let seq = u32::from_ne_bytes(buf[at + 8..at + 12].try_into().unwrap_or_default());
                let payload = &buf[at + 16..at + len];
                match kind {
                    NLMSG_ERROR if payload.len() >= 4 => {
                        let code = i32::from_ne_bytes(payload[0..4].try_into().unwrap_or_default());
                        waiting.retain(|s| *s != seq);
                        if code != 0 && first_err.is_none() {
                            first_err = Some(Errno::from_raw(-code));
                        }
                    }
                    NLMSG_DONE => {}
                    _ => replies.push(payload.to_vec()),
                }
                at += (len + 3) & !3;
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(replies),
        }
    }

    /// The index of link `name`.
    pub(crate) fn link_index(&mut self, name: &str) -> Result<u32> {
        let mut m = Msg::new(RTM_GETLINK, F_REQUEST | F_ACK);
        m.raw(&ifinfomsg(0, 0, 0)).attr_str(IFLA_IFNAME, name);
        let replies = self.request(vec![m]).with_context(|| format!("looking up link {name}"))?;
        let r =
            replies.first().filter(|r| r.len() >= 8).ok_or_else(|| anyhow!("no answer for link {name}"))?;
        Ok(i32::from_ne_bytes(r[4..8].try_into()?) as u32)
    }

    /// A veth pair: `host` here, `peer` in the namespace open as `netns`.
    pub(crate) fn add_veth(&mut self, host: &str, peer: &str, netns: &impl AsFd) -> Result<()> {
        let mut m = Msg::new(RTM_NEWLINK, F_REQUEST | F_ACK | F_CREATE | F_EXCL);
        m.raw(&ifinfomsg(0, 0, 0)).attr_str(IFLA_IFNAME, host);
        m.begin(IFLA_LINKINFO).attr_str(IFLA_INFO_KIND, "veth").begin(IFLA_INFO_DATA).begin(VETH_INFO_PEER);
        m.raw(&ifinfomsg(0, 0, 0))
            .attr_str(IFLA_IFNAME, peer)
            .attr(IFLA_NET_NS_FD, &(netns.as_fd().as_raw_fd() as u32).to_ne_bytes());
        m.end().end().end();
        self.request(vec![m]).with_context(|| format!("creating veth pair {host}/{peer}"))?;
        Ok(())
    }

    /// Sets link `index` up.
    pub(crate) fn link_up(&mut self, index: u32) -> Result<()> {
        let mut m = Msg::new(RTM_NEWLINK, F_REQUEST | F_ACK);
        m.raw(&ifinfomsg(index as i32, IFF_UP, IFF_UP));
        self.request(vec![m]).with_context(|| format!("setting link {index} up"))?;
        Ok(())
    }

    /// Adds `addr/prefix` to link `index`.
    pub(crate) fn add_address(&mut self, index: u32, addr: Ipv4Addr, prefix: u8) -> Result<()> {
        let mut m = Msg::new(RTM_NEWADDR, F_REQUEST | F_ACK | F_CREATE | F_EXCL);
        let mut hdr = [0u8; 8];
        hdr[0] = AF_INET;
        hdr[1] = prefix;
        hdr[4..8].copy_from_slice(&index.to_ne_bytes());
        m.raw(&hdr).attr(IFA_LOCAL, &addr.octets()).attr(IFA_ADDRESS, &addr.octets());
        self.request(vec![m]).with_context(|| format!("adding address {addr}/{prefix} to link {index}"))?;
        Ok(())
    }

    /// The default route via `gateway` on link `index` (main table).
    pub(crate) fn add_default_route(&mut self, index: u32, gateway: Ipv4Addr) -> Result<()> {
        let mut m = Msg::new(RTM_NEWROUTE, F_REQUEST | F_ACK | F_CREATE | F_EXCL);
        // family, dst_len, src_len, tos, table main, protocol boot, scope universe, unicast.
        m.raw(&[AF_INET, 0, 0, 0, 254, 3, 0, 1, 0, 0, 0, 0])
            .attr(RTA_GATEWAY, &gateway.octets())
            .attr(RTA_OIF, &index.to_ne_bytes());
        self.request(vec![m]).with_context(|| format!("adding the default route via {gateway}"))?;
        Ok(())
    }

    /// Deletes link `name` (a veth takes its peer with it). `Ok(false)` when there is none.
    pub(crate) fn del_link(&mut self, name: &str) -> Result<bool> {
        let mut m = Msg::new(RTM_DELLINK, F_REQUEST | F_ACK);
        m.raw(&ifinfomsg(0, 0, 0)).attr_str(IFLA_IFNAME, name);
        match self.request(vec![m]) {
            Ok(_) => Ok(true),
            Err(Errno::ENODEV) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("deleting link {name}")),
        }
    }

    /// One nfnetlink batch holding one message.
    fn nft_batch(&mut self, m: Msg) -> Result<(), Errno> {
        let batch = |kind: u16| {
            let mut b = Msg::new(kind, F_REQUEST);
            // nfgenmsg: family unspec, version 0, res_id = the subsystem (big endian).
            b.raw(&[0, 0, 0, NFNL_SUBSYS_NFTABLES as u8]);
            b
        };
        self.request(vec![batch(NFNL_MSG_BATCH_BEGIN), m, batch(NFNL_MSG_BATCH_END)]).map(|_| ())
    }

    fn setelem_msg(kind: u16, flags: u16, family: u8, table: &str, set: &str, key: &[u8]) -> Msg {
        let mut m = Msg::new((NFNL_SUBSYS_NFTABLES << 8) | kind, F_REQUEST | F_ACK | flags);
        m.raw(&[family, 0, 0, 0])
            .attr_str(NFTA_SET_ELEM_LIST_TABLE, table)
            .attr_str(NFTA_SET_ELEM_LIST_SET, set)
            .begin(NFTA_SET_ELEM_LIST_ELEMENTS)
            .begin(NFTA_LIST_ELEM)
            .begin(NFTA_SET_ELEM_KEY)
            .attr(NFTA_DATA_VALUE, key)
            .end();
        m
    }

    /// Adds `key : jump chain` to verdict map `set` of table `inet table` (the same element
    /// already there is not an error; one with another verdict is).
    pub(crate) fn add_jump_element(
        &mut self,
        table: &str,
        set: &str,
        key: &[u8],
        chain: &str,
    ) -> Result<(), Errno> {
        let mut m = Socket::setelem_msg(NFT_MSG_NEWSETELEM, F_CREATE, NFPROTO_INET, table, set, key);
        m.begin(NFTA_SET_ELEM_DATA)
            .begin(NFTA_DATA_VERDICT)
            .attr(NFTA_VERDICT_CODE, &NFT_JUMP.to_be_bytes())
            .attr_str(NFTA_VERDICT_CHAIN, chain)
            .end()
            .end();
        m.end().end();
        self.nft_batch(m)
    }

    /// Removes the element `key` of map `set` of table `inet table`.
    pub(crate) fn del_element(&mut self, table: &str, set: &str, key: &[u8]) -> Result<(), Errno> {
        self.del_element_of(NFPROTO_INET, table, set, key)
    }

    /// Removes the element `key` of set or map `set` of table `table` of `family`.
    pub(crate) fn del_element_of(
        &mut self,
        family: u8,
        table: &str,
        set: &str,
        key: &[u8],
    ) -> Result<(), Errno> {
        let mut m = Socket::setelem_msg(NFT_MSG_DELSETELEM, 0, family, table, set, key);
        m.end().end();
        self.nft_batch(m)
    }

    /// Adds `key` to plain set `set` of table `table` of `family` (already there: not an
    /// error).
    pub(crate) fn add_element_of(
        &mut self,
        family: u8,
        table: &str,
        set: &str,
        key: &[u8],
    ) -> Result<(), Errno> {
        let mut m = Socket::setelem_msg(NFT_MSG_NEWSETELEM, F_CREATE, family, table, set, key);
        m.end().end();
        self.nft_batch(m)
    }

    /// Puts `key` into set `set` of table `inet table` for `timeout_ms` from now: an element
    /// already there is taken out first, so that its timeout starts again (a kernel keeps the
    /// old timeout of an element added again).
    pub(crate) fn put_timed_element(
        &mut self,
        table: &str,
        set: &str,
        key: &[u8],
        timeout_ms: u64,
    ) -> Result<(), Errno> {
        match self.del_element_of(NFPROTO_INET, table, set, key) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(e),
        }
        let mut m = Socket::setelem_msg(NFT_MSG_NEWSETELEM, F_CREATE, NFPROTO_INET, table, set, key);
        m.attr(NFTA_SET_ELEM_TIMEOUT, &timeout_ms.to_be_bytes());
        m.end().end();
        self.nft_batch(m)
    }

    /// The keys of every element of set `set` of table `inet table` (a dump over netlink, with
    /// no `nft` process).
    pub(crate) fn set_keys(&mut self, table: &str, set: &str) -> Result<Vec<Vec<u8>>, Errno> {
        Ok(self.set_elements(table, set)?.into_iter().map(|e| e.key).collect())
    }

    /// Every element of an `inet` set: its key and, for an element made with a `counter`, its
    /// bytes and packets.
    pub(crate) fn set_elements(&mut self, table: &str, set: &str) -> Result<Vec<SetElement>, Errno> {
        let mut m = Msg::new((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM, F_REQUEST_DUMP);
        m.raw(&[NFPROTO_INET, 0, 0, 0])
            .attr_str(NFTA_SET_ELEM_LIST_TABLE, table)
            .attr_str(NFTA_SET_ELEM_LIST_SET, set);
        let mut out = Vec::new();
        for (_, payload) in self.dump(m)? {
            out.extend(set_elements_of(payload.get(4..).unwrap_or_default()));
        }
        Ok(out)
    }

    /// Sends a dump request and returns every message of the answer (until `NLMSG_DONE`), each
    /// as its type and payload.
    pub(crate) fn dump(&mut self, m: Msg) -> Result<Vec<(u16, Vec<u8>)>, Errno> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        send(self.fd.as_raw_fd(), &m.finish(seq), MsgFlags::empty())?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            let mut at = 0;
            while at + 16 <= n {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or_default()) as usize;
                if len < 16 || at + len > n {
                    return Err(Errno::EBADMSG);
                }
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                let payload = &buf[at + 16..at + len];
                match kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR if payload.len() >= 4 => {
                        let code = i32::from_ne_bytes(payload[0..4].try_into().unwrap_or_default());
                        if code != 0 {
                            return Err(Errno::from_raw(-code));
                        }
                    }
                    _ => out.push((kind, payload.to_vec())),
                }
                at += (len + 3) & !3;
            }
        }
    }

    /// Sends `msgs` (each flagged `F_ACK`) and returns the kernel's answer to each in order:
    /// `Ok` or its error.
    pub(crate) fn each(&mut self, msgs: Vec<Msg>) -> Result<Vec<Result<(), Errno>>, Errno> {
        let mut seqs = Vec::new();
        let mut out = Vec::new();
        for m in msgs {
            self.seq = self.seq.wrapping_add(1);
            seqs.push(self.seq);
            out.extend_from_slice(&m.finish(self.seq));
        }
        let mut answers: Vec<Option<Result<(), Errno>>> = vec![None; seqs.len()];
        if seqs.is_empty() {
            return Ok(vec![]);
        }
        send(self.fd.as_raw_fd(), &out, MsgFlags::empty())?;
        let mut buf = vec![0u8; 65536];
        while answers.iter().any(Option::is_none) {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            let mut at = 0;
            while at + 16 <= n {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or_default()) as usize;
                if len < 16 || at + len > n {
                    return Err(Errno::EBADMSG);
                }
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                let seq = u32::from_ne_bytes(buf[at + 8..at + 12].try_into().unwrap_or_default());
                let payload = &buf[at + 16..at + len];
                if kind == NLMSG_ERROR && payload.len() >= 4 {
                    let code = i32::from_ne_bytes(payload[0..4].try_into().unwrap_or_default());
                    if let Some(i) = seqs.iter().position(|s| *s == seq) {
                        answers[i] = Some(if code == 0 { Ok(()) } else { Err(Errno::from_raw(-code)) });
                    }
                }
                at += (len + 3) & !3;
            }
        }
        Ok(answers.into_iter().map(|a| a.unwrap_or(Ok(()))).collect())
    }
}

/// The key of an `ifname . ipv4_addr` element: the name NUL-padded to 16 bytes, the address.
pub(crate) fn ifname_addr_key(ifname: &str, addr: Ipv4Addr) -> Vec<u8> {
    let mut k = vec![0u8; IFNAMSIZ];
    let n = ifname.len().min(IFNAMSIZ - 1);
    k[..n].copy_from_slice(&ifname.as_bytes()[..n]);
    k.extend_from_slice(&addr.octets());
    k
}

/// Where named namespaces live (as `ip netns` keeps them).
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// Makes `/run/netns` a shared mount, as `ip netns add` does, so that a namespace mounted there
/// later is seen by every mount namespace (the containers' runtimes open it from theirs).
fn netns_dir_shared() -> Result<()> {
    use nix::mount::{mount, MsFlags};
    fs::create_dir_all(NETNS_DIR).with_context(|| format!("creating {NETNS_DIR}"))?;
    let shared =
        || mount(None::<&str>, NETNS_DIR, None::<&str>, MsFlags::MS_SHARED | MsFlags::MS_REC, None::<&str>);
    match shared() {
        Ok(()) => Ok(()),
        Err(Errno::EINVAL) => {
            mount(Some(NETNS_DIR), NETNS_DIR, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
                .with_context(|| format!("bind-mounting {NETNS_DIR} onto itself"))?;
            shared().with_context(|| format!("making {NETNS_DIR} a shared mount"))
        }
        Err(e) => Err(e).with_context(|| format!("making {NETNS_DIR} a shared mount")),
    }
}

/// A new network namespace mounted as `/run/netns/<name>` with IPv6 switched off in it
/// (`all` and `default`), and an rtnetlink socket inside it. Nothing is left when this fails.
pub(crate) fn add_netns(name: &str) -> Result<(fs::File, Socket)> {
    let path = Path::new(NETNS_DIR).join(name);
    netns_dir_shared()?;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating network namespace file {}", path.display()))?;
    let p = path.clone();
    // unshare(CLONE_NEWNET) changes the calling thread only: a thread of its own does it and
    // ends; the mount and the socket keep the namespace.
    let made = std::thread::spawn(move || -> Result<Socket> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("creating a network namespace")?;
        // /proc/thread-self, not /proc/self: the latter is the main thread, in the host's namespace.
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &p,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("mounting the network namespace on {}", p.display()))?;
        for k in ["all", "default"] {
            // /proc/sys/net shows the namespace of the thread that opens it.
            fs::write(format!("/proc/sys/net/ipv6/conf/{k}/disable_ipv6"), "1")
                .with_context(|| format!("switching IPv6 off ({k}) in the job's namespace"))?;
        }
        Socket::route()
    })
    .join()
    .map_err(|_| anyhow!("the thread creating network namespace {name} panicked"))
    .and_then(|r| r);
    let sock = match made {
        Ok(s) => s,
        Err(e) => {
            let _ = del_netns(name);
            return Err(e);
        }
    };
    let f = fs::File::open(&path).with_context(|| format!("opening network namespace {}", path.display()))?;
    Ok((f, sock))
}

/// Removes namespace `/run/netns/<name>` (the namespace itself goes when nothing uses it any
/// more). `Ok(false)` when there is none.
pub(crate) fn del_netns(name: &str) -> Result<bool> {
    let path = Path::new(NETNS_DIR).join(name);
    if !path.exists() {
        return Ok(false);
    }
    match nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => bail!("unmounting network namespace {}: {e}", path.display()),
    }
    fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_aligned_and_nested() {
        let mut m = Msg::new(RTM_NEWLINK, F_REQUEST);
        m.raw(&ifinfomsg(0, 0, 0)).begin(IFLA_LINKINFO).attr_str(IFLA_INFO_KIND, "veth").end();
        let b = m.finish(7);
        assert_eq!(b.len() % 4, 0);
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize, b.len());
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 7);
        // The nest: 4 bytes of its own, then "veth\0" in an attribute of 9 bytes padded to 12.
        assert_eq!(u16::from_ne_bytes([b[32], b[33]]), 4 + 12);
        assert_eq!(u16::from_ne_bytes([b[34], b[35]]), IFLA_LINKINFO | NLA_F_NESTED);
        assert_eq!(u16::from_ne_bytes([b[36], b[37]]), 4 + 5);
    }

    /// A dump's elements as the kernel nests them: a counter as the one expression, one in a
    /// list of expressions, none, and a counter of another expression's name is no counter.
    #[test]
    fn set_elements_are_read_with_their_counters() {
        let counter = |m: &mut Msg, name: &str, bytes: u64, packets: u64| {
            m.attr_str(NFTA_EXPR_NAME, name)
                .begin(NFTA_EXPR_DATA)
                .attr(NFTA_COUNTER_BYTES, &bytes.to_be_bytes())
                .attr(NFTA_COUNTER_PACKETS, &packets.to_be_bytes())
                .attr(3, &[0; 4])
                .end();
        };
        let key = |m: &mut Msg, k: &[u8]| {
            m.begin(NFTA_SET_ELEM_KEY).attr(NFTA_DATA_VALUE, k).end();
        };
        let mut m = Msg::new(NFT_MSG_NEWSETELEM, 0);
        m.attr_str(NFTA_SET_ELEM_LIST_TABLE, "executor").begin(NFTA_SET_ELEM_LIST_ELEMENTS);
        m.begin(NFTA_LIST_ELEM);
        key(&mut m, &[1; 16]);
        m.attr(NFTA_SET_ELEM_TIMEOUT, &[0; 8]).begin(NFTA_SET_ELEM_EXPR);
        counter(&mut m, "counter", 1_048_576 + 7, 900);
        m.end().end();
        m.begin(NFTA_LIST_ELEM);
        m.begin(NFTA_SET_ELEM_EXPRESSIONS).begin(NFTA_LIST_ELEM);
        counter(&mut m, "quota", 5, 5);
        m.end().begin(NFTA_LIST_ELEM);
        counter(&mut m, "counter", 60, 1);
        m.end().end();
        key(&mut m, &[2; 16]);
        m.end();
        m.begin(NFTA_LIST_ELEM);
        key(&mut m, &[3; 16]);
        m.end();
        m.end();
        let b = m.finish(1);
        let got = set_elements_of(&b[16..]);
        assert_eq!(
            got,
            vec![
                SetElement { key: vec![1; 16], counter: Some((1_048_583, 900)) },
                SetElement { key: vec![2; 16], counter: Some((60, 1)) },
                SetElement { key: vec![3; 16], counter: None },
            ]
        );
    }

    #[test]
    fn map_keys_are_the_padded_name_then_the_address() {
        let k = ifname_addr_key("exn3", Ipv4Addr::new(10, 255, 0, 14));
        assert_eq!(k.len(), 20);
        assert_eq!(&k[..4], b"exn3");
        assert!(k[4..16].iter().all(|b| *b == 0));
        assert_eq!(&k[16..], &[10, 255, 0, 14]);
    }
}
