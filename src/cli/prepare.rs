//! `prepare` and `run`: build a container's state bundle and start it shielded.
//!
//! `prepare` composes the profiles, resolves domains (static tier), writes a fresh bundle,
//! makes sure podman will call our hook, and prints the podman flags. `run` does the same and
//! then execs `podman run` with those flags plus the user's (checked) arguments.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::json;

use super::{print, select_profiles, Context};
use crate::core::bundle::{Bundle, ContainerName, DnsTier, Resolved, BUNDLE_FORMAT};
use crate::core::oci::annotation;
use crate::core::podman_args::check_run_args;
use crate::core::policy::Mode;
use crate::effects::audit;
use crate::effects::dns_client::{resolve_all, servers_from_resolv_conf, ResolverConfig};
use crate::effects::hooks::{ensure_installed, self_binary, Ensured, Installed};
use crate::effects::procfs::is_same_process;
use crate::effects::state::{read_runtime, save_bundle, StateStore, REMOVED_MARKER, STATE_FILE};

/// This binary's version; bundles and hooks must agree on it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The outcome of preparing a container.
pub struct Prepared {
    /// podman flags that make a container shielded.
    pub flags: Vec<String>,
    /// Things the user should know (unresolvable names, profile notices).
    pub warnings: Vec<String>,
    /// What was done besides the bundle (hooks installed on first use).
    pub notices: Vec<String>,
    pub bundle_dir: PathBuf,
    pub resolved_addresses: usize,
}

/// Where `setup --user` installs hook descriptors.
pub fn user_hooks_dir(ctx: &Context) -> PathBuf {
    ctx.paths.config_dir.join("hooks.d")
}

/// The user's containers.conf (podman reads `[engine] hooks_dir` from it), or the file
/// `CONTAINERS_CONF` names, which podman then reads instead.
pub fn user_containers_conf() -> PathBuf {
    if let Some(file) = crate::effects::hooks::containers_conf_override() {
        return file;
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("/nonexistent"));
    base.join("containers").join("containers.conf")
}

