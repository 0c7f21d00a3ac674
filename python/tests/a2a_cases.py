"""What each rank of a test world runs: ferry.AllToAll steps checked byte for byte against the
pure-torch reference (reference.py), and the error cases. Imported by the spawned ranks."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

import ferry
import reference
from ferry import launch

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32, "fp8": torch.float8_e4m3fn}
SENTINEL = 0x5A  # bytes of outputs before a call: what the library must not write stays this


@dataclass(frozen=True)
class Case:
    name: str
    experts_per_rank: int = 2
    top_k: int = 2
    hidden: int = 64
    max_tokens: int = 12
    in_dtype: str = "bf16"
    out_dtype: str = "bf16"
    hidden_dim_scale: Optional[int] = None  # fp8: one fp32 scale per hidden / hidden_dim_scale elements
    expert_padding: int = 1
    dp_size: int = 1
    empty_groups: tuple = ()  # dp groups (ranks when dp_size 1) that pass zero tokens
    drop: float = 0.0  # fraction of routes set to -1
    steps: int = 1
    split: bool = False  # send and receive halves called separately, work in between
    skew_rank: int = -1  # this rank sleeps between the halves
    accumulate: bool = False
    bound_m: bool = False  # a bound_m below num_tokens
    flat_layout: bool = False  # outputs as [rows, hidden] instead of [experts, rows, hidden]
    index_dtype: str = "int32"
    bootstrap: str = "group"  # group: the torch process group; env: torchrun variables; tcp: explicit
    seed: int = 0
    extra: dict = field(default_factory=dict, hash=False, compare=False)


def make_inputs(case: Case, world: int, group: int, step: int):
    """A dp group's tokens for one step (every member of the group builds the same)."""
    gen = torch.Generator().manual_seed(case.seed * 1_000_003 + step * 7919 + group * 31 + 1)
    num_experts = case.experts_per_rank * world
    tokens = 0 if group in case.empty_groups else int(torch.randint(1, case.max_tokens + 1, (1,), generator=gen))
    if case.bound_m and tokens < 2:
        tokens = 2
    x = torch.randn((tokens, case.hidden), generator=gen).to(DTYPES[case.in_dtype])
    x_scale = None
    if case.hidden_dim_scale:
        x_scale = torch.rand((tokens, case.hidden_dim_scale), generator=gen) + 0.5
    scores = torch.rand((tokens, num_experts), generator=gen)
    indices = scores.topk(case.top_k, dim=1).indices.to(torch.int32)
    if case.drop:
        indices[torch.rand(indices.shape, generator=gen) < case.drop] = -1
    weights = torch.rand((tokens, case.top_k), generator=gen)
    previous = torch.randn((tokens, case.hidden), generator=gen).to(DTYPES[case.out_dtype])
    return x, x_scale, indices, weights, previous


