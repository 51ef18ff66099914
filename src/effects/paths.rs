//! Where the shield keeps its files: configuration, user profiles and per-container state.
//!
//! The decision is a pure function of the environment (passed in as a lookup) and the
//! `--state-dir` flag, so every rule below is unit-tested without touching the real
//! environment; `Paths::from_process_env` is the one thin wrapper that reads it.
//!
//! Precedence, first match wins:
//! - config dir: `$TEROK_SHIELD_CONFIG_DIR`, `$XDG_CONFIG_HOME/terok/shield`,
//!   `$HOME/.config/terok/shield`
//! - state dir: `--state-dir`, `$TEROK_SHIELD_STATE_DIR`, `$XDG_STATE_HOME/terok/shield`,
//!   `$HOME/.local/state/terok/shield`
//!
//! Empty values count as unset, and relative `XDG_*` values are ignored as the XDG Base
//! Directory specification requires.

use std::path::{Path, PathBuf};

use thiserror::Error;

/// Overrides the configuration directory (holds `config.yml` and `profiles/`).
pub const ENV_CONFIG_DIR: &str = "TEROK_SHIELD_CONFIG_DIR";
/// Overrides the state directory (per-container state lives beneath it).
pub const ENV_STATE_DIR: &str = "TEROK_SHIELD_STATE_DIR";

/// The hook's run directory for annotation-only containers (CRI-O); set in the descriptor.
pub const ENV_RUN_DIR: &str = "TEROK_SHIELD_RUN_DIR";
/// Set to `1` in a node's descriptor: refuse prepared bundles (`terok.shield.state_dir`).
pub const ENV_ANNOTATIONS_ONLY: &str = "TEROK_SHIELD_ANNOTATIONS_ONLY";
/// Configuration and profiles of annotation-only containers, unless
/// `TEROK_SHIELD_CONFIG_DIR` says otherwise: the hook runs as root with no HOME.
pub const SYSTEM_CONFIG_DIR: &str = "/etc/terok/shield";

/// Where an annotation-only container's policy comes from and its state goes, worked out
/// from the hook's environment (the descriptor's `env`, never the container's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePaths {
    pub settings: crate::core::oci::HookSettings,
    /// `config.yml` and `profiles/` of the node.
    pub config_dir: PathBuf,
}

impl NodePaths {
    /// Pure: `lookup` stands in for the environment. Relative overrides are errors.
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Result<NodePaths, PathsError> {
        let get = |name: &str| lookup(name).filter(|v| !v.is_empty());
        let absolute = |var: &'static str, default: &str| -> Result<PathBuf, PathsError> {
            match get(var) {
                None => Ok(PathBuf::from(default)),
                Some(v) if Path::new(&v).is_absolute() => Ok(PathBuf::from(v)),
                Some(v) => Err(PathsError::RelativeOverride { var, value: v }),
            }
        };
        Ok(NodePaths {
            settings: crate::core::oci::HookSettings {
                run_dir: absolute(ENV_RUN_DIR, crate::core::oci::DEFAULT_RUN_DIR)?,
                annotations_only: get(ENV_ANNOTATIONS_ONLY).as_deref() == Some("1"),
            },
            config_dir: absolute(ENV_CONFIG_DIR, SYSTEM_CONFIG_DIR)?,
        })
    }

    /// `from_env` over the hook's real environment.
    pub fn from_process_env() -> Result<NodePaths, PathsError> {
        NodePaths::from_env(|name| std::env::var(name).ok())
    }
}

