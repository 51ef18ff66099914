//! Static pre-start DNS resolution: turn the allowed domain names into addresses before the
//! container starts, in-process and in one batch.
//!
//! The shield opens addresses, not names, so every allowed domain has to be resolved before
//! the ruleset is applied. Shelling out to `dig` or `getent` per name would be slow (one
//! process and one round trip per name), depend on tools that may be missing, and hand
//! untrusted text to a parser we do not control. Instead this module sends every A and AAAA
//! query of the batch at once over one UDP socket per address family, matches answers by
//! random ID *and* question, retries silent servers, falls back to TCP for truncated answers
//! and stops at one overall deadline, so a container start waits at most `timeout` for DNS.
//!
//! Messages are built and parsed with `hickory-proto`; no DNS byte is parsed by hand here.
//! Malformed, oversized or unexpected packets are dropped, never trusted and never a panic.

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use rustix::event::{PollFd, PollFlags, Timespec};
use thiserror::Error;

use crate::core::target::DomainName;

/// Largest UDP answer accepted; we advertise the same size with EDNS so servers fill it.
const MAX_UDP_ANSWER: usize = 4096;
/// Longest CNAME chain followed inside one answer (resolvers give up at about this depth too).
const MAX_CNAME_CHAIN: usize = 16;
/// TCP fallbacks running at the same time; truncation is rare, so a few are plenty.
const MAX_TCP_WORKERS: usize = 8;
/// Queries sent back to back before a short pause: a burst of hundreds would overflow the
/// server's (or our) socket receive buffer, and dropped datagrams cost a whole retry window.
const SEND_BURST: usize = 64;
/// The pause between bursts; 200 names (400 queries) go out in about 6 ms.
const BURST_GAP: Duration = Duration::from_millis(1);
/// While a TCP fallback runs, the UDP wait is cut to this so its result is picked up promptly.
const TCP_POLL_SLICE: Duration = Duration::from_millis(5);

/// The outcome of resolving one domain name; one per input name, in input order.
///
/// Failures are per name and never abort the batch: a name that did not resolve simply opens
/// nothing, and `error` tells the user why so they can fix the name or the resolver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The name that was asked for, exactly as given.
    pub name: DomainName,
    /// Unique addresses: IPv4 (A) first, then IPv6 (AAAA), each in answer order.
    pub addrs: Vec<IpAddr>,
    /// Smallest TTL (seconds) among the records used, CNAMEs included; `None` if none was used.
    /// Lets the caller decide when a re-resolution is due.
    pub ttl: Option<u32>,
    /// Why the name gave no (or only partial) addresses: `NXDOMAIN`, `SERVFAIL from …`,
    /// `no answer from … within 3s`, `no A or AAAA records`, or `AAAA: …` when only one
    /// family failed. `None` when both lookups succeeded with at least one address.
    pub error: Option<String>,
}

/// Where and how long to ask: the resolver's whole policy in one value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolverConfig {
    /// Upstream servers, tried in order for each attempt (`upstream_dns` or resolv.conf).
    pub servers: Vec<SocketAddr>,
    /// Deadline for the whole batch, not per query: bounds how long a container start waits.
    pub timeout: Duration,
    /// Passes over the server list for each unanswered query (0 is treated as 1).
    pub attempts: u32,
}

impl ResolverConfig {
    /// The default policy (3 s batch deadline, 2 attempts) for the given servers.
    pub fn new(servers: Vec<SocketAddr>) -> Self {
        ResolverConfig {
            servers,
            ..Self::default()
        }
    }
}

impl Default for ResolverConfig {
    /// No servers, 3 s deadline, 2 attempts: the values a container start should wait at most.
    fn default() -> Self {
        ResolverConfig {
            servers: Vec::new(),
            timeout: Duration::from_secs(3),
            attempts: 2,
        }
    }
}

/// Why a whole batch could not even be attempted; per-name failures are in [`Resolution`].
#[derive(Debug, Error)]
pub enum DnsClientError {
    /// The configuration names no server at all.
    #[error("no DNS server configured: set upstream_dns in config.yml or add a nameserver to /etc/resolv.conf")]
    NoServers,
    /// Not one UDP socket could be opened for the configured servers' address families.
    #[error("cannot open a UDP socket for DNS queries ({detail}); check that this process may create sockets (a seccomp filter or a network namespace without that address family forbids it), or set upstream_dns in config.yml to a server of another address family")]
    NoSocket {
        /// The operating system's reasons, one per address family tried.
        detail: String,
    },
}

/// Parse the `nameserver` lines of a resolv.conf text, in file order, without duplicates.
///
/// Pure (takes the text, not a path) so callers decide which file to read and tests never
/// touch the host's resolver. Comments (`#`, `;`), other options, unparsable addresses and
/// zone suffixes (`fe80::1%eth0` becomes `fe80::1`) are ignored rather than fatal: a broken
/// line must not stop the shield from using the good ones.
pub fn servers_from_resolv_conf(text: &str) -> Vec<IpAddr> {
    let mut servers = Vec::new();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(word) = words.next() else { continue };
        let addr = word.split('%').next().unwrap_or(word);
        if let Ok(ip) = addr.parse::<IpAddr>() {
            if !servers.contains(&ip) {
                servers.push(ip);
            }
        }
    }
    servers
}

/// Resolve every name (A and AAAA) against `cfg.servers` within `cfg.timeout`.
///
/// Returns one [`Resolution`] per input name, in input order (duplicates are asked once).
/// Only a batch that cannot start is an `Err`: no server, or no socket for any server's
/// address family. Every other failure stays local to its name.
pub fn resolve_all(
    cfg: &ResolverConfig,
    names: &[DomainName],
) -> Result<Vec<Resolution>, DnsClientError> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let mut servers: Vec<SocketAddr> = Vec::new();
    for s in &cfg.servers {
        if !servers.contains(s) {
            servers.push(*s);
        }
    }
    if servers.is_empty() {
        return Err(DnsClientError::NoServers);
    }
    let sockets = Sockets::open(&servers)?;

    let mut unique: Vec<DomainName> = Vec::new();
    let mut slot: HashMap<&DomainName, usize> = HashMap::new();
    let index: Vec<usize> = names
        .iter()
        .map(|n| {
            *slot.entry(n).or_insert_with(|| {
                unique.push(n.clone());
                unique.len() - 1
            })
        })
        .collect();

    let mut batch = Batch::new(cfg, servers, sockets, &unique);
    batch.run();
    let resolved: Vec<Resolution> = unique
        .iter()
        .enumerate()
        .map(|(i, name)| batch.resolution(i, name.clone()))
        .collect();
    Ok(index.into_iter().map(|i| resolved[i].clone()).collect())
}

