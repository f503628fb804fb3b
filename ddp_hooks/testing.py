"""Run a function in a real multi-process world (gloo on the CPU) and collect each rank's result.

Used by the test suite, the demo and the benchmarks::

    from ddp_hooks.testing import run_world
    results = run_world(my_fn, 4, arg1, arg2)   # my_fn(rank, world_size, arg1, arg2) on 4 ranks

* no port clashes: the ranks meet through a FileStore in a fresh temporary directory and gloo
  binds to loopback, so many worlds can run at once (pytest-xdist);
* no leaked processes: every rank is killed when the call returns, whatever happened;
* a failure instead of a hang: an exception on a rank is re-raised here with its traceback,
  a rank that dies or a world that outlives ``timeout`` raises at once;
* a world whose gloo rendezvous fails (gloo's full-mesh connect between ranks on loopback
  sometimes loses a connection while other worlds connect at the same time) is started again,
  up to twice: only that, before ``fn`` runs, is retried.

``fn`` must be importable by name (a module-level function), and so must its arguments.
"""

import faulthandler
import io
import multiprocessing as mp
import os
import queue
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

_CTX: Any = None
_INIT_ATTEMPTS = 3
_FAILED_STARTS_TO_SIMULATE = [0]  # for the harness's own test: first starts that fail on purpose


class WorldError(RuntimeError):
    """A rank of a test world raised, died or timed out."""


class _InitFailed(Exception):
    """A rank could not join the process group (retried with a fresh world)."""


def _context() -> Any:
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        # the fork server imports torch once; each rank is then a cheap fork of it. DDP's
        # first construction imports torch._dynamo (hundreds of modules, a second or more of
        # CPU per rank): preloaded here, once
        _CTX.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "torch.nn.parallel", "ddp_hooks"])
    return _CTX


@dataclass
class _Spec:
    """What every rank of one world needs (picklable)."""

    fn: Callable[..., Any]
    size: int
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    store: str
    timeout: float
    threads: int | None
    backend: str
    simulate_failed_start: bool = False
    may_die: frozenset[int] = frozenset()
    group_timeout: float | None = None
    sync_free: bool = False


def _stack_file(spec: _Spec, rank: int) -> str:
    return f"{spec.store}.stacks{rank}"


def _worker(spec: _Spec, rank: int, results: Any) -> None:
    import torch
    import torch.distributed as dist
    from torch._C._distributed_c10d import FileStore

    # on SIGUSR1 (sent by the parent when the world times out) write where each thread is
    stacks = open(_stack_file(spec, rank), "w")  # noqa: SIM115 - open until the process ends
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    try:
        if spec.backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        if spec.simulate_failed_start and rank == spec.size - 1:
            raise RuntimeError("Gloo connectFullMesh failed (simulated)")
        store = FileStore(spec.store, spec.size)
        timeout = timedelta(seconds=spec.group_timeout or spec.timeout)
        dist.init_process_group(spec.backend, store=store, rank=rank, world_size=spec.size, timeout=timeout)
    except BaseException:  # noqa: BLE001 - reported to the parent, which starts a new world
        results.put((rank, "init", traceback.format_exc()))
        return
    try:
        from .core.flags import sync_free

        with sync_free(spec.sync_free):
            value = spec.fn(rank, spec.size, *spec.args, **spec.kwargs)
        buf = io.BytesIO()
        torch.save(value, buf)
        results.put((rank, "ok", buf.getvalue()))
        # the result reaches the parent before the group goes: on torch 2.4, gloo's
        # destroy_process_group was seen to block for good with the result still in the
        # queue's buffer, never sent (the parent kills every rank once all results are in)
        results.close()
        results.join_thread()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", traceback.format_exc()))


