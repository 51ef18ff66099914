//! A rootless user namespace with its own network namespace, owned by an unprivileged user:
//! the situation of a rootless Podman container, where netlink messages are smaller.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

/// The unprivileged user `.ci/run` creates; `nobody` stands in on machines without it.
pub const TEST_USER: &str = "shieldtest";

/// A `sleep` holding a user+net namespace pair open; killed and reaped on drop.
pub struct RootlessNs {
    child: Child,
    pid: u32,
    pub user: String,
}

impl RootlessNs {
    /// Start `unshare -U -r -n` as an unprivileged user and wait until its namespaces exist.
    pub fn spawn() -> RootlessNs {
        let user = if user_exists(TEST_USER) {
            TEST_USER
        } else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "user {TEST_USER} is missing; .ci/run (scripts/test-all.sh) creates it"
            );
            eprintln!("note: user {TEST_USER} missing, using nobody");
            "nobody"
        };
        let mut child = Command::new("runuser")
            .args(["-u", user, "--", "unshare", "-U", "-r", "-n", "sh", "-c"])
            // `$$` is the shell, which then becomes the sleep: the PID whose namespaces we use.
            // It is printed only after unshare wrote the uid map: the readiness signal.
            .arg("echo $$; exec sleep 600")
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start runuser (util-linux)");
        // Keep the holder's stderr for error messages (and out of the test output).
        let mut stderr = child.stderr.take().expect("piped stderr");
        let (err_tx, err_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            let _ = err_tx.send(text);
        });
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::sync_channel(1);
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(l) => l,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let err = err_rx
                    .recv_timeout(Duration::from_secs(1))
                    .unwrap_or_default();
                panic!("rootless namespace holder did not start: {e}; stderr: {err}");
            }
        };
        let pid: u32 = match line.trim().parse() {
            Ok(p) => p,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let err = err_rx
                    .recv_timeout(Duration::from_secs(1))
                    .unwrap_or_default();
                panic!(
                    "rootless namespace holder printed {line:?}, expected its PID \
                     (are unprivileged user namespaces allowed?); stderr: {err}"
                );
            }
        };
        let ns = RootlessNs {
            child,
            pid,
            user: user.to_string(),
        };
        let ours = std::fs::read_link("/proc/self/ns/user").expect("own user ns");
        let theirs = std::fs::read_link(ns.user_ns()).expect("holder's user ns");
        assert_ne!(ours, theirs, "holder did not get its own user namespace");
        ns
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn user_ns(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/user", self.pid))
    }

    pub fn net_ns(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.pid))
    }
}

impl Drop for RootlessNs {
    fn drop(&mut self) {
        if let Some(pid) = Pid::from_raw(self.pid as i32) {
            let _ = kill_process(pid, Signal::KILL);
        }
        // runuser reaps the sleep (or is it) and exits; bounded wait, then force.
        let start = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if start.elapsed() > Duration::from_secs(5) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
}

/// Run one `#[ignore]`d test of the current test binary as `user`, with extra environment
/// `env`, and return its stdout. The binary is copied to a world-readable temporary
/// directory first (the build tree may be private). Panics with the child's output if it
/// fails or overruns `limit`.
pub fn run_test_as(user: &str, test: &str, env: &[(&str, String)], limit: Duration) -> String {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    // One directory per call: tests of one binary run in parallel, and a copy over a binary
    // that another call is running fails (ETXTBSY). The copy is made by a child process: a
    // write descriptor held by this multi-threaded process would be inherited by another
    // test's fork and make executing the copy fail (ETXTBSY) as well.
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "terok-shield-it-{}-{}-as-{user}",
        std::process::id(),
        CALLS.fetch_add(1, Ordering::Relaxed)
    ));
    let exe = dir.join("test-binary");
    let mode =
        |p: &std::path::Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
    std::fs::create_dir_all(&dir)
        .and_then(|()| mode(&dir, 0o755))
        .and_then(|()| {
            let copied = std::process::Command::new("install")
                .args(["-m", "0755"])
                .arg(std::env::current_exe()?)
                .arg(&exe)
                .status()?;
            if copied.success() {
                Ok(())
            } else {
                Err(std::io::Error::other(format!(
                    "install exited with {copied}"
                )))
            }
        })
        .unwrap_or_else(|e| panic!("prepare {}: {e}", exe.display()));
    let args = [
        test,
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ];
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", user, "--"])
        .arg(&exe)
        .args(args)
        .current_dir("/");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run_with_env(&mut cmd, limit);
    let _ = std::fs::remove_dir_all(&dir);
    let what = format!("{} {} as {user}", exe.display(), args.join(" "));
    let (status, stdout, stderr) = out.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        status.success(),
        "{what} failed ({status}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    stdout
}

fn run_with_env(
    cmd: &mut Command,
    limit: Duration,
) -> Result<(std::process::ExitStatus, String, String), String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("did not finish within {limit:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(e.to_string()),
        }
    };
    Ok((
        status,
        out_t.join().unwrap_or_default(),
        err_t.join().unwrap_or_default(),
    ))
}

fn user_exists(name: &str) -> bool {
    std::fs::read_to_string("/etc/passwd")
        .map(|p| p.lines().any(|l| l.split(':').next() == Some(name)))
        .unwrap_or(false)
}