/// The result of one query (one name, one record type).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Answer {
        addrs: Vec<IpAddr>,
        ttl: Option<u32>,
    },
    Failed(String),
}

/// One query in flight: its question, retry bookkeeping and result.
struct Pending {
    qname: Name,
    rtype: RecordType,
    /// UDP tries used so far; try `k` goes to server `k % servers.len()`.
    tries: u32,
    /// When the next UDP try is due; `None` while waiting for TCP or once tries are used up.
    due: Option<Instant>,
    /// A TCP fallback for this query is queued or running.
    tcp: bool,
    /// Servers this query went to over UDP.
    asked: BTreeSet<usize>,
    /// Servers that answered it in any way (even with an error); the rest stayed silent.
    answered: BTreeSet<usize>,
    /// Readable reasons collected along the way (SERVFAIL, send errors, …), without repeats.
    errors: Vec<String>,
    outcome: Option<Outcome>,
}

impl Pending {
    fn note(&mut self, error: String) {
        if !self.errors.contains(&error) {
            self.errors.push(error);
        }
    }
}

/// The UDP sockets of a batch: at most one per address family, non-blocking.
struct Sockets {
    v4: Option<UdpSocket>,
    v6: Option<UdpSocket>,
    /// Why a needed family has no socket, to explain the queries that could not be sent.
    v4_error: Option<String>,
    v6_error: Option<String>,
}

