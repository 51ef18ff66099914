//! Packet and DNS events: what the shield refused, as audit lines a rootless user can read.
//!
//! The ruleset sends every refused packet (and bypass traffic in `down` mode) to NFLOG with
//! its `TEROK_SHIELD_*` prefix; a reader inside the container's network namespace receives
//! them over netlink. This module is the pure part of that path:
//! - [`netlink_messages`] and [`decode_packet`] turn received bytes into a [`Packet`]
//!   (verdict from the prefix; destination, protocol and port from the IP header). Every
//!   input is untrusted and may be cut short by the copy range: decoding never panics;
//! - [`Aggregator`] keeps a flood from growing the log: the first event of a key (verdict +
//!   destination + protocol + port, or refused name + type) is written at once, repeats are
//!   summed into one line per key per interval, and the number of keys is bounded (events for
//!   keys beyond it are counted in an `events_dropped` line);
//! - [`NameIndex`] remembers which name led to an address, for the `name` field.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::{json, Map, Value};
use thiserror::Error;

use super::ruleset::prefix;

/// What the firewall did with a logged packet (which verdict chain logged it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    /// An explicit deny (`deny_*` sets), or default-deny in `up` mode.
    Denied,
    /// A private or link-local destination not allowlisted.
    Private,
    /// Block mode: nothing but loopback.
    Blocked,
    /// Accepted in `down` mode (bypass): logged, not refused.
    Bypass,
}

impl Verdict {
    /// The verdict an NFLOG prefix stands for (the prefix as the kernel sends it, with or
    /// without its terminating NUL); `None` for any prefix the shield does not write.
    pub fn from_prefix(raw: &[u8]) -> Option<Verdict> {
        let text = raw.strip_suffix(&[0]).unwrap_or(raw);
        [
            (prefix::DENIED, Verdict::Denied),
            (prefix::PRIVATE, Verdict::Private),
            (prefix::BLOCKED, Verdict::Blocked),
            (prefix::BYPASS, Verdict::Bypass),
        ]
        .into_iter()
        .find(|(p, _)| p.as_bytes() == text)
        .map(|(_, v)| v)
    }

    /// The spelling in audit lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Denied => "denied",
            Verdict::Private => "private",
            Verdict::Blocked => "blocked",
            Verdict::Bypass => "bypass",
        }
    }

    /// The audit event name: refusals are `blocked`; bypass traffic got through, so it is
    /// `bypass`.
    pub fn event(self) -> &'static str {
        match self {
            Verdict::Bypass => "bypass",
            _ => "blocked",
        }
    }
}

/// One logged packet, reduced to what the audit line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Packet {
    pub verdict: Verdict,
    pub dst: IpAddr,
    /// IP protocol number (6 TCP, 17 UDP, ...), of the transport header after any IPv6
    /// extension headers.
    pub proto: u8,
    /// Destination port, for protocols that have one, when the header was captured and the
    /// packet is not a later fragment.
    pub port: Option<u16>,
}

/// Why some received bytes are not a packet event. Never fatal: the reader skips them.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("message shorter than its headers")]
    Truncated,
    #[error("NFLOG message without a prefix or payload")]
    Incomplete,
    #[error("log prefix {0:?} is not one of the shield's")]
    ForeignPrefix(String),
    #[error("payload is not an IPv4 or IPv6 header")]
    NotIp,
}

/// Netlink constants of NFLOG (linux/netfilter/nfnetlink_log.h), beside the generic ones.
pub mod nl {
    pub use crate::core::nft_netlink::{NLMSG_DONE, NLMSG_ERROR, NLMSG_HDRLEN};
    pub const NFGENMSG_LEN: usize = 4;
    pub const NFNL_SUBSYS_ULOG: u16 = 4;
    pub const NFULNL_MSG_PACKET: u16 = 0;
    pub const NFULNL_MSG_CONFIG: u16 = 1;
    pub const NFULA_PAYLOAD: u16 = 9;
    pub const NFULA_PREFIX: u16 = 10;
    pub const NFULA_SEQ: u16 = 12;
    /// Attribute type bits that are flags, not the type (NLA_F_NESTED, NLA_F_NET_BYTEORDER).
    pub const NLA_TYPE_MASK: u16 = 0x3fff;
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The netlink messages of one datagram as `(type, bytes after the netlink header)`. Stops
/// at the first malformed header; a message cut short yields what arrived.
pub fn netlink_messages(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < nl::NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < nl::NLMSG_HDRLEN {
            data = &[];
            return None;
        }
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        let body = &data[nl::NLMSG_HDRLEN..len.min(data.len())];
        data = &data[align4(len).min(data.len())..];
        Some((kind, body))
    })
}

