//! DNS policy of the per-container resolver: which questions go upstream, and which addresses
//! of an answer the firewall learns, all decided on bytes and values with no I/O at all.
//!
//! The builtin DNS tier runs one small resolver inside the container's network namespace. It
//! answers only allowlisted names, forwards them upstream and puts every address of the answer
//! into the DNS-learned nft sets *before* the client sees the answer, so the first connection
//! already passes. Everything that decides anything in that loop lives here, so the rules are
//! unit- and property-tested without sockets, clocks or nft:
//!
//! - [`DnsPolicy`] is built from the container's [`Bundle`] (profile entries and live allows,
//!   minus live denies) and decides per question ([`DnsPolicy::decide_query`]).
//! - [`inspect_request`] validates a client query (one question of class IN, a name we can
//!   represent) and [`refused_response`] answers the ones we refuse, with an RFC 8914 Extended
//!   DNS Error when the client speaks EDNS, so tools can tell "blocked" from "broken".
//! - [`extract_answer`] checks that an upstream answer belongs to the request, follows the
//!   CNAME chain from the queried name only, clamps TTLs, refuses DNS rebinding (a public name
//!   must not point the workload at a private or host-local address the user did not allow)
//!   and returns the set inserts plus the bytes to hand to the client.
//!
//! The common shapes of queries and answers are read in place by [`super::dns_wire`] (no
//! allocation, on the path of every answer); everything else is parsed with `hickory-proto`,
//! and both readers feed one decision, held to each other by differential tests and fuzzing.
//! Replies are built with hickory, except the 12-byte header of replies to messages hickory
//! cannot parse, and the message ID.

use std::net::IpAddr;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::opt::EdnsOption;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use ipnet::IpNet;
use thiserror::Error;

use super::bundle::Bundle;
use super::policy::Mode;
use super::private::is_rebinding_sensitive;
use super::ruleset::sets;
use super::target::{DomainName, DomainPattern, Host, PortScope, Target};

/// Longest CNAME chain followed from the queried name; longer chains are cut (recursive
/// resolvers give up at about this depth too), so a hostile answer cannot make us loop.
pub const MAX_CNAME_CHAIN: usize = 16;

/// EDNS option code of an Extended DNS Error (RFC 8914).
pub const EDNS_EDE: u16 = 15;

/// Extended DNS Error INFO-CODE 15 "Blocked": refused by the operator's security policy.
pub const EDE_BLOCKED: u16 = 15;

/// EXTRA-TEXT of our Extended DNS Errors: names the component, so a user reading `dig` output
/// knows the shield (not the upstream resolver) refused the name.
pub const EDE_TEXT: &str = "blocked by terok-shield";

/// UDP payload size advertised in the OPT records we write (the DNS Flag Day 2020 value, which
/// avoids IP fragmentation on every common path).
pub const OUR_UDP_PAYLOAD: u16 = 1232;

/// The classic DNS UDP limit, which applies to clients that did not send EDNS.
const CLASSIC_UDP_PAYLOAD: u16 = 512;

/// One allowlisted domain pattern and the ports it opens (`None`: every port).
///
/// Kept as the pair the user wrote, so the resolver can log which entry let a name through and
/// put the learned addresses into the service sets when the entry is port-scoped.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Grant {
    /// The allowlist entry's name pattern, as written (exact name or `*.` wildcard).
    pub pattern: DomainPattern,
    /// The entry's port scope; decides between the `dns_*` and `dns_svc_*` sets.
    pub scope: Option<PortScope>,
}

/// Why a question is not forwarded; shown in the resolver's log so a user can fix the profile.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RefuseReason {
    /// The container is in block mode: nothing but loopback, so no name resolves either.
    #[error("the container is in block mode")]
    BlockMode,
    /// A meta or transfer type (ANY, AXFR, IXFR, OPT, TSIG, ...) that a workload never needs
    /// and that only amplifies or probes.
    #[error("query type {0} is not served")]
    QueryType(RecordType),
    /// A live `deny` of this name (or of a wildcard covering it) wins over every allow.
    #[error("denied by `deny {0}`")]
    Denied(DomainPattern),
    /// No allowlisted pattern covers the name (default-deny mode).
    #[error("not on the allowlist")]
    NotAllowlisted,
}

/// What to do with one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryDecision {
    /// Forward upstream. The grants that matched say which ports the learned addresses open;
    /// the list is empty only in bypass mode, where unlisted names resolve but teach nothing.
    Forward(Vec<Grant>),
    /// Answer REFUSED ([`refused_response`]) without asking upstream.
    Refuse(RefuseReason),
}

/// The resolver's view of one container's policy: allowed patterns, denied patterns and the
/// allowlisted networks that decide which private answers may pass.
///
/// Built from the same bundle fields as [`Bundle::policy`], with the same treatment of live
/// denies, so the builtin tier and the static tier open the same names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsPolicy {
    mode: Mode,
    /// Allowed patterns that no live deny switched off, sorted and without repeats.
    grants: Vec<Grant>,
    /// Live denies of domains: a query they match is refused even if a wider allow covers it.
    denied: Vec<DomainPattern>,
    /// Allowlisted networks (profile entries and live allows) with their port scopes.
    allow_nets: Vec<(IpNet, Option<PortScope>)>,
    /// Live denies of networks; they win over everything in the ruleset, so never learned.
    deny_nets: Vec<IpNet>,
}

impl DnsPolicy {
    /// The DNS policy of a container: (profile entries ∪ live allows) − live denies.
    ///
    /// A domain entry is dropped exactly when [`Bundle::policy`] drops it (a live deny of the
    /// same name, or a wildcard deny covering it). In addition, a question matched by any live
    /// domain deny is refused, so `deny a.example.org` holds even while `*.example.org` is
    /// allowed: a specific deny beats a broader allow, as users expect.
    pub fn from_bundle(bundle: &Bundle) -> DnsPolicy {
        let mut grants = Vec::new();
        let mut allow_nets = Vec::new();
        for target in bundle.entries.iter().chain(&bundle.live_allow) {
            match &target.host {
                Host::Domain(pattern) => {
                    if !denied_domain(&bundle.live_deny, target) {
                        grants.push(Grant {
                            pattern: pattern.clone(),
                            scope: target.scope,
                        });
                    }
                }
                Host::Net(net) => allow_nets.push((*net, target.scope)),
            }
        }
        grants.sort();
        grants.dedup();
        let mut denied = Vec::new();
        let mut deny_nets = Vec::new();
        for target in &bundle.live_deny {
            match &target.host {
                Host::Domain(pattern) => denied.push(pattern.clone()),
                Host::Net(net) => deny_nets.push(*net),
            }
        }
        DnsPolicy {
            mode: bundle.mode,
            grants,
            denied,
            allow_nets,
            deny_nets,
        }
    }

    /// The mode this policy was built for; the resolver reports it in its status line.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The allowed patterns in force, so `status` can show what the resolver will answer.
    pub fn grants(&self) -> &[Grant] {
        &self.grants
    }

    /// Live denies of domains, for resolvers configured from this policy (dnsmasq).
    pub fn denied(&self) -> &[DomainPattern] {
        &self.denied
    }

    /// Whether to forward a question for `qname` of type `qtype`, and which grants it uses.
    ///
    /// `*.example.com` covers names strictly beneath `example.com`, never the apex; a plain
    /// name covers itself only. `qname` is already lower case (it is a [`DomainName`]), which
    /// makes the comparison case-insensitive with respect to the wire.
    pub fn decide_query(&self, qname: &DomainName, qtype: RecordType) -> QueryDecision {
        match self.refusal(qname, qtype) {
            Some(why) => QueryDecision::Refuse(why),
            None => QueryDecision::Forward(
                self.grants
                    .iter()
                    .filter(|g| g.pattern.matches(qname))
                    .cloned()
                    .collect(),
            ),
        }
    }

    /// The port scopes an answer to this question may open (reduced, as the sets take them),
    /// or why the question is refused: [`DnsPolicy::decide_query`] without cloning grants,
    /// for the resolver's check of every answer.
    pub fn answer_scopes(
        &self,
        qname: &DomainName,
        qtype: RecordType,
    ) -> Result<Vec<Option<PortScope>>, RefuseReason> {
        match self.refusal(qname, qtype) {
            Some(why) => Err(why),
            None => Ok(reduce_scopes(
                self.grants
                    .iter()
                    .filter(|g| g.pattern.matches(qname))
                    .map(|g| g.scope),
            )),
        }
    }

    /// Why [`DnsPolicy::decide_query`] refuses the question, if it does; without collecting
    /// the grants, for the resolver's per-question check (it forwards the question as is).
    pub fn refusal(&self, qname: &DomainName, qtype: RecordType) -> Option<RefuseReason> {
        if self.mode == Mode::Block {
            return Some(RefuseReason::BlockMode);
        }
        if !is_servable_type(qtype) {
            return Some(RefuseReason::QueryType(qtype));
        }
        if let Some(deny) = self.denied.iter().find(|p| p.matches(qname)) {
            return Some(RefuseReason::Denied(deny.clone()));
        }
        let allowed = || self.grants.iter().any(|g| g.pattern.matches(qname));
        if self.mode == Mode::DenyAll && !allowed() {
            return Some(RefuseReason::NotAllowlisted);
        }
        None
    }

    /// Whether a live deny covers `addr`: the deny sets drop it before any DNS set is looked
    /// at, so learning it would only clutter the sets.
    fn denies_addr(&self, addr: IpAddr) -> bool {
        self.deny_nets.iter().any(|n| n.contains(&addr))
    }

    /// Whether a rebinding-sensitive address may stay in an answer: an allowlisted network
    /// contains it (whatever its ports) and no live deny does.
    fn allowlists(&self, addr: IpAddr) -> bool {
        !self.denies_addr(addr) && self.allow_nets.iter().any(|(n, _)| n.contains(&addr))
    }

    /// The scopes under which a rebinding-sensitive address may be learned: only the ports both
    /// the matching domain grant and an allowlisted network containing the address open, so a
    /// name never widens what the user opened on a private address.
    fn sensitive_scopes(
        &self,
        addr: IpAddr,
        grants: &[Option<PortScope>],
    ) -> Vec<Option<PortScope>> {
        if self.denies_addr(addr) {
            return Vec::new();
        }
        reduce_scopes(
            self.allow_nets
                .iter()
                .filter(|(n, _)| n.contains(&addr))
                .flat_map(|(_, net_scope)| {
                    grants
                        .iter()
                        .filter_map(move |g| intersect_scopes(*g, *net_scope))
                }),
        )
    }
}

/// Same rule as `Bundle::policy` (kept in step by a test): a domain target is switched off by a
/// live deny of that name, or by a wildcard deny covering it.
fn denied_domain(live_deny: &[Target], target: &Target) -> bool {
    let Host::Domain(d) = &target.host else {
        return false;
    };
    live_deny.iter().any(|t| match &t.host {
        Host::Domain(deny) if deny.wildcard => {
            deny.name.is_parent_of(&d.name) || (d.wildcard && deny.name == d.name)
        }
        Host::Domain(deny) => !d.wildcard && deny.name == d.name,
        Host::Net(_) => false,
    })
}

/// Data types only: meta and transfer types (0, OPT, 128-255 with AXFR, IXFR, ANY, TSIG) are
/// refused, since no workload needs them and they serve amplification or zone probing.
fn is_servable_type(qtype: RecordType) -> bool {
    let code = u16::from(qtype);
    code != 0 && qtype != RecordType::OPT && !(128..=255).contains(&code)
}

/// Whether `wide` opens at least everything `narrow` opens.
fn scope_covers(wide: Option<PortScope>, narrow: Option<PortScope>) -> bool {
    match (wide, narrow) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(w), Some(n)) => {
            w.port == n.port && (w.protocol.is_none() || w.protocol == n.protocol)
        }
    }
}

/// What two scopes both open, if anything.
fn intersect_scopes(a: Option<PortScope>, b: Option<PortScope>) -> Option<Option<PortScope>> {
    match (a, b) {
        (None, x) | (x, None) => Some(x),
        (Some(a), Some(b)) if a.port != b.port => None,
        (Some(a), Some(b)) => match (a.protocol, b.protocol) {
            (None, p) | (p, None) => Some(Some(PortScope {
                port: a.port,
                protocol: p,
            })),
            (Some(p), Some(q)) if p == q => Some(Some(a)),
            _ => None,
        },
    }
}

