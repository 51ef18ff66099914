//! `clearance`: the decisions of the interactive loop, without any I/O.
//!
//! Every refused destination (by name when the shield knows it, else by address) is offered
//! once and waits in a queue; each answer (`a`, `s [PROFILE]`, `d`, `i`, `q`) settles the
//! oldest one. What an answer *does* is not decided here: allow and deny go through the same
//! live planner as the `allow` and `deny` commands.

use std::collections::{HashSet, VecDeque};
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::Value;
use thiserror::Error;

use super::audit::AuditRecord;
use super::observe::printable;
use super::profile::{ProfileError, ProfileName};
use super::target::{DomainName, DomainPattern, Host, Target};

/// One refused destination waiting for an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// What an answer allows or denies: the name, or the address when no name is known.
    pub target: Target,
    /// How it was refused, for the prompt: `198.51.100.60, 80/tcp, denied`.
    pub how: String,
}

impl Pending {
    /// The line shown for it (without the newline).
    pub fn prompt(&self) -> String {
        format!(
            "{} ({}) [a]llow, [s]ave [PROFILE], [d]eny, [i]gnore, [q]uit?",
            self.target, self.how
        )
    }
}

/// An answer, read from one line of input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `a`: allow now (like `terok-shield allow`).
    Allow,
    /// `s [PROFILE]`: allow now and keep it in a user profile (the default one when `None`).
    Save(Option<ProfileName>),
    /// `d`: deny (like `terok-shield deny`; persists).
    Deny,
    /// `i`: leave it as it is; it is not offered again this session.
    Ignore,
    /// `q`: end the session.
    Quit,
}

/// Why an input line is not an answer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AnswerError {
    #[error("`{0}` is not an answer: type a (allow), s [PROFILE] (allow and save), d (deny), i (ignore) or q (quit)")]
    Unknown(String),
    #[error(transparent)]
    Profile(#[from] ProfileError),
}

/// Parse one line of input (surrounding blanks ignored, case-insensitive words).
pub fn parse_answer(line: &str) -> Result<Answer, AnswerError> {
    let line = line.trim();
    let (word, rest) = match line.split_once(char::is_whitespace) {
        Some((w, r)) => (w, r.trim()),
        None => (line, ""),
    };
    let word = word.to_ascii_lowercase();
    let answer = match (word.as_str(), rest) {
        ("a" | "allow", "") => Answer::Allow,
        ("s" | "save", "") => Answer::Save(None),
        ("s" | "save", profile) => Answer::Save(Some(ProfileName::new(profile)?)),
        ("d" | "deny", "") => Answer::Deny,
        ("i" | "ignore", "") => Answer::Ignore,
        ("q" | "quit", "") => Answer::Quit,
        _ => return Err(AnswerError::Unknown(printable(line))),
    };
    Ok(answer)
}

/// The refused destination a record reports, if an answer could change it: refused packets
/// (any verdict) and DNS questions refused as not allowlisted or in block mode. A deny
/// (`denied`) or a refused query type would not be lifted by allowing the name.
pub fn refused_destination(record: &AuditRecord) -> Option<Pending> {
    let d = &record.detail;
    let text = |key: &str| d.get(key).and_then(Value::as_str);
    let name = text("name").and_then(|n| n.parse::<DomainName>().ok());
    let (host, how) = match record.event.as_str() {
        "blocked" => {
            let dst: IpAddr = text("dst")?.parse().ok()?;
            let proto = printable(text("proto").unwrap_or("?"));
            let place = match d.get("port").and_then(Value::as_u64) {
                Some(port) => format!("{port}/{proto}"),
                None => proto,
            };
            let verdict = printable(text("verdict").unwrap_or("blocked"));
            let host = match name {
                Some(name) => Host::Domain(DomainPattern {
                    name,
                    wildcard: false,
                }),
                None => Host::Net(IpNet::from(dst)),
            };
            (host, format!("{dst}, {place}, {verdict}"))
        }
        "dns_refused" if matches!(text("reason"), Some("not_allowlisted" | "block_mode")) => {
            let qtype = printable(text("qtype").unwrap_or("?"));
            let host = Host::Domain(DomainPattern {
                name: name?,
                wildcard: false,
            });
            (host, format!("DNS {qtype} refused"))
        }
        _ => return None,
    };
    Some(Pending {
        target: Target { host, scope: None },
        how,
    })
}

/// The session's memory: what was offered, and what waits for an answer.
#[derive(Debug, Default)]
pub struct Clearance {
    offered: HashSet<Target>,
    queue: VecDeque<Pending>,
}

