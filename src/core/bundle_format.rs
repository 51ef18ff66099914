//! The on-disk formats of `state.json`, and how a bundle of an older format is read.
//!
//! A container keeps its bundle for its whole life, across upgrades of this binary: a
//! container prepared by an older terok-shield must still start (shielded) under a newer one.
//! So compatibility is decided by the bundle's `format` number alone, never by the version
//! of the binary that wrote it. Older formats are migrated in memory, one step at a time, to
//! the current one; a bundle of a *newer* format is refused, since this binary cannot know
//! what its new fields mean (fail closed).
//!
//! Formats:
//! - 1: the first format. `shield_version` had to equal the reading binary's version exactly
//!   (so any upgrade stopped every prepared container); `upstream_dns` and `ttl_bounds` were
//!   optional (early writers left them out).
//! - 2: `shield_version` became `written_by`, for information only; `upstream_dns` and
//!   `ttl_bounds` are always written; `audit_max_bytes` (the audit log's rotation size) is
//!   new.

use serde_json::{Map, Value};
use thiserror::Error;

use super::bundle::{Bundle, BUNDLE_FORMAT};

/// Why a `state.json` could not be read as a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    #[error("{0}")]
    Json(String),
    #[error("it has no `format` number (not a terok-shield state bundle?)")]
    NoFormat,
    #[error("it is format {found}, written by terok-shield {written_by}, newer than this terok-shield ({ours}, format {BUNDLE_FORMAT}) can read: upgrade terok-shield, or recreate the container with this one (`terok-shield run`)")]
    Newer {
        found: u64,
        written_by: String,
        ours: String,
    },
    #[error("it is format {0}, which no terok-shield ever wrote")]
    Unknown(u64),
}

/// Read a bundle of any format this binary knows, migrating older ones in memory.
/// `ours` is this binary's version (for the message about newer formats).
pub fn decode(bytes: &[u8], ours: &str) -> Result<Bundle, FormatError> {
    // The current format goes straight into the typed bundle: a bundle of 200,000 entries
    // costs half as much without the detour through a `Value` tree. Only the format number
    // is looked at first (the rest skipped, nothing allocated).
    #[derive(serde::Deserialize)]
    struct Peek {
        format: Option<u64>,
    }
    if let Ok(Peek {
        format: Some(format),
    }) = serde_json::from_slice::<Peek>(bytes)
    {
        if format == u64::from(BUNDLE_FORMAT) {
            return serde_json::from_slice(bytes).map_err(|e| FormatError::Json(e.to_string()));
        }
    }
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| FormatError::Json(e.to_string()))?;
    let mut object = match value {
        Value::Object(o) => o,
        _ => return Err(FormatError::Json("not a JSON object".into())),
    };
    let format = object
        .get("format")
        .and_then(Value::as_u64)
        .ok_or(FormatError::NoFormat)?;
    match format {
        0 => return Err(FormatError::Unknown(0)),
        1 => from_v1(&mut object),
        2 => {}
        newer if newer > u64::from(BUNDLE_FORMAT) => {
            let written_by = ["written_by", "shield_version"]
                .iter()
                .find_map(|k| object.get(*k).and_then(Value::as_str))
                .unwrap_or("(unknown)")
                .chars()
                .take(64)
                .collect();
            return Err(FormatError::Newer {
                found: newer,
                written_by,
                ours: ours.to_string(),
            });
        }
        other => return Err(FormatError::Unknown(other)),
    }
    serde_json::from_value(Value::Object(object)).map_err(|e| FormatError::Json(e.to_string()))
}

