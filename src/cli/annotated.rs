//! The hook's annotation-only path (CRI-O / Kubernetes): build the bundle of a container that
//! nobody prepared, or let a further container of the same pod join the shield its network
//! namespace already has. What to do is decided by [`crate::core::annotated`]; this gathers
//! the facts (run directory, recorded owner, namespaces) and writes the state.
//!
//! After [`prepare_or_join`] returns [`Attached::Fresh`], the ordinary createRuntime path of
//! `hook.rs` applies the bundle exactly as for a prepared container.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde_json::json;

use super::prepare::VERSION;
use crate::core::annotated::{attach, bundle_for, Attach, Recorded, Request};
use crate::core::bundle::{Bundle, DnsTier};
use crate::core::oci::HookInput;
use crate::effects::audit;
use crate::effects::paths::{NodePaths, Paths};
use crate::effects::procfs::is_same_process;
use crate::effects::profiles::ProfileStore;
use crate::effects::state::{
    load_bundle, lock_dir, read_runtime, save_bundle, RuntimeRecord, StateStore, STATE_FILE,
};

/// How the starting container met the shield of its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// A fresh bundle was written: apply it now.
    Fresh,
    /// The pod's namespace is shielded already and was checked: nothing more to do.
    Joined,
}

/// The node's paths, from the descriptor's environment.
pub fn node_paths() -> anyhow::Result<NodePaths> {
    NodePaths::from_process_env().context("refusing to start the container")
}

/// Create (or check) the root-owned run directory: annotation-only state must not be
/// writable by anyone but root, or a user could plant a bundle for a pod.
fn ensure_run_dir(run_dir: &Path) -> anyhow::Result<PathBuf> {
    if !rustix::process::geteuid().is_root() {
        bail!("refusing to start the container: annotation-only containers (terok.shield.profiles without a prepared bundle) are shielded by a hook running as root, as CRI-O runs it; for rootless podman use `terok-shield run`");
    }
    let containers = run_dir.join("containers");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&containers)
        .with_context(|| {
            format!(
                "refusing to start the container: cannot create {}",
                containers.display()
            )
        })?;
    for dir in [run_dir, containers.as_path()] {
        let meta = std::fs::symlink_metadata(dir)
            .with_context(|| format!("cannot inspect {}", dir.display()))?;
        if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
            bail!(
                "refusing to start the container: {} must be a directory owned by root and writable by root only (it holds the state of shielded pods); fix its owner and mode, or remove it",
                dir.display()
            );
        }
    }
    Ok(containers)
}

