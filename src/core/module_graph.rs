//! The core's modules must form a directed acyclic graph: a cycle (bundle -> dns_policy ->
//! bundle, as there once was) means two modules can only be understood, tested and changed
//! together. This test reads the sources and fails on any cycle, naming it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The core modules each core module's non-test code refers to (`super::m`, `crate::core::m`).
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core");
    let sources: BTreeMap<String, String> = std::fs::read_dir(&dir)
        .expect("read src/core")
        .filter_map(|e| {
            let path = e.ok()?.path();
            let name = path.file_stem()?.to_str()?.to_string();
            (path.extension()? == "rs" && name != "mod").then(|| {
                (
                    name,
                    std::fs::read_to_string(&path).expect("read a core module"),
                )
            })
        })
        .collect();
    let mut graph = BTreeMap::new();
    for (module, text) in &sources {
        // Test code may use anything; only what ships counts.
        let shipped = text.split("#[cfg(test)]").next().unwrap_or_default();
        let mut uses = BTreeSet::new();
        for prefix in ["super::", "crate::core::"] {
            for (at, _) in shipped.match_indices(prefix) {
                let rest = &shipped[at + prefix.len()..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()))
                    .unwrap_or(rest.len());
                let target = &rest[..end];
                if target != module && sources.contains_key(target) {
                    uses.insert(target.to_string());
                }
            }
        }
        graph.insert(module.clone(), uses);
    }
    graph
}

/// One cycle in `graph`, as the path that closes it, if there is any (depth-first search).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|start| visit(start, graph, &mut Vec::new(), &mut done))
}

#[test]
fn core_modules_form_no_cycle() {
    let graph = dependencies();
    assert!(
        graph.get("bundle").is_some_and(|d| d.contains("policy")),
        "the scan found no dependencies at all: {graph:?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle in src/core: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let graph = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    assert_eq!(
        find_cycle(&graph(&[
            ("bundle", "dns_policy"),
            ("dns_policy", "bundle")
        ])),
        Some(vec!["bundle".into(), "dns_policy".into(), "bundle".into()])
    );
    assert!(find_cycle(&graph(&[("a", "b"), ("b", "c"), ("a", "c")])).is_none());
}

#[test]
fn bundle_knows_neither_dns_policy_nor_dnsmasq() {
    let graph = dependencies();
    let bundle = &graph["bundle"];
    assert!(
        !bundle.contains("dns_policy") && !bundle.contains("dnsmasq"),
        "{bundle:?}"
    );
}
