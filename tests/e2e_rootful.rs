//! End-to-end: terok-shield as root with rootful podman (netavark bridge, aardvark-dns), and
//! the hook's check of the capabilities a container actually gets.
//!
//! The containers sit on a bridge network inside the fake internet (198.18.200.0/24, see
//! [`ROOTFUL_NET`]); their DNS server is aardvark-dns on the bridge gateway, a private
//! address that the shield's resolver must reach while the workload may not. podman runs in
//! a mount namespace whose /etc/resolv.conf names the world's DNS server, so aardvark-dns
//! forwards into the fake internet. Same world, lock and environment as the rootless suites
//! (`scripts/podman-env.sh`; docs/testing-e2e.md). Each test removes the system-wide hooks
//! that root's `run` installed, since the rootless suites refuse to run while they exist.

#[macro_use]
mod common;
use common::e2e;

use e2e::cmd::Out;
use e2e::world::*;
use e2e::{probe_script, Probes, Rootful, IMAGE, RAN, ROOTFUL_GATEWAY, ROOTFUL_NET};

/// The rootful harness, or return from the test (skip) when the environment is missing.
macro_rules! rootful {
    () => {
        match Rootful::start() {
            Some(r) => r,
            None => return,
        }
    };
}

/// From inside `name`: every `reached` target answers with its banner, every `refused` one is
/// refused at once and never reaches the world.
#[track_caller]
fn expect(r: &Rootful, name: &str, reached: &[(&str, u16)], refused: &[(&str, u16)]) {
    let targets: Vec<(&str, u16)> = reached.iter().chain(refused).copied().collect();
    let mark = r.world.mark();
    let out = r.exec(name, &probe_script(&targets)).expect_ok();
    let p = Probes::of(&out, &r.world, mark);
    for &(host, port) in reached {
        p.reached(host, port);
    }
    for &(host, port) in refused {
        p.refused_fast(host, port);
    }
}

/// `terok-shield run NAME --profiles P -- -d --network ROOTFUL_NET EXTRA... IMAGE sh -c SCRIPT`.
fn run_detached(r: &Rootful, name: &str, profiles: &str, extra: &[&str], script: &str) -> Out {
    let mut args = vec![
        "run",
        name,
        "--profiles",
        profiles,
        "--",
        "-d",
        "--network",
        ROOTFUL_NET,
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[IMAGE, "sh", "-c", script]);
    r.shield(&args)
}

/// Lines of `nslookup NAME [SERVER]` in the container that carry `addr`, as a count.
fn lookup(r: &Rootful, name: &str, query: &str, server: &str, addr: &str) -> usize {
    let out = r.exec(
        name,
        &format!("timeout 5 nslookup {query} {server} 2>&1 | grep -c {addr} || true"),
    );
    out.stdout.trim().parse().unwrap_or(0)
}

