#!/bin/bash
# Soak and concurrency run of terok-shield (issue #13): many shielded containers at once, live
# operations on them from parallel clients while their resolvers answer under load and their
# workloads flood refused packets; then check that nothing drifted, leaked or broke.
#
#   scripts/soak.sh [--short]        (as root, after scripts/podman-env.sh)
#
# Environment (defaults; --short in brackets):
#   CONTAINERS=20 [5]  shielded containers, all started at once
#   OPS=1000 [150]     live operations (allow/deny of IPs, CIDRs and names, up, down,
#                      down --all, block, reset), spread over the load period
#   CLIENTS=8 [4]      parallel clients issuing them
#   LOAD_SECONDS=600 [90]  how long the workloads query and flood
#   BLASTED=3 [0]      containers whose resolver a load generator (examples/dns_blast.rs) also
#                      hammers with unique allowlisted names (none in the short run: a
#                      blasted resolver's RSS swings by up to 2x with no growth over 10 min,
#                      which a 90 s settle window cannot tell from a leak; docs/security.md)
#   SEED=1             random seed of the clients' choices
#   SOAK_BIN           the terok-shield binary (default: cargo build --release)
#   E2E_USER (shieldtest), E2E_IMAGE (localhost/shield-test:latest)
#
# Each container's workload (busybox), for LOAD_SECONDS: asks its resolver for an allowlisted
# name (`*.soak.test`), opens 3 TCP connections and sends 3 UDP datagrams to a host that is
# not allowlisted (198.51.100.20), sleeps 0.2 s; then prints its counts and idles.
#
# Checks (the run fails, exit 1, when any does not hold):
#   - every container started; no live operation failed (exit status other than 0 or a
#     refusal the tool is meant to give, a timeout, a crash, "corrupt", a lock error);
#   - `terok-shield status NAME` of each container: the live table read back from the kernel
#     equals what its state.json says (rules, sets, literal elements, mode);
#   - no lost update: every allow/deny that succeeded is in the container's state.json;
#   - RSS of each container's resolver at the end within 10% of where it settled (its highest
#     sample from the end of the warm-up to mid-load), its open descriptors not more than
#     then, and it is the same process;
#   - no zombie whose parent is one of ours or that is a terok-shield process;
#   - every audit.jsonl and audit.jsonl.1 at most audit.max_bytes (set to 65536 here, so that
#     the refused-packet events rotate it).
#
# Network: the fake internet is the namespace `tssoak-world`, joined to the host by the veth
# `tssoak-host` (198.18.253.1/30 - 198.18.253.2/30); the host routes 198.51.100.0/24 and
# 198.18.0.0/15 into it and nothing else. In it: the upstream DNS server on 198.51.100.53
# (dns_blast `upstream`: every *.soak.test answer a new address in 198.18.0.0/15) and the
# hosts 198.51.100.10 and 198.51.100.20 (no servers: their kernel answers RST or port
# unreachable when the shield lets a packet through). Nothing leaves the machine. The script
# holds the machine lock /run/terok-shield-e2e.lock and removes everything it made on exit.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
die() { printf 'soak: error: %s\n' "$*" >&2; exit 1; }
say() { printf 'soak: [%4ss] %s\n' "$SECONDS" "$*" >&2; }
# shellcheck source=lib/world.sh
. "$REPO/scripts/lib/world.sh"

SHORT=no
for arg in "$@"; do
    case $arg in
        --short) SHORT=yes ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $arg (usage: scripts/soak.sh [--short])" ;;
    esac
done
if [ "$SHORT" = yes ]; then
    CONTAINERS=${CONTAINERS:-5} OPS=${OPS:-150} CLIENTS=${CLIENTS:-4} LOAD_SECONDS=${LOAD_SECONDS:-90} BLASTED=${BLASTED:-0}
else
    CONTAINERS=${CONTAINERS:-20} OPS=${OPS:-1000} CLIENTS=${CLIENTS:-8} LOAD_SECONDS=${LOAD_SECONDS:-600} BLASTED=${BLASTED:-3}
