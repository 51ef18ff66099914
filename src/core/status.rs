//! What `status NAME` reports for a container the shield holds no live record of.
//!
//! A live record (the hook's runtime.json naming a living process of the bundle's instance)
//! is checked against the kernel elsewhere. Without one, what podman says about the name
//! decides: a stopped container, or one that never had a shield, is `inactive`; a running
//! container that carries the shield's annotations but has no live shield is `error`, since
//! its firewall should be there and is not (the hook did not run: the fail-open case).

/// What podman says about the name, reduced to what the decision needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodmanView {
    pub running: bool,
    /// It carries the `terok.shield.name` annotation (it was started to be shielded).
    pub annotated: bool,
}

/// The reported state and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to shield right now (a note says which case).
    Inactive(&'static str),
    /// A shield should be in place and is not.
    Error(&'static str),
    /// Neither a shield state nor a podman container of that name.
    Unknown,
}

/// Decide the state of a name without a live shield record.
pub fn without_live_shield(has_bundle: bool, podman: Option<PodmanView>) -> Verdict {
    match podman {
        None if has_bundle => Verdict::Inactive("no container of that name exists"),
        None => Verdict::Unknown,
        Some(p) if !p.running => Verdict::Inactive("the container is not running"),
        Some(p) if p.annotated => Verdict::Error(
            "the container is running without its firewall: podman did not call the shield's hook (are the hooks installed? `terok-shield setup`); stop it now (`podman stop NAME`)",
        ),
        Some(_) => Verdict::Inactive(
            "the container is running without the shield (it was not started by terok-shield)",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_running_container_meant_to_be_shielded_is_an_error() {
        let view = |running, annotated| Some(PodmanView { running, annotated });
        assert_eq!(without_live_shield(false, None), Verdict::Unknown);
        assert!(matches!(
            without_live_shield(true, None),
            Verdict::Inactive(_)
        ));
        for has_bundle in [false, true] {
            for annotated in [false, true] {
                assert!(matches!(
                    without_live_shield(has_bundle, view(false, annotated)),
                    Verdict::Inactive(_)
                ));
            }
            assert!(matches!(
                without_live_shield(has_bundle, view(true, false)),
                Verdict::Inactive(_)
            ));
            assert!(matches!(
                without_live_shield(has_bundle, view(true, true)),
                Verdict::Error(_)
            ));
        }
    }
}
