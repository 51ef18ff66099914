//! Gathering the facts `doctor` judges: which programs exist and what they say about
//! themselves, what /etc/subuid and containers.conf hold, and whether nf_tables works inside
//! a throwaway user and network namespace. Every outside call is bounded; nothing here
//! decides ok/warn/fail (that is [`crate::core::doctor`]).

use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::core::config::DnsTier;
use crate::core::doctor::{
    hooks_dir_of, subordinate_ids, ConfigFact, Facts, HookFacts, IdMapper, InstalledHooks,
    NamespaceProbe, PodmanInfo, RootlessFacts, Tool,
};
use crate::effects::hooks::{
    descriptor_binary, find_installed, Installed, SYSTEM_HOOK_DIRS, SYSTEM_INSTALL_DIR,
};
use crate::effects::nft::{communicate, find_program, Nft};

/// `--version` answers at once; anything slower is broken.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);
/// `podman info` may first have to start podman's pause process.
const PODMAN_INFO_TIMEOUT: Duration = Duration::from_secs(60);
/// Loading an empty ruleset into a fresh namespace takes milliseconds.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// System-wide containers.conf files, most important first (podman merges them, the user's
/// own file winning over both).
const SYSTEM_CONTAINERS_CONFS: &[&str] = &[
    "/etc/containers/containers.conf",
    "/usr/share/containers/containers.conf",
];

/// What the command line worked out before gathering: the configuration and where the
/// user's hooks and containers.conf are.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub config: Result<ConfigFact, String>,
    /// Where `setup --user` installs; `None` when the config directory cannot be located.
    pub user_hooks_dir: Option<PathBuf>,
    pub user_conf: PathBuf,
    /// The script the namespace probe loads (the ruleset a container gets).
    pub probe_script: String,
}

/// Look at the host.
pub fn gather(inputs: Inputs) -> Facts {
    let root = rustix::process::geteuid().is_root();
    let nft = Nft::locate();
    let nft_tool = match &nft {
        Ok(nft) => Tool::Found {
            path: nft.program().to_path_buf(),
            version: version_of(nft.program()),
        },
        Err(e) => Tool::Missing(e.to_string()),
    };
    let podman = crate::effects::podman::binary();
    let podman_tool = match &podman {
        Ok(path) => Tool::Found {
            path: path.clone(),
            version: version_of(path),
        },
        Err(e) => Tool::Missing(e.to_string()),
    };
    let podman_info = podman.as_ref().ok().map(|p| podman_info(p));
    let podman_runtime_executable = matches!(&podman_info, Some(Ok(PodmanInfo { oci_runtime_path: Some(p), .. })) if is_executable(p));
    let runtimes_on_path = ["crun", "runc"]
        .iter()
        .filter_map(|name| {
            let fallbacks = [format!("/usr/bin/{name}"), format!("/usr/sbin/{name}")];
            let fallbacks: Vec<&str> = fallbacks.iter().map(String::as_str).collect();
            find_program(name, &fallbacks)
        })
        .collect();
    let dnsmasq = match &inputs.config {
        Ok(ConfigFact {
            tier: DnsTier::Dnsmasq,
            ..
        }) => Some(crate::effects::dnsmasq::locate().map_err(|e| format!("{e:#}"))),
        _ => None,
    };
    let namespace_probe = match &nft {
        Ok(nft) => probe_user_namespace(nft.program(), &inputs.probe_script),
        Err(_) => NamespaceProbe::NotRun("nft is missing (see the nft check)".into()),
    };
    Facts {
        root,
        user: user_name(),
        rootless: (!root).then(rootless_facts),
        hooks: hook_facts(&inputs, root),
        config: inputs.config,
        nft: nft_tool,
        podman: podman_tool,
        podman_info,
        podman_runtime_executable,
        runtimes_on_path,
        dnsmasq,
        namespace_probe,
    }
}

/// Run `program --version` (bounded); its stdout, or why it failed.
fn version_of(program: &Path) -> Result<String, String> {
    run_bounded(
        Command::new(program).arg("--version"),
        None,
        VERSION_TIMEOUT,
    )
    .map_err(|e| e.to_string())
}

/// Why a bounded command did not succeed.
#[derive(Debug, thiserror::Error)]
enum RunError {
    /// fork, the child's set-up before exec, or exec itself failed.
    #[error("cannot start it: {0}")]
    Spawn(std::io::Error),
    #[error("{0}")]
    Wait(crate::effects::nft::NftError),
    /// It ran and failed; the text is its exit and first lines of stderr.
    #[error("{0}")]
    Exit(String),
}

