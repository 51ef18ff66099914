//! Harness for the end-to-end tests: real `terok-shield run`, real rootless Podman as an
//! unprivileged user, real slirp4netns, and a fake internet in a network namespace.
//!
//! Each test takes [`E2e::start`], which serialises the tests (one lock within the process,
//! and [`MACHINE_LOCK`] across test binaries and checkouts on the machine), builds a
//! fresh world (see [`world`]), installs the freshly built binary where the test user can run
//! it, and writes the test user's `config.yml`. Dropping it removes the test's containers,
//! restores every user file it changed, and tears the world down.
//!
//! The environment comes from `scripts/podman-env.sh`. Without it (not root, no podman, no
//! test user or image) the tests print a skip line, except with `CI=true`, where they fail.

#![allow(dead_code)]

pub use super::cmd;
pub mod world;

/// `let h = e2e!();`: the harness, or return from the test when the environment is missing
/// (a skip outside CI; with `CI=true`, `E2e::start` fails the test instead).
#[allow(unused_macros)] // test binaries of the netns bed do not start podman
macro_rules! e2e {
    () => {
        match $crate::common::e2e::E2e::start() {
            Some(h) => h,
            None => return,
        }
    };
}

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use serde_json::Value;

use cmd::{run_bounded, Out};
use world::World;

/// The unprivileged user that runs podman (created by scripts/podman-env.sh).
pub const USER: &str = "shieldtest";
/// The offline busybox image (imported by scripts/podman-env.sh).
pub const IMAGE: &str = "localhost/shield-test:latest";
/// World-readable place for the binary under test (the build tree may not be readable).
pub const BIN_DIR: &str = "/tmp/terok-shield-e2e/bin";
/// The word every test workload prints first: seeing it means the workload ran.
pub const RAN: &str = "WORKLOAD-RAN";
/// A refusal must come back at once: 0.3 s, in the container's /proc/uptime centiseconds.
/// (An ICMP reject makes a blocking connect wait ~1 s, a TCP reset fails in a few ms.)
pub const FAST_CS: u32 = 30;

/// Bounds for commands.
pub const SHORT: Duration = Duration::from_secs(60);
pub const LONG: Duration = Duration::from_secs(120);

/// Name of the createRuntime descriptor in a bundle's hooks dir.
pub const CREATE_RUNTIME_JSON: &str = "terok-shield-createRuntime.json";

static LOCK: Mutex<()> = Mutex::new(());

/// Lock file shared by every e2e test binary (e2e_podman, e2e_live, and other checkouts):
/// they all build the same world namespace, veth and routes, so only one may run at a time.
pub const MACHINE_LOCK: &str = "/run/terok-shield-e2e.lock";
/// How long a test waits for another e2e run on this machine to finish.
const MACHINE_LOCK_WAIT: Duration = Duration::from_secs(30 * 60);

/// Take the machine-wide e2e lock (held until the returned file is dropped).
fn machine_lock() -> fs::File {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(MACHINE_LOCK)
        .unwrap_or_else(|e| panic!("open {MACHINE_LOCK}: {e}"));
    let started = std::time::Instant::now();
    let mut told = false;
    loop {
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return file,
            Err(e) if e == rustix::io::Errno::WOULDBLOCK || e == rustix::io::Errno::INTR => {}
            Err(e) => panic!("lock {MACHINE_LOCK}: {e}"),
        }
        assert!(
            started.elapsed() < MACHINE_LOCK_WAIT,
            "another e2e run held {MACHINE_LOCK} for {MACHINE_LOCK_WAIT:?}; is one stuck?"
        );
        if !told {
            eprintln!("e2e: waiting for another e2e run on this machine ({MACHINE_LOCK})");
            told = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The test user's identity and home.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl TestUser {
    pub fn runtime_dir(&self) -> String {
        format!("/run/user/{}", self.uid)
    }
    pub fn config_dir(&self) -> PathBuf {
        self.home.join(".config/terok/shield")
    }
    pub fn profiles_dir(&self) -> PathBuf {
        self.config_dir().join("profiles")
    }
    pub fn containers_dir(&self) -> PathBuf {
        self.home.join(".local/state/terok/shield/containers")
    }
    pub fn containers_conf(&self) -> PathBuf {
        self.home.join(".config/containers/containers.conf")
    }
    pub fn user_hooks_dir(&self) -> PathBuf {
        self.config_dir().join("hooks.d")
    }
}

fn lookup_user(name: &str) -> Option<TestUser> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 7 || f[0] != name {
            return None;
        }
        Some(TestUser {
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: PathBuf::from(f[5]),
        })
    })
}

/// Run `program args` as the test user with a clean environment plus `env`.
pub fn as_user(
    user: &TestUser,
    env: &[(&str, &str)],
    program: &str,
    args: &[&str],
    limit: Duration,
) -> Out {
    let mut full: Vec<String> = vec![
        "-u".into(),
        USER.into(),
        "--".into(),
        "env".into(),
        "-i".into(),
    ];
    full.push(format!("HOME={}", user.home.display()));
    full.push(format!("XDG_RUNTIME_DIR={}", user.runtime_dir()));
    full.push("PATH=/usr/sbin:/usr/bin:/sbin:/bin".into());
    full.push("LANG=C.UTF-8".into());
    for (k, v) in env {
        full.push(format!("{k}={v}"));
    }
    full.push(program.into());
    full.extend(args.iter().map(|s| s.to_string()));
    run_bounded("runuser", &full, limit)
}

