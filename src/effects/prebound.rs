//! Sockets the hook binds inside the container's network namespace and hands to the process
//! it starts there (the builtin resolver, or the static tier's event reader).
//!
//! Binding them in the hook is what makes that process's start-up safe to not wait for: once
//! the hook returns, every DNS question of the workload already queues on a bound socket and
//! every refused packet on the bound NFLOG group, whether or not the process has finished
//! starting. What could still fail at start (no netns, port taken, NFLOG group busy, no
//! executable) fails here, in the hook, and refuses the container; the hook's own `spawn`
//! reports a failed exec.
//!
//! Hand-over: the child keeps the descriptors under the numbers they have in the hook (only
//! their close-on-exec flag is cleared between fork and exec, so nothing can be overwritten),
//! is told those numbers on its command line (NFLOG first, then a UDP and a TCP socket per
//! listen address), and takes them back with [`Inherited::take`], which checks each one's
//! kind before using it.

use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use rustix::net::{sockopt, AddressFamily, SocketType};

use super::netns::NsFiles;
use super::nflog::NflogSocket;

/// The NFLOG group the refusal events go to.
const GROUP: u16 = crate::core::ruleset::NFLOG_GROUP;

/// Sockets bound in a container's network namespace, for one child to inherit.
#[derive(Debug)]
pub struct Prebound {
    /// NFLOG group, then (UDP, TCP) per listen address; all close-on-exec in this process.
    fds: Vec<OwnedFd>,
}

impl Prebound {
    /// Bind the NFLOG group and, for each of `listen`, a UDP socket and a TCP listener, in
    /// the network namespace at `netns` (on a thread that joins it: this process stays
    /// where it is, the sockets stay where they were made).
    pub fn bind_in(netns: &Path, listen: &[SocketAddr]) -> io::Result<Prebound> {
        let ns = NsFiles::open(None, Some(netns)).map_err(|e| io::Error::other(e.to_string()))?;
        let made: io::Result<Vec<OwnedFd>> = std::thread::scope(|s| {
            s.spawn(|| {
                ns.enter()?;
                let mut fds = vec![OwnedFd::from(NflogSocket::bind(GROUP).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot bind NFLOG group {GROUP}: {e}"))
                })?)];
                for at in listen {
                    let bound = |e: io::Error| io::Error::new(e.kind(), format!("{at}: {e}"));
                    fds.push(UdpSocket::bind(at).map_err(bound)?.into());
                    fds.push(TcpListener::bind(at).map_err(bound)?.into());
                }
                Ok(fds)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the socket-binding thread panicked")))
        });
        Ok(Prebound { fds: made? })
    }

    /// The descriptor numbers, for the child's command line (`--inherited`).
    pub fn numbers(&self) -> String {
        let numbers: Vec<String> = self.fds.iter().map(|f| f.as_raw_fd().to_string()).collect();
        numbers.join(",")
    }