/// The whole life of a rootful shielded container: `run` (hooks installed system-wide), the
/// firewall enforced, DNS through the shield's resolver to aardvark-dns on the (private)
/// bridge gateway while the workload cannot reach the gateway itself, a published port open
/// from outside while an unpublished one is not, `status`, `rules`, every live command, and
/// `logs`.
#[test]
fn rootful_container_is_shielded_and_controlled_live() {
    let mut r = rootful!();
    r.profile("rootful", &format!("{ALLOWED4}\nsvc.e2e.test\n"));
    let name = r.name("life");
    let script = "nc -ll -p 8080 -e echo published-port & nc -ll -p 8081 -e echo unpublished-port & sleep 600";
    let out = run_detached(&r, &name, "rootful", &["-p", "18080:8080"], script).expect_ok();
    assert!(
        out.stderr.contains("/etc/containers/oci/hooks.d"),
        "root's first run names the system hooks it installed: {out}"
    );
    assert_eq!(r.shield_state(&name), "up");

    // DNS: the workload asks the shield's resolver, which asks aardvark-dns on the gateway.
    assert!(
        lookup(&r, &name, "svc.e2e.test", "", NAMED4) > 0,
        "an allowlisted name did not resolve through the resolver and aardvark-dns"
    );
    assert!(
        r.world.dns_queries().iter().any(|q| q == "svc.e2e.test"),
        "the question never reached the world's DNS server: {:?}",
        r.world.dns_queries()
    );
    assert_eq!(
        lookup(&r, &name, "svc.e2e.test", ROOTFUL_GATEWAY, NAMED4),
        0,
        "the workload queried aardvark-dns on the gateway directly"
    );
    expect(
        &r,
        &name,
        &[(ALLOWED4, 80), (NAMED4, 80)],
        &[(BLOCKED4, 80), (ROOTFUL_GATEWAY, 53), (ROOTFUL_GATEWAY, 80)],
    );

    // Published: in from the world through the host's port 18080. Not published: nothing.
    let published = e2e::cmd::run_bounded(
        "ip",
        &[
            "netns", "exec", WORLD_NS, "timeout", "5", "busybox", "nc", HOST_LINK4, "18080",
        ],
        e2e::SHORT,
    );
    assert!(
        published.stdout.contains("published-port"),
        "the published port did not answer from outside: {published}"
    );
    let address = r.address_of(&name);
    let unpublished = e2e::cmd::run_bounded(
        "timeout",
        &["3", "busybox", "nc", &address, "8081"],
        e2e::SHORT,
    );
    assert!(
        !unpublished.stdout.contains("unpublished-port"),
        "an unpublished port let a connection in: {unpublished}"
    );

    let rules = r.shield(&["rules", &name]).expect_ok();
    assert!(rules.stdout.contains("table inet terok_shield"), "{rules}");

    r.shield(&["allow", &name, BLOCKED4]).expect_ok();
    expect(&r, &name, &[(BLOCKED4, 80)], &[]);
    r.shield(&["deny", &name, BLOCKED4]).expect_ok();
    expect(&r, &name, &[(ALLOWED4, 80)], &[(BLOCKED4, 80)]);
    r.shield(&["down", &name]).expect_ok();
    assert_eq!(r.shield_state(&name), "down");
    expect(
        &r,
        &name,
        &[(REUSE_A, 80)],
        &[(BLOCKED4, 80), (ROOTFUL_GATEWAY, 80)],
    );
    r.shield(&["block", &name]).expect_ok();
    assert_eq!(r.shield_state(&name), "block");
    expect(&r, &name, &[], &[(ALLOWED4, 80)]);
    r.shield(&["up", &name]).expect_ok();
    r.shield(&["reset", &name]).expect_ok();
    assert_eq!(r.shield_state(&name), "up");
    expect(
        &r,
        &name,
        &[(ALLOWED4, 80)],
        &[(REUSE_A, 80), (BLOCKED4, 80)],
    );

    let logs = r
        .shield(&["logs", "--container", &name, "-n", "1000"])
        .expect_ok();
    for event in [
        "\"apply\"",
        "\"allow\"",
        "\"deny\"",
        "\"mode\"",
        "\"reset\"",
    ] {
        assert!(logs.stdout.contains(event), "no {event} event: {logs}");
    }
}

/// The static and dnsmasq tiers as root: names resolve through the bridge gateway's
/// aardvark-dns (static: before start, into the firewall; dnsmasq: per query, from its
/// fixed port), and what is not allowed stays refused.
#[test]
fn rootful_static_and_dnsmasq_tiers_resolve_through_the_gateway() {
    let mut r = rootful!();
    r.profile("rootful-dns", "svc.e2e.test\n");
    for tier in ["static", "dnsmasq"] {
        r.set_config(&format!(
            "# rootful e2e (removed afterwards)\naudit:\n  enabled: true\ndns:\n  tier: {tier}\n"
        ));
        let name = r.name(&format!("tier-{tier}"));
        run_detached(&r, &name, "rootful-dns", &[], "sleep 600").expect_ok();
        assert_eq!(r.shield_state(&name), "up", "{tier}");
        assert!(
            lookup(&r, &name, "svc.e2e.test", "", NAMED4) > 0,
            "{tier}: the allowlisted name did not resolve"
        );
        expect(
            &r,
            &name,
            &[(NAMED4, 80)],
            &[(BLOCKED4, 80), (ROOTFUL_GATEWAY, 80)],
        );
        r.podman(&["rm", "-f", "-t", "0", &name]).expect_ok();
    }
}

/// `prepare` + a hand-written `podman run $(flags)` with `--privileged` or `--cap-add
/// SYS_ADMIN`: nothing in podman stops them (`--privileged` even overrides the shield's
/// `--cap-drop`s; only `--cap-add NET_ADMIN` itself is refused by podman, which will not add
/// and drop one capability), so the hook does, from the container's OCI configuration.
#[test]
fn rootful_prepared_container_with_a_forbidden_capability_is_refused() {
    let mut r = rootful!();
    r.profile("rootful", &format!("{ALLOWED4}\n"));
    for (flag, cap) in [
        ("--privileged", "CAP_NET_ADMIN"),
        ("--cap-add=SYS_ADMIN", "CAP_SYS_ADMIN"),
    ] {
        let name = r.name(&format!("caps-{}", cap.to_lowercase().replace('_', "-")));
        let out = r
            .shield(&["prepare", &name, "--profiles", "rootful", "--json"])
            .expect_ok();
        let flags: Vec<String> = serde_json::from_str(out.stdout.trim()).expect("prepare --json");
        let mut args: Vec<&str> = vec!["run", "--rm", "--network", ROOTFUL_NET, flag];
        args.extend(flags.iter().map(String::as_str));
        let script = format!("echo {RAN}");
        args.extend_from_slice(&[IMAGE, "sh", "-c", &script]);
        let out = r.podman(&args).expect_fail();
        assert!(!out.stdout.contains(RAN), "{flag}: the workload ran: {out}");
        assert!(
            out.stderr.contains(cap) && out.stderr.contains("--cap-add"),
            "{flag}: podman does not show the hook's reason: {out}"
        );
        let log = std::fs::read_to_string(r.bundle_dir(&name).join("hook-error.log")).unwrap();
        assert!(log.contains(cap), "{log}");
    }
}

