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


def oracle_vs_random(rows: list[dict[str, Any]], metric: str, ratio: float = CHECK_RATIO) -> Check:
    name = f"oracle beats random at {ratio:.0%} ({metric})"
    oracle, rand = _values(rows, "oracle", metric, ratio), _values(rows, "random", metric, ratio)
    if not oracle or not rand:
        return Check(name, None, f"runs missing: {len(oracle)} oracle and {len(rand)} random at {ratio:.0%}.")
    (mo, so), (mr, sr) = _mean_std(oracle), _mean_std(rand)
    gap, spread = mo - mr, math.sqrt(so ** 2 + sr ** 2)
    need = max(2 * spread, MIN_GAP)
    detail = (f"oracle {mo:.3f} +- {so:.3f} ({len(oracle)} seeds), random {mr:.3f} +- {sr:.3f} ({len(rand)} seeds): "
              f"gap {gap:+.3f}, needs > {need:.3f} (2 x combined spread {spread:.3f}, at least {MIN_GAP}).")
    if min(len(oracle), len(rand)) < MIN_SEEDS:
        return Check(name, None, detail + f" {MIN_SEEDS} seeds each needed.")
    return Check(name, gap > need, detail)


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


def format_checks(checks: list[Check]) -> str:
    return "\n".join(c.line() for c in checks)
