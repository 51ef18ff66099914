//! Unit and property tests of the live-change planner.

use proptest::prelude::*;

use super::*;
use crate::core::bundle::test_bundle;

fn t(s: &str) -> Target {
    Target::parse(s).unwrap()
}

fn allow(s: &str) -> LiveChange {
    LiveChange::Allow {
        target: t(s),
        typed: s.to_string(),
    }
}

fn deny(s: &str) -> LiveChange {
    LiveChange::Deny {
        target: t(s),
        typed: s.to_string(),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn bundle(tier: DnsTier) -> Bundle {
    test_bundle(
        &["198.51.100.10", "2001:db8::10", "a.example"],
        &[],
        Mode::DenyAll,
        tier,
    )
}

fn plan_of(b: &Bundle, change: &LiveChange) -> Result<LivePlan, LiveError> {
    plan(b, &RuntimeFacts::default(), change, &Observed::default())
}

// ---------------------------------------------------------------------------------------
// allow and deny
// ---------------------------------------------------------------------------------------

#[test]
fn allowing_an_address_saves_first_then_adds_it_over_netlink() {
    let b = bundle(DnsTier::Builtin);
    let p = plan_of(&b, &allow("198.51.100.7")).unwrap();
    assert_eq!(
        p.steps,
        [
            Step::SaveBundle,
            Step::Firewall(FirewallChange::AddAddresses(vec![(
                sets::ALLOW_V4,
                vec![ip("198.51.100.7")]
            )]))
        ]
    );
    assert!(!p.revokes_flows());
    assert_eq!(p.bundle.live_allow, [t("198.51.100.7")]);
    assert_eq!(p.report.event, "allow");
    assert_eq!(p.report.addresses, ["198.51.100.7"]);
    assert_eq!(
        p.report.message,
        "Allowed 198.51.100.7 -> 198.51.100.7 for c1\n"
    );
    // The target is echoed as typed, not in canonical form.
    let p = plan_of(&b, &allow("198.51.100.7/24")).unwrap();
    assert_eq!(p.report.target.as_deref(), Some("198.51.100.7/24"));
    assert_eq!(p.report.addresses, ["198.51.100.0/24"]);
}

#[test]
fn networks_ports_and_ipv6_take_the_paths_their_sets_need() {
    let b = bundle(DnsTier::Builtin);
    // Interval and service sets are rewritten whole by nft.
    for target in ["198.51.100.48/30", "198.51.100.7:443/tcp"] {
        let p = plan_of(&b, &allow(target)).unwrap();
        assert_eq!(
            p.steps,
            [Step::SaveBundle, Step::Firewall(FirewallChange::Update)],
            "{target}"
        );
    }
    let p = plan_of(&b, &allow("2001:db8::7")).unwrap();
    assert_eq!(
        p.steps[1],
        Step::Firewall(FirewallChange::AddAddresses(vec![(
            sets::ALLOW_V6,
            vec![ip("2001:db8::7")]
        )]))
    );
    // Allowing what is already allowed changes no set: verified through the regular path.
    let p = plan_of(&b, &allow("198.51.100.10")).unwrap();
    assert_eq!(p.steps[1], Step::Firewall(FirewallChange::Update));
    assert_eq!(
        p.bundle, b,
        "a profile entry is not repeated as a live allow"
    );
}

#[test]
fn a_deny_narrows_the_firewall_before_saving_and_cuts_connections_after() {
    let b = bundle(DnsTier::Builtin);
    let p = plan_of(&b, &deny("198.51.100.10")).unwrap();
    assert_eq!(
        p.steps,
        [
            Step::Firewall(FirewallChange::Update),
            Step::SaveBundle,
            Step::RevokeFlows
        ]
    );
    assert_eq!(p.new_policy.deny, ["198.51.100.10/32".parse().unwrap()]);
    assert!(!p.new_policy.permits(ip("198.51.100.10"), 6, Some(80)));
    assert_eq!(
        p.report.message,
        "Denied 198.51.100.10 (198.51.100.10) for c1\n"
    );
    // A domain deny reports the addresses cached for it (none in a resolver tier).
    let p = plan_of(&b, &deny("a.example")).unwrap();
    assert_eq!(p.report.message, "Denied a.example for c1\n");
    assert_eq!(p.bundle.live_deny, [t("a.example")]);
}

#[test]
fn the_dnsmasq_tier_reloads_dnsmasq_after_the_change_is_in_force() {
    let b = bundle(DnsTier::Dnsmasq);
    let p = plan_of(&b, &deny("a.example")).unwrap();
    assert_eq!(
        p.steps,
        [
            Step::Firewall(FirewallChange::Update),
            Step::SaveBundle,
            Step::ReloadDnsmasq,
            Step::RevokeFlows
        ]
    );
    let p = plan_of(&b, &LiveChange::Mode(Mode::Bypass)).unwrap();
    assert_eq!(p.steps.last(), Some(&Step::ReloadDnsmasq));
}

#[test]
fn refusals_name_the_problem_and_the_fix() {
    let mut b = bundle(DnsTier::Builtin);
    b.live_deny.push(t("198.51.100.7"));
    let e = plan_of(&b, &allow("198.51.100.7:443/tcp")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "198.51.100.7 is denied, and a deny covers every port; `terok-shield allow c1 198.51.100.7` lifts it"
    );
    let e = plan_of(&b, &deny("198.51.100.20:80")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "deny takes a host without a port (198.51.100.20:80): a deny removes the host entirely"
    );
    let e = plan_of(&bundle(DnsTier::Static), &allow("*.example")).unwrap_err();
    assert_eq!(e, LiveError::WildcardInStaticTier);
    // dnsmasq learns port-scoped names only as configured at start.
    let e = plan_of(&bundle(DnsTier::Dnsmasq), &allow("b.example:443")).unwrap_err();
    assert!(
        matches!(e, LiveError::Dnsmasq(DnsmasqError::NeedsRestart(_))),
        "{e}"
    );
    // dnsmasq lets an exact name win over a wildcard deny.
    let e = plan_of(&bundle(DnsTier::Dnsmasq), &deny("*.a.example")).unwrap_err();
    assert!(
        matches!(
            e,
            LiveError::Dnsmasq(DnsmasqError::WildcardUnderExact { .. })
        ),
        "{e}"
    );
}

#[test]
fn only_names_resolved_ahead_are_looked_up_and_the_answer_is_kept() {
    let builtin = bundle(DnsTier::Builtin);
    assert_eq!(lookup_needed(&builtin, &allow("b.example")), Ok(None));
    let p = plan_of(&builtin, &allow("*.b.example")).unwrap();
    assert_eq!(
        p.report.message,
        "Allowed *.b.example for c1 (its addresses open as the container's resolver answers for it)\n"
    );
    assert!(p.report.addresses.is_empty());

    let static_tier = bundle(DnsTier::Static);
    let change = allow("b.example");
    let name: DomainName = "b.example".parse().unwrap();
    assert_eq!(lookup_needed(&static_tier, &change), Ok(Some(name.clone())));
    assert_eq!(
        plan_of(&static_tier, &change),
        Err(LiveError::NotLookedUp(name.clone()))
    );
    let answer = Resolved {
        addrs: vec![ip("198.18.0.5"), ip("2001:db8::5")],
        at: 7,
    };
    let observed = Observed {
        resolved: Some(answer.clone()),
        learned: vec![],
    };
    let p = plan(&static_tier, &RuntimeFacts::default(), &change, &observed).unwrap();
    assert_eq!(p.bundle.resolved.get(&name), Some(&answer));
    assert_eq!(p.report.addresses, ["198.18.0.5", "2001:db8::5"]);
    assert_eq!(
        p.report.message,
        "Allowed b.example -> 198.18.0.5, 2001:db8::5 for c1\n"
    );
    assert!(matches!(
        &p.steps[1],
        Step::Firewall(FirewallChange::AddAddresses(a)) if a.len() == 2
    ));
    // The deny of that name reports the cached addresses and removes them.
    let p = plan_of(&p.bundle, &deny("b.example")).unwrap();
    assert_eq!(
        p.report.message,
        "Denied b.example (198.18.0.5, 2001:db8::5) for c1\n"
    );
    assert!(!p.new_policy.permits(ip("198.18.0.5"), 6, Some(443)));
}

// ---------------------------------------------------------------------------------------
// modes and reset
// ---------------------------------------------------------------------------------------

#[test]
fn modes_that_take_access_away_cut_connections_and_bypass_modes_do_not() {
    let b = bundle(DnsTier::Builtin);
    for (mode, revokes, text) in [
        (Mode::DenyAll, true, "c1 is now up: only allowlisted destinations are reachable\n"),
        (Mode::Bypass, false, "c1 is now down: public egress is accepted and logged; private ranges and denies stay blocked\n"),
        (Mode::BypassAll, false, "c1 is now down --all: all egress is accepted and logged, private ranges included; denies stay blocked\n"),
        (Mode::Block, true, "c1 is now blocked: nothing but loopback\n"),
    ] {
        let p = plan_of(&b, &LiveChange::Mode(mode)).unwrap();
        assert_eq!(p.revokes_flows(), revokes, "{mode:?}");
        assert_eq!(p.report.message, text);
        assert_eq!(p.report.target.as_deref(), Some(mode.status_name()));
        assert_eq!(p.report.event, "mode");
        assert_eq!(p.bundle.mode, mode);
        let firewall_first = p.steps[0] == Step::Firewall(FirewallChange::Update);
        assert_eq!(firewall_first, revokes, "{mode:?}: {:?}", p.steps);
    }
}

/// Found by scripts/soak.sh: a `reset` of a container whose resolver was under load listed
/// all of its ~40,000 learned addresses in one 400 KB audit line, six times the log's cap.
#[test]
fn a_reset_of_many_learned_addresses_reports_a_bounded_list_and_the_count() {
    let b = bundle(DnsTier::Builtin);
    let learned: Vec<IpAddr> = (0..40_000u32)
        .map(|i| IpAddr::from(std::net::Ipv4Addr::from(0xc612_0000 + i)))
        .collect();
    let observed = Observed {
        resolved: None,
        learned,
    };
    let p = plan(&b, &RuntimeFacts::default(), &LiveChange::Reset, &observed).unwrap();
    assert_eq!(p.report.addresses.len(), REPORTED_ADDRESSES_MAX);
    assert_eq!(p.report.addresses[0], "198.18.0.0");
    assert_eq!(p.report.addresses_omitted, 40_000 - REPORTED_ADDRESSES_MAX);
    assert!(
        p.report.message.contains("198.18.0.31 and 39968 more;"),
        "{}",
        p.report.message
    );
    assert!(p.report.message.len() < 2048, "{}", p.report.message);
    // A short list is whole.
    let few = Observed {
        resolved: None,
        learned: vec![ip("198.51.100.71")],
    };
    let p = plan(&b, &RuntimeFacts::default(), &LiveChange::Reset, &few).unwrap();
    assert_eq!(p.report.addresses, ["198.51.100.71"]);
    assert_eq!(p.report.addresses_omitted, 0);
}

#[test]
fn reset_flushes_the_learned_sets_and_their_record_and_nothing_else() {
    let mut b = bundle(DnsTier::Builtin);
    b.live_allow.push(t("198.51.100.7"));
    b.live_deny.push(t("198.51.100.8"));
    let observed = Observed {
        resolved: None,
        learned: vec![ip("198.51.100.71"), ip("2001:db8::9"), ip("198.51.100.71")],
    };
    let p = plan(&b, &RuntimeFacts::default(), &LiveChange::Reset, &observed).unwrap();
    assert_eq!(p.bundle, b, "literals and live decisions stay");
    assert_eq!(p.old_policy, p.new_policy);
    let learned = vec![
        sets::DNS_V4,
        sets::DNS_V6,
        sets::DNS_SVC_V4,
        sets::DNS_SVC_V6,
    ];
    assert_eq!(
        p.steps,
        [
            Step::ClearLearnedRecord,
            Step::Firewall(FirewallChange::FlushLearned(learned.clone())),
            Step::RevokeFlows
        ]
    );
    assert_eq!(p.report.event, "reset");
    assert_eq!(p.report.target, None);
    assert_eq!(p.report.addresses, ["198.51.100.71", "2001:db8::9"]);
    assert!(p
        .report
        .message
        .starts_with("Reset c1: forgot the DNS-learned addresses 198.51.100.71, 2001:db8::9;"));
    assert_eq!(
        FirewallChange::flush_script(&learned),
        "flush set inet terok_shield dns_v4\nflush set inet terok_shield dns_v6\n\
         flush set inet terok_shield dns_svc_v4\nflush set inet terok_shield dns_svc_v6\n"
    );
    // dnsmasq also fills the sets for port-scoped names.
    let p = plan_of(&bundle(DnsTier::Dnsmasq), &LiveChange::Reset).unwrap();
    let Step::Firewall(FirewallChange::FlushLearned(flushed)) = &p.steps[1] else {
        panic!("{:?}", p.steps)
    };
    assert!(flushed.contains(&sets::SCOPED_NAMES_V4) && flushed.contains(&sets::SCOPED_NAMES_V6));
    assert!(
        !p.steps.contains(&Step::ReloadDnsmasq),
        "dnsmasq's server list is unchanged"
    );
    assert_eq!(
        plan_of(&bundle(DnsTier::Static), &LiveChange::Reset)
            .unwrap()
            .report
            .message,
        "Reset c1: the static DNS tier learns no addresses while running; nothing to forget\n"
    );
}

#[test]
fn a_failure_undoes_exactly_the_completed_all_or_nothing_steps() {
    let b = bundle(DnsTier::Builtin);
    let granting = plan_of(&b, &allow("198.51.100.7")).unwrap();
    assert_eq!(granting.undo_after_failure(0), Some(vec![]));
    assert_eq!(
        granting.undo_after_failure(1),
        Some(vec![Undo::RestoreBundle])
    );
    let revoking = plan_of(&b, &deny("198.51.100.10")).unwrap();
    assert_eq!(revoking.undo_after_failure(0), Some(vec![]));
    assert_eq!(
        revoking.undo_after_failure(1),
        Some(vec![Undo::RestoreFirewall])
    );
    assert_eq!(
        revoking.undo_after_failure(2),
        None,
        "cutting connections fails after the change is in force"
    );
    let reset = plan_of(&b, &LiveChange::Reset).unwrap();
    assert_eq!(
        reset.undo_after_failure(1),
        Some(vec![Undo::RestoreLearnedRecord])
    );
}

#[test]
fn only_pure_single_address_additions_take_the_netlink_path() {
    let b = bundle(DnsTier::Builtin);
    let (old, with_extra) = (
        b.policy(&RuntimeFacts::default()),
        plan_of(&b, &allow("198.51.100.7")).unwrap().new_policy,
    );
    assert!(addresses_added(&old, &with_extra).is_some());
    assert_eq!(addresses_added(&with_extra, &old), None, "a removal");
    assert_eq!(addresses_added(&old, &old), None, "no change");
    let mut other_mode = with_extra.clone();
    other_mode.mode = Mode::Bypass;
    assert_eq!(addresses_added(&old, &other_mode), None, "other chains");
}

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

/// Targets the properties draw from: hosts, networks, ports, names and wildcards that
/// overlap each other on purpose.
const POOL: &[&str] = &[
    "198.51.100.10",
    "198.51.100.0/28",
    "198.51.100.7:443/tcp",
    "198.51.100.7",
    "2001:db8::10",
    "a.example",
    "b.example:443",
    "*.example",
    "c.a.example",
];

/// What a name resolves to when the static tier looks it up (distinct per name).
fn answer_for(name: &DomainName) -> Resolved {
    let addrs = match name.as_str() {
        "a.example" => vec!["198.18.0.1", "2001:db8::a1"],
        "b.example" => vec!["198.18.0.2"],
        _ => vec!["198.18.0.3"],
    };
    Resolved {
        addrs: addrs.into_iter().map(ip).collect(),
        at: 1,
    }
}

/// Plan with the lookups and learned addresses a caller would have gathered.
fn plan_observed(b: &Bundle, change: &LiveChange) -> Result<LivePlan, LiveError> {
    let observed = Observed {
        resolved: lookup_needed(b, change)
            .ok()
            .flatten()
            .map(|n| answer_for(&n)),
        learned: vec![ip("198.18.9.9")],
    };
    plan(b, &RuntimeFacts::default(), change, &observed)
}

fn arb_mode() -> impl Strategy<Value = Mode> {
    prop_oneof![
        Just(Mode::DenyAll),
        Just(Mode::Bypass),
        Just(Mode::BypassAll),
        Just(Mode::Block)
    ]
}

fn arb_tier() -> impl Strategy<Value = DnsTier> {
    prop_oneof![
        Just(DnsTier::Static),
        Just(DnsTier::Builtin),
        Just(DnsTier::Dnsmasq)
    ]
}

fn arb_change() -> impl Strategy<Value = LiveChange> {
    let target = (0..POOL.len()).prop_map(|i| POOL[i]);
    prop_oneof![
        3 => target.clone().prop_map(allow),
        // Deny the host of a pool target (a deny takes no port).
        3 => target.prop_map(|s| {
            let host = Target { host: t(s).host, scope: None };
            LiveChange::Deny { typed: host.to_string(), target: host }
        }),
        1 => arb_mode().prop_map(LiveChange::Mode),
        1 => Just(LiveChange::Reset),
    ]
}

/// A bundle that went through a history of live changes (refused ones change nothing).
fn arb_bundle() -> impl Strategy<Value = Bundle> {
    (
        proptest::sample::subsequence(POOL.to_vec(), 0..=4),
        arb_mode(),
        arb_tier(),
        proptest::collection::vec(arb_change(), 0..8),
    )
        .prop_map(|(entries, mode, tier, history)| {
            let mut b = test_bundle(&entries, &[], mode, tier);
            // The static tier resolved its exact names before start.
            for name in b.domains_to_resolve() {
                let answer = answer_for(&name);
                b.resolved.insert(name, answer);
            }
            for change in &history {
                if let Ok(p) = plan_observed(&b, change) {
                    b = p.bundle;
                }
            }
            b
        })
}

/// The sample flows a policy is probed with: every pool and answer address, a few ports.
fn probes() -> Vec<(IpAddr, u8, Option<u16>)> {
    let addrs = [
        "198.51.100.10",
        "198.51.100.0",
        "198.51.100.7",
        "2001:db8::10",
        "198.18.0.1",
        "2001:db8::a1",
        "198.18.0.2",
        "198.18.0.3",
        "198.18.9.9",
    ];
    let mut out = Vec::new();
    for a in addrs {
        for (proto, port) in [(6, 80), (6, 443), (17, 443)] {
            out.push((ip(a), proto, Some(port)));
        }
    }
    out
}

/// Which parts of the world a simulated run leaves at the new version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct World {
    saved: bool,
    firewall: bool,
    record: bool,
}

/// Run `plan`'s steps in a model where step `fail_at` fails and the undo the plan names for
/// that failure runs.
fn simulate(plan: &LivePlan, fail_at: Option<usize>) -> World {
    let mut w = World::default();
    for (i, step) in plan.steps.iter().enumerate() {
        if fail_at == Some(i) {
            for undo in plan.undo_after_failure(i).unwrap_or_default() {
                match undo {
                    Undo::RestoreBundle => w.saved = false,
                    Undo::RestoreFirewall => w.firewall = false,
                    Undo::RestoreLearnedRecord => w.record = false,
                }
            }
            return w;
        }
        match step {
            Step::SaveBundle => w.saved = true,
            Step::Firewall(_) => w.firewall = true,
            Step::ClearLearnedRecord => w.record = true,
            Step::ReloadDnsmasq | Step::RevokeFlows => {}
        }
    }
    w
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// After any history, a host whose last decision was a deny is unreachable in every
    /// mode, and a denied name is not answered, whatever allows (profile, live, wildcard)
    /// cover it.
    #[test]
    fn a_deny_always_wins_over_allows(b in arb_bundle(), history in proptest::collection::vec(arb_change(), 1..10)) {
        let mut b = b;
        // The hosts whose last decision in `history` was a deny.
        let mut last_denied: Vec<Target> = Vec::new();
        for change in &history {
            let Ok(p) = plan_observed(&b, change) else { continue };
            b = p.bundle;
            match change {
                LiveChange::Deny { target, .. } => last_denied.push(target.clone()),
                LiveChange::Allow { target, .. } if target.scope.is_none() => {
                    last_denied.retain(|d| d.host != target.host);
                }
                _ => {}
            }
        }
        for denied in &last_denied {
            prop_assert!(b.live_deny.contains(denied), "{denied} was denied last: {b:?}");
        }
        let facts = RuntimeFacts::default();
        for denied in &b.live_deny {
            for mode in [Mode::DenyAll, Mode::Bypass, Mode::BypassAll, Mode::Block] {
                let mut m = b.clone();
                m.mode = mode;
                let policy = m.policy(&facts);
                match &denied.host {
                    Host::Net(net) => {
                        for (addr, proto, port) in probes() {
                            if net.contains(&addr) {
                                prop_assert!(!policy.permits(addr, proto, port), "{denied} open at {addr} in {mode:?}: {b:?}");
                            }
                        }
                    }
                    Host::Domain(d) if !d.wildcard && mode == Mode::DenyAll => {
                        // Its answer's addresses are allowed through no other entry here.
                        for addr in answer_for(&d.name).addrs {
                            let other_net = m.entries.iter().chain(&m.live_allow).any(|t| matches!(&t.host, Host::Net(n) if n.contains(&addr)));
                            if !other_net {
                                prop_assert!(!policy.permits(addr, 6, Some(443)), "{denied} still opens {addr}: {b:?}");
                            }
                        }
                    }
                    Host::Domain(_) => {}
                }
                if let Host::Domain(d) = &denied.host {
                    let dns = DnsPolicy::from_bundle(&m);
                    let name = if d.wildcard { format!("x.{}", d.name) } else { d.name.to_string() };
                    let name: DomainName = name.parse().unwrap();
                    prop_assert!(!matches!(dns.decide_query(&name, hickory_proto::rr::RecordType::A), crate::core::dns_policy::QueryDecision::Forward(_)), "{name} answered: {b:?}");
                }
            }
        }
    }

    /// Allowing a host and then denying it leaves the same firewall and the same DNS answers
    /// as denying it straight away.
    #[test]
    fn allow_then_deny_equals_deny(b in arb_bundle(), i in 0..POOL.len()) {
        let target = t(POOL[i]);
        let host = Target { host: target.host.clone(), scope: None };
        let deny_it = LiveChange::Deny { typed: host.to_string(), target: host };
        let Ok(allowed) = plan_observed(&b, &allow(POOL[i])) else { return Ok(()) };
        let (Ok(direct), Ok(after_allow)) = (plan_observed(&b, &deny_it), plan_observed(&allowed.bundle, &deny_it)) else {
            // dnsmasq refuses some denies whatever came before; then both must refuse.
            prop_assert_eq!(plan_observed(&b, &deny_it).is_ok(), plan_observed(&allowed.bundle, &deny_it).is_ok());
            return Ok(());
        };
        prop_assert_eq!(Ruleset::generate(&direct.new_policy), Ruleset::generate(&after_allow.new_policy));
        let (d1, d2) = (DnsPolicy::from_bundle(&direct.bundle), DnsPolicy::from_bundle(&after_allow.bundle));
        // Which grants a name is forwarded under, or `None` when it is refused (the refusal
        // may name another of several denies that match: the deny lists' order can differ).
        let forwarded = |dns: &DnsPolicy, name: &DomainName| match dns.decide_query(name, hickory_proto::rr::RecordType::A) {
            crate::core::dns_policy::QueryDecision::Forward(grants) => Some(grants),
            crate::core::dns_policy::QueryDecision::Refuse(_) => None,
        };
        for name in ["a.example", "b.example", "c.a.example", "x.example", "example"] {
            let name: DomainName = name.parse().unwrap();
            prop_assert_eq!(forwarded(&d1, &name), forwarded(&d2, &name), "{}", name);
        }
    }

    /// Mode changes and `reset` never touch the profile entries, live allows, live denies or
    /// resolved addresses; `reset` touches nothing in the bundle at all.
    #[test]
    fn modes_and_reset_never_touch_the_lists(b in arb_bundle(), mode in arb_mode()) {
        let p = plan_observed(&b, &LiveChange::Mode(mode)).unwrap();
        let mut expected = b.clone();
        expected.mode = mode;
        prop_assert_eq!(&p.bundle, &expected);
        prop_assert!(!p.steps.contains(&Step::ClearLearnedRecord));
        let p = plan_observed(&b, &LiveChange::Reset).unwrap();
        prop_assert_eq!(&p.bundle, &b);
        prop_assert_eq!(&p.old_policy, &p.new_policy);
        prop_assert!(!p.steps.contains(&Step::SaveBundle));
        let Step::Firewall(FirewallChange::FlushLearned(flushed)) = &p.steps[1] else {
            return Err(TestCaseError::fail(format!("{:?}", p.steps)));
        };
        let ruleset = Ruleset::generate(&p.new_policy);
        prop_assert!(flushed.iter().all(|s| ruleset.sets.iter().any(|d| d.name == *s && d.kind.is_learned())));
    }

    /// A plan never half-applies: if any step fails and the plan's undo runs, state.json, the
    /// firewall and learned.jsonl are all as before (a failure before the change is in force)
    /// or all as planned (a failure after it); and without failure all are as planned.
    #[test]
    fn a_plan_never_half_applies(b in arb_bundle(), change in arb_change()) {
        let Ok(p) = plan_observed(&b, &change) else { return Ok(()) };
        let touched = World {
            saved: p.steps.contains(&Step::SaveBundle),
            firewall: p.steps.iter().any(|s| matches!(s, Step::Firewall(_))),
            record: p.steps.contains(&Step::ClearLearnedRecord),
        };
        prop_assert!(touched.firewall, "every change reaches the firewall: {:?}", p.steps);
        prop_assert_eq!(simulate(&p, None), touched);
        for fail_at in 0..p.steps.len() {
            let w = simulate(&p, Some(fail_at));
            // Undone means nothing changed; not undone means the change stands whole.
            let expected = match p.undo_after_failure(fail_at) {
                Some(_) => World::default(),
                None => touched,
            };
            prop_assert_eq!(w, expected, "failing step {} of {:?}", fail_at, p.steps);
        }
        // Connections are cut only once the narrower firewall is in force, and a narrowing
        // is enforced before it is saved.
        if let Some(cut) = p.steps.iter().position(|s| *s == Step::RevokeFlows) {
            let fw = p.steps.iter().position(|s| matches!(s, Step::Firewall(_))).unwrap();
            prop_assert!(fw < cut);
            if let Some(save) = p.steps.iter().position(|s| *s == Step::SaveBundle) {
                prop_assert!(fw < save);
            }
        }
    }

    /// The fast path is taken exactly when the new firewall only gains single addresses, and
    /// then the additions are exactly the difference of the allow sets.
    #[test]
    fn netlink_additions_are_exactly_the_new_addresses(b in arb_bundle(), change in arb_change()) {
        let Ok(p) = plan_observed(&b, &change) else { return Ok(()) };
        let Some(step) = p.steps.iter().find_map(|s| match s { Step::Firewall(FirewallChange::AddAddresses(a)) => Some(a), _ => None }) else { return Ok(()) };
        let (old, new) = (Ruleset::generate(&p.old_policy), Ruleset::generate(&p.new_policy));
        prop_assert_eq!(&old.chains, &new.chains);
        for (x, y) in old.sets.iter().zip(&new.sets) {
            let added: Vec<IpAddr> = y.elements.iter().filter(|e| !x.elements.contains(e)).map(|e| match e { Element::Addr(a) => *a, other => panic!("{other:?}") }).collect();
            prop_assert!(x.elements.iter().all(|e| y.elements.contains(e)));
            let planned = step.iter().find(|(s, _)| *s == x.name).map(|(_, a)| a.clone()).unwrap_or_default();
            prop_assert_eq!(added, planned, "set {}", x.name);
        }
    }
}

#[test]
fn save_allow_is_planned_as_an_allow_and_the_profile_joins_the_bundle() {
    let b = bundle(DnsTier::Builtin);
    let saved = LiveChange::SaveAllow {
        target: t("198.51.100.7"),
        typed: "198.51.100.7".into(),
        profile: crate::core::profile::ProfileName::new("c1").unwrap(),
        profile_entries: vec![t("other.example"), t("198.51.100.7")],
    };
    let p = plan_of(&b, &saved).unwrap();
    let plain = plan_of(&b, &allow("198.51.100.7")).unwrap();
    assert_eq!(p.steps, plain.steps, "the same firewall change as `allow`");
    assert_eq!(p.bundle.profiles, ["c1"]);
    assert!(p.bundle.entries.contains(&t("198.51.100.7")));
    assert!(p.bundle.entries.contains(&t("other.example")));
    assert!(p.bundle.live_allow.is_empty(), "the profile holds it now");
    assert_eq!(p.report.event, "allow");
    assert_eq!(p.report.profile.as_ref().unwrap().as_str(), "c1");
    assert!(
        p.report.message.contains("saved it in profile c1"),
        "{}",
        p.report.message
    );
    // A saved allow lifts a deny of the host, as `allow` does.
    let denied = plan_of(&b, &deny("198.51.100.7")).unwrap().bundle;
    let p = plan_of(&denied, &saved).unwrap();
    assert!(p.bundle.live_deny.is_empty());
    // The static tier looks the name up first, as for `allow`.
    let s = bundle(DnsTier::Static);
    let named = LiveChange::SaveAllow {
        target: t("new.example"),
        typed: "new.example".into(),
        profile: crate::core::profile::ProfileName::new("c1").unwrap(),
        profile_entries: vec![t("new.example")],
    };
    assert_eq!(
        lookup_needed(&s, &named).unwrap().map(|d| d.to_string()),
        Some("new.example".to_string())
    );
}
