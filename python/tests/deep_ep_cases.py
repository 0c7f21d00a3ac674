"""What each rank of a ferry.deep_ep test world runs: DeepEP-shaped low-latency steps checked against
the pure-torch reference (deep_ep_reference.py). Imported by the spawned ranks."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import deep_ep_reference as ref
from ferry import deep_ep


@dataclass(frozen=True)
class Case:
    name: str
    experts_per_rank: int = 3
    top_k: int = 4
    hidden: int = 256
    max_tokens: int = 10
    use_fp8: bool = True
    round_scale: bool = False
    use_ue8m0: bool = False
    hook: bool = False             # return_recv_hook: send now, the hook receives after some work
    drop: float = 0.0              # fraction of routes set to -1
    empty_ranks: tuple = ()        # ranks that dispatch zero tokens
    steps: int = 1
    interleave: bool = False       # two dispatches before their two combines (both of DeepEP's buffers)
    zero_copy: bool = False        # expert outputs written into get_next_low_latency_combine_buffer
    async_finish: bool = False
    out: bool = False              # combine into a caller's tensor
    seed: int = 0


def make_inputs(case: Case, world: int, rank: int, step: int) -> ref.RankInputs:
    """One rank's tokens for a step; every rank can build every rank's."""
    gen = torch.Generator().manual_seed(case.seed * 1_000_003 + step * 7919 + rank * 31 + 1)
    num_experts = case.experts_per_rank * world
    n = 0 if rank in case.empty_ranks else int(torch.randint(1, case.max_tokens + 1, (1,), generator=gen))
    x = torch.randn((n, case.hidden), generator=gen)
    # blocks of widely different magnitudes, a zero block, so the per-block scales differ
    blocks = x.reshape(n, case.hidden // ref.BLOCK, ref.BLOCK)
    blocks *= torch.exp2(torch.randint(-12, 12, (n, blocks.shape[1], 1), generator=gen).to(torch.float32))
    if n and blocks.shape[1] > 1:
        blocks[:, 1] = 0
    x = x.to(torch.bfloat16)
    scores = torch.rand((n, num_experts), generator=gen)
    topk_idx = scores.topk(case.top_k, dim=1).indices.to(torch.int64)
    if case.drop:
        topk_idx[torch.rand(topk_idx.shape, generator=gen) < case.drop] = -1
    weights = torch.rand((n, case.top_k), generator=gen)
    return ref.RankInputs(x, topk_idx, weights, case.round_scale)


def dense(t: torch.Tensor) -> torch.Tensor:
    """A row-major copy (DeepEP's scales are column-major per expert)."""
    return t.clone(memory_format=torch.contiguous_format)


def _work(rank: int) -> None:
    """Something to do between a send half and its hook (the GEMM DeepEP's users overlap)."""
    a = torch.randn(96, 96)
    for _ in range(3):
        a = torch.tanh(a @ a)
    if rank == 0:
        time.sleep(0.02)


def check_dispatch(case: Case, buffer: deep_ep.Buffer, inputs: list, rank: int, recv_x, recv_count, handle,
                   stats: torch.Tensor) -> list[str]:
    world = len(inputs)
    num_experts = case.experts_per_rank * world
    want = ref.dispatch(inputs, rank, num_experts, case.use_fp8)
    problems = []
    M = world * case.max_tokens
    x, scales = recv_x if case.use_fp8 else (recv_x, None)
    L = case.experts_per_rank
    if tuple(x.shape) != (L, M, case.hidden):
        return [f"recv_x shape {tuple(x.shape)}, want {(L, M, case.hidden)}"]
    if x.dtype != (torch.float8_e4m3fn if case.use_fp8 else torch.bfloat16):
        problems.append(f"recv_x dtype {x.dtype}")
    if case.use_fp8:
        S = case.hidden // ref.BLOCK
        want_shape = (L, M, (S + 3) // 4) if case.use_ue8m0 else (L, M, S)
        want_stride = (M * want_shape[2], 1, M)
        if tuple(scales.shape) != want_shape or scales.stride() != want_stride:
            problems.append(f"scales {tuple(scales.shape)} strides {scales.stride()}, want {want_shape} {want_stride}")
        if scales.dtype != (torch.int32 if case.use_ue8m0 else torch.float32):
            problems.append(f"scales dtype {scales.dtype}")
    if recv_count.dtype != torch.int32 or recv_count.tolist() != want.counts:
        problems.append(f"recv_count {recv_count.tolist()}, want {want.counts}")
        return problems
    if not torch.equal(stats.cpu(), torch.tensor(want.counts, dtype=torch.int32)):
        problems.append(f"cumulative_local_expert_recv_stats {stats.tolist()}, want {want.counts}")
    src_info, layout_range, t_max, hidden, experts = handle
    if (t_max, hidden, experts) != (case.max_tokens, case.hidden, num_experts):
        problems.append(f"handle {(t_max, hidden, experts)}")
    begin = torch.cumsum(want.per_rank.to(torch.int64), dim=1) - want.per_rank.to(torch.int64)
    want_range = (begin << 32) | want.per_rank.to(torch.int64)
    if not torch.equal(layout_range.cpu(), want_range):
        problems.append(f"layout_range {layout_range.tolist()}, want {want_range.tolist()}")
    for e in range(L):
        n = want.counts[e]
        if not torch.equal(src_info[e, :n].cpu(), want.src_token[e]):
            problems.append(f"src_info of expert {e}: {src_info[e, :n].tolist()}, want {want.src_token[e].tolist()}")
        got = x[e, :n].cpu()
        if not torch.equal(got.view(torch.uint8), want.rows[e].view(torch.uint8)):
            bad = (got.view(torch.uint8) != want.rows[e].view(torch.uint8)).any(dim=1).nonzero().flatten()
            problems.append(f"recv_x expert {e}: rows {bad.tolist()} differ from the reference")
        if case.use_fp8:
            got_s = scales[e, :n].cpu()
            if case.use_ue8m0:
                # four exponent bytes per int32, scale 4g + j in byte j
                want_bytes = (want.scales[e].view(torch.int32) >> 23).to(torch.uint8)
                pad = got_s.shape[1] * 4 - want_bytes.shape[1]
                want_bytes = torch.cat([want_bytes, torch.zeros((n, pad), dtype=torch.uint8)], dim=1)
                if not torch.equal(dense(got_s).view(torch.uint8), want_bytes):
                    problems.append(f"UE8M0 scales of expert {e} differ from the reference")
            elif not torch.equal(dense(got_s).view(torch.int32), want.scales[e].view(torch.int32)):
                problems.append(f"scales of expert {e} differ from the reference")
    return problems


def expert_outputs(case: Case, recv_x, rank: int) -> torch.Tensor:
    """Every local expert's output rows (bf16 [L, M, hidden]) from what it received."""
    x, scales = recv_x if case.use_fp8 else (recv_x, None)
    L, M, H = x.shape
    if case.use_fp8:
        if case.use_ue8m0:
            exps = dense(scales).view(torch.uint8)[:, :, :H // ref.BLOCK].to(torch.int32)
            s = (exps << 23).view(torch.float32)
        else:
            s = dense(scales)
        values = ref.dequant(x.reshape(L * M, H), s.reshape(L * M, -1)).reshape(L, M, H)
    else:
        values = x.to(torch.float32)
    return torch.stack([ref.expert_fn(values[e], rank * L + e) for e in range(L)])


def check_combine(case: Case, inp: ref.RankInputs, got: torch.Tensor, world: int) -> list[str]:
    want, magnitude = ref.combine(inp, case.experts_per_rank * world, case.use_fp8)
    if tuple(got.shape) != tuple(want.shape) or got.dtype != torch.bfloat16:
        return [f"combined_x {got.dtype} {tuple(got.shape)}, want bf16 {tuple(want.shape)}"]
    # bf16: one rounding of an fp32 sum in Ferry and one here, each within 2^-8 of the magnitudes
    diff = (got.cpu().to(torch.float32) - want.to(torch.float32)).abs()
    bad = (diff > magnitude * 2 ** -7 + 1e-6).nonzero()
    if len(bad):
        t, h = bad[0].tolist()
        return [f"combined_x: {len(bad)} elements off, first token {t} element {h}: {float(got[t, h])} vs "
                f"{float(want[t, h])}"]
    return []


def run_case(case: Case, rank: int, world: int, buffer: deep_ep.Buffer, device: str = "cpu") -> list[str]:
    problems = []
    num_experts = case.experts_per_rank * world
    pending = []  # interleaved steps: (step, inputs, dispatch results)
    for step in range(case.steps):
        inputs = [make_inputs(case, world, r, step) for r in range(world)]
        mine = inputs[rank]
        stats = torch.zeros((case.experts_per_rank,), dtype=torch.int32, device=device)
        recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(
            mine.x.to(device), mine.topk_idx.to(device), case.max_tokens, num_experts,
            cumulative_local_expert_recv_stats=stats,
            use_fp8=case.use_fp8, round_scale=case.round_scale, use_ue8m0=case.use_ue8m0,
            async_finish=case.async_finish, return_recv_hook=case.hook)
        if case.hook:
            assert callable(hook), "return_recv_hook=True gave no hook"
            _work(rank)
            hook()
        else:
            assert hook is None, "a hook without return_recv_hook"
            event.current_stream_wait()
        problems += [f"step {step} dispatch: {p}" for p in
                     check_dispatch(case, buffer, inputs, rank, recv_x, recv_count, handle, stats)]
        pending.append((step, mine, recv_x, handle))
        if case.interleave and step % 2 == 0 and step + 1 < case.steps:
            continue  # the next dispatch goes out before this one's combine
        for s, inp, rx, h in pending:
            y = expert_outputs(case, rx, rank)
            if case.zero_copy:
                buffer.get_next_low_latency_combine_buffer(h)[:, :, :] = y
            out = torch.full((inp.x.shape[0], case.hidden), 7.0, dtype=torch.bfloat16, device=device) \
                if case.out else None
            combined, event, hook = buffer.low_latency_combine(
                y, inp.topk_idx.to(device), inp.weights.to(device), h, zero_copy=case.zero_copy,
                async_finish=case.async_finish, return_recv_hook=case.hook, out=out)
            if case.hook:
                _work(rank)
                hook()
            if case.out and combined is not out:
                problems.append(f"step {s} combine: out was given but another tensor came back")
            problems += [f"step {s} combine: {p}" for p in check_combine(case, inp, combined, world)]
        pending.clear()
    return problems


def run_cases(rank: int, world: int, cases: list[tuple[str, Case]], device: str = "cpu") -> list[str]:
    """Every (provider, case) on this rank, each on a fresh Buffer; returns what ran (raises with
    every difference found). device "cuda": every rank on the first GPU (CUDA backend)."""
    if device == "cuda":
        torch.cuda.set_device(0)
        device = "cuda:0"
    problems, ran = [], []
    for provider, case in cases:
        buffer = deep_ep.Buffer(dist.group.WORLD, low_latency_mode=True, provider=provider, timeout_ms=20000)
        try:
            problems += [f"{provider}/{case.name} rank {rank}: {p}"
                         for p in run_case(case, rank, world, buffer, device)]
        finally:
            buffer.destroy()
        ran.append(f"{provider}/{case.name}")
    assert not problems, "\n".join(problems[:20])
    return ran


def misuse(rank: int, world: int) -> list[str]:
    """What DeepEP's contract forbids is refused with an error naming the argument, before anything
    moves, and the Buffer keeps working. Returns the messages seen."""
    import pytest

    buffer = deep_ep.Buffer(dist.group.WORLD, low_latency_mode=True, provider="tcp", timeout_ms=20000)
    T, H, E, K = 4, 256, 2 * world, 2
    x = torch.randn((T, H)).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w = torch.rand((T, K))
    seen = []
    with pytest.raises(ValueError, match="x: torch.float32") as e:
        buffer.low_latency_dispatch(x.float(), idx, T, E)
    seen.append(str(e.value))
    with pytest.raises(ValueError, match="use_ue8m0: True needs use_fp8 and round_scale") as e:
        buffer.low_latency_dispatch(x, idx, T, E, use_ue8m0=True)
    seen.append(str(e.value))
    with pytest.raises(ValueError, match="expected at most num_max_dispatch_tokens_per_rank=2") as e:
        buffer.low_latency_dispatch(x, idx, 2, E)
    seen.append(str(e.value))
    with pytest.raises(NotImplementedError, match="low-latency interface"):
        buffer.dispatch(x)
    # A hook not yet run; a third dispatch while two wait for their combine; a handle combined twice.
    _, _, first, _, hook = buffer.low_latency_dispatch(x, idx, T, E, return_recv_hook=True)
    y = torch.zeros((E // world, world * T, H), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="receive hook has not run") as e:
        buffer.low_latency_combine(y, idx, w, first)
    seen.append(str(e.value))
    hook()
    _, _, second, _, _ = buffer.low_latency_dispatch(x, idx, T, E)
    with pytest.raises(RuntimeError, match="at most two may be in flight"):
        buffer.low_latency_dispatch(x, idx, T, E)
    for handle in (first, second):
        out, _, _ = buffer.low_latency_combine(y, idx, w, handle)
        assert bool((out == 0).all()), "zero expert outputs must combine to zero"
    with pytest.raises(ValueError, match="already combined"):
        buffer.low_latency_combine(y, idx, w, first)
    # still working: a regular step
    _, _, handle, _, _ = buffer.low_latency_dispatch(x, idx, T, E)
    buffer.low_latency_combine(y, idx, w, handle)
    buffer.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        buffer.low_latency_dispatch(x, idx, T, E)
    return seen
