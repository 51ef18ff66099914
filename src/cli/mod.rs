//! The command line: argument definitions, the shared start-up `Context`, and dispatch.
//!
//! Each subcommand lives in its own module and receives parsed arguments plus the
//! `Context`, so locating files and reading `config.yml` happens once, in one place, and
//! fails with one clear message before any command starts working.

pub mod annotated;
pub mod doctor;
pub mod export;
pub mod generated;
pub mod hook;
pub mod inspect;
pub mod live;
pub mod observe;
pub mod pod;
pub mod prepare;
pub mod preview;
pub mod profiles;
pub mod setup;
pub mod status;

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};

use crate::core::config::{parse_config, Config};
use crate::core::policy::Mode;
use crate::core::profile::{LineNotice, ProfileName};
use crate::core::target::Target;
use crate::effects::paths::Paths;
use crate::effects::profiles::ProfileStore;

/// `config.yml` larger than this is refused: it is a handful of keys, never megabytes.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Default-deny nftables egress firewall for rootless Podman containers.
#[derive(Debug, Parser)]
#[command(name = "terok-shield", version, about, propagate_version = true)]
pub struct Cli {
    /// Keep per-container state under PATH instead of $TEROK_SHIELD_STATE_DIR,
    /// $XDG_STATE_HOME/terok/shield or ~/.local/state/terok/shield.
    #[arg(long, global = true, value_name = "PATH")]
    pub state_dir: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Without NAME: the configuration in effect. With NAME: that container's shield state
    /// (up, down, down_all, block, inactive or error).
    Status(StatusArgs),
    /// Write a container's state bundle and print the podman flags that shield it.
    Prepare(PrepareArgs),
    /// Prepare, then start the container with `podman run`.
    Run(RunArgs),
    /// Resolve a container's domains again and cache the addresses (static DNS tier).
    Resolve(ResolveArgs),
    /// Show the live nftables ruleset inside a running container.
    Rules(NameArgs),
    /// Show audit log entries (JSON lines); -f follows them as they are written.
    Logs(LogsArgs),
    /// Stream refused packets, refused DNS questions and bypass traffic as they happen, for
    /// one container (until it stops) or all (events blocked, bypass, dns_refused and
    /// events_dropped unless --event or --refused narrows them).
    Watch(WatchArgs),
    /// Print a profile of what a container tried to reach and was refused (after a session
    /// in `down` mode: of everything it used).
    Learn(LearnArgs),
    /// Answer each refused destination as it happens: allow, allow and save in a profile,
    /// deny, or ignore (answers read line by line from stdin).
    #[command(alias = "simple-clearance")]
    Clearance(ClearanceArgs),
    /// Install the OCI hooks where podman always looks (run/prepare do it on first use), or
    /// take them out with --remove.
    Setup(SetupArgs),
    /// Allow an IP, CIDR, domain (resolved now) on a running container; `:PORT[/tcp|udp]` scopes it.
    Allow(AllowArgs),
    /// Deny an IP, CIDR or domain on a running container; persists across up/down and restarts.
    Deny(TargetArgs),
    /// Bypass mode: public egress accepted and logged (private ranges and denies still blocked).
    Down(DownArgs),
    /// Back to deny-all with the effective allowlist; cuts connections it no longer allows.
    Up(NameArgs),
    /// Block everything but loopback; cuts open connections.
    Block(NameArgs),
    /// The same as `block` (the Python original's name): nothing but loopback.
    Quarantine(NameArgs),
    /// Forget the DNS-learned addresses (they open again as the resolver answers); literal
    /// allows, denies and the mode stay. Cuts connections to the forgotten addresses.
    Reset(NameArgs),
    /// Internal: the per-container DNS resolver (builtin tier) or dnsmasq supervisor
    /// (dnsmasq tier), started by the hook.
    #[command(hide = true, name = "internal-resolver")]
    InternalResolver {
        bundle_dir: PathBuf,
        name: String,
        upstreams: Vec<std::net::IpAddr>,
    },
    /// Internal: the static tier's event reader (refused packets to the audit log), started
    /// by the hook inside the container's network namespace.
    #[command(hide = true, name = "internal-events")]
    InternalEvents { bundle_dir: PathBuf, name: String },
    /// Internal: cut the flows a container's policy refuses (run inside its namespaces).
    #[command(hide = true, name = "internal-conntrack-revoke")]
    InternalConntrackRevoke { bundle_dir: PathBuf, name: String },
    /// OCI hook entry point, called by podman (not by hand).
    #[command(hide = true)]
    Hook(HookArgs),
    /// List the available allowlist profiles, bundled and user-defined.
    Profiles(ProfilesArgs),
    /// Print the ruleset a container would get, without touching any container.
    Preview(PreviewArgs),
    /// Print a container's allowlist (or profiles) as a CiliumNetworkPolicy or a Kubernetes
    /// NetworkPolicy.
    Export(ExportArgs),
    /// Check that this host can shield containers (nft, podman, rootless setup, OCI hooks):
    /// one ok/warn/fail line per check with its fix; exit 1 when something blocks shielding.
    #[command(visible_alias = "check-environment")]
    Doctor(DoctorArgs),
    /// Print a shell completion script: `terok-shield completions bash > /etc/bash_completion.d/terok-shield`.
    Completions(CompletionsArgs),
    /// Print the manual page (roff): `terok-shield man > terok-shield.1; man ./terok-shield.1`.
    Man(ManArgs),
    /// Shielded pods: `pod create NAME` makes a pod whose shared network is shielded once.
    #[command(subcommand)]
    Pod(PodCommand),
    /// Internal: ends a shielded pod's resolver when the pod's infra process ends.
    #[command(hide = true, name = "internal-pod-watch")]
    InternalPodWatch {
        bundle_dir: PathBuf,
        name: String,
        infra_pid: u32,
        resolver_pid: u32,
        infra_start: u64,
        resolver_start: u64,
    },
}

