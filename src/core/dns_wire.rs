//! In-place reading of the DNS message shapes the resolver sees on nearly every question: a
//! query with one question (and perhaps a bare OPT record), and an answer made of A, AAAA and
//! CNAME records.
//!
//! hickory-proto's `Message::from_vec` builds every name and record on the heap, which costs a
//! few microseconds per message on the path of every DNS answer. This reader walks the same
//! bytes without allocating and answers only for shapes whose hickory reading it reproduces
//! exactly; for anything else it returns `None` and the caller parses with hickory. Every read
//! is bounds-checked: the bytes come from the workload or from upstream, both hostile.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Bytes of the fixed DNS header.
pub const HEADER_LEN: usize = 12;

/// Record type codes read here.
pub const TYPE_A: u16 = 1;
/// CNAME record type.
pub const TYPE_CNAME: u16 = 5;
/// AAAA record type.
pub const TYPE_AAAA: u16 = 28;
/// OPT pseudo-record type (EDNS, RFC 6891).
pub const TYPE_OPT: u16 = 41;
/// Class IN.
pub const CLASS_IN: u16 = 1;

/// Longest name read here, in wire bytes with the root label. hickory's limit sits at 255 and
/// is counted two ways; names near it are rare, so they go to hickory rather than risk a
/// different verdict at the edge.
const MAX_NAME_WIRE: usize = 250;

/// Most answer records read here; larger answers are left to hickory.
pub const MAX_ANSWERS: usize = 16;

/// Most label starts remembered as compression targets (and so, most pointers followed while
/// walking one name: each pointer lands on a remembered start strictly before itself).
const MAX_LABEL_STARTS: usize = 64;

fn u16_at(msg: &[u8], at: usize) -> Option<u16> {
    let bytes = msg.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([bytes[0], bytes[1]]))
}

fn u32_at(msg: &[u8], at: usize) -> Option<u32> {
    let bytes = msg.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// The 12-byte DNS header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message ID.
    pub id: u16,
    flags: u16,
    /// QDCOUNT.
    pub questions: u16,
    /// ANCOUNT.
    pub answers: u16,
    /// NSCOUNT.
    pub authorities: u16,
    /// ARCOUNT.
    pub additionals: u16,
}

impl Header {
    /// The header of `msg`, or `None` when it is shorter than one.
    pub fn read(msg: &[u8]) -> Option<Header> {
        Some(Header {
            id: u16_at(msg, 0)?,
            flags: u16_at(msg, 2)?,
            questions: u16_at(msg, 4)?,
            answers: u16_at(msg, 6)?,
            authorities: u16_at(msg, 8)?,
            additionals: u16_at(msg, 10)?,
        })
    }

    /// QR: the message is a response.
    pub fn is_response(&self) -> bool {
        self.flags & 0x8000 != 0
    }

    /// OPCODE (0 is QUERY).
    pub fn opcode(&self) -> u8 {
        ((self.flags >> 11) & 0x0f) as u8
    }

    /// TC: the message was truncated.
    pub fn truncated(&self) -> bool {
        self.flags & 0x0200 != 0
    }

    /// RD: recursion desired.
    pub fn recursion_desired(&self) -> bool {
        self.flags & 0x0100 != 0
    }

    /// The low four bits of the response code (the rest travel in an OPT record).
    pub fn rcode_low(&self) -> u8 {
        (self.flags & 0x000f) as u8
    }
}

/// A name inside a message, by the offset where it starts. Only the readers here make one, after
/// checking the whole name, so walking its labels cannot go astray.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireName {
    start: usize,
}

/// The labels of a checked name, following its compression pointer if it has one.
#[derive(Debug, Clone)]
pub struct Labels<'m> {
    msg: &'m [u8],
    at: usize,
    hops: usize,
}

impl<'m> Iterator for Labels<'m> {
    type Item = &'m [u8];

