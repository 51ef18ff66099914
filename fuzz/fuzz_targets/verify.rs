//! Verification by read-back (src/core/verify.rs `verify`): the `nft -j` listing of the table
//! decides whether the firewall is what was meant, so it must never pass a listing that
//! differs in any way that matters, and must pass every faithful one.
//!
//! A generated policy gives the intended ruleset; it is rendered the way nft 1.0.6 lists it
//! (here, independently of the library's test helper), then edited by a generated list of
//! edits. Each edit is either neutral (nft's own freedom: element order and spelling, a
//! prefix written as a range, objects of other tables, metainfo) or changes what the table
//! does (a policy, a hook, a rule, an element, a set's type, flags or timeout, an extra
//! object, table flags such as `dormant`). Whether the edited listing still means the same
//! table is then judged by an oracle that reads it on its own: elements by membership at
//! every range boundary, rules by canonical JSON. Verification must agree with the oracle
//! both ways. Raw JSON inputs only have to be handled without a panic.
#![no_main]

use std::net::IpAddr;

use arbitrary::{Result, Unstructured};
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use terok_shield::core::ruleset::{net_json, Element, Ruleset, FAMILY, TABLE};
use terok_shield::core::verify::{learned_elements, verify};

/// What `nft -j list table inet terok_shield` prints for `rs`.
fn render(rs: &Ruleset) -> Vec<Value> {
    let mut objs = vec![
        json!({"metainfo": {"version": "1.0.6", "json_schema_version": 1}}),
        json!({"table": {"family": FAMILY, "name": TABLE, "handle": 1}}),
    ];
    for (h, s) in rs.sets.iter().enumerate() {
        let mut set = json!({"family": FAMILY, "name": s.name, "table": TABLE, "handle": h + 2});
        let types = s.kind.type_names();
        set["type"] = if types.len() == 1 {
            json!(types[0])
        } else {
            json!(types)
        };
        if !s.kind.flags().is_empty() {
            set["flags"] = json!(s.kind.flags());
        }
        if let Some(t) = s.timeout {
            set["timeout"] = json!(t);
        }
        let elems: Vec<Value> = s
            .elements
            .iter()
            .map(|e| match e {
                Element::Addr(a) => json!(a.to_string()),
                Element::Net(n) => net_json(n),
                Element::Svc(n, p, port) => json!({"concat": [net_json(n), p.keyword(), port]}),
            })
            .collect();
        if !elems.is_empty() {
            set["elem"] = json!(elems);
        }
        objs.push(json!({ "set": set }));
    }
    for c in &rs.chains {
        let mut chain = json!({"family": FAMILY, "table": TABLE, "name": c.name, "handle": 1});
        if let Some(h) = c.hook {
            chain["type"] = json!("filter");
            chain["hook"] = json!(h.hook);
            chain["prio"] = json!(0);
            chain["policy"] = json!(h.policy);
        }
        objs.push(json!({ "chain": chain }));
        for r in &c.rules {
            objs.push(json!({"rule": {"family": FAMILY, "table": TABLE, "chain": c.name, "handle": 9, "expr": r.to_json()}}));
        }
    }
    objs
}

// ---- The oracle: an independent reading of a listing. ----

type Range = (bool, u128, u128);

fn num(a: IpAddr) -> (bool, u128) {
    match a {
        IpAddr::V4(v) => (true, u128::from(u32::from(v))),
        IpAddr::V6(v) => (false, u128::from(v)),
    }
}

