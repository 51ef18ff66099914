//! Live changes to a running container, planned without any I/O.
//!
//! `allow`, `deny`, `up`, `down`, `block` (alias `quarantine`) and `reset` all ask one
//! question: given what the container's bundle says now, what has to change, in which order,
//! and how is a failure undone? [`plan`] answers it with a [`LivePlan`]: the new bundle, the
//! policy before and after, the steps that change the system, and what to report. The CLI
//! only gathers the inputs (the bundle read under its lock, the runtime facts, a DNS lookup
//! when [`lookup_needed`] asks for one, the learned set elements for `reset`) and the effects
//! only carry the steps out, so every rule below is unit- and property-tested in memory.
//!
//! Ordering: a change that revokes access (`deny`, `up`, `block`, `reset`) narrows the
//! firewall first and saves after; one that grants access (`allow`, `down`) saves first and
//! widens after, so a crash in between leaves state.json and the firewall disagreeing in the
//! safe direction for allow and deny, which `status` reports and the next `up` repairs. An
//! *error* in either step undoes the other ([`LivePlan::undo_after_failure`]): a failed
//! command leaves state.json, the firewall and learned.jsonl as they were.

use std::net::IpAddr;

use thiserror::Error;

use super::bundle::{Bundle, ContainerName, DnsTier, Resolved, RuntimeFacts};
use super::dns_policy::DnsPolicy;
use super::dnsmasq::{self, DnsmasqError};
use super::policy::{Mode, Policy};
use super::profile::ProfileName;
use super::ruleset::{sets, Element, Ruleset, FAMILY, TABLE};
use super::target::{display_net, DomainName, Host, Target};

/// One live change, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveChange {
    /// `allow TARGET`; `typed` is the target as the user wrote it, echoed back in reports.
    Allow { target: Target, typed: String },
    /// `allow TARGET --save-to PROFILE` (and clearance's `s`): allowed as by `Allow`, and
    /// kept in the user profile `profile`, whose file the caller has already written
    /// (`profile_entries` is what it holds now). The profile joins the container's profiles
    /// and its entries the composed entries, so the bundle says where the allow came from.
    SaveAllow {
        target: Target,
        typed: String,
        profile: ProfileName,
        profile_entries: Vec<Target>,
    },
    /// `deny TARGET` (a whole host: ports are refused).
    Deny { target: Target, typed: String },
    /// `up`, `down [--all]`, `block` / `quarantine`.
    Mode(Mode),
    /// `reset`: forget the DNS-learned addresses; literals and live decisions stay.
    Reset,
}

/// Why a live change is refused before anything is touched.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LiveError {
    #[error("{host} is denied, and a deny covers every port; `terok-shield allow {name} {host}` lifts it")]
    PortAllowOfDeniedHost { host: Target, name: ContainerName },
    #[error("deny takes a host without a port ({0}): a deny removes the host entirely")]
    DenyWithPort(Target),
    #[error("wildcard domains cannot be allowed live in the static DNS tier (nothing to resolve); allow the exact names instead")]
    WildcardInStaticTier,
    #[error(transparent)]
    Dnsmasq(#[from] DnsmasqError),
    #[error(
        "{0} was not looked up before planning; this is a bug in terok-shield, please report it"
    )]
    NotLookedUp(DomainName),
}

/// What the caller found out in the world before planning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// The answer for the name [`lookup_needed`] asked for (`allow NAME`, static tier).
    pub resolved: Option<Resolved>,
    /// Addresses in the live DNS-learned sets just before the change (`reset` reports them).
    pub learned: Vec<IpAddr>,
}

