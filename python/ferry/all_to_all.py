"""``ferry.AllToAll``: MoE dispatch and combine in the shape serving stacks already call.

The constructor takes pplx-garden's ``P2PAllToAll`` arguments; ``dispatch`` and ``combine`` take
pplx-kernels' ``AllToAll`` arguments (``do_send`` / ``do_recv`` halves) and pplx-garden's
``dispatch_async`` / ``combine_async`` return handles whose ``recv()`` finishes the half. The
library does the work; this layer checks every tensor and forwards addresses.
"""

from __future__ import annotations

import atexit
import weakref
from typing import Any, Optional

from ferry import _checks, _ferry
from ferry._checks import COUNT, FLOAT32, INT32, ROUTES, Device, optional_address, rows
from ferry.bootstrap import Bootstrap, group_rank

try:
    import torch
except ImportError:  # numpy-only use: host backend, explicit bootstrap
    torch = None  # type: ignore[assignment]

Tensor = Any  # torch.Tensor or numpy.ndarray

# Closed at interpreter exit, so no engine thread outlives the objects it writes into.
_open: "weakref.WeakSet[AllToAll]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for a2a in list(_open):
        try:
            a2a.close()
        except Exception:
            pass


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: {value!r}, expected an int >= {minimum}")
    if value < minimum:
        raise ValueError(f"{name}: {value}, expected an int >= {minimum}")
    return value


def _device_of(device: Any) -> Device:
    text = str(device) if device is not None else "cpu"
    kind, _, index = text.partition(":")
    if kind == "cpu" and not index:
        return Device(False, -1)
    if kind == "cuda":
        if torch is None:
            raise ValueError(f"device: {text!r} needs torch (CUDA tensors come from torch)")
        if index and not index.isdigit():
            raise ValueError(f"device: {text!r}, expected 'cpu', 'cuda' or 'cuda:N'")
        if not torch.cuda.is_available():
            raise ValueError(f"device: {text!r}, but torch sees no CUDA device (torch.cuda.is_available() is False)")
        if index:
            return Device(True, int(index))
        return Device(True, torch.cuda.current_device())
    raise ValueError(f"device: {text!r}, expected 'cpu', 'cuda' or 'cuda:N'")


_COMBINE_WEIGHTS = {"dispatch": _ferry.WEIGHTS_AT_DISPATCH, "combine": _ferry.WEIGHTS_AT_COMBINE}
_SCALE_LAYOUTS = {"row": _ferry.SCALE_ROW_MAJOR, "column": _ferry.SCALE_COLUMN_MAJOR,
                  "ue8m0": _ferry.SCALE_UE8M0_COLUMN_MAJOR}
BF16 = _checks.dtypes_of(_ferry.BF16)


def _torch_dtype(code: int) -> Any:
    return getattr(torch, _checks.DTYPE_NAMES[code]) if torch is not None else _checks.DTYPE_NAMES[code]


