//! End-to-end: what the builtin DNS tier (`dns.tier: builtin`) does with the records it is
//! given, in a real rootless container with the real hook, the real resolver and the fake
//! internet's DNS server ([`e2e::world::Zone`]):
//!
//! - a name that rotates to a new address opens it on the next lookup;
//! - learned addresses expire with the TTL clamped by `dns.max_ttl`, and come back on the
//!   next lookup;
//! - a CNAME chain that starts at an allowed name opens the address it ends at (only);
//! - questions over TCP are answered; an upstream answer truncated over UDP is asked again
//!   over TCP; an answer too big for the client's UDP limit goes back truncated, but its
//!   addresses are learned and the client gets them all over TCP;
//! - private answers (DNS rebinding) are removed and not learned unless allowlisted;
//! - the workload cannot query any DNS server itself, over IPv6 or TCP either.
//!
//! The busybox image has no TCP DNS client: the tests build a query here, send it with
//! `printf | nc` and read the reply back through `xxd -p`. Needs root and
//! scripts/podman-env.sh.

#[macro_use]
mod common;
use common::e2e;

use std::collections::BTreeSet;
use std::net::{IpAddr, UdpSocket};
use std::os::fd::AsFd;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hickory_proto::op::Message;
use hickory_proto::rr::RData;
use serde_json::Value;

use e2e::cmd::Out;
use e2e::world::*;
use e2e::{dns_config, probe_script, E2e, Probes, IMAGE, RAN};

/// The shell waits (at most 3 s) for slirp4netns' IPv6 default route.
const WAIT_V6: &str =
    "i=0; while [ $i -lt 30 ] && ! ip -6 route | grep -q '^default'; do sleep 0.1; i=$((i+1)); done\n";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Write the config and the profile, start a detached shielded container; its name.
fn detached(h: &mut E2e, config: &str, tag: &str, profile: &str) -> String {
    h.set_config(config);
    let prof = format!("e2e-{tag}");
    h.profile(&prof, profile);
    let name = h.name(tag);
    h.run_detached(&name, &prof).expect_ok();
    name
}

/// [`detached`], but started while the fake zone has no records of the names in `hidden`, so
/// `prepare`'s start-time lookup finds nothing for them; then they get their records of the
/// default [`Zone`] back. Whatever the container reaches through these names afterwards, it
/// learned through its resolver.
fn detached_hidden(h: &mut E2e, config: &str, tag: &str, profile: &str, hidden: &[&str]) -> String {
    for n in hidden {
        h.world.set_records(n, &[]);
    }
    let name = detached(h, config, tag, profile);
    let zone = Zone::default();
    for n in hidden {
        let records: Vec<(Rdata, u32)> = zone
            .records
            .iter()
            .filter(|r| r.owner == *n)
            .map(|r| (r.data.clone(), r.ttl))
            .collect();
        assert!(
            !records.is_empty(),
            "{n} has no records in the default zone"
        );
        h.world.set_records(n, &records);
    }
    let state = h.state_json(&name);
    for n in hidden {
        let addrs = &state["resolved"][*n]["addrs"];
        assert!(
            addrs.as_array().is_none_or(|a| a.is_empty()),
            "{n} was resolved at start after all: {state}"
        );
    }
    name
}

/// Shell: `nslookup NAME [SERVER]` (UDP), its output between two marker lines.
fn lookup(tag: &str, name: &str, server: Option<&str>) -> String {
    format!(
        "echo '<<{tag}'; timeout 5 nslookup {name} {} 2>&1; echo '{tag}>>'\n",
        server.unwrap_or("")
    )
}

/// The addresses a [`lookup`] printed (the server's own address left out).
#[track_caller]
fn looked_up(out: &Out, tag: &str) -> BTreeSet<IpAddr> {
    let text = between(out, tag);
    text.lines()
        .filter(|l| !l.starts_with("Server:"))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|w| w.parse::<IpAddr>().ok())
        .filter(|a| !a.is_loopback())
        .collect()
}

#[track_caller]
fn between<'a>(out: &'a Out, tag: &str) -> &'a str {
    let (start, end) = (format!("<<{tag}\n"), format!("{tag}>>"));
    let from = out
        .stdout
        .find(&start)
        .unwrap_or_else(|| panic!("no output of {tag}: {out}"));
    let rest = &out.stdout[from + start.len()..];
    let to = rest
        .find(&end)
        .unwrap_or_else(|| panic!("output of {tag} does not end: {out}"));
    &rest[..to]
}

/// A DNS query (RD set, no EDNS) for `name` of type `qtype`.
fn query_bytes(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    query_bytes_edns(id, name, qtype, None)
}

/// A DNS query for `name` of type `qtype`, with an EDNS OPT record advertising `payload`.
fn query_bytes_edns(id: u16, name: &str, qtype: u16, payload: Option<u16>) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    let arcount = u8::from(payload.is_some());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, arcount]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    if let Some(size) = payload {
        q.extend_from_slice(&[0, 0, 41]); // root name, type OPT
        q.extend_from_slice(&size.to_be_bytes());
        q.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // extended rcode, version, flags, rdlen
    }
    q
}

