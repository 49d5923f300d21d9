"""Score an instruction pool with both reward models: the `score` stage's library.

For every pool record: question_score = f(image, all human turns joined); per turn, g(image,
question, answer) for each candidate answer (a gpt turn may hold a list of candidates), the
best candidate, and answer_score = mean over turns of the best candidate's score
(docs/formats.md, data/score/scores.jsonl).

- Batched by length (longest first within a shard), so padding stays small.
- Resumable: the pool is cut into shards of `shard_size` records in pool order; each finished
  shard is written atomically to the work folder with a fingerprint of the models, params and
  its records. A restarted run keeps finished shards whose fingerprint matches and scores the
  rest; the merged output is the same as an uninterrupted run's.
- Data-parallel: under `accelerate launch` / `torchrun`, process r scores shards r, r+n, ...;
  the main process merges them in pool order. Each shard is batched the same way whatever the
  process count, so the output equals one process's.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from align2llava.config import Section
from align2llava.data.io import fingerprint, read_jsonl_strict
from align2llava.data.records import human_turns, qa_pairs, record_problems
from align2llava.data.rejects import Rejects
from align2llava.errors import DataError
from align2llava.models.precision import resolve
from align2llava.models.reward_model import answer_text, load_reward_model, question_text, score_items
from align2llava.models.runtime import process_state
from align2llava.progress import Progress
from align2llava.steps.grounding import load_grounding

log = logging.getLogger(__name__)

class ScoreParams(Section):
    """The `score` section of params.yaml."""

    question_model: str = "models/train_reward/question"
    answer_model: str = "models/train_reward/answer"
    # The reward models' base checkpoint; null: the one their reward_config.json names (relative
    # to their folder). Either way its content fingerprint must match the one recorded there.
    backbone: str | None = None
    # Items per forward pass (per process).
    batch_size: int = Field(32, ge=1)
    # Records per resumable shard.
    shard_size: int = Field(128, ge=1)
    # Finished shards live here until the merged output is written.
    work_dir: str = ".cache/score"
    keep_shards: bool = False
    # Rejected pool records allowed: a fraction (< 1) or a count (>= 1).
    reject_budget: float = Field(0.01, ge=0.0)
    # Decode every image while checking the pool (else only check that the file exists).
    decode_images: bool = True
    # auto: bf16 on GPUs, float32 on CPUs: scores that do not depend on the batch, thread or
    # process count (align2llava.models.precision). mixed / bfloat16: faster on native-bf16 CPUs.
    dtype: Literal["auto", "float32", "bfloat16", "float16", "mixed"] = "auto"


# ----------------------------------------------------------------------------- the pool


def load_pool(path: str | Path, image_root: str | Path | None, reject_budget: float,
              decode_images: bool = True) -> tuple[list[dict[str, Any]], Rejects, int]:
    """Pool records that can be scored, the rejects, and the input count (budget checked)."""
    from align2llava.data.io import read_records

    loaded = read_records(path)
    rejects = Rejects(str(path), reject_budget)
    for p in loaded.problems:
        rejects.add_problem(p)
    good = []
    seen: dict[str, int] = {}
    for rec, idx in zip(loaded.records, loaded.indices):
        problems = record_problems(rec, image_root=image_root, check_images=decode_images,
                                   allow_candidates=True)
        if not problems and image_root is not None and rec.get("image") and not decode_images:
            from align2llava.data.images import resolve_image

            if not resolve_image(image_root, rec["image"]).is_file():
                problems = [f"image file '{rec['image']}' not found"]
        rid = rec.get("id") if isinstance(rec, dict) else None
        if not problems and str(rid) in seen:
            problems = [f"duplicate id (first at record {seen[str(rid)]})"]
        if problems:
            rejects.add(idx, rid, "; ".join(problems), rec)
            continue
        seen[str(rid)] = idx
        good.append(rec)
    total = len(loaded.records) + len(loaded.problems)
    return good, rejects, total


def record_size(rec: dict[str, Any]) -> int:
    """Items a record is scored as: its question set, then every candidate answer of every turn."""
    return 1 + sum(len(a) if isinstance(a, list) else 1 for _, a in qa_pairs(rec))


def record_items(rec: dict[str, Any]) -> tuple[str, list[list[str]]]:
    """(f's text, per turn the list of g texts, one per candidate answer)."""
    q, turns = record_answers(rec)
    return q, [[answer_text(question, a) for question, a in cands] for cands in turns]


def record_answers(rec: dict[str, Any]) -> tuple[str, list[list[tuple[str, str]]]]:
    """(f's text, per turn the (question, answer) pairs g reads, one per candidate answer)."""
    turns = []
    for question, answer in qa_pairs(rec):
        cands = answer if isinstance(answer, list) else [answer]
        turns.append([(question, a) for a in cands])
    return question_text(human_turns(rec)), turns


# ----------------------------------------------------------------------------- models


@dataclass
class RewardModels:
    question: Any
    answer: Any
    q_encoder: Any
    a_encoder: Any
    device: Any
    meta: dict[str, Any] = field(default_factory=dict)
    # the answer RM's grounding term (steps.grounding), None when it has none
    grounding: Any = None


def load_reward_models(question_dir: str | Path, answer_dir: str | Path, *, image_root: str | Path | None,
                       dtype: str = "auto", device: Any = "cpu", backbone: str | Path | None = None) -> RewardModels:
    from align2llava.models.reward_model import Encoder

    q, qproc, qmeta = load_reward_model(question_dir, backbone=backbone, dtype=dtype, device=str(device))
    a, aproc, ameta = load_reward_model(answer_dir, backbone=backbone, dtype=dtype, device=str(device))
    for d, meta, kind in ((question_dir, qmeta, "question"), (answer_dir, ameta, "answer")):
        if meta["kind"] != kind:
            raise DataError(f"{d}: is a {meta['kind']} reward model, expected the {kind} one")
    grounding = load_grounding(answer_dir, ameta, backbone=backbone, image_root=image_root, dtype=dtype,
                               device=device)
    return RewardModels(q, a, Encoder(qproc, qmeta["max_length"], image_root),
                        Encoder(aproc, ameta["max_length"], image_root), device,
                        {"question": qmeta, "answer": ameta}, grounding)


def score_records(models: RewardModels, records: Sequence[dict[str, Any]], batch_size: int,
                  progress: bool = False, meter: Any = None) -> list[dict[str, Any]]:
    """scores.jsonl rows for `records` (both models, each batched by length)."""
    q_items, a_items, layout = [], [], []
    for rec in records:
        image = rec.get("image") or None
        q, turns = record_answers(rec)
        q_items.append((q, image))
        spans = []
        for cands in turns:
            spans.append((len(a_items), len(cands)))
            a_items.extend((image, question, answer) for question, answer in cands)
        layout.append(spans)
    qs = score_items(models.question, models.q_encoder, q_items, batch_size=batch_size,
                     device=models.device, progress="question RM" if progress else None, meter=meter)
    ans = score_items(models.answer, models.a_encoder, [(answer_text(q, a), im) for im, q, a in a_items],
                      batch_size=batch_size, device=models.device, progress="answer RM" if progress else None,
                      meter=meter)
    if models.grounding is not None:  # g = head + weight x grounding (steps.grounding)
        ans = [r + g for r, g in zip(ans, models.grounding(a_items, meter))]
    rows = []
    for rec, qscore, spans in zip(records, qs, layout):
        turns = []
        for k, (start, n) in enumerate(spans):
            scores = [round(s, 6) for s in ans[start : start + n]]
            turns.append({"turn": k, "scores": scores, "best": max(range(n), key=lambda i: scores[i])})
        best = [t["scores"][t["best"]] for t in turns]
        rows.append({
            "id": rec["id"],
            "task": rec.get("task"),
            "question_score": round(qscore, 6),
            "answer_score": round(sum(best) / len(best), 6),
            "turns": turns,
        })
    return rows


# ----------------------------------------------------------------------------- shards


def _read_shard(path: Path, key: str, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """A finished shard's rows, or None when it is missing or was made from other inputs."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        head = json.loads(lines[0])
        rows = [json.loads(x) for x in lines[1:]]
    except (OSError, IndexError, json.JSONDecodeError):
        return None
    if head.get("fingerprint") != key or head.get("records") != fingerprint(extra=records):
        return None
    if [r.get("id") for r in rows] != [r["id"] for r in records]:
        return None
    return rows


def _write_shard(path: Path, key: str, records: Sequence[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps({"fingerprint": key, "records": fingerprint(extra=records)}) + "\n")
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    tmp.replace(path)


@dataclass
class ScoreSummary:
    """What score_pool wrote and what this run did.

    The counts describe the whole output file, resumed shards included; the `*_this_run` figures
    describe the shards this run scored, summed over processes, timed on the slowest process
    from its first forward pass to its last (model loading excluded).
    """

    records: int  # rows in the output
    answer_items: int  # candidate answers scored in the output (answer-RM forwards)
    shards: int
    shards_resumed: int  # finished shards reused, over all processes
    processes: int
    seconds: float  # score_pool's wall time on the main process
    records_this_run: int = 0
    items_this_run: int = 0  # reward-model forwards this run (question + answer)
    scoring_seconds_this_run: float = 0.0

    @property
    def records_per_s_this_run(self) -> float | None:
        if not self.records_this_run or self.scoring_seconds_this_run <= 0:
            return None
        return self.records_this_run / self.scoring_seconds_this_run


def score_pool(
    records: Sequence[dict[str, Any]],
    params: ScoreParams,
    out_path: str | Path,
    *,
    image_root: str | Path | None,
    extra_fingerprint: Any = None,
    stop_after_shards: int | None = None,
) -> ScoreSummary | None:
    """Score `records` into out_path (JSONL), resumable and data-parallel (see module doc).

    Returns the summary on the main process (None on the others). `stop_after_shards` ends the
    run early after this process finished that many new shards (to test resuming).
    """
    t0 = time.time()
    state = process_state()
    rank, world = state.process_index, state.num_processes
    out_path = Path(out_path)
    work = Path(params.work_dir)
    # the reward models' files (small: adapters, heads, configs), what batches and precision
    # they run at, and the caller's extra (the stage: the base params)
    fp = fingerprint(params.question_model, params.answer_model,
                     extra=[params.batch_size, str(resolve(params.dtype, state.device, "score")), extra_fingerprint])
    shards = [records[i : i + params.shard_size] for i in range(0, len(records), params.shard_size)]
    names = [work / f"shard-{k:05d}.jsonl" for k in range(len(shards))]
    mine = [k for k in range(len(shards)) if k % world == rank]
    todo = [k for k in mine if _read_shard(names[k], fp, shards[k]) is None]
    resumed = len(mine) - len(todo)
    if resumed:
        log.info("process %d: %d of its %d shards already finished; resuming", rank, resumed, len(mine))
    t1 = time.time()
    n_records = n_items = 0
    if todo:
        models = load_reward_models(params.question_model, params.answer_model, image_root=image_root,
                                    dtype=params.dtype, device=state.device, backbone=params.backbone)
        t1 = time.time()
        total = sum(record_size(r) for k in todo for r in shards[k])
        if models.grounding is not None:  # the grounding term's passes per answer
            total += models.grounding.passes * sum(record_size(r) - 1 for k in todo for r in shards[k])
        desc = "score" if world == 1 else f"score (process {rank})"
        meter = Progress(total, desc, "items", log)  # items: one per record (question) + one per answer
        for done, k in enumerate(todo):
            if stop_after_shards is not None and done >= stop_after_shards:
                meter.close()
                return None
            rows = score_records(models, shards[k], params.batch_size, meter=meter)
            n_records += len(rows)
            n_items += sum(1 + sum(len(t["scores"]) for t in r["turns"]) for r in rows)
            _write_shard(names[k], fp, shards[k], rows)
            meter.update(0, rec=len(shards[k]))
            log.info("process %d: shard %d/%d done (%d records)", rank, k + 1, len(shards), len(shards[k]))
        meter.close()
    mine_done = {"records": n_records, "items": n_items, "seconds": time.time() - t1 if todo else 0.0,
                 "resumed": resumed}
    state.wait_for_everyone()
    if world > 1:
        from accelerate.utils import gather_object

        done = gather_object([mine_done])  # every process takes part
    else:
        done = [mine_done]
    if not state.is_main_process:
        return None
    rows_all: list[dict[str, Any]] = []
    for k in range(len(shards)):
        rows = _read_shard(names[k], fp, shards[k])
        if rows is None:
            raise DataError(f"{names[k]}: shard missing or stale after scoring; rerun the stage")
        rows_all.extend(rows)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows_all)
    tmp.replace(out_path)
    if not params.keep_shards:
        for n in names:
            n.unlink(missing_ok=True)
    return ScoreSummary(
        records=len(rows_all),
        answer_items=sum(len(t["scores"]) for row in rows_all for t in row["turns"]),
        shards=len(shards),
        shards_resumed=sum(d["resumed"] for d in done),
        processes=world,
        seconds=time.time() - t0,
        records_this_run=sum(d["records"] for d in done),
        items_this_run=sum(d["items"] for d in done),
        scoring_seconds_this_run=max(d["seconds"] for d in done),
    )


SCORE_KEYS = ("id", "task", "question_score", "answer_score", "turns")


def read_scores(path: str | Path) -> list[dict[str, Any]]:
    """scores.jsonl, read strictly (our own intermediate file)."""
    return read_jsonl_strict(path, required=SCORE_KEYS, missing_hint="run the score stage first")
