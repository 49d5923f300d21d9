"""Demo diagnostics: how well the reward models and the selection find the defects the demo
world's oracle knows (data/synthesize/oracle.jsonl, written by `synthesize`).

Only the demo-only `diagnose` stage and benchmarks/ read the oracle; no method step does, so
editing it reruns nothing expensive. `diagnose` writes metrics/diagnose.json:

- `defect_auroc`: per defect type, the AUROC of clean records over records carrying it (the
  question score for question defects, the answer score for answer defects), and per turn.
- `defect_rates`: the share of records carrying each defect type (and `clean`: none) in the
  pool, after the question step (kept or dropped at the answer step, data/select/audit.jsonl)
  and in the selected set.
- counts, with the pool and selected records that have no oracle row (left out of the rates).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from align2llava.config import Section
from align2llava.demo.synthesis.params import QUESTION_DEFECTS
from align2llava.errors import DataError
from align2llava.steps.evaluation.ranking import auroc
from align2llava.steps.selection import parse_scores


class DiagnoseParams(Section):
    """The `diagnose:` section of params.yaml (demo diagnostics only)."""

    # The demo's defect oracle: which defects synthesize put in each pool record.
    oracle: str = "data/synthesize/oracle.jsonl"


# ----------------------------------------------------------------------------- the oracle


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def read_oracle(path: str | Path) -> dict[str, dict[str, Any]]:
    """The defect oracle, read strictly: {record id: {"id", "defects": [type, ...],
    "turn_defects": {"<turn>": [type, ...]}}}. A malformed row is a DataError naming it."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (the demo oracle is written by `synthesize`)") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    oracle: dict[str, dict[str, Any]] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {n} is not valid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {n}: expected an object, got {type(row).__name__}")
        rid = row.get("id")
        if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
            raise DataError(f"{path}: line {n}: missing or invalid 'id'")
        where = f"{path}: line {n} (id {rid})"
        if not _names(row.get("defects")):
            raise DataError(f"{where}: 'defects' must be a list of defect names")
        turns = row.get("turn_defects", {})
        if not isinstance(turns, dict) or not all(_names(v) for v in turns.values()):
            raise DataError(f"{where}: 'turn_defects' must map turn numbers to lists of defect names")
        if str(rid) in oracle:
            raise DataError(f"{where}: duplicate id")
        oracle[str(rid)] = {**row, "turn_defects": turns}
    return oracle


# ----------------------------------------------------------------------------- AUROC


def clean_flags(oracle: dict[str, dict[str, Any]]) -> dict[str, tuple[bool, bool]]:
    """{id: (no question defect, no defect at all)}: what select's `oracle` method ranks by."""
    return {rid: (not set(row["defects"]) & set(QUESTION_DEFECTS), not row["defects"])
            for rid, row in oracle.items()}


def defect_auroc(rows: Sequence[dict[str, Any]], oracle: dict[str, dict[str, Any]],
                 aggregate: str = "mean") -> dict[str, float]:
    """How well scores separate clean records from those with each defect type.

    `rows`: scores.jsonl rows; those without an oracle row are left out. `auroc_<type>`: AUROC
    of clean records (no defect) over records with that defect, using the question score for
    question defects and for answer defects the answer score `select` ranks by under `aggregate`
    (select.turn_aggregate; `ScoreRow.answer_key`). 1.0: every clean record scores above every
    defective one; 0.5: chance. `auroc_turn_<type>`: the same per turn with the best candidate's
    answer score, clean turns of clean records against the turns carrying the defect. Types
    without a defective or a clean record are left out.
    """
    scored = [r for r in rows if str(r["id"]) in oracle]
    types = sorted({t for r in scored for t in oracle[str(r["id"])]["defects"]})
    clean = [r for r in scored if not oracle[str(r["id"])]["defects"]]
    good_turns = [tt["scores"][tt["best"]] for r in clean for tt in r["turns"]]
    answer_key = {rid: row.answer_key(aggregate) for rid, row in parse_scores(list(scored)).items()}

    def key(r: dict[str, Any], t: str) -> float:
        return r["question_score"] if t in QUESTION_DEFECTS else answer_key[str(r["id"])]

    out: dict[str, float] = {}
    for t in types:
        bad = [key(r, t) for r in scored if t in oracle[str(r["id"])]["defects"]]
        out[f"auroc_{t}"] = round(auroc([key(r, t) for r in clean], bad), 4)
        bad_turns = [tt["scores"][tt["best"]] for r in scored for tt in r["turns"]
                     if t in oracle[str(r["id"])]["turn_defects"].get(str(tt["turn"]), [])]
        if bad_turns:
            out[f"auroc_turn_{t}"] = round(auroc(good_turns, bad_turns), 4)
    return {k: v for k, v in out.items() if not math.isnan(v)}


