//! End-to-end: operating the shield from its events, rootless, with real packets. `watch`
//! and `logs -f` show refused TCP connects, UDP datagrams and DNS questions as they happen
//! (within 1 s of the event's own timestamp); `clearance` allows, saves and denies refused
//! destinations, driven by a pipe and by a terminal (tmux); `learn` turns a session into a
//! profile, and after `down` lists what the workload used. Needs root and
//! scripts/podman-env.sh (see docs/testing-e2e.md); the tmux test needs tmux.

#[macro_use]
mod common;
use common::e2e;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use e2e::world::*;
use e2e::{dns_config, is_blocked, udp_from_container, E2e};

/// How long a test waits for one expected line (generous: the 1 s check is on the times).
const LINE_WAIT: Duration = Duration::from_secs(15);
/// The bound from an event's timestamp to `watch` printing it.
const WATCH_LATENCY: Duration = Duration::from_secs(1);

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// Unix ms of the shield's own timestamps (`2026-11-28T13:09:24.695Z`).
fn ts_ms(ts: &str) -> u128 {
    let n = |r: std::ops::Range<usize>| ts[r].parse::<i64>().unwrap();
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    let (y2, m2) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs = days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19);
    (secs * 1000 + n(20..23)) as u128
}

/// A long-running `terok-shield` command of the test user, its output read line by line
/// (each line stamped with the time it arrived). Killed, with everything it started, on drop.
struct Stream {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<(String, u128)>,
    seen: Vec<String>,
}

