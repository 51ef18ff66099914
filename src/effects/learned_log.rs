//! `learned.jsonl`: which name brought which DNS-learned set element, so `deny NAME` removes
//! exactly those. Written by the builtin resolver or by the dnsmasq supervisor, read by the
//! revoke helper. Records are [`LearnedRecord`]s, one JSON object per line.

use std::io::{self, Write};
use std::path::PathBuf;

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
}

/// Below this, learned.jsonl is never compacted.
const LEARNED_COMPACT_MIN: u64 = 1 << 20;

impl LearnedLog {
    /// A log at `path`, opened (and created) on the first append.
    pub fn new(path: PathBuf) -> LearnedLog {
        LearnedLog {
            path,
            file: None,
            len: 0,
            compact_at: LEARNED_COMPACT_MIN,
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

    /// Append whole JSON lines in one write; compacts first when the file has grown enough.
    pub fn append(&mut self, lines: &[u8], now: u64) {
        if self.len + lines.len() as u64 > self.compact_at {
            self.compact(now);
        }
        let Ok(file) = self.open() else { return };
        // One write: O_APPEND keeps the lines whole even next to another writer.
        match file.write_all(lines) {
            Ok(()) => self.len += lines.len() as u64,
            Err(_) => self.file = None, // reopen next time
        }
    }

    /// Rewrite the file with its live records. Amortised: the next compaction waits until
    /// the file has doubled, so a file full of live records is not rewritten per answer.
    fn compact(&mut self, now: u64) {
        if let Ok(kept) = rewrite_live(&self.path, now) {
            self.file = None; // the old inode is gone: reopen the new file
            self.len = kept;
        }
        // Unreadable (e.g. larger than the state-file bound): keep appending, never drop
        // records a `deny` may need.
        self.compact_at = (self.len.max(LEARNED_COMPACT_MIN / 2)).saturating_mul(2);
        // SAFETY: malloc_trim only returns free heap memory to the kernel.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Copy the live records of `path` to a temporary file, line by line, and rename it over
/// `path`; returns the new size. Memory stays a line's worth whatever the file's size (read
/// and rebuilt whole, a DNS-flooded resolver's 4 MB file cost twice that at each compaction).
fn rewrite_live(path: &std::path::Path, now: u64) -> io::Result<u64> {
    use std::io::{BufRead, BufReader, BufWriter, Read};
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let result = (|| {
        let input =
            BufReader::new(std::fs::File::open(path)?.take(crate::effects::state::MAX_STATE_FILE));
        let mut out = BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)?,
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
        std::fs::rename(&tmp, path)?;
        Ok(kept)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
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
        assert_eq!(rewrite_live(&path, 100).unwrap(), live.len() as u64);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), live);
        let mut log = LearnedLog::new(path.clone());
        log.len = live.len() as u64;
        log.compact_at = 1; // the next append compacts first
        log.append(record(1, 900).as_bytes(), 600);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), record(1, 900));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
