//! Checking the podman arguments a user passes to `terok-shield run ... -- ARGS`.
//!
//! The shield sets some flags itself (name, hooks, annotations, dropped capabilities) and a
//! few others would switch the firewall off or hand the workload the power to undo it
//! (host network, NET_ADMIN, `--privileged`). Those are refused with a clear error.
//!
//! To know where the image name starts we must know which flags take a value, so the table
//! below mirrors `podman run --help` (Podman 4.x and 5.x). An unknown flag is refused rather
//! than guessed at: a wrong guess could hide a forbidden flag behind it.

use thiserror::Error;

use super::policy::InboundPort;
use super::target::Protocol;

/// `podman run` flags that take a value (long names, without `--`).
const VALUE_FLAGS: &[&str] = &[
    "add-host",
    "annotation",
    "arch",
    "attach",
    "authfile",
    "blkio-weight",
    "blkio-weight-device",
    "cap-add",
    "cap-drop",
    "cgroup-conf",
    "cgroup-parent",
    "cgroupns",
    "cgroups",
    "chrootdirs",
    "cidfile",
    "conmon-pidfile",
    "cpu-period",
    "cpu-quota",
    "cpu-rt-period",
    "cpu-rt-runtime",
    "cpu-shares",
    "cpus",
    "cpuset-cpus",
    "cpuset-mems",
    "decryption-key",
    "detach-keys",
    "device",
    "device-cgroup-rule",
    "device-read-bps",
    "device-read-iops",
    "device-write-bps",
    "device-write-iops",
    "dns",
    "dns-option",
    "dns-search",
    "entrypoint",
    "env",
    "env-file",
    "env-merge",
    "expose",
    "gidmap",
    "gpus",
    "group-add",
    "group-entry",
    "health-cmd",
    "health-interval",
    "health-log-destination",
    "health-max-log-count",
    "health-max-log-size",
    "health-on-failure",
    "health-retries",
    "health-start-period",
    "health-startup-cmd",
    "health-startup-interval",
    "health-startup-retries",
    "health-startup-success",
    "health-startup-timeout",
    "health-timeout",
    "hostname",
    "hosts-file",
    "hostuser",
    "image-volume",
    "init-path",
    "ip",
    "ip6",
    "ipc",
    "label",
    "label-file",
    "log-driver",
    "log-opt",
    "mac-address",
    "memory",
    "memory-reservation",
    "memory-swap",
    "memory-swappiness",
    "mount",
    "name",
    "network",
    "net",
    "network-alias",
    "oom-score-adj",
    "os",
    "passwd-entry",
    "personality",
    "pid",
    "pidfile",
    "pids-limit",
    "platform",
    "pod",
    "pod-id-file",
    "preserve-fd",
    "preserve-fds",
    "publish",
    "pull",
    "rdt-class",
    "requires",
    "restart",
    "retry",
    "retry-delay",
    "sdnotify",
    "seccomp-policy",
    "secret",
    "security-opt",
    "shm-size",
    "shm-size-systemd",
    "stop-signal",
    "stop-timeout",
    "subgidname",
    "subuidname",
    "sysctl",
    "systemd",
    "timeout",
    "tmpfs",
    "tz",
    "uidmap",
    "ulimit",
    "umask",
    "unsetenv",
    "user",
    "userns",
    "uts",
    "variant",
    "volume",
    "volumes-from",
    "workdir",
    // Global podman flags that may follow the subcommand.
    "cgroup-manager",
    "conmon",
    "events-backend",
    "hooks-dir",
    "log-level",
    "module",
    "network-cmd-path",
    "network-config-dir",
    "root",
    "runroot",
    "runtime",
    "runtime-flag",
    "storage-driver",
    "storage-opt",
    "tmpdir",
    "volumepath",
    "imagestore",
    "url",
    "connection",
    "identity",
    "ssh",
    "out",
    "config",
    "cdi-spec-dir",
];

