"""Two-stage selection per task type (the paper's "selection" step).

For every task type separately (conversation, detail, complex reasoning on LLaVA-Instruct):

1. keep the top `question_keep_ratio` (alpha) of the type's records by question score;
2. of those, keep the top `keep_ratio` (beta) by answer score: the mean over turns of each turn's
   best candidate score (the paper's, `score`'s answer_score), or with `turn_aggregate: min`
   the worst turn's, so that one wrong turn is not hidden by the good ones around it.

Exact counts: with n scored records of a type, step 1 keeps n_q = round(alpha * n) and step 2
keeps n_a = round(beta * n_q), rounding half up (0.5 -> 1). Ties are broken by record id, so the
result never depends on file order. Where a turn holds several candidate answers, the kept record
gets the best-scoring one (`turns[k].best` of the score sidecar).

Baselines of exactly the same per-type, per-step counts:
- `random`: a seeded shuffle per type and step (seeded by `select.seed`, not `base.seed`, so an
  experiment can redraw it without rerunning anything upstream);
- `length`: longest question set, then longest answers (a cheap heuristic);
- `all`: keep every scored record (the full-data baseline);
- `oracle` (a diagnostic upper bound, never the method): the records known to be clean first,
  in a seeded order: question stage by "no question defect", answer stage by "no defect at all".
  The flags come from outside (`clean=` of `select`; the demo's select stage reads them from the
  demo world's oracle); the reward path never sees them.
Baselines keep candidate 0 (the original answer) where a turn has candidates: they must not
borrow the reward model's choice.

Records without a task field get a type from `task_map` (regular expression on the id -> type,
first match wins) or else `default_task`. Pool records the `score` stage rejected (no score row)
are never kept; the audit lists them as dropped at "unscored".

`select` decides; `score` computed the numbers (data/score/scores.jsonl).
"""

from __future__ import annotations

import logging
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from align2llava.config import Section
from align2llava.data.records import qa_pairs
from align2llava.errors import DataError

log = logging.getLogger(__name__)

METHODS = ("reward", "random", "length", "all", "oracle")
STEPS = ("pool", "question", "answer")


class SelectParams(Section):
    """The `select:` section of params.yaml."""

    # reward (the method), or a baseline of the same counts: random, length, all (keep all).
    method: Literal["reward", "random", "length", "all", "oracle"] = "reward"
    # alpha: share of each task type kept by question score.
    question_keep_ratio: float = Field(0.3, ge=0.0, le=1.0)
    # beta: share of the question-kept records then kept by answer score.
    keep_ratio: float = Field(0.3, ge=0.0, le=1.0)
    # The answer score a record is ranked by, from its turns' best candidate scores: mean (the
    # paper's) or min (its worst turn).
    turn_aggregate: Literal["mean", "min"] = "mean"
    # Seeds the `random` baseline and the order of equally clean records for `oracle`.
    seed: int = 0
    # Demo diagnostics only: the defect oracle that method `oracle` reads (no other method does).
    oracle: str = "data/synthesize/oracle.jsonl"
    # Records without a "task": the first regex (searched in the id) that matches names the type.
    task_map: dict[str, str] = Field(default_factory=dict)
    default_task: str = "all"
    # Bins per score kind in plots/select/histogram.csv.
    histogram_bins: int = Field(10, ge=1, le=200)

    @field_validator("task_map")
    @classmethod
    def _patterns_compile(cls, v: dict[str, str]) -> dict[str, str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"task_map pattern {pattern!r} is not a regular expression: {exc}")
        return v


def keep_count(ratio: float, n: int) -> int:
    """round(ratio * n), half up; the epsilon absorbs float error (0.3 * 90 = 26.999...)."""
    return min(n, int(math.floor(ratio * n + 0.5 + 1e-9)))


@dataclass
class ScoreRow:
    id: str
    question_score: float
    answer_score: float
    best: list[int]  # per QA turn: index of the best candidate answer
    turn_scores: list[float] = field(default_factory=list)  # per QA turn: its best candidate's score

    def answer_key(self, aggregate: str) -> float:
        """The answer score under `aggregate` (mean: the file's answer_score)."""
        if aggregate == "min" and self.turn_scores:
            return min(self.turn_scores)
        return self.answer_score