/// The attributes of one NFLOG packet message that matter here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NflogFields<'a> {
    pub prefix: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    /// Per-group sequence number (when the reader asked for it): gaps are lost packets.
    pub seq: Option<u32>,
}

/// Walk the attributes of an NFLOG packet message (`body`: after the netlink header).
pub fn nflog_fields(body: &[u8]) -> Result<NflogFields<'_>, DecodeError> {
    let mut rest = body.get(nl::NFGENMSG_LEN..).ok_or(DecodeError::Truncated)?;
    let mut out = NflogFields::default();
    while rest.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & nl::NLA_TYPE_MASK;
        if len < 4 || len > rest.len() {
            break; // cut short: keep what was complete
        }
        let value = &rest[4..len];
        match kind {
            nl::NFULA_PREFIX => out.prefix = Some(value),
            nl::NFULA_PAYLOAD => out.payload = Some(value),
            nl::NFULA_SEQ if value.len() == 4 => {
                out.seq = Some(u32::from_be_bytes([value[0], value[1], value[2], value[3]]));
            }
            _ => {}
        }
        rest = &rest[align4(len).min(rest.len())..];
    }
    Ok(out)
}

/// Protocols whose transport header starts with source and destination ports.
fn has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 33 | 132 | 136)
}

/// Destination, transport protocol and destination port of an IP packet's first bytes.
pub fn parse_ip(payload: &[u8]) -> Result<(IpAddr, u8, Option<u16>), DecodeError> {
    let port_at = |off: usize| {
        payload
            .get(off + 2..off + 4)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    match payload.first().map(|b| b >> 4) {
        Some(4) => {
            let ihl = usize::from(payload[0] & 0x0f) * 4;
            if ihl < 20 || payload.len() < 20 {
                return Err(DecodeError::NotIp);
            }
            let dst = Ipv4Addr::new(payload[16], payload[17], payload[18], payload[19]);
            let proto = payload[9];
            let fragment_offset = u16::from_be_bytes([payload[6], payload[7]]) & 0x1fff;
            let port = if fragment_offset == 0 && has_ports(proto) {
                port_at(ihl)
            } else {
                None
            };
            Ok((dst.into(), proto, port))
        }
        Some(6) => {
            if payload.len() < 40 {
                return Err(DecodeError::NotIp);
            }
            let mut dst = [0u8; 16];
            dst.copy_from_slice(&payload[24..40]);
            let (mut next, mut off) = (payload[6], 40usize);
            // Extension headers; bounded (a real packet has a few at most).
            for _ in 0..8 {
                let (Some(&following), Some(&len_field)) = (payload.get(off), payload.get(off + 1))
                else {
                    break;
                };
                match next {
                    0 | 43 | 60 => off += (usize::from(len_field) + 1) * 8,
                    51 => off += (usize::from(len_field) + 2) * 4,
                    44 => {
                        let Some(b) = payload.get(off + 2..off + 4) else {
                            break;
                        };
                        if u16::from_be_bytes([b[0], b[1]]) & 0xfff8 != 0 {
                            // A later fragment: no transport header here.
                            return Ok((Ipv6Addr::from(dst).into(), following, None));
                        }
                        off += 8;
                    }
                    _ => break,
                }
                next = following;
            }
            let port = if has_ports(next) { port_at(off) } else { None };
            Ok((Ipv6Addr::from(dst).into(), next, port))
        }
        _ => Err(DecodeError::NotIp),
    }
}

/// Decode one NFLOG packet message (`body`: after the netlink header) into a packet event
/// and its sequence number.
pub fn decode_packet(body: &[u8]) -> Result<(Packet, Option<u32>), DecodeError> {
    let fields = nflog_fields(body)?;
    let (Some(raw_prefix), Some(payload)) = (fields.prefix, fields.payload) else {
        return Err(DecodeError::Incomplete);
    };
    let verdict = Verdict::from_prefix(raw_prefix).ok_or_else(|| {
        DecodeError::ForeignPrefix(String::from_utf8_lossy(raw_prefix).into_owned())
    })?;
    let (dst, proto, port) = parse_ip(payload)?;
    Ok((
        Packet {
            verdict,
            dst,
            proto,
            port,
        },
        fields.seq,
    ))
}

/// The name of an IP protocol in audit lines (`tcp`, `udp`, `icmp`, `icmpv6`, ...), or its
/// number for the rare others.
pub fn protocol_name(proto: u8) -> String {
    match proto {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        33 => "dccp".into(),
        47 => "gre".into(),
        50 => "esp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        136 => "udplite".into(),
        n => n.to_string(),
    }
}

/// Counts packets the kernel could not deliver, from gaps in NFLOG sequence numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqTracker {
    last: Option<u32>,
}

