//! The fake internet for rootless containers.
//!
//! slirp4netns turns a container's connections into sockets of the host, so the servers
//! must be reachable from the host's own network namespace. A "world" netns is joined to the
//! host by a veth pair, and the host routes exactly the fake prefixes through it:
//!
//! ```text
//!  container --slirp4netns--> host sockets --tse2e-host (198.18.255.253, fd5e:ed00:ffff::1)
//!                                               |  veth
//!                              world netns   wan0 (198.18.255.254, fd5e:ed00:ffff::2)
//!                                            lo: every address in HOSTS, servers on them
//! ```
//!
//! Host routes: 198.51.100.0/24, 198.18.0.0/15, 2001:db8::/32 and fd5e:ed00::/48, nothing
//! else. Everything is created and removed by name; a run that crashed is swept at start.
//!
//! Servers, all in one thread of the test process inside the world: a banner on TCP 80 and
//! 443 of every host (then close), a stream on TCP [`STREAM_PORT`] of every host (a line
//! every 100 ms for at most 30 s, for tests that cut live connections), a UDP sink on
//! [`UDP_SINK_PORT`] of every host that records each datagram it receives (reassembled, with
//! its length), and a DNS server on 198.51.100.53 answering the zone in [`DNS_ZONE`] and
//! [`DNS_ZONE6`].
//!
//! [`World::count`] counts packets as they arrive in the world, before reassembly (every
//! fragment counts, and protocols no server listens for, such as ICMP echo, too): an nft
//! counter in the world's namespace, which the container cannot touch.
//!
//! The DNS server answers on UDP and TCP port 53 of every address in [`DNS_SERVERS`]. Its
//! zone ([`Zone`]) also holds the records of tests/e2e_dns_records.rs (CNAME chains, a name
//! truncated over UDP, an answer too big for UDP, private answers, per-record TTLs), and a
//! test may change it while containers run ([`World::set_records`]). Every question is logged
//! ([`World::dns_queries`] for the names, [`World::dns_log`] with transport and addresses).

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use super::cmd::ip;

/// Names of what the world adds to the host.
pub const WORLD_NS: &str = "tse2e-world";
pub const HOST_VETH: &str = "tse2e-host";
pub const WORLD_VETH: &str = "wan0";

pub const HOST_LINK4: &str = "198.18.255.253";
pub const WORLD_LINK4: &str = "198.18.255.254";
pub const HOST_LINK6: &str = "fd5e:ed00:ffff::1";
pub const WORLD_LINK6: &str = "fd5e:ed00:ffff::2";

/// Host routes through the world: the fake public prefixes and our ULA /48.
pub const ROUTES4: &[&str] = &["198.51.100.0/24", "198.18.0.0/15"];
pub const ROUTES6: &[&str] = &["2001:db8::/32", "fd5e:ed00::/48"];

/// Hosts of the fake internet (on the world's loopback).
pub const ALLOWED4: &str = "198.51.100.10";
pub const BLOCKED4: &str = "198.51.100.20";
pub const REUSE_A: &str = "198.51.100.30";
pub const REUSE_B: &str = "198.51.100.40";
pub const LIVE4: &str = "198.51.100.50";
pub const DNS4: &str = "198.51.100.53";
pub const NAMED4: &str = "198.51.100.60";
pub const SCOPED4: &str = "198.18.5.10";
pub const ALLOWED6: &str = "2001:db8::10";
pub const BLOCKED6: &str = "2001:db8::20";
pub const ULA6: &str = "fd5e:ed00::7";
/// Brought by both `pair.e2e.test` and `shared.e2e.test` (see [`DNS_ZONE`]).
pub const SHARED4: &str = "198.51.100.70";
/// Brought by `pair.e2e.test` only.
pub const PAIR4: &str = "198.51.100.71";
/// The AAAA record of `dual.e2e.test` (its A record is [`LIVE4`]).
pub const LIVE6: &str = "2001:db8::50";
/// Hosts in 198.19.0.0/16, for tests that allow many addresses there.
pub const CONC4_A: &str = "198.19.10.1";
pub const CONC4_B: &str = "198.19.11.148";

pub const HOSTS: &[&str] = &[
    ALLOWED4, BLOCKED4, REUSE_A, REUSE_B, LIVE4, DNS4, NAMED4, SCOPED4, ALLOWED6, BLOCKED6, ULA6,
    SHARED4, PAIR4, LIVE6, CONC4_A, CONC4_B,
];

/// TCP ports served on every world host (dual-stack wildcard listeners).
pub const TCP_PORTS: &[u16] = &[80, 443];

