//! Real packets through the real apply path.
//!
//! Each test builds a container netns whose every route leads into a world netns (see
//! `common`), applies a policy with `effects::firewall::apply`, and sends real TCP and UDP
//! from the container. Allowed traffic must reach the world and come back; refused traffic
//! must fail at once with the documented error and never reach the world.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use terok_shield::core::policy::{HostLoopback, Mode, Policy};
use terok_shield::core::target::Protocol;
use terok_shield::effects::firewall::{apply, FirewallError};
use terok_shield::effects::nft::Nft;

use common::bed::{addr, Bed};
use common::netns::run_in;
use common::policies::*;
use common::world::*;

/// The control experiment: without a firewall every world server answers, over IPv4 and
/// IPv6, so every refusal below is the shield's doing.
#[test]
fn world_answers_everything_without_a_firewall() {
    let bed = bed!();
    assert!(
        bed.nft().list_table_json().unwrap().is_none(),
        "a fresh namespace has no shield table"
    );
    for host in HOSTS.iter().chain([&GATEWAY4, &GATEWAY6]) {
        for &port in TCP_PORTS {
            bed.expect_tcp_ok(host, port);
        }
        for &port in UDP_PORTS {
            bed.expect_udp_ok(host, port);
        }
    }
    // Scale tests rely on every 198.18.0.0/15 address answering.
    bed.expect_tcp_ok("198.19.255.254", 80);
}

#[test]
fn allowed_tcp_and_udp_reach_the_world() {
    let bed = bed!();
    bed.apply(&policy(Mode::DenyAll, &[PUB_A, "198.18.1.0/24"]));
    for port in [22, 80, 443, 8080] {
        bed.expect_tcp_ok(PUB_A, port);
        bed.expect_tcp_ok(NET_HOST, port);
    }
    for port in [53, 443, 8080] {
        bed.expect_udp_ok(PUB_A, port);
        bed.expect_udp_ok(NET_HOST, port);
    }
}

#[test]
fn unlisted_tcp_is_refused_at_once_with_a_reset() {
    let bed = bed!();
    bed.apply(&policy(Mode::DenyAll, &[PUB_A]));
    for host in [PUB_B, FAR, OTHER53, GATEWAY4, PUB6_B, GATEWAY6] {
        for port in [22, 80, 443] {
            bed.expect_tcp_refused(host, port);
        }
    }
    bed.expect_tcp_ok(PUB_A, 80);
}

#[test]
fn unlisted_udp_is_rejected_with_icmp_admin_prohibited() {
    let bed = bed!();
    bed.apply(&policy(Mode::DenyAll, &[PUB_A]));
    for host in [PUB_B, FAR, GATEWAY4, PUB6_B, DNS6, GATEWAY6] {
        for port in UDP_PORTS {
            bed.expect_udp_refused(host, *port);
        }
    }
    bed.expect_udp_ok(PUB_A, 443);
}

#[test]
fn ipv6_works_end_to_end_including_neighbour_discovery() {
    let bed = bed!();
    bed.apply(&policy(Mode::DenyAll, &[PUB6_A, "2001:db8:1::/48"]));
    // Forget every neighbour on both sides: the next packets need ND through the firewall
    // (container solicits the gateway, the world solicits the container).
    common::cmd::ip_or_panic(&["-n", bed.container.name(), "-6", "neigh", "flush", "all"]);
    common::cmd::ip_or_panic(&["-n", bed.world.name(), "-6", "neigh", "flush", "all"]);
    for port in [22, 443] {
        bed.expect_tcp_ok(PUB6_A, port);
        bed.expect_tcp_ok(NET6_HOST, port);
    }
    bed.expect_udp_ok(PUB6_A, 53);
    bed.expect_udp_ok(NET6_HOST, 443);
    bed.expect_tcp_refused(PUB6_B, 443);
    bed.expect_udp_refused(PUB6_B, 443);
    // And the IPv4 side of the same policy is closed.
    bed.expect_tcp_refused(PUB_A, 443);
}

