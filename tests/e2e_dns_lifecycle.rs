//! End-to-end: the per-container resolver lives exactly as long as its container, in both
//! resolver tiers. Stopping the container (poststop) stops the resolver (and dnsmasq); a
//! restart brings a new one that answers again; nothing is left behind. Needs root, dnsmasq
//! and scripts/podman-env.sh.

#[macro_use]
mod common;
use common::e2e;

use std::path::Path;
use std::time::{Duration, Instant};

use e2e::world::*;
use e2e::E2e;

/// PIDs of processes whose command line contains `needle`.
fn pids_matching(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// Wait (bounded) until no process matches `needle`; returns what still matches.
fn gone_within(needle: &str, limit: Duration) -> Vec<u32> {
    let deadline = Instant::now() + limit;
    loop {
        let left = pids_matching(needle);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lifecycle(tier: &str, tag: &str) {
    let mut h = e2e!();
    h.set_config(&format!(
        "# written by tests/e2e_dns_lifecycle.rs (restored afterwards)\n\
             upstream_dns: 198.51.100.53\ndns:\n  tier: {tier}\n"
    ));
    h.profile("e2e-lifecycle", "svc.e2e.test\n");
    // `run` installs the hooks, so `podman start` brings the firewall (and resolver) back.
    let name = h.name(tag);
    h.run_detached(&name, "e2e-lifecycle").expect_ok();
    let dir = h.bundle_dir(&name);
    let resolver = format!("internal-resolver {}", dir.display());
    let dnsmasq = format!(
        "--servers-file={}",
        Path::new(&dir).join("dnsmasq.servers").display()
    );
    let first = pids_matching(&resolver);
    assert_eq!(first.len(), 1, "one resolver per container: {first:?}");
    if tier == "dnsmasq" {
        assert_eq!(pids_matching(&dnsmasq).len(), 1, "one dnsmasq");
    }
    let ask = |h: &E2e| {
        h.exec(
            &name,
            &format!("echo \"N: $(timeout 5 nslookup svc.e2e.test 2>&1 | grep -c {NAMED4})\""),
        )
    };
    assert!(ask(&h).stdout.contains("N: 1"));

    h.podman(&["stop", "-t", "1", &name]).expect_ok();
    assert_eq!(
        gone_within(&resolver, Duration::from_secs(3)),
        Vec::<u32>::new(),
        "the resolver outlived its container"
    );
    assert_eq!(
        gone_within(&dnsmasq, Duration::from_secs(3)),
        Vec::<u32>::new(),
        "dnsmasq outlived its container"
    );
    assert_eq!(h.shield_state(&name), "inactive");

    h.podman(&["start", &name]).expect_ok();
    let second = pids_matching(&resolver);
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(first, second, "the restart reused a stale resolver");
    assert_eq!(h.shield_state(&name), "up");
    assert!(
        ask(&h).stdout.contains("N: 1"),
        "no answer after the restart"
    );

    h.podman(&["rm", "-f", &name]).expect_ok();
    assert_eq!(
        gone_within(&resolver, Duration::from_secs(3)),
        Vec::<u32>::new()
    );
    assert_eq!(
        gone_within(&dnsmasq, Duration::from_secs(3)),
        Vec::<u32>::new()
    );
}

#[test]
fn builtin_resolver_lives_and_dies_with_its_container() {
    lifecycle("builtin", "life-builtin");
}

#[test]
fn dnsmasq_lives_and_dies_with_its_container() {
    lifecycle("dnsmasq", "life-dnsmasq");
}
