//! `terok-shield pod create NAME`: a podman pod whose shared network namespace is shielded
//! once, for every container that joins it.
//!
//! Podman 4.3 cannot annotate a pod's infra container (`podman pod create` has no
//! `--annotation` and no `--infra-annotation`), so the shield's usual hook never fires for
//! it. What podman does write on every container started with `--pod` is the annotation
//! `io.kubernetes.cri-o.SandboxID` (the infra container's ID), and a network namespace path
//! `/proc/INFRA_PID/ns/net` in its OCI configuration. So a third descriptor fires for every
//! pod member; the hook (`hook podMember`) looks the infra ID up among the pods this user
//! created with the shield, and for a shielded pod:
//!
//! - refuses the member if it holds a forbidden capability (as for any shielded container)
//!   or does not share the pod's network namespace;
//! - the first member applies the pod's firewall to the infra container's namespace (only
//!   the infra's `catatonit` ran there before), records the infra process as the pod's
//!   runtime, and starts the resolver (or event reader) there, plus a watcher that ends it
//!   when the infra process ends, so the firewall lives exactly as long as the namespace;
//! - later members find the pod shielded and only have their resolv.conf pointed at the
//!   pod's resolver.
//!
//! Live commands (`allow`, `deny`, `up`, ...) take the pod's name.
//!
//! Limits: the hook finds pods only in the default state directory of podman's HOME (so
//! `pod create` refuses any other), and two members started at the very same moment may
//! both apply the firewall (the second replaces the first's table whole, one resolver is
//! left over until the pod stops).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use super::{print, Context};
use crate::core::bundle::{ContainerName, DnsTier};
use crate::core::oci::{parse_pod_member, HookInput, PodMember};
use crate::effects::hooks::{self, POD_MEMBER_FILE};
use crate::effects::procfs::{self, is_same_process};
use crate::effects::state::{read_runtime, write_atomic, StateStore};

/// The file in a pod's bundle directory naming its infra container.
pub const POD_FILE: &str = "pod.json";

/// `podman pod create` flags that would take the pod's network out of the shield's hands,
/// or that the shield sets itself.
fn check_pod_args(args: &[String]) -> anyhow::Result<()> {
    for (i, arg) in args.iter().enumerate() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v)),
            None => (arg.as_str(), None),
        };
        let value = || {
            inline
                .or_else(|| args.get(i + 1).map(String::as_str))
                .unwrap_or("")
        };
        match flag {
            "--name" | "-n" | "--infra-name" => bail!(
                "`{arg}` is managed by terok-shield: the pod is named by `terok-shield pod create NAME`"
            ),
            "--infra" if inline == Some("false") => bail!(
                "`{arg}` would leave the pod without the shared network namespace the shield filters"
            ),
            "--network" | "--net"
                if matches!(
                    value().split([':', ',']).next().unwrap_or(""),
                    "host" | "none" | "container" | "ns"
                ) =>
            {
                bail!("`{flag} {}` would let the pod bypass the shield: it filters the pod's own network namespace; use the default network", value())
            }
            "--share" if !value().split(',').any(|s| s == "net" || s == "+net") && !value().starts_with('+') => bail!(
                "`{flag} {}` does not share the network namespace: every container would get its own, unshielded; keep `net` in --share",
                value()
            ),
            "--dns" | "--dns-option" | "--dns-search" => {
                bail!("`{flag}` is managed by terok-shield: the shield decides which resolver the pod may use")
            }
            _ => {}
        }
    }
    Ok(())
}

