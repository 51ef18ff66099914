//! End-to-end: live control of a running rootless container (`allow`, `deny`, `down`, `up`,
//! `block`, `quarantine`, `reset`), checked from inside the container with real connections
//! to the fake internet.
//!
//! Same harness and environment as `tests/e2e_podman.rs` (see docs/testing-e2e.md): each test
//! starts a detached shielded container (`terok-shield run NAME -- -d IMAGE sleep 600`), and
//! probes it with `podman exec`. Long-lived connections go to the world's streaming port
//! ([`STREAM_PORT`]); a reader inside the container stamps every line it receives with the
//! container's clock, so the tests can tell exactly when a stream stopped.

#[macro_use]
mod common;
use common::e2e;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use e2e::cmd::Out;
use e2e::world::*;
use e2e::{dns_config, probe_script, set_elements, E2e, Probes, CREATE_RUNTIME_JSON};

/// From inside `name`: every `reached` target answers with its banner, every `refused` one is
/// refused at once and never reaches the world.
#[track_caller]
fn expect(h: &E2e, name: &str, reached: &[(&str, u16)], refused: &[(&str, u16)]) {
    let targets: Vec<(&str, u16)> = reached.iter().chain(refused).copied().collect();
    let mark = h.world.mark();
    let out = h.exec(name, &probe_script(&targets)).expect_ok();
    let p = Probes::of(&out, &h.world, mark);
    for &(host, port) in reached {
        p.reached(host, port);
    }
    for &(host, port) in refused {
        p.refused_fast(host, port);
    }
}

/// The targets of a bundle list (`live_allow`, `live_deny`) as strings.
fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a JSON array: {v}"))
        .iter()
        .map(|t| {
            t.as_str()
                .unwrap_or_else(|| panic!("not a string: {t}"))
                .to_string()
        })
        .collect()
}

/// Profile used by most tests: two IPv4 hosts and one IPv6 host, no networks (so the
/// allow_v4 set holds exactly the single addresses).
const LIVE_PROFILE: &str =
    "# e2e_live: single hosts only\n198.51.100.10\n198.51.100.30\n2001:db8::10\n";

/// A fresh container `e2e-TAG` running with [`LIVE_PROFILE`], shield up.
fn live_container(h: &mut E2e, tag: &str) -> String {
    h.profile("e2e-live", LIVE_PROFILE);
    let name = h.name(tag);
    h.run_detached(&name, "e2e-live").expect_ok();
    assert_eq!(h.shield_state(&name), "up", "a fresh container");
    name
}

// ---------------------------------------------------------------------------------------
// allow
// ---------------------------------------------------------------------------------------

#[test]
fn allow_ip_cidr_and_port_open_exactly_what_they_name() {
    let mut h = e2e!();
    let name = live_container(&mut h, "allow");
    expect(
        &h,
        &name,
        &[(ALLOWED4, 80)],
        &[
            (BLOCKED4, 80),
            (LIVE4, 80),
            (REUSE_B, 443),
            (REUSE_B, 80),
            (BLOCKED6, 80),
        ],
    );

    let out = h.shield(&["allow", &name, BLOCKED4]).expect_ok();
    assert_eq!(
        out.stdout,
        format!("Allowed {BLOCKED4} -> {BLOCKED4} for {name}\n"),
        "{out}"
    );
    // A single address goes straight into the hash set over netlink; a network takes the
    // nft path (interval sets are rewritten whole).
    let last_path = |h: &E2e| {
        h.events(&name, "allow")
            .last()
            .map(|e| e["detail"]["path"].clone())
    };
    assert_eq!(last_path(&h), Some(Value::from("netlink")));
    let out = h.shield(&["allow", &name, "198.51.100.48/30"]).expect_ok();
    assert_eq!(last_path(&h), Some(Value::from("nft")));
    assert_eq!(
        out.stdout,
        format!("Allowed 198.51.100.48/30 -> 198.51.100.48/30 for {name}\n"),
        "{out}"
    );
    let out = h.shield(&["allow", &name, BLOCKED6]).expect_ok();
    assert_eq!(
        out.stdout,
        format!("Allowed {BLOCKED6} -> {BLOCKED6} for {name}\n"),
        "{out}"
    );
    let scoped = format!("{REUSE_B}:443/tcp");
    let out = h.shield(&["allow", &name, &scoped, "--json"]).expect_ok();
    let v: Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("allow --json is not JSON ({e}): {out}"));
    assert_eq!(
        v,
        serde_json::json!({
            "container": name,
            "action": "allow",
            "target": scoped,
            "addresses": [REUSE_B],
            "mode": "up",
        }),
        "{out}"
    );
    assert_eq!(out.stdout.lines().count(), 1, "one JSON line: {out}");

    expect(
        &h,
        &name,
        &[
            (ALLOWED4, 80),
            (BLOCKED4, 80),
            (BLOCKED4, 443),
            (LIVE4, 80),
            (REUSE_B, 443),
            (BLOCKED6, 80),
        ],
        // Port 80 of the port-scoped host, and a /30 neighbour outside the network.
        &[(REUSE_B, 80), (DNS4, 80)],
    );

    let state = h.state_json(&name);
    assert_eq!(
        strings(&state["live_allow"]),
        [
            BLOCKED4.to_string(),
            "198.51.100.48/30".into(),
            BLOCKED6.into(),
            scoped.clone()
        ],
        "{state}"
    );
    assert_eq!(h.shield_state(&name), "up");
    let allows = h.events(&name, "allow");
    assert_eq!(allows.len(), 4, "one audit event per allow: {allows:?}");
    assert_eq!(allows[3]["detail"]["target"], Value::from(scoped.clone()));
}

