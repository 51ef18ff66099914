//! Ruleset generation: the security boundary between policy and kernel.
//!
//! A [`Policy`] (typed addresses, networks, ports) becomes a small intermediate form
//! ([`Rule`]s of [`Stmt`]s whose every string is a `&'static str` chosen here), which renders
//! two ways: nft text to load, and the JSON nft prints back, so that verification compares
//! structure rather than searching text. No user-supplied string can reach the output: the
//! types below cannot hold one.
//!
//! Layout of the one table we own, `inet terok_shield`:
//! - `output` (hook, policy per mode) and `input` (hook, policy drop);
//! - verdict chains `allowed`, `denied`, `private`, `blocked`, `bypass`, each a rate-limited
//!   log with its `TEROK_SHIELD_*` prefix followed by the verdict, so every refusal is logged
//!   the same way and rejects are fast (TCP reset, ICMP admin-prohibited for the rest). The
//!   refusing chains and `bypass` first send every packet to NFLOG group [`NFLOG_GROUP`] with
//!   the same prefix: a rootless container's kernel log reaches no one, but the shield's event
//!   reader in the container's namespace reads NFLOG (and aggregates floods itself);
//! - named sets: literal allows (`allow_*`, no timeouts: they never expire), DNS-learned
//!   allows (`dns_*`, per-element timeouts), persistent denies (`deny_*`).

use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{json, Value};

use super::policy::{AllowRule, Mode, Policy};
use super::private::{private_v4, private_v6};
use super::target::Protocol;

/// Name of the one nft table the shield owns; nothing else is ever touched.
pub const TABLE: &str = "terok_shield";
/// Address family of our table (both IPv4 and IPv6 in one).
pub const FAMILY: &str = "inet";

/// Kernel log prefixes; stable, users grep for them.
pub mod prefix {
    pub const ALLOWED: &str = "TEROK_SHIELD_ALLOWED: ";
    pub const DENIED: &str = "TEROK_SHIELD_DENIED: ";
    pub const PRIVATE: &str = "TEROK_SHIELD_PRIVATE: ";
    pub const BYPASS: &str = "TEROK_SHIELD_BYPASS: ";
    pub const BLOCKED: &str = "TEROK_SHIELD_BLOCKED: ";
}

/// Log rate limit (per second, burst): a flooding workload must not flood the host's log.
const LOG_RATE: (u32, u32) = (10, 20);

/// NFLOG group of the refusal and bypass events (the Python original's number). Groups are
/// per network namespace, so every container has its own group 100.
pub const NFLOG_GROUP: u16 = 100;

/// ICMPv6 types the container must send for IPv6 to work (neighbour and router discovery, MLD).
const ICMPV6_OUT: &[&str] = &[
    "nd-router-solicit",
    "nd-neighbor-solicit",
    "nd-neighbor-advert",
    "mld-listener-report",
    "mld-listener-done",
    "mld2-listener-report",
];
/// ICMPv6 types the container must receive unsolicited (router adverts, neighbour discovery).
const ICMPV6_IN: &[&str] = &[
    "nd-router-advert",
    "nd-neighbor-solicit",
    "nd-neighbor-advert",
    "mld-listener-query",
];

