"""Reward models f(I, Q) and g(I, Q, A): a LLaVA backbone with a scalar head (METHOD.md).

- Backbone: any LLaVA-architecture checkpoint folder (HF layout), without its LM head: the
  reward is read from the last non-padding token's final hidden state by a linear head
  (hidden -> 1, no bias). No chat template.
- Inputs: f = image, then all human turns joined by newlines; g = image, "Question: ..." line,
  "Answer: ..." line (`question_text`, `answer_text`).
- Training: Bradley-Terry loss on strict pairs plus corruption pairs (candidate > corrupted
  candidate) with probability `corruption_rate` per distinct candidate; LoRA on the LLM's linear
  layers (all of them, or only `layers_to_transform`), or a frozen LLM with a trainable projector.
  accelerate places it on CPU, one GPU or several processes.
- Frozen-prefix cache: when only the top LLM layers adapt (and the projector and vision tower are
  frozen) the hidden states entering the first adapted layer never change, so they are computed
  once and each step runs only the adapted layers: same result, several times faster.
- Saved layout (`save_reward_model`, `load_reward_model`): DIR/reward_config.json (kind, backbone
  path, input format, max length), DIR/reward_head.safetensors (head and, if trained, projector
  weights) and, for LoRA, the peft adapter (adapter_config.json, adapter_model.safetensors).
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from pydantic import Field

from .config import Section
from .errors import Align2LlavaError, DataError
from .images import load_rgb, resolve_image

log = logging.getLogger(__name__)

KINDS = ("question", "answer")
CONFIG_FILE = "reward_config.json"
HEAD_FILE = "reward_head.safetensors"
LLM_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TrainRewardParams(Section):
    """The `train_reward` section of params.yaml (paper values in the comments there)."""

    kinds: list[Literal["question", "answer"]] = ["question", "answer"]
    # lora: LoRA on the LLM (+ head, + projector if train_projector); frozen: frozen LLM, trainable
    # projector + head. The vision tower is always frozen.
    method: Literal["lora", "frozen"] = "lora"
    train_projector: bool = True
    lora_r: int = Field(128, ge=1)
    lora_alpha: int = Field(256, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    lora_target_modules: list[str] = LLM_LINEAR
    # LLM layer indices to adapt (negative: from the top); null: every layer.
    layers_to_transform: list[int] | None = None
    learning_rate: float = Field(2.0e-5, gt=0)
    projector_learning_rate: float = Field(2.0e-5, gt=0)
    num_train_epochs: float = Field(5, gt=0)
    # Pairs per step per process (times gradient_accumulation_steps times processes = global).
    per_device_train_batch_size: int = Field(64, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(2048, ge=8)
    corruption_rate: float = Field(0.25, ge=0.0, le=1.0)
    # Not in the paper (0 = off): per group, probability of an image-mismatch pair, the group's
    # best candidate over a best candidate written for another image (see mismatch_pairs).
    mismatch_rate: float = Field(0.0, ge=0.0, le=1.0)
    # Not in the paper (0 = off): image-swap pairs per best candidate, the candidate on its own
    # image over the same text on another training image (see image_swap_pairs).
    image_swaps: int = Field(0, ge=0)
    # Validate every N optimizer steps (0: once per epoch) and at the end.
    eval_steps: int = Field(0, ge=0)
    per_device_eval_batch_size: int = Field(32, ge=1)
    # auto: bf16 on GPUs that support it and on CPUs with native bf16 (AMX / AVX512-BF16), else fp32.
    dtype: Literal["auto", "float32", "bfloat16", "float16", "mixed"] = "auto"
    # Compute the frozen bottom layers once (only when just the top layers adapt).
    cache_frozen_layers: bool = True


# ----------------------------------------------------------------------------- inputs


def question_text(questions: str | Sequence[str]) -> str:
    """f's text: all human turns of an instruction joined by newlines."""
    if isinstance(questions, str):
        return questions.strip()
    return "\n".join(q.strip() for q in questions)


def answer_text(question: str, answer: str) -> str:
    """g's text: a Question line and an Answer line."""
    return f"Question: {question.strip()}\nAnswer: {answer.strip()}"