fi
SEED=${SEED:-1}
IMAGE=${E2E_IMAGE:-localhost/shield-test:latest}
for v in CONTAINERS OPS CLIENTS LOAD_SECONDS BLASTED SEED; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a number (got ${!v})"
done
((CONTAINERS >= 1 && CONTAINERS <= 100)) || die "CONTAINERS must be 1..100"
((CLIENTS >= 1 && CLIENTS <= 64)) || die "CLIENTS must be 1..64"
((OPS <= 100000)) || die "OPS must be at most 100000"
((LOAD_SECONDS >= 30 && LOAD_SECONDS <= 7200)) || die "LOAD_SECONDS must be 30..7200"
((BLASTED <= CONTAINERS)) || BLASTED=$CONTAINERS

[ "$(id -u)" -eq 0 ] || die "run as root (podman runs as the test user through runuser; the fake internet is a network namespace)"
for tool in ip flock runuser nsenter podman timeout; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool missing"
done
test_user_init "${E2E_USER:-shieldtest}"

WORK=/tmp/terok-shield-soak
KEEP=/tmp/terok-shield-soak-last
NS=tssoak-world
HOST_VETH=tssoak-host
DNS4=198.51.100.53
BLOCKED4=198.51.100.20
AUDIT_CAP=65536
PREFIX=soak
SHIELD_CONFIG_DIR=$WORK/config SHIELD_STATE_DIR=$WORK/state

# --- binaries ------------------------------------------------------------------------------
if [ -n "${SOAK_BIN:-}" ]; then
    SRC_BIN=$SOAK_BIN
    SRC_BLAST=${SOAK_BLAST:-$(dirname "$SOAK_BIN")/examples/dns_blast}
else
    say "building the release binary and examples/dns_blast (cargo build --release)"
    (cd "$REPO" && cargo build --release --quiet --bin terok-shield --example dns_blast)
    SRC_BIN=$REPO/target/release/terok-shield
    SRC_BLAST=$REPO/target/release/examples/dns_blast
fi
[ -x "$SRC_BIN" ] && [ -x "$SRC_BLAST" ] || die "missing $SRC_BIN or $SRC_BLAST"

take_e2e_lock 1800
say "holding /run/terok-shield-e2e.lock"