/// Arguments of `man`.
#[derive(Debug, Clone, Default, Args)]
pub struct ManArgs {
    /// Write terok-shield.1 and a page per subcommand (terok-shield-run.1, ...) into DIR
    /// instead of printing the main page.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Arguments of `doctor`.
#[derive(Debug, Clone, Default, Args)]
pub struct DoctorArgs {
    /// Print one JSON object (`checks` with name/status/detail/fix, and `overall`).
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `completions`.
#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for (bash, zsh, fish; also elvish and powershell).
    pub shell: clap_complete::Shell,
}

/// `pod` subcommands.
#[derive(Debug, Subcommand)]
pub enum PodCommand {
    /// Create a pod whose shared network namespace is shielded; start its containers with
    /// `podman run --pod NAME`, which the hook checks; live commands take the pod's name.
    Create(RunPodArgs),
}

/// Arguments of `pod create`.
#[derive(Debug, Clone, Args)]
pub struct RunPodArgs {
    /// Pod name.
    pub name: String,
    /// Profiles to apply instead of the configured default_profiles.
    #[arg(long, value_name = "PROFILE", num_args = 1.., value_delimiter = ',')]
    pub profiles: Vec<String>,
    /// `-- [podman pod create flags]`
    #[arg(last = true, value_name = "PODMAN_ARGS")]
    pub podman_args: Vec<String>,
}

/// Arguments of `status`.
#[derive(Debug, Clone, Default, Args)]
pub struct StatusArgs {
    /// A shielded container's name; omit for the general configuration.
    pub name: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `profiles`.
#[derive(Debug, Clone, Default, Args)]
pub struct ProfilesArgs {
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `preview`: which mode's ruleset to show, and for which profiles.
#[derive(Debug, Clone, Default, Args)]
pub struct PreviewArgs {
    /// Show the bypass ("down") ruleset: public egress accepted and logged.
    #[arg(long)]
    pub down: bool,
    /// With --down: let private ranges through as well.
    #[arg(long, requires = "down", conflicts_with = "block")]
    pub all: bool,
    /// Show the block ruleset: nothing but loopback.
    #[arg(long, conflicts_with = "down")]
    pub block: bool,
    /// Profiles to use instead of the configured default_profiles (space or comma separated).
    #[arg(long, value_name = "PROFILE", num_args = 1.., value_delimiter = ',')]
    pub profiles: Vec<String>,
    /// Print JSON instead of nft text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `export`: whose allowlist, in which format, for which pods.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["name", "profiles"])))]
pub struct ExportArgs {
    /// A shielded container: its effective allowlist (profiles, live allows, live denies).
    pub name: Option<String>,
    /// Or these profiles, composed (space or comma separated).
    #[arg(long, value_name = "PROFILE", num_args = 1.., value_delimiter = ',')]
    pub profiles: Vec<String>,
    /// Policy language: cilium (CiliumNetworkPolicy) or kubernetes (NetworkPolicy).
    #[arg(long, value_enum)]
    pub format: export::Format,
    /// Pod label the policy selects, KEY=VALUE (repeatable); none selects every pod.
    #[arg(long, value_name = "KEY=VALUE")]
    pub selector: Vec<String>,
}

/// Arguments of `prepare`.
#[derive(Debug, Clone, Args)]
pub struct PrepareArgs {
    /// Container name (the same name must be used for podman).
    pub name: String,
    /// Profiles to apply instead of the configured default_profiles.
    #[arg(long, value_name = "PROFILE", num_args = 1.., value_delimiter = ',')]
    pub profiles: Vec<String>,
    /// Print the flags as a JSON array instead of shell words.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Container name.
    pub name: String,
    /// Profiles to apply instead of the configured default_profiles.
    #[arg(long, value_name = "PROFILE", num_args = 1.., value_delimiter = ',')]
    pub profiles: Vec<String>,
    /// `-- [podman run flags] IMAGE [COMMAND...]`
    #[arg(last = true, required = true, value_name = "PODMAN_ARGS")]
    pub podman_args: Vec<String>,
}

/// Arguments of `resolve`.
#[derive(Debug, Clone, Args)]
pub struct ResolveArgs {
    /// Container name.
    pub name: String,
    /// Resolve again even if the cache is still fresh.
    #[arg(long)]
    pub force: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// A command that takes just a container name.
#[derive(Debug, Clone, Args)]
pub struct NameArgs {
    /// Container name.
    pub name: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// A container and a target (`allow`, `deny`).
#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// Container name.
    pub name: String,
    /// IP, CIDR, domain or *.domain, optionally with :PORT or :PORT/tcp|udp (allow only).
    pub target: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `allow`.
#[derive(Debug, Clone, Args)]
pub struct AllowArgs {
    /// Container name.
    pub name: String,
    /// IP, CIDR, domain or *.domain, optionally with :PORT or :PORT/tcp|udp.
    pub target: String,
    /// Also keep the target in the user profile PROFILE (PROFILE.txt in the profiles
    /// directory, created when missing), which joins the container's profiles.
    #[arg(long, value_name = "PROFILE")]
    pub save_to: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `watch`.
#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// Only this container, and end when it stops; omit for every container, including
    /// those started later.
    pub name: Option<String>,
    /// One JSON object (the audit record) per line instead of readable text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub filter: EventFilterArgs,
}

/// `--event` / `--refused`, shared by `watch` and `logs`.
#[derive(Debug, Clone, Default, Args)]
pub struct EventFilterArgs {
    /// Only these events (comma separated), e.g. blocked,dns_refused.
    #[arg(
        long,
        value_name = "EVENT",
        value_delimiter = ',',
        conflicts_with = "refused"
    )]
    pub event: Vec<String>,
    /// Only refusals: the same as --event blocked,dns_refused.
    #[arg(long)]
    pub refused: bool,
}

/// Arguments of `learn`.
#[derive(Debug, Clone, Args)]
pub struct LearnArgs {
    /// Container name.
    pub name: String,
    /// Only events at or after this time: RFC 3339 (2026-11-30T14:00:00Z) or an age (10m, 2h, 1d).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
}

/// Arguments of `clearance`.
#[derive(Debug, Clone, Args)]
pub struct ClearanceArgs {
    /// A running shielded container.
    pub name: String,
    /// The user profile `s` saves into when no PROFILE is typed after it (default: the
    /// container's name).
    #[arg(long, value_name = "PROFILE")]
    pub profile: Option<String>,
}

/// Arguments of `down`.
#[derive(Debug, Clone, Args)]
pub struct DownArgs {
    /// Container name.
    pub name: String,
    /// Also let private ranges (RFC 1918, ULA, link-local, CGNAT) through.
    #[arg(long)]
    pub all: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `logs`.
#[derive(Debug, Clone, Args)]
pub struct LogsArgs {
    /// Only this container's entries.
    #[arg(long)]
    pub container: Option<String>,
    /// How many of the most recent entries.
    #[arg(short = 'n', default_value_t = 50)]
    pub n: usize,
    /// Print one JSON array instead of JSON lines.
    #[arg(long, conflicts_with = "follow")]
    pub json: bool,
    /// Keep printing entries as they are written (JSON lines), until Ctrl-C.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only entries at or after this time: RFC 3339 (2026-11-30T14:00:00Z) or an age (10m, 2h, 1d).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    #[command(flatten)]
    pub filter: EventFilterArgs,
}

/// Arguments of `setup`.
#[derive(Debug, Clone, Args)]
pub struct SetupArgs {
    /// Install for the current user (hooks dir added to ~/.config/containers/containers.conf).
    #[arg(long, conflicts_with = "system")]
    pub user: bool,
    /// Install system-wide in /etc/containers/oci/hooks.d (needs root).
    #[arg(long)]
    pub system: bool,
    /// Take the hooks out again (refused while shielded containers still exist).
    #[arg(long)]
    pub remove: bool,
    /// With --remove: remove even though shielded containers exist (they will then start
    /// without a firewall).
    #[arg(long, requires = "remove")]
    pub force: bool,
}

/// Arguments of the hidden `hook` command.
#[derive(Debug, Clone, Args)]
pub struct HookArgs {
    /// OCI hook stage.
    pub stage: hook::Stage,
}

/// What every command needs: where files live and the validated configuration.
#[derive(Debug, Clone)]
pub struct Context {
    pub paths: Paths,
    pub config: Config,
}

impl Context {
    /// Locate files from the process environment and `--state-dir`, then read `config.yml`
    /// (a missing file means defaults; a bad one is an error naming the file).
    pub fn from_process_env(state_dir_flag: Option<PathBuf>) -> anyhow::Result<Context> {
        let paths = Paths::from_process_env(state_dir_flag)?;
        let config = load_config(&paths.config_file)?;
        Ok(Context { paths, config })
    }
}

/// Read and validate `config.yml`; `Config::default()` when the file does not exist.
pub fn load_config(path: &Path) -> anyhow::Result<Config> {
    let file = match fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Config::default()),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "cannot read {}; make it readable, or move it away to use the defaults",
                    path.display()
                )
            })
        }
    };
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| {
            format!(
                "cannot read {}; make it a readable regular file, or move it away to use the defaults",
                path.display()
            )
        })?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        bail!(
            "{} is larger than 1 MiB, which no valid config.yml is; check that it is the right file",
            path.display()
        );
    }
    let Ok(text) = String::from_utf8(bytes) else {
        bail!("{} is not UTF-8 text; save it as UTF-8", path.display());
    };
    Ok(parse_config(path, &text)?)
}

