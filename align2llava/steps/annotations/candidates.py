"""The annotation-tasks step: sample the pool, have an MLLM that sees the image write extra
candidates, write them as Label Studio tasks and a table (tasks.py).

The paper has LLMs write extra candidate question sets and answers for a sample of records. We
use one MLLM in HF layout (the base checkpoint by default), through its chat template and with
the record's image in the first user turn, for both:

- a candidate question set replaces every human turn of the instruction, turn by turn: the MLLM
  gets `question_prompt` with the original {question} and writes one question (its first line
  ending with "?" is kept, else its first line; a leading list marker removed);
- a candidate answer to turn k is sampled after the conversation's original turns 0..k-1, with
  `answer_prompt` ({question}: the turn's question) as the last user message.

Sampling at `temperature` / `top_p`, seeded: torch's generator is reset from (seed, pass, batch)
before each batch, so a rerun with the same inputs and settings writes the same candidates on
the same hardware. An empty generation is sampled again (another seed) up to `max_tries` times
in all; a record still lacking a candidate is reported as failed (the caller rejects it).
"""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from align2llava.data.images import check_image, load_rgb, resolve_image
from align2llava.data.io import read_records
from align2llava.data.records import IMAGE_TOKEN, record_problems, strip_image_token
from align2llava.data.rejects import Rejects
from align2llava.errors import DataError
from align2llava.steps.annotations.tasks import (
    AnnotationTasksParams,
    RecordCandidates,
    original_candidates,
    write_tasks,
)

log = logging.getLogger(__name__)

_MARKER = re.compile(r"^\s*(?:\d+\s*[.):]|[-*\u2022]|question\s*\d*\s*:)\s*", re.IGNORECASE)


@dataclass
class Prompt:
    """One generation request: chat messages (the first user turn starts with the image token)."""

    messages: list[dict[str, str]]
    image: str  # path under the image root
    max_new_tokens: int


class Generator(Protocol):
    def __call__(self, prompts: list[Prompt], seed: int) -> list[str]: ...


# ----------------------------------------------------------------------------- sampling


def allocate(sizes: dict[str, int], n: int) -> dict[str, int]:
    """n spread over the types in proportion to their sizes (largest remainder, ties by name)."""
    total = sum(sizes.values())
    if n >= total:
        return dict(sizes)
    exact = {t: n * s / total for t, s in sizes.items()}
    out = {t: int(v) for t, v in exact.items()}
    rest = n - sum(out.values())
    for t in sorted(sizes, key=lambda t: (-(exact[t] - out[t]), t))[:rest]:
        out[t] += 1
    return out