NAMES=()
for ((i = 1; i <= CONTAINERS; i++)); do NAMES+=("$PREFIX-$i"); done
BG_PIDS=()
cleanup() {
    local rc=$? p
    set +e
    trap - EXIT INT TERM
    for p in "${BG_PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${BG_PIDS[@]}"; do wait "$p" 2>/dev/null; done
    if [ -x "$WORK/bin/terok-shield" ]; then
        AS_USER_TIMEOUT=300 as_user podman rm -f -t 0 "${NAMES[@]}" >/dev/null 2>&1
        as_user "$WORK/bin/terok-shield" setup --remove --force >/dev/null 2>&1
    fi
    world_down "$NS" "$HOST_VETH"
    if [ -d "$WORK/log" ]; then
        rm -rf "$KEEP"
        cp -a "$WORK/log" "$KEEP" 2>/dev/null
        cp -a "$WORK/state" "$KEEP/state" 2>/dev/null
        printf 'soak: logs and state bundles of this run kept in %s\n' "$KEEP" >&2
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# Leftovers of a killed run.
AS_USER_TIMEOUT=300 as_user podman rm -f -t 0 "${NAMES[@]}" >/dev/null 2>&1 || true
rm -rf "$WORK"
as_user podman image exists "$IMAGE" || die "image $IMAGE missing for $E2E_USER: run scripts/podman-env.sh first"

mkdir -p "$WORK/bin" "$WORK/log" "$WORK/config/profiles" "$WORK/state"
chmod 755 "$WORK" "$WORK/bin"
install -m 755 "$SRC_BIN" "$WORK/bin/terok-shield"
install -m 755 "$SRC_BLAST" "$WORK/bin/dns_blast"
BIN=$WORK/bin/terok-shield
BLAST=$WORK/bin/dns_blast
cat >"$WORK/config/config.yml" <<EOF
# scripts/soak.sh: a small audit cap so that rotation happens; short TTLs so that the
# DNS-learned sets churn under load instead of only growing.
default_profiles: [soak]
audit:
  enabled: true
  max_bytes: $AUDIT_CAP
upstream_dns: $DNS4
dns:
  tier: builtin
  min_ttl: 10
  max_ttl: 20
EOF
printf '# scripts/soak.sh\n*.soak.test\n*.bench.test\n198.51.100.10\n' >"$WORK/config/profiles/soak.txt"
chown -R "$E2E_UID:$E2E_GID" "$WORK/config" "$WORK/state"
chmod 700 "$WORK/config" "$WORK/state"

# --- fake internet -------------------------------------------------------------------------
world_up "$NS" "$HOST_VETH" 198.18.253.1 198.18.253.2 "198.51.100.0/24 198.18.0.0/15" \
    "198.51.100.10 $BLOCKED4 $DNS4"
ip netns exec "$NS" "$BLAST" upstream "$DNS4:53" 2>"$WORK/log/upstream.err" &
BG_PIDS+=($!)
sleep 0.3
kill -0 "${BG_PIDS[0]}" 2>/dev/null || die "the fake upstream DNS did not start: $(cat "$WORK/log/upstream.err")"
say "fake internet up: $NS, upstream DNS $DNS4 (answers *.soak.test... and *.bench.test)"

# --- containers ----------------------------------------------------------------------------
# Busybox workload; $1 = its index, $2 = seconds of load.
WORKLOAD='
k=$1 load=$2
now() { cut -d. -f1 /proc/uptime; }
end=$(( $(now) + load ))
q=0 a=0 t=0 u=0 i=0
while [ "$(now)" -lt "$end" ]; do
    i=$((i + 1))
    q=$((q + 1))
    timeout 3 nslookup "w$i-c$k.soak.test" 2>/dev/null | grep -q "^Address.*198\.1[89]\." && a=$((a + 1))
    for p in 1 2 3; do timeout 2 nc '"$BLOCKED4"' 80 </dev/null >/dev/null 2>&1; t=$((t + 1)); done
    for p in 1 2 3; do echo x | timeout 2 nc -u -w 1 '"$BLOCKED4"' 9 >/dev/null 2>&1; u=$((u + 1)); done
    usleep 200000
done
echo "SOAK-COUNTS queries=$q answered=$a tcp=$t udp=$u"
# Idle in a shell (not exec sleep): the shell as PID 1 reaps the orphans of busybox timeout.
while :; do sleep 10; done
'
say "starting $CONTAINERS shielded containers at once"
T_START=$SECONDS
START_PIDS=()
for ((i = 1; i <= CONTAINERS; i++)); do
    AS_USER_TIMEOUT=300 as_user "$BIN" run "$PREFIX-$i" -- -d "$IMAGE" sh -c "$WORKLOAD" soak "$i" "$LOAD_SECONDS" \
        >"$WORK/log/run-$i.out" 2>"$WORK/log/run-$i.err" &
    START_PIDS+=($!)
done
START_FAIL=0
for ((i = 1; i <= CONTAINERS; i++)); do
    if ! wait "${START_PIDS[$((i - 1))]}"; then
        START_FAIL=$((START_FAIL + 1))
        say "FAIL: start of $PREFIX-$i: $(tail -3 "$WORK/log/run-$i.err")"
    fi
done
LOAD_T0=$SECONDS
START_SECONDS=$((SECONDS - T_START))
say "$((CONTAINERS - START_FAIL)) of $CONTAINERS started in ${START_SECONDS} s"
((START_FAIL == 0)) || die "$START_FAIL containers did not start (see above)"

bundle() { echo "$WORK/state/containers/$1"; }
# JSON field of runtime.json without jq: "resolver":[PID,START]
resolver_pid() { sed -n 's/.*"resolver":\[\([0-9]*\),.*/\1/p' "$(bundle "$1")/runtime.json"; }
init_pid() { sed -n 's/.*"pid":\([0-9]*\),.*/\1/p' "$(bundle "$1")/runtime.json"; }
rss_of() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
fds_of() { ls "/proc/$1/fd" 2>/dev/null | wc -l; }
# Zombies: every one on the machine, and those that are ours (a terok-shield or nft process, or
# a child of a resolver, conmon, slirp4netns or of this script).
zombies() {
    local ours=" $$ $(pgrep -d ' ' -u "$E2E_USER" 'conmon|slirp4netns' || true) ${RESOLVERS[*]} "
    ps -eo stat=,ppid=,pid=,comm= | awk -v ours="$ours" '
        $1 ~ /^Z/ { all++; if (index(ours, " " $2 " ") || $4 ~ /terok-shield|^nft$/) { mine++; print "zombie: " $0 > "/dev/stderr" } }
        END { printf "%d %d\n", all, mine }'
}

declare -A RESOLVER_OF
RESOLVERS=()
for n in "${NAMES[@]}"; do
    p=$(resolver_pid "$n")
    [ -n "$p" ] && [ -d "/proc/$p" ] || die "no resolver process recorded for $n"
    RESOLVER_OF[$n]=$p
    RESOLVERS+=("$p")
done

# --- DNS load generators -------------------------------------------------------------------
LOAD_END=$((LOAD_T0 + LOAD_SECONDS))
for ((i = 1; i <= BLASTED; i++)); do
    n=$PREFIX-$i
    pid=$(init_pid "$n")
    (
        r=0
        while ((SECONDS < LOAD_END - 3)); do
            r=$((r + 1))
            timeout 30 nsenter -t "$pid" -n "$BLAST" blast 127.0.0.1:53 2000 4 "b$i-r$r" >>"$WORK/log/blast-$i.txt" 2>&1 || true
            sleep 1
        done
    ) &
    BG_PIDS+=($!)
done
say "load running for $LOAD_SECONDS s ($BLASTED resolvers also under dns_blast)"

# --- resource samples ----------------------------------------------------------------------
sample() { # label -> $WORK/log/sample-LABEL.txt: name pid rss fds
    local n
    for n in "${NAMES[@]}"; do
        echo "$n ${RESOLVER_OF[$n]} $(rss_of "${RESOLVER_OF[$n]}") $(fds_of "${RESOLVER_OF[$n]}")"
    done >"$WORK/log/sample-$1.txt"
}
# Past dns.max_ttl (20 s), so that the learned sets and learned.jsonl have reached the size
# they keep under this load: growth after that point is what a leak would be.
WARMUP=$((LOAD_SECONDS / 10))
((WARMUP < 30)) && WARMUP=30
((WARMUP > 60)) && WARMUP=60
sleep "$WARMUP"
sample settled
read -r Z_ALL_SETTLED Z_MINE_SETTLED < <(zombies)
say "settled after ${WARMUP} s of load: resolver RSS $(awk '{ s += $3 } END { printf "%d", s / NR }' "$WORK/log/sample-settled.txt") KiB on average"
# Periodic samples in the background (for the maximum): every 2 s in the short run, so that
# its shorter settle window still sees a flooded resolver's swing.
SAMPLE_EVERY=$([ "$SHORT" = yes ] && echo 2 || echo 10)
(
    k=0
    while ((SECONDS < LOAD_END)); do
        sleep "$SAMPLE_EVERY"
        k=$((k + 1))
        sample "p$k"
    done
) &
BG_PIDS+=($!)

# --- live operations -----------------------------------------------------------------------
# Targets are unique per operation (so a lost update shows), except `deny` of an address an
# earlier `allow` opened (the contested pool), which exercises allow-then-deny.
# Each line of ops-CLIENT.txt: kind container target rc ms seconds-into-the-load
hang_report() {
    local p
    {
        echo "=== $1: still running after 20 s"
        ps -eo pid,ppid,stat,wchan:32,etime,args --forest | grep -E 'terok-shield|nft|runuser' | grep -v grep
        for p in $(pgrep -f "$BIN internal|$BIN (allow|deny|up|down|block|reset)"); do
            echo "--- /proc/$p/stack ($(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null))"
            cat "/proc/$p/stack" 2>/dev/null
        done
    } >>"$WORK/log/hangs.txt" 2>&1
}
client() {
    local c=$1 count=$2 pace_ms=$3 j idx n kind target s e rc out
    RANDOM=$((SEED * 1000 + c))
    for ((j = 0; j < count; j++)); do
        idx=$((c * 10000 + j))
        n=$PREFIX-$((RANDOM % CONTAINERS + 1))
        r=$((RANDOM % 100))
        # unique per operation: 198.19.0.0/16 (IPs), 198.19.128.0/17 of /28s (CIDRs)
        ipu="198.19.$(((idx / 250) % 128)).$((idx % 250 + 1))"
        local args
        if ((r < 20)); then kind=allow_ip target=$ipu args=(allow "$n" "$target")
        elif ((r < 28)); then kind=allow_cidr target="198.19.$((128 + (idx / 16) % 128)).$(((idx % 16) * 16))/28" args=(allow "$n" "$target")
        elif ((r < 36)); then kind=allow_domain target="a$idx.soak.test" args=(allow "$n" "$target")
        elif ((r < 46)); then kind=deny_ip target="198.18.$((128 + (idx / 250) % 64)).$((idx % 250 + 1))" args=(deny "$n" "$target")
        elif ((r < 50)); then kind=deny_cidr target="198.18.$((192 + (idx / 16) % 64)).$(((idx % 16) * 16))/28" args=(deny "$n" "$target")
        elif ((r < 56)); then kind=deny_domain target="x$idx.deny.test" args=(deny "$n" "$target")
        elif ((r < 60)); then kind=allow_deny_ip target="198.18.100.$((idx % 250 + 1))" args=(allow "$n" "$target")
        elif ((r < 70)); then kind=up target=- args=(up "$n")
        elif ((r < 76)); then kind=down target=- args=(down "$n")
        elif ((r < 79)); then kind=down_all target=- args=(down "$n" --all)
        elif ((r < 85)); then kind=block target=- args=(block "$n")
        else kind=reset target=- args=(reset "$n")
        fi
        s=${EPOCHREALTIME/./}
        rc=0
        # A watchdog records what an operation still running after 20 s waits on.
        (sleep 20 && hang_report "$c-$j $kind $n") &
        wd=$!
        AS_USER_TIMEOUT=60 as_user "$BIN" "${args[@]}" >"$WORK/log/op-$c.out" 2>"$WORK/log/op-$c.err" || rc=$?
        kill "$wd" 2>/dev/null || true # (gone already after a report)
        wait "$wd" 2>/dev/null || true
        e=${EPOCHREALTIME/./}
        echo "$kind $n $target $rc $(((e - s) / 1000)) $((SECONDS - LOAD_T0))" >>"$WORK/log/ops-$c.txt"
        if ((rc != 0)); then
            printf '%s %s %s rc=%s: %s\n' "$kind" "$n" "$target" "$rc" "$(tr '\n' ' ' <"$WORK/log/op-$c.err")" >>"$WORK/log/op-errors.txt"
        fi
        if [ "$kind" = allow_deny_ip ] && ((rc == 0)); then
            # ... and deny it again at once (another client may act on the same container)
            s=${EPOCHREALTIME/./}
            rc=0
            AS_USER_TIMEOUT=60 as_user "$BIN" deny "$n" "$target" >"$WORK/log/op-$c.out" 2>"$WORK/log/op-$c.err" || rc=$?
            e=${EPOCHREALTIME/./}
            echo "deny_allowed_ip $n $target $rc $(((e - s) / 1000)) $((SECONDS - LOAD_T0))" >>"$WORK/log/ops-$c.txt"
            ((rc == 0)) || printf 'deny_allowed_ip %s %s rc=%s: %s\n' "$n" "$target" "$rc" "$(tr '\n' ' ' <"$WORK/log/op-$c.err")" >>"$WORK/log/op-errors.txt"
            j=$((j + 1))
        fi
        sleep "$(awk -v m="$pace_ms" -v r="$RANDOM" 'BEGIN { printf "%.3f", m * (0.5 + r / 32767) / 1000 }')"
    done
}
# Nine tenths of the operations during the load, the rest after it, when only the live
# commands write the audit logs (their records must respect the cap too).
OPS_LATE=$((OPS / 10))
OPS_EARLY=$((OPS - OPS_LATE))
OPS_WINDOW=$((LOAD_END - SECONDS - 5))
((OPS_WINDOW < 5)) && OPS_WINDOW=5
# run_clients PHASE OPS PACE_MS: OPS operations from CLIENTS clients at once.
run_clients() {
    local phase=$1 total=$2 pace=$3 per left c n_ops pids=()
    per=$(((total + CLIENTS - 1) / CLIENTS))
    left=$total
    for ((c = 1; c <= CLIENTS; c++)); do
        n_ops=$((left < per ? left : per))
        left=$((left - n_ops))
        client "$((phase * 100 + c))" "$n_ops" "$pace" &
        pids+=($!)
        BG_PIDS+=($!)
    done
    for c in "${pids[@]}"; do wait "$c" || true; done
}
PACE_MS=$((OPS_WINDOW * 1000 * CLIENTS / (OPS_EARLY > 0 ? OPS_EARLY : 1) - 100))
((PACE_MS < 0)) && PACE_MS=0
say "$OPS_EARLY live operations from $CLIENTS clients over ~$OPS_WINDOW s"
run_clients 1 "$OPS_EARLY" "$PACE_MS"
say "live operations under load done"

# --- end of load ---------------------------------------------------------------------------
while ((SECONDS < LOAD_END + 5)); do sleep 1; done
for ((k = 1; k <= 30; k++)); do
    missing=0
    for n in "${NAMES[@]}"; do
        as_user podman logs "$n" 2>/dev/null | grep -q '^SOAK-COUNTS' || missing=$((missing + 1))
    done
    ((missing == 0)) && break
    sleep 2
done
say "$OPS_LATE live operations from $CLIENTS clients after the load"
run_clients 2 "$OPS_LATE" 0
# Let the resolvers and event writers go idle, then the end sample.
sleep 5
sample end
read -r Z_ALL_END Z_MINE_END < <(zombies)
say "end sample taken"

# --- checks --------------------------------------------------------------------------------
# From here on every check runs and reports; none aborts the script.
set +e
FAILS=()
fail() { FAILS+=("$*"); say "FAIL: $*"; }

# Live operations.
cat "$WORK"/log/ops-*.txt >"$WORK/log/ops.txt"
: >>"$WORK/log/op-errors.txt"
# Every target is valid and no allow meets a deny of its own, so the tool has nothing to
# refuse: any non-zero exit (an error, a timeout, a crash) is a failure.
OP_FAILS=0
while read -r kind n target rc ms; do
    ((rc == 0)) && continue
    OP_FAILS=$((OP_FAILS + 1))
done <"$WORK/log/ops.txt"
DONE_OPS=$(awk '$1 != "deny_allowed_ip"' "$WORK/log/ops.txt" | wc -l)
# (an allow_deny_ip counts as two of the OPS)
DONE_OPS=$((DONE_OPS + $(grep -c '^deny_allowed_ip ' "$WORK/log/ops.txt" || true)))
((DONE_OPS >= OPS)) || fail "only $DONE_OPS of $OPS live operations ran (a client died; see $KEEP)"
((OP_FAILS == 0)) || fail "$OP_FAILS live operations failed: $(sort "$WORK/log/op-errors.txt" | cut -c1-300 | head -5 | tr '\n' '|')"

# Kernel table = state.json, per container; and no lost update.
STATUS_BAD=0
LOST=0
for n in "${NAMES[@]}"; do
    rc=0
    as_user "$BIN" status "$n" --json >"$WORK/log/status-$n.json" 2>"$WORK/log/status-$n.err" || rc=$?
    st=$(sed -n 's/.*"state":"\([a-z_]*\)".*/\1/p' "$WORK/log/status-$n.json")
    want=$(sed -n 's/.*"configured_mode":"\([a-z_]*\)".*/\1/p' "$WORK/log/status-$n.json")
    if ((rc != 0)) || [ -z "$st" ] || [ "$st" != "$want" ]; then
        STATUS_BAD=$((STATUS_BAD + 1))
        fail "$n: status says '$st' (configured '$want', exit $rc): $(cut -c1-400 "$WORK/log/status-$n.json" "$WORK/log/status-$n.err" | tr '\n' ' ')"
    fi
    # Every successful allow/deny of a unique target is in state.json.
    state=$(cat "$(bundle "$n")/state.json")
    while read -r kind c target rc ms; do
        [ "$c" = "$n" ] && ((rc == 0)) || continue
        case $kind in
            allow_ip | allow_cidr | allow_domain | deny_ip | deny_cidr | deny_domain)
                if [[ $state != *"\"$target\""* ]]; then
                    LOST=$((LOST + 1))
                    fail "$n: $kind $target succeeded but is not in state.json (lost update)"
                fi ;;
        esac
    done <"$WORK/log/ops.txt"