#[test]
fn allow_domain_resolves_now_and_deny_domain_removes_only_its_own_addresses() {
    let mut h = e2e!();
    // Resolving now is the static tier's way; a resolver tier learns names as they are asked
    // (tests/e2e_dns*.rs).
    h.set_config("# written by tests/e2e_live.rs (restored afterwards)\nupstream_dns: 198.51.100.53\ndns:\n  tier: static\n",
    );
    let name = live_container(&mut h, "domain");
    expect(
        &h,
        &name,
        &[],
        &[(LIVE4, 80), (LIVE6, 80), (PAIR4, 80), (SHARED4, 80)],
    );

    let asked = h.world.dns_queries().len();
    let out = h.shield(&["allow", &name, "dual.e2e.test"]).expect_ok();
    assert_eq!(
        out.stdout,
        format!("Allowed dual.e2e.test -> {LIVE4}, {LIVE6} for {name}\n"),
        "{out}"
    );
    assert!(
        h.world.dns_queries()[asked..]
            .iter()
            .any(|q| q == "dual.e2e.test"),
        "`allow DOMAIN` did not ask the configured upstream_dns: {:?}",
        h.world.dns_queries()
    );
    let out = h
        .shield(&["allow", &name, "pair.e2e.test", "--json"])
        .expect_ok();
    let v: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    let addrs: BTreeSet<String> = strings(&v["addresses"]).into_iter().collect();
    assert_eq!(
        addrs,
        [PAIR4.to_string(), SHARED4.to_string()].into(),
        "{out}"
    );
    assert_eq!(v["action"], "allow");
    assert_eq!(v["target"], "pair.e2e.test");
    let out = h.shield(&["allow", &name, "shared.e2e.test"]).expect_ok();
    assert_eq!(
        out.stdout,
        format!("Allowed shared.e2e.test -> {SHARED4} for {name}\n"),
        "{out}"
    );
    expect(
        &h,
        &name,
        &[(LIVE4, 80), (LIVE6, 80), (PAIR4, 80), (SHARED4, 80)],
        &[(BLOCKED4, 80)],
    );

    // pair.e2e.test brought PAIR4 and SHARED4; shared.e2e.test brings SHARED4 too.
    let out = h.shield(&["deny", &name, "pair.e2e.test"]).expect_ok();
    assert!(
        out.stdout.starts_with("Denied pair.e2e.test (")
            && out.stdout.contains(PAIR4)
            && out.stdout.contains(SHARED4)
            && out.stdout.ends_with(&format!(") for {name}\n")),
        "{out}"
    );
    expect(
        &h,
        &name,
        &[(SHARED4, 80), (LIVE4, 80), (LIVE6, 80)],
        &[(PAIR4, 80)],
    );
    let state = h.state_json(&name);
    assert_eq!(strings(&state["live_deny"]), ["pair.e2e.test"], "{state}");
    let out = h.shield(&["deny", &name, "dual.e2e.test"]).expect_ok();
    assert_eq!(
        out.stdout,
        format!("Denied dual.e2e.test ({LIVE4}, {LIVE6}) for {name}\n"),
        "{out}"
    );
    expect(
        &h,
        &name,
        &[(SHARED4, 80), (ALLOWED4, 80)],
        &[(LIVE4, 80), (LIVE6, 80), (PAIR4, 80)],
    );
    assert_eq!(h.shield_state(&name), "up");
}

// ---------------------------------------------------------------------------------------
// deny, modes, persistence
// ---------------------------------------------------------------------------------------

#[test]
fn deny_of_a_profile_address_holds_across_modes_and_restart_until_allowed() {
    let mut h = e2e!();
    let conf = h.user.containers_conf();
    h.save(&conf);
    let hooks = h.user.user_hooks_dir();
    h.remove_at_end_unless_present(&hooks);
    h.shield(&["setup", "--user"]).expect_ok();
    assert!(hooks.join(CREATE_RUNTIME_JSON).is_file());
    let name = live_container(&mut h, "deny-persist");
    expect(&h, &name, &[(REUSE_A, 80), (ALLOWED4, 80)], &[]);

    let out = h.shield(&["deny", &name, REUSE_A]).expect_ok();
    assert_eq!(
        out.stdout,
        format!("Denied {REUSE_A} ({REUSE_A}) for {name}\n"),
        "{out}"
    );
    expect(
        &h,
        &name,
        &[(ALLOWED4, 80)],
        &[(REUSE_A, 80), (REUSE_A, 443)],
    );
    let deny_set = set_elements(&h.rules_json(&name), "deny_v4");
    assert_eq!(deny_set, [REUSE_A], "the live deny set");

    // down / up
    h.shield(&["down", &name]).expect_ok();
    assert_eq!(h.shield_state(&name), "down");
    expect(
        &h,
        &name,
        &[(BLOCKED4, 80), (ALLOWED4, 80)],
        &[(REUSE_A, 80)],
    );
    h.shield(&["up", &name]).expect_ok();
    assert_eq!(h.shield_state(&name), "up");
    expect(
        &h,
        &name,
        &[(ALLOWED4, 80)],
        &[(REUSE_A, 80), (BLOCKED4, 80)],
    );

    // block / up
    h.shield(&["block", &name]).expect_ok();
    assert_eq!(h.shield_state(&name), "block");
    expect(&h, &name, &[], &[(REUSE_A, 80), (ALLOWED4, 80)]);
    h.shield(&["up", &name]).expect_ok();
    assert_eq!(h.shield_state(&name), "up");
    expect(&h, &name, &[(ALLOWED4, 80)], &[(REUSE_A, 80)]);

    // A restart re-applies the bundle, deny included.
    let applies = h.events(&name, "apply").len();
    h.podman(&["restart", "-t", "0", &name]).expect_ok();
    assert_eq!(h.shield_state(&name), "up", "after podman restart");
    assert_eq!(
        h.events(&name, "apply").len(),
        applies + 1,
        "the restart did not re-apply the firewall"
    );
    expect(&h, &name, &[(ALLOWED4, 80)], &[(REUSE_A, 80)]);
    assert_eq!(
        strings(&h.state_json(&name)["live_deny"]),
        [REUSE_A],
        "the deny is gone from state.json"
    );

    // allow clears the deny, live and across the next restart.
    h.shield(&["allow", &name, REUSE_A]).expect_ok();
    expect(&h, &name, &[(REUSE_A, 80), (ALLOWED4, 80)], &[]);
    let state = h.state_json(&name);
    assert_eq!(
        strings(&state["live_deny"]),
        Vec::<String>::new(),
        "{state}"
    );
    assert!(set_elements(&h.rules_json(&name), "deny_v4").is_empty());
    h.podman(&["restart", "-t", "0", &name]).expect_ok();
    assert_eq!(h.shield_state(&name), "up");
    expect(
        &h,
        &name,
        &[(REUSE_A, 80), (ALLOWED4, 80)],
        &[(BLOCKED4, 80)],
    );
}

