//! `export (NAME | --profiles P...) --format cilium|kubernetes [--selector KEY=VALUE]...`:
//! the allowlist as a Kubernetes policy, on stdout.
//!
//! The document is decided in [`crate::core::export`]; this only finds the allowlist (a
//! container's bundle, or the composed profiles) and tells the user on stderr what the
//! chosen format could not express, so it is never lost in a `> policy.yaml` redirect.

use super::{print, select_profiles, Context};
use crate::core::bundle::ContainerName;
use crate::core::export::{export, Allowlist, ExportFormat, PodSelector};
use crate::effects::state::StateStore;

/// The policy language, as typed after `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// CiliumNetworkPolicy (cilium.io/v2): names, addresses, ports.
    Cilium,
    /// NetworkPolicy (networking.k8s.io/v1): addresses and ports only.
    Kubernetes,
}

/// Run `export`: exactly one of `name` and `profiles` is given (clap enforces it).
pub fn run(
    name: Option<&str>,
    profiles: &[String],
    format: Format,
    selector: &[String],
    ctx: &Context,
) -> anyhow::Result<()> {
    // Check the selector first: a typo there should not wait for profiles to load.
    let selector = PodSelector::parse(selector)?;
    let list = match name {
        Some(name) => {
            let name = ContainerName::new(name)?;
            Allowlist::from_bundle(&StateStore::new(&ctx.paths.containers_dir).load(&name)?)
        }
        None => {
            let selected = select_profiles(profiles, ctx)?;
            let names: Vec<String> = selected.names.iter().map(|n| n.to_string()).collect();
            Allowlist::from_profiles(&names, selected.entries)
        }
    };
    let format = match format {
        Format::Cilium => ExportFormat::Cilium,
        Format::Kubernetes => ExportFormat::Kubernetes,
    };
    let exported = export(&list, format, &selector);
    if !exported.unexpressed.is_empty() {
        eprintln!(
            "terok-shield: warning: a Kubernetes NetworkPolicy cannot name hosts; left out (listed in a comment of the policy): {}; use --format cilium to keep them",
            exported.unexpressed.join(", ")
        );
    }
    Ok(print(&exported.yaml)?)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("terok-shield").chain(args.iter().copied()))
    }

    #[test]
    fn export_takes_a_name_or_profiles_and_a_format() {
        let Command::Export(a) = parse(&["export", "c1", "--format", "cilium"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(a.name.as_deref(), Some("c1"));
        let Command::Export(a) = parse(&[
            "export",
            "--profiles",
            "base,dev-node",
            "--format",
            "kubernetes",
            "--selector",
            "app=web",
            "--selector",
            "tier=db",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert_eq!(a.profiles, ["base", "dev-node"]);
        assert_eq!(a.selector, ["app=web", "tier=db"]);
        for bad in [
            &["export", "--format", "cilium"][..],
            &["export", "c1"],
            &["export", "c1", "--profiles", "base", "--format", "cilium"],
            &["export", "c1", "--format", "calico"],
        ] {
            assert_eq!(parse(bad).unwrap_err().exit_code(), 2, "{bad:?}");
        }
    }
}
