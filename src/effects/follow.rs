//! Following audit logs as they grow (`watch`, `logs -f`, `clearance`), and ending cleanly
//! on Ctrl-C or SIGTERM.
//!
//! [`LogFollower`] keeps every followed `audit.jsonl` open and reads what was appended. When
//! the event writer rotates it (renames it to `audit.jsonl.1` and starts a new one), the old
//! file is read to its end through the descriptor already open, then the new one from its
//! start; a generation that came and went between two looks (two rotations) is read from
//! `audit.jsonl.1`. Containers whose directory appears later are followed from their first
//! line.
//!
//! Waiting is [`LogFollower::wait`]: one `poll(2)` over an inotify descriptor (the containers
//! directory and each container's directory), a signalfd for SIGINT, SIGTERM and SIGHUP,
//! and optionally the caller's input. The timeout bounds every wait, so a missed inotify
//! event (or no inotify at all) costs at most one tick, never a busy loop.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::fs::inotify;

use super::audit::ROTATED_AUDIT_FILE;
use super::state::AUDIT_FILE;
use crate::core::audit::AuditRecord;
use crate::core::bundle::ContainerName;

/// A line longer than this without a newline is not an audit record; it is dropped.
const MAX_LINE: usize = 1 << 20;

/// The signals that end a follow: Ctrl-C, `kill`, and a closed terminal.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// SIGINT, SIGTERM and SIGHUP delivered as readable data instead of killing the process,
/// so the caller can finish its output and say goodbye.
///
/// The signals are blocked for the calling thread (create this before starting threads);
/// processes started afterwards by `std::process::Command` get an empty signal mask again.
#[derive(Debug)]
pub struct StopSignals {
    fd: OwnedFd,
}

impl StopSignals {
    pub fn install() -> io::Result<StopSignals> {
        // SAFETY: plain libc calls on a sigset_t we own; the fd returned is ours to close.
        unsafe {
            let mut set = MaybeUninit::<libc::sigset_t>::zeroed();
            libc::sigemptyset(set.as_mut_ptr());
            for signal in STOP_SIGNALS {
                libc::sigaddset(set.as_mut_ptr(), signal);
            }
            let set = set.assume_init();
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(StopSignals {
                fd: OwnedFd::from_raw_fd(fd),
            })
        }
    }

    /// Whether a stop signal is pending (consumes it).
    fn take(&self) -> bool {
        let mut info = MaybeUninit::<libc::signalfd_siginfo>::zeroed();
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into a buffer of that size.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), info.as_mut_ptr().cast(), size) };
        n == size as isize
    }
}

/// What ended a [`LogFollower::wait`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wakeup {
    /// A stop signal arrived: end now.
    pub stop: bool,
    /// The caller's input is readable (or closed).
    pub input: bool,
}

/// One open generation of a container's `audit.jsonl`.
#[derive(Debug)]
struct OpenLog {
    file: File,
    inode: (u64, u64),
    /// Bytes read so far.
    offset: u64,
    /// The start of a line whose end has not been written yet.
    partial: Vec<u8>,
}

/// One followed container.
#[derive(Debug)]
struct ContainerLog {
    dir: PathBuf,
    open: Option<OpenLog>,
    /// Whether the logs were looked at before.
    started: bool,
    /// The first look skips what the logs hold already (`watch`), instead of reading it.
    skip_existing: bool,
    /// audit.jsonl.1 as it was when there was no audit.jsonl to hold open: a different one
    /// later is a generation never seen.
    rotated_when_idle: Option<(u64, u64, u64)>,
}

