//! Validated targets: the only vocabulary the ruleset generator accepts.
//!
//! Every string a user can influence (profile lines, CLI arguments, annotations, state files)
//! is parsed here into closed types. Nothing downstream ever sees the raw text again, so the
//! generator cannot be tricked into emitting nft syntax it did not choose.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why a target string was refused; each variant's message says what would be accepted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TargetError {
    #[error("empty target")]
    Empty,
    #[error("`{0}` is not a valid domain, IP address or CIDR (expected e.g. example.com, *.example.com, 198.51.100.7, 198.51.100.0/24, 2001:db8::1, [2001:db8::1]:443, example.com:443/tcp)")]
    Unrecognised(String),
    #[error("invalid domain `{name}`: {reason}")]
    BadDomain { name: String, reason: &'static str },
    #[error("invalid port `{0}`: expected a number from 1 to 65535")]
    BadPort(String),
    #[error("invalid protocol `{0}`: expected tcp or udp")]
    BadProtocol(String),
    #[error("invalid prefix length in `{0}`: at most 32 for IPv4 and 128 for IPv6")]
    BadPrefix(String),
    #[error("`{0}` is a wildcard CIDR or address; wildcards (`*.`) apply only to domain names")]
    WildcardAddress(String),
}

/// A lower-case DNS name in letters-digits-hyphens form, without a trailing dot.
///
/// Kept strict on purpose: a name that passes here is safe to print inside nft text, a DNS
/// question and a log line without any escaping.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DomainName(String);

impl DomainName {
    /// The canonical text (lower case, no trailing dot).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when `other` is this name or lies beneath it (`a.b.example.com` under `example.com`).
    pub fn is_parent_of(&self, other: &DomainName) -> bool {
        other.0.len() > self.0.len()
            && other.0.ends_with(self.0.as_str())
            && other.0.as_bytes()[other.0.len() - self.0.len() - 1] == b'.'
    }
}

impl FromStr for DomainName {
    type Err = TargetError;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let bad = |reason| TargetError::BadDomain {
            name: raw.to_string(),
            reason,
        };
        let name = raw.strip_suffix('.').unwrap_or(raw).to_ascii_lowercase();
        if name.is_empty() {
            return Err(TargetError::Empty);
        }
        if name.len() > 253 {
            return Err(bad("longer than 253 characters"));
        }
        let labels: Vec<&str> = name.split('.').collect();
        for label in &labels {
            if label.is_empty() {
                return Err(bad("empty label (two dots in a row?)"));
            }
            if label.len() > 63 {
                return Err(bad("a label is longer than 63 characters"));
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            {
                return Err(bad("only letters, digits, '-' and '_' are allowed"));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(bad("a label may not start or end with '-'"));
            }
        }
        let tld = labels[labels.len() - 1];
        if tld.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("the last label is numeric (an incomplete IP address?)"));
        }
        Ok(DomainName(name))
    }
}

impl TryFrom<String> for DomainName {
    type Error = TargetError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<DomainName> for String {
    fn from(value: DomainName) -> Self {
        value.0
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A domain entry: the exact name, or (`*.name`) any name strictly beneath it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct DomainPattern {
    pub name: DomainName,
    /// `*.example.com` matches `a.example.com` and `b.a.example.com`, never `example.com`.
    pub wildcard: bool,
}

impl DomainPattern {
    /// Whether a queried name is covered by this pattern.
    pub fn matches(&self, query: &DomainName) -> bool {
        if self.wildcard {
            self.name.is_parent_of(query)
        } else {
            &self.name == query
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            write!(f, "*.{}", self.name)
        } else {
            write!(f, "{}", self.name)
        }
    }
}

/// Transport protocol of a port-scoped entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number (6, 17).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    /// The nft keyword; a closed set, so safe to print.
    pub fn keyword(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A destination port, optionally limited to one protocol (`:443` means TCP and UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PortScope {
    pub port: u16,
    pub protocol: Option<Protocol>,
}

impl PortScope {
    /// The protocols this scope opens.
    pub fn protocols(&self) -> &'static [Protocol] {
        match self.protocol {
            Some(Protocol::Tcp) => &[Protocol::Tcp],
            Some(Protocol::Udp) => &[Protocol::Udp],
            None => &[Protocol::Tcp, Protocol::Udp],
        }
    }
}

impl fmt::Display for PortScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.port)?;
        if let Some(p) = self.protocol {
            write!(f, "/{}", p.keyword())?;
        }
        Ok(())
    }
}

/// What an entry names: a DNS pattern or a network (a single address is a /32 or /128).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Host {
    Domain(DomainPattern),
    Net(IpNet),
}

