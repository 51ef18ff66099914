#!/bin/bash
# Builtin DNS tier vs dnsmasq (plain, and as the dnsmasq tier runs it) vs the upstream itself,
# side by side in one run.
#
#   bench/dns-latency.sh [QUERIES]        (as root; release build)
#   env: ROUNDS=5 (throughput rounds), BLAST_Q=8000 (questions per round), WINDOW=8 (in
#        flight), PIN=1 (servers on CPU 1, upstream and load generator on CPU 0; PIN=0: no
#        pinning), BIN=/path/to/terok-shield (compare another build, e.g. a saved "before")
#
# Everything runs inside one throwaway network namespace (`tsbench-dnslat`), on loopback:
#   upstream        127.0.0.53:53  fake authoritative server (examples/dns_blast.rs `upstream`):
#                                  *.bench.test A -> a new 198.18.0.0/15 address per answer
#   ours            127.0.0.1:53   terok-shield's per-container resolver (builtin tier), with the
#                                  shield's table loaded so learned addresses go into dns_v4
#   dnsmasq         127.0.0.2:53   plain dnsmasq forwarding to the same upstream (--cache-size=0,
#                                  so it forwards every question, as ours does)
#   dnsmasq+nftset  127.0.0.3:53   dnsmasq as the dnsmasq tier runs it (src/core/dnsmasq.rs
#                                  `arguments()`): --nftset into dns_v4/dns_v6, --no-negcache,
#                                  fixed --query-port, --cache-size=0
#   relay           127.0.0.5:53   the floor of any forwarder (examples/dns_blast.rs `relay`):
#                                  one blocking loop, no parsing, no policy
#   relay+insert    127.0.0.6:53   the same, putting each answer's address into dns_v4 (one
#                                  nf_tables transaction, ack awaited) before answering: the
#                                  floor of a forwarder that keeps the shield's promise
# The load generator is examples/dns_blast.rs (batched recvmmsg/sendmmsg, one thread; the
# Python client used before set the pace itself). Reported:
#   - p50/p90 added latency over asking the upstream directly (unique names, sequential,
#     servers alternating);
#   - the share of answers whose address was already in dns_v4 when the client received the
#     answer, checked over netlink (NFT_MSG_GETSETELEM) microseconds after the answer arrived,
#     sequentially and under load (every answer of a WINDOW-in-flight blast). Every upstream
#     answer carries an address no earlier answer had and the set is flushed first, so a hit
#     can only come from inserting this very answer;
#   - throughput: closed loop with WINDOW questions in flight, BLAST_Q unique names per round,
#     ROUNDS rounds with the servers' order rotating, the set flushed before each; median
#     and min-max. "upstream" is the same loop against the fake upstream alone: the ceiling
#     of the harness itself;
#   - the resolver's memory (smaps_rollup) idle and after the run.
set -euo pipefail
N=${1:-300}
NS=tsbench-dnslat
WORK=/tmp/terok-shield-dnslat
REPO=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }
command -v dnsmasq >/dev/null || { echo "dnsmasq missing: apt-get install dnsmasq-base" >&2; exit 1; }

