#!/usr/bin/env bash
# Run every check CI runs: formatting, lints, and all tests (unit, property, snapshot, and the
# privileged integration tests that send real packets through nftables in network namespaces).
#
# Usage (as root; the integration tests create network namespaces):
#   sudo ./scripts/test-all.sh
# With CI=true, a privileged test that cannot run fails instead of skipping.
set -euo pipefail

cd "$(dirname "$0")/.."

log() { printf '\n=== %s (%ss)\n' "$*" "$SECONDS"; }
die() { printf 'test-all.sh: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (sudo ./scripts/test-all.sh): the integration tests create network namespaces and nftables tables"

# Packages the tests (and later the end-to-end tests) need. Installed only when missing.
PACKAGES=(nftables iproute2 podman runc slirp4netns uidmap busybox-static dnsmasq-base
          conntrack socat ca-certificates time tmux passt)

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' \
            || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && { echo "all packages present"; return; }
    command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get: install them by hand"
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    local try
    for try in 1 2 3; do
        apt-get update && apt-get install -y "${missing[@]}" && return
        echo "apt-get failed (attempt $try), retrying in 10 s" >&2
        sleep 10
    done
    die "could not install ${missing[*]}"
}

# The unprivileged owner of the rootless user namespace in the scale tests (and of rootless
# podman in end-to-end tests), with subordinate id ranges for podman.
setup_test_user() {
    local user=shieldtest f
    if ! id -u "$user" >/dev/null 2>&1; then
        useradd --create-home --shell /bin/bash "$user"
        echo "created user $user"
    fi
    for f in /etc/subuid /etc/subgid; do
        touch "$f"
        if ! grep -q "^$user:" "$f"; then
            # Start after every range already handed out, so none overlap.
            local start
            start=$(awk -F: 'BEGIN { m = 100000 } { e = $2 + $3; if (e > m) m = e } END { print m }' "$f")
            echo "$user:$start:65536" >>"$f"
            echo "added $user:$start:65536 to $f"
        fi
    done
    # Debian kernels can switch unprivileged user namespaces off; the rootless tests need them.
    if [[ -r /proc/sys/kernel/unprivileged_userns_clone ]] \
        && [[ $(cat /proc/sys/kernel/unprivileged_userns_clone) == 0 ]]; then
        echo 1 >/proc/sys/kernel/unprivileged_userns_clone
        echo "enabled kernel.unprivileged_userns_clone"
    fi
}

find_cargo() {
    command -v cargo >/dev/null && return
    [[ -x $HOME/.cargo/bin/cargo ]] && { export PATH="$HOME/.cargo/bin:$PATH"; return; }
    die "cargo not found; with a rustup toolchain in your home, run: sudo -E env \"PATH=\$PATH\" ./scripts/test-all.sh"
}

log "packages"
install_packages
log "test user"
setup_test_user
# The rootless Podman environment of the end-to-end tests, when that script is present.
if [[ -x scripts/podman-env.sh ]]; then
    log "scripts/podman-env.sh"
    ./scripts/podman-env.sh
fi
find_cargo
cargo --version
export CI="${CI:-}"
# Backtraces make a failing privileged test readable from the CI log alone.
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

log "cargo fmt --check"
cargo fmt --check
log "cargo clippy --all-targets -- -D warnings"
timeout --kill-after=30s 20m cargo clippy --all-targets -- -D warnings
log "cargo test --all-targets (CI=${CI:-unset})"
timeout --kill-after=30s 35m cargo test --all-targets
log "demo: a shielded container reaches an allowlisted host and is refused another"
timeout --kill-after=30s 15m ./scripts/demo.sh
log "short soak: 5 containers, 150 live operations from 4 clients, 90 s of load (scripts/soak.sh --short)"
timeout --kill-after=30s 10m ./scripts/soak.sh --short
log "all checks passed"
