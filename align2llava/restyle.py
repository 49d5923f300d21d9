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

import hashlib
import inspect
import json
import logging
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import Field

from .config import Section
from .errors import DataError

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when model-call code changes what a key returns

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
    # auto: bfloat16 where the GPU or CPU computes it natively (AMX / AVX512-BF16: ~3x faster
    # prefill than float32 on the demo CPU), else float32. Or float32 / bfloat16 / float16.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    cache_dir: str = ".cache/restyle"


# ------------------------------------------------------------------------------ content check
COLORS = {
    "red", "green", "blue", "yellow", "black", "white", "gray", "brown", "teal", "orange",
    "purple", "pink", "cyan", "magenta", "violet", "gold", "silver", "beige", "navy", "maroon",
    "olive", "turquoise", "indigo",
}
SHAPES = {
    "circle", "square", "rectangle", "triangle", "ellipse", "oval", "star", "hexagon",
    "pentagon", "octagon", "diamond", "polygon", "sphere", "cube", "cone", "cylinder", "heart",
    "cross", "arrow", "line", "dot", "ring",
}
POSITIONS = {"left", "right", "top", "bottom", "center"}
SIZES = {"small", "medium", "large"}
NUMBERS = {
    "zero": 0, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
    "dozen": 12, "pair": 2, "both": 2, "twice": 2,
}
# Object nouns (COCO's 80 categories, common scene and everyday nouns, parts of shapes). Meta
# and region words (image, picture, scene, shape, object, color, background) are deliberately
# absent: a rewrite may swap them freely.
OBJECTS = set("""
person man woman child boy girl baby people player rider bicycle bike car motorcycle airplane
plane bus train truck boat ship hydrant sign bench bird cat dog horse
sheep cow elephant bear zebra giraffe backpack umbrella handbag bag tie suitcase frisbee skis ski
snowboard ball kite bat glove skateboard surfboard racket bottle glass cup fork knife spoon bowl
banana apple sandwich orange broccoli carrot pizza donut cake chair couch sofa plant bed table
toilet tv television laptop mouse remote keyboard phone microwave oven toaster sink refrigerator
fridge book clock vase scissors teddy toothbrush tree grass flower sky cloud sun moon water sea
ocean river lake beach sand snow mountain hill road street sidewalk building house wall floor
window door roof fence field park city room kitchen bathroom desk shelf lamp mirror curtain
painting paint tube coin button box ring wheel tire pole wire rope flag food plate
fruit vegetable bread meat cheese egg text word letter logo wood paper screen slice
shadow border edge corner side sparrow pigeon duck fish animal
vehicle hat shirt jacket coat dress shoe helmet glasses
""".split())
IRREGULAR = {"people": "person", "men": "man", "women": "woman", "children": "child",
             "mice": "mouse", "knives": "knife", "leaves": "leaf", "shelves": "shelf",
             "geese": "goose", "feet": "foot", "teeth": "tooth"}
ALIASES = {
    "grey": "gray", "golden": "gold", "circular": "circle", "rectangular": "rectangle",
    "triangular": "triangle", "spherical": "sphere", "cubic": "cube", "upper": "top",
    "lower": "bottom", "centre": "center", "middle": "center", "central": "center",
    "centered": "center", "centred": "center", "big": "large", "tiny": "small", "photo": None,
    "bicycles": "bicycle", "tv": "television", "sofa": "couch", "fridge": "refrigerator",
    "bike": "bicycle", "plane": "airplane",
}
NEGATIONS = {"not", "no", "none", "never", "nothing", "neither", "nor", "without", "cannot",
             "nobody", "nowhere"}
_TOKEN = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")
_SENT_START = re.compile(r"(^|[.!?:;]\s+|\n)[\"'(\[]*$")
CATEGORIES = ("color", "shape", "count", "position", "size", "object", "name")


def _singular(word: str) -> str:
    if word in IRREGULAR:
        return IRREGULAR[word]
    for suffix, repl in (("ies", "y"), ("ves", "f"), ("es", ""), ("s", "")):
        if word.endswith(suffix) and len(word) > len(suffix) + 2:
            stem = word[: -len(suffix)] + repl
            if stem in OBJECTS or stem in SHAPES or stem in COLORS:
                return stem
    return word


