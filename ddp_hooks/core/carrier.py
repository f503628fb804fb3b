"""Carriers: how a rank's gradient reaches the algorithm, and what the algorithm's worker is.

The algorithm sees buckets of the gradient of one *worker* and runs between the workers.
A carrier decides what a worker is and what it hands over:

* :class:`Flat` (the default): every rank is a worker, and the algorithm reduces each bucket
  as DDP gives it;
* :class:`~ddp_hooks.core.node.NodeAware`: the ranks of a node form one worker, each rank
  serving a fixed share of its parameters (the exact mean of the share inside the node, the
  algorithm between the nodes, then the shares gathered back);
* :class:`~ddp_hooks.core.fsdp.Replicas`: a sharded model's replica is one worker, each of
  its ranks serving its own shards (FSDP2 reduces inside the replica; the algorithm runs
  between the ranks that hold the same shard).

The algorithm is the same under every carrier: it asks the carrier (through its state) which
parameters it serves, sums quantities of its whole gradient with ``combine`` and, after a
synchronization of the parameters it serves, hands their values to the other ranks of its
worker with ``publish``.
"""

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.futures import Future

from ..comm import Transport
from .bucket import Bucket
from .stats import Stats

#: the algorithm's reduction of a bucket at a step
Reduce = Callable[[Bucket, int], Future[torch.Tensor]]


class Carrier(Protocol):
    """What the runtime asks of a carrier (see the module docstring)."""

    @property
    def ranks_per_worker(self) -> int:
        """Ranks that form one worker (1: every rank is a worker)."""
        ...

    def worker(self, group: dist.ProcessGroup) -> tuple[int, int]:
        """(this rank's worker index, the number of workers)."""
        ...

    def own(self, params: list[torch.Tensor]) -> None:
        """Decide, once from the model's parameter list, which rank serves which parameter."""
        ...

    def connect(self, group: dist.ProcessGroup, stages: int, stats: Stats) -> Transport:
        """The algorithm's transport between the workers, counting into ``stats`` (creates
        process groups: collective over ``group``)."""
        ...

    def reduce(self, bucket: Bucket, step: int, inner: Reduce, needs_last: bool) -> Future[torch.Tensor]:
        """The bucket's new gradient, ``inner`` (the algorithm) reducing what this rank serves."""
        ...

    def served(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The parameters among ``params`` this rank serves, in their order."""
        ...

    def combine(self, tensor: torch.Tensor, step: int, largest: bool) -> torch.Tensor:
        """The sum (``largest``: maximum) of ``tensor`` over the ranks of this rank's worker."""
        ...

    def publish(self, params: list[torch.Tensor], step: int) -> None:
        """Every rank of the worker takes the values of ``params`` their servers synchronized."""
        ...

    def report(self, step: int) -> dict[str, Any]:
        """Entries the carrier adds to ``stats()``."""
        ...

    def identity(self) -> dict[str, Any]:
        """Settings of the carrier that a checkpoint must match (beside the algorithm's)."""
        ...


class Flat:
    """Every rank is a worker: buckets go to the algorithm as DDP gives them."""

    ranks_per_worker = 1

    def worker(self, group: dist.ProcessGroup) -> tuple[int, int]:
        return dist.get_rank(group), dist.get_world_size(group)

    def own(self, params: list[torch.Tensor]) -> None:
        """Nothing to decide: this rank serves every parameter."""

    def connect(self, group: dist.ProcessGroup, stages: int, stats: Stats) -> Transport:
        return Transport(group, stats, stages)

    def reduce(self, bucket: Bucket, step: int, inner: Reduce, needs_last: bool) -> Future[torch.Tensor]:
        return inner(bucket, step)

    def served(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        return params

    def combine(self, tensor: torch.Tensor, step: int, largest: bool) -> torch.Tensor:
        return tensor

    def publish(self, params: list[torch.Tensor], step: int) -> None:
        """Nothing to hand over: this rank is the whole worker."""

    def report(self, step: int) -> dict[str, Any]:
        return {}

    def identity(self) -> dict[str, Any]:
        return {}
