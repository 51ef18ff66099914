//! Upstream DNS answers (src/core/dns_policy.rs `extract_answer`): CNAME chains, TTLs and the
//! rebinding rule. The workload cannot write these bytes, but it chooses the names, and the
//! zone behind an allowed wildcard may be the attacker's: the answer is hostile too.
//!
//! The answer is built with hickory-proto from generated parts (names from a small
//! vocabulary, so chains reach allowlisted names; addresses on both sides of every private
//! range; TTLs at the extremes), then sometimes corrupted byte by byte.
//!
//! Invariants, checked against an independent reading of the bytes:
//! - nothing is learned unless the question is forwarded under the policy (never in `block`
//!   mode, never for a denied name, in `up` mode only under a matching grant), and only from
//!   a NOERROR answer to exactly the request's ID and question;
//! - every learned address is an A/AAAA record of a name reachable from the queried name by
//!   CNAMEs in the answer section, is covered by no live deny, and is learned only for ports a
//!   matching grant opens; a rebinding-sensitive one only for ports an allowlisted network
//!   containing it also opens;
//! - learned TTLs lie within the configured bounds, and when anything is learned the queried
//!   name's records in the reply carry no longer TTL;
//! - outside `down --all`, the bytes for the client hold no rebinding-sensitive address that
//!   no allowlisted network covers, read by a plain RFC 1035 walk of the message (so a
//!   difference between hickory's parser and a client's cannot hide one);
//! - whenever the in-place reader (`extract_answer_fast`) takes an answer, hickory's reading
//!   of it (`extract_answer_hickory`) decides exactly the same.
#![no_main]

use std::collections::HashSet;
use std::net::IpAddr;

use arbitrary::{Result, Unstructured};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use libfuzzer_sys::fuzz_target;
use terok_shield::core::bundle::Bundle;
use terok_shield::core::dns_policy::{
    extract_answer, extract_answer_fast, extract_answer_hickory, inspect_request, AnswerDecision,
    DnsPolicy, QueryDecision, Request,
};
use terok_shield::core::policy::Mode;
use terok_shield::core::private::is_rebinding_sensitive;
use terok_shield::core::target::{DomainName, Host, PortScope};

fn name_of(d: &DomainName) -> Name {
    let mut n = Name::from_ascii(d.as_str()).expect("a domain name is a DNS name");
    n.set_fqdn(true);
    n
}

/// A name for an owner or CNAME target: the question, a name of the vocabulary, or one no
/// allowlist can hold.
fn some_name(u: &mut Unstructured, qname: &Name) -> Result<Name> {
    Ok(match u.int_in_range(0..=7)? {
        0..=2 => qname.clone(),
        3 => Name::from_labels(vec![b"a b".to_vec(), b"com".to_vec()]).unwrap(),
        4 => {
            // The question in another case: DNS names compare case-insensitively.
            Name::from_ascii(qname.to_ascii().to_ascii_uppercase()).unwrap_or(qname.clone())
        }
        _ => name_of(&fuzz_support::domain(u)?),
    })
}

fn record(u: &mut Unstructured, qname: &Name) -> Result<Record> {
    let owner = some_name(u, qname)?;
    let ttl = match u.int_in_range(0..=3)? {
        0 => 0,
        1 => u32::MAX,
        _ => u.arbitrary()?,
    };
    let data = match u.int_in_range(0..=5)? {
        0 | 1 => match fuzz_support::addr(u)? {
            IpAddr::V4(a) => RData::A(A(a)),
            IpAddr::V6(a) => RData::AAAA(AAAA(a)),
        },
        2 | 3 => RData::CNAME(CNAME(some_name(u, qname)?)),
        4 => RData::TXT(TXT::new(vec!["v=spf1 -all".into()])),
        _ => match fuzz_support::addr(u)? {
            IpAddr::V4(a) => RData::A(A(a)),
            IpAddr::V6(a) => RData::AAAA(AAAA(a)),
        },
    };
    let mut r = Record::from_rdata(owner, ttl, data);
    if u.ratio(1, 16)? {
        r.dns_class = DNSClass::CH;
    }
    Ok(r)
}

struct Case {
    bundle: Bundle,
    req: Request,
    upstream: Vec<u8>,
    bounds: (u32, u32),
}

