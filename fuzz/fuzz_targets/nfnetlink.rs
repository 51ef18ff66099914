//! nf_tables netlink messages (src/effects/nfnetlink.rs): the batches the resolver and live
//! commands send to add and delete set elements, decoded again by a small netlink reader
//! written here from the kernel's layout (linux/netlink.h, nf_tables.h).
//!
//! Invariants: for any elements and timeout, each batch is BATCH_BEGIN, one NEWSETELEM or
//! DELSETELEM per operation, BATCH_END, numbered consecutively from the first sequence
//! number; every length field is exact (messages, nested attributes, padding) and below the
//! 64 KiB an attribute length can express; every message names `inet terok_shield` and the
//! set; the elements of all batches together are exactly the distinct elements asked for, in
//! every message of a batch; a NEWSETELEM of a timed set carries the timeout rounded up to
//! whole milliseconds (never 0), a DELSETELEM none. Elements that do not fit the set, and
//! interval sets, are refused before anything is encoded. The reply parser (`acks`) takes
//! any bytes.
#![no_main]

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use terok_shield::core::target::Protocol;
use terok_shield::effects::nfnetlink::{acks, add_batches, delete_batches, Refresh, SetKey};

const SETS: &[&str] = &[
    "allow_v4",
    "allow_v6",
    "dns_v4",
    "dns_v6",
    "dns_svc_v4",
    "dns_svc_v6",
    "allow_net_v4",
    "deny_v6",
    "allow_svc_v4",
    "nonsense",
];

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_ne_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Attributes of `b` as (type without flags, nested flag, value); asserts exact lengths.
fn attrs(mut b: &[u8]) -> Vec<(u16, bool, &[u8])> {
    let mut out = Vec::new();
    while !b.is_empty() {
        assert!(b.len() >= 4, "attribute header cut");
        let len = usize::from(u16_at(b, 0));
        let kind = u16_at(b, 2);
        assert!(
            len >= 4 && len <= b.len(),
            "attribute length {len} of {}",
            b.len()
        );
        out.push((kind & 0x3fff, kind & 0x8000 != 0, &b[4..len]));
        let padded = (len + 3) & !3;
        assert!(padded <= b.len(), "padding beyond the message");
        assert!(b[len..padded].iter().all(|x| *x == 0), "padding not zero");
        b = &b[padded..];
    }
    out
}

fn key_of(set: &str, bytes: &[u8]) -> SetKey {
    let proto = |b: u8| match b {
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        other => panic!("protocol byte {other}"),
    };
    let v6 = |b: &[u8]| Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap());
    let v4 = |b: &[u8]| Ipv4Addr::from(<[u8; 4]>::try_from(b).unwrap());
    match (set, bytes.len()) {
        ("allow_v4" | "dns_v4", 4) => SetKey::V4(v4(bytes)),
        ("allow_v6" | "dns_v6", 16) => SetKey::V6(v6(bytes)),
        ("dns_svc_v4", 12) => {
            assert_eq!(bytes[5..8], [0, 0, 0]);
            assert_eq!(bytes[10..12], [0, 0]);
            SetKey::SvcV4(
                v4(&bytes[..4]),
                proto(bytes[4]),
                u16::from_be_bytes([bytes[8], bytes[9]]),
            )
        }
        ("dns_svc_v6", 24) => {
            assert_eq!(bytes[17..20], [0, 0, 0]);
            assert_eq!(bytes[22..24], [0, 0]);
            SetKey::SvcV6(
                v6(&bytes[..16]),
                proto(bytes[16]),
                u16::from_be_bytes([bytes[20], bytes[21]]),
            )
        }
        (s, n) => panic!("a {n}-byte key for set {s}"),
    }
}

/// One decoded NEWSETELEM/DELSETELEM: (new?, sequence, elements with their timeouts).
type Decoded = (bool, u32, Vec<(SetKey, Option<u64>)>);