done

# Resolvers: same process, RSS within 10% of settled, descriptors not grown. "Settled" is the
# highest sample from the end of the warm-up to the middle of the load: a resolver under a
# DNS flood swings by a factor of two (learned.jsonl compaction reads the file whole), and a
# leak is growth beyond the swing the same load already showed.
K_MID=$(((LOAD_SECONDS / 2 - WARMUP) / SAMPLE_EVERY))
for ((k = 1; k <= K_MID; k++)); do
    [ -f "$WORK/log/sample-p$k.txt" ] && cat "$WORK/log/sample-p$k.txt"
done | cat "$WORK/log/sample-settled.txt" - | awk '
    { if (!($1 in rss) || $3 > rss[$1]) rss[$1] = $3; if (!($1 in fds) || $4 > fds[$1]) fds[$1] = $4; pid[$1] = $2 }
    END { for (n in rss) print n, pid[n], rss[n], fds[n] }' | sort -t- -k2 -n >"$WORK/log/sample-settled-max.txt"
RSS_BAD=0 FD_BAD=0
while read -r n pid rss fds; do
    read -r _ pid2 rss2 fds2 < <(grep "^$n " "$WORK/log/sample-end.txt")
    if [ "$pid2" != "$pid" ] || [ ! -d "/proc/$pid" ]; then
        fail "$n: resolver $pid is gone (now $pid2)"
        continue
    fi
    if ((rss2 * 10 > rss * 11)); then
        RSS_BAD=$((RSS_BAD + 1))
        fail "$n: resolver RSS grew from $rss to $rss2 KiB (more than 10%)"
    fi
    if ((fds2 > fds)); then
        FD_BAD=$((FD_BAD + 1))
        fail "$n: resolver open descriptors grew from $fds to $fds2"
    fi
