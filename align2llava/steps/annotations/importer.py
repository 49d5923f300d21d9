"""Human preference annotations -> strict (chosen, rejected) pairs for the reward models.

Three inputs, one output (docs/formats.md, data/annotate_import/pairs.jsonl):
- `align2llava`: the paper's released files. Questions: a JSON list of
  {"id", "image", "questions": [[q, ...], ...], "score": [s, ...]}, each candidate being all human
  turns of an instruction. Answers: LLaVA records whose gpt turns may hold a list of candidate
  answers with a parallel "score" list.
- `labelstudio`: a Label Studio JSON export as Label Studio writes it, of the tasks that
  `annotation-tasks` writes (or of the older own variant with data.group / data.candidates);
  align2llava/steps/annotations/labelstudio.py documents what is read. Several annotators of a
  task are averaged per candidate (mean); their agreement is Krippendorff's alpha (interval) over
  the candidates rated by two or more (`agreement_alpha`). With `tasks` (the tasks file), every
  exported task must match one of its tasks.
- `table`: CSV or JSONL rows {group, image, kind, candidate, score, prompt}; one row per candidate.

Every two candidates of one group whose scores differ make exactly one pair (chosen = higher
score, margin = the gap); ties make none. The train/val split is by image. Bad rows go to a
Rejects list with the reason; past the budget the import fails.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from align2llava.config import Section
from align2llava.data.io import read_jsonl_strict
from align2llava.data.rejects import Rejects
from align2llava.errors import DataError
from align2llava.steps.annotations.agreement import krippendorff_alpha_interval
from align2llava.steps.annotations.labelstudio import ExportStats, read_labelstudio, read_tasks_file
from align2llava.steps.annotations.readers import (
    KINDS,
    TIE_EPS,
    Group,
    read_answer_file,
    read_question_file,
    read_table,
)

log = logging.getLogger(__name__)

FORMATS = ("align2llava", "labelstudio", "table")


class AnnotateImportParams(Section):
    """The `annotate_import` section of params.yaml."""

    # align2llava: `questions` + `answers` files (null: none of that kind); labelstudio / table:
    # the `input` file. No default file: params.yaml names the demo's, and a key left out must
    # not read the demo's annotations into a user's pairs.
    format: Literal["align2llava", "labelstudio", "table"] = "labelstudio"
    questions: str | None = None
    answers: str | None = None
    input: str | None = None
    # labelstudio: the tasks file the export came from (annotation-tasks writes it); every
    # exported task must be one of its tasks. null: not checked.
    tasks: str | None = None
    # Label Studio rating scale: 1..rating_max maps to [0, 1].
    rating_max: int = Field(5, ge=2)
    # Fraction of images (with all their pairs) held out for validation.
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    # Rejected rows allowed per input file: a fraction (< 1) or a count (>= 1).
    reject_budget: float = Field(0.01, ge=0.0)
    # Reject rows whose image is not a file under base.image_root.
    check_images: bool = True


@dataclass
class ImportResult:
    pairs: list[dict[str, Any]]
    groups: list[Group]
    ties: dict[str, int]
    rejects: list[Rejects] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)
    export: ExportStats | None = None

    def metrics(self) -> dict[str, Any]:
        m: dict[str, Any] = {}
        for kind in KINDS:
            m[f"pairs_{kind}"] = sum(p["kind"] == kind for p in self.pairs)
            m[f"groups_{kind}"] = sum(g.kind == kind for g in self.groups)
            m[f"ties_dropped_{kind}"] = self.ties.get(kind, 0)
        for split in ("train", "val"):
            m[f"pairs_{split}"] = sum(p["split"] == split for p in self.pairs)
        m["pairs"] = len(self.pairs)
        m["ties_dropped"] = sum(self.ties.values())
        m["rejected_rows"] = sum(r.count for r in self.rejects)
        m["input_rows"] = sum(self.totals.values())
        m["images_val"] = len({p["image"] for p in self.pairs if p["split"] == "val"})
        m["images_train"] = len({p["image"] for p in self.pairs if p["split"] == "train"})
        if self.export is not None:
            m.update(self.export.metrics())
            m.update(agreement(self.groups))
        return m


def agreement(groups: Iterable[Group]) -> dict[str, Any]:
    """Krippendorff's alpha (interval) over candidates with two or more ratings, all and per kind.

    A unit is one candidate of one group; its values are the annotators' scores. None when no
    candidate was rated twice (one annotator per task) or all ratings are equal.
    """
    units: dict[str, list[list[float]]] = {k: [] for k in KINDS}
    for g in groups:
        if len(g.ratings) >= 2:
            units[g.kind] += [[r[k] for r in g.ratings] for k in range(len(g.candidates))]
    out: dict[str, Any] = {"agreement_units": sum(len(u) for u in units.values())}
    alpha = krippendorff_alpha_interval(units["question"] + units["answer"])
    out["agreement_alpha"] = None if alpha is None else round(alpha, 4)
    for kind in KINDS:
        a = krippendorff_alpha_interval(units[kind])
        out[f"agreement_alpha_{kind}"] = None if a is None else round(a, 4)
    return out


# ----------------------------------------------------------------------------- pairs


def strict_pairs(groups: Iterable[Group]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Every two candidates with strictly different scores -> one pair; counts ties per kind."""
    pairs: list[dict[str, Any]] = []
    ties = {k: 0 for k in KINDS}
    for g in groups:
        n = len(g.candidates)
        for i in range(n):
            for j in range(i + 1, n):
                gap = g.scores[i] - g.scores[j]
                if abs(gap) <= TIE_EPS:
                    ties[g.kind] += 1
                    continue
                c, r = (i, j) if gap > 0 else (j, i)
                pairs.append(
                    {
                        "id": f"{g.kind}:{g.group}:{c}>{r}",
                        "group": g.group,
                        "image": g.image,
                        "kind": g.kind,
                        "prompt": g.prompt,
                        "chosen": g.candidates[c],
                        "rejected": g.candidates[r],
                        "margin": round(abs(gap), 6),
                    }
                )
    return pairs, ties