/// Whether the e2e environment is there; `Err` lists what is missing.
fn environment() -> &'static Result<TestUser, String> {
    static VERDICT: OnceLock<Result<TestUser, String>> = OnceLock::new();
    VERDICT.get_or_init(|| {
        let mut missing = Vec::new();
        if !rustix::process::geteuid().is_root() {
            missing.push("root".to_string());
        }
        for tool in ["podman", "runuser", "ip", "nft"] {
            let found = ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
                .iter()
                .any(|d| Path::new(d).join(tool).is_file());
            if !found {
                missing.push(format!("the `{tool}` command"));
            }
        }
        for dir in ["/etc/containers/oci/hooks.d", "/usr/share/containers/oci/hooks.d"] {
            if Path::new(dir).join(CREATE_RUNTIME_JSON).exists() {
                missing.push(format!(
                    "a host without system-wide terok-shield hooks (found {dir}/{CREATE_RUNTIME_JSON}; the tests start from a user without hooks, as a new user would)"
                ));
            }
        }
        let user = lookup_user(USER);
        if user.is_none() {
            missing.push(format!("the user {USER} (scripts/podman-env.sh creates it)"));
        }
        if let (true, Some(user)) = (missing.is_empty(), &user) {
            match cmd::run(
                "runuser",
                &[
                    "-u", USER, "--", "env", "-i",
                    &format!("HOME={}", user.home.display()),
                    &format!("XDG_RUNTIME_DIR={}", user.runtime_dir()),
                    "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                    "podman", "image", "exists", IMAGE,
                ],
                SHORT,
            ) {
                Ok(out) if out.ok() => {}
                Ok(out) => missing.push(format!(
                    "the image {IMAGE} for {USER} (scripts/podman-env.sh imports it; podman said: {})",
                    out.stderr.trim()
                )),
                Err(e) => missing.push(format!("a working podman for {USER}: {e}")),
            }
        }
        match (missing.is_empty(), user) {
            (true, Some(user)) => Ok(user),
            _ => Err(missing.join(", ")),
        }
    })
}

/// Copy the binary under test (and helper scripts) where the test user can run them.
/// Done at every test start (under the machine lock): another test binary, or another
/// checkout, may have installed its own build there since.
fn install_binaries() -> PathBuf {
    {
        let dir = Path::new(BIN_DIR);
        fs::create_dir_all(dir).expect("create e2e bin dir");
        for d in [dir.parent().unwrap(), dir] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).expect("chmod e2e dir");
        }
        let bin = dir.join("terok-shield");
        let tmp = dir.join(format!(".terok-shield.{}", std::process::id()));
        fs::copy(env!("CARGO_BIN_EXE_terok-shield"), &tmp).expect("copy terok-shield");
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).expect("chmod terok-shield");
        fs::rename(&tmp, &bin).expect("install terok-shield");
        // An nft that works but lies in `-j list`: the output chain's policy reads `accept`.
        write_exec(
            &dir.join("nft-flip-policy"),
            "#!/bin/sh\n\
             # e2e helper: real nft, except that JSON listings claim chain policy accept.\n\
             PATH=/usr/sbin:/usr/bin:/sbin:/bin\n\
             if [ \"$1\" = \"-j\" ]; then\n\
             \x20 out=$(nft \"$@\") || exit $?\n\
             \x20 printf '%s\\n' \"$out\" | sed 's/\"policy\": *\"drop\"/\"policy\": \"accept\"/g'\n\
             else\n\
             \x20 exec nft \"$@\"\n\
             fi\n",
        );
        bin
    }
}

