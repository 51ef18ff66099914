//! Profile files and targets (src/core/profile.rs, target.rs): the text users, bundled
//! profiles and state files hand to the only parser whose output reaches the ruleset.
//!
//! Invariants: a parsed profile renders (one canonical target per line) to text that parses
//! back to the same entries, without notices about host bits; every canonical target survives
//! the JSON round trip of state.json; canonical text uses only the safe alphabet; a profile is
//! refused exactly when one of its lines is refused on its own, and every bad line is named.
#![no_main]

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use terok_shield::core::profile::{compose, parse_profile, ProfileError, ProfileName};
use terok_shield::core::target::{DomainName, Host, Notice, Target};

fn safe(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-*:/[]".contains(&b))
}

fn check_target(t: &Target) {
    let text = t.to_string();
    assert!(safe(&text), "unsafe canonical text {text:?}");
    let (again, notices) =
        Target::parse_with_notices(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert_eq!(&again, t, "{text:?} re-parses to another target");
    assert_eq!(again.to_string(), text);
    assert!(
        !notices
            .iter()
            .any(|n| matches!(n, Notice::HostBitsCleared { .. })),
        "canonical {text:?} has host bits set"
    );
    let json = serde_json::to_string(t).unwrap();
    let back: Target = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, t);
    if let Host::Domain(d) = &t.host {
        assert!(d.name.as_str().len() <= 253);
        assert!(
            !d.wildcard || !d.matches(&d.name),
            "a wildcard matched its apex"
        );
        assert_eq!(d.name.as_str().parse::<DomainName>().as_ref(), Ok(&d.name));
    }
}

fn content(line: &str) -> &str {
    match line.find('#') {
        Some(i) => &line[..i],
        None => line,
    }
    .trim()
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let lines: Vec<&str> = text.lines().collect();
    let bad_alone: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| !content(l).is_empty() && Target::parse(content(l)).is_err())
        .map(|(i, _)| i + 1)
        .collect();
    match parse_profile("fuzz.txt", &text) {
        Ok(p) => {
            assert!(bad_alone.is_empty());
            let wanted = lines.iter().filter(|l| !content(l).is_empty()).count();
            assert_eq!(p.entries.len(), wanted);
            p.entries.iter().for_each(check_target);
            let rendered: String = p.entries.iter().map(|t| format!("{t}\n")).collect();
            let again = parse_profile("again.txt", &rendered).expect("a rendered profile parses");
            assert_eq!(again.entries, p.entries);
            let once = compose([&p]);
            assert_eq!(compose([&p, &p]), once);
            for (i, t) in once.iter().enumerate() {
                assert!(!once[..i].contains(t), "compose kept a repeat");
            }
        }
        Err(ProfileError::BadLines(errors)) => {
            let named: Vec<usize> = errors.iter().map(|e| e.line).collect();
            assert_eq!(named, bad_alone, "errors name exactly the bad lines");
            assert!(errors.iter().all(|e| e.text.chars().count() <= 200));
        }
        Err(other) => panic!("unexpected error {other:?}"),
    }
    for line in lines.iter().take(16) {
        if let Ok(name) = ProfileName::new(line) {
            assert_eq!(name.as_str(), *line);
            assert!(!line.contains('/') && !line.starts_with('.') && !line.is_empty());
        }
        if let Ok(name) = line.parse::<DomainName>() {
            assert_eq!(name.as_str().parse::<DomainName>().as_ref(), Ok(&name));
            assert!(safe(name.as_str()));
        }
    }
    // Structured: targets the text above would rarely spell (any IPv6 network with a port).
    let mut u = Unstructured::new(data);
    for _ in 0..32 {
        let Ok(t) = fuzz_support::target(&mut u) else {
            break;
        };
        check_target(&t);
        if u.is_empty() {
            break;
        }
    }
});
