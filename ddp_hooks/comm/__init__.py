"""Transports: how payloads cross ranks. They return Futures and count exact bytes."""

from .transport import Transport

__all__ = ["Transport"]
