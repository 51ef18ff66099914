//! nftables in-process: `libnftables.so.1`, the library the `nft` binary is built on, opened
//! at run time with dlopen(3).
//!
//! Starting `nft` costs milliseconds per call (exec, dynamic linking, reading the system's
//! tables of names); the library parses the same scripts with the same parser and sends the
//! same netlink messages, in microseconds once loaded. It is opened at run time, not linked,
//! so building needs no `-dev` package and a host without it still runs (through `nft`).
//!
//! Where a context talks: `nft_ctx_new` opens its netlink socket at once, and a socket
//! belongs for good to the network namespace its creating thread was in. So a context for a
//! container is made either on a short-lived thread that joined the container's network
//! namespace (enough when this process is already in the right user namespace: the hook,
//! root), or in a forked child that joined the user namespace too (setns(CLONE_NEWUSER)
//! needs a single-threaded process) and serves requests over a socket pair.
//!
//! The library keeps global state (its interface cache, one-time initialisation), so every
//! call in this process is serialised by one lock.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::ptr::NonNull;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use super::netns::NsFiles;

/// The library's file name (its SONAME: ABI version 1, every nftables since 0.9).
pub const LIBRARY: &str = "libnftables.so.1";

/// `NFT_CTX_OUTPUT_JSON` of `<nftables/libnftables.h>`.
const OUTPUT_JSON: c_uint = 1 << 4;

type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxBuffer = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxGetBuffer = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type CtxSetFlags = unsafe extern "C" fn(*mut c_void, c_uint);
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// The entry points we use, resolved once.
pub struct Library {
    ctx_new: CtxNew,
    ctx_free: CtxFree,
    buffer_output: CtxBuffer,
    buffer_error: CtxBuffer,
    get_output: CtxGetBuffer,
    get_error: CtxGetBuffer,
    set_output_flags: CtxSetFlags,
    run_cmd: RunCmd,
}

static LOADED: OnceLock<Result<Library, String>> = OnceLock::new();
/// Serialises every use of the library in this process (see the module header).
static LOCK: Mutex<()> = Mutex::new(());

/// The library, loaded on first use; the error says why it could not be.
pub fn library() -> Result<&'static Library, String> {
    LOADED.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> Result<Library, String> {
    let name = CString::new(LIBRARY).expect("no NUL");
    // SAFETY: dlopen with a valid C string; the handle is kept for the life of the process.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a thread-local C string or NULL.
        let why = unsafe { libc::dlerror() };
        return Err(if why.is_null() {
            format!("cannot load {LIBRARY}")
        } else {
            // SAFETY: non-null dlerror result is a valid C string.
            unsafe { CStr::from_ptr(why) }
                .to_string_lossy()
                .into_owned()
        });
    }
    let symbol = |name: &str| -> Result<*mut c_void, String> {
        let c = CString::new(name).expect("no NUL");
        // SAFETY: valid handle and C string.
        let p = unsafe { libc::dlsym(handle, c.as_ptr()) };
        if p.is_null() {
            Err(format!("{LIBRARY} has no symbol {name}"))
        } else {
            Ok(p)
        }
    };
    // SAFETY: each symbol has this C signature in every libnftables of ABI version 1.
    unsafe {
        Ok(Library {
            ctx_new: std::mem::transmute::<*mut c_void, CtxNew>(symbol("nft_ctx_new")?),
            ctx_free: std::mem::transmute::<*mut c_void, CtxFree>(symbol("nft_ctx_free")?),
            buffer_output: std::mem::transmute::<*mut c_void, CtxBuffer>(symbol(
                "nft_ctx_buffer_output",
            )?),
            buffer_error: std::mem::transmute::<*mut c_void, CtxBuffer>(symbol(
                "nft_ctx_buffer_error",
            )?),
            get_output: std::mem::transmute::<*mut c_void, CtxGetBuffer>(symbol(
                "nft_ctx_get_output_buffer",
            )?),
            get_error: std::mem::transmute::<*mut c_void, CtxGetBuffer>(symbol(
                "nft_ctx_get_error_buffer",
            )?),
            set_output_flags: std::mem::transmute::<*mut c_void, CtxSetFlags>(symbol(
                "nft_ctx_output_set_flags",
            )?),
            run_cmd: std::mem::transmute::<*mut c_void, RunCmd>(symbol("nft_run_cmd_from_buffer")?),
        })
    }
}

