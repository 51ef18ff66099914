//! The state bundle on disk: `<state>/containers/NAME/`.
//!
//! Layout (documented in docs/state-and-audit.md):
//! - `state.json`   the [`Bundle`] (versioned, atomically replaced)
//! - `runtime.json` what the hook found at the last start (pid, its start time, DNS, gateway)
//! - `audit.jsonl`  the audit log (JSON lines)
//! - `hook-error.log` the last hook failures, for `terok-shield status`
//! - `container-removed` poststop of a `--rm` container: the container is gone
//! - `.lock`        serialises writers
//!
//! Writes go to a temporary file that is renamed over the old one, under an exclusive lock,
//! so a crash leaves either the old or the new file, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use thiserror::Error;

use crate::core::bundle::{Bundle, BundleError, ContainerName};

/// Largest state file we read (hostile input must not exhaust memory).
pub const MAX_STATE_FILE: u64 = 64 << 20;

/// File names inside a bundle directory.
pub const STATE_FILE: &str = "state.json";
pub const RUNTIME_FILE: &str = "runtime.json";
pub const AUDIT_FILE: &str = "audit.jsonl";
pub const HOOK_ERROR_FILE: &str = "hook-error.log";
/// Left by poststop when podman removes the container as it stops (`--rm`): the bundle no
/// longer belongs to an existing container, so `run` need not ask podman about the name.
pub const REMOVED_MARKER: &str = "container-removed";
const LOCK_FILE: &str = ".lock";

/// Failures reading or writing state; each names the path and what to do.
#[derive(Debug, Error)]
pub enum StateError {
    #[error("no shield state for container `{name}` in {dir}: run `terok-shield prepare {name}` or `terok-shield run {name} -- IMAGE` first")]
    NotPrepared { name: String, dir: PathBuf },
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {reason}; run `terok-shield prepare` again to rebuild it")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path} is larger than {MAX_STATE_FILE} bytes; refusing to read it")]
    TooLarge { path: PathBuf },
    #[error("cannot use {path}: {source}")]
    Format {
        path: PathBuf,
        source: crate::core::bundle_format::FormatError,
    },
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// What the createRuntime hook recorded about the running container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeRecord {
    /// Container init PID as seen from the host.
    pub pid: u32,
    /// Its start time (clock ticks since boot, /proc/PID/stat field 22): guards PID reuse.
    pub start_time: u64,
    /// The bundle instance the firewall was applied for.
    pub instance: String,
    /// Nameservers found in the container's resolv.conf.
    pub dns_servers: Vec<std::net::IpAddr>,
    /// Default gateway of the container.
    pub gateway: Option<std::net::IpAddr>,
    /// When the firewall was applied (unix milliseconds).
    pub applied_at: u64,
    /// The process the hook started in the container's netns (builtin resolver, dnsmasq's
    /// supervisor, or the static tier's event reader): (pid, start time).
    #[serde(default)]
    pub resolver: Option<(u32, u64)>,
}

impl RuntimeRecord {
    /// The facts the policy is computed from, as the hook found them.
    pub fn facts(&self) -> crate::core::bundle::RuntimeFacts {
        crate::core::bundle::RuntimeFacts {
            dns_servers: self.dns_servers.clone(),
            gateway: self.gateway,
        }
    }
}

/// The directory holding every container's bundle.
#[derive(Debug, Clone)]
pub struct StateStore {
    containers_dir: PathBuf,
}

/// An exclusive lock on one bundle, released on drop.
#[derive(Debug)]
pub struct BundleLock {
    _file: File,
}

impl StateStore {
    /// A store rooted at `<state>/containers`.
    pub fn new(containers_dir: impl Into<PathBuf>) -> Self {
        StateStore {
            containers_dir: containers_dir.into(),
        }
    }

    /// The bundle directory of `name`.
    pub fn dir(&self, name: &ContainerName) -> PathBuf {
        self.containers_dir.join(name.as_str())
    }

