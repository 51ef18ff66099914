//! The lowering of a [`Ruleset`] to nf_tables objects: chains, sets with their elements and
//! rules of expressions, as nft 1.0.6 creates them.

use std::net::IpAddr;

use super::*;
use crate::core::ruleset::{Element, Key, Rule, Ruleset, SetKind, Stmt, Val, NFLOG_GROUP};

const META_IIFNAME: u32 = 6;
const META_OIFNAME: u32 = 7;
const META_MARK: u32 = 3;
const META_NFPROTO: u32 = 15;
const META_L4PROTO: u32 = 16;
const CT_STATE: u32 = 0;
const BASE_NETWORK: u32 = 1;
const BASE_TRANSPORT: u32 = 2;
const CMP_EQ: u32 = 0;
const CMP_NEQ: u32 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
const IFNAMSIZ: usize = 16;
const BYTEORDER_HTON: u32 = 1;
const REJECT_TCP_RST: u32 = 1;
const REJECT_ICMPX: u32 = 2;
const ICMPX_ADMIN_PROHIBITED: u8 = 3;
const LIMIT_PKTS: u32 = 0;
const LOG_LEVEL_WARNING: u32 = 4;

impl Lowered {
    /// Lower `rs`. Named set ids are 1.., anonymous ones follow.
    pub fn new(rs: &Ruleset) -> Result<Lowered, LowerError> {
        let mut sets: Vec<SetWithElems> = rs
            .sets
            .iter()
            .enumerate()
            .map(|(i, s)| SetWithElems {
                id: i as u32 + 1,
                set: named_set(s.name, s.kind, s.timeout),
                elems: elements(s.kind, &s.elements),
                learned: s.kind.is_learned(),
            })
            .collect();
        let mut chains = Vec::new();
        let mut rules = Vec::new();
        for chain in &rs.chains {
            chains.push(ChainObj {
                name: chain.name.to_string(),
                base: chain
                    .hook
                    .map(|h| -> Result<BaseChain, LowerError> {
                        Ok(BaseChain {
                            hooknum: match h.hook {
                                "input" => 1,
                                "output" => 3,
                                other => return Err(LowerError(format!("hook {other}"))),
                            },
                            priority: 0,
                            policy: match h.policy {
                                "drop" => 0,
                                "accept" => 1,
                                other => return Err(LowerError(format!("policy {other}"))),
                            },
                            kind: "filter".into(),
                        })
                    })
                    .transpose()?,
                flags: 0,
            });
            for rule in &chain.rules {
                let exprs = lower_rule(rule, &mut sets)?;
                rules.push(RuleObj {
                    chain: chain.name.to_string(),
                    exprs,
                });
            }
        }
        Ok(Lowered {
            chains,
            sets,
            rules,
        })
    }
}

fn named_set(name: &str, kind: SetKind, timeout: Option<u32>) -> SetObj {
    let (v4, svc) = match kind {
        SetKind::Addr4 | SetKind::Net4 | SetKind::Learned4 => (true, false),
        SetKind::Addr6 | SetKind::Net6 | SetKind::Learned6 => (false, false),
        SetKind::Svc4 | SetKind::LearnedSvc4 => (true, true),
        SetKind::Svc6 | SetKind::LearnedSvc6 => (false, true),
    };
    let addr_len = if v4 { 4 } else { 16 };
    let addr_type = if v4 { TYPE_IPV4_ADDR } else { TYPE_IPV6_ADDR };
    let interval = kind.flags().contains(&"interval");
    let mut flags = 0;
    if interval {
        flags |= SET_F_INTERVAL;
    }
    if kind.is_learned() {
        flags |= SET_F_TIMEOUT;
    }
    if svc && interval {
        flags |= SET_F_CONCAT;
    }
    SetObj {
        name: name.to_string(),
        flags,
        key_type: if svc {
            concat_type(&[addr_type, TYPE_INET_PROTO, TYPE_INET_SERVICE])
        } else {
            addr_type
        },
        key_len: if svc { addr_len + 8 } else { addr_len },
        fields: if svc && interval {
            vec![addr_len, 1, 2]
        } else {
            Vec::new()
        },
        size: None,
        timeout_ms: timeout.map(|t| u64::from(t) * 1000),
        userdata: if svc { udata::SVC } else { udata::ADDR }.to_vec(),
        unknown: Vec::new(),
    }
}

