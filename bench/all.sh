#!/bin/bash
# Every benchmark in one run, summed up in one Markdown table (the README's performance
# section is this table).
#
#   bench/all.sh            (as root, after scripts/podman-env.sh)
#
# Runs, in this order, each with its baseline measured in the same run:
#   bench/podman-start.sh   shielded vs plain `podman run --rm IMAGE true`; both hooks timed
#                           (wall, max RSS, and net of the timing wrapper around /bin/true)
#   bench/scale-start.sh    100,000 IPv4 + 100,000 IPv6 literal entries vs plain podman
#   bench/live-allow.sh     allow/deny on a running container, net of the runuser wrapper
#   bench/dns-latency.sh    the builtin resolver vs plain dnsmasq (--cache-size=0), at 1, 8
#                           and 32 questions in flight
# Every script's own report is kept in $OUT; the table follows on stdout.
#
# Network: only what the scripts do (loopback, and namespaces they create with the fake
# internet 198.18.0.0/15, 198.51.100.0/24, 2001:db8::/32). The e2e machine lock
# (/run/terok-shield-e2e.lock) is held while each script measures: scale-start.sh and
# live-allow.sh take it themselves, the others are run under it here.
#
# Environment: START_ROUNDS (15), SCALE_ROUNDS (5), LIVE_ROUNDS (30), DNS_ROUNDS (5),
# BENCH_BIN (a prebuilt binary instead of target/release/terok-shield), ONLY (a subset of
# "start scale live dns" to run; the others' reports of an earlier run in $OUT are reused).
set -euo pipefail

START_ROUNDS=${START_ROUNDS:-15}
SCALE_ROUNDS=${SCALE_ROUNDS:-5}
LIVE_ROUNDS=${LIVE_ROUNDS:-30}
DNS_ROUNDS=${DNS_ROUNDS:-5}
LOCK=/run/terok-shield-e2e.lock
OUT=/tmp/terok-shield-bench-all
REPO=$(cd "$(dirname "$0")/.." && pwd)

die() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }
say() { printf 'bench: %s\n' "$*" >&2; }
[ "$(id -u)" -eq 0 ] || die "run as root"

if [ -z "${BENCH_BIN:-}" ]; then
    say "building the release binary and the DNS load generator"
    (cd "$REPO" && cargo build --release --quiet --bin terok-shield --example dns_blast)
    BENCH_BIN=$REPO/target/release/terok-shield
fi
export BENCH_BIN
mkdir -p "$OUT"
ONLY=${ONLY:-start scale live dns}
wanted() { [[ " $ONLY " == *" $1 "* ]]; }
locked() { flock -w 1800 "$LOCK" "$@"; }

if wanted start; then
    say "podman-start ($START_ROUNDS rounds)"
    locked "$REPO/bench/podman-start.sh" "$START_ROUNDS" >"$OUT/podman-start.txt"
fi
if wanted scale; then
    say "scale-start ($SCALE_ROUNDS rounds)"
    "$REPO/bench/scale-start.sh" "$SCALE_ROUNDS" >"$OUT/scale-start.txt"
fi
if wanted live; then
    say "live-allow ($LIVE_ROUNDS rounds)"
    "$REPO/bench/live-allow.sh" "$LIVE_ROUNDS" >"$OUT/live-allow.txt"
fi
if wanted dns; then
    for w in 1 8 32; do
        say "dns-latency ($w in flight, $DNS_ROUNDS rounds)"
        locked env WINDOW="$w" ROUNDS="$DNS_ROUNDS" BIN="$BENCH_BIN" "$REPO/bench/dns-latency.sh" >"$OUT/dns-$w.txt"
    done
fi

# --- extraction ----------------------------------------------------------------------------
# Column N (1-based, after the leading "|") of the first table row starting with LABEL.
cell() { grep -F "| $2" "$1" | head -1 | awk -F'|' -v c="$3" '{ gsub(/^ +| +$/, "", $(c + 1)); print $(c + 1) }'; }
num() { grep -oE '[0-9]+(\.[0-9]+)?' | head -1; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "?" }'; }
le() { awk -v a="$1" -v b="$2" 'BEGIN { print (a <= b) ? "yes" : "**no**" }'; }
ge() { awk -v a="$1" -v b="$2" 'BEGIN { print (a >= b) ? "yes" : "**no**" }'; }

