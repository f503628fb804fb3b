"""Bit packing: 8 flags per byte, least significant bit first.

Bit ``i % 8`` of byte ``i // 8`` holds flag ``i``; padding bits are 1. Signs are packed as
``x >= 0`` (so ``sgn(0) = +1``). On CPU, fp32 inputs go through the fused loops of
:mod:`ddp_hooks._ext.cpu` when they are available (same bytes); the torch reference is
:mod:`.reference`.
"""

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from .._ext import cpu
from ..core.flags import as_flag, is_set
from . import dispatch, reference
from .reference import pack_bits, packed_size, unpack_bits

__all__ = [
    "FLAG_BYTES",
    "ByteLayout",
    "bytes_as",
    "pack_bits",
    "pack_codes",
    "pack_signs",
    "packed_size",
    "unpack_bits",
    "unpack_codes",
    "unpack_signs",
]


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


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes of ``bits`` bits each into ``ceil(len * bits / 8)`` bytes."""
    if dispatch.usable("pack_codes", codes) and codes.dtype == torch.uint8:
        return cpu.pack_codes(codes, bits)
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    planes = ((codes.unsqueeze(1) >> shifts) & 1).reshape(-1)  # bit j of code i at i*bits + j
    return pack_bits(planes.bool())


def unpack_codes(packed: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`; ``packed`` may be ``(..., nbytes)``."""
    planes = unpack_bits(packed, count * bits).view(torch.uint8)
    planes = planes.view(*packed.shape[:-1], count, bits)
    weights = (1 << torch.arange(bits, dtype=torch.int32, device=packed.device)).to(torch.uint8)
    return (planes * weights).sum(-1, dtype=torch.uint8)


#: the non-finite flag at the tail of a byte message: one fp32 element (1.0: not finite)
FLAG_BYTES = 4


class ByteLayout:
    """The one builder of byte messages: named fields of fixed widths laid end to end, then
    (with ``flag``) the non-finite flag's :data:`FLAG_BYTES`. Rows may be one message or
    gathered ``(n, nbytes)`` messages; a field read as another dtype is copied (:func:`bytes_as`)."""

    def __init__(self, widths: Mapping[Any, int] | Sequence[int], flag: bool = False) -> None:
        items = widths.items() if isinstance(widths, Mapping) else enumerate(widths)
        self.spans: dict[Hashable, tuple[int, int]] = {}
        at = 0
        for name, width in items:
            self.spans[name] = (at, at + width)
            at += width
        self.flag = flag
        self.nbytes = at + (FLAG_BYTES if flag else 0)

    def field(self, rows: torch.Tensor, name: Hashable, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Field ``name`` of ``rows``: its bytes (a view), or read as ``dtype``."""
        a, b = self.spans[name]
        return rows[..., a:b] if dtype is None else bytes_as(rows[..., a:b], dtype)

    def join(
        self, parts: Mapping[Any, torch.Tensor] | Sequence[torch.Tensor], bad: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One message from each field's tensor (in layout order, read as bytes) and, with a
        flag, the 0-d ``bad``."""
        tensors = [parts[name] for name in self.spans] if isinstance(parts, Mapping) else list(parts)
        pieces = [t.reshape(-1).view(torch.uint8) for t in tensors]
        if self.flag:
            assert bad is not None, "a flagged message needs its flag"
            pieces.append(_flag_bytes(bad))
        return torch.cat(pieces)

    def set_flag(self, rows: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
        """Write the flag ``bad`` at the tail of ``rows`` (every row), in place."""
        rows[..., -FLAG_BYTES:] = _flag_bytes(bad)
        return rows

    @staticmethod
    def any_flag(rows: torch.Tensor) -> torch.Tensor:
        """0-d bool: does any row (gathered messages, or one summed row) carry a set flag?"""
        return is_set(bytes_as(rows[..., -FLAG_BYTES:], torch.float32))


def _flag_bytes(bad: torch.Tensor) -> torch.Tensor:
    """The :data:`FLAG_BYTES` bytes of the 0-d flag ``bad``, to end a byte message."""
    return as_flag(bad).view(torch.uint8)
