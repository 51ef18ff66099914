//! End-to-end: with no `upstream_dns` configured, the container's resolver (both resolver
//! tiers) forwards to the DNS server the container would have used: slirp4netns' 10.0.2.3,
//! which relays to the nameserver in the resolv.conf that rootless Podman's pause process sees.
//!
//! To keep DNS inside the fake internet, the test restarts the user's pause process (`podman
//! system migrate`) inside a mount namespace whose /etc/resolv.conf names the world's DNS
//! server (198.51.100.53), and restarts it again afterwards so later runs see the host's
//! file. Needs root, dnsmasq and scripts/podman-env.sh.

#[macro_use]
mod common;
use common::e2e;

use std::time::Duration;

use e2e::world::*;
use e2e::{as_user, E2e};

const FAKE_RESOLV: &str = "/tmp/terok-shield-e2e/slirp-resolv.conf";

/// Restarts the pause process (so it forgets the fake resolv.conf) when dropped.
struct PauseReset<'a>(&'a E2e);

impl Drop for PauseReset<'_> {
    fn drop(&mut self) {
        let _ = as_user(
            &self.0.user,
            &[],
            "podman",
            &["system", "migrate"],
            Duration::from_secs(60),
        );
    }
}

/// Start a fresh pause process that sees FAKE_RESOLV as /etc/resolv.conf.
fn pause_with_fake_resolv(h: &E2e) -> PauseReset<'_> {
    std::fs::create_dir_all("/tmp/terok-shield-e2e").unwrap();
    std::fs::write(
        FAKE_RESOLV,
        format!("# terok-shield e2e: slirp4netns relays DNS here\nnameserver {DNS4}\n"),
    )
    .unwrap();
    let reset = PauseReset(h);
    as_user(
        &h.user,
        &[],
        "podman",
        &["system", "migrate"],
        Duration::from_secs(60),
    )
    .expect_ok();
    let script = format!(
        "mount --make-rprivate / && mount --bind {FAKE_RESOLV} /etc/resolv.conf && \
         exec runuser -u {user} -- env -i HOME={home} XDG_RUNTIME_DIR={rt} \
         PATH=/usr/sbin:/usr/bin:/sbin:/bin podman unshare true",
        user = e2e::USER,
        home = h.user.home.display(),
        rt = h.user.runtime_dir(),
    );
    e2e::cmd::run(
        "unshare",
        &["-m", "sh", "-c", &script],
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("cannot start the pause process: {e}"));
    let seen = as_user(
        &h.user,
        &[],
        "podman",
        &["unshare", "cat", "/etc/resolv.conf"],
        Duration::from_secs(30),
    )
    .expect_ok();
    assert!(
        seen.stdout.contains(&format!("nameserver {DNS4}")),
        "the pause process does not see the fake resolv.conf: {seen}"
    );
    reset
}

fn forwards_to_slirp(tier: &str) {
    let mut h = e2e!();
    h.set_config(&format!(
        "# written by tests/e2e_dns_slirp.rs (restored afterwards)\ndns:\n  tier: {tier}\n"
    ));
    h.profile("e2e-slirp", "svc.e2e.test\n");
    let name = h.name(&format!("slirp-{tier}"));
    let _reset = pause_with_fake_resolv(&h);
    let asked = h.world.dns_queries().len();
    h.run_detached(&name, "e2e-slirp").expect_ok();
    let runtime = h.read(&h.bundle_dir(&name).join("runtime.json"));
    assert!(
        runtime.contains("10.0.2.3"),
        "the hook did not find slirp4netns' DNS server: {runtime}"
    );
    let out = h.exec(
        &name,
        &format!(
            "echo \"N: $(timeout 5 nslookup svc.e2e.test 2>&1 | grep -c {NAMED4})\"\n\
             o=$(timeout 5 nc {NAMED4} 80 </dev/null 2>&1); echo \"CONNECT: $o\"\n\
             echo \"DIRECT: $(timeout 5 nslookup svc.e2e.test 10.0.2.3 2>&1 | grep -c {NAMED4})\"\n"
        ),
    );
    assert!(out.stdout.contains("N: 1"), "{out}");
    assert!(
        out.stdout
            .contains(banner(NAMED4.parse().unwrap(), 80).trim()),
        "{out}"
    );
    assert!(
        out.stdout.contains("DIRECT: 0"),
        "the workload reached slirp4netns' DNS itself: {out}"
    );
    assert!(
        h.world.dns_queries()[asked..]
            .iter()
            .any(|q| q == "svc.e2e.test"),
        "the question did not arrive through slirp4netns"
    );
    h.podman(&["rm", "-f", &name]).expect_ok();
}

#[test]
fn builtin_resolver_forwards_to_slirp4netns_dns_by_default() {
    forwards_to_slirp("builtin");
}

#[test]
fn dnsmasq_forwards_to_slirp4netns_dns_by_default() {
    forwards_to_slirp("dnsmasq");
}
