//! End-to-end: a shielded container stays shielded for its whole life, for a user who never
//! ran `setup` (containers.conf without `hooks_dir` at the start, as the harness leaves it):
//! stop + start, kill + start, `podman restart`, podman's restart policy, a deleted bundle, a
//! bundle of the previous format after an upgrade, a name reused while its container exists,
//! and what `status` says about each.
//!
//! Needs root and the environment of `scripts/podman-env.sh`; see docs/testing-e2e.md.

#[macro_use]
mod common;
use common::e2e;

use std::fs;
use std::time::{Duration, Instant};

use serde_json::Value;

use e2e::world::*;
use e2e::{parse_probes, probe_script, E2e, Probes, CREATE_RUNTIME_JSON, FAST_CS, IMAGE, RAN};

/// The shield is up and works: the allowlisted host answers, another is refused at once, and
/// the hook has applied the firewall `applies` times in the container's life.
#[track_caller]
fn assert_shielded(h: &E2e, name: &str, when: &str, applies: usize) {
    assert_eq!(h.shield_state(name), "up", "shield not up {when}");
    let applied = h.events(name, "apply");
    assert_eq!(applied.len(), applies, "apply events {when}: {applied:?}");
    let mark = h.world.mark();
    let out = h
        .exec(name, &probe_script(&[(BLOCKED4, 80), (ALLOWED4, 80)]))
        .expect_ok();
    let p = Probes::of(&out, &h.world, mark);
    p.refused_fast(BLOCKED4, 80);
    p.reached(ALLOWED4, 80);
}

/// `podman inspect --format FORMAT NAME`, trimmed.
fn inspect(h: &E2e, name: &str, format: &str) -> String {
    h.podman(&["inspect", "--format", format, name])
        .expect_ok()
        .stdout
        .trim()
        .to_string()
}

fn has_hooks_dir(h: &E2e) -> bool {
    fs::read_to_string(h.user.containers_conf())
        .unwrap_or_default()
        .contains(&h.user.user_hooks_dir().display().to_string())
}

#[test]
fn first_run_installs_the_hooks_and_every_restart_keeps_the_shield() {
    let mut h = e2e!();
    let hooks = h.user.user_hooks_dir();
    assert!(
        !has_hooks_dir(&h) && !hooks.exists(),
        "the test must start without hooks"
    );
    let name = h.name("lifecycle");

    let out = h.run_detached(&name, "e2e-basic").expect_ok();
    assert!(
        out.stderr
            .contains(&format!("installed the OCI hooks in {}", hooks.display()))
            && out.stderr.contains("setup --remove"),
        "`run` did not say in one line what it installed where and how to remove it: {out}"
    );
    assert_eq!(
        out.stderr
            .lines()
            .filter(|l| l.contains("installed the OCI hooks"))
            .count(),
        1,
        "{out}"
    );
    assert!(hooks.join(CREATE_RUNTIME_JSON).is_file());
    let conf = h.read(&h.user.containers_conf());
    assert!(
        has_hooks_dir(&h) && conf.contains("runtime = \"runc\""),
        "hooks_dir not added, or the user's settings lost: {conf}"
    );
    assert_shielded(&h, &name, "after run", 1);

    // Installed once: a second preparation says nothing and passes no --hooks-dir.
    let other = h.name("lifecycle-other");
    let out = h
        .shield(&["prepare", &other, "--profiles", "e2e-basic", "--json"])
        .expect_ok();
    assert!(!out.stderr.contains("installed"), "{out}");
    assert!(!out.stdout.contains("--hooks-dir"), "{out}");

    h.podman(&["stop", "-t", "0", &name]).expect_ok();
    assert_eq!(h.shield_state(&name), "inactive", "after podman stop");
    h.podman(&["start", &name]).expect_ok();
    assert_shielded(&h, &name, "after stop + start", 2);

    h.podman(&["kill", &name]).expect_ok();
    h.podman(&["wait", &name]).expect_ok();
    h.podman(&["start", &name]).expect_ok();
    assert_shielded(&h, &name, "after kill + start", 3);

    h.podman(&["restart", "-t", "0", &name]).expect_ok();
    assert_shielded(&h, &name, "after podman restart", 4);
}

