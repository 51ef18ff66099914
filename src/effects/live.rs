//! Carrying out a planned live change ([`LivePlan`]) on a running container: state.json, its
//! firewall, learned.jsonl, dnsmasq and open connections, in the plan's order, with the
//! plan's undo when a step fails. Nothing here decides what to change; `core::live` did.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde_json::{Map, Value};

use crate::core::bundle::{Bundle, ContainerName};
use crate::core::live::{FirewallChange, LivePlan, Step, Undo};
use crate::core::policy::Policy;
use crate::effects::firewall::{apply, check, update};
use crate::effects::learned_log::{restore_learned, take_learned, LEARNED_FILE};
use crate::effects::netns::NsFiles;
use crate::effects::nfnetlink::{NfSock, SetKey};
use crate::effects::nft::Nft;
use crate::effects::state::save_bundle;
use crate::effects::{audit, conntrack, procfs};

/// The running container a plan is carried out on.
pub struct Container<'a> {
    pub name: &'a ContainerName,
    /// Its state bundle directory.
    pub dir: &'a Path,
    /// Its init process (host view): the way into its namespaces.
    pub pid: u32,
    /// nft inside its namespaces.
    pub nft: &'a Nft,
    /// dnsmasq's supervisor (dnsmasq tier): PID and start time.
    pub resolver: Option<(u32, u64)>,
}

impl Container<'_> {
    fn ns(&self, kind: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/{kind}", self.pid))
    }
}

/// Run `plan` on `container` (whose saved bundle was `old`), then record it in the audit log.
///
/// A step that fails before the change is in force runs the plan's undo, and the error says
/// whether that left everything as it was.
pub fn execute(plan: &LivePlan, old: &Bundle, container: &Container) -> anyhow::Result<()> {
    let mut path = "nft";
    let mut taken_records: Vec<u8> = Vec::new();
    for (index, step) in plan.steps.iter().enumerate() {
        let result = match step {
            Step::SaveBundle => save_bundle(container.dir, &plan.bundle).map_err(Into::into),
            Step::Firewall(change) => firewall(change, plan, container).map(|p| path = p),
            Step::ClearLearnedRecord => {
                let file = container.dir.join(LEARNED_FILE);
                take_learned(&file)
                    .map(|records| taken_records = records)
                    .with_context(|| format!("cannot empty {}", file.display()))
            }
            Step::ReloadDnsmasq => {
                // A dead supervisor is already reported by `status`.
                if let Some((pid, start)) = container.resolver {
                    procfs::signal_if_same(pid, start, rustix::process::Signal::HUP);
                }
                Ok(())
            }
            Step::RevokeFlows => conntrack::revoke_in(
                Some(&container.ns("user")),
                &container.ns("net"),
                container.dir,
                container.name.as_str(),
            ),
        };
        let Err(error) = result else { continue };
        let Some(undo) = plan.undo_after_failure(index) else {
            return Err(error);
        };
        let failed_undo: Vec<String> = undo
            .iter()
            .filter_map(|u| run_undo(*u, plan, old, container, &taken_records).err())
            .map(|e| format!("{e:#}"))
            .collect();
        return Err(if failed_undo.is_empty() {
            error.context("nothing was changed")
        } else {
            error.context(format!(
                "and the previous state could not be restored: {}",
                failed_undo.join("; ")
            ))
        });
    }
    audit::record(
        container.dir,
        audit::AuditLog::of(&plan.bundle),
        container.name,
        plan.report.event,
        true,
        Value::Object(report_fields(plan, [("path", Value::from(path))])),
    );
    Ok(())
}

