//! What the createRuntime hook starts beside the workload, inside the container's network
//! namespace: the DNS resolver (builtin and dnsmasq tiers) or, in the static tier, only the
//! event reader. Decided here from the bundle and the container's own DNS servers; started by
//! `effects::companion`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::bundle::DnsTier;

/// Where the resolver listens inside a container: loopback, both families, port 53.
pub const CONTAINER_LISTEN: [SocketAddr; 2] = [
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 53),
    SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 53),
];

/// The process the hook starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompanionKind {
    /// The per-container resolver (our own, or the supervisor of dnsmasq), with the event
    /// reader as one of its threads.
    Resolver,
    /// The event reader alone (static tier: no resolver at run time).
    EventReader,
}

impl CompanionKind {
    /// The hidden subcommand of this binary that runs it.
    pub fn command(self) -> &'static str {
        match self {
            CompanionKind::Resolver => "internal-resolver",
            CompanionKind::EventReader => "internal-events",
        }
    }
}

/// The process the hook starts, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Companion {
    pub kind: CompanionKind,
    /// Servers the resolver forwards to (none for the event reader).
    pub upstreams: Vec<IpAddr>,
    /// Addresses whose sockets the hook binds itself and hands over, so it need not wait
    /// for the process (the NFLOG socket comes with them; `Some(&[])`: that one alone).
    /// `None`: the process binds its own (dnsmasq) and the hook waits until it is ready.
    pub prebind: Option<&'static [SocketAddr]>,
}

impl Companion {
    /// Whether the container's resolv.conf must point at this process.
    pub fn serves_dns(&self) -> bool {
        self.kind == CompanionKind::Resolver
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompanionError {
    #[error("the {tier} DNS tier has no upstream (set upstream_dns in config.yml)")]
    NoUpstream { tier: &'static str },
}

/// What to start for a container of `tier`: its resolver forwards to the configured
/// `upstream_dns`, else to the servers of the container's own resolv.conf.
pub fn companion(
    tier: DnsTier,
    upstream_dns: Option<IpAddr>,
    container_dns: &[IpAddr],
) -> Result<Companion, CompanionError> {
    if tier == DnsTier::Static {
        return Ok(Companion {
            kind: CompanionKind::EventReader,
            upstreams: Vec::new(),
            prebind: Some(&[]),
        });
    }
    let upstreams = match upstream_dns {
        Some(a) => vec![a],
        None => container_dns.to_vec(),
    };
    if upstreams.is_empty() {
        return Err(CompanionError::NoUpstream { tier: tier.name() });
    }
    Ok(Companion {
        kind: CompanionKind::Resolver,
        upstreams,
        prebind: tier.hook_binds_sockets().then_some(&CONTAINER_LISTEN[..]),
    })
}

/// resolv.conf text with every nameserver replaced by the shield's resolver on loopback.
pub fn loopback_resolv_conf(original: &str) -> String {
    let mut out = String::from(
        "# terok-shield: DNS goes through the per-container resolver\nnameserver 127.0.0.1\n",
    );
    for line in original.lines() {
        let first = line.split_whitespace().next().unwrap_or_default();
        if first == "search" || first == "options" {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_builtin_tier_gets_a_resolver_whose_sockets_the_hook_binds() {
        let c = companion(DnsTier::Builtin, None, &[ip("198.51.100.53")]).unwrap();
        assert_eq!(c.kind.command(), "internal-resolver");
        assert_eq!(c.upstreams, vec![ip("198.51.100.53")]);
        assert_eq!(c.prebind, Some(&CONTAINER_LISTEN[..]));
        assert!(c.serves_dns());
    }

    #[test]
    fn a_configured_upstream_wins_over_the_containers_own_servers() {
        let c = companion(
            DnsTier::Builtin,
            Some(ip("2001:db8::53")),
            &[ip("198.51.100.53")],
        )
        .unwrap();
        assert_eq!(c.upstreams, vec![ip("2001:db8::53")]);
    }

    #[test]
    fn dnsmasq_binds_its_own_sockets_so_the_hook_waits_for_it() {
        let c = companion(DnsTier::Dnsmasq, None, &[ip("198.51.100.53")]).unwrap();
        assert_eq!(c.kind, CompanionKind::Resolver);
        assert_eq!(c.prebind, None);
    }

    #[test]
    fn a_resolver_without_an_upstream_is_refused_with_the_fix() {
        let err = companion(DnsTier::Dnsmasq, None, &[]).unwrap_err();
        assert_eq!(err, CompanionError::NoUpstream { tier: "dnsmasq" });
        assert!(err.to_string().contains("set upstream_dns in config.yml"));
    }

    #[test]
    fn the_static_tier_starts_only_the_event_reader() {
        let c = companion(DnsTier::Static, None, &[]).unwrap();
        assert_eq!(c.kind.command(), "internal-events");
        assert!(c.upstreams.is_empty());
        assert_eq!(c.prebind, Some(&[][..]));
        assert!(!c.serves_dns());
    }

    #[test]
    fn resolv_conf_points_at_the_resolver_and_keeps_only_search_and_options() {
        let original = "nameserver 198.51.100.53\nsearch corp.example\noptions ndots:2\nnameserver 2001:db8::53\n";
        let text = loopback_resolv_conf(original);
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("nameserver"))
                .collect::<Vec<_>>(),
            vec!["nameserver 127.0.0.1"]
        );
        assert!(text.contains("search corp.example\n"));
        assert!(text.contains("options ndots:2\n"));
    }
}
