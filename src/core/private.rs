//! Private and special-purpose ranges that the shield rejects unless a user allowlists them.
//!
//! These are where a container could reach the host, the LAN or cloud metadata services;
//! they are refused even in bypass mode (unless `down --all`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// RFC 1918, link-local (cloud metadata lives at 169.254.169.254) and CGNAT.
pub const PRIVATE_V4: [(Ipv4Addr, u8); 5] = [
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    (Ipv4Addr::new(100, 64, 0, 0), 10),
];

/// Unique-local (RFC 4193) and link-local IPv6.
pub const PRIVATE_V6: [(Ipv6Addr, u8); 2] = [
    (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
];

/// The IPv4 private ranges as networks.
pub fn private_v4() -> Vec<Ipv4Net> {
    PRIVATE_V4
        .iter()
        .map(|(a, l)| Ipv4Net::new(*a, *l).expect("constant prefix"))
        .collect()
}

/// The IPv6 private ranges, followed by the v4-mapped forms (`::ffff:10.0.0.0/104`, ...) of the
/// IPv4 ones, so that a mapped address cannot slip past the IPv4 rules.
pub fn private_v6() -> Vec<Ipv6Net> {
    let native = PRIVATE_V6
        .iter()
        .map(|(a, l)| Ipv6Net::new(*a, *l).expect("constant prefix"));
    let mapped = PRIVATE_V4
        .iter()
        .map(|(a, l)| Ipv6Net::new(a.to_ipv6_mapped(), 96 + l).expect("constant prefix"));
    native.chain(mapped).collect()
}

/// Whether any part of `net` overlaps a private range.
pub fn is_private(net: &IpNet) -> bool {
    match net {
        IpNet::V4(n) => private_v4().iter().any(|p| p.contains(n) || n.contains(p)),
        IpNet::V6(n) => private_v6().iter().any(|p| p.contains(n) || n.contains(p)),
    }
}

/// Addresses a public name must not silently point the workload at: the private ranges the
/// firewall protects ([`is_private`]), plus unspecified, loopback, multicast and broadcast
/// addresses (also in v4-mapped form), which are never a legitimate egress destination and
/// would reach this host's own services. The DNS sets are consulted *before* the private-range
/// rejects, so learning such an address would open it; hence these are only learned, and only
/// kept in answers, when an allowlisted network covers them.
pub fn is_rebinding_sensitive(addr: IpAddr) -> bool {
    if is_private(&IpNet::from(addr)) {
        return true;
    }
    match addr {
        IpAddr::V4(a) => special_v4(a),
        IpAddr::V6(a) => {
            a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()
                || a.to_ipv4_mapped().is_some_and(special_v4)
        }
    }
}

fn special_v4(a: Ipv4Addr) -> bool {
    a.octets()[0] == 0 || a.is_loopback() || a.is_multicast() || a.is_broadcast()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_private_and_public() {
        for p in [
            "10.1.2.3/32",
            "172.31.0.0/16",
            "169.254.169.254/32",
            "100.64.0.1/32",
            "fd12::1/128",
            "fe80::1/128",
            "::ffff:192.168.1.1/128",
            "0.0.0.0/0",
        ] {
            assert!(is_private(&p.parse().unwrap()), "{p}");
        }
        for p in [
            "198.51.100.7/32",
            "172.32.0.1/32",
            "2001:db8::1/128",
            "100.128.0.1/32",
        ] {
            assert!(!is_private(&p.parse().unwrap()), "{p}");
        }
    }
}
