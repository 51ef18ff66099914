//! The dnsmasq tier's supervisor: runs inside the container's namespaces (started by the
//! hook as `internal-resolver`, like the builtin resolver) and owns one dnsmasq.
//!
//! It writes the servers file from the bundle, starts dnsmasq, reports ready only once
//! dnsmasq answers on 127.0.0.1:53, and then waits for signals:
//! - SIGHUP (sent by `allow`/`deny`/`up`/`down`/`block`): rewrite the servers file from the
//!   saved bundle and pass the SIGHUP on, so dnsmasq re-reads it;
//! - SIGTERM (poststop): stop dnsmasq, then exit;
//! - dnsmasq's death: bind its query port at once, so no workload socket can take the port
//!   the ruleset trusts for DNS, write the failure marker that `status` reports, and stay
//!   until SIGTERM. DNS then fails closed: nothing answers on loopback.
//!
//! It also runs the container's event reader ([`crate::effects::events`]) on a thread.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::core::bundle::ContainerName;
use crate::core::dns_policy::DnsPolicy;
use crate::core::dnsmasq::{
    arguments, is_per_question_line, learns_address_wide, parse_log_line, servers_file, Launch,
    LogEvent, QUERY_PORT,
};
use crate::core::learned::LearnedRecord;
use crate::core::target::DomainName;
use crate::effects::learned_log::{LearnedLog, LEARNED_FILE};
use crate::effects::nft::find_program;
use crate::effects::state::{load_bundle, write_atomic};

/// The servers file dnsmasq re-reads on SIGHUP, in the bundle directory.
pub const SERVERS_FILE: &str = "dnsmasq.servers";
/// Present while the container's dnsmasq is dead: `status` reports `error`.
pub const FAILED_MARKER: &str = "resolver.failed";

/// How long dnsmasq may take to answer its first question.
const READY_WITHIN: Duration = Duration::from_secs(4);

/// Where dnsmasq is, for `prepare` (early, clear error) and the supervisor.
pub fn locate() -> anyhow::Result<PathBuf> {
    let path = find_program("dnsmasq", &["/usr/sbin/dnsmasq", "/usr/local/sbin/dnsmasq"])
        .context("dnsmasq not found: install it (Debian: apt-get install dnsmasq-base) or use dns.tier builtin")?;
    let out = Command::new(&path)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", path.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !text.split_whitespace().any(|w| w == "nftset") {
        bail!(
            "{} was built without nftset support, which the dnsmasq DNS tier needs: install a dnsmasq built with it (2.87 or later) or use dns.tier builtin",
            path.display()
        );
    }
    Ok(path)
}

/// Write the servers file for `policy`.
fn write_servers(dir: &Path, policy: &DnsPolicy, upstreams: &[IpAddr]) -> anyhow::Result<()> {
    let text = servers_file(policy, upstreams)?;
    write_atomic(&dir.join(SERVERS_FILE), text.as_bytes())?;
    Ok(())
}

/// Block the signals this process handles with `sigwait`, before any child exists.
fn block_signals() -> io::Result<libc::sigset_t> {
    // SAFETY: plain libc signal-set calls on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGHUP, libc::SIGTERM, libc::SIGINT, libc::SIGCHLD] {
            libc::sigaddset(&mut set, sig);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(set)
    }
}

fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: `set` is initialised; sigwait writes one int.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

fn spawn(program: &Path, dir: &Path, policy: &DnsPolicy) -> anyhow::Result<Child> {
    use std::os::unix::process::CommandExt;
    let servers = dir.join(SERVERS_FILE);
    let servers = servers.to_str().context("bundle path is not UTF-8")?;
    let mut cmd = Command::new(program);
    cmd.args(arguments(
        &Launch {
            servers_file: servers,
        },
        policy,
    ))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    // SAFETY: prctl(2) is async-signal-safe. dnsmasq must not outlive its supervisor.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The supervisor blocks these for sigwait; dnsmasq needs them delivered.
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("cannot start {}", program.display()))
}