#[test]
fn private_ranges_are_refused_unless_listed() {
    let bed = bed!();
    bed.apply(&policy(Mode::DenyAll, &[PUB_A, PUB6_A]));
    for host in [PRIV_172, PRIV_192, METADATA, CGNAT, ULA] {
        bed.expect_tcp_refused(host, 80);
        bed.expect_udp_refused(host, 53);
    }
    // Listed private destinations are reachable; the unlisted ones stay closed.
    bed.apply(&policy(
        Mode::DenyAll,
        &[PRIV_172, "192.168.254.0/24", "fd5e:ed00::/48"],
    ));
    for host in [PRIV_172, PRIV_192, ULA] {
        bed.expect_tcp_ok(host, 80);
        bed.expect_udp_ok(host, 53);
    }
    for host in [METADATA, CGNAT] {
        bed.expect_tcp_refused(host, 80);
        bed.expect_udp_refused(host, 53);
    }
}

#[test]
fn deny_inside_an_allowed_network_wins() {
    let bed = bed!();
    let mut p = policy(
        Mode::DenyAll,
        &["198.18.1.0/24", "2001:db8:1::/48", NET_DENIED, PUB_A],
    );
    p.allow.push(allow_port(NET6_DENIED, 443, None));
    p.dns_servers = vec![addr(DNS4)];
    p.deny = vec![net(NET_DENIED), net(NET6_DENIED), net(DNS4)];
    bed.apply(&p);
    bed.expect_tcp_ok(NET_HOST, 443);
    bed.expect_udp_ok(NET_HOST, 443);
    bed.expect_tcp_ok(NET6_HOST, 443);
    bed.expect_tcp_ok(PUB_A, 443);
    bed.expect_tcp_refused(NET_DENIED, 443);
    bed.expect_udp_refused(NET_DENIED, 443);
    bed.expect_tcp_refused(NET6_DENIED, 443);
    bed.expect_udp_refused(NET6_DENIED, 443);
    // A deny beats the DNS server rule as well.
    bed.expect_udp_refused(DNS4, 53);
    bed.expect_tcp_refused(DNS4, 53);
}

#[test]
fn port_and_protocol_scopes_open_only_what_they_name() {
    let bed = bed!();
    let mut p = Policy::new(Mode::DenyAll);
    p.allow = vec![
        allow_port(SCOPED, 443, Some(Protocol::Tcp)),
        allow_port(UDP_ONLY, 53, Some(Protocol::Udp)),
        allow_port(PUB_B, 8080, None),
        allow_port(PUB6_B, 443, Some(Protocol::Tcp)),
    ];
    bed.apply(&p);
    // 443/tcp: TCP 443 only.
    bed.expect_tcp_ok(SCOPED, 443);
    bed.expect_tcp_refused(SCOPED, 80);
    bed.expect_tcp_refused(SCOPED, 8080);
    bed.expect_udp_refused(SCOPED, 443);
    // 53/udp: UDP 53 only.
    bed.expect_udp_ok(UDP_ONLY, 53);
    bed.expect_tcp_refused(UDP_ONLY, 53);
    bed.expect_udp_refused(UDP_ONLY, 443);
    // A port without a protocol opens TCP and UDP on that port.
    bed.expect_tcp_ok(PUB_B, 8080);
    bed.expect_udp_ok(PUB_B, 8080);
    bed.expect_tcp_refused(PUB_B, 80);
    bed.expect_udp_refused(PUB_B, 443);
    // IPv6 scopes.
    bed.expect_tcp_ok(PUB6_B, 443);
    bed.expect_tcp_refused(PUB6_B, 80);
    bed.expect_udp_refused(PUB6_B, 443);
}

#[test]
fn dns_goes_only_to_the_configured_servers() {
    let bed = bed!();
    let mut p = Policy::new(Mode::DenyAll);
    p.dns_servers = vec![addr(DNS4), addr(DNS6)];
    bed.apply(&p);
    bed.expect_udp_ok(DNS4, 53);
    bed.expect_tcp_ok(DNS4, 53);
    bed.expect_udp_ok(DNS6, 53);
    bed.expect_tcp_ok(DNS6, 53);
    // Port 53 anywhere else is refused, and the resolvers serve nothing but DNS.
    for host in [OTHER53, PUB_A, PUB6_A] {
        bed.expect_udp_refused(host, 53);
        bed.expect_tcp_refused(host, 53);
    }
    bed.expect_udp_refused(DNS4, 443);
    bed.expect_tcp_refused(DNS4, 80);
    bed.expect_tcp_refused(DNS6, 443);
}

