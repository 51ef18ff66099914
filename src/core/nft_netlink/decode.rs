//! The decoding of the kernel's dumps: bounds-checked attributes and messages, and our
//! objects read back from them. The dump is input: nothing here trusts a length.

use super::*;
use crate::core::ruleset::TABLE;

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

pub(super) fn decode_elem(data: &[u8]) -> Result<ElemObj, DecodeError> {
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
