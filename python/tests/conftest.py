"""Shared by the python suite: the text every test skips with when torch is missing, and the
launcher of test worlds (ferry.launch.spawn: N processes, a gloo group, a deadline)."""

import os
import sys

SKIP_NO_TORCH = "python tests skipped: torch is not installed (scripts/install_deps.sh installs it)"
SKIP_NO_CUDA = ("python tests skipped: no CUDA device here (torch.cuda.is_available() is False); "
                "the CUDA tests run on the GPU machine")

# Spawned ranks import the case modules from here.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