/// What one command produced: success with its output, or failure with nft's error text.
pub type Outcome = Result<String, String>;

/// One library context, bound to the network namespace it was made in.
struct Ctx {
    lib: &'static Library,
    ptr: NonNull<c_void>,
}

// SAFETY: a context is used by one thread at a time (every use holds `LOCK` or happens in a
// single-threaded worker child); the library does not tie it to the creating thread.
unsafe impl Send for Ctx {}

impl Ctx {
    /// A context in the current thread's network namespace. Caller holds `LOCK` (or is a
    /// single-threaded child).
    fn new(lib: &'static Library) -> Result<Ctx, String> {
        // SAFETY: plain constructor; NULL on failure (it aborts on netlink errors instead).
        let ptr = NonNull::new(unsafe { (lib.ctx_new)(0) })
            .ok_or_else(|| "nft_ctx_new failed".to_string())?;
        // SAFETY: valid context.
        unsafe {
            (lib.buffer_output)(ptr.as_ptr());
            (lib.buffer_error)(ptr.as_ptr());
        }
        Ok(Ctx { lib, ptr })
    }

    /// Run one nft script or command (one transaction), text or JSON output.
    fn run(&mut self, command: &str, json: bool) -> Outcome {
        let c = CString::new(command).map_err(|_| "command contains a NUL byte".to_string())?;
        let lib = self.lib;
        let ctx = self.ptr.as_ptr();
        // SAFETY: valid context and C strings; the buffers are copied before the next call.
        unsafe {
            (lib.set_output_flags)(ctx, if json { OUTPUT_JSON } else { 0 });
            let rc = (lib.run_cmd)(ctx, c.as_ptr());
            let out = CStr::from_ptr((lib.get_output)(ctx))
                .to_string_lossy()
                .into_owned();
            let err = CStr::from_ptr((lib.get_error)(ctx))
                .to_string_lossy()
                .into_owned();
            if rc == 0 {
                Ok(out)
            } else if err.trim().is_empty() {
                Err(format!("libnftables failed (code {rc})"))
            } else {
                Err(err)
            }
        }
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: valid context, freed once.
        unsafe { (self.lib.ctx_free)(self.ptr.as_ptr()) }
    }
}

/// A way to run commands in one network namespace through the library.
pub struct Session(Kind);

enum Kind {
    Local(Ctx),
    Worker(Worker),
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Kind::Local(_) => "Session::Local",
            Kind::Worker(_) => "Session::Worker",
        })
    }
}

impl Session {
    /// A session in `ns` (nothing to join: this process's namespaces).
    ///
    /// Only a network namespace: its context is made on a thread that joins it (the process
    /// stays where it is). A user namespace too: a forked worker joins both.
    pub fn open(lib: &'static Library, ns: NsFiles, timeout: Duration) -> std::io::Result<Self> {
        let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        if ns.is_empty() {
            return Ctx::new(lib)
                .map(|c| Session(Kind::Local(c)))
                .map_err(std::io::Error::other);
        }
        if !ns.has_user() {
            // The thread ends right after: the socket stays in the namespace it was made in.
            return std::thread::scope(|s| {
                s.spawn(|| {
                    ns.enter()?;
                    Ctx::new(lib).map_err(std::io::Error::other)
                })
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("nft context thread panicked")))
            })
            .map(|c| Session(Kind::Local(c)));
        }
        // Forked under the lock: no other thread is inside the library at the fork.
        Worker::spawn(lib, &ns, timeout).map(|w| Session(Kind::Worker(w)))
    }

    /// Run one script or command; `json` for JSON output (listings).
    pub fn run(&mut self, command: &str, json: bool) -> std::io::Result<Outcome> {
        match &mut self.0 {
            Kind::Local(ctx) => {
                let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
                Ok(ctx.run(command, json))
            }
            Kind::Worker(w) => w.request(command, json),
        }
    }
}

