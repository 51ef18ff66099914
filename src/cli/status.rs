//! `terok-shield status` without a container: the configuration this shield would apply.
//!
//! Answers "what will happen if I start a container now, and which files decide it?",
//! so every value is shown together with where it came from.

use serde_json::json;

use super::{print, Context, StatusArgs};
use crate::effects::profiles::{ProfileSource, ProfileStore};

/// Print the effective configuration as aligned text or as one JSON object.
pub fn run(args: &StatusArgs, ctx: &Context) -> anyhow::Result<()> {
    let store = ProfileStore::new(&ctx.paths.profiles_dir);
    let profiles = store.list()?;
    let config_exists = ctx.paths.config_file.is_file();
    let c = &ctx.config;
    let known = |name: &str| profiles.iter().any(|p| p.name.as_str() == name);

    if args.json {
        let value = json!({
            "version": env!("CARGO_PKG_VERSION"),
            "mode": c.mode.as_str(),
            "audit": { "enabled": c.audit.enabled },
            "default_profiles": c.default_profiles.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
            "missing_default_profiles": c.default_profiles.iter()
                .filter(|p| !known(p.as_str())).map(|p| p.as_str()).collect::<Vec<_>>(),
            "available_profiles": profiles.iter().map(|p| json!({
                "name": p.name.as_str(),
                "source": match &p.source { ProfileSource::Bundled => "bundled", ProfileSource::User(_) => "user" },
                "overrides_bundled": p.overrides_bundled,
            })).collect::<Vec<_>>(),
            "loopback_ports": c.loopback_ports,
            "upstream_dns": c.upstream_dns.map(|a| a.to_string()),
            "dns": {
                "tier": c.dns.tier.as_str(),
                "effective_tier": c.dns.tier.effective().name(),
                "min_ttl": c.dns.min_ttl,
                "max_ttl": c.dns.max_ttl,
                "cache_max_age": c.dns.cache_max_age,
            },
            "config_file": {
                "path": ctx.paths.config_file.display().to_string(),
                "exists": config_exists,
            },
            "profiles_dir": ctx.paths.profiles_dir.display().to_string(),
            "state_dir": ctx.paths.state_dir.display().to_string(),
        });
        return Ok(print(&format!("{}\n", serde_json::to_string(&value)?))?);
    }

    let list = |items: Vec<String>| {
        if items.is_empty() {
            "(none)".to_string()
        } else {
            items.join(", ")
        }
    };
    let defaults = list(
        c.default_profiles
            .iter()
            .map(|p| {
                if known(p.as_str()) {
                    p.to_string()
                } else {
                    format!("{p} (not found!)")
                }
            })
            .collect(),
    );
    let available = list(
        profiles
            .iter()
            .map(|p| match (&p.source, p.overrides_bundled) {
                (ProfileSource::Bundled, _) => p.name.to_string(),
                (ProfileSource::User(_), false) => format!("{} (user)", p.name),
                (ProfileSource::User(_), true) => format!("{} (user, overrides bundled)", p.name),
            })
            .collect(),
    );
    let rows = [
        ("mode", c.mode.as_str().to_string()),
        (
            "audit",
            if c.audit.enabled {
                "enabled"
            } else {
                "disabled"
            }
            .to_string(),
        ),
        ("default profiles", defaults),
        ("available profiles", available),
        (
            "loopback ports",
            list(c.loopback_ports.iter().map(|p| p.to_string()).collect()),
        ),
        (
            "upstream dns",
            c.upstream_dns
                .map(|a| a.to_string())
                .unwrap_or_else(|| "(the container's resolver)".to_string()),
        ),
        (
            "dns",
            format!(
                "tier {}{}, ttl {}..{} s, cache max age {} s",
                c.dns.tier.as_str(),
                if c.dns.tier.as_str() == c.dns.tier.effective().name() {
                    String::new()
                } else {
                    format!(" ({})", c.dns.tier.effective().name())
                },
                c.dns.min_ttl,
                c.dns.max_ttl,
                c.dns.cache_max_age
            ),
        ),
        (
            "config file",
            format!(
                "{} ({})",
                ctx.paths.config_file.display(),
                if config_exists {
                    "present"
                } else {
                    "absent; using defaults"
                }
            ),
        ),
        ("profiles dir", ctx.paths.profiles_dir.display().to_string()),
        ("state dir", ctx.paths.state_dir.display().to_string()),
    ];
    let mut out = String::new();
    for (key, value) in rows {
        out.push_str(&format!("{:<20}{value}\n", format!("{key}:")));
    }
    Ok(print(&out)?)
}
