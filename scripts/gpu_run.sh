#!/usr/bin/env bash
# The CUDA backend's whole pass on a lent GPU machine (CUDA, a driver, python3 with torch, but no
# libfabric, hwloc, GoogleTest or network), prepared on the build machine.
#
#   scripts/gpu_run.sh stage      here: builds build-gpu/ (Release, no MPI, only what the pass runs),
#                                 the python wheel, downloads the .deb files of the libraries the GPU
#                                 machine lacks (libfabric, hwloc and theirs), packs .gpu/ (ignored) and
#                                 prints the device `run` invocation; fails if the carry would not fit.
#   scripts/gpu_run.sh run        there, from the repository root: the pass (below); logs and one
#                                 summary table under $OUT (or ./gpu-logs), the summary printed last.
#   scripts/gpu_run.sh dry-run    here, without a GPU: checks the pass against a build (FERRY_GPU_BUILD,
#                                 default build/): every program and file it names exists, every cuda
#                                 ctest program is in it, every gtest filter selects a test, the carry
#                                 fits. ctest runs it (gpu_run_dry_run, label tools).
#
# The pass, within FERRY_GPU_BUDGET_S (default 540 s) of one 600 s command, each step under its own
# timeout so that a hang costs that step alone:
#   1. alone on the GPU: ferry-cuda-bench decode and prefill (pack with and without the fp8 cast);
#   2. four lanes at once: the cuda test programs (every ctest of label cuda: kernels, locality,
#      gdrcopy, backend with its CUDA IPC and mixed jobs, ferry-check's cuda stage, the moe layer's and
#      NCCL's when built), compute-sanitizer memcheck and racecheck over kernel and backend tests, the
#      python extension for the machine's python and the python GPU tests (python_cuda,
#      python_deep_ep_cuda);
#   3. alone again: ferry-moe-layer and ferry-bench --overlap tbo on CUDA when built, then EP8 decode
#      latency through CUDA IPC, host-staged shm and a mixed job of two emulated nodes;
#   4. the CPU path on the GPU machine's cores (more than the build machine has): ferry-te-bench on
#      shm and tcp (engine beside the raw loop, alone and on its own thread), the host backend at
#      EP8 decode 32 tokens and EP4 decode 128 tokens with its automatic helper threads and with none.
# The GPU machine's packages are never touched: the .deb files are unpacked (dpkg -x, or python where
# it has no dpkg) under FERRY_GPU_WORK (default /tmp/ferry-gpu) and found through LD_LIBRARY_PATH.
# FERRY_GPU_ONLY=<regex of step names> runs those steps alone (a second call after a failure);
# FERRY_GPU_LANES=1 runs the lanes one after the other; FERRY_GPU_NCU=1 adds Nsight Compute's
# per-kernel decode times.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
self=$root/scripts/gpu_run.sh
stage=$root/.gpu
# What the GPU machine has and must not be shadowed: glibc, the compiler runtime, the driver, and
# the CUDA libraries of its toolkit and of torch's wheels (found there: see find_gpu_libs).
gpu_has='/(ld-linux[^/]*|lib(c|m|dl|pthread|rt|util|resolv|gcc_s|stdc\+\+|z|udev|uuid|cuda|nvidia-[^/]*|cublas|cublasLt|nccl)\.so[^/]*)$'
# Every program of the ctest label cuda, relative to the build; the pass runs each whole. Programs a
# build lacks (another branch's) are left out; a cuda ctest of a program not listed fails dry-run.
cuda_programs=(tests/cuda/test_cuda_kernels tests/cuda/test_cuda_locality tests/cuda/test_gdrcopy
  tests/cuda/test_cuda_backend tests/check/test_check_cuda tests/moe_layer/test_moe_layer_cuda
  tests/nccl/test_nccl_cuda)
tool_programs=(bench/cuda/ferry-cuda-bench bench/ep/ferry-bench tools/check/ferry-check bench/moe_layer/ferry-moe-layer
  bench/te/ferry-te-bench)
carry_limit=$((64 * 1024 * 1024))

die() { echo "gpu_run.sh: $*" >&2; exit 1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

# The interpreter the python package is built with (python/CMakeLists.txt picks the same).
python_here() { if [ -x "$root/.venv/bin/python" ]; then echo "$root/.venv/bin/python"; else command -v python3; fi; }

# Programs of the build's cuda ctests, relative to the build; "NOT_BUILT <test>" for a test whose
# program is missing.
ctest_cuda_programs() {
  ctest --test-dir "$1" -L cuda --show-only=json-v1 2> /dev/null | python3 -c '
import json, os, sys
build = os.path.realpath(sys.argv[1])
for t in json.load(sys.stdin).get("tests", []):
    prog = next((os.path.relpath(os.path.realpath(a), build) for a in t.get("command") or []
                 if os.path.isabs(a) and os.path.realpath(a).startswith(build + os.sep) and os.path.isfile(a)), None)
    print(prog if prog else "NOT_BUILT " + t["name"])' "$1" | sort -u
}

# The programs of the pass that this build has (cuda tests, then tools), relative to it.
pass_programs() {
  local p
  for p in "${cuda_programs[@]}" "${tool_programs[@]}"; do [ -x "$1/$p" ] && echo "$p"; done
}

# Every cuda ctest's program must be one the pass runs, and built.
check_cuda_coverage() {
  local build=$1 bad=0 p
  while read -r p; do
    [ -z "$p" ] && continue
    case "$p" in
      "NOT_BUILT "*) echo "cuda ctest ${p#NOT_BUILT } has no program in $build (build it first)" >&2; bad=1 ;;
      *) [[ " ${cuda_programs[*]} " == *" $p "* ]] ||
           { echo "cuda ctest program $p is not in gpu_run.sh's cuda_programs: the GPU pass would skip it" >&2; bad=1; } ;;
    esac
  done < <(ctest_cuda_programs "$build")
  return $bad
}