def expert_fn(expert_x: torch.Tensor, expert_x_scale: Optional[torch.Tensor], num_local_experts: int,
              out_dtype: torch.dtype) -> torch.Tensor:
    """What the local experts compute: row * scale * (e + 1) / 4 + e / 8 (rows flattened)."""
    x = expert_x.reshape(-1, expert_x.shape[-1]).to(torch.float32)
    if expert_x_scale is not None:
        s = expert_x_scale.reshape(x.shape[0], -1)
        x = x * s.repeat_interleave(x.shape[1] // s.shape[1], dim=1)
    e = torch.arange(num_local_experts, dtype=torch.float32).repeat_interleave(x.shape[0] // num_local_experts)
    return (x * ((e[:, None] + 1) / 4) + e[:, None] / 8).to(out_dtype)


def first_difference(what: str, got: torch.Tensor, want: torch.Tensor) -> str:
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{what}: {tuple(got.shape)} {got.dtype} vs reference {tuple(want.shape)} {want.dtype}"
    row = math.prod(got.shape[1:])
    g, w = (t.contiguous().reshape(t.shape[0], row).view(torch.uint8) for t in (got, want))
    bad = (g != w).any(dim=1).nonzero()
    if len(bad) == 0:
        return ""
    r = int(bad[0])
    return (f"{what}: {len(bad)} rows differ from the reference, first row {r}: got {got[r].flatten()[:6].tolist()} "
            f"want {want[r].flatten()[:6].tolist()}")


def sentinel_like(shape, dtype, device="cpu") -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    t.view(torch.uint8).fill_(SENTINEL)
    return t


def dp_group_of(case: Case, world: int):
    """The caller's dp group, created on every rank (new_group is collective over the world)."""
    if case.dp_size == 1:
        return None
    mine = None
    for g in range(world // case.dp_size):
        pg = dist.new_group(list(range(g * case.dp_size, (g + 1) * case.dp_size)), backend="gloo")
        if g == dist.get_rank() // case.dp_size:
            mine = pg
    return mine


def make_a2a(case: Case, world: int, provider: str, **overrides) -> ferry.AllToAll:
    args = dict(max_num_tokens=case.max_tokens, num_experts=case.experts_per_rank * world,
                expert_padding=case.expert_padding, hidden_dim=case.hidden, hidden_dim_scale=case.hidden_dim_scale,
                in_dtype=DTYPES[case.in_dtype], out_dtype=DTYPES[case.out_dtype],
                scale_dtype=torch.float32 if case.hidden_dim_scale else None, num_experts_per_token=case.top_k,
                device="cpu", dp_group=dp_group_of(case, world), provider=provider, timeout_ms=20000)
    args.update(overrides)
    if case.bootstrap == "group":
        return ferry.AllToAll(**args)
    # Ferry's own rendezvous, on a port of its own (rank 0's torch store holds MASTER_PORT).
    port = [launch.free_port() if dist.get_rank() == 0 else 0]
    dist.broadcast_object_list(port, src=0)
    if case.bootstrap == "env":
        saved = os.environ["MASTER_PORT"]
        os.environ["MASTER_PORT"] = str(port[0])
        try:
            boot = ferry.Bootstrap.from_env(20000)
        finally:
            os.environ["MASTER_PORT"] = saved
    else:
        boot = ferry.Bootstrap.tcp("127.0.0.1", port[0], dist.get_rank(), world, 20000)
    a2a = ferry.AllToAll(**args, bootstrap=boot)
    boot.close()  # released when the all-to-all closes
    return a2a


def run_step(a2a: ferry.AllToAll, case: Case, world: int, rank: int, step: int) -> list[str]:
    """One dispatch + combine through Ferry (on the all-to-all's device) and through the reference
    (on the CPU); the differences found."""
    dev = a2a.device
    x, x_scale, indices, weights, previous = make_inputs(case, world, rank // case.dp_size, step)
    tokens = x.shape[0]
    count = tokens - 1 if case.bound_m else tokens
    bound_m = torch.tensor([count], dtype=torch.int32, device=dev) if case.bound_m else None
    routes = (indices.view(torch.uint32) if case.index_dtype == "uint32" else indices).to(dev)
    x_d, w_d = x.to(dev), weights.to(dev)
    x_scale_d = x_scale.to(dev) if x_scale is not None else None

    L, M, H = a2a.num_local_experts, a2a.max_tokens_per_expert, a2a.hidden_dim
    shape = (L * M, H) if case.flat_layout else (L, M, H)
    counts = sentinel_like((L,), torch.int32, dev)
    expert_x = sentinel_like(shape, a2a.in_dtype, dev)
    expert_x_scale = None
    if case.hidden_dim_scale:
        expert_x_scale = sentinel_like(shape[:-1] + (case.hidden_dim_scale,), torch.float32, dev)

    if case.split:
        handle = a2a.dispatch(counts, expert_x, expert_x_scale, x_d, x_scale_d, routes, w_d, bound_m, do_recv=False)
        assert isinstance(handle, ferry.DispatchHandle)
        _work(rank, case)
        handle.recv()
        handle.recv()  # a second recv() does nothing
    else:
        assert a2a.dispatch(counts, expert_x, expert_x_scale, x_d, x_scale_d, routes, w_d, bound_m) is None

    want = reference.dispatch(x[:count], x_scale[:count] if x_scale is not None else None, indices[:count],
                              weights[:count], num_experts=a2a.num_experts, max_rows=M,
                              expert_padding=case.expert_padding, dp_size=case.dp_size)
    problems = []
    got_counts = counts.cpu()
    if not torch.equal(got_counts, want.counts):
        problems.append(f"out_expert_num_tokens {got_counts.tolist()} vs reference {want.counts.tolist()}")
    got_x = expert_x.cpu()
    got_scale = expert_x_scale.cpu() if expert_x_scale is not None else None
    flat_x = got_x.reshape(L * M, H)
    flat_scale = got_scale.reshape(L * M, -1) if got_scale is not None else None
    untouched = sentinel_like((1, H), a2a.in_dtype).view(torch.uint8)
    for e in range(L):
        rows = slice(e * M, e * M + want.padded[e])
        problems.append(first_difference(f"out_expert_x expert {e}", flat_x[rows], want.expert_x[rows]))
        if flat_scale is not None:
            problems.append(first_difference(f"out_expert_x_scale expert {e}", flat_scale[rows],
                                             want.expert_x_scale[rows]))
        beyond = flat_x[e * M + want.padded[e]:(e + 1) * M].view(torch.uint8)
        if not bool((beyond == untouched).all()):
            problems.append(f"out_expert_x expert {e}: rows past the padded count were written")

    # The experts run on what arrived; the reference's experts on what it computed.
    expert_y = expert_fn(got_x, got_scale, L, a2a.out_dtype).reshape(shape).to(dev)
    want_y = expert_fn(want.expert_x, want.expert_x_scale, L, a2a.out_dtype)
    before = previous.clone() if case.accumulate else sentinel_like((tokens, H), a2a.out_dtype)
    out = before.to(dev, copy=True)
    if case.split:
        handle = a2a.combine(out, routes, w_d, expert_y, bound_m, do_recv=False, accumulate=case.accumulate)
        assert isinstance(handle, ferry.CombineHandle)
        _work(rank, case)
        handle.recv()
    else:
        a2a.combine(out, routes, w_d, expert_y, bound_m, accumulate=case.accumulate)
    want_out = reference.combine(want, want_y, count, dp_size=case.dp_size,
                                 previous=previous[:count] if case.accumulate else None)
    got_out = out.cpu()
    problems.append(first_difference("out_tokens", got_out[:count], want_out))
    if count < tokens and not torch.equal(got_out[count:].view(torch.uint8), before[count:].view(torch.uint8)):
        problems.append("out_tokens: rows at or past bound_m were written")
    return [f"rank {rank} case {case.name} step {step}: {p}" for p in problems if p]


def _work(rank: int, case: Case) -> None:
    """Something to do between the halves (the shared expert, a GEMM); the skewed rank dawdles."""
    a = torch.randn(64, 64)
    for _ in range(4):
        a = torch.tanh(a @ a)
    if rank == case.skew_rank:
        time.sleep(0.05)


def run_cases(rank: int, world: int, cases: list[tuple[str, Case]], device: str = "cpu") -> list[str]:
    """Every (provider, case) on this rank; returns what ran (raises with every difference found).
    device "cuda": every rank of the world on the first GPU (CUDA tensors, CUDA backend)."""
    if device == "cuda":
        torch.cuda.set_device(0)
        device = "cuda:0"
    problems, ran = [], []
    for provider, case in cases:
        with make_a2a(case, world, provider, device=device) as a2a:
            for step in range(case.steps):
                problems += [f"{provider}: {p}" for p in run_step(a2a, case, world, rank, step)]
        ran.append(f"{provider}/{case.name}")
    assert not problems, "\n".join(problems[:20])
    return ran


def graph_replays(rank: int, world: int, provider: str, replays: int) -> int:
    """dispatch + expert + combine captured in one CUDA graph, replayed `replays` times over five
    input sets (copied into the captured tensors before each replay), equal the eager steps."""
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 0)
    case = Case("graph", top_k=4, hidden=256, max_tokens=16, in_dtype="fp8", hidden_dim_scale=2)
    a2a = make_a2a(case, world, provider, device=dev)
    T, H, K, S = case.max_tokens, case.hidden, case.top_k, case.hidden_dim_scale
    x = torch.zeros((T, H), dtype=torch.float8_e4m3fn, device=dev)
    x_scale = torch.ones((T, S), device=dev)
    indices = torch.full((T, K), -1, dtype=torch.int32, device=dev)
    weights = torch.zeros((T, K), device=dev)
    bound_m = torch.zeros((1,), dtype=torch.int32, device=dev)
    counts, expert_x, expert_x_scale = a2a.empty_dispatch_outputs()
    expert_y = a2a.empty_expert_y()
    out = torch.zeros((T, H), dtype=a2a.out_dtype, device=dev)

    def load(step: int) -> int:
        xs, ss, idx, w, _ = make_inputs(case, world, rank, step)
        n = xs.shape[0]
        x[:n].copy_(xs)
        x_scale[:n].copy_(ss)
        indices.fill_(-1)
        indices[:n].copy_(idx)
        weights[:n].copy_(w)
        bound_m.fill_(n)
        return n

    def step() -> None:
        a2a.dispatch(counts, expert_x, expert_x_scale, x, x_scale, indices, weights, bound_m)
        expert_y.copy_(expert_x)  # the expert: fp8 rows widened to bf16, in place (capturable)
        a2a.combine(out, indices, weights, expert_y, bound_m)

    eager = []
    for s in range(5):
        n = load(s)
        step()
        torch.cuda.synchronize()
        eager.append((n, counts.clone(), out[:n].clone()))

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize()
    for i in range(replays):
        n, want_counts, want_out = eager[i % 5]
        load(i % 5)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(counts, want_counts), f"rank {rank} replay {i}: counts {counts.tolist()} vs eager"
        assert torch.equal(out[:n].view(torch.uint8), want_out.view(torch.uint8)), \
            f"rank {rank} replay {i}: out_tokens differ from the eager step"
    a2a.close()
    return replays


# ---- errors ------------------------------------------------------------------------------------

def expect_error(kind: type, needle: str, call) -> str:
    """Runs call(); it must raise `kind` whose text contains `needle`. Returns the text."""
    try:
        call()
    except kind as e:
        text = str(e)
        assert needle in text, f"{kind.__name__} without {needle!r}: {text}"
        return text
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"expected {kind.__name__} containing {needle!r}, got {type(e).__name__}: {e}") from e
    raise AssertionError(f"expected {kind.__name__} containing {needle!r}, nothing was raised")


def argument_errors(rank: int, world: int, provider: str) -> int:
    """Every bad argument of dispatch and combine raises ValueError naming it, before anything moves;
    the all-to-all then runs a correct step. Returns the number of bad calls checked."""
    import numpy as np

    case = Case("argument_errors", hidden=64, max_tokens=12)
    a2a = make_a2a(case, world, provider)
    L, M, H, K = a2a.num_local_experts, a2a.max_tokens_per_expert, 64, case.top_k
    n = 5
    good = dict(out_expert_num_tokens=torch.zeros(L, dtype=torch.int32),
                out_expert_x=torch.zeros((L, M, H), dtype=torch.bfloat16), out_expert_x_scale=None,
                dp_x=torch.zeros((n, H), dtype=torch.bfloat16), dp_x_scale=None,
                indices=torch.zeros((n, K), dtype=torch.int32), weights=torch.zeros((n, K)))
    bad_dispatch = [
        ("dp_x", torch.zeros((n, H), dtype=torch.float32), "dp_x: dtype torch.float32, expected torch.bfloat16"),
        ("dp_x", torch.zeros((n, H + 16), dtype=torch.bfloat16), "dp_x: shape (5, 80), expected (5, 64)"),
        ("dp_x", torch.zeros((13, H), dtype=torch.bfloat16), "dp_x: 13 tokens, expected at most max_num_tokens=12"),
        ("dp_x", torch.zeros((H, n), dtype=torch.bfloat16).t(), "dp_x: strides (1, 5), expected a contiguous"),
        ("dp_x", torch.zeros(H, dtype=torch.bfloat16), "dp_x: shape (64,), expected 2 dimensions"),
        ("dp_x", [[0.0] * H] * n, "dp_x: list, expected a torch.Tensor or a numpy.ndarray"),
        ("dp_x", torch.zeros((n, H), dtype=torch.bfloat16, device="meta"), "dp_x: on meta, expected cpu"),
        ("dp_x", np.zeros((n, H), dtype=np.float64), "dp_x: numpy dtype float64, expected torch.bfloat16"),
        ("dp_x_scale", torch.ones((n, 2)), "dp_x_scale: expected None (this all-to-all has no hidden_dim_scale)"),
        ("indices", torch.zeros((n, K), dtype=torch.int64), "indices: dtype torch.int64, expected torch.int32 or"),
        ("indices", torch.zeros((n, K + 1), dtype=torch.int32), "indices: shape (5, 3), expected (5, 2)"),
        ("weights", torch.zeros((n, K), dtype=torch.bfloat16), "weights: dtype torch.bfloat16, expected torch.float32"),
        ("weights", torch.zeros((n - 1, K)), "weights: shape (4, 2), expected (5, 2)"),
        ("out_expert_num_tokens", torch.zeros(L, dtype=torch.int64), "out_expert_num_tokens: dtype torch.int64"),
        ("out_expert_num_tokens", torch.zeros(L + 1, dtype=torch.int32), "out_expert_num_tokens: shape (3,), expected (2,)"),
        ("out_expert_x", torch.zeros((L, M - 1, H), dtype=torch.bfloat16),
         f"out_expert_x: shape ({L}, {M - 1}, {H}), expected ({L}, {M}, {H}) or ({L * M}, {H})"),
        ("out_expert_x", torch.zeros((L, M, 2 * H), dtype=torch.bfloat16)[:, :, ::2],
         f"out_expert_x: strides ({2 * M * H}, {2 * H}, 2), expected a contiguous"),
        ("out_expert_x_scale", torch.zeros((L, M, 2)), "out_expert_x_scale: expected None"),
    ]
    readonly = np.zeros((L * M, H), dtype=np.uint16)
    readonly.flags.writeable = False
    bad_dispatch.append(("out_expert_x", readonly, "out_expert_x: read-only array"))
    checked = 0
    for name, value, needle in bad_dispatch:
        args = dict(good, **{name: value})
        expect_error(ValueError, needle, lambda: a2a.dispatch(**args))
        checked += 1
    expect_error(ValueError, "bound_m: shape (2,), expected (1,) or ()",
                 lambda: a2a.dispatch(**good, bound_m=torch.zeros(2, dtype=torch.int32)))
    expect_error(ValueError, "bound_m: dtype torch.int64, expected torch.int32",
                 lambda: a2a.dispatch(**good, bound_m=torch.zeros(1, dtype=torch.int64)))
    expect_error(ValueError, "do_send, do_recv: both False",
                 lambda: a2a.dispatch(**good, do_send=False, do_recv=False))
    out = torch.zeros((n, H), dtype=torch.bfloat16)
    y = torch.zeros((L, M, H), dtype=torch.bfloat16)
    idx, w = good["indices"], good["weights"]
    expect_error(ValueError, "expert_y: dtype torch.float32, expected torch.bfloat16",
                 lambda: a2a.combine(out, idx, w, y.float()))
    expect_error(ValueError, "out_tokens: shape (4, 64), expected (5, 64)", lambda: a2a.combine(out[:4], idx, w, y))
    expect_error(ValueError, "indices: shape (5, 2, 1), expected 2 dimensions",
                 lambda: a2a.combine(out, idx[:, :, None], w, y))
    expect_error(ValueError, "weights: dtype torch.float16", lambda: a2a.combine(out, idx, w.half(), y))
    expect_error(ValueError, "do_send, do_recv: both False",
                 lambda: a2a.combine(out, idx, w, y, do_send=False, do_recv=False))
    expect_error(ValueError, "dispatch_handle: tuple, expected a ferry.DispatchHandle",
                 lambda: a2a.combine_async(out_tokens=out, dispatch_handle=(), expert_y=y))
    checked += 9
    # Nothing reached the library: the next step is whole, and equals the reference.
    problems = run_step(a2a, case, world, rank, 0)
    assert not problems, "\n".join(problems)
    a2a.close()
    expect_error(ValueError, "AllToAll: closed", lambda: a2a.dispatch(**good))
    a2a.close()  # idempotent
    return checked


def library_errors(rank: int, world: int, bad_rank: int) -> list[str]:
    """`bad_rank` routes a token to an expert that does not exist: it gets FerryInvalidArgument (a
    ValueError too), every other rank FerryPeerFailed naming it, within the deadline; the step is
    over for everyone and a later call says the all-to-all must be recreated. Over tcp, then shm."""
    # dp groups of ranks that are not consecutive: refused on every rank before anything is set up.
    mine = [dist.new_group(g, backend="gloo") for g in ([0, 2], [1, 3])][rank % 2]
    expect_error(ValueError, f"dp_group: ranks {[rank % 2, rank % 2 + 2]} (positions",
                 lambda: make_a2a(Case("dp_not_consecutive"), world, "tcp", dp_group=mine))
    texts = []
    for provider in ("tcp", "shm"):
        case = Case("library_errors", top_k=2)
        a2a = make_a2a(case, world, provider, timeout_ms=15000)
        x, _, indices, weights, _ = make_inputs(case, world, rank, 0)
        if rank == bad_rank:
            indices[0, 0] = a2a.num_experts
        counts, ex, _ = a2a.empty_dispatch_outputs()
        start = time.monotonic()
        if rank == bad_rank:
            text = expect_error(ferry.FerryInvalidArgument, f"indices[0][0] = {a2a.num_experts} outside",
                                lambda: a2a.dispatch(counts, ex, None, x, None, indices, weights))
        else:
            text = expect_error(ferry.FerryPeerFailed, f"rank {bad_rank}",
                                lambda: a2a.dispatch(counts, ex, None, x, None, indices, weights))
        elapsed = time.monotonic() - start
        assert elapsed < 7.5, f"{provider}: failing took {elapsed:.1f} s, half the deadline is 7.5 s: {text}"
        expect_error(ferry.FerryInternalError, "must be recreated",
                     lambda: a2a.dispatch(counts, ex, None, x, None, indices, weights))
        a2a.close()
        texts.append(text)
    return texts


def killed_peer(rank: int, world: int, victim: int) -> list[str]:
    """After a good step on a tcp and a shm all-to-all, `victim` dies; on both, the others' next
    step raises FerryPeerFailed naming it within the deadline (nothing hangs)."""
    case = Case("killed_peer", top_k=2)
    a2as = {p: make_a2a(case, world, p, timeout_ms=5000) for p in ("tcp", "shm")}
    for a2a in a2as.values():
        problems = run_step(a2a, case, world, rank, 0)
        assert not problems, "\n".join(problems)
    dist.barrier()
    if rank == victim:
        os._exit(17)
    time.sleep(0.5)  # the victim is gone before anyone starts the step
    texts = []
    for provider, a2a in a2as.items():
        x, _, indices, weights, _ = make_inputs(case, world, rank, 1)
        counts, ex, _ = a2a.empty_dispatch_outputs()
        out = torch.zeros_like(x)

        def step():
            a2a.dispatch(counts, ex, None, x, None, indices, weights)
            y = expert_fn(ex, None, a2a.num_local_experts, a2a.out_dtype).view(ex.shape)
            a2a.combine(out, indices, weights, y)

        start = time.monotonic()
        text = expect_error(ferry.FerryPeerFailed, f"rank {victim}", step)
        elapsed = time.monotonic() - start
        assert elapsed < 5.0 + 3.0, f"{provider}: failing took {elapsed:.1f} s with a 5 s deadline: {text}"
        texts.append(text)
        a2a.close()
    return texts
