//! `doctor` (the Python original's `check-environment`): which observed facts about this host
//! block shielding, which only deserve a warning, and what fixes each.
//!
//! Pure: [`crate::effects::doctor`] gathers [`Facts`] (runs `nft --version`, `podman info`,
//! reads /etc/subuid, probes a throwaway user namespace ...); [`evaluate`] turns them into
//! one [`Check`] per concern. Keeping the verdicts here means every rule (a too-old nft, hooks
//! calling a deleted binary, a `hooks_dir` that hides ours) is unit-tested without the
//! machine being in that state.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;
use thiserror::Error;

use super::config::DnsTier;
use super::policy::{Mode, Policy};
use super::ruleset::Ruleset;

/// How one check came out. `Fail` means shielding cannot work until it is fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One line of the report: what was checked, what was found, and (unless ok) the fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Every check, in the order they are printed, and the worst status among them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    pub overall: Status,
}

impl Report {
    /// Checks that block shielding.
    pub fn failures(&self) -> usize {
        self.checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .count()
    }
}

/// A dotted version number (`1.0.6`); missing parts count as 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// A `--version` output with no version number in it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("no version number in `{0}`")]
pub struct VersionError(pub String);

impl Version {
    /// The first `N.N[.N]` word of a `--version` output (`nftables v1.0.6 (Lester Gooch #5)`,
    /// `podman version 4.3.1`, `podman version 5.0.0-rc1`).
    pub fn find_in(text: &str) -> Result<Version, VersionError> {
        text.split_whitespace()
            .filter_map(|word| {
                let word = word.trim_start_matches(['v', 'V']);
                let numeric: String = word
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '.')
                    .collect();
                let mut parts = numeric.split('.').filter(|p| !p.is_empty());
                let major = parts.next()?.parse().ok()?;
                let minor = parts.next()?.parse().ok()?;
                let patch = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
                Some(Version(major, minor, patch))
            })
            .next()
            .ok_or_else(|| VersionError(text.lines().next().unwrap_or("").trim().to_string()))
    }
}

/// The oldest nftables whose syntax and JSON output the shield relies on.
pub const MIN_NFT: Version = Version(1, 0, 0);
/// The oldest podman the shield (and the Python original) is tested with.
pub const TESTED_PODMAN: Version = Version(4, 3, 1);
/// A subordinate id range smaller than this cannot hold a normal image's users (podman's
/// own default is 65536).
pub const FULL_ID_RANGE: u64 = 65536;

/// An external program: where it was found, and what `--version` printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tool {
    /// Not found; the text says where it was looked for.
    Missing(String),
    Found {
        path: PathBuf,
        /// `--version`'s output, or why it could not be run.
        version: Result<String, String>,
    },
}

/// What `podman info --format json` tells about the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodmanInfo {
    pub rootless: bool,
    /// `host.rootlessNetworkCmd` (podman 5); older podman always uses slirp4netns.
    pub network_cmd: Option<String>,
    pub slirp4netns: Option<PathBuf>,
    pub pasta: Option<PathBuf>,
    pub oci_runtime: Option<String>,
    pub oci_runtime_path: Option<PathBuf>,
    pub cgroup_manager: Option<String>,
    pub cgroup_version: Option<String>,
    pub network_backend: Option<String>,
}

impl PodmanInfo {
    /// Read the fields we use; absent ones stay `None` (they vary between podman versions).
    pub fn from_json(info: &Value) -> PodmanInfo {
        let host = &info["host"];
        let text = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(String::from);
        PodmanInfo {
            rootless: host["security"]["rootless"].as_bool().unwrap_or(false),
            network_cmd: text(&host["rootlessNetworkCmd"]),
            slirp4netns: text(&host["slirp4netns"]["executable"]).map(PathBuf::from),
            pasta: text(&host["pasta"]["executable"]).map(PathBuf::from),
            oci_runtime: text(&host["ociRuntime"]["name"]),
            oci_runtime_path: text(&host["ociRuntime"]["path"]).map(PathBuf::from),
            cgroup_manager: text(&host["cgroupManager"]),
            cgroup_version: text(&host["cgroupVersion"]),
            network_backend: text(&host["networkBackend"]),
        }
    }

    /// The rootless network program podman starts for each container.
    pub fn rootless_network(&self) -> &str {
        self.network_cmd.as_deref().unwrap_or("slirp4netns")
    }
}

/// newuidmap or newgidmap: podman runs them to map the subordinate ids, so they need privilege.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdMapper {
    Missing,
    Found {
        path: PathBuf,
        setuid_root: bool,
        file_caps: bool,
    },
}

/// What only matters for a user other than root (rootless podman).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootlessFacts {
    /// How many subordinate uids /etc/subuid gives the user, or why it could not be read.
    pub subuid: Result<u64, String>,
    pub subgid: Result<u64, String>,
    pub newuidmap: IdMapper,
    pub newgidmap: IdMapper,
    /// Whether /dev/net/tun opens read-write (slirp4netns and pasta need it).
    pub tun: Result<(), String>,
    /// slirp4netns and pasta as found in PATH (podman info may not say).
    pub slirp4netns: Option<PathBuf>,
    pub pasta: Option<PathBuf>,
}