/// A port-scoped `allow` of a denied host must not re-open the host's other ports: either it
/// is refused (nothing changes) or it opens exactly that port.
#[test]
fn port_scoped_allow_of_a_denied_host_opens_no_other_port() {
    let mut h = e2e!();
    let name = live_container(&mut h, "scoped-deny");
    h.shield(&["deny", &name, REUSE_A]).expect_ok();
    expect(&h, &name, &[], &[(REUSE_A, 80), (REUSE_A, 443)]);
    let out = h.shield(&["allow", &name, &format!("{REUSE_A}:443/tcp")]);
    if out.ok() {
        expect(&h, &name, &[(REUSE_A, 443)], &[(REUSE_A, 80)]);
    } else {
        assert_eq!(out.code(), Some(1), "{out}");
        assert!(out.stderr.contains(REUSE_A), "{out}");
        expect(&h, &name, &[], &[(REUSE_A, 80), (REUSE_A, 443)]);
    }
    assert_eq!(h.shield_state(&name), "up");
}

#[test]
fn down_opens_public_hosts_down_all_private_ones_and_denies_always_hold() {
    let mut h = e2e!();
    let name = live_container(&mut h, "modes");
    h.shield(&["deny", &name, REUSE_A]).expect_ok();
    h.shield(&["deny", &name, BLOCKED6]).expect_ok();
    expect(
        &h,
        &name,
        &[(ALLOWED4, 80), (ALLOWED6, 80)],
        &[
            (BLOCKED4, 80),
            (LIVE4, 80),
            (ULA6, 80),
            (REUSE_A, 80),
            (BLOCKED6, 80),
        ],
    );

    let out = h.shield(&["down", &name]).expect_ok();
    assert_eq!(
        out.stdout,
        format!("{name} is now down: public egress is accepted and logged; private ranges and denies stay blocked\n"),
        "{out}"
    );
    assert_eq!(h.shield_state(&name), "down");
    expect(
        &h,
        &name,
        &[(BLOCKED4, 80), (LIVE4, 443), (ALLOWED4, 80), (ALLOWED6, 80)],
        &[(ULA6, 80), (REUSE_A, 80), (BLOCKED6, 80)],
    );

    let out = h.shield(&["down", &name, "--all", "--json"]).expect_ok();
    let v: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(v["action"], "mode", "{out}");
    assert_eq!(v["mode"], "down_all", "{out}");
    assert_eq!(v["container"], Value::from(name.clone()), "{out}");
    assert_eq!(h.shield_state(&name), "down_all");
    expect(
        &h,
        &name,
        &[(ULA6, 80), (BLOCKED4, 80), (ALLOWED4, 80)],
        &[(REUSE_A, 80), (BLOCKED6, 80)],
    );

    h.shield(&["up", &name]).expect_ok();
    assert_eq!(h.shield_state(&name), "up");
    expect(
        &h,
        &name,
        &[(ALLOWED4, 80), (ALLOWED6, 80)],
        &[(BLOCKED4, 80), (ULA6, 80), (REUSE_A, 80), (BLOCKED6, 80)],
    );

    let out = h.shield(&["block", &name]).expect_ok();
    assert_eq!(
        out.stdout,
        format!("{name} is now blocked: nothing but loopback\n"),
        "{out}"
    );
    assert_eq!(h.shield_state(&name), "block");
    expect(
        &h,
        &name,
        &[],
        &[
            (ALLOWED4, 80),
            (ALLOWED6, 80),
            (BLOCKED4, 80),
            (REUSE_A, 80),
        ],
    );
    // Allowing while blocked is recorded but opens nothing until `up`.
    h.shield(&["allow", &name, LIVE4]).expect_ok();
    assert_eq!(h.shield_state(&name), "block");
    expect(&h, &name, &[], &[(LIVE4, 80), (ALLOWED4, 80)]);

    h.shield(&["up", &name]).expect_ok();
    let status: Value =
        serde_json::from_str(&h.shield(&["status", &name, "--json"]).expect_ok().stdout).unwrap();
    assert_eq!(status["state"], "up", "{status}");
    expect(
        &h,
        &name,
        &[(ALLOWED4, 80), (LIVE4, 80)],
        &[(BLOCKED4, 80), (REUSE_A, 80)],
    );
}

// ---------------------------------------------------------------------------------------
// Revocation cuts live connections
// ---------------------------------------------------------------------------------------

/// The host's /proc/uptime in seconds (the container shares the clock; checked by
/// [`Stream::start`]).
fn uptime() -> f64 {
    fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .expect("read /proc/uptime")
}