/// The streaming port of every world host: the connection stays open and the world writes
/// [`stream_line`] every [`STREAM_INTERVAL`], for at most [`STREAM_LIFETIME`].
pub const STREAM_PORT: u16 = 7070;
pub const STREAM_INTERVAL: Duration = Duration::from_millis(100);
pub const STREAM_LIFETIME: Duration = Duration::from_secs(30);
/// Streams open at once; further connections are closed at once (bounds the world's work).
const MAX_STREAMS: usize = 64;

/// The UDP port of every world host whose datagrams the world records ([`World::datagrams`]);
/// nothing answers there.
pub const UDP_SINK_PORT: u16 = 9;
/// Datagrams recorded at most (bounds the world's memory under a flood).
const MAX_DATAGRAMS: usize = 10_000;

/// The nft table in the world's namespace that holds the counters of [`World::count`].
const WATCH_TABLE: &str = "e2e_watch";

/// The fake DNS zone served on 198.51.100.53:53: A records (a name listed twice has two);
/// AAAA records come from [`DNS_ZONE6`]; other types of a known name get an empty NOERROR,
/// unknown names NXDOMAIN.
pub const DNS_ZONE: &[(&str, Ipv4Addr)] = &[
    ("svc.e2e.test", Ipv4Addr::new(198, 51, 100, 60)),
    ("pair.e2e.test", Ipv4Addr::new(198, 51, 100, 71)),
    ("pair.e2e.test", Ipv4Addr::new(198, 51, 100, 70)),
    ("shared.e2e.test", Ipv4Addr::new(198, 51, 100, 70)),
    ("dual.e2e.test", Ipv4Addr::new(198, 51, 100, 50)),
];
/// AAAA records of the fake zone.
pub const DNS_ZONE6: &[(&str, Ipv6Addr)] = &[(
    "dual.e2e.test",
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x50),
)];

/// Hosts of tests/e2e_dns_records.rs (on the world's loopback, like [`HOSTS`]).
/// `rotate.e2e.test` answers [`ROTATE_A4`] until a test rotates it to [`ROTATE_B4`].
pub const ROTATE_A4: &str = "198.51.100.81";
pub const ROTATE_B4: &str = "198.51.100.82";
/// The end of the CNAME chain `alias.e2e.test` -> `hop.e2e.test` -> `final.e2e.test`.
pub const CNAME4: &str = "198.51.100.83";
/// An A record of `stray.e2e.test` sent along with the answer for `alias.e2e.test` (not on
/// its CNAME chain).
pub const STRAY4: &str = "198.51.100.84";
/// The A record of `tc.e2e.test`, which the server only ever truncates over UDP.
pub const TC4: &str = "198.51.100.85";
/// The A record of `ttl.e2e.test` (TTL 300; tests clamp it with `dns.max_ttl`).
pub const TTL4: &str = "198.51.100.86";
/// The public A record of `rebind.e2e.test`.
pub const REBIND_PUB4: &str = "198.51.100.87";
/// The RFC 1918 A record of `rebind.e2e.test` (which also has the AAAA record [`ULA6`], a
/// private address the world does serve). Not routed into the world and not a world host:
/// tests never connect to it, they only check answers and sets.
pub const REBIND_PRIV4: &str = "172.16.5.7";
/// A DNS server that is not the configured upstream.
pub const OTHER_DNS4: &str = "198.51.100.54";
/// The fake DNS server on IPv6.
pub const DNS6: &str = "2001:db8::53";

/// The addresses the DNS server answers on (UDP and TCP port 53, same zone).
pub const DNS_SERVERS: &[&str] = &[DNS4, OTHER_DNS4, DNS6];

/// More world hosts, added next to [`HOSTS`] (kept apart so that list stays as it was).
pub const RECORD_HOSTS: &[&str] = &[
    ROTATE_A4,
    ROTATE_B4,
    CNAME4,
    STRAY4,
    TC4,
    TTL4,
    REBIND_PUB4,
    OTHER_DNS4,
    DNS6,
];

/// `big.e2e.test` has [`BIG_COUNT`] A records, [`big_addr`]`(0..BIG_COUNT)`: too many for a
/// 512-byte UDP answer. The whole prefix [`BIG_NET4`] is local to the world's loopback, so
/// every one of them serves the banners.
pub const BIG_NET4: &str = "198.18.6.0/26";
pub const BIG_COUNT: u8 = 40;

/// Address `i` (from 0) of `big.e2e.test`.
pub fn big_addr(i: u8) -> Ipv4Addr {
    assert!(i < BIG_COUNT);
    Ipv4Addr::new(198, 18, 6, 1 + i)
}

/// Classic DNS limit for an answer over UDP; longer answers go out truncated (TC=1).
pub const UDP_LIMIT: usize = 512;

/// Data of one record of the fake zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rdata {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// The target name.
    Cname(String),
}

