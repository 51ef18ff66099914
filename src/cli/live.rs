//! Live control of a running container: `allow`, `deny`, `up`, `down`, `block` (alias
//! `quarantine`) and `reset`.
//!
//! Parse, then under the bundle lock gather what the planner needs (the saved bundle, the
//! runtime facts, a DNS lookup when it asks for one, the learned set elements for `reset`),
//! let [`crate::core::live::plan`] decide everything, have [`crate::effects::live::execute`]
//! carry the plan out, and print its report.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::{Map, Value};

use super::inspect::live;
use super::prepare::upstream_servers;
use super::{print, Context};
use crate::core::bundle::{ContainerName, Resolved};
use crate::core::live::{lookup_needed, plan, LiveChange, Observed};
use crate::core::policy::Mode;
use crate::core::profile::ProfileName;
use crate::core::target::{DomainName, Target};
use crate::core::verify::learned_elements;
use crate::effects::dns_client::{resolve_all, ResolverConfig};
use crate::effects::live::{execute, report_fields, Container};
use crate::effects::profiles::ProfileStore;
use crate::effects::state::{load_bundle, lock_dir};

/// A live command as typed.
pub enum Change {
    Allow(String),
    /// `allow TARGET --save-to PROFILE`.
    AllowAndSave {
        target: String,
        profile: String,
    },
    Deny(String),
    Mode(Mode),
    Reset,
}

/// Resolve a domain now (A and AAAA) for `allow` in the static tier.
fn resolve_now(name: &DomainName, ctx: &Context) -> anyhow::Result<Vec<IpAddr>> {
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

fn parse_target(typed: &str) -> anyhow::Result<Target> {
    Target::parse(typed).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Run one live change and report it.
pub fn run(name: &str, change: Change, json_out: bool, ctx: &Context) -> anyhow::Result<()> {
    let name = ContainerName::new(name)?;
    // Parse before anything else: bad input changes nothing.
    let mut save_to = None;
    let change = match change {
        Change::AllowAndSave { target, profile } => {
            save_to = Some(ProfileName::new(&profile)?);
            LiveChange::Allow {
                target: parse_target(&target)?,
                typed: target,
            }
        }
        Change::Allow(typed) => LiveChange::Allow {
            target: parse_target(&typed)?,
            typed,
        },
        Change::Deny(typed) => LiveChange::Deny {
            target: parse_target(&typed)?,
            typed,
        },
        Change::Mode(mode) => LiveChange::Mode(mode),
        Change::Reset => LiveChange::Reset,
    };
    let running = live(&name, ctx)?;
    let _lock = lock_dir(&running.dir)?;
    // Re-read under the lock: another command may have changed the bundle meanwhile.
    let old = load_bundle(&running.dir, &name)?;
    let mut observed = Observed::default();
    if let Some(domain) = lookup_needed(&old, &change)? {
        observed.resolved = Some(Resolved {
            addrs: resolve_now(&domain, ctx)?,
            at: crate::effects::audit::unix_secs(),
        });
    }
    if change == LiveChange::Reset {
        let table = running
            .nft
            .list_table_json()
            .context("cannot read the container's firewall; nothing was changed")?;
        observed.learned = table
            .map(|t| learned_elements(&t).into_iter().map(|(a, _)| a).collect())
            .unwrap_or_default();
    }
    // `--save-to`: the profile with the entry is prepared (not written) so that the plan can
    // include it; it is written once the plan stands, before the change is made.
    let mut edit = None;
    let change = match (change, save_to) {
        (LiveChange::Allow { target, typed }, Some(profile)) => {
            let store = ProfileStore::new(&ctx.paths.profiles_dir);
            let comment = format!(
                "saved for {name} on {}",
                crate::core::audit::rfc3339_utc(crate::effects::audit::unix_millis())
            );
            let prepared = store.add_entry(&profile, &target, &comment)?;
            let change = LiveChange::SaveAllow {
                target,
                typed,
                profile_entries: prepared.profile.entries.clone(),
                profile,
            };
            edit = Some(prepared);
            change
        }
        (change, _) => change,
    };
    let plan = plan(&old, &running.runtime.facts(), &change, &observed)?;
    if let Some(edit) = &edit {
        edit.write()?;
    }
    let executed = execute(
        &plan,
        &old,
        &Container {
            name: &name,
            dir: &running.dir,
            pid: running.runtime.pid,
            nft: &running.nft,
            resolver: running.runtime.resolver,
        },
    );
    if let (Err(e), Some(edit)) = (executed.as_ref(), &edit) {
        bail!(
            "{}; the entry was saved in {} all the same: remove its line there if it should not stay",
            super::render_error(e),
            edit.path.display()
        );
    }
    executed?;
    if json_out {
        let mut v = Map::new();
        v.insert("container".into(), Value::from(name.as_str()));
        v.insert("action".into(), Value::from(plan.report.event));
        v.extend(report_fields(&plan, []));
        return Ok(print(&format!("{}\n", Value::Object(v)))?);
    }
    Ok(print(&plan.report.message)?)
}
