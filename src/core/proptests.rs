//! Property tests of the security boundary: any valid policy yields a ruleset that verifies,
//! and no input string reaches the ruleset text unless it parsed into a typed target.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use proptest::prelude::*;

use super::policy::{AllowRule, HostLoopback, Mode, Policy};
use super::ruleset::Ruleset;
use super::target::{Host, PortScope, Protocol, Target};
use super::verify::verify;

fn arb_net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (any::<u32>(), 0u8..=32).prop_map(|(a, l)| IpNet::new(IpAddr::V4(Ipv4Addr::from(a)), l)
            .unwrap()
            .trunc()),
        (any::<u128>(), 0u8..=128).prop_map(|(a, l)| IpNet::new(IpAddr::V6(Ipv6Addr::from(a)), l)
            .unwrap()
            .trunc()),
        // Bias towards hosts, the common case.
        any::<u32>().prop_map(|a| IpNet::from(IpAddr::V4(Ipv4Addr::from(a)))),
    ]
}

fn arb_scope() -> impl Strategy<Value = Option<PortScope>> {
    proptest::option::of(
        (
            1u16..,
            prop_oneof![
                Just(None),
                Just(Some(Protocol::Tcp)),
                Just(Some(Protocol::Udp))
            ],
        )
            .prop_map(|(port, protocol)| PortScope { port, protocol }),
    )
}

/// Arbitrary valid policies.
pub fn arb_policy() -> impl Strategy<Value = Policy> {
    (
        prop_oneof![
            Just(Mode::DenyAll),
            Just(Mode::Bypass),
            Just(Mode::BypassAll),
            Just(Mode::Block)
        ],
        proptest::collection::vec((arb_net(), arb_scope()), 0..40),
        proptest::collection::vec(arb_net(), 0..8),
        proptest::collection::vec(arb_net().prop_map(|n| n.addr()), 0..3),
        proptest::option::of((
            arb_net().prop_map(|n| n.addr()),
            proptest::collection::vec(1u16.., 0..4),
        )),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(|(mode, allow, deny, dns, lb, mark)| {
            let mut p = Policy::new(mode);
            p.allow = allow
                .into_iter()
                .map(|(net, scope)| AllowRule { net, scope })
                .collect();
            p.deny = deny;
            p.dns_servers = dns;
            p.host_loopback = lb.map(|(gateway, ports)| HostLoopback { gateway, ports });
            p.resolver_mark = mark;
            p
        })
}

/// The characters a rendered ruleset may contain: nft punctuation, identifiers, addresses.
fn safe_ruleset_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || " \t\n{}.,;:/@_-\"=".contains(c)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn any_policy_renders_a_ruleset_that_verifies(policy in arb_policy()) {
        let rs = Ruleset::generate(&policy);
        let text = rs.to_nft();
        prop_assert!(text.chars().all(safe_ruleset_char));
        // Every quoted string in the text is one of the generator's own constants.
        for quoted in text.split('"').skip(1).step_by(2) {
            prop_assert!(quoted == "lo" || quoted.starts_with("TEROK_SHIELD_"), "{}", quoted);
        }
        verify(&rs, &super::verify::tests_support::as_live(&rs)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        // Chunked transactions carry every element exactly once.
        let chunks: usize = rs.transactions().iter().flat_map(|t| t.lines()).filter(|l| l.starts_with("add element") || l.trim().starts_with("elements = {")).map(|l| l.matches(", ").count() + 1).sum();
        prop_assert_eq!(chunks, rs.element_count());
    }

    #[test]
    fn arbitrary_text_never_reaches_the_ruleset_unparsed(raw in "\\PC{0,40}") {
        if let Ok(target) = Target::parse(&raw) {
            let shown = target.to_string();
            prop_assert!(shown.chars().all(|c| c.is_ascii_alphanumeric() || "._-*:/[]".contains(c)), "{}", shown);
            prop_assert_eq!(Target::parse(&shown).unwrap(), target.clone());
            if let Host::Net(net) = target.host {
                let mut p = Policy::new(Mode::DenyAll);
                p.allow.push(AllowRule { net, scope: target.scope });
                prop_assert!(Ruleset::generate(&p).to_nft().chars().all(safe_ruleset_char));
            }
        }
    }

    #[test]
    fn structured_targets_round_trip(net in arb_net(), scope in arb_scope()) {
        let t = Target { host: Host::Net(net), scope };
        prop_assert_eq!(Target::parse(&t.to_string()).unwrap(), t);
    }
}