/// Send `query` over UDP to the container's resolver (127.0.0.1:53) from a thread of this
/// process inside the container's network namespace (busybox has no UDP client that shows
/// the reply's header); the reply, parsed.
fn udp_in_container(h: &E2e, name: &str, query: &[u8]) -> Message {
    let pid = pid_of(h, name);
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
        .unwrap_or_else(|e| panic!("open the netns of {name} (pid {pid}): {e}"));
    let q = query.to_vec();
    let got = std::thread::spawn(move || -> Result<Vec<u8>, String> {
        // Only this single-use thread enters the container's namespace.
        rustix::thread::move_into_link_name_space(
            ns.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .map_err(|e| format!("setns: {e}"))?;
        let sock = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        sock.send_to(&q, "127.0.0.1:53")
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 65535];
        let (n, _) = sock.recv_from(&mut buf).map_err(|e| format!("recv: {e}"))?;
        Ok(buf[..n].to_vec())
    })
    .join()
    .unwrap()
    .unwrap_or_else(|e| panic!("UDP question to the resolver of {name}: {e}"));
    let msg = Message::from_vec(&got).unwrap_or_else(|e| panic!("unparsable UDP reply ({e})"));
    assert_eq!(msg.metadata.id, u16::from_be_bytes([query[0], query[1]]));
    msg
}

/// Shell: send one length-prefixed query over TCP to `server` port 53 with busybox
/// `printf | nc`, print the reply as hex on the line `TCPDNS-TAG: HEX` (empty if none).
fn tcp_lookup(tag: &str, server: &str, name: &str, qtype: u16) -> String {
    let q = query_bytes(0x4a4a, name, qtype);
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    let esc: String = framed.iter().map(|b| format!("\\{b:03o}")).collect();
    format!(
        "echo \"TCPDNS-{tag}: $(printf '{esc}' | timeout 5 nc {server} 53 2>/dev/null | xxd -p | tr -d '\\n')\"\n"
    )
}

/// The reply a [`tcp_lookup`] printed, parsed; None if nothing came back.
#[track_caller]
fn tcp_reply(out: &Out, tag: &str) -> Option<Message> {
    let prefix = format!("TCPDNS-{tag}: ");
    let hex = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no line {prefix}: {out}"))
        .trim();
    if hex.is_empty() {
        return None;
    }
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    assert!(bytes.len() >= 2, "{tag}: short TCP reply {hex}");
    let len = usize::from(u16::from_be_bytes([bytes[0], bytes[1]]));
    assert_eq!(bytes.len(), len + 2, "{tag}: TCP reply length {hex}");
    let msg = Message::from_vec(&bytes[2..])
        .unwrap_or_else(|e| panic!("{tag}: unparsable TCP reply ({e}): {hex}"));
    assert_eq!(msg.metadata.id, 0x4a4a, "{tag}: reply to another query");
    Some(msg)
}

/// The A and AAAA addresses in the answer section, with their TTLs.
fn answer_addrs(msg: &Message) -> Vec<(IpAddr, u32)> {
    msg.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((IpAddr::V4(a.0), r.ttl)),
            RData::AAAA(a) => Some((IpAddr::V6(a.0), r.ttl)),
            _ => None,
        })
        .collect()
}

/// The elements of a learned set, read with `terok-shield rules NAME --json`: addresses as
/// text, service elements as `ADDR . PROTO . PORT`.
fn set_elems(h: &E2e, name: &str, set: &str) -> BTreeSet<String> {
    elems_of(&h.rules_json(name), set)
        .into_iter()
        .map(|(e, _)| e)
        .collect()
}

/// `(element, timeout in seconds if any)` of `set` in an `nft -j list` document.
fn elems_of(doc: &Value, set: &str) -> Vec<(String, Option<u64>)> {
    let items = doc["nftables"].as_array().cloned().unwrap_or_default();
    let found = items
        .iter()
        .find(|i| i["set"]["name"] == set)
        .unwrap_or_else(|| panic!("no set {set} in: {doc}"));
    fn render(v: &Value) -> String {
        match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Object(o) if o.contains_key("concat") => o["concat"]
                .as_array()
                .unwrap()
                .iter()
                .map(render)
                .collect::<Vec<_>>()
                .join(" . "),
            Value::Object(o) if o.contains_key("prefix") => format!(
                "{}/{}",
                render(&o["prefix"]["addr"]),
                render(&o["prefix"]["len"])
            ),
            other => other.to_string(),
        }
    }
    found["set"]["elem"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| match e.get("elem") {
            Some(inner) => (render(&inner["val"]), inner["timeout"].as_u64()),
            None => (render(e), None),
        })
        .collect()
}