/// The left-hand side of a match: what part of the packet or its metadata is tested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Meta(&'static str),
    Ct(&'static str),
    Payload(&'static str, &'static str),
    Concat(&'static [Key]),
}

const OIFNAME: Key = Key::Meta("oifname");
const IIFNAME: Key = Key::Meta("iifname");
const L4PROTO: Key = Key::Meta("l4proto");
const MARK: Key = Key::Meta("mark");
const CT_STATE: Key = Key::Ct("state");
const IP_DADDR: Key = Key::Payload("ip", "daddr");
const IP6_DADDR: Key = Key::Payload("ip6", "daddr");
const TH_DPORT: Key = Key::Payload("th", "dport");
const UDP_SPORT: Key = Key::Payload("udp", "sport");
const UDP_DPORT: Key = Key::Payload("udp", "dport");
const IP6_SADDR: Key = Key::Payload("ip6", "saddr");
const TCP_DPORT: Key = Key::Payload("tcp", "dport");
const ICMPV6_TYPE: Key = Key::Payload("icmpv6", "type");
const IP_SVC: Key = Key::Concat(&[IP_DADDR, L4PROTO, TH_DPORT]);
const IP6_SVC: Key = Key::Concat(&[IP6_DADDR, L4PROTO, TH_DPORT]);

/// The right-hand side of a match. Only typed values and constants of this module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Val {
    /// A keyword of nft's grammar (`tcp`, `nd-neighbor-solicit`), from this module only.
    Sym(&'static str),
    /// A quoted constant string (interface name).
    Quoted(&'static str),
    Num(u64),
    Addr(IpAddr),
    Net(IpNet),
    /// `{ a, b }`: an anonymous set (at least two members; nft folds single ones).
    Anon(Vec<Val>),
    /// `@name`: a named set of this table.
    SetRef(&'static str),
    /// Conntrack states (`established,related`).
    CtStates(&'static [&'static str]),
}

/// One statement of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stmt {
    Match(Key, Val),
    /// `key != value`.
    MatchNot(Key, Val),
    Accept,
    Drop,
    Jump(&'static str),
    RejectTcpReset,
    RejectAdminProhibited,
    /// Kernel log line (reaches the host's log only where `nf_log_all_netns=1`).
    Log(&'static str),
    /// NFLOG to [`NFLOG_GROUP`], unlimited: the event reader aggregates floods itself, so
    /// the first packet to a new destination is never lost to a rate limit.
    NfLog(&'static str),
    Limit {
        rate: u32,
        burst: u32,
    },
}

/// A rule: statements evaluated left to right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule(pub Vec<Stmt>);

/// Base-chain attributes: which hook, and what happens to packets no rule decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hook {
    pub hook: &'static str,
    pub policy: &'static str,
}

/// A chain of our table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: &'static str,
    pub hook: Option<Hook>,
    pub rules: Vec<Rule>,
}

/// What a named set holds, which fixes its nft type and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetKind {
    /// Single addresses (hash set: fast to load in bulk).
    Addr4,
    Addr6,
    /// Networks (interval set).
    Net4,
    Net6,
    /// Network . protocol . port (interval concatenation).
    Svc4,
    Svc6,
    /// Addresses learned from DNS, each with its own timeout.
    Learned4,
    Learned6,
    /// Address . protocol . port learned from DNS for port-scoped domains.
    LearnedSvc4,
    LearnedSvc6,
}

impl SetKind {
    /// nft's type names, as `nft -j` reports them.
    pub fn type_names(self) -> &'static [&'static str] {
        match self {
            SetKind::Addr4 | SetKind::Net4 | SetKind::Learned4 => &["ipv4_addr"],
            SetKind::Addr6 | SetKind::Net6 | SetKind::Learned6 => &["ipv6_addr"],
            SetKind::Svc4 | SetKind::LearnedSvc4 => &["ipv4_addr", "inet_proto", "inet_service"],
            SetKind::Svc6 | SetKind::LearnedSvc6 => &["ipv6_addr", "inet_proto", "inet_service"],
        }
    }

    /// nft set flags.
    pub fn flags(self) -> &'static [&'static str] {
        match self {
            SetKind::Addr4 | SetKind::Addr6 => &[],
            SetKind::Net4 | SetKind::Net6 | SetKind::Svc4 | SetKind::Svc6 => &["interval"],
            SetKind::Learned4 | SetKind::Learned6 | SetKind::LearnedSvc4 | SetKind::LearnedSvc6 => {
                &["timeout"]
            }
        }
    }

    /// Whether the set's contents change at run time (so verification cannot pin them).
    pub fn is_learned(self) -> bool {
        self.flags().contains(&"timeout")
    }

    /// Netlink cost of one element: interval elements take two kernel elements.
    fn weight(self) -> usize {
        if self.flags().contains(&"interval") {
            2
        } else {
            1
        }
    }
}

/// One element of a named set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Element {
    Addr(IpAddr),
    Net(IpNet),
    Svc(IpNet, Protocol, u16),
}

/// A named set with its initial contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetDef {
    pub name: &'static str,
    pub kind: SetKind,
    pub elements: Vec<Element>,
    /// Default element timeout in seconds (learned sets filled by a resolver that cannot give
    /// each element its own, i.e. dnsmasq); `None`: elements carry their own or none.
    pub timeout: Option<u32>,
}

/// The complete ruleset for one container, ready to render or to verify against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub sets: Vec<SetDef>,
    pub chains: Vec<Chain>,
}

/// Set names, shared with the live-update code and the resolver.
pub mod sets {
    pub const ALLOW_V4: &str = "allow_v4";
    pub const ALLOW_V6: &str = "allow_v6";
    pub const ALLOW_NET_V4: &str = "allow_net_v4";
    pub const ALLOW_NET_V6: &str = "allow_net_v6";
    pub const ALLOW_SVC_V4: &str = "allow_svc_v4";
    pub const ALLOW_SVC_V6: &str = "allow_svc_v6";
    pub const DNS_V4: &str = "dns_v4";
    pub const DNS_V6: &str = "dns_v6";
    pub const DNS_SVC_V4: &str = "dns_svc_v4";
    pub const DNS_SVC_V6: &str = "dns_svc_v6";
    pub const DENY_V4: &str = "deny_v4";
    pub const DENY_V6: &str = "deny_v6";
    /// dnsmasq tier only: answers for port-scoped names, which no rule reads.
    pub const SCOPED_NAMES_V4: &str = "scoped_names_v4";
    pub const SCOPED_NAMES_V6: &str = "scoped_names_v6";
}

/// Elements per nft transaction, in netlink-element units. A rootless user namespace refuses
/// one transaction of about 2,700 interval elements ("Message too long"); stay well below.
pub const TRANSACTION_BUDGET: usize = 2000;

fn rule(stmts: impl Into<Vec<Stmt>>) -> Rule {
    Rule(stmts.into())
}

fn m(key: Key, val: Val) -> Stmt {
    Stmt::Match(key, val)
}

