//! Clients run inside the container namespace: a blocking TCP connect that reads the banner,
//! and a connected UDP socket that sends one datagram and waits for the echo.

use std::fmt;
use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use super::netns::run_in;

/// How long a probe may take in total before the test calls it hung. Blocking connects are
/// bounded by `tcp_syn_retries=1` in the container netns (about 3 s), so this always fires
/// after the kernel gave up.
pub const PROBE_LIMIT: Duration = Duration::from_secs(6);
/// How long a UDP client waits for its echo.
pub const UDP_WAIT: Duration = Duration::from_millis(1500);
/// How long a failed UDP send waits for the ICMP error to land on the socket.
pub const ICMP_WAIT: Duration = Duration::from_millis(500);

/// Where a probe failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Connect,
    Send,
    Recv,
}

/// What a probe saw.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The world answered; `elapsed` covers connect (TCP) or send+recv (UDP).
    Reply { text: String, elapsed: Duration },
    /// A socket call failed with `errno` after `elapsed`.
    Error {
        stage: Stage,
        errno: Option<i32>,
        message: String,
        elapsed: Duration,
        /// A further error queued on the socket (`SO_ERROR`, e.g. from an ICMP error) and
        /// when it was seen.
        socket_error: Option<(i32, Duration)>,
    },
    /// No answer and no error within the wait (a silent drop).
    Silent { elapsed: Duration },
    /// The probe thread did not finish (harness failure).
    Harness(String),
}

impl Outcome {
    pub fn elapsed(&self) -> Option<Duration> {
        match self {
            Outcome::Reply { elapsed, .. }
            | Outcome::Error { elapsed, .. }
            | Outcome::Silent { elapsed } => Some(*elapsed),
            Outcome::Harness(_) => None,
        }
    }

    pub fn errno(&self) -> Option<i32> {
        match self {
            Outcome::Error { errno, .. } => *errno,
            _ => None,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Reply { text, elapsed } => {
                write!(f, "reply after {elapsed:?}: {:?}", text.lines().last())
            }
            Outcome::Error {
                stage,
                errno,
                message,
                elapsed,
                socket_error,
            } => {
                write!(
                    f,
                    "{stage:?} failed after {elapsed:?}: {message} (errno {})",
                    errno.map_or("?".into(), |e| format!("{e} = {}", errno_name(e)))
                )?;
                if let Some((e, at)) = socket_error {
                    write!(f, "; then socket error {} after {at:?}", errno_name(*e))?;
                }
                Ok(())
            }
            Outcome::Silent { elapsed } => write!(f, "no answer within {elapsed:?}"),
            Outcome::Harness(e) => write!(f, "probe failed to run: {e}"),
        }
    }
}

/// Symbolic names of the errnos these tests meet.
pub fn errno_name(e: i32) -> &'static str {
    use rustix::io::Errno;
    for (errno, name) in [
        (Errno::CONNREFUSED, "ECONNREFUSED"),
        (Errno::HOSTUNREACH, "EHOSTUNREACH"),
        (Errno::NETUNREACH, "ENETUNREACH"),
        (Errno::ACCESS, "EACCES"),
        (Errno::PERM, "EPERM"),
        (Errno::TIMEDOUT, "ETIMEDOUT"),
        (Errno::AGAIN, "EAGAIN"),
        (Errno::CONNRESET, "ECONNRESET"),
    ] {
        if errno.raw_os_error() == e {
            return name;
        }
    }
    "other"
}

fn error(stage: Stage, e: &std::io::Error, elapsed: Duration) -> Outcome {
    Outcome::Error {
        stage,
        errno: e.raw_os_error(),
        message: e.to_string(),
        elapsed,
        socket_error: None,
    }
}

/// Blocking TCP connect to `dst` from inside `ns`; on success read the banner to EOF.
pub fn tcp(ns: &Path, dst: SocketAddr) -> Outcome {
    run_in(ns, PROBE_LIMIT, move || {
        let start = Instant::now();
        let mut stream = match TcpStream::connect(dst) {
            Ok(s) => s,
            Err(e) => return error(Stage::Connect, &e, start.elapsed()),
        };
        let elapsed = start.elapsed();
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut text = Vec::new();
        match stream.by_ref().take(4096).read_to_end(&mut text) {
            Ok(_) => Outcome::Reply {
                text: String::from_utf8_lossy(&text).into_owned(),
                elapsed,
            },
            Err(e) => error(Stage::Recv, &e, start.elapsed()),
        }
    })
    .unwrap_or_else(Outcome::Harness)
}

/// Connected UDP socket to `dst` from inside `ns`: send `payload`, wait for one datagram.
pub fn udp(ns: &Path, dst: SocketAddr, payload: String) -> Outcome {
    run_in(ns, PROBE_LIMIT, move || {
        let bind: SocketAddr = match dst.ip() {
            IpAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
            IpAddr::V6(_) => "[::]:0".parse().unwrap(),
        };
        let start = Instant::now();
        let sock = match UdpSocket::bind(bind).and_then(|s| s.connect(dst).map(|()| s)) {
            Ok(s) => s,
            Err(e) => return error(Stage::Connect, &e, start.elapsed()),
        };
        let _ = sock.set_read_timeout(Some(UDP_WAIT));
        let start = Instant::now();
        if let Err(e) = sock.send(payload.as_bytes()) {
            let elapsed = start.elapsed();
            // A local reject fails the send itself (the netfilter verdict) and then queues
            // the ICMP error it generated on the socket: wait briefly for that one too.
            let mut socket_error = None;
            while start.elapsed() < ICMP_WAIT {
                if let Ok(Some(err)) = sock.take_error() {
                    socket_error = err.raw_os_error().map(|n| (n, start.elapsed()));
                    break;
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            return Outcome::Error {
                stage: Stage::Send,
                errno: e.raw_os_error(),
                message: e.to_string(),
                elapsed,
                socket_error,
            };
        }
        let mut buf = [0u8; 2048];
        match sock.recv(&mut buf) {
            Ok(n) => Outcome::Reply {
                text: String::from_utf8_lossy(&buf[..n]).into_owned(),
                elapsed: start.elapsed(),
            },
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Outcome::Silent {
                    elapsed: start.elapsed(),
                }
            }
            Err(e) => error(Stage::Recv, &e, start.elapsed()),
        }
    })
    .unwrap_or_else(Outcome::Harness)
}
