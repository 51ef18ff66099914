//! The hook against a network namespace connected by pasta the way Podman 5 connects a
//! rootless container (`pasta --config-net`, DNS forwarded at 169.254.1.1). Podman 4.3 here
//! cannot drive pasta, so the test starts pasta itself on a namespace of its own, writes the
//! resolv.conf Podman 5 writes (`nameserver 169.254.1.1`), and runs `hook createRuntime` on
//! it as a runtime would.
//!
//! pasta turns the namespace's connections into sockets of the host, like slirp4netns, so
//! the fake internet of the e2e suites serves it (`tests/common/e2e/world.rs`: routes for the fake
//! prefixes into a world namespace). pasta's DNS upstream is the world's DNS server
//! (pasta reads it from an /etc/resolv.conf bind-mounted for it alone), never the machine's
//! resolver.
//!
//! Needs root and `pasta` (Debian package `passt`); without them the tests print a skip
//! line, except under `CI=true`, where they fail.

#[macro_use]
mod common;
use common::e2e;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e::world::{ALLOWED4, BLOCKED4, DNS4, NAMED4};
use e2e::WorldOnly;

#[path = "common/hook.rs"]
mod hook_bed;

use hook_bed::{prepare_as_nobody, run_hook, Prepared};

/// Where Podman 5 points a pasta container's DNS: pasta forwards it to its upstream.
const DNS_FORWARD: &str = "169.254.1.1";
/// Podman 5's host address (`host.containers.internal`) under pasta: link-local, private.
const HOST_LINK_LOCAL: &str = "169.254.1.2";
/// The namespace's address and gateway (inside the fake internet, never the machine's).
const NS_ADDR: &str = "198.18.210.2";
const NS_GATEWAY: &str = "198.18.210.1";

fn pasta_binary() -> Option<PathBuf> {
    ["/usr/bin/pasta", "/usr/local/bin/pasta", "/bin/pasta"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

fn privileged() -> bool {
    let root = rustix::process::geteuid().is_root();
    let ok = root && pasta_binary().is_some();
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "pasta tests need root and pasta (apt-get install passt) in CI"
        );
        eprintln!("SKIP pasta tests: need root and pasta (apt-get install passt)");
    }
    ok
}

/// A network namespace with a process in it (the stand-in container) and pasta connecting
/// it; everything is killed, reaped and removed on drop.
struct PastaNs {
    name: String,
    holder: Child,
    pasta: Child,
}

