//! The netlink backend against nft itself, in real network namespaces.
//!
//! For every mode and a range of policies (ports, networks, IPv6, DNS servers, host loopback,
//! the dnsmasq tier's sets, set timeouts, thousands of elements), the same ruleset is loaded
//! by the nft binary into one namespace and by our netlink encoder into another; both tables
//! are dumped over netlink and every table, chain, rule, set and element message must be
//! byte for byte the same, apart from what the kernel assigns itself: handles
//! (`NFTA_*_HANDLE`), a rule's position (the handle of the rule before it), the nfgenmsg
//! `res_id` (the ruleset generation), netlink sequence and port numbers, and the order of set
//! elements in a dump (a hash set's order depends on its random seed; elements are compared
//! as sorted lists of their exact bytes). `nft -j list table` must print both identically.
//! Then tampering with a netlink-loaded table must fail verification.

mod common;

use common::netns::Netns;
use common::policies::{allow, allow_port, net};
use common::require_privileges;
use terok_shield::core::nft_netlink::{attrs, messages, TableDump};
use terok_shield::core::policy::{HostLoopback, InboundPort, Mode, Policy};
use terok_shield::core::ruleset::Ruleset;
use terok_shield::core::target::Protocol;
use terok_shield::effects::firewall::{apply, apply_fresh, check, FirewallError, NETLINK};
use terok_shield::effects::nft::{find_program, Nft};
use terok_shield::effects::nftables_netlink::NlSocket;

fn binary() -> Nft {
    Nft::at(find_program("nft", &["/usr/sbin/nft", "/sbin/nft"]).expect("nft binary"))
}

fn ns(tag: &str) -> Netns {
    Netns::create(format!("tsc-{}-nl{tag}", std::process::id()))
}

/// Policies covering every rule shape the generator makes.
fn policies() -> Vec<(String, Policy)> {
    let mut out = Vec::new();
    for mode in [Mode::DenyAll, Mode::Bypass, Mode::BypassAll, Mode::Block] {
        let mut p = Policy::new(mode);
        p.allow = vec![
            allow("198.51.100.10"),
            allow("198.18.0.0/16"),
            allow("2001:db8::10"),
            allow("2001:db8:1::/48"),
            allow_port("198.51.100.22", 22, Some(Protocol::Tcp)),
            allow_port("2001:db8:2::/64", 443, None),
            allow_port("198.18.4.0/24", 53, Some(Protocol::Udp)),
        ];
        p.deny = vec![
            net("198.18.0.9"),
            net("2001:db8:1::9"),
            net("198.18.8.0/22"),
        ];
        p.dns_servers = vec![
            "198.51.100.53".parse().unwrap(),
            "2001:db8::53".parse().unwrap(),
        ];
        p.host_loopback = Some(HostLoopback {
            gateway: "198.51.100.1".parse().unwrap(),
            ports: vec![8080, 9090],
        });
        p.resolver_mark = Some(0x5eed);
        p.inbound = vec![
            InboundPort {
                port: 8080,
                protocol: Protocol::Tcp,
            },
            InboundPort {
                port: 5353,
                protocol: Protocol::Udp,
            },
            InboundPort {
                port: 53,
                protocol: Protocol::Udp,
            },
        ];
        out.push((format!("rich {mode:?}"), p));
    }
    // The dnsmasq tier: a resolver port, its scoped-name sets, a default set timeout; an
    // IPv6 gateway with one port; one inbound TCP port set.
    let mut p = Policy::new(Mode::DenyAll);
    // Adjacent networks no prefix covers: an end marker and a start at the same key.
    p.allow = vec![allow("198.18.1.0/24"), allow("198.18.2.0/23")];
    p.deny = vec![net("2001:db8:1::/48"), net("2001:db8:2::/47")];
    p.resolver_port = Some(5300);
    p.learned_timeout = Some(3600);
    p.host_loopback = Some(HostLoopback {
        gateway: "2001:db8::1".parse().unwrap(),
        ports: vec![8080],
    });
    p.inbound = vec![
        InboundPort {
            port: 22,
            protocol: Protocol::Tcp,
        },
        InboundPort {
            port: 80,
            protocol: Protocol::Tcp,
        },
    ];
    out.push(("dnsmasq tier".into(), p));
    out.push(("empty".into(), Policy::new(Mode::DenyAll)));
    // Thousands of elements of every kind: several batches, merged intervals.
    let mut p = Policy::new(Mode::DenyAll);
    for i in 0..3000u32 {
        p.allow.push(allow(
            &std::net::Ipv4Addr::from(0xC612_0000u32 + i * 3).to_string(),
        ));
        p.allow.push(allow(
            &std::net::Ipv6Addr::from(
                0x2001_0db8_0000_0000_0000_0000_0000_0000u128 + u128::from(i) * 5,
            )
            .to_string(),
        ));
    }
    for i in 0..600u32 {
        p.allow.push(allow(&format!(
            "{}/24",
            std::net::Ipv4Addr::from(0xC633_0000u32.wrapping_add(i << 9))
        )));
        p.allow.push(allow_port(
            &format!("2001:db8:{:x}::/48", i + 100),
            443,
            None,
        ));
        p.deny.push(net(&format!(
            "{}/30",
            std::net::Ipv4Addr::from(0xC612_8000u32 + i * 8)
        )));
    }
    out.push(("thousands".into(), p));
    out
}

