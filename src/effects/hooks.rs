//! OCI hook descriptors: how podman learns to call `terok-shield hook ...`.
//!
//! The descriptors are generic (one pair serves every container): they fire only for
//! containers carrying our `terok.shield.name` annotation, and the hook finds the container's
//! bundle through another annotation. Podman forgets `--hooks-dir` when a container is started
//! again, so the pair lives only where podman always looks: the system hooks directory
//! (`setup --system`), or a user directory added to the user's containers.conf (`setup
//! --user`, and `run`/`prepare` on first use). Never inside a state bundle: a container whose
//! bundle is deleted must still meet the hook, which then refuses it.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde_json::json;
use thiserror::Error;

use super::state::{write_atomic, StateError};
use crate::core::oci::annotation;

/// Descriptor file names, as the Python original names them.
pub const CREATE_RUNTIME_FILE: &str = "terok-shield-createRuntime.json";
pub const POSTSTOP_FILE: &str = "terok-shield-poststop.json";
/// The descriptor for containers joining a pod (`podman run --pod`): podman annotates them
/// with the pod's infra container only, so this one fires for every pod member and the hook
/// itself decides whether the pod is shielded (see `terok-shield pod create`).
pub const POD_MEMBER_FILE: &str = "terok-shield-pod-member.json";

/// Where podman looks for hooks when no `hooks_dir` is configured.
pub const SYSTEM_HOOK_DIRS: &[&str] = &[
    "/usr/share/containers/oci/hooks.d",
    "/etc/containers/oci/hooks.d",
];
/// Where `setup --system` installs.
pub const SYSTEM_INSTALL_DIR: &str = "/etc/containers/oci/hooks.d";
/// The containers.conf root's podman reads last (a rootless user's podman reads it before
/// the user's own): where [`SYSTEM_INSTALL_DIR`] is listed in `hooks_dir`.
pub const SYSTEM_CONTAINERS_CONF: &str = "/etc/containers/containers.conf";
/// Podman 4's `hooks_dir` when none is configured: /etc/containers/oci/hooks.d is *not* read
/// by default (measured with Podman 4.3.1), so system hooks there must be listed.
pub const PODMAN_DEFAULT_HOOK_DIRS: &[&str] = &["/usr/share/containers/oci/hooks.d"];

/// Failures installing hooks.
#[derive(Debug, Error)]
pub enum HookInstallError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid TOML ({reason}); fix it by hand, then run `terok-shield setup --user` again")]
    BadContainersConf { path: PathBuf, reason: String },
    #[error("cannot find this program's own path ({0}); run terok-shield by its full path")]
    SelfPath(std::io::Error),
    #[error("the OCI hooks were written to {dir}, but podman would not read them from there (check `hooks_dir` in {conf} and the CONTAINERS_CONF variable)")]
    NotEffective { dir: PathBuf, conf: PathBuf },
    #[error("the OCI hooks in {dir} call {binary}, which is not an executable file; run `terok-shield setup --system` as root to point them at this binary")]
    StaleSystemHooks { dir: PathBuf, binary: PathBuf },
}

/// The JSON of one descriptor calling `binary hook STAGE`.
///
/// Podman does not pass its environment to hooks, so a `TEROK_SHIELD_NFT` set when the
/// descriptor is written is recorded in the descriptor's `env`.
pub fn descriptor(binary: &Path, stage: &str) -> String {
    let mut value = json!({
        "version": "1.0.0",
        "hook": {
            "path": binary,
            "args": ["terok-shield", "hook", stage],
            "timeout": 30,
        },
        "when": { "annotations": { format!("^{}$", annotation::NAME.replace('.', "\\.")): ".+" } },
        "stages": [stage],
    });
    if let Some(nft) = std::env::var_os(crate::effects::nft::NFT_ENV) {
        value["hook"]["env"] = json!([format!(
            "{}={}",
            crate::effects::nft::NFT_ENV,
            nft.to_string_lossy()
        )]);
    }
    serde_json::to_string_pretty(&value).expect("descriptor serialises") + "\n"
}

/// The descriptor of [`POD_MEMBER_FILE`]: createRuntime of any container carrying podman's
/// pod annotation.
pub fn pod_member_descriptor(binary: &Path) -> String {
    let mut value: serde_json::Value =
        serde_json::from_str(&descriptor(binary, "createRuntime")).expect("our own JSON");
    value["hook"]["args"] = json!(["terok-shield", "hook", "podMember"]);
    value["when"] = json!({ "annotations": {
        format!("^{}$", annotation::POD_SANDBOX_ID.replace('.', "\\.")): ".+"
    }});
    serde_json::to_string_pretty(&value).expect("descriptor serialises") + "\n"
}

