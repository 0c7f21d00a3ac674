"""One MoE layer with expert parallelism through ferry.AllToAll, checked against a dense torch MoE.

    torchrun --nproc-per-node 4 python/examples/moe_layer.py                      # CPU tensors
    torchrun --nproc-per-node 8 python/examples/moe_layer.py --device cuda        # one GPU per rank

Every rank routes its own tokens (router, top-k, softmax over the chosen logits), dispatches them
to the ranks holding their experts, runs its local experts (a SwiGLU MLP each, batched expert-major
layout: expert e's rows are out_expert_x[e, :out_expert_num_tokens[e]]), and combines the outputs
back, weighted. The same layer computed densely (every expert's weights on every rank, a loop over
tokens' experts) must give the same output within the rounding of the dtypes in between.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ferry


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--tokens", type=int, default=32, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--experts-per-rank", type=int, default=4)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f32"], help="activations that travel")
    p.add_argument("--provider", default=None, help="libfabric provider (default $FERRY_PROVIDER or tcp)")
    return p.parse_args()


class Experts(torch.nn.Module):
    """Every expert's SwiGLU weights (the same on every rank: seeded), so the dense reference can run."""

    def __init__(self, num_experts: int, hidden: int, ffn: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1234)
        self.router = torch.randn(hidden, num_experts, generator=gen) / hidden**0.5
        self.w_gate = torch.randn(num_experts, hidden, ffn, generator=gen) / hidden**0.5
        self.w_up = torch.randn(num_experts, hidden, ffn, generator=gen) / hidden**0.5
        self.w_down = torch.randn(num_experts, ffn, hidden, generator=gen) / ffn**0.5

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return (F.silu(x @ self.w_gate[e]) * (x @ self.w_up[e])) @ self.w_down[e]


def route(x: torch.Tensor, router: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits = x.float() @ router
    weights, indices = logits.topk(topk, dim=1)
    return indices.to(torch.int32), weights.softmax(dim=1)


def main() -> None:
    args = parse_args()
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # NCCL on GPUs is fine: Ferry then runs its setup allgather over a gloo group on the same ranks.
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    num_experts = args.experts_per_rank * world
    model = Experts(num_experts, args.hidden, args.ffn).to(device)

    a2a = ferry.AllToAll(max_num_tokens=args.tokens, num_experts=num_experts, expert_padding=1,
                         hidden_dim=args.hidden, in_dtype=dtype, out_dtype=dtype,
                         num_experts_per_token=args.topk, device=device, global_group=dist.group.WORLD,
                         provider=args.provider)

    # This rank's tokens and their routes.
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, args.hidden, generator=gen).to(device)
    indices, weights = route(x, model.router, args.topk)
    dp_x = x.to(dtype)

    # Dispatch: tokens to the ranks of their experts, expert-major.
    out_expert_num_tokens, out_expert_x, _ = a2a.empty_dispatch_outputs()
    a2a.dispatch(out_expert_num_tokens, out_expert_x, None, dp_x, None, indices, weights)

    # Local experts on their rows (expert e of this rank is global expert rank * experts_per_rank + e).
    expert_y = a2a.empty_expert_y()
    for e in range(a2a.num_local_experts):
        n = int(out_expert_num_tokens[e])
        if n:
            rows = out_expert_x[e, :n].float()
            expert_y[e, :n] = model.expert(rank * a2a.num_local_experts + e, rows).to(dtype)

    # Combine: the weighted sum of each token's expert outputs, back on its rank.
    out = torch.empty(args.tokens, args.hidden, dtype=dtype, device=device)
    a2a.combine(out, indices, weights, expert_y)

    # The dense MoE on the same (rounded) inputs.
    ref = torch.zeros(args.tokens, args.hidden, device=device)
    xin = dp_x.float()
    for t in range(args.tokens):
        for k in range(args.topk):
            e = int(indices[t, k])
            ref[t] += weights[t, k] * model.expert(e, xin[t:t + 1])[0].to(dtype).float()
    err = (out.float() - ref).abs().max().item()
    scale = ref.abs().max().item()
    tolerance = (2e-2 if dtype == torch.bfloat16 else 1e-5) * max(scale, 1.0)
    ok = err <= tolerance
    counts = out_expert_num_tokens.tolist()
    print(f"rank {rank}/{world}: rows per local expert {counts}, max |ferry - dense| = {err:.3g} "
          f"(tolerance {tolerance:.3g}, |dense| up to {scale:.3g}): {'PASS' if ok else 'FAIL'}", flush=True)
    a2a.close()
    results = [None] * world
    dist.all_gather_object(results, ok)
    dist.destroy_process_group()
    if not all(results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
