"""Collectives that return torch Futures, count the bytes they move and never reorder.

Stage 0 collectives are issued straight from the hook. DDP calls hooks in bucket order on
every rank, so their order is the same everywhere. A later stage (a collective that needs
the result of an earlier one, e.g. the all-gather of re-compressed shards after the
all-to-all) runs in a future callback, and callbacks of different buckets complete in an
order that depends on timing. Issued on the same process group, such collectives interleave
differently on different ranks and the job aborts or deadlocks (torch's own powerSGD_hook
under gloo with several buckets). Here every stage has its own process group and a
:class:`_Sequencer` that issues that stage's collectives in the order their tickets were
taken in the hook, whatever the order in which their inputs become ready.

The transport knows nothing of algorithms: payloads are tensors whose sizes follow from
shapes, never from data, so every rank issues the same collectives.
"""

import threading
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.futures import Future, collect_all


class _Sequencer:
    """Runs submitted thunks strictly in ticket order (tickets are taken in bucket order).

    One thread at a time drains the ready thunks, outside the lock, so that taking a ticket in
    the hook never waits for a thunk's work (e.g. a server step) to finish.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next_ticket = 0
        self._next_run = 0
        self._draining = False
        self._ready: dict[int, tuple[Callable[[], Future] | None, Future, BaseException | None]] = {}

    def reserve(self) -> int:
        with self._lock:
            ticket = self._next_ticket
            self._next_ticket += 1
            return ticket

    def submit(
        self,
        ticket: int,
        thunk: Callable[[], Future] | None,
        out: Future,
        error: BaseException | None = None,
    ) -> None:
        with self._lock:
            self._ready[ticket] = (thunk, out, error)
            if self._draining:
                return  # the draining thread will run it in its turn
            self._draining = True
        while True:
            with self._lock:
                item = self._ready.pop(self._next_run, None)
                if item is None:
                    self._draining = False
                    return
                self._next_run += 1
            thunk, out, error = item
            if error is not None:
                out.set_exception(error)
                continue
            try:
                inner = thunk()
            except BaseException as exc:  # noqa: BLE001 - forwarded to the waiting future
                out.set_exception(exc)
                continue
            inner.add_done_callback(lambda f, out=out: _forward(f, out))


def _forward(source: Future, target: Future) -> None:
    try:
        target.set_result(source.value())
    except BaseException as exc:  # noqa: BLE001
        target.set_exception(exc)


# torch >= 2.12 names it all_gather_single; older releases all_gather_into_tensor
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _first(fut: Future) -> Future:
    return fut.then(lambda f: f.value()[0])


class Transport:
    """Counted collectives over one process group, with ordered later stages.

    ``stages`` is the number of dependent collective rounds an algorithm chains; stage ``k > 0``
    gets its own process group, created here (collectively: construct on every rank).
    ``stats`` is anything with ``collective(step, kind, sent_bytes, received_bytes)``.
    """

    def __init__(self, process_group, stats, stages: int = 1) -> None:
        self.group = process_group
        self.stats = stats
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self._groups = [process_group]
        if stages > 1:
            ranks = dist.get_process_group_ranks(process_group)
            backend = dist.get_backend(process_group)
            for _ in range(stages - 1):
                self._groups.append(dist.new_group(ranks=ranks, backend=backend))
        self._sequencers = [None] + [_Sequencer() for _ in range(stages - 1)]

    # ---- plain collectives (issue now, on the group of ``stage``) -------------------------
    def all_reduce(self, tensor: torch.Tensor, step: int, stage: int = 0) -> Future:
        """Sum ``tensor`` in place across ranks; the future holds ``tensor``."""
        nbytes = tensor.numel() * tensor.element_size()
        self.stats.collective(step, "all_reduce", nbytes, nbytes)
        work = dist.all_reduce(tensor, group=self._groups[stage], async_op=True)
        return _first(work.get_future())

    def all_gather(self, payload: torch.Tensor, step: int, stage: int = 0) -> Future:
        """Gather a fixed-size 1-D payload from every rank; the future holds ``(n, len)``."""
        out = payload.new_empty(self.world_size * payload.numel())
        nbytes = payload.numel() * payload.element_size()
        self.stats.collective(step, "all_gather", nbytes, nbytes * self.world_size)
        work = _all_gather_flat(out, payload, group=self._groups[stage], async_op=True)
        return work.get_future().then(lambda f: out.view(self.world_size, -1))

    def all_to_all(self, chunks: torch.Tensor, step: int, stage: int = 0) -> Future:
        """Send row ``j`` of ``chunks`` (``(n, len)``) to rank ``j``; the future holds the
        ``(n, len)`` rows received, row ``i`` from rank ``i``."""
        if chunks.dim() != 2 or chunks.shape[0] != self.world_size:
            raise ValueError(f"chunks must have shape (world_size, len), got {tuple(chunks.shape)}")
        out = torch.empty_like(chunks)
        nbytes = chunks.numel() * chunks.element_size()
        self.stats.collective(step, "all_to_all", nbytes, nbytes)
        work = dist.all_to_all_single(out, chunks, group=self._groups[stage], async_op=True)
        return work.get_future().then(lambda f: out)

    # ---- ordered later stages -----------------------------------------------------------
    def then(self, fut: Future, stage: int, fn: Callable[[object], Future]) -> Future:
        """When ``fut`` completes, run ``fn(value)`` (which issues stage ``stage`` collectives
        and returns their future), in the order in which ``then`` was called for that stage.

        Call ``then`` from the hook itself (not from a callback) so that the order is the
        bucket order on every rank.
        """
        sequencer = self._sequencers[stage]
        ticket = sequencer.reserve()
        out: Future = Future()

        def ready(done: Future) -> None:
            try:
                value = done.value()
            except BaseException as exc:  # noqa: BLE001
                sequencer.submit(ticket, None, out, exc)
                return
            sequencer.submit(ticket, lambda: fn(value), out)

        fut.add_done_callback(ready)
        return out

    def sharded_exchange(
        self,
        chunks: torch.Tensor,
        server: Callable[[torch.Tensor], torch.Tensor],
        step: int,
        after: Future | None = None,
    ) -> Future:
        """Two-way exchange through shard owners.

        Row ``j`` of ``chunks`` (``(n, len)``, this rank's compressed message for shard ``j``)
        goes to rank ``j`` (all-to-all); the owner runs ``server`` on the ``(n, len)`` messages
        it received for its shard and returns a fixed-size 1-D reply; the replies are
        all-gathered. The future holds the ``(n, reply_len)`` replies, row ``j`` for shard ``j``.
        If ``after`` is given, ``server`` also waits for it to complete.
        """
        received = self.all_to_all(chunks, step, stage=0)
        if after is not None:
            received = collect_all([after, received]).then(lambda f: f.value()[1].value())
        return self.then(received, 1, lambda rows: self.all_gather(server(rows), step, stage=1))