impl Sockets {
    fn open(servers: &[SocketAddr]) -> Result<Sockets, DnsClientError> {
        let open = |unspecified: IpAddr| -> Result<UdpSocket, String> {
            let socket = UdpSocket::bind(SocketAddr::new(unspecified, 0))
                .map_err(|e| format!("{} socket: {e}", family(unspecified)))?;
            socket
                .set_nonblocking(true)
                .map_err(|e| format!("{} socket: {e}", family(unspecified)))?;
            Ok(socket)
        };
        let mut sockets = Sockets {
            v4: None,
            v6: None,
            v4_error: None,
            v6_error: None,
        };
        if servers.iter().any(SocketAddr::is_ipv4) {
            match open(IpAddr::V4(Ipv4Addr::UNSPECIFIED)) {
                Ok(s) => sockets.v4 = Some(s),
                Err(e) => sockets.v4_error = Some(e),
            }
        }
        if servers.iter().any(SocketAddr::is_ipv6) {
            match open(IpAddr::V6(Ipv6Addr::UNSPECIFIED)) {
                Ok(s) => sockets.v6 = Some(s),
                Err(e) => sockets.v6_error = Some(e),
            }
        }
        if sockets.v4.is_none() && sockets.v6.is_none() {
            let detail = [sockets.v4_error.take(), sockets.v6_error.take()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("; ");
            return Err(DnsClientError::NoSocket { detail });
        }
        Ok(sockets)
    }

    fn for_server(&self, server: &SocketAddr) -> Result<&UdpSocket, &str> {
        let (socket, error) = if server.is_ipv4() {
            (&self.v4, &self.v4_error)
        } else {
            (&self.v6, &self.v6_error)
        };
        socket
            .as_ref()
            .ok_or_else(|| error.as_deref().unwrap_or("no socket"))
    }
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// A TCP fallback waiting for a worker.
struct TcpJob {
    query: usize,
    server: usize,
}

/// What a TCP worker reports back.
struct TcpDone {
    query: usize,
    server: usize,
    result: Result<Message, String>,
}

/// All state of one `resolve_all` call.
struct Batch {
    servers: Vec<SocketAddr>,
    sockets: Sockets,
    queries: Vec<Pending>,
    /// (server index, DNS ID) of every UDP query sent -> index into `queries`.
    ids: HashMap<(usize, u16), usize>,
    total_tries: u32,
    per_try: Duration,
    timeout: Duration,
    deadline: Instant,
    tcp_queue: Vec<TcpJob>,
    tcp_running: usize,
    /// No query is sent before this instant (pacing between bursts).
    next_burst: Instant,
}

impl Batch {
    fn new(
        cfg: &ResolverConfig,
        servers: Vec<SocketAddr>,
        sockets: Sockets,
        names: &[DomainName],
    ) -> Batch {
        let total_tries = cfg
            .attempts
            .max(1)
            .saturating_mul(u32::try_from(servers.len()).unwrap_or(u32::MAX));
        let start = Instant::now();
        // Capped so that instant arithmetic cannot overflow; nobody waits a day for DNS.
        let budget = cfg.timeout.min(Duration::from_secs(86_400));
        let mut queries = Vec::with_capacity(names.len() * 2);
        for name in names {
            let qname = Name::from_ascii(format!("{}.", name.as_str()));
            for rtype in [RecordType::A, RecordType::AAAA] {
                let mut pending = Pending {
                    qname: Name::root(),
                    rtype,
                    tries: 0,
                    due: Some(start),
                    tcp: false,
                    asked: BTreeSet::new(),
                    answered: BTreeSet::new(),
                    errors: Vec::new(),
                    outcome: None,
                };
                match &qname {
                    Ok(n) => pending.qname = n.clone(),
                    Err(e) => {
                        pending.due = None;
                        pending.outcome =
                            Some(Outcome::Failed(format!("cannot encode the name: {e}")));
                    }
                }
                queries.push(pending);
            }
        }
        Batch {
            servers,
            sockets,
            queries,
            ids: HashMap::new(),
            total_tries,
            per_try: budget / total_tries.max(1),
            timeout: cfg.timeout,
            deadline: start + budget,
            tcp_queue: Vec::new(),
            tcp_running: 0,
            next_burst: start,
        }
    }

    /// The event loop: send what is due, wait for answers, until everything is settled or
    /// the deadline passes. TCP fallbacks run on scoped threads so they cannot outlive it.
    fn run(&mut self) {
        let (tx, rx) = mpsc::channel::<TcpDone>();
        std::thread::scope(|scope| loop {
            let now = Instant::now();
            if now >= self.deadline {
                break;
            }
            self.start_tcp(scope, &tx);
            self.send_due(now);
            if self.settled() {
                break;
            }
            let now = Instant::now();
            let mut wait = self.deadline.saturating_duration_since(now);
            let next_due = self
                .queries
                .iter()
                .filter(|q| q.outcome.is_none() && !q.tcp)
                .filter_map(|q| q.due)
                .min();
            if let Some(next) = next_due {
                let next = next.max(self.next_burst);
                wait = wait.min(next.saturating_duration_since(now));
            }
            if self.tcp_running > 0 {
                wait = wait.min(TCP_POLL_SLICE);
            }
            self.wait_readable(wait);
            self.drain_udp();
            while let Ok(done) = rx.try_recv() {
                self.tcp_running -= 1;
                self.on_tcp(done);
            }
        });
        // Threads are joined; pick up results that arrived after the last look.
        while let Ok(done) = rx.try_recv() {
            self.on_tcp(done);
        }
    }

    /// True when no query can still change: each has its outcome, or is out of tries with
    /// no TCP fallback running and no server left that might still answer.
    fn settled(&self) -> bool {
        self.queries.iter().all(|q| {
            q.outcome.is_some() || (q.due.is_none() && !q.tcp && q.asked.is_subset(&q.answered))
        })
    }

    /// Send the queries whose next try is due, at most one burst per call.
    fn send_due(&mut self, now: Instant) {
        if now < self.next_burst {
            return;
        }
        let mut sent = 0;
        for qi in 0..self.queries.len() {
            let q = &self.queries[qi];
            if q.outcome.is_some() || q.tcp || q.due.is_none_or(|d| d > now) {
                continue;
            }
            if sent == SEND_BURST {
                self.next_burst = now + BURST_GAP;
                return;
            }
            self.send_one(qi, now);
            sent += 1;
        }
    }

    /// Make the next UDP try of one query, skipping servers it cannot reach at all.
    fn send_one(&mut self, qi: usize, now: Instant) {
        loop {
            let q = &mut self.queries[qi];
            if q.tries >= self.total_tries {
                // Out of tries; a late answer to one already sent is still welcome.
                q.due = None;
                return;
            }
            let server = (q.tries as usize) % self.servers.len();
            q.tries += 1;
            let addr = self.servers[server];
            let socket = match self.sockets.for_server(&addr) {
                Ok(s) => s,
                Err(e) => {
                    let e = format!("cannot send to {addr}: {e}");
                    self.queries[qi].note(e);
                    continue;
                }
            };
            let id = fresh_id(&self.ids, server);
            let packet = match query_message(id, &q.qname, q.rtype).to_vec() {
                Ok(p) => p,
                Err(e) => {
                    q.due = None;
                    q.outcome = Some(Outcome::Failed(format!("cannot encode the query: {e}")));
                    return;
                }
            };
            match socket.send_to(&packet, addr) {
                Ok(_) => {
                    q.asked.insert(server);
                    q.due = Some(now + self.per_try);
                    self.ids.insert((server, id), qi);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Send buffer full: take the try back and come again shortly.
                    q.tries -= 1;
                    q.due = Some(now + Duration::from_millis(1));
                    return;
                }
                Err(e) => {
                    q.note(format!("cannot send to {addr}: {e}"));
                }
            }
        }
    }

    /// Block until a socket is readable or `wait` passes; errors only shorten the wait.
    fn wait_readable(&self, wait: Duration) {
        let mut fds: Vec<PollFd<'_>> = [&self.sockets.v4, &self.sockets.v6]
            .into_iter()
            .flatten()
            .map(|s| PollFd::new(s, PollFlags::IN))
            .collect();
        let timeout = Timespec::try_from(wait).unwrap_or(Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        });
        if let Err(e) = rustix::event::poll(&mut fds, Some(&timeout)) {
            if e != rustix::io::Errno::INTR {
                std::thread::sleep(wait.min(Duration::from_millis(1)));
            }
        }
    }

    /// Read every datagram waiting on the sockets and feed the plausible ones in.
    fn drain_udp(&mut self) {
        let mut buf = vec![0u8; MAX_UDP_ANSWER + 1];
        for v6 in [false, true] {
            // A bounded number of reads per call keeps one flooded socket from starving us.
            for _ in 0..4096 {
                let socket = if v6 {
                    &self.sockets.v6
                } else {
                    &self.sockets.v4
                };
                let Some(socket) = socket else { break };
                match socket.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        if n <= MAX_UDP_ANSWER {
                            self.on_datagram(from, &buf[..n]);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
        }
    }

    /// Accept a UDP answer only from a server we asked, with an ID we sent to that server and
    /// the exact question of that query; anything else is noise or a spoofing attempt.
    fn on_datagram(&mut self, from: SocketAddr, bytes: &[u8]) {
        let Some(server) = self
            .servers
            .iter()
            .position(|s| s.ip() == from.ip() && s.port() == from.port())
        else {
            return;
        };
        let Ok(msg) = Message::from_vec(bytes) else {
            return;
        };
        let Some(&qi) = self.ids.get(&(server, msg.metadata.id)) else {
            return;
        };
        let q = &self.queries[qi];
        if q.outcome.is_some() || q.tcp || !is_answer_to(&msg, &q.qname, q.rtype) {
            return;
        }
        if msg.metadata.truncation {
            let q = &mut self.queries[qi];
            q.tcp = true;
            q.due = None;
            self.tcp_queue.push(TcpJob { query: qi, server });
            return;
        }
        self.apply(qi, server, &msg);
    }

    /// Record what a matching answer (UDP or TCP) says about its query.
    fn apply(&mut self, qi: usize, server: usize, msg: &Message) {
        let addr = self.servers[server];
        let more_tries = self.queries[qi].tries < self.total_tries;
        let q = &mut self.queries[qi];
        q.answered.insert(server);
        match msg.metadata.response_code {
            ResponseCode::NoError => {
                let (addrs, ttl) = addresses_in(&msg.answers, &q.qname, q.rtype);
                q.outcome = Some(Outcome::Answer { addrs, ttl });
                q.due = None;
            }
            ResponseCode::NXDomain => {
                q.outcome = Some(Outcome::Failed("NXDOMAIN".into()));
                q.due = None;
            }
            code => {
                // SERVFAIL, REFUSED, …: this server cannot help; try the next one now.
                q.note(format!("{} from {addr}", rcode_name(code)));
                // Out of tries: wait only for servers still silent (see `settled`).
                q.due = more_tries.then(Instant::now);
            }
        }
    }

    /// Hand queued TCP fallbacks to workers, a few at a time.
    fn start_tcp<'scope>(
        &mut self,
        scope: &'scope std::thread::Scope<'scope, '_>,
        tx: &mpsc::Sender<TcpDone>,
    ) {
        while self.tcp_running < MAX_TCP_WORKERS && !self.tcp_queue.is_empty() {
            let TcpJob { query, server } = self.tcp_queue.remove(0);
            let q = &self.queries[query];
            let (addr, qname, rtype, deadline) = (
                self.servers[server],
                q.qname.clone(),
                q.rtype,
                self.deadline,
            );
            let tx = tx.clone();
            let spawned = std::thread::Builder::new()
                .name("dns-tcp".into())
                .spawn_scoped(scope, move || {
                    let result = tcp_exchange(addr, &qname, rtype, deadline);
                    let _ = tx.send(TcpDone {
                        query,
                        server,
                        result,
                    });
                });
            match spawned {
                Ok(_) => self.tcp_running += 1,
                Err(e) => self.on_tcp(TcpDone {
                    query,
                    server,
                    result: Err(format!("cannot start a thread: {e}")),
                }),
            }
        }
    }

    /// Take a TCP fallback's result; a failed fallback moves the query on to its next try.
    fn on_tcp(&mut self, done: TcpDone) {
        let q = &mut self.queries[done.query];
        q.tcp = false;
        if q.outcome.is_some() {
            return;
        }
        match done.result {
            Ok(msg) => self.apply(done.query, done.server, &msg),
            Err(e) => {
                let addr = self.servers[done.server];
                q.answered.insert(done.server);
                q.note(format!(
                    "answer from {addr} was truncated and the TCP retry failed: {e}"
                ));
                q.due = (q.tries < self.total_tries).then(Instant::now);
            }
        }
    }

    /// The final outcome of a query: its answer, or the most useful explanation.
    fn outcome(&self, qi: usize) -> Outcome {
        let q = &self.queries[qi];
        if let Some(o) = &q.outcome {
            return o.clone();
        }
        let within = fmt_duration(self.timeout);
        let mut reasons = Vec::new();
        if q.tcp {
            reasons.push(format!(
                "answer was truncated and the TCP retry did not finish within {within}"
            ));
        }
        let silent: Vec<String> = q
            .asked
            .difference(&q.answered)
            .map(|&s| self.servers[s].to_string())
            .collect();
        if !silent.is_empty() {
            reasons.push(format!(
                "no answer from {} within {within}",
                silent.join(", ")
            ));
        }
        reasons.extend(q.errors.iter().cloned());
        if reasons.is_empty() {
            reasons.push(format!("no query could be sent within {within}"));
        }
        Outcome::Failed(reasons.join("; "))
    }

    /// Combine the A and AAAA outcomes of unique name `i` into its [`Resolution`].
    fn resolution(&self, i: usize, name: DomainName) -> Resolution {
        let v4 = self.outcome(2 * i);
        let v6 = self.outcome(2 * i + 1);
        let mut addrs: Vec<IpAddr> = Vec::new();
        let mut ttl: Option<u32> = None;
        let mut failures: Vec<(&str, String)> = Vec::new();
        for (label, outcome) in [("A", v4), ("AAAA", v6)] {
            match outcome {
                Outcome::Answer { addrs: a, ttl: t } => {
                    for ip in a {
                        if !addrs.contains(&ip) {
                            addrs.push(ip);
                        }
                    }
                    ttl = min_ttl(ttl, t);
                }
                Outcome::Failed(e) => failures.push((label, e)),
            }
        }
        let error = match failures.as_slice() {
            [] if addrs.is_empty() => Some("no A or AAAA records".to_string()),
            [] => None,
            [(_, a), (_, b)] if a == b => Some(a.clone()),
            list => Some(
                list.iter()
                    .map(|(label, e)| format!("{label}: {e}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
        };
        Resolution {
            name,
            addrs,
            ttl,
            error,
        }
    }
}

/// A random DNS ID not yet used towards `server` in this batch (random from hickory's CSPRNG,
/// so an off-path attacker cannot guess it).
fn fresh_id(ids: &HashMap<(usize, u16), usize>, server: usize) -> u16 {
    let mut id = Message::query().metadata.id;
    for _ in 0..64 {
        if !ids.contains_key(&(server, id)) {
            break;
        }
        id = Message::query().metadata.id;
    }
    id
}

/// A recursive query for one name and type, advertising our 4096-byte UDP buffer via EDNS.
pub(crate) fn query_message(id: u16, qname: &Name, rtype: RecordType) -> Message {
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(qname.clone(), rtype));
    let mut edns = Edns::new();
    edns.set_max_payload(MAX_UDP_ANSWER as u16);
    msg.set_edns(edns);
    msg
}

/// Whether `msg` is a standard response carrying exactly our question.
fn is_answer_to(msg: &Message, qname: &Name, rtype: RecordType) -> bool {
    msg.metadata.message_type == MessageType::Response
        && msg.metadata.op_code == OpCode::Query
        && msg.queries.len() == 1
        && msg.queries[0].name() == qname
        && msg.queries[0].query_type() == rtype
        && msg.queries[0].query_class() == DNSClass::IN
}

/// The addresses of type `rtype` owned by `qname` or by a name it reaches through CNAMEs in
/// `answers`, in answer order without repeats, with the smallest TTL of the records used.
/// Records about unrelated names are ignored: a server must not add addresses we did not ask.
fn addresses_in(answers: &[Record], qname: &Name, rtype: RecordType) -> (Vec<IpAddr>, Option<u32>) {
    let mut chain: Vec<&Name> = vec![qname];
    let mut ttl: Option<u32> = None;
    let mut grew = true;
    while grew && chain.len() <= MAX_CNAME_CHAIN {
        grew = false;
        for rec in answers {
            if rec.dns_class != DNSClass::IN || !chain.contains(&&rec.name) {
                continue;
            }
            if let RData::CNAME(target) = &rec.data {
                if !chain.contains(&&target.0) && chain.len() <= MAX_CNAME_CHAIN {
                    chain.push(&target.0);
                    ttl = min_ttl(ttl, Some(rec.ttl));
                    grew = true;
                }
            }
        }
    }
    let mut addrs = Vec::new();
    for rec in answers {
        if rec.dns_class != DNSClass::IN || !chain.contains(&&rec.name) {
            continue;
        }
        let ip = match (&rec.data, rtype) {
            (RData::A(a), RecordType::A) => IpAddr::V4(a.0),
            (RData::AAAA(a), RecordType::AAAA) => IpAddr::V6(a.0),
            _ => continue,
        };
        ttl = min_ttl(ttl, Some(rec.ttl));
        if !addrs.contains(&ip) {
            addrs.push(ip);
        }
    }
    if addrs.is_empty() {
        // CNAMEs that lead to no address are no reason to come back sooner.
        ttl = None;
    }
    (addrs, ttl)
}

fn min_ttl(a: Option<u32>, b: Option<u32>) -> Option<u32> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// The conventional short name of a response code, as `dig` prints it.
fn rcode_name(code: ResponseCode) -> String {
    match code {
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        other => format!("response code {} ({other})", u16::from(other)),
    }
}

/// `3s`, `1.5s` or `600ms`: how a deadline reads best in an error message.
fn fmt_duration(d: Duration) -> String {
    if d.as_secs() > 0 && d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else if d.as_secs() > 0 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Ask one question over TCP (2-byte length prefix), never past `deadline`.
fn tcp_exchange(
    server: SocketAddr,
    qname: &Name,
    rtype: RecordType,
    deadline: Instant,
) -> Result<Message, String> {
    let remaining = || {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err("deadline reached".to_string())
        } else {
            Ok(left)
        }
    };
    let id = Message::query().metadata.id;
    let packet = query_message(id, qname, rtype)
        .to_vec()
        .map_err(|e| format!("cannot encode the query: {e}"))?;
    let len = u16::try_from(packet.len()).map_err(|_| "query too long".to_string())?;
    let mut stream =
        TcpStream::connect_timeout(&server, remaining()?).map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(&packet);
    stream
        .set_write_timeout(Some(remaining()?))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(&framed)
        .map_err(|e| format!("send: {e}"))?;

    let mut read_exact = |buf: &mut [u8]| -> Result<(), String> {
        let mut filled = 0;
        while filled < buf.len() {
            stream
                .set_read_timeout(Some(remaining()?))
                .map_err(|e| e.to_string())?;
            match stream.read(&mut buf[filled..]) {
                Ok(0) => return Err("connection closed before the answer was complete".into()),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("receive: {e}")),
            }
        }
        Ok(())
    };
    // Answers that do not match are skipped, as over UDP; the deadline bounds the loop.
    loop {
        let mut len = [0u8; 2];
        read_exact(&mut len)?;
        // At most 65535 bytes by construction of the 2-byte length.
        let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
        read_exact(&mut body)?;
        if let Ok(msg) = Message::from_vec(&body) {
            if msg.metadata.id == id && is_answer_to(&msg, qname, rtype) {
                return Ok(msg);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! A fake DNS server on a random loopback port (UDP and TCP on the same port) answers
    //! from a canned zone built with hickory-proto; nothing here leaves 127.0.0.1 / ::1.

    use super::*;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;

    fn name(s: &str) -> Name {
        Name::from_ascii(format!("{s}.")).unwrap()
    }

    fn dn(s: &str) -> DomainName {
        s.parse().unwrap()
    }

    fn a(owner: &str, ttl: u32, ip: [u8; 4]) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A(Ipv4Addr::from(ip))))
    }

    fn aaaa(owner: &str, ttl: u32, ip: &str) -> Record {
        Record::from_rdata(name(owner), ttl, RData::AAAA(AAAA(ip.parse().unwrap())))
    }

    fn cname(owner: &str, ttl: u32, target: &str) -> Record {
        Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn reply(query: &Message, code: ResponseCode, answers: Vec<Record>) -> Message {
        let mut m = Message::response(query.metadata.id, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.metadata.recursion_available = true;
        m.metadata.response_code = code;
        m.add_queries(query.queries.clone());
        m.add_answers(answers);
        m
    }

    /// What the fake server sends back for one question.
    enum Packet {
        Msg(Message),
        /// Sent from a second socket (another port): right ID and question, wrong source.
        FromOtherPort(Message),
        Raw(Vec<u8>),
    }

    /// The canned zone. `seen` counts earlier queries for the same name and type.
    fn zone(query: &Message, tcp: bool, seen: usize) -> Vec<Packet> {
        use Packet::*;
        let Some(q) = query.queries.first() else {
            return vec![];
        };
        let qname = q
            .name()
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let is_a = q.query_type() == RecordType::A;
        let ok = |answers| vec![Msg(reply(query, ResponseCode::NoError, answers))];
        match qname.as_str() {
            "both.test" if is_a => ok(vec![
                a("both.test", 300, [192, 0, 2, 1]),
                a("both.test", 300, [192, 0, 2, 2]),
                a("both.test", 300, [192, 0, 2, 1]),
            ]),
            "both.test" => ok(vec![aaaa("both.test", 60, "2001:db8::1")]),
            // The address comes first, in another case, and an unrelated record sits between.
            "alias.test" if is_a => ok(vec![
                a("FINAL.test", 200, [192, 0, 2, 10]),
                cname("alias.test", 100, "mid.test"),
                a("other.test", 5, [203, 0, 113, 9]),
                cname("mid.test", 50, "final.test"),
            ]),
            "alias.test" => ok(vec![
                cname("alias.test", 100, "mid.test"),
                cname("mid.test", 50, "final.test"),
                aaaa("final.test", 200, "2001:db8::10"),
                aaaa("other.test", 5, "2001:db8::99"),
            ]),
            "loop.test" => ok(vec![
                cname("loop.test", 10, "loop2.test"),
                cname("loop2.test", 10, "loop.test"),
                a("other.test", 10, [203, 0, 113, 9]),
            ]),
            "missing.test" => vec![Msg(reply(query, ResponseCode::NXDomain, vec![]))],
            "servfail.test" => vec![Msg(reply(query, ResponseCode::ServFail, vec![]))],
            "nodata.test" => ok(vec![]),
            "silent.test" => vec![],
            "big.test" if is_a && !tcp => {
                let mut m = reply(query, ResponseCode::NoError, vec![]);
                m.metadata.truncation = true;
                vec![Msg(m)]
            }
            "big.test" if is_a => ok((0..40)
                .map(|i| a("big.test", 30, [192, 0, 2, 100 + i]))
                .collect()),
            "big.test" => ok(vec![aaaa("big.test", 30, "2001:db8::b16")]),
            "spoof.test" if is_a => {
                let bogus = |octet| vec![a("spoof.test", 300, [203, 0, 113, octet])];
                let mut wrong_id = reply(query, ResponseCode::NoError, bogus(66));
                wrong_id.metadata.id ^= 1;
                let mut wrong_name = Message::response(query.metadata.id, OpCode::Query);
                wrong_name.add_query(Query::query(name("spoof-other.test"), RecordType::A));
                wrong_name.add_answers(bogus(67));
                let mut wrong_type = Message::response(query.metadata.id, OpCode::Query);
                wrong_type.add_query(Query::query(name("spoof.test"), RecordType::AAAA));
                wrong_type.add_answers(bogus(69));
                let mut not_a_response = reply(query, ResponseCode::NoError, bogus(70));
                not_a_response.metadata.message_type = MessageType::Query;
                let mut two_questions = reply(query, ResponseCode::NoError, bogus(71));
                two_questions.add_query(q.clone());
                let mut header_only = query.metadata.id.to_be_bytes().to_vec();
                header_only.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0, 0xc0]);
                vec![
                    Msg(wrong_id),
                    Msg(wrong_name),
                    Msg(wrong_type),
                    Msg(not_a_response),
                    Msg(two_questions),
                    FromOtherPort(reply(query, ResponseCode::NoError, bogus(68))),
                    Raw(header_only),
                    Raw(vec![]),
                    Msg(reply(
                        query,
                        ResponseCode::NoError,
                        vec![a("spoof.test", 300, [192, 0, 2, 50])],
                    )),
                ]
            }
            "spoof.test" => ok(vec![]),
            "garbage.test" => {
                let mut junk: Vec<u8> = (0..300u32).map(|i| (i * 37 % 251) as u8).collect();
                junk[..2].copy_from_slice(&query.metadata.id.to_be_bytes());
                let mut out = vec![Raw(junk), Raw(vec![0xff; 4096]), Raw(vec![0xff; 9000])];
                if is_a {
                    out.extend(ok(vec![a("garbage.test", 300, [192, 0, 2, 60])]));
                } else {
                    out.extend(ok(vec![]));
                }
                out
            }
            "flaky.test" if seen == 0 => vec![],
            "flaky.test" if is_a => ok(vec![a("flaky.test", 300, [192, 0, 2, 70])]),
            "flaky.test" => ok(vec![]),
            other => match other
                .strip_suffix(".bulk.test")
                .and_then(|h| h.strip_prefix('h'))
            {
                Some(n) => {
                    let n: u16 = n.parse().unwrap();
                    let [hi, lo] = n.to_be_bytes();
                    if is_a {
                        ok(vec![a(other, 300, [198, 18, hi, lo])])
                    } else {
                        ok(vec![aaaa(other, 300, &format!("2001:db8::{n:x}"))])
                    }
                }
                None => vec![Msg(reply(query, ResponseCode::Refused, vec![]))],
            },
        }
    }

    /// A DNS server for the canned zone, listening on UDP and TCP on one loopback port.
    struct FakeServer {
        addr: SocketAddr,
        tcp_queries: Arc<AtomicUsize>,
        udp_queries: Arc<AtomicUsize>,
        stop: Arc<AtomicBool>,
        threads: Vec<JoinHandle<()>>,
    }

    impl FakeServer {
        /// `None` when the loopback address cannot be bound (e.g. no IPv6 here).
        fn start(ip: IpAddr) -> Option<FakeServer> {
            let (udp, tcp) = (0..50).find_map(|_| {
                let udp = UdpSocket::bind((ip, 0)).ok()?;
                let port = udp.local_addr().ok()?.port();
                let tcp = TcpListener::bind((ip, port)).ok()?;
                Some((udp, tcp))
            })?;
            let other = UdpSocket::bind((ip, 0)).ok()?;
            let addr = udp.local_addr().unwrap();
            udp.set_read_timeout(Some(Duration::from_millis(5)))
                .unwrap();
            tcp.set_nonblocking(true).unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let tcp_queries = Arc::new(AtomicUsize::new(0));
            let seen: Mutex<HashMap<(String, RecordType), usize>> = Mutex::new(HashMap::new());
            let count = move |m: &Message| -> usize {
                let Some(q) = m.queries.first() else { return 0 };
                let key = (q.name().to_ascii().to_ascii_lowercase(), q.query_type());
                let mut seen = seen.lock().unwrap();
                let n = seen.entry(key).or_insert(0);
                *n += 1;
                *n - 1
            };
            let udp_queries = Arc::new(AtomicUsize::new(0));
            let (stop2, tcp_count, udp_count) =
                (stop.clone(), tcp_queries.clone(), udp_queries.clone());
            // One thread only empties the UDP socket, so a burst of queries is not dropped
            // by the kernel while the other thread is busy answering.
            let (queue, incoming) = mpsc::channel::<(Vec<u8>, SocketAddr)>();
            let receiver = udp.try_clone().unwrap();
            let stop_rx = stop.clone();
            let rx_thread = std::thread::spawn(move || {
                let mut buf = vec![0u8; 65535];
                while !stop_rx.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = receiver.recv_from(&mut buf) {
                        udp_count.fetch_add(1, Ordering::Relaxed);
                        let _ = queue.send((buf[..n].to_vec(), from));
                    }
                }
            });
            let answer_thread = std::thread::spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    while let Ok((stream, _)) = tcp.accept() {
                        tcp_count.fetch_add(1, Ordering::Relaxed);
                        serve_tcp(stream, &count);
                    }
                    let Ok((bytes, from)) = incoming.recv_timeout(Duration::from_millis(5)) else {
                        continue;
                    };
                    let Ok(query) = Message::from_vec(&bytes) else {
                        continue;
                    };
                    let seen = count(&query);
                    for packet in zone(&query, false, seen) {
                        let _ = match packet {
                            Packet::Msg(m) => udp.send_to(&m.to_vec().unwrap(), from),
                            Packet::FromOtherPort(m) => other.send_to(&m.to_vec().unwrap(), from),
                            Packet::Raw(bytes) => udp.send_to(&bytes, from),
                        };
                    }
                }
            });
            Some(FakeServer {
                addr,
                tcp_queries,
                udp_queries,
                stop,
                threads: vec![rx_thread, answer_thread],
            })
        }
    }

    fn serve_tcp(mut stream: TcpStream, count: &dyn Fn(&Message) -> usize) {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut len = [0u8; 2];
        if stream.read_exact(&mut len).is_err() {
            return;
        }
        let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if stream.read_exact(&mut body).is_err() {
            return;
        }
        let Ok(query) = Message::from_vec(&body) else {
            return;
        };
        let seen = count(&query);
        for packet in zone(&query, true, seen) {
            if let Packet::Msg(m) = packet {
                let bytes = m.to_vec().unwrap();
                let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&bytes);
                let _ = stream.write_all(&framed);
            }
        }
    }

    impl Drop for FakeServer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }

    fn server() -> FakeServer {
        FakeServer::start(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("bind 127.0.0.1")
    }

    fn config(servers: &[SocketAddr], timeout_ms: u64, attempts: u32) -> ResolverConfig {
        ResolverConfig {
            servers: servers.to_vec(),
            timeout: Duration::from_millis(timeout_ms),
            attempts,
        }
    }

    fn resolve_one(cfg: &ResolverConfig, n: &str) -> Resolution {
        let mut r = resolve_all(cfg, &[dn(n)]).unwrap();
        assert_eq!(r.len(), 1);
        r.remove(0)
    }

    #[test]
    fn a_then_aaaa_deduplicated_with_smallest_ttl() {
        let srv = server();
        let r = resolve_one(&config(&[srv.addr], 3000, 2), "both.test");
        assert_eq!(r.name, dn("both.test"));
        assert_eq!(
            r.addrs,
            vec![ip("192.0.2.1"), ip("192.0.2.2"), ip("2001:db8::1")]
        );
        assert_eq!(r.ttl, Some(60));
        assert_eq!(r.error, None);
    }

    #[test]
    fn cname_chain_is_followed_and_unrelated_records_ignored() {
        let srv = server();
        let cfg = config(&[srv.addr], 3000, 2);
        let r = resolve_one(&cfg, "alias.test");
        assert_eq!(r.addrs, vec![ip("192.0.2.10"), ip("2001:db8::10")]);
        assert_eq!(
            r.ttl,
            Some(50),
            "CNAME TTLs count, the unrelated TTL 5 does not"
        );
        assert_eq!(r.error, None);

        let r = resolve_one(&cfg, "loop.test");
        assert!(r.addrs.is_empty());
        assert_eq!(r.error.as_deref(), Some("no A or AAAA records"));
    }

    #[test]
    fn nxdomain_servfail_and_nodata_are_per_name_errors() {
        let srv = server();
        let names = [
            dn("missing.test"),
            dn("servfail.test"),
            dn("nodata.test"),
            dn("both.test"),
        ];
        let start = Instant::now();
        let r = resolve_all(&config(&[srv.addr], 3000, 2), &names).unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "errors settle without waiting"
        );
        assert_eq!(r[0].error.as_deref(), Some("NXDOMAIN"));
        assert!(r[0].addrs.is_empty());
        assert_eq!(
            r[1].error.as_deref(),
            Some(format!("SERVFAIL from {}", srv.addr).as_str())
        );
        assert!(r[1].addrs.is_empty());
        assert_eq!(r[2].error.as_deref(), Some("no A or AAAA records"));
        assert_eq!(r[2].ttl, None);
        assert_eq!(r[3].addrs.len(), 3);
        assert_eq!(r[3].error, None);
    }

    #[test]
    fn silent_name_times_out_at_the_batch_deadline() {
        let srv = server();
        let start = Instant::now();
        let r = resolve_all(
            &config(&[srv.addr], 600, 2),
            &[dn("silent.test"), dn("both.test")],
        )
        .unwrap();
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(550),
            "gave up early: {took:?}"
        );
        assert!(
            took < Duration::from_millis(900),
            "overran the deadline: {took:?}"
        );
        assert!(r[0].addrs.is_empty());
        assert_eq!(
            r[0].error.as_deref(),
            Some(format!("no answer from {} within 600ms", srv.addr).as_str())
        );
        assert_eq!(r[1].addrs.len(), 3, "other names are unaffected");
    }

    #[test]
    fn truncated_udp_answer_is_redone_over_tcp() {
        let srv = server();
        let r = resolve_one(&config(&[srv.addr], 3000, 2), "big.test");
        assert_eq!(r.error, None);
        assert_eq!(r.addrs.len(), 41);
        assert_eq!(r.addrs[0], ip("192.0.2.100"));
        assert_eq!(r.addrs[39], ip("192.0.2.139"));
        assert_eq!(r.addrs[40], ip("2001:db8::b16"));
        assert_eq!(r.ttl, Some(30));
        assert!(srv.tcp_queries.load(Ordering::Relaxed) >= 1);
    }

    #[test]
    fn tcp_fallback_failure_is_reported_and_bounded() {
        // A server whose UDP answers are truncated but that has no TCP listener at all.
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(5)))
            .unwrap();
        let addr = udp.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    if let Ok(q) = Message::from_vec(&buf[..n]) {
                        let mut m = reply(&q, ResponseCode::NoError, vec![]);
                        m.metadata.truncation = true;
                        let _ = udp.send_to(&m.to_vec().unwrap(), from);
                    }
                }
            }
        });
        let start = Instant::now();
        let r = resolve_one(&config(&[addr], 1000, 2), "big.test");
        assert!(start.elapsed() < Duration::from_millis(1300));
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        assert!(r.addrs.is_empty());
        let error = r.error.unwrap();
        assert!(
            error.contains(&format!(
                "answer from {addr} was truncated and the TCP retry failed"
            )),
            "{error}"
        );
    }

    #[test]
    fn spoofed_and_mismatched_answers_are_ignored() {
        let srv = server();
        let r = resolve_one(&config(&[srv.addr], 3000, 2), "spoof.test");
        assert_eq!(r.addrs, vec![ip("192.0.2.50")]);
        assert_eq!(r.error, None);
    }

    #[test]
    fn garbage_packets_are_ignored() {
        let srv = server();
        let r = resolve_one(&config(&[srv.addr], 3000, 2), "garbage.test");
        assert_eq!(r.addrs, vec![ip("192.0.2.60")]);
        assert_eq!(r.error, None);
    }

    #[test]
    fn lost_query_is_retried_on_the_next_attempt() {
        let srv = server();
        let start = Instant::now();
        let r = resolve_one(&config(&[srv.addr], 2000, 2), "flaky.test");
        let took = start.elapsed();
        assert_eq!(r.addrs, vec![ip("192.0.2.70")]);
        assert_eq!(r.error, None);
        assert!(
            took >= Duration::from_millis(900),
            "retry came early: {took:?}"
        );
        assert!(took < Duration::from_millis(1800), "{took:?}");
    }

    #[test]
    fn silent_server_fails_over_to_the_next_one() {
        let srv = server();
        // Bound but never read: queries to it vanish without an ICMP error.
        let dead = UdpSocket::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap();
        let start = Instant::now();
        let r = resolve_one(&config(&[dead_addr, srv.addr], 2000, 1), "both.test");
        let took = start.elapsed();
        assert_eq!(r.addrs.len(), 3);
        assert_eq!(r.error, None);
        assert!(took >= Duration::from_millis(900), "{took:?}");
        assert!(took < Duration::from_millis(1800), "{took:?}");

        let r = resolve_one(&config(&[dead_addr, srv.addr], 600, 1), "silent.test");
        assert_eq!(
            r.error.as_deref(),
            Some(format!("no answer from {dead_addr}, {} within 600ms", srv.addr).as_str())
        );
        drop(dead);
    }

    #[test]
    fn errors_from_all_servers_are_reported_together() {
        let srv = server();
        let dead = UdpSocket::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap();
        let r = resolve_one(&config(&[dead_addr, srv.addr], 600, 1), "servfail.test");
        assert_eq!(
            r.error.as_deref(),
            Some(
                format!(
                    "no answer from {dead_addr} within 600ms; SERVFAIL from {}",
                    srv.addr
                )
                .as_str()
            )
        );
        drop(dead);
    }

    #[test]
    fn zero_timeout_returns_at_once() {
        let srv = server();
        let start = Instant::now();
        let r = resolve_one(&config(&[srv.addr], 0, 2), "both.test");
        assert!(start.elapsed() < Duration::from_millis(200));
        assert!(r.addrs.is_empty());
        assert_eq!(
            r.error.as_deref(),
            Some("no query could be sent within 0ms")
        );
    }

    #[test]
    fn two_hundred_names_resolve_in_one_quick_batch() {
        let srv = server();
        let names: Vec<DomainName> = (0..200).map(|i| dn(&format!("h{i}.bulk.test"))).collect();
        let start = Instant::now();
        let r = resolve_all(&config(&[srv.addr], 3000, 2), &names).unwrap();
        let took = start.elapsed();
        assert!(
            took < Duration::from_millis(1400),
            "no retry should be needed: {took:?}, server saw {} queries",
            srv.udp_queries.load(Ordering::Relaxed)
        );
        assert_eq!(r.len(), 200);
        for (i, res) in r.iter().enumerate() {
            let [hi, lo] = (i as u16).to_be_bytes();
            assert_eq!(res.name, names[i]);
            assert_eq!(res.error, None, "{}", res.name);
            assert_eq!(
                res.addrs,
                vec![
                    IpAddr::V4(Ipv4Addr::new(198, 18, hi, lo)),
                    ip(&format!("2001:db8::{i:x}"))
                ]
            );
        }
    }

    #[test]
    fn results_follow_input_order_including_duplicates() {
        let srv = server();
        let names = [dn("both.test"), dn("missing.test"), dn("both.test")];
        let r = resolve_all(&config(&[srv.addr], 3000, 2), &names).unwrap();
        let got: Vec<&DomainName> = r.iter().map(|r| &r.name).collect();
        assert_eq!(got, names.iter().collect::<Vec<_>>());
        assert_eq!(r[0], r[2]);
        assert_eq!(r[1].error.as_deref(), Some("NXDOMAIN"));
    }

    #[test]
    fn ipv6_loopback_server_works() {
        let Some(srv) = FakeServer::start(IpAddr::V6(Ipv6Addr::LOCALHOST)) else {
            eprintln!("no IPv6 loopback here; skipping");
            return;
        };
        let r = resolve_one(&config(&[srv.addr], 3000, 2), "alias.test");
        assert_eq!(r.addrs, vec![ip("192.0.2.10"), ip("2001:db8::10")]);
    }

    #[test]
    fn no_servers_is_an_error_that_says_what_to_do() {
        let err = resolve_all(&ResolverConfig::default(), &[dn("both.test")]).unwrap_err();
        assert!(matches!(err, DnsClientError::NoServers));
        let text = err.to_string();
        assert!(text.contains("upstream_dns") && text.contains("/etc/resolv.conf"));
        // Nothing to resolve needs no server.
        assert!(resolve_all(&ResolverConfig::default(), &[])
            .unwrap()
            .is_empty());
    }

    #[test]
    fn default_config_is_three_seconds_two_attempts() {
        let addr: SocketAddr = "127.0.0.1:53".parse().unwrap();
        let cfg = ResolverConfig::new(vec![addr]);
        assert_eq!(cfg.servers, vec![addr]);
        assert_eq!(cfg.timeout, Duration::from_secs(3));
        assert_eq!(cfg.attempts, 2);
    }

    #[test]
    fn query_is_recursive_with_edns_4096() {
        let msg = query_message(0x1234, &name("both.test"), RecordType::AAAA);
        let parsed = Message::from_vec(&msg.to_vec().unwrap()).unwrap();
        assert_eq!(parsed.metadata.id, 0x1234);
        assert!(parsed.metadata.recursion_desired);
        assert_eq!(parsed.metadata.message_type, MessageType::Query);
        assert_eq!(parsed.max_payload(), 4096);
        assert_eq!(
            parsed.queries,
            vec![Query::query(name("both.test"), RecordType::AAAA)]
        );
    }

    #[test]
    fn addresses_in_handles_loops_classes_and_long_chains() {
        let q = name("start.test");
        // CNAME loop: terminates, finds nothing.
        let looped = [
            cname("start.test", 5, "b.test"),
            cname("b.test", 5, "start.test"),
        ];
        assert_eq!(addresses_in(&looped, &q, RecordType::A), (vec![], None));
        // Records of another class do not count.
        let mut chaos = a("start.test", 5, [192, 0, 2, 1]);
        chaos.dns_class = DNSClass::CH;
        assert_eq!(addresses_in(&[chaos], &q, RecordType::A), (vec![], None));
        // An A record in an AAAA answer is not an AAAA address.
        let wrong = [a("start.test", 5, [192, 0, 2, 1])];
        assert_eq!(addresses_in(&wrong, &q, RecordType::AAAA), (vec![], None));
        // A chain longer than MAX_CNAME_CHAIN is cut off.
        let mut long: Vec<Record> = vec![cname("start.test", 9, "c0.test")];
        for i in 0..30 {
            long.push(cname(&format!("c{i}.test"), 9, &format!("c{}.test", i + 1)));
        }
        long.push(a("c30.test", 9, [192, 0, 2, 1]));
        assert_eq!(addresses_in(&long, &q, RecordType::A), (vec![], None));
        // A short one is followed, and matching ignores case.
        let short = [
            cname("START.test", 7, "c0.test"),
            a("C0.TEST", 9, [192, 0, 2, 1]),
        ];
        assert_eq!(
            addresses_in(&short, &q, RecordType::A),
            (vec![ip("192.0.2.1")], Some(7))
        );
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(fmt_duration(Duration::from_secs(3)), "3s");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(fmt_duration(Duration::from_millis(600)), "600ms");
    }

    #[test]
    fn resolv_conf_nameservers_in_order() {
        let text = "\
# generated by NetworkManager
search example.org
nameserver 192.0.2.53
nameserver 2001:db8::53
options edns0 trust-ad
";
        assert_eq!(
            servers_from_resolv_conf(text),
            vec![ip("192.0.2.53"), ip("2001:db8::53")]
        );
    }

    #[test]
    fn resolv_conf_strips_scope_and_comments() {
        let text = "\
nameserver fe80::1%eth0 # router
  nameserver\t198.51.100.1 ; trailing comment
; nameserver 198.51.100.2
#nameserver 198.51.100.3
nameserver 198.51.100.1
";
        assert_eq!(
            servers_from_resolv_conf(text),
            vec![ip("fe80::1"), ip("198.51.100.1")]
        );
    }

    #[test]
    fn resolv_conf_ignores_junk() {
        let text = "\
nameserver
nameserver not-an-address
nameserver 300.1.2.3
nameserver [2001:db8::1]
nameservers 192.0.2.1
NAMESERVER 192.0.2.2
domain nameserver
\u{0}\u{7f} garbage \u{fffd}
nameserver 192.0.2.9 extra words
";
        assert_eq!(servers_from_resolv_conf(text), vec![ip("192.0.2.9")]);
        assert!(servers_from_resolv_conf("").is_empty());
    }
}
