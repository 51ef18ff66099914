//! Talking to nftables: the one place the shield loads and lists its table.
//!
//! In-process through libnftables (see [`super::libnftables`]) when the library is present,
//! which it is wherever the nftables package is installed; otherwise by running the `nft`
//! binary, with the namespaces joined in the forked child just before exec. Either way the
//! caller may be multi-threaded and never changes namespace itself, and the same parser turns
//! the same script into the same kernel messages. Which one is in use is reported
//! ([`Nft::backend`]) and recorded with every apply in the audit log.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use thiserror::Error;

use super::libnftables::{self, Library, Session};
use super::netns::NsFiles;
use crate::core::ruleset::{FAMILY, TABLE};

/// How long one nft invocation may take before we give up (fail closed, never hang).
pub const NFT_TIMEOUT: Duration = Duration::from_secs(60);

/// Environment variable naming the nft binary to use (e.g. a wrapper, or a non-standard path).
/// Setting it selects the `nft` binary over the library.
pub const NFT_ENV: &str = "TEROK_SHIELD_NFT";

/// Where `nft` lives on common distributions, for hooks that run with an empty PATH.
const FALLBACK_PATHS: &[&str] = &[
    "/usr/sbin/nft",
    "/sbin/nft",
    "/usr/bin/nft",
    "/usr/local/sbin/nft",
    "/bin/nft",
];

/// Failures of the nft effect; messages say what to do.
#[derive(Debug, Error)]
pub enum NftError {
    #[error("neither {} nor nft (looked in PATH and {}) was found: install the nftables package", libnftables::LIBRARY, FALLBACK_PATHS.join(", "))]
    NotFound,
    #[error("{NFT_ENV}={} is not an absolute path to an executable: point it at nft, or unset it", .0.display())]
    BadOverride(PathBuf),
    #[error("failed to start {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Namespace(#[from] super::netns::NsError),
    #[error("nft failed (exit {code:?}): {stderr}")]
    Failed { code: Option<i32>, stderr: String },
    #[error("libnftables refused the command: {0}")]
    Refused(String),
    #[error("libnftables could not reach the container's namespaces: {0}")]
    Session(std::io::Error),
    #[error("nft did not finish within {0:?} and was killed")]
    Timeout(Duration),
    #[error("nft printed output that is not valid JSON: {0}")]
    BadJson(serde_json::Error),
}

impl NftError {
    /// Whether this says our table does not exist (the kernel's ENOENT, as nft words it).
    fn is_missing_table(&self) -> bool {
        match self {
            NftError::Failed { stderr, .. } | NftError::Refused(stderr) => {
                stderr.contains("No such file or directory")
            }
            _ => false,
        }
    }
}

/// How commands reach nftables.
#[derive(Clone, Copy)]
enum Backend {
    /// libnftables, opened on first use (loading it costs ~1 ms and ~2 MiB, which the
    /// container start, loaded over netlink, never pays), else the nft binary.
    Library,
    Binary,
}

/// The backend of one command: the library when it loads, else the binary.
#[derive(Clone, Copy)]
enum Resolved {
    Library(&'static Library),
    Binary,
}

/// A handle on nftables, optionally bound to a container's namespaces.
///
/// With the library, the first command opens a session in those namespaces (a context made
/// there, or a forked worker) and later commands of this handle and its clones reuse it.
#[derive(Clone)]
pub struct Nft {
    program: PathBuf,
    backend: Backend,
    user_ns: Option<PathBuf>,
    net_ns: Option<PathBuf>,
    session: Arc<Mutex<Option<Session>>>,
    /// The container's bundle: listings hold its table-read lock (see
    /// [`crate::effects::table_read`]).
    bundle_dir: Option<PathBuf>,
}

impl std::fmt::Debug for Nft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nft")
            .field(
                "backend",
                &match self.backend {
                    Backend::Library => "libnftables, else nft (opened on first use)",
                    Backend::Binary => "nft",
                },
            )
            .field("program", &self.program)
            .field("user_ns", &self.user_ns)
            .field("net_ns", &self.net_ns)
            .finish()
    }
}

impl Nft {
    /// Find nftables: `$TEROK_SHIELD_NFT` if set (an absolute path to nft), else libnftables,
    /// else the nft binary in PATH or the usual sbin directories (the fallback is explicit:
    /// [`Nft::fallback_reason`]). The library is opened by the first command that needs it:
    /// loading and verifying our table (`effects::firewall`) go over netlink and need neither,
    /// except through an explicit binary ([`Nft::at`], `$TEROK_SHIELD_NFT`).
    pub fn locate() -> Result<Nft, NftError> {
        if let Some(explicit) = std::env::var_os(NFT_ENV) {
            let path = PathBuf::from(explicit);
            return if path.is_absolute() && is_executable(&path) {
                Ok(Nft::at(path))
            } else {
                Err(NftError::BadOverride(path))
            };
        }
        // The library is only loaded here when there is no binary to fall back to.
        let program = match find_program("nft", FALLBACK_PATHS) {
            Some(program) => program,
            None if libnftables::library().is_ok() => PathBuf::from("nft"),
            None => return Err(NftError::NotFound),
        };
        Ok(Nft {
            backend: Backend::Library,
            ..Nft::at(program)
        })
    }

