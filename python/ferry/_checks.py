"""Argument checks: a tensor's shape, dtype, layout and device, before its address goes to libferry.

Works on torch tensors and numpy arrays without compiling against either: the library gets
``data_ptr()`` (or the array's address) only after the checks pass. Every failure is a
``ValueError`` naming the argument, what it got and what was expected.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from ferry import _ferry

try:
    import torch

    _Tensor: Any = torch.Tensor
except ImportError:  # numpy-only use
    torch = None  # type: ignore[assignment]
    _Tensor = ()

try:
    import numpy as np

    _ndarray: Any = np.ndarray
except ImportError:
    np = None  # type: ignore[assignment]
    _ndarray = ()

# Ferry dtype code -> (name, element bytes).
DTYPE_NAMES = {_ferry.BF16: "bfloat16", _ferry.F16: "float16", _ferry.F32: "float32", _ferry.FP8_E4M3: "float8_e4m3fn"}
DTYPE_BYTES = {_ferry.BF16: 2, _ferry.F16: 2, _ferry.F32: 4, _ferry.FP8_E4M3: 1}

_ALIASES = {
    "bf16": _ferry.BF16,
    "bfloat16": _ferry.BF16,
    "f16": _ferry.F16,
    "fp16": _ferry.F16,
    "half": _ferry.F16,
    "float16": _ferry.F16,
    "f32": _ferry.F32,
    "fp32": _ferry.F32,
    "float": _ferry.F32,
    "float32": _ferry.F32,
    "fp8": _ferry.FP8_E4M3,
    "fp8_e4m3": _ferry.FP8_E4M3,
    "float8_e4m3fn": _ferry.FP8_E4M3,
}


def dtype_code(value: Any, name: str) -> int:
    """Ferry's code for a dtype given as a torch dtype, a numpy dtype or a name ("bf16", "fp8", ...)."""
    key = None
    if torch is not None and isinstance(value, torch.dtype):
        key = str(value).removeprefix("torch.")
    elif isinstance(value, str):
        key = value.lower()
    elif np is not None:
        try:
            key = np.dtype(value).name
        except TypeError:
            key = None
    if key in _ALIASES:
        return _ALIASES[key]
    raise ValueError(
        f"{name}: {value!r} is not a dtype Ferry moves; expected torch.bfloat16, torch.float16, torch.float32 "
        f"or torch.float8_e4m3fn (or their names: bf16, f16, f32, fp8)"
    )


class Dtypes:
    """The element types one argument accepts, as torch dtypes and numpy dtypes.

    numpy has no bfloat16 or float8: such arrays come as raw bits (uint16, uint8) or as
    ml_dtypes' types when that package is installed.
    """

    __slots__ = ("torch", "numpy", "text")

    def __init__(self, torch_names: Iterable[str], numpy_names: Iterable[str], text: str) -> None:
        self.torch = frozenset(getattr(torch, n) for n in torch_names if torch is not None and hasattr(torch, n))
        self.numpy = frozenset(np.dtype(n) for n in numpy_names if np is not None and _numpy_has(n))
        self.text = text


def _numpy_has(name: str) -> bool:
    try:
        np.dtype(name)
        return True
    except TypeError:
        return False


def _ml_dtypes_names() -> set[str]:
    try:
        import ml_dtypes  # noqa: F401  (registers bfloat16 and float8_e4m3fn with numpy)
    except ImportError:
        return set()
    return {"bfloat16", "float8_e4m3fn"}


_ML = _ml_dtypes_names()


def dtypes_of(code: int) -> Dtypes:
    name = DTYPE_NAMES[code]
    numpy_names = {
        _ferry.BF16: ["uint16"] + (["bfloat16"] if "bfloat16" in _ML else []),
        _ferry.F16: ["float16"],
        _ferry.F32: ["float32"],
        _ferry.FP8_E4M3: ["uint8"] + (["float8_e4m3fn"] if "float8_e4m3fn" in _ML else []),
    }[code]
    return Dtypes([name], numpy_names, f"torch.{name}")


INT32 = Dtypes(["int32"], ["int32"], "torch.int32")
ROUTES = Dtypes(["int32", "uint32"], ["int32", "uint32"], "torch.int32 or torch.uint32 (-1 / 0xffffffff: no route)")
COUNT = Dtypes(["int32", "uint32"], ["int32", "uint32"], "torch.int32")
FLOAT32 = Dtypes(["float32"], ["float32"], "torch.float32")


class Device:
    """Where an all-to-all's tensors must live: host memory, or one CUDA device."""

    __slots__ = ("cuda", "index", "text")

    def __init__(self, cuda: bool, index: int) -> None:
        self.cuda = cuda
        self.index = index
        self.text = f"cuda:{index}" if cuda else "cpu"


