use serde_json::Value;

use super::*;
use crate::core::bundle::{test_bundle, DnsTier, Resolved};
use crate::core::policy::Mode;

fn targets(list: &[&str]) -> Vec<Target> {
    list.iter().map(|e| Target::parse(e).unwrap()).collect()
}

/// Names, a wildcard, addresses and networks of both families, every kind of port scope,
/// and a live deny inside an allowed network.
fn mixed() -> Allowlist {
    Allowlist {
        source: "container c1 (test)".into(),
        name_hint: "c1".into(),
        allow: targets(&[
            "example.com",
            "*.example.org",
            "198.51.100.7",
            "198.51.100.0/24",
            "2001:db8::/48",
            "api.example.com:443/tcp",
            "198.18.2.0/24:443/tcp",
            "ntp.example.net:123/udp",
            "[2001:db8::53]:53",
        ]),
        deny: vec!["198.51.100.9/32".parse().unwrap()],
    }
}

fn selector(pairs: &[&str]) -> PodSelector {
    PodSelector::parse(&pairs.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
}

/// The YAML with this build's version replaced, so a release does not churn snapshots.
fn shown(e: &Exported) -> String {
    e.yaml.replace(env!("CARGO_PKG_VERSION"), "VERSION")
}

#[test]
fn cilium_snapshot() {
    let e = export(
        &mixed(),
        ExportFormat::Cilium,
        &selector(&["app=web", "tier=front"]),
    );
    assert!(e.unexpressed.is_empty());
    insta::assert_snapshot!("cilium_mixed", shown(&e));
}

#[test]
fn kubernetes_snapshot() {
    let e = export(&mixed(), ExportFormat::Kubernetes, &PodSelector::default());
    assert_eq!(
        e.unexpressed,
        [
            "example.com",
            "*.example.org",
            "ntp.example.net:123/udp",
            "api.example.com:443/tcp"
        ]
    );
    insta::assert_snapshot!("kubernetes_mixed", shown(&e));
}

#[test]
fn empty_allowlists_deny_everything_in_both_formats() {
    let empty = Allowlist {
        source: "profiles none".into(),
        name_hint: "none".into(),
        allow: vec![],
        deny: vec![],
    };
    let c = export(&empty, ExportFormat::Cilium, &PodSelector::default());
    insta::assert_snapshot!("cilium_empty", shown(&c));
    let k = export(&empty, ExportFormat::Kubernetes, &PodSelector::default());
    insta::assert_snapshot!("kubernetes_empty", shown(&k));
}

/// Parse the YAML we print (comments included) back into a JSON value.
fn parse_back(e: &Exported) -> Value {
    serde_norway::from_str(&e.yaml).expect("exported YAML parses")
}

fn crd_excerpt() -> Value {
    serde_norway::from_str(include_str!("../testdata/cilium-cnp-schema.yaml")).unwrap()
}

/// Every key path of `value` against an OpenAPI v3 schema subtree; problems are collected.
fn walk(value: &Value, schema: &Value, path: &str, problems: &mut Vec<String>) {
    let ty = schema["type"].as_str().unwrap_or("?");
    match value {
        Value::Object(map) => {
            if ty != "object" {
                problems.push(format!("{path}: an object where the CRD has {ty}"));
                return;
            }
            for (key, v) in map {
                let sub = format!("{path}.{key}");
                if let Some(s) = schema["properties"].get(key) {
                    walk(v, s, &sub, problems);
                } else if let Some(s) = schema.get("additionalProperties") {
                    walk(v, s, &sub, problems);
                } else {
                    problems.push(format!("{sub}: not in the CRD"));
                }
            }
        }
        Value::Array(items) => {
            if ty != "array" {
                problems.push(format!("{path}: a list where the CRD has {ty}"));
                return;
            }
            for v in items {
                walk(v, &schema["items"], &format!("{path}[]"), problems);
            }
        }
        Value::String(s) => {
            if ty != "string" {
                problems.push(format!("{path}: the string {s:?} where the CRD has {ty}"));
            }
            if let Some(allowed) = schema["enum"].as_array() {
                if !allowed.iter().any(|a| a == s) {
                    problems.push(format!("{path}: {s:?} is not one of {allowed:?}"));
                }
            }
            if schema["format"] == "cidr" && s.parse::<IpNet>().is_err() {
                problems.push(format!("{path}: {s:?} is not a CIDR"));
            }
        }
        Value::Number(n) => {
            if ty != "integer" {
                problems.push(format!("{path}: the number {n} where the CRD has {ty}"));
            }
        }
        Value::Bool(_) if ty == "boolean" => {}
        other => problems.push(format!("{path}: unexpected {other}")),
    }
}

fn problems(doc: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(doc, &crd_excerpt(), "$", &mut out);
    out
}

#[test]
fn every_cilium_key_path_is_in_the_crd_excerpt() {
    let with_denies = mixed();
    let names_only = Allowlist {
        allow: targets(&["example.com", "*.example.org:443"]),
        deny: vec![],
        ..mixed()
    };
    for (list, sel) in [
        (with_denies, selector(&["app=web"])),
        (names_only, PodSelector::default()),
    ] {
        let e = export(&list, ExportFormat::Cilium, &sel);
        let doc = parse_back(&e);
        // What we validate is what we print.
        assert_eq!(
            doc,
            serde_json::to_value(cilium(&list, &policy_name(&list.name_hint), &sel)).unwrap()
        );
        assert_eq!(problems(&doc), Vec::<String>::new(), "{}", e.yaml);
        for key in ["toFQDNs", "toPorts"] {
            assert!(e.yaml.contains(key), "{key} missing from {}", e.yaml);
        }
    }
}

/// The walker itself finds a misspelt key, a number where Cilium wants a string, and a
/// protocol Cilium does not know: it is not a test that passes whatever it is given.
#[test]
fn the_crd_walker_catches_wrong_documents() {
    let e = export(&mixed(), ExportFormat::Cilium, &PodSelector::default());
    let good = parse_back(&e);
    let mut bad = good.clone();
    let rule = bad["spec"]["egress"][1].as_object_mut().unwrap();
    let fqdns = rule.remove("toFQDNs").unwrap();
    rule.insert("toFQDN".into(), fqdns);
    assert!(problems(&bad)
        .iter()
        .any(|p| p.contains("toFQDN: not in the CRD")));
    let mut bad = good.clone();
    let ports = bad["spec"]["egress"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|r| r.get("toPorts").is_some())
        .unwrap();
    ports["toPorts"][0]["ports"][0]["port"] = Value::from(443);
    ports["toPorts"][0]["ports"][0]["protocol"] = Value::from("tcp");
    let found = problems(&bad);
    assert!(
        found.iter().any(|p| p.contains("the number 443")),
        "{found:?}"
    );
    assert!(
        found.iter().any(|p| p.contains("\"tcp\" is not one of")),
        "{found:?}"
    );
}

#[test]
fn cilium_rules_keep_names_addresses_and_scopes_apart() {
    let doc = serde_json::to_value(cilium(&mixed(), "p", &PodSelector::default())).unwrap();
    let rules = doc["spec"]["egress"].as_array().unwrap();
    // The DNS visibility rule comes first, to kube-dns, UDP and TCP 53, any name.
    let dns = &rules[0];
    assert_eq!(
        dns["toEndpoints"][0]["matchLabels"]["k8s:k8s-app"],
        "kube-dns"
    );
    assert_eq!(dns["toPorts"][0]["rules"]["dns"][0]["matchPattern"], "*");
    for rule in rules {
        let selectors = ["toEndpoints", "toFQDNs", "toCIDR", "toCIDRSet"]
            .iter()
            .filter(|k| rule.get(**k).is_some())
            .count();
        assert_eq!(selectors, 1, "one kind of destination per rule: {rule}");
    }
    // `name:443/tcp` opens TCP 443 only; `[v6]:53` both protocols.
    let scoped = rules
        .iter()
        .find(|r| r["toFQDNs"][0]["matchName"] == "api.example.com")
        .unwrap();
    assert_eq!(
        scoped["toPorts"][0]["ports"],
        serde_json::json!([{"port": "443", "protocol": "TCP"}])
    );
    let both = rules
        .iter()
        .find(|r| r["toCIDR"][0] == "2001:db8::53/128")
        .unwrap();
    assert_eq!(both["toPorts"][0]["ports"].as_array().unwrap().len(), 2);
    // The wildcard is a pattern; the deny inside the /24 is an except and an egressDeny.
    assert!(doc
        .to_string()
        .contains("\"matchPattern\":\"*.example.org\""));
    assert_eq!(doc["spec"]["egressDeny"][0]["toCIDR"][0], "198.51.100.9/32");
    let set = rules.iter().find(|r| r.get("toCIDRSet").is_some()).unwrap();
    assert!(
        set.to_string().contains("\"except\":[\"198.51.100.9/32\"]"),
        "{set}"
    );
}

#[test]
fn a_containers_effective_allowlist_subtracts_its_denies() {
    let mut b = test_bundle(
        &[
            "example.com",
            "*.example.org",
            "198.51.100.0/24",
            "198.18.0.7",
        ],
        &[],
        Mode::DenyAll,
        DnsTier::Builtin,
    );
    b.profiles = vec!["p".into()];
    b.live_allow(Target::parse("198.18.9.0/24:22/tcp").unwrap(), None);
    b.live_allow(
        Target::parse("other.example").unwrap(),
        Some(Resolved {
            addrs: vec![],
            at: 0,
        }),
    );
    b.live_deny(Target::parse("other.example").unwrap());
    b.live_deny(Target::parse("a.example.org").unwrap());
    b.live_deny(Target::parse("198.18.0.7").unwrap());
    b.live_deny(Target::parse("198.51.100.9").unwrap());
    let list = Allowlist::from_bundle(&b);
    let allow: Vec<String> = list.allow.iter().map(Target::to_string).collect();
    // A denied name below a wildcard cannot be cut out of it: the wildcard stays (Cilium and
    // the shield's resolver then disagree on a.example.org; the docs say so).
    assert_eq!(
        allow,
        [
            "example.com",
            "*.example.org",
            "198.51.100.0/24",
            "198.18.9.0/24:22/tcp"
        ]
    );
    let deny: Vec<String> = list.deny.iter().map(IpNet::to_string).collect();
    assert_eq!(deny, ["198.18.0.7/32", "198.51.100.9/32"]);
    assert!(list.source.contains("container c1"), "{}", list.source);
}

#[test]
fn selectors_follow_kubernetes_label_syntax() {
    let ok = selector(&["app=web", "example.com/team=a-b_c.d", "empty="]);
    assert_eq!(ok.0.len(), 3);
    for bad in [
        "app",
        "=web",
        "app=-web",
        "app=web app",
        "Example.com/app=x",
        "/app=x",
        "app/=x",
        "a=b=c",
    ] {
        let err = PodSelector::parse(&[bad.to_string()]);
        assert!(err.is_err(), "accepted {bad:?}");
    }
    let long = format!("app={}", "x".repeat(64));
    assert!(PodSelector::parse(&[long]).is_err());
    assert_eq!(
        PodSelector::parse(&["a=1".into(), "a=2".into()]),
        Err(ExportError::SelectorRepeated("a".into()))
    );
}

#[test]
fn policy_names_are_valid_object_names() {
    assert_eq!(policy_name("My_Container.1"), "terok-shield-my-container.1");
    assert_eq!(policy_name("base-dev-node"), "terok-shield-base-dev-node");
    assert_eq!(policy_name("x."), "terok-shield-x");
    assert!(policy_name(&"a".repeat(400)).len() <= 253);
}
