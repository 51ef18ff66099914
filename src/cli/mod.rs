//! The command line: argument definitions, the shared start-up `Context`, and dispatch.
//!
//! Each subcommand lives in its own module and receives parsed arguments plus the
//! `Context`, so locating files and reading `config.yml` happens once, in one place, and
//! fails with one clear message before any command starts working.

pub mod preview;
pub mod profiles;
pub mod status;

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};

use crate::core::config::{parse_config, Config};
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
    /// Show the configuration in effect: mode, audit, profiles and file locations.
    Status(StatusArgs),
    /// List the available allowlist profiles, bundled and user-defined.
    Profiles(ProfilesArgs),
    /// Print the ruleset a container would get, without touching any container.
    Preview(PreviewArgs),
}

/// Arguments of `status`.
#[derive(Debug, Clone, Default, Args)]
pub struct StatusArgs {
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

/// Run one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let ctx = Context::from_process_env(cli.state_dir)?;
    match &cli.command {
        Command::Status(args) => status::run(args, &ctx),
        Command::Profiles(args) => profiles::run(args, &ctx),
        Command::Preview(args) => preview::run(args, &ctx),
    }
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
