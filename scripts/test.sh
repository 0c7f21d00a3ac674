#!/usr/bin/env bash
# Installs dependencies, builds, and runs the whole test suite (ctest). Extra arguments go to ctest,
# e.g. `scripts/test.sh -L engine`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install_deps.sh"
"$root/scripts/build.sh"
build=${FERRY_BUILD_DIR:-$root/build}
cd "$build"
ctest --output-on-failure --timeout 600 "$@"