impl Rdata {
    /// The record type code.
    pub fn rtype(&self) -> u16 {
        match self {
            Rdata::A(_) => 1,
            Rdata::Aaaa(_) => 28,
            Rdata::Cname(_) => 5,
        }
    }
}

/// One record of the fake zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneRecord {
    pub owner: String,
    pub ttl: u32,
    pub data: Rdata,
}

fn rr(owner: &str, ttl: u32, data: Rdata) -> ZoneRecord {
    ZoneRecord {
        owner: owner.to_string(),
        ttl,
        data,
    }
}

/// The zone the fake DNS server answers from. It answers like a recursive resolver would:
/// a question for a name that has a CNAME gets the CNAME and what the chain leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    pub records: Vec<ZoneRecord>,
    /// `(qname, record)`: an extra answer record sent with every answer to `qname` of the
    /// record's type, though it is not on the name's chain.
    pub extras: Vec<(String, ZoneRecord)>,
    /// Names always answered truncated (TC=1, no records) over UDP, whatever the size.
    pub truncate_udp: Vec<String>,
}

impl Default for Zone {
    /// [`DNS_ZONE`] and [`DNS_ZONE6`] (TTL 300), then the records of tests/e2e_dns_records.rs.
    fn default() -> Zone {
        let ip4 = |s: &str| Rdata::A(s.parse().unwrap());
        let mut records: Vec<ZoneRecord> = DNS_ZONE
            .iter()
            .map(|(n, a)| rr(n, 300, Rdata::A(*a)))
            .chain(DNS_ZONE6.iter().map(|(n, a)| rr(n, 300, Rdata::Aaaa(*a))))
            .collect();
        records.extend([
            rr("rotate.e2e.test", 300, ip4(ROTATE_A4)),
            rr("ttl.e2e.test", 300, ip4(TTL4)),
            rr("alias.e2e.test", 300, Rdata::Cname("hop.e2e.test".into())),
            rr("hop.e2e.test", 300, Rdata::Cname("final.e2e.test".into())),
            rr("final.e2e.test", 300, ip4(CNAME4)),
            rr("tc.e2e.test", 300, ip4(TC4)),
            rr("rebind.e2e.test", 300, ip4(REBIND_PUB4)),
            rr("rebind.e2e.test", 300, ip4(REBIND_PRIV4)),
            rr("rebind.e2e.test", 300, Rdata::Aaaa(ULA6.parse().unwrap())),
        ]);
        records.extend((0..BIG_COUNT).map(|i| rr("big.e2e.test", 300, Rdata::A(big_addr(i)))));
        Zone {
            records,
            extras: vec![(
                "alias.e2e.test".into(),
                rr("stray.e2e.test", 300, ip4(STRAY4)),
            )],
            truncate_udp: vec!["tc.e2e.test".into()],
        }
    }
}

/// One question the fake DNS server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsQuery {
    /// The question's name, lower case, no trailing dot.
    pub name: String,
    pub qtype: u16,
    pub tcp: bool,
    /// The server address the question came to.
    pub server: SocketAddr,
    pub peer: SocketAddr,
    /// The answer went out with TC=1 (and no records).
    pub truncated: bool,
}

/// One answer of the fake DNS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneAnswer {
    pub name: String,
    pub qtype: u16,
    pub reply: Vec<u8>,
    pub truncated: bool,
}

/// A world server lives at most this long, whatever happens to the test.
const SERVER_LIFETIME: Duration = Duration::from_secs(10 * 60);

/// The TCP banner: names the address and port that answered.
pub fn banner(ip: IpAddr, port: u16) -> String {
    format!("terok-e2e-world {ip} {port}\n")
}

/// Line `seq` (from 0) of a stream from `ip`.
pub fn stream_line(ip: IpAddr, seq: u64) -> String {
    format!("terok-e2e-stream {ip} {STREAM_PORT} {seq}\n")
}

/// One streaming connection as the world saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRecord {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// Lines handed to the kernel in full.
    pub lines: u64,
    /// Why the world stopped writing (None while it is open).
    pub ended: Option<String>,
}

/// One TCP connection the world accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

/// One UDP datagram the world received on [`UDP_SINK_PORT`] (after the kernel reassembled
/// its fragments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub len: usize,
}

/// The world: namespace, veth, host routes and servers; all removed on drop.
pub struct World {
    stop: Arc<AtomicBool>,
    hits: Arc<Mutex<Vec<Hit>>>,
    datagrams: Arc<Mutex<Vec<Datagram>>>,
    dns_queries: Arc<Mutex<Vec<String>>>,
    streams: Arc<Mutex<Vec<StreamRecord>>>,
    zone: Arc<Mutex<Zone>>,
    dns_log: Arc<Mutex<Vec<DnsQuery>>>,
    done: Option<mpsc::Receiver<()>>,
}