/// One allow or deny target: a host, optionally scoped to a port and protocol.
///
/// Stored as its canonical text (`example.com:443/tcp`) and re-validated when read back, so a
/// tampered state file cannot smuggle in anything `Target::parse` would refuse.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Target {
    pub host: Host,
    pub scope: Option<PortScope>,
}

/// Non-fatal remarks about a valid target that a careful user wants to see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The target lies in a private range, which is otherwise rejected.
    PrivateRange(IpNet),
    /// The target opens a very wide range (shorter than /16, or /48 for IPv6).
    WideRange(IpNet),
    /// Host bits were set in a CIDR and were cleared (`198.51.100.7/24` -> `198.51.100.0/24`).
    HostBitsCleared { written: String, used: IpNet },
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Notice::PrivateRange(n) => {
                write!(
                    f,
                    "{n} is in a private range; it is allowed because you listed it"
                )
            }
            Notice::WideRange(n) => write!(
                f,
                "{n} is a very wide range ({} addresses or more); check it is intended",
                if n.addr().is_ipv4() { "65,536" } else { "2^80" }
            ),
            Notice::HostBitsCleared { written, used } => {
                write!(f, "{written} has host bits set; using {used}")
            }
        }
    }
}

impl TryFrom<String> for Target {
    type Error = TargetError;
    fn try_from(v: String) -> Result<Self, Self::Error> {
        Target::parse(&v)
    }
}

impl From<Target> for String {
    fn from(t: Target) -> String {
        t.to_string()
    }
}

impl Target {
    /// Parse one target as written in a profile or on the command line.
    pub fn parse(raw: &str) -> Result<Target, TargetError> {
        Self::parse_with_notices(raw).map(|(t, _)| t)
    }

    /// Parse, also returning the notices a user should see for this target.
    pub fn parse_with_notices(raw: &str) -> Result<(Target, Vec<Notice>), TargetError> {
        let text = raw.trim();
        let text = text.strip_prefix('+').unwrap_or(text).trim();
        if text.is_empty() {
            return Err(TargetError::Empty);
        }
        let unrecognised = || TargetError::Unrecognised(raw.trim().to_string());
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(unrecognised());
        }
        let mut notices = Vec::new();

        // `[v6 or v6/len]` with an optional `:port[/proto]`.
        if let Some(rest) = text.strip_prefix('[') {
            let (inner, after) = rest.split_once(']').ok_or_else(unrecognised)?;
            let net = parse_net(inner, &mut notices)?.ok_or_else(unrecognised)?;
            if !net.addr().is_ipv6() {
                return Err(unrecognised());
            }
            let scope = match after {
                "" => None,
                s => Some(parse_scope(s.strip_prefix(':').ok_or_else(unrecognised)?)?),
            };
            return Ok(Self::finish(Host::Net(net), scope, notices));
        }

        // A bare IPv6 address or network: contains two or more ':'; no port allowed.
        if text.matches(':').count() >= 2 {
            if text.starts_with("*.") {
                return Err(TargetError::WildcardAddress(text.to_string()));
            }
            let net = parse_net(text, &mut notices)?.ok_or_else(unrecognised)?;
            return Ok(Self::finish(Host::Net(net), None, notices));
        }

