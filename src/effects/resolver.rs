//! The per-container DNS resolver (the `builtin` DNS tier): sockets around the pure policy in
//! [`crate::core::dns_policy`].
//!
//! It runs inside the container's network namespace, listens on 127.0.0.1:53 and [::1]:53
//! (UDP and TCP), refuses names the policy does not allow without ever asking upstream, and
//! for allowed names forwards the question under a fresh random ID from a marked socket (the
//! ruleset lets only marked sockets reach a DNS server), then puts every learned address into
//! the DNS-learned sets *before* the answer goes back: the first connection never races the
//! set update. UDP is served by one event loop (many questions in flight), TCP by a bounded
//! number of threads; upstream waits are bounded.
//!
//! The container's event reader ([`crate::effects::events`]) runs as a thread of this
//! process; refused questions are handed to it without waiting.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::buffer::spare_capacity;
use rustix::event::{epoll, Timespec};
use rustix::io::Errno;

use crate::core::bundle::ContainerName;
use crate::core::dns_policy::{
    extract_answer, inspect_request, refused_response, servfail_response, truncated_response,
    with_id, Answer, AnswerDecision, DnsPolicy, Request,
};
use crate::core::target::Protocol;
use crate::effects::events::{DnsEvents, EventReader};
use crate::effects::learned_log::{LearnedLog, LEARNED_FILE};
use crate::effects::nfnetlink::{NfSock, SetKey};
use crate::effects::prebound::Inherited;
use crate::effects::state::{load_bundle, STATE_FILE};
use crate::effects::table_read::LearnGate;

pub use crate::core::policy::RESOLVER_MARK;

pub use crate::core::companion::CONTAINER_LISTEN;

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
    stamp: Option<Stamp>,
    policy: Arc<DnsPolicy>,
}

/// What tells one state.json from the next: it is replaced by rename (a new inode) and the
/// mtime alone is only as fine as the kernel's coarse clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    size: i64,
    mtime: (i64, i64),
}

fn stamp(path: &std::path::Path) -> Option<Stamp> {
    // One stat(2) per question, with no allocation (rustix builds the C path on the stack).
    let st = rustix::fs::stat(path).ok()?;
    Some(Stamp {
        ino: st.st_ino,
        size: st.st_size,
        mtime: (st.st_mtime as i64, st.st_mtime_nsec as i64),
    })
}

struct Shared {
    settings: Settings,
    state_path: PathBuf,
    policy: Mutex<PolicyCache>,
    in_flight: AtomicUsize,
    urandom: Mutex<std::fs::File>,
    learned: Mutex<LearnedLog>,
    /// Refused questions go to the event reader (never blocks).
    events: DnsEvents,
}

impl Shared {
    /// The policy as state.json says now: one stat(2), a reload when the file changed.
    fn policy(&self) -> Arc<DnsPolicy> {
        self.refresh().0
    }

    /// [`Shared::policy`], and whether it is current: false when state.json changed but could
    /// not be read. The last good policy then stays (fail closed: it can only be narrower
    /// than what was allowed when it was read) and the next look tries again.
    fn refresh(&self) -> (Arc<DnsPolicy>, bool) {
        let stamp = stamp(&self.state_path);
        let mut cache = self.policy.lock().unwrap_or_else(|p| p.into_inner());
        if stamp.is_none() || stamp != cache.stamp {
            match load_bundle(&self.settings.bundle_dir, &self.settings.name) {
                Ok(b) => {
                    cache.policy = Arc::new(DnsPolicy::from_bundle(&b));
                    cache.stamp = stamp;
                }
                Err(_) => return (cache.policy.clone(), false),
            }
        }
        (cache.policy.clone(), stamp.is_some())
    }

    /// The policy as last read, without looking at state.json.
    fn cached_policy(&self) -> Arc<DnsPolicy> {
        let cache = self.policy.lock().unwrap_or_else(|p| p.into_inner());
        cache.policy.clone()
    }
}

/// Tells the event loop when state.json may have changed, so that a wake-up costs no stat(2)
/// while nothing does: an inotify watch on the bundle directory (state.json is replaced by
/// rename, which queues the event before `rename` returns, so before the CLI that made the
/// change exits). Without a working watch (inotify unavailable, or the directory gone) every
/// wake-up looks at the file, as [`Shared::policy`] does.
struct StateWatch {
    fd: Option<OwnedFd>,
    /// Look at state.json on the next wake-up. Set at start: a change between the first
    /// reading of the bundle and the watch is seen by the first look.
    stale: bool,
}

impl StateWatch {
    fn new(ep: &OwnedFd, dir: &Path) -> StateWatch {
        use rustix::fs::inotify;
        let watched = || -> io::Result<OwnedFd> {
            let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
            let flags = inotify::WatchFlags::MOVED_TO
                | inotify::WatchFlags::MOVED_FROM
                | inotify::WatchFlags::CREATE
                | inotify::WatchFlags::CLOSE_WRITE
                | inotify::WatchFlags::DELETE
                | inotify::WatchFlags::DELETE_SELF
                | inotify::WatchFlags::MOVE_SELF
                | inotify::WatchFlags::ONLYDIR;
            inotify::add_watch(&fd, dir, flags)?;
            epoll::add(ep, &fd, token(Source::Watch, 0), epoll::EventFlags::IN)?;
            Ok(fd)
        };
        StateWatch {
            fd: watched().ok(),
            stale: true,
        }
    }