/// Write the descriptors into `dir` (created if needed).
pub fn write_descriptors(dir: &Path, binary: &Path) -> Result<(), HookInstallError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|source| HookInstallError::Io {
            action: "create",
            path: dir.to_path_buf(),
            source,
        })?;
    write_atomic(
        &dir.join(CREATE_RUNTIME_FILE),
        descriptor(binary, "createRuntime").as_bytes(),
    )?;
    write_atomic(
        &dir.join(POSTSTOP_FILE),
        descriptor(binary, "poststop").as_bytes(),
    )?;
    write_atomic(
        &dir.join(POD_MEMBER_FILE),
        pod_member_descriptor(binary).as_bytes(),
    )?;
    for f in [CREATE_RUNTIME_FILE, POSTSTOP_FILE, POD_MEMBER_FILE] {
        // Descriptors are public configuration; podman must be able to read them.
        let p = dir.join(f);
        let _ = fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644));
    }
    Ok(())
}

/// The absolute path of the running binary (what the descriptors must call).
pub fn self_binary() -> Result<PathBuf, HookInstallError> {
    std::env::current_exe().map_err(HookInstallError::SelfPath)
}

/// Where a persistent installation was found, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installed {
    System(PathBuf),
    User(PathBuf),
}

impl Installed {
    /// The directory holding the descriptors.
    pub fn dir(&self) -> &Path {
        match self {
            Installed::System(p) | Installed::User(p) => p,
        }
    }
}

/// Find persistent descriptors without asking podman (too slow for every `run`).
///
/// `user_hooks_dir` is where `setup --user` installs; it only counts if the user's
/// containers.conf lists it in `hooks_dir`.
pub fn find_installed(user_hooks_dir: &Path, containers_conf: &Path) -> Option<Installed> {
    find_installed_among(user_hooks_dir, containers_conf, SYSTEM_HOOK_DIRS)
}

fn find_installed_among(
    user_hooks_dir: &Path,
    containers_conf: &Path,
    system_dirs: &[&str],
) -> Option<Installed> {
    let has = |d: &Path| d.join(CREATE_RUNTIME_FILE).is_file() && d.join(POSTSTOP_FILE).is_file();
    if has(user_hooks_dir) && conf_lists_dir(containers_conf, user_hooks_dir) {
        return Some(Installed::User(user_hooks_dir.to_path_buf()));
    }
    system_dirs
        .iter()
        .map(Path::new)
        .find(|d| has(d))
        .map(|d| Installed::System(d.to_path_buf()))
}

