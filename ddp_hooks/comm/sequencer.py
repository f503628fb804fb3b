"""Issue a later stage's collectives in ticket order, whatever the order their inputs finish.

Stage 0 collectives are issued straight from the hook, and DDP calls hooks in bucket order on
every rank, so their order is the same everywhere. A later stage (a collective that needs the
result of an earlier one) runs when its input is ready, and the inputs of different buckets
become ready in an order that depends on timing. Issued on one process group as they come,
such collectives would interleave differently on different ranks (torch's powerSGD_hook under
gloo with several buckets aborts this way). A :class:`Sequencer` runs them strictly in the
order their tickets were taken in the hook.
"""

import threading
from collections.abc import Callable
from typing import Any

from torch.futures import Future

from .futures import fail, value_of

Thunk = Callable[[], Future[Any]]


class Sequencer:
    """Runs submitted thunks strictly in ticket order (tickets are taken in bucket order).

    One thread at a time drains the ready thunks, outside the lock, so that taking a ticket in
    the hook never waits for a thunk's work (e.g. a server step) to finish. A failed input or
    thunk fails its own future and does not stop later tickets.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next_ticket = 0
        self._next_run = 0
        self._draining = False
        self._ready: dict[int, tuple[Thunk | None, Future[Any], BaseException | None]] = {}

    def reserve(self) -> int:
        with self._lock:
            ticket = self._next_ticket
            self._next_ticket += 1
            return ticket

    def submit(self, ticket: int, thunk: Thunk | None, out: Future[Any], error: BaseException | None = None) -> None:
        with self._lock:
            self._ready[ticket] = (thunk, out, error)
            if self._draining:
                return  # the draining thread runs it in its turn
            self._draining = True
        while True:
            with self._lock:
                item = self._ready.pop(self._next_run, None)
                if item is None:
                    self._draining = False
                    return
                self._next_run += 1
            self._run(*item)

    @staticmethod
    def _run(thunk: Thunk | None, out: Future[Any], error: BaseException | None) -> None:
        if error is not None or thunk is None:
            fail(out, error or RuntimeError("nothing to run"))
            return
        try:
            inner = thunk()
        except BaseException as exc:  # noqa: BLE001 - forwarded to the waiting future
            fail(out, exc)
            return
        inner.add_done_callback(lambda f: _forward(f, out))


def _forward(source: Future[Any], target: Future[Any]) -> None:
    try:
        target.set_result(value_of(source))
    except BaseException as exc:  # noqa: BLE001
        fail(target, exc)
