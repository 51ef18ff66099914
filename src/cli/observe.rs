//! `logs`, `watch`, `learn` and `clearance` (alias `simple-clearance`): operating a shield
//! from what it logged.
//!
//! What to show, how a line reads, which profile the events suggest and what an answer
//! means are all decided in the core (`core::observe`, `core::learn`, `core::clearance`);
//! following the logs is `effects::follow`. Clearance's answers run the `allow` and `deny`
//! commands themselves, as child processes: the very same code path, and each change in a
//! fresh process (applying a change can enter the container's namespaces, which this
//! long-running process must not).

use std::collections::VecDeque;
use std::io::{IsTerminal as _, Write as _};
use std::os::fd::AsFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::inspect::lookup;
use super::{print, ClearanceArgs, Context, LearnArgs, LogsArgs, WatchArgs};
use crate::core::audit::AuditRecord;
use crate::core::bundle::ContainerName;
use crate::core::clearance::{parse_answer, Answer, Clearance, Pending};
use crate::core::learn::{learn as learn_profile, LEARN_EVENTS};
use crate::core::observe::{
    parse_since, readable_line, RecordFilter, REFUSAL_EVENTS, TRAFFIC_EVENTS,
};
use crate::core::profile::ProfileName;
use crate::effects::audit::{self, unix_millis};
use crate::effects::follow::{LogFollower, StopSignals};
use crate::effects::procfs::is_same_process;
use crate::effects::state::{read_runtime, StateStore};

/// Longest sleep of a follow: a missed inotify event, or a container that died without its
/// `stop` line, is noticed within this.
const TICK: Duration = Duration::from_secs(1);

/// `--event`/`--refused` (or `defaults`) and `--since` as a filter.
fn record_filter(
    filter: &super::EventFilterArgs,
    defaults: &[&str],
    since: Option<&str>,
) -> anyhow::Result<RecordFilter> {
    let events: Vec<String> = if filter.refused {
        REFUSAL_EVENTS.iter().map(|e| e.to_string()).collect()
    } else if filter.event.is_empty() {
        defaults.iter().map(|e| e.to_string()).collect()
    } else {
        filter.event.clone()
    };
    let since = since
        .map(|s| parse_since(s, unix_millis() as u64))
        .transpose()
        .context("invalid --since")?;
    Ok(RecordFilter::new(&events, since)?)
}

/// Write lines and flush, so a reader at the other end of a pipe sees each one at once.
fn emit(lines: &str) -> std::io::Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    print(lines)
}

fn json_line(record: &AuditRecord) -> anyhow::Result<String> {
    Ok(format!("{}\n", serde_json::to_string(record)?))
}

/// Whether the container whose bundle is `dir` no longer runs (its runtime record is gone,
/// or names a process that has ended).
fn has_stopped(dir: &Path) -> bool {
    match read_runtime(dir) {
        Ok(Some(runtime)) => !is_same_process(runtime.pid, runtime.start_time),
        _ => true,
    }
}

/// A running shielded container's bundle directory, or an error saying how to get there.
fn running_dir(name: &ContainerName, ctx: &Context, instead: &str) -> anyhow::Result<PathBuf> {
    let (_, runtime, dir) = lookup(name, ctx)?;
    if runtime.is_none() {
        bail!("container `{name}` is not running; start it with `podman start {name}`{instead}");
    }
    Ok(dir)
}

/// `logs [--container NAME] [-n N] [--json] [-f] [--since T] [--event E,...|--refused]`.
pub fn logs(args: &LogsArgs, ctx: &Context) -> anyhow::Result<()> {
    let filter = record_filter(&args.filter, &[], args.since.as_deref())?;
    let only = args
        .container
        .as_deref()
        .map(ContainerName::new)
        .transpose()?;
    let store = StateStore::new(&ctx.paths.containers_dir);
    if args.follow {
        return follow_logs(args.n, only, &filter, ctx);
    }
    let names = match &only {
        Some(c) => vec![c.clone()],
        None => store.names(),
    };
    let mut records: Vec<AuditRecord> = names
        .iter()
        .flat_map(|n| audit::read(&store.dir(n)))
        .filter(|r| filter.matches(r))
        .collect();
    records.sort_by(|a, b| a.ts.cmp(&b.ts));
    let skip = records.len().saturating_sub(args.n);
    let records = &records[skip..];
    if args.json {
        return Ok(print(&format!("{}\n", serde_json::to_string(records)?))?);
    }
    let mut out = String::new();
    for r in records {
        out.push_str(&json_line(r)?);
    }
    Ok(print(&out)?)
}

