//! Live control of a running container: `allow`, `deny`, `up`, `down`, `block`.
//!
//! Every command takes the bundle lock, computes the new bundle (pure), saves it atomically,
//! then moves the live firewall from the old policy to the new one and verifies it. If the
//! firewall cannot be updated, the old bundle is put back: nothing is half-applied. Revoking
//! commands then cut open connections (conntrack flush in the container's namespace).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::json;

use super::inspect::{live, Live};
use super::prepare::upstream_servers;
use super::{print, Context};
use crate::core::bundle::{Bundle, ContainerName, DnsTier, Resolved};
use crate::core::policy::Mode;
use crate::core::policy::Policy;
use crate::core::ruleset::{sets, Element, Ruleset};
use crate::core::target::{display_net, Host, Target};
use crate::effects::audit;
use crate::effects::conntrack;
use crate::effects::dns_client::{resolve_all, ResolverConfig};
use crate::effects::firewall::{apply, check, update};
use crate::effects::netns::NsFiles;
use crate::effects::nfnetlink::{NfSock, SetKey};
use crate::effects::nft::Nft;
use crate::effects::state::{lock_dir, save_bundle};

/// What a live command changes.
pub enum Change {
    Allow(String),
    Deny(String),
    Mode(Mode),
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
    if let (DnsTier::Dnsmasq, Change::Allow(_), Some(t)) = (old.dns_tier, &change, &target) {
        if let Host::Domain(d) = &t.host {
            crate::core::dnsmasq::check_live_allow(
                &crate::core::dns_policy::DnsPolicy::from_bundle(&old),
                d,
                t.scope.is_some(),
            )?;
        }
    }
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
                // A resolver in the container answers these names as they are asked, with
                // their TTLs; nothing to look up now.
                Host::Domain(_) if old.dns_tier != DnsTier::Static && !old.resolves_ahead(&t) => {
                    None
                }
                Host::Domain(d) if !d.wildcard => {
                    let addrs = resolve_now(&d.name, ctx)?;
                    addresses = addrs.iter().map(ToString::to_string).collect();
                    Some(Resolved {
                        addrs,
                        at: crate::effects::audit::unix_secs(),
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
    if new.dns_tier == DnsTier::Dnsmasq {
        // Refuse what dnsmasq cannot enforce before anything changes.
        crate::core::dnsmasq::check(&crate::core::dns_policy::DnsPolicy::from_bundle(&new))?;
    }

    let facts = running.runtime.facts();
    let mut path = "nft";
    // Order so that a crash in between always leaves the firewall at most as open as the
    // saved state says: widening saves first, narrowing enforces first.
    if revokes {
        update(&running.nft, &old.policy(&facts), &new.policy(&facts))
            .context("nothing was changed")?;
        save_bundle(&running.dir, &new)?;
    } else {
        save_bundle(&running.dir, &new)?;
        let (old_policy, new_policy) = (old.policy(&facts), new.policy(&facts));
        let result = match addresses_added(&old_policy, &new_policy) {
            // Addresses into hash sets: netlink messages from inside the container's
            // namespaces instead of rewriting the sets with nft (milliseconds saved).
            Some(additions) => fast_add(&running, &additions, &old_policy, &new_policy),
            None => update(&running.nft, &old_policy, &new_policy)
                .map(|_| "nft")
                .map_err(anyhow::Error::from),
        };
        if let Ok(p) = result {
            path = p;
        }
        if let Err(e) = result {
            // Put the old decisions back so the bundle matches what is (still) enforced.
            let restored = save_bundle(&running.dir, &old);
            return Err(match restored {
                Ok(()) => e.context("nothing was changed"),
                Err(r) => e.context(format!("and the previous state could not be restored: {r}")),
            });
        }
    }
    if let (DnsTier::Dnsmasq, Some((pid, start))) = (new.dns_tier, running.runtime.resolver) {
        // The supervisor rewrites the servers file from the saved bundle; dnsmasq re-reads it.
        // A dead supervisor is already reported by `status`.
        crate::effects::procfs::signal_if_same(pid, start, rustix::process::Signal::HUP);
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
        json!({"target": text, "addresses": addresses, "mode": new.mode.status_name(), "path": path}),
    );
    if json_out {
        let v = json!({"container": name.as_str(), "action": event, "target": text, "addresses": addresses, "mode": new.mode.status_name()});
        return Ok(print(&format!("{}\n", serde_json::to_string(&v)?))?);
    }
    let line = match &change {
        Change::Allow(_) if addresses.is_empty() => format!(
            "{verb} {text} for {name} (its addresses open as the container's resolver answers for it)\n"
        ),
        Change::Allow(_) => format!("{verb} {text} -> {} for {name}\n", addresses.join(", ")),
        Change::Deny(_) if addresses.is_empty() => format!("{verb} {text} for {name}\n"),
        Change::Deny(_) => format!("{verb} {text} ({}) for {name}\n", addresses.join(", ")),
        Change::Mode(m) => format!("{name} is now {}\n", describe(*m)),
    };
    Ok(print(&line)?)
}

/// If `new` differs from `old` only by more addresses in `allow_v4` / `allow_v6` (an allowed
/// address, or a domain's addresses), those additions per set.
fn addresses_added(old: &Policy, new: &Policy) -> Option<Vec<(&'static str, Vec<SetKey>)>> {
    let (a, b) = (Ruleset::generate(old), Ruleset::generate(new));
    if a.chains != b.chains {
        return None;
    }
    let mut out = Vec::new();
    for (x, y) in a.sets.iter().zip(&b.sets) {
        if x.elements == y.elements {
            continue;
        }
        if !x.elements.iter().all(|e| y.elements.contains(e)) {
            return None; // something was removed or merged: not a pure addition
        }
        let keys: Option<Vec<SetKey>> = y
            .elements
            .iter()
            .filter(|e| !x.elements.contains(e))
            .map(|e| match (x.name, e) {
                (sets::ALLOW_V4, Element::Addr(IpAddr::V4(a))) => Some(SetKey::V4(*a)),
                (sets::ALLOW_V6, Element::Addr(IpAddr::V6(a))) => Some(SetKey::V6(*a)),
                _ => None,
            })
            .collect();
        out.push((x.name, keys?));
    }
    (!out.is_empty()).then_some(out)
}

/// Add elements from inside the container's namespaces, then verify the whole table.
///
/// Joining a user namespace needs a single-threaded process: the CLI has started no thread
/// yet, which is checked; otherwise (or if anything fails) the regular path is used.
fn fast_add(
    running: &Live,
    additions: &[(&'static str, Vec<SetKey>)],
    old: &Policy,
    new: &Policy,
) -> anyhow::Result<&'static str> {
    let single_threaded = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l == "Threads:\t1"));
    let pid = running.runtime.pid;
    let slow = || {
        update(&running.nft, old, new)
            .map(|_| "nft")
            .map_err(anyhow::Error::from)
    };
    if !single_threaded {
        return slow();
    }
    let ns = NsFiles::open(
        Some(&PathBuf::from(format!("/proc/{pid}/ns/user"))),
        Some(&PathBuf::from(format!("/proc/{pid}/ns/net"))),
    )?;
    ns.enter()
        .context("cannot enter the container's namespaces")?;
    // From here on this process lives in the container's namespaces: nft needs no joining.
    let local = Nft::locate()?;
    let added = NfSock::open().and_then(|mut sock| {
        additions
            .iter()
            .try_for_each(|(set, keys)| sock.add_elements(set, keys, None))
    });
    if added.is_ok() && check(&local, new).is_ok() {
        return Ok("netlink");
    }
    apply(&local, new)
        .map(|_| "nft")
        .context("the firewall could not be updated")
}

fn describe(mode: Mode) -> &'static str {
    match mode {
        Mode::DenyAll => "up: only allowlisted destinations are reachable",
        Mode::Bypass => "down: public egress is accepted and logged; private ranges and denies stay blocked",
        Mode::BypassAll => "down --all: all egress is accepted and logged, private ranges included; denies stay blocked",
        Mode::Block => "blocked: nothing but loopback",
    }
}
