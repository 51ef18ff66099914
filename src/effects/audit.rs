//! Writing and reading the per-container audit logs (`audit.jsonl`).
//!
//! Writing never fails the caller: an audit line that cannot be written is reported on
//! stderr, because refusing to start a firewall over a full disk would help no one.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::state::{append_line, read_bounded, AUDIT_FILE};
use crate::core::audit::AuditRecord;
use crate::core::bundle::ContainerName;

/// Milliseconds since the Unix epoch (0 if the clock is before it): the one clock reading
/// shared by audit records, state files and the resolver.
pub fn unix_millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Seconds since the Unix epoch.
pub fn unix_secs() -> u64 {
    (unix_millis() / 1000) as u64
}

/// Append one record to `dir/audit.jsonl` if auditing is enabled.
pub fn record(
    dir: &Path,
    enabled: bool,
    name: &ContainerName,
    event: &str,
    ok: bool,
    detail: Value,
) {
    if !enabled {
        return;
    }
    let millis = unix_millis();
    let line = AuditRecord::new(millis, name.as_str(), event, ok, detail).to_line();
    if let Err(e) = append_line(&dir.join(AUDIT_FILE), &line) {
        eprintln!("terok-shield: warning: audit log not written: {e}");
    }
}

/// Every well-formed record in `dir/audit.jsonl` (malformed lines are skipped).
pub fn read(dir: &Path) -> Vec<AuditRecord> {
    let Ok(bytes) = read_bounded(&dir.join(AUDIT_FILE)) else {
        return Vec::new();
    };
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
