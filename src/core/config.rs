//! `config.yml`: the user's standing choices, parsed into typed values without any I/O.
//!
//! The keys of the Python tool (`mode`, `default_profiles`, `loopback_ports`, `audit`) keep
//! their meaning so an existing file works unchanged; `upstream_dns` and `dns` are ours.
//! Unknown keys are refused rather than ignored: a typo such as `mod: hook` must not silently
//! leave the firewall in a mode the user did not choose.

use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;
use thiserror::Error;

use super::profile::ProfileName;

/// The profile applied when neither the command line nor `config.yml` names one.
pub const DEFAULT_PROFILE: &str = "dev-standard";

/// How the firewall gets attached to containers (`mode` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShieldMode {
    /// Pick the best mechanism available on this host.
    #[default]
    Auto,
    /// Always use the OCI hook.
    Hook,
}

impl ShieldMode {
    /// The spelling used in `config.yml` and in `status` output.
    pub fn as_str(self) -> &'static str {
        match self {
            ShieldMode::Auto => "auto",
            ShieldMode::Hook => "hook",
        }
    }
}

/// Which DNS machinery keeps domain allowlists current (`dns.tier` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsTier {
    /// The best tier this host supports.
    #[default]
    Auto,
    /// The shield's own filtering resolver.
    Builtin,
    /// A per-container dnsmasq with nftset support.
    Dnsmasq,
    /// Resolve once before start; addresses never refresh.
    Static,
}

impl DnsTier {
    /// The spelling used in `config.yml` and in `status` output.
    pub fn as_str(self) -> &'static str {
        match self {
            DnsTier::Auto => "auto",
            DnsTier::Builtin => "builtin",
            DnsTier::Dnsmasq => "dnsmasq",
            DnsTier::Static => "static",
        }
    }
    /// The tier a container prepared now gets: `auto` is the builtin resolver, which needs
    /// nothing from the host.
    pub fn effective(self) -> super::bundle::DnsTier {
        match self {
            DnsTier::Auto | DnsTier::Builtin => super::bundle::DnsTier::Builtin,
            DnsTier::Dnsmasq => super::bundle::DnsTier::Dnsmasq,
            DnsTier::Static => super::bundle::DnsTier::Static,
        }
    }
}

/// The `audit:` section: whether per-container JSON-lines audit logs are written, and how
/// large one grows before it is rotated (`max_bytes`, ours; the Python tool has no cap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditConfig {
    pub enabled: bool,
    /// audit.jsonl is rotated to audit.jsonl.1 before it grows past this many bytes.
    pub max_bytes: u64,
}

/// Smallest accepted `audit.max_bytes`: room for a good number of lines.
pub const MIN_AUDIT_MAX_BYTES: u64 = 64 * 1024;

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: true,
            max_bytes: 8 << 20,
        }
    }
}

/// The `dns:` section: resolver tier and how long resolved addresses stay allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsConfig {
    pub tier: DnsTier,
    /// Lower bound (seconds) on how long an answer keeps its addresses open, so very short
    /// upstream TTLs do not churn the ruleset.
    pub min_ttl: u32,
    /// Upper bound (seconds), so a rotated-away address does not stay open for days.
    pub max_ttl: u32,
    /// Seconds a cached answer may be reused when the upstream resolver cannot be reached.
    pub cache_max_age: u32,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            tier: DnsTier::Auto,
            min_ttl: 60,
            max_ttl: 3600,
            cache_max_age: 3600,
        }
    }
}

/// The whole validated `config.yml`; `Config::default()` is what an absent or empty file means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub mode: ShieldMode,
    /// Profiles applied when a command does not pass `--profiles`; empty means none.
    pub default_profiles: Vec<ProfileName>,
    /// Host TCP ports containers may reach through the host-loopback gateway.
    pub loopback_ports: Vec<u16>,
    pub audit: AuditConfig,
    /// Resolver the shield forwards allowed queries to; `None` means the container's own.
    pub upstream_dns: Option<IpAddr>,
    pub dns: DnsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: ShieldMode::default(),
            default_profiles: vec![
                ProfileName::new(DEFAULT_PROFILE).expect("the default profile name is valid")
            ],
            loopback_ports: Vec::new(),
            audit: AuditConfig::default(),
            upstream_dns: None,
            dns: DnsConfig::default(),
        }
    }
}

