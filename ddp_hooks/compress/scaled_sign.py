"""Blockwise scaled sign (dist-EF-SGDM's compressor) and its message layout.

For each block b of a flat vector p: ``scale_b = ||p_b||_1 / d_b`` and ``C(p)_b = scale_b *
sgn(p_b)`` with ``sgn(0) = +1``. Signs travel packed (:mod:`.bits`). Block sums are
accumulated in float64 and rounded once to float32, so the result does not depend on the
summation order; the fused loops and kernels are checked against these references.

Blocks are contiguous ranges ``(lo, hi)`` covering a vector from its start, in order: one per
parameter tensor, or each tensor cut into ``block_size`` pieces (:func:`block_sizes`).
Dispatch (:mod:`.dispatch`): CUDA tensors run the fused kernels of :mod:`ddp_hooks._ext.cuda`
when they are loaded and checked; CPU fp32 tensors the fused loops of :mod:`ddp_hooks._ext.cpu`;
anything else the torch references (:mod:`.reference`).
"""

from dataclasses import dataclass
from functools import cached_property

import torch

from .._ext import cpu, cuda
from ..core.flags import may_read_host
from . import dispatch, reference
from .bits import ByteLayout, pack_signs, packed_size, unpack_bits
from .error_feedback import compensate

Blocks = list[tuple[int, int]]


def block_sizes(numels: list[int], block_size: int | None = None) -> list[int]:
    """Blocks of a vector of tensors: one per tensor, or each tensor cut into ``block_size``."""
    if block_size is None:
        return [n for n in numels if n > 0]
    sizes = []
    for n in numels:
        full, rest = divmod(n, block_size)
        sizes += [block_size] * full + ([rest] if rest else [])
    return sizes


def ranges(sizes: list[int], start: int = 0) -> Blocks:
    """Consecutive ``(lo, hi)`` ranges of the given sizes."""
    out = []
    for s in sizes:
        out.append((start, start + s))
        start += s
    return out


@dataclass(frozen=True)
class BlockSet:
    """Blocks covering ``[0, n]`` from 0, as host ranges and as the kernels' device offsets
    (built once per layout, so no host-to-device copy happens per step)."""

    blocks: tuple[tuple[int, int], ...]
    offsets: torch.Tensor  # int64 [lo_0, hi_0, hi_1, ...] on the vectors' device
    longest: int

    @classmethod
    def of(cls, blocks: Blocks, device: torch.device) -> "BlockSet":
        longest = max((hi - lo for lo, hi in blocks), default=0)
        offsets = torch.tensor(reference.bounds(blocks), dtype=torch.int64).to(device, non_blocking=True)  # no sync
        return cls(tuple(blocks), offsets, longest)


def block_scales(x: torch.Tensor, blocks: Blocks) -> torch.Tensor:
    """``||x_b||_1 / d_b`` per block (float32, accumulated in float64)."""
    if x.dtype == torch.float32 and dispatch.usable("block_scales", x):
        return cpu.block_scales(x, cpu.bounds_of(blocks))
    return reference.block_scales(x, blocks)


def expand(bits: torch.Tensor, scales: torch.Tensor, blocks: Blocks, out: torch.Tensor) -> torch.Tensor:
    """``out[i] = +scale or -scale`` of ``i``'s block, by the sign bit ``bits[i]`` (exactly:
    ``bit * 2s - s``)."""
    n = blocks[-1][1]
    if may_read_host(out.device):
        out[:n].copy_(bits[:n])  # 0 / 1
        for (lo, hi), s in zip(blocks, scales.tolist()):  # reading CPU scales costs nothing
            out[lo:hi].mul_(2 * s).sub_(s)
        return out
    return reference.expand(bits, scales, blocks, out)


