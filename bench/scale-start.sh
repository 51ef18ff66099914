#!/bin/bash
# Start-up cost of a very large allowlist, measured in one run on this machine.
#
#   bench/scale-start.sh [ROUNDS]          (as root, after scripts/podman-env.sh; default 7)
#
# Alternating rounds (the order rotates every round, so drift hits every leg alike):
#   plain:    podman run --rm IMAGE true
#   small:    terok-shield run NAME --profiles bench-small -- --rm IMAGE true   (4 entries)
#   big:      terok-shield run NAME --profiles bench-scale -- --rm IMAGE true
#             (100,000 IPv4 + 100,000 IPv6 literal addresses, consecutive runs and
#             scattered addresses; the same layout as tests/e2e_scale.rs)
# all as the rootless test user, same image, release build. Reports medians, minima, maxima
# and the ratios of the medians against plain podman measured in the same run, plus the
# apply phases the big runs' createRuntime hook recorded in the audit log.
#
# No container touches the network: each runs `true`. The big profile's addresses are only
# listed: 198.18.0.0/15, class E 240.0.0.0/4 and 2001:db8::/32.
#
# Environment: E2E_USER (shieldtest), E2E_IMAGE (localhost/shield-test:latest),
# BENCH_BIN (use this binary instead of building target/release/terok-shield).
set -euo pipefail

ROUNDS=${1:-7}
E2E_USER=${E2E_USER:-shieldtest}
IMAGE=${E2E_IMAGE:-localhost/shield-test:latest}
NAME=bench-scale
WORK=/tmp/terok-shield-bench-scale

die() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }
say() { printf 'bench: %s\n' "$*" >&2; }

[ "$(id -u)" -eq 0 ] || die "run as root (podman runs as $E2E_USER through runuser)"
[[ "$ROUNDS" =~ ^[0-9]+$ ]] && [ "$ROUNDS" -ge 3 ] || die "ROUNDS must be a number >= 3"
id -u "$E2E_USER" >/dev/null 2>&1 || die "user $E2E_USER missing: run scripts/podman-env.sh first"
E2E_UID=$(id -u "$E2E_USER")
E2E_HOME=$(getent passwd "$E2E_USER" | cut -d: -f6)
REPO=$(cd "$(dirname "$0")/.." && pwd)