def facts(text: str) -> dict[str, set[str]]:
    """The checkable facts of one answer, by category (words normalised: grey->gray, circles->circle)."""
    out: dict[str, set[str]] = {c: set() for c in CATEGORIES}
    tokens = list(_TOKEN.finditer(text))
    for i, m in enumerate(tokens):
        raw = m.group(0)
        w = raw.lower()
        nxt = tokens[i + 1].group(0).lower() if i + 1 < len(tokens) else ""
        if w.endswith("n't"):
            continue
        w = ALIASES.get(w, w) if w in ALIASES else _singular(w)
        if w is None:
            continue
        if w.isdigit():
            if int(w) != 1:
                out["count"].add(str(int(w)))
        elif w in NUMBERS:
            out["count"].add(str(NUMBERS[w]))
        elif w in COLORS:
            out["color"].add(w)
        elif w in SHAPES:
            out["shape"].add(w)
        elif w in POSITIONS and not (w == "right" and nxt.startswith("angle")):
            out["position"].add(w)
        elif w in SIZES:
            out["size"].add(w)
        elif w in OBJECTS:
            out["object"].add(w)
        elif raw[0].isupper() and raw != "I" and not _SENT_START.search(text[: m.start()]):
            out["name"].add(w)
    return out


_OPENER = re.compile(
    r"^\s*(?:certainly|sure|great question|good question|of course|absolutely|indeed|well|okay|ok)"
    r"\s*[!.,]\s*",
    re.I,
)


def polarity(text: str) -> str | None:
    """'yes' / 'no' when the answer opens with it (after an interjection like "Sure!"), else None."""
    m = _TOKEN.search(_OPENER.sub("", text, count=1))
    w = m.group(0).lower() if m else ""
    return w if w in ("yes", "no") else None


def first_yes_no(text: str) -> str | None:
    for m in _TOKEN.finditer(text):
        w = m.group(0).lower()
        if w in ("yes", "no"):
            return w
    return None


def negated(text: str) -> bool:
    """Whether the answer negates anything beyond an opening yes/no."""
    tokens = [m.group(0).lower() for m in _TOKEN.finditer(_OPENER.sub("", text, count=1))]
    if tokens and tokens[0] in ("yes", "no"):
        tokens = tokens[1:]
    return any(t in NEGATIONS or t.endswith("n't") for t in tokens)


def check_content(original: str, rewrite: str, min_ratio: float = 0.5, max_ratio: float = 1.5) -> list[str]:
    """Failures of the rule-based content check (empty list: the rewrite passes).

    A failure reads `lost color: red`, `added object: dog`, `polarity: yes -> no`,
    `negation lost`, `negation added`, `too short: 5/20 words`, `too long: 40/20 words`.
    """
    fails: list[str] = []
    before, after = facts(original), facts(rewrite)
    for cat in CATEGORIES:
        for w in sorted(before[cat] - after[cat]):
            fails.append(f"lost {cat}: {w}")
        for w in sorted(after[cat] - before[cat]):
            fails.append(f"added {cat}: {w}")
    pol = polarity(original)
    if pol is not None and first_yes_no(rewrite) != pol:
        fails.append(f"polarity: {pol} -> {first_yes_no(rewrite) or 'none'}")
    elif pol is None and polarity(rewrite) is not None:
        fails.append(f"polarity: none -> {polarity(rewrite)}")
    neg_b, neg_a = negated(original), negated(rewrite)
    if neg_b != neg_a:
        fails.append("negation lost" if neg_b else "negation added")
    n_b, n_a = len(_TOKEN.findall(original)), len(_TOKEN.findall(rewrite))
    if n_a < min_ratio * n_b:
        fails.append(f"too short: {n_a}/{n_b} words")
    if n_a > max_ratio * n_b:
        fails.append(f"too long: {n_a}/{n_b} words")
    return fails


def failure_kind(failure: str) -> str:
    """`lost color: red` -> `lost_color`; `too short: 5/20 words` -> `too_short`."""
    return failure.split(":")[0].replace(" ", "_")


_PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|certainly|of course|okay|ok)[!,.]\s*)?"
    r"(?:here(?:'s| is) (?:the |a |my )?(?:rewritten |new )?(?:answer|version)\s*[:.]\s*|"
    r"(?:rewritten |new )?answer\s*:\s*)",
    re.I,
)


def clean_rewrite(text: str) -> str:
    """Strip a leading label ("Answer:", "Here is the rewritten answer:") and wrapping quotes."""
    text = _PREAMBLE.sub("", text.strip(), count=1).strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def _norm(text: str) -> str:
    return " ".join(_TOKEN.findall(text.lower()))


def repetitive(original: str, rewrite: str, n: int = 6) -> bool:
    """Whether the rewrite repeats a run of n words more often than the original does (a
    degenerate loop such as a sentence written twice)."""
    def grams(text: str) -> dict[tuple[str, ...], int]:
        words = _norm(text).split()
        out: dict[tuple[str, ...], int] = {}
        for i in range(len(words) - n + 1):
            g = tuple(words[i: i + n])
            out[g] = out.get(g, 0) + 1
        return out

    before = grams(original)
    return any(c > 1 and c > before.get(g, 0) for g, c in grams(rewrite).items())


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
                for k, v in items.items():
                    f.write(json.dumps({"k": k, "v": v}) + "\n")


