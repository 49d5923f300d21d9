"""The curation report's numbers: the audit, the pool, the scores and the restyle log joined by
record id; funnel counts, score histograms, ranks and the gallery sample. No HTML here
(report/html.py renders what this computes), so everything is testable on plain values.

Ranks are per task type and by reward score, the way `select` ranks (ties by id): `q_rank` 1 is
the best question score among the type's scored records; `a_rank` 1 is the best answer score
among the records that passed the question stage. Under a baseline `select.method` (random,
length, all) the ranks still order by reward score, which is then not what decided.

The gallery is a sample, the same size whatever the pool (docs/report.md): per task type and per
outcome (kept, dropped at the answer stage, dropped at the question stage, unscored), the
`border` records nearest the cut (worst kept first, best dropped first), then `spread` more taken
at evenly spaced ranks over the rest of that outcome (its last, the lowest, included).
"""

from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align2llava.errors import DataError

# Outcomes in funnel order; an audit row's `dropped_at` (null when kept) names its outcome.
OUTCOMES = ("kept", "answer", "question", "unscored")
OUTCOME_LABEL = {
    "kept": "kept",
    "answer": "dropped at the answer stage",
    "question": "dropped at the question stage",
    "unscored": "unscored (rejected by score)",
}
KINDS = ("question", "answer")


@dataclass
class Entry:
    """One pool record's fate, from the audit, with its ranks."""

    id: str
    task: str
    outcome: str  # one of OUTCOMES
    question_score: float | None
    answer_score: float | None
    q_rank: int | None = None
    a_rank: int | None = None
    sample: str | None = None  # "border" | "spread" when in the gallery


@dataclass
class TaskCounts:
    pool: int = 0
    scored: int = 0
    question: int = 0  # passed the question stage
    kept: int = 0

    @property
    def unscored(self) -> int:
        return self.pool - self.scored


@dataclass
class Joined:
    """Every pool record's entry (audit order) and the per-type counts."""

    entries: list[Entry]
    counts: dict[str, TaskCounts] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return sorted(self.counts)

    def total(self) -> TaskCounts:
        t = TaskCounts()
        for c in self.counts.values():
            t.pool, t.scored, t.question, t.kept = (t.pool + c.pool, t.scored + c.scored,
                                                    t.question + c.question, t.kept + c.kept)
        return t


# ----------------------------------------------------------------------------- audit + ranks


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_audit(rows: list[dict[str, Any]], file: str = "audit.jsonl") -> list[Entry]:
    """Audit rows (steps/selection.py, docs/formats.md) as entries; a malformed row is a
    DataError naming the file, the line and the problem."""
    out: list[Entry] = []
    seen: set[str] = set()
    for n, row in enumerate(rows, 1):
        where = f"{file}: line {n}"
        if not isinstance(row, dict) or not {"id", "task", "kept", "dropped_at"} <= set(row):
            raise DataError(f"{where}: expected an object with id, task, kept, dropped_at")
        rid = str(row["id"])
        where += f" (id {rid})"
        if rid in seen:
            raise DataError(f"{where}: duplicate id")
        seen.add(rid)
        kept, dropped = row["kept"], row["dropped_at"]
        if not isinstance(kept, bool) or dropped not in (None, "question", "answer", "unscored") or (
            kept != (dropped is None)
        ):
            raise DataError(f"{where}: kept must be true with dropped_at null, or false with "
                            f"dropped_at question|answer|unscored (got {kept!r}, {dropped!r})")
        qs, as_ = row.get("question_score"), row.get("answer_score")
        if dropped == "unscored":
            qs = as_ = None
        elif not (_number(qs) and _number(as_)):
            raise DataError(f"{where}: a scored record needs numeric question_score and answer_score")
        out.append(Entry(rid, str(row["task"]), dropped or "kept", qs, as_))
    return out


def join(entries: list[Entry]) -> Joined:
    """Rank each type's records the way `select` does and count the funnel."""
    by_task: dict[str, list[Entry]] = {}
    for e in entries:
        by_task.setdefault(e.task, []).append(e)
    counts: dict[str, TaskCounts] = {}
    for task, group in by_task.items():
        scored = [e for e in group if e.outcome != "unscored"]
        for r, e in enumerate(sorted(scored, key=lambda e: (-e.question_score, e.id)), 1):
            e.q_rank = r
        passed = [e for e in scored if e.outcome in ("kept", "answer")]
        for r, e in enumerate(sorted(passed, key=lambda e: (-e.answer_score, e.id)), 1):
            e.a_rank = r
        counts[task] = TaskCounts(pool=len(group), scored=len(scored), question=len(passed),
                                  kept=sum(e.outcome == "kept" for e in group))
    return Joined(entries, counts)


