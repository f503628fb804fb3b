"""Bit packing: 8 flags per byte, least significant bit first.

Bit ``i % 8`` of byte ``i // 8`` holds flag ``i``; padding bits are 1. Signs are packed as
``x >= 0`` (so ``sgn(0) = +1``). On CPU, fp32 inputs go through the fused loops of
:mod:`ddp_hooks._ext.cpu` when they are available (same bytes).
"""

import torch

from .._ext import cpu

# Multiplying 8 bytes that are 0 or 1 (one int64 word, byte i = bit i) by this constant
# gathers byte i's low bit into bit 56 + i, with no carries between them.
_GATHER = 0x0102040810204080
# Spreading a byte into 8 bytes (x * 0x0101010101010101), then keeping bit i in byte i.
_SPREAD = 0x0101010101010101
_SELECT = 0x8040201008040201 - (1 << 64)  # as a signed int64


def packed_size(n: int) -> int:
    """Bytes that hold ``n`` packed flags."""
    return -(-n // 8)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack ``x >= 0`` of a 1-D tensor into ``ceil(len/8)`` bytes."""
    if x.dtype == torch.float32 and cpu.usable(x):
        return cpu.pack_signs(x)
    n = x.numel()
    bits = torch.ones(packed_size(n) * 8, dtype=torch.bool, device=x.device)
    torch.ge(x, 0, out=bits[:n])
    return _gather_bytes(bits)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D bool tensor into ``ceil(len/8)`` bytes."""
    n = bits.numel()
    padded = torch.ones(packed_size(n) * 8, dtype=torch.bool, device=bits.device)
    padded[:n] = bits
    return _gather_bytes(padded)


def _gather_bytes(bits: torch.Tensor) -> torch.Tensor:
    """Bools (a multiple of 8) -> bytes, bit ``i % 8`` of byte ``i // 8`` from bool ``i``."""
    return ((bits.view(torch.uint8).view(torch.int64) * _GATHER) >> 56).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` bits of ``packed`` (``(..., nbytes)``) as bools ``(..., n)``."""
    words = (packed.to(torch.int64) * _SPREAD) & _SELECT
    return words.view(torch.uint8).view(*packed.shape[:-1], -1)[..., :n] != 0


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