#[test]
fn host_loopback_opens_only_its_tcp_ports() {
    let bed = bed!();
    let mut p = Policy::new(Mode::DenyAll);
    p.host_loopback = Some(HostLoopback {
        gateway: addr(GATEWAY4),
        ports: vec![8080, 22],
    });
    bed.apply(&p);
    bed.expect_tcp_ok(GATEWAY4, 8080);
    bed.expect_tcp_ok(GATEWAY4, 22);
    bed.expect_tcp_refused(GATEWAY4, 80);
    bed.expect_tcp_refused(GATEWAY4, 443);
    bed.expect_udp_refused(GATEWAY4, 8080);
    // The ports belong to the gateway only.
    bed.expect_tcp_refused(PUB_A, 8080);
}

#[test]
fn bypass_accepts_public_but_not_private_or_denied() {
    let bed = bed!();
    let mut p = Policy::new(Mode::Bypass);
    p.deny = vec![net(PUB_B), net(PUB6_B)];
    bed.apply(&p);
    for host in [PUB_A, FAR, OTHER53, PUB6_A] {
        bed.expect_tcp_ok(host, 443);
        bed.expect_udp_ok(host, 443);
    }
    for host in [PUB_B, PUB6_B, PRIV_172, PRIV_192, METADATA, CGNAT, ULA] {
        bed.expect_tcp_refused(host, 443);
        bed.expect_udp_refused(host, 443);
    }
}

#[test]
fn bypass_all_reaches_private_ranges_but_not_denied() {
    let bed = bed!();
    let mut p = Policy::new(Mode::BypassAll);
    p.deny = vec![net(PUB_B), net(PRIV_192), net(PUB6_B)];
    bed.apply(&p);
    for host in [PUB_A, FAR, PUB6_A, PRIV_172, METADATA, CGNAT, ULA] {
        bed.expect_tcp_ok(host, 80);
        bed.expect_udp_ok(host, 53);
    }
    for host in [PUB_B, PRIV_192, PUB6_B] {
        bed.expect_tcp_refused(host, 80);
        bed.expect_udp_refused(host, 53);
    }
}

/// Bind a listener inside the container and connect to it from there (one fresh thread).
fn container_loopback(bed: &Bed, host: &'static str) -> Result<String, String> {
    run_in(&bed.container_path(), Duration::from_secs(5), move || {
        let listener = TcpListener::bind((addr(host), 0)).map_err(|e| e.to_string())?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        let mut client = TcpStream::connect_timeout(&local, Duration::from_secs(2))
            .map_err(|e| format!("connect {local}: {e}"))?;
        let (mut server, _) = listener.accept().map_err(|e| e.to_string())?;
        use std::io::{Read, Write};
        server.write_all(b"loop").map_err(|e| e.to_string())?;
        drop(server);
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let mut got = String::new();
        client.read_to_string(&mut got).map_err(|e| e.to_string())?;
        Ok(got)
    })?
}

#[test]
fn block_refuses_everything_but_loopback() {
    let bed = bed!();
    let mut p = policy(Mode::Block, &[PUB_A, PUB6_A, "198.18.1.0/24"]);
    p.dns_servers = vec![addr(DNS4)];
    p.host_loopback = Some(HostLoopback {
        gateway: addr(GATEWAY4),
        ports: vec![8080],
    });
    bed.apply(&p);
    for host in [PUB_A, NET_HOST, DNS4, PUB_B, PRIV_172, PUB6_A] {
        bed.expect_tcp_refused(host, 443);
        bed.expect_udp_refused(host, 443);
    }
    bed.expect_udp_refused(DNS4, 53);
    bed.expect_tcp_refused(DNS4, 53);
    bed.expect_tcp_refused(GATEWAY4, 8080);
    assert_eq!(container_loopback(&bed, "127.0.0.1").as_deref(), Ok("loop"));
    assert_eq!(container_loopback(&bed, "::1").as_deref(), Ok("loop"));
}