/// Questions remembered while their answers are awaited; older ones are dropped.
const QUESTIONS_KEPT: usize = 4096;

/// Turns dnsmasq's numbered log lines into learned.jsonl records (which name brought which
/// address), the same file and format the builtin resolver writes, so `deny NAME` removes
/// exactly that name's addresses in this tier too.
struct Learner {
    log: LearnedLog,
    at_start: DnsPolicy,
    lifetime: u64,
    questions: std::collections::HashMap<u64, DomainName>,
    /// When each (name, address) record last written runs out, to skip repeats.
    recorded: std::collections::HashMap<(DomainName, IpAddr), u64>,
}

impl Learner {
    fn new(dir: &Path, at_start: DnsPolicy, lifetime: u32) -> Learner {
        let path = dir.join(LEARNED_FILE);
        let _ = std::fs::remove_file(&path); // a new dnsmasq starts with empty sets
        Learner {
            log: LearnedLog::new(path),
            at_start,
            lifetime: u64::from(lifetime),
            questions: Default::default(),
            recorded: Default::default(),
        }
    }

    fn on_line(&mut self, line: &str) {
        match parse_log_line(line) {
            Some(LogEvent::Query { serial, name }) => {
                if self.questions.len() >= QUESTIONS_KEPT {
                    self.questions.clear();
                }
                self.questions.insert(serial, name);
            }
            Some(LogEvent::Reply { serial, addr }) => {
                if let Some(name) = self.questions.get(&serial).cloned() {
                    if learns_address_wide(&self.at_start, &name) {
                        self.record(name, addr);
                    }
                }
            }
            None => {}
        }
    }

    fn record(&mut self, domain: DomainName, addr: IpAddr) {
        let now = crate::effects::audit::unix_secs();
        let until = now + self.lifetime;
        let key = (domain.clone(), addr);
        // A record still good for more than half the lifetime needs no repeat.
        if self
            .recorded
            .get(&key)
            .is_some_and(|u| *u > now + self.lifetime / 2)
        {
            return;
        }
        if self.recorded.len() >= QUESTIONS_KEPT {
            self.recorded.retain(|_, u| *u > now);
        }
        self.recorded.insert(key, until);
        let rec = LearnedRecord {
            domain,
            addr,
            scope: None,
            until,
        };
        if let Ok(mut line) = serde_json::to_vec(&rec) {
            line.push(b'\n');
            self.log.append(&line, now);
        }
    }
}

/// Read dnsmasq's log: attribution lines feed the learner, everything else goes to our
/// stderr (resolver.log).
fn follow_log(child: &mut Child, mut learner: Learner) {
    use std::io::BufRead;
    let Some(err) = child.stderr.take() else {
        return;
    };
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            if is_per_question_line(&line) {
                learner.on_line(&line);
            } else {
                eprintln!("{line}");
            }
        }
    });
}

/// A DNS question (A record of a reserved name) to see whether dnsmasq answers.
fn probe_query() -> Vec<u8> {
    let name = hickory_proto::rr::Name::from_ascii("readiness-probe.terok-shield.invalid.")
        .expect("valid name");
    crate::effects::dns_client::query_message(0x7e5d, &name, hickory_proto::rr::RecordType::A)
        .to_vec()
        .expect("a fixed question encodes")
}

/// Wait until dnsmasq answers on loopback (any answer, REFUSED included), or it dies.
fn wait_ready(child: &mut Child) -> anyhow::Result<()> {
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    let query = probe_query();
    let deadline = Instant::now() + READY_WITHIN;
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            bail!("dnsmasq exited during start-up ({status}); see resolver.log");
        }
        let _ = sock.send_to(&query, (Ipv4Addr::LOCALHOST, 53));
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if n >= 2 && buf[..2] == query[..2] {
                return Ok(());
            }
        }
    }
    bail!("dnsmasq did not answer within {READY_WITHIN:?}; see resolver.log")
}

