//! End-to-end: the builtin DNS tier (`dns.tier: builtin`) in a real rootless container.
//!
//! The container asks the shield's per-container resolver (its resolv.conf points at
//! 127.0.0.1); allowed names are forwarded to the fake internet's DNS server and their
//! addresses become reachable; other names are refused without ever reaching upstream; the
//! workload cannot ask any DNS server directly. Needs root and scripts/podman-env.sh.

#[macro_use]
mod common;
use common::e2e;

use e2e::world::*;
use e2e::{dns_config, IMAGE};

#[test]
fn builtin_resolver_allows_listed_names_and_refuses_the_rest() {
    let mut h = e2e!();
    h.set_config(&dns_config("builtin", ""));
    h.profile("e2e-dns", "# builtin DNS tier\nsvc.e2e.test\n");
    let name = h.name("dns-builtin");
    let script = format!(
        "echo RAN\n\
         cat /etc/resolv.conf | grep nameserver\n\
         echo \"ALLOWED: $(timeout 5 nslookup svc.e2e.test 2>&1 | grep -c {NAMED4})\"\n\
         o=$(timeout 5 nc {NAMED4} 80 </dev/null 2>&1); echo \"CONNECT: $o\"\n\
         echo \"REFUSED: $(timeout 5 nslookup pair.e2e.test 2>&1 | grep -c 198.51.100.7)\"\n\
         echo \"DIRECT: $(timeout 5 nslookup svc.e2e.test {DNS4} 2>&1 | grep -c {NAMED4})\"\n"
    );
    let out = h
        .run_with(&name, "e2e-dns", &["--rm", IMAGE, "sh", "-c", &script])
        .expect_ok();
    assert!(out.stdout.contains("RAN"), "{out}");
    assert!(
        out.stdout.contains("nameserver 127.0.0.1"),
        "resolv.conf not pointed at the resolver: {out}"
    );
    assert!(
        out.stdout.contains("ALLOWED: 1"),
        "the allowed name did not resolve: {out}"
    );
    let banner = banner(NAMED4.parse().unwrap(), 80);
    assert!(
        out.stdout.contains(banner.trim()),
        "the learned address was not reachable: {out}"
    );
    assert!(
        out.stdout.contains("REFUSED: 0"),
        "a name outside the allowlist resolved: {out}"
    );
    assert!(
        out.stdout.contains("DIRECT: 0"),
        "the workload reached a DNS server directly: {out}"
    );
    let queries = h.world.dns_queries();
    assert!(
        queries.iter().any(|q| q.contains("svc.e2e.test")),
        "upstream never saw the allowed name: {queries:?}"
    );
    assert!(
        !queries.iter().any(|q| q.contains("pair.e2e.test")),
        "a refused name reached upstream: {queries:?}"
    );
    let applied = h.events(&name, "apply");
    assert_eq!(applied.len(), 1, "{applied:?}");
}

#[test]
fn wildcard_allows_subdomains_but_not_the_apex() {
    let mut h = e2e!();
    h.set_config(&dns_config("builtin", ""));
    h.profile("e2e-dns-wild", "*.e2e.test\n");
    let name = h.name("dns-wild");
    let script = format!(
        "echo RAN\n\
         echo \"SUB: $(timeout 5 nslookup svc.e2e.test 2>&1 | grep -c {NAMED4})\"\n\
         o=$(timeout 5 nc {NAMED4} 80 </dev/null 2>&1); echo \"CONNECT: $o\"\n\
         echo \"APEX: $(timeout 5 nslookup e2e.test 2>&1 | grep -ci 'refused\\|can.t resolve\\|server can')\"\n"
    );
    let out = h
        .run_with(&name, "e2e-dns-wild", &["--rm", IMAGE, "sh", "-c", &script])
        .expect_ok();
    assert!(
        out.stdout.contains("SUB: 1"),
        "a subdomain of the wildcard did not resolve: {out}"
    );
    let banner = banner(NAMED4.parse().unwrap(), 80);
    assert!(
        out.stdout.contains(banner.trim()),
        "the learned address was not reachable: {out}"
    );
    assert!(
        !out.stdout.contains("APEX: 0"),
        "the apex was answered: {out}"
    );
    let queries = h.world.dns_queries();
    assert!(queries.iter().any(|q| q == "svc.e2e.test"), "{queries:?}");
    assert!(
        !queries.iter().any(|q| q == "e2e.test"),
        "the apex reached upstream: {queries:?}"
    );
}

#[test]
fn a_dead_resolver_fails_closed_and_status_says_error() {
    let mut h = e2e!();
    h.set_config(&dns_config("builtin", ""));
    h.profile("e2e-dns-dead", "svc.e2e.test\n");
    let name = h.name("dns-dead");
    h.run_detached(&name, "e2e-dns-dead").expect_ok();
    let out = h.exec(&name, "timeout 5 nslookup svc.e2e.test").expect_ok();
    assert!(out.stdout.contains(NAMED4), "{out}");
    assert_eq!(h.shield_state(&name), "up");
    // Kill exactly this container's resolver (its command line names the bundle dir).
    let dir = h.bundle_dir(&name);
    let killed = std::process::Command::new("pkill")
        .args([
            "-KILL",
            "-f",
            &format!("internal-resolver {}", dir.display()),
        ])
        .status()
        .unwrap();
    assert!(
        killed.success(),
        "no resolver process found for {}",
        dir.display()
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    let out = h.exec(
        &name,
        &format!(
            "echo \"AFTER: $(timeout 5 nslookup svc.e2e.test 2>&1 | grep -c {NAMED4})\"\n\
             echo \"DIRECT: $(timeout 5 nslookup svc.e2e.test {DNS4} 2>&1 | grep -c {NAMED4})\"\n"
        ),
    );
    assert!(
        out.stdout.contains("AFTER: 0"),
        "DNS still answered without the resolver: {out}"
    );
    assert!(
        out.stdout.contains("DIRECT: 0"),
        "the workload reached the upstream directly: {out}"
    );
    assert_eq!(h.shield_state(&name), "error");
}
