"""Ferry's C API (include/ferry/ferry.h) as the extension module exposes it. Use the `ferry` package:
it checks every tensor before an address reaches these functions."""

from typing import Callable, Optional

VERSION_MAJOR: int
VERSION_MINOR: int
SEND: int
RECV: int
SEND_RECV: int
BF16: int
F16: int
F32: int
FP8_E4M3: int
DEVICE_HOST: int
DEVICE_CUDA: int
QUANTIZE_NONE: int
QUANTIZE_FP8_BLOCK: int
SCALE_ROW_MAJOR: int
SCALE_COLUMN_MAJOR: int
SCALE_UE8M0_COLUMN_MAJOR: int
WEIGHTS_AT_DISPATCH: int
WEIGHTS_AT_COMBINE: int

def set_error_types(types: dict[int, type]) -> None: ...
def status_string(status: int) -> str: ...

class Config:
    rank: int
    world_size: int
    num_experts: int
    experts_per_token: int
    max_tokens_per_rank: int
    hidden_dim: int
    in_dtype: int
    scale_block: int
    out_dtype: int
    expert_alignment: int
    device: int
    cuda_device: int
    nets_per_rank: int
    provider: Optional[str]
    timeout_ms: int
    dp_size: int
    private_tokens: int
    combine_weights: int
    def __init__(self) -> None: ...

def buffer_sizes(config: Config) -> dict[str, int]: ...

class Bootstrap:
    @staticmethod
    def from_env(timeout_ms: int) -> Bootstrap: ...
    @staticmethod
    def tcp(master_addr: str, master_port: int, rank: int, world_size: int, timeout_ms: int) -> Bootstrap: ...
    @staticmethod
    def mpi() -> Bootstrap: ...
    @staticmethod
    def callback(rank: int, world_size: int, allgather: Callable[[bytes], bytes]) -> Bootstrap: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...

class AllToAll:
    def __init__(self, config: Config, bootstrap: Bootstrap) -> None: ...
    def dispatch(self, out_expert_num_tokens: int, out_expert_x: int, out_expert_x_scale: int, dp_x: int,
                 dp_x_scale: int, indices: int, weights: int, bound_m: int, num_tokens: int, flags: int,
                 stream: int, quantize: int = ..., round_scale: bool = ..., out_scale_layout: int = ...,
                 out_expert_src_token: int = ..., out_expert_num_tokens_per_rank: int = ...) -> None: ...
    def combine(self, out_tokens: int, indices: int, weights: int, expert_y: int, bound_m: int, num_tokens: int,
                accumulate: bool, flags: int, stream: int) -> None: ...
    def time_steps(self, out_expert_num_tokens: int, out_expert_x: int, out_expert_x_scale: int, dp_x: int,
                   dp_x_scale: int, indices: int, weights: int, num_tokens: int, expert_y: int, out_tokens: int,
                   iterations: int, stream: int) -> list[int]: ...
    def buffer_sizes(self) -> dict[str, int]: ...
    def stats(self) -> dict[str, int]: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def last_call_ns(self) -> int: ...
