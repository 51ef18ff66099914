//! DNS load generator and fake upstream for `bench/dns-latency.sh` (not part of the shield).
//!
//! The Python client the bench used before set the pace itself (and its fake upstream varied
//! 24k-79k q/s from run to run), so it measured mostly Python. This one costs a few
//! microseconds per question on either side: batched `recvmmsg`/`sendmmsg`, no allocation per
//! packet, one thread.
//!
//! ```text
//! dns_blast upstream ADDR:PORT
//!     fake authoritative server for *.bench.test: A questions get one A record (TTL 300)
//!     whose address is new for every answer (198.18.0.0/15, counting up, then wrapping), other
//!     types an empty NOERROR answer.
//! dns_blast blast ADDR:PORT QUERIES WINDOW TAG [SET]
//!     closed loop: WINDOW questions in flight (one socket), each answer (or a 1 s timeout)
//!     lets the next one go, QUERIES unique names t<i>-TAG.bench.test. Prints
//!     `qps=.. ok=.. other=.. lost=.. in_set=..`; with SET (e.g. dns_v4), every A answer's
//!     address is looked up in `inet terok_shield SET` over netlink right after the answer
//!     arrived (pacing then includes that look-up: not for throughput).
//! dns_blast relay ADDR:PORT UPSTREAM:PORT [SET]
//!     the floor of any forwarder, for comparison: one blocking loop, one question at a time
//!     (take it, send it upstream from a connected socket, take the answer, send it back), no
//!     parsing and no policy. With SET (e.g. dns_v4), the answer's first A address first goes
//!     into `inet terok_shield SET` (timeout 60 s) in one nf_tables transaction whose ack is
//!     awaited, as a shield's resolver must do before answering.
//! dns_blast latency QUERIES SET NAME=ADDR:PORT[+] ...
//!     sequential questions, servers alternating in order; prints p50/p90 per server and the
//!     p50 added over the first server; for servers marked `+`, the share of answers whose
//!     address was in the set when the answer arrived.
//! ```
//!
//! Linux only; the set look-up needs CAP_NET_ADMIN in the set's network namespace.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const BATCH: usize = 64;
const MSG: usize = 1500;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("upstream") if args.len() == 3 => upstream(parse_addr(&args[2])),
        Some("blast") if args.len() == 6 || args.len() == 7 => blast(
            parse_addr(&args[2]),
            args[3].parse().expect("QUERIES"),
            args[4].parse().expect("WINDOW"),
            &args[5],
            args.get(6).map(String::as_str),
        ),
        Some("relay") if args.len() == 4 || args.len() == 5 => relay(
            parse_addr(&args[2]),
            parse_addr(&args[3]),
            args.get(4).map(String::as_str),
        ),
        Some("latency") if args.len() >= 5 => {
            latency(args[2].parse().expect("QUERIES"), &args[3], &args[4..])
        }
        _ => {
            eprintln!("usage: see the top of examples/dns_blast.rs");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("dns_blast: {e}");
        std::process::exit(1);
    }
}

fn parse_addr(s: &str) -> SocketAddr {
    s.parse().expect("ADDR:PORT")
}

/// Buffers and headers for one `recvmmsg`/`sendmmsg` of up to BATCH datagrams.
struct Batch {
    bufs: Vec<[u8; MSG]>,
    lens: [usize; BATCH],
    peers: [libc::sockaddr_storage; BATCH],
    peer_lens: [u32; BATCH],
    iov: [libc::iovec; BATCH],
    hdr: [libc::mmsghdr; BATCH],
}

impl Batch {
    fn new() -> Box<Batch> {
        // SAFETY: all-zero is a valid value for these plain C structs.
        let mut b = Box::new(Batch {
            bufs: vec![[0u8; MSG]; BATCH],
            lens: [0; BATCH],
            peers: unsafe { std::mem::zeroed() },
            peer_lens: [0; BATCH],
            iov: unsafe { std::mem::zeroed() },
            hdr: unsafe { std::mem::zeroed() },
        });
        b.wire(true);
        b
    }

