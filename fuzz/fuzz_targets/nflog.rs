//! NFLOG messages (src/core/events.rs): what the kernel hands the event reader for each
//! logged packet. The packet bytes are the workload's (it chooses what it sends, headers
//! included, up to the copy range), so decoding takes anything.
//!
//! Invariants: any datagram decodes without a panic, every message body lies inside the
//! datagram, and a message built from a generated packet (prefix of any verdict, IPv4 or IPv6
//! with extension headers and fragments, cut at any length, attributes in any order, foreign
//! attributes in between) decodes to exactly that packet; a cut packet yields the port only
//! when its bytes arrived. The sequence tracker never counts a loss for a number it saw
//! before, and the aggregator stays within its key bound.
#![no_main]

use std::net::IpAddr;

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use terok_shield::core::events::{
    decode_packet, netlink_messages, nflog_fields, nl, parse_ip, Aggregator, EventKey, Packet,
    SeqTracker, Verdict,
};
use terok_shield::core::ruleset::prefix;

fn attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(start + ((out.len() - start + 3) & !3), 0);
}

/// A generated packet, the IP bytes the kernel would copy of it, and what decoding must give.
fn packet(u: &mut Unstructured) -> Result<(Vec<u8>, IpAddr, u8, Option<u16>)> {
    let dst = fuzz_support::addr(u)?;
    // Upper-layer protocols only: a next header of 0, 43, 44, 51 or 60 is an extension
    // header, and the decoder rightly reads what follows as one.
    let proto: u8 = *u.choose(&[6, 17, 1, 58, 132, 33, 136, 47, 59, 50])?;
    let dport: u16 = u.arbitrary()?;
    let mut ip = Vec::new();
    let mut later_fragment = false;
    let mut final_proto = proto;
    let mut exts: Vec<(usize, u8, u8, u16)> = Vec::new();
    match dst {
        IpAddr::V4(a) => {
            let options = usize::from(u.int_in_range(0u8..=10)?);
            let ihl = 5 + options;
            ip.push(0x40 | ihl as u8);
            ip.extend_from_slice(&[0, 0, 0, 0, 0]);
            let frag: u16 = if u.ratio(1, 8)? {
                u.int_in_range(1..=0x1fff)?
            } else {
                0
            };
            later_fragment = frag != 0;
            let flags: u16 = if u.arbitrary()? { 0x4000 } else { 0 };
            ip.extend_from_slice(&(frag | flags).to_be_bytes());
            ip.push(64);
            ip.push(proto);
            ip.extend_from_slice(&[0, 0, 198, 18, 0, 1]);
            ip.extend_from_slice(&a.octets());
            ip.resize(ihl * 4, 1);
        }
        IpAddr::V6(a) => {
            ip.extend_from_slice(&[0x60, 0, 0, 0, 0, 0]);
            // Extension headers: hop-by-hop, routing, destination options, fragment, AH.
            let mut kinds = Vec::new();
            for _ in 0..u.int_in_range(0..=3)? {
                kinds.push(*u.choose(&[0u8, 43, 60, 44, 51])?);
            }
            ip.push(*kinds.first().unwrap_or(&proto));
            ip.push(64);
            ip.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            ip.extend_from_slice(&a.octets());
            for (k, kind) in kinds.iter().enumerate() {
                let next = *kinds.get(k + 1).unwrap_or(&proto);
                let start = ip.len();
                let mut fragment_offset = 0;
                match kind {
                    44 => {
                        let off: u16 = if u.ratio(1, 4)? {
                            u.int_in_range(1..=0x1fff)?
                        } else {
                            0
                        };
                        ip.extend_from_slice(&[next, 0]);
                        ip.extend_from_slice(&(off << 3).to_be_bytes());
                        ip.extend_from_slice(&[0, 0, 0, 7]);
                        fragment_offset = off;
                    }
                    51 => {
                        let words = u.int_in_range(1u8..=4)?; // length in 4-byte units, minus 2
                        ip.extend_from_slice(&[next, words]);
                        ip.resize(ip.len() + (usize::from(words) + 2) * 4 - 2, 0);
                    }
                    _ => {
                        let units = u.int_in_range(0u8..=3)?; // 8-byte units, minus 1
                        ip.extend_from_slice(&[next, units]);
                        ip.resize(ip.len() + (usize::from(units) + 1) * 8 - 2, 0);
                    }
                }
                exts.push((start, *kind, next, fragment_offset));
                if fragment_offset != 0 {
                    break; // a later fragment: no transport header follows
                }
            }
        }
    }
    let transport = ip.len();
    ip.extend_from_slice(&[0x9c, 0x40]);
    ip.extend_from_slice(&dport.to_be_bytes());
    ip.extend_from_slice(&[0; 16]);
    let cut = u.int_in_range(0..=ip.len())?;
    let min = if dst.is_ipv4() { 20 } else { 40 };
    let cut = cut.max(min).min(ip.len());
    ip.truncate(cut);
    // A header counts once the bytes the decoder reads of it arrived (its first two, four of
    // a fragment header); the protocol is the last next-header value that could be read.
    if dst.is_ipv6() {
        final_proto = ip[6];
        for (start, kind, next, fragment_offset) in exts {
            if cut < start + if kind == 44 { 4 } else { 2 } {
                break;
            }
            final_proto = next;
            if fragment_offset != 0 {
                later_fragment = true;
                break;
            }
        }
    }
    let has_ports = matches!(final_proto, 6 | 17 | 33 | 132 | 136);
    let port = (!later_fragment && has_ports && cut >= transport + 4).then_some(dport);
    Ok((ip, dst, final_proto, port))
}

