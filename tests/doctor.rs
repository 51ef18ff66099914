//! `doctor`, `completions` and `man` through the real binary.
//!
//! The doctor tests need root (to run as the test user, and for podman as root); without it
//! they print a skip line, except under `CI=true`, where they fail. The test user part needs
//! `shieldtest` (scripts/podman-env.sh creates it): skipped when absent, fatal under CI.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use clap::CommandFactory;
use serde_json::Value;
use terok_shield::cli::Cli;

const BIN: &str = env!("CARGO_BIN_EXE_terok-shield");
const TEST_USER: &str = "shieldtest";
const CLEAN_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

fn privileged() -> bool {
    let root = rustix::process::geteuid().is_root();
    if !root {
        assert!(!in_ci(), "doctor tests need root in CI");
        eprintln!("SKIP doctor tests: need root");
    }
    root
}

/// A scratch directory (HOME, config dir) removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("ts-doctor-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `terok-shield doctor ARGS` as root, with a clean environment and a HOME of its own (so
/// no hooks or config of the machine's root account take part) plus `env`.
fn doctor_as_root(home: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("doctor")
        .args(args)
        .env_clear()
        .env("PATH", CLEAN_PATH)
        .env("HOME", home)
        .envs(env.iter().copied())
        .output()
        .expect("run terok-shield doctor")
}

fn report(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .expect("checks array")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {report}"))
}

/// Exit 0, and every check ok except the hooks, which are installed on first use and may
/// therefore still be missing (a warning).
fn assert_passes(out: &Output, who: &str) {
    let r = report(out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "doctor as {who} failed: {r:#}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for c in r["checks"].as_array().unwrap() {
        let allowed: &[&str] = if c["name"] == "hooks" {
            &["ok", "warn"]
        } else {
            &["ok"]
        };
        assert!(
            allowed.contains(&c["status"].as_str().unwrap()),
            "doctor as {who}: {c}"
        );
        assert_eq!(c["fix"].is_null(), c["status"] == "ok", "{c}");
    }
    assert_ne!(r["overall"], "fail");
    for name in [
        "nft",
        "podman",
        "oci-runtime",
        "userns-nftables",
        "hooks-dir",
    ] {
        assert_eq!(check(&r, name)["status"], "ok", "{who}: {name}");
    }
}

#[test]
fn doctor_passes_as_root() {
    if !privileged() {
        return;
    }
    let home = Scratch::new("root");
    let out = doctor_as_root(&home.0, &[], &["--json"]);
    assert_passes(&out, "root");
    let r = report(&out);
    assert_eq!(check(&r, "subuid")["status"], "ok");
    assert!(check(&r, "subuid")["detail"]
        .as_str()
        .unwrap()
        .contains("not needed"));

    // The text form: one line per check, and the summary.
    let out = doctor_as_root(&home.0, &[], &[]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    for name in ["nft", "podman", "userns-nftables", "hooks"] {
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().nth(1) == Some(name)),
            "no {name} line in:\n{text}"
        );
    }
    assert!(
        text.lines().last().unwrap().starts_with("overall: "),
        "{text}"
    );

    // The Python original's name does the same.
    let alias = Command::new(BIN)
        .args(["check-environment", "--json"])
        .env_clear()
        .env("PATH", CLEAN_PATH)
        .env("HOME", &home.0)
        .output()
        .unwrap();
    assert_eq!(alias.status.code(), Some(0));
    assert_eq!(
        report(&alias)["overall"],
        report(&out_json(&home.0))["overall"]
    );
}

fn out_json(home: &Path) -> Output {
    doctor_as_root(home, &[], &["--json"])
}

