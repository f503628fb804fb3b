"""Run a function in a real multi-process world (gloo on the CPU) and collect each rank's result.

Used by the test suite, the demo and the benchmarks::

    from ddp_hooks.testing import run_world
    results = run_world(my_fn, 4, arg1, arg2)   # my_fn(rank, world_size, arg1, arg2) on 4 ranks

* no port clashes: the ranks meet through a FileStore in a fresh temporary directory and gloo
  binds to loopback, so many worlds can run at once (pytest-xdist);
* no leaked processes: every rank is killed when the call returns, whatever happened;
* a failure instead of a hang: an exception on a rank is re-raised here with its traceback,
  a rank that dies or a world that outlives ``timeout`` raises at once.

``fn`` must be importable by name (a module-level function), and so must its arguments.
"""

import io
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

_CTX = None


class WorldError(RuntimeError):
    """A rank of a test world raised, died or timed out."""


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        # the fork server imports torch once; each rank is then a cheap fork of it
        _CTX.set_forkserver_preload(["torch", "torch.distributed"])
    return _CTX


def _worker(fn, rank, world_size, store_path, results, args, kwargs, timeout, threads, backend):
    import torch
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        value = fn(rank, world_size, *args, **kwargs)
        buf = io.BytesIO()
        torch.save(value, buf)
        results.put((rank, True, buf.getvalue()))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, False, traceback.format_exc()))


def run_world(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 180.0,
    threads: int = 1,
    backend: str = "gloo",
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` ranks (gloo on the CPU
    by default; ``backend="nccl"`` puts rank ``r`` on GPU ``r``).

    Returns the list of per-rank return values (moved through ``torch.save``). Raises
    :class:`WorldError` if a rank raises (with its traceback), dies, or the world takes
    longer than ``timeout`` seconds.
    """
    import torch

    if world_size < 1:
        raise ValueError(f"world_size must be an integer in [1, inf), got {world_size}")
    ctx = _context()
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="ddp_hooks_world_") as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [
            ctx.Process(
                target=_worker,
                args=(
                    fn, rank, world_size, store_path, results, args, kwargs, timeout, threads, backend
                ),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        out: list[Any] = [None] * world_size
        done: set[int] = set()
        deadline = time.monotonic() + timeout

        def failure(rank: int, payload: str) -> WorldError:
            # a rank that died usually makes its peers fail: name the dead ones first
            time.sleep(0.5)
            dead = "".join(
                f"rank {r} died (exit code {p.exitcode}); "
                for r, p in enumerate(procs)
                if r != rank and p.exitcode not in (None, 0)
            )
            return WorldError(f"{dead}rank {rank} of {world_size} failed:\n{payload}")

        def receive(rank: int, ok: bool, payload: Any) -> None:
            if not ok:
                raise failure(rank, payload)
            out[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            done.add(rank)

        try:
            while len(done) < world_size:
                try:
                    receive(*results.get(timeout=0.2))
                    continue
                except queue.Empty:
                    pass
                for rank, p in enumerate(procs):
                    if rank not in done and p.exitcode is not None:
                        # give a message that may still be in the pipe a moment to arrive
                        try:
                            message = results.get(timeout=2.0)
                        except queue.Empty:
                            raise WorldError(
                                f"rank {rank} of {world_size} died (exit code {p.exitcode})"
                            ) from None
                        receive(*message)
                        break
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - done)
                    raise WorldError(
                        f"world of {world_size} timed out after {timeout:.0f}s; "
                        f"ranks {missing} did not finish"
                    ) from None
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=5)
            results.close()
    return out
