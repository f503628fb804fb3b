"""Future callbacks that never drop an error and always compute the same floats.

``torch.futures.Future.then`` calls its callback also when the future failed; a callback that
does not read the finished future drops the error and goes on with an unfilled buffer (a dead
peer then trains everyone on garbage). :func:`chain` reads the value first, so a failure
propagates to DDP's backward, renamed after the collective that failed.

Callbacks run on whichever thread completes the future: the hook's own thread when it is
already done, a backend thread otherwise. Those threads can have different intra-op thread
counts, and a matmul or a chunked reduction rounds differently with a different count, so two
ranks could compute different floats from the same inputs. :func:`chain` runs the callback
with the thread count of the thread that created it (the hook's), on every rank.
"""

from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
from torch.futures import Future

T = TypeVar("T")


class CollectiveError(RuntimeError):
    """A collective of this library failed (a peer died, timed out, or sent bad data)."""


def pinned(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` run with the intra-op thread count of the caller of :func:`pinned`."""
    threads = torch.get_num_threads()

    def run(*args: Any) -> T:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return fn(*args)

    return run


def chain(fut: Future[Any], fn: Callable[[Any], T], what: str | None = None) -> Future[T]:
    """When ``fut`` completes, ``fn(value)``; the returned future holds its result.

    If ``fut`` failed, ``fn`` does not run and the error is re-raised as a
    :class:`CollectiveError` naming ``what`` (e.g. ``"all_gather (stage 0, step 12)"``)."""
    body = pinned(fn)

    def callback(done: Future[Any]) -> T:
        return body(value_of(done, what))

    return fut.then(callback)


def value_of(done: Future[Any], what: str | None = None) -> Any:
    """The value of a completed future; its error renamed after ``what`` when given."""
    try:
        return done.value()
    except CollectiveError:
        raise
    except Exception as exc:
        if what is None:
            raise
        raise CollectiveError(f"ddp_hooks: {what} failed: {_first_line(exc)}") from exc


def done(value: T) -> Future[T]:
    """A future that already holds ``value``."""
    fut: Future[T] = Future()
    fut.set_result(value)
    return fut


def fail(fut: Future[Any], error: BaseException) -> None:
    """Complete ``fut`` with ``error`` (torch's stub types the argument as the result)."""
    fut.set_exception(cast(Any, error))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