def precision(name: str = "auto", device: Any = "cpu") -> tuple[Any, Any]:
    """(weight dtype, autocast dtype or None) for a dtype setting.

    float32 / bfloat16 / float16: weights in that dtype (low precision: autocast too, so fp32
    adapters and heads mix in). mixed ("mixed" as weight dtype, see cast_backbone): linear
    layers in bf16, the rest (embeddings, norms, hence the residual stream) in fp32, bf16
    autocast. auto: bfloat16 on GPUs that support it; mixed on CPUs with native bf16 (AMX /
    AVX512-BF16: several times faster than fp32, and far steadier than bf16 weights, with which
    the demo's scores moved by up to ~0.9 (std ~1.2) with batch composition); else float32.
    """
    import torch

    if name == "auto":
        if not _is_cpu(device):
            name = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        else:
            name = "mixed" if cpu_has_native_bf16() else "float32"
    if name == "mixed":
        return "mixed", torch.bfloat16
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    return dt, (dt if dt != torch.float32 else None)


def cast_backbone(llava: Any, weight_dtype: Any) -> None:
    """Weights to `weight_dtype`; "mixed": linear layers in bf16 (cast once, not per call),
    everything else (embeddings, norms, so the residual stream) in fp32."""
    import torch

    if weight_dtype != "mixed":
        llava.to(weight_dtype)
        return
    llava.to(torch.float32)
    for m in llava.modules():
        if isinstance(m, torch.nn.Linear):
            m.to(torch.bfloat16)


def _is_cpu(device: Any) -> bool:
    """True for "cpu" and for the "cpu:<rank>" devices accelerate gives CPU processes."""
    return str(device).split(":")[0] == "cpu"


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


class Encoder:
    """Text + image -> token ids and pixel values for the reward models (no chat template)."""

    def __init__(self, processor: Any, max_length: int, image_root: str | Path | None = None,
                 cache_images: int = 4096):
        from PIL import Image

        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.image_token = getattr(processor, "image_token", "<image>")
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        dummy = Image.new("RGB", (32, 32))
        enc = processor(text=[self.image_token], images=[dummy], return_tensors="pt")
        self.n_image_tokens = int((enc["input_ids"] == self.image_token_id).sum())
        self.max_length = max_length
        if max_length < self.n_image_tokens + 4:
            raise Align2LlavaError(
                f"max_length {max_length} leaves no room for text after {self.n_image_tokens} image tokens"
            )
        self.image_root = image_root
        self._pixels: OrderedDict[str, Any] = OrderedDict()
        self._cache_images = cache_images

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def ids(self, text: str, has_image: bool) -> list[int]:
        """Token ids with the image placeholder expanded, cut to max_length (text end dropped)."""
        prefix = f"{self.image_token}\n" if has_image else ""
        ids = self.tokenizer(prefix + text, add_special_tokens=True)["input_ids"]
        if has_image:
            k = ids.index(self.image_token_id)
            ids = ids[:k] + [self.image_token_id] * self.n_image_tokens + ids[k + 1 :]
        return ids[: self.max_length]

    def pixels(self, image: str) -> Any:
        """Pixel values of one image (relative to image_root), cached."""
        px = self._pixels.get(image)
        if px is not None:
            self._pixels.move_to_end(image)
            return px
        path = resolve_image(self.image_root, image) if self.image_root is not None else Path(image)
        px = self.image_processor(images=[load_rgb(path)], return_tensors="pt")["pixel_values"][0]
        self._pixels[image] = px
        if len(self._pixels) > self._cache_images:
            self._pixels.popitem(last=False)
        return px

    def batch(self, items: Sequence[tuple[list[int], str | None]], dtype: Any = None) -> dict[str, Any]:
        """Right-padded batch of (ids, image) items."""
        import torch

        width = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, (ids, _) in enumerate(items):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, : len(ids)] = 1
        images = [self.pixels(im) for _, im in items if im is not None]
        out = {"input_ids": input_ids, "attention_mask": mask}
        if images:
            px = torch.stack(images)
            out["pixel_values"] = px.to(dtype) if dtype is not None else px
        return out


# ----------------------------------------------------------------------------- model


def _torch_module() -> Any:
    import torch

    return torch.nn.Module


def last_token_index(attention_mask: Any) -> Any:
    """Index of the last non-padding token per row (left or right padding)."""
    import torch

    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (pos + 1)).argmax(-1)