/// A verdict chain: NFLOG event (`events`), rate-limited log line, then the verdict(s).
fn verdict_chain(name: &'static str, log: &'static str, accept: bool, events: bool) -> Chain {
    let mut rules = Vec::new();
    if events {
        rules.push(rule([Stmt::NfLog(log)]));
    }
    rules.push(rule([
        Stmt::Limit {
            rate: LOG_RATE.0,
            burst: LOG_RATE.1,
        },
        Stmt::Log(log),
    ]));
    if accept {
        rules.push(rule([Stmt::Accept]));
    } else {
        rules.push(rule([m(L4PROTO, Val::Sym("tcp")), Stmt::RejectTcpReset]));
        rules.push(rule([Stmt::RejectAdminProhibited]));
    }
    Chain {
        name,
        hook: None,
        rules,
    }
}

fn anon_or_single(mut vals: Vec<Val>) -> Val {
    if vals.len() == 1 {
        vals.pop().expect("one element")
    } else {
        Val::Anon(vals)
    }
}

/// Split allow rules into the six literal allow sets, merged so interval sets never overlap.
fn allow_sets(allow: &[AllowRule]) -> [Vec<Element>; 6] {
    let (mut a4, mut a6, mut n4, mut n6) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut svc: std::collections::BTreeMap<(bool, Protocol, u16), Vec<IpNet>> = Default::default();
    for r in allow {
        match r.scope {
            None => match r.net {
                IpNet::V4(n) if n.prefix_len() == 32 => a4.push(r.net.addr()),
                IpNet::V6(n) if n.prefix_len() == 128 => a6.push(r.net.addr()),
                IpNet::V4(_) => n4.push(r.net),
                IpNet::V6(_) => n6.push(r.net),
            },
            Some(scope) => {
                for &proto in scope.protocols() {
                    svc.entry((r.net.addr().is_ipv4(), proto, scope.port))
                        .or_default()
                        .push(r.net);
                }
            }
        }
    }
    let n4 = IpNet::aggregate(&n4);
    let n6 = IpNet::aggregate(&n6);
    // Single addresses already covered by a network add nothing. `aggregate` returns sorted,
    // disjoint networks, so a binary search finds the only candidate: O(log n) per address.
    let covered = |a: &IpAddr, nets: &[IpNet]| {
        let i = nets.partition_point(|n| n.network() <= *a);
        i > 0 && nets[i - 1].contains(a)
    };
    a4.sort_unstable();
    a4.dedup();
    a6.sort_unstable();
    a6.dedup();
    a4.retain(|a| !covered(a, &n4));
    a6.retain(|a| !covered(a, &n6));
    let (mut s4, mut s6) = (Vec::new(), Vec::new());
    for ((v4, proto, port), nets) in svc {
        let out = if v4 { &mut s4 } else { &mut s6 };
        out.extend(
            IpNet::aggregate(&nets)
                .into_iter()
                .map(|n| Element::Svc(n, proto, port)),
        );
    }
    [
        a4.into_iter().map(Element::Addr).collect(),
        a6.into_iter().map(Element::Addr).collect(),
        n4.into_iter().map(Element::Net).collect(),
        n6.into_iter().map(Element::Net).collect(),
        s4,
        s6,
    ]
}

impl Ruleset {
    /// Build the ruleset for `policy`. Linear in the number of entries (plus a sort).
    pub fn generate(policy: &Policy) -> Ruleset {
        let [a4, a6, n4, n6, s4, s6] = allow_sets(&policy.allow);
        let (d4, d6): (Vec<IpNet>, Vec<IpNet>) =
            policy.deny.iter().partition(|n| n.addr().is_ipv4());
        let set = |name, kind: SetKind, elements| SetDef {
            name,
            kind,
            elements,
            timeout: policy.learned_timeout.filter(|_| kind.is_learned()),
        };
        let mut sets = vec![
            set(sets::ALLOW_V4, SetKind::Addr4, a4),
            set(sets::ALLOW_V6, SetKind::Addr6, a6),
            set(sets::ALLOW_NET_V4, SetKind::Net4, n4),
            set(sets::ALLOW_NET_V6, SetKind::Net6, n6),
            set(sets::ALLOW_SVC_V4, SetKind::Svc4, s4),
            set(sets::ALLOW_SVC_V6, SetKind::Svc6, s6),
            set(sets::DNS_V4, SetKind::Learned4, vec![]),
            set(sets::DNS_V6, SetKind::Learned6, vec![]),
            set(sets::DNS_SVC_V4, SetKind::LearnedSvc4, vec![]),
            set(sets::DNS_SVC_V6, SetKind::LearnedSvc6, vec![]),
            set(
                sets::DENY_V4,
                SetKind::Net4,
                IpNet::aggregate(&d4)
                    .into_iter()
                    .map(Element::Net)
                    .collect(),
            ),
            set(
                sets::DENY_V6,
                SetKind::Net6,
                IpNet::aggregate(&d6)
                    .into_iter()
                    .map(Element::Net)
                    .collect(),
            ),
        ];
        if policy.resolver_port.is_some() {
            // dnsmasq tier: where dnsmasq puts the answers of port-scoped names. No rule reads
            // these sets (dnsmasq cannot add the port); they only keep such answers out of
            // the address-wide learned sets.
            sets.push(set(sets::SCOPED_NAMES_V4, SetKind::Learned4, vec![]));
            sets.push(set(sets::SCOPED_NAMES_V6, SetKind::Learned6, vec![]));
        }

        let mut chains = vec![
            Chain {
                name: "output",
                hook: Some(Hook {
                    hook: "output",
                    policy: if matches!(policy.mode, Mode::Bypass | Mode::BypassAll) {
                        "accept"
                    } else {
                        "drop"
                    },
                }),
                rules: output_rules(policy),
            },
            Chain {
                name: "input",
                hook: Some(Hook {
                    hook: "input",
                    policy: "drop",
                }),
                rules: input_rules(policy),
            },
        ];
        chains.push(verdict_chain("allowed", prefix::ALLOWED, true, false));
        chains.push(verdict_chain("denied", prefix::DENIED, false, true));
        chains.push(verdict_chain("private", prefix::PRIVATE, false, true));
        chains.push(verdict_chain("blocked", prefix::BLOCKED, false, true));
        chains.push(verdict_chain("bypass", prefix::BYPASS, true, true));
        Ruleset { sets, chains }
    }