/// The host PID of a running container (for `nsenter`).
fn pid_of(h: &E2e, name: &str) -> String {
    let out = h
        .podman(&["inspect", "--format", "{{.State.Pid}}", name])
        .expect_ok();
    out.stdout.trim().to_string()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Questions the world answered for `name` after the first `since` of its log, as
/// `(qtype, tcp, truncated, server)`.
fn asked(h: &E2e, since: usize, name: &str) -> Vec<(u16, bool, bool, IpAddr)> {
    h.world
        .dns_log()
        .into_iter()
        .skip(since)
        .filter(|q| q.name == name)
        .map(|q| (q.qtype, q.tcp, q.truncated, q.server.ip()))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Rotation and TTL
// ---------------------------------------------------------------------------------------

/// The fake DNS server rotates `rotate.e2e.test` from A to B while the container runs: B
/// stays refused until the workload looks the name up again, then it is reachable. A was
/// reachable after the first lookup and stays open until its own TTL lapses (300 s here).
#[test]
fn rotation_opens_the_new_address_on_the_next_lookup() {
    let mut h = e2e!();
    let name = detached_hidden(
        &mut h,
        &dns_config("builtin", ""),
        "dnsr-rot",
        "rotate.e2e.test\n",
        &["rotate.e2e.test"],
    );
    let since = h.world.dns_log().len();
    let mark = h.world.mark();
    let script = format!(
        "{}{}",
        lookup("FIRST", "rotate.e2e.test", None),
        probe_script(&[(ROTATE_A4, 80), (ROTATE_B4, 80)])
    );
    let out = h.exec(&name, &script).expect_ok();
    assert_eq!(
        looked_up(&out, "FIRST"),
        BTreeSet::from([ip(ROTATE_A4)]),
        "{out}"
    );
    let p = Probes::of(&out, &h.world, mark);
    p.reached(ROTATE_A4, 80);
    p.refused_fast(ROTATE_B4, 80);

    h.world.set_records(
        "rotate.e2e.test",
        &[(Rdata::A(ROTATE_B4.parse().unwrap()), 300)],
    );
    // The rotation alone opens nothing.
    let mark = h.world.mark();
    let out = h.exec(&name, &probe_script(&[(ROTATE_B4, 80)])).expect_ok();
    Probes::of(&out, &h.world, mark).refused_fast(ROTATE_B4, 80);

    let mark = h.world.mark();
    let script = format!(
        "{}{}",
        lookup("SECOND", "rotate.e2e.test", None),
        probe_script(&[(ROTATE_B4, 80), (ROTATE_A4, 80)])
    );
    let out = h.exec(&name, &script).expect_ok();
    assert_eq!(
        looked_up(&out, "SECOND"),
        BTreeSet::from([ip(ROTATE_B4)]),
        "the resolver did not pass the rotated answer: {out}"
    );
    let p = Probes::of(&out, &h.world, mark);
    p.reached(ROTATE_B4, 80);
    p.reached(ROTATE_A4, 80);
    let v4 = set_elems(&h, &name, "dns_v4");
    assert!(
        v4.contains(ROTATE_A4) && v4.contains(ROTATE_B4),
        "dns_v4 should hold both answers until their TTLs lapse: {v4:?}"
    );
    let upstream: Vec<_> = asked(&h, since, "rotate.e2e.test")
        .into_iter()
        .filter(|q| q.0 == 1)
        .collect();
    assert_eq!(
        upstream.len(),
        2,
        "one upstream A question per lookup: {upstream:?}"
    );
}

/// With `dns.max_ttl: 2` a learned address lives 2 s although the record says 300: in the
/// set (element timeout), in learned.jsonl and in the TTL the client is given. A few seconds
/// after the lookup new connections are refused and the set no longer holds it; the next
/// lookup opens it again.
#[test]
fn learned_addresses_expire_after_the_clamped_ttl_and_return_on_the_next_lookup() {
    let mut h = e2e!();
    let name = detached_hidden(
        &mut h,
        &dns_config("builtin", "  min_ttl: 1\n  max_ttl: 2\n"),
        "dnsr-ttl",
        "ttl.e2e.test\n",
        &["ttl.e2e.test"],
    );

    // Look up and read the set at once, from inside the container's netns (as root, so the
    // element cannot lapse between the two).
    let pid = pid_of(&h, &name);
    let out = e2e::cmd::run(
        "nsenter",
        &[
            "-t",
            &pid,
            "-n",
            "sh",
            "-c",
            "busybox nslookup ttl.e2e.test 127.0.0.1 >/dev/null 2>&1; nft -j list set inet terok_shield dns_v4",
        ],
        Duration::from_secs(30),
    )
    .unwrap()
    .expect_ok();
    let doc: Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("nft -j is not JSON ({e}): {out}"));
    let elems = elems_of(&doc, "dns_v4");
    assert!(
        elems.contains(&(TTL4.to_string(), Some(2))),
        "expected {TTL4} with a 2 s timeout (max_ttl) in dns_v4: {elems:?}"
    );
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        !set_elems(&h, &name, "dns_v4").contains(TTL4),
        "the element outlived its timeout"
    );

    // The workload: lookup, connect at once, TCP lookup to see the TTL it is given.
    let t0 = unix_now();
    let mark = h.world.mark();
    let script = format!(
        "{}{}{}",
        lookup("FIRST", "ttl.e2e.test", None),
        probe_script(&[(TTL4, 80)]),
        tcp_lookup("TTL", "127.0.0.1", "ttl.e2e.test", 1),
    );
    let out = h.exec(&name, &script).expect_ok();
    let t1 = unix_now();
    assert_eq!(
        looked_up(&out, "FIRST"),
        BTreeSet::from([ip(TTL4)]),
        "{out}"
    );
    Probes::of(&out, &h.world, mark).reached(TTL4, 80);
    let reply = tcp_reply(&out, "TTL").expect("no TCP reply");
    assert_eq!(
        answer_addrs(&reply),
        vec![(ip(TTL4), 2)],
        "the client must not be told to cache longer than the set keeps it"
    );
    // learned.jsonl: until = lookup time + ttl + 1.
    let learned = h.read(&h.bundle_dir(&name).join("learned.jsonl"));
    let untils: Vec<u64> = learned
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["addr"] == TTL4 && r["domain"] == "ttl.e2e.test")
        .filter_map(|r| r["until"].as_u64())
        .collect();
    assert!(!untils.is_empty(), "{learned}");
    for until in &untils {
        assert!(
            *until as f64 <= t1.ceil() + 3.0,
            "learned.jsonl keeps {TTL4} until {until}, more than 2 s after the lookup (done by {t1}): {learned}"
        );
    }
    assert!(
        untils.iter().any(|u| *u as f64 >= t0.floor() + 3.0),
        "no learned.jsonl record of this lookup (after {t0}): {learned}"
    );

    // Let the 2 s run out (counted from the last lookup, the TCP one at the end of the
    // exec), then: refused, and not in the set.
    std::thread::sleep(Duration::from_millis(3500));
    let v4 = set_elems(&h, &name, "dns_v4");
    assert!(!v4.contains(TTL4), "expired element still listed: {v4:?}");
    let mark = h.world.mark();
    let out = h.exec(&name, &probe_script(&[(TTL4, 80)])).expect_ok();
    Probes::of(&out, &h.world, mark).refused_fast(TTL4, 80);

    // A fresh lookup opens it again.
    let mark = h.world.mark();
    let script = format!(
        "{}{}",
        lookup("AGAIN", "ttl.e2e.test", None),
        probe_script(&[(TTL4, 80)])
    );
    let out = h.exec(&name, &script).expect_ok();
    assert_eq!(
        looked_up(&out, "AGAIN"),
        BTreeSet::from([ip(TTL4)]),
        "{out}"
    );
    Probes::of(&out, &h.world, mark).reached(TTL4, 80);
}