/// A random id for one container creation.
fn new_instance_id() -> anyhow::Result<String> {
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("failed to read /dev/urandom for a bundle id")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Upstream resolvers for static resolution: `upstream_dns` from config, else /etc/resolv.conf.
pub fn upstream_servers(ctx: &Context) -> Vec<std::net::SocketAddr> {
    let servers = match ctx.config.upstream_dns {
        Some(addr) => vec![addr],
        None => std::fs::read_to_string("/etc/resolv.conf")
            .map(|t| servers_from_resolv_conf(&t))
            .unwrap_or_default(),
    };
    servers
        .into_iter()
        .map(|a| std::net::SocketAddr::new(a, 53))
        .collect()
}

/// Build the bundle for `name` and return the podman flags.
pub fn prepare(
    name: &str,
    profiles: &[String],
    published: &[crate::core::policy::InboundPort],
    ctx: &Context,
) -> anyhow::Result<Prepared> {
    let name = ContainerName::new(name)?;
    let selected = select_profiles(profiles, ctx)?;
    let mut warnings: Vec<String> = selected.notices.iter().map(|n| n.to_string()).collect();
    let mut notices = Vec::new();
    let store = StateStore::new(&ctx.paths.containers_dir);
    let dir = store.dir(&name);
    if let Some(rt) = read_runtime(&dir).ok().flatten() {
        if is_same_process(rt.pid, rt.start_time) {
            bail!(
                "container `{name}` is running with a shield (pid {}); stop and remove it first (`podman rm -f {name}`), or choose another name",
                rt.pid
            );
        }
    }
    // The old bundle may still belong to a stopped container of that name; replacing it
    // would leave that container unable to start (its hook refuses a foreign bundle). Not
    // asked when poststop saw podman remove it (`--rm`).
    if dir.join(STATE_FILE).exists() && !dir.join(REMOVED_MARKER).exists() {
        if let Some(old) = crate::effects::podman::inspect(name.as_str())
            .context("cannot check whether a container of that name still exists")?
        {
            bail!(
                "a podman container named `{name}` already exists ({}); remove it first (`podman rm {name}`) or choose another name",
                if old.running { "running" } else { "stopped" }
            );
        }
    }
    // Before any state is written: without hooks where podman always looks, a restarted
    // container would come back unshielded.
    let root = rustix::process::geteuid().is_root();
    let hooks = ensure_installed(&user_hooks_dir(ctx), &user_containers_conf(), &self_binary()?, root)
        .context("refusing to shield the container: the OCI hooks that apply its firewall at every start could not be installed")?;
    if let Ensured::Installed(at) = &hooks {
        notices.push(match at {
            Installed::User(dir) => format!(
                "installed the OCI hooks in {} and listed that directory in hooks_dir of {}, so every start of a shielded container applies its firewall (`terok-shield setup --remove` takes them out)",
                dir.display(),
                user_containers_conf().display()
            ),
            Installed::System(dir) => format!(
                "installed the OCI hooks in {} and listed that directory in hooks_dir of {}, so every start of a shielded container applies its firewall (`terok-shield setup --remove` takes them out)",
                dir.display(),
                crate::effects::hooks::SYSTEM_CONTAINERS_CONF
            ),
        });
    }
    let dir = store.reset(&name)?;
    let _lock = store.lock(&name)?;

    let mut bundle = Bundle {
        format: BUNDLE_FORMAT,
        written_by: VERSION.to_string(),
        name: name.clone(),
        instance: new_instance_id()?,
        created: (crate::effects::audit::unix_millis() / 1000) as u64,
        profiles: selected.names.iter().map(|p| p.to_string()).collect(),
        entries: selected.entries,
        resolved: Default::default(),
        mode: Mode::DenyAll,
        live_allow: Vec::new(),
        live_deny: Vec::new(),
        loopback_ports: ctx.config.loopback_ports.clone(),
        audit_enabled: ctx.config.audit.enabled,
        dns_tier: ctx.config.dns.tier.effective(),
        upstream_dns: ctx.config.upstream_dns,
        ttl_bounds: [ctx.config.dns.min_ttl, ctx.config.dns.max_ttl],
        published: published.to_vec(),
        audit_max_bytes: ctx.config.audit.max_bytes,
    };
    if bundle.dns_tier == DnsTier::Dnsmasq {
        check_dnsmasq_tier(&bundle, ctx, &mut warnings)?;
    }
    let wildcards: Vec<String> = bundle
        .entries
        .iter()
        .filter(|t| matches!(&t.host, crate::core::target::Host::Domain(d) if d.wildcard))
        .map(|t| t.to_string())
        .collect();
    if !wildcards.is_empty() && bundle.dns_tier == DnsTier::Static {
        warnings.push(format!(
            "wildcard entries cannot be resolved before start and allow nothing in the static DNS tier: {}",
            wildcards.join(", ")
        ));
    }
    let resolved_addresses = resolve_into(&mut bundle, ctx, &mut warnings)?;
    save_bundle(&dir, &bundle)?;

    let mut flags = vec![
        "--name".to_string(),
        name.to_string(),
        format!("--annotation={}={}", annotation::NAME, name),
        format!("--annotation={}={}", annotation::STATE_DIR, dir.display()),
        format!("--annotation={}={}", annotation::VERSION, VERSION),
        format!("--annotation={}={}", annotation::INSTANCE, bundle.instance),
        format!(
            "--annotation={}={}",
            annotation::PROFILES,
            bundle.profiles.join(" ")
        ),
        format!(
            "--annotation={}={}",
            annotation::AUDIT_ENABLED,
            bundle.audit_enabled
        ),
        format!(
            "--annotation={}={}",
            annotation::DNS_TIER,
            bundle.dns_tier.name()
        ),
        "--cap-drop=NET_ADMIN".to_string(),
        "--cap-drop=NET_RAW".to_string(),
    ];
    if !bundle.loopback_ports.is_empty() {
        let ports: Vec<String> = bundle.loopback_ports.iter().map(u16::to_string).collect();
        flags.push(format!(
            "--annotation={}={}",
            annotation::LOOPBACK_PORTS,
            ports.join(" ")
        ));
    }
    audit::record(
        &dir,
        audit::AuditLog::of(&bundle),
        &name,
        "prepare",
        true,
        json!({"profiles": bundle.profiles, "entries": bundle.entries.len(), "resolved_addresses": resolved_addresses, "instance": bundle.instance}),
    );
    Ok(Prepared {
        flags,
        warnings,
        notices,
        bundle_dir: dir,
        resolved_addresses,
    })
}

/// Before anything is started: the dnsmasq tier needs a dnsmasq with nftset and a policy it
/// can express (checked again by the hook, which fails closed).
fn check_dnsmasq_tier(
    bundle: &crate::core::bundle::Bundle,
    ctx: &Context,
    warnings: &mut Vec<String>,
) -> anyhow::Result<()> {
    crate::effects::dnsmasq::locate()?;
    crate::core::dnsmasq::check(&crate::core::dns_policy::DnsPolicy::from_bundle(bundle))
        .with_context(|| {
            format!(
                "dns.tier dnsmasq (set in {})",
                ctx.paths.config_file.display()
            )
        })?;
    let exact: Vec<String> = bundle
        .entries
        .iter()
        .filter(|t| matches!(&t.host, crate::core::target::Host::Domain(d) if !d.wildcard))
        .map(|t| t.to_string())
        .collect();
    let scoped_wildcards: Vec<String> = bundle
        .entries
        .iter()
        .filter(|t| {
            t.scope.is_some()
                && matches!(&t.host, crate::core::target::Host::Domain(d) if d.wildcard)
        })
        .map(|t| t.to_string())
        .collect();
    if !scoped_wildcards.is_empty() {
        warnings.push(format!(
            "dns.tier dnsmasq resolves port-scoped names but cannot open their ports as it learns them; exact ones use the addresses resolved now, wildcards open nothing: {}",
            scoped_wildcards.join(", ")
        ));
    }
    if !exact.is_empty() {
        let more = if exact.len() > 3 { ", ..." } else { "" };
        warnings.push(format!(
            "dns.tier dnsmasq also resolves the subdomains of exact names ({} entries: {}{more}); dns.tier builtin matches them exactly",
            exact.len(),
            exact[..exact.len().min(3)].join(", ")
        ));
    }
    Ok(())
}

/// Resolve the bundle's domains into its cache (static tier); unresolvable names warn.
pub fn resolve_into(
    bundle: &mut Bundle,
    ctx: &Context,
    warnings: &mut Vec<String>,
) -> anyhow::Result<usize> {
    let names = bundle.domains_to_resolve();
    if names.is_empty() {
        return Ok(0);
    }
    let servers = upstream_servers(ctx);
    if servers.is_empty() {
        warnings.push("no DNS server found (set upstream_dns in config.yml or add a nameserver to /etc/resolv.conf); domains allow nothing until resolved".into());
        return Ok(0);
    }
    let cfg = ResolverConfig {
        servers,
        timeout: Duration::from_secs(3),
        attempts: 2,
    };
    let now = (crate::effects::audit::unix_millis() / 1000) as u64;
    let mut failed = Vec::new();
    let mut count = 0;
    for r in resolve_all(&cfg, &names)? {
        if let Some(err) = &r.error {
            if r.addrs.is_empty() {
                failed.push(format!("{} ({err})", r.name));
            }
        }
        count += r.addrs.len();
        bundle.resolved.insert(
            r.name.clone(),
            Resolved {
                addrs: r.addrs,
                at: now,
            },
        );
    }
    if !failed.is_empty() {
        warnings.push(format!("could not resolve: {}", failed.join(", ")));
    }
    Ok(count)
}

/// Quote one word for a POSIX shell.
pub fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@%+=:,./_-".contains(&b));
    if safe {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// `terok-shield prepare NAME [--profiles P...] [--json]`.
pub fn run_prepare(
    name: &str,
    profiles: &[String],
    json_out: bool,
    ctx: &Context,
) -> anyhow::Result<()> {
    let prepared = prepare(name, profiles, &[], ctx)?;
    report(&prepared);
    if json_out {
        print(&format!("{}\n", serde_json::to_string(&prepared.flags)?))?;
    } else {
        let words: Vec<String> = prepared.flags.iter().map(|f| shell_quote(f)).collect();
        print(&format!("{}\n", words.join(" ")))?;
    }
    Ok(())
}

/// Tell the user, on stderr, what preparing did besides the bundle and what to look at.
fn report(prepared: &Prepared) {
    for n in &prepared.notices {
        eprintln!("terok-shield: {n}");
    }
    for w in &prepared.warnings {
        eprintln!("terok-shield: warning: {w}");
    }
}

/// `terok-shield run NAME [--profiles P...] -- [podman flags] IMAGE [CMD...]`.
pub fn run_container(
    name: &str,
    profiles: &[String],
    podman_args: &[String],
    ctx: &Context,
) -> anyhow::Result<()> {
    // Check the user's arguments before touching any state: bad input changes nothing.
    let user = check_run_args(podman_args)?;
    ContainerName::new(name)?;
    let podman = crate::effects::podman::binary()?;
    let prepared = prepare(name, profiles, &user.published, ctx)?;
    report(&prepared);
    let err = std::process::Command::new(podman)
        .arg("run")
        .args(&prepared.flags)
        .args(&user.flags)
        .arg(&user.image)
        .args(&user.command)
        .exec();
    Err(err).context("failed to start podman")
}

/// `resolve NAME [--force]`: refresh the static-tier cache of a prepared container.
pub fn run_resolve(name: &str, force: bool, json_out: bool, ctx: &Context) -> anyhow::Result<()> {
    let name = ContainerName::new(name)?;
    let store = StateStore::new(&ctx.paths.containers_dir);
    let _lock = store.lock(&name)?;
    let mut bundle = store.load(&name)?;
    let now = (crate::effects::audit::unix_millis() / 1000) as u64;
    let max_age = u64::from(ctx.config.dns.cache_max_age);
    let fresh = bundle.domains_to_resolve().iter().all(|d| {
        bundle
            .resolved
            .get(d)
            .is_some_and(|r| now.saturating_sub(r.at) < max_age)
    });
    let mut warnings = Vec::new();
    let cached = fresh && !force;
    if !cached {
        let before = bundle.clone();
        bundle.resolved.clear();
        resolve_into(&mut bundle, ctx, &mut warnings)?;
        save_bundle(&store.dir(&name), &bundle)?;
        // A running container gets the new addresses at once.
        let runtime = crate::effects::state::read_runtime(&store.dir(&name))?
            .filter(|r| is_same_process(r.pid, r.start_time) && r.instance == bundle.instance);
        if let Some(rt) = runtime {
            let facts = rt.facts();
            let live = super::inspect::live(&name, ctx)?;
            if let Err(e) = crate::effects::firewall::update(
                &live.nft,
                &before.policy(&facts),
                &bundle.policy(&facts),
            ) {
                save_bundle(&store.dir(&name), &before)?;
                return Err(anyhow::Error::from(e)
                    .context("the running container could not be updated; nothing was changed"));
            }
        }
        audit::record(
            &store.dir(&name),
            audit::AuditLog::of(&bundle),
            &name,
            "resolve",
            true,
            json!({"forced": force}),
        );
    }
    for w in &warnings {
        eprintln!("terok-shield: warning: {w}");
    }
    let count: usize = bundle.resolved.values().map(|r| r.addrs.len()).sum();
    if json_out {
        let v = json!({"name": name.as_str(), "addresses": count, "cached": cached, "domains": bundle.resolved});
        return Ok(print(&format!("{}\n", serde_json::to_string(&v)?))?);
    }
    let how = if cached {
        " (cached)"
    } else if force {
        " (forced)"
    } else {
        ""
    };
    Ok(print(&format!("Resolved {count} IPs for {name}{how}\n"))?)
}
