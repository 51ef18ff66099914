use super::decode::decode_elem;
use super::encode::{new_rule, new_set, new_setelem, write_elem};
use super::lower::interval_elements;
use super::*;
use crate::core::policy::{AllowRule, HostLoopback, Mode, Policy};
use crate::core::ruleset::Ruleset;
use std::net::IpAddr;

pub(crate) fn rich(mode: Mode) -> Policy {
    let mut p = Policy::new(mode);
    let r = |s: &str| AllowRule {
        net: s.parse().unwrap(),
        scope: None,
    };
    p.allow = vec![
        r("198.51.100.10/32"),
        r("198.18.0.0/16"),
        r("2001:db8::10/128"),
    ];
    p.deny = vec!["198.18.0.9/32".parse().unwrap()];
    p.dns_servers = vec!["198.51.100.53".parse().unwrap()];
    p.host_loopback = Some(HostLoopback {
        gateway: "198.51.100.1".parse().unwrap(),
        ports: vec![8080, 9090],
    });
    p.resolver_mark = Some(0x5eed);
    p.resolver_port = Some(5353);
    p
}

#[test]
fn every_mode_lowers() {
    for mode in [Mode::DenyAll, Mode::Bypass, Mode::BypassAll, Mode::Block] {
        let rs = Ruleset::generate(&rich(mode));
        let l = Lowered::new(&rs).unwrap();
        assert_eq!(l.chains.len(), rs.chains.len());
        assert_eq!(
            l.rules.len(),
            rs.chains.iter().map(|c| c.rules.len()).sum::<usize>()
        );
    }
}

#[test]
fn interval_elements_match_nft() {
    // nft's elements for { 198.18.0.0/23 }: 0 end, start, end after it.
    let e = interval_elements(&[(
        "198.18.0.0".parse().unwrap(),
        "198.18.1.255".parse().unwrap(),
    )]);
    let keys: Vec<(Vec<u8>, u32)> = e.into_iter().map(|e| (e.key.to_vec(), e.flags)).collect();
    assert_eq!(
        keys,
        vec![
            (vec![0, 0, 0, 0], 1),
            (vec![198, 18, 0, 0], 0),
            (vec![198, 18, 2, 0], 1)
        ]
    );
    // Adjacent ranges (like 140.0.0.0/6, 144.0.0.0/4): an end marker and a start at the
    // same key, as nft sends them; a range reaching the top has no end marker.
    let e = interval_elements(&[
        ("0.0.0.0".parse().unwrap(), "0.0.0.255".parse().unwrap()),
        ("0.0.1.0".parse().unwrap(), "0.0.2.255".parse().unwrap()),
        (
            "255.0.0.0".parse().unwrap(),
            "255.255.255.255".parse().unwrap(),
        ),
    ]);
    let got: Vec<(u8, u32)> = e.iter().map(|e| (e.key[2], e.flags)).collect();
    assert_eq!(got, vec![(0, 0), (1, 1), (1, 0), (3, 1), (0, 0)]);
}

