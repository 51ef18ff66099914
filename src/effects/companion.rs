//! Starting what the hook runs beside the workload (see [`crate::core::companion`]): the
//! process, in the container's network namespace, with the sockets the hook bound for it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::core::bundle::ContainerName;
use crate::core::companion::Companion;
use crate::effects::procfs;

/// Start `companion` inside the network namespace of the container whose process is `pid`,
/// in its own session, detached from the hook; returns its pid and start time.
///
/// With [`Companion::prebind`], the hook binds that process's sockets itself and hands them
/// over, and does not wait for it: the workload's questions and refused packets queue on
/// bound sockets from the moment the hook returns, and a failed exec is reported by `spawn`.
/// Without (dnsmasq, which binds its own), it waits, bounded, until the process reports
/// ready.
pub fn start(
    dir: &Path,
    name: &ContainerName,
    pid: u32,
    companion: &Companion,
) -> anyhow::Result<(u32, u64)> {
    let command = companion.kind.command();
    let upstreams = &companion.upstreams;
    let prebound = companion.prebind;
    use std::os::unix::process::CommandExt;
    let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let ns = crate::effects::netns::NsFiles::open(None, Some(&netns))?;
    let sockets = prebound
        .map(|listen| crate::effects::prebound::Prebound::bind_in(&netns, listen))
        .transpose()
        .context("cannot bind its sockets in the container's network namespace")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("resolver.log"))
        .context("cannot open resolver.log")?;
    let mut cmd = std::process::Command::new(
        std::env::current_exe().context("cannot find this program's path")?,
    );
    // `COMMAND DIR NAME` first: that is how a person (or a test) finds the process by its
    // command line.
    cmd.arg(command).arg(dir).arg(name.as_str());
    for u in upstreams {
        cmd.arg(u.to_string());
    }
    if let Some(s) = &sockets {
        cmd.arg(format!("--inherited={}", s.numbers()));
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(if prebound.is_some() {
            std::process::Stdio::null()
        } else {
            std::process::Stdio::piped()
        })
        .stderr(log);
    // SAFETY: setns(2) and fcntl(2) on descriptors opened before the fork, then setsid(2);
    // all async-signal-safe.
    let handed_over = sockets.is_some();
    unsafe {
        cmd.pre_exec(move || {
            ns.enter()?;
            if let Some(s) = &sockets {
                s.keep_across_exec()?;
            }
            rustix::process::setsid()?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the resolver")?;
    if handed_over {
        let rpid = child.id();
        return Ok((rpid, procfs::start_time(rpid)?));
    }
    let mut out = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 6];
        let _ =
            tx.send(std::io::Read::read_exact(&mut out, &mut buf).is_ok() && &buf == b"ready\n");
    });
    match rx.recv_timeout(std::time::Duration::from_secs(5)) {
        Ok(true) => {
            let rpid = child.id();
            Ok((rpid, procfs::start_time(rpid)?))
        }
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "it did not report ready within 5 s (see {})",
                dir.join("resolver.log").display()
            )
        }
    }
}
