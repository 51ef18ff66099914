//! End-to-end: the static DNS tier (`dns.tier: static`), no longer the default: names are
//! resolved once before start (through `upstream_dns`, the fake internet's DNS server), no
//! resolver runs in the container and its resolv.conf is left alone. Needs root and
//! scripts/podman-env.sh.

#[macro_use]
mod common;
use common::e2e;

use e2e::world::*;
use e2e::{dns_config, set_elements};

#[test]
fn static_tier_resolves_before_start_and_runs_no_resolver() {
    let mut h = e2e!();
    h.set_config(&dns_config("static", ""));
    h.profile("e2e-static", "svc.e2e.test\n");
    let name = h.name("dns-static");
    h.run_detached(&name, "e2e-static").expect_ok();
    let status = h.shield(&["status", &name]).expect_ok();
    assert!(status.stdout.contains("static"), "{status}");
    assert_eq!(h.shield_state(&name), "up");
    let state = h.state_json(&name);
    assert_eq!(state["dns_tier"], "static", "{state}");
    assert!(
        state["resolved"]["svc.e2e.test"]["addrs"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == NAMED4)),
        "{state}"
    );
    let out = h.exec(
        &name,
        &format!(
            "grep nameserver /etc/resolv.conf\n\
             o=$(timeout 5 nc {NAMED4} 80 </dev/null 2>&1); echo \"CONNECT: $o\"\n"
        ),
    );
    assert!(
        !out.stdout.contains("nameserver 127.0.0.1"),
        "resolv.conf was redirected although no resolver runs: {out}"
    );
    assert!(
        out.stdout
            .contains(banner(NAMED4.parse().unwrap(), 80).trim()),
        "the address resolved before start was not reachable: {out}"
    );
    let dir = h.bundle_dir(&name);
    let resolver = std::process::Command::new("pgrep")
        .args(["-f", &format!("internal-resolver {}", dir.display())])
        .output()
        .unwrap();
    assert!(
        !resolver.status.success(),
        "a resolver runs in the static tier"
    );
    assert!(set_elements(&h.rules_json(&name), "dns_v4").is_empty());
    h.podman(&["rm", "-f", &name]).expect_ok();
}