S=$OUT/podman-start.txt
P_MS=$(cell "$S" "plain    podman run" 2 | num)
SH_MS=$(cell "$S" "shielded terok-shield run" 2 | num)
H_MS=$(cell "$S" "createRuntime hook: wall time" 2 | num)
H_NET=$(cell "$S" "createRuntime hook: net of the wrapper" 2 | num)
H_RSS=$(cell "$S" "createRuntime hook: max RSS" 2 | num)
PS_MS=$(cell "$S" "poststop hook: wall time" 2 | num)
PS_NET=$(cell "$S" "poststop hook: net of the wrapper" 2 | num)
PS_RSS=$(cell "$S" "poststop hook: max RSS" 2 | num)
W_MS=$(cell "$S" "timing wrapper around /bin/true" 2 | num)
LOAD_MS=$(cell "$S" "hook apply phases (audit): load" 2 | num)
VERIFY_MS=$(cell "$S" "hook apply phases (audit): verify" 2 | num)

C=$OUT/scale-start.txt
SC_P=$(cell "$C" "plain    podman run" 2 | num)
SC_B=$(cell "$C" "shielded, 100k IPv4 + 100k IPv6 profile" 2 | num)
SC_LOAD=$(cell "$C" "big: hook apply load" 2 | num)
SC_VERIFY=$(cell "$C" "big: hook apply verify" 2 | num)
SC_DUMP=$(cell "$C" "big: of which the kernel's dump" 2 | num)
# The kernel's part alone (inserting the elements, dumping them back for the verification)
# against what 1.5 x plain podman leaves over plain podman.
SC_FLOOR=$(awk -v a="$SC_LOAD" -v b="$SC_DUMP" 'BEGIN { printf "%.1f", a + b }')
SC_BUDGET=$(awk -v p="$SC_P" 'BEGIN { printf "%.1f", p * 0.5 }')

L=$OUT/live-allow.txt
L_W=$(cell "$L" "/bin/true via runuser wrapper" 2 | num)
live_net() { awk -v a="$(cell "$L" "$1" 2 | num)" -v b="$L_W" 'BEGIN { printf "%.2f", a - b }'; }
A_IP=$(live_net "terok-shield allow NAME <fresh IP>")
A_DOM=$(live_net "terok-shield allow NAME <fresh domain>")
D_IP=$(live_net "terok-shield deny NAME <IP>")
D_CIDR=$(live_net "terok-shield deny NAME <CIDR>")
D_DOM=$(live_net "terok-shield deny NAME <domain>")
# The kernel's floor of a deletion, measured with nft itself in the same run.
NFT_ADD=$(cell "$L" "kernel floor: nft add element" 2 | num)
NFT_DEL=$(cell "$L" "kernel floor: nft delete element" 2 | num)
NFT_DEL_EXTRA=$(awk -v a="$NFT_DEL" -v b="$NFT_ADD" 'BEGIN { printf "%.2f", a - b }')

# Throughput rows are the last "| ours" / "| dnsmasq " rows; the latency row is the first.
qps() { grep -F "| $2" "$1" | tail -1 | awk -F'|' '{ gsub(/ /, "", $3); print $3 }'; }
added() { grep -F "| $2" "$1" | head -1 | awk -F'|' '{ gsub(/[ +]/, "", $5); print $5 }'; }
D1=$OUT/dns-1.txt D8=$OUT/dns-8.txt D32=$OUT/dns-32.txt
RSS_AFTER=$(grep -F "resolver memory (after the run)" "$D8" | grep -oE 'Rss [0-9]+' | num)
LAT_OURS=$(added "$D1" "ours " | num)
LAT_DNSMASQ=$(added "$D1" "dnsmasq " | num)
# Floors (bench/dns-latency.sh, one in flight): a bare forwarder, and one that puts each
# answer's address into the set before answering, as the shield's resolver must.
LAT_RELAY=$(added "$D1" "relay " | num)
LAT_RELAY_INS=$(added "$D1" "relay+insert " | num)