fn write_exec(path: &Path, text: &str) {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// The config.yml every test runs with: no lookups ever leave the fake internet.
pub const CONFIG_YML: &str = "# written by tests/e2e_podman.rs (restored afterwards)\n\
default_profiles: [e2e-basic]\n\
audit:\n  enabled: true\n\
upstream_dns: 198.51.100.53\n";

/// The profile most tests use.
pub const BASIC_PROFILE: &str = "# e2e: one IPv4 host, one IPv6 host, a port-scoped network\n\
198.51.100.10\n\
2001:db8::10\n\
198.18.0.0/16:443/tcp\n";

/// A file the test changed, and what it held before.
struct Saved {
    path: PathBuf,
    before: Option<(Vec<u8>, std::fs::Metadata)>,
}

/// One test's access to the e2e environment.
pub struct E2e {
    pub user: TestUser,
    pub bin: PathBuf,
    names: Vec<String>,
    saved: Vec<Saved>,
    remove_dirs: Vec<PathBuf>,
    // Dropped after the containers and files: the world, then the locks.
    pub world: World,
    _lock: MutexGuard<'static, ()>,
    _machine_lock: fs::File,
}

impl E2e {
    /// The environment for one test, or None (skip) when it is missing outside CI.
    pub fn start() -> Option<E2e> {
        let user = match environment() {
            Ok(user) => user.clone(),
            Err(missing) => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "e2e tests cannot run in CI: missing {missing}; run scripts/podman-env.sh as root first"
                );
                eprintln!("SKIP e2e test: needs {missing} (run scripts/podman-env.sh as root; CI=true makes this fatal)");
                return None;
            }
        };
        let lock = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let machine_lock = machine_lock();
        let bin = install_binaries();
        let world = World::up();
        let mut e2e = E2e {
            user,
            bin,
            names: Vec::new(),
            saved: Vec::new(),
            remove_dirs: Vec::new(),
            world,
            _lock: lock,
            _machine_lock: machine_lock,
        };
        for dir in [
            e2e.user.home.join(".config"),
            e2e.user.home.join(".config/terok"),
            e2e.user.config_dir(),
            e2e.user.profiles_dir(),
        ] {
            e2e.mkdir_owned(&dir);
        }
        // Every test starts as a new user would: no OCI hooks and no `hooks_dir` in
        // containers.conf (the first `run` or `prepare` installs them). What the test changes
        // there is undone at the end; a killed run's leftovers are removed here.
        let hooks = e2e.user.user_hooks_dir();
        if hooks.exists() {
            eprintln!("e2e: removing leftover {}", hooks.display());
            let _ = fs::remove_dir_all(&hooks);
        }
        e2e.drop_leftover_hooks_dir_setting(&hooks);
        let containers_conf = e2e.user.containers_conf();
        e2e.save(&containers_conf);
        e2e.remove_dirs.push(hooks);
        let conf = e2e.user.config_dir().join("config.yml");
        e2e.write_user_file(&conf, CONFIG_YML);
        e2e.profile("e2e-basic", BASIC_PROFILE);
        Some(e2e)
    }

    /// Remove a `hooks_dir` that lists `hooks` from the user's containers.conf (left there by
    /// a `setup --user` test that was killed before it could restore the file).
    fn drop_leftover_hooks_dir_setting(&self, hooks: &Path) {
        let conf = self.user.containers_conf();
        let Ok(text) = fs::read_to_string(&conf) else {
            return;
        };
        let Ok(mut doc) = text.parse::<toml_edit::DocumentMut>() else {
            return;
        };
        let ours = hooks.display().to_string();
        let listed = doc
            .get("engine")
            .and_then(|e| e.get("hooks_dir"))
            .and_then(|h| h.as_array())
            .is_some_and(|a| a.iter().any(|v| v.as_str() == Some(&ours)));
        if listed {
            if let Some(engine) = doc.get_mut("engine").and_then(|e| e.as_table_mut()) {
                engine.remove("hooks_dir");
            }
            eprintln!("e2e: removing a leftover hooks_dir from {}", conf.display());
            fs::write(&conf, doc.to_string())
                .unwrap_or_else(|e| panic!("write {}: {e}", conf.display()));
        }
    }

    /// A container name for this test (`e2e-TAG`), with any leftover container and bundle of
    /// that name removed first.
    pub fn name(&mut self, tag: &str) -> String {
        let name = format!("e2e-{tag}");
        self.podman(&["rm", "-f", "-t", "0", &name]);
        let dir = self.bundle_dir(&name);
        if dir.exists() {
            fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("remove {}: {e}", dir.display()));
        }
        self.names.push(name.clone());
        name
    }

    /// `terok-shield ARGS` as the test user.
    pub fn shield(&self, args: &[&str]) -> Out {
        self.shield_env(&[], args)
    }

    /// `terok-shield ARGS` as the test user, with extra environment.
    pub fn shield_env(&self, env: &[(&str, &str)], args: &[&str]) -> Out {
        as_user(&self.user, env, &self.bin.display().to_string(), args, LONG)
    }

    /// `podman ARGS` as the test user.
    pub fn podman(&self, args: &[&str]) -> Out {
        as_user(&self.user, &[], "podman", args, LONG)
    }

    /// Whether podman knows a container of that name.
    pub fn container_exists(&self, name: &str) -> bool {
        self.podman(&["container", "exists", name]).ok()
    }

    /// `podman inspect` State.Status (`running`, `exited`, `created`...), None if unknown.
    pub fn container_state(&self, name: &str) -> Option<String> {
        let out = self.podman(&["inspect", "--format", "{{.State.Status}}", name]);
        out.ok().then(|| out.stdout.trim().to_string())
    }

    /// The state bundle of `name`.
    pub fn bundle_dir(&self, name: &str) -> PathBuf {
        self.user.containers_dir().join(name)
    }

    /// Write a user profile `NAME.txt` (removed again when the test ends).
    pub fn profile(&mut self, name: &str, text: &str) -> PathBuf {
        let path = self.user.profiles_dir().join(format!("{name}.txt"));
        self.write_user_file(&path, text);
        path
    }

    /// Use `yaml` as the test user's config.yml for this test (restored at the end).
    pub fn set_config(&mut self, yaml: &str) {
        let conf = self.user.config_dir().join("config.yml");
        self.write_user_file(&conf, yaml);
    }

    /// Write a file owned by the test user; its previous content comes back at the end.
    pub fn write_user_file(&mut self, path: &Path, text: &str) {
        self.save(path);
        fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        self.chown(path);
    }

    /// Remember `path` as it is now, to restore it when the test ends.
    pub fn save(&mut self, path: &Path) {
        if self.saved.iter().any(|s| s.path == path) {
            return;
        }
        let before = fs::read(path)
            .ok()
            .map(|b| (b, fs::metadata(path).unwrap()));
        self.saved.push(Saved {
            path: path.to_path_buf(),
            before,
        });
    }

    /// Remove `dir` when the test ends unless it exists now.
    pub fn remove_at_end_unless_present(&mut self, dir: &Path) {
        if !dir.exists() {
            self.remove_dirs.push(dir.to_path_buf());
        }
    }

    fn chown(&self, path: &Path) {
        std::os::unix::fs::chown(path, Some(self.user.uid), Some(self.user.gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }

    fn mkdir_owned(&self, dir: &Path) {
        if !dir.exists() {
            fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
            self.chown(dir);
        }
    }

    /// Audit records of `name`, read through `terok-shield logs --container NAME --json`.
    pub fn audit(&self, name: &str) -> Vec<Value> {
        let out = self
            .shield(&["logs", "--container", name, "-n", "100000", "--json"])
            .expect_ok();
        match serde_json::from_str(&out.stdout) {
            Ok(Value::Array(records)) => records,
            other => panic!("`logs --json` did not print a JSON array: {other:?}\n{out}"),
        }
    }

    /// Audit records of `name` with the given event.
    pub fn events(&self, name: &str, event: &str) -> Vec<Value> {
        self.audit(name)
            .into_iter()
            .filter(|r| r["event"] == event)
            .collect()
    }

    /// `terok-shield prepare NAME --json` flags for `profiles`.
    pub fn prepare(&self, name: &str, profiles: &str) -> Vec<String> {
        let out = self
            .shield(&["prepare", name, "--profiles", profiles, "--json"])
            .expect_ok();
        serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| {
            panic!("prepare --json is not a JSON array of strings ({e}): {out}")
        })
    }

    /// `podman run FLAGS ARGS...` with the flags of a prepared container.
    pub fn podman_run_prepared(&self, flags: &[String], args: &[&str]) -> Out {
        let mut full: Vec<&str> = vec!["run"];
        full.extend(flags.iter().map(String::as_str));
        full.extend_from_slice(args);
        self.podman(&full)
    }

    /// Give the createRuntime hook this environment from now on (podman does not pass its
    /// own environment to OCI hooks; the descriptor's `env` is the only way in). Edits the
    /// user's descriptor, which `run`/`prepare` installed and the test's end removes.
    pub fn set_hook_env(&self, env: &[&str]) {
        let path = self.user.user_hooks_dir().join(CREATE_RUNTIME_JSON);
        let text = fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "read {} (the first `run` or `prepare` installs it): {e}",
                path.display()
            )
        });
        let mut desc: Value = serde_json::from_str(&text).unwrap();
        desc["hook"]["env"] = Value::from(env.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        fs::write(&path, serde_json::to_string_pretty(&desc).unwrap()).unwrap();
    }

    /// Read a file as root (state files are the user's, mode 0600).
    pub fn read(&self, path: &Path) -> String {
        fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    /// `terok-shield run NAME --profiles P -- PODMAN_ARGS...`.
    pub fn run_with(&self, name: &str, profiles: &str, podman_args: &[&str]) -> Out {
        let mut args = vec!["run", name, "--profiles", profiles, "--"];
        args.extend_from_slice(podman_args);
        self.shield(&args)
    }

    /// `terok-shield run NAME --profiles P -- -d IMAGE sleep 600`: a detached shielded
    /// container (bounded: it ends by itself after 10 minutes).
    pub fn run_detached(&self, name: &str, profiles: &str) -> Out {
        self.run_with(name, profiles, &["-d", IMAGE, "sleep", "600"])
    }

    /// `terok-shield run NAME --profiles P -- --rm IMAGE sh -c SCRIPT`.
    pub fn run_script(&self, name: &str, profiles: &str, script: &str) -> Out {
        self.run_with(name, profiles, &["--rm", IMAGE, "sh", "-c", script])
    }

    /// `podman exec NAME sh -c SCRIPT`.
    pub fn exec(&self, name: &str, script: &str) -> Out {
        self.podman(&["exec", name, "sh", "-c", script])
    }

    /// The `State:` line of `terok-shield status NAME`.
    #[track_caller]
    pub fn shield_state(&self, name: &str) -> String {
        state_line(&self.shield(&["status", name]), name)
    }

    /// The state bundle (`state.json`) of `name`, parsed.
    #[track_caller]
    pub fn state_json(&self, name: &str) -> Value {
        let path = self.bundle_dir(name).join("state.json");
        let text = self.read(&path);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON ({e}): {text}", path.display()))
    }

    /// `terok-shield rules NAME --json`, parsed.
    #[track_caller]
    pub fn rules_json(&self, name: &str) -> Value {
        let out = self.shield(&["rules", name, "--json"]).expect_ok();
        serde_json::from_str(out.stdout.trim())
            .unwrap_or_else(|e| panic!("`rules --json` is not JSON ({e}): {out}"))
    }
}

