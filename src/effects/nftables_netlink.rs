//! Loading and reading back our table over nf_tables netlink, without libnftables or nft.
//!
//! The batches and their decoding are computed in [`crate::core::nft_netlink`]; this module
//! only opens the socket in the container's network namespace, sends, waits for the kernel's
//! acknowledgements and collects dumps. Loading through libnftables cost the hook ~2 ms of
//! library start-up and ~2 MiB of resident libraries, and nft's JSON listing of a table with
//! 200,000 elements ~0.9 s; the kernel's own dumps take a fraction of that.
//!
//! A netlink socket belongs for good to the network namespace of the thread that created it,
//! so [`NlSocket::open_in`] creates it on a short-lived thread that joined the namespace (the
//! process itself never moves). Joining a user namespace as well (a rootless container
//! reached from outside it) needs a single-threaded process: [`NlSocket::open_in_namespaces`]
//! forks a child that joins both, creates the socket and hands its descriptor back over a
//! socket pair, then exits. The kernel checks `CAP_NET_ADMIN` against the socket's creator
//! (root of the container's user namespace) and the sender (its owner, or root), both of
//! which hold it.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::net::{
    netlink, recv, recvmsg, send, sendmsg, socket_with, sockopt, AddressFamily,
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};
use thiserror::Error;

use super::netns::NsFiles;
use crate::core::nft_netlink::{
    message, messages, msg, nft_type, Batch, DecodeError, TableDump, NFPROTO_INET, NLMSG_DONE,
    NLMSG_ERROR, NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use crate::core::ruleset::{FAMILY, TABLE};

/// How long to wait for any one answer of the kernel before giving up (fail closed).
const RECV_TIMEOUT: Duration = Duration::from_secs(10);
/// Receive buffer: dump datagrams are at most 32 KiB.
const RECV_BUF: usize = 64 * 1024;
/// Socket receive buffer asked for: acknowledgements of a whole batch must fit.
const SOCKET_RCVBUF: usize = 4 * 1024 * 1024;

/// Failures of the netlink backend; messages name the problem and what to do.
#[derive(Debug, Error)]
pub enum NlError {
    #[error("cannot open network namespace {path}: {source}; is the container still running?")]
    Namespace { path: PathBuf, source: io::Error },
    #[error("cannot open an nf_tables netlink socket in the container's network namespace: {0}")]
    Socket(io::Error),
    #[error("the kernel refused {what}: {source}{hint}", hint = errno_hint(source))]
    Refused { what: String, source: io::Error },
    #[error("nf_tables netlink {what} failed: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    #[error("no answer from nf_tables within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Ns(#[from] super::netns::NsError),
}

fn errno_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) => " (no CAP_NET_ADMIN over the container's network namespace: run the hook as the container's owner, or as root)",
        Some(libc::ENOENT) => " (an object the batch refers to does not exist)",
        Some(libc::EEXIST) => " (the object already exists)",
        _ => "",
    }
}

/// An nf_tables netlink socket bound to one network namespace.
#[derive(Debug)]
pub struct NlSocket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

/// Sockets kept open by [`NlSocket::park`]: the newest `max`; parking one more hands back
/// the oldest, to be closed.
struct Parking {
    fds: std::collections::VecDeque<OwnedFd>,
    max: usize,
}

impl Parking {
    fn park(&mut self, fd: OwnedFd) -> Option<OwnedFd> {
        self.fds.push_back(fd);
        if self.fds.len() > self.max {
            self.fds.pop_front()
        } else {
            None
        }
    }
}

/// At most this many parked sockets per process.
const PARKED_MAX: usize = 4;
static PARKED: std::sync::Mutex<Parking> = std::sync::Mutex::new(Parking {
    fds: std::collections::VecDeque::new(),
    max: PARKED_MAX,
});

impl NlSocket {
    /// Keep this socket open until the process exits (or a few more are parked) instead of
    /// closing it now, when what it did is committed and verified.
    ///
    /// The kernel frees deleted set elements only after an RCU grace period (milliseconds
    /// here), and the release of *any* nf_tables netlink socket waits for that work while
    /// it is pending (`nft_rcv_nl_event`). Closing at once would make the caller wait right
    /// there; parked, the wait overlaps with what the caller does next (saving the bundle,
    /// cutting flows, the audit record) and usually ends before the process does. Bounded,
    /// so a long-lived process keeps at most [`PARKED_MAX`] descriptors for it.
    pub fn park(self) {
        let evicted = PARKED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .park(self.fd);
        drop(evicted); // closed outside the lock
    }