fn built(u: &mut Unstructured) -> Result<()> {
    let (payload, dst, proto, port) = packet(u)?;
    let (verdict, text) = *u.choose(&[
        (Verdict::Denied, prefix::DENIED),
        (Verdict::Private, prefix::PRIVATE),
        (Verdict::Blocked, prefix::BLOCKED),
        (Verdict::Bypass, prefix::BYPASS),
    ])?;
    let mut prefix_bytes = text.as_bytes().to_vec();
    if u.arbitrary()? {
        prefix_bytes.push(0);
    }
    let seq: Option<u32> = if u.arbitrary()? {
        Some(u.arbitrary()?)
    } else {
        None
    };
    let mut body = vec![2, 0, 0, 100]; // nfgenmsg: AF_INET, version, res_id (group)
    let mut attrs: Vec<(u16, Vec<u8>)> = vec![(10, prefix_bytes), (9, payload)];
    if let Some(s) = seq {
        attrs.push((12, s.to_be_bytes().to_vec()));
    }
    for _ in 0..u.int_in_range(0..=3)? {
        attrs.push((u.int_in_range(1..=8)?, u.arbitrary::<Vec<u8>>()?));
    }
    for k in (1..attrs.len()).rev() {
        let j = u.int_in_range(0..=k)?;
        attrs.swap(k, j);
    }
    for (kind, value) in &attrs {
        attr(&mut body, *kind, value);
    }
    let mut msg = Vec::new();
    msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&((nl::NFNL_SUBSYS_ULOG << 8) | nl::NFULNL_MSG_PACKET).to_ne_bytes());
    msg.extend_from_slice(&[0; 10]);
    msg.extend_from_slice(&body);
    let got: Vec<_> = netlink_messages(&msg).collect();
    assert_eq!(got.len(), 1);
    let (decoded, got_seq) = decode_packet(got[0].1).expect("a built message decodes");
    assert_eq!(
        decoded,
        Packet {
            verdict,
            dst,
            proto,
            port
        }
    );
    assert_eq!(got_seq, seq);
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let start = data.as_ptr() as usize;
    for (_, body) in netlink_messages(data) {
        let at = body.as_ptr() as usize;
        assert!(at >= start && at + body.len() <= start + data.len());
        let _ = nflog_fields(body);
        if let Ok((p, _)) = decode_packet(body) {
            assert!(p.port.is_none() || matches!(p.proto, 6 | 17 | 33 | 132 | 136));
        }
    }
    let _ = parse_ip(data);
    let mut u = Unstructured::new(data);
    let _ = built(&mut u);

    let mut seqs = SeqTracker::default();
    let mut agg = Aggregator::new(1000, 8);
    let mut last = None;
    for (i, chunk) in data.chunks(5).take(64).enumerate() {
        // Numbers within 16 bits: never half the number space apart.
        let n = u32::from_le_bytes([chunk[0], *chunk.get(1).unwrap_or(&0), 0, 0]);
        let lost = seqs.observe(n);
        match last {
            Some(l) if n > l => assert_eq!(lost, u64::from(n - l - 1), "{l} -> {n}"),
            // The first number, a repeat, or one before the last (a restarted group).
            _ => assert_eq!(lost, 0, "{last:?} -> {n}"),
        }
        last = Some(n);
        let key = EventKey::Packet(Packet {
            verdict: Verdict::Denied,
            dst: IpAddr::from([198, 51, 100, chunk[0] % 16]),
            proto: 6,
            port: Some(443),
        });
        let _ = agg.observe(key, i as u64 * u64::from(*chunk.last().unwrap()));
        assert!(agg.tracked() <= 8);
    }
    let mut out = Vec::new();
    agg.flush(u64::MAX / 2, &mut out);
});
