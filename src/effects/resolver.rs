//! The per-container DNS resolver (the `builtin` DNS tier): sockets around the pure policy in
//! [`crate::core::dns_policy`].
//!
//! It runs inside the container's network namespace, listens on 127.0.0.1:53 and [::1]:53
//! (UDP and TCP), refuses names the policy does not allow without ever asking upstream, and
//! for allowed names forwards the question under a fresh random ID from a marked socket (the
//! ruleset lets only marked sockets reach a DNS server), then puts every learned address into
//! the DNS-learned sets *before* the answer goes back: the first connection never races the
//! set update. One thread per question, bounded; upstream waits are bounded.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::core::bundle::ContainerName;
use crate::core::dns_policy::{
    extract_answer, inspect_request, refused_response, servfail_response, truncated_response,
    with_id, AnswerDecision, DnsPolicy, QueryDecision,
};
use crate::core::target::Protocol;
use crate::effects::nfnetlink::{NfSock, SetKey};
use crate::effects::state::{load_bundle, STATE_FILE};

pub use crate::core::policy::RESOLVER_MARK;

/// How long one question may wait for upstream before the client gets SERVFAIL.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// Questions handled at once; beyond this, SERVFAIL at once (memory stays bounded).
const MAX_IN_FLIGHT: usize = 64;

/// What the resolver needs to know.
#[derive(Debug, Clone)]
pub struct Settings {
    pub upstreams: Vec<SocketAddr>,
    pub ttl_bounds: (u32, u32),
    pub bundle_dir: PathBuf,
    pub name: ContainerName,
    /// Listen addresses (127.0.0.1 and ::1 in a container).
    pub listen: Vec<IpAddr>,
    pub port: u16,
}

/// The policy, reloaded whenever the bundle's state.json changes (live allow/deny).
struct PolicyCache {
    stamp: Option<SystemTime>,
    policy: Arc<DnsPolicy>,
}

struct Shared {
    settings: Settings,
    policy: Mutex<PolicyCache>,
    in_flight: AtomicUsize,
    urandom: Mutex<std::fs::File>,
    learned_lock: Mutex<()>,
}

impl Shared {
    fn policy(&self) -> Arc<DnsPolicy> {
        let path = self.settings.bundle_dir.join(STATE_FILE);
        let stamp = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        let mut cache = self.policy.lock().unwrap_or_else(|p| p.into_inner());
        if stamp != cache.stamp {
            // A bundle that cannot be read keeps the last good policy (fail closed: it can
            // only be narrower than what was allowed when it was read).
            if let Ok(b) = load_bundle(&self.settings.bundle_dir, &self.settings.name) {
                cache.policy = Arc::new(DnsPolicy::from_bundle(&b));
                cache.stamp = stamp;
            }
        }
        cache.policy.clone()
    }
}

/// Bind every socket, call `ready`, then serve until the process is killed.
pub fn serve(settings: Settings, ready: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
    let bundle = load_bundle(&settings.bundle_dir, &settings.name)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let shared = Arc::new(Shared {
        policy: Mutex::new(PolicyCache {
            stamp: None,
            policy: Arc::new(DnsPolicy::from_bundle(&bundle)),
        }),
        settings,
        in_flight: AtomicUsize::new(0),
        urandom: Mutex::new(std::fs::File::open("/dev/urandom")?),
        learned_lock: Mutex::new(()),
    });
    let mut handles = Vec::new();
    for addr in shared.settings.listen.clone() {
        let at = SocketAddr::new(addr, shared.settings.port);
        let udp = Arc::new(UdpSocket::bind(at)?);
        let tcp = TcpListener::bind(at)?;
        for _ in 0..WORKERS_PER_SOCKET {
            let (s, u) = (shared.clone(), udp.clone());
            handles.push(small_thread(move || udp_worker(s, u))?);
        }
        let s = shared.clone();
        handles.push(small_thread(move || tcp_loop(s, tcp))?);
    }
    ready()?;
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// Per-thread resources reused across questions: the netlink socket and one connected,
/// marked socket per upstream server (opening them per question doubled the latency).
#[derive(Default)]
struct Worker {
    nf: Option<NfSock>,
    upstream: std::collections::HashMap<SocketAddr, UdpSocket>,
    /// xorshift state for upstream IDs, seeded from /dev/urandom on first use.
    rng: u64,
}

impl Worker {
    fn next_id(&mut self, shared: &Shared) -> u16 {
        if self.rng == 0 {
            let mut b = [0u8; 8];
            let mut f = shared.urandom.lock().unwrap_or_else(|p| p.into_inner());
            let _ = f.read_exact(&mut b);
            self.rng = u64::from_ne_bytes(b) | 1;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 32) as u16
    }
}

/// Threads answering UDP questions on each listening socket; each blocks in recv_from on
/// the shared socket (the kernel wakes one), so a question needs no hand-over between threads.
const WORKERS_PER_SOCKET: usize = 3;

fn udp_worker(shared: Arc<Shared>, sock: Arc<UdpSocket>) {
    let mut worker = Worker::default();
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if let Some(reply) = answer(&shared, &mut worker, &buf[..n], false) {
            let _ = sock.send_to(&reply, from);
        }
    }
}

