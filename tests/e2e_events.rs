//! End-to-end: what the shield refuses shows up in the container's audit log, rootless, in
//! every DNS tier: refused TCP connects and UDP datagrams (read from NFLOG inside the
//! container's network namespace) with the name that led to the address when the shield
//! knows it, and DNS questions the builtin resolver refused. Needs root and
//! scripts/podman-env.sh (see docs/testing-e2e.md).

#[macro_use]
mod common;
use common::e2e;

use std::net::UdpSocket;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use serde_json::Value;

use e2e::world::*;
use e2e::{dns_config, is_blocked, pid_of, udp_from_container, E2e};

/// The first audit record of `name` matching `pred`, waiting (bounded) for the reader.
#[track_caller]
fn wait_record(h: &E2e, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records = h.audit(name);
        if let Some(r) = records.iter().find(|r| pred(r)) {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no audit record for {what} within 10 s; records: {records:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn builtin_tier_logs_refused_tcp_udp_and_dns_with_names() {
    let mut h = e2e!();
    h.set_config(&dns_config("builtin", ""));
    // Port-scoped: the name's address opens on 443/tcp only, so port 80 is refused.
    h.profile("e2e-events", "svc.e2e.test:443/tcp\n");
    let name = h.name("events-builtin");
    h.run_detached(&name, "e2e-events").expect_ok();
    let out = h.exec(
        &name,
        &format!(
            "echo \"LEARNED: $(timeout 5 nslookup svc.e2e.test 2>&1 | grep -c {NAMED4})\"\n\
             o=$(timeout 5 nc {NAMED4} 80 </dev/null 2>&1); echo \"CONNECT80: rc=$? $o\"\n\
             echo \"REFUSED: $(timeout 5 nslookup pair.e2e.test 2>&1 | grep -c 198.51.100.7)\"\n"
        ),
    );
    assert!(out.stdout.contains("LEARNED: 1"), "{out}");
    assert!(out.stdout.contains("REFUSED: 0"), "{out}");
    assert!(
        udp_from_container(&h, &name, BLOCKED4, 9),
        "UDP to {BLOCKED4} was not refused"
    );

    let tcp = wait_record(&h, &name, "the refused TCP connect", |r| {
        is_blocked(r, NAMED4, "tcp", 80)
    });
    assert_eq!(tcp["detail"]["verdict"], "denied", "{tcp}");
    assert_eq!(
        tcp["detail"]["name"], "svc.e2e.test",
        "the name that led to the address: {tcp}"
    );
    assert_eq!(tcp["detail"]["first"], true, "{tcp}");
    let udp = wait_record(&h, &name, "the refused UDP datagram", |r| {
        is_blocked(r, BLOCKED4, "udp", 9)
    });
    assert_eq!(udp["detail"]["verdict"], "denied", "{udp}");
    assert!(
        udp["detail"].get("name").is_none(),
        "no name led there: {udp}"
    );
    let dns = wait_record(&h, &name, "the refused DNS question", |r| {
        r["event"] == "dns_refused" && r["detail"]["name"] == "pair.e2e.test"
    });
    assert!(
        ["A", "AAAA"].contains(&dns["detail"]["qtype"].as_str().unwrap_or("")),
        "{dns}"
    );
    assert_eq!(dns["detail"]["reason"], "not_allowlisted", "{dns}");
    assert!(
        !h.audit(&name)
            .iter()
            .any(|r| r["event"] == "dns_refused" && r["detail"]["name"] == "svc.e2e.test"),
        "an allowed name was logged as refused"
    );
    h.podman(&["rm", "-f", &name]).expect_ok();
}

#[test]
fn static_tier_reader_logs_refusals_and_its_death_shows_in_status() {
    let mut h = e2e!();
    h.set_config(&dns_config("static", ""));
    h.profile("e2e-events-static", "svc.e2e.test:443/tcp\n");
    let name = h.name("events-static");
    h.run_detached(&name, "e2e-events-static").expect_ok();
    assert_eq!(h.shield_state(&name), "up");
    let out = h.exec(
        &name,
        &format!("o=$(timeout 5 nc {NAMED4} 80 </dev/null 2>&1); echo \"CONNECT80: rc=$? $o\"\n"),
    );
    assert!(out.stdout.contains("CONNECT80: rc=1"), "{out}");
    let tcp = wait_record(&h, &name, "the refused TCP connect", |r| {
        is_blocked(r, NAMED4, "tcp", 80)
    });
    assert_eq!(
        tcp["detail"]["name"], "svc.e2e.test",
        "the static cache names the address: {tcp}"
    );

    // The reader is recorded like a resolver; its death is an error in `status`.
    let runtime: Value = serde_json::from_str(&h.read(&h.bundle_dir(&name).join("runtime.json")))
        .expect("runtime.json is JSON");
    let pid = runtime["resolver"][0]
        .as_i64()
        .expect("the reader's pid is recorded");
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(cmdline.contains("internal-events"), "{cmdline:?}");
    // SAFETY: signalling the one process this test's container started, by its id.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.shield_state(&name) != "error" {
        assert!(
            Instant::now() < deadline,
            "status never reported the dead reader"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = h.shield(&["status", &name]);
    assert!(status.stdout.contains("event reader"), "{status}");
    h.podman(&["rm", "-f", &name]).expect_ok();
}

#[test]
fn dnsmasq_tier_logs_refused_packets() {
    let mut h = e2e!();
    h.set_config(&dns_config("dnsmasq", ""));
    h.profile("e2e-events-dnsmasq", "svc.e2e.test\n");
    let name = h.name("events-dnsmasq");
    h.run_detached(&name, "e2e-events-dnsmasq").expect_ok();
    let out = h.exec(
        &name,
        &format!("o=$(timeout 5 nc {BLOCKED4} 443 </dev/null 2>&1); echo \"CONNECT: rc=$? $o\"\n"),
    );
    assert!(out.stdout.contains("CONNECT: rc=1"), "{out}");
    let tcp = wait_record(&h, &name, "the refused TCP connect", |r| {
        is_blocked(r, BLOCKED4, "tcp", 443)
    });
    assert_eq!(tcp["detail"]["verdict"], "denied", "{tcp}");
    assert_eq!(h.shield_state(&name), "up");
    h.podman(&["rm", "-f", &name]).expect_ok();
}

/// CPU time (user + system, clock ticks) a process has used.
fn cpu_ticks(pid: i64) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
}

#[test]
fn a_flood_neither_grows_the_log_nor_stalls_dns() {
    const FLOOD_MAX: u32 = 2_000_000;
    const FLOOD_FOR: Duration = Duration::from_secs(4);
    let mut h = e2e!();
    h.set_config(&dns_config("builtin", ""));
    h.profile("e2e-events-flood", "svc.e2e.test\n");
    let name = h.name("events-flood");
    h.run_detached(&name, "e2e-events-flood").expect_ok();
    let runtime: Value = serde_json::from_str(&h.read(&h.bundle_dir(&name).join("runtime.json")))
        .expect("runtime.json is JSON");
    let resolver = runtime["resolver"][0].as_i64().expect("resolver pid");
    let cpu_before = cpu_ticks(resolver);

    let pid = pid_of(&h, &name);
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
    let flood = std::thread::spawn(move || {
        rustix::thread::move_into_link_name_space(
            ns.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .expect("setns into the container's netns");
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        let t = Instant::now();
        // Long enough to overlap every DNS question below; bounded in time and count.
        let (mut sent, mut refused) = (0u32, 0u32);
        while sent < FLOOD_MAX && t.elapsed() < FLOOD_FOR {
            sent += 1;
            if sock.send_to(b"flood", (BLOCKED4, 9)).is_err() {
                refused += 1;
            }
        }
        (sent, refused, t.elapsed())
    });
    // Meanwhile the workload asks DNS: every answer must still come, and come soon.
    let out = h.exec(
        &name,
        &format!(
            "t() {{ read u _ </proc/uptime; echo ${{u/./}}; }}\n\
             for i in 1 2 3 4 5 6 7 8; do a=$(t); n=$(timeout 5 nslookup svc.e2e.test 2>&1 | grep -c {NAMED4}); b=$(t); echo \"DNS $n $((b-a))\"; done\n"
        ),
    );
    let (sent, refused, took) = flood.join().unwrap();
    assert_eq!(refused, sent, "every flood datagram is refused");
    let times: Vec<u32> = out
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("DNS "))
        .map(|l| {
            let (n, cs) = l.split_once(' ').unwrap();
            assert_eq!(
                n, "1",
                "an allowed name did not resolve during the flood: {out}"
            );
            cs.parse().unwrap()
        })
        .collect();
    assert_eq!(times.len(), 8, "{out}");
    assert!(
        times.iter().all(|cs| *cs < 200),
        "a DNS answer took 2 s or more during the flood (centiseconds: {times:?})"
    );

    let first = wait_record(&h, &name, "the flood's first event", |r| {
        is_blocked(r, BLOCKED4, "udp", 9)
    });
    assert_eq!(first["detail"]["first"], true, "{first}");
    std::thread::sleep(terok_shield::effects::events::INTERVAL + Duration::from_millis(1500));
    let records = h.audit(&name);
    let flood_lines: Vec<&Value> = records
        .iter()
        .filter(|r| is_blocked(r, BLOCKED4, "udp", 9))
        .collect();
    let counted: u64 = flood_lines
        .iter()
        .map(|r| r["detail"]["count"].as_u64().unwrap())
        .sum();
    let cpu = cpu_ticks(resolver).saturating_sub(cpu_before);
    eprintln!(
        "E2E FLOOD packets={sent} send_ms={} lines={} counted={counted} dns_cs={times:?} resolver_cpu_ticks={cpu}",
        took.as_millis(),
        flood_lines.len()
    );
    assert!(
        flood_lines.len() <= 10,
        "{} lines for one flooded destination",
        flood_lines.len()
    );
    assert!(counted <= u64::from(sent) && counted > 0);
    h.podman(&["rm", "-f", &name]).expect_ok();
}