/// The program an installed createRuntime descriptor calls, if it can be read.
pub fn descriptor_binary(dir: &Path) -> Option<PathBuf> {
    let text = fs::read_to_string(dir.join(CREATE_RUNTIME_FILE)).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    value["hook"]["path"].as_str().map(PathBuf::from)
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What [`ensure_installed`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensured {
    /// Working hooks were already in place.
    Present(Installed),
    /// Hooks were installed (or pointed at this binary again) just now.
    Installed(Installed),
}

/// Make sure podman will call our hook at every start of a shielded container: keep working
/// hooks, otherwise install them where podman always looks (system-wide for root, else for
/// the user, exactly as `setup` does). User hooks whose binary is gone are rewritten.
/// An error means shielding is not possible: the caller must not start anything.
pub fn ensure_installed(
    user_hooks_dir: &Path,
    containers_conf: &Path,
    binary: &Path,
    root: bool,
) -> Result<Ensured, HookInstallError> {
    ensure_installed_among(
        user_hooks_dir,
        containers_conf,
        binary,
        root,
        SYSTEM_HOOK_DIRS,
    )
}

fn ensure_installed_among(
    user_hooks_dir: &Path,
    containers_conf: &Path,
    binary: &Path,
    root: bool,
    system_dirs: &[&str],
) -> Result<Ensured, HookInstallError> {
    let found = find_installed_among(user_hooks_dir, containers_conf, system_dirs)
        // Root's podman calls system hooks only from a listed directory.
        .filter(|found| !root || system_hooks_listed(found.dir()));
    if let Some(found) = found {
        let calls = descriptor_binary(found.dir());
        if calls.as_deref().is_some_and(is_executable_file) {
            return Ok(Ensured::Present(found));
        }
        if let Installed::System(dir) = &found {
            return Err(HookInstallError::StaleSystemHooks {
                dir: dir.clone(),
                binary: calls.unwrap_or_default(),
            });
        }
    }
    if root {
        setup_system(binary)?;
    } else {
        setup_user(user_hooks_dir, containers_conf, binary)?;
    }
    find_installed_among(user_hooks_dir, containers_conf, system_dirs)
        .map(Ensured::Installed)
        .ok_or_else(|| HookInstallError::NotEffective {
            dir: if root {
                PathBuf::from(SYSTEM_INSTALL_DIR)
            } else {
                user_hooks_dir.to_path_buf()
            },
            conf: containers_conf.to_path_buf(),
        })
}

/// The containers.conf podman reads instead of every other one when `CONTAINERS_CONF` names
/// it: our `hooks_dir` entry must go there, or podman would never see it.
pub fn containers_conf_override() -> Option<PathBuf> {
    std::env::var_os("CONTAINERS_CONF")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
}

/// The containers.conf that decides root's `hooks_dir`.
fn system_containers_conf() -> PathBuf {
    containers_conf_override().unwrap_or_else(|| PathBuf::from(SYSTEM_CONTAINERS_CONF))
}

/// Whether `dir` is where root's podman reads hooks: podman's default directory, or listed in
/// `hooks_dir` of [`SYSTEM_CONTAINERS_CONF`] (or of `CONTAINERS_CONF`).
fn system_hooks_listed(dir: &Path) -> bool {
    PODMAN_DEFAULT_HOOK_DIRS.iter().any(|d| Path::new(d) == dir)
        || conf_lists_dir(&system_containers_conf(), dir)
}

/// `setup --system` (and root's `run`/`prepare` on first use): descriptors into
/// [`SYSTEM_INSTALL_DIR`], listed in `hooks_dir` of [`SYSTEM_CONTAINERS_CONF`] next to
/// podman's default directory.
pub fn setup_system(binary: &Path) -> Result<(), HookInstallError> {
    install_listed(
        Path::new(SYSTEM_INSTALL_DIR),
        &system_containers_conf(),
        binary,
        PODMAN_DEFAULT_HOOK_DIRS,
    )
}

/// What `setup --remove` changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removal {
    /// Hook descriptors deleted.
    pub deleted: Vec<PathBuf>,
    /// The containers.conf whose `hooks_dir` no longer lists the hook directory (edited,
    /// not deleted: it holds the user's other settings).
    pub conf_edited: Option<PathBuf>,
}

impl Removal {
    pub fn is_empty(&self) -> bool {
        self.deleted.is_empty() && self.conf_edited.is_none()
    }
}

/// `setup --system --remove`: the descriptors, and their directory out of `hooks_dir`.
pub fn remove_system() -> Result<Removal, HookInstallError> {
    remove_listed(
        Path::new(SYSTEM_INSTALL_DIR),
        &system_containers_conf(),
        PODMAN_DEFAULT_HOOK_DIRS,
    )
}

/// `setup --remove` for the user: delete the descriptors and take the directory out of
/// containers.conf again. Returns what was changed.
pub fn remove_user(
    user_hooks_dir: &Path,
    containers_conf: &Path,
) -> Result<Removal, HookInstallError> {
    remove_listed(user_hooks_dir, containers_conf, SYSTEM_HOOK_DIRS)
}

fn remove_listed(
    user_hooks_dir: &Path,
    containers_conf: &Path,
    defaults: &[&str],
) -> Result<Removal, HookInstallError> {
    let mut removal = Removal {
        deleted: remove_descriptors(user_hooks_dir)?,
        conf_edited: None,
    };
    let edit = |t: &str| drop_listed_dir(t, user_hooks_dir, defaults);
    if let Some(text) = planned_conf_edit(containers_conf, edit)? {
        write_containers_conf(containers_conf, &text)?;
        removal.conf_edited = Some(containers_conf.to_path_buf());
    }
    let _ = fs::remove_dir(user_hooks_dir); // only if empty
    Ok(removal)
}

/// Delete our descriptors from `dir` (nothing else). Returns the files removed.
pub fn remove_descriptors(dir: &Path) -> Result<Vec<PathBuf>, HookInstallError> {
    let mut removed = Vec::new();
    for f in [CREATE_RUNTIME_FILE, POSTSTOP_FILE, POD_MEMBER_FILE] {
        let path = dir.join(f);
        match fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(HookInstallError::Io {
                    action: "remove",
                    path,
                    source,
                })
            }
        }
    }
    Ok(removed)
}

