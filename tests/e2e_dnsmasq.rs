//! End-to-end: the dnsmasq DNS tier (`dns.tier: dnsmasq`) in a real rootless container.
//!
//! The same behaviour the builtin tier is tested for, where dnsmasq can give it: allowed
//! names resolve through the per-container dnsmasq and their addresses enter the learned set;
//! other names are refused without reaching upstream; the workload cannot ask a DNS server
//! directly, nor borrow dnsmasq's query port; live allow/deny of names reach dnsmasq; a dead
//! dnsmasq fails closed and `status` says error. Needs root, dnsmasq and
//! scripts/podman-env.sh.

#[macro_use]
mod common;
use common::e2e;

use e2e::world::*;
use e2e::{dns_config, set_elements, E2e};

/// dnsmasq's query port (`terok_shield::core::dnsmasq::QUERY_PORT`).
const QUERY_PORT: u16 = 53_053;

fn count_line(stdout: &str, label: &str) -> Option<u32> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(label))
        .and_then(|v| v.trim().parse().ok())
}

/// Try to bind dnsmasq's query port (IPv4 and IPv6 wildcard, with SO_REUSEADDR) inside the
/// container's network namespace, as any socket of the workload could (busybox has no UDP
/// tool that binds a chosen port). Returns "in use" or "bound" per family.
fn try_bind_query_port(h: &E2e, name: &str) -> String {
    let pid = h
        .podman(&["inspect", "-f", "{{.State.Pid}}", name])
        .expect_ok()
        .stdout
        .trim()
        .to_string();
    let script = format!(
        "import socket\nr=[]\nfor fam, a in ((socket.AF_INET, '0.0.0.0'), (socket.AF_INET6, '::')):\n    s = socket.socket(fam, socket.SOCK_DGRAM)\n    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n    try:\n        s.bind((a, {QUERY_PORT})); r.append('bound')\n    except OSError:\n        r.append('in use')\nprint(', '.join(r))\n"
    );
    let out = std::process::Command::new("nsenter")
        .args(["-t", &pid, "-n", "python3", "-c", &script])
        .output()
        .expect("nsenter runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn dnsmasq_tier_allows_listed_names_and_refuses_the_rest() {
    let mut h = e2e!();
    h.set_config(&dns_config("dnsmasq", "  max_ttl: 600\n"));
    h.profile(
        "e2e-dnsmasq",
        "# dnsmasq DNS tier\nsvc.e2e.test\npair.e2e.test:443\n",
    );
    let name = h.name("dnsmasq");
    h.run_detached(&name, "e2e-dnsmasq").expect_ok();
    let status = h.shield(&["status", &name]).expect_ok();
    assert!(status.stdout.contains("dnsmasq"), "{status}");
    assert_eq!(h.shield_state(&name), "up");
    let script = format!(
        "grep nameserver /etc/resolv.conf\n\
         echo \"ALLOWED: $(timeout 5 nslookup svc.e2e.test 2>&1 | grep -c {NAMED4})\"\n\
         o=$(timeout 5 nc {NAMED4} 80 </dev/null 2>&1); echo \"CONNECT: $o\"\n\
         echo \"REFUSED: $(timeout 5 nslookup dual.e2e.test 2>&1 | grep -c 198.51.100.50)\"\n\
         echo \"SCOPED: $(timeout 5 nslookup pair.e2e.test 2>&1 | grep -c 198.51.100.7)\"\n\
         o=$(timeout 5 nc {PAIR4} 443 </dev/null 2>&1); echo \"SCOPED443: $o\"\n\
         o=$(timeout 5 nc {PAIR4} 80 </dev/null 2>&1); echo \"SCOPED80: rc=$? $o\"\n\
         echo \"DIRECT: $(timeout 5 nslookup svc.e2e.test {DNS4} 2>&1 | grep -c {NAMED4})\"\n"
    );
    let out = h.exec(&name, &script);
    assert!(
        out.stdout.contains("nameserver 127.0.0.1"),
        "resolv.conf not pointed at dnsmasq: {out}"
    );
    assert_eq!(count_line(&out.stdout, "ALLOWED:"), Some(1), "{out}");
    let named = banner(NAMED4.parse().unwrap(), 80);
    assert!(
        out.stdout.contains(named.trim()),
        "the learned address was not reachable: {out}"
    );
    assert_eq!(count_line(&out.stdout, "REFUSED:"), Some(0), "{out}");
    // A port-scoped name resolves; its port opens for the address resolved before start, and
    // nothing else of that host does.
    assert_eq!(count_line(&out.stdout, "SCOPED:"), Some(2), "{out}");
    assert!(
        out.stdout
            .contains(banner(PAIR4.parse().unwrap(), 443).trim()),
        "the scoped port was not reachable: {out}"
    );
    assert!(
        !out.stdout
            .contains(banner(PAIR4.parse().unwrap(), 80).trim()),
        "a port the scope does not name was reachable: {out}"
    );
    assert_eq!(
        count_line(&out.stdout, "DIRECT:"),
        Some(0),
        "the workload reached a DNS server directly: {out}"
    );
    assert_eq!(
        try_bind_query_port(&h, &name),
        "in use, in use",
        "a socket in the container could take dnsmasq's query port"
    );
    // nftset put the answer into the learned set, with the set's default timeout.
    let rules = h.rules_json(&name);
    assert!(
        set_elements(&rules, "dns_v4")
            .iter()
            .any(|e| e.contains(NAMED4)),
        "{NAMED4} not in dns_v4: {rules}"
    );
    let dns_v4 = set_elements(&rules, "dns_v4");
    assert!(
        !dns_v4.iter().any(|e| e.contains(PAIR4)),
        "a port-scoped name's address was learned for every port: {dns_v4:?}"
    );
    assert!(
        set_elements(&rules, "scoped_names_v4")
            .iter()
            .any(|e| e.contains(PAIR4)),
        "{rules}"
    );
    let queries = h.world.dns_queries();
    assert!(
        queries.iter().any(|q| q.contains("svc.e2e.test")),
        "upstream never saw the allowed name: {queries:?}"
    );
    assert!(
        !queries.iter().any(|q| q.contains("dual.e2e.test")),
        "a refused name reached upstream: {queries:?}"
    );
    h.podman(&["rm", "-f", &name]).expect_ok();
}

#[test]
fn dnsmasq_tier_wildcards_skip_the_apex_and_live_changes_reach_dnsmasq() {
    let mut h = e2e!();
    h.set_config(&dns_config("dnsmasq", "  max_ttl: 600\n"));
    h.profile("e2e-dnsmasq-wild", "*.svc.e2e.test\n");
    let name = h.name("dnsmasq-wild");
    h.run_detached(&name, "e2e-dnsmasq-wild").expect_ok();
    let ask = |h: &E2e, q: &str, want: &str| -> u32 {
        let out = h.exec(
            &name,
            &format!("echo \"N: $(timeout 5 nslookup {q} 2>&1 | grep -c {want})\""),
        );
        count_line(&out.stdout, "N:").unwrap_or_else(|| panic!("{out}"))
    };
    assert_eq!(ask(&h, "svc.e2e.test", NAMED4), 0, "the apex was answered");
    assert!(
        !h.world.dns_queries().iter().any(|q| q == "svc.e2e.test"),
        "the apex reached upstream"
    );
    assert_eq!(ask(&h, "pair.e2e.test", "198.51.100.7"), 0);
    // Live allow: dnsmasq forwards the name from now on.
    h.shield(&["allow", &name, "pair.e2e.test"]).expect_ok();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(ask(&h, "pair.e2e.test", "198.51.100.7"), 2);
    let learned = |h: &E2e| set_elements(&h.rules_json(&name), "dns_v4");
    assert!(
        learned(&h).iter().any(|e| e.contains(PAIR4)),
        "{:?}",
        learned(&h)
    );
    // Live deny: refused again, never forwarded after the deny, and the addresses that name
    // brought leave the learned set (dnsmasq's log told the supervisor who brought what).
    h.shield(&["deny", &name, "pair.e2e.test"]).expect_ok();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let before = h
        .world
        .dns_queries()
        .iter()
        .filter(|q| *q == "pair.e2e.test")
        .count();
    assert_eq!(ask(&h, "pair.e2e.test", "198.51.100.7"), 0);
    let after = h
        .world
        .dns_queries()
        .iter()
        .filter(|q| *q == "pair.e2e.test")
        .count();
    assert_eq!(before, after, "a denied name reached upstream");
    let left = learned(&h);
    assert!(
        !left
            .iter()
            .any(|e| e.contains(PAIR4) || e.contains(SHARED4)),
        "deny left the name's learned addresses: {left:?}"
    );
    // A port-scoped name cannot be enforced by dnsmasq: refused, nothing changed.
    let scoped = h.shield(&["allow", &name, "shared.e2e.test:443"]);
    assert!(!scoped.ok(), "{scoped}");
    assert!(scoped.stderr.contains("builtin"), "{scoped}");
    h.podman(&["rm", "-f", &name]).expect_ok();
}

#[test]
fn a_dead_dnsmasq_fails_closed_and_status_says_error() {
    let mut h = e2e!();
    h.set_config(&dns_config("dnsmasq", "  max_ttl: 600\n"));
    h.profile("e2e-dnsmasq-dead", "svc.e2e.test\n");
    let name = h.name("dnsmasq-dead");
    h.run_detached(&name, "e2e-dnsmasq-dead").expect_ok();
    let out = h.exec(&name, "timeout 5 nslookup svc.e2e.test").expect_ok();
    assert!(out.stdout.contains(NAMED4), "{out}");
    assert!(
        h.rules_json(&name)
            .to_string()
            .contains(&QUERY_PORT.to_string()),
        "no query-port rule while dnsmasq runs"
    );
    let dir = h.bundle_dir(&name);
    let killed = std::process::Command::new("pkill")
        .args([
            "-KILL",
            "-f",
            &format!("dnsmasq .*--servers-file={}/", dir.display()),
        ])
        .status()
        .unwrap();
    assert!(killed.success(), "no dnsmasq found for {}", dir.display());
    std::thread::sleep(std::time::Duration::from_millis(300));
    let out = h.exec(
        &name,
        &format!(
            "echo \"AFTER: $(timeout 5 nslookup svc.e2e.test 2>&1 | grep -c {NAMED4})\"\n\
             echo \"DIRECT: $(timeout 5 nslookup svc.e2e.test {DNS4} 2>&1 | grep -c {NAMED4})\"\n"
        ),
    );
    assert_eq!(
        count_line(&out.stdout, "AFTER:"),
        Some(0),
        "DNS still answered without dnsmasq: {out}"
    );
    assert_eq!(count_line(&out.stdout, "DIRECT:"), Some(0), "{out}");
    assert_eq!(
        try_bind_query_port(&h, &name),
        "in use, in use",
        "the query port was free after dnsmasq died"
    );
    assert_eq!(h.shield_state(&name), "error");
    // The supervisor also took the query-port rule out of the live firewall.
    let rules = h.rules_json(&name).to_string();
    assert!(
        !rules.contains(&QUERY_PORT.to_string()),
        "the query-port rule is still in the firewall: {rules}"
    );
    h.podman(&["rm", "-f", &name]).expect_ok();
}

/// The bundled profiles (port-scoped NTP names included) start under dnsmasq: their names are
/// forwarded upstream, other names are refused locally.
#[test]
fn bundled_profiles_start_under_the_dnsmasq_tier() {
    let mut h = e2e!();
    h.set_config(&dns_config("dnsmasq", "  max_ttl: 600\n"));
    let name = h.name("dnsmasq-bundled");
    h.run_detached(&name, "base,dev-standard").expect_ok();
    assert_eq!(h.shield_state(&name), "up");
    let out = h.exec(
        &name,
        "timeout 5 nslookup api.github.com; timeout 5 nslookup pool.ntp.org; timeout 5 nslookup not-listed.example; true",
    );
    let queries = h.world.dns_queries();
    for listed in ["api.github.com", "pool.ntp.org"] {
        assert!(
            queries.iter().any(|q| q == listed),
            "{listed} was not forwarded: {queries:?} {out}"
        );
    }
    assert!(
        !queries.iter().any(|q| q == "not-listed.example"),
        "an unlisted name reached upstream: {queries:?}"
    );
    h.podman(&["rm", "-f", &name]).expect_ok();
}