/// Format 1 -> 2 (see the module doc).
fn from_v1(object: &mut Map<String, Value>) {
    if let Some(version) = object.remove("shield_version") {
        object.insert("written_by".into(), version);
    }
    object.entry("upstream_dns").or_insert(Value::Null);
    object
        .entry("ttl_bounds")
        .or_insert_with(|| Value::from(vec![60u32, 3600]));
    object.insert(
        "audit_max_bytes".into(),
        Value::from(super::config::AuditConfig::default().max_bytes),
    );
    object.insert("format".into(), Value::from(2u32));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::bundle::DnsTier;
    use crate::core::policy::Mode;

    /// A `state.json` exactly as terok-shield 0.1.0 (format 1) wrote it.
    const V1: &str = include_str!("testdata/state-format1.json");
    /// The oldest format-1 shape: written before `upstream_dns` and `ttl_bounds` existed.
    const V1_EARLY: &str = include_str!("testdata/state-format1-early.json");

    #[test]
    fn format_1_is_migrated_with_every_decision_kept() {
        let b = decode(V1.as_bytes(), "9.9.9").unwrap();
        assert_eq!(b.format, BUNDLE_FORMAT);
        assert_eq!(b.written_by, "0.1.0");
        assert_eq!(b.name.as_str(), "fixture-c1");
        assert_eq!(b.instance, "c3f690344c244427");
        assert_eq!(b.mode, Mode::Bypass);
        assert_eq!(b.dns_tier, DnsTier::Builtin);
        let shown = |v: &[crate::core::target::Target]| -> Vec<String> {
            v.iter().map(|t| t.to_string()).collect()
        };
        assert_eq!(
            shown(&b.entries),
            [
                "198.51.100.7",
                "2001:db8::5",
                "example.org",
                "*.example.net",
                "198.51.100.0/28:443/tcp"
            ]
        );
        assert_eq!(shown(&b.live_allow), ["198.18.4.4"]);
        assert_eq!(shown(&b.live_deny), ["198.51.100.7"]);
        assert_eq!(b.ttl_bounds, [30, 600]);
        assert_eq!(
            b.audit_max_bytes,
            crate::core::config::AuditConfig::default().max_bytes
        );

        let early = decode(V1_EARLY.as_bytes(), "9.9.9").unwrap();
        assert_eq!(early.ttl_bounds, [60, 3600], "defaults of format 1");
        assert_eq!(early.upstream_dns, None);
    }

    #[test]
    fn current_format_round_trips_and_newer_or_unknown_ones_are_refused() {
        let b = decode(V1.as_bytes(), "0.2.0").unwrap();
        let text = serde_json::to_vec(&b).unwrap();
        assert_eq!(decode(&text, "0.2.0").unwrap(), b);

        let mut newer: Value = serde_json::from_slice(&text).unwrap();
        newer["format"] = Value::from(BUNDLE_FORMAT + 1);
        newer["written_by"] = Value::from("7.0.0");
        newer["a_field_from_the_future"] = Value::from(true);
        let err = decode(&serde_json::to_vec(&newer).unwrap(), "0.2.0").unwrap_err();
        assert!(
            matches!(err, FormatError::Newer { found, .. } if found == u64::from(BUNDLE_FORMAT) + 1)
        );
        let msg = err.to_string();
        assert!(
            msg.contains("7.0.0") && msg.contains("0.2.0") && msg.contains("upgrade"),
            "{msg}"
        );

        for bad in [
            &br#"{"format": 0}"#[..],
            br#"{"name": "x"}"#,
            br#"[1]"#,
            br#"{"format": "2"}"#,
            b"{\"format\": 1, \"na",
        ] {
            assert!(
                decode(bad, "0.2.0").is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // A format-1 field in a format-2 bundle is unknown there: refused, not ignored.
        let mut mixed: Value = serde_json::from_slice(&text).unwrap();
        mixed["shield_version"] = Value::from("0.1.0");
        assert!(matches!(
            decode(&serde_json::to_vec(&mixed).unwrap(), "0.2.0"),
            Err(FormatError::Json(_))
        ));
        // Format 2 requires what format 1 left optional.
        let mut missing: Value = serde_json::from_slice(&text).unwrap();
        missing.as_object_mut().unwrap().remove("ttl_bounds");
        assert!(decode(&serde_json::to_vec(&missing).unwrap(), "0.2.0").is_err());
        // A key given twice is refused, not settled by whichever comes last.
        let text = String::from_utf8(text).unwrap();
        let twice = text.replacen("\"mode\":", "\"mode\":\"block\",\"mode\":", 1);
        assert_ne!(twice, text);
        assert!(matches!(
            decode(twice.as_bytes(), "0.2.0"),
            Err(FormatError::Json(m)) if m.contains("duplicate field")
        ));
    }
}
