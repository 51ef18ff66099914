//! DNS queries from the workload (src/core/dns_policy.rs `inspect_request`, the replies built
//! for refused and failed questions, and `DnsPolicy::decide_query`): every byte is the
//! attacker's.
//!
//! Invariants: a response (QR set) or a runt is dropped without a reply, so two resolvers can
//! never be bounced off each other; every reply we build is a response carrying the query's
//! ID, parses, and echoes exactly the one question of the request (same name, type and class
//! IN); OPT only when the client sent one; the Extended DNS Error only on REFUSED. A question
//! is forwarded in `up` mode only when an allowlisted pattern matches it and no deny does, and
//! never in `block` mode. Whenever the in-place reader (`inspect_request_fast`) takes a
//! message, hickory's reading of it (`inspect_request_hickory`) gives the very same request.
#![no_main]

use arbitrary::Unstructured;
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::DNSClass;
use libfuzzer_sys::fuzz_target;
use terok_shield::core::dns_policy::{
    inspect_request, inspect_request_fast, inspect_request_hickory, refused_response,
    servfail_response, truncated_response, with_id, DnsPolicy, QueryDecision, Request, EDNS_EDE,
};
use terok_shield::core::policy::Mode;
use terok_shield::core::target::{DomainName, Host};

fn lower(name: &hickory_proto::rr::Name) -> String {
    let mut s = name.to_ascii().to_ascii_lowercase();
    if s.ends_with('.') {
        s.pop();
    }
    s
}

fn check_reply(req: &Request, bytes: &[u8], rcode: ResponseCode, tc: bool) {
    let msg = Message::from_vec(bytes).expect("our reply parses");
    assert_eq!(msg.metadata.id, req.id);
    assert_eq!(msg.metadata.message_type, MessageType::Response);
    assert_eq!(msg.metadata.response_code, rcode);
    assert_eq!(msg.metadata.truncation, tc);
    assert_eq!(msg.metadata.recursion_desired, req.recursion_desired);
    let [q] = msg.queries.as_slice() else {
        panic!("reply has {} questions", msg.queries.len())
    };
    assert_eq!(q.query_type(), req.qtype);
    assert_eq!(q.query_class(), DNSClass::IN);
    assert_eq!(lower(q.name()), req.qname.as_str());
    assert!(msg.answers.is_empty() && msg.authorities.is_empty());
    assert_eq!(msg.edns.is_some(), req.edns, "OPT only for EDNS clients");
    let ede = msg.edns.as_ref().is_some_and(|e| {
        e.options()
            .as_ref()
            .iter()
            .any(|(c, _)| u16::from(*c) == EDNS_EDE)
    });
    assert_eq!(ede, req.edns && rcode == ResponseCode::Refused);
}

fn check_decision(policy_bundle: &terok_shield::core::bundle::Bundle, req: &Request) {
    let policy = DnsPolicy::from_bundle(policy_bundle);
    let denied = policy_bundle.live_deny.iter().any(|t| match &t.host {
        Host::Domain(p) => p.matches(&req.qname),
        Host::Net(_) => false,
    });
    match policy.decide_query(&req.qname, req.qtype) {
        QueryDecision::Forward(grants) => {
            assert_ne!(policy_bundle.mode, Mode::Block);
            assert!(!denied, "a denied name was forwarded");
            assert!(grants.iter().all(|g| g.pattern.matches(&req.qname)));
            for g in &grants {
                assert!(policy_bundle
                    .entries
                    .iter()
                    .chain(&policy_bundle.live_allow)
                    .any(|t| t.host == Host::Domain(g.pattern.clone()) && t.scope == g.scope));
            }
            if policy_bundle.mode == Mode::DenyAll {
                assert!(!grants.is_empty(), "up mode forwarded an unlisted name");
            }
        }
        QueryDecision::Refuse(_) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let (bundle_bytes, query) = data.split_at(
        data.len()
            .min(usize::from(data.first().copied().unwrap_or(0) % 64)),
    );
    let slow = inspect_request_hickory(query);
    if let Some(fast) = inspect_request_fast(query) {
        assert_eq!(Ok(fast), slow, "the in-place reader disagrees with hickory");
    }
    let result = inspect_request(query);
    assert_eq!(result, slow);
    match result {
        Ok(req) => {
            assert!(query.len() >= 12 && query[2] & 0x80 == 0);
            assert!(req.udp_payload >= 512);
            assert_eq!(
                req.qname.as_str().parse::<DomainName>().as_ref(),
                Ok(&req.qname)
            );
            check_reply(
                &req,
                &refused_response(&req, query),
                ResponseCode::Refused,
                false,
            );
            check_reply(
                &req,
                &servfail_response(&req, query),
                ResponseCode::ServFail,
                false,
            );
            check_reply(
                &req,
                &truncated_response(&req, query),
                ResponseCode::NoError,
                true,
            );
            let moved = with_id(query, req.id ^ 0x5a5a);
            assert_eq!(moved.len(), query.len());
            assert_eq!(with_id(&moved, req.id), query);
            if let Ok(b) = fuzz_support::bundle(&mut Unstructured::new(bundle_bytes)) {
                check_decision(&b, &req);
            }
        }
        Err(m) => match m.reply() {
            None => assert!(query.len() < 12 || query[2] & 0x80 != 0),
            Some(reply) => {
                assert!(
                    query.len() >= 12 && query[2] & 0x80 == 0,
                    "replied to a response"
                );
                assert!(reply.len() >= 12);
                assert_eq!(reply[..2], query[..2], "reply carries the query's ID");
                assert_ne!(reply[2] & 0x80, 0, "reply is a response");
                if let Ok(msg) = Message::from_vec(reply) {
                    assert!(msg.answers.is_empty() && msg.authorities.is_empty());
                }
            }
        },
    }
});