# --- the table -----------------------------------------------------------------------------
row() { printf '| %s | %s | %s | %s | %s | %s |\n' "$@"; }
echo
echo "terok-shield benchmarks, $(date -u +%Y-%m-%d), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), $("$BENCH_BIN" --version), kernel $(uname -r)"
echo
row "figure" "measured" "baseline (same run)" "ratio" "target" "met?"
row "---" "---:" "---:" "---:" "---" "---"
R=$(ratio "$SH_MS" "$P_MS")
row "\`terok-shield run ... true\` (median of $START_ROUNDS)" "$SH_MS ms" "plain podman $P_MS ms" "$R x" "<= 1.05 x" "$(le "$R" 1.05)"
row "createRuntime hook, wall (net of timing wrapper)" "$H_MS ms ($H_NET ms)" "wrapper $W_MS ms" "" "<= 5 ms" "$(le "$H_NET" 5)"
row "hook firewall load + verify (audit)" "$LOAD_MS + $VERIFY_MS ms" "" "" "" ""
row "poststop hook, wall (net of timing wrapper)" "$PS_MS ms ($PS_NET ms)" "wrapper $W_MS ms" "" "<= 3 ms" "$(le "$PS_NET" 3)"
row "hook max RSS (createRuntime / poststop)" "$H_RSS / $PS_RSS KiB" "" "" "<= 5120 KiB" "$(le "$H_RSS" 5120)"
row "\`allow\` IP / domain, own time" "$A_IP / $A_DOM ms" "runuser wrapper $L_W ms" "" "<= 5 ms" "$(le "$(printf '%s\n%s\n' "$A_IP" "$A_DOM" | sort -n | tail -1)" 5)"
row "\`deny\` IP / CIDR / domain, own time" "$D_IP / $D_CIDR / $D_DOM ms" "runuser wrapper $L_W ms" "" "<= 10 ms" "$(le "$(printf '%s\n%s\n%s\n' "$D_IP" "$D_CIDR" "$D_DOM" | sort -n | tail -1)" 10)"
row "floor: nft add / delete element, wall (delete's extra)" "$NFT_ADD / $NFT_DEL ms ($NFT_DEL_EXTRA ms)" "" "" "" ""
for w in 1 8 32; do
    f=$OUT/dns-$w.txt
    o=$(qps "$f" "ours ")
    d=$(qps "$f" "dnsmasq ")
    R=$(ratio "$o" "$d")
    row "resolver throughput, $w in flight" "$o q/s" "dnsmasq $d q/s" "$R x" ">= 1.00 x" "$(ge "$R" 1.00)"
    if [ "$w" = 1 ]; then
        r=$(qps "$f" "relay ")
        ri=$(qps "$f" "relay+insert ")
        row "floor, 1 in flight: bare forwarder / + set insertion per answer" "$r / $ri q/s" "dnsmasq $d q/s" "$(ratio "$r" "$d") / $(ratio "$ri" "$d") x" "" ""
    fi
done
row "resolver added p50 latency" "$LAT_OURS ms" "dnsmasq $LAT_DNSMASQ ms" "" "<= 0.1 ms" "$(le "$LAT_OURS" 0.1)"
row "floor: added p50, bare forwarder / + set insertion per answer" "$LAT_RELAY / $LAT_RELAY_INS ms" "" "" "" ""
row "resolver RSS after load" "$RSS_AFTER KiB" "" "" "<= 4096 KiB" "$(le "$RSS_AFTER" 4096)"
R=$(ratio "$SC_B" "$SC_P")
row "100k+100k literal entries: start (median of $SCALE_ROUNDS)" "$SC_B ms" "plain podman $SC_P ms" "$R x" "<= 1.5 x" "$(le "$R" 1.5)"
row "100k+100k: hook load + verify (audit)" "$SC_LOAD + $SC_VERIFY ms" "" "" "" ""
row "floor: kernel insertion + dump of the 200,000 elements (hook load + verify's dump)" "$SC_LOAD + $SC_DUMP = $SC_FLOOR ms" "budget at 1.5 x: $SC_BUDGET ms" "" "" ""
echo
echo "Each script's full report: $OUT/*.txt"