fn tcp_loop(shared: Arc<Shared>, listener: TcpListener) {
    for conn in listener.incoming().flatten() {
        spawn_bounded(&shared, move |s| {
            let _ = serve_tcp(s, conn);
        });
    }
}

fn serve_tcp(shared: &Shared, mut conn: TcpStream) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut worker = Worker::default();
    // Several questions may come on one connection; bounded by the read timeout.
    for _ in 0..100 {
        let mut len = [0u8; 2];
        conn.read_exact(&mut len)?;
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        conn.read_exact(&mut msg)?;
        if let Some(reply) = answer(shared, &mut worker, &msg, true) {
            let mut out = (reply.len() as u16).to_be_bytes().to_vec();
            out.extend_from_slice(&reply);
            conn.write_all(&out)?;
        }
    }
    Ok(())
}

/// A thread with a small stack: the resolver's memory budget is a few MiB per container.
fn small_thread(f: impl FnOnce() + Send + 'static) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().stack_size(128 * 1024).spawn(f)
}

fn spawn_bounded(shared: &Arc<Shared>, work: impl FnOnce(&Shared) + Send + 'static) {
    if shared.in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_IN_FLIGHT {
        shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        return; // the client retries; a flood does not grow memory
    }
    let s = shared.clone();
    let spawned = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || {
            work(&s);
            s.in_flight.fetch_sub(1, Ordering::SeqCst);
        });
    if spawned.is_err() {
        shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The reply to one client message (None: drop it).
fn answer(shared: &Shared, worker: &mut Worker, raw: &[u8], over_tcp: bool) -> Option<Vec<u8>> {
    let req = match inspect_request(raw) {
        Ok(r) => r,
        Err(m) => return m.reply().map(<[u8]>::to_vec),
    };
    let policy = shared.policy();
    if let QueryDecision::Refuse(_) = policy.decide_query(&req.qname, req.qtype) {
        return Some(refused_response(&req, raw));
    }
    let upstream_id = worker.next_id(shared);
    let question = with_id(raw, upstream_id);
    let mut tcp = over_tcp;
    for _ in 0..2 {
        let Some(bytes) = ask_upstream(shared, worker, &question, upstream_id, tcp) else {
            return Some(servfail_response(&req, raw));
        };
        match extract_answer(
            &with_id(&bytes, req.id),
            &req,
            &policy,
            shared.settings.ttl_bounds,
        ) {
            AnswerDecision::Answer(a) => {
                if learn(worker, &a.inserts).is_err() {
                    // Never hand out an address the firewall would refuse.
                    return Some(servfail_response(&req, raw));
                }
                if !a.inserts.is_empty() {
                    record_learned(shared, &a.inserts);
                }
                if !over_tcp && a.response.len() > usize::from(req.udp_payload) {
                    return Some(truncated_response(&req, raw));
                }
                return Some(a.response);
            }
            AnswerDecision::RetryOverTcp => tcp = true,
            AnswerDecision::Refused(_) => return Some(refused_response(&req, raw)),
            AnswerDecision::Reject(_) => return Some(servfail_response(&req, raw)),
        }
    }
    Some(servfail_response(&req, raw))
}

/// Record which name brought which element (`learned.jsonl`), so a later `deny NAME` can
/// remove exactly those. Compacted to live records when it grows past 1 MiB.
fn record_learned(shared: &Shared, inserts: &[crate::core::dns_policy::Insert]) {
    use crate::core::learned::LearnedRecord;
    let path = shared.settings.bundle_dir.join(LEARNED_FILE);
    let now = crate::effects::audit::unix_secs();
    let mut lines = String::new();
    for ins in inserts {
        let rec = LearnedRecord {
            domain: ins.domain.clone(),
            addr: ins.addr,
            scope: ins.scope.map(|s| s.to_string()),
            until: now + ins.ttl.as_secs() + 1,
        };
        if let Ok(line) = serde_json::to_string(&rec) {
            lines.push_str(&line);
            lines.push('\n');
        }
    }
    let _guard = shared
        .learned_lock
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if std::fs::metadata(&path).is_ok_and(|m| m.len() > 1 << 20) {
        let kept: String = read_learned(&path)
            .into_iter()
            .filter(|r| r.until > now)
            .filter_map(|r| serde_json::to_string(&r).ok())
            .map(|l| l + "\n")
            .collect();
        let _ = crate::effects::state::write_atomic(&path, kept.as_bytes());
    }
    let _ = crate::effects::state::append_line(&path, &lines);
}

/// Attribution file of the builtin resolver.
pub const LEARNED_FILE: &str = "learned.jsonl";

/// Every well-formed record of a `learned.jsonl` (bounded read; bad lines skipped).
pub fn read_learned(path: &std::path::Path) -> Vec<crate::core::learned::LearnedRecord> {
    crate::effects::state::read_bounded(path)
        .map(|b| {
            String::from_utf8_lossy(&b)
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The set keys of one element (one per protocol for a port scope).
pub fn keys_for(addr: IpAddr, scope: Option<crate::core::target::PortScope>) -> Vec<SetKey> {
    match (addr, scope) {
        (IpAddr::V4(a), None) => vec![SetKey::V4(a)],
        (IpAddr::V6(a), None) => vec![SetKey::V6(a)],
        (addr, Some(scope)) => scope
            .protocols()
            .iter()
            .map(|p: &Protocol| match addr {
                IpAddr::V4(a) => SetKey::SvcV4(a, *p, scope.port),
                IpAddr::V6(a) => SetKey::SvcV6(a, *p, scope.port),
            })
            .collect(),
    }
}

/// Insert learned addresses into the DNS-learned sets (grouped per set and timeout).
fn learn(worker: &mut Worker, inserts: &[crate::core::dns_policy::Insert]) -> io::Result<()> {
    if inserts.is_empty() {
        return Ok(());
    }
    if worker.nf.is_none() {
        worker.nf = Some(NfSock::open()?);
    }
    let sock = worker.nf.as_mut().expect("opened above");
    for ins in inserts {
        if let Err(e) = sock.add_elements(ins.set(), &keys_for(ins.addr, ins.scope), Some(ins.ttl))
        {
            worker.nf = None; // start afresh next time
            return Err(e);
        }
    }
    Ok(())
}

/// Set SO_MARK so the ruleset lets this socket through to the upstream resolver.
fn mark(fd: &impl AsRawFd) -> io::Result<()> {
    let value: libc::c_int = RESOLVER_MARK as libc::c_int;
    // SAFETY: a plain setsockopt on a socket we own, with a correctly sized value.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Ask the upstreams in turn; the answer must come from the server asked, with our ID.
fn ask_upstream(
    shared: &Shared,
    worker: &mut Worker,
    question: &[u8],
    id: u16,
    tcp: bool,
) -> Option<Vec<u8>> {
    let deadline = Instant::now() + UPSTREAM_TIMEOUT;
    let per_server = UPSTREAM_TIMEOUT / shared.settings.upstreams.len().max(1) as u32;
    for server in &shared.settings.upstreams {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .min(per_server);
        if left.is_zero() {
            break;
        }
        let got = if tcp {
            ask_tcp(*server, question, left)
        } else {
            ask_udp(worker, *server, question, id, left)
        };
        if let Ok(bytes) = got {
            return Some(bytes);
        }
    }
    None
}

fn ask_udp(
    worker: &mut Worker,
    server: SocketAddr,
    question: &[u8],
    id: u16,
    wait: Duration,
) -> io::Result<Vec<u8>> {
    if let std::collections::hash_map::Entry::Vacant(slot) = worker.upstream.entry(server) {
        let local: SocketAddr = match server {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let sock = UdpSocket::bind(local)?;
        mark(&sock)?;
        sock.connect(server)?; // only this server's datagrams are received
        slot.insert(sock);
    }
    let sock = &worker.upstream[&server];
    let result = (|| {
        sock.send(question)?;
        let deadline = Instant::now() + wait;
        let mut buf = vec![0u8; 65535];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            sock.set_read_timeout(Some(left))?;
            let n = sock.recv(&mut buf)?;
            // Late answers to earlier (timed-out) questions carry other IDs: skip them.
            if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
                return Ok(buf[..n].to_vec());
            }
        }
    })();
    if result.is_err() {
        worker.upstream.remove(&server);
    }
    result
}

fn ask_tcp(server: SocketAddr, question: &[u8], wait: Duration) -> io::Result<Vec<u8>> {
    let sock = socket2_free_tcp(server, wait)?;
    let mut conn = sock;
    conn.set_read_timeout(Some(wait))?;
    conn.set_write_timeout(Some(wait))?;
    let mut out = (question.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(question);
    conn.write_all(&out)?;
    let mut len = [0u8; 2];
    conn.read_exact(&mut len)?;
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    conn.read_exact(&mut msg)?;
    Ok(msg)
}

/// A marked TCP connection (the mark must be set before connect, so std's connect can't be
/// used directly): socket, mark, connect with a timeout.
fn socket2_free_tcp(server: SocketAddr, wait: Duration) -> io::Result<TcpStream> {
    use rustix::net::{connect, socket_with, AddressFamily, SocketFlags, SocketType};
    let family = if server.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    mark(&fd)?;
    let stream = TcpStream::from(fd);
    stream.set_write_timeout(Some(wait))?;
    // A blocking connect to a refused/unreachable server fails fast; a silent one is bounded
    // by the kernel's SYN retries, so cap it with SO_SNDTIMEO (honoured by connect).
    connect(&stream, &server)?;
    Ok(stream)
}
