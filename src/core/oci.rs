//! The OCI runtime state a hook receives on stdin, parsed and checked.
//!
//! The JSON comes from the runtime, but its annotations come from whoever created the
//! container; every field we use is validated before it is trusted.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use thiserror::Error;

use super::annotated::{check_container_id, parse_request, AnnotatedError, Request};
use super::bundle::ContainerName;

/// Annotation names, shared with the Python original so tooling keeps working.
pub mod annotation {
    pub const NAME: &str = "terok.shield.name";
    pub const STATE_DIR: &str = "terok.shield.state_dir";
    pub const VERSION: &str = "terok.shield.version";
    pub const PROFILES: &str = "terok.shield.profiles";
    pub const INSTANCE: &str = "terok.shield.instance";
    pub const AUDIT_ENABLED: &str = "terok.shield.audit_enabled";
    pub const LOOPBACK_PORTS: &str = "terok.shield.loopback_ports";
    pub const DNS_TIER: &str = "terok.shield.dns_tier";
    /// Set by podman for `--rm` containers: removed as soon as they stop.
    pub const PODMAN_AUTOREMOVE: &str = "io.podman.annotations.autoremove";
    /// Set by podman on every container of a pod: the ID of the pod's infra container.
    pub const POD_SANDBOX_ID: &str = "io.kubernetes.cri-o.SandboxID";
}

/// A container starting in a pod, as its OCI state tells (podman annotates every pod member
/// with its infra container's ID, nothing of ours).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMember {
    pub pid: u32,
    pub container_id: String,
    pub oci_bundle: PathBuf,
    /// The pod's infra container ID: 64 lowercase hex digits.
    pub infra_id: String,
}

/// Parse the OCI state of a pod member (createRuntime: the pid is required).
pub fn parse_pod_member(bytes: &[u8]) -> Result<PodMember, OciError> {
    if bytes.len() > MAX_STATE_BYTES {
        return Err(OciError::TooLarge);
    }
    let raw: RawState = serde_json::from_slice(bytes).map_err(|e| OciError::Json(e.to_string()))?;
    let pid = match raw.pid {
        Some(p) if p > 1 && p <= i64::from(u32::MAX) => p as u32,
        other => return Err(OciError::Pid(other)),
    };
    let infra_id = raw
        .annotations
        .get(annotation::POD_SANDBOX_ID)
        .cloned()
        .ok_or(OciError::Missing(annotation::POD_SANDBOX_ID))?;
    if infra_id.len() != 64
        || !infra_id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(OciError::Invalid {
            name: annotation::POD_SANDBOX_ID,
            value: infra_id,
            why: "must be a podman container ID (64 lowercase hex digits)".into(),
        });
    }
    Ok(PodMember {
        pid,
        container_id: raw.id,
        oci_bundle: raw.bundle,
        infra_id,
    })
}

/// Largest OCI state we read: a real one is a few KiB.
pub const MAX_STATE_BYTES: usize = 1 << 20;

/// Why the OCI state was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OciError {
    #[error("hook input is not valid OCI state JSON: {0}")]
    Json(String),
    #[error("hook input is larger than {MAX_STATE_BYTES} bytes")]
    TooLarge,
    #[error("OCI state has no usable container pid (got {0:?}); the runtime must run this hook at createRuntime")]
    Pid(Option<i64>),
    #[error("annotation {0} is missing; start the container with `terok-shield run` or the flags from `terok-shield prepare` (or, under CRI-O, give the pod terok.shield.profiles)")]
    Missing(&'static str),
    #[error("annotation {name} has an invalid value `{value}`: {why}")]
    Invalid {
        name: &'static str,
        value: String,
        why: String,
    },
    #[error(transparent)]
    Annotated(#[from] AnnotatedError),
    #[error("annotation terok.shield.state_dir is refused on this node: its hooks shield containers from their annotations only (terok.shield.name and terok.shield.profiles); remove terok.shield.state_dir")]
    StateDirRefused,
}

/// How this node's hook treats containers without a prepared bundle (from the descriptor's
/// environment, never from the container).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookSettings {
    /// Root of annotation-only state: `RUN_DIR/containers/NAME`.
    pub run_dir: PathBuf,
    /// Refuse `terok.shield.state_dir`: on a Kubernetes node a pod must not point the root
    /// hook at a directory of its choosing.
    pub annotations_only: bool,
}

impl Default for HookSettings {
    fn default() -> Self {
        HookSettings {
            run_dir: PathBuf::from(DEFAULT_RUN_DIR),
            annotations_only: false,
        }
    }
}

/// Where annotation-only containers keep their state unless the descriptor says otherwise.
pub const DEFAULT_RUN_DIR: &str = "/run/terok-shield";