// ---------------------------------------------------------------------------------------
// CNAME chains
// ---------------------------------------------------------------------------------------

/// `alias.e2e.test` (allowed) -> `hop.e2e.test` -> `final.e2e.test` (neither allowed) ->
/// CNAME4: the final address is learned, for the allowed name, and reachable. The answer
/// also carries an A record of `stray.e2e.test`, which is not on the chain: not learned.
/// The chain's names are not allowed by themselves, and the resolver never asks for them.
#[test]
fn a_cname_chain_from_an_allowed_name_opens_its_final_address_only() {
    let mut h = e2e!();
    let name = detached_hidden(
        &mut h,
        &dns_config("builtin", ""),
        "dnsr-cname",
        "alias.e2e.test\n",
        &["alias.e2e.test"],
    );
    let since = h.world.dns_log().len();
    let mark = h.world.mark();
    let script = format!(
        "{}{}{}{}",
        lookup("ALIAS", "alias.e2e.test", None),
        tcp_lookup("ALIAS", "127.0.0.1", "alias.e2e.test", 1),
        probe_script(&[(CNAME4, 80), (STRAY4, 80)]),
        lookup("FINAL", "final.e2e.test", None),
    );
    let out = h.exec(&name, &script).expect_ok();
    assert!(
        looked_up(&out, "ALIAS").contains(&ip(CNAME4)),
        "the chain's address was not answered: {out}"
    );
    let reply = tcp_reply(&out, "ALIAS").expect("no TCP reply");
    let chain: Vec<String> = reply
        .answers
        .iter()
        .map(|r| format!("{} {}", r.name, r.data))
        .collect();
    assert!(
        chain
            .iter()
            .any(|r| r.starts_with("alias.e2e.test.") && r.contains("hop.e2e.test"))
            && chain
                .iter()
                .any(|r| r.starts_with("hop.e2e.test.") && r.contains("final.e2e.test"))
            && chain
                .iter()
                .any(|r| r.starts_with("final.e2e.test.") && r.contains(CNAME4)),
        "the client did not get the whole chain: {chain:?}"
    );
    let p = Probes::of(&out, &h.world, mark);
    p.reached(CNAME4, 80);
    p.refused_fast(STRAY4, 80);
    assert!(
        looked_up(&out, "FINAL").is_empty(),
        "a chain target answered although it is not allowlisted: {out}"
    );

    let v4 = set_elems(&h, &name, "dns_v4");
    assert!(v4.contains(CNAME4), "{v4:?}");
    assert!(
        !v4.contains(STRAY4),
        "an off-chain record was learned: {v4:?}"
    );
    let learned = h.read(&h.bundle_dir(&name).join("learned.jsonl"));
    assert!(
        learned
            .lines()
            .any(|l| l.contains(&format!("\"addr\":\"{CNAME4}\""))
                && l.contains("\"domain\":\"alias.e2e.test\"")),
        "{CNAME4} not attributed to the allowed name: {learned}"
    );
    for other in ["hop.e2e.test", "final.e2e.test", "stray.e2e.test"] {
        assert!(
            asked(&h, since, other).is_empty(),
            "{other} was asked upstream: {:?}",
            h.world.dns_log()
        );
    }
}

