//! Our table as nf_tables netlink objects: the lowering of [`Ruleset`] to what `nft` itself
//! sends (so the hook needs neither libnftables nor nft), their encoding into netlink
//! messages, and the decoding of the kernel's dumps back into the same structures, which
//! verification then compares with the lowering.
//!
//! Everything here is pure. The lowering accepts only the rule shapes the ruleset generator
//! produces (listed in [`lower_match`]); anything else is a [`LowerError`], never a guess.
//! The expressions, registers, dependencies (`meta nfproto` before `ip daddr`, `meta l4proto`
//! before `tcp dport`), payload merging and set user data are those of nft 1.0.6, checked
//! byte for byte against nft's own kernel state in the tests (`tests/netlink_equality.rs`).
//!
//! The kernel's dump is input: decoding is bounds-checked, and an attribute we do not know in
//! an object we own is kept as [`Expr::Other`] or a set's `unknown` list, so that verification
//! reports it instead of ignoring it.

use std::net::IpAddr;

use thiserror::Error;

use super::ruleset::{Element, Key, Rule, Ruleset, SetKind, Stmt, Val, NFLOG_GROUP, TABLE};

// ---------------------------------------------------------------------------------------
// Constants of linux/netlink.h, linux/netfilter/nfnetlink.h and linux/netfilter/nf_tables.h.

pub const NLMSG_HDRLEN: usize = 16;
pub const NFGENMSG_LEN: usize = 4;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP_INTR: u16 = 0x10;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub const NFPROTO_UNSPEC: u8 = 0;
pub const NFPROTO_INET: u8 = 1;

/// nf_tables message types (`NFT_MSG_*`).
pub mod msg {
    pub const NEWTABLE: u16 = 0;
    pub const GETTABLE: u16 = 1;
    pub const DELTABLE: u16 = 2;
    pub const NEWCHAIN: u16 = 3;
    pub const GETCHAIN: u16 = 4;
    pub const NEWRULE: u16 = 6;
    pub const GETRULE: u16 = 7;
    pub const NEWSET: u16 = 9;
    pub const GETSET: u16 = 10;
    pub const NEWSETELEM: u16 = 12;
    pub const GETSETELEM: u16 = 13;
    pub const DELSETELEM: u16 = 14;
}

/// The full netlink message type of an nf_tables message.
pub fn nft_type(kind: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | kind
}

const TABLE_NAME: u16 = 1;
const TABLE_FLAGS: u16 = 2;
const TABLE_USE: u16 = 3;
const TABLE_HANDLE: u16 = 4;
const TABLE_PAD: u16 = 5;
const CHAIN_TABLE: u16 = 1;
const CHAIN_HANDLE: u16 = 2;
const CHAIN_NAME: u16 = 3;
const CHAIN_HOOK: u16 = 4;
const CHAIN_POLICY: u16 = 5;
const CHAIN_USE: u16 = 6;
const CHAIN_TYPE: u16 = 7;
const CHAIN_COUNTERS: u16 = 8;
const CHAIN_PAD: u16 = 9;
const CHAIN_FLAGS: u16 = 10;
const HOOK_HOOKNUM: u16 = 1;
const HOOK_PRIORITY: u16 = 2;
const RULE_TABLE: u16 = 1;
const RULE_CHAIN: u16 = 2;
const RULE_HANDLE: u16 = 3;
/// The handle of the rule before (kernel-assigned, dumped).
const RULE_POSITION: u16 = 6;
const RULE_EXPRESSIONS: u16 = 4;
const RULE_PAD: u16 = 9;
const LIST_ELEM: u16 = 1;
const EXPR_NAME: u16 = 1;
const EXPR_DATA: u16 = 2;
const SET_TABLE: u16 = 1;
const SET_NAME: u16 = 2;
const SET_FLAGS: u16 = 3;
const SET_KEY_TYPE: u16 = 4;
const SET_KEY_LEN: u16 = 5;
const SET_DESC: u16 = 9;
const SET_ID: u16 = 10;
const SET_TIMEOUT: u16 = 11;
const SET_GC_INTERVAL: u16 = 12;
const SET_USERDATA: u16 = 13;
const SET_PAD: u16 = 14;
const SET_HANDLE: u16 = 16;
/// The backend the kernel chose (hash, rbtree, pipapo...) and its element count (6.x).
const SET_TYPE: u16 = 19;
const SET_COUNT: u16 = 20;
const SET_DESC_SIZE: u16 = 1;
const SET_DESC_CONCAT: u16 = 2;
const SET_FIELD_LEN: u16 = 1;
const ELEM_LIST_TABLE: u16 = 1;
const ELEM_LIST_SET: u16 = 2;
const ELEM_LIST_ELEMENTS: u16 = 3;
const ELEM_LIST_SET_ID: u16 = 4;
const ELEM_KEY: u16 = 1;
const ELEM_FLAGS: u16 = 3;
const ELEM_TIMEOUT: u16 = 4;
const ELEM_EXPIRATION: u16 = 5;
const ELEM_PAD: u16 = 8;
const ELEM_KEY_END: u16 = 10;
const DATA_VALUE: u16 = 1;
const DATA_VERDICT: u16 = 2;
const VERDICT_CODE: u16 = 1;
const VERDICT_CHAIN: u16 = 2;

/// `NFT_SET_*` flags.
pub const SET_F_ANONYMOUS: u32 = 0x1;
pub const SET_F_CONSTANT: u32 = 0x2;
pub const SET_F_INTERVAL: u32 = 0x4;
pub const SET_F_TIMEOUT: u32 = 0x10;
pub const SET_F_CONCAT: u32 = 0x80;
/// `NFT_SET_ELEM_INTERVAL_END`.
pub const ELEM_F_INTERVAL_END: u32 = 0x1;

/// `NFT_REG_*`: the verdict register, the first 16-byte register, and 4-byte registers.
pub const REG_VERDICT: u32 = 0;
pub const REG_1: u32 = 1;
const REG_2: u32 = 2;
const REG32_01: u32 = 9;
const REG32_02: u32 = 10;
const REG32_05: u32 = 13;

/// nft's data type numbers (`enum datatypes` of nftables), which the kernel only stores.
const TYPE_IPV4_ADDR: u32 = 7;
const TYPE_IPV6_ADDR: u32 = 8;
const TYPE_INET_PROTO: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_ICMPV6_TYPE: u32 = 29;
/// nft's number for a concatenation: each type shifted in by 6 bits.
const fn concat_type(types: &[u32]) -> u32 {
    let mut t = 0;
    let mut i = 0;
    while i < types.len() {
        t = (t << 6) | types[i];
        i += 1;
    }
    t
}