done <"$WORK/log/sample-settled-max.txt"

((Z_MINE_END <= Z_MINE_SETTLED && Z_MINE_END == 0)) || fail "zombies of ours: $Z_MINE_END (at settle: $Z_MINE_SETTLED)"

AUDIT_MAX=0 AUDIT_ROTATED=0 AUDIT_BAD=0
for n in "${NAMES[@]}"; do
    for f in "$(bundle "$n")/audit.jsonl" "$(bundle "$n")/audit.jsonl.1"; do
        [ -f "$f" ] || continue
        sz=$(stat -c %s "$f")
        ((sz > AUDIT_MAX)) && AUDIT_MAX=$sz
        [[ $f == *.1 ]] && AUDIT_ROTATED=$((AUDIT_ROTATED + 1))
        if ((sz > AUDIT_CAP)); then
            AUDIT_BAD=$((AUDIT_BAD + 1))
            fail "$n: $(basename "$f") is $sz bytes, over the cap of $AUDIT_CAP"
        fi
    done
done

# --- figures -------------------------------------------------------------------------------
# Workload counts.
Q=0 A=0 TCP=0 UDP=0 COUNTED=0
for n in "${NAMES[@]}"; do
    line=$(as_user podman logs "$n" 2>/dev/null | grep '^SOAK-COUNTS' | tail -1 || true)
    [ -n "$line" ] || { fail "$n: the workload printed no counts"; continue; }
    COUNTED=$((COUNTED + 1))
    for kv in ${line#SOAK-COUNTS }; do
        v=${kv#*=}
        case ${kv%%=*} in queries) Q=$((Q + v)) ;; answered) A=$((A + v)) ;; tcp) TCP=$((TCP + v)) ;; udp) UDP=$((UDP + v)) ;; esac
    done
