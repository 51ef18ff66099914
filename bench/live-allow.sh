#!/bin/bash
# Cost of live control on one running shielded container, measured in one run on this machine.
#
#   bench/live-allow.sh [ROUNDS]          (as root, after scripts/podman-env.sh; default 50)
#
# One detached shielded container (`sleep`), release build, the rootless test user. Each
# round, interleaved so drift hits every row alike, times (wall clock, bash EPOCHREALTIME):
#   /bin/true                       spawned directly by this script (fork + exec)
#   wrapper /bin/true               the same through the runuser/env wrapper every row below uses
#   terok-shield --version          process start-up of the binary, nothing else
#   terok-shield allow NAME IP      a fresh address each round (198.19.0.0/16)
#   terok-shield allow NAME DOMAIN  a fresh name each round, resolved through a fake DNS server
#   terok-shield deny NAME IP       the address allowed earlier in the round (adds a conntrack cut)
#   terok-shield deny NAME CIDR     a fresh /24 of 198.19.128.0/17 each round
#   terok-shield deny NAME DOMAIN   the name allowed earlier in the round
#   nft add / delete element        the kernel's floor, with nft itself (as root, no wrapper) on
#                                   a scratch table in the namespace `tsbench-floor`: one address
#                                   added to, then deleted from, an interval set like the
#                                   shield's allow sets. A deletion costs more than an addition
#                                   at any loader: the kernel frees deleted elements after an RCU
#                                   grace period, and the netlink socket's release waits for it.
# and prints median, p90, min and max of each row.
#
# Network: the fake DNS server (a few lines of perl) answers on 198.18.254.2:53 inside the
# network namespace `tsbench-dns`, reached from the host over the veth `tsbench-host`
# (198.18.254.1/30). It knows only `d<N>.bench.test` (A 198.18.200+N/250.N%250+1). Nothing
# else is contacted: the container sends no packets, and every allowed address lies in
# 198.18.0.0/15, which exists only on this machine. The script holds the e2e tests' machine
# lock (/run/terok-shield-e2e.lock) so it never runs alongside them.
#
# Nothing of the test user's own files is touched: configuration, profile and state bundle
# live under $WORK (TEROK_SHIELD_CONFIG_DIR / TEROK_SHIELD_STATE_DIR). Everything is removed
# at the end, also on failure.
#
# Environment: E2E_USER (shieldtest), E2E_IMAGE (localhost/shield-test:latest),
# BENCH_BIN (use this binary instead of building target/release/terok-shield).
set -euo pipefail

ROUNDS=${1:-50}
IMAGE=${E2E_IMAGE:-localhost/shield-test:latest}
NAME=bench-live
WORK=/tmp/terok-shield-bench-live
NS=tsbench-dns
FLOOR_NS=tsbench-floor
HOST_VETH=tsbench-host
HOST_ADDR=198.18.254.1
DNS_ADDR=198.18.254.2

die() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }
say() { printf 'bench: %s\n' "$*" >&2; }
REPO=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=../scripts/lib/world.sh
. "$REPO/scripts/lib/world.sh"

[ "$(id -u)" -eq 0 ] || die "run as root (podman runs as the test user through runuser; the fake DNS needs a namespace)"
[[ "$ROUNDS" =~ ^[0-9]+$ ]] && [ "$ROUNDS" -ge 5 ] && [ "$ROUNDS" -le 5000 ] || die "ROUNDS must be a number from 5 to 5000"
for tool in perl ip flock runuser; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool missing"
done
test_user_init "${E2E_USER:-shieldtest}"
# Every command as the test user is bounded; the shield finds its files under $WORK.
SHIELD_CONFIG_DIR=$WORK/config SHIELD_STATE_DIR=$WORK/state
as_user podman image exists "$IMAGE" || die "image $IMAGE missing for $E2E_USER: run scripts/podman-env.sh first"

# --- binary --------------------------------------------------------------------------------
if [ -n "${BENCH_BIN:-}" ]; then
    SRC_BIN=$BENCH_BIN
else
    say "building the release binary (cargo build --release)"
    (cd "$REPO" && cargo build --release --quiet --bin terok-shield)
    SRC_BIN=$REPO/target/release/terok-shield
fi

# --- exclusive use of the fake-internet addresses ------------------------------------------
take_e2e_lock 1800