    /// The whole ruleset as one nft script that atomically replaces our table.
    ///
    /// Suitable for `nft -c -f -` and for preview; large sets may exceed what one netlink
    /// transaction carries in a user namespace, so [`Ruleset::transactions`] is what applies.
    pub fn to_nft(&self) -> String {
        let mut out = String::new();
        let all: Vec<usize> = self.sets.iter().map(|s| s.elements.len()).collect();
        self.write_table(&mut out, &all, true);
        out
    }

    /// The ruleset as a series of nft scripts, each one transaction: the first replaces the
    /// table (policy in force from that instant, so there is no unprotected window) and may
    /// carry elements; the rest only add set elements; each stays within
    /// [`TRANSACTION_BUDGET`].
    pub fn transactions(&self) -> Vec<String> {
        self.transactions_with(true)
    }

    /// Like [`Ruleset::transactions`], but for a network namespace that has never had our
    /// table (a container being created). Deleting a table costs a kernel RCU grace period
    /// (~13 ms here), so this form only creates it. Should a table exist after all, the
    /// definitions merge into it and the exact verification that follows fails: still closed.
    pub fn transactions_fresh(&self) -> Vec<String> {
        self.transactions_with(false)
    }

    fn transactions_with(&self, replace: bool) -> Vec<String> {
        // Inline elements in the set declarations as far as the budget allows: `add element`
        // to a set of the same batch makes nft dump the kernel's ruleset first (~10 ms).
        let mut budget = TRANSACTION_BUDGET;
        let inline: Vec<usize> = self
            .sets
            .iter()
            .map(|set| {
                let n = set.elements.len().min(budget / set.kind.weight());
                budget -= n * set.kind.weight();
                n
            })
            .collect();
        let mut first = String::new();
        self.write_table(&mut first, &inline, replace);
        let mut txs = vec![first];
        let mut current = String::new();
        let mut used = 0;
        for (set, skip) in self.sets.iter().zip(&inline) {
            let weight = set.kind.weight();
            for chunk in set.elements[*skip..].chunks((TRANSACTION_BUDGET / weight).max(1)) {
                if used + chunk.len() * weight > TRANSACTION_BUDGET {
                    txs.push(std::mem::take(&mut current));
                    used = 0;
                }
                let _ = write!(current, "add element {FAMILY} {TABLE} {} {{ ", set.name);
                write_elements(&mut current, chunk);
                current.push_str(" }\n");
                used += chunk.len() * weight;
            }
        }
        if !current.is_empty() {
            txs.push(current);
        }
        txs
    }

    /// Transactions that turn the live `self` into `target` by rewriting only the sets whose
    /// contents differ (each: flush, then re-add), or `None` when the chains differ and the
    /// whole table must be replaced. Sets are rewritten rather than patched so that merged
    /// interval elements never conflict; each set's flush and first elements share one
    /// transaction, so no set is ever seen empty by a packet.
    pub fn update_to(&self, target: &Ruleset) -> Option<Vec<String>> {
        let changed = self.changed_sets(target)?;
        let mut txs = Vec::new();
        let mut current = String::new();
        let mut used = 0;
        for new in changed {
            let weight = new.kind.weight();
            let per_tx = (TRANSACTION_BUDGET / weight).max(1);
            if used + new.elements.len().min(per_tx) * weight > TRANSACTION_BUDGET
                && !current.is_empty()
            {
                txs.push(std::mem::take(&mut current));
                used = 0;
            }
            let _ = writeln!(current, "flush set {FAMILY} {TABLE} {}", new.name);
            for chunk in new.elements.chunks(per_tx) {
                if used + chunk.len() * weight > TRANSACTION_BUDGET {
                    txs.push(std::mem::take(&mut current));
                    used = 0;
                }
                let _ = write!(current, "add element {FAMILY} {TABLE} {} {{ ", new.name);
                write_elements(&mut current, chunk);
                current.push_str(" }\n");
                used += chunk.len() * weight;
            }
        }
        if !current.is_empty() {
            txs.push(current);
        }
        Some(txs)
    }

