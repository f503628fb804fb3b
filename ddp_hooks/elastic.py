"""Fault tolerance under ``torchrun --max-restarts``: a process group per restart attempt, and
checkpoint writes that a killed worker cannot leave half done.

When a worker dies, torchrun stops the others and starts every worker again. The store that
the new attempt meets in (the agent's) still holds what the dead attempt wrote there, and
gloo's rendezvous reads those keys: the new workers try to connect to the dead ones' addresses
and fail (``connectFullMesh``) or hang. :func:`init_process_group` meets in a part of the store
of its own per attempt (a ``PrefixStore`` named after ``TORCHELASTIC_RESTART_COUNT``)::

    from ddp_hooks import elastic

    elastic.init_process_group("gloo")            # instead of dist.init_process_group("gloo")
    ...
    elastic.save({"model": ..., "optimizer": ..., "hook": state.state_dict()}, f"ckpt/rank{rank}.pt")

:func:`save` writes to a temporary file next to the target and renames it over the target,
so a reader finds the previous checkpoint or the new one, never a torn file.
"""

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def init_process_group(backend: str | None = None, timeout: timedelta | None = None) -> None:
    """``dist.init_process_group`` from torchrun's environment, meeting in a store prefix of
    this restart attempt's own (see the module docstring)."""
    env = os.environ
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise RuntimeError(f"elastic.init_process_group runs under torchrun: {missing} not set")
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    hosted_by_agent = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    wait = timeout or timedelta(minutes=30)
    store = dist.TCPStore(
        env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=rank == 0 and not hosted_by_agent, timeout=wait
    )
    attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefixed = dist.PrefixStore(f"ddp_hooks/attempt{attempt}/", store)
    kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world, **kwargs)


def save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` atomically: a temporary file in the same folder, flushed to
    disk, then renamed over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, target)
