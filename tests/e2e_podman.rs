//! End-to-end: real `terok-shield run`, real rootless Podman (as the test user `shieldtest`,
//! with slirp4netns), real packets to a fake internet in a network namespace.
//!
//! Needs root and the environment of `scripts/podman-env.sh`; see docs/testing-e2e.md.
//! Without it every test prints a skip line, except under `CI=true`, where it fails.
//! Tests run one at a time (a global lock in the harness): each builds its own world.

#[macro_use]
mod common;
use common::e2e;

use std::fs;

use serde_json::Value;

use e2e::world::*;
use e2e::{probe_script, E2e, Probes, IMAGE, RAN};

// ---------------------------------------------------------------------------------------
// Reachability
// ---------------------------------------------------------------------------------------

/// The control experiment: an unshielded container reaches every world host over IPv4 and
/// IPv6, so every refusal below is the shield's doing.
#[test]
fn control_unshielded_container_reaches_every_world_host() {
    let mut h = e2e!();
    let name = h.name("control");
    let targets = [
        (ALLOWED4, 80),
        (BLOCKED4, 80),
        (SCOPED4, 80),
        (SCOPED4, 443),
        (ALLOWED6, 80),
        (BLOCKED6, 80),
        (ULA6, 80),
    ];
    let mark = h.world.mark();
    let out = h
        .podman(&[
            "run",
            "--rm",
            "--name",
            &name,
            IMAGE,
            "sh",
            "-c",
            &probe_script(&targets),
        ])
        .expect_ok();
    let p = Probes::of(&out, &h.world, mark);
    for (host, port) in targets {
        p.reached(host, port);
    }
}

#[test]
fn allowed_ipv4_is_reached_and_others_are_refused_fast() {
    let mut h = e2e!();
    let name = h.name("ipv4");
    let mark = h.world.mark();
    let out = h
        .run_script(
            &name,
            "e2e-basic",
            &probe_script(&[
                (ALLOWED4, 80),
                (ALLOWED4, 443),
                (BLOCKED4, 80),
                (BLOCKED4, 443),
            ]),
        )
        .expect_ok();
    let p = Probes::of(&out, &h.world, mark);
    p.reached(ALLOWED4, 80);
    p.reached(ALLOWED4, 443);
    p.refused_fast(BLOCKED4, 80);
    p.refused_fast(BLOCKED4, 443);
}

#[test]
fn ipv6_allowed_is_reached_and_others_are_refused_fast() {
    let mut h = e2e!();
    let name = h.name("ipv6");
    let script = format!(
        "ip -6 addr show scope global | grep -q 'inet6 fd00:' && echo HAS-V6\n{}",
        probe_script(&[(ALLOWED6, 80), (ALLOWED6, 443), (BLOCKED6, 80)])
    );
    let mark = h.world.mark();
    let out = h.run_script(&name, "e2e-basic", &script).expect_ok();
    assert!(
        out.stdout.contains("HAS-V6"),
        "the container has no fd00::/64 address from slirp4netns: {out}"
    );
    let p = Probes::of(&out, &h.world, mark);
    p.reached(ALLOWED6, 80);
    p.reached(ALLOWED6, 443);
    p.refused_fast(BLOCKED6, 80);
}

#[test]
fn private_range_is_refused_unless_allowlisted() {
    let mut h = e2e!();
    // One profile (not two): see `several_profiles_combine_in_one_container`.
    h.profile(
        "e2e-basic-ula",
        &format!("{}fd5e:ed00::7\n", e2e::BASIC_PROFILE),
    );
    let closed = h.name("ula-closed");
    let open = h.name("ula-open");

    let mark = h.world.mark();
    let out = h
        .run_script(
            &closed,
            "e2e-basic",
            &probe_script(&[(ULA6, 80), (ALLOWED6, 80)]),
        )
        .expect_ok();
    let p = Probes::of(&out, &h.world, mark);
    p.refused_fast(ULA6, 80);
    p.reached(ALLOWED6, 80);

    let mark = h.world.mark();
    let out = h
        .run_script(
            &open,
            "e2e-basic-ula",
            &probe_script(&[(ULA6, 80), (ALLOWED6, 80), (BLOCKED6, 80)]),
        )
        .expect_ok();
    assert!(
        out.stderr.contains("private range"),
        "allowlisting a private address should be pointed out: {out}"
    );
    let p = Probes::of(&out, &h.world, mark);
    p.reached(ULA6, 80);
    p.reached(ALLOWED6, 80);
    p.refused_fast(BLOCKED6, 80);
}

