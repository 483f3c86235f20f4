//! Units people write and read: durations and byte sizes, with exactly one parser and one
//! formatter each, so that every flag, variable and message agrees.

use anyhow::{bail, Context, Result};
use std::time::Duration;

/// Parses a duration: Go's syntax (`500ms`, `30s`, `1h30m`, `1.5s`, `0`) or a bare number of
/// seconds (`5`).
pub(crate) fn parse_duration(text: &str) -> Result<Duration> {
    let s = text.trim();
    if s.is_empty() {
        bail!("empty duration");
    }
    if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let n: f64 =
            s.parse().map_err(|_| anyhow::anyhow!("{s:?} is not a duration (like 30s, 5m, 1h30m)"))?;
        return checked(n, s);
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_end == 0 {
            bail!("{s:?} is not a duration (like 30s, 5m, 1h30m)");
        }
        let n: f64 = rest[..num_end]
            .parse()
            .map_err(|_| anyhow::anyhow!("{s:?} is not a duration (like 30s, 5m, 1h30m)"))?;
        rest = &rest[num_end..];
        let unit_end = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            u => bail!("duration {s:?} has an unknown unit {u:?} (use ms, s, m or h)"),
        };
        total += n * scale;
        rest = &rest[unit_end..];
    }
    checked(total, s)
}

fn checked(secs: f64, text: &str) -> Result<Duration> {
    if !secs.is_finite() || !(0.0..=1.0e10).contains(&secs) {
        bail!("duration {text:?} is out of range");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Formats a duration the way Go prints one (`30m0s`, `1.5s`, `250ms`), which also parses back.
pub(crate) fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    if d < Duration::from_secs(1) {
        let nanos = d.subsec_nanos();
        return if nanos.is_multiple_of(1_000_000) {
            format!("{}ms", nanos / 1_000_000)
        } else if nanos >= 1_000_000 {
            trim_fraction(format!("{:.6}", nanos as f64 / 1e6)) + "ms"
        } else if nanos >= 1_000 {
            trim_fraction(format!("{:.3}", nanos as f64 / 1e3)) + "µs"
        } else {
            format!("{nanos}ns")
        };
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let frac = d.subsec_nanos();
    let s_part = if frac > 0 { trim_fraction(format!("{s}.{frac:09}")) } else { s.to_string() };
    if h > 0 {
        format!("{h}h{m}m{s_part}s")
    } else if m > 0 {
        format!("{m}m{s_part}s")
    } else {
        format!("{s_part}s")
    }
}

fn trim_fraction(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Parses a size such as `12G`, `512M`, `100MB`, `1GiB`, `1024`; `K`/`M`/`G`/`T` are powers of 1024.
pub(crate) fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let num_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if num_end == 0 {
        bail!("not a size (like 512M or 12G)");
    }
    let n: u64 = t[..num_end].parse().context("size out of range")?;
    let unit = t[num_end..].trim().to_ascii_uppercase();
    let mult: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => bail!("unknown size unit {:?}", &t[num_end..]),
    };
    n.checked_mul(mult).context("size out of range")
}

/// A size for people: `20 GiB`, `1.5 MiB`, `1000 bytes`.
pub(crate) fn format_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if bytes >= size {
            return if bytes.is_multiple_of(size) {
                format!("{} {unit}", bytes / size)
            } else {
                format!("{:.1} {unit}", bytes as f64 / size as f64)
            };
        }
    }
    format!("{bytes} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_duration_syntax_everywhere() {
        for (text, want) in [
            ("0", Duration::ZERO),
            ("5", Duration::from_secs(5)),
            ("2.5", Duration::from_millis(2500)),
            ("250ms", Duration::from_millis(250)),
            ("25s", Duration::from_secs(25)),
            ("2m", Duration::from_secs(120)),
            ("1h30m", Duration::from_secs(5400)),
            ("1.5s", Duration::from_millis(1500)),
            ("1m30s", Duration::from_secs(90)),
            (" 30m ", Duration::from_secs(1800)),
        ] {
            assert_eq!(parse_duration(text).unwrap(), want, "{text}");
        }
        for bad in ["", "5x", "3 weeks", "s", "1.2.3s", "-1s", "1e99h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
        assert!(parse_duration("5x").unwrap_err().to_string().contains("unknown unit"));
    }

    #[test]
    fn durations_print_as_go_does_and_parse_back() {
        for (d, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_micros(1500), "1.5ms"),
            (Duration::from_nanos(1500), "1.5µs"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_secs(3), "3s"),
            (Duration::from_secs(25), "25s"),
            (Duration::from_secs(1800), "30m0s"),
            (Duration::from_secs(5400), "1h30m0s"),
        ] {
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(text).unwrap(), d, "{text} parses back");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("12G").unwrap(), 12 << 30);
        assert_eq!(parse_size("100MB").unwrap(), 100 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(format_bytes(20 << 30), "20 GiB");
        assert_eq!(format_bytes(64 << 20), "64 MiB");
        assert_eq!(format_bytes(1536 << 10), "1.5 MiB");
        assert_eq!(format_bytes(1000), "1000 bytes");
        assert_eq!(format_bytes(2 << 40), "2 TiB");
    }
}