/// Set user data exactly as nft 1.0.6 writes it (TLVs of libnftnl's `NFTNL_UDATA_SET_*`:
/// key byte order, "merge elements", the `typeof` expression), so that `nft list` prints our
/// sets as it prints its own. Opaque to the kernel, which stores and dumps it as is.
mod udata {
    /// `type ipv4_addr` / `ipv6_addr`: key byte order big endian.
    pub const ADDR: &[u8] = &[0x00, 0x04, 0x02, 0x00, 0x00, 0x00];
    /// `type ipvN_addr . inet_proto . inet_service`.
    pub const SVC: &[u8] = &[
        0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x03, 0x08, 0x00, 0x04, 0x0d, 0x00, 0x00, 0x00, 0x01,
        0x00,
    ];
    /// Anonymous `{ tcp, udp }` of `meta l4proto`.
    pub const L4PROTO: &[u8] = &[
        0x00, 0x04, 0x01, 0x00, 0x00, 0x00, 0x03, 0x0e, 0x00, 0x04, 0x09, 0x00, 0x00, 0x00, 0x01,
        0x06, 0x00, 0x04, 0x10, 0x00, 0x00, 0x00,
    ];
    /// Anonymous ports of `tcp dport`.
    pub const TCP_DPORT: &[u8] = &[
        0x00, 0x04, 0x02, 0x00, 0x00, 0x00, 0x03, 0x14, 0x00, 0x04, 0x07, 0x00, 0x00, 0x00, 0x01,
        0x0c, 0x00, 0x04, 0x08, 0x00, 0x00, 0x00, 0x01, 0x04, 0x02, 0x00, 0x00, 0x00,
    ];
    /// Anonymous ports of `udp dport`.
    pub const UDP_DPORT: &[u8] = &[
        0x00, 0x04, 0x02, 0x00, 0x00, 0x00, 0x03, 0x14, 0x00, 0x04, 0x07, 0x00, 0x00, 0x00, 0x01,
        0x0c, 0x00, 0x04, 0x06, 0x00, 0x00, 0x00, 0x01, 0x04, 0x02, 0x00, 0x00, 0x00,
    ];
    /// Anonymous types of `icmpv6 type`.
    pub const ICMPV6_TYPE: &[u8] = &[
        0x00, 0x04, 0x02, 0x00, 0x00, 0x00, 0x03, 0x14, 0x00, 0x04, 0x07, 0x00, 0x00, 0x00, 0x01,
        0x0c, 0x00, 0x04, 0x0e, 0x00, 0x00, 0x00, 0x01, 0x04, 0x01, 0x00, 0x00, 0x00,
    ];
    /// Anonymous networks of `ip daddr` (interval, merged).
    pub const IP_DADDR_NETS: &[u8] = &[
        0x00, 0x04, 0x02, 0x00, 0x00, 0x00, 0x02, 0x04, 0x01, 0x00, 0x00, 0x00, 0x03, 0x14, 0x00,
        0x04, 0x07, 0x00, 0x00, 0x00, 0x01, 0x0c, 0x00, 0x04, 0x0c, 0x00, 0x00, 0x00, 0x01, 0x04,
        0x0c, 0x00, 0x00, 0x00,
    ];
    /// Anonymous networks of `ip6 daddr` (interval, merged).
    pub const IP6_DADDR_NETS: &[u8] = &[
        0x00, 0x04, 0x02, 0x00, 0x00, 0x00, 0x02, 0x04, 0x01, 0x00, 0x00, 0x00, 0x03, 0x14, 0x00,
        0x04, 0x07, 0x00, 0x00, 0x00, 0x01, 0x0c, 0x00, 0x04, 0x0d, 0x00, 0x00, 0x00, 0x01, 0x04,
        0x09, 0x00, 0x00, 0x00,
    ];
}

// ---------------------------------------------------------------------------------------
// The objects.

/// A base chain's attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseChain {
    pub hooknum: u32,
    pub priority: i32,
    /// `NF_DROP` (0) or `NF_ACCEPT` (1).
    pub policy: u32,
    pub kind: String,
}

/// A chain of our table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainObj {
    pub name: String,
    pub base: Option<BaseChain>,
    /// Chain flags other than what a base chain implies (we set none).
    pub flags: u32,
}

/// A set's definition (named, or the anonymous set of one rule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetObj {
    pub name: String,
    pub flags: u32,
    pub key_type: u32,
    pub key_len: u32,
    /// Field lengths of a concatenation (`NFTA_SET_DESC_CONCAT`).
    pub fields: Vec<u32>,
    /// Element count hint (`NFTA_SET_DESC_SIZE`), which nft gives anonymous sets.
    pub size: Option<u32>,
    /// Default element timeout in milliseconds.
    pub timeout_ms: Option<u64>,
    pub userdata: Vec<u8>,
    /// Attribute types the decoder did not expect (never produced by the lowering).
    pub unknown: Vec<u16>,
}

impl SetObj {
    pub fn is_anonymous(&self) -> bool {
        self.flags & SET_F_ANONYMOUS != 0
    }
}

/// The bytes of a set element's key (or key end). Every key of our sets fits inline (the
/// longest, IPv6 address . protocol . port, is 24 bytes), so decoding a dump of 100,000s of
/// elements allocates nothing per element; a longer key (another table's set may use up to
/// the kernel's 64 bytes, and hostile input anything an attribute can hold) spills to the
/// heap whole, so nothing is refused or cut. Compares, orders, hashes and prints as its bytes.
pub type ElemKey = smallvec::SmallVec<[u8; ELEM_KEY_INLINE]>;

/// The longest [`ElemKey`] held without an allocation.
pub const ELEM_KEY_INLINE: usize = 24;

/// One kernel set element: interval sets store a start and an end marker per range
/// (rbtree), or a start with `key_end` (concatenations, pipapo).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ElemObj {
    pub key: ElemKey,
    pub key_end: Option<ElemKey>,
    pub flags: u32,
    /// Per-element timeout in milliseconds (learned elements only).
    pub timeout_ms: Option<u64>,
    /// Attribute types the decoder did not expect.
    pub unknown: Vec<u16>,
}

impl ElemObj {
    fn key(key: ElemKey) -> ElemObj {
        ElemObj {
            key,
            key_end: None,
            flags: 0,
            timeout_ms: None,
            unknown: Vec::new(),
        }
    }
}

/// A verdict of an `immediate` expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    Jump(String),
    /// Any other code (we never produce one).
    Other(i32),
}

/// One nf_tables expression, with the attributes the kernel keeps (and dumps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    Meta {
        key: u32,
        dreg: u32,
    },
    Ct {
        key: u32,
        dreg: u32,
    },
    Payload {
        dreg: u32,
        base: u32,
        offset: u32,
        len: u32,
    },
    Cmp {
        sreg: u32,
        op: u32,
        data: Vec<u8>,
    },
    Bitwise {
        sreg: u32,
        dreg: u32,
        len: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    Byteorder {
        sreg: u32,
        dreg: u32,
        op: u32,
        len: u32,
        size: u32,
    },
    /// A set lookup; `set_id` ties a set created in the same batch (not dumped).
    Lookup {
        sreg: u32,
        set: String,
        set_id: Option<u32>,
        flags: u32,
    },
    Immediate {
        dreg: u32,
        verdict: Verdict,
    },
    Limit {
        rate: u64,
        unit: u64,
        burst: u32,
        kind: u32,
        flags: u32,
    },
    /// `log`: to the kernel log (no group) or to NFLOG `group`.
    Log {
        prefix: String,
        group: Option<u16>,
        level: Option<u32>,
        flags: Option<u32>,
        snaplen: Option<u32>,
        qthreshold: Option<u16>,
    },
    /// `code` only for ICMP rejects (the kernel neither needs nor dumps it for a TCP reset).
    Reject {
        kind: u32,
        code: Option<u8>,
    },
    /// An expression we never generate, or one with attributes we do not know, kept for the
    /// report: its name and its raw data.
    Other {
        name: String,
        data: Vec<u8>,
    },
}

/// A rule: its chain and expressions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleObj {
    pub chain: String,
    pub exprs: Vec<Expr>,
}

/// A set with its elements; `id` ties it to the lookups of the same batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetWithElems {
    pub id: u32,
    pub set: SetObj,
    pub elems: Vec<ElemObj>,
    /// Whether the elements are learned at run time (not pinned by verification).
    pub learned: bool,
}

/// The lowering of one [`Ruleset`]: what nft would create, in nft's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lowered {
    pub chains: Vec<ChainObj>,
    /// Named sets, then the anonymous sets in the order their rules come.
    pub sets: Vec<SetWithElems>,
    /// Rules in chain order; each anonymous set precedes the first rule that uses it.
    pub rules: Vec<RuleObj>,
}

/// A rule shape the lowering does not know (a generator change not mirrored here).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("cannot express `{0}` as nf_tables netlink: the netlink lowering (src/core/nft_netlink.rs) does not know this rule shape; load through nft instead (TEROK_SHIELD_NFT) and report it")]
pub struct LowerError(pub String);

// ---------------------------------------------------------------------------------------
// Lowering.

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
fn interval_elements(ranges: &[(IpAddr, IpAddr)]) -> Vec<ElemObj> {
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

/// The name an anonymous set is created with; the kernel turns `%d` into a number.
pub const ANON_SET_NAME: &str = "__set%d";

// ---------------------------------------------------------------------------------------
// Encoding.

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Netlink attribute writer over a byte buffer.
pub struct Writer<'a>(pub &'a mut Vec<u8>);