/// `--profiles a,b` merges both allowlists. (Podman 4 splits `--annotation` values at
/// commas, so the profiles annotation must not contain one.)
#[test]
fn several_profiles_combine_in_one_container() {
    let mut h = e2e!();
    h.profile("e2e-extra", "198.51.100.40\n");
    let name = h.name("two-profiles");
    let mark = h.world.mark();
    let out = h
        .run_script(
            &name,
            "e2e-basic,e2e-extra",
            &probe_script(&[(ALLOWED4, 80), (REUSE_B, 80), (BLOCKED4, 80)]),
        )
        .expect_ok();
    let p = Probes::of(&out, &h.world, mark);
    p.reached(ALLOWED4, 80);
    p.reached(REUSE_B, 80);
    p.refused_fast(BLOCKED4, 80);
}

/// `loopback_ports` opens exactly those ports of the host's loopback, reached through
/// slirp4netns' host-loopback address 10.0.2.2.
#[test]
fn loopback_ports_reach_host_services_and_nothing_else() {
    let mut h = e2e!();
    h.set_config(&format!(
        "{}loopback_ports: [18080, 18081]\n",
        e2e::CONFIG_YML
    ));
    let server = e2e::LoopbackServer::start(&[18080, 18081, 18082]);
    let name = h.name("loopback");
    let script = probe_script(&[
        ("10.0.2.2", 18080),
        ("10.0.2.2", 18081),
        ("10.0.2.2", 18082),
    ]);
    let out = h
        .run_with(
            &name,
            "e2e-basic",
            &[
                "--rm",
                "--network",
                "slirp4netns:allow_host_loopback=true",
                IMAGE,
                "sh",
                "-c",
                &script,
            ],
        )
        .expect_ok();
    assert!(out.stdout.contains(RAN), "{out}");
    let probes = e2e::parse_probes(&out.stdout);
    let get = |port: u16| {
        probes
            .iter()
            .find(|p| p.port == port)
            .unwrap_or_else(|| panic!("no probe of port {port}: {out}"))
    };
    for port in [18080, 18081] {
        let p = get(port);
        assert!(
            p.rc == 0 && p.text.contains(&format!("terok-e2e-loopback {port}")),
            "loopback port {port} is listed but not reachable: {p:?}\n{out}"
        );
    }
    let p = get(18082);
    assert!(
        p.rc != 0 && p.text.contains("refused") && p.cs <= e2e::FAST_CS,
        "unlisted loopback port 18082 was not refused at once: {p:?}\n{out}"
    );
    assert_eq!(
        server.accepted(18082),
        0,
        "the host service on 18082 saw a connection"
    );
    assert!(server.accepted(18080) >= 1 && server.accepted(18081) >= 1);
}

/// `198.18.0.0/16:443/tcp` opens port 443 of that network and nothing else.
#[test]
fn port_scoped_entry_allows_only_its_port() {
    let mut h = e2e!();
    let name = h.name("scoped");
    let mark = h.world.mark();
    let out = h
        .run_script(
            &name,
            "e2e-basic",
            &probe_script(&[(SCOPED4, 443), (SCOPED4, 80)]),
        )
        .expect_ok();
    let p = Probes::of(&out, &h.world, mark);
    p.reached(SCOPED4, 443);
    p.refused_fast(SCOPED4, 80);
}

// ---------------------------------------------------------------------------------------
// The workload cannot undo the shield
// ---------------------------------------------------------------------------------------

fn cap_bits(status: &str, field: &str) -> u64 {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in {status}"));
    u64::from_str_radix(line.trim(), 16).unwrap()
}

