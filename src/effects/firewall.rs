//! Applying a policy to a network namespace: generate, load, read back, verify.
//!
//! The first transaction replaces our table whole (the new policy is in force from that
//! instant); further transactions only add set elements. If anything fails part-way, what is
//! live is still default-deny with fewer allows, never more: fail closed.

use std::time::{Duration, Instant};

use thiserror::Error;

use super::nft::{Nft, NftError};
use super::nftables_netlink::{NlError, NlSocket};
use crate::core::nft_netlink::{LowerError, Lowered};
use crate::core::policy::Policy;
use crate::core::ruleset::Ruleset;
use crate::core::verify::{reread_after, verify, verify_netlink_after, VerifyError};

/// [`ApplyReport::backend`] of the netlink backend.
pub const NETLINK: &str = "netlink";

/// What an apply did and how long each phase took (reported by benchmarks and the audit log).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ApplyReport {
    /// `netlink` (our own nf_tables messages: the default), `libnftables` (in-process, for
    /// a namespace only a forked worker can reach) or `nft` (the binary: forced by
    /// `TEROK_SHIELD_NFT`, or the library could not be loaded).
    pub backend: &'static str,
    pub transactions: usize,
    pub elements: usize,
    /// Listings of the table taken to verify it: 1, more when a listing came back torn.
    pub reads: usize,
    #[serde(with = "millis")]
    pub generate: Duration,
    #[serde(with = "millis")]
    pub load: Duration,
    #[serde(with = "millis")]
    pub verify: Duration,
    /// Of `verify`, the time the kernel took to dump the table (netlink backend only): the
    /// part no verifier can save, since it reads back every element.
    #[serde(with = "millis", skip_serializing_if = "Duration::is_zero")]
    pub dump: Duration,
}

mod millis {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1000.0)
    }
}

