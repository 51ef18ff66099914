//! Cutting open connections that a new policy no longer allows, over ctnetlink.
//!
//! The ruleset accepts packets of established flows early, so revoking access (`up`, `deny`,
//! `block`) must also remove the container's conntrack entries for flows the new policy
//! refuses: their next packet is then judged afresh and rejected. Entries of flows that stay
//! allowed are kept (deleting them would break server-to-client streams, whose next inbound
//! packet would look new to the input chain). No `conntrack` binary is needed.

use std::os::fd::AsFd;

use crate::core::nft_netlink::{
    message, NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use rustix::net::{
    netlink, recv, send, socket_with, AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType,
};

/// nfnetlink subsystem and message numbers (linux/netfilter/nfnetlink*.h).
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const IPCTNL_MSG_CT_GET: u16 = 1;
/// Attribute numbers (linux/netfilter/nfnetlink_conntrack.h).
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_DST_PORT: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// One tracked flow, as much as revocation needs: where it goes, and its original tuple
/// (kept as raw attribute bytes, to name the entry exactly when deleting it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub family: u8,
    pub dst: std::net::IpAddr,
    pub proto: u8,
    pub dport: Option<u16>,
    tuple_orig: Vec<u8>,
}

/// Iterate netlink attributes in `buf`: (type without flags, payload, whole attribute).
fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8], &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        if len < 4 || len > rest.len() {
            return None;
        }
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & NLA_TYPE_MASK;
        let (whole, payload) = (&rest[..len], &rest[4..len]);
        rest = &rest[((len + 3) & !3).min(rest.len())..];
        Some((kind, payload, whole))
    })
}