impl Stream {
    fn start(h: &E2e, args: &[&str]) -> Stream {
        let mut child = Command::new(&h.bin)
            .args(args)
            .env_clear()
            .env("HOME", &h.user.home)
            .env("XDG_RUNTIME_DIR", h.user.runtime_dir())
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LANG", "C.UTF-8")
            .current_dir("/")
            .uid(h.user.uid)
            .gid(h.user.gid)
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start terok-shield {args:?}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((line, now_ms())).is_err() {
                    break;
                }
            }
        });
        Stream {
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first new line matching `pred` within `limit`, and when it arrived.
    fn next_matching(
        &mut self,
        limit: Duration,
        pred: &impl Fn(&str) -> bool,
    ) -> Result<(String, u128), RecvTimeoutError> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (line, at) = self.lines.recv_timeout(left)?;
            self.seen.push(line.clone());
            if pred(&line) {
                return Ok((line, at));
            }
        }
    }

    /// The first new line matching `pred` and when it arrived (bounded wait).
    #[track_caller]
    fn expect(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> (String, u128) {
        match self.next_matching(LINE_WAIT, &pred) {
            Ok(found) => found,
            Err(RecvTimeoutError::Timeout) => {
                panic!(
                    "no line with {what} within {LINE_WAIT:?}; lines: {:#?}",
                    self.seen
                )
            }
            Err(RecvTimeoutError::Disconnected) => {
                panic!("output ended without {what}; lines: {:#?}", self.seen)
            }
        }
    }

    /// A JSON line matching `pred`, checked to arrive within [`WATCH_LATENCY`] of its `ts`.
    #[track_caller]
    fn expect_record(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> (Value, u128) {
        let (line, at) = self.expect(what, |l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| pred(&v))
        });
        let record: Value = serde_json::from_str(&line).unwrap();
        let latency = at.saturating_sub(ts_ms(record["ts"].as_str().unwrap()));
        (record, latency)
    }

    fn answer(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    fn close_input(&mut self) {
        self.stdin = None;
    }

    /// Send `signal` to the command itself.
    fn signal(&self, signal: i32) {
        // SAFETY: signalling the one process this test started, by its id.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }

    /// Wait (bounded) for the command to end on its own.
    #[track_caller]
    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Whatever it printed last.
                while let Ok((line, _)) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {limit:?}; lines: {:#?}",
                self.seen
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: the process group this test started (process_group(0) above).
            unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

/// `nc HOST PORT` in the container: the banner, or what nc said.
fn connect(h: &E2e, name: &str, host: &str, port: u16) -> String {
    h.exec(
        name,
        &format!("o=$(timeout 5 nc {host} {port} </dev/null 2>&1); echo \"rc=$? $o\""),
    )
    .stdout
}

/// Look a name up through the container's resolver; how many answers carry `addr`.
fn lookup(h: &E2e, name: &str, qname: &str, addr: &str) -> usize {
    let out = h.exec(
        name,
        &format!("echo \"N=$(timeout 5 nslookup {qname} 2>&1 | grep -c {addr})\""),
    );
    out.stdout
        .trim()
        .strip_prefix("N=")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("nslookup output: {out}"))
}

#[test]
fn watch_and_logs_follow_show_refusals_within_a_second_and_end_cleanly() {
    let mut h = e2e!();
    h.set_config(&dns_config("builtin", ""));
    // Port-scoped: the name's address opens on 443/tcp only, so port 80 is refused.
    h.profile("e2e-observe", "svc.e2e.test:443/tcp\n");
    let name = h.name("observe-watch");
    // Started before the container exists: containers appearing later are followed.
    let mut all = Stream::start(&h, &["watch"]);
    h.run_detached(&name, "e2e-observe").expect_ok();
    let mut one = Stream::start(&h, &["watch", &name, "--json"]);
    let mut follow = Stream::start(&h, &["logs", "-f", "--container", &name, "--refused"]);
    // `watch NAME` skips what was logged before it started: refuse datagrams to fresh ports
    // until it shows one, so that it surely follows before the events under test.
    let ready = (1000..1020u16).any(|port| {
        assert!(udp_from_container(&h, &name, BLOCKED4, port));
        one.next_matching(Duration::from_millis(500), &|l| {
            l.contains(&format!("\"port\":{port}"))
        })
        .is_ok()
    });
    assert!(
        ready,
        "`watch {name} --json` never showed a warm-up event: {:#?}",
        one.seen
    );
    assert_eq!(lookup(&h, &name, "svc.e2e.test", NAMED4), 1);
    let started = now_ms();

    let out = connect(&h, &name, NAMED4, 80);
    assert!(out.contains("rc=1"), "{out}");
    let (tcp, tcp_latency) = one.expect_record("the refused TCP connect", |r| {
        is_blocked(r, NAMED4, "tcp", 80)
    });
    assert_eq!(tcp["detail"]["name"], "svc.e2e.test", "{tcp}");
    assert_eq!(tcp["detail"]["verdict"], "denied", "{tcp}");
    assert!(
        udp_from_container(&h, &name, BLOCKED4, 9),
        "UDP was not refused"
    );
    let (udp, udp_latency) = one.expect_record("the refused UDP datagram", |r| {
        is_blocked(r, BLOCKED4, "udp", 9)
    });
    assert!(udp["detail"].get("name").is_none(), "{udp}");
    assert_eq!(lookup(&h, &name, "pair.e2e.test", PAIR4), 0);
    let (dns, dns_latency) = one.expect_record("the refused DNS question", |r| {
        r["event"] == "dns_refused" && r["detail"]["name"] == "pair.e2e.test"
    });
    assert_eq!(dns["detail"]["reason"], "not_allowlisted", "{dns}");
    eprintln!(
        "E2E WATCH latency_ms tcp={tcp_latency} udp={udp_latency} dns={dns_latency} (from the event's ts to the line's arrival)"
    );
    for (what, latency) in [
        ("tcp", tcp_latency),
        ("udp", udp_latency),
        ("dns", dns_latency),
    ] {
        assert!(
            latency <= WATCH_LATENCY.as_millis(),
            "{what}: `watch --json` printed the event {latency} ms after its timestamp"
        );
    }
    assert!(
        ts_ms(tcp["ts"].as_str().unwrap()) + 5_000 >= started,
        "an old event: {tcp}"
    );

    // The readable stream of every container, with the name where it applies.
    all.expect("the readable TCP line", |l| {
        l.contains(&format!("  {name}  denied "))
            && l.contains(&format!("svc.e2e.test ({NAMED4})  80/tcp  x1"))
    });
    all.expect("the readable UDP line", |l| {
        l.contains(&format!("  {name}  denied ")) && l.contains(&format!("{BLOCKED4}  9/udp"))
    });
    all.expect("the readable DNS line", |l| {
        l.contains(&format!("  {name}  dns_refused  pair.e2e.test  dns/"))
    });

    // `logs -f --refused` follows the same events.
    for (what, pred) in [
        (
            "tcp",
            Box::new(|r: &Value| is_blocked(r, NAMED4, "tcp", 80)) as Box<dyn Fn(&Value) -> bool>,
        ),
        (
            "udp",
            Box::new(|r: &Value| is_blocked(r, BLOCKED4, "udp", 9)),
        ),
        (
            "dns",
            Box::new(|r: &Value| {
                r["event"] == "dns_refused" && r["detail"]["name"] == "pair.e2e.test"
            }),
        ),
    ] {
        follow.expect_record(what, pred);
    }
    // And plain `logs` has them too, with the name where it applies.
    let records = h.audit(&name);
    assert!(records
        .iter()
        .any(|r| is_blocked(r, NAMED4, "tcp", 80) && r["detail"]["name"] == "svc.e2e.test"));
    assert!(records.iter().any(|r| is_blocked(r, BLOCKED4, "udp", 9)));
    let refused = h
        .shield(&[
            "logs",
            "--container",
            &name,
            "--event",
            "dns_refused",
            "--since",
            "10m",
        ])
        .expect_ok();
    assert!(refused.stdout.contains("pair.e2e.test"), "{refused}");
    assert!(
        refused
            .stdout
            .lines()
            .all(|l| l.contains("\"dns_refused\"")),
        "{refused}"
    );

    // Ctrl-C and SIGTERM end the followers cleanly; `watch NAME` ends when NAME stops.
    follow.signal(libc::SIGINT);
    let status = follow.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "logs -f after SIGINT: {status:?}");
    h.podman(&["stop", "-t", "0", &name]).expect_ok();
    let status = one.wait_exit(Duration::from_secs(10));
    assert!(
        status.success(),
        "watch NAME after the container stopped: {status:?}"
    );
    all.signal(libc::SIGTERM);
    let status = all.wait_exit(Duration::from_secs(5));
    eprintln!("E2E WATCH lines:\n{}", all.seen.join("\n"));
    assert!(
        status.success() && status.signal().is_none(),
        "watch after SIGTERM: {status:?}"
    );
    h.podman(&["rm", "-f", &name]).expect_ok();
}

#[test]
fn clearance_driven_by_a_pipe_allows_saves_and_denies() {
    let mut h = e2e!();
    h.set_config(&dns_config("builtin", ""));
    h.profile("e2e-clearance", &format!("{ALLOWED4}\n"));
    let name = h.name("observe-pipe");
    // `s` saves into a profile named after the container: removed again at the end.
    let saved = h.user.profiles_dir().join(format!("{name}.txt"));
    h.save(&saved);
    h.run_detached(&name, "e2e-clearance").expect_ok();
    let mut c = Stream::start(&h, &["clearance", &name]);
    c.expect("the greeting", |l| l.starts_with("clearance for "));

    // A refused DNS question, allowed: the name then resolves and its address is reached.
    assert_eq!(lookup(&h, &name, "pair.e2e.test", PAIR4), 0);
    c.expect("the prompt for pair.e2e.test", |l| {
        l.starts_with("pair.e2e.test (DNS ") && l.contains("[a]llow")
    });
    c.answer("a");
    c.expect("the allow", |l| l.starts_with("Allowed pair.e2e.test"));
    assert_eq!(lookup(&h, &name, "pair.e2e.test", PAIR4), 1);
    let out = connect(&h, &name, PAIR4, 80);
    assert!(
        out.contains(&format!("terok-e2e-world {PAIR4} 80")),
        "{out}"
    );

    // A refused address without a name, denied: it persists in the bundle.
    let out = connect(&h, &name, BLOCKED4, 80);
    assert!(out.contains("rc=1"), "{out}");
    c.expect("the prompt for the address", |l| {
        l.starts_with(&format!("{BLOCKED4} ({BLOCKED4}, 80/tcp, denied)"))
    });
    c.answer("x");
    c.expect("the typo's explanation", |l| l.contains("is not an answer"));
    c.answer("d");
    c.expect("the deny", |l| l.starts_with(&format!("Denied {BLOCKED4}")));
    let state = h.state_json(&name);
    assert!(
        state["live_deny"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == BLOCKED4),
        "{state}"
    );

    // Allowed and saved: in the profile file, and the profile in the container's bundle.
    let out = connect(&h, &name, REUSE_A, 80);
    assert!(out.contains("rc=1"), "{out}");
    c.expect("the prompt for the saved address", |l| {
        l.starts_with(REUSE_A)
    });
    c.answer("s");
    c.expect("the saving allow", |l| {
        l.starts_with(&format!("Allowed {REUSE_A}"))
            && l.contains(&format!("saved it in profile {name}"))
    });
    let profile = h.read(&saved);
    assert!(profile.lines().any(|l| l.starts_with(REUSE_A)), "{profile}");
    let state = h.state_json(&name);
    assert!(
        state["profiles"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == name.as_str()),
        "{state}"
    );
    assert!(
        state["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == REUSE_A),
        "{state}"
    );
    let out = connect(&h, &name, REUSE_A, 80);
    assert!(
        out.contains(&format!("terok-e2e-world {REUSE_A} 80")),
        "{out}"
    );
    // The audit log records the answers as the allow and deny commands do.
    let allows = h.events(&name, "allow");
    assert!(
        allows
            .iter()
            .any(|r| r["detail"]["target"] == "pair.e2e.test"),
        "{allows:?}"
    );
    assert!(
        allows
            .iter()
            .any(|r| r["detail"]["profile"] == name.as_str()),
        "{allows:?}"
    );

    // End of input ends the session.
    c.close_input();
    let status = c.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}: {:#?}", c.seen);
    eprintln!("E2E CLEARANCE lines:\n{}", c.seen.join("\n"));
    assert!(
        c.seen
            .iter()
            .any(|l| l.contains("ended (its input ended): 2 allowed (1 saved), 1 denied")),
        "{:#?}",
        c.seen
    );
    h.podman(&["rm", "-f", &name]).expect_ok();
}

/// A tmux server of this test only (its own socket), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> e2e::cmd::Out {
        let mut full = vec!["-L", self.socket.as_str()];
        full.extend_from_slice(args);
        e2e::cmd::run_bounded("tmux", &full, Duration::from_secs(10))
    }

    fn pane(&self) -> String {
        self.run(&["capture-pane", "-p", "-J", "-t", "obs", "-S", "-200"])
            .stdout
    }

    /// Wait (bounded) until the pane shows a line matching `pred`.
    #[track_caller]
    fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + LINE_WAIT;
        loop {
            let pane = self.pane();
            if pane.lines().any(&pred) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the terminal never showed {what}:\n{pane}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = e2e::cmd::run(
            "tmux",
            &["-L", &self.socket, "kill-server"],
            Duration::from_secs(10),
        );
    }
}