/// An element as (protocol, port) and an address range; `None` if not understood.
fn elem_range(e: &Value) -> Option<((String, u64), Range)> {
    let e = e.get("elem").and_then(|x| x.get("val")).unwrap_or(e);
    let (key, addr) = match e.get("concat").and_then(Value::as_array) {
        Some(parts) if parts.len() == 3 => (
            (parts[1].as_str()?.to_string(), parts[2].as_u64()?),
            &parts[0],
        ),
        Some(_) => return None,
        None => ((String::new(), 0), e),
    };
    let range = if let Some(s) = addr.as_str() {
        let (v4, n) = num(s.parse().ok()?);
        (v4, n, n)
    } else if let Some(p) = addr.get("prefix") {
        let net = IpNet::new(
            p.get("addr")?.as_str()?.parse().ok()?,
            p.get("len")?.as_u64()? as u8,
        )
        .ok()?;
        let (v4, lo) = num(net.network());
        (v4, lo, num(net.broadcast()).1)
    } else {
        let r = addr.get("range")?.as_array()?;
        let (v4, lo) = num(r.first()?.as_str()?.parse().ok()?);
        let (w4, hi) = num(r.get(1)?.as_str()?.parse().ok()?);
        if v4 != w4 || lo > hi {
            return None;
        }
        (v4, lo, hi)
    };
    Some((key, range))
}

/// Whether two element lists hold the same members: compared at every range boundary.
fn same_members(a: &[Value], b: &[Value]) -> bool {
    let (Some(ra), Some(rb)) = (
        a.iter().map(elem_range).collect::<Option<Vec<_>>>(),
        b.iter().map(elem_range).collect::<Option<Vec<_>>>(),
    ) else {
        return false;
    };
    // A listing that repeats an element is torn: never the same.
    let mut seen = ra.clone();
    seen.sort();
    seen.dedup();
    if seen.len() != ra.len() {
        return false;
    }
    let mut seen = rb.clone();
    seen.sort();
    seen.dedup();
    if seen.len() != rb.len() {
        return false;
    }
    let member = |rs: &[((String, u64), Range)], k: &(String, u64), v4: bool, x: u128| {
        rs.iter()
            .any(|(kk, (f, lo, hi))| kk == k && *f == v4 && *lo <= x && x <= *hi)
    };
    for (k, (v4, lo, hi)) in ra.iter().chain(&rb) {
        for x in [lo.checked_sub(1), Some(*lo), Some(*hi), hi.checked_add(1)]
            .into_iter()
            .flatten()
        {
            if member(&ra, k, *v4, x) != member(&rb, k, *v4, x) {
                return false;
            }
        }
    }
    true
}

/// Canonical JSON of a rule expression: addresses in one spelling, anonymous sets sorted.
fn canon(v: &Value) -> Value {
    match v {
        Value::String(s) => match s.parse::<IpAddr>() {
            Ok(a) => json!(a.to_string()),
            Err(_) => v.clone(),
        },
        Value::Array(a) => Value::Array(a.iter().map(canon).collect()),
        Value::Object(o) => {
            let mut out = serde_json::Map::new();
            for (k, x) in o {
                out.insert(k.clone(), canon(x));
            }
            if let (1, Some(Value::Array(members))) = (out.len(), out.get("set")) {
                let mut m = members.clone();
                m.sort_by_key(|x| x.to_string());
                out.insert("set".into(), Value::Array(m));
            }
            Value::Object(out)
        }
        _ => v.clone(),
    }
}

/// The parts of a listing that belong to our table, as the oracle compares them.
#[derive(Default, Clone)]
struct Table {
    tables: Vec<Value>,
    sets: Vec<Value>,
    chains: Vec<Value>,
    rules: Vec<(String, Value)>,
    others: usize,
}

fn ours(o: &Value) -> bool {
    o.get("family").and_then(Value::as_str) == Some(FAMILY)
        && o.get("table").and_then(Value::as_str) == Some(TABLE)
}

fn read(objs: &[Value]) -> Table {
    let mut t = Table::default();
    for o in objs {
        let Some((kind, body)) = o.as_object().and_then(|m| m.iter().next()) else {
            continue;
        };
        match kind.as_str() {
            "metainfo" => {}
            "table" => {
                if body.get("family").and_then(Value::as_str) == Some(FAMILY)
                    && body.get("name").and_then(Value::as_str) == Some(TABLE)
                {
                    t.tables.push(body.clone());
                }
            }
            "set" if ours(body) => t.sets.push(body.clone()),
            "chain" if ours(body) => t.chains.push(body.clone()),
            "rule" if ours(body) => t.rules.push((
                body.get("chain")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                body.get("expr").cloned().unwrap_or(Value::Null),
            )),
            _ if ours(body) => t.others += 1,
            _ => {}
        }
    }
    t
}

