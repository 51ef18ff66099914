//! Objects into batches: `BATCH_BEGIN`, the messages, `BATCH_END`, each batch within the
//! limits of one `send`, the elements of a large set split across messages and batches.

use super::encode::*;
use super::*;
use crate::core::ruleset::TABLE;

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