/// The distinct scopes, minus those another one already covers (`None` swallows all), so an
/// address is learned once per set element that actually adds access.
fn reduce_scopes(scopes: impl IntoIterator<Item = Option<PortScope>>) -> Vec<Option<PortScope>> {
    let mut all: Vec<Option<PortScope>> = scopes.into_iter().collect();
    all.sort();
    all.dedup();
    all.iter()
        .filter(|s| !all.iter().any(|o| o != *s && scope_covers(*o, **s)))
        .copied()
        .collect()
}

/// The nft set a learned address goes into: the plain DNS sets for whole-host grants, the
/// service sets (address . protocol . port) for port-scoped ones.
pub fn set_for(addr: IpAddr, scope: Option<PortScope>) -> &'static str {
    match (addr, scope) {
        (IpAddr::V4(_), None) => sets::DNS_V4,
        (IpAddr::V6(_), None) => sets::DNS_V6,
        (IpAddr::V4(_), Some(_)) => sets::DNS_SVC_V4,
        (IpAddr::V6(_), Some(_)) => sets::DNS_SVC_V6,
    }
}

/// A validated client query: everything the resolver needs to decide and to reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The message ID; an upstream answer must carry it (see [`with_id`] for forwarding under
    /// a fresh ID).
    pub id: u16,
    /// The single question's name, normalised (lower case, no trailing dot).
    pub qname: DomainName,
    /// The single question's type.
    pub qtype: RecordType,
    /// Whether the client sent an OPT record; only then may a reply carry one (RFC 6891).
    pub edns: bool,
    /// Largest UDP reply the client accepts: its EDNS payload size, at least 512. A larger
    /// answer must go back truncated ([`truncated_response`]) so the client retries over TCP.
    pub udp_payload: u16,
    /// RD flag, echoed in our replies.
    pub recursion_desired: bool,
}

/// Why a client message is not a servable query, with the reply to send (if any).
///
/// Replies are pre-built because a refused message may not yield a [`Request`]; messages that
/// are not queries at all get no reply, so the resolver can never be bounced off itself.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Malformed {
    /// Shorter than a DNS header, or a response (QR set): dropped silently.
    #[error("not a DNS query")]
    NotAQuery,
    /// The header is readable but the message is not: answered FORMERR (header only).
    #[error("unparsable DNS message")]
    Unparsable {
        /// FORMERR header echoing the ID, so the client fails at once instead of retrying.
        reply: Vec<u8>,
    },
    /// An opcode other than QUERY (NOTIFY, UPDATE, ...): answered NOTIMP.
    #[error("DNS opcode {opcode} is not served")]
    OpCode {
        /// The opcode the client used, for the log.
        opcode: u8,
        /// NOTIMP reply.
        reply: Vec<u8>,
    },
    /// Zero or several questions: answered REFUSED (exactly one is served).
    #[error("{count} questions in one query (exactly one is served)")]
    QuestionCount {
        /// How many questions the message carried.
        count: usize,
        /// REFUSED reply (with the EDE when the client sent EDNS).
        reply: Vec<u8>,
    },
    /// A class other than IN (CHAOS `version.bind` probes, ...): answered REFUSED.
    #[error("DNS class {class} is not served")]
    Class {
        /// The class asked for, for the log.
        class: DNSClass,
        /// REFUSED reply (with the EDE when the client sent EDNS).
        reply: Vec<u8>,
    },
    /// A name no allowlist entry can match (root, non-LDH bytes, over-long): REFUSED.
    #[error("query name is not a valid host name")]
    Name {
        /// REFUSED reply (with the EDE when the client sent EDNS).
        reply: Vec<u8>,
    },
}

impl Malformed {
    /// The bytes to send back to the client, or `None` when the message must be dropped.
    pub fn reply(&self) -> Option<&[u8]> {
        match self {
            Malformed::NotAQuery => None,
            Malformed::Unparsable { reply }
            | Malformed::OpCode { reply, .. }
            | Malformed::QuestionCount { reply, .. }
            | Malformed::Class { reply, .. }
            | Malformed::Name { reply } => Some(reply),
        }
    }
}

/// Validate a client query: a standard QUERY with exactly one question of class IN for a
/// name [`DomainName`] accepts. Never panics on any input.
///
/// The common shape is read in place ([`inspect_request_fast`]); everything else is parsed by
/// hickory ([`inspect_request_hickory`]), with the same result either way.
pub fn inspect_request(bytes: &[u8]) -> Result<Request, Malformed> {
    match inspect_request_fast(bytes) {
        Some(req) => Ok(req),
        None => inspect_request_hickory(bytes),
    }
}

/// The [`Request`] of a query of the common shape, read in place without building hickory's
/// types: one uncompressed question of class IN, at most an OPT record without options, and
/// nothing else ([`read_query`](super::dns_wire::read_query)). `None` for any other message,
/// including every one [`inspect_request`] refuses; when it answers,
/// [`inspect_request_hickory`] gives the same `Request`.
pub fn inspect_request_fast(bytes: &[u8]) -> Option<Request> {
    let query = super::dns_wire::read_query(bytes)?;
    Some(Request {
        id: query.id,
        qname: domain_from_labels(query.qname_labels())?,
        qtype: RecordType::from(query.qtype),
        edns: query.opt.is_some(),
        udp_payload: query.opt.map_or(CLASSIC_UDP_PAYLOAD, |opt| {
            opt.udp_payload.max(CLASSIC_UDP_PAYLOAD)
        }),
        recursion_desired: query.recursion_desired,
    })
}

/// [`inspect_request`] by hickory's parser alone: every message, whatever its shape.
pub fn inspect_request_hickory(bytes: &[u8]) -> Result<Request, Malformed> {
    let Some(header) = super::dns_wire::Header::read(bytes).filter(|h| !h.is_response()) else {
        return Err(Malformed::NotAQuery);
    };
    let (id, opcode, rd) = (header.id, header.opcode(), header.recursion_desired());
    if opcode != 0 {
        return Err(Malformed::OpCode {
            opcode,
            reply: header_only(id, opcode, rd, ResponseCode::NotImp),
        });
    }
    let Ok(msg) = Message::from_vec(bytes) else {
        return Err(Malformed::Unparsable {
            reply: header_only(id, opcode, rd, ResponseCode::FormErr),
        });
    };
    let edns = msg.edns.is_some();
    let refuse = || {
        error_reply(
            id,
            rd,
            msg.queries.clone(),
            ResponseCode::Refused,
            edns,
            true,
        )
    };
    let [question] = msg.queries.as_slice() else {
        return Err(Malformed::QuestionCount {
            count: msg.queries.len(),
            reply: refuse(),
        });
    };
    if question.query_class() != DNSClass::IN {
        return Err(Malformed::Class {
            class: question.query_class(),
            reply: refuse(),
        });
    }
    let Some(qname) = domain_of(question.name()) else {
        return Err(Malformed::Name { reply: refuse() });
    };
    let udp_payload = match &msg.edns {
        Some(e) => e.max_payload().max(CLASSIC_UDP_PAYLOAD),
        None => CLASSIC_UDP_PAYLOAD,
    };
    Ok(Request {
        id,
        qname,
        qtype: question.query_type(),
        edns,
        udp_payload,
        recursion_desired: rd,
    })
}

/// The REFUSED answer to `req` (whose raw bytes are `raw`): the question echoed exactly as the
/// client wrote it (so case-randomising clients accept it), plus an Extended DNS Error
/// "Blocked" (RFC 8914) when the client sent EDNS; without EDNS no OPT record may be added.
pub fn refused_response(req: &Request, raw: &[u8]) -> Vec<u8> {
    reply_to(req, raw, ResponseCode::Refused, true, false)
}

/// The SERVFAIL answer to `req`, for when upstream gave no usable answer in time (or only
/// answers that [`extract_answer`] rejected): clients fail fast instead of timing out.
pub fn servfail_response(req: &Request, raw: &[u8]) -> Vec<u8> {
    reply_to(req, raw, ResponseCode::ServFail, false, false)
}

/// An empty NOERROR answer with TC set, for an answer larger than `req.udp_payload`: the client
/// retries over TCP, where the full answer fits.
pub fn truncated_response(req: &Request, raw: &[u8]) -> Vec<u8> {
    reply_to(req, raw, ResponseCode::NoError, false, true)
}

/// A copy of `msg` with its ID replaced, for forwarding a query upstream under a fresh random
/// ID and giving the answer back the client's ID (the client's ID is chosen by the workload, so
/// using it upstream would make spoofed answers easy to forge).
pub fn with_id(msg: &[u8], id: u16) -> Vec<u8> {
    let mut out = msg.to_vec();
    if out.len() >= 2 {
        out[..2].copy_from_slice(&id.to_be_bytes());
    }
    out
}

/// Upstream answer that cannot be used; the resolver drops it and keeps waiting for the real
/// one (or answers [`servfail_response`] at its deadline).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Mismatch {
    /// hickory-proto could not parse it: nothing in it can be trusted.
    #[error("unparsable answer")]
    Unparsable,
    /// Another query's answer, or a spoofing attempt.
    #[error("answer ID {found:#06x} does not match the query's {expected:#06x}")]
    Id {
        /// The request's ID.
        expected: u16,
        /// The answer's ID.
        found: u16,
    },
    /// A query, or a response to another opcode: not an answer at all.
    #[error("not a standard query response")]
    NotAResponse,
    /// Not exactly our one question (name, type, class IN): addresses in it belong to a
    /// question we did not decide on.
    #[error("answer is for another question")]
    Question,
    /// Records had to be removed but the edited answer could not be serialised; forwarding the
    /// original would hand out what we meant to remove.
    #[error("filtered answer could not be encoded")]
    Unencodable,
}

/// One address to put into a DNS-learned set before the answer goes to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// The learned address (A or AAAA) of the answer.
    pub addr: IpAddr,
    /// `Some`: a port-scoped grant; the caller adds one `dns_svc_*` element per protocol of
    /// [`PortScope::protocols`]. `None`: the whole host, in `dns_v4` / `dns_v6`.
    pub scope: Option<PortScope>,
    /// Element timeout: the record's TTL clamped to the configured bounds.
    pub ttl: Duration,
    /// The queried name this address was learned for (not a CNAME target), for the audit log
    /// and for removing what a name brought when it is denied later.
    pub domain: DomainName,
}

impl Insert {
    /// The set this insert belongs in ([`set_for`]).
    pub fn set(&self) -> &'static str {
        set_for(self.addr, self.scope)
    }
}

/// A usable upstream answer, processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Set elements to add (each address once per scope), before replying.
    pub inserts: Vec<Insert>,
    /// The bytes for the client: the upstream bytes unchanged, unless addresses were removed
    /// or TTLs of learned records exceeded the maximum (then re-encoded, with the TTLs capped
    /// so a client cache never outlives the set element). Check the size against
    /// [`Request::udp_payload`] before sending over UDP.
    pub response: Vec<u8>,
    /// The addresses the client gets for the name (its CNAME chain's, less those removed),
    /// each once: which name led to an address the firewall logs, when nothing is learned
    /// (bypass modes).
    pub named: Vec<IpAddr>,
    /// Addresses removed from the answer by the rebinding rule, each once.
    pub removed: Vec<IpAddr>,
}

/// What to do with one upstream answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerDecision {
    /// Insert, then send `response` to the client.
    Answer(Answer),
    /// The answer was truncated: ask the same question again over TCP; nothing is learned
    /// from a partial answer.
    RetryOverTcp,
    /// The policy changed while the question was upstream and no longer allows it: answer
    /// [`refused_response`].
    Refused(RefuseReason),
    /// Not an answer to this request: drop it.
    Reject(Mismatch),
}

/// Process an upstream answer to `req` under `policy`; `ttl_bounds` is (min, max) seconds
/// (`DnsConfig::min_ttl`, `max_ttl`; should min exceed max, max wins).
///
/// Only A/AAAA records in the answer section owned by the queried name or a name reached from
/// it through CNAMEs (at most [`MAX_CNAME_CHAIN`], loops cut) are learned, and only from a
/// NOERROR answer; records about other names are never learned. Rebinding-sensitive addresses
/// ([`is_rebinding_sensitive`]) are learned only for the ports an allowlisted network also
/// opens, and are removed from every section of the answer unless an allowlisted network
/// contains them (in `down --all` mode they stay in the answer but are still not learned).
/// Never panics on any input.
///
/// The common shape is read in place ([`extract_answer_fast`]); everything else is parsed by
/// hickory ([`extract_answer_hickory`]). Both only gather the facts of the answer, and one
/// function (`decide_answer`) decides on them, so the policy exists once.
pub fn extract_answer(
    upstream: &[u8],
    req: &Request,
    policy: &DnsPolicy,
    ttl_bounds: (u32, u32),
) -> AnswerDecision {
    extract_answer_fast(upstream, req, policy, ttl_bounds)
        .unwrap_or_else(|| extract_answer_hickory(upstream, req, policy, ttl_bounds))
}

