//! Generators shared by the fuzz targets: typed values (names, addresses, targets, bundles,
//! policies) built from the fuzzer's bytes with `arbitrary`.
//!
//! Raw bytes alone would almost never produce a DNS answer whose CNAME chain reaches an
//! allowlisted name, or a listing that differs from a ruleset in one element only, so the
//! targets that check such invariants draw from small vocabularies instead: a few labels,
//! addresses on every side of the private/public and IPv4/IPv6 boundaries, a few ports. Every
//! vocabulary also has an "anything" arm, so the values are not limited to the list.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::{Result, Unstructured};
use ipnet::IpNet;
use terok_shield::core::bundle::{Bundle, ContainerName, DnsTier, BUNDLE_FORMAT};
use terok_shield::core::policy::{AllowRule, HostLoopback, InboundPort, Mode, Policy};
use terok_shield::core::target::{DomainName, DomainPattern, Host, PortScope, Protocol, Target};

/// Labels the generated names are made of: few enough that names repeat and match.
const LABELS: &[&str] = &[
    "a", "b", "example", "com", "org", "x-1", "_srv", "www", "c0",
];

/// A valid domain name of one to four labels from [`LABELS`], or any name that parses.
pub fn domain(u: &mut Unstructured) -> Result<DomainName> {
    if u.ratio(1, 16)? {
        let raw: &str = u.arbitrary()?;
        if let Ok(name) = raw.parse() {
            return Ok(name);
        }
    }
    let n = u.int_in_range(1..=4)?;
    let mut labels = Vec::with_capacity(n);
    for _ in 0..n {
        labels.push(*u.choose(LABELS)?);
    }
    // The last label must not be numeric; none of LABELS is.
    Ok(labels
        .join(".")
        .parse()
        .unwrap_or_else(|_| "example.com".parse().expect("a valid name")))
}

/// An address on either side of every boundary the shield cares about.
pub fn addr(u: &mut Unstructured) -> Result<IpAddr> {
    const FIXED: &[&str] = &[
        "198.51.100.7",
        "198.51.100.200",
        "203.0.113.1",
        "10.0.0.1",
        "10.255.255.255",
        "172.16.0.1",
        "172.32.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "127.0.0.1",
        "0.0.0.0",
        "255.255.255.255",
        "224.0.0.251",
        "2001:db8::1",
        "2001:db8::2",
        "fd00::1",
        "fe80::1",
        "::1",
        "::",
        "ff02::1",
        "::ffff:10.0.0.1",
        "::ffff:127.0.0.1",
        "::ffff:198.51.100.7",
        "64:ff9b::a00:1",
    ];
    Ok(match u.int_in_range(0..=3)? {
        0 => IpAddr::V4(Ipv4Addr::from(u.arbitrary::<u32>()?)),
        1 => IpAddr::V6(Ipv6Addr::from(u.arbitrary::<u128>()?)),
        // Near the documentation and private ranges, so networks contain them.
        2 => {
            let base: IpAddr = u.choose(FIXED)?.parse().expect("a valid address");
            match base {
                IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(
                    u32::from(a) ^ u32::from(u.arbitrary::<u8>()? & 0x0f),
                )),
                IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(
                    u128::from(a) ^ u128::from(u.arbitrary::<u8>()? & 0x0f),
                )),
            }
        }
        _ => u.choose(FIXED)?.parse().expect("a valid address"),
    })
}

/// A network (host bits cleared) around [`addr`], of any prefix length.
pub fn net(u: &mut Unstructured) -> Result<IpNet> {
    let a = addr(u)?;
    let max = if a.is_ipv4() { 32 } else { 128 };
    let len = if u.ratio(1, 2)? {
        max
    } else {
        u.int_in_range(0..=max)?
    };
    Ok(IpNet::new(a, len).expect("length within range").trunc())
}

/// A port, mostly from a few well-known ones.
pub fn port(u: &mut Unstructured) -> Result<u16> {
    if u.ratio(1, 4)? {
        Ok(u.int_in_range(1..=u16::MAX)?)
    } else {
        Ok(*u.choose(&[22u16, 53, 80, 443, 8080, 65535])?)
    }
}

/// A protocol.
pub fn protocol(u: &mut Unstructured) -> Result<Protocol> {
    Ok(if u.arbitrary()? {
        Protocol::Tcp
    } else {
        Protocol::Udp
    })
}