        // host[:port[/proto]] where host is IPv4, IPv4 CIDR or a domain pattern.
        let (host, scope) = match text.split_once(':') {
            Some((h, s)) => (h, Some(parse_scope(s)?)),
            None => (text, None),
        };
        if let Some(net) = parse_net(host, &mut notices)? {
            return Ok(Self::finish(Host::Net(net), scope, notices));
        }
        let (wildcard, name) = match host.strip_prefix("*.") {
            Some(n) => (true, n),
            None => (false, host),
        };
        if name.contains('*') {
            return Err(TargetError::BadDomain {
                name: host.to_string(),
                reason: "`*` is allowed only as a leading `*.`",
            });
        }
        if name.contains('/') {
            return Err(unrecognised());
        }
        if wildcard && name.parse::<IpAddr>().is_ok() {
            return Err(TargetError::WildcardAddress(host.to_string()));
        }
        if !wildcard && looks_numeric(name) {
            return Err(unrecognised());
        }
        let name: DomainName = name.parse()?;
        Ok(Self::finish(
            Host::Domain(DomainPattern { name, wildcard }),
            scope,
            notices,
        ))
    }

    fn finish(
        host: Host,
        scope: Option<PortScope>,
        mut notices: Vec<Notice>,
    ) -> (Target, Vec<Notice>) {
        if let Host::Net(net) = &host {
            if crate::core::private::is_private(net) {
                notices.push(Notice::PrivateRange(*net));
            }
            let wide = match net {
                IpNet::V4(n) => n.prefix_len() < 16,
                IpNet::V6(n) => n.prefix_len() < 48,
            };
            if wide {
                notices.push(Notice::WideRange(*net));
            }
        }
        (Target { host, scope }, notices)
    }
}

/// Numbers and dots only: an IPv4 address that failed to parse, not a name.
fn looks_numeric(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

/// `Ok(None)` when `s` is not an address at all (so it may be a domain).
fn parse_net(s: &str, notices: &mut Vec<Notice>) -> Result<Option<IpNet>, TargetError> {
    if let Ok(addr) = s.parse::<IpAddr>() {
        return Ok(Some(IpNet::from(addr)));
    }
    let Some((addr, len)) = s.split_once('/') else {
        return Ok(None);
    };
    let Ok(addr) = addr.parse::<IpAddr>() else {
        return Ok(None);
    };
    let len: u8 = len
        .parse()
        .map_err(|_| TargetError::BadPrefix(s.to_string()))?;
    let net = match addr {
        IpAddr::V4(a) => {
            IpNet::V4(Ipv4Net::new(a, len).map_err(|_| TargetError::BadPrefix(s.to_string()))?)
        }
        IpAddr::V6(a) => {
            IpNet::V6(Ipv6Net::new(a, len).map_err(|_| TargetError::BadPrefix(s.to_string()))?)
        }
    };
    let trunc = net.trunc();
    if trunc != net {
        notices.push(Notice::HostBitsCleared {
            written: s.to_string(),
            used: trunc,
        });
    }
    Ok(Some(trunc))
}

impl FromStr for PortScope {
    type Err = TargetError;

    /// `PORT` or `PORT/tcp|udp`, as after the `:` of a target.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_scope(s)
    }
}

fn parse_scope(s: &str) -> Result<PortScope, TargetError> {
    let (port, protocol) = match s.split_once('/') {
        Some((p, proto)) => {
            let protocol = match proto.to_ascii_lowercase().as_str() {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                _ => return Err(TargetError::BadProtocol(proto.to_string())),
            };
            (p, Some(protocol))
        }
        None => (s, None),
    };
    let bad = || TargetError::BadPort(port.to_string());
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(bad());
    }
    Ok(PortScope { port, protocol })
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.host, &self.scope) {
            (Host::Domain(d), None) => write!(f, "{d}"),
            (Host::Domain(d), Some(s)) => write!(f, "{d}:{s}"),
            (Host::Net(n), None) => write!(f, "{}", display_net(n)),
            (Host::Net(n @ IpNet::V4(_)), Some(s)) => write!(f, "{}:{s}", display_net(n)),
            (Host::Net(n @ IpNet::V6(_)), Some(s)) => write!(f, "[{}]:{s}", display_net(n)),
        }
    }
}

