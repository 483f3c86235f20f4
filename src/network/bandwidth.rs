//! `EXECUTOR_NETWORK_BANDWIDTH`: the caps on a job's traffic, and the `tc` script of the
//! ingress cap (the egress cap is a meter in the job's policy chain).

use anyhow::{bail, Result};

/// Caps on a job's traffic, in bits per second, as seen from the job: ingress is what it
/// downloads, egress what it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bandwidth {
    pub ingress: u64,
    pub egress: u64,
}

impl Bandwidth {
    /// `RATE` (both directions) or `INGRESS/EGRESS`; a rate is a number with `bit`, `kbit`,
    /// `mbit` or `gbit` (tc's units, powers of 1000), e.g. `50mbit` or `50mbit/10mbit`.
    pub fn parse(s: &str) -> Result<Bandwidth> {
        let rate = |r: &str| -> Result<u64> {
            let r = r.trim().to_ascii_lowercase();
            let split = r.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(r.len());
            let (num, unit) = r.split_at(split);
            let mult: u64 = match unit {
                "bit" => 1,
                "kbit" => 1_000,
                "mbit" => 1_000_000,
                "gbit" => 1_000_000_000,
                _ => bail!(
                    "EXECUTOR_NETWORK_BANDWIDTH: {r:?} needs a unit: bit, kbit, mbit or gbit (e.g. 50mbit)"
                ),
            };
            let n: f64 = num.parse().map_err(|_| {
                anyhow::anyhow!(
                    "EXECUTOR_NETWORK_BANDWIDTH: {r:?} does not start with a number (e.g. 50mbit)"
                )
            })?;
            let bits = (n * mult as f64) as u64;
            if bits < 8_000 {
                bail!("EXECUTOR_NETWORK_BANDWIDTH: {r:?} is below 8kbit, too little for any job");
            }
            Ok(bits)
        };
        match s.split_once('/') {
            Some((i, e)) => Ok(Bandwidth { ingress: rate(i)?, egress: rate(e)? }),
            None => {
                let r = rate(s)?;
                Ok(Bandwidth { ingress: r, egress: r })
            }
        }
    }

    /// The `tc -batch` script that caps what leaves the host through link `dev` (the job's
    /// host-side link), i.e. the job's ingress, with a token bucket (bursts of 50 ms, at least
    /// 32 KiB). The job's egress is capped in its policy chain instead (`policy::policy_chain`:
    /// an nftables meter per link), since this kernel has no tc policing action.
    pub fn tc_script(&self, dev: &str) -> String {
        format!(
            "qdisc add dev {dev} root tbf rate {i}bit burst {b} latency 100ms\n",
            i = self.ingress,
            b = Self::burst(self.ingress),
        )
    }

    /// The burst of a rate, in bytes.
    pub fn burst(bits: u64) -> u64 {
        (bits / 8 / 20).max(32 << 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_parses_with_clear_errors() {
        assert_eq!(
            Bandwidth::parse("50mbit").unwrap(),
            Bandwidth { ingress: 50_000_000, egress: 50_000_000 }
        );
        assert_eq!(
            Bandwidth::parse("50mbit/10Mbit").unwrap(),
            Bandwidth { ingress: 50_000_000, egress: 10_000_000 }
        );
        assert_eq!(Bandwidth::parse("1.5gbit").unwrap().ingress, 1_500_000_000);
        for bad in ["50", "50mb", "fast", "50mbit/", "1bit", "mbit"] {
            let e = Bandwidth::parse(bad).unwrap_err().to_string();
            assert!(e.contains("EXECUTOR_NETWORK_BANDWIDTH"), "{bad}: {e}");
        }
        let t = Bandwidth::parse("8mbit/4mbit").unwrap().tc_script("exn3");
        assert!(t.contains("dev exn3 root tbf rate 8000000bit burst 50000 "), "{t}");
        let s = super::super::Settings::default().with_bandwidth(Some("")).unwrap();
        assert_eq!(s.bandwidth, None);
    }
}