/// `logs -f`: the last `n` matching records, then every new one as it is written, until
/// Ctrl-C or SIGTERM.
fn follow_logs(
    n: usize,
    only: Option<ContainerName>,
    filter: &RecordFilter,
    ctx: &Context,
) -> anyhow::Result<()> {
    let signals = StopSignals::install().context("cannot set up signal handling")?;
    let mut follower = LogFollower::new(&ctx.paths.containers_dir, only, true, signals);
    let mut history: Vec<AuditRecord> = follower
        .read_new()
        .into_iter()
        .filter(|r| filter.matches(r))
        .collect();
    history.drain(..history.len().saturating_sub(n));
    let mut out = String::new();
    for r in &history {
        out.push_str(&json_line(r)?);
    }
    emit(&out)?;
    loop {
        if follower.wait(None, TICK)?.stop {
            return Ok(());
        }
        let mut out = String::new();
        for r in follower.read_new().iter().filter(|r| filter.matches(r)) {
            out.push_str(&json_line(r)?);
        }
        emit(&out)?;
    }
}

/// `watch [NAME] [--json] [--event E,...|--refused]`: packet and DNS events as they are
/// written, one line each; with NAME it ends when that container stops.
pub fn watch(args: &WatchArgs, ctx: &Context) -> anyhow::Result<()> {
    let filter = record_filter(&args.filter, TRAFFIC_EVENTS, None)?;
    let only = args.name.as_deref().map(ContainerName::new).transpose()?;
    let dir = only
        .as_ref()
        .map(|name| {
            running_dir(
                name,
                ctx,
                &format!(", or follow its log with `terok-shield logs -f --container {name}`"),
            )
        })
        .transpose()?;
    let signals = StopSignals::install().context("cannot set up signal handling")?;
    let mut follower = LogFollower::new(&ctx.paths.containers_dir, only.clone(), false, signals);
    if std::io::stderr().is_terminal() {
        let what = only
            .as_ref()
            .map_or("every container".to_string(), |n| format!("`{n}`"));
        eprintln!("terok-shield: watching {what}; Ctrl-C ends");
    }
    let mut checked = Instant::now();
    loop {
        let mut out = String::new();
        let mut stopped = false;
        for record in follower.read_new() {
            if only.is_some() && record.event == "stop" {
                stopped = true;
                break;
            }
            if filter.matches(&record) {
                if args.json {
                    out.push_str(&json_line(&record)?);
                } else {
                    out.push_str(&readable_line(&record));
                    out.push('\n');
                }
            }
        }
        emit(&out)?;
        if let (Some(name), Some(dir)) = (&only, &dir) {
            if !stopped && checked.elapsed() >= TICK {
                checked = Instant::now();
                stopped = has_stopped(dir);
            }
            if stopped {
                if std::io::stderr().is_terminal() {
                    eprintln!("terok-shield: container `{name}` stopped");
                }
                return Ok(());
            }
        }
        if follower.wait(None, TICK)?.stop {
            return Ok(());
        }
    }
}

/// `learn NAME [--since T]`: a profile of what the container was refused (and, after `down`,
/// what it reached).
pub fn learn(args: &LearnArgs, ctx: &Context) -> anyhow::Result<()> {
    let name = ContainerName::new(&args.name)?;
    let filter = record_filter(
        &super::EventFilterArgs::default(),
        LEARN_EVENTS,
        args.since.as_deref(),
    )?;
    let store = StateStore::new(&ctx.paths.containers_dir);
    let dir = store.dir(&name);
    if !dir.is_dir() {
        bail!(
            "no shield state for `{name}` under {}; check the name (`terok-shield logs` lists every container's events)",
            ctx.paths.containers_dir.display()
        );
    }
    // Destinations the user denied are left out; a missing bundle only means none.
    let denied = store.load(&name).map(|b| b.live_deny).unwrap_or_default();
    let records: Vec<AuditRecord> = audit::read(&dir)
        .into_iter()
        .filter(|r| filter.matches(r))
        .collect();
    Ok(print(
        &learn_profile(name.as_str(), &records, &denied).text,
    )?)
}

/// Lines typed or piped in, read without ever blocking the loop.
struct Answers {
    /// Bytes after the last complete line.
    partial: Vec<u8>,
    /// Whole lines not used yet (a script may answer ahead of the questions).
    lines: VecDeque<String>,
    closed: bool,
    terminal: bool,
}

impl Answers {
    fn new() -> Answers {
        Answers {
            partial: Vec::new(),
            lines: VecDeque::new(),
            closed: false,
            terminal: std::io::stdin().is_terminal(),
        }
    }

