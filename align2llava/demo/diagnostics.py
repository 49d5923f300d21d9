"""Demo diagnostics: how well scores find the defects the demo world's oracle knows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from align2llava.steps.scoring import QUESTION_DEFECTS

# ----------------------------------------------------------------------------- diagnosis


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties one half (Mann-Whitney)."""
    if not positive or not negative:
        return float("nan")
    neg = sorted(negative)
    import bisect

    wins = 0.0
    for p in positive:
        lo = bisect.bisect_left(neg, p)
        hi = bisect.bisect_right(neg, p)
        wins += lo + 0.5 * (hi - lo)
    return wins / (len(positive) * len(negative))


def read_oracle(path: str | Path) -> dict[str, dict[str, Any]]:
    """The demo's defect oracle (synthesize's oracle.jsonl): {record id: row with "defects",
    "turn_defects"}."""
    oracle: dict[str, dict[str, Any]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            o = json.loads(line)
            oracle[str(o["id"])] = o
    return oracle


def defect_auroc(rows: Sequence[dict[str, Any]], oracle_path: str | Path) -> dict[str, float]:
    """How well scores separate clean records from those with each defect type (demo oracle).

    `auroc_<type>`: AUROC of clean records (no defect) over records with that defect, using
    the question score for question defects and the answer score for answer defects (1.0:
    every clean record scores above every defective one; 0.5: chance). `auroc_turn_<type>`:
    the same per turn with the best candidate's answer score, clean turns of clean records
    against the turns carrying the defect.
    """
    oracle = read_oracle(oracle_path)
    types = sorted({t for o in oracle.values() for t in o.get("defects", [])})
    out: dict[str, float] = {}
    scored = [r for r in rows if str(r["id"]) in oracle]
    clean = [r for r in scored if not oracle[str(r["id"])].get("defects")]
    for t in types:
        key = "question_score" if t in QUESTION_DEFECTS else "answer_score"
        bad = [r[key] for r in scored if t in oracle[str(r["id"])].get("defects", [])]
        out[f"auroc_{t}"] = round(auroc([r[key] for r in clean], bad), 4)
        good_turns = [tt["scores"][tt["best"]] for r in clean for tt in r["turns"]]
        bad_turns = [tt["scores"][tt["best"]] for r in scored for tt in r["turns"]
                     if t in oracle[str(r["id"])].get("turn_defects", {}).get(str(tt["turn"]), [])]
        if bad_turns:
            out[f"auroc_turn_{t}"] = round(auroc(good_turns, bad_turns), 4)
    return {k: v for k, v in out.items() if not math.isnan(v)}
