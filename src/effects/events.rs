//! The event writer of one container: refused packets (read from NFLOG) and refused DNS
//! questions (handed over by the builtin resolver), aggregated by
//! [`crate::core::events::Aggregator`] into the container's audit log.
//!
//! It runs inside the container's network namespace for the container's whole life: as a
//! thread of the builtin resolver or of the dnsmasq supervisor, or as the static tier's own
//! small process (`internal-events`). Nothing here can slow DNS answering: the resolver only
//! `try_send`s a refusal into a bounded queue (a full queue counts it as dropped), and the
//! flood work (receiving, decoding, counting) happens on this thread.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::audit::AuditRecord;
use crate::core::bundle::{Bundle, ContainerName};
use crate::core::dns_policy::RefuseReason;
use crate::core::events::{
    refuse_reason_code, Aggregator, DropReason, EventKey, Line, NameIndex, SeqTracker,
};
use crate::core::learned::LearnedRecord;
use crate::core::ruleset::NFLOG_GROUP;
use crate::core::target::DomainName;
use crate::effects::audit::{unix_millis, RotatingLog};
use crate::effects::learned_log::LEARNED_FILE;
use crate::effects::nflog::NflogSocket;
use crate::effects::state::{load_bundle, STATE_FILE};

/// Repeats of one key are summed into one line per this interval.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// Keys (destination + port + verdict, or refused name + type) tracked at once.
pub const MAX_KEYS: usize = 256;
/// Refused DNS questions queued from the resolver to this thread.
const DNS_QUEUE: usize = 1024;
/// Addresses whose name is remembered.
const MAX_NAMES: usize = 65_536;
/// How long the name of an answer that taught the firewall nothing is kept (dns.max_ttl's
/// default).
const NAMED_KEEP_SECS: u64 = 3600;
/// Most of learned.jsonl read per refresh (it is compacted past 1 MiB).
const LEARNED_READ_LIMIT: u64 = 8 << 20;
/// Longest wait for packets before looking at the DNS queue and the clock.
const POLL: Duration = Duration::from_millis(100);

/// Where and whether events are written.
#[derive(Debug, Clone)]
pub struct Settings {
    pub dir: PathBuf,
    pub name: ContainerName,
    pub enabled: bool,
    pub max_bytes: u64,
}

impl Settings {
    pub fn from_bundle(dir: &Path, bundle: &Bundle) -> Settings {
        Settings {
            dir: dir.to_path_buf(),
            name: bundle.name.clone(),
            enabled: bundle.audit_enabled,
            max_bytes: bundle.audit_max_bytes,
        }
    }
}

/// What the resolver hands to the event writer.
#[derive(Debug)]
enum FromResolver {
    /// A refused question, to be logged.
    Refused(EventKey),
    /// A name was answered with these addresses but nothing was learned (bypass modes):
    /// bypass events to them can still say which name led there.
    Named { name: String, addrs: Vec<IpAddr> },
}

/// The resolver's side of the DNS hand-off: never blocks.
#[derive(Debug, Clone)]
pub struct DnsEvents {
    tx: SyncSender<FromResolver>,
    dropped: Arc<AtomicU64>,
}