done
# dns_blast rounds: qps=.. ok=.. other=.. lost=..
read -r B_ROUNDS B_OK B_OTHER B_LOST B_QPS < <(cat "$WORK"/log/blast-*.txt 2>/dev/null | awk '
    /qps=/ { n++; for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] += kv[2] } }
    END { printf "%d %d %d %d %d\n", n, v["ok"], v["other"], v["lost"], n ? v["qps"] / n : 0 }')
# Refused packets the event writers logged (what the audit logs still hold after rotation).
LOGGED=$(cat "$WORK"/state/containers/*/audit.jsonl.1 "$WORK"/state/containers/*/audit.jsonl 2>/dev/null |
    grep '"event":"blocked"' | sed -n 's/.*"count":\([0-9]*\).*/\1/p' | awk '{ s += $1 } END { print s + 0 }')
DROPPED=$(cat "$WORK"/state/containers/*/audit.jsonl.1 "$WORK"/state/containers/*/audit.jsonl 2>/dev/null |
    grep '"event":"events_dropped"' | sed -n 's/.*"count":\([0-9]*\).*/\1/p' | awk '{ s += $1 } END { print s + 0 }')
MAXRSS=$(cat "$WORK"/log/sample-*.txt | awk '$3 > m { m = $3 } END { print m + 0 }')