impl Writer<'_> {
    pub fn bytes(&mut self, kind: u16, payload: &[u8]) {
        let out = &mut *self.0;
        let start = out.len();
        out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(start + align4(out.len() - start), 0);
    }

    pub fn str(&mut self, kind: u16, s: &str) {
        let mut b = Vec::with_capacity(s.len() + 1);
        b.extend_from_slice(s.as_bytes());
        b.push(0);
        self.bytes(kind, &b);
    }

    pub fn be32(&mut self, kind: u16, v: u32) {
        self.bytes(kind, &v.to_be_bytes());
    }

    pub fn be64(&mut self, kind: u16, v: u64) {
        self.bytes(kind, &v.to_be_bytes());
    }

    /// A nested attribute whose contents `f` writes.
    pub fn nest(&mut self, kind: u16, f: impl FnOnce(&mut Writer)) {
        let start = self.0.len();
        self.0.extend_from_slice(&[0, 0]);
        self.0
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        f(&mut Writer(self.0));
        let len = (self.0.len() - start) as u16;
        self.0[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

/// Append one netlink message (header, `nfgenmsg`, attributes written by `f`).
pub fn message(
    out: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    f: impl FnOnce(&mut Writer),
) {
    let start = out.len();
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.push(family);
    out.push(0);
    out.extend_from_slice(&res_id.to_be_bytes());
    f(&mut Writer(out));
    let len = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

const NEW: u16 = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK;

fn write_data_value(w: &mut Writer, kind: u16, value: &[u8]) {
    w.nest(kind, |w| w.bytes(DATA_VALUE, value));
}

impl Expr {
    fn name(&self) -> &str {
        match self {
            Expr::Meta { .. } => "meta",
            Expr::Ct { .. } => "ct",
            Expr::Payload { .. } => "payload",
            Expr::Cmp { .. } => "cmp",
            Expr::Bitwise { .. } => "bitwise",
            Expr::Byteorder { .. } => "byteorder",
            Expr::Lookup { .. } => "lookup",
            Expr::Immediate { .. } => "immediate",
            Expr::Limit { .. } => "limit",
            Expr::Log { .. } => "log",
            Expr::Reject { .. } => "reject",
            Expr::Other { name, .. } => name,
        }
    }

    /// The expression's `NFTA_EXPR_DATA` attributes.
    fn write(&self, w: &mut Writer) {
        match self {
            Expr::Meta { key, dreg } | Expr::Ct { key, dreg } => {
                w.be32(2, *key);
                w.be32(1, *dreg);
            }
            Expr::Payload {
                dreg,
                base,
                offset,
                len,
            } => {
                w.be32(1, *dreg);
                w.be32(2, *base);
                w.be32(3, *offset);
                w.be32(4, *len);
            }
            Expr::Cmp { sreg, op, data } => {
                w.be32(1, *sreg);
                w.be32(2, *op);
                write_data_value(w, 3, data);
            }
            Expr::Bitwise {
                sreg,
                dreg,
                len,
                mask,
                xor,
            } => {
                w.be32(1, *sreg);
                w.be32(2, *dreg);
                w.be32(3, *len);
                write_data_value(w, 4, mask);
                write_data_value(w, 5, xor);
            }
            Expr::Byteorder {
                sreg,
                dreg,
                op,
                len,
                size,
            } => {
                w.be32(1, *sreg);
                w.be32(2, *dreg);
                w.be32(3, *op);
                w.be32(4, *len);
                w.be32(5, *size);
            }
            Expr::Lookup {
                sreg,
                set,
                set_id,
                flags,
            } => {
                w.be32(2, *sreg);
                w.str(1, set);
                if let Some(id) = set_id {
                    w.be32(4, *id);
                }
                if *flags != 0 {
                    w.be32(5, *flags);
                }
            }
            Expr::Immediate { dreg, verdict } => {
                w.be32(1, *dreg);
                w.nest(2, |w| {
                    w.nest(DATA_VERDICT, |w| {
                        let code = match verdict {
                            Verdict::Accept => 1,
                            Verdict::Drop => 0,
                            Verdict::Jump(_) => -3,
                            Verdict::Other(c) => *c,
                        };
                        w.be32(VERDICT_CODE, code as u32);
                        if let Verdict::Jump(chain) = verdict {
                            w.str(VERDICT_CHAIN, chain);
                        }
                    })
                });
            }
            Expr::Limit {
                rate,
                unit,
                burst,
                kind,
                flags,
            } => {
                w.be64(1, *rate);
                w.be64(2, *unit);
                w.be32(3, *burst);
                w.be32(4, *kind);
                w.be32(5, *flags);
            }
            Expr::Log {
                prefix,
                group,
                level,
                flags,
                snaplen,
                qthreshold,
            } => {
                w.str(2, prefix);
                if let Some(g) = group {
                    w.bytes(1, &g.to_be_bytes());
                }
                if let Some(s) = snaplen {
                    w.be32(3, *s);
                }
                if let Some(q) = qthreshold {
                    w.bytes(4, &q.to_be_bytes());
                }
                if let Some(l) = level {
                    w.be32(5, *l);
                }
                if let Some(f) = flags {
                    w.be32(6, *f);
                }
            }
            Expr::Reject { kind, code } => {
                w.be32(1, *kind);
                if let Some(code) = code {
                    w.bytes(2, &[*code]);
                }
            }
            Expr::Other { data, .. } => w.0.extend_from_slice(data),
        }
    }
}

/// `NEWTABLE` of our table.
pub fn new_table(out: &mut Vec<u8>, seq: u32) {
    message(
        out,
        nft_type(msg::NEWTABLE),
        NEW,
        seq,
        NFPROTO_INET,
        0,
        |w| {
            w.str(TABLE_NAME, TABLE);
            w.be32(TABLE_FLAGS, 0);
        },
    );
}

/// `DELTABLE` of our table.
pub fn del_table(out: &mut Vec<u8>, seq: u32) {
    message(
        out,
        nft_type(msg::DELTABLE),
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NFPROTO_INET,
        0,
        |w| w.str(TABLE_NAME, TABLE),
    );
}

fn new_chain(out: &mut Vec<u8>, seq: u32, chain: &ChainObj) {
    message(
        out,
        nft_type(msg::NEWCHAIN),
        NEW,
        seq,
        NFPROTO_INET,
        0,
        |w| {
            w.str(CHAIN_TABLE, TABLE);
            w.str(CHAIN_NAME, &chain.name);
            if let Some(b) = &chain.base {
                w.str(CHAIN_TYPE, &b.kind);
                w.be32(CHAIN_POLICY, b.policy);
                w.nest(CHAIN_HOOK, |w| {
                    w.be32(HOOK_HOOKNUM, b.hooknum);
                    w.be32(HOOK_PRIORITY, b.priority as u32);
                });
            }
            if chain.flags != 0 {
                w.be32(CHAIN_FLAGS, chain.flags);
            }
        },
    );
}

fn new_set(out: &mut Vec<u8>, seq: u32, s: &SetWithElems) {
    let set = &s.set;
    message(out, nft_type(msg::NEWSET), NEW, seq, NFPROTO_INET, 0, |w| {
        w.str(SET_TABLE, TABLE);
        w.str(SET_NAME, &set.name);
        w.be32(SET_FLAGS, set.flags);
        w.be32(SET_KEY_TYPE, set.key_type);
        w.be32(SET_KEY_LEN, set.key_len);
        w.be32(SET_ID, s.id);
        if let Some(t) = set.timeout_ms {
            w.be64(SET_TIMEOUT, t);
        }
        if set.size.is_some() || !set.fields.is_empty() {
            w.nest(SET_DESC, |w| {
                if let Some(size) = set.size {
                    w.be32(SET_DESC_SIZE, size);
                }
                if !set.fields.is_empty() {
                    w.nest(SET_DESC_CONCAT, |w| {
                        for len in &set.fields {
                            w.nest(LIST_ELEM, |w| w.be32(SET_FIELD_LEN, *len));
                        }
                    });
                }
            });
        }
        w.bytes(SET_USERDATA, &set.userdata);
    });
}

fn write_elem(w: &mut Writer, e: &ElemObj) {
    w.nest(LIST_ELEM, |w| {
        if let Some(t) = e.timeout_ms {
            w.be64(ELEM_TIMEOUT, t);
        }
        if e.flags != 0 {
            w.be32(ELEM_FLAGS, e.flags);
        }
        write_data_value(w, ELEM_KEY, &e.key);
        if let Some(end) = &e.key_end {
            write_data_value(w, ELEM_KEY_END, end);
        }
    });
}

/// Encoded size of one element in a `NEWSETELEM`.
fn elem_size(e: &ElemObj) -> usize {
    4 + e.timeout_ms.map_or(0, |_| 12)
        + if e.flags != 0 { 8 } else { 0 }
        + 8
        + align4(e.key.len())
        + e.key_end.as_ref().map_or(0, |k| 8 + align4(k.len()))
}

fn new_setelem(out: &mut Vec<u8>, seq: u32, s: &SetWithElems, elems: &[ElemObj]) {
    message(
        out,
        nft_type(msg::NEWSETELEM),
        NEW,
        seq,
        NFPROTO_INET,
        0,
        |w| {
            w.str(ELEM_LIST_TABLE, TABLE);
            w.str(ELEM_LIST_SET, &s.set.name);
            w.be32(ELEM_LIST_SET_ID, s.id);
            w.nest(ELEM_LIST_ELEMENTS, |w| {
                for e in elems {
                    write_elem(w, e);
                }
            });
        },
    );
}

fn new_rule(out: &mut Vec<u8>, seq: u32, rule: &RuleObj) {
    message(
        out,
        nft_type(msg::NEWRULE),
        NEW | NLM_F_APPEND,
        seq,
        NFPROTO_INET,
        0,
        |w| {
            w.str(RULE_TABLE, TABLE);
            w.str(RULE_CHAIN, &rule.chain);
            w.nest(RULE_EXPRESSIONS, |w| {
                for e in &rule.exprs {
                    w.nest(LIST_ELEM, |w| {
                        w.str(EXPR_NAME, e.name());
                        w.nest(EXPR_DATA, |w| e.write(w));
                    });
                }
            });
        },
    );
}

/// Bytes of set elements per `NEWSETELEM` message: the nested element list's length is a
/// u16, so it must stay well under 64 KiB.
pub const MAX_ELEMENT_BYTES: usize = 32 * 1024;
/// Bytes per batch (one `send`): a rootless user namespace refuses sends above the default
/// socket buffer (~208 KiB); stay far below.
pub const MAX_BATCH_BYTES: usize = 96 * 1024;

/// One batch ready to send: its bytes, and the sequence numbers of the messages in it that
/// the kernel will acknowledge (`BATCH_BEGIN`+1 ..= `BATCH_END`-1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub bytes: Vec<u8>,
    pub first_seq: u32,
    pub messages: u32,
}

struct BatchBuilder {
    batches: Vec<Batch>,
    current: Vec<u8>,
    begin: u32,
    seq: u32,
}

impl BatchBuilder {
    fn new(first_seq: u32) -> BatchBuilder {
        let mut b = BatchBuilder {
            batches: Vec::new(),
            current: Vec::new(),
            begin: first_seq,
            seq: first_seq,
        };
        b.open();
        b
    }

    fn open(&mut self) {
        self.begin = self.seq;
        message(
            &mut self.current,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            self.seq,
            NFPROTO_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
            |_| {},
        );
        self.seq = self.seq.wrapping_add(1);
    }

    fn next_seq(&mut self) -> u32 {
        let s = self.seq;
        self.seq = self.seq.wrapping_add(1);
        s
    }

    fn close(&mut self) {
        let messages = self.seq.wrapping_sub(self.begin).wrapping_sub(1);
        let end = self.next_seq();
        message(
            &mut self.current,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            end,
            NFPROTO_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
            |_| {},
        );
        self.batches.push(Batch {
            bytes: std::mem::take(&mut self.current),
            first_seq: self.begin.wrapping_add(1),
            messages,
        });
    }

    fn has_messages(&self) -> bool {
        self.seq.wrapping_sub(self.begin) > 1
    }

    /// Start a new batch if `extra` more bytes would not fit.
    fn room_for(&mut self, extra: usize) {
        if self.has_messages() && self.current.len() + extra > MAX_BATCH_BYTES {
            self.close();
            self.open();
        }
    }

    fn finish(mut self) -> Vec<Batch> {
        if self.has_messages() || self.batches.is_empty() {
            self.close();
        }
        self.batches
    }
}

/// Where [`add_elements`] may put a set's elements.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// All in the current batch (an anonymous set: part of the table's one transaction).
    Current,
    /// In the current batch while it has room; returns how many went in.
    WhileRoom,
    /// In as many batches as needed.
    Split,
}

/// Add a set's elements from `from` on as `NEWSETELEM` messages of at most
/// [`MAX_ELEMENT_BYTES`] each; returns the index of the first element not added.
fn add_elements(b: &mut BatchBuilder, s: &SetWithElems, from: usize, place: Placement) -> usize {
    let mut i = from;
    while i < s.elems.len() {
        let (j, msg_len) = chunk_end(s, i);
        match place {
            Placement::Current => {}
            Placement::WhileRoom if b.current.len() + msg_len > MAX_BATCH_BYTES => return i,
            Placement::WhileRoom => {}
            Placement::Split => b.room_for(msg_len),
        }
        let seq = b.next_seq();
        new_setelem(&mut b.current, seq, s, &s.elems[i..j]);
        i = j;
    }
    i
}

/// The end of the `NEWSETELEM` message that carries `s`'s elements from `from` on, and
/// that message's size (bounded: at most [`MAX_ELEMENT_BYTES`] of elements).
fn chunk_end(s: &SetWithElems, from: usize) -> (usize, usize) {
    let mut bytes = 0;
    let mut j = from;
    while j < s.elems.len() && bytes + elem_size(&s.elems[j]) <= MAX_ELEMENT_BYTES {
        bytes += elem_size(&s.elems[j]);
        j += 1;
    }
    (j, bytes + 128)
}

/// `DELSETELEM` naming no element: the kernel empties the set (nft's `flush set`).
fn flush_set(out: &mut Vec<u8>, seq: u32, s: &SetWithElems) {
    message(
        out,
        nft_type(msg::DELSETELEM),
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NFPROTO_INET,
        0,
        |w| {
            w.str(ELEM_LIST_TABLE, TABLE);
            w.str(ELEM_LIST_SET, &s.set.name);
        },
    );
}

impl Lowered {
    /// The batches that bring the named sets `names` of a live table from `old`'s contents
    /// to this lowering's (a live allow or deny: the chains and set definitions are the same,
    /// see `Ruleset::changed_sets`), numbered from `first_seq`.
    ///
    /// A set whose old elements are all still wanted only gets the new ones: no element is
    /// deleted, which matters because the kernel's release of deleted elements costs
    /// milliseconds (measured: closing the socket after a deletion, 2-14 ms, with nft too),
    /// and adding only ever widens a set towards its target. Any other set is flushed and
    /// gets its first elements in the same batch, so no packet ever sees it empty (a deny
    /// set emptied for a moment would let a denied host through); a very large set continues
    /// in further batches, which only add.
    pub fn set_update_batches(&self, old: &Lowered, names: &[&str], first_seq: u32) -> Vec<Batch> {
        let mut b = BatchBuilder::new(first_seq);
        let sets = self
            .sets
            .iter()
            .filter(|s| !s.set.is_anonymous() && names.contains(&s.set.name.as_str()));
        for set in sets {
            let had: std::collections::BTreeSet<&ElemObj> = old
                .sets
                .iter()
                .find(|o| !o.set.is_anonymous() && o.set.name == set.set.name)
                .map(|o| o.elems.iter().collect())
                .unwrap_or_default();
            let wanted: std::collections::BTreeSet<&ElemObj> = set.elems.iter().collect();
            if had.is_subset(&wanted) {
                let added = SetWithElems {
                    id: set.id,
                    set: set.set.clone(),
                    elems: set
                        .elems
                        .iter()
                        .filter(|e| !had.contains(e))
                        .cloned()
                        .collect(),
                    learned: set.learned,
                };
                add_elements(&mut b, &added, 0, Placement::Split);
                continue;
            }
            let (first_end, first_len) = chunk_end(set, 0);
            b.room_for(128 + first_len);
            let seq = b.next_seq();
            flush_set(&mut b.current, seq, set);
            if first_end > 0 {
                let seq = b.next_seq();
                new_setelem(&mut b.current, seq, set, &set.elems[..first_end]);
            }
            add_elements(&mut b, set, first_end, Placement::Split);
        }
        b.finish()
    }

    /// The batches that create our table, numbered from `first_seq`. The first creates the
    /// whole table (with `replace`, after deleting any previous one, as nft's `table t {}`,
    /// `delete table t`, `table t {...}` does), with as many elements as fit; the rest only
    /// add elements, the deny sets' first (so that no allow is ever live before the denies
    /// that take precedence over it).
    pub fn batches(&self, replace: bool, first_seq: u32) -> Vec<Batch> {
        let mut b = BatchBuilder::new(first_seq);
        if replace {
            let s = b.next_seq();
            new_table(&mut b.current, s);
            let s = b.next_seq();
            del_table(&mut b.current, s);
        }
        let s = b.next_seq();
        new_table(&mut b.current, s);
        for chain in &self.chains {
            let s = b.next_seq();
            new_chain(&mut b.current, s, chain);
        }
        let named = self.sets.iter().filter(|s| !s.set.is_anonymous());
        for set in named.clone() {
            let s = b.next_seq();
            new_set(&mut b.current, s, set);
        }
        // Anonymous sets and rules, each set right before its first rule (as nft does).
        let mut anon = self.sets.iter().filter(|s| s.set.is_anonymous()).peekable();
        for rule in &self.rules {
            for e in &rule.exprs {
                if let Expr::Lookup {
                    set_id: Some(id), ..
                } = e
                {
                    if let Some(s) = anon.next_if(|s| s.id == *id) {
                        let seq = b.next_seq();
                        new_set(&mut b.current, seq, s);
                        add_elements(&mut b, s, 0, Placement::Current);
                    }
                }
            }
            let s = b.next_seq();
            new_rule(&mut b.current, s, rule);
        }
        // Elements of named sets: denies first, inline while the first batch has room.
        let mut order: Vec<&SetWithElems> = named.collect();
        order.sort_by_key(|s| !s.set.name.starts_with("deny_"));
        let mut inline = true;
        for set in order {
            let mut from = 0;
            if inline {
                from = add_elements(&mut b, set, 0, Placement::WhileRoom);
                inline = from == set.elems.len();
            }
            add_elements(&mut b, set, from, Placement::Split);
        }
        b.finish()
    }
}

// ---------------------------------------------------------------------------------------
// Decoding.

/// A malformed message or attribute in the kernel's answer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("malformed nf_tables netlink data: {0}")]
pub struct DecodeError(pub String);

fn bad(what: impl Into<String>) -> DecodeError {
    DecodeError(what.into())
}

/// One attribute: its type (flags stripped) and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr<'a> {
    pub kind: u16,
    pub data: &'a [u8],
}