impl DnsEvents {
    /// A question the policy refused: queued for the writer, or counted if the queue is full.
    pub fn refused(
        &self,
        name: &DomainName,
        qtype: hickory_proto::rr::RecordType,
        why: &RefuseReason,
    ) {
        let key = EventKey::DnsRefused {
            name: name.as_str().to_string(),
            qtype: qtype.to_string(),
            reason: refuse_reason_code(why),
        };
        if self.tx.try_send(FromResolver::Refused(key)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A name answered with `addrs` that the resolver did not learn (learned addresses are
    /// named from learned.jsonl). Only a hint for the `name` field: a full queue drops it.
    pub fn answered_unlearned(&self, name: &DomainName, addrs: &[IpAddr]) {
        if addrs.is_empty() {
            return;
        }
        let _ = self.tx.try_send(FromResolver::Named {
            name: name.as_str().to_string(),
            addrs: addrs.to_vec(),
        });
    }
}

/// Reads NFLOG and the DNS queue, aggregates, writes.
pub struct EventReader {
    sock: NflogSocket,
    dns: Receiver<FromResolver>,
    dns_dropped: Arc<AtomicU64>,
    aggregator: Aggregator,
    seq: SeqTracker,
    writer: Writer,
    start: Instant,
}

impl EventReader {
    /// Bind the NFLOG group in the calling thread's network namespace (so call it there,
    /// before the container's workload starts); returns the reader and the resolver's
    /// hand-off.
    pub fn bind(settings: Settings) -> io::Result<(EventReader, DnsEvents)> {
        Ok(EventReader::with_socket(
            NflogSocket::bind(NFLOG_GROUP)?,
            settings,
        ))
    }

    /// The reader of a socket already bound to the group (by the hook, see `prebound`).
    pub fn with_socket(sock: NflogSocket, settings: Settings) -> (EventReader, DnsEvents) {
        let (tx, rx) = sync_channel(DNS_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let reader = EventReader {
            sock,
            dns: rx,
            dns_dropped: dropped.clone(),
            aggregator: Aggregator::new(INTERVAL.as_millis() as u64, MAX_KEYS),
            seq: SeqTracker::default(),
            writer: Writer::new(settings),
            start: Instant::now(),
        };
        (reader, DnsEvents { tx, dropped })
    }

    /// Run on a thread of its own for the rest of the process's life. Should reading ever
    /// fail for good, the whole process exits: its death is what `status` reports.
    pub fn spawn(self) -> io::Result<()> {
        std::thread::Builder::new()
            .name("events".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let err = self.run();
                eprintln!("terok-shield: the event reader failed: {err}; exiting");
                std::process::exit(1);
            })
            .map(|_| ())
    }

    /// Read and write events until reading fails.
    pub fn run(mut self) -> io::Error {
        loop {
            if let Err(e) = self.step(POLL) {
                return e;
            }
        }
    }

    /// One round: wait up to `wait` for packets, take queued DNS refusals, write what is due.
    pub fn step(&mut self, wait: Duration) -> io::Result<()> {
        let wait = match self.aggregator.next_flush() {
            Some(at) => wait.min(Duration::from_millis(at.saturating_sub(self.now_ms()))),
            None => wait,
        };
        let batch = self.sock.recv(wait)?;
        let mut lines = Vec::new();
        let now = self.now_ms();
        for (packet, seq) in batch.packets {
            if let Some(seq) = seq {
                let lost = self.seq.observe(seq);
                self.aggregator
                    .note_dropped(DropReason::KernelQueueFull, lost, now);
            }
            lines.extend(self.aggregator.observe(EventKey::Packet(packet), now));
        }
        // Bounded: at most one queue's worth per round, however fast the resolver refills it.
        for message in self.dns.try_iter().take(DNS_QUEUE) {
            match message {
                FromResolver::Refused(key) => lines.extend(self.aggregator.observe(key, now)),
                FromResolver::Named { name, addrs } => {
                    // Answers that taught the firewall nothing (their addresses were
                    // allowed already): named for as long as the longest allowance.
                    let until = crate::effects::audit::unix_secs() + NAMED_KEEP_SECS;
                    for addr in addrs {
                        self.writer.names.index.insert(addr, &name, until);
                    }
                }
            }
        }
        let lost = self.dns_dropped.swap(0, Ordering::Relaxed);
        self.aggregator
            .note_dropped(DropReason::QueueFull, lost, now);
        self.aggregator.flush(now, &mut lines);
        self.writer.write(&lines);
        Ok(())
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

/// Renders lines (with names) into the rotating audit log.
struct Writer {
    settings: Settings,
    log: RotatingLog,
    names: Names,
    buf: Vec<u8>,
}

impl Writer {
    fn new(settings: Settings) -> Writer {
        Writer {
            log: RotatingLog::new(&settings.dir, settings.max_bytes),
            names: Names::new(&settings.dir, &settings.name),
            settings,
            buf: Vec::new(),
        }
    }

    fn write(&mut self, lines: &[Line]) {
        if lines.is_empty() || !self.settings.enabled {
            return;
        }
        let millis = unix_millis();
        self.buf.clear();
        for line in lines {
            let name = match line {
                Line::Event {
                    key: EventKey::Packet(p),
                    ..
                } => self.names.lookup(p.dst),
                _ => None,
            };
            let (event, detail) = line.render(name.as_deref());
            let record = AuditRecord::new(millis, self.settings.name.as_str(), event, true, detail);
            self.buf.extend_from_slice(record.to_line().as_bytes());
        }
        if let Err(e) = self.log.append(&self.buf) {
            eprintln!("terok-shield: warning: events not written to the audit log: {e}");
        }
    }
}

/// A file's identity and size, to notice appends and replacements without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    size: u64,
    mtime: (i64, i64),
}

fn stamp(path: &Path) -> Option<Stamp> {
    let st = rustix::fs::stat(path).ok()?;
    Some(Stamp {
        ino: st.st_ino,
        size: st.st_size as u64,
        mtime: (st.st_mtime as i64, st.st_mtime_nsec as i64),
    })
}

/// Which name led to an address, from learned.jsonl (read incrementally as it grows) and
/// the static tier's cache in state.json (re-read when it changes). Only consulted for lines
/// being written, which the aggregator bounds.
struct Names {
    learned_path: PathBuf,
    state_path: PathBuf,
    dir: PathBuf,
    name: ContainerName,
    /// learned.jsonl's inode and how far it has been read.
    learned_at: Option<(u64, u64)>,
    state_stamp: Option<Stamp>,
    index: NameIndex,
}

impl Names {
    fn new(dir: &Path, name: &ContainerName) -> Names {
        Names {
            learned_path: dir.join(LEARNED_FILE),
            state_path: dir.join(STATE_FILE),
            dir: dir.to_path_buf(),
            name: name.clone(),
            learned_at: None,
            state_stamp: None,
            index: NameIndex::new(MAX_NAMES),
        }
    }

    fn lookup(&mut self, addr: IpAddr) -> Option<String> {
        if self.index.get(&addr).is_none() {
            self.refresh();
        }
        self.index.get(&addr).map(str::to_string)
    }

    fn refresh(&mut self) {
        let learned = stamp(&self.learned_path);
        let (ino, from) = match (learned, self.learned_at) {
            (Some(now), Some((ino, read))) if now.ino == ino && now.size >= read => (ino, read),
            (Some(now), _) => {
                // New or compacted file: start over (and take the static names again).
                self.index.clear();
                self.state_stamp = None;
                (now.ino, 0)
            }
            (None, _) => (0, 0),
        };
        if let Some(now) = learned.filter(|n| n.size > from) {
            let read = self.read_learned(from, now.size);
            self.learned_at = Some((ino, from + read));
        } else if learned.is_some() {
            self.learned_at = Some((ino, from));
        }
        let state = stamp(&self.state_path);
        if state.is_some() && state != self.state_stamp {
            if let Ok(bundle) = load_bundle(&self.dir, &self.name) {
                for (domain, resolved) in &bundle.resolved {
                    for addr in &resolved.addrs {
                        self.index.insert(*addr, domain.as_str(), u64::MAX);
                    }
                }
                self.state_stamp = state;
            }
        }
    }

    /// Index the whole lines of learned.jsonl between `from` and `to`; returns the bytes
    /// consumed (a line still being written is left for next time).
    fn read_learned(&mut self, from: u64, to: u64) -> u64 {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut file) = std::fs::File::open(&self.learned_path) else {
            return 0;
        };
        let want = (to - from).min(LEARNED_READ_LIMIT);
        let mut bytes = Vec::with_capacity(want as usize);
        if file.seek(SeekFrom::Start(from)).is_err()
            || file.take(want).read_to_end(&mut bytes).is_err()
        {
            return 0;
        }
        let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        for line in bytes[..whole].split(|b| *b == b'\n') {
            if let Ok(r) = serde_json::from_slice::<LearnedRecord>(line) {
                self.index.insert(r.addr, r.domain.as_str(), r.until);
            }
        }
        self.index.prune_expired(crate::effects::audit::unix_secs());
        whole as u64
    }
}