    fn next(&mut self) -> Option<&'m [u8]> {
        loop {
            let len = *self.msg.get(self.at)?;
            match len {
                0 => return None,
                l if l & 0xc0 == 0xc0 => {
                    if self.hops >= MAX_LABEL_STARTS {
                        return None;
                    }
                    self.hops += 1;
                    self.at = usize::from(u16_at(self.msg, self.at)? & 0x3fff);
                }
                l if l & 0xc0 == 0 => {
                    let start = self.at + 1;
                    let label = self.msg.get(start..start + usize::from(l))?;
                    self.at = start + usize::from(l);
                    return Some(label);
                }
                _ => return None,
            }
        }
    }
}

/// The labels of `name` in `msg`.
pub fn labels(msg: &[u8], name: WireName) -> Labels<'_> {
    Labels {
        msg,
        at: name.start,
        hops: 0,
    }
}

/// Whether two names of `msg` are equal as hickory compares them: label by label, ASCII
/// letters in either case.
pub fn same_name(msg: &[u8], a: WireName, b: WireName) -> bool {
    a == b || labels_equal(labels(msg, a), labels(msg, b))
}

/// Whether `name` spells the dotted text `dotted` label by label, ASCII case ignored (a label
/// holding a `.` never matches: it is not two labels).
pub fn name_is(msg: &[u8], name: WireName, dotted: &str) -> bool {
    let mut rest = dotted.as_bytes();
    let mut first = true;
    for label in labels(msg, name) {
        if !first {
            match rest.split_first() {
                Some((b'.', tail)) => rest = tail,
                _ => return false,
            }
        }
        first = false;
        match rest.split_at_checked(label.len()) {
            Some((head, tail)) if head.eq_ignore_ascii_case(label) && !label.contains(&b'.') => {
                rest = tail;
            }
            _ => return false,
        }
    }
    !first && rest.is_empty()
}

fn labels_equal<'a, 'b>(
    mut a: impl Iterator<Item = &'a [u8]>,
    mut b: impl Iterator<Item = &'b [u8]>,
) -> bool {
    loop {
        match (a.next(), b.next()) {
            (None, None) => return true,
            (Some(l), Some(r)) if l.eq_ignore_ascii_case(r) => {}
            _ => return false,
        }
    }
}

/// Reads the names of one message in order, remembering where their labels start so that a
/// later compression pointer is followed only to a label of a name already read in full
/// (which is what hickory's "pointer to a prior name, no overlap" rule accepts, and more).
struct NameReader<'m> {
    msg: &'m [u8],
    /// Offset of each remembered label, and the wire length of the name from there on.
    label_starts: [(u16, u8); MAX_LABEL_STARTS],
    count: usize,
}

impl<'m> NameReader<'m> {
    fn new(msg: &'m [u8]) -> Self {
        NameReader {
            msg,
            label_starts: [(0, 0); MAX_LABEL_STARTS],
            count: 0,
        }
    }

    /// The name at `at` and the offset just past it: labels of 1 to 63 bytes, ended by the
    /// root label or (when `compressed` is allowed) by a pointer to a remembered label.
    fn read(&mut self, at: usize, compressed: bool) -> Option<(WireName, usize)> {
        let earlier = self.count;
        let mut pos = at;
        let mut wire_len = 0usize;
        loop {
            let len = *self.msg.get(pos)?;
            if len == 0 {
                wire_len += 1;
                pos += 1;
                break;
            }
            if len & 0xc0 == 0xc0 {
                if !compressed {
                    return None;
                }
                let target = u16_at(self.msg, pos)? & 0x3fff;
                let (_, suffix_len) = self.label_starts[..earlier]
                    .iter()
                    .find(|(start, _)| *start == target)?;
                wire_len += usize::from(*suffix_len);
                pos += 2;
                break;
            }
            if len & 0xc0 != 0 {
                return None;
            }
            let label_len = usize::from(len);
            self.msg.get(pos + 1..pos + 1 + label_len)?;
            if self.count == MAX_LABEL_STARTS || wire_len + 1 + label_len > MAX_NAME_WIRE {
                return None;
            }
            // The prefix length for now; turned into the suffix length once the name ends.
            self.label_starts[self.count] = (u16::try_from(pos).ok()?, wire_len as u8);
            self.count += 1;
            wire_len += 1 + label_len;
            pos += 1 + label_len;
        }
        if wire_len > MAX_NAME_WIRE {
            return None;
        }
        for (_, len) in &mut self.label_starts[earlier..self.count] {
            *len = (wire_len - usize::from(*len)) as u8;
        }
        Some((WireName { start: at }, pos))
    }
}

