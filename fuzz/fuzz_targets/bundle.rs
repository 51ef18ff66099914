//! state.json with format migration (src/core/bundle_format.rs `decode`), and what the hook
//! builds from an accepted bundle (policy, ruleset, DNS policy).
//!
//! Invariants: an accepted bundle is of the current format, every target in it is canonical,
//! writing it out and reading it again gives the same bundle (so a live command that saves
//! it changes nothing), and a bundle written as format 1 reads as the same decisions. Any
//! bundle turns into a policy and a ruleset that verifies against its own rendering.
#![no_main]

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use terok_shield::core::bundle::{Bundle, RuntimeFacts, BUNDLE_FORMAT};
use terok_shield::core::bundle_format::{decode, FormatError};
use terok_shield::core::config::AuditConfig;
use terok_shield::core::dns_policy::DnsPolicy;
use terok_shield::core::ruleset::Ruleset;
use terok_shield::core::target::Target;

const OURS: &str = "0.2.0";

fn check(b: &Bundle) {
    assert_eq!(b.format, BUNDLE_FORMAT);
    for t in b.entries.iter().chain(&b.live_allow).chain(&b.live_deny) {
        assert_eq!(Target::parse(&t.to_string()).as_ref(), Ok(t));
    }
    let text = serde_json::to_vec(b).unwrap();
    assert_eq!(&decode(&text, OURS).expect("our own bundle reads back"), b);
    let facts = RuntimeFacts {
        dns_servers: vec!["10.0.2.3".parse().unwrap()],
        gateway: Some("10.0.2.2".parse().unwrap()),
    };
    let policy = b.policy(&facts);
    let rs = Ruleset::generate(&policy);
    let _ = rs.to_nft();
    let _ = DnsPolicy::from_bundle(b);
}

/// The same decisions as format 1 wrote them.
fn as_format_1(b: &Bundle, drop_optional: bool) -> Vec<u8> {
    let mut v = serde_json::to_value(b).unwrap();
    let o = v.as_object_mut().unwrap();
    o.insert("format".into(), Value::from(1));
    let by = o.remove("written_by").unwrap();
    o.insert("shield_version".into(), by);
    o.remove("audit_max_bytes");
    if drop_optional && b.upstream_dns.is_none() && b.ttl_bounds == [60, 3600] {
        o.remove("upstream_dns");
        o.remove("ttl_bounds");
    }
    serde_json::to_vec(&v).unwrap()
}

fuzz_target!(|data: &[u8]| {
    match decode(data, OURS) {
        Ok(b) => check(&b),
        Err(FormatError::Newer { written_by, .. }) => assert!(written_by.chars().count() <= 64),
        Err(_) => {}
    }
    let mut u = Unstructured::new(data);
    if let Ok(b) = fuzz_support::bundle(&mut u) {
        check(&b);
        let drop = u.arbitrary().unwrap_or(false);
        let old = decode(&as_format_1(&b, drop), OURS).expect("format 1 reads");
        let mut want = b.clone();
        want.audit_max_bytes = AuditConfig::default().max_bytes;
        assert_eq!(old, want);
        // Newer formats are refused, whatever they hold.
        let mut newer = serde_json::to_value(&b).unwrap();
        newer["format"] = Value::from(u.int_in_range(3..=u64::MAX).unwrap_or(3));
        assert!(matches!(
            decode(&serde_json::to_vec(&newer).unwrap(), OURS),
            Err(FormatError::Newer { .. })
        ));
    }
});
