//! `terok-shield hook createRuntime|poststop`: what podman runs around a shielded container.
//!
//! createRuntime runs inside podman's rootless user namespace, before the workload starts.
//! It must fail closed: any error exits non-zero, which makes the runtime refuse to start the
//! container, and the reason goes to stderr (podman shows it), the bundle's hook-error.log
//! and the audit log. It needs no config file, no PATH and no network: only the bundle, the
//! OCI state on stdin, and nft.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde_json::json;

use super::prepare::VERSION;
use crate::core::audit::rfc3339_utc;
use crate::core::bundle::{BundleError, RuntimeFacts};
use crate::core::companion::{companion, loopback_resolv_conf};
use crate::core::oci::{parse_hook_input_with, HookInput, MAX_STATE_BYTES};
use crate::effects::audit;
use crate::effects::firewall::apply_at_start;
use crate::effects::nft::Nft;
use crate::effects::procfs;
use crate::effects::state::{
    append_line, clear_runtime, load_bundle, lock_dir, write_runtime, RuntimeRecord,
    HOOK_ERROR_FILE, REMOVED_MARKER,
};
use std::os::unix::fs::DirBuilderExt;

/// The OCI hook stages we implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    #[value(name = "createRuntime")]
    CreateRuntime,
    #[value(name = "poststop")]
    Poststop,
    /// createRuntime of any container joining a pod (see `cli::pod`).
    #[value(name = "podMember")]
    PodMember,
}

/// Run a hook stage; any error is reported everywhere it can be and returned.
pub fn run(stage: Stage) -> anyhow::Result<()> {
    let mut raw = Vec::new();
    std::io::stdin()
        .take(MAX_STATE_BYTES as u64 + 1)
        .read_to_end(&mut raw)
        .context("failed to read the OCI state from stdin")?;
    if stage == Stage::PodMember {
        return super::pod::member_hook(&raw);
    }
    let settings = super::annotated::node_paths()?.settings;
    let input = match parse_hook_input_with(&raw, stage == Stage::CreateRuntime, &settings) {
        Ok(input) => input,
        Err(e) => {
            // No trustworthy bundle directory to log into: stderr is all we have.
            bail!("refusing to start the container: {e}");
        }
    };
    let result = match stage {
        Stage::CreateRuntime => create_runtime(&input),
        Stage::Poststop => poststop(&input),
        Stage::PodMember => unreachable!("pod members are handled before parsing"),
    };
    if let Err(e) = &result {
        let stage_name = match stage {
            Stage::CreateRuntime => "createRuntime",
            Stage::Poststop => "poststop",
            Stage::PodMember => unreachable!("pod members are handled before parsing"),
        };
        let line = format!(
            "{} {stage_name}: {}\n",
            rfc3339_utc(crate::effects::audit::unix_millis()),
            super::render_error(e)
        );
        if stage == Stage::Poststop || log_dir_for_refusal(&input.state_dir, &input.name) {
            let _ = append_line(&input.state_dir.join(HOOK_ERROR_FILE), &line);
            audit::record(
                &input.state_dir,
                load_bundle(&input.state_dir, &input.name)
                    .map(|b| audit::AuditLog::of(&b))
                    .unwrap_or_else(|_| audit::AuditLog::default_on()),
                &input.name,
                "failure",
                false,
                json!({"stage": stage_name, "error": super::render_error(e)}),
            );
        }
    }
    result
}

/// Whether a refusal can be recorded in the container's own bundle directory. A deleted
/// bundle directory is made again (empty but for the logs) when its parent still exists, so
/// that the refusal shows in the audit log of the name; nothing else is created.
fn log_dir_for_refusal(dir: &Path, name: &crate::core::bundle::ContainerName) -> bool {
    if dir.is_dir() {
        return true;
    }
    let named_after_it = dir.file_name().and_then(|f| f.to_str()) == Some(name.as_str());
    let parent_exists = dir.parent().is_some_and(Path::is_dir);
    named_after_it && parent_exists && std::fs::DirBuilder::new().mode(0o700).create(dir).is_ok()
}

