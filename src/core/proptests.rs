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
            p.resolver_port = mark.map(|m| (m % 60_000) as u16 + 1024);
            p.learned_timeout = mark.map(|m| m % 3600 + 1);
            p
        })
}

/// The characters a rendered ruleset may contain: nft punctuation, identifiers, addresses.
fn safe_ruleset_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || " \t\n{}.,;:/@_-\"=!".contains(c)
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

/// A small interpreter of the generated ruleset for the first packet of a new flow, so the
/// generator and `Policy::permits` (used to decide which open flows to cut) can be checked
/// against each other on arbitrary policies.
mod interpret {
    use std::net::IpAddr;

    use crate::core::ruleset::{Element, Key, Ruleset, Stmt, Val};

    pub struct Packet {
        pub dst: IpAddr,
        pub proto: u8,
        pub dport: u16,
    }

    fn proto_name(p: u8) -> &'static str {
        if p == 6 {
            "tcp"
        } else {
            "udp"
        }
    }

    fn elem_matches(e: &Element, p: &Packet, concat: bool) -> bool {
        match (e, concat) {
            (Element::Addr(a), false) => *a == p.dst,
            (Element::Net(n), false) => n.contains(&p.dst),
            (Element::Svc(n, proto, port), true) => {
                n.contains(&p.dst) && proto.number() == p.proto && *port == p.dport
            }
            _ => false,
        }
    }

    fn val_matches_addr(v: &Val, rs: &Ruleset, p: &Packet, concat: bool) -> bool {
        match v {
            Val::Addr(a) => *a == p.dst,
            Val::Net(n) => n.contains(&p.dst),
            Val::Anon(vs) => vs.iter().any(|v| val_matches_addr(v, rs, p, concat)),
            Val::SetRef(name) => rs
                .sets
                .iter()
                .find(|s| s.name == *name)
                .is_some_and(|s| s.elements.iter().any(|e| elem_matches(e, p, concat))),
            _ => panic!("unexpected address value {v:?}"),
        }
    }

    fn matches(key: &Key, val: &Val, rs: &Ruleset, p: &Packet) -> bool {
        match key {
            Key::Meta("oifname") => p.dst.is_loopback(),
            Key::Meta("iifname") => false,
            Key::Meta("mark") => false, // the workload's packets carry no mark
            // dnsmasq holds its query port from before the workload starts.
            Key::Payload("udp", "sport") => false,
            Key::Meta("l4proto") => match val {
                Val::Sym(s) => *s == proto_name(p.proto),
                Val::Anon(vs) => vs.contains(&Val::Sym(proto_name(p.proto))),
                _ => panic!("{val:?}"),
            },
            Key::Ct("state") => matches!(val, Val::CtStates(s) if s.contains(&"new")),
            Key::Payload("icmpv6", _) => false,
            Key::Payload("ip", "daddr") => p.dst.is_ipv4() && val_matches_addr(val, rs, p, false),
            Key::Payload("ip6", "daddr") => p.dst.is_ipv6() && val_matches_addr(val, rs, p, false),
            Key::Payload(l4, "dport") => {
                (*l4 == "th" || *l4 == proto_name(p.proto))
                    && match val {
                        Val::Num(n) => *n == u64::from(p.dport),
                        Val::Anon(vs) => vs.contains(&Val::Num(u64::from(p.dport))),
                        _ => panic!("{val:?}"),
                    }
            }
            Key::Concat([Key::Payload(fam, "daddr"), ..]) => {
                (if *fam == "ip" {
                    p.dst.is_ipv4()
                } else {
                    p.dst.is_ipv6()
                }) && val_matches_addr(val, rs, p, true)
            }
            _ => panic!("uninterpreted key {key:?}"),
        }
    }

    /// Some(true) accept, Some(false) reject/drop, None: fell off the chain.
    fn run_chain(rs: &Ruleset, name: &str, p: &Packet) -> Option<bool> {
        let chain = rs
            .chains
            .iter()
            .find(|c| c.name == name)
            .expect("chain exists");
        'rules: for rule in &chain.rules {
            for stmt in &rule.0 {
                match stmt {
                    Stmt::Match(k, v) => {
                        if !matches(k, v, rs, p) {
                            continue 'rules;
                        }
                    }
                    Stmt::MatchNot(k, v) => {
                        if matches(k, v, rs, p) {
                            continue 'rules;
                        }
                    }
                    Stmt::Accept => return Some(true),
                    Stmt::Drop => return Some(false),
                    Stmt::RejectTcpReset | Stmt::RejectAdminProhibited => return Some(false),
                    Stmt::Jump(target) => {
                        if let Some(v) = run_chain(rs, target, p) {
                            return Some(v);
                        }
                    }
                    Stmt::Log(_) | Stmt::NfLog(_) | Stmt::Limit { .. } => {}
                }
            }
        }
        chain.hook.map(|h| h.policy == "accept")
    }

    /// Whether the output chain accepts the first packet of this flow.
    pub fn accepts(rs: &Ruleset, p: &Packet) -> bool {
        run_chain(rs, "output", p).expect("base chain has a policy")
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn permits_agrees_with_the_generated_ruleset(
        policy in arb_policy(),
        picks in proptest::collection::vec((any::<prop::sample::Index>(), any::<u32>(), any::<bool>(), 0u8..4), 1..20),
    ) {
        let rs = Ruleset::generate(&policy);
        // Probe addresses inside the policy's own networks (and their edges) plus random ones.
        let mut candidates: Vec<IpAddr> = policy.allow.iter().map(|r| r.net.addr())
            .chain(policy.allow.iter().map(|r| r.net.broadcast()))
            .chain(policy.deny.iter().map(|n| n.addr()))
            .chain(policy.dns_servers.iter().copied())
            .chain(policy.host_loopback.iter().map(|l| l.gateway))
            .chain(["10.1.2.3", "198.51.100.9", "2001:db8::9", "fd00::1", "127.0.0.1"].iter().map(|s| s.parse().unwrap()))
            .collect();
        candidates.sort();
        candidates.dedup();
        let mut ports: Vec<u16> = policy.allow.iter().filter_map(|r| r.scope.map(|s| s.port)).collect();
        ports.extend(policy.host_loopback.iter().flat_map(|l| l.ports.clone()));
        ports.extend([53, 80, 443]);
        for (idx, random, udp, port_pick) in picks {
            let dst = if port_pick == 3 { IpAddr::V4(Ipv4Addr::from(random)) } else { candidates[idx.index(candidates.len())] };
            let dport = ports[(random as usize) % ports.len()];
            let proto = if udp { 17 } else { 6 };
            let by_rules = interpret::accepts(&rs, &interpret::Packet { dst, proto, dport });
            prop_assert_eq!(policy.permits(dst, proto, Some(dport)), by_rules, "dst {} proto {} port {} mode {:?}", dst, proto, dport, policy.mode);
        }
    }
}