/// The attributes of `data`, bounds-checked.
pub fn attrs(data: &[u8]) -> Result<Vec<Attr<'_>>, DecodeError> {
    Ok(attr_iter(data)?.collect())
}

/// The attributes of `data` without collecting them: all of `data` is bounds-checked before
/// the first is yielded, so a malformed attribute anywhere is the same error as [`attrs`]
/// gives, whatever the caller would have made of the attributes before it.
pub fn attr_iter(data: &[u8]) -> Result<Attrs<'_>, DecodeError> {
    let mut rest = data;
    while !rest.is_empty() {
        rest = split_attr(rest)?.1;
    }
    Ok(Attrs { rest: data })
}

/// The first attribute of `data` (not empty) and the bytes after it (and its padding).
fn split_attr(data: &[u8]) -> Result<(Attr<'_>, &[u8]), DecodeError> {
    let Some(&[l0, l1, k0, k1]) = data.first_chunk::<4>() else {
        return Err(bad("truncated attribute header"));
    };
    let len = u16::from_ne_bytes([l0, l1]) as usize;
    let kind = u16::from_ne_bytes([k0, k1]) & NLA_TYPE_MASK;
    let Some(payload) = data.get(4..len).filter(|_| len >= 4) else {
        return Err(bad(format!(
            "attribute {kind} of length {len} overruns its message"
        )));
    };
    let rest = data.get(align4(len)..).unwrap_or_default();
    Ok((
        Attr {
            kind,
            data: payload,
        },
        rest,
    ))
}

