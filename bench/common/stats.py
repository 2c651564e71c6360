"""Order statistics of latency samples."""

from __future__ import annotations


def quantile(xs: list[float], q: float) -> float:
    """The nearest-rank q-quantile of xs (nan when xs is empty)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]