// ---------------------------------------------------------------------------------------
// TCP and truncation
// ---------------------------------------------------------------------------------------

/// The upstream truncates `tc.e2e.test` over UDP (TC=1, no records): the resolver asks again
/// over TCP, learns the address and gives the UDP client the whole (small) answer.
#[test]
fn a_truncated_upstream_answer_is_asked_again_over_tcp() {
    let mut h = e2e!();
    let name = detached_hidden(
        &mut h,
        &dns_config("builtin", ""),
        "dnsr-tc",
        "tc.e2e.test\n",
        &["tc.e2e.test"],
    );
    let since = h.world.dns_log().len();
    let mark = h.world.mark();
    let script = format!(
        "{}{}",
        lookup("TC", "tc.e2e.test", None),
        probe_script(&[(TC4, 80)])
    );
    let out = h.exec(&name, &script).expect_ok();
    assert_eq!(looked_up(&out, "TC"), BTreeSet::from([ip(TC4)]), "{out}");
    Probes::of(&out, &h.world, mark).reached(TC4, 80);
    let a: Vec<_> = asked(&h, since, "tc.e2e.test")
        .into_iter()
        .filter(|q| q.0 == 1)
        .collect();
    assert_eq!(
        a,
        vec![(1, false, true, ip(DNS4)), (1, true, false, ip(DNS4))],
        "expected a truncated UDP answer, then the same question over TCP"
    );
    assert!(set_elems(&h, &name, "dns_v4").contains(TC4));
}

/// `big.e2e.test` has 40 A records: too big for 512 bytes of UDP. The upstream truncates
/// it; the resolver asks again over TCP and learns all 40 before it replies. A UDP client
/// without EDNS gets TC=1 and no records; one with EDNS and a 4096-byte buffer gets all 40
/// over UDP; the workload asking over TCP gets all 40, and they are reachable, while an
/// address of the same prefix that no answer named stays refused.
#[test]
fn an_answer_too_big_for_udp_is_learned_whole_and_served_over_tcp() {
    let mut h = e2e!();
    let name = detached_hidden(
        &mut h,
        &dns_config("builtin", ""),
        "dnsr-big",
        "big.e2e.test\n",
        &["big.e2e.test"],
    );
    let since = h.world.dns_log().len();
    let big: BTreeSet<String> = (0..BIG_COUNT).map(|i| big_addr(i).to_string()).collect();
    let addrs = |m: &Message| -> BTreeSet<String> {
        answer_addrs(m)
            .into_iter()
            .map(|(a, _)| a.to_string())
            .collect()
    };

    let reply = udp_in_container(&h, &name, &query_bytes(0x5151, "big.e2e.test", 1));
    assert!(
        reply.metadata.truncation && reply.answers.is_empty(),
        "a 512-byte UDP client should get TC=1 and no records: {reply:?}"
    );
    let a: Vec<_> = asked(&h, since, "big.e2e.test");
    assert_eq!(
        a,
        vec![(1, false, true, ip(DNS4)), (1, true, false, ip(DNS4))],
        "expected a truncated UDP answer, then the same question over TCP"
    );
    let v4 = set_elems(&h, &name, "dns_v4");
    assert!(
        big.is_subset(&v4),
        "the truncated UDP answer did not come with all {BIG_COUNT} addresses learned (missing {:?})",
        big.difference(&v4).collect::<Vec<_>>()
    );

    let reply = udp_in_container(
        &h,
        &name,
        &query_bytes_edns(0x5252, "big.e2e.test", 1, Some(4096)),
    );
    assert!(!reply.metadata.truncation, "{reply:?}");
    assert_eq!(
        addrs(&reply),
        big,
        "an EDNS client got an incomplete answer"
    );

    let first = big_addr(0).to_string();
    let last = big_addr(BIG_COUNT - 1).to_string();
    let unnamed = "198.18.6.50";
    let tcp_before = asked(&h, since, "big.e2e.test")
        .iter()
        .filter(|q| q.1)
        .count();
    let mark = h.world.mark();
    let script = format!(
        "{}{}",
        tcp_lookup("BIG", "127.0.0.1", "big.e2e.test", 1),
        probe_script(&[(&first, 80), (&last, 443), (unnamed, 80)])
    );
    let out = h.exec(&name, &script).expect_ok();
    let reply = tcp_reply(&out, "BIG").expect("no TCP reply from the resolver");
    assert!(!reply.metadata.truncation, "TC over TCP: {reply:?}");
    assert_eq!(addrs(&reply), big, "the TCP answer lacks addresses");
    let p = Probes::of(&out, &h.world, mark);
    p.reached(&first, 80);
    p.reached(&last, 443);
    p.refused_fast(unnamed, 80);
    let tcp_after = asked(&h, since, "big.e2e.test")
        .iter()
        .filter(|q| q.1)
        .count();
    assert_eq!(
        tcp_after,
        tcp_before + 1,
        "a TCP question from the client goes upstream over TCP, once"
    );
}

