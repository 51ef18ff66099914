//! Shared test bed for the privileged integration tests: real network namespaces, a fake
//! internet, real packets through the real firewall.
//!
//! Every test builds its own [`bed::Bed`]: a "container" netns wired by a veth pair to a
//! "world" netns that owns every destination the tests use, so nothing can leak to the host.
//! Namespaces are only ever joined by fresh, single-use threads; the test's own thread never
//! changes namespace.

#![allow(dead_code)]

pub mod bed;
pub mod cmd;
#[macro_use]
pub mod e2e;
pub mod netns;
pub mod policies;
pub mod probe;
pub mod userns;
pub mod world;

use std::sync::OnceLock;

use terok_shield::effects::nft::Nft;

/// Whether this process may run the privileged tests (root, `ip` and `nft` present).
///
/// With `CI=true` a missing privilege is a failure, never a skip: the suite must not go green
/// by testing nothing.
pub fn require_privileges() -> bool {
    static VERDICT: OnceLock<Result<(), String>> = OnceLock::new();
    let verdict = VERDICT.get_or_init(|| {
        let mut missing = Vec::new();
        if !rustix::process::geteuid().is_root() {
            missing.push("root");
        }
        if cmd::run_ok("ip", &["-V"], std::time::Duration::from_secs(10)).is_err() {
            missing.push("the `ip` command (iproute2)");
        }
        if Nft::locate().is_err() {
            missing.push("the `nft` command (nftables)");
        }
        if missing.is_empty() {
            netns::sweep_stale();
            Ok(())
        } else {
            Err(missing.join(", "))
        }
    });
    match verdict {
        Ok(()) => true,
        Err(missing) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "privileged integration tests cannot run in CI: missing {missing}"
            );
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                // Straight to stderr, past libtest's capture, so the skip is seen.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIP privileged tests: need {missing} (with CI=true this is a failure)"
                );
            });
            false
        }
    }
}
