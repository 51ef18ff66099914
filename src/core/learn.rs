//! `learn`: turn a container's packet and DNS events into a profile of what it tried to
//! reach, ready to review and save as `NAME.txt`.
//!
//! Refusals (`blocked`, `dns_refused`) say what the allowlist lacked; after a session in
//! `down` mode the `bypass` events list everything the workload used, so the same profile
//! is an audit of its traffic. Names come first (a `*.parent` wildcard stands in when
//! [`WILDCARD_AFTER`] or more names under one parent were seen); an address is listed only
//! when no name led to it. Every entry carries a `#` comment: how often, when last, and
//! how it was reached.
//!
//! Pure and total: whatever the log holds, the text always parses as a profile
//! ([`super::profile::parse_profile`]), which the property test below checks. Names that are
//! not valid profile entries are counted in a comment, never written as entries.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::Value;

use super::audit::rfc3339_utc;
use super::audit::AuditRecord;
use super::observe::{parse_rfc3339, printable};
use super::target::{DomainName, DomainPattern, Host, Target};

/// This many distinct names directly under one parent make a `*.parent` suggestion.
pub const WILDCARD_AFTER: usize = 3;
/// Ports (or DNS types) listed per entry before the rest are summarised.
const MAX_DETAILS: usize = 4;

/// The events `learn` reads.
pub const LEARN_EVENTS: &[&str] = &["blocked", "bypass", "dns_refused"];

/// DNS refusals a profile entry could lift: an explicit deny (`denied`) or a refused query
/// type (`query_type`) would not be changed by allowing the name.
fn liftable_dns_reason(reason: &str) -> bool {
    matches!(reason, "not_allowlisted" | "block_mode")
}

/// What was seen of one name or address.
#[derive(Debug, Clone, Default)]
struct Seen {
    count: u64,
    last_ms: u64,
    /// `80/tcp`, `dns A`, ...
    how: BTreeSet<String>,
    /// Verdicts: `denied`, `private`, `blocked`, `bypass`, `dns`.
    verdicts: BTreeSet<String>,
    /// For a name: the addresses it led to.
    addresses: BTreeSet<IpAddr>,
}

impl Seen {
    fn add(&mut self, count: u64, at_ms: u64, how: String, verdict: &str) {
        self.count = self.count.saturating_add(count);
        self.last_ms = self.last_ms.max(at_ms);
        self.how.insert(how);
        self.verdicts.insert(verdict.to_string());
    }

    fn merge(&mut self, other: &Seen) {
        self.count = self.count.saturating_add(other.count);
        self.last_ms = self.last_ms.max(other.last_ms);
        self.how.extend(other.how.iter().cloned());
        self.verdicts.extend(other.verdicts.iter().cloned());
        self.addresses.extend(other.addresses.iter().copied());
    }

    /// `# 12x, last 2026-11-30T03:10:00.000Z, 80/tcp, 443/tcp (denied)`.
    fn comment(&self) -> String {
        let mut parts = vec![
            format!("{}x", self.count),
            format!("last {}", rfc3339_utc(u128::from(self.last_ms))),
        ];
        parts.push(listed(self.how.iter().cloned().collect()));
        if !self.addresses.is_empty() {
            parts.push(format!(
                "at {}",
                listed(self.addresses.iter().map(ToString::to_string).collect())
            ));
        }
        let verdicts: Vec<String> = self.verdicts.iter().cloned().collect();
        format!("# {} ({})", parts.join(", "), verdicts.join(", "))
    }
}

/// Up to [`MAX_DETAILS`] items joined by spaces, then `+N more`.
fn listed(items: Vec<String>) -> String {
    let more = items.len().saturating_sub(MAX_DETAILS);
    let mut shown: Vec<String> = items.into_iter().take(MAX_DETAILS).collect();
    if more > 0 {
        shown.push(format!("+{more} more"));
    }
    shown.join(" ")
}

/// The profile `learn` prints, and what is in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learned {
    /// The profile text.
    pub text: String,
    /// Its entries, in order.
    pub entries: Vec<Target>,
}

