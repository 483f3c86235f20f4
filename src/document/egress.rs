//! The egress record of an `allowlist` job in the run document: its DNS questions and the
//! connections it started, each with its verdict, capped (`network::egress` gathers it).

use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// Rows of each kind the log entry and the run document keep; the rest is counted.
pub const ROWS: usize = 50;

/// One connection attempt of the job (its first packet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: String,
    /// The allowed name whose answer held the address, if any did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// accepted or refused.
    pub verdict: String,
}

/// One DNS question of the job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lookup {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub verdict: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub answers: Vec<Ipv4Addr>,
}

/// A job's egress record (capped at [`ROWS`] rows each, with counts of all).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Egress {
    pub lookups: Vec<Lookup>,
    pub lookups_total: usize,
    pub connections: Vec<Connection>,
    pub connections_total: usize,
    /// How many of each verdict, over everything (not only the rows kept).
    pub verdicts: Vec<(String, String, usize)>,
}

impl Egress {
    /// The log entry's lines: a table of questions, then one of connections, each with a count
    /// of the rows the cap cut.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![format!(
            "egress: {} DNS questions, {} connections ({})",
            self.lookups_total,
            self.connections_total,
            self.verdicts.iter().map(|(k, v, n)| format!("{k} {v}: {n}")).collect::<Vec<_>>().join(", ")
        )];
        out.push(format!("{:<8} {:<6} {:<40} {}", "dns", "type", "name", "answers"));
        for l in &self.lookups {
            let answers = l.answers.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
            out.push(format!("{:<8} {:<6} {:<40} {answers}", l.verdict, l.kind, l.name));
        }
        if self.lookups_total > self.lookups.len() {
            out.push(format!(
                "... {} more DNS questions not listed",
                self.lookups_total - self.lookups.len()
            ));
        }
        out.push(format!("{:<8} {:<6} {:<22} {}", "conn", "proto", "address", "name"));
        for c in &self.connections {
            out.push(format!(
                "{:<8} {:<6} {:<22} {}",
                c.verdict,
                c.protocol,
                format!("{}:{}", c.address, c.port),
                c.name.as_deref().unwrap_or("-")
            ));
        }
        if self.connections_total > self.connections.len() {
            out.push(format!(
                "... {} more connections not listed",
                self.connections_total - self.connections.len()
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_capped_with_a_count() {
        let mut e = Egress { lookups_total: 3, connections_total: 2, ..Default::default() };
        e.lookups.push(Lookup {
            name: "a.test".into(),
            kind: "A".into(),
            verdict: "refused".into(),
            answers: vec![],
        });
        e.connections.push(Connection {
            address: "198.51.100.10".parse().unwrap(),
            port: 80,
            protocol: "tcp".into(),
            name: Some("web.test".into()),
            verdict: "accepted".into(),
        });
        e.verdicts = vec![("dns".into(), "refused".into(), 3)];
        let l = e.lines();
        assert!(l[0].contains("3 DNS questions, 2 connections (dns refused: 3)"), "{l:?}");
        assert!(l.iter().any(|x| x.starts_with("refused") && x.contains("a.test")), "{l:?}");
        assert!(l.iter().any(|x| x == "... 2 more DNS questions not listed"), "{l:?}");
        assert!(l.iter().any(|x| x.contains("198.51.100.10:80") && x.ends_with("web.test")), "{l:?}");
        assert!(l.iter().any(|x| x == "... 1 more connections not listed"), "{l:?}");
    }
}
