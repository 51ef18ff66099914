//! Thin effect modules: the only code that touches the system (nft, namespaces, files).
pub mod audit;
pub mod conntrack;
pub mod dns_client;
pub mod dnsmasq;
pub mod events;
pub mod firewall;
pub mod hooks;
pub mod learned_log;
pub mod netns;
pub mod nflog;
pub mod nfnetlink;
pub mod nft;
pub mod paths;
pub mod procfs;
pub mod profiles;
pub mod resolver;
pub mod state;