/// Build the profile of `container` from its audit `records` (already filtered by time).
/// Destinations under a live deny (`denied`) are left out: the user already decided.
pub fn learn(container: &str, records: &[AuditRecord], denied: &[Target]) -> Learned {
    let mut names: BTreeMap<DomainName, Seen> = BTreeMap::new();
    let mut addresses: BTreeMap<IpAddr, Seen> = BTreeMap::new();
    let mut named_addresses: BTreeSet<IpAddr> = BTreeSet::new();
    let (mut invalid, mut left_out, mut bypass_seen) = (0usize, 0usize, false);
    let (mut first_ms, mut last_ms) = (u64::MAX, 0u64);
    for record in records {
        if !LEARN_EVENTS.contains(&record.event.as_str()) {
            continue;
        }
        let d = &record.detail;
        let at_ms = parse_rfc3339(&record.ts).unwrap_or(0);
        let count = d.get("count").and_then(Value::as_u64).unwrap_or(1).max(1);
        let text = |key: &str| d.get(key).and_then(Value::as_str);
        let (name, how, verdict, dst) = if record.event == "dns_refused" {
            if !text("reason").is_some_and(liftable_dns_reason) {
                continue;
            }
            let qtype = text("qtype").unwrap_or("?");
            (text("name"), format!("dns {qtype}"), "dns", None)
        } else {
            bypass_seen |= record.event == "bypass";
            let proto = text("proto").unwrap_or("?");
            let how = match d.get("port").and_then(Value::as_u64) {
                Some(port) => format!("{port}/{proto}"),
                None => proto.to_string(),
            };
            let verdict = text("verdict").unwrap_or(record.event.as_str());
            let dst = text("dst").and_then(|a| a.parse::<IpAddr>().ok());
            (text("name"), how, verdict, dst)
        };
        let how = clean_detail(&how);
        let verdict = clean_detail(verdict);
        match (name, dst) {
            (Some(raw), _) => {
                let Ok(name) = raw.parse::<DomainName>() else {
                    invalid += 1;
                    continue;
                };
                if denied.iter().any(|t| covers_name(t, &name)) {
                    left_out += 1;
                    continue;
                }
                let seen = names.entry(name).or_default();
                seen.add(count, at_ms, how, &verdict);
                if let Some(addr) = dst {
                    seen.addresses.insert(addr);
                    named_addresses.insert(addr);
                }
            }
            (None, Some(addr)) => {
                if denied.iter().any(|t| covers_addr(t, addr)) {
                    left_out += 1;
                    continue;
                }
                addresses
                    .entry(addr)
                    .or_default()
                    .add(count, at_ms, how, &verdict);
            }
            (None, None) => {
                invalid += 1;
                continue;
            }
        }
        first_ms = first_ms.min(at_ms);
        last_ms = last_ms.max(at_ms);
    }
    addresses.retain(|addr, _| !named_addresses.contains(addr));

    let mut out = Profile::default();
    let container = printable(container);
    out.comment(&format!(
        "# terok-shield learn {container}: what the container {}",
        if bypass_seen {
            "reached in down mode (bypass) or was refused"
        } else {
            "tried to reach and was refused"
        }
    ));
    if names.is_empty() && addresses.is_empty() {
        out.comment("# nothing in the audit log for this time span");
    } else {
        out.comment(&format!(
            "# events from {} to {}; review, then save as a profile NAME.txt",
            rfc3339_utc(u128::from(first_ms)),
            rfc3339_utc(u128::from(last_ms))
        ));
    }
    if left_out > 0 {
        out.comment(&format!(
            "# left out: {left_out} events of destinations denied with `terok-shield deny`"
        ));
    }
    if invalid > 0 {
        out.comment(&format!(
            "# left out: {invalid} events whose name or address is not a valid profile entry"
        ));
    }

    for group in group_names(&names) {
        match group {
            NameGroup::Single(name) => out.entry(
                Target {
                    host: Host::Domain(DomainPattern {
                        name: name.clone(),
                        wildcard: false,
                    }),
                    scope: None,
                },
                &names[name].comment(),
            ),
            NameGroup::Wildcard { parent, children } => {
                let mut total = Seen::default();
                for child in &children {
                    total.merge(&names[*child]);
                }
                total.how = [format!("{} names", children.len())].into();
                out.entry(
                    Target {
                        host: Host::Domain(DomainPattern {
                            name: parent,
                            wildcard: true,
                        }),
                        scope: None,
                    },
                    &total.comment(),
                );
                for child in children {
                    out.comment(&format!("#   {child}  {}", &names[child].comment()[2..]));
                }
            }
        }
    }
    for (addr, seen) in &addresses {
        out.entry(
            Target {
                host: Host::Net(IpNet::from(*addr)),
                scope: None,
            },
            &seen.comment(),
        );
    }
    Learned {
        text: out.text,
        entries: out.entries,
    }
}