// ---------------------------------------------------------------------------------------
// DNS rebinding
// ---------------------------------------------------------------------------------------

/// `rebind.e2e.test` answers a public A, an RFC 1918 A and a ULA AAAA. With only the name
/// allowlisted, the private addresses are removed from the answer (UDP and TCP), never
/// learned, and the ULA host is refused; the public address passes.
#[test]
fn private_answers_are_removed_and_not_learned_unless_allowlisted() {
    let mut h = e2e!();
    let name = detached_hidden(
        &mut h,
        &dns_config("builtin", ""),
        "dnsr-rebind",
        "rebind.e2e.test\n",
        &["rebind.e2e.test"],
    );
    let since = h.world.dns_log().len();
    let mark = h.world.mark();
    let script = format!(
        "{WAIT_V6}{}{}{}{}",
        lookup("REBIND", "rebind.e2e.test", None),
        tcp_lookup("A", "127.0.0.1", "rebind.e2e.test", 1),
        tcp_lookup("AAAA", "127.0.0.1", "rebind.e2e.test", 28),
        probe_script(&[(REBIND_PUB4, 80), (ULA6, 80)]),
    );
    let out = h.exec(&name, &script).expect_ok();
    assert_eq!(
        looked_up(&out, "REBIND"),
        BTreeSet::from([ip(REBIND_PUB4)]),
        "{out}"
    );
    let a = tcp_reply(&out, "A").expect("no TCP reply (A)");
    assert_eq!(
        answer_addrs(&a)
            .into_iter()
            .map(|x| x.0)
            .collect::<Vec<_>>(),
        vec![ip(REBIND_PUB4)]
    );
    let aaaa = tcp_reply(&out, "AAAA").expect("no TCP reply (AAAA)");
    assert_eq!(answer_addrs(&aaaa), vec![], "the ULA answer was passed on");
    let p = Probes::of(&out, &h.world, mark);
    p.reached(REBIND_PUB4, 80);
    p.refused_fast(ULA6, 80);
    // The upstream did answer the private records: the resolver removed them.
    let q = asked(&h, since, "rebind.e2e.test");
    assert!(
        q.iter().any(|q| q.0 == 1) && q.iter().any(|q| q.0 == 28),
        "{q:?}"
    );
    let v4 = set_elems(&h, &name, "dns_v4");
    assert!(v4.contains(REBIND_PUB4), "{v4:?}");
    assert!(
        !v4.contains(REBIND_PRIV4),
        "a private address was learned: {v4:?}"
    );
    for set in ["dns_v6", "dns_svc_v6", "dns_svc_v4"] {
        let e = set_elems(&h, &name, set);
        assert!(
            !e.iter()
                .any(|x| x.starts_with(ULA6) || x.starts_with(REBIND_PRIV4)),
            "{set} learned a private address: {e:?}"
        );
    }
}

/// With the private addresses allowlisted (the RFC 1918 one whole, the ULA for 443/tcp
/// only), the answer keeps them, and the name opens no more than the allowlist did: the ULA
/// is learned for 443/tcp only, never as a whole host.
#[test]
fn allowlisted_private_answers_pass_within_the_allowlisted_ports() {
    let mut h = e2e!();
    let name = detached_hidden(
        &mut h,
        &dns_config("builtin", ""),
        "dnsr-rebind-ok",
        &format!("rebind.e2e.test\n{REBIND_PRIV4}\n[{ULA6}]:443/tcp\n"),
        &["rebind.e2e.test"],
    );
    let mark = h.world.mark();
    let script = format!(
        "{WAIT_V6}{}{}",
        lookup("REBIND", "rebind.e2e.test", None),
        probe_script(&[(ULA6, 443), (ULA6, 80)]),
    );
    let out = h.exec(&name, &script).expect_ok();
    assert_eq!(
        looked_up(&out, "REBIND"),
        BTreeSet::from([ip(REBIND_PUB4), ip(REBIND_PRIV4), ip(ULA6)]),
        "{out}"
    );
    let p = Probes::of(&out, &h.world, mark);
    p.reached(ULA6, 443);
    p.refused_fast(ULA6, 80);
    let v4 = set_elems(&h, &name, "dns_v4");
    assert!(
        v4.contains(REBIND_PUB4) && v4.contains(REBIND_PRIV4),
        "{v4:?}"
    );
    let v6 = set_elems(&h, &name, "dns_v6");
    assert!(
        !v6.contains(ULA6),
        "the name opened the whole ULA host: {v6:?}"
    );
    let svc6 = set_elems(&h, &name, "dns_svc_v6");
    assert_eq!(
        svc6,
        BTreeSet::from([format!("{ULA6} . tcp . 443")]),
        "the ULA should be learned for 443/tcp only"
    );
}

// ---------------------------------------------------------------------------------------
// Direct DNS
// ---------------------------------------------------------------------------------------

