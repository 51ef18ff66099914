//! Packet events with real packets: the ruleset's NFLOG statements, read by the shield's
//! reader inside the container namespace, decoded into the right verdict, destination,
//! protocol and port; and a flood that must neither grow the audit log without bound nor
//! hide its first event.
//!
//! Same bed as tests/firewall_packets.rs: a container netns routed into a world netns.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use terok_shield::core::audit::rfc3339_utc;
use terok_shield::core::bundle::ContainerName;
use terok_shield::core::events::{Packet, Verdict};
use terok_shield::core::policy::Mode;
use terok_shield::core::ruleset::NFLOG_GROUP;
use terok_shield::effects::events::{EventReader, Settings, INTERVAL, MAX_KEYS};
use terok_shield::effects::nflog::NflogSocket;

use common::bed::{addr, Bed};
use common::netns::run_in;
use common::policies::*;
use common::world::*;

/// A reader bound to the shield's group in the container namespace.
fn reader(bed: &Bed) -> NflogSocket {
    run_in(&bed.container_path(), Duration::from_secs(10), || {
        NflogSocket::bind(NFLOG_GROUP)
    })
    .expect("netns thread")
    .expect("bind NFLOG group 100 in the container namespace")
}

/// Packets read until every one of `want` arrived (bounded wait); returns all read.
#[track_caller]
fn expect_packets(sock: &mut NflogSocket, want: &[Packet]) -> Vec<Packet> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    while !want.iter().all(|w| seen.contains(w)) && Instant::now() < deadline {
        let batch = sock.recv(Duration::from_millis(200)).expect("recv");
        seen.extend(batch.packets.into_iter().map(|(p, _)| p));
    }
    for w in want {
        assert!(seen.contains(w), "no event {w:?}; read {seen:?}");
    }
    seen
}

fn packet(verdict: Verdict, host: &str, proto: u8, port: u16) -> Packet {
    Packet {
        verdict,
        dst: addr(host),
        proto,
        port: Some(port),
    }
}

#[test]
fn refused_tcp_and_udp_become_events_with_verdict_destination_and_port() {
    let bed = bed!();
    bed.apply(&policy(Mode::DenyAll, &[PUB_A]));
    let mut sock = reader(&bed);
    bed.expect_tcp_refused(PUB_B, 443);
    bed.expect_udp_refused(PUB_B, 53);
    bed.expect_tcp_refused(PUB6_B, 22);
    bed.expect_udp_refused(PUB6_B, 8080);
    bed.expect_tcp_refused(PRIV_172, 80);
    bed.expect_udp_refused(ULA, 53);
    bed.expect_tcp_ok(PUB_A, 80);
    let seen = expect_packets(
        &mut sock,
        &[
            packet(Verdict::Denied, PUB_B, 6, 443),
            packet(Verdict::Denied, PUB_B, 17, 53),
            packet(Verdict::Denied, PUB6_B, 6, 22),
            packet(Verdict::Denied, PUB6_B, 17, 8080),
            packet(Verdict::Private, PRIV_172, 6, 80),
            packet(Verdict::Private, ULA, 17, 53),
        ],
    );
    assert!(
        !seen.iter().any(|p| p.dst == addr(PUB_A)),
        "allowed traffic is no event: {seen:?}"
    );
}

#[test]
fn block_mode_and_bypass_traffic_are_events_too() {
    let bed = bed!();
    bed.apply(&policy(Mode::Block, &[PUB_A]));
    let mut sock = reader(&bed);
    bed.expect_tcp_refused(PUB_A, 80);
    expect_packets(&mut sock, &[packet(Verdict::Blocked, PUB_A, 6, 80)]);
    // `down`: public traffic passes, and each new flow is an event.
    bed.apply(&policy(Mode::Bypass, &[]));
    bed.expect_tcp_ok(PUB_B, 443);
    bed.expect_udp_ok(PUB6_B, 53);
    bed.expect_tcp_refused(PRIV_192, 80);
    expect_packets(
        &mut sock,
        &[
            packet(Verdict::Bypass, PUB_B, 6, 443),
            packet(Verdict::Bypass, PUB6_B, 17, 53),
            packet(Verdict::Private, PRIV_192, 6, 80),
        ],
    );
}

/// Datagrams sent in the flood (each refused with EPERM at once).
const FLOOD: u32 = 200_000;
/// Audit log cap for the flood (the smallest config.yml accepts).
const CAP: u64 = 64 * 1024;

