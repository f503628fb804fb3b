"""dist-EF-SGDM's server topology: which rank serves which pieces of a bucket, and the bytes of
each message.

The server compresses *pieces*: the worker blocks cut every :data:`SERVER_PIECE` elements
from their start. Going through the model's parameters in order, a parameter of at least ``n``
pieces is split into ``n`` contiguous groups of nearly equal size (a piece belongs to the
``1/n`` of the parameter its middle lies in), group ``g`` served by rank ``(f + g) % n`` where
``f`` is the rank serving the fewest elements so far; each piece of a smaller parameter goes to
the rank serving the fewest elements so far. Ownership follows from the parameters alone, never
from how DDP groups them into buckets: when DDP rebuilds its buckets (after its first
iteration, and again after a restart) no server memory changes hands, and a bucket is balanced
to within about a piece per parameter.

A rank's *runs* in a bucket are its pieces merged where they touch. A worker packs the signs of
its whole bucket once; its message to owner ``j`` holds, run after run, the whole bytes that
hold each of ``j``'s runs (a run starts ``lo % 8`` bits into its first byte), one scale per
real piece and the non-finite flag. The owner works in these *row coordinates*: each run is
framed by padding pieces of scale 0 (the other owners' bits in the shared bytes), so the
server's padding stays 0 and its reply has the same byte layout. A worker ORs the replies'
bytes, masked to their owners' bits, back into the bucket's bit order and decodes the whole
bucket in one pass. Every message of a bucket has one fixed width, so every rank issues the
same collectives.
"""

from bisect import bisect_right
from dataclasses import dataclass

import torch

from ..compress.bits import packed_size
from ..compress.scaled_sign import Blocks, BlockSet, SignMessage, block_sizes, ranges

#: longest server block (elements); a multiple of 8, small enough for one CUDA block per piece
SERVER_PIECE = 4096


def server_pieces(worker_blocks: Blocks, piece: int = SERVER_PIECE) -> Blocks:
    """Worker blocks cut every ``piece`` elements from their start."""
    return [(lo, min(lo + piece, hi)) for b_lo, hi in worker_blocks for lo in range(b_lo, hi, piece)]


def param_pieces(numel: int, block_size: int | None, piece: int = SERVER_PIECE) -> Blocks:
    """A parameter's server pieces, relative to its start."""
    return server_pieces(ranges(block_sizes([numel], block_size)), piece)


