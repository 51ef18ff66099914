//! Asking podman about one container, for the few commands that cannot decide without it:
//! `status` of a container that has no live shield, and `run`/`prepare` of a name whose old
//! bundle may still belong to an existing container. Never on the hook's path.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use serde::Deserialize;
use thiserror::Error;

/// Failures asking podman.
#[derive(Debug, Error)]
pub enum PodmanError {
    #[error("podman not found: install podman (apt-get install podman) or add it to PATH")]
    NotFound,
    #[error("failed to run {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("`podman` failed for {name}: {stderr}")]
    Failed { name: String, stderr: String },
    #[error("`podman container inspect {name}` printed JSON we cannot read: {reason}")]
    Output { name: String, reason: String },
}

/// What podman says about a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodmanContainer {
    pub id: String,
    pub running: bool,
    /// Init PID as seen from the host (0 when not running).
    pub pid: u32,
    pub annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawContainer {
    id: String,
    state: RawState,
    #[serde(default)]
    config: RawConfig,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawState {
    running: bool,
    #[serde(default)]
    pid: u32,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawConfig {
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

/// Find the podman binary (PATH, then the usual places).
pub fn binary() -> Result<PathBuf, PodmanError> {
    crate::effects::nft::find_program("podman", &["/usr/bin/podman", "/usr/local/bin/podman"])
        .ok_or(PodmanError::NotFound)
}

/// Run `podman ARGS` to completion (no input).
fn podman(args: &[&str]) -> Result<std::process::Output, PodmanError> {
    let program = binary()?;
    Command::new(&program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| PodmanError::Spawn { program, source })
}

/// The container called `name`, or `None` when podman has no such container.
pub fn inspect(name: &str) -> Result<Option<PodmanContainer>, PodmanError> {
    let out = podman(&["container", "inspect", "--", name])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stderr.contains("no such container") || stderr.contains("no such object") {
            return Ok(None);
        }
        return Err(PodmanError::Failed {
            name: name.to_string(),
            stderr: stderr.trim().chars().take(500).collect(),
        });
    }
    parse_inspect(name, &out.stdout)
}

/// Names of every container podman has for this user, running or not.
pub fn container_names() -> Result<Vec<String>, PodmanError> {
    let out = podman(&["ps", "--all", "--format", "{{.Names}}"])?;
    if !out.status.success() {
        return Err(PodmanError::Failed {
            name: "--all".into(),
            stderr: String::from_utf8_lossy(&out.stderr)
                .trim()
                .chars()
                .take(500)
                .collect(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

fn parse_inspect(name: &str, json: &[u8]) -> Result<Option<PodmanContainer>, PodmanError> {
    let list: Vec<RawContainer> =
        serde_json::from_slice(json).map_err(|e| PodmanError::Output {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
    Ok(list.into_iter().next().map(|c| PodmanContainer {
        id: c.id,
        running: c.state.running,
        pid: if c.state.running { c.state.pid } else { 0 },
        annotations: c.config.annotations.unwrap_or_default(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_fields_we_use_from_podman_inspect() {
        let json = br#"[{"Id":"abc","Name":"c1","State":{"Status":"running","Running":true,"Pid":4242},
            "Config":{"Annotations":{"terok.shield.name":"c1","io.podman.annotations.autoremove":"FALSE"}}}]"#;
        let c = parse_inspect("c1", json).unwrap().unwrap();
        assert_eq!(c.id, "abc");
        assert!(c.running);
        assert_eq!(c.pid, 4242);
        assert_eq!(c.annotations["terok.shield.name"], "c1");
        let stopped =
            br#"[{"Id":"abc","State":{"Running":false,"Pid":0},"Config":{"Annotations":null}}]"#;
        let c = parse_inspect("c1", stopped).unwrap().unwrap();
        assert!(!c.running && c.annotations.is_empty());
        assert_eq!(parse_inspect("c1", b"[]").unwrap(), None);
        assert!(parse_inspect("c1", b"{").is_err());
    }
}
