//! Reading NFLOG over netlink: the packets the ruleset logs to group
//! [`NFLOG_GROUP`](crate::core::ruleset::NFLOG_GROUP), received inside the container's
//! network namespace.
//!
//! Needs no root: `CAP_NET_ADMIN` over the namespace (the rootless user namespace's root,
//! which the hook and the processes it starts are) lets a process bind a group of that
//! namespace, and NFLOG groups are per namespace. The host's `nf_log_all_netns` does not
//! matter here. Decoding is pure ([`crate::core::events`]); this module owns the socket.
//!
//! The kernel is asked for the first [`COPY_RANGE`] bytes of each packet (headers, enough for
//! ports after IPv6 extension headers), per-group sequence numbers (gaps are packets lost to
//! a full socket buffer), and small batches, so a flood costs one `recv` per many packets.

use std::io;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::net::{
    netlink, recv, send, socket_with, sockopt, AddressFamily, RecvFlags, SendFlags, SocketFlags,
    SocketType,
};

use crate::core::events::{decode_packet, netlink_messages, nl, Packet};
use crate::core::nft_netlink::{message, NLM_F_ACK, NLM_F_REQUEST};
use crate::effects::nfnetlink::acks;

/// Bytes of each packet the kernel copies to us: an IPv6 header with some extension
/// headers and the first bytes of the transport header.
pub const COPY_RANGE: u32 = 128;

const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULA_CFG_NLBUFSIZ: u16 = 3;
const NFULA_CFG_TIMEOUT: u16 = 4;
const NFULA_CFG_QTHRESH: u16 = 5;
const NFULA_CFG_FLAGS: u16 = 6;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULNL_CFG_F_SEQ: u16 = 1;

/// Kernel-side batching: a batch goes out when it holds this many packets, fills this many
/// bytes, or is this old (hundredths of a second). A lone packet waits at most 20 ms.
const BATCH_PACKETS: u32 = 64;
const BATCH_BYTES: u32 = 32 * 1024;
const BATCH_WAIT_CS: u32 = 2;

/// Receive buffer asked for; the kernel caps it at `net.core.rmem_max`.
const RECV_BUFFER: usize = 4 << 20;

/// What one [`NflogSocket::recv`] brought.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Packets of the shield's verdict chains, with their sequence numbers.
    pub packets: Vec<(Packet, Option<u32>)>,
    /// Messages that were not packet events (another prefix, no payload, ...).
    pub skipped: usize,
    /// The kernel reported an overrun (ENOBUFS): some packets were lost; sequence gaps say
    /// how many.
    pub overrun: bool,
}

/// A netlink socket bound to one NFLOG group of the calling thread's network namespace
/// (where it stays, whichever thread later reads it).
#[derive(Debug)]
pub struct NflogSocket {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl NflogSocket {
    /// Bind `group` in the calling thread's network namespace. Fails with `EPERM` without
    /// `CAP_NET_ADMIN` over the namespace and `EBUSY` when another socket has the group.
    pub fn bind(group: u16) -> io::Result<NflogSocket> {
        let fd = socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            Some(netlink::NETFILTER),
        )?;
        // Bigger is better under a flood; privileged callers may exceed rmem_max.
        if sockopt::set_socket_recv_buffer_size_force(&fd, RECV_BUFFER).is_err() {
            let _ = sockopt::set_socket_recv_buffer_size(&fd, RECV_BUFFER);
        }
        sockopt::set_socket_timeout(&fd, sockopt::Timeout::Recv, Some(Duration::from_secs(2)))?;
        let mut msg = Vec::with_capacity(128);
        config_message(&mut msg, 1, group);
        send(&fd, &msg, SendFlags::empty())?;
        let mut sock = NflogSocket {
            fd,
            buf: vec![0; 256 * 1024],
        };
        sock.wait_ack(1)?;
        Ok(sock)
    }

    /// A socket bound by [`NflogSocket::bind`] in another process (the hook), inherited
    /// across exec.
    pub fn from_fd(fd: OwnedFd) -> NflogSocket {
        NflogSocket {
            fd,
            buf: vec![0; 256 * 1024],
        }
    }