    /// One read(2) of stdin, which poll(2) said will not block.
    fn read_once(&mut self) {
        let mut buf = [0u8; 4096];
        let stdin = std::io::stdin();
        let n = rustix::io::read(stdin.as_fd(), &mut buf);
        match n {
            Ok(0) => {
                self.closed = true;
                if !self.partial.is_empty() {
                    let last =
                        String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned();
                    self.lines.push_back(last);
                }
            }
            Ok(n) => {
                self.partial.extend_from_slice(&buf[..n]);
                while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = self.partial.drain(..=end).collect();
                    let line = String::from_utf8_lossy(&line).trim().to_string();
                    if !line.is_empty() {
                        self.lines.push_back(line);
                    }
                }
            }
            Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
            Err(_) => self.closed = true,
        }
    }

    /// Whether no answer can come any more.
    fn exhausted(&self) -> bool {
        self.closed && self.lines.is_empty()
    }
}

/// What clearance did, for its last line.
#[derive(Default)]
struct Tally {
    allowed: usize,
    saved: usize,
    denied: usize,
    ignored: usize,
}

/// Run `terok-shield [--state-dir D] ARGS...` (this binary) and relay what it printed;
/// whether it succeeded.
fn run_self(state_dir: &Path, args: &[&str]) -> anyhow::Result<bool> {
    let exe = std::env::current_exe().context("cannot find this program's own path")?;
    // A process group of its own: Ctrl-C at the terminal ends the session after the change,
    // never in the middle of it.
    let out = Process::new(exe)
        .arg("--state-dir")
        .arg(state_dir)
        .args(args)
        .stdin(Stdio::null())
        .process_group(0)
        .output()
        .context("cannot run terok-shield for the answer")?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&out.stdout)?;
    stdout.flush()?;
    std::io::stderr().write_all(&out.stderr)?;
    Ok(out.status.success())
}

/// `clearance NAME [--profile P]` (alias `simple-clearance`).
pub fn clearance(args: &ClearanceArgs, ctx: &Context) -> anyhow::Result<()> {
    let name = ContainerName::new(&args.name)?;
    let default_profile = match &args.profile {
        Some(p) => ProfileName::new(p)?,
        None => ProfileName::new(name.as_str()).map_err(|_| {
            anyhow::anyhow!("`{name}` cannot name a profile file (at most 64 letters, digits, '-', '_' and '.'); choose one with --profile NAME")
        })?,
    };
    let dir = running_dir(&name, ctx, "")?;
    let signals = StopSignals::install().context("cannot set up signal handling")?;
    let mut follower = LogFollower::new(
        &ctx.paths.containers_dir,
        Some(name.clone()),
        false,
        signals,
    );
    let mut clearance = Clearance::default();
    let mut answers = Answers::new();
    let mut tally = Tally::default();
    emit(&format!(
        "clearance for {name}: each refused destination is shown once; answer a (allow), s [PROFILE] (allow and save in profile {default_profile} or PROFILE), d (deny), i (ignore) or q (quit)\n"
    ))?;
    let mut checked = Instant::now();
    let why = loop {
        let mut out = String::new();
        let mut stopped = false;
        for record in follower.read_new() {
            if record.event == "stop" {
                stopped = true;
                break;
            }
            let ahead = clearance.queued();
            if let Some(pending) = clearance.observe(&record) {
                if ahead == 0 {
                    out.push_str(&pending.prompt());
                } else {
                    out.push_str(&format!("queued: {} ({})", pending.target, pending.how));
                }
                out.push('\n');
            }
        }
        emit(&out)?;
        if stopped || (checked.elapsed() >= TICK && has_stopped(&dir)) {
            break "the container stopped";
        }
        if checked.elapsed() >= TICK {
            checked = Instant::now();
        }

        // Answer what waits, with the lines at hand.
        let mut quit = false;
        while let Some(pending) = clearance.waiting().cloned() {
            let Some(line) = answers.lines.pop_front() else {
                break;
            };
            match parse_answer(&line) {
                Err(e) => emit(&format!("{e}\n{}\n", pending.prompt()))?,
                Ok(Answer::Quit) => {
                    quit = true;
                    break;
                }
                Ok(answer) => {
                    if settle(&pending, answer, &name, &default_profile, ctx, &mut tally)? {
                        clearance.settle();
                        if let Some(next) = clearance.waiting() {
                            emit(&format!("{}\n", next.prompt()))?;
                        }
                    } else {
                        emit(&format!("{}\n", pending.prompt()))?;
                    }
                }
            }
        }
        if quit {
            break "asked to quit";
        }
        if clearance.waiting().is_none() && answers.terminal && !answers.lines.is_empty() {
            // Typed with nothing waiting: a person means it for now, not for whatever comes
            // next (a script's lines, by contrast, wait for the destinations they answer).
            let quit = answers
                .lines
                .drain(..)
                .any(|line| parse_answer(&line) == Ok(Answer::Quit));
            if quit {
                break "asked to quit";
            }
            emit("nothing is waiting for an answer yet\n")?;
        }
        if answers.exhausted() {
            break "its input ended";
        }
        let stdin = std::io::stdin();
        let input = (!answers.closed).then(|| stdin.as_fd());
        let wake = follower.wait(input, TICK)?;
        if wake.stop {
            break "it was interrupted";
        }
        if wake.input {
            answers.read_once();
        }
    };
    let unanswered = clearance.queued();
    emit(&format!(
        "clearance for {name} ended ({why}): {} allowed ({} saved), {} denied, {} ignored, {unanswered} unanswered\n",
        tally.allowed + tally.saved,
        tally.saved,
        tally.denied,
        tally.ignored
    ))?;
    Ok(())
}

