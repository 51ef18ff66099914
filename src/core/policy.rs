//! The policy model: what one container may reach, in resolved, typed form.
//!
//! A `Policy` holds only addresses and networks (domains are resolved before this point), so
//! the ruleset generator never has to trust a name or a string.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::target::{PortScope, Protocol};

/// Packet mark of the shield's own resolver sockets (the `builtin` DNS tier): the ruleset
/// lets DNS carrying it leave. The workload cannot set marks without CAP_NET_ADMIN.
pub const RESOLVER_MARK: u32 = 0x7e70_5d00;

/// UDP port dnsmasq (the `dnsmasq` DNS tier) sends its upstream queries from (`--query-port`).
/// The ruleset lets DNS out from this port only; dnsmasq binds it before the workload starts.
/// Kept here, with the resolver mark, so the bundle can build a policy without knowing dnsmasq.
pub const DNSMASQ_QUERY_PORT: u16 = 53_053;

/// The firewall's operating mode for one container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// "up": default deny; only allowlisted destinations.
    DenyAll,
    /// "down": public egress accepted and logged; denies and private ranges still rejected.
    Bypass,
    /// "down --all": like bypass, but private ranges are reachable too.
    BypassAll,
    /// "block": nothing but loopback.
    Block,
}

impl Mode {
    /// The name `status` prints and state files store (`up`, `down`, `down_all`, `block`).
    pub fn status_name(self) -> &'static str {
        match self {
            Mode::DenyAll => "up",
            Mode::Bypass => "down",
            Mode::BypassAll => "down_all",
            Mode::Block => "block",
        }
    }

    /// Whether private ranges get their own reject rules in this mode.
    pub fn rejects_private(self) -> bool {
        matches!(self, Mode::DenyAll | Mode::Bypass)
    }
}

/// One allowed destination: a network, optionally only for one port (and protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct AllowRule {
    pub net: IpNet,
    pub scope: Option<PortScope>,
}

/// Host services a container may reach through the host-loopback address of its network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostLoopback {
    /// The address that leads to the host's loopback (slirp4netns: 10.0.2.2).
    pub gateway: IpAddr,
    /// TCP ports opened on it.
    pub ports: Vec<u16>,
}

/// A container port published with `podman run -p`: new connections to it may come in.
/// Stored as `8080/tcp` in state.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InboundPort {
    pub port: u16,
    pub protocol: Protocol,
}

impl std::fmt::Display for InboundPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol.keyword())
    }
}

impl std::str::FromStr for InboundPort {
    type Err = String;

    /// `PORT/tcp` or `PORT/udp`, PORT 1-65535 (a target's port scope, protocol required).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let scope: PortScope = s
            .parse()
            .map_err(|e| format!("published port `{s}`: {e}"))?;
        let protocol = scope.protocol.ok_or_else(|| {
            format!("invalid published port `{s}` (expected PORT/tcp or PORT/udp)")
        })?;
        Ok(InboundPort {
            port: scope.port,
            protocol,
        })
    }
}

impl Serialize for InboundPort {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for InboundPort {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Everything the generator needs to build one container's ruleset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub mode: Mode,
    /// Literal allows (profiles, resolved domains, live allows); never expire.
    pub allow: Vec<AllowRule>,
    /// Persistent denies; win over any allow and hold in bypass mode too.
    pub deny: Vec<IpNet>,
    /// Resolvers the workload may send DNS (port 53, UDP and TCP) to.
    pub dns_servers: Vec<IpAddr>,
    /// Optional host services (config `loopback_ports`).
    pub host_loopback: Option<HostLoopback>,
    /// Packet mark of the shield's own resolver sockets: traffic carrying it may leave for DNS
    /// upstreams. The workload cannot set marks without CAP_NET_ADMIN.
    pub resolver_mark: Option<u32>,
    /// UDP source port that dnsmasq (dnsmasq tier) holds for its upstream queries: datagrams
    /// from it may leave for DNS upstreams. Bound before the workload starts, so no workload
    /// socket can have it.
    pub resolver_port: Option<u16>,
    /// Default lifetime (seconds) of DNS-learned set elements, for a resolver that adds
    /// elements without their own timeout (dnsmasq).
    pub learned_timeout: Option<u32>,
    /// Published container ports: the input chain accepts new connections to them (the
    /// replies leave as established traffic). Egress is unaffected.
    pub inbound: Vec<InboundPort>,
}

impl Policy {
    /// Whether a flow to `dst` (IP protocol number `proto`, destination port `dport`) is
    /// allowed by this policy, mirroring the ruleset's output chain. Used to decide which
    /// open connections to cut when access is revoked, so it must agree with the generator
    /// (checked against real packets in tests).
    pub fn permits(&self, dst: IpAddr, proto: u8, dport: Option<u16>) -> bool {
        if dst.is_loopback() {
            return true;
        }
        let net = IpNet::from(dst);
        if self.mode == Mode::Block || self.deny.iter().any(|n| n.contains(&dst)) {
            return false;
        }
        let tcp_or_udp = proto == 6 || proto == 17;
        let allowed = self.allow.iter().any(|r| {
            r.net.contains(&dst)
                && r.scope.is_none_or(|s| {
                    dport == Some(s.port) && s.protocols().iter().any(|p| p.number() == proto)
                })
        });
        let dns = tcp_or_udp && dport == Some(53) && self.dns_servers.contains(&dst);
        let host = self.host_loopback.as_ref().is_some_and(|lb| {
            lb.gateway == dst && proto == 6 && dport.is_some_and(|p| lb.ports.contains(&p))
        });
        match self.mode {
            Mode::DenyAll => allowed || dns || host,
            // The DNS servers and host services stay reachable even when private.
            Mode::Bypass => allowed || dns || host || !super::private::is_private(&net),
            Mode::BypassAll => true,
            Mode::Block => false,
        }
    }