    fn wait_ack(&mut self, seq: u32) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            let n = match recv(&self.fd, &mut self.buf[..], RecvFlags::empty()) {
                Ok((n, _)) => n.min(self.buf.len()),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            if let Some((_, errno)) = acks(&self.buf[..n]).find(|(s, _)| *s == seq) {
                return match errno {
                    0 => Ok(()),
                    e => Err(io::Error::from_raw_os_error(e)),
                };
            }
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no answer from nfnetlink_log within 2 s",
        ))
    }

    /// Wait up to `wait` for logged packets and take every one that is queued now.
    pub fn recv(&mut self, wait: Duration) -> io::Result<Batch> {
        let mut batch = Batch::default();
        sockopt::set_socket_timeout(&self.fd, sockopt::Timeout::Recv, Some(wait.max(MIN_WAIT)))?;
        let mut flags = RecvFlags::empty();
        // Bounded: after the first datagram only what is already queued, up to a limit, so
        // the caller gets to flush its aggregates even under a flood.
        for _ in 0..64 {
            let n = match recv(&self.fd, &mut self.buf[..], flags) {
                Ok((n, _)) => n.min(self.buf.len()),
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => break,
                Err(Errno::NOBUFS) => {
                    batch.overrun = true;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            for (kind, body) in netlink_messages(&self.buf[..n]) {
                if kind != (nl::NFNL_SUBSYS_ULOG << 8) | nl::NFULNL_MSG_PACKET {
                    continue; // acks, NLMSG_DONE, errors
                }
                match decode_packet(body) {
                    Ok(p) => batch.packets.push(p),
                    Err(_) => batch.skipped += 1,
                }
            }
            flags = RecvFlags::DONTWAIT;
        }
        Ok(batch)
    }
}

impl From<NflogSocket> for OwnedFd {
    fn from(sock: NflogSocket) -> OwnedFd {
        sock.fd
    }
}

/// SO_RCVTIMEO of zero means "forever": never ask for less than this.
const MIN_WAIT: Duration = Duration::from_millis(1);

/// `NFULNL_MSG_CONFIG` binding `group`, with copy range, sequence numbers and batching.
fn config_message(out: &mut Vec<u8>, seq: u32, group: u16) {
    let mut mode = [0; 6];
    mode[..4].copy_from_slice(&COPY_RANGE.to_be_bytes());
    mode[4] = NFULNL_COPY_PACKET;
    message(
        out,
        (nl::NFNL_SUBSYS_ULOG << 8) | nl::NFULNL_MSG_CONFIG,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        0, // AF_UNSPEC
        group,
        |w| {
            w.bytes(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND]);
            w.bytes(NFULA_CFG_MODE, &mode);
            w.be32(NFULA_CFG_NLBUFSIZ, BATCH_BYTES);
            w.be32(NFULA_CFG_TIMEOUT, BATCH_WAIT_CS);
            w.be32(NFULA_CFG_QTHRESH, BATCH_PACKETS);
            w.bytes(NFULA_CFG_FLAGS, &NFULNL_CFG_F_SEQ.to_be_bytes());
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_message_matches_the_kernel_layout() {
        let mut m = Vec::new();
        config_message(&mut m, 9, 100);
        assert_eq!(
            u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize,
            m.len()
        );
        assert_eq!(
            u16::from_ne_bytes([m[4], m[5]]),
            0x0401,
            "NFNL_SUBSYS_ULOG, MSG_CONFIG"
        );
        assert_eq!(
            &m[16..20],
            &[0, 0, 0, 100],
            "AF_UNSPEC, version 0, group 100 (big-endian)"
        );
        // CMD: len 5, type 1, BIND, padding.
        assert_eq!(&m[20..28], &[5, 0, 1, 0, 1, 0, 0, 0]);
        // MODE: len 10, type 2, copy range 128 (big-endian), COPY_PACKET, pad, padding.
        assert_eq!(&m[28..40], &[10, 0, 2, 0, 0, 0, 0, 128, 2, 0, 0, 0]);
        // FLAGS last: len 6, type 6, F_SEQ (big-endian), padding.
        assert_eq!(&m[m.len() - 8..], &[6, 0, 6, 0, 0, 1, 0, 0]);
    }

    /// Every byte, as captured before the attribute writer was shared with core.
    #[test]
    fn config_message_is_byte_for_byte_the_captured_one() {
        let mut m = vec![0xee]; // appended after what is already there
        config_message(&mut m, 0x0102_0304, 0xabcd);
        #[rustfmt::skip]
        let want: [u8; 73] = [
            0xee,
            0x48, 0, 0, 0, 0x01, 0x04, 0x05, 0, 0x04, 0x03, 0x02, 0x01, 0, 0, 0, 0, // nlmsghdr
            0, 0, 0xab, 0xcd, // nfgenmsg
            5, 0, 1, 0, 1, 0, 0, 0, // CMD
            10, 0, 2, 0, 0, 0, 0, 0x80, 2, 0, 0, 0, // MODE
            8, 0, 3, 0, 0, 0, 0x80, 0, // NLBUFSIZ
            8, 0, 4, 0, 0, 0, 0, 2, // TIMEOUT
            8, 0, 5, 0, 0, 0, 0, 0x40, // QTHRESH
            6, 0, 6, 0, 0, 1, 0, 0, // FLAGS
        ];
        assert_eq!(m, want);
    }
}
