"""python -m ferry.bench: dispatch/combine latency through the Python layer, printed the way DeepEP's
tests/test_low_latency.py prints it, with the same steps issued from C++ in the same run so the
Python layer's own cost per call is measured, not guessed.

    python -m ferry.bench --world-size 2 --provider shm                   # local ranks, CPU tensors
    torchrun --nproc-per-node 8 -m ferry.bench --device cuda --provider efa

Per rank: avg/min/max and p50/p99 of dispatch and of combine (each call blocks until its data is
in place), the split halves (send + recv), bandwidth from the bytes this rank sent; then, pooled
over all ranks, the same calls looped in C++ (one binding call for the whole loop) and the Python
layer's cost per call: the wall time of each Python call minus the time it spent inside libferry.

--api deep_ep times ferry.deep_ep's low_latency_dispatch (bf16 tokens, cast to fp8 inside with
--dtype fp8) and low_latency_combine instead, the halves through return_recv_hook.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

DTYPES = {"fp8": "float8_e4m3fn", "bf16": "bfloat16", "f16": "float16", "f32": "float32"}


def parse_args(argv: Any = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ferry.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2, help="local ranks to start (ignored under torchrun)")
    p.add_argument("--provider", default=None, help="libfabric provider: efa, tcp, shm, verbs (default $FERRY_PROVIDER or tcp)")
    p.add_argument("--device", default="cpu", help="cpu (host backend) or cuda")
    p.add_argument("--tokens", type=int, default=128, help="tokens per rank (decode: 128)")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--dtype", default="fp8", choices=sorted(DTYPES), help="dispatch dtype (fp8 carries block scales)")
    p.add_argument("--scale-block", type=int, default=128, help="elements per fp32 scale with --dtype fp8")
    p.add_argument("--out-dtype", default="bf16", choices=["bf16", "f16", "f32"])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--timeout-ms", type=int, default=60000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api", default="all_to_all", choices=["all_to_all", "deep_ep"],
                   help="ferry.AllToAll (pplx shape) or ferry.deep_ep (DeepEP's low-latency Buffer)")
    return p.parse_args(argv)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values_us: list[float]) -> dict[str, float]:
    return dict(p50=percentile(values_us, 0.5), p99=percentile(values_us, 0.99), avg=statistics.fmean(values_us),
                min=min(values_us), max=max(values_us))


def run_rank(rank: int, world_size: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    import ferry

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    in_dtype, out_dtype = getattr(torch, DTYPES[args.dtype]), getattr(torch, DTYPES[args.out_dtype])
    scales = args.hidden // args.scale_block if args.dtype == "fp8" else None
    a2a = ferry.AllToAll(max_num_tokens=args.tokens, num_experts=args.experts, hidden_dim=args.hidden,
                         hidden_dim_scale=scales, in_dtype=in_dtype, out_dtype=out_dtype,
                         scale_dtype=torch.float32 if scales else None, num_experts_per_token=args.topk,
                         device=device, provider=args.provider, timeout_ms=args.timeout_ms)
    gen = torch.Generator().manual_seed(args.seed + rank)
    T, H, K = args.tokens, args.hidden, args.topk
    x = torch.randn((T, H), generator=gen).to(in_dtype).to(device)
    x_scale = (torch.rand((T, scales), generator=gen) + 0.5).to(device) if scales else None
    indices = torch.rand((T, args.experts), generator=gen).topk(K, dim=1).indices.to(torch.int32).to(device)
    weights = torch.rand((T, K), generator=gen).to(device)
    counts, expert_x, expert_x_scale = a2a.empty_dispatch_outputs()
    expert_y = torch.randn(expert_x.shape, generator=gen).to(out_dtype).to(device)
    out = torch.empty((T, H), dtype=out_dtype, device=device)

    def dispatch(**kw: Any) -> Any:
        return a2a.dispatch(counts, expert_x, expert_x_scale, x, x_scale, indices, weights, **kw)

    def combine(**kw: Any) -> Any:
        return a2a.combine(out, indices, weights, expert_y, **kw)

    for _ in range(args.warmup):
        dispatch()
        combine()
    dist.barrier()

    ns = time.perf_counter_ns
    disp, comb, disp_lib, comb_lib = [], [], [], []
    for _ in range(args.iters):
        t0 = ns()
        dispatch()
        t1 = ns()
        disp_lib.append(a2a._last_call_ns)
        combine()
        t2 = ns()
        comb_lib.append(a2a._last_call_ns)
        disp.append((t1 - t0) / 1e3)
        comb.append((t2 - t1) / 1e3)
    stats = a2a.stats()
    dist.barrier()

    halves: dict[str, list[float]] = {"dispatch_send": [], "dispatch_recv": [], "combine_send": [], "combine_recv": []}
    for _ in range(args.iters):
        t0 = ns()
        h = dispatch(do_recv=False)
        t1 = ns()
        h.recv()
        t2 = ns()
        c = combine(do_recv=False)
        t3 = ns()
        c.recv()
        t4 = ns()
        halves["dispatch_send"].append((t1 - t0) / 1e3)
        halves["dispatch_recv"].append((t2 - t1) / 1e3)
        halves["combine_send"].append((t3 - t2) / 1e3)
        halves["combine_recv"].append((t4 - t3) / 1e3)
    dist.barrier()

    # The same steps from C++: the addresses the Python layer passes, one binding call for the loop.
    ptr = lambda t: t.data_ptr() if t is not None else 0  # noqa: E731
    stream = torch.cuda.current_stream().cuda_stream if cuda else 0
    c_ns = a2a._impl.time_steps(ptr(counts), ptr(expert_x), ptr(expert_x_scale), ptr(x), ptr(x_scale), ptr(indices),
                                ptr(weights), T, ptr(expert_y), ptr(out), args.iters, stream)
    a2a.close()
    return dict(rank=rank, dispatch=disp, combine=comb, dispatch_lib=[v / 1e3 for v in disp_lib],
                combine_lib=[v / 1e3 for v in comb_lib], halves=halves, c_dispatch=[v / 1e3 for v in c_ns[0::2]],
                c_combine=[v / 1e3 for v in c_ns[1::2]], stats=stats)


def run_rank_deep_ep(rank: int, world_size: int, args: argparse.Namespace) -> dict[str, Any]:
    """The same loops through ferry.deep_ep's Buffer (DeepEP's test_low_latency.py calls)."""
    import torch
    import torch.distributed as dist

    from ferry import deep_ep

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    use_fp8 = args.dtype == "fp8"
    buffer = deep_ep.Buffer(dist.group.WORLD, low_latency_mode=True, provider=args.provider,
                            timeout_ms=args.timeout_ms)
    gen = torch.Generator().manual_seed(args.seed + rank)
    T, H, K, E = args.tokens, args.hidden, args.topk, args.experts
    x = torch.randn((T, H), generator=gen).to(torch.bfloat16).to(device)
    topk_idx = torch.rand((T, E), generator=gen).topk(K, dim=1).indices.to(device)
    weights = torch.rand((T, K), generator=gen).to(device)
    y = torch.randn((E // world_size, world_size * T, H), generator=gen).to(torch.bfloat16).to(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(hook: bool = False) -> tuple:
        return buffer.low_latency_dispatch(x, topk_idx, T, E, use_fp8=use_fp8, return_recv_hook=hook)

    for _ in range(args.warmup):
        handle = step()[2]
        buffer.low_latency_combine(y, topk_idx, weights, handle)
    dist.barrier()
    ns = time.perf_counter_ns
    disp, comb = [], []
    for _ in range(args.iters):
        t0 = ns()
        handle = step()[2]
        sync()
        t1 = ns()
        buffer.low_latency_combine(y, topk_idx, weights, handle)
        sync()
        disp.append((t1 - t0) / 1e3)
        comb.append((ns() - t1) / 1e3)
    lane = handle.lane
    stats = lane.a2a.stats()
    dist.barrier()
    halves: dict[str, list[float]] = {"dispatch_send": [], "dispatch_recv": [], "combine_send": [], "combine_recv": []}
    for _ in range(args.iters):
        t0 = ns()
        _, _, handle, _, hook = step(hook=True)
        sync()
        t1 = ns()
        hook()
        sync()
        t2 = ns()
        _, _, hook = buffer.low_latency_combine(y, topk_idx, weights, handle, return_recv_hook=True)
        sync()
        t3 = ns()
        hook()
        sync()
        t4 = ns()
        for key, a, b in (("dispatch_send", t0, t1), ("dispatch_recv", t1, t2), ("combine_send", t2, t3),
                          ("combine_recv", t3, t4)):
            halves[key].append((b - a) / 1e3)
    dist.barrier()
    buffer.destroy()
    return dict(rank=rank, dispatch=disp, combine=comb, halves=halves, stats=stats)


def report(results: list[dict[str, Any]], args: argparse.Namespace, world_size: int) -> None:
    for r in results:
        rank, d, c = r["rank"], summary(r["dispatch"]), summary(r["combine"])
        both = summary([a + b for a, b in zip(r["dispatch"], r["combine"])])
        db, cb = r["stats"]["dispatch_bytes_sent"], r["stats"]["combine_bytes_sent"]
        h = {k: statistics.fmean(v) for k, v in r["halves"].items()}
        print(f"[rank {rank}] Dispatch + combine bandwidth: {(db + cb) / 1e3 / both['avg']:.2f} GB/s, "
              f"avg_t={both['avg']:.2f} us, min_t={both['min']:.2f} us, max_t={both['max']:.2f} us")
        print(f"[rank {rank}] Dispatch bandwidth: {db / 1e3 / d['avg']:.2f} GB/s, avg_t={d['avg']:.2f} us | "
              f"Combine bandwidth: {cb / 1e3 / c['avg']:.2f} GB/s, avg_t={c['avg']:.2f} us")
        print(f"[rank {rank}] Dispatch send/recv time: {h['dispatch_send']:.2f} + {h['dispatch_recv']:.2f} us | "
              f"Combine send/recv time: {h['combine_send']:.2f} + {h['combine_recv']:.2f} us")
        print(f"[rank {rank}] Dispatch p50={d['p50']:.2f} us, p99={d['p99']:.2f} us | "
              f"Combine p50={c['p50']:.2f} us, p99={c['p99']:.2f} us")

    def pooled(key: str) -> list[float]:
        return [v for r in results for v in r[key]]

    scale = f" (+{args.hidden // args.scale_block} fp32 scales)" if args.dtype == "fp8" else ""
    print(f"\nferry.bench: {world_size} ranks, provider {args.provider or os.environ.get('FERRY_PROVIDER', 'tcp')}, "
          f"device {args.device}, {args.tokens} tokens x {args.hidden} {args.dtype}{scale} -> {args.out_dtype}, "
          f"top-{args.topk} of {args.experts} experts, {args.iters} iterations (bandwidth: bytes this rank sent)")
    print(f"{'all ranks, us':34s}{'p50':>10s}{'p99':>10s}{'avg':>10s}{'min':>10s}{'max':>10s}")
    rows = [("dispatch, Python call", pooled("dispatch")), ("combine, Python call", pooled("combine"))]
    if args.api == "all_to_all":
        rows += [("dispatch, C++ loop", pooled("c_dispatch")), ("combine, C++ loop", pooled("c_combine"))]
        overhead_d = [a - b for r in results for a, b in zip(r["dispatch"], r["dispatch_lib"])]
        overhead_c = [a - b for r in results for a, b in zip(r["combine"], r["combine_lib"])]
        rows += [("dispatch, Python layer per call", overhead_d), ("combine, Python layer per call", overhead_c)]
    for name, values in rows:
        s = summary(values)
        print(f"{name:34s}{s['p50']:10.2f}{s['p99']:10.2f}{s['avg']:10.2f}{s['min']:10.2f}{s['max']:10.2f}")
    if args.api == "all_to_all":
        print("Python layer per call = wall time of the Python call minus the time the same call spent in libferry "
              "(argument checks, binding, GIL release).")
    else:
        print("ferry.deep_ep: bf16 tokens in" + (", cast to fp8 with one scale per 128 inside the dispatch"
                                                 if args.dtype == "fp8" else "") + "; combine weighs at combine.")


def _spawned(rank: int, world_size: int, args: argparse.Namespace) -> dict[str, Any]:
    return (run_rank_deep_ep if args.api == "deep_ep" else run_rank)(rank, world_size, args)


def main(argv: Any = None) -> None:
    args = parse_args(argv)
    if os.environ.get("RANK") is not None and os.environ.get("WORLD_SIZE") is not None:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        result = _spawned(rank, world, args)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0:
            report(gathered, args, world)
        dist.destroy_process_group()
        return
    from ferry import launch

    results = launch.spawn(_spawned, args.world_size, args=(args,), timeout_s=max(120.0, args.timeout_ms / 1e3 * 4))
    report(results, args, args.world_size)


if __name__ == "__main__":
    main()
