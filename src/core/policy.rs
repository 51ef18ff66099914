//! The policy model: what one container may reach, in resolved, typed form.
//!
//! A `Policy` holds only addresses and networks (domains are resolved before this point), so
//! the ruleset generator never has to trust a name or a string.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::target::PortScope;

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
}

impl Policy {
    /// An empty policy in `mode`: nothing allowed, nothing denied, no DNS.
    pub fn new(mode: Mode) -> Self {
        Policy {
            mode,
            allow: Vec::new(),
            deny: Vec::new(),
            dns_servers: Vec::new(),
            host_loopback: None,
            resolver_mark: None,
        }
    }
}
