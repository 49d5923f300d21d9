"""Stage B of Align²LLaVA, LLM preference alignment: the inner LLM rewrites, then reviews.

The inner LLM of the MLLM being tuned (the language model of `base.base_model`, used text-only
through its own chat template) rewrites every selected answer in its own words, given its
question (batched, greedy by default, left padding). Questions are left as they are.

A rewrite replaces the original only when all of these hold, in this order:
1. it is usable: non-empty, finished before its token cap, not identical to the original;
2. the rule-based content check passes (`check_content`): no colour, shape, count, position,
   size, yes/no answer, negation, object noun or name of the original is lost, and none is added;
   the length stays within [min_length_ratio, max_length_ratio] x the original's words;
3. the review prefers it: the same LLM sees the question and both answers as "A" and "B" (which
   is which is drawn per turn from base.seed) and we compare its next-token logits for "A" and
   "B" (no free text is parsed).
Otherwise the original stays. The dataset size never changes; only answer text does.

`nll_before` / `nll_after`: the inner LLM's mean per-token negative log-likelihood of all answers
given their question (chat template, single turn, text only), over the selected set and over the
curated set: the style gap the step closes.

Every model call goes through a cache keyed by the model's fingerprint, the exact prompt and the
generation settings (.cache/restyle/<fingerprint>.jsonl): a rerun is cheap and gives identical
results.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from align2llava.config import Section
from align2llava.errors import DataError
from align2llava.progress import Progress
from align2llava.steps.restyle.content import _norm, check_content, clean_rewrite, failure_kind, polarity, repetitive
from align2llava.steps.restyle.llm import REVIEW_LABELS, InnerLLM, ResponseCache, review_messages, rewrite_messages

if TYPE_CHECKING:
    from align2llava.steps.restyle.llm import LLM

log = logging.getLogger(__name__)

class RestyleParams(Section):
    """The `restyle:` section of params.yaml."""

    # false: pass the selection through unchanged (the ablation); no model is loaded.
    enabled: bool = True
    # The inner LLM: an HF LLaVA folder; null uses base.base_model (the model being tuned).
    model: str | None = None
    batch_size: int = Field(16, ge=1)
    # Hard cap on rewrite tokens; each answer's own cap is min(this, max_length_ratio x its
    # tokens + 8). A rewrite that hits its cap unfinished is rejected as truncated.
    max_new_tokens: int = Field(160, ge=1)
    # 0.0: greedy. Above 0: sampling at this temperature, seeded by base.seed.
    temperature: float = Field(0.0, ge=0.0)
    # Above 0: never generate a run of this many tokens twice within one rewrite. Off by
    # default: on the demo, 8 only turned loops into garbled sentences (same acceptance).
    no_repeat_ngram: int = Field(0, ge=0)
    # Length guard of the content check (words of the rewrite / words of the original).
    min_length_ratio: float = Field(0.5, ge=0.0)
    max_length_ratio: float = Field(1.5, ge=1.0)
    # Start the rewrite of an answer that opens with Yes/No with that same word (a decoding
    # prefix; the content check still verifies the rest).
    prefill_yes_no: bool = True
    # 2: review both orders and average the log-odds (cancels the judge's position bias);
    # 1: one order per turn, drawn from base.seed.
    review_orders: Literal[1, 2] = 2
    # auto: bfloat16 on a GPU, float32 on a CPU (reproducible across thread counts;
    # models.precision). bfloat16 is ~3x faster prefill on the demo's AMX CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    cache_dir: str = ".cache/restyle"


# --------------------------------------------------------------------------------- restyle
@dataclass
class Turn:
    id: str
    turn: int  # QA pair index k within the record
    conv_index: int  # index of the gpt turn in "conversations"
    question: str
    original: str
    rewrite: str | None = None
    finished: bool = False
    check: dict[str, Any] | None = None
    verdict: str | None = None
    p_rewrite: float | None = None
    # log-odds of "rewrite better" per order shown, first the seeded one ("A" = rewrite_label)
    review_logodds: list[float] | None = None
    rewrite_label: str | None = None
    kept: str = "original"
    reason: str | None = None

    def log_row(self) -> dict[str, Any]:
        return {
            "id": self.id, "turn": self.turn, "original": self.original, "rewrite": self.rewrite,
            "verdict": self.verdict, "check": self.check, "kept": self.kept, "reason": self.reason,
            "p_rewrite": self.p_rewrite, "review_logodds": self.review_logodds,
            "rewrite_label": self.rewrite_label,
        }


@dataclass
class Restyled:
    records: list[dict[str, Any]]
    log: list[dict[str, Any]]
    metrics: dict[str, Any] = field(default_factory=dict)


def collect_turns(records: list[dict[str, Any]]) -> list[Turn]:
    """Every (question, answer) pair of the selection, strictly: it is our own file."""
    from align2llava.data.records import strip_image_token

    turns = []
    for i, rec in enumerate(records):
        convs = rec.get("conversations") if isinstance(rec, dict) else None
        if not isinstance(convs, list) or "id" not in rec:
            raise DataError(f"selected.json: record {i}: not a LLaVA record")
        k = 0
        for j in range(1, len(convs), 2):
            q, a = convs[j - 1].get("value"), convs[j].get("value")
            if not isinstance(q, str) or not isinstance(a, str) or convs[j].get("from") != "gpt":
                raise DataError(
                    f"selected.json: record {i} (id {rec['id']}): turn {j} is not a text answer "
                    "after a question (candidate lists must be resolved by `select`)"
                )
            turns.append(Turn(str(rec["id"]), k, j, strip_image_token(q), a))
            k += 1
    return turns


def _batched(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i: i + size] for i in range(0, len(items), size)]


def _cached_calls(llm: LLM, cache: ResponseCache, kind: str, jobs: list[tuple[Any, dict[str, Any]]],
                  run: Any, batch_size: int, desc: str) -> list[Any]:
    """Look every job up in the cache; run the misses in batches (sorted by prompt length)."""
    keys = [cache.key(kind, prompt, settings) for prompt, settings in jobs]
    results: list[Any] = [cache.get(k) for k in keys]
    todo = sorted({k: i for i, k in enumerate(keys) if results[i] is None}.values(),
                  key=lambda i: (len(json.dumps(jobs[i][0])), keys[i]))
    with Progress(len(todo), desc, "rec", log) as progress:
        for batch in _batched(todo, batch_size):
            values = run([jobs[i] for i in batch])
            cache.put({keys[i]: v for i, v in zip(batch, values)})
            for i, v in zip(batch, values):
                results[i] = v
            generated = sum(v.get("tokens", 0) for v in values if isinstance(v, dict))
            progress.update(len(batch), **({"generated tok": generated} if generated else {}))
    return [results[i] if results[i] is not None else cache.data[keys[i]] for i in range(len(keys))]


def _nll_pairs(llm: LLM, cache: ResponseCache, pairs: list[tuple[str, str]], batch_size: int) -> tuple[float, int]:
    jobs = [([llm.chat([{"role": "user", "content": q}]), a], {}) for q, a in pairs]

    def run(batch):
        return [list(x) for x in llm.nll([p[0] for p, _ in batch], [p[1] for p, _ in batch])]

    vals = _cached_calls(llm, cache, "nll", jobs, run, batch_size, "nll")
    return sum(v[0] for v in vals), sum(v[1] for v in vals)


def restyle(records: list[dict[str, Any]], llm: LLM, params: RestyleParams, *, seed: int,
            cache: ResponseCache) -> Restyled:
    """Rewrite, check and review every answer of `records`; return the curated records."""
    t0 = time.perf_counter()
    turns = collect_turns(records)
    bs = params.batch_size

    # 1. rewrite
    settings = {"temperature": params.temperature, "seed": seed if params.temperature > 0 else None,
                "no_repeat_ngram": params.no_repeat_ngram}
    jobs, prefixes = [], []
    for t in turns:
        cap = min(params.max_new_tokens, int(params.max_length_ratio * llm.n_tokens(t.original)) + 8)
        prefix = (polarity(t.original) or "").capitalize() if params.prefill_yes_no else ""
        prefixes.append(prefix)
        # a prefilled start follows the template's own lead-in to a reply (" " after "ASSISTANT:")
        lead = getattr(llm, "reply_lead", "") if prefix else ""
        jobs.append((llm.chat(rewrite_messages(t.question, t.original)) + lead + prefix, {**settings, "cap": cap}))
    gen_t = time.perf_counter()
    outs = _cached_calls(
        llm, cache, "rewrite", jobs,
        lambda b: llm.generate([p for p, _ in b], [s["cap"] for _, s in b]), bs, "rewrite",
    )
    gen_s = time.perf_counter() - gen_t
    gen_tokens = sum(o["tokens"] for o in outs)
    review_t = time.perf_counter()

    # 2. usable + content check
    to_review = []
    for t, o, prefix in zip(turns, outs, prefixes):
        t.rewrite, t.finished = clean_rewrite(prefix + o["text"]), o["finished"]
        if not t.rewrite or "<image>" in t.rewrite:
            t.reason = "empty"
        elif not t.finished:
            t.reason = "truncated"
        elif _norm(t.rewrite) == _norm(t.original):
            t.reason = "unchanged"
        elif repetitive(t.original, t.rewrite):
            t.reason = "repetitive"
        else:
            fails = check_content(t.original, t.rewrite, params.min_length_ratio, params.max_length_ratio)
            t.check = {"passed": not fails, "failures": fails}
            if fails:
                t.reason = "content_check"
            else:
                to_review.append(t)

    # 3. review: the first order shown is drawn per turn from the seed; with review_orders 2
    # the swapped order is shown too and the two log-odds are averaged
    rjobs = []
    for t in to_review:
        rewrite_first = random.Random(f"{seed}:{t.id}:{t.turn}").random() < 0.5
        t.rewrite_label = REVIEW_LABELS[0] if rewrite_first else REVIEW_LABELS[1]
        orders = [rewrite_first, not rewrite_first][: params.review_orders]
        for first in orders:
            a, b = (t.rewrite, t.original) if first else (t.original, t.rewrite)
            rjobs.append((llm.chat(review_messages(t.question, a, b)), {"labels": list(REVIEW_LABELS)}))
    logits = _cached_calls(llm, cache, "review", rjobs,
                           lambda b: llm.choice_logits([p for p, _ in b], REVIEW_LABELS), bs, "review")
    k = params.review_orders
    for i, t in enumerate(to_review):
        first = t.rewrite_label == REVIEW_LABELS[0]
        logodds = []
        for j, (la, lb) in enumerate(logits[i * k: (i + 1) * k]):
            rewrite_is_a = first if j == 0 else not first
            logodds.append(round((la - lb) if rewrite_is_a else (lb - la), 4))
        score = sum(logodds) / len(logodds)
        t.review_logodds = logodds
        t.p_rewrite = round(1.0 / (1.0 + math.exp(-score)), 4)
        t.verdict = "rewrite" if score > 0 else "original"
        if t.verdict == "rewrite":
            t.kept, t.reason = "rewrite", None
        else:
            t.reason = "review"

    review_s = time.perf_counter() - review_t

    # 4. curated records
    by_id: dict[str, list[Turn]] = {}
    for t in turns:
        by_id.setdefault(t.id, []).append(t)
    curated = []
    for rec in records:
        rec = dict(rec)
        convs = [dict(c) for c in rec["conversations"]]
        for t in by_id.get(str(rec["id"]), []):
            if t.kept == "rewrite":
                convs[t.conv_index]["value"] = t.rewrite
        rec["conversations"] = convs
        curated.append(rec)

    # 5. style gap: NLL of the answers before and after
    nll_t = time.perf_counter()
    nll_b = _nll_pairs(llm, cache, [(t.question, t.original) for t in turns], bs)
    final = [(t.question, t.rewrite if t.kept == "rewrite" else t.original) for t in turns]
    nll_a = _nll_pairs(llm, cache, final, bs)
    acc = [t for t in turns if t.kept == "rewrite"]
    nll_acc_b = _nll_pairs(llm, cache, [(t.question, t.original) for t in acc], bs) if acc else (0.0, 0)
    nll_acc_a = _nll_pairs(llm, cache, [(t.question, t.rewrite) for t in acc], bs) if acc else (0.0, 0)

    nll_s = time.perf_counter() - nll_t
    reasons: dict[str, int] = {}
    fail_kinds: dict[str, int] = {}
    for t in turns:
        if t.reason:
            reasons[t.reason] = reasons.get(t.reason, 0) + 1
        for f in (t.check or {}).get("failures", []):
            fail_kinds[failure_kind(f)] = fail_kinds.get(failure_kind(f), 0) + 1
    n = len(turns)
    checked = [t for t in turns if t.check is not None]
    metrics = {
        "records": len(records),
        "turns": n,
        "accepted": len(acc),
        "acceptance_rate": round(len(acc) / n, 4) if n else 0.0,
        "records_changed": len({t.id for t in acc}),
        "rejections": dict(sorted(reasons.items())),
        "check_failures": dict(sorted(fail_kinds.items())),
        "check_pass_rate": round(sum(t.check["passed"] for t in checked) / len(checked), 4) if checked else 0.0,
        "review_prefers_rewrite_rate": round(len(acc) / len(to_review), 4) if to_review else 0.0,
        # what the seeded first order alone would have decided (position bias included)
        "review_first_order_prefers_rewrite_rate": round(
            sum(t.review_logodds[0] > 0 for t in to_review) / len(to_review), 4) if to_review else 0.0,
        "nll_before": round(nll_b[0] / max(nll_b[1], 1), 4),
        "nll_after": round(nll_a[0] / max(nll_a[1], 1), 4),
        "nll_accepted_before": round(nll_acc_b[0] / max(nll_acc_b[1], 1), 4),
        "nll_accepted_after": round(nll_acc_a[0] / max(nll_acc_a[1], 1), 4),
        "answer_tokens_before": nll_b[1],
        "answer_tokens_after": nll_a[1],
        "generated_tokens": gen_tokens,
        "cache_hits": cache.hits,
        "cache_misses": cache.misses,
        "seconds": round(time.perf_counter() - t0, 1),
        "seconds_rewrite": round(gen_s, 1),
        "seconds_review": round(review_s, 1),
        "seconds_nll": round(nll_s, 1),
    }
    if cache.misses and gen_s > 0:
        metrics["generate_tok_per_s"] = round(gen_tokens / gen_s, 1)
    return Restyled(curated, [t.log_row() for t in turns], metrics)


def run_restyle(selected_path: str | Path, params: RestyleParams, *, base_model: str, seed: int,
                out_dir: str | Path = "data/restyle") -> Restyled:
    """Read the selection, restyle it (or pass it through), write curated.json and log.jsonl."""
    from align2llava.data.io import read_records_strict, write_jsonl, write_records

    records = read_records_strict(selected_path)
    if not params.enabled:
        turns = collect_turns(records)
        result = Restyled(records, [], {"records": len(records), "turns": len(turns), "accepted": 0,
                                        "acceptance_rate": 0.0, "enabled": 0})
    else:
        model_path = params.model or base_model
        llm = InnerLLM(model_path, dtype=params.dtype, batch_size=params.batch_size,
                       temperature=params.temperature, seed=seed, no_repeat_ngram=params.no_repeat_ngram)
        cache = ResponseCache(params.cache_dir, llm.fingerprint)
        log.info("inner LLM %s (%s, fingerprint %s), cache %s (%s entries)", model_path, llm.dtype,
                 llm.fingerprint[:12], cache.path, f"{len(cache.data):,}")
        result = restyle(records, llm, params, seed=seed, cache=cache)
        result.metrics["enabled"] = 1
    out = Path(out_dir)
    write_records(result.records, out / "curated.json", "json")
    write_jsonl(result.log, out / "log.jsonl")
    return result
