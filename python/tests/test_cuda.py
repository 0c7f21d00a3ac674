"""CUDA tensors on the CUDA backend: 2, 4 and 8 processes sharing the one GPU (same-node peers through
CUDA IPC, the engine host-staged over tcp) equal the pure-torch reference byte for byte, and
dispatch + combine captured in a CUDA graph and replayed 100 times equal the eager steps."""

import pytest

from conftest import SKIP_NO_CUDA, SKIP_NO_TORCH

torch = pytest.importorskip("torch", reason=SKIP_NO_TORCH)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=SKIP_NO_CUDA)

from a2a_cases import Case, graph_replays, run_cases  # noqa: E402
from ferry import launch  # noqa: E402

CASES = [
    ("tcp", Case("bf16_top2")),
    ("tcp", Case("fp8_scales_top8", experts_per_rank=8, top_k=8, in_dtype="fp8", hidden=256, hidden_dim_scale=2,
                 drop=0.2, empty_groups=(1,))),
    ("tcp", Case("split_skewed_back_to_back", split=True, skew_rank=0, steps=5, out_dtype="f32")),
    ("tcp", Case("bound_m_accumulate_padding", bound_m=True, accumulate=True, expert_padding=4, steps=3)),
]


@pytest.mark.parametrize("world", [2, 4, 8], ids=lambda w: f"{w}ranks")
def test_cuda_tensors_equal_the_torch_reference(world):
    ran = launch.spawn(run_cases, world, args=(CASES, "cuda"), timeout_s=300)
    assert ran == [[f"{p}/{c.name}" for p, c in CASES]] * world


@pytest.mark.parametrize("world", [2, 4], ids=lambda w: f"{w}ranks")
def test_a_cuda_graph_of_dispatch_and_combine_replays_like_eager_steps(world):
    assert launch.spawn(graph_replays, world, args=("tcp", 100), timeout_s=300) == [100] * world