impl World {
    /// Sweep leftovers, then build the world and start its servers.
    pub fn up() -> World {
        sweep();
        let mut world = World {
            stop: Arc::new(AtomicBool::new(false)),
            hits: Arc::new(Mutex::new(Vec::new())),
            datagrams: Arc::new(Mutex::new(Vec::new())),
            dns_queries: Arc::new(Mutex::new(Vec::new())),
            streams: Arc::new(Mutex::new(Vec::new())),
            zone: Arc::new(Mutex::new(Zone::default())),
            dns_log: Arc::new(Mutex::new(Vec::new())),
            done: None,
        };
        if let Err(e) = build() {
            sweep();
            panic!("cannot build the e2e world: {e}");
        }
        world.done = Some(start_servers(
            world.stop.clone(),
            world.hits.clone(),
            world.datagrams.clone(),
            Dns {
                zone: world.zone.clone(),
                queries: world.dns_queries.clone(),
                log: world.dns_log.clone(),
                tcp_handlers: Arc::new(AtomicUsize::new(0)),
            },
            world.streams.clone(),
        ));
        world
    }

    /// Every TCP connection accepted so far (DNS over TCP included).
    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// How many connections the world has accepted so far (for [`World::saw_since`]).
    pub fn mark(&self) -> usize {
        self.hits.lock().unwrap().len()
    }

    /// Whether the world accepted a TCP connection on `host:port` after `mark`.
    pub fn saw_since(&self, mark: usize, host: &str, port: u16) -> bool {
        let want = SocketAddr::new(host.parse().unwrap(), port);
        self.hits().iter().skip(mark).any(|h| h.local == want)
    }

    /// Every datagram received on [`UDP_SINK_PORT`] so far.
    pub fn datagrams(&self) -> Vec<Datagram> {
        self.datagrams.lock().unwrap().clone()
    }

    /// Count, from now on, the packets arriving in the world that match the nft expression
    /// `expr` (e.g. `ip daddr 198.51.100.20`), in a counter called `name`; read it with
    /// [`World::packets`]. The rule sits in prerouting before conntrack's defragmentation, so
    /// each fragment counts, and it sees every protocol, served or not.
    #[track_caller]
    pub fn count(&self, name: &str, expr: &str) {
        world_nft(&format!(
            "add table inet {WATCH_TABLE}; \
             add chain inet {WATCH_TABLE} arrive {{ type filter hook prerouting priority -450; }}; \
             add counter inet {WATCH_TABLE} {name}; \
             add rule inet {WATCH_TABLE} arrive {expr} counter name {name}"
        ));
    }

    /// Packets counted so far by the counter `name` of [`World::count`].
    #[track_caller]
    pub fn packets(&self, name: &str) -> u64 {
        let out = world_nft(&format!("-j list counter inet {WATCH_TABLE} {name}"));
        let doc: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("counter {name}: not JSON ({e}): {out}"));
        doc["nftables"]
            .as_array()
            .and_then(|items| items.iter().find_map(|i| i["counter"]["packets"].as_u64()))
            .unwrap_or_else(|| panic!("counter {name}: no packets in {out}"))
    }

    /// Names the fake DNS server was asked for.
    pub fn dns_queries(&self) -> Vec<String> {
        self.dns_queries.lock().unwrap().clone()
    }

    /// Every streaming connection so far (see [`STREAM_PORT`]).
    pub fn streams(&self) -> Vec<StreamRecord> {
        self.streams.lock().unwrap().clone()
    }

    /// Every question the DNS server answered, with transport and addresses.
    pub fn dns_log(&self) -> Vec<DnsQuery> {
        self.dns_log.lock().unwrap().clone()
    }

    /// Replace every record owned by `owner` with `records` (`(data, ttl)`), from the next
    /// question on: a name "rotates" while the containers run.
    pub fn set_records(&self, owner: &str, records: &[(Rdata, u32)]) {
        let mut zone = self.zone.lock().unwrap();
        zone.records.retain(|r| r.owner != owner);
        zone.records
            .extend(records.iter().map(|(d, ttl)| rr(owner, *ttl, d.clone())));
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(done) = self.done.take() {
            if done.recv_timeout(Duration::from_secs(5)).is_err() {
                eprintln!("e2e cleanup: world server thread did not stop within 5 s");
            }
        }
        sweep();
    }
}

