"""Likelihood (multiple-choice) scoring: rank each question's candidate answers by the model's
log-probability of saying them, as MMBench and SEED-Bench score MLLMs, next to generation.

    cands = candidate_sets(items)                 # {question type: [candidate answers]}
    ranked = rank_candidates(model, processor, items, cands, image_root="images", batch_size=32)
    ranked[0]  # {"likelihood_scores": {"circle": -3.2, "square": -5.1, ...}, "likelihood_choice": "circle"}

- Candidates: per question type of the benchmark file, the gold answers of that type in the file
  (the set `score_items` extracts from: the shapes, the colours); yes/no for yes/no questions
  and POPE. A user eval file has no candidate set (free-form gold answers), so it is not scored
  this way.
- Each candidate is scored as the assistant's whole reply, written as `reply_format` says
  (default "{Answer}", the bare answer capitalised: "Circle", "Yes"; set it to the form the model
  was tuned to give short answers in), after the same user message generation sends, through
  the checkpoint's own chat template. The scored tokens are
  exactly the span finetune trains on: the reply's tokens and the end of the turn (ChatML's
  `<|im_end|>`; the tokenizer's EOS where the template writes none, as llava-hf's), so a
  candidate that is only the start of a longer answer does not score as if complete.
- `span` "start" scores only the reply's own tokens, no end of turn: the probability that the
  reply begins with the candidate ("Yes" vs "No" at the reply's first token, whatever follows),
  the comparison POPE's likelihood form needs from a model whose "Yes" goes on ("Yes. The
  image shows..."), which as a whole turn is improbable whatever the image. Candidates must then
  not be token prefixes of each other (an error says which).
- The score is the summed log-probability (no length normalisation). With `prior` "none" it
  measures what the model would say, biases included; with "no_image" it is calibrated against
  the same question asked without the image (the log-probability the image adds, a pointwise
  mutual information): a caption-only model that puts more mass on "No" than "Yes" whatever it
  is shown is then judged by which answer the image makes more likely.

Each batch's prompts (image included) run once; their KV cache is repeated once per candidate
and all candidates' continuations are scored in one more forward pass. Log-probabilities are
taken in float32 from the final hidden states, also when the model runs in bfloat16.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from align2llava.errors import Align2LlavaError
from align2llava.models.chat import SPANS, continuation_ids  # noqa: F401  (evaluation's names)
from align2llava.steps.evaluation.answers import normalize

log = logging.getLogger(__name__)

REPLY_FORMAT = "{Answer}"
# What of a candidate reply is scored: the whole turn (end of turn included) or its start.
# What each score is measured against: nothing, or the same question asked without the image.
PRIORS = ("none", "no_image")
YES_NO = ("no", "yes")


def reply_text(answer: str, reply_format: str = REPLY_FORMAT) -> str:
    """The assistant reply a candidate is scored as: `reply_format` with {answer} (as written)
    or {Answer} (first letter upper case). ValueError when the format does not hold the answer."""
    try:
        text = reply_format.format(answer=answer, Answer=answer[:1].upper() + answer[1:])
        other = reply_format.format(answer="x" + answer, Answer="X" + answer)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"reply_format {reply_format!r}: only {{answer}} and {{Answer}} may be used ({exc})") from None
    if text == other:
        raise ValueError(f"reply_format {reply_format!r} does not contain {{answer}} or {{Answer}}")
    return text


def candidate_sets(items: list[Any], yes_no_types: set[str] | frozenset[str] = frozenset({"yes_no", "pope"})
                   ) -> dict[str, list[str]]:
    """Per question type, the candidate answers: yes/no for `yes_no_types` and POPE items, else
    the gold answers of that type among `items`, one per normalised form, sorted."""
    golds: dict[str, dict[str, str]] = {}
    for it in items:
        if it.source == "eval":
            raise Align2LlavaError(f"{it.id}: a user eval question has no candidate set to rank")
        forms = golds.setdefault(it.type, {})
        for a in it.answers:
            forms.setdefault(normalize(a), a)
    yes_no = {it.type for it in items if it.type in yes_no_types or it.source == "pope"}
    return {t: list(YES_NO) if t in yes_no else sorted(forms.values()) for t, forms in golds.items()}


def rank_candidates(
    model: Any,
    processor: Any,
    items: list[Any],
    candidates_by_type: dict[str, list[str]],
    *,
    image_root: str | Path | None,
    batch_size: int = 32,
    instruction: str = "",
    reply_format: str = REPLY_FORMAT,
    span: str = "turn",
    prior: str = "none",
) -> list[dict[str, Any]]:
    """Per item (in order): {"likelihood_scores": {candidate: summed log-prob}, "likelihood_choice":
    the highest (the first listed on a tie)}. Items are batched by type, so the candidates per
    item (K) are fixed in a batch; `batch_size` bounds the rows of the candidate pass, so a batch
    holds batch_size // K questions (at least one) and its cache about what generation's holds.

    prior "no_image": each score less the same candidate's score for the question asked without
    the image (also returned, as "likelihood_blind_scores"): what the image adds, so a model's
    text-only preference ("No" over "Yes", "red" over "teal") does not decide the choice."""
    if prior not in PRIORS:
        raise ValueError(f"likelihood prior {prior!r}: one of {', '.join(PRIORS)}")
    kw = dict(image_root=image_root, batch_size=batch_size, instruction=instruction,
              reply_format=reply_format, span=span)
    ranked = _rank(model, processor, items, candidates_by_type, **kw)
    if prior == "none":
        return ranked
    # without the image only the question matters: score each distinct one once (POPE repeats them)
    asked = {(it.type, it.question): replace(it, image=None) for it in items}
    blind = dict(zip(asked, _rank(model, processor, list(asked.values()), candidates_by_type, **kw)))
    out = []
    for it, seen in zip(items, ranked):
        unseen = blind[it.type, it.question]
        cands = candidates_by_type[it.type]
        scores = {c: seen["likelihood_scores"][c] - unseen["likelihood_scores"][c] for c in cands}
        best = max(range(len(cands)), key=lambda k: (scores[cands[k]], -k))
        out.append({"likelihood_scores": scores, "likelihood_choice": cands[best],
                    "likelihood_blind_scores": unseen["likelihood_scores"]})
    return out


def _rank(model: Any, processor: Any, items: list[Any], candidates_by_type: dict[str, list[str]], *,
          image_root: str | Path | None, batch_size: int, instruction: str, reply_format: str, span: str
          ) -> list[dict[str, Any]]:
    from align2llava.progress import Progress

    missing = sorted({it.type for it in items} - set(candidates_by_type))
    if missing:
        raise Align2LlavaError(f"likelihood scoring: no candidates for question type(s) {', '.join(missing)}")
    empty = sorted(t for t, c in candidates_by_type.items() if not c)
    if empty:
        raise Align2LlavaError(f"likelihood scoring: question type(s) {', '.join(empty)} have no candidates")
    replies = {t: [reply_text(a, reply_format) for a in cands] for t, cands in candidates_by_type.items()}
    processor.tokenizer.padding_side = "left"
    model.eval()
    scorer = _Scorer(model, processor)
    by_type: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_type.setdefault(it.type, []).append(i)
    out: list[dict[str, Any]] = [{} for _ in items]
    progress = Progress(len(items), "likelihood", "q", log)
    for t, index in by_type.items():
        cands = candidates_by_type[t]
        per = max(1, batch_size // len(cands))
        for start in range(0, len(index), per):
            rows = index[start : start + per]
            batch = [items[i] for i in rows]
            conts = [
                continuation_ids(processor, it.question, r, instruction=instruction, image=it.image is not None,
                                 span=span)
                for it in batch for r in replies[t]
            ]
            if span == "start":
                _check_no_prefix(conts[: len(cands)], cands, t)
            scores = scorer.score(batch, conts, image_root=image_root, instruction=instruction)
            for i, row in zip(rows, scores):
                best = max(range(len(cands)), key=lambda k: (row[k], -k))
                out[i] = {"likelihood_scores": dict(zip(cands, row)), "likelihood_choice": cands[best]}
            progress.update(len(batch), candidates=len(conts), **{"scored tok": sum(map(len, conts))})
    progress.close()
    return out


def _check_no_prefix(conts: list[list[int]], cands: list[str], kind: str) -> None:
    """Scored by their start, a candidate whose tokens begin another's would never lose to it."""
    for i, a in enumerate(conts):
        for j, b in enumerate(conts):
            if i != j and b[: len(a)] == a:
                raise Align2LlavaError(
                    f"likelihood scoring ({kind}): candidate {cands[i]!r} is a token prefix of {cands[j]!r}, "
                    "so scoring replies by their start cannot tell them apart; set evaluate.likelihood_span: turn"
                )


