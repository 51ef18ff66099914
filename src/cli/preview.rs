//! `terok-shield preview`: the ruleset a new container would get, printed, not applied.
//!
//! Runs the same generator the hook runs. Domains are not resolved here (preview has no side
//! effects and needs no network); they are listed in a comment instead. The DNS server and
//! host gateway are slirp4netns' defaults, since the real ones belong to a container.

use std::net::{IpAddr, Ipv4Addr};

use serde_json::json;

use super::{print, select_profiles, Context, PreviewArgs};
use crate::core::bundle::RuntimeFacts;
use crate::core::policy::{AllowRule, HostLoopback, Mode, Policy};
use crate::core::ruleset::Ruleset;
use crate::core::target::Host;

/// slirp4netns' resolver and host-loopback addresses: what a default rootless container uses.
const SLIRP_DNS: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 2, 3));
const SLIRP_GATEWAY: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 2, 2));

/// Print the ruleset for the chosen mode and profiles.
pub fn run(args: &PreviewArgs, ctx: &Context) -> anyhow::Result<()> {
    let mode = match (args.down, args.all, args.block) {
        (_, _, true) => Mode::Block,
        (true, true, _) => Mode::BypassAll,
        (true, false, _) => Mode::Bypass,
        _ => Mode::DenyAll,
    };
    let selected = select_profiles(&args.profiles, ctx)?;
    let facts = RuntimeFacts {
        dns_servers: vec![SLIRP_DNS],
        gateway: Some(SLIRP_GATEWAY),
    };
    let mut policy = Policy::new(mode);
    let mut domains = Vec::new();
    for t in &selected.entries {
        match &t.host {
            Host::Net(net) => policy.allow.push(AllowRule {
                net: *net,
                scope: t.scope,
            }),
            Host::Domain(_) => domains.push(t.to_string()),
        }
    }
    policy.dns_servers = facts.dns_servers.clone();
    if !ctx.config.loopback_ports.is_empty() {
        policy.host_loopback = Some(HostLoopback {
            gateway: SLIRP_GATEWAY,
            ports: ctx.config.loopback_ports.clone(),
        });
    }
    let ruleset = Ruleset::generate(&policy).to_nft();
    let notices: Vec<String> = selected.notices.iter().map(|n| n.to_string()).collect();
    if args.json {
        let value = json!({
            "mode": mode.status_name(),
            "profiles": selected.names.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
            "domains": domains,
            "notices": notices,
            "ruleset": ruleset,
        });
        return Ok(print(&format!("{}\n", serde_json::to_string(&value)?))?);
    }
    for n in &notices {
        eprintln!("terok-shield: notice: {n}");
    }
    let mut out = format!(
        "# terok-shield preview: mode {}, profiles {}\n# DNS {SLIRP_DNS} and host gateway {SLIRP_GATEWAY} are slirp4netns defaults; the hook uses the container's own.\n",
        mode.status_name(),
        selected.names.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", "),
    );
    if !domains.is_empty() {
        out.push_str("# Domains, whose addresses are added when the container starts:\n");
        for d in &domains {
            out.push_str(&format!("#   {d}\n"));
        }
    }
    out.push_str(&ruleset);
    Ok(print(&out)?)
}