#[test]
fn doctor_passes_as_the_test_user() {
    if !privileged() {
        return;
    }
    let Some((uid, user_home)) = lookup_user(TEST_USER) else {
        assert!(
            !in_ci(),
            "the user {TEST_USER} is missing in CI (scripts/podman-env.sh creates it)"
        );
        eprintln!("SKIP doctor as {TEST_USER}: no such user (scripts/podman-env.sh creates it)");
        return;
    };
    // The build tree may not be readable by the test user: run a copy.
    let dir = Scratch::new("user");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.0.join("terok-shield");
    std::fs::copy(BIN, &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();

    let runtime_dir = format!("/run/user/{uid}");
    let mut args = vec![
        "-u".to_string(),
        TEST_USER.into(),
        "--".into(),
        "env".into(),
        "-i".into(),
        format!("HOME={}", user_home.display()),
        format!("PATH={CLEAN_PATH}"),
        "LANG=C.UTF-8".into(),
    ];
    if Path::new(&runtime_dir).is_dir() {
        args.push(format!("XDG_RUNTIME_DIR={runtime_dir}"));
    }
    args.push(bin.display().to_string());
    args.extend(["doctor".into(), "--json".into()]);
    let out = Command::new("runuser")
        .args(&args)
        .current_dir("/")
        .output()
        .expect("runuser");
    assert_passes(&out, TEST_USER);
    let r = report(&out);
    for name in [
        "subuid",
        "subgid",
        "newuidmap",
        "newgidmap",
        "tun",
        "rootless-network",
    ] {
        let detail = check(&r, name)["detail"].as_str().unwrap();
        assert!(!detail.contains("not needed"), "{name}: {detail}");
    }
}

#[test]
fn doctor_fails_without_nft_and_names_the_package() {
    if !privileged() {
        return;
    }
    let home = Scratch::new("nonft");
    let missing = [("TEROK_SHIELD_NFT", "/nonexistent/nft")];
    let out = doctor_as_root(&home.0, &missing, &["--json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = report(&out);
    assert_eq!(r["overall"], "fail");
    let nft = check(&r, "nft");
    assert_eq!(nft["status"], "fail");
    assert!(
        nft["fix"].as_str().unwrap().contains("nftables package"),
        "{nft}"
    );
    // Without nft the namespace probe cannot run: said, not passed.
    assert_eq!(check(&r, "userns-nftables")["status"], "warn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("1 check failed"), "{stderr}");

    let out = doctor_as_root(&home.0, &missing, &[]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let at = text
        .lines()
        .position(|l| l.starts_with("fail") && l.split_whitespace().nth(1) == Some("nft"))
        .unwrap_or_else(|| panic!("no failing nft line in:\n{text}"));
    let fix = text.lines().nth(at + 1).unwrap();
    assert!(
        fix.trim_start()
            .starts_with("fix: install the nftables package"),
        "{fix}"
    );
}

#[test]
fn doctor_fails_when_the_hooks_call_a_missing_binary() {
    if !privileged() {
        return;
    }
    // User hooks (listed in this HOME's containers.conf) that call a binary that is gone.
    let home = Scratch::new("stale");
    let config_dir = home.0.join("config");
    let hooks = config_dir.join("hooks.d");
    let conf = home.0.join(".config/containers/containers.conf");
    terok_shield::effects::hooks::setup_user(
        &hooks,
        &conf,
        Path::new("/nonexistent/bin/terok-shield"),
    )
    .unwrap();
    let env = [("TEROK_SHIELD_CONFIG_DIR", config_dir.to_str().unwrap())];
    let out = doctor_as_root(&home.0, &env, &["--json"]);
    assert_eq!(out.status.code(), Some(1));
    let r = report(&out);
    let c = check(&r, "hooks");
    assert_eq!(c["status"], "fail", "{c}");
    assert!(
        c["detail"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/bin/terok-shield"),
        "{c}"
    );
    assert!(
        c["fix"].as_str().unwrap().contains("terok-shield setup"),
        "{c}"
    );
}

fn lookup_user(name: &str) -> Option<(u32, PathBuf)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7 && f[0] == name).then(|| Some((f[2].parse().ok()?, PathBuf::from(f[5]))))?
    })
}

/// The subcommands a user can type (hidden internal ones excluded).
fn visible_subcommands() -> Vec<String> {
    let names: Vec<String> = Cli::command()
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .map(|c| c.get_name().to_string())
        .collect();
    for expected in ["doctor", "completions", "man", "run", "status"] {
        assert!(names.iter().any(|n| n == expected), "{names:?}");
    }
    names
}

fn run_ok(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .env_clear()
        .env("PATH", CLEAN_PATH)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn completions_cover_every_subcommand() {
    let names = visible_subcommands();
    for shell in ["bash", "zsh", "fish"] {
        let script = run_ok(&["completions", shell]);
        assert!(!script.trim().is_empty(), "{shell}: empty");
        assert!(script.contains("terok-shield"), "{shell}");
        for name in &names {
            assert!(script.contains(name.as_str()), "{shell}: no {name}");
        }
    }
    let out = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn man_page_is_roff_and_lists_every_subcommand() {
    let page = run_ok(&["man"]);
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        page.lines()
            .any(|l| l.starts_with(".TH terok-shield 1 ") && l.contains(version)),
        "no .TH header:\n{}",
        &page[..page.len().min(400)]
    );
    for section in [".SH NAME", ".SH SYNOPSIS", ".SH SUBCOMMANDS"] {
        assert!(page.contains(section), "no {section}");
    }
    let unescaped = page.replace("\\-", "-");
    for name in visible_subcommands() {
        assert!(
            unescaped.contains(&format!(".TP\nterok-shield-{name}(1)\n")),
            "the SUBCOMMANDS section does not list {name}"
        );
    }
}

#[test]
fn man_dir_writes_a_page_per_subcommand() {
    let dir = Scratch::new("man");
    let out_dir = dir.0.join("man1");
    run_ok(&["man", "--dir", out_dir.to_str().unwrap()]);
    let main = std::fs::read_to_string(out_dir.join("terok-shield.1")).unwrap();
    assert!(main.contains(".TH terok-shield 1 "), "{main}");
    for name in visible_subcommands() {
        let page = out_dir.join(format!("terok-shield-{name}.1"));
        let text =
            std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        assert!(
            text.contains(&format!(".TH terok-shield-{name} 1 ")),
            "{text}"
        );
    }
}