impl PastaNs {
    fn start(tag: &str) -> PastaNs {
        let name = format!("tsp-{}-{tag}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        assert!(Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success());
        let holder = Command::new("ip")
            .args(["netns", "exec", &name, "sleep", "300"])
            .spawn()
            .expect("start the namespace's process");
        // pasta forwards DNS to the first nameserver of the /etc/resolv.conf it sees (this
        // passt, 2023-03, sends to 0.0.0.0 when given `--dns` instead): it runs in a mount
        // namespace where that file names the world's DNS server, never the machine's.
        let resolv = std::env::temp_dir().join(format!("{name}.resolv.conf"));
        std::fs::write(&resolv, format!("nameserver {DNS4}\n")).unwrap();
        // pasta drops to `nobody` by default, which cannot enter root's namespace; Podman 5
        // runs it as the (rootless) user who owns the namespace, here root.
        let pasta = Command::new("unshare")
            .args(["-m", "--", "sh", "-c"])
            .arg("mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"")
            .arg(&resolv)
            .arg(pasta_binary().unwrap())
            .args([
                "--runas",
                "0:0",
                "-f",
                "--config-net",
                "-4",
                "-a",
                NS_ADDR,
                "-n",
                "24",
                "-g",
                NS_GATEWAY,
                "--dns-forward",
                DNS_FORWARD,
                // As Podman 5 runs it: no port forwarding either way (with pasta's default
                // `-T auto -U auto`, ports bound on the host would appear on the container's
                // own loopback, which the shield always accepts), and the gateway is not
                // mapped to the host.
                "-t",
                "none",
                "-u",
                "none",
                "-T",
                "none",
                "-U",
                "none",
                "--no-map-gw",
                "--netns",
                &name,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pasta");
        let ns = PastaNs {
            name,
            holder,
            pasta,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ns.sh("ip -4 route").contains("default via") {
            assert!(
                Instant::now() < deadline,
                "pasta did not configure the namespace"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        ns
    }

    /// The stand-in container's PID (in the namespace).
    fn pid(&self) -> u32 {
        self.holder.id()
    }

    /// Run a shell line in the namespace (as the workload would: no mark, no capabilities
    /// used); stdout and stderr together.
    fn sh(&self, line: &str) -> String {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &self.name, "timeout", "5", "sh", "-c", line,
            ])
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// `busybox nc HOST PORT` from inside: what it printed.
    fn connect(&self, host: &str, port: u16) -> String {
        self.sh(&format!("busybox nc -w 3 {host} {port} </dev/null 2>&1"))
    }

    /// `busybox nslookup NAME SERVER` from inside.
    fn lookup(&self, name: &str, server: &str) -> String {
        self.sh(&format!("busybox nslookup {name} {server} 2>&1"))
    }
}

impl Drop for PastaNs {
    fn drop(&mut self) {
        for child in [&mut self.pasta, &mut self.holder] {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A prepared bundle (as `nobody`, with its own HOME and state, so nothing system-wide is
/// installed) and an OCI bundle whose resolv.conf says what Podman 5 writes under pasta.
struct PastaBundle {
    prepared: Prepared,
    oci: PathBuf,
}

fn prepare(tag: &str, config: &str, profile: &str) -> PastaBundle {
    let prepared = prepare_as_nobody("pasta", tag, config, profile);
    let oci = prepared.root.join("oci");
    std::fs::create_dir_all(&oci).unwrap();
    let resolv = prepared.root.join("resolv.conf");
    std::fs::write(&resolv, format!("nameserver {DNS_FORWARD}\n")).unwrap();
    let caps = [
        "CAP_CHOWN",
        "CAP_KILL",
        "CAP_NET_BIND_SERVICE",
        "CAP_SETUID",
    ];
    let config = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"args": ["sleep"], "capabilities": {"bounding": caps, "effective": caps}},
        "mounts": [{"destination": "/etc/resolv.conf", "type": "bind", "source": resolv}],
    });
    std::fs::write(oci.join("config.json"), config.to_string()).unwrap();
    PastaBundle { prepared, oci }
}

impl PastaBundle {
    /// `hook createRuntime` on the container process `pid`; (success, stderr).
    fn create_runtime(&self, pid: u32) -> (bool, String) {
        let p = &self.prepared;
        let (ok, err, _) = run_hook("createRuntime", &p.state(&p.instance, Some(pid), &self.oci));
        (ok, err)
    }

    /// What the hook rewrote the container's resolv.conf to.
    fn resolv_conf(&self) -> String {
        std::fs::read_to_string(self.prepared.root.join("resolv.conf")).unwrap()
    }
}

fn assert_reached(ns: &PastaNs, host: &str, port: u16) {
    let out = ns.connect(host, port);
    assert!(
        out.contains(&format!("terok-e2e-world {host} {port}")),
        "{host}:{port} not reached through pasta: {out}"
    );
}

#[track_caller]
fn assert_refused(ns: &PastaNs, world: &e2e::world::World, host: &str, port: u16) {
    let mark = world.mark();
    let out = ns.connect(host, port);
    assert!(
        out.contains("refused"),
        "{host}:{port}: expected the shield's refusal, got: {out}"
    );
    assert!(
        !world.saw_since(mark, host, port),
        "{host}:{port} was refused, yet the world saw the connection"
    );
}

/// One tier under pasta: the shield's resolver (or dnsmasq) asks pasta's DNS forwarder at
/// 169.254.1.1, which asks the world; the workload resolves allowlisted names only through
/// it and reaches what they name, while 169.254.1.1 and the host's link-local address stay
/// closed to it.
fn resolver_tier_works_under_pasta(tier: &str) {
    if !privileged() {
        return;
    }
    let w = WorldOnly::up();
    let ns = PastaNs::start(tier);
    // Control: pasta itself carries the namespace's traffic to the world and its DNS.
    assert_reached(&ns, ALLOWED4, 80);
    assert!(ns.lookup("svc.e2e.test", DNS_FORWARD).contains(NAMED4));
    let p = prepare(
        tier,
        &format!("dns:\n  tier: {tier}\n"),
        &format!("{ALLOWED4}\nsvc.e2e.test\n"),
    );
    let (ok, err) = p.create_runtime(ns.pid());
    assert!(ok, "the hook refused the pasta namespace: {err}");
    assert!(
        p.resolv_conf().contains("nameserver 127.0.0.1"),
        "{}",
        p.resolv_conf()
    );
    let asked = w.world.dns_queries().len();
    let answer = ns.lookup("svc.e2e.test", "127.0.0.1");
    assert!(
        answer.contains(NAMED4),
        "{tier}: the allowlisted name did not resolve through 169.254.1.1: {answer}"
    );
    assert!(
        w.world.dns_queries().len() > asked,
        "{tier}: the answer did not come from the world through pasta"
    );
    assert_reached(&ns, NAMED4, 80);
    assert_reached(&ns, ALLOWED4, 80);
    assert_refused(&ns, &w.world, BLOCKED4, 80);
    let direct = ns.lookup("svc.e2e.test", DNS_FORWARD);
    assert!(
        !direct.contains(NAMED4),
        "{tier}: the workload asked pasta's forwarder directly: {direct}"
    );
    assert_refused(&ns, &w.world, DNS_FORWARD, 53);
    assert_refused(&ns, &w.world, HOST_LINK_LOCAL, 80);
}

#[test]
fn builtin_resolver_uses_pastas_dns_forwarder() {
    resolver_tier_works_under_pasta("builtin");
}

#[test]
fn dnsmasq_uses_pastas_dns_forwarder() {
    resolver_tier_works_under_pasta("dnsmasq");
}

/// The static tier: names resolved before start (from `upstream_dns`), and the container's
/// resolv.conf left as Podman 5 wrote it, so the workload may ask 169.254.1.1 directly (the
/// tier's DNS servers are open) but reaches nothing else link-local.
#[test]
fn static_tier_permits_pastas_dns_forwarder_only() {
    if !privileged() {
        return;
    }
    let w = WorldOnly::up();
    let ns = PastaNs::start("static");
    let p = prepare(
        "static",
        &format!("upstream_dns: {DNS4}\ndns:\n  tier: static\n"),
        &format!("{ALLOWED4}\nsvc.e2e.test\n"),
    );
    let (ok, err) = p.create_runtime(ns.pid());
    assert!(ok, "the hook refused the pasta namespace: {err}");
    assert_eq!(p.resolv_conf(), format!("nameserver {DNS_FORWARD}\n"));
    assert!(ns.lookup("svc.e2e.test", DNS_FORWARD).contains(NAMED4));
    assert_reached(&ns, NAMED4, 80);
    assert_refused(&ns, &w.world, BLOCKED4, 80);
    assert_refused(&ns, &w.world, DNS_FORWARD, 80);
    assert_refused(&ns, &w.world, HOST_LINK_LOCAL, 80);
}