class RewardModel(_torch_module()):  # type: ignore[misc]
    """LLaVA backbone (LlavaModel, possibly peft-wrapped) + a linear head on the last token."""

    def __init__(self, backbone: Any, hidden_size: int, start_layer: int | None = None):
        import torch

        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(hidden_size, 1, bias=False)
        torch.nn.init.zeros_(self.head.weight)
        # First adapted LLM layer when a frozen-prefix cache is used, else None.
        self.start_layer = start_layer
        self.autocast_dtype: Any = None

    def use_autocast(self, dtype: Any) -> None:
        """Run the backbone under autocast to `dtype` (bf16/fp16; None: off): matmuls in low
        precision, fp32 adapters without casting every activation to fp32; the head stays fp32."""
        import torch

        if dtype in (torch.bfloat16, torch.float16):
            self.autocast_dtype = dtype
            for m in self.backbone.modules():
                if hasattr(m, "cast_input_dtype_enabled"):
                    m.cast_input_dtype_enabled = False

    def _amp(self, device_type: str) -> Any:
        import torch

        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def llava(self) -> Any:
        bb = self.backbone
        return bb.get_base_model() if hasattr(bb, "get_base_model") else bb

    def forward(self, input_ids: Any = None, attention_mask: Any = None, pixel_values: Any = None,
                hidden: Any = None) -> Any:
        """Rewards [B]. Given `hidden` (cached states entering `start_layer`), runs only the top."""
        import torch

        with self._amp(attention_mask.device.type):
            if hidden is not None:
                lm = self.llava().language_model
                with _only_layers(lm, self.start_layer, None):
                    h = lm(inputs_embeds=hidden, attention_mask=attention_mask).last_hidden_state
            else:
                h = self.backbone(
                    input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values
                ).last_hidden_state
        idx = last_token_index(attention_mask)
        last = h[torch_arange(h.shape[0], h.device), idx]
        return self.head(last.to(self.head.weight.dtype)).squeeze(-1)

    def prefix_hidden(self, input_ids: Any, attention_mask: Any, pixel_values: Any = None) -> Any:
        """Hidden states entering layer `start_layer` (the frozen prefix), no grad."""
        import torch

        lm = self.llava().language_model
        captured: list[Any] = []
        hook = lm.norm.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            with torch.no_grad(), self._amp(input_ids.device.type), _only_layers(lm, 0, self.start_layer):
                self.llava()(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
        finally:
            hook.remove()
        return captured[0]


def torch_arange(n: int, device: Any) -> Any:
    import torch

    return torch.arange(n, device=device)


class _only_layers:
    """Temporarily run a decoder stack on layers[start:stop] (same modules, same weights)."""

    def __init__(self, lm: Any, start: int | None, stop: int | None):
        self.lm, self.start, self.stop = lm, start, stop

    def __enter__(self) -> None:
        self.saved = self.lm.layers
        self.lm.layers = self.saved[self.start : self.stop]

    def __exit__(self, *exc: Any) -> None:
        self.lm.layers = self.saved


def _lora_regex(n_layers: int, layers: list[int] | None, modules: list[str]) -> str:
    idx = "\\d+" if layers is None else "|".join(str(i) for i in layers)
    mods = "|".join(re.escape(m) for m in modules)
    return rf"(.*\.)?language_model\.layers\.({idx})\.[^.]+\.({mods})"


def resolve_layers(layers: list[int] | None, n_layers: int) -> list[int] | None:
    if layers is None:
        return None
    out = sorted({i % n_layers if -n_layers <= i < n_layers else -1 for i in layers})
    if not out or out[0] < 0:
        raise Align2LlavaError(f"layers_to_transform {layers} is outside the LLM's {n_layers} layers")
    return out


def build_reward_model(
    base_model: str | Path, params: TrainRewardParams, *, device: str = "cpu",
) -> tuple[RewardModel, Any]:
    """A trainable reward model on `base_model` per `params`; returns (model, processor)."""
    import torch

    from .modeling import load_mllm

    dtype, amp = precision(params.dtype, device)
    model, processor = load_mllm(base_model, dtype="float32")
    backbone = model.model  # LlavaModel: vision tower + projector + LLM, no LM head
    del model
    cast_backbone(backbone, dtype)
    backbone.requires_grad_(False)
    n_layers = len(backbone.language_model.layers)
    layers = resolve_layers(params.layers_to_transform, n_layers)
    hidden = int(backbone.config.text_config.hidden_size)
    train_proj = params.method == "frozen" or params.train_projector
    if train_proj:  # trained in fp32, fed by an fp32 vision tower
        backbone.vision_tower.to(torch.float32)
        backbone.multi_modal_projector.to(torch.float32).requires_grad_(True)
    if params.method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=params.lora_r,
            lora_alpha=params.lora_alpha,
            lora_dropout=params.lora_dropout,
            target_modules=_lora_regex(n_layers, layers, params.lora_target_modules),
            bias="none",
        )
        backbone = get_peft_model(backbone, config)  # adapters in fp32
        if train_proj:
            backbone.get_base_model().multi_modal_projector.requires_grad_(True)
    start = None
    if (params.cache_frozen_layers and params.method == "lora" and layers is not None
            and not train_proj and layers[0] > 0):
        start = layers[0]
    if _is_cpu(device):
        # CPU: eager attention backpropagates through bf16 matmuls, several times faster than
        # the CPU SDPA kernel's backward
        (backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone).set_attn_implementation("eager")
    rm = RewardModel(backbone, hidden, start_layer=start)
    rm.to(device)
    rm.use_autocast(amp)
    return rm, processor