fn decode_setelem(set: &str, msg: &[u8]) -> Decoded {
    let kind = u16_at(msg, 4);
    let flags = u16_at(msg, 6);
    let seq = u32_at(msg, 8);
    assert_eq!(kind >> 8, 10, "nf_tables subsystem");
    let new = match kind & 0xff {
        12 => true,
        14 => false,
        other => panic!("message type {other}"),
    };
    assert_eq!(flags & 0x5, 0x5, "request with ack");
    assert_eq!(flags & 0x400 != 0, new, "CREATE exactly on adds");
    assert_eq!(flags & 0x200, 0, "never EXCL");
    assert_eq!(msg[16], 1, "NFPROTO_INET");
    let top = attrs(&msg[20..]);
    assert_eq!(top.len(), 3);
    assert_eq!((top[0].0, top[0].2), (1, &b"terok_shield\0"[..]));
    assert_eq!(top[1].0, 2);
    assert_eq!(top[1].2, [set.as_bytes(), b"\0"].concat().as_slice());
    assert_eq!((top[2].0, top[2].1), (3, true));
    let mut elems = Vec::new();
    for (k, nested, body) in attrs(top[2].2) {
        assert_eq!((k, nested), (1, true), "NFTA_LIST_ELEM");
        let inner = attrs(body);
        let mut timeout = None;
        let mut key = None;
        for (k, nested, v) in inner {
            match (k, nested) {
                (4, false) => {
                    assert!(
                        timeout.is_none() && key.is_none(),
                        "timeout before the key, once"
                    );
                    timeout = Some(u64::from_be_bytes(v.try_into().unwrap()));
                }
                (1, true) => {
                    let data = attrs(v);
                    assert_eq!(data.len(), 1);
                    assert_eq!((data[0].0, data[0].1), (1, false), "NFTA_DATA_VALUE");
                    assert!(key.is_none());
                    key = Some(key_of(set, data[0].2));
                }
                other => panic!("element attribute {other:?}"),
            }
        }
        elems.push((key.expect("an element has a key"), timeout));
    }
    (new, seq, elems)
}

fn decode_batch(set: &str, batch: &[u8]) -> (u32, Vec<Decoded>) {
    let mut msgs = Vec::new();
    let mut b = batch;
    while !b.is_empty() {
        assert!(b.len() >= 20);
        let len = u32_at(b, 0) as usize;
        assert!(
            len >= 20 && len <= b.len() && len.is_multiple_of(4),
            "message length {len}"
        );
        msgs.push(&b[..len]);
        b = &b[len..];
    }
    assert!(msgs.len() >= 3);
    let (first, last) = (msgs[0], msgs[msgs.len() - 1]);
    assert_eq!((u16_at(first, 4), first.len()), (0x10, 20), "BATCH_BEGIN");
    assert_eq!((u16_at(last, 4), last.len()), (0x11, 20), "BATCH_END");
    for m in [first, last] {
        assert_eq!(m[16], 0, "NFPROTO_UNSPEC");
        assert_eq!(
            u16::from_be_bytes([m[18], m[19]]),
            10,
            "res_id NFNL_SUBSYS_NFTABLES"
        );
    }
    let begin = u32_at(first, 8);
    let inner: Vec<Decoded> = msgs[1..msgs.len() - 1]
        .iter()
        .map(|m| decode_setelem(set, m))
        .collect();
    for (i, d) in inner.iter().enumerate() {
        assert_eq!(d.1, begin.wrapping_add(1 + i as u32));
    }
    assert_eq!(u32_at(last, 8), begin.wrapping_add(1 + inner.len() as u32));
    (begin, inner)
}

fn key(u: &mut Unstructured) -> Result<SetKey> {
    let a = fuzz_support::addr(u)?;
    let svc = u.arbitrary::<bool>()?;
    let p = fuzz_support::protocol(u)?;
    let port = u.arbitrary()?;
    Ok(match (a, svc) {
        (std::net::IpAddr::V4(a), false) => SetKey::V4(a),
        (std::net::IpAddr::V6(a), false) => SetKey::V6(a),
        (std::net::IpAddr::V4(a), true) => SetKey::SvcV4(a, p, port),
        (std::net::IpAddr::V6(a), true) => SetKey::SvcV6(a, p, port),
    })
}