fn addr_bytes(a: IpAddr) -> ElemKey {
    match a {
        IpAddr::V4(a) => ElemKey::from_slice(&a.octets()),
        IpAddr::V6(a) => ElemKey::from_slice(&a.octets()),
    }
}

/// Key bytes of an address . protocol . port element: each field padded to 4 bytes.
fn svc_key(addr: IpAddr, proto: u8, port: u16) -> ElemKey {
    let mut k = addr_bytes(addr);
    k.extend_from_slice(&[proto, 0, 0, 0]);
    k.extend_from_slice(&port.to_be_bytes());
    k.extend_from_slice(&[0, 0]);
    k
}

/// The kernel elements of a named set, as nft sends them.
pub fn elements(kind: SetKind, elements: &[Element]) -> Vec<ElemObj> {
    let interval = kind.flags().contains(&"interval");
    match kind {
        SetKind::Svc4 | SetKind::Svc6 | SetKind::LearnedSvc4 | SetKind::LearnedSvc6 => elements
            .iter()
            .filter_map(|e| match e {
                Element::Svc(net, proto, port) => {
                    let p = proto.number();
                    let mut el = ElemObj::key(svc_key(net.network(), p, *port));
                    if interval {
                        el.key_end = Some(svc_key(net.broadcast(), p, *port));
                    }
                    Some(el)
                }
                _ => None,
            })
            .collect(),
        _ if interval => {
            let ranges: Vec<(IpAddr, IpAddr)> = elements
                .iter()
                .map(|e| match e {
                    Element::Addr(a) => (*a, *a),
                    Element::Net(n) | Element::Svc(n, ..) => (n.network(), n.broadcast()),
                })
                .collect();
            interval_elements(&ranges)
        }
        _ => elements
            .iter()
            .map(|e| match e {
                Element::Addr(a) => ElemObj::key(addr_bytes(*a)),
                Element::Net(n) | Element::Svc(n, ..) => ElemObj::key(addr_bytes(n.addr())),
            })
            .collect(),
    }
}

/// nft's encoding of ranges in an interval (rbtree) set: sorted starts, each followed by an
/// end marker at `end + 1` (none at the top of the address space; where the next range starts
/// right there, both the end marker and that start), and a leading end marker at zero when
/// nothing starts there.
pub(super) fn interval_elements(ranges: &[(IpAddr, IpAddr)]) -> Vec<ElemObj> {
    let mut sorted: Vec<(u128, u128, bool)> = ranges
        .iter()
        .map(|(a, b)| (ip_num(*a), ip_num(*b), a.is_ipv4()))
        .collect();
    sorted.sort_unstable();
    let Some(&(first, _, v4)) = sorted.first() else {
        return Vec::new();
    };
    let bytes = |n: u128| -> ElemKey {
        if v4 {
            ElemKey::from_slice(&(n as u32).to_be_bytes())
        } else {
            ElemKey::from_slice(&n.to_be_bytes())
        }
    };
    let max = if v4 { u128::from(u32::MAX) } else { u128::MAX };
    let end = |n: u128| ElemObj {
        flags: ELEM_F_INTERVAL_END,
        ..ElemObj::key(bytes(n))
    };
    let mut out = Vec::new();
    if first != 0 {
        out.push(end(0));
    }
    for &(a, b, _) in &sorted {
        out.push(ElemObj::key(bytes(a)));
        if b != max {
            out.push(end(b + 1));
        }
    }
    out
}

fn ip_num(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v) => u128::from(u32::from(v)),
        IpAddr::V6(v) => u128::from(v),
    }
}

/// Per-rule state of the dependencies nft adds, so that each is added once.
#[derive(Default)]
struct Deps {
    nfproto: Option<u8>,
    l4proto: Option<u8>,
}

fn meta(key: u32, dreg: u32) -> Expr {
    Expr::Meta { key, dreg }
}