/// Whether `got` describes the same table as `want` (both read by [`read`]).
fn equivalent(want: &Table, got: &Table) -> bool {
    let strip = |v: &Value, keys: &[&str]| {
        let mut o = v.as_object().cloned().unwrap_or_default();
        for k in keys {
            o.remove(*k);
        }
        Value::Object(o)
    };
    if got.tables.len() != 1 || got.others != 0 {
        return false;
    }
    if strip(&got.tables[0], &["handle"]) != strip(&want.tables[0], &["handle"]) {
        return false;
    }
    let by_name = |v: &[Value]| {
        let mut m = std::collections::BTreeMap::new();
        for x in v {
            let name = x
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if m.insert(name, x.clone()).is_some() {
                return None; // the same name twice
            }
        }
        Some(m)
    };
    let (Some(ws), Some(gs)) = (by_name(&want.sets), by_name(&got.sets)) else {
        return false;
    };
    if ws.keys().ne(gs.keys()) {
        return false;
    }
    for (name, w) in &ws {
        let g = &gs[name];
        if strip(w, &["handle", "elem"]) != strip(g, &["handle", "elem"]) {
            return false;
        }
        let learned = w
            .get("flags")
            .and_then(Value::as_array)
            .is_some_and(|f| f.contains(&json!("timeout")));
        if !learned {
            let empty = Vec::new();
            let elems = |v: &Value| {
                v.get("elem")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_else(|| empty.clone())
            };
            if !same_members(&elems(w), &elems(g)) {
                return false;
            }
        }
    }
    let (Some(wc), Some(gc)) = (by_name(&want.chains), by_name(&got.chains)) else {
        return false;
    };
    if wc.len() != gc.len() {
        return false;
    }
    for (name, w) in &wc {
        let Some(g) = gc.get(name) else {
            return false;
        };
        // A base chain is its hook, type, priority and policy; a regular chain (no hook)
        // has none of these in the kernel, so only the absence of a hook means anything.
        let same = if w.get("hook").is_some() {
            strip(w, &["handle"]) == strip(g, &["handle"])
        } else {
            g.get("hook").is_none()
        };
        if !same {
            return false;
        }
    }
    // Rules in listing order (per chain, and chains keep their order), each equal as
    // written or after canonicalisation (address spelling, anonymous set order).
    want.rules.len() == got.rules.len()
        && want
            .rules
            .iter()
            .zip(&got.rules)
            .all(|((wc, w), (gc, g))| wc == gc && (w == g || canon(w) == canon(g)))
}

// ---- Edits of a faithful listing. ----

