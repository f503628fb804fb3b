"""Bit packing: 8 flags per byte, least significant bit first.

Bit ``i % 8`` of byte ``i // 8`` holds flag ``i``; padding bits are 1. Signs are packed as
``x >= 0`` (so ``sgn(0) = +1``). On CPU, fp32 inputs go through the fused loops of
:mod:`ddp_hooks._ext.cpu` when they are available (same bytes); the torch reference is
:mod:`.reference`.
"""

import torch

from .._ext import cpu
from . import dispatch, reference
from .reference import pack_bits, packed_size, unpack_bits

__all__ = ["bytes_as", "pack_bits", "pack_signs", "packed_size", "unpack_bits", "unpack_signs"]


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack ``x >= 0`` of a 1-D tensor into ``ceil(len/8)`` bytes."""
    if x.dtype == torch.float32 and dispatch.usable("pack_signs", x):
        return cpu.pack_signs(x)
    return reference.pack_signs(x)


def unpack_signs(packed: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: the first ``n`` signs as +1 / -1 of ``dtype``."""
    return torch.where(unpack_bits(packed, n), 1.0, -1.0).to(dtype)


def bytes_as(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bytes ``(..., m * itemsize)`` read as ``dtype`` ``(..., m)``, for any slice of a message.

    A field of a gathered message sits at whatever byte offset its layout gives it, and a
    single row is contiguous without being aligned, so the bytes are always copied into a
    fresh (aligned, contiguous) buffer first: a plain ``view`` would fail or depend on the row
    count.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    out = torch.empty((*raw.shape[:-1], raw.shape[-1] // itemsize), dtype=dtype, device=raw.device)
    if out.numel():  # an empty field (a tensor of no elements) has no bytes to copy
        out.view(torch.uint8).copy_(raw)
    return out