fn conf_lists_dir(conf: &Path, dir: &Path) -> bool {
    let Ok(text) = fs::read_to_string(conf) else {
        return false;
    };
    let Ok(doc) = text.parse::<toml_edit::DocumentMut>() else {
        return false;
    };
    doc.get("engine")
        .and_then(|e| e.get("hooks_dir"))
        .and_then(|h| h.as_array())
        .is_some_and(|a| {
            a.iter()
                .any(|v| v.as_str() == Some(&*dir.to_string_lossy()))
        })
}

/// `setup --user`: descriptors into `user_hooks_dir`, and that directory added to
/// `[engine] hooks_dir` in the user's containers.conf (keeping podman's default directories,
/// which a configured `hooks_dir` would otherwise replace). Other settings are preserved.
///
/// The containers.conf edit is worked out before anything is written, so a file that cannot
/// be edited leaves no descriptors behind.
pub fn setup_user(
    user_hooks_dir: &Path,
    containers_conf: &Path,
    binary: &Path,
) -> Result<(), HookInstallError> {
    install_listed(user_hooks_dir, containers_conf, binary, SYSTEM_HOOK_DIRS)
}

/// Descriptors into `user_hooks_dir`, listed first in `hooks_dir` of `containers_conf`, with
/// `defaults` after it when the file configured no `hooks_dir` yet.
fn install_listed(
    user_hooks_dir: &Path,
    containers_conf: &Path,
    binary: &Path,
    defaults: &[&str],
) -> Result<(), HookInstallError> {
    let edit = |t: &str| add_listed_dir(t, user_hooks_dir, defaults);
    let change = planned_conf_edit(containers_conf, edit)?;
    write_descriptors(user_hooks_dir, binary)?;
    if let Some(text) = change {
        write_containers_conf(containers_conf, &text)?;
    }
    Ok(())
}

/// containers.conf as `edit` would leave it, or `None` when that changes nothing (a missing
/// file reads as empty). Nothing is written.
fn planned_conf_edit(
    containers_conf: &Path,
    edit: impl FnOnce(&str) -> Result<String, String>,
) -> Result<Option<String>, HookInstallError> {
    let text = match fs::read_to_string(containers_conf) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(HookInstallError::Io {
                action: "read",
                path: containers_conf.to_path_buf(),
                source,
            })
        }
    };
    let updated = edit(&text).map_err(|reason| HookInstallError::BadContainersConf {
        path: containers_conf.to_path_buf(),
        reason,
    })?;
    Ok((updated != text).then_some(updated))
}

/// Replace containers.conf atomically (its directory made if needed), readable by podman.
fn write_containers_conf(containers_conf: &Path, text: &str) -> Result<(), HookInstallError> {
    if let Some(parent) = containers_conf.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|source| HookInstallError::Io {
                action: "create",
                path: parent.to_path_buf(),
                source,
            })?;
    }
    write_atomic(containers_conf, text.as_bytes())?;
    let _ = fs::set_permissions(
        containers_conf,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    );
    Ok(())
}

/// Pure edit of containers.conf text: ensure `[engine] hooks_dir` contains `dir` (first) and
/// podman's default directories.
pub fn add_hooks_dir(text: &str, dir: &Path) -> Result<String, String> {
    add_listed_dir(text, dir, SYSTEM_HOOK_DIRS)
}

/// [`add_hooks_dir`] where an absent `hooks_dir` stands for `defaults`.
fn add_listed_dir(text: &str, dir: &Path, defaults: &[&str]) -> Result<String, String> {
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| e.to_string())?;
    let engine = doc
        .entry("engine")
        .or_insert_with(|| toml_edit::Item::Table(toml_edit::Table::new()))
        .as_table_mut()
        .ok_or("`engine` is not a table")?;
    let configured: Option<Vec<String>> =
        engine.get("hooks_dir").and_then(|h| h.as_array()).map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        });
    let ours = dir.to_string_lossy().to_string();
    let already = match &configured {
        Some(dirs) => dirs.contains(&ours),
        None => defaults.contains(&ours.as_str()),
    };
    let existing = configured.unwrap_or_else(|| defaults.iter().map(|s| s.to_string()).collect());
    if already {
        return Ok(doc.to_string());
    }
    let mut dirs = toml_edit::Array::new();
    dirs.push(ours);
    for d in existing {
        dirs.push(d);
    }
    engine["hooks_dir"] = toml_edit::value(dirs);
    Ok(doc.to_string())
}

