"""Threshold-free ranking quality, shared by evaluation (POPE's yes-no margin) and the demo
diagnostics (defect AUROC of reward scores)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties one half (Mann-Whitney)."""
    if not positive or not negative:
        return float("nan")
    neg = sorted(negative)
    wins = 0.0
    for p in positive:
        lo = bisect.bisect_left(neg, p)
        hi = bisect.bisect_right(neg, p)
        wins += lo + 0.5 * (hi - lo)
    return wins / (len(positive) * len(negative))
