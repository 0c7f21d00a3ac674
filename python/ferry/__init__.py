"""Ferry: MoE expert-parallel dispatch/combine over libfabric (EFA, ConnectX, tcp, shm), from PyTorch.

    a2a = ferry.AllToAll(max_num_tokens=128, num_experts=256, hidden_dim=7168, hidden_dim_scale=56,
                         in_dtype=torch.float8_e4m3fn, out_dtype=torch.bfloat16, scale_dtype=torch.float32,
                         num_experts_per_token=8, device="cuda", global_group=group, provider="efa")
    a2a.dispatch(out_expert_num_tokens, out_expert_x, out_expert_x_scale, dp_x, dp_x_scale, indices, weights)
    a2a.combine(out_tokens, indices, weights, expert_y)

See python/README.md for switching from pplx-kernels / pplx-garden.
"""

try:  # libcudart and friends resolve against torch's copies when torch is present
    import torch as _torch  # noqa: F401
except ImportError:
    pass

from ferry import _ferry
from ferry.all_to_all import AllToAll, CombineHandle, DispatchHandle, buffer_sizes
from ferry.bootstrap import Bootstrap
from ferry.errors import (
    FerryError,
    FerryInternalError,
    FerryInvalidArgument,
    FerryOutOfMemory,
    FerryPeerFailed,
    FerryPeerTimeout,
    FerryTimeout,
    FerryTransportError,
    FerryUnsupported,
    Status,
)

__version__ = f"{_ferry.VERSION_MAJOR}.{_ferry.VERSION_MINOR}.0"

__all__ = [
    "AllToAll",
    "Bootstrap",
    "CombineHandle",
    "DispatchHandle",
    "FerryError",
    "FerryInternalError",
    "FerryInvalidArgument",
    "FerryOutOfMemory",
    "FerryPeerFailed",
    "FerryPeerTimeout",
    "FerryTimeout",
    "FerryTransportError",
    "FerryUnsupported",
    "Status",
    "buffer_sizes",
]
