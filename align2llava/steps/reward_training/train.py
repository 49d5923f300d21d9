"""Training the reward models on strict preference pairs (Bradley-Terry).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from align2llava.config import Section
from align2llava.errors import DataError
from align2llava.models.lora import LLM_LINEAR, lora_regex, resolve_layers
from align2llava.models.precision import is_cpu, resolve
from align2llava.models.reward_model import Encoder, RewardModel, pair_text, save_reward_model
from align2llava.progress import Progress
from align2llava.steps.reward_training.pairs import augmentation_pairs, image_swap_pairs, mismatch_pairs

log = logging.getLogger(__name__)

class TrainRewardParams(Section):
    """The `train_reward` section of params.yaml. Defaults are the demo's params.yaml values (a
    test keeps them equal); `paper:` comments give the paper's LLaVA-1.5-7B settings."""

    # The MLLM the reward models start from: an instruction-tuned one, as the paper's start from
    # LLaVA-1.5-7B (the instruct stage's output: the demo's own, or instruct.checkpoint passed through).
    base_model: str = "models/instruct"
    kinds: list[Literal["question", "answer"]] = ["question", "answer"]
    # lora: LoRA on the LLM (+ head, + projector if train_projector); frozen: frozen LLM, trainable
    # projector + head. The vision tower is always frozen.
    method: Literal["lora", "frozen"] = "lora"
    train_projector: bool = False  # paper: true
    lora_r: int = Field(16, ge=1)  # paper: 128
    lora_alpha: int = Field(32, ge=1)  # paper: 256
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)  # paper: 0.05
    lora_target_modules: list[str] = LLM_LINEAR  # paper: every LLM linear layer
    # LLM layer indices to adapt (negative: from the top); null: every layer (paper: null).
    layers_to_transform: list[int] | None = [-4, -3, -2, -1]
    learning_rate: float = Field(1.0e-3, gt=0)  # paper: 2.0e-5
    projector_learning_rate: float = Field(2.0e-5, gt=0)  # paper: 2.0e-5
    num_train_epochs: float = Field(3.0, gt=0)  # paper: 5
    # Pairs per step per process (times gradient_accumulation_steps times processes = global;
    # paper: 64 global).
    per_device_train_batch_size: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"  # paper: cosine
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0)  # paper: 0.03
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(192, ge=8)  # paper: 2048
    corruption_rate: float = Field(0.25, ge=0.0, le=1.0)  # paper: 0.25
    # Not in the paper (0 = off): per group, probability of an image-mismatch pair, the group's
    # best candidate over a best candidate written for another image (see mismatch_pairs).
    mismatch_rate: float = Field(0.0, ge=0.0, le=1.0)
    # Not in the paper (0 = off): image-swap pairs per best candidate, the candidate on its own
    # image over the same text on another training image (see image_swap_pairs).
    image_swaps: int = Field(0, ge=0)
    # Where the reward is read: last (the last token, as the paper) or last+min (plus a soft
    # minimum of a second head over every text token: a single token that contradicts the image
    # can pull the reward down, wherever it sits in the answer).
    pooling: Literal["last", "last+min"] = "last+min"  # paper: last
    # Not in the paper (none = off): the answer RM adds the base MLLM's own image grounding of
    # the answer (steps.grounding: image_pmi, its mean per-token image PMI; word_margin, its
    # check of the answer's grounding_words), times grounding_weight; null: the weight is fitted
    # on the training pairs first, and the head learns the rest on top.
    grounding: Literal["none", "image_pmi", "word_margin"] = "word_margin"  # paper: none
    grounding_weight: float | None = Field(None, ge=0.0)
    # word_margin only: the words a "yes" affirms are read in a neutral statement, not in the
    # answer, so their margins are multiplied by this before the smallest is taken (1: as read);
    # null: fitted with the weight on the training pairs (a grid of 1/8 to 8).
    grounding_affirmed_scale: float | None = Field(None, gt=0.0)
    # word_margin's groups of words of which an image shows one (the demo world's colours and shapes).
    grounding_words: dict[str, list[str]] = {
        "color": ["red", "green", "blue", "yellow", "black", "gray", "teal", "brown"],
        "shape": ["circle", "rectangle", "triangle"],
    }
    # Validate every N optimizer steps (0: once per epoch) and at the end.
    eval_steps: int = Field(10, ge=0)
    per_device_eval_batch_size: int = Field(32, ge=1)
    # auto: bf16 on GPUs; mixed on CPUs with native bf16 (fp32 weights, bf16 matmuls); else
    # float32 (models.precision says why training keeps bf16).
    dtype: Literal["auto", "float32", "bfloat16", "float16", "mixed"] = "auto"
    # Compute the frozen bottom layers once (only when just the top layers adapt).
    cache_frozen_layers: bool = True

    @model_validator(mode="after")
    def _words_for_word_margin(self) -> "TrainRewardParams":
        if self.grounding == "word_margin":
            from align2llava.steps.grounding import check_words

            check_words(self.grounding_words)
        elif self.grounding_affirmed_scale not in (None, 1.0):
            raise ValueError(f"grounding_affirmed_scale: word_margin's (grounding is {self.grounding})")
        return self


