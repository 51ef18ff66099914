//! Time the parts of a netlink verification at scale (not part of the shield).
//!
//! ```text
//! unshare -n verify_scale [runs|scattered] [ROUNDS]
//! ```
//!
//! Loads 100,000 IPv4 + 100,000 IPv6 single addresses into `inet terok_shield` of the current
//! network namespace (run it as root in a fresh one), dumps the table ROUNDS times and, for
//! each dump, times the kernel's dump, the decoding and the comparison with the policy.
//! Prints the medians in milliseconds.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use terok_shield::core::nft_netlink::Lowered;
use terok_shield::core::policy::{AllowRule, Mode, Policy};
use terok_shield::core::ruleset::Ruleset;
use terok_shield::core::verify::verify_netlink;
use terok_shield::effects::nftables_netlink::NlSocket;

fn policy(scattered: bool) -> Policy {
    let mut p = Policy::new(Mode::DenyAll);
    let mut push = |net: IpNet| p.allow.push(AllowRule { net, scope: None });
    for i in 0..100_000u32 {
        let (v4, v6) = if scattered {
            let v4 = if i < 65_536 {
                u32::from_be_bytes([198, 18, 0, 0]) + 2 * i
            } else {
                u32::from_be_bytes([240, 0, 0, 0]) + 2 * (i - 65_536)
            };
            (
                v4,
                0x2001_0db8_5ca1_0002_0000_0000_0000_0000 + 2 * u128::from(i),
            )
        } else {
            let off = (i / 250) * 256 + i % 250;
            (
                u32::from_be_bytes([198, 18, 0, 0]) + off,
                0x2001_0db8_5ca1_0001_0000_0000_0000_0000 + u128::from(off),
            )
        };
        push(Ipv4Net::new(Ipv4Addr::from(v4), 32).unwrap().into());
        push(Ipv6Net::new(Ipv6Addr::from(v6), 128).unwrap().into());
    }
    p
}

/// This thread's CPU time (user and system) in milliseconds: what our own work costs, on a
/// machine busy with other work.
fn cpu_ms() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 * 1e3 + t.tv_nsec as f64 / 1e6
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let scattered = args.get(1).map(String::as_str) == Some("scattered");
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(7);
    let policy = policy(scattered);
    let ruleset = Ruleset::generate(&policy);
    let lowered = Lowered::new(&ruleset).unwrap();
    let mut sock = NlSocket::open_in(None).unwrap();
    let (_, sent) = sock.number_and_send(|first| lowered.batches(true, first));
    sent.map_err(|(i, e)| format!("batch {i}: {e}")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (mut dump_ms, mut decode_ms, mut compare_ms, mut drop_ms) =
        (vec![], vec![], vec![], vec![]);
    let mut ours_cpu_ms = vec![];
    for _ in 0..rounds {
        let t0 = Instant::now();
        let dump = sock.dump_table().unwrap().unwrap();
        let t1 = Instant::now();
        let c1 = cpu_ms();
        let live = dump.decode().unwrap();
        let t2 = Instant::now();
        verify_netlink(&ruleset, &lowered, &live).unwrap();
        let t3 = Instant::now();
        drop((dump, live));
        ours_cpu_ms.push(cpu_ms() - c1);
        drop_ms.push(t3.elapsed().as_secs_f64() * 1e3);
        dump_ms.push((t1 - t0).as_secs_f64() * 1e3);
        decode_ms.push((t2 - t1).as_secs_f64() * 1e3);
        compare_ms.push((t3 - t2).as_secs_f64() * 1e3);
    }
    println!(
        "layout={} rounds={rounds} dump_ms={:.1} decode_ms={:.1} compare_ms={:.1} drop_ms={:.1} ours_cpu_ms={:.1}",
        if scattered { "scattered" } else { "runs" },
        median(&mut dump_ms),
        median(&mut decode_ms),
        median(&mut compare_ms),
        median(&mut drop_ms),
        median(&mut ours_cpu_ms),
    );
}