    /// The sets of `target` whose literal contents differ from `self`'s (the learned sets
    /// belong to the resolver and are never rewritten), or `None` when anything but literal
    /// set contents differs (chains, set names, kinds, timeouts): then only replacing the
    /// whole table turns `self` into `target`.
    pub fn changed_sets<'a>(&self, target: &'a Ruleset) -> Option<Vec<&'a SetDef>> {
        if self.chains != target.chains
            || self.sets.len() != target.sets.len()
            || self
                .sets
                .iter()
                .zip(&target.sets)
                .any(|(a, b)| a.name != b.name || a.kind != b.kind || a.timeout != b.timeout)
        {
            return None;
        }
        Some(
            self.sets
                .iter()
                .zip(&target.sets)
                .filter(|(old, new)| old.elements != new.elements && !new.kind.is_learned())
                .map(|(_, new)| new)
                .collect(),
        )
    }

    /// Total number of set elements (for reports).
    pub fn element_count(&self) -> usize {
        self.sets.iter().map(|s| s.elements.len()).sum()
    }

    /// Write the table, with the first `inline[i]` elements of set `i` in its declaration.
    fn write_table(&self, out: &mut String, inline: &[usize], replace: bool) {
        if replace {
            // Declaring then deleting makes the replacement work whether or not the table
            // exists, all inside one transaction.
            let _ = writeln!(out, "table {FAMILY} {TABLE} {{}}");
            let _ = writeln!(out, "delete table {FAMILY} {TABLE}");
        }
        let _ = writeln!(out, "table {FAMILY} {TABLE} {{");
        for (set, &count) in self.sets.iter().zip(inline) {
            let _ = write!(
                out,
                "\tset {} {{\n\t\ttype {};\n",
                set.name,
                set.kind.type_names().join(" . ")
            );
            if !set.kind.flags().is_empty() {
                let _ = writeln!(out, "\t\tflags {};", set.kind.flags().join(", "));
            }
            if let Some(t) = set.timeout {
                let _ = writeln!(out, "\t\ttimeout {t}s;");
            }
            if count > 0 {
                out.push_str("\t\telements = { ");
                write_elements(out, &set.elements[..count]);
                out.push_str(" }\n");
            }
            out.push_str("\t}\n");
        }
        for chain in &self.chains {
            let _ = writeln!(out, "\tchain {} {{", chain.name);
            if let Some(h) = chain.hook {
                let _ = writeln!(
                    out,
                    "\t\ttype filter hook {} priority filter; policy {};",
                    h.hook, h.policy
                );
            }
            for r in &chain.rules {
                out.push_str("\t\t");
                r.write_nft(out);
                out.push('\n');
            }
            out.push_str("\t}\n");
        }
        out.push_str("}\n");
    }
}

