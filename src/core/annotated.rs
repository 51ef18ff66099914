//! Annotation-only shielding (CRI-O / Kubernetes): a container that carries the shield's
//! annotations but no prepared bundle gets its policy from the annotations alone.
//!
//! CRI-O copies a pod's annotations into the OCI config of every container of the pod and
//! calls the same hooks.d descriptors podman does, so a pod opts in with
//! `terok.shield.name` (which the descriptors match) plus `terok.shield.profiles`. Nothing
//! else prepared the container: the hook builds the bundle itself, as root, under a run
//! directory. Every annotation is written by whoever may create pods, so each is validated
//! here and anything unexpected refuses the container.
//!
//! The containers of a pod share one network namespace: the first one the hook sees (the
//! infra container, when the runtime has one) shields it and owns the state; the others
//! only join, after checking that the namespace is the owner's and the firewall intact.

use std::collections::BTreeMap;

use thiserror::Error;

use super::bundle::{Bundle, ContainerName, DnsTier, BUNDLE_FORMAT};
use super::config::{Config, DnsTier as ConfiguredTier};
use super::policy::Mode;
use super::profile::ProfileName;
use super::target::Target;

/// Annotations read in annotation-only mode (on top of `terok.shield.name`).
pub mod annotation {
    /// Space- or comma-separated profile names.
    pub const PROFILES: &str = "terok.shield.profiles";
    /// Initial mode: `up` (default), `down`, `down_all` or `block`.
    pub const MODE: &str = "terok.shield.mode";
    /// DNS tier: `auto`, `builtin`, `dnsmasq` or `static`; default from `config.yml`.
    pub const DNS_TIER: &str = "terok.shield.dns_tier";
}

/// Longest `terok.shield.profiles` value read, and most names in it.
pub const MAX_PROFILES_BYTES: usize = 1024;
pub const MAX_PROFILES: usize = 32;

/// Why the annotations of an annotation-only container were refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AnnotatedError {
    #[error("annotation {name} has an invalid value `{value}`: {why}")]
    Invalid {
        name: &'static str,
        value: String,
        why: String,
    },
    #[error("container id `{0}` is not a plain runtime id (letters, digits, '_', '.', '-', at most 128 characters)")]
    BadId(String),
}

/// What a pod asked for, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub profiles: Vec<ProfileName>,
    pub mode: Mode,
    /// `None`: the tier `config.yml` configures.
    pub dns_tier: Option<DnsTier>,
}

fn invalid(name: &'static str, value: &str, why: impl Into<String>) -> AnnotatedError {
    // Hostile values are shown shortened: they end up in logs.
    let mut shown: String = value.chars().take(80).collect();
    if shown.len() < value.len() {
        shown.push_str("...");
    }
    AnnotatedError::Invalid {
        name,
        value: shown.escape_debug().to_string(),
        why: why.into(),
    }
}