def split_images(images: Iterable[str], val_fraction: float, seed: int) -> set[str]:
    """The validation images: a seeded hash order of the unique images, first round(n*f) of it."""
    uniq = sorted(set(images))
    ranked = sorted(uniq, key=lambda im: hashlib.sha1(f"{seed}:{im}".encode()).hexdigest())
    n_val = round(len(uniq) * val_fraction)
    if val_fraction > 0 and n_val == 0 and len(uniq) > 1:
        n_val = 1
    return set(ranked[:n_val])


def import_annotations(
    fmt: str,
    *,
    questions: str | Path | None = None,
    answers: str | Path | None = None,
    input: str | Path | None = None,
    tasks: str | Path | None = None,
    out_dir: str | Path,
    image_root: str | Path | None = None,
    rating_max: int = 5,
    val_fraction: float = 0.2,
    seed: int = 0,
    reject_budget: float = 0.01,
) -> ImportResult:
    """Read annotations, write OUT_DIR/pairs.jsonl and OUT_DIR/rejects.jsonl, return a summary.

    The rejects file is written before the budget is checked, so a failing import leaves it.
    """
    out_dir = Path(out_dir)
    groups: list[Group] = []
    all_rejects: list[Rejects] = []
    totals: dict[str, int] = {}
    export: ExportStats | None = None

    def run(reader: Any, path: str | Path | None, what: str, *extra: Any) -> None:
        if path is None:
            return
        rej = Rejects(str(path), reject_budget)
        found, total = reader(path, rej, image_root, *extra)
        log.info("%s: %d %s groups from %d rows (%d rejected)", path, len(found), what, total, rej.count)
        groups.extend(found)
        all_rejects.append(rej)
        totals[str(path)] = total

    if fmt == "align2llava":
        if questions is None and answers is None:
            raise DataError("format align2llava needs a questions file, an answers file or both")
        run(read_question_file, questions, "question")
        run(read_answer_file, answers, "answer")
    elif fmt == "labelstudio":
        if input is None:
            raise DataError("format labelstudio needs an input file")
        export = ExportStats()
        ref = read_tasks_file(tasks) if tasks is not None else None
        run(read_labelstudio, input, "task", rating_max, ref, export)
        log.info("%s: %d annotations (%d cancelled) by %d annotators; %d tasks not annotated, %d skipped",
                 input, export.annotations, export.cancelled, len(export.annotators), export.unannotated,
                 export.skipped)
    elif fmt == "table":
        if input is None:
            raise DataError("format table needs an input file")
        run(read_table, input, "table")
    else:
        raise DataError(f"unknown annotation format '{fmt}' (choose from {', '.join(FORMATS)})")

    rejects_path = out_dir / "rejects.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(rejects_path, "w", encoding="utf-8") as f:
        for rej in all_rejects:
            f.writelines(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rej.rows)
    for rej in all_rejects:
        rej.check(totals[rej.file], rejects_path)

    pairs, ties = strict_pairs(groups)
    if not pairs:
        raise DataError("the annotations give no pair with different scores; nothing to train on")
    val_images = split_images((p["image"] for p in pairs), val_fraction, seed)
    for p in pairs:
        p["split"] = "val" if p["image"] in val_images else "train"
    tmp = out_dir / "pairs.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    tmp.replace(out_dir / "pairs.jsonl")
    return ImportResult(pairs, groups, ties, all_rejects, totals, export)


# ----------------------------------------------------------------------------- reading pairs

PAIR_KEYS = ("id", "group", "image", "kind", "prompt", "chosen", "rejected", "margin", "split")


def read_pairs(path: str | Path) -> list[dict[str, Any]]:
    """pairs.jsonl, read strictly (our own intermediate file)."""
    def problem(p: dict[str, Any]) -> str | None:
        if p["kind"] not in KINDS or p["split"] not in ("train", "val"):
            return f"has kind {p['kind']!r} / split {p['split']!r}"
        return None

    return read_jsonl_strict(path, required=PAIR_KEYS, check=problem, missing_hint="run annotate-import first")


__all__ = [
    "AnnotateImportParams",
    "agreement",
    "Group",
    "ImportResult",
    "import_annotations",
    "read_pairs",
    "split_images",
    "strict_pairs",
]