/// How the live firewall moves from the old policy to the new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirewallChange {
    /// The new policy only adds single addresses to these hash sets: they may go in over
    /// netlink (milliseconds instead of rewriting sets with nft), then the table is verified;
    /// any trouble falls back to [`FirewallChange::Update`].
    AddAddresses(Vec<(&'static str, Vec<IpAddr>)>),
    /// Rewrite the changed sets, or replace the table when chains differ; verified.
    Update,
    /// Empty these DNS-learned sets (`reset`) in one transaction; the policy stays.
    FlushLearned(Vec<&'static str>),
}

impl FirewallChange {
    /// The nft script of a [`FirewallChange::FlushLearned`] (one atomic transaction).
    pub fn flush_script(sets: &[&'static str]) -> String {
        sets.iter()
            .map(|set| format!("flush set {FAMILY} {TABLE} {set}\n"))
            .collect()
    }
}

/// One step that changes the system, in the order the executor runs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write the planned bundle to state.json.
    SaveBundle,
    /// Bring the live firewall to the new policy.
    Firewall(FirewallChange),
    /// Empty learned.jsonl, the record of which name brought which learned address.
    ClearLearnedRecord,
    /// dnsmasq tier: signal the supervisor, which rewrites dnsmasq's server list from the
    /// saved bundle.
    ReloadDnsmasq,
    /// Cut open connections the new policy refuses.
    RevokeFlows,
}

impl Step {
    /// Whether the step belongs to the all-or-nothing part of a plan (undone on failure);
    /// the others follow once the change is in force.
    fn is_transactional(&self) -> bool {
        matches!(
            self,
            Step::SaveBundle | Step::Firewall(_) | Step::ClearLearnedRecord
        )
    }
}

/// How to take back a completed step when a later one fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undo {
    /// Save the old bundle again.
    RestoreBundle,
    /// Move the firewall back from the new policy to the old one.
    RestoreFirewall,
    /// Put back the learned.jsonl records taken away.
    RestoreLearnedRecord,
}

/// What a change did, for the audit log, `--json` and the text line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Audit event and JSON `action`: `allow`, `deny`, `mode` or `reset`.
    pub event: &'static str,
    /// The target as typed, or the new mode's name; `None` for `reset`.
    pub target: Option<String>,
    /// Addresses the change concerns: resolved or literal for allow and deny, forgotten for
    /// reset; at most [`REPORTED_ADDRESSES_MAX`] of them (the first in order).
    pub addresses: Vec<String>,
    /// How many more there were than `addresses` lists: a `reset` of a busy container
    /// forgets tens of thousands, and one audit line must stay far below the log's cap.
    pub addresses_omitted: usize,
    /// The container's mode after the change.
    pub mode: Mode,
    /// The user profile the allowed target was saved in (`SaveAllow`).
    pub profile: Option<ProfileName>,
    /// The line printed without `--json`.
    pub message: String,
}

/// Everything a live change does, decided up front.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LivePlan {
    /// The bundle after the change (equal to the old one for `reset`).
    pub bundle: Bundle,
    /// The policy the saved bundle stood for before the change.
    pub old_policy: Policy,
    /// The policy after it.
    pub new_policy: Policy,
    /// What to do, in order.
    pub steps: Vec<Step>,
    pub report: Report,
}

impl LivePlan {
    /// What to undo when step `failed` fails: `Some` of the completed all-or-nothing steps,
    /// newest first, after which nothing was changed; `None` when the change was already in
    /// force (only cutting connections or reloading dnsmasq is left), so it stands and the
    /// failure is reported as it is.
    pub fn undo_after_failure(&self, failed: usize) -> Option<Vec<Undo>> {
        let transactional_len = self
            .steps
            .iter()
            .position(|s| !s.is_transactional())
            .unwrap_or(self.steps.len());
        if failed >= transactional_len {
            return None;
        }
        let undo = self.steps[..failed]
            .iter()
            .rev()
            .filter_map(|step| match step {
                Step::SaveBundle => Some(Undo::RestoreBundle),
                Step::Firewall(_) => Some(Undo::RestoreFirewall),
                Step::ClearLearnedRecord => Some(Undo::RestoreLearnedRecord),
                Step::ReloadDnsmasq | Step::RevokeFlows => None,
            })
            .collect();
        Some(undo)
    }

    /// Whether the plan cuts open connections.
    pub fn revokes_flows(&self) -> bool {
        self.steps.contains(&Step::RevokeFlows)
    }
}

/// The name to look up before [`plan`] can plan `change`, if any; also refuses, before any
/// lookup, every change that cannot be made.
///
/// Only the static tier (and the dnsmasq tier for port-scoped names, which it refuses live)
/// resolves names ahead; the resolver tiers learn a name's addresses as it is asked.
pub fn lookup_needed(
    bundle: &Bundle,
    change: &LiveChange,
) -> Result<Option<DomainName>, LiveError> {
    match change {
        LiveChange::Allow { target, .. } | LiveChange::SaveAllow { target, .. } => {
            if let (DnsTier::Dnsmasq, Host::Domain(d)) = (bundle.dns_tier, &target.host) {
                dnsmasq::check_live_allow(
                    &DnsPolicy::from_bundle(bundle),
                    d,
                    target.scope.is_some(),
                )?;
            }
            if target.scope.is_some() && bundle.is_denied_host(target) {
                return Err(LiveError::PortAllowOfDeniedHost {
                    host: Target {
                        host: target.host.clone(),
                        scope: None,
                    },
                    name: bundle.name.clone(),
                });
            }
            match &target.host {
                Host::Domain(_)
                    if bundle.dns_tier != DnsTier::Static && !bundle.resolves_ahead(target) =>
                {
                    Ok(None)
                }
                Host::Domain(d) if !d.wildcard => Ok(Some(d.name.clone())),
                Host::Domain(_) => Err(LiveError::WildcardInStaticTier),
                Host::Net(_) => Ok(None),
            }
        }
        LiveChange::Deny { target, .. } if target.scope.is_some() => {
            Err(LiveError::DenyWithPort(target.clone()))
        }
        LiveChange::Deny { .. } | LiveChange::Mode(_) | LiveChange::Reset => Ok(None),
    }
}