pub(super) fn create_runtime(input: &HookInput) -> anyhow::Result<()> {
    let pid = input.pid.context("OCI state has no pid")?;
    // Annotation-only (CRI-O): write the bundle first, or join the pod's shield and stop here.
    if let Some(request) = &input.annotated {
        if super::annotated::prepare_or_join(input, request, pid)?
            == super::annotated::Attached::Joined
        {
            // A further container of a shielded pod: the namespace's firewall stands, but
            // this container's own capabilities must not be able to undo it.
            return check_container_config(input);
        }
    }
    let dir = &input.state_dir;
    if !dir.join(crate::effects::state::STATE_FILE).is_file() {
        bail!(
            "refusing to start the container: no shield state in {} (was it deleted?); recreate the container with `terok-shield run`",
            dir.display()
        );
    }
    let _lock = lock_dir(dir)?;
    // Any format this binary can read starts (older ones are migrated); the version that
    // prepared the container is only recorded.
    let bundle = load_bundle(dir, &input.name).context("refusing to start the container")?;
    match input.instance.as_deref() {
        Some(i) if i == bundle.instance => {}
        found => bail!(BundleError::Instance {
            found: bundle.instance.clone(),
            expected: found.unwrap_or("(none)").to_string(),
        }),
    }
    check_container_config(input)?;
    let start_time = procfs::start_time(pid)?;
    let resolv_conf = procfs::resolv_conf_source(&input.oci_bundle);
    let resolv_text = resolv_conf
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok());
    let dns_servers = resolv_text
        .as_deref()
        .map(crate::effects::dns_client::servers_from_resolv_conf)
        .unwrap_or_default();
    let gateway = if bundle.loopback_ports.is_empty() {
        None
    } else {
        procfs::default_gateway(pid)
    };
    let facts = RuntimeFacts {
        dns_servers: dns_servers.clone(),
        gateway,
    };
    let policy = bundle.policy(&facts);
    let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
    if crate::effects::netns::is_own_netns(&netns)
        .with_context(|| format!("cannot inspect {}", netns.display()))?
    {
        bail!("refusing to start the container: it shares the host's network namespace (--network host?), which the shield cannot filter without firewalling the host");
    }
    let nft = Nft::locate()
        .context("refusing to start the container")?
        .in_netns(netns);
    let report = apply_at_start(&nft, &policy).context("refusing to start the container")?;
    let companion = companion(bundle.dns_tier, bundle.upstream_dns, &dns_servers)
        .context("refusing to start the container")?;
    let resolver = if companion.serves_dns() {
        let resolv_conf = resolv_conf.context(
            "refusing to start the container: its /etc/resolv.conf mount was not found, so DNS cannot be pointed at the shield's resolver",
        )?;
        let started = crate::effects::companion::start(dir, &input.name, pid, &companion)
            .context("refusing to start the container: the DNS resolver did not start")?;
        // Rewritten in place: the container sees this file through a bind mount of its inode.
        std::fs::write(
            &resolv_conf,
            loopback_resolv_conf(resolv_text.as_deref().unwrap_or_default()),
        )
        .context("refusing to start the container: cannot point its resolv.conf at the resolver")?;
        started
    } else {
        // No resolver in the static tier, but the event reader (refused packets to the audit
        // log) runs all the same, recorded in the same place so status and poststop see it.
        crate::effects::companion::start(dir, &input.name, pid, &companion)
            .context("refusing to start the container: the event reader did not start")?
    };
    // The bundle belongs to a container again (one prepared by hand may be started anew).
    let _ = std::fs::remove_file(dir.join(REMOVED_MARKER));
    write_runtime(
        dir,
        &RuntimeRecord {
            pid,
            start_time,
            instance: bundle.instance.clone(),
            dns_servers,
            gateway,
            applied_at: crate::effects::audit::unix_millis() as u64,
            resolver: Some(resolver),
        },
    )?;
    audit::record(
        dir,
        audit::AuditLog::of(&bundle),
        &input.name,
        "apply",
        true,
        json!({"mode": bundle.mode.status_name(), "pid": pid, "report": report, "container_id": input.container_id, "prepared_by": input.version, "shield_version": VERSION}),
    );
    Ok(())
}

/// Refuse a container whose OCI configuration grants what would undo its firewall, whatever
/// flags started it (`prepare` + a hand-written `podman run`, a pod member).
fn check_container_config(input: &HookInput) -> anyhow::Result<()> {
    let path = input.oci_bundle.join("config.json");
    let config = procfs::read_oci_config(&input.oci_bundle).with_context(|| {
        format!(
            "refusing to start the container: cannot read its OCI configuration {}",
            path.display()
        )
    })?;
    crate::core::oci_config::check_capabilities(&config).context("refusing to start the container")
}

fn poststop(input: &HookInput) -> anyhow::Result<()> {
    let dir: &Path = &input.state_dir;
    if !dir.is_dir() {
        return Ok(()); // nothing was held
    }
    let _lock = lock_dir(dir)?;
    if super::annotated::member_stopping(input) {
        return Ok(()); // the pod's shield stays with its owner
    }
    let log = load_bundle(dir, &input.name)
        .map(|b| audit::AuditLog::of(&b))
        .unwrap_or_else(|_| audit::AuditLog::default_on());
    if let Some((pid, start)) = crate::effects::state::read_runtime(dir)
        .ok()
        .flatten()
        .and_then(|r| r.resolver)
    {
        procfs::signal_if_same(pid, start, rustix::process::Signal::TERM);
    }
    clear_runtime(dir)?;
    if input.autoremove {
        let _ = std::fs::write(dir.join(REMOVED_MARKER), b"");
    }
    audit::record(
        dir,
        log,
        &input.name,
        "stop",
        true,
        json!({"container_id": input.container_id, "removed": input.autoremove}),
    );
    Ok(())
}