fn cmp(op: u32, data: Vec<u8>) -> Expr {
    Expr::Cmp {
        sreg: REG_1,
        op,
        data,
    }
}

fn payload(dreg: u32, base: u32, offset: u32, len: u32) -> Expr {
    Expr::Payload {
        dreg,
        base,
        offset,
        len,
    }
}

impl Deps {
    fn nfproto(&mut self, out: &mut Vec<Expr>, family: u8) {
        if self.nfproto != Some(family) {
            out.push(meta(META_NFPROTO, REG_1));
            out.push(cmp(CMP_EQ, vec![family]));
            self.nfproto = Some(family);
        }
    }

    fn l4proto(&mut self, out: &mut Vec<Expr>, proto: u8) {
        if self.l4proto != Some(proto) {
            out.push(meta(META_L4PROTO, REG_1));
            out.push(cmp(CMP_EQ, vec![proto]));
            self.l4proto = Some(proto);
        }
    }
}

/// A payload field: header base, offset, length, and the dependency it needs.
struct Field {
    base: u32,
    offset: u32,
    len: u32,
    nfproto: Option<u8>,
    l4proto: Option<u8>,
}

fn payload_field(proto: &str, field: &str) -> Option<Field> {
    let f = |base, offset, len, nfproto, l4proto| Field {
        base,
        offset,
        len,
        nfproto,
        l4proto,
    };
    Some(match (proto, field) {
        ("ip", "daddr") => f(BASE_NETWORK, 16, 4, Some(NFPROTO_IPV4), None),
        ("ip6", "saddr") => f(BASE_NETWORK, 8, 16, Some(NFPROTO_IPV6), None),
        ("ip6", "daddr") => f(BASE_NETWORK, 24, 16, Some(NFPROTO_IPV6), None),
        ("th", "dport") => f(BASE_TRANSPORT, 2, 2, None, None),
        ("tcp", "dport") => f(BASE_TRANSPORT, 2, 2, None, Some(IPPROTO_TCP)),
        ("udp", "sport") => f(BASE_TRANSPORT, 0, 2, None, Some(IPPROTO_UDP)),
        ("udp", "dport") => f(BASE_TRANSPORT, 2, 2, None, Some(IPPROTO_UDP)),
        ("icmpv6", "type") => f(
            BASE_TRANSPORT,
            0,
            1,
            Some(NFPROTO_IPV6),
            Some(IPPROTO_ICMPV6),
        ),
        _ => return None,
    })
}

fn unsupported(stmt: &Stmt) -> LowerError {
    LowerError(format!("{stmt:?}"))
}

