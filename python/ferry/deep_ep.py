"""``ferry.deep_ep``: DeepEP's low-latency ``Buffer`` on Ferry, for serving stacks that call DeepEP
(vLLM's ``deepep_low_latency`` all2all backend, SGLang's ``deepep`` backend in low-latency mode).

    from ferry import deep_ep                      # instead of: import deep_ep
    buffer = deep_ep.Buffer(group, num_rdma_bytes=..., low_latency_mode=True, num_qps_per_rank=...)
    recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(
        x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8=True)
    combined_x, event, hook = buffer.low_latency_combine(expert_out, topk_idx, topk_weights, handle)

Names, argument order, defaults, return tuples, shapes, dtypes and strides are DeepEP's: bf16
tokens in; with ``use_fp8`` they are cast to fp8 e4m3 with one float32 scale per 128 elements inside
the dispatch (``round_scale`` rounds the scales up to powers of two, ``use_ue8m0`` packs their
exponents four to an int32); ``recv_x`` is ``[num_local_experts, num_ranks *
num_max_dispatch_tokens_per_rank, hidden]`` and its scales ``[..., hidden // 128]`` (``// 512``
packed) with the last two dimensions column-major; ``recv_count[e]`` counts the rows of local expert
``e``; combine returns the sum over each token's experts of ``topk_weights`` times the expert
outputs, in bf16. ``return_recv_hook=True`` runs only the send half (Ferry's SEND) and returns a
hook that runs the receive half (RECV). CPU tensors run on Ferry's host backend, CUDA tensors on its
CUDA backend (graph-capturable once the first call of a shape has created the buffers).

Where Ferry differs from DeepEP:

- Buffers. ``num_nvl_bytes``, ``num_rdma_bytes``, ``num_qps_per_rank`` and the NVSHMEM options are
  accepted and not used: Ferry sizes its own buffers for each shape (tokens, hidden, experts, top-k,
  fp8 or not) at the first low-latency call with it, which every rank makes together (collective).
  ``get_low_latency_rdma_size_hint`` returns what Ferry registers for a shape at most. A dispatch is
  combined once: a handle whose combine has run is refused (DeepEP lets its own test combine one
  dispatch twice; serving stacks do not).
  ``low_latency_mode`` is accepted either way: Ferry has the low-latency interface only (the
  normal-mode methods raise ``NotImplementedError``). ``clean_low_latency_buffer`` has nothing to
  clean. Results live in per-shape buffers of which there are two, as in DeepEP: at most two
  dispatches may be waiting for their combine, and a result is overwritten two dispatches later.
- Order of received rows. DeepEP fills a local expert's rows in arrival order; Ferry's order is
  fixed: by source rank, then by source token. A token with two experts on one rank travels there
  once (fewer bytes than DeepEP, same rows).
- ``handle``: a 5-tuple like DeepEP's, ``(src_info, layout_range, num_max_dispatch_tokens_per_rank,
  hidden, num_experts)``: ``src_info[e, i]`` is row ``i``'s token index on its source rank,
  ``layout_range[e, r]`` packs the rows from rank ``r`` as ``begin << 32 | count``; Ferry's state
  for the combine rides along on the tuple.
- ``topk_idx``: ``torch.int64`` (``topk_idx_t``) as DeepEP, or ``torch.int32``; ids must lie in
  ``[0, num_experts)`` or be -1, and a token may not name one expert twice (an error, naming the
  token, on every rank).
- ``cumulative_local_expert_recv_stats`` gets ``recv_count`` added (as DeepEP);
  ``dispatch_wait_recv_cost_stats`` and ``combine_wait_recv_cost_stats`` are accepted and left as
  they are (Ferry does not time its waits per token).
- ``use_logfmt`` is accepted and combine travels in bf16 (more exact than LogFMT, more bytes).
  ``zero_copy`` reads the expert outputs from ``get_next_low_latency_combine_buffer(handle)``
  (a tensor of this shape's buffers) instead of ``x``, as DeepEP's does.
- ``async_finish``: Ferry runs on the current stream, so the returned event is already ordered
  before later work on it; ``event.current_stream_wait()`` is cheap, and a no-op on CPU tensors.
- Numerics: the fp8 cast is DeepEP's, byte for byte, for finite inputs (ferry.h states it); an
  infinity saturates to +-448 and does not set its block's scale. Combine sums in fp32 in top-k
  order and rounds once to bf16.
- ``group``: a ``torch.distributed`` group (``comm`` from mpi4py is not supported). Ferry's setup
  runs an allgather on a CPU group over the same ranks (created collectively when ``group`` is
  NCCL). ``provider`` and ``timeout_ms`` (keyword-only, Ferry's own) pick the libfabric provider
  (``$FERRY_PROVIDER``, else tcp; ``efa`` on AWS) and every wait's deadline.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ferry.all_to_all import AllToAll, buffer_sizes
from ferry.bootstrap import Bootstrap

topk_idx_t = torch.int64  # DeepEP's type of topk_idx (int32 is accepted too)

_SCALE_BLOCK = 128  # DeepEP's low-latency cast: one scale per 128 elements
_MAX_TOP_K = 8      # FERRY_MAX_TOP_K
_LANES = 2          # DeepEP's two low-latency buffers


class EventOverlap:
    """DeepEP's event wrapper. Ferry's work is on the current stream already, so waiting on the
    event orders nothing new; it is kept so code written for DeepEP runs unchanged."""

    def __init__(self, event: Optional[Any] = None, extra_tensors: Optional[tuple] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.current_stream_wait()


class Config:
    """DeepEP's tuning config of the normal (high-throughput) kernels; Ferry has no such kernels,
    the values are kept and not used."""

    def __init__(self, num_sms: int = 20, *args: int) -> None:
        self.num_sms = num_sms
        self.args = args


class _Lane:
    """One of a shape's two Ferry all-to-alls and the result tensors it writes (DeepEP's two buffers)."""

    def __init__(self, a2a: AllToAll, device: torch.device, use_fp8: bool) -> None:
        L, M, H, R = a2a.num_local_experts, a2a.max_tokens_per_expert, a2a.hidden_dim, a2a.world_size
        self.a2a = a2a
        self.recv_x = torch.empty((L, M, H), dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16, device=device)
        self.scales = torch.empty((L, H // _SCALE_BLOCK, M), dtype=torch.float32, device=device) if use_fp8 else None
        self.ue8m0: Optional[torch.Tensor] = None  # [L, ceil(S / 4), M] int32, made at its first use
        self.recv_count = torch.empty((L,), dtype=torch.int32, device=device)
        self.src_info = torch.empty((L, M), dtype=torch.int32, device=device)
        self.per_rank = torch.empty((L, R), dtype=torch.int32, device=device)
        self.layout_range = torch.empty((L, R), dtype=torch.int64, device=device)
        self.indices = torch.empty((a2a.max_num_tokens, a2a.num_experts_per_token), dtype=torch.int32, device=device)
        self.combine_buffer: Optional[torch.Tensor] = None  # [L, M, H] bf16, get_next_low_latency_combine_buffer
        self.step = 0          # dispatches begun on this lane
        self.busy = False      # dispatched, its combine not yet received
        self.received = False  # the dispatch's receive half ran
        self.num_tokens = 0


class _Handle(tuple):
    """DeepEP's low-latency handle ``(src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden,
    num_experts)``, carrying the lane and step of Ferry's all-to-all it came from."""

    lane: _Lane
    step: int

    def __new__(cls, items: tuple, lane: _Lane, step: int) -> "_Handle":
        self = super().__new__(cls, items)
        self.lane = lane
        self.step = step
        return self


