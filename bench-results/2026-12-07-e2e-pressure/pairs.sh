#!/usr/bin/env bash
# Pairs of end-to-end runs (`cargo bench --bench perf -- e2e`, E2E_LADDER=0): the code before
# issue 23 and this checkout, the side that goes first alternating, each run's CPU pressure
# (the growth of /proc/pressure/cpu's `some` total over the run, as a share of its wall time).
#
#   git worktree add ../base 54d6632
#   (cd ../base && CARGO_TARGET_DIR=../base-target cargo bench --bench perf --no-run)
#   cargo bench --bench perf --no-run
#   BASE_DIR=../base BASE_TARGET=../base-target bash pairs.sh 1 43 > pairs.txt
#   python3 summary.py logs 1 43
#
# RATE (default 1000) is the offered rate (E2E_RATE). Logs go to ./logs.
set -u
here=$(cd "$(dirname "$0")" && pwd)
cur_dir=$(cd "$here/../.." && pwd)
base_dir=$(cd "${BASE_DIR:?the code before issue 23}" && pwd)
base_target=$(cd "${BASE_TARGET:?its CARGO_TARGET_DIR}" && pwd)
newest() { ls -t "$1"/release/deps/perf-* | grep -v '\.d$' | head -1; }
cur_bin=$(newest "${CARGO_TARGET_DIR:-$cur_dir/target}")
base_bin=$(newest "$base_target")
rate=${RATE:-1000}
pressure() { grep '^some' /proc/pressure/cpu | grep -o 'total=[0-9]*' | cut -d= -f2; }
mkdir -p "$here/logs"
for i in $(seq "$1" "$2"); do
    if [ $((i % 2)) = 1 ]; then order="base cur"; else order="cur base"; fi
    for side in $order; do
        log=$here/logs/$rate-$side-$i.log
        if [ "$side" = base ]; then dir=$base_dir bin=$base_bin; else dir=$cur_dir bin=$cur_bin; fi
        p0=$(pressure) t0=$(date +%s%N)
        (cd "$dir" && PGSSLMODE=disable E2E_LADDER=0 E2E_RATE=$rate BENCH_RESULTS_DIR=/tmp/pairs \
            "$bin" e2e --bench > "$log" 2>&1)
        p1=$(pressure) t1=$(date +%s%N)
        echo "$side $i: pressure $(( (p1 - p0) * 100000 / (t1 - t0) ))% $(grep -m1 -o '[0-9.]* Postgres transactions per order' "$log"); $(grep -m1 -o 'commit-to-payment-confirmed-mail [^,]*, p99 [^,]*' "$log")"
    done
done