/// A long-lived connection from inside a container to a world host's [`STREAM_PORT`].
///
/// The reader (`timeout 20 nc`, so it ends by itself) runs detached inside the container; it
/// prefixes each line it receives with the container's uptime and writes it to a file.
struct Stream {
    container: String,
    host: String,
    file: String,
}

/// One received line: container uptime (s) and the stream's sequence number.
#[derive(Debug, Clone, Copy)]
struct Line {
    at: f64,
    seq: u64,
}

impl Stream {
    /// Start a reader of `host`'s stream in `name` and wait (at most 5 s) until it receives.
    #[track_caller]
    fn start(h: &E2e, name: &str, host: &str, tag: &str) -> Stream {
        let file = format!("/tmp/stream-{tag}");
        // `sleep 25 |` keeps nc's stdin open (nc must not half-close); all bounded.
        let script = format!(
            "rm -f {file} {file}.end\n\
             setsid sh -c '(sleep 25 | timeout 20 nc {host} {STREAM_PORT} 2>{file}.err; echo \"rc=$?\" >{file}.end) \
             | while read -r l; do read u _ </proc/uptime; echo \"$u $l\"; done >{file}' \
             </dev/null >/dev/null 2>&1 &\n\
             echo started\n"
        );
        h.exec(name, &script).expect_ok();
        let s = Stream {
            container: name.to_string(),
            host: host.to_string(),
            file,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let lines = s.lines(h);
            if lines.len() >= 3 {
                // The container's clock is the host's (no time namespace): the stamps are
                // comparable with `uptime()`.
                let last = lines.last().unwrap().at;
                let now = uptime();
                assert!(
                    (now - last).abs() < 2.0,
                    "container uptime {last} differs from the host's {now}"
                );
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "stream from {host} did not start within 5 s: {:?}\n{}",
                h.world.streams(),
                s.debug(h)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The lines received so far.
    fn lines(&self, h: &E2e) -> Vec<Line> {
        let out = h.exec(
            &self.container,
            &format!("cat {} 2>/dev/null; true", self.file),
        );
        out.stdout
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let at = w.next()?.parse().ok()?;
                let seq = w.last()?.parse().ok()?;
                Some(Line { at, seq })
            })
            .collect()
    }

    /// What the reader left behind, for failure messages.
    fn debug(&self, h: &E2e) -> String {
        let out = h.exec(
            &self.container,
            &format!(
                "echo '--- tail'; tail -n 3 {f}; echo '--- end'; cat {f}.end; echo '--- err'; cat {f}.err; true",
                f = self.file
            ),
        );
        format!("stream from {}: {}", self.host, out.stdout)
    }

    /// Assert the stream stopped: no line arrived later than `cut + 1 s` (`cut` being the
    /// host uptime when the revoking command returned), checked 2 s after `cut`.
    #[track_caller]
    fn assert_stopped(&self, h: &E2e, cut: f64, what: &str) {
        sleep_until(cut + 2.0);
        let lines = self.lines(h);
        let last = lines.last().expect("the stream had lines");
        assert!(
            last.at <= cut + 1.0,
            "{what}: the stream from {} still delivered line {} {:.2} s after the command returned\n{}",
            self.host,
            last.seq,
            last.at - cut,
            self.debug(h)
        );
    }

    /// Assert the stream carries on: lines keep arriving (checked 2 s after `cut`) and none
    /// went missing.
    #[track_caller]
    fn assert_flowing(&self, h: &E2e, cut: f64, what: &str) {
        sleep_until(cut + 2.0);
        // Taken before reading: the file is read after this instant.
        let now = uptime();
        let lines = self.lines(h);
        let last = lines.last().expect("the stream had lines");
        let after = lines.iter().filter(|l| l.at > cut).count();
        assert!(
            last.at >= now - 0.5 && after >= 10,
            "{what}: the stream from {} stalled: last line {} at {:.2} s after the command, {after} lines since, now {:.2} s after\n{}",
            self.host,
            last.seq,
            last.at - cut,
            now - cut,
            self.debug(h)
        );
        let seqs: Vec<u64> = lines.iter().map(|l| l.seq).collect();
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "{what}: the stream from {} lost or reordered lines: {seqs:?}",
            self.host
        );
    }
}

fn sleep_until(t: f64) {
    let now = uptime();
    if t > now {
        std::thread::sleep(Duration::from_secs_f64(t - now));
    }
}

/// Run a revoking shield command and return the host uptime when it returned.
#[track_caller]
fn revoke(h: &E2e, args: &[&str]) -> f64 {
    h.shield(args).expect_ok();
    uptime()
}

#[test]
fn deny_cuts_a_live_connection_to_that_host() {
    let mut h = e2e!();
    let name = live_container(&mut h, "cut-deny");
    let s = Stream::start(&h, &name, REUSE_A, "deny");
    let cut = revoke(&h, &["deny", &name, REUSE_A]);
    s.assert_stopped(&h, cut, "after `deny`");
    // New connections are refused too.
    expect(&h, &name, &[(ALLOWED4, 80)], &[(REUSE_A, 80)]);
}

#[test]
fn block_cuts_live_connections_even_to_allowed_hosts() {
    let mut h = e2e!();
    let name = live_container(&mut h, "cut-block");
    let s4 = Stream::start(&h, &name, ALLOWED4, "block4");
    let s6 = Stream::start(&h, &name, ALLOWED6, "block6");
    let cut = revoke(&h, &["block", &name]);
    s4.assert_stopped(&h, cut, "after `block`");
    s6.assert_stopped(&h, cut, "after `block`");
    assert_eq!(h.shield_state(&name), "block");
}