/// `podman run` flags that take no value.
const BOOL_FLAGS: &[&str] = &[
    "detach",
    "disable-content-trust",
    "env-host",
    "help",
    "http-proxy",
    "init",
    "interactive",
    "no-healthcheck",
    "no-hosts",
    "oom-kill-disable",
    "passwd",
    "privileged",
    "publish-all",
    "quiet",
    "read-only",
    "read-only-tmpfs",
    "replace",
    "rm",
    "rmi",
    "rootfs",
    "sig-proxy",
    "tls-verify",
    "tty",
    "unsetenv-all",
    "remote",
    "syslog",
    "noout",
    "trace",
    "debug",
];

/// Short flags that take a value, and those that do not.
const SHORT_VALUE: &str = "acehlmpuvw";
const SHORT_BOOL: &str = "dtiPq";

/// Why a podman argument list was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PodmanArgsError {
    #[error("`{flag}` is managed by terok-shield and cannot be given after `--`: {why}")]
    Managed { flag: String, why: &'static str },
    #[error("`{flag}` would let the container bypass the shield: {why}")]
    Forbidden { flag: String, why: &'static str },
    #[error("unknown podman flag `{0}`: terok-shield cannot tell whether it takes a value; write it as `{0}=VALUE` if it does, or check the spelling")]
    Unknown(String),
    #[error("`{0}` needs a value")]
    MissingValue(String),
    #[error("no image given after `--`: usage: terok-shield run NAME [--profiles P...] -- [podman flags] IMAGE [COMMAND...]")]
    NoImage,
    #[error("cannot read `--publish {0}`: expected [[IP:][HOST_PORT]:]CONTAINER_PORT[/tcp|/udp], ports 1-65535 (ranges as A-B, at most {MAX_PUBLISHED} ports)")]
    BadPublish(String),
}

/// Published container ports one `run` may open inbound (ranges are expanded).
pub const MAX_PUBLISHED: usize = 1024;

/// The container ports of one `-p` value: `[[IP:][HOST_PORT]:]CONTAINER_PORT[/PROTO]`, where
/// ports may be ranges (`8000-8010`) and IP may be a bracketed IPv6 address.
pub fn published_ports(value: &str) -> Result<Vec<InboundPort>, PodmanArgsError> {
    let bad = || PodmanArgsError::BadPublish(value.to_string());
    let (spec, proto) = match value.rsplit_once('/') {
        Some((spec, "tcp")) => (spec, Protocol::Tcp),
        Some((spec, "udp")) => (spec, Protocol::Udp),
        Some(_) => return Err(bad()),
        None => (value, Protocol::Tcp),
    };
    // The container port is the last field; an IPv6 address sits in brackets before it.
    let container = spec
        .rsplit(':')
        .next()
        .filter(|c| !c.contains(']'))
        .ok_or_else(bad)?;
    let port = |t: &str| t.parse::<u16>().ok().filter(|p| *p > 0);
    let (first, last) = match container.split_once('-') {
        Some((a, b)) => (port(a).ok_or_else(bad)?, port(b).ok_or_else(bad)?),
        None => {
            let p = port(container).ok_or_else(bad)?;
            (p, p)
        }
    };
    if first > last || usize::from(last - first) >= MAX_PUBLISHED {
        return Err(bad());
    }
    Ok((first..=last)
        .map(|port| InboundPort {
            port,
            protocol: proto,
        })
        .collect())
}

/// The user's arguments split at the image: podman flags, image, command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunArgs {
    pub flags: Vec<String>,
    pub image: String,
    pub command: Vec<String>,
    /// Container ports the `-p`/`--publish` flags publish, for the input chain.
    pub published: Vec<InboundPort>,
}