    /// Take the queued directory events (called when epoll says there are some).
    fn drain(&mut self) {
        use rustix::fs::inotify::{ReadFlags, Reader};
        let Some(fd) = &self.fd else { return };
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1024];
        let mut reader = Reader::new(fd, &mut buf);
        let mut gone = false;
        loop {
            match reader.next() {
                Ok(ev) => {
                    let flags = ev.events();
                    if flags.intersects(
                        ReadFlags::IGNORED | ReadFlags::DELETE_SELF | ReadFlags::MOVE_SELF,
                    ) {
                        gone = true; // the directory is no longer where we look
                    }
                    let about_state = ev
                        .file_name()
                        .is_none_or(|n| n.to_bytes() == STATE_FILE.as_bytes());
                    if about_state || flags.contains(ReadFlags::QUEUE_OVERFLOW) {
                        self.stale = true;
                    }
                }
                Err(Errno::INTR) => {}
                Err(_) => break, // AGAIN: drained
            }
        }
        if gone {
            self.fd = None; // closing takes it out of epoll; from now on: a stat per wake-up
            self.stale = true;
        }
    }

    /// The policy for this wake-up: looked up afresh only when state.json may have changed.
    fn policy(&mut self, shared: &Shared) -> Arc<DnsPolicy> {
        if self.fd.is_some() && !self.stale {
            return shared.cached_policy();
        }
        let (policy, current) = shared.refresh();
        self.stale = !current;
        policy
    }
}

/// Bind every socket (or take those the hook bound: `inherited`), call `ready`, then serve
/// until the process is killed.
pub fn serve(
    settings: Settings,
    inherited: Option<Inherited>,
    ready: impl FnOnce() -> io::Result<()>,
) -> io::Result<()> {
    // One malloc arena for every thread: per-thread arenas cost resident memory each and
    // buy nothing here (a handful of small allocations per question).
    // SAFETY: mallopt only tunes glibc's allocator; called before any thread is started.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let state_path = settings.bundle_dir.join(STATE_FILE);
    let stamp = stamp(&state_path);
    let bundle = load_bundle(&settings.bundle_dir, &settings.name)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let event_settings =
        crate::effects::events::Settings::from_bundle(&settings.bundle_dir, &bundle);
    let (reader, events, mut listeners) = match inherited {
        Some(i) if i.listeners.len() == settings.listen.len() => {
            let (reader, events) = EventReader::with_socket(i.nflog, event_settings);
            (reader, events, Some(i.listeners.into_iter()))
        }
        Some(_) => return Err(io::Error::other("the hook handed over the wrong sockets")),
        None => {
            let (reader, events) = EventReader::bind(event_settings)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot read NFLOG: {e}")))?;
            (reader, events, None)
        }
    };
    reader.spawn()?;
    let shared = Arc::new(Shared {
        events,
        policy: Mutex::new(PolicyCache {
            stamp,
            policy: Arc::new(DnsPolicy::from_bundle(&bundle)),
        }),
        state_path,
        learned: Mutex::new(LearnedLog::new(settings.bundle_dir.join(LEARNED_FILE))),
        settings,
        in_flight: AtomicUsize::new(0),
        urandom: Mutex::new(std::fs::File::open("/dev/urandom")?),
    });
    drop(bundle);
    let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    let mut clients = Vec::new();
    let mut tcp = Vec::new();
    for addr in shared.settings.listen.clone() {
        let at = SocketAddr::new(addr, shared.settings.port);
        let (udp, listener) = match listeners.as_mut().and_then(Iterator::next) {
            Some(pair) => pair,
            None => (UdpSocket::bind(at)?, TcpListener::bind(at)?),
        };
        udp.set_nonblocking(true)?;
        epoll::add(
            &ep,
            &udp,
            token(Source::Client, clients.len()),
            epoll::EventFlags::IN,
        )?;
        clients.push(Arc::new(udp));
        listener.set_nonblocking(true)?;
        epoll::add(
            &ep,
            &listener,
            token(Source::Tcp, tcp.len()),
            epoll::EventFlags::IN,
        )?;
        tcp.push(listener);
    }
    let upstreams = shared.settings.upstreams.len();
    let watch = StateWatch::new(&ep, &shared.settings.bundle_dir);
    let mut event_loop = EventLoop {
        per_server: UPSTREAM_TIMEOUT / upstreams.max(1) as u32,
        watch,
        shared,
        ep,
        clients,
        tcp,
        upstream: (0..upstreams).map(|_| None).collect(),
        pending: HashMap::new(),
        earliest: None,
        worker: Worker::default(),
        done: Vec::new(),
        learned: Vec::new(),
        outbox: Vec::new(),
        forwards: Vec::new(),
        tx: SendBatch::default(),
    };
    ready()?;
    shed_startup_memory();
    event_loop.run()
}

/// Give back what start-up needed and serving does not: free heap (argument parsing, the
/// bundle) and the page-table entries of program text (clap, YAML/JSON loading, ...).
///
/// Only executable file mappings are touched: their pages are never written, so
/// `MADV_DONTNEED` merely unmaps them (they stay in the page cache, shared with every other
/// process of the binary) and the few that serving needs fault back in on first use.
fn shed_startup_memory() {
    // SAFETY: malloc_trim only returns free heap memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    for line in maps.lines() {
        let mut fields = line.split_ascii_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let path = fields.nth(3).unwrap_or("");
        if perms != "r-xp" || !path.starts_with('/') {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        // SAFETY: a private, read-only, executable file mapping: dropping its pages loses
        // nothing (they are re-read from the file on the next access).
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
        }
    }
}

/// What an epoll event is about (the high bits of its token; the low bits are an index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// A listening UDP socket: client questions.
    Client,
    /// A listening TCP socket: connections (each served by a thread).
    Tcp,
    /// A connected, marked socket to one upstream server: its answers.
    Upstream,
    /// The inotify watch on the bundle directory ([`StateWatch`]).
    Watch,
}

fn token(source: Source, index: usize) -> epoll::EventData {
    epoll::EventData::new_u64(((source as u64) << 32) | index as u64)
}

