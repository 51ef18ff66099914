//! The pure core: everything that decides what the firewall is, with no I/O at all.
//!
//! Effects (nft, namespaces, podman, files, sockets) live in `crate::effects` and only carry
//! out what this module computed, which keeps the security-relevant logic testable in memory.

pub mod annotated;
pub mod audit;
pub mod bundle;
pub mod bundle_format;
pub mod bundled;
pub mod clearance;
pub mod companion;
pub mod config;
pub mod dns_policy;
pub mod dns_wire;
pub mod dnsmasq;
pub mod doctor;
pub mod events;
pub mod export;
pub mod learn;
pub mod learned;
pub mod live;
#[cfg(test)]
mod module_graph;
pub mod nft_netlink;
pub mod observe;
pub mod oci;
pub mod oci_config;
pub mod podman_args;
pub mod policy;
pub mod private;
pub mod profile;
#[cfg(test)]
pub(crate) mod proptests;
pub mod ruleset;
pub mod status;
pub mod target;
pub mod verify;
