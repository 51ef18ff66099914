//! The container's own OCI configuration (`<bundle>/config.json`), checked by the hook.
//!
//! `terok-shield run` refuses dangerous podman flags, but a container prepared with
//! `terok-shield prepare` and started by hand (`podman run --cap-add NET_ADMIN $(flags)`),
//! or joined to a shielded pod, can be started with any flags at all. What the runtime is
//! about to grant is written in config.json, so the hook decides from that: a workload that
//! could rewrite the firewall (NET_ADMIN), send crafted packets around it (NET_RAW), or
//! detach it (SYS_ADMIN, BPF) in any capability set is refused. The file is written by
//! podman from user input: it is parsed as hostile, with a size bound.

use std::collections::BTreeMap;

use serde::Deserialize;
use thiserror::Error;

/// Largest config.json we read. A real one is a few KiB to a few hundred (many mounts or a
/// huge environment); anything bigger is refused rather than parsed.
pub const MAX_CONFIG_BYTES: usize = 16 << 20;

/// Capabilities that would let the workload change, bypass or detach its firewall.
pub const FORBIDDEN_CAPS: [&str; 4] = ["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_ADMIN", "CAP_BPF"];

/// The capability sets of an OCI process, in the order the spec lists them.
const SETS: [&str; 5] = [
    "bounding",
    "effective",
    "permitted",
    "inheritable",
    "ambient",
];

/// Why a container's configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OciConfigError {
    #[error("its OCI configuration is larger than {MAX_CONFIG_BYTES} bytes")]
    TooLarge,
    #[error("its OCI configuration is not valid JSON of the expected shape: {0}")]
    Json(String),
    #[error("it would hold {}, which would let the workload change or bypass its firewall; start it without --privileged or --cap-add of NET_ADMIN, NET_RAW, SYS_ADMIN or BPF", describe(.0))]
    ForbiddenCapabilities(Vec<HeldCapability>),
}

/// A forbidden capability and the sets that hold it (`bounding`, `effective`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldCapability {
    pub name: String,
    pub sets: Vec<&'static str>,
}

fn describe(held: &[HeldCapability]) -> String {
    held.iter()
        .map(|h| format!("{} ({})", h.name, h.sets.join(", ")))
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    process: Option<RawProcess>,
    #[serde(default)]
    linux: Option<RawLinux>,
}

#[derive(Deserialize)]
struct RawLinux {
    #[serde(default)]
    namespaces: Vec<RawNamespace>,
}

#[derive(Deserialize)]
struct RawNamespace {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: Option<String>,
}

/// The PID whose network namespace a container joins (`linux.namespaces`: `network` with
/// `path` `/proc/PID/ns/net`, how podman puts a container into its pod's namespace), or
/// `None` when it gets a namespace of its own (no path) or joins one by another path.
pub fn joined_network_pid(config: &[u8]) -> Result<Option<u32>, OciConfigError> {
    if config.len() > MAX_CONFIG_BYTES {
        return Err(OciConfigError::TooLarge);
    }
    let raw: RawConfig =
        serde_json::from_slice(config).map_err(|e| OciConfigError::Json(e.to_string()))?;
    Ok(raw
        .linux
        .into_iter()
        .flat_map(|l| l.namespaces)
        .find(|n| n.kind == "network")
        .and_then(|n| n.path)
        .and_then(|p| {
            p.strip_prefix("/proc/")?
                .strip_suffix("/ns/net")?
                .parse::<u32>()
                .ok()
        })
        .filter(|pid| *pid > 1))
}

#[derive(Deserialize)]
struct RawProcess {
    #[serde(default)]
    capabilities: Option<BTreeMap<String, Option<Vec<String>>>>,
}

/// Check a container's config.json: `Ok` when no process capability set holds any of
/// [`FORBIDDEN_CAPS`]. A config without `process.capabilities` grants none and passes.
pub fn check_capabilities(config: &[u8]) -> Result<(), OciConfigError> {
    if config.len() > MAX_CONFIG_BYTES {
        return Err(OciConfigError::TooLarge);
    }
    let raw: RawConfig =
        serde_json::from_slice(config).map_err(|e| OciConfigError::Json(e.to_string()))?;
    let sets = raw.process.and_then(|p| p.capabilities).unwrap_or_default();
    let mut held: Vec<HeldCapability> = Vec::new();
    for forbidden in FORBIDDEN_CAPS {
        let in_sets: Vec<&'static str> = SETS
            .iter()
            .copied()
            .filter(|set| {
                sets.get(*set)
                    .and_then(Option::as_ref)
                    .is_some_and(|caps| caps.iter().any(|c| same_capability(c, forbidden)))
            })
            .collect();
        if !in_sets.is_empty() {
            held.push(HeldCapability {
                name: forbidden.to_string(),
                sets: in_sets,
            });
        }
    }
    if held.is_empty() {
        Ok(())
    } else {
        Err(OciConfigError::ForbiddenCapabilities(held))
    }
}

