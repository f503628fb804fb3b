"""Buckets held until the last bucket of a step, for decisions that need the whole gradient.

DDP calls the hook once per bucket, in order, and waits for every bucket's future only after
the last one (``bucket.is_last()``). An algorithm whose rule needs the whole gradient (LAQ's
skip rule, or the one-flag non-finite agreement of local phases) returns a pending future for
each earlier bucket and decides at the last: :class:`HeldBuckets` keeps those buffers and
futures and completes them together, with the result or with the error.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.futures import Future

from ..comm import chain
from ..comm.futures import fail
from .flags import as_flag, is_set, nonfinite, poison


@dataclass
class Held:
    """One bucket's gradient buffer, its parameters and the future DDP waits on."""

    buffer: torch.Tensor
    params: list[torch.Tensor]
    future: Future[torch.Tensor] = field(default_factory=Future)


class HeldBuckets:
    """Collects the buckets of one step; :meth:`release` runs the decision at the last one."""

    def __init__(self) -> None:
        self._held: list[Held] = []

    def hold(self, buffer: torch.Tensor, params: list[torch.Tensor]) -> Future[torch.Tensor]:
        """Keep an earlier bucket; its future completes when the step's last bucket is done."""
        entry = Held(buffer, params)
        self._held.append(entry)
        return entry.future

    def release(
        self, buffer: torch.Tensor, params: list[torch.Tensor], decide: Callable[[list[Held]], Future[Any]]
    ) -> Future[torch.Tensor]:
        """At the last bucket: ``decide(all buckets of the step)`` writes every buffer and
        returns a future that completes when they are written; then every held future
        completes with its buffer (or with the error). Returns the last bucket's future."""
        held, self._held = self._held + [Held(buffer, params)], []
        try:
            written = decide(held)
        except BaseException as exc:
            for entry in held[:-1]:
                fail(entry.future, exc)
            raise

        def complete(_: object) -> torch.Tensor:
            for entry in held[:-1]:
                entry.future.set_result(entry.buffer)
            return buffer

        out = chain(written, complete)
        out.add_done_callback(lambda f: _fail_held(f, held[:-1]))
        return out

    def abandon(self, error: BaseException) -> None:
        """Fail every held future (the step cannot complete)."""
        held, self._held = self._held, []
        for entry in held:
            fail(entry.future, error)


def _fail_held(out: Future[torch.Tensor], held: list[Held]) -> None:
    try:
        out.value()
    except BaseException as exc:  # noqa: BLE001 - every waiting bucket gets the error
        for entry in held:
            if not entry.future.done():
                fail(entry.future, exc)


class LocalPhase:
    """Steps whose gradients stay on their rank (local SGD phases) still agree on finiteness:
    each bucket's non-finite flag is kept, and at the step's last bucket one flag is
    all-reduced; if any rank's step was not finite, every bucket becomes NaN on every rank."""

    def __init__(self) -> None:
        self._held = HeldBuckets()
        self._bad: torch.Tensor | None = None

    def keep(
        self,
        buffer: torch.Tensor,
        params: list[torch.Tensor],
        last: bool,
        agree: Callable[[torch.Tensor], Future[torch.Tensor]],
    ) -> Future[torch.Tensor]:
        """Hold this bucket; at the last one, ``agree(flag)`` all-reduces the step's flag."""
        bad = nonfinite(buffer)
        self._bad = bad if self._bad is None else self._bad | bad
        if not last:
            return self._held.hold(buffer, params)
        flag, self._bad = as_flag(self._bad), None

        def decide(held: list[Held]) -> Future[None]:
            def mark(total: torch.Tensor) -> None:
                for entry in held:
                    poison(entry.buffer, is_set(total[0]))

            return chain(agree(flag), mark)

        return self._held.release(buffer, params, decide)