fn untoken(data: epoll::EventData) -> (Source, usize) {
    let v = data.u64();
    let source = match v >> 32 {
        0 => Source::Client,
        1 => Source::Tcp,
        2 => Source::Upstream,
        _ => Source::Watch,
    };
    (source, (v & 0xffff_ffff) as usize)
}

/// UDP questions waiting for upstream at once; beyond this a question gets SERVFAIL at once
/// (memory stays bounded under a flood).
const MAX_PENDING: usize = 1024;
/// Client datagrams taken from one socket per wake-up before looking at the others (and
/// upstream answers from one server), in `recvmmsg` calls of [`SLOTS`].
const RECV_BURST: usize = 64;
/// Datagrams per `recvmmsg`/`sendmmsg`.
const SLOTS: usize = 16;
/// Bytes per received datagram. A client question is far smaller; an upstream answer larger
/// than this (rare: resolvers cap UDP answers at ~1232 bytes) is asked again over TCP.
const SLOT: usize = 4096;

/// A UDP question forwarded upstream, keyed by the upstream ID it went out under.
struct Pending {
    req: Request,
    /// The client's message under the upstream ID ([`Pending::raw`] gives it back as sent).
    question: Vec<u8>,
    client: SocketAddr,
    /// Which listening socket it came in on (the reply leaves from it).
    listener: usize,
    /// Index of the upstream server asked now; answers from any other are not taken.
    server: usize,
    /// When this server has had its time.
    deadline: Instant,
    /// When the client gets SERVFAIL whatever the servers do.
    overall: Instant,
}

impl Pending {
    /// The client's message as it sent it (error replies are built from it; rare, so it is
    /// not kept beside the forwarded copy).
    fn raw(&self) -> Vec<u8> {
        with_id(&self.question, self.req.id)
    }
}

/// The UDP side of the resolver: one thread, non-blocking sockets, many questions in flight.
///
/// Each wake-up drains every ready socket, then inserts the addresses of all the answers it
/// collected in one netlink batch per (set, timeout), and only then sends those answers: the
/// set update still precedes every reply, and under load one nf_tables transaction covers
/// many answers.
struct EventLoop {
    shared: Arc<Shared>,
    ep: OwnedFd,
    clients: Vec<Arc<UdpSocket>>,
    tcp: Vec<TcpListener>,
    /// Connected, marked socket per upstream server (opened on first use).
    upstream: Vec<Option<UdpSocket>>,
    per_server: Duration,
    watch: StateWatch,
    pending: HashMap<u16, Pending>,
    /// No pending deadline is earlier than this.
    earliest: Option<Instant>,
    worker: Worker,
    /// Answers of this wake-up, waiting for their set updates.
    done: Vec<(Pending, Answer)>,
    /// What the answers of this wake-up put into the sets, for learned.jsonl
    /// ([`EventLoop::record_learned`], after the replies).
    learned: Vec<crate::core::dns_policy::Insert>,
    /// Replies of this wake-up (listener, client, message), sent by [`EventLoop::flush_replies`].
    outbox: Vec<(usize, SocketAddr, Vec<u8>)>,
    /// Questions of this wake-up (upstream ID, server) waiting in `pending` to be sent, by
    /// [`EventLoop::flush_forwards`].
    forwards: Vec<(u16, usize)>,
    tx: SendBatch,
}

impl EventLoop {
    fn run(&mut self) -> io::Result<()> {
        let mut events: Vec<epoll::Event> = Vec::with_capacity(16);
        let mut rx = RecvBatch::new();
        loop {
            if self.pending.is_empty() {
                self.earliest = None; // nothing to time out: sleep without a timer
            }
            let timeout = self.earliest.map(|at| {
                // Rounded up to the next millisecond: waking early only spins.
                let left =
                    at.saturating_duration_since(Instant::now()) + Duration::from_micros(999);
                let left = Duration::from_millis(left.as_millis() as u64);
                Timespec {
                    tv_sec: left.as_secs() as _,
                    tv_nsec: left.subsec_nanos() as _,
                }
            });
            events.clear();
            match epoll::wait(&self.ep, spare_capacity(&mut events), timeout.as_ref()) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
            // Every question and answer handled below is judged by the policy as it is now:
            // the watch's events first, then one look at state.json if they name it.
            if events.iter().any(|ev| untoken(ev.data).0 == Source::Watch) {
                self.watch.drain();
            }
            let policy = self.watch.policy(&self.shared);
            // Answers first (their clients have waited longest), then new questions.
            for ev in &events {
                if let (Source::Upstream, i) = untoken(ev.data) {
                    self.take_answers(i, &policy, &mut rx);
                }
            }
            self.finish();
            self.flush_replies();
            self.record_learned();
            for ev in &events {
                match untoken(ev.data) {
                    (Source::Client, i) => self.take_questions(i, &policy, &mut rx),
                    (Source::Tcp, i) => self.accept(i),
                    (Source::Upstream, _) | (Source::Watch, _) => {}
                }
            }
            self.flush_forwards();
            self.expire();
            self.flush_replies();
        }
    }

    /// Queue a reply; sent (with the others of this wake-up) by [`EventLoop::flush_replies`].
    fn reply(&mut self, listener: usize, to: SocketAddr, msg: Vec<u8>) {
        self.outbox.push((listener, to, msg));
    }

    /// Send the queued replies, one `sendmmsg` per listening socket and [`SLOTS`] replies.
    fn flush_replies(&mut self) {
        if self.outbox.is_empty() {
            return;
        }
        for (l, sock) in self.clients.iter().enumerate() {
            let mut batch = self.outbox.iter().filter(|(at, _, _)| *at == l).peekable();
            while batch.peek().is_some() {
                self.tx.clear();
                for (_, to, msg) in batch.by_ref().take(SLOTS) {
                    self.tx.push(msg, Some(*to));
                }
                // Non-blocking: a full send buffer drops the reply, and the client asks again.
                let _ = self.tx.send(sock.as_raw_fd());
            }
        }
        self.outbox.clear();
    }

