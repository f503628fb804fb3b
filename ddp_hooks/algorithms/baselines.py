"""Baselines in the library's API, for side-by-side comparison: exact, fp16 and bf16 all-reduce.

They treat values as DDP does (an inf or NaN on any rank reaches every rank through the sum);
they add ``stats()``, checkpoints and the configuration check of every state.
"""

from typing import ClassVar

import torch
from torch.futures import Future

from ..comm import chain
from ..core import Bucket, HookState


class AllReduce(HookState):
    """Exact fp32 mean all-reduce, bit-identical to DDP without a hook (plus :meth:`stats`).

    ``state = ddp_hooks.AllReduce().register(ddp)``
    """

    sparse_gradients = True  # DDP's own all-reduce of a sparse bucket

    def reduce(self, bucket: Bucket, step: int) -> Future[torch.Tensor]:
        return self.exact_mean(bucket.buffer, step)


class _CastAllReduce(HookState):
    """Cast the bucket to a 16-bit type, divide by the world size, all-reduce, cast back."""

    dtype: ClassVar[torch.dtype]

    def reduce(self, bucket: Bucket, step: int) -> Future[torch.Tensor]:
        buffer = bucket.buffer
        with self.time(step, "compress", buffer.device):
            compressed = buffer.to(self.dtype).div_(self.world_size)
        self.count_bits(step, 8 * compressed.numel() * compressed.element_size())
        reduced = self.transport.all_reduce(compressed, step)

        def decompress(values: torch.Tensor) -> torch.Tensor:
            with self.time(step, "decompress", buffer.device):
                buffer.copy_(values)
            return buffer

        return chain(reduced, decompress)


class FP16Compress(_CastAllReduce):
    """fp16 all-reduce (torch's ``fp16_compress_hook``): 2x fewer bytes, not error-compensated.

    ``state = ddp_hooks.FP16Compress().register(ddp)``
    """

    dtype = torch.float16


class BF16Compress(_CastAllReduce):
    """bf16 all-reduce (torch's ``bf16_compress_hook``): 2x fewer bytes, fp32's range.

    ``state = ddp_hooks.BF16Compress().register(ddp)``
    """

    dtype = torch.bfloat16
