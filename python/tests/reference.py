"""An independent all-to-all in pure torch: the same step moved with torch.distributed.all_to_all_single
over the job's gloo group, and the arithmetic written out in fp32 operation by operation.

It follows the contract of include/ferry/ferry.h, not Ferry's code:
- expert e lives on rank e // experts_per_rank; a token travels once to every rank holding one of its
  experts; dp group g = ranks g*dp .. g*dp+dp-1 hold the same tokens, member m sends tokens t % dp == m;
- dispatch output: local expert e's rows start at e * max_rows, ordered by source rank then source
  token, then zero rows up to a multiple of expert_padding;
- combine: each receiving rank sums weight * expert_y over its experts of a token in route order, in
  fp32 from +0, rounds once to out_dtype (a partial); the token's source (every member of its dp group)
  sums the partials in fp32 in ascending rank order, after the previous value with accumulate, and
  rounds once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


def exchange(send: torch.Tensor, send_counts: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Rows of `send` (any dtype) to every rank: send_counts[d] consecutive rows go to rank d.
    Returns the rows received, ordered by source rank, and the count from each source."""
    world = dist.get_world_size()
    counts = torch.tensor(send_counts, dtype=torch.int64)
    recv_counts = torch.empty(world, dtype=torch.int64)
    dist.all_to_all_single(recv_counts, counts)
    recv_counts_list = recv_counts.tolist()
    row_shape = tuple(send.shape[1:])
    row_bytes = send.element_size() * (int(torch.tensor(row_shape).prod()) if row_shape else 1)
    raw = send.contiguous().reshape(-1).view(torch.uint8).reshape(send.shape[0], row_bytes)
    total = sum(recv_counts_list)
    out = torch.empty((total, row_bytes), dtype=torch.uint8)
    dist.all_to_all_single(out, raw, output_split_sizes=recv_counts_list, input_split_sizes=list(send_counts))
    return out.reshape(-1).view(send.dtype).reshape((total, *row_shape)), recv_counts_list


@dataclass
class DispatchResult:
    counts: torch.Tensor  # [num_local_experts] int32
    padded: list[int]  # rows written per local expert (count rounded up to expert_padding)
    expert_x: torch.Tensor  # [num_local_experts * max_rows, hidden] in_dtype (rows past `padded` are zero here)
    expert_x_scale: Optional[torch.Tensor]
    # what combine needs: per received record, its source rank, source token, and per route k the row
    # (or -1) and the weight
    record_src: torch.Tensor
    record_token: torch.Tensor
    record_rows: torch.Tensor  # [records, top_k] int64, -1 where route k is not to this rank
    record_weights: torch.Tensor  # [records, top_k] float32


def dispatch(x: torch.Tensor, x_scale: Optional[torch.Tensor], indices: torch.Tensor, weights: torch.Tensor, *,
             num_experts: int, max_rows: int, expert_padding: int, dp_size: int) -> DispatchResult:
    world, rank = dist.get_world_size(), dist.get_rank()
    epr = num_experts // world
    num_tokens, top_k = indices.shape
    idx = indices.to(torch.int64)
    owner = torch.where(idx >= 0, idx // epr, torch.full_like(idx, -1))
    member = rank % dp_size
    mine = torch.arange(member, max(member, num_tokens), dp_size, dtype=torch.int64)

    tokens_to, send_counts = [], []
    for d in range(world):
        goes = (owner[mine] == d).any(dim=1) if len(mine) else torch.zeros(0, dtype=torch.bool)
        tokens_to.append(mine[goes])
        send_counts.append(int(goes.sum()))
    order = torch.cat(tokens_to) if tokens_to else torch.zeros(0, dtype=torch.int64)
    dest = torch.repeat_interleave(torch.arange(world), torch.tensor(send_counts, dtype=torch.int64))
    # Per record: the source token, and per route the receiver's local expert (or -1) and weight.
    local = torch.where(owner[order] == dest[:, None], idx[order] % epr, torch.full_like(idx[order], -1))
    meta = torch.cat([order[:, None], local], dim=1)
    route_w = torch.where(local >= 0, weights[order], torch.zeros_like(weights[order]))

    recv_x, recv_counts = exchange(x[order], send_counts)
    recv_meta, _ = exchange(meta, send_counts)
    recv_w, _ = exchange(route_w, send_counts)
    recv_scale = exchange(x_scale[order], send_counts)[0] if x_scale is not None else None
    num_records = recv_x.shape[0]
    src = torch.repeat_interleave(torch.arange(world), torch.tensor(recv_counts, dtype=torch.int64))

    hidden = x.shape[1]
    out_x = torch.zeros((epr * max_rows, hidden), dtype=x.dtype)
    out_scale = torch.zeros((epr * max_rows, x_scale.shape[1]), dtype=torch.float32) if x_scale is not None else None
    rows = torch.full((num_records, top_k), -1, dtype=torch.int64)
    counts, padded = [], []
    for e in range(epr):
        # Records arrive grouped by source rank, each source's in token order: that is the row order.
        hits = (recv_meta[:, 1:] == e).nonzero()
        records, routes = hits[:, 0], hits[:, 1]
        row = e * max_rows + torch.arange(len(records), dtype=torch.int64)
        rows[records, routes] = row
        out_x[row] = recv_x[records]
        if out_scale is not None:
            out_scale[row] = recv_scale[records]
        counts.append(len(records))
        padded.append(-(-len(records) // expert_padding) * expert_padding)
    return DispatchResult(torch.tensor(counts, dtype=torch.int32), padded, out_x, out_scale, src, recv_meta[:, 0],
                          rows, recv_w)


def combine(d: DispatchResult, expert_y: torch.Tensor, num_tokens: int, *, dp_size: int,
            previous: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out_tokens of this rank for the dispatch `d`, given expert_y [local rows, hidden] of out_dtype."""
    world, rank = dist.get_world_size(), dist.get_rank()
    out_dtype, hidden = expert_y.dtype, expert_y.shape[1]
    num_records, top_k = d.record_rows.shape
    acc = torch.zeros((num_records, hidden), dtype=torch.float32)
    for k in range(top_k):
        row = d.record_rows[:, k]
        term = d.record_weights[:, k:k + 1] * expert_y[row.clamp(min=0)].to(torch.float32)
        acc = acc + torch.where((row >= 0)[:, None], term, torch.zeros_like(term))
    partial = acc.to(out_dtype)

    # Partials of a record go back to every member of its source's dp group.
    send_parts, send_tokens, send_counts = [], [], []
    for q in range(world):
        group = range(q - q % dp_size, q - q % dp_size + dp_size)
        take = torch.isin(d.record_src, torch.tensor(list(group)))
        send_parts.append(partial[take])
        send_tokens.append(d.record_token[take])
        send_counts.append(int(take.sum()))
    back, back_counts = exchange(torch.cat(send_parts), send_counts)
    back_tokens, _ = exchange(torch.cat(send_tokens), send_counts)

    total = torch.zeros((num_tokens, hidden), dtype=torch.float32)
    if previous is not None:
        total = total + previous.to(torch.float32)
    start = 0
    for src in range(world):  # ascending destination rank: the order the partials are added in
        n = back_counts[src]
        term = torch.zeros((num_tokens, hidden), dtype=torch.float32)
        term[back_tokens[start:start + n]] = back[start:start + n].to(torch.float32)
        total = total + term
        start += n
    return total.to(out_dtype)
