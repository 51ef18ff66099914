//! Flushing a network namespace's connection-tracking table over netlink.
//!
//! Revoking access must cut connections that are already open: the ruleset accepts packets
//! of established flows early, so after `up`, `deny` or `block` the container's conntrack
//! entries are dropped. Each flow's next packet is then judged afresh by the new ruleset
//! (Linux picks up mid-stream TCP by default), so allowed flows carry on and revoked ones are
//! rejected at once. No `conntrack` binary is needed: one ctnetlink message does it.

use std::os::fd::AsFd;

use rustix::net::{
    netlink, recv, send, socket_with, AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType,
};

/// nfnetlink subsystem and message numbers (linux/netfilter/nfnetlink*.h).
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLMSG_ERROR: u16 = 0x2;

/// The flush request: a netlink header plus an nfgenmsg for all address families.
fn flush_message(seq: u32) -> [u8; 20] {
    let mut msg = [0u8; 20];
    msg[0..4].copy_from_slice(&20u32.to_ne_bytes());
    msg[4..6].copy_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE).to_ne_bytes());
    msg[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nfgenmsg: family AF_UNSPEC (all), version NFNETLINK_V0, res_id 0.
    msg
}

/// Flush every conntrack entry of the calling thread's network namespace.
pub fn flush_current_netns() -> std::io::Result<()> {
    let sock = socket_with(
        AddressFamily::NETLINK,
        SocketType::RAW,
        SocketFlags::CLOEXEC,
        Some(netlink::NETFILTER),
    )?;
    send(sock.as_fd(), &flush_message(1), SendFlags::empty())?;
    let mut buf = [0u8; 512];
    let (n, _) = recv(sock.as_fd(), &mut buf, RecvFlags::empty())?;
    if n >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == NLMSG_ERROR {
        let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        // ENOENT: the table was already empty.
        if code != 0 && code != -2 {
            return Err(std::io::Error::from_raw_os_error(-code));
        }
    }
    Ok(())
}

/// Flush the conntrack table of another process's namespaces by running this binary's
/// hidden `internal-conntrack-flush` command inside them (joining a user namespace needs a
/// single-threaded process, which a fresh child is).
pub fn flush_in(user: Option<&std::path::Path>, net: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::os::unix::process::CommandExt;
    let ns = super::netns::NsFiles::open(user, Some(net))?;
    let exe = std::env::current_exe().context("cannot find this program's own path")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("internal-conntrack-flush")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: only setns(2) on descriptors opened before the fork (see `NsFiles::enter`).
    unsafe {
        cmd.pre_exec(move || ns.enter());
    }
    let out = cmd
        .output()
        .context("failed to start the conntrack flush helper")?;
    if !out.status.success() {
        anyhow::bail!(
            "failed to cut open connections: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn flush_empties_a_namespace_table() {
        let root = rustix::process::geteuid().is_root()
            && Command::new("conntrack").arg("--version").output().is_ok();
        if !root {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "needs root and conntrack in CI"
            );
            return;
        }
        let name = format!("tsct-{}", std::process::id());
        assert!(Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success());
        let run = |args: &[&str]| {
            Command::new("ip")
                .args(["netns", "exec", &name])
                .args(args)
                .output()
                .unwrap()
        };
        run(&["ip", "link", "set", "lo", "up"]);
        // Create a conntrack entry: a UDP packet to a loopback port.
        run(&["sh", "-c", "echo x > /dev/udp/127.0.0.1/9 2>/dev/null; echo x | timeout 1 nc -u -w1 127.0.0.1 9 || true"]);
        run(&[
            "conntrack",
            "-I",
            "-p",
            "udp",
            "-s",
            "127.0.0.1",
            "-d",
            "127.0.0.1",
            "--sport",
            "1111",
            "--dport",
            "2222",
            "-t",
            "60",
            "-u",
            "ASSURED",
        ]);
        let count =
            |out: std::process::Output| String::from_utf8_lossy(&out.stdout).lines().count();
        assert!(
            count(run(&["conntrack", "-L"])) >= 1,
            "test setup made no entry"
        );
        let ns_path = format!("/run/netns/{name}");
        std::thread::spawn(move || {
            let f = std::fs::File::open(ns_path).unwrap();
            rustix::thread::move_into_link_name_space(
                f.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .unwrap();
            flush_current_netns().unwrap();
            flush_current_netns().unwrap(); // flushing an empty table is fine
        })
        .join()
        .unwrap();
        assert_eq!(count(run(&["conntrack", "-L"])), 0);
        Command::new("ip")
            .args(["netns", "del", &name])
            .status()
            .unwrap();
    }
}