/// `terok-shield pod create NAME [--profiles P...] [-- podman pod create flags]`.
pub fn create(
    name: &str,
    profiles: &[String],
    podman_args: &[String],
    ctx: &Context,
) -> anyhow::Result<()> {
    check_pod_args(podman_args)?;
    let name = ContainerName::new(name)?;
    // The member hook only sees podman's HOME: a pod kept anywhere else would never be found,
    // and its containers would start unshielded.
    let hook_sees = pods_dir()?;
    if hook_sees != ctx.paths.containers_dir {
        bail!(
            "shielded pods must keep their state in the default state directory ({}), the only one the OCI hook can find; drop --state-dir / TEROK_SHIELD_STATE_DIR / XDG_STATE_HOME for `pod create`",
            hook_sees.display()
        );
    }
    let podman = crate::effects::podman::binary()?;
    let prepared = super::prepare::prepare(name.as_str(), profiles, &[], ctx)?;
    for n in &prepared.notices {
        eprintln!("terok-shield: {n}");
    }
    for w in &prepared.warnings {
        eprintln!("terok-shield: warning: {w}");
    }
    ensure_pod_member_hook(ctx)?;
    let infra_name = format!("{name}-infra");
    let out = std::process::Command::new(&podman)
        .args([
            "pod",
            "create",
            "--name",
            name.as_str(),
            "--infra-name",
            &infra_name,
        ])
        .args(podman_args)
        .stdin(std::process::Stdio::null())
        .output()
        .context("failed to start podman")?;
    if !out.status.success() {
        bail!(
            "podman pod create failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let pod_id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let inspect = std::process::Command::new(&podman)
        .args([
            "pod",
            "inspect",
            "--format",
            "{{.InfraContainerID}}",
            name.as_str(),
        ])
        .output()
        .context("failed to start podman")?;
    let infra_id = String::from_utf8_lossy(&inspect.stdout).trim().to_string();
    if !inspect.status.success() || infra_id.len() != 64 {
        let _ = std::process::Command::new(&podman)
            .args(["pod", "rm", "-f", name.as_str()])
            .output();
        bail!("cannot find the infra container of pod `{name}` (podman said: {}); the pod was removed again", String::from_utf8_lossy(&inspect.stderr).trim());
    }
    write_atomic(
        &prepared.bundle_dir.join(POD_FILE),
        serde_json::json!({ "infra_id": infra_id, "infra_name": infra_name })
            .to_string()
            .as_bytes(),
    )?;
    print(&format!("{pod_id}\n"))?;
    eprintln!("terok-shield: pod `{name}` is shielded: start its containers with `podman run --pod {name} ...`; live commands take the pod's name");
    Ok(())
}

/// Hooks installed before pods were supported lack the pod-member descriptor: add it.
fn ensure_pod_member_hook(ctx: &Context) -> anyhow::Result<()> {
    let found = hooks::find_installed(
        &super::prepare::user_hooks_dir(ctx),
        &super::prepare::user_containers_conf(),
    )
    .context("the OCI hooks are not installed where podman looks; run `terok-shield setup`")?;
    if !found.dir().join(POD_MEMBER_FILE).is_file() {
        let binary = hooks::descriptor_binary(found.dir()).map_or_else(hooks::self_binary, Ok)?;
        hooks::write_descriptors(found.dir(), &binary)?;
    }
    Ok(())
}

/// Where shielded pods keep their bundles: the default state directory under HOME, the one
/// thing of the user's environment that podman passes to its hooks.
fn pods_dir() -> Result<PathBuf, crate::effects::paths::PathsError> {
    let home_only = |var: &str| {
        if var == "HOME" {
            std::env::var(var).ok()
        } else {
            None
        }
    };
    Ok(crate::effects::paths::Paths::from_env(home_only, None)?.containers_dir)
}

/// The shielded pod whose infra container is `infra_id`, among this user's bundles.
fn find_pod(containers_dir: &Path, infra_id: &str) -> Option<(ContainerName, PathBuf)> {
    let store = StateStore::new(containers_dir);
    store.names().into_iter().find_map(|name| {
        let dir = store.dir(&name);
        let text = std::fs::read(dir.join(POD_FILE)).ok()?;
        let record: serde_json::Value = serde_json::from_slice(&text).ok()?;
        (record["infra_id"] == infra_id).then_some((name, dir))
    })
}

/// `hook podMember`: a container is starting in some pod (see the module documentation).
pub fn member_hook(raw: &[u8]) -> anyhow::Result<()> {
    let member = parse_pod_member(raw).context("refusing to start the container")?;
    let Ok(containers_dir) = pods_dir() else {
        return Ok(());
    };
    let Some((name, dir)) = find_pod(&containers_dir, &member.infra_id) else {
        return Ok(()); // a pod the shield was not asked to protect
    };
    let result = shield_member(&member, &name, &dir);
    if let Err(e) = &result {
        let line = format!(
            "{} podMember: {}\n",
            crate::core::audit::rfc3339_utc(crate::effects::audit::unix_millis()),
            super::render_error(e)
        );
        let _ = crate::effects::state::append_line(
            &dir.join(crate::effects::state::HOOK_ERROR_FILE),
            &line,
        );
        crate::effects::audit::record(
            &dir,
            crate::effects::audit::AuditLog::default_on(),
            &name,
            "failure",
            false,
            serde_json::json!({"stage": "podMember", "container_id": member.container_id, "error": super::render_error(e)}),
        );
    }
    result
}

fn shield_member(member: &PodMember, name: &ContainerName, dir: &Path) -> anyhow::Result<()> {
    let config = procfs::read_oci_config(&member.oci_bundle).with_context(|| {
        format!(
            "refusing to start the container in shielded pod `{name}`: cannot read its OCI configuration in {}",
            member.oci_bundle.display()
        )
    })?;
    crate::core::oci_config::check_capabilities(&config)
        .with_context(|| format!("refusing to start the container in shielded pod `{name}`"))?;
    let infra_pid = crate::core::oci_config::joined_network_pid(&config)?
        .filter(|pid| same_netns(member.pid, *pid))
        .with_context(|| format!("refusing to start the container in shielded pod `{name}`: it does not share the pod's network namespace"))?;
    let infra_start = procfs::start_time(infra_pid)?;
    let bundle = crate::effects::state::load_bundle(dir, name)
        .with_context(|| format!("refusing to start the container in shielded pod `{name}`"))?;
    let shielded = read_runtime(dir)?.is_some_and(|r| {
        r.pid == infra_pid
            && r.start_time == infra_start
            && r.instance == bundle.instance
            && r.resolver.is_some_and(|(p, s)| is_same_process(p, s))
    });
    if shielded {
        // The pod's resolver already serves its namespace: point this member at it.
        if matches!(bundle.dns_tier, DnsTier::Builtin | DnsTier::Dnsmasq) {
            if let Some(resolv) = procfs::resolv_conf_source(&member.oci_bundle) {
                let original = std::fs::read_to_string(&resolv).unwrap_or_default();
                std::fs::write(&resolv, crate::core::companion::loopback_resolv_conf(&original))
                    .context("refusing to start the container: cannot point its resolv.conf at the pod's resolver")?;
            }
        }
        return Ok(());
    }
    // First member: the pod's firewall goes into the infra's namespace, recorded under the
    // infra process, which lives exactly as long as the namespace.
    super::hook::create_runtime(&HookInput {
        pid: Some(infra_pid),
        container_id: member.container_id.clone(),
        oci_bundle: member.oci_bundle.clone(),
        name: name.clone(),
        state_dir: dir.to_path_buf(),
        version: None,
        instance: Some(bundle.instance.clone()),
        autoremove: false,
        annotated: None,
    })?;
    let runtime = read_runtime(dir)?.context("the pod's runtime record was not written")?;
    if let Some((rpid, rstart)) = runtime.resolver {
        spawn_watcher(dir, name, (infra_pid, infra_start), (rpid, rstart))?;
    }
    Ok(())
}

fn same_netns(a: u32, b: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ns = |pid: u32| std::fs::metadata(format!("/proc/{pid}/ns/net")).ok();
    matches!((ns(a), ns(b)), (Some(x), Some(y)) if x.dev() == y.dev() && x.ino() == y.ino())
}

/// Start `internal-pod-watch`, detached: it ends the pod's resolver when the infra ends.
fn spawn_watcher(
    dir: &Path,
    name: &ContainerName,
    infra: (u32, u64),
    resolver: (u32, u64),
) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(
        std::env::current_exe().context("cannot find this program's path")?,
    );
    cmd.arg("internal-pod-watch")
        .arg(dir)
        .arg(name.as_str())
        .args([infra.0, resolver.0].map(|p| p.to_string()))
        .args([infra.1, resolver.1].map(|s| s.to_string()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid(2) only, async-signal-safe.
    unsafe {
        cmd.pre_exec(|| rustix::process::setsid().map(|_| ()).map_err(Into::into));
    }
    cmd.spawn()
        .context("cannot start the pod's resolver watcher")?;
    Ok(())
}

/// `internal-pod-watch DIR NAME INFRA_PID RESOLVER_PID INFRA_START RESOLVER_START`: wait for
/// the infra process to end (a pidfd, no polling), then stop the pod's resolver so that
/// nothing keeps the pod's network namespace (and its firewall) alive, and clear the
/// runtime record if it still names that infra process.
pub fn watch(dir: &Path, infra: (u32, u64), resolver: (u32, u64)) -> anyhow::Result<()> {
    use rustix::event::{poll, PollFd, PollFlags};
    use rustix::process::{pidfd_open, Pid, PidfdFlags};
    let pid = Pid::from_raw(infra.0 as i32).context("invalid infra pid")?;
    let pidfd = pidfd_open(pid, PidfdFlags::empty())?;
    if is_same_process(infra.0, infra.1) {
        let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
        loop {
            match poll(&mut fds, None) {
                Ok(_) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
    procfs::signal_if_same(resolver.0, resolver.1, rustix::process::Signal::TERM);
    let _lock = crate::effects::state::lock_dir(dir)?;
    if read_runtime(dir)?.is_some_and(|r| r.pid == infra.0 && r.start_time == infra.1) {
        crate::effects::state::clear_runtime(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn pod_flags_that_would_unshield_it_are_refused() {
        for bad in [
            "--name x",
            "-n x",
            "--infra-name x",
            "--infra=false",
            "--network host",
            "--network=container:abc",
            "--share ipc,uts",
            "--dns 198.51.100.53",
        ] {
            assert!(check_pod_args(&args(bad)).is_err(), "accepted {bad}");
        }
        for good in [
            "",
            "-p 8080:80",
            "--share ipc,net,uts",
            "--share +pid",
            "--network slirp4netns",
        ] {
            assert!(check_pod_args(&args(good)).is_ok(), "refused {good}");
        }
    }
}
