//! End-to-end: the builtin DNS tier (`dns.tier: builtin`) in a real rootless container.
//!
//! The container asks the shield's per-container resolver (its resolv.conf points at
//! 127.0.0.1); allowed names are forwarded to the fake internet's DNS server and their
//! addresses become reachable; other names are refused without ever reaching upstream; the
//! workload cannot ask any DNS server directly. Needs root and scripts/podman-env.sh.

#[path = "e2e/mod.rs"]
mod e2e;

use e2e::world::*;
use e2e::{E2e, IMAGE};

macro_rules! e2e {
    () => {
        match E2e::start() {
            Some(h) => h,
            None => return,
        }
    };
}

const BUILTIN_CONFIG: &str = "# written by tests/e2e_dns.rs (restored afterwards)\n\
upstream_dns: 198.51.100.53\n\
dns:\n  tier: builtin\n";

#[test]
fn builtin_resolver_allows_listed_names_and_refuses_the_rest() {
    let mut h = e2e!();
    let conf = h.user.config_dir().join("config.yml");
    h.write_user_file(&conf, BUILTIN_CONFIG);
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
        .shield(&[
            "run",
            &name,
            "--profiles",
            "e2e-dns",
            "--",
            "--rm",
            IMAGE,
            "sh",
            "-c",
            &script,
        ])
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
