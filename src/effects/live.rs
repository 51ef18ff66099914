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
    let here = enter(plan, container)?;
    let nft = here.as_ref().unwrap_or(container.nft);
    let mut path = "nft";
    let mut taken_records: Vec<u8> = Vec::new();
    for (index, step) in plan.steps.iter().enumerate() {
        let result = match step {
            Step::SaveBundle => save_bundle(container.dir, &plan.bundle).map_err(Into::into),
            Step::Firewall(change) => firewall(change, plan, nft, here.is_some()).map(|p| path = p),
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
            Step::RevokeFlows if here.is_some() => {
                revoke_here(container.dir, &plan.bundle, &plan.new_policy, nft)
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
            .filter_map(|u| run_undo(*u, plan, old, container, nft, &taken_records).err())
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
    nft: &Nft,
    taken_records: &[u8],
) -> anyhow::Result<()> {
    match undo {
        Undo::RestoreBundle => Ok(save_bundle(container.dir, old)?),
        Undo::RestoreFirewall => Ok(update(nft, &plan.new_policy, &plan.old_policy)
            .map(drop)
            .context("the firewall could not be put back")?),
        Undo::RestoreLearnedRecord => {
            let file = container.dir.join(LEARNED_FILE);
            restore_learned(&file, taken_records)
                .with_context(|| format!("cannot write {} back", file.display()))
        }
    }
}

/// Join the container's user and network namespaces in this very process when the plan
/// touches its firewall or its connections, and return nft there: every step then talks to
/// the kernel directly, with no forked nft worker and no helper process to start.
///
/// Joining a user namespace needs a single-threaded process: the CLI has started no thread
/// yet, which is checked; if it had, `None`, and the steps reach the namespaces from outside.
/// Nothing after the plan needs the host's namespaces: files are written through the same
/// mounts (the user namespace maps our user to its root), signals reach the container's
/// processes.
fn enter(plan: &LivePlan, container: &Container) -> anyhow::Result<Option<Nft>> {
    let touches = plan
        .steps
        .iter()
        .any(|s| matches!(s, Step::Firewall(_) | Step::RevokeFlows));
    let single_threaded = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l == "Threads:\t1"));
    if !touches || !single_threaded {
        return Ok(None);
    }
    let ns = NsFiles::open(Some(&container.ns("user")), Some(&container.ns("net")))?;
    ns.enter()
        .context("cannot enter the container's namespaces")?;
    Ok(Some(Nft::locate()?))
}

/// Carry out one firewall change with `nft` (in the container's namespaces, joined by this
/// process when `here`); which path it took (`netlink` or `nft`).
fn firewall(
    change: &FirewallChange,
    plan: &LivePlan,
    nft: &Nft,
    here: bool,
) -> anyhow::Result<&'static str> {
    match change {
        FirewallChange::Update => {
            update(nft, &plan.old_policy, &plan.new_policy)?;
            Ok("nft")
        }
        FirewallChange::AddAddresses(additions) if here => {
            add_addresses(nft, additions, &plan.new_policy)
        }
        FirewallChange::AddAddresses(_) => {
            update(nft, &plan.old_policy, &plan.new_policy)?;
            Ok("nft")
        }
        FirewallChange::FlushLearned(sets) => {
            nft.run_script(&FirewallChange::flush_script(sets))?;
            // The rest of the table must still be exactly the policy; if it drifted, replace
            // it whole (which leaves the learned sets empty too).
            if check(nft, &plan.new_policy).is_err() {
                apply(nft, &plan.new_policy)?;
            }
            Ok("nft")
        }
    }
}

/// Add addresses to hash sets over netlink (no nft process; this process is in the
/// container's namespaces), then verify the whole table; on any trouble the regular nft
/// path takes over and replaces the table with the policy.
fn add_addresses(
    nft: &Nft,
    additions: &[(&'static str, Vec<IpAddr>)],
    new: &Policy,
) -> anyhow::Result<&'static str> {
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
    if added.is_ok() && check(nft, new).is_ok() {
        return Ok("netlink");
    }
    apply(nft, new)
        .map(|_| "nft")
        .context("the firewall could not be updated")
}

/// The DNS-learned elements live in the container's table: one netlink dump per learned
/// set of `policy`'s ruleset (or, with an explicit nft binary, nft's JSON listing).
fn learned_live(nft: &Nft, policy: &Policy) -> anyhow::Result<Vec<crate::core::verify::Learned>> {
    use crate::effects::nftables_netlink::{NlError, NlSocket};
    let Some((user, net)) = nft.netlink_target() else {
        return Ok(nft
            .list_table_json()?
            .map(|live| crate::core::verify::learned_elements(&live))
            .unwrap_or_default());
    };
    let mut sock = NlSocket::open_in_namespaces(user, net)?;
    let mut learned = Vec::new();
    let ruleset = crate::core::ruleset::Ruleset::generate(policy);
    for set in ruleset.sets.iter().filter(|s| s.kind.is_learned()) {
        match sock.dump_set_elements(set.name) {
            Ok(elems) => {
                learned.extend(crate::core::verify::learned_from_netlink(set.name, &elems))
            }
            // No table (yet, or any more): nothing learned keeps a flow alive.
            Err(NlError::Refused { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
            }
            Err(e) => return Err(e.into()),
        }
    }
    // Closing now would wait for the kernel to free the elements the update just deleted.
    sock.park();
    Ok(learned)
}

/// Inside the container's namespaces: take away what a revoking change no longer permits,
/// learned elements first (so a cut flow cannot come back through one), then open flows.
pub fn revoke_here(
    bundle_dir: &Path,
    bundle: &Bundle,
    policy: &Policy,
    nft: &Nft,
) -> anyhow::Result<()> {
    // What is learned now decides both which records may go (only elements still in the
    // table are deleted) and which flows they keep alive.
    let mut learned = learned_live(nft, policy)?;
    if bundle.dns_tier != crate::core::bundle::DnsTier::Static {
        let forgotten =
            crate::effects::learned_log::forget_unjustified(bundle_dir, bundle, &learned)?;
        learned.retain(|(addr, _)| !forgotten.contains(addr));
    }
    conntrack::revoke_current_netns(policy, &learned).context("failed to cut open connections")?;
    Ok(())
}
