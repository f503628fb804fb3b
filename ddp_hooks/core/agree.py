"""All ranks agree on one configuration before the first compressed step.

Ranks configured differently (fp16 on one and bf16 on another, different warm-up lengths,
another rank for PowerSGD) would otherwise train silently apart, hang until the process
group's timeout, or abort. Once, at registration or at the first hook call, every rank
all-gathers a small dict of fields (algorithm, its hyper-parameters, warm-up, topology, the
model's parameter layout, the library version) and compares; any difference raises on every
rank, naming the field and the ranks.
"""

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


class ConfigMismatch(ValueError):
    """Ranks were configured differently."""


def agree(group: ProcessGroup, fields: dict[str, Any], what: str, heading: str | None = None) -> None:
    """Compare ``fields`` across the ranks of ``group``; raise :class:`ConfigMismatch` on every
    rank if any field differs (a collective: call it on every rank). The message starts with
    ``heading`` (default: "ranks configured <what> differently")."""
    size = dist.get_world_size(group)
    if size == 1:
        return
    gathered: list[Any] = [None] * size
    if dist.get_backend(group) == "nccl" and torch.cuda.is_available():
        with torch.cuda.device(torch.cuda.current_device()):
            dist.all_gather_object(gathered, fields, group=group)
    else:
        dist.all_gather_object(gathered, fields, group=group)
    problems = differences(gathered)
    if problems:
        raise ConfigMismatch((heading or f"ranks configured {what} differently") + ": " + "; ".join(problems))


def differences(per_rank: list[dict[str, Any]]) -> list[str]:
    """One line per field whose value is not the same on every rank, naming the ranks."""
    keys: list[str] = []
    for fields in per_rank:
        keys += [k for k in fields if k not in keys]
    out = []
    for key in keys:
        by_value: dict[str, list[int]] = {}
        for rank, fields in enumerate(per_rank):
            by_value.setdefault(repr(fields.get(key, "<missing>")), []).append(rank)
        if len(by_value) > 1:
            parts = [f"{_ranks(ranks)} {value}" for value, ranks in by_value.items()]
            out.append(f"{key}: " + ", ".join(parts))
    return out


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(map(str, ranks))
