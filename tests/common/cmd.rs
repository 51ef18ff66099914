//! Running commands with a deadline, for every test (namespaces, `ip`, `nft`, podman). Each
//! child gets its own process group, so a command that overruns is killed together with
//! everything it started (runuser, terok-shield, podman), and every child is reaped: nothing
//! outlives the test and a wedged tool fails the test instead of hanging the suite.

use std::ffi::OsStr;
use std::fmt;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{kill_process_group, Pid, Signal};

/// What a finished command printed and how it ended.
#[derive(Debug, Clone)]
pub struct Out {
    pub line: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panic with everything known unless the command succeeded.
    #[track_caller]
    pub fn expect_ok(self) -> Out {
        assert!(self.ok(), "command failed: {self}");
        self
    }

    /// Panic with everything known if the command succeeded.
    #[track_caller]
    pub fn expect_fail(self) -> Out {
        assert!(!self.ok(), "command unexpectedly succeeded: {self}");
        self
    }
}

impl fmt::Display for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` -> {} after {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.line,
            self.status,
            self.elapsed,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// Run `program args...` with a clean stdin, capture its output, and kill its whole process
/// group if it is still running after `limit`. Err only when it could not start or overran.
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S], limit: Duration) -> Result<Out, String> {
    let line = std::iter::once(program.to_string())
        .chain(
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned()),
        )
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = Command::new(program)
        .args(args)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start `{line}`: {e}"))?;
    let mut out_pipe = child.stdout.take().expect("piped stdout");
    let mut err_pipe = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });
    let start = Instant::now();
    let mut nap = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > limit => {
                kill_group(child.id());
                let _ = child.kill();
                let _ = child.wait();
                // Readers end when the last holder of the pipes is gone; do not wait forever
                // on a grandchild that escaped the group (e.g. a daemonised conmon).
                let stdout = join_bounded(out_reader);
                let stderr = join_bounded(err_reader);
                return Err(format!(
                    "`{line}` did not finish within {limit:?} and was killed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
                ));
            }
            Ok(None) => {
                std::thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("waiting for `{line}`: {e}")),
        }
    };
    let elapsed = start.elapsed();
    Ok(Out {
        line,
        status,
        stdout: join_bounded(out_reader),
        stderr: join_bounded(err_reader),
        elapsed,
    })
}

/// Like [`run`], panicking if the command could not start or overran.
#[track_caller]
pub fn run_bounded<S: AsRef<OsStr>>(program: &str, args: &[S], limit: Duration) -> Out {
    run(program, args, limit).unwrap_or_else(|e| panic!("{e}"))
}

fn kill_group(pid: u32) {
    if let Some(pid) = Pid::from_raw(pid as i32) {
        let _ = kill_process_group(pid, Signal::KILL);
    }
}

/// Join a pipe reader, giving up after a few seconds: a daemonised grandchild (conmon) can
/// keep a pipe open after the command itself exited.
fn join_bounded(reader: std::thread::JoinHandle<Vec<u8>>) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !reader.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    if reader.is_finished() {
        String::from_utf8_lossy(&reader.join().unwrap_or_default()).into_owned()
    } else {
        "(output still open after 5 s; a background process holds the pipe)".into()
    }
}

/// Like [`run`], but Err also when the command exits unsuccessfully.
pub fn run_ok<S: AsRef<OsStr>>(program: &str, args: &[S], limit: Duration) -> Result<Out, String> {
    let out = run(program, args, limit)?;
    if out.ok() {
        Ok(out)
    } else {
        Err(format!(
            "`{}` failed ({}): {}",
            out.line,
            out.status,
            out.stderr.trim()
        ))
    }
}

/// [`ip`], panicking with the error text on failure.
#[track_caller]
pub fn ip_or_panic(args: &[&str]) {
    if let Err(e) = ip(args) {
        panic!("{e}");
    }
}

/// `ip args...` bounded to 30 s; Err with the message on failure.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = run("ip", args, Duration::from_secs(30))?;
    if out.ok() {
        Ok(())
    } else {
        Err(format!("`{}` failed: {}", out.line, out.stderr.trim()))
    }
}
