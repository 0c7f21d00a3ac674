#!/usr/bin/env bash
# The CUDA backend's checks on a GPU machine that has CUDA but no libfabric, GoogleTest or network.
#
#   scripts/gpu_run.sh stage [build-dir]   (on the build machine) copies the cuda test programs, the
#                                          benchmark and the shared libraries they need into .gpu/
#   scripts/gpu_run.sh run                 (on the GPU machine, from the repository root) runs the
#                                          cuda tests, the same tests under compute-sanitizer
#                                          (memcheck, racecheck) and ferry-cuda-bench; logs go to
#                                          $OUT (or ./gpu-logs) and a summary is printed last.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
stage=$root/.gpu

case "${1:-run}" in
stage)
  build=${2:-$root/build-cuda}
  rm -rf "$stage" && mkdir -p "$stage/bin" "$stage/lib"
  for b in tests/cuda/test_cuda_kernels tests/cuda/test_cuda_backend bench/cuda/ferry-cuda-bench; do
    [ -x "$build/$b" ] && cp "$build/$b" "$stage/bin/"
  done
  # Every shared library outside glibc, the compiler runtime and the driver (the GPU machine has its own).
  for b in "$stage"/bin/*; do
    ldd "$b" | awk '$3 ~ /^\// {print $3}'
  done | sort -u | grep -Ev '/(libc|libm|libdl|libpthread|librt|libgcc_s|libstdc\+\+|ld-linux[^/]*)\.so' |
    while read -r lib; do cp -L "$lib" "$stage/lib/"; done
  # libfabric loads its providers' helpers lazily; keep its own folder too when it has one.
  [ -d /usr/lib/x86_64-linux-gnu/libfabric ] && cp -rL /usr/lib/x86_64-linux-gnu/libfabric "$stage/lib/" 2>/dev/null
  du -sh "$stage"
  ;;
run)
  out=${OUT:-$root/gpu-logs}
  mkdir -p "$out"
  export LD_LIBRARY_PATH=$stage/lib:${LD_LIBRARY_PATH:-}
  export FI_PROVIDER_PATH=$stage/lib/libfabric
  summary=$out/summary.txt
  : > "$summary"
  nvidia-smi -L | tee -a "$summary"
  step() {  # name, command...: runs, logs to $out/<name>.log, records pass/fail
    local name=$1; shift
    local t0=$SECONDS
    "$@" > "$out/$name.log" 2>&1
    local rc=$?
    printf '%-34s rc=%-3d %4ds  %s\n' "$name" "$rc" $((SECONDS - t0)) \
      "$(grep -E '^\[  (PASSED|FAILED) |ERROR SUMMARY' "$out/$name.log" | tr '\n' ' ' | cut -c1-120)" | tee -a "$summary"
  }
  bin=$stage/bin
  step kernels timeout 300 "$bin/test_cuda_kernels"
  [ -x "$bin/test_cuda_backend" ] && step backend timeout 400 "$bin/test_cuda_backend"
  cs="timeout 240 compute-sanitizer --error-exitcode 9 --print-limit 20"
  step memcheck_kernels $cs --tool memcheck "$bin/test_cuda_kernels" \
    --gtest_filter='KernelErrors.Invalid*:KernelErrors.Lying*:KernelErrors.Repeated*:Shapes/KernelsVsHost.*fp8*'
  step racecheck_kernels $cs --tool racecheck "$bin/test_cuda_kernels" \
    --gtest_filter='Shapes/KernelsVsHost.*f32*'
  [ -x "$bin/test_cuda_backend" ] && step memcheck_backend $cs --tool memcheck --target-processes all \
    "$bin/test_cuda_backend" --gtest_filter="${FERRY_SANITIZE_BACKEND_FILTER:-*TwoRanks*}"
  # Registers, stack and spills per kernel, from the machine code itself.
  cuobjdump --dump-resource-usage "$bin/ferry-cuda-bench" 2>&1 | grep -E "Function|REG" |
    sed -E 's/.*_GLOBAL__N_[^ ]*[0-9]([a-z_]+kernel)[^ ]*/\1/' > "$out/registers.log"
  step bench "$bin/ferry-cuda-bench"
  # Per-kernel GPU time at decode size (Nsight Compute; the first 128 launches pack the senders' data).
  if command -v ncu > /dev/null; then
    for k in 'dispatch_route|dispatch_pack' 'dispatch_recv|dispatch_unpack' 'combine_send|combine_recv'; do
      timeout 120 ncu --metrics gpu__time_duration.sum -k "regex:$k" -s 128 -c 6 \
        "$bin/ferry-cuda-bench" --preset decode --replays 1 2>&1 | grep -E "_kernel|gpu__time_duration" |
        sed -E 's/^ *([a-z:<> ]*::)?([a-z_]+_kernel).*/\2/; s/ +gpu__time_duration.sum +/ /'
    done > "$out/ncu_decode.log" 2>&1
  fi
  echo "---- bench"; cat "$out/bench.log"
  echo "---- decode kernels (ncu)"; cat "$out/ncu_decode.log" 2>/dev/null
  echo "---- registers"; paste - - < "$out/registers.log" | head -20
  echo "---- summary"; cat "$summary"
  ;;
*)
  echo "usage: $0 stage [build-dir] | run" >&2
  exit 2
  ;;
esac