#[test]
fn workload_cannot_change_the_firewall() {
    const NET_ADMIN: u64 = 1 << 12;
    const NET_RAW: u64 = 1 << 13;
    let mut h = e2e!();
    let name = h.name("tamper");
    // The shield itself drops the capabilities (not only podman's defaults).
    let flags = h.prepare(&name, "e2e-basic");
    for cap in ["--cap-drop=NET_ADMIN", "--cap-drop=NET_RAW"] {
        assert!(
            flags.iter().any(|f| f == cap),
            "prepare flags lack {cap}: {flags:?}"
        );
    }
    h.run_detached(&name, "e2e-basic").expect_ok();
    assert_eq!(h.shield_state(&name), "up");

    let out = h
        .exec(
            &name,
            "grep -E '^Cap(Prm|Eff|Bnd):' /proc/self/status\n\
         ip link set lo down; echo IPLINK rc=$?\n\
         ip addr add 198.51.100.99/32 dev lo; echo IPADDR rc=$?\n\
         ip route add 198.51.100.0/24 dev tap0; echo IPROUTE rc=$?\n",
        )
        .expect_ok();
    for field in ["CapPrm", "CapEff", "CapBnd"] {
        let bits = cap_bits(&out.stdout, field);
        assert_eq!(bits & NET_ADMIN, 0, "{field} holds CAP_NET_ADMIN: {out}");
        assert_eq!(bits & NET_RAW, 0, "{field} holds CAP_NET_RAW: {out}");
    }
    for op in ["IPLINK", "IPADDR", "IPROUTE"] {
        assert!(
            out.stdout.contains(&format!("{op} rc="))
                && !out.stdout.contains(&format!("{op} rc=0")),
            "{op} succeeded inside the container: {out}"
        );
    }
    assert!(
        out.stderr.contains("Operation not permitted")
            || out.stdout.contains("Operation not permitted"),
        "network changes were not refused with EPERM: {out}"
    );
    // The firewall is intact afterwards.
    assert_eq!(h.shield_state(&name), "up");
    let mark = h.world.mark();
    let out = h
        .exec(&name, &probe_script(&[(BLOCKED4, 80), (ALLOWED4, 80)]))
        .expect_ok();
    let p = Probes::of(&out, &h.world, mark);
    p.refused_fast(BLOCKED4, 80);
    p.reached(ALLOWED4, 80);
}

// ---------------------------------------------------------------------------------------
// Fail closed: a hook that cannot do its job keeps the workload from starting
// ---------------------------------------------------------------------------------------

/// Prepare `tag`, break something with `sabotage`, then `podman run` with the prepared flags:
/// the container must not start, the workload must never run, and `reason` must be visible in
/// podman's stderr, the bundle's hook-error.log and a `failure` audit event.
fn assert_fails_closed(tag: &str, reason: &str, sabotage: impl FnOnce(&E2e, &str)) {
    let mut h = e2e!();
    let name = h.name(tag);
    let flags = h.prepare(&name, "e2e-basic");
    sabotage(&h, &name);
    let out = h.podman_run_prepared(&flags, &[IMAGE, "sh", "-c", &format!("echo {RAN}")]);
    assert!(!out.ok(), "the container started although {tag}: {out}");
    assert!(
        !out.stdout.contains(RAN),
        "the workload ran although {tag}: {out}"
    );
    assert!(
        out.stderr.contains(reason),
        "podman's error does not carry the hook's reason {reason:?}: {out}"
    );
    assert_ne!(
        h.container_state(&name).as_deref(),
        Some("running"),
        "container left running"
    );
    let log = h.read(&h.bundle_dir(&name).join("hook-error.log"));
    assert!(
        log.contains("createRuntime") && log.contains(reason),
        "hook-error.log lacks {reason:?}: {log}"
    );
    let failures = h.events(&name, "failure");
    let last = failures
        .last()
        .unwrap_or_else(|| panic!("no `failure` event in the audit log of {name}"));
    assert_eq!(last["ok"], Value::Bool(false), "{last}");
    assert_eq!(last["detail"]["stage"], "createRuntime", "{last}");
    assert!(
        last["detail"]["error"]
            .as_str()
            .unwrap_or("")
            .contains(reason),
        "failure event lacks {reason:?}: {last}"
    );
    assert!(
        h.events(&name, "apply").is_empty(),
        "an `apply` event was recorded for a container that must not start"
    );
}

#[test]
fn fail_closed_when_state_json_is_deleted() {
    assert_fails_closed("no-state", "no shield state", |h, name| {
        fs::remove_file(h.bundle_dir(name).join("state.json")).unwrap();
    });
}

/// A bundle of a newer format than this binary knows (a downgrade) is refused, and the
/// message says how to get out.
#[test]
fn fail_closed_on_a_bundle_of_a_newer_format() {
    assert_fails_closed("newer-format", "upgrade terok-shield", |h, name| {
        let path = h.bundle_dir(name).join("state.json");
        let mut state: Value = serde_json::from_str(&h.read(&path)).unwrap();
        assert_eq!(state["format"], 2, "{state}");
        state["format"] = Value::from(3);
        fs::write(&path, serde_json::to_vec_pretty(&state).unwrap()).unwrap();
    });
}