/// Persistent hook descriptors found where podman looks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstalledHooks {
    pub dir: PathBuf,
    /// In a system directory (rather than the user's own, listed in containers.conf).
    pub system: bool,
    /// The program the createRuntime descriptor calls; `None` if it cannot be read.
    pub calls: Option<PathBuf>,
    pub calls_executable: bool,
    /// `calls` is this very binary (same file after resolving links).
    pub calls_this_binary: bool,
}

/// The OCI hooks and where podman reads them from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookFacts {
    pub installed: Option<InstalledHooks>,
    /// Where `run`/`prepare` would install them (the system dir for root, else the user's).
    pub planned_dir: PathBuf,
    /// The user's containers.conf, which `setup --user` edits.
    pub user_conf: PathBuf,
    /// `$CONTAINERS_CONF`: podman then reads that file instead of the usual ones.
    pub containers_conf_env: Option<PathBuf>,
    /// The containers.conf that decides `hooks_dir` (the first, in podman's precedence, that
    /// sets it or cannot be parsed); `None` when none sets it (podman's defaults apply).
    pub hooks_dir: Option<(PathBuf, Result<Vec<String>, String>)>,
    /// podman's directories when no `hooks_dir` is set.
    pub default_dirs: Vec<PathBuf>,
}

/// The throwaway user+network namespace probe: can nf_tables be used there, as the hook does?
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespaceProbe {
    Works,
    /// The namespaces could not be created (user namespaces disabled or exhausted).
    NoNamespace(String),
    /// The namespaces exist but nft could not create a table there.
    NftablesRefused(String),
    /// Something else went wrong (nft missing, a timeout).
    NotRun(String),
}

/// config.yml: where it is, whether it exists (else defaults apply), and its DNS tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFact {
    pub file: PathBuf,
    pub exists: bool,
    pub tier: DnsTier,
}

/// Everything [`evaluate`] needs, as observed on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub root: bool,
    /// The user's name (or uid) for messages and /etc/subuid.
    pub user: String,
    /// config.yml as read, or why it cannot be used.
    pub config: Result<ConfigFact, String>,
    pub nft: Tool,
    pub podman: Tool,
    /// `None` when podman is missing.
    pub podman_info: Option<Result<PodmanInfo, String>>,
    /// Whether the OCI runtime podman names is an executable file.
    pub podman_runtime_executable: bool,
    /// runc and crun found in PATH (for when podman cannot say).
    pub runtimes_on_path: Vec<PathBuf>,
    /// `None` for root.
    pub rootless: Option<RootlessFacts>,
    pub hooks: HookFacts,
    /// `dnsmasq::locate()`'s answer; only asked when `dns.tier: dnsmasq` is configured.
    pub dnsmasq: Option<Result<PathBuf, String>>,
    pub namespace_probe: NamespaceProbe,
}

/// How many subordinate ids `text` (/etc/subuid or /etc/subgid) gives the user known by
/// `name` or numeric `id`; lines that do not parse are ignored, as shadow-utils does.
pub fn subordinate_ids(text: &str, name: &str, id: u32) -> u64 {
    let id = id.to_string();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.trim().split(':');
            let owner = fields.next()?;
            let _start: u64 = fields.next()?.parse().ok()?;
            let count: u64 = fields.next()?.parse().ok()?;
            (owner == name || owner == id).then_some(count)
        })
        .sum()
}

/// `[engine] hooks_dir` of a containers.conf: `Ok(None)` when it is not set.
pub fn hooks_dir_of(text: &str) -> Result<Option<Vec<String>>, String> {
    let doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| e.to_string().trim().to_string())?;
    let Some(dirs) = doc.get("engine").and_then(|e| e.get("hooks_dir")) else {
        return Ok(None);
    };
    let array = dirs
        .as_array()
        .ok_or("`hooks_dir` in [engine] is not a list of directories")?;
    Ok(Some(
        array
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
    ))
}

/// What the namespace probe loads: the ruleset an empty deny-all container gets, so the
/// probe needs every kernel feature a real container's firewall needs (sets, reject, NFLOG,
/// conntrack), and a kernel module that a user namespace cannot load shows up here.
pub fn probe_script() -> String {
    Ruleset::generate(&Policy::new(Mode::DenyAll)).to_nft()
}

/// Decide every check from the facts.
pub fn evaluate(f: &Facts) -> Report {
    let mut checks = vec![config(f), nft(&f.nft), podman(f), oci_runtime(f)];
    checks.extend(rootless(f));
    checks.push(namespace_probe(&f.namespace_probe));
    checks.push(hooks(f));
    checks.push(hooks_dir(f));
    checks.push(dnsmasq(f));
    let overall = checks.iter().map(|c| c.status).max().unwrap_or(Status::Ok);
    Report { checks, overall }
}

fn config(f: &Facts) -> Check {
    match &f.config {
        Ok(c) => Check::ok(
            "config",
            format!(
                "{}; dns.tier: {}",
                if c.exists {
                    format!("{} is valid", c.file.display())
                } else {
                    format!("no {}, so the defaults apply", c.file.display())
                },
                c.tier.as_str()
            ),
        ),
        Err(message) => Check::fail(
            "config",
            message.clone(),
            "correct config.yml as the message says, or move it away to use the defaults",
        ),
    }
}

