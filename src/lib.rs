//! terok-shield: a default-deny nftables egress firewall for rootless Podman containers.
//!
//! `core` decides (pure, no I/O); `effects` acts on the system; `cli` wires them to commands.

pub mod cli;
pub mod core;
pub mod effects;
