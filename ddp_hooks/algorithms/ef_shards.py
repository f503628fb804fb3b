"""dist-EF-SGDM's server topology: which rank serves which part of a bucket, with which blocks.

The server compresses *pieces*: the worker blocks cut every :data:`SERVER_PIECE` elements
from their start. Pieces follow from the parameters alone, never from how DDP groups them into
buckets, so the server's result does not change when DDP rebuilds its buckets (after its
first iteration, and again after a restart): a resumed run is bit-exact.

A bucket's pieces, in order, are cut into ``n`` contiguous shards of nearly equal length (at
piece boundaries); rank ``j`` serves shard ``j``. Messages have a fixed width per bucket
(the longest shard, padded to whole bytes of signs), so every rank issues the same
collectives. Each shard's message carries its own packed signs and one scale per piece.
"""

from bisect import bisect_left
from dataclasses import dataclass

import torch

from ..compress.scaled_sign import Blocks, SignMessage, block_sizes, ranges

#: longest server block (elements); a multiple of 8, small enough for one CUDA block per piece
SERVER_PIECE = 4096


def server_pieces(worker_blocks: Blocks, piece: int = SERVER_PIECE) -> Blocks:
    """Worker blocks cut every ``piece`` elements from their start."""
    return [(lo, min(lo + piece, hi)) for b_lo, hi in worker_blocks for lo in range(b_lo, hi, piece)]


@dataclass
class ShardPlan:
    """Worker blocks, server pieces and shards of one bucket layout.

    ``bounds[j]:bounds[j+1]`` is shard ``j``; ``pieces[j]`` its server pieces relative to its
    start; ``piece_block[j]`` the worker block of each of them (``nblocks`` for padding).
    """

    numel: int
    blocks: Blocks
    bounds: list[int]
    width: int
    k: int
    pieces: list[Blocks]
    piece_block: torch.Tensor
    message: SignMessage

    @classmethod
    def build(
        cls, numels: list[int], block_size: int | None, n: int, device: torch.device, piece: int = SERVER_PIECE
    ) -> "ShardPlan":
        blocks = ranges(block_sizes(numels, block_size))
        numel = blocks[-1][1] if blocks else 0
        cuts = server_pieces(blocks, piece)
        edges = [lo for lo, _ in cuts] + [numel]
        bounds = [0] + [_nearest(edges, round(j * numel / n)) for j in range(1, n)] + [numel]
        for j in range(1, n + 1):  # keep the cuts in order
            bounds[j] = max(bounds[j], bounds[j - 1])
        pieces, piece_block = [], []
        starts = [lo for lo, _ in blocks]
        for j in range(n):
            lo, hi = bounds[j], bounds[j + 1]
            mine = [(a - lo, b - lo) for a, b in cuts if lo <= a < hi]
            pieces.append(mine)
            piece_block.append([bisect_left(starts, a + lo + 1) - 1 for a, _ in mine])
        width = max(8, -(-max(b - a for a, b in zip(bounds, bounds[1:])) // 8) * 8)
        k = max(1, max(len(p) for p in pieces))
        table = torch.full((n, k), len(blocks), dtype=torch.int64)
        for j, row in enumerate(piece_block):
            table[j, : len(row)] = torch.tensor(row, dtype=torch.int64)
        return cls(numel, blocks, bounds, width, k, pieces, table.to(device), SignMessage(width, k))

    @property
    def n(self) -> int:
        return len(self.pieces)

    def shard(self, j: int) -> slice:
        return slice(self.bounds[j], self.bounds[j + 1])

    def piece_scales(self, block_scales: torch.Tensor) -> torch.Tensor:
        """The worker block scale of every piece of every shard, ``(n, k)`` (0 for padding)."""
        return torch.cat([block_scales, block_scales.new_zeros(1)])[self.piece_block]


def _nearest(edges: list[int], target: int) -> int:
    """The element of the sorted ``edges`` nearest to ``target``."""
    i = bisect_left(edges, target)
    if i == 0:
        return edges[0]
    if i == len(edges):
        return edges[-1]
    return edges[i] if edges[i] - target < target - edges[i - 1] else edges[i - 1]


class Workspace:
    """fp32 buffers of one bucket layout, so that no bucket-sized tensor is allocated per step:
    the worker message ``p``, the candidate momentum and error, the decoded server message of a
    16-bit bucket, and per-shard scratch for the server step."""

    def __init__(self, plan: ShardPlan, dtype: torch.dtype) -> None:
        device = plan.piece_block.device
        self.p = torch.empty(plan.numel, device=device)
        self.momentum = torch.empty(plan.numel, device=device)
        self.local = torch.empty(plan.numel, device=device)
        self.out = torch.empty(plan.numel, device=device) if dtype != torch.float32 else torch.empty(0)
        self.mean = torch.empty(plan.width, device=device)
        self.server = torch.empty(plan.width, device=device)