class _Settings:
    """The constructor's arguments, checked and translated into libferry's config."""

    def __init__(
        self,
        *,
        max_num_tokens: int,
        num_experts: int,
        expert_padding: int,
        hidden_dim: int,
        hidden_dim_scale: Optional[int],
        in_dtype: Any,
        out_dtype: Any,
        scale_dtype: Any,
        num_experts_per_token: int,
        nets_per_gpu: int,
        max_private_tokens: Optional[int],
        device: Any,
        provider: Optional[str],
        timeout_ms: int,
        combine_weights: str = "dispatch",
    ) -> None:
        self.max_num_tokens = _int("max_num_tokens", max_num_tokens, 1)
        if combine_weights not in _COMBINE_WEIGHTS:
            raise ValueError(f"combine_weights: {combine_weights!r}, expected 'dispatch' (the weights travel with "
                             "the tokens) or 'combine' (combine's receive half takes them)")
        self.combine_weights = combine_weights
        self.num_experts = _int("num_experts", num_experts, 1)
        self.expert_padding = _int("expert_padding", expert_padding, 1)
        self.hidden_dim = _int("hidden_dim", hidden_dim, 1)
        self.num_experts_per_token = _int("num_experts_per_token", num_experts_per_token, 1)
        self.nets_per_gpu = _int("nets_per_gpu", nets_per_gpu, 1)
        self.timeout_ms = _int("timeout_ms", timeout_ms, 0)
        self.private_tokens = -1 if max_private_tokens is None else _int("max_private_tokens", max_private_tokens, 0)
        self.in_code = _checks.dtype_code(in_dtype, "in_dtype")
        self.out_code = _checks.dtype_code(out_dtype, "out_dtype")
        if self.out_code == _ferry.FP8_E4M3:
            raise ValueError(f"out_dtype: {out_dtype!r}, expected torch.bfloat16, torch.float16 or torch.float32 "
                             "(combine sums in fp32 and rounds once to out_dtype)")
        if hidden_dim_scale is None:
            if scale_dtype is not None:
                raise ValueError(f"scale_dtype: {scale_dtype!r} without hidden_dim_scale; give both or neither")
            self.hidden_dim_scale = 0
            self.scale_block = 0
        else:
            self.hidden_dim_scale = _int("hidden_dim_scale", hidden_dim_scale, 1)
            if scale_dtype is None or _checks.dtype_code(scale_dtype, "scale_dtype") != _ferry.F32:
                raise ValueError(f"scale_dtype: {scale_dtype!r}, expected torch.float32 (one fp32 scale per block)")
            if self.hidden_dim % self.hidden_dim_scale:
                raise ValueError(f"hidden_dim_scale: {hidden_dim_scale} does not divide hidden_dim {hidden_dim}; "
                                 "Ferry carries one scale per equal block of hidden_dim / hidden_dim_scale elements")
            self.scale_block = self.hidden_dim // self.hidden_dim_scale
        if provider is not None and not isinstance(provider, str):
            raise ValueError(f"provider: {provider!r}, expected a libfabric provider name (efa, tcp, shm, verbs) or None")
        self.provider = provider
        self.device = _device_of(device)

    def config(self, rank: int, world_size: int, dp_size: int) -> Any:
        c = _ferry.Config()
        c.rank = rank
        c.world_size = world_size
        c.num_experts = self.num_experts
        c.experts_per_token = self.num_experts_per_token
        c.max_tokens_per_rank = self.max_num_tokens
        c.hidden_dim = self.hidden_dim
        c.in_dtype = self.in_code
        c.scale_block = self.scale_block
        c.out_dtype = self.out_code
        c.expert_alignment = self.expert_padding
        c.device = _ferry.DEVICE_CUDA if self.device.cuda else _ferry.DEVICE_HOST
        c.cuda_device = self.device.index
        c.nets_per_rank = self.nets_per_gpu
        c.provider = self.provider
        c.timeout_ms = self.timeout_ms
        c.dp_size = dp_size
        c.private_tokens = self.private_tokens
        c.combine_weights = _COMBINE_WEIGHTS[self.combine_weights]
        return c


def buffer_sizes(
    *,
    world_size: int,
    max_num_tokens: int,
    num_experts: int,
    hidden_dim: int,
    in_dtype: Any,
    out_dtype: Any,
    num_experts_per_token: int,
    expert_padding: int = 1,
    hidden_dim_scale: Optional[int] = None,
    scale_dtype: Any = None,
    max_private_tokens: Optional[int] = None,
    dp_size: int = 1,
    combine_weights: str = "dispatch",
) -> dict[str, int]:
    """Buffer sizes of an all-to-all of `world_size` ranks, without creating one (size EP64 anywhere)."""
    s = _Settings(max_num_tokens=max_num_tokens, num_experts=num_experts, expert_padding=expert_padding,
                  hidden_dim=hidden_dim, hidden_dim_scale=hidden_dim_scale, in_dtype=in_dtype, out_dtype=out_dtype,
                  scale_dtype=scale_dtype, num_experts_per_token=num_experts_per_token, nets_per_gpu=1,
                  max_private_tokens=max_private_tokens, device="cpu", provider=None, timeout_ms=0,
                  combine_weights=combine_weights)
    return _ferry.buffer_sizes(s.config(0, _int("world_size", world_size, 1), _int("dp_size", dp_size, 1)))