/// Parse the annotation-only request; `profiles` is the value of `terok.shield.profiles`.
pub fn parse_request(
    profiles: &str,
    annotations: &BTreeMap<String, String>,
) -> Result<Request, AnnotatedError> {
    let p = annotation::PROFILES;
    if profiles.len() > MAX_PROFILES_BYTES {
        return Err(invalid(
            p,
            profiles,
            format!("longer than {MAX_PROFILES_BYTES} bytes"),
        ));
    }
    let mut names: Vec<ProfileName> = Vec::new();
    for word in profiles.split([',', ' ']).filter(|w| !w.is_empty()) {
        // The profile error would repeat the raw word; the value is shown escaped instead.
        let name = ProfileName::new(word).map_err(|_| {
            invalid(
                p,
                profiles,
                "profile names are letters, digits, '-', '_' and '.' (not leading), at most 64 characters, separated by spaces or commas",
            )
        })?;
        if !names.contains(&name) {
            names.push(name);
        }
    }
    if names.is_empty() {
        return Err(invalid(
            p,
            profiles,
            "name at least one profile (for no egress at all, add terok.shield.mode: block)",
        ));
    }
    if names.len() > MAX_PROFILES {
        return Err(invalid(
            p,
            profiles,
            format!("more than {MAX_PROFILES} profiles"),
        ));
    }
    let mode = match annotations.get(annotation::MODE).map(String::as_str) {
        None | Some("up") => Mode::DenyAll,
        Some("down") => Mode::Bypass,
        Some("down_all") => Mode::BypassAll,
        Some("block") => Mode::Block,
        Some(other) => {
            return Err(invalid(
                annotation::MODE,
                other,
                "expected up, down, down_all or block",
            ))
        }
    };
    let dns_tier = match annotations.get(annotation::DNS_TIER).map(String::as_str) {
        None | Some("auto") => None,
        Some("builtin") => Some(DnsTier::Builtin),
        Some("dnsmasq") => Some(DnsTier::Dnsmasq),
        Some("static") => Some(DnsTier::Static),
        Some(other) => {
            return Err(invalid(
                annotation::DNS_TIER,
                other,
                "expected auto, builtin, dnsmasq or static",
            ))
        }
    };
    Ok(Request {
        profiles: names,
        mode,
        dns_tier,
    })
}

/// The runtime's container id, which becomes the bundle's instance: checked like a name,
/// since it is written into state and logs.
pub fn check_container_id(id: &str) -> Result<String, AnnotatedError> {
    ContainerName::new(id)
        .map(String::from)
        .map_err(|_| AnnotatedError::BadId(id.escape_debug().to_string()))
}

/// The bundle the hook writes for an annotation-only container: the request, the composed
/// profile `entries`, and the node's `config.yml`. `instance` is the container id of the
/// container that owns the shield.
pub fn bundle_for(
    name: &ContainerName,
    instance: &str,
    request: &Request,
    entries: Vec<Target>,
    config: &Config,
    written_by: &str,
    now_secs: u64,
) -> Bundle {
    let dns_tier = request
        .dns_tier
        .unwrap_or_else(|| ConfiguredTier::effective(config.dns.tier));
    Bundle {
        format: BUNDLE_FORMAT,
        written_by: written_by.to_string(),
        name: name.clone(),
        instance: instance.to_string(),
        created: now_secs,
        profiles: request.profiles.iter().map(|p| p.to_string()).collect(),
        entries,
        resolved: Default::default(),
        mode: request.mode,
        live_allow: Vec::new(),
        live_deny: Vec::new(),
        loopback_ports: config.loopback_ports.clone(),
        audit_enabled: config.audit.enabled,
        dns_tier,
        upstream_dns: config.upstream_dns,
        ttl_bounds: [config.dns.min_ttl, config.dns.max_ttl],
        published: Vec::new(),
        audit_max_bytes: config.audit.max_bytes,
    }
}

/// What the hook found of a shield already recorded under the container's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The owner's process is still the one recorded (PID and start time).
    pub alive: bool,
    /// Container id of the owner (the bundle's instance).
    pub owner: String,
    /// The owner's network namespace is the one of the starting container.
    pub same_netns: bool,
}

/// How a starting container meets the shield of its name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Attach {
    /// No live shield of that name: build the bundle and shield the namespace.
    #[error("shield afresh")]
    Fresh,
    /// Another container of the same pod shielded this namespace already: check it, join.
    #[error("join the pod's shield")]
    Join,
    /// A live shield of that name guards another namespace: a second pod reuses the name.
    #[error("terok.shield.name is already used by a running container ({owner}) in another network namespace; give every pod on a node its own terok.shield.name (e.g. NAMESPACE-POD)")]
    NameInUse { owner: String },
}