fn nft(tool: &Tool) -> Check {
    const NAME: &str = "nft";
    const INSTALL: &str = "install the nftables package (Debian/Ubuntu: apt-get install nftables; Fedora: dnf install nftables), or point TEROK_SHIELD_NFT at nft";
    match tool {
        Tool::Missing(why) => Check::fail(NAME, why.clone(), INSTALL),
        Tool::Found {
            path,
            version: Err(why),
        } => Check::fail(
            NAME,
            format!("{} does not run: {why}", path.display()),
            format!("reinstall the nftables package, or fix {}", path.display()),
        ),
        Tool::Found {
            path,
            version: Ok(out),
        } => match Version::find_in(out) {
            Ok(v) if v >= MIN_NFT => Check::ok(NAME, format!("nftables {v} at {}", path.display())),
            Ok(v) => Check::fail(
                NAME,
                format!(
                    "nftables {v} at {} is older than {MIN_NFT}, whose syntax and JSON output the shield needs",
                    path.display()
                ),
                "upgrade the nftables package to 1.0 or later",
            ),
            Err(e) => Check::warn(
                NAME,
                format!("{} runs, but its version is unknown: {e}", path.display()),
                "check that it is nftables 1.0 or later (`nft --version`)",
            ),
        },
    }
}

fn podman(f: &Facts) -> Check {
    const NAME: &str = "podman";
    let (path, version) = match &f.podman {
        Tool::Missing(why) => return Check::fail(
            NAME,
            why.clone(),
            "install podman (Debian/Ubuntu: apt-get install podman; Fedora: dnf install podman)",
        ),
        Tool::Found { path, version } => (path, version),
    };
    let info = match &f.podman_info {
        Some(Ok(info)) => info,
        other => {
            let why = match other {
                Some(Err(why)) => why.as_str(),
                _ => "no answer",
            };
            return Check::fail(
                NAME,
                format!("`podman info` failed: {why}"),
                "run `podman info` as this user to see why; a user without a login session needs XDG_RUNTIME_DIR set to a directory of its own (e.g. `loginctl enable-linger USER`)",
            );
        }
    };
    let mut about = vec![if info.rootless { "rootless" } else { "rootful" }.to_string()];
    if let Some(m) = &info.cgroup_manager {
        about.push(format!(
            "cgroup manager {m}{}",
            info.cgroup_version
                .as_ref()
                .map(|v| format!(" ({v})"))
                .unwrap_or_default()
        ));
    }
    if let Some(b) = &info.network_backend {
        about.push(format!("network backend {b}"));
    }
    let about = about.join(", ");
    match version.as_ref().map(|out| Version::find_in(out)) {
        Ok(Ok(v)) if v >= TESTED_PODMAN => Check::ok(
            NAME,
            format!("podman {v} at {} ({about})", path.display()),
        ),
        Ok(Ok(v)) => Check::warn(
            NAME,
            format!(
                "podman {v} at {} is older than {TESTED_PODMAN}, the oldest the shield is tested with ({about})",
                path.display()
            ),
            "upgrade podman to 4.3.1 or later",
        ),
        Ok(Err(e)) => Check::warn(
            NAME,
            format!("podman at {} ({about}), version unknown: {e}", path.display()),
            "check that it is podman 4.3.1 or later (`podman --version`)",
        ),
        Err(why) => Check::warn(
            NAME,
            format!("`podman --version` failed: {why} ({about})"),
            "check that it is podman 4.3.1 or later (`podman --version`)",
        ),
    }
}

fn oci_runtime(f: &Facts) -> Check {
    const NAME: &str = "oci-runtime";
    const INSTALL: &str =
        "install crun or runc (Debian/Ubuntu: apt-get install crun), the program podman starts containers with";
    if let Some(Ok(info)) = &f.podman_info {
        if let Some(name) = &info.oci_runtime {
            if let Some(path) = &info.oci_runtime_path {
                return if f.podman_runtime_executable {
                    Check::ok(
                        NAME,
                        format!("{name} at {} (podman's choice)", path.display()),
                    )
                } else {
                    Check::fail(
                        NAME,
                        format!(
                            "podman uses {name} at {}, which is not an executable file",
                            path.display()
                        ),
                        INSTALL,
                    )
                };
            }
        }
    }
    match f.runtimes_on_path.first() {
        Some(path) => Check::ok(
            NAME,
            format!(
                "{} (podman did not say which runtime it uses)",
                path.display()
            ),
        ),
        None => Check::fail(NAME, "neither crun nor runc was found", INSTALL),
    }
}