impl SeqTracker {
    /// Note `seq`; returns how many packets were lost just before it. A number at or before
    /// the last one (a restarted group) starts afresh.
    pub fn observe(&mut self, seq: u32) -> u64 {
        let lost = match self.last {
            Some(last) => {
                let gap = seq.wrapping_sub(last);
                // More than half the number space "ahead" means behind: not a loss.
                if gap == 0 || gap > u32::MAX / 2 {
                    0
                } else {
                    u64::from(gap - 1)
                }
            }
            None => 0,
        };
        self.last = Some(seq);
        lost
    }
}

/// Why a DNS question was refused, in audit lines.
pub fn refuse_reason_code(reason: &super::dns_policy::RefuseReason) -> &'static str {
    use super::dns_policy::RefuseReason;
    match reason {
        RefuseReason::BlockMode => "block_mode",
        RefuseReason::QueryType(_) => "query_type",
        RefuseReason::Denied(_) => "denied",
        RefuseReason::NotAllowlisted => "not_allowlisted",
    }
}

/// What events are aggregated by: one line per key per interval.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EventKey {
    Packet(Packet),
    /// A DNS question the builtin resolver refused: name (normalised), query type, reason.
    DnsRefused {
        name: String,
        qtype: String,
        reason: &'static str,
    },
}

impl EventKey {
    /// The audit event name.
    pub fn event(&self) -> &'static str {
        match self {
            EventKey::Packet(p) => p.verdict.event(),
            EventKey::DnsRefused { .. } => "dns_refused",
        }
    }

    /// The audit `detail` object. `name`: the name that led to a packet's destination, when
    /// known. `first`: the key's first line (written at once, `count` 1); otherwise `count`
    /// repeats since its previous line.
    pub fn detail(&self, count: u64, first: bool, name: Option<&str>) -> Value {
        let mut d = Map::new();
        match self {
            EventKey::Packet(p) => {
                d.insert("verdict".into(), json!(p.verdict.as_str()));
                d.insert("dst".into(), json!(p.dst.to_string()));
                d.insert("proto".into(), json!(protocol_name(p.proto)));
                if let Some(port) = p.port {
                    d.insert("port".into(), json!(port));
                }
                if let Some(name) = name {
                    d.insert("name".into(), json!(name));
                }
            }
            EventKey::DnsRefused {
                name,
                qtype,
                reason,
            } => {
                d.insert("name".into(), json!(name));
                d.insert("qtype".into(), json!(qtype));
                d.insert("reason".into(), json!(reason));
            }
        }
        d.insert("count".into(), json!(count));
        d.insert("first".into(), json!(first));
        Value::Object(d)
    }
}

/// Why events were counted rather than written one by one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// More distinct keys at once than the aggregator tracks.
    TooManyKeys,
    /// The kernel could not queue them to the reader (its socket buffer was full).
    KernelQueueFull,
    /// The resolver's hand-off queue to the event writer was full.
    QueueFull,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::TooManyKeys => "too_many_destinations",
            DropReason::KernelQueueFull => "kernel_queue_full",
            DropReason::QueueFull => "queue_full",
        }
    }
}

/// One audit line the aggregator asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Event {
        key: EventKey,
        count: u64,
        first: bool,
    },
    /// `events_dropped`: `count` events not written individually.
    Dropped { reason: DropReason, count: u64 },
}