/// Decide how `container_id` attaches, from what is recorded under its name.
pub fn attach(container_id: &str, recorded: Option<&Recorded>) -> Attach {
    match recorded {
        // The same container started again (a runtime re-running createRuntime) replaces
        // its own shield, as a podman restart does.
        Some(r) if r.alive && r.owner != container_id => {
            if r.same_netns {
                Attach::Join
            } else {
                Attach::NameInUse {
                    owner: r.owner.clone(),
                }
            }
        }
        _ => Attach::Fresh,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_plain_request() {
        let r = parse_request("base, dev-node base", &ann(&[])).unwrap();
        let names: Vec<&str> = r.profiles.iter().map(ProfileName::as_str).collect();
        assert_eq!(names, ["base", "dev-node"]);
        assert_eq!(r.mode, Mode::DenyAll);
        assert_eq!(r.dns_tier, None);
        let r = parse_request(
            "p",
            &ann(&[
                (annotation::MODE, "block"),
                (annotation::DNS_TIER, "static"),
            ]),
        )
        .unwrap();
        assert_eq!((r.mode, r.dns_tier), (Mode::Block, Some(DnsTier::Static)));
    }

    #[test]
    fn hostile_annotations_are_refused() {
        for bad in [
            "",
            " , ",
            "../etc/passwd",
            "/etc/shadow",
            ".hidden",
            "a;b",
            "p\nq",
            &"x".repeat(MAX_PROFILES_BYTES + 1),
            &(0..=MAX_PROFILES)
                .map(|i| format!("p{i}"))
                .collect::<Vec<_>>()
                .join(" "),
        ] {
            assert!(parse_request(bad, &ann(&[])).is_err(), "accepted {bad:?}");
        }
        for (key, value) in [
            (annotation::MODE, "Up"),
            (annotation::MODE, "bypass"),
            (annotation::MODE, ""),
            (annotation::DNS_TIER, "none"),
        ] {
            let err = parse_request("base", &ann(&[(key, value)])).unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        }
        let err = parse_request("a\u{1b}[31m/x", &ann(&[])).unwrap_err();
        assert!(
            !err.to_string().contains('\u{1b}'),
            "escape codes reach logs: {err}"
        );
        assert!(check_container_id("../x").is_err());
        assert!(check_container_id(&"f".repeat(64)).is_ok());
    }

    #[test]
    fn the_bundle_follows_request_and_config() {
        let config = Config {
            loopback_ports: vec![5432],
            ..Config::default()
        };
        let r = parse_request("p", &ann(&[(annotation::MODE, "down")])).unwrap();
        let name = ContainerName::new("pod-a").unwrap();
        let entries = vec![Target::parse("198.51.100.7").unwrap()];
        let b = bundle_for(&name, "abc", &r, entries.clone(), &config, "9.9.9", 7);
        assert_eq!(b.instance, "abc");
        assert_eq!(b.mode, Mode::Bypass);
        assert_eq!(b.entries, entries);
        assert_eq!(b.dns_tier, DnsTier::Builtin, "auto means builtin");
        assert_eq!(b.loopback_ports, [5432]);
        assert_eq!(b.profiles, ["p"]);
        let r = parse_request("p", &ann(&[(annotation::DNS_TIER, "static")])).unwrap();
        let b = bundle_for(&name, "abc", &r, vec![], &config, "9.9.9", 7);
        assert_eq!(b.dns_tier, DnsTier::Static);
    }

    #[test]
    fn containers_of_a_pod_join_and_other_pods_are_refused() {
        let rec = |alive, same_netns| Recorded {
            alive,
            owner: "sandbox".into(),
            same_netns,
        };
        assert_eq!(attach("c1", None), Attach::Fresh);
        assert_eq!(attach("c1", Some(&rec(false, false))), Attach::Fresh);
        assert_eq!(attach("c1", Some(&rec(true, true))), Attach::Join);
        assert_eq!(
            attach("c1", Some(&rec(true, false))),
            Attach::NameInUse {
                owner: "sandbox".into()
            }
        );
        assert_eq!(attach("sandbox", Some(&rec(true, true))), Attach::Fresh);
    }
}
