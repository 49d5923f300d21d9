"""The inner LLM used text-only for rewrite and review, its prompts and response cache.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any, Protocol

from align2llava.data.io import fingerprint
from align2llava.errors import DataError
from align2llava.models.batching import pad_batch
from align2llava.models.chat import render, reply_lead, text_ids
from align2llava.models.precision import resolve

CACHE_VERSION = 2  # bump when model-call code changes what a key returns
# the files of a model folder its outputs depend on: config, tokenizer, template, weights
MODEL_FILES = (".json", ".jinja", ".safetensors", ".model", ".txt")

REWRITE_SYSTEM = (
    "You are a helpful assistant. You rewrite answers in your own words. "
    "You keep every fact and you add nothing."
)
REWRITE_USER = (
    "Rewrite the answer in your own words. Keep every fact: the same colors, shapes, numbers, "
    "positions, objects, and the same yes or no. Add nothing new. "
    "Reply with the rewritten answer only.\n\nQuestion: {question}\nAnswer: {answer}"
)
# One worked example shown before the real request: it teaches the format (just the answer, no
# preamble) without naming any colour or shape a demo answer could copy.
REWRITE_EXAMPLE = (
    "What is the man holding?",
    "Great question! In the photo, the man is holding an umbrella with both hands. The umbrella "
    "seems to protect him from the rain, which gives the whole scene a calm and quiet mood.",
    "The man holds an umbrella with both hands to protect himself from the rain, and the scene "
    "feels calm and quiet.",
)
REVIEW_SYSTEM = "You are a careful judge of answers."
REVIEW_USER = (
    "Question: {question}\n\nAnswer A: {a}\n\nAnswer B: {b}\n\n"
    "Which answer is better? The better answer is clear and natural and keeps every fact "
    "without adding anything. Reply with A or B."
)
REVIEW_LABELS = ("A", "B")


# --------------------------------------------------------------------------------- prompts
def rewrite_messages(question: str, answer: str) -> list[dict[str, str]]:
    q, a, r = REWRITE_EXAMPLE
    return [
        {"role": "system", "content": REWRITE_SYSTEM},
        {"role": "user", "content": REWRITE_USER.format(question=q, answer=a)},
        {"role": "assistant", "content": r},
        {"role": "user", "content": REWRITE_USER.format(question=question, answer=answer)},
    ]


def review_messages(question: str, a: str, b: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": REVIEW_SYSTEM},
        {"role": "user", "content": REVIEW_USER.format(question=question, a=a, b=b)},
    ]


def prompt_texts() -> str:
    """All prompts, for the MLflow run and the docs."""
    return json.dumps(
        {"rewrite": rewrite_messages("{question}", "{answer}"),
         "review": review_messages("{question}", "{a}", "{b}"), "labels": REVIEW_LABELS},
        indent=2,
    )


# ----------------------------------------------------------------------------------- cache
class ResponseCache:
    """Model outputs keyed by (model fingerprint, kind, prompt, settings); JSONL, append-only."""

    def __init__(self, folder: str | Path | None, fingerprint: str):
        self.path = Path(folder) / f"{fingerprint[:20]}.jsonl" if folder else None
        self.data: dict[str, Any] = {}
        self.hits = self.misses = 0
        if self.path and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.data[row["k"]] = row["v"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a torn last line from an interrupted run: recomputed
        self.fingerprint = fingerprint

    def key(self, kind: str, prompt: Any, settings: dict[str, Any]) -> str:
        blob = json.dumps([CACHE_VERSION, self.fingerprint, kind, prompt, settings], sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def get(self, key: str) -> Any:
        if key in self.data:
            self.hits += 1
            return self.data[key]
        self.misses += 1
        return None

    def put(self, items: dict[str, Any]) -> None:
        self.data.update(items)
        if self.path and items:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps({"k": k, "v": v}) + "\n" for k, v in items.items())


# ------------------------------------------------------------------------------- inner LLM
class LLM(Protocol):
    fingerprint: str
    reply_lead: str

    def chat(self, messages: list[dict[str, str]]) -> str: ...
    def n_tokens(self, text: str) -> int: ...
    def generate(self, prompts: list[str], caps: list[int]) -> list[dict[str, Any]]: ...
    def choice_logits(self, prompts: list[str], labels: tuple[str, ...]) -> list[list[float]]: ...
    def nll(self, prompts: list[str], responses: list[str]) -> list[tuple[float, int]]: ...


class InnerLLM:
    """The language model of an HF LLaVA folder, used text-only through its chat template."""

    def __init__(self, path: str | Path, *, dtype: str = "auto", batch_size: int = 16,
                 temperature: float = 0.0, seed: int = 0, no_repeat_ngram: int = 0):
        import torch

        from align2llava.models.loading import load_mllm

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = resolve(dtype, device, "restyle").weights
        self.model, processor = load_mllm(path, dtype=self.dtype, device=device)
        self.model.eval()
        self.device = device
        self.tok = processor.tokenizer
        self.template = self.tok.chat_template or getattr(processor, "chat_template", None)
        if not self.template:
            raise DataError(f"{path}: the tokenizer has no chat template")
        # what the template puts between its generation prompt and a reply (" " for llava-hf)
        self.reply_lead = reply_lead(self.tok, self.template)
        pair = self.tok("x y", add_special_tokens=False).input_ids
        self._drops_lead = len(pair) > 1 and self.tok.decode(pair[1:]) != " y"
        self.batch_size, self.temperature, self.seed = batch_size, temperature, seed
        self.no_repeat_ngram = no_repeat_ngram
        # outputs differ by dtype, so it is part of the cache key
        self.fingerprint = f"{fingerprint(path, suffixes=MODEL_FILES)}-{self.dtype}"
        inner = getattr(self.model, "model", self.model)
        body = getattr(inner, "language_model", None)
        self.body = body if body is not None else self.model.get_decoder()
        self.head = self.model.get_output_embeddings()
        # scores (review logits, NLL) in float32 even when the model runs in bfloat16: bf16
        # logits move in steps of 0.125 around 20, coarser than the A/B margins we compare
        self.head_f32 = self.head.weight.detach().float()
        params = inspect.signature(self.body.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in 5.x
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = {self.tok.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}

    def chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt for `messages` through the checkpoint's own template (plain-string or
        structured content, models.chat), ending with its generation prompt."""
        return render(self.tok, messages, generation_prompt=True, template=self.template)

    def n_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False).input_ids)

    def prompt_ids(self, prompt: str) -> list[int]:
        """A rendered prompt's ids: no special tokens added but a BOS the template leaves out."""
        return text_ids(self.tok, prompt)

    def _batch(self, texts: list[str], side: str) -> tuple[Any, Any]:
        return self._batch_ids([self.prompt_ids(t) for t in texts], side)

    def _batch_ids(self, ids: list[list[int]], side: str) -> tuple[Any, Any]:
        b = pad_batch(ids, self.tok.pad_token_id, side=side, device=self.device)  # type: ignore[arg-type]
        return b["input_ids"], b["attention_mask"]

    def generate(self, prompts: list[str], caps: list[int]) -> list[dict[str, Any]]:
        """Continue each prompt until end of turn or its own token cap: {"text", "finished", "tokens"}.

        Greedy (or sampled at `temperature`) decoding with a KV cache. The batch's common token
        prefix (system prompt, worked example, instructions) is encoded once and shared; the
        rest is left-padded after it; rows leave the batch as soon as they finish.
        """
        import torch
        from transformers import DynamicCache

        ids = [self.prompt_ids(p) for p in prompts]
        n_shared = 0
        while n_shared < min(len(x) for x in ids) - 1 and all(x[n_shared] == ids[0][n_shared] for x in ids):
            n_shared += 1
        rows = len(ids)
        cache = DynamicCache(config=self.body.config)
        kw = {self._cache_kw: cache, "use_cache": True}
        gen = torch.Generator(device=self.device).manual_seed(self.seed) if self.temperature > 0 else None
        out_tokens: list[list[int]] = [[] for _ in ids]
        finished = [False] * rows
        with torch.inference_mode():
            if n_shared:
                self.body(input_ids=torch.tensor([ids[0][:n_shared]], device=self.device), **kw)
                cache.batch_repeat_interleave(rows)
            suffix, smask = self._batch_ids([x[n_shared:] for x in ids], "left")
            mask = torch.cat([torch.ones((rows, n_shared), dtype=torch.long, device=self.device), smask], 1)
            pos = n_shared + (smask.cumsum(-1) - 1).clamp(min=0)
            hidden = self.body(input_ids=suffix, attention_mask=mask, position_ids=pos, **kw).last_hidden_state[:, -1]
            next_pos = pos[:, -1] + 1
            active = list(range(rows))
            for _ in range(max(caps)):
                logits = self.head(hidden).float()
                if self.no_repeat_ngram:
                    self._ban_repeats(logits, [out_tokens[r] for r in active])
                if gen is None:
                    picked = logits.argmax(-1)
                else:
                    probs = torch.softmax(logits / self.temperature, -1)
                    picked = torch.multinomial(probs, 1, generator=gen)[:, 0]
                keep = []
                for j, r in enumerate(active):
                    token = int(picked[j])
                    if token in self.stop_ids:
                        finished[r] = True
                        continue
                    out_tokens[r].append(token)
                    if len(out_tokens[r]) < caps[r]:
                        keep.append(j)
                if not keep:
                    break
                if len(keep) < len(active):
                    index = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(index)
                    mask, next_pos, picked = mask[index], next_pos[index], picked[index]
                    active = [active[j] for j in keep]
                mask = torch.cat([mask, torch.ones((len(active), 1), dtype=torch.long, device=self.device)], 1)
                hidden = self.body(input_ids=picked[:, None], attention_mask=mask,
                                   position_ids=next_pos[:, None], **kw).last_hidden_state[:, -1]
                next_pos = next_pos + 1
        return [
            {"text": self.continuation(row[-1], toks), "finished": done, "tokens": len(toks)}
            for row, toks, done in zip(ids, out_tokens, finished)
        ]

    def continuation(self, last_prompt_id: int, toks: list[int]) -> str:
        """The text of generated tokens as it continues the prompt. A SentencePiece tokenizer
        (Llama's) drops a leading space when decoding tokens on their own ("▁it" -> "it"), which
        would glue a prefilled "Yes" to the next word; such tokens are decoded after the
        prompt's last token, and that token's text is taken off again."""
        if not self._drops_lead:
            return self.tok.decode(toks, skip_special_tokens=True)
        head = self.tok.decode([last_prompt_id], skip_special_tokens=True)
        both = self.tok.decode([last_prompt_id, *toks], skip_special_tokens=True)
        return both[len(head):] if both.startswith(head) else self.tok.decode(toks, skip_special_tokens=True)

    def _ban_repeats(self, logits: Any, generated: list[list[int]]) -> None:
        """Forbid each row's tokens that would complete an n-gram it already generated."""
        n = self.no_repeat_ngram
        for j, toks in enumerate(generated):
            if len(toks) < n:
                continue
            tail = toks[len(toks) - n + 1:]
            banned = [toks[i + n - 1] for i in range(len(toks) - n + 1) if toks[i: i + n - 1] == tail]
            if banned:
                logits[j, banned] = float("-inf")

    def choice_logits(self, prompts: list[str], labels: tuple[str, ...]) -> list[list[float]]:
        """Next-token logits of each label's first token after each prompt."""
        import torch

        ids = [self.tok(lab, add_special_tokens=False).input_ids[0] for lab in labels]
        input_ids, mask = self._batch(prompts, "left")
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
        with torch.inference_mode():
            hidden = self.body(input_ids=input_ids, attention_mask=mask, position_ids=positions).last_hidden_state
            logits = hidden[:, -1].float() @ self.head_f32[ids].T
        return logits.tolist()

    def nll(self, prompts: list[str], responses: list[str]) -> list[tuple[float, int]]:
        """(summed NLL, tokens) of each response given its prompt."""
        import torch

        p_ids = [self.prompt_ids(p) for p in prompts]
        r_ids = [self.tok(r, add_special_tokens=False).input_ids for r in responses]
        input_ids, mask = self._batch_ids([p + r for p, r in zip(p_ids, r_ids)], "right")
        out = []
        with torch.inference_mode():
            hidden = self.body(input_ids=input_ids, attention_mask=mask).last_hidden_state
            for i, (p, r) in enumerate(zip(p_ids, r_ids)):
                if not r:
                    out.append((0.0, 0))
                    continue
                pos = torch.arange(len(p) - 1, len(p) + len(r) - 1, device=hidden.device)
                logits = hidden[i, pos].float() @ self.head_f32.T
                target = torch.tensor(r, device=hidden.device)
                loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
                out.append((float(loss), len(r)))
        return out