as_user() {
    (cd / && timeout 300 runuser -u "$E2E_USER" -- env -i HOME="$E2E_HOME" XDG_RUNTIME_DIR="/run/user/$E2E_UID" \
        PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@")
}
# Other e2e runs rewrite the test user's config.yml and load the machine: wait for them, and
# keep them waiting while we measure (the lock of tests/common/e2e/mod.rs).
exec 9>/run/terok-shield-e2e.lock
flock -n 9 || { say "waiting for another e2e run (/run/terok-shield-e2e.lock)"; flock 9; }
as_user podman image exists "$IMAGE" || die "image $IMAGE missing for $E2E_USER: run scripts/podman-env.sh first"

# --- binary --------------------------------------------------------------------------------
if [ -n "${BENCH_BIN:-}" ]; then
    SRC_BIN=$BENCH_BIN
else
    say "building the release binary (cargo build --release)"
    (cd "$REPO" && cargo build --release --quiet --bin terok-shield)
    SRC_BIN=$REPO/target/release/terok-shield
fi
mkdir -p "$WORK/bin" "$WORK/log"
chmod 755 "$WORK" "$WORK/bin"
install -m 755 "$SRC_BIN" "$WORK/bin/terok-shield.new"
mv -f "$WORK/bin/terok-shield.new" "$WORK/bin/terok-shield"
BIN=$WORK/bin/terok-shield
rm -f "$WORK/log/"*

# --- profiles (IP entries only: nothing to resolve) ----------------------------------------
PROFILES_DIR=$E2E_HOME/.config/terok/shield/profiles
SMALL_FILE=$PROFILES_DIR/bench-small.txt
BIG_FILE=$PROFILES_DIR/bench-scale.txt
for d in "$E2E_HOME/.config/terok" "$E2E_HOME/.config/terok/shield" "$PROFILES_DIR"; do
    [ -d "$d" ] || { mkdir -p "$d"; chown "$E2E_USER:" "$d"; }
done
printf '# bench/scale-start.sh\n198.51.100.10\n198.51.100.0/28:443/tcp\n2001:db8::10\n198.18.0.0/16\n' >"$SMALL_FILE"
# IPv4: 60,000 in runs of 250 (198.18.R.0-249), 40,000 scattered (odd addresses of
# 198.19.0.0/16, then of 240.0.0.0/16). IPv6: 50,000 in runs of 250 in 2001:db8:5ca1:1::/64,
# 50,000 scattered (every third address from 2001:db8::10). Families interleaved.
awk 'BEGIN {
    print "# bench/scale-start.sh: 100,000 IPv4 + 100,000 IPv6 addresses"
    for (i = 0; i < 100000; i++) {
        if (i < 60000) {
            printf "198.18.%d.%d\n", int(i / 250), i % 250
        } else {
            k = i - 60000
            if (k < 32768) printf "198.19.%d.%d\n", int(k / 128), 2 * (k % 128) + 1
            else { k -= 32768; printf "240.0.%d.%d\n", int(k / 128), 2 * (k % 128) + 1 }
        }
        if (i < 50000) {
            o = int(i / 250) * 256 + i % 250
            printf "2001:db8:5ca1:1::%x:%x\n", int(o / 65536), o % 65536
        } else {
            o = 16 + 3 * (i - 50000)
            printf "2001:db8::%x:%x\n", int(o / 65536), o % 65536
        }
    }
}' >"$BIG_FILE"
chown "$E2E_USER:" "$SMALL_FILE" "$BIG_FILE"
BIG_LINES=$(grep -vc '^#' "$BIG_FILE")
[ "$BIG_LINES" -eq 200000 ] || die "generated $BIG_LINES entries, expected 200000"
BUNDLE=$E2E_HOME/.local/state/terok/shield/containers/$NAME
cleanup_start() { as_user podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true; rm -rf "$BUNDLE"; }
# The first shielded run installs the user's OCI hooks; take them out again unless they were
# there before the bench.
HAD_HOOKS=no
[ -f "$E2E_HOME/.config/terok/shield/hooks.d/terok-shield-createRuntime.json" ] && HAD_HOOKS=yes
cleanup() {
    cleanup_start
    [ "$HAD_HOOKS" = no ] && as_user "$BIN" setup --remove --force >/dev/null 2>&1
    rm -f "$SMALL_FILE" "$BIG_FILE"
}
trap cleanup EXIT
cleanup_start

now_us() { echo $(( $(date +%s%N) / 1000 )); }

plain() {
    local s e
    s=$(now_us)
    as_user podman run --rm "$IMAGE" true >/dev/null 2>&1 || die "plain podman run failed"
    e=$(now_us)
    echo $((e - s))
}
shielded() { # PROFILE
    local s e
    s=$(now_us)
    as_user "$BIN" run "$NAME" --profiles "$1" -- --rm "$IMAGE" true >/dev/null 2>"$WORK/log/shielded.err" \
        || die "shielded run ($1) failed: $(cat "$WORK/log/shielded.err")"
    e=$(now_us)
    echo $((e - s))
}
leg() { # LEG
    case $1 in
        plain) plain >>"$WORK/log/plain.txt" ;;
        small) shielded bench-small >>"$WORK/log/small.txt" ;;
        big)
            shielded bench-scale >>"$WORK/log/big.txt"
            # The bundle goes with the container (--rm); keep the hook's apply record first.
            as_user "$BIN" logs --container "$NAME" -n 100000 2>/dev/null | grep '"event":"apply"' | tail -n 1 >>"$WORK/log/apply.txt" || true
            ;;
    esac
}

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
minimum() { sort -n | head -1; }
maximum() { sort -n | tail -1; }
ms() { awk -v us="$1" 'BEGIN { printf "%.1f", us / 1000 }'; }

