#!/usr/bin/env bash
# The CUDA backend's checks on a GPU machine that has CUDA but no libfabric, GoogleTest or network.
#
#   scripts/gpu_run.sh stage [build-dir]   (on the build machine) copies the cuda test programs, the
#                                          benchmarks and the shared libraries they need into .gpu/
#   scripts/gpu_run.sh run                 (on the GPU machine, from the repository root) runs the
#                                          cuda tests, the same tests under compute-sanitizer
#                                          (memcheck, racecheck) and ferry-cuda-bench; logs go to
#                                          $OUT (or ./gpu-logs) and a summary is printed last.
#   scripts/gpu_run.sh ipc                 (on the GPU machine) the backend tests (CUDA IPC,
#                                          host-staged, and mixed jobs of several "nodes"), the IPC
#                                          and mixed ones under memcheck, and decode latency of 8
#                                          ranks through CUDA IPC vs host-staged shm.
# FERRY_GPU_STAGE names another staging folder (relative to the repository root) than .gpu.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
stage=$root/${FERRY_GPU_STAGE:-.gpu}

case "${1:-run}" in
stage)
  build=${2:-$root/build-cuda}
  rm -rf "$stage" && mkdir -p "$stage/bin" "$stage/lib"
  for b in tests/cuda/test_cuda_kernels tests/cuda/test_cuda_backend tests/cuda/test_cuda_locality tests/cuda/test_gdrcopy bench/cuda/ferry-cuda-bench bench/ep/ferry-bench tools/check/ferry-check; do
    # Debug info stays here: the working tree that travels to the GPU machine is size-limited.
    [ -x "$build/$b" ] && cp "$build/$b" "$stage/bin/" && strip --strip-debug "$stage/bin/$(basename "$b")"
  done
  # Every shared library outside glibc, the compiler runtime and the driver (the GPU machine has its own).
  for b in "$stage"/bin/*; do
    ldd "$b" | awk '$3 ~ /^\// {print $3}'
  done | sort -u | grep -Ev '/(libc|libm|libdl|libpthread|librt|libgcc_s|libstdc\+\+|ld-linux[^/]*|libcublas(Lt)?)\.so' |
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
  step gdrcopy timeout 120 "$bin/test_gdrcopy"
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
ipc)
  out=${OUT:-$root/gpu-logs}
  mkdir -p "$out"
  # cuBLAS (ferry-bench's overlap GEMM) is not staged: the GPU machine's CUDA toolkit has it.
  cublas=$(find /usr/local/cuda*/ /usr/lib /opt -name 'libcublas.so.13*' -print -quit 2>/dev/null)
  export LD_LIBRARY_PATH=$stage/lib${cublas:+:$(dirname "$cublas")}:${LD_LIBRARY_PATH:-}
  export FI_PROVIDER_PATH=$stage/lib/libfabric
  summary=$out/summary.txt
  : > "$summary"
  nvidia-smi -L | tee -a "$summary"
  step() {
    local name=$1; shift
    local t0=$SECONDS
    "$@" > "$out/$name.log" 2>&1
    local rc=$?
    printf '%-22s rc=%-3d %4ds  %s\n' "$name" "$rc" $((SECONDS - t0)) \
      "$(grep -E '^\[  (PASSED|FAILED) |ERROR SUMMARY|^[0-9]+ passed, [0-9]+ failed' "$out/$name.log" | tr '\n' ' ' | cut -c1-200)" | tee -a "$summary"
  }
  bin=$stage/bin
  step backend timeout 400 "$bin/test_cuda_backend"
  grep -E '^\[ +(OK|FAILED) ' "$out/backend.log" | tee -a "$summary"
  bench="$bin/ferry-bench --backend cuda --local-ranks 8 --launcher fork --preset decode --experts 256 --warmup 30 --iters 300 --no-progress"
  step bench_ipc env FERRY_CUDA_IPC=1 timeout 70 $bench --verify --json "$out/bench_ipc.json"
  step bench_shm env FERRY_CUDA_IPC=0 timeout 70 $bench --provider shm --verify --json "$out/bench_shm.json"
  # A mixed job: 8 ranks as 2 emulated nodes (FERRY_NODE_ID), IPC within a node, shm between them.
  step bench_mixed env FERRY_CUDA_IPC=1 timeout 70 $bench --provider shm --local-nodes 2 --verify \
    --json "$out/bench_mixed.json"
  step memcheck_ipc timeout 280 compute-sanitizer --error-exitcode 9 --print-limit 20 --tool memcheck \
    --target-processes all "$bin/test_cuda_backend" \
    --gtest_filter='*CudaIpc*:*IpcPeer*'
  # Mixed jobs: ranks split into nodes, same-node peers through CUDA IPC, the rest host-staged.
  step memcheck_mixed timeout 280 compute-sanitizer --error-exitcode 9 --print-limit 20 --tool memcheck \
    --target-processes all "$bin/test_cuda_backend" --gtest_filter='*FourRanksOnTwoNodes*:*InvalidExpertIdOnTwoNodes*'
  # ferry-check's all-to-all stage on the CUDA backend, 4 ranks as 2 emulated nodes: kernels, proxy,
  # CUDA IPC within a node and shm between, every byte checked against the reference.
  if [ -x "$bin/ferry-check" ]; then
    step check_cuda timeout 180 "$bin/ferry-check" --local-ranks 4 --local-nodes 2 --provider shm \
      --a2a-device cuda --no-links --no-nccl --a2a-iters 20 --timeout-ms 20000 --json "$out/check_cuda.json"
  else
    echo "check_cuda: ferry-check is not in $bin (stage it from tools/check/)" | tee -a "$summary"
  fi
  echo "---- bench through CUDA IPC"; cat "$out/bench_ipc.log"
  echo "---- bench host-staged shm"; cat "$out/bench_shm.log"
  echo "---- bench mixed: 2 emulated nodes, CUDA IPC within, shm between"; cat "$out/bench_mixed.log"
  if [ -f "$out/check_cuda.log" ]; then
    echo "---- ferry-check, all-to-all on the CUDA backend (2 emulated nodes)"
    sed -n '/^stage  /,$p' "$out/check_cuda.log"
    grep -E 'alltoall: cuda backend|ferry: cuda all-to-all|\] rank [0-9]+: FAIL' "$out/check_cuda.log" | head -20
    command -v python3 > /dev/null && [ -f "$out/check_cuda.json" ] && python3 -c '
import json, sys
for a in json.load(open(sys.argv[1]))["alltoall"]:
    print("%-6s %-7s %-10s %-5s dispatch p50/p99 %s/%s us  combine p50/p99 %s/%s us" % (a["device"], a["shape"],
          a["routing"], "ok" if a["ok"] else "FAIL", a["dispatch_us_p50"], a["dispatch_us_p99"],
          a["combine_us_p50"], a["combine_us_p99"]))' "$out/check_cuda.json"
  fi
  echo "---- summary"; cat "$summary"
  ;;
*)
  echo "usage: $0 stage [build-dir] | run | ipc" >&2
  exit 2
  ;;
esac
