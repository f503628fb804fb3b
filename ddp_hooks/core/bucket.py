"""The part of a DDP bucket an algorithm reduces: a flat gradient and its parameters."""

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