/// Top-level attributes of a dumped message minus `ignore`, with their exact bytes.
fn significant(raw: &[u8], ignore: &[u16]) -> (u16, u16, Vec<(u16, Vec<u8>)>) {
    let m = &messages(raw).unwrap()[0];
    let family_version = &m.raw[16..18];
    let attrs = attrs(m.body)
        .unwrap()
        .into_iter()
        .filter(|a| !ignore.contains(&a.kind))
        .map(|a| (a.kind, a.data.to_vec()))
        .collect();
    (
        m.kind,
        u16::from_ne_bytes([family_version[0], family_version[1]]),
        attrs,
    )
}

fn split(raw: &[Vec<u8>]) -> Vec<Vec<u8>> {
    raw.iter()
        .flat_map(|d| messages(d).unwrap().into_iter().map(|m| m.raw.to_vec()))
        .collect()
}

/// Every element of a set's dump as the exact bytes of its `NFTA_LIST_ELEM`, sorted.
fn element_bytes(raw: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for m in split(raw) {
        let msg = &messages(&m).unwrap()[0];
        for a in attrs(msg.body).unwrap() {
            if a.kind == 3 {
                for e in attrs(a.data).unwrap() {
                    out.push(e.data.to_vec());
                }
            }
        }
    }
    out.sort();
    out
}

/// A kind of dumped object, the two dumps of it, and the attributes the kernel assigns.
type Compared<'a> = (&'a str, &'a [Vec<u8>], &'a [Vec<u8>], &'a [u16]);

/// A kind of tampering and the nft script that does it.
type Tampering<'a> = (&'a str, Box<dyn Fn() -> String + 'a>);

fn assert_same_dump(what: &str, nft: &TableDump, ours: &TableDump) {
    let pairs: [Compared; 4] = [
        // table: handle, padding
        ("table", &nft.table, &ours.table, &[4, 5]),
        // chain: handle, padding
        ("chain", &nft.chains, &ours.chains, &[2, 9]),
        // rule: handle, position, padding
        ("rule", &nft.rules, &ours.rules, &[3, 6, 9]),
        // set: handle, padding
        ("set", &nft.sets, &ours.sets, &[16, 14]),
    ];
    for (kind, a, b, ignore) in pairs {
        let (a, b) = (split(a), split(b));
        assert_eq!(a.len(), b.len(), "{what}: number of {kind} messages");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(
                significant(x, ignore),
                significant(y, ignore),
                "{what}: {kind} message {i} differs"
            );
        }
    }
    assert_eq!(
        nft.elements.len(),
        ours.elements.len(),
        "{what}: sets dumped"
    );
    for ((name_a, a), (name_b, b)) in nft.elements.iter().zip(&ours.elements) {
        assert_eq!(name_a, name_b, "{what}");
        assert_eq!(
            element_bytes(a),
            element_bytes(b),
            "{what}: elements of {name_a}"
        );
    }
}

fn dump(ns: &Netns) -> TableDump {
    NlSocket::open_in(Some(&ns.path()))
        .unwrap()
        .dump_table()
        .unwrap()
        .expect("table present")
}

