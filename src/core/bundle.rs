//! The per-container state bundle: what was decided for one container, as stored on disk.
//!
//! The bundle is written by `prepare` (and later by live commands), read by the OCI hook at
//! every container start. It is versioned; unknown fields are refused, so a bundle written by
//! another version is never half-understood. Turning a bundle into a [`Policy`] is pure.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::policy::{AllowRule, HostLoopback, Mode, Policy};
use super::target::{DomainName, Host, Target};

/// On-disk format of `state.json` this binary writes; bump on any incompatible change and
/// teach `bundle_format.rs` to migrate the previous one.
pub const BUNDLE_FORMAT: u32 = 2;

/// Problems with names and bundles.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BundleError {
    #[error("invalid container name `{0}`: use letters, digits, '_', '.' and '-', starting with a letter or digit, at most 128 characters")]
    BadName(String),
    #[error("state bundle belongs to container `{found}`, not `{expected}`")]
    WrongContainer { found: String, expected: String },
    #[error("state bundle instance {found} does not match the container's ({expected}): the name was prepared again for a new container; recreate this container with `terok-shield run`")]
    Instance { found: String, expected: String },
}

/// A container name as podman accepts it; also safe as a directory name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ContainerName(String);

impl ContainerName {
    /// Validate a user-supplied container name.
    pub fn new(name: &str) -> Result<Self, BundleError> {
        let mut bytes = name.bytes();
        let ok = name.len() <= 128
            && bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
            && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
        if ok {
            Ok(ContainerName(name.to_string()))
        } else {
            Err(BundleError::BadName(name.to_string()))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ContainerName {
    type Error = BundleError;
    fn try_from(v: String) -> Result<Self, Self::Error> {
        ContainerName::new(&v)
    }
}

impl From<ContainerName> for String {
    fn from(v: ContainerName) -> String {
        v.0
    }
}

impl fmt::Display for ContainerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How domains turn into addresses for this container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsTier {
    /// Resolved once before start (and on `resolve`); addresses cached in the bundle.
    Static,
    /// Our per-container resolver fills the DNS-learned sets at run time.
    Builtin,
    /// Per-container dnsmasq with `--nftset`.
    Dnsmasq,
}

impl DnsTier {
    /// Name shown by `status`.
    pub fn name(self) -> &'static str {
        match self {
            DnsTier::Static => "static",
            DnsTier::Builtin => "builtin",
            DnsTier::Dnsmasq => "dnsmasq",
        }
    }

    /// Whether the hook binds the sockets of the process it starts in the container (our
    /// resolver, or the static tier's event reader) and hands them over, rather than waiting
    /// for that process to bind them: dnsmasq binds its own, so for it the hook waits.
    pub fn hook_binds_sockets(self) -> bool {
        !matches!(self, DnsTier::Dnsmasq)
    }
}

/// Addresses a domain resolved to, and when (unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resolved {
    pub addrs: Vec<IpAddr>,
    pub at: u64,
}

/// Everything the shield knows about one container (`state.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    pub format: u32,
    /// The terok-shield version that last wrote the bundle (information only: compatibility
    /// is decided by `format`).
    pub written_by: String,
    pub name: ContainerName,
    /// Random id tying the bundle to one container creation (names get reused).
    pub instance: String,
    pub created: u64,
    pub profiles: Vec<String>,
    /// Composed profile entries, in order.
    pub entries: Vec<Target>,
    /// Static-tier cache: domain -> addresses.
    pub resolved: BTreeMap<DomainName, Resolved>,
    pub mode: Mode,
    /// Targets allowed at run time (`allow`).
    pub live_allow: Vec<Target>,
    /// Targets denied at run time (`deny`); win over profiles and live allows.
    pub live_deny: Vec<Target>,
    pub loopback_ports: Vec<u16>,
    pub audit_enabled: bool,
    pub dns_tier: DnsTier,
    /// Where the builtin resolver forwards (config `upstream_dns`); else the container's own
    /// resolv.conf servers.
    pub upstream_dns: Option<IpAddr>,
    /// Bounds (seconds) on the lifetime of DNS-learned set elements (config `dns.min_ttl`,
    /// `dns.max_ttl`).
    pub ttl_bounds: [u32; 2],
    /// Container ports published with `run -- -p`: inbound connections to them are accepted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub published: Vec<super::policy::InboundPort>,
    /// Size cap of audit.jsonl (config `audit.max_bytes`): the event writer rotates it to
    /// audit.jsonl.1 before it would grow past this.
    pub audit_max_bytes: u64,
}