fn output_rules(policy: &Policy) -> Vec<Rule> {
    let mut rules = vec![rule([m(OIFNAME, Val::Quoted("lo")), Stmt::Accept])];
    if policy.mode == Mode::Block {
        rules.push(rule([Stmt::Jump("blocked")]));
        return rules;
    }
    rules.push(rule([
        m(CT_STATE, Val::CtStates(&["established", "related"])),
        Stmt::Accept,
    ]));
    rules.push(rule([
        m(
            ICMPV6_TYPE,
            Val::Anon(ICMPV6_OUT.iter().map(|t| Val::Sym(t)).collect()),
        ),
        Stmt::Accept,
    ]));
    // Persistent denies come before every accept below: they win over DNS, allows, bypass.
    rules.push(rule([
        m(IP_DADDR, Val::SetRef(sets::DENY_V4)),
        Stmt::Jump("denied"),
    ]));
    rules.push(rule([
        m(IP6_DADDR, Val::SetRef(sets::DENY_V6)),
        Stmt::Jump("denied"),
    ]));
    let dns_protos = || Val::Anon(vec![Val::Sym("tcp"), Val::Sym("udp")]);
    for server in &policy.dns_servers {
        let key = if server.is_ipv4() {
            IP_DADDR
        } else {
            IP6_DADDR
        };
        rules.push(rule([
            m(key, Val::Addr(*server)),
            m(L4PROTO, dns_protos()),
            m(TH_DPORT, Val::Num(53)),
            Stmt::Accept,
        ]));
    }
    if let Some(mark) = policy.resolver_mark {
        rules.push(rule([
            m(MARK, Val::Num(u64::from(mark))),
            m(L4PROTO, dns_protos()),
            m(TH_DPORT, Val::Num(53)),
            Stmt::Accept,
        ]));
    }
    if let Some(port) = policy.resolver_port {
        // dnsmasq holds this UDP port for its upstream queries from before the workload
        // starts, so no other socket of the container can send from it.
        rules.push(rule([
            m(UDP_SPORT, Val::Num(u64::from(port))),
            m(UDP_DPORT, Val::Num(53)),
            Stmt::Accept,
        ]));
    }
    if let Some(lb) = &policy.host_loopback {
        if !lb.ports.is_empty() {
            let mut ports: Vec<u16> = lb.ports.clone();
            ports.sort_unstable();
            ports.dedup();
            let key = if lb.gateway.is_ipv4() {
                IP_DADDR
            } else {
                IP6_DADDR
            };
            rules.push(rule([
                m(key, Val::Addr(lb.gateway)),
                m(
                    TCP_DPORT,
                    anon_or_single(ports.into_iter().map(|p| Val::Num(u64::from(p))).collect()),
                ),
                Stmt::Accept,
            ]));
        }
    }
    for (key, set) in [
        (IP_DADDR, sets::ALLOW_V4),
        (IP_DADDR, sets::ALLOW_NET_V4),
        (IP_SVC, sets::ALLOW_SVC_V4),
        (IP6_DADDR, sets::ALLOW_V6),
        (IP6_DADDR, sets::ALLOW_NET_V6),
        (IP6_SVC, sets::ALLOW_SVC_V6),
    ] {
        rules.push(rule([m(key, Val::SetRef(set)), Stmt::Jump("allowed")]));
    }
    if policy.mode.rejects_private() {
        let v4 = private_v4()
            .into_iter()
            .map(|n| Val::Net(n.into()))
            .collect();
        let v6 = private_v6()
            .into_iter()
            .map(|n| Val::Net(n.into()))
            .collect();
        rules.push(rule([m(IP_DADDR, Val::Anon(v4)), Stmt::Jump("private")]));
        rules.push(rule([m(IP6_DADDR, Val::Anon(v6)), Stmt::Jump("private")]));
    }
    // DNS-learned addresses come after the private ranges: a name that resolves to a private
    // address (DNS rebinding) reaches it only if that address is allowlisted literally.
    for (key, set) in [
        (IP_DADDR, sets::DNS_V4),
        (IP_SVC, sets::DNS_SVC_V4),
        (IP6_DADDR, sets::DNS_V6),
        (IP6_SVC, sets::DNS_SVC_V6),
    ] {
        rules.push(rule([m(key, Val::SetRef(set)), Stmt::Jump("allowed")]));
    }
    rules.push(rule([Stmt::Jump(match policy.mode {
        Mode::DenyAll => "denied",
        _ => "bypass",
    })]));
    rules
}

fn input_rules(policy: &Policy) -> Vec<Rule> {
    let mode = policy.mode;
    // A UDP DNS reply that arrives over loopback from a non-loopback IPv6 source was forged
    // inside the container: a workload socket bound with IPV6_FREEBIND (no privilege needed)
    // to the upstream's address and port 53, aiming at a resolver's upstream socket. The
    // kernel already refuses the IPv4 equivalent (see tests/firewall_packets.rs).
    let mut rules = vec![
        rule([
            m(IIFNAME, Val::Quoted("lo")),
            m(UDP_SPORT, Val::Num(53)),
            Stmt::MatchNot(IP6_SADDR, Val::Addr(std::net::Ipv6Addr::LOCALHOST.into())),
            Stmt::Drop,
        ]),
        rule([m(IIFNAME, Val::Quoted("lo")), Stmt::Accept]),
    ];
    if mode != Mode::Block {
        rules.push(rule([
            m(CT_STATE, Val::CtStates(&["established", "related"])),
            Stmt::Accept,
        ]));
        rules.push(rule([
            m(
                ICMPV6_TYPE,
                Val::Anon(ICMPV6_IN.iter().map(|t| Val::Sym(t)).collect()),
            ),
            Stmt::Accept,
        ]));
    }
    if mode != Mode::Block {
        // Published ports (`podman run -p`): new connections in, nothing else.
        for (proto, key) in [(Protocol::Tcp, TCP_DPORT), (Protocol::Udp, UDP_DPORT)] {
            let mut ports: Vec<u16> = policy
                .inbound
                .iter()
                .filter(|p| p.protocol == proto)
                .map(|p| p.port)
                .collect();
            ports.sort_unstable();
            ports.dedup();
            if !ports.is_empty() {
                rules.push(rule([
                    m(
                        key,
                        anon_or_single(ports.into_iter().map(|p| Val::Num(u64::from(p))).collect()),
                    ),
                    Stmt::Accept,
                ]));
            }
        }
    }
    rules
}

fn write_net(out: &mut String, net: &IpNet) {
    if net.prefix_len() == net.max_prefix_len() {
        let _ = write!(out, "{}", net.addr());
    } else {
        let _ = write!(out, "{net}");
    }
}

fn write_elements(out: &mut String, elements: &[Element]) {
    for (i, e) in elements.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        match e {
            Element::Addr(a) => {
                let _ = write!(out, "{a}");
            }
            Element::Net(n) => write_net(out, n),
            Element::Svc(n, proto, port) => {
                write_net(out, n);
                let _ = write!(out, " . {} . {port}", proto.keyword());
            }
        }
    }
}

