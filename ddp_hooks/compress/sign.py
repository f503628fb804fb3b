"""Blockwise scaled sign and bit packing (dist-EF-SGDM's compressor).

For each block b of a flat vector p: ``scale_b = ||p_b||_1 / d_b`` and ``C(p)_b = scale_b *
sgn(p_b)`` with ``sgn(0) = +1``. Signs are packed 8 per byte, least significant bit first:
bit ``i % 8`` of byte ``i // 8`` is 1 iff ``p[i] >= 0`` (padding bits are 1). Block sums are
accumulated in float64 and rounded once to float32, so the result does not depend on the
summation order; the fused CUDA kernels are tested for bit equality with this reference.

Blocks are contiguous ranges ``(lo, hi)``: one per parameter tensor, or each tensor cut into
``block_size`` pieces. A :class:`ShardPlan` splits a bucket into ``n`` equal, byte-aligned
element ranges (shards) for the sharded two-way exchange; the server compresses each block
restricted to a shard (a block that straddles two shards gets one scale per piece).

On CPU, fp32 inputs go through the fused loops of :mod:`ddp_hooks.native` when they are
available (same results; ``DDP_HOOKS_NO_NATIVE=1`` keeps the torch operations below).
"""

from dataclasses import dataclass

import torch

from .. import native