/// Split and check the arguments given after `--`.
pub fn check_run_args(args: &[String]) -> Result<RunArgs, PodmanArgsError> {
    let mut published: Vec<InboundPort> = Vec::new();
    let mut publish = |value: &str| -> Result<(), PodmanArgsError> {
        published.extend(published_ports(value)?);
        if published.len() > MAX_PUBLISHED {
            return Err(PodmanArgsError::BadPublish(value.to_string()));
        }
        Ok(())
    };
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        if arg == "--" {
            // podman's own separator: next is the image.
            i += 1;
            break;
        }
        if let Some(long) = arg.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            if VALUE_FLAGS.contains(&name) {
                let value = match inline {
                    Some(v) => v,
                    None => {
                        i += 1;
                        args.get(i)
                            .cloned()
                            .ok_or_else(|| PodmanArgsError::MissingValue(arg.clone()))?
                    }
                };
                check_flag(name, Some(&value))?;
                if name == "publish" {
                    publish(&value)?;
                }
            } else if BOOL_FLAGS.contains(&name) {
                if inline.as_deref().is_none_or(|v| v != "false") {
                    check_flag(name, None)?;
                }
            } else {
                return Err(PodmanArgsError::Unknown(format!("--{name}")));
            }
        } else if let Some(shorts) = arg.strip_prefix('-').filter(|s| !s.is_empty()) {
            let chars: Vec<char> = shorts.chars().collect();
            for (k, c) in chars.iter().enumerate() {
                if SHORT_BOOL.contains(*c) {
                    if *c == 'P' {
                        check_flag("publish-all", None)?;
                    }
                    continue;
                }
                if SHORT_VALUE.contains(*c) {
                    let rest: String = chars[k + 1..].iter().collect();
                    let value = if !rest.is_empty() {
                        rest.strip_prefix('=').unwrap_or(&rest).to_string()
                    } else {
                        i += 1;
                        args.get(i)
                            .cloned()
                            .ok_or_else(|| PodmanArgsError::MissingValue(arg.clone()))?
                    };
                    check_flag(long_of(*c), Some(&value))?;
                    if *c == 'p' {
                        publish(&value)?;
                    }
                    break;
                }
                return Err(PodmanArgsError::Unknown(format!("-{c}")));
            }
        } else {
            break;
        }
        i += 1;
    }
    let image = args.get(i).cloned().ok_or(PodmanArgsError::NoImage)?;
    published.sort_unstable();
    published.dedup();
    Ok(RunArgs {
        flags: args[..i].iter().filter(|a| *a != "--").cloned().collect(),
        image,
        command: args[i + 1..].to_vec(),
        published,
    })
}

fn long_of(c: char) -> &'static str {
    match c {
        'a' => "attach",
        'c' => "cpu-shares",
        'e' => "env",
        'h' => "hostname",
        'l' => "label",
        'm' => "memory",
        'p' => "publish",
        'u' => "user",
        'v' => "volume",
        _ => "workdir",
    }
}

/// Capabilities that would let the workload rewrite or sidestep the firewall.
fn dangerous_cap(cap: &str) -> bool {
    let cap = cap.trim().to_ascii_uppercase();
    let cap = cap.strip_prefix("CAP_").unwrap_or(&cap);
    matches!(cap, "NET_ADMIN" | "NET_RAW" | "ALL" | "SYS_ADMIN" | "BPF")
}

