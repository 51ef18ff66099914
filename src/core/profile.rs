//! Profile files: one target per line, `#` comments, blank lines ignored.
//!
//! Parsing is pure (text in, typed entries out) so that the same code checks bundled
//! profiles, user files and test fixtures, and every error can name the exact line.

use std::collections::HashSet;
use std::fmt;

use thiserror::Error;

use super::target::{Notice, Target, TargetError};

/// A profile name: what users type after `--profiles` and what files are called (`NAME.txt`).
///
/// Restricted to a safe file-name alphabet so a name can never walk out of the profiles
/// directory or smuggle separators into annotations.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProfileName(String);

impl ProfileName {
    /// Validate a user-supplied name.
    pub fn new(name: &str) -> Result<Self, ProfileError> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && !name.starts_with('.');
        if ok {
            Ok(ProfileName(name.to_string()))
        } else {
            Err(ProfileError::BadName(name.to_string()))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProfileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One bad line: where it is, what it says, and why it was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{source_name}:{line}: `{text}`: {reason}")]
pub struct LineError {
    /// File path or `bundled:NAME`.
    pub source_name: String,
    pub line: usize,
    pub text: String,
    pub reason: TargetError,
}

/// Errors from loading and composing profiles.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProfileError {
    #[error("invalid profile name `{0}`: use letters, digits, '-', '_' and '.' (not leading), at most 64 characters")]
    BadName(String),
    #[error("{}", render_lines(.0))]
    BadLines(Vec<LineError>),
    #[error("unknown profile `{name}`: available profiles are {available}; add your own as {dir}/{name}.txt")]
    Unknown {
        name: String,
        available: String,
        dir: String,
    },
}

fn render_lines(errors: &[LineError]) -> String {
    let mut out = String::from("invalid profile entries (each line must be a domain, *.domain, IP or CIDR, optionally with :PORT or :PORT/tcp|udp):");
    for e in errors {
        out.push_str("\n  ");
        out.push_str(&e.to_string());
    }
    out
}

/// A notice tied to the line it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineNotice {
    pub source_name: String,
    pub line: usize,
    pub notice: Notice,
}

impl fmt::Display for LineNotice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.source_name, self.line, self.notice)
    }
}

/// A parsed profile: its entries in file order, plus notices for the user.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Profile {
    pub entries: Vec<Target>,
    pub notices: Vec<LineNotice>,
}

/// Parse profile text. Every bad line is reported, and nothing is returned if any line is bad.
pub fn parse_profile(source_name: &str, text: &str) -> Result<Profile, ProfileError> {
    let mut profile = Profile::default();
    let mut errors = Vec::new();
    for (idx, raw_line) in text.lines().enumerate() {
        let line = idx + 1;
        let content = match raw_line.find('#') {
            Some(i) => &raw_line[..i],
            None => raw_line,
        }
        .trim();
        if content.is_empty() {
            continue;
        }
        match Target::parse_with_notices(content) {
            Ok((target, notices)) => {
                profile.entries.push(target);
                profile
                    .notices
                    .extend(notices.into_iter().map(|notice| LineNotice {
                        source_name: source_name.to_string(),
                        line,
                        notice,
                    }));
            }
            Err(reason) => errors.push(LineError {
                source_name: source_name.to_string(),
                line,
                text: content.chars().take(200).collect(),
                reason,
            }),
        }
    }
    if errors.is_empty() {
        Ok(profile)
    } else {
        Err(ProfileError::BadLines(errors))
    }
}

/// Merge several profiles in order, dropping repeats (the first occurrence wins).
pub fn compose<'a>(profiles: impl IntoIterator<Item = &'a Profile>) -> Vec<Target> {
    let profiles: Vec<&Profile> = profiles.into_iter().collect();
    let total = profiles.iter().map(|p| p.entries.len()).sum();
    let mut seen: HashSet<&Target> = HashSet::with_capacity(total);
    let mut out = Vec::with_capacity(total);
    for profile in profiles {
        for entry in &profile.entries {
            if seen.insert(entry) {
                out.push(entry.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_comments_and_blanks_and_keeps_order() {
        let p = parse_profile(
            "t.txt",
            "# header\n\nexample.com  # inline\n  198.51.100.7\n+ *.example.org\n",
        )
        .unwrap();
        let shown: Vec<String> = p.entries.iter().map(|t| t.to_string()).collect();
        assert_eq!(shown, ["example.com", "198.51.100.7", "*.example.org"]);
    }

    #[test]
    fn reports_every_bad_line_with_position() {
        let err = parse_profile("my.txt", "ok.example\nbad..name\n\n1.2.3.4/40\n").unwrap_err();
        let ProfileError::BadLines(lines) = &err else {
            panic!("{err}")
        };
        assert_eq!(lines.iter().map(|l| l.line).collect::<Vec<_>>(), [2, 4]);
        let msg = err.to_string();
        assert!(msg.contains("my.txt:2: `bad..name`"), "{msg}");
        assert!(msg.contains("my.txt:4: `1.2.3.4/40`"), "{msg}");
    }

    #[test]
    fn compose_deduplicates_first_wins() {
        let a = parse_profile("a", "x.example\n198.51.100.1\n").unwrap();
        let b = parse_profile("b", "198.51.100.1\ny.example\nx.example\n").unwrap();
        let shown: Vec<String> = compose([&a, &b]).iter().map(|t| t.to_string()).collect();
        assert_eq!(shown, ["x.example", "198.51.100.1", "y.example"]);
    }

    #[test]
    fn profile_names_cannot_escape() {
        for bad in ["", "../etc", "a/b", ".hidden", "a b", "a,b"] {
            assert!(ProfileName::new(bad).is_err(), "{bad}");
        }
        assert!(ProfileName::new("dev-standard").is_ok());
    }
}