    /// Let the sockets survive exec. Call between fork and exec only (fcntl(2) is
    /// async-signal-safe); this process's own copies stay close-on-exec.
    pub fn keep_across_exec(&self) -> io::Result<()> {
        for fd in &self.fds {
            // SAFETY: F_SETFD on a descriptor this process owns, in the forked child.
            if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// The sockets a child received from the hook.
#[derive(Debug)]
pub struct Inherited {
    pub nflog: NflogSocket,
    /// (UDP, TCP) per listen address, in the hook's order.
    pub listeners: Vec<(UdpSocket, TcpListener)>,
}

impl Inherited {
    /// Take the sockets numbered `fds` (NFLOG, then a UDP and a TCP socket per listen
    /// address), refusing any number that is not open or not the socket it should be.
    pub fn take(fds: &[RawFd]) -> io::Result<Inherited> {
        if fds.is_empty() || fds.len().is_multiple_of(2) {
            return Err(io::Error::other(format!(
                "expected the NFLOG socket and pairs of UDP and TCP sockets, got {} descriptors",
                fds.len()
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut owned = Vec::with_capacity(fds.len());
        for &raw in fds {
            // SAFETY: fcntl(F_GETFD) only asks whether the number is open.
            if raw < 3 || !seen.insert(raw) || unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
                return Err(io::Error::other(format!(
                    "descriptor {raw} was not handed over (this runs only when the hook starts it)"
                )));
            }
            // SAFETY: open, not stdio, named once, and owned by nothing else in this process:
            // the hook handed it over across exec for us to take.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)?;
            owned.push(fd);
        }
        let mut owned = owned.into_iter();
        let nflog = owned.next().expect("checked: not empty");
        expect_kind(&nflog, AddressFamily::NETLINK, SocketType::RAW)?;
        let mut listeners = Vec::with_capacity(fds.len() / 2);
        while let (Some(udp), Some(tcp)) = (owned.next(), owned.next()) {
            expect_kind(&udp, AddressFamily::UNSPEC, SocketType::DGRAM)?;
            expect_kind(&tcp, AddressFamily::UNSPEC, SocketType::STREAM)?;
            if !sockopt::socket_acceptconn(&tcp)? {
                return Err(io::Error::other("an inherited TCP socket is not listening"));
            }
            listeners.push((UdpSocket::from(udp), TcpListener::from(tcp)));
        }
        Ok(Inherited {
            nflog: NflogSocket::from_fd(nflog),
            listeners,
        })
    }
}

/// Refuse a descriptor that is not a socket of `kind` (and of `family`, unless UNSPEC).
fn expect_kind(fd: &OwnedFd, family: AddressFamily, kind: SocketType) -> io::Result<()> {
    let found = sockopt::socket_type(fd.as_fd())?;
    let domain = sockopt::socket_domain(fd.as_fd())?;
    if found != kind || (family != AddressFamily::UNSPEC && domain != family) {
        return Err(io::Error::other(format!(
            "inherited descriptor {} is not the expected socket ({kind:?}, got {found:?})",
            fd.as_raw_fd()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::effects::firewall::tests_netns::TempNetns;
    use std::os::fd::IntoRawFd;

    #[test]
    fn numbers_that_were_not_handed_over_are_refused() {
        // Each case gets a fresh descriptor that is open but not a socket: `take` owns (and
        // closes) what it took before refusing.
        let not_a_socket = || std::fs::File::open("/dev/null").unwrap().into_raw_fd();
        let cases: Vec<Vec<RawFd>> = vec![vec![], vec![1000], vec![2], vec![not_a_socket()], {
            let n = not_a_socket();
            vec![n, n, n]
        }];
        for bad in cases {
            assert!(Inherited::take(&bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn sockets_bound_in_a_namespace_come_back_in_order_and_kind() {
        let Some(ns) = TempNetns::new("prebound") else {
            return;
        };
        let up = std::process::Command::new("ip")
            .args(["-n", ns.name(), "link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(up.success());
        let listen: [SocketAddr; 2] = ["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()];
        let bound = Prebound::bind_in(&ns.path(), &listen).unwrap();
        assert_eq!(bound.numbers().split(',').count(), 5);
        // The NFLOG group is the namespace's: a second binder is refused (so is a second
        // container start racing the first), and says which group.
        let busy = Prebound::bind_in(&ns.path(), &[]).unwrap_err();
        assert!(busy.to_string().contains("NFLOG group 100"), "{busy}");

        // Hand over copies, as exec would, in the order given on the command line.
        let copies: Vec<RawFd> = bound
            .fds
            .iter()
            .map(|f| rustix::io::dup(f).unwrap().into_raw_fd())
            .collect();
        let mut swapped = copies.clone();
        swapped.swap(0, 1);
        let dup_all = |fds: &[RawFd]| -> Vec<RawFd> {
            fds.iter()
                .map(|&f| {
                    // SAFETY: borrowed only for the duration of dup.
                    let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(f) };
                    rustix::io::dup(b).unwrap().into_raw_fd()
                })
                .collect()
        };
        let err = Inherited::take(&dup_all(&swapped)).unwrap_err();
        assert!(err.to_string().contains("not the expected socket"), "{err}");

        let taken = Inherited::take(&copies).unwrap();
        assert_eq!(taken.listeners.len(), 2);
        let (udp4, tcp4) = &taken.listeners[0];
        let (udp6, _) = &taken.listeners[1];
        assert_eq!(udp4.local_addr().unwrap().ip().to_string(), "127.0.0.1");
        assert_eq!(tcp4.local_addr().unwrap().ip().to_string(), "127.0.0.1");
        assert_eq!(udp6.local_addr().unwrap().ip().to_string(), "::1");
        // They live in the namespace, not here: a datagram sent from inside it arrives.
        let to = udp4.local_addr().unwrap();
        let path = ns.path();
        std::thread::spawn(move || {
            let ns = NsFiles::open(None, Some(&path)).unwrap();
            ns.enter().unwrap();
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.send_to(b"ping", to).unwrap();
        })
        .join()
        .unwrap();
        udp4.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 8];
        let (n, _) = udp4.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping");
    }
}
