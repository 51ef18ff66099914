//! The core's modules must form a directed acyclic graph: a cycle (bundle -> dns_policy ->
//! bundle, as there once was) means two modules can only be understood, tested and changed
//! together. This test reads the sources (a module split into a directory as one node) and
//! fails on any cycle, naming it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The shipped source of one file: test code may use anything, only what ships counts.
fn shipped(text: &str) -> &str {
    text.split("#[cfg(test)]").next().unwrap_or_default()
}

/// The files of each core module: `src/core/m.rs`, and the `.rs` files under `src/core/m/`
/// (`m/mod.rs`, or the submodules of either form) except test-only ones, each with the prefix
/// by which it names a sibling core module: `super::` in `m.rs` and `m/mod.rs`, one more
/// `super::` per level below.
fn module_files(dir: &Path) -> BTreeMap<String, Vec<(String, String)>> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<(String, String, String)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .expect("read a core module directory")
            .map(|e| e.expect("read a directory entry").path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, depth + 1, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("read a core module");
                let levels = if path.file_stem().is_some_and(|s| s == "mod") {
                    depth - 1
                } else {
                    depth
                };
                let stem = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default();
                out.push((stem.to_string(), "super::".repeat(levels + 1), text));
            }
        }
    }
    let mut modules: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("read src/core") {
        let path = entry.expect("read src/core").path();
        let Some(name) = path
            .file_stem()
            .and_then(|n| n.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        if path.is_dir() {
            let mut files = Vec::new();
            walk(&path, 1, &mut files);
            // A submodule declared `#[cfg(test)] mod name;` (a `tests.rs`) is test code. Its
            // parent is `name/mod.rs` or `name.rs`.
            let parent = std::fs::read_to_string(path.with_extension("rs")).unwrap_or_default();
            let test_only = |stem: &str| {
                let texts = files.iter().map(|(_, _, text)| text.as_str());
                texts.chain([parent.as_str()]).any(|text| {
                    text.match_indices("#[cfg(test)]").any(|(at, m)| {
                        text[at + m.len()..]
                            .trim_start()
                            .strip_prefix("mod ")
                            .is_some_and(|r| r.trim_start().starts_with(&format!("{stem};")))
                    })
                })
            };
            let shipped: Vec<(String, String)> = files
                .iter()
                .filter(|(stem, _, _)| !test_only(stem))
                .map(|(_, prefix, text)| (prefix.clone(), text.clone()))
                .collect();
            if !shipped.is_empty() {
                modules.entry(name).or_default().extend(shipped);
            }
        } else if path.extension().is_some_and(|e| e == "rs") && name != "mod" {
            let text = std::fs::read_to_string(&path).expect("read a core module");
            modules
                .entry(name)
                .or_default()
                .push(("super::".to_string(), text));
        }
    }
    modules
}

/// The core modules each core module's non-test code refers to (`super::m` from its top
/// file, `super::super::m` from a submodule, `crate::core::m` from anywhere).
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core");
    let modules = module_files(&dir);
    let mut graph = BTreeMap::new();
    for (module, files) in &modules {
        let mut uses = BTreeSet::new();
        for (sibling, text) in files {
            let shipped = shipped(text);
            for prefix in [sibling.as_str(), "crate::core::"] {
                for (at, _) in shipped.match_indices(prefix) {
                    let rest = &shipped[at + prefix.len()..];
                    let end = rest
                        .find(|c: char| !(c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()))
                        .unwrap_or(rest.len());
                    let target = &rest[..end];
                    if target != module && modules.contains_key(target) {
                        uses.insert(target.to_string());
                    }
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
    // Modules split into a directory are read too, submodules included.
    assert!(
        graph
            .get("nft_netlink")
            .is_some_and(|d| d.contains("ruleset")),
        "the scan missed src/core/nft_netlink/: {graph:?}"
    );
    assert!(
        graph
            .get("verify")
            .is_some_and(|d| d.contains("nft_netlink")),
        "{graph:?}"
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
