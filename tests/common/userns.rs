//! A rootless user namespace with its own network namespace, owned by an unprivileged user:
//! the situation of a rootless Podman container, where netlink messages are smaller.

use std::io::{BufRead, BufReader};
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
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start runuser (util-linux)");
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
                panic!("rootless namespace holder did not start: {e}");
            }
        };
        let pid: u32 = match line.trim().parse() {
            Ok(p) => p,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("rootless namespace holder printed {line:?}, expected its PID (is unprivileged userns allowed?)");
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

fn user_exists(name: &str) -> bool {
    std::fs::read_to_string("/etc/passwd")
        .map(|p| p.lines().any(|l| l.split(':').next() == Some(name)))
        .unwrap_or(false)
}