/// The report's fields in their documented order (`target` only when there is one), then
/// `extra`: the body of the audit detail and of `--json`.
pub fn report_fields<const N: usize>(
    plan: &LivePlan,
    extra: [(&str, Value); N],
) -> Map<String, Value> {
    let report = &plan.report;
    let mut fields = Map::new();
    if let Some(target) = &report.target {
        fields.insert("target".into(), Value::from(target.as_str()));
    }
    fields.insert("addresses".into(), Value::from(report.addresses.clone()));
    if report.addresses_omitted > 0 {
        fields.insert(
            "addresses_omitted".into(),
            Value::from(report.addresses_omitted),
        );
    }
    fields.insert("mode".into(), Value::from(report.mode.status_name()));
    if let Some(profile) = &report.profile {
        fields.insert("profile".into(), Value::from(profile.as_str()));
    }
    for (key, value) in extra {
        fields.insert(key.into(), value);
    }
    fields
}

/// Take back one completed step.
fn run_undo(
    undo: Undo,
    plan: &LivePlan,
    old: &Bundle,
    container: &Container,
    taken_records: &[u8],
) -> anyhow::Result<()> {
    match undo {
        Undo::RestoreBundle => Ok(save_bundle(container.dir, old)?),
        Undo::RestoreFirewall => Ok(update(container.nft, &plan.new_policy, &plan.old_policy)
            .map(drop)
            .context("the firewall could not be put back")?),
        Undo::RestoreLearnedRecord => {
            let file = container.dir.join(LEARNED_FILE);
            restore_learned(&file, taken_records)
                .with_context(|| format!("cannot write {} back", file.display()))
        }
    }
}

/// Carry out one firewall change; which path it took (`netlink` or `nft`).
fn firewall(
    change: &FirewallChange,
    plan: &LivePlan,
    container: &Container,
) -> anyhow::Result<&'static str> {
    match change {
        FirewallChange::Update => {
            update(container.nft, &plan.old_policy, &plan.new_policy)?;
            Ok("nft")
        }
        FirewallChange::AddAddresses(additions) => {
            add_addresses(container, additions, &plan.old_policy, &plan.new_policy)
        }
        FirewallChange::FlushLearned(sets) => {
            container
                .nft
                .run_script(&FirewallChange::flush_script(sets))?;
            // The rest of the table must still be exactly the policy; if it drifted, replace
            // it whole (which leaves the learned sets empty too).
            if check(container.nft, &plan.new_policy).is_err() {
                apply(container.nft, &plan.new_policy)?;
            }
            Ok("nft")
        }
    }
}

/// Add addresses to hash sets from inside the container's namespaces (netlink, no nft
/// process), then verify the whole table; on any trouble the regular nft path takes over.
///
/// Joining a user namespace needs a single-threaded process: the CLI has started no thread
/// yet, which is checked. Afterwards this process lives in the container's user and network
/// namespaces, so this is the plan's last firewall step.
fn add_addresses(
    container: &Container,
    additions: &[(&'static str, Vec<IpAddr>)],
    old: &Policy,
    new: &Policy,
) -> anyhow::Result<&'static str> {
    let single_threaded = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l == "Threads:\t1"));
    if !single_threaded {
        update(container.nft, old, new)?;
        return Ok("nft");
    }
    let ns = NsFiles::open(Some(&container.ns("user")), Some(&container.ns("net")))?;
    ns.enter()
        .context("cannot enter the container's namespaces")?;
    // From here on this process lives in the container's namespaces: nft needs no joining.
    let local = Nft::locate()?;
    let added = NfSock::open().and_then(|mut sock| {
        additions.iter().try_for_each(|(set, addrs)| {
            let keys: Vec<SetKey> = addrs
                .iter()
                .map(|a| match a {
                    IpAddr::V4(a) => SetKey::V4(*a),
                    IpAddr::V6(a) => SetKey::V6(*a),
                })
                .collect();
            sock.add_elements(set, &keys, None)
        })
    });
    if added.is_ok() && check(&local, new).is_ok() {
        return Ok("netlink");
    }
    apply(&local, new)
        .map(|_| "nft")
        .context("the firewall could not be updated")
}