#[test]
fn a_flood_is_aggregated_bounded_and_keeps_its_first_event() {
    let bed = bed!();
    bed.apply(&policy(Mode::DenyAll, &[PUB_A]));
    let dir = std::env::temp_dir().join(format!("ts-events-flood-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // The name that led to the flooded address, as the resolver would have recorded it.
    std::fs::write(
        dir.join("learned.jsonl"),
        format!("{{\"domain\":\"flood.example\",\"addr\":\"{PUB_B}\",\"until\":4000000000}}\n"),
    )
    .unwrap();
    let settings = Settings {
        dir: dir.clone(),
        name: ContainerName::new("flood").unwrap(),
        enabled: true,
        max_bytes: CAP,
    };
    let (mut events, _dns) = run_in(&bed.container_path(), Duration::from_secs(10), move || {
        EventReader::bind(settings)
    })
    .expect("netns thread")
    .expect("bind the event reader");
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let pump = std::thread::spawn(move || {
        let mut rounds = 0u64;
        while !stopped.load(Ordering::SeqCst) && rounds < 1_000_000 {
            events
                .step(Duration::from_millis(50))
                .expect("event reader");
            rounds += 1;
        }
    });

    let started_ms = unix_ms();
    let (sent, refused, elapsed) = run_in(&bed.container_path(), Duration::from_secs(120), || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        let to = SocketAddr::new(addr(PUB_B), 9);
        let other = SocketAddr::new(addr(FAR), 7);
        let t = Instant::now();
        let (mut sent, mut refused) = (0u32, 0u32);
        for i in 0..FLOOD {
            let dst = if i % 1000 == 999 { other } else { to };
            match sock.send_to(b"flood", dst) {
                Ok(_) => sent += 1,
                Err(_) => refused += 1,
            }
        }
        (sent, refused, t.elapsed())
    })
    .expect("flood thread");
    let ended_ms = unix_ms();
    assert_eq!((sent, refused), (0, FLOOD), "every datagram is refused");
    // Let one interval pass so the repeats are summarised, then stop the reader.
    std::thread::sleep(INTERVAL + Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    pump.join().expect("event reader thread");

    let current = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap_or_default();
    let rotated = std::fs::read_to_string(dir.join("audit.jsonl.1")).unwrap_or_default();
    let records: Vec<Value> = rotated
        .lines()
        .chain(current.lines())
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect();
    let of_key = |host: &str, port: u64| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| {
                r["event"] == "blocked" && r["detail"]["dst"] == host && r["detail"]["port"] == port
            })
            .collect()
    };
    let flood = of_key(PUB_B, 9);
    let first = flood
        .first()
        .expect("the flood's first event is in the log");
    assert_eq!(first["detail"]["first"], true, "{first}");
    assert_eq!(first["detail"]["count"], 1, "{first}");
    assert_eq!(first["detail"]["verdict"], "denied", "{first}");
    assert_eq!(first["detail"]["proto"], "udp", "{first}");
    assert_eq!(first["detail"]["name"], "flood.example", "{first}");
    assert!(
        first["ts"].as_str().unwrap() <= rfc3339_utc(u128::from(ended_ms)).as_str(),
        "the first event was written during the flood, not after it: {first}"
    );
    assert!(
        !of_key(FAR, 7).is_empty(),
        "the second destination has its own line"
    );
    let counted: u64 = records
        .iter()
        .filter(|r| r["event"] == "blocked")
        .map(|r| r["detail"]["count"].as_u64().unwrap())
        .sum();
    let lost: u64 = records
        .iter()
        .filter(|r| r["event"] == "events_dropped")
        .map(|r| r["detail"]["count"].as_u64().unwrap())
        .sum();
    let bytes = current.len() + rotated.len();
    eprintln!(
        "FLOOD packets={FLOOD} send_ms={} lines={} bytes={bytes} counted={counted} lost={lost} window_ms={}",
        elapsed.as_millis(),
        records.len(),
        ended_ms - started_ms
    );
    assert!(current.len() as u64 <= CAP && rotated.len() as u64 <= CAP);
    assert!(
        records.len() <= 100,
        "{} lines for two destinations: repeats were not aggregated",
        records.len()
    );
    assert!(
        counted + lost <= u64::from(FLOOD),
        "counted {counted} + lost {lost}"
    );
    assert!(
        counted + lost >= u64::from(FLOOD) / 2,
        "most packets are accounted for: counted {counted} + lost {lost} of {FLOOD}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn many_destinations_are_bounded_by_the_key_limit() {
    let bed = bed!();
    bed.apply(&policy(Mode::DenyAll, &[PUB_A]));
    let dir = std::env::temp_dir().join(format!("ts-events-spread-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let settings = Settings {
        dir: dir.clone(),
        name: ContainerName::new("spread").unwrap(),
        enabled: true,
        max_bytes: 1 << 20,
    };
    let (mut events, _dns) = run_in(&bed.container_path(), Duration::from_secs(10), move || {
        EventReader::bind(settings)
    })
    .expect("netns thread")
    .expect("bind the event reader");
    const SPREAD: u32 = 5000;
    run_in(&bed.container_path(), Duration::from_secs(60), || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        for i in 0..SPREAD {
            // Distinct addresses of 198.18.0.0/15, all refused (only PUB_A is allowed).
            let dst = std::net::Ipv4Addr::from(0xC612_0000u32 + 0x100 + i);
            let _ = sock.send_to(b"x", (dst, 9));
        }
    })
    .expect("spread thread");
    let deadline = Instant::now() + INTERVAL + Duration::from_secs(3);
    while Instant::now() < deadline {
        events
            .step(Duration::from_millis(50))
            .expect("event reader");
    }
    let text = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap();
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let firsts = records
        .iter()
        .filter(|r| r["detail"]["first"] == true)
        .count();
    let dropped: u64 = records
        .iter()
        .filter(|r| {
            r["event"] == "events_dropped" && r["detail"]["reason"] == "too_many_destinations"
        })
        .map(|r| r["detail"]["count"].as_u64().unwrap())
        .sum();
    eprintln!(
        "SPREAD destinations={SPREAD} lines={} firsts={firsts} dropped={dropped}",
        records.len()
    );
    assert_eq!(firsts, MAX_KEYS, "one first line per tracked destination");
    assert_eq!(
        dropped,
        u64::from(SPREAD) - MAX_KEYS as u64,
        "the rest are counted"
    );
    assert!(records.len() <= MAX_KEYS + 2, "{} lines", records.len());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
