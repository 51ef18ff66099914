//! Which DNS-learned addresses a new policy no longer justifies.
//!
//! The builtin resolver records every address it adds to the DNS-learned sets together with
//! the name that brought it (`learned.jsonl` in the bundle). When a domain is denied, exactly
//! the addresses that name brought are removed: not those another still-allowed name also
//! brought. Pure, so the rule is tested without a resolver.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use hickory_proto::rr::RecordType;
use serde::{Deserialize, Serialize};

use super::dns_policy::{DnsPolicy, QueryDecision};
use super::target::{DomainName, PortScope};

/// One learned element, as the resolver records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LearnedRecord {
    pub domain: DomainName,
    pub addr: IpAddr,
    /// Port scope text (`443/tcp`), absent for whole-host elements.
    #[serde(default)]
    pub scope: Option<String>,
    /// Unix seconds after which the kernel has expired the element anyway.
    pub until: u64,
}

impl LearnedRecord {
    /// The scope, parsed (a record with an unparsable scope is ignored by callers).
    pub fn port_scope(&self) -> Option<Option<PortScope>> {
        match &self.scope {
            None => Some(None),
            Some(s) => super::target::Target::parse(&format!("198.51.100.1:{s}"))
                .ok()
                .map(|t| t.scope),
        }
    }
}

/// Records (still live at `now`) whose name `policy` no longer answers and whose element no
/// other live, still-allowed record also justifies.
pub fn unjustified(records: &[LearnedRecord], policy: &DnsPolicy, now: u64) -> Vec<LearnedRecord> {
    unjustified_by(records, now, |d| {
        matches!(
            policy.decide_query(d, RecordType::A),
            QueryDecision::Forward(_)
        ) || matches!(
            policy.decide_query(d, RecordType::AAAA),
            QueryDecision::Forward(_)
        )
    })
}

/// [`unjustified`] for a resolver whose name matching differs from the builtin one (dnsmasq):
/// `allowed` says whether a name is still answered.
pub fn unjustified_by(
    records: &[LearnedRecord],
    now: u64,
    allowed: impl Fn(&DomainName) -> bool,
) -> Vec<LearnedRecord> {
    // Linear in the records (a busy resolver leaves tens of thousands): each name is
    // decided once, and the elements some allowed name still brought are collected first.
    let live: Vec<&LearnedRecord> = records.iter().filter(|r| r.until > now).collect();
    let mut decided: HashMap<&DomainName, bool> = HashMap::new();
    let allowed_by_record: Vec<bool> = live
        .iter()
        .map(|r| {
            *decided
                .entry(&r.domain)
                .or_insert_with(|| allowed(&r.domain))
        })
        .collect();
    let justified: HashSet<(&IpAddr, &Option<String>)> = live
        .iter()
        .zip(&allowed_by_record)
        .filter(|(_, ok)| **ok)
        .map(|(r, _)| (&r.addr, &r.scope))
        .collect();
    let mut seen: HashSet<(&IpAddr, &Option<String>)> = HashSet::new();
    live.iter()
        .zip(&allowed_by_record)
        .filter(|(r, ok)| !**ok && !justified.contains(&(&r.addr, &r.scope)))
        .filter(|(r, _)| seen.insert((&r.addr, &r.scope)))
        .map(|(r, _)| (*r).clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by scripts/soak.sh: `block` of a container whose resolver had learned ~20,000
    /// addresses ran its connection-revoking helper for minutes: every record was compared
    /// with every other (and the policy asked again for each pair).
    #[test]
    fn many_records_are_sorted_out_in_one_pass() {
        let n = 40_000u32;
        let records: Vec<LearnedRecord> = (0..n)
            .map(|i| LearnedRecord {
                domain: format!("t{}.bench.test", i % 5000).parse().unwrap(),
                addr: IpAddr::from(std::net::Ipv4Addr::from(0xc612_0000 + i)),
                scope: None,
                until: 100,
            })
            .collect();
        let asked = std::cell::Cell::new(0);
        let doomed = unjustified_by(&records, 10, |_| {
            asked.set(asked.get() + 1);
            false
        });
        assert_eq!(doomed.len(), n as usize);
        assert_eq!(asked.get(), 5000, "each name is decided once");
    }
    use crate::core::bundle::{Bundle, DnsTier};
    use crate::core::policy::Mode;

    fn bundle(entries: &[&str], deny: &[&str]) -> Bundle {
        crate::core::bundle::test_bundle(entries, deny, Mode::DenyAll, DnsTier::Builtin)
    }

    fn rec(domain: &str, addr: &str, until: u64) -> LearnedRecord {
        LearnedRecord {
            domain: domain.parse().unwrap(),
            addr: addr.parse().unwrap(),
            scope: None,
            until,
        }
    }

    #[test]
    fn a_denied_name_loses_exactly_its_own_addresses() {
        let records = vec![
            rec("pair.example", "198.51.100.70", 100),
            rec("pair.example", "198.51.100.71", 100),
            rec("shared.example", "198.51.100.70", 100),
            rec("old.example", "198.51.100.9", 5),
        ];
        let policy = DnsPolicy::from_bundle(&bundle(
            &["pair.example", "shared.example", "old.example"],
            &["pair.example"],
        ));
        let gone = unjustified(&records, &policy, 10);
        assert_eq!(gone, vec![rec("pair.example", "198.51.100.71", 100)]);
        let policy = DnsPolicy::from_bundle(&bundle(&["pair.example", "shared.example"], &[]));
        assert!(unjustified(&records, &policy, 10).is_empty());
        let policy = DnsPolicy::from_bundle(&bundle(&["*.example"], &["*.example"]));
        assert_eq!(
            unjustified(&records, &policy, 10).len(),
            2,
            "expired records are ignored"
        );
    }

    #[test]
    fn scopes_parse_back() {
        let mut r = rec("a.example", "198.51.100.1", 1);
        assert_eq!(r.port_scope(), Some(None));
        r.scope = Some("443/tcp".into());
        assert_eq!(r.port_scope().unwrap().unwrap().port, 443);
        r.scope = Some("junk".into());
        assert_eq!(r.port_scope(), None);
    }
}