/// Paths (object index, then keys) of every string and number inside rule expressions.
fn leaves(v: &Value, path: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    match v {
        Value::String(_) | Value::Number(_) => out.push(path.clone()),
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                path.push(json!(i));
                leaves(x, path, out);
                path.pop();
            }
        }
        Value::Object(o) => {
            for (k, x) in o {
                path.push(json!(k));
                leaves(x, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn at<'a>(v: &'a mut Value, path: &[Value]) -> &'a mut Value {
    path.iter().fold(v, |v, p| match p {
        Value::Number(i) => &mut v[i.as_u64().unwrap() as usize],
        Value::String(k) => &mut v[k.as_str()],
        _ => unreachable!(),
    })
}

fn edit(u: &mut Unstructured, objs: &mut Vec<Value>) -> Result<()> {
    let n = objs.len();
    let i = u.choose_index(n)?;
    match u.int_in_range(0..=17)? {
        // Neutral: reorder the elements of a set; move a set; add unrelated objects.
        0 => {
            if let Some(Value::Array(e)) = objs[i].get_mut("set").and_then(|s| s.get_mut("elem")) {
                if !e.is_empty() {
                    let j = u.choose_index(e.len())?;
                    let k = u.choose_index(e.len())?;
                    e.swap(j, k);
                }
            }
        }
        1 => {
            if objs[i].get("set").is_some() {
                let o = objs.remove(i);
                let j = u.int_in_range(1..=objs.len())?;
                objs.insert(j, o);
            }
        }
        2 => {
            let o = match u.int_in_range(0..=2)? {
                0 => json!({"table": {"family": "ip", "name": "nat", "handle": 7}}),
                1 => {
                    json!({"chain": {"family": "ip", "table": "nat", "name": "output", "hook": "output", "policy": "accept", "type": "filter", "prio": -100}})
                }
                _ => {
                    json!({"set": {"family": "inet", "table": "other", "name": "allow_v4", "type": "ipv4_addr"}})
                }
            };
            objs.insert(u.int_in_range(0..=n)?, o);
        }
        // Neutral: a prefix element written as a range, an address in another spelling.
        3 => {
            if let Some(Value::Array(e)) = objs[i].get_mut("set").and_then(|s| s.get_mut("elem")) {
                if !e.is_empty() {
                    let j = u.choose_index(e.len())?;
                    let target = match e[j].get_mut("concat") {
                        Some(c) => &mut c[0],
                        None => &mut e[j],
                    };
                    if let Some(p) = target.get("prefix") {
                        let net = IpNet::new(
                            p["addr"].as_str().unwrap().parse().unwrap(),
                            p["len"].as_u64().unwrap() as u8,
                        )
                        .unwrap();
                        *target = json!({"range": [net.network().to_string(), net.broadcast().to_string()]});
                    } else if let Some(IpAddr::V6(a)) = target.as_str().and_then(|s| s.parse().ok())
                    {
                        let s = a.segments();
                        *target = json!(format!(
                            "{:x}:{:x}:{:x}:{:x}:{:x}:{:x}:{:x}:{:x}",
                            s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]
                        ));
                    }
                }
            }
        }
        // Changes: chain attributes.
        4 => {
            if let Some(c) = objs[i].get_mut("chain") {
                // A regular chain has no policy, priority or type to change: give it a hook.
                let key = match c.get("hook") {
                    Some(_) => *u.choose(&["policy", "hook", "prio", "type"])?,
                    None => "hook",
                };
                c[key] = match key {
                    "prio" => json!(u.int_in_range(-400i64..=400)?),
                    _ => json!(*u.choose(&[
                        "accept", "drop", "input", "output", "forward", "nat", "route"
                    ])?),
                };
            }
        }
        // Changes: rules removed, repeated, swapped, edited.
        5 => {
            if objs[i].get("rule").is_some() {
                objs.remove(i);
            }
        }
        6 => {
            if objs[i].get("rule").is_some() {
                let o = objs[i].clone();
                objs.insert(i, o);
            }
        }
        7 => {
            if i + 1 < n && objs[i].get("rule").is_some() && objs[i + 1].get("rule").is_some() {
                objs.swap(i, i + 1);
            }
        }
        8 => {
            if let Some(expr) = objs[i].get_mut("rule").map(|r| &mut r["expr"]) {
                let mut paths = Vec::new();
                leaves(expr, &mut Vec::new(), &mut paths);
                if !paths.is_empty() {
                    let p = u.choose(&paths)?.clone();
                    let leaf = at(expr, &p);
                    *leaf = match leaf {
                        Value::Number(x) => {
                            json!(x.as_u64().unwrap_or(0).wrapping_add(u.int_in_range(1..=3)?))
                        }
                        Value::String(s) => json!(match s.parse::<IpAddr>() {
                            Ok(IpAddr::V4(a)) =>
                                IpAddr::from(std::net::Ipv4Addr::from(u32::from(a) ^ 1)).to_string(),
                            Ok(IpAddr::V6(a)) =>
                                IpAddr::from(std::net::Ipv6Addr::from(u128::from(a) ^ 1))
                                    .to_string(),
                            Err(_) => format!("{s}x"),
                        }),
                        _ => unreachable!(),
                    };
                }
            }
        }
        // Changes (or not: the oracle decides): set elements removed, added, repeated.
        9 => {
            if let Some(Value::Array(e)) = objs[i].get_mut("set").and_then(|s| s.get_mut("elem")) {
                if !e.is_empty() {
                    e.remove(u.choose_index(e.len())?);
                }
            }
        }
        10 => {
            if let Some(s) = objs[i].get_mut("set") {
                let v4 = s["type"] == json!("ipv4_addr") || s["type"][0] == json!("ipv4_addr");
                let addr = fuzz_support::addr(u)?;
                let addr = match (v4, addr) {
                    (true, IpAddr::V6(_)) | (false, IpAddr::V4(_)) => return Ok(()),
                    _ => addr,
                };
                let e = if s["type"].is_array() {
                    json!({"concat": [addr.to_string(), *u.choose(&["tcp", "udp"])?, fuzz_support::port(u)?]})
                } else {
                    json!(addr.to_string())
                };
                match s.get_mut("elem") {
                    Some(Value::Array(list)) => list.push(e),
                    _ => s["elem"] = json!([e]),
                }
            }
        }
        11 => {
            if let Some(Value::Array(e)) = objs[i].get_mut("set").and_then(|s| s.get_mut("elem")) {
                if !e.is_empty() {
                    let x = e[u.choose_index(e.len())?].clone();
                    e.push(x);
                }
            }
        }
        // Changes: set type, flags, timeout.
        12 => {
            if let Some(s) = objs[i].get_mut("set") {
                match u.int_in_range(0..=2)? {
                    0 => s["type"] = json!(*u.choose(&["ipv4_addr", "ipv6_addr", "ether_addr"])?),
                    1 => s["flags"] = json!([*u.choose(&["interval", "timeout", "constant"])?]),
                    _ => s["timeout"] = json!(u.int_in_range(1u32..=7200)?),
                }
            }
        }
        // Changes: objects removed or added in our table.
        13 => {
            if objs[i].get("set").is_some() || objs[i].get("chain").is_some() {
                objs.remove(i);
            }
        }
        14 => {
            let o = match u.int_in_range(0..=4)? {
                0 => json!({"chain": {"family": FAMILY, "table": TABLE, "name": "sneaky"}}),
                1 => {
                    json!({"rule": {"family": FAMILY, "table": TABLE, "chain": "sneaky", "expr": [{"accept": null}]}})
                }
                2 => {
                    json!({"set": {"family": FAMILY, "table": TABLE, "name": "extra", "type": "ipv4_addr"}})
                }
                3 => json!({"table": {"family": FAMILY, "name": TABLE, "handle": 2}}),
                _ => {
                    json!({"flowtable": {"family": FAMILY, "table": TABLE, "name": "ft", "hook": "ingress", "prio": 0, "dev": "eth0"}})
                }
            };
            objs.insert(u.int_in_range(1..=n)?, o);
        }
        // Changes: the same set or chain listed twice, the second time different.
        15 => {
            let mut o = objs[i].clone();
            if let Some(c) = o.get_mut("chain") {
                c["policy"] = json!("accept");
                objs.insert(i + 1, o);
            } else if let Some(s) = o.get_mut("set") {
                s["elem"] = json!(["198.51.100.99"]);
                objs.insert(i + 1, o);
            }
        }
        // Changes: table flags (a dormant table filters nothing).
        16 => {
            if let Some(t) = objs[i].get_mut("table") {
                if t["name"] == json!(TABLE) {
                    t["flags"] = json!(*u.choose(&["dormant", "inet", "owner"])?);
                }
            }
        }
        // Neutral: anonymous set members of a rule in another order.
        _ => {
            if let Some(expr) = objs[i].get_mut("rule").map(|r| &mut r["expr"]) {
                fn flip(v: &mut Value) {
                    match v {
                        Value::Object(o) => {
                            if let Some(Value::Array(m)) = o.get_mut("set") {
                                m.reverse();
                            }
                            o.values_mut().for_each(flip);
                        }
                        Value::Array(a) => a.iter_mut().for_each(flip),
                        _ => {}
                    }
                }
                flip(expr);
            }
        }
    }
    Ok(())
}