/// Iterator over attributes that [`attr_iter`] has checked.
#[derive(Debug, Clone)]
pub struct Attrs<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Attr<'a>;

    fn next(&mut self) -> Option<Attr<'a>> {
        if self.rest.is_empty() {
            return None;
        }
        // Checked in `attr_iter`; should it fail anyway, the iteration ends (no panic).
        let (a, rest) = split_attr(self.rest).ok()?;
        self.rest = rest;
        Some(a)
    }
}

impl<'a> Attr<'a> {
    pub fn be32(&self) -> Result<u32, DecodeError> {
        let b: [u8; 4] = self
            .data
            .try_into()
            .map_err(|_| bad(format!("attribute {} is not 4 bytes", self.kind)))?;
        Ok(u32::from_be_bytes(b))
    }

    pub fn be64(&self) -> Result<u64, DecodeError> {
        let b: [u8; 8] = self
            .data
            .try_into()
            .map_err(|_| bad(format!("attribute {} is not 8 bytes", self.kind)))?;
        Ok(u64::from_be_bytes(b))
    }

    pub fn be16(&self) -> Result<u16, DecodeError> {
        let b: [u8; 2] = self
            .data
            .try_into()
            .map_err(|_| bad(format!("attribute {} is not 2 bytes", self.kind)))?;
        Ok(u16::from_be_bytes(b))
    }

    /// A NUL-terminated string attribute.
    pub fn string(&self) -> Result<String, DecodeError> {
        let s = self.data.split(|b| *b == 0).next().unwrap_or_default();
        String::from_utf8(s.to_vec())
            .map_err(|_| bad(format!("attribute {} is not UTF-8", self.kind)))
    }

    pub fn nested(&self) -> Result<Vec<Attr<'a>>, DecodeError> {
        attrs(self.data)
    }

    /// The value of a nested `NFTA_DATA_VALUE`.
    fn data_value(&self) -> Result<&'a [u8], DecodeError> {
        if let Ok((a, rest)) = split_attr(self.data) {
            if a.kind == DATA_VALUE && rest.is_empty() {
                return Ok(a.data);
            }
        }
        attr_iter(self.data)?; // a malformed attribute is reported as such
        Err(bad(format!("attribute {} is not a data value", self.kind)))
    }
}

/// A netlink message: header fields and its attributes after the `nfgenmsg`.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    /// The whole message (header included).
    pub raw: &'a [u8],
    /// The attributes' bytes (after `nfgenmsg`).
    pub body: &'a [u8],
}

/// Split a datagram into messages, bounds-checked.
pub fn messages(mut data: &[u8]) -> Result<Vec<Message<'_>>, DecodeError> {
    let mut out = Vec::new();
    while data.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(bad(format!(
                "message of length {len} in {} bytes",
                data.len()
            )));
        }
        let msg = &data[..len];
        let kind = u16::from_ne_bytes([msg[4], msg[5]]);
        let flags = u16::from_ne_bytes([msg[6], msg[7]]);
        let seq = u32::from_ne_bytes([msg[8], msg[9], msg[10], msg[11]]);
        let body = msg.get(NLMSG_HDRLEN + NFGENMSG_LEN..).unwrap_or_default();
        out.push(Message {
            kind,
            flags,
            seq,
            raw: msg,
            body,
        });
        data = &data[align4(len).min(data.len())..];
    }
    Ok(out)
}

/// Table name and flags of a `NEWTABLE` dump message.
pub fn decode_table(body: &[u8]) -> Result<(String, u32), DecodeError> {
    let (mut name, mut flags) = (None, 0);
    for a in attrs(body)? {
        match a.kind {
            TABLE_NAME => name = Some(a.string()?),
            TABLE_FLAGS => flags = a.be32()?,
            TABLE_USE | TABLE_HANDLE | TABLE_PAD => {}
            _ => {}
        }
    }
    Ok((name.ok_or_else(|| bad("table without a name"))?, flags))
}

/// Table name of a chain, rule or set message (to keep only ours).
pub fn table_of(body: &[u8]) -> Result<Option<String>, DecodeError> {
    for a in attrs(body)? {
        if a.kind == 1 {
            return Ok(Some(a.string()?));
        }
    }
    Ok(None)
}