fn rootless(f: &Facts) -> Vec<Check> {
    const NAMES: [&str; 6] = [
        "subuid",
        "subgid",
        "newuidmap",
        "newgidmap",
        "tun",
        "rootless-network",
    ];
    let Some(r) = &f.rootless else {
        return NAMES
            .iter()
            .map(|n| Check::ok(n, "not needed: root runs podman rootful"))
            .collect();
    };
    let user = &f.user;
    let ids = |name: &'static str, file: &str, flag: &str, counted: &Result<u64, String>| {
        let fix = format!(
            "as root: `usermod --add-{flag}s 100000-165535 {user}` (a range no other user has), then `podman system migrate` as {user}"
        );
        match counted {
            Ok(0) => Check::fail(
                name,
                format!("{file} gives {user} no subordinate ids, so podman cannot map a container's users"),
                fix,
            ),
            Ok(n) if *n < FULL_ID_RANGE => Check::warn(
                name,
                format!("{file} gives {user} only {n} subordinate ids; images owning files above that id fail to unpack"),
                fix,
            ),
            Ok(n) => Check::ok(name, format!("{file} gives {user} {n} ids")),
            Err(why) => Check::fail(name, format!("cannot read {file}: {why}"), fix),
        }
    };
    let mapper = |name: &'static str, found: &IdMapper| {
        match found {
        IdMapper::Missing => Check::fail(
            name,
            format!("{name} not found; podman needs it to map subordinate ids"),
            "install the uidmap package (Debian/Ubuntu: apt-get install uidmap; Fedora: shadow-utils)",
        ),
        IdMapper::Found {
            path,
            setuid_root: true,
            ..
        } => Check::ok(name, format!("{} (setuid root)", path.display())),
        IdMapper::Found {
            path,
            file_caps: true,
            ..
        } => Check::ok(name, format!("{} (file capabilities)", path.display())),
        IdMapper::Found { path, .. } => Check::fail(
            name,
            format!(
                "{} is neither setuid root nor has file capabilities, so it cannot map ids",
                path.display()
            ),
            format!(
                "as root: `chmod u+s {0}` (or `setcap cap_{1}+ep {0}`), or reinstall the uidmap package",
                path.display(),
                if name == "newuidmap" { "setuid" } else { "setgid" }
            ),
        ),
    }
    };
    let tun = match &r.tun {
        Ok(()) => Check::ok("tun", "/dev/net/tun opens read-write"),
        Err(why) => Check::fail(
            "tun",
            format!("/dev/net/tun cannot be opened ({why}); slirp4netns and pasta need it for a container's network"),
            "as root: `modprobe tun` (and list it in /etc/modules-load.d/), and make /dev/net/tun mode 0666",
        ),
    };
    vec![
        ids("subuid", "/etc/subuid", "subuid", &r.subuid),
        ids("subgid", "/etc/subgid", "subgid", &r.subgid),
        mapper("newuidmap", &r.newuidmap),
        mapper("newgidmap", &r.newgidmap),
        tun,
        rootless_network(f, r),
    ]
}

fn rootless_network(f: &Facts, r: &RootlessFacts) -> Check {
    const NAME: &str = "rootless-network";
    let info = match &f.podman_info {
        Some(Ok(info)) => info.clone(),
        _ => PodmanInfo::default(),
    };
    let wanted = info.rootless_network().to_string();
    let (found, package) = match wanted.as_str() {
        "pasta" => (info.pasta.clone().or_else(|| r.pasta.clone()), "passt"),
        _ => (
            info.slirp4netns.clone().or_else(|| r.slirp4netns.clone()),
            "slirp4netns",
        ),
    };
    match found {
        Some(path) => Check::ok(NAME, format!("podman uses {wanted}: {}", path.display())),
        None => Check::fail(
            NAME,
            format!("podman uses {wanted} for rootless networking, and it is not installed"),
            format!("install the {package} package"),
        ),
    }
}

fn namespace_probe(probe: &NamespaceProbe) -> Check {
    const NAME: &str = "userns-nftables";
    match probe {
        NamespaceProbe::Works => Check::ok(
            NAME,
            "nft created a table inside a new user and network namespace, as the hook does in a rootless container",
        ),
        NamespaceProbe::NoNamespace(why) => Check::fail(
            NAME,
            format!("cannot create a user and network namespace: {why}"),
            "enable unprivileged user namespaces: `sysctl user.max_user_namespaces=15000` (and on Debian kernels before 6.x `sysctl kernel.unprivileged_userns_clone=1`), persisted in /etc/sysctl.d/",
        ),
        NamespaceProbe::NftablesRefused(why) => Check::fail(
            NAME,
            format!("nft cannot create a table inside a new user and network namespace: {why}"),
            "as root: `modprobe nf_tables` and list nf_tables in /etc/modules-load.d/ (a user namespace cannot load kernel modules itself); check that no security module forbids netlink there",
        ),
        NamespaceProbe::NotRun(why) => Check::warn(
            NAME,
            format!("not tested: {why}"),
            "fix the problems above, then run `terok-shield doctor` again",
        ),
    }
}

fn setup_command(f: &Facts) -> &'static str {
    if f.root {
        "terok-shield setup --system"
    } else {
        "terok-shield setup --user"
    }
}

