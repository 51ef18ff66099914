//! `status NAME`, `rules NAME`: looking at shielded containers (`logs` is in `observe`).
//!
//! The container is reached directly: the PID the hook recorded (checked against its start
//! time, so a reused PID is never mistaken for the container), then nft run inside the
//! container's user and network namespaces, with no `podman unshare` round trip.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use serde_json::json;

use super::{print, Context};
use crate::core::bundle::{Bundle, ContainerName};
use crate::core::status::{without_live_shield, PodmanView, Verdict};
use crate::effects::firewall::{check, FirewallError};
use crate::effects::nft::Nft;
use crate::effects::procfs::is_same_process;
use crate::effects::state::{read_runtime, RuntimeRecord, StateStore, STATE_FILE};

/// A running shielded container, reachable for nft.
pub struct Live {
    pub bundle: Bundle,
    pub runtime: RuntimeRecord,
    pub nft: Nft,
    pub dir: PathBuf,
}

/// The container's bundle and, if it is running, its runtime record.
pub fn lookup(
    name: &ContainerName,
    ctx: &Context,
) -> anyhow::Result<(Bundle, Option<RuntimeRecord>, PathBuf)> {
    let store = StateStore::new(&ctx.paths.containers_dir);
    let bundle = store.load(name)?;
    let dir = store.dir(name);
    let runtime = read_runtime(&dir)?
        .filter(|r| is_same_process(r.pid, r.start_time) && r.instance == bundle.instance);
    Ok((bundle, runtime, dir))
}

/// Reach a running container or explain why not.
pub fn live(name: &ContainerName, ctx: &Context) -> anyhow::Result<Live> {
    let (bundle, runtime, dir) = lookup(name, ctx)?;
    let Some(runtime) = runtime else {
        bail!("container `{name}` is not running (no live shielded process found); start it with `podman start {name}`");
    };
    let netns = PathBuf::from(format!("/proc/{}/ns/net", runtime.pid));
    if crate::effects::netns::is_own_netns(&netns)? {
        bail!("container `{name}` (pid {}) shares this shell's network namespace; refusing to touch it", runtime.pid);
    }
    let nft = Nft::locate()?
        .in_namespaces(
            Some(PathBuf::from(format!("/proc/{}/ns/user", runtime.pid))),
            netns,
        )
        .with_table_read_lock(&dir);
    Ok(Live {
        bundle,
        runtime,
        nft,
        dir,
    })
}

/// What `status NAME` found.
struct Report {
    state: String,
    /// Why the state is `error`.
    problem: Option<String>,
    /// Which case of `inactive` this is.
    note: Option<String>,
    bundle: Option<Bundle>,
}

impl Report {
    fn new(state: &str, problem: Option<String>, bundle: Option<Bundle>) -> Report {
        Report {
            state: state.into(),
            problem,
            note: None,
            bundle,
        }
    }
}