/// Plan `change` for a container whose saved bundle is `bundle` and whose hook found `facts`.
pub fn plan(
    bundle: &Bundle,
    facts: &RuntimeFacts,
    change: &LiveChange,
    observed: &Observed,
) -> Result<LivePlan, LiveError> {
    let resolved = match lookup_needed(bundle, change)? {
        None => None,
        Some(name) => Some(
            observed
                .resolved
                .clone()
                .ok_or(LiveError::NotLookedUp(name))?,
        ),
    };
    let mut new = bundle.clone();
    let (event, target, addresses) = match change {
        LiveChange::Allow { target, typed } | LiveChange::SaveAllow { target, typed, .. } => {
            let addresses = match (&target.host, &resolved) {
                (_, Some(r)) => r.addrs.iter().map(ToString::to_string).collect(),
                (Host::Net(n), None) => vec![display_net(n)],
                (Host::Domain(_), None) => Vec::new(),
            };
            new.live_allow(target.clone(), resolved);
            if let LiveChange::SaveAllow {
                profile,
                profile_entries,
                ..
            } = change
            {
                new.add_profile(profile.as_str(), profile_entries);
            }
            ("allow", Some(typed.clone()), addresses)
        }
        LiveChange::Deny { target, typed } => {
            let addresses = match &target.host {
                Host::Net(n) => vec![display_net(n)],
                Host::Domain(d) => bundle
                    .resolved
                    .get(&d.name)
                    .map(|r| r.addrs.iter().map(ToString::to_string).collect())
                    .unwrap_or_default(),
            };
            new.live_deny(target.clone());
            ("deny", Some(typed.clone()), addresses)
        }
        LiveChange::Mode(mode) => {
            new.mode = *mode;
            ("mode", Some(mode.status_name().to_string()), Vec::new())
        }
        LiveChange::Reset => {
            let mut learned = observed.learned.clone();
            learned.sort();
            learned.dedup();
            (
                "reset",
                None,
                learned.iter().map(ToString::to_string).collect(),
            )
        }
    };
    if new.dns_tier == DnsTier::Dnsmasq {
        // Refuse what dnsmasq cannot enforce before anything changes.
        dnsmasq::check(&DnsPolicy::from_bundle(&new))?;
    }
    let old_policy = bundle.policy(facts);
    let new_policy = new.policy(facts);
    let steps = steps(change, &new, &old_policy, &new_policy);
    let addresses_omitted = addresses.len().saturating_sub(REPORTED_ADDRESSES_MAX);
    let mut addresses = addresses;
    addresses.truncate(REPORTED_ADDRESSES_MAX);
    let message = message(change, &new, &addresses, addresses_omitted);
    Ok(LivePlan {
        report: Report {
            event,
            target,
            addresses,
            addresses_omitted,
            mode: new.mode,
            profile: match change {
                LiveChange::SaveAllow { profile, .. } => Some(profile.clone()),
                _ => None,
            },
            message,
        },
        bundle: new,
        old_policy,
        new_policy,
        steps,
    })
}

/// Whether `change` takes access away, so open connections must be checked against the new
/// policy (bypass modes only widen).
fn revokes(change: &LiveChange) -> bool {
    match change {
        LiveChange::Allow { .. } | LiveChange::SaveAllow { .. } => false,
        LiveChange::Deny { .. } | LiveChange::Reset => true,
        LiveChange::Mode(mode) => !matches!(mode, Mode::Bypass | Mode::BypassAll),
    }
}

/// The steps of a change, in order (see the module documentation for why this order).
fn steps(change: &LiveChange, new: &Bundle, old_policy: &Policy, new_policy: &Policy) -> Vec<Step> {
    let mut steps = match change {
        // The record goes first: an address learned while the sets are flushed is recorded
        // after the record was emptied, so no live element loses its record.
        LiveChange::Reset => vec![
            Step::ClearLearnedRecord,
            Step::Firewall(FirewallChange::FlushLearned(learned_sets(new_policy))),
        ],
        _ if revokes(change) => vec![Step::Firewall(FirewallChange::Update), Step::SaveBundle],
        _ => vec![
            Step::SaveBundle,
            Step::Firewall(match addresses_added(old_policy, new_policy) {
                Some(additions) => FirewallChange::AddAddresses(additions),
                None => FirewallChange::Update,
            }),
        ],
    };
    if new.dns_tier == DnsTier::Dnsmasq && *change != LiveChange::Reset {
        steps.push(Step::ReloadDnsmasq);
    }
    if revokes(change) {
        steps.push(Step::RevokeFlows);
    }
    steps
}