fn build() -> Result<(), String> {
    let w = WORLD_NS;
    ip(&["netns", "add", w])?;
    ip(&["-n", w, "link", "set", "lo", "up"])?;
    ip(&[
        "link", "add", HOST_VETH, "type", "veth", "peer", "name", WORLD_VETH, "netns", w,
    ])?;
    ip(&["addr", "add", &format!("{HOST_LINK4}/30"), "dev", HOST_VETH])?;
    ip(&[
        "addr",
        "add",
        &format!("{HOST_LINK6}/64"),
        "dev",
        HOST_VETH,
        "nodad",
    ])?;
    ip(&["link", "set", HOST_VETH, "up"])?;
    ip(&[
        "-n",
        w,
        "addr",
        "add",
        &format!("{WORLD_LINK4}/30"),
        "dev",
        WORLD_VETH,
    ])?;
    ip(&[
        "-n",
        w,
        "addr",
        "add",
        &format!("{WORLD_LINK6}/64"),
        "dev",
        WORLD_VETH,
        "nodad",
    ])?;
    ip(&["-n", w, "link", "set", WORLD_VETH, "up"])?;
    ip(&["-n", w, "route", "add", "default", "via", HOST_LINK4])?;
    ip(&["-n", w, "-6", "route", "add", "default", "via", HOST_LINK6])?;
    for host in HOSTS.iter().chain(RECORD_HOSTS) {
        let ipaddr: IpAddr = host.parse().unwrap();
        if ipaddr.is_ipv4() {
            ip(&["-n", w, "addr", "add", &format!("{host}/32"), "dev", "lo"])?;
        } else {
            ip(&[
                "-n",
                w,
                "addr",
                "add",
                &format!("{host}/128"),
                "dev",
                "lo",
                "nodad",
            ])?;
        }
    }
    // An address with a prefix on loopback makes the whole prefix local.
    let big = format!("{}/{}", big_addr(0), BIG_NET4.split('/').nth(1).unwrap());
    ip(&["-n", w, "addr", "add", &big, "dev", "lo"])?;
    for route in ROUTES4 {
        ip(&["route", "add", route, "via", WORLD_LINK4, "dev", HOST_VETH]).map_err(|e| {
            format!("{e} (does the host already route {route} somewhere? remove that route first)")
        })?;
    }
    for route in ROUTES6 {
        ip(&[
            "-6",
            "route",
            "add",
            route,
            "via",
            WORLD_LINK6,
            "dev",
            HOST_VETH,
        ])
        .map_err(|e| {
            format!("{e} (does the host already route {route} somewhere? remove that route first)")
        })?;
    }
    Ok(())
}

/// `nft ARGS` (one command line, split on whitespace only where nft needs it) in the world's
/// namespace; its stdout. Panics when nft fails.
#[track_caller]
fn world_nft(command: &str) -> String {
    let mut args = vec!["netns", "exec", WORLD_NS, "nft"];
    let command = match command.strip_prefix("-j ") {
        Some(rest) => {
            args.push("-j");
            rest
        }
        None => command,
    };
    args.push(command);
    let out = super::cmd::run("ip", &args, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("nft {command} in {WORLD_NS}: {e}"));
    assert!(
        out.ok(),
        "nft {command} in {WORLD_NS}: {}",
        out.stderr.trim()
    );
    out.stdout
}

/// Remove our routes, veth and namespace by name (each step may find nothing to remove).
pub fn sweep() {
    let quiet = |args: &[&str]| {
        let _ = super::cmd::run("ip", args, Duration::from_secs(30));
    };
    for route in ROUTES4 {
        quiet(&["route", "del", route, "dev", HOST_VETH]);
    }
    for route in ROUTES6 {
        quiet(&["-6", "route", "del", route, "dev", HOST_VETH]);
    }
    quiet(&["link", "del", HOST_VETH]);
    quiet(&["netns", "del", WORLD_NS]);
}

/// The DNS server's shared state: its zone and its logs.
#[derive(Clone)]
struct Dns {
    zone: Arc<Mutex<Zone>>,
    queries: Arc<Mutex<Vec<String>>>,
    log: Arc<Mutex<Vec<DnsQuery>>>,
    /// TCP connections being served (each in its own short-lived thread).
    tcp_handlers: Arc<AtomicUsize>,
}

/// TCP DNS connections served at once; more are closed at once.
const MAX_DNS_TCP: usize = 16;
/// A TCP DNS connection is closed after this long without a complete question.
const DNS_TCP_IDLE: Duration = Duration::from_secs(3);

impl Dns {
    /// Answer one question that came to `server` from `peer`, and log it.
    fn answer(
        &self,
        query: &[u8],
        tcp: bool,
        server: SocketAddr,
        peer: SocketAddr,
    ) -> Option<Vec<u8>> {
        let answer = self.zone.lock().unwrap().answer(query, tcp)?;
        self.queries.lock().unwrap().push(answer.name.clone());
        self.log.lock().unwrap().push(DnsQuery {
            name: answer.name,
            qtype: answer.qtype,
            tcp,
            server: canonical(server),
            peer: canonical(peer),
            truncated: answer.truncated,
        });
        Some(answer.reply)
    }