/// Why applying failed; the firewall is left closed (default deny or unchanged).
#[derive(Debug, Error)]
pub enum FirewallError {
    #[error("failed to load the ruleset: {0}")]
    Load(#[source] NftError),
    #[error("failed to load set elements (transaction {index} of {total}); the firewall stays in default-deny with a partial allowlist: {source}")]
    LoadElements {
        index: usize,
        total: usize,
        #[source]
        source: NftError,
    },
    #[error("failed to read the firewall back for verification: {0}")]
    Read(#[source] NftError),
    #[error(transparent)]
    Lower(#[from] LowerError),
    #[error("failed to load the ruleset over netlink: {0}")]
    LoadNetlink(#[source] NlError),
    #[error("failed to load set elements over netlink (batch {index} of {total}); the firewall stays in default-deny with a partial allowlist: {source}")]
    LoadElementsNetlink {
        index: usize,
        total: usize,
        #[source]
        source: NlError,
    },
    #[error("failed to read the firewall back over netlink for verification: {0}")]
    ReadNetlink(#[source] NlError),
    #[error("the shield table vanished right after it was applied; another tool may be flushing nftables")]
    Missing,
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// Every listing came back torn (see `core::verify`): nothing could be verified, so the
    /// firewall counts as wrong (a starting container is refused).
    #[error("the firewall was listed inconsistently on {reads} reads in a row (repeated elements in set {}), so it could not be verified and is treated as wrong; this happens while the kernel is still resizing a very large set: try again, and if it persists, report it with the kernel version: {source}", .source.torn.join(", "))]
    Unverifiable {
        reads: usize,
        #[source]
        source: VerifyError,
    },
}

/// Replace the shield's table with `policy`'s ruleset and verify the result.
pub fn apply(nft: &Nft, policy: &Policy) -> Result<ApplyReport, FirewallError> {
    apply_with(nft, policy, true)
}

/// Install `policy` into a network namespace that never had our table (a new container):
/// skips the costly table deletion; exact verification still catches any leftover.
pub fn apply_fresh(nft: &Nft, policy: &Policy) -> Result<ApplyReport, FirewallError> {
    apply_with(nft, policy, false)
}

/// The hook's load at every container start: the quick fresh load, and if that fails, one
/// whole-table replacement. A namespace can hold our table already: podman's restart policy
/// starts the container again in the network namespace it had, with the table of the
/// previous run. A fresh load merges into that table and its exact verification fails; the
/// replacement then makes the table exactly the policy, verified again. The workload has not
/// started yet while the hook runs, so the moment in between exposes nothing.
pub fn apply_at_start(nft: &Nft, policy: &Policy) -> Result<ApplyReport, FirewallError> {
    apply_fresh(nft, policy).or_else(|_| apply(nft, policy))
}

fn apply_with(nft: &Nft, policy: &Policy, replace: bool) -> Result<ApplyReport, FirewallError> {
    if let Some((user, net)) = nft.netlink_target() {
        return apply_netlink(user, net, policy, replace);
    }
    let t0 = Instant::now();
    let ruleset = Ruleset::generate(policy);
    let transactions = if replace {
        ruleset.transactions()
    } else {
        ruleset.transactions_fresh()
    };
    let generate = t0.elapsed();

    let t1 = Instant::now();
    let total = transactions.len();
    for (index, tx) in transactions.iter().enumerate() {
        nft.run_script(tx).map_err(|source| {
            if index == 0 {
                FirewallError::Load(source)
            } else {
                FirewallError::LoadElements {
                    index: index + 1,
                    total,
                    source,
                }
            }
        })?;
    }
    let load = t1.elapsed();

    let t2 = Instant::now();
    let reads = read_back(nft, &ruleset)?;
    Ok(ApplyReport {
        backend: nft.backend(),
        transactions: total,
        elements: ruleset.element_count(),
        reads,
        generate,
        load,
        verify: t2.elapsed(),
        dump: Duration::ZERO,
    })
}

/// [`apply_with`] over netlink: the table in one batch, elements in the batches after it,
/// then read back from the kernel's dumps and verified against the same lowering.
fn apply_netlink(
    user: Option<&std::path::Path>,
    net: Option<&std::path::Path>,
    policy: &Policy,
    replace: bool,
) -> Result<ApplyReport, FirewallError> {
    let t0 = Instant::now();
    let ruleset = Ruleset::generate(policy);
    let lowered = Lowered::new(&ruleset)?;
    let generate = t0.elapsed();

    let t1 = Instant::now();
    let mut sock = NlSocket::open_in_namespaces(user, net).map_err(FirewallError::LoadNetlink)?;
    let (total, sent) = sock.number_and_send(|first| lowered.batches(replace, first));
    sent.map_err(|(index, source)| {
        if index == 0 {
            FirewallError::LoadNetlink(source)
        } else {
            FirewallError::LoadElementsNetlink {
                index: index + 1,
                total,
                source,
            }
        }
    })?;
    let load = t1.elapsed();

    let t2 = Instant::now();
    let (reads, dump) = read_back_netlink(&mut sock, &ruleset, &lowered)?;
    Ok(ApplyReport {
        backend: NETLINK,
        transactions: total,
        elements: ruleset.element_count(),
        reads,
        generate,
        load,
        verify: t2.elapsed(),
        dump,
    })
}

/// [`read_back`] over netlink. Returns the reads taken and the time spent in the kernel's
/// dumps.
fn read_back_netlink(
    sock: &mut NlSocket,
    expected: &Ruleset,
    lowered: &Lowered,
) -> Result<(usize, Duration), FirewallError> {
    let mut reads = 0;
    let mut dumping = Duration::ZERO;
    let mut previous = None;
    loop {
        let started = Instant::now();
        let dump = sock
            .dump_table()
            .map_err(FirewallError::ReadNetlink)?
            .ok_or(FirewallError::Missing)?;
        dumping += started.elapsed();
        reads += 1;
        let live = dump
            .decode()
            .map_err(|e| FirewallError::ReadNetlink(e.into()))?;
        drop(dump);
        let Err(err) = verify_netlink_after(expected, lowered, previous.as_ref(), &live) else {
            return Ok((reads, dumping));
        };
        previous = Some(live);
        match reread_after(reads, &err) {
            Some(pause) => std::thread::sleep(pause),
            None if err.listing_torn() => {
                return Err(FirewallError::Unverifiable { reads, source: err })
            }
            None => return Err(err.into()),
        }
    }
}

/// Move a live table from `old` to `new` policy: rewrite only the changed sets when the
/// chains are the same, else replace the table; verify either way. If the quick path leaves
/// anything unexpected (the live table had drifted), fall back to a full replacement.
pub fn update(nft: &Nft, old: &Policy, new: &Policy) -> Result<ApplyReport, FirewallError> {
    if let Some((user, net)) = nft.netlink_target() {
        return update_netlink(nft, (user, net), old, new);
    }
    let t0 = Instant::now();
    let target = Ruleset::generate(new);
    let Some(transactions) = Ruleset::generate(old).update_to(&target) else {
        return apply(nft, new);
    };
    let generate = t0.elapsed();
    let t1 = Instant::now();
    let total = transactions.len();
    for (index, tx) in transactions.iter().enumerate() {
        if let Err(source) = nft.run_script(tx) {
            if index == 0 {
                return apply(nft, new);
            }
            return Err(FirewallError::LoadElements {
                index: index + 1,
                total,
                source,
            });
        }
    }
    let load = t1.elapsed();
    let t2 = Instant::now();
    let reads = match read_back(nft, &target) {
        Err(FirewallError::Verify(_)) => return apply(nft, new),
        other => other?,
    };
    Ok(ApplyReport {
        backend: nft.backend(),
        transactions: total,
        elements: target.element_count(),
        reads,
        generate,
        load,
        verify: t2.elapsed(),
        dump: Duration::ZERO,
    })
}

/// [`update`] over netlink: the changed sets brought to the new policy in batches of our own
/// (new elements added, or the set flushed and refilled in one transaction), then the table
/// read back and verified.
fn update_netlink(
    nft: &Nft,
    (user, net): (Option<&std::path::Path>, Option<&std::path::Path>),
    old: &Policy,
    new: &Policy,
) -> Result<ApplyReport, FirewallError> {
    let t0 = Instant::now();
    let target = Ruleset::generate(new);
    let current = Ruleset::generate(old);
    let Some(changed) = current.changed_sets(&target) else {
        return apply(nft, new);
    };
    let names: Vec<&str> = changed.iter().map(|s| s.name).collect();
    let lowered = Lowered::new(&target)?;
    let lowered_old = Lowered::new(&current)?;
    let generate = t0.elapsed();

    let t1 = Instant::now();
    let mut sock = NlSocket::open_in_namespaces(user, net).map_err(FirewallError::LoadNetlink)?;
    let (total, sent) = sock.number_and_send(|first| {
        if names.is_empty() {
            Vec::new()
        } else {
            lowered.set_update_batches(&lowered_old, &names, first)
        }
    });
    match sent {
        Ok(()) => {}
        // The first batch is one transaction: refused, it changed nothing; the live table
        // may have drifted from `old`, so replace it whole.
        Err((0, _)) => return apply(nft, new),
        Err((index, source)) => {
            return Err(FirewallError::LoadElementsNetlink {
                index: index + 1,
                total,
                source,
            })
        }
    }
    let load = t1.elapsed();

    let t2 = Instant::now();
    let (reads, dump) = match read_back_netlink(&mut sock, &target, &lowered) {
        Err(FirewallError::Verify(_)) => return apply(nft, new),
        other => other?,
    };
    // A set update may have deleted elements: do not wait here for the kernel to free them.
    sock.park();
    Ok(ApplyReport {
        backend: NETLINK,
        transactions: total,
        elements: target.element_count(),
        reads,
        generate,
        load,
        verify: t2.elapsed(),
        dump,
    })
}

/// Verify what is live against `policy` without changing anything.
pub fn check(nft: &Nft, policy: &Policy) -> Result<(), FirewallError> {
    read_back(nft, &Ruleset::generate(policy)).map(|_| ())
}

/// Read our table back from the kernel and verify it against `expected`; return how many
/// listings that took. A listing that came back torn (see `core::verify`) is taken again,
/// a few times; any other difference fails at once. Nothing is ever passed unverified.
fn read_back(nft: &Nft, expected: &Ruleset) -> Result<usize, FirewallError> {
    if let Some((user, net)) = nft.netlink_target() {
        let lowered = Lowered::new(expected)?;
        let mut sock =
            NlSocket::open_in_namespaces(user, net).map_err(FirewallError::ReadNetlink)?;
        return read_back_netlink(&mut sock, expected, &lowered).map(|(reads, _)| reads);
    }
    let mut reads = 0;
    loop {
        let live = nft
            .list_table_json()
            .map_err(FirewallError::Read)?
            .ok_or(FirewallError::Missing)?;
        reads += 1;
        let Err(err) = verify(expected, &live) else {
            return Ok(reads);
        };
        drop(live);
        match reread_after(reads, &err) {
            Some(pause) => std::thread::sleep(pause),
            None if err.listing_torn() => {
                return Err(FirewallError::Unverifiable { reads, source: err })
            }
            None => return Err(err.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_netns::TempNetns;
    use super::*;
    use crate::core::policy::{AllowRule, HostLoopback, Mode};
    use crate::core::target::{PortScope, Protocol};

    /// A live deny over netlink rewrites only the changed set, in one batch, and verifies on
    /// the first read: no fallback to replacing the table.
    #[test]
    fn a_live_deny_rewrites_one_set_over_netlink() {
        let Some(ns) = TempNetns::new("deny-quick") else {
            return;
        };
        let nft = ns.nft();
        let old = rich_policy(Mode::DenyAll);
        apply(&nft, &old).unwrap();
        let mut new = old.clone();
        new.deny.push("198.51.100.77/32".parse().unwrap());
        let report = update(&nft, &old, &new).unwrap();
        eprintln!("{report:?}");
        assert_eq!(report.backend, NETLINK);
        assert_eq!(report.transactions, 1, "{report:?}");
        assert_eq!(report.reads, 1, "{report:?}");
        check(&nft, &new).unwrap();
    }

    /// Live changes that only add to sets, and ones that must take elements away (a deny
    /// merging with its neighbour, a deny lifted, an allow taken back), each leave exactly
    /// the new policy live, verified on the first read, without replacing the table.
    #[test]
    fn live_changes_that_add_or_take_away_leave_exactly_the_new_policy() {
        let Some(ns) = TempNetns::new("live-steps") else {
            return;
        };
        let nft = ns.nft();
        let mut policy = rich_policy(Mode::DenyAll);
        apply(&nft, &policy).unwrap();
        let steps: [&dyn Fn(&mut Policy); 6] = [
            &|p| p.deny.push("198.51.100.77/32".parse().unwrap()),
            &|p| p.deny.push("198.51.100.76/32".parse().unwrap()),
            &|p| p.deny.push("2001:db8:5::/48".parse().unwrap()),
            &|p| p.deny.retain(|n| n.to_string() != "198.51.100.77/32"),
            &|p| {
                p.allow.push(AllowRule {
                    net: "198.51.100.88/32".parse().unwrap(),
                    scope: None,
                })
            },
            &|p| p.allow.retain(|r| r.net.to_string() != "198.51.100.10/32"),
        ];
        for (i, step) in steps.iter().enumerate() {
            let old = policy.clone();
            step(&mut policy);
            let report = update(&nft, &old, &policy).unwrap();
            assert_eq!(report.backend, NETLINK, "step {i}");
            assert_eq!(report.reads, 1, "step {i}: {report:?}");
            check(&nft, &policy).unwrap_or_else(|e| panic!("step {i}: {e}"));
        }
    }

    /// The learned sets' elements, dumped over netlink as the connection cut reads them:
    /// plain and port-scoped, IPv4 and IPv6, each once.
    #[test]
    fn learned_elements_are_dumped_over_netlink() {
        let Some(ns) = TempNetns::new("learned-dump") else {
            return;
        };
        apply(&ns.nft(), &rich_policy(Mode::DenyAll)).unwrap();
        let add = std::process::Command::new("ip")
            .args(["netns", "exec", ns.name(), "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write as _;
                c.stdin.take().unwrap().write_all(
                    b"add element inet terok_shield dns_v4 { 198.51.100.7 timeout 60s }\n\
                      add element inet terok_shield dns_v6 { 2001:db8::7 timeout 60s }\n\
                      add element inet terok_shield dns_svc_v4 { 198.51.100.8 . tcp . 443 timeout 60s }\n",
                )?;
                c.wait()
            })
            .unwrap();
        assert!(add.success());
        let mut sock = NlSocket::open_in(Some(&ns.path())).unwrap();
        let mut learned = Vec::new();
        for set in ["dns_v4", "dns_v6", "dns_svc_v4", "dns_svc_v6"] {
            let elems = sock.dump_set_elements(set).unwrap();
            learned.extend(crate::core::verify::learned_from_netlink(set, &elems));
        }
        learned.sort();
        let want: Vec<crate::core::verify::Learned> = vec![
            ("198.51.100.7".parse().unwrap(), None),
            ("198.51.100.8".parse().unwrap(), Some((6, 443))),
            ("2001:db8::7".parse().unwrap(), None),
        ];
        assert_eq!(learned, want);
        let missing = sock.dump_set_elements("no_such_set").unwrap_err();
        assert!(missing.to_string().contains("no_such_set"), "{missing}");
    }

    fn rich_policy(mode: Mode) -> Policy {
        let mut p = Policy::new(mode);
        let r = |s: &str, scope| AllowRule {
            net: s.parse().unwrap(),
            scope,
        };
        p.allow = vec![
            r("198.51.100.10/32", None),
            r("198.18.0.0/16", None),
            r("2001:db8::10/128", None),
            r("2001:db8:1::/48", None),
            r(
                "198.51.100.22/32",
                Some(PortScope {
                    port: 22,
                    protocol: Some(Protocol::Tcp),
                }),
            ),
            r(
                "2001:db8:2::/64",
                Some(PortScope {
                    port: 443,
                    protocol: None,
                }),
            ),
        ];
        p.deny = vec![
            "198.18.0.9/32".parse().unwrap(),
            "2001:db8:1::9/128".parse().unwrap(),
        ];
        p.dns_servers = vec![
            "198.51.100.53".parse().unwrap(),
            "2001:db8::53".parse().unwrap(),
        ];
        p.host_loopback = Some(HostLoopback {
            gateway: "198.51.100.1".parse().unwrap(),
            ports: vec![8080],
        });
        p.resolver_mark = Some(0x5eed);
        p
    }

    #[test]
    fn every_mode_applies_and_verifies_against_real_nft() {
        let Some(ns) = TempNetns::new("modes") else {
            return;
        };
        let nft = ns.nft();
        for mode in [
            Mode::DenyAll,
            Mode::Bypass,
            Mode::BypassAll,
            Mode::Block,
            Mode::DenyAll,
        ] {
            let report =
                apply(&nft, &rich_policy(mode)).unwrap_or_else(|e| panic!("{mode:?}: {e}"));
            assert!(report.elements >= 8);
            check(&nft, &rich_policy(mode)).unwrap();
        }
        // A policy that differs from what is live must fail verification.
        let mut other = rich_policy(Mode::DenyAll);
        other.allow.pop();
        assert!(matches!(check(&nft, &other), Err(FirewallError::Verify(_))));
        let mut other = rich_policy(Mode::DenyAll);
        other.mode = Mode::Bypass;
        assert!(matches!(check(&nft, &other), Err(FirewallError::Verify(_))));
    }

    #[test]
    fn tampering_after_apply_is_detected() {
        let Some(ns) = TempNetns::new("tamper") else {
            return;
        };
        let nft = ns.nft();
        let policy = rich_policy(Mode::DenyAll);
        apply(&nft, &policy).unwrap();
        nft.run_script("insert rule inet terok_shield output accept\n")
            .unwrap();
        assert!(matches!(
            check(&nft, &policy),
            Err(FirewallError::Verify(_))
        ));
        apply(&nft, &policy).unwrap();
        nft.run_script("add element inet terok_shield allow_v4 { 198.51.100.99 }\n")
            .unwrap();
        assert!(matches!(
            check(&nft, &policy),
            Err(FirewallError::Verify(_))
        ));
        nft.delete_table().unwrap();
        assert!(matches!(check(&nft, &policy), Err(FirewallError::Missing)));
    }

    #[test]
    fn fresh_apply_refuses_a_namespace_that_already_has_a_table() {
        let Some(ns) = TempNetns::new("fresh") else {
            return;
        };
        let nft = ns.nft();
        let policy = rich_policy(Mode::DenyAll);
        apply_fresh(&nft, &policy).unwrap();
        // A second fresh apply merges into the existing table: verification must refuse it.
        assert!(matches!(
            apply_fresh(&nft, &policy),
            Err(FirewallError::Verify(_))
        ));
        apply(&nft, &policy).unwrap();
    }

    #[test]
    fn updates_rewrite_sets_and_recover_from_drift() {
        let Some(ns) = TempNetns::new("update") else {
            return;
        };
        let nft = ns.nft();
        let old = rich_policy(Mode::DenyAll);
        apply(&nft, &old).unwrap();
        let mut new = old.clone();
        new.allow.push(AllowRule {
            net: "198.51.100.99/32".parse().unwrap(),
            scope: None,
        });
        new.deny.push("198.18.4.0/24".parse().unwrap());
        let report = update(&nft, &old, &new).unwrap();
        assert_eq!(report.transactions, 1);
        check(&nft, &new).unwrap();
        // Drift: someone removed a chain rule; the update repairs it by a full replacement.
        nft.run_script("flush chain inet terok_shield input\n")
            .unwrap();
        update(&nft, &new, &old).unwrap();
        check(&nft, &old).unwrap();
        // A mode change replaces the table.
        let mut bypass = old.clone();
        bypass.mode = Mode::Bypass;
        update(&nft, &old, &bypass).unwrap();
        check(&nft, &bypass).unwrap();
    }

    /// An nft that runs the real one, but whose first `torn` JSON listings show `allow_v4` as
    /// a torn dump does: 198.51.100.10 twice, 198.51.100.99 not at all.
    fn torn_nft(dir: &std::path::Path, ns: &TempNetns, torn: u32) -> Nft {
        use std::os::unix::fs::PermissionsExt;
        let real = Nft::locate().unwrap().program().display().to_string();
        let count = dir.join("listings");
        let script = dir.join("nft-torn");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n\
                 if [ \"$1\" != -j ]; then exec {real} \"$@\"; fi\n\
                 n=$(cat {c} 2>/dev/null || echo 0); echo $((n + 1)) >{c}\n\
                 out=$({real} \"$@\") || exit $?\n\
                 if [ \"$n\" -lt {torn} ]; then\n\
                 \x20 printf '%s\\n' \"$out\" | sed 's/\"198\\.51\\.100\\.99\"/\"198.51.100.10\"/'\n\
                 else\n\
                 \x20 printf '%s\\n' \"$out\"\n\
                 fi\n",
                c = count.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let _ = std::fs::remove_file(&count);
        Nft::at(script).in_netns(ns.path())
    }

    #[test]
    fn a_torn_listing_is_read_again_and_never_passed() {
        let Some(ns) = TempNetns::new("torn") else {
            return;
        };
        let dir = std::env::temp_dir().join(format!("tsr-torn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut policy = rich_policy(Mode::DenyAll);
        policy.allow.push(AllowRule {
            net: "198.51.100.99/32".parse().unwrap(),
            scope: None,
        });
        // Torn twice, then faithful: applied, verified on the third listing.
        let report = apply(&torn_nft(&dir, &ns, 2), &policy).unwrap();
        assert_eq!(report.reads, 3, "{report:?}");
        // Torn every time: never passed; fails closed after a bounded number of listings.
        let err = check(&torn_nft(&dir, &ns, 99), &policy).unwrap_err();
        assert!(
            matches!(err, FirewallError::Unverifiable { reads: 5, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("allow_v4"), "{err}");
        // A listing that lacks an element without repeating one is a difference: no re-read.
        let mut fewer = policy.clone();
        fewer
            .allow
            .retain(|r| r.net.addr().to_string() != "198.51.100.10");
        let nft = torn_nft(&dir, &ns, 0);
        assert!(matches!(check(&nft, &fewer), Err(FirewallError::Verify(_))));
        let listings: u32 = std::fs::read_to_string(dir.join("listings"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(listings, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The nft binary on this machine, for comparisons with the library.
    fn binary() -> Nft {
        Nft::at(crate::effects::nft::find_program("nft", &["/usr/sbin/nft", "/sbin/nft"]).unwrap())
    }

    /// A ruleset loaded over netlink (the default) and one loaded by the nft binary list back
    /// identically (rules, sets, elements, handles), in every mode, and the library's own
    /// listing is the binary's, JSON and text alike.
    #[test]
    fn netlink_and_binary_load_and_list_identically() {
        let (Some(by_lib), Some(by_bin)) = (TempNetns::new("eqlib"), TempNetns::new("eqbin"))
        else {
            return;
        };
        let lib = Nft::locate().unwrap().in_netns(by_lib.path());
        assert_eq!(
            lib.backend(),
            "libnftables",
            "libnftables must load on the test host"
        );
        let bin = binary().in_netns(by_bin.path());
        let bin_of_lib = binary().in_netns(by_lib.path());
        for mode in [Mode::DenyAll, Mode::Bypass, Mode::BypassAll, Mode::Block] {
            let policy = rich_policy(mode);
            assert_eq!(apply(&lib, &policy).unwrap().backend, NETLINK);
            assert_eq!(apply(&bin, &policy).unwrap().backend, "nft");
            let listed = |n: &Nft| n.list_table_json().unwrap().unwrap();
            assert_eq!(listed(&bin_of_lib), listed(&bin), "{mode:?}");
            assert_eq!(listed(&lib), listed(&bin_of_lib), "{mode:?}");
            assert_eq!(
                lib.list_table_text().unwrap(),
                bin_of_lib.list_table_text().unwrap(),
                "{mode:?}"
            );
        }
        lib.delete_table().unwrap();
        assert!(lib.list_table_json().unwrap().is_none());
        assert!(bin_of_lib.list_table_json().unwrap().is_none());
    }

    /// A library session is reused across commands: changes made meanwhile by someone else
    /// (here the nft binary) must show in its next listing, never a cached view.
    #[test]
    fn a_reused_library_session_sees_changes_made_by_others() {
        let Some(ns) = TempNetns::new("stale") else {
            return;
        };
        let nft = ns.nft();
        let policy = rich_policy(Mode::DenyAll);
        apply(&nft, &policy).unwrap();
        check(&nft, &policy).unwrap();
        binary()
            .in_netns(ns.path())
            .run_script("add element inet terok_shield allow_v4 { 198.51.100.99 }\n")
            .unwrap();
        assert!(matches!(
            check(&nft, &policy),
            Err(FirewallError::Verify(_))
        ));
        binary().in_netns(ns.path()).delete_table().unwrap();
        assert!(matches!(check(&nft, &policy), Err(FirewallError::Missing)));
    }

    /// A user namespace to join as well (a rootless container reached from the user's
    /// shell): a forked child that joined both opens the netlink socket (and the library, for
    /// the listing below, runs in a forked worker that joined both).
    #[test]
    fn a_user_namespace_is_joined_through_a_forked_child() {
        if TempNetns::new("userns-probe").is_none() {
            return;
        }
        let mut holder = std::process::Command::new("unshare")
            .args(["--user", "--map-root-user", "--net", "sleep", "30"])
            .spawn()
            .expect("unshare");
        let pid = holder.id();
        let user = std::path::PathBuf::from(format!("/proc/{pid}/ns/user"));
        let net = std::path::PathBuf::from(format!("/proc/{pid}/ns/net"));
        // Wait until unshare has made its namespaces.
        let own = std::fs::metadata("/proc/self/ns/user").unwrap();
        for _ in 0..200 {
            use std::os::unix::fs::MetadataExt;
            if std::fs::metadata(&user).is_ok_and(|m| m.ino() != own.ino()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let nft = Nft::locate()
            .unwrap()
            .in_namespaces(Some(user.clone()), net.clone());
        let policy = rich_policy(Mode::DenyAll);
        let result = apply(&nft, &policy).and_then(|r| check(&nft, &policy).map(|()| r));
        let seen_by_binary = binary().in_namespaces(Some(user), net).list_table_json();
        let _ = holder.kill();
        let _ = holder.wait();
        assert_eq!(result.unwrap().backend, NETLINK);
        assert!(seen_by_binary.unwrap().is_some());
    }

    #[test]
    fn missing_nft_binary_is_a_clear_error() {
        let err = apply(&Nft::at("/nonexistent/nft"), &Policy::new(Mode::DenyAll)).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/nft"), "{err}");
    }
}

#[cfg(test)]
mod real_nft_properties {
    use super::tests_netns::TempNetns;
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Any valid policy loads into a real kernel and reads back identical.
        #[test]
        fn any_policy_applies_and_verifies(policy in crate::core::proptests::arb_policy()) {
            if let Some(ns) = TempNetns::new("prop") {
                let nft = ns.nft();
                apply(&nft, &policy).map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests_netns {
    use super::*;
    use std::process::Command;

    /// A throwaway network namespace, deleted on drop.
    pub struct TempNetns(String);

    impl TempNetns {
        pub fn new(tag: &str) -> Option<TempNetns> {
            let privileged = rustix::process::geteuid().is_root()
                && Command::new("ip").arg("-V").output().is_ok()
                && Nft::locate().is_ok();
            if !privileged {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "privileged test cannot run in CI: needs root, ip and nft"
                );
                eprintln!("skipping: needs root, ip and nft");
                return None;
            }
            let name = format!("tsr-{}-{tag}", std::process::id());
            let ok = Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .unwrap()
                .success();
            assert!(ok, "ip netns add {name} failed");
            Some(TempNetns(name))
        }

        pub fn nft(&self) -> Nft {
            Nft::locate().unwrap().in_netns(self.path())
        }

        pub fn path(&self) -> std::path::PathBuf {
            format!("/run/netns/{}", self.0).into()
        }

        /// Its name, for `ip -n NAME`.
        pub fn name(&self) -> &str {
            &self.0
        }
    }

    impl Drop for TempNetns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
}