/// Podman restarts the workload by its restart policy when it exits: every run is shielded.
#[test]
fn restart_policy_brings_the_workload_back_shielded() {
    let mut h = e2e!();
    let name = h.name("restart-policy");
    let mark = h.world.mark();
    let script = format!(
        "{}exit 3\n",
        probe_script(&[(BLOCKED4, 80), (ALLOWED4, 80)])
    );
    h.run_with(
        &name,
        "e2e-basic",
        &["-d", "--restart=on-failure:2", IMAGE, "sh", "-c", &script],
    )
    .expect_ok();
    // Two restarts after the first run, then it stays exited (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let state = inspect(&h, &name, "{{.State.Status}} {{.RestartCount}}");
        if state == "exited 2" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restart policy did not run its course: {state}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let logs = h.podman(&["logs", &name]).expect_ok();
    assert_eq!(logs.stdout.matches(RAN).count(), 3, "three runs: {logs}");
    let probes = parse_probes(&logs.stdout);
    assert_eq!(probes.len(), 6, "{logs}");
    for p in &probes {
        if p.host == BLOCKED4 {
            assert!(
                p.rc != 0 && p.text.contains("refused") && p.cs <= FAST_CS,
                "a run after a restart was not shielded: {p:?}\n{logs}"
            );
        } else {
            assert_eq!(
                p.rc, 0,
                "the allowlisted host was not reached: {p:?}\n{logs}"
            );
        }
    }
    let hits = |host: &str| {
        let want = std::net::SocketAddr::new(host.parse().unwrap(), 80);
        h.world
            .hits()
            .iter()
            .skip(mark)
            .filter(|hit| hit.local == want)
            .count()
    };
    assert_eq!(hits(BLOCKED4), 0, "the blocked host was reached");
    assert_eq!(hits(ALLOWED4), 3, "the allowlisted host, once per run");
    assert_eq!(h.events(&name, "apply").len(), 3, "one apply per run");
}

