//! An allowlist as a Kubernetes policy: a CiliumNetworkPolicy or a plain NetworkPolicy.
//!
//! Pure: the allowlist (profile entries, live allows and denies) goes in, a typed document and
//! the YAML text come out, so both formats are snapshot-tested and the Cilium field names are
//! checked against an excerpt of Cilium's CRD schema (`testdata/cilium-cnp-schema.yaml`).
//!
//! What the two formats can say differs: a NetworkPolicy has no names, only `ipBlock`s, so
//! domain entries are reported as unexpressed instead of being silently dropped.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use ipnet::IpNet;
use serde::Serialize;
use thiserror::Error;

use super::bundle::Bundle;
use super::target::{Host, PortScope, Protocol, Target};

/// Which policy language to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// `cilium.io/v2` CiliumNetworkPolicy: names (`toFQDNs`), addresses and ports.
    Cilium,
    /// `networking.k8s.io/v1` NetworkPolicy: addresses and ports only.
    Kubernetes,
}

/// Why an export request was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ExportError {
    #[error("invalid --selector `{0}`: write it as KEY=VALUE, e.g. --selector app=web")]
    SelectorShape(String),
    #[error("invalid --selector key `{key}`: {why}")]
    SelectorKey { key: String, why: &'static str },
    #[error("invalid --selector value `{value}` of key `{key}`: {why}")]
    SelectorValue {
        key: String,
        value: String,
        why: &'static str,
    },
    #[error("--selector key `{0}` is given twice; give each key once")]
    SelectorRepeated(String),
}

/// Pod labels the policy applies to (`matchLabels`); empty selects every pod of the namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodSelector(BTreeMap<String, String>);

impl PodSelector {
    /// Parse `--selector KEY=VALUE` arguments, checked against Kubernetes' label syntax (the
    /// API server would refuse anything else, after the user had already applied half a setup).
    pub fn parse(pairs: &[String]) -> Result<PodSelector, ExportError> {
        let mut labels = BTreeMap::new();
        for pair in pairs {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| ExportError::SelectorShape(pair.clone()))?;
            check_label_key(key)?;
            check_label_value(key, value)?;
            if labels.insert(key.to_string(), value.to_string()).is_some() {
                return Err(ExportError::SelectorRepeated(key.to_string()));
            }
        }
        Ok(PodSelector(labels))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `[prefix/]name`: prefix a DNS subdomain of at most 253 characters, name at most 63
/// characters of letters, digits, `-`, `_`, `.`, starting and ending alphanumeric.
fn check_label_key(key: &str) -> Result<(), ExportError> {
    let bad = |why| ExportError::SelectorKey {
        key: key.to_string(),
        why,
    };
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let ok = !prefix.is_empty()
            && prefix.len() <= 253
            && prefix.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !ok {
            return Err(bad("the prefix before `/` must be a lower-case DNS name"));
        }
    }
    if name.is_empty() || !label_word(name) {
        return Err(bad("the name must be 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"));
    }
    Ok(())
}

fn check_label_value(key: &str, value: &str) -> Result<(), ExportError> {
    if value.is_empty() || label_word(value) {
        return Ok(());
    }
    Err(ExportError::SelectorValue {
        key: key.to_string(),
        value: value.to_string(),
        why: "use at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
    })
}

fn label_word(text: &str) -> bool {
    let bytes = text.as_bytes();
    text.len() <= 63
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b))
}

/// What to export: the allowed targets and the networks denied outright.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowlist {
    /// Where it came from, for the header comment (`container c1`, `profiles base, dev-node`).
    pub source: String,
    /// Base of `metadata.name`: the container name or the profile names.
    pub name_hint: String,
    pub allow: Vec<Target>,
    /// Live denies of addresses and networks (they win over every allow).
    pub deny: Vec<IpNet>,
}

impl Allowlist {
    /// Composed profiles as they are (no live decisions).
    pub fn from_profiles(names: &[String], entries: Vec<Target>) -> Allowlist {
        Allowlist {
            source: format!("profiles {}", names.join(", ")),
            name_hint: names.join("-"),
            allow: entries,
            deny: Vec::new(),
        }
    }