fn run(u: &mut Unstructured) -> Result<()> {
    let set = *u.choose(SETS)?;
    let n = if u.ratio(1, 16)? {
        u.int_in_range(0..=1200)?
    } else {
        u.int_in_range(0..=8)?
    };
    let first = key(u)?;
    let mut elems = Vec::with_capacity(n);
    for i in 0..n {
        // Mostly of one shape (as callers send), repeats included.
        elems.push(match u.int_in_range(0..=9)? {
            0 => key(u)?,
            1 if i > 0 => elems[u.choose_index(i)?],
            _ => match first {
                SetKey::V4(a) => SetKey::V4(Ipv4Addr::from(u32::from(a).wrapping_add(i as u32))),
                SetKey::V6(a) => SetKey::V6(Ipv6Addr::from(u128::from(a).wrapping_add(i as u128))),
                SetKey::SvcV4(a, p, port) => SetKey::SvcV4(a, p, port.wrapping_add(i as u16)),
                SetKey::SvcV6(a, p, port) => SetKey::SvcV6(a, p, port.wrapping_add(i as u16)),
            },
        });
    }
    let timeout = match u.int_in_range(0..=4)? {
        0 => None,
        1 => Some(Duration::ZERO),
        2 => Some(Duration::from_nanos(u.arbitrary()?)),
        3 => Some(Duration::new(
            u.arbitrary()?,
            u.int_in_range(0..=999_999_999)?,
        )),
        _ => Some(Duration::from_secs(u.int_in_range(1..=86_400)?)),
    };
    let refresh = if u.arbitrary()? {
        Refresh::Update
    } else {
        Refresh::Replace
    };
    let seq: u32 = u.arbitrary()?;
    let delete = u.arbitrary::<bool>()?;
    let result = if delete {
        delete_batches(set, &elems, seq)
    } else {
        add_batches(set, &elems, timeout, refresh, seq)
    };
    let timed = set.starts_with("dns_");
    let shape_ok = |k: &SetKey| {
        matches!(
            (set, k),
            ("allow_v4" | "dns_v4", SetKey::V4(_))
                | ("allow_v6" | "dns_v6", SetKey::V6(_))
                | ("dns_svc_v4", SetKey::SvcV4(..))
                | ("dns_svc_v6", SetKey::SvcV6(..))
        )
    };
    let writable = matches!(
        set,
        "allow_v4" | "allow_v6" | "dns_v4" | "dns_v6" | "dns_svc_v4" | "dns_svc_v6"
    );
    let timeout_ok = delete
        || matches!((timed, timeout), (true, Some(t)) if !t.is_zero())
        || (!timed && timeout.is_none());
    let Ok(batches) = result else {
        assert!(
            !writable || !elems.iter().all(shape_ok) || !timeout_ok,
            "refused a valid call"
        );
        return Ok(());
    };
    assert!(
        writable && elems.iter().all(shape_ok) && timeout_ok,
        "accepted an invalid call to {set}"
    );
    let mut want = elems.clone();
    want.sort_unstable();
    want.dedup();
    let want_ms = match (delete, timeout) {
        (false, Some(t)) => {
            Some(u64::try_from(t.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX))
        }
        _ => None,
    };
    let ops: Vec<bool> = match (delete, want_ms, refresh) {
        (true, _, _) => vec![false],
        (false, Some(_), Refresh::Replace) => vec![true, false, true],
        (false, _, _) => vec![true],
    };
    let mut got = Vec::new();
    let mut next = seq;
    for batch in &batches {
        assert!(batch.len() < 64 * 1024);
        let (begin, msgs) = decode_batch(set, batch);
        assert_eq!(begin, next, "batches numbered one after another");
        next = begin.wrapping_add(msgs.len() as u32 + 2);
        assert_eq!(msgs.iter().map(|m| m.0).collect::<Vec<_>>(), ops);
        let keys: Vec<SetKey> = msgs[0].2.iter().map(|e| e.0).collect();
        for (new, _, elems) in &msgs {
            assert_eq!(
                elems.iter().map(|e| e.0).collect::<Vec<_>>(),
                keys,
                "same elements in every message"
            );
            for (_, t) in elems {
                assert_eq!(*t, if *new { want_ms } else { None });
                assert_ne!(*t, Some(0), "a zero timeout means never");
            }
        }
        got.extend(keys);
    }
    assert_eq!(got, want, "the batches carry exactly the distinct elements");
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    for (_, _) in acks(data) {}
    let _ = run(&mut Unstructured::new(data));
});