PIDS=()
# `prepare` as root installs the shield's OCI hooks system-wide (/etc/containers/oci/hooks.d);
# the benchmark only needs the bundle, so it takes out again what it installed (never hooks
# that were there before it ran).
SYSTEM_HOOK=/etc/containers/oci/hooks.d/terok-shield-createRuntime.json
HOOKS_BEFORE=$([ -e "$SYSTEM_HOOK" ] && echo yes || echo no)
cleanup() {
    set +e
    if [ "$HOOKS_BEFORE" = no ] && [ -e "$SYSTEM_HOOK" ] && [ -n "${BIN:-}" ]; then
        "$BIN" setup --remove --force >/dev/null 2>&1 \
            || echo "bench: could not take out the OCI hooks it installed: run terok-shield setup --remove" >&2
    fi
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    # Leftovers of an interrupted earlier run: only processes inside our own throwaway netns,
    # by PID (never by name: other resolvers on this machine are none of our business).
    if ip netns list | grep -qw "$NS"; then
        for p in $(ip netns pids "$NS" 2>/dev/null); do kill "$p" 2>/dev/null; done
        sleep 0.2
        for p in $(ip netns pids "$NS" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
    fi
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
cleanup
mkdir -p "$WORK/config/profiles"

N_ROUNDS=${ROUNDS:-5}
BLAST_Q=${BLAST_Q:-8000}
WINDOW=${WINDOW:-8}
(cd "$REPO" && cargo build --release --quiet --example dns_blast)
BLAST=$REPO/target/release/examples/dns_blast
if [ -z "${BIN:-}" ]; then
    (cd "$REPO" && cargo build --release --quiet)
    BIN=$REPO/target/release/terok-shield
fi
# Servers on CPU 1, upstream and load generator on CPU 0: each server gets a core of its own,
# as it would under a real workload, and the harness never steals its cycles.
if [ "${PIN:-1}" = 1 ] && [ "$(nproc)" -ge 2 ]; then
    SRV="taskset -c 1" GEN="taskset -c 0"
else
    SRV="" GEN=""
fi
printf '*.bench.test\n' >"$WORK/config/profiles/bench.txt"
printf 'upstream_dns: 127.0.0.53\ndns:\n  tier: builtin\n  min_ttl: 60\n  max_ttl: 3600\n' >"$WORK/config/config.yml"
export TEROK_SHIELD_CONFIG_DIR=$WORK/config TEROK_SHIELD_STATE_DIR=$WORK/state
"$BIN" prepare dnslat --profiles bench >/dev/null 2>&1

ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" addr add 127.0.0.53/8 dev lo 2>/dev/null || true
# The shield's table (policy drop, loopback accepted) so the resolver has its sets.
"$BIN" preview --profiles bench 2>/dev/null | ip netns exec "$NS" nft -f -

ip netns exec "$NS" $GEN "$BLAST" upstream 127.0.0.53:53 &
PIDS+=($!)
ip netns exec "$NS" $SRV "$BIN" internal-resolver "$WORK/state/containers/dnslat" dnslat 127.0.0.53 >/dev/null 2>"$WORK/resolver.log" &
RESOLVER=$! # `ip netns exec` and taskset exec the command: this is the resolver itself
PIDS+=($RESOLVER)
ip netns exec "$NS" $SRV dnsmasq --keep-in-foreground --no-resolv --no-hosts --server=127.0.0.53 \
    --listen-address=127.0.0.2 --bind-interfaces --port=53 --cache-size=0 --user=root --pid-file= 2>/dev/null &
PIDS+=($!)
# As the dnsmasq tier runs it (src/core/dnsmasq.rs `arguments()`), listening on 127.0.0.3.
ip netns exec "$NS" $SRV dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts \
    --no-poll --bind-interfaces --listen-address=127.0.0.3 --port=53 --cache-size=0 --no-negcache \
    --user=root --pid-file= --log-facility=- --query-port=53053 --server=127.0.0.53 \
    --nftset=/#/4#inet#terok_shield#dns_v4,6#inet#terok_shield#dns_v6 2>"$WORK/dnsmasq-nftset.log" &
PIDS+=($!)
ip netns exec "$NS" $SRV "$BLAST" relay 127.0.0.5:53 127.0.0.53:53 &
PIDS+=($!)
ip netns exec "$NS" $SRV "$BLAST" relay 127.0.0.6:53 127.0.0.53:53 dns_v4 &
PIDS+=($!)
sleep 0.5

flush() { ip netns exec "$NS" nft flush set inet terok_shield dns_v4; }
blast() { ip netns exec "$NS" $GEN "$BLAST" blast "$@"; }
echo "terok-shield DNS benchmark: $N sequential questions per server, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "pinning: ${SRV:-none} for the servers, ${GEN:-none} for upstream and load generator"
# Memory of the resolver, from /proc/PID/smaps_rollup (kB): Rss = resident pages (file-backed
# code/data of the binary and libc + anonymous heap/stacks); Pss shares each page among the
# processes mapping it (the fair per-container cost: the binary's text is shared by every
# container's resolver); Anonymous = private memory this resolver alone costs.
mem() {
    local f=/proc/$RESOLVER/smaps_rollup
    [ -r "$f" ] || { echo "resolver memory ($1): ? (process gone)"; return; }
    awk -v when="$1" -v thr="$(awk '/^Threads:/{print $2}' /proc/$RESOLVER/status)" '
        /^Rss:/{r=$2} /^Pss:/{p=$2} /^Pss_Anon:/{pa=$2} /^Pss_File:/{pf=$2} /^Anonymous:/{a=$2}
        END{printf "resolver memory (%s): Rss %d KiB (anon %d + file %d), Pss %d KiB (anon %d + file %d), %d threads\n",
                   when, r, a, r-a, p, pa, pf, thr}' "$f"
}
echo
mem "idle, before the run"
echo
flush
ip netns exec "$NS" $GEN "$BLAST" latency "$N" dns_v4 upstream=127.0.0.53:53 ours=127.0.0.1:53+ \
    dnsmasq=127.0.0.2:53 dnsmasq+nftset=127.0.0.3:53+ relay=127.0.0.5:53 relay+insert=127.0.0.6:53+

echo
echo "answers in dns_v4 on arrival under load ($BLAST_Q questions, $WINDOW in flight, every answer checked):"
for who in ours:127.0.0.1 dnsmasq+nftset:127.0.0.3; do
    flush
    printf '  %-15s %s\n' "${who%%:*}" "$(blast "${who#*:}:53" "$BLAST_Q" "$WINDOW" "chk${who%%:*}" dns_v4)"
done

declare -A QPS
SERVERS=(upstream:127.0.0.53 ours:127.0.0.1 dnsmasq:127.0.0.2 dnsmasq+nftset:127.0.0.3)
# The relays answer one question at a time: a floor for one in flight only.
[ "$WINDOW" -eq 1 ] && SERVERS+=(relay:127.0.0.5 relay+insert:127.0.0.6)
echo
echo "throughput rounds ($BLAST_Q unique names, $WINDOW in flight; order rotates per round):"
for ((r = 0; r < N_ROUNDS; r++)); do
    for ((k = 0; k < ${#SERVERS[@]}; k++)); do
        who=${SERVERS[$(((k + r) % ${#SERVERS[@]}))]}
        flush
        out=$(blast "${who#*:}:53" "$BLAST_Q" "$WINDOW" "r$r${who%%:*}")
        printf '  round %d %-15s %s\n' "$r" "${who%%:*}" "$out"
        q=${out#qps=}
        QPS[${who%%:*}]+="${q%% *} "
    done
done
echo
echo "| server         | median q/s | min-max q/s     | rounds"
echo "|----------------|------------|-----------------|-------"
for who in "${SERVERS[@]}"; do
    name=${who%%:*}
    # shellcheck disable=SC2086
    sorted=$(printf '%s\n' ${QPS[$name]} | sort -n)
    n=$(wc -l <<<"$sorted")
    printf '| %-14s | %10s | %7s-%-7s | %s\n' "$name" "$(sed -n "$(((n + 1) / 2))p" <<<"$sorted")" \
        "$(head -1 <<<"$sorted")" "$(tail -1 <<<"$sorted")" "${QPS[$name]}"
done
echo
mem "after the run"