/// The same refusal under rootless podman (`prepare` as the test user).
#[test]
fn rootless_prepared_container_with_sys_admin_is_refused() {
    let mut h = e2e!();
    let name = h.name("caps-rootless");
    let flags = h.prepare(&name, "e2e-basic");
    let mut args: Vec<&str> = vec!["--rm", "--cap-add", "SYS_ADMIN"];
    args.extend_from_slice(&[IMAGE, "sh", "-c", "echo WORKLOAD-RAN"]);
    let out = h.podman_run_prepared(&flags, &args).expect_fail();
    assert!(!out.stdout.contains(RAN), "the workload ran: {out}");
    assert!(
        out.stderr.contains("CAP_SYS_ADMIN") && out.stderr.contains("--cap-add"),
        "podman does not show the hook's reason: {out}"
    );
    let failures = h.events(&name, "failure");
    assert!(
        failures
            .iter()
            .any(|f| f["detail"]["error"].to_string().contains("CAP_SYS_ADMIN")),
        "{failures:?}"
    );
}

/// `terok-shield pod create`: two containers started with a plain `podman run --pod` share
/// the pod's one shielded network namespace; live commands on the pod's name reach both; a
/// member holding a forbidden capability is refused; the pod's firewall and resolver go when
/// the pod stops.
#[test]
fn shielded_pod_members_share_the_policy_and_its_live_changes() {
    let mut h = e2e!();
    let pod = h.name("pod");
    let _ = h.podman(&["pod", "rm", "-f", "-t", "0", &pod]);
    let out = h
        .shield(&["pod", "create", &pod, "--profiles", "e2e-basic"])
        .expect_ok();
    assert!(out.stderr.contains("podman run --pod"), "{out}");
    let members = [h.name("pod-a"), h.name("pod-b")];
    for m in &members {
        h.podman(&[
            "run", "-d", "--pod", &pod, "--name", m, IMAGE, "sleep", "600",
        ])
        .expect_ok();
    }
    assert_eq!(h.shield_state(&pod), "up");
    let expect_all = |reached: &[(&str, u16)], refused: &[(&str, u16)]| {
        for m in &members {
            let targets: Vec<(&str, u16)> = reached.iter().chain(refused).copied().collect();
            let mark = h.world.mark();
            let out = h.exec(m, &probe_script(&targets)).expect_ok();
            let p = Probes::of(&out, &h.world, mark);
            for &(host, port) in reached {
                p.reached(host, port);
            }
            for &(host, port) in refused {
                p.refused_fast(host, port);
            }
        }
    };
    expect_all(&[(ALLOWED4, 80)], &[(BLOCKED4, 80)]);
    h.shield(&["allow", &pod, BLOCKED4]).expect_ok();
    expect_all(&[(ALLOWED4, 80), (BLOCKED4, 80)], &[]);
    h.shield(&["deny", &pod, BLOCKED4]).expect_ok();
    expect_all(&[(ALLOWED4, 80)], &[(BLOCKED4, 80)]);

    let rogue = h.name("pod-rogue");
    let out = h
        .podman(&[
            "run",
            "--rm",
            "--pod",
            &pod,
            "--name",
            &rogue,
            "--cap-add",
            "SYS_ADMIN",
            IMAGE,
            "sh",
            "-c",
            "echo WORKLOAD-RAN",
        ])
        .expect_fail();
    assert!(
        !out.stdout.contains(RAN) && out.stderr.contains("CAP_SYS_ADMIN"),
        "a pod member holding SYS_ADMIN was not refused: {out}"
    );

    // The firewall lives as long as the pod's namespace: stopping the pod ends its resolver
    // and runtime record; `status` then reports it inactive, not broken.
    h.podman(&["pod", "stop", "-t", "0", &pod]).expect_ok();
    let runtime = h.bundle_dir(&pod).join("runtime.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while runtime.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the pod stopped, but its runtime record (and resolver) stayed"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    h.podman(&["pod", "rm", "-f", "-t", "0", &pod]).expect_ok();
}
