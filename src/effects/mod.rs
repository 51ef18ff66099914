//! Thin effect modules: the only code that touches the system (nft, namespaces, files).
pub mod firewall;
pub mod netns;
pub mod nft;
pub mod paths;
pub mod profiles;
pub mod hooks;
pub mod procfs;
pub mod state;
pub mod dns_client;
