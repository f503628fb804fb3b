"""Process groups this library creates: they inherit the timeout of the group they serve.

``dist.new_group`` without a ``timeout`` waits torch's default (30 minutes on gloo) for a
stalled peer, however short the user made the main group's timeout. Every group created here
takes the timeout of the group it serves, so a stalled peer fails every collective of the
library at the user's timeout.
"""

from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def timeout_of(group: ProcessGroup) -> timedelta | None:
    """The timeout ``group`` was created with (None where torch does not expose it)."""
    for device in ("cpu", "cuda"):
        try:
            timeout: timedelta = group._get_backend(torch.device(device)).options._timeout
            return timeout
        except Exception:  # noqa: BLE001 - no backend for that device, or an older torch
            continue
    return None


def new_group_like(group: ProcessGroup, ranks: list[int] | None = None) -> ProcessGroup:
    """A new group (all of ``group``'s ranks, or the global ``ranks``) with its backend and
    timeout. Collective over the whole world: every rank must call it, in the same order."""
    members = dist.get_process_group_ranks(group) if ranks is None else ranks
    made = dist.new_group(ranks=members, backend=dist.get_backend(group), timeout=timeout_of(group))
    if not isinstance(made, ProcessGroup):  # torch returns a sentinel to non-members
        raise RuntimeError(f"this rank is not in the new process group of ranks {members}")
    return made


def partition(group: ProcessGroup, blocks: list[list[int]], copies: int = 1) -> list[ProcessGroup]:
    """For each of ``copies``: one new group per block of ``group``'s ranks (global ranks), with
    ``group``'s backend and timeout; returns this rank's group of each copy. Collective over the
    whole world: every rank must call it with the same blocks, in the same order."""
    me = dist.get_rank()
    backend, timeout = dist.get_backend(group), timeout_of(group)
    mine: list[ProcessGroup] = []
    for _ in range(copies):
        for block in blocks:
            made = dist.new_group(ranks=block, backend=backend, timeout=timeout)
            if me in block:
                if not isinstance(made, ProcessGroup):
                    raise RuntimeError(f"rank {me} did not get its process group of ranks {block}")
                mine.append(made)
    if len(mine) != copies:
        raise RuntimeError(f"rank {me} is in {len(mine)} of the blocks {blocks} x {copies}; expected one per copy")
    return mine


def is_alive(group: ProcessGroup) -> bool:
    """False once ``group`` (or the default group) was destroyed."""
    if not dist.is_available() or not dist.is_initialized():
        return False
    world = getattr(dist.distributed_c10d, "_world", None)
    pg_map = getattr(world, "pg_map", None)
    return True if pg_map is None else group in pg_map