/// Pure edit of containers.conf text: take `dir` out of `[engine] hooks_dir`. When what is
/// left is exactly podman's defaults (what [`add_hooks_dir`] put there), the key goes too.
pub fn drop_hooks_dir(text: &str, dir: &Path) -> Result<String, String> {
    drop_listed_dir(text, dir, SYSTEM_HOOK_DIRS)
}

/// [`drop_hooks_dir`] where `defaults` is what an absent `hooks_dir` stands for.
fn drop_listed_dir(text: &str, dir: &Path, defaults: &[&str]) -> Result<String, String> {
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| e.to_string())?;
    let ours = dir.to_string_lossy().to_string();
    let Some(engine) = doc.get_mut("engine").and_then(|e| e.as_table_mut()) else {
        return Ok(text.to_string());
    };
    let Some(dirs) = engine.get_mut("hooks_dir").and_then(|h| h.as_array_mut()) else {
        return Ok(text.to_string());
    };
    let before = dirs.len();
    dirs.retain(|v| v.as_str() != Some(&ours));
    if dirs.len() == before {
        return Ok(text.to_string());
    }
    let rest: Vec<&str> = dirs.iter().filter_map(|v| v.as_str()).collect();
    if rest == defaults {
        engine.remove("hooks_dir");
    }
    Ok(doc.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_is_gated_by_our_annotation() {
        let d: serde_json::Value = serde_json::from_str(&descriptor(
            Path::new("/usr/bin/terok-shield"),
            "createRuntime",
        ))
        .unwrap();
        assert_eq!(d["hook"]["path"], "/usr/bin/terok-shield");
        assert_eq!(
            d["hook"]["args"],
            json!(["terok-shield", "hook", "createRuntime"])
        );
        assert_eq!(d["when"]["annotations"]["^terok\\.shield\\.name$"], ".+");
        assert_eq!(d["stages"], json!(["createRuntime"]));
    }

    #[test]
    fn containers_conf_edit_preserves_settings_and_defaults() {
        let text = "# mine\n[containers]\ndefault_ulimits = [\"nofile=20000:20000\"]\n\n[engine]\nruntime = \"runc\"\n";
        let out = add_hooks_dir(text, Path::new("/home/u/.config/terok/shield/hooks.d")).unwrap();
        assert!(
            out.contains("# mine")
                && out.contains("runtime = \"runc\"")
                && out.contains("nofile=20000")
        );
        let doc: toml_edit::DocumentMut = out.parse().unwrap();
        let dirs: Vec<&str> = doc["engine"]["hooks_dir"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            dirs,
            [
                "/home/u/.config/terok/shield/hooks.d",
                SYSTEM_HOOK_DIRS[0],
                SYSTEM_HOOK_DIRS[1]
            ]
        );
        assert_eq!(
            add_hooks_dir(&out, Path::new("/home/u/.config/terok/shield/hooks.d")).unwrap(),
            out,
            "idempotent"
        );
        let fresh = add_hooks_dir("", Path::new("/h")).unwrap();
        assert!(fresh.contains("[engine]"));
        assert!(add_hooks_dir("engine = 3", Path::new("/h")).is_err());
        assert!(add_hooks_dir("[engine\n", Path::new("/h")).is_err());
    }

    /// Root's podman 4 does not read /etc/containers/oci/hooks.d unless it is listed: adding
    /// it lists it before podman's one default directory, and removing it restores the file.
    #[test]
    fn system_hooks_dir_is_listed_and_unlisted_in_roots_containers_conf() {
        let dir = Path::new(SYSTEM_INSTALL_DIR);
        let text = "[containers]\ndefault_ulimits = [\"nofile=20000:20000\"]\n";
        let added = add_listed_dir(text, dir, PODMAN_DEFAULT_HOOK_DIRS).unwrap();
        let doc: toml_edit::DocumentMut = added.parse().unwrap();
        let listed: Vec<&str> = doc["engine"]["hooks_dir"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(listed, [SYSTEM_INSTALL_DIR, PODMAN_DEFAULT_HOOK_DIRS[0]]);
        assert!(added.contains("nofile=20000:20000"), "{added}");
        let again = add_listed_dir(&added, dir, PODMAN_DEFAULT_HOOK_DIRS).unwrap();
        assert_eq!(again, added, "listing twice changes nothing");
        let dropped = drop_listed_dir(&added, dir, PODMAN_DEFAULT_HOOK_DIRS).unwrap();
        assert!(!dropped.contains("hooks_dir"), "{dropped}");
        assert!(dropped.contains("nofile=20000:20000"), "{dropped}");
    }

    #[test]
    fn removing_the_hooks_dir_undoes_adding_it_and_keeps_the_rest() {
        let dir = Path::new("/home/u/.config/terok/shield/hooks.d");
        let text = "# mine\n[engine]\nruntime = \"runc\"\n";
        let added = add_hooks_dir(text, dir).unwrap();
        let removed = drop_hooks_dir(&added, dir).unwrap();
        let doc: toml_edit::DocumentMut = removed.parse().unwrap();
        assert!(doc["engine"].get("hooks_dir").is_none(), "{removed}");
        assert!(removed.contains("# mine") && removed.contains("runtime = \"runc\""));
        // A hooks_dir the user set up with other directories keeps them.
        let own = "[engine]\nhooks_dir = [\"/opt/hooks\"]\n";
        let kept = drop_hooks_dir(&add_hooks_dir(own, dir).unwrap(), dir).unwrap();
        let doc: toml_edit::DocumentMut = kept.parse().unwrap();
        let dirs: Vec<&str> = doc["engine"]["hooks_dir"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(dirs, ["/opt/hooks"]);
        // Nothing of ours: unchanged, byte for byte.
        assert_eq!(drop_hooks_dir(own, dir).unwrap(), own);
        assert_eq!(drop_hooks_dir("", dir).unwrap(), "");
        assert!(drop_hooks_dir("[engine\n", dir).is_err());
    }

    #[test]
    fn ensure_installed_installs_once_and_repairs_hooks_whose_binary_is_gone() {
        let root = std::env::temp_dir().join(format!("ts-hooks-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let hooks = root.join("hooks.d");
        let conf = root.join("containers/containers.conf");
        let binary = root.join("bin/terok-shield");
        fs::create_dir_all(binary.parent().unwrap()).unwrap();
        fs::write(&binary, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&binary, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

        let first = ensure_installed_among(&hooks, &conf, &binary, false, &[]).unwrap();
        assert_eq!(first, Ensured::Installed(Installed::User(hooks.clone())));
        assert_eq!(descriptor_binary(&hooks), Some(binary.clone()));
        assert_eq!(
            ensure_installed_among(&hooks, &conf, &binary, false, &[]).unwrap(),
            Ensured::Present(Installed::User(hooks.clone()))
        );
        // The binary the hooks call was moved away: the user's hooks follow this one.
        let moved = root.join("bin/terok-shield-new");
        fs::rename(&binary, &moved).unwrap();
        assert_eq!(
            ensure_installed_among(&hooks, &conf, &moved, false, &[]).unwrap(),
            Ensured::Installed(Installed::User(hooks.clone()))
        );
        assert_eq!(descriptor_binary(&hooks), Some(moved));

        let removed = remove_user(&hooks, &conf).unwrap();
        assert_eq!(removed.deleted.len(), 3, "three descriptors: {removed:?}");
        assert_eq!(
            removed.conf_edited,
            Some(conf.clone()),
            "edited, not deleted"
        );
        assert!(conf.exists());
        assert!(find_installed_among(&hooks, &conf, &[]).is_none());
        assert!(!hooks.join(CREATE_RUNTIME_FILE).exists());
        assert!(!hooks.exists());
        // An unparsable containers.conf refuses, and leaves the file alone.
        fs::write(&conf, "[engine\n").unwrap();
        let err = ensure_installed_among(&hooks, &conf, &binary, false, &[]).unwrap_err();
        assert!(
            matches!(err, HookInstallError::BadContainersConf { .. }),
            "{err}"
        );
        assert_eq!(fs::read_to_string(&conf).unwrap(), "[engine\n");
        assert!(
            !hooks.exists(),
            "descriptors written although containers.conf was refused"
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