#[test]
fn netlink_loads_what_nft_loads_byte_for_byte() {
    if !require_privileges() {
        return;
    }
    let (by_nft, by_us) = (ns("a"), ns("b"));
    let bin = binary().in_netns(by_nft.path());
    let ours = Nft::locate().unwrap().in_netns(by_us.path());
    let list = binary().in_netns(by_us.path());
    for (what, policy) in policies() {
        let rs = Ruleset::generate(&policy);
        for tx in rs.transactions() {
            bin.run_script(&tx)
                .unwrap_or_else(|e| panic!("{what}: nft: {e}"));
        }
        let report = apply(&ours, &policy).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(report.backend, NETLINK);
        assert_same_dump(&what, &dump(&by_nft), &dump(&by_us));
        assert_eq!(
            bin.list_table_json().unwrap(),
            list.list_table_json().unwrap(),
            "{what}: nft -j list table"
        );
        // Our verification accepts what nft loaded, too: it checks the kernel's state, not
        // which loader produced it.
        check(&bin_locate(&by_nft), &policy).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
}

/// A netlink handle on `ns` (for verifying a table nft loaded).
fn bin_locate(ns: &Netns) -> Nft {
    Nft::locate().unwrap().in_netns(ns.path())
}

/// Tampering with a netlink-loaded table, each kind undone by a fresh apply.
#[test]
fn verification_over_netlink_detects_tampering() {
    if !require_privileges() {
        return;
    }
    let ns = ns("t");
    let ours = Nft::locate().unwrap().in_netns(ns.path());
    let bin = binary().in_netns(ns.path());
    let policy = policies().remove(0).1;
    let handle_of = |chain: &str, index: usize| -> u64 {
        // `ip netns exec` runs nft in the namespace.
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(bin.program())
            .args(["-j", "-a", "list", "chain", "inet", "terok_shield", chain])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o.get("rule"))
            .nth(index)
            .unwrap()["handle"]
            .as_u64()
            .unwrap()
    };
    let tampering: Vec<Tampering> = vec![
        (
            "a rule removed",
            Box::new(|| {
                format!(
                    "delete rule inet terok_shield output handle {}\n",
                    handle_of("output", 3)
                )
            }),
        ),
        (
            "a rule changed",
            Box::new(|| {
                format!(
                    "replace rule inet terok_shield allowed handle {} drop\n",
                    handle_of("allowed", 1)
                )
            }),
        ),
        (
            "a rule inserted",
            Box::new(|| "insert rule inet terok_shield output accept\n".into()),
        ),
        (
            "an element added to a hash set",
            Box::new(|| "add element inet terok_shield allow_v4 { 198.51.100.99 }\n".into()),
        ),
        (
            "an element added to an interval set",
            Box::new(|| {
                "add element inet terok_shield allow_net_v4 { 198.51.100.128/25 }\n".into()
            }),
        ),
        (
            "an element removed from an interval set",
            Box::new(|| "delete element inet terok_shield deny_v4 { 198.18.0.9 }\n".into()),
        ),
        (
            "a chain policy flipped",
            Box::new(|| "chain inet terok_shield output { policy accept; }\n".into()),
        ),
        (
            "an extra set",
            Box::new(|| "add set inet terok_shield extra { type ipv4_addr; }\n".into()),
        ),
        (
            "an extra chain",
            Box::new(|| "add chain inet terok_shield extra\n".into()),
        ),
        (
            "the table made dormant",
            Box::new(|| "add table inet terok_shield { flags dormant; }\n".into()),
        ),
    ];
    for (what, script) in tampering {
        apply(&ours, &policy).unwrap();
        check(&ours, &policy).unwrap();
        bin.run_script(&script())
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let err = check(&ours, &policy).unwrap_err();
        assert!(matches!(err, FirewallError::Verify(_)), "{what}: {err:?}");
    }
    // A fresh load into a namespace that has our table merges into it: refused.
    apply(&ours, &policy).unwrap();
    assert!(apply_fresh(&ours, &policy).is_err());
    bin.delete_table().unwrap();
    assert!(matches!(check(&ours, &policy), Err(FirewallError::Missing)));
}

/// The kernel refusing the batch is a load error and leaves nothing half-made: a fresh load
/// into a namespace with a conflicting object of the same name fails as a whole.
#[test]
fn a_refused_batch_fails_closed() {
    if !require_privileges() {
        return;
    }
    let ns = ns("r");
    let ours = Nft::locate().unwrap().in_netns(ns.path());
    let bin = binary().in_netns(ns.path());
    // A table whose `allow_v4` has another type: our NEWSET of it is refused (an existing
    // set is fine without NLM_F_EXCL, but never one of another type).
    bin.run_script("table inet terok_shield {\n set allow_v4 { type ipv6_addr; }\n}\n")
        .unwrap();
    let policy = policies().remove(0).1;
    let err = apply_fresh(&ours, &policy).unwrap_err();
    assert!(matches!(err, FirewallError::LoadNetlink(_)), "{err:?}");
    assert!(err.to_string().contains("allow_v4"), "{err}");
    // Nothing of the batch is live: the table holds only the conflicting set.
    let listed = bin.list_table_text().unwrap().unwrap();
    assert!(!listed.contains("chain"), "{listed}");
    // The full replacement of apply_at_start's fallback repairs it.
    apply(&ours, &policy).unwrap();
    check(&ours, &policy).unwrap();
}