/// The elements of the named set in an `nft -j list table` document (as nft prints them:
/// addresses as strings, networks as `{"prefix": ...}` objects, concatenations as `{"concat":
/// ...}`, elements with a timeout wrapped in `{"elem": {"val": ...}}`), rendered as compact
/// JSON text for single values, sorted.
pub fn set_elements(table: &Value, set: &str) -> Vec<String> {
    let items = table["nftables"].as_array().cloned().unwrap_or_default();
    let found = items
        .iter()
        .find(|i| i["set"]["name"] == set)
        .unwrap_or_else(|| panic!("no set {set} in the table: {table}"));
    let mut out: Vec<String> = found["set"]["elem"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| {
            if e["elem"].is_object() {
                &e["elem"]["val"]
            } else {
                e
            }
        })
        .map(|e| match e {
            Value::String(s) => s.clone(),
            Value::Object(o) if o.contains_key("prefix") => format!(
                "{}/{}",
                o["prefix"]["addr"].as_str().unwrap_or("?"),
                o["prefix"]["len"]
            ),
            other => other.to_string(),
        })
        .collect();
    out.sort();
    out
}

impl Drop for E2e {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        for name in &self.names {
            let _ = cmd::run(
                "runuser",
                &[
                    "-u",
                    USER,
                    "--",
                    "env",
                    "-i",
                    &format!("HOME={}", self.user.home.display()),
                    &format!("XDG_RUNTIME_DIR={}", self.user.runtime_dir()),
                    "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                    "podman",
                    "rm",
                    "-f",
                    "-t",
                    "0",
                    name,
                ],
                SHORT,
            );
            let dir = self.user.containers_dir().join(name);
            if failed {
                eprintln!("e2e: kept {} for inspection", dir.display());
            } else {
                let _ = fs::remove_dir_all(&dir);
            }
        }
        for saved in self.saved.iter().rev() {
            match &saved.before {
                Some((bytes, meta)) => {
                    let _ = fs::write(&saved.path, bytes);
                    let _ = fs::set_permissions(&saved.path, meta.permissions());
                    let _ = std::os::unix::fs::chown(
                        &saved.path,
                        Some(std::os::unix::fs::MetadataExt::uid(meta)),
                        Some(std::os::unix::fs::MetadataExt::gid(meta)),
                    );
                }
                None => {
                    let _ = fs::remove_file(&saved.path);
                }
            }
        }
        for dir in &self.remove_dirs {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// One connection attempt made inside a container.
#[derive(Debug, Clone)]
pub struct Probe {
    pub host: String,
    pub port: u16,
    pub rc: i32,
    /// Duration in centiseconds (container's /proc/uptime).
    pub cs: u32,
    pub text: String,
}

/// A workload script: print [`RAN`], then try each `host:port` with busybox `nc`, timing it
/// with /proc/uptime (busybox `date` has no `%N`). Each attempt is bounded by `timeout 5`.
pub fn probe_script(targets: &[(&str, u16)]) -> String {
    let mut s = String::from(
        "t() { read u _ </proc/uptime; echo ${u/./}; }\n\
         p() { a=$(t); o=$(timeout 5 nc \"$1\" \"$2\" </dev/null 2>&1); r=$?; b=$(t); echo \"PROBE $1 $2 rc=$r cs=$((b-a)) $(echo $o)\"; }\n",
    );
    s.push_str(&format!("echo {RAN}\n"));
    if targets.iter().any(|(host, _)| host.contains(':')) {
        // slirp4netns announces IPv6 by router advertisement: wait (at most 3 s) for it.
        s.push_str(
            "i=0; while [ $i -lt 30 ] && ! ip -6 route | grep -q '^default'; do sleep 0.1; i=$((i+1)); done\n",
        );
    }
    for (host, port) in targets {
        s.push_str(&format!("p {host} {port}\n"));
    }
    s
}

/// The probes a workload printed.
pub fn parse_probes(stdout: &str) -> Vec<Probe> {
    stdout
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("PROBE ")?;
            let mut words = rest.splitn(5, ' ');
            let host = words.next()?.to_string();
            let port = words.next()?.parse().ok()?;
            let rc = words.next()?.strip_prefix("rc=")?.parse().ok()?;
            let cs = words.next()?.strip_prefix("cs=")?.parse().ok()?;
            let text = words.next().unwrap_or("").to_string();
            Some(Probe {
                host,
                port,
                rc,
                cs,
                text,
            })
        })
        .collect()
}