# --- rounds --------------------------------------------------------------------------------
say "warm-up (1 round of each leg, not counted)"
for l in plain small big; do leg "$l" >/dev/null; done
: >"$WORK/log/plain.txt"
: >"$WORK/log/small.txt"
: >"$WORK/log/big.txt"
: >"$WORK/log/apply.txt"
say "$ROUNDS rotating rounds of plain / small / big"
LEGS=(plain small big)
for i in $(seq 0 $((ROUNDS - 1))); do
    for j in 0 1 2; do leg "${LEGS[$(((i + j) % 3))]}"; done
done
P_MED=$(median <"$WORK/log/plain.txt")
S_MED=$(median <"$WORK/log/small.txt")
B_MED=$(median <"$WORK/log/big.txt")
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
field() { grep -o "\"$1\":[0-9.]*" | cut -d: -f2 | awk '{ printf "%d\n", $1 * 1000 }'; }
A_N=$(wc -l <"$WORK/log/apply.txt")
A_GEN=$(field generate <"$WORK/log/apply.txt" | median)
A_LOAD=$(field load <"$WORK/log/apply.txt" | median)
A_VERIFY=$(field verify <"$WORK/log/apply.txt" | median)
A_DUMP=$(field dump <"$WORK/log/apply.txt" | median)
A_TX=$(grep -o '"transactions":[0-9]*' "$WORK/log/apply.txt" | head -1 | cut -d: -f2)
A_ELEMS=$(grep -o '"elements":[0-9]*' "$WORK/log/apply.txt" | head -1 | cut -d: -f2)
A_READS=$(grep -o '"reads":[0-9]*' "$WORK/log/apply.txt" | cut -d: -f2 | sort -n | uniq -c | awk '{ printf "%s%sx%s", sep, $1, $2; sep = " " }')

# --- summary -------------------------------------------------------------------------------
row() { printf '| %-46s | %11s | %11s | %11s |\n' "$1" "$2" "$3" "$4"; }
stats() { echo "$(ms "$(median <"$1")") ms|$(ms "$(minimum <"$1")") ms|$(ms "$(maximum <"$1")") ms"; }
echo
echo "terok-shield scale start-up benchmark: $ROUNDS rounds, $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "$(podman --version), $("$BIN" --version), kernel $(uname -r), image $IMAGE, user $E2E_USER"
echo
row "measure" "median" "min" "max"
row "----------------------------------------------" "-----------" "-----------" "-----------"
IFS='|' read -r a b c <<<"$(stats "$WORK/log/plain.txt")"
row "plain    podman run --rm IMAGE true" "$a" "$b" "$c"
IFS='|' read -r a b c <<<"$(stats "$WORK/log/small.txt")"
row "shielded, 4-entry profile" "$a" "$b" "$c"
IFS='|' read -r a b c <<<"$(stats "$WORK/log/big.txt")"
row "shielded, 100k IPv4 + 100k IPv6 profile" "$a" "$b" "$c"
row "ratio small / plain (medians)" "$(ratio "$S_MED" "$P_MED") x" "" ""
row "ratio big / plain (medians)" "$(ratio "$B_MED" "$P_MED") x" "" ""
row "ratio big / small (medians)" "$(ratio "$B_MED" "$S_MED") x" "" ""
row "big: hook apply generate (audit, median)" "$(ms "$A_GEN") ms" "" ""
row "big: hook apply load (audit, median)" "$(ms "$A_LOAD") ms" "" ""
row "big: hook apply verify (audit, median)" "$(ms "$A_VERIFY") ms" "" ""
row "big: of which the kernel's dump (audit, median)" "$(ms "$A_DUMP") ms" "" ""
echo
echo "big: $A_N apply records, $A_ELEMS elements in $A_TX transactions; read-backs per apply: $A_READS"
echo "(a read-back repeats when the kernel's listing of a freshly loaded hash set comes back torn)"
echo "Raw data in $WORK/log: plain.txt, small.txt, big.txt (microseconds), apply.txt (audit records)."