class _Scorer:
    """The two forward passes of one batch: prompts once (cache kept), then every candidate."""

    def __init__(self, model: Any, processor: Any):
        self.model, self.processor, self.tok = model, processor, processor.tokenizer
        self.body = model.model  # LlavaModel: the vision tower, projector and LM, no head
        self.device = next(model.parameters()).device
        head = model.get_output_embeddings()
        # float32 log-probs: bf16 logits move in steps of 0.125 around 20, coarser than margins
        self.weight = head.weight.detach().float()
        self.bias = head.bias.detach().float() if getattr(head, "bias", None) is not None else None
        params = inspect.signature(self.body.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x

    def log_probs(self, hidden: Any) -> Any:
        import torch

        return torch.nn.functional.linear(hidden.float(), self.weight, self.bias).log_softmax(-1)

    def score(self, batch: list[Any], conts: list[list[int]], *, image_root: str | Path | None,
              instruction: str) -> list[list[float]]:
        """Summed log-probs, [len(batch)][K], of `conts` (K per item, item-major) after each prompt."""
        import torch

        first, hidden, ids, cmask = self._forward(batch, conts, image_root=image_root, instruction=instruction)
        with torch.inference_mode():
            total = first.gather(1, ids[:, :1])[:, 0]
            if hidden is not None:
                lp = self.log_probs(hidden).gather(2, ids[:, 1:, None])[..., 0]
                total = total + (lp * cmask[:, 1:]).sum(1)
        return total.view(len(batch), len(conts) // len(batch)).tolist()

    def at_steps(self, batch: list[Any], conts: list[list[int]], queries: list[list[tuple[int, list[int]]]], *,
                 image_root: str | Path | None, instruction: str) -> list[list[list[float]]]:
        """One continuation per item: for each (step, token ids) of `queries[i]`, the log-probs of
        those ids as the token at that step of `conts[i]` (after the earlier ones), [i][query][id]."""
        import torch

        first, hidden, _, _ = self._forward(batch, conts, image_root=image_root, instruction=instruction)
        out = []
        with torch.inference_mode():
            for i, asked in enumerate(queries):
                row = []
                for step, ids in asked:
                    lp = first[i] if step == 0 else self.log_probs(hidden[i, step - 1])
                    row.append(lp[ids].tolist())
                out.append(row)
        return out

    def _forward(self, batch: list[Any], conts: list[list[int]], *, image_root: str | Path | None,
                 instruction: str) -> tuple[Any, Any, Any, Any]:
        """The prompts once (cache kept), then every continuation: the first reply token's
        log-probs per row [rows, vocab], the continuation's final hidden states [rows, T - 1, H]
        (None for one-token continuations), its ids and mask [rows, T]."""
        import torch
        from transformers import DynamicCache

        from align2llava.models.batching import pad_batch
        from align2llava.steps.evaluation.prompts import encode_prompts

        k = len(conts) // len(batch)
        inputs = encode_prompts(self.model, self.processor, batch, image_root=image_root, instruction=instruction)
        mask = inputs["attention_mask"]
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        cont = pad_batch(conts, pad, side="right", device=self.device)
        ids, cmask = cont["input_ids"], cont["attention_mask"]
        cache = DynamicCache(config=self.model.config)
        hidden = None
        with torch.inference_mode():
            last = self.body(**inputs, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
                             **{self.cache_kw: cache}).last_hidden_state[:, -1]
            # the first reply token is predicted by the prompt's last position
            first = self.log_probs(last).repeat_interleave(k, 0)
            if ids.shape[1] > 1:
                cache.batch_repeat_interleave(k)
                rows_mask = mask.repeat_interleave(k, 0)
                start = rows_mask.sum(-1, keepdim=True)  # each row's real prompt length
                steps = torch.arange(ids.shape[1] - 1, device=self.device)
                hidden = self.body(
                    input_ids=ids[:, :-1], attention_mask=torch.cat([rows_mask, cmask[:, :-1]], 1),
                    position_ids=start + steps, use_cache=True, **{self.cache_kw: cache},
                ).last_hidden_state
        return first, hidden, ids, cmask
