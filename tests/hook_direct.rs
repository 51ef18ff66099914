//! The OCI hook driven directly, the way a runtime calls it: OCI state on stdin, an empty
//! environment (no PATH, no HOME), a container process in its own network namespace.
//!
//! Needs root (to create the namespace); without it the tests print a skip line, except
//! under `CI=true`, where they fail.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

#[path = "common/hook.rs"]
mod hook_bed;

use hook_bed::{prepare_as_nobody, run_hook, Prepared};

fn privileged() -> bool {
    let ok = rustix::process::geteuid().is_root() && Command::new("nft").arg("-v").output().is_ok();
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "hook tests need root and nft in CI"
        );
        eprintln!("SKIP hook tests: need root and nft");
    }
    ok
}

/// A stand-in container: `sleep` in a fresh network namespace, killed and reaped on drop.
struct FakeContainer {
    child: Child,
}

impl FakeContainer {
    fn start() -> FakeContainer {
        let child = Command::new("unshare")
            .args(["-n", "sleep", "60"])
            .spawn()
            .expect("unshare");
        let me = format!("/proc/{}/ns/net", child.id());
        let own = std::fs::metadata("/proc/self/ns/net").unwrap();
        // Bounded wait until unshare has moved into its new namespace.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            use std::os::unix::fs::MetadataExt;
            if let Ok(m) = std::fs::metadata(&me) {
                if m.ino() != own.ino() {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "unshare did not create a namespace"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        FakeContainer { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn tables_text(&self) -> String {
        let out = Command::new("nsenter")
            .args([
                "-n",
                "-t",
                &self.pid().to_string(),
                "nft",
                "list",
                "ruleset",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn tables(&self) -> String {
        let out = Command::new("nsenter")
            .args(["-n", "-t", &self.pid().to_string(), "nft", "list", "tables"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for FakeContainer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Prepare with the static DNS tier: these tests are about the hook itself, and the fake
/// container has no resolv.conf for a resolver tier to redirect.
fn prepare(tag: &str) -> Prepared {
    prepare_with(tag, "dns:\n  tier: static\n")
}

fn prepare_with(tag: &str, config: &str) -> Prepared {
    prepare_as_nobody("hooked", tag, config, "198.51.100.10\n2001:db8::10\n")
}

/// The capabilities podman 4.3 gives a container started with the shield's flags.
const PODMAN_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_NET_BIND_SERVICE",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
];

/// Write an OCI bundle (`config.json`, as a runtime has it) for the test whose state dir is
/// `dir`, granting `caps` in the bounding, effective and permitted sets; returns its path.
fn oci_bundle(dir: &Path, caps: &[&str]) -> PathBuf {
    let root = dir.ancestors().nth(3).expect("ROOT/state/containers/NAME");
    let bundle = root.join("oci");
    std::fs::create_dir_all(&bundle).unwrap();
    let config = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "args": ["sleep", "60"],
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        },
        "mounts": [],
    });
    std::fs::write(bundle.join("config.json"), config.to_string()).unwrap();
    bundle
}

fn oci_state(p: &Prepared, pid: u32, instance: &str) -> String {
    p.state(instance, Some(pid), &oci_bundle(&p.dir, PODMAN_CAPS))
}

/// Run `hook createRuntime` with an empty environment; (success, stderr, elapsed).
fn hook(stdin: &str) -> (bool, String, Duration) {
    run_hook("createRuntime", stdin)
}

/// A resolver tier needs somewhere to send DNS and a resolv.conf to point at itself; without
/// them the container must not start (fail closed), and the message says what to do.
#[test]
fn resolver_tier_without_upstream_or_resolv_conf_fails_closed() {
    if !privileged() {
        return;
    }
    let c = FakeContainer::start();
    let p = prepare_with("no-upstream", "dns:\n  tier: builtin\n");
    let (ok, err, _) = hook(&oci_state(&p, c.pid(), &p.instance));
    assert!(
        !ok,
        "the hook started a builtin-tier container with no upstream"
    );
    assert!(err.contains("set upstream_dns"), "{err}");
    let c = FakeContainer::start(); // a fresh namespace: the first one has the table now
    let p = prepare_with(
        "no-resolv",
        "upstream_dns: 198.51.100.53\ndns:\n  tier: builtin\n",
    );
    let (ok, err, _) = hook(&oci_state(&p, c.pid(), &p.instance));
    assert!(
        !ok,
        "the hook started a container whose resolv.conf it cannot redirect"
    );
    assert!(err.contains("resolv.conf"), "{err}");
}

#[test]
fn hook_applies_with_an_empty_environment() {
    if !privileged() {
        return;
    }
    let c = FakeContainer::start();
    let p = prepare("empty-env");
    let (ok, err, took) = hook(&oci_state(&p, c.pid(), &p.instance));
    assert!(ok, "hook failed: {err}");
    assert!(took < Duration::from_secs(5), "hook took {took:?}");
    assert!(
        c.tables().contains("table inet terok_shield"),
        "{}",
        c.tables()
    );
    let runtime = std::fs::read_to_string(p.dir.join("runtime.json")).unwrap();
    assert!(
        runtime.contains(&format!("\"pid\":{}", c.pid())),
        "{runtime}"
    );
    // A second createRuntime into the same namespace (podman's restart policy keeps the
    // network namespace, and our table in it): the table is replaced whole, not merged into,
    // so it is exactly the policy again; something added to it in between is gone.
    let added = Command::new("nsenter")
        .args([
            "-n",
            "-t",
            &c.pid().to_string(),
            "nft",
            "add",
            "rule",
            "inet",
            "terok_shield",
            "output",
            "ip",
            "daddr",
            "198.51.100.99",
            "accept",
        ])
        .status()
        .unwrap();
    assert!(added.success());
    assert!(c.tables_text().contains("198.51.100.99"));
    p.poststop();
    let (ok, err, _) = hook(&oci_state(&p, c.pid(), &p.instance));
    assert!(ok, "a start in a namespace holding our table failed: {err}");
    let text = c.tables_text();
    assert!(
        !text.contains("198.51.100.99"),
        "the old table was merged into: {text}"
    );
    assert_eq!(
        text.matches("chain output").count(),
        1,
        "one table, one output chain: {text}"
    );
}

#[test]
fn hook_refuses_the_hosts_own_network_namespace() {
    if !privileged() {
        return;
    }
    let p = prepare("host-ns");
    let before = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap()
        .stdout;
    let (ok, err, _) = hook(&oci_state(&p, std::process::id(), &p.instance));
    assert!(!ok && err.contains("host's network namespace"), "{err}");
    let after = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap()
        .stdout;
    assert_eq!(before, after, "the host's tables changed");
}

#[test]
fn hook_refuses_bad_input_and_changes_nothing() {
    if !privileged() {
        return;
    }
    let c = FakeContainer::start();
    let p = prepare("bad-input");
    for (stdin, expect) in [
        ("not json".to_string(), "not valid OCI state"),
        (oci_state(&p, c.pid(), "someone-else"), "instance"),
        (
            oci_state(&p, c.pid(), &p.instance).replace("\"hooked\"", "\"../etc\""),
            "invalid value",
        ),
    ] {
        let (ok, err, _) = hook(&stdin);
        assert!(!ok, "accepted {stdin}");
        assert!(err.contains(expect), "expected {expect:?} in {err}");
    }
    assert!(!c.tables().contains("terok_shield"), "{}", c.tables());
}

/// A container prepared by an older terok-shield (format-1 bundle, its version in the
/// annotation) starts shielded under this one: the bundle is migrated as it is read.
#[test]
fn hook_starts_a_container_prepared_with_the_previous_bundle_format() {
    if !privileged() {
        return;
    }
    let c = FakeContainer::start();
    let p = prepare("format-1");
    assert_ne!(
        env!("CARGO_PKG_VERSION"),
        "0.1.0",
        "this test stands for an upgrade from 0.1.0"
    );
    let path = p.dir.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let fields = state.as_object_mut().unwrap();
    assert_eq!(fields["format"], 2, "this test downgrades format 2 to 1");
    // Format 1 as its first writers left it: `shield_version`, no upstream_dns/ttl_bounds.
    fields.insert("format".into(), 1.into());
    fields.remove("written_by");
    fields.insert("shield_version".into(), "0.1.0".into());
    fields.remove("upstream_dns");
    fields.remove("ttl_bounds");
    std::fs::write(&path, serde_json::to_vec_pretty(&state).unwrap()).unwrap();
    let old_annotation = oci_state(&p, c.pid(), &p.instance)
        .replace(&format!("\"{}\"", env!("CARGO_PKG_VERSION")), "\"0.1.0\"");
    assert!(old_annotation.contains("\"0.1.0\""), "{old_annotation}");
    let (ok, err, _) = hook(&old_annotation);
    assert!(ok, "a format-1 bundle was refused: {err}");
    assert!(
        c.tables().contains("table inet terok_shield"),
        "{}",
        c.tables()
    );
    let audit = std::fs::read_to_string(p.dir.join("audit.jsonl")).unwrap();
    assert!(
        audit.contains("\"prepared_by\":\"0.1.0\""),
        "the apply event does not record the preparing version: {audit}"
    );
}

/// A bundle of a format newer than this binary knows is refused, with the way out.
#[test]
fn hook_refuses_a_bundle_of_a_newer_format() {
    if !privileged() {
        return;
    }
    let c = FakeContainer::start();
    let p = prepare("format-new");
    let path = p.dir.join("state.json");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"format\": 2"), "{text}");
    std::fs::write(&path, text.replace("\"format\": 2", "\"format\": 3")).unwrap();
    let (ok, err, _) = hook(&oci_state(&p, c.pid(), &p.instance));
    assert!(!ok, "a format-3 bundle was accepted");
    assert!(
        err.contains("format 3") && err.contains("upgrade terok-shield"),
        "{err}"
    );
    assert!(!c.tables().contains("terok_shield"), "{}", c.tables());
}

/// The whole bundle directory deleted: refused, and the refusal lands in the audit log of the
/// name (the directory is made again for the log only).
#[test]
fn hook_refuses_a_container_whose_bundle_was_deleted_and_logs_it() {
    if !privileged() {
        return;
    }
    let c = FakeContainer::start();
    let p = prepare("deleted");
    std::fs::remove_dir_all(&p.dir).unwrap();
    let (ok, err, _) = hook(&oci_state(&p, c.pid(), &p.instance));
    assert!(!ok && err.contains("no shield state"), "{err}");
    assert!(!c.tables().contains("terok_shield"), "{}", c.tables());
    let audit = std::fs::read_to_string(p.dir.join("audit.jsonl")).unwrap();
    assert!(
        audit.contains("\"failure\"") && audit.contains("no shield state"),
        "{audit}"
    );
    assert!(
        !p.dir.join("state.json").exists(),
        "the hook must not make a bundle"
    );
}

/// A container prepared by the shield but started with a capability that undoes the
/// firewall (`podman run --cap-add NET_ADMIN $(terok-shield prepare ...)`): its OCI
/// configuration says so, and the hook refuses it before any table exists; a missing
/// configuration is refused too.
#[test]
fn hook_refuses_a_container_holding_a_forbidden_capability() {
    if !privileged() {
        return;
    }
    let c = FakeContainer::start();
    let p = prepare("caps");
    for cap in ["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_ADMIN", "CAP_BPF"] {
        let mut caps = PODMAN_CAPS.to_vec();
        caps.push(cap);
        let bundle = oci_bundle(&p.dir, &caps);
        let (ok, err, _) = hook(&p.state(&p.instance, Some(c.pid()), &bundle));
        assert!(!ok, "started a container holding {cap}");
        assert!(
            err.contains(&format!("{cap} (bounding, effective, permitted)"))
                && err.contains("--cap-add"),
            "{err}"
        );
        assert!(!c.tables().contains("terok_shield"), "{}", c.tables());
    }
    let audit = std::fs::read_to_string(p.dir.join("audit.jsonl")).unwrap();
    assert!(
        audit.contains("\"failure\"") && audit.contains("CAP_NET_ADMIN"),
        "{audit}"
    );
    let missing = p.dir.join("no-such-bundle");
    let (ok, err, _) = hook(&p.state(&p.instance, Some(c.pid()), &missing));
    assert!(!ok && err.contains("OCI configuration"), "{err}");
    // The podman defaults pass: the same container starts.
    let (ok, err, _) = hook(&oci_state(&p, c.pid(), &p.instance));
    assert!(ok, "{err}");
    assert!(c.tables().contains("table inet terok_shield"));
}

/// The hook binds the sockets of the process it starts in the container (here the static
/// tier's event reader and its NFLOG group) before returning, rather than waiting for that
/// process: so a socket that cannot be bound must still refuse the start, with the reason.
/// A second start while the first one's reader still holds the group is such a case.
#[test]
fn hook_refuses_when_the_event_readers_socket_cannot_be_bound() {
    if !privileged() {
        return;
    }
    let c = FakeContainer::start();
    let p = prepare("nflog-busy");
    let state = oci_state(&p, c.pid(), &p.instance);
    let (ok, err, _) = hook(&state);
    assert!(ok, "first start failed: {err}");
    let (ok, err, _) = hook(&state);
    assert!(
        !ok,
        "the hook started a container whose event reader could not bind its NFLOG group"
    );
    assert!(
        err.contains("the event reader did not start") && err.contains("NFLOG group 100"),
        "{err}"
    );
    p.poststop();
}