/// A network as users write it: a bare address for a single host, else `addr/len`.
pub fn display_net(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Target {
        Target::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_every_documented_form() {
        let cases = [
            ("example.com", "example.com"),
            ("Example.COM.", "example.com"),
            ("*.example.com", "*.example.com"),
            ("example.com:443", "example.com:443"),
            ("example.com:443/TCP", "example.com:443/tcp"),
            ("198.51.100.7", "198.51.100.7"),
            ("198.51.100.7:22/tcp", "198.51.100.7:22/tcp"),
            ("198.51.100.0/24", "198.51.100.0/24"),
            ("198.51.100.0/24:53/udp", "198.51.100.0/24:53/udp"),
            ("2001:db8::1", "2001:db8::1"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("[2001:db8::1]:443", "[2001:db8::1]:443"),
            ("[2001:db8::/48]:443/udp", "[2001:db8::/48]:443/udp"),
            ("+ example.org", "example.org"),
            ("_dmarc.example.com", "_dmarc.example.com"),
        ];
        for (input, shown) in cases {
            assert_eq!(ok(input).to_string(), shown, "{input}");
        }
    }

    #[test]
    fn refuses_malformed_and_injection_like_text() {
        for bad in [
            "",
            "+",
            "exa mple.com",
            "example.com; flush ruleset",
            "example..com",
            "-example.com",
            "example-.com",
            "ex\"ample.com",
            "1.2.3",
            "256.1.1.1",
            "198.51.100.0/33",
            "2001:db8::/129",
            "example.com:0",
            "example.com:65536",
            "example.com:http",
            "example.com:443/icmp",
            "*.198.51.100.7",
            "ex*ample.com",
            "*example.com",
            "[198.51.100.7]:80",
            "[2001:db8::1]443",
            "2001:db8::1:443/tcp",
            "{ 1.2.3.4 }",
            "@allow_v4",
            "a\u{0}b.com",
            "münchen.de",
        ] {
            assert!(Target::parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn wildcard_matches_subdomains_only() {
        let Host::Domain(p) = ok("*.example.com").host else {
            panic!()
        };
        assert!(p.matches(&"a.example.com".parse().unwrap()));
        assert!(p.matches(&"b.a.example.com".parse().unwrap()));
        assert!(!p.matches(&"example.com".parse().unwrap()));
        assert!(!p.matches(&"badexample.com".parse().unwrap()));
        let Host::Domain(exact) = ok("example.com").host else {
            panic!()
        };
        assert!(!exact.matches(&"a.example.com".parse().unwrap()));
    }

    #[test]
    fn notices_flag_private_wide_and_host_bits() {
        let (_, n) = Target::parse_with_notices("10.1.2.3").unwrap();
        assert!(matches!(n[..], [Notice::PrivateRange(_)]));
        let (_, n) = Target::parse_with_notices("198.0.0.0/8").unwrap();
        assert!(matches!(n[..], [Notice::WideRange(_)]));
        let (t, n) = Target::parse_with_notices("198.51.100.7/24").unwrap();
        assert_eq!(t.to_string(), "198.51.100.0/24");
        assert!(matches!(n[..], [Notice::HostBitsCleared { .. }]));
        let (_, n) = Target::parse_with_notices("2001:db8::/32").unwrap();
        assert!(matches!(n[..], [Notice::WideRange(_)]));
        let (_, n) = Target::parse_with_notices("fd00:5eed::1").unwrap();
        assert!(matches!(n[..], [Notice::PrivateRange(_)]));
        assert!(Target::parse_with_notices("198.51.100.7")
            .unwrap()
            .1
            .is_empty());
    }
}
