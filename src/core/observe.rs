//! Reading the audit log as a person would: which records to show (`--event`, `--refused`),
//! from when (`--since`), and one readable line per packet or DNS event (`watch`).
//!
//! Pure, so every filter and every rendered line is unit-tested; `cli::observe` only reads
//! files and prints. The log is written by the shield itself, but a line is still rendered
//! defensively: control characters never reach the terminal.

use serde_json::Value;
use thiserror::Error;

use super::audit::AuditRecord;

/// Every event the audit log can hold (docs/state-and-audit.md); `--event` accepts these.
pub const KNOWN_EVENTS: &[&str] = &[
    "prepare",
    "apply",
    "verify",
    "failure",
    "stop",
    "resolve",
    "allow",
    "deny",
    "mode",
    "reset",
    "blocked",
    "bypass",
    "dns_refused",
    "events_dropped",
];

/// What the workload's traffic produced: the events `watch` shows unless told otherwise.
pub const TRAFFIC_EVENTS: &[&str] = &["blocked", "bypass", "dns_refused", "events_dropped"];

/// Refusals only (`--refused`): refused packets and refused DNS questions.
pub const REFUSAL_EVENTS: &[&str] = &["blocked", "dns_refused"];

/// Why a filter given on the command line was refused; each message says what would work.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ObserveError {
    #[error("unknown event `{0}`; use one or more of {events} (comma separated)", events = KNOWN_EVENTS.join(", "))]
    UnknownEvent(String),
    #[error("`{0}` is not a time: give an RFC 3339 time (2026-11-30T14:00:00Z, 2026-11-30T15:00:00+01:00) or an age such as 90s, 10m, 2h, 1d, 1h30m")]
    BadTime(String),
}

/// Which audit records to show: by event name and by time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordFilter {
    /// Only these events; `None` lets every event through.
    events: Option<Vec<String>>,
    /// Only records at or after this unix time in milliseconds.
    since_ms: Option<u64>,
}

impl RecordFilter {
    /// A filter for `events` (empty: all) at or after `since_ms`; unknown event names are
    /// refused so that a typo never silently shows nothing.
    pub fn new(events: &[String], since_ms: Option<u64>) -> Result<RecordFilter, ObserveError> {
        let mut wanted = Vec::new();
        for event in events {
            let event = event.trim();
            if !KNOWN_EVENTS.contains(&event) {
                return Err(ObserveError::UnknownEvent(event.to_string()));
            }
            if !wanted.iter().any(|w| w == event) {
                wanted.push(event.to_string());
            }
        }
        Ok(RecordFilter {
            events: (!wanted.is_empty()).then_some(wanted),
            since_ms,
        })
    }

    /// Whether `record` passes. A record whose time cannot be read fails a `since` filter.
    pub fn matches(&self, record: &AuditRecord) -> bool {
        let event_ok = self
            .events
            .as_ref()
            .is_none_or(|events| events.contains(&record.event));
        let time_ok = self
            .since_ms
            .is_none_or(|since| parse_rfc3339(&record.ts).is_some_and(|ts| ts >= since));
        event_ok && time_ok
    }
}

/// `--since`: an RFC 3339 time, or an age (`90s`, `10m`, `2h`, `1d`, `1w`, combined as
/// `1h30m`) counted back from `now_ms`. Returns unix milliseconds.
pub fn parse_since(text: &str, now_ms: u64) -> Result<u64, ObserveError> {
    let text = text.trim();
    if let Some(ms) = parse_rfc3339(text) {
        return Ok(ms);
    }
    parse_age(text)
        .map(|age| now_ms.saturating_sub(age))
        .ok_or_else(|| ObserveError::BadTime(text.to_string()))
}

/// An age such as `10m` or `1h30m` in milliseconds.
fn parse_age(text: &str) -> Option<u64> {
    if text.is_empty() {
        return None;
    }
    let mut total: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        let number: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit_ms: u64 = match &rest[..unit_len] {
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => 7 * 86_400_000,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total = total.checked_add(number.checked_mul(unit_ms)?)?;
    }
    Some(total)
}

