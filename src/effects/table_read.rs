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
//! So a reader holds the bundle's `.table-read.lock` exclusively for one listing, and the
//! resolver holds it shared around each insertion. The resolver waits at most
//! [`LEARN_WAIT`] for a reader (an answer is delayed by at most that, once a listing is under
//! way); after that it inserts anyway, since a reader that hangs must not stop name
//! resolution. A reader waits at most [`READ_WAIT`] and then lists without the lock (only
//! slower). Neither lock affects what is read or written: this is about liveness only.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{flock, FlockOperation};

/// The lock file in a container's bundle directory.
pub const TABLE_READ_LOCK: &str = ".table-read.lock";
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
    _file: Option<File>,
}

/// Keep the resolver's insertions out of `dir`'s table while the guard lives (see the
/// module docs). Never fails: without the lock the listing is only slower.
pub fn for_reading(dir: &Path) -> ReadGuard {
    let file = open(&dir.join(TABLE_READ_LOCK))
        .ok()
        .filter(|f| take(f, FlockOperation::NonBlockingLockExclusive, READ_WAIT));
    ReadGuard { _file: file }
}

/// The resolver's side: insertions wait for a listing under way.
#[derive(Debug)]
pub struct LearnGate {
    path: PathBuf,
    /// Opened on first use, one per worker thread (flock belongs to the open file, so each
    /// thread's shared lock is its own).
    file: Option<File>,
    wait: Duration,
}

impl LearnGate {
    pub fn new(dir: &Path) -> LearnGate {
        LearnGate {
            path: dir.join(TABLE_READ_LOCK),
            file: None,
            wait: LEARN_WAIT,
        }
    }

    /// Run `insert` with the shared lock held if it could be had within the wait.
    pub fn around<T>(&mut self, insert: impl FnOnce() -> T) -> T {
        if self.file.is_none() {
            self.file = open(&self.path).ok();
        }
        let locked = self
            .file
            .as_ref()
            .is_some_and(|f| take(f, FlockOperation::NonBlockingLockShared, self.wait));
        let out = insert();
        if locked {
            if let Some(f) = &self.file {
                let _ = flock(f, FlockOperation::Unlock);
            }
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
        // While an insertion holds the lock, a reader cannot take it.
        let mut c = LearnGate::new(&dir);
        let reader_got_it = c.around(|| {
            let f = open(&dir.join(TABLE_READ_LOCK)).unwrap();
            take(&f, FlockOperation::NonBlockingLockExclusive, Duration::ZERO)
        });
        assert!(!reader_got_it);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
