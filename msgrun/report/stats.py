"""Means over seeds with 95% Student-t confidence intervals.

Why t and not the bootstrap: sweeps here have 3-5 seeds, and a percentile bootstrap of 3 values
has 10 distinct resamples and an interval far too narrow (it never reaches past the extremes of
the sample). The t interval is exact for normal per-seed values and honest about small n.
Ratios (speedups) are averaged and bounded on the log scale (a 2x and a 0.5x average to 1x),
so their estimate is the geometric mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Two-sided 95%: the 0.975 quantile of Student's t for 1..30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
_Z975 = 1.959964


def t975(df: int) -> float:
    if df < 1:
        raise ValueError("a t interval needs at least 2 values")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975  # Cornish-Fisher expansion: within 1e-4 of the exact quantile beyond 30 df
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass
class Interval:
    """An estimate over n per-seed values and its 95% interval (lo, hi: None when n < 2)."""

    estimate: float
    lo: float | None
    hi: float | None
    values: list[float]
    null: float  # the value meaning "no effect": 1 for a ratio, 0 for a difference

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def distinguishable(self) -> bool | None:
        """Whether the interval excludes the null value; None without an interval."""
        if self.lo is None:
            return None
        return not (self.lo <= self.null <= self.hi)


def mean_interval(values: list[float]) -> Interval | None:
    """Arithmetic mean and t interval (for differences, e.g. a loss gap)."""
    if not values:
        return None
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, None, None, list(values), 0.0)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, list(values), 0.0)


def ratio_interval(values: list[float]) -> Interval | None:
    """Geometric mean and t interval of the logs, exponentiated (for ratios, e.g. a speedup)."""
    values = [v for v in values if v > 0]
    if not values:
        return None
    logs = mean_interval([math.log(v) for v in values])
    lo = None if logs.lo is None else math.exp(logs.lo)
    hi = None if logs.hi is None else math.exp(logs.hi)
    return Interval(math.exp(logs.estimate), lo, hi, list(values), 1.0)
