"""Transports: how payloads cross ranks. They return Futures, count exact bytes and surface
every failure."""

from .futures import CollectiveError, chain, done, value_of
from .groups import is_alive, new_group_like, partition, timeout_of
from .transport import Transport

__all__ = [
    "CollectiveError",
    "Transport",
    "chain",
    "done",
    "is_alive",
    "new_group_like",
    "partition",
    "timeout_of",
    "value_of",
]
