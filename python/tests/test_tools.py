"""The runnable pieces a user meets first: the example under torchrun on CPU (its MoE layer equals
the dense torch MoE) and python -m ferry.bench (prints DeepEP-style lines and the Python layer's cost)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import SKIP_NO_TORCH

pytest.importorskip("torch", reason=SKIP_NO_TORCH)

from ferry import launch  # noqa: E402

EXAMPLES = pathlib.Path(os.environ.get("FERRY_EXAMPLES", pathlib.Path(__file__).parents[1] / "examples"))


def run(args, timeout):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_the_example_moe_layer_under_torchrun_matches_the_dense_moe():
    p = run(["-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port", str(launch.free_port()),
             str(EXAMPLES / "moe_layer.py"), "--dtype", "f32", "--provider", "shm"], timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [line for line in p.stdout.splitlines() if line.startswith("rank ")]
    assert len(lines) == 4 and all(line.endswith("PASS") for line in lines), p.stdout + p.stderr


def test_bootstrap_from_env_under_torchrun_meets_beside_torchruns_store():
    # The script's process group takes MASTER_PORT first; Bootstrap.from_env must not need it.
    script = pathlib.Path(__file__).parent / "torchrun_env_bootstrap.py"
    p = run(["-m", "torch.distributed.run", "--nproc-per-node", "3", "--master-port", str(launch.free_port()),
             str(script)], timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(line for line in p.stdout.split() if line == "PASS") == ["PASS"] * 3, p.stdout + p.stderr


def test_bench_prints_deepep_style_lines_and_the_python_layer_cost():
    p = run(["-m", "ferry.bench", "--world-size", "2", "--provider", "tcp", "--tokens", "16", "--hidden", "512",
             "--experts", "16", "--iters", "10", "--warmup", "2"], timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    for rank in (0, 1):
        assert re.search(rf"\[rank {rank}\] Dispatch bandwidth: [\d.]+ GB/s, avg_t=[\d.]+ us \| "
                         r"Combine bandwidth: [\d.]+ GB/s, avg_t=[\d.]+ us", out), out
        assert re.search(rf"\[rank {rank}\] Dispatch send/recv time: [\d.]+ \+ [\d.]+ us", out), out
        assert re.search(rf"\[rank {rank}\] Dispatch p50=[\d.]+ us, p99=[\d.]+ us", out), out
    for row in ("dispatch, Python call", "dispatch, C++ loop", "dispatch, Python layer per call"):
        assert re.search(rf"^{re.escape(row)}\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+$", out, re.M), out
