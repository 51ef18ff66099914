//! OCI state on the hook's stdin (src/core/oci.rs `parse_hook_input`) and the annotation-only
//! request of a CRI-O pod (src/core/annotated.rs `parse_request`): whoever creates the
//! container writes the annotations.
//!
//! Invariants: an accepted state names a valid container, a state directory that is absolute
//! and free of `..` (annotation-only: exactly RUN_DIR/containers/NAME, never elsewhere), a pid
//! above 1 whenever one is required, and on a node that refuses state directories only
//! annotation-only containers pass. An accepted request names 1 to 32 valid, distinct
//! profiles and the mode and tier its annotations spell.
#![no_main]

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use terok_shield::core::annotated::{self, check_container_id, parse_request, MAX_PROFILES};
use terok_shield::core::bundle::ContainerName;
use terok_shield::core::oci::{annotation, parse_hook_input_with, HookSettings};
use terok_shield::core::policy::Mode;
use terok_shield::core::profile::ProfileName;

fn clean(p: &Path) -> bool {
    p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

fn check_state(bytes: &[u8]) {
    for annotations_only in [false, true] {
        let settings = HookSettings {
            run_dir: PathBuf::from("/run/ts"),
            annotations_only,
        };
        for need_pid in [true, false] {
            let Ok(input) = parse_hook_input_with(bytes, need_pid, &settings) else {
                continue;
            };
            assert_eq!(
                ContainerName::new(input.name.as_str()).as_ref(),
                Ok(&input.name)
            );
            assert!(clean(&input.state_dir), "{:?}", input.state_dir);
            if need_pid {
                assert!(input.pid.is_some_and(|p| p > 1));
            }
            match &input.annotated {
                Some(req) => {
                    assert_eq!(
                        input.state_dir,
                        Path::new("/run/ts/containers").join(input.name.as_str())
                    );
                    assert!(ContainerName::new(&input.container_id).is_ok());
                    assert_eq!(input.instance.as_deref(), Some(input.container_id.as_str()));
                    assert!(!req.profiles.is_empty() && req.profiles.len() <= MAX_PROFILES);
                }
                None => assert!(!annotations_only, "a state dir passed on a CRI-O node"),
            }
        }
    }
}

fn check_request(profiles: &str, annotations: &BTreeMap<String, String>) {
    let Ok(req) = parse_request(profiles, annotations) else {
        return;
    };
    assert!(!req.profiles.is_empty() && req.profiles.len() <= MAX_PROFILES);
    for (i, p) in req.profiles.iter().enumerate() {
        assert_eq!(ProfileName::new(p.as_str()).as_ref(), Ok(p));
        assert!(profiles.split([',', ' ']).any(|w| w == p.as_str()));
        assert!(!req.profiles[..i].contains(p));
    }
    let mode = match annotations
        .get(annotated::annotation::MODE)
        .map(String::as_str)
    {
        None | Some("up") => Mode::DenyAll,
        Some("down") => Mode::Bypass,
        Some("down_all") => Mode::BypassAll,
        Some("block") => Mode::Block,
        Some(other) => panic!("mode {other:?} accepted"),
    };
    assert_eq!(req.mode, mode);
}

/// A state whose annotations come from the shield's vocabulary, with hostile values.
fn generated(u: &mut Unstructured) -> arbitrary::Result<Vec<u8>> {
    const KEYS: &[&str] = &[
        annotation::NAME,
        annotation::STATE_DIR,
        annotation::PROFILES,
        annotation::INSTANCE,
        annotation::VERSION,
        annotated::annotation::MODE,
        annotated::annotation::DNS_TIER,
        annotation::PODMAN_AUTOREMOVE,
    ];
    const VALUES: &[&str] = &[
        "c1",
        "../x",
        "/s/c1",
        "/s/../etc",
        "rel/dir",
        "/",
        "//s//c1/",
        "/s/./c1",
        "base dev-node",
        "base,,base",
        " ",
        "",
        "up",
        "down",
        "down_all",
        "block",
        "static",
        "dnsmasq",
        "true",
        "TRUE",
        "a\u{0}b",
        "..",
        ".",
        "c1/../../x",
    ];
    let mut ann = serde_json::Map::new();
    for _ in 0..u.int_in_range(0..=8)? {
        let key = if u.ratio(1, 8)? {
            u.arbitrary::<String>()?
        } else {
            u.choose(KEYS)?.to_string()
        };
        let value = if u.ratio(1, 4)? {
            u.arbitrary::<String>()?
        } else {
            u.choose(VALUES)?.to_string()
        };
        ann.insert(key, value.into());
    }
    let mut state = serde_json::json!({
        "ociVersion": "1.0.2",
        "id": *u.choose(&["abc", "0123abcd", "../../x", "", "a b"])?,
        "status": "creating",
        "bundle": "/b",
        "annotations": ann,
    });
    if u.arbitrary()? {
        state["pid"] = u.arbitrary::<i64>()?.into();
    }
    Ok(serde_json::to_vec(&state).unwrap())
}

fuzz_target!(|data: &[u8]| {
    check_state(data);
    let mut u = Unstructured::new(data);
    if let Ok(state) = generated(&mut u) {
        check_state(&state);
    }
    let text = String::from_utf8_lossy(data);
    let mut ann = BTreeMap::new();
    if let Some((profiles, rest)) = text.split_once('\n') {
        let mut parts = rest.splitn(2, '\n');
        if let Some(mode) = parts.next() {
            ann.insert(annotated::annotation::MODE.to_string(), mode.to_string());
        }
        if let Some(tier) = parts.next() {
            ann.insert(
                annotated::annotation::DNS_TIER.to_string(),
                tier.to_string(),
            );
        }
        check_request(profiles, &ann);
    } else {
        check_request(&text, &ann);
    }
    let _ = check_container_id(&text);
});