fn inode_of(meta: &std::fs::Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

impl ContainerLog {
    fn new(dir: PathBuf, skip_existing: bool) -> ContainerLog {
        ContainerLog {
            dir,
            open: None,
            started: false,
            skip_existing,
            rotated_when_idle: None,
        }
    }

    fn rotated(&self) -> PathBuf {
        self.dir.join(ROTATED_AUDIT_FILE)
    }

    fn rotated_identity(&self) -> Option<(u64, u64, u64)> {
        std::fs::metadata(self.rotated())
            .ok()
            .map(|m| (m.dev(), m.ino(), m.len()))
    }

    /// Read audit.jsonl.1 from its start.
    fn read_rotated(&self, out: &mut Vec<AuditRecord>) {
        if let Ok(file) = File::open(self.rotated()) {
            if let Ok(meta) = file.metadata() {
                read_more(&mut OpenLog::at_start(file, inode_of(&meta)), out);
            }
        }
    }

    /// Read whatever was appended since the last look, across rotations, oldest first.
    fn sync(&mut self, out: &mut Vec<AuditRecord>) {
        let current_inode = std::fs::metadata(self.dir.join(AUDIT_FILE))
            .ok()
            .map(|m| inode_of(&m));
        let first = !self.started;
        self.started = true;
        match self.open.take() {
            Some(mut open) if Some(open.inode) == current_inode => {
                read_more(&mut open, out);
                self.open = Some(open);
                return;
            }
            Some(mut open) => {
                // Rotated (or removed): the rest of the generation held open comes first.
                read_more(&mut open, out);
                // If audit.jsonl.1 is not that file, a whole generation came and went
                // between two looks. (The descriptor still held keeps its inode number
                // from being reused, so the comparison is sound.)
                if let Ok(meta) = std::fs::metadata(self.rotated()) {
                    if inode_of(&meta) != open.inode {
                        self.read_rotated(out);
                    }
                }
                self.rotated_when_idle = self.rotated_identity();
            }
            None => {
                let rotated = self.rotated_identity();
                let unseen = if first {
                    !self.skip_existing
                } else {
                    rotated != self.rotated_when_idle
                };
                if rotated.is_some() && unseen {
                    self.read_rotated(out);
                }
                self.rotated_when_idle = rotated;
            }
        }
        let Some(inode) = current_inode else { return };
        let Ok(file) = File::open(self.dir.join(AUDIT_FILE)) else {
            return;
        };
        let mut log = OpenLog::at_start(file, inode);
        if first && self.skip_existing {
            // What is there already is history: start at its end.
            match log.file.seek(SeekFrom::End(0)) {
                Ok(end) => log.offset = end,
                Err(_) => return,
            }
        }
        read_more(&mut log, out);
        self.open = Some(log);
    }
}

impl OpenLog {
    fn at_start(file: File, inode: (u64, u64)) -> OpenLog {
        OpenLog {
            file,
            inode,
            offset: 0,
            partial: Vec::new(),
        }
    }
}

/// Read `log` to its end, parsing complete lines into `out` (malformed lines are skipped,
/// as `logs` skips them). A file that shrank was truncated: it is read again from its start.
fn read_more(log: &mut OpenLog, out: &mut Vec<AuditRecord>) {
    if let Ok(meta) = log.file.metadata() {
        if meta.len() < log.offset {
            log.offset = 0;
            log.partial.clear();
        }
    }
    if log.file.seek(SeekFrom::Start(log.offset)).is_err() {
        return;
    }
    let mut chunk = [0u8; 64 * 1024];
    loop {
        let n = match log.file.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        log.offset += n as u64;
        log.partial.extend_from_slice(&chunk[..n]);
        let mut consumed = 0;
        while let Some(end) = log.partial[consumed..].iter().position(|b| *b == b'\n') {
            let line = &log.partial[consumed..consumed + end];
            if let Ok(record) = serde_json::from_slice::<AuditRecord>(line) {
                out.push(record);
            }
            consumed += end + 1;
        }
        log.partial.drain(..consumed);
        if log.partial.len() > MAX_LINE {
            log.partial.clear();
        }
    }
}

/// Follows the audit logs of one container or of all of them.
pub struct LogFollower {
    containers_dir: PathBuf,
    only: Option<ContainerName>,
    logs: BTreeMap<String, ContainerLog>,
    /// `None` when inotify is unavailable: the wait timeout alone paces the follow.
    inotify: Option<OwnedFd>,
    /// Whether `containers_dir` itself is watched (it may appear only later).
    root_watched: bool,
    signals: StopSignals,
}

impl LogFollower {
    /// Follow `only` (or every container under `containers_dir`, including those that appear
    /// later). With `from_start`, the first [`LogFollower::read_new`] returns what the logs
    /// hold already (audit.jsonl.1 included); otherwise only what is appended from now on.
    pub fn new(
        containers_dir: &Path,
        only: Option<ContainerName>,
        from_start: bool,
        signals: StopSignals,
    ) -> LogFollower {
        let inotify =
            inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK).ok();
        let mut follower = LogFollower {
            containers_dir: containers_dir.to_path_buf(),
            only,
            logs: BTreeMap::new(),
            inotify,
            root_watched: false,
            signals,
        };
        follower.discover(!from_start);
        if !from_start {
            // Mark where history ends now, not at the first read.
            for log in follower.logs.values_mut() {
                log.sync(&mut Vec::new());
            }
        }
        follower
    }

    /// Start following containers not followed yet (and watching their directories).
    fn discover(&mut self, skip_existing: bool) {
        if !self.root_watched {
            if let Some(fd) = &self.inotify {
                let flags = inotify::WatchFlags::CREATE
                    | inotify::WatchFlags::MOVED_TO
                    | inotify::WatchFlags::ONLYDIR;
                self.root_watched = inotify::add_watch(fd, &self.containers_dir, flags).is_ok();
            }
        }
        let names: Vec<String> = match &self.only {
            Some(name) => vec![name.as_str().to_string()],
            None => std::fs::read_dir(&self.containers_dir)
                .map(|entries| {
                    entries
                        .filter_map(|e| e.ok())
                        .filter(|e| e.path().is_dir())
                        .filter_map(|e| e.file_name().to_str().map(String::from))
                        .filter(|n| ContainerName::new(n).is_ok())
                        .collect()
                })
                .unwrap_or_default(),
        };
        for name in names {
            let dir = self.containers_dir.join(&name);
            if !dir.is_dir() {
                continue; // `only` before its directory exists: looked for again later
            }
            // Watched again every time: a directory removed and made again (a name reused)
            // is a new inode, and adding the watch of a watched one changes nothing.
            if let Some(fd) = &self.inotify {
                let flags = inotify::WatchFlags::MODIFY
                    | inotify::WatchFlags::CREATE
                    | inotify::WatchFlags::MOVED_TO
                    | inotify::WatchFlags::MOVED_FROM
                    | inotify::WatchFlags::ONLYDIR;
                let _ = inotify::add_watch(fd, &dir, flags);
            }
            self.logs
                .entry(name)
                .or_insert_with(|| ContainerLog::new(dir, skip_existing));
        }
    }

    /// The records appended since the last call (on the first call: see
    /// [`LogFollower::new`]), ordered by time.
    pub fn read_new(&mut self) -> Vec<AuditRecord> {
        self.discover(false);
        let mut out = Vec::new();
        for log in self.logs.values_mut() {
            log.sync(&mut out);
        }
        // Stable: lines of one container keep their file order when times tie.
        out.sort_by(|a, b| a.ts.cmp(&b.ts));
        out
    }

    /// Wait until a followed log may have grown, a stop signal arrives, `input` is readable,
    /// or `timeout` passes.
    pub fn wait(&mut self, input: Option<BorrowedFd<'_>>, timeout: Duration) -> io::Result<Wakeup> {
        let mut fds = vec![PollFd::new(&self.signals.fd, PollFlags::IN)];
        if let Some(fd) = &self.inotify {
            fds.push(PollFd::new(fd, PollFlags::IN));
        }
        let input_at = input.map(|fd| {
            fds.push(PollFd::from_borrowed_fd(fd, PollFlags::IN));
            fds.len() - 1
        });
        let timeout = Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok(Wakeup::default()),
            Err(e) => return Err(e.into()),
        }
        let input_ready = input_at.is_some_and(|i| !fds[i].revents().is_empty());
        drop(fds);
        if let Some(fd) = &self.inotify {
            drain_inotify(fd.as_fd());
        }
        Ok(Wakeup {
            stop: self.signals.take(),
            input: input_ready,
        })
    }
}