/// Checks on the probes of one workload run.
pub struct Probes<'a> {
    pub all: Vec<Probe>,
    pub out: &'a Out,
    pub world: &'a World,
    /// World hits before the workload ran (see [`World::mark`]).
    pub since: usize,
}

impl<'a> Probes<'a> {
    /// The probes in `out`; `since` is [`World::mark`] taken before the workload started.
    #[track_caller]
    pub fn of(out: &'a Out, world: &'a World, since: usize) -> Probes<'a> {
        assert!(out.stdout.contains(RAN), "the workload did not run: {out}");
        Probes {
            all: parse_probes(&out.stdout),
            out,
            world,
            since,
        }
    }

    #[track_caller]
    fn get(&self, host: &str, port: u16) -> &Probe {
        self.all
            .iter()
            .find(|p| p.host == host && p.port == port)
            .unwrap_or_else(|| panic!("no probe of {host} {port} in the output: {}", self.out))
    }

    /// The world's server on `host:port` answered with its own banner.
    #[track_caller]
    pub fn reached(&self, host: &str, port: u16) {
        let p = self.get(host, port);
        let want = world::banner(host.parse().unwrap(), port);
        assert!(
            p.rc == 0 && p.text.contains(want.trim()),
            "{host} port {port}: expected the banner {:?}, got {p:?}\n{}",
            want.trim(),
            self.out
        );
        assert!(
            self.world.saw_since(self.since, host, port),
            "{host} port {port}: banner printed but the world has no record of it"
        );
    }

    /// `host:port` was refused at once (connection refused in under [`FAST_CS`]) and never
    /// reached the world.
    #[track_caller]
    pub fn refused_fast(&self, host: &str, port: u16) {
        let p = self.get(host, port);
        assert!(
            p.rc != 0 && p.text.contains("refused"),
            "{host} port {port}: expected `Connection refused`, got {p:?}\n{}",
            self.out
        );
        assert!(
            p.cs <= FAST_CS,
            "{host} port {port}: refused, but only after {} ms (limit {} ms): {p:?}",
            p.cs * 10,
            FAST_CS * 10
        );
        assert!(
            !self.world.saw_since(self.since, host, port),
            "{host} port {port}: refused in the container, yet the world accepted a connection"
        );
    }
}

/// TCP banner servers on the host's 127.0.0.1 (for `loopback_ports`), stopped on drop.
pub struct LoopbackServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    counts: std::sync::Arc<Mutex<std::collections::HashMap<u16, usize>>>,
    done: std::sync::mpsc::Receiver<()>,
}

