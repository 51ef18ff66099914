//! `learned.jsonl`: which name brought which DNS-learned set element, so `deny NAME` removes
//! exactly those. Written by the builtin resolver or by the dnsmasq supervisor, read by the
//! revoke helper. Records are [`LearnedRecord`]s, one JSON object per line.

use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::mpsc;

use crate::core::learned::LearnedRecord;

/// `learned.jsonl`, kept open for appending. One writer per container: the builtin resolver
/// or the dnsmasq supervisor.
pub struct LearnedLog {
    path: PathBuf,
    file: Option<std::fs::File>,
    /// Bytes in the file (as far as this process knows).
    len: u64,
    /// Compact when the file grows past this.
    compact_at: u64,
    /// The thread that compacts: rewriting a file of megabytes takes tens of milliseconds,
    /// which the resolver's clients must not wait for. `None` if no thread could be started
    /// (then compaction runs inline, as a last resort).
    compactor: Option<Compactor>,
    /// The compaction under way: the snapshot's length and the file it is copied to.
    pending: Option<(u64, PathBuf)>,
}

/// A thread copying the live records of a file's first bytes to a temporary file, one job at a
/// time. Started with the log (before the resolver sheds its start-up memory) rather than per
/// compaction: starting a thread later pulls ~400 KiB of libc and loader code into the
/// resolver's resident memory.
struct Compactor {
    jobs: mpsc::Sender<Job>,
    done: mpsc::Receiver<io::Result<u64>>,
}

/// Copy the live records among the first `prefix` bytes of `path` to `tmp`, as of `now`.
struct Job {
    path: PathBuf,
    tmp: PathBuf,
    prefix: u64,
    now: u64,
}

impl Compactor {
    fn start() -> Option<Compactor> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (outbox, done) = mpsc::channel();
        std::thread::Builder::new()
            .name("learned-compact".into())
            // A line at a time (serde_json nests at most 128 levels deep): a small stack.
            .stack_size(256 * 1024)
            .spawn(move || {
                // Lowest priority: the resolver's event loop shares the CPU and always wins.
                // SAFETY: setpriority on this thread's own id only changes its nice value.
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19);
                }
                for job in inbox {
                    let kept = rewrite_live(&job.path, &job.tmp, job.prefix, job.now);
                    if outbox.send(kept).is_err() {
                        break;
                    }
                }
            })
            .ok()?;
        Some(Compactor { jobs, done })
    }
}

/// Below this, learned.jsonl is never compacted.
const LEARNED_COMPACT_MIN: u64 = 1 << 20;

impl LearnedLog {
    /// A log at `path`, opened (and created) on the first append; its compaction thread starts
    /// now.
    pub fn new(path: PathBuf) -> LearnedLog {
        LearnedLog {
            path,
            file: None,
            len: 0,
            compact_at: LEARNED_COMPACT_MIN,
            compactor: Compactor::start(),
            pending: None,
        }
    }