def sample_records(records: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """A seeded sample of n records stratified by `task` (missing: "all"), in pool order."""
    by_type: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        by_type.setdefault(str(rec.get("task") or "all"), []).append(i)
    counts = allocate({t: len(ix) for t, ix in by_type.items()}, n)
    picked: list[int] = []
    for t in sorted(by_type):
        rng = random.Random(f"{seed}:annotation-tasks:{t}")
        picked += rng.sample(by_type[t], counts[t])
    return [records[i] for i in sorted(picked)]


def load_sample(pool: str | Path, image_root: str | Path, n: int, seed: int,
                rejects: Rejects) -> tuple[list[dict[str, Any]], int]:
    """Valid pool records (images checked for the sampled ones only), sampled; and the pool size."""
    loaded = read_records(pool)
    for p in loaded.problems:
        rejects.add_problem(p)
    good, seen = [], set()
    for rec, idx in zip(loaded.records, loaded.indices):
        problems = record_problems(rec, image_root=None)
        rid = rec.get("id") if isinstance(rec, dict) else None
        if not problems and not rec.get("image"):
            problems = ["no image (annotators rate candidates against the image)"]
        if not problems and str(rid) in seen:
            problems = ["duplicate id"]
        if problems:
            rejects.add(idx, rid, "; ".join(problems), rec)
            continue
        seen.add(str(rid))
        good.append((idx, rec))
    total = len(loaded.records) + len(loaded.problems)
    index = {id(rec): idx for idx, rec in good}
    sample = []
    for rec in sample_records([rec for _, rec in good], n, seed):
        try:
            check_image(resolve_image(image_root, rec["image"]))
        except DataError as exc:
            rejects.add(index[id(rec)], rec["id"], str(exc), rec)
            continue
        sample.append(rec)
    return sample, total


# ----------------------------------------------------------------------------- generation


def clean_question(text: str) -> str:
    """The first line that is a question (ends with "?"), else the first non-empty line; list
    markers and quotes removed; "" when there is none."""
    lines = [_MARKER.sub("", strip_image_token(x)).strip().strip('"').strip() for x in text.splitlines()]
    lines = [x for x in lines if x]
    return next((x for x in lines if x.endswith("?")), lines[0] if lines else "")


def clean_answer(text: str) -> str:
    return strip_image_token(text).strip()


def question_prompts(it: RecordCandidates, p: AnnotationTasksParams) -> list[Prompt]:
    """One prompt per original human turn (a question set is rewritten turn by turn)."""
    return [Prompt([{"role": "user", "content": f"{IMAGE_TOKEN}\n" + p.question_prompt.format(question=q)}],
                   it.image, p.question_max_new_tokens) for q in it.question_sets[0]]


def answer_prompt(it: RecordCandidates, k: int, p: AnnotationTasksParams) -> Prompt:
    msgs = []
    for j in range(k):
        q, answers = it.answers[j]
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": answers[0]}]
    msgs.append({"role": "user", "content": p.answer_prompt.format(question=it.answers[k][0])})
    msgs[0] = {"role": "user", "content": f"{IMAGE_TOKEN}\n{msgs[0]['content']}"}
    return Prompt(msgs, it.image, p.max_new_tokens)


def add_candidates(items: list[RecordCandidates], generate: Generator, p: AnnotationTasksParams,
                   seed: int) -> dict[str, Any]:
    """Append p.question_candidates question sets and p.answer_candidates answers per turn.

    Returns {"generations", "retries", "failed": {record id: reason}}.
    """
    # slots: (item index, "q", candidate, turn) or (item index, "a", candidate, turn) -> text
    # questions first, then answers: batches of one kind share a token cap
    requests: list[tuple[tuple[int, str, int, int], Prompt]] = []
    for i, it in enumerate(items):
        qp = question_prompts(it, p)
        for c in range(p.question_candidates):
            requests += [((i, "q", c, t), pr) for t, pr in enumerate(qp)]
    for i, it in enumerate(items):
        for k in range(len(it.answers)):
            pr = answer_prompt(it, k, p)
            requests += [((i, "a", c, k), pr) for c in range(p.answer_candidates)]
    done: dict[tuple[int, str, int, int], str] = {}
    todo = requests
    generations = retries = 0
    for attempt in range(p.max_tries):
        if not todo:
            break
        if attempt:
            retries += len(todo)
            log.info("sampling %d empty candidates again (try %d of %d)", len(todo), attempt + 1, p.max_tries)
        texts = generate([pr for _, pr in todo], seed * 1000 + attempt)
        generations += len(todo)
        left = []
        for (slot, pr), text in zip(todo, texts):
            clean = clean_question(text) if slot[1] == "q" else clean_answer(text)
            if clean:
                done[slot] = clean
            else:
                left.append((slot, pr))
        todo = left
    failed: dict[str, str] = {}
    for slot, _ in todo:
        it = items[slot[0]]
        what = f"question set {slot[2] + 1} turn {slot[3]}" if slot[1] == "q" else f"answer {slot[2] + 1} to turn {slot[3]}"
        failed.setdefault(it.record_id, f"the model wrote an empty {what} in {p.max_tries} tries")
    for i, it in enumerate(items):
        if it.record_id in failed:
            continue
        for c in range(p.question_candidates):
            it.question_sets.append([done[(i, "q", c, t)] for t in range(len(it.question_sets[0]))])
        for k, (_, answers) in enumerate(it.answers):
            answers += [done[(i, "a", c, k)] for c in range(p.answer_candidates)]
    return {"generations": generations, "retries": retries, "failed": failed}


class MLLMGenerator:
    """Batched sampling from an HF-layout LLaVA with the image in view (left padding)."""

    def __init__(self, path: str | Path, *, image_root: str | Path, dtype: str = "auto", batch_size: int = 16,
                 temperature: float = 0.8, top_p: float = 0.95):
        import torch

        from align2llava.models.loading import load_mllm
        from align2llava.models.precision import resolve

        device = "cuda" if torch.cuda.is_available() else "cpu"
        weights = resolve(dtype, device, "annotation_tasks").weights
        self.model, self.processor = load_mllm(path, dtype=weights, device=device)
        self.model.eval()
        self.device = device
        self.image_root = image_root
        self.batch_size, self.temperature, self.top_p = batch_size, temperature, top_p
        self.processor.tokenizer.padding_side = "left"

    def __call__(self, prompts: list[Prompt], seed: int) -> list[str]:
        import torch
        from tqdm.auto import tqdm

        from align2llava.models.chat import render

        tok = self.processor.tokenizer
        out: list[str] = []
        bar = tqdm(total=len(prompts), desc="generate candidates", unit="cand", disable=None)
        for b, start in enumerate(range(0, len(prompts), self.batch_size)):
            batch = prompts[start: start + self.batch_size]
            texts = [render(self.processor, pr.messages, generation_prompt=True) for pr in batch]
            images = [load_rgb(resolve_image(self.image_root, pr.image)) for pr in batch]
            inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt",
                                    add_special_tokens=False).to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            torch.manual_seed(seed * 100_003 + b)
            with torch.inference_mode():
                ids = self.model.generate(**inputs, do_sample=True, temperature=self.temperature,
                                          top_p=self.top_p, max_new_tokens=max(pr.max_new_tokens for pr in batch),
                                          pad_token_id=tok.pad_token_id)
            new = ids[:, inputs["input_ids"].shape[1]:]
            for pr, row in zip(batch, new):
                out.append(tok.decode(row[: pr.max_new_tokens], skip_special_tokens=True))
            bar.update(len(batch))
        bar.close()
        return out