pub fn decode_chain(body: &[u8]) -> Result<ChainObj, DecodeError> {
    let mut name = None;
    let (mut hook, mut policy, mut kind, mut flags) = (None, None, None, 0);
    for a in attrs(body)? {
        match a.kind {
            CHAIN_NAME => name = Some(a.string()?),
            CHAIN_HOOK => {
                let (mut num, mut prio) = (None, None);
                for h in a.nested()? {
                    match h.kind {
                        HOOK_HOOKNUM => num = Some(h.be32()?),
                        HOOK_PRIORITY => prio = Some(h.be32()? as i32),
                        _ => {}
                    }
                }
                hook = Some((
                    num.ok_or_else(|| bad("hook without a number"))?,
                    prio.ok_or_else(|| bad("hook without a priority"))?,
                ));
            }
            CHAIN_POLICY => policy = Some(a.be32()?),
            CHAIN_TYPE => kind = Some(a.string()?),
            CHAIN_FLAGS => flags = a.be32()?,
            CHAIN_TABLE | CHAIN_HANDLE | CHAIN_USE | CHAIN_COUNTERS | CHAIN_PAD => {}
            _ => {}
        }
    }
    const NFT_CHAIN_BASE: u32 = 1;
    let base = match hook {
        Some((hooknum, priority)) => Some(BaseChain {
            hooknum,
            priority,
            policy: policy.ok_or_else(|| bad("base chain without a policy"))?,
            kind: kind.unwrap_or_default(),
        }),
        None => None,
    };
    Ok(ChainObj {
        name: name.ok_or_else(|| bad("chain without a name"))?,
        flags: if base.is_some() {
            flags & !NFT_CHAIN_BASE
        } else {
            flags
        },
        base,
    })
}

pub fn decode_rule(body: &[u8]) -> Result<RuleObj, DecodeError> {
    let mut chain = None;
    let mut exprs = Vec::new();
    for a in attrs(body)? {
        match a.kind {
            RULE_CHAIN => chain = Some(a.string()?),
            RULE_EXPRESSIONS => {
                for e in a.nested()? {
                    exprs.push(decode_expr(e.data)?);
                }
            }
            RULE_TABLE | RULE_HANDLE | RULE_POSITION | RULE_PAD => {}
            other => exprs.push(Expr::Other {
                name: format!("rule attribute {other}"),
                data: a.data.to_vec(),
            }),
        }
    }
    Ok(RuleObj {
        chain: chain.ok_or_else(|| bad("rule without a chain"))?,
        exprs,
    })
}

fn decode_expr(data: &[u8]) -> Result<Expr, DecodeError> {
    let (mut name, mut body) = (None, &[][..]);
    for a in attrs(data)? {
        match a.kind {
            EXPR_NAME => name = Some(a.string()?),
            EXPR_DATA => body = a.data,
            _ => {}
        }
    }
    let name = name.ok_or_else(|| bad("expression without a name"))?;
    let other = || Expr::Other {
        name: name.clone(),
        data: body.to_vec(),
    };
    let parsed = decode_expr_body(&name, body)?;
    Ok(parsed.unwrap_or_else(other))
}

/// `None` when the expression is not one we know, or has attributes we do not know.
fn decode_expr_body(name: &str, body: &[u8]) -> Result<Option<Expr>, DecodeError> {
    let a = attrs(body)?;
    let mut u32s = [None::<u32>; 8];
    let mut raw: [Option<&[u8]>; 8] = [None; 8];
    for at in &a {
        let i = at.kind as usize;
        if i >= u32s.len() || raw[i].is_some() {
            return Ok(None);
        }
        raw[i] = Some(at.data);
        if at.data.len() == 4 {
            u32s[i] = Some(u32::from_be_bytes(at.data.try_into().expect("4 bytes")));
        }
    }
    let known =
        |allowed: &[usize]| (0..raw.len()).all(|i| raw[i].is_none() || allowed.contains(&i));
    let req = |i: usize| u32s[i].ok_or_else(|| bad(format!("{name} lacks attribute {i}")));
    let value = |i: usize| -> Result<Vec<u8>, DecodeError> {
        let d = raw[i].ok_or_else(|| bad(format!("{name} lacks attribute {i}")))?;
        Attr {
            kind: i as u16,
            data: d,
        }
        .data_value()
        .map(<[u8]>::to_vec)
    };
    Ok(Some(match name {
        "meta" | "ct" if known(&[1, 2]) => {
            let (key, dreg) = (req(2)?, req(1)?);
            if name == "meta" {
                Expr::Meta { key, dreg }
            } else {
                Expr::Ct { key, dreg }
            }
        }
        "payload" if known(&[1, 2, 3, 4]) => Expr::Payload {
            dreg: req(1)?,
            base: req(2)?,
            offset: req(3)?,
            len: req(4)?,
        },
        "cmp" if known(&[1, 2, 3]) => Expr::Cmp {
            sreg: req(1)?,
            op: req(2)?,
            data: value(3)?,
        },
        // NFTA_BITWISE_OP (6) is dumped as 0 (mask and xor) by kernels that know shifts.
        "bitwise" if known(&[1, 2, 3, 4, 5, 6]) && u32s[6].unwrap_or(0) == 0 => Expr::Bitwise {
            sreg: req(1)?,
            dreg: req(2)?,
            len: req(3)?,
            mask: value(4)?,
            xor: value(5)?,
        },
        "byteorder" if known(&[1, 2, 3, 4, 5]) => Expr::Byteorder {
            sreg: req(1)?,
            dreg: req(2)?,
            op: req(3)?,
            len: req(4)?,
            size: req(5)?,
        },
        "lookup" if known(&[1, 2, 4, 5]) => Expr::Lookup {
            sreg: req(2)?,
            set: Attr {
                kind: 1,
                data: raw[1].ok_or_else(|| bad("lookup without a set"))?,
            }
            .string()?,
            set_id: u32s[4],
            flags: u32s[5].unwrap_or(0),
        },
        "immediate" if known(&[1, 2]) => {
            let data = raw[2].ok_or_else(|| bad("immediate without data"))?;
            let inner = attrs(data)?;
            let [v] = inner.as_slice() else {
                return Ok(None);
            };
            if v.kind != DATA_VERDICT {
                return Ok(None);
            }
            let (mut code, mut chain) = (None, None);
            for x in v.nested()? {
                match x.kind {
                    VERDICT_CODE => code = Some(x.be32()? as i32),
                    VERDICT_CHAIN => chain = Some(x.string()?),
                    _ => return Ok(None),
                }
            }
            let verdict = match (code.ok_or_else(|| bad("verdict without a code"))?, chain) {
                (1, None) => Verdict::Accept,
                (0, None) => Verdict::Drop,
                (-3, Some(c)) => Verdict::Jump(c),
                (c, _) => Verdict::Other(c),
            };
            Expr::Immediate {
                dreg: req(1)?,
                verdict,
            }
        }
        "limit" if known(&[1, 2, 3, 4, 5]) => Expr::Limit {
            rate: Attr {
                kind: 1,
                data: raw[1].unwrap_or_default(),
            }
            .be64()?,
            unit: Attr {
                kind: 2,
                data: raw[2].unwrap_or_default(),
            }
            .be64()?,
            burst: req(3)?,
            kind: req(4)?,
            flags: u32s[5].unwrap_or(0),
        },
        "log" if known(&[1, 2, 3, 4, 5, 6]) => Expr::Log {
            prefix: raw[2]
                .map(|d| Attr { kind: 2, data: d }.string())
                .transpose()?
                .unwrap_or_default(),
            group: raw[1]
                .map(|d| Attr { kind: 1, data: d }.be16())
                .transpose()?,
            snaplen: raw[3].map(|_| req(3)).transpose()?,
            qthreshold: raw[4]
                .map(|d| Attr { kind: 4, data: d }.be16())
                .transpose()?,
            level: raw[5].map(|_| req(5)).transpose()?,
            flags: raw[6].map(|_| req(6)).transpose()?,
        },
        "reject" if known(&[1, 2]) => Expr::Reject {
            kind: req(1)?,
            code: match raw[2] {
                None => None,
                Some([code]) => Some(*code),
                Some(_) => return Err(bad("reject code is not one byte")),
            },
        },
        _ => return Ok(None),
    }))
}