#[test]
fn reapplying_replaces_the_table_when_switching_modes() {
    let bed = bed!();
    let mut p = policy(Mode::DenyAll, &[PUB_A]);
    p.deny = vec![net(PUB6_B)];
    for mode in [
        Mode::DenyAll,
        Mode::Bypass,
        Mode::DenyAll,
        Mode::BypassAll,
        Mode::Block,
        Mode::DenyAll,
    ] {
        p.mode = mode;
        bed.apply(&p);
        assert_eq!(tables(&bed), ["inet terok_shield"], "after {mode:?}");
        match mode {
            Mode::DenyAll => {
                bed.expect_tcp_ok(PUB_A, 80);
                bed.expect_tcp_refused(PUB_B, 80);
                bed.expect_tcp_refused(PRIV_172, 80);
            }
            Mode::Bypass => {
                bed.expect_tcp_ok(PUB_A, 80);
                bed.expect_tcp_ok(PUB_B, 80);
                bed.expect_tcp_refused(PRIV_172, 80);
            }
            Mode::BypassAll => {
                bed.expect_tcp_ok(PUB_B, 80);
                bed.expect_tcp_ok(PRIV_172, 80);
            }
            Mode::Block => {
                bed.expect_tcp_refused(PUB_A, 80);
            }
        }
        bed.expect_tcp_refused(PUB6_B, 80);
    }
    // Re-applying the same policy is idempotent.
    bed.apply(&p);
    bed.apply(&p);
    assert_eq!(tables(&bed), ["inet terok_shield"]);
    bed.expect_tcp_ok(PUB_A, 80);
}

#[test]
fn apply_never_touches_other_tables() {
    let bed = bed!();
    let other = "table inet other {
        set keep { type ipv4_addr; elements = { 198.51.100.77, 198.51.100.78 }; }
        chain mine { ip daddr @keep drop; }
        chain hooked { type filter hook prerouting priority -300; policy accept; }
    }
    table ip legacy { chain c { ip daddr 198.51.100.99 accept; }; }
    ";
    bed.nft().run_script(other).unwrap();
    let snapshot = |bed: &Bed| {
        (
            bed.nft_cli(&["-j", "list", "table", "inet", "other"])
                .unwrap(),
            bed.nft_cli(&["-j", "list", "table", "ip", "legacy"])
                .unwrap(),
        )
    };
    let before = snapshot(&bed);
    for mode in [Mode::DenyAll, Mode::Block, Mode::BypassAll, Mode::DenyAll] {
        bed.apply(&policy(mode, &[PUB_A]));
        assert_eq!(snapshot(&bed), before, "after applying {mode:?}");
    }
    let mut names = tables(&bed);
    names.sort();
    assert_eq!(names, ["inet other", "inet terok_shield", "ip legacy"]);
    bed.nft().delete_table().unwrap();
    assert_eq!(snapshot(&bed), before, "after deleting the shield table");
    assert_eq!(tables(&bed).len(), 2);
}

/// A fake `nft` in a fresh directory; removed on drop.
struct FakeNft(std::path::PathBuf);

