//! `config.yml` (src/core/config.rs `parse_config`): YAML from the user's config directory.
//!
//! Invariants: an accepted file yields a configuration that keeps the documented bounds
//! (min_ttl <= max_ttl, audit cap at least the minimum, ports 1-65535 without repeats, valid
//! profile names without repeats), and that configuration, written back out as YAML, parses
//! to the same value. Generated configurations take the same round trip.
#![no_main]

use std::path::Path;

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use terok_shield::core::config::{
    parse_config, AuditConfig, Config, DnsConfig, DnsTier, ShieldMode, MIN_AUDIT_MAX_BYTES,
};
use terok_shield::core::profile::ProfileName;

fn render(c: &Config) -> String {
    let profiles: Vec<String> = c
        .default_profiles
        .iter()
        .map(|p| format!("'{}'", p.as_str()))
        .collect();
    let ports: Vec<String> = c.loopback_ports.iter().map(u16::to_string).collect();
    let mut out = format!(
        "mode: {}\ndefault_profiles: [{}]\nloopback_ports: [{}]\naudit:\n  enabled: {}\n  max_bytes: {}\n",
        c.mode.as_str(),
        profiles.join(", "),
        ports.join(", "),
        c.audit.enabled,
        c.audit.max_bytes
    );
    if let Some(a) = c.upstream_dns {
        out.push_str(&format!("upstream_dns: '{a}'\n"));
    }
    out.push_str(&format!(
        "dns:\n  tier: {}\n  min_ttl: {}\n  max_ttl: {}\n  cache_max_age: {}\n",
        c.dns.tier.as_str(),
        c.dns.min_ttl,
        c.dns.max_ttl,
        c.dns.cache_max_age
    ));
    out
}

fn check(c: &Config) {
    assert!(c.dns.min_ttl <= c.dns.max_ttl);
    assert!(c.audit.max_bytes >= MIN_AUDIT_MAX_BYTES);
    for (i, p) in c.loopback_ports.iter().enumerate() {
        assert_ne!(*p, 0);
        assert!(!c.loopback_ports[..i].contains(p));
    }
    for (i, p) in c.default_profiles.iter().enumerate() {
        assert_eq!(ProfileName::new(p.as_str()).as_ref(), Ok(p));
        assert!(!c.default_profiles[..i].contains(p));
    }
    let text = render(c);
    let again = parse_config(Path::new("again.yml"), &text)
        .unwrap_or_else(|e| panic!("rendered config refused: {e}\n{text}"));
    assert_eq!(&again, c, "{text}");
}

fn generated(u: &mut Unstructured) -> arbitrary::Result<Config> {
    let mut names = Vec::new();
    for _ in 0..u.int_in_range(0..=3)? {
        let raw = *u.choose(&[
            "dev-standard",
            "base",
            "null",
            "true",
            "1e3",
            "a.b",
            "x_y",
            "0",
        ])?;
        let name = ProfileName::new(raw).expect("a valid name");
        if !names.contains(&name) {
            names.push(name);
        }
    }
    let mut ports = Vec::new();
    for _ in 0..u.int_in_range(0..=3)? {
        let p = fuzz_support::port(u)?;
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    let min_ttl = u.arbitrary()?;
    Ok(Config {
        mode: *u.choose(&[ShieldMode::Auto, ShieldMode::Hook])?,
        default_profiles: names,
        loopback_ports: ports,
        audit: AuditConfig {
            enabled: u.arbitrary()?,
            max_bytes: u.int_in_range(MIN_AUDIT_MAX_BYTES..=u64::MAX)?,
        },
        upstream_dns: if u.arbitrary()? {
            Some(fuzz_support::addr(u)?)
        } else {
            None
        },
        dns: DnsConfig {
            tier: *u.choose(&[
                DnsTier::Auto,
                DnsTier::Builtin,
                DnsTier::Dnsmasq,
                DnsTier::Static,
            ])?,
            min_ttl,
            max_ttl: u.int_in_range(min_ttl..=u32::MAX)?,
            cache_max_age: u.arbitrary()?,
        },
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = parse_config(Path::new("config.yml"), text) {
            check(&c);
        }
    }
    if let Ok(c) = generated(&mut Unstructured::new(data)) {
        check(&c);
    }
});