    /// A socket in the network namespace at `netns` (`None`: this thread's own).
    pub fn open_in(netns: Option<&Path>) -> Result<NlSocket, NlError> {
        let Some(path) = netns else {
            return NlSocket::open_here().map_err(NlError::Socket);
        };
        let file = File::open(path).map_err(|source| NlError::Namespace {
            path: path.to_path_buf(),
            source,
        })?;
        std::thread::scope(|s| {
            s.spawn(|| {
                move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network)).map_err(
                    |e| NlError::Namespace {
                        path: path.to_path_buf(),
                        source: e.into(),
                    },
                )?;
                NlSocket::open_here().map_err(NlError::Socket)
            })
            .join()
            .unwrap_or_else(|_| {
                Err(NlError::Socket(io::Error::other(
                    "the thread opening the socket panicked",
                )))
            })
        })
    }

    /// A socket in the network namespace `net`, joining the user namespace `user` first (a
    /// forked child does, see the module header) unless this process already lives in it.
    pub fn open_in_namespaces(
        user: Option<&Path>,
        net: Option<&Path>,
    ) -> Result<NlSocket, NlError> {
        let ns = NsFiles::open(user, net)?;
        if !ns.has_user() {
            return NlSocket::open_in(net);
        }
        let (parent, child) = UnixStream::pair().map_err(NlError::Socket)?;
        // SAFETY: fork(2). The child makes only syscalls (setns, setresuid, socket, sendmsg
        // with a stack buffer: nothing allocates or locks) and leaves with _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(NlError::Socket(io::Error::last_os_error()));
        }
        if pid == 0 {
            drop(parent);
            let ok = ns.enter().is_ok()
                && new_socket()
                    .ok()
                    .is_some_and(|fd| send_fd(&child, fd.as_fd()).is_ok());
            // SAFETY: leave without running the parent's atexit handlers or destructors.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
        drop(child);
        let received = recv_fd(&parent);
        let mut status = 0;
        // SAFETY: our own child, reaped once; it exits right after sending.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        match received {
            Ok(Some(fd)) => NlSocket::configure(fd).map_err(NlError::Socket),
            Ok(None) => Err(NlError::Socket(io::Error::other(
                "the child that joins the container's user and network namespaces could not (is the container still running, and is it yours?)",
            ))),
            Err(e) => Err(NlError::Socket(e)),
        }
    }

    fn open_here() -> io::Result<NlSocket> {
        NlSocket::configure(new_socket()?)
    }

    fn configure(fd: OwnedFd) -> io::Result<NlSocket> {
        sockopt::set_socket_timeout(&fd, sockopt::Timeout::Recv, Some(RECV_TIMEOUT))?;
        // Best effort: a bigger buffer only avoids dropped acknowledgements under load.
        let _ = sockopt::set_socket_recv_buffer_size(&fd, SOCKET_RCVBUF);
        // Errors without the echo of the whole failed request (which may be 32 KiB).
        let one: libc::c_int = 1;
        // SAFETY: valid socket and a pointer to an int of the given size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_NETLINK,
                libc::NETLINK_CAP_ACK,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.subsec_nanos() | 1);
        Ok(NlSocket {
            fd,
            seq: seed,
            buf: vec![0; RECV_BUF],
        })
    }

    /// Sequence numbers for `count` messages, the first returned.
    pub fn take_seq(&mut self, count: u32) -> u32 {
        let first = self.seq;
        self.seq = self.seq.wrapping_add(count);
        first
    }

    /// Number the batches `build` makes from this socket's next sequence number (it gets
    /// that number), take the numbers they use, and send them; how many batches there were,
    /// and [`NlSocket::send_batches`]'s outcome.
    pub fn number_and_send(
        &mut self,
        build: impl FnOnce(u32) -> Vec<Batch>,
    ) -> (usize, Result<(), (usize, NlError)>) {
        let batches = build(self.take_seq(0));
        self.take_seq(batches.iter().map(|b| b.messages + 2).sum());
        (batches.len(), self.send_batches(&batches))
    }

    /// Send batches one after another, each waiting for the kernel's verdict on every
    /// message; the first refusal stops (earlier batches stay applied).
    pub fn send_batches(&mut self, batches: &[Batch]) -> Result<(), (usize, NlError)> {
        for (index, batch) in batches.iter().enumerate() {
            self.send_batch(batch).map_err(|e| (index, e))?;
        }
        Ok(())
    }

    fn send_batch(&mut self, batch: &Batch) -> Result<(), NlError> {
        send(&self.fd, &batch.bytes, SendFlags::empty()).map_err(|e| NlError::Io {
            what: "send",
            source: e.into(),
        })?;
        let begin = batch.first_seq.wrapping_sub(1);
        let span = batch.messages + 2;
        let mut acked = vec![false; batch.messages as usize];
        let mut left = batch.messages as usize;
        let mut failure: Option<(u32, i32)> = None;
        let deadline = Instant::now() + RECV_TIMEOUT;
        while left > 0 && failure.is_none() {
            let n = self.recv_some(deadline)?;
            for m in messages(&self.buf[..n])? {
                if m.kind != NLMSG_ERROR {
                    continue;
                }
                let offset = m.seq.wrapping_sub(begin);
                if offset >= span {
                    continue; // an answer to something earlier
                }
                let errno = ack_errno(m.raw);
                if errno != 0 {
                    failure.get_or_insert((m.seq, errno));
                } else if (1..=batch.messages).contains(&offset) {
                    let slot = &mut acked[offset as usize - 1];
                    if !*slot {
                        *slot = true;
                        left -= 1;
                    }
                }
            }
        }
        let Some((seq, errno)) = failure else {
            return Ok(());
        };
        while let Ok((n, _)) = recv(&self.fd, &mut self.buf, RecvFlags::DONTWAIT) {
            if n == 0 {
                break;
            }
        }
        Err(NlError::Refused {
            what: describe(&batch.bytes, seq),
            source: io::Error::from_raw_os_error(errno),
        })
    }

    fn recv_some(&mut self, deadline: Instant) -> Result<usize, NlError> {
        loop {
            if Instant::now() >= deadline {
                return Err(NlError::Timeout(RECV_TIMEOUT));
            }
            match recv(&self.fd, &mut self.buf, RecvFlags::empty()) {
                Ok((n, _)) => return Ok(n.min(self.buf.len())),
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return Err(NlError::Timeout(RECV_TIMEOUT)),
                Err(e) => {
                    return Err(NlError::Io {
                        what: "receive",
                        source: e.into(),
                    })
                }
            }
        }
    }

    /// Send one request and collect the messages of its answer: a dump up to its end, or a
    /// plain request up to its acknowledgement. `Err` carries the kernel's errno.
    fn request(
        &mut self,
        kind: u16,
        flags: u16,
        body: impl FnOnce(&mut crate::core::nft_netlink::Writer),
        interrupted: &mut bool,
    ) -> Result<Result<Vec<Vec<u8>>, io::Error>, NlError> {
        let seq = self.take_seq(1);
        let mut out = Vec::new();
        message(
            &mut out,
            nft_type(kind),
            flags | NLM_F_REQUEST | NLM_F_ACK,
            seq,
            NFPROTO_INET,
            0,
            body,
        );
        send(&self.fd, &out, SendFlags::empty()).map_err(|e| NlError::Io {
            what: "send",
            source: e.into(),
        })?;
        let deadline = Instant::now() + RECV_TIMEOUT;
        let mut got = Vec::new();
        loop {
            let n = self.recv_some(deadline)?;
            for m in messages(&self.buf[..n])? {
                if m.seq != seq {
                    continue;
                }
                match m.kind {
                    NLMSG_DONE => return Ok(Ok(got)),
                    NLMSG_ERROR => {
                        let errno = ack_errno(m.raw);
                        if errno != 0 {
                            return Ok(Err(io::Error::from_raw_os_error(errno)));
                        }
                        if flags & NLM_F_DUMP != NLM_F_DUMP {
                            return Ok(Ok(got));
                        }
                    }
                    _ => {
                        *interrupted |= m.flags & NLM_F_DUMP_INTR != 0;
                        got.push(m.raw.to_vec());
                    }
                }
            }
        }
    }

    /// Every message the kernel dumps of our table, or `None` if the table does not exist.
    /// The elements of our named set `set` as the kernel lists them (a learned set's too,
    /// which [`NlSocket::dump_table`] leaves out). A dump interrupted by a concurrent change
    /// is as good as any: the resolver adds to these sets all the time, and a reader of them
    /// only needs what was there at some moment.
    pub fn dump_set_elements(
        &mut self,
        set: &str,
    ) -> Result<Vec<crate::core::nft_netlink::ElemObj>, NlError> {
        let mut interrupted = false;
        let raw = self
            .request(
                msg::GETSETELEM,
                NLM_F_DUMP,
                |w| {
                    w.str(1, TABLE);
                    w.str(2, set);
                },
                &mut interrupted,
            )?
            .map_err(|source| NlError::Refused {
                what: format!("listing the elements of set {set}"),
                source,
            })?;
        Ok(crate::core::nft_netlink::set_elements_of(&raw, set)?)
    }

    pub fn dump_table(&mut self) -> Result<Option<TableDump>, NlError> {
        use crate::core::nft_netlink::Writer;
        let mut interrupted = false;
        let table = match self.request(
            msg::GETTABLE,
            0,
            |w: &mut Writer| w.str(1, TABLE),
            &mut interrupted,
        )? {
            Ok(t) => t,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(source) => {
                return Err(NlError::Refused {
                    what: format!("listing table {FAMILY} {TABLE}"),
                    source,
                })
            }
        };
        let refused = |what: &str, source| NlError::Refused {
            what: format!("listing the {what} of table {FAMILY} {TABLE}"),
            source,
        };
        let chains = self
            .request(
                msg::GETCHAIN,
                NLM_F_DUMP,
                |w| w.str(1, TABLE),
                &mut interrupted,
            )?
            .map_err(|e| refused("chains", e))?;
        let rules = self
            .request(
                msg::GETRULE,
                NLM_F_DUMP,
                |w| w.str(1, TABLE),
                &mut interrupted,
            )?
            .map_err(|e| refused("rules", e))?;
        let sets = self
            .request(
                msg::GETSET,
                NLM_F_DUMP,
                |w| w.str(1, TABLE),
                &mut interrupted,
            )?
            .map_err(|e| refused("sets", e))?;
        let mut dump = TableDump {
            table,
            chains,
            rules,
            sets,
            elements: Vec::new(),
            interrupted: false,
        };
        for (name, learned) in dump.set_names()? {
            if learned {
                continue; // filled and expired at run time: verification does not pin them
            }
            let elems = self
                .request(
                    msg::GETSETELEM,
                    NLM_F_DUMP,
                    |w| {
                        w.str(1, TABLE);
                        w.str(2, &name);
                    },
                    &mut interrupted,
                )?
                .map_err(|e| refused("elements", e))?;
            dump.elements.push((name, elems));
        }
        dump.interrupted = interrupted;
        Ok(Some(dump))
    }
}