/// A detail from the log (protocol, verdict, DNS type) cut to a sane length and printable.
fn clean_detail(text: &str) -> String {
    printable(&text.chars().take(32).collect::<String>()).replace('#', "?")
}

/// Whether a live deny covers a name.
fn covers_name(deny: &Target, name: &DomainName) -> bool {
    matches!(&deny.host, Host::Domain(pattern) if pattern.matches(name))
}

/// Whether a live deny covers an address.
fn covers_addr(deny: &Target, addr: IpAddr) -> bool {
    matches!(&deny.host, Host::Net(net) if net.contains(&addr))
}

/// A profile being written: text and entries kept in step.
#[derive(Default)]
struct Profile {
    text: String,
    entries: Vec<Target>,
}

impl Profile {
    /// A comment line; `line` starts with `#` and has no line break.
    fn comment(&mut self, line: &str) {
        debug_assert!(line.starts_with('#'));
        self.text.push_str(&printable(line));
        self.text.push('\n');
    }

    fn entry(&mut self, target: Target, comment: &str) {
        self.text
            .push_str(&format!("{target}  {}\n", printable(comment)));
        self.entries.push(target);
    }
}

/// Names in profile order: grouped by domain (labels read from the right), with a wildcard
/// standing in for [`WILDCARD_AFTER`] or more names directly under one parent of at least two
/// labels (never `*.com`).
enum NameGroup<'a> {
    Single(&'a DomainName),
    Wildcard {
        parent: DomainName,
        children: Vec<&'a DomainName>,
    },
}

fn parent_of(name: &DomainName) -> Option<DomainName> {
    let (_, parent) = name.as_str().split_once('.')?;
    if !parent.contains('.') {
        return None;
    }
    parent.parse().ok()
}

fn group_names(names: &BTreeMap<DomainName, Seen>) -> Vec<NameGroup<'_>> {
    let mut by_parent: BTreeMap<DomainName, Vec<&DomainName>> = BTreeMap::new();
    for name in names.keys() {
        if let Some(parent) = parent_of(name) {
            by_parent.entry(parent).or_default().push(name);
        }
    }
    let mut groups: Vec<(String, NameGroup)> = Vec::new();
    let mut grouped: BTreeSet<&DomainName> = BTreeSet::new();
    for (parent, children) in by_parent {
        if children.len() >= WILDCARD_AFTER {
            grouped.extend(children.iter().copied());
            groups.push((
                sort_key(&parent, true),
                NameGroup::Wildcard { parent, children },
            ));
        }
    }
    for name in names.keys().filter(|n| !grouped.contains(n)) {
        groups.push((sort_key(name, false), NameGroup::Single(name)));
    }
    groups.sort_by(|a, b| a.0.cmp(&b.0));
    groups.into_iter().map(|(_, g)| g).collect()
}

