"""Low-rank (PowerSGD) compression math: which tensors to compress, grouped by shape.

A gradient tensor is viewed as the matrix ``(shape[0], numel / shape[0])``; it is compressed at
rank ``min(n, m, r)`` iff ``(n + m) * rank * min_compression_rate < n * m``, else sent exactly
(vectors and small matrices). Compressed tensors of equal matrix shape form one group, handled
with one batched matmul.
"""

from dataclasses import dataclass

import torch


def matrix_shape(shape: torch.Size) -> tuple[int, int]:
    n = shape[0] if len(shape) else 1
    return n, (int(torch.Size(shape).numel()) // n if n else 0)


def should_compress(n: int, m: int, rank: int, min_compression_rate: float) -> bool:
    return (n + m) * rank * min_compression_rate < n * m


@dataclass
class ShapeGroup:
    """Compressed tensors of one matrix shape: positions in the bucket, ``(n, m)``, rank, and
    their offsets in the bucket-wide P and Q buffers."""

    members: list[int]
    n: int
    m: int
    rank: int
    p_offset: int
    q_offset: int

    @property
    def size(self) -> int:
        return len(self.members)


@dataclass
class LowRankPlan:
    """How one bucket is split: exact tensors, and compressed tensors grouped by shape."""

    exact: list[int]
    groups: list[ShapeGroup]
    order: list[int]  # compressed tensors, group by group
    p_numel: int
    q_numel: int

    @classmethod
    def build(cls, shapes: list[torch.Size], rank: int, min_compression_rate: float) -> "LowRankPlan":
        exact: list[int] = []
        by_shape: dict[tuple[int, int, int], list[int]] = {}
        for i, shape in enumerate(shapes):
            n, m = matrix_shape(shape)
            r = min(n, m, rank)
            if len(shape) >= 2 and r > 0 and should_compress(n, m, r, min_compression_rate):
                by_shape.setdefault((n, m, r), []).append(i)
            else:
                exact.append(i)
        groups, order, p_off, q_off = [], [], 0, 0
        for (n, m, r), members in by_shape.items():
            groups.append(ShapeGroup(members, n, m, r, p_off, q_off))
            order += members
            p_off += len(members) * n * r
            q_off += len(members) * m * r
        return cls(exact, groups, order, p_off, q_off)

    def p_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[g.p_offset : g.p_offset + g.size * g.n * g.rank].view(g.size, g.n, g.rank) for g in self.groups]

    def q_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Q stored transposed, ``(size, rank, m)`` per group: ``Q^T = P^T M`` is a fast matmul."""
        return [flat[g.q_offset : g.q_offset + g.size * g.m * g.rank].view(g.size, g.rank, g.m) for g in self.groups]

    def m_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat buffer holding the compressed tensors in :attr:`order`."""
        out, off = [], 0
        for g in self.groups:
            out.append(flat[off : off + g.size * g.n * g.m].view(g.size, g.n, g.m))
            off += g.size * g.n * g.m
        return out
