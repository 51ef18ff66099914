//! One test's network: a container netns, a world netns, a veth pair between them, and
//! assertions about what a packet from the container meets.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use terok_shield::core::policy::Policy;
use terok_shield::effects::firewall::{apply, ApplyReport};
use terok_shield::effects::nft::Nft;

use super::cmd::{self, ip_or_panic};
use super::netns::Netns;
use super::probe::{self, Outcome, Stage};
use super::world::{self, Hit, WorldServer};

/// A refusal must arrive at once: the shield rejects, it never lets a client wait.
pub const FAST: Duration = Duration::from_millis(100);

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Parse one of the address constants of [`world`].
pub fn addr(host: &str) -> IpAddr {
    host.parse()
        .unwrap_or_else(|e| panic!("bad test address {host}: {e}"))
}

/// A container namespace whose every route leads into a world namespace.
pub struct Bed {
    // Field order is drop order: stop the servers, then delete the namespaces.
    server: WorldServer,
    pub container: Netns,
    pub world: Netns,
    nonce: AtomicUsize,
}

impl Bed {
    /// Build the namespaces, link and addresses, and start the world's servers.
    pub fn new() -> Bed {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let container = Netns::create(format!("tsc-{pid}-{n}"));
        let world = Netns::create(format!("tsw-{pid}-{n}"));
        for ns in [&container, &world] {
            // Addresses are usable at once, so the first packet does not race DAD.
            ns.sysctl("net/ipv6/conf/all/accept_dad", "0");
            ns.sysctl("net/ipv6/conf/default/accept_dad", "0");
        }
        // Bounds every blocking connect that meets a silent drop to about 3 s.
        container.sysctl("net/ipv4/tcp_syn_retries", "1");
        let (c, w) = (container.name(), world.name());
        ip_or_panic(&[
            "-n", c, "link", "add", "eth0", "type", "veth", "peer", "name", "wan0", "netns", w,
        ]);
        ip_or_panic(&["-n", c, "link", "set", "eth0", "up"]);
        ip_or_panic(&["-n", w, "link", "set", "wan0", "up"]);
        let cidr = |a: &str, len: u8| format!("{a}/{len}");
        ip_or_panic(&[
            "-n",
            c,
            "addr",
            "add",
            &cidr(world::CONTAINER4, 24),
            "dev",
            "eth0",
        ]);
        ip_or_panic(&[
            "-n",
            c,
            "addr",
            "add",
            &cidr(world::CONTAINER6, 64),
            "dev",
            "eth0",
            "nodad",
        ]);
        ip_or_panic(&[
            "-n",
            w,
            "addr",
            "add",
            &cidr(world::GATEWAY4, 24),
            "dev",
            "wan0",
        ]);
        ip_or_panic(&[
            "-n",
            w,
            "addr",
            "add",
            &cidr(world::GATEWAY6, 64),
            "dev",
            "wan0",
            "nodad",
        ]);
        ip_or_panic(&["-n", c, "route", "add", "default", "via", world::GATEWAY4]);
        ip_or_panic(&[
            "-n",
            c,
            "-6",
            "route",
            "add",
            "default",
            "via",
            world::GATEWAY6,
        ]);
        // The world's hosts live on its loopback (no dummy module needed).
        for host in world::HOSTS {
            if addr(host).is_ipv4() {
                ip_or_panic(&["-n", w, "addr", "add", &cidr(host, 32), "dev", "lo"]);
            } else {
                ip_or_panic(&[
                    "-n",
                    w,
                    "addr",
                    "add",
                    &cidr(host, 128),
                    "dev",
                    "lo",
                    "nodad",
                ]);
            }
        }
        ip_or_panic(&[
            "-n",
            w,
            "route",
            "add",
            "local",
            world::ANYIP_V4,
            "dev",
            "lo",
        ]);
        let server = WorldServer::start(&world);
        Bed {
            server,
            container,
            world,
            nonce: AtomicUsize::new(0),
        }
    }

    /// nft bound to the container's network namespace.
    pub fn nft(&self) -> Nft {
        Nft::locate()
            .expect("nft present (checked by require_privileges)")
            .in_netns(self.container.path())
    }

    pub fn container_path(&self) -> PathBuf {
        self.container.path()
    }

    /// Apply `policy` to the container through the real apply path; panic on any error.
    pub fn apply(&self, policy: &Policy) -> ApplyReport {
        apply(&self.nft(), policy).unwrap_or_else(|e| panic!("apply {:?}: {e}", policy.mode))
    }

    /// Run `nft args...` in the container netns (for inspecting tables that are not ours).
    pub fn nft_cli(&self, args: &[&str]) -> Result<String, String> {
        let mut full = vec!["netns", "exec", self.container.name(), "nft"];
        full.extend_from_slice(args);
        cmd::run_ok("ip", &full, Duration::from_secs(30)).map(|o| o.stdout)
    }

    /// Everything the world received so far.
    pub fn hits(&self) -> Vec<Hit> {
        self.server.hits()
    }

    pub fn tcp(&self, host: &str, port: u16) -> Outcome {
        probe::tcp(&self.container_path(), SocketAddr::new(addr(host), port))
    }