    /// Point header i at buffer i (and peer i when `named`), with the lengths to send.
    fn wire(&mut self, named: bool) {
        for i in 0..BATCH {
            self.iov[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: MSG,
            };
            let h = &mut self.hdr[i].msg_hdr;
            h.msg_iov = &mut self.iov[i];
            h.msg_iovlen = 1;
            if named {
                h.msg_name = (&mut self.peers[i] as *mut libc::sockaddr_storage).cast();
                h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            } else {
                h.msg_name = std::ptr::null_mut();
                h.msg_namelen = 0;
            }
            self.hdr[i].msg_len = 0;
        }
    }

    /// Receive up to BATCH datagrams (blocking until one, or the socket's timeout).
    fn recv(&mut self, fd: i32, named: bool) -> io::Result<usize> {
        self.wire(named);
        // SAFETY: every header points into buffers owned by self, sized as declared.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdr.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        for i in 0..n as usize {
            self.lens[i] = self.hdr[i].msg_len as usize;
        }
        Ok(n as usize)
    }

    /// Send datagrams 0..n (lens[i] bytes each; to peers[i] when `named`).
    fn send(&mut self, fd: i32, n: usize, named: bool) -> io::Result<()> {
        self.wire(named);
        for i in 0..n {
            self.iov[i].iov_len = self.lens[i];
            if named {
                // recvmmsg left the peer's length in msg_namelen; keep it for sendmmsg.
                self.hdr[i].msg_hdr.msg_namelen = self.peer_lens[i];
            }
        }
        let mut sent = 0;
        while sent < n {
            // SAFETY: as in recv.
            let r =
                unsafe { libc::sendmmsg(fd, self.hdr[sent..].as_mut_ptr(), (n - sent) as u32, 0) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            sent += r as usize;
        }
        Ok(())
    }
}