# ----------------------------------------------------------------------------- the step


def make_annotation_tasks(p: AnnotationTasksParams, *, pool: str | Path, image_root: str | Path,
                          model: str | Path, out_dir: str | Path, seed: int = 0,
                          generator: Any = None) -> dict[str, Any]:
    """Sample, generate candidates, write the Label Studio files and the table; return metrics.

    `generator`: a callable (prompts, seed) -> texts (candidates.Generator); default: the MLLM
    at `model`, loaded here.
    """
    start = time.time()
    out = Path(out_dir)
    rejects = Rejects(str(pool), p.reject_budget)
    sample, total = load_sample(pool, image_root, p.records, seed, rejects)
    rejects_path = out / "rejects.jsonl"
    if generator is None and sample:
        generator = MLLMGenerator(model, image_root=image_root, dtype=p.dtype, batch_size=p.batch_size,
                                  temperature=p.temperature, top_p=p.top_p)
    items = [original_candidates(r) for r in sample]
    t_gen = time.time()
    stats = add_candidates(items, generator, p, seed) if sample else {"generations": 0, "retries": 0, "failed": {}}
    gen_seconds = time.time() - t_gen
    kept = []
    for rec, it in zip(sample, items):
        reason = stats["failed"].get(it.record_id)
        if reason:
            rejects.add(None, it.record_id, reason, rec)
        else:
            kept.append(it)
    rejects.write(rejects_path)
    rejects.check(total, rejects_path)
    if not kept:
        raise DataError(f"{pool}: no record to annotate (sampled {len(sample)}, all rejected; see {rejects_path})")
    counts = write_tasks(kept, out, image_root=image_root, url_template=p.image_url, rating_max=p.rating_max)
    by_type: dict[str, int] = {}
    for it in kept:
        by_type[it.task_type or "all"] = by_type.get(it.task_type or "all", 0) + 1
    return {"pool": total, "records": len(kept), "records_by_type": by_type, **counts,
            "rejected": rejects.count, "generations": stats["generations"], "retries": stats["retries"],
            "generation_seconds": round(gen_seconds, 1), "seconds": round(time.time() - start, 1)}


__all__ = ["Generator", "MLLMGenerator", "Prompt", "add_candidates", "allocate", "clean_answer", "clean_question",
           "make_annotation_tasks", "sample_records"]
