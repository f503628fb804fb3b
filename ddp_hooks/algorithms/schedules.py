"""When the local-step algorithms synchronize: which workers (asynchronous schedules) and which
parameter fragments (streaming) are due after the ``t``-th optimizer step (``t >= 1``).

Every rank computes every worker's schedule from the configuration alone (and the seed), so
the ranks know who is due without exchanging a word about it.

* ``"sync"``: every worker every ``H`` steps (synchronous Qsparse-local-SGD, DiLoCo).
* ``"staggered"``: worker ``r`` of ``n`` at the steps ``t = o_r (mod H)``, ``o_r = floor(r H / n)``:
  the workers take turns, each every ``H`` steps.
* ``"random"``: worker ``r``'s gaps between synchronizations drawn (seeded, different per
  worker) uniformly from ``ceil(H / 2) ... H``: every gap at most ``H``, as the asynchronous
  Qsparse-local-SGD analysis requires.

Fragments: the parameters in ``F`` groups of whole tensors, consecutive in the model's order
and balanced by size; fragment ``f`` is due every ``H`` steps at offset ``floor(f H / F)``.
"""

import math
import random
from collections.abc import Sequence

SCHEDULES = ("sync", "staggered", "random")


def staggered(t: int, index: int, count: int, period: int) -> bool:
    """Whether member ``index`` of ``count`` taking turns every ``period`` steps is due at ``t``."""
    return (t - index * period // count) % period == 0


class Schedule:
    """The workers due after each optimizer step."""

    def __init__(self, kind: str, period: int, seed: int) -> None:
        self.kind, self.period, self.seed = kind, period, seed
        self._next: list[tuple[int, int]] = []  # random: (gaps drawn, next due step) per worker
        self._asked = 0

    @property
    def asynchronous(self) -> bool:
        return self.kind != "sync"

    def due(self, t: int, workers: int) -> list[int]:
        """The workers (ascending) that synchronize after step ``t``."""
        if self.kind == "sync":
            return list(range(workers)) if t % self.period == 0 else []
        if self.kind == "staggered":
            return [r for r in range(workers) if staggered(t, r, workers, self.period)]
        if t < self._asked or len(self._next) != workers:  # a resumed run replays from the start
            self._next = [(1, self._gap(r, 0)) for r in range(workers)]
        self._asked = t
        out = []
        for r in range(workers):
            drawn, at = self._next[r]
            while at < t:
                drawn, at = drawn + 1, at + self._gap(r, drawn)
            self._next[r] = (drawn, at)
            if at == t:
                out.append(r)
        return out

    def _gap(self, worker: int, index: int) -> int:
        """The ``index``-th gap of ``worker``: the same on every rank, any Python, any run."""
        draw = random.Random(f"{self.seed}/{worker}/{index}")
        return draw.randint(math.ceil(self.period / 2), self.period)


def fragments(sizes: Sequence[int], count: int) -> list[list[int]]:
    """Positions of ``sizes`` (tensor sizes in model order) in ``count`` consecutive groups of
    about equal total size, none empty (``count <= len(sizes)``)."""
    total, out, start = sum(sizes), [], 0
    running = 0
    for f in range(count):
        end = start + 1  # at least one tensor each
        running += sizes[start]
        left = count - f - 1
        while end < len(sizes) - left and running + sizes[end] / 2 <= total * (f + 1) / count:
            running += sizes[end]
            end += 1
        if f == count - 1:
            end = len(sizes)
        out.append(list(range(start, end)))
        start = end
    return out