/// Every way a workload could ask a DNS server itself: UDP and TCP to the upstream, to
/// another server, over IPv4 and IPv6.
fn direct_dns_script() -> String {
    let mut s = format!("echo {RAN}\n{WAIT_V6}");
    for (tag, server) in [("V4", DNS4), ("OTHER4", OTHER_DNS4), ("V6", DNS6)] {
        s.push_str(&lookup(&format!("UDP-{tag}"), "svc.e2e.test", Some(server)));
        s.push_str(&tcp_lookup(
            &format!("TCP-{tag}"),
            server,
            "svc.e2e.test",
            1,
        ));
    }
    s
}

/// The control: a plain container asks every world DNS server over UDP and TCP, IPv4 and
/// IPv6, and gets answers, so every refusal in the shielded test is the shield's doing.
#[test]
fn control_unshielded_container_queries_every_world_dns_server() {
    let mut h = e2e!();
    let name = h.name("dnsr-control");
    let out = h
        .podman(&[
            "run",
            "--rm",
            "--name",
            &name,
            IMAGE,
            "sh",
            "-c",
            &direct_dns_script(),
        ])
        .expect_ok();
    for tag in ["V4", "OTHER4", "V6"] {
        assert_eq!(
            looked_up(&out, &format!("UDP-{tag}")),
            BTreeSet::from([ip(NAMED4)]),
            "UDP-{tag}: {out}"
        );
        let reply = tcp_reply(&out, &format!("TCP-{tag}"))
            .unwrap_or_else(|| panic!("TCP-{tag}: no reply: {out}"));
        assert_eq!(
            answer_addrs(&reply),
            vec![(ip(NAMED4), 300)],
            "TCP-{tag}: {out}"
        );
    }
    let log = h.world.dns_log();
    for server in [DNS4, OTHER_DNS4, DNS6] {
        for tcp in [false, true] {
            assert!(
                log.iter().any(|q| q.server.ip() == ip(server)
                    && q.tcp == tcp
                    && q.name == "svc.e2e.test"),
                "the world did not log a {} question to {server}: {log:?}",
                if tcp { "TCP" } else { "UDP" }
            );
        }
    }
}