impl Line {
    /// Event name and detail, with `name` for a packet key (see [`EventKey::detail`]).
    pub fn render(&self, name: Option<&str>) -> (&'static str, Value) {
        match self {
            Line::Event { key, count, first } => (key.event(), key.detail(*count, *first, name)),
            Line::Dropped { reason, count } => (
                "events_dropped",
                json!({"reason": reason.as_str(), "count": count}),
            ),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    repeats: u64,
    /// Admitted during the current window: kept through the next flush even if quiet.
    fresh: bool,
}

/// Aggregation of events into bounded audit lines (see the module header).
///
/// Bounds: at most `max_keys` keys are tracked; each interval writes at most one first line
/// per newly admitted key and one summary per tracked key, plus at most one `events_dropped`
/// line per reason. A key stays tracked until a whole interval passes without it, so a
/// steady stream is summarised rather than written packet by packet.
#[derive(Debug)]
pub struct Aggregator {
    interval_ms: u64,
    max_keys: usize,
    keys: HashMap<EventKey, Slot>,
    window_end: Option<u64>,
    dropped: [u64; 3],
}

impl Aggregator {
    pub fn new(interval_ms: u64, max_keys: usize) -> Aggregator {
        Aggregator {
            interval_ms: interval_ms.max(1),
            max_keys,
            keys: HashMap::new(),
            window_end: None,
            dropped: [0; 3],
        }
    }

    /// Note one event at `now_ms`; returns the line to write at once for a new key.
    pub fn observe(&mut self, key: EventKey, now_ms: u64) -> Option<Line> {
        self.window_end.get_or_insert(now_ms + self.interval_ms);
        if let Some(slot) = self.keys.get_mut(&key) {
            slot.repeats += 1;
            return None;
        }
        if self.keys.len() >= self.max_keys {
            self.note_dropped(DropReason::TooManyKeys, 1, now_ms);
            return None;
        }
        self.keys.insert(
            key.clone(),
            Slot {
                repeats: 0,
                fresh: true,
            },
        );
        Some(Line::Event {
            key,
            count: 1,
            first: true,
        })
    }

    /// Count `n` events (at `now_ms`) that were lost or not admitted, for the next
    /// `events_dropped` line.
    pub fn note_dropped(&mut self, reason: DropReason, n: u64, now_ms: u64) {
        if n > 0 {
            self.dropped[reason as usize] += n;
            self.window_end.get_or_insert(now_ms + self.interval_ms);
        }
    }

    /// When [`Aggregator::flush`] has something to do (`None`: nothing pending).
    pub fn next_flush(&self) -> Option<u64> {
        self.window_end
    }

    /// At the end of an interval: one summary line per key with repeats, `events_dropped`
    /// lines, and forget keys quiet for a whole interval. Does nothing before the interval
    /// ends.
    pub fn flush(&mut self, now_ms: u64, out: &mut Vec<Line>) {
        match self.window_end {
            Some(end) if now_ms >= end => {}
            _ => return,
        }
        let mut summaries: Vec<Line> = Vec::new();
        self.keys.retain(|key, slot| {
            if slot.repeats > 0 {
                summaries.push(Line::Event {
                    key: key.clone(),
                    count: slot.repeats,
                    first: false,
                });
                slot.repeats = 0;
                slot.fresh = false;
                true
            } else {
                std::mem::replace(&mut slot.fresh, false)
            }
        });
        // Stable output order, so the log reads the same way every time.
        summaries.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
        out.extend(summaries);
        for reason in [
            DropReason::TooManyKeys,
            DropReason::KernelQueueFull,
            DropReason::QueueFull,
        ] {
            let count = std::mem::take(&mut self.dropped[reason as usize]);
            if count > 0 {
                out.push(Line::Dropped { reason, count });
            }
        }
        self.window_end = if self.keys.is_empty() {
            None
        } else {
            Some(now_ms + self.interval_ms)
        };
    }

    /// Keys tracked now (for tests and reports).
    pub fn tracked(&self) -> usize {
        self.keys.len()
    }
}

/// Which name led to which address, for the `name` field of packet events: learned answers
/// (learned.jsonl) and the static tier's cache, each until its address's allowance ends (as
/// learned.jsonl's compaction drops them too). Bounded: expired entries are pruned whenever
/// the index has doubled since the last pruning, and past `cap` entries it starts over with
/// the newest ones, which matter most.
#[derive(Debug, Clone, Default)]
pub struct NameIndex {
    /// Address -> (name, unix seconds until which it is kept).
    names: HashMap<IpAddr, (String, u64)>,
    cap: usize,
    /// Prune expired entries once the index holds this many.
    prune_at: usize,
}

/// The index is never pruned below this many entries (pruning is a walk over all of them).
const NAME_PRUNE_MIN: usize = 256;

impl NameIndex {
    pub fn new(cap: usize) -> NameIndex {
        NameIndex {
            names: HashMap::new(),
            cap,
            prune_at: NAME_PRUNE_MIN,
        }
    }

    /// Remember that `name` led to `addr` until `until` (unix seconds; `u64::MAX`: for as
    /// long as the index lives). A later name for the same address wins.
    pub fn insert(&mut self, addr: IpAddr, name: &str, until: u64) {
        if self.names.len() >= self.cap && !self.names.contains_key(&addr) {
            self.clear();
        }
        match self.names.get_mut(&addr) {
            Some((known, kept)) if known == name => *kept = (*kept).max(until),
            _ => {
                self.names.insert(addr, (name.to_string(), until));
            }
        }
    }

    pub fn get(&self, addr: &IpAddr) -> Option<&str> {
        self.names.get(addr).map(|(name, _)| name.as_str())
    }

    pub fn clear(&mut self) {
        self.names.clear();
        self.names.shrink_to(NAME_PRUNE_MIN);
        self.prune_at = NAME_PRUNE_MIN;
    }

    /// Drop the entries kept until `now` or earlier, if the index has doubled since the
    /// last time (amortised: a steady flow of new names costs O(1) per name).
    pub fn prune_expired(&mut self, now: u64) {
        if self.names.len() < self.prune_at {
            return;
        }
        self.names.retain(|_, (_, until)| *until > now);
        self.names.shrink_to(self.names.len() * 2);
        self.prune_at = (self.names.len() * 2).max(NAME_PRUNE_MIN);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
        let start = out.len();
        out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        out.resize(start + align4(out.len() - start), 0);
    }

    /// An NFLOG packet message as the kernel builds it (netlink header included).
    fn nflog_msg(prefix: &str, payload: &[u8], seq: Option<u32>) -> Vec<u8> {
        let mut m = vec![0u8; nl::NLMSG_HDRLEN];
        m[4..6]
            .copy_from_slice(&((nl::NFNL_SUBSYS_ULOG << 8) | nl::NFULNL_MSG_PACKET).to_ne_bytes());
        m.extend_from_slice(&[2, 0, 0, 100]); // nfgenmsg: AF_INET, v0, res_id 100
        attr(&mut m, 1, &[0x08, 0x00, 3, 0]); // NFULA_PACKET_HDR (ignored)
        let mut p = prefix.as_bytes().to_vec();
        p.push(0);
        attr(&mut m, nl::NFULA_PREFIX, &p);
        if let Some(s) = seq {
            attr(&mut m, nl::NFULA_SEQ, &s.to_be_bytes());
        }
        attr(&mut m, nl::NFULA_PAYLOAD, payload);
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m
    }

    fn ipv4(dst: [u8; 4], proto: u8, port: u16) -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, proto, 0, 0, 198, 51, 100, 2,
        ];
        p.extend_from_slice(&dst);
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&port.to_be_bytes());
        p.extend_from_slice(&[0; 16]);
        p
    }

    fn ipv6(dst: Ipv6Addr, next: u8, ext: &[u8], port: u16) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0, 20, next, 64];
        p.extend_from_slice(&[0; 16]);
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(ext);
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&port.to_be_bytes());
        p.extend_from_slice(&[0; 16]);
        p
    }

    fn decode(msg: &[u8]) -> Result<(Packet, Option<u32>), DecodeError> {
        let (kind, body) = netlink_messages(msg).next().expect("one message");
        assert_eq!(kind & 0xff, nl::NFULNL_MSG_PACKET);
        decode_packet(body)
    }

    #[test]
    fn decodes_tcp_and_udp_over_ipv4() {
        let msg = nflog_msg(prefix::DENIED, &ipv4([198, 51, 100, 20], 6, 443), Some(7));
        let (p, seq) = decode(&msg).unwrap();
        assert_eq!(
            p,
            Packet {
                verdict: Verdict::Denied,
                dst: "198.51.100.20".parse().unwrap(),
                proto: 6,
                port: Some(443)
            }
        );
        assert_eq!(seq, Some(7));
        let msg = nflog_msg(prefix::PRIVATE, &ipv4([172, 31, 255, 7], 17, 53), None);
        let (p, seq) = decode(&msg).unwrap();
        assert_eq!(
            (p.verdict, p.proto, p.port, seq),
            (Verdict::Private, 17, Some(53), None)
        );
    }

    #[test]
    fn decodes_ipv6_through_extension_headers_and_fragments() {
        let dst: Ipv6Addr = "2001:db8::20".parse().unwrap();
        let (p, _) = decode(&nflog_msg(prefix::BLOCKED, &ipv6(dst, 17, &[], 8080), None)).unwrap();
        assert_eq!((p.dst, p.proto, p.port), (dst.into(), 17, Some(8080)));
        // Hop-by-hop options (8 bytes) then TCP.
        let hbh = [6, 0, 1, 4, 0, 0, 0, 0];
        let (p, _) = decode(&nflog_msg(prefix::BYPASS, &ipv6(dst, 0, &hbh, 22), None)).unwrap();
        assert_eq!((p.verdict, p.proto, p.port), (Verdict::Bypass, 6, Some(22)));
        // A first fragment carries the ports; a later one does not.
        let first = [17, 0, 0, 1, 0, 0, 0, 1];
        let (p, _) = decode(&nflog_msg(prefix::DENIED, &ipv6(dst, 44, &first, 53), None)).unwrap();
        assert_eq!((p.proto, p.port), (17, Some(53)));
        let later = [17, 0, 0x05, 0x01, 0, 0, 0, 1];
        let (p, _) = decode(&nflog_msg(prefix::DENIED, &ipv6(dst, 44, &later, 53), None)).unwrap();
        assert_eq!((p.proto, p.port), (17, None));
        // ICMPv6: no port.
        let (p, _) = decode(&nflog_msg(prefix::DENIED, &ipv6(dst, 58, &[], 0), None)).unwrap();
        assert_eq!(
            (protocol_name(p.proto), p.port),
            ("icmpv6".to_string(), None)
        );
    }

    #[test]
    fn later_ipv4_fragments_and_short_captures_have_no_port() {
        let mut frag = ipv4([198, 51, 100, 20], 17, 53);
        frag[6] = 0x00;
        frag[7] = 0x10; // offset 16 * 8 bytes
        assert_eq!(parse_ip(&frag).unwrap().2, None);
        let whole = ipv4([198, 51, 100, 20], 6, 80);
        assert_eq!(
            parse_ip(&whole[..21]).unwrap(),
            ("198.51.100.20".parse().unwrap(), 6, None)
        );
        assert_eq!(parse_ip(&whole[..19]), Err(DecodeError::NotIp));
        assert_eq!(parse_ip(&[]), Err(DecodeError::NotIp));
    }

    #[test]
    fn foreign_prefixes_and_incomplete_messages_are_refused() {
        let payload = ipv4([198, 51, 100, 20], 6, 80);
        let err = decode(&nflog_msg("SOMEONE_ELSE: ", &payload, None)).unwrap_err();
        assert!(matches!(err, DecodeError::ForeignPrefix(_)), "{err}");
        // The allowed chain never logs to NFLOG: its prefix is not an event either.
        assert!(Verdict::from_prefix(prefix::ALLOWED.as_bytes()).is_none());
        assert_eq!(
            Verdict::from_prefix(b"TEROK_SHIELD_DENIED: \0"),
            Some(Verdict::Denied)
        );
        let mut m = nflog_msg(prefix::DENIED, &payload, None);
        // Cut the payload attribute off entirely.
        let cut = m.len() - align4(4 + payload.len());
        m.truncate(cut);
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(decode(&m), Err(DecodeError::Incomplete));
        assert_eq!(decode_packet(&[1, 2]), Err(DecodeError::Truncated));
    }

    #[test]
    fn several_messages_in_one_datagram() {
        let mut d = nflog_msg(prefix::DENIED, &ipv4([198, 51, 100, 20], 6, 80), Some(1));
        d.extend(nflog_msg(
            prefix::DENIED,
            &ipv4([198, 51, 100, 21], 17, 53),
            Some(2),
        ));
        let ports: Vec<_> = netlink_messages(&d)
            .map(|(_, b)| decode_packet(b).unwrap().0.port)
            .collect();
        assert_eq!(ports, [Some(80), Some(53)]);
    }

    #[test]
    fn sequence_gaps_count_lost_packets() {
        let mut t = SeqTracker::default();
        assert_eq!(t.observe(10), 0);
        assert_eq!(t.observe(11), 0);
        assert_eq!(t.observe(15), 3);
        assert_eq!(t.observe(u32::MAX), 0, "far behind: a restart, not a loss");
        assert_eq!(t.observe(1), 1, "wraps around");
    }

    fn key(last: u8, port: u16) -> EventKey {
        EventKey::Packet(Packet {
            verdict: Verdict::Denied,
            dst: IpAddr::V4(Ipv4Addr::new(198, 51, 100, last)),
            proto: 6,
            port: Some(port),
        })
    }

    #[test]
    fn first_event_at_once_repeats_summarised_per_interval() {
        let mut a = Aggregator::new(1000, 8);
        let first = a.observe(key(20, 80), 0).expect("first line at once");
        assert_eq!(
            first,
            Line::Event {
                key: key(20, 80),
                count: 1,
                first: true
            }
        );
        for t in 1..=99_999 {
            assert!(a.observe(key(20, 80), t / 100).is_none());
        }
        let mut out = Vec::new();
        a.flush(999, &mut out);
        assert!(out.is_empty(), "nothing before the interval ends");
        a.flush(1000, &mut out);
        assert_eq!(
            out,
            [Line::Event {
                key: key(20, 80),
                count: 99_999,
                first: false
            }]
        );
        // Quiet for a whole interval: forgotten, and the next packet is a first event again.
        out.clear();
        a.flush(2000, &mut out);
        assert!(out.is_empty());
        assert_eq!(a.tracked(), 0);
        assert_eq!(a.next_flush(), None);
        assert!(a.observe(key(20, 80), 2500).is_some());
    }

    #[test]
    fn a_key_first_seen_late_in_an_interval_survives_one_flush() {
        let mut a = Aggregator::new(1000, 8);
        a.observe(key(1, 1), 0);
        a.observe(key(2, 2), 990);
        let mut out = Vec::new();
        a.flush(1000, &mut out);
        assert_eq!(a.tracked(), 2);
        assert!(
            a.observe(key(2, 2), 1500).is_none(),
            "still tracked: a repeat"
        );
    }

    #[test]
    fn keys_beyond_the_bound_are_counted_not_written() {
        let mut a = Aggregator::new(1000, 4);
        let written = (0..100u16)
            .filter(|i| a.observe(key(1, *i), 0).is_some())
            .count();
        assert_eq!(written, 4);
        a.note_dropped(DropReason::KernelQueueFull, 5, 10);
        let mut out = Vec::new();
        a.flush(1000, &mut out);
        assert!(out.contains(&Line::Dropped {
            reason: DropReason::TooManyKeys,
            count: 96
        }));
        assert!(out.contains(&Line::Dropped {
            reason: DropReason::KernelQueueFull,
            count: 5
        }));
        let (event, detail) = out.last().unwrap().render(None);
        assert_eq!(event, "events_dropped");
        assert_eq!(detail, json!({"reason": "kernel_queue_full", "count": 5}));
    }

    #[test]
    fn details_name_everything_the_user_needs() {
        let (event, d) = Line::Event {
            key: key(20, 443),
            count: 1,
            first: true,
        }
        .render(Some("svc.example.com"));
        assert_eq!(event, "blocked");
        assert_eq!(
            d,
            json!({"verdict": "denied", "dst": "198.51.100.20", "proto": "tcp", "port": 443,
                   "name": "svc.example.com", "count": 1, "first": true})
        );
        let dns = EventKey::DnsRefused {
            name: "evil.example".into(),
            qtype: "AAAA".into(),
            reason: "not_allowlisted",
        };
        assert_eq!(dns.event(), "dns_refused");
        assert_eq!(
            dns.detail(3, false, None),
            json!({"name": "evil.example", "qtype": "AAAA", "reason": "not_allowlisted",
                   "count": 3, "first": false})
        );
        let bypass = EventKey::Packet(Packet {
            verdict: Verdict::Bypass,
            dst: "2001:db8::20".parse().unwrap(),
            proto: 1,
            port: None,
        });
        assert_eq!(bypass.event(), "bypass");
        assert_eq!(bypass.detail(1, true, None)["proto"], "icmp");
        assert!(bypass.detail(1, true, None).get("port").is_none());
    }

    #[test]
    fn name_index_is_bounded() {
        let mut n = NameIndex::new(2);
        let a = |i: u8| IpAddr::V4(Ipv4Addr::new(198, 51, 100, i));
        n.insert(a(1), "one.example", u64::MAX);
        n.insert(a(2), "two.example", u64::MAX);
        n.insert(a(2), "again.example", u64::MAX);
        assert_eq!(n.get(&a(2)), Some("again.example"));
        n.insert(a(3), "three.example", u64::MAX);
        assert_eq!(n.get(&a(3)), Some("three.example"));
        assert!(n.names.len() <= 2);
    }

    /// Found by scripts/soak.sh: a workload asking new names kept growing its resolver's
    /// memory (+10-12% over ten minutes) with names of addresses long expired, which
    /// stayed until learned.jsonl reached 1 MiB and was compacted.
    #[test]
    fn names_of_expired_addresses_are_pruned_as_the_index_grows() {
        let mut n = NameIndex::new(65_536);
        let a = |i: u32| IpAddr::V4(Ipv4Addr::from(0xc633_6400 + i));
        n.insert(a(0), "static.example", u64::MAX);
        // A steady flow of new names, each kept 20 s, one per second for an hour.
        let mut most = 0;
        for t in 1..3600u32 {
            n.insert(a(t), &format!("w{t}.example"), u64::from(t) + 20);
            most = most.max(n.names.len());
            n.prune_expired(u64::from(t));
        }
        assert!(most <= NAME_PRUNE_MIN, "the index grew to {most} entries");
        assert_eq!(n.get(&a(0)), Some("static.example"));
        assert_eq!(n.get(&a(3599)), Some("w3599.example"));
        assert_eq!(n.get(&a(5)), None, "expired long ago");
        // A name asked again keeps its address for the later of the two times.
        n.insert(a(3599), "w3599.example", 10);
        assert_eq!(n.names[&a(3599)].1, 3619);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Untrusted bytes never panic the decoder.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            for (_, body) in netlink_messages(&data) {
                let _ = decode_packet(body);
            }
            let _ = parse_ip(&data);
            let _ = nflog_fields(&data);
        }

        /// Any prefix of a well-formed message decodes or fails cleanly, and a whole one
        /// round-trips.
        #[test]
        fn truncated_messages_fail_cleanly(
            dst in any::<[u8; 4]>(), port in any::<u16>(), udp in any::<bool>(), cut in 0usize..200,
        ) {
            let proto = if udp { 17 } else { 6 };
            let msg = nflog_msg(prefix::DENIED, &ipv4(dst, proto, port), Some(1));
            let (p, _) = decode(&msg).unwrap();
            prop_assert_eq!(p.dst, IpAddr::V4(Ipv4Addr::from(dst)));
            prop_assert_eq!(p.port, Some(port));
            let cut = cut.min(msg.len());
            for (_, body) in netlink_messages(&msg[..cut]) {
                let _ = decode_packet(body);
            }
        }

        /// Whatever arrives, the aggregator writes at most one first line per admitted key,
        /// tracks at most `max_keys`, and accounts for every event exactly once.
        #[test]
        fn aggregation_is_bounded_and_loses_no_count(
            events in proptest::collection::vec((0u8..40, 0u16..3, 0u64..5000), 1..600),
            max_keys in 1usize..16,
        ) {
            let mut events = events;
            events.sort_by_key(|e| e.2);
            let mut a = Aggregator::new(1000, max_keys);
            let mut lines = Vec::new();
            for (host, port, t) in &events {
                a.flush(*t, &mut lines);
                if let Some(l) = a.observe(key(*host, *port), *t) {
                    lines.push(l);
                }
                prop_assert!(a.tracked() <= max_keys);
            }
            a.flush(u64::MAX / 2, &mut lines);
            let counted: u64 = lines.iter().map(|l| match l {
                Line::Event { count, .. } | Line::Dropped { count, .. } => *count,
            }).sum();
            prop_assert_eq!(counted, events.len() as u64);
            // Per interval: at most max_keys first lines and max_keys summaries.
            let firsts = lines.iter().filter(|l| matches!(l, Line::Event { first: true, .. })).count();
            prop_assert!(firsts <= max_keys * 6 + max_keys);
        }
    }
}
