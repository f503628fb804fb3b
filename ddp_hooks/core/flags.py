"""The one convention for non-finite gradients, and where flags may be read on the host.

Every algorithm follows it: a rank whose bucket is not finite (:func:`nonfinite`) says so with one flag element
in what it sends (1.0 for "not finite"); every rank combines the flags of all ranks, and if any
is set the bucket becomes NaN on every rank (so ``torch.amp.GradScaler`` skips the step
everywhere) and no memory takes the step in.

On a CPU, reading a 0-d flag on the host costs nothing, so memory commits swap buffers instead
of copying (:meth:`ddp_hooks.core.ParameterMemory.commit`). On a GPU that read would
synchronize the device, so the same decisions are made with ``torch.where``. Setting
``DDP_HOOKS_SYNC_FREE=1`` (or :func:`sync_free`) makes CPU tensors take the GPU branches too,
which is how the test suite runs them without a GPU.
"""

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

_FORCE_SYNC_FREE = [os.environ.get("DDP_HOOKS_SYNC_FREE") == "1"]


def nonfinite(x: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: is ``x`` not finite? True if it holds inf or NaN, and also if it is so
    large that its squared norm overflows float32 (about 1.8e19): no fp32 arithmetic of the
    algorithms (norms, matmuls, error memories) can carry such a spike, so it is skipped like
    an inf. One read, no bucket-sized temporary and no host synchronization."""
    flat = x.reshape(-1)
    if flat.dtype == torch.float32:
        return ~torch.isfinite(torch.dot(flat, flat))
    if flat.dtype == torch.float64:  # summed in fp64, then held to the float32 range
        return ~torch.isfinite(torch.dot(flat, flat).float())
    return ~torch.isfinite(torch.linalg.vector_norm(flat, dtype=torch.float32))


def as_flag(bad: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The one-element flag a rank sends: 1 if ``bad`` else 0."""
    return bad.to(dtype).reshape(1)


def is_set(flags: torch.Tensor) -> torch.Tensor:
    """0-d bool: is any flag set? ``flags``: flag elements as received (gathered, summed or
    averaged over ranks, of any dtype); an element that is not finite counts as set (a flag
    that traveled in a scaled payload becomes NaN when the payload was not finite). The one
    reader of flags."""
    if flags.is_floating_point():
        return (~torch.isfinite(flags) | (flags != 0)).any()
    return (flags != 0).any()


def with_flag(values: torch.Tensor | Sequence[torch.Tensor], bad: torch.Tensor) -> torch.Tensor:
    """``[values | flag]``: a message that is summed or averaged over ranks, its last element
    this rank's flag (in ``values``' dtype; ``values`` may be several flat tensors, joined).
    Read it back with :func:`split_flag`."""
    parts = [values] if isinstance(values, torch.Tensor) else list(values)
    return torch.cat([*parts, as_flag(bad, parts[0].dtype if parts else torch.float32)])


def write_flag(message: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """The flag written into the last element of a preallocated ``[values | flag]`` message
    (in place; read back with :func:`split_flag`)."""
    message[-1:].copy_(as_flag(bad, message.dtype))
    return message


def split_flag(message: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, 0-d bool: was any rank's flag set?) of a :func:`with_flag` message after the
    ranks' messages were summed or averaged."""
    return message[:-1], is_set(message[-1])


def may_read_host(device: torch.device) -> bool:
    """Whether code on ``device`` may read a tensor's value on the host, e.g. a flag (on a CPU,
    unless :func:`sync_free` is on; never on a GPU, where the read would wait for the device)."""
    return device.type == "cpu" and not _FORCE_SYNC_FREE[0]


def poison(buffer: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """NaN in every element of ``buffer`` if ``bad``; returns ``buffer``."""
    if may_read_host(buffer.device):
        if bool(bad):
            buffer.fill_(float("nan"))
        return buffer
    return buffer.masked_fill_(bad, float("nan"))


def keep_unless(bad: torch.Tensor, target: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """``target = candidate`` unless ``bad``: a memory slice takes a step only if it was finite."""
    if may_read_host(target.device):
        if not bool(bad):
            target.copy_(candidate)
        return target
    return torch.where(bad, target, candidate, out=target)


def add_unless(bad: torch.Tensor, target: torch.Tensor, delta: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``target += alpha * delta`` unless ``bad`` (``delta`` may hold NaN when ``bad``)."""
    if may_read_host(target.device):
        if not bool(bad):
            target.add_(delta, alpha=alpha)
        return target
    return target.add_(torch.where(bad, 0.0, delta), alpha=alpha)


@contextmanager
def sync_free(enabled: bool = True) -> Iterator[None]:
    """Inside, CPU tensors take the branches written for GPUs (no host reads of flags)."""
    old = _FORCE_SYNC_FREE[0]
    _FORCE_SYNC_FREE[0] = enabled
    try:
        yield
    finally:
        _FORCE_SYNC_FREE[0] = old
