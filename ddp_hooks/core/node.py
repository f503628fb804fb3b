"""Node-aware reduction: exact inside a node, the algorithm between nodes.

The ranks of the state's group form nodes of ``L`` consecutive ranks (torchrun numbers them so:
``rank = node * L + local_rank``). Each local rank owns a fixed share of the model's
parameters: whole tensors, balanced by size, decided once from the model's parameter list (so
it does not move when DDP rebuilds its buckets). Per bucket:

1. the exact mean of each share on its owner: every rank sends each owner that owner's share of
   its gradient (fp32) and its non-finite flag, in one all-to-all on the node's group; the owner
   sums the ranks' pieces in rank order and scales by ``1/L``. If any rank of the node had a
   non-finite bucket, every owner's share becomes NaN, so each owner's algorithm sees it and
   the library's non-finite contract carries across nodes;
2. the algorithm reduces the share this local rank owns, between the nodes: its process group
   is the ranks of the same local rank, one per node, and its memory (errors, momentum, warm
   starts) exists only for the parameters it owns;
3. an intra-node gather gives every rank the whole result: each owner sends its reduced share
   to every rank of the node (a second all-to-all).

Each rank sends about ``(L - 1)/L`` of the bucket in each of the two exchanges: half of what two
all-reduces would send.

Algorithms with local steps synchronize the parameters they own between nodes, then
:meth:`NodeAware.share` gives every rank of the node the owners' new values. Intra-node bytes
are counted apart from the algorithm's (inter-node) bytes.
"""

import os
from typing import Any

import torch
import torch.distributed as dist
from torch.futures import Future

from ..comm import Transport, chain, done, partition
from .bucket import Bucket
from .carrier import Reduce
from .flags import as_flag, nonfinite, poison, split_flag
from .layouts import LayoutCache
from .stats import Stats

NodeSize = int | str | None


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
        self._plans: LayoutCache[_Plan] = LayoutCache(self._build_plan)
        self._transport: Transport | None = None

    @property
    def ranks_per_worker(self) -> int:
        return self.size

    def worker(self, group: dist.ProcessGroup) -> tuple[int, int]:
        """(this rank's node, the number of nodes): a node is the algorithm's worker."""
        return self.node, self.nodes

    def connect(self, group: dist.ProcessGroup, stages: int, stats: Stats) -> Transport:
        """Create the node groups (two stages) and the cross-node groups (``stages``), on every
        rank in the same order; returns the algorithm's transport over this rank's cross-node
        groups (the ranks of the same local rank, one per node)."""
        size, m = self.size, self._members
        node_blocks = [m[n * size : (n + 1) * size] for n in range(self.nodes)]
        cross_blocks = [m[j::size] for j in range(size)]
        node_groups = partition(group, node_blocks, copies=2)
        cross = partition(group, cross_blocks, copies=stages)
        self._transport = Transport(node_groups[0], self.stats, 2, side_groups=node_groups[1:])
        return Transport(cross[0], stats, stages, side_groups=cross[1:])

    @property
    def transport(self) -> Transport:
        assert self._transport is not None, "connect() first"
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

    def served(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The parameters among ``params`` that this local rank owns, in their order."""
        return [p for p in params if self._owner[id(p)] == self.local]

    # ---- the three steps of a bucket --------------------------------------------------------------
    def reduce(self, bucket: Bucket, step: int, inner: Reduce, needs_last: bool) -> Future[torch.Tensor]:
        """Intra-node mean of each share on its owner, the algorithm on this rank's share, and
        an intra-node gather of the shares."""
        buf, plan = bucket.buffer, self._plans.get(bucket.params, step)
        mine = plan.sizes[self.local]

        def serve(received: torch.Tensor) -> Future[torch.Tensor]:
            """The exact mean of this rank's share (every rank's piece and flag, summed in rank
            order), reduced between the nodes by the algorithm."""
            rows = received.view(self.size, mine + 1)
            total = rows[0].clone()
            for r in range(1, self.size):
                total += rows[r]
            summed, bad = split_flag(total)
            share = poison(summed.mul_(1.0 / self.size), bad)
            share = share.to(buf.dtype) if buf.dtype != torch.float32 else share
            owned = plan.owned[self.local]
            if not owned and not (bucket.is_last and needs_last):
                return done(share)
            return inner(Bucket(share, owned, bucket.is_last), step)

        def write(shares: torch.Tensor) -> torch.Tensor:
            flat, start = buf.view(-1), 0
            for spans in plan.spans:
                for a, b in spans:
                    flat[a:b].copy_(shares[start : start + b - a])
                    start += b - a
            return buf

        splits = (plan.scatter, plan.gather)
        return chain(self.transport.through_owners(self._pieces(buf, plan), serve, step, splits, in_hook=True), write)

    def _pieces(self, buf: torch.Tensor, plan: "_Plan") -> torch.Tensor:
        """The bucket in owner order, fp32, each owner's share followed by this rank's flag."""
        flat, flag = buf.view(-1), as_flag(nonfinite(buf))
        pieces: list[torch.Tensor] = []
        for spans in plan.spans:
            pieces += [flat[a:b] for a, b in spans]
            pieces.append(flag)
        return torch.cat([x.float() for x in pieces])

    def _build_plan(self, params: list[torch.Tensor]) -> "_Plan":
        return _Plan([self._owner[id(p)] for p in params], params, self.size, self.local)

    # ---- helpers for algorithms ---------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """Nothing beyond ``node_size``, which the state's configuration holds."""
        return {}

    def report(self, step: int) -> dict[str, Any]:
        """The node size and the intra-node bytes, for ``stats()``."""
        intra = self.stats.summary(step)
        return {"node_size": self.size, "intra_node": {k: intra[k] for k in ("last_step", "total")}}

    def combine(self, tensor: torch.Tensor, step: int, largest: bool = False) -> torch.Tensor:
        """Sum (or maximum) of ``tensor`` over the node's ranks, in place."""
        result: torch.Tensor = self.transport.all_reduce(tensor, step, largest=largest).wait()
        return result

    def publish(self, params: list[torch.Tensor], step: int) -> None:
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


class _Plan:
    """Who owns what in one bucket layout: each local rank's spans of the bucket (merged where
    adjacent), its parameters and its share size; and this rank's split sizes of the two
    exchanges (out, in): ``scatter`` sends each owner its share plus a flag, ``gather`` sends
    this rank's reduced share to every rank."""

    def __init__(self, owners: list[int], params: list[torch.Tensor], size: int, local: int) -> None:
        self.spans: list[list[tuple[int, int]]] = [[] for _ in range(size)]
        self.owned: list[list[torch.Tensor]] = [[] for _ in range(size)]
        start = 0
        for p, j in zip(params, owners):
            spans, stop = self.spans[j], start + p.numel()
            if spans and spans[-1][1] == start:
                spans[-1] = (spans[-1][0], stop)
            else:
                spans.append((start, stop))
            self.owned[j].append(p)
            start = stop
        self.sizes = [sum(b - a for a, b in spans) for spans in self.spans]
        mine = self.sizes[local]
        self.scatter = ([n + 1 for n in self.sizes], [mine + 1] * size)
        self.gather = ([mine] * size, list(self.sizes))
