"""The part of a DDP bucket an algorithm reduces: a flat gradient and its parameters."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch._C._distributed_c10d import GradBucket


@dataclass
class Bucket:
    """A flat gradient ``buffer`` (reduced in place) and the parameters it holds, in order.

    Built from DDP's ``GradBucket`` (:meth:`of`); every algorithm's ``reduce`` takes one.
    """

    buffer: torch.Tensor
    params: list[torch.Tensor]
    is_last: bool = False

    @classmethod
    def of(cls, bucket: GradBucket) -> "Bucket":
        return cls(bucket.buffer(), list(bucket.parameters()), bucket.is_last())

    @property
    def numels(self) -> list[int]:
        return [p.numel() for p in self.params]

    def grads(self) -> list[torch.Tensor]:
        """Each parameter's gradient: views of ``buffer`` shaped like the parameter."""
        return [g.view(p.shape) for g, p in zip(self.buffer.split(self.numels), self.params)]

    def in_logical_order(self) -> tuple["Bucket", Callable[[torch.Tensor], torch.Tensor]] | None:
        """DDP lays each gradient out in its parameter's memory order (a ``channels_last``
        convolution's elements are (out, h, w, in) in the bucket). Algorithms see gradients in
        logical order, so that blocks, matrices and random selections mean the same for every
        memory format: returns a bucket holding a logical-order copy and the function that
        writes a reduced copy back into this bucket (returning its buffer); None when every
        parameter is laid out in logical order already."""
        if not any(_permuted(p) for p in self.params):
            return None
        views = self._ddp_views()
        logical = torch.cat([v.reshape(-1) for v in views])

        def restore(reduced: torch.Tensor) -> torch.Tensor:
            for v, piece in zip(views, reduced.split(self.numels)):
                v.copy_(piece.view(v.shape))
            return self.buffer

        return Bucket(logical, self.params, self.is_last), restore

    def _ddp_views(self) -> list[torch.Tensor]:
        """Each gradient as DDP's bucket view holds it: the parameter's strides when it is
        dense, else its shape."""
        views, start, flat = [], 0, self.buffer.view(-1)
        for p in self.params:
            piece = flat[start : start + p.numel()]
            permuted = _permuted(p)
            views.append(
                piece.as_strided(p.shape, p.stride(), piece.storage_offset()) if permuted else piece.view(p.shape)
            )
            start += p.numel()
        return views


def _permuted(p: torch.Tensor) -> bool:
    """Whether ``p`` is dense but not in logical order (``channels_last``, a transposed view)."""
    if p.is_contiguous():
        return False
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(p.stride(), p.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True