def sign_residual(x: torch.Tensor, blocks: Blocks, scales: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Packed signs of all of ``x``, and ``residual = x - C(x)`` within the blocks, for the
    given ``scales`` (one pass on CPU). Returns the packed signs."""
    if x.dtype == torch.float32 and dispatch.usable("pack_residual", x, residual, scales):
        return cpu.pack_residual(x, cpu.bounds_of(blocks), scales, residual)
    n = blocks[-1][1]
    packed = pack_signs(x)
    expand(unpack_bits(packed, n), scales, blocks, residual)
    torch.sub(x[:n], residual[:n], out=residual[:n])
    return packed


def compress(x: torch.Tensor, blocks: Blocks, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise scaled sign of ``x``: (packed signs, fp32 block scales); writes the
    compression error ``x - C(x)`` into ``residual`` within the blocks."""
    scales = block_scales(x, blocks)
    return sign_residual(x, blocks, scales, residual), scales


def compress_ef(
    x: torch.Tensor, error: torch.Tensor, rho: float | torch.Tensor, blocks: BlockSet, residual: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Error-compensated: the scaled sign of ``v = x + rho * error`` (blocks covering ``x``;
    ``rho`` a float or per element), with ``residual = v - C(v)``. One kernel on CUDA; else
    ``x`` becomes ``v`` first."""
    if not isinstance(rho, torch.Tensor) and dispatch.usable("sign_compress_ef", x, error, residual):
        return cuda.sign_compress_ef(x, error, rho, blocks.offsets, residual, blocks.longest)
    return compress(compensate(x, error, rho), list(blocks.blocks), residual)


def decode(
    packed: torch.Tensor, scales: torch.Tensor, blocks: Blocks, out: torch.Tensor, accumulate: bool = False
) -> torch.Tensor:
    """``C(x)`` from its packed signs and scales into ``out`` (``accumulate``: added to it)."""
    if out.dtype == torch.float32 and dispatch.usable("sign_decode", packed, scales, out):
        return cpu.sign_decode(packed, cpu.bounds_of(blocks), scales, out, accumulate)
    n = blocks[-1][1]
    if not accumulate:
        return expand(unpack_bits(packed, n), scales, blocks, out)
    out[:n].add_(expand(unpack_bits(packed, n), scales, blocks, torch.empty(n, device=out.device)))
    return out


def average(signs: torch.Tensor, scales: torch.Tensor, blocks: BlockSet, out: torch.Tensor) -> torch.Tensor:
    """``out`` = the mean of the ``n`` messages ``(signs[i], scales[i])`` (``(n, bytes)`` and
    ``(n, >= blocks)``), added in row order, then divided by ``n``: the same floats on every
    rank. One kernel on CUDA."""
    if dispatch.usable("unpack_average", signs, scales, out):
        return cuda.unpack_average(signs.contiguous(), scales.contiguous(), blocks.offsets, out)
    listed = list(blocks.blocks)
    decode(signs[0], scales[0], listed, out)
    for i in range(1, signs.shape[0]):
        decode(signs[i], scales[i], listed, out, accumulate=True)
    return out.div_(signs.shape[0])


@dataclass(frozen=True)
class SignMessage:
    """One message of ``count`` packed signs and ``nscales`` fp32 scales, plus the non-finite
    flag: ``[signs | scales | flag]`` as one uint8 row (a :class:`~.bits.ByteLayout`)."""

    count: int
    nscales: int

    @cached_property
    def layout(self) -> ByteLayout:
        return ByteLayout({"signs": packed_size(self.count), "scales": 4 * self.nscales}, flag=True)

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def pack(self, packed: torch.Tensor, scales: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
        """One row from packed signs (at most ``count`` signs' bytes, padded with 1 bits),
        ``scales`` (at most ``nscales``, zero-padded) and the 0-d flag ``bad``."""
        row = torch.zeros(self.nbytes, dtype=torch.uint8, device=packed.device)
        signs = self.layout.field(row, "signs").fill_(255)
        signs[: packed.numel()].copy_(packed)
        self.layout.field(row, "scales")[: 4 * scales.numel()].copy_(scales.contiguous().view(torch.uint8))
        return self.layout.set_flag(row, bad)

    def signs(self, rows: torch.Tensor) -> torch.Tensor:
        return self.layout.field(rows, "signs")

    def scales(self, rows: torch.Tensor) -> torch.Tensor:
        return self.layout.field(rows, "scales", torch.float32)

    def any_bad(self, rows: torch.Tensor) -> torch.Tensor:
        """0-d bool: does any row carry the non-finite flag?"""
        return self.layout.any_flag(rows)