#[test]
fn up_cuts_a_live_connection_opened_in_bypass_mode() {
    let mut h = e2e!();
    let name = live_container(&mut h, "cut-up");
    h.shield(&["down", &name]).expect_ok();
    let s = Stream::start(&h, &name, BLOCKED4, "bypass");
    let cut = revoke(&h, &["up", &name]);
    s.assert_stopped(&h, cut, "after `up`");
    expect(&h, &name, &[(ALLOWED4, 80)], &[(BLOCKED4, 80)]);
}

/// The conntrack flush that cuts revoked connections must not cut the ones the new policy
/// still allows ("Linux picks up mid-stream TCP": src/effects/conntrack.rs).
#[test]
fn revoking_keeps_live_connections_to_still_allowed_hosts() {
    let mut h = e2e!();
    let name = live_container(&mut h, "keep");
    h.shield(&["down", &name]).expect_ok();
    let gone = Stream::start(&h, &name, BLOCKED4, "keep-gone");
    let kept = Stream::start(&h, &name, ALLOWED4, "keep-kept");
    let cut = revoke(&h, &["up", &name]);
    gone.assert_stopped(&h, cut, "after `up`");
    kept.assert_flowing(&h, cut, "after `up`, to an allowed host");

    let gone = Stream::start(&h, &name, REUSE_A, "keep-gone2");
    let kept = Stream::start(&h, &name, ALLOWED6, "keep-kept2");
    let cut = revoke(&h, &["deny", &name, REUSE_A]);
    gone.assert_stopped(&h, cut, "after `deny` of its host");
    kept.assert_flowing(&h, cut, "after `deny` of another host");
}

// ---------------------------------------------------------------------------------------
// reset and quarantine (the Python original's names)
// ---------------------------------------------------------------------------------------

/// The addresses in a DNS-learned set of `name`'s live table, sorted (elements there carry
/// timeouts, so nft prints them as `{"elem": {"val": ..., "timeout": ...}}`).
fn learned_addresses(h: &E2e, name: &str, set: &str) -> Vec<String> {
    let addrs = e2e::set_elements(&h.rules_json(name), set);
    for a in &addrs {
        assert!(
            a.parse::<std::net::IpAddr>().is_ok(),
            "not an address element of {set}: {a}"
        );
    }
    addrs
}

/// `reset` empties the DNS-learned sets and learned.jsonl, cuts connections to the forgotten
/// addresses only, and leaves literals and live decisions alone; names are learned again as
/// they are asked, and the resolver goes on recording them (so a later `deny NAME` still
/// removes exactly that name's addresses).
#[test]
fn reset_forgets_learned_addresses_and_keeps_literals_and_live_decisions() {
    let mut h = e2e!();
    h.set_config(&dns_config("builtin", ""));
    h.profile(
        "e2e-live-reset",
        &format!("{ALLOWED4}\n{REUSE_A}\npair.e2e.test\n"),
    );
    let name = h.name("reset");
    h.run_detached(&name, "e2e-live-reset").expect_ok();
    h.shield(&["allow", &name, LIVE4]).expect_ok();
    h.shield(&["deny", &name, REUSE_A]).expect_ok();
    let learned_file = h.bundle_dir(&name).join("learned.jsonl");

    let lookup = |h: &E2e| {
        let out = h
            .exec(&name, "timeout 5 nslookup pair.e2e.test 2>&1")
            .expect_ok();
        assert!(
            out.stdout.contains(PAIR4) && out.stdout.contains(SHARED4),
            "pair.e2e.test did not resolve through the container's resolver: {out}"
        );
    };
    lookup(&h);
    assert_eq!(
        learned_addresses(&h, &name, "dns_v4"),
        [SHARED4, PAIR4],
        "learned through the resolver"
    );
    assert!(
        h.read(&learned_file)
            .contains("\"domain\":\"pair.e2e.test\""),
        "learned.jsonl"
    );
    let state_before = h.read(&h.bundle_dir(&name).join("state.json"));
    let learned_stream = Stream::start(&h, &name, PAIR4, "reset-learned");
    let literal_stream = Stream::start(&h, &name, ALLOWED4, "reset-literal");

    let out = h.shield(&["reset", &name, "--json"]).expect_ok();
    let cut = uptime();
    let v: Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("reset --json is not JSON ({e}): {out}"));
    assert_eq!(
        v,
        serde_json::json!({
            "container": name,
            "action": "reset",
            "addresses": [SHARED4, PAIR4],
            "mode": "up",
        }),
        "{out}"
    );
    assert_eq!(out.stdout.lines().count(), 1, "one JSON line: {out}");
    learned_stream.assert_stopped(&h, cut, "after `reset`, to a forgotten address");
    literal_stream.assert_flowing(&h, cut, "after `reset`, to a literal allow");
    assert!(learned_addresses(&h, &name, "dns_v4").is_empty());
    assert_eq!(h.read(&learned_file), "", "learned.jsonl after reset");
    assert_eq!(
        h.read(&h.bundle_dir(&name).join("state.json")),
        state_before,
        "reset changed state.json"
    );
    // The forgotten names stay allowed but closed until asked again; literal allows, the
    // live allow and the live deny hold.
    expect(
        &h,
        &name,
        &[(ALLOWED4, 80), (LIVE4, 80)],
        &[(PAIR4, 80), (SHARED4, 80), (REUSE_A, 80)],
    );
    assert_eq!(h.shield_state(&name), "up");
    let resets = h.events(&name, "reset");
    assert_eq!(resets.len(), 1, "one audit event: {resets:?}");
    assert_eq!(
        resets[0]["detail"]["addresses"],
        serde_json::json!([SHARED4, PAIR4]),
        "{resets:?}"
    );

    // Asked again, the name opens again and is recorded again in the same learned.jsonl.
    lookup(&h);
    expect(&h, &name, &[(PAIR4, 80), (SHARED4, 80)], &[]);
    assert!(
        h.read(&learned_file)
            .contains("\"domain\":\"pair.e2e.test\""),
        "the resolver no longer records into learned.jsonl after reset"
    );
    h.shield(&["deny", &name, "pair.e2e.test"]).expect_ok();
    expect(&h, &name, &[(ALLOWED4, 80)], &[(PAIR4, 80), (SHARED4, 80)]);

    // Without --json: one line that says what was forgotten.
    let out = h.shield(&["reset", &name]).expect_ok();
    assert_eq!(
        out.stdout,
        format!("Reset {name}: no DNS-learned addresses to forget; literal allows and live decisions stay\n"),
        "{out}"
    );
    assert_eq!(h.shield_state(&name), "up");
}

