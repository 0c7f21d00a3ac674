#!/usr/bin/env bash
# Long fuzzing runs: builds the sanitizer build (scripts/sanitize.sh's configuration) and runs every
# libFuzzer target in fuzz/ for SECONDS each (default 600), one after another, from the committed
# inputs plus what earlier runs found (kept in the build tree). Prints one line per target with its
# executions; a crash stops the script and leaves its input in <build>/fuzz/artifacts/ (copy it into
# fuzz/corpus/<target>/ once fixed, so the regression test replays it).
#   scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${FERRY_SAN_BUILD_DIR:-$root/build-san}
seconds=${1:-600}
shift || true
FERRY_FUZZ_SECONDS=$seconds "$root/scripts/sanitize.sh" -L '^fuzz$' -R '_regression$'
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for f in "$root"/fuzz/fuzz_*.cpp; do targets+=("$(basename "$f" .cpp)"); done
fi
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
for t in "${targets[@]}"; do
  scratch="$build/fuzz/corpus/$t"
  mkdir -p "$scratch"
  log="$build/fuzz/$t.log"
  "$build/fuzz/$t" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    -artifact_prefix="$build/fuzz/artifacts/$t-" "$scratch" "$root/fuzz/corpus/$t" > "$log" 2>&1 || {
    echo "$t: FAILED after $(grep -m1 -o 'stat::number_of_executed_units: *[0-9]*' "$log" || echo '?'); see $log"
    tail -40 "$log"
    exit 1
  }
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$')
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
  echo "$t: ${seconds} s, ${execs} executions, ${cov}, corpus $(ls "$scratch" | wc -l) inputs, no crash"
done
