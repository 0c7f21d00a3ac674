"""A program written against DeepEP's documented low-latency API (deep_ep_api_check.py, which does
`import deep_ep`) runs unchanged on Ferry: Ferry's alias package is put first on the path, CPU
tensors, 2, 4 and 8 processes. And the alias refuses to stand in for a DeepEP that is installed."""

import os
import subprocess
import sys

import pytest

from conftest import SKIP_NO_TORCH

pytest.importorskip("torch", reason=SKIP_NO_TORCH)

from ferry import deep_ep as ferry_deep_ep  # noqa: E402
from ferry import launch  # noqa: E402


def run_check(rank: int, world: int, shape: dict) -> int:
    sys.path.insert(0, ferry_deep_ep.alias_path())  # what PYTHONPATH does for vLLM and SGLang
    import torch.distributed as dist

    import deep_ep
    import deep_ep_api_check

    assert deep_ep.Buffer is ferry_deep_ep.Buffer
    return deep_ep_api_check.check(rank, world, dist.group.WORLD, device="cpu", **shape)


@pytest.mark.parametrize("world,shape", [
    (2, dict(num_tokens=16, hidden=512, num_experts=8, num_topk=4)),
    (4, dict(num_tokens=12, hidden=384, num_experts=16, num_topk=8)),
    (8, dict(num_tokens=8, hidden=256, num_experts=32, num_topk=6)),
], ids=["2ranks", "4ranks", "8ranks"])
def test_a_program_written_for_deep_ep_runs_on_ferry_with_only_the_import_changed(world, shape):
    ran = launch.spawn(run_check, world, args=(shape,), timeout_s=400, env={"FERRY_PROVIDER": "shm"})
    assert ran == [16] * world  # 2 inputs x 2 hook modes x 4 casts, each dispatched and combined


def test_the_alias_names_an_installed_deep_ep_instead_of_shadowing_it(tmp_path):
    real = tmp_path / "deep_ep"
    real.mkdir()
    (real / "__init__.py").write_text("REAL = True\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ferry_deep_ep.alias_path(), str(tmp_path),
                                                       os.environ.get("PYTHONPATH", "")]))
    env.pop("FERRY_DEEP_EP_OVERRIDE", None)
    refused = subprocess.run([sys.executable, "-c", "import deep_ep"], env=env, capture_output=True, text=True)
    assert refused.returncode != 0
    assert "DeepEP is installed" in refused.stderr and str(real) in refused.stderr
    env["FERRY_DEEP_EP_OVERRIDE"] = "1"
    chosen = subprocess.run([sys.executable, "-c", "import deep_ep, ferry.deep_ep; "
                             "assert deep_ep.Buffer is ferry.deep_ep.Buffer"], env=env, capture_output=True, text=True)
    assert chosen.returncode == 0, chosen.stderr
    printed = subprocess.run([sys.executable, "-m", "ferry.deep_ep"], env=env, capture_output=True, text=True)
    assert printed.stdout.strip() == ferry_deep_ep.alias_path()
