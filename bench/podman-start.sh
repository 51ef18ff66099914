#!/bin/bash
# Start-up cost of the shield, measured in one run on this machine.
#
#   bench/podman-start.sh [ROUNDS]        (as root, after scripts/podman-env.sh)
#
# Phase 1, alternating rounds (the order flips every round so drift hits both legs alike):
#   plain:     podman run --rm IMAGE true
#   shielded:  terok-shield run NAME --profiles bench-start -- --rm IMAGE true
# both as the rootless test user, same image, release build. Reports medians and the ratio.
#
# Phase 2, the hooks alone: the container is prepared, and its createRuntime and poststop hook
# descriptors are pointed at a wrapper that times `terok-shield hook STAGE` (wall clock, ns)
# under /usr/bin/time (max RSS, KiB); then `podman run` with the prepared flags. The apply
# timings the hook records in the audit log (generate/load/verify) are reported too, and the
# same wrapper around /bin/true (run as the user, ROUNDS times) is the baseline subtracted to
# give the hooks' own time ("net").
#
# No container touches the network: each runs `true`.
#
# Environment: E2E_USER (shieldtest), E2E_IMAGE (localhost/shield-test:latest),
# BENCH_BIN (use this binary instead of building target/release/terok-shield).
set -euo pipefail

ROUNDS=${1:-15}
E2E_USER=${E2E_USER:-shieldtest}
IMAGE=${E2E_IMAGE:-localhost/shield-test:latest}
NAME=bench-start
PROFILE=bench-start
WORK=/tmp/terok-shield-bench

die() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }
say() { printf 'bench: %s\n' "$*" >&2; }

[ "$(id -u)" -eq 0 ] || die "run as root (podman runs as $E2E_USER through runuser)"
[[ "$ROUNDS" =~ ^[0-9]+$ ]] && [ "$ROUNDS" -ge 3 ] || die "ROUNDS must be a number >= 3"
id -u "$E2E_USER" >/dev/null 2>&1 || die "user $E2E_USER missing: run scripts/podman-env.sh first"
[ -x /usr/bin/time ] || die "/usr/bin/time missing: apt-get install time"
E2E_UID=$(id -u "$E2E_USER")
E2E_HOME=$(getent passwd "$E2E_USER" | cut -d: -f6)
REPO=$(cd "$(dirname "$0")/.." && pwd)