impl Key {
    fn write_nft(&self, out: &mut String) {
        match self {
            Key::Meta(k) => {
                let _ = write!(out, "meta {k}");
            }
            Key::Ct(k) => {
                let _ = write!(out, "ct {k}");
            }
            Key::Payload(p, f) => {
                let _ = write!(out, "{p} {f}");
            }
            Key::Concat(keys) => {
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(" . ");
                    }
                    k.write_nft(out);
                }
            }
        }
    }

    /// The expression as `nft -j` prints it.
    pub fn to_json(&self) -> Value {
        match self {
            Key::Meta(k) => json!({"meta": {"key": k}}),
            Key::Ct(k) => json!({"ct": {"key": k}}),
            Key::Payload(p, f) => json!({"payload": {"protocol": p, "field": f}}),
            Key::Concat(keys) => {
                json!({"concat": keys.iter().map(Key::to_json).collect::<Vec<_>>()})
            }
        }
    }
}

impl Val {
    fn write_nft(&self, out: &mut String) {
        match self {
            Val::Sym(s) => out.push_str(s),
            Val::Quoted(s) => {
                let _ = write!(out, "\"{s}\"");
            }
            Val::Num(n) => {
                let _ = write!(out, "{n}");
            }
            Val::Addr(a) => {
                let _ = write!(out, "{a}");
            }
            Val::Net(n) => write_net(out, n),
            Val::Anon(vals) => {
                out.push_str("{ ");
                for (i, v) in vals.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    v.write_nft(out);
                }
                out.push_str(" }");
            }
            Val::SetRef(name) => {
                let _ = write!(out, "@{name}");
            }
            Val::CtStates(states) => out.push_str(&states.join(",")),
        }
    }

    /// The value as `nft -j` prints it.
    pub fn to_json(&self) -> Value {
        match self {
            Val::Sym(s) | Val::Quoted(s) => json!(s),
            Val::Num(n) => json!(n),
            Val::Addr(a) => json!(a.to_string()),
            Val::Net(n) => net_json(n),
            Val::Anon(vals) => json!({"set": vals.iter().map(Val::to_json).collect::<Vec<_>>()}),
            Val::SetRef(name) => json!(format!("@{name}")),
            Val::CtStates([one]) => json!(one),
            Val::CtStates(states) => json!(states),
        }
    }
}

/// A network as `nft -j` prints it: a bare address for a host, else a prefix object.
pub fn net_json(n: &IpNet) -> Value {
    if n.prefix_len() == n.max_prefix_len() {
        json!(n.addr().to_string())
    } else {
        json!({"prefix": {"addr": n.addr().to_string(), "len": n.prefix_len()}})
    }
}

impl Stmt {
    fn write_nft(&self, out: &mut String) {
        match self {
            Stmt::Match(k, v) => {
                k.write_nft(out);
                out.push(' ');
                v.write_nft(out);
            }
            Stmt::MatchNot(k, v) => {
                k.write_nft(out);
                out.push_str(" != ");
                v.write_nft(out);
            }
            Stmt::Accept => out.push_str("accept"),
            Stmt::Drop => out.push_str("drop"),
            Stmt::Jump(c) => {
                let _ = write!(out, "jump {c}");
            }
            Stmt::RejectTcpReset => out.push_str("reject with tcp reset"),
            Stmt::RejectAdminProhibited => out.push_str("reject with icmpx admin-prohibited"),
            Stmt::Log(p) => {
                let _ = write!(out, "log prefix \"{p}\"");
            }
            Stmt::NfLog(p) => {
                let _ = write!(out, "log prefix \"{p}\" group {NFLOG_GROUP}");
            }
            Stmt::Limit { rate, burst } => {
                let _ = write!(out, "limit rate {rate}/second burst {burst} packets");
            }
        }
    }

    /// The statement as `nft -j` prints it.
    pub fn to_json(&self) -> Value {
        match self {
            Stmt::Match(k, v) => {
                let op = if matches!(k, Key::Ct(_)) { "in" } else { "==" };
                json!({"match": {"op": op, "left": k.to_json(), "right": v.to_json()}})
            }
            Stmt::MatchNot(k, v) => {
                json!({"match": {"op": "!=", "left": k.to_json(), "right": v.to_json()}})
            }
            Stmt::Accept => json!({"accept": null}),
            Stmt::Drop => json!({"drop": null}),
            Stmt::Jump(c) => json!({"jump": {"target": c}}),
            Stmt::RejectTcpReset => json!({"reject": {"type": "tcp reset"}}),
            Stmt::RejectAdminProhibited => {
                json!({"reject": {"type": "icmpx", "expr": "admin-prohibited"}})
            }
            Stmt::Log(p) => json!({"log": {"prefix": p}}),
            Stmt::NfLog(p) => json!({"log": {"prefix": p, "group": NFLOG_GROUP}}),
            Stmt::Limit { rate, burst } => {
                json!({"limit": {"rate": rate, "burst": burst, "per": "second"}})
            }
        }
    }
}