pub fn decode_set(body: &[u8]) -> Result<SetObj, DecodeError> {
    let mut set = SetObj {
        name: String::new(),
        flags: 0,
        key_type: 0,
        key_len: 0,
        fields: Vec::new(),
        size: None,
        timeout_ms: None,
        userdata: Vec::new(),
        unknown: Vec::new(),
    };
    let mut named = false;
    for a in attrs(body)? {
        match a.kind {
            SET_NAME => {
                set.name = a.string()?;
                named = true;
            }
            SET_FLAGS => set.flags = a.be32()?,
            SET_KEY_TYPE => set.key_type = a.be32()?,
            SET_KEY_LEN => set.key_len = a.be32()?,
            SET_TIMEOUT => set.timeout_ms = Some(a.be64()?),
            SET_USERDATA => set.userdata = a.data.to_vec(),
            SET_DESC => {
                for d in a.nested()? {
                    match d.kind {
                        SET_DESC_SIZE => set.size = Some(d.be32()?),
                        SET_DESC_CONCAT => {
                            for f in d.nested()? {
                                for l in f.nested()? {
                                    if l.kind == SET_FIELD_LEN {
                                        set.fields.push(l.be32()?);
                                    }
                                }
                            }
                        }
                        other => set.unknown.push(1000 + other),
                    }
                }
            }
            SET_TABLE | SET_HANDLE | SET_PAD | SET_ID | SET_TYPE | SET_COUNT => {}
            // The kernel reports its garbage collection interval for sets with timeouts.
            SET_GC_INTERVAL if set.flags & SET_F_TIMEOUT != 0 => {}
            // NFTA_SET_POLICY, NFTA_SET_DATA_*, expressions, ...: not ours.
            other => set.unknown.push(other),
        }
    }
    if !named {
        return Err(bad("set without a name"));
    }
    Ok(set)
}

/// The set name and elements of one `NEWSETELEM` dump message.
pub fn decode_setelems(body: &[u8]) -> Result<(String, Vec<ElemObj>), DecodeError> {
    let mut out = Vec::new();
    let name = decode_setelems_into(body, &mut out)?;
    Ok((name, out))
}

/// [`decode_setelems`] appending the elements to `out` (a dump's messages into one list,
/// without a list per message); returns the set name. On an error `out` may hold part of
/// the message's elements.
pub fn decode_setelems_into(body: &[u8], out: &mut Vec<ElemObj>) -> Result<String, DecodeError> {
    let mut name = None;
    for a in attr_iter(body)? {
        match a.kind {
            ELEM_LIST_SET => name = Some(a.string()?),
            ELEM_LIST_ELEMENTS => {
                for e in attr_iter(a.data)? {
                    out.push(decode_elem(e.data)?);
                }
            }
            _ => {}
        }
    }
    name.ok_or_else(|| bad("elements without a set"))
}

fn decode_elem(data: &[u8]) -> Result<ElemObj, DecodeError> {
    // One pass (this runs for every element of a dump); when it fails, a malformed attribute
    // anywhere is the error, as if all had been split before any was read.
    decode_elem_attrs(data).or_else(|e| {
        attr_iter(data)?;
        Err(e)
    })
}

fn decode_elem_attrs(data: &[u8]) -> Result<ElemObj, DecodeError> {
    let mut e = ElemObj::key(ElemKey::default());
    let mut keyed = false;
    let mut rest = data;
    while !rest.is_empty() {
        let (a, next) = split_attr(rest)?;
        rest = next;
        match a.kind {
            ELEM_KEY => {
                e.key = a.data_value()?.into();
                keyed = true;
            }
            ELEM_KEY_END => e.key_end = Some(a.data_value()?.into()),
            ELEM_FLAGS => e.flags = a.be32()?,
            ELEM_TIMEOUT => e.timeout_ms = Some(a.be64()?),
            ELEM_EXPIRATION | ELEM_PAD => {}
            other => e.unknown.push(other),
        }
    }
    if !keyed {
        return Err(bad("set element without a key"));
    }
    Ok(e)
}

/// What the kernel holds of our table, decoded from its dumps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveTable {
    pub flags: u32,
    pub chains: Vec<ChainObj>,
    pub rules: Vec<RuleObj>,
    pub sets: Vec<(SetObj, Vec<ElemObj>)>,
    /// Whether some dump said it was interrupted by a concurrent change (`NLM_F_DUMP_INTR`).
    pub interrupted: bool,
}

/// The raw messages the kernel dumped of our table (whole netlink messages), as the netlink
/// effect collected them; [`TableDump::decode`] turns them into a [`LiveTable`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableDump {
    pub table: Vec<Vec<u8>>,
    pub chains: Vec<Vec<u8>>,
    pub rules: Vec<Vec<u8>>,
    pub sets: Vec<Vec<u8>>,
    /// Per set name, the element messages.
    pub elements: Vec<(String, Vec<Vec<u8>>)>,
    pub interrupted: bool,
}

/// The bodies of the messages of our table among `raw` (a chain dump lists every table's).
fn ours(raw: &[Vec<u8>]) -> Result<Vec<&[u8]>, DecodeError> {
    let mut out = Vec::new();
    for r in raw {
        for m in messages(r)? {
            let family = m.raw.get(NLMSG_HDRLEN).copied();
            if family == Some(NFPROTO_INET) && table_of(m.body)?.as_deref() == Some(TABLE) {
                out.push(m.body);
            }
        }
    }
    Ok(out)
}

/// The elements of our set `set` in the whole messages of one `GETSETELEM` dump (messages
/// of other tables, families or sets are skipped).
pub fn set_elements_of(raw: &[Vec<u8>], set: &str) -> Result<Vec<ElemObj>, DecodeError> {
    let mut out = Vec::new();
    for body in ours(raw)? {
        let before = out.len();
        if decode_setelems_into(body, &mut out)? != set {
            out.truncate(before);
        }
    }
    Ok(out)
}

impl TableDump {
    /// Our sets' names, each with whether its elements are learned (timeout flag).
    pub fn set_names(&self) -> Result<Vec<(String, bool)>, DecodeError> {
        ours(&self.sets)?
            .into_iter()
            .map(|b| decode_set(b).map(|s| (s.name.clone(), s.flags & SET_F_TIMEOUT != 0)))
            .collect()
    }

    pub fn decode(&self) -> Result<LiveTable, DecodeError> {
        let mut live = LiveTable {
            interrupted: self.interrupted,
            ..LiveTable::default()
        };
        let tables = ours_tables(&self.table)?;
        let [(_, flags)] = tables.as_slice() else {
            return Err(bad(format!(
                "{} tables named {TABLE} in the listing",
                tables.len()
            )));
        };
        live.flags = *flags;
        for b in ours(&self.chains)? {
            live.chains.push(decode_chain(b)?);
        }
        for b in ours(&self.rules)? {
            live.rules.push(decode_rule(b)?);
        }
        for b in ours(&self.sets)? {
            let set = decode_set(b)?;
            let mut elems = Vec::new();
            for (name, raw) in &self.elements {
                if *name == set.name {
                    for b in ours(raw)? {
                        let before = elems.len();
                        if decode_setelems_into(b, &mut elems)? != set.name {
                            elems.truncate(before);
                        }
                    }
                }
            }
            live.sets.push((set, elems));
        }
        Ok(live)
    }
}