# Shared libraries the programs need that the GPU machine lacks: "deb <package>=<version>" for those
# of a Debian package, "file <path>" for the others (the CUDA runtime of this toolkit), the path
# named by the soname the loader looks for.
needed_libs() {
  local f lib pkg cand
  for f in "$@"; do ldd "$f" 2> /dev/null | awk '$3 ~ /^\// {print $3}'; done | sort -u | grep -Ev "$gpu_has" |
    while read -r lib; do
      # Ferry's own (libferry, from the build or the wheel) travels with the programs.
      case "$(realpath "$lib")" in "$root"/* | "${TMPDIR:-/tmp}"/*) continue ;; esac
      # dpkg knows a file by the path its package installed (/lib or /usr/lib after usrmerge).
      pkg=""
      for cand in "$lib" "$(realpath "$lib")" "${lib#/usr}" "/usr$lib"; do
        pkg=$(dpkg -S "$cand" 2> /dev/null | head -1 | cut -d: -f1)
        [ -n "$pkg" ] && break
      done
      if [ -n "$pkg" ]; then
        echo "deb $(dpkg-query -W -f='${Package}=${Version}' "$pkg")"
      else
        echo "file $lib"
      fi
    done | sort -u
}

# build_extension PYTHON LIBFERRY OUTDIR: ferry._ferry for PYTHON, linked against the wheel's
# LIBFERRY, into OUTDIR. nanobind comes from PYTHON, else from the stage's copy. Used by stage (for
# the pythons a GPU machine may have) and by the pass (for one it did not foresee).
build_extension() {
  local python=$1 libferry=$2 outdir=$3 ext c nb
  for c in cmake c++; do command -v $c > /dev/null || { echo "building the extension needs $c, not found" >&2; return 1; }; done
  nb=$("$python" -c 'import nanobind; print(nanobind.cmake_dir())' 2> /dev/null ||
    PYTHONPATH=$stage "$python" -c 'import nanobind; print(nanobind.cmake_dir())') ||
    { echo "no nanobind for $python, nor in $stage/nanobind" >&2; return 1; }
  ext=$(mktemp -d)
  cat > "$ext/CMakeLists.txt" << 'EOF'
cmake_minimum_required(VERSION 3.18)
project(ferry_python_extension CXX)
set(CMAKE_CXX_STANDARD 20)
find_package(Python COMPONENTS Interpreter Development.Module REQUIRED)
find_package(nanobind CONFIG REQUIRED)
nanobind_add_module(_ferry NB_STATIC ${FERRY_SOURCE}/python/ext/module.cpp)
target_include_directories(_ferry PRIVATE ${FERRY_SOURCE}/include)
target_link_libraries(_ferry PRIVATE ${FERRY_LIBRARY})
set_target_properties(_ferry PROPERTIES BUILD_RPATH "$ORIGIN" INSTALL_RPATH "$ORIGIN")
EOF
  local gen=() rc=0
  command -v ninja > /dev/null && gen=(-G Ninja)
  { cmake -S "$ext" -B "$ext/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$python" \
      -Dnanobind_DIR="$nb" -DFERRY_SOURCE="$root" -DFERRY_LIBRARY="$libferry" &&
      cmake --build "$ext/build" -j "$(nproc)" && mkdir -p "$outdir" && cp "$ext"/build/_ferry*.so "$outdir/"; } || rc=1
  rm -rf "$ext"
  return $rc
}

# Pythons other than the wheel's that a GPU machine may run (FERRY_GPU_PYTHONS: interpreters to use
# instead): those on PATH, and pyenv's.
other_pythons() {
  if [ -n "${FERRY_GPU_PYTHONS:-}" ]; then tr ' ' '\n' <<< "$FERRY_GPU_PYTHONS"; return; fi
  local v p
  # nanobind supports 3.10 and later.
  for v in 3.10 3.11 3.12 3.13 3.14; do
    for p in "python$v" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/"python$v"; do
      "$p" -c '' 2> /dev/null && { command -v "$p"; break; }
    done
  done
}

# Bytes of what travels besides the carry: tracked and untracked-not-ignored files, and shared/.
tree_bytes() {
  local bytes
  bytes=$(cd "$root" && git ls-files -co --exclude-standard -z 2> /dev/null | xargs -0 -r stat -c %s 2> /dev/null |
    awk '{ s += $1 } END { print s + 0 }')
  [ -d "$root/shared" ] && bytes=$((bytes + $(du -sb "$root/shared" | cut -f1)))
  echo "$bytes"
}

print_invocation() {
  cat << 'EOF'
The device call (a session whose task is lent a GPU; one call, about 9 minutes of device time):
  run(command="bash scripts/gpu_run.sh run", carry=[".gpu"], timeout_s=600)
then read files_at/summary.md (the table), bench.log and logs.tar.gz (every step's log).
A second call for failed steps only: command="FERRY_GPU_ONLY='^(backend|memcheck_backend)$' bash scripts/gpu_run.sh run".
EOF
}

# ---- stage: here -------------------------------------------------------------------------------

do_stage() {
  local build=${FERRY_GPU_BUILD:-$root/build-gpu} py p
  py=$(python_here)
  command -v apt-get > /dev/null && command -v dpkg > /dev/null || die "stage needs apt-get and dpkg (Debian)"
  mkdir -p "$build"
  local log=$build/gpu-stage.log
  cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DFERRY_MPI=OFF -DFERRY_PYTHON=OFF \
    -DCMAKE_CUDA_ARCHITECTURES=90 > "$log" 2>&1 || die "configure failed: $log"
  local targets=() help
  help=$(cmake --build "$build" --target help)
  for p in "${cuda_programs[@]}" "${tool_programs[@]}"; do
    grep -qE "^(\.\.\. )?$(basename "$p")(:|\$)" <<< "$help" && targets+=("$(basename "$p")")
  done
  echo "building in $build: ${targets[*]}"
  cmake --build "$build" -j"${FERRY_GPU_JOBS:-2}" --target "${targets[@]}" >> "$log" 2>&1 ||
    die "build failed: $log"
  check_cuda_coverage "$build" || die "the pass does not cover every cuda ctest"

  rm -rf "$stage" && mkdir -p "$stage/debs" "$stage/wheel"
  local tmp
  tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' RETURN
  mkdir -p "$tmp/build" "$tmp/lib"
  mapfile -t progs < <(pass_programs "$build")
  for p in "${progs[@]}"; do
    mkdir -p "$tmp/build/$(dirname "$p")"
    strip --strip-debug -o "$tmp/build/$p" "$build/$p"
  done
  # The wheel (scikit-build-core in build-python/, the same compiler cache as the build above).
  "$py" -m pip wheel "$root/python" --no-build-isolation --no-deps -w "$stage/wheel" \
    -C cmake.define.FERRY_MPI=OFF -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 >> "$log" 2>&1 ||
    die "pip wheel failed: $log"
  local whl lib_ferry
  whl=$(ls "$stage"/wheel/*.whl | head -1)
  lib_ferry=$tmp/wheel-lib && mkdir -p "$lib_ferry" && (cd "$lib_ferry" && "$py" -m zipfile -e "$whl" .)
  local kind what debs=()
  while read -r kind what; do
    case $kind in
      deb) debs+=("$what") ;;
      file) cp -L "$what" "$tmp/lib/" ;;
    esac
  done < <(needed_libs "${progs[@]/#/$build/}" "$lib_ferry"/ferry/*.so*)
  echo "debs: ${debs[*]}"
  (cd "$stage/debs" && apt-get download "${debs[@]}" >> "$log" 2>&1) ||
    die "apt-get download failed (apt-get update first?): $log"
  # python's tarfile packs and unpacks it: neither machine needs xz-utils.
  (cd "$tmp" && python3 -m tarfile -c "$stage/bundle.tar.xz" build lib) || die "packing the bundle failed"
  # nanobind's sources, for the extension the GPU machine builds when its python is not the wheel's.
  cp -r "$("$py" -c 'import nanobind, os; print(os.path.dirname(nanobind.__file__))')" "$stage/nanobind" &&
    rm -rf "$stage/nanobind/__pycache__" || die "could not copy nanobind from $py"
  # The extension for the other pythons here, so that a GPU machine's python likely finds its own.
  local other tag wheel_tag built=()
  wheel_tag=$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
  while read -r other; do
    tag=$("$other" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))') || continue
    [ "$tag" = "$wheel_tag" ] && continue
    if build_extension "$other" "$lib_ferry/ferry/libferry.so.0" "$stage/ext" >> "$log" 2>&1; then
      built+=("$tag")
    else
      echo "note: no extension for $other (see $log)" >&2
    fi
  done < <(other_pythons)
  echo "extension for the wheel's ${wheel_tag} and ${built[*]:-no other python}"
  {
    printf 'FERRY_GPU_ORIGINAL_BUILD=%q\n' "$(realpath "$build")"
    printf 'FERRY_GPU_COMMIT=%q\n' "$(cd "$root" && git rev-parse --short HEAD 2> /dev/null) $(cd "$root" &&
      [ -n "$(git status --porcelain --untracked-files=no 2> /dev/null)" ] && echo '(with uncommitted changes)')"
    printf 'FERRY_GPU_STAGED=%q\n' "$(date -u +%FT%TZ)"
  } > "$stage/manifest.sh"
  local carried tree
  carried=$(du -sb "$stage" | cut -f1)
  tree=$(tree_bytes)
  echo "carry .gpu: $(mib "$carried") (bundle $(mib "$(stat -c %s "$stage/bundle.tar.xz")"), debs $(mib "$(du -sb "$stage/debs" | cut -f1)"), wheel $(mib "$(stat -c %s "$whl")")); working tree $(mib "$tree"); limit $(mib $carry_limit)"
  ((carried + tree <= carry_limit)) || die "over the 64 MiB the device call takes: trim the pass"
  print_invocation
}

# ---- dry-run: here, without a GPU ----------------------------------------------------------------

do_dry_run() {
  local build=${FERRY_GPU_BUILD:-$root/build} bad=0 p py
  [ -d "$build" ] || die "no build at $build (FERRY_GPU_BUILD)"
  [ -x "$build/bench/cuda/ferry-cuda-bench" ] || die "$build has no CUDA backend programs (built with FERRY_CUDA=OFF or not built)"
  echo "== the cuda ctests of $build"
  check_cuda_coverage "$build" && echo "every cuda ctest program is in the pass" || bad=1
  echo "== what stage would carry"
  for c in apt-get dpkg dpkg-query strip gzip tar cmake ctest git; do
    command -v "$c" > /dev/null || { echo "stage needs $c, not found" >&2; bad=1; }
  done
  py=$(python_here)
  # Optional here as in install_deps.sh (the C/C++ suite runs without them); stage stops without them.
  "$py" -c 'import scikit_build_core, nanobind' 2> /dev/null ||
    echo "note: stage's pip wheel will need scikit-build-core and nanobind importable by $py" >&2
  local tmp kind what debs_bytes=0 size
  tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' RETURN
  mapfile -t progs < <(pass_programs "$build")
  for p in "${progs[@]}"; do
    mkdir -p "$tmp/build/$(dirname "$p")"
    strip --strip-debug -o "$tmp/build/$p" "$build/$p" || bad=1
  done
  # The wheel holds libferry and the extension; the build's own libferry stands in for its size.
  [ -f "$build/libferry.so" ] && strip --strip-debug -o "$tmp/libferry.so" "$build/libferry.so"
  mkdir -p "$tmp/lib"
  while read -r kind what; do
    case $kind in
      deb) size=$(apt-cache show "$what" 2> /dev/null | awk '/^Size:/ { print $2; exit }')
           if [ -z "$size" ]; then
             echo "no package $what in the apt lists (apt-get update), counted as 4 MiB" >&2; size=$((4 << 20))
           fi
           echo "  deb $what $(mib "$size")"; debs_bytes=$((debs_bytes + size)) ;;
      file) echo "  file $what"; cp -L "$what" "$tmp/lib/" ;;
    esac
  done < <(needed_libs "${progs[@]/#/$build/}" ${build:+"$build/libferry.so"})
  # gzip -1 is larger than the xz the stage packs with: an upper bound, quickly; nanobind's sources
  # and the extensions for other pythons are counted with the wheel.
  local bundle wheel tree total
  bundle=$(tar -C "$tmp" -cf - build lib | gzip -1 | wc -c)
  wheel=$(( $(gzip -1 -c "$tmp/libferry.so" 2> /dev/null | wc -c) + (8 << 20) ))
  tree=$(tree_bytes)
  total=$((bundle + debs_bytes + wheel + tree))
  echo "programs: ${progs[*]}"
  echo "carry, at most: bundle $(mib "$bundle") + debs $(mib "$debs_bytes") + wheel $(mib "$wheel") + working tree $(mib "$tree") = $(mib "$total") of $(mib $carry_limit)"
  ((total <= carry_limit)) || { echo "the carry would not fit the device call's 64 MiB" >&2; bad=1; }
  echo "== the pass, step by step"
  FERRY_GPU_BUILD=$build "$self" run --dry-run || bad=1
  ((bad == 0)) && { echo "dry run: ok"; print_invocation; }
  return $bad
}

# ---- run: on the GPU machine -----------------------------------------------------------------------

dry=0
work=${FERRY_GPU_WORK:-/tmp/ferry-gpu}
# The pass unpacks packages and deletes its previous files there: only a folder of its own under /tmp.
case "$work" in
  /tmp/?*) [[ "/$work/" != */../* ]] || die "FERRY_GPU_WORK=$work: no '..' in it" ;;
  *) die "FERRY_GPU_WORK=$work: expected a folder under /tmp" ;;
esac
logs=$work/logs
results=$work/results

# One row of the summary: name, result, seconds, detail.
result() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" > "$results/$(date +%s%N)-$1.tsv"; }

# What a step's log says: gtest counts and failures, sanitizer errors, pytest's line.
log_detail() {
  local log=$1 d=""
  local passed failed skipped hung
  passed=$(grep -aE '^\[  PASSED  \] [0-9]+ test' "$log" | awk '{ s += $4 } END { if (NR) print s }')
  failed=$(grep -aE '^\[  FAILED  \] [^ ]+\.[^ ]+' "$log" | grep -av ' listed below' | awk '{ print $4 }' | sort -u |
    head -6 | tr '\n' ' ')
  skipped=$(grep -aE '^\[  SKIPPED \] [0-9]+ test' "$log" | awk '{ s += $4 } END { if (NR) print s }')
  [ -n "$passed" ] && d="$passed passed"
  [ -n "$skipped" ] && d="$d, $skipped skipped"
  [ -n "$failed" ] && d="$d, failed: $failed"
  # The test that was running when the step ended without finishing it.
  hung=$(grep -aE '^\[ *(RUN|OK|FAILED|SKIPPED) *\] [^ ]+\.' "$log" | tail -1 | grep -a 'RUN' | awk '{ print $4 }')
  [ -n "$hung" ] && d="$d, unfinished: $hung"
  local errors
  errors=$(grep -aE 'ERROR SUMMARY: [0-9]+ error' "$log" | awk '{ s += $4; n++ } END { if (n) print s " errors in " n " processes" }')
  [ -n "$errors" ] && d="$d; sanitizer: $errors"
  local py
  py=$(grep -aE '^(=+ )?[0-9]+ (passed|failed|skipped|error)' "$log" | tail -1 | sed -E 's/=+//g; s/^ +| +$//g')
  [ -n "$py" ] && d="$d pytest: $py"
  echo "${d#, }" | cut -c1-300
}

# step NAME MAX_SECONDS COMMAND...: runs COMMAND within MAX_SECONDS and what is left of the budget,
# logging to $logs/NAME.log. In a dry run, checks what the command names instead.
step() {
  local name=$1 max=$2
  shift 2
  if [ -n "${FERRY_GPU_ONLY:-}" ] && ! [[ $name =~ $FERRY_GPU_ONLY ]]; then return 0; fi
  if ((dry)); then dry_check "$name" "$@"; return 0; fi
  local now left t rc t0
  now=$(date +%s)
  left=$((deadline - now))
  if ((left < 20)); then
    result "$name" "not run" 0 "out of the ${budget}s budget"
    return 0
  fi
  t=$((max < left ? max : left))
  t0=$now
  echo "[$(date +%T)] $name (up to ${t}s): $*" > "$logs/$name.log"
  timeout -k 10 "$t" "$@" >> "$logs/$name.log" 2>&1
  rc=$?
  local status=pass detail
  detail=$(log_detail "$logs/$name.log")
  if ((rc == 124 || rc == 137)); then status="TIMEOUT ${t}s"; elif ((rc != 0)); then status="FAIL rc=$rc"; fi
  # On the GPU machine a test that skips did not run: the GPU was not seen.
  if ((rc == 0)) && [[ $detail =~ (^|[^0-9])0\ passed|skipped ]] && ! [[ $detail =~ [1-9][0-9]*\ passed ]]; then
    status="ALL SKIPPED"
  fi
  # Without a count, the log's last line says what went wrong.
  [ "$status" != pass ] && [ -z "$detail" ] && detail=$(grep -av '^\s*$' "$logs/$name.log" | tail -1 | cut -c1-200)
  result "$name" "$status" $(($(date +%s) - t0)) "$detail"
}

# What a dry run checks of one step: programs and files exist, gtest filters select tests, the
# benchmarks' and tools' options parse (each is run without a GPU: CLI11 rejects an unknown or
# malformed option before anything touches the device).
dry_check() {
  local name=$1 bad=0 a prog="" filter="" prog_args=() after=0
  shift
  case "$1" in
    "$self") ;;
    /*) [ -x "$1" ] || { echo "  $name: $1 is not built" >&2; bad=1; } ;;
    *) command -v "$1" > /dev/null || case "$1" in
         compute-sanitizer | nvidia-smi | cuobjdump | ncu) ;;  # the GPU machine's CUDA toolkit
         *) echo "  $name: command $1 not found" >&2; bad=1 ;;
       esac ;;
  esac
  for a in "$@"; do
    case "$a" in
      "$B"/*) [ -x "$a" ] && [ -z "$prog" ] && prog=$a && after=1 && continue ;;
      --gtest_filter=*) filter=${a#--gtest_filter=} ;;
      *.py) [ -f "$root/$a" ] || [ -f "$a" ] || { echo "  $name: no file $a" >&2; bad=1; } ;;
    esac
    ((after)) && prog_args+=("$a")
  done
  case "$name:$prog" in
    te_bench_* | host_*)
      # CPU benchmarks: they would run here in full; only check that the program answers --help.
      "$prog" --help > /dev/null 2>&1 < /dev/null || { echo "  $name: $(basename "$prog") --help fails" >&2; bad=1; } ;;
    *:"$B"/bench/* | *:"$B"/tools/*)
      local out
      out=$(LD_LIBRARY_PATH=$stub${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} timeout -k 5 30 "$prog" "${prog_args[@]}" 2>&1 < /dev/null)
      if grep -q 'Run with --help' <<< "$out"; then
        echo "  $name: $(basename "$prog") rejects its options: $(grep -v 'Run with --help' <<< "$out" | tail -2 | tr '\n' ' ')" >&2
        bad=1
      fi ;;
  esac
  if [ -n "$prog" ] && [ -n "$filter" ]; then
    local n
    n=$(LD_LIBRARY_PATH=$stub${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} "$prog" --gtest_list_tests --gtest_filter="$filter" 2> /dev/null |
      grep -c '^  ')
    ((n > 0)) || { echo "  $name: --gtest_filter=$filter selects no test of $prog" >&2; bad=1; }
    filter=" ($n tests)"
  fi
  echo "  $name: $*${filter}"
  ((bad == 0)) || echo bad >> "$results/dry-errors"
}

# The python package for the machine's python3: the wheel's libferry and modules, with the extension
# of the wheel, else the one stage built for this python, else one built here against the wheel's
# libferry (FERRY_GPU_REBUILD_EXT=1: always built here).
python_package() {
  local pkg=$work/py tag
  rm -rf "$pkg" && mkdir -p "$pkg"
  python3 -m zipfile -e "$(ls "$stage"/wheel/*.whl | head -1)" "$pkg" || return 1
  tag=$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
  python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
  if [ "${FERRY_GPU_REBUILD_EXT:-0}" != 1 ]; then
    if PYTHONPATH=$pkg python3 -c 'import ferry._ferry'; then
      echo "the wheel's extension imports in this python ($tag)"
      return 0
    fi
    if [ -f "$stage/ext/_ferry$tag" ]; then
      rm -f "$pkg"/ferry/_ferry*.so && cp "$stage/ext/_ferry$tag" "$pkg/ferry/"
      PYTHONPATH=$pkg python3 -c 'import ferry._ferry' && { echo "the staged _ferry$tag imports"; return 0; }
    fi
  fi
  echo "building _ferry$tag against the wheel's libferry"
  rm -f "$pkg"/ferry/_ferry*.so
  build_extension "$(command -v python3)" "$pkg/ferry/libferry.so.0" "$pkg/ferry" &&
    PYTHONPATH=$pkg python3 -c 'import ferry._ferry; print("import ferry._ferry: ok")'
}

# deb_extract DEB DIR: the files of a .deb under DIR, as `dpkg -x` does; where the machine has no
# dpkg, python reads the ar archive and its data.tar itself.
deb_extract() {
  if command -v dpkg > /dev/null && [ "${FERRY_GPU_NO_DPKG:-0}" != 1 ]; then dpkg -x "$1" "$2"; return; fi
  python3 - "$1" "$2" << 'EOF'
import io, sys, tarfile
data = open(sys.argv[1], "rb").read()
if data[:8] != b"!<arch>\n":
    sys.exit(f"{sys.argv[1]}: not a .deb (no ar header)")
pos = 8
while pos + 60 <= len(data):
    name, size = data[pos:pos + 16].decode().strip().rstrip("/"), int(data[pos + 48:pos + 58])
    pos += 60
    if name.startswith("data.tar"):
        with tarfile.open(fileobj=io.BytesIO(data[pos:pos + size])) as t:
            t.extractall(sys.argv[2], **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        sys.exit(0)
    pos += size + (size & 1)
sys.exit(f"{sys.argv[1]}: no data.tar member")
EOF
}

# Directories of the CUDA libraries the GPU machine has (its toolkit, torch's wheels) that the
# programs need, for LD_LIBRARY_PATH.
find_gpu_libs() {
  local lib dir
  local roots
  # torch's wheels (nvidia-cublas, nvidia-nccl) live under python's site-packages.
  roots=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2> /dev/null)
  for lib in libcublas.so.13 libcublasLt.so.13 libnccl.so.2 libcudart.so.13; do
    grep -q "[[:space:]]$lib " <<< "$(ldconfig -p 2> /dev/null)" && continue
    # shellcheck disable=SC2086
    dir=$(find /usr/local/cuda*/ /usr/local/nvidia /opt /usr/lib $roots -name "$lib" -print -quit 2> /dev/null)
    [ -n "$dir" ] && dirname "$dir"
  done | sort -u | paste -sd:
}