    fn take_questions(&mut self, listener: usize, policy: &DnsPolicy, rx: &mut RecvBatch) {
        // Nothing in flight: most likely one client asking one question.
        let one = self.pending.is_empty();
        for _ in 0..RECV_BURST / SLOTS {
            let n = match rx.recv(self.clients[listener].as_raw_fd(), one) {
                Ok(n) => n,
                Err(Errno::INTR) => continue,
                Err(_) => return, // AGAIN: drained; anything else: try at the next event
            };
            for i in 0..n {
                let Some(from) = rx.from(i) else { continue };
                self.question(listener, from, rx.msg(i), policy);
            }
            if n < SLOTS {
                return; // drained
            }
        }
    }

    fn question(&mut self, listener: usize, from: SocketAddr, raw: &[u8], policy: &DnsPolicy) {
        let req = match inspect_request(raw) {
            Ok(r) => r,
            Err(m) => {
                if let Some(reply) = m.reply() {
                    self.reply(listener, from, reply.to_vec());
                }
                return;
            }
        };
        if let Some(why) = policy.refusal(&req.qname, req.qtype) {
            self.shared.events.refused(&req.qname, req.qtype, &why);
            self.reply(listener, from, refused_response(&req, raw));
            return;
        }
        if self.pending.len() >= MAX_PENDING {
            self.reply(listener, from, servfail_response(&req, raw));
            return;
        }
        let id = loop {
            let id = self.worker.next_id(&self.shared);
            if !self.pending.contains_key(&id) {
                break id;
            }
        };
        let now = Instant::now();
        let p = Pending {
            question: with_id(raw, id),
            req,
            client: from,
            listener,
            server: 0,
            deadline: now,
            overall: now + UPSTREAM_TIMEOUT,
        };
        self.forward(id, p, now, false);
    }

    /// Send `p` to its server, or the next one that takes it; SERVFAIL when none is left.
    /// `queue`: only open the socket now and leave the send to [`EventLoop::flush_forwards`].
    fn forward(&mut self, id: u16, mut p: Pending, now: Instant, queue: bool) {
        while p.server < self.upstream.len() {
            let left = p
                .overall
                .saturating_duration_since(now)
                .min(self.per_server);
            if left.is_zero() {
                break;
            }
            let sent = if queue {
                self.upstream_socket(p.server).map(|_| ())
            } else {
                self.send_upstream(p.server, &p.question)
            };
            if sent.is_ok() {
                if queue {
                    self.forwards.push((id, p.server));
                }
                p.deadline = now + left;
                self.earliest = Some(self.earliest.map_or(p.deadline, |e| e.min(p.deadline)));
                self.pending.insert(id, p);
                return;
            }
            p.server += 1;
        }
        self.reply(p.listener, p.client, servfail_response(&p.req, &p.raw()));
    }

    /// Send the questions queued by this wake-up, one `sendmmsg` per server and [`SLOTS`]
    /// questions. A question whose send fails moves on to the next server at once.
    fn flush_forwards(&mut self) {
        let queued = std::mem::take(&mut self.forwards);
        let mut failed = Vec::new();
        for server in 0..self.upstream.len() {
            let Some(sock) = self.upstream[server].as_ref() else {
                failed.extend(queued.iter().filter(|q| q.1 == server).map(|q| q.0));
                continue;
            };
            let mut batch = queued.iter().filter(|q| q.1 == server).peekable();
            while batch.peek().is_some() {
                self.tx.clear();
                let mut ids = [0u16; SLOTS];
                for &(id, _) in batch.by_ref().take(SLOTS) {
                    // Still waiting for this server (nothing below moves it, but be sure).
                    if let Some(p) = self.pending.get(&id).filter(|p| p.server == server) {
                        ids[self.tx.len] = id;
                        self.tx.push(&p.question, None);
                    }
                }
                let sent = self.tx.send(sock.as_raw_fd());
                let ids = &ids[..self.tx.len];
                failed.extend(
                    ids.iter()
                        .zip(sent)
                        .filter(|(_, ok)| !*ok)
                        .map(|(id, _)| *id),
                );
            }
        }
        let now = Instant::now();
        for id in failed {
            if let Some(mut p) = self.pending.remove(&id) {
                p.server += 1;
                self.forward(id, p, now, false);
            }
        }
        self.forwards = queued;
        self.forwards.clear();
    }