/// Read and discard pending inotify events: any of them only means "look again".
fn drain_inotify(fd: BorrowedFd<'_>) {
    let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
    let mut reader = inotify::Reader::new(fd, &mut buf);
    while reader.next().is_ok() {}
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;
    use crate::effects::audit::RotatingLog;

    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let dir = std::env::temp_dir().join(format!("ts-follow-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn line(container: &str, n: u64) -> String {
        AuditRecord::new(
            1_795_870_860_000 + u128::from(n),
            container,
            "blocked",
            true,
            serde_json::json!({"n": n}),
        )
        .to_line()
    }

    fn numbers(records: &[AuditRecord]) -> Vec<u64> {
        records
            .iter()
            .map(|r| r.detail["n"].as_u64().unwrap())
            .collect()
    }

    fn append(path: &Path, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    fn signals() -> StopSignals {
        StopSignals::install().unwrap()
    }

    #[test]
    fn follows_appends_partial_lines_rotations_and_new_containers() {
        let root = Dir::new("rot");
        let c1 = root.0.join("c1");
        std::fs::create_dir_all(&c1).unwrap();
        append(&c1.join(AUDIT_FILE), &line("c1", 0));
        let mut f = LogFollower::new(&root.0, None, false, signals());
        assert!(f.read_new().is_empty(), "existing lines are skipped");

        // A line written in two parts is returned once, whole.
        let whole = line("c1", 1);
        let (a, b) = whole.split_at(10);
        append(&c1.join(AUDIT_FILE), a);
        assert!(f.read_new().is_empty());
        append(&c1.join(AUDIT_FILE), b);
        assert_eq!(numbers(&f.read_new()), [1]);

        // Rotation by the event writer: nothing lost, nothing repeated.
        let mut log = RotatingLog::new(&c1, 2 * whole.len() as u64);
        for n in 2..9 {
            log.append(line("c1", n).as_bytes()).unwrap();
            if n % 3 == 0 {
                assert_eq!(numbers(&f.read_new()).last(), Some(&n));
            }
        }
        let rest = numbers(&f.read_new());
        assert_eq!(rest.last(), Some(&8));

        // A container that appears later is read from its first line.
        let c2 = root.0.join("c2");
        std::fs::create_dir_all(&c2).unwrap();
        append(&c2.join(AUDIT_FILE), &line("c2", 100));
        assert_eq!(numbers(&f.read_new()), [100]);
    }

    #[test]
    fn every_line_arrives_once_across_rotations() {
        let root = Dir::new("once");
        let c1 = root.0.join("c1");
        std::fs::create_dir_all(&c1).unwrap();
        let size = line("c1", 59).len() as u64; // the longest line
        let mut log = RotatingLog::new(&c1, 3 * size);
        let mut f = LogFollower::new(&root.0, None, true, signals());
        let mut seen = Vec::new();
        for n in 0..60 {
            log.append(line("c1", n).as_bytes()).unwrap();
            // Look rarely, so that two rotations sometimes happen between looks.
            if n % 5 == 4 {
                seen.extend(numbers(&f.read_new()));
            }
        }
        seen.extend(numbers(&f.read_new()));
        // Three lines per generation and a look every five lines: at most two rotations
        // between looks, and both generations are still there (one open, one as .1).
        assert_eq!(seen, (0..60).collect::<Vec<u64>>());
    }

    #[test]
    fn from_start_reads_the_rotated_log_first() {
        let root = Dir::new("start");
        let c1 = root.0.join("c1");
        std::fs::create_dir_all(&c1).unwrap();
        append(&c1.join(ROTATED_AUDIT_FILE), &line("c1", 1));
        append(
            &c1.join(AUDIT_FILE),
            &format!("{}not json\n", line("c1", 2)),
        );
        let only = Some(ContainerName::new("c1").unwrap());
        let mut f = LogFollower::new(&root.0, only, true, signals());
        assert_eq!(numbers(&f.read_new()), [1, 2]);
        assert!(f.read_new().is_empty());
    }

    #[test]
    fn a_wait_ends_on_a_change_and_within_its_timeout() {
        let root = Dir::new("wait");
        let c1 = root.0.join("c1");
        std::fs::create_dir_all(&c1).unwrap();
        let mut f = LogFollower::new(&root.0, None, false, signals());
        let started = std::time::Instant::now();
        let woke = f.wait(None, Duration::from_millis(50)).unwrap();
        assert!(!woke.stop && started.elapsed() < Duration::from_secs(5));
        append(&c1.join(AUDIT_FILE), &line("c1", 7));
        f.wait(None, Duration::from_secs(30)).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "inotify woke the wait"
        );
        assert_eq!(numbers(&f.read_new()), [7]);
    }
}