# ----------------------------------------------------------------------------- histograms


def cutoff(entries: list[Entry], kind: str) -> float | None:
    """The lowest score that passed a stage: the question stage (kind question) or the answer
    stage (kind answer), over one type's entries; None when nothing passed."""
    passed = [e for e in entries if (e.outcome in ("kept", "answer") if kind == "question" else e.outcome == "kept")]
    return min(getattr(e, f"{kind}_score") for e in passed) if passed else None


def histogram(entries: list[Entry], kind: str, bins: int) -> dict[str, Any]:
    """Counts of `kind`_score per bin and outcome over the scored entries.

    {"kind", "edges": [bins + 1 floats], "counts": {outcome: [bins ints]}, "n"}; equal-width
    bins over the entries' range (one bin of width 1 when every score is the same)."""
    vals = [(getattr(e, f"{kind}_score"), e.outcome) for e in entries if e.outcome != "unscored"]
    counts = {o: [0] * bins for o in OUTCOMES if o != "unscored"}
    if not vals:
        return {"kind": kind, "edges": [], "counts": counts, "n": 0}
    lo = min(v for v, _ in vals)
    hi = max(v for v, _ in vals)
    width = (hi - lo) / bins if hi > lo else 1.0
    for v, outcome in vals:
        counts[outcome][min(bins - 1, int((v - lo) / width))] += 1
    return {"kind": kind, "edges": [lo + b * width for b in range(bins + 1)], "counts": counts, "n": len(vals)}


# ----------------------------------------------------------------------------- gallery sample


def spread(items: list[Any], n: int) -> list[Any]:
    """`n` items at evenly spaced positions of `items`, first and last included (all when fewer)."""
    if len(items) <= n:
        return list(items)
    if n == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def order_for_gallery(entries: list[Entry], outcome: str) -> list[Entry]:
    """One outcome's entries, nearest the cut first: worst kept, best dropped, pool order for
    unscored ones."""
    group = [e for e in entries if e.outcome == outcome]
    if outcome == "kept":
        return sorted(group, key=lambda e: (-e.a_rank, e.id))
    if outcome == "answer":
        return sorted(group, key=lambda e: (e.a_rank, e.id))
    if outcome == "question":
        return sorted(group, key=lambda e: (e.q_rank, e.id))
    return group


def sample_gallery(joined: Joined, border: int, spread_n: int) -> list[Entry]:
    """The gallery's entries (module docstring): per type and outcome, `border` nearest the cut
    then `spread_n` evenly over the rest. Each gets `sample` set to "border" or "spread"."""
    by_task: dict[str, list[Entry]] = {}
    for e in joined.entries:
        by_task.setdefault(e.task, []).append(e)
    out: list[Entry] = []
    for task in sorted(by_task):
        for outcome in OUTCOMES:
            ordered = order_for_gallery(by_task[task], outcome)
            for e in ordered[:border]:
                e.sample = "border"
                out.append(e)
            for e in spread(ordered[border:], spread_n):
                e.sample = "spread"
                out.append(e)
    return out


# ----------------------------------------------------------------------------- record text