as_user() {
    (cd / && timeout 120 runuser -u "$E2E_USER" -- env -i HOME="$E2E_HOME" XDG_RUNTIME_DIR="/run/user/$E2E_UID" \
        PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@")
}
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
chown "$E2E_USER" "$WORK/log"
chmod 700 "$WORK/log"
HOOK_LOG=$WORK/log/hook-createRuntime.txt
POST_LOG=$WORK/log/hook-poststop.txt

# The hook wrapper: wall time around the real hook, max RSS from /usr/bin/time.
cat >"$WORK/bin/hook-timer" <<EOF
#!/bin/sh
# bench helper: time one hook (stdin is the OCI state, passed through; \$2 is the stage).
s=\$(date +%s%N)
/usr/bin/time -o "$WORK/log/rss-\$2.tmp" -f '%M' "$BIN" "\$@"
rc=\$?
e=\$(date +%s%N)
echo "\$(( (e - s) / 1000 )) \$(tail -n 1 "$WORK/log/rss-\$2.tmp") \$rc" >>"$WORK/log/hook-\$2.txt"
exit \$rc
EOF
chmod 755 "$WORK/bin/hook-timer"
# The same wrapper around /bin/true: what timing costs by itself.
cat >"$WORK/bin/wrapper-timer" <<EOF
#!/bin/sh
# bench helper: the hook wrapper's own cost, around /bin/true.
s=\$(date +%s%N)
/usr/bin/time -o "$WORK/log/rss-wrapper.tmp" -f '%M' /bin/true
rc=\$?
e=\$(date +%s%N)
echo "\$(( (e - s) / 1000 )) \$(tail -n 1 "$WORK/log/rss-wrapper.tmp") \$rc" >>"$WORK/log/wrapper.txt"
EOF
chmod 755 "$WORK/bin/wrapper-timer"

# --- profile (IP entries only: nothing to resolve) -----------------------------------------
PROFILES_DIR=$E2E_HOME/.config/terok/shield/profiles
PROFILE_FILE=$PROFILES_DIR/$PROFILE.txt
for d in "$E2E_HOME/.config/terok" "$E2E_HOME/.config/terok/shield" "$PROFILES_DIR"; do
    [ -d "$d" ] || { mkdir -p "$d"; chown "$E2E_USER:" "$d"; }
done
printf '# bench/podman-start.sh\n198.51.100.10\n198.51.100.0/28:443/tcp\n2001:db8::10\n198.18.0.0/16\n' >"$PROFILE_FILE"
chown "$E2E_USER:" "$PROFILE_FILE"
BUNDLE=$E2E_HOME/.local/state/terok/shield/containers/$NAME
# The first shielded run installs the user's OCI hooks (as it would for any new user); the
# bench takes them out again unless they were there before it.
HOOKS_DIR=$E2E_HOME/.config/terok/shield/hooks.d
HOOK_DESC=$HOOKS_DIR/terok-shield-createRuntime.json
POST_DESC=$HOOKS_DIR/terok-shield-poststop.json
HAD_HOOKS=no
[ -f "$HOOK_DESC" ] && HAD_HOOKS=yes
cleanup() {
    as_user podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
    [ -f "$WORK/log/desc.orig" ] && cp "$WORK/log/desc.orig" "$HOOK_DESC"
    [ -f "$WORK/log/post.orig" ] && cp "$WORK/log/post.orig" "$POST_DESC"
    [ "$HAD_HOOKS" = no ] && as_user "$BIN" setup --remove --force >/dev/null 2>&1
    rm -f "$PROFILE_FILE"
    rm -rf "$BUNDLE"
}
trap cleanup EXIT
cleanup_start() { as_user podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true; rm -rf "$BUNDLE"; }
cleanup_start

now_us() { echo $(( $(date +%s%N) / 1000 )); }

plain() {
    local s e
    s=$(now_us)
    as_user podman run --rm "$IMAGE" true >/dev/null 2>&1 || die "plain podman run failed"
    e=$(now_us)
    echo $((e - s))
}
shielded() {
    local s e
    s=$(now_us)
    as_user "$BIN" run "$NAME" --profiles "$PROFILE" -- --rm "$IMAGE" true >/dev/null 2>"$WORK/log/shielded.err" \
        || die "shielded run failed: $(cat "$WORK/log/shielded.err")"
    e=$(now_us)
    echo $((e - s))
}

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
minimum() { sort -n | head -1; }
maximum() { sort -n | tail -1; }
ms() { awk -v us="$1" 'BEGIN { printf "%.1f", us / 1000 }'; }
ms2() { awk -v us="$1" 'BEGIN { printf "%.2f", us / 1000 }'; }

# --- phase 1 -------------------------------------------------------------------------------
say "warm-up (2 rounds each, not counted)"
for _ in 1 2; do plain >/dev/null; shielded >/dev/null; done
say "phase 1: $ROUNDS alternating rounds"
: >"$WORK/log/plain.txt"
: >"$WORK/log/shielded.txt"
for i in $(seq 1 "$ROUNDS"); do
    if [ $((i % 2)) -eq 1 ]; then
        plain >>"$WORK/log/plain.txt"; shielded >>"$WORK/log/shielded.txt"
    else
        shielded >>"$WORK/log/shielded.txt"; plain >>"$WORK/log/plain.txt"
    fi
done
P_MED=$(median <"$WORK/log/plain.txt")
S_MED=$(median <"$WORK/log/shielded.txt")
RATIO=$(awk -v s="$S_MED" -v p="$P_MED" 'BEGIN { printf "%.2f", s / p }')
APPLY_LINES=$(as_user "$BIN" logs --container "$NAME" -n 100000 | grep '"event":"apply"' || true)
field() { grep -o "\"$1\":[0-9.]*" | cut -d: -f2 | awk '{ printf "%d\n", $1 * 1000 }'; }
A_LOAD=$(echo "$APPLY_LINES" | field load | median)
A_VERIFY=$(echo "$APPLY_LINES" | field verify | median)
A_GEN=$(echo "$APPLY_LINES" | field generate | median)

# --- phase 2 -------------------------------------------------------------------------------
say "phase 2: $ROUNDS runs with timed hooks"
: >"$HOOK_LOG"
: >"$POST_LOG"
: >"$WORK/log/wrapper.txt"
# the hooks run as the user (root of its user namespace)
chown "$E2E_USER" "$HOOK_LOG" "$POST_LOG" "$WORK/log/wrapper.txt"
[ -f "$HOOK_DESC" ] || die "no hook descriptor at $HOOK_DESC (the shielded runs above install it)"
[ -f "$POST_DESC" ] || die "no hook descriptor at $POST_DESC (the shielded runs above install it)"
# The user's hook descriptors call the timing wrapper for this phase only.
cp "$HOOK_DESC" "$WORK/log/desc.orig"
cp "$POST_DESC" "$WORK/log/post.orig"
sed -i "s#\"path\": \"[^\"]*\"#\"path\": \"$WORK/bin/hook-timer\"#" "$HOOK_DESC" "$POST_DESC"
for _ in $(seq 1 "$ROUNDS"); do
    flags=$(as_user "$BIN" prepare "$NAME" --profiles "$PROFILE" 2>/dev/null) || die "prepare failed"
    # shellcheck disable=SC2086 # prepare prints shell words; eval keeps its quoting
    eval "as_user podman run --rm $flags \"\$IMAGE\" true" >/dev/null 2>&1 || die "podman run with the timed hook failed"
    as_user "$WORK/bin/wrapper-timer" </dev/null
done
cp "$WORK/log/desc.orig" "$HOOK_DESC"
cp "$WORK/log/post.orig" "$POST_DESC"
rm -f "$WORK/log/desc.orig" "$WORK/log/post.orig"
[ "$(wc -l <"$HOOK_LOG")" -eq "$ROUNDS" ] || die "expected $ROUNDS hook timings, got: $(cat "$HOOK_LOG")"
awk '$3 != 0 { bad = 1 } END { exit bad }' "$HOOK_LOG" || die "a timed hook failed: $(cat "$HOOK_LOG")"
H_MED=$(awk '{ print $1 }' "$HOOK_LOG" | median)
H_MIN=$(awk '{ print $1 }' "$HOOK_LOG" | minimum)
H_MAX=$(awk '{ print $1 }' "$HOOK_LOG" | maximum)
R_MED=$(awk '{ print $2 }' "$HOOK_LOG" | median)
R_MAX=$(awk '{ print $2 }' "$HOOK_LOG" | maximum)
awk '$3 != 0 { bad = 1 } END { exit bad }' "$POST_LOG" || die "a timed poststop hook failed: $(cat "$POST_LOG")"
PS_MED=$(awk '{ print $1 }' "$POST_LOG" | median)
PS_MIN=$(awk '{ print $1 }' "$POST_LOG" | minimum)
PS_MAX=$(awk '{ print $1 }' "$POST_LOG" | maximum)
PR_MED=$(awk '{ print $2 }' "$POST_LOG" | median)
W_MED=$(awk '{ print $1 }' "$WORK/log/wrapper.txt" | median)
W_MIN=$(awk '{ print $1 }' "$WORK/log/wrapper.txt" | minimum)
W_MAX=$(awk '{ print $1 }' "$WORK/log/wrapper.txt" | maximum)
net() { awk -v a="$1" -v b="$2" 'BEGIN { v = a - b; if (v < 0) v = 0; printf "%d", v }'; }

# --- summary -------------------------------------------------------------------------------
row() { printf '| %-42s | %11s | %11s | %11s |\n' "$1" "$2" "$3" "$4"; }
echo
echo "terok-shield start-up benchmark: $ROUNDS rounds, $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "$(podman --version), $("$BIN" --version), image $IMAGE, user $E2E_USER"
echo
row "measure" "median" "min" "max"
row "------------------------------------------" "-----------" "-----------" "-----------"
row "plain    podman run --rm IMAGE true" "$(ms "$P_MED") ms" "$(ms "$(minimum <"$WORK/log/plain.txt")") ms" "$(ms "$(maximum <"$WORK/log/plain.txt")") ms"
row "shielded terok-shield run NAME -- ... true" "$(ms "$S_MED") ms" "$(ms "$(minimum <"$WORK/log/shielded.txt")") ms" "$(ms "$(maximum <"$WORK/log/shielded.txt")") ms"
row "ratio shielded / plain (medians)" "${RATIO} x" "" ""
row "createRuntime hook: wall time" "$(ms "$H_MED") ms" "$(ms "$H_MIN") ms" "$(ms "$H_MAX") ms"
row "createRuntime hook: max RSS" "$R_MED KiB" "" "$R_MAX KiB"
row "poststop hook: wall time" "$(ms "$PS_MED") ms" "$(ms "$PS_MIN") ms" "$(ms "$PS_MAX") ms"
row "poststop hook: max RSS" "$PR_MED KiB" "" ""
row "timing wrapper around /bin/true" "$(ms "$W_MED") ms" "$(ms "$W_MIN") ms" "$(ms "$W_MAX") ms"
row "createRuntime hook: net of the wrapper" "$(ms "$(net "$H_MED" "$W_MED")") ms" "" ""
row "poststop hook: net of the wrapper" "$(ms "$(net "$PS_MED" "$W_MED")") ms" "" ""
row "hook apply phases (audit): generate" "$(ms2 "$A_GEN") ms" "" ""
row "hook apply phases (audit): load" "$(ms2 "$A_LOAD") ms" "" ""
row "hook apply phases (audit): verify" "$(ms2 "$A_VERIFY") ms" "" ""
cat <<EOF

Wall times include runuser (the same for both legs). The hook's max RSS is that of its
process tree as /usr/bin/time reports it (the largest of its processes).
Raw data in $WORK/log: plain.txt and shielded.txt (microseconds), hook-createRuntime.txt,
hook-poststop.txt and wrapper.txt (us, KiB, exit).
EOF
