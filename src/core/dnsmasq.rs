//! The dnsmasq tier's configuration, derived from the same [`DnsPolicy`] as the builtin
//! resolver.
//!
//! dnsmasq answers a name only if a `server=` line covers it; everything else gets REFUSED
//! and never leaves the container. Every address it answers is added to the DNS-learned sets
//! by one catch-all `--nftset`, which is safe because only allowlisted names are answered.
//! The server lines live in a `--servers-file`, which dnsmasq re-reads on SIGHUP: live
//! `allow`/`deny` of names take effect without restarting it (a restart would free the query
//! port the ruleset trusts).
//!
//! Differences from the builtin tier, forced by dnsmasq's matching rules and documented for
//! users: an exact name also admits its subdomains (`/example.com/` matches the whole
//! subtree); port-scoped names resolve, but dnsmasq can only put plain addresses into sets, so
//! their ports are opened by the addresses resolved before start (as in the static tier) and
//! their answers go to sets no rule reads; in bypass mode names outside the allowlist still do
//! not resolve.

use std::fmt::Write as _;
use std::net::IpAddr;

use thiserror::Error;

use super::dns_policy::DnsPolicy;
use super::policy::Mode;
use super::ruleset::{sets, FAMILY, TABLE};

/// UDP port dnsmasq sends its upstream queries from (`--query-port`); see
/// [`DNSMASQ_QUERY_PORT`](super::policy::DNSMASQ_QUERY_PORT).
pub use super::policy::DNSMASQ_QUERY_PORT as QUERY_PORT;

/// Why a policy cannot be expressed for dnsmasq.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DnsmasqError {
    #[error("{0} cannot be allowed live in the dnsmasq DNS tier: dnsmasq learns port-scoped names (and names beneath them) only as configured at start; add it to a profile and restart the container, or use dns.tier builtin")]
    NeedsRestart(String),
    #[error("deny {denied} cannot hold in the dnsmasq DNS tier while {allowed} is allowed (dnsmasq lets the exact name win over a wildcard); deny {allowed} instead, or use dns.tier builtin")]
    WildcardUnderExact { denied: String, allowed: String },
    #[error(
        "the dnsmasq DNS tier has no upstream server to forward to; set upstream_dns in config.yml"
    )]
    NoUpstream,
}

/// dnsmasq's `/domain/` text for a pattern: `*.` keeps its meaning (subdomains only).
fn domain_spec(pattern: &super::target::DomainPattern) -> String {
    if pattern.wildcard {
        format!("*.{}", pattern.name)
    } else {
        pattern.name.to_string()
    }
}

