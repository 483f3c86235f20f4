//! The store's times: milliseconds since the epoch in the tables, `DateTime<Utc>` in the rows it
//! returns, and RFC 3339 with milliseconds (`2026-01-02T03:04:05.000Z`) wherever a row is
//! serialized for the admin API. Pages format them at their own edge.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serializer;

/// The time a stored millisecond count stands for (the epoch for one out of chrono's range).
pub(super) fn from_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// A time as the admin API sends it: RFC 3339, UTC, always with milliseconds.
fn rfc3339(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// `serialize_with` for a row's time.
pub(super) fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(t))
}

/// `serialize_with` for a row's optional time (`null` when unset).
pub(super) fn serialize_opt<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&rfc3339(t)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize)]
    struct Row {
        #[serde(serialize_with = "serialize")]
        at: DateTime<Utc>,
        #[serde(serialize_with = "serialize_opt")]
        until: Option<DateTime<Utc>>,
        #[serde(serialize_with = "serialize_opt")]
        never: Option<DateTime<Utc>>,
    }

    #[test]
    fn rows_send_times_with_milliseconds_always() {
        // 2026-01-02T03:04:05Z on a whole second, and 7 ms past it.
        let whole = 1_767_323_045_000;
        let row = Row { at: from_ms(whole), until: Some(from_ms(whole + 7)), never: None };
        assert_eq!(
            serde_json::to_string(&row).unwrap(),
            r#"{"at":"2026-01-02T03:04:05.000Z","until":"2026-01-02T03:04:05.007Z","never":null}"#
        );
        assert_eq!(from_ms(i64::MAX), DateTime::<Utc>::default());
    }
}