#[test]
fn decode_reverses_encode_for_every_rule() {
    for mode in [Mode::DenyAll, Mode::Bypass, Mode::BypassAll, Mode::Block] {
        round_trip(&Lowered::new(&Ruleset::generate(&rich(mode))).unwrap());
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Any valid policy lowers, and every message decodes back to what was encoded;
    /// every batch is well-formed and numbered without gaps.
    #[test]
    fn any_policy_lowers_and_round_trips(policy in crate::core::proptests::arb_policy()) {
        let l = Lowered::new(&Ruleset::generate(&policy)).unwrap();
        round_trip(&l);
        let mut seq = 7;
        for b in l.batches(true, 7) {
            let msgs = messages(&b.bytes).unwrap();
            proptest::prop_assert_eq!(msgs.len() as u32, b.messages + 2);
            for m in msgs {
                proptest::prop_assert_eq!(m.seq, seq);
                seq += 1;
            }
        }
    }
}

fn round_trip(l: &Lowered) {
    {
        for rule in &l.rules {
            let mut buf = Vec::new();
            new_rule(&mut buf, 1, rule);
            let msgs = messages(&buf).unwrap();
            let back = decode_rule(msgs[0].body).unwrap();
            assert_eq!(&back, rule);
        }
        for s in &l.sets {
            let mut buf = Vec::new();
            new_set(&mut buf, 1, s);
            let msgs = messages(&buf).unwrap();
            assert_eq!(decode_set(msgs[0].body).unwrap(), s.set);
            if !s.elems.is_empty() {
                let mut buf = Vec::new();
                new_setelem(&mut buf, 1, s, &s.elems);
                let msgs = messages(&buf).unwrap();
                let (name, elems) = decode_setelems(msgs[0].body).unwrap();
                assert_eq!(name, s.set.name);
                assert_eq!(elems, s.elems);
            }
        }
    }
}

#[test]
fn elem_keys_of_any_length_are_their_bytes() {
    let keys: Vec<Vec<u8>> = [0, 1, 4, 12, 16, 23, 24, 25, 64, 300]
        .iter()
        .map(|&n| (0..n).map(|i| (i * 7 + n) as u8).collect())
        .collect();
    for k in &keys {
        let e = ElemKey::from_slice(k);
        assert_eq!(&*e, k.as_slice());
        assert_eq!(
            !e.spilled(),
            k.len() <= ELEM_KEY_INLINE,
            "{} bytes",
            k.len()
        );
        assert_eq!(format!("{e:?}"), format!("{k:?}"));
        assert_eq!(e, ElemKey::from(k.clone()));
        for other in &keys {
            assert_eq!(e.cmp(&ElemKey::from_slice(other)), k.cmp(other));
        }
    }
    // A key longer than any of ours (another table's set, or hostile input) is decoded
    // whole, as before: neither an error nor cut.
    for len in [24, 25, 64, 1000] {
        let key: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let e = ElemObj::key(ElemKey::from_slice(&key));
        let mut buf = Vec::new();
        write_elem(&mut Writer(&mut buf), &e);
        let got = decode_elem(&buf[4..]).unwrap();
        assert_eq!(got, e);
        assert_eq!(got.key.to_vec(), key);
    }
}

/// An element is read in one pass, but a malformed attribute is still the error where
/// an attribute before it fails too (as when the attributes were all split first).
#[test]
fn a_malformed_element_is_reported_as_malformed() {
    let mut buf = Vec::new();
    let mut w = Writer(&mut buf);
    w.nest(ELEM_KEY, |w| w.bytes(DATA_VALUE + 1, &[1, 2, 3, 4])); // not a data value
    w.be32(ELEM_FLAGS, 0);
    let truncated = buf.len() - 1;
    let well_formed = decode_elem(&buf).unwrap_err();
    assert!(well_formed.0.contains("not a data value"), "{well_formed}");
    let cut = decode_elem(&buf[..truncated]).unwrap_err();
    assert_eq!(cut, attrs(&buf[..truncated]).unwrap_err());
    // A data value with an overrunning attribute inside it.
    let mut buf = Vec::new();
    Writer(&mut buf).nest(ELEM_KEY, |w| w.bytes(DATA_VALUE, &[1, 2, 3, 4]));
    buf[4] = 200;
    let err = decode_elem(&buf).unwrap_err();
    assert!(err.0.contains("overruns"), "{err}");
}

#[test]
fn malformed_input_is_an_error_not_a_panic() {
    let mut buf = Vec::new();
    let l = Lowered::new(&Ruleset::generate(&rich(Mode::DenyAll))).unwrap();
    new_rule(&mut buf, 1, &l.rules[2]);
    for cut in 0..buf.len() {
        if let Ok(msgs) = messages(&buf[..cut]) {
            for m in msgs {
                let _ = decode_rule(m.body);
            }
        }
        let _ = decode_rule(&buf[cut..]);
        let _ = decode_set(&buf[cut..]);
        let _ = decode_setelems(&buf[cut..]);
    }
    for i in 0..buf.len() {
        let mut b = buf.clone();
        b[i] ^= 0xff;
        if let Ok(msgs) = messages(&b) {
            for m in msgs {
                let _ = decode_rule(m.body);
            }
        }
    }
}

#[test]
fn batches_stay_within_limits_and_number_every_message() {
    let mut p = Policy::new(Mode::DenyAll);
    for i in 0..50_000u32 {
        p.allow.push(AllowRule {
            net: IpAddr::V4(std::net::Ipv4Addr::from(0xC612_0000 + i)).into(),
            scope: None,
        });
    }
    let l = Lowered::new(&Ruleset::generate(&p)).unwrap();
    let batches = l.batches(true, 100);
    assert!(batches.len() > 1);
    let mut seq = 100;
    let mut elems = 0;
    for b in &batches {
        assert!(
            b.bytes.len() <= MAX_BATCH_BYTES + MAX_ELEMENT_BYTES,
            "{}",
            b.bytes.len()
        );
        let msgs = messages(&b.bytes).unwrap();
        assert_eq!(msgs.len() as u32, b.messages + 2);
        for m in &msgs {
            assert_eq!(m.seq, seq);
            seq += 1;
            if m.kind == nft_type(msg::NEWSETELEM) {
                let (name, e) = decode_setelems(m.body).unwrap();
                if name == "allow_v4" {
                    elems += e.len();
                }
            }
        }
        assert_eq!(b.first_seq, msgs[1].seq);
    }
    assert_eq!(elems, 50_000);
}