/// Facts about the running container that the hook discovers (not stored in the bundle).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RuntimeFacts {
    /// Nameservers from the container's resolv.conf.
    pub dns_servers: Vec<IpAddr>,
    /// Default gateway of the container's network (host loopback path for slirp4netns).
    pub gateway: Option<IpAddr>,
}

impl Bundle {
    /// Whether `target`'s host is under a live deny.
    pub fn is_denied_host(&self, target: &Target) -> bool {
        self.live_deny.iter().any(|t| t.host == target.host)
    }

    /// Record a live `allow`: clears any deny of the same host (if the allow has no port), remembers the target (and, for
    /// a domain, the addresses it resolved to now).
    pub fn live_allow(&mut self, target: Target, resolved: Option<Resolved>) {
        // A deny covers every port: only an allow of the whole host lifts it.
        if target.scope.is_none() {
            self.live_deny.retain(|t| t.host != target.host);
        }
        if let (Host::Domain(d), Some(r)) = (&target.host, resolved) {
            self.resolved.insert(d.name.clone(), r);
        }
        if !self.live_allow.contains(&target) && !self.entries.contains(&target) {
            self.live_allow.push(target);
        }
    }

    /// Record that the user profile `name`, holding `entries`, now belongs to the container
    /// (`allow --save-to`): it joins the profiles, its entries the composed entries, and
    /// live allows those entries now cover are dropped as redundant.
    pub fn add_profile(&mut self, name: &str, entries: &[Target]) {
        if !self.profiles.iter().any(|p| p == name) {
            self.profiles.push(name.to_string());
        }
        for entry in entries {
            if !self.entries.contains(entry) {
                self.entries.push(entry.clone());
            }
        }
        self.live_allow.retain(|t| !entries.contains(t));
    }

    /// Record a live `deny` of a host (ports are not part of a deny): drops live allows of the
    /// same host and remembers the deny, which persists across mode changes and restarts.
    pub fn live_deny(&mut self, target: Target) {
        let host = Target {
            host: target.host,
            scope: None,
        };
        self.live_allow.retain(|t| t.host != host.host);
        if !self.live_deny.contains(&host) {
            self.live_deny.push(host);
        }
    }

    /// Whether `target`'s addresses come from resolving it ahead of time (and are then allowed
    /// until the next `resolve`), rather than from a resolver in the container as it answers
    /// (with TTLs and the private-answer rule). Only the static tier, and the dnsmasq tier for
    /// port-scoped names (dnsmasq cannot learn a port), resolve ahead.
    pub fn resolves_ahead(&self, target: &Target) -> bool {
        let exact = matches!(&target.host, Host::Domain(d) if !d.wildcard);
        exact
            && match self.dns_tier {
                DnsTier::Static => true,
                DnsTier::Dnsmasq => target.scope.is_some(),
                DnsTier::Builtin => false,
            }
    }