#[derive(Deserialize)]
struct RawState {
    pid: Option<i64>,
    #[serde(default)]
    bundle: PathBuf,
    #[serde(default)]
    id: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// What a hook needs from the OCI state, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookInput {
    /// Container init PID in the hook's PID namespace (absent for poststop).
    pub pid: Option<u32>,
    pub container_id: String,
    /// The OCI bundle directory (holds config.json).
    pub oci_bundle: PathBuf,
    pub name: ContainerName,
    /// Our state bundle directory.
    pub state_dir: PathBuf,
    pub version: Option<String>,
    pub instance: Option<String>,
    /// Podman removes the container when it stops (`--rm`).
    pub autoremove: bool,
    /// Annotation-only mode (no prepared bundle): what the pod asked for. `state_dir` is then
    /// under the run directory and `instance` is the container id.
    pub annotated: Option<Request>,
}

/// Parse and validate the OCI state. `need_pid` is true for createRuntime.
pub fn parse_hook_input(bytes: &[u8], need_pid: bool) -> Result<HookInput, OciError> {
    parse_hook_input_with(bytes, need_pid, &HookSettings::default())
}

/// [`parse_hook_input`] under this node's `settings`: a container with a prepared bundle
/// (`terok.shield.state_dir`) is read exactly as before; one with `terok.shield.profiles`
/// and no state dir is an annotation-only container.
pub fn parse_hook_input_with(
    bytes: &[u8],
    need_pid: bool,
    settings: &HookSettings,
) -> Result<HookInput, OciError> {
    if bytes.len() > MAX_STATE_BYTES {
        return Err(OciError::TooLarge);
    }
    let raw: RawState = serde_json::from_slice(bytes).map_err(|e| OciError::Json(e.to_string()))?;
    let pid = match raw.pid {
        Some(p) if p > 1 && p <= i64::from(u32::MAX) => Some(p as u32),
        other if need_pid => return Err(OciError::Pid(other)),
        _ => None,
    };
    let get = |name: &'static str| raw.annotations.get(name).cloned();
    let name_raw = get(annotation::NAME).ok_or(OciError::Missing(annotation::NAME))?;
    let name = ContainerName::new(&name_raw).map_err(|e| OciError::Invalid {
        name: annotation::NAME,
        value: name_raw.clone(),
        why: e.to_string(),
    })?;
    let state_raw = match (get(annotation::STATE_DIR), get(annotation::PROFILES)) {
        (Some(_), _) if settings.annotations_only => return Err(OciError::StateDirRefused),
        (Some(dir), _) => dir,
        (None, Some(profiles)) => {
            let request = parse_request(&profiles, &raw.annotations)?;
            let id = check_container_id(&raw.id)?;
            return Ok(HookInput {
                pid,
                oci_bundle: raw.bundle,
                state_dir: settings.run_dir.join("containers").join(name.as_str()),
                name,
                // Nothing prepared it: no preparing version, and the instance is the
                // container itself.
                version: None,
                instance: Some(id.clone()),
                container_id: id,
                autoremove: false,
                annotated: Some(request),
            });
        }
        (None, None) => return Err(OciError::Missing(annotation::STATE_DIR)),
    };
    let state_dir = PathBuf::from(&state_raw);
    let clean = state_dir.is_absolute()
        && state_dir.components().all(|c| {
            matches!(
                c,
                std::path::Component::RootDir | std::path::Component::Normal(_)
            )
        });
    if !clean {
        return Err(OciError::Invalid {
            name: annotation::STATE_DIR,
            value: state_raw,
            why: "must be an absolute path without `..`".into(),
        });
    }
    Ok(HookInput {
        pid,
        container_id: raw.id,
        oci_bundle: raw.bundle,
        name,
        state_dir,
        version: get(annotation::VERSION),
        instance: get(annotation::INSTANCE),
        autoremove: get(annotation::PODMAN_AUTOREMOVE)
            .is_some_and(|v| v.eq_ignore_ascii_case("true")),
        annotated: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(pid: &str, ann: &str) -> Vec<u8> {
        format!(r#"{{"ociVersion":"1.0.2","id":"abc","status":"creating","pid":{pid},"bundle":"/b","annotations":{{{ann}}}}}"#).into_bytes()
    }

    #[test]
    fn accepts_a_real_shape() {
        let ann = r#""terok.shield.name":"c1","terok.shield.state_dir":"/home/u/.local/state/terok/shield/containers/c1","terok.shield.version":"0.1.0","other":"x""#;
        let input = parse_hook_input(&state("4242", ann), true).unwrap();
        assert_eq!(input.pid, Some(4242));
        assert_eq!(input.name.as_str(), "c1");
        assert_eq!(input.version.as_deref(), Some("0.1.0"));
        assert!(!input.autoremove);
        let rm = format!(r#"{ann},"io.podman.annotations.autoremove":"TRUE""#);
        assert!(
            parse_hook_input(&state("4242", &rm), true)
                .unwrap()
                .autoremove
        );
    }

    #[test]
    fn pod_members_are_recognised_by_their_sandbox_id() {
        let id = "562981adb4d5fbe9fc7ce136829e979cf846ca0cfee3910e5406d8fd75f8b3a5";
        let ann = format!(r#""io.kubernetes.cri-o.SandboxID":"{id}""#);
        let m = parse_pod_member(&state("77", &ann)).unwrap();
        assert_eq!((m.pid, m.infra_id.as_str()), (77, id));
        assert!(matches!(
            parse_pod_member(&state("77", "")),
            Err(OciError::Missing(_))
        ));
        for bad in ["../x", "ABC", &id[1..], &format!("{id}0")] {
            let ann = format!(r#""io.kubernetes.cri-o.SandboxID":"{bad}""#);
            assert!(parse_pod_member(&state("77", &ann)).is_err(), "{bad}");
        }
        assert!(parse_pod_member(&state(
            "null",
            &format!(r#""io.kubernetes.cri-o.SandboxID":"{id}""#)
        ))
        .is_err());
    }

    #[test]
    fn refuses_hostile_or_incomplete_state() {
        let good = r#""terok.shield.name":"c1","terok.shield.state_dir":"/s/c1""#;
        assert!(matches!(
            parse_hook_input(&state("0", good), true),
            Err(OciError::Pid(_))
        ));
        assert!(matches!(
            parse_hook_input(&state("1", good), true),
            Err(OciError::Pid(_))
        ));
        assert!(matches!(
            parse_hook_input(&state("-5", good), true),
            Err(OciError::Pid(_))
        ));
        assert!(parse_hook_input(&state("null", good), false).is_ok());
        assert!(matches!(
            parse_hook_input(&state("7", r#""terok.shield.state_dir":"/s""#), true),
            Err(OciError::Missing(_))
        ));
        assert!(parse_hook_input(
            &state(
                "7",
                r#""terok.shield.name":"../x","terok.shield.state_dir":"/s""#
            ),
            true
        )
        .is_err());
        assert!(parse_hook_input(
            &state(
                "7",
                r#""terok.shield.name":"c","terok.shield.state_dir":"/s/../../etc""#
            ),
            true
        )
        .is_err());
        assert!(parse_hook_input(
            &state(
                "7",
                r#""terok.shield.name":"c","terok.shield.state_dir":"rel/dir""#
            ),
            true
        )
        .is_err());
        assert!(parse_hook_input(b"not json", true).is_err());
        assert!(parse_hook_input(
            &state(
                "7",
                r#""terok.shield.name":"c","terok.shield.profiles":"../p""#
            ),
            true
        )
        .is_err());
        assert!(matches!(
            parse_hook_input(&vec![b' '; MAX_STATE_BYTES + 1], true),
            Err(OciError::TooLarge)
        ));
    }

    #[test]
    fn annotation_only_containers_live_under_the_run_dir() {
        let ann = r#""terok.shield.name":"pod-a","terok.shield.profiles":"base dev-node","terok.shield.instance":"forged","terok.shield.version":"0.0.1""#;
        let settings = HookSettings {
            run_dir: PathBuf::from("/run/ts"),
            annotations_only: true,
        };
        let input = parse_hook_input_with(&state("42", ann), true, &settings).unwrap();
        assert_eq!(input.state_dir, PathBuf::from("/run/ts/containers/pod-a"));
        assert_eq!(
            input.instance.as_deref(),
            Some("abc"),
            "the id, not the annotation"
        );
        assert_eq!(input.version, None);
        let request = input.annotated.unwrap();
        assert_eq!(request.profiles.len(), 2);
        // A prepared container is read exactly as before, unless the node refuses state dirs.
        let prepared = r#""terok.shield.name":"c1","terok.shield.state_dir":"/s/c1","terok.shield.profiles":"p""#;
        let input = parse_hook_input(&state("42", prepared), true).unwrap();
        assert_eq!(input.state_dir, PathBuf::from("/s/c1"));
        assert!(input.annotated.is_none());
        assert_eq!(
            parse_hook_input_with(&state("42", prepared), true, &settings),
            Err(OciError::StateDirRefused)
        );
        // A hostile id is refused, as is a hostile mode.
        let bad_id = format!(r#"{{"id":"../../x","pid":42,"annotations":{{{ann}}}}}"#);
        assert!(parse_hook_input_with(bad_id.as_bytes(), true, &settings).is_err());
        let bad_mode = format!(r#"{ann},"terok.shield.mode":"open""#);
        assert!(matches!(
            parse_hook_input_with(&state("42", &bad_mode), true, &settings),
            Err(OciError::Annotated(_))
        ));
    }
}