DNS_PID=""
cleanup() {
    set +e
    as_user podman rm -f -t 0 "$NAME" >/dev/null 2>&1
    if [ -n "$DNS_PID" ]; then kill "$DNS_PID" 2>/dev/null; wait "$DNS_PID" 2>/dev/null; fi
    world_down "$NS" "$HOST_VETH"
    ip netns del "$FLOOR_NS" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
# Leftovers of a killed run.
world_down "$NS" "$HOST_VETH"
ip netns del "$FLOOR_NS" 2>/dev/null || true
as_user podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
rm -rf "$WORK"

mkdir -p "$WORK/bin" "$WORK/log" "$WORK/config/profiles" "$WORK/state"
chmod 755 "$WORK" "$WORK/bin"
install -m 755 "$SRC_BIN" "$WORK/bin/terok-shield"
BIN=$WORK/bin/terok-shield
chown -R "$E2E_UID:$E2E_GID" "$WORK/config" "$WORK/state"
chmod 700 "$WORK/config" "$WORK/state"

# --- fake DNS in its own namespace ---------------------------------------------------------
world_up "$NS" "$HOST_VETH" "$HOST_ADDR" "$DNS_ADDR" "" ""
cat >"$WORK/bin/fake-dns.pl" <<'PERL'
# bench helper: authoritative answers for d<N>.bench.test only; exits after ARGV[1] seconds.
use strict;
use warnings;
use IO::Socket::INET;
my ($addr, $lifetime) = @ARGV;
my $s = IO::Socket::INET->new(LocalAddr => $addr, LocalPort => 53, Proto => 'udp')
    or die "bind $addr:53: $!\n";
my $deadline = time + $lifetime;
while (time < $deadline) {
    my $rin = '';
    vec($rin, fileno($s), 1) = 1;
    next unless select(my $rout = $rin, undef, undef, 1);
    my $q;
    my $peer = $s->recv($q, 1500);
    next unless defined $peer && length($q) >= 12;
    my ($id, $flags, $qd) = unpack('n n n', $q);
    next if ($flags & 0x8000) || $qd != 1;
    my ($i, @labels) = (12);
    while ($i < length($q)) {
        my $len = ord(substr($q, $i, 1));
        $i++;
        last if $len == 0;
        push @labels, lc substr($q, $i, $len);
        $i += $len;
    }
    next if $i + 4 > length($q);
    my $qtype = unpack('n', substr($q, $i, 2));
    my $name = join('.', @labels);
    my ($rcode, @answers) = (3);
    if ($name =~ /^d(\d{1,5})\.bench\.test$/ && $1 < 12500) {
        $rcode = 0;
        push @answers, pack('n n n N n C4', 0xc00c, 1, 1, 300, 4, 198, 18, 200 + int($1 / 250), $1 % 250 + 1)
            if $qtype == 1;
    }
    my $reply = pack('n n n n n n', $id, 0x8400 | ($flags & 0x0100) | $rcode, 1, scalar(@answers), 0, 0)
        . substr($q, 12, $i + 4 - 12) . join('', @answers);
    $s->send($reply, 0, $peer);
}
PERL
ip netns exec "$NS" perl "$WORK/bin/fake-dns.pl" "$DNS_ADDR" 3600 &
DNS_PID=$!
sleep 0.3
kill -0 "$DNS_PID" 2>/dev/null || die "the fake DNS server did not start"

# --- configuration and the container -------------------------------------------------------
printf '# bench/live-allow.sh\ndefault_profiles: [bench-live]\naudit:\n  enabled: true\nupstream_dns: %s\n' "$DNS_ADDR" \
    >"$WORK/config/config.yml"
printf '# bench/live-allow.sh\n198.51.100.10\n198.18.0.0/16:443/tcp\n2001:db8::10\n' >"$WORK/config/profiles/bench-live.txt"
chown -R "$E2E_UID:$E2E_GID" "$WORK/config"

say "starting the shielded container $NAME"
as_user "$BIN" run "$NAME" --profiles bench-live -- -d "$IMAGE" sleep 3600 >/dev/null 2>"$WORK/log/run.err" \
    || die "terok-shield run failed: $(cat "$WORK/log/run.err")"
state=$(as_user "$BIN" status "$NAME" | awk '/^State:/ { print $2 }')
[ "$state" = up ] || die "the container's shield is not up after run (state: $state)"

# --- timing --------------------------------------------------------------------------------
# Microseconds of one command (its output kept in $WORK/log/last.*; a failure is fatal).
timed() {
    local label=$1 s e
    shift
    s=${EPOCHREALTIME/./}
    "$@" >"$WORK/log/last.out" 2>"$WORK/log/last.err" || die "$label failed: $* : $(cat "$WORK/log/last.err")"
    e=${EPOCHREALTIME/./}
    echo $((e - s)) >>"$WORK/log/$label.txt"
}
ip_of() { echo "198.19.$(($1 / 250)).$(($1 % 250 + 1))"; }

# The kernel floor's scratch table (no interface, no traffic: only the set is touched).
ip netns add "$FLOOR_NS"
ip netns exec "$FLOOR_NS" nft -f - <<'NFT' || die "cannot make the floor's scratch table"
table inet floor {
    set allow_v4 { type ipv4_addr; flags interval; elements = { 198.51.100.10 } }
}
NFT

say "warm-up (3 rounds, not counted)"
for w in 1 2 3; do
    ip=$(ip_of $((5000 + w)))
    as_user "$BIN" allow "$NAME" "$ip" >/dev/null || die "warm-up allow failed"
    as_user "$BIN" allow "$NAME" "d$((10000 + w)).bench.test" >/dev/null || die "warm-up domain allow failed (is the fake DNS answering?)"
    as_user "$BIN" deny "$NAME" "$ip" >/dev/null || die "warm-up deny failed"
done

say "$ROUNDS rounds"
for i in $(seq 1 "$ROUNDS"); do
    ip=$(ip_of "$i")
    timed true_direct /bin/true
    timed true_wrapper as_user /bin/true
    timed version as_user "$BIN" --version
    timed allow_ip as_user "$BIN" allow "$NAME" "$ip"
    grep -q "^Allowed $ip -> $ip for $NAME\$" "$WORK/log/last.out" || die "unexpected allow output: $(cat "$WORK/log/last.out")"
    timed allow_domain as_user "$BIN" allow "$NAME" "d$i.bench.test"
    grep -qE "^Allowed d$i.bench.test( -> 198\.18\.20[0-9]\.[0-9]*)? for $NAME( \(.*\))?\$" "$WORK/log/last.out" \
        || die "unexpected domain allow output: $(cat "$WORK/log/last.out")"
    timed deny_ip as_user "$BIN" deny "$NAME" "$ip"
    timed deny_cidr as_user "$BIN" deny "$NAME" "198.19.$((128 + i % 128)).0/24"
    timed deny_domain as_user "$BIN" deny "$NAME" "d$i.bench.test"
    timed nft_add ip netns exec "$FLOOR_NS" nft add element inet floor allow_v4 "{ $ip }"
    timed nft_delete ip netns exec "$FLOOR_NS" nft delete element inet floor allow_v4 "{ $ip }"
done

state=$(as_user "$BIN" status "$NAME" | awk '/^State:/ { print $2 }')
[ "$state" = up ] || die "the container's shield is not up after the rounds (state: $state)"

# --- summary -------------------------------------------------------------------------------
stat() { # median p90 min max of a file of microseconds, in ms
    sort -n "$1" | awk '{ v[NR] = $1 } END {
        med = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        p = int(NR * 0.9 + 0.999999); if (p < 1) p = 1
        printf "%.2f %.2f %.2f %.2f\n", med / 1000, v[p] / 1000, v[1] / 1000, v[NR] / 1000 }'
}
row() { printf '| %-44s | %9s | %9s | %9s | %9s |\n' "$@"; }
line() { read -r med p90 min max < <(stat "$WORK/log/$2.txt"); row "$1" "$med" "$p90" "$min" "$max"; }