#[test]
fn fail_closed_on_corrupt_state_json() {
    assert_fails_closed("corrupt", "is corrupt", |h, name| {
        fs::write(
            h.bundle_dir(name).join("state.json"),
            b"{\"format\": 1, \"na",
        )
        .unwrap();
    });
}

/// nft missing. Podman does not hand its environment to OCI hooks (measured with Podman
/// 4.3.1 + runc: the hook sees only HOME, PATH, XDG_RUNTIME_DIR and podman's own variables),
/// so `TEROK_SHIELD_NFT` reaches the hook through the descriptor's `env`.
#[test]
fn fail_closed_when_nft_is_missing() {
    assert_fails_closed(
        "no-nft",
        "is not an absolute path to an executable",
        |h, _| {
            h.set_hook_env(&["TEROK_SHIELD_NFT=/nonexistent/nft"]);
        },
    );
}

/// nft loads the ruleset, but reading it back shows a different policy: verification must
/// refuse to start the container.
#[test]
fn fail_closed_when_verification_finds_a_mismatch() {
    assert_fails_closed("mismatch", "does not match", |h, _| {
        let wrapper = format!("{}/nft-flip-policy", e2e::BIN_DIR);
        h.set_hook_env(&[&format!("TEROK_SHIELD_NFT={wrapper}")]);
    });
}

// ---------------------------------------------------------------------------------------
// Input checks
// ---------------------------------------------------------------------------------------

#[test]
fn run_rejects_podman_flags_that_would_weaken_the_shield() {
    let mut h = e2e!();
    let fresh = h.name("flags-fresh");
    let prepared = h.name("flags-prepared");
    h.prepare(&prepared, "e2e-basic");
    let state = h.bundle_dir(&prepared).join("state.json");
    let audit = h.bundle_dir(&prepared).join("audit.jsonl");
    let before = (h.read(&state), h.read(&audit));

    let cases: &[(&[&str], &str)] = &[
        (&["--privileged"], "--privileged"),
        (&["--cap-add", "NET_ADMIN"], "NET_ADMIN"),
        (&["--network", "host"], "host"),
        (&["--name", "x"], "--name"),
        (&["--hooks-dir", "/tmp"], "--hooks-dir"),
        (&["--frobnicate"], "unknown podman flag `--frobnicate`"),
    ];
    for name in [&fresh, &prepared] {
        for (flags, mention) in cases {
            let mut args = flags.to_vec();
            args.extend_from_slice(&[IMAGE, "sh", "-c", "echo WORKLOAD-RAN"]);
            let out = h.run_with(name, "e2e-basic", &args);
            assert_eq!(out.code(), Some(1), "{flags:?} was not refused: {out}");
            assert!(
                !out.stdout.contains(RAN),
                "{flags:?}: the workload ran: {out}"
            );
            assert!(
                out.stderr.contains("terok-shield: error:") && out.stderr.contains(mention),
                "{flags:?}: the message does not name {mention:?}: {out}"
            );
            assert!(
                !h.container_exists(name),
                "{flags:?}: a container {name} was created"
            );
            assert!(
                !h.container_exists("x"),
                "{flags:?}: a container x was created"
            );
        }
    }
    assert!(
        !h.bundle_dir(&fresh).exists(),
        "a refused run created the bundle {}",
        h.bundle_dir(&fresh).display()
    );
    let after = (h.read(&state), h.read(&audit));
    assert!(before == after, "a refused run changed the prepared bundle");
}

#[test]
fn bad_profile_line_is_reported_and_nothing_starts() {
    let mut h = e2e!();
    let name = h.name("badprofile");
    let path = h.profile("e2e-bad", "198.51.100.10\n# fine so far\nnot a host!\n");
    let out = h.run_script(&name, "e2e-bad", &format!("echo {RAN}"));
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(!out.stdout.contains(RAN), "the workload ran: {out}");
    let at = format!("{}:3", path.display());
    assert!(
        out.stderr.contains(&at) && out.stderr.contains("not a host!"),
        "the error does not name {at} and the bad text: {out}"
    );
    assert!(!h.container_exists(&name), "a container was created");
    assert!(
        !h.bundle_dir(&name).join("state.json").exists(),
        "a bundle was written for a bad profile"
    );
}

// ---------------------------------------------------------------------------------------
// Looking at shielded containers
// ---------------------------------------------------------------------------------------