/// Run a command with a deadline; stdout on success.
fn run_bounded(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    limit: Duration,
) -> Result<String, RunError> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(RunError::Spawn)?;
    let (status, out, err) = communicate(&mut child, stdin, limit).map_err(RunError::Wait)?;
    if status.success() {
        Ok(String::from_utf8_lossy(&out).into_owned())
    } else {
        let err = String::from_utf8_lossy(&err);
        let err: String = err.trim().lines().take(3).collect::<Vec<_>>().join(" / ");
        Err(RunError::Exit(match status.code() {
            Some(code) if err.is_empty() => format!("exit {code}"),
            Some(code) => format!("exit {code}: {err}"),
            None => format!("killed by a signal: {err}"),
        }))
    }
}

fn podman_info(program: &Path) -> Result<PodmanInfo, String> {
    let out = run_bounded(
        Command::new(program).args(["info", "--format", "json"]),
        None,
        PODMAN_INFO_TIMEOUT,
    )
    .map_err(|e| e.to_string())?;
    let json: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("its output is not JSON: {e}"))?;
    Ok(PodmanInfo::from_json(&json))
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
}

/// The user's login name, or the numeric uid when it has none.
fn user_name() -> String {
    let uid = rustix::process::getuid().as_raw();
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 4096];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes into `pwd` and `buf`, both owned here and large enough for
    // the length passed; `result` is null or points at `pwd`.
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc == 0 && !result.is_null() && !pwd.pw_name.is_null() {
        // SAFETY: pw_name points into `buf`, NUL-terminated by getpwuid_r.
        let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
        if let Ok(name) = name.to_str() {
            return name.to_string();
        }
    }
    uid.to_string()
}

fn rootless_facts() -> RootlessFacts {
    let name = user_name();
    let uid = rustix::process::getuid().as_raw();
    let gid = rustix::process::getgid().as_raw();
    let ids = |file: &str, id: u32| {
        std::fs::read_to_string(file)
            .map(|text| subordinate_ids(&text, &name, id))
            .map_err(|e| e.to_string())
    };
    let mapper = |name: &str| {
        let fallbacks = [format!("/usr/bin/{name}"), format!("/usr/sbin/{name}")];
        let fallbacks: Vec<&str> = fallbacks.iter().map(String::as_str).collect();
        match find_program(name, &fallbacks) {
            None => IdMapper::Missing,
            Some(path) => {
                let setuid_root =
                    std::fs::metadata(&path).is_ok_and(|m| m.uid() == 0 && m.mode() & 0o4000 != 0);
                let file_caps = has_file_caps(&path);
                IdMapper::Found {
                    path,
                    setuid_root,
                    file_caps,
                }
            }
        }
    };
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map(drop)
        .map_err(|e| e.to_string());
    RootlessFacts {
        subuid: ids("/etc/subuid", uid),
        subgid: ids("/etc/subgid", gid),
        newuidmap: mapper("newuidmap"),
        newgidmap: mapper("newgidmap"),
        tun,
        slirp4netns: find_program("slirp4netns", &["/usr/bin/slirp4netns"]),
        pasta: find_program("pasta", &["/usr/bin/pasta"]),
    }
}