/// The DNS-learned sets of `policy`'s ruleset (the resolver's and dnsmasq's).
fn learned_sets(policy: &Policy) -> Vec<&'static str> {
    Ruleset::generate(policy)
        .sets
        .iter()
        .filter(|s| s.kind.is_learned())
        .map(|s| s.name)
        .collect()
}

/// If `new` differs from `old` only by more single addresses in `allow_v4` / `allow_v6` (an
/// allowed address, or a domain's addresses), those additions per set.
pub fn addresses_added(old: &Policy, new: &Policy) -> Option<Vec<(&'static str, Vec<IpAddr>)>> {
    let (a, b) = (Ruleset::generate(old), Ruleset::generate(new));
    if a.chains != b.chains || a.sets.len() != b.sets.len() {
        return None;
    }
    let mut out = Vec::new();
    for (x, y) in a.sets.iter().zip(&b.sets) {
        if x.elements == y.elements {
            continue;
        }
        if x.name != y.name || !x.elements.iter().all(|e| y.elements.contains(e)) {
            return None; // something was removed or merged: not a pure addition
        }
        let added: Option<Vec<IpAddr>> = y
            .elements
            .iter()
            .filter(|e| !x.elements.contains(e))
            .map(|e| match (x.name, e) {
                (sets::ALLOW_V4, Element::Addr(a @ IpAddr::V4(_)))
                | (sets::ALLOW_V6, Element::Addr(a @ IpAddr::V6(_))) => Some(*a),
                _ => None,
            })
            .collect();
        out.push((x.name, added?));
    }
    (!out.is_empty()).then_some(out)
}

/// Most addresses one report (an audit line, the printed message) lists; the rest are
/// counted in [`Report::addresses_omitted`]. 32 addresses keep a line near 1 KiB, whatever
/// the container learned.
pub const REPORTED_ADDRESSES_MAX: usize = 32;

/// The line printed for a change without `--json`.
fn message(change: &LiveChange, new: &Bundle, addresses: &[String], omitted: usize) -> String {
    let name = &new.name;
    let mut listed = addresses.join(", ");
    if omitted > 0 {
        listed.push_str(&format!(" and {omitted} more"));
    }
    match change {
        LiveChange::Allow { typed, .. } if addresses.is_empty() => format!(
            "Allowed {typed} for {name} (its addresses open as the container's resolver answers for it)\n"
        ),
        LiveChange::Allow { typed, .. } => format!("Allowed {typed} -> {listed} for {name}\n"),
        LiveChange::SaveAllow { typed, profile, .. } if addresses.is_empty() => format!(
            "Allowed {typed} for {name} and saved it in profile {profile} (its addresses open as the container's resolver answers for it)\n"
        ),
        LiveChange::SaveAllow { typed, profile, .. } => format!(
            "Allowed {typed} -> {listed} for {name} and saved it in profile {profile}\n"
        ),
        LiveChange::Deny { typed, .. } if addresses.is_empty() => {
            format!("Denied {typed} for {name}\n")
        }
        LiveChange::Deny { typed, .. } => format!("Denied {typed} ({listed}) for {name}\n"),
        LiveChange::Mode(mode) => format!("{name} is now {}\n", describe(*mode)),
        LiveChange::Reset if new.dns_tier == DnsTier::Static => format!(
            "Reset {name}: the static DNS tier learns no addresses while running; nothing to forget\n"
        ),
        LiveChange::Reset if addresses.is_empty() => format!(
            "Reset {name}: no DNS-learned addresses to forget; literal allows and live decisions stay\n"
        ),
        LiveChange::Reset => format!(
            "Reset {name}: forgot the DNS-learned addresses {listed}; they open again as the container's resolver answers for their names\n"
        ),
    }
}

/// What a mode means, in the words `status` users see.
fn describe(mode: Mode) -> &'static str {
    match mode {
        Mode::DenyAll => "up: only allowlisted destinations are reachable",
        Mode::Bypass => "down: public egress is accepted and logged; private ranges and denies stay blocked",
        Mode::BypassAll => "down --all: all egress is accepted and logged, private ranges included; denies stay blocked",
        Mode::Block => "blocked: nothing but loopback",
    }
}

#[cfg(test)]
mod tests;
