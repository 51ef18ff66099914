//! Reading a container's table back while its resolver adds learned addresses.
//!
//! libnftables (and `nft`) list a table by dumping it, then compare the ruleset generation
//! with the one from before the dump, and start again whenever it changed (nftables'
//! `nft_cache_update`, with no limit). Every set-element insertion the builtin resolver
//! commits is a transaction that changes the generation, so under DNS load (hundreds of
//! answers a second) the listing of a table with large learned sets started over and over:
//! in the soak (scripts/soak.sh) live commands on DNS-hammered containers took 10-60 s, each
//! holding the bundle lock, and one ran into the 60 s limit.
//!
//! So a reader announces itself on the bundle's `.table-read.readers` lock (exclusive; it
//! also keeps readers one at a time), then holds `.table-read.lock` exclusively for one
//! listing. The resolver, before each insertion, waits while a reader is announced (taking
//! and at once dropping the readers lock shared), then holds `.table-read.lock` shared
//! around the insertion. The announcement is what keeps a reader from starving: insertions
//! of several resolver threads overlap, so a shared lock held for each of them is almost
//! never free, while the readers lock is held by an insertion for a microsecond.
//!
//! The resolver waits at most [`LEARN_WAIT`] for a reader (an answer is delayed by at most
//! that, once a listing is under way); after that it inserts anyway, since a reader that
//! hangs must not stop name resolution. A reader waits at most [`READ_WAIT`] and then lists
//! without the lock (only slower). Neither lock affects what is read or written: this is
//! about liveness only.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{flock, FlockOperation};

/// The lock files in a container's bundle directory.
pub const TABLE_READ_LOCK: &str = ".table-read.lock";
pub const READERS_LOCK: &str = ".table-read.readers";
/// Longest a resolver insertion waits for a listing to end.
pub const LEARN_WAIT: Duration = Duration::from_secs(2);
/// Longest a reader waits for the insertions under way (each takes microseconds).
pub const READ_WAIT: Duration = Duration::from_secs(5);

fn open(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
}

/// Take `op` (non-blocking) on `file`, retrying every millisecond for at most `wait`.
/// Whether it was taken.
fn take(file: &File, op: FlockOperation, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        match flock(file, op) {
            Ok(()) => return true,
            Err(rustix::io::Errno::WOULDBLOCK | rustix::io::Errno::INTR)
                if Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(_) => return false,
        }
    }
}

/// Held by a reader for one listing; released on drop.
#[derive(Debug)]
pub struct ReadGuard {
    _table: Option<File>,
    _readers: Option<File>,
}

impl Drop for ReadGuard {
    /// Unlocked explicitly: a process forked while the guard was held (the libnftables
    /// session worker, opened on the first listing) shares the open files, and closing
    /// ours would then not release the locks; unlocking does.
    fn drop(&mut self) {
        for file in [&self._table, &self._readers].into_iter().flatten() {
            let _ = flock(file, FlockOperation::Unlock);
        }
    }
}

/// Keep the resolver's insertions out of `dir`'s table while the guard lives (see the
/// module docs). Never fails: without the locks the listing is only slower.
pub fn for_reading(dir: &Path) -> ReadGuard {
    let exclusive = |name: &str| {
        open(&dir.join(name))
            .ok()
            .filter(|f| take(f, FlockOperation::NonBlockingLockExclusive, READ_WAIT))
    };
    let readers = exclusive(READERS_LOCK);
    let table = exclusive(TABLE_READ_LOCK);
    ReadGuard {
        _table: table,
        _readers: readers,
    }
}

/// The resolver's side: insertions wait for a listing under way.
#[derive(Debug)]
pub struct LearnGate {
    dir: PathBuf,
    /// Opened on first use, one pair per worker thread (flock belongs to the open file, so
    /// each thread's shared lock is its own).
    files: Option<(File, File)>,
    wait: Duration,
}

impl LearnGate {
    pub fn new(dir: &Path) -> LearnGate {
        LearnGate {
            dir: dir.to_path_buf(),
            files: None,
            wait: LEARN_WAIT,
        }
    }