    /// Start a fresh bundle directory for `name`, discarding any old one (a reused name must
    /// not inherit an earlier container's decisions). Returns the directory.
    pub fn reset(&self, name: &ContainerName) -> Result<PathBuf, StateError> {
        let dir = self.dir(name);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.containers_dir)
            .map_err(io("create", &self.containers_dir))?;
        if dir.exists() {
            // Keep the audit log: history of the name is still history.
            for entry in fs::read_dir(&dir).map_err(io("read", &dir))? {
                let entry = entry.map_err(io("read", &dir))?;
                let path = entry.path();
                if entry.file_name() == AUDIT_FILE || entry.file_name() == LOCK_FILE {
                    continue;
                }
                let removed = if entry.file_type().map_err(io("inspect", &path))?.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                removed.map_err(io("remove", &path))?;
            }
        } else {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(io("create", &dir))?;
        }
        Ok(dir)
    }

    /// Take the bundle's exclusive lock (blocking; writers are short).
    pub fn lock(&self, name: &ContainerName) -> Result<BundleLock, StateError> {
        lock_dir(&self.dir(name))
    }

    /// Load and validate `name`'s bundle.
    pub fn load(&self, name: &ContainerName) -> Result<Bundle, StateError> {
        let dir = self.dir(name);
        if !dir.join(STATE_FILE).exists() {
            return Err(StateError::NotPrepared {
                name: name.to_string(),
                dir: self.containers_dir.clone(),
            });
        }
        load_bundle(&dir, name)
    }

    /// Names of all prepared containers.
    pub fn names(&self) -> Vec<ContainerName> {
        let mut names: Vec<ContainerName> = fs::read_dir(&self.containers_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| ContainerName::new(&e.file_name().to_string_lossy()).ok())
            .collect();
        names.sort();
        names
    }
}

/// Lock a bundle directory (used by the hook, which knows only the directory).
pub fn lock_dir(dir: &Path) -> Result<BundleLock, StateError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io("open", &path))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).map_err(|e| {
        StateError::Io {
            action: "lock",
            path: path.clone(),
            source: e.into(),
        }
    })?;
    Ok(BundleLock { _file: file })
}

/// Load the bundle in `dir` and check it belongs to `name`.
///
/// Bundles of older formats are migrated in memory (a container prepared by an older
/// terok-shield keeps starting); newer formats are refused.
pub fn load_bundle(dir: &Path, name: &ContainerName) -> Result<Bundle, StateError> {
    use crate::core::bundle_format::{decode, FormatError};
    let path = dir.join(STATE_FILE);
    let bundle = decode(&read_bounded(&path)?, env!("CARGO_PKG_VERSION")).map_err(|e| match e {
        FormatError::Json(reason) => StateError::Corrupt {
            path: path.clone(),
            reason,
        },
        source => StateError::Format {
            path: path.clone(),
            source,
        },
    })?;
    if &bundle.name != name {
        return Err(BundleError::WrongContainer {
            found: bundle.name.to_string(),
            expected: name.to_string(),
        }
        .into());
    }
    Ok(bundle)
}

/// Atomically replace the bundle in `dir`, in the current format and stamped as written by
/// this version (a bundle read from an older format is upgraded by its next save).
pub fn save_bundle(dir: &Path, bundle: &Bundle) -> Result<(), StateError> {
    const OURS: &str = env!("CARGO_PKG_VERSION");
    if bundle.written_by == OURS && bundle.format == crate::core::bundle::BUNDLE_FORMAT {
        return write_json_atomic(&dir.join(STATE_FILE), bundle);
    }
    let stamped = Bundle {
        written_by: OURS.to_string(),
        format: crate::core::bundle::BUNDLE_FORMAT,
        ..bundle.clone()
    };
    write_json_atomic(&dir.join(STATE_FILE), &stamped)
}

/// Read the runtime record, if the hook wrote one.
pub fn read_runtime(dir: &Path) -> Result<Option<RuntimeRecord>, StateError> {
    let path = dir.join(RUNTIME_FILE);
    if !path.exists() {
        return Ok(None);
    }
    read_json(&path).map(Some)
}

/// Record what the hook found (atomically).
///
/// Not fsynced: the record describes a running process and is meaningless after a reboot,
/// and the hook is on the container's start path (an fsync costs ~1 ms here). The rename
/// still makes it all-or-nothing.
pub fn write_runtime(dir: &Path, record: &RuntimeRecord) -> Result<(), StateError> {
    let mut text = serde_json::to_vec(record).expect("runtime records serialise");
    text.push(b'\n');
    replace_file(&dir.join(RUNTIME_FILE), &text, false)
}