/// Why no usable location could be worked out; each message says which variable to set.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PathsError {
    /// The config dir falls back to `$HOME`, and `$HOME` is unusable.
    #[error("cannot locate the configuration directory: HOME is {problem}; set HOME or XDG_CONFIG_HOME (or TEROK_SHIELD_CONFIG_DIR) to an absolute path")]
    NoHomeForConfig { problem: &'static str },
    /// The state dir falls back to `$HOME`, and `$HOME` is unusable.
    #[error("cannot locate the state directory: HOME is {problem}; set HOME or XDG_STATE_HOME (or TEROK_SHIELD_STATE_DIR, or pass --state-dir) to an absolute path")]
    NoHomeForState { problem: &'static str },
    /// One of our own override variables holds a relative path, which would depend on the
    /// working directory of whichever process (CLI or OCI hook) reads it.
    #[error("{var} is set to the relative path `{value}`; set it to an absolute path or unset it")]
    RelativeOverride { var: &'static str, value: String },
}

/// Every location the shield reads or writes, worked out once at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// Holds `config.yml` and `profiles/`.
    pub config_dir: PathBuf,
    /// `config_dir/config.yml`; may not exist (defaults apply).
    pub config_file: PathBuf,
    /// `config_dir/profiles`: user profiles `NAME.txt`, which win over bundled ones.
    pub profiles_dir: PathBuf,
    /// Root of everything the shield writes at run time.
    pub state_dir: PathBuf,
    /// `state_dir/containers`: one sub-directory per shielded container.
    pub containers_dir: PathBuf,
}

impl Paths {
    /// Work out the locations from an environment `lookup` and the `--state-dir` flag.
    ///
    /// Pure: `lookup` stands in for `std::env::var`, so tests can pass a map.
    pub fn from_env(
        lookup: impl Fn(&str) -> Option<String>,
        state_dir_flag: Option<PathBuf>,
    ) -> Result<Paths, PathsError> {
        let get = |name: &str| lookup(name).filter(|v| !v.is_empty());
        let xdg = |name: &str| {
            get(name)
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .map(|p| p.join("terok").join("shield"))
        };
        let own = |var: &'static str| -> Result<Option<PathBuf>, PathsError> {
            match get(var) {
                None => Ok(None),
                Some(v) if Path::new(&v).is_absolute() => Ok(Some(PathBuf::from(v))),
                Some(v) => Err(PathsError::RelativeOverride { var, value: v }),
            }
        };
        let home = || -> Result<PathBuf, &'static str> {
            match lookup("HOME") {
                None => Err("not set"),
                Some(h) if h.is_empty() => Err("empty"),
                Some(h) if !Path::new(&h).is_absolute() => Err("not an absolute path"),
                Some(h) => Ok(PathBuf::from(h)),
            }
        };

        let config_dir = match own(ENV_CONFIG_DIR)? {
            Some(dir) => dir,
            None => match xdg("XDG_CONFIG_HOME") {
                Some(dir) => dir,
                None => home()
                    .map_err(|problem| PathsError::NoHomeForConfig { problem })?
                    .join(".config/terok/shield"),
            },
        };
        let state_dir = match state_dir_flag {
            Some(dir) => dir,
            None => match own(ENV_STATE_DIR)? {
                Some(dir) => dir,
                None => match xdg("XDG_STATE_HOME") {
                    Some(dir) => dir,
                    None => home()
                        .map_err(|problem| PathsError::NoHomeForState { problem })?
                        .join(".local/state/terok/shield"),
                },
            },
        };
        Ok(Paths {
            config_file: config_dir.join("config.yml"),
            profiles_dir: config_dir.join("profiles"),
            config_dir,
            containers_dir: state_dir.join("containers"),
            state_dir,
        })
    }

    /// `from_env` over the real process environment.
    ///
    /// A relative `--state-dir` is made absolute against the current directory here, so
    /// paths handed to hooks and child processes do not depend on their working directory.
    pub fn from_process_env(state_dir_flag: Option<PathBuf>) -> Result<Paths, PathsError> {
        let flag = state_dir_flag.map(|p| std::path::absolute(&p).unwrap_or(p));
        Paths::from_env(|name| std::env::var(name).ok(), flag)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn paths(vars: &[(&str, &str)], flag: Option<&str>) -> Result<Paths, PathsError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Paths::from_env(|k| map.get(k).cloned(), flag.map(PathBuf::from))
    }

    #[test]
    fn node_paths_for_annotation_only_containers() {
        let node = |vars: &[(&str, &str)]| {
            let map: HashMap<String, String> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            NodePaths::from_env(|k| map.get(k).cloned())
        };
        let n = node(&[]).unwrap();
        assert_eq!(n.settings.run_dir, Path::new("/run/terok-shield"));
        assert_eq!(n.config_dir, Path::new("/etc/terok/shield"));
        assert!(!n.settings.annotations_only);
        let n = node(&[
            (ENV_RUN_DIR, "/tmp/r"),
            (ENV_CONFIG_DIR, "/tmp/c"),
            (ENV_ANNOTATIONS_ONLY, "1"),
        ])
        .unwrap();
        assert_eq!(
            (n.settings.run_dir.as_path(), n.config_dir.as_path()),
            (Path::new("/tmp/r"), Path::new("/tmp/c"))
        );
        assert!(n.settings.annotations_only);
        assert!(node(&[(ENV_RUN_DIR, "run")]).is_err());
    }

    #[test]
    fn home_fallbacks() {
        let p = paths(&[("HOME", "/home/u")], None).unwrap();
        assert_eq!(p.config_dir, Path::new("/home/u/.config/terok/shield"));
        assert_eq!(
            p.config_file,
            Path::new("/home/u/.config/terok/shield/config.yml")
        );
        assert_eq!(
            p.profiles_dir,
            Path::new("/home/u/.config/terok/shield/profiles")
        );
        assert_eq!(p.state_dir, Path::new("/home/u/.local/state/terok/shield"));
        assert_eq!(
            p.containers_dir,
            Path::new("/home/u/.local/state/terok/shield/containers")
        );
    }

    #[test]
    fn xdg_dirs_beat_home() {
        let p = paths(
            &[
                ("HOME", "/home/u"),
                ("XDG_CONFIG_HOME", "/cfg"),
                ("XDG_STATE_HOME", "/st"),
            ],
            None,
        )
        .unwrap();
        assert_eq!(p.config_dir, Path::new("/cfg/terok/shield"));
        assert_eq!(p.state_dir, Path::new("/st/terok/shield"));
        assert_eq!(p.containers_dir, Path::new("/st/terok/shield/containers"));
    }

    #[test]
    fn own_variables_beat_xdg_and_flag_beats_everything() {
        let env = [
            ("HOME", "/home/u"),
            ("XDG_CONFIG_HOME", "/cfg"),
            ("XDG_STATE_HOME", "/st"),
            ("TEROK_SHIELD_CONFIG_DIR", "/etc/shield"),
            ("TEROK_SHIELD_STATE_DIR", "/var/shield"),
        ];
        let p = paths(&env, None).unwrap();
        assert_eq!(p.config_dir, Path::new("/etc/shield"));
        assert_eq!(p.profiles_dir, Path::new("/etc/shield/profiles"));
        assert_eq!(p.state_dir, Path::new("/var/shield"));
        let p = paths(&env, Some("/run/flag")).unwrap();
        assert_eq!(p.state_dir, Path::new("/run/flag"));
        assert_eq!(p.containers_dir, Path::new("/run/flag/containers"));
        assert_eq!(p.config_dir, Path::new("/etc/shield"));
    }

    #[test]
    fn relative_and_empty_xdg_values_are_ignored() {
        for value in ["relative/dir", ""] {
            let p = paths(
                &[
                    ("HOME", "/home/u"),
                    ("XDG_CONFIG_HOME", value),
                    ("XDG_STATE_HOME", value),
                ],
                None,
            )
            .unwrap();
            assert_eq!(p.config_dir, Path::new("/home/u/.config/terok/shield"));
            assert_eq!(p.state_dir, Path::new("/home/u/.local/state/terok/shield"));
        }
        let p = paths(&[("HOME", "/h"), ("TEROK_SHIELD_STATE_DIR", "")], None).unwrap();
        assert_eq!(p.state_dir, Path::new("/h/.local/state/terok/shield"));
    }

    #[test]
    fn relative_own_overrides_are_errors() {
        let err = paths(&[("HOME", "/h"), ("TEROK_SHIELD_CONFIG_DIR", "cfg")], None).unwrap_err();
        assert_eq!(
            err,
            PathsError::RelativeOverride {
                var: ENV_CONFIG_DIR,
                value: "cfg".into()
            }
        );
        assert!(err.to_string().contains("absolute path"));
        let err = paths(&[("HOME", "/h"), ("TEROK_SHIELD_STATE_DIR", "st")], None).unwrap_err();
        assert!(matches!(
            err,
            PathsError::RelativeOverride {
                var: ENV_STATE_DIR,
                ..
            }
        ));
        // The flag makes the state variable irrelevant, so it is not even looked at.
        assert!(paths(
            &[("HOME", "/h"), ("TEROK_SHIELD_STATE_DIR", "st")],
            Some("/s")
        )
        .is_ok());
    }

    #[test]
    fn missing_home_is_an_error_only_when_needed() {
        let err = paths(&[], None).unwrap_err();
        assert_eq!(err, PathsError::NoHomeForConfig { problem: "not set" });
        assert!(
            err.to_string().contains("set HOME or XDG_CONFIG_HOME"),
            "{err}"
        );
        let err = paths(&[("XDG_CONFIG_HOME", "/cfg")], None).unwrap_err();
        assert_eq!(err, PathsError::NoHomeForState { problem: "not set" });
        assert!(err.to_string().contains("--state-dir"), "{err}");
        assert!(matches!(
            paths(&[("HOME", "rel")], None),
            Err(PathsError::NoHomeForConfig {
                problem: "not an absolute path"
            })
        ));
        assert!(matches!(
            paths(&[("HOME", "")], None),
            Err(PathsError::NoHomeForConfig { problem: "empty" })
        ));
        let p = paths(
            &[("XDG_CONFIG_HOME", "/cfg"), ("XDG_STATE_HOME", "/st")],
            None,
        )
        .unwrap();
        assert_eq!(p.state_dir, Path::new("/st/terok/shield"));
        let p = paths(&[("TEROK_SHIELD_CONFIG_DIR", "/c")], Some("/s")).unwrap();
        assert_eq!(
            (p.config_dir.as_path(), p.state_dir.as_path()),
            (Path::new("/c"), Path::new("/s"))
        );
    }
}