# ----------------------------------------------------------------------------- inputs


def record_ids(path: str | Path) -> list[str]:
    """The ids of the records in an instruction file (any format io reads), in file order;
    entries without one (the `score` stage rejected them) are left out."""
    from align2llava.data.io import read_records

    return [str(r["id"]) for r in read_records(path).records if isinstance(r, dict) and "id" in r]


def read_score_rows(path: str | Path) -> list[dict[str, Any]]:
    """data/score/scores.jsonl rows, checked as strictly as `select` checks them."""
    from align2llava.data.io import read_jsonl_strict

    rows = read_jsonl_strict(path)
    parse_scores(rows, str(path))
    for n, row in enumerate(rows, 1):
        if not all(isinstance(t.get("turn"), int) for t in row["turns"]):
            raise DataError(f"{path}: line {n} (id {row['id']}): every turn needs an integer 'turn'")
    return rows


def read_audit(path: str | Path) -> list[dict[str, Any]]:
    """data/select/audit.jsonl, read strictly (our own intermediate file)."""
    from align2llava.data.io import read_jsonl_strict

    rows = read_jsonl_strict(path)
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not {"id", "kept", "dropped_at"} <= set(row):
            raise DataError(f"{path}: row {n} lacks keys of id, kept, dropped_at")
    return rows


# ----------------------------------------------------------------------------- defect rates


def defect_rates(ids: Iterable[str], oracle: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Share of `ids` carrying each defect type (a record counts once per type it carries) and
    `clean`: the share with none. Every id must have an oracle row; none: {}."""
    ids = list(ids)
    counts: Counter[str] = Counter()
    for i in ids:
        counts.update(set(oracle[i]["defects"]) or {"clean"})
    return {k: counts[k] / len(ids) for k in sorted(counts)}


def diagnose(oracle: dict[str, dict[str, Any]], scores: Sequence[dict[str, Any]], pool_ids: Sequence[str],
             selected_ids: Sequence[str], audit: Sequence[dict[str, Any]], aggregate: str = "mean") -> dict[str, Any]:
    """metrics/diagnose.json: defect AUROC of the scores (record answer scores as `select`
    aggregates them, `aggregate`) and oracle defect rates of the pool, the question step's
    survivors and the selected set. Records without an oracle row are counted
    (`*_without_oracle`) and left out of the rates."""
    survived = [str(r["id"]) for r in audit if r["kept"] or r["dropped_at"] == "answer"]
    sets = {"pool": list(pool_ids), "question_kept": survived, "selected": list(selected_ids)}
    known = {name: [i for i in ids if i in oracle] for name, ids in sets.items()}
    return {
        "oracle_rows": len(oracle),
        "pool": len(sets["pool"]),
        "pool_without_oracle": len(sets["pool"]) - len(known["pool"]),
        "question_kept": len(sets["question_kept"]),
        "selected": len(sets["selected"]),
        "selected_without_oracle": len(sets["selected"]) - len(known["selected"]),
        "defect_auroc": defect_auroc(scores, oracle, aggregate),
        "defect_rates": {name: {k: round(v, 4) for k, v in defect_rates(ids, oracle).items()}
                         for name, ids in known.items()},
    }
