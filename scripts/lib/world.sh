# Shared shell pieces of the scripts that drive rootless shielded containers against a fake
# internet (scripts/soak.sh, scripts/demo.sh, bench/live-allow.sh). Source it; it defines
# functions only and changes no shell option.
#
#   test_user_init USER           sets E2E_USER, E2E_UID, E2E_GID, E2E_HOME (dies if missing)
#   as_user CMD...                CMD as the test user, clean environment, bounded by
#                                 AS_USER_TIMEOUT seconds (default 120); TEROK_SHIELD_CONFIG_DIR
#                                 and TEROK_SHIELD_STATE_DIR are passed when SHIELD_CONFIG_DIR and
#                                 SHIELD_STATE_DIR are set (the script's own files, never the
#                                 user's)
#   take_e2e_lock [SECONDS]       flock /run/terok-shield-e2e.lock on fd 9 (default wait 1800 s):
#                                 the e2e tests and every script using the fake prefixes take it
#   world_up NS VETH HOST4 WORLD4 "ROUTES" "HOSTS"
#                                 a network namespace NS joined to the host by the veth pair
#                                 VETH (host side, HOST4/30) - wan0 (WORLD4/30); every prefix in
#                                 ROUTES is routed from the host into it, every address in HOSTS
#                                 lives on its loopback. Only documentation/benchmark prefixes
#                                 (198.51.100.0/24, 198.18.0.0/15) belong in ROUTES.
#   world_down NS VETH            removes both (the routes go with the veth); safe to repeat
#
# The callers define `die` (message to stderr, exit 1).

test_user_init() {
    E2E_USER=$1
    id -u "$E2E_USER" >/dev/null 2>&1 || die "user $E2E_USER missing: run scripts/podman-env.sh first"
    E2E_UID=$(id -u "$E2E_USER")
    E2E_GID=$(id -g "$E2E_USER")
    E2E_HOME=$(getent passwd "$E2E_USER" | cut -d: -f6)
}

as_user() {
    local shield_env=()
    [ -n "${SHIELD_CONFIG_DIR:-}" ] && shield_env+=("TEROK_SHIELD_CONFIG_DIR=$SHIELD_CONFIG_DIR")
    [ -n "${SHIELD_STATE_DIR:-}" ] && shield_env+=("TEROK_SHIELD_STATE_DIR=$SHIELD_STATE_DIR")
    (cd / && timeout "${AS_USER_TIMEOUT:-120}" runuser -u "$E2E_USER" -- env -i HOME="$E2E_HOME" \
        XDG_RUNTIME_DIR="/run/user/$E2E_UID" PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
        "${shield_env[@]}" "$@")
}

take_e2e_lock() {
    local wait=${1:-1800}
    exec 9>/run/terok-shield-e2e.lock
    if ! flock -n 9; then
        printf '%s: waiting for another e2e run to release /run/terok-shield-e2e.lock\n' "$(basename "$0")" >&2
        flock -w "$wait" 9 || die "/run/terok-shield-e2e.lock still held after $wait s"
    fi
}

world_up() {
    local ns=$1 veth=$2 host4=$3 world4=$4 routes=$5 hosts=$6 r h
    world_down "$ns" "$veth"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip link add "$veth" type veth peer name wan0 netns "$ns"
    ip addr add "$host4/30" dev "$veth"
    ip link set "$veth" up
    ip -n "$ns" addr add "$world4/30" dev wan0
    ip -n "$ns" link set wan0 up
    ip -n "$ns" route add default via "$host4"
    for h in $hosts; do ip -n "$ns" addr add "$h/32" dev lo; done
    for r in $routes; do ip route replace "$r" via "$world4" dev "$veth"; done
}

world_down() {
    ip link del "$2" 2>/dev/null || true
    ip netns del "$1" 2>/dev/null || true
}