impl Rule {
    fn write_nft(&self, out: &mut String) {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            s.write_nft(out);
        }
    }

    /// The rule's expression list as `nft -j` prints it.
    pub fn to_json(&self) -> Value {
        Value::Array(self.0.iter().map(Stmt::to_json).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::policy::HostLoopback;
    use crate::core::target::PortScope;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn sample_policy(mode: Mode) -> Policy {
        let mut p = Policy::new(mode);
        p.allow = vec![
            AllowRule {
                net: net("198.51.100.10/32"),
                scope: None,
            },
            AllowRule {
                net: net("198.18.0.0/24"),
                scope: None,
            },
            AllowRule {
                net: net("198.18.1.0/24"),
                scope: None,
            },
            AllowRule {
                net: net("198.18.0.7/32"),
                scope: None,
            },
            AllowRule {
                net: net("2001:db8::10/128"),
                scope: None,
            },
            AllowRule {
                net: net("198.51.100.22/32"),
                scope: Some(PortScope {
                    port: 22,
                    protocol: Some(Protocol::Tcp),
                }),
            },
            AllowRule {
                net: net("2001:db8::/48"),
                scope: Some(PortScope {
                    port: 443,
                    protocol: None,
                }),
            },
        ];
        p.deny = vec![net("198.18.0.9/32")];
        p.dns_servers = vec!["198.51.100.53".parse().unwrap()];
        p.host_loopback = Some(HostLoopback {
            gateway: "198.51.100.1".parse().unwrap(),
            ports: vec![9090, 8080],
        });
        p
    }

    #[test]
    fn snapshot_every_mode() {
        for mode in [Mode::DenyAll, Mode::Bypass, Mode::BypassAll, Mode::Block] {
            let text = Ruleset::generate(&sample_policy(mode)).to_nft();
            insta::assert_snapshot!(format!("ruleset_{}", mode.status_name()), text);
        }
    }

    #[test]
    fn merges_networks_and_drops_covered_addresses() {
        let rs = Ruleset::generate(&sample_policy(Mode::DenyAll));
        let get = |name| &rs.sets.iter().find(|s| s.name == name).unwrap().elements;
        assert_eq!(
            get(sets::ALLOW_NET_V4),
            &vec![Element::Net(net("198.18.0.0/23"))]
        );
        assert_eq!(
            get(sets::ALLOW_V4),
            &vec![Element::Addr("198.51.100.10".parse().unwrap())]
        );
        assert_eq!(
            get(sets::ALLOW_SVC_V6).len(),
            2,
            "443 without protocol opens tcp and udp"
        );
    }

    #[test]
    fn updates_touch_only_changed_sets_and_refuse_chain_changes() {
        let old = Ruleset::generate(&sample_policy(Mode::DenyAll));
        let mut p = sample_policy(Mode::DenyAll);
        p.allow.push(AllowRule {
            net: net("198.51.100.99/32"),
            scope: None,
        });
        let txs = old.update_to(&Ruleset::generate(&p)).unwrap();
        assert_eq!(txs.len(), 1);
        assert!(
            txs[0].starts_with("flush set inet terok_shield allow_v4\n"),
            "{}",
            txs[0]
        );
        assert!(txs[0].contains("198.51.100.99") && !txs[0].contains("allow_net_v4"));
        assert_eq!(old.update_to(&old).unwrap(), Vec::<String>::new());
        assert!(old
            .update_to(&Ruleset::generate(&sample_policy(Mode::Bypass)))
            .is_none());
    }

    #[test]
    fn transactions_respect_budget_and_cover_everything() {
        let mut p = Policy::new(Mode::DenyAll);
        for i in 0..10_000u32 {
            let a = std::net::Ipv4Addr::from(0xC612_0000 + i);
            p.allow.push(AllowRule {
                net: IpNet::from(IpAddr::V4(a)),
                scope: None,
            });
        }
        for i in 0..3000u32 {
            let a = std::net::Ipv4Addr::from(0xC633_6400u32.wrapping_add(i << 8));
            p.allow.push(AllowRule {
                net: ipnet::Ipv4Net::new(a, 24).unwrap().trunc().into(),
                scope: None,
            });
        }
        let rs = Ruleset::generate(&p);
        let txs = rs.transactions();
        assert!(txs[0].contains("policy drop"));
        assert!(txs[1..].iter().all(|t| !t.contains("policy")));
        let mut seen = 0;
        for tx in &txs {
            let mut cost = 0;
            let mut set_name = "";
            for line in tx.lines() {
                if let Some(rest) = line.trim().strip_prefix("set ") {
                    set_name = rest.split(' ').next().unwrap();
                }
                let (n, name) =
                    if let Some(rest) = line.strip_prefix("add element inet terok_shield ") {
                        (
                            line.matches(", ").count() + 1,
                            rest.split(' ').next().unwrap(),
                        )
                    } else if line.trim().starts_with("elements = {") {
                        (line.matches(", ").count() + 1, set_name)
                    } else {
                        continue;
                    };
                let interval =
                    name.contains("_net_") || name.contains("_svc_") || name.contains("deny_");
                cost += n * if interval { 2 } else { 1 };
                seen += n;
            }
            assert!(cost <= TRANSACTION_BUDGET, "{cost}");
        }
        assert_eq!(seen, rs.element_count());
    }
}