fn new_socket() -> io::Result<OwnedFd> {
    Ok(socket_with(
        AddressFamily::NETLINK,
        SocketType::RAW,
        SocketFlags::CLOEXEC,
        Some(netlink::NETFILTER),
    )?)
}

/// Hand `fd` over a Unix socket (no allocation: callable after fork).
fn send_fd(stream: &UnixStream, fd: BorrowedFd) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    let fds = [fd];
    cmsg.push(SendAncillaryMessage::ScmRights(&fds));
    sendmsg(stream, &[IoSlice::new(b"s")], &mut cmsg, SendFlags::empty())?;
    Ok(())
}

/// Receive a descriptor [`send_fd`] sent; `None` when the peer hung up without one.
fn recv_fd(stream: &UnixStream) -> io::Result<Option<OwnedFd>> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    stream.set_read_timeout(Some(RECV_TIMEOUT))?;
    recvmsg(
        stream,
        &mut [IoSliceMut::new(&mut byte)],
        &mut cmsg,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    for message in cmsg.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = message {
            if let Some(fd) = fds.next() {
                return Ok(Some(fd));
            }
        }
    }
    Ok(None)
}

/// The errno of an `NLMSG_ERROR` message (0: an acknowledgement).
fn ack_errno(raw: &[u8]) -> i32 {
    raw.get(16..20)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(i32::MIN)
        .wrapping_neg()
}