def build_reward_model(
    base_model: str | Path, params: TrainRewardParams, *, device: str = "cpu",
) -> tuple[RewardModel, Any]:
    """A trainable reward model on `base_model` per `params`; returns (model, processor)."""
    import torch

    from align2llava.models.loading import load_mllm

    prec = resolve(params.dtype, device, "train_reward")
    model, processor = load_mllm(base_model, dtype="float32")
    backbone = model.model  # LlavaModel: vision tower + projector + LLM, no LM head
    del model
    prec.cast(backbone)
    backbone.requires_grad_(False)
    n_layers = len(backbone.language_model.layers)
    layers = resolve_layers(params.layers_to_transform, n_layers, "train_reward.")
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
            target_modules=lora_regex(params.lora_target_modules, layers, n_layers, "train_reward."),
            bias="none",
        )
        backbone = get_peft_model(backbone, config)  # adapters in fp32
        if train_proj:
            backbone.get_base_model().multi_modal_projector.requires_grad_(True)
    start = None
    if (params.cache_frozen_layers and params.method == "lora" and layers is not None
            and not train_proj and layers[0] > 0):
        start = layers[0]
    if is_cpu(device):
        # CPU: eager attention backpropagates through bf16 matmuls, several times faster than
        # the CPU SDPA kernel's backward
        llm = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
        llm.set_attn_implementation("eager")
    text_start = 0
    if params.pooling != "last":  # the image's tokens (and BOS, the newline after it) are not text
        text_start = len(Encoder(processor, params.max_length).ids("", True))
    rm = RewardModel(backbone, hidden, start_layer=start, pooling=params.pooling, text_start=text_start)
    rm.to(device)
    rm.use_autocast(prec.autocast_dtype)
    return rm, processor