/// Forget the runtime record (the container stopped).
pub fn clear_runtime(dir: &Path) -> Result<(), StateError> {
    let path = dir.join(RUNTIME_FILE);
    match fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", &path)(e)),
        _ => Ok(()),
    }
}

/// Read a bounded file as text.
pub fn read_bounded(path: &Path) -> Result<Vec<u8>, StateError> {
    let file = File::open(path).map_err(io("read", path))?;
    let mut buf = Vec::new();
    file.take(MAX_STATE_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(io("read", path))?;
    if buf.len() as u64 > MAX_STATE_FILE {
        return Err(StateError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok(buf)
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, StateError> {
    let bytes = read_bounded(path)?;
    serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Write JSON to a temporary sibling, fsync, then rename over `path`.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    let mut text = serde_json::to_vec_pretty(value).expect("state always serialises");
    text.push(b'\n');
    write_atomic(path, &text)
}

/// Write bytes to a temporary sibling, fsync, then rename over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    replace_file(path, bytes, true)
}

fn replace_file(path: &Path, bytes: &[u8], durable: bool) -> Result<(), StateError> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("write", &tmp))?;
    file.write_all(bytes).map_err(io("write", &tmp))?;
    if durable {
        file.sync_all().map_err(io("sync", &tmp))?;
    }
    fs::rename(&tmp, path).map_err(io("replace", path))?;
    Ok(())
}

/// Append one line to a log file in one write (O_APPEND keeps concurrent lines whole).
pub fn append_line(path: &Path, line: &str) -> Result<(), StateError> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(io("append to", path))?;
    file.write_all(line.as_bytes())
        .map_err(io("append to", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::bundle::{DnsTier, BUNDLE_FORMAT};
    use crate::core::policy::Mode;

    fn temp_store(tag: &str) -> (PathBuf, StateStore) {
        let root = std::env::temp_dir().join(format!("ts-state-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        (root.clone(), StateStore::new(root.join("containers")))
    }

    fn bundle(name: &ContainerName) -> Bundle {
        Bundle {
            format: BUNDLE_FORMAT,
            written_by: "t".into(),
            name: name.clone(),
            instance: "i1".into(),
            created: 0,
            profiles: vec![],
            entries: vec![],
            resolved: Default::default(),
            mode: Mode::DenyAll,
            live_allow: vec![],
            live_deny: vec![],
            loopback_ports: vec![],
            audit_enabled: true,
            dns_tier: DnsTier::Static,
            upstream_dns: None,
            ttl_bounds: [60, 3600],
            published: vec![],
            audit_max_bytes: 1 << 20,
        }
    }

    #[test]
    fn save_load_reset_keeps_audit_and_drops_decisions() {
        let (root, store) = temp_store("rt");
        let name = ContainerName::new("c1").unwrap();
        assert!(matches!(
            store.load(&name),
            Err(StateError::NotPrepared { .. })
        ));
        let dir = store.reset(&name).unwrap();
        save_bundle(&dir, &bundle(&name)).unwrap();
        append_line(&dir.join(AUDIT_FILE), "{}\n").unwrap();
        let loaded = store.load(&name).unwrap();
        assert_eq!(
            loaded.written_by,
            env!("CARGO_PKG_VERSION"),
            "stamped on save"
        );
        assert_eq!(
            loaded,
            Bundle {
                written_by: env!("CARGO_PKG_VERSION").into(),
                ..bundle(&name)
            }
        );
        store.reset(&name).unwrap();
        assert!(matches!(
            store.load(&name),
            Err(StateError::NotPrepared { .. })
        ));
        assert!(dir.join(AUDIT_FILE).exists());
        assert_eq!(store.names(), vec![name]);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn corrupt_or_foreign_bundles_are_refused() {
        let (root, store) = temp_store("bad");
        let name = ContainerName::new("c1").unwrap();
        let dir = store.reset(&name).unwrap();
        fs::write(dir.join(STATE_FILE), b"{not json").unwrap();
        assert!(matches!(store.load(&name), Err(StateError::Corrupt { .. })));
        save_bundle(&dir, &bundle(&ContainerName::new("other").unwrap())).unwrap();
        assert!(matches!(store.load(&name), Err(StateError::Bundle(_))));
        fs::remove_dir_all(root).unwrap();
    }
}
