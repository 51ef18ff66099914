//! Verification: does the live table (as `nft -j` reports it) have exactly the structure we
//! generated? Compared structurally — hooks, policies, chain order, every rule's expressions,
//! set types, flags and literal elements — never by searching text.
//!
//! Pure: it takes the parsed JSON, so it is unit-tested without a kernel.
//!
//! A listing can itself be wrong. The kernel dumps a hash set (`allow_v4`, `allow_v6`, the
//! DNS-learned sets) by walking its rhashtable once per netlink message and skipping what
//! earlier messages already carried. Right after a bulk load the table grows in a deferred
//! kernel worker; a dump that overlaps such a resize skips part of the set and repeats other
//! elements (measured: 100,000 elements listed, 86,477 distinct). A set never holds an element
//! twice, so a repeated element proves the listing torn: verification reports it (never
//! passes it), and says so in [`VerifyError::torn`], so that the caller may read the table
//! again rather than refuse a firewall that is in fact right.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use serde_json::Value;
use thiserror::Error;

use super::nft_netlink::{
    ChainObj, ElemObj, Expr, LiveTable, Lowered, RuleObj, SetObj, SetWithElems,
    ELEM_F_INTERVAL_END, SET_F_INTERVAL,
};
use super::ruleset::{Element, Ruleset, SetDef, FAMILY, TABLE};

/// Differences between the expected and the live ruleset; any one is fatal (fail closed).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("the live firewall does not match what was applied:\n  - {}", .problems.join("\n  - "))]
pub struct VerifyError {
    /// Every difference found, one line each.
    pub problems: Vec<String>,
    /// Sets whose listing repeated elements: the listing was inconsistent (a torn dump), so
    /// the element comparison of those sets says nothing about what is live. Reading the
    /// table again may give a faithful listing; nothing else turns this error into a pass.
    pub torn: Vec<String>,
}

impl VerifyError {
    fn new(problems: Vec<String>) -> VerifyError {
        VerifyError {
            problems,
            torn: Vec::new(),
        }
    }

    /// Whether some listed set repeated elements (see [`VerifyError::torn`]).
    pub fn listing_torn(&self) -> bool {
        !self.torn.is_empty()
    }
}

/// Pauses before each re-read of a listing that came back torn ([`VerifyError::torn`]).
/// A torn listing comes from a dump that overlapped the kernel's deferred resize of a hash
/// set, which finishes within milliseconds after a bulk load (measured: every listing taken
/// 200 ms after loading 100,000 elements was faithful); the pauses add up to about 1.5 s.
const REREAD_PAUSES: [Duration; 4] = [
    Duration::from_millis(20),
    Duration::from_millis(100),
    Duration::from_millis(400),
    Duration::from_millis(1000),
];

/// After `reads` listings, the last of which failed verification with `err`: how long to
/// wait before reading the table again, or `None` to give up (fail closed). Only a torn
/// listing is read again; a listing that differs from the policy is final.
pub fn reread_after(reads: usize, err: &VerifyError) -> Option<Duration> {
    if !err.listing_torn() {
        return None;
    }
    REREAD_PAUSES.get(reads.checked_sub(1)?).copied()
}

/// A closed interval of addresses, tagged with family (IPv4 sorts before IPv6).
type Range = (bool, u128, u128);

/// Check `live` (the whole output of `nft -j list table inet terok_shield`) against `expected`.
pub fn verify(expected: &Ruleset, live: &Value) -> Result<(), VerifyError> {
    let mut problems = Vec::new();
    let mut torn = Vec::new();
    let objects = live
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| VerifyError::new(vec!["nft output has no `nftables` array".into()]))?;

    let mut tables = 0;
    let mut live_sets: BTreeMap<String, &Value> = BTreeMap::new();
    let mut live_chains: BTreeMap<String, &Value> = BTreeMap::new();
    let mut live_rules: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for obj in objects {
        let ours = |o: &Value| {
            o.get("family").and_then(Value::as_str) == Some(FAMILY)
                && o.get("table").and_then(Value::as_str) == Some(TABLE)
        };
        if let Some(t) = obj.get("table") {
            if t.get("family").and_then(Value::as_str) == Some(FAMILY)
                && t.get("name").and_then(Value::as_str) == Some(TABLE)
            {
                tables += 1;
                // A `dormant` table keeps its chains but filters nothing; `owner` ties it
                // to one process and removes it when that exits. We set no flags at all.
                match t.get("flags") {
                    None => {}
                    Some(Value::Array(a)) if a.is_empty() => {}
                    Some(flags) => problems.push(format!(
                        "table {FAMILY} {TABLE} has flags {flags} (a dormant table filters nothing)"
                    )),
                }
            }
        } else if let Some(s) = obj.get("set").filter(|s| ours(s)) {
            // The kernel holds one set of a name; a listing with two is not a faithful
            // picture, and either copy alone could hide the other.
            if live_sets.insert(str_field(s, "name"), s).is_some() {
                problems.push(format!("set {} is listed twice", str_field(s, "name")));
            }
        } else if let Some(c) = obj.get("chain").filter(|c| ours(c)) {
            if live_chains.insert(str_field(c, "name"), c).is_some() {
                problems.push(format!("chain {} is listed twice", str_field(c, "name")));
            }
        } else if let Some(r) = obj.get("rule").filter(|r| ours(r)) {
            live_rules.entry(str_field(r, "chain")).or_default().push(r);
        } else if let Some((kind, body)) = obj.as_object().and_then(|o| o.iter().next()) {
            // Maps, flowtables, counters, ...: we create none, so any is a difference.
            if kind != "metainfo" && ours(body) {
                problems.push(format!("unexpected {kind} {}", str_field(body, "name")));
            }
        }
    }
    if tables != 1 {
        problems.push(format!(
            "expected one table {FAMILY} {TABLE}, found {tables}"
        ));
    }

    for set in &expected.sets {
        match live_sets.remove(set.name) {
            None => problems.push(format!("set {} is missing", set.name)),
            Some(live) => check_set(set, live, &mut problems, &mut torn),
        }
    }
    for name in live_sets.keys() {
        problems.push(format!("unexpected set {name}"));
    }

    for chain in &expected.chains {
        let Some(live) = live_chains.remove(chain.name) else {
            problems.push(format!("chain {} is missing", chain.name));
            continue;
        };
        let hook = live.get("hook").and_then(Value::as_str);
        let policy = live.get("policy").and_then(Value::as_str);
        match chain.hook {
            Some(h)
                if hook != Some(h.hook)
                    || policy != Some(h.policy)
                    || live.get("type").and_then(Value::as_str) != Some("filter")
                    || live.get("prio").and_then(Value::as_i64) != Some(0) =>
            {
                problems.push(format!(
                    "chain {}: expected filter hook {} priority 0 policy {}, found hook {:?} policy {:?}",
                    chain.name, h.hook, h.policy, hook, policy
                ));
            }
            Some(_) => {}
            None if hook.is_some() => {
                problems.push(format!("chain {} should not be a base chain", chain.name));
            }
            None => {}
        }
        let rules = live_rules.remove(chain.name).unwrap_or_default();
        if rules.len() != chain.rules.len() {
            problems.push(format!(
                "chain {}: expected {} rules, found {}",
                chain.name,
                chain.rules.len(),
                rules.len()
            ));
        }
        for (i, (want, got)) in chain.rules.iter().zip(rules).enumerate() {
            let want = want.to_json();
            let got = got.get("expr").unwrap_or(&Value::Null);
            if !json_equiv(&want, got) {
                problems.push(format!(
                    "chain {} rule {}: expected {want}, found {got}",
                    chain.name,
                    i + 1
                ));
            }
        }
    }
    for name in live_chains.keys() {
        problems.push(format!("unexpected chain {name}"));
    }
    for name in live_rules.keys() {
        problems.push(format!("rules in unknown chain {name}"));
    }

    if problems.is_empty() {
        Ok(())
    } else {
        Err(VerifyError { problems, torn })
    }
}