def trainable_parameters(rm: RewardModel) -> list[tuple[str, Any]]:
    return [(n, p) for n, p in rm.named_parameters() if p.requires_grad]


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
    # The same pairs ranked by length alone (the longer text wins): what the RM must beat.
    val_length_baseline: float | None
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
        self.triples: list[tuple[str | None, str, str]] = []  # (image, prompt, candidate) per item
        self.index: dict[tuple[str | None, str], int] = {}
        self.pairs: list[tuple[int, int]] = []
        self.groups: dict[str, list[int]] = {}
        for n, p in enumerate(pairs):
            img = p.get("image") or None
            c = self._add(img, kind, p["prompt"], p["chosen"], encoder)
            r = self._add(p.get("rejected_image", img), kind, p["prompt"], p["rejected"], encoder)
            self.pairs.append((c, r))
            self.groups.setdefault(p["group"], []).append(n)

    def _add(self, image: str | None, kind: str, prompt: str, candidate: str, encoder: Encoder) -> int:
        text = pair_text(kind, prompt, candidate)
        key = (image, text)
        if key not in self.index:
            self.index[key] = len(self.items)
            self.items.append((encoder.ids(text, image is not None), image))
            self.triples.append((image, prompt, candidate))
        return self.index[key]

    def length_baseline(self) -> float:
        """Pairwise accuracy of "the longer text wins", lengths in tokens as the RM reads them."""
        n = [len(ids) for ids, _ in self.items]
        return pairwise_accuracy([n[c] for c, _ in self.pairs], [n[r] for _, r in self.pairs])

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
    dtype = next(p.dtype for p in rm.llava().parameters())
    order = sorted(range(len(data.items)), key=lambda i: -len(data.items[i][0]))
    cache: list[Any] = [None] * len(data.items)
    rm.eval()
    with Progress(len(order), desc, "texts", log) as progress:
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            batch = encoder.batch([data.items[i] for i in chunk], dtype=dtype)
            batch = {k: v.to(device) for k, v in batch.items()}
            h = rm.prefix_hidden(**batch)
            for row, i in enumerate(chunk):
                cache[i] = h[row, : len(data.items[i][0])].clone()
            progress.update(len(chunk), tok=sum(len(data.items[i][0]) for i in chunk))
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
                idx: Sequence[int], device: Any, dtype: Any, offset: Any = None) -> Any:
    if cache is not None:
        batch = _cached_batch(cache, idx)
    else:
        batch = encoder.batch([data.items[i] for i in idx], dtype=dtype)
        batch = {k: v.to(device) for k, v in batch.items()}
    r = rm(**batch)
    if offset is not None:  # the fixed grounding term (a tensor over data.items)
        r = r + offset[list(idx)].to(r.device, r.dtype)
    return r


def _grounding_offsets(base_model: str | Path, params: TrainRewardParams, train: _PairData, val: _PairData,
                       image_root: str | Path | None, device: Any) -> tuple[dict[str, Any], Any, Any]:
    """The grounding term of every training and validation text, its weight (and word_margin's
    affirmed_scale; each given, or fitted on the training pairs) and the reward_config.json entry."""
    import torch

    from align2llava.steps.grounding import Grounding, fit_affirmed_scale, fit_weight, smallest

    t0 = time.time()
    ground = Grounding.load(base_model, feature=params.grounding, words=params.grounding_words or None,
                            image_root=image_root, dtype=params.dtype, device=device,
                            batch_size=params.per_device_eval_batch_size)
    word_margin = params.grounding == "word_margin"
    read = ground.readings if word_margin else ground.raw
    with Progress(ground.passes * (len(train.triples) + len(val.triples)), "answer grounding", "passes", log) as meter:
        g_train = read(train.triples, meter)
        g_val = read(val.triples, meter) if val.triples else []
    ground_words = ground.words
    del ground
    weight, scale = params.grounding_weight, params.grounding_affirmed_scale
    fitted, scale_fitted = weight is None, word_margin and scale is None
    if scale_fitted:
        chosen, rejected = [g_train[c] for c, _ in train.pairs], [g_train[r] for _, r in train.pairs]
        scale, best = fit_affirmed_scale(chosen, rejected)
        weight = best if weight is None else weight
    if word_margin:
        g_train, g_val = smallest(g_train, scale), smallest(g_val, scale)
    if weight is None:
        weight = fit_weight([g_train[c] for c, _ in train.pairs], [g_train[r] for _, r in train.pairs])
    acc = pairwise_accuracy([g_train[c] for c, _ in train.pairs], [g_train[r] for _, r in train.pairs])
    val_acc = (pairwise_accuracy([g_val[c] for c, _ in val.pairs], [g_val[r] for _, r in val.pairs])
               if val.pairs else None)
    affirmed = f", affirmed words x {scale:.3f} ({'fitted' if scale_fitted else 'given'})" if word_margin else ""
    log.info("answer RM: grounding %s, weight %.3f (%s)%s; alone it orders %.3f of the training pairs%s, in %.0f s",
             params.grounding, weight, "fitted on the training pairs" if fitted else "given", affirmed, acc,
             f" and {val_acc:.3f} of the validation pairs" if val_acc is not None else "", time.time() - t0)
    entry = {"feature": params.grounding, "weight": weight, "fitted": fitted,
             "train_pair_accuracy": acc, "val_pair_accuracy": val_acc}
    if word_margin:
        entry["words"] = ground_words
        if scale != 1.0 or scale_fitted:  # 1, given, is what a reader assumes without the key
            entry.update(affirmed_scale=scale, affirmed_scale_fitted=scale_fitted)
    as_tensor = lambda g: torch.tensor([weight * x for x in g], dtype=torch.float32)  # noqa: E731
    return entry, as_tensor(g_train), as_tensor(g_val) if g_val else None