    /// Whether an open flow to `dst` may go on under this policy, given the DNS-learned set
    /// elements live in the table (`learned`: address and optional protocol/port scope):
    /// the flows for which this is false are the ones a revoking change cuts.
    pub fn keeps_flow(
        &self,
        learned: &[(IpAddr, Option<(u8, u16)>)],
        dst: IpAddr,
        proto: u8,
        dport: Option<u16>,
    ) -> bool {
        let by_dns = || {
            self.mode != Mode::Block
                && !self.deny.iter().any(|n| n.contains(&dst))
                && learned.iter().any(|(a, scope)| {
                    *a == dst && scope.is_none_or(|(p, port)| p == proto && Some(port) == dport)
                })
        };
        self.permits(dst, proto, dport) || by_dns()
    }

    /// An empty policy in `mode`: nothing allowed, nothing denied, no DNS.
    pub fn new(mode: Mode) -> Self {
        Policy {
            mode,
            allow: Vec::new(),
            deny: Vec::new(),
            dns_servers: Vec::new(),
            host_loopback: None,
            resolver_mark: None,
            resolver_port: None,
            learned_timeout: None,
            inbound: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::target::{PortScope, Protocol};

    fn policy(mode: Mode) -> Policy {
        let mut p = Policy::new(mode);
        let r = |n: &str, scope| AllowRule {
            net: n.parse().unwrap(),
            scope,
        };
        p.allow = vec![
            r("198.51.100.0/24", None),
            r(
                "198.18.0.5/32",
                Some(PortScope {
                    port: 443,
                    protocol: Some(Protocol::Tcp),
                }),
            ),
            r("fd5e:ed00::7/128", None),
        ];
        p.deny = vec!["198.51.100.7/32".parse().unwrap()];
        p.dns_servers = vec!["10.0.2.3".parse().unwrap()];
        p
    }

    /// A flow to a DNS-learned address lives on, unless the address is denied (a deny wins
    /// over everything) or the container is blocked; a scoped element keeps only its port.
    #[test]
    fn keeps_flow_counts_learned_elements_but_never_past_a_deny_or_block() {
        let learned_ip: IpAddr = "198.51.100.30".parse().unwrap();
        let scoped_ip: IpAddr = "198.51.100.31".parse().unwrap();
        let learned = [(learned_ip, None), (scoped_ip, Some((6, 443)))];
        let mut p = Policy::new(Mode::DenyAll);
        assert!(p.keeps_flow(&learned, learned_ip, 6, Some(80)));
        assert!(p.keeps_flow(&learned, scoped_ip, 6, Some(443)));
        assert!(!p.keeps_flow(&learned, scoped_ip, 6, Some(80)));
        assert!(!p.keeps_flow(&learned, scoped_ip, 17, Some(443)));
        assert!(!p.keeps_flow(&learned, "198.51.100.32".parse().unwrap(), 6, Some(80)));
        assert!(!p.keeps_flow(&[], learned_ip, 6, Some(80)));
        p.deny.push("198.51.100.30/32".parse().unwrap());
        assert!(!p.keeps_flow(&learned, learned_ip, 6, Some(80)));
        let mut blocked = Policy::new(Mode::Block);
        blocked.allow.push(AllowRule {
            net: "198.51.100.31/32".parse().unwrap(),
            scope: None,
        });
        assert!(!blocked.keeps_flow(&learned, scoped_ip, 6, Some(443)));
    }

    #[test]
    fn permits_mirrors_every_mode() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let up = policy(Mode::DenyAll);
        assert!(up.permits(ip("198.51.100.9"), 6, Some(80)));
        assert!(!up.permits(ip("198.51.100.7"), 6, Some(80)), "deny wins");
        assert!(up.permits(ip("198.18.0.5"), 6, Some(443)));
        assert!(
            !up.permits(ip("198.18.0.5"), 17, Some(443)),
            "scope is tcp only"
        );
        assert!(!up.permits(ip("198.18.0.5"), 6, Some(80)));
        assert!(up.permits(ip("10.0.2.3"), 17, Some(53)));
        assert!(!up.permits(ip("10.0.2.3"), 6, Some(80)));
        assert!(!up.permits(ip("198.18.9.9"), 6, Some(80)));
        assert!(up.permits(ip("127.0.0.1"), 6, Some(80)));
        let down = policy(Mode::Bypass);
        assert!(down.permits(ip("198.18.9.9"), 6, Some(80)));
        assert!(
            !down.permits(ip("172.31.0.1"), 6, Some(80)),
            "private stays closed"
        );
        assert!(
            down.permits(ip("fd5e:ed00::7"), 6, Some(80)),
            "allowlisted private opens"
        );
        assert!(!down.permits(ip("198.51.100.7"), 6, Some(80)));
        let all = policy(Mode::BypassAll);
        assert!(all.permits(ip("172.31.0.1"), 6, Some(80)));
        assert!(!all.permits(ip("198.51.100.7"), 6, Some(80)));
        assert!(!policy(Mode::Block).permits(ip("198.51.100.9"), 6, Some(80)));
    }

    #[test]
    fn published_ports_round_trip_and_bad_ones_are_refused() {
        let p: InboundPort = serde_json::from_str("\"8080/tcp\"").unwrap();
        assert_eq!(p.to_string(), "8080/tcp");
        assert_eq!(serde_json::to_string(&p).unwrap(), "\"8080/tcp\"");
        for bad in ["\"80\"", "\"0/tcp\"", "\"80/sctp\"", "\"70000/udp\"", "80"] {
            assert!(serde_json::from_str::<InboundPort>(bad).is_err(), "{bad}");
        }
    }
}
