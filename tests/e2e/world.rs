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
//! every 100 ms for at most 30 s, for tests that cut live connections), and a DNS server on
//! 198.51.100.53 answering the zone in [`DNS_ZONE`] and [`DNS_ZONE6`].

use std::io::{ErrorKind, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// The world: namespace, veth, host routes and servers; all removed on drop.
pub struct World {
    stop: Arc<AtomicBool>,
    hits: Arc<Mutex<Vec<Hit>>>,
    dns_queries: Arc<Mutex<Vec<String>>>,
    streams: Arc<Mutex<Vec<StreamRecord>>>,
    done: Option<mpsc::Receiver<()>>,
}

impl World {
    /// Sweep leftovers, then build the world and start its servers.
    pub fn up() -> World {
        sweep();
        let mut world = World {
            stop: Arc::new(AtomicBool::new(false)),
            hits: Arc::new(Mutex::new(Vec::new())),
            dns_queries: Arc::new(Mutex::new(Vec::new())),
            streams: Arc::new(Mutex::new(Vec::new())),
            done: None,
        };
        if let Err(e) = build() {
            sweep();
            panic!("cannot build the e2e world: {e}");
        }
        world.done = Some(start_servers(
            world.stop.clone(),
            world.hits.clone(),
            world.dns_queries.clone(),
            world.streams.clone(),
        ));
        world
    }

    /// Every TCP connection accepted so far.
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

    /// Names the fake DNS server was asked for.
    pub fn dns_queries(&self) -> Vec<String> {
        self.dns_queries.lock().unwrap().clone()
    }

    /// Every streaming connection so far (see [`STREAM_PORT`]).
    pub fn streams(&self) -> Vec<StreamRecord> {
        self.streams.lock().unwrap().clone()
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
    for host in HOSTS {
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

fn start_servers(
    stop: Arc<AtomicBool>,
    hits: Arc<Mutex<Vec<Hit>>>,
    queries: Arc<Mutex<Vec<String>>>,
    streams: Arc<Mutex<Vec<StreamRecord>>>,
) -> mpsc::Receiver<()> {
    let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), String>>(1);
    let (done_tx, done_rx) = mpsc::sync_channel::<()>(1);
    let ns = std::fs::File::open(format!("/run/netns/{WORLD_NS}")).expect("open world netns");
    std::thread::Builder::new()
        .name("e2e-world".into())
        .spawn(move || {
            // Only this single-use thread ever enters the world namespace.
            let joined = rustix::thread::move_into_link_name_space(
                ns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            );
            drop(ns);
            let sockets = joined
                .map_err(|e| format!("setns into {WORLD_NS}: {e}"))
                .and_then(|()| bind_all());
            match sockets {
                Ok((tcp, stream, dns)) => {
                    let _ = ready_tx.send(Ok(()));
                    serve(tcp, stream, dns, &stop, &hits, &queries, &streams);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
            let _ = done_tx.send(());
        })
        .expect("spawn world server thread");
    match ready_rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => done_rx,
        Ok(Err(e)) => panic!("world servers failed to start: {e}"),
        Err(e) => panic!("world servers did not report readiness: {e}"),
    }
}

fn bind_all() -> Result<(Vec<TcpListener>, TcpListener, UdpSocket), String> {
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
    let dns = UdpSocket::bind((DNS4.parse::<IpAddr>().unwrap(), 53))
        .map_err(|e| format!("udp {DNS4}:53: {e}"))?;
    dns.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok((tcp, stream, dns))
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
    tcp: Vec<TcpListener>,
    stream: TcpListener,
    dns: UdpSocket,
    stop: &AtomicBool,
    hits: &Mutex<Vec<Hit>>,
    queries: &Mutex<Vec<String>>,
    streams: &Mutex<Vec<StreamRecord>>,
) {
    let started = Instant::now();
    let mut idle = Duration::from_micros(100);
    let mut buf = [0u8; 1500];
    let mut open: Vec<OpenStream> = Vec::new();
    while !stop.load(Ordering::Relaxed) && started.elapsed() < SERVER_LIFETIME {
        let mut busy = false;
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
        if let Ok((n, peer)) = dns.recv_from(&mut buf) {
            busy = true;
            if let Some((name, reply)) = dns_answer(&buf[..n]) {
                queries.lock().unwrap().push(name);
                let _ = dns.send_to(&reply, peer);
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

/// A minimal authoritative answer to one DNS query: A records from [`DNS_ZONE`], an empty
/// NOERROR for other types of a known name, NXDOMAIN for unknown names.
pub fn dns_answer(query: &[u8]) -> Option<(String, Vec<u8>)> {
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
    let known =
        DNS_ZONE.iter().any(|(n, _)| *n == name) || DNS_ZONE6.iter().any(|(n, _)| *n == name);
    // (type, rdata) of each answer record.
    let records: Vec<(u16, Vec<u8>)> = match qtype {
        1 => DNS_ZONE
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, a)| (1, a.octets().to_vec()))
            .collect(),
        28 => DNS_ZONE6
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, a)| (28, a.octets().to_vec()))
            .collect(),
        _ => Vec::new(),
    };
    let mut reply = Vec::with_capacity(question_end + 16 * (records.len() + 1));
    reply.extend_from_slice(&query[0..2]); // id
    let rd = query[2] & 0x01;
    reply.push(0x84 | rd); // QR, AA, RD copied
    reply.push(if known { 0x00 } else { 0x03 }); // RCODE: NOERROR / NXDOMAIN
    reply.extend_from_slice(&1u16.to_be_bytes()); // qdcount
    reply.extend_from_slice(&(records.len() as u16).to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]); // nscount, arcount
    reply.extend_from_slice(&query[12..question_end]);
    for (rtype, rdata) in &records {
        reply.extend_from_slice(&[0xc0, 0x0c]); // pointer to the question name
        reply.extend_from_slice(&rtype.to_be_bytes());
        reply.extend_from_slice(&1u16.to_be_bytes()); // IN
        reply.extend_from_slice(&300u32.to_be_bytes()); // TTL
        reply.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        reply.extend_from_slice(rdata);
    }
    Some((name, reply))
}