do_run() {
  mkdir -p "$work"
  rm -rf "$logs" "$results" && mkdir -p "$logs" "$results"
  budget=${FERRY_GPU_BUDGET_S:-540}
  deadline=$(($(date +%s) + budget))
  if ((dry)); then
    B=${FERRY_GPU_BUILD:-$root/build}
    stub=$(find "$B" -type d -name cuda-driver-stub -print -quit 2> /dev/null)
  else
    [ -f "$stage/manifest.sh" ] || die "no $stage: run 'scripts/gpu_run.sh stage' on the build machine and carry .gpu"
    # shellcheck source=/dev/null
    source "$stage/manifest.sh"
    rm -rf "${work:?}/build" "${work:?}/lib" "${work:?}/root"
    python3 -c 'import sys, tarfile
tarfile.open(sys.argv[1]).extractall(sys.argv[2], **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))' \
      "$stage/bundle.tar.xz" "$work" ||
      die "could not unpack $stage/bundle.tar.xz"
    local d
    # Unpacked into a prefix, never installed: the GPU machine's own packages stay as they are.
    for d in "$stage"/debs/*.deb; do deb_extract "$d" "$work/root" || die "could not unpack $d"; done
    B=$work/build
    # Paths compiled into the programs (ferry-check's, for its test) name the build they came from:
    # a link there to the unpacked one, unless something real has that name (left alone).
    local orig=$FERRY_GPU_ORIGINAL_BUILD orig_note=""
    if [ "$orig" != "$B" ]; then
      if [ ! -e "$orig" ] || [ -L "$orig" ]; then
        mkdir -p "$(dirname "$orig")" && ln -sfn "$B" "$orig" || orig_note="could not link $orig to $B"
      else
        orig_note="$orig exists and is not a link: programs that name it run what is there"
      fi
    fi
    local gpu_libs
    gpu_libs=$(find_gpu_libs)
    export LD_LIBRARY_PATH=$work/lib:$work/root/usr/lib/x86_64-linux-gnu:$work/root/lib/x86_64-linux-gnu${gpu_libs:+:$gpu_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    [ -d "$work/root/usr/lib/x86_64-linux-gnu/libfabric" ] && export FI_PROVIDER_PATH=$work/root/usr/lib/x86_64-linux-gnu/libfabric
    export PYTHONUNBUFFERED=1
    # compute-sanitizer and cuobjdump come with the machine's CUDA toolkit, on PATH or not.
    if ! command -v compute-sanitizer > /dev/null; then
      for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
        [ -x "$d/compute-sanitizer" ] && export PATH=$PATH:$d && break
      done
    fi
    {
      echo "commit ${FERRY_GPU_COMMIT:-?}, staged ${FERRY_GPU_STAGED:-?}"
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
      echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
      [ -n "$orig_note" ] && echo "note: $orig_note"
      local f
      find "$B" -type f -perm -u+x -print0 | while IFS= read -r -d '' f; do
        ldd "$f" | grep -a 'not found' | sed "s|^|$(basename "$f"): |"
      done
    } > "$logs/machine.log" 2>&1
  fi
  local bin=$B cs=(compute-sanitizer --error-exitcode 9 --print-limit 20)
  local kernels=$bin/tests/cuda/test_cuda_kernels backend=$bin/tests/cuda/test_cuda_backend

  if ((!dry)); then
    # Registers, stack and spills per kernel, from the machine code itself.
    cuobjdump --dump-resource-usage "$bin/bench/cuda/ferry-cuda-bench" > "$logs/registers.log" 2>&1
  fi

  # 1. alone on the GPU: kernel times (decode and prefill; the pack with and without the cast).
  step bench 150 "$bin/bench/cuda/ferry-cuda-bench" --preset decode --preset prefill

  # The summary so far after each phase: if the command is stopped from outside, $OUT still has it.
  ((dry)) || summarize > /dev/null

  # 2. four lanes. A lane runs its steps one after the other.
  lane_kernels() {
    step kernels 150 "$kernels"
    step locality 60 "$bin/tests/cuda/test_cuda_locality"
    step gdrcopy 90 "$bin/tests/cuda/test_gdrcopy"
    step memcheck_kernels 180 "${cs[@]}" --tool memcheck "$kernels" \
      --gtest_filter='KernelErrors.*:Shapes/KernelsVsHost.*fp8*:*Quantize*'
    step racecheck_kernels 150 "${cs[@]}" --tool racecheck "$kernels" --gtest_filter='Shapes/KernelsVsHost.*f32*:*Quantize*'
  }
  lane_backend() {
    step backend 330 "$backend"
    step memcheck_backend 150 "${cs[@]}" --tool memcheck --target-processes all "$backend" \
      --gtest_filter='*TwoRanksOverTcp*:*TwoRanksThroughCudaIpc*:*FourRanksOnTwoNodesMixCudaIpcAndTcp*'
  }
  lane_python() {
    step python_package 150 "$self" _python_package
    step python_cuda 240 env PYTHONPATH="$work/py" python3 -m pytest -q -rs -p no:cacheprovider "$root/python/tests/test_cuda.py"
    step python_deep_ep_cuda 240 env PYTHONPATH="$work/py" python3 -m pytest -q -rs -p no:cacheprovider \
      "$root/python/tests/test_deep_ep_cuda.py"
  }
  lane_tools() {
    [ -x "$bin/tests/check/test_check_cuda" ] && step check_cuda 150 "$bin/tests/check/test_check_cuda"
    [ -x "$bin/tests/moe_layer/test_moe_layer_cuda" ] && step moe_layer_cuda 200 "$bin/tests/moe_layer/test_moe_layer_cuda"
    [ -x "$bin/tests/nccl/test_nccl_cuda" ] && step nccl_cuda 120 "$bin/tests/nccl/test_nccl_cuda"
    step racecheck_backend 150 "${cs[@]}" --tool racecheck --target-processes all "$backend" \
      --gtest_filter='*TwoRanksOverTcp*:*GraphOfDispatchAndCombine*'
  }
  if ((dry)) || [ "${FERRY_GPU_LANES:-4}" = 1 ]; then
    lane_kernels; lane_backend; lane_python; lane_tools
  else
    lane_kernels & lane_backend & lane_python & lane_tools &
    wait
  fi
  ((dry)) || summarize > /dev/null

  # 3. alone again: the MoE layer on CUDA where this build has it, then EP8 decode through CUDA IPC,
  # host-staged shm and a mixed job of two emulated nodes (the table of bench/cuda/NOTES.md), last
  # because the budget cuts from the end.
  if [ -x "$bin/bench/moe_layer/ferry-moe-layer" ]; then
    step moe_layer 90 "$bin/bench/moe_layer/ferry-moe-layer" --backend cuda --local-ranks 4 --launcher fork \
      --provider shm --preset qwen3-30b-a3b --warmup 3 --iters 20 --verify
  fi
  local fb=$bin/bench/ep/ferry-bench
  # Not `--help | grep -q`: grep's early exit fails the pipe under pipefail.
  if [ -x "$fb" ] && grep -q 'tbo' <<< "$("$fb" --help 2>&1)"; then
    step overlap_tbo 90 "$fb" --backend cuda --local-ranks 4 --launcher fork --provider shm --preset decode \
      --experts 64 --overlap tbo --warmup 3 --iters 20 --verify --no-progress
  fi
  local ep8=(--backend cuda --local-ranks 8 --launcher fork --preset decode --experts 256 --warmup 30 --iters 300
    --verify --no-progress)
  step ep8_ipc 60 env FERRY_CUDA_IPC=1 "$fb" "${ep8[@]}"
  step ep8_shm 60 env FERRY_CUDA_IPC=0 "$fb" "${ep8[@]}" --provider shm
  step ep8_mixed 60 env FERRY_CUDA_IPC=1 "$fb" "${ep8[@]}" --provider shm --local-nodes 2
  # 4. the CPU path where cores are not scarce (no MPI there: ferry alone, fork launcher).
  local te=$bin/bench/te/ferry-te-bench
  step te_bench_shm 40 "$te" --ranks 2 --provider shm --latency-iters 2000
  step te_bench_tcp 60 "$te" --ranks 2 --provider tcp --latency-iters 1000
  local host=(--backend host --launcher fork --preset decode --warmup 10 --no-progress)
  step host_ep8_auto 40 "$fb" "${host[@]}" --local-ranks 8 --tokens 32 --iters 300 --provider shm
  step host_ep4_auto 40 "$fb" "${host[@]}" --local-ranks 4 --iters 200 --provider shm
  step host_ep4_one_thread 40 env FERRY_HOST_THREADS=1 "$fb" "${host[@]}" --local-ranks 4 --iters 200 --provider shm
  if [ "${FERRY_GPU_NCU:-0}" = 1 ]; then
    step ncu_decode 90 ncu --clock-control none --metrics gpu__time_duration.sum -k 'regex:dispatch|combine' -s 128 -c 12 \
      "$bin/bench/cuda/ferry-cuda-bench" --preset decode --replays 1
  fi

  if ((dry)); then
    [ -f "$results/dry-errors" ] && return 1
    return 0
  fi
  summarize
}

summarize() {
  local out=${OUT:-$root/gpu-logs} f
  mkdir -p "$out"
  {
    echo "# Ferry GPU pass"
    echo
    sed 's/^/    /' "$logs/machine.log"
    echo
    echo "| step | result | s | detail |"
    echo "|---|---|---|---|"
    for f in $(ls "$results"/*.tsv 2> /dev/null | sort); do
      awk -F'\t' '{ printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4 }' "$f"
    done
    echo
    echo "## ferry-cuda-bench"
    echo '```'
    cat "$logs/bench.log" 2> /dev/null
    echo '```'
    echo "## registers per kernel (cuobjdump)"
    echo '```'
    grep -aE 'Function|REG' "$logs/registers.log" 2> /dev/null | paste - - |
      sed -E 's/.*_GLOBAL__N_[^ ]*[0-9]([a-z_]+kernel)[^ ]*/\1/; s/\t/ /' | head -40
    echo '```'
    for f in moe_layer overlap_tbo ep8_ipc ep8_shm ep8_mixed te_bench_shm te_bench_tcp host_ep8_auto host_ep4_auto \
      host_ep4_one_thread ncu_decode; do
      [ -f "$logs/$f.log" ] || continue
      echo "## $f"
      echo '```'
      tail -40 "$logs/$f.log"
      echo '```'
    done
  } > "$out/summary.md"
  cp "$logs/bench.log" "$out/bench.log" 2> /dev/null
  tar -C "$work" -czf "$out/logs.tar.gz" logs
  cat "$out/summary.md"
}

case "${1:-}" in
  stage) do_stage ;;
  dry-run) do_dry_run ;;
  run)
    [ "${2:-}" = --dry-run ] && dry=1 && work=$(mktemp -d) && logs=$work/logs && results=$work/results &&
      trap 'rm -rf "$work"' EXIT
    do_run
    ;;
  _python_package) python_package ;;
  *)
    echo "usage: $0 stage | run | dry-run" >&2
    exit 2
    ;;
esac
