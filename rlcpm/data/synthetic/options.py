"""Checks for synthetic-task options: they come from YAML, so bad values get a DataError naming them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlcpm.errors import DataError


def int_range(value: Any, option: str, minimum: int) -> tuple[int, int]:
    """An int `n` or a pair `[lo, hi]` (inclusive) -> (lo, hi), both >= minimum."""
    if isinstance(value, int) and not isinstance(value, bool):
        low, high = value, value
    elif (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        low, high = value
    else:
        raise DataError(f"synthetic option {option!r} must be an integer or [low, high], got {value!r}")
    if low < minimum or high < low:
        raise DataError(f"synthetic option {option!r} must satisfy {minimum} <= low <= high, got {value!r}")
    return low, high


def fraction(value: Any, option: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise DataError(f"synthetic option {option!r} must be a number in [0, 1], got {value!r}")
    return float(value)


def positive_int(value: Any, option: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"synthetic option {option!r} must be an integer >= {minimum}, got {value!r}")
    return value


def choice(value: Any, option: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise DataError(f"synthetic option {option!r} must be one of {list(allowed)}, got {value!r}")
    return value