fn str_field(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn check_set(set: &SetDef, live: &Value, problems: &mut Vec<String>, torn: &mut Vec<String>) {
    let want_type: Vec<&str> = set.kind.type_names().to_vec();
    let got_type: Vec<&str> = match live.get("type") {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if want_type != got_type {
        problems.push(format!(
            "set {}: type {got_type:?}, expected {want_type:?}",
            set.name
        ));
    }
    let mut got_flags: Vec<&str> = live
        .get("flags")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    got_flags.sort_unstable();
    let mut want_flags = set.kind.flags().to_vec();
    want_flags.sort_unstable();
    if got_flags != want_flags {
        problems.push(format!(
            "set {}: flags {got_flags:?}, expected {want_flags:?}",
            set.name
        ));
    }
    let got_timeout = live.get("timeout").and_then(Value::as_u64);
    if got_timeout != set.timeout.map(u64::from) {
        problems.push(format!(
            "set {}: default timeout {got_timeout:?}, expected {:?}",
            set.name, set.timeout
        ));
    }
    if set.kind.is_learned() {
        return; // filled and expired at run time by the resolver
    }
    let empty = Vec::new();
    let live_elems = live.get("elem").and_then(Value::as_array).unwrap_or(&empty);
    match normalise_live(live_elems) {
        None => problems.push(format!("set {}: elements in an unexpected form", set.name)),
        Some(Listed { repeated, .. }) if repeated > 0 => {
            problems.push(format!(
                "set {}: the listing repeats {repeated} of its {} elements, so it is not a faithful \
                 picture of the set (a kernel dump torn by a concurrent hash table resize)",
                set.name,
                live_elems.len()
            ));
            torn.push(set.name.to_string());
        }
        Some(Listed { groups: got, .. }) => {
            let want = normalise_expected(&set.elements);
            if got != want {
                let (g, w) = (count(&got), count(&want));
                problems.push(format!(
                    "set {}: live elements differ from the policy ({} live range groups vs {} expected)",
                    set.name, g, w
                ));
            }
        }
    }
}

fn count(m: &BTreeMap<(String, u16), Vec<Range>>) -> usize {
    m.values().map(Vec::len).sum()
}

/// Elements grouped by (protocol, port) ("", 0 for plain address sets), as merged ranges.
fn normalise_expected(elements: &[Element]) -> BTreeMap<(String, u16), Vec<Range>> {
    let mut out: BTreeMap<(String, u16), Vec<Range>> = BTreeMap::new();
    // Addresses and networks (a big allowlist) all go to the group ("", 0): gathered apart,
    // without a map look-up each.
    let mut plain: Vec<Range> = Vec::new();
    for e in elements {
        match e {
            Element::Addr(a) => plain.push(addr_range(*a, None)),
            Element::Net(n) => plain.push(addr_range(n.network(), Some(n.broadcast()))),
            Element::Svc(n, proto, port) => out
                .entry((proto.keyword().to_string(), *port))
                .or_default()
                .push(addr_range(n.network(), Some(n.broadcast()))),
        }
    }
    if !plain.is_empty() {
        out.insert((String::new(), 0), plain);
    }
    merge_all(out)
}

/// A set's listing: its elements as merged ranges, and how many listed elements repeated an
/// earlier one exactly (non-zero only in a torn listing).
struct Listed {
    groups: BTreeMap<(String, u16), Vec<Range>>,
    repeated: usize,
}

fn normalise_live(elements: &[Value]) -> Option<Listed> {
    let mut out: BTreeMap<(String, u16), Vec<Range>> = BTreeMap::new();
    for e in elements {
        let e = e.get("elem").and_then(|x| x.get("val")).unwrap_or(e);
        let (key, r) = if let Some(parts) = e.get("concat").and_then(Value::as_array) {
            let [addr, proto, port] = parts.as_slice() else {
                return None;
            };
            let port = u16::try_from(port.as_u64()?).ok()?;
            ((proto.as_str()?.to_string(), port), live_range(addr)?)
        } else {
            ((String::new(), 0), live_range(e)?)
        };
        out.entry(key).or_default().push(r);
    }
    let mut repeated = 0;
    for ranges in out.values_mut() {
        ranges.sort_unstable();
        let before = ranges.len();
        ranges.dedup();
        repeated += before - ranges.len();
    }
    Some(Listed {
        groups: merge_all(out),
        repeated,
    })
}

fn live_range(v: &Value) -> Option<Range> {
    if let Some(s) = v.as_str() {
        return Some(addr_range(s.parse().ok()?, None));
    }
    if let Some(p) = v.get("prefix") {
        let addr: IpAddr = p.get("addr")?.as_str()?.parse().ok()?;
        let len = u8::try_from(p.get("len")?.as_u64()?).ok()?;
        let net = ipnet::IpNet::new(addr, len).ok()?;
        return Some(addr_range(net.network(), Some(net.broadcast())));
    }
    if let Some([a, b]) = v.get("range").and_then(Value::as_array).map(Vec::as_slice) {
        let a: IpAddr = a.as_str()?.parse().ok()?;
        let b: IpAddr = b.as_str()?.parse().ok()?;
        return Some(addr_range(a, Some(b)));
    }
    None
}

fn addr_range(a: IpAddr, b: Option<IpAddr>) -> Range {
    let num = |x: IpAddr| match x {
        IpAddr::V4(v) => u128::from(u32::from(v)),
        IpAddr::V6(v) => u128::from(v),
    };
    (a.is_ipv4(), num(a), num(b.unwrap_or(a)))
}

fn merge_all(map: BTreeMap<(String, u16), Vec<Range>>) -> BTreeMap<(String, u16), Vec<Range>> {
    map.into_iter()
        .map(|(k, mut v)| {
            v.sort_unstable();
            let mut merged: Vec<Range> = Vec::with_capacity(v.len());
            for r in v {
                match merged.last_mut() {
                    Some(last) if last.0 == r.0 && r.1 <= last.2.saturating_add(1) => {
                        last.2 = last.2.max(r.2);
                    }
                    _ => merged.push(r),
                }
            }
            (k, merged)
        })
        .collect()
}

/// [`verify_netlink`] of a read that follows `previous` (the read before it, if any).
///
/// The kernel flags a dump as interrupted whenever any transaction commits while it runs, and
/// the container's resolver commits one per learned answer: under DNS load nearly every dump
/// is flagged, although learned elements are not even dumped. So an interrupted read is
/// accepted when, taken as complete, it verifies, and it is identical to the read before it:
/// two dumps in a row holding the same chains, rules, sets and literal elements show what is
/// in force. Anything else flagged stays torn (read again, then refused).
pub fn verify_netlink_after(
    expected: &Ruleset,
    lowered: &Lowered,
    previous: Option<&LiveTable>,
    live: &LiveTable,
) -> Result<(), VerifyError> {
    let err = match verify_netlink(expected, lowered, live) {
        Ok(()) => return Ok(()),
        Err(err) => err,
    };
    let settled = |t: &LiveTable| LiveTable {
        interrupted: false,
        ..t.clone()
    };
    let stable = live.interrupted
        && previous.is_some_and(|p| settled(p) == settled(live))
        && verify_netlink(expected, lowered, &settled(live)).is_ok();
    if stable {
        Ok(())
    } else {
        Err(err)
    }
}

/// Check `live` (our table as the kernel dumped it over netlink) against `expected` and its
/// netlink lowering: chains, rules expression by expression (anonymous sets by contents),
/// set definitions, and the elements of every set that is not learned at run time. A dump
/// that repeats an element, or that the kernel flagged as interrupted by a concurrent change,
/// is torn (see [`VerifyError::torn`]).
pub fn verify_netlink(
    expected: &Ruleset,
    lowered: &Lowered,
    live: &LiveTable,
) -> Result<(), VerifyError> {
    let mut problems = Vec::new();
    let mut torn = Vec::new();
    if live.interrupted {
        problems.push(
            "the kernel flagged a dump of the table as interrupted by a concurrent change".into(),
        );
        torn.push("(dump interrupted)".to_string());
    }
    if live.flags != 0 {
        problems.push(format!(
            "table {FAMILY} {TABLE} has flags {:#x} (a dormant table filters nothing)",
            live.flags
        ));
    }
    // Chains.
    let mut live_chains: BTreeMap<&str, &ChainObj> = BTreeMap::new();
    for c in &live.chains {
        if live_chains.insert(c.name.as_str(), c).is_some() {
            problems.push(format!("chain {} is listed twice", c.name));
        }
    }
    for want in &lowered.chains {
        match live_chains.remove(want.name.as_str()) {
            None => problems.push(format!("chain {} is missing", want.name)),
            Some(got) if got != want => problems.push(format!(
                "chain {}: expected {:?} flags {:#x}, found {:?} flags {:#x}",
                want.name, want.base, want.flags, got.base, got.flags
            )),
            Some(_) => {}
        }
    }
    for name in live_chains.keys() {
        problems.push(format!("unexpected chain {name}"));
    }
    // Sets by name; anonymous ones are matched through the rules that use them.
    let mut live_sets: BTreeMap<&str, &(SetObj, Vec<ElemObj>)> = BTreeMap::new();
    for s in &live.sets {
        if live_sets.insert(s.0.name.as_str(), s).is_some() {
            problems.push(format!("set {} is listed twice", s.0.name));
        }
    }
    let by_id: BTreeMap<u32, &SetWithElems> = lowered.sets.iter().map(|s| (s.id, s)).collect();
    // Rules, in order, per chain.
    for want_chain in &lowered.chains {
        let want: Vec<&RuleObj> = lowered
            .rules
            .iter()
            .filter(|r| r.chain == want_chain.name)
            .collect();
        let got: Vec<&RuleObj> = live
            .rules
            .iter()
            .filter(|r| r.chain == want_chain.name)
            .collect();
        if want.len() != got.len() {
            problems.push(format!(
                "chain {}: expected {} rules, found {}",
                want_chain.name,
                want.len(),
                got.len()
            ));
        }
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            if let Err(why) = same_rule(w, g, &by_id, &mut live_sets) {
                problems.push(format!("chain {} rule {}: {why}", want_chain.name, i + 1));
            }
        }
    }
    for r in &live.rules {
        if !lowered.chains.iter().any(|c| c.name == r.chain) {
            problems.push(format!("rules in unknown chain {}", r.chain));
        }
    }
    // Named sets.
    for set in &expected.sets {
        let Some(want) = lowered.sets.iter().find(|s| s.set.name == set.name) else {
            problems.push(format!("set {} has no netlink form", set.name));
            continue;
        };
        let Some((got, elems)) = live_sets.remove(set.name) else {
            problems.push(format!("set {} is missing", set.name));
            continue;
        };
        if *got != want.set {
            problems.push(format!(
                "set {}: definition differs (expected {:?}, found {:?})",
                set.name, want.set, got
            ));
            continue;
        }
        if set.kind.is_learned() {
            continue;
        }
        match live_groups(got, elems) {
            None => problems.push(format!("set {}: elements in an unexpected form", set.name)),
            Some(Listed { repeated, .. }) if repeated > 0 => {
                problems.push(format!(
                    "set {}: the dump repeats {repeated} of its {} elements, so it is not a faithful \
                     picture of the set (a kernel dump torn by a concurrent hash table resize)",
                    set.name,
                    elems.len()
                ));
                torn.push(set.name.to_string());
            }
            Some(Listed { groups, .. }) => {
                let want = normalise_expected(&set.elements);
                if groups != want {
                    problems.push(format!(
                        "set {}: live elements differ from the policy ({} live range groups vs {} expected)",
                        set.name,
                        count(&groups),
                        count(&want)
                    ));
                }
            }
        }
    }
    for name in live_sets.keys() {
        problems.push(format!("unexpected set {name}"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(VerifyError { problems, torn })
    }
}

/// Compare one rule; an anonymous set a lookup uses is compared by definition and contents
/// and taken out of `live_sets`.
fn same_rule(
    want: &RuleObj,
    got: &RuleObj,
    by_id: &BTreeMap<u32, &SetWithElems>,
    live_sets: &mut BTreeMap<&str, &(SetObj, Vec<ElemObj>)>,
) -> Result<(), String> {
    if want.exprs.len() != got.exprs.len() {
        return Err(format!(
            "expected {} expressions, found {}: {:?}",
            want.exprs.len(),
            got.exprs.len(),
            got.exprs
        ));
    }
    for (w, g) in want.exprs.iter().zip(&got.exprs) {
        match (w, g) {
            (
                Expr::Lookup {
                    sreg: ws,
                    set: wname,
                    set_id: Some(id),
                    flags: wf,
                },
                Expr::Lookup {
                    sreg: gs,
                    set: gname,
                    flags: gf,
                    ..
                },
            ) if ws == gs && wf == gf => {
                let want_set = by_id.get(id).ok_or("lookup of an unknown set")?;
                if !want_set.set.is_anonymous() {
                    if wname != gname {
                        return Err(format!("looks up set {gname}, expected {wname}"));
                    }
                    continue;
                }
                let (set, elems) = live_sets.remove(gname.as_str()).ok_or_else(|| {
                    format!("looks up {gname}, which is not an anonymous set of ours")
                })?;
                let mut want_def = want_set.set.clone();
                want_def.name.clone_from(&set.name);
                if *set != want_def {
                    return Err(format!(
                        "anonymous set {gname}: expected {want_def:?}, found {set:?}"
                    ));
                }
                let (mut a, mut b) = (want_set.elems.clone(), elems.clone());
                a.sort_unstable();
                b.sort_unstable();
                if a != b {
                    return Err(format!("anonymous set {gname}: elements differ"));
                }
            }
            _ if w == g => {}
            _ => return Err(format!("expected {w:?}, found {g:?}")),
        }
    }
    Ok(())
}

/// A named set's live elements as the ranges [`normalise_expected`] makes of the policy's.
fn live_groups(set: &SetObj, elems: &[ElemObj]) -> Option<Listed> {
    let addr_len = match set.key_len {
        4 | 12 => 4,
        16 | 24 => 16,
        _ => return None,
    };
    if elems
        .iter()
        .any(|e| !e.unknown.is_empty() || e.timeout_ms.is_some())
    {
        return None;
    }
    if set.key_len as usize > addr_len {
        concat_groups(addr_len, elems)
    } else {
        addr_groups(addr_len, set.flags & SET_F_INTERVAL != 0, elems)
    }
}

/// An address of `addr_len` (4 or 16) bytes as a number.
fn addr_num(b: &[u8]) -> Option<u128> {
    match b.len() {
        4 => Some(u128::from(u32::from_be_bytes(b.try_into().ok()?))),
        16 => Some(u128::from_be_bytes(b.try_into().ok()?)),
        _ => None,
    }
}

/// [`live_groups`] of a set of single addresses or (`interval`) of ranges: the bulk of a big
/// allowlist, so it sorts plain numbers. Every element must be a bare address key (flags
/// none, or only the end marker in an interval set; no key end; unknown attributes and
/// timeouts are refused before), so the element is exactly its (address, end marker or
/// not): equal pairs are repeated elements, and their order is the elements' own order.
fn addr_groups(addr_len: usize, interval: bool, elems: &[ElemObj]) -> Option<Listed> {
    let v4 = addr_len == 4;
    let flags_allowed = if interval { ELEM_F_INTERVAL_END } else { 0 };
    if elems
        .iter()
        .any(|e| e.key_end.is_some() || e.key.len() != addr_len || e.flags & !flags_allowed != 0)
    {
        return None;
    }
    let mut ranges: Vec<Range> = Vec::with_capacity(elems.len());
    let repeated;
    if !interval && v4 {
        // The bulk of a big IPv4 allowlist: 4-byte keys sort fastest.
        let mut keys: Vec<u32> = elems
            .iter()
            .map(|e| Some(u32::from_be_bytes(e.key.as_slice().try_into().ok()?)))
            .collect::<Option<_>>()?;
        repeated = sort_and_count_repeats(&mut keys);
        ranges.extend(keys.iter().map(|&a| (v4, u128::from(a), u128::from(a))));
    } else if !interval {
        let mut keys: Vec<u128> = elems
            .iter()
            .map(|e| addr_num(&e.key))
            .collect::<Option<_>>()?;
        repeated = sort_and_count_repeats(&mut keys);
        ranges.extend(keys.iter().map(|&a| (v4, a, a)));
    } else {
        // (address, is a start): by address, an end marker before a start at the same
        // address (adjacent ranges: the range before ends where the next begins).
        let mut keys: Vec<(u128, bool)> = elems
            .iter()
            .map(|e| Some((addr_num(&e.key)?, e.flags & ELEM_F_INTERVAL_END == 0)))
            .collect::<Option<_>>()?;
        repeated = sort_and_count_repeats(&mut keys);
        let max = if v4 { u128::from(u32::MAX) } else { u128::MAX };
        for (i, &(start, is_start)) in keys.iter().enumerate() {
            if !is_start {
                continue;
            }
            let end = match keys.get(i + 1) {
                Some(&(next, _)) => next.checked_sub(1)?,
                None => max,
            };
            ranges.push((v4, start, end));
        }
    }
    let mut out: BTreeMap<(String, u16), Vec<Range>> = BTreeMap::new();
    if !ranges.is_empty() {
        out.insert((String::new(), 0), ranges);
    }
    Some(Listed {
        groups: merge_all(out),
        repeated,
    })
}

/// Sort `keys` and drop repeats; how many there were.
fn sort_and_count_repeats<T: Ord>(keys: &mut Vec<T>) -> usize {
    keys.sort_unstable();
    let before = keys.len();
    keys.dedup();
    before - keys.len()
}

/// [`live_groups`] of an address . protocol . port set (a handful of services).
fn concat_groups(addr_len: usize, elems: &[ElemObj]) -> Option<Listed> {
    let v4 = addr_len == 4;
    let mut sorted: Vec<&ElemObj> = elems.iter().collect();
    let repeated = sort_and_count_repeats(&mut sorted);
    let mut out: BTreeMap<(String, u16), Vec<Range>> = BTreeMap::new();
    for e in &sorted {
        let end = e.key_end.as_deref().unwrap_or(&e.key);
        if e.flags != 0 || e.key.len() != addr_len + 8 || end.len() != e.key.len() {
            return None;
        }
        if e.key[addr_len..] != end[addr_len..] {
            return None; // a range over protocols or ports: not ours
        }
        let proto = match e.key[addr_len] {
            6 => "tcp",
            17 => "udp",
            _ => return None,
        };
        let port = u16::from_be_bytes([e.key[addr_len + 4], e.key[addr_len + 5]]);
        out.entry((proto.to_string(), port)).or_default().push((
            v4,
            addr_num(&e.key[..addr_len])?,
            addr_num(&end[..addr_len])?,
        ));
    }
    Some(Listed {
        groups: merge_all(out),
        repeated,
    })
}

/// A destination learned from DNS: an address, optionally only for (IP protocol, port).
pub type Learned = (IpAddr, Option<(u8, u16)>);

/// The DNS-learned elements of the learned set `set` as netlink lists them (keys in nft's
/// layout: an address, or address . protocol . port with each field padded to 4 bytes).
/// Keys of any other length, or of another protocol than TCP and UDP, are skipped.
pub fn learned_from_netlink(
    set: &str,
    elems: &[crate::core::nft_netlink::ElemObj],
) -> Vec<Learned> {
    let addr = |k: &[u8]| -> Option<IpAddr> {
        match k.len() {
            4 => Some(IpAddr::from(<[u8; 4]>::try_from(k).ok()?)),
            16 => Some(IpAddr::from(<[u8; 16]>::try_from(k).ok()?)),
            _ => None,
        }
    };
    let scoped = set.starts_with("dns_svc_");
    elems
        .iter()
        .filter_map(|e| {
            let k = e.key.as_slice();
            if !scoped {
                return Some((addr(k)?, None));
            }
            let split = k.len().checked_sub(8)?;
            let (a, rest) = k.split_at(split);
            let proto = rest[0];
            let port = u16::from_be_bytes([rest[4], rest[5]]);
            (proto == 6 || proto == 17).then_some((addr(a)?, Some((proto, port))))
        })
        .collect()
}

/// The elements of the DNS-learned sets in a live table listing: what the resolver added at
/// run time, which `Policy` does not know and revocation must keep.
pub fn learned_elements(live: &Value) -> Vec<Learned> {
    let Some(objects) = live.get("nftables").and_then(Value::as_array) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for set in objects.iter().filter_map(|o| o.get("set")) {
        let name = set.get("name").and_then(Value::as_str).unwrap_or_default();
        if !name.starts_with("dns_") || set.get("table").and_then(Value::as_str) != Some(TABLE) {
            continue;
        }
        for e in set
            .get("elem")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let v = e.get("elem").and_then(|x| x.get("val")).unwrap_or(e);
            if let Some(addr) = v.as_str().and_then(|a| a.parse().ok()) {
                out.push((addr, None));
            } else if let Some([a, p, port]) =
                v.get("concat").and_then(Value::as_array).map(Vec::as_slice)
            {
                let proto = match p.as_str() {
                    Some("tcp") => 6,
                    Some("udp") => 17,
                    _ => continue,
                };
                if let (Some(addr), Some(port)) = (
                    a.as_str().and_then(|a| a.parse().ok()),
                    port.as_u64().and_then(|p| u16::try_from(p).ok()),
                ) {
                    out.push((addr, Some((proto, port))));
                }
            }
        }
    }
    out
}

/// JSON equality as nft means it: addresses compared by value (`::ffff:a.b.c.d` spellings),
/// anonymous-set members compared as an unordered collection (nft sorts them).
pub fn json_equiv(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(x), Value::String(y)) => {
            x == y || matches!((x.parse::<IpAddr>(), y.parse::<IpAddr>()), (Ok(p), Ok(q)) if p == q)
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_equiv(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            if let (Some(Value::Array(xs)), Some(Value::Array(ys)), 1, 1) =
                (x.get("set"), y.get("set"), x.len(), y.len())
            {
                return unordered_equiv(xs, ys);
            }
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_equiv(v, w)))
        }
        _ => a == b,
    }
}

