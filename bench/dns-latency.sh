#!/bin/bash
# Builtin DNS tier vs dnsmasq vs the upstream itself, side by side in one run.
#
#   bench/dns-latency.sh [QUERIES]        (as root; release build)
#
# Everything runs inside one throwaway network namespace (`tsbench-dnslat`), on loopback:
#   upstream  127.0.0.53:53  a tiny authoritative fake (python3) answering *.bench.test with A
#   ours      127.0.0.1:53   terok-shield's per-container resolver (builtin tier), with the
#                            shield's table loaded so learned addresses go into dns_v4
#   dnsmasq   127.0.0.2:53   dnsmasq forwarding to the same upstream (--cache-size=0, so both
#                            forward every question)
# Reported: p50/p90 added latency over asking the upstream directly (unique names, sequential,
# alternating), throughput with 8 concurrent clients, and the share of answers whose address
# was already in dns_v4 when the client received the answer (checked right after each reply).
set -euo pipefail
N=${1:-300}
NS=tsbench-dnslat
WORK=/tmp/terok-shield-dnslat
REPO=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }
command -v dnsmasq >/dev/null || { echo "dnsmasq missing: apt-get install dnsmasq-base" >&2; exit 1; }

PIDS=()
cleanup() {
    set +e
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

# BIN=/path/to/terok-shield compares another build (e.g. a saved "before" binary).
if [ -z "${BIN:-}" ]; then
    (cd "$REPO" && cargo build --release --quiet)
    BIN=$REPO/target/release/terok-shield
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

cat >"$WORK/upstream.py" <<'PY'
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.53", 53))
while True:
    q, peer = s.recvfrom(4096)
    if len(q) < 12: continue
    qid = q[:2]
    # question ends after the name (labels) + 4 bytes
    i = 12
    while i < len(q) and q[i] != 0: i += q[i] + 1
    qend = i + 5
    name = q[12:i]
    qtype = struct.unpack(">H", q[i+1:i+3])[0]
    h = abs(hash(name)) % 65000
    flags = b"\x81\x80"
    if qtype == 1:
        ans = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 300, 4) + bytes([198, 18, h >> 8, h & 255])
        resp = qid + flags + struct.pack(">HHHH", 1, 1, 0, 0) + q[12:qend] + ans
    else:
        resp = qid + flags + struct.pack(">HHHH", 1, 0, 0, 0) + q[12:qend]
    s.sendto(resp, peer)
PY
ip netns exec "$NS" python3 "$WORK/upstream.py" &
PIDS+=($!)
ip netns exec "$NS" "$BIN" internal-resolver "$WORK/state/containers/dnslat" dnslat 127.0.0.53 >/dev/null 2>"$WORK/resolver.log" &
RESOLVER=$! # `ip netns exec` execs the command: this is the resolver itself
PIDS+=($RESOLVER)
ip netns exec "$NS" dnsmasq --keep-in-foreground --no-resolv --no-hosts --server=127.0.0.53 \
    --listen-address=127.0.0.2 --bind-interfaces --port=53 --cache-size=0 --user=root --pid-file= 2>/dev/null &
PIDS+=($!)
sleep 0.5

cat >"$WORK/client.py" <<'PY'
import os, socket, struct, subprocess, sys, threading, time
N = int(sys.argv[1])
def query(server, name, qid):
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + struct.pack(">HH", 1, 1)
def ask(server, name, qid, sock):
    t = time.perf_counter()
    sock.sendto(query(server, name, qid), (server, 53))
    while True:
        data, _ = sock.recvfrom(4096)
        if data[:2] == struct.pack(">H", qid): break
    return (time.perf_counter() - t) * 1000, data
def addr_of(data):
    return ".".join(str(b) for b in data[-4:])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); sock.settimeout(3)
lat = {"upstream": [], "ours": [], "dnsmasq": []}
servers = {"upstream": "127.0.0.53", "ours": "127.0.0.1", "dnsmasq": "127.0.0.2"}
in_set = 0
for i in range(N):
    order = ["upstream", "ours", "dnsmasq"] if i % 2 == 0 else ["dnsmasq", "ours", "upstream"]
    for who in order:
        name = f"n{i}-{who}.bench.test"
        ms, data = ask(servers[who], name, (i * 3 + len(who)) & 0xffff, sock)
        lat[who].append(ms)
        if who == "ours":
            ip = addr_of(data)
            r = subprocess.run(["nft", "get", "element", "inet", "terok_shield", "dns_v4", "{ " + ip + " }"],
                               capture_output=True)
            in_set += r.returncode == 0
def pct(v, p): v = sorted(v); return v[min(len(v) - 1, int(len(v) * p))]
up50 = pct(lat["upstream"], 0.5)
print(f"| server   | p50 ms | p90 ms | added p50 over upstream |")
print(f"|----------|--------|--------|-------------------------|")
for who in ["upstream", "ours", "dnsmasq"]:
    print(f"| {who:8} | {pct(lat[who],0.5):6.3f} | {pct(lat[who],0.9):6.3f} | {pct(lat[who],0.5)-up50:+.3f} ms |")
print(f"\nanswers whose address was in dns_v4 when the client got them: {in_set}/{N} ({100*in_set/N:.1f}%)")
def blast(server, tag, per_thread=1000, threads=8):
    def worker(t):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
        for i in range(per_thread):
            try: ask(server, f"t{t}-{i}-{tag}.bench.test", (t * 1000 + i) & 0xffff, s)
            except socket.timeout: pass
    start = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    [t.start() for t in ts]; [t.join() for t in ts]
    return per_thread * threads / (time.perf_counter() - start)
# Three rounds, servers alternating, median reported: one short burst is at the mercy of
# whatever else the machine does.
rounds = {"ours": [], "dnsmasq": [], "upstream": []}
for r in range(3):
    for who in (["ours", "dnsmasq", "upstream"] if r % 2 == 0 else ["upstream", "dnsmasq", "ours"]):
        rounds[who].append(blast(servers[who], f"{who}{r}"))
print(f"\nthroughput, 8 concurrent clients x 1000 unique names, median of 3 rounds (all rounds):")
for who in ["ours", "dnsmasq", "upstream"]:
    v = sorted(rounds[who])
    print(f"  {who:8} {v[1]:8.0f} queries/s   ({', '.join(f'{x:.0f}' for x in rounds[who])})")
PY
echo "terok-shield DNS benchmark: $N queries per server, load average $(cut -d' ' -f1-3 /proc/loadavg)"
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
ip netns exec "$NS" python3 "$WORK/client.py" "$N"
mem "after the run"