/// Which message of `batch` has sequence number `seq`, for an error message.
fn describe(batch: &[u8], seq: u32) -> String {
    let Ok(msgs) = messages(batch) else {
        return "the batch".into();
    };
    let Some(m) = msgs.iter().find(|m| m.seq == seq) else {
        return "the batch".into();
    };
    let what = match m.kind & 0xff {
        msg::NEWTABLE => "creating table",
        msg::DELTABLE => "deleting table",
        msg::NEWCHAIN => "creating chain",
        msg::NEWRULE => "adding a rule to chain",
        msg::NEWSET => "creating set",
        msg::NEWSETELEM => "adding elements to set",
        _ => "a message of the batch",
    };
    let name = crate::core::nft_netlink::attrs(m.body)
        .ok()
        .and_then(|a| {
            // The object's own name: the chain of a rule, else the second string attribute.
            a.iter()
                .filter(|x| x.kind == 2 || x.kind == 3)
                .find_map(|x| x.string().ok())
        })
        .unwrap_or_default();
    format!("{what} {name}").trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parking_keeps_the_newest_sockets_and_hands_back_the_oldest() {
        let mut parking = Parking {
            fds: std::collections::VecDeque::new(),
            max: 2,
        };
        let socks: Vec<OwnedFd> = (0..3)
            .map(|_| new_socket().expect("a netlink socket needs no privilege"))
            .collect();
        let numbers: Vec<i32> = socks.iter().map(|s| s.as_raw_fd()).collect();
        let mut evicted = Vec::new();
        for sock in socks {
            evicted.extend(parking.park(sock));
        }
        assert_eq!(
            evicted.iter().map(|s| s.as_raw_fd()).collect::<Vec<_>>(),
            numbers[..1],
            "the oldest goes first"
        );
        let kept: Vec<i32> = parking.fds.iter().map(|s| s.as_raw_fd()).collect();
        assert_eq!(kept, numbers[1..], "the newest stay open");
    }
}
