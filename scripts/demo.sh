#!/bin/bash
# The main job in one command: on a fresh Debian 12 machine (as root, no internet needed
# beyond the package mirror), install what is needed, build terok-shield, set up rootless
# Podman for an unprivileged user, start a small fake internet in its own network namespace,
# and show a shielded container reaching an allowlisted host and being refused another.
#
#   sudo ./scripts/demo.sh
#
# Network: the fake internet is 198.51.100.0/24 (documentation range) inside the namespace
# `tsdemo-world`, reached from the host over a veth; nothing leaves this machine. Everything
# the demo creates (namespace, veth, route, servers, the demo container and its state) is
# removed at the end, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

USER_NAME=${E2E_USER:-shieldtest}
IMAGE=${E2E_IMAGE:-localhost/shield-test:latest}
WORLD=tsdemo-world
HOST_VETH=tsdemo-host
ALLOWED=198.51.100.10
REFUSED=198.51.100.20
DEMO_DIR=/tmp/terok-shield-demo
CONTAINER=terok-shield-demo

say() { printf '\n\033[1mdemo: %s\033[0m\n' "$*"; }
die() { printf 'demo: error: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (sudo ./scripts/demo.sh): it creates a user, a network namespace and a route"

PACKAGES=(nftables iproute2 podman runc slirp4netns uidmap busybox-static ca-certificates)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

command -v cargo >/dev/null || { [ -x "$HOME/.cargo/bin/cargo" ] && PATH="$HOME/.cargo/bin:$PATH"; } || true
command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain (https://rustup.rs) and run again"
say "building terok-shield (release)"
cargo build --release --quiet

say "rootless Podman for user $USER_NAME (scripts/podman-env.sh)"
./scripts/podman-env.sh >/dev/null
# shellcheck source=lib/world.sh
. scripts/lib/world.sh
test_user_init "$USER_NAME"
SHIELD_CONFIG_DIR=$DEMO_DIR/config SHIELD_STATE_DIR=$DEMO_DIR/state

# The end-to-end tests route the same fake prefix: take their machine-wide lock.
take_e2e_lock 900

HTTPD_PIDS=()
cleanup() {
    set +e
    as_user podman rm -f -t 0 "$CONTAINER" >/dev/null 2>&1
    # `run` installed the OCI hooks in the demo's config dir: take them (and their entry in
    # the user's containers.conf) out again.
    [ -x "$DEMO_DIR/bin/terok-shield" ] && as_user "$DEMO_DIR/bin/terok-shield" setup --remove --force >/dev/null 2>&1
    for pid in "${HTTPD_PIDS[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
    world_down "$WORLD" "$HOST_VETH"    # the veth pair and its route go with it
    rm -rf "$DEMO_DIR"
}
trap cleanup EXIT
cleanup

say "fake internet: namespace $WORLD with web servers on $ALLOWED and $REFUSED"
world_up "$WORLD" "$HOST_VETH" 198.18.254.1 198.18.254.2 198.51.100.0/24 "$ALLOWED $REFUSED"
for a in "$ALLOWED" "$REFUSED"; do
    mkdir -p "$DEMO_DIR/www/$a"
    echo "hello from $a" >"$DEMO_DIR/www/$a/index.html"
    ip netns exec "$WORLD" busybox httpd -f -p "$a:80" -h "$DEMO_DIR/www/$a" &
    HTTPD_PIDS+=($!)
done
sleep 0.3
curl_ok=$(ip netns exec "$WORLD" busybox wget -qO- "http://$ALLOWED/" 2>/dev/null || true)
[ "$curl_ok" = "hello from $ALLOWED" ] || die "the fake internet's web server did not answer"

say "a profile that allows only $ALLOWED"
install -d -o "$USER_NAME" -m 0755 "$DEMO_DIR" "$DEMO_DIR/config" "$DEMO_DIR/config/profiles" "$DEMO_DIR/state" "$DEMO_DIR/bin"
printf '# demo: one allowed web server\n%s\n' "$ALLOWED" >"$DEMO_DIR/config/profiles/demo.txt"
# No domains in the demo profile; upstream_dns keeps any lookup inside the fake internet.
printf 'upstream_dns: 198.51.100.53\n' >"$DEMO_DIR/config/config.yml"
chown -R "$USER_NAME" "$DEMO_DIR/config"
install -m 0755 target/release/terok-shield "$DEMO_DIR/bin/terok-shield"

say "terok-shield run $CONTAINER --profiles demo -- --rm $IMAGE sh -c '...'"
as_user "$DEMO_DIR/bin/terok-shield" run "$CONTAINER" --profiles demo -- --rm "$IMAGE" sh -c "
    echo '--- inside the container ---'
    echo \"GET http://$ALLOWED/  -> \$(timeout 5 wget -qO- http://$ALLOWED/ 2>&1 || echo FAILED)\"
    echo \"GET http://$REFUSED/  -> \$(timeout 5 wget -qO- http://$REFUSED/ 2>&1 || echo REFUSED)\"
" 2>&1 | tee "$DEMO_DIR/out.txt"

grep -q "hello from $ALLOWED" "$DEMO_DIR/out.txt" || die "the allowlisted host was not reached"
grep -q "hello from $REFUSED" "$DEMO_DIR/out.txt" && die "the host that is not allowlisted was reached"
say "audit log"
as_user "$DEMO_DIR/bin/terok-shield" logs --container "$CONTAINER" -n 5
say "done: $ALLOWED reached, $REFUSED refused; cleaning up"
