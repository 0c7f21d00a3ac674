#!/usr/bin/env bash
# Installs dependencies, builds, and runs the whole test suite (ctest), then the sanitizer stage
# (scripts/sanitize.sh: the ep, engine and fuzz labels in an ASan+UBSan build with libFuzzer).
# Extra arguments go to ctest of the main build and skip the sanitizer stage, e.g.
# `scripts/test.sh -L engine`; `--sanitize` runs only the sanitizer stage, `--no-sanitize` skips it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
main=1
sanitize=1
args=()
for a in "$@"; do
  case "$a" in
    --sanitize) main=0 ;;
    --no-sanitize) sanitize=0 ;;
    *) args+=("$a") ;;
  esac
done
if [ "$main" = 1 ] && [ ${#args[@]} -gt 0 ]; then sanitize=0; fi
"$root/scripts/install_deps.sh"
if [ "$main" = 1 ]; then
  "$root/scripts/build.sh"
  build=${FERRY_BUILD_DIR:-$root/build}
  (cd "$build" && ctest --output-on-failure --timeout 600 ${args[@]+"${args[@]}"})
fi
if [ "$sanitize" = 1 ]; then
  "$root/scripts/sanitize.sh" ${args[@]+"${args[@]}"}
fi