echo
echo "terok-shield live-control benchmark: $ROUNDS rounds, $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "$(podman --version), $("$BIN" --version), container $NAME (user $E2E_USER), wall times in ms"
echo
row "command" "median" "p90" "min" "max"
row "--------------------------------------------" "---------" "---------" "---------" "---------"
line "/bin/true (direct fork+exec)" true_direct
line "/bin/true via runuser wrapper (baseline)" true_wrapper
line "terok-shield --version" version
line "terok-shield allow NAME <fresh IP>" allow_ip
line "terok-shield allow NAME <fresh domain>" allow_domain
line "terok-shield deny NAME <IP>" deny_ip
line "terok-shield deny NAME <CIDR>" deny_cidr
line "terok-shield deny NAME <domain>" deny_domain
line "kernel floor: nft add element (root)" nft_add
line "kernel floor: nft delete element (root)" nft_delete
W=$(stat "$WORK/log/true_wrapper.txt" | cut -d' ' -f1)
echo
printf 'Medians net of the wrapper baseline (%s ms):' "$W"
for r in version allow_ip allow_domain deny_ip deny_cidr deny_domain; do
    m=$(stat "$WORK/log/$r.txt" | cut -d' ' -f1)
    printf ' %s %s ms;' "$r" "$(awk -v a="$m" -v b="$W" 'BEGIN { printf "%.2f", a - b }')"
done
printf 'Kernel floor of deleting one element (nft delete - nft add, medians): %s ms\n' \
    "$(awk -v a="$(stat "$WORK/log/nft_delete.txt" | cut -d' ' -f1)" -v b="$(stat "$WORK/log/nft_add.txt" | cut -d' ' -f1)" 'BEGIN { printf "%.2f", a - b }')"
echo
cat <<EOF

Every shield row runs through the same runuser/env wrapper as the baseline row. At the end the
bundle held $((ROUNDS + 3)) live domain allows and $((ROUNDS + 3)) live denies (each round's address
was allowed, then denied); the shield was verified \`up\` before and after the rounds. deny
includes the conntrack cut (a helper process that joins the container's namespaces).
EOF