def trainable_parameters(rm: RewardModel) -> list[tuple[str, Any]]:
    return [(n, p) for n, p in rm.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- corruption


def corrupt(text: str, kind: str, rng: random.Random) -> str | None:
    """A degraded version of a candidate, or None when no corruption changes it.

    answer: word shuffle or a random subset of the words (in order);
    question: shuffle / crop / duplicate the questions of the set (word shuffle for one question).
    """
    ops: list[Callable[[], str]] = []
    if kind == "question":
        qs = [q for q in text.split("\n") if q.strip()]
        if len(qs) > 1:
            ops += [lambda: "\n".join(rng.sample(qs, len(qs))),
                    lambda: "\n".join(qs[: rng.randint(1, len(qs) - 1)])]
        if qs:
            ops.append(lambda: "\n".join(qs + [rng.choice(qs)]))
        if len(qs) == 1:
            ops.append(lambda: _shuffle_words(qs[0], rng))
    else:
        words = text.split()
        if len(words) >= 2:
            ops += [lambda: _shuffle_words(text, rng), lambda: _subset_words(words, rng)]
    rng.shuffle(ops)
    for op in ops:
        out = op()
        if out.strip() and out != text:
            return out
    return None


def _shuffle_words(text: str, rng: random.Random) -> str:
    words = text.split()
    return " ".join(rng.sample(words, len(words)))


def _subset_words(words: list[str], rng: random.Random) -> str:
    keep = max(1, min(len(words) - 1, round(len(words) * rng.uniform(0.3, 0.7))))
    idx = sorted(rng.sample(range(len(words)), keep))
    return " ".join(words[i] for i in idx)


def augmentation_pairs(pairs: Sequence[dict[str, Any]], kind: str, rate: float, seed: int) -> list[dict[str, Any]]:
    """(candidate > corrupted candidate) pairs for a `rate` share of the distinct candidates.

    Drawn once per training run from the seed (not per epoch), so reruns are identical.
    """
    rng = random.Random(f"{seed}:{kind}:corrupt")
    seen: dict[tuple[str, str, str, str], None] = {}
    for p in pairs:
        for text in (p["chosen"], p["rejected"]):
            seen.setdefault((p["group"], p["image"], p["prompt"], text), None)
    out = []
    for group, image, prompt, text in seen:
        if rng.random() >= rate:
            continue
        bad = corrupt(text, kind, rng)
        if bad is not None:
            out.append({"group": group, "image": image, "prompt": prompt, "chosen": text,
                        "rejected": bad, "augmented": True})
    return out


def _group_info(pairs: Sequence[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """Per group, its (image, prompt)."""
    info: dict[str, tuple[str, str]] = {}
    for p in pairs:
        info.setdefault(p["group"], (p["image"], p["prompt"]))
    return info


def _best_candidates(pairs: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Per group, its candidates that are chosen in some pair and rejected in none."""
    rejected: dict[str, set[str]] = {}
    for p in pairs:
        rejected.setdefault(p["group"], set()).add(p["rejected"])
    best: dict[str, list[str]] = {}
    for p in pairs:
        b = best.setdefault(p["group"], [])
        if p["chosen"] not in rejected[p["group"]] and p["chosen"] not in b:
            b.append(p["chosen"])
    return best


def mismatch_pairs(pairs: Sequence[dict[str, Any]], kind: str, rate: float, seed: int) -> list[dict[str, Any]]:
    """(top candidate of a group > a top candidate written for another image) pairs.

    An extension beyond the paper (off at rate 0): image-text mismatch negatives make the RM
    look at the image. For each group, with probability `rate`, its best candidate (one never
    rejected in the group) is preferred, on the group's own image and prompt, over a best
    candidate of a random group on a different image (same prompt when one exists).
    """
    if rate <= 0:
        return []
    rng = random.Random(f"{seed}:{kind}:mismatch")
    info = _group_info(pairs)
    best = _best_candidates(pairs)
    groups = sorted(g for g in best if best[g])
    by_prompt: dict[str, list[str]] = {}
    for g in groups:
        by_prompt.setdefault(info[g][1], []).append(g)
    out = []
    for g in groups:
        if rng.random() >= rate:
            continue
        image, prompt = info[g]
        pool = [o for o in by_prompt[prompt] if info[o][0] != image] or [o for o in groups if info[o][0] != image]
        if not pool:
            continue
        other = rng.choice(pool)
        chosen, bad = rng.choice(best[g]), rng.choice(best[other])
        if chosen != bad:
            out.append({"group": g, "image": image, "prompt": prompt, "chosen": chosen, "rejected": bad,
                        "augmented": True})
    return out


def image_swap_pairs(pairs: Sequence[dict[str, Any]], kind: str, swaps: int, seed: int) -> list[dict[str, Any]]:
    """(best candidate on its own image > the same text on another image) pairs, `swaps` per
    best candidate.

    An extension beyond the paper (off at 0): both sides hold the same text, so only looking
    at the image can tell them apart; the RM learns image-text agreement from every annotated
    group, not only from the few pairs whose candidates disagree about what the image shows.
    The other images are drawn (seeded) from the training pairs' images other than the group's.
    """
    if swaps <= 0:
        return []
    rng = random.Random(f"{seed}:{kind}:image-swap")
    info = _group_info(pairs)
    images = sorted({p["image"] for p in pairs if p.get("image")})
    out = []
    for g, texts in sorted(_best_candidates(pairs).items()):
        image, prompt = info[g]
        others = [im for im in images if im != image]
        if not image or not others:
            continue
        for text in texts:
            for other in rng.sample(others, min(swaps, len(others))):
                out.append({"group": g, "image": image, "prompt": prompt, "chosen": text, "rejected": text,
                            "rejected_image": other, "augmented": True})
    return out


def pair_text(kind: str, prompt: str, candidate: str) -> str:
    return question_text(candidate) if kind == "question" else answer_text(prompt, candidate)


# ----------------------------------------------------------------------------- scoring


def score_items(
    rm: RewardModel,
    encoder: Encoder,
    items: Sequence[tuple[str, str | None]],
    *,
    batch_size: int = 32,
    device: Any = "cpu",
    progress: str | None = None,
) -> list[float]:
    """Rewards of (text, image) items, batched by length (longest first), in input order."""
    import torch
    from tqdm import tqdm

    encoded = [(encoder.ids(t, im is not None), im) for t, im in items]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    out = [0.0] * len(items)
    dtype = next(p.dtype for p in rm.llava().parameters())
    rm.eval()
    bar = tqdm(total=len(items), desc=progress, unit="rec", disable=None if progress else True)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            batch = encoder.batch([encoded[i] for i in chunk], dtype=dtype)
            batch = {k: v.to(device) for k, v in batch.items()}
            r = rm(**batch).float().cpu().tolist()
            for i, v in zip(chunk, r):
                out[i] = v
            bar.update(len(chunk))
    bar.close()
    return out


def pairwise_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Share of pairs with r(chosen) > r(rejected); an exact tie counts one half."""
    if not chosen:
        return float("nan")
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected))
    return wins / len(chosen)


# ----------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    kind: str
    val_accuracy: float | None  # None without validation pairs
    val_accuracy_initial: float | None
    train_pairs: int
    augmented_pairs: int
    val_pairs: int
    steps: int
    final_loss: float
    seconds: float
    curve: list[dict[str, Any]] = field(default_factory=list)
    trainable_params: int = 0
    # The trained model and its encoder (in memory, for callers that score right away).
    model: Any = None
    encoder: Any = None


class _PairData:
    """Distinct texts of pairs, encoded once; pairs as (chosen index, rejected index)."""

    def __init__(self, kind: str, pairs: Sequence[dict[str, Any]], encoder: Encoder):
        self.items: list[tuple[list[int], str | None]] = []
        self.index: dict[tuple[str | None, str], int] = {}
        self.pairs: list[tuple[int, int]] = []
        self.groups: dict[str, list[int]] = {}
        for n, p in enumerate(pairs):
            img = p.get("image") or None
            c = self._add(img, pair_text(kind, p["prompt"], p["chosen"]), encoder)
            r = self._add(p.get("rejected_image", img), pair_text(kind, p["prompt"], p["rejected"]), encoder)
            self.pairs.append((c, r))
            self.groups.setdefault(p["group"], []).append(n)

    def _add(self, image: str | None, text: str, encoder: Encoder) -> int:
        key = (image, text)
        if key not in self.index:
            self.index[key] = len(self.items)
            self.items.append((encoder.ids(text, image is not None), image))
        return self.index[key]

    def packs(self, pairs_per_pack: int, seed: int) -> list[list[int]]:
        """Whole groups packed into batches of about `pairs_per_pack` pairs (seeded order).

        A group's candidates share one batch, so each distinct text runs once per epoch however
        many pairs it is in; the loss is still the mean over the batch's pairs.
        """
        names = sorted(self.groups)
        random.Random(f"{seed}:packs").shuffle(names)
        packs: list[list[int]] = [[]]
        for g in names:
            if len(packs[-1]) >= pairs_per_pack:
                packs.append([])
            packs[-1].extend(self.groups[g])
        return [p for p in packs if p]


def _cache_prefix(rm: RewardModel, encoder: Encoder, data: _PairData, batch_size: int,
                  device: Any, desc: str) -> list[Any]:
    """Hidden states entering the first adapted layer for every distinct text (unpadded)."""
    from tqdm import tqdm

    dtype = next(p.dtype for p in rm.llava().parameters())
    order = sorted(range(len(data.items)), key=lambda i: -len(data.items[i][0]))
    cache: list[Any] = [None] * len(data.items)
    rm.eval()
    for s in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=None):
        chunk = order[s : s + batch_size]
        batch = encoder.batch([data.items[i] for i in chunk], dtype=dtype)
        batch = {k: v.to(device) for k, v in batch.items()}
        h = rm.prefix_hidden(**batch)
        for row, i in enumerate(chunk):
            cache[i] = h[row, : len(data.items[i][0])].clone()
    return cache


def _cached_batch(cache: list[Any], idx: Sequence[int]) -> dict[str, Any]:
    import torch

    width = max(cache[i].shape[0] for i in idx)
    h0 = cache[idx[0]]
    hidden = torch.zeros((len(idx), width, h0.shape[-1]), dtype=h0.dtype, device=h0.device)
    mask = torch.zeros((len(idx), width), dtype=torch.long, device=h0.device)
    for row, i in enumerate(idx):
        n = cache[i].shape[0]
        hidden[row, :n] = cache[i]
        mask[row, :n] = 1
    return {"hidden": hidden, "attention_mask": mask}


def _rewards_of(rm: Any, data: _PairData, cache: list[Any] | None, encoder: Encoder,
                idx: Sequence[int], device: Any, dtype: Any) -> Any:
    if cache is not None:
        batch = _cached_batch(cache, idx)
    else:
        batch = encoder.batch([data.items[i] for i in idx], dtype=dtype)
        batch = {k: v.to(device) for k, v in batch.items()}
    return rm(**batch)


def _evaluate(rm: RewardModel, data: _PairData, cache: list[Any] | None, encoder: Encoder,
              batch_size: int, device: Any) -> float:
    import torch

    dtype = next(p.dtype for p in rm.llava().parameters())
    order = sorted(range(len(data.items)), key=lambda i: -len(data.items[i][0]))
    scores = [0.0] * len(data.items)
    was_training = rm.training
    rm.eval()
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            r = _rewards_of(rm, data, cache, encoder, chunk, device, dtype).float().cpu().tolist()
            for i, v in zip(chunk, r):
                scores[i] = v
    rm.train(was_training)
    return pairwise_accuracy([scores[c] for c, _ in data.pairs], [scores[r] for _, r in data.pairs])


def train_reward_model(
    kind: str,
    pairs: Sequence[dict[str, Any]],
    base_model: str | Path,
    params: TrainRewardParams,
    *,
    image_root: str | Path | None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train the `kind` reward model on strict pairs (+ corruption pairs); save it to out_dir."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm import tqdm
    from transformers import get_scheduler

    t0 = time.time()
    train = [p for p in pairs if p["kind"] == kind and p["split"] == "train"]
    val = [p for p in pairs if p["kind"] == kind and p["split"] == "val"]
    if not train:
        raise DataError(f"no {kind} training pairs (check annotate-import's output)")
    accelerator = Accelerator(gradient_accumulation_steps=params.gradient_accumulation_steps,
                              cpu=not torch.cuda.is_available())
    device = accelerator.device
    set_seed(seed)
    rm, processor = build_reward_model(base_model, params, device=str(device))
    encoder = Encoder(processor, params.max_length, image_root)
    aug = augmentation_pairs(train, kind, params.corruption_rate, seed)
    aug += mismatch_pairs(train, kind, params.mismatch_rate, seed)
    aug += image_swap_pairs(train, kind, params.image_swaps, seed)
    train_data = _PairData(kind, list(train) + aug, encoder)
    val_data = _PairData(kind, val, encoder)
    n_train = sum(p.numel() for _, p in trainable_parameters(rm))
    log.info("%s RM: %d train pairs (+%d corrupted), %d val pairs, %d distinct texts, %s trainable "
             "params%s", kind, len(train), len(aug), len(val), len(train_data.items), f"{n_train:,}",
             f", frozen-prefix cache below layer {rm.start_layer}" if rm.start_layer else "")
    dtype = next(p.dtype for p in rm.llava().parameters())
    train_cache = val_cache = None
    if rm.start_layer is not None:
        train_cache = _cache_prefix(rm, encoder, train_data, params.per_device_eval_batch_size, device, f"{kind} prefix")
        val_cache = _cache_prefix(rm, encoder, val_data, params.per_device_eval_batch_size, device, f"{kind} val prefix") if val else None

    head = [p for n, p in trainable_parameters(rm) if "multi_modal_projector" not in n]
    proj = [p for n, p in trainable_parameters(rm) if "multi_modal_projector" in n]
    groups = [{"params": head, "lr": params.learning_rate}]
    if proj:
        groups.append({"params": proj, "lr": params.projector_learning_rate})
    optimizer = torch.optim.AdamW(groups, weight_decay=params.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    packs = train_data.packs(params.per_device_train_batch_size, seed)
    loader = torch.utils.data.DataLoader(packs, batch_size=1, shuffle=True, generator=gen,
                                         collate_fn=lambda b: b[0])
    per_epoch = math.ceil(len(loader) / params.gradient_accumulation_steps / accelerator.num_processes)
    total = max(1, math.ceil(per_epoch * params.num_train_epochs))
    # accelerate steps a prepared scheduler once per process per optimizer step
    n_proc = accelerator.num_processes
    scheduler = get_scheduler(params.lr_scheduler_type, optimizer,
                              num_warmup_steps=round(total * params.warmup_ratio) * n_proc,
                              num_training_steps=total * n_proc)
    model, optimizer, loader, scheduler = accelerator.prepare(rm, optimizer, loader, scheduler)
    eval_every = params.eval_steps or per_epoch
    acc0 = _evaluate(rm, val_data, val_cache, encoder, params.per_device_eval_batch_size, device) if val else None
    if acc0 is not None:
        log.info("%s RM: val pairwise accuracy before training %.3f", kind, acc0)
    curve: list[dict[str, Any]] = []
    step, loss_sum, loss_n, last_loss = 0, 0.0, 0, float("nan")
    model.train()
    bar = tqdm(total=total, desc=f"train {kind} RM", unit="step", disable=None)
    while step < total:
        for idx in loader:
            with accelerator.accumulate(model):
                texts = sorted({t for i in idx for t in train_data.pairs[i]})
                pos = {t: k for k, t in enumerate(texts)}
                r = _rewards_of(model, train_data, train_cache, encoder, texts, device, dtype)
                c = torch.tensor([pos[train_data.pairs[i][0]] for i in idx], device=r.device)
                j = torch.tensor([pos[train_data.pairs[i][1]] for i in idx], device=r.device)
                loss = -torch.nn.functional.logsigmoid(r[c] - r[j]).mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), params.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            loss_sum += float(loss.detach())
            loss_n += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            last_loss = loss_sum / loss_n
            loss_sum, loss_n = 0.0, 0
            row: dict[str, Any] = {"step": step, "loss": last_loss, "val_accuracy": None}
            if val and (step % eval_every == 0 or step == total):
                row["val_accuracy"] = _evaluate(rm, val_data, val_cache, encoder,
                                                params.per_device_eval_batch_size, device)
                model.train()
            curve.append(row)
            if on_step is not None and accelerator.is_main_process:
                on_step(row)
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.3f}")
            if step >= total:
                break
    bar.close()
    acc = next((r["val_accuracy"] for r in reversed(curve) if r["val_accuracy"] is not None), None)
    accelerator.wait_for_everyone()
    if out_dir is not None and accelerator.is_main_process:
        save_reward_model(accelerator.unwrap_model(model), out_dir, kind=kind, backbone=str(base_model),
                          max_length=params.max_length)
    accelerator.wait_for_everyone()
    return TrainResult(kind, acc, acc0, len(train), len(aug), len(val), step, last_loss,
                       time.time() - t0, curve, n_train, accelerator.unwrap_model(model), encoder)


# ----------------------------------------------------------------------------- save / load


def save_reward_model(rm: RewardModel, out_dir: str | Path, *, kind: str, backbone: str,
                      max_length: int) -> Path:
    """DIR/reward_config.json + DIR/reward_head.safetensors (+ the peft adapter)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"head.weight": rm.head.weight.detach().float().cpu().contiguous()}
    proj = rm.llava().multi_modal_projector
    trained_projector = any(p.requires_grad for p in proj.parameters())
    if trained_projector:
        for n, p in proj.state_dict().items():
            tensors[f"multi_modal_projector.{n}"] = p.detach().float().cpu().contiguous()
    save_file(tensors, str(out / HEAD_FILE))
    lora = hasattr(rm.backbone, "peft_config")
    if lora:
        rm.backbone.save_pretrained(str(out))
    meta = {
        "format": "align2llava-reward-model/1",
        "kind": kind,
        "backbone": backbone,
        "adapter": "lora" if lora else None,
        "projector_in_head_file": trained_projector,
        "hidden_size": int(rm.head.weight.shape[1]),
        "max_length": max_length,
        "input": "image, then human turns joined by newlines" if kind == "question"
        else "image, then 'Question: ...' and 'Answer: ...' lines",
    }
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_reward_config(path: str | Path) -> dict[str, Any]:
    f = Path(path) / CONFIG_FILE
    if not f.exists():
        raise DataError(f"{path}: no {CONFIG_FILE}; not a reward model saved by train-reward")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{f}: not valid JSON: {exc.msg}") from None
    for key in ("kind", "backbone", "hidden_size", "max_length"):
        if key not in meta:
            raise DataError(f"{f}: missing key '{key}'")
    return meta


def load_reward_model(path: str | Path, *, backbone: str | Path | None = None, dtype: str = "auto",
                      device: str = "cpu", merge: bool = True) -> tuple[RewardModel, Any, dict[str, Any]]:
    """(reward model, processor, config) from a folder written by save_reward_model.

    `backbone` overrides the base checkpoint path recorded in reward_config.json (a relative
    path there is relative to the working directory, the repo root for DVC stages). `merge`
    folds the LoRA adapter into float32 weights for faster inference (never into bf16 ones:
    rounding would wipe out the small LoRA deltas).
    """
    import torch
    from safetensors.torch import load_file

    from .modeling import load_mllm

    path = Path(path)
    meta = read_reward_config(path)
    base = Path(backbone or meta["backbone"])
    if not (base / "config.json").exists():
        raise DataError(f"{path}: its backbone {base} is not a model folder (pass backbone= to "
                        "point at the base checkpoint it was trained on)")
    model, processor = load_mllm(base, dtype="float32")
    llava = model.model
    del model
    dt, amp = precision(dtype, device)
    cast_backbone(llava, dt)
    llava.requires_grad_(False)
    tensors = load_file(str(path / HEAD_FILE))
    if meta.get("projector_in_head_file"):
        proj = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("multi_modal_projector.")}
        llava.vision_tower.to(torch.float32)
        llava.multi_modal_projector.to(torch.float32).load_state_dict(proj)
    bb: Any = llava
    if meta.get("adapter") == "lora":
        from peft import PeftModel

        bb = PeftModel.from_pretrained(llava, str(path), is_trainable=False)
        if merge and dt == torch.float32:  # a bf16 merge would round the small LoRA deltas away
            bb = bb.merge_and_unload()
    hidden = llava.config.text_config.hidden_size
    if hidden != meta["hidden_size"] or tensors["head.weight"].shape != (1, hidden):
        raise DataError(f"{path}: head size {tuple(tensors['head.weight'].shape)} does not fit backbone "
                        f"{base} (hidden size {hidden})")
    if _is_cpu(device):
        llava.set_attn_implementation("eager")  # as in training (see build_reward_model)
    rm = RewardModel(bb, hidden)
    rm.head.weight.data.copy_(tensors["head.weight"])
    rm.to(device).eval()
    rm.use_autocast(amp)
    return rm, processor, meta