/// Whether dnsmasq's matching can express `policy` (checked before anything is saved).
pub fn check(policy: &DnsPolicy) -> Result<(), DnsmasqError> {
    for denied in policy.denied() {
        if denied.wildcard {
            if let Some(exact) = policy
                .grants()
                .iter()
                .find(|g| !g.pattern.wildcard && g.pattern.name == denied.name)
            {
                return Err(DnsmasqError::WildcardUnderExact {
                    denied: denied.to_string(),
                    allowed: exact.pattern.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// The `--servers-file` contents for `policy`: which names are forwarded, and to which
/// upstreams. Built from validated names and addresses only.
pub fn servers_file(policy: &DnsPolicy, upstreams: &[IpAddr]) -> Result<String, DnsmasqError> {
    if upstreams.is_empty() {
        return Err(DnsmasqError::NoUpstream);
    }
    check(policy)?;
    let mut out = String::from("# written by terok-shield; rewritten on every allow/deny\n");
    if policy.mode() == Mode::Block {
        return Ok(out); // no server line: every question is refused
    }
    for grant in policy.grants() {
        let spec = domain_spec(&grant.pattern);
        for upstream in upstreams {
            let _ = writeln!(out, "server=/{spec}/{upstream}");
        }
    }
    // A server line without an address makes dnsmasq answer locally (NXDOMAIN), and the more
    // specific line wins over a wider allow.
    for denied in policy.denied() {
        let _ = writeln!(out, "server=/{}/", domain_spec(denied));
    }
    Ok(out)
}

/// Where dnsmasq's inputs and outputs live, chosen by the effect that starts it.
pub struct Launch<'a> {
    pub servers_file: &'a str,
}

/// Which learned sets dnsmasq fills for names under `base`: port-scoped names go to sets no
/// rule reads (their ports are opened by addresses resolved before start), every other name
/// to the address-wide learned sets.
fn nftset_spec(base: &str, scoped: bool) -> String {
    let (v4, v6) = if scoped {
        (sets::SCOPED_NAMES_V4, sets::SCOPED_NAMES_V6)
    } else {
        (sets::DNS_V4, sets::DNS_V6)
    };
    format!("--nftset=/{base}/4#{FAMILY}#{TABLE}#{v4},6#{FAMILY}#{TABLE}#{v6}")
}

/// One `--nftset` per allowed base name (dnsmasq picks the longest match; an unscoped grant
/// wins over a scoped one of the same name), plus a catch-all for names allowed live later.
fn nftset_arguments(policy: &DnsPolicy) -> Vec<String> {
    let mut bases: std::collections::BTreeMap<&str, bool> = Default::default();
    for grant in policy.grants() {
        let scoped = bases.entry(grant.pattern.name.as_str()).or_insert(true);
        *scoped &= grant.scope.is_some();
    }
    std::iter::once(nftset_spec("#", false))
        .chain(bases.into_iter().map(|(b, scoped)| nftset_spec(b, scoped)))
        .collect()
}

/// Whether a name allowed live (after dnsmasq started with `policy`'s learning rules, which
/// cannot change without a restart) would be learned as the allow says.
pub fn check_live_allow(
    policy: &DnsPolicy,
    pattern: &super::target::DomainPattern,
    scoped: bool,
) -> Result<(), DnsmasqError> {
    let shown = || pattern.to_string();
    if scoped {
        return Err(DnsmasqError::NeedsRestart(shown()));
    }
    // The longest allowed base covering the name decides where dnsmasq puts its answers.
    let covering = policy
        .grants()
        .iter()
        .filter(|g| g.pattern.name == pattern.name || g.pattern.name.is_parent_of(&pattern.name))
        .max_by_key(|g| (g.pattern.name.as_str().len(), g.scope.is_none()));
    match covering {
        Some(g) if g.scope.is_some() => Err(DnsmasqError::NeedsRestart(shown())),
        _ => Ok(()),
    }
}

/// dnsmasq's command line: loopback listeners only, no other configuration read, no cache
/// (every answer passes through nftset, so sets and answers never disagree), foreground.
pub fn arguments(launch: &Launch<'_>, policy: &DnsPolicy) -> Vec<String> {
    [
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--bind-interfaces",
        "--listen-address=127.0.0.1",
        "--listen-address=::1",
        "--port=53",
        "--cache-size=0",
        "--no-negcache",
        "--user=root",
        "--pid-file",
        "--log-facility=-",
        // Numbered question and reply lines: the supervisor reads them to record which name
        // brought which address (for `deny NAME`).
        "--log-queries=extra",
    ]
    .iter()
    .map(ToString::to_string)
    .chain([
        format!("--query-port={QUERY_PORT}"),
        format!("--servers-file={}", launch.servers_file),
    ])
    .chain(nftset_arguments(policy))
    .collect()
}

/// Whether dnsmasq, configured by [`servers_file`] for `policy`, forwards `name`: the most
/// specific matching line decides (longer domain first; at equal length a plain name beats a
/// `*.` one, as dnsmasq documents), and a deny line forwards nothing.
pub fn forwards(policy: &DnsPolicy, name: &super::target::DomainName) -> bool {
    if policy.mode() == Mode::Block {
        return false;
    }
    let covers = |p: &super::target::DomainPattern| {
        if p.wildcard {
            p.name.is_parent_of(name)
        } else {
            p.name == *name || p.name.is_parent_of(name)
        }
    };
    let allowed = policy
        .grants()
        .iter()
        .map(|g| (&g.pattern, true))
        .chain(policy.denied().iter().map(|d| (d, false)));
    allowed
        .filter(|(p, _)| covers(p))
        // Deny lines come after allow lines in the file; on a tie the deny wins.
        .max_by_key(|(p, forward)| (p.name.as_str().len(), !p.wildcard, !forward))
        .is_some_and(|(_, forward)| forward)
}

/// Whether dnsmasq, started with [`arguments`] for `at_start`, puts the answers for `name` into
/// the address-wide learned sets (`dns_v4`/`dns_v6`) rather than `scoped_names_*`.
pub fn learns_address_wide(at_start: &DnsPolicy, name: &super::target::DomainName) -> bool {
    at_start
        .grants()
        .iter()
        .filter(|g| g.pattern.name == *name || g.pattern.name.is_parent_of(name))
        .max_by_key(|g| (g.pattern.name.as_str().len(), g.scope.is_none()))
        .is_none_or(|g| g.scope.is_none())
}

/// One line of dnsmasq's `--log-queries=extra` output that matters for attribution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// `N client/port query[TYPE] NAME from client`: question number N asks NAME.
    Query {
        serial: u64,
        name: super::target::DomainName,
    },
    /// `N client/port reply NAME is ADDRESS`: an address in the answer to question N.
    Reply { serial: u64, addr: IpAddr },
}

/// Whether a log line is one of the numbered per-question lines (`N client/port ...`), which
/// are parsed for attribution and not kept in resolver.log.
pub fn is_per_question_line(line: &str) -> bool {
    let rest = line.split_once("]: ").map_or(line, |(_, r)| r);
    let mut words = rest.split_ascii_whitespace();
    words.next().is_some_and(|w| w.parse::<u64>().is_ok())
        && words.next().is_some_and(|w| w.contains('/'))
}

/// Parse one log line (`dnsmasq[PID]: ` prefix optional). Anything else is `None`.
pub fn parse_log_line(line: &str) -> Option<LogEvent> {
    let rest = match line.split_once("]: ") {
        Some((prefix, rest)) if prefix.starts_with("dnsmasq[") => rest,
        _ => line,
    };
    let mut words = rest.split_ascii_whitespace();
    let serial: u64 = words.next()?.parse().ok()?;
    let _client = words.next()?;
    let verb = words.next()?;
    if verb.starts_with("query[") {
        let name = words.next()?.parse().ok()?;
        return Some(LogEvent::Query { serial, name });
    }
    if verb == "reply" {
        let _name = words.next()?;
        if words.next()? != "is" {
            return None;
        }
        let addr = words.next()?.parse().ok()?;
        return words
            .next()
            .is_none()
            .then_some(LogEvent::Reply { serial, addr });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::bundle::{test_bundle, DnsTier};
    use crate::core::target::Target;

    fn policy(entries: &[&str], deny: &[&str], mode: Mode) -> DnsPolicy {
        DnsPolicy::from_bundle(&test_bundle(entries, deny, mode, DnsTier::Dnsmasq))
    }

    const UP: &[IpAddr] = &[IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 53))];

    #[test]
    fn allowed_patterns_become_server_lines_and_denies_local_ones() {
        let p = policy(
            &["example.com", "*.pkg.test", "198.51.100.9"],
            &["a.pkg.test"],
            Mode::DenyAll,
        );
        let text = servers_file(&p, UP).unwrap();
        let lines: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(
            lines,
            [
                "server=/example.com/198.51.100.53",
                "server=/*.pkg.test/198.51.100.53",
                "server=/a.pkg.test/"
            ]
        );
    }

    #[test]
    fn block_mode_forwards_nothing() {
        let p = policy(&["example.com"], &[], Mode::Block);
        assert_eq!(servers_file(&p, UP).unwrap().lines().count(), 1);
    }

    #[test]
    fn inexpressible_policies_are_refused_with_a_fix() {
        let wild = policy(&["example.com"], &["*.example.com"], Mode::DenyAll);
        assert!(matches!(
            servers_file(&wild, UP),
            Err(DnsmasqError::WildcardUnderExact { .. })
        ));
        assert_eq!(
            servers_file(&policy(&["a.test"], &[], Mode::DenyAll), &[]),
            Err(DnsmasqError::NoUpstream)
        );
    }

    #[test]
    fn every_upstream_serves_every_name() {
        let ups: Vec<IpAddr> = vec![
            "198.51.100.53".parse().unwrap(),
            "2001:db8::53".parse().unwrap(),
        ];
        let text = servers_file(&policy(&["a.test"], &[], Mode::Bypass), &ups).unwrap();
        assert!(text.contains("server=/a.test/198.51.100.53\n"));
        assert!(text.contains("server=/a.test/2001:db8::53\n"));
    }

    #[test]
    fn port_scoped_names_are_learned_into_sets_no_rule_reads() {
        let p = policy(
            &[
                "pool.ntp.test:123/udp",
                "a.pool.ntp.test",
                "api.test",
                "api.test:443",
            ],
            &[],
            Mode::DenyAll,
        );
        let args = arguments(&Launch { servers_file: "/s" }, &p);
        let nft: Vec<&String> = args.iter().filter(|a| a.starts_with("--nftset")).collect();
        assert_eq!(
            nft,
            [
                "--nftset=/#/4#inet#terok_shield#dns_v4,6#inet#terok_shield#dns_v6",
                "--nftset=/a.pool.ntp.test/4#inet#terok_shield#dns_v4,6#inet#terok_shield#dns_v6",
                "--nftset=/api.test/4#inet#terok_shield#dns_v4,6#inet#terok_shield#dns_v6",
                "--nftset=/pool.ntp.test/4#inet#terok_shield#scoped_names_v4,6#inet#terok_shield#scoped_names_v6",
            ]
        );
        // Scoped names are still answered.
        assert!(servers_file(&p, UP)
            .unwrap()
            .contains("server=/pool.ntp.test/198.51.100.53\n"));
    }

    #[test]
    fn live_allows_that_dnsmasq_would_learn_wrongly_need_a_restart() {
        let p = policy(&["pool.ntp.test:123/udp", "api.test"], &[], Mode::DenyAll);
        let d = |s: &str| match Target::parse(s).unwrap().host {
            crate::core::target::Host::Domain(d) => d,
            _ => unreachable!(),
        };
        assert!(check_live_allow(&p, &d("other.test"), false).is_ok());
        assert!(check_live_allow(&p, &d("x.api.test"), false).is_ok());
        assert!(check_live_allow(&p, &d("x.pool.ntp.test"), false).is_err());
        assert!(check_live_allow(&p, &d("pool.ntp.test"), false).is_err());
        assert!(check_live_allow(&p, &d("new.test"), true).is_err());
    }

    #[test]
    fn arguments_read_no_other_config_and_fill_the_learned_sets() {
        let args = arguments(
            &Launch {
                servers_file: "/s/dnsmasq.servers",
            },
            &policy(&[], &[], Mode::DenyAll),
        );
        assert!(args.contains(&"--conf-file=/dev/null".to_string()));
        assert!(args.contains(&format!("--query-port={QUERY_PORT}")));
        assert!(args.contains(
            &"--nftset=/#/4#inet#terok_shield#dns_v4,6#inet#terok_shield#dns_v6".to_string()
        ));
        assert!(args.contains(&"--servers-file=/s/dnsmasq.servers".to_string()));
    }

    #[test]
    fn log_lines_give_questions_and_the_addresses_of_their_answers() {
        let q =
            parse_log_line("dnsmasq[16262]: 1 127.0.0.1/47773 query[A] exact.test from 127.0.0.1");
        assert_eq!(
            q,
            Some(LogEvent::Query {
                serial: 1,
                name: "exact.test".parse().unwrap()
            })
        );
        let r =
            parse_log_line("dnsmasq[16262]: 1 127.0.0.1/47773 reply final.test is 198.51.100.60");
        assert_eq!(
            r,
            Some(LogEvent::Reply {
                serial: 1,
                addr: "198.51.100.60".parse().unwrap()
            })
        );
        let v6 = parse_log_line("7 ::1/5 reply a.test is 2001:db8::5");
        assert!(matches!(v6, Some(LogEvent::Reply { serial: 7, .. })));
        for other in [
            "dnsmasq[1]: 1 127.0.0.1/47773 reply a.test is <CNAME>",
            "dnsmasq[1]: 1 127.0.0.1/47773 reply a.test is NODATA-IPv6",
            "dnsmasq[1]: 3 127.0.0.1/46712 config error is REFUSED (EDE: not ready)",
            "dnsmasq[1]: 1 127.0.0.1/47773 forwarded exact.test to 198.51.100.53",
            "dnsmasq[1]: started, version 2.90 cache disabled",
            "dnsmasq[1]: 1 127.0.0.1/4 query[A] bad..name from 127.0.0.1",
            "",
        ] {
            assert_eq!(parse_log_line(other), None, "{other}");
        }
        assert!(is_per_question_line(
            "dnsmasq[1]: 1 127.0.0.1/47773 forwarded exact.test to 198.51.100.53"
        ));
        assert!(!is_per_question_line(
            "dnsmasq[1]: exiting on receipt of SIGTERM"
        ));
    }

    #[test]
    fn forwarding_follows_dnsmasq_matching() {
        let n = |s: &str| s.parse().unwrap();
        let p = policy(
            &["example.com", "*.wild.test"],
            &["a.example.com"],
            Mode::DenyAll,
        );
        assert!(forwards(&p, &n("example.com")));
        assert!(
            forwards(&p, &n("b.example.com")),
            "dnsmasq admits subdomains"
        );
        assert!(!forwards(&p, &n("a.example.com")));
        assert!(!forwards(&p, &n("x.a.example.com")));
        assert!(forwards(&p, &n("x.wild.test")));
        assert!(!forwards(&p, &n("wild.test")));
        assert!(!forwards(&p, &n("other.test")));
        let blocked = policy(&["example.com"], &[], Mode::Block);
        assert!(!forwards(&blocked, &n("example.com")));
    }

    #[test]
    fn address_wide_learning_follows_the_start_time_nftsets() {
        let n = |s: &str| s.parse().unwrap();
        let p = policy(
            &["ntp.test:123/udp", "a.ntp.test", "api.test"],
            &[],
            Mode::DenyAll,
        );
        assert!(!learns_address_wide(&p, &n("ntp.test")));
        assert!(!learns_address_wide(&p, &n("x.ntp.test")));
        assert!(learns_address_wide(&p, &n("a.ntp.test")));
        assert!(learns_address_wide(&p, &n("api.test")));
        assert!(learns_address_wide(&p, &n("live.test")), "the catch-all");
    }
}