/// Carry out one answer through the `allow`/`deny` commands; whether the destination is
/// settled (a failed change leaves it waiting).
fn settle(
    pending: &Pending,
    answer: Answer,
    name: &ContainerName,
    default_profile: &ProfileName,
    ctx: &Context,
    tally: &mut Tally,
) -> anyhow::Result<bool> {
    let target = pending.target.to_string();
    let state_dir = &ctx.paths.state_dir;
    let ok = match &answer {
        Answer::Allow => run_self(state_dir, &["allow", name.as_str(), &target])?,
        Answer::Save(profile) => {
            let profile = profile.as_ref().unwrap_or(default_profile);
            run_self(
                state_dir,
                &[
                    "allow",
                    name.as_str(),
                    &target,
                    "--save-to",
                    profile.as_str(),
                ],
            )?
        }
        Answer::Deny => run_self(state_dir, &["deny", name.as_str(), &target])?,
        Answer::Ignore => {
            emit(&format!("Ignored {target}\n"))?;
            true
        }
        Answer::Quit => unreachable!("quit ends the loop before any change"),
    };
    if ok {
        match answer {
            Answer::Allow => tally.allowed += 1,
            Answer::Save(_) => tally.saved += 1,
            Answer::Deny => tally.denied += 1,
            Answer::Ignore => tally.ignored += 1,
            Answer::Quit => {}
        }
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::super::{Cli, Command};

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("terok-shield").chain(args.iter().copied()))
    }

    #[test]
    fn logs_follow_since_and_event_filters() {
        let Command::Logs(a) = parse(&[
            "logs",
            "-f",
            "--since",
            "10m",
            "--event",
            "blocked,dns_refused",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert!(a.follow && !a.json && !a.filter.refused);
        assert_eq!(a.since.as_deref(), Some("10m"));
        assert_eq!(a.filter.event, ["blocked", "dns_refused"]);
        for bad in [
            &["logs", "-f", "--json"][..],
            &["logs", "--refused", "--event", "stop"],
            &["watch", "--refused", "--event", "stop"],
        ] {
            assert_eq!(parse(bad).unwrap_err().exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn watch_learn_clearance_and_allow_save_to() {
        let Command::Watch(a) = parse(&["watch", "c1", "--json"]).unwrap().command else {
            panic!()
        };
        assert_eq!((a.name.as_deref(), a.json), (Some("c1"), true));
        assert!(
            matches!(parse(&["watch"]).unwrap().command, Command::Watch(w) if w.name.is_none())
        );
        let Command::Learn(a) = parse(&["learn", "c1", "--since", "2h"]).unwrap().command else {
            panic!()
        };
        assert_eq!(a.since.as_deref(), Some("2h"));
        for alias in ["clearance", "simple-clearance"] {
            let Command::Clearance(a) = parse(&[alias, "c1", "--profile", "p"]).unwrap().command
            else {
                panic!("{alias}")
            };
            assert_eq!((a.name.as_str(), a.profile.as_deref()), ("c1", Some("p")));
        }
        let Command::Allow(a) = parse(&["allow", "c1", "x.example", "--save-to", "p"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(a.save_to.as_deref(), Some("p"));
        assert!(parse(&["deny", "c1", "x.example", "--save-to", "p"]).is_err());
    }
}
