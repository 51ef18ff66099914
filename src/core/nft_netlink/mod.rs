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
//!
//! This file holds the constants and the objects; the work is done in
//! - `lower`: [`Ruleset`] to [`Lowered`] (chains, sets and elements, rules of [`Expr`]);
//! - `encode`: the attribute and message [`Writer`], and the message of each object;
//! - `batch`: [`Lowered`] to [`Batch`]es within the limits of one `send`;
//! - `decode`: the kernel's dumps back to objects ([`TableDump::decode`]).
//!
//! [`Ruleset`]: crate::core::ruleset::Ruleset
//! [`lower_match`]: lower::lower_match

mod batch;
mod decode;
mod encode;
mod lower;
#[cfg(test)]
mod tests;

pub use decode::{
    attr_iter, attrs, decode_chain, decode_rule, decode_set, decode_setelems, decode_setelems_into,
    decode_table, messages, set_elements_of, table_of, Attr, Attrs, Message,
};
pub use encode::{del_table, message, new_table, Writer};
pub use lower::elements;

use thiserror::Error;

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
pub const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
pub const NFNL_MSG_BATCH_END: u16 = 0x11;
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

/// `n` rounded up to the netlink alignment of 4 bytes.
pub fn align4(n: usize) -> usize {
    (n + 3) & !3
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
#[error("cannot express `{0}` as nf_tables netlink: the netlink lowering (src/core/nft_netlink/lower.rs) does not know this rule shape; load through nft instead (TEROK_SHIELD_NFT) and report it")]
pub struct LowerError(pub String);

/// The name an anonymous set is created with; the kernel turns `%d` into a number.
pub const ANON_SET_NAME: &str = "__set%d";

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

/// A malformed message or attribute in the kernel's answer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("malformed nf_tables netlink data: {0}")]
pub struct DecodeError(pub String);

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
