//! End-to-end: `deny DOMAIN` in the builtin DNS tier removes exactly the addresses the
//! resolver learned for that name (not those another allowed name also brought), and the
//! resolver refuses the name from then on. Needs root and scripts/podman-env.sh.

#[macro_use]
mod common;
use common::e2e;

use e2e::world::*;
use e2e::{dns_config, probe_script, Probes};

#[test]
fn deny_domain_removes_exactly_what_the_resolver_learned_for_it() {
    let mut h = e2e!();
    h.set_config(&dns_config("builtin", ""));
    h.profile("e2e-dns-deny", "pair.e2e.test\nshared.e2e.test\n");
    let name = h.name("dns-deny");
    h.run_detached(&name, "e2e-dns-deny").expect_ok();

    // Learn both names' addresses through the container's resolver.
    let out = h
        .exec(
            &name,
            "timeout 5 nslookup pair.e2e.test; timeout 5 nslookup shared.e2e.test",
        )
        .expect_ok();
    assert!(
        out.stdout.contains(PAIR4) && out.stdout.contains(SHARED4),
        "{out}"
    );
    let mark = h.world.mark();
    let out = h
        .exec(&name, &probe_script(&[(PAIR4, 80), (SHARED4, 80)]))
        .expect_ok();
    let p = Probes::of(&out, &h.world, mark);
    p.reached(PAIR4, 80);
    p.reached(SHARED4, 80);
    let learned = h.read(&h.bundle_dir(&name).join("learned.jsonl"));
    assert!(
        learned.contains("\"domain\":\"pair.e2e.test\""),
        "{learned}"
    );

    h.shield(&["deny", &name, "pair.e2e.test"]).expect_ok();
    let queries_before = h.world.dns_queries().len();
    let mark = h.world.mark();
    let script = format!(
        "echo \"LOOKUP: $(timeout 5 nslookup pair.e2e.test 2>&1 | grep -c {PAIR4})\"\n{}",
        probe_script(&[(PAIR4, 80), (SHARED4, 80)])
    );
    let out = h.exec(&name, &script).expect_ok();
    let p = Probes::of(&out, &h.world, mark);
    p.refused_fast(PAIR4, 80);
    p.reached(SHARED4, 80);
    assert!(
        out.stdout.contains("LOOKUP: 0"),
        "the denied name still resolves: {out}"
    );
    assert_eq!(
        h.world.dns_queries().len(),
        queries_before,
        "the denied name was forwarded upstream"
    );
    assert_eq!(h.shield_state(&name), "up");
}