def assign_owners(numels: list[int], block_size: int | None, n: int, piece: int = SERVER_PIECE) -> list[list[int]]:
    """The rank serving each server piece of each parameter of a model (``numels`` in model
    order; see the module docstring)."""
    load = [0] * n
    owners = []
    for numel in numels:
        cuts = param_pieces(numel, block_size, piece)
        mine: list[int] = []
        first = min(range(n), key=lambda r: (load[r], r))
        for a, b in cuts:
            if len(cuts) >= n:  # groups by where each piece's middle lies
                j = (first + ((a + b) * n) // (2 * numel)) % n
            else:  # a small parameter: each piece to the least loaded rank
                j = min(range(n), key=lambda r: (load[r], r))
            load[j] += b - a
            mine.append(j)
        owners.append(mine)
    return owners


@dataclass
class OwnerRow:
    """One owner's part of a bucket layout, in row coordinates (see the module docstring).

    ``segments``: (row position, bucket position, length) of each run, in elements; ``spans``:
    (row byte, first bucket byte, end bucket byte) of each run's bytes; ``pieces``: padding
    and real pieces covering the row; ``real``: the positions in ``pieces`` of the real ones;
    ``blocks``: the worker block of each real piece."""

    segments: list[tuple[int, int, int]]
    spans: list[tuple[int, int, int]]
    pieces: BlockSet
    real: torch.Tensor
    blocks: torch.Tensor

    @property
    def count(self) -> int:
        """Row length in elements (a multiple of 8)."""
        return 8 * sum(end - first for _, first, end in self.spans)


def _owner_row(runs: list[tuple[int, int]], pieces: Blocks, starts: list[int], device: torch.device) -> OwnerRow:
    segments, spans, row_pieces, real, blocks = [], [], [], [], []
    position, k = 0, 0
    for lo, hi in runs:
        first, end = lo // 8, packed_size(hi)
        start = 8 * position + lo % 8
        segments.append((start, lo, hi - lo))
        spans.append((position, first, end))
        if lo % 8:
            row_pieces.append((8 * position, start))
        while k < len(pieces) and pieces[k][1] <= hi:
            a, b = pieces[k]
            real.append(len(row_pieces))
            row_pieces.append((start + a - lo, start + b - lo))
            blocks.append(bisect_right(starts, a) - 1)
            k += 1
        position += end - first
        if 8 * position > start + hi - lo:
            row_pieces.append((start + hi - lo, 8 * position))
    return OwnerRow(
        segments,
        spans,
        BlockSet.of(row_pieces, device),
        torch.tensor(real, dtype=torch.int64).to(device),
        torch.tensor(blocks, dtype=torch.int64).to(device),
    )


def _edges(rows: list[OwnerRow], runs: list[Blocks], nbytes: int) -> tuple[list[int], list[int], list[int]]:
    """The bytes each run may share with another (its first and last): their positions in the
    replies ``(n, nbytes)`` flattened, their bucket bytes, and the bits of each that are the
    run's (bit ``i`` of a byte is element ``8 * byte + i``)."""
    where, target, bits = [], [], []
    for j, (row, mine) in enumerate(zip(rows, runs)):
        for (position, first, end), (lo, hi) in zip(row.spans, mine):
            head = (0xFF << (lo % 8)) & 0xFF
            tail = (1 << (hi - 8 * (end - 1))) - 1
            edges = [(position, first, head & tail)] if end - first == 1 else [(position, first, head)]
            if end - first > 1:
                edges.append((position + end - first - 1, end - 1, tail))
            for at, byte, mask in edges:
                where.append(j * nbytes + at)
                target.append(byte)
                bits.append(mask)
    return where, target, bits


@dataclass
class ShardPlan:
    """Worker blocks, server pieces and every owner's row of one bucket layout.

    ``pieces``: the server pieces of the whole bucket, in bucket order; ``rows[j]``: owner
    ``j``'s row; ``message``: the fixed width of every request and reply of this bucket;
    ``edge_*`` and ``piece_scale``: how the replies go back into the bucket's bit order and
    piece order."""

    numel: int
    blocks: BlockSet
    pieces: BlockSet
    rows: list[OwnerRow]
    message: SignMessage
    edge_index: torch.Tensor  # positions of the runs' first and last bytes in the flattened replies
    edge_bytes: torch.Tensor  # the bucket byte each of those goes to
    edge_masks: torch.Tensor  # the bits of it that are that run's
    piece_scale: torch.Tensor  # per bucket piece: its position in the flattened replies' scales

    @classmethod
    def build(
        cls,
        numels: list[int],
        owners: list[list[int]],
        block_size: int | None,
        n: int,
        device: torch.device,
        piece: int = SERVER_PIECE,
    ) -> "ShardPlan":
        """The plan of a bucket of parameters of ``numels`` whose pieces ``owners`` serve
        (:func:`assign_owners`)."""
        blocks = ranges(block_sizes(numels, block_size))
        starts = [lo for lo, _ in blocks]
        numel, offset = sum(numels), 0
        owned: list[list[tuple[int, int]]] = [[] for _ in range(n)]
        for size, mine in zip(numels, owners):
            for (a, b), j in zip(param_pieces(size, block_size, piece), mine):
                owned[j].append((offset + a, offset + b))
            offset += size
        runs = [_runs(p) for p in owned]
        rows = [_owner_row(r, p, starts, device) for r, p in zip(runs, owned)]
        k = max(1, max(r.real.numel() for r in rows))
        message = SignMessage(8 * max(1, max(r.count // 8 for r in rows)), k)
        where, target, bits = _edges(rows, runs, message.nbytes)
        everyone = sorted((a, b, j, i) for j, p in enumerate(owned) for i, (a, b) in enumerate(p))
        return cls(
            numel=numel,
            blocks=BlockSet.of(blocks, device),
            pieces=BlockSet.of([(a, b) for a, b, _, _ in everyone], device),
            rows=rows,
            message=message,
            edge_index=torch.tensor(where, dtype=torch.int64).to(device),
            edge_bytes=torch.tensor(target, dtype=torch.int64).to(device),
            edge_masks=torch.tensor(bits, dtype=torch.uint8).to(device),
            piece_scale=torch.tensor([j * k + i for _, _, j, i in everyone], dtype=torch.int64).to(device),
        )

    @property
    def n(self) -> int:
        return len(self.rows)

    def requests(self, packed: torch.Tensor, block_scales: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
        """A worker's request to every owner, ``(n, message.nbytes)``: the bytes of its runs
        from the whole bucket's ``packed`` signs, each real piece's worker block scale, the flag."""
        layout = self.message.layout
        rows = torch.zeros(self.n, layout.nbytes, dtype=torch.uint8, device=packed.device)
        scales = torch.zeros(self.n, self.message.nscales, device=packed.device)
        for j, row in enumerate(self.rows):
            for position, first, end in row.spans:
                rows[j, position : position + end - first] = packed[first:end]
            scales[j, : row.blocks.numel()] = block_scales[row.blocks]
        layout.field(rows, "scales").copy_(scales.view(torch.uint8))
        return layout.set_flag(rows, bad)

    def row_scales(self, j: int, real_scales: torch.Tensor) -> torch.Tensor:
        """Owner ``j``'s real-piece scales ``(..., k)`` spread over its row pieces (padding 0)."""
        row = self.rows[j]
        out = real_scales.new_zeros((*real_scales.shape[:-1], len(row.pieces.blocks)))
        out[..., row.real] = real_scales[..., : row.real.numel()]
        return out

    def gather_replies(self, replies: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """The whole bucket's packed signs from every owner's reply (into ``packed``): the
        inner bytes of each run copied, the bytes a run may share with another ORed in masked."""
        packed.zero_()
        for j, row in enumerate(self.rows):
            for position, first, end in row.spans:
                if end - first > 2:
                    packed[first + 1 : end - 1] = replies[j, position + 1 : position + end - first - 1]
        edges = replies.contiguous().view(-1)[self.edge_index] & self.edge_masks
        return packed.index_add_(0, self.edge_bytes, edges)

    def reply_piece_scales(self, replies: torch.Tensor) -> torch.Tensor:
        """Every bucket piece's server scale, in bucket order."""
        return self.message.scales(replies).reshape(-1)[self.piece_scale]


def _runs(pieces: Blocks) -> Blocks:
    """Pieces merged where they touch."""
    runs: Blocks = []
    for a, b in pieces:
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((a, b))
    return runs


class Workspace:
    """fp32 buffers of one bucket layout, so that no bucket-sized tensor is allocated per step:
    the worker's message, candidate momentum and error, the decoded server message of a 16-bit
    bucket, the server's row (mean, error, rho, residual) and the gathered reply signs; and
    ``owned``, this rank's server elements of each parameter (its server memory's sizes)."""

    def __init__(self, plan: ShardPlan, dtype: torch.dtype, owned: list[int]) -> None:
        from ..compress.sign_worker import WorkerBuffers

        device = plan.pieces.offsets.device
        numel, row = plan.numel, max(plan.message.count, plan.numel)
        self.worker = WorkerBuffers(
            torch.empty(numel, device=device), torch.empty(numel, device=device), torch.empty(numel, device=device)
        )
        self.out = torch.empty(numel, device=device) if dtype != torch.float32 else torch.empty(0)
        self.mean = torch.empty(row, device=device)
        self.error = torch.zeros(row, device=device)
        self.rho = torch.zeros(row, device=device)
        self.server = torch.empty(row, device=device)
        self.packed = torch.zeros(packed_size(numel), dtype=torch.uint8, device=device)
        self.owned = owned