/// An OPT record with no options: what hickory turns into an `Edns` without reading options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BareOpt {
    /// The CLASS field: the sender's UDP payload size, as written.
    pub udp_payload: u16,
    /// The TTL field's top byte: the upper eight bits of the extended response code.
    pub rcode_high: u8,
}

/// The OPT record at `at` if it has the root name and no options, and the offset past it.
fn read_bare_opt(msg: &[u8], at: usize) -> Option<(BareOpt, usize)> {
    if *msg.get(at)? != 0 || u16_at(msg, at + 1)? != TYPE_OPT || u16_at(msg, at + 9)? != 0 {
        return None;
    }
    let opt = BareOpt {
        udp_payload: u16_at(msg, at + 3)?,
        rcode_high: (u32_at(msg, at + 5)? >> 24) as u8,
    };
    Some((opt, at + 11))
}

/// The end of a message of the common shape: its additional section (`additionals` records,
/// at most one: a bare OPT) starting at `at`, then nothing. The OPT record, if there is one.
fn read_additional_and_end(msg: &[u8], at: usize, additionals: u16) -> Option<Option<BareOpt>> {
    let (opt, end) = match additionals {
        0 => (None, at),
        1 => {
            let (opt, end) = read_bare_opt(msg, at)?;
            (Some(opt), end)
        }
        _ => return None,
    };
    (end == msg.len()).then_some(opt)
}

/// A client query of the common shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryView<'m> {
    msg: &'m [u8],
    /// Message ID.
    pub id: u16,
    /// RD flag.
    pub recursion_desired: bool,
    /// The question's name (plain labels).
    pub qname: WireName,
    /// The question's type code.
    pub qtype: u16,
    /// The OPT record, when the client sent one.
    pub opt: Option<BareOpt>,
}

impl<'m> QueryView<'m> {
    /// The labels of the question's name.
    pub fn qname_labels(&self) -> Labels<'m> {
        labels(self.msg, self.qname)
    }
}

/// `msg` as a standard query (QR 0, opcode QUERY) with exactly one question of class IN, its
/// name uncompressed, no answer or authority records and at most a bare OPT record, ending
/// right there; `None` for every other message.
pub fn read_query(msg: &[u8]) -> Option<QueryView<'_>> {
    let header = Header::read(msg)?;
    if header.is_response()
        || header.opcode() != 0
        || header.questions != 1
        || header.answers != 0
        || header.authorities != 0
        || header.additionals > 1
    {
        return None;
    }
    let (qname, at) = NameReader::new(msg).read(HEADER_LEN, false)?;
    let qtype = u16_at(msg, at)?;
    if u16_at(msg, at + 2)? != CLASS_IN {
        return None;
    }
    let opt = read_additional_and_end(msg, at + 4, header.additionals)?;
    Some(QueryView {
        msg,
        id: header.id,
        recursion_desired: header.recursion_desired(),
        qname,
        qtype,
        opt,
    })
}

/// What an answer record carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordData {
    /// An A or AAAA record's address.
    Address(IpAddr),
    /// A CNAME record's target.
    Cname(WireName),
}

/// One answer record (class IN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerRecord {
    /// The owner name.
    pub owner: WireName,
    /// TTL in seconds, as written.
    pub ttl: u32,
    /// The record's data.
    pub data: RecordData,
}