    fn open(&mut self) -> io::Result<&mut std::fs::File> {
        if self.file.is_none() {
            use std::os::unix::fs::OpenOptionsExt;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&self.path)?;
            self.len = file.metadata()?.len();
            self.file = Some(file);
        }
        Ok(self.file.as_mut().expect("opened above"))
    }

    /// Append whole JSON lines in one write. Once the file has grown enough, the compaction
    /// thread rewrites what is there while appends go on (see `finish_compaction`).
    pub fn append(&mut self, lines: &[u8], now: u64) {
        self.finish_compaction(false);
        let Ok(file) = self.open() else { return };
        // One write: O_APPEND keeps the lines whole even next to another writer.
        match file.write_all(lines) {
            Ok(()) => self.len += lines.len() as u64,
            Err(_) => self.file = None, // reopen next time
        }
        if self.len > self.compact_at && self.pending.is_none() {
            self.start_compaction(now);
        }
    }

    /// Have the live records of the file as it is now copied to a temporary file.
    fn start_compaction(&mut self, now: u64) {
        let job = Job {
            path: self.path.clone(),
            tmp: temporary(&self.path),
            prefix: self.len,
            now,
        };
        self.pending = Some((job.prefix, job.tmp.clone()));
        let job = match &self.compactor {
            Some(c) => match c.jobs.send(job) {
                Ok(()) => return,
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        // No thread: compact inline.
        self.compactor = None;
        let kept = rewrite_live(&job.path, &job.tmp, job.prefix, job.now);
        self.conclude(kept);
    }

    /// Complete a compaction whose copy is done (or wait for it: `wait`).
    fn finish_compaction(&mut self, wait: bool) {
        if self.pending.is_none() {
            return;
        }
        let Some(c) = &self.compactor else { return };
        let kept = if wait {
            c.done.recv().map_err(|_| ())
        } else {
            match c.done.try_recv() {
                Err(mpsc::TryRecvError::Empty) => return,
                other => other.map_err(|_| ()),
            }
        };
        let kept = kept.unwrap_or_else(|()| {
            self.compactor = None; // the thread is gone: compact inline from now on
            Err(io::Error::other("the compaction thread stopped"))
        });
        self.conclude(kept);
    }

    /// Append to the copy what was written after its snapshot, rename it over the file and
    /// reopen it. Amortised: the next compaction waits until the file has doubled, so a file
    /// full of live records is not rewritten per answer.
    fn conclude(&mut self, kept: io::Result<u64>) {
        let Some((prefix, tmp)) = self.pending.take() else {
            return;
        };
        match kept.and_then(|kept| Ok(kept + append_tail(&self.path, &tmp, prefix)?)) {
            Ok(kept) => {
                self.file = None; // the old inode is gone: reopen the new file
                self.len = kept;
            }
            // Unreadable (e.g. larger than the state-file bound), or emptied meanwhile by
            // `reset`: keep the file as it is, never drop records a `deny` may need.
            Err(_) => {
                let _ = std::fs::remove_file(&tmp);
            }
        }
        self.compact_at = (self.len.max(LEARNED_COMPACT_MIN / 2)).saturating_mul(2);
        // SAFETY: malloc_trim only returns free heap memory to the kernel.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Where a compaction of `path` by this process writes.
fn temporary(path: &std::path::Path) -> PathBuf {
    path.with_extension(format!("tmp.{}", std::process::id()))
}

/// Append to `tmp` what `path` gained after its first `prefix` bytes, then rename `tmp` over
/// `path`; returns the bytes appended. A file now shorter than `prefix` was emptied by
/// `reset` meanwhile: renaming the copy over it would bring back what reset took out.
fn append_tail(path: &std::path::Path, tmp: &std::path::Path, prefix: u64) -> io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut old = std::fs::File::open(path)?;
    let end = old.metadata()?.len();
    if end < prefix {
        return Err(io::Error::other(
            "learned.jsonl was emptied during compaction",
        ));
    }
    old.seek(SeekFrom::Start(prefix))?;
    let mut out = std::fs::OpenOptions::new().append(true).open(tmp)?;
    let copied = io::copy(&mut old.take(end - prefix), &mut out)?;
    std::fs::rename(tmp, path)?;
    Ok(copied)
}

/// Copy the live records among the first `prefix` bytes of `path` to `tmp`, line by line;
/// returns the bytes kept. Memory stays a line's worth whatever the file's size (read and
/// rebuilt whole, a DNS-flooded resolver's 4 MB file cost twice that at each compaction).
fn rewrite_live(
    path: &std::path::Path,
    tmp: &std::path::Path,
    prefix: u64,
    now: u64,
) -> io::Result<u64> {
    use std::io::{BufRead, BufReader, BufWriter, Read};
    use std::os::unix::fs::OpenOptionsExt;
    let result = (|| {
        if prefix > crate::effects::state::MAX_STATE_FILE {
            return Err(io::Error::other("learned.jsonl is too large to compact"));
        }
        let input = BufReader::new(std::fs::File::open(path)?.take(prefix));
        let mut out = BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(tmp)?,
        );
        let mut kept = 0u64;
        for line in input.split(b'\n') {
            let line = line?;
            let live = serde_json::from_slice::<LearnedRecord>(&line).is_ok_and(|r| r.until > now);
            if live {
                out.write_all(&line)?;
                out.write_all(b"\n")?;
                kept += line.len() as u64 + 1;
            }
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(kept)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// Attribution file of the resolver tiers: which name brought which learned element.
pub const LEARNED_FILE: &str = "learned.jsonl";

/// Every well-formed record of a `learned.jsonl` (bounded read; bad lines skipped).
pub fn read_learned(path: &std::path::Path) -> Vec<LearnedRecord> {
    crate::effects::state::read_bounded(path)
        .map(|b| {
            String::from_utf8_lossy(&b)
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Empty `learned.jsonl` in place (`reset`) and return what it held, so a failed reset can
/// put it back ([`restore_learned`]). Truncated rather than replaced: the resolver (or the
/// dnsmasq supervisor) keeps the file open for appending and must go on writing to it.
/// A missing file holds nothing.
pub fn take_learned(path: &std::path::Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        other => other?,
    };
    let limit = crate::effects::state::MAX_STATE_FILE;
    let mut held = Vec::new();
    (&mut file).take(limit + 1).read_to_end(&mut held)?;
    if held.len() as u64 > limit {
        return Err(io::Error::other(format!(
            "it is larger than {limit} bytes, too large to keep for an undo"
        )));
    }
    file.set_len(0)?;
    Ok(held)
}

/// Append records taken by [`take_learned`] back (one write; newer records stay too).
pub fn restore_learned(path: &std::path::Path, records: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if records.is_empty() {
        return Ok(());
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?
        .write_all(records)
}

/// Inside a container's namespaces: remove the DNS-learned elements that only a now-denied
/// name brought (the builtin resolver, or dnsmasq's supervisor, recorded who brought what),
/// of those still `present` in the live table (records of elements already gone, expired
/// or forgotten by an earlier command, would each fail a transaction); returns their
/// addresses.
pub fn forget_unjustified(
    bundle_dir: &std::path::Path,
    bundle: &crate::core::bundle::Bundle,
    present: &[crate::core::verify::Learned],
) -> anyhow::Result<std::collections::HashSet<std::net::IpAddr>> {
    use crate::effects::learned_log::{read_learned, LEARNED_FILE};
    use crate::effects::resolver::keys_for;
    let records = read_learned(&bundle_dir.join(LEARNED_FILE));
    let now = crate::effects::audit::unix_secs();
    let policy = crate::core::dns_policy::DnsPolicy::from_bundle(bundle);
    let doomed = if bundle.dns_tier == crate::core::bundle::DnsTier::Dnsmasq {
        crate::core::learned::unjustified_by(&records, now, |d| {
            crate::core::dnsmasq::forwards(&policy, d)
        })
    } else {
        crate::core::learned::unjustified(&records, &policy, now)
    };
    let present: std::collections::HashSet<std::net::IpAddr> =
        present.iter().map(|(addr, _)| *addr).collect();
    let doomed: Vec<_> = doomed
        .into_iter()
        .filter(|r| present.contains(&r.addr))
        .collect();
    let forgotten = doomed.iter().map(|r| r.addr).collect();
    if doomed.is_empty() {
        return Ok(forgotten);
    }
    // Per set, in chunks: one transaction per element cost a kernel RCU grace period each,
    // minutes for the ~20,000 elements a DNS-hammered container's `block` doomed (soak).
    let mut per_set: std::collections::BTreeMap<&str, Vec<_>> = Default::default();
    for r in &doomed {
        let Some(scope) = r.port_scope() else {
            continue;
        };
        let set = crate::core::dns_policy::set_for(r.addr, scope);
        per_set
            .entry(set)
            .or_default()
            .extend(keys_for(r.addr, scope));
    }
    let mut sock = crate::effects::nfnetlink::NfSock::open()?;
    for (set, keys) in per_set {
        for chunk in keys.chunks(1024) {
            match sock.delete_elements(set, chunk) {
                // Some element expired meanwhile (the chunk was refused whole): one by one.
                Err(e) if e.raw_os_error() == Some(2) => {
                    for key in chunk {
                        match sock.delete_elements(set, std::slice::from_ref(key)) {
                            Err(e) if e.raw_os_error() == Some(2) => {}
                            other => other?,
                        }
                    }
                }
                other => other?,
            }
        }
    }
    Ok(forgotten)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_empties_in_place_and_restore_appends_back() {
        let dir = std::env::temp_dir().join(format!("terok-learned-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(LEARNED_FILE);
        let _ = std::fs::remove_file(&path);
        assert_eq!(
            take_learned(&path).unwrap(),
            b"",
            "a missing file holds nothing"
        );
        let mut log = LearnedLog::new(path.clone());
        log.append(b"{\"old\":1}\n", 0);
        let inode = |p: &std::path::Path| {
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap())
        };
        let before = inode(&path);
        assert_eq!(take_learned(&path).unwrap(), b"{\"old\":1}\n");
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        assert_eq!(
            inode(&path),
            before,
            "the same file, so its writer keeps appending to it"
        );
        // The writer's next record lands in the emptied file.
        log.append(b"{\"new\":2}\n", 0);
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"new\":2}\n");
        restore_learned(&path, b"{\"old\":1}\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"new\":2}\n{\"old\":1}\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Compaction streams the file (the soak's DNS-flooded resolvers had 4 MB files, read
    /// and rebuilt whole): live records stay, byte for byte and in order, expired ones and
    /// broken lines go, and the writer appends to the new file.
    #[test]
    fn compaction_keeps_exactly_the_live_records_in_order() {
        let dir =
            std::env::temp_dir().join(format!("terok-learned-compact-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(LEARNED_FILE);
        let record = |i: u32, until: u64| {
            format!(
                "{{\"domain\":\"t{i}.example.com\",\"addr\":\"198.51.100.{}\",\"until\":{until}}}\n",
                i % 250
            )
        };
        let mut all = String::new();
        let mut live = String::new();
        for i in 0..20_000u32 {
            let line = record(i, if i % 3 == 0 { 50 } else { 500 });
            if i % 3 != 0 {
                live.push_str(&line);
            }
            all.push_str(&line);
            if i == 7 {
                all.push_str("not json\n");
            }
        }
        std::fs::write(&path, &all).unwrap();
        let tmp = temporary(&path);
        let everything = all.len() as u64;
        assert_eq!(
            rewrite_live(&path, &tmp, everything, 100).unwrap(),
            live.len() as u64
        );
        assert_eq!(std::fs::read_to_string(&tmp).unwrap(), live);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            all,
            "the file itself is untouched"
        );
        std::fs::remove_file(&tmp).unwrap();

        // Through the writer: the append that crosses the threshold starts the compaction,
        // appends go on meanwhile, and the result holds the live records, then all of those.
        std::fs::remove_file(&path).unwrap();
        let mut log = LearnedLog::new(path.clone());
        log.append(record(1, 500).as_bytes(), 100);
        log.compact_at = 1; // crossed by the next append
        log.append(record(2, 900).as_bytes(), 600);
        assert!(log.pending.is_some(), "a thread compacts");
        log.append(record(3, 900).as_bytes(), 600);
        log.finish_compaction(true);
        assert!(log.pending.is_none());
        log.append(record(4, 900).as_bytes(), 600);
        let expected = [record(2, 900), record(3, 900), record(4, 900)].concat();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), expected);
        assert_eq!(log.len, expected.len() as u64);
        assert!(!tmp.exists(), "renamed over the file");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `reset` empties the file in place while a compaction copies it: renaming the copy over
    /// the file would bring back the records reset took out, so the compaction is dropped.
    #[test]
    fn a_compaction_of_a_file_emptied_meanwhile_is_dropped() {
        let dir = std::env::temp_dir().join(format!("terok-learned-reset-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(LEARNED_FILE);
        let _ = std::fs::remove_file(&path);
        let mut log = LearnedLog::new(path.clone());
        log.append(
            b"{\"domain\":\"old.example.com\",\"addr\":\"198.51.100.1\",\"until\":900}\n",
            100,
        );
        log.compact_at = 1;
        log.append(
            b"{\"domain\":\"old.example.com\",\"addr\":\"198.51.100.2\",\"until\":900}\n",
            100,
        );
        assert!(log.pending.is_some());
        take_learned(&path).unwrap();
        log.append(b"{\"new\":1}\n", 100);
        log.finish_compaction(true);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"new\":1}\n");
        assert!(!temporary(&path).exists(), "the copy is removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
