//! Annotation-only shielding driven exactly as CRI-O drives it, without CRI-O (not packaged
//! here): plain `runc` with OCI bundles whose config.json carries what CRI-O writes into it
//! for a pod, the pod's annotations and CRI-O's own, the `hooks` section CRI-O injects from
//! the hooks.d descriptors (createRuntime and poststop calling `terok-shield hook`), and a
//! network namespace path in `linux.namespaces`, as CRI-O gives every container of a pod
//! the namespace CNI set up. Here that namespace is a test bed's container netns, wired to
//! its fake world, so real packets show what is allowed and what is refused.
//!
//! Needs root, runc and busybox-static; without them the tests print a skip line, except
//! under `CI=true`, where they fail.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::bed::Bed;
use common::netns::Netns;
use common::world;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_terok-shield");
const BUSYBOX: &str = "/bin/busybox";
/// The profile the node offers (its ConfigMap, in a real cluster).
const PROFILE: &str = "198.51.100.10\n2001:db8::10\n198.18.2.10:443/tcp\n";

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Root, ip and nft (the bed), plus runc and a static busybox for the root filesystem.
fn ready() -> bool {
    if !common::require_privileges() {
        return false;
    }
    let runc = Command::new("runc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let busybox = Path::new(BUSYBOX).is_file();
    if runc && busybox {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CRI-O runc tests cannot run in CI: need runc and busybox-static"
    );
    eprintln!("SKIP CRI-O runc tests: need runc and busybox-static");
    false
}

/// One node's worth of files: the hook's config dir (config.yml, profiles/), its run dir,
/// runc's state root, and the OCI bundles. Removed on drop.
struct Node {
    root: PathBuf,
}

impl Node {
    fn new(tag: &str) -> Node {
        let root = std::env::temp_dir().join(format!("ts-crio-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("etc/profiles")).unwrap();
        std::fs::write(root.join("etc/profiles/web.txt"), PROFILE).unwrap();
        std::fs::write(root.join("etc/config.yml"), "audit:\n  enabled: true\n").unwrap();
        Node { root }
    }

    fn config_dir(&self) -> PathBuf {
        self.root.join("etc")
    }

    fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    fn runc_root(&self) -> PathBuf {
        self.root.join("runc")
    }

    /// The state directory of pod name `name`.
    fn state(&self, name: &str) -> PathBuf {
        self.run_dir().join("containers").join(name)
    }

    /// The `env` a node's hooks.d descriptor sets (CRI-O passes the descriptor's, and only it).
    fn hook_env(&self) -> Vec<String> {
        vec![
            format!("TEROK_SHIELD_CONFIG_DIR={}", self.config_dir().display()),
            format!("TEROK_SHIELD_RUN_DIR={}", self.run_dir().display()),
            "TEROK_SHIELD_ANNOTATIONS_ONLY=1".into(),
        ]
    }

    /// Write an OCI bundle as CRI-O would and `runc create` it. The container is deleted
    /// (`runc delete --force`, which runs poststop) when the handle drops.
    fn create(&self, spec: &Spec) -> Result<Container, String> {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("tscrio{}x{n}", std::process::id());
        let bundle = self.root.join(format!("bundle-{n}"));
        make_rootfs(&bundle.join("rootfs"));
        std::fs::write(
            bundle.join("resolv.conf"),
            format!(
                "search default.svc.cluster.local\nnameserver {}\n",
                world::DNS4
            ),
        )
        .unwrap();
        let config = config_json(&id, &bundle, spec, &self.hook_env());
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&config).unwrap(),
        )
        .unwrap();
        let container = Container {
            id,
            bundle,
            runc_root: self.runc_root(),
        };
        container.runc(&[
            "create",
            "--bundle",
            &container.bundle.display().to_string(),
            &container.id,
        ])?;
        Ok(container)
    }

    /// A live command run as root against the run dir, as the docs say (`--state-dir`).
    fn shield(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .arg("--state-dir")
            .arg(self.run_dir())
            .args(args)
            .env("TEROK_SHIELD_CONFIG_DIR", self.config_dir())
            .env("HOME", &self.root)
            .output()
            .unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// What a pod's container looks like to the runtime.
struct Spec {
    netns: PathBuf,
    /// The pod's annotations (CRI-O copies them into each container's config).
    pod: BTreeMap<String, String>,
    /// `sandbox` (the infra container) or `container`.
    kind: &'static str,
    args: Vec<&'static str>,
    /// Capabilities granted on top of CRI-O's default set.
    extra_caps: Vec<&'static str>,
}

impl Spec {
    fn pod(netns: PathBuf, pod: &[(&str, &str)], kind: &'static str) -> Spec {
        Spec {
            netns,
            pod: pod
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            kind,
            args: vec!["sleep", "600"],
            extra_caps: Vec::new(),
        }
    }
}

/// A runc container, force-deleted (poststop runs) and its bundle removed on drop.
struct Container {
    id: String,
    bundle: PathBuf,
    runc_root: PathBuf,
}

impl Container {
    /// Run `runc --root ROOT args...` with a deadline; Err(stderr) unless it exits 0.
    fn runc(&self, args: &[&str]) -> Result<String, String> {
        let log = self.bundle.join("runc.stderr");
        let mut child = Command::new("runc")
            .arg("--root")
            .arg(&self.runc_root)
            .args(args)
            // The container's init inherits these: nothing may wait for their end.
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .map_err(|e| format!("runc: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("runc {args:?} did not finish within 60 s"));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let stderr = std::fs::read_to_string(&log).unwrap_or_default();
        if status.success() {
            Ok(stderr)
        } else {
            Err(stderr)
        }
    }

    fn start(&self) {
        self.runc(&["start", &self.id])
            .unwrap_or_else(|e| panic!("runc start {}: {e}", self.id));
    }

    /// `runc exec ID CMD...` in the running container; (success, stdout + stderr).
    fn exec(&self, cmd: &[&str]) -> (bool, String) {
        let out = Command::new("runc")
            .arg("--root")
            .arg(&self.runc_root)
            .args(["exec", &self.id])
            .args(cmd)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// Stop and delete it as CRI-O does when a container ends: kill, wait, delete (poststop).
    fn stop_and_delete(&self) {
        if self.state_text().contains("\"created\"") {
            // Never started: CRI-O removes such a container with a forced delete.
            self.runc(&["delete", "--force", &self.id])
                .unwrap_or_else(|e| panic!("runc delete --force {}: {e}", self.id));
            return;
        }
        let _ = self.runc(&["kill", &self.id, "KILL"]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.state_text().contains("\"running\"") || self.state_text().contains("\"created\"")
        {
            assert!(Instant::now() < deadline, "{} did not stop", self.id);
            std::thread::sleep(Duration::from_millis(10));
        }
        self.runc(&["delete", &self.id])
            .unwrap_or_else(|e| panic!("runc delete {}: {e}", self.id));
    }

    fn state_text(&self) -> String {
        let out = Command::new("runc")
            .arg("--root")
            .arg(&self.runc_root)
            .args(["state", &self.id])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.runc(&["delete", "--force", &self.id]);
        let _ = std::fs::remove_dir_all(&self.bundle);
    }
}

/// A read-only busybox root: the applets the tests run, and the mount points CRI-O fills.
fn make_rootfs(rootfs: &Path) {
    for dir in ["bin", "proc", "dev", "etc", "tmp", "sys"] {
        std::fs::create_dir_all(rootfs.join(dir)).unwrap();
    }
    std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).unwrap();
    for applet in ["sh", "sleep", "nc", "cat"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    std::fs::write(rootfs.join("etc/resolv.conf"), "").unwrap();
}

/// config.json as CRI-O writes it for one container of a pod: the pod's annotations plus
/// CRI-O's own, its default capability set (no NET_ADMIN, no NET_RAW), the pod's network
/// namespace by path, resolv.conf bind-mounted from the pod's directory, and the hooks
/// it injects from the node's hooks.d descriptors.
fn config_json(id: &str, bundle: &Path, spec: &Spec, hook_env: &[String]) -> Value {
    let mut annotations = spec.pod.clone();
    for (k, v) in [
        ("io.kubernetes.cri-o.ContainerType", spec.kind),
        ("io.kubernetes.cri-o.SandboxID", id),
        ("io.kubernetes.pod.name", "web-0"),
        ("io.kubernetes.pod.namespace", "default"),
        (
            "io.kubernetes.container.name",
            if spec.kind == "sandbox" { "POD" } else { "app" },
        ),
    ] {
        annotations.insert(k.to_string(), v.to_string());
    }
    let caps = json!([
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_KILL"
    ]);
    let mut caps = caps;
    for extra in &spec.extra_caps {
        caps.as_array_mut().unwrap().push(json!(extra));
    }
    let hook = |stage: &str| {
        json!([{
            "path": BIN,
            "args": ["terok-shield", "hook", stage],
            "env": hook_env,
            "timeout": 30
        }])
    };
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": spec.args,
            "env": ["PATH=/bin"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "web-0",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]},
            {"destination": "/etc/resolv.conf", "type": "bind",
             "source": bundle.join("resolv.conf"), "options": ["rbind", "ro", "nosuid", "nodev"]}
        ],
        "annotations": annotations,
        "hooks": {"createRuntime": hook("createRuntime"), "poststop": hook("poststop")},
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "network", "path": spec.netns}
            ],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

fn has_table(bed: &Bed) -> bool {
    bed.nft_cli(&["list", "tables"])
        .unwrap()
        .contains("inet terok_shield")
}

/// A pod with the shield's annotations: its infra container shields the namespace, a second
/// container joins, real packets are allowed or refused at once, live commands work as root
/// against the run dir, and stopping the member leaves the shield while stopping the infra
/// container takes it down.
#[test]
fn a_pod_is_shielded_from_its_annotations_alone() {
    if !ready() {
        return;
    }
    let bed = Bed::new();
    let node = Node::new("pod");
    let pod = [
        ("terok.shield.name", "web"),
        ("terok.shield.profiles", "web"),
    ];
    let sandbox = node
        .create(&Spec::pod(bed.container_path(), &pod, "sandbox"))
        .unwrap_or_else(|e| panic!("the infra container was refused: {e}"));
    sandbox.start();
    assert!(has_table(&bed), "no shield in the pod's namespace");

    // The bundle the hook built: the node's profile, owned by the infra container.
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(node.state("web").join("state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["instance"], sandbox.id.as_str());
    assert_eq!(state["profiles"], json!(["web"]));
    assert_eq!(state["dns_tier"], "builtin");
    let resolv = std::fs::read_to_string(sandbox.bundle.join("resolv.conf")).unwrap();
    assert!(
        resolv.contains("nameserver 127.0.0.1") && !resolv.contains(world::DNS4),
        "resolv.conf not pointed at the resolver: {resolv}"
    );

    bed.expect_tcp_ok(world::PUB_A, 80);
    bed.expect_tcp_ok(world::PUB6_A, 443);
    bed.expect_tcp_ok(world::SCOPED, 443);
    bed.expect_tcp_refused(world::SCOPED, 80);
    bed.expect_tcp_refused(world::PUB_B, 80);
    bed.expect_tcp_refused(world::PUB6_B, 80);
    bed.expect_udp_refused(world::PUB_B, 53);
    bed.expect_tcp_refused(world::PRIV_192, 80);

    // The application container of the same pod joins the shield.
    let app = node
        .create(&Spec::pod(bed.container_path(), &pod, "container"))
        .unwrap_or_else(|e| panic!("the app container was refused: {e}"));
    app.start();
    let audit = std::fs::read_to_string(node.state("web").join("audit.jsonl")).unwrap();
    assert!(
        audit.contains(&format!("\"joined\":\"{}\"", sandbox.id)),
        "{audit}"
    );
    let resolv = std::fs::read_to_string(app.bundle.join("resolv.conf")).unwrap();
    assert!(
        resolv.contains("nameserver 127.0.0.1"),
        "the member's own resolv.conf was not pointed at the pod's resolver: {resolv}"
    );
    // A further container of the pod holding CAP_NET_ADMIN could undo the pod's firewall:
    // refused, although the namespace is shielded already.
    let mut privileged = Spec::pod(bed.container_path(), &pod, "container");
    privileged.extra_caps = vec!["CAP_NET_ADMIN"];
    match node.create(&privileged) {
        Ok(_) => panic!("a pod member holding CAP_NET_ADMIN joined the shield"),
        Err(e) => assert!(e.contains("CAP_NET_ADMIN"), "{e}"),
    }
    assert!(
        has_table(&bed),
        "the refused member took the pod's shield down"
    );

    // The workload itself, inside the container: allowed reached, others refused (a reset:
    // "Connection refused", never a timeout).
    // (busybox nc: a static glibc wget crashes in a root without NSS files.)
    let (ok, out) = app.exec(&["nc", "-w", "5", world::PUB_A, "80"]);
    assert!(ok && out.contains("X-Served-By: 198.51.100.10 80"), "{out}");
    let (ok, out) = app.exec(&["nc", "-w", "5", world::PUB_B, "80"]);
    assert!(!ok && out.contains("Connection refused"), "{out}");

    // Live commands, as root, find the pod under the run dir by its shield name.
    let out = node.shield(&["allow", "web", world::PUB_B]);
    assert!(
        out.status.success(),
        "allow: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bed.expect_tcp_ok(world::PUB_B, 80);
    // The live allow is part of the pod's effective allowlist, as exported.
    let out = node.shield(&["export", "web", "--format", "cilium"]);
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && yaml.contains("198.51.100.20/32")
            && yaml.contains("198.51.100.10/32"),
        "export: {yaml} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = node.shield(&["status", "web"]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("up"),
        "status: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The member stops: the shield, its resolver and the runtime record stay.
    app.stop_and_delete();
    let runtime: Value = serde_json::from_str(
        &std::fs::read_to_string(node.state("web").join("runtime.json"))
            .expect("a member's poststop removed the pod's runtime record"),
    )
    .unwrap();
    let resolver = runtime["resolver"][0].as_u64().unwrap();
    assert!(Path::new(&format!("/proc/{resolver}")).exists());
    bed.expect_tcp_ok(world::PUB_A, 80);
    bed.expect_tcp_refused(world::FAR, 80);

    // The infra container stops: the owner's poststop ends the resolver.
    sandbox.stop_and_delete();
    assert!(!node.state("web").join("runtime.json").exists());
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{resolver}/stat")).exists()
        && !std::fs::read_to_string(format!("/proc/{resolver}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
    {
        assert!(Instant::now() < deadline, "the resolver outlived its pod");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every hostile or broken annotation refuses the container before anything is applied,
/// and says which annotation is wrong.
#[test]
fn bad_annotations_refuse_the_container() {
    if !ready() {
        return;
    }
    let bed = Bed::new();
    let node = Node::new("bad");
    let cases: [(&[(&str, &str)], &str); 7] = [
        (
            &[
                ("terok.shield.name", "web"),
                ("terok.shield.profiles", "../../etc/passwd"),
            ],
            "terok.shield.profiles",
        ),
        (
            &[("terok.shield.name", "web"), ("terok.shield.profiles", "")],
            "terok.shield.profiles",
        ),
        (
            &[
                ("terok.shield.name", "web"),
                ("terok.shield.profiles", "nosuch"),
            ],
            "nosuch",
        ),
        (
            &[
                ("terok.shield.name", "web"),
                ("terok.shield.profiles", "web"),
                ("terok.shield.mode", "open"),
            ],
            "terok.shield.mode",
        ),
        (
            &[
                ("terok.shield.name", "web"),
                ("terok.shield.profiles", "web"),
                ("terok.shield.dns_tier", "none"),
            ],
            "terok.shield.dns_tier",
        ),
        (
            &[
                ("terok.shield.name", "../x"),
                ("terok.shield.profiles", "web"),
            ],
            "terok.shield.name",
        ),
        // A pod may not point the root hook at a directory of its choosing.
        (
            &[
                ("terok.shield.name", "web"),
                ("terok.shield.profiles", "web"),
                ("terok.shield.state_dir", "/root"),
            ],
            "terok.shield.state_dir",
        ),
    ];
    for (pod, expect) in cases {
        let refused = node.create(&Spec::pod(bed.container_path(), pod, "sandbox"));
        let Err(err) = refused else {
            panic!("a container with {pod:?} started");
        };
        assert!(
            err.contains(expect),
            "{pod:?}: expected {expect:?} in {err}"
        );
        assert!(!has_table(&bed), "{pod:?} left a table behind");
    }
    assert!(
        !node.state("x").exists() && !node.root.join("x").exists(),
        "a hostile name made a directory"
    );
}

/// Two pods on one node with the same shield name: the second is refused while the first
/// runs (their state would collide), and starts once the first is gone.
#[test]
fn a_second_pod_cannot_take_a_running_pods_name() {
    if !ready() {
        return;
    }
    let bed = Bed::new();
    let other = Netns::create(format!("tsc-{}-{}", std::process::id(), 900));
    let node = Node::new("clash");
    let pod = [
        ("terok.shield.name", "web"),
        ("terok.shield.profiles", "web"),
    ];
    let first = node
        .create(&Spec::pod(bed.container_path(), &pod, "sandbox"))
        .unwrap();
    first.start();
    let err = node
        .create(&Spec::pod(other.path(), &pod, "sandbox"))
        .err()
        .expect("a second pod took a running pod's shield name");
    assert!(err.contains("already used"), "{err}");
    let tables = Command::new("ip")
        .args(["netns", "exec", other.name(), "nft", "list", "tables"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&tables.stdout).contains("terok_shield"));
    first.stop_and_delete();
    let second = node
        .create(&Spec::pod(other.path(), &pod, "sandbox"))
        .unwrap_or_else(|e| panic!("refused after the first pod ended: {e}"));
    second.stop_and_delete();
}
