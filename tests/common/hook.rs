//! Driving `terok-shield hook` the way a runtime does, for the suites that run the hook on
//! namespaces of their own (hook_direct, pasta): a bundle prepared as an unprivileged user,
//! the OCI state on stdin, an empty environment.
//!
//! Included by path (`#[path = "common/hook.rs"]`), so a suite takes only this file.

#![allow(dead_code)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_terok-shield");

/// The unprivileged user `prepare` runs as.
const NOBODY: u32 = 65534;

/// A bundle prepared in a private directory: `ROOT/state/containers/NAME`.
pub struct Prepared {
    pub root: PathBuf,
    pub name: String,
    pub dir: PathBuf,
    pub instance: String,
}

/// `terok-shield prepare NAME --profiles p` with `profile` as `p.txt` and `config` as
/// config.yml. It runs as `nobody`, with a home and state of its own inside the test's
/// directory: as root it would install the OCI hooks system-wide, and these tests must leave
/// the machine as they found it. The hook itself then runs as root, as a rootful runtime
/// would call it.
pub fn prepare_as_nobody(name: &str, tag: &str, config: &str, profile: &str) -> Prepared {
    let root = std::env::temp_dir().join(format!("ts-{name}-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let profiles = root.join("config/profiles");
    for dir in [&profiles, &root.join("home"), &root.join("state")] {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(root.join("config/config.yml"), config).unwrap();
    std::fs::write(profiles.join("p.txt"), profile).unwrap();
    // A copy nobody can run, made by a child process: a write descriptor held by this
    // (multi-threaded) process would be inherited by another test's fork and make executing
    // the copy fail (ETXTBSY).
    let bin = root.join("terok-shield");
    let copied = Command::new("install")
        .args(["-m", "0755", BIN])
        .arg(&bin)
        .status()
        .unwrap();
    assert!(copied.success(), "install {BIN}");
    for path in [&root, &profiles] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for owned in ["home", "config", "state"] {
        std::os::unix::fs::chown(root.join(owned), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&bin)
        .args(["prepare", name, "--profiles", "p", "--json"])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", root.join("home"))
        .env("TEROK_SHIELD_CONFIG_DIR", root.join("config"))
        .env("TEROK_SHIELD_STATE_DIR", root.join("state"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "prepare: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let flags: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    let instance = flags
        .iter()
        .find_map(|f| f.strip_prefix("--annotation=terok.shield.instance="))
        .unwrap()
        .to_string();
    Prepared {
        dir: root.join(format!("state/containers/{name}")),
        name: name.to_string(),
        root,
        instance,
    }
}

impl Prepared {
    /// The OCI state a runtime hands the hook: this bundle's annotations with `instance`,
    /// `pid` (None after the container stopped) and the OCI bundle directory.
    pub fn state(&self, instance: &str, pid: Option<u32>, oci_bundle: &Path) -> String {
        serde_json::json!({
            "ociVersion": "1.0.2", "id": self.name,
            "status": if pid.is_some() { "creating" } else { "stopped" },
            "pid": pid, "bundle": oci_bundle,
            "annotations": {
                "terok.shield.name": self.name,
                "terok.shield.state_dir": self.dir,
                "terok.shield.version": env!("CARGO_PKG_VERSION"),
                "terok.shield.instance": instance,
            }
        })
        .to_string()
    }

    /// Run the poststop hook, as the runtime does when the container stops: it stops the
    /// resolver or event reader the createRuntime hook started.
    pub fn poststop(&self) {
        let _ = run_hook(
            "poststop",
            &self.state(&self.instance, None, Path::new("/nonexistent")),
        );
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if self.dir.join("runtime.json").exists() {
            self.poststop();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// Run `hook STAGE` with an empty environment and `stdin`; (success, stderr, elapsed).
pub fn run_hook(stage: &str, stdin: &str) -> (bool, String, Duration) {
    let start = Instant::now();
    let mut child = Command::new(BIN)
        .args(["hook", stage])
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The hook may refuse before reading it all; its verdict is the exit status.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        start.elapsed(),
    )
}
