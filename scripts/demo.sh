#!/usr/bin/env bash
# Installs dependencies, builds, and runs the main job: a local EP all-to-all (dispatch + combine)
# over the libfabric tcp provider with 8 ranks on this machine, printing the latency table beside an
# MPI all-to-all of the same records. Extra arguments go to ferry-bench.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install_deps.sh"
"$root/scripts/build.sh"
build=${FERRY_BUILD_DIR:-$root/build}
exec "$build/bench/ferry-bench" --local-ranks 8 --backend host --preset decode --tokens 32 --verify "$@"
