"""FSDP2's all-reduce hook: each parameter group's reduce-scatter output goes to the state as a
bucket of local shards (:mod:`.fsdp` finds the shards and their layout)."""

from collections.abc import Callable
from typing import Any

import torch
from torch.futures import Future

from .bucket import Bucket
from .flags import as_flag, is_set, nonfinite, poison
from .fsdp import ShardGroup


class ShardFeed:
    """The all-reduce hooks of one state: each parameter group's reduce output goes to
    ``feed`` (the state's bucket entry) as a bucket; the group's last in the backward ends the
    step. FSDP's hook must leave the output reduced when it returns, so a group's reduction is
    waited for there, except where the algorithm ``holds`` groups until the step's last (its
    decision needs the whole gradient): those are written into the gradients at the last.

    Gradient accumulation: on micro-steps with ``set_requires_all_reduce(False)`` the hook
    leaves the shard to FSDP, which accumulates it; the exchanging backward folds the
    accumulated gradient into its output, so the replicas exchange the whole of it.

    ``agree_flag`` takes the maximum of a flag over the ranks of this rank's replica."""

    def __init__(
        self,
        feed: Callable[[Bucket], Future[torch.Tensor]],
        agree_flag: Callable[[torch.Tensor], torch.Tensor],
        holds: Callable[[], bool],
    ) -> None:
        self._feed = feed
        self._agree_flag = agree_flag
        self._holds = holds
        self._groups: list[ShardGroup] = []
        self._seen: set[int] = set()
        self._pending: list[tuple[ShardGroup, Future[torch.Tensor]]] = []

    def install(self, groups: list[tuple[Any, ShardGroup]]) -> None:
        self._groups = [g for _, g in groups if g.params]
        for module, group in groups:
            if group.params:
                module.set_all_reduce_hook(self._hook(group))

    def _hook(self, group: ShardGroup) -> Callable[[torch.Tensor], None]:
        def hook(output: torch.Tensor) -> None:
            self.reduce(group, output)

        return hook

    def reduce(self, group: ShardGroup, output: torch.Tensor) -> None:
        """Reduce one parameter group's output in place (see the class docstring)."""
        if not group.exchanges():
            return  # a micro-step: FSDP accumulates the shard into its gradient
        group.fold(output)
        is_last = self._count(group)
        bucket = group.bucket_of(output, is_last)
        # a bad shard on any rank of the replica: bad on each of them
        poison(bucket.buffer, is_set(self._agree_flag(as_flag(nonfinite(bucket.buffer)))))
        future = self._feed(bucket)
        if not is_last and self._holds():
            self._pending.append((group, future))
            return
        group.write_back(future.wait(), output)
        pending, self._pending = self._pending, []
        for held, reduced in pending:
            held.write_grads(reduced.wait())

    def _count(self, group: ShardGroup) -> bool:
        """Count ``group`` in this step; whether it is the step's last."""
        if id(group) in self._seen:
            missing = len(self._groups) - len(self._seen)
            self._seen.clear()
            self._pending.clear()
            raise RuntimeError(
                f"an FSDP parameter group was reduced twice in one step while {missing} others got no gradient: "
                "every fully_shard module must take part in every backward pass"
            )
        self._seen.add(id(group))
        if len(self._seen) < len(self._groups):
            return False
        self._seen.clear()
        return True