pct() { # p50/p90 of column 5 in ms
    awk '{ print $5 }' | sort -n | awk '{ v[NR] = $1 } END { if (!NR) { print "- -"; exit }
        p50 = v[int(NR * 0.5 + 0.999999)]; p90 = v[int(NR * 0.9 + 0.999999)]; printf "%d %d\n", p50, p90 }'
}
{
    echo
    echo "## terok-shield soak, $(date -u +%Y-%m-%d) ($([ "$SHORT" = yes ] && echo short || echo full))"
    echo
    echo "$(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), $("$BIN" --version), $(podman --version), kernel $(uname -r)"
    echo "command: \`$([ "$SHORT" = yes ] && echo "scripts/soak.sh --short" || echo "scripts/soak.sh")\` (CONTAINERS=$CONTAINERS OPS=$OPS CLIENTS=$CLIENTS LOAD_SECONDS=$LOAD_SECONDS BLASTED=$BLASTED SEED=$SEED)"
    echo
    echo "| figure | value |"
    echo "| --- | --- |"
    echo "| containers started at once | $((CONTAINERS - START_FAIL)) of $CONTAINERS in $START_SECONDS s |"
    echo "| live operations | $(wc -l <"$WORK/log/ops.txt") ($CLIENTS clients), $OP_FAILS failed |"
    read -r p50 p90 < <(pct <"$WORK/log/ops.txt")
    echo "| op latency, all (p50 / p90) | $p50 / $p90 ms |"
    echo "| workload DNS questions (answered) | $Q ($A) |"
    echo "| dns_blast rounds: answers ok / refused or other / lost, mean q/s | $B_ROUNDS: $B_OK / $B_OTHER / $B_LOST, $B_QPS |"
    echo "| refused packets sent by workloads (TCP + UDP) | $((TCP + UDP)) ($TCP + $UDP) |"
    echo "| refused packets in the retained audit logs (+ counted as dropped) | $LOGGED (+ $DROPPED) |"
    echo "| resolver RSS after warm-up / settled (highest to mid-load) / end, mean over containers | $(awk '{ s += $3 } END { printf "%d", s / NR }' "$WORK/log/sample-settled.txt") / $(awk '{ s += $3 } END { printf "%d", s / NR }' "$WORK/log/sample-settled-max.txt") / $(awk '{ s += $3 } END { printf "%d", s / NR }' "$WORK/log/sample-end.txt") KiB (highest sample of any: $MAXRSS KiB) |"
    echo "| resolver RSS end vs settled, worst container | $(sort -t- -k2 -n "$WORK/log/sample-end.txt" | paste "$WORK/log/sample-settled-max.txt" - | awk '{ d = ($7 - $3) * 100 / $3; if (NR == 1 || d > m) m = d } END { printf "%+.1f%%", m }') (limit +10%) |"
    echo "| resolver open fds settled / end (sum) | $(awk '{ s += $4 } END { print s }' "$WORK/log/sample-settled-max.txt") / $(awk '{ s += $4 } END { print s }' "$WORK/log/sample-end.txt") |"
    echo "| zombies on the machine settled / end (ours) | $Z_ALL_SETTLED / $Z_ALL_END ($Z_MINE_SETTLED / $Z_MINE_END) |"
    echo "| audit logs: largest file / cap, rotated logs | $AUDIT_MAX / $AUDIT_CAP bytes, $AUDIT_ROTATED of $CONTAINERS |"
    echo "| status (kernel table = state.json) | $((CONTAINERS - STATUS_BAD)) of $CONTAINERS agree |"
    echo "| lost updates | $LOST |"
    echo
    echo "| operation | count | ok | failed | p50 ms | p90 ms |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: |"
    for kind in allow_ip allow_cidr allow_domain allow_deny_ip deny_allowed_ip deny_ip deny_cidr deny_domain up down down_all block reset; do
        grep "^$kind " "$WORK/log/ops.txt" >"$WORK/log/k.txt" || true
        [ -s "$WORK/log/k.txt" ] || continue
        read -r p50 p90 < <(pct <"$WORK/log/k.txt")
        echo "| $kind | $(wc -l <"$WORK/log/k.txt") | $(awk '$4 == 0' "$WORK/log/k.txt" | wc -l) | $(awk '$4 != 0' "$WORK/log/k.txt" | wc -l) | $p50 | $p90 |"
    done
    echo
    if ((${#FAILS[@]} == 0)); then
        echo "Result: every check passed."
    else
        echo "Result: ${#FAILS[@]} checks FAILED:"
        for f in "${FAILS[@]}"; do echo "- $f"; done
    fi
} | tee "$WORK/log/summary.md"
((${#FAILS[@]} == 0)) || exit 1
