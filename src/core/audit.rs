//! Audit records: one JSON object per line, one line per event, schema version 1.
//!
//! Schema (documented in docs/audit-log.md):
//! `{"v":1,"ts":"2026-11-28T12:00:00.123Z","container":"NAME","event":"...","ok":true,"detail":{...}}`
//! where `event` is one of `prepare`, `apply`, `verify`, `failure`, `stop`, `allow`, `deny`,
//! `mode`, `resolve`, and the packet and DNS events of [`super::events`] (`blocked`, `bypass`,
//! `dns_refused`, `events_dropped`). Pure: the effect module only appends the rendered line.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Schema version written in every record.
pub const AUDIT_VERSION: u32 = 1;

/// One audit event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub v: u32,
    pub ts: String,
    pub container: String,
    pub event: String,
    pub ok: bool,
    #[serde(default)]
    pub detail: Value,
}

impl AuditRecord {
    /// A record stamped with `unix_millis`.
    pub fn new(unix_millis: u128, container: &str, event: &str, ok: bool, detail: Value) -> Self {
        AuditRecord {
            v: AUDIT_VERSION,
            ts: rfc3339_utc(unix_millis),
            container: container.to_string(),
            event: event.to_string(),
            ok,
            detail,
        }
    }

    /// The record as one line (with the newline).
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).expect("audit records always serialise");
        s.push('\n');
        s
    }
}

/// Format a unix time in milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ` (proleptic Gregorian).
pub fn rfc3339_utc(unix_millis: u128) -> String {
    let secs = (unix_millis / 1000) as i64;
    let millis = (unix_millis % 1000) as u32;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_utc(1_795_870_860_123), "2026-11-28T13:01:00.123Z");
    }

    #[test]
    fn one_line_per_record() {
        let line = AuditRecord::new(
            0,
            "c1",
            "apply",
            true,
            serde_json::json!({"mode": "up", "note": "a\nb"}),
        )
        .to_line();
        assert_eq!(line.matches('\n').count(), 1);
        let back: AuditRecord = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(back.event, "apply");
    }
}