/// The bundle directory of a stopped container is deleted: it must not start again, and the
/// refusal is in podman's error and in the audit log of the name.
#[test]
fn start_after_the_bundle_was_deleted_is_refused_and_logged() {
    let mut h = e2e!();
    let name = h.name("no-bundle");
    h.run_detached(&name, "e2e-basic").expect_ok();
    h.podman(&["stop", "-t", "0", &name]).expect_ok();
    fs::remove_dir_all(h.bundle_dir(&name)).unwrap();

    let out = h.podman(&["start", &name]);
    assert!(!out.ok(), "a container without its bundle started: {out}");
    assert!(out.stderr.contains("no shield state"), "{out}");
    assert_ne!(h.container_state(&name).as_deref(), Some("running"));
    let failures = h.events(&name, "failure");
    let last = failures
        .last()
        .unwrap_or_else(|| panic!("no failure event for {name}"));
    assert_eq!(last["detail"]["stage"], "createRuntime", "{last}");
    assert!(
        last["detail"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("no shield state"),
        "{last}"
    );
    assert_eq!(h.shield_state(&name), "inactive");
}

/// A container prepared by the previous terok-shield (format-1 bundle, its version in the
/// annotation) starts shielded after the binary was upgraded, and again after a restart; the
/// first live change writes the bundle in the current format.
#[test]
fn a_container_of_the_previous_bundle_format_starts_shielded_after_an_upgrade() {
    let mut h = e2e!();
    let name = h.name("upgrade");
    assert_ne!(
        env!("CARGO_PKG_VERSION"),
        "0.1.0",
        "this test stands for an upgrade from 0.1.0"
    );
    let flags = h.prepare(&name, "e2e-basic");
    // What the previous version left: a format-1 state.json and its own version annotation.
    let path = h.bundle_dir(&name).join("state.json");
    let mut state: Value = serde_json::from_str(&h.read(&path)).unwrap();
    let fields = state.as_object_mut().unwrap();
    assert_eq!(fields["format"], 2);
    let written_by = fields.remove("written_by").unwrap();
    assert_eq!(written_by, env!("CARGO_PKG_VERSION"));
    fields.insert("shield_version".into(), "0.1.0".into());
    fields.insert("format".into(), 1.into());
    fs::write(&path, serde_json::to_vec_pretty(&state).unwrap()).unwrap();
    let version_flag = format!(
        "--annotation=terok.shield.version={}",
        env!("CARGO_PKG_VERSION")
    );
    assert!(flags.contains(&version_flag), "{flags:?}");
    let flags: Vec<String> = flags
        .into_iter()
        .map(|f| {
            if f == version_flag {
                "--annotation=terok.shield.version=0.1.0".to_string()
            } else {
                f
            }
        })
        .collect();
    h.podman_run_prepared(&flags, &["-d", IMAGE, "sleep", "600"])
        .expect_ok();
    assert_shielded(&h, &name, "on the first start", 1);
    let applied = h.events(&name, "apply");
    assert_eq!(applied[0]["detail"]["prepared_by"], "0.1.0", "{applied:?}");
    h.podman(&["restart", "-t", "0", &name]).expect_ok();
    assert_shielded(&h, &name, "after a restart", 2);
    assert_eq!(h.state_json(&name)["format"], 1, "reading must not rewrite");

    h.shield(&["allow", &name, BLOCKED4]).expect_ok();
    let now = h.state_json(&name);
    assert_eq!(now["format"], 2, "{now}");
    assert_eq!(now["written_by"], env!("CARGO_PKG_VERSION"), "{now}");
    assert_eq!(now["mode"], "deny_all", "{now}");
}

/// `run` again with the name of a container that still exists: refused before anything is
/// changed, and the old container keeps its shield.
#[test]
fn a_new_run_of_an_existing_containers_name_is_refused_and_the_old_one_stays_shielded() {
    let mut h = e2e!();
    let name = h.name("reuse-existing");
    h.run_detached(&name, "e2e-basic").expect_ok();
    h.podman(&["stop", "-t", "0", &name]).expect_ok();
    let before = h.read(&h.bundle_dir(&name).join("state.json"));

    let out = h.shield(&["run", &name, "--", "-d", IMAGE, "sleep", "600"]);
    assert!(!out.ok(), "{out}");
    assert!(
        out.stderr.contains("already exists") && out.stderr.contains("podman rm"),
        "{out}"
    );
    let out = h.shield(&["prepare", &name]);
    assert!(!out.ok() && out.stderr.contains("already exists"), "{out}");
    assert_eq!(
        h.read(&h.bundle_dir(&name).join("state.json")),
        before,
        "the old container's bundle changed"
    );
    h.podman(&["start", &name]).expect_ok();
    assert_shielded(&h, &name, "after the refused reuse", 2);
}

/// `status` says `inactive` (exit 0) for a container that is not shielded by design, and
/// `error` (exit 1) for one that should be shielded and is not: here, a shielded container
/// started again after its hooks were forcibly removed.
#[test]
fn status_tells_an_unshielded_container_from_a_shield_that_is_missing() {
    let mut h = e2e!();
    let plain = h.name("plain");
    h.podman(&["run", "-d", "--name", &plain, IMAGE, "sleep", "600"])
        .expect_ok();
    let out = h.shield(&["status", &plain]).expect_ok();
    assert!(
        out.stdout.contains("State:     inactive")
            && out.stdout.contains("not started by terok-shield"),
        "{out}"
    );
    let json: Value =
        serde_json::from_str(&h.shield(&["status", &plain, "--json"]).expect_ok().stdout).unwrap();
    assert_eq!(json["state"], "inactive", "{json}");
    assert_eq!(json["shield_state"], false, "{json}");

    let out = h.shield(&["status", "e2e-no-such-container"]);
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(out.stderr.contains("no podman container"), "{out}");

    let name = h.name("unhooked");
    h.run_detached(&name, "e2e-basic").expect_ok();
    let out = h.shield(&["setup", "--remove"]);
    assert!(
        !out.ok() && out.stderr.contains(&name) && out.stderr.contains("--force"),
        "setup --remove must refuse while shielded containers exist: {out}"
    );
    assert!(h.user.user_hooks_dir().join(CREATE_RUNTIME_JSON).is_file());
    let out = h.shield(&["setup", "--remove", "--force"]).expect_ok();
    assert!(out.stdout.contains("Removed"), "{out}");
    assert!(!has_hooks_dir(&h), "hooks_dir still lists our directory");
    assert!(!h.user.user_hooks_dir().join(CREATE_RUNTIME_JSON).exists());

    // Without hooks podman starts it unshielded: status must say so loudly.
    h.podman(&["restart", "-t", "0", &name]).expect_ok();
    let out = h.shield(&["status", &name]);
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(
        out.stdout.contains("State:     error") && out.stdout.contains("without its firewall"),
        "{out}"
    );
    let json: Value = serde_json::from_str(&h.shield(&["status", &name, "--json"]).stdout).unwrap();
    assert_eq!(json["state"], "error", "{json}");
}