    pub fn udp(&self, host: &str, port: u16) -> Outcome {
        let n = self.nonce.fetch_add(1, Ordering::SeqCst);
        probe::udp(
            &self.container_path(),
            SocketAddr::new(addr(host), port),
            format!("probe-{n}"),
        )
    }

    fn hits_to(&self, tcp: bool, host: &str, port: u16, since: usize) -> Vec<Hit> {
        let dst = SocketAddr::new(addr(host), port);
        self.hits()
            .into_iter()
            .skip(since)
            .filter(|h| h.tcp == tcp && h.local == dst)
            .collect()
    }

    /// TCP to `host:port` connects, the banner names that very address, and the world saw
    /// the container's own address as the peer (no NAT, no detour).
    #[track_caller]
    pub fn expect_tcp_ok(&self, host: &str, port: u16) {
        let outcome = self.tcp(host, port);
        let Outcome::Reply { text, .. } = &outcome else {
            panic!("TCP {host} port {port}: expected a connection, got {outcome}");
        };
        let served = format!("X-Served-By: {} {port}", addr(host));
        assert!(
            text.contains(&served),
            "TCP {host} port {port}: banner {text:?} lacks {served:?}"
        );
        self.expect_seen(true, host, port);
    }

    /// TCP to `host:port` is refused with a reset: ECONNREFUSED on a blocking connect in
    /// under [`FAST`], and the world never saw the connection.
    #[track_caller]
    pub fn expect_tcp_refused(&self, host: &str, port: u16) {
        let since = self.hits().len();
        let outcome = self.tcp(host, port);
        match &outcome {
            Outcome::Error {
                stage: Stage::Connect,
                errno: Some(e),
                elapsed,
                ..
            } if *e == rustix::io::Errno::CONNREFUSED.raw_os_error() => {
                assert!(
                    *elapsed < FAST,
                    "TCP {host} port {port}: refused, but only after {elapsed:?} (limit {FAST:?})"
                );
            }
            _ => panic!("TCP {host} port {port}: expected ECONNREFUSED at connect, got {outcome}"),
        }
        let leaked = self.hits_to(true, host, port, since);
        assert!(
            leaked.is_empty(),
            "TCP {host} port {port}: refused locally, yet the world saw {leaked:?}"
        );
    }

    /// A UDP datagram to `host:port` comes back from that address.
    #[track_caller]
    pub fn expect_udp_ok(&self, host: &str, port: u16) {
        let outcome = self.udp(host, port);
        let Outcome::Reply { text, .. } = &outcome else {
            panic!("UDP {host} port {port}: expected an echo, got {outcome}");
        };
        let prefix = format!("echo {} {port} probe-", addr(host));
        assert!(
            text.starts_with(&prefix),
            "UDP {host} port {port}: reply {text:?} does not start with {prefix:?}"
        );
        self.expect_seen(false, host, port);
    }

    /// A UDP datagram to `host:port` is rejected at once with an ICMP error and never
    /// reaches the world: the send fails with EPERM (the local reject verdict) and the
    /// socket then reports the ICMP admin-prohibited error the shield generated
    /// (EHOSTUNREACH for IPv4, EACCES for IPv6), both within [`FAST`].
    #[track_caller]
    pub fn expect_udp_refused(&self, host: &str, port: u16) {
        let since = self.hits().len();
        let outcome = self.udp(host, port);
        let want = udp_icmp_errno(addr(host));
        match &outcome {
            Outcome::Error {
                stage: Stage::Send,
                errno: Some(e),
                socket_error: Some((icmp, at)),
                ..
            } if *e == rustix::io::Errno::PERM.raw_os_error() && *icmp == want => {
                assert!(
                    *at < FAST,
                    "UDP {host} port {port}: rejected, but the ICMP error came only after {at:?} (limit {FAST:?})"
                );
            }
            _ => panic!(
                "UDP {host} port {port}: expected send to fail with EPERM, then socket error {}; got {outcome}",
                probe::errno_name(want)
            ),
        }
        let leaked = self.hits_to(false, host, port, since);
        assert!(
            leaked.is_empty(),
            "UDP {host} port {port}: rejected locally, yet the world saw {leaked:?}"
        );
    }

    #[track_caller]
    fn expect_seen(&self, tcp: bool, host: &str, port: u16) {
        let me = addr(if addr(host).is_ipv4() {
            world::CONTAINER4
        } else {
            world::CONTAINER6
        });
        // The world records a hit right after answering; allow it a moment.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let seen = self.hits_to(tcp, host, port, 0);
            if seen.iter().any(|h| h.peer.ip() == me) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} {host} port {port}: answered, but the world has no hit from {me}: {seen:?}",
                if tcp { "TCP" } else { "UDP" }
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The error a connected UDP socket reports for an ICMP admin-prohibited reject:
/// ICMP "communication administratively prohibited" maps to EHOSTUNREACH, its ICMPv6
/// counterpart to EACCES (measured; see `udp_reject_reports_icmp_admin_prohibited`).
pub fn udp_icmp_errno(dst: IpAddr) -> i32 {
    use rustix::io::Errno;
    match dst {
        IpAddr::V4(_) => Errno::HOSTUNREACH.raw_os_error(),
        IpAddr::V6(_) => Errno::ACCESS.raw_os_error(),
    }
}
