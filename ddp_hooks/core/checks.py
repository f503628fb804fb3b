"""Checks shared by every state: argument validation (one message shape for every bad
input) and the non-finite test."""

import math
from numbers import Integral, Real

import torch


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """Return ``value`` as an int, or raise ValueError naming ``name`` and the valid range."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer in {_range(low, high)}, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer in {_range(low, high)}, got {value}")
    return value


def check_float(
    name: str,
    value,
    low: float,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float, or raise ValueError naming ``name`` and the valid range."""
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(float(value)):
        raise ValueError(
            f"{name} must be a number in {_range(low, high, low_open, high_open)}, got {value!r}"
        )
    value = float(value)
    bad_low = value <= low if low_open else value < low
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high or math.isinf(value):
        raise ValueError(
            f"{name} must be a number in {_range(low, high, low_open, high_open)}, got {value}"
        )
    return value


def check_choice(name: str, value, choices) -> str:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def _range(low, high, low_open=False, high_open=False) -> str:
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    return f"{left}{low}, {'inf)' if high is None else str(high) + right}"


def nonfinite(x: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: does ``x`` hold inf or NaN? One read, no bucket-sized temporary and no
    host synchronization (a float32 sum that overflows also counts, which finite gradients
    never reach)."""
    return ~torch.isfinite(x.sum(dtype=torch.float32))
