//! The egress record of an `allowlist` job in the run document: its DNS questions and the
//! connections it started, each with its verdict, capped (`network::egress` gathers it).

use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// Rows of each kind the log entry and the run document keep; the rest is counted.
pub const ROWS: usize = 50;

/// The connections of the job to one address, protocol and port (each flow's first packet
/// judged), with the bytes the kernel counted: IP packets, headers included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Connection {
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: String,
    /// The allowed name whose answer held the address, if any did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// accepted or refused.
    pub verdict: String,
    /// What the job sent: every packet of its accepted flows, or the refused first packets
    /// (each retry is one). None from an executor before the byte counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<u64>,
    /// What the replies to its accepted flows brought; none for a refused connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_received: Option<u64>,
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
    /// Bytes sent and received over all accepted connections (not only the rows kept).
    #[serde(default)]
    pub bytes_sent_total: u64,
    #[serde(default)]
    pub bytes_received_total: u64,
    /// How many of each verdict, over everything (not only the rows kept).
    pub verdicts: Vec<(String, String, usize)>,
}

impl Egress {
    /// The log entry's lines: a table of questions, then one of connections, each with a count
    /// of the rows the cap cut.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![format!(
            "egress: {} DNS questions, {} connections ({}), {} bytes sent, {} received",
            self.lookups_total,
            self.connections_total,
            self.verdicts.iter().map(|(k, v, n)| format!("{k} {v}: {n}")).collect::<Vec<_>>().join(", "),
            self.bytes_sent_total,
            self.bytes_received_total
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
        out.push(format!(
            "{:<8} {:<6} {:<22} {:<32} {:>12} {:>12}",
            "conn", "proto", "address", "name", "sent", "received"
        ));
        let bytes = |b: Option<u64>| b.map_or("-".to_string(), |b| b.to_string());
        for c in &self.connections {
            out.push(format!(
                "{:<8} {:<6} {:<22} {:<32} {:>12} {:>12}",
                c.verdict,
                c.protocol,
                format!("{}:{}", c.address, c.port),
                c.name.as_deref().unwrap_or("-"),
                bytes(c.bytes_sent),
                bytes(c.bytes_received)
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
            bytes_sent: Some(412),
            bytes_received: Some(1_049_000),
        });
        e.verdicts = vec![("dns".into(), "refused".into(), 3)];
        let l = e.lines();
        assert!(l[0].contains("3 DNS questions, 2 connections (dns refused: 3)"), "{l:?}");
        assert!(l.iter().any(|x| x.starts_with("refused") && x.contains("a.test")), "{l:?}");
        assert!(l.iter().any(|x| x == "... 2 more DNS questions not listed"), "{l:?}");
        let row: Vec<&str> =
            l.iter().find(|x| x.contains("198.51.100.10:80")).unwrap().split_whitespace().collect();
        assert_eq!(row, ["accepted", "tcp", "198.51.100.10:80", "web.test", "412", "1049000"], "{l:?}");
        assert!(l.iter().any(|x| x == "... 1 more connections not listed"), "{l:?}");
    }

    /// The byte counts are fields of each connection and totals of the record; a record of an
    /// executor before them still reads.
    #[test]
    fn the_bytes_are_in_the_document() {
        let c = Connection {
            address: "198.51.100.10".parse().unwrap(),
            port: 80,
            protocol: "tcp".into(),
            name: None,
            verdict: "accepted".into(),
            bytes_sent: Some(5),
            bytes_received: Some(7),
        };
        let e = Egress {
            connections: vec![c],
            bytes_sent_total: 5,
            bytes_received_total: 7,
            ..Default::default()
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["connections"][0]["bytesSent"], 5);
        assert_eq!(v["connections"][0]["bytesReceived"], 7);
        assert_eq!(v["bytesSentTotal"], 5);
        assert_eq!(v["bytesReceivedTotal"], 7);
        let old = r#"{"lookups":[],"lookupsTotal":0,"connections":[{"address":"198.51.100.10","port":80,
            "protocol":"tcp","verdict":"refused"}],"connectionsTotal":1,"verdicts":[]}"#;
        let e: Egress = serde_json::from_str(old).unwrap();
        assert_eq!((e.connections[0].bytes_sent, e.bytes_sent_total), (None, 0));
        assert!(e.lines().iter().any(|l| l.split_whitespace().rev().take(2).all(|w| w == "-")));
    }
}