/// Whether `path` carries file capabilities (the `security.capability` attribute).
fn has_file_caps(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: both strings are NUL-terminated; a null buffer of size 0 only asks the size.
    let size = unsafe {
        libc::getxattr(
            c_path.as_ptr(),
            c"security.capability".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    size > 0
}

fn hook_facts(inputs: &Inputs, root: bool) -> HookFacts {
    // Without a config directory there is no user hooks dir to find; a path that cannot
    // exist keeps `find_installed` looking at the system directories only.
    let user_dir = inputs
        .user_hooks_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/nonexistent/terok-shield/hooks.d"));
    let this_binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.canonicalize().ok());
    let installed = find_installed(&user_dir, &inputs.user_conf).map(|found| {
        let dir = found.dir().to_path_buf();
        let calls = descriptor_binary(&dir);
        let calls_executable = calls.as_deref().is_some_and(is_executable);
        let calls_this_binary = match (&calls, &this_binary) {
            (Some(calls), Some(me)) => calls.canonicalize().is_ok_and(|c| &c == me),
            _ => false,
        };
        InstalledHooks {
            system: matches!(found, Installed::System(_)),
            dir,
            calls,
            calls_executable,
            calls_this_binary,
        }
    });
    let containers_conf_env = std::env::var_os("CONTAINERS_CONF")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let confs: Vec<PathBuf> = match &containers_conf_env {
        Some(env) => vec![env.clone()],
        None => (!root)
            .then(|| inputs.user_conf.clone())
            .into_iter()
            .chain(SYSTEM_CONTAINERS_CONFS.iter().map(PathBuf::from))
            .collect(),
    };
    HookFacts {
        installed,
        planned_dir: if root {
            PathBuf::from(SYSTEM_INSTALL_DIR)
        } else {
            user_dir
        },
        user_conf: inputs.user_conf.clone(),
        containers_conf_env,
        hooks_dir: deciding_hooks_dir(&confs),
        default_dirs: SYSTEM_HOOK_DIRS.iter().map(PathBuf::from).collect(),
    }
}

/// The first of `confs` that sets `hooks_dir` (or cannot be read or parsed).
fn deciding_hooks_dir(confs: &[PathBuf]) -> Option<(PathBuf, Result<Vec<String>, String>)> {
    for conf in confs {
        let text = match std::fs::read_to_string(conf) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Some((conf.clone(), Err(e.to_string()))),
        };
        match hooks_dir_of(&text) {
            Ok(None) => continue,
            Ok(Some(dirs)) => return Some((conf.clone(), Ok(dirs))),
            Err(e) => return Some((conf.clone(), Err(e))),
        }
    }
    None
}

/// Load `script` with `nft -f -` in a fresh user and network namespace, created in the
/// forked child (so this process never changes namespace) and gone when nft exits. Mapping
/// only the caller's own ids needs no privilege, exactly like podman's rootless namespace
/// as far as nf_tables is concerned: the kernel must accept netlink requests from a
/// namespace's root that is not the host's.
pub fn probe_user_namespace(nft: &Path, script: &str) -> NamespaceProbe {
    let uid = rustix::process::getuid().as_raw();
    let gid = rustix::process::getgid().as_raw();
    // Everything the child writes is prepared here: after fork only syscalls are allowed.
    let maps = IdMaps {
        setgroups: c"/proc/self/setgroups",
        uid_map: c"/proc/self/uid_map",
        gid_map: c"/proc/self/gid_map",
        uid_line: format!("0 {uid} 1\n").into_bytes(),
        gid_line: format!("0 {gid} 1\n").into_bytes(),
    };
    let mut cmd = Command::new(nft);
    cmd.args(["-f", "-"])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    // SAFETY: the closure makes only unshare/open/write/close syscalls on data prepared
    // before the fork; it allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(move || maps.enter_fresh_namespaces());
    }
    match run_bounded(&mut cmd, Some(script.as_bytes()), PROBE_TIMEOUT) {
        Ok(_) => NamespaceProbe::Works,
        // nft itself was started moments ago for its version, so a start failure here is
        // the namespace set-up (only its errno crosses the fork).
        Err(RunError::Spawn(e)) => NamespaceProbe::NoNamespace(e.to_string()),
        Err(RunError::Exit(why)) => NamespaceProbe::NftablesRefused(why),
        Err(e @ RunError::Wait(_)) => NamespaceProbe::NotRun(e.to_string()),
    }
}

struct IdMaps {
    setgroups: &'static std::ffi::CStr,
    uid_map: &'static std::ffi::CStr,
    gid_map: &'static std::ffi::CStr,
    uid_line: Vec<u8>,
    gid_line: Vec<u8>,
}

impl IdMaps {
    /// In the forked child: new user and network namespaces, the caller's ids mapped to root
    /// in them (so exec keeps the namespace's capabilities). Async-signal-safe.
    fn enter_fresh_namespaces(&self) -> std::io::Result<()> {
        // SAFETY: plain syscalls with valid pointers and lengths.
        unsafe {
            if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            for (file, data) in [
                (self.setgroups, &b"deny"[..]),
                (self.uid_map, &self.uid_line[..]),
                (self.gid_map, &self.gid_line[..]),
            ] {
                let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, data.as_ptr().cast(), data.len());
                libc::close(fd);
                if written != data.len() as isize {
                    return Err(std::io::Error::last_os_error());
                }
            }
        }
        Ok(())
    }
}
