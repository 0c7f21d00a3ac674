"""Dispatch and combine between real processes (CPU tensors, host backend, libfabric tcp and shm)
equal an independent pure-torch all-to-all (reference.py), byte for byte. One launched world per
size runs every case of that size, over both providers."""

import pytest

from conftest import SKIP_NO_TORCH

pytest.importorskip("torch", reason=SKIP_NO_TORCH)

from a2a_cases import Case, run_cases  # noqa: E402
from ferry import launch  # noqa: E402

WORLDS = {
    2: [
        ("tcp", Case("bf16_top2")),
        ("tcp", Case("f32_top8", experts_per_rank=4, top_k=8, in_dtype="f32", out_dtype="f32")),
        ("tcp", Case("fp8_scales_top1", in_dtype="fp8", hidden=128, hidden_dim_scale=4, top_k=1)),
        ("tcp", Case("zero_token_rank_and_dropped_routes", experts_per_rank=3, top_k=4, empty_groups=(1,), drop=0.3)),
        ("tcp", Case("split_halves_skewed", split=True, skew_rank=0, steps=3)),
        ("tcp", Case("back_to_back_20_steps", steps=20, drop=0.2, seed=3)),
        ("tcp", Case("accumulate_bound_m_padding_flat_uint32", accumulate=True, bound_m=True, expert_padding=4,
                     flat_layout=True, index_dtype="uint32", out_dtype="f16")),
        ("shm", Case("fp8_scales_top8", experts_per_rank=4, top_k=8, in_dtype="fp8", hidden=128, hidden_dim_scale=2)),
        ("shm", Case("split_back_to_back_20_steps", split=True, skew_rank=1, steps=20, drop=0.1)),
        ("shm", Case("bootstrap_from_torchrun_env", bootstrap="env")),
        ("tcp", Case("bootstrap_explicit_tcp", bootstrap="tcp", out_dtype="f32")),
    ],
    4: [
        ("tcp", Case("dp2_fp8_scales_top8", dp_size=2, experts_per_rank=2, top_k=8, in_dtype="fp8", hidden=128,
                     hidden_dim_scale=4)),
        ("tcp", Case("zero_token_ranks_dropped_routes", empty_groups=(0, 3), drop=0.25, top_k=3)),
        ("tcp", Case("split_skewed_20_steps", split=True, skew_rank=2, steps=20)),
        ("shm", Case("f32_top1", top_k=1, in_dtype="f32", out_dtype="f32")),
        ("shm", Case("dp2_split_zero_token_group", dp_size=2, split=True, steps=5, empty_groups=(1,))),
        ("shm", Case("bf16_top8_padding8", experts_per_rank=2, top_k=8, expert_padding=8)),
    ],
    8: [
        ("shm", Case("bf16_top8_dropped_zero_token_rank_20_steps", top_k=8, drop=0.2, empty_groups=(3,), steps=20)),
        ("shm", Case("dp2_fp8_split_skewed", dp_size=2, in_dtype="fp8", hidden=128, hidden_dim_scale=4, top_k=4,
                     split=True, skew_rank=5, steps=2)),
        ("tcp", Case("bf16_top8_dropped_20_steps", top_k=8, drop=0.2, steps=20, empty_groups=(6,))),
        ("tcp", Case("fp8_top1_split", in_dtype="fp8", hidden=128, hidden_dim_scale=2, top_k=1, split=True)),
    ],
}


@pytest.mark.parametrize("world", list(WORLDS), ids=[f"{w}ranks" for w in WORLDS])
def test_dispatch_and_combine_equal_the_torch_reference(world):
    cases = WORLDS[world]
    ran = launch.spawn(run_cases, world, args=(cases,), timeout_s=240)
    assert ran == [[f"{p}/{c.name}" for p, c in cases]] * world
