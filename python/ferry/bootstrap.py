"""How the ranks of a job find each other before any byte moves.

Three ways, from what a Python job already has:

- :meth:`Bootstrap.from_process_group`: the job's ``torch.distributed`` group (no new port). Its
  allgather runs over a CPU (gloo) group; when the group's backend cannot move CPU tensors (NCCL),
  a gloo group over the same ranks is created, which is collective over the default group.
- :meth:`Bootstrap.from_env`: torchrun's environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE,
  LOCAL_RANK), srun, or an mpirun launch; Ferry's own TCP rendezvous (under torchrun on
  MASTER_PORT + 1, beside torchrun's store).
- :meth:`Bootstrap.tcp`: explicit address, port, rank and world size.
"""

from __future__ import annotations

import os
import weakref
from datetime import timedelta
from typing import Any, Optional

from ferry import _ferry
from ferry import errors as _errors  # noqa: F401  (registers the exception types)


class Bootstrap:
    """A rendezvous among `world_size` ranks; this process is `rank`.

    An :class:`ferry.AllToAll` made from it keeps it alive; :meth:`close` releases it once every
    such all-to-all is closed.
    """

    def __init__(self, handle: Any, rank: int, world_size: int, *, group: Any = None, description: str = "") -> None:
        self._handle = handle
        self.rank = rank
        self.world_size = world_size
        self.group = group  # the CPU process group the allgather runs on, when there is one
        self.description = description
        self._users: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._closing = False

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def from_env(cls, timeout_ms: int = 60000, master_port: Optional[int] = None) -> "Bootstrap":
        """The launcher's environment, read by libferry: torchrun, srun, or an MPI launch.

        Rank 0 listens on FERRY_BOOTSTRAP_PORT when set, else on MASTER_PORT, except under torchrun,
        whose store holds MASTER_PORT: there on MASTER_PORT + 1. `master_port` overrides all of
        these (the same free port on every rank); :meth:`from_process_group` needs no port at all.
        """
        if master_port is not None:
            rank, world_size = _rank_from_env()
            addr = os.environ.get("MASTER_ADDR")
            if not addr:
                raise ValueError("master_port: given, but MASTER_ADDR is not set")
            handle = _ferry.Bootstrap.tcp(addr, int(master_port), rank, world_size, timeout_ms)
            return cls(handle, rank, world_size, description=f"environment, port {master_port}")
        handle = _ferry.Bootstrap.from_env(timeout_ms)
        return cls(handle, handle.rank, handle.world_size, description="environment")

    @classmethod
    def tcp(cls, master_addr: str, master_port: int, rank: int, world_size: int, timeout_ms: int = 60000) -> "Bootstrap":
        """Rank 0 listens on master_addr:master_port; the others connect, retrying until the deadline."""
        handle = _ferry.Bootstrap.tcp(master_addr, master_port, rank, world_size, timeout_ms)
        return cls(handle, rank, world_size, description=f"tcp {master_addr}:{master_port}")

    @classmethod
    def mpi(cls) -> "Bootstrap":
        """MPI_COMM_WORLD (libferry built with MPI)."""
        handle = _ferry.Bootstrap.mpi()
        return cls(handle, handle.rank, handle.world_size, description="mpi")

    @classmethod
    def from_process_group(cls, group: Any = None, *, timeout: Optional[timedelta] = None) -> "Bootstrap":
        """The ranks of a ``torch.distributed`` process group (default: the world group).

        Ferry's setup exchanges small blobs with an allgather on this group. A group whose backend
        moves CPU tensors (gloo, or ``"cpu:gloo,cuda:nccl"``) is used as it is. For any other (NCCL),
        a gloo group over the same ranks is created with ``torch.distributed.new_group``, which every
        rank of the default group must call at the same time: construct the all-to-all on every rank.
        `timeout` bounds that new group's collectives (default: torch's, 30 minutes).
        """
        import torch
        import torch.distributed as dist

        group, rank, world_size = group_rank(group)
        backend = str(dist.get_backend(group))
        if "gloo" in backend or backend == "mpi":
            cpu_group = group
        else:
            # One gloo group per set of ranks, made once: every rank constructs its all-to-alls in
            # the same order, so every rank finds (or creates) it at the same call.
            ranks = tuple(dist.get_process_group_ranks(group))
            cpu_group = _gloo_groups.get(ranks)
            if cpu_group is None:
                kwargs = {"timeout": timeout} if timeout is not None else {}
                cpu_group = _gloo_groups[ranks] = dist.new_group(ranks=list(ranks), backend="gloo", **kwargs)

        def allgather(data: bytes) -> bytes:
            if not data:
                return b""
            mine = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            parts = [torch.empty_like(mine) for _ in range(world_size)]
            dist.all_gather(parts, mine, group=cpu_group)
            return b"".join(p.numpy().tobytes() for p in parts)

        handle = _ferry.Bootstrap.callback(rank, world_size, allgather)
        return cls(handle, rank, world_size, group=cpu_group, description=f"process group ({backend})")

    # ---- lifetime -----------------------------------------------------------------------------

    def _acquire(self, user: Any) -> Any:
        if self._closing or self._handle.closed:
            raise ValueError("bootstrap: closed")
        self._users.add(user)
        return self._handle

    def _release(self, user: Any) -> None:
        self._users.discard(user)
        if self._closing and not self._users:
            self._handle.close()

    def close(self) -> None:
        """Releases the rendezvous now, or when the last all-to-all made from it closes."""
        self._closing = True
        if not self._users:
            self._handle.close()

    @property
    def closed(self) -> bool:
        return self._closing

    def __enter__(self) -> "Bootstrap":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Bootstrap(rank={self.rank}, world_size={self.world_size}, {self.description})"


_gloo_groups: dict[tuple[int, ...], Any] = {}


def group_rank(group: Any) -> tuple[Any, int, int]:
    """(group, this process's rank in it, its size); None is the world group."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("global_group: torch.distributed is not initialized; call "
                         "torch.distributed.init_process_group first (or pass bootstrap=ferry.Bootstrap.from_env())")
    if group is None:
        group = dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("global_group: this process is not a member of the group")
    return group, rank, dist.get_world_size(group)


def _rank_from_env() -> tuple[int, int]:
    """Rank and world size the way libferry's bootstrap_from_env reads them (torchrun first)."""
    env = os.environ
    if all(env.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")):
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    for rank_var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if not env.get(rank_var):
            continue
        for size_var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"):
            if env.get(size_var):
                return int(env[rank_var]), int(env[size_var])
    raise ValueError(
        "bootstrap: no launcher in the environment: torchrun sets MASTER_ADDR, MASTER_PORT, RANK and "
        "WORLD_SIZE; mpirun sets OMPI_COMM_WORLD_RANK and OMPI_COMM_WORLD_SIZE (or PMI_RANK and PMI_SIZE)"
    )
