"""Per-bucket-layout data that follows from shapes (index tensors, plans, workspaces).

Built once per layout (the tuple of parameters DDP put in a bucket) and dropped once DDP stops
using that layout, e.g. the first iteration's buckets after the rebuild.
"""

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


class LayoutCache(Generic[T]):
    """``get(params, step)`` returns ``build(params)``, built on the first call for a layout."""

    def __init__(self, build: Callable[[list[torch.Tensor]], T]) -> None:
        self._build = build
        self._entries: dict[tuple[int, ...], tuple[T, int]] = {}

    def get(self, params: Sequence[torch.Tensor], step: int) -> T:
        key = tuple(id(p) for p in params)
        entry = self._entries.get(key)
        if entry is None:
            # a new layout: forget layouts unused for a whole step (DDP has rebuilt its buckets)
            self._entries = {k: v for k, v in self._entries.items() if v[1] >= step - 1}
            entry = (self._build(list(params)), step)
        self._entries[key] = (entry[0], step)
        return entry[0]

    def clear(self) -> None:
        self._entries = {}