/// Unix milliseconds of an RFC 3339 time (`2026-11-30T14:00:00Z`, fractions and `+01:00`
/// offsets allowed, `T` or a space between date and time); `None` for anything else or a
/// time before 1970.
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(range)?;
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| part.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut at = 19;
    let mut millis = 0i64;
    if b[at] == b'.' {
        let digits = b[at + 1..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if digits == 0 {
            return None;
        }
        // Milliseconds: the first three digits, padded.
        let frac = &b[at + 1..at + 1 + digits.min(3)];
        millis = frac.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0'))
            * 10i64.pow(3 - digits.min(3) as u32);
        at += 1 + digits;
    }
    let offset_s = match b.get(at..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digits = [*h1, *h2, *m1, *m2];
            if !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let hours = i64::from((h1 - b'0') * 10 + (h2 - b'0'));
            let minutes = i64::from((m1 - b'0') * 10 + (m2 - b'0'));
            if hours > 23 || minutes > 59 {
                return None;
            }
            let offset = hours * 3600 + minutes * 60;
            if *sign == b'+' {
                offset
            } else {
                -offset
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_s;
    u64::try_from(secs * 1000 + millis).ok()
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm, the
/// inverse of the one in [`super::audit::rfc3339_utc`]).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Text from the log made safe for a terminal: control characters become `?`.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn text_field<'a>(detail: &'a Value, key: &str) -> Option<&'a str> {
    detail.get(key).and_then(Value::as_str)
}

/// The time of day of a record (`13:09:24.695Z`), or its whole timestamp when it is not in
/// the shield's own format.
fn time_of_day(ts: &str) -> String {
    match (ts.get(11..23), ts.len()) {
        (Some(time), 24) if parse_rfc3339(ts).is_some() => format!("{time}Z"),
        _ => printable(ts),
    }
}

/// How often, as `watch` shows it: `x1` for a key's first line, `+N` for the repeats summed
/// since its previous line.
fn count_text(detail: &Value) -> String {
    let count = detail.get("count").and_then(Value::as_u64).unwrap_or(1);
    if detail.get("first").and_then(Value::as_bool) == Some(false) {
        format!("+{count}")
    } else {
        format!("x{count}")
    }
}

/// One readable line for a record (without the newline): time, container, verdict, name or
/// address, port/protocol, count. Packet and DNS events get columns; any other event shows
/// its detail as compact JSON.
pub fn readable_line(record: &AuditRecord) -> String {
    let time = time_of_day(&record.ts);
    let container = printable(&record.container);
    let d = &record.detail;
    match record.event.as_str() {
        "blocked" | "bypass" => {
            let verdict = text_field(d, "verdict").unwrap_or(record.event.as_str());
            let dst = text_field(d, "dst").unwrap_or("?");
            let what = match text_field(d, "name") {
                Some(name) => format!("{name} ({dst})"),
                None => dst.to_string(),
            };
            let proto = text_field(d, "proto").unwrap_or("?");
            let place = match d.get("port").and_then(Value::as_u64) {
                Some(port) => format!("{port}/{proto}"),
                None => proto.to_string(),
            };
            printable(&format!(
                "{time}  {container}  {verdict:<11}  {what}  {place}  {}",
                count_text(d)
            ))
        }
        "dns_refused" => printable(&format!(
            "{time}  {container}  {:<11}  {}  dns/{}  {}  ({})",
            "dns_refused",
            text_field(d, "name").unwrap_or("?"),
            text_field(d, "qtype").unwrap_or("?"),
            count_text(d),
            text_field(d, "reason").unwrap_or("?"),
        )),
        "events_dropped" => printable(&format!(
            "{time}  {container}  {:<11}  {} events not written one by one ({})",
            "dropped",
            d.get("count").and_then(Value::as_u64).unwrap_or(0),
            text_field(d, "reason").unwrap_or("?"),
        )),
        other => printable(&format!(
            "{time}  {container}  {other:<11}  {}",
            serde_json::to_string(d).unwrap_or_default()
        )),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::core::audit::rfc3339_utc;

    fn record(event: &str, detail: Value) -> AuditRecord {
        AuditRecord::new(1_795_870_860_123, "c1", event, true, detail)
    }

    #[test]
    fn rfc3339_round_trips_what_the_log_writes() {
        for ms in [0u128, 951_782_400_000, 1_795_870_860_123, 4_102_444_799_999] {
            assert_eq!(parse_rfc3339(&rfc3339_utc(ms)), Some(ms as u64), "{ms}");
        }
    }

    #[test]
    fn rfc3339_accepts_offsets_fractions_and_a_space() {
        let base = parse_rfc3339("2026-11-28T13:01:00Z").unwrap();
        assert_eq!(parse_rfc3339("2026-11-28T14:01:00+01:00"), Some(base));
        assert_eq!(parse_rfc3339("2026-11-28T12:31:00-00:30"), Some(base));
        assert_eq!(parse_rfc3339("2026-11-28 13:01:00z"), Some(base));
        assert_eq!(parse_rfc3339("2026-11-28T13:01:00.5Z"), Some(base + 500));
        assert_eq!(
            parse_rfc3339("2026-11-28T13:01:00.123456Z"),
            Some(base + 123)
        );
    }

    #[test]
    fn rfc3339_refuses_what_is_not_a_time() {
        for bad in [
            "",
            "2026-11-28",
            "2026-11-28T13:01:00",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-11-28T24:00:00Z",
            "2026-11-28T13:01:00.Z",
            "2026-11-28T13:01:00+1:00",
            "2026-11-28T13:01:00+01:00x",
            "1969-12-31T23:59:59Z",
            "2026-11-28T13:01:00\u{0}",
            "２026-11-28T13:01:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
        assert!(parse_rfc3339("2024-02-29T00:00:00Z").is_some());
    }

    #[test]
    fn since_takes_a_time_or_an_age() {
        let now = 10_000_000_000;
        assert_eq!(parse_since("10m", now), Ok(now - 600_000));
        assert_eq!(parse_since("2h", now), Ok(now - 7_200_000));
        assert_eq!(parse_since("1h30m", now), Ok(now - 5_400_000));
        assert_eq!(parse_since("90s", now), Ok(now - 90_000));
        assert_eq!(parse_since("1d", now), Ok(now - 86_400_000));
        assert_eq!(parse_since("1w", 1), Ok(0), "saturates at the epoch");
        assert_eq!(
            parse_since("2026-11-28T13:01:00.123Z", now),
            Ok(1_795_870_860_123)
        );
        for bad in ["", "10", "m", "10x", "-5m", "1.5h", "10 m", "9999999999h"] {
            let err = parse_since(bad, now).unwrap_err();
            assert!(err.to_string().contains("RFC 3339"), "{bad}: {err}");
        }
    }

    #[test]
    fn filter_by_event_and_time() {
        let since = parse_rfc3339("2026-11-28T13:01:00.123Z");
        let f = RecordFilter::new(&["blocked".into(), "dns_refused".into()], since).unwrap();
        assert!(f.matches(&record("blocked", json!({}))));
        assert!(!f.matches(&record("apply", json!({}))));
        let mut early = record("blocked", json!({}));
        early.ts = "2026-11-28T13:01:00.122Z".into();
        assert!(!f.matches(&early));
        early.ts = "garbage".into();
        assert!(
            !f.matches(&early),
            "an unreadable time fails a since filter"
        );
        assert!(RecordFilter::new(&[], None).unwrap().matches(&early));
        let err = RecordFilter::new(&["blokced".into()], None).unwrap_err();
        assert!(err.to_string().contains("dns_refused"), "{err}");
    }

    #[test]
    fn readable_lines_name_time_container_verdict_target_port_and_count() {
        let named = record(
            "blocked",
            json!({"verdict":"denied","dst":"198.51.100.60","proto":"tcp","port":80,"name":"svc.example.com","count":1,"first":true}),
        );
        assert_eq!(
            readable_line(&named),
            "13:01:00.123Z  c1  denied       svc.example.com (198.51.100.60)  80/tcp  x1"
        );
        let repeats = record(
            "bypass",
            json!({"verdict":"bypass","dst":"2001:db8::20","proto":"icmpv6","count":4211,"first":false}),
        );
        assert_eq!(
            readable_line(&repeats),
            "13:01:00.123Z  c1  bypass       2001:db8::20  icmpv6  +4211"
        );
        let dns = record(
            "dns_refused",
            json!({"name":"evil.example","qtype":"A","reason":"not_allowlisted","count":1,"first":true}),
        );
        assert_eq!(
            readable_line(&dns),
            "13:01:00.123Z  c1  dns_refused  evil.example  dns/A  x1  (not_allowlisted)"
        );
        let dropped = record(
            "events_dropped",
            json!({"reason":"too_many_destinations","count":4744}),
        );
        assert_eq!(
            readable_line(&dropped),
            "13:01:00.123Z  c1  dropped      4744 events not written one by one (too_many_destinations)"
        );
        let stop = record("stop", json!({"removed": false}));
        assert_eq!(
            readable_line(&stop),
            "13:01:00.123Z  c1  stop         {\"removed\":false}"
        );
    }

    #[test]
    fn readable_lines_never_carry_control_characters() {
        let mut r = record(
            "blocked",
            json!({"verdict":"denied\u{1b}[31m","dst":"x\ny","proto":"tcp"}),
        );
        r.container = "c\r1".into();
        r.ts = "\u{7}".into();
        let line = readable_line(&r);
        assert!(!line.chars().any(char::is_control), "{line:?}");
    }
}
