"""Collectives that return torch Futures, count the bytes they move, never reorder and never
drop an error.

The transport knows nothing of algorithms: payloads are tensors whose sizes follow from
shapes, never from data, so every rank issues the same collectives. Every collective of the
library goes through it, so ``stats()`` counts every byte. Each future reads its collective's
result before handing it on: a failed collective (a dead or stalled peer) raises a
:class:`~ddp_hooks.comm.futures.CollectiveError` naming the collective, its stage and the
step, instead of passing on an unfilled buffer.

Stage 0 collectives go out on the served group straight from the hook. A later stage (a
collective that needs an earlier one's result) goes out through :meth:`Transport.then`, on a
group of its own, in the order :meth:`Transport.then` was called (see :mod:`.sequencer`).
"""

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.futures import Future

from .futures import chain, done, pinned, value_of
from .groups import new_group_like
from .sequencer import Sequencer

# torch >= 2.12 names it all_gather_single; older releases all_gather_into_tensor
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


Splits = tuple[list[int], list[int]]  # elements sent to each rank, received from each rank


class ByteCounter(Protocol):
    def collective(self, step: int, kind: str, sent: int, received: int, wire: float | None = None) -> None: ...


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Transport:
    """Counted collectives over one process group, with ordered later stages.

    ``stages`` is the number of dependent collective rounds an algorithm chains; stage
    ``k > 0`` gets its own process group, created here with the served group's backend and
    timeout (collectively: construct on every rank), unless ``side_groups`` gives them (groups
    of the same ranks). ``stats`` counts the bytes.
    """

    def __init__(
        self,
        group: ProcessGroup,
        stats: ByteCounter,
        stages: int = 1,
        side_groups: list[ProcessGroup] | None = None,
    ) -> None:
        self.group = group
        self.stats = stats
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        side = side_groups if side_groups is not None else [new_group_like(group) for _ in range(stages - 1)]
        if len(side) != stages - 1:
            raise ValueError(f"side_groups must hold {stages - 1} groups, got {len(side)}")
        self._groups = [group, *side]
        self._sequencers = [Sequencer() for _ in range(stages)]

    def _issue(self, kind: str, step: int, stage: int, work: Any, result: Callable[[], Any]) -> Future[Any]:
        what = f"{kind} (stage {stage}, step {step})"
        return chain(work.get_future(), lambda _: result(), what)

    # ---- collectives (issued now, on the group of ``stage``) ------------------------------
    def all_reduce(self, tensor: torch.Tensor, step: int, stage: int = 0, largest: bool = False) -> Future[Any]:
        """Sum ``tensor`` in place across ranks (``largest``: the maximum); the future holds
        ``tensor``."""
        self.stats.collective(step, "all_reduce", _nbytes(tensor), _nbytes(tensor))
        op = dist.ReduceOp.MAX if largest else dist.ReduceOp.SUM
        work = dist.all_reduce(tensor, op=op, group=self._groups[stage], async_op=True)
        return self._issue("all_reduce", step, stage, work, lambda: tensor)

    def all_gather(self, payload: torch.Tensor, step: int, stage: int = 0) -> Future[Any]:
        """Gather a fixed-size 1-D payload from every rank; the future holds ``(n, len)``."""
        out = payload.new_empty(self.world_size * payload.numel())
        self.stats.collective(step, "all_gather", _nbytes(payload), _nbytes(out))
        work = _all_gather_flat(out, payload, group=self._groups[stage], async_op=True)
        return self._issue("all_gather", step, stage, work, lambda: out.view(self.world_size, -1))

    def all_to_all(self, chunks: torch.Tensor, step: int, stage: int = 0) -> Future[Any]:
        """Send row ``j`` of ``chunks`` (``(n, len)``) to rank ``j``; the future holds the
        ``(n, len)`` rows received, row ``i`` from rank ``i``."""
        if chunks.dim() != 2 or chunks.shape[0] != self.world_size:
            raise ValueError(f"chunks must have shape (world_size, len), got {tuple(chunks.shape)}")
        out = torch.empty_like(chunks)
        self.stats.collective(step, "all_to_all", _nbytes(chunks), _nbytes(out))
        work = dist.all_to_all_single(out, chunks, group=self._groups[stage], async_op=True)
        return self._issue("all_to_all", step, stage, work, lambda: out)

    def exchange(self, send: torch.Tensor, splits: Splits, step: int, stage: int = 0) -> Future[Any]:
        """All-to-all of uneven pieces: ``send`` (1-D) is cut by ``splits[0]``, piece ``j`` to
        rank ``j``; the future holds what arrives, the piece of rank ``i`` (``splits[1][i]``
        elements) at position ``i``. Wire bytes: what leaves for other ranks, exactly."""
        out_splits, in_splits = splits
        out = send.new_empty(sum(in_splits))
        wire = (send.numel() - out_splits[self.rank]) * send.element_size()
        self.stats.collective(step, "all_to_all", _nbytes(send), _nbytes(out), wire=wire)
        work = dist.all_to_all_single(out, send, in_splits, out_splits, group=self._groups[stage], async_op=True)
        return self._issue("all_to_all", step, stage, work, lambda: out)

    def broadcast(self, tensor: torch.Tensor, src: int, step: int, stage: int = 0) -> Future[Any]:
        """``tensor`` of group rank ``src`` into ``tensor`` on every rank; the future holds it."""
        nbytes = _nbytes(tensor)
        self.stats.collective(step, "broadcast", nbytes if src == self.rank else 0, nbytes)
        group = self._groups[stage]
        root = dist.get_global_rank(group, src)
        work = dist.broadcast(tensor, src=root, group=group, async_op=True)
        return self._issue("broadcast", step, stage, work, lambda: tensor)

    # ---- reduce to owners, then gather ---------------------------------------------------------
    def through_owners(
        self,
        requests: torch.Tensor,
        serve: Callable[[torch.Tensor], Any],
        step: int,
        splits: tuple[Splits, Splits] | None = None,
        in_hook: bool = False,
    ) -> Future[Any]:
        """Each owner reduces what is sent to it, then every rank gets every owner's reply.

        Rank ``j`` is the owner of row ``j`` of ``requests`` (an all-to-all), or of the uneven
        piece ``j`` cut by ``splits[0]``; ``serve`` turns the requests an owner received into
        its reply (compression and decompression are the caller's: a codec, or exact sums);
        the replies travel on stage 1 as an all-gather of equal rows, or as uneven pieces by
        ``splits[1]`` (each owner's reply sent to every rank). ``in_hook``: wait for the
        requests here and run ``serve`` in the hook (it may issue collectives of its own, and
        return their future); else ``serve`` runs when the requests arrive. The future holds
        the replies, in owner order."""
        scatter, gather = splits if splits is not None else (None, None)
        received = self.all_to_all(requests, step) if scatter is None else self.exchange(requests, scatter, step)

        def send_back(reply: torch.Tensor) -> Future[Any]:
            if gather is None:
                return self.all_gather(reply, step, stage=1)
            return self.exchange(reply.reshape(-1).repeat(self.world_size), gather, step, stage=1)

        if in_hook:
            reply = serve(received.wait())  # a failure raises here, named
            return self.then(done(reply) if isinstance(reply, torch.Tensor) else reply, 1, send_back)
        return self.then(received, 1, lambda rows: send_back(serve(rows)))

    # ---- ordered later stages -----------------------------------------------------------
    def then(self, fut: Future[Any], stage: int, fn: Callable[[Any], Future[Any]]) -> Future[Any]:
        """When ``fut`` completes, run ``fn(value)`` (which issues stage ``stage``
        collectives and returns their future), in the order ``then`` was called for that stage.

        Call it from the hook itself (not from a callback), so that the order is the bucket
        order on every rank. If ``fut`` failed, ``fn`` does not run and the error propagates.
        """
        sequencer = self._sequencers[stage]
        ticket = sequencer.reserve()
        out: Future[Any] = Future()
        body = pinned(fn)

        def ready(done: Future[Any]) -> None:
            try:
                value = value_of(done)
            except BaseException as exc:  # noqa: BLE001 - forwarded in ticket order
                sequencer.submit(ticket, None, out, exc)
                return
            sequencer.submit(ticket, lambda: body(value), out)

        fut.add_done_callback(ready)
        return out