#[test]
fn status_rules_logs_and_prepare_json() {
    let mut h = e2e!();
    let name = h.name("inspect");

    let out = h
        .shield(&["prepare", &name, "--profiles", "e2e-basic", "--json"])
        .expect_ok();
    let flags: Value = serde_json::from_str(out.stdout.trim()).expect("prepare --json is JSON");
    let flags = flags.as_array().expect("prepare --json is a JSON array");
    assert!(flags.iter().all(Value::is_string), "{flags:?}");
    assert!(
        flags.iter().any(|f| f == "--name")
            && flags.iter().any(|f| f == &Value::from(name.clone()))
    );
    assert_eq!(
        h.shield_state(&name),
        "inactive",
        "a prepared, unstarted container"
    );

    h.run_detached(&name, "e2e-basic").expect_ok();
    assert_eq!(h.shield_state(&name), "up");
    let status: Value =
        serde_json::from_str(&h.shield(&["status", &name, "--json"]).expect_ok().stdout).unwrap();
    assert_eq!(status["state"], "up", "{status}");
    assert_eq!(
        status["profiles"],
        serde_json::json!(["e2e-basic"]),
        "{status}"
    );

    let rules = h.shield(&["rules", &name]).expect_ok();
    assert!(rules.stdout.contains("table inet terok_shield"), "{rules}");
    assert!(
        rules.stdout.contains("198.51.100.10"),
        "the allowlist is not in the rules: {rules}"
    );

    let logs = h
        .shield(&["logs", "--container", &name, "-n", "2"])
        .expect_ok();
    let lines: Vec<&str> = logs.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "logs -n 2: {logs}");
    for line in &lines {
        let record: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(record["container"], Value::from(name.clone()));
    }
    let last: Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(
        last["event"], "apply",
        "the newest record is the hook's apply: {logs}"
    );
    let all = h.audit(&name);
    assert!(all.len() >= 3, "prepare, prepare, apply expected: {all:?}");
    let one: Value = serde_json::from_str(
        &h.shield(&["logs", "--container", &name, "-n", "1", "--json"])
            .expect_ok()
            .stdout,
    )
    .unwrap();
    assert_eq!(one.as_array().map(Vec::len), Some(1), "{one}");
    assert_eq!(one[0]["event"], "apply");

    h.podman(&["stop", "-t", "0", &name]).expect_ok();
    assert_eq!(
        h.shield_state(&name),
        "inactive",
        "status after podman stop"
    );
    let out = h.shield(&["rules", &name]);
    assert!(
        !out.ok() && out.stderr.contains("not running"),
        "rules of a stopped container: {out}"
    );
}

#[test]
fn reused_name_starts_from_a_clean_bundle() {
    let mut h = e2e!();
    h.profile("e2e-reuse-a", "198.51.100.30\n");
    h.profile("e2e-reuse-b", "198.51.100.40\n");
    let name = h.name("reuse");

    h.run_detached(&name, "e2e-reuse-a").expect_ok();
    let allowed = h.shield(&["allow", &name, LIVE4]).expect_ok();
    let mark = h.world.mark();
    let out = h
        .exec(
            &name,
            &probe_script(&[(REUSE_A, 80), (LIVE4, 80), (REUSE_B, 80)]),
        )
        .expect_ok();
    let p = Probes::of(&out, &h.world, mark);
    p.reached(REUSE_A, 80);
    p.reached(LIVE4, 80);
    p.refused_fast(REUSE_B, 80);
    let first: Value =
        serde_json::from_str(&h.read(&h.bundle_dir(&name).join("state.json"))).unwrap();
    drop(allowed);

    h.podman(&["rm", "-f", "-t", "0", &name]).expect_ok();
    h.run_detached(&name, "e2e-reuse-b").expect_ok();
    let second: Value =
        serde_json::from_str(&h.read(&h.bundle_dir(&name).join("state.json"))).unwrap();
    assert_ne!(
        first["instance"], second["instance"],
        "the new container got the old instance"
    );
    assert_eq!(second["profiles"], serde_json::json!(["e2e-reuse-b"]));
    assert_eq!(
        second["live_allow"],
        serde_json::json!([]),
        "live allows leaked into the new bundle"
    );

    let mark = h.world.mark();
    let out = h
        .exec(
            &name,
            &probe_script(&[(REUSE_A, 80), (LIVE4, 80), (REUSE_B, 80)]),
        )
        .expect_ok();
    let p = Probes::of(&out, &h.world, mark);
    p.refused_fast(REUSE_A, 80);
    p.refused_fast(LIVE4, 80);
    p.reached(REUSE_B, 80);
}

