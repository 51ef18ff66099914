//! Facts about a container process read from /proc and its OCI bundle.
//!
//! Used by the hook (which runs as root inside the rootless user namespace) and by live
//! commands (which run as the user). Everything read here is untrusted and bounded.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Failures reading process facts.
#[derive(Debug, Error)]
pub enum ProcError {
    #[error("process {pid} is gone ({source}); the container is not running")]
    Gone { pid: u32, source: std::io::Error },
    #[error("cannot parse {path}: {why}")]
    Parse { path: PathBuf, why: &'static str },
}

/// Start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat); with the PID
/// it identifies one process for good, since PIDs are reused.
pub fn start_time(pid: u32) -> Result<u64, ProcError> {
    let path = PathBuf::from(format!("/proc/{pid}/stat"));
    let text = fs::read_to_string(&path).map_err(|source| ProcError::Gone { pid, source })?;
    parse_start_time(&text).ok_or(ProcError::Parse {
        path,
        why: "unexpected /proc/PID/stat format",
    })
}

/// Parse field 22 of a /proc/PID/stat line (the command name may contain spaces and ')').
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // Fields after the name start at field 3; start time is field 22.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process recorded as (`pid`, `start`) is still the same live process.
pub fn is_same_process(pid: u32, start: u64) -> bool {
    start_time(pid).is_ok_and(|s| s == start)
}

/// Send `signal` to `pid` only if it is still the process that started at `start` (a PID
/// reused by another process is left alone). Best effort: a vanished process is no error.
pub fn signal_if_same(pid: u32, start: u64, signal: rustix::process::Signal) {
    if is_same_process(pid, start) {
        if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process(p, signal);
        }
    }
}

/// The host path of the container's /etc/resolv.conf, from the OCI bundle's config.json.
pub fn resolv_conf_source(oci_bundle: &Path) -> Option<PathBuf> {
    let config = fs::read(oci_bundle.join("config.json")).ok()?;
    if config.len() > 16 << 20 {
        return None;
    }
    let config: serde_json::Value = serde_json::from_slice(&config).ok()?;
    config
        .get("mounts")?
        .as_array()?
        .iter()
        .find(|m| m.get("destination").and_then(|d| d.as_str()) == Some("/etc/resolv.conf"))
        .and_then(|m| m.get("source")?.as_str())
        .map(PathBuf::from)
}

/// The container's OCI configuration (`<bundle>/config.json`), read up to one byte past
/// [`MAX_CONFIG_BYTES`](crate::core::oci_config::MAX_CONFIG_BYTES) so an oversized file is
/// seen as such by the check, never read whole.
pub fn read_oci_config(oci_bundle: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    fs::File::open(oci_bundle.join("config.json"))?
        .take(crate::core::oci_config::MAX_CONFIG_BYTES as u64 + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Default IPv4 gateway of `pid`'s network namespace (/proc/PID/net/route).
pub fn default_gateway(pid: u32) -> Option<IpAddr> {
    let text = fs::read_to_string(format!("/proc/{pid}/net/route")).ok()?;
    parse_default_gateway(&text)
}

/// Parse the default route's gateway from /proc/net/route text (little-endian hex).
pub fn parse_default_gateway(text: &str) -> Option<IpAddr> {
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 3 || f[1] != "00000000" {
            return None;
        }
        let raw = u32::from_str_radix(f[2], 16).ok()?;
        (raw != 0).then(|| IpAddr::V4(Ipv4Addr::from(raw.swap_bytes())))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_names() {
        let stat = "4242 (we ird) name)) S 1 4242 4242 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10 18446744073709551615";
        assert_eq!(parse_start_time(stat), Some(987_654));
        assert_eq!(parse_start_time("garbage"), None);
        let me = std::process::id();
        assert!(is_same_process(me, start_time(me).unwrap()));
        assert!(!is_same_process(me, start_time(me).unwrap() + 1));
    }

    #[test]
    fn reads_the_default_gateway() {
        let route = "Iface\tDestination\tGateway \tFlags\nTAP0\t0002000A\t00000000\t0001\ntap0\t00000000\t0202000A\t0003\n";
        assert_eq!(
            parse_default_gateway(route),
            Some("10.0.2.2".parse().unwrap())
        );
    }
}