# Multiplying 8 bytes that are 0 or 1 (one int64 word, byte i = bit i) by this constant
# gathers byte i's low bit into bit 56 + i, with no carries between them.
_GATHER = 0x0102040810204080
# Spreading a byte into 8 bytes (x * 0x0101010101010101), then keeping bit i in byte i.
_SPREAD = 0x0101010101010101
_SELECT = 0x8040201008040201 - (1 << 64)  # as a signed int64


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack ``x >= 0`` of a 1-D tensor into ``ceil(len/8)`` bytes (LSB first, padding bits 1)."""
    if x.dtype == torch.float32 and native.usable(x):
        return native.pack_signs(x)
    n = x.numel()
    bits = torch.ones(-(-n // 8) * 8, dtype=torch.bool, device=x.device)
    torch.ge(x, 0, out=bits[:n])
    return _gather_bytes(bits)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D bool tensor into ``ceil(len/8)`` bytes (LSB first, padding bits 1)."""
    n = bits.numel()
    padded = torch.ones(-(-n // 8) * 8, dtype=torch.bool, device=bits.device)
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


def block_sizes(numels: list[int], block_size: int | None = None) -> list[int]:
    """Blocks of a bucket: one per parameter tensor, or each tensor cut into ``block_size``."""
    if block_size is None:
        return [n for n in numels if n > 0]
    sizes = []
    for n in numels:
        full, rest = divmod(n, block_size)
        sizes += [block_size] * full + ([rest] if rest else [])
    return sizes


def ranges(sizes: list[int], start: int = 0) -> list[tuple[int, int]]:
    """Consecutive ``(lo, hi)`` ranges of the given sizes."""
    out = []
    for s in sizes:
        out.append((start, start + s))
        start += s
    return out


def block_scales(x: torch.Tensor, blocks: list[tuple[int, int]], work: torch.Tensor | None = None) -> torch.Tensor:
    """``||x_b||_1 / d_b`` per block (float32, accumulated in float64). ``work``: an optional
    buffer of ``x``'s size for ``|x|``, so that nothing bucket-sized is allocated."""
    if x.dtype == torch.float32 and native.usable(x):
        return native.block_scales(x, native.bounds_of(blocks))
    magnitude = torch.abs(x, out=work) if work is not None else x.abs()
    sums = torch.stack([magnitude[lo:hi].sum(dtype=torch.float64) for lo, hi in blocks])
    sizes = torch.tensor([hi - lo for lo, hi in blocks], dtype=torch.float64, device=x.device)
    return (sums / sizes).to(torch.float32)


def expand(bits: torch.Tensor, scales: torch.Tensor, blocks: list[tuple[int, int]], out: torch.Tensor) -> torch.Tensor:
    """``out[i] = +scale or -scale`` of ``i``'s block, by the sign bit ``bits[i]`` (exactly:
    ``bit * 2s - s``). ``blocks`` must cover ``out`` from its start, in order."""
    if out.device.type == "cpu":
        out[: blocks[-1][1]].copy_(bits[: blocks[-1][1]])  # 0 / 1
        for (lo, hi), s in zip(blocks, scales.tolist()):  # reading CPU scales costs nothing
            out[lo:hi].mul_(2 * s).sub_(s)
        return out
    counts = torch.tensor([hi - lo for lo, hi in blocks], device=out.device)
    n = blocks[-1][1]
    per = torch.repeat_interleave(scales, counts, output_size=n)  # no host synchronization
    torch.where(bits[:n], per, -per, out=out[:n])
    return out


def decode(
    packed: torch.Tensor, scales: torch.Tensor, blocks: list[tuple[int, int]], out: torch.Tensor,
    accumulate: bool = False, work: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[i] = +-scale`` of ``i``'s block by sign bit ``i`` of ``packed`` for ``i`` in the
    blocks (contiguous, in order, from 0). ``accumulate``: ``out[i] +=`` instead, with ``work``
    (``out``'s size) as scratch for the torch path."""
    if out.dtype == torch.float32 and native.usable(packed, scales, out):
        return native.sign_decode(packed, native.bounds_of(blocks), scales, out, accumulate)
    if not accumulate:
        return expand(unpack_bits(packed, blocks[-1][1]), scales, blocks, out)
    n = blocks[-1][1]
    part = expand(unpack_bits(packed, n), scales, blocks, work if work is not None else torch.empty_like(out))
    out[:n].add_(part[:n])
    return out


def compress(x: torch.Tensor, blocks: list[tuple[int, int]], residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise scaled sign of ``x``: returns (all of ``x``'s packed signs, fp32 scales of the
    blocks) and writes the compression error ``x - C(x)`` into ``residual`` within the blocks
    (contiguous, in order, from 0; elements of ``x`` past the last block are only packed)."""
    if x.dtype == torch.float32 and native.usable(x, residual):
        bounds = native.bounds_of(blocks)
        scales = native.block_scales(x, bounds)
        return native.pack_residual(x, bounds, scales, residual), scales
    n = blocks[-1][1]
    packed = pack_signs(x)
    scales = block_scales(x[:n], blocks, residual[:n])
    expand(unpack_bits(packed, n), scales, blocks, residual)
    torch.sub(x[:n], residual[:n], out=residual[:n])
    return packed, scales


def scaled_sign_decompress(
    packed: torch.Tensor, scales: torch.Tensor, blocks: list[tuple[int, int]], out: torch.Tensor | None = None
) -> torch.Tensor:
    """``scale[block(i)] * sign(i)`` for every element (fp32)."""
    n = blocks[-1][1] if blocks else 0
    out = torch.empty(n, dtype=torch.float32, device=packed.device) if out is None else out
    return decode(packed, scales, blocks, out) if blocks else out


@dataclass
class ShardPlan:
    """Byte-aligned shards of a bucket and the block pieces inside each.

    ``n`` shards of ``shard`` elements (``n * shard >= numel``, the tail is padding);
    ``pieces[j]`` lists shard ``j``'s pieces as ``(block, lo, hi)`` with ``lo, hi`` relative
    to the shard's start; ``k`` is the most pieces in a shard.
    """

    numel: int
    n: int
    shard: int
    k: int
    nblocks: int
    pieces: list[list[tuple[int, int, int]]]
    piece_block: torch.Tensor  # (n, k) block of each piece (nblocks = padding)

    @classmethod
    def build(cls, sizes: list[int], n: int, device: torch.device) -> "ShardPlan":
        numel = sum(sizes)
        per_rank = -(-numel // n)  # ceil(numel / n)
        shard = -(-per_rank // 8) * 8  # rounded up to whole bytes of signs
        starts = [lo for lo, _ in ranges(sizes)] + [numel]
        pieces: list[list[tuple[int, int, int]]] = []
        b = 0
        for j in range(n):
            lo_j, hi_j = j * shard, min((j + 1) * shard, numel)
            while b < len(sizes) and starts[b + 1] <= lo_j:
                b += 1
            row, bb = [], b
            while bb < len(sizes) and starts[bb] < hi_j:
                row.append((bb, max(starts[bb], lo_j) - lo_j, min(starts[bb + 1], hi_j) - lo_j))
                bb += 1
            pieces.append(row)
        k = max(1, max(len(r) for r in pieces))
        piece_block = torch.full((n, k), len(sizes), dtype=torch.int64)
        for j, row in enumerate(pieces):
            for q, (blk, _, _) in enumerate(row):
                piece_block[j, q] = blk
        return cls(numel, n, shard, k, len(sizes), pieces, piece_block.to(device))

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (numel,) zero-padded and viewed as ``(n, shard)``."""
        out = x.new_zeros(self.n * self.shard)
        out[: self.numel] = x
        return out.view(self.n, self.shard)

    def piece_scales(self, block_scales_: torch.Tensor) -> torch.Tensor:
        """Scales of the blocks each shard touches, ``(n, k)`` (0 for padding pieces)."""
        ext = torch.cat([block_scales_, block_scales_.new_zeros(1)])
        return ext[self.piece_block]

    def decode(self, j: int, packed: torch.Tensor, scales: torch.Tensor, out: torch.Tensor,
               accumulate: bool = False, work: torch.Tensor | None = None) -> torch.Tensor:
        """Shard ``j``'s message (packed signs, per-piece scales ``(k,)``) into ``out`` ``(shard,)``,
        whose padding tail becomes zero; ``accumulate``: added to ``out`` (``work``: scratch of
        ``out``'s size for the torch path)."""
        blocks = [(lo, hi) for _, lo, hi in self.pieces[j]]
        if accumulate:
            return decode(packed, scales, blocks, out, True, work) if blocks else out
        if not blocks:
            return out.zero_()
        out[blocks[-1][1] :].zero_()
        return decode(packed, scales, blocks, out)

    def compress(self, j: int, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Blockwise scaled sign of shard ``j`` (``x``: ``(shard,)``) with its pieces as blocks:
        (packed ``(shard/8,)``, scales ``(k,)`` zero-padded); ``residual[:valid] = x - C(x)``
        for the shard's ``valid`` elements."""
        blocks = [(lo, hi) for _, lo, hi in self.pieces[j]]
        if not blocks:
            return pack_signs(x), x.new_zeros(self.k)
        packed, scales = compress(x, blocks, residual)
        return packed, torch.cat([scales, scales.new_zeros(self.k - len(blocks))])