def _evaluate(rm: RewardModel, data: _PairData, cache: list[Any] | None, encoder: Encoder,
              batch_size: int, device: Any, desc: str = "validate", offset: Any = None) -> float:
    import torch

    dtype = next(p.dtype for p in rm.llava().parameters())
    order = sorted(range(len(data.items)), key=lambda i: -len(data.items[i][0]))
    scores = [0.0] * len(data.items)
    was_training = rm.training
    rm.eval()
    with torch.no_grad(), Progress(len(order), desc, "texts", log, bar=False) as progress:
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            r = _rewards_of(rm, data, cache, encoder, chunk, device, dtype, offset).float().cpu().tolist()
            for i, v in zip(chunk, r):
                scores[i] = v
            progress.update(len(chunk), tok=sum(len(data.items[i][0]) for i in chunk))
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
    train_offset = val_offset = None
    grounding = None
    if kind == "answer" and params.grounding != "none":
        grounding, train_offset, val_offset = _grounding_offsets(base_model, params, train_data, val_data,
                                                                 image_root, device)
    train_cache = val_cache = None
    if rm.start_layer is not None:
        eval_batch = params.per_device_eval_batch_size
        train_cache = _cache_prefix(rm, encoder, train_data, eval_batch, device, f"{kind} prefix")
        val_cache = _cache_prefix(rm, encoder, val_data, eval_batch, device, f"{kind} val prefix") if val else None

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
    length_acc = val_data.length_baseline() if val else None
    if length_acc is not None:
        log.info("%s RM: val pairwise accuracy of the longer text %.3f (the baseline to beat)", kind, length_acc)
    curve: list[dict[str, Any]] = []
    step, loss_sum, loss_n, last_loss = 0, 0.0, 0, float("nan")
    model.train()
    progress = Progress(total, f"train {kind} RM", "steps", log)
    step_pairs = step_tokens = 0
    while step < total:
        for idx in loader:
            with accelerator.accumulate(model):
                texts = sorted({t for i in idx for t in train_data.pairs[i]})
                step_pairs += len(idx)
                step_tokens += sum(len(train_data.items[t][0]) for t in texts)
                pos = {t: k for k, t in enumerate(texts)}
                r = _rewards_of(model, train_data, train_cache, encoder, texts, device, dtype, train_offset)
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
                                                params.per_device_eval_batch_size, device, f"{kind} RM validation",
                                                val_offset)
                model.train()
            curve.append(row)
            if on_step is not None and accelerator.is_main_process:
                on_step(row)
            progress.status = f"loss {last_loss:.3f}"
            progress.update(1, pairs=step_pairs * n_proc, tok=step_tokens * n_proc)  # about, all processes
            step_pairs = step_tokens = 0
            if step >= total:
                break
    progress.close()
    acc = next((r["val_accuracy"] for r in reversed(curve) if r["val_accuracy"] is not None), None)
    accelerator.wait_for_everyone()
    if out_dir is not None and accelerator.is_main_process:
        save_reward_model(accelerator.unwrap_model(model), out_dir, kind=kind, backbone=str(base_model),
                          max_length=params.max_length, grounding=grounding)
    accelerator.wait_for_everyone()
    return TrainResult(kind, acc, length_acc, len(train), len(aug), len(val), step, last_loss,
                       time.time() - t0, curve, n_train, accelerator.unwrap_model(model), encoder)