/// The shielded workload asks the same servers the same ways: no answer, the TCP connects
/// are refused at once, and the world sees none of it. The resolver itself answers on ::1
/// and over TCP (its own TCP question then goes to the upstream only).
#[test]
fn direct_dns_over_ipv6_and_tcp_is_rejected() {
    let mut h = e2e!();
    let name = detached(
        &mut h,
        &dns_config("builtin", ""),
        "dnsr-direct",
        "svc.e2e.test\n",
    );
    let mark = h.world.mark();
    let log_before = h.world.dns_log().len();
    let script = format!(
        "{}{}{}",
        direct_dns_script(),
        probe_script(&[(DNS4, 53), (OTHER_DNS4, 53), (DNS6, 53)]),
        lookup("LOCAL6", "svc.e2e.test", Some("::1")),
    );
    let out = h.exec(&name, &script).expect_ok();
    for tag in ["V4", "OTHER4", "V6"] {
        assert!(
            looked_up(&out, &format!("UDP-{tag}")).is_empty(),
            "UDP-{tag} was answered: {out}"
        );
        assert!(
            tcp_reply(&out, &format!("TCP-{tag}")).is_none(),
            "TCP-{tag} was answered: {out}"
        );
    }
    let p = Probes::of(&out, &h.world, mark);
    p.refused_fast(DNS4, 53);
    p.refused_fast(OTHER_DNS4, 53);
    p.refused_fast(DNS6, 53);
    assert_eq!(
        looked_up(&out, "LOCAL6"),
        BTreeSet::from([ip(NAMED4)]),
        "the resolver did not answer on ::1: {out}"
    );
    let new: Vec<DnsQuery> = h.world.dns_log()[log_before..].to_vec();
    assert!(
        !new.is_empty() && new.iter().all(|q| q.server.ip() == ip(DNS4) && !q.tcp),
        "only the resolver's UDP questions (for LOCAL6) may reach the world: {new:?}"
    );

    let log_before = h.world.dns_log().len();
    let out = h
        .exec(&name, &tcp_lookup("LOCAL4", "127.0.0.1", "svc.e2e.test", 1))
        .expect_ok();
    let local = tcp_reply(&out, "LOCAL4").expect("the resolver did not answer over TCP");
    assert_eq!(
        answer_addrs(&local)
            .into_iter()
            .map(|x| x.0)
            .collect::<Vec<_>>(),
        vec![ip(NAMED4)]
    );
    let new: Vec<DnsQuery> = h.world.dns_log()[log_before..].to_vec();
    assert!(
        new.len() == 1 && new[0].tcp && new[0].server.ip() == ip(DNS4),
        "the resolver should ask the upstream once, over TCP like its client: {new:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Names resolved at start (`prepare`)
// ---------------------------------------------------------------------------------------

/// Regression: the builtin tier once resolved every exact name before start (as the static
/// tier does) and allowed the answers for good, private ones included, bypassing the
/// resolver's rule. Now nothing is allowed ahead: the lookup teaches the public address only.
#[test]
fn private_answers_at_start_are_not_allowed_either() {
    let mut h = e2e!();
    let name = detached(
        &mut h,
        &dns_config("builtin", ""),
        "dnsr-rebind-start",
        "rebind.e2e.test\n",
    );
    let mark = h.world.mark();
    let out = h
        .exec(
            &name,
            &format!(
                "{WAIT_V6}timeout 5 nslookup rebind.e2e.test >/dev/null 2>&1\n{}",
                probe_script(&[(REBIND_PUB4, 80), (ULA6, 80)])
            ),
        )
        .expect_ok();
    let rules = h.rules_json(&name);
    let allowed: Vec<String> = ["allow_v4", "allow_v6"]
        .iter()
        .flat_map(|s| elems_of(&rules, s).into_iter().map(|(e, _)| e))
        .collect();
    assert!(
        !allowed
            .iter()
            .any(|e| e == ULA6 || e == REBIND_PRIV4),
        "start-time private answers of rebind.e2e.test are in the allow sets: {allowed:?}\nstate.json: {}",
        h.state_json(&name)
    );
    let p = Probes::of(&out, &h.world, mark);
    p.reached(REBIND_PUB4, 80);
    p.refused_fast(ULA6, 80);
}

/// Regression: in the builtin tier an address resolved before start once stayed allowed for
/// the container's whole life, whatever `dns.max_ttl` said, in `allow_v4` (no timeouts).
#[test]
fn addresses_resolved_at_start_expire_with_max_ttl_too() {
    let mut h = e2e!();
    let name = detached(
        &mut h,
        &dns_config("builtin", "  min_ttl: 1\n  max_ttl: 2\n"),
        "dnsr-ttl-start",
        "ttl.e2e.test\n",
    );
    std::thread::sleep(Duration::from_secs(4));
    let mark = h.world.mark();
    let out = h.exec(&name, &probe_script(&[(TTL4, 80)])).expect_ok();
    let rules = h.rules_json(&name);
    let allowed: Vec<String> = elems_of(&rules, "allow_v4")
        .into_iter()
        .map(|(e, _)| e)
        .collect();
    assert!(
        !allowed.iter().any(|e| e == TTL4),
        "{TTL4} (ttl.e2e.test, resolved at start) is in allow_v4 with no timeout, > max_ttl (2 s) after start: {allowed:?}"
    );
    Probes::of(&out, &h.world, mark).refused_fast(TTL4, 80);
}

// ---------------------------------------------------------------------------------------
// The fake zone itself
// ---------------------------------------------------------------------------------------

/// The fake DNS server's zone answers what these tests rely on (no network, no root).
#[test]
fn fake_zone_answers_as_the_tests_expect() {
    let zone = Zone::default();
    let ask = |name: &str, qtype: u16, tcp: bool| -> (ZoneAnswer, Message) {
        let a = zone.answer(&query_bytes(7, name, qtype), tcp).unwrap();
        let m = Message::from_vec(&a.reply).unwrap();
        assert_eq!(m.metadata.id, 7);
        (a, m)
    };
    // A CNAME chain, then the stray record, all parsed as valid DNS.
    let (_, m) = ask("alias.e2e.test", 1, false);
    let got: Vec<String> = m
        .answers
        .iter()
        .map(|r| format!("{} {}", r.name, r.data))
        .collect();
    assert_eq!(
        got,
        [
            "alias.e2e.test. hop.e2e.test.".to_string(),
            "hop.e2e.test. final.e2e.test.".to_string(),
            format!("final.e2e.test. {CNAME4}"),
            format!("stray.e2e.test. {STRAY4}"),
        ]
    );
    // Truncated over UDP (always for tc, by size for big), whole over TCP.
    for (name, count) in [("tc.e2e.test", 1), ("big.e2e.test", usize::from(BIG_COUNT))] {
        let (a, m) = ask(name, 1, false);
        assert!(a.truncated && m.metadata.truncation && m.answers.is_empty());
        let (a, m) = ask(name, 1, true);
        assert!(!a.truncated && !m.metadata.truncation);
        assert_eq!(answer_addrs(&m).len(), count);
    }
    assert!(ask("big.e2e.test", 1, true).0.reply.len() > UDP_LIMIT);
    // Private answers of rebind.e2e.test.
    let (_, m) = ask("rebind.e2e.test", 28, false);
    assert_eq!(answer_addrs(&m), vec![(ip(ULA6), 300)]);
    // A name without records is NXDOMAIN (what `detached_hidden` relies on).
    let mut hidden = zone.clone();
    hidden.records.retain(|r| r.owner != "rotate.e2e.test");
    let a = hidden
        .answer(&query_bytes(7, "rotate.e2e.test", 1), false)
        .unwrap();
    let m = Message::from_vec(&a.reply).unwrap();
    assert_eq!(
        m.metadata.response_code,
        hickory_proto::op::ResponseCode::NXDomain
    );
    // The zone the older tests use is unchanged.
    let (_, m) = ask("pair.e2e.test", 1, false);
    assert_eq!(answer_addrs(&m), vec![(ip(PAIR4), 300), (ip(SHARED4), 300)]);
}