/// A forked child (not exec'd) in a container's user and network namespaces, running the
/// library on our behalf: requests and replies are length-prefixed frames on a socket pair.
struct Worker {
    stream: UnixStream,
    pid: libc::pid_t,
}

impl Worker {
    fn spawn(lib: &'static Library, ns: &NsFiles, timeout: Duration) -> std::io::Result<Worker> {
        let (parent, child) = UnixStream::pair()?;
        // SAFETY: fork(2). The child only makes syscalls, allocates (glibc's malloc is
        // consistent after fork) and calls the library, which no other thread was inside of
        // (the caller holds `LOCK`); it leaves with _exit, never returning into Rust code.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if pid == 0 {
            drop(parent);
            let code = serve_child(lib, ns, child);
            // SAFETY: leave without running the parent's atexit handlers or destructors.
            unsafe { libc::_exit(code) }
        }
        drop(child);
        parent.set_read_timeout(Some(timeout))?;
        parent.set_write_timeout(Some(timeout))?;
        let mut worker = Worker {
            stream: parent,
            pid,
        };
        // The first frame says whether joining and the context worked.
        match read_frame(&mut worker.stream)? {
            (0, _) => Ok(worker),
            (_, why) => Err(std::io::Error::other(why)),
        }
    }

    fn request(&mut self, command: &str, json: bool) -> std::io::Result<Outcome> {
        write_frame(&mut self.stream, u8::from(json), command)?;
        Ok(match read_frame(&mut self.stream)? {
            (0, out) => Ok(out),
            (_, err) => Err(err),
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing our end ends the child's loop; a child stuck in the kernel is killed.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        let mut status = 0;
        // SAFETY: our own child, reaped once.
        unsafe {
            if libc::waitpid(self.pid, &mut status, libc::WNOHANG) == 0 {
                std::thread::sleep(Duration::from_millis(1));
                if libc::waitpid(self.pid, &mut status, libc::WNOHANG) == 0 {
                    libc::kill(self.pid, libc::SIGKILL);
                    libc::waitpid(self.pid, &mut status, 0);
                }
            }
        }
    }
}

/// The worker child: join, make a context, then answer requests until the parent hangs up.
fn serve_child(lib: &'static Library, ns: &NsFiles, mut stream: UnixStream) -> c_int {
    let ctx = ns
        .enter()
        .map_err(|e| format!("cannot enter the container's namespaces: {e}"))
        .and_then(|()| Ctx::new(lib));
    let mut ctx = match ctx {
        Ok(ctx) => {
            let _ = write_frame(&mut stream, 0, "");
            ctx
        }
        Err(why) => {
            let _ = write_frame(&mut stream, 1, &why);
            return 1;
        }
    };
    while let Ok((json, command)) = read_frame(&mut stream) {
        let (status, text) = match ctx.run(&command, json != 0) {
            Ok(out) => (0, out),
            Err(err) => (1, err),
        };
        if write_frame(&mut stream, status, &text).is_err() {
            return 1;
        }
    }
    0
}

fn write_frame(stream: &mut UnixStream, tag: u8, text: &str) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(5 + text.len());
    frame.push(tag);
    frame.extend_from_slice(&(text.len() as u32).to_le_bytes());
    frame.extend_from_slice(text.as_bytes());
    stream.write_all(&frame)
}

fn read_frame(stream: &mut UnixStream) -> std::io::Result<(u8, String)> {
    let mut head = [0u8; 5];
    stream.read_exact(&mut head)?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    Ok((head[0], String::from_utf8_lossy(&body).into_owned()))
}
