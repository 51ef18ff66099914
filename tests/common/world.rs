//! The fake internet: addresses and servers inside the world namespace.
//!
//! Every address here exists only inside a test's world netns. Documentation ranges
//! (198.51.100.0/24, 198.18.0.0/15, 2001:db8::/32), a ULA prefix of our own and a few
//! private IPv4 addresses stand in for public hosts, the LAN and cloud metadata.

use std::collections::HashMap;
use std::io::{ErrorKind, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::netns::Netns;

/// The veth link: world side (also the host-loopback gateway in tests) and container side.
pub const GATEWAY4: &str = "198.51.100.1";
pub const CONTAINER4: &str = "198.51.100.2";
pub const GATEWAY6: &str = "2001:db8:ffff::1";
pub const CONTAINER6: &str = "2001:db8:ffff::2";

/// Public IPv4 hosts.
pub const PUB_A: &str = "198.51.100.10";
pub const PUB_B: &str = "198.51.100.20";
pub const DNS4: &str = "198.51.100.53";
pub const OTHER53: &str = "198.18.0.53";
/// Inside 198.18.1.0/24 (allowed as a network in tests); `.9` is the one denied within it.
pub const NET_HOST: &str = "198.18.1.10";
pub const NET_DENIED: &str = "198.18.1.9";
pub const SCOPED: &str = "198.18.2.10";
pub const UDP_ONLY: &str = "198.18.3.10";
pub const FAR: &str = "198.18.200.7";

/// Private-range IPv4 hosts (only ever inside the world netns).
pub const PRIV_172: &str = "172.31.255.7";
pub const PRIV_192: &str = "192.168.254.7";
pub const METADATA: &str = "169.254.169.254";
pub const CGNAT: &str = "100.64.255.7";

/// IPv6 hosts: public documentation space, a /48 with a denied host, and a ULA host.
pub const PUB6_A: &str = "2001:db8::10";
pub const PUB6_B: &str = "2001:db8::20";
pub const DNS6: &str = "2001:db8::53";
pub const NET6_HOST: &str = "2001:db8:1::10";
pub const NET6_DENIED: &str = "2001:db8:1::9";
pub const ULA: &str = "fd5e:ed00::7";

/// Every 198.18.0.0/15 address is local to the world (an AnyIP route), for the scale tests.
pub const ANYIP_V4: &str = "198.18.0.0/15";

/// Addresses put on the world's loopback; each gets UDP echo servers.
pub const HOSTS: &[&str] = &[
    PUB_A,
    PUB_B,
    DNS4,
    OTHER53,
    NET_HOST,
    NET_DENIED,
    SCOPED,
    UDP_ONLY,
    FAR,
    PRIV_172,
    PRIV_192,
    METADATA,
    CGNAT,
    PUB6_A,
    PUB6_B,
    DNS6,
    NET6_HOST,
    NET6_DENIED,
    ULA,
];

/// TCP ports served on every world address (dual-stack wildcard listeners).
pub const TCP_PORTS: &[u16] = &[22, 53, 80, 443, 8080];
/// UDP echo ports on every address of [`HOSTS`] and on the gateway.
pub const UDP_PORTS: &[u16] = &[53, 443, 8080];

/// How long a world server lives at most, whatever happens to the test.
const SERVER_LIFETIME: Duration = Duration::from_secs(20 * 60);

/// One connection or datagram the world received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub tcp: bool,
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

/// The TCP banner: an HTTP-ish response naming the address and port that answered.
pub fn tcp_banner(local: SocketAddr) -> String {
    format!(
        "HTTP/1.0 200 OK\r\nServer: terok-world\r\nX-Served-By: {} {}\r\n\r\nhello\n",
        local.ip(),
        local.port()
    )
}

/// The UDP echo reply to `payload` received on `local`.
pub fn udp_reply(local: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("echo {} {} ", local.ip(), local.port()).into_bytes();
    out.extend_from_slice(payload);
    out
}

/// Normalise v4-mapped addresses that dual-stack sockets report.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// The servers of one world namespace, stopped on drop.
pub struct WorldServer {
    stop: Arc<AtomicBool>,
    hits: Arc<Mutex<Vec<Hit>>>,
    done: mpsc::Receiver<()>,
}

impl WorldServer {
    /// Bind every server inside `world` (on a thread that joined it) and start serving.
    pub fn start(world: &Netns) -> WorldServer {
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(Mutex::new(Vec::new()));
        let (stop2, hits2) = (stop.clone(), hits.clone());
        let done_rx = super::netns::serve_in(
            &world.path(),
            format!("world-{}", world.name()),
            bind_all,
            move |(listeners, udp)| serve(listeners, udp, &stop2, &hits2),
        );
        WorldServer {
            stop,
            hits,
            done: done_rx,
        }
    }

    /// Everything received so far.
    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }
}