    /// A container's effective allowlist: profile entries and live allows, without what live
    /// denies took away (a denied name is left out; a denied address or network is kept as a
    /// deny, since it also wins over addresses other entries bring).
    pub fn from_bundle(bundle: &Bundle) -> Allowlist {
        let deny: Vec<IpNet> = bundle
            .live_deny
            .iter()
            .filter_map(|t| match t.host {
                Host::Net(n) => Some(n),
                Host::Domain(_) => None,
            })
            .collect();
        let allow = bundle
            .effective_allow()
            .into_iter()
            // An allow wholly inside a deny opens nothing.
            .filter(|t| match &t.host {
                Host::Net(n) => !deny.iter().any(|d| d.contains(n)),
                Host::Domain(_) => true,
            })
            .collect();
        Allowlist {
            source: format!(
                "container {} (profiles {}; live allows and denies as of export)",
                bundle.name,
                if bundle.profiles.is_empty() {
                    "none".to_string()
                } else {
                    bundle.profiles.join(", ")
                }
            ),
            name_hint: bundle.name.to_string(),
            allow,
            deny,
        }
    }
}

/// The finished export: YAML text, and the entries the format could not express (the caller
/// tells the user on stderr as well; the YAML carries them as a comment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    pub yaml: String,
    pub unexpressed: Vec<String>,
}

/// Render `list` as a policy document of `format` for the pods `selector` picks.
pub fn export(list: &Allowlist, format: ExportFormat, selector: &PodSelector) -> Exported {
    let name = policy_name(&list.name_hint);
    let mut comments = vec![format!(
        "Generated by terok-shield {} from {}.",
        env!("CARGO_PKG_VERSION"),
        list.source
    )];
    if selector.is_empty() {
        comments.push("The pod selector is empty: this policy applies to EVERY pod in the namespace it is applied to; pass --selector KEY=VALUE to narrow it.".into());
    }
    comments.push("Refused traffic is dropped (the client waits for its timeout), not refused at once as the shield does; later live allow/deny on the container is not reflected here.".into());
    let (body, unexpressed) = match format {
        ExportFormat::Cilium => {
            let doc = cilium(list, &name, selector);
            if doc.spec.egress.iter().all(is_empty_rule) {
                comments.push("Nothing is allowed: the single empty egress rule puts the pods in default-deny for egress.".into());
            }
            if list.allow.iter().any(|t| matches!(t.host, Host::Domain(_))) {
                comments.push("Names need Cilium's DNS proxy: the kube-dns rule lets the pods resolve any name and makes the answers visible to Cilium; connections go only to the allowed names' addresses.".into());
            }
            (to_yaml(&doc), Vec::new())
        }
        ExportFormat::Kubernetes => {
            let (doc, unexpressed) = kubernetes(list, &name, selector);
            if !unexpressed.is_empty() {
                comments.push(format!(
                    "Not expressible in a NetworkPolicy (it has no names; use --format cilium, or list their addresses in a profile): {}",
                    unexpressed.join(", ")
                ));
                comments.push("No DNS is opened either: add an egress rule to your cluster DNS if the pods need names.".into());
            }
            if doc.spec.egress.is_empty() {
                comments.push("Nothing is allowed: an empty egress list with policyTypes [Egress] denies all egress.".into());
            }
            (to_yaml(&doc), unexpressed)
        }
    };
    let mut yaml = String::new();
    for c in &comments {
        let _ = writeln!(yaml, "# {c}");
    }
    yaml.push_str(&body);
    Exported { yaml, unexpressed }
}

fn to_yaml<T: Serialize>(doc: &T) -> String {
    serde_norway::to_string(doc).expect("export documents serialise")
}

/// `terok-shield-HINT` as a Kubernetes object name: lower case, `_` as `-`, at most 253
/// characters, starting and ending alphanumeric (container and profile names are close to
/// that alphabet already).
pub fn policy_name(hint: &str) -> String {
    let mut name: String = format!("terok-shield-{hint}")
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '-' | '.') => c,
            _ => '-',
        })
        .collect();
    name.truncate(253);
    name.trim_end_matches(['-', '.']).to_string()
}

/// Allow entries grouped by port scope (`None` = every port), in a stable order.
fn by_scope(allow: &[Target]) -> BTreeMap<Option<PortScope>, Vec<&Host>> {
    let mut groups: BTreeMap<Option<PortScope>, Vec<&Host>> = BTreeMap::new();
    for t in allow {
        let hosts = groups.entry(t.scope).or_default();
        if !hosts.contains(&&t.host) {
            hosts.push(&t.host);
        }
    }
    groups
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    }
}

/// Networks of `deny` that lie inside `net` (and are smaller): its `except` list.
fn excepts(net: &IpNet, deny: &[IpNet]) -> Vec<String> {
    deny.iter()
        .filter(|d| net.contains(*d) && *d != net)
        .map(IpNet::to_string)
        .collect()
}

