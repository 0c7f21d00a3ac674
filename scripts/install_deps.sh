#!/usr/bin/env bash
# Installs everything Ferry needs to build and test on a Debian machine (run as root, or with sudo).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
pkgs=(build-essential cmake pkg-config git python3 python3-matplotlib python3-dev python3-venv clang libclang-rt-dev
      libfabric-dev libfabric-bin libibverbs-dev libhwloc-dev hwloc
      openmpi-bin libopenmpi-dev libcli11-dev nlohmann-json3-dev
      libgtest-dev libgmock-dev libbenchmark-dev iproute2 chromium fonts-liberation fonts-dejavu-core)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The Python package (python/): torch, numpy, nanobind, scikit-build-core and pytest. Nothing in the
# C/C++ suite needs them, so a failure here only warns (the python tests then skip, saying why).
# torch is large (the CPU wheel ~200 MB, the CUDA one several GB): it is installed once, into .venv
# next to the sources when the system Python lacks it (CMake uses .venv/bin/python when present).
# FERRY_SKIP_PYTHON_DEPS=1 skips this step.
python_deps() {
  if python3 -c "import torch, numpy, nanobind, scikit_build_core, pytest" 2>/dev/null; then return 0; fi
  local venv=$root/.venv
  [ -x "$venv/bin/python" ] || python3 -m venv --system-site-packages "$venv" || return 1
  local pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
  "${pip[@]}" numpy nanobind scikit-build-core pytest || return 1
  "$venv/bin/python" -c "import torch" 2>/dev/null && return 0
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" torch
  else  # no GPU: the CPU-only wheel, a tenth of the size
    "${pip[@]}" --retries 1 --timeout 30 torch --index-url https://download.pytorch.org/whl/cpu || "${pip[@]}" torch
  fi
}
if [ "${FERRY_SKIP_PYTHON_DEPS:-0}" != 1 ] && ! python_deps; then
  echo "install_deps: warning: the Python dependencies (torch, numpy, nanobind, scikit-build-core, pytest)" \
       "could not be installed; the C/C++ suite is unaffected, the python tests will skip" >&2
fi