impl Clearance {
    /// Look at one audit record: a refused destination not offered before joins the queue
    /// and is returned, to be shown.
    pub fn observe(&mut self, record: &AuditRecord) -> Option<&Pending> {
        let pending = refused_destination(record)?;
        if !self.offered.insert(pending.target.clone()) {
            return None;
        }
        self.queue.push_back(pending);
        self.queue.back()
    }

    /// The destination the next answer settles.
    pub fn waiting(&self) -> Option<&Pending> {
        self.queue.front()
    }

    /// Take the oldest destination off the queue (it has been answered).
    pub fn settle(&mut self) -> Option<Pending> {
        self.queue.pop_front()
    }

    /// How many destinations wait for an answer.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn record(event: &str, detail: Value) -> AuditRecord {
        AuditRecord::new(0, "c1", event, true, detail)
    }

    #[test]
    fn answers_parse_and_typos_say_what_would_work() {
        assert_eq!(parse_answer(" a \n"), Ok(Answer::Allow));
        assert_eq!(parse_answer("Allow"), Ok(Answer::Allow));
        assert_eq!(parse_answer("s"), Ok(Answer::Save(None)));
        assert_eq!(
            parse_answer("s  my-proj"),
            Ok(Answer::Save(Some(ProfileName::new("my-proj").unwrap())))
        );
        assert_eq!(parse_answer("d"), Ok(Answer::Deny));
        assert_eq!(parse_answer("i"), Ok(Answer::Ignore));
        assert_eq!(parse_answer("q"), Ok(Answer::Quit));
        let err = parse_answer("x").unwrap_err();
        assert!(err.to_string().contains("a (allow)"), "{err}");
        assert!(parse_answer("").is_err());
        assert!(parse_answer("a now").is_err());
        assert!(matches!(
            parse_answer("s ../etc"),
            Err(AnswerError::Profile(_))
        ));
    }

    #[test]
    fn each_destination_is_offered_once_by_name_when_known() {
        let mut c = Clearance::default();
        let named = record(
            "blocked",
            json!({"verdict":"denied","dst":"198.51.100.60","proto":"tcp","port":80,"name":"svc.example.com","count":1,"first":true}),
        );
        let shown = c.observe(&named).cloned().unwrap();
        assert_eq!(shown.target.to_string(), "svc.example.com");
        assert_eq!(
            shown.prompt(),
            "svc.example.com (198.51.100.60, 80/tcp, denied) [a]llow, [s]ave [PROFILE], [d]eny, [i]gnore, [q]uit?"
        );
        assert!(c.observe(&named).is_none(), "offered once");
        let refused = record(
            "dns_refused",
            json!({"name":"svc.example.com","qtype":"A","reason":"not_allowlisted"}),
        );
        assert!(
            c.observe(&refused).is_none(),
            "the same name, refused by DNS"
        );
        let bare = record(
            "blocked",
            json!({"verdict":"private","dst":"fd00::1","proto":"icmpv6"}),
        );
        assert_eq!(
            c.observe(&bare).unwrap().how,
            "fd00::1, icmpv6, private".to_string()
        );
        assert_eq!(c.queued(), 2);
        assert_eq!(c.settle().unwrap().target.to_string(), "svc.example.com");
        assert_eq!(c.waiting().unwrap().target.to_string(), "fd00::1");
    }

    #[test]
    fn only_what_an_answer_could_change_is_offered() {
        let mut c = Clearance::default();
        for (event, detail) in [
            (
                "dns_refused",
                json!({"name":"a.example","qtype":"A","reason":"denied"}),
            ),
            (
                "dns_refused",
                json!({"name":"a.example","qtype":"ANY","reason":"query_type"}),
            ),
            (
                "bypass",
                json!({"verdict":"bypass","dst":"198.51.100.1","proto":"tcp","port":80}),
            ),
            (
                "blocked",
                json!({"verdict":"denied","dst":"not an address","proto":"tcp"}),
            ),
            (
                "dns_refused",
                json!({"name":"bad..name","reason":"not_allowlisted"}),
            ),
            ("apply", json!({})),
        ] {
            assert!(c.observe(&record(event, detail)).is_none(), "{event}");
        }
        // A name the log cannot vouch for falls back to the address.
        let odd = record(
            "blocked",
            json!({"verdict":"denied","dst":"198.51.100.9","proto":"udp","port":9,"name":"not a name"}),
        );
        assert_eq!(c.observe(&odd).unwrap().target.to_string(), "198.51.100.9");
    }
}