def _dp_size_of(dp_group: Any, dp_size: Optional[int], global_group: Any, rank: int, world_size: int) -> int:
    """The attention-DP group size, checked against Ferry's placement: consecutive ranks."""
    if dp_group is None:
        return 1 if dp_size is None else _int("dp_size", dp_size, 1)
    import torch.distributed as dist

    members = dist.get_process_group_ranks(dp_group)
    size = len(members)
    if dp_size is not None and dp_size != size:
        raise ValueError(f"dp_size: {dp_size}, but dp_group has {size} ranks")
    if global_group is not None and not isinstance(global_group, Bootstrap):
        order = dist.get_process_group_ranks(global_group)
        missing = [m for m in members if m not in order]
        if missing:
            raise ValueError(f"dp_group: ranks {missing} are not in global_group")
        positions = sorted(order.index(m) for m in members)
    else:
        positions = sorted(members)
    first = rank - rank % size
    if world_size % size or positions != list(range(first, first + size)):
        raise ValueError(
            f"dp_group: ranks {members} (positions {positions} in the all-to-all's group); Ferry needs every dp "
            f"group to be {size} consecutive ranks g*{size} .. g*{size}+{size - 1} of a world of {world_size}, and "
            f"this rank {rank} belongs to {list(range(first, first + size))}"
        )
    return size


class DispatchHandle:
    """The send half of a dispatch in flight; :meth:`recv` waits for the peers and unpacks."""

    __slots__ = ("kernel", "out_expert_num_tokens", "out_expert_x", "out_expert_x_scale", "dp_x", "dp_x_scale",
                 "indices", "weights", "bound_m", "options", "recv_done")

    def __init__(self, kernel: "AllToAll", out_expert_num_tokens: Tensor, out_expert_x: Tensor,
                 out_expert_x_scale: Optional[Tensor], dp_x: Tensor, dp_x_scale: Optional[Tensor], indices: Tensor,
                 weights: Tensor, bound_m: Optional[Tensor], options: Optional[dict] = None) -> None:
        self.kernel = kernel
        self.out_expert_num_tokens = out_expert_num_tokens
        self.out_expert_x = out_expert_x
        self.out_expert_x_scale = out_expert_x_scale
        self.dp_x = dp_x
        self.dp_x_scale = dp_x_scale
        self.indices = indices
        self.weights = weights
        self.bound_m = bound_m
        self.options = options or {}  # the dispatch's keyword options (quantize, scale_layout, sources)
        self.recv_done = False

    def recv(self) -> None:
        """Finishes the dispatch (once; later calls do nothing). On CUDA it is enqueued on the current
        stream after the send half's stream position."""
        if self.recv_done:
            return
        k = self.kernel
        k._wait_sent(k._dispatch_sent)
        k.dispatch(self.out_expert_num_tokens, self.out_expert_x, self.out_expert_x_scale, self.dp_x,
                   self.dp_x_scale, self.indices, self.weights, self.bound_m, do_send=False, do_recv=True,
                   **self.options)
        self.recv_done = True


class CombineHandle:
    """The send half of a combine in flight; :meth:`recv` waits for the partials and sums them."""

    __slots__ = ("kernel", "out_tokens", "indices", "weights", "expert_y", "bound_m", "accumulate", "recv_done")

    def __init__(self, kernel: "AllToAll", out_tokens: Tensor, indices: Tensor, weights: Tensor, expert_y: Tensor,
                 bound_m: Optional[Tensor], accumulate: bool) -> None:
        self.kernel = kernel
        self.out_tokens = out_tokens
        self.indices = indices
        self.weights = weights
        self.expert_y = expert_y
        self.bound_m = bound_m
        self.accumulate = accumulate
        self.recv_done = False

    def recv(self) -> None:
        """Finishes the combine into out_tokens (once; later calls do nothing)."""
        if self.recv_done:
            return
        k = self.kernel
        k._wait_sent(k._combine_sent)
        k.combine(self.out_tokens, self.indices, self.weights, self.expert_y, self.bound_m, do_send=False,
                  do_recv=True, accumulate=self.accumulate)
        self.recv_done = True


