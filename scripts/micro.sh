#!/usr/bin/env bash
# Runs the Google Benchmark programs of the CPU pieces (bench/micro) and keeps their results as JSON:
# ferry-micro-ep (plan at EP8..64, host pack/unpack/combine, record-header checks) and ferry-micro-te
# (immediate counter, a write through the engine on tcp and shm). Builds them first if needed.
#   scripts/micro.sh [OUT_DIR] [extra Google Benchmark flags, e.g. --benchmark_filter=Plan]
# OUT_DIR defaults to ${FERRY_BUILD_DIR:-build}/micro; each program's table goes to stdout.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${FERRY_BUILD_DIR:-$root/build}
out=${1:-$build/micro}
[[ $# -gt 0 ]] && shift
[[ -f $build/CMakeCache.txt ]] || cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=${CMAKE_BUILD_TYPE:-RelWithDebInfo}
cmake --build "$build" -j "$(nproc)" --target ferry-micro-ep ferry-micro-te
mkdir -p "$out"
for micro in ferry-micro-ep ferry-micro-te; do
  "$build/bench/micro/$micro" --benchmark_out="$out/$micro.json" --benchmark_out_format=json \
    --benchmark_counters_tabular=true "$@"
done
echo "results: $out/ferry-micro-ep.json $out/ferry-micro-te.json"
