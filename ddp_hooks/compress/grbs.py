"""GRBS, the globally random block sparsifier (CSER's compressor).

A flat vector of ``numel`` elements is cut into blocks of ``block_size`` consecutive elements
(the last one may be shorter); ``ceil(nblocks / ratio)`` blocks are drawn uniformly without
replacement from a generator that every rank seeds and advances identically, so every rank
selects the same blocks and the selected values are summable: the payload is a plain
contiguous buffer, no indices travel. ``E ||C(v) - v||^2 = (1 - 1/ratio) ||v||^2`` for full blocks.

The selection is host-side: drawn on the CPU (int64 CPU tensors) whatever the device of the
vectors, so its index math (:func:`block_elements`, :func:`cuts`) reads no device memory; only
the final positions are copied to the device, without waiting.
"""

import math

import torch


def selected_blocks(nblocks: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices (int64, CPU) of ``ceil(nblocks / ratio)`` blocks drawn without replacement."""
    k = min(nblocks, max(1, math.ceil(nblocks / ratio)))
    if k == nblocks:
        return torch.arange(nblocks)
    return torch.randperm(nblocks, generator=generator)[:k].sort().values


def block_elements(blocks: torch.Tensor, block_size: int, numel: int) -> torch.Tensor:
    """Element indices (int64, CPU, sorted) covered by ``blocks``."""
    idx = ((blocks * block_size).unsqueeze(1) + torch.arange(block_size)).reshape(-1)
    return idx[idx < numel]


def select(numel: int, block_size: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Element indices of one GRBS draw over a flat vector of ``numel`` elements."""
    nblocks = -(-numel // block_size)
    return block_elements(selected_blocks(nblocks, ratio, generator), block_size, numel)


def cuts(idx: torch.Tensor, bounds: list[int]) -> list[int]:
    """Positions in the sorted selection ``idx`` where each of ``bounds`` falls, as host ints
    (``idx`` is a CPU tensor on any device, so this reads no device memory)."""
    return torch.searchsorted(idx, torch.tensor(bounds)).tolist()


def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The selected values of a flat tensor, as one contiguous payload."""
    return x.index_select(0, idx)


def scatter(x: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Write a payload back at the selected positions of ``x`` (in place); returns ``x``."""
    return x.index_copy_(0, idx, values.to(x.dtype))