/// Profiles chosen for a command: their names, composed entries and notices.
pub struct SelectedProfiles {
    pub names: Vec<ProfileName>,
    pub entries: Vec<Target>,
    pub notices: Vec<LineNotice>,
}

/// Load `--profiles` (or the configured defaults when none were given) and compose them.
pub fn select_profiles(requested: &[String], ctx: &Context) -> anyhow::Result<SelectedProfiles> {
    let names: Vec<ProfileName> = if requested.is_empty() {
        ctx.config.default_profiles.clone()
    } else {
        requested
            .iter()
            .map(|n| ProfileName::new(n))
            .collect::<Result<_, _>>()?
    };
    let store = ProfileStore::new(&ctx.paths.profiles_dir);
    let (entries, notices) = store.load_many(&names)?;
    Ok(SelectedProfiles {
        names,
        entries,
        notices,
    })
}

/// `terok-shield hook createRuntime|poststop` exactly (what the hook descriptors run): run it
/// without the command-line parser. Any other command line returns `None`.
pub fn hook_fast_path(
    args: impl Iterator<Item = std::ffi::OsString>,
) -> Option<anyhow::Result<()>> {
    let args: Vec<_> = args.skip(1).take(3).collect();
    let stage = match args.iter().map(|a| a.to_str()).collect::<Vec<_>>()[..] {
        [Some("hook"), Some("createRuntime")] => hook::Stage::CreateRuntime,
        [Some("hook"), Some("poststop")] => hook::Stage::Poststop,
        _ => return None,
    };
    Some(hook::run(stage))
}

