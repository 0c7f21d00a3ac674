"""ferry.deep_ep between real processes (CPU tensors, host backend, libfabric tcp and shm) equals a
pure-torch model of DeepEP's low-latency semantics (deep_ep_reference.py): per local expert which
tokens arrive in what order, the counts, the sources (handle), fp8 values and scales exactly, and the
weighted combine within bf16 rounding. One launched world per size runs every case of that size."""

import pytest

from conftest import SKIP_NO_TORCH

pytest.importorskip("torch", reason=SKIP_NO_TORCH)

from deep_ep_cases import Case, misuse, run_cases  # noqa: E402
from ferry import launch  # noqa: E402

WORLDS = {
    2: [
        ("tcp", Case("fp8")),
        ("tcp", Case("bf16", use_fp8=False)),
        ("tcp", Case("fp8_round_scale_hooks", round_scale=True, hook=True, steps=2)),
        ("tcp", Case("fp8_ue8m0_async_out", round_scale=True, use_ue8m0=True, async_finish=True, out=True)),
        ("tcp", Case("dropped_routes_zero_token_rank", drop=0.3, empty_ranks=(1,), steps=2)),
        ("shm", Case("two_in_flight_zero_copy", interleave=True, steps=4, zero_copy=True)),
        ("shm", Case("top8_of_16_hidden_7168", experts_per_rank=8, top_k=8, hidden=7168, max_tokens=6)),
    ],
    4: [
        ("tcp", Case("fp8_hooks_dropped", hook=True, drop=0.2, steps=2)),
        ("tcp", Case("ue8m0_zero_token_ranks", round_scale=True, use_ue8m0=True, empty_ranks=(0, 3))),
        ("shm", Case("bf16_two_in_flight_hooks", use_fp8=False, interleave=True, hook=True, steps=4)),
        ("shm", Case("fp8_top1", top_k=1, experts_per_rank=2)),
    ],
    8: [
        ("shm", Case("fp8_top8_dropped", experts_per_rank=4, top_k=8, drop=0.2, empty_ranks=(5,), steps=2)),
        ("tcp", Case("round_scale_hooks_two_in_flight", round_scale=True, hook=True, interleave=True, steps=2)),
    ],
}


@pytest.mark.parametrize("world", list(WORLDS), ids=[f"{w}ranks" for w in WORLDS])
def test_low_latency_dispatch_and_combine_equal_deep_eps_semantics(world):
    cases = WORLDS[world]
    ran = launch.spawn(run_cases, world, args=(cases,), timeout_s=400)
    assert ran == [[f"{p}/{c.name}" for p, c in cases]] * world


def test_what_deep_eps_contract_forbids_is_refused_and_the_buffer_keeps_working():
    seen = launch.spawn(misuse, 2, timeout_s=120)
    assert len(seen[0]) == 4 and all("x:" in m or "use_ue8m0" in m or "hook" in m for m in seen[0])