fn ours_tables(raw: &[Vec<u8>]) -> Result<Vec<(String, u32)>, DecodeError> {
    let mut out = Vec::new();
    for r in raw {
        for m in messages(r)? {
            if m.raw.get(NLMSG_HDRLEN).copied() == Some(NFPROTO_INET) {
                let t = decode_table(m.body)?;
                if t.0 == TABLE {
                    out.push(t);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::policy::{AllowRule, HostLoopback, Mode, Policy};

    pub(crate) fn rich(mode: Mode) -> Policy {
        let mut p = Policy::new(mode);
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
        p.host_loopback = Some(HostLoopback {
            gateway: "198.51.100.1".parse().unwrap(),
            ports: vec![8080, 9090],
        });
        p.resolver_mark = Some(0x5eed);
        p.resolver_port = Some(5353);
        p
    }

    #[test]
    fn every_mode_lowers() {
        for mode in [Mode::DenyAll, Mode::Bypass, Mode::BypassAll, Mode::Block] {
            let rs = Ruleset::generate(&rich(mode));
            let l = Lowered::new(&rs).unwrap();
            assert_eq!(l.chains.len(), rs.chains.len());
            assert_eq!(
                l.rules.len(),
                rs.chains.iter().map(|c| c.rules.len()).sum::<usize>()
            );
        }
    }

    #[test]
    fn interval_elements_match_nft() {
        // nft's elements for { 198.18.0.0/23 }: 0 end, start, end after it.
        let e = interval_elements(&[(
            "198.18.0.0".parse().unwrap(),
            "198.18.1.255".parse().unwrap(),
        )]);
        let keys: Vec<(Vec<u8>, u32)> = e.into_iter().map(|e| (e.key.to_vec(), e.flags)).collect();
        assert_eq!(
            keys,
            vec![
                (vec![0, 0, 0, 0], 1),
                (vec![198, 18, 0, 0], 0),
                (vec![198, 18, 2, 0], 1)
            ]
        );
        // Adjacent ranges (like 140.0.0.0/6, 144.0.0.0/4): an end marker and a start at the
        // same key, as nft sends them; a range reaching the top has no end marker.
        let e = interval_elements(&[
            ("0.0.0.0".parse().unwrap(), "0.0.0.255".parse().unwrap()),
            ("0.0.1.0".parse().unwrap(), "0.0.2.255".parse().unwrap()),
            (
                "255.0.0.0".parse().unwrap(),
                "255.255.255.255".parse().unwrap(),
            ),
        ]);
        let got: Vec<(u8, u32)> = e.iter().map(|e| (e.key[2], e.flags)).collect();
        assert_eq!(got, vec![(0, 0), (1, 1), (1, 0), (3, 1), (0, 0)]);
    }

    #[test]
    fn decode_reverses_encode_for_every_rule() {
        for mode in [Mode::DenyAll, Mode::Bypass, Mode::BypassAll, Mode::Block] {
            round_trip(&Lowered::new(&Ruleset::generate(&rich(mode))).unwrap());
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Any valid policy lowers, and every message decodes back to what was encoded;
        /// every batch is well-formed and numbered without gaps.
        #[test]
        fn any_policy_lowers_and_round_trips(policy in crate::core::proptests::arb_policy()) {
            let l = Lowered::new(&Ruleset::generate(&policy)).unwrap();
            round_trip(&l);
            let mut seq = 7;
            for b in l.batches(true, 7) {
                let msgs = messages(&b.bytes).unwrap();
                proptest::prop_assert_eq!(msgs.len() as u32, b.messages + 2);
                for m in msgs {
                    proptest::prop_assert_eq!(m.seq, seq);
                    seq += 1;
                }
            }
        }
    }

    fn round_trip(l: &Lowered) {
        {
            for rule in &l.rules {
                let mut buf = Vec::new();
                new_rule(&mut buf, 1, rule);
                let msgs = messages(&buf).unwrap();
                let back = decode_rule(msgs[0].body).unwrap();
                assert_eq!(&back, rule);
            }
            for s in &l.sets {
                let mut buf = Vec::new();
                new_set(&mut buf, 1, s);
                let msgs = messages(&buf).unwrap();
                assert_eq!(decode_set(msgs[0].body).unwrap(), s.set);
                if !s.elems.is_empty() {
                    let mut buf = Vec::new();
                    new_setelem(&mut buf, 1, s, &s.elems);
                    let msgs = messages(&buf).unwrap();
                    let (name, elems) = decode_setelems(msgs[0].body).unwrap();
                    assert_eq!(name, s.set.name);
                    assert_eq!(elems, s.elems);
                }
            }
        }
    }

    #[test]
    fn elem_keys_of_any_length_are_their_bytes() {
        let keys: Vec<Vec<u8>> = [0, 1, 4, 12, 16, 23, 24, 25, 64, 300]
            .iter()
            .map(|&n| (0..n).map(|i| (i * 7 + n) as u8).collect())
            .collect();
        for k in &keys {
            let e = ElemKey::from_slice(k);
            assert_eq!(&*e, k.as_slice());
            assert_eq!(
                !e.spilled(),
                k.len() <= ELEM_KEY_INLINE,
                "{} bytes",
                k.len()
            );
            assert_eq!(format!("{e:?}"), format!("{k:?}"));
            assert_eq!(e, ElemKey::from(k.clone()));
            for other in &keys {
                assert_eq!(e.cmp(&ElemKey::from_slice(other)), k.cmp(other));
            }
        }
        // A key longer than any of ours (another table's set, or hostile input) is decoded
        // whole, as before: neither an error nor cut.
        for len in [24, 25, 64, 1000] {
            let key: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let e = ElemObj::key(ElemKey::from_slice(&key));
            let mut buf = Vec::new();
            write_elem(&mut Writer(&mut buf), &e);
            let got = decode_elem(&buf[4..]).unwrap();
            assert_eq!(got, e);
            assert_eq!(got.key.to_vec(), key);
        }
    }

    /// An element is read in one pass, but a malformed attribute is still the error where
    /// an attribute before it fails too (as when the attributes were all split first).
    #[test]
    fn a_malformed_element_is_reported_as_malformed() {
        let mut buf = Vec::new();
        let mut w = Writer(&mut buf);
        w.nest(ELEM_KEY, |w| w.bytes(DATA_VALUE + 1, &[1, 2, 3, 4])); // not a data value
        w.be32(ELEM_FLAGS, 0);
        let truncated = buf.len() - 1;
        let well_formed = decode_elem(&buf).unwrap_err();
        assert!(well_formed.0.contains("not a data value"), "{well_formed}");
        let cut = decode_elem(&buf[..truncated]).unwrap_err();
        assert_eq!(cut, attrs(&buf[..truncated]).unwrap_err());
        // A data value with an overrunning attribute inside it.
        let mut buf = Vec::new();
        Writer(&mut buf).nest(ELEM_KEY, |w| w.bytes(DATA_VALUE, &[1, 2, 3, 4]));
        buf[4] = 200;
        let err = decode_elem(&buf).unwrap_err();
        assert!(err.0.contains("overruns"), "{err}");
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let mut buf = Vec::new();
        let l = Lowered::new(&Ruleset::generate(&rich(Mode::DenyAll))).unwrap();
        new_rule(&mut buf, 1, &l.rules[2]);
        for cut in 0..buf.len() {
            if let Ok(msgs) = messages(&buf[..cut]) {
                for m in msgs {
                    let _ = decode_rule(m.body);
                }
            }
            let _ = decode_rule(&buf[cut..]);
            let _ = decode_set(&buf[cut..]);
            let _ = decode_setelems(&buf[cut..]);
        }
        for i in 0..buf.len() {
            let mut b = buf.clone();
            b[i] ^= 0xff;
            if let Ok(msgs) = messages(&b) {
                for m in msgs {
                    let _ = decode_rule(m.body);
                }
            }
        }
    }

    #[test]
    fn batches_stay_within_limits_and_number_every_message() {
        let mut p = Policy::new(Mode::DenyAll);
        for i in 0..50_000u32 {
            p.allow.push(AllowRule {
                net: IpAddr::V4(std::net::Ipv4Addr::from(0xC612_0000 + i)).into(),
                scope: None,
            });
        }
        let l = Lowered::new(&Ruleset::generate(&p)).unwrap();
        let batches = l.batches(true, 100);
        assert!(batches.len() > 1);
        let mut seq = 100;
        let mut elems = 0;
        for b in &batches {
            assert!(
                b.bytes.len() <= MAX_BATCH_BYTES + MAX_ELEMENT_BYTES,
                "{}",
                b.bytes.len()
            );
            let msgs = messages(&b.bytes).unwrap();
            assert_eq!(msgs.len() as u32, b.messages + 2);
            for m in &msgs {
                assert_eq!(m.seq, seq);
                seq += 1;
                if m.kind == nft_type(msg::NEWSETELEM) {
                    let (name, e) = decode_setelems(m.body).unwrap();
                    if name == "allow_v4" {
                        elems += e.len();
                    }
                }
            }
            assert_eq!(b.first_seq, msgs[1].seq);
        }
        assert_eq!(elems, 50_000);
    }
}
