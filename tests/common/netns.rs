//! Named network namespaces (`ip netns add`), entered only by fresh single-use threads.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};

use super::cmd;

/// Prefixes of the namespaces this harness creates: `tsc-<pid>-<n>` (container side) and
/// `tsw-<pid>-<n>` (world side).
pub const PREFIXES: [&str; 2] = ["tsc-", "tsw-"];

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Create `/run/netns/<name>` with its loopback up.
    pub fn create(name: String) -> Netns {
        cmd::ip_or_panic(&["netns", "add", &name]);
        let ns = Netns { name };
        cmd::ip_or_panic(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file, as `Nft::in_netns` wants it.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Run `f` on a new thread that first joins this namespace; wait at most `limit`.
    pub fn run<T: Send + 'static>(
        &self,
        limit: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        run_in(&self.path(), limit, f)
    }

    /// Set a per-namespace sysctl (`net/ipv4/tcp_syn_retries`) and read it back.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = Path::new("/proc/sys").join(key);
        let value = value.to_string();
        let shown = path.display().to_string();
        let got = self
            .run(Duration::from_secs(10), move || {
                std::fs::write(&path, format!("{value}\n"))
                    .and_then(|()| std::fs::read_to_string(&path))
                    .map(|s| (s.trim() == value, s))
            })
            .unwrap_or_else(|e| panic!("sysctl {shown} in {}: {e}", self.name));
        match got {
            Ok((true, _)) => {}
            Ok((false, s)) => panic!("sysctl {shown} in {} reads back {s:?}", self.name),
            Err(e) => panic!("sysctl {shown} in {}: {e}", self.name),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = cmd::run_ok("ip", &["netns", "del", &self.name], Duration::from_secs(30)) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// Spawn a single-use thread that joins the network namespace at `ns` and runs `f`.
///
/// Returns `f`'s value, or an error if joining failed, `f` panicked or `limit` passed (the
/// thread is then left to finish on its own; every probe it may run is itself bounded).
pub fn run_in<T: Send + 'static>(
    ns: &Path,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let file = File::open(ns).map_err(|e| format!("open {}: {e}", ns.display()))?;
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("netns-probe".into())
        .spawn(move || {
            let joined = move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network));
            drop(file);
            let _ = tx.send(match joined {
                Ok(()) => Ok(f()),
                Err(e) => Err(format!("setns: {e}")),
            });
        })
        .map_err(|e| format!("spawn thread: {e}"))?;
    match rx.recv_timeout(limit) {
        Ok(r) => r,
        Err(mpsc::RecvTimeoutError::Timeout) => Err(format!("no result within {limit:?}")),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err("the netns thread panicked".into()),
    }
}

/// Start a server on a fresh thread that joins the network namespace at `ns`: `bind` there,
/// then `serve` what it bound until `serve` returns. Returns once `bind` succeeded (panics with
/// its error, or when nothing is reported within 10 s); the receiver gets `()` when the
/// thread ends.
pub fn serve_in<L: 'static>(
    ns: &Path,
    thread_name: String,
    bind: impl FnOnce() -> Result<L, String> + Send + 'static,
    serve: impl FnOnce(L) + Send + 'static,
) -> mpsc::Receiver<()> {
    let file = File::open(ns).unwrap_or_else(|e| panic!("open {}: {e}", ns.display()));
    let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), String>>(1);
    let (done_tx, done_rx) = mpsc::sync_channel::<()>(1);
    std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            // Only this single-use thread ever enters the namespace.
            let joined = move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network));
            drop(file);
            match joined
                .map_err(|e| format!("setns: {e}"))
                .and_then(|()| bind())
            {
                Ok(bound) => {
                    let _ = ready_tx.send(Ok(()));
                    serve(bound);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
            let _ = done_tx.send(());
        })
        .expect("spawn a server thread");
    match ready_rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => done_rx,
        Ok(Err(e)) => panic!("servers in {} failed to start: {e}", ns.display()),
        Err(e) => panic!("servers in {} did not report readiness: {e}", ns.display()),
    }
}

/// Delete `tsc-*`/`tsw-*` namespaces left by earlier runs whose process is gone.
pub fn sweep_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("cleanup: removing stale namespace {name} (pid {pid} is gone)");
            if let Err(e) = cmd::run_ok("ip", &["netns", "del", &name], Duration::from_secs(30)) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// The PID in a harness namespace name (`tsc-1234-7` -> 1234), None for any other name.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = PREFIXES.iter().find_map(|p| name.strip_prefix(p))?;
    let (pid, n) = rest.split_once('-')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

#[test]
fn owner_pid_parses_only_harness_names() {
    assert_eq!(owner_pid("tsc-1234-7"), Some(1234));
    assert_eq!(owner_pid("tsw-99-0"), Some(99));
    assert_eq!(owner_pid("tsx"), None);
    assert_eq!(owner_pid("tsr-1234-modes"), None);
    assert_eq!(owner_pid("tsc-1234-"), None);
    assert_eq!(owner_pid("tsc-abc-1"), None);
}
