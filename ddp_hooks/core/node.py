"""Node-aware reduction: exact inside a node, the algorithm between nodes.

The ranks of the state's group form nodes of ``L`` consecutive ranks (torchrun numbers them so:
``rank = node * L + local_rank``). Each local rank owns a fixed share of the model's
parameters: whole tensors, balanced by size, decided once from the model's parameter list (so
it does not move when DDP rebuilds its buckets). Per bucket:

1. the exact mean inside the node (fp32 all-reduce on the node's group, then ``1/L``), with
   one flag element: if any rank of the node had a non-finite bucket, the whole bucket becomes
   NaN on every rank of the node, so each owner's algorithm sees it and the library's
   non-finite contract carries across nodes;
2. the algorithm reduces the part of the bucket this local rank owns, between the nodes: its
   process group is the ranks of the same local rank, one per node, and its memory (errors,
   momentum, warm starts) exists only for the parameters it owns;
3. an intra-node gather gives every rank the whole result (an all-reduce of the bucket with
   zeros outside each rank's parameters, which adds nothing but zeros: exact).

Algorithms with local steps synchronize the parameters they own between nodes, then
:meth:`NodeAware.share` gives every rank of the node the owners' new values. Intra-node bytes
are counted apart from the algorithm's (inter-node) bytes.
"""

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.futures import Future

from ..comm import Transport, chain, done, partition
from .bucket import Bucket
from .flags import as_flag, nonfinite, poison
from .stats import Stats

NodeSize = int | str | None
Reduce = Callable[[Bucket, int], Future[torch.Tensor]]


def check_node_size(value: Any) -> NodeSize:
    """``None`` (flat), an int >= 1, or ``"auto"`` (torchrun's ``LOCAL_WORLD_SIZE``)."""
    if value is None or value == "auto":
        return value  # type: ignore[no-any-return]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"node_size must be None, 'auto' or an integer in [1, 2**20], got {value!r}")
    if value > 2**20:
        raise ValueError(f"node_size must be None, 'auto' or an integer in [1, 2**20], got {value!r}")
    return value


def resolve_node_size(spec: NodeSize, world: int, rank: int) -> int | None:
    """The number of ranks per node, or None for the flat mode (also for a node of one rank)."""
    if spec is None:
        return None
    if spec == "auto":
        text = os.environ.get("LOCAL_WORLD_SIZE")
        if text is None or not text.isdigit() or int(text) < 1:
            raise ValueError(
                f"node_size='auto' reads LOCAL_WORLD_SIZE (set by torchrun), which is {text!r}: "
                "launch with torchrun or pass node_size=<ranks per node>"
            )
        size = int(text)
    else:
        size = int(spec)
    if world % size:
        raise ValueError(f"node_size must divide the world size {world}, got {size}")
    local = os.environ.get("LOCAL_RANK")
    if local is not None and local.isdigit() and spec == "auto" and int(local) != rank % size:
        raise ValueError(
            f"node_size='auto' needs the ranks of a node to be consecutive, but rank {rank} has "
            f"LOCAL_RANK {local} (expected {rank % size})"
        )
    return size if size > 1 else None


def assign(numels: list[int], size: int) -> list[int]:
    """The local rank owning each tensor: largest first, each to the least loaded local rank
    (the lowest on ties). Deterministic, so every rank computes the same assignment."""
    load = [0] * size
    owner = [0] * len(numels)
    for k in sorted(range(len(numels)), key=lambda k: (-numels[k], k)):
        j = min(range(size), key=lambda r: (load[r], r))
        owner[k] = j
        load[j] += numels[k]
    return owner