    /// Use a specific nft binary (never the library).
    pub fn at(program: impl Into<PathBuf>) -> Nft {
        Nft {
            program: program.into(),
            backend: Backend::Binary,
            user_ns: None,
            net_ns: None,
            session: Arc::default(),
            bundle_dir: None,
        }
    }

    /// List the table while holding `dir`'s table-read lock, so that the container's
    /// resolver does not make the listing start over (see [`crate::effects::table_read`]).
    pub fn with_table_read_lock(self, dir: &Path) -> Nft {
        Nft {
            bundle_dir: Some(dir.to_path_buf()),
            ..self
        }
    }

    fn reading(&self) -> Option<crate::effects::table_read::ReadGuard> {
        self.bundle_dir
            .as_deref()
            .map(crate::effects::table_read::for_reading)
    }

    /// Run nft inside the network namespace at `path` (e.g. `/run/netns/NAME`).
    pub fn in_netns(self, path: impl Into<PathBuf>) -> Nft {
        Nft {
            net_ns: Some(path.into()),
            session: Arc::default(),
            ..self
        }
    }

    /// Join a user namespace first (a rootless container's), then its network namespace.
    pub fn in_namespaces(self, user: Option<PathBuf>, net: PathBuf) -> Nft {
        Nft {
            user_ns: user,
            net_ns: Some(net),
            session: Arc::default(),
            ..self
        }
    }