@dataclass
class Selection:
    selected: list[dict[str, Any]]
    audit: list[dict[str, Any]]
    metrics: dict[str, Any]
    funnel: list[tuple[str, int]]
    histogram: list[tuple[str, int]]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)


def task_of(record: dict[str, Any], params: SelectParams) -> str:
    task = record.get("task")
    if isinstance(task, str) and task:
        return task
    rid = str(record["id"])
    for pattern, name in params.task_map.items():
        if re.search(pattern, rid):
            return name
    return params.default_task


def parse_scores(rows: list[dict[str, Any]], file: str = "scores.jsonl") -> dict[str, ScoreRow]:
    """Strictly read the score sidecar (our own file): any malformed row is an error."""
    out: dict[str, ScoreRow] = {}
    for i, row in enumerate(rows):
        where = f"{file}: line {i + 1}"
        if not isinstance(row, dict) or "id" not in row:
            raise DataError(f"{where}: expected an object with an 'id'")
        rid = str(row["id"])
        where += f" (id {rid})"
        if rid in out:
            raise DataError(f"{where}: duplicate id")
        try:
            qs, as_ = float(row["question_score"]), float(row["answer_score"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{where}: 'question_score' and 'answer_score' must be numbers") from None
        if not (math.isfinite(qs) and math.isfinite(as_)):
            raise DataError(f"{where}: scores must be finite (got {qs}, {as_})")
        turns = row.get("turns")
        if not isinstance(turns, list):
            raise DataError(f"{where}: 'turns' must be a list")
        best, turn_scores = [], []
        for k, t in enumerate(turns):
            ok = isinstance(t, dict) and isinstance(t.get("scores"), list) and t.get("scores")
            b = t.get("best") if ok else None
            if not ok or not isinstance(b, int) or not 0 <= b < len(t["scores"]):
                raise DataError(f"{where}: turns[{k}] needs non-empty 'scores' and a valid 'best'")
            s = t["scores"][b]
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise DataError(f"{where}: turns[{k}]: the best candidate's score must be a finite number (got {s!r})")
            best.append(b)
            turn_scores.append(float(s))
        out[rid] = ScoreRow(rid, qs, as_, best, turn_scores)
    return out


def resolve_candidates(record: dict[str, Any], best: list[int] | None) -> dict[str, Any]:
    """A copy of `record` whose candidate-list answers are replaced by one string:
    candidate best[k] for QA turn k (None: candidate 0, the original)."""
    out = dict(record)
    convs = []
    k = 0
    for turn in record["conversations"]:
        turn = dict(turn)
        if turn.get("from") == "gpt":
            value = turn["value"]
            if isinstance(value, list):
                choice = best[k] if best is not None else 0
                if not 0 <= choice < len(value):
                    raise DataError(
                        f"record {record['id']}: turn {k} has {len(value)} candidates, "
                        f"score chose {choice}"
                    )
                turn["value"] = value[choice]
            turn.pop("score", None)
            k += 1
        convs.append(turn)
    out["conversations"] = convs
    return out


def _length_scores(record: dict[str, Any]) -> tuple[float, float]:
    """The `length` heuristic: words of all questions; mean words of the original answers."""
    pairs = qa_pairs(record)
    q_words = sum(len(q.split()) for q, _ in pairs)
    a_words = [len((a[0] if isinstance(a, list) else a).split()) for _, a in pairs]
    return float(q_words), (sum(a_words) / len(a_words) if a_words else 0.0)


def _top(ids: list[str], key: dict[str, float], n: int) -> list[str]:
    """The n ids with the highest key; ties by id (ascending)."""
    return sorted(ids, key=lambda i: (-key[i], i))[:n]


def _draw(ids: list[str], n: int, rng: random.Random) -> list[str]:
    pool = sorted(ids)
    rng.shuffle(pool)
    return pool[:n]


def _oracle_keys(ids: list[str], clean: dict[str, tuple[bool, bool]], seed: int
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """Question and answer keys of `oracle`: 1 when clean, plus a seeded jitter in [0, 0.5) so that
    among equally clean records the seed decides."""
    rng = random.Random(f"oracle:{seed}")
    q_key, a_key = {}, {}
    for rid in sorted(ids):
        if rid not in clean:
            raise DataError(f"oracle: no row for pool record {rid}")
        q_clean, all_clean = clean[rid]
        q_key[rid] = float(q_clean) + 0.5 * rng.random()
        a_key[rid] = float(all_clean) + 0.5 * rng.random()
    return q_key, a_key


def select(
    pool: list[dict[str, Any]], scores: dict[str, ScoreRow], params: SelectParams,
    clean: dict[str, tuple[bool, bool]] | None = None,
) -> Selection:
    """Run the two-stage selection over `pool` (LLaVA records with ids) and its scores.

    `clean` (method `oracle` only): {id: (question clean, record clean)}."""
    if (params.method == "oracle") != (clean is not None):
        raise DataError("select: method 'oracle' needs the clean flags, and only it takes them")
    seen: set[str] = set()
    for i, rec in enumerate(pool):
        rid = str(rec["id"])
        if rid in seen:
            raise DataError(f"pool: record {i} (id {rid}): duplicate id")
        seen.add(rid)
    extra = [rid for rid in scores if rid not in seen]
    if extra:
        raise DataError(
            f"scores: {len(extra):,} ids are not in the pool (first: {extra[0]}); "
            "was data/score/scores.jsonl made from a different pool?"
        )

    by_task: dict[str, list[str]] = {}
    task: dict[str, str] = {}
    unscored: list[str] = []
    records = {str(r["id"]): r for r in pool}
    for rec in pool:
        rid = str(rec["id"])
        task[rid] = task_of(rec, params)
        if rid not in scores:
            unscored.append(rid)
            continue
        n_turns = len(qa_pairs(rec))
        if len(scores[rid].best) != n_turns:
            raise DataError(
                f"scores: id {rid} has {len(scores[rid].best)} scored turns, the pool record "
                f"has {n_turns}"
            )
        by_task.setdefault(task[rid], []).append(rid)
    if unscored:
        log.warning(
            "%s pool records have no score (rejected by `score`) and are dropped (first: %s)",
            f"{len(unscored):,}", unscored[0],
        )

    if params.method == "reward":
        q_key = {rid: s.question_score for rid, s in scores.items()}
        a_key = {rid: s.answer_key(params.turn_aggregate) for rid, s in scores.items()}
    elif params.method == "length":
        lengths = {rid: _length_scores(records[rid]) for rid in scores}
        q_key = {rid: v[0] for rid, v in lengths.items()}
        a_key = {rid: v[1] for rid, v in lengths.items()}
    elif params.method == "oracle":
        q_key, a_key = _oracle_keys(list(scores), clean or {}, params.seed)

    dropped_at: dict[str, str | None] = {rid: "unscored" for rid in unscored}
    counts: dict[str, dict[str, int]] = {}
    for name in sorted(by_task):
        ids = by_task[name]
        if params.method == "all":
            after_q, after_a = list(ids), list(ids)
        else:
            n_q = keep_count(params.question_keep_ratio, len(ids))
            if params.method == "random":
                rng = random.Random(f"{params.seed}:{name}")
                after_q = _draw(ids, n_q, rng)
                after_a = _draw(after_q, keep_count(params.keep_ratio, n_q), rng)
            else:
                after_q = _top(ids, q_key, n_q)
                after_a = _top(after_q, a_key, keep_count(params.keep_ratio, n_q))
        q_set, a_set = set(after_q), set(after_a)
        for rid in ids:
            dropped_at[rid] = None if rid in a_set else ("answer" if rid in q_set else "question")
        counts[name] = {"pool": len(ids), "question": len(after_q), "answer": len(after_a)}

    selected, audit = [], []
    for rec in pool:
        rid = str(rec["id"])
        s = scores.get(rid)
        kept = dropped_at[rid] is None
        if kept:
            best = s.best if params.method == "reward" else None
            selected.append(resolve_candidates(rec, best))
        audit.append(
            {
                "id": rid,
                "task": task[rid],
                "kept": kept,
                "dropped_at": dropped_at[rid],
                "question_score": s.question_score if s else None,
                "answer_score": s.answer_score if s else None,
            }
        )
    return Selection(
        selected=selected,
        audit=audit,
        metrics=_metrics(pool, counts, unscored, audit),
        funnel=_funnel(counts),
        histogram=_histogram(scores, params.histogram_bins),
        counts=counts,
    )


def _metrics(
    pool: list[dict[str, Any]],
    counts: dict[str, dict[str, int]],
    unscored: list[str],
    audit: list[dict[str, Any]],
) -> dict[str, Any]:
    kept = sum(c["answer"] for c in counts.values())
    scored = sum(c["pool"] for c in counts.values())
    per_task = {
        name: {**c, "keep_ratio": round(c["answer"] / c["pool"], 6) if c["pool"] else 0.0}
        for name, c in counts.items()
    }

    def mean(rows: list[dict[str, Any]], key: str) -> float | None:
        vals = [r[key] for r in rows if r[key] is not None]
        return round(sum(vals) / len(vals), 6) if vals else None

    kept_rows = [r for r in audit if r["kept"]]
    return {
        "pool": len(pool),
        "scored": scored,
        "unscored": len(unscored),
        "kept": kept,
        "keep_ratio_overall": round(kept / len(pool), 6) if pool else 0.0,
        "per_task": per_task,
        "answer_score_mean": {"pool": mean(audit, "answer_score"), "kept": mean(kept_rows, "answer_score")},
        "question_score_mean": {
            "pool": mean(audit, "question_score"),
            "kept": mean(kept_rows, "question_score"),
        },
    }


def _funnel(counts: dict[str, dict[str, int]]) -> list[tuple[str, int]]:
    """Rows (step, count): all types first, then each type; numbered so plots keep the order."""
    rows = []
    total = {s: sum(c[s] for c in counts.values()) for s in STEPS}
    labels = {"pool": "1 pool", "question": "2 after question", "answer": "3 after answer"}
    for s in STEPS:
        rows.append((f"{labels[s]} (all types)", total[s]))
    for name, c in counts.items():
        for s in STEPS:
            rows.append((f"{labels[s]} ({name})", c[s]))
    return rows


def _histogram(scores: dict[str, ScoreRow], bins: int) -> list[tuple[str, int]]:
    """Rows (bin, count) of the question and the answer scores of every scored record."""
    rows: list[tuple[str, int]] = []
    for kind in ("question", "answer"):
        vals = [getattr(s, f"{kind}_score") for s in scores.values()]
        if not vals:
            continue
        lo, hi = min(vals), max(vals)
        width = (hi - lo) / bins if hi > lo else 1.0
        hist = [0] * bins
        for v in vals:
            hist[min(bins - 1, int((v - lo) / width))] += 1
        for b, n in enumerate(hist):
            a = lo + b * width
            rows.append((f"{kind} {b:02d} [{a:+.3f}, {a + width:+.3f})", n))
    return rows




def run_select(
    pool_path: str | Path,
    scores_path: str | Path,
    params: SelectParams,
    out_dir: str | Path = "data/select",
    plots_dir: str | Path = "plots/select",
    clean: dict[str, tuple[bool, bool]] | None = None,
) -> Selection:
    """Read the pool and its scores, select, write selected.json, audit.jsonl and the plots.

    The pool is external input: entries that cannot be parsed or have no id are skipped here
    (the `score` stage already set them aside in its rejects file) and counted as `unreadable`.
    """
    from align2llava.data.io import read_jsonl_strict, read_records, write_csv, write_jsonl, write_records

    loaded = read_records(pool_path)
    pool = [r for r in loaded.records if isinstance(r, dict) and "id" in r]
    unreadable = len(loaded.problems) + len(loaded.records) - len(pool)
    if unreadable:
        log.warning("%s: %s entries unreadable or without id, skipped", pool_path, f"{unreadable:,}")
    scores = parse_scores(read_jsonl_strict(scores_path), str(scores_path))
    result = select(pool, scores, params, clean)
    result.metrics["unreadable"] = unreadable
    out = Path(out_dir)
    write_records(result.selected, out / "selected.json", "json")
    write_jsonl(result.audit, out / "audit.jsonl")
    write_csv(result.funnel, Path(plots_dir) / "funnel.csv", ("step", "count"))
    write_csv(result.histogram, Path(plots_dir) / "histogram.csv", ("bin", "count"))
    return result