class NodeAware:
    """The node layer of one state: groups, ownership, the intra-node collectives."""

    def __init__(self, group: dist.ProcessGroup, size: int) -> None:
        members = dist.get_process_group_ranks(group)
        self.size = size
        self.nodes = len(members) // size
        rank = dist.get_rank(group)
        self.node, self.local = divmod(rank, size)
        self._members = members
        self.stats = Stats(world_size=size)
        self._owner: dict[int, int] = {}
        self._transport: Transport | None = None

    def make_groups(self, group: dist.ProcessGroup, inner_stages: int) -> list[dist.ProcessGroup]:
        """Create the node groups (two stages) and the cross-node groups (``inner_stages``), on
        every rank in the same order; returns this rank's cross-node groups (the algorithm's)."""
        size, m = self.size, self._members
        node_blocks = [m[n * size : (n + 1) * size] for n in range(self.nodes)]
        cross_blocks = [m[j::size] for j in range(size)]
        node_groups = partition(group, node_blocks, copies=2)
        cross = partition(group, cross_blocks, copies=inner_stages)
        self._transport = Transport(node_groups[0], self.stats, 2, side_groups=node_groups[1:])
        return cross

    @property
    def transport(self) -> Transport:
        assert self._transport is not None, "make_groups() first"
        return self._transport

    # ---- ownership ------------------------------------------------------------------------------
    def own(self, params: list[torch.Tensor]) -> None:
        """Decide who owns each of the model's parameters (once, from its parameter list)."""
        if len(params) < self.size:
            raise ValueError(
                f"node_size {self.size} needs at least {self.size} parameter tensors (one per local rank), "
                f"the model has {len(params)}"
            )
        owners = assign([p.numel() for p in params], self.size)
        self._owner = {id(p): j for p, j in zip(params, owners)}

    def owned(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The parameters among ``params`` that this local rank owns, in their order."""
        return [p for p in params if self._owner[id(p)] == self.local]

    # ---- the three steps of a bucket --------------------------------------------------------------
    def reduce(self, bucket: Bucket, step: int, inner: Reduce, needs_last: bool) -> Future[torch.Tensor]:
        """Intra-node mean, the algorithm on this rank's share, intra-node gather."""
        buf, n = bucket.buffer, bucket.buffer.numel()
        payload = torch.empty(n + 1, dtype=torch.float32, device=buf.device)
        payload[:n].copy_(buf.reshape(-1))
        payload[n:].copy_(as_flag(nonfinite(buf)))
        mean = self.transport.all_reduce(payload, step).wait()  # a failure raises here, named
        values = poison(mean[:n].mul_(1.0 / self.size), ~torch.isfinite(mean[n]) | (mean[n] != 0))
        spans, owned = self._spans(bucket)
        if not owned and not (bucket.is_last and needs_last):
            result: Future[torch.Tensor] = done(values.new_empty(0))
        else:
            pieces = [values[a:b] for a, b in spans]
            share = pieces[0] if len(pieces) == 1 else torch.cat(pieces) if pieces else values.new_empty(0)
            share = share.to(buf.dtype) if buf.dtype != torch.float32 else share
            result = inner(Bucket(share, owned, bucket.is_last), step)

        def gather(reduced: torch.Tensor) -> Future[torch.Tensor]:
            full = torch.zeros(n, dtype=buf.dtype, device=buf.device)
            start = 0
            for a, b in spans:
                full[a:b].copy_(reduced[start : start + b - a])
                start += b - a
            return self.transport.all_reduce(full, step, stage=1)

        def write(full: torch.Tensor) -> torch.Tensor:
            return buf.copy_(full.view_as(buf))

        return chain(self.transport.then(result, 1, gather), write)

    def _spans(self, bucket: Bucket) -> tuple[list[tuple[int, int]], list[torch.Tensor]]:
        spans: list[tuple[int, int]] = []
        owned: list[torch.Tensor] = []
        start = 0
        for p in bucket.params:
            if self._owner[id(p)] == self.local:
                if spans and spans[-1][1] == start:
                    spans[-1] = (spans[-1][0], start + p.numel())
                else:
                    spans.append((start, start + p.numel()))
                owned.append(p)
            start += p.numel()
        return spans, owned

    # ---- helpers for algorithms ---------------------------------------------------------------
    def combine(self, tensor: torch.Tensor, step: int, largest: bool = False) -> torch.Tensor:
        """Sum (or maximum) of ``tensor`` over the node's ranks, in place."""
        result: torch.Tensor = self.transport.all_reduce(tensor, step, largest=largest).wait()
        return result

    def share(self, params: list[torch.Tensor], step: int) -> None:
        """Every rank of the node takes the owners' values of ``params`` (after a synchronization
        that only the owners took part in)."""
        numels = [p.numel() for p in params]
        flat = torch.zeros(sum(numels), dtype=torch.float32, device=params[0].device)
        for p, piece in zip(params, flat.split(numels)):
            if self._owner[id(p)] == self.local:
                piece.copy_(p.detach().reshape(-1))
        self.transport.all_reduce(flat, step).wait()
        with torch.no_grad():
            for p, piece in zip(params, flat.split(numels)):
                if self._owner[id(p)] != self.local:
                    p.copy_(piece.view_as(p))
