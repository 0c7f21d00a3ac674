"""Runs a function on N local processes joined by a gloo process group (what torchrun would start),
with a deadline: the tests, the benchmark and quick experiments use it.

    results = ferry.launch.spawn(fn, world_size=4, args=(...,), timeout_s=120)

``fn(rank, world_size, *args)`` runs in each process after ``torch.distributed`` is initialized;
its return values come back in rank order. A rank that raises, dies or misses the deadline makes
``spawn`` raise :class:`RanksFailed` naming it (every process is stopped first), except the ranks
listed in ``may_exit``, which are allowed to leave without a result (a killed peer).
"""

from __future__ import annotations

import os
import queue as queue_module
import socket
import sys
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Iterable, Optional


class RanksFailed(RuntimeError):
    """Some ranks raised, died or missed the deadline; `failures` maps rank -> text."""

    def __init__(self, failures: dict[int, str]) -> None:
        self.failures = failures
        lines = [f"rank {r}: {text}" for r, text in sorted(failures.items())]
        super().__init__(f"{len(failures)} rank(s) failed:\n" + "\n".join(lines))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple, env: dict[str, str],
              results: Any, backend: str, timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    os.environ.update(env)
    import torch.distributed as dist

    try:
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        value = fn(rank, world_size, *args)
        results.put((rank, True, value))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    # The result is what the parent waits for: deliver it and leave. The interpreter's teardown
    # (torch, the process group) takes seconds per process on a loaded machine and adds nothing.
    results.close()
    results.join_thread()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    *,
    timeout_s: float = 120.0,
    backend: str = "gloo",
    env: Optional[dict[str, str]] = None,
    may_exit: Iterable[int] = (),
    grace_s: float = 45.0,
) -> list[Any]:
    """Starts `world_size` processes running fn(rank, world_size, *args); returns their results.
    Once a rank has failed, the others get `grace_s` more seconds to finish or fail before they are
    stopped."""
    import torch.multiprocessing as mp

    # A fork server that has imported torch once starts each rank in milliseconds instead of a fresh
    # interpreter importing torch per rank (seconds each, and the ranks compete for the same cores).
    # It never touches CUDA, so the ranks may.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "ferry"])
    results = ctx.Queue()
    # The parent holds the process group's store, so ranks may leave in any order once done.
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                     timeout=timedelta(seconds=timeout_s))
    port = store.port
    allowed = set(may_exit)
    procs = [
        ctx.Process(target=_run_rank, args=(fn, r, world_size, port, args, dict(env or {}), results, backend, timeout_s),
                    name=f"ferry-rank-{r}")
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    done: dict[int, tuple[bool, Any]] = {}
    failures: dict[int, str] = {}
    exited_at: dict[int, float] = {}
    try:
        while len(done) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                first = min(failures) if failures else None
                why = (f"still running {grace_s:.0f} s after rank {first} failed (stopped)" if first is not None
                       else f"no result within {timeout_s:.0f} s (stopped)")
                for r in range(world_size):
                    if r not in done and r not in failures and r not in allowed:
                        failures[r] = why
                break
            try:
                rank, ok, value = results.get(timeout=min(remaining, 0.2))
                if ok:
                    done[rank] = (True, value)
                else:
                    failures[rank] = value
                    # The others now fail too (naming this rank) or wait for it: give them the time
                    # their own deadlines need to say so, not the whole world's.
                    deadline = min(deadline, time.monotonic() + grace_s)
                continue
            except queue_module.Empty:
                pass
            now = time.monotonic()
            for r, p in enumerate(procs):
                if r in done or r in failures or p.is_alive():
                    continue
                # A result may still be in the queue's pipe: give it a moment before calling the rank dead.
                first = exited_at.setdefault(r, now)
                if now - first > 2.0:
                    if r in allowed:
                        done[r] = (True, None)
                    else:
                        failures[r] = f"exited with code {p.exitcode} without a result"
                        deadline = min(deadline, time.monotonic() + grace_s)
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(10.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
        del store
    failures = {r: t for r, t in failures.items() if r not in allowed}
    if failures:
        raise RanksFailed(failures)
    return [done[r][1] if r in done else None for r in range(world_size)]