/// Why `config.yml` was refused; every message names the file, the key and the fix.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// YAML syntax, an unknown key or a value of the wrong type (serde's message names the
    /// key and the line).
    #[error("{path}: {message}; fix or remove that key (accepted keys: mode, default_profiles, loopback_ports, audit.enabled, audit.max_bytes, upstream_dns, dns.tier, dns.min_ttl, dns.max_ttl, dns.cache_max_age)")]
    Syntax { path: String, message: String },
    /// A well-typed value that is still not acceptable.
    #[error("{path}: `{key}`: {problem}; {fix}")]
    Invalid {
        path: String,
        key: String,
        problem: String,
        fix: &'static str,
    },
}

/// The file as written: plain types only, so serde reports type errors with the key name.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    mode: ShieldMode,
    default_profiles: Option<Vec<String>>,
    loopback_ports: Vec<i64>,
    audit: RawAudit,
    upstream_dns: Option<String>,
    dns: RawDns,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAudit {
    enabled: bool,
    max_bytes: u64,
}

impl Default for RawAudit {
    fn default() -> Self {
        let d = AuditConfig::default();
        RawAudit {
            enabled: d.enabled,
            max_bytes: d.max_bytes,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDns {
    tier: DnsTier,
    min_ttl: u32,
    max_ttl: u32,
    cache_max_age: u32,
}

impl Default for RawDns {
    fn default() -> Self {
        let d = DnsConfig::default();
        RawDns {
            tier: d.tier,
            min_ttl: d.min_ttl,
            max_ttl: d.max_ttl,
            cache_max_age: d.cache_max_age,
        }
    }
}

/// Parse the text of `config.yml`. `path` is used only to make messages point at the file.
///
/// An empty file (or one holding only comments) yields `Config::default()`.
pub fn parse_config(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let shown = path.display().to_string();
    let syntax = |e: serde_norway::Error| ConfigError::Syntax {
        path: shown.clone(),
        message: e.to_string(),
    };
    // Checked first so a list or a bare word at top level gets a plain-language message
    // instead of serde's "expected struct".
    match serde_norway::from_str::<serde_norway::Value>(text).map_err(syntax)? {
        serde_norway::Value::Null | serde_norway::Value::Mapping(_) => {}
        _ => {
            return Err(ConfigError::Invalid {
                path: shown.clone(),
                key: "(top level)".to_string(),
                problem: "the file is not a mapping of keys".to_string(),
                fix: "write one `key: value` per line, e.g. `mode: auto`, or empty the file to use the defaults",
            })
        }
    }
    let raw: Option<RawConfig> = serde_norway::from_str(text).map_err(syntax)?;
    let raw = raw.unwrap_or_default();
    let invalid = |key: String, problem: String, fix: &'static str| ConfigError::Invalid {
        path: shown.clone(),
        key,
        problem,
        fix,
    };

    let default_profiles = match raw.default_profiles {
        None => Config::default().default_profiles,
        Some(names) => {
            let mut out: Vec<ProfileName> = Vec::with_capacity(names.len());
            for (i, name) in names.iter().enumerate() {
                let name = ProfileName::new(name).map_err(|e| {
                    invalid(
                        format!("default_profiles[{i}]"),
                        e.to_string(),
                        "use the name of a bundled profile or of a file NAME.txt in the profiles directory",
                    )
                })?;
                if !out.contains(&name) {
                    out.push(name);
                }
            }
            out
        }
    };

    let mut loopback_ports: Vec<u16> = Vec::with_capacity(raw.loopback_ports.len());
    for (i, port) in raw.loopback_ports.iter().enumerate() {
        let port = u16::try_from(*port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                invalid(
                    format!("loopback_ports[{i}]"),
                    format!("{port} is not a TCP port"),
                    "use numbers from 1 to 65535",
                )
            })?;
        if !loopback_ports.contains(&port) {
            loopback_ports.push(port);
        }
    }

    let upstream_dns = match raw.upstream_dns {
        None => None,
        Some(text) => Some(text.trim().parse::<IpAddr>().map_err(|_| {
            invalid(
                "upstream_dns".to_string(),
                format!("`{text}` is not an IP address"),
                "write the resolver's address, e.g. 192.0.2.53 or 2001:db8::53, or remove the key to use the container's resolver",
            )
        })?),
    };

    if raw.dns.min_ttl > raw.dns.max_ttl {
        return Err(invalid(
            "dns.min_ttl".to_string(),
            format!(
                "min_ttl ({}) is greater than max_ttl ({})",
                raw.dns.min_ttl, raw.dns.max_ttl
            ),
            "make dns.min_ttl less than or equal to dns.max_ttl",
        ));
    }

    if raw.audit.max_bytes < MIN_AUDIT_MAX_BYTES {
        return Err(invalid(
            "audit.max_bytes".to_string(),
            format!("{} bytes is too small", raw.audit.max_bytes),
            "use at least 65536 (the default is 8388608, 8 MiB)",
        ));
    }

    Ok(Config {
        mode: raw.mode,
        default_profiles,
        loopback_ports,
        audit: AuditConfig {
            enabled: raw.audit.enabled,
            max_bytes: raw.audit.max_bytes,
        },
        upstream_dns,
        dns: DnsConfig {
            tier: raw.dns.tier,
            min_ttl: raw.dns.min_ttl,
            max_ttl: raw.dns.max_ttl,
            cache_max_age: raw.dns.cache_max_age,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        parse_config(Path::new("/home/u/.config/terok/shield/config.yml"), text)
    }

    fn err(text: &str) -> String {
        parse(text).expect_err(text).to_string()
    }

    #[test]
    fn empty_and_comment_only_files_mean_defaults() {
        for text in ["", "\n", "# nothing here\n", "---\n", "~\n"] {
            assert_eq!(parse(text).unwrap(), Config::default(), "{text:?}");
        }
        let d = Config::default();
        assert_eq!(d.mode, ShieldMode::Auto);
        assert_eq!(
            d.default_profiles,
            [ProfileName::new("dev-standard").unwrap()]
        );
        assert!(d.loopback_ports.is_empty());
        assert!(d.audit.enabled);
        assert_eq!(d.upstream_dns, None);
        assert_eq!(
            d.dns,
            DnsConfig {
                tier: DnsTier::Auto,
                min_ttl: 60,
                max_ttl: 3600,
                cache_max_age: 3600
            }
        );
    }

    #[test]
    fn every_key_is_read() {
        let c = parse(
            "mode: hook\n\
             default_profiles: [base, dev-python, base]\n\
             loopback_ports:\n  - 8080\n  - 5432\n  - 8080\n\
             audit:\n  enabled: false\n  max_bytes: 1048576\n\
             upstream_dns: 2001:db8::53\n\
             dns:\n  tier: dnsmasq\n  min_ttl: 5\n  max_ttl: 600\n  cache_max_age: 120\n",
        )
        .unwrap();
        assert_eq!(c.mode, ShieldMode::Hook);
        let names: Vec<&str> = c.default_profiles.iter().map(|p| p.as_str()).collect();
        assert_eq!(names, ["base", "dev-python"]);
        assert_eq!(c.loopback_ports, [8080, 5432]);
        assert!(!c.audit.enabled);
        assert_eq!(c.audit.max_bytes, 1 << 20);
        assert_eq!(c.upstream_dns, Some("2001:db8::53".parse().unwrap()));
        assert_eq!(c.dns.tier, DnsTier::Dnsmasq);
        assert_eq!(
            (c.dns.min_ttl, c.dns.max_ttl, c.dns.cache_max_age),
            (5, 600, 120)
        );
    }

    #[test]
    fn partial_sections_keep_other_defaults() {
        let c = parse("dns:\n  tier: static\naudit: {}\n").unwrap();
        assert_eq!(c.dns.tier, DnsTier::Static);
        assert_eq!(c.dns.max_ttl, 3600);
        assert!(c.audit.enabled);
        assert_eq!(c.audit.max_bytes, AuditConfig::default().max_bytes);
        assert_eq!(c.default_profiles, Config::default().default_profiles);
        for tier in ["auto", "builtin", "dnsmasq", "static"] {
            let c = parse(&format!("dns: {{tier: {tier}}}\n")).unwrap();
            assert_eq!(c.dns.tier.as_str(), tier);
        }
    }

    #[test]
    fn a_tiny_audit_cap_is_refused() {
        let msg = err("audit: {max_bytes: 100}\n");
        assert!(msg.contains("audit.max_bytes"), "{msg}");
        assert!(msg.contains("at least 65536"), "{msg}");
        assert!(err("audit: {max_bytes: -1}\n").contains("max_bytes"));
    }

    #[test]
    fn explicit_empty_profile_list_means_none() {
        assert!(parse("default_profiles: []\n")
            .unwrap()
            .default_profiles
            .is_empty());
    }

    #[test]
    fn unknown_keys_are_refused_with_path_and_fix() {
        let msg = err("mod: hook\n");
        assert!(
            msg.starts_with("/home/u/.config/terok/shield/config.yml: "),
            "{msg}"
        );
        assert!(msg.contains("unknown field `mod`"), "{msg}");
        assert!(msg.contains("fix or remove that key"), "{msg}");
        let msg = err("audit:\n  enable: true\n");
        assert!(msg.contains("enable"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
        assert!(err("dns:\n  ttl: 5\n").contains("unknown field `ttl`"));
    }

    #[test]
    fn wrong_types_name_the_key_and_the_expected_type() {
        let msg = err("audit:\n  enabled: maybe\n");
        assert!(msg.contains("audit.enabled"), "{msg}");
        assert!(msg.contains("boolean"), "{msg}");
        let msg = err("default_profiles: dev-standard\n");
        assert!(msg.contains("default_profiles"), "{msg}");
        assert!(msg.contains("sequence"), "{msg}");
        let msg = err("mode: firewall\n");
        assert!(msg.contains("mode"), "{msg}");
        assert!(msg.contains("`auto` or `hook`"), "{msg}");
        let msg = err("dns:\n  min_ttl: soon\n");
        assert!(msg.contains("dns.min_ttl"), "{msg}");
        assert!(err("loopback_ports: [http]\n").contains("loopback_ports"));
        assert!(err("- a\n- b\n").contains("not a mapping of keys"));
        assert!(err("just words\n").contains("not a mapping of keys"));
        assert!(err("mode: [\n").contains("config.yml"));
    }

    #[test]
    fn bad_profile_names_are_refused() {
        let msg = err("default_profiles: [dev-standard, ../etc/passwd]\n");
        assert!(msg.contains("default_profiles[1]"), "{msg}");
        assert!(msg.contains("invalid profile name"), "{msg}");
        assert!(err("default_profiles: ['']\n").contains("default_profiles[0]"));
    }

    #[test]
    fn bad_ports_are_refused() {
        for bad in ["0", "-1", "65536", "100000"] {
            let msg = err(&format!("loopback_ports: [22, {bad}]\n"));
            assert!(msg.contains("loopback_ports[1]"), "{msg}");
            assert!(msg.contains("1 to 65535"), "{msg}");
        }
        assert_eq!(
            parse("loopback_ports: [1, 65535]\n")
                .unwrap()
                .loopback_ports,
            [1, 65535]
        );
    }

    #[test]
    fn upstream_dns_must_be_an_address() {
        let msg = err("upstream_dns: dns.example\n");
        assert!(msg.contains("`upstream_dns`"), "{msg}");
        assert!(msg.contains("not an IP address"), "{msg}");
        assert_eq!(
            parse("upstream_dns: 192.0.2.53\n").unwrap().upstream_dns,
            Some("192.0.2.53".parse().unwrap())
        );
        assert_eq!(parse("upstream_dns: null\n").unwrap().upstream_dns, None);
    }

    #[test]
    fn ttl_bounds_must_be_ordered() {
        let msg = err("dns: {min_ttl: 600, max_ttl: 60}\n");
        assert!(msg.contains("dns.min_ttl"), "{msg}");
        assert!(msg.contains("less than or equal"), "{msg}");
        assert!(parse("dns: {min_ttl: 60, max_ttl: 60}\n").is_ok());
        assert!(err("dns: {max_ttl: 30}\n").contains("greater than max_ttl"));
        assert!(err("dns: {min_ttl: -1}\n").contains("dns.min_ttl"));
    }
}