/// An upstream answer of the common shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerView<'m> {
    msg: &'m [u8],
    /// The header.
    pub header: Header,
    /// The question's name (plain labels).
    pub qname: WireName,
    /// The question's type code.
    pub qtype: u16,
    /// The question's class code.
    pub qclass: u16,
    records: [AnswerRecord; MAX_ANSWERS],
    /// The OPT record, when upstream sent one.
    pub opt: Option<BareOpt>,
}

impl AnswerView<'_> {
    /// The answer section, in message order.
    pub fn records(&self) -> &[AnswerRecord] {
        &self.records[..usize::from(self.header.answers)]
    }

    /// [`same_name`] within this message.
    pub fn same_name(&self, a: WireName, b: WireName) -> bool {
        same_name(self.msg, a, b)
    }

    /// [`name_is`] within this message.
    pub fn name_is(&self, name: WireName, dotted: &str) -> bool {
        name_is(self.msg, name, dotted)
    }
}

/// `msg` as a standard response (QR 1, opcode QUERY) to one uncompressed question, with at
/// most [`MAX_ANSWERS`] answer records, each an A, AAAA or CNAME record of class IN whose names
/// are plain or point at a name read before, no authority records, at most a bare OPT record,
/// and nothing after; `None` for every other message.
pub fn read_answer(msg: &[u8]) -> Option<AnswerView<'_>> {
    let header = Header::read(msg)?;
    if !header.is_response()
        || header.opcode() != 0
        || header.questions != 1
        || usize::from(header.answers) > MAX_ANSWERS
        || header.authorities != 0
        || header.additionals > 1
    {
        return None;
    }
    let mut names = NameReader::new(msg);
    let (qname, at) = names.read(HEADER_LEN, false)?;
    let qtype = u16_at(msg, at)?;
    let qclass = u16_at(msg, at + 2)?;
    let mut at = at + 4;
    let unset = AnswerRecord {
        owner: qname,
        ttl: 0,
        data: RecordData::Cname(qname),
    };
    let mut records = [unset; MAX_ANSWERS];
    for record in records.iter_mut().take(usize::from(header.answers)) {
        let (owner, fixed) = names.read(at, true)?;
        let rtype = u16_at(msg, fixed)?;
        if u16_at(msg, fixed + 2)? != CLASS_IN {
            return None;
        }
        let ttl = u32_at(msg, fixed + 4)?;
        let rdata_start = fixed + 10;
        let rdata_end = rdata_start + usize::from(u16_at(msg, fixed + 8)?);
        let rdata = msg.get(rdata_start..rdata_end)?;
        let data = match rtype {
            TYPE_A => {
                RecordData::Address(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(rdata).ok()?)))
            }
            TYPE_AAAA => RecordData::Address(IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(rdata).ok()?,
            ))),
            TYPE_CNAME => {
                let (target, end) = names.read(rdata_start, true)?;
                if end != rdata_end {
                    return None;
                }
                RecordData::Cname(target)
            }
            _ => return None,
        };
        *record = AnswerRecord { owner, ttl, data };
        at = rdata_end;
    }
    let opt = read_additional_and_end(msg, at, header.additionals)?;
    Some(AnswerView {
        msg,
        header,
        qname,
        qtype,
        qclass,
        records,
        opt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response header with one question and `answers` answer records.
    fn header(answers: u16) -> Vec<u8> {
        let mut h = vec![0x12, 0x34, 0x81, 0x80, 0, 1];
        h.extend_from_slice(&answers.to_be_bytes());
        h.extend_from_slice(&[0, 0, 0, 0]);
        h
    }

    /// The question `a.example. A IN` at offset 12 (`example` starts at 14).
    const QUESTION: &[u8] = b"\x01a\x07example\x00\x00\x01\x00\x01";

    /// An A record of class IN owned by `owner` (wire bytes).
    fn a_record(owner: &[u8], ttl: u32, addr: [u8; 4]) -> Vec<u8> {
        let mut r = owner.to_vec();
        r.extend_from_slice(&[0, 1, 0, 1]);
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&[0, 4]);
        r.extend_from_slice(&addr);
        r
    }

    fn cname_record(owner: &[u8], target: &[u8]) -> Vec<u8> {
        let mut r = owner.to_vec();
        r.extend_from_slice(&[0, 5, 0, 1, 0, 0, 0, 60]);
        r.extend_from_slice(&(target.len() as u16).to_be_bytes());
        r.extend_from_slice(target);
        r
    }

    #[test]
    fn pointers_to_names_read_before_are_followed_case_blind() {
        // Owner: a pointer to the question; CNAME target `B.Example.` as a label plus a
        // pointer into the question's suffix; then an A record owned by that target.
        let target_at = 12 + QUESTION.len() + 12;
        let msg = [
            header(2),
            QUESTION.to_vec(),
            cname_record(&[0xc0, 12], b"\x01B\xc0\x0e"),
            a_record(&[0xc0, target_at as u8], 300, [192, 0, 2, 1]),
        ]
        .concat();
        let view = read_answer(&msg).expect("the common shape");
        let [cname, a] = view.records() else {
            panic!("two records")
        };
        assert!(view.same_name(cname.owner, view.qname));
        let RecordData::Cname(target) = cname.data else {
            panic!("a CNAME")
        };
        assert!(view.same_name(a.owner, target));
        assert!(view.name_is(target, "b.example"));
        assert!(!view.same_name(target, view.qname));
        let texts: Vec<&[u8]> = labels(&msg, target).collect();
        assert_eq!(texts, [&b"B"[..], b"example"]);
        assert_eq!(a.data, RecordData::Address(IpAddr::from([192, 0, 2, 1])));
        assert_eq!(a.ttl, 300);
    }

    #[test]
    fn pointers_anywhere_else_are_left_to_hickory() {
        let with_owner = |owner: &[u8]| {
            [
                header(1),
                QUESTION.to_vec(),
                a_record(owner, 1, [192, 0, 2, 1]),
            ]
            .concat()
        };
        assert!(read_answer(&with_owner(&[0xc0, 12])).is_some());
        for owner in [
            &[0xc0, 0][..],   // into the header
            &[0xc0, 13],      // into a label's text
            &[0xc0, 22],      // at the question's root label
            &[0xc0, 27],      // at itself
            &[0xc0, 200],     // past the end
            &[0x80, 12],      // a reserved label type
            b"\x01x\xc0\x1b", // a label, then a pointer at its own name
        ] {
            assert_eq!(read_answer(&with_owner(owner)), None, "{owner:?}");
        }
    }

    #[test]
    fn names_match_dotted_text_label_by_label() {
        let msg = [
            header(0),
            b"\x03WwW\x07example\x03com\x00\x0bwww.example\x03com\x00".to_vec(),
        ]
        .concat();
        let mut names = NameReader::new(&msg);
        let (plain, at) = names.read(HEADER_LEN, false).unwrap();
        let (dotted_label, _) = names.read(at, false).unwrap();
        assert!(name_is(&msg, plain, "www.example.com"));
        for other in [
            "www.example",
            "www.example.co",
            "www.example.com.x",
            "wwwexample.com",
            "",
        ] {
            assert!(!name_is(&msg, plain, other), "{other}");
        }
        assert!(!name_is(&msg, dotted_label, "www.example.com"));
        assert!(!same_name(&msg, plain, dotted_label));
    }

    #[test]
    fn readers_never_read_past_the_end() {
        let msg = [
            header(1),
            QUESTION.to_vec(),
            a_record(&[0xc0, 12], 1, [192, 0, 2, 1]),
        ]
        .concat();
        for len in 0..msg.len() {
            assert_eq!(read_answer(&msg[..len]), None, "cut at {len}");
            assert_eq!(read_query(&msg[..len]), None, "cut at {len}");
        }
    }
}