/// `quarantine` is `block` under the original's name: the same change, output and audit.
#[test]
fn quarantine_blocks_everything_like_block_and_up_lifts_it() {
    let mut h = e2e!();
    let name = live_container(&mut h, "quarantine");
    let s = Stream::start(&h, &name, ALLOWED4, "quarantine");
    let out = h.shield(&["quarantine", &name]).expect_ok();
    let cut = uptime();
    assert_eq!(
        out.stdout,
        format!("{name} is now blocked: nothing but loopback\n"),
        "{out}"
    );
    s.assert_stopped(&h, cut, "after `quarantine`");
    assert_eq!(h.shield_state(&name), "block");
    expect(
        &h,
        &name,
        &[],
        &[(ALLOWED4, 80), (ALLOWED6, 80), (BLOCKED4, 80)],
    );
    let modes = h.events(&name, "mode");
    assert_eq!(modes.len(), 1, "{modes:?}");
    assert_eq!(modes[0]["detail"]["mode"], "block", "{modes:?}");
    assert_eq!(modes[0]["detail"]["target"], "block", "{modes:?}");

    let out = h.shield(&["quarantine", &name, "--json"]).expect_ok();
    let v: Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("quarantine --json is not JSON ({e}): {out}"));
    assert_eq!(
        v,
        serde_json::json!({
            "container": name,
            "action": "mode",
            "target": "block",
            "addresses": [],
            "mode": "block",
        }),
        "{out}"
    );
    assert_eq!(h.shield_state(&name), "block");

    h.shield(&["up", &name]).expect_ok();
    assert_eq!(h.shield_state(&name), "up");
    expect(
        &h,
        &name,
        &[(ALLOWED4, 80), (ALLOWED6, 80)],
        &[(BLOCKED4, 80)],
    );
}

// ---------------------------------------------------------------------------------------
// Concurrency and crashes
// ---------------------------------------------------------------------------------------

/// The single addresses the profile and the bundle's live allows put into allow_v4.
fn expected_allow_v4(state: &Value) -> Vec<String> {
    let mut want: Vec<String> = strings(&state["entries"])
        .into_iter()
        .chain(strings(&state["live_allow"]))
        .filter(|t| t.parse::<std::net::Ipv4Addr>().is_ok())
        .collect();
    want.sort();
    want.dedup();
    want
}

/// state.json and the live allow_v4 set hold the same addresses.
#[track_caller]
fn assert_state_matches_live(h: &E2e, name: &str) {
    let state = h.state_json(name);
    let live = set_elements(&h.rules_json(name), "allow_v4");
    let want = expected_allow_v4(&state);
    if live != want {
        let l: BTreeSet<&String> = live.iter().collect();
        let w: BTreeSet<&String> = want.iter().collect();
        panic!(
            "state.json and the live allow_v4 set differ:\n only live: {:?}\n only in state.json: {:?}",
            l.difference(&w).collect::<Vec<_>>(),
            w.difference(&l).collect::<Vec<_>>()
        );
    }
}

