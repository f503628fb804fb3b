"""Argument validation shared by every constructor: one message shape for every bad input.

Each check returns the value in its canonical type or raises ``ValueError`` naming the
argument and what it accepts. Booleans must be ``bool`` (a string such as ``"False"`` is
truthy and would silently mean the opposite), counts have an upper bound that the algorithms
can serve, and seeds stay in the range of ``torch.Generator.manual_seed``.
"""

import math
from collections.abc import Collection
from numbers import Integral, Real
from typing import Any

#: the largest count any argument may take (fits int32 index arithmetic)
MAX_COUNT = 2**31 - 1
#: seeds are used as ``seed + offset`` with offsets below 2**32: keep every derived seed in int64
MAX_SEED = 2**62 - 1


def check_int(name: str, value: Any, low: int, high: int = MAX_COUNT) -> int:
    """Return ``value`` as an int in ``[low, high]``, or raise ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer in {span(low, high)}, got {value!r}")
    number = int(value)
    if number < low or number > high:
        raise ValueError(f"{name} must be an integer in {span(low, high)}, got {number}")
    return number


def check_float(
    name: str,
    value: Any,
    low: float,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a finite float in the range, or raise ValueError naming ``name``."""
    interval = span(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    number = float(value)
    bad_low = number <= low if low_open else number < low
    bad_high = high is not None and (number >= high if high_open else number > high)
    if bad_low or bad_high:
        raise ValueError(f"{name} must be a number in {interval}, got {number}")
    return number


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool, else raise ValueError (``"False"`` is not False)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Collection[str]) -> str:
    """Return ``value`` if it is one of the strings ``choices``, else raise ValueError."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def check_seed(name: str, value: Any) -> int:
    """A generator seed in ``[0, 2**62 - 1]`` (room for the per-rank offsets added to it)."""
    return check_int(name, value, 0, MAX_SEED)


def span(low: float, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    """The interval as the messages write it: ``[1, 1024]``, ``(0, 1)``, ``[0, inf)``."""
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    return f"{left}{low}, {'inf)' if high is None else str(high) + right}"