impl LoopbackServer {
    pub fn start(ports: &[u16]) -> LoopbackServer {
        use std::io::Write;
        use std::sync::atomic::Ordering;
        let listeners: Vec<std::net::TcpListener> = ports
            .iter()
            .map(|&p| {
                let l = std::net::TcpListener::bind(("127.0.0.1", p))
                    .unwrap_or_else(|e| panic!("bind 127.0.0.1:{p}: {e}"));
                l.set_nonblocking(true).unwrap();
                l
            })
            .collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let counts = std::sync::Arc::new(Mutex::new(std::collections::HashMap::new()));
        let (done_tx, done) = std::sync::mpsc::sync_channel(1);
        let (stop2, counts2) = (stop.clone(), counts.clone());
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            while !stop2.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(600) {
                for l in &listeners {
                    if let Ok((mut s, _)) = l.accept() {
                        let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
                        let _ = s.write_all(format!("terok-e2e-loopback {port}\n").as_bytes());
                        *counts2.lock().unwrap().entry(port).or_insert(0) += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = done_tx.send(());
        });
        LoopbackServer { stop, counts, done }
    }

    /// Connections accepted on `port`.
    pub fn accepted(&self, port: u16) -> usize {
        self.counts.lock().unwrap().get(&port).copied().unwrap_or(0)
    }
}

impl Drop for LoopbackServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.done.recv_timeout(Duration::from_secs(5));
    }
}

/// A config.yml for DNS tests: the world's DNS server as `upstream_dns`, `tier`, and any
/// further `dns:` keys in `extra` (e.g. "  max_ttl: 2\n").
pub fn dns_config(tier: &str, extra: &str) -> String {
    format!(
        "# written by an e2e test (restored afterwards)\nupstream_dns: 198.51.100.53\ndns:\n  tier: {tier}\n{extra}"
    )
}

// --- Rootful podman (tests/e2e_rootful.rs) ------------------------------------------------

/// The bridge network of the rootful tests. Podman's default network (10.88.0.0/16) lies
/// inside the machine's own 10.0.0.0/8, so the tests make their own inside the fake
/// internet's 198.18.0.0/15 (more specific than the world route, so its traffic stays local).
pub const ROOTFUL_NET: &str = "tse2e-rootful";
pub const ROOTFUL_SUBNET: &str = "198.18.200.0/24";
/// The bridge's address on the host: aardvark-dns answers there, the containers' DNS server.
pub const ROOTFUL_GATEWAY: &str = "198.18.200.1";
/// Root's HOME for terok-shield during a rootful test (config, profiles, state), so the
/// tests never touch /root; removed at the end.
pub const ROOTFUL_HOME: &str = "/tmp/terok-shield-e2e/root-home";

/// One rootful test: podman and terok-shield run as root, in a mount namespace whose
/// /etc/resolv.conf names the world's DNS server, so that aardvark-dns (started by the first
/// container on the network, in that mount namespace) forwards into the fake internet and
/// never to the machine's resolver. Drop removes the containers, pods, network, the system
/// hooks that `run` installed, root's test HOME, and restores IPv4 forwarding.
pub struct Rootful {
    pub bin: PathBuf,
    pub home: PathBuf,
    names: Vec<String>,
    pods: Vec<String>,
    ip_forward_before: Option<String>,
    pub world: World,
    _lock: MutexGuard<'static, ()>,
    _machine_lock: fs::File,
}

/// Whether rootful podman can run the test image; `Err` says what is missing.
fn rootful_environment() -> Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err("root".into());
    }
    match cmd::run("podman", &["image", "exists", IMAGE], SHORT) {
        Ok(out) if out.ok() => Ok(()),
        Ok(_) => Err(format!(
            "the image {IMAGE} in root's podman storage (scripts/podman-env.sh loads it)"
        )),
        Err(e) => Err(format!("a working rootful podman: {e}")),
    }
}

