"""Repeats of a side-by-side benchmark: the order the trainers run in, and the median and
range of what the repeats measured.

Every cell of a grid runs each trainer ``repeats`` times, interleaved: repeat 0 runs the
trainers in the given order, repeat 1 in reverse, and so on, so each pair of trainers swaps
which goes first from one repeat to the next (a machine that slows down or warms up during a
cell does not favour one side). Pure functions, standard library only.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def interleaved_order(items: Sequence[T], repeat: int) -> list[T]:
    """``items`` in order on even repeats and reversed on odd ones (``repeat`` counts from 0)."""
    if repeat < 0:
        raise ValueError(f"repeat must be >= 0, got {repeat}")
    return list(items) if repeat % 2 == 0 else list(reversed(items))


def spread(values: Sequence[float]) -> dict[str, float | int]:
    """``median``, ``min``, ``max`` and ``n`` of ``values`` (at least one, or a ``ValueError``)."""
    if not values:
        raise ValueError("no values to summarise")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def paired_ratios(top: Sequence[float | None], bottom: Sequence[float | None]) -> list[float]:
    """``top[i] / bottom[i]`` for each repeat ``i`` (runs of the same repeat pair up), leaving out
    pairs with a missing value or a zero denominator."""
    if len(top) != len(bottom):
        raise ValueError(f"unpaired repeats: {len(top)} vs {len(bottom)}")
    return [t / b for t, b in zip(top, bottom) if t is not None and b]


def format_spread(summary: dict[str, Any] | None, fmt: str = ".2f") -> str:
    """``"median [min-max]"`` (just the median when all repeats agree or there is one); ``""``
    for ``None``."""
    if summary is None:
        return ""
    median = format(summary["median"], fmt)
    low, high = format(summary["min"], fmt), format(summary["max"], fmt)
    return median if low == high else f"{median} [{low}-{high}]"