/// An intended ruleset with its faithful listing and the oracle's reading of it.
struct Known {
    rs: Ruleset,
    listing: Vec<Value>,
    table: Table,
}

fn known(policy: &terok_shield::core::policy::Policy) -> Known {
    known_rs(Ruleset::generate(policy))
}

fn known_rs(rs: Ruleset) -> Known {
    let listing = render(&rs);
    verify(&rs, &json!({ "nftables": listing }))
        .unwrap_or_else(|e| panic!("a faithful listing failed: {e}\n{rs:?}"));
    let table = read(&listing);
    Known { rs, listing, table }
}

/// Rulesets of a few fixed policies, built once per process: generating and rendering a
/// ruleset costs more than everything else an input does, so most inputs edit one of these.
/// Besides the 16 whole rulesets, 48 are cut down to a few sets, chains and rules each:
/// verification must be right for any ruleset, and a small listing costs a fraction of a
/// whole one per execution, so the same time buys several times the edits.
fn cached() -> &'static [Known] {
    static CACHE: std::sync::OnceLock<Vec<Known>> = std::sync::OnceLock::new();
    CACHE.get_or_init(|| {
        let mut seed = 0x9e37_79b9_u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            seed >> 8
        };
        let mut policies = Vec::new();
        while policies.len() < 16 {
            let bytes: Vec<u8> = (0..512).map(|_| next() as u8).collect();
            if let Ok(p) = fuzz_support::policy(&mut Unstructured::new(&bytes)) {
                policies.push(p);
            }
        }
        let mut all: Vec<Known> = policies.iter().map(known).collect();
        for i in 0..48 {
            let mut rs = Ruleset::generate(&policies[i % policies.len()]);
            rs.sets.retain(|_| next() % 3 == 0);
            rs.chains.retain(|_| next() % 3 == 0);
            for c in &mut rs.chains {
                let keep = (next() % 4) as usize;
                let from = (next() as usize) % c.rules.len().max(1);
                c.rules = c.rules.iter().skip(from).take(keep).cloned().collect();
            }
            all.push(known_rs(rs));
        }
        // Listings of other rulesets pass only where they mean the same table.
        for a in &all {
            for b in &all {
                let ok = verify(&a.rs, &json!({ "nftables": b.listing })).is_ok();
                assert_eq!(ok, equivalent(&a.table, &b.table));
            }
        }
        all
    })
}