impl Drop for WorldServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if self.done.recv_timeout(Duration::from_secs(5)).is_err() {
            eprintln!("cleanup: world server thread did not stop within 5 s");
        }
    }
}

type Sockets = (Vec<TcpListener>, Vec<UdpSocket>);

fn bind_all() -> Result<Sockets, String> {
    let mut listeners = Vec::new();
    for &port in TCP_PORTS {
        // `[::]` with the namespace default bindv6only=0 also accepts IPv4.
        let l = TcpListener::bind(("::", port)).map_err(|e| format!("tcp [::]:{port}: {e}"))?;
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
        listeners.push(l);
    }
    let mut udp = Vec::new();
    // UDP sockets are bound per address, so every reply leaves from the address asked.
    for host in HOSTS.iter().chain([&GATEWAY4, &GATEWAY6]) {
        let ip: IpAddr = host.parse().expect("constant address");
        for &port in UDP_PORTS {
            let s = UdpSocket::bind((ip, port)).map_err(|e| format!("udp {ip}:{port}: {e}"))?;
            s.set_nonblocking(true).map_err(|e| e.to_string())?;
            udp.push(s);
        }
    }
    Ok((listeners, udp))
}

fn serve(
    listeners: Vec<TcpListener>,
    udp: Vec<UdpSocket>,
    stop: &AtomicBool,
    hits: &Mutex<Vec<Hit>>,
) {
    let started = Instant::now();
    let mut idle = Duration::from_micros(50);
    let mut buf = [0u8; 2048];
    let locals: HashMap<usize, SocketAddr> = udp
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.local_addr().ok().map(|a| (i, a)))
        .collect();
    while !stop.load(Ordering::Relaxed) && started.elapsed() < SERVER_LIFETIME {
        let mut busy = false;
        for l in &listeners {
            match l.accept() {
                Ok((mut stream, peer)) => {
                    busy = true;
                    let Ok(local) = stream.local_addr() else {
                        continue;
                    };
                    let local = canonical(local);
                    // A fresh socket's send buffer always takes a short banner at once.
                    let _ = stream.set_nonblocking(true);
                    let _ = stream.write_all(tcp_banner(local).as_bytes());
                    hits.lock().unwrap().push(Hit {
                        tcp: true,
                        local,
                        peer: canonical(peer),
                    });
                    let _ = stream.shutdown(std::net::Shutdown::Write);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => {}
            }
        }
        for (i, s) in udp.iter().enumerate() {
            if let Ok((n, peer)) = s.recv_from(&mut buf) {
                busy = true;
                let local = locals[&i];
                let _ = s.send_to(&udp_reply(local, &buf[..n]), peer);
                hits.lock().unwrap().push(Hit {
                    tcp: false,
                    local,
                    peer: canonical(peer),
                });
            }
        }
        if busy {
            idle = Duration::from_micros(50);
        } else {
            std::thread::sleep(idle);
            idle = (idle * 2).min(Duration::from_millis(2));
        }
    }
}