def _group_of(group: Any, comm: Any) -> Any:
    if group is not None:
        return group
    if comm is not None:
        raise ValueError("comm: an mpi4py communicator, which Ferry's DeepEP interface does not take; pass group "
                         "(a torch.distributed process group)")
    raise ValueError("group: None, expected a torch.distributed process group (DeepEP: 'Either group or comm')")


def _event(async_finish: bool, device: torch.device) -> EventOverlap:
    if async_finish and device.type == "cuda":
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return EventOverlap(event)
    return EventOverlap(None)


class Buffer:
    """DeepEP's communication buffer, low-latency mode, on Ferry. See the module's docstring for what
    differs; every argument of DeepEP's constructor is accepted."""

    num_sms: int = 20

    def __init__(
        self,
        group: Optional[dist.ProcessGroup],
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        use_fabric: bool = False,
        explicitly_destroy: bool = False,
        enable_shrink: bool = False,
        comm: Optional[Any] = None,
        *,
        provider: Optional[str] = None,
        timeout_ms: int = 30000,
    ) -> None:
        self.group = _group_of(group, comm)
        self.rank = dist.get_rank(self.group)
        self.group_size = dist.get_world_size(self.group)
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = enable_shrink
        self._provider = provider
        self._timeout_ms = timeout_ms
        # Collective now, as DeepEP's constructor is: every rank builds its Buffer together.
        self._bootstrap: Optional[Bootstrap] = Bootstrap.from_process_group(self.group)
        self._lanes: dict[tuple, list[_Lane]] = {}
        self._next_lane: dict[tuple, int] = {}

    # ---- DeepEP's static helpers --------------------------------------------------------------------

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """Bytes Ferry registers for this shape at most: its two all-to-alls with bf16 tokens and the
        largest top-k (Ferry allocates them itself; the value is for sizing, as DeepEP's)."""
        sizes = buffer_sizes(world_size=num_ranks, max_num_tokens=num_max_dispatch_tokens_per_rank,
                             num_experts=num_experts, hidden_dim=hidden, in_dtype=torch.bfloat16,
                             out_dtype=torch.bfloat16, num_experts_per_token=min(_MAX_TOP_K, num_experts),
                             combine_weights="combine")
        return _LANES * int(sizes["total_registered_bytes"])

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        assert new_num_sms % 2 == 0, "The SM count must be even"
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An event on the current CUDA stream (DeepEP's Buffer.capture)."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream())
        return EventOverlap(event)

    @staticmethod
    def is_sm90_compiled() -> bool:
        return True

    # ---- low-latency mode ---------------------------------------------------------------------------

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Nothing to clean: Ferry's buffers need no zeroing between steps or modes."""
        self._live()

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
        dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> tuple:
        """Sends each token (bf16 ``x [num_tokens, hidden]``, cast to fp8 with ``use_fp8``) to the
        ranks of its ``topk_idx [num_tokens, num_topk]`` experts. Returns ``(recv_x, recv_count, handle,
        event, hook)``: ``recv_x`` is ``[num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank,
        hidden]`` (with ``use_fp8`` a tuple with its scales), ``recv_count [num_local_experts]`` int32."""
        self._live()
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype != torch.bfloat16:
            raise ValueError(f"x: {_describe(x)}, expected a torch.bfloat16 tensor [num_tokens, hidden]")
        if not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2 or topk_idx.size(0) != x.size(0) or \
                topk_idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"topk_idx: {_describe(topk_idx)}, expected torch.int64 (or int32) [num_tokens="
                             f"{x.size(0)}, num_topk]")
        if use_ue8m0 and not (use_fp8 and round_scale):
            raise ValueError("use_ue8m0: True needs use_fp8 and round_scale (UE8M0 holds powers of two; DeepEP: "
                             "'UE8M0 SF requires round_scale=True')")
        num_tokens, hidden = x.shape
        if num_tokens > num_max_dispatch_tokens_per_rank:
            raise ValueError(f"x: {num_tokens} tokens, expected at most num_max_dispatch_tokens_per_rank="
                             f"{num_max_dispatch_tokens_per_rank}")
        if use_fp8 and hidden % _SCALE_BLOCK:
            raise ValueError(f"x: hidden {hidden}, expected a multiple of {_SCALE_BLOCK} with use_fp8 (one scale "
                             f"per {_SCALE_BLOCK} elements)")
        key = (num_max_dispatch_tokens_per_rank, hidden, num_experts, topk_idx.size(1), bool(use_fp8), x.device)
        lane = self._free_lane(key)
        lane.step += 1
        lane.busy, lane.received, lane.num_tokens = True, False, num_tokens
        indices = lane.indices[:num_tokens]
        indices.copy_(topk_idx)
        scales = None
        if use_fp8:
            if use_ue8m0 and lane.ue8m0 is None:
                L, S, M = lane.scales.shape
                lane.ue8m0 = torch.empty((L, (S + 3) // 4, M), dtype=torch.int32, device=x.device)
            scales = lane.ue8m0 if use_ue8m0 else lane.scales
        sent = lane.a2a.dispatch(
            lane.recv_count, lane.recv_x, scales, x.contiguous(), None, indices, None, do_send=True,
            do_recv=not return_recv_hook, quantize=use_fp8, round_scale=use_fp8 and round_scale,
            scale_layout=("ue8m0" if use_ue8m0 else "column") if use_fp8 else "row",
            out_expert_src_token=lane.src_info, out_expert_num_tokens_per_rank=lane.per_rank)

        def finish() -> None:
            if sent is not None:
                sent.recv()
            lane.received = True
            # rows from rank r start after those from ranks before it: begin << 32 | count
            counts = lane.per_rank.to(torch.int64)
            lane.layout_range.copy_(((torch.cumsum(counts, dim=1) - counts) << 32) | counts)
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats.add_(lane.recv_count.to(cumulative_local_expert_recv_stats.dtype))

        hook: Optional[Callable[[], None]] = None
        if return_recv_hook:
            hook = _once(finish)
        else:
            finish()
        if use_fp8:
            recv_x: Any = (lane.recv_x, scales.transpose(1, 2))
        else:
            recv_x = lane.recv_x
        handle = _Handle((lane.src_info, lane.layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts),
                         lane, lane.step)
        return recv_x, lane.recv_count, handle, _event(async_finish, x.device), hook

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: tuple,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: Optional[torch.Tensor] = None,
        combine_wait_recv_cost_stats: Optional[torch.Tensor] = None,
    ) -> tuple:
        """Brings the expert outputs ``x [num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank,
        hidden]`` (bf16) back to the tokens' ranks and sums them with ``topk_weights [num_tokens, num_topk]``.
        Returns ``(combined_x [num_tokens, hidden] bf16, event, hook)``."""
        self._live()
        lane = self._lane_of(handle)
        a2a = lane.a2a
        n, H = lane.num_tokens, a2a.hidden_dim
        shape = (a2a.num_local_experts, a2a.max_tokens_per_expert, H)
        if zero_copy:
            if lane.combine_buffer is None:
                raise ValueError("zero_copy: True, but get_next_low_latency_combine_buffer(handle) was not called "
                                 "for this shape")
            x = lane.combine_buffer
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape or x.dtype != torch.bfloat16:
            raise ValueError(f"x: {_describe(x)}, expected torch.bfloat16 {list(shape)} (num_local_experts, "
                             "num_ranks * num_max_dispatch_tokens_per_rank, hidden)")
        if not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2 or topk_idx.size(0) != n:
            raise ValueError(f"topk_idx: {_describe(topk_idx)}, expected the dispatch's [{n}, num_topk]")
        if not isinstance(topk_weights, torch.Tensor) or tuple(topk_weights.shape) != tuple(topk_idx.shape):
            raise ValueError(f"topk_weights: {_describe(topk_weights)}, expected torch.float32 "
                             f"{list(topk_idx.shape)} (topk_idx's shape)")
        weights = topk_weights.to(torch.float32).contiguous()
        if out is None:
            out = torch.empty((n, H), dtype=torch.bfloat16, device=x.device)
        elif not isinstance(out, torch.Tensor) or tuple(out.shape) != (n, H) or out.dtype != torch.bfloat16:
            raise ValueError(f"out: {_describe(out)}, expected torch.bfloat16 [{n}, {H}]")
        sent = a2a.combine(out, lane.indices[:n], weights, x.contiguous(), do_send=True,
                           do_recv=not return_recv_hook)

        def finish() -> None:
            if sent is not None:
                sent.recv()
            lane.busy = False

        hook: Optional[Callable[[], None]] = None
        if return_recv_hook:
            hook = _once(finish)
        else:
            finish()
        return out, _event(async_finish, x.device), hook

    def get_next_low_latency_combine_buffer(self, handle: tuple) -> torch.Tensor:
        """The bf16 tensor ``[num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank, hidden]`` that
        ``low_latency_combine(..., zero_copy=True)`` reads the expert outputs from."""
        self._live()
        lane = self._lane_of(handle, for_combine=False)
        if lane.combine_buffer is None:
            a2a = lane.a2a
            lane.combine_buffer = torch.empty((a2a.num_local_experts, a2a.max_tokens_per_expert, a2a.hidden_dim),
                                              dtype=torch.bfloat16, device=lane.recv_x.device)
        return lane.combine_buffer

    def destroy(self) -> None:
        """Releases every all-to-all and the bootstrap (not collective)."""
        lanes, self._lanes = self._lanes, {}
        for shape_lanes in lanes.values():
            for lane in shape_lanes:
                lane.a2a.close()
        bootstrap, self._bootstrap = self._bootstrap, None
        if bootstrap is not None:
            bootstrap.close()

    def __del__(self) -> None:
        try:
            self.destroy()
        except Exception:
            pass

    # ---- DeepEP's normal (high-throughput) mode: not offered -----------------------------------------

    def get_dispatch_layout(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(_NORMAL_MODE)

    def dispatch(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(_NORMAL_MODE)

    def combine(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(_NORMAL_MODE)

    # ---- internals ---------------------------------------------------------------------------------

    def _live(self) -> None:
        if self._bootstrap is None:
            raise RuntimeError("Buffer: destroyed")

    def _free_lane(self, key: tuple) -> _Lane:
        """The next of the shape's lanes whose last step is complete, in turn; a second lane is made
        (collectively: every rank makes the same calls) when the first still waits for its combine."""
        lanes = self._lanes.setdefault(key, [])
        start = self._next_lane.get(key, 0)
        for i in range(len(lanes)):
            lane = lanes[(start + i) % len(lanes)]
            if not lane.busy:
                self._next_lane[key] = (start + i + 1) % _LANES
                return lane
        if len(lanes) == _LANES:
            raise RuntimeError("low_latency_dispatch: two earlier dispatches of this shape still wait for their "
                               "low_latency_combine; as DeepEP (two buffers), at most two may be in flight")
        T, hidden, num_experts, top_k, use_fp8, device = key
        a2a = AllToAll(max_num_tokens=T, num_experts=num_experts, hidden_dim=hidden,
                       hidden_dim_scale=hidden // _SCALE_BLOCK if use_fp8 else None,
                       in_dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16, out_dtype=torch.bfloat16,
                       scale_dtype=torch.float32 if use_fp8 else None, num_experts_per_token=top_k, device=device,
                       bootstrap=self._bootstrap, provider=self._provider, timeout_ms=self._timeout_ms,
                       combine_weights="combine")
        lanes.append(_Lane(a2a, device, use_fp8))
        self._next_lane[key] = len(lanes) % _LANES
        return lanes[-1]

    def _lane_of(self, handle: Any, for_combine: bool = True) -> _Lane:
        if not isinstance(handle, _Handle):
            raise ValueError(f"handle: {type(handle).__name__}, expected the handle low_latency_dispatch returned")
        lane = handle.lane
        if lane.step != handle.step or (for_combine and not lane.busy):
            raise ValueError("handle: from an earlier dispatch whose buffers were reused or already combined")
        if for_combine and not lane.received:
            raise ValueError("handle: its dispatch's receive hook has not run yet (call hook() first)")
        return lane


_NORMAL_MODE = ("Ferry offers DeepEP's low-latency interface (low_latency_dispatch / low_latency_combine) only, "
                "not the normal-mode dispatch and combine")


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    done = False

    def hook() -> None:
        nonlocal done
        if not done:
            done = True
            fn()

    return hook


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} {list(t.shape)} on {t.device}"
    return type(t).__name__


def alias_path() -> str:
    """A directory holding a ``deep_ep`` package that is this module: put it first on PYTHONPATH to
    run unmodified code that imports ``deep_ep`` (python/README.md). It refuses to load where a
    real DeepEP is installed, unless FERRY_DEEP_EP_OVERRIDE=1."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "_alias")


__all__ = ["Buffer", "Config", "EventOverlap", "alias_path", "topk_idx_t"]

if __name__ == "__main__":  # python -m ferry.deep_ep: the PYTHONPATH entry for the alias
    sys.stdout.write(alias_path() + "\n")