fn hooks(f: &Facts) -> Check {
    const NAME: &str = "hooks";
    let setup = setup_command(f);
    let Some(h) = &f.hooks.installed else {
        return Check::warn(
            NAME,
            format!(
                "the OCI hooks are not installed yet (they would go to {})",
                f.hooks.planned_dir.display()
            ),
            format!("`{setup}` installs them now; `run` and `prepare` also do it on first use"),
        );
    };
    let redo = if h.system {
        "as root: `terok-shield setup --system`".to_string()
    } else {
        format!("`{setup}`")
    };
    match &h.calls {
        None => Check::fail(
            NAME,
            format!(
                "the hook descriptor in {} cannot be read, so podman cannot call the shield",
                h.dir.display()
            ),
            format!("{redo} writes it again"),
        ),
        Some(calls) if !h.calls_executable => Check::fail(
            NAME,
            format!(
                "the OCI hooks in {} call {}, which is not an executable file: shielded containers cannot start",
                h.dir.display(),
                calls.display()
            ),
            format!("{redo} points them at this binary"),
        ),
        Some(calls) if !h.calls_this_binary => Check::warn(
            NAME,
            format!(
                "the OCI hooks in {} call {}, not this binary; that one applies the firewalls",
                h.dir.display(),
                calls.display()
            ),
            format!("{redo} points them at this binary, if it is the one you want"),
        ),
        Some(calls) => Check::ok(
            NAME,
            format!("installed in {}, calling {}", h.dir.display(), calls.display()),
        ),
    }
}

fn hooks_dir(f: &Facts) -> Check {
    const NAME: &str = "hooks-dir";
    let h = &f.hooks;
    let needed = h
        .installed
        .as_ref()
        .map_or(h.planned_dir.as_path(), |i| i.dir.as_path());
    let listed: Vec<PathBuf> = match &h.hooks_dir {
        Some((conf, Err(why))) => {
            return Check::fail(
                NAME,
                format!("{} cannot be parsed: {why}", conf.display()),
                format!(
                    "fix {} by hand (podman cannot read it either), then run `terok-shield doctor` again",
                    conf.display()
                ),
            )
        }
        Some((_, Ok(dirs))) => dirs.iter().map(PathBuf::from).collect(),
        None => h.default_dirs.clone(),
    };
    let source = match &h.hooks_dir {
        Some((conf, _)) => format!("hooks_dir of {}", conf.display()),
        None => "podman's default hook directories (no hooks_dir is set)".to_string(),
    };
    if listed.iter().any(|d| d == needed) {
        return Check::ok(NAME, format!("{} is in {source}", needed.display()));
    }
    // `run`/`prepare` add the user's directory to the user's containers.conf themselves;
    // that is only effective when podman reads that file.
    let user_conf_decides = match (&h.containers_conf_env, &h.hooks_dir) {
        (Some(_), _) => false,
        (None, Some((conf, _))) => conf == &h.user_conf,
        (None, None) => true,
    };
    if h.installed.is_none() && !f.root && user_conf_decides {
        return Check::ok(
            NAME,
            format!(
                "{} is not in {source} yet; `run`, `prepare` and `setup --user` add it to {}",
                needed.display(),
                h.user_conf.display()
            ),
        );
    }
    let conf = match (&h.containers_conf_env, &h.hooks_dir) {
        (Some(env), _) => env.clone(),
        (None, Some((conf, _))) => conf.clone(),
        (None, None) => h.user_conf.clone(),
    };
    let unset = if h.containers_conf_env.is_some() {
        ", or unset CONTAINERS_CONF"
    } else {
        ""
    };
    Check::fail(
        NAME,
        format!(
            "podman does not read {}: it is not in {source}, so shielded containers would start without their firewall hook",
            needed.display()
        ),
        format!(
            "add \"{}\" to hooks_dir under [engine] in {} (keep the directories listed there){unset}",
            needed.display(),
            conf.display()
        ),
    )
}

