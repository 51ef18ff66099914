//! Writing and reading the per-container audit logs (`audit.jsonl`).
//!
//! Writing never fails the caller: an audit line that cannot be written is reported on
//! stderr, because refusing to start a firewall over a full disk would help no one.
//!
//! Every writer appends through [`RotatingLog`], which keeps the file under its size cap by
//! renaming it to `audit.jsonl.1` (replacing the previous one): the newest lines are always
//! kept. Writers are several processes at once (the container's event writer, live commands,
//! the hooks), so each append takes `.audit.lock` in the bundle for its size check, rotation
//! and write, and a writer that kept the file open follows a rotation another one made.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::state::{read_bounded, AUDIT_FILE};
use crate::core::audit::AuditRecord;
use crate::core::bundle::{Bundle, ContainerName};
use crate::core::config::AuditConfig;

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

/// Whether a container's audit log is written, and its size cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditLog {
    pub enabled: bool,
    pub max_bytes: u64,
}

impl AuditLog {
    /// As the container's bundle says (`audit.enabled`, `audit.max_bytes` when prepared).
    pub fn of(bundle: &Bundle) -> AuditLog {
        AuditLog {
            enabled: bundle.audit_enabled,
            max_bytes: bundle.audit_max_bytes,
        }
    }

    /// Where no bundle could be read (a hook failing early, a pod being created): on, with
    /// the default cap.
    pub fn default_on() -> AuditLog {
        AuditLog {
            enabled: true,
            max_bytes: AuditConfig::default().max_bytes,
        }
    }
}

/// Append one record to `dir/audit.jsonl` if auditing is enabled, rotating the log first if
/// the record would take it past its cap.
pub fn record(
    dir: &Path,
    log: AuditLog,
    name: &ContainerName,
    event: &str,
    ok: bool,
    detail: Value,
) {
    if !log.enabled {
        return;
    }
    let millis = unix_millis();
    let line = AuditRecord::new(millis, name.as_str(), event, ok, detail).to_line();
    if let Err(e) = RotatingLog::new(dir, log.max_bytes).append(line.as_bytes()) {
        eprintln!(
            "terok-shield: warning: audit log {} not written: {e}",
            dir.join(AUDIT_FILE).display()
        );
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

/// Taken (flock) by every writer of a bundle's audit log around each append.
const AUDIT_LOCK_FILE: &str = ".audit.lock";

/// `audit.jsonl` kept open for appending, rotated to `audit.jsonl.1` before a write would
/// take it past `max_bytes`.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    rotated: PathBuf,
    lock_path: PathBuf,
    max_bytes: u64,
    file: Option<File>,
    lock: Option<File>,
}

impl RotatingLog {
    pub fn new(dir: &Path, max_bytes: u64) -> RotatingLog {
        RotatingLog {
            path: dir.join(AUDIT_FILE),
            rotated: dir.join(ROTATED_AUDIT_FILE),
            lock_path: dir.join(AUDIT_LOCK_FILE),
            max_bytes,
            file: None,
            lock: None,
        }
    }

    /// Append whole lines in one write, rotating first if they would not fit; under the
    /// bundle's audit lock, so that concurrent writers neither rotate twice (the second
    /// rename would discard the first one's lines) nor write past the cap.
    pub fn append(&mut self, lines: &[u8]) -> std::io::Result<()> {
        if self.lock.is_none() {
            self.lock = Some(
                OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .mode(0o600)
                    .open(&self.lock_path)?,
            );
        }
        let lock = self.lock.take().expect("opened above");
        let result = rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(std::io::Error::from)
            .and_then(|()| self.append_locked(lines));
        let _ = rustix::fs::flock(&lock, rustix::fs::FlockOperation::Unlock);
        self.lock = Some(lock);
        result
    }

    fn append_locked(&mut self, lines: &[u8]) -> std::io::Result<()> {
        // Another writer may have rotated the file since this one opened it: follow the name.
        if let Some(file) = &self.file {
            if !is_file_at(file, &self.path) {
                self.file = None;
            }
        }
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

/// Whether `path` still names the open `file` (same device and inode).
fn is_file_at(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
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

    /// Found by scripts/soak.sh: live commands appended their records without looking at the
    /// cap (audit.jsonl grew past it until the event writer's next write), and the event
    /// writer, its file renamed under it by another writer, went on appending to
    /// audit.jsonl.1 past the cap.
    #[test]
    fn concurrent_writers_keep_both_files_under_the_cap_and_lose_only_rotated_lines() {
        let dir = std::env::temp_dir().join(format!("ts-audit-two-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let name = ContainerName::new("c1").unwrap();
        let cap = 2000;
        // The event writer keeps its file open across appends.
        let mut events = RotatingLog::new(&dir, cap);
        for i in 0..300 {
            events
                .append(format!("{{\"event\":{i:05}}}\n").as_bytes())
                .unwrap();
            // A live command in between: a separate writer, as a separate process would be.
            if i % 7 == 0 {
                record(
                    &dir,
                    AuditLog {
                        enabled: true,
                        max_bytes: cap,
                    },
                    &name,
                    "allow",
                    true,
                    serde_json::json!({ "n": i }),
                );
            }
            let current = std::fs::metadata(dir.join(AUDIT_FILE)).unwrap().len();
            assert!(current <= cap, "audit.jsonl {current} bytes after {i}");
            if let Ok(m) = std::fs::metadata(dir.join(ROTATED_AUDIT_FILE)) {
                assert!(m.len() <= cap, "audit.jsonl.1 {} bytes after {i}", m.len());
                // Rotated only when full: a rotation that replaced it with a nearly empty
                // file discarded a whole log's worth of lines.
                assert!(
                    m.len() > cap / 2,
                    "audit.jsonl.1 {} bytes after {i}",
                    m.len()
                );
            }
        }
        // Nothing between the oldest line kept and the newest is missing.
        let raw = std::fs::read_to_string(dir.join(ROTATED_AUDIT_FILE)).unwrap()
            + &std::fs::read_to_string(dir.join(AUDIT_FILE)).unwrap();
        let events_kept: Vec<u32> = raw
            .lines()
            .filter_map(|l| l.strip_prefix("{\"event\":"))
            .filter_map(|l| l.trim_end_matches('}').parse().ok())
            .collect();
        assert_eq!(*events_kept.last().unwrap(), 299);
        let first = events_kept[0];
        assert_eq!(events_kept, (first..300).collect::<Vec<_>>());
        assert!(raw.contains("\"event\":\"allow\""));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_record_that_would_pass_the_cap_rotates_the_log_first() {
        let dir = std::env::temp_dir().join(format!("ts-audit-rec-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let name = ContainerName::new("c1").unwrap();
        let log = AuditLog {
            enabled: true,
            max_bytes: 1000,
        };
        for i in 0..50 {
            record(
                &dir,
                log,
                &name,
                "deny",
                true,
                serde_json::json!({ "n": i }),
            );
        }
        assert!(std::fs::metadata(dir.join(AUDIT_FILE)).unwrap().len() <= 1000);
        assert!(
            std::fs::metadata(dir.join(ROTATED_AUDIT_FILE))
                .unwrap()
                .len()
                <= 1000
        );
        let last = read(&dir).pop().unwrap();
        assert_eq!(serde_json::to_value(&last).unwrap()["detail"]["n"], 49);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
