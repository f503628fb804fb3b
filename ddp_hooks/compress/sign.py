"""Blockwise scaled sign and bit packing (dist-EF-SGDM's compressor).

For each block b of a flat vector p: ``scale_b = ||p_b||_1 / d_b`` and ``C(p)_b = scale_b *
sgn(p_b)`` with ``sgn(0) = +1``. Signs are packed 8 per byte, least significant bit first:
bit ``i % 8`` of byte ``i // 8`` is 1 iff ``p[i] >= 0`` (padding bits are 1). Block sums are
accumulated in float64 and rounded once to float32, so the result does not depend on the
summation order (the fused CUDA kernels match this reference bit for bit).

A :class:`ShardPlan` splits a bucket into ``n`` equal, byte-aligned element ranges (shards) for
the sharded two-way exchange; the server compresses each block restricted to a shard (a block
that straddles two shards gets one scale per piece on the way back).
"""

from dataclasses import dataclass

import torch

_BIT_WEIGHTS = {}


def _weights(device: torch.device) -> torch.Tensor:
    w = _BIT_WEIGHTS.get(device)
    if w is None:
        w = _BIT_WEIGHTS[device] = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=device)
    return w


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack ``x >= 0`` of a 1-D tensor into ``ceil(len/8)`` bytes (LSB first, padding bits 1)."""
    n = x.numel()
    bits = torch.ones(-(-n // 8) * 8, dtype=torch.uint8, device=x.device)
    bits[:n] = x >= 0
    return (bits.view(-1, 8) * _weights(x.device)).sum(1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: the first ``n`` signs as +1 / -1 of ``dtype``.

    ``packed`` may carry leading batch dimensions: ``(..., nbytes)`` gives ``(..., n)``.
    """
    bits = (packed.unsqueeze(-1) & _weights(packed.device)) != 0
    signs = bits.flatten(-2)[..., :n]
    return torch.where(signs, 1.0, -1.0).to(dtype)


def block_sizes(numels: list[int], block_size: int | None = None) -> list[int]:
    """Blocks of a bucket: one per parameter tensor, or each tensor cut into ``block_size``."""
    if block_size is None:
        return [n for n in numels if n > 0]
    sizes = []
    for n in numels:
        full, rest = divmod(n, block_size)
        sizes += [block_size] * full + ([rest] if rest else [])
    return sizes


def segment_ids(sizes: list[int], device: torch.device) -> torch.Tensor:
    """Block index of every element (int64), for blocks of the given sizes."""
    counts = torch.tensor(sizes, dtype=torch.int64, device=device)
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)


def block_scales(x: torch.Tensor, ids: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """``||x_b||_1 / d_b`` per block (float32, accumulated in float64). ``sizes``: float64."""
    sums = torch.zeros(sizes.numel(), dtype=torch.float64, device=x.device)
    sums.index_add_(0, ids, x.abs().to(torch.float64))
    return (sums / sizes).to(torch.float32)


def scaled_sign(x: torch.Tensor, ids: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 1-D fp32 vector: (packed signs, per-block fp32 scales)."""
    return pack_signs(x), block_scales(x, ids, sizes)


def scaled_sign_decompress(packed: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``scale[block(i)] * sign(i)`` for every element (fp32)."""
    return unpack_signs(packed, ids.numel()) * scales[ids]


@dataclass
class ShardPlan:
    """Byte-aligned shards of a bucket and the block pieces inside each.

    Attributes (``n`` shards of ``shard`` elements, ``k`` = the most pieces in a shard):
        numel: elements in the bucket; ``n * shard >= numel``, the tail is padding.
        piece_block: ``(n, k)`` index of the block each piece belongs to (``nblocks`` = padding).
        piece_sizes: ``(n, k + 1)`` float64 element count of each piece (padding pieces 1).
        local: ``(n, shard)`` piece index of each element within its shard (``k`` = padding).
    """

    numel: int
    n: int
    shard: int
    k: int
    nblocks: int
    piece_block: torch.Tensor
    piece_sizes: torch.Tensor
    local: torch.Tensor

    @classmethod
    def build(cls, sizes: list[int], n: int, device: torch.device) -> "ShardPlan":
        numel = sum(sizes)
        shard = -(-(-(-numel // n)) // 8) * 8
        starts = [0]
        for s in sizes:
            starts.append(starts[-1] + s)
        pieces: list[list[tuple[int, int, int]]] = []  # per shard: (block, lo, hi)
        b = 0
        for j in range(n):
            lo_j, hi_j = j * shard, min((j + 1) * shard, numel)
            row = []
            while b < len(sizes) and starts[b + 1] <= lo_j:
                b += 1
            bb = b
            while bb < len(sizes) and starts[bb] < hi_j:
                row.append((bb, max(starts[bb], lo_j), min(starts[bb + 1], hi_j)))
                bb += 1
            pieces.append(row)
        k = max(1, max(len(r) for r in pieces))
        piece_block = torch.full((n, k), len(sizes), dtype=torch.int64)
        piece_sizes = torch.ones((n, k + 1), dtype=torch.float64)
        local = torch.full((n, shard), k, dtype=torch.int64)
        for j, row in enumerate(pieces):
            for q, (blk, lo, hi) in enumerate(row):
                piece_block[j, q] = blk
                piece_sizes[j, q] = hi - lo
                local[j, lo - j * shard : hi - j * shard] = q
        return cls(
            numel, n, shard, k, len(sizes),
            piece_block.to(device), piece_sizes.to(device), local.to(device),
        )

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (numel,) zero-padded and viewed as ``(n, shard)``."""
        out = x.new_zeros(self.n * self.shard)
        out[: self.numel] = x
        return out.view(self.n, self.shard)

    def piece_scales(self, block_scales_: torch.Tensor) -> torch.Tensor:
        """Scales of the blocks each shard touches, ``(n, k)`` (0 for padding pieces)."""
        ext = torch.cat([block_scales_, block_scales_.new_zeros(1)])
        return ext[self.piece_block]

    def expand(self, scales: torch.Tensor, shards: slice | None = None) -> torch.Tensor:
        """Per-element scale ``(m, shard)`` from per-piece scales ``(m, k)`` of shards ``shards``."""
        local = self.local if shards is None else self.local[shards]
        ext = torch.cat([scales, scales.new_zeros(scales.shape[0], 1)], dim=1)
        return torch.gather(ext, 1, local.expand(scales.shape[0], -1) if local.shape[0] == 1 else local)

    def compress_shards(self, x: torch.Tensor, shards: slice | None = None):
        """Blockwise scaled sign of padded shards ``x`` ``(m, shard)`` with the pieces as
        blocks: (packed ``(m, shard/8)``, scales ``(m, k)``, decompressed ``(m, shard)``)."""
        local = self.local if shards is None else self.local[shards]
        sizes = self.piece_sizes if shards is None else self.piece_sizes[shards]
        m = x.shape[0]
        offsets = (torch.arange(m, device=x.device) * (self.k + 1)).unsqueeze(1)
        sums = torch.zeros(m * (self.k + 1), dtype=torch.float64, device=x.device)
        sums.index_add_(0, (local + offsets).reshape(-1), x.abs().reshape(-1).to(torch.float64))
        scales = (sums.view(m, self.k + 1) / sizes).to(torch.float32)[:, : self.k]
        packed = pack_signs(x.reshape(-1)).view(m, self.shard // 8)
        values = unpack_signs(packed, self.shard) * self.expand(scales, shards)
        return packed, scales, values
