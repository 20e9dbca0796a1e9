#!/usr/bin/env bash
# Runs every fuzz target (or those named) for SECONDS each, one after
# another, at the lowest CPU priority, and prints each target's executions
# and time from libFuzzer's final stats. Needs a nightly toolchain and
# cargo-fuzz (docs/fuzzing.md).
#
#   fuzz/run-all.sh [SECONDS] [TARGET...]      default: 60 s per target
#
# Environment:
#   FUZZ_SANITIZER  address, none, ... (default none: the code is safe Rust;
#                   `address` also checks the C in ring, more slowly)
#   FUZZ_RUNS=N     stop a target after N executions (if within SECONDS)
#   FUZZ_MERGE=1    afterwards, fold this run's new inputs into the checked-in
#                   corpus, kept small (fuzz/minimize.sh)
#
# New inputs go to fuzz/corpus-work/<target> (not checked in); crashes to
# fuzz/artifacts/<target>/. Exit status 1 if any target crashed.
set -euo pipefail
cd "$(dirname "$0")"

secs=${1:-60}
shift || true
sanitizer=${FUZZ_SANITIZER:-none}
if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

fuzz=(cargo +nightly fuzz)
nice -n 19 "${fuzz[@]}" build -O -a -s "$sanitizer"

mkdir -p logs
failed=0
printf '%-16s %14s %8s %10s %s\n' target execs seconds execs/s result >logs/summary.txt
for t in "${targets[@]}"; do
  mkdir -p "corpus-work/$t" "corpus/$t"
  log="logs/$t.log"
  status=ok
  nice -n 19 "${fuzz[@]}" run -O -a -s "$sanitizer" "$t" "corpus-work/$t" "corpus/$t" -- \
    -max_total_time="$secs" -runs="${FUZZ_RUNS:--1}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$log" 2>&1 || status=CRASH
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  took=$(sed -n 's/.*Done \([0-9]*\) runs in \([0-9]*\) second.*/\2/p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  [ "$status" = ok ] || failed=1
  printf '%-16s %14s %8s %10s %s\n' "$t" "${execs:-?}" "${took:-?}" "${rate:-?}" "$status" \
    | tee -a logs/summary.txt
  if [ "${FUZZ_MERGE:-0}" = 1 ] && [ "$status" = ok ]; then
    ./minimize.sh "$t" >>"$log" 2>&1
  fi
done
cat logs/summary.txt
exit "$failed"
