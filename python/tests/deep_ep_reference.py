"""DeepEP's low-latency semantics in plain torch, from every rank's inputs, for checking ferry.deep_ep:
which tokens reach each local expert, in what order, with what counts and sources; the fp8 cast (as
ferry.h and DeepEP state it, computed here with torch's own operations); and the weighted combine.
Independent of the library: no wire format, no Ferry code."""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 128
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4


def cast_fp8(x: torch.Tensor, round_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 [n, hidden] -> (fp8 e4m3 [n, hidden], float32 scales [n, hidden // 128]): per block of 128,
    amax over the finite elements floored at 1e-4; scale = amax * float32(1/448) and x * (448 / amax),
    or with round_scale the power of two at or above that scale and x times its inverse; the product
    rounds to the nearest fp8, saturating at +-448."""
    n, hidden = x.shape
    blocks = x.to(torch.float32).reshape(n, hidden // BLOCK, BLOCK)
    finite = torch.where(torch.isfinite(blocks), blocks.abs(), torch.zeros_like(blocks))
    amax = finite.amax(dim=2).clamp(min=torch.tensor(AMAX_FLOOR, dtype=torch.float32))
    inv = torch.tensor(1.0 / FP8_MAX, dtype=torch.float32)
    scale = amax * inv
    multiplier = torch.tensor(FP8_MAX, dtype=torch.float32) / amax
    if round_scale:
        mantissa, exponent = torch.frexp(scale)  # scale = m * 2^e, m in [0.5, 1)
        power = torch.where(mantissa == 0.5, exponent - 1, exponent)
        scale = torch.ldexp(torch.ones_like(scale), power)
        multiplier = torch.ldexp(torch.ones_like(scale), -power)
    scaled = blocks * multiplier[:, :, None]
    q = scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(n, hidden), scale


def dequant(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 [n, hidden] times its float32 scales [n, hidden // 128], as float32."""
    n, hidden = q.shape
    return (q.to(torch.float32).reshape(n, hidden // BLOCK, BLOCK) * scale[:, :, None]).reshape(n, hidden)


@dataclass
class RankInputs:
    x: torch.Tensor          # [n, hidden] bf16
    topk_idx: torch.Tensor   # [n, top_k] int64, -1: no route
    weights: torch.Tensor    # [n, top_k] float32
    round_scale: bool


@dataclass
class Received:
    """What one rank's local experts receive."""
    counts: list[int]               # rows per local expert
    rows: list[torch.Tensor]        # per local expert: [count, hidden] bf16 or fp8
    scales: list[torch.Tensor]      # per local expert: [count, hidden // 128] float32 (fp8 only)
    src_token: list[torch.Tensor]   # per local expert: [count] int32
    per_rank: torch.Tensor          # [local experts, world] rows from each rank


def dispatch(inputs: list[RankInputs], rank: int, num_experts: int, use_fp8: bool) -> Received:
    """Rows of local expert e: every (source rank, token) naming expert e, by source rank then token."""
    world = len(inputs)
    local = num_experts // world
    counts, rows, scales, src, per_rank = [], [], [], [], torch.zeros((local, world), dtype=torch.int32)
    for e in range(local):
        expert = rank * local + e
        parts, part_scales, tokens = [], [], []
        for s, inp in enumerate(inputs):
            hit = (inp.topk_idx == expert).any(dim=1).nonzero().flatten()
            per_rank[e, s] = len(hit)
            if use_fp8:
                q, sc = cast_fp8(inp.x[hit], inp.round_scale)
                parts.append(q)
                part_scales.append(sc)
            else:
                parts.append(inp.x[hit])
            tokens.append(hit.to(torch.int32))
        rows.append(torch.cat(parts))
        scales.append(torch.cat(part_scales) if use_fp8 else None)
        src.append(torch.cat(tokens))
        counts.append(len(rows[-1]))
    return Received(counts, rows, scales, src, per_rank)


def expert_fn(values: torch.Tensor, expert: int) -> torch.Tensor:
    """What the test's expert computes from a received row (float32): a gain and an offset per expert."""
    return (values * ((expert % 5) + 1) / 4 + expert / 64).to(torch.bfloat16)


def combine(inp: RankInputs, num_experts: int, use_fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """out[t] = sum over t's routes k of weights[t, k] * expert_fn(row of t as expert k received it),
    in float32, as bf16; and the sum of the terms' magnitudes (what a rounding error scales with)."""
    n, hidden = inp.x.shape
    if use_fp8:
        q, sc = cast_fp8(inp.x, inp.round_scale)
        values = dequant(q, sc)
    else:
        values = inp.x.to(torch.float32)
    out = torch.zeros((n, hidden), dtype=torch.float32)
    magnitude = torch.zeros((n, hidden), dtype=torch.float32)
    for t in range(n):
        for k in range(inp.topk_idx.shape[1]):
            e = int(inp.topk_idx[t, k])
            if e >= 0:
                term = inp.weights[t, k] * expert_fn(values[t:t + 1], e)[0].to(torch.float32)
                out[t] += term
                magnitude[t] += term.abs()
    return out.to(torch.bfloat16), magnitude