class AllToAll:
    """MoE dispatch/combine among the ranks of a job, on host tensors (numpy or torch CPU) or CUDA tensors.

    Experts are placed contiguously: expert ``e`` lives on rank ``e // (num_experts // world_size)``.
    Dispatch fills the batched expert-major layout: local expert ``e``'s rows start at
    ``e * max_tokens_per_expert``, ordered by source rank then source token, padded with zero rows to
    a multiple of ``expert_padding``; ``out_expert_num_tokens[e]`` counts them.

    Arguments as pplx-garden's ``P2PAllToAll``; also:
      global_group: the ``torch.distributed`` group of the all-to-all (default: the world group), or a
        :class:`ferry.Bootstrap`. See :meth:`Bootstrap.from_process_group` for NCCL groups.
      dp_group: attention-DP/TP group whose members hold the same tokens (consecutive ranks); or dp_size.
      node_group: accepted for pplx-garden compatibility and unused (same-node peers are found by Ferry).
      bootstrap: an explicit :class:`ferry.Bootstrap` (torchrun env, TCP, MPI) instead of a group.
      provider: libfabric provider ("efa", "tcp", "shm", "verbs"); None: $FERRY_PROVIDER or tcp.
      timeout_ms: deadline of every wait.
      combine_weights: "dispatch" (default: weights travel with the tokens, each rank returns one
        weighted partial per token) or "combine" (dispatch takes no weights; every rank returns the
        expert rows and combine's receive half weighs them with its `weights`: DeepEP's semantics).
    """

    def __init__(
        self,
        *,
        max_num_tokens: int,
        num_experts: int,
        expert_padding: int = 1,
        hidden_dim: int,
        hidden_dim_scale: Optional[int] = None,
        in_dtype: Any,
        out_dtype: Any,
        scale_dtype: Any = None,
        num_experts_per_token: int,
        nets_per_gpu: int = 1,
        max_private_tokens: Optional[int] = None,
        device: Any = "cpu",
        dp_group: Any = None,
        node_group: Any = None,
        global_group: Any = None,
        bootstrap: Optional[Bootstrap] = None,
        dp_size: Optional[int] = None,
        provider: Optional[str] = None,
        timeout_ms: int = 30000,
        combine_weights: str = "dispatch",
    ) -> None:
        self._impl: Any = None
        s = _Settings(max_num_tokens=max_num_tokens, num_experts=num_experts, expert_padding=expert_padding,
                      hidden_dim=hidden_dim, hidden_dim_scale=hidden_dim_scale, in_dtype=in_dtype,
                      out_dtype=out_dtype, scale_dtype=scale_dtype, num_experts_per_token=num_experts_per_token,
                      nets_per_gpu=nets_per_gpu, max_private_tokens=max_private_tokens, device=device,
                      provider=provider, timeout_ms=timeout_ms, combine_weights=combine_weights)
        if isinstance(global_group, Bootstrap):
            if bootstrap is not None:
                raise ValueError("bootstrap: given twice (as bootstrap and as global_group)")
            bootstrap, global_group = global_group, None
        if bootstrap is not None:
            if global_group is not None:
                raise ValueError("global_group: give a process group or a bootstrap, not both")
            if not isinstance(bootstrap, Bootstrap):
                raise ValueError(f"bootstrap: {type(bootstrap).__name__}, expected a ferry.Bootstrap")
            rank, world_size = bootstrap.rank, bootstrap.world_size
        else:
            global_group, rank, world_size = group_rank(global_group)
        # Every argument is checked before the first collective step (the bootstrap's).
        dp = _dp_size_of(dp_group, dp_size, global_group, rank, world_size)
        self._owns_bootstrap = bootstrap is None
        if bootstrap is None:
            bootstrap = Bootstrap.from_process_group(global_group)
        self._bootstrap = bootstrap
        try:
            handle = bootstrap._acquire(self)
            self._impl = _ferry.AllToAll(s.config(rank, world_size, dp), handle)
        except BaseException:
            bootstrap._release(self)
            if self._owns_bootstrap:
                bootstrap.close()
            raise
        _open.add(self)

        sizes = self._impl.buffer_sizes()
        self._settings = s
        self.rank = rank
        self.world_size = world_size
        self.dp_size = dp
        self.num_experts = s.num_experts
        self.num_local_experts = int(sizes["num_local_experts"])
        self.max_tokens_per_expert = int(sizes["max_rows_per_expert"])
        self.max_num_tokens = s.max_num_tokens
        self.hidden_dim = s.hidden_dim
        self.hidden_dim_scale = s.hidden_dim_scale or None
        self.num_experts_per_token = s.num_experts_per_token
        self.expert_padding = s.expert_padding
        self.combine_weights = s.combine_weights
        self.in_dtype = _torch_dtype(s.in_code)
        self.in_dtype_code = s.in_code
        self.out_dtype = _torch_dtype(s.out_code)
        self.scale_dtype = _torch_dtype(_ferry.F32) if s.scale_block else None
        self._device = s.device
        self.device = torch.device(s.device.text) if torch is not None else s.device.text

        # Shapes every call is checked against, computed once.
        L, M, H, S = self.num_local_experts, self.max_tokens_per_expert, self.hidden_dim, s.hidden_dim_scale
        self._counts_shape = ((L,),)
        self._expert_shape = ((L, M, H), (L * M, H))
        self._expert_scale_shape = ((L, M, S), (L * M, S))
        # Column-major scales are passed as their storage: per expert, the rows are the fastest index.
        self._column_scale_shape = ((L, S, M),)
        self._ue8m0_scale_shape = ((L, (S + 3) // 4, M),)
        self._src_token_shape = ((L, M), (L * M,))
        self._expert_layout = (" ([num_local_experts, max_tokens_per_expert, hidden_dim] or its rows flattened)")
        self._scale_layout = (" ([num_local_experts, max_tokens_per_expert, hidden_dim_scale] or its rows flattened)")
        self._has_scales = bool(S)
        self._address = _checks.cuda_address if s.device.cuda else _checks.host_address
        self._in_dtypes = _checks.dtypes_of(s.in_code)
        self._out_dtypes = _checks.dtypes_of(s.out_code)
        self._dispatch_sent: Any = None
        self._combine_sent: Any = None
        if self._device.cuda:
            # Preallocated: the split halves order their streams without allocating per call.
            with torch.cuda.device(self._device.index):
                self._dispatch_sent = torch.cuda.Event()
                self._combine_sent = torch.cuda.Event()

    # ---- the two operations -----------------------------------------------------------------

    def dispatch(
        self,
        out_expert_num_tokens: Tensor,
        out_expert_x: Tensor,
        out_expert_x_scale: Optional[Tensor],
        dp_x: Tensor,
        dp_x_scale: Optional[Tensor],
        indices: Tensor,
        weights: Tensor,
        bound_m: Optional[Tensor] = None,
        do_send: bool = True,
        do_recv: bool = True,
        *,
        quantize: bool = False,
        round_scale: bool = False,
        scale_layout: str = "row",
        out_expert_src_token: Optional[Tensor] = None,
        out_expert_num_tokens_per_rank: Optional[Tensor] = None,
    ) -> Optional[DispatchHandle]:
        """Sends each token of dp_x once to every rank holding one of its experts; receives into
        the batched expert-major outputs.

        dp_x [num_tokens, hidden_dim] in_dtype (num_tokens <= max_num_tokens); dp_x_scale
        [num_tokens, hidden_dim_scale] float32 or None; indices [num_tokens, num_experts_per_token]
        int32/uint32 (-1: no route); weights [num_tokens, num_experts_per_token] float32 (they travel
        with the tokens: combine applies them; None with combine_weights="combine"). Outputs:
        out_expert_num_tokens [num_local_experts] int32, out_expert_x [num_local_experts,
        max_tokens_per_expert, hidden_dim] in_dtype (or flattened rows), out_expert_x_scale likewise
        with hidden_dim_scale, or None. bound_m: a one-element int32 tensor on the device with the
        token count (<= num_tokens), or None. The send half checks the inputs, the receive half the
        outputs. With do_recv=False the returned handle's recv() finishes the dispatch.

        Keyword options (ferry.h): quantize=True takes dp_x in bfloat16 and casts it to the fp8
        in_dtype with one float32 scale per block while packing (dp_x_scale None; round_scale rounds
        the scales up to powers of two). scale_layout lays out out_expert_x_scale: "row" (above),
        "column" (float32 [num_local_experts, hidden_dim_scale, max_tokens_per_expert]: per expert,
        rows fastest) or "ue8m0" (int32 [num_local_experts, ceil(hidden_dim_scale / 4),
        max_tokens_per_expert], each word four scales' exponent bytes). out_expert_src_token
        ([num_local_experts, max_tokens_per_expert] int32) receives each row's token index on its
        source rank, out_expert_num_tokens_per_rank ([num_local_experts, world_size] int32) the rows
        each local expert got from each rank.
        """
        impl = self._live()
        dev = self._device
        address = self._address
        if do_send:
            n = rows("dp_x", dp_x)
            if n > self.max_num_tokens:
                raise ValueError(f"dp_x: {n} tokens, expected at most max_num_tokens={self.max_num_tokens}")
            H, K = self.hidden_dim, self.num_experts_per_token
            if quantize and not (self._has_scales and self.in_dtype_code == _ferry.FP8_E4M3):
                raise ValueError("quantize: True, but this all-to-all does not carry fp8 with scales (create it "
                                 "with in_dtype=torch.float8_e4m3fn and hidden_dim_scale)")
            if round_scale and not quantize:
                raise ValueError("round_scale: True without quantize (it rounds the scales Ferry computes)")
            x = address("dp_x", dp_x, ((n, H),), BF16 if quantize else self._in_dtypes, dev)
            xs = optional_address("dp_x_scale", dp_x_scale, self._has_scales and not quantize,
                                  ((n, self.hidden_dim_scale),), FLOAT32, dev,
                                  "Ferry computes the scales (quantize)" if quantize
                                  else "this all-to-all has no hidden_dim_scale")
            idx = address("indices", indices, ((n, K),), ROUTES, dev)
            w = optional_address("weights", weights, self.combine_weights == "dispatch", ((n, K),), FLOAT32, dev,
                                 "this all-to-all takes the weights at combine")
            bm = self._bound_m(bound_m)
        elif not do_recv:
            raise ValueError("do_send, do_recv: both False, expected at least one half")
        else:
            n = x = xs = idx = w = bm = 0
        layout = _SCALE_LAYOUTS.get(scale_layout)
        if layout is None:
            raise ValueError(f"scale_layout: {scale_layout!r}, expected 'row', 'column' or 'ue8m0'")
        if do_recv:
            cnt = address("out_expert_num_tokens", out_expert_num_tokens, self._counts_shape, INT32, dev, True,
                          " ([num_local_experts])")
            ox = address("out_expert_x", out_expert_x, self._expert_shape, self._in_dtypes, dev, True,
                         self._expert_layout)
            if layout == _ferry.SCALE_ROW_MAJOR:
                shapes, dtypes, text = self._expert_scale_shape, FLOAT32, self._scale_layout
            elif layout == _ferry.SCALE_COLUMN_MAJOR:
                shapes, dtypes = self._column_scale_shape, FLOAT32
                text = " ([num_local_experts, hidden_dim_scale, max_tokens_per_expert])"
            else:
                shapes, dtypes = self._ue8m0_scale_shape, INT32
                text = " ([num_local_experts, ceil(hidden_dim_scale / 4), max_tokens_per_expert])"
            oxs = optional_address("out_expert_x_scale", out_expert_x_scale, self._has_scales, shapes, dtypes, dev,
                                   "this all-to-all has no hidden_dim_scale", writable=True, layout=text)
            src = 0 if out_expert_src_token is None else address(
                "out_expert_src_token", out_expert_src_token, self._src_token_shape, INT32, dev, True,
                " ([num_local_experts, max_tokens_per_expert])")
            per_rank = 0 if out_expert_num_tokens_per_rank is None else address(
                "out_expert_num_tokens_per_rank", out_expert_num_tokens_per_rank,
                ((self.num_local_experts, self.world_size),), INT32, dev, True, " ([num_local_experts, world_size])")
        else:
            cnt = ox = oxs = src = per_rank = 0
        flags = (_ferry.SEND if do_send else 0) | (_ferry.RECV if do_recv else 0)
        impl.dispatch(cnt, ox, oxs, x, xs, idx, w, bm, n, flags, self._stream(),
                      _ferry.QUANTIZE_FP8_BLOCK if quantize else _ferry.QUANTIZE_NONE, bool(round_scale), layout,
                      src, per_rank)
        if do_recv:
            return None
        self._mark_sent(self._dispatch_sent)
        options = dict(scale_layout=scale_layout, out_expert_src_token=out_expert_src_token,
                       out_expert_num_tokens_per_rank=out_expert_num_tokens_per_rank)
        return DispatchHandle(self, out_expert_num_tokens, out_expert_x, out_expert_x_scale, dp_x, dp_x_scale,
                              indices, weights, bound_m, options)

    def combine(
        self,
        out_tokens: Tensor,
        indices: Tensor,
        weights: Tensor,
        expert_y: Tensor,
        bound_m: Optional[Tensor] = None,
        do_send: bool = True,
        do_recv: bool = True,
        accumulate: bool = False,
    ) -> Optional[CombineHandle]:
        """Brings the expert outputs back: out_tokens[t] (= or += with accumulate) receives
        sum_k weights[t, k] * expert_y[row of (t, k)], summed in fp32 and rounded once.

        expert_y has out_expert_x's layout with out_dtype elements; out_tokens [num_tokens,
        hidden_dim] out_dtype; indices, weights and bound_m are the matching dispatch's. The send
        half checks expert_y, the receive half the rest.
        """
        impl = self._live()
        dev = self._device
        n = rows("indices", indices)
        address = self._address
        if do_send:
            ey = address("expert_y", expert_y, self._expert_shape, self._out_dtypes, dev, False, self._expert_layout)
        elif not do_recv:
            raise ValueError("do_send, do_recv: both False, expected at least one half")
        else:
            ey = 0
        if do_recv:
            K = self.num_experts_per_token
            ot = address("out_tokens", out_tokens, ((n, self.hidden_dim),), self._out_dtypes, dev, True,
                         " ([num_tokens of indices, hidden_dim])")
            idx = address("indices", indices, ((n, K),), ROUTES, dev)
            w = address("weights", weights, ((n, K),), FLOAT32, dev)
            bm = self._bound_m(bound_m)
        else:
            ot = idx = w = bm = 0
        flags = (_ferry.SEND if do_send else 0) | (_ferry.RECV if do_recv else 0)
        impl.combine(ot, idx, w, ey, bm, n, bool(accumulate), flags, self._stream())
        if do_recv:
            return None
        self._mark_sent(self._combine_sent)
        return CombineHandle(self, out_tokens, indices, weights, expert_y, bound_m, bool(accumulate))

    def dispatch_async(
        self,
        *,
        out_expert_num_tokens: Tensor,
        out_expert_x: Tensor,
        out_expert_x_scale: Optional[Tensor],
        dp_x: Tensor,
        dp_x_scale: Optional[Tensor],
        indices: Tensor,
        weights: Tensor,
        bound_m: Optional[Tensor] = None,
    ) -> DispatchHandle:
        """The send half now; the returned handle's recv() finishes it (pplx-garden's name)."""
        handle = self.dispatch(out_expert_num_tokens, out_expert_x, out_expert_x_scale, dp_x, dp_x_scale, indices,
                               weights, bound_m, do_send=True, do_recv=False)
        assert handle is not None
        return handle

    def combine_async(
        self,
        *,
        out_tokens: Tensor,
        dispatch_handle: DispatchHandle,
        expert_y: Tensor,
        bound_m: Optional[Tensor] = None,
        accumulate: bool = False,
    ) -> CombineHandle:
        """The combine's send half for a dispatch handle's tokens; recv() on the result finishes it."""
        if not isinstance(dispatch_handle, DispatchHandle):
            raise ValueError(f"dispatch_handle: {type(dispatch_handle).__name__}, expected a ferry.DispatchHandle")
        handle = self.combine(out_tokens, dispatch_handle.indices, dispatch_handle.weights, expert_y, bound_m,
                              do_send=True, do_recv=False, accumulate=accumulate)
        assert handle is not None
        return handle

    # ---- buffers, stats, lifetime ---------------------------------------------------------------

    def empty_dispatch_outputs(self) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """(out_expert_num_tokens, out_expert_x, out_expert_x_scale) as uninitialised torch tensors on the device."""
        L, M, H = self.num_local_experts, self.max_tokens_per_expert, self.hidden_dim
        counts = torch.empty((L,), dtype=torch.int32, device=self.device)
        x = torch.empty((L, M, H), dtype=self.in_dtype, device=self.device)
        scale = None
        if self._has_scales:
            scale = torch.empty((L, M, self.hidden_dim_scale), dtype=torch.float32, device=self.device)
        return counts, x, scale

    def empty_expert_y(self) -> Tensor:
        """An uninitialised expert_y [num_local_experts, max_tokens_per_expert, hidden_dim] of out_dtype."""
        shape = (self.num_local_experts, self.max_tokens_per_expert, self.hidden_dim)
        return torch.empty(shape, dtype=self.out_dtype, device=self.device)

    def buffer_sizes(self) -> dict[str, int]:
        """Registered buffer bytes and the batched layout's capacities."""
        return self._live().buffer_sizes()

    def stats(self) -> dict[str, int]:
        """Bytes and records this rank sent in the last dispatch and combine."""
        return self._live().stats()

    def close(self) -> None:
        """Frees the buffers and the transport (idempotent). Not collective."""
        impl, self._impl = self._impl, None
        if impl is None:
            return
        _open.discard(self)
        try:
            impl.close()
        finally:
            self._bootstrap._release(self)
            if self._owns_bootstrap:
                self._bootstrap.close()

    destroy = close  # pplx-kernels' and pplx-garden's name

    def __del__(self) -> None:
        # Not collective, so safe from the garbage collector; releases the bootstrap too.
        try:
            self.close()
        except Exception:
            pass

    @property
    def closed(self) -> bool:
        return self._impl is None

    def __enter__(self) -> "AllToAll":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._impl is None else f"rank {getattr(self, 'rank', '?')} of {getattr(self, 'world_size', '?')}"
        return f"ferry.AllToAll({state}, device={getattr(self, 'device', '?')})"

    # ---- internals --------------------------------------------------------------------------------

    def _live(self) -> Any:
        impl = self._impl
        if impl is None:
            raise ValueError("AllToAll: closed")
        return impl

    def _bound_m(self, bound_m: Optional[Tensor]) -> int:
        if bound_m is None:
            return 0
        return self._address("bound_m", bound_m, ((1,), ()), COUNT, self._device, False,
                             " (one int32 element: the token count, on the all-to-all's device)")

    def _stream(self) -> int:
        if self._device.cuda:
            return torch.cuda.current_stream(self._device.index).cuda_stream
        return 0

    def _mark_sent(self, event: Any) -> None:
        if event is not None:
            event.record(torch.cuda.current_stream(self._device.index))

    def _wait_sent(self, event: Any) -> None:
        if event is not None:
            torch.cuda.current_stream(self._device.index).wait_event(event)

    @property
    def _last_call_ns(self) -> int:
        """Nanoseconds the last dispatch or combine spent inside libferry (the benchmark's split)."""
        return self._live().last_call_ns