/// What [`decide_answer`] needs to know of an upstream answer, gathered by either reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AnswerFacts<'f> {
    /// The message ID.
    id: u16,
    /// QR set and opcode QUERY.
    standard_response: bool,
    /// Exactly one question, and it is the request's (type, class IN, name in any case).
    question_matches: bool,
    /// TC set.
    truncated: bool,
    /// The response code (with its EDNS upper bits) is NOERROR.
    no_error: bool,
    /// A/AAAA records of class IN in the answer section owned by a name of the CNAME chain,
    /// in answer order, each address once with the longest TTL it was given.
    learned: &'f [(IpAddr, u32)],
    /// Rebinding-sensitive addresses of every section, in message order, each once.
    sensitive: &'f [IpAddr],
    /// Longest TTL of the answer section's A, AAAA and CNAME records owned by a chain name
    /// (0 when there are none): above the maximum, the client's copy must be capped.
    chain_max_ttl: u32,
}

/// How the client's copy of an answer must differ from the upstream bytes.
struct Rewrite<'r> {
    /// Addresses whose records are removed from every section.
    removed: &'r [IpAddr],
    /// The TTL cap for the chain's records, when one is needed.
    ttl_cap: Option<u32>,
}

/// The policy applied to the facts of an answer: the one place [`extract_answer`] decides.
///
/// `rewrite` produces the client's bytes when they cannot be the upstream bytes: `None` when
/// the reader that gathered the facts cannot rewrite (the fast path then gives up and hickory
/// reads the answer), else the bytes or why none can be sent.
fn decide_answer(
    facts: &AnswerFacts,
    upstream: &[u8],
    req: &Request,
    policy: &DnsPolicy,
    ttl_bounds: (u32, u32),
    rewrite: impl FnOnce(&Rewrite) -> Option<Result<Vec<u8>, Mismatch>>,
) -> Option<AnswerDecision> {
    if facts.id != req.id {
        return Some(AnswerDecision::Reject(Mismatch::Id {
            expected: req.id,
            found: facts.id,
        }));
    }
    if !facts.standard_response {
        return Some(AnswerDecision::Reject(Mismatch::NotAResponse));
    }
    if !facts.question_matches {
        return Some(AnswerDecision::Reject(Mismatch::Question));
    }
    if facts.truncated {
        return Some(AnswerDecision::RetryOverTcp);
    }
    let scopes = match policy.answer_scopes(&req.qname, req.qtype) {
        Ok(scopes) => scopes,
        Err(reason) => return Some(AnswerDecision::Refused(reason)),
    };

    let mut inserts = Vec::new();
    if facts.no_error {
        for &(addr, ttl) in facts.learned {
            if policy.denies_addr(addr) {
                continue;
            }
            let ttl = Duration::from_secs(u64::from(clamp_ttl(ttl, ttl_bounds)));
            let narrowed;
            // `sensitive` lists every rebinding-sensitive address of the message, so this is
            // `is_rebinding_sensitive(addr)` without testing the private ranges again.
            let here = if facts.sensitive.contains(&addr) {
                narrowed = policy.sensitive_scopes(addr, &scopes);
                &narrowed
            } else {
                &scopes
            };
            inserts.extend(here.iter().map(|&scope| Insert {
                addr,
                scope,
                ttl,
                domain: req.qname.clone(),
            }));
        }
    }

    let removed: Vec<IpAddr> = facts
        .sensitive
        .iter()
        .copied()
        .filter(|addr| policy.mode != Mode::BypassAll && !policy.allowlists(*addr))
        .collect();
    let max_ttl = clamp_ttl(u32::MAX, ttl_bounds);
    let cap = !inserts.is_empty() && facts.chain_max_ttl > max_ttl;

    let response = if removed.is_empty() && !cap {
        upstream.to_vec()
    } else {
        let wanted = Rewrite {
            removed: &removed,
            ttl_cap: cap.then_some(max_ttl),
        };
        match rewrite(&wanted)? {
            Ok(bytes) => bytes,
            Err(mismatch) => return Some(AnswerDecision::Reject(mismatch)),
        }
    };
    let named = facts
        .learned
        .iter()
        .map(|(addr, _)| *addr)
        .filter(|addr| !removed.contains(addr))
        .collect();
    Some(AnswerDecision::Answer(Answer {
        inserts,
        response,
        named,
        removed,
    }))
}

/// `learned` with `addr` (seen with `ttl`) added, or its TTL raised: [`AnswerFacts::learned`].
fn learn(learned: &mut [(IpAddr, u32)], count: &mut usize, addr: IpAddr, ttl: u32) -> Option<()> {
    match learned[..*count].iter_mut().find(|(a, _)| *a == addr) {
        Some((_, longest)) => *longest = (*longest).max(ttl),
        None => {
            *learned.get_mut(*count)? = (addr, ttl);
            *count += 1;
        }
    }
    Some(())
}

/// [`extract_answer`] for an answer of the common shape (see
/// [`read_answer`](super::dns_wire::read_answer)) that can go to the client as it came: read in
/// place, without parsing it into hickory's types. `None` for every other answer, and for one
/// whose records would have to be removed or TTLs capped. When it answers,
/// [`extract_answer_hickory`] gives the same decision.
pub fn extract_answer_fast(
    upstream: &[u8],
    req: &Request,
    policy: &DnsPolicy,
    ttl_bounds: (u32, u32),
) -> Option<AnswerDecision> {
    use super::dns_wire::{read_answer, RecordData, WireName, CLASS_IN, MAX_ANSWERS};

    let view = read_answer(upstream)?;
    let question_matches = view.qclass == CLASS_IN
        && RecordType::from(view.qtype) == req.qtype
        && view.name_is(view.qname, req.qname.as_str());

    // The CNAME chain from the question, as `cname_chain` follows it (every record is IN).
    let mut chain = [view.qname; MAX_CNAME_CHAIN + 1];
    let mut chain_len = 1;
    while chain_len <= MAX_CNAME_CHAIN {
        let owner = chain[chain_len - 1];
        let next = view.records().iter().find_map(|r| match r.data {
            RecordData::Cname(target) if view.same_name(r.owner, owner) => Some(target),
            _ => None,
        });
        match next {
            Some(target)
                if !chain[..chain_len]
                    .iter()
                    .any(|c| view.same_name(*c, target)) =>
            {
                chain[chain_len] = target;
                chain_len += 1;
            }
            _ => break,
        }
    }
    let on_chain = |name: WireName| chain[..chain_len].iter().any(|c| view.same_name(*c, name));

    let unset = (IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);
    let mut learned = [unset; MAX_ANSWERS];
    let mut learned_len = 0;
    let mut sensitive = [unset.0; MAX_ANSWERS];
    let mut sensitive_len = 0;
    let mut chain_max_ttl = 0;
    for record in view.records() {
        let chained = on_chain(record.owner);
        if chained {
            chain_max_ttl = chain_max_ttl.max(record.ttl);
        }
        if let RecordData::Address(addr) = record.data {
            if chained {
                learn(&mut learned, &mut learned_len, addr, record.ttl)?;
            }
            if is_rebinding_sensitive(addr) && !sensitive[..sensitive_len].contains(&addr) {
                *sensitive.get_mut(sensitive_len)? = addr;
                sensitive_len += 1;
            }
        }
    }
    let header = view.header;
    let facts = AnswerFacts {
        id: header.id,
        // read_answer takes nothing else.
        standard_response: true,
        question_matches,
        truncated: header.truncated(),
        no_error: header.rcode_low() == 0 && view.opt.is_none_or(|opt| opt.rcode_high == 0),
        learned: &learned[..learned_len],
        sensitive: &sensitive[..sensitive_len],
        chain_max_ttl,
    };
    decide_answer(&facts, upstream, req, policy, ttl_bounds, |_| None)
}

/// [`extract_answer`] by hickory's parser alone: every answer, whatever its shape, and the
/// only path that re-encodes one.
pub fn extract_answer_hickory(
    upstream: &[u8],
    req: &Request,
    policy: &DnsPolicy,
    ttl_bounds: (u32, u32),
) -> AnswerDecision {
    let Ok(mut msg) = Message::from_vec(upstream) else {
        return AnswerDecision::Reject(Mismatch::Unparsable);
    };
    let question = match msg.queries.as_slice() {
        [q] if q.query_class() == DNSClass::IN
            && q.query_type() == req.qtype
            && domain_of(q.name()).as_ref() == Some(&req.qname) =>
        {
            Some(q.name().clone())
        }
        _ => None,
    };
    let chain = question
        .as_ref()
        .map(|qname| cname_chain(&msg.answers, qname))
        .unwrap_or_default();

    // Addresses of the chain, in answer order, each with the longest TTL it was given.
    let mut learned: Vec<(IpAddr, u32)> = Vec::new();
    for rec in &msg.answers {
        if rec.dns_class != DNSClass::IN || !chain.contains(&rec.name) {
            continue;
        }
        let Some(ip) = address_of(rec) else { continue };
        match learned.iter_mut().find(|(a, _)| *a == ip) {
            Some((_, ttl)) => *ttl = (*ttl).max(rec.ttl),
            None => learned.push((ip, rec.ttl)),
        }
    }
    let mut sensitive: Vec<IpAddr> = Vec::new();
    for ip in msg.all_sections().filter_map(address_of) {
        if is_rebinding_sensitive(ip) && !sensitive.contains(&ip) {
            sensitive.push(ip);
        }
    }
    let chain_max_ttl = msg
        .answers
        .iter()
        .filter(|r| chain.contains(&r.name) && is_chain_record(r))
        .map(|r| r.ttl)
        .max()
        .unwrap_or(0);
    let meta = msg.metadata;
    let facts = AnswerFacts {
        id: meta.id,
        standard_response: meta.message_type == MessageType::Response
            && meta.op_code == OpCode::Query,
        question_matches: question.is_some(),
        truncated: meta.truncation,
        no_error: meta.response_code == ResponseCode::NoError,
        learned: &learned,
        sensitive: &sensitive,
        chain_max_ttl,
    };
    let rewrite = |wanted: &Rewrite| {
        let keep = |r: &Record| address_of(r).is_none_or(|ip| !wanted.removed.contains(&ip));
        msg.answers.retain(keep);
        msg.authorities.retain(keep);
        msg.additionals.retain(keep);
        if let Some(max_ttl) = wanted.ttl_cap {
            for r in &mut msg.answers {
                if chain.contains(&r.name) && is_chain_record(r) {
                    r.ttl = r.ttl.min(max_ttl);
                }
            }
        }
        Some(match msg.to_vec() {
            Ok(bytes) => Ok(bytes),
            // Only capping was wanted: the original answer is still safe to hand out.
            Err(_) if wanted.removed.is_empty() => Ok(upstream.to_vec()),
            Err(_) => Err(Mismatch::Unencodable),
        })
    };
    // This rewrite always answers, so the decision is always made.
    decide_answer(&facts, upstream, req, policy, ttl_bounds, rewrite)
        .unwrap_or(AnswerDecision::Reject(Mismatch::Unencodable))
}

/// `ttl` within `(min, max)`; the upper bound wins if the bounds are inverted, because
/// over-long openings are the costlier mistake.
fn clamp_ttl(ttl: u32, (min, max): (u32, u32)) -> u32 {
    ttl.max(min).min(max)
}

/// The queried name followed by the CNAME targets reached from it, in order: one CNAME per
/// owner (the first one in the answer), stopping at a repeat or after [`MAX_CNAME_CHAIN`].
fn cname_chain(answers: &[Record], qname: &Name) -> Vec<Name> {
    let mut chain = vec![qname.clone()];
    while chain.len() <= MAX_CNAME_CHAIN {
        let owner = &chain[chain.len() - 1];
        let next = answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if r.dns_class == DNSClass::IN && &r.name == owner => {
                Some(target.0.clone())
            }
            _ => None,
        });
        match next {
            Some(target) if !chain.contains(&target) => chain.push(target),
            _ => break,
        }
    }
    chain
}