/// Whether two processes share one network namespace.
fn same_netns(a: u32, b: u32) -> bool {
    let ns = |pid: u32| std::fs::metadata(format!("/proc/{pid}/ns/net")).ok();
    match (ns(a), ns(b)) {
        (Some(x), Some(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Before createRuntime applies anything: write a fresh bundle for `input` (Fresh), or check
/// and join the pod's existing shield (Joined), or refuse.
pub fn prepare_or_join(input: &HookInput, request: &Request, pid: u32) -> anyhow::Result<Attached> {
    let node = node_paths()?;
    let containers = ensure_run_dir(&node.settings.run_dir)?;
    let dir = &input.state_dir;
    let _lock = if dir.is_dir() {
        Some(lock_dir(dir)?)
    } else {
        None
    };
    let existing: Option<(Bundle, RuntimeRecord)> = dir
        .join(STATE_FILE)
        .is_file()
        .then(|| load_bundle(dir, &input.name).ok())
        .flatten()
        .and_then(|b| read_runtime(dir).ok().flatten().map(|r| (b, r)));
    let recorded = existing.as_ref().map(|(bundle, rt)| Recorded {
        alive: is_same_process(rt.pid, rt.start_time) && rt.instance == bundle.instance,
        owner: bundle.instance.clone(),
        same_netns: same_netns(rt.pid, pid),
    });
    match attach(&input.container_id, recorded.as_ref()) {
        Attach::Join => {
            let (bundle, runtime) = existing.expect("join needs a recorded shield");
            join(input, &bundle, &runtime, pid)?;
            Ok(Attached::Joined)
        }
        refused @ Attach::NameInUse { .. } => {
            bail!("refusing to start the container: {refused}")
        }
        Attach::Fresh => {
            write_fresh_bundle(input, request, &node, &containers)?;
            Ok(Attached::Fresh)
        }
    }
}

/// Compose the requested profiles (bundled ones and the node's directory) with the node's
/// `config.yml` into a new bundle; the old state of the name is discarded, its audit log kept.
fn write_fresh_bundle(
    input: &HookInput,
    request: &Request,
    node: &NodePaths,
    containers: &Path,
) -> anyhow::Result<()> {
    let refusing = "refusing to start the container";
    let config = super::load_config(&node.config_dir.join("config.yml")).context(refusing)?;
    let profiles_dir = node.config_dir.join("profiles");
    let (entries, _notices) = ProfileStore::new(&profiles_dir)
        .load_many(&request.profiles)
        .context(refusing)?;
    let mut bundle = bundle_for(
        &input.name,
        &input.container_id,
        request,
        entries,
        &config,
        VERSION,
        crate::effects::audit::unix_secs(),
    );
    let store = StateStore::new(containers);
    let dir = store.reset(&input.name)?;
    let mut warnings = Vec::new();
    if bundle.dns_tier == DnsTier::Static {
        let ctx = super::Context {
            paths: Paths {
                config_file: node.config_dir.join("config.yml"),
                profiles_dir,
                config_dir: node.config_dir.clone(),
                state_dir: node.settings.run_dir.clone(),
                containers_dir: containers.to_path_buf(),
            },
            config,
        };
        super::prepare::resolve_into(&mut bundle, &ctx, &mut warnings)?;
    }
    save_bundle(&dir, &bundle)?;
    audit::record(
        &dir,
        audit::AuditLog::of(&bundle),
        &input.name,
        "prepare",
        true,
        json!({"profiles": bundle.profiles, "entries": bundle.entries.len(), "instance": bundle.instance, "source": "annotations", "warnings": warnings}),
    );
    Ok(())
}

/// A further container of a shielded pod: its namespace must be the owner's (checked by
/// the caller) and the firewall there exactly the bundle's; its resolv.conf, if it has its
/// own, is pointed at the resolver too.
fn join(
    input: &HookInput,
    bundle: &Bundle,
    runtime: &RuntimeRecord,
    pid: u32,
) -> anyhow::Result<()> {
    let nft = crate::effects::nft::Nft::locate()
        .context("refusing to start the container")?
        .in_netns(PathBuf::from(format!("/proc/{pid}/ns/net")));
    crate::effects::firewall::check(&nft, &bundle.policy(&runtime.facts())).with_context(|| {
        format!(
            "refusing to start the container: the shield of its pod (owned by container {}) is not intact; restart the pod",
            bundle.instance
        )
    })?;
    if matches!(bundle.dns_tier, DnsTier::Builtin | DnsTier::Dnsmasq) {
        if let Some(path) = crate::effects::procfs::resolv_conf_source(&input.oci_bundle) {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let pointed = crate::core::companion::loopback_resolv_conf(&text);
            if text != pointed {
                std::fs::write(&path, pointed).context(
                    "refusing to start the container: cannot point its resolv.conf at the pod's resolver",
                )?;
            }
        }
    }
    audit::record(
        &input.state_dir,
        audit::AuditLog::of(bundle),
        &input.name,
        "apply",
        true,
        json!({"mode": bundle.mode.status_name(), "pid": pid, "container_id": input.container_id, "joined": bundle.instance, "shield_version": VERSION}),
    );
    Ok(())
}

/// At poststop of an annotation-only container: whether it only joined the pod's shield (so
/// stopping it must leave the shield, its resolver and runtime record to the owner). Records
/// the stop when so.
pub fn member_stopping(input: &HookInput) -> bool {
    if input.annotated.is_none() {
        return false;
    }
    let Ok(bundle) = load_bundle(&input.state_dir, &input.name) else {
        return false;
    };
    if bundle.instance == input.container_id {
        return false;
    }
    audit::record(
        &input.state_dir,
        audit::AuditLog::of(&bundle),
        &input.name,
        "stop",
        true,
        json!({"container_id": input.container_id, "joined": bundle.instance}),
    );
    true
}