impl Rootful {
    /// The rootful environment for one test, or None (skip) outside CI when it is missing.
    pub fn start() -> Option<Rootful> {
        if let Err(missing) = rootful_environment() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "rootful e2e tests cannot run in CI: missing {missing}; run scripts/podman-env.sh as root first"
            );
            eprintln!("SKIP rootful e2e test: needs {missing} (run scripts/podman-env.sh as root; CI=true makes this fatal)");
            return None;
        }
        let lock = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let machine_lock = machine_lock();
        let bin = install_binaries();
        let world = World::up();
        let home = PathBuf::from(ROOTFUL_HOME);
        let r = Rootful {
            bin,
            home,
            names: Vec::new(),
            pods: Vec::new(),
            ip_forward_before: fs::read_to_string("/proc/sys/net/ipv4/ip_forward").ok(),
            world,
            _lock: lock,
            _machine_lock: machine_lock,
        };
        // A crashed rootful run may have left its hooks, network or HOME behind.
        r.remove_system_hooks();
        let _ = r.podman(&["network", "rm", "-f", ROOTFUL_NET]);
        remove_rootful_bridge();
        let _ = fs::remove_dir_all(&r.home);
        fs::create_dir_all(r.profiles_dir()).expect("create root's test HOME");
        fs::write(
            r.home.join("resolv.conf"),
            format!("nameserver {}\n", world::DNS4),
        )
        .expect("write the test resolv.conf");
        r.set_config("# rootful e2e (removed afterwards)\naudit:\n  enabled: true\n");
        r.podman(&[
            "network",
            "create",
            "--subnet",
            ROOTFUL_SUBNET,
            "--gateway",
            ROOTFUL_GATEWAY,
            ROOTFUL_NET,
        ])
        .expect_ok();
        Some(r)
    }

    pub fn config_dir(&self) -> PathBuf {
        self.home.join(".config/terok/shield")
    }
    pub fn profiles_dir(&self) -> PathBuf {
        self.config_dir().join("profiles")
    }
    pub fn bundle_dir(&self, name: &str) -> PathBuf {
        self.home
            .join(".local/state/terok/shield/containers")
            .join(name)
    }

    /// Root's config.yml for this test.
    pub fn set_config(&self, yaml: &str) {
        fs::write(self.config_dir().join("config.yml"), yaml).expect("write config.yml");
    }

    /// A profile `NAME.txt` in root's test HOME.
    pub fn profile(&self, name: &str, text: &str) {
        fs::write(self.profiles_dir().join(format!("{name}.txt")), text).expect("write profile");
    }

    /// A container name (`e2e-root-TAG`), with any leftover of that name removed first.
    pub fn name(&mut self, tag: &str) -> String {
        let name = format!("e2e-root-{tag}");
        let _ = self.podman(&["rm", "-f", "-t", "0", &name]);
        self.names.push(name.clone());
        name
    }

    /// A pod name (`e2e-rootpod-TAG`), with any leftover pod of that name removed first.
    pub fn pod_name(&mut self, tag: &str) -> String {
        let name = format!("e2e-rootpod-{tag}");
        let _ = self.podman(&["pod", "rm", "-f", "-t", "0", &name]);
        self.pods.push(name.clone());
        name
    }

    /// `program ARGS` as root with a clean environment, in a mount namespace whose
    /// /etc/resolv.conf names the world's DNS server.
    fn in_test_mounts(&self, program: &str, args: &[&str]) -> Out {
        let resolv = self.home.join("resolv.conf").display().to_string();
        let home = format!("HOME={}", self.home.display());
        let mut full: Vec<&str> = vec![
            "-i",
            &home,
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG=C.UTF-8",
            "unshare",
            "-m",
            // Keep /run/netns shared with the host (podman's netns mounts must be seen by
            // later podman calls); the root mount is made private so the resolv.conf bind
            // mount stays here, whatever the host's propagation.
            "--propagation",
            "unchanged",
            "--",
            "sh",
            "-c",
            "mount --make-private / && mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"",
            &resolv,
            program,
        ];
        full.extend_from_slice(args);
        run_bounded("env", &full, LONG)
    }

    /// `terok-shield ARGS` as root.
    pub fn shield(&self, args: &[&str]) -> Out {
        self.in_test_mounts(&self.bin.display().to_string(), args)
    }

    /// `podman ARGS` as root.
    pub fn podman(&self, args: &[&str]) -> Out {
        self.in_test_mounts("podman", args)
    }

    /// `podman exec NAME sh -c SCRIPT`.
    pub fn exec(&self, name: &str, script: &str) -> Out {
        self.podman(&["exec", name, "sh", "-c", script])
    }

    /// The `State:` line of `terok-shield status NAME`.
    #[track_caller]
    pub fn shield_state(&self, name: &str) -> String {
        state_line(&self.shield(&["status", name]), name)
    }

    /// The container's address on [`ROOTFUL_NET`].
    #[track_caller]
    pub fn address_of(&self, name: &str) -> String {
        let format =
            format!("{{{{(index .NetworkSettings.Networks \"{ROOTFUL_NET}\").IPAddress}}}}");
        let out = self
            .podman(&["inspect", "--format", &format, name])
            .expect_ok();
        out.stdout.trim().to_string()
    }

    /// Take out the system-wide hooks `run`/`prepare` installed as root: the rootless tests
    /// refuse to run while they exist.
    fn remove_system_hooks(&self) {
        if Path::new("/etc/containers/oci/hooks.d")
            .join(CREATE_RUNTIME_JSON)
            .exists()
        {
            let out = self.shield(&["setup", "--system", "--remove", "--force"]);
            if !out.ok() {
                eprintln!("e2e: `setup --system --remove --force` failed: {out}");
            }
        }
        for file in fs::read_dir("/etc/containers/oci/hooks.d")
            .into_iter()
            .flatten()
            .flatten()
        {
            if file
                .file_name()
                .to_string_lossy()
                .starts_with("terok-shield-")
            {
                let _ = fs::remove_file(file.path());
            }
        }
    }
}

impl Drop for Rootful {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        for name in &self.names {
            let _ = self.podman(&["rm", "-f", "-t", "0", name]);
        }
        for pod in &self.pods {
            let _ = self.podman(&["pod", "rm", "-f", "-t", "0", pod]);
        }
        let _ = self.podman(&["network", "rm", "-f", ROOTFUL_NET]);
        remove_rootful_bridge();
        self.remove_system_hooks();
        if let Some(before) = &self.ip_forward_before {
            let _ = fs::write("/proc/sys/net/ipv4/ip_forward", before);
        }
        if failed {
            eprintln!(
                "e2e: kept {} for inspection (removed by the next rootful test)",
                self.home.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.home);
        }
    }
}

/// Delete a bridge still holding [`ROOTFUL_GATEWAY`] after its network was removed (left by
/// a run that was killed before netavark could tear it down); podman refuses to create the
/// network again while the subnet is in use on the host. The network's aardvark-dns entry
/// goes too.
fn remove_rootful_bridge() {
    let _ = fs::remove_file(Path::new("/run/containers/networks/aardvark-dns").join(ROOTFUL_NET));
    let Ok(out) = cmd::run("ip", &["-o", "-4", "addr", "show"], SHORT) else {
        return;
    };
    let gateway = format!(" {ROOTFUL_GATEWAY}/");
    for line in out.stdout.lines().filter(|l| l.contains(&gateway)) {
        if let Some(link) = line.split_whitespace().nth(1) {
            eprintln!("e2e: removing the leftover bridge {link} of {ROOTFUL_SUBNET}");
            let _ = cmd::run("ip", &["link", "del", link], SHORT);
        }
    }
}