fn case(u: &mut Unstructured) -> Result<Option<Case>> {
    let bundle = fuzz_support::bundle(u)?;
    let qdomain = fuzz_support::domain(u)?;
    let qtype = *u.choose(&[
        RecordType::A,
        RecordType::AAAA,
        RecordType::A,
        RecordType::CNAME,
        RecordType::TXT,
        RecordType::ANY,
    ])?;
    let mut query = Message::query();
    query.metadata.id = u.arbitrary()?;
    query.metadata.recursion_desired = true;
    let mut qname = name_of(&qdomain);
    if u.ratio(1, 4)? {
        qname = Name::from_ascii(qname.to_ascii().to_ascii_uppercase()).unwrap_or(qname);
    }
    query.add_query(Query::query(qname.clone(), qtype));
    if u.arbitrary()? {
        query.set_edns(Edns::new());
    }
    let raw = query.to_vec().expect("a query encodes");
    let Ok(req) = inspect_request(&raw) else {
        return Ok(None);
    };

    let mut msg = Message::response(req.id, OpCode::Query);
    if u.ratio(1, 32)? {
        msg.metadata.id = u.arbitrary()?;
    }
    if u.ratio(1, 32)? {
        msg.metadata.message_type = MessageType::Query;
    }
    msg.metadata.response_code = *u.choose(&[
        ResponseCode::NoError,
        ResponseCode::NoError,
        ResponseCode::NoError,
        ResponseCode::NXDomain,
        ResponseCode::ServFail,
        ResponseCode::Refused,
    ])?;
    msg.metadata.truncation = u.ratio(1, 32)?;
    match u.int_in_range(0..=15)? {
        0 => {}
        1 => {
            msg.add_query(Query::query(qname.clone(), qtype));
            msg.add_query(Query::query(qname.clone(), qtype));
        }
        2 => {
            msg.add_query(Query::query(some_name(u, &qname)?, qtype));
        }
        3 => {
            msg.add_query(Query::query(qname.clone(), RecordType::MX));
        }
        _ => {
            msg.add_query(Query::query(some_name(u, &qname)?, qtype));
        }
    }
    for _ in 0..u.int_in_range(0..=8)? {
        msg.add_answer(record(u, &qname)?);
    }
    for _ in 0..u.int_in_range(0..=2)? {
        msg.add_authority(record(u, &qname)?);
    }
    for _ in 0..u.int_in_range(0..=2)? {
        msg.add_additional(record(u, &qname)?);
    }
    if u.ratio(1, 4)? {
        msg.set_edns(Edns::new());
    }
    let Ok(mut upstream) = msg.to_vec() else {
        return Ok(None);
    };
    // Sometimes corrupt a few bytes: counts, lengths, compression pointers.
    if u.ratio(1, 8)? {
        for _ in 0..u.int_in_range(1..=4)? {
            let i = u.choose_index(upstream.len())?;
            upstream[i] = u.arbitrary()?;
        }
    }
    let min: u32 = u.arbitrary()?;
    let bounds = if u.ratio(1, 8)? {
        (min, u.arbitrary()?) // possibly inverted: max wins
    } else {
        (min % 600, 600 + u.int_in_range(0..=86_400)?)
    };
    Ok(Some(Case {
        bundle,
        req,
        upstream,
        bounds,
    }))
}

/// The A and AAAA records of every section, by a plain walk of the wire format (header
/// counts, names with compression, type, class, rdlength): how a stub resolver reads them.
fn wire_addrs(m: &[u8]) -> Option<Vec<IpAddr>> {
    let count = |i: usize| {
        Some(usize::from(u16::from_be_bytes([
            *m.get(i)?,
            *m.get(i + 1)?,
        ])))
    };
    let (qd, rrs) = (count(4)?, count(6)? + count(8)? + count(10)?);
    let mut at = 12;
    let skip_name = |mut at: usize| -> Option<usize> {
        loop {
            let len = *m.get(at)?;
            match len {
                0 => return Some(at + 1),
                l if l & 0xc0 == 0xc0 => return Some(at + 2),
                l if l & 0xc0 == 0 => at += 1 + usize::from(l),
                _ => return None,
            }
        }
    };
    for _ in 0..qd {
        at = skip_name(at)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..rrs {
        at = skip_name(at)?;
        let rtype = u16::from_be_bytes([*m.get(at)?, *m.get(at + 1)?]);
        let rdlen = usize::from(u16::from_be_bytes([*m.get(at + 8)?, *m.get(at + 9)?]));
        let rdata = m.get(at + 10..at + 10 + rdlen)?;
        match (rtype, rdlen) {
            (1, 4) => out.push(IpAddr::from(<[u8; 4]>::try_from(rdata).unwrap())),
            (28, 16) => out.push(IpAddr::from(<[u8; 16]>::try_from(rdata).unwrap())),
            _ => {}
        }
        at += 10 + rdlen;
    }
    Some(out)
}

fn covers(wide: Option<PortScope>, narrow: Option<PortScope>) -> bool {
    match (wide, narrow) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(w), Some(n)) => {
            w.port == n.port && (w.protocol.is_none() || w.protocol == n.protocol)
        }
    }
}