/// The address an A or AAAA record carries.
fn address_of(rec: &Record) -> Option<IpAddr> {
    match &rec.data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
        _ => None,
    }
}

/// Records whose TTL is capped in the answer: the chain's CNAMEs and addresses.
fn is_chain_record(rec: &Record) -> bool {
    matches!(rec.data, RData::A(_) | RData::AAAA(_) | RData::CNAME(_))
}

/// A wire name as a [`DomainName`], or `None` if a label holds anything but letters, digits,
/// `-` and `_` (a `.` inside a label, spaces, binary) or the name is otherwise not one we can
/// allowlist. Labels are read as bytes, so an escaped dot can never merge two labels.
fn domain_of(name: &Name) -> Option<DomainName> {
    domain_from_labels(name.iter())
}

/// [`domain_of`] for labels however they were read (hickory's `Name`, or the wire in place),
/// so both query paths normalise names by the very same rule.
fn domain_from_labels<'l>(labels: impl IntoIterator<Item = &'l [u8]>) -> Option<DomainName> {
    // Spelled out on the stack: a longer text is no `DomainName` anyway (253 characters).
    let mut text = [0u8; 256];
    let mut len = 0;
    for label in labels {
        if !label
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            return None;
        }
        let dot = usize::from(len > 0);
        let end = len + dot + label.len();
        if end > text.len() {
            return None;
        }
        if dot == 1 {
            text[len] = b'.';
        }
        text[len + dot..end].copy_from_slice(label);
        len = end;
    }
    std::str::from_utf8(&text[..len]).ok()?.parse().ok()
}

/// The RFC 8914 option: INFO-CODE (big endian), then UTF-8 EXTRA-TEXT. hickory-proto 0.26 has
/// no typed EDE, so it travels as a raw option.
fn ede_option(info_code: u16, text: &str) -> EdnsOption {
    let mut data = info_code.to_be_bytes().to_vec();
    data.extend_from_slice(text.as_bytes());
    EdnsOption::Unknown(EDNS_EDE, data)
}

/// A reply to `req` echoing the question from `raw` when it is the question `req` describes
/// (else rebuilt from `req`, lower case).
fn reply_to(req: &Request, raw: &[u8], rcode: ResponseCode, ede: bool, truncated: bool) -> Vec<u8> {
    let echoed = Message::from_vec(raw)
        .ok()
        .and_then(|m| match m.queries.as_slice() {
            [q] if q.query_type() == req.qtype
                && q.query_class() == DNSClass::IN
                && domain_of(q.name()).as_ref() == Some(&req.qname) =>
            {
                Some(q.clone())
            }
            _ => None,
        });
    let question = echoed.or_else(|| {
        let mut name = Name::from_ascii(req.qname.as_str()).ok()?;
        name.set_fqdn(true);
        Some(Query::query(name, req.qtype))
    });
    let mut msg = Message::error_msg(req.id, OpCode::Query, rcode);
    msg.metadata.recursion_desired = req.recursion_desired;
    msg.metadata.recursion_available = true;
    msg.metadata.truncation = truncated;
    msg.add_queries(question);
    finish_reply(msg, req.edns, ede)
}

/// A reply echoing `queries` (used where no [`Request`] exists yet).
fn error_reply(
    id: u16,
    rd: bool,
    queries: Vec<Query>,
    rcode: ResponseCode,
    client_edns: bool,
    ede: bool,
) -> Vec<u8> {
    let mut msg = Message::error_msg(id, OpCode::Query, rcode);
    msg.metadata.recursion_desired = rd;
    msg.metadata.recursion_available = true;
    msg.add_queries(queries);
    finish_reply(msg, client_edns, ede)
}

/// Add our OPT record (with the EDE when asked) if the client sent EDNS, and encode; should
/// encoding fail, the bare header still tells the client the outcome.
fn finish_reply(mut msg: Message, client_edns: bool, ede: bool) -> Vec<u8> {
    if client_edns {
        let mut edns = Edns::new();
        edns.set_max_payload(OUR_UDP_PAYLOAD);
        if ede {
            edns.options_mut().insert(ede_option(EDE_BLOCKED, EDE_TEXT));
        }
        msg.set_edns(edns);
    }
    let m = msg.metadata;
    msg.to_vec().unwrap_or_else(|_| {
        let mut bytes = header_only(m.id, 0, m.recursion_desired, m.response_code);
        if m.truncation {
            bytes[2] |= 0x02;
        }
        bytes
    })
}

