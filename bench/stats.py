"""Percentiles and summaries (nearest-rank on sorted samples; no interpolation surprises)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(samples: Sequence[float], p: float) -> float | None:
    """The nearest-rank `p`th percentile (0 < p ≤ 100); None without samples."""
    if not samples:
        return None
    ordered = sorted(samples)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(samples: Sequence[float], *, digits: int = 1) -> dict[str, float | int | None]:
    """n, p50, p95, p99 and max of `samples`, rounded."""

    def r(value: float | None) -> float | None:
        return None if value is None else round(value, digits)

    return {
        "n": len(samples),
        "p50": r(percentile(samples, 50)),
        "p95": r(percentile(samples, 95)),
        "p99": r(percentile(samples, 99)),
        "max": r(max(samples) if samples else None),
    }


def slope_loglog(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """The least-squares slope of log(y) on log(x): 0 = flat, 1 = linear in x."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var


def rate_between(times: Sequence[float], low: float = 0.1, high: float = 0.9) -> float | None:
    """Events per second over the middle of a series of completion times (steady state).

    Leaves out the first `low` and the last `1 - high` of the events, where the pipeline fills
    and drains.
    """
    ordered = sorted(times)
    if len(ordered) < 10:
        return None
    first = ordered[int(len(ordered) * low)]
    last = ordered[int(len(ordered) * high) - 1]
    count = int(len(ordered) * high) - int(len(ordered) * low) - 1
    return count / (last - first) if last > first else None