def run_world(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 180.0,
    threads: int | None = 1,
    backend: str = "gloo",
    may_die: tuple[int, ...] = (),
    group_timeout: float | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` ranks (gloo on the CPU
    by default; ``backend="nccl"`` puts rank ``r`` on GPU ``r``). ``threads``: intra-op threads
    per rank (None: torch's default). ``may_die``: ranks allowed to exit without a result
    (fault-injection tests); their result is None and the others are still collected.
    ``group_timeout``: the process group's timeout (default: ``timeout``). With
    ``DDP_HOOKS_SYNC_FREE=1`` set when this is called, the ranks take the branches written for
    GPUs (no host reads of flags) on CPU tensors too.

    Returns the list of per-rank return values (moved through ``torch.save``). Raises
    :class:`WorldError` if a rank raises (with its traceback), dies, or the world takes
    longer than ``timeout`` seconds.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be an integer in [1, inf), got {world_size}")
    for attempt in range(_INIT_ATTEMPTS):
        spec = _Spec(
            fn=fn,
            size=world_size,
            args=args,
            kwargs=kwargs,
            store="",
            timeout=timeout,
            threads=threads,
            backend=backend,
            simulate_failed_start=attempt < _FAILED_STARTS_TO_SIMULATE[0],
            may_die=frozenset(may_die),
            group_timeout=group_timeout,
            sync_free=os.environ.get("DDP_HOOKS_SYNC_FREE") == "1",
        )
        try:
            return _World(spec).run()
        except _InitFailed as exc:
            if attempt == _INIT_ATTEMPTS - 1:
                raise WorldError(f"the world of {world_size} could not start:\n{exc}") from None
    raise AssertionError("unreachable")


class _World:
    """One attempt: the rank processes, their results, and the clean-up."""

    def __init__(self, spec: _Spec) -> None:
        self.spec = spec
        self.size, self.timeout = spec.size, spec.timeout
        self.out: list[Any] = [None] * spec.size
        self.done: set[int] = set()

    def run(self) -> list[Any]:
        ctx = _context()
        self.results = ctx.Queue()
        with tempfile.TemporaryDirectory(prefix="ddp_hooks_world_") as tmp:
            self.spec.store = os.path.join(tmp, "store")
            self.procs = [
                ctx.Process(target=_worker, args=(self.spec, rank, self.results), daemon=True)
                for rank in range(self.size)
            ]
            for p in self.procs:
                p.start()
            try:
                self._collect()
            finally:
                for p in self.procs:
                    if p.is_alive():
                        p.kill()
                for p in self.procs:
                    p.join(timeout=5)
                self.results.close()
        return self.out

    def _collect(self) -> None:
        deadline = time.monotonic() + self.timeout
        while len(self.done | self.spec.may_die) < self.size:  # ranks that may die are not awaited
            try:
                self._receive(*self.results.get(timeout=0.2))
                continue
            except queue.Empty:
                pass
            for rank, p in enumerate(self.procs):
                if rank not in self.done and p.exitcode is not None and rank in self.spec.may_die:
                    self.done.add(rank)  # allowed to die: no result
                    break
                if rank not in self.done and p.exitcode is not None:
                    # give a message that may still be in the pipe a moment to arrive
                    try:
                        message = self.results.get(timeout=2.0)
                    except queue.Empty:
                        raise WorldError(f"rank {rank} of {self.size} died (exit code {p.exitcode})") from None
                    self._receive(*message)
                    break
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.size)) - self.done)
                for r in missing:
                    if self.procs[r].is_alive() and self.procs[r].pid is not None:
                        os.kill(self.procs[r].pid, signal.SIGUSR1)
                wait_until = time.monotonic() + 5.0  # a busy machine may take a moment to write them
                while time.monotonic() < wait_until and not all(self._stacks(r) for r in missing):
                    time.sleep(0.1)
                raise WorldError(
                    f"world of {self.size} timed out after {self.timeout:.0f}s; ranks {missing} did not finish"
                    + "".join(self._stacks(r) for r in missing)
                )

    def _stacks(self, rank: int) -> str:
        """Where rank ``rank``'s threads were at the deadline (empty if unknown)."""
        try:
            with open(_stack_file(self.spec, rank)) as f:
                text = f.read().strip()
        except OSError:
            return ""
        return f"\n--- rank {rank} at the deadline:\n{text}" if text else ""

    def _receive(self, rank: int, kind: str, payload: Any) -> None:
        import torch

        if kind == "init":
            raise _InitFailed(f"rank {rank}:\n{payload}")
        if kind == "error":
            raise self._failure(rank, payload)
        self.out[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        self.done.add(rank)

    def _failure(self, rank: int, payload: str) -> WorldError:
        # a rank that died usually makes its peers fail: name the dead ones first
        time.sleep(0.5)
        dead = "".join(
            f"rank {r} died (exit code {p.exitcode}); "
            for r, p in enumerate(self.procs)
            if r != rank and p.exitcode not in (None, 0)
        )
        return WorldError(f"{dead}rank {rank} of {self.size} failed:\n{payload}")