    /// Run `insert` once no reader is announced and with the table lock held shared, if
    /// both could be had within the wait.
    pub fn around<T>(&mut self, insert: impl FnOnce() -> T) -> T {
        if self.files.is_none() {
            self.files = open(&self.dir.join(READERS_LOCK))
                .and_then(|r| Ok((r, open(&self.dir.join(TABLE_READ_LOCK))?)))
                .ok();
        }
        let deadline = Instant::now() + self.wait;
        let locked = self.files.as_ref().is_some_and(|(readers, table)| {
            if take(readers, FlockOperation::NonBlockingLockShared, self.wait) {
                let _ = flock(readers, FlockOperation::Unlock);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            take(table, FlockOperation::NonBlockingLockShared, left)
        });
        let out = insert();
        if let (true, Some((_, table))) = (locked, &self.files) {
            let _ = flock(table, FlockOperation::Unlock);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ts-tableread-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn an_insertion_waits_until_the_listing_under_way_has_ended() {
        let dir = temp_dir("order");
        let reading = for_reading(&dir);
        let listing_done = Arc::new(AtomicBool::new(false));
        let (d, done) = (dir.clone(), listing_done.clone());
        let resolver = std::thread::spawn(move || {
            let mut gate = LearnGate::new(&d);
            gate.wait = Duration::from_secs(600);
            gate.around(|| done.load(Ordering::SeqCst))
        });
        // The "listing" ends, then the reader lets go.
        listing_done.store(true, Ordering::SeqCst);
        drop(reading);
        assert!(
            resolver.join().unwrap(),
            "the insertion ran while the listing held the lock"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_reader_that_never_lets_go_does_not_stop_insertions() {
        let dir = temp_dir("stuck");
        let _stuck = for_reading(&dir);
        let d = dir.clone();
        let inserted = std::thread::spawn(move || {
            let mut gate = LearnGate::new(&d);
            gate.wait = Duration::from_millis(5);
            gate.around(|| true)
        })
        .join()
        .unwrap();
        assert!(inserted);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn insertions_share_the_lock_and_a_reader_waits_for_them() {
        let dir = temp_dir("shared");
        let mut a = LearnGate::new(&dir);
        let mut b = LearnGate::new(&dir);
        // Two workers insert at once (nested: b inside a) without waiting on each other.
        let both = a.around(|| b.around(|| true));
        assert!(both);
        // While an insertion holds the table lock, a reader cannot take it; the readers
        // lock it leaves free, so a reader can announce itself.
        let mut c = LearnGate::new(&dir);
        let (announced, table_taken) = c.around(|| {
            let r = open(&dir.join(READERS_LOCK)).unwrap();
            let t = open(&dir.join(TABLE_READ_LOCK)).unwrap();
            (
                take(&r, FlockOperation::NonBlockingLockExclusive, Duration::ZERO),
                take(&t, FlockOperation::NonBlockingLockExclusive, Duration::ZERO),
            )
        });
        assert!(announced && !table_taken);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Found by the soak: the libnftables session worker, forked on the first listing while
    /// the guard was held, kept the locks (shared open files) for the whole command, and the
    /// command's own connection-revoking helper then waited for them.
    #[test]
    fn a_child_forked_while_reading_does_not_keep_the_lock() {
        let dir = temp_dir("fork");
        let reading = for_reading(&dir);
        // What a process forked now would hold: the same open file descriptions.
        let inherited = {
            let t = reading._table.as_ref().unwrap().try_clone().unwrap();
            let r = reading._readers.as_ref().unwrap().try_clone().unwrap();
            (t, r)
        };
        drop(reading);
        let t = open(&dir.join(TABLE_READ_LOCK)).unwrap();
        let r = open(&dir.join(READERS_LOCK)).unwrap();
        assert!(take(
            &r,
            FlockOperation::NonBlockingLockExclusive,
            Duration::ZERO
        ));
        assert!(take(
            &t,
            FlockOperation::NonBlockingLockExclusive,
            Duration::ZERO
        ));
        drop(inherited);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The starvation the soak showed with a single lock: insertions that overlap hold the
    /// table lock shared without a break, and a reader trying for it exclusively never got
    /// it. Once a reader is announced, a new insertion waits for it.
    #[test]
    fn an_announced_reader_keeps_new_insertions_waiting() {
        let dir = temp_dir("announce");
        // An insertion under way holds the table lock...
        let table = open(&dir.join(TABLE_READ_LOCK)).unwrap();
        assert!(take(
            &table,
            FlockOperation::NonBlockingLockShared,
            Duration::ZERO
        ));
        // ...a reader announces itself and waits for the table...
        let readers = open(&dir.join(READERS_LOCK)).unwrap();
        assert!(take(
            &readers,
            FlockOperation::NonBlockingLockExclusive,
            Duration::ZERO
        ));
        let reader_listed = Arc::new(AtomicBool::new(false));
        let (d, listed) = (dir.clone(), reader_listed.clone());
        // ...and a new insertion arrives: it must not start before the reader has listed.
        let resolver = std::thread::spawn(move || {
            let mut gate = LearnGate::new(&d);
            gate.wait = Duration::from_secs(600);
            gate.around(|| listed.load(Ordering::SeqCst))
        });
        // The insertion under way ends; the reader takes the table, lists, lets go.
        drop(table);
        let t = open(&dir.join(TABLE_READ_LOCK)).unwrap();
        assert!(take(
            &t,
            FlockOperation::NonBlockingLockExclusive,
            Duration::from_secs(600)
        ));
        reader_listed.store(true, Ordering::SeqCst);
        drop(t);
        drop(readers);
        assert!(resolver.join().unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