def record_turns(record: dict[str, Any], score_row: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per QA turn of a pool record: question, the answer the selection would keep (the best
    candidate by score where a turn has candidates, else the only one), how many candidates
    there were and that answer's score."""
    from align2llava.data.records import qa_pairs

    turns = (score_row or {}).get("turns") or []
    out = []
    for k, (q, a) in enumerate(qa_pairs(record)):
        t = turns[k] if k < len(turns) and isinstance(turns[k], dict) else {}
        best = t.get("best", 0) if isinstance(t.get("best"), int) else 0
        cands = a if isinstance(a, list) else [a]
        best = best if 0 <= best < len(cands) else 0
        scores = t.get("scores") if isinstance(t.get("scores"), list) else []
        out.append({
            "question": str(q),
            "answer": str(cands[best]) if cands else "",
            "candidates": len(cands),
            "score": scores[best] if best < len(scores) and _number(scores[best]) else None,
        })
    return out


# ----------------------------------------------------------------------------- restyle log

_TOKEN = re.compile(r"\s+|[^\s]+")


def word_diff(a: str, b: str) -> tuple[list[tuple[bool, str]], list[tuple[bool, str]]]:
    """Spans of `a` and of `b` as (changed, text): words of `a` the rewrite removed or replaced,
    and words of `b` it added, are changed; whitespace is kept as it was."""
    ta, tb = _TOKEN.findall(a), _TOKEN.findall(b)
    wa = [t for t in ta if not t.isspace()]
    wb = [t for t in tb if not t.isspace()]
    sm = difflib.SequenceMatcher(None, wa, wb, autojunk=False)
    changed_a, changed_b = [True] * len(wa), [True] * len(wb)
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            changed_a[i1:i2] = [False] * (i2 - i1)
            changed_b[j1:j2] = [False] * (j2 - j1)

    def spans(tokens: list[str], changed: list[bool]) -> list[tuple[bool, str]]:
        out: list[tuple[bool, str]] = []
        w = 0
        for t in tokens:
            flag = False if t.isspace() else changed[w]
            if not t.isspace():
                w += 1
            if out and out[-1][0] == flag:
                out[-1] = (out[-1][0], out[-1][1] + t)
            else:
                out.append((flag, t))
        return out

    return spans(ta, changed_a), spans(tb, changed_b)


def check_restyle_log(rows: list[dict[str, Any]], file: str = "log.jsonl") -> list[dict[str, Any]]:
    """data/restyle/log.jsonl rows (docs/formats.md), checked for the keys the report reads."""
    need = {"id", "turn", "original", "rewrite", "kept", "reason"}
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not need <= set(row):
            raise DataError(f"{file}: line {n}: expected an object with {', '.join(sorted(need))}")
        if row["kept"] not in ("rewrite", "original"):
            raise DataError(f"{file}: line {n} (id {row['id']}): kept must be rewrite or original, got {row['kept']!r}")
    return rows


def restyle_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Turns, accepted rewrites, records changed and the count per rejection reason."""
    reasons = Counter(r["reason"] or "other" for r in rows if r["kept"] != "rewrite")
    accepted = [r for r in rows if r["kept"] == "rewrite"]
    return {
        "turns": len(rows),
        "accepted": len(accepted),
        "records": len({str(r["id"]) for r in rows}),
        "records_changed": len({str(r["id"]) for r in accepted}),
        "reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def restyle_examples(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Up to `n` rows per outcome (accepted, then each rejection reason by count), spread
    evenly over the log; each with the word diff of original vs rewrite."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault("accepted" if r["kept"] == "rewrite" else (r["reason"] or "other"), []).append(r)
    order = sorted(groups, key=lambda g: (g != "accepted", -len(groups[g]), g))
    out = []
    for g in order:
        for r in spread(groups[g], n):
            orig, new = str(r.get("original") or ""), str(r.get("rewrite") or "")
            d_orig, d_new = word_diff(orig, new)
            out.append({**r, "outcome": g, "diff_original": d_orig, "diff_rewrite": d_new})
    return out


# ----------------------------------------------------------------------------- small inputs


def read_json_optional(path: str | Path | None) -> dict[str, Any] | None:
    """A metrics JSON object, or None when the file is absent (a bad one is a DataError)."""
    from align2llava.data.io import read_json_any

    if path is None or not Path(path).is_file():
        return None
    data = read_json_any(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_csv_optional(path: str | Path | None) -> list[dict[str, str]] | None:
    import csv

    if path is None or not Path(path).is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def rm_validation(train_reward: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Reward-model validation pairwise accuracy (metrics/train_reward.json), per kind."""
    if not train_reward:
        return []
    out = []
    for kind in KINDS:
        acc = train_reward.get(f"{kind}_val_pairwise_accuracy")
        if acc is None:
            continue
        out.append({"kind": kind, "accuracy": acc,
                    "before": train_reward.get(f"{kind}_val_pairwise_accuracy_before"),
                    "pairs": train_reward.get(f"{kind}_val_pairs"),
                    "train_pairs": train_reward.get(f"{kind}_train_pairs")})
    return out


def demo_diagnostics(diagnose: dict[str, Any] | None, score: dict[str, Any] | None) -> dict[str, Any] | None:
    """Defect AUROC and oracle defect rates (demo only): metrics/diagnose.json when it exists
    (`defect_auroc`, `defect_rates.{pool,question_kept,selected}`), else the AUROC that
    metrics/score.json carries. None when neither has them."""
    if diagnose and (diagnose.get("defect_auroc") or diagnose.get("defect_rates")):
        rates = diagnose.get("defect_rates") if isinstance(diagnose.get("defect_rates"), dict) else {}
        names = {"pool": "pool", "question_kept": "after the question stage", "selected": "kept"}
        return {"source": "metrics/diagnose.json", "auroc": diagnose.get("defect_auroc") or {},
                "rates": {names.get(k, k): v for k, v in rates.items() if isinstance(v, dict)}}
    if score and isinstance(score.get("defect_auroc"), dict) and score["defect_auroc"]:
        return {"source": "metrics/score.json", "auroc": score["defect_auroc"], "rates": {}}
    return None