/// The e2e locks and a fresh world, without podman: for tests that drive the hook against a
/// network namespace of their own (tests/pasta.rs). Dropped in reverse order: world, locks.
pub struct WorldOnly {
    pub world: World,
    _lock: MutexGuard<'static, ()>,
    _machine_lock: fs::File,
}

impl WorldOnly {
    pub fn up() -> WorldOnly {
        let lock = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let machine_lock = machine_lock();
        WorldOnly {
            world: World::up(),
            _lock: lock,
            _machine_lock: machine_lock,
        }
    }
}

/// The container's init PID, as podman reports it.
pub fn pid_of(h: &E2e, name: &str) -> String {
    h.podman(&["inspect", "--format", "{{.State.Pid}}", name])
        .expect_ok()
        .stdout
        .trim()
        .to_string()
}

/// Send one UDP datagram to `host:port` from inside the container's network namespace (busybox
/// has no UDP client), from a thread that joins it; whether the send was refused at once.
pub fn udp_from_container(h: &E2e, name: &str, host: &str, port: u16) -> bool {
    use std::os::fd::AsFd;
    let pid = pid_of(h, name);
    let ns = fs::File::open(format!("/proc/{pid}/ns/net"))
        .unwrap_or_else(|e| panic!("open the netns of {name} (pid {pid}): {e}"));
    let to = format!("{host}:{port}");
    std::thread::spawn(move || {
        rustix::thread::move_into_link_name_space(
            ns.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .expect("setns into the container's netns");
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.send_to(b"e2e-udp", to.as_str()).is_err()
    })
    .join()
    .unwrap()
}

/// Whether audit record `r` is a `blocked` event for `host`, `proto`, `port`.
pub fn is_blocked(r: &Value, host: &str, proto: &str, port: u16) -> bool {
    r["event"] == "blocked"
        && r["detail"]["dst"] == host
        && r["detail"]["proto"] == proto
        && r["detail"]["port"] == port
}

/// The host's `net.ipv4.ping_group_range` (which governs IPv6 ping sockets too).
const PING_GROUP_RANGE: &str = "/proc/sys/net/ipv4/ping_group_range";

/// While alive, the test user's group may open ICMP datagram ("ping") sockets in the host's
/// network namespace, where slirp4netns opens its sockets: slirp4netns then forwards a
/// container's echo requests as ICMP, payload and all. Without it (Debian's default range
/// `1 0` allows no one), libslirp sends each echo request on as a UDP datagram to port 7
/// with a fixed text, and no reply comes back. The previous range returns on drop.
pub struct HostPingSockets {
    before: String,
}

impl HostPingSockets {
    pub fn allow(user: &TestUser) -> HostPingSockets {
        let before = fs::read_to_string(PING_GROUP_RANGE)
            .unwrap_or_else(|e| panic!("read {PING_GROUP_RANGE}: {e}"));
        fs::write(PING_GROUP_RANGE, format!("{0} {0}\n", user.gid))
            .unwrap_or_else(|e| panic!("write {PING_GROUP_RANGE}: {e}"));
        HostPingSockets { before }
    }
}

impl Drop for HostPingSockets {
    fn drop(&mut self) {
        if let Err(e) = fs::write(PING_GROUP_RANGE, &self.before) {
            eprintln!("e2e cleanup: cannot restore {PING_GROUP_RANGE}: {e}");
        }
    }
}

/// The nft table the tests add to a container's network namespace to watch what leaves it.
const WIRE_TABLE: &str = "e2e_wire";

/// `nft ARGS` as root in the network namespace of process `pid`; its stdout.
#[track_caller]
fn nft_in_netns(pid: &str, args: &[&str]) -> String {
    let mut full = vec!["-t", pid, "-n", "nft"];
    full.extend_from_slice(args);
    let out = run_bounded("nsenter", &full, SHORT);
    assert!(out.ok(), "nft {args:?} in the netns of {pid}: {out}");
    out.stdout
}

/// Count, from now on, the packets that leave the network namespace of container process
/// `pid` matching the nft expression `expr`, in a counter called `name` (read it with
/// [`packets_leaving`]). The rule sits in a table of the test's own at postrouting, after
/// the shield's output chain, so it counts what got past the firewall onto the wire,
/// whatever the sending socket was told; slirp4netns, which forwards only part of it (no
/// ICMPv6 echo in libslirp 4.7), does not decide what it sees.
#[track_caller]
pub fn count_leaving(pid: &str, name: &str, expr: &str) {
    nft_in_netns(
        pid,
        &[&format!(
            "add table inet {WIRE_TABLE}; \
             add chain inet {WIRE_TABLE} leave {{ type filter hook postrouting priority 500; }}; \
             add counter inet {WIRE_TABLE} {name}; \
             add rule inet {WIRE_TABLE} leave {expr} counter name {name}"
        )],
    );
}

/// Packets counted so far by the counter `name` of [`count_leaving`].
#[track_caller]
pub fn packets_leaving(pid: &str, name: &str) -> u64 {
    let out = nft_in_netns(pid, &["-j", "list", "counter", "inet", WIRE_TABLE, name]);
    let doc: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("counter {name}: not JSON ({e}): {out}"));
    doc["nftables"]
        .as_array()
        .and_then(|items| items.iter().find_map(|i| i["counter"]["packets"].as_u64()))
        .unwrap_or_else(|| panic!("counter {name}: no packets in {out}"))
}

/// The `State:` line of `terok-shield status NAME`'s output (both harnesses ask for it).
#[track_caller]
fn state_line(out: &Out, name: &str) -> String {
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("State:"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| panic!("`status {name}` printed no State line: {out}"))
}
