//! The netlink writer (attributes, nests, messages) and the messages that create our objects.

use super::*;
use crate::core::ruleset::TABLE;

/// Netlink attribute writer over a byte buffer: the one writer of the crate (the resolver's
/// set updates and the NFLOG binding use it too).
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

    /// A NUL-terminated string, as the kernel's `NLA_STRING` policy expects; written in
    /// place, so that a reused buffer means no allocation per message.
    pub fn str(&mut self, kind: u16, s: &str) {
        let out = &mut *self.0;
        let start = out.len();
        out.extend_from_slice(&((4 + s.len() + 1) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(s.as_bytes());
        out.push(0);
        out.resize(start + align4(out.len() - start), 0);
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

pub(super) fn new_chain(out: &mut Vec<u8>, seq: u32, chain: &ChainObj) {
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

pub(super) fn new_set(out: &mut Vec<u8>, seq: u32, s: &SetWithElems) {
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

pub(super) fn write_elem(w: &mut Writer, e: &ElemObj) {
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
pub(super) fn elem_size(e: &ElemObj) -> usize {
    4 + e.timeout_ms.map_or(0, |_| 12)
        + if e.flags != 0 { 8 } else { 0 }
        + 8
        + align4(e.key.len())
        + e.key_end.as_ref().map_or(0, |k| 8 + align4(k.len()))
}

pub(super) fn new_setelem(out: &mut Vec<u8>, seq: u32, s: &SetWithElems, elems: &[ElemObj]) {
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

pub(super) fn new_rule(out: &mut Vec<u8>, seq: u32, rule: &RuleObj) {
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
