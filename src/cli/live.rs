//! Live control of a running container: `allow`, `deny`, `up`, `down`, `block`.
//!
//! Every command takes the bundle lock, computes the new bundle (pure), saves it atomically,
//! then moves the live firewall from the old policy to the new one and verifies it. If the
//! firewall cannot be updated, the old bundle is put back: nothing is half-applied. Revoking
//! commands then cut open connections (conntrack flush in the container's namespace).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use serde_json::json;

use super::inspect::live;
use super::prepare::upstream_servers;
use super::{print, Context};
use crate::core::bundle::{Bundle, ContainerName, Resolved, RuntimeFacts};
use crate::core::policy::Mode;
use crate::core::target::{display_net, Host, Target};
use crate::effects::audit;
use crate::effects::conntrack;
use crate::effects::dns_client::{resolve_all, ResolverConfig};
use crate::effects::firewall::update;
use crate::effects::state::{lock_dir, save_bundle};

/// What a live command changes.
pub enum Change {
    Allow(String),
    Deny(String),
    Mode(Mode),
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Resolve a domain now (A and AAAA) for `allow`.
fn resolve_now(
    name: &crate::core::target::DomainName,
    ctx: &Context,
) -> anyhow::Result<Vec<IpAddr>> {
    let servers = upstream_servers(ctx);
    if servers.is_empty() {
        bail!("no DNS server to resolve {name}: set upstream_dns in config.yml or add a nameserver to /etc/resolv.conf");
    }
    let cfg = ResolverConfig {
        servers,
        timeout: Duration::from_secs(3),
        attempts: 2,
    };
    let result = resolve_all(&cfg, std::slice::from_ref(name))?
        .into_iter()
        .next()
        .context("resolver returned no result")?;
    if result.addrs.is_empty() {
        bail!(
            "{name} did not resolve ({}); nothing was changed",
            result.error.unwrap_or_else(|| "no addresses".into())
        );
    }
    Ok(result.addrs)
}

/// Run one live change and report it.
pub fn run(name: &str, change: Change, json_out: bool, ctx: &Context) -> anyhow::Result<()> {
    let name = ContainerName::new(name)?;
    // Parse before anything else: bad input changes nothing.
    let target = match &change {
        Change::Allow(t) | Change::Deny(t) => {
            Some(Target::parse(t).map_err(|e| anyhow::anyhow!("{e}"))?)
        }
        Change::Mode(_) => None,
    };
    let running = live(&name, ctx)?;
    let _lock = lock_dir(&running.dir)?;
    // Re-read under the lock: another command may have changed the bundle meanwhile.
    let old: Bundle = crate::effects::state::load_bundle(&running.dir, &name)?;
    let mut new = old.clone();
    let mut addresses: Vec<String> = Vec::new();
    let revokes;
    match (&change, target) {
        (Change::Allow(_), Some(t)) => {
            if t.scope.is_some() && old.is_denied_host(&t) {
                let host = Target {
                    host: t.host.clone(),
                    scope: None,
                };
                bail!("{host} is denied, and a deny covers every port; `terok-shield allow {name} {host}` lifts it");
            }
            let resolved = match &t.host {
                Host::Domain(d) if !d.wildcard => {
                    let addrs = resolve_now(&d.name, ctx)?;
                    addresses = addrs.iter().map(ToString::to_string).collect();
                    Some(Resolved {
                        addrs,
                        at: now_secs(),
                    })
                }
                Host::Domain(_) => {
                    bail!("wildcard domains cannot be allowed live in the static DNS tier (nothing to resolve); allow the exact names instead")
                }
                Host::Net(n) => {
                    addresses.push(display_net(n));
                    None
                }
            };
            new.live_allow(t, resolved);
            revokes = false;
        }
        (Change::Deny(_), Some(t)) => {
            if t.scope.is_some() {
                bail!("deny takes a host without a port ({t}): a deny removes the host entirely");
            }
            addresses = match &t.host {
                Host::Net(n) => vec![display_net(n)],
                Host::Domain(d) => old
                    .resolved
                    .get(&d.name)
                    .map(|r| r.addrs.iter().map(ToString::to_string).collect())
                    .unwrap_or_default(),
            };
            new.live_deny(t);
            revokes = true;
        }
        (Change::Mode(mode), _) => {
            new.mode = *mode;
            revokes = *mode != Mode::Bypass && *mode != Mode::BypassAll;
        }
        _ => unreachable!("targets come with allow and deny"),
    }

    let facts = RuntimeFacts {
        dns_servers: running.runtime.dns_servers.clone(),
        gateway: running.runtime.gateway,
    };
    // Order so that a crash in between always leaves the firewall at most as open as the
    // saved state says: widening saves first, narrowing enforces first.
    if revokes {
        update(&running.nft, &old.policy(&facts), &new.policy(&facts))
            .context("nothing was changed")?;
        save_bundle(&running.dir, &new)?;
    } else {
        save_bundle(&running.dir, &new)?;
        if let Err(e) = update(&running.nft, &old.policy(&facts), &new.policy(&facts)) {
            // Put the old decisions back so the bundle matches what is (still) enforced.
            let restored = save_bundle(&running.dir, &old);
            let e = anyhow::Error::from(e);
            return Err(match restored {
                Ok(()) => e.context("nothing was changed"),
                Err(r) => e.context(format!("and the previous state could not be restored: {r}")),
            });
        }
    }
    if revokes {
        let pid = running.runtime.pid;
        conntrack::revoke_in(
            Some(&PathBuf::from(format!("/proc/{pid}/ns/user"))),
            &PathBuf::from(format!("/proc/{pid}/ns/net")),
            &running.dir,
            name.as_str(),
        )?;
    }

    let (event, verb, text) = match &change {
        Change::Allow(t) => ("allow", "Allowed", t.clone()),
        Change::Deny(t) => ("deny", "Denied", t.clone()),
        Change::Mode(m) => ("mode", "Mode", m.status_name().to_string()),
    };
    audit::record(
        &running.dir,
        new.audit_enabled,
        &name,
        event,
        true,
        json!({"target": text, "addresses": addresses, "mode": new.mode.status_name()}),
    );
    if json_out {
        let v = json!({"container": name.as_str(), "action": event, "target": text, "addresses": addresses, "mode": new.mode.status_name()});
        return Ok(print(&format!("{}\n", serde_json::to_string(&v)?))?);
    }
    let line = match &change {
        Change::Allow(_) => format!("{verb} {text} -> {} for {name}\n", addresses.join(", ")),
        Change::Deny(_) if addresses.is_empty() => format!("{verb} {text} for {name}\n"),
        Change::Deny(_) => format!("{verb} {text} ({}) for {name}\n", addresses.join(", ")),
        Change::Mode(m) => format!("{name} is now {}\n", describe(*m)),
    };
    Ok(print(&line)?)
}

fn describe(mode: Mode) -> &'static str {
    match mode {
        Mode::DenyAll => "up: only allowlisted destinations are reachable",
        Mode::Bypass => "down: public egress is accepted and logged; private ranges and denies stay blocked",
        Mode::BypassAll => "down --all: all egress is accepted and logged, private ranges included; denies stay blocked",
        Mode::Block => "blocked: nothing but loopback",
    }
}
