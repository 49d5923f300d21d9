"""Inter-annotator agreement: Krippendorff's alpha for interval data.

A unit is one rated thing (one candidate of one group); its values are the scores the
annotators gave it. Units with fewer than two values carry no information on agreement and are
left out (Krippendorff's "pairable values"). With delta(a, b) = (a - b)^2, n the number of
pairable values and m_u the number of values of unit u:

    D_o = 1/n * sum_u 1/(m_u - 1) * sum_{i != j in u} delta(v_i, v_j)
    D_e = 1/(n (n - 1)) * sum_{i != j over all pairable values} delta(v_i, v_j)
    alpha = 1 - D_o / D_e

alpha is 1 for perfect agreement, 0 for agreement at chance level and negative below it. It is
undefined (None) when no unit has two values or when every pairable value is the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def krippendorff_alpha_interval(units: Iterable[Sequence[float]]) -> float | None:
    """Krippendorff's alpha (interval metric) over units of values; None when undefined."""
    pairable = [[float(v) for v in u] for u in units if len(u) >= 2]
    values = [v for u in pairable for v in u]
    n = len(values)
    if n < 2:
        return None
    observed = 0.0
    for u in pairable:
        m = len(u)
        # sum over ordered pairs i != j of (v_i - v_j)^2 = 2 * (m * sum v^2 - (sum v)^2)
        s, s2 = sum(u), sum(v * v for v in u)
        observed += 2.0 * (m * s2 - s * s) / (m - 1)
    observed /= n
    s, s2 = sum(values), sum(v * v for v in values)
    expected = 2.0 * (n * s2 - s * s) / (n * (n - 1))
    if expected <= 0.0:
        return None
    return 1.0 - observed / expected


__all__ = ["krippendorff_alpha_interval"]