/// `www.example.com` sorts as `com.example.www`, so names of one domain stay together; a
/// wildcard sorts after its apex.
fn sort_key(name: &DomainName, wildcard: bool) -> String {
    let mut labels: Vec<&str> = name.as_str().split('.').rev().collect();
    if wildcard {
        labels.push("*");
    }
    labels.join(".")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::core::profile::parse_profile;

    fn at(ms: u128, event: &str, detail: Value) -> AuditRecord {
        AuditRecord::new(ms, "c1", event, true, detail)
    }

    fn blocked(ms: u128, dst: &str, port: u16, name: Option<&str>, count: u64) -> AuditRecord {
        let mut d = json!({"verdict":"denied","dst":dst,"proto":"tcp","port":port,"count":count,"first":count == 1});
        if let Some(n) = name {
            d["name"] = json!(n);
        }
        at(ms, "blocked", d)
    }

    fn refused(ms: u128, name: &str, reason: &str) -> AuditRecord {
        at(
            ms,
            "dns_refused",
            json!({"name":name,"qtype":"A","reason":reason,"count":1,"first":true}),
        )
    }

    fn entries(l: &Learned) -> Vec<String> {
        l.entries.iter().map(ToString::to_string).collect()
    }

    const T0: u128 = 1_795_870_860_000;

    #[test]
    fn names_first_then_addresses_without_a_name() {
        let records = [
            blocked(T0, "198.51.100.60", 80, Some("svc.example.com"), 1),
            blocked(T0 + 5000, "198.51.100.60", 80, Some("svc.example.com"), 41),
            blocked(T0 + 6000, "198.51.100.20", 9, None, 1),
            // Named elsewhere: no address entry of its own.
            blocked(T0 + 7000, "198.51.100.60", 443, None, 1),
            refused(T0 + 8000, "evil.example", "not_allowlisted"),
            at(T0, "apply", json!({})),
        ];
        let l = learn("c1", &records, &[]);
        assert_eq!(
            entries(&l),
            ["svc.example.com", "evil.example", "198.51.100.20"]
        );
        assert!(
            l.text.contains(
                "svc.example.com  # 42x, last 2026-11-28T13:01:05.000Z, 80/tcp, at 198.51.100.60 (denied)\n"
            ),
            "{}",
            l.text
        );
        assert!(
            l.text
                .contains("evil.example  # 1x, last 2026-11-28T13:01:08.000Z, dns A (dns)\n"),
            "{}",
            l.text
        );
        assert!(l.text.starts_with(
            "# terok-shield learn c1: what the container tried to reach and was refused\n"
        ));
        assert_eq!(
            parse_profile("learned", &l.text).unwrap().entries,
            l.entries
        );
    }

    #[test]
    fn many_subdomains_of_one_parent_suggest_a_wildcard() {
        let records = [
            refused(T0, "a.cdn.example.com", "not_allowlisted"),
            refused(T0 + 1, "b.cdn.example.com", "not_allowlisted"),
            blocked(T0 + 2, "198.51.100.7", 443, Some("c.cdn.example.com"), 3),
            refused(T0 + 3, "cdn.example.com", "not_allowlisted"),
            refused(T0 + 4, "x.other.example", "not_allowlisted"),
            refused(T0 + 5, "y.other.example", "not_allowlisted"),
            // Never `*.com`.
            refused(T0 + 6, "one.com", "not_allowlisted"),
            refused(T0 + 7, "two.com", "not_allowlisted"),
            refused(T0 + 8, "three.com", "not_allowlisted"),
        ];
        let l = learn("c1", &records, &[]);
        assert_eq!(
            entries(&l),
            [
                "cdn.example.com",
                "*.cdn.example.com",
                "one.com",
                "three.com",
                "two.com",
                "x.other.example",
                "y.other.example"
            ]
        );
        assert!(
            l.text.contains("*.cdn.example.com  # 5x, last 2026-11-28T13:01:00.002Z, 3 names, at 198.51.100.7 (denied, dns)\n#   a.cdn.example.com  1x,"),
            "{}",
            l.text
        );
        assert_eq!(
            parse_profile("learned", &l.text).unwrap().entries,
            l.entries
        );
    }

    #[test]
    fn bypass_events_make_it_an_audit_of_down_mode() {
        let records = [
            at(
                T0,
                "bypass",
                json!({"verdict":"bypass","dst":"198.51.100.10","proto":"tcp","port":80,"count":1,"first":true}),
            ),
            at(
                T0,
                "bypass",
                json!({"verdict":"bypass","dst":"198.51.100.60","proto":"udp","port":53,"name":"svc.example.com","count":1,"first":true}),
            ),
        ];
        let l = learn("c1", &records, &[]);
        assert_eq!(entries(&l), ["svc.example.com", "198.51.100.10"]);
        assert!(
            l.text.contains("reached in down mode (bypass)"),
            "{}",
            l.text
        );
    }

    #[test]
    fn denied_destinations_and_unliftable_refusals_are_left_out() {
        let records = [
            refused(T0, "gone.example", "not_allowlisted"),
            refused(T0, "sub.gone.example", "not_allowlisted"),
            refused(T0, "typed.example", "query_type"),
            refused(T0, "denied.example", "denied"),
            blocked(T0, "198.51.100.20", 80, None, 1),
            blocked(T0, "198.51.100.21", 80, None, 1),
        ];
        let denied = [
            Target::parse("*.gone.example").unwrap(),
            Target::parse("gone.example").unwrap(),
            Target::parse("198.51.100.20").unwrap(),
        ];
        let l = learn("c1", &records, &denied);
        assert_eq!(entries(&l), ["198.51.100.21"]);
        assert!(l.text.contains("# left out: 3 events"), "{}", l.text);
    }

    #[test]
    fn an_empty_log_is_an_empty_profile() {
        let l = learn("c1", &[], &[]);
        assert!(l.entries.is_empty());
        assert!(l.text.contains("nothing in the audit log"), "{}", l.text);
        assert!(parse_profile("learned", &l.text)
            .unwrap()
            .entries
            .is_empty());
    }

    fn arb_text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9]{1,8}(\\.[a-z0-9-]{1,8}){0,3}",
            "(a|b|c)\\.(x|y)\\.example",
            ".{0,40}",
            Just("x\n198.51.100.1".to_string()),
            Just("#a.example".to_string()),
        ]
    }

    fn arb_record() -> impl Strategy<Value = AuditRecord> {
        (
            prop_oneof![
                Just("blocked"),
                Just("bypass"),
                Just("dns_refused"),
                Just("apply")
            ],
            proptest::option::of(arb_text()),
            prop_oneof![
                "198\\.51\\.100\\.[0-9]{1,3}".prop_map(String::from),
                "2001:db8::[0-9a-f]{1,4}".prop_map(String::from),
                arb_text()
            ],
            arb_text(),
            proptest::option::of(any::<u16>()),
            any::<u64>(),
            prop_oneof![Just("not_allowlisted".to_string()), arb_text()],
            prop_oneof![any::<u64>().prop_map(|ms| rfc3339_utc(u128::from(ms % 8_000_000_000_000))), arb_text()],
        )
            .prop_map(|(event, name, dst, proto, port, count, reason, ts)| {
                let mut d = json!({"verdict": proto.clone(), "dst": dst, "proto": proto, "qtype": "A",
                                   "reason": reason, "count": count, "first": false});
                if let Some(n) = name {
                    d["name"] = json!(n);
                }
                if let Some(p) = port {
                    d["port"] = json!(p);
                }
                let mut r = AuditRecord::new(0, "c\n1", event, true, d);
                r.ts = ts;
                r
            })
    }

    proptest! {
        /// Whatever the log holds, the output is a valid profile whose entries are exactly
        /// the ones reported, none repeated and none under a live deny.
        #[test]
        fn output_always_parses_as_a_profile(records in proptest::collection::vec(arb_record(), 0..40)) {
            let denied = [Target::parse("198.51.100.0/28").unwrap(), Target::parse("*.x.example").unwrap()];
            let l = learn("c\u{1b}1", &records, &denied);
            let parsed = parse_profile("learned", &l.text).map_err(|e| TestCaseError::fail(format!("{e}\n{}", l.text)))?;
            prop_assert_eq!(&parsed.entries, &l.entries, "{}", l.text);
            let unique: BTreeSet<&Target> = l.entries.iter().collect();
            prop_assert_eq!(unique.len(), l.entries.len());
            for entry in &l.entries {
                match &entry.host {
                    Host::Net(n) => prop_assert!(!covers_addr(&denied[0], n.addr())),
                    Host::Domain(p) => prop_assert!(!p.name.as_str().ends_with(".x.example")),
                }
            }
            prop_assert!(!l.text.chars().any(|c| c.is_control() && c != '\n'));
        }
    }
}
