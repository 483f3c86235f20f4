//! The resolver's loop: one UDP socket on the job's gateway, one question at a time (a job's
//! lookups are few and the upstream answers in milliseconds). Messages are read and written
//! with hickory-proto; only the question's name is judged, the upstream's answer is relayed as
//! it came.

use anyhow::{Context, Result};
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use super::super::{hosts, netlink, TABLE};
use super::ResolverConfig;

/// The set of (job, address) pairs any port of which the job may reach.
pub(crate) const SET_HOSTS: &str = "egress_hosts";
/// The set of (job, address, port) triples for names allowed on one port.
pub(crate) const SET_PORTS: &str = "egress_ports";
/// Lines the egress log holds at most; past it only a count grows.
pub(crate) const LOG_CAP: usize = 5_000;

/// A set key `job . addr` (each field padded to 4 bytes, as nftables concatenates).
pub(crate) fn key_hosts(job: Ipv4Addr, addr: Ipv4Addr) -> Vec<u8> {
    [job.octets(), addr.octets()].concat()
}

/// A set key `job . addr . port`.
pub(crate) fn key_ports(job: Ipv4Addr, addr: Ipv4Addr, port: u16) -> Vec<u8> {
    let mut k = key_hosts(job, addr);
    k.extend_from_slice(&port.to_be_bytes());
    k.extend_from_slice(&[0, 0]);
    k
}

/// One line of the egress log: a question and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Question {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// allowed, refused, rate-limited, too-long, failed.
    pub verdict: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub answers: Vec<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u32>,
}

pub(crate) struct Resolver {
    cfg: ResolverConfig,
    sock: UdpSocket,
    nf: netlink::Socket,
    log: std::fs::File,
    logged: usize,
    tokens: f64,
    last: Instant,
}

impl Resolver {
    pub(crate) fn new(cfg: ResolverConfig) -> Result<Resolver> {
        let sock = UdpSocket::bind((cfg.listen, 53)).with_context(|| format!("binding {}:53", cfg.listen))?;
        sock.set_read_timeout(Some(Duration::from_secs(1)))?;
        let nf = netlink::Socket::netfilter()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cfg.log)
            .with_context(|| format!("opening {}", cfg.log.display()))?;
        let tokens = cfg.rate as f64;
        Ok(Resolver { cfg, sock, nf, log, logged: 0, tokens, last: Instant::now() })
    }

    pub(crate) fn run(mut self) -> Result<()> {
        println!("ready");
        let _ = std::io::stdout().flush();
        // /proc/self/net follows this process's network namespace (/sys/class/net follows the
        // namespace /sys was mounted in).
        let link = format!("{}:", self.cfg.host_if);
        let link_exists = || {
            std::fs::read_to_string("/proc/self/net/dev")
                .map_or(true, |t| t.lines().any(|l| l.trim_start().starts_with(&link)))
        };
        let mut buf = [0u8; 4096];
        loop {
            match self.sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if let Some(reply) = self.answer(&buf[..n]) {
                        let _ = self.sock.send_to(&reply, from);
                    }
                }
                Err(e)
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    if !link_exists() {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e).context("reading a question"),
            }
        }
    }

    fn record(&mut self, q: &Question) {
        self.logged += 1;
        let line = if self.logged <= LOG_CAP {
            serde_json::to_string(q).unwrap_or_default()
        } else {
            // Past the cap, one short line per question keeps the count.
            "{\"cut\":1}".to_string()
        };
        let _ = writeln!(self.log, "{line}");
    }

    /// Whether the per-job rate allows one more question (a token bucket of `rate` a second).
    fn take_token(&mut self) -> bool {
        let now = Instant::now();
        let rate = self.cfg.rate as f64;
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The reply to one datagram (`None`: not a question worth one).
    fn answer(&mut self, packet: &[u8]) -> Option<Vec<u8>> {
        let msg = Message::from_vec(packet).ok()?;
        if msg.message_type() != MessageType::Query {
            return None;
        }
        let q = msg.queries().first()?.clone();
        let name = q.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
        let kind = q.query_type();
        let mut line = Question {
            name: name.clone(),
            kind: kind.to_string(),
            verdict: String::new(),
            answers: vec![],
            ttl: None,
        };
        let reply = |code: ResponseCode| {
            let mut r = Message::new();
            r.set_id(msg.id())
                .set_message_type(MessageType::Response)
                .set_op_code(msg.op_code())
                .set_recursion_desired(msg.recursion_desired())
                .set_recursion_available(true)
                .set_response_code(code)
                .add_query(q.clone());
            r.to_vec().ok()
        };
        if !self.take_token() {
            line.verdict = "rate-limited".into();
            self.record(&line);
            return reply(ResponseCode::Refused);
        }
        if name.len() > self.cfg.max_name {
            line.verdict = "too-long".into();
            line.name = format!("{}...", &name[..self.cfg.max_name.min(name.len())]);
            self.record(&line);
            return reply(ResponseCode::Refused);
        }
        let Some(ports) = hosts::verdict(&self.cfg.hosts, &name) else {
            line.verdict = "refused".into();
            self.record(&line);
            return reply(ResponseCode::NXDomain);
        };
        if kind != RecordType::A {
            // Jobs have no IPv6, and other types carry no address the job could use: an empty
            // answer, as for a name without such records.
            line.verdict = "allowed".into();
            self.record(&line);
            return reply(ResponseCode::NoError);
        }
        let Some(raw) = self.forward(packet) else {
            line.verdict = "failed".into();
            self.record(&line);
            return reply(ResponseCode::ServFail);
        };
        let Ok(resp) = Message::from_vec(&raw) else {
            line.verdict = "failed".into();
            self.record(&line);
            return reply(ResponseCode::ServFail);
        };
        line.verdict = "allowed".into();
        for rec in resp.answers() {
            if let Some(RData::A(a)) = rec.data() {
                let timeout = (u64::from(rec.ttl()) + self.cfg.grace_s).max(1) * 1000;
                for p in &ports {
                    let (set, key) = match p {
                        None => (SET_HOSTS, key_hosts(self.cfg.job, a.0)),
                        Some(p) => (SET_PORTS, key_ports(self.cfg.job, a.0, *p)),
                    };
                    if let Err(e) = self.nf.put_timed_element(TABLE, set, &key, timeout) {
                        tracing::warn!("adding {} to set {set}: {e}", a.0);
                    }
                }
                line.answers.push(a.0);
                line.ttl = Some(line.ttl.map_or(rec.ttl(), |t| t.min(rec.ttl())));
            }
        }
        self.record(&line);
        Some(raw)
    }

    /// The upstream's answer to a question, from the first upstream that gives one.
    fn forward(&self, packet: &[u8]) -> Option<Vec<u8>> {
        for up in &self.cfg.upstream {
            let Ok(s) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            if s.connect(SocketAddr::from((*up, 53))).is_err() || s.send(packet).is_err() {
                continue;
            }
            let mut buf = vec![0u8; 4096];
            if let Ok(n) = s.recv(&mut buf) {
                buf.truncate(n);
                return Some(buf);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_concatenate_as_nftables_does() {
        let (j, a) = (Ipv4Addr::new(10, 255, 0, 2), Ipv4Addr::new(198, 51, 100, 10));
        assert_eq!(key_hosts(j, a), vec![10, 255, 0, 2, 198, 51, 100, 10]);
        assert_eq!(key_ports(j, a, 443), vec![10, 255, 0, 2, 198, 51, 100, 10, 1, 187, 0, 0]);
    }
}