/// Parse one conntrack message payload (after the nlmsghdr) into a flow.
fn parse_flow(payload: &[u8]) -> Option<Flow> {
    let family = *payload.first()?;
    let (_, _, tuple) = attrs(payload.get(4..)?).find(|(k, _, _)| *k == CTA_TUPLE_ORIG)?;
    let inner = &tuple[4..];
    let mut dst = None;
    let (mut proto, mut dport) = (None, None);
    for (kind, body, _) in attrs(inner) {
        match kind {
            CTA_TUPLE_IP => {
                for (k, v, _) in attrs(body) {
                    dst = match (k, v.len()) {
                        (CTA_IP_V4_DST, 4) => {
                            Some(std::net::IpAddr::from(<[u8; 4]>::try_from(v).ok()?))
                        }
                        (CTA_IP_V6_DST, 16) => {
                            Some(std::net::IpAddr::from(<[u8; 16]>::try_from(v).ok()?))
                        }
                        _ => dst,
                    };
                }
            }
            CTA_TUPLE_PROTO => {
                for (k, v, _) in attrs(body) {
                    match (k, v.len()) {
                        (CTA_PROTO_NUM, 1) => proto = Some(v[0]),
                        (CTA_PROTO_DST_PORT, 2) => dport = Some(u16::from_be_bytes([v[0], v[1]])),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(Flow {
        family,
        dst: dst?,
        proto: proto?,
        dport,
        tuple_orig: tuple.to_vec(),
    })
}

/// A ctnetlink request: header, `nfgenmsg` for `family`, then `attrs` as they are.
fn request(kind: u16, flags: u16, seq: u32, family: u8, attrs: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(20 + attrs.len());
    message(
        &mut msg,
        (NFNL_SUBSYS_CTNETLINK << 8) | kind,
        flags,
        seq,
        family,
        0,
        |w| w.0.extend_from_slice(attrs),
    );
    msg
}

fn open_socket() -> std::io::Result<rustix::fd::OwnedFd> {
    let sock = socket_with(
        AddressFamily::NETLINK,
        SocketType::RAW,
        SocketFlags::CLOEXEC,
        Some(netlink::NETFILTER),
    )?;
    let timeout = Some(std::time::Duration::from_secs(2));
    rustix::net::sockopt::set_socket_timeout(&sock, rustix::net::sockopt::Timeout::Recv, timeout)?;
    Ok(sock)
}

/// Every flow tracked in the calling thread's network namespace.
pub fn dump_current_netns() -> std::io::Result<Vec<Flow>> {
    let sock = open_socket()?;
    send(
        sock.as_fd(),
        &request(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, 1, 0, &[]),
        SendFlags::empty(),
    )?;
    let mut flows = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    // Bounded: a namespace with more entries than this many reads is not a container's.
    for _ in 0..100_000 {
        let (n, _) = recv(sock.as_fd(), &mut buf, RecvFlags::empty())?;
        let mut rest = &buf[..n];
        while rest.len() >= 16 {
            let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            if len < 16 || len > rest.len() {
                break;
            }
            let kind = u16::from_ne_bytes([rest[4], rest[5]]);
            match kind {
                NLMSG_DONE => return Ok(flows),
                NLMSG_ERROR => {
                    let code = i32::from_ne_bytes([rest[16], rest[17], rest[18], rest[19]]);
                    return Err(std::io::Error::from_raw_os_error(-code));
                }
                _ => flows.extend(parse_flow(&rest[16..len])),
            }
            rest = &rest[((len + 3) & !3).min(rest.len())..];
        }
    }
    Err(std::io::Error::other("conntrack dump did not end"))
}

/// Delete the given flows; returns how many were deleted (gone already is not an error).
pub fn delete_flows(flows: &[Flow]) -> std::io::Result<usize> {
    let sock = open_socket()?;
    let mut deleted = 0;
    let mut buf = [0u8; 512];
    for (i, flow) in flows.iter().enumerate() {
        let msg = request(
            IPCTNL_MSG_CT_DELETE,
            NLM_F_REQUEST | NLM_F_ACK,
            i as u32 + 1,
            flow.family,
            &flow.tuple_orig,
        );
        send(sock.as_fd(), &msg, SendFlags::empty())?;
        let (n, _) = recv(sock.as_fd(), &mut buf, RecvFlags::empty())?;
        if n >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == NLMSG_ERROR {
            match i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]) {
                0 => deleted += 1,
                -2 => {}
                code => return Err(std::io::Error::from_raw_os_error(-code)),
            }
        }
    }
    Ok(deleted)
}

/// Cut the flows `policy` no longer permits in another process's namespaces, by running this
/// binary's hidden `internal-conntrack-revoke` command inside them (joining a user namespace
/// needs a single-threaded process, which a fresh child is). The child recomputes the policy
/// from the container's bundle, so nothing but a path crosses the process boundary.
pub fn revoke_in(
    user: Option<&std::path::Path>,
    net: &std::path::Path,
    bundle_dir: &std::path::Path,
    name: &str,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::os::unix::process::CommandExt;
    let ns = super::netns::NsFiles::open(user, Some(net))?;
    let exe = std::env::current_exe().context("cannot find this program's own path")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("internal-conntrack-revoke")
        .arg(bundle_dir)
        .arg(name)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: only setns(2)/setres[ug]id(2) on descriptors opened before the fork.
    unsafe {
        cmd.pre_exec(move || ns.enter());
    }
    let mut child = cmd
        .spawn()
        .context("failed to start the connection-revoking helper")?;
    // Bounded like every nft call: a helper that hangs must not hold the bundle lock (and
    // every later live command on the container) for ever.
    let (status, _, stderr) = super::nft::communicate(&mut child, None, REVOKE_TIMEOUT)
        .context("the connection-revoking helper did not finish; run the command again")?;
    if !status.success() {
        anyhow::bail!(
            "failed to cut open connections: {}",
            String::from_utf8_lossy(&stderr).trim()
        );
    }
    Ok(())
}

/// How long the connection-revoking helper may take: a dump and the deletes of a busy
/// container's flows take well under a second.
const REVOKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How many flows the calling thread's network namespace tracks (its own count, from
/// /proc/sys/net/netfilter, which shows the opener's namespace), if the kernel says.
///
/// A dump walks the kernel's whole conntrack hash table, shared by every namespace (262,144
/// buckets here: ~9 ms), to find this namespace's entries; with none there is nothing to cut,
/// and any flow made after this read was judged by the new policy, already in force.
fn tracked_here() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// In the container's namespaces: delete every flow that neither `policy` nor a DNS-learned
/// set element (`learned`, read from the live table) permits (`Policy::keeps_flow`).
pub fn revoke_current_netns(
    policy: &crate::core::policy::Policy,
    learned: &[crate::core::verify::Learned],
) -> std::io::Result<usize> {
    if tracked_here() == Some(0) {
        return Ok(0);
    }
    let doomed: Vec<Flow> = dump_current_netns()?
        .into_iter()
        .filter(|f| !policy.keeps_flow(learned, f.dst, f.proto, f.dport))
        .collect();
    delete_flows(&doomed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::policy::{AllowRule, Mode, Policy};
    use std::process::Command;

    /// The framing the kernel gets, byte for byte: nlmsghdr (length covering the attributes,
    /// which go as they came, unpadded), then nfgenmsg (family, version 0, res_id 0).
    #[test]
    fn requests_are_header_nfgenmsg_and_the_attributes_as_given() {
        let tuple = [9, 0, 1, 0x80, 1, 2, 3, 4, 5];
        let msg = request(
            IPCTNL_MSG_CT_DELETE,
            NLM_F_REQUEST | NLM_F_ACK,
            7,
            2,
            &tuple,
        );
        let mut expected = Vec::new();
        expected.extend_from_slice(&29u32.to_ne_bytes());
        expected.extend_from_slice(&((1u16 << 8) | 2).to_ne_bytes());
        expected.extend_from_slice(&5u16.to_ne_bytes());
        expected.extend_from_slice(&7u32.to_ne_bytes());
        expected.extend_from_slice(&0u32.to_ne_bytes());
        expected.extend_from_slice(&[2, 0, 0, 0]);
        expected.extend_from_slice(&tuple);
        assert_eq!(msg, expected);
        assert_eq!(
            request(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, 1, 0, &[]).len(),
            20
        );
    }

    #[test]
    fn revoke_deletes_exactly_the_flows_the_policy_refuses() {
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
        for (dst, dport) in [
            ("198.51.100.10", "80"),
            ("198.51.100.20", "80"),
            ("198.18.0.5", "443"),
        ] {
            let out = run(&[
                "conntrack",
                "-I",
                "-p",
                "tcp",
                "-s",
                "198.51.100.2",
                "-d",
                dst,
                "--sport",
                "40000",
                "--dport",
                dport,
                "--state",
                "ESTABLISHED",
                "-t",
                "120",
                "-u",
                "ASSURED",
            ]);
            assert!(
                out.status.success(),
                "conntrack -I: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let out = run(&[
            "conntrack",
            "-I",
            "-p",
            "udp",
            "-s",
            "2001:db8:ffff::2",
            "-d",
            "2001:db8::20",
            "--sport",
            "5000",
            "--dport",
            "53",
            "-t",
            "120",
        ]);
        assert!(
            out.status.success(),
            "conntrack -I v6: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut policy = Policy::new(Mode::DenyAll);
        policy.allow.push(AllowRule {
            net: "198.51.100.10/32".parse().unwrap(),
            scope: None,
        });
        policy.allow.push(AllowRule {
            net: "198.18.0.0/16".parse().unwrap(),
            scope: None,
        });
        let ns_path = format!("/run/netns/{name}");
        let (flows, deleted) = std::thread::spawn(move || {
            let f = std::fs::File::open(ns_path).unwrap();
            rustix::thread::move_into_link_name_space(
                f.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .unwrap();
            let flows = dump_current_netns().unwrap();
            (flows, revoke_current_netns(&policy, &[]).unwrap())
        })
        .join()
        .unwrap();
        assert_eq!(flows.len(), 4, "{flows:?}");
        assert!(flows
            .iter()
            .any(|f| f.dst.to_string() == "2001:db8::20" && f.proto == 17 && f.dport == Some(53)));
        assert_eq!(deleted, 2);
        let left = String::from_utf8_lossy(&run(&["conntrack", "-L"]).stdout).to_string()
            + &String::from_utf8_lossy(&run(&["conntrack", "-L", "-f", "ipv6"]).stdout);
        assert!(
            left.contains("dst=198.51.100.10") && left.contains("dst=198.18.0.5"),
            "{left}"
        );
        assert!(
            !left.contains("dst=198.51.100.20") && !left.contains("dst=2001:db8::20"),
            "{left}"
        );
        Command::new("ip")
            .args(["netns", "del", &name])
            .status()
            .unwrap();
    }

    #[test]
    fn malformed_messages_are_skipped() {
        assert!(parse_flow(&[]).is_none());
        assert!(parse_flow(&[2, 0, 0, 0, 0xff, 0xff, 1, 0]).is_none());
        assert_eq!(
            attrs(&[8, 0, 1, 0, 1, 2]).count(),
            0,
            "length beyond the buffer"
        );
    }
}
