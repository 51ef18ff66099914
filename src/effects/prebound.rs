//! The sockets a container's resolver serves on, bound by the createRuntime hook and handed
//! to the resolver process it starts.
//!
//! What must exist before the workload's first instruction is not a running resolver but its
//! sockets: a DNS question sent to a bound socket waits in the socket's queue until the
//! resolver reads it, and a refused packet's NFLOG message waits in the bound NFLOG socket.
//! Binding them in the hook (a few syscalls, on a thread that joined the container's network
//! namespace) lets the hook return without waiting for the resolver to start up. Fail closed
//! all the same: the firewall is loaded and verified before, and a resolver that never comes
//! up answers nothing.
//!
//! Hand-over: the descriptors are moved to numbers of at least 64 (clear of anything the
//! runtime library uses when spawning), stay open across exec in the child only, and
//! [`INHERITED_ENV`] lists their numbers in order.

use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use super::netns::NsFiles;
use super::nflog::NflogSocket;

/// Environment variable listing the sockets a resolver inherited from the hook
/// (comma-separated descriptor numbers: NFLOG, then UDP and TCP per listen address).
pub const INHERITED_ENV: &str = "TEROK_SHIELD_INHERITED_FDS";

/// Handed-over descriptors are moved at or above this number.
const PARKED_FROM: RawFd = 64;

/// Sockets bound in a container's network namespace: NFLOG, then per address UDP and TCP.
#[derive(Debug)]
pub struct Prebound {
    pub nflog: NflogSocket,
    pub dns: Vec<(UdpSocket, TcpListener)>,
}

