"""dist-EF-SGDM's server topology: which rank serves which part of a bucket, with which blocks.

The server compresses *pieces*: the worker blocks cut every :data:`SERVER_PIECE` elements
from their start. Pieces follow from the parameters alone, never from how DDP groups them into
buckets, so the server's result does not change when DDP rebuilds its buckets (after its
first iteration, and again after a restart): a resumed run is bit-exact.

A bucket's pieces, in order, are cut into ``n`` contiguous shards of nearly equal length (at
piece boundaries); rank ``j`` serves shard ``j``. A worker packs the signs of its whole bucket
once; its message to the owner of shard ``j`` is the bytes that hold shard ``j``'s signs (the
shard starts ``off_j = start_j % 8`` bits into its first byte), one scale per piece, and the
non-finite flag. The owner decodes those rows in *row coordinates*: a leading piece
``[0, off_j)`` of scale 0, then the shard's pieces shifted by ``off_j``. Every message has a
fixed width per bucket, so every rank issues the same collectives.
"""

from bisect import bisect_left
from dataclasses import dataclass

import torch

from ..compress.bits import packed_size
from ..compress.scaled_sign import Blocks, BlockSet, SignMessage, block_sizes, ranges

#: longest server block (elements); a multiple of 8, small enough for one CUDA block per piece
SERVER_PIECE = 4096


def server_pieces(worker_blocks: Blocks, piece: int = SERVER_PIECE) -> Blocks:
    """Worker blocks cut every ``piece`` elements from their start."""
    return [(lo, min(lo + piece, hi)) for b_lo, hi in worker_blocks for lo in range(b_lo, hi, piece)]


@dataclass
class ShardPlan:
    """Worker blocks, server pieces and shards of one bucket layout (see the module docstring).

    ``bounds[j]:bounds[j+1]`` is shard ``j``; ``pieces[j]`` its pieces relative to its start;
    ``row_pieces[j]`` the same in row coordinates, after the leading ``[0, off_j)``;
    ``piece_block[j]`` the worker block of each row piece (``nblocks`` for padding: scale 0).
    """

    numel: int
    blocks: BlockSet
    bounds: list[int]
    pieces: list[BlockSet]
    row_pieces: list[BlockSet]
    piece_block: torch.Tensor
    message: SignMessage  # a worker's row for one shard
    reply: SignMessage  # a server's reply for its shard

    @classmethod
    def build(
        cls, numels: list[int], block_size: int | None, n: int, device: torch.device, piece: int = SERVER_PIECE
    ) -> "ShardPlan":
        blocks = ranges(block_sizes(numels, block_size))
        numel = blocks[-1][1] if blocks else 0
        cuts = server_pieces(blocks, piece)
        bounds = _shard_bounds(cuts, numel, n)
        starts = [lo for lo, _ in blocks]
        pieces, rows, table = [], [], []
        for j in range(n):
            lo, hi = bounds[j], bounds[j + 1]
            mine = [(a - lo, b - lo) for a, b in cuts if lo <= a < hi]
            off = lo % 8
            lead = [(0, off)] if off and mine else []
            pieces.append(BlockSet.of(mine, device))
            rows.append(BlockSet.of(lead + [(a + off, b + off) for a, b in mine], device))
            table.append([len(blocks)] * len(lead) + [bisect_left(starts, a + lo + 1) - 1 for a, _ in mine])
        k = max(1, max(len(t) for t in table))
        piece_block = torch.full((n, k), len(blocks), dtype=torch.int64)
        for j, row in enumerate(table):
            piece_block[j, : len(row)] = torch.tensor(row, dtype=torch.int64)
        spans = [packed_size(bounds[j + 1]) - bounds[j] // 8 for j in range(n)]
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        return cls(
            numel=numel,
            blocks=BlockSet.of(blocks, device),
            bounds=bounds,
            pieces=pieces,
            row_pieces=rows,
            piece_block=piece_block.to(device),
            message=SignMessage(8 * max(spans), k),
            reply=SignMessage(longest, k),
        )

    @property
    def n(self) -> int:
        return len(self.pieces)

    def shard(self, j: int) -> slice:
        return slice(self.bounds[j], self.bounds[j + 1])

    def signs_of(self, j: int, packed: torch.Tensor) -> torch.Tensor:
        """The bytes of the whole bucket's ``packed`` signs that hold shard ``j``'s."""
        return packed[self.bounds[j] // 8 : packed_size(self.bounds[j + 1])]

    def offset(self, j: int) -> int:
        """Where shard ``j`` starts in its row, in elements."""
        return self.bounds[j] % 8 if self.pieces[j].blocks else 0

    def piece_scales(self, block_scales: torch.Tensor) -> torch.Tensor:
        """The worker block scale of every row piece of every shard, ``(n, k)`` (0: padding)."""
        return torch.cat([block_scales, block_scales.new_zeros(1)])[self.piece_block]


def _shard_bounds(cuts: Blocks, numel: int, n: int) -> list[int]:
    """``n + 1`` shard bounds at piece boundaries, each near ``j * numel / n``."""
    edges = [lo for lo, _ in cuts] + [numel]
    bounds = [0] + [_nearest(edges, round(j * numel / n)) for j in range(1, n)] + [numel]
    for j in range(1, n + 1):  # keep the cuts in order
        bounds[j] = max(bounds[j], bounds[j - 1])
    return bounds


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
    the worker's message, candidate momentum and error, the decoded server message of a 16-bit
    bucket, the mean of the workers' messages, and the server's candidate error."""

    def __init__(self, plan: ShardPlan, dtype: torch.dtype) -> None:
        from ..compress.error_feedback import WorkerBuffers

        device = plan.piece_block.device
        numel = plan.numel
        self.worker = WorkerBuffers(
            torch.empty(numel, device=device), torch.empty(numel, device=device), torch.empty(numel, device=device)
        )
        self.out = torch.empty(numel, device=device) if dtype != torch.float32 else torch.empty(0)
        self.mean = torch.empty(max(numel, plan.message.count), device=device)
        self.server = torch.empty(plan.reply.count, device=device)