#[test]
fn clearance_at_a_terminal_in_tmux() {
    let mut h = e2e!();
    let tmux_found = ["/usr/bin/tmux", "/bin/tmux"]
        .iter()
        .any(|p| Path::new(p).exists());
    if !tmux_found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "tmux is missing: apt-get install -y tmux"
        );
        eprintln!("SKIP clearance_at_a_terminal_in_tmux: needs tmux (apt-get install -y tmux)");
        return;
    }
    h.set_config(&dns_config("builtin", ""));
    h.profile("e2e-clearance-tty", &format!("{ALLOWED4}\n"));
    let name = h.name("observe-tty");
    h.run_detached(&name, "e2e-clearance-tty").expect_ok();
    let tmux = Tmux {
        socket: format!("terok-e2e-observe-{}", std::process::id()),
    };
    let home = format!("HOME={}", h.user.home.display());
    let runtime = format!("XDG_RUNTIME_DIR={}", h.user.runtime_dir());
    let bin = h.bin.display().to_string();
    // The pane stays after clearance ends, so its last lines can be read.
    tmux.run(&[
        "-f",
        "/dev/null",
        "start-server",
        ";",
        "set-option",
        "-g",
        "remain-on-exit",
        "on",
        ";",
        "new-session",
        "-d",
        "-s",
        "obs",
        "-x",
        "200",
        "-y",
        "50",
        "runuser",
        "-u",
        e2e::USER,
        "--",
        "env",
        "-i",
        &home,
        &runtime,
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG=C.UTF-8",
        &bin,
        "clearance",
        &name,
    ])
    .expect_ok();
    tmux.wait_for("the greeting", |l| l.starts_with("clearance for "));

    let out = connect(&h, &name, BLOCKED4, 443);
    assert!(out.contains("rc=1"), "{out}");
    tmux.wait_for("the prompt", |l| {
        l.starts_with(&format!("{BLOCKED4} ({BLOCKED4}, 443/tcp"))
    });
    tmux.run(&["send-keys", "-t", "obs", "a", "Enter"])
        .expect_ok();
    tmux.wait_for("the allow", |l| {
        l.starts_with(&format!("Allowed {BLOCKED4}"))
    });
    let out = connect(&h, &name, BLOCKED4, 443);
    assert!(
        out.contains(&format!("terok-e2e-world {BLOCKED4} 443")),
        "{out}"
    );

    let out = connect(&h, &name, REUSE_B, 80);
    assert!(out.contains("rc=1"), "{out}");
    tmux.wait_for("the second prompt", |l| {
        l.starts_with(&format!("{REUSE_B} ("))
    });
    tmux.run(&["send-keys", "-t", "obs", "d", "Enter"])
        .expect_ok();
    tmux.wait_for("the deny", |l| l.starts_with(&format!("Denied {REUSE_B}")));
    let state = h.state_json(&name);
    assert!(
        state["live_deny"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == REUSE_B),
        "{state}"
    );

    // Typed with nothing waiting: said so, not kept for later.
    tmux.run(&["send-keys", "-t", "obs", "a", "Enter"])
        .expect_ok();
    tmux.wait_for("the note", |l| {
        l.contains("nothing is waiting for an answer yet")
    });
    tmux.run(&["send-keys", "-t", "obs", "C-c"]).expect_ok();
    tmux.wait_for("the end of the session", |l| {
        l.contains(
            "ended (it was interrupted): 1 allowed (0 saved), 1 denied, 0 ignored, 0 unanswered",
        )
    });
    h.podman(&["rm", "-f", &name]).expect_ok();
}