fn unordered_equiv(xs: &[Value], ys: &[Value]) -> bool {
    if xs.len() != ys.len() {
        return false;
    }
    let mut used = vec![false; ys.len()];
    xs.iter().all(|x| {
        ys.iter().enumerate().any(|(i, y)| {
            if !used[i] && json_equiv(x, y) {
                used[i] = true;
                true
            } else {
                false
            }
        })
    })
}

/// Test support: render a ruleset the way `nft -j` would print it, to test verification.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;
    use serde_json::json;

    /// Build what nft would print for `rs` (the same shape as `nft -j list table`).
    pub fn as_live(rs: &Ruleset) -> Value {
        let mut objs = vec![
            json!({"metainfo": {}}),
            json!({"table": {"family": "inet", "name": TABLE, "handle": 1}}),
        ];
        for s in &rs.sets {
            let elems: Vec<Value> = s
                .elements
                .iter()
                .map(|e| match e {
                    Element::Addr(a) => json!(a.to_string()),
                    Element::Net(n) => crate::core::ruleset::net_json(n),
                    Element::Svc(n, p, port) => {
                        json!({"concat": [crate::core::ruleset::net_json(n), p.keyword(), port]})
                    }
                })
                .collect();
            let ty: Value = if s.kind.type_names().len() == 1 {
                json!(s.kind.type_names()[0])
            } else {
                json!(s.kind.type_names())
            };
            let mut set = json!({"family": "inet", "table": TABLE, "name": s.name, "type": ty});
            if !s.kind.flags().is_empty() {
                set["flags"] = json!(s.kind.flags());
            }
            if let Some(t) = s.timeout {
                set["timeout"] = json!(t);
            }
            if !elems.is_empty() {
                set["elem"] = json!(elems);
            }
            objs.push(json!({"set": set}));
        }
        for c in &rs.chains {
            let mut chain = json!({"family": "inet", "table": TABLE, "name": c.name});
            if let Some(h) = c.hook {
                chain["type"] = json!("filter");
                chain["hook"] = json!(h.hook);
                chain["prio"] = json!(0);
                chain["policy"] = json!(h.policy);
            }
            objs.push(json!({"chain": chain}));
            for r in &c.rules {
                objs.push(json!({"rule": {"family": "inet", "table": TABLE, "chain": c.name, "expr": r.to_json()}}));
            }
        }
        json!({"nftables": objs})
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::as_live;
    use super::*;

    fn elem(key: Vec<u8>) -> crate::core::nft_netlink::ElemObj {
        crate::core::nft_netlink::ElemObj {
            key: key.into(),
            key_end: None,
            flags: 0,
            timeout_ms: Some(60_000),
            unknown: Vec::new(),
        }
    }

    /// Learned keys as netlink lists them: plain addresses, and address . protocol . port
    /// with each field padded to 4 bytes; anything else (a key of a length we never write,
    /// a protocol other than TCP or UDP) is left out rather than guessed.
    #[test]
    fn learned_elements_are_read_from_netlink_keys() {
        let v4 = elem(vec![198, 51, 100, 7]);
        let v6 = elem(
            "2001:db8::7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
                .to_vec(),
        );
        let odd = elem(vec![1, 2, 3]);
        assert_eq!(
            learned_from_netlink("dns_v4", &[v4.clone(), odd.clone()]),
            vec![("198.51.100.7".parse().unwrap(), None)]
        );
        assert_eq!(
            learned_from_netlink("dns_v6", &[v6]),
            vec![("2001:db8::7".parse().unwrap(), None)]
        );
        let mut svc = vec![198, 51, 100, 8, 6, 0, 0, 0];
        svc.extend_from_slice(&[1, 187, 0, 0]); // 443, padded
        let mut icmp = vec![198, 51, 100, 9, 1, 0, 0, 0];
        icmp.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(
            learned_from_netlink("dns_svc_v4", &[elem(svc), elem(icmp), odd]),
            vec![("198.51.100.8".parse().unwrap(), Some((6, 443)))]
        );
    }
    use crate::core::policy::{AllowRule, Mode, Policy};
    use serde_json::json;

    fn policy() -> Policy {
        let mut p = Policy::new(Mode::DenyAll);
        p.allow.push(AllowRule {
            net: "198.51.100.0/24".parse().unwrap(),
            scope: None,
        });
        p.allow.push(AllowRule {
            net: "198.18.0.1/32".parse().unwrap(),
            scope: None,
        });
        p
    }

    #[test]
    fn accepts_its_own_rendering() {
        let rs = Ruleset::generate(&policy());
        verify(&rs, &as_live(&rs)).unwrap();
    }

    #[test]
    fn catches_policy_rule_and_element_tampering() {
        let rs = Ruleset::generate(&policy());
        let base = as_live(&rs);
        let objs = base["nftables"].as_array().unwrap();
        let find = |pred: &dyn Fn(&Value) -> bool| objs.iter().position(pred).unwrap();

        let mut v = base.clone();
        let i = find(&|o| o["chain"]["name"] == "output");
        v["nftables"][i]["chain"]["policy"] = json!("accept");
        assert!(verify(&rs, &v).unwrap_err().to_string().contains("policy"));

        let mut v = base.clone();
        let i = find(&|o| o["rule"]["chain"] == "output");
        v["nftables"].as_array_mut().unwrap().remove(i);
        assert!(verify(&rs, &v).is_err());

        let mut v = base.clone();
        let i = find(&|o| o["set"]["name"] == "allow_net_v4");
        v["nftables"][i]["set"]["elem"] = json!([{"prefix": {"addr": "198.51.0.0", "len": 16}}]);
        assert!(verify(&rs, &v)
            .unwrap_err()
            .to_string()
            .contains("allow_net_v4"));

        let mut v = base.clone();
        let i = find(&|o| o["set"]["name"] == "dns_v4");
        v["nftables"][i]["set"]["flags"] = json!([]);
        assert!(verify(&rs, &v).is_err());

        // An NFLOG statement sent to another group (or turned into a plain log) would leave
        // the event reader blind: the exact comparison catches it.
        let mut v = base.clone();
        let i = find(&|o| o["rule"]["chain"] == "denied");
        assert_eq!(
            v["nftables"][i]["rule"]["expr"][0]["log"]["group"],
            json!(100)
        );
        v["nftables"][i]["rule"]["expr"][0]["log"]["group"] = json!(7);
        assert!(verify(&rs, &v).unwrap_err().to_string().contains("denied"));
        v["nftables"][i]["rule"]["expr"][0]["log"]
            .as_object_mut()
            .unwrap()
            .remove("group");
        assert!(verify(&rs, &v).is_err());

        let mut v = base;
        v["nftables"]
            .as_array_mut()
            .unwrap()
            .push(json!({"chain": {"family": "inet", "table": TABLE, "name": "sneaky"}}));
        assert!(verify(&rs, &v).unwrap_err().to_string().contains("sneaky"));
    }

    /// A listing of `allow_v4` as a torn dump prints it: one element twice, another not at
    /// all. Verification must fail, and name the set as torn (so the caller reads again).
    #[test]
    fn a_listing_that_repeats_elements_is_torn_and_never_passes() {
        let mut p = policy();
        for last in 1..=4u8 {
            p.allow.push(AllowRule {
                net: format!("198.18.7.{last}/32").parse().unwrap(),
                scope: None,
            });
        }
        let rs = Ruleset::generate(&p);
        let base = as_live(&rs);
        let i = base["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .position(|o| o["set"]["name"] == "allow_v4")
            .unwrap();
        let listed = |elems: Value| {
            let mut v = base.clone();
            v["nftables"][i]["set"]["elem"] = elems;
            verify(&rs, &v)
        };
        listed(json!([
            "198.18.0.1",
            "198.18.7.1",
            "198.18.7.2",
            "198.18.7.3",
            "198.18.7.4"
        ]))
        .unwrap();

        // Torn: .3 missing, .1 listed twice (same count as the set holds).
        let err = listed(json!([
            "198.18.0.1",
            "198.18.7.1",
            "198.18.7.2",
            "198.18.7.1",
            "198.18.7.4"
        ]))
        .unwrap_err();
        assert!(err.listing_torn(), "{err}");
        assert_eq!(err.torn, vec!["allow_v4".to_string()]);
        assert!(err.to_string().contains("repeats 1 of its 5"), "{err}");
        assert_eq!(reread_after(1, &err), Some(REREAD_PAUSES[0]));
        assert_eq!(
            reread_after(REREAD_PAUSES.len(), &err),
            REREAD_PAUSES.last().copied()
        );
        assert_eq!(reread_after(REREAD_PAUSES.len() + 1, &err), None);

        // A repeat never hides a difference: every element present, one of them twice, and
        // one that is not in the policy: still an error.
        let err = listed(json!([
            "198.18.0.1",
            "198.18.7.1",
            "198.18.7.2",
            "198.18.7.3",
            "198.18.7.4",
            "198.18.7.4",
            "198.18.9.9"
        ]))
        .unwrap_err();
        assert!(err.listing_torn());

        // Missing without repeats: a real difference, final at once (no re-read).
        let err = listed(json!([
            "198.18.0.1",
            "198.18.7.1",
            "198.18.7.2",
            "198.18.7.4"
        ]))
        .unwrap_err();
        assert!(!err.listing_torn(), "{err}");
        assert!(err.to_string().contains("live elements differ"), "{err}");
        assert_eq!(reread_after(1, &err), None);
    }

    /// Found by the `verify` fuzz target: a table with `flags dormant` lists with all its
    /// chains and rules (nft 1.0.6 prints `"flags": "inet"` for it) but filters nothing.
    #[test]
    fn a_table_with_flags_never_passes() {
        let rs = Ruleset::generate(&policy());
        for flags in [json!("dormant"), json!("inet"), json!(["dormant", "owner"])] {
            let mut v = as_live(&rs);
            v["nftables"][1]["table"]["flags"] = flags.clone();
            let err = verify(&rs, &v).unwrap_err();
            assert!(err.to_string().contains("has flags"), "{flags}: {err}");
            assert!(!err.listing_torn());
        }
        let mut v = as_live(&rs);
        v["nftables"][1]["table"]["flags"] = json!([]);
        verify(&rs, &v).unwrap();
    }

    /// Found by the `verify` fuzz target: a second `chain denied` (policy accept) or a second
    /// copy of a set replaced the first in the comparison, so the listing passed. The kernel
    /// holds one object per name; a listing with two is never faithful.
    #[test]
    fn an_object_listed_twice_never_passes() {
        let rs = Ruleset::generate(&policy());
        let base = as_live(&rs);
        let objs = base["nftables"].as_array().unwrap();
        let at = |pred: &dyn Fn(&Value) -> bool| objs.iter().position(pred).unwrap();

        let mut v = base.clone();
        let i = at(&|o| o["chain"]["name"] == "denied");
        let mut twin = v["nftables"][i].clone();
        twin["chain"]["policy"] = json!("accept");
        v["nftables"].as_array_mut().unwrap().insert(i + 1, twin);
        let err = verify(&rs, &v).unwrap_err();
        assert!(
            err.to_string().contains("chain denied is listed twice"),
            "{err}"
        );

        let mut v = base.clone();
        let i = at(&|o| o["set"]["name"] == "allow_v4");
        let mut twin = v["nftables"][i].clone();
        twin["set"]["elem"] = json!(["198.51.100.99"]);
        v["nftables"].as_array_mut().unwrap().insert(i + 1, twin);
        let err = verify(&rs, &v).unwrap_err();
        assert!(
            err.to_string().contains("set allow_v4 is listed twice"),
            "{err}"
        );
    }

    /// An object of a kind we never create (a flowtable, a map, a named counter) in our
    /// table is a difference, even when no rule refers to it yet.
    #[test]
    fn objects_of_other_kinds_in_our_table_never_pass() {
        let rs = Ruleset::generate(&policy());
        for (kind, body) in [
            (
                "flowtable",
                json!({"family": "inet", "table": TABLE, "name": "ft", "hook": "ingress", "prio": 0}),
            ),
            (
                "map",
                json!({"family": "inet", "table": TABLE, "name": "m", "type": "ipv4_addr", "map": "verdict"}),
            ),
            (
                "counter",
                json!({"family": "inet", "table": TABLE, "name": "c"}),
            ),
        ] {
            let mut v = as_live(&rs);
            v["nftables"]
                .as_array_mut()
                .unwrap()
                .push(json!({ kind: body }));
            let err = verify(&rs, &v).unwrap_err();
            assert!(
                err.to_string().contains(&format!("unexpected {kind}")),
                "{err}"
            );
        }
        // The same kinds in another table are none of our business.
        let mut v = as_live(&rs);
        v["nftables"]
            .as_array_mut()
            .unwrap()
            .push(json!({"flowtable": {"family": "inet", "table": "other", "name": "ft"}}));
        verify(&rs, &v).unwrap();
    }

    #[test]
    fn learned_elements_are_read_from_dns_sets_only() {
        let live = json!({"nftables": [
            {"set": {"table": TABLE, "name": "dns_v4", "elem": [{"elem": {"val": "198.51.100.9", "timeout": 60, "expires": 59}}]}},
            {"set": {"table": TABLE, "name": "dns_svc_v6", "elem": [{"elem": {"val": {"concat": ["2001:db8::9", "tcp", 443]}, "timeout": 60}}]}},
            {"set": {"table": TABLE, "name": "allow_v4", "elem": ["198.18.0.1"]}},
        ]});
        assert_eq!(
            learned_elements(&live),
            vec![
                ("198.51.100.9".parse().unwrap(), None),
                ("2001:db8::9".parse().unwrap(), Some((6, 443))),
            ]
        );
        assert!(learned_elements(&json!({})).is_empty());
    }

    #[test]
    fn equivalence_ignores_set_order_and_address_spelling() {
        assert!(json_equiv(
            &json!({"set": ["a", "b"]}),
            &json!({"set": ["b", "a"]})
        ));
        assert!(json_equiv(
            &json!("::ffff:10.0.0.0"),
            &json!("::ffff:a00:0")
        ));
        assert!(!json_equiv(
            &json!({"set": ["a", "b"]}),
            &json!({"set": ["a", "a"]})
        ));
    }
}

#[cfg(test)]
mod netlink_tests {
    use super::*;
    use crate::core::nft_netlink::{Verdict, ELEM_F_INTERVAL_END};
    use crate::core::policy::{AllowRule, Mode, Policy};

    fn policy() -> Policy {
        let mut p = Policy::new(Mode::DenyAll);
        let r = |s: &str| AllowRule {
            net: s.parse().unwrap(),
            scope: None,
        };
        p.allow = vec![
            r("198.51.100.10/32"),
            r("198.18.0.0/16"),
            r("2001:db8::10/128"),
        ];
        p.deny = vec!["198.18.0.9/32".parse().unwrap()];
        p.dns_servers = vec!["198.51.100.53".parse().unwrap()];
        p
    }

    /// What the kernel would dump for `lowered`: anonymous sets numbered, no set ids.
    fn as_live(lowered: &Lowered) -> LiveTable {
        let mut names = BTreeMap::new();
        let mut n = 0;
        let sets = lowered
            .sets
            .iter()
            .map(|s| {
                let mut set = s.set.clone();
                if set.is_anonymous() {
                    set.name = format!("__set{n}");
                    n += 1;
                }
                names.insert(s.id, set.name.clone());
                let elems = if s.learned {
                    Vec::new()
                } else {
                    s.elems.clone()
                };
                (set, elems)
            })
            .collect();
        let rules = lowered
            .rules
            .iter()
            .map(|r| RuleObj {
                chain: r.chain.clone(),
                exprs: r
                    .exprs
                    .iter()
                    .map(|e| match e {
                        Expr::Lookup {
                            sreg,
                            set_id: Some(id),
                            flags,
                            ..
                        } => Expr::Lookup {
                            sreg: *sreg,
                            set: names[id].clone(),
                            set_id: None,
                            flags: *flags,
                        },
                        other => other.clone(),
                    })
                    .collect(),
            })
            .collect();
        LiveTable {
            flags: 0,
            chains: lowered.chains.clone(),
            rules,
            sets,
            interrupted: false,
        }
    }

    /// A kind of tampering and what it does to a dump.
    type Tampering = (&'static str, Box<dyn Fn(&mut LiveTable)>);

    fn setup() -> (Ruleset, Lowered, LiveTable) {
        let rs = Ruleset::generate(&policy());
        let lowered = Lowered::new(&rs).unwrap();
        let live = as_live(&lowered);
        (rs, lowered, live)
    }

    fn set_mut<'a>(live: &'a mut LiveTable, name: &str) -> &'a mut (SetObj, Vec<ElemObj>) {
        live.sets.iter_mut().find(|s| s.0.name == name).unwrap()
    }

    #[test]
    fn a_faithful_dump_passes_and_any_tampering_fails() {
        let (rs, lowered, live) = setup();
        verify_netlink(&rs, &lowered, &live).unwrap();

        let tamperings: Vec<Tampering> = vec![
            ("rule removed", Box::new(|l| drop(l.rules.remove(3)))),
            (
                "verdict changed",
                Box::new(|l| {
                    let last = l.rules[0].exprs.last_mut().unwrap();
                    *last = Expr::Immediate {
                        dreg: 0,
                        verdict: Verdict::Drop,
                    };
                }),
            ),
            (
                "policy flipped",
                Box::new(|l| l.chains[0].base.as_mut().unwrap().policy = 1),
            ),
            (
                "element added",
                Box::new(|l| {
                    let (_, e) = set_mut(l, "allow_v4");
                    let mut extra = e[0].clone();
                    extra.key = vec![198, 51, 100, 99].into();
                    e.push(extra);
                }),
            ),
            (
                "interval end moved",
                Box::new(|l| {
                    let (_, e) = set_mut(l, "allow_net_v4");
                    let end = e
                        .iter_mut()
                        .rev()
                        .find(|x| x.flags & ELEM_F_INTERVAL_END != 0)
                        .unwrap();
                    end.key = vec![198, 20, 0, 0].into();
                }),
            ),
            (
                "anonymous set element added",
                Box::new(|l| {
                    let (_, e) = set_mut(l, "__set0");
                    let mut extra = e[0].clone();
                    extra.key = vec![1].into();
                    e.push(extra);
                }),
            ),
            (
                "set flags changed",
                Box::new(|l| set_mut(l, "deny_v4").0.flags = 0),
            ),
            ("table dormant", Box::new(|l| l.flags = 1)),
            (
                "extra chain",
                Box::new(|l| {
                    let mut c = l.chains[2].clone();
                    c.name = "extra".into();
                    l.chains.push(c);
                }),
            ),
        ];
        for (what, tamper) in tamperings {
            let mut l = live.clone();
            tamper(&mut l);
            let err = verify_netlink(&rs, &lowered, &l).expect_err(what);
            assert!(!err.listing_torn(), "{what}: {err}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// What the kernel would dump of any policy's lowering verifies against it.
        #[test]
        fn any_faithful_dump_verifies(policy in crate::core::proptests::arb_policy()) {
            let rs = Ruleset::generate(&policy);
            let lowered = Lowered::new(&rs).unwrap();
            let verdict = verify_netlink(&rs, &lowered, &as_live(&lowered));
            proptest::prop_assert!(verdict.is_ok(), "{:?}", verdict);
        }
    }

    #[test]
    fn a_repeated_element_or_an_interrupted_dump_is_torn() {
        let (rs, lowered, mut live) = setup();
        let (_, e) = set_mut(&mut live, "allow_v4");
        let first = e[0].clone();
        e.push(first);
        let err = verify_netlink(&rs, &lowered, &live).unwrap_err();
        assert_eq!(err.torn, vec!["allow_v4".to_string()]);

        let (rs, lowered, mut live) = setup();
        live.interrupted = true;
        assert!(verify_netlink(&rs, &lowered, &live)
            .unwrap_err()
            .listing_torn());
    }

    /// Under DNS load every dump is flagged interrupted: two flagged reads in a row with the
    /// same content that verifies pass; a first flagged read, two that differ, or a flagged
    /// read with a real difference do not.
    #[test]
    fn two_identical_interrupted_reads_pass_and_nothing_else_does() {
        let (rs, lowered, mut live) = setup();
        live.interrupted = true;
        assert!(verify_netlink_after(&rs, &lowered, None, &live).is_err());
        assert!(verify_netlink_after(&rs, &lowered, Some(&live), &live).is_ok());
        let mut clean_before = live.clone();
        clean_before.interrupted = false;
        assert!(verify_netlink_after(&rs, &lowered, Some(&clean_before), &live).is_ok());

        let mut other = live.clone();
        set_mut(&mut other, "allow_v4").1.pop();
        assert!(verify_netlink_after(&rs, &lowered, Some(&other), &live).is_err());

        // The same tampering in both reads is stable, and still refused.
        let mut tampered = live.clone();
        let (_, e) = set_mut(&mut tampered, "allow_v4");
        e.pop();
        let err = verify_netlink_after(&rs, &lowered, Some(&tampered), &tampered).unwrap_err();
        assert!(!err.to_string().is_empty());
    }
}

/// `live_groups` as it was before it sorted plain numbers, kept as the oracle the faster one
/// must agree with on any elements: same groups, same count of repeats, same refusals.
#[cfg(test)]
mod live_groups_tests {
    use super::*;
    use crate::core::nft_netlink::{ElemKey, SET_F_INTERVAL};
    use proptest::prelude::*;

    fn live_groups_before(set: &SetObj, elems: &[ElemObj]) -> Option<Listed> {
        let addr_len = match set.key_len {
            4 | 12 => 4,
            16 | 24 => 16,
            _ => return None,
        };
        let v4 = addr_len == 4;
        let num = |b: &[u8]| -> Option<u128> {
            match b.len() {
                4 => Some(u128::from(u32::from_be_bytes(b.try_into().ok()?))),
                16 => Some(u128::from_be_bytes(b.try_into().ok()?)),
                _ => None,
            }
        };
        // By key, an end marker before a start at the same key (adjacent ranges: the range
        // before ends where the next begins).
        let mut sorted: Vec<&ElemObj> = elems.iter().collect();
        sorted.sort_unstable_by(|a, b| {
            let end_first = |e: &ElemObj| e.flags & ELEM_F_INTERVAL_END == 0;
            (&a.key, end_first(a), *a).cmp(&(&b.key, end_first(b), *b))
        });
        let before = sorted.len();
        sorted.dedup();
        let repeated = before - sorted.len();
        if elems
            .iter()
            .any(|e| !e.unknown.is_empty() || e.timeout_ms.is_some())
        {
            return None;
        }
        let mut out: BTreeMap<(String, u16), Vec<Range>> = BTreeMap::new();
        let concat = set.key_len as usize > addr_len;
        if concat {
            for e in &sorted {
                let end = e.key_end.as_deref().unwrap_or(&e.key);
                if e.flags != 0 || e.key.len() != addr_len + 8 || end.len() != e.key.len() {
                    return None;
                }
                if e.key[addr_len..] != end[addr_len..] {
                    return None; // a range over protocols or ports: not ours
                }
                let proto = match e.key[addr_len] {
                    6 => "tcp",
                    17 => "udp",
                    _ => return None,
                };
                let port = u16::from_be_bytes([e.key[addr_len + 4], e.key[addr_len + 5]]);
                out.entry((proto.to_string(), port)).or_default().push((
                    v4,
                    num(&e.key[..addr_len])?,
                    num(&end[..addr_len])?,
                ));
            }
        } else if set.flags & SET_F_INTERVAL != 0 {
            let max = if v4 { u128::from(u32::MAX) } else { u128::MAX };
            for (i, e) in sorted.iter().enumerate() {
                if e.key_end.is_some()
                    || e.key.len() != addr_len
                    || e.flags & !ELEM_F_INTERVAL_END != 0
                {
                    return None;
                }
                if e.flags & ELEM_F_INTERVAL_END != 0 {
                    continue;
                }
                let start = num(&e.key)?;
                let end = match sorted.get(i + 1) {
                    Some(next) => num(&next.key)?.checked_sub(1)?,
                    None => max,
                };
                out.entry((String::new(), 0))
                    .or_default()
                    .push((v4, start, end));
            }
        } else {
            for e in &sorted {
                if e.key_end.is_some() || e.flags != 0 || e.key.len() != addr_len {
                    return None;
                }
                let a = num(&e.key)?;
                out.entry((String::new(), 0)).or_default().push((v4, a, a));
            }
        }
        Some(Listed {
            groups: merge_all(out),
            repeated,
        })
    }

    fn set(key_len: u32, flags: u32) -> SetObj {
        SetObj {
            name: "s".into(),
            flags,
            key_type: 0,
            key_len,
            fields: Vec::new(),
            size: None,
            timeout_ms: None,
            userdata: Vec::new(),
            unknown: Vec::new(),
        }
    }

    /// Elements near the edges of the address space and of each other, mostly well formed:
    /// the key length of the set (sometimes another), flags none or end marker (sometimes
    /// others), and now and then a key end, timeout or unknown attribute; a few repeated.
    fn arb_elems(key_len: usize) -> impl Strategy<Value = Vec<ElemObj>> {
        let key = prop_oneof![
            8 => prop::collection::vec(prop_oneof![Just(0u8), Just(255u8), Just(1u8), Just(6u8), Just(17u8), any::<u8>()], key_len),
            1 => prop::collection::vec(any::<u8>(), 0..30),
        ];
        let elem = (
            key.clone(),
            prop::option::weighted(0.1, key),
            prop_oneof![4 => Just(0u32), 4 => Just(ELEM_F_INTERVAL_END), 1 => any::<u32>()],
            prop::option::weighted(0.05, any::<u64>()),
            prop::option::weighted(0.05, any::<u16>()),
        )
            .prop_map(|(key, key_end, flags, timeout_ms, unknown)| ElemObj {
                key: ElemKey::from(key),
                key_end: key_end.map(ElemKey::from),
                flags,
                timeout_ms,
                unknown: unknown.into_iter().collect(),
            });
        (
            prop::collection::vec(elem, 0..40),
            prop::collection::vec(any::<prop::sample::Index>(), 0..4),
        )
            .prop_map(|(mut elems, repeat)| {
                if !elems.is_empty() {
                    for i in repeat {
                        let e = elems[i.index(elems.len())].clone();
                        elems.push(e);
                    }
                }
                elems
            })
    }

    type Groups = BTreeMap<(String, u16), Vec<Range>>;

    fn summary(l: Option<Listed>) -> Option<(Groups, usize)> {
        l.map(|l| (l.groups, l.repeated))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]
        #[test]
        fn agrees_with_the_previous_reading(
            (key_len, elems) in prop_oneof![Just(4u32), Just(12), Just(16), Just(24), Just(8)]
                .prop_flat_map(|l| (Just(l), arb_elems(l as usize))),
            interval in any::<bool>(),
        ) {
            let s = set(key_len, if interval { SET_F_INTERVAL } else { 0 });
            prop_assert_eq!(summary(live_groups(&s, &elems)), summary(live_groups_before(&s, &elems)));
        }
    }
}