fn lower_rule(rule: &Rule, sets: &mut Vec<SetWithElems>) -> Result<Vec<Expr>, LowerError> {
    let mut out = Vec::new();
    let mut deps = Deps::default();
    let stmts = &rule.0;
    let mut i = 0;
    while i < stmts.len() {
        // nft merges adjacent equality matches on contiguous fields of one header into one
        // load and compare (`udp sport 53 udp dport 53`: 4 bytes at transport offset 0).
        if let (Some(Stmt::Match(Key::Payload(p1, f1), Val::Num(v1))), Some(next)) =
            (stmts.get(i), stmts.get(i + 1))
        {
            if let Stmt::Match(Key::Payload(p2, f2), Val::Num(v2)) = next {
                if let (Some(a), Some(b)) = (payload_field(p1, f1), payload_field(p2, f2)) {
                    if p1 == p2 && a.base == b.base && a.offset + a.len == b.offset {
                        add_deps(&mut out, &mut deps, &a);
                        out.push(payload(REG_1, a.base, a.offset, a.len + b.len));
                        let mut data =
                            num_bytes(*v1, a.len).ok_or_else(|| unsupported(&stmts[i]))?;
                        data.extend(num_bytes(*v2, b.len).ok_or_else(|| unsupported(next))?);
                        out.push(cmp(CMP_EQ, data));
                        i += 2;
                        continue;
                    }
                }
            }
        }
        let stmt = &stmts[i];
        match stmt {
            Stmt::Match(key, val) => lower_match(&mut out, &mut deps, sets, key, val, CMP_EQ)
                .ok_or_else(|| unsupported(stmt))?,
            Stmt::MatchNot(key, val) if !matches!(val, Val::Anon(_) | Val::SetRef(_)) => {
                lower_match(&mut out, &mut deps, sets, key, val, CMP_NEQ)
                    .ok_or_else(|| unsupported(stmt))?
            }
            Stmt::Accept => out.push(Expr::Immediate {
                dreg: REG_VERDICT,
                verdict: Verdict::Accept,
            }),
            Stmt::Drop => out.push(Expr::Immediate {
                dreg: REG_VERDICT,
                verdict: Verdict::Drop,
            }),
            Stmt::Jump(chain) => out.push(Expr::Immediate {
                dreg: REG_VERDICT,
                verdict: Verdict::Jump(chain.to_string()),
            }),
            Stmt::RejectTcpReset => {
                // `reject with tcp reset` needs `meta l4proto tcp`; our rules say it first.
                if deps.l4proto != Some(IPPROTO_TCP) {
                    return Err(unsupported(stmt));
                }
                out.push(Expr::Reject {
                    kind: REJECT_TCP_RST,
                    code: None,
                });
            }
            Stmt::RejectAdminProhibited => out.push(Expr::Reject {
                kind: REJECT_ICMPX,
                code: Some(ICMPX_ADMIN_PROHIBITED),
            }),
            Stmt::Log(prefix) => out.push(Expr::Log {
                prefix: prefix.to_string(),
                group: None,
                // nft sends no level; the kernel takes and dumps its default, warning.
                level: Some(LOG_LEVEL_WARNING),
                flags: None,
                snaplen: None,
                qthreshold: None,
            }),
            Stmt::NfLog(prefix) => out.push(Expr::Log {
                prefix: prefix.to_string(),
                group: Some(NFLOG_GROUP),
                level: None,
                flags: None,
                snaplen: None,
                qthreshold: None,
            }),
            Stmt::Limit { rate, burst } => out.push(Expr::Limit {
                rate: u64::from(*rate),
                unit: 1,
                burst: *burst,
                kind: LIMIT_PKTS,
                flags: 0,
            }),
            Stmt::MatchNot(..) => return Err(unsupported(stmt)),
        }
        i += 1;
    }
    Ok(out)
}

fn add_deps(out: &mut Vec<Expr>, deps: &mut Deps, field: &Field) {
    if let Some(family) = field.nfproto {
        deps.nfproto(out, family);
    }
    if let Some(proto) = field.l4proto {
        deps.l4proto(out, proto);
    }
}

fn num_bytes(n: u64, len: u32) -> Option<Vec<u8>> {
    match len {
        1 => Some(vec![u8::try_from(n).ok()?]),
        2 => Some(u16::try_from(n).ok()?.to_be_bytes().to_vec()),
        _ => None,
    }
}

/// Protocol and ICMPv6 type keywords our rules use.
fn symbol(s: &str) -> Option<u8> {
    Some(match s {
        "tcp" => IPPROTO_TCP,
        "udp" => IPPROTO_UDP,
        "mld-listener-query" => 130,
        "mld-listener-report" => 131,
        "mld-listener-done" => 132,
        "nd-router-solicit" => 133,
        "nd-router-advert" => 134,
        "nd-neighbor-solicit" => 135,
        "nd-neighbor-advert" => 136,
        "mld2-listener-report" => 143,
        _ => return None,
    })
}

fn ct_state_bit(s: &str) -> Option<u32> {
    Some(match s {
        "invalid" => 1,
        "established" => 2,
        "related" => 4,
        "new" => 8,
        "untracked" => 64,
        _ => return None,
    })
}

