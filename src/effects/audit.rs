//! Writing and reading the per-container audit logs (`audit.jsonl`).
//!
//! Writing never fails the caller: an audit line that cannot be written is reported on
//! stderr, because refusing to start a firewall over a full disk would help no one.
//!
//! The container's event writer (the only writer that can be busy) appends through
//! [`RotatingLog`], which keeps the file under its size cap by renaming it to
//! `audit.jsonl.1` (replacing the previous one): the newest lines are always kept. The few
//! lifecycle records other commands append between its writes count towards the cap at its
//! next write.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
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

/// The rotated audit log, `audit.jsonl.1`: the lines before the last rotation.
pub const ROTATED_AUDIT_FILE: &str = "audit.jsonl.1";

/// Every well-formed record in `dir/audit.jsonl.1` then `dir/audit.jsonl`, oldest first
/// (malformed lines are skipped).
pub fn read(dir: &Path) -> Vec<AuditRecord> {
    [ROTATED_AUDIT_FILE, AUDIT_FILE]
        .iter()
        .filter_map(|f| read_bounded(&dir.join(f)).ok())
        .flat_map(|bytes| {
            String::from_utf8_lossy(&bytes)
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect::<Vec<AuditRecord>>()
        })
        .collect()
}

/// `audit.jsonl` kept open for appending, rotated to `audit.jsonl.1` before a write would
/// take it past `max_bytes`.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    rotated: PathBuf,
    max_bytes: u64,
    file: Option<File>,
}

impl RotatingLog {
    pub fn new(dir: &Path, max_bytes: u64) -> RotatingLog {
        RotatingLog {
            path: dir.join(AUDIT_FILE),
            rotated: dir.join(ROTATED_AUDIT_FILE),
            max_bytes,
            file: None,
        }
    }

    /// Append whole lines in one write, rotating first if they would not fit.
    pub fn append(&mut self, lines: &[u8]) -> std::io::Result<()> {
        let size = match self.open()?.metadata() {
            Ok(m) => m.len(),
            Err(_) => 0,
        };
        if size > 0 && size + lines.len() as u64 > self.max_bytes {
            std::fs::rename(&self.path, &self.rotated)?;
            self.file = None;
        }
        let result = self.open()?.write_all(lines);
        if result.is_err() {
            self.file = None; // reopen next time
        }
        result
    }

    fn open(&mut self) -> std::io::Result<&mut File> {
        if self.file.is_none() {
            self.file = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(&self.path)?,
            );
        }
        Ok(self.file.as_mut().expect("opened above"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_the_newest_lines_under_the_cap() {
        let dir = std::env::temp_dir().join(format!("ts-audit-rot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut log = RotatingLog::new(&dir, 1000);
        for i in 0..500 {
            log.append(format!("{{\"line\":{i:05}}}\n").as_bytes())
                .unwrap();
        }
        let current = std::fs::read_to_string(dir.join(AUDIT_FILE)).unwrap();
        let rotated = std::fs::read_to_string(dir.join(ROTATED_AUDIT_FILE)).unwrap();
        assert!(current.len() <= 1000 && rotated.len() <= 1000);
        assert!(current.ends_with("{\"line\":00499}\n"), "{current}");
        assert!(rotated.ends_with(&format!(
            "{{\"line\":{:05}}}\n",
            499 - current.lines().count()
        )));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