    /// Serve one TCP connection: length-prefixed questions until EOF, an error or
    /// [`DNS_TCP_IDLE`] without a question; at most 16 questions.
    fn serve_tcp(&self, mut conn: TcpStream, server: SocketAddr, peer: SocketAddr) {
        let _ = conn.set_nonblocking(false);
        let _ = conn.set_read_timeout(Some(DNS_TCP_IDLE));
        let _ = conn.set_write_timeout(Some(DNS_TCP_IDLE));
        for _ in 0..16 {
            let mut len = [0u8; 2];
            if conn.read_exact(&mut len).is_err() {
                break;
            }
            let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
            if conn.read_exact(&mut msg).is_err() {
                break;
            }
            let Some(reply) = self.answer(&msg, true, server, peer) else {
                break;
            };
            let mut out = (reply.len() as u16).to_be_bytes().to_vec();
            out.extend_from_slice(&reply);
            if conn.write_all(&out).is_err() {
                break;
            }
        }
        let _ = conn.shutdown(std::net::Shutdown::Both);
    }
}

/// The world's DNS sockets: UDP and TCP on port 53 of each of [`DNS_SERVERS`].
struct DnsSockets {
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
}

/// Every socket the world serves on.
struct Listeners {
    /// The banner ports ([`TCP_PORTS`]).
    tcp: Vec<TcpListener>,
    /// [`STREAM_PORT`].
    stream: TcpListener,
    dns: DnsSockets,
    /// [`UDP_SINK_PORT`] of every host.
    sink: Vec<UdpSocket>,
}

fn start_servers(
    stop: Arc<AtomicBool>,
    hits: Arc<Mutex<Vec<Hit>>>,
    datagrams: Arc<Mutex<Vec<Datagram>>>,
    dns: Dns,
    streams: Arc<Mutex<Vec<StreamRecord>>>,
) -> mpsc::Receiver<()> {
    crate::common::netns::serve_in(
        std::path::Path::new(&format!("/run/netns/{WORLD_NS}")),
        "e2e-world".into(),
        bind_all,
        move |listeners| serve(listeners, &stop, &hits, &datagrams, &dns, &streams),
    )
}

fn bind_all() -> Result<Listeners, String> {
    let mut tcp = Vec::new();
    for &port in TCP_PORTS {
        // `[::]` with the namespace default bindv6only=0 accepts IPv4 as well.
        let l = TcpListener::bind(("::", port)).map_err(|e| format!("tcp [::]:{port}: {e}"))?;
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
        tcp.push(l);
    }
    let stream = TcpListener::bind(("::", STREAM_PORT))
        .map_err(|e| format!("tcp [::]:{STREAM_PORT}: {e}"))?;
    stream.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut dns = DnsSockets {
        udp: Vec::new(),
        tcp: Vec::new(),
    };
    for server in DNS_SERVERS {
        let at = SocketAddr::new(server.parse().unwrap(), 53);
        let udp = UdpSocket::bind(at).map_err(|e| format!("udp {at}: {e}"))?;
        udp.set_nonblocking(true).map_err(|e| e.to_string())?;
        dns.udp.push(udp);
        let listener = TcpListener::bind(at).map_err(|e| format!("tcp {at}: {e}"))?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        dns.tcp.push(listener);
    }
    let mut sink = Vec::new();
    for host in HOSTS {
        let at = SocketAddr::new(host.parse().unwrap(), UDP_SINK_PORT);
        let udp = UdpSocket::bind(at).map_err(|e| format!("udp {at}: {e}"))?;
        udp.set_nonblocking(true).map_err(|e| e.to_string())?;
        sink.push(udp);
    }
    Ok(Listeners {
        tcp,
        stream,
        dns,
        sink,
    })
}

/// An open streaming connection: its socket, its record's index, when it started and how
/// many lines were written.
struct OpenStream {
    socket: TcpStream,
    index: usize,
    ip: IpAddr,
    started: Instant,
    next: Instant,
    seq: u64,
}

