"""A program written against DeepEP's documented low-latency API, exercising it the way DeepEP's own
test does: it imports ``deep_ep`` and nothing of Ferry. The harness (test_deep_ep_api.py) puts Ferry's
``deep_ep`` alias first on the path, so the only difference from running it on DeepEP is which
package that import finds, and the device (CPU tensors here, CUDA on a GPU).

Checked per rank, for bf16 and fp8 dispatch, rounded and UE8M0 scales, with and without the receive
hook: the rows each local expert receives (their count against every rank's routes, their values
against the sending rank and token they encode, the per-rank layout in the handle), the cumulative
receive statistics, and combine against the weighted sum of the inputs, from the expert outputs
and from the zero-copy buffer in turn (DeepEP's own test combines each dispatch twice; Ferry
combines a dispatch once)."""

from __future__ import annotations

import random

import torch
import torch.distributed as dist

import deep_ep

RANK_OFFSET = 128  # row values encode the sending rank as rank - 128 (exact in bf16 and fp8)


def cast_back(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp8 rows [..., hidden] and their scales [..., hidden // 128] (float32, or UE8M0 bytes packed
    in int32) back to bf16 values."""
    scales = scales.clone(memory_format=torch.contiguous_format)
    if scales.dtype == torch.int32:
        exponents = scales.view(torch.uint8).to(torch.int32)[..., :x.shape[-1] // 128]
        scales = (exponents << 23).view(torch.float32)
    rows = x.to(torch.float32).reshape(*x.shape[:-1], -1, 128)
    return (rows * scales.unsqueeze(-1)).reshape(x.shape).to(torch.bfloat16)


def relative_difference(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() + 1, y.double() + 1
    denominator = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denominator)


def check(rank: int, num_ranks: int, group: dist.ProcessGroup, num_tokens: int, hidden: int, num_experts: int,
          num_topk: int, device: str, seed: int = 0) -> int:
    torch.manual_seed(seed + rank)
    random.seed(seed + rank)
    num_local_experts = num_experts // num_ranks

    x = torch.ones((num_tokens, hidden), dtype=torch.bfloat16, device=device) * (rank - RANK_OFFSET)
    x[:, -128:] = torch.arange(num_tokens, device=device).to(torch.bfloat16).view(-1, 1)
    x_rand = torch.randn((num_tokens, hidden), dtype=torch.bfloat16, device=device) * 0.1
    scores = torch.randn((num_tokens, num_experts), dtype=torch.float32, device=device).abs() + 1
    topk_idx = torch.topk(scores, num_topk, dim=-1, largest=True, sorted=True)[1]
    topk_weights = torch.randn((num_tokens, num_topk), dtype=torch.float32, device=device).abs()
    for _ in range(10):
        topk_idx[random.randint(0, num_tokens - 1), random.randint(0, num_topk - 1)] = -1
    all_topk_idx = torch.empty((num_ranks * num_tokens, num_topk), dtype=topk_idx.dtype, device=device)
    dist.all_gather_into_tensor(all_topk_idx, topk_idx, group=group)
    all_topk_idx = all_topk_idx.view(num_ranks, num_tokens, num_topk)

    num_rdma_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(num_tokens, hidden, num_ranks, num_experts)
    buffer = deep_ep.Buffer(group, num_rdma_bytes=num_rdma_bytes, low_latency_mode=True,
                            num_qps_per_rank=num_experts // num_ranks)
    checked = 0
    for current_x in (x, x_rand):
        for return_recv_hook in (False, True):
            for use_fp8 in (False, True):
                for round_scale in (False, True) if use_fp8 else (False,):
                    for use_ue8m0 in (False, True) if round_scale else (False,):
                        stats = torch.zeros((num_local_experts,), dtype=torch.int, device=device)
                        packed_recv_x, packed_recv_count, handle, event, hook = buffer.low_latency_dispatch(
                            current_x, topk_idx, num_tokens, num_experts,
                            cumulative_local_expert_recv_stats=stats, use_fp8=use_fp8, round_scale=round_scale,
                            use_ue8m0=use_ue8m0, async_finish=not return_recv_hook,
                            return_recv_hook=return_recv_hook)
                        hook() if return_recv_hook else event.current_stream_wait()
                        if use_fp8:
                            received = cast_back(packed_recv_x[0], packed_recv_x[1])
                        else:
                            received = packed_recv_x
                        for i in range(num_local_experts):
                            expert_id = rank * num_local_experts + i
                            count = int(packed_recv_count[i])
                            src_info, layout_range = handle[0][i], handle[1][i]
                            assert int(stats[i]) == count, f"stats {int(stats[i])} != {count}"
                            assert count == int((all_topk_idx == expert_id).sum()), "rows != routes to the expert"
                            assert count == int((layout_range & (2 ** 32 - 1)).sum()), "layout counts != rows"
                            if current_x is x:
                                # Each row is the sending rank's value, its last 128 columns the token index:
                                # constant blocks, which the cast keeps exactly unless scales are rounded.
                                rows = received[i, :count]
                                amin = rows[:, :-128].amin(dim=-1)
                                assert torch.equal(amin, rows[:, :-128].amax(dim=-1)), "a row is not one value"
                                tokens = src_info[:count].to(torch.bfloat16)
                                if round_scale:
                                    assert relative_difference(rows[:, -1], tokens) < 0.007, "token column"
                                else:
                                    assert torch.equal(rows[:, -1], tokens), "token index column != src_info"
                                for j in range(num_ranks):
                                    begin = int(layout_range[j] >> 32)
                                    n = int(layout_range[j] & (2 ** 32 - 1))
                                    assert n == int((all_topk_idx[j] == expert_id).sum()), f"rows from rank {j}"
                                    if not round_scale:
                                        assert bool((amin[begin:begin + n] == j - RANK_OFFSET).all()), \
                                            f"rows from rank {j} carry another rank's value"
                        simulated_gemm_x = received.clone()
                        checked += 1
                        # One combine per dispatch (Ferry's handles are combined once): from x, or from
                        # the zero-copy buffer, in turn.
                        for zero_copy in (checked % 2 == 0,):
                            if zero_copy:
                                buffer.get_next_low_latency_combine_buffer(handle)[:, :, :] = simulated_gemm_x
                            out = torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=device)
                            combined_x, event, hook = buffer.low_latency_combine(
                                simulated_gemm_x, topk_idx, topk_weights, handle, async_finish=not return_recv_hook,
                                zero_copy=zero_copy, return_recv_hook=return_recv_hook, out=out)
                            hook() if return_recv_hook else event.current_stream_wait()
                            want = current_x.to(torch.float32) * \
                                topk_weights.masked_fill(topk_idx == -1, 0).sum(dim=1).view(-1, 1)
                            assert not bool(torch.isnan(combined_x).any()), "NaN in the combine"
                            diff = relative_difference(want, combined_x)
                            assert diff < (7e-4 if use_fp8 else 1e-5), f"combine: {diff=}, {use_fp8=}, {zero_copy=}"
    buffer.destroy()
    return checked