    /// Domains whose addresses must be looked up before start (see [`Bundle::resolves_ahead`]).
    pub fn domains_to_resolve(&self) -> Vec<DomainName> {
        let mut out: Vec<DomainName> = self
            .entries
            .iter()
            .chain(&self.live_allow)
            .filter(|t| self.resolves_ahead(t))
            .filter_map(|t| match &t.host {
                Host::Domain(d) => Some(d.name.clone()),
                Host::Net(_) => None,
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Addresses a target stands for: its network, or its domain's addresses resolved ahead.
    /// A private address a name resolved to (DNS rebinding) counts only if a literal entry
    /// allows it, the same rule the resolvers apply to their answers.
    fn nets_of(&self, target: &Target, literal: &[IpNet]) -> Vec<IpNet> {
        match &target.host {
            Host::Net(n) => vec![*n],
            Host::Domain(d) if self.resolves_ahead(target) => self
                .resolved
                .get(&d.name)
                .map(|r| {
                    r.addrs
                        .iter()
                        .filter(|a| {
                            !super::private::is_rebinding_sensitive(**a)
                                || literal.iter().any(|n| n.contains(*a))
                        })
                        .map(|a| IpNet::from(*a))
                        .collect()
                })
                .unwrap_or_default(),
            Host::Domain(_) => Vec::new(),
        }
    }

    /// Whether a domain target is switched off by a live deny of that domain (or a wildcard
    /// covering it).
    fn denied_domain(&self, target: &Target) -> bool {
        let Host::Domain(d) = &target.host else {
            return false;
        };
        self.live_deny.iter().any(|t| match &t.host {
            Host::Domain(deny) if deny.wildcard => {
                deny.name.is_parent_of(&d.name) || (d.wildcard && deny.name == d.name)
            }
            Host::Domain(deny) => !d.wildcard && deny.name == d.name,
            Host::Net(_) => false,
        })
    }

    /// Profile entries and live allows, minus the names a live deny switched off, in order
    /// and without repeats: the allowlist as a policy outside this host (`export`) sees it.
    /// Denied addresses are not subtracted here; they stay denies (see `live_deny`).
    pub fn effective_allow(&self) -> Vec<Target> {
        let mut out: Vec<Target> = Vec::new();
        for target in self.entries.iter().chain(&self.live_allow) {
            if !self.denied_domain(target) && !out.contains(target) {
                out.push(target.clone());
            }
        }
        out
    }

    /// The policy for this container: (profile ∪ live allows) − denies, in the bundle's mode.
    ///
    /// A denied address or network goes into the deny sets and wins over everything. A denied
    /// domain removes exactly what that domain brought: its addresses are not allowed through
    /// it, but an address that another allowed target also brings stays allowed.
    pub fn policy(&self, facts: &RuntimeFacts) -> Policy {
        let mut policy = Policy::new(self.mode);
        let literal: Vec<IpNet> = self
            .entries
            .iter()
            .chain(&self.live_allow)
            .filter_map(|t| match t.host {
                Host::Net(n) => Some(n),
                Host::Domain(_) => None,
            })
            .collect();
        for target in self.entries.iter().chain(&self.live_allow) {
            if self.denied_domain(target) {
                continue;
            }
            for net in self.nets_of(target, &literal) {
                policy.allow.push(AllowRule {
                    net,
                    scope: target.scope,
                });
            }
        }
        for target in &self.live_deny {
            if let Host::Net(net) = target.host {
                policy.deny.push(net);
            }
        }
        match self.dns_tier {
            // Only the shield's resolver (marked sockets) talks to DNS servers; the workload
            // asks it on loopback.
            DnsTier::Builtin => policy.resolver_mark = Some(super::policy::RESOLVER_MARK),
            // dnsmasq cannot mark its sockets: its fixed query port identifies it, and it adds
            // learned addresses without timeouts, so the sets give them the longest TTL.
            DnsTier::Dnsmasq => {
                policy.resolver_port = Some(super::policy::DNSMASQ_QUERY_PORT);
                policy.learned_timeout = Some(self.ttl_bounds[1]);
            }
            DnsTier::Static => policy.dns_servers = facts.dns_servers.clone(),
        }
        policy.inbound = self.published.clone();
        if let (Some(gateway), false) = (facts.gateway, self.loopback_ports.is_empty()) {
            policy.host_loopback = Some(HostLoopback {
                gateway,
                ports: self.loopback_ports.clone(),
            });
        }
        policy
    }
}

/// A bundle for unit tests elsewhere in the core: `entries` and live denies as targets.
#[cfg(test)]
pub(crate) fn test_bundle(entries: &[&str], deny: &[&str], mode: Mode, tier: DnsTier) -> Bundle {
    let targets = |v: &[&str]| v.iter().map(|e| Target::parse(e).unwrap()).collect();
    Bundle {
        format: BUNDLE_FORMAT,
        written_by: "0.1.0".into(),
        name: ContainerName::new("c1").unwrap(),
        instance: "abc".into(),
        created: 0,
        profiles: vec![],
        entries: targets(entries),
        resolved: Default::default(),
        mode,
        live_allow: vec![],
        live_deny: targets(deny),
        loopback_ports: vec![],
        audit_enabled: true,
        dns_tier: tier,
        upstream_dns: None,
        ttl_bounds: [60, 3600],
        published: vec![],
        audit_max_bytes: 1 << 20,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle() -> Bundle {
        let mut b = test_bundle(
            &["example.com:443", "198.51.100.0/24", "*.example.org"],
            &["198.51.100.7"],
            Mode::DenyAll,
            DnsTier::Static,
        );
        b.profiles = vec!["p".into()];
        b.resolved.insert(
            "example.com".parse().unwrap(),
            Resolved {
                addrs: vec!["198.18.0.5".parse().unwrap()],
                at: 1,
            },
        );
        b.live_allow = vec![Target::parse("198.18.9.9").unwrap()];
        b.loopback_ports = vec![8080];
        b
    }

    #[test]
    fn merges_profile_resolved_live_and_denies() {
        let facts = RuntimeFacts {
            dns_servers: vec!["10.0.2.3".parse().unwrap()],
            gateway: Some("10.0.2.2".parse().unwrap()),
        };
        let p = bundle().policy(&facts);
        let shown: Vec<String> = p
            .allow
            .iter()
            .map(|r| format!("{}{:?}", r.net, r.scope.map(|s| s.port)))
            .collect();
        assert_eq!(
            shown,
            [
                "198.18.0.5/32Some(443)",
                "198.51.100.0/24None",
                "198.18.9.9/32None"
            ]
        );
        assert_eq!(p.deny, vec!["198.51.100.7/32".parse::<IpNet>().unwrap()]);
        assert_eq!(p.host_loopback.unwrap().ports, vec![8080]);
        assert_eq!(
            bundle().domains_to_resolve(),
            vec!["example.com".parse::<DomainName>().unwrap()]
        );
    }

    #[test]
    fn round_trips_and_refuses_unknown_fields() {
        let b = bundle();
        let text = serde_json::to_string(&b).unwrap();
        assert_eq!(serde_json::from_str::<Bundle>(&text).unwrap(), b);
        let tampered = text.replacen('{', "{\"extra\":1,", 1);
        assert!(serde_json::from_str::<Bundle>(&tampered).is_err());
        let bad_name = text.replace("\"c1\"", "\"../etc\"");
        assert!(serde_json::from_str::<Bundle>(&bad_name).is_err());
        let bad_target = text.replace("198.18.9.9", "198.18.9.9; flush ruleset");
        assert!(serde_json::from_str::<Bundle>(&bad_target).is_err());
    }

    #[test]
    fn live_allow_and_deny_follow_the_documented_semantics() {
        let t = |s: &str| Target::parse(s).unwrap();
        let facts = RuntimeFacts::default();
        let allowed = |b: &Bundle| -> Vec<String> {
            b.policy(&facts)
                .allow
                .iter()
                .map(|r| r.net.to_string())
                .collect()
        };
        let mut b = bundle();
        // Deny a profile network's member: it lands in the deny set, the network stays.
        b.live_deny(t("198.51.100.7"));
        assert_eq!(
            b.policy(&facts).deny,
            vec!["198.51.100.7/32".parse::<IpNet>().unwrap()]
        );
        // A port-scoped allow does not lift a deny (the deny covers every port)...
        b.live_allow(t("198.51.100.7:443/tcp"), None);
        assert_eq!(b.policy(&facts).deny.len(), 1);
        // ...allowing the whole host again clears it.
        b.live_allow(t("198.51.100.7"), None);
        assert!(b.policy(&facts).deny.is_empty());
        // A denied domain removes exactly its own addresses; a shared address brought by another
        // allowed target stays.
        b.live_allow(
            t("other.example"),
            Some(Resolved {
                addrs: vec!["198.18.0.5".parse().unwrap(), "198.18.7.7".parse().unwrap()],
                at: 2,
            }),
        );
        b.live_deny(t("example.com:443"));
        assert_eq!(
            b.live_deny.last().unwrap().to_string(),
            "example.com",
            "a deny has no port"
        );
        let now = allowed(&b);
        assert!(
            now.contains(&"198.18.0.5/32".to_string()),
            "still brought by other.example: {now:?}"
        );
        b.live_deny(t("other.example"));
        let now = allowed(&b);
        assert!(
            !now.iter()
                .any(|n| n.starts_with("198.18.0.5") || n.starts_with("198.18.7.7")),
            "{now:?}"
        );
        assert!(
            b.policy(&facts).deny.is_empty(),
            "domain denies never block shared addresses outright"
        );
        // Wildcard deny covers subdomains.
        b.live_allow(
            t("a.example.org"),
            Some(Resolved {
                addrs: vec!["198.18.9.1".parse().unwrap()],
                at: 3,
            }),
        );
        assert!(allowed(&b).contains(&"198.18.9.1/32".to_string()));
        b.live_deny(t("*.example.org"));
        assert!(!allowed(&b).contains(&"198.18.9.1/32".to_string()));
    }

    #[test]
    fn container_names_are_safe() {
        for bad in ["", "-x", "a/b", "..", ".x", "a b", &"x".repeat(129)] {
            assert!(ContainerName::new(bad).is_err(), "{bad}");
        }
        assert!(ContainerName::new("my-container_1.2").is_ok());
    }

    #[test]
    fn only_names_resolved_ahead_bring_their_cached_addresses() {
        let mut b = bundle();
        b.live_allow.clear();
        b.live_deny.clear();
        b.entries = vec![
            Target::parse("api.example.com").unwrap(),
            Target::parse("ntp.example.com:123/udp").unwrap(),
            Target::parse("172.16.9.9").unwrap(),
        ];
        for (name, addrs) in [
            (
                "api.example.com",
                vec!["198.51.100.1", "172.16.9.9", "10.9.9.9"],
            ),
            ("ntp.example.com", vec!["198.51.100.2", "192.168.1.1"]),
        ] {
            b.resolved.insert(
                name.parse::<DomainName>().unwrap(),
                Resolved {
                    addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
                    at: 0,
                },
            );
        }
        let allowed = |b: &Bundle| -> Vec<String> {
            let mut v: Vec<String> = b
                .policy(&RuntimeFacts::default())
                .allow
                .iter()
                .map(|r| {
                    format!(
                        "{} {}",
                        r.net.addr(),
                        r.scope.map(|s| s.to_string()).unwrap_or_default()
                    )
                    .trim()
                    .to_string()
                })
                .collect();
            v.sort();
            v
        };
        // Builtin: the resolver learns every name as it answers; the cache counts for nothing.
        b.dns_tier = DnsTier::Builtin;
        assert_eq!(allowed(&b), ["172.16.9.9"]);
        assert!(b.domains_to_resolve().is_empty());
        // Static: every exact name, minus private answers nothing literal allows.
        b.dns_tier = DnsTier::Static;
        assert_eq!(
            allowed(&b),
            [
                "172.16.9.9",
                "172.16.9.9",
                "198.51.100.1",
                "198.51.100.2 123/udp"
            ]
        );
        // dnsmasq: only port-scoped names (dnsmasq learns the others, but cannot learn ports).
        b.dns_tier = DnsTier::Dnsmasq;
        assert_eq!(allowed(&b), ["172.16.9.9", "198.51.100.2 123/udp"]);
        assert_eq!(
            b.domains_to_resolve(),
            ["ntp.example.com".parse::<DomainName>().unwrap()]
        );
    }
}