/// Hold the query port on every address family so no workload socket can send from it.
fn hold_query_port() -> Vec<UdpSocket> {
    [
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, QUERY_PORT)),
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, QUERY_PORT)),
    ]
    .into_iter()
    .filter_map(|a| UdpSocket::bind(a).ok())
    .collect()
}

/// After dnsmasq died: re-apply the container's policy without the query-port rule, so DNS
/// cannot leave even if a workload socket won the race for the port. We are inside the
/// container's namespaces already; the bundle lock keeps live commands out meanwhile. The next
/// live command re-applies the full policy, whose port is then held by this process.
fn close_dns_port(dir: &Path, name: &ContainerName) -> anyhow::Result<()> {
    let _lock = crate::effects::state::lock_dir(dir)?;
    let bundle = load_bundle(dir, name)?;
    let runtime =
        crate::effects::state::read_runtime(dir)?.context("the container has no runtime record")?;
    let mut policy = bundle.policy(&runtime.facts());
    policy.resolver_port = None;
    crate::effects::firewall::apply(&crate::effects::nft::Nft::locate()?, &policy)?;
    Ok(())
}

/// Run the supervisor: start dnsmasq, call `ready` once it answers, then handle signals until
/// SIGTERM.
pub fn supervise(
    dir: &Path,
    name: &ContainerName,
    upstreams: &[IpAddr],
    ready: impl FnOnce() -> io::Result<()>,
) -> anyhow::Result<()> {
    let program = locate()?;
    let _ = std::fs::remove_file(dir.join(FAILED_MARKER));
    let bundle = load_bundle(dir, name)?;
    let at_start = DnsPolicy::from_bundle(&bundle);
    write_servers(dir, &at_start, upstreams)?;
    let signals = block_signals()?;
    // After block_signals: the reader's thread inherits the mask, so sigwait below still
    // gets every signal.
    let (reader, _no_dns_events) = crate::effects::events::EventReader::bind(
        crate::effects::events::Settings::from_bundle(dir, &bundle),
    )
    .context("cannot read NFLOG")?;
    reader.spawn().context("cannot start the event reader")?;
    let mut child = spawn(&program, dir, &at_start)?;
    follow_log(
        &mut child,
        Learner::new(dir, at_start, bundle.ttl_bounds[1]),
    );
    if let Err(e) = wait_ready(&mut child) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    ready()?;
    let mut alive = true;
    let mut _held = Vec::new();
    loop {
        match wait_signal(&signals) {
            libc::SIGHUP if alive => match load_bundle(dir, name)
                .map_err(anyhow::Error::from)
                .and_then(|b| write_servers(dir, &DnsPolicy::from_bundle(&b), upstreams))
            {
                Ok(()) => {
                    // SAFETY: signalling our own child, which we have not reaped.
                    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
                }
                // Keep the last good servers file: it never allows more than was saved.
                Err(e) => eprintln!("terok-shield: cannot rewrite the dnsmasq servers: {e:#}"),
            },
            libc::SIGCHLD if alive && child.try_wait().ok().flatten().is_some() => {
                alive = false;
                _held = hold_query_port();
                let _ = write_atomic(&dir.join(FAILED_MARKER), b"dnsmasq exited\n");
                let closed = close_dns_port(dir, name);
                eprintln!(
                    "terok-shield: dnsmasq exited; DNS now fails closed (query port held on {} sockets; firewall: {})",
                    _held.len(),
                    match &closed {
                        Ok(()) => "port rule removed".to_string(),
                        Err(e) => format!("could not remove the port rule: {e:#}"),
                    }
                );
            }
            libc::SIGTERM | libc::SIGINT => {
                if alive {
                    // SAFETY: signalling our own child, which we have not reaped.
                    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                    let _ = child.wait();
                }
                return Ok(());
            }
            _ => {}
        }
    }
}
