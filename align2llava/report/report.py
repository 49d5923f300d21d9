"""Build the curation report folder (index.html, thumbs/, ids/) from the pipeline's files.

    result = run_report(ReportInputs(pool=..., image_root=..., ...), ReportParams(), "reports/curation")

Reads the pool, data/score/scores.jsonl, data/select/audit.jsonl, data/restyle/log.jsonl and the
metrics files; metrics/evaluate.json, metrics/diagnose.json and reports/compression.csv only
when they exist. docs/report.md describes what the page shows and how the gallery samples.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from align2llava.config import Section
from align2llava.errors import DataError
from align2llava.report import data as D


class ReportParams(Section):
    """The `report:` section of params.yaml."""

    # Gallery, per task type and outcome: records nearest the cut, then records spread evenly
    # over the rest of that outcome's ranks.
    gallery_border: int = Field(6, ge=0, le=500)
    gallery_spread: int = Field(6, ge=0, le=500)
    # Restyle examples per outcome (accepted, and each rejection reason).
    restyle_examples: int = Field(6, ge=0, le=500)
    histogram_bins: int = Field(30, ge=1, le=200)
    # Longest side of a gallery thumbnail, pixels.
    thumbnail_px: int = Field(128, ge=16, le=1024)


@dataclass
class ReportInputs:
    pool: str | Path
    image_root: str | Path
    scores: str | Path = "data/score/scores.jsonl"
    audit: str | Path = "data/select/audit.jsonl"
    restyle_log: str | Path = "data/restyle/log.jsonl"
    curated: str | Path = "data/restyle/curated.json"
    metrics_dir: str | Path = "metrics"
    compression: str | Path | None = "reports/compression.csv"
    dvc_lock: str | Path | None = "dvc.lock"
    select_method: str = "reward"


@dataclass
class ReportResult:
    index: Path
    metrics: dict[str, Any]
    # Metrics files the report read, by stage name (for the pipeline's parent run in MLflow).
    stage_metrics: dict[str, dict[str, Any]]


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _lock_md5(entries: list[Any] | None, path: str | Path, root: Path) -> str | None:
    """The md5 dvc.lock records for `path` (lock paths are relative to the lock's folder)."""
    target = (root / path).resolve()
    for e in entries or []:
        if isinstance(e, dict) and e.get("path") and (root / str(e["path"])).resolve() == target:
            return e.get("md5")
    return None


def evaluation_freshness(lock: str | Path | None, curated: str | Path, evaluate_json: str | Path) -> tuple[str, str]:
    """Whether metrics/evaluate.json belongs to this curated set, by dvc.lock: ("current" |
    "stale" | "unknown", a sentence). `report` does not depend on evaluate (so it runs without a
    fine-tune); this says whether the numbers shown are of this curation or an earlier one."""
    import yaml

    if lock is None or not Path(lock).is_file() or not Path(curated).is_file():
        return "unknown", "Freshness unknown: no dvc.lock or no curated set to compare with."
    try:
        stages = (yaml.safe_load(Path(lock).read_text(encoding="utf-8")) or {}).get("stages", {})
    except yaml.YAMLError:
        return "unknown", f"Freshness unknown: {lock} is not valid YAML."
    ft, ev = stages.get("finetune") or {}, stages.get("evaluate") or {}
    root = Path(lock).resolve().parent
    trained_on = _lock_md5(ft.get("deps"), curated, root)
    model = _lock_md5(ft.get("outs"), "models/finetune", root)
    evaluated = _lock_md5(ev.get("deps"), "models/finetune", root)
    written = _lock_md5(ev.get("outs"), evaluate_json, root)
    if not (trained_on and model and evaluated):
        return "unknown", "Freshness unknown: dvc.lock has no finetune/evaluate entries to compare."
    if trained_on != _md5(Path(curated)) or model != evaluated or (
        written and Path(evaluate_json).is_file() and written != _md5(Path(evaluate_json))
    ):
        return "stale", ("STALE: these numbers are of a model fine-tuned on another curated set "
                         "(dvc.lock); run `dvc repro` to fine-tune and evaluate this one.")
    return "current", "Current: the evaluated model was fine-tuned on this report's curated set (dvc.lock)."


def _clear(out: Path) -> None:
    """Remove what an earlier report left (only the report's own files)."""
    for sub in ("thumbs", "ids"):
        if (out / sub).is_dir():
            shutil.rmtree(out / sub)
    if (out / "index.html").exists():
        (out / "index.html").unlink()


def _folder_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def run_report(inputs: ReportInputs, params: ReportParams, out_dir: str | Path = "reports/curation") -> ReportResult:
    """Join the pipeline's files by id, compute the report's numbers and write the folder."""
    from align2llava.data.io import read_jsonl_strict, read_records
    from align2llava.report.assets import Thumbnails, write_id_index
    from align2llava.report.html import render_page
    from align2llava.steps.selection import parse_scores

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear(out)

    entries = D.check_audit(read_jsonl_strict(inputs.audit), str(inputs.audit))
    joined = D.join(entries)
    pool = {str(r["id"]): r for r in read_records(inputs.pool).records if isinstance(r, dict) and "id" in r}
    missing = next((e.id for e in entries if e.id not in pool), None)
    if missing is not None:
        raise DataError(f"{inputs.audit}: id {missing} is not in the pool {inputs.pool} "
                        "(was the audit made from another pool?)")
    if len(pool) != len(entries):
        extra = next(i for i in pool if i not in {e.id for e in entries})
        raise DataError(f"{inputs.pool}: id {extra} has no row in {inputs.audit} (rerun select)")
    score_rows = read_jsonl_strict(inputs.scores)
    parse_scores(score_rows, str(inputs.scores))  # the checks `select` makes
    scores = {str(r["id"]): r for r in score_rows}

    log_rows: list[dict[str, Any]] | None = None
    if Path(inputs.restyle_log).is_file():
        log_rows = D.check_restyle_log(read_jsonl_strict(inputs.restyle_log), str(inputs.restyle_log))
        kept_ids = {e.id for e in entries if e.outcome == "kept"}
        stray = next((r["id"] for r in log_rows if str(r["id"]) not in kept_ids), None)
        if stray is not None:
            raise DataError(f"{inputs.restyle_log}: id {stray} was not kept by select (a restyle log of another selection?)")
    rewrites: dict[str, int] = {}
    for r in log_rows or []:
        rewrites[str(r["id"])] = rewrites.get(str(r["id"]), 0) + (r["kept"] == "rewrite")

    # Histograms and cut-offs, per scope: all types, then each type.
    scopes = {"all types": entries} | {t: [e for e in entries if e.task == t] for t in joined.tasks}
    hists = {s: {k: D.histogram(es, k, params.histogram_bins) for k in D.KINDS} for s, es in scopes.items()}
    cuts = {s: ({k: D.cutoff(es, k) for k in D.KINDS} if s in joined.counts else {}) for s, es in scopes.items()}

    thumbs = Thumbnails(inputs.image_root, out, params.thumbnail_px)
    cards = []
    for e in D.sample_gallery(joined, params.gallery_border, params.gallery_spread):
        rec = pool[e.id]
        cards.append({**vars(e), "image": rec.get("image"), "thumb": thumbs.get(rec.get("image")),
                      "turns": D.record_turns(rec, scores.get(e.id)),
                      "rewrites": rewrites.get(e.id) if e.outcome == "kept" and log_rows else None})

    tasks = joined.tasks
    task_no, outcome_no = {t: i for i, t in enumerate(tasks)}, {o: i for i, o in enumerate(D.OUTCOMES)}
    index_rows = {e.id: [task_no[e.task], outcome_no[e.outcome], e.question_score, e.q_rank, e.answer_score,
                         e.a_rank, rewrites.get(e.id, -1) if log_rows else -1] for e in entries}
    shards = write_id_index(index_rows, out)

    mdir = Path(inputs.metrics_dir)
    read = {name: D.read_json_optional(mdir / f"{name}.json")
            for name in ("select", "score", "train_reward", "restyle", "evaluate", "diagnose")}
    evaluate = None
    if read["evaluate"] is not None:
        state, sentence = evaluation_freshness(inputs.dvc_lock, inputs.curated, mdir / "evaluate.json")
        evaluate = {"metrics": read["evaluate"], "freshness": sentence, "state": state}
    restyle_examples = D.restyle_examples(log_rows, params.restyle_examples) if log_rows else []
    model = {
        "pool": str(inputs.pool), "method": inputs.select_method, "counts": joined.counts, "total": joined.total(),
        "hists": hists, "cuts": cuts, "cards": cards, "border": params.gallery_border, "spread": params.gallery_spread,
        "restyle": D.restyle_summary(log_rows) if log_rows is not None else None,
        "restyle_examples": restyle_examples, "restyle_metrics": read["restyle"],
        "rm": D.rm_validation(read["train_reward"]), "evaluate": evaluate,
        "diagnostics": D.demo_diagnostics(read["diagnose"], read["score"]),
        "compression": D.read_csv_optional(inputs.compression), "shards": shards, "tasks": tasks,
    }
    index = out / "index.html"
    index.write_text(render_page(model), encoding="utf-8")

    total = joined.total()
    metrics = {
        "index": index.as_posix(), "records": total.pool, "kept": total.kept, "gallery_cards": len(cards),
        "restyle_examples": len(restyle_examples), "thumbnails": sum(v is not None for v in thumbs.done.values()),
        "images_missing": len(thumbs.missing), "id_shards": shards,
        "index_bytes": index.stat().st_size, "folder_bytes": _folder_bytes(out),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if evaluate is not None:
        metrics["evaluate_freshness"] = evaluate["state"]
    stage_metrics = {k: v for k, v in read.items() if v is not None and not (k == "evaluate" and evaluate["state"] == "stale")}
    return ReportResult(index, metrics, stage_metrics)