fn dnsmasq(f: &Facts) -> Check {
    const NAME: &str = "dnsmasq";
    match (&f.dnsmasq, &f.config) {
        (Some(Ok(path)), _) => Check::ok(NAME, format!("{} (with nftset)", path.display())),
        (Some(Err(why)), _) => Check::fail(
            NAME,
            format!("dns.tier is dnsmasq, but {why}"),
            "install dnsmasq 2.87 or later built with nftset (Debian/Ubuntu: apt-get install dnsmasq-base), or set dns.tier: builtin in config.yml",
        ),
        (None, Ok(c)) => Check::ok(NAME, format!("not needed: dns.tier is {}", c.tier.as_str())),
        (None, Err(_)) => Check::ok(NAME, "not checked: config.yml could not be read"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host where everything works: rootless podman 4.3.1, hooks in the user's dir.
    fn healthy() -> Facts {
        let user_dir = PathBuf::from("/home/u/.config/terok/shield/hooks.d");
        Facts {
            root: false,
            user: "u".into(),
            config: Ok(ConfigFact {
                file: "/home/u/.config/terok/shield/config.yml".into(),
                exists: false,
                tier: DnsTier::Auto,
            }),
            podman_runtime_executable: true,
            nft: Tool::Found {
                path: "/usr/sbin/nft".into(),
                version: Ok("nftables v1.0.6 (Lester Gooch #5)\n".into()),
            },
            podman: Tool::Found {
                path: "/usr/bin/podman".into(),
                version: Ok("podman version 4.3.1\n".into()),
            },
            podman_info: Some(Ok(PodmanInfo {
                rootless: true,
                slirp4netns: Some("/usr/bin/slirp4netns".into()),
                oci_runtime: Some("runc".into()),
                oci_runtime_path: Some("/usr/bin/runc".into()),
                cgroup_manager: Some("cgroupfs".into()),
                ..Default::default()
            })),
            runtimes_on_path: vec!["/usr/sbin/runc".into()],
            rootless: Some(RootlessFacts {
                subuid: Ok(65536),
                subgid: Ok(65536),
                newuidmap: IdMapper::Found {
                    path: "/usr/bin/newuidmap".into(),
                    setuid_root: true,
                    file_caps: false,
                },
                newgidmap: IdMapper::Found {
                    path: "/usr/bin/newgidmap".into(),
                    setuid_root: false,
                    file_caps: true,
                },
                tun: Ok(()),
                slirp4netns: Some("/usr/bin/slirp4netns".into()),
                pasta: None,
            }),
            hooks: HookFacts {
                installed: Some(InstalledHooks {
                    dir: user_dir.clone(),
                    system: false,
                    calls: Some("/usr/local/bin/terok-shield".into()),
                    calls_executable: true,
                    calls_this_binary: true,
                }),
                planned_dir: user_dir.clone(),
                user_conf: "/home/u/.config/containers/containers.conf".into(),
                containers_conf_env: None,
                hooks_dir: Some((
                    "/home/u/.config/containers/containers.conf".into(),
                    Ok(vec![user_dir.display().to_string()]),
                )),
                default_dirs: vec!["/etc/containers/oci/hooks.d".into()],
            },
            dnsmasq: None,
            namespace_probe: NamespaceProbe::Works,
        }
    }

    fn check<'a>(r: &'a Report, name: &str) -> &'a Check {
        r.checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no check {name}"))
    }

    #[test]
    fn a_healthy_host_is_all_ok() {
        let r = evaluate(&healthy());
        assert!(
            r.checks
                .iter()
                .all(|c| c.status == Status::Ok && c.fix.is_none()),
            "{r:#?}"
        );
        assert_eq!(r.overall, Status::Ok);
        assert_eq!(r.failures(), 0);
    }

    #[test]
    fn every_problem_carries_a_fix() {
        let mut f = healthy();
        f.nft = Tool::Missing("nft not found".into());
        f.hooks.installed = None;
        let r = evaluate(&f);
        for c in &r.checks {
            assert_eq!(c.status != Status::Ok, c.fix.is_some(), "{c:?}");
        }
    }

    #[test]
    fn missing_nft_fails_and_names_the_package() {
        let mut f = healthy();
        f.nft = Tool::Missing("nft not found (looked in PATH)".into());
        let r = evaluate(&f);
        let c = check(&r, "nft");
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.as_ref().unwrap().contains("nftables"), "{c:?}");
        assert_eq!(r.overall, Status::Fail);
        assert_eq!(r.failures(), 1);
    }

    #[test]
    fn nft_older_than_1_0_fails_and_unknown_versions_warn() {
        let mut f = healthy();
        f.nft = Tool::Found {
            path: "/usr/sbin/nft".into(),
            version: Ok("nftables v0.9.8 (E.D.S.)".into()),
        };
        assert_eq!(check(&evaluate(&f), "nft").status, Status::Fail);
        f.nft = Tool::Found {
            path: "/usr/sbin/nft".into(),
            version: Ok("something else".into()),
        };
        assert_eq!(check(&evaluate(&f), "nft").status, Status::Warn);
        f.nft = Tool::Found {
            path: "/usr/sbin/nft".into(),
            version: Err("exec format error".into()),
        };
        assert_eq!(check(&evaluate(&f), "nft").status, Status::Fail);
    }

    #[test]
    fn versions_are_found_in_version_outputs() {
        assert_eq!(
            Version::find_in("nftables v1.0.6 (Lester Gooch #5)"),
            Ok(Version(1, 0, 6))
        );
        assert_eq!(
            Version::find_in("podman version 5.0.0-rc1"),
            Ok(Version(5, 0, 0))
        );
        assert_eq!(Version::find_in("tool 2.87"), Ok(Version(2, 87, 0)));
        assert!(Version::find_in("no digits here").is_err());
        assert!(Version(1, 0, 0) > Version(0, 9, 8));
        assert!(Version(4, 3, 1) > Version(4, 3, 0));
    }

    #[test]
    fn podman_missing_or_info_failing_blocks_and_old_podman_warns() {
        let mut f = healthy();
        f.podman_info = Some(Err("cannot create XDG_RUNTIME_DIR".into()));
        let c = check(&evaluate(&f), "podman").clone();
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("XDG_RUNTIME_DIR"), "{c:?}");
        f = healthy();
        f.podman = Tool::Found {
            path: "/usr/bin/podman".into(),
            version: Ok("podman version 3.4.4".into()),
        };
        assert_eq!(check(&evaluate(&f), "podman").status, Status::Warn);
        f.podman = Tool::Missing("podman not found".into());
        f.podman_info = None;
        let r = evaluate(&f);
        assert_eq!(check(&r, "podman").status, Status::Fail);
        // runc is still found in PATH.
        assert_eq!(check(&r, "oci-runtime").status, Status::Ok);
        f.runtimes_on_path.clear();
        assert_eq!(check(&evaluate(&f), "oci-runtime").status, Status::Fail);
        // Podman names a runtime that is gone.
        let mut f = healthy();
        f.podman_runtime_executable = false;
        assert_eq!(check(&evaluate(&f), "oci-runtime").status, Status::Fail);
    }

    #[test]
    fn rootless_needs_subordinate_ids_privileged_mappers_and_tun() {
        let fail = |edit: fn(&mut RootlessFacts), name: &str, expect: Status| {
            let mut f = healthy();
            edit(f.rootless.as_mut().unwrap());
            let r = evaluate(&f);
            let c = check(&r, name);
            assert_eq!(c.status, expect, "{c:?}");
            c.fix.clone().unwrap()
        };
        let fix = fail(|r| r.subuid = Ok(0), "subuid", Status::Fail);
        assert!(
            fix.contains("usermod --add-subuids") && fix.contains(" u`"),
            "{fix}"
        );
        fail(|r| r.subgid = Ok(1000), "subgid", Status::Warn);
        fail(
            |r| r.subgid = Err("no such file".into()),
            "subgid",
            Status::Fail,
        );
        let fix = fail(
            |r| r.newuidmap = IdMapper::Missing,
            "newuidmap",
            Status::Fail,
        );
        assert!(fix.contains("uidmap"), "{fix}");
        let fix = fail(
            |r| {
                r.newgidmap = IdMapper::Found {
                    path: "/usr/bin/newgidmap".into(),
                    setuid_root: false,
                    file_caps: false,
                }
            },
            "newgidmap",
            Status::Fail,
        );
        assert!(fix.contains("chmod u+s /usr/bin/newgidmap"), "{fix}");
        fail(
            |r| r.tun = Err("No such device".into()),
            "tun",
            Status::Fail,
        );
    }

    #[test]
    fn the_rootless_network_program_podman_uses_must_exist() {
        let mut f = healthy();
        f.rootless.as_mut().unwrap().slirp4netns = None;
        if let Some(Ok(info)) = &mut f.podman_info {
            info.slirp4netns = None;
        }
        let r = evaluate(&f);
        let c = check(&r, "rootless-network");
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.as_ref().unwrap().contains("slirp4netns"));
        // Podman 5 picks pasta: slirp4netns no longer matters, pasta does.
        if let Some(Ok(info)) = &mut f.podman_info {
            info.network_cmd = Some("pasta".into());
            info.pasta = Some("/usr/bin/pasta".into());
        }
        assert_eq!(check(&evaluate(&f), "rootless-network").status, Status::Ok);
        if let Some(Ok(info)) = &mut f.podman_info {
            info.pasta = None;
        }
        let r = evaluate(&f);
        assert!(check(&r, "rootless-network")
            .fix
            .as_ref()
            .unwrap()
            .contains("passt"));
    }

    #[test]
    fn root_needs_no_rootless_setup() {
        let mut f = healthy();
        f.root = true;
        f.rootless = None;
        let r = evaluate(&f);
        for name in [
            "subuid",
            "subgid",
            "newuidmap",
            "newgidmap",
            "tun",
            "rootless-network",
        ] {
            assert_eq!(check(&r, name).status, Status::Ok, "{name}");
        }
    }

    #[test]
    fn hooks_not_installed_warn_but_hooks_calling_a_missing_binary_fail() {
        let mut f = healthy();
        f.hooks.installed = None;
        f.hooks.hooks_dir = None;
        let r = evaluate(&f);
        let c = check(&r, "hooks");
        assert_eq!(c.status, Status::Warn);
        assert!(c.fix.as_ref().unwrap().contains("setup --user"), "{c:?}");
        // Nothing lists the user's dir yet, and `run` will add it: not a problem.
        assert_eq!(check(&r, "hooks-dir").status, Status::Ok);
        assert_eq!(r.overall, Status::Warn);

        let mut f = healthy();
        let h = f.hooks.installed.as_mut().unwrap();
        h.calls_executable = false;
        h.calls_this_binary = false;
        let r = evaluate(&f);
        let c = check(&r, "hooks");
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("/usr/local/bin/terok-shield"), "{c:?}");

        let mut f = healthy();
        f.hooks.installed.as_mut().unwrap().calls_this_binary = false;
        assert_eq!(check(&evaluate(&f), "hooks").status, Status::Warn);
        f.hooks.installed.as_mut().unwrap().calls = None;
        assert_eq!(check(&evaluate(&f), "hooks").status, Status::Fail);

        let mut f = healthy();
        let h = f.hooks.installed.as_mut().unwrap();
        h.system = true;
        h.calls_executable = false;
        let c = check(&evaluate(&f), "hooks").clone();
        assert!(c.fix.unwrap().contains("setup --system"));
    }

    #[test]
    fn a_hooks_dir_that_hides_installed_hooks_fails() {
        let mut f = healthy();
        f.hooks.hooks_dir = Some((
            "/home/u/.config/containers/containers.conf".into(),
            Ok(vec!["/opt/hooks".into()]),
        ));
        let c = check(&evaluate(&f), "hooks-dir").clone();
        assert_eq!(c.status, Status::Fail);
        assert!(c
            .fix
            .unwrap()
            .contains("/home/u/.config/terok/shield/hooks.d"));

        // Root: system hooks, and a system containers.conf whose hooks_dir leaves them out.
        let mut f = healthy();
        f.root = true;
        f.rootless = None;
        let system = PathBuf::from("/etc/containers/oci/hooks.d");
        f.hooks.planned_dir = system.clone();
        let h = f.hooks.installed.as_mut().unwrap();
        h.dir = system.clone();
        h.system = true;
        f.hooks.hooks_dir = None;
        assert_eq!(check(&evaluate(&f), "hooks-dir").status, Status::Ok);
        f.hooks.hooks_dir = Some((
            "/etc/containers/containers.conf".into(),
            Ok(vec!["/opt/hooks".into()]),
        ));
        assert_eq!(check(&evaluate(&f), "hooks-dir").status, Status::Fail);

        // CONTAINERS_CONF replaces the user's file: adding to it would not help.
        let mut f = healthy();
        f.hooks.installed = None;
        f.hooks.containers_conf_env = Some("/srv/podman.conf".into());
        f.hooks.hooks_dir = None;
        let c = check(&evaluate(&f), "hooks-dir").clone();
        assert_eq!(c.status, Status::Fail);
        let fix = c.fix.unwrap();
        assert!(
            fix.contains("/srv/podman.conf") && fix.contains("CONTAINERS_CONF"),
            "{fix}"
        );

        let mut f = healthy();
        f.hooks.hooks_dir = Some((
            "/home/u/.config/containers/containers.conf".into(),
            Err("expected `]`".into()),
        ));
        assert_eq!(check(&evaluate(&f), "hooks-dir").status, Status::Fail);
    }

    #[test]
    fn dnsmasq_matters_only_for_its_tier() {
        let mut f = healthy();
        assert_eq!(check(&evaluate(&f), "dnsmasq").status, Status::Ok);
        f.config = Ok(ConfigFact {
            file: "/c/config.yml".into(),
            exists: true,
            tier: DnsTier::Dnsmasq,
        });
        f.dnsmasq = Some(Err("dnsmasq not found".into()));
        let c = check(&evaluate(&f), "dnsmasq").clone();
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.unwrap().contains("dnsmasq-base"));
        f.dnsmasq = Some(Ok("/usr/sbin/dnsmasq".into()));
        assert_eq!(check(&evaluate(&f), "dnsmasq").status, Status::Ok);
    }

    #[test]
    fn a_bad_config_and_a_failed_namespace_probe_block() {
        let mut f = healthy();
        f.config = Err("config.yml: unknown key `mod`".into());
        f.namespace_probe = NamespaceProbe::NftablesRefused("Operation not supported".into());
        let r = evaluate(&f);
        assert_eq!(check(&r, "config").status, Status::Fail);
        let c = check(&r, "userns-nftables");
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.as_ref().unwrap().contains("modprobe nf_tables"));
        assert_eq!(r.failures(), 2);
        f.namespace_probe = NamespaceProbe::NoNamespace("EPERM".into());
        assert!(check(&evaluate(&f), "userns-nftables")
            .fix
            .as_ref()
            .unwrap()
            .contains("max_user_namespaces"));
        f.namespace_probe = NamespaceProbe::NotRun("nft is missing".into());
        assert_eq!(check(&evaluate(&f), "userns-nftables").status, Status::Warn);
    }

    #[test]
    fn subordinate_ids_match_by_name_or_uid_and_add_up() {
        let text =
            "alice:100000:65536\n1001:200000:1000\n#junk\nbob:300000:65536\nalice:400000:10\n";
        assert_eq!(subordinate_ids(text, "alice", 1000), 65546);
        assert_eq!(subordinate_ids(text, "carol", 1001), 1000);
        assert_eq!(subordinate_ids(text, "dave", 1002), 0);
        assert_eq!(subordinate_ids("", "alice", 1000), 0);
    }

    #[test]
    fn hooks_dir_is_read_from_containers_conf() {
        assert_eq!(hooks_dir_of(""), Ok(None));
        assert_eq!(hooks_dir_of("[engine]\nruntime = \"crun\"\n"), Ok(None));
        assert_eq!(
            hooks_dir_of("[engine]\nhooks_dir = [\"/a\", \"/b\"]\n"),
            Ok(Some(vec!["/a".into(), "/b".into()]))
        );
        assert!(hooks_dir_of("[engine\n").is_err());
        assert!(hooks_dir_of("[engine]\nhooks_dir = \"/a\"\n").is_err());
    }

    #[test]
    fn podman_info_fields_are_read_from_its_json() {
        let json: Value = serde_json::json!({
            "host": {
                "security": { "rootless": true },
                "ociRuntime": { "name": "crun", "path": "/usr/bin/crun" },
                "cgroupManager": "systemd",
                "cgroupVersion": "v2",
                "networkBackend": "netavark",
                "rootlessNetworkCmd": "pasta",
                "pasta": { "executable": "/usr/bin/pasta" },
                "slirp4netns": { "executable": "" }
            }
        });
        let info = PodmanInfo::from_json(&json);
        assert!(info.rootless);
        assert_eq!(info.oci_runtime.as_deref(), Some("crun"));
        assert_eq!(info.rootless_network(), "pasta");
        assert_eq!(info.pasta, Some(PathBuf::from("/usr/bin/pasta")));
        assert_eq!(info.slirp4netns, None);
        assert_eq!(
            PodmanInfo::from_json(&Value::Null).rootless_network(),
            "slirp4netns"
        );
    }
}