/// With the default DNS tier (builtin), a profile domain opens nothing ahead: the workload's
/// lookup goes through the container's resolver to `upstream_dns` (the fake DNS server in
/// the world), and only then is the address it resolves to reachable; nothing else is.
#[test]
fn domain_entry_opens_when_the_container_resolves_it() {
    let mut h = e2e!();
    h.profile("e2e-named", "svc.e2e.test\n");
    let name = h.name("named");
    let mark = h.world.mark();
    let script = format!(
        "o=$(timeout 5 nc {NAMED4} 80 </dev/null 2>&1); echo \"BEFORE: $o\"\n\
         timeout 5 nslookup svc.e2e.test >/dev/null 2>&1\n{}",
        probe_script(&[(NAMED4, 80), (BLOCKED4, 80)])
    );
    let out = h.run_script(&name, "e2e-named", &script).expect_ok();
    let before = out
        .stdout
        .lines()
        .find(|l| l.starts_with("BEFORE:"))
        .unwrap_or_default()
        .to_string();
    assert!(
        !before.contains(banner(NAMED4.parse().unwrap(), 80).trim()),
        "the domain's address was open before any lookup: {out}"
    );
    assert!(
        h.world.dns_queries().iter().any(|q| q == "svc.e2e.test"),
        "the container's resolver did not ask the configured upstream_dns: {:?}",
        h.world.dns_queries()
    );
    let p = Probes::of(&out, &h.world, mark);
    p.reached(NAMED4, 80);
    p.refused_fast(BLOCKED4, 80);
}

/// The fake DNS server answers what the zone says (checked without any network).
#[test]
fn fake_dns_answers_match_the_zone() {
    // Query for svc.e2e.test A, id 0x1234, RD set.
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["svc", "e2e", "test"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let (name, reply) = dns_answer(&q).unwrap();
    assert_eq!(name, "svc.e2e.test");
    assert_eq!(&reply[0..2], &[0x12, 0x34]);
    assert_eq!(reply[3] & 0x0f, 0, "NOERROR");
    assert_eq!(u16::from_be_bytes([reply[6], reply[7]]), 1, "one answer");
    assert_eq!(&reply[reply.len() - 4..], &[198, 51, 100, 60]);
    // Unknown name: NXDOMAIN, no answer.
    let mut q2 = q.clone();
    q2[13] = b'x';
    let (_, reply) = dns_answer(&q2).unwrap();
    assert_eq!(reply[3] & 0x0f, 3);
    assert_eq!(u16::from_be_bytes([reply[6], reply[7]]), 0);
}

/// A port published with `-p` takes connections from the host while the shield is up; the
/// workload's egress stays filtered.
#[test]
fn published_port_takes_connections_through_the_shield() {
    let mut h = e2e!();
    h.profile("e2e-publish", &format!("{ALLOWED4}\n"));
    let name = h.name("publish");
    let serve = "echo RAN; i=0; while [ $i -lt 50 ]; do echo published-hello | nc -l -p 8080; i=$((i+1)); done";
    h.run_with(
        &name,
        "e2e-publish",
        &["-d", "-p", "127.0.0.1:47080:8080", IMAGE, "sh", "-c", serve],
    )
    .expect_ok();
    let state = h.state_json(&name);
    assert_eq!(
        state["published"],
        serde_json::json!(["8080/tcp"]),
        "{state}"
    );
    // Bounded retries: the listener starts right after the container does.
    let mut got = String::new();
    for _ in 0..20 {
        if let Ok(mut c) = std::net::TcpStream::connect_timeout(
            &"127.0.0.1:47080".parse().unwrap(),
            std::time::Duration::from_secs(2),
        ) {
            use std::io::Read;
            let _ = c.set_read_timeout(Some(std::time::Duration::from_secs(2)));
            let _ = c.read_to_string(&mut got);
            if got.contains("published-hello") {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(
        got.contains("published-hello"),
        "no answer through the published port: {got:?}"
    );
    let mark = h.world.mark();
    let out = h
        .exec(&name, &probe_script(&[(ALLOWED4, 80), (BLOCKED4, 80)]))
        .expect_ok();
    let p = Probes::of(&out, &h.world, mark);
    p.reached(ALLOWED4, 80);
    p.refused_fast(BLOCKED4, 80);
    h.podman(&["rm", "-f", &name]).expect_ok();
}
