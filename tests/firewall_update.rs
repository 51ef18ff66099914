//! Live updates (`effects::firewall::update`) with real packets.

mod common;

use terok_shield::core::policy::Mode;
use terok_shield::core::target::Protocol;

use common::policies::*;
use common::world::*;

#[test]
fn update_opens_and_closes_destinations_live() {
    use terok_shield::effects::firewall::{check, update};
    let bed = bed!();
    let nft = bed.nft();
    let a = policy(Mode::DenyAll, &[PUB_A, "198.18.1.0/24"]);
    bed.apply(&a);
    let mut b = policy(Mode::DenyAll, &[PUB_A, PUB_B, "198.18.1.0/24", PUB6_A]);
    b.allow.push(allow_port(SCOPED, 443, Some(Protocol::Tcp)));
    update(&nft, &a, &b).unwrap_or_else(|e| panic!("update a->b: {e}"));
    check(&nft, &b).unwrap();
    bed.expect_tcp_ok(PUB_B, 80);
    bed.expect_tcp_ok(PUB6_A, 80);
    bed.expect_tcp_ok(SCOPED, 443);
    bed.expect_tcp_refused(SCOPED, 80);
    let c = policy(Mode::DenyAll, &[PUB_B]);
    update(&nft, &b, &c).unwrap_or_else(|e| panic!("update b->c: {e}"));
    check(&nft, &c).unwrap();
    bed.expect_tcp_ok(PUB_B, 80);
    for host in [PUB_A, NET_HOST, PUB6_A, SCOPED] {
        bed.expect_tcp_refused(host, 443);
    }
    // A mode change needs other chains: update must still land exactly on the target.
    let mut d = c.clone();
    d.mode = Mode::Bypass;
    update(&nft, &c, &d).unwrap_or_else(|e| panic!("update c->d: {e}"));
    check(&nft, &d).unwrap();
    bed.expect_tcp_ok(FAR, 80);
    bed.expect_tcp_refused(PRIV_172, 80);
    // Told the wrong "old" policy, update must still end at the target, verified.
    update(&nft, &a, &c).unwrap_or_else(|e| panic!("update from a stale view: {e}"));
    check(&nft, &c).unwrap();
    bed.expect_tcp_refused(FAR, 80);
    bed.expect_tcp_refused(PUB_A, 80);
    bed.expect_tcp_ok(PUB_B, 80);
    assert_eq!(tables(&bed), ["inet terok_shield"]);
}