    /// The marked socket connected to `server`, opened (and watched) on first use.
    fn upstream_socket(&mut self, server: usize) -> io::Result<&UdpSocket> {
        if self.upstream[server].is_none() {
            let addr = self.shared.settings.upstreams[server];
            let local: SocketAddr = match addr {
                SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
                SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            let sock = UdpSocket::bind(local)?;
            mark(&sock)?;
            sock.connect(addr)?; // only this server's datagrams are received
            sock.set_nonblocking(true)?;
            epoll::add(
                &self.ep,
                &sock,
                token(Source::Upstream, server),
                epoll::EventFlags::IN,
            )?;
            self.upstream[server] = Some(sock);
        }
        Ok(self.upstream[server].as_ref().expect("opened above"))
    }

    fn send_upstream(&mut self, server: usize, question: &[u8]) -> io::Result<()> {
        self.upstream_socket(server)?.send(question).map(|_| ())
    }

    fn take_answers(&mut self, server: usize, policy: &DnsPolicy, rx: &mut RecvBatch) {
        for _ in 0..RECV_BURST / SLOTS {
            let Some(sock) = self.upstream[server].as_ref() else {
                return;
            };
            // One question out: one answer to come.
            let n = match rx.recv(sock.as_raw_fd(), self.pending.len() == 1) {
                Ok(n) => n,
                Err(Errno::AGAIN) => return,
                Err(Errno::INTR) => continue,
                Err(_) => {
                    // The server refuses (ICMP unreachable) or the socket broke: whoever
                    // waits on it moves on to the next server now rather than at its deadline.
                    self.upstream[server] = None; // closing removes it from epoll
                    self.fail_over(server);
                    return;
                }
            };
            for i in 0..n {
                let cut = rx.truncated(i);
                self.upstream_answer(server, rx.msg_mut(i), cut, policy);
            }
            if n < SLOTS {
                return; // drained
            }
        }
    }

    /// `reply` is the datagram in the receive buffer: the client's ID is put back in place.
    fn upstream_answer(&mut self, server: usize, reply: &mut [u8], cut: bool, policy: &DnsPolicy) {
        if reply.len() < 2 {
            return;
        }
        let id = u16::from_be_bytes([reply[0], reply[1]]);
        // Late answers to earlier (timed-out) questions carry unknown IDs: skip them.
        if self.pending.get(&id).is_none_or(|p| p.server != server) {
            return;
        }
        let p = self.pending.remove(&id).expect("checked above");
        if cut {
            // Larger than a receive slot: what arrived is not the whole answer.
            return self.retry_over_tcp(p);
        }
        reply[..2].copy_from_slice(&p.req.id.to_be_bytes());
        let answer = extract_answer(reply, &p.req, policy, self.shared.settings.ttl_bounds);
        match answer {
            AnswerDecision::Answer(a) => self.done.push((p, a)),
            AnswerDecision::RetryOverTcp => self.retry_over_tcp(p),
            AnswerDecision::Refused(_) => {
                let msg = refused_response(&p.req, &p.raw());
                self.reply(p.listener, p.client, msg)
            }
            AnswerDecision::Reject(_) => {
                let msg = servfail_response(&p.req, &p.raw());
                self.reply(p.listener, p.client, msg)
            }
        }
    }

    /// Move every question waiting on `server` to the next server.
    fn fail_over(&mut self, server: usize) {
        let ids: Vec<u16> = self
            .pending
            .iter()
            .filter(|(_, p)| p.server == server)
            .map(|(id, _)| *id)
            .collect();
        let now = Instant::now();
        for id in ids {
            let mut p = self.pending.remove(&id).expect("listed above");
            p.server += 1;
            self.forward(id, p, now, false);
        }
    }

    /// A truncated upstream answer: ask again over TCP, on a thread of its own (rare, slow).
    fn retry_over_tcp(&mut self, p: Pending) {
        let sock = self.clients[p.listener].clone();
        spawn_bounded(&self.shared, move |s| {
            let mut worker = Worker::default();
            if let Some(reply) = answer(s, &mut worker, &p.raw(), false) {
                let _ = sock.send_to(&reply, p.client);
            }
        });
    }

    fn accept(&mut self, listener: usize) {
        loop {
            match self.tcp[listener].accept() {
                Ok((conn, _)) => {
                    if conn.set_nonblocking(false).is_ok() {
                        spawn_bounded(&self.shared, move |s| {
                            let _ = serve_tcp(s, conn);
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return, // WouldBlock, or out of descriptors: try at the next event
            }
        }
    }

    /// Put the addresses of this wake-up's answers into their sets, record them, and only
    /// then send the answers (SERVFAIL for an answer whose addresses could not be added).
    fn finish(&mut self) {
        if self.done.is_empty() {
            return;
        }
        let mut failed = vec![false; self.done.len()];
        // One add per (set, timeout); each remembers which answers it carries.
        let mut groups: Vec<(&'static str, Duration, Vec<SetKey>, Vec<usize>)> = Vec::new();
        for (i, (_, a)) in self.done.iter().enumerate() {
            for ins in &a.inserts {
                let (set, ttl) = (ins.set(), ins.ttl);
                let at = match groups.iter().position(|g| g.0 == set && g.1 == ttl) {
                    Some(at) => at,
                    None => {
                        groups.push((set, ttl, Vec::new(), Vec::new()));
                        groups.len() - 1
                    }
                };
                groups[at].2.extend(keys_for(ins.addr, ins.scope));
                if groups[at].3.last() != Some(&i) {
                    groups[at].3.push(i);
                }
            }
        }
        for (set, ttl, keys, carried) in &groups {
            if add_learned(&mut self.worker, set, keys, *ttl).is_err() {
                // Never hand out an address the firewall would refuse.
                for i in carried {
                    failed[*i] = true;
                }
            }
        }
        for (p, a) in &self.done {
            if a.inserts.is_empty() {
                self.shared
                    .events
                    .answered_unlearned(&p.req.qname, &a.named);
            }
        }
        for ((p, a), failed) in std::mem::take(&mut self.done).into_iter().zip(failed) {
            let msg = if failed {
                servfail_response(&p.req, &p.raw())
            } else if a.response.len() > usize::from(p.req.udp_payload) {
                truncated_response(&p.req, &p.raw())
            } else {
                a.response
            };
            self.reply(p.listener, p.client, msg);
            if !failed {
                // Recorded by `record_learned` once the replies are out: the record is for a
                // later `deny NAME`, and no reply waits on it (its set insertion is done).
                self.learned.extend(a.inserts);
            }
        }
    }

    /// Append the learned.jsonl records of the answers just sent.
    fn record_learned(&mut self) {
        if self.learned.is_empty() {
            return;
        }
        learned_lines(&mut self.worker.lines, &self.learned);
        self.learned.clear();
        append_learned(&self.shared, &self.worker.lines);
        self.worker.lines.clear();
    }

    /// Questions whose server has had its time go to the next one (or get SERVFAIL).
    fn expire(&mut self) {
        let now = Instant::now();
        if self.earliest.is_none_or(|at| at > now) {
            return;
        }
        let ids: Vec<u16> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let mut p = self.pending.remove(&id).expect("listed above");
            p.server += 1;
            self.forward(id, p, now, false);
        }
        self.earliest = self.pending.values().map(|p| p.deadline).min();
    }
}

/// Headers and buffer for receiving up to [`SLOTS`] datagrams in one `recvmmsg`.
///
/// The buffer is capacity only (length 0): the kernel writes into it, and only the pages it
/// writes become resident (a burst of small questions touches one page per slot).
struct RecvBatch {
    buf: Vec<u8>,
    iov: [libc::iovec; SLOTS],
    names: [libc::sockaddr_storage; SLOTS],
    hdr: [libc::mmsghdr; SLOTS],
}

impl RecvBatch {
    fn new() -> Box<RecvBatch> {
        Box::new(RecvBatch {
            buf: Vec::with_capacity(SLOTS * SLOT),
            // SAFETY: all-zero bytes are a valid value of these plain C structs (null
            // pointers, zero lengths); `recv` fills them in before every use.
            iov: unsafe { std::mem::zeroed() },
            names: unsafe { std::mem::zeroed() },
            hdr: unsafe { std::mem::zeroed() },
        })
    }

    /// Take what is queued on `fd`, up to [`SLOTS`] datagrams (only one when `one`: a
    /// `recvmsg` costs less than a `recvmmsg` that goes on to find nothing more), without
    /// waiting.
    fn recv(&mut self, fd: std::os::fd::RawFd, one: bool) -> Result<usize, Errno> {
        let base = self.buf.as_mut_ptr();
        for i in 0..SLOTS {
            self.iov[i] = libc::iovec {
                // SAFETY: within the buffer's capacity (SLOTS * SLOT bytes).
                iov_base: unsafe { base.add(i * SLOT) }.cast(),
                iov_len: SLOT,
            };
            let h = &mut self.hdr[i];
            h.msg_hdr.msg_iov = &mut self.iov[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as _;
            h.msg_hdr.msg_control = std::ptr::null_mut();
            h.msg_hdr.msg_controllen = 0;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        // SAFETY: every header points at its own slot (SLOT bytes of the buffer's capacity)
        // and its own address storage, all owned by self and alive for the call.
        let n = if one {
            let h = &mut self.hdr[0];
            // SAFETY: as for recvmmsg below, with the first header alone.
            let len = unsafe { libc::recvmsg(fd, &mut h.msg_hdr, libc::MSG_DONTWAIT) };
            h.msg_len = len.max(0) as _;
            len.min(1) as libc::c_int
        } else {
            unsafe {
                libc::recvmmsg(
                    fd,
                    self.hdr.as_mut_ptr(),
                    SLOTS as _,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            }
        };
        if n < 0 {
            return Err(Errno::from_io_error(&io::Error::last_os_error()).unwrap_or(Errno::IO));
        }
        Ok(n as usize)
    }

    /// Datagram `i` of the last `recv` (as much of it as fitted in its slot).
    fn msg(&self, i: usize) -> &[u8] {
        let len = (self.hdr[i].msg_len as usize).min(SLOT);
        // SAFETY: the kernel wrote these `len` bytes of slot `i` in the last `recv`.
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr().add(i * SLOT), len) }
    }

    /// Datagram `i` of the last `recv`, to change in place.
    fn msg_mut(&mut self, i: usize) -> &mut [u8] {
        let len = (self.hdr[i].msg_len as usize).min(SLOT);
        // SAFETY: the kernel wrote these `len` bytes of slot `i` in the last `recv`; the
        // borrow of self keeps the buffer from being touched by anything else meanwhile.
        unsafe { std::slice::from_raw_parts_mut(self.buf.as_mut_ptr().add(i * SLOT), len) }
    }

    /// Whether datagram `i` was larger than its slot.
    fn truncated(&self, i: usize) -> bool {
        self.hdr[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0
    }

    /// The sender of datagram `i`.
    fn from(&self, i: usize) -> Option<SocketAddr> {
        from_sockaddr(&self.names[i], self.hdr[i].msg_hdr.msg_namelen)
    }
}

/// Headers for sending up to [`SLOTS`] datagrams in one `sendmmsg` (pointing at messages the
/// caller keeps alive until `send` returns).
struct SendBatch {
    len: usize,
    iov: [libc::iovec; SLOTS],
    names: [libc::sockaddr_storage; SLOTS],
    hdr: [libc::mmsghdr; SLOTS],
}

impl Default for SendBatch {
    fn default() -> SendBatch {
        SendBatch {
            len: 0,
            // SAFETY: as in RecvBatch::new; `push` fills in each entry before it is used.
            iov: unsafe { std::mem::zeroed() },
            names: unsafe { std::mem::zeroed() },
            hdr: unsafe { std::mem::zeroed() },
        }
    }
}

impl SendBatch {
    fn clear(&mut self) {
        self.len = 0;
    }

    /// Add `msg` (to `to`, or to the connected peer); at most [`SLOTS`] per batch.
    fn push(&mut self, msg: &[u8], to: Option<SocketAddr>) {
        let i = self.len;
        assert!(i < SLOTS, "SendBatch holds SLOTS messages");
        self.iov[i] = libc::iovec {
            iov_base: msg.as_ptr().cast_mut().cast(),
            iov_len: msg.len(),
        };
        let namelen = match to {
            Some(to) => to_sockaddr(to, &mut self.names[i]),
            None => 0,
        };
        let h = &mut self.hdr[i];
        h.msg_hdr.msg_iov = &mut self.iov[i];
        h.msg_hdr.msg_iovlen = 1;
        h.msg_hdr.msg_name = if namelen == 0 {
            std::ptr::null_mut()
        } else {
            (&mut self.names[i] as *mut libc::sockaddr_storage).cast()
        };
        h.msg_hdr.msg_namelen = namelen;
        h.msg_hdr.msg_control = std::ptr::null_mut();
        h.msg_hdr.msg_controllen = 0;
        h.msg_hdr.msg_flags = 0;
        h.msg_len = 0;
        self.len += 1;
    }

    /// Send the batch without waiting; which messages went out. A message the kernel refuses
    /// (full buffer, an ICMP error pending on a connected socket, ...) is skipped and the rest
    /// still go. The messages pushed must still be alive: the caller holds them.
    fn send(&mut self, fd: std::os::fd::RawFd) -> [bool; SLOTS] {
        let mut sent = [false; SLOTS];
        let mut at = 0;
        // Bounded: every round sends at least one message or skips one.
        for _ in 0..2 * SLOTS + 2 {
            if at >= self.len {
                break;
            }
            // SAFETY: headers at..len were filled in by `push` and point at the caller's
            // messages and at address storage owned by self.
            let n = unsafe {
                if self.len - at == 1 {
                    // One message (the usual case at low load): sendmsg is the cheaper call.
                    if libc::sendmsg(fd, &self.hdr[at].msg_hdr, libc::MSG_DONTWAIT) < 0 {
                        -1
                    } else {
                        1
                    }
                } else {
                    libc::sendmmsg(
                        fd,
                        self.hdr[at..].as_mut_ptr(),
                        (self.len - at) as _,
                        libc::MSG_DONTWAIT,
                    )
                }
            };
            if n > 0 {
                sent[at..at + n as usize].fill(true);
                at += n as usize;
            } else if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                at += 1; // this one failed: skip it
            }
        }
        sent
    }
}

/// A socket address from what the kernel wrote (`len` bytes of `s`).
fn from_sockaddr(s: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match i32::from(s.ss_family) {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says so and the length covers it; storage is aligned for all.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::from((
                a.sin_addr.s_addr.to_ne_bytes(),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Write `addr` into `s` as the kernel expects it; returns the length used.
fn to_sockaddr(addr: SocketAddr, s: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            unsafe { std::ptr::write((s as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>() as _
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((s as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>() as _
        }
    }
}

/// Resources reused across questions: the netlink socket (opening it per question doubled
/// the latency) and the buffers (no large allocation, no zeroing per question).
#[derive(Default)]
struct Worker {
    nf: Option<NfSock>,
    /// Insertions wait for a listing of the table under way (see `effects::table_read`).
    gate: Option<LearnGate>,
    /// xorshift state for upstream IDs, seeded from /dev/urandom on first use.
    rng: u64,
    /// The upstream's answer (capacity 64 KiB, only as much touched as answers need).
    reply: Vec<u8>,
    /// learned.jsonl lines of the current answer.
    lines: Vec<u8>,
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

fn spawn_bounded(shared: &Arc<Shared>, work: impl FnOnce(&Shared) + Send + 'static) {
    if shared.in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_IN_FLIGHT {
        shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        return; // the client retries; a flood does not grow memory
    }
    let s = shared.clone();
    // A small stack: the resolver's memory budget is a few MiB per container.
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

/// The reply to one client message, asking upstream over TCP (None: drop it). The blocking
/// path: TCP clients, and UDP questions whose UDP answer came back truncated.
fn answer(shared: &Shared, worker: &mut Worker, raw: &[u8], over_tcp: bool) -> Option<Vec<u8>> {
    let req = match inspect_request(raw) {
        Ok(r) => r,
        Err(m) => return m.reply().map(<[u8]>::to_vec),
    };
    let policy = shared.policy();
    if let Some(why) = policy.refusal(&req.qname, req.qtype) {
        shared.events.refused(&req.qname, req.qtype, &why);
        return Some(refused_response(&req, raw));
    }
    let upstream_id = worker.next_id(shared);
    let question = with_id(raw, upstream_id);
    for _ in 0..2 {
        if !ask_upstream(shared, worker, &question) {
            return Some(servfail_response(&req, raw));
        }
        match extract_answer(
            &with_id(&worker.reply, req.id),
            &req,
            &policy,
            shared.settings.ttl_bounds,
        ) {
            AnswerDecision::Answer(a) => {
                if learn(worker, &shared.settings.bundle_dir, &a.inserts).is_err() {
                    // Never hand out an address the firewall would refuse.
                    return Some(servfail_response(&req, raw));
                }
                if a.inserts.is_empty() {
                    shared.events.answered_unlearned(&req.qname, &a.named);
                } else {
                    record_learned(shared, &mut worker.lines, &a.inserts);
                }
                if !over_tcp && a.response.len() > usize::from(req.udp_payload) {
                    return Some(truncated_response(&req, raw));
                }
                return Some(a.response);
            }
            AnswerDecision::RetryOverTcp => {} // truncated even over TCP: once more
            AnswerDecision::Refused(_) => return Some(refused_response(&req, raw)),
            AnswerDecision::Reject(_) => return Some(servfail_response(&req, raw)),
        }
    }
    Some(servfail_response(&req, raw))
}

/// Record which name brought which element (`learned.jsonl`), so a later `deny NAME` can
/// remove exactly those. One `write` per answer on a file kept open (O_APPEND); compacted to
/// live records when it has doubled since the last compaction (and is past 1 MiB).
fn record_learned<'a>(
    shared: &Shared,
    lines: &mut Vec<u8>,
    inserts: impl IntoIterator<Item = &'a crate::core::dns_policy::Insert>,
) {
    lines.clear();
    learned_lines(lines, inserts);
    append_learned(shared, lines);
}

/// Append the learned.jsonl lines of `inserts` to `lines`.
fn learned_lines<'a>(
    lines: &mut Vec<u8>,
    inserts: impl IntoIterator<Item = &'a crate::core::dns_policy::Insert>,
) {
    use crate::core::learned::LearnedRecord;
    let now = crate::effects::audit::unix_secs();
    for ins in inserts {
        let rec = LearnedRecord {
            domain: ins.domain.clone(),
            addr: ins.addr,
            scope: ins.scope.map(|s| s.to_string()),
            until: now + ins.ttl.as_secs() + 1,
        };
        let mark = lines.len();
        if serde_json::to_writer(&mut *lines, &rec).is_ok() {
            lines.push(b'\n');
        } else {
            lines.truncate(mark);
        }
    }
}

/// Write `lines` (whole learned.jsonl records) to the log, if any.
fn append_learned(shared: &Shared, lines: &[u8]) {
    if lines.is_empty() {
        return;
    }
    let now = crate::effects::audit::unix_secs();
    let mut log = shared.learned.lock().unwrap_or_else(|p| p.into_inner());
    log.append(lines, now);
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
fn learn(
    worker: &mut Worker,
    bundle_dir: &Path,
    inserts: &[crate::core::dns_policy::Insert],
) -> io::Result<()> {
    if inserts.is_empty() {
        return Ok(());
    }
    let mut gate = worker
        .gate
        .take()
        .unwrap_or_else(|| LearnGate::new(bundle_dir));
    let result = gate.around(|| {
        inserts.iter().try_for_each(|ins| {
            add_learned(worker, ins.set(), &keys_for(ins.addr, ins.scope), ins.ttl)
        })
    });
    worker.gate = Some(gate);
    result
}

fn add_learned(worker: &mut Worker, set: &str, keys: &[SetKey], ttl: Duration) -> io::Result<()> {
    if worker.nf.is_none() {
        worker.nf = Some(NfSock::open()?);
    }
    let sock = worker.nf.as_mut().expect("opened above");
    let result = sock.add_elements(set, keys, Some(ttl));
    if result.is_err() {
        worker.nf = None; // start afresh next time
    }
    result
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
fn ask_upstream(shared: &Shared, worker: &mut Worker, question: &[u8]) -> bool {
    let deadline = Instant::now() + UPSTREAM_TIMEOUT;
    let per_server = UPSTREAM_TIMEOUT / shared.settings.upstreams.len().max(1) as u32;
    for server in &shared.settings.upstreams {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .min(per_server);
        if left.is_zero() {
            break;
        }
        if ask_tcp(*server, question, left, &mut worker.reply).is_ok() {
            return true;
        }
    }
    false
}

fn ask_tcp(
    server: SocketAddr,
    question: &[u8],
    wait: Duration,
    reply: &mut Vec<u8>,
) -> io::Result<()> {
    let sock = socket2_free_tcp(server, wait)?;
    let mut conn = sock;
    conn.set_read_timeout(Some(wait))?;
    conn.set_write_timeout(Some(wait))?;
    let mut out = (question.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(question);
    conn.write_all(&out)?;
    let mut len = [0u8; 2];
    conn.read_exact(&mut len)?;
    reply.clear();
    reply.resize(usize::from(u16::from_be_bytes(len)), 0);
    conn.read_exact(reply)?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ts-watch-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// What the event loop does on a wake-up: take the watch's events if epoll has any.
    fn wake(ep: &OwnedFd, watch: &mut StateWatch) {
        let mut events: Vec<epoll::Event> = Vec::with_capacity(4);
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        epoll::wait(ep, spare_capacity(&mut events), Some(&zero)).unwrap();
        if events.iter().any(|ev| untoken(ev.data).0 == Source::Watch) {
            watch.drain();
        }
    }

    #[test]
    fn the_watch_notices_state_json_replaced_and_ignores_the_learned_log() {
        let dir = scratch("notice");
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC).unwrap();
        let mut watch = StateWatch::new(&ep, &dir);
        assert!(watch.fd.is_some(), "inotify is available here");
        assert!(watch.stale, "the first wake-up looks at the file");
        watch.stale = false; // as after that first look

        // The resolver's own appends to learned.jsonl (kept open, never closed) and other
        // files' writes are no reason to look.
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(LEARNED_FILE))
            .unwrap();
        log.write_all(b"{}\n").unwrap();
        std::fs::write(dir.join("audit.jsonl"), b"{}\n").unwrap();
        wake(&ep, &mut watch);
        assert!(!watch.stale, "no event names state.json");

        // The CLI's write: a temporary file renamed over state.json.
        std::fs::write(dir.join("state.json.tmp"), b"{}").unwrap();
        std::fs::rename(dir.join("state.json.tmp"), dir.join(STATE_FILE)).unwrap();
        wake(&ep, &mut watch);
        assert!(watch.stale, "a replaced state.json is looked at");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn without_its_directory_the_watch_falls_back_to_a_look_per_wake_up() {
        let dir = scratch("gone");
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC).unwrap();
        let mut watch = StateWatch::new(&ep, &dir);
        watch.stale = false;
        std::fs::remove_dir_all(&dir).unwrap();
        wake(&ep, &mut watch);
        assert!(
            watch.fd.is_none(),
            "the watch is dropped with its directory"
        );
        assert!(watch.stale);

        let missing = StateWatch::new(&ep, &dir);
        assert!(missing.fd.is_none(), "no directory, no watch");
        assert!(missing.stale, "so every wake-up looks");
    }
}