fn check_flag(name: &str, value: Option<&str>) -> Result<(), PodmanArgsError> {
    let flag = || match value {
        Some(v) => format!("--{name}={v}"),
        None => format!("--{name}"),
    };
    let managed = |why| Err(PodmanArgsError::Managed { flag: flag(), why });
    let forbidden = |why| Err(PodmanArgsError::Forbidden { flag: flag(), why });
    match name {
        "name" => managed("the container is named by `terok-shield run NAME`"),
        "hooks-dir" => managed("the shield installs its own OCI hooks"),
        "publish-all" => managed(
            "it publishes the image's EXPOSE ports, which the shield cannot see to let in; publish them one by one with -p",
        ),
        "annotation" if value.is_some_and(|v| v.starts_with("terok.shield.")) => {
            managed("terok.shield.* annotations carry the shield's own state")
        }
        "dns" | "dns-option" | "dns-search" => {
            managed("the shield decides which resolver the container may use")
        }
        "privileged" => forbidden("a privileged container holds CAP_NET_ADMIN and can flush the firewall"),
        "cap-add" if value.is_some_and(|v| v.split(',').any(dangerous_cap)) => forbidden(
            "NET_ADMIN, NET_RAW, SYS_ADMIN, BPF or ALL would let the workload change or bypass the firewall",
        ),
        "network" | "net" => {
            let v = value.unwrap_or_default();
            let mode = v.split([':', ',']).next().unwrap_or_default();
            if matches!(mode, "host" | "none" | "container" | "ns") {
                forbidden("the shield filters the container's own network namespace; use the default (slirp4netns or pasta)")
            } else {
                Ok(())
            }
        }
        "pod" => forbidden("a pod's network namespace belongs to its infra container, outside the shield's control"),
        "userns" if value == Some("host") => {
            forbidden("rootless containers need their own user namespace for the shield's hook")
        }
        "security-opt" if value.is_some_and(|v| v.contains("unmask")) => {
            forbidden("unmasking /proc or /sys paths can expose the host's network configuration")
        }
        "url" | "connection" | "remote" | "identity" | "ssh" => {
            forbidden("a remote podman service would run the container where the shield's hooks are not installed")
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn splits_flags_image_and_command() {
        let r = check_run_args(&args(
            "-it --rm -e A=1 -v /x:/y --memory=1g alpine:latest sh -c true",
        ))
        .unwrap();
        assert_eq!(r.flags, args("-it --rm -e A=1 -v /x:/y --memory=1g"));
        assert_eq!(r.image, "alpine:latest");
        assert_eq!(r.command, args("sh -c true"));
        let r = check_run_args(&args("alpine --privileged")).unwrap();
        assert_eq!(
            r.command,
            args("--privileged"),
            "flags after the image belong to the command"
        );
        let r = check_run_args(&args("-p8080:80 -- img")).unwrap();
        assert_eq!(r.image, "img");
        let r = check_run_args(&args(
            "--rm=false --network slirp4netns:enable_ipv6=true img",
        ))
        .unwrap();
        assert_eq!(r.image, "img");
    }

    #[test]
    fn refuses_what_would_weaken_the_shield() {
        for bad in [
            "--name x img",
            "--hooks-dir /tmp img",
            "--annotation terok.shield.name=x img",
            "--privileged img",
            "-it --privileged img",
            "--cap-add NET_ADMIN img",
            "--cap-add=chown,cap_net_raw img",
            "--cap-add all img",
            "--network host img",
            "--net=container:abc img",
            "--network=ns:/proc/1/ns/net img",
            "--network none img",
            "--pod mypod img",
            "--dns 198.51.100.53 img",
            "--userns host img",
            "--remote img",
        ] {
            assert!(check_run_args(&args(bad)).is_err(), "accepted {bad}");
        }
    }

    #[test]
    fn refuses_unknown_flags_and_missing_parts() {
        assert!(matches!(
            check_run_args(&args("--frobnicate img")),
            Err(PodmanArgsError::Unknown(_))
        ));
        assert!(matches!(
            check_run_args(&args("-Z img")),
            Err(PodmanArgsError::Unknown(_))
        ));
        assert!(matches!(
            check_run_args(&args("--rm")),
            Err(PodmanArgsError::NoImage)
        ));
        assert!(matches!(
            check_run_args(&args("-e")),
            Err(PodmanArgsError::MissingValue(_))
        ));
        assert!(check_run_args(&args("--privileged=false img")).is_ok());
        assert!(check_run_args(&args("--cap-add CHOWN --network pasta img")).is_ok());
    }

    #[test]
    fn published_container_ports_are_collected() {
        let r = check_run_args(&args(
            "-p 8080:80 --publish=127.0.0.1:5353:53/udp -p [::1]:9000:9000/tcp -p 7000-7002 -d img",
        ))
        .unwrap();
        let got: Vec<String> = r.published.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            got,
            ["53/udp", "80/tcp", "7000/tcp", "7001/tcp", "7002/tcp", "9000/tcp"]
        );
        assert_eq!(r.image, "img");
        // The flags still go to podman untouched.
        assert!(r.flags.contains(&"8080:80".to_string()));
    }

    #[test]
    fn bad_or_unseeable_publishing_is_refused() {
        for bad in [
            "-p 0 img",
            "-p 80/sctp img",
            "-p 70000 img",
            "-p 9-1 img",
            "-p 1-2000 img",
            "-p 127.0.0.1:80: img",
            "-p [::1] img",
        ] {
            assert!(
                matches!(
                    check_run_args(&args(bad)),
                    Err(PodmanArgsError::BadPublish(_))
                ),
                "{bad}"
            );
        }
        for all in ["-P img", "--publish-all img", "-dP img"] {
            assert!(
                matches!(
                    check_run_args(&args(all)),
                    Err(PodmanArgsError::Managed { .. })
                ),
                "{all}"
            );
        }
    }
}