impl Prebound {
    /// Bind the NFLOG group and DNS on `listen`:`port` in the network namespace at `netns`,
    /// from a short-lived thread that joins it (this process stays where it is).
    pub fn bind_in(
        netns: &Path,
        group: u16,
        listen: &[IpAddr],
        port: u16,
    ) -> std::io::Result<Prebound> {
        let ns =
            NsFiles::open(None, Some(netns)).map_err(|e| std::io::Error::other(e.to_string()))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                ns.enter()?;
                Prebound::bind_here(group, listen, port)
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("socket thread panicked")))
        })
    }

    /// Bind in the calling thread's network namespace.
    pub fn bind_here(group: u16, listen: &[IpAddr], port: u16) -> std::io::Result<Prebound> {
        let nflog = NflogSocket::bind(group)?;
        let dns = listen
            .iter()
            .map(|addr| {
                let at = SocketAddr::new(*addr, port);
                Ok((UdpSocket::bind(at)?, TcpListener::bind(at)?))
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Prebound { nflog, dns })
    }

    /// The descriptors in hand-over order, each moved to a number of at least 64
    /// (close-on-exec: [`Prebound::install`] opens them to the one child that takes them).
    pub fn into_parked_fds(self) -> std::io::Result<Vec<OwnedFd>> {
        let mut fds: Vec<OwnedFd> = vec![self.nflog.into_fd()];
        for (udp, tcp) in self.dns {
            fds.push(udp.into());
            fds.push(tcp.into());
        }
        fds.into_iter()
            .map(|fd| {
                // SAFETY: F_DUPFD_CLOEXEC on a valid descriptor; the copy is owned below.
                let parked =
                    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, PARKED_FROM) };
                if parked < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: a fresh descriptor nobody else owns.
                Ok(unsafe { OwnedFd::from_raw_fd(parked) })
            })
            .collect()
    }

    /// The value of [`INHERITED_ENV`] for these parked descriptors.
    pub fn env_value(parked: &[RawFd]) -> String {
        parked
            .iter()
            .map(|fd| fd.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// In the forked child, before exec: keep the parked descriptors open across exec.
    /// Async-signal-safe (fcntl only).
    pub fn install(parked: &[RawFd]) -> std::io::Result<()> {
        for fd in parked {
            // SAFETY: F_SETFD on a descriptor open in this process.
            if unsafe { libc::fcntl(*fd, libc::F_SETFD, 0) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// In the resolver: the sockets the hook handed over, if it did (`listen` addresses in
    /// the order they were bound).
    pub fn inherited(listen: usize) -> std::io::Result<Option<Prebound>> {
        let Some(list) = std::env::var_os(INHERITED_ENV) else {
            return Ok(None);
        };
        // Not passed on to anything this process starts.
        std::env::remove_var(INHERITED_ENV);
        let expected = 1 + 2 * listen;
        let fds: Vec<RawFd> = list
            .to_str()
            .unwrap_or_default()
            .split(',')
            .filter_map(|fd| fd.parse().ok())
            .filter(|fd| *fd >= PARKED_FROM && is_socket(*fd))
            .collect();
        if fds.len() != expected {
            return Err(std::io::Error::other(format!(
                "{INHERITED_ENV}={list:?} does not name {expected} open sockets"
            )));
        }
        // SAFETY: the hook opened exactly these sockets for this process, which owns them
        // from here on; they are made close-on-exec again.
        let take = |i: usize| unsafe {
            libc::fcntl(fds[i], libc::F_SETFD, libc::FD_CLOEXEC);
            OwnedFd::from_raw_fd(fds[i])
        };
        let nflog = NflogSocket::from_fd(take(0));
        let dns = (0..listen)
            .map(|i| {
                (
                    UdpSocket::from(take(1 + 2 * i)),
                    TcpListener::from(take(2 + 2 * i)),
                )
            })
            .collect();
        Ok(Some(Prebound { nflog, dns }))
    }
}

fn is_socket(fd: RawFd) -> bool {
    // SAFETY: fstat on a descriptor number; an unopened one is EBADF.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
    }
}

/// Start `program` with `args` inside the network namespace `ns`, in a session of its own,
/// with stdin and stdout on /dev/null, stderr on `log` and the `parked` descriptors open
/// (named in [`INHERITED_ENV`]); return its PID without waiting for anything.
///
/// `std::process::Command` waits until the child has exec'd, and on a loaded machine a
/// freshly forked child may wait a scheduler period or more before it runs: milliseconds
/// the container's start need not spend. Here the child does only async-signal-safe calls
/// (setns, setsid, dup2, fcntl, execve) and reports an exec failure to `log` before it exits;
/// a resolver that never runs answers nothing (fail closed).
pub fn spawn_detached(
    program: &Path,
    args: &[String],
    ns: &NsFiles,
    log: &std::fs::File,
    parked: &[RawFd],
) -> std::io::Result<u32> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let cstr = |b: &[u8]| CString::new(b).map_err(std::io::Error::other);
    let path = cstr(program.as_os_str().as_bytes())?;
    let argv: Vec<CString> = std::iter::once(Ok(path.clone()))
        .chain(args.iter().map(|a| cstr(a.as_bytes())))
        .collect::<std::io::Result<_>>()?;
    let mut envp: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != INHERITED_ENV)
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            cstr(&kv)
        })
        .collect::<std::io::Result<_>>()?;
    if !parked.is_empty() {
        envp.push(cstr(
            format!("{INHERITED_ENV}={}", Prebound::env_value(parked)).as_bytes(),
        )?);
    }
    let ptrs = |v: &[CString]| {
        v.iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect::<Vec<_>>()
    };
    let (argv_p, envp_p) = (ptrs(&argv), ptrs(&envp));
    let null = std::fs::File::open("/dev/null")?;
    let (null_fd, log_fd) = (null.as_raw_fd(), log.as_raw_fd());
    const EXEC_FAILED: &[u8] =
        b"terok-shield: the hook could not start the resolver (exec failed)\n";
    // SAFETY: fork(2); the child makes only async-signal-safe calls on memory prepared above
    // and leaves through execve or _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            let ok = libc::dup2(null_fd, 0) >= 0
                && libc::dup2(null_fd, 1) >= 0
                && libc::dup2(log_fd, 2) >= 0
                && ns.enter().is_ok()
                && libc::setsid() >= 0
                && Prebound::install(parked).is_ok();
            if ok {
                libc::execve(path.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr());
            }
            libc::write(2, EXEC_FAILED.as_ptr().cast(), EXEC_FAILED.len());
            libc::_exit(127);
        }
    }
    Ok(pid as u32)
}