/// Run one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    // The hook needs only the OCI state and the bundle: no config, no HOME.
    if let Command::Hook(args) = &cli.command {
        return hook::run(args.stage);
    }
    if let Command::InternalResolver {
        bundle_dir,
        name,
        upstreams,
    } = &cli.command
    {
        let name = crate::core::bundle::ContainerName::new(name)?;
        let bundle = crate::effects::state::load_bundle(bundle_dir, &name)?;
        if bundle.dns_tier == crate::core::bundle::DnsTier::Dnsmasq {
            return crate::effects::dnsmasq::supervise(bundle_dir, &name, upstreams, report_ready);
        }
        let settings = crate::effects::resolver::Settings {
            upstreams: upstreams
                .iter()
                .map(|a| std::net::SocketAddr::new(*a, 53))
                .collect(),
            ttl_bounds: (bundle.ttl_bounds[0], bundle.ttl_bounds[1]),
            bundle_dir: bundle_dir.clone(),
            name,
            listen: vec![
                std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::Ipv6Addr::LOCALHOST.into(),
            ],
            port: 53,
        };
        crate::effects::resolver::serve(settings, report_ready)?;
        return Ok(());
    }
    if let Command::InternalEvents { bundle_dir, name } = &cli.command {
        let name = crate::core::bundle::ContainerName::new(name)?;
        let bundle = crate::effects::state::load_bundle(bundle_dir, &name)?;
        let settings = crate::effects::events::Settings::from_bundle(bundle_dir, &bundle);
        drop(bundle);
        let (reader, _no_dns_events) =
            crate::effects::events::EventReader::bind(settings).context("cannot read NFLOG")?;
        report_ready()?;
        return Err(reader.run()).context("the event reader failed");
    }
    if let Command::InternalConntrackRevoke { bundle_dir, name } = &cli.command {
        let name = crate::core::bundle::ContainerName::new(name)?;
        let bundle = crate::effects::state::load_bundle(bundle_dir, &name)?;
        let runtime = crate::effects::state::read_runtime(bundle_dir)?
            .context("the container has no runtime record")?;
        let facts = runtime.facts();
        // Already inside the container's namespaces: nft needs no joining.
        let mut learned = crate::effects::nft::Nft::locate()?
            .with_table_read_lock(bundle_dir)
            .list_table_json()?
            .map(|live| crate::core::verify::learned_elements(&live))
            .unwrap_or_default();
        if bundle.dns_tier != crate::core::bundle::DnsTier::Static {
            let forgotten =
                crate::effects::learned_log::forget_unjustified(bundle_dir, &bundle, &learned)?;
            learned.retain(|(addr, _)| !forgotten.contains(addr));
        }
        crate::effects::conntrack::revoke_current_netns(&bundle.policy(&facts), &learned)?;
        return Ok(());
    }
    if let Command::InternalPodWatch {
        bundle_dir,
        infra_pid,
        resolver_pid,
        infra_start,
        resolver_start,
        ..
    } = &cli.command
    {
        return pod::watch(
            bundle_dir,
            (*infra_pid, *infra_start),
            (*resolver_pid, *resolver_start),
        );
    }
    // None of these needs a valid configuration: doctor reports a broken one as a finding.
    match &cli.command {
        Command::Doctor(a) => return doctor::run(a, cli.state_dir.clone()),
        Command::Completions(a) => return generated::completions(a.shell),
        Command::Man(a) => return generated::man(a.dir.as_deref()),
        _ => {}
    }
    let ctx = Context::from_process_env(cli.state_dir)?;
    match &cli.command {
        Command::Status(args) => match &args.name {
            Some(name) => inspect::status(name, args.json, &ctx),
            None => status::run(args, &ctx),
        },
        Command::Profiles(args) => profiles::run(args, &ctx),
        Command::Preview(args) => preview::run(args, &ctx),
        Command::Export(a) => {
            export::run(a.name.as_deref(), &a.profiles, a.format, &a.selector, &ctx)
        }
        Command::Prepare(a) => prepare::run_prepare(&a.name, &a.profiles, a.json, &ctx),
        Command::Run(a) => prepare::run_container(&a.name, &a.profiles, &a.podman_args, &ctx),
        Command::Resolve(a) => prepare::run_resolve(&a.name, a.force, a.json, &ctx),
        Command::Rules(a) => inspect::rules(&a.name, a.json, &ctx),
        Command::Logs(a) => observe::logs(a, &ctx),
        Command::Watch(a) => observe::watch(a, &ctx),
        Command::Learn(a) => observe::learn(a, &ctx),
        Command::Clearance(a) => observe::clearance(a, &ctx),
        Command::Setup(a) => setup::run(a, &ctx),
        Command::Allow(a) => {
            let change = match &a.save_to {
                Some(profile) => live::Change::AllowAndSave {
                    target: a.target.clone(),
                    profile: profile.clone(),
                },
                None => live::Change::Allow(a.target.clone()),
            };
            live::run(&a.name, change, a.json, &ctx)
        }
        Command::Deny(a) => live::run(&a.name, live::Change::Deny(a.target.clone()), a.json, &ctx),
        Command::Down(a) => {
            let mode = if a.all { Mode::BypassAll } else { Mode::Bypass };
            live::run(&a.name, live::Change::Mode(mode), a.json, &ctx)
        }
        Command::Up(a) => live::run(&a.name, live::Change::Mode(Mode::DenyAll), a.json, &ctx),
        Command::Block(a) => live::run(&a.name, live::Change::Mode(Mode::Block), a.json, &ctx),
        Command::Quarantine(a) => live::run(&a.name, live::Change::Mode(Mode::Block), a.json, &ctx),
        Command::Reset(a) => live::run(&a.name, live::Change::Reset, a.json, &ctx),
        Command::Pod(PodCommand::Create(a)) => {
            pod::create(&a.name, &a.profiles, &a.podman_args, &ctx)
        }
        Command::Hook(_)
        | Command::Doctor(_)
        | Command::Completions(_)
        | Command::Man(_)
        | Command::InternalPodWatch { .. }
        | Command::InternalConntrackRevoke { .. }
        | Command::InternalEvents { .. }
        | Command::InternalResolver { .. } => unreachable!("handled above"),
    }
}