/// No scope, or a port with or without a protocol.
pub fn scope(u: &mut Unstructured) -> Result<Option<PortScope>> {
    if u.ratio(2, 3)? {
        return Ok(None);
    }
    Ok(Some(PortScope {
        port: port(u)?,
        protocol: match u.int_in_range(0..=2)? {
            0 => None,
            1 => Some(Protocol::Tcp),
            _ => Some(Protocol::Udp),
        },
    }))
}

/// A domain pattern (exact or `*.`).
pub fn pattern(u: &mut Unstructured) -> Result<DomainPattern> {
    Ok(DomainPattern {
        name: domain(u)?,
        wildcard: u.arbitrary()?,
    })
}

/// Any valid target.
pub fn target(u: &mut Unstructured) -> Result<Target> {
    let host = if u.arbitrary()? {
        Host::Domain(pattern(u)?)
    } else {
        Host::Net(net(u)?)
    };
    Ok(Target {
        host,
        scope: scope(u)?,
    })
}

/// A mode.
pub fn mode(u: &mut Unstructured) -> Result<Mode> {
    Ok(*u.choose(&[Mode::DenyAll, Mode::Bypass, Mode::BypassAll, Mode::Block])?)
}

fn list<T>(
    u: &mut Unstructured,
    max: usize,
    mut f: impl FnMut(&mut Unstructured) -> Result<T>,
) -> Result<Vec<T>> {
    let n = u.int_in_range(0..=max)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(f(u)?);
    }
    Ok(out)
}

/// A bundle with generated decisions (entries, live allows and denies, resolved cache, mode).
pub fn bundle(u: &mut Unstructured) -> Result<Bundle> {
    let mut resolved = BTreeMap::new();
    for _ in 0..u.int_in_range(0..=3)? {
        resolved.insert(
            domain(u)?,
            terok_shield::core::bundle::Resolved {
                addrs: list(u, 3, addr)?,
                at: u.arbitrary()?,
            },
        );
    }
    let min_ttl = u.arbitrary()?;
    Ok(Bundle {
        format: BUNDLE_FORMAT,
        written_by: "fuzz".into(),
        name: ContainerName::new("fuzz").expect("a valid name"),
        instance: "0123456789abcdef".into(),
        created: u.arbitrary()?,
        profiles: vec!["dev-standard".into()],
        entries: list(u, 8, target)?,
        resolved,
        mode: mode(u)?,
        live_allow: list(u, 4, target)?,
        live_deny: list(u, 4, target)?,
        loopback_ports: list(u, 3, port)?,
        audit_enabled: u.arbitrary()?,
        dns_tier: *u.choose(&[DnsTier::Static, DnsTier::Builtin, DnsTier::Dnsmasq])?,
        upstream_dns: if u.arbitrary()? { Some(addr(u)?) } else { None },
        ttl_bounds: [min_ttl, u.int_in_range(min_ttl..=u32::MAX)?],
        published: list(u, 2, |u| {
            Ok(InboundPort {
                port: port(u)?,
                protocol: protocol(u)?,
            })
        })?,
        audit_max_bytes: u.int_in_range(64 * 1024..=u64::MAX)?,
    })
}

/// A policy with generated allows, denies, DNS servers, host loopback and resolver settings.
pub fn policy(u: &mut Unstructured) -> Result<Policy> {
    let mut p = Policy::new(mode(u)?);
    p.allow = list(u, 12, |u| {
        Ok(AllowRule {
            net: net(u)?,
            scope: scope(u)?,
        })
    })?;
    p.deny = list(u, 4, net)?;
    p.dns_servers = list(u, 2, addr)?;
    if u.arbitrary()? {
        p.host_loopback = Some(HostLoopback {
            gateway: addr(u)?,
            ports: list(u, 3, port)?,
        });
    }
    if u.arbitrary()? {
        p.resolver_mark = Some(u.arbitrary()?);
    }
    if u.arbitrary()? {
        p.resolver_port = Some(port(u)?);
    }
    if u.arbitrary()? {
        p.learned_timeout = Some(u.int_in_range(1..=86_400)?);
    }
    p.inbound = list(u, 2, |u| {
        Ok(InboundPort {
            port: port(u)?,
            protocol: protocol(u)?,
        })
    })?;
    Ok(p)
}