/// Lower one match. The shapes, and nothing else:
/// - `meta oifname|iifname "name"`; `meta mark N`; `meta l4proto tcp|udp|{ tcp, udp }`;
/// - `ct state a,b` (a bit test);
/// - `ip|ip6 daddr|saddr ADDR | @set | { networks }`, `th|tcp|udp dport|sport N | { N, ... }`,
///   `icmpv6 type { ... }`, each with the dependency nft adds;
/// - `ip|ip6 daddr . meta l4proto . th dport @set`.
fn lower_match(
    out: &mut Vec<Expr>,
    deps: &mut Deps,
    sets: &mut Vec<SetWithElems>,
    key: &Key,
    val: &Val,
    op: u32,
) -> Option<()> {
    match (key, val) {
        (Key::Meta(name @ ("oifname" | "iifname")), Val::Quoted(ifname)) => {
            if ifname.len() >= IFNAMSIZ {
                return None;
            }
            let key = if *name == "oifname" {
                META_OIFNAME
            } else {
                META_IIFNAME
            };
            out.push(meta(key, REG_1));
            let mut data = ifname.as_bytes().to_vec();
            data.resize(IFNAMSIZ, 0);
            out.push(cmp(op, data));
        }
        (Key::Meta("mark"), Val::Num(n)) => {
            out.push(meta(META_MARK, REG_1));
            out.push(cmp(op, u32::try_from(*n).ok()?.to_ne_bytes().to_vec()));
        }
        (Key::Meta("l4proto"), Val::Sym(s)) => {
            let proto = symbol(s)?;
            out.push(meta(META_L4PROTO, REG_1));
            out.push(cmp(op, vec![proto]));
            if op == CMP_EQ {
                deps.l4proto = Some(proto);
            }
        }
        (Key::Meta("l4proto"), Val::Anon(vals)) if op == CMP_EQ => {
            let keys = vals
                .iter()
                .map(|v| match v {
                    Val::Sym(s) => symbol(s).map(|p| vec![p]),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()?;
            out.push(meta(META_L4PROTO, REG_1));
            lookup_anon(out, sets, TYPE_INET_PROTO, 1, udata::L4PROTO, keys);
        }
        (Key::Ct("state"), Val::CtStates(states)) if op == CMP_EQ => {
            let mut mask = 0u32;
            for s in *states {
                mask |= ct_state_bit(s)?;
            }
            out.push(Expr::Ct {
                key: CT_STATE,
                dreg: REG_1,
            });
            out.push(Expr::Bitwise {
                sreg: REG_1,
                dreg: REG_1,
                len: 4,
                mask: mask.to_ne_bytes().to_vec(),
                xor: vec![0; 4],
            });
            out.push(cmp(CMP_NEQ, vec![0; 4]));
        }
        (Key::Payload(proto, field), val) => {
            let f = payload_field(proto, field)?;
            add_deps(out, deps, &f);
            out.push(payload(REG_1, f.base, f.offset, f.len));
            match val {
                Val::Addr(a) if f.len == addr_len(*a) => out.push(cmp(op, addr_bytes(*a).to_vec())),
                Val::Net(n)
                    if n.prefix_len() == n.max_prefix_len() && f.len == addr_len(n.addr()) =>
                {
                    out.push(cmp(op, addr_bytes(n.addr()).to_vec()))
                }
                Val::Num(n) if f.len == 2 => out.push(cmp(op, num_bytes(*n, 2)?)),
                Val::SetRef(name) if op == CMP_EQ => out.push(named_lookup(sets, name)?),
                Val::Anon(vals) if op == CMP_EQ => {
                    anon_payload_set(out, sets, proto, field, &f, vals)?
                }
                _ => return None,
            }
        }
        (Key::Concat(keys), Val::SetRef(name)) if op == CMP_EQ => {
            let [Key::Payload(ip @ ("ip" | "ip6"), "daddr"), Key::Meta("l4proto"), Key::Payload("th", "dport")] =
                keys
            else {
                return None;
            };
            let f = payload_field(ip, "daddr")?;
            add_deps(out, deps, &f);
            let set = sets.iter().find(|s| s.set.name == *name)?;
            let interval = set.set.flags & SET_F_INTERVAL != 0;
            // Registers as nft allocates them: the address from register 1, then 4-byte
            // registers after it.
            let (proto_reg, port_reg) = if *ip == "ip" {
                (REG32_01, REG32_02)
            } else {
                (REG_2, REG32_05)
            };
            out.push(payload(REG_1, f.base, f.offset, f.len));
            out.push(meta(META_L4PROTO, proto_reg));
            if interval {
                // Interval keys compare as big-endian fields.
                out.push(Expr::Byteorder {
                    sreg: proto_reg,
                    dreg: proto_reg,
                    op: BYTEORDER_HTON,
                    len: 1,
                    size: 2,
                });
            }
            out.push(payload(port_reg, BASE_TRANSPORT, 2, 2));
            out.push(named_lookup(sets, name)?);
        }
        _ => return None,
    }
    Some(())
}

fn addr_len(a: IpAddr) -> u32 {
    if a.is_ipv4() {
        4
    } else {
        16
    }
}

fn named_lookup(sets: &[SetWithElems], name: &str) -> Option<Expr> {
    let set = sets
        .iter()
        .find(|s| s.set.name == name && !s.set.is_anonymous())?;
    Some(Expr::Lookup {
        sreg: REG_1,
        set: name.to_string(),
        set_id: Some(set.id),
        flags: 0,
    })
}

/// The anonymous set of `proto field { ... }` (after its payload load).
fn anon_payload_set(
    out: &mut Vec<Expr>,
    sets: &mut Vec<SetWithElems>,
    proto: &str,
    field: &str,
    f: &Field,
    vals: &[Val],
) -> Option<()> {
    match (proto, field) {
        ("tcp" | "udp", "dport") => {
            let keys = vals
                .iter()
                .map(|v| match v {
                    Val::Num(n) => num_bytes(*n, 2),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()?;
            let ud = if proto == "tcp" {
                udata::TCP_DPORT
            } else {
                udata::UDP_DPORT
            };
            lookup_anon(out, sets, TYPE_INET_SERVICE, 2, ud, keys);
        }
        ("icmpv6", "type") => {
            let keys = vals
                .iter()
                .map(|v| match v {
                    Val::Sym(s) => symbol(s).map(|t| vec![t]),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()?;
            lookup_anon(out, sets, TYPE_ICMPV6_TYPE, 1, udata::ICMPV6_TYPE, keys);
        }
        ("ip" | "ip6", "daddr") => {
            let v4 = proto == "ip";
            let ranges = vals
                .iter()
                .map(|v| match v {
                    Val::Net(n) if n.addr().is_ipv4() == v4 => Some((n.network(), n.broadcast())),
                    Val::Addr(a) if a.is_ipv4() == v4 => Some((*a, *a)),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()?;
            let elems = interval_elements(&ranges);
            let (ktype, ud) = if v4 {
                (TYPE_IPV4_ADDR, udata::IP_DADDR_NETS)
            } else {
                (TYPE_IPV6_ADDR, udata::IP6_DADDR_NETS)
            };
            push_anon(out, sets, ktype, f.len, SET_F_INTERVAL, ud, elems);
        }
        _ => return None,
    }
    Some(())
}

fn lookup_anon(
    out: &mut Vec<Expr>,
    sets: &mut Vec<SetWithElems>,
    key_type: u32,
    key_len: u32,
    ud: &[u8],
    keys: Vec<Vec<u8>>,
) {
    let elems = keys.into_iter().map(|k| ElemObj::key(k.into())).collect();
    push_anon(out, sets, key_type, key_len, 0, ud, elems);
}

fn push_anon(
    out: &mut Vec<Expr>,
    sets: &mut Vec<SetWithElems>,
    key_type: u32,
    key_len: u32,
    extra_flags: u32,
    ud: &[u8],
    elems: Vec<ElemObj>,
) {
    let id = sets.iter().map(|s| s.id).max().unwrap_or(0) + 1;
    sets.push(SetWithElems {
        id,
        set: SetObj {
            name: ANON_SET_NAME.into(),
            flags: SET_F_ANONYMOUS | SET_F_CONSTANT | extra_flags,
            key_type,
            key_len,
            fields: Vec::new(),
            size: Some(elems.len() as u32),
            timeout_ms: None,
            userdata: ud.to_vec(),
            unknown: Vec::new(),
        },
        elems,
        learned: false,
    });
    out.push(Expr::Lookup {
        sreg: REG_1,
        set: ANON_SET_NAME.into(),
        set_id: Some(id),
        flags: 0,
    });
}
