#!/usr/bin/env bash
# The sanitizer stage: builds Ferry with clang, AddressSanitizer + UndefinedBehaviorSanitizer and the
# libFuzzer targets into ${FERRY_SAN_BUILD_DIR:-build-san} (CUDA off: nvcc takes no -fsanitize), then
# runs the ep, engine and fuzz labels. Each fuzz target runs FERRY_FUZZ_SECONDS (default 30) after
# replaying its committed inputs. Extra arguments go to ctest (e.g. `-L fuzz`, `-R Bootstrap`).
# Any report fails the run: UBSan does not recover, LeakSanitizer suppresses only the third-party
# libraries named in scripts/sanitizer.supp.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${FERRY_SAN_BUILD_DIR:-$root/build-san}
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
  -DFERRY_SANITIZE="address;undefined" -DFERRY_FUZZ=ON -DFERRY_CUDA=OFF -DFERRY_BENCH=OFF \
  -DFERRY_FUZZ_SECONDS="${FERRY_FUZZ_SECONDS:-30}"
cmake --build "$build" -j "$(nproc)"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$root/scripts/sanitizer.supp:print_suppressions=0}
# hwloc's pci plugin unloads libpciaccess before LeakSanitizer looks, which leaves that library's
# process-lifetime allocations unreachable and nameless; kept loaded, they stay reachable.
pciaccess=$(ldconfig -p | awk '/libpciaccess\.so\.0 /{print $NF; exit}')
if [ -n "$pciaccess" ]; then export LD_PRELOAD=$pciaccess${LD_PRELOAD:+:$LD_PRELOAD}; fi
cd "$build"
if [ $# -eq 0 ]; then set -- -L '^(ep|engine|fuzz)$'; fi
ctest --output-on-failure --timeout 900 "$@"
