"""Run a benchmark function on every rank: under torchrun, or on local workers it spawns.

``fn(rank, world_size, *args)`` runs on every rank; rank 0 gets the list of all ranks' results
(other ranks get ``None``). Under torchrun (``RANK`` set) the process group comes from the
environment (NCCL with GPUs, else gloo); otherwise ``workers`` local processes are started with
:func:`ddp_hooks.testing.run_world` (NCCL when that many GPUs are present, else gloo on the CPU).
"""

import atexit
import gc
import os

import torch
import torch.distributed as dist

from ddp_hooks.testing import run_world


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device() -> torch.device:
    """This rank's device (the process group must be initialized)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _teardown() -> None:
    """At exit under torchrun: every rank meets before the group goes (a rank exiting first can
    abort a peer still reading from it: SIGABRT). The models and hook states of the finished
    runs are collected first and the groups' last references after: a process group that is
    still referenced keeps its gloo threads past ``destroy_process_group``, and threads torn
    down during interpreter shutdown can abort the process."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()


def run(fn, workers: int, *args, timeout: float = 3600.0):
    if under_torchrun():
        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend())
            atexit.register(_teardown)
        rank, world = dist.get_rank(), dist.get_world_size()
        result = fn(rank, world, *args)
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        return gathered if rank == 0 else None
    use_nccl = torch.cuda.is_available() and torch.cuda.device_count() >= workers
    return run_world(
        fn,
        workers,
        *args,
        backend="nccl" if use_nccl else "gloo",
        timeout=timeout,
        threads=max(1, (os.cpu_count() or 2) // workers),
    )
