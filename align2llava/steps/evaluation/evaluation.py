"""Evaluate an HF-layout LLaVA: the demo benchmark, the POPE-style probe, a user eval file.

    items = read_benchmark("vqa.jsonl", source="vqa")
    preds = generate_answers(model, processor, items, image_root="images", batch_size=32)
    metrics = benchmark_metrics(score_items(items, preds))

Generation is batched and greedy, optionally with a short-answer instruction after each question
(LLaVA-1.5's "Answer the question using a single word or phrase."). Answers are compared after
the VQA normalisation (lower case, punctuation, articles, number words -> digits).

- Benchmark rows (`{"id", "image", "question", "answer", "type"}`): the answer is *extracted*
  from the generation: the answer of that question type (the set of gold answers of the type
  in the file) that occurs first as whole words; yes/no questions use the POPE rule below.
  `benchmark_accuracy` counts extracted == gold; `benchmark_exact_match` counts a normalised
  generation equal to the gold answer.
- POPE (`pope.jsonl`, answers yes/no): the official POPE rule: the first of "yes"/"no" in the
  answer, else "no" when it says "not", else "yes". Accuracy, precision/recall/F1 with "yes" as
  the positive class, and the share of "yes" answers.
- A user eval file in LLaVA format: every (question, gold answer) turn is one single-turn
  question with the record's image; a gold answer may be a list (several annotators).
  `eval_exact_match`: the stripped generation equals a gold answer; `eval_vqa_accuracy`:
  min(1, #normalised matches / min(3, #gold)) (the VQA metric; exact normalised match when
  there is one gold answer).

Next to generation, likelihood scoring (likelihood.py; `likelihood: true`) ranks each benchmark
and POPE question's candidate answers by the model's summed log-probability of saying them, as
multiple-choice MLLM benchmarks (MMBench, SEED-Bench) score: the candidates of a benchmark
question are the gold answers of its type in the file (yes/no for yes/no questions and POPE).
Each candidate is scored as the assistant's whole short reply (`reply_format`, default
"{Answer}": "Circle", "Yes"; the form the model was tuned to give short answers in), after the
same user message, through the checkpoint's own chat template, its end-of-turn token included
(the span finetune trains on); summed, not length-normalised, and not calibrated against a
no-image prior. The ranked choice is scored by the
same modules: `benchmark_likelihood_accuracy` (+ per type), `pope_likelihood_accuracy`/precision/
recall/f1/yes_ratio. A user eval file has no candidate set and gets no likelihood scores.

The answer rules live in answers.py; the accuracies and the POPE figures are computed by the
Hugging Face `evaluate` modules in metrics/ (vqa_accuracy, pope), loaded by path
(`load_metric`), which users can load from their own code (docs/evaluation-metrics.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator

from align2llava.config import Section
from align2llava.data.records import SHORT_ANSWER
from align2llava.errors import DataError
from align2llava.steps.evaluation.answers import extract_answer, normalize, vqa_accuracy, yes_no
from align2llava.steps.evaluation.likelihood import REPLY_FORMAT, candidate_sets, rank_candidates, reply_text
from align2llava.steps.evaluation.ranking import auroc

log = logging.getLogger(__name__)

YES_NO_TYPES = {"yes_no", "pope"}
BENCHMARK_KEYS = ("id", "image", "question", "answer", "type")
# The Hugging Face `evaluate` modules the metrics are computed with (docs/evaluation-metrics.md).
METRICS_DIR = Path(__file__).resolve().parent / "metrics"


class EvaluateParams(Section):
    """The `evaluate:` section (defaults: params.yaml's values, kept equal by a test)."""

    batch_size: int = 32
    max_new_tokens: int = 16
    # Appended to every question ("" for none). LLaVA-1.5 evaluates with SHORT_ANSWER, the
    # instruction of the short-answer VQA data in its training mix (the demo pool's vqa task).
    instruction: str = SHORT_ANSWER
    vqa_file: str | None = "data/synthesize/benchmark/vqa.jsonl"
    pope_file: str | None = "data/synthesize/benchmark/pope.jsonl"
    # Folder the benchmark's image paths are relative to; null: base.image_root.
    image_root: str | None = None
    # A user eval file in LLaVA format (any format io reads) with gold answers in the gpt turns.
    eval_file: str | None = None
    eval_image_root: str | None = None
    reject_budget: float = 0.01
    # Evaluate at most this many rows of each file (null: all); for quick looks only.
    limit: int | None = None
    # Also rank each benchmark/POPE question's candidate answers by log-likelihood (likelihood.py).
    likelihood: bool = True
    # The reply a candidate is scored as: {answer} as written, {Answer} capitalised.
    reply_format: str = REPLY_FORMAT
    # What of each candidate reply is scored: "turn" (the whole turn, end of turn included) or
    # "start" (its own tokens: p(the reply begins with it), e.g. p(Yes) vs p(No)).
    likelihood_span: Literal["turn", "start"] = "turn"
    # none: raw log-probabilities; no_image: less the same reply's without the image (calibrated).
    likelihood_prior: Literal["none", "no_image"] = "none"

    @field_validator("reply_format")
    @classmethod
    def _reply_format(cls, v: str) -> str:
        reply_text("red", v)  # a ValueError names what is wrong
        return v


@dataclass
class Item:
    id: str
    source: str  # vqa | pope | eval
    type: str
    question: str
    answers: list[str]
    image: str | None
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- inputs


def read_benchmark(path: str | Path, source: str, limit: int | None = None) -> list[Item]:
    """Benchmark rows, read strictly (our own file): any bad row is an error naming it."""
    from align2llava.data.io import read_jsonl_strict

    rows = read_jsonl_strict(path)
    items = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        where = f"{path}: record {i}" + (f" (id {row.get('id')})" if isinstance(row, dict) else "")
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object")
        missing = [k for k in BENCHMARK_KEYS if k not in row]
        if missing:
            raise DataError(f"{where}: missing {', '.join(repr(k) for k in missing)}")
        bad = [k for k in BENCHMARK_KEYS if not isinstance(row[k], str) or not row[k].strip()]
        if bad:
            raise DataError(f"{where}: {', '.join(repr(k) for k in bad)} must be non-empty strings")
        if row["id"] in seen:
            raise DataError(f"{where}: duplicate id")
        seen.add(row["id"])
        if source == "pope" and normalize(row["answer"]) not in ("yes", "no"):
            raise DataError(f"{where}: a POPE answer must be yes or no, got {row['answer']!r}")
        items.append(Item(row["id"], source, row["type"], row["question"], [row["answer"]], row["image"]))
    if not items:
        raise DataError(f"{path}: no rows")
    return items[:limit] if limit else items


def read_eval_file(path: str | Path, image_root: str | Path | None, budget: float, limit: int | None = None):
    """Questions with gold answers from a user's LLaVA file, against a reject budget.

    Returns (items, rejects). A record is rejected (with its reason) when it breaks the LLaVA
    contract; gpt values may be lists of gold answers.
    """
    from align2llava.data.io import read_records
    from align2llava.data.records import record_problems
    from align2llava.data.rejects import Rejects

    loaded = read_records(path)
    rejects = Rejects(str(path), budget)
    for p in loaded.problems:
        rejects.add_problem(p)
    items: list[Item] = []
    for idx, rec in zip(loaded.indices, loaded.records):
        problems = record_problems(rec, image_root=image_root, allow_candidates=True)
        if problems:
            rejects.add(idx, rec.get("id") if isinstance(rec, dict) else None, "; ".join(problems), rec)
            continue
        convs = rec["conversations"]
        for k in range(0, len(convs), 2):
            gold = convs[k + 1]["value"]
            items.append(Item(
                id=f"{rec['id']}#{k // 2}" if len(convs) > 2 else str(rec["id"]),
                source="eval",
                type=str(rec.get("task") or rec.get("type") or "eval"),
                question=convs[k]["value"],
                answers=gold if isinstance(gold, list) else [gold],
                image=rec.get("image"),
            ))
    rejects.check(len(loaded.records) + len(loaded.problems))
    if not items:
        raise DataError(f"{path}: no questions to evaluate")
    return (items[:limit] if limit else items), rejects


# ---------------------------------------------------------------------------- generation


def generate_answers(
    model: Any,
    processor: Any,
    items: list[Item],
    *,
    image_root: str | Path | None,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    instruction: str = "",
) -> list[str]:
    """Batched greedy generation (left padding); one answer string per item."""
    import torch

    from align2llava.progress import Progress
    from align2llava.steps.evaluation.prompts import encode_prompts

    tok = processor.tokenizer
    model.eval()
    answers: list[str] = []
    progress = Progress(len(items), "generate", "q", log)
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        inputs = encode_prompts(model, processor, batch, image_root=image_root, instruction=instruction)
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        new = out[:, inputs["input_ids"].shape[1] :]
        answers += [a.strip() for a in tok.batch_decode(new, skip_special_tokens=True)]
        progress.update(len(batch), **{"prompt tok": int(inputs["attention_mask"].sum()),
                                       "generated tok": int((new != tok.pad_token_id).sum())})
    progress.close()
    return answers


# ---------------------------------------------------------------------------- scoring


def score_items(items: list[Item], predictions: list[str]) -> list[dict[str, Any]]:
    """One prediction row per item, with the extracted answer and whether it is right."""
    if len(items) != len(predictions):
        raise ValueError("one prediction per item expected")
    by_type: dict[str, set[str]] = {}
    for it in items:
        by_type.setdefault(it.type, set()).update(it.answers)
    rows = []
    for it, pred in zip(items, predictions):
        gold = it.answers[0]
        row: dict[str, Any] = {
            "id": it.id, "source": it.source, "type": it.type, "image": it.image,
            "question": it.question, "answer": gold if len(it.answers) == 1 else it.answers,
            "prediction": pred,
        }
        if it.source == "eval":
            row["exact_match"] = any(pred.strip() == a.strip() for a in it.answers)
            row["vqa_accuracy"] = vqa_accuracy(pred, it.answers)
        else:
            if it.type in YES_NO_TYPES or it.source == "pope":
                extracted = yes_no(pred)
            else:
                extracted = extract_answer(pred, by_type[it.type])
            row["extracted"] = extracted
            row["correct"] = extracted == normalize(gold)
            row["exact_match"] = normalize(pred) == normalize(gold)
        rows.append(row)
    return rows


def metric_path(name: str) -> str:
    """The folder of one of the Hugging Face `evaluate` modules kept in this package
    (metrics/vqa_accuracy, metrics/pope), for `evaluate.load(metric_path(name))`."""
    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        raise DataError(f"no evaluate module '{name}' in {METRICS_DIR} (have: vqa_accuracy, pope)")
    return str(path)


def load_metric(name: str) -> Any:
    """One of this package's `evaluate` modules, loaded by path: nothing from the Hub, works
    offline; evaluate copies the script into HF_HOME/modules to import it."""
    import evaluate

    return evaluate.load(metric_path(name), keep_in_memory=True)


def _mean(xs: list[float]) -> float:
    return round(sum(xs) / len(xs), 4) if xs else 0.0


def _references(rows: list[dict[str, Any]]) -> list[list[str]]:
    return [[r["answer"]] if isinstance(r["answer"], str) else list(r["answer"]) for r in rows]


def _accuracy(vqa: Any, rows: list[dict[str, Any]], key: str) -> float:
    """VQA accuracy (the vqa_accuracy module) of the answers in `key` against the gold answers."""
    score = vqa.compute(predictions=[r[key] for r in rows], references=_references(rows))
    return round(score["vqa_accuracy"], 4)


def benchmark_metrics(rows: list[dict[str, Any]], prefix: str = "benchmark") -> dict[str, Any]:
    """Accuracy (the extracted answer, by the vqa_accuracy module: normalised match with the one
    gold answer) overall and per question type, and exact match (the whole generation)."""
    if not rows:
        return {}
    vqa = load_metric("vqa_accuracy")

    def accuracy(subset: list[dict[str, Any]], key: str) -> float:
        return _accuracy(vqa, subset, key)

    out: dict[str, Any] = {
        f"{prefix}_accuracy": accuracy(rows, "extracted"),
        f"{prefix}_exact_match": accuracy(rows, "prediction"),
        f"{prefix}_count": len(rows),
    }
    for t in sorted({r["type"] for r in rows}):
        out[f"{prefix}_accuracy_{t}"] = accuracy([r for r in rows if r["type"] == t], "extracted")
    return out


def pope_metrics(rows: list[dict[str, Any]], prefix: str = "pope", key: str = "prediction") -> dict[str, Any]:
    """POPE (the pope module) of the answers in `key`: accuracy, precision/recall/F1 of "yes",
    the share of "yes" answers."""
    if not rows:
        return {}
    m = load_metric("pope").compute(predictions=[r[key] for r in rows],
                                    references=[r["answer"] for r in rows])
    out = {f"{prefix}_{k}": round(m[k], 4) for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
    return {**out, f"{prefix}_count": len(rows)} if key == "prediction" else out


def likelihood_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The ranked choices (`likelihood_choice`) by the same modules: benchmark_likelihood_accuracy
    overall and per type, pope_likelihood_accuracy/precision/recall/f1/yes_ratio."""
    vqa = [r for r in rows if r["source"] == "vqa" and "likelihood_choice" in r]
    out: dict[str, Any] = {}
    if vqa:
        acc, key = load_metric("vqa_accuracy"), "likelihood_choice"
        out["benchmark_likelihood_accuracy"] = _accuracy(acc, vqa, key)
        for t in sorted({r["type"] for r in vqa}):
            out[f"benchmark_likelihood_accuracy_{t}"] = _accuracy(acc, [r for r in vqa if r["type"] == t], key)
    pope = [r for r in rows if r["source"] == "pope" and "likelihood_choice" in r]
    out.update(pope_metrics(pope, "pope_likelihood", "likelihood_choice"))
    auroc = yes_margin_auroc(pope)
    if auroc is not None:
        out["pope_likelihood_auroc"] = auroc
    return out


def yes_margin_auroc(rows: list[dict[str, Any]]) -> float | None:
    """How well score(yes) - score(no) ranks present probes above absent ones, whatever the
    threshold (0.5: the margin knows nothing of the image; 1: perfect). None without both."""
    margins = {"yes": [], "no": []}
    for r in rows:
        s = r.get("likelihood_scores") or {}
        if "yes" in s and "no" in s and normalize(r["answer"]) in margins:
            margins[normalize(r["answer"])].append(s["yes"] - s["no"])
    if not margins["yes"] or not margins["no"]:
        return None
    return round(auroc(margins["yes"], margins["no"]), 4)


def eval_file_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A user eval file: exact match of the stripped generation, VQA accuracy (the module)."""
    if not rows:
        return {}
    vqa = load_metric("vqa_accuracy").compute(predictions=[r["prediction"] for r in rows],
                                              references=_references(rows))
    return {
        "eval_exact_match": _mean([float(r["exact_match"]) for r in rows]),
        "eval_vqa_accuracy": round(vqa["vqa_accuracy"], 4),
        "eval_count": len(rows),
    }


# ---------------------------------------------------------------------------- the whole step


@dataclass
class EvaluateResult:
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]
    rejects: Any = None


def evaluate(
    params: EvaluateParams,
    *,
    model_dir: str | Path,
    image_root: str | Path,
    dtype: str = "auto",
) -> EvaluateResult:
    """Evaluate the model in `model_dir` on every file `params` names."""
    import torch

    from align2llava.models.loading import load_mllm
    from align2llava.models.precision import resolve
    from align2llava.models.runtime import cpu_seconds, peak_memory_mb

    root = Path(params.image_root or image_root)
    sets: list[tuple[list[Item], Path | None]] = []
    if params.vqa_file:
        sets.append((read_benchmark(params.vqa_file, "vqa", params.limit), root))
    if params.pope_file:
        sets.append((read_benchmark(params.pope_file, "pope", params.limit), root))
    rejects = None
    if params.eval_file:
        eval_root = Path(params.eval_image_root) if params.eval_image_root else None
        items, rejects = read_eval_file(params.eval_file, eval_root, params.reject_budget, params.limit)
        sets.append((items, eval_root))
    if not sets:
        raise DataError("evaluate: nothing to evaluate (vqa_file, pope_file and eval_file are all null)")

    device = "cuda" if torch.cuda.is_available() else None
    # auto: bf16 on a GPU, float32 on a CPU (models.precision says why)
    weights = resolve(dtype, device or "cpu", "evaluate").weights
    model, processor = load_mllm(model_dir, dtype=weights, device=device)
    t0, c0 = time.perf_counter(), cpu_seconds()
    rows: list[dict[str, Any]] = []
    for items, item_root in sets:
        preds = generate_answers(
            model, processor, items, image_root=item_root, batch_size=params.batch_size,
            max_new_tokens=params.max_new_tokens, instruction=params.instruction,
        )
        rows += score_items(items, preds)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    t1 = time.perf_counter()
    for items, item_root in sets if params.likelihood else []:
        if items[0].source == "eval":  # free-form gold answers: no candidate set
            continue
        ranked = rank_candidates(
            model, processor, items, candidate_sets(items, YES_NO_TYPES), image_root=item_root,
            batch_size=params.batch_size, instruction=params.instruction, reply_format=params.reply_format,
            span=params.likelihood_span, prior=params.likelihood_prior,
        )
        by_id = {r["id"]: r for r in rows if r["source"] == items[0].source}
        for it, rank in zip(items, ranked):
            by_id[it.id]["likelihood_choice"] = rank["likelihood_choice"]
            by_id[it.id]["likelihood_scores"] = {c: round(s, 4) for c, s in rank["likelihood_scores"].items()}
            if "likelihood_blind_scores" in rank:
                by_id[it.id]["likelihood_blind_scores"] = {c: round(s, 4) for c, s in rank["likelihood_blind_scores"].items()}
    metrics: dict[str, Any] = {}
    metrics.update(benchmark_metrics([r for r in rows if r["source"] == "vqa"]))
    metrics.update(pope_metrics([r for r in rows if r["source"] == "pope"]))
    metrics.update(likelihood_metrics(rows))
    metrics.update(eval_file_metrics([r for r in rows if r["source"] == "eval"]))
    if rejects is not None:
        metrics["eval_rejected"] = rejects.count
    metrics["dtype"] = weights
    metrics["eval_seconds"] = round(seconds, 2)
    metrics["eval_cpu_seconds"] = round(cpu, 2)
    metrics["answers_per_second"] = round(len(rows) / max(seconds, 1e-9), 2)
    if params.likelihood:
        metrics["likelihood_seconds"] = round(time.perf_counter() - t1, 2)
    metrics.update(peak_memory_mb())
    log.info(
        "answered %s questions in %.0f s (%.1f q/s)", f"{len(rows):,}", seconds, metrics["answers_per_second"]
    )
    return EvaluateResult(metrics, rows, rejects)
