//! Small builders for policies and inspection of the container's tables, shared by tests.

use ipnet::IpNet;
use terok_shield::core::policy::{AllowRule, Mode, Policy};
use terok_shield::core::target::{PortScope, Protocol};

use super::bed::Bed;

/// A bare address is a single host (/32 or /128).
pub fn net(s: &str) -> IpNet {
    s.parse()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .unwrap_or_else(|e| panic!("bad net {s}: {e}"))
}

pub fn allow(s: &str) -> AllowRule {
    AllowRule {
        net: net(s),
        scope: None,
    }
}

pub fn allow_port(s: &str, port: u16, protocol: Option<Protocol>) -> AllowRule {
    AllowRule {
        net: net(s),
        scope: Some(PortScope { port, protocol }),
    }
}

pub fn policy(mode: Mode, allows: &[&str]) -> Policy {
    let mut p = Policy::new(mode);
    p.allow = allows.iter().map(|s| allow(s)).collect();
    p
}

/// Names of all tables in the container netns, as `family name`.
pub fn tables(bed: &Bed) -> Vec<String> {
    let out = bed.nft_cli(&["-j", "list", "tables"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("table"))
        .map(|t| {
            format!(
                "{} {}",
                t["family"].as_str().unwrap(),
                t["name"].as_str().unwrap()
            )
        })
        .collect()
}

/// Skip (or fail in CI) when unprivileged; otherwise a fresh bed.
#[macro_export]
macro_rules! bed {
    () => {{
        if !$crate::common::require_privileges() {
            return;
        }
        $crate::common::bed::Bed::new()
    }};
}
