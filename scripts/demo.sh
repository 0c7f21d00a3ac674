#!/usr/bin/env bash
# Installs dependencies, builds, and runs the main job: a local EP all-to-all (dispatch + combine)
# with 8 ranks on this machine, printing the latency table beside an MPI all-to-all of the same
# records on the same transport: ferry over libfabric tcp against Open MPI's tcp BTL, then ferry
# over libfabric shm against Open MPI's shared-memory BTL (each table names both sides' transports).
# Extra arguments go to ferry-bench; with --provider among them only that provider runs.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install_deps.sh"
"$root/scripts/build.sh"
build=${FERRY_BUILD_DIR:-$root/build}
bench=("$build/bench/ferry-bench" --local-ranks 8 --backend host --preset decode --tokens 32 --verify)
for arg in "$@"; do
  case $arg in --provider|--provider=*) exec "${bench[@]}" "$@" ;; esac
done
for provider in tcp shm; do
  echo "== ferry over libfabric $provider, MPI over the matching transport =="
  "${bench[@]}" --provider "$provider" "$@"
  echo
done