/// Write the due lines of every open stream; close streams past their lifetime or broken.
fn pump_streams(open: &mut Vec<OpenStream>, records: &Mutex<Vec<StreamRecord>>) {
    let now = Instant::now();
    open.retain_mut(|s| {
        let ended = if now.duration_since(s.started) >= STREAM_LIFETIME {
            Some("lifetime over".to_string())
        } else if now >= s.next {
            s.next += STREAM_INTERVAL;
            let line = stream_line(s.ip, s.seq);
            match s.socket.write(line.as_bytes()) {
                Ok(n) if n == line.len() => {
                    s.seq += 1;
                    records.lock().unwrap()[s.index].lines = s.seq;
                    None
                }
                // A full send buffer (the peer's packets are dropped): skip this line.
                Ok(_) => Some("short write".to_string()),
                Err(e) if e.kind() == ErrorKind::WouldBlock => None,
                Err(e) => Some(format!("write: {e}")),
            }
        } else {
            None
        };
        match ended {
            Some(why) => {
                let _ = s.socket.shutdown(std::net::Shutdown::Both);
                records.lock().unwrap()[s.index].ended = Some(why);
                false
            }
            None => true,
        }
    });
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn serve(
    listeners: Listeners,
    stop: &AtomicBool,
    hits: &Mutex<Vec<Hit>>,
    datagrams: &Mutex<Vec<Datagram>>,
    dns: &Dns,
    streams: &Mutex<Vec<StreamRecord>>,
) {
    let Listeners {
        tcp,
        stream,
        dns: dns_sockets,
        sink,
    } = listeners;
    let started = Instant::now();
    let mut idle = Duration::from_micros(100);
    let mut buf = [0u8; 1500];
    // The largest UDP payload there is: sink datagrams are recorded whole.
    let mut big = vec![0u8; 65536];
    let mut open: Vec<OpenStream> = Vec::new();
    while !stop.load(Ordering::Relaxed) && started.elapsed() < SERVER_LIFETIME {
        let mut busy = false;
        for udp in &sink {
            if let (Ok((len, peer)), Ok(local)) = (udp.recv_from(&mut big), udp.local_addr()) {
                busy = true;
                let mut log = datagrams.lock().unwrap();
                if log.len() < MAX_DATAGRAMS {
                    log.push(Datagram {
                        local: canonical(local),
                        peer: canonical(peer),
                        len,
                    });
                }
            }
        }
        if let Ok((socket, peer)) = stream.accept() {
            busy = true;
            if let Ok(local) = socket.local_addr() {
                let local = canonical(local);
                hits.lock().unwrap().push(Hit {
                    local,
                    peer: canonical(peer),
                });
                let _ = socket.set_nonblocking(true);
                let _ = socket.set_nodelay(true);
                let mut records = streams.lock().unwrap();
                records.push(StreamRecord {
                    local,
                    peer: canonical(peer),
                    lines: 0,
                    ended: None,
                });
                if open.len() < MAX_STREAMS {
                    let now = Instant::now();
                    open.push(OpenStream {
                        socket,
                        index: records.len() - 1,
                        ip: local.ip(),
                        started: now,
                        next: now,
                        seq: 0,
                    });
                } else {
                    records.last_mut().unwrap().ended = Some("too many streams".into());
                }
            }
        }
        pump_streams(&mut open, streams);
        for l in &tcp {
            match l.accept() {
                Ok((mut stream, peer)) => {
                    busy = true;
                    let Ok(local) = stream.local_addr() else {
                        continue;
                    };
                    let local = canonical(local);
                    // Recorded before answering, so a client that saw the banner always
                    // finds its hit here.
                    hits.lock().unwrap().push(Hit {
                        local,
                        peer: canonical(peer),
                    });
                    let _ = stream.set_nonblocking(true);
                    // A fresh socket's send buffer takes the short banner at once.
                    let _ = stream.write_all(banner(local.ip(), local.port()).as_bytes());
                    let _ = stream.shutdown(std::net::Shutdown::Write);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => {}
            }
        }
        for udp in &dns_sockets.udp {
            if let Ok((n, peer)) = udp.recv_from(&mut buf) {
                busy = true;
                let Ok(server) = udp.local_addr() else {
                    continue;
                };
                if let Some(reply) = dns.answer(&buf[..n], false, server, peer) {
                    let _ = udp.send_to(&reply, peer);
                }
            }
        }
        for listener in &dns_sockets.tcp {
            let Ok((conn, peer)) = listener.accept() else {
                continue;
            };
            busy = true;
            let Ok(server) = conn.local_addr() else {
                continue;
            };
            // A TCP connection like any other: recorded in the hits.
            hits.lock().unwrap().push(Hit {
                local: canonical(server),
                peer: canonical(peer),
            });
            if dns.tcp_handlers.fetch_add(1, Ordering::SeqCst) >= MAX_DNS_TCP {
                dns.tcp_handlers.fetch_sub(1, Ordering::SeqCst);
                continue; // dropped: closed at once
            }
            let d = dns.clone();
            let spawned = std::thread::Builder::new()
                .name("e2e-world-dns-tcp".into())
                .spawn(move || {
                    d.serve_tcp(conn, server, peer);
                    d.tcp_handlers.fetch_sub(1, Ordering::SeqCst);
                });
            if spawned.is_err() {
                dns.tcp_handlers.fetch_sub(1, Ordering::SeqCst);
            }
        }
        if busy {
            idle = Duration::from_micros(100);
        } else {
            std::thread::sleep(idle);
            idle = (idle * 2).min(Duration::from_millis(2));
        }
    }
}

/// A minimal authoritative answer to one DNS query over UDP from the default [`Zone`]: A
/// records from [`DNS_ZONE`], AAAA records from [`DNS_ZONE6`], an empty NOERROR for other
/// types of a known name, NXDOMAIN for unknown names (and the records of
/// tests/e2e_dns_records.rs, see [`Zone::answer`]).
pub fn dns_answer(query: &[u8]) -> Option<(String, Vec<u8>)> {
    Zone::default()
        .answer(query, false)
        .map(|a| (a.name, a.reply))
}

/// A name in wire format, uncompressed.
fn wire_name(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + 2);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

impl Zone {
    /// The answer to one query (None: not a query we answer; dropped).
    ///
    /// Like a recursive resolver: the CNAME chain from the question's name (at most 8 links)
    /// comes first, then the records of the question's type owned by the chain's last name,
    /// then the [`Zone::extras`] of the question. NXDOMAIN when the zone has no record of the
    /// question's name, else NOERROR. Over UDP, an answer longer than [`UDP_LIMIT`] or of a
    /// name in [`Zone::truncate_udp`] goes out with TC=1 and no records.
    pub fn answer(&self, query: &[u8], tcp: bool) -> Option<ZoneAnswer> {
        if query.len() < 12 || query[2] & 0x80 != 0 {
            return None; // too short, or a response
        }
        let qdcount = u16::from_be_bytes([query[4], query[5]]);
        if qdcount != 1 {
            return None;
        }
        // Walk the question name.
        let mut i = 12;
        let mut labels = Vec::new();
        loop {
            let len = *query.get(i)? as usize;
            i += 1;
            if len == 0 {
                break;
            }
            if len > 63 {
                return None;
            }
            labels.push(String::from_utf8_lossy(query.get(i..i + len)?).to_ascii_lowercase());
            i += len;
        }
        let qtype = u16::from_be_bytes([*query.get(i)?, *query.get(i + 1)?]);
        let question_end = i + 4;
        query.get(..question_end)?;
        let name = labels.join(".");
        let known = self.records.iter().any(|r| r.owner == name);
        // The answer records, in order.
        let mut answers: Vec<&ZoneRecord> = Vec::new();
        let mut owner = name.clone();
        for _ in 0..8 {
            if qtype == 5 {
                break;
            }
            let Some(link) = self
                .records
                .iter()
                .find(|r| r.owner == owner && matches!(r.data, Rdata::Cname(_)))
            else {
                break;
            };
            answers.push(link);
            let Rdata::Cname(target) = &link.data else {
                unreachable!()
            };
            owner = target.clone();
        }
        answers.extend(
            self.records
                .iter()
                .filter(|r| r.owner == owner && r.data.rtype() == qtype),
        );
        answers.extend(
            self.extras
                .iter()
                .filter(|(q, r)| *q == name && r.data.rtype() == qtype)
                .map(|(_, r)| r),
        );

        let rd = query[2] & 0x01;
        let rcode = if known { 0x00 } else { 0x03 }; // NOERROR / NXDOMAIN
        let header = |tc: u8, ancount: usize| {
            let mut h = Vec::with_capacity(question_end);
            h.extend_from_slice(&query[0..2]); // id
            h.push(0x84 | tc | rd); // QR, AA, TC, RD copied
            h.push(rcode);
            h.extend_from_slice(&1u16.to_be_bytes()); // qdcount
            h.extend_from_slice(&(ancount as u16).to_be_bytes());
            h.extend_from_slice(&[0, 0, 0, 0]); // nscount, arcount
            h.extend_from_slice(&query[12..question_end]);
            h
        };
        let mut reply = header(0, answers.len());
        for r in &answers {
            if r.owner == name {
                reply.extend_from_slice(&[0xc0, 0x0c]); // pointer to the question name
            } else {
                reply.extend_from_slice(&wire_name(&r.owner));
            }
            let rdata = match &r.data {
                Rdata::A(a) => a.octets().to_vec(),
                Rdata::Aaaa(a) => a.octets().to_vec(),
                Rdata::Cname(target) => wire_name(target),
            };
            reply.extend_from_slice(&r.data.rtype().to_be_bytes());
            reply.extend_from_slice(&1u16.to_be_bytes()); // IN
            reply.extend_from_slice(&r.ttl.to_be_bytes());
            reply.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            reply.extend_from_slice(&rdata);
        }
        let truncated = !tcp && (reply.len() > UDP_LIMIT || self.truncate_udp.contains(&name));
        if truncated {
            reply = header(0x02, 0);
        }
        Some(ZoneAnswer {
            name,
            qtype,
            reply,
            truncated,
        })
    }
}
