#!/usr/bin/env bash
# Run every fuzz target (fuzz/fuzz_targets/*.rs) and print what each did.
#
# Usage:
#   scripts/fuzz.sh [SECONDS]              each target for SECONDS (default 60)
#   FUZZ_RUNS=10000000 scripts/fuzz.sh     each target for that many executions instead
#   FUZZ_TARGETS="dns_answer verify" ...   only these targets
#   FUZZ_JOBS=2 ...                        this many targets at once (default 1)
#   FUZZ_WORKERS=2 ...                     this many processes per target, sharing its corpus;
#                                          FUZZ_RUNS is split between them, figures summed
#   FUZZ_REPORT=1 ...                      only print the table of the last runs' logs
#
# Needs a nightly toolchain (`rustup toolchain install nightly`) and cargo-fuzz
# (`cargo install cargo-fuzz`); the crate's own build and CI stay on stable. Every campaign
# runs under `nice -n 19`, so it yields the CPU to everything else on the machine.
#
# Targets are built with optimisations, debug assertions and overflow checks, and without
# AddressSanitizer (`-O -a -s none`): the code under test is safe Rust, where ASan finds
# nothing the borrow checker has not, and costs several times the executions. The corpus grows
# in fuzz/work/TARGET (not committed); the committed seeds in fuzz/corpus/TARGET are read but
# never written. Crashing inputs land in fuzz/artifacts/TARGET/. Exit status 1 if any target
# found a crash, a timeout or a leak.
set -euo pipefail

cd "$(dirname "$0")/../fuzz"

SECONDS_EACH=${1:-60}
RUNS=${FUZZ_RUNS:-}
JOBS=${FUZZ_JOBS:-1}
WORKERS=${FUZZ_WORKERS:-1}
ALL=(profile config bundle oci dns_query dns_answer verify nflog nfnetlink)
read -r -a TARGETS <<<"${FUZZ_TARGETS:-${ALL[*]}}"

die() { printf 'fuzz.sh: %s\n' "$*" >&2; exit 1; }
command -v cargo >/dev/null || die "cargo not found"
cargo +nightly --version >/dev/null 2>&1 || die "no nightly toolchain: rustup toolchain install nightly"
cargo +nightly fuzz --help >/dev/null 2>&1 || die "cargo-fuzz missing: cargo install cargo-fuzz"

LOGS=work/logs
mkdir -p "$LOGS"
if [[ -z ${FUZZ_REPORT:-} ]]; then

echo "building the targets (cargo +nightly fuzz build -O -a -s none)"
nice -n 19 cargo +nightly fuzz build -O -a -s none >"$LOGS/build.log" 2>&1 \
    || { cat "$LOGS/build.log" >&2; die "build failed"; }
# `verify` spends its time in JSON values, where tracing every comparison for libFuzzer costs
# about a third of the executions and buys nothing (its inputs are structured choices): it is
# built a second time without that tracing.
nice -n 19 cargo +nightly fuzz build -O -a -s none --no-trace-compares --target-dir target/notc verify \
    >>"$LOGS/build.log" 2>&1 || { cat "$LOGS/build.log" >&2; die "build failed"; }
BIN=target/x86_64-unknown-linux-gnu/release
bin_of() {
    if [[ $1 == verify ]]; then echo target/notc/x86_64-unknown-linux-gnu/release/verify; else echo "$BIN/$1"; fi
}

if [[ -n $RUNS ]]; then
    LIMIT=(-runs="$(((RUNS + WORKERS - 1) / WORKERS))" -max_total_time=0)
    echo "each target for $RUNS executions, $JOBS at a time, $WORKERS process(es) each"
else
    LIMIT=(-max_total_time="$SECONDS_EACH")
    echo "each target for $SECONDS_EACH s, $JOBS at a time"
fi

run_one() {
    local t=$1 start end w wpids=()
    mkdir -p "work/$t" "artifacts/$t"
    touch "$LOGS/$t.start" # artifacts newer than this are this run's
    start=$(date +%s)
    # -timeout: an input that takes 10 s is a hang; -rss_limit_mb: one that takes 2 GiB a leak.
    # Workers share work/TARGET; libFuzzer reloads it every second (-reload), so each one
    # picks up what the others found.
    for ((w = 1; w <= WORKERS; w++)); do
        nice -n 19 "$(bin_of "$t")" "work/$t" "corpus/$t" "${LIMIT[@]}" -timeout=10 \
            -rss_limit_mb=2048 -artifact_prefix="artifacts/$t/" -print_final_stats=1 \
            >"$LOGS/$t.$w.log" 2>&1 &
        wpids+=($!)
    done
    for w in "${wpids[@]}"; do wait "$w" || true; done
    end=$(date +%s)
    echo "$((end - start))" >"$LOGS/$t.wall"
}

pids=()
for t in "${TARGETS[@]}"; do
    [[ -f fuzz_targets/$t.rs ]] || die "no target $t"
    run_one "$t" &
    pids+=($!)
    if ((${#pids[@]} >= JOBS)); then
        wait "${pids[0]}"
        pids=("${pids[@]:1}")
    fi
done
wait
fi

failed=0
printf '\n%-12s %14s %8s %8s %8s %8s\n' target execs cov ft crashes wall_s
for t in "${TARGETS[@]}"; do
    execs=0 cov=0 ft=0
    for log in "$LOGS/$t".*.log; do
        n=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        execs=$((execs + ${n:-0}))
        # cov/ft of libFuzzer's last status line (DONE, or the line before a crash); with
        # several workers, the largest (they share one corpus).
        covline=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -1)
        c=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$covline")
        f=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$covline")
        ((${c:-0} > cov)) && cov=$c
        ((${f:-0} > ft)) && ft=$f
    done
    crashes=$(find "artifacts/$t" -type f -newer "$LOGS/$t.start" \
        \( -name 'crash-*' -o -name 'timeout-*' -o -name 'leak-*' -o -name 'oom-*' \) | wc -l)
    printf '%-12s %14s %8s %8s %8s %8s\n' "$t" "${execs:-?}" "${cov:-?}" "${ft:-?}" "$crashes" "$(cat "$LOGS/$t.wall")"
    if ((crashes > 0)); then
        failed=1
        cat "$LOGS/$t".*.log | grep -m1 -A3 'panicked' | sed 's/^/    /' || true
        find "artifacts/$t" -type f -newer "$LOGS/$t.start" | sed 's/^/    artifact: fuzz\//'
    fi
done
exit $failed