/// The fake authoritative server.
fn upstream(at: SocketAddr) -> io::Result<()> {
    let sock = UdpSocket::bind(at)?;
    let fd = sock.as_raw_fd();
    let mut b = Batch::new();
    let mut counter: u32 = 0;
    loop {
        let n = match b.recv(fd, true) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for i in 0..n {
            b.peer_lens[i] = b.hdr[i].msg_hdr.msg_namelen;
        }
        let mut out = 0;
        for i in 0..n {
            let len = b.lens[i];
            let Some(qend) = question_end(&b.bufs[i][..len]) else {
                continue;
            };
            if b.bufs[i][2] & 0x80 != 0 {
                continue; // a response: not ours to answer
            }
            let qtype = u16::from_be_bytes([b.bufs[i][qend - 4], b.bufs[i][qend - 3]]);
            let mut msg = [0u8; MSG];
            msg[..qend].copy_from_slice(&b.bufs[i][..qend]);
            msg[2] = 0x80 | (b.bufs[i][2] & 0x01); // QR, RD copied
            msg[3] = 0x80; // RA, NOERROR
            msg[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
            let mut end = qend;
            if qtype == 1 {
                msg[7] = 1;
                let a = 0xc612_0000u32 | (counter & 0x1_ffff); // 198.18.0.0/15
                counter = counter.wrapping_add(1);
                let rr = [0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 1, 0x2c, 0, 4];
                msg[end..end + 12].copy_from_slice(&rr);
                msg[end + 12..end + 16].copy_from_slice(&a.to_be_bytes());
                end += 16;
            }
            // Answer in place of question i, moved down to slot `out` (peer too).
            b.peers[out] = b.peers[i];
            b.peer_lens[out] = b.peer_lens[i];
            b.bufs[out][..end].copy_from_slice(&msg[..end]);
            b.lens[out] = end;
            out += 1;
        }
        // A send error (e.g. a peer gone) drops this batch's answers; keep serving.
        let _ = b.send(fd, out, true);
    }
}

/// Offset just past the (single) question, if the message has a well-formed one.
fn question_end(m: &[u8]) -> Option<usize> {
    if m.len() < 12 || u16::from_be_bytes([m[4], m[5]]) != 1 {
        return None;
    }
    let mut i = 12;
    loop {
        let l = *m.get(i)? as usize;
        if l == 0 {
            break;
        }
        if l > 63 {
            return None;
        }
        i += l + 1;
    }
    (i + 5 <= m.len()).then_some(i + 5)
}

/// The first A record of an answer, skipping the question and other records.
fn first_a(m: &[u8]) -> Option<[u8; 4]> {
    let mut i = question_end(m)?;
    let ancount = u16::from_be_bytes([m[6], m[7]]);
    for _ in 0..ancount {
        // Owner name: labels ending in a zero byte or a pointer.
        loop {
            let l = *m.get(i)?;
            if l & 0xc0 == 0xc0 {
                i += 2;
                break;
            }
            i += 1 + l as usize;
            if l == 0 {
                break;
            }
        }
        let rr = m.get(i..i + 10)?;
        let (rtype, rdlen) = (
            u16::from_be_bytes([rr[0], rr[1]]),
            u16::from_be_bytes([rr[8], rr[9]]) as usize,
        );
        i += 10;
        let data = m.get(i..i + rdlen)?;
        if rtype == 1 && rdlen == 4 {
            return Some([data[0], data[1], data[2], data[3]]);
        }
        i += rdlen;
    }
    None
}

/// A question for `name` (type A, RD) under `id`, written into `out`; returns its length.
fn build_query(out: &mut [u8], id: u16, name: &str) -> usize {
    out[..12].copy_from_slice(&[0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    out[..2].copy_from_slice(&id.to_be_bytes());
    let mut i = 12;
    for label in name.split('.') {
        out[i] = label.len() as u8;
        out[i + 1..i + 1 + label.len()].copy_from_slice(label.as_bytes());
        i += 1 + label.len();
    }
    out[i..i + 5].copy_from_slice(&[0, 0, 1, 0, 1]);
    i + 5
}

/// Looks addresses up in one set of `inet terok_shield` (NFT_MSG_GETSETELEM, one element).
struct SetProbe {
    fd: std::os::fd::OwnedFd,
    set: String,
    seq: u32,
    buf: Vec<u8>,
}

impl SetProbe {
    fn open(set: &str) -> io::Result<SetProbe> {
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just opened and is owned by nobody else.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(SetProbe {
            fd,
            set: set.to_string(),
            seq: 1,
            buf: vec![0; 16 * 1024],
        })
    }

    fn contains(&mut self, addr: [u8; 4]) -> io::Result<bool> {
        fn attr(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
            out.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
            out.extend_from_slice(&kind.to_ne_bytes());
            out.extend_from_slice(data);
            while !out.len().is_multiple_of(4) {
                out.push(0);
            }
        }
        const NESTED: u16 = 0x8000;
        let mut key = Vec::new();
        attr(&mut key, 1, &addr); // NFTA_DATA_VALUE
        let mut elem = Vec::new();
        attr(&mut elem, NESTED | 1, &key); // NFTA_SET_ELEM_KEY
        let mut list = Vec::new();
        attr(&mut list, NESTED | 1, &elem); // NFTA_LIST_ELEM
        let mut msg = vec![0u8; 16];
        msg.extend_from_slice(&[1, 0, 0, 0]); // nfgenmsg: NFPROTO_INET, version 0, res_id 0
        attr(&mut msg, 1, b"terok_shield\0"); // NFTA_SET_ELEM_LIST_TABLE
        let mut set = self.set.clone().into_bytes();
        set.push(0);
        attr(&mut msg, 2, &set); // NFTA_SET_ELEM_LIST_SET
        attr(&mut msg, NESTED | 3, &list); // NFTA_SET_ELEM_LIST_ELEMENTS
        self.seq += 1;
        let len = msg.len() as u32;
        msg[0..4].copy_from_slice(&len.to_ne_bytes());
        msg[4..6].copy_from_slice(&((10u16 << 8) | 13).to_ne_bytes()); // nftables GETSETELEM
        msg[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
        msg[8..12].copy_from_slice(&self.seq.to_ne_bytes());
        let fd = self.fd.as_raw_fd();
        // SAFETY: sending our own buffer on our own socket (the kernel is the default peer).
        if unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        loop {
            // SAFETY: receiving into our own buffer.
            let n = unsafe { libc::recv(fd, self.buf.as_mut_ptr().cast(), self.buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let b = &self.buf[..n as usize];
            if b.len() < 16 || u32::from_ne_bytes(b[8..12].try_into().unwrap()) != self.seq {
                continue; // a stale reply
            }
            let kind = u16::from_ne_bytes([b[4], b[5]]);
            if kind == libc::NLMSG_ERROR as u16 {
                let code = i32::from_ne_bytes(b[16..20].try_into().unwrap());
                return match -code {
                    0 | libc::ENOENT => Ok(false),
                    e => Err(io::Error::from_raw_os_error(e)),
                };
            }
            return Ok(kind == (10 << 8) | 12); // NFT_MSG_NEWSETELEM: the element
        }
    }
}

/// Closed-loop load: `window` questions in flight until `queries` have been answered or lost.
fn blast(
    server: SocketAddr,
    queries: usize,
    window: usize,
    tag: &str,
    set: Option<&str>,
) -> io::Result<()> {
    let window = window.clamp(1, BATCH);
    let sock = UdpSocket::bind(if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    sock.connect(server)?;
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    let fd = sock.as_raw_fd();
    let mut probe = set.map(SetProbe::open).transpose()?;
    let mut b = Batch::new();
    let mut sent_at: Vec<Option<Instant>> = vec![None; 1 << 16];
    let mut in_flight: Vec<u16> = Vec::with_capacity(window);
    // Time from sending each question to its answer (microseconds), for the tail.
    let mut took_us: Vec<u32> = Vec::with_capacity(queries);
    let (mut next, mut ok, mut other, mut lost, mut in_set, mut checked) = (0usize, 0, 0, 0, 0, 0);
    let mut out = Batch::new();
    let mut send_more = |count: usize,
                         next: &mut usize,
                         sent_at: &mut Vec<Option<Instant>>,
                         in_flight: &mut Vec<u16>|
     -> io::Result<()> {
        let mut n = 0;
        let now = Instant::now();
        while n < count && *next < queries {
            let id = *next as u16;
            out.lens[n] = build_query(&mut out.bufs[n], id, &format!("t{next}-{tag}.bench.test"));
            sent_at[id as usize] = Some(now);
            in_flight.push(id);
            *next += 1;
            n += 1;
        }
        out.send(fd, n, false)
    };
    let start = Instant::now();
    send_more(window, &mut next, &mut sent_at, &mut in_flight)?;
    let mut last_scan = Instant::now();
    while !in_flight.is_empty() {
        let n = match b.recv(fd, false) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                0
            }
            Err(e) => return Err(e),
        };
        let mut finished = 0;
        for i in 0..n {
            let m = &b.bufs[i][..b.lens[i]];
            if m.len() < 12 {
                continue;
            }
            let id = u16::from_be_bytes([m[0], m[1]]);
            let Some(at) = sent_at[id as usize].take() else {
                continue; // late answer to a question already counted lost
            };
            took_us.push(at.elapsed().as_micros() as u32);
            in_flight.retain(|x| *x != id);
            finished += 1;
            let rcode = m[3] & 0x0f;
            match first_a(m) {
                Some(a) if rcode == 0 => {
                    ok += 1;
                    if let Some(p) = probe.as_mut() {
                        checked += 1;
                        in_set += usize::from(p.contains(a)?);
                    }
                }
                _ => other += 1,
            }
        }
        if last_scan.elapsed() > Duration::from_millis(100) {
            last_scan = Instant::now();
            let now = Instant::now();
            in_flight.retain(|id| match sent_at[*id as usize] {
                Some(t) if now.duration_since(t) > Duration::from_secs(1) => {
                    sent_at[*id as usize] = None;
                    lost += 1;
                    finished += 1;
                    false
                }
                _ => true,
            });
        }
        send_more(finished, &mut next, &mut sent_at, &mut in_flight)?;
    }
    let secs = start.elapsed().as_secs_f64();
    let in_set = if probe.is_some() {
        format!("{in_set}/{checked}")
    } else {
        "-".into()
    };
    took_us.sort_unstable();
    let pct = |p: usize| {
        took_us
            .get(took_us.len().saturating_sub(1) * p / 100)
            .copied()
    };
    let mean = took_us.iter().map(|&t| u64::from(t)).sum::<u64>() / took_us.len().max(1) as u64;
    println!(
        "qps={:.0} ok={ok} other={other} lost={lost} in_set={in_set} us: mean={mean} p50={} p90={} p99={} max={}",
        (ok + other) as f64 / secs,
        pct(50).unwrap_or(0),
        pct(90).unwrap_or(0),
        pct(99).unwrap_or(0),
        pct(100).unwrap_or(0),
    );
    Ok(())
}

/// See `relay` at the top. Runs until killed.
fn relay(at: SocketAddr, upstream: SocketAddr, set: Option<&str>) -> io::Result<()> {
    use terok_shield::effects::nfnetlink::{NfSock, SetKey};
    let clients = UdpSocket::bind(at)?;
    let up = UdpSocket::bind(if upstream.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    up.connect(upstream)?;
    let mut nf = set.map(|_| NfSock::open()).transpose()?;
    let mut q = [0u8; MSG];
    let mut r = [0u8; MSG];
    loop {
        let (n, client) = clients.recv_from(&mut q)?;
        up.send(&q[..n])?;
        let m = up.recv(&mut r)?;
        if let (Some(nf), Some(set), Some(a)) = (nf.as_mut(), set, first_a(&r[..m])) {
            let key = SetKey::V4(std::net::Ipv4Addr::from(a));
            nf.add_elements(set, &[key], Some(Duration::from_secs(60)))?;
        }
        clients.send_to(&r[..m], client)?;
    }
}

/// Sequential questions to each server in turn: added latency and set membership on arrival.
fn latency(queries: usize, set: &str, servers: &[String]) -> io::Result<()> {
    let servers: Vec<(String, SocketAddr, bool)> = servers
        .iter()
        .map(|s| {
            let (name, addr) = s.split_once('=').expect("NAME=ADDR:PORT");
            let check = addr.ends_with('+');
            (
                name.to_string(),
                parse_addr(addr.trim_end_matches('+')),
                check,
            )
        })
        .collect();
    let mut probe = SetProbe::open(set)?;
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut lat: Vec<Vec<f64>> = vec![Vec::new(); servers.len()];
    let mut in_set = vec![0usize; servers.len()];
    let mut q = [0u8; 512];
    let mut r = [0u8; MSG];
    for i in 0..queries {
        let mut order: Vec<usize> = (0..servers.len()).collect();
        if i % 2 == 1 {
            order.reverse();
        }
        for s in order {
            let (name, addr, check) = &servers[s];
            let id = (i * servers.len() + s) as u16;
            let len = build_query(&mut q, id, &format!("n{i}-{name}.bench.test"));
            let t = Instant::now();
            sock.send_to(&q[..len], addr)?;
            let n = loop {
                let (n, _) = sock.recv_from(&mut r)?;
                if n >= 2 && r[..2] == id.to_be_bytes() {
                    break n;
                }
            };
            lat[s].push(t.elapsed().as_secs_f64() * 1000.0);
            if *check {
                if let Some(a) = first_a(&r[..n]) {
                    in_set[s] += usize::from(probe.contains(a)?);
                }
            }
        }
    }
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
    };
    let base = pct(&mut lat[0], 0.5);
    println!("| server         | p50 ms | p90 ms | added p50 | answers in {set} on arrival |");
    println!("|----------------|--------|--------|-----------|-------------------------|");
    for (s, (name, _, check)) in servers.iter().enumerate() {
        let (p50, p90) = (pct(&mut lat[s], 0.5), pct(&mut lat[s], 0.9));
        let set_col = if *check {
            format!(
                "{}/{queries} ({:.1}%)",
                in_set[s],
                100.0 * in_set[s] as f64 / queries as f64
            )
        } else {
            "-".into()
        };
        println!(
            "| {name:14} | {p50:6.3} | {p90:6.3} | {:+.3} ms | {set_col:23} |",
            p50 - base
        );
    }
    Ok(())
}