/// Tell the hook (reading our stdout) that the resolver is serving, then close stdout so its
/// pipe ends; nothing else is printed.
fn report_ready() -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(b"ready\n")?;
    out.flush()?;
    let null = std::fs::File::open("/dev/null")?;
    // SAFETY: dup2 onto fd 1 of an open descriptor we own.
    if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 1) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// An error and its causes on one line, `outer: cause: cause`. A cause whose text the line
/// already carries (an error that prints its source itself) is not repeated.
pub fn render_error(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Write a command's output to stdout in one go, so `| head` ends quietly (see `main`).
pub(crate) fn print(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("terok-shield").chain(args.iter().copied()))
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_state_dir_works_before_and_after_the_subcommand() {
        let cli = parse(&["--state-dir", "/s", "status"]).unwrap();
        assert_eq!(cli.state_dir, Some(PathBuf::from("/s")));
        let cli = parse(&["profiles", "--state-dir", "/t", "--json"]).unwrap();
        assert_eq!(cli.state_dir, Some(PathBuf::from("/t")));
        assert!(matches!(
            cli.command,
            Command::Profiles(ProfilesArgs { json: true })
        ));
    }

    #[test]
    fn preview_flags_and_their_constraints() {
        let Command::Preview(a) = parse(&["preview", "--down", "--all", "--json"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert!(a.down && a.all && a.json && !a.block);
        let Command::Preview(a) = parse(&["preview", "--block", "--profiles", "base", "dev-node"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert!(a.block);
        assert_eq!(a.profiles, ["base", "dev-node"]);
        let Command::Preview(a) = parse(&["preview", "--profiles", "base,dev-node"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(a.profiles, ["base", "dev-node"]);

        for bad in [
            &["preview", "--all"][..],
            &["preview", "--block", "--down"],
            &["preview", "--block", "--all"],
            &["preview", "--profiles"],
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad:?}: {err}");
        }
    }

    #[test]
    fn rendered_errors_do_not_repeat_a_cause() {
        let io = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let state = crate::effects::state::StateError::Io {
            action: "create",
            path: PathBuf::from("/x"),
            source: io,
        };
        let e = anyhow::Error::from(state).context("refusing to shield");
        assert_eq!(
            render_error(&e),
            "refusing to shield: failed to create /x: permission denied"
        );
    }

    #[test]
    fn a_subcommand_is_required() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["frobnicate"]).is_err());
    }

    #[test]
    fn config_file_loading() {
        let dir =
            std::env::temp_dir().join(format!("terok-shield-cli-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.yml");
        let _ = fs::remove_file(&path);
        assert_eq!(load_config(&path).unwrap(), Config::default());
        fs::write(&path, "mode: hook\n").unwrap();
        assert_eq!(
            load_config(&path).unwrap().mode,
            crate::core::config::ShieldMode::Hook
        );
        fs::write(&path, "mode: hok\n").unwrap();
        let msg = format!("{:#}", load_config(&path).unwrap_err());
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        let msg = format!("{:#}", load_config(&path).unwrap_err());
        assert!(msg.contains("cannot read"), "{msg}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