/// Runtimes accept `CAP_NET_ADMIN`, and some `net_admin` or padded spellings; compare the
/// way they do, so no spelling slips past.
fn same_capability(found: &str, forbidden: &str) -> bool {
    let found = found.trim().to_ascii_uppercase();
    let found = found.strip_prefix("CAP_").unwrap_or(&found);
    forbidden.strip_prefix("CAP_") == Some(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The capabilities of a podman 4.3 container started with the shield's flags.
    const PODMAN_DEFAULT: &str = r#"["CAP_CHOWN","CAP_DAC_OVERRIDE","CAP_FOWNER","CAP_FSETID","CAP_KILL","CAP_NET_BIND_SERVICE","CAP_SETFCAP","CAP_SETGID","CAP_SETPCAP","CAP_SETUID","CAP_SYS_CHROOT"]"#;

    fn config(caps: &str) -> Vec<u8> {
        format!(r#"{{"ociVersion":"1.0.2","process":{{"args":["sh"],"capabilities":{caps}}},"mounts":[]}}"#)
            .into_bytes()
    }

    #[test]
    fn default_capabilities_pass() {
        let c = PODMAN_DEFAULT;
        let all = format!(r#"{{"bounding":{c},"effective":{c},"permitted":{c}}}"#);
        assert_eq!(check_capabilities(&config(&all)), Ok(()));
        assert_eq!(check_capabilities(b"{}"), Ok(()));
        assert_eq!(check_capabilities(br#"{"process":{}}"#), Ok(()));
        assert_eq!(check_capabilities(&config(r#"{"ambient":null}"#)), Ok(()));
    }

    #[test]
    fn a_forbidden_capability_in_any_set_is_refused_and_named() {
        for set in SETS {
            for cap in FORBIDDEN_CAPS {
                let caps = format!(r#"{{"{set}":["CAP_CHOWN","{cap}"]}}"#);
                let err = check_capabilities(&config(&caps)).unwrap_err();
                assert_eq!(
                    err,
                    OciConfigError::ForbiddenCapabilities(vec![HeldCapability {
                        name: cap.to_string(),
                        sets: vec![set],
                    }]),
                    "{set} {cap}"
                );
            }
        }
        let err = check_capabilities(&config(
            r#"{"bounding":["CAP_NET_ADMIN","CAP_BPF"],"effective":["CAP_NET_ADMIN"]}"#,
        ))
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("CAP_NET_ADMIN (bounding, effective), CAP_BPF (bounding)"),
            "{text}"
        );
        assert!(
            text.contains("--cap-add"),
            "the message says what to do: {text}"
        );
    }

    #[test]
    fn odd_spellings_do_not_slip_past() {
        for spelled in ["net_admin", "NET_ADMIN", " cap_net_admin ", "Cap_Net_Admin"] {
            let caps = format!(r#"{{"effective":["{spelled}"]}}"#);
            assert!(
                check_capabilities(&config(&caps)).is_err(),
                "{spelled} passed"
            );
        }
        assert!(check_capabilities(&config(r#"{"effective":["CAP_NET_ADMINX"]}"#)).is_ok());
    }

    #[test]
    fn the_joined_network_namespace_names_the_pods_infra_process() {
        let member = br#"{"linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/proc/6103/ns/net"}]}}"#;
        assert_eq!(joined_network_pid(member), Ok(Some(6103)));
        let own = br#"{"linux":{"namespaces":[{"type":"network"}]}}"#;
        assert_eq!(joined_network_pid(own), Ok(None));
        for odd in [
            r#"{"linux":{"namespaces":[{"type":"network","path":"/run/netns/x"}]}}"#,
            r#"{"linux":{"namespaces":[{"type":"network","path":"/proc/1/ns/net"}]}}"#,
            r#"{"linux":{"namespaces":[{"type":"network","path":"/proc/x/ns/net"}]}}"#,
            r#"{}"#,
        ] {
            assert_eq!(joined_network_pid(odd.as_bytes()), Ok(None), "{odd}");
        }
        assert!(joined_network_pid(b"[").is_err());
    }

    #[test]
    fn hostile_input_is_refused_not_trusted() {
        assert!(matches!(
            check_capabilities(b"not json"),
            Err(OciConfigError::Json(_))
        ));
        assert!(matches!(
            check_capabilities(&config(r#"{"effective":"CAP_NET_ADMIN"}"#)),
            Err(OciConfigError::Json(_))
        ));
        assert!(matches!(
            check_capabilities(&config(r#"{"effective":[1]}"#)),
            Err(OciConfigError::Json(_))
        ));
        let mut huge = config(&format!(r#"{{"effective":{PODMAN_DEFAULT}}}"#));
        huge.resize(MAX_CONFIG_BYTES + 1, b' ');
        assert_eq!(check_capabilities(&huge), Err(OciConfigError::TooLarge));
    }
}