#[test]
fn a_hundred_concurrent_allows_all_land_in_state_and_firewall() {
    let mut h = e2e!();
    let name = live_container(&mut h, "concurrent");
    // Two of them are world hosts, so real connections show the result too.
    let ips: Vec<String> = (0..100)
        .map(|i| format!("198.19.{}.{}", 10 + i / 50, 1 + (i % 50) * 3))
        .collect();
    assert!(ips.iter().any(|ip| ip == CONC4_A) && ips.iter().any(|ip| ip == CONC4_B));
    expect(&h, &name, &[], &[(CONC4_A, 80), (CONC4_B, 80)]);
    let (user, bin) = (h.user.clone(), h.bin.display().to_string());
    let started = Instant::now();
    let outs: Vec<Out> = std::thread::scope(|scope| {
        let handles: Vec<_> = ips
            .iter()
            .map(|ip| {
                let (user, bin, name) = (&user, &bin, &name);
                scope.spawn(move || e2e::as_user(user, &[], bin, &["allow", name, ip], e2e::LONG))
            })
            .collect();
        handles.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let took = started.elapsed();
    eprintln!("100 concurrent allows took {took:?}");
    for (ip, out) in ips.iter().zip(&outs) {
        assert!(out.ok(), "allow {ip} failed: {out}");
        assert_eq!(
            out.stdout,
            format!("Allowed {ip} -> {ip} for {name}\n"),
            "{out}"
        );
    }
    let state = h.state_json(&name);
    let live_allow: BTreeSet<String> = strings(&state["live_allow"]).into_iter().collect();
    let want: BTreeSet<String> = ips.iter().cloned().collect();
    assert_eq!(live_allow, want, "state.json live_allow");
    assert_eq!(
        strings(&state["live_allow"]).len(),
        100,
        "duplicates in live_allow"
    );
    assert_state_matches_live(&h, &name);
    assert_eq!(h.shield_state(&name), "up");
    assert_eq!(
        h.events(&name, "allow").len(),
        100,
        "one audit event per allow"
    );
    expect(
        &h,
        &name,
        &[(CONC4_A, 80), (CONC4_B, 80), (ALLOWED4, 80)],
        &[(BLOCKED4, 80)],
    );
}

/// A tiny deterministic generator (xorshift), seeded from the clock and printed, so a failing
/// run can be replayed by setting E2E_SEED.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("E2E_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("crash test seed: E2E_SEED={seed}");
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `terok-shield ARGS` as the test user, started directly (setpriv and env exec, so the pid
/// is terok-shield's own) in a process group of its own, output discarded.
fn spawn_shield(h: &E2e, args: &[&str]) -> Child {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={}", h.user.uid))
        .arg(format!("--regid={}", h.user.gid))
        .arg("--clear-groups")
        .arg("--")
        .arg("env")
        .arg("-i")
        .arg(format!("HOME={}", h.user.home.display()))
        .arg(format!("XDG_RUNTIME_DIR={}", h.user.runtime_dir()))
        .arg("PATH=/usr/sbin:/usr/bin:/sbin:/bin")
        .arg("LANG=C.UTF-8")
        .arg(&h.bin)
        .args(args)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    cmd.spawn().expect("spawn terok-shield through setpriv")
}

fn kill_group(child: &Child) {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

/// Wait (bounded) for a spawned command; kill its group if it overruns. Exit code, None if
/// killed by a signal.
fn wait_bounded(child: &mut Child, limit: Duration) -> Option<i32> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status.code();
        }
        if started.elapsed() > limit {
            kill_group(child);
            let _ = child.wait();
            panic!("a command was still running after {limit:?} and was killed");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn allows_killed_midway_leave_a_state_that_up_repairs() {
    let mut h = e2e!();
    let name = live_container(&mut h, "crash");
    let mut rng = Rng::new();
    let limit = Duration::from_secs(60);

    // How long one allow takes here, alone.
    let mut took = Vec::new();
    for i in 0..5 {
        let started = Instant::now();
        let mut child = spawn_shield(&h, &["allow", &name, &format!("198.19.30.{}", 1 + i)]);
        assert_eq!(
            wait_bounded(&mut child, limit),
            Some(0),
            "calibration allow"
        );
        took.push(started.elapsed());
    }
    took.sort();
    let one = took[2];
    eprintln!("crash test: one allow takes {one:?} (median of 5)");

    // Phase 1: one allow at a time, each killed at a random moment of its run, so kills land
    // in every phase (before the lock, after saving state.json, inside nft, after nft).
    let mut inconsistent = 0;
    let mut sequential_kills = 0;
    for i in 0..25u64 {
        let ip = format!("198.19.31.{}", 1 + i);
        let mut child = spawn_shield(&h, &["allow", &name, &ip]);
        let at = Duration::from_micros(rng.below(one.as_micros() as u64 * 12 / 10 + 1));
        std::thread::sleep(at);
        kill_group(&child);
        match wait_bounded(&mut child, limit) {
            None => sequential_kills += 1,
            Some(0) => {}
            Some(c) => panic!("allow {ip} failed with exit {c} before it was killed"),
        }
        let state = h.shield_state(&name);
        if state != "up" {
            inconsistent += 1;
            assert_eq!(state, "error", "after a killed allow");
        }
    }

    // Phase 2: sixty allows at once, about half of them killed at random moments while the
    // queue (serialised by the bundle lock) drains. How long it drains is measured first with
    // sixty that are left alone: one allow's time says little about it (most of that is the
    // process starting, which sixty do side by side), and kill moments past the drain kill
    // nothing.
    let drain = {
        let started = Instant::now();
        let mut batch: Vec<Child> = (0..60)
            .map(|i| spawn_shield(&h, &["allow", &name, &format!("198.19.33.{}", 1 + i)]))
            .collect();
        for child in &mut batch {
            assert_eq!(
                wait_bounded(child, limit),
                Some(0),
                "calibration batch allow"
            );
        }
        started.elapsed()
    };
    eprintln!("crash test: sixty concurrent allows drain in {drain:?}");
    let ips: Vec<String> = (0..60).map(|i| format!("198.19.32.{}", 1 + i)).collect();
    let window = drain.as_micros() as u64 * 8 / 10 + 1;
    // Kill moments count from the first spawn, as the drain did.
    let started = Instant::now();
    let mut children: Vec<(String, Child, Option<Duration>)> = ips
        .iter()
        .map(|ip| {
            let child = spawn_shield(&h, &["allow", &name, ip]);
            let kill_at = (rng.below(2) == 0).then(|| Duration::from_micros(rng.below(window)));
            (ip.clone(), child, kill_at)
        })
        .collect();
    let (mut concurrent_kills, mut failed) = (0, Vec::new());
    loop {
        let mut running = 0;
        for (ip, child, kill_at) in &mut children {
            if child.try_wait().expect("try_wait").is_some() {
                continue;
            }
            running += 1;
            let overdue = started.elapsed() > limit;
            if overdue || kill_at.is_some_and(|t| started.elapsed() >= t) {
                kill_group(child);
                let _ = child.wait();
                *kill_at = None;
                concurrent_kills += 1;
                assert!(!overdue, "allow {ip} was still running after {limit:?}");
            }
        }
        if running == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    for (ip, child, _) in &mut children {
        match child.wait().expect("reap").code() {
            Some(0) | None => {}
            Some(c) => failed.push(format!("{ip}: exit {c}")),
        }
    }
    let before_up = h.shield_state(&name);
    eprintln!(
        "crash test: sequential: {sequential_kills} of 25 killed, {inconsistent} left state.json \
         ahead of the firewall (status `error`); concurrent: {concurrent_kills} of 60 killed; \
         status before `up`: {before_up}"
    );
    assert!(
        failed.is_empty(),
        "allows that were not killed failed: {failed:?}"
    );
    assert!(
        sequential_kills >= 10 && concurrent_kills >= 5,
        "too few kills to test anything"
    );

    // No terok-shield of this test is left running.
    let leftover: Vec<String> = fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("terok-shield") && c.contains(&name) && c.contains(" allow "))
        .collect();
    assert!(leftover.is_empty(), "left running: {leftover:?}");

    h.shield(&["up", &name]).expect_ok();
    assert_eq!(h.shield_state(&name), "up");
    assert_state_matches_live(&h, &name);
    let tmp: Vec<String> = fs::read_dir(h.bundle_dir(&name))
        .unwrap()
        .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        .filter(|f| f.contains(".tmp"))
        .collect();
    if !tmp.is_empty() {
        eprintln!("crash test: temporary files left in the bundle by killed writers: {tmp:?}");
    }
    // The firewall still works, and a later allow works on the repaired state.
    expect(&h, &name, &[(ALLOWED4, 80)], &[(BLOCKED4, 80)]);
    h.shield(&["allow", &name, "198.19.33.1"]).expect_ok();
    assert_state_matches_live(&h, &name);
    assert_eq!(h.shield_state(&name), "up");
}

// ---------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let mut h = e2e!();
    let name = live_container(&mut h, "badinput");
    let stopped = h.name("badinput-stopped");
    h.run_detached(&stopped, "e2e-live").expect_ok();
    h.podman(&["stop", "-t", "0", &stopped]).expect_ok();

    let snapshot = |h: &E2e| {
        let dir = h.bundle_dir(&name);
        (
            h.shield(&["rules", &name]).expect_ok().stdout,
            h.rules_json(&name),
            h.read(&dir.join("state.json")),
            h.read(&dir.join("audit.jsonl")),
            h.read(&h.bundle_dir(&stopped).join("state.json")),
        )
    };
    let before = snapshot(&h);
    let queries_before = h.world.dns_queries().len();

    let cases: &[(&[&str], &str)] = &[
        (&["allow", &name, "198.51.100.0/33"], "prefix length"),
        (&["allow", &name, "198.51.100.300"], "198.51.100.300"),
        (&["allow", &name, "exa mple.e2e.test"], "exa mple.e2e.test"),
        (&["allow", &name, "bad..e2e.test"], "empty label"),
        (
            &["allow", &name, "bad-.e2e.test"],
            "may not start or end with '-'",
        ),
        (
            &["allow", &name, "1.2.3.4; flush ruleset"],
            "1.2.3.4; flush ruleset",
        ),
        (&["allow", &name, "$(reboot)"], "$(reboot)"),
        (&["allow", &name, "198.51.100.20:99999"], "invalid port"),
        (
            &["allow", &name, "198.51.100.20:80/icmp"],
            "invalid protocol",
        ),
        (&["deny", &name, "198.51.100.20:80"], "without a port"),
        (&["deny", &name, "198.51.100.10/tcp"], "198.51.100.10/tcp"),
        (
            &["deny", &name, "1.2.3.4; flush ruleset"],
            "1.2.3.4; flush ruleset",
        ),
        (
            &["allow", "e2e-no-such-container", BLOCKED4],
            "no shield state",
        ),
        (
            &["deny", "e2e-no-such-container", BLOCKED4],
            "no shield state",
        ),
        (&["up", "e2e-no-such-container"], "no shield state"),
        (&["allow", "../etc", BLOCKED4], "invalid container name"),
        (&["allow", &stopped, BLOCKED4], "not running"),
        (&["deny", &stopped, ALLOWED4], "not running"),
        (&["down", &stopped], "not running"),
        (&["block", &stopped], "not running"),
        (&["quarantine", &stopped], "not running"),
        (&["reset", &stopped], "not running"),
        (&["reset", "e2e-no-such-container"], "no shield state"),
        (&["quarantine", "../etc"], "invalid container name"),
    ];
    let mut problems = Vec::new();
    for (args, mention) in cases {
        let out = h.shield(args);
        let ok = out.code() == Some(1)
            && out.stdout.is_empty()
            && out.stderr.starts_with("terok-shield: error:")
            && out.stderr.contains(mention);
        if !ok {
            problems.push(format!(
                "{args:?}: expected exit 1 and an error naming {mention:?}: {out}"
            ));
        }
    }
    // A missing argument is a usage error (exit 2).
    let out = h.shield(&["allow", &name]);
    if out.code() != Some(2) {
        problems.push(format!(
            "`allow NAME` without a target: expected exit 2: {out}"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));

    let after = snapshot(&h);
    assert!(
        before.0 == after.0,
        "the live ruleset changed:\n{}\n---\n{}",
        before.0,
        after.0
    );
    assert!(before.1 == after.1, "`rules --json` changed");
    assert!(
        before.2 == after.2,
        "state.json changed:\n{}\n---\n{}",
        before.2,
        after.2
    );
    assert!(
        before.3 == after.3,
        "audit.jsonl changed:\n{}\n---\n{}",
        before.3,
        after.3
    );
    assert!(
        before.4 == after.4,
        "the stopped container's state.json changed"
    );
    assert_eq!(h.shield_state(&name), "up");
    // Only the one syntactically valid name was looked up.
    let asked: Vec<String> = h.world.dns_queries()[queries_before..].to_vec();
    assert!(
        asked.iter().all(|q| q == "nxdomain.e2e.test"),
        "unexpected DNS queries: {asked:?}"
    );
    expect(&h, &name, &[(ALLOWED4, 80)], &[(BLOCKED4, 80)]);
}