fn structured(u: &mut Unstructured) -> Result<()> {
    let pick = u.arbitrary::<u8>()?;
    let fresh;
    let k = if pick == 0xff && u.ratio(1, 4)? {
        // Now and then a policy of the input's own, also checked against a cached listing.
        fresh = known(&fuzz_support::policy(u)?);
        let other = &cached()[usize::from(pick) % cached().len()];
        let ok = verify(&fresh.rs, &json!({ "nftables": other.listing })).is_ok();
        assert_eq!(ok, equivalent(&fresh.table, &other.table));
        &fresh
    } else {
        &cached()[usize::from(pick) % cached().len()]
    };
    let mut objs = k.listing.clone();
    for _ in 0..u.int_in_range(1..=3)? {
        edit(u, &mut objs)?;
    }
    let same = equivalent(&k.table, &read(&objs));
    let live = json!({ "nftables": objs });
    match (verify(&k.rs, &live), same) {
        (Ok(()), false) => panic!(
            "verification passed a listing that differs from the ruleset:\n{}",
            serde_json::to_string(&live).unwrap()
        ),
        (Err(e), true) => panic!(
            "verification refused a faithful listing: {e}\n{}",
            serde_json::to_string(&live).unwrap()
        ),
        _ => {}
    }
    if pick & 7 == 0 {
        let _ = learned_elements(&live);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    if data.first() == Some(&b'{') {
        if let Ok(v) = serde_json::from_slice::<Value>(data) {
            let rs = Ruleset::generate(&terok_shield::core::policy::Policy::new(
                terok_shield::core::policy::Mode::DenyAll,
            ));
            let _ = verify(&rs, &v);
            let _ = learned_elements(&v);
        }
        return;
    }
    let _ = structured(&mut Unstructured::new(data));
});