// ---- CiliumNetworkPolicy (cilium.io/v2) ----

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CiliumNetworkPolicy {
    api_version: &'static str,
    kind: &'static str,
    metadata: Metadata,
    spec: CiliumSpec,
}

#[derive(Debug, Serialize)]
struct Metadata {
    name: String,
    labels: BTreeMap<&'static str, &'static str>,
}

fn metadata(name: &str) -> Metadata {
    Metadata {
        name: name.to_string(),
        labels: BTreeMap::from([("app.kubernetes.io/managed-by", "terok-shield")]),
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct CiliumSpec {
    description: String,
    endpoint_selector: LabelSelector,
    egress: Vec<CiliumEgressRule>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    egress_deny: Vec<CiliumEgressDenyRule>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct LabelSelector {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Default, Serialize)]
struct CiliumEgressRule {
    #[serde(rename = "toEndpoints", skip_serializing_if = "Option::is_none")]
    to_endpoints: Option<Vec<LabelSelector>>,
    #[serde(rename = "toFQDNs", skip_serializing_if = "Option::is_none")]
    to_fqdns: Option<Vec<FqdnSelector>>,
    #[serde(rename = "toCIDR", skip_serializing_if = "Option::is_none")]
    to_cidr: Option<Vec<String>>,
    #[serde(rename = "toCIDRSet", skip_serializing_if = "Option::is_none")]
    to_cidr_set: Option<Vec<CidrRule>>,
    #[serde(rename = "toPorts", skip_serializing_if = "Option::is_none")]
    to_ports: Option<Vec<CiliumPortRule>>,
}

fn is_empty_rule(rule: &CiliumEgressRule) -> bool {
    rule.to_endpoints.is_none()
        && rule.to_fqdns.is_none()
        && rule.to_cidr.is_none()
        && rule.to_cidr_set.is_none()
        && rule.to_ports.is_none()
}

#[derive(Debug, Serialize)]
struct CiliumEgressDenyRule {
    #[serde(rename = "toCIDR")]
    to_cidr: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct FqdnSelector {
    #[serde(skip_serializing_if = "Option::is_none")]
    match_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    match_pattern: Option<String>,
}

#[derive(Debug, Serialize)]
struct CidrRule {
    cidr: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    except: Vec<String>,
}

#[derive(Debug, Serialize)]
struct CiliumPortRule {
    ports: Vec<CiliumPort>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rules: Option<L7Rules>,
}

/// Cilium's `port` is a string in the CRD (it may also be a named port).
#[derive(Debug, Serialize)]
struct CiliumPort {
    port: String,
    protocol: &'static str,
}

#[derive(Debug, Serialize)]
struct L7Rules {
    dns: Vec<FqdnSelector>,
}

fn cilium_ports(scope: &PortScope) -> Vec<CiliumPortRule> {
    vec![CiliumPortRule {
        ports: scope
            .protocols()
            .iter()
            .map(|p| CiliumPort {
                port: scope.port.to_string(),
                protocol: protocol_name(*p),
            })
            .collect(),
        rules: None,
    }]
}

/// Cilium's FQDN policies only work when the pods' DNS goes through its proxy: this rule
/// sends queries to kube-dns through it (and allows them).
fn kube_dns_rule() -> CiliumEgressRule {
    CiliumEgressRule {
        to_endpoints: Some(vec![LabelSelector {
            match_labels: BTreeMap::from([
                (
                    "k8s:io.kubernetes.pod.namespace".to_string(),
                    "kube-system".to_string(),
                ),
                ("k8s:k8s-app".to_string(), "kube-dns".to_string()),
            ]),
        }]),
        to_ports: Some(vec![CiliumPortRule {
            ports: [Protocol::Udp, Protocol::Tcp]
                .iter()
                .map(|p| CiliumPort {
                    port: "53".into(),
                    protocol: protocol_name(*p),
                })
                .collect(),
            rules: Some(L7Rules {
                dns: vec![FqdnSelector {
                    match_name: None,
                    match_pattern: Some("*".into()),
                }],
            }),
        }]),
        ..Default::default()
    }
}

fn cilium(list: &Allowlist, name: &str, selector: &PodSelector) -> CiliumNetworkPolicy {
    let mut egress = Vec::new();
    let mut any_name = false;
    // Cilium wants names and addresses in separate rules (toFQDNs may not share a rule
    // with another to* selector), one pair per port scope.
    for (scope, hosts) in by_scope(&list.allow) {
        let names: Vec<FqdnSelector> = hosts
            .iter()
            .filter_map(|h| match h {
                Host::Domain(d) if d.wildcard => Some(FqdnSelector {
                    match_name: None,
                    match_pattern: Some(format!("*.{}", d.name)),
                }),
                Host::Domain(d) => Some(FqdnSelector {
                    match_name: Some(d.name.to_string()),
                    match_pattern: None,
                }),
                Host::Net(_) => None,
            })
            .collect();
        let nets: Vec<&IpNet> = hosts
            .iter()
            .filter_map(|h| match h {
                Host::Net(n) => Some(n),
                Host::Domain(_) => None,
            })
            .collect();
        let ports = scope.as_ref().map(cilium_ports);
        if !names.is_empty() {
            any_name = true;
            egress.push(CiliumEgressRule {
                to_fqdns: Some(names),
                to_ports: scope.as_ref().map(cilium_ports),
                ..Default::default()
            });
        }
        if !nets.is_empty() {
            let needs_set = nets.iter().any(|n| !excepts(n, &list.deny).is_empty());
            let mut rule = CiliumEgressRule {
                to_ports: ports,
                ..Default::default()
            };
            if needs_set {
                rule.to_cidr_set = Some(
                    nets.iter()
                        .map(|n| CidrRule {
                            cidr: n.to_string(),
                            except: excepts(n, &list.deny),
                        })
                        .collect(),
                );
            } else {
                rule.to_cidr = Some(nets.iter().map(|n| n.to_string()).collect());
            }
            egress.push(rule);
        }
    }
    if any_name {
        egress.insert(0, kube_dns_rule());
    }
    if egress.is_empty() {
        // An empty list would leave egress unenforced; one empty rule denies it all.
        egress.push(CiliumEgressRule::default());
    }
    let egress_deny = if list.deny.is_empty() {
        Vec::new()
    } else {
        vec![CiliumEgressDenyRule {
            to_cidr: list.deny.iter().map(IpNet::to_string).collect(),
        }]
    };
    CiliumNetworkPolicy {
        api_version: "cilium.io/v2",
        kind: "CiliumNetworkPolicy",
        metadata: metadata(name),
        spec: CiliumSpec {
            description: format!("terok-shield allowlist: {}", list.source),
            endpoint_selector: LabelSelector {
                match_labels: selector.0.clone(),
            },
            egress,
            egress_deny,
        },
    }
}

// ---- NetworkPolicy (networking.k8s.io/v1) ----

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicy {
    api_version: &'static str,
    kind: &'static str,
    metadata: Metadata,
    spec: K8sSpec,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct K8sSpec {
    pod_selector: LabelSelector,
    policy_types: Vec<&'static str>,
    egress: Vec<K8sEgressRule>,
}

#[derive(Debug, Serialize)]
struct K8sEgressRule {
    to: Vec<K8sPeer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ports: Option<Vec<K8sPort>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct K8sPeer {
    ip_block: CidrRule,
}

#[derive(Debug, Serialize)]
struct K8sPort {
    protocol: &'static str,
    port: u16,
}

fn kubernetes(
    list: &Allowlist,
    name: &str,
    selector: &PodSelector,
) -> (NetworkPolicy, Vec<String>) {
    let mut egress = Vec::new();
    let mut unexpressed = Vec::new();
    for (scope, hosts) in by_scope(&list.allow) {
        let mut to = Vec::new();
        for host in hosts {
            match host {
                Host::Net(n) => to.push(K8sPeer {
                    ip_block: CidrRule {
                        cidr: n.to_string(),
                        except: excepts(n, &list.deny),
                    },
                }),
                Host::Domain(d) => unexpressed.push(
                    Target {
                        host: Host::Domain(d.clone()),
                        scope,
                    }
                    .to_string(),
                ),
            }
        }
        if to.is_empty() {
            continue;
        }
        egress.push(K8sEgressRule {
            to,
            ports: scope.map(|s| {
                s.protocols()
                    .iter()
                    .map(|p| K8sPort {
                        protocol: protocol_name(*p),
                        port: s.port,
                    })
                    .collect()
            }),
        });
    }
    let doc = NetworkPolicy {
        api_version: "networking.k8s.io/v1",
        kind: "NetworkPolicy",
        metadata: metadata(name),
        spec: K8sSpec {
            pod_selector: LabelSelector {
                match_labels: selector.0.clone(),
            },
            policy_types: vec!["Egress"],
            egress,
        },
    };
    (doc, unexpressed)
}

#[cfg(test)]
mod tests;