    /// The nft binary (used by the binary backend, and by `doctor`'s probes).
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// `libnftables` or `nft`: how commands reach the kernel.
    pub fn backend(&self) -> &'static str {
        match self.resolve() {
            Resolved::Library(_) => "libnftables",
            Resolved::Binary => "nft",
        }
    }

    /// Why the `nft` binary is used although the library was wanted, if it is.
    pub fn fallback_reason(&self) -> Option<String> {
        match self.backend {
            Backend::Library => libnftables::library().err(),
            Backend::Binary => None,
        }
    }

    fn resolve(&self) -> Resolved {
        match self.backend {
            Backend::Library => match libnftables::library() {
                Ok(lib) => Resolved::Library(lib),
                Err(_) => Resolved::Binary,
            },
            Backend::Binary => Resolved::Binary,
        }
    }

    /// The namespaces (user, network) the netlink backend (`effects::nftables_netlink`) is to
    /// reach for this handle, or `None` for an explicit nft binary ([`Nft::at`],
    /// `$TEROK_SHIELD_NFT`), which then loads and lists as well.
    pub fn netlink_target(&self) -> Option<(Option<&Path>, Option<&Path>)> {
        match self.backend {
            Backend::Library => Some((self.user_ns.as_deref(), self.net_ns.as_deref())),
            Backend::Binary => None,
        }
    }

    /// Run one nft script (`nft -f -`): one atomic transaction.
    pub fn run_script(&self, script: &str) -> Result<(), NftError> {
        match self.resolve() {
            Resolved::Library(lib) => self.in_library(lib, script, false).map(drop),
            Resolved::Binary => self.run(&["-f", "-"], Some(script.as_bytes())).map(drop),
        }
    }

    /// Our table as nft's JSON, or `None` if it does not exist.
    pub fn list_table_json(&self) -> Result<Option<Value>, NftError> {
        let _reading = self.reading();
        let listed = match self.resolve() {
            Resolved::Library(lib) => self
                .in_library(lib, &format!("list table {FAMILY} {TABLE}"), true)
                .map(String::into_bytes),
            Resolved::Binary => self.run(&["-j", "list", "table", FAMILY, TABLE], None),
        };
        match listed {
            Ok(out) => serde_json::from_slice(&out)
                .map(Some)
                .map_err(NftError::BadJson),
            Err(e) if e.is_missing_table() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Our table as nft text (for `rules`), or `None` if it does not exist.
    pub fn list_table_text(&self) -> Result<Option<String>, NftError> {
        let _reading = self.reading();
        let listed = match self.resolve() {
            Resolved::Library(lib) => {
                self.in_library(lib, &format!("list table {FAMILY} {TABLE}"), false)
            }
            Resolved::Binary => self
                .run(&["list", "table", FAMILY, TABLE], None)
                .map(|out| String::from_utf8_lossy(&out).into_owned()),
        };
        match listed {
            Ok(out) => Ok(Some(out)),
            Err(e) if e.is_missing_table() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Remove our table if present; other tables are never touched.
    pub fn delete_table(&self) -> Result<(), NftError> {
        self.run_script(&format!(
            "table {FAMILY} {TABLE} {{}}\ndelete table {FAMILY} {TABLE}\n"
        ))
    }

    /// Run one command through the library, in this handle's session (opened on first use).
    fn in_library(
        &self,
        lib: &'static Library,
        command: &str,
        json: bool,
    ) -> Result<String, NftError> {
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        if session.is_none() {
            let ns = NsFiles::open(self.user_ns.as_deref(), self.net_ns.as_deref())?;
            *session = Some(Session::open(lib, ns, NFT_TIMEOUT).map_err(NftError::Session)?);
        }
        let outcome = session
            .as_mut()
            .expect("opened above")
            .run(command, json)
            .map_err(|e| {
                // A worker that failed mid-request is gone: the next command starts afresh.
                *session = None;
                NftError::Session(e)
            })?;
        outcome.map_err(|err| NftError::Refused(summarise_stderr(err.as_bytes())))
    }

    fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<Vec<u8>, NftError> {
        let ns = NsFiles::open(self.user_ns.as_deref(), self.net_ns.as_deref())?;
        let mut cmd = Command::new(&self.program);
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        if !ns.is_empty() {
            // SAFETY: the closure only makes setns(2) syscalls on descriptors opened before
            // the fork; it allocates nothing and takes no locks, so it is safe after fork.
            unsafe {
                cmd.pre_exec(move || ns.enter());
            }
        }
        let mut child = cmd.spawn().map_err(|source| NftError::Spawn {
            program: self.program.clone(),
            source,
        })?;
        let (status, out, err) = communicate(&mut child, stdin, NFT_TIMEOUT)?;
        if status.success() {
            Ok(out)
        } else {
            Err(NftError::Failed {
                code: status.code(),
                stderr: summarise_stderr(&err),
            })
        }
    }
}

/// Find an executable by name in PATH, then in `fallbacks` (full paths), for programs that
/// may run with an empty or minimal PATH (OCI hooks).
pub fn find_program(name: &str, fallbacks: &[&str]) -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    from_path
        .into_iter()
        .chain(fallbacks.iter().map(PathBuf::from))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Keep error output readable: nft echoes whole input lines, which may be huge element lists.
fn summarise_stderr(err: &[u8]) -> String {
    let text = String::from_utf8_lossy(err);
    let mut out: String = text
        .lines()
        .take(6)
        .map(|l| {
            if l.chars().count() > 300 {
                format!("{}…", l.chars().take(300).collect::<String>())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    if out.is_empty() {
        out = "(no error output)".into();
    }
    out
}

/// Wait for a child with a deadline; kill and reap it if the deadline passes.
///
/// Sleeps in poll(2) on a pidfd, so the caller wakes the instant the child exits (no polling
/// interval added to every nft call).
/// Feed a spawned child (stdin, stdout and stderr piped) its input, collect both outputs
/// (read on their own threads, so neither pipe can fill up and stall it) and wait for it
/// within `limit`. Returns the exit status, stdout and stderr.
pub(crate) fn communicate(
    child: &mut std::process::Child,
    stdin: Option<&[u8]>,
    limit: Duration,
) -> Result<(std::process::ExitStatus, Vec<u8>, Vec<u8>), NftError> {
    fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    }
    let out_reader = drain(child.stdout.take());
    let err_reader = drain(child.stderr.take());
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // The programs we run read their whole input before acting; a write error shows up
        // as their exit status.
        let _ = pipe.write_all(data);
    }
    let status = wait_bounded(child, limit)?;
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    Ok((status, out, err))
}

pub(crate) fn wait_bounded(
    child: &mut std::process::Child,
    limit: Duration,
) -> Result<std::process::ExitStatus, NftError> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    use rustix::process::{pidfd_open, Pid, PidfdFlags};

    let spawn_err = |source: std::io::Error| NftError::Spawn {
        program: PathBuf::from("nft"),
        source,
    };
    let pid = Pid::from_raw(child.id() as i32).expect("child pid is positive");
    let pidfd = pidfd_open(pid, PidfdFlags::empty()).map_err(|e| spawn_err(e.into()))?;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().map_err(spawn_err)? {
            return Ok(status);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(NftError::Timeout(limit));
        }
        let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
        let timeout = Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        match poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(spawn_err(e.into())),
        }
    }
}