# ------------------------------------------------------------------------------- inner LLM
class LLM(Protocol):
    fingerprint: str

    def chat(self, messages: list[dict[str, str]]) -> str: ...
    def n_tokens(self, text: str) -> int: ...
    def generate(self, prompts: list[str], caps: list[int]) -> list[dict[str, Any]]: ...
    def choice_logits(self, prompts: list[str], labels: tuple[str, ...]) -> list[list[float]]: ...
    def nll(self, prompts: list[str], responses: list[str]) -> list[tuple[float, int]]: ...


def model_fingerprint(path: str | Path) -> str:
    """sha256 over the model folder's config, tokenizer, template and weight files."""
    path = Path(path)
    h = hashlib.sha256()
    names = sorted(
        p for p in path.iterdir()
        if p.is_file() and (p.suffix in (".json", ".jinja", ".safetensors", ".model", ".txt"))
    )
    for p in names:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def resolve_restyle_dtype(name: str) -> str:
    """`auto` -> bfloat16 where computed natively (CUDA, or a CPU with AMX/AVX512-BF16), else float32."""
    if name != "auto":
        return name
    import torch

    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "bfloat16" if native else "float32"


class InnerLLM:
    """The language model of an HF LLaVA folder, used text-only through its chat template."""

    def __init__(self, path: str | Path, *, dtype: str = "auto", batch_size: int = 16,
                 temperature: float = 0.0, seed: int = 0, no_repeat_ngram: int = 0):
        import torch

        from .modeling import load_mllm

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = resolve_restyle_dtype(dtype)
        self.model, processor = load_mllm(path, dtype=self.dtype, device=device)
        self.model.eval()
        self.device = device
        self.tok = processor.tokenizer
        self.template = self.tok.chat_template or getattr(processor, "chat_template", None)
        if not self.template:
            raise DataError(f"{path}: the tokenizer has no chat template")
        self.batch_size, self.temperature, self.seed = batch_size, temperature, seed
        self.no_repeat_ngram = no_repeat_ngram
        # outputs differ by dtype, so it is part of the cache key
        self.fingerprint = f"{model_fingerprint(path)}-{self.dtype}"
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
        return self.tok.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=True
        )

    def n_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False).input_ids)

    def _batch(self, texts: list[str], side: str) -> tuple[Any, Any]:
        return self._batch_ids([self.tok(t, add_special_tokens=False).input_ids for t in texts], side)

    def _batch_ids(self, ids: list[list[int]], side: str) -> tuple[Any, Any]:
        import torch

        width = max(len(x) for x in ids)
        pad = self.tok.pad_token_id
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            sl = slice(width - len(x), width) if side == "left" else slice(0, len(x))
            input_ids[i, sl] = torch.tensor(x)
            mask[i, sl] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def generate(self, prompts: list[str], caps: list[int]) -> list[dict[str, Any]]:
        """Continue each prompt until end of turn or its own token cap: {"text", "finished", "tokens"}.

        Greedy (or sampled at `temperature`) decoding with a KV cache. The batch's common token
        prefix (system prompt, worked example, instructions) is encoded once and shared; the
        rest is left-padded after it; rows leave the batch as soon as they finish.
        """
        import torch
        from transformers import DynamicCache

        ids = [self.tok(p, add_special_tokens=False).input_ids for p in prompts]
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
            {"text": self.tok.decode(toks, skip_special_tokens=True), "finished": done, "tokens": len(toks)}
            for toks, done in zip(out_tokens, finished)
        ]

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

        p_ids = [self.tok(p, add_special_tokens=False).input_ids for p in prompts]
        r_ids = [self.tok(r, add_special_tokens=False).input_ids for r in responses]
        width = max(len(p) + len(r) for p, r in zip(p_ids, r_ids))
        input_ids = torch.full((len(p_ids), width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, (p, r) in enumerate(zip(p_ids, r_ids)):
            input_ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            mask[i, : len(p) + len(r)] = 1
        out = []
        with torch.inference_mode():
            hidden = self.body(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
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
    from .records import strip_image_token

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
    from tqdm import tqdm

    keys = [cache.key(kind, prompt, settings) for prompt, settings in jobs]
    results: list[Any] = [cache.get(k) for k in keys]
    todo = sorted({k: i for i, k in enumerate(keys) if results[i] is None}.values(),
                  key=lambda i: (len(json.dumps(jobs[i][0])), keys[i]))
    with tqdm(total=len(todo), desc=desc, unit="rec", disable=None) as bar:
        for batch in _batched(todo, batch_size):
            values = run([jobs[i] for i in batch])
            cache.put({keys[i]: v for i, v in zip(batch, values)})
            for i, v in zip(batch, values):
                results[i] = v
            bar.update(len(batch))
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
        jobs.append((llm.chat(rewrite_messages(t.question, t.original)) + prefix, {**settings, "cap": cap}))
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
    from .io import read_records_strict, write_jsonl, write_records

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