def _where(t: Any) -> str:
    return str(t.device) if isinstance(t, _Tensor) else "cpu (numpy)"


def _shape_text(shapes: tuple) -> str:
    return " or ".join(str(tuple(s)) for s in shapes)


def address(
    name: str,
    t: Any,
    shapes: tuple,
    dtypes: Dtypes,
    device: Device,
    *,
    writable: bool = False,
    layout: str = "",
) -> int:
    """The address of `t` after checking it has one of `shapes`, a dtype of `dtypes`, contiguous
    rows and the all-to-all's device; a ValueError naming `name` otherwise."""
    if isinstance(t, _Tensor):
        if t.dtype not in dtypes.torch:
            raise ValueError(f"{name}: dtype {t.dtype}, expected {dtypes.text}")
        if t.shape not in shapes:
            raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {_shape_text(shapes)}{layout}")
        if device.cuda:
            if not t.is_cuda or t.get_device() != device.index:
                raise ValueError(f"{name}: on {t.device}, expected {device.text} (the all-to-all's device)")
        elif not t.is_cpu:
            raise ValueError(f"{name}: on {t.device}, expected cpu (the all-to-all's device)")
        if not t.is_contiguous():
            raise ValueError(f"{name}: strides {t.stride()}, expected a contiguous tensor (row-major, no gaps)")
        return t.data_ptr()
    if isinstance(t, _ndarray):
        if device.cuda:
            raise ValueError(f"{name}: a numpy array (host memory), expected a tensor on {device.text}")
        if t.dtype not in dtypes.numpy:
            raise ValueError(f"{name}: numpy dtype {t.dtype}, expected {dtypes.text} (numpy: "
                             f"{', '.join(sorted(str(d) for d in dtypes.numpy))})")
        if t.shape not in shapes:
            raise ValueError(f"{name}: shape {t.shape}, expected {_shape_text(shapes)}{layout}")
        if not t.flags.c_contiguous:
            raise ValueError(f"{name}: strides {t.strides} (bytes), expected a C-contiguous array")
        if writable and not t.flags.writeable:
            raise ValueError(f"{name}: read-only array, expected a writable one (it is an output)")
        return t.ctypes.data
    raise ValueError(f"{name}: {type(t).__name__}, expected a torch.Tensor or a numpy.ndarray")


def host_address(name: str, t: Any, shapes: tuple, dtypes: Dtypes, device: Device, writable: bool = False,
                 layout: str = "") -> int:
    """address() for the host backend, with the common case (a contiguous CPU torch tensor of the
    right dtype and shape) first: the checks cost well under a microsecond per tensor."""
    if t.__class__ is _Tensor and t.is_cpu and t.dtype in dtypes.torch and t.shape in shapes and t.is_contiguous():
        return t.data_ptr()
    return address(name, t, shapes, dtypes, device, writable=writable, layout=layout)


def cuda_address(name: str, t: Any, shapes: tuple, dtypes: Dtypes, device: Device, writable: bool = False,
                 layout: str = "") -> int:
    """address() for the CUDA backend, the common case first (see host_address)."""
    if (t.__class__ is _Tensor and t.is_cuda and t.get_device() == device.index and t.dtype in dtypes.torch
            and t.shape in shapes and t.is_contiguous()):
        return t.data_ptr()
    return address(name, t, shapes, dtypes, device, writable=writable, layout=layout)


def optional_address(name: str, t: Optional[Any], want: bool, shapes: tuple, dtypes: Dtypes, device: Device,
                     why_none: str, writable: bool = False, layout: str = "") -> int:
    """Like address() for an argument that is required when `want` and must be None otherwise."""
    if want:
        if t is None:
            raise ValueError(f"{name}: None, expected {dtypes.text} of shape {_shape_text(shapes)}")
        check = cuda_address if device.cuda else host_address
        return check(name, t, shapes, dtypes, device, writable, layout)
    if t is not None:
        raise ValueError(f"{name}: expected None ({why_none}), got a {_where(t)} {type(t).__name__}")
    return 0


def rows(name: str, t: Any) -> int:
    """Leading dimension of a 2-d tensor or array (the token count of dp_x, indices, out_tokens)."""
    try:
        shape = t.shape
    except AttributeError:
        raise ValueError(f"{name}: {type(t).__name__}, expected a torch.Tensor or a numpy.ndarray") from None
    if len(shape) != 2:
        raise ValueError(f"{name}: shape {tuple(shape)}, expected 2 dimensions [num_tokens, ...]")
    return shape[0]
