//! The allowlist profiles shipped inside the binary.
//!
//! Compiled in with `include_str!` so a shield never depends on data files being installed
//! next to it, and so the bundled lists are exactly the ones the tests below checked.

/// Every bundled profile as `(name, text)`, sorted by name.
const BUNDLED: &[(&str, &str)] = &[
    ("base", include_str!("../../profiles/base.txt")),
    ("dev-node", include_str!("../../profiles/dev-node.txt")),
    ("dev-python", include_str!("../../profiles/dev-python.txt")),
    (
        "dev-standard",
        include_str!("../../profiles/dev-standard.txt"),
    ),
    ("nvidia-hpc", include_str!("../../profiles/nvidia-hpc.txt")),
];

/// All bundled profiles as `(name, text)`, sorted by name, so listings are stable.
pub fn bundled() -> &'static [(&'static str, &'static str)] {
    BUNDLED
}

/// The text of one bundled profile, or `None` when no profile of that name ships with us.
pub fn bundled_text(name: &str) -> Option<&'static str> {
    BUNDLED
        .iter()
        .find(|(bundled_name, _)| *bundled_name == name)
        .map(|(_, text)| *text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::profile::{parse_profile, ProfileName};
    use crate::core::target::Notice;

    #[test]
    fn every_bundled_profile_parses_cleanly_and_is_not_empty() {
        for (name, text) in bundled() {
            ProfileName::new(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            let profile = parse_profile(&format!("bundled:{name}"), text)
                .unwrap_or_else(|e| panic!("bundled profile {name} does not parse: {e}"));
            assert!(
                !profile.entries.is_empty(),
                "bundled profile {name} is empty"
            );
            // A shipped list must never open private or huge ranges behind the user's back.
            for n in &profile.notices {
                assert!(
                    !matches!(n.notice, Notice::PrivateRange(_) | Notice::WideRange(_)),
                    "{n}"
                );
            }
        }
    }

    #[test]
    fn bundled_list_is_sorted_and_unique() {
        let names: Vec<&str> = bundled().iter().map(|(n, _)| *n).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(names, sorted);
        assert_eq!(
            names,
            [
                "base",
                "dev-node",
                "dev-python",
                "dev-standard",
                "nvidia-hpc"
            ]
        );
    }

    #[test]
    fn dev_standard_has_github_and_does_not_repeat_base() {
        let std = parse_profile("s", bundled_text("dev-standard").unwrap()).unwrap();
        let base = parse_profile("b", bundled_text("base").unwrap()).unwrap();
        let shown: Vec<String> = std.entries.iter().map(|t| t.to_string()).collect();
        assert!(shown.iter().any(|s| s == "github.com"), "{shown:?}");
        for entry in &base.entries {
            assert!(
                !std.entries.contains(entry),
                "dev-standard repeats base entry {entry}"
            );
        }
    }

    #[test]
    fn lookup_by_name() {
        assert!(bundled_text("base").is_some());
        assert!(bundled_text("no-such-profile").is_none());
        assert!(bundled_text("").is_none());
    }
}