#[test]
fn learn_lists_refused_names_and_after_down_what_was_used() {
    let mut h = e2e!();
    h.set_config(&dns_config("builtin", ""));
    h.profile("e2e-learn", "svc.e2e.test:443/tcp\n");
    let name = h.name("observe-learn");
    h.run_detached(&name, "e2e-learn").expect_ok();
    assert_eq!(lookup(&h, &name, "svc.e2e.test", NAMED4), 1);
    let out = connect(&h, &name, NAMED4, 80);
    assert!(out.contains("rc=1"), "{out}");
    assert!(udp_from_container(&h, &name, BLOCKED4, 9));
    for qname in [
        "pair.e2e.test",
        "a.wild.e2e.test",
        "b.wild.e2e.test",
        "c.wild.e2e.test",
    ] {
        assert_eq!(lookup(&h, &name, qname, "198.51.100"), 0, "{qname}");
    }

    let want = ["svc.e2e.test", "pair.e2e.test", "*.wild.e2e.test", BLOCKED4];
    let learned = wait_learn(&h, &name, &[], &want);
    let entries = entry_lines(&learned);
    assert!(
        !entries.iter().any(|l| l.starts_with(NAMED4)),
        "an address with a known name is listed by its name:\n{learned}"
    );
    assert!(
        learned.contains("#   a.wild.e2e.test  1x") || learned.contains("#   a.wild.e2e.test  2x"),
        "{learned}"
    );
    // What learn prints is a profile the shield loads.
    h.profile("e2e-learned", &learned);
    h.shield(&["preview", "--profiles", "e2e-learned"])
        .expect_ok();

    // After `down`, the events say what the workload used: names where the resolver
    // answered them, addresses otherwise.
    let since = e2e_rfc3339(now_ms());
    h.shield(&["down", &name]).expect_ok();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(lookup(&h, &name, "dual.e2e.test", LIVE4), 1);
    let out = connect(&h, &name, LIVE4, 80);
    assert!(
        out.contains(&format!("terok-e2e-world {LIVE4} 80")),
        "{out}"
    );
    let out = connect(&h, &name, REUSE_A, 80);
    assert!(
        out.contains(&format!("terok-e2e-world {REUSE_A} 80")),
        "{out}"
    );
    let used = wait_learn(&h, &name, &["--since", &since], &["dual.e2e.test", REUSE_A]);
    assert!(used.contains("reached in down mode (bypass)"), "{used}");
    assert!(
        !entry_lines(&used)
            .iter()
            .any(|l| l.starts_with("pair.e2e.test")),
        "--since leaves out the earlier refusals:\n{used}"
    );
    h.podman(&["rm", "-f", &name]).expect_ok();
}

/// The entry lines (not comments) of a profile.
fn entry_lines(profile: &str) -> Vec<&str> {
    profile
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .collect()
}

/// `learn NAME EXTRA...`, repeated (bounded) until every entry in `want` is listed.
#[track_caller]
fn wait_learn(h: &E2e, name: &str, extra: &[&str], want: &[&str]) -> String {
    let deadline = Instant::now() + LINE_WAIT;
    loop {
        let mut args = vec!["learn", name];
        args.extend_from_slice(extra);
        let out = h.shield(&args).expect_ok();
        let entries: Vec<&str> = entry_lines(&out.stdout)
            .iter()
            .map(|l| l.split_whitespace().next().unwrap_or(""))
            .collect();
        if want.iter().all(|w| entries.contains(w)) {
            return out.stdout;
        }
        assert!(
            Instant::now() < deadline,
            "learn never listed all of {want:?}:\n{}",
            out.stdout
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Unix ms as the shield writes times (for `--since`).
fn e2e_rfc3339(ms: u128) -> String {
    terok_shield::core::audit::rfc3339_utc(ms)
}