fn check(c: &Case) {
    let policy = DnsPolicy::from_bundle(&c.bundle);
    let b = &c.bundle;
    let allowed_by_net = |addr: IpAddr| {
        !b.live_deny
            .iter()
            .any(|t| matches!(t.host, Host::Net(n) if n.contains(&addr)))
            && b.entries
                .iter()
                .chain(&b.live_allow)
                .any(|t| matches!(t.host, Host::Net(n) if n.contains(&addr)))
    };
    let decision = extract_answer(&c.upstream, &c.req, &policy, c.bounds);
    let slow = extract_answer_hickory(&c.upstream, &c.req, &policy, c.bounds);
    if let Some(fast) = extract_answer_fast(&c.upstream, &c.req, &policy, c.bounds) {
        assert_eq!(fast, slow, "the in-place reader disagrees with hickory");
    }
    assert_eq!(decision, slow);
    let AnswerDecision::Answer(answer) = decision else {
        return;
    };
    let QueryDecision::Forward(grants) = policy.decide_query(&c.req.qname, c.req.qtype) else {
        panic!("answered a question the policy refuses");
    };
    assert_ne!(b.mode, Mode::Block);
    let up = Message::from_vec(&c.upstream).expect("an answered upstream message parses");
    assert_eq!(up.metadata.id, c.req.id);
    assert_eq!(up.metadata.message_type, MessageType::Response);
    assert!(!up.metadata.truncation);

    // Names reachable from the question through CNAMEs (any path: an upper bound).
    let qname = &up.queries[0].name().clone();
    let mut reachable: Vec<Name> = vec![qname.clone()];
    let mut i = 0;
    while i < reachable.len() {
        for r in &up.answers {
            if let RData::CNAME(t) = &r.data {
                if r.name == reachable[i] && !reachable.contains(&t.0) {
                    reachable.push(t.0.clone());
                }
            }
        }
        i += 1;
    }
    let chain_addrs: HashSet<IpAddr> = up
        .answers
        .iter()
        .filter(|r| reachable.contains(&r.name))
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();

    let (min, max) = c.bounds;
    for ins in &answer.inserts {
        assert_eq!(up.metadata.response_code, ResponseCode::NoError);
        assert_eq!(ins.domain, c.req.qname);
        assert!(
            chain_addrs.contains(&ins.addr),
            "learned {} off the chain",
            ins.addr
        );
        assert!(
            !b.live_deny
                .iter()
                .any(|t| matches!(t.host, Host::Net(n) if n.contains(&ins.addr))),
            "learned denied {}",
            ins.addr
        );
        let secs = ins.ttl.as_secs();
        assert!(
            secs <= u64::from(max) && secs >= u64::from(min.min(max)),
            "ttl {secs}"
        );
        assert!(
            grants.iter().any(|g| covers(g.scope, ins.scope)),
            "learned {} for {:?}, wider than every grant",
            ins.addr,
            ins.scope
        );
        if is_rebinding_sensitive(ins.addr) {
            assert!(
                b.entries.iter().chain(&b.live_allow).any(|t| {
                    matches!(t.host, Host::Net(n) if n.contains(&ins.addr))
                        && covers(t.scope, ins.scope)
                }),
                "learned sensitive {} for {:?} beyond its allowlisted network",
                ins.addr,
                ins.scope
            );
        }
    }
    for addr in &answer.removed {
        assert!(is_rebinding_sensitive(*addr) && !allowed_by_net(*addr));
    }
    for addr in &answer.named {
        assert!(chain_addrs.contains(addr) && !answer.removed.contains(addr));
    }

    // What the client gets.
    let out = Message::from_vec(&answer.response).expect("the client's bytes parse");
    assert_eq!(out.metadata.id, up.metadata.id);
    assert_eq!(out.queries, up.queries);
    assert_eq!(out.metadata.response_code, up.metadata.response_code);
    if b.mode != Mode::BypassAll {
        let addrs = wire_addrs(&answer.response).expect("the client's bytes walk");
        for addr in addrs {
            assert!(
                !is_rebinding_sensitive(addr) || allowed_by_net(addr),
                "sensitive {addr} reaches the client"
            );
        }
    }
    if !answer.inserts.is_empty() {
        let cap = max;
        for r in out.answers.iter().filter(|r| &r.name == qname) {
            if matches!(r.data, RData::A(_) | RData::AAAA(_) | RData::CNAME(_)) {
                assert!(
                    r.ttl <= cap,
                    "the client may cache {} for {} s > {cap}",
                    r.name,
                    r.ttl
                );
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(c)) = case(&mut Unstructured::new(data)) {
        check(&c);
    }
});