impl FakeNft {
    fn new(tag: &str, body: &str) -> FakeNft {
        use std::os::unix::fs::PermissionsExt;
        let dir =
            std::env::temp_dir().join(format!("terok-shield-it-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("nft");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        FakeNft(dir)
    }

    fn nft(&self, bed: &Bed) -> Nft {
        Nft::at(self.0.join("nft")).in_netns(bed.container_path())
    }
}

impl Drop for FakeNft {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn failing_nft_is_an_error_and_leaves_the_firewall_closed() {
    let bed = bed!();
    let good = policy(Mode::DenyAll, &[PUB_A]);
    bed.apply(&good);
    let open = policy(Mode::BypassAll, &[]);

    let missing = Nft::at("/nonexistent/nft").in_netns(bed.container_path());
    let err = apply(&missing, &open).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/nft"), "{err}");

    let gone = Nft::locate()
        .unwrap()
        .in_netns("/run/netns/tsc-does-not-exist");
    let err = apply(&gone, &open).unwrap_err();
    assert!(err.to_string().contains("tsc-does-not-exist"), "{err}");

    let fails = FakeNft::new(
        "fails",
        "cat >/dev/null; echo 'Error: synthetic failure' >&2; exit 1",
    );
    let err = apply(&fails.nft(&bed), &open).unwrap_err();
    assert!(matches!(err, FirewallError::Load(_)), "{err:?}");
    assert!(err.to_string().contains("synthetic failure"), "{err}");

    // An nft that claims success but loads nothing must not pass verification.
    let liar = FakeNft::new(
        "liar",
        "cat >/dev/null; case \"$1\" in -j) echo '{\"nftables\": [{\"metainfo\": {}}]}';; esac; exit 0",
    );
    let err = apply(&liar.nft(&bed), &open).unwrap_err();
    assert!(
        matches!(err, FirewallError::Verify(_) | FirewallError::Missing),
        "{err:?}"
    );

    let garbage = FakeNft::new("garbage", "cat >/dev/null; echo 'not json'; exit 0");
    let err = apply(&garbage.nft(&bed), &open).unwrap_err();
    assert!(matches!(err, FirewallError::Read(_)), "{err:?}");

    // Through all of that, the good policy stayed in force.
    terok_shield::effects::firewall::check(&bed.nft(), &good).unwrap();
    bed.expect_tcp_ok(PUB_A, 80);
    bed.expect_tcp_refused(PUB_B, 80);
    bed.expect_tcp_refused(PRIV_172, 80);
}

/// A TCP connect from the world to `host:port` in the container (300 ms limit).
fn knock_from_world(bed: &Bed, host: &str, port: u16) -> std::io::Result<()> {
    let dst = SocketAddr::new(addr(host), port);
    run_in(&bed.world.path(), Duration::from_secs(5), move || {
        TcpStream::connect_timeout(&dst, Duration::from_millis(300)).map(|_| ())
    })
    .unwrap()
}

#[test]
fn unsolicited_inbound_connections_are_dropped() {
    let bed = bed!();
    // A listener inside the container (created on a thread that joined its netns).
    let listener = run_in(&bed.container_path(), Duration::from_secs(5), || {
        TcpListener::bind(("::", 9000))
    })
    .unwrap()
    .unwrap();
    listener.set_nonblocking(true).unwrap();
    let knock = |host| knock_from_world(&bed, host, 9000);
    // Without the shield the world can connect in; with it, the SYN is silently dropped.
    knock(CONTAINER4).expect("control: inbound works before the shield");
    knock(CONTAINER6).expect("control: inbound works before the shield (IPv6)");
    bed.apply(&policy(Mode::DenyAll, &[PUB_A, PUB6_A]));
    for host in [CONTAINER4, CONTAINER6] {
        let err = knock(host).expect_err("inbound connection got through the input chain");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{host}: {err}");
    }
    // Outbound still works, so the drop is the input policy and not a dead link.
    bed.expect_tcp_ok(PUB_A, 80);
    bed.expect_tcp_ok(PUB6_A, 80);
    drop(listener);
}

/// Published ports (`podman run -p`): new connections to them come in, to any other port
/// they do not; block mode closes them too.
#[test]
fn published_ports_alone_accept_inbound_connections() {
    let bed = bed!();
    let listeners = run_in(&bed.container_path(), Duration::from_secs(5), || {
        (
            TcpListener::bind(("::", 9000)),
            TcpListener::bind(("::", 9001)),
        )
    })
    .unwrap();
    let (a, b) = (listeners.0.unwrap(), listeners.1.unwrap());
    let knock = |host, port| knock_from_world(&bed, host, port);
    let mut p = policy(Mode::DenyAll, &[PUB_A]);
    p.inbound = vec!["9000/tcp".parse().unwrap()];
    bed.apply(&p);
    for host in [CONTAINER4, CONTAINER6] {
        knock(host, 9000).unwrap_or_else(|e| panic!("{host}:9000 published, yet {e}"));
        let err = knock(host, 9001).expect_err("an unpublished port let a connection in");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{host}: {err}");
    }
    p.mode = Mode::Block;
    bed.apply(&p);
    let err = knock(CONTAINER4, 9000).expect_err("block mode let a connection in");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    drop((a, b));
}

/// The harness's own assertions must be able to fail: each is checked against traffic
/// that contradicts it.
#[test]
fn assertions_fail_when_the_packets_disagree() {
    let bed = bed!();
    let fails = |what: &str, f: &dyn Fn()| {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        assert!(
            r.is_err(),
            "assertion `{what}` passed but should have failed"
        );
    };
    // No firewall: everything answers.
    fails("tcp refused", &|| bed.expect_tcp_refused(PUB_A, 80));
    fails("udp refused", &|| bed.expect_udp_refused(PUB_A, 53));
    fails("udp6 refused", &|| bed.expect_udp_refused(PUB6_A, 53));
    bed.apply(&policy(Mode::DenyAll, &[PUB_A]));
    fails("tcp ok", &|| bed.expect_tcp_ok(PUB_B, 80));
    fails("udp ok", &|| bed.expect_udp_ok(PUB_B, 53));
    // A silent drop is neither a reply nor a fast refusal.
    bed.nft()
        .run_script("insert rule inet terok_shield output ip daddr 198.18.200.7 drop\n")
        .unwrap();
    fails("tcp refused (drop)", &|| bed.expect_tcp_refused(FAR, 80));
    fails("udp refused (drop)", &|| bed.expect_udp_refused(FAR, 53));
}

#[test]
fn apply_fresh_installs_once_and_refuses_to_merge() {
    let bed = bed!();
    let first = policy(Mode::DenyAll, &[PUB_A]);
    terok_shield::effects::firewall::apply_fresh(&bed.nft(), &first)
        .unwrap_or_else(|e| panic!("apply_fresh into a new namespace: {e}"));
    bed.expect_tcp_ok(PUB_A, 80);
    bed.expect_tcp_refused(PUB_B, 80);
    // A second fresh install over a live table cannot verify; what is live stays closed.
    let second = policy(Mode::DenyAll, &[PUB_A, PUB_B]);
    let err = terok_shield::effects::firewall::apply_fresh(&bed.nft(), &second)
        .expect_err("apply_fresh over an existing table must not verify");
    assert!(matches!(err, FirewallError::Verify(_)), "{err:?}");
    assert_eq!(tables(&bed), ["inet terok_shield"]);
    bed.expect_tcp_refused(FAR, 80);
    bed.expect_tcp_refused(PRIV_172, 80);
    bed.expect_udp_refused(FAR, 53);
    // A normal apply then restores exactly the requested policy.
    bed.apply(&second);
    bed.expect_tcp_ok(PUB_B, 80);
}

/// Add DNS-learned elements by hand, as a resolver would (`dns_v4`/`dns_v6`, with timeouts).
fn learn(bed: &Bed, set: &str, addrs: &[&str]) {
    let elems: Vec<String> = addrs.iter().map(|a| format!("{a} timeout 60s")).collect();
    bed.nft_cli(&[
        "add",
        "element",
        "inet",
        "terok_shield",
        set,
        &format!("{{ {} }}", elems.join(", ")),
    ])
    .unwrap_or_else(|e| panic!("cannot add to {set}: {e}"));
}

/// DNS rebinding: a name that resolves to a private address teaches the resolver that
/// address, yet the ruleset checks private ranges before the learned sets, so only a literal
/// allow opens it.
#[test]
fn dns_learned_private_addresses_stay_rejected_unless_allowlisted() {
    let bed = bed!();
    bed.apply(&policy(Mode::DenyAll, &[PRIV_192]));
    learn(&bed, "dns_v4", &[PUB_B, PRIV_172, PRIV_192, CGNAT]);
    learn(&bed, "dns_v6", &[PUB6_B, ULA]);
    bed.expect_tcp_ok(PUB_B, 443);
    bed.expect_tcp_ok(PUB6_B, 443);
    bed.expect_tcp_ok(PRIV_192, 443);
    for private in [PRIV_172, CGNAT, ULA] {
        bed.expect_tcp_refused(private, 443);
        bed.expect_udp_refused(private, 443);
    }
}

/// Send one datagram from `src` (IP_FREEBIND, so `src` need not be local) to `listen` inside
/// the container netns. Ok(received?) or Err(the kernel refused to send it).
fn spoofed_datagram(bed: &Bed, src: SocketAddr, listen: SocketAddr) -> Result<bool, String> {
    run_in(&bed.container_path(), Duration::from_secs(5), move || {
        use rustix::net::{bind, sendto, socket, sockopt, AddressFamily, SendFlags, SocketType};
        let listener = std::net::UdpSocket::bind(listen).expect("bind listener");
        listener
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let family = if src.is_ipv4() {
            AddressFamily::INET
        } else {
            AddressFamily::INET6
        };
        let fd = socket(family, SocketType::DGRAM, None).expect("socket");
        if src.is_ipv4() {
            sockopt::set_ip_freebind(&fd, true).expect("IP_FREEBIND");
        } else {
            sockopt::set_ipv6_freebind(&fd, true).expect("IPV6_FREEBIND");
        }
        bind(&fd, &src).expect("bind sender");
        sendto(&fd, b"forged", SendFlags::empty(), &listen).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        Ok(listener.recv(&mut buf).is_ok())
    })
    .expect("netns thread")
}

/// A workload socket that claims the DNS upstream's address (IP_FREEBIND needs no
/// privilege) must not deliver a forged reply to a resolver's upstream socket, on loopback
/// or on the container's own address. Over IPv4 the kernel refuses to send such datagrams;
/// over IPv6 it sends them, and the input chain drops them.
#[test]
fn forged_dns_replies_inside_the_container_never_arrive() {
    let bed = bed!();
    let sa = |s: &str| -> SocketAddr { s.parse().unwrap() };
    // Without the shield, the IPv6 forgery arrives: the rule below is what stops it.
    assert_eq!(
        spoofed_datagram(&bed, sa("[2001:db8::53]:53"), sa("[::1]:40000")),
        Ok(true)
    );
    bed.apply(&Policy::new(Mode::DenyAll));
    // Controls: loopback sources are delivered, and so are forged non-DNS source ports.
    assert_eq!(
        spoofed_datagram(&bed, sa("127.0.0.1:53"), sa("127.0.0.1:40001")),
        Ok(true)
    );
    assert_eq!(
        spoofed_datagram(&bed, sa("[::1]:53"), sa("[::1]:40002")),
        Ok(true)
    );
    assert_eq!(
        spoofed_datagram(&bed, sa("[2001:db8::53]:5353"), sa("[::1]:40003")),
        Ok(true)
    );
    for (src, dst) in [
        ("198.51.100.53:53", "127.0.0.1:40004"),
        ("198.51.100.53:53", "198.51.100.2:40005"),
        ("[2001:db8::53]:53", "[::1]:40006"),
        ("[2001:db8::53]:53", "[2001:db8:ffff::2]:40007"),
    ] {
        let r = spoofed_datagram(&bed, sa(src), sa(dst));
        assert!(r != Ok(true), "{src} -> {dst}: a forged DNS reply arrived");
    }
}

/// The dnsmasq tier: DNS may leave only from dnsmasq's query port, to any server; every other
/// source port is refused at once.
#[test]
fn only_the_dnsmasq_query_port_may_send_dns() {
    let bed = bed!();
    let mut p = Policy::new(Mode::DenyAll);
    p.resolver_port = Some(terok_shield::core::dnsmasq::QUERY_PORT);
    bed.apply(&p);
    bed.expect_udp_refused(DNS4, 53);
    bed.expect_tcp_refused(DNS4, 53);
    let from_query_port = |dst: &str| {
        let dst: SocketAddr = SocketAddr::new(addr(dst), 53);
        run_in(&bed.container_path(), Duration::from_secs(5), move || {
            let bind: SocketAddr = if dst.is_ipv4() {
                "0.0.0.0:53053".parse().unwrap()
            } else {
                "[::]:53053".parse().unwrap()
            };
            let s = std::net::UdpSocket::bind(bind).expect("bind query port");
            s.connect(dst).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(1500)))
                .unwrap();
            s.send(b"query").map_err(|e| e.to_string())?;
            let mut buf = [0u8; 512];
            s.recv(&mut buf)
                .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
                .map_err(|e| e.to_string())
        })
        .expect("netns thread")
    };
    for dst in [DNS4, DNS6] {
        let reply = from_query_port(dst).unwrap_or_else(|e| panic!("{dst}: {e}"));
        assert!(reply.contains(dst), "{dst}: {reply}");
    }
    // The port opens DNS only, not other services of the same server.
    bed.expect_udp_refused(DNS4, 443);
}