/// What podman says about `name` (no podman at all means no container).
fn podman_view(name: &ContainerName) -> anyhow::Result<Option<PodmanView>> {
    use crate::effects::podman::{inspect, PodmanError};
    match inspect(name.as_str()) {
        Ok(found) => Ok(found.map(|c| PodmanView {
            running: c.running,
            annotated: c
                .annotations
                .contains_key(crate::core::oci::annotation::NAME),
        })),
        Err(PodmanError::NotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Shield states `status NAME` reports: up, down, down_all, block, inactive or error.
fn state_of(name: &ContainerName, ctx: &Context) -> anyhow::Result<Report> {
    let store = StateStore::new(&ctx.paths.containers_dir);
    let has_bundle = store.dir(name).join(STATE_FILE).exists();
    let (bundle, runtime, dir) = if has_bundle {
        match lookup(name, ctx) {
            Ok(found) => found,
            // The container would be refused at its next start; say why.
            Err(e) => return Ok(Report::new("error", Some(format!("{e:#}")), None)),
        }
    } else {
        return match without_live_shield(false, podman_view(name)?) {
            Verdict::Unknown => bail!(
                "no shield state and no podman container named `{name}`; start one with `terok-shield run {name} -- IMAGE`"
            ),
            verdict => Ok(report_without_live_shield(name, verdict, None)),
        };
    };
    let Some(runtime) = runtime else {
        let verdict = without_live_shield(true, podman_view(name)?);
        return Ok(report_without_live_shield(name, verdict, Some(bundle)));
    };
    let runs_resolver = matches!(
        bundle.dns_tier,
        crate::core::bundle::DnsTier::Builtin | crate::core::bundle::DnsTier::Dnsmasq
    );
    // Every tier runs a process in the container's netns: the resolver (or dnsmasq's
    // supervisor), or in the static tier the event reader alone.
    if !runtime
        .resolver
        .is_some_and(|(pid, start)| is_same_process(pid, start))
        || dir.join(crate::effects::dnsmasq::FAILED_MARKER).exists()
    {
        let problem = if runs_resolver {
            "the container's DNS resolver is not running: DNS fails closed; restart the container"
        } else {
            "the container's event reader is not running: refused packets are not logged; restart the container"
        };
        return Ok(Report::new("error", Some(problem.into()), Some(bundle)));
    }
    let live = live(name, ctx)?;
    let facts = runtime.facts();
    let checked = check(&live.nft, &bundle.policy(&facts));
    Ok(match checked {
        Ok(()) => Report::new(bundle.mode.status_name(), None, Some(bundle)),
        Err(FirewallError::Missing) => Report::new(
            "error",
            Some(format!("the container is running but its firewall table is gone; `terok-shield up {name}` re-applies it")),
            Some(bundle),
        ),
        Err(e) => Report::new(
            "error",
            Some(format!("{e:#}; `terok-shield up {name}` re-applies it")),
            Some(bundle),
        ),
    })
}

fn report_without_live_shield(
    name: &ContainerName,
    verdict: Verdict,
    bundle: Option<Bundle>,
) -> Report {
    match verdict {
        Verdict::Error(why) => {
            Report::new("error", Some(why.replace("NAME", name.as_str())), bundle)
        }
        Verdict::Inactive(note) => Report {
            note: Some(note.to_string()),
            ..Report::new("inactive", None, bundle)
        },
        Verdict::Unknown => Report::new("inactive", None, bundle),
    }
}

/// `status NAME [--json]`. Exit status 0 for every state but `error` (1).
pub fn status(name: &str, json_out: bool, ctx: &Context) -> anyhow::Result<()> {
    let name = ContainerName::new(name)?;
    let report = state_of(&name, ctx)?;
    let bundle = report.bundle.as_ref();
    if json_out {
        let v = json!({
            "name": name.as_str(),
            "state": report.state,
            "problem": report.problem,
            "note": report.note,
            "shield_state": bundle.is_some(),
            "configured_mode": bundle.map(|b| b.mode.status_name()),
            "profiles": bundle.map(|b| &b.profiles),
            "dns_tier": bundle.map(|b| b.dns_tier.name()),
            "live_allow": bundle.map(|b| b.live_allow.iter().map(|t| t.to_string()).collect::<Vec<_>>()),
            "live_deny": bundle.map(|b| b.live_deny.iter().map(|t| t.to_string()).collect::<Vec<_>>()),
        });
        print(&format!("{}\n", serde_json::to_string(&v)?))?;
    } else {
        let mut out = format!("Container: {name}\nState:     {}\n", report.state);
        if let Some(b) = bundle {
            out.push_str(&format!(
                "Profiles:  {}\nDNS tier:  {}\n",
                b.profiles.join(", "),
                b.dns_tier.name()
            ));
        }
        if let Some(n) = &report.note {
            out.push_str(&format!("Note:      {n}\n"));
        }
        if let Some(p) = &report.problem {
            out.push_str(&format!("Problem:   {p}\n"));
        }
        print(&out)?;
    }
    if report.state == "error" {
        bail!("the shield of `{name}` is not in the state it should be (the problem above says what to do)");
    }
    Ok(())
}

/// `rules NAME`: the live ruleset, read from the container's namespace.
pub fn rules(name: &str, json_out: bool, ctx: &Context) -> anyhow::Result<()> {
    let name = ContainerName::new(name)?;
    let live = live(&name, ctx)?;
    if json_out {
        let v = live
            .nft
            .list_table_json()?
            .context("the container has no shield table")?;
        return Ok(print(&format!("{}\n", serde_json::to_string(&v)?))?);
    }
    let text = live
        .nft
        .list_table_text()?
        .with_context(|| format!("container `{name}` is running without its shield table; `terok-shield up {name}` re-applies it"))?;
    Ok(print(&format!(
        "# container {name}, mode {} (pid {})\n{text}",
        live.bundle.mode.status_name(),
        live.runtime.pid
    ))?)
}
