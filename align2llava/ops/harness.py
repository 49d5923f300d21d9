"""The harness check: can the compression experiment see data quality at all?

Before a reward-curated subset can be shown to beat a random one, the instrument must tell a
perfect selection from a random one. On the demo the `oracle` method (the records the demo
oracle marks clean first) is that perfect selection. `harness_checks` reads the experiment's
rows (one per method, keep ratio and seed, as `experiment_rows` or the harness probe make them)
and states three checks:

- oracle beats random at the check ratio (9%) by more than twice the combined seed spread,
  sqrt(std_oracle^2 + std_random^2), and by at least 0.03, over at least 3 seeds each;
- fine-tuning on the full data beats the base (not fine-tuned) by at least 0.03;
- every fine-tuned run's POPE yes ratio lies in [0.2, 0.8] (not an all-yes or all-no model).

`headline_checks` states the method's own claim on the same rows, once the harness can see it:

- the reward-curated subset beats random at the check ratio by more than twice the combined
  seed spread, over at least 3 seeds each;
- it scores at least what the full-data model scores.

A check whose runs are missing (or with too few seeds) reads "not decided": on your own data there is no oracle.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

CHECK_RATIO = 0.09
MIN_SEEDS = 3
MIN_GAP = 0.03
YES_RATIO_RANGE = (0.2, 0.8)


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool | None  # None: runs missing, or too few seeds to decide
    detail: str

    def line(self) -> str:
        verdict = {True: "met", False: "NOT met", None: "not decided"}[self.passed]
        return f"- {self.name}: **{verdict}**. {self.detail}"


def _values(rows: list[dict[str, Any]], method: str, metric: str, ratio: float | None = None) -> list[float]:
    return [float(r[metric]) for r in rows
            if r["method"] == method and r.get(metric) is not None
            and (ratio is None or math.isclose(float(r["keep_ratio"]), ratio, abs_tol=1e-3))]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _beats(rows: list[dict[str, Any]], better: str, other: str, metric: str, ratio: float,
           min_gap: float) -> Check:
    name = f"{better} beats {other} at {ratio:.0%} ({metric})"
    a, b = _values(rows, better, metric, ratio), _values(rows, other, metric, ratio)
    if not a or not b:
        return Check(name, None, f"runs missing: {len(a)} {better} and {len(b)} {other} at {ratio:.0%}.")
    (ma, sa), (mb, sb) = _mean_std(a), _mean_std(b)
    gap, spread = ma - mb, math.sqrt(sa ** 2 + sb ** 2)
    need = max(2 * spread, min_gap)
    floor = f", at least {min_gap}" if min_gap else ""
    detail = (f"{better} {ma:.3f} +- {sa:.3f} ({len(a)} seeds), {other} {mb:.3f} +- {sb:.3f} ({len(b)} seeds): "
              f"gap {gap:+.3f}, needs > {need:.3f} (2 x combined spread {spread:.3f}{floor}).")
    if min(len(a), len(b)) < MIN_SEEDS:
        return Check(name, None, detail + f" {MIN_SEEDS} seeds each needed.")
    return Check(name, gap > need, detail)


def oracle_vs_random(rows: list[dict[str, Any]], metric: str, ratio: float = CHECK_RATIO) -> Check:
    return _beats(rows, "oracle", "random", metric, ratio, MIN_GAP)


def reward_vs_random(rows: list[dict[str, Any]], metric: str, ratio: float = CHECK_RATIO) -> Check:
    return _beats(rows, "reward", "random", metric, ratio, 0.0)


def reward_vs_full(rows: list[dict[str, Any]], metric: str, ratio: float = CHECK_RATIO) -> Check:
    name = f"reward at {ratio:.0%} at least the full data ({metric})"
    reward, full = _values(rows, "reward", metric, ratio), _values(rows, "full", metric)
    if not reward or not full:
        return Check(name, None, f"runs missing: {len(reward)} reward at {ratio:.0%} and {len(full)} full.")
    (mr, sr), (mf, sf) = _mean_std(reward), _mean_std(full)
    detail = f"reward {mr:.3f} +- {sr:.3f} ({len(reward)} seeds), full {mf:.3f} +- {sf:.3f} ({len(full)} seeds): gap {mr - mf:+.3f}."
    return Check(name, mr >= mf, detail)


def full_vs_base(rows: list[dict[str, Any]], metric: str) -> Check:
    name = f"full data beats the base ({metric})"
    full, base = _values(rows, "full", metric), _values(rows, "base", metric)
    if not full or not base:
        return Check(name, None, f"runs missing: {len(full)} full and {len(base)} base.")
    (mf, sf), (mb, _) = _mean_std(full), _mean_std(base)
    detail = f"full {mf:.3f} +- {sf:.3f} ({len(full)} seeds), base {mb:.3f}: gap {mf - mb:+.3f}, needs >= {MIN_GAP}."
    return Check(name, mf - mb >= MIN_GAP, detail)


def pope_yes_ratio(rows: list[dict[str, Any]], metric: str = "pope_yes_ratio") -> Check:
    lo, hi = YES_RATIO_RANGE
    name = f"POPE yes ratio of every fine-tuned run in [{lo}, {hi}] ({metric})"
    runs = [r for r in rows if r["method"] != "base" and r.get(metric) is not None]
    if not runs:
        return Check(name, None, "runs missing: no fine-tuned run with POPE.")
    out = [r for r in runs if not lo <= float(r[metric]) <= hi]
    listed = ", ".join(f"{r['method']} seed {r.get('seed')}: {float(r[metric]):.2f}" for r in out)
    return Check(name, not out, f"{len(runs) - len(out)} of {len(runs)} runs in range" + (f"; outside: {listed}." if out else "."))


def harness_checks(rows: list[dict[str, Any]], metric: str = "benchmark_accuracy",
                   ratio: float = CHECK_RATIO) -> list[Check]:
    """The three checks on the experiment's rows (method, keep_ratio, seed and metric columns)."""
    return [oracle_vs_random(rows, metric, ratio), full_vs_base(rows, metric), pope_yes_ratio(rows)]


def headline_checks(rows: list[dict[str, Any]], metric: str = "benchmark_accuracy",
                    ratio: float = CHECK_RATIO) -> list[Check]:
    """The method's claim on the experiment's rows: reward beats random, and matches full data."""
    return [reward_vs_random(rows, metric, ratio), reward_vs_full(rows, metric, ratio)]


def format_checks(checks: list[Check]) -> str:
    return "\n".join(c.line() for c in checks)