/// A 12-byte reply header with no sections: for messages hickory cannot parse (or opcodes it
/// cannot represent), where echoing anything would mean trusting unparsed bytes.
fn header_only(id: u16, opcode: u8, rd: bool, rcode: ResponseCode) -> Vec<u8> {
    let mut h = vec![0u8; 12];
    h[..2].copy_from_slice(&id.to_be_bytes());
    h[2] = 0x80 | ((opcode & 0x0f) << 3) | u8::from(rd);
    h[3] = 0x80 | rcode.low();
    h
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use hickory_proto::rr::rdata::{A, AAAA, CNAME, TXT};
    use proptest::prelude::*;

    use super::*;
    use crate::core::bundle::{DnsTier, Resolved, RuntimeFacts};
    use crate::core::target::Protocol;

    const BOUNDS: (u32, u32) = (60, 3600);

    fn t(s: &str) -> Target {
        Target::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn dn(s: &str) -> DomainName {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn name(s: &str) -> Name {
        Name::from_ascii(format!("{s}.")).unwrap()
    }

    fn bundle(entries: &[&str], mode: Mode) -> Bundle {
        crate::core::bundle::test_bundle(entries, &[], mode, DnsTier::Builtin)
    }

    fn policy(entries: &[&str]) -> DnsPolicy {
        DnsPolicy::from_bundle(&bundle(entries, Mode::DenyAll))
    }

    fn forwards(p: &DnsPolicy, q: &str) -> bool {
        matches!(
            p.decide_query(&dn(q), RecordType::A),
            QueryDecision::Forward(_)
        )
    }

    fn a(owner: &str, ttl: u32, addr: &str) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A(addr.parse().unwrap())))
    }

    fn aaaa(owner: &str, ttl: u32, addr: &str) -> Record {
        Record::from_rdata(name(owner), ttl, RData::AAAA(AAAA(addr.parse().unwrap())))
    }

    fn cname(owner: &str, ttl: u32, target: &str) -> Record {
        Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
    }

    fn query_bytes(id: u16, qname: &str, qtype: RecordType, edns: bool) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(
            Name::from_ascii(format!("{qname}.")).unwrap(),
            qtype,
        ));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(4096);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn request(qname: &str, qtype: RecordType) -> (Request, Vec<u8>) {
        let raw = query_bytes(0x4242, qname, qtype, true);
        (inspect_request(&raw).unwrap(), raw)
    }

    fn answer_msg(req: &Request, raw: &[u8], answers: Vec<Record>) -> Message {
        let query = Message::from_vec(raw).unwrap();
        let mut m = Message::response(req.id, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.metadata.recursion_available = true;
        m.add_queries(query.queries.clone());
        m.add_answers(answers);
        m
    }

    fn answer_bytes(req: &Request, raw: &[u8], answers: Vec<Record>) -> Vec<u8> {
        answer_msg(req, raw, answers).to_vec().unwrap()
    }

    fn answered(d: AnswerDecision) -> Answer {
        match d {
            AnswerDecision::Answer(a) => a,
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    fn run(p: &DnsPolicy, qname: &str, answers: Vec<Record>) -> Answer {
        let (req, raw) = request(qname, RecordType::A);
        answered(extract_answer(
            &answer_bytes(&req, &raw, answers),
            &req,
            p,
            BOUNDS,
        ))
    }

    fn inserted(ans: &Answer) -> Vec<IpAddr> {
        ans.inserts.iter().map(|i| i.addr).collect()
    }

    fn addrs_in(bytes: &[u8]) -> Vec<IpAddr> {
        Message::from_vec(bytes)
            .unwrap()
            .all_sections()
            .filter_map(address_of)
            .collect()
    }

    fn ede_of(bytes: &[u8]) -> Option<(u16, String)> {
        let msg = Message::from_vec(bytes).unwrap();
        let edns = msg.edns?;
        match edns.options().get(EDNS_EDE.into())? {
            EdnsOption::Unknown(_, data) => Some((
                u16::from_be_bytes([data[0], data[1]]),
                String::from_utf8(data[2..].to_vec()).unwrap(),
            )),
            other => panic!("unexpected option {other:?}"),
        }
    }

    // ---- decide_query ----

    #[test]
    fn wildcard_covers_subdomains_not_the_apex_and_exact_covers_itself_only() {
        let p = policy(&["*.example.com", "api.example.org"]);
        assert!(forwards(&p, "a.example.com"));
        assert!(forwards(&p, "b.a.example.com"));
        assert!(!forwards(&p, "example.com"));
        assert!(!forwards(&p, "badexample.com"));
        assert!(forwards(&p, "api.example.org"));
        assert!(!forwards(&p, "x.api.example.org"));
        assert!(!forwards(&p, "example.org"));
        assert_eq!(
            p.decide_query(&dn("other.net"), RecordType::A),
            QueryDecision::Refuse(RefuseReason::NotAllowlisted)
        );
    }

    #[test]
    fn forward_lists_every_matching_grant_with_its_scope() {
        let p = policy(&[
            "*.example.com:443/tcp",
            "api.example.com",
            "api.example.com",
        ]);
        let QueryDecision::Forward(g) = p.decide_query(&dn("api.example.com"), RecordType::AAAA)
        else {
            panic!()
        };
        assert_eq!(g.len(), 2, "duplicates collapse: {g:?}");
        assert!(g.iter().any(|g| g.scope.is_none()));
        assert!(g.iter().any(|g| g.scope.is_some_and(|s| s.port == 443)));
    }

    #[test]
    fn answer_scopes_are_decide_querys_grants_reduced() {
        let p = policy(&[
            "*.example.com:443/tcp",
            "api.example.com",
            "*.other.org:53/udp",
        ]);
        for (name, qtype) in [
            ("api.example.com", RecordType::A),
            ("x.example.com", RecordType::AAAA),
            ("x.other.org", RecordType::A),
            ("nowhere.net", RecordType::A),
            ("api.example.com", RecordType::ANY),
        ] {
            let expected = match p.decide_query(&dn(name), qtype) {
                QueryDecision::Forward(g) => Ok(reduce_scopes(g.iter().map(|g| g.scope))),
                QueryDecision::Refuse(why) => Err(why),
            };
            assert_eq!(
                p.answer_scopes(&dn(name), qtype),
                expected,
                "{name} {qtype}"
            );
        }
    }

    #[test]
    fn wire_names_are_case_insensitive() {
        let p = policy(&["api.example.com"]);
        let raw = query_bytes(7, "API.Example.COM", RecordType::A, false);
        let req = inspect_request(&raw).unwrap();
        assert_eq!(req.qname, dn("api.example.com"));
        assert!(forwards(&p, req.qname.as_str()));
    }

    #[test]
    fn denied_domains_follow_bundle_semantics_and_specific_denies_win() {
        let mut b = bundle(
            &[
                "example.com",
                "*.example.org",
                "a.example.net",
                "*.example.net",
            ],
            Mode::DenyAll,
        );
        b.live_deny(t("example.com:443"));
        b.live_deny(t("*.example.org"));
        b.live_deny(t("a.example.net"));
        let p = DnsPolicy::from_bundle(&b);
        assert!(!forwards(&p, "example.com"));
        assert!(!forwards(&p, "x.example.org"));
        assert_eq!(
            p.decide_query(&dn("a.example.net"), RecordType::A),
            QueryDecision::Refuse(RefuseReason::Denied(DomainPattern {
                name: dn("a.example.net"),
                wildcard: false
            })),
            "a specific deny beats the wildcard allow"
        );
        assert!(forwards(&p, "b.example.net"));
        // Allowing again clears the deny.
        b.live_allow(t("a.example.net"), None);
        assert!(forwards(&DnsPolicy::from_bundle(&b), "a.example.net"));
    }

    #[test]
    fn domain_filtering_agrees_with_bundle_policy() {
        // Each exact domain gets its own cached address; Bundle::policy keeps the address iff
        // it keeps the domain, which must be exactly when DnsPolicy keeps a grant for it.
        let names = [
            "a.example.com",
            "b.example.com",
            "example.com",
            "c.example.org",
        ];
        let denies: [&[&str]; 5] = [
            &[],
            &["*.example.com"],
            &["example.com"],
            &["a.example.com", "*.example.org"],
            &["*.com"],
        ];
        for deny in denies {
            let mut b = bundle(&names, Mode::DenyAll);
            // Addresses resolved ahead count only in the static tier.
            b.dns_tier = crate::core::bundle::DnsTier::Static;
            for (i, n) in names.iter().enumerate() {
                b.resolved.insert(
                    dn(n),
                    Resolved {
                        addrs: vec![IpAddr::V4(Ipv4Addr::new(198, 18, 0, i as u8 + 1))],
                        at: 0,
                    },
                );
            }
            for d in deny {
                b.live_deny(t(d));
            }
            let allowed = b.policy(&RuntimeFacts::default()).allow;
            let dns = DnsPolicy::from_bundle(&b);
            for (i, n) in names.iter().enumerate() {
                let addr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, i as u8 + 1));
                let by_bundle = allowed.iter().any(|r| r.net.contains(&addr));
                let by_dns = dns.grants().iter().any(|g| g.pattern.name == dn(n));
                assert_eq!(by_bundle, by_dns, "{n} with denies {deny:?}");
            }
        }
    }

    #[test]
    fn modes_block_refuses_all_bypass_forwards_unlisted_without_grants() {
        let mut b = bundle(&["example.com"], Mode::Block);
        assert_eq!(
            DnsPolicy::from_bundle(&b).decide_query(&dn("example.com"), RecordType::A),
            QueryDecision::Refuse(RefuseReason::BlockMode)
        );
        b.mode = Mode::Bypass;
        b.live_deny(t("evil.example"));
        let p = DnsPolicy::from_bundle(&b);
        assert_eq!(
            p.decide_query(&dn("other.net"), RecordType::A),
            QueryDecision::Forward(vec![])
        );
        assert!(!forwards(&p, "evil.example"), "denies hold in bypass too");
        let ans = run(&p, "other.net", vec![a("other.net", 300, "198.51.100.1")]);
        assert!(ans.inserts.is_empty(), "unlisted names teach nothing");
        assert_eq!(
            ans.named,
            vec![ip("198.51.100.1")],
            "but name their addresses"
        );
    }

    #[test]
    fn meta_and_transfer_types_are_refused() {
        let p = policy(&["example.com"]);
        for qtype in [
            RecordType::ANY,
            RecordType::AXFR,
            RecordType::IXFR,
            RecordType::OPT,
            RecordType::TSIG,
            RecordType::ZERO,
            RecordType::Unknown(254),
        ] {
            assert_eq!(
                p.decide_query(&dn("example.com"), qtype),
                QueryDecision::Refuse(RefuseReason::QueryType(qtype)),
                "{qtype}"
            );
        }
        for qtype in [
            RecordType::A,
            RecordType::AAAA,
            RecordType::TXT,
            RecordType::HTTPS,
            RecordType::MX,
        ] {
            assert!(matches!(
                p.decide_query(&dn("example.com"), qtype),
                QueryDecision::Forward(_)
            ));
        }
    }

    // ---- inspect_request / replies ----

    #[test]
    fn request_fields_are_read() {
        let raw = query_bytes(0x1234, "example.com", RecordType::AAAA, true);
        let req = inspect_request(&raw).unwrap();
        assert_eq!(
            req,
            Request {
                id: 0x1234,
                qname: dn("example.com"),
                qtype: RecordType::AAAA,
                edns: true,
                udp_payload: 4096,
                recursion_desired: true,
            }
        );
        let plain = inspect_request(&query_bytes(1, "example.com", RecordType::A, false)).unwrap();
        assert!(!plain.edns);
        assert_eq!(plain.udp_payload, 512);
    }

    fn rcode_of(bytes: &[u8]) -> ResponseCode {
        Message::from_vec(bytes).unwrap().metadata.response_code
    }

    #[test]
    fn multiple_or_no_questions_are_refused() {
        let mut m = Message::new(9, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(name("a.example.com"), RecordType::A));
        m.add_query(Query::query(name("b.example.com"), RecordType::A));
        let err = inspect_request(&m.to_vec().unwrap()).unwrap_err();
        assert!(matches!(err, Malformed::QuestionCount { count: 2, .. }));
        let reply = err.reply().unwrap();
        assert_eq!(rcode_of(reply), ResponseCode::Refused);
        assert_eq!(Message::from_vec(reply).unwrap().metadata.id, 9);

        let none = Message::new(10, MessageType::Query, OpCode::Query);
        let err = inspect_request(&none.to_vec().unwrap()).unwrap_err();
        assert!(matches!(err, Malformed::QuestionCount { count: 0, .. }));
    }

    #[test]
    fn non_in_class_is_refused() {
        let mut m = Message::new(11, MessageType::Query, OpCode::Query);
        let mut q = Query::query(name("version.bind"), RecordType::TXT);
        q.set_query_class(DNSClass::CH);
        m.add_query(q);
        let err = inspect_request(&m.to_vec().unwrap()).unwrap_err();
        assert!(matches!(
            err,
            Malformed::Class {
                class: DNSClass::CH,
                ..
            }
        ));
        assert_eq!(rcode_of(err.reply().unwrap()), ResponseCode::Refused);
    }

    #[test]
    fn responses_short_and_garbage_messages_are_dropped_or_formerr() {
        assert_eq!(inspect_request(&[]), Err(Malformed::NotAQuery));
        assert_eq!(inspect_request(&[0; 11]), Err(Malformed::NotAQuery));
        let (req, raw) = request("example.com", RecordType::A);
        let resp = answer_bytes(&req, &raw, vec![]);
        assert_eq!(inspect_request(&resp), Err(Malformed::NotAQuery));

        let mut junk = raw.clone();
        junk.truncate(15);
        let err = inspect_request(&junk).unwrap_err();
        let reply = err.reply().unwrap();
        assert!(matches!(err, Malformed::Unparsable { .. }));
        assert_eq!(reply.len(), 12);
        let msg = Message::from_vec(reply).unwrap();
        assert_eq!(msg.metadata.id, 0x4242);
        assert_eq!(msg.metadata.response_code, ResponseCode::FormErr);
        assert_eq!(msg.metadata.message_type, MessageType::Response);
    }

    #[test]
    fn other_opcodes_get_notimp() {
        let mut m = Message::new(12, MessageType::Query, OpCode::Update);
        m.add_query(Query::query(name("example.com"), RecordType::SOA));
        let err = inspect_request(&m.to_vec().unwrap()).unwrap_err();
        assert!(matches!(err, Malformed::OpCode { opcode: 5, .. }));
        let msg = Message::from_vec(err.reply().unwrap()).unwrap();
        assert_eq!(msg.metadata.response_code, ResponseCode::NotImp);
        assert_eq!(msg.metadata.op_code, OpCode::Update);
    }

    #[test]
    fn names_we_cannot_allowlist_are_refused() {
        let mut root = Message::new(13, MessageType::Query, OpCode::Query);
        root.add_query(Query::query(Name::root(), RecordType::NS));
        assert!(matches!(
            inspect_request(&root.to_vec().unwrap()),
            Err(Malformed::Name { .. })
        ));
        // A label containing a dot must not turn into two labels.
        let dotted = Name::from_labels(vec![b"example.com".to_vec(), b"evil".to_vec()]).unwrap();
        let mut m = Message::new(14, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(dotted, RecordType::A));
        assert!(matches!(
            inspect_request(&m.to_vec().unwrap()),
            Err(Malformed::Name { .. })
        ));
    }

    #[test]
    fn refused_response_carries_ede_only_when_client_sent_edns() {
        let raw = query_bytes(0x0102, "Blocked.Example", RecordType::A, true);
        let req = inspect_request(&raw).unwrap();
        let reply = refused_response(&req, &raw);
        let msg = Message::from_vec(&reply).unwrap();
        assert_eq!(msg.metadata.id, 0x0102);
        assert_eq!(msg.metadata.response_code, ResponseCode::Refused);
        assert_eq!(msg.metadata.message_type, MessageType::Response);
        assert!(msg.metadata.recursion_desired);
        assert!(msg.queries[0].name().eq_case(&name("Blocked.Example")));
        assert_eq!(
            ede_of(&reply),
            Some((EDE_BLOCKED, "blocked by terok-shield".to_string()))
        );

        let raw = query_bytes(0x0103, "blocked.example", RecordType::A, false);
        let req = inspect_request(&raw).unwrap();
        let reply = refused_response(&req, &raw);
        let msg = Message::from_vec(&reply).unwrap();
        assert_eq!(msg.metadata.response_code, ResponseCode::Refused);
        assert!(msg.edns.is_none(), "no OPT for a client without EDNS");
        assert_eq!(msg.queries.len(), 1);
    }

    #[test]
    fn replies_rebuild_the_question_when_raw_does_not_match() {
        let (req, _) = request("example.com", RecordType::A);
        for raw in [&b""[..], &query_bytes(1, "other.com", RecordType::A, false)] {
            let msg = Message::from_vec(&servfail_response(&req, raw)).unwrap();
            assert_eq!(msg.metadata.response_code, ResponseCode::ServFail);
            assert_eq!(msg.queries[0].name(), &name("example.com"));
            assert!(ede_of(&servfail_response(&req, raw)).is_none());
        }
        let tc = Message::from_vec(&truncated_response(&req, &[])).unwrap();
        assert!(tc.metadata.truncation);
        assert_eq!(tc.metadata.response_code, ResponseCode::NoError);
        assert!(tc.answers.is_empty());
    }

    #[test]
    fn with_id_rewrites_only_the_id() {
        let raw = query_bytes(1, "example.com", RecordType::A, false);
        let re = with_id(&raw, 0xbeef);
        assert_eq!(&re[..2], &[0xbe, 0xef]);
        assert_eq!(&re[2..], &raw[2..]);
        assert_eq!(with_id(&[7], 1), vec![7]);
    }

    // ---- extract_answer ----

    #[test]
    fn cname_chain_into_another_zone_is_learned_for_the_queried_name() {
        let p = policy(&["www.example.com"]);
        let ans = run(
            &p,
            "www.example.com",
            vec![
                cname("www.example.com", 300, "edge.cdn.example.net"),
                cname("edge.cdn.example.net", 300, "e1.cdn.example.net"),
                a("e1.cdn.example.net", 300, "198.51.100.10"),
                aaaa("e1.cdn.example.net", 300, "2001:db8::10"),
            ],
        );
        assert_eq!(
            inserted(&ans),
            vec![ip("198.51.100.10"), ip("2001:db8::10")]
        );
        assert!(ans
            .inserts
            .iter()
            .all(|i| i.domain == dn("www.example.com")));
        assert_eq!(ans.inserts[0].set(), "dns_v4");
        assert_eq!(ans.inserts[1].set(), "dns_v6");
    }

    #[test]
    fn unrelated_records_are_ignored_but_forwarded() {
        let p = policy(&["www.example.com"]);
        let (req, raw) = request("www.example.com", RecordType::A);
        let mut m = answer_msg(
            &req,
            &raw,
            vec![
                a("www.example.com", 300, "198.51.100.1"),
                a("evil.example.org", 300, "203.0.113.66"),
                cname("other.example.com", 300, "www.example.com"),
            ],
        );
        m.add_additional(a("ns.example.com", 300, "203.0.113.53"));
        let bytes = m.to_vec().unwrap();
        let ans = answered(extract_answer(&bytes, &req, &p, BOUNDS));
        assert_eq!(inserted(&ans), vec![ip("198.51.100.1")]);
        assert_eq!(ans.response, bytes, "nothing removed: bytes unchanged");
    }

    #[test]
    fn cname_loops_and_overlong_chains_are_cut() {
        let p = policy(&["loop.example.com"]);
        let ans = run(
            &p,
            "loop.example.com",
            vec![
                cname("loop.example.com", 300, "b.example.net"),
                cname("b.example.net", 300, "loop.example.com"),
                a("b.example.net", 300, "198.51.100.2"),
            ],
        );
        assert_eq!(inserted(&ans), vec![ip("198.51.100.2")]);

        let p = policy(&["n0.example.com"]);
        let mut records: Vec<Record> = (0..20)
            .map(|i| {
                cname(
                    &format!("n{i}.example.com"),
                    300,
                    &format!("n{}.example.com", i + 1),
                )
            })
            .collect();
        records.push(a(
            &format!("n{MAX_CNAME_CHAIN}.example.com"),
            300,
            "198.51.100.16",
        ));
        records.push(a(
            &format!("n{}.example.com", MAX_CNAME_CHAIN + 1),
            300,
            "198.51.100.17",
        ));
        let ans = run(&p, "n0.example.com", records);
        assert_eq!(inserted(&ans), vec![ip("198.51.100.16")], "16 hops, not 17");
    }

    #[test]
    fn mismatched_answers_are_rejected() {
        let p = policy(&["example.com"]);
        let (req, raw) = request("example.com", RecordType::A);
        let good = answer_msg(&req, &raw, vec![a("example.com", 300, "198.51.100.1")]);

        let mut wrong_id = good.clone();
        wrong_id.metadata.id ^= 1;
        let mut wrong_name = good.clone();
        wrong_name.queries[0].set_name(name("example.org"));
        let mut wrong_type = good.clone();
        wrong_type.queries[0].set_query_type(RecordType::AAAA);
        let mut wrong_class = good.clone();
        wrong_class.queries[0].set_query_class(DNSClass::CH);
        let mut two = good.clone();
        two.add_query(Query::query(name("example.com"), RecordType::A));
        let mut query = good.clone();
        query.metadata.message_type = MessageType::Query;

        let decide = |m: &Message| extract_answer(&m.to_vec().unwrap(), &req, &p, BOUNDS);
        assert!(matches!(
            decide(&wrong_id),
            AnswerDecision::Reject(Mismatch::Id { .. })
        ));
        for m in [&wrong_name, &wrong_type, &wrong_class, &two] {
            assert_eq!(decide(m), AnswerDecision::Reject(Mismatch::Question));
        }
        assert_eq!(
            decide(&query),
            AnswerDecision::Reject(Mismatch::NotAResponse)
        );
        assert_eq!(
            extract_answer(b"\x42\x42junk", &req, &p, BOUNDS),
            AnswerDecision::Reject(Mismatch::Unparsable)
        );
        // The question may come back in another case.
        let mut upper = good.clone();
        upper.queries[0].set_name(name("EXAMPLE.com"));
        assert!(matches!(decide(&upper), AnswerDecision::Answer(_)));
    }

    #[test]
    fn ttls_are_clamped_at_both_ends_and_capped_in_the_response() {
        let p = policy(&["example.com"]);
        let ans = run(
            &p,
            "example.com",
            vec![
                a("example.com", 5, "198.51.100.1"),
                a("example.com", 600, "198.51.100.2"),
                a("example.com", 86_400, "198.51.100.3"),
            ],
        );
        let ttls: Vec<u64> = ans.inserts.iter().map(|i| i.ttl.as_secs()).collect();
        assert_eq!(ttls, vec![60, 600, 3600]);
        let msg = Message::from_vec(&ans.response).unwrap();
        let sent: Vec<u32> = msg.answers.iter().map(|r| r.ttl).collect();
        assert_eq!(sent, vec![5, 600, 3600], "only over-long TTLs are lowered");

        // Inverted bounds: the maximum wins.
        let (req, raw) = request("example.com", RecordType::A);
        let bytes = answer_bytes(&req, &raw, vec![a("example.com", 5, "198.51.100.1")]);
        let ans = answered(extract_answer(&bytes, &req, &p, (600, 100)));
        assert_eq!(ans.inserts[0].ttl, Duration::from_secs(100));
    }

    #[test]
    fn rebinding_addresses_are_removed_unless_allowlisted() {
        let p = policy(&["*.example.com", "10.1.0.0/16"]);
        let ans = run(
            &p,
            "app.example.com",
            vec![
                a("app.example.com", 300, "198.51.100.1"),
                a("app.example.com", 300, "192.168.1.1"),
                a("app.example.com", 300, "10.1.2.3"),
                a("app.example.com", 300, "127.0.0.1"),
                a("app.example.com", 300, "0.0.0.0"),
                a("app.example.com", 300, "224.0.0.1"),
                aaaa("app.example.com", 300, "fd00::1"),
                aaaa("app.example.com", 300, "::ffff:169.254.169.254"),
                aaaa("app.example.com", 300, "2001:db8::1"),
            ],
        );
        assert_eq!(
            inserted(&ans),
            vec![ip("198.51.100.1"), ip("10.1.2.3"), ip("2001:db8::1")]
        );
        assert_eq!(
            ans.removed,
            vec![
                ip("192.168.1.1"),
                ip("127.0.0.1"),
                ip("0.0.0.0"),
                ip("224.0.0.1"),
                ip("fd00::1"),
                ip("::ffff:169.254.169.254"),
            ]
        );
        assert_eq!(
            addrs_in(&ans.response),
            vec![ip("198.51.100.1"), ip("10.1.2.3"), ip("2001:db8::1")]
        );
        assert_eq!(
            ans.named,
            addrs_in(&ans.response),
            "named: what the client gets"
        );
    }

    #[test]
    fn private_addresses_in_other_sections_are_removed_too() {
        let p = policy(&["example.com"]);
        let (req, raw) = request("example.com", RecordType::A);
        let mut m = answer_msg(&req, &raw, vec![a("example.com", 300, "198.51.100.1")]);
        m.add_additional(a("internal.example.com", 300, "10.9.9.9"));
        let ans = answered(extract_answer(&m.to_vec().unwrap(), &req, &p, BOUNDS));
        assert_eq!(ans.removed, vec![ip("10.9.9.9")]);
        assert_eq!(addrs_in(&ans.response), vec![ip("198.51.100.1")]);
    }

    #[test]
    fn scoped_private_networks_narrow_what_a_name_opens() {
        let p = policy(&["intranet.example.com", "10.0.0.0/8:443/tcp"]);
        let ans = run(
            &p,
            "intranet.example.com",
            vec![a("intranet.example.com", 300, "10.2.3.4")],
        );
        assert!(ans.removed.is_empty());
        assert_eq!(ans.inserts.len(), 1);
        assert_eq!(
            ans.inserts[0].scope,
            Some(PortScope {
                port: 443,
                protocol: Some(Protocol::Tcp)
            })
        );
        assert_eq!(ans.inserts[0].set(), "dns_svc_v4");

        // Disjoint ports: kept in the answer (the network is allowlisted), learned for nothing.
        let p = policy(&["intranet.example.com:22", "10.0.0.0/8:443"]);
        let ans = run(
            &p,
            "intranet.example.com",
            vec![a("intranet.example.com", 300, "10.2.3.4")],
        );
        assert!(ans.inserts.is_empty());
        assert!(ans.removed.is_empty());
    }

    #[test]
    fn denied_networks_are_not_learned_and_private_ones_not_kept() {
        let mut b = bundle(&["*.example.com", "10.0.0.0/8"], Mode::DenyAll);
        b.live_deny(t("198.51.100.7"));
        b.live_deny(t("10.6.6.6"));
        let p = DnsPolicy::from_bundle(&b);
        let ans = run(
            &p,
            "x.example.com",
            vec![
                a("x.example.com", 300, "198.51.100.7"),
                a("x.example.com", 300, "10.6.6.6"),
                a("x.example.com", 300, "10.6.6.7"),
            ],
        );
        assert_eq!(inserted(&ans), vec![ip("10.6.6.7")]);
        assert_eq!(ans.removed, vec![ip("10.6.6.6")]);
        assert_eq!(
            addrs_in(&ans.response),
            vec![ip("198.51.100.7"), ip("10.6.6.7")]
        );
    }

    #[test]
    fn bypass_all_keeps_private_answers_but_never_learns_them() {
        let p = DnsPolicy::from_bundle(&bundle(&["example.com"], Mode::BypassAll));
        let ans = run(&p, "example.com", vec![a("example.com", 300, "10.0.0.1")]);
        assert!(ans.inserts.is_empty());
        assert!(ans.removed.is_empty());
        assert_eq!(addrs_in(&ans.response), vec![ip("10.0.0.1")]);
    }

    #[test]
    fn port_scoped_patterns_carry_their_scope_once_per_effective_scope() {
        let p = policy(&[
            "*.example.com:443/tcp",
            "*.example.com:443",
            "api.example.com:8443/udp",
        ]);
        let ans = run(
            &p,
            "api.example.com",
            vec![aaaa("api.example.com", 300, "2001:db8::5")],
        );
        let scopes: Vec<Option<PortScope>> = ans.inserts.iter().map(|i| i.scope).collect();
        assert_eq!(
            scopes,
            vec![
                Some(PortScope {
                    port: 443,
                    protocol: None
                }),
                Some(PortScope {
                    port: 8443,
                    protocol: Some(Protocol::Udp)
                }),
            ],
            "443/tcp is covered by 443"
        );
        assert!(ans.inserts.iter().all(|i| i.set() == "dns_svc_v6"));
        // An unscoped grant swallows every scoped one.
        let p = policy(&["api.example.com:443", "api.example.com"]);
        let ans = run(
            &p,
            "api.example.com",
            vec![a("api.example.com", 300, "198.51.100.5")],
        );
        assert_eq!(ans.inserts.len(), 1);
        assert_eq!(ans.inserts[0].scope, None);
    }

    #[test]
    fn set_for_maps_family_and_scope() {
        let s = Some(PortScope {
            port: 1,
            protocol: None,
        });
        assert_eq!(set_for(ip("198.51.100.1"), None), sets::DNS_V4);
        assert_eq!(set_for(ip("2001:db8::1"), None), sets::DNS_V6);
        assert_eq!(set_for(ip("198.51.100.1"), s), sets::DNS_SVC_V4);
        assert_eq!(set_for(ip("2001:db8::1"), s), sets::DNS_SVC_V6);
    }

    #[test]
    fn truncated_answers_ask_for_tcp_and_teach_nothing() {
        let p = policy(&["example.com"]);
        let (req, raw) = request("example.com", RecordType::A);
        let mut m = answer_msg(&req, &raw, vec![a("example.com", 300, "198.51.100.1")]);
        m.metadata.truncation = true;
        assert_eq!(
            extract_answer(&m.to_vec().unwrap(), &req, &p, BOUNDS),
            AnswerDecision::RetryOverTcp
        );
    }

    #[test]
    fn error_answers_are_forwarded_without_learning() {
        let p = policy(&["example.com"]);
        let (req, raw) = request("example.com", RecordType::A);
        let mut m = answer_msg(&req, &raw, vec![a("example.com", 300, "198.51.100.1")]);
        m.metadata.response_code = ResponseCode::NXDomain;
        let bytes = m.to_vec().unwrap();
        let ans = answered(extract_answer(&bytes, &req, &p, BOUNDS));
        assert!(ans.inserts.is_empty());
        assert_eq!(ans.response, bytes);
    }

    #[test]
    fn a_policy_change_in_flight_refuses_the_answer() {
        let (req, raw) = request("example.com", RecordType::A);
        let bytes = answer_bytes(&req, &raw, vec![a("example.com", 300, "198.51.100.1")]);
        let mut b = bundle(&["example.com"], Mode::DenyAll);
        b.live_deny(t("example.com"));
        assert_eq!(
            extract_answer(&bytes, &req, &DnsPolicy::from_bundle(&b), BOUNDS),
            AnswerDecision::Refused(RefuseReason::Denied(DomainPattern {
                name: dn("example.com"),
                wildcard: false
            }))
        );
    }

    #[test]
    fn non_address_answers_pass_unchanged() {
        let p = policy(&["example.com"]);
        let (req, raw) = request("example.com", RecordType::TXT);
        let txt = Record::from_rdata(
            name("example.com"),
            300,
            RData::TXT(TXT::new(vec!["v=spf1 -all".into()])),
        );
        let bytes = answer_bytes(&req, &raw, vec![txt]);
        let ans = answered(extract_answer(&bytes, &req, &p, BOUNDS));
        assert!(ans.inserts.is_empty());
        assert_eq!(ans.response, bytes);
    }

    // ---- properties ----

    fn arb_addr() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            4 => any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
            3 => any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
            1 => any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (a & 0x00ff_ffff)))),
            1 => any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from((0xfd << 120) | (a >> 8)))),
        ]
    }

    fn record_for(owner: &str, ttl: u32, addr: IpAddr) -> Record {
        let data = match addr {
            IpAddr::V4(a) => RData::A(A(a)),
            IpAddr::V6(a) => RData::AAAA(AAAA(a)),
        };
        Record::from_rdata(name(owner), ttl, data)
    }

    proptest! {
        #[test]
        fn inspect_request_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = inspect_request(&bytes);
        }

        #[test]
        fn extract_answer_never_panics(
            mut bytes in proptest::collection::vec(any::<u8>(), 0..600),
            keep_id in any::<bool>(),
        ) {
            let p = policy(&["*.example.com", "10.0.0.0/8"]);
            let (req, _) = request("a.example.com", RecordType::A);
            if keep_id && bytes.len() >= 2 {
                bytes[..2].copy_from_slice(&req.id.to_be_bytes());
            }
            let _ = extract_answer(&bytes, &req, &p, BOUNDS);
        }

        #[test]
        fn mutated_answers_never_panic_nor_learn_unallowed_private(
            records in proptest::collection::vec((arb_addr(), any::<u32>()), 0..12),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        ) {
            let p = policy(&["*.example.com"]);
            let (req, raw) = request("a.example.com", RecordType::A);
            let recs = records.iter().map(|(a, t)| record_for("a.example.com", *t, *a)).collect();
            let mut bytes = answer_bytes(&req, &raw, recs);
            for (at, x) in flips {
                let i = at % bytes.len();
                bytes[i] ^= x;
            }
            if let AnswerDecision::Answer(ans) = extract_answer(&bytes, &req, &p, BOUNDS) {
                prop_assert!(ans.inserts.iter().all(|i| !is_rebinding_sensitive(i.addr)));
                if let Ok(m) = Message::from_vec(&ans.response) {
                    prop_assert!(m.all_sections().filter_map(address_of).all(|a| !is_rebinding_sensitive(a)));
                }
            }
        }

        #[test]
        fn random_address_sets_round_trip_into_inserts(
            records in proptest::collection::vec((arb_addr(), any::<u32>()), 0..24),
            lo in 0u32..5000,
            span in 0u32..100_000,
            scoped in any::<bool>(),
        ) {
            let bounds = (lo, lo + span);
            let entry = if scoped { "*.example.com:443/tcp" } else { "*.example.com" };
            let p = policy(&[entry]);
            let (req, raw) = request("a.b.example.com", RecordType::A);
            let recs = records.iter().map(|(a, t)| record_for("a.b.example.com", *t, *a)).collect();
            let ans = answered(extract_answer(&answer_bytes(&req, &raw, recs), &req, &p, bounds));

            let mut public: Vec<IpAddr> = Vec::new();
            let mut private: Vec<IpAddr> = Vec::new();
            for (a, _) in &records {
                let list = if is_rebinding_sensitive(*a) { &mut private } else { &mut public };
                if !list.contains(a) {
                    list.push(*a);
                }
            }
            prop_assert_eq!(inserted(&ans), public.clone());
            for ins in &ans.inserts {
                let secs = ins.ttl.as_secs();
                prop_assert!(secs >= u64::from(bounds.0) && secs <= u64::from(bounds.1));
                let longest = records.iter().filter(|(a, _)| *a == ins.addr).map(|(_, t)| *t).max().unwrap();
                prop_assert_eq!(secs, u64::from(longest.clamp(bounds.0, bounds.1)));
                prop_assert_eq!(ins.scope.is_some(), scoped);
                prop_assert_eq!(&ins.domain, &req.qname);
            }
            prop_assert_eq!(&ans.removed, &private);
            let mut sent = addrs_in(&ans.response);
            sent.dedup();
            let mut expect: Vec<IpAddr> = records.iter().map(|(a, _)| *a).filter(|a| !is_rebinding_sensitive(*a)).collect();
            expect.dedup();
            prop_assert_eq!(sent, expect);
        }
    }

    // ---- fast paths: the in-place readers give hickory's results ----

    /// A name in wire form: plain labels, then the root label.
    fn wire_name(labels: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for label in labels {
            out.push(label.len() as u8);
            out.extend_from_slice(label);
        }
        out.push(0);
        out
    }

    /// A query written byte by byte: header, one question, then `rest` (additional records and
    /// whatever else), so shapes hickory would never write can be built too.
    fn raw_query(
        id: u16,
        flags: u16,
        counts: [u16; 4],
        name: &[u8],
        qtype: u16,
        rest: &[u8],
    ) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        for c in counts {
            out.extend_from_slice(&c.to_be_bytes());
        }
        out.extend_from_slice(name);
        out.extend_from_slice(&qtype.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(rest);
        out
    }

    /// An OPT record with the given payload, TTL field and option bytes.
    fn raw_opt(payload: u16, ttl: u32, options: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&41u16.to_be_bytes());
        out.extend_from_slice(&payload.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(options.len() as u16).to_be_bytes());
        out.extend_from_slice(options);
        out
    }

    fn www() -> Vec<u8> {
        wire_name(&[b"www".to_vec(), b"example".to_vec(), b"com".to_vec()])
    }

    #[test]
    fn fast_query_path_takes_plain_queries_with_or_without_opt() {
        for edns in [false, true] {
            let raw = query_bytes(7, "WWW.Example.com", RecordType::AAAA, edns);
            let fast = inspect_request_fast(&raw).expect("the common shape is read in place");
            assert_eq!(Ok(fast.clone()), inspect_request_hickory(&raw));
            assert_eq!(fast.qname, dn("www.example.com"));
            assert_eq!(fast.edns, edns);
            assert_eq!(fast.udp_payload, if edns { 4096 } else { 512 });
        }
        // A payload below 512 counts as 512, as hickory reads it.
        let raw = raw_query(1, 0x0100, [1, 0, 0, 1], &www(), 1, &raw_opt(100, 0, &[]));
        assert_eq!(inspect_request_fast(&raw).unwrap().udp_payload, 512);
        assert_eq!(
            inspect_request_fast(&raw).map(Ok),
            Some(inspect_request_hickory(&raw))
        );
    }

    #[test]
    fn fast_query_path_leaves_other_shapes_to_hickory() {
        let plain = raw_query(1, 0x0100, [1, 0, 0, 0], &www(), 1, &[]);
        assert!(inspect_request_fast(&plain).is_some());
        let others: Vec<(&str, Vec<u8>)> = vec![
            // A compression pointer as the question name (hickory refuses it: not prior).
            (
                "compressed question",
                raw_query(1, 0x0100, [1, 0, 0, 0], &[0xc0, 0x0c], 1, &[]),
            ),
            (
                "edns options",
                raw_query(
                    1,
                    0x0100,
                    [1, 0, 0, 1],
                    &www(),
                    1,
                    &raw_opt(1232, 0, &[0, 10, 0, 2, 1, 2]),
                ),
            ),
            (
                "trailing bytes",
                raw_query(1, 0x0100, [1, 0, 0, 0], &www(), 1, &[0]),
            ),
            (
                "trailing after opt",
                raw_query(
                    1,
                    0x0100,
                    [1, 0, 0, 1],
                    &www(),
                    1,
                    &[raw_opt(1232, 0, &[]), vec![0]].concat(),
                ),
            ),
            (
                "an answer record",
                raw_query(1, 0x0100, [1, 1, 0, 0], &www(), 1, &[]),
            ),
            (
                "an authority record",
                raw_query(1, 0x0100, [1, 0, 1, 0], &www(), 1, &[]),
            ),
            (
                "two additionals",
                raw_query(
                    1,
                    0x0100,
                    [1, 0, 0, 2],
                    &www(),
                    1,
                    &[raw_opt(1232, 0, &[]), raw_opt(1232, 0, &[])].concat(),
                ),
            ),
            (
                "a response",
                raw_query(1, 0x8100, [1, 0, 0, 0], &www(), 1, &[]),
            ),
            (
                "opcode NOTIFY",
                raw_query(1, 0x2100, [1, 0, 0, 0], &www(), 1, &[]),
            ),
            (
                "two questions",
                raw_query(1, 0x0100, [2, 0, 0, 0], &www(), 1, &[]),
            ),
            ("class CH", {
                let mut q = raw_query(1, 0x0100, [1, 0, 0, 0], &www(), 1, &[]);
                let n = q.len();
                q[n - 1] = 3;
                q
            }),
            (
                "not a host name",
                raw_query(
                    1,
                    0x0100,
                    [1, 0, 0, 0],
                    &wire_name(&[b"a b".to_vec(), b"com".to_vec()]),
                    1,
                    &[],
                ),
            ),
            (
                "root name",
                raw_query(1, 0x0100, [1, 0, 0, 0], &[0], 1, &[]),
            ),
            (
                "near the length limit",
                raw_query(
                    1,
                    0x0100,
                    [1, 0, 0, 0],
                    &wire_name(&[
                        vec![b'a'; 63],
                        vec![b'b'; 63],
                        vec![b'c'; 63],
                        vec![b'd'; 59],
                    ]),
                    1,
                    &[],
                ),
            ),
            (
                "not an OPT",
                raw_query(1, 0x0100, [1, 0, 0, 1], &www(), 1, &{
                    let mut o = raw_opt(1232, 0, &[]);
                    o[2] = 1;
                    o
                }),
            ),
            ("truncated", plain[..plain.len() - 1].to_vec()),
        ];
        for (what, bytes) in others {
            assert_eq!(inspect_request_fast(&bytes), None, "{what}");
        }
    }

    /// A label for generated names: host-name text in either case (often long), or anything.
    fn arb_label() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            8 => "[a-zA-Z0-9_-]{1,12}".prop_map(String::into_bytes),
            2 => "[a-zA-Z][a-zA-Z0-9-]{55,62}".prop_map(String::into_bytes),
            1 => proptest::collection::vec(any::<u8>(), 1..10),
        ]
    }

    /// Header flags: mostly a standard query with random other bits.
    fn arb_query_flags() -> impl Strategy<Value = u16> {
        (any::<u16>(), 0u8..16, 0u8..16).prop_map(|(bits, qr, opcode)| {
            let mut flags = bits & 0x07ff;
            if qr == 0 {
                flags |= 0x8000;
            }
            if opcode == 0 {
                flags |= u16::from(bits.rotate_left(7) as u8 & 0x0f) << 11;
            }
            flags
        })
    }

    /// Generated queries: (bytes, whether the generator kept to the common shape).
    fn arb_query() -> impl Strategy<Value = (Vec<u8>, bool)> {
        let name = prop_oneof![
            4 => proptest::collection::vec(arb_label(), 1..5),
            1 => proptest::collection::vec("[a-z]{60,63}".prop_map(String::into_bytes), 3..5),
        ];
        let opt = prop_oneof![
            2 => Just(None),
            2 => (any::<u16>(), any::<u32>()).prop_map(|(p, t)| Some((p, t, Vec::new()))),
            1 => (any::<u16>(), any::<u32>(), proptest::collection::vec(any::<u8>(), 1..12))
                .prop_map(|(p, t, o)| Some((p, t, o))),
        ];
        let qtype = prop_oneof![
            Just(1u16),
            Just(28),
            Just(5),
            Just(255),
            Just(41),
            any::<u16>()
        ];
        let qclass = prop_oneof![6 => Just(1u16), 1 => Just(3), 1 => any::<u16>()];
        let damage = prop_oneof![
            6 => Just((Vec::new(), None, Vec::new())),
            1 => (proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4), Just(None), Just(Vec::new())),
            1 => (Just(Vec::new()), any::<usize>().prop_map(Some), Just(Vec::new())),
            1 => (Just(Vec::new()), Just(None), proptest::collection::vec(any::<u8>(), 1..4)),
        ];
        (
            any::<u16>(),
            arb_query_flags(),
            name,
            qtype,
            qclass,
            opt,
            damage,
        )
            .prop_map(
                |(id, flags, labels, qtype, qclass, opt, (flips, cut, trailing))| {
                    let name = wire_name(&labels);
                    let additionals = u16::from(opt.is_some());
                    let rest = opt
                        .as_ref()
                        .map(|(p, t, o)| raw_opt(*p, *t, o))
                        .unwrap_or_default();
                    let mut bytes =
                        raw_query(id, flags, [1, 0, 0, additionals], &name, qtype, &rest);
                    let n = 12 + name.len() + 2;
                    bytes[n..n + 2].copy_from_slice(&qclass.to_be_bytes());
                    bytes.extend_from_slice(&trailing);
                    for (at, x) in &flips {
                        let i = at % bytes.len();
                        bytes[i] ^= x;
                    }
                    if let Some(cut) = cut {
                        bytes.truncate(cut % bytes.len());
                    }
                    let common = flags & 0xf800 == 0
                        && qclass == 1
                        && name.len() <= 250
                        && opt.as_ref().is_none_or(|(_, _, o)| o.is_empty())
                        && flips.is_empty()
                        && cut.is_none()
                        && trailing.is_empty();
                    (bytes, common)
                },
            )
    }

    /// Names an answer may use: the question's and others, in several cases.
    const ANSWER_NAMES: [&str; 6] = [
        "www.example.com",
        "WWW.Example.COM",
        "cdn.example.net",
        "edge.cdn.example.net",
        "Edge.CDN.example.net",
        "other.example.com",
    ];

    /// Addresses an answer may carry: public and rebinding-sensitive, some allowlisted below.
    const ANSWER_ADDRS: [&str; 10] = [
        "93.184.216.34",
        "93.184.216.35",
        "10.1.2.3",
        "192.168.1.1",
        "127.0.0.1",
        "0.0.0.0",
        "2606:2800:220:1::1",
        "fd00::1",
        "::1",
        "203.0.113.7",
    ];

    /// A small deterministic dice for the many interdependent choices of an answer.
    struct Dice(u64);

    impl Dice {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn one_in(&mut self, n: u64) -> bool {
            self.below(n) == 0
        }
        fn pick<T: Copy>(&mut self, items: &[T]) -> T {
            items[self.below(items.len() as u64) as usize]
        }
    }

    /// The policies the answer generator runs under: every mode, private networks allowed
    /// (whole or port-scoped), a denied network, a port-scoped wildcard.
    fn answer_policies() -> Vec<DnsPolicy> {
        let tier = DnsTier::Builtin;
        let b = crate::core::bundle::test_bundle;
        vec![
            policy(&["*.example.com", "example.com"]),
            policy(&["*.example.com", "10.0.0.0/8", "[fd00::/8]:443/tcp"]),
            policy(&["*.example.com:443/tcp", "192.168.0.0/16"]),
            DnsPolicy::from_bundle(&b(
                &["*.example.com"],
                &["93.184.216.35"],
                Mode::DenyAll,
                tier,
            )),
            DnsPolicy::from_bundle(&b(&["*.example.com"], &[], Mode::Bypass, tier)),
            DnsPolicy::from_bundle(&b(&[], &[], Mode::BypassAll, tier)),
            DnsPolicy::from_bundle(&b(&["*.example.com"], &[], Mode::Block, tier)),
        ]
    }

    /// One generated upstream answer to `www.example.com`: (request, bytes, bounds, whether the
    /// generator kept to the shape the fast reader takes).
    fn generated_answer(seed: u64) -> (Request, Vec<u8>, (u32, u32), bool) {
        let mut dice = Dice(seed | 1);
        let qtype = dice.pick(&[
            RecordType::A,
            RecordType::A,
            RecordType::AAAA,
            RecordType::TXT,
        ]);
        let raw = query_bytes(dice.next() as u16, "www.Example.com", qtype, dice.one_in(2));
        let req = inspect_request(&raw).unwrap();
        let mut common = true;

        let mut msg = Message::new(req.id, MessageType::Response, OpCode::Query);
        if dice.one_in(16) {
            msg.metadata.id = dice.next() as u16;
        }
        if dice.one_in(16) {
            msg.metadata.message_type = MessageType::Query;
            common = false;
        }
        if dice.one_in(16) {
            msg.metadata.op_code = OpCode::Status;
            common = false;
        }
        let bits = dice.next();
        msg.metadata.authoritative = bits & 1 != 0;
        msg.metadata.recursion_desired = bits & 2 != 0;
        msg.metadata.recursion_available = bits & 4 != 0;
        msg.metadata.authentic_data = bits & 8 != 0;
        msg.metadata.checking_disabled = bits & 16 != 0;
        msg.metadata.truncation = dice.one_in(16);
        msg.metadata.response_code = dice.pick(&[
            ResponseCode::NoError,
            ResponseCode::NoError,
            ResponseCode::NoError,
            ResponseCode::NoError,
            ResponseCode::NoError,
            ResponseCode::NXDomain,
            ResponseCode::ServFail,
            ResponseCode::BADVERS,
        ]);
        let question_name = dice.pick(&["www.example.com", "WWW.EXAMPLE.COM", "www.Example.com"]);
        match dice.below(16) {
            0 => common = false,
            1 => {
                msg.add_query(Query::query(name(question_name), qtype));
                msg.add_query(Query::query(name(question_name), qtype));
                common = false;
            }
            2 => {
                msg.add_query(Query::query(name("other.example.com"), qtype));
            }
            3 => {
                msg.add_query(Query::query(name(question_name), RecordType::MX));
            }
            4 => {
                let mut q = Query::query(name(question_name), qtype);
                q.set_query_class(DNSClass::CH);
                msg.add_query(q);
            }
            _ => {
                msg.add_query(Query::query(name(question_name), qtype));
            }
        }
        let record = |dice: &mut Dice, common: &mut bool| {
            let owners = if dice.one_in(2) {
                2
            } else {
                ANSWER_NAMES.len()
            };
            let owner = dice.pick(&ANSWER_NAMES[..owners]);
            let any_ttl = dice.next() as u32;
            let ttl = dice.pick(&[0, 30, 300, 3600, 86_400, u32::MAX, any_ttl]);
            let mut rec = match dice.below(10) {
                0..=5 => {
                    let addrs = if dice.one_in(2) {
                        2
                    } else {
                        ANSWER_ADDRS.len()
                    };
                    record_for(owner, ttl, ip(dice.pick(&ANSWER_ADDRS[..addrs])))
                }
                6..=8 => cname(owner, ttl, dice.pick(&ANSWER_NAMES)),
                _ => {
                    *common = false;
                    Record::from_rdata(name(owner), ttl, RData::TXT(TXT::new(vec!["x".into()])))
                }
            };
            if dice.one_in(20) {
                rec.dns_class = DNSClass::CH;
                *common = false;
            }
            rec
        };
        for _ in 0..dice.below(7) {
            let rec = record(&mut dice, &mut common);
            msg.add_answer(rec);
        }
        if dice.one_in(8) {
            let rec = record(&mut dice, &mut common);
            msg.add_authority(rec);
            common = false;
        }
        if dice.one_in(8) {
            let rec = record(&mut dice, &mut common);
            msg.add_additional(rec);
            common = false;
        }
        if dice.one_in(3) {
            let mut edns = Edns::new();
            edns.set_max_payload(1232);
            if dice.one_in(4) {
                edns.options_mut().insert(ede_option(EDE_BLOCKED, "x"));
                common = false;
            }
            msg.set_edns(edns);
        } else if msg.metadata.response_code == ResponseCode::BADVERS {
            msg.metadata.response_code = ResponseCode::NoError;
        }
        let mut bytes = msg.to_vec().unwrap();
        if dice.one_in(5) {
            for _ in 0..=dice.below(3) {
                let i = dice.below(bytes.len() as u64) as usize;
                bytes[i] = dice.next() as u8;
            }
            common = false;
        }
        if dice.one_in(16) {
            bytes.truncate(dice.below(bytes.len() as u64) as usize);
            common = false;
        }
        if dice.one_in(16) {
            bytes.push(dice.next() as u8);
            common = false;
        }
        let bounds = match dice.below(4) {
            0 => (dice.next() as u32, dice.next() as u32),
            _ => (
                dice.below(120) as u32,
                dice.pick(&[600, 3600, 86_400, u32::MAX]),
            ),
        };
        (req, bytes, bounds, common)
    }

    #[test]
    fn fast_answer_path_takes_plain_answers() {
        let p = policy(&["*.example.com"]);
        let (req, raw) = request("www.example.com", RecordType::A);
        let cases = [
            vec![a("www.example.com", 300, "93.184.216.34")],
            vec![
                a("www.example.com", 300, "93.184.216.34"),
                a("WWW.example.com", 60, "93.184.216.35"),
            ],
            vec![
                cname("www.example.com", 300, "cdn.example.net"),
                a("cdn.example.net", 60, "93.184.216.34"),
            ],
            vec![aaaa("www.example.com", 300, "2606:2800:220:1::1")],
        ];
        for answers in cases {
            let bytes = answer_bytes(&req, &raw, answers);
            let fast = extract_answer_fast(&bytes, &req, &p, BOUNDS).expect("read in place");
            assert_eq!(fast, extract_answer_hickory(&bytes, &req, &p, BOUNDS));
            assert!(answered(fast).response == bytes);
        }
    }

    #[test]
    fn fast_answer_path_leaves_rewrites_and_other_shapes_to_hickory() {
        let p = policy(&["*.example.com"]);
        let (req, raw) = request("www.example.com", RecordType::A);
        let public = a("www.example.com", 300, "93.184.216.34");
        let falls_back = |what: &str, bytes: &[u8]| {
            assert_eq!(extract_answer_fast(bytes, &req, &p, BOUNDS), None, "{what}");
        };
        // A private address to strip, a TTL to cap: the answer must be re-encoded.
        falls_back(
            "strip",
            &answer_bytes(
                &req,
                &raw,
                vec![public.clone(), a("www.example.com", 300, "10.0.0.1")],
            ),
        );
        falls_back(
            "cap",
            &answer_bytes(
                &req,
                &raw,
                vec![a("www.example.com", 86_400, "93.184.216.34")],
            ),
        );
        let mut m = answer_msg(&req, &raw, vec![public.clone()]);
        m.add_authority(a("www.example.com", 300, "93.184.216.35"));
        falls_back("authority", &m.to_vec().unwrap());
        let mut m = answer_msg(&req, &raw, vec![public.clone()]);
        m.add_additional(a("www.example.com", 300, "93.184.216.35"));
        falls_back("additional", &m.to_vec().unwrap());
        let mut m = answer_msg(&req, &raw, vec![public.clone()]);
        let mut edns = Edns::new();
        edns.options_mut().insert(ede_option(EDE_BLOCKED, "x"));
        m.set_edns(edns);
        falls_back("edns options", &m.to_vec().unwrap());
        let bytes = answer_bytes(&req, &raw, vec![public.clone()]);
        falls_back("trailing", &[bytes.clone(), vec![0]].concat());
        falls_back("truncated", &bytes[..bytes.len() - 1]);
        falls_back(
            "txt",
            &answer_bytes(
                &req,
                &raw,
                vec![Record::from_rdata(
                    name("www.example.com"),
                    300,
                    RData::TXT(TXT::new(vec!["x".into()])),
                )],
            ),
        );
        let mut ch = public.clone();
        ch.dns_class = DNSClass::CH;
        falls_back("class CH", &answer_bytes(&req, &raw, vec![ch]));
        // A pointer to something other than a name read before (here: into the header).
        let mut bytes = answer_bytes(&req, &raw, vec![public]);
        let owner = bytes.iter().position(|b| *b == 0xc0).unwrap();
        bytes[owner + 1] = 4;
        falls_back("pointer into the header", &bytes);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn fast_query_path_agrees_with_hickory((bytes, common) in arb_query()) {
            let slow = inspect_request_hickory(&bytes);
            let fast = inspect_request_fast(&bytes);
            if let Some(fast) = &fast {
                prop_assert_eq!(Ok(fast.clone()), slow.clone());
            }
            if common && slow.is_ok() {
                prop_assert!(fast.is_some(), "a common query went to hickory");
            }
            prop_assert_eq!(inspect_request(&bytes), slow);
        }

        #[test]
        fn fast_answer_path_agrees_with_hickory(seed in any::<u64>(), which in 0usize..7) {
            let p = &answer_policies()[which];
            let (req, bytes, bounds, common) = generated_answer(seed);
            let slow = extract_answer_hickory(&bytes, &req, p, bounds);
            let fast = extract_answer_fast(&bytes, &req, p, bounds);
            if let Some(fast) = &fast {
                prop_assert_eq!(fast, &slow);
            }
            let rewritten = matches!(&slow, AnswerDecision::Answer(ans) if ans.response != bytes);
            if common && !rewritten {
                prop_assert!(fast.is_some(), "a common answer went to hickory: {:?}", slow);
            }
            prop_assert_eq!(extract_answer(&bytes, &req, p, bounds), slow);
        }
    }
}
