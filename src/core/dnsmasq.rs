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

/// UDP port dnsmasq sends its upstream queries from (`--query-port`). The ruleset lets DNS
/// out from this port only; dnsmasq binds it before the workload starts.
pub const QUERY_PORT: u16 = 53_053;

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

/// The `--servers-file` contents for `policy`: which names are forwarded, and to which
/// upstreams. Built from validated names and addresses only.
pub fn servers_file(policy: &DnsPolicy, upstreams: &[IpAddr]) -> Result<String, DnsmasqError> {
    if upstreams.is_empty() {
        return Err(DnsmasqError::NoUpstream);
    }
    let mut out = String::from("# written by terok-shield; rewritten on every allow/deny\n");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::bundle::{Bundle, ContainerName, DnsTier, BUNDLE_FORMAT};
    use crate::core::target::Target;

    fn policy(entries: &[&str], deny: &[&str], mode: Mode) -> DnsPolicy {
        let t = |s: &&str| Target::parse(s).unwrap();
        DnsPolicy::from_bundle(&Bundle {
            format: BUNDLE_FORMAT,
            shield_version: "0.1.0".into(),
            name: ContainerName::new("c1").unwrap(),
            instance: "abc".into(),
            created: 0,
            profiles: vec![],
            entries: entries.iter().map(t).collect(),
            resolved: Default::default(),
            mode,
            live_allow: vec![],
            live_deny: deny.iter().map(t).collect(),
            loopback_ports: vec![],
            audit_enabled: true,
            dns_tier: DnsTier::Dnsmasq,
            upstream_dns: None,
            ttl_bounds: [1, 3600],
        })
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
}
