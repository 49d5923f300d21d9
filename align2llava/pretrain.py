"""LLaVA stage 1 for the demo: teach a small vision tower and projector to talk to a frozen LLM.

`pretrain()` builds (or loads) a LLaVA, then trains in two phases on (image, caption) pairs:

1. Vision warm-up (no LLM, cheap): the vision tower's features at the layer LLaVA reads
   (`vision_feature_layer`, CLS dropped), mean-pooled, predict which caption words occur
   (multi-label over the caption vocabulary). This makes shape and colour linearly readable in
   the very features every later stage consumes.
2. Caption alignment (LLaVA stage 1): the LLM is frozen; vision tower and projector learn to
   make it produce the caption after the image. Prompt: `params.prompt` ("<image>\\n", LLaVA's
   "plain" pretraining template). Loss on caption tokens only, and lm_head logits are computed
   only at those positions (the 49k-vocab head is a large part of the cost).

Measured on held-out captions, before and after: caption loss with the right images and with
the images shuffled among samples (the gap shows how much the image informs the LLM), and
greedy captions' accuracy on each word group of `params.word_groups` (shape, colour).
`params.checkpoint` passes a user's model through instead (hard links, else a copy).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from .config import Section
from .errors import DataError
from .images import load_rgb, resolve_image
from .io import read_jsonl_strict

log = logging.getLogger(__name__)

DEFAULT_WORD_GROUPS = {
    "shape": ["circle", "rectangle", "triangle"],
    "color": ["red", "green", "blue", "yellow", "black", "gray", "teal", "brown"],
}


class PretrainParams(Section):
    """The `pretrain:` section of params.yaml."""

    # A model folder in HF layout to pass through instead of training (null: train).
    checkpoint: str | None = None
    # What to train from: "smollm2" (SmolLM2-135M-Instruct + a fresh vision tower) or a LLaVA folder.
    init: str = "smollm2"
    vision_hidden: int = Field(192, ge=8)
    vision_layers: int = Field(4, ge=1)
    vision_heads: int = Field(4, ge=1)
    max_captions: int = Field(4000, ge=2)  # captions read (the last eval_captions are held out)
    eval_captions: int = Field(48, ge=1)
    # Caption words naming one attribute each: the warm-up objective and the generation check.
    word_groups: dict[str, list[str]] = DEFAULT_WORD_GROUPS
    # phase 1: vision warm-up (0 steps: skip)
    warmup_steps: int = Field(300, ge=0)
    warmup_learning_rate: float = Field(4.0e-3, gt=0)
    warmup_batch_size: int = Field(64, ge=1)
    # phase 2: caption alignment through the frozen LLM. The prompt is the user turn of the
    # model's chat template (chat_template: false -> used as is, e.g. LLaVA's plain "<image>\n").
    prompt: str = "<image>\nDescribe the image briefly."
    chat_template: bool = True
    max_steps: int = Field(80, ge=0)
    per_device_train_batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(3.0e-3, gt=0)  # projector
    vision_learning_rate: float = Field(1.0e-4, ge=0)  # vision tower (0: frozen in phase 2)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_new_tokens: int = Field(16, ge=1)
    generate_before: bool = False  # also caption the held-out images before training (costs time)
    # bf16 autocast for the frozen LLM's matmuls: auto = where the CPU/GPU supports bf16.
    bf16: str = Field("auto", pattern="^(auto|true|false)$")


@dataclass
class Example:
    image: str
    caption: str


def read_captions(path: str | Path, image_root: str | Path, limit: int) -> list[Example]:
    """captions.jsonl rows {"id", "image", "caption"} (our own file: read strictly)."""
    rows = read_jsonl_strict(path)
    out = []
    for n, row in enumerate(rows[:limit]):
        if not isinstance(row, dict) or not isinstance(row.get("caption"), str) or not row["caption"].strip():
            raise DataError(f"{path}: line {n + 1}: expected {{\"id\", \"image\", \"caption\"}} with a non-empty caption")
        if not isinstance(row.get("image"), str):
            raise DataError(f"{path}: line {n + 1}: 'image' must be a path string")
        resolve_image(image_root, row["image"])
        out.append(Example(row["image"], row["caption"].strip()))
    return out


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def pixel_batch(processor: Any, image_root: str | Path, examples: list[Example]) -> Any:
    images = [load_rgb(resolve_image(image_root, e.image)) for e in examples]
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]


def vision_features(model: Any, pixel_values: Any) -> Any:
    """The features LLaVA feeds its projector: hidden state at vision_feature_layer, CLS dropped."""
    cfg = model.config
    out = model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    feats = out.hidden_states[cfg.vision_feature_layer]
    return feats[:, 1:] if cfg.vision_feature_select_strategy == "default" else feats


def _pooled(model: Any, pixel_values: Any) -> Any:
    """Mean and max over the patch features (a small shape sits in one or two patches)."""
    import torch

    f = vision_features(model, pixel_values)
    return torch.cat([f.mean(1), f.amax(1)], -1)


def group_labels(captions: list[str], groups: dict[str, list[str]]) -> dict[str, Any]:
    """Per word group, the index of the first group word each caption names (-100: none)."""
    import torch

    return {name: torch.tensor([next((ws.index(w) for w in words(c) if w in ws), -100) for c in captions])
            for name, ws in groups.items()}


def warm_up_vision(model: Any, pixels: Any, captions: list[str], p: PretrainParams, seed: int,
                   curve: list[dict[str, Any]], autocast: Any) -> dict[str, float]:
    """Phase 1: from pooled vision features, classify each caption's word of every word group."""
    import torch
    from tqdm import tqdm

    labels = group_labels(captions, p.word_groups)
    labels = {k: v for k, v in labels.items() if (v >= 0).any()}
    if not labels or p.warmup_steps == 0:
        return {}
    dim = 2 * model.config.vision_config.hidden_size
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(dim, len(p.word_groups[k])) for k in labels})
    heads.to(pixels.device)
    params = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    for prm in model.model.vision_tower.parameters():
        prm.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=p.warmup_learning_rate, weight_decay=0.01)
    total, warm = p.warmup_steps, max(1, p.warmup_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(seed)
    model.model.vision_tower.train()
    order: list[int] = []
    first = last = 0.0
    bs = min(p.warmup_batch_size, len(captions))
    for step in tqdm(range(total), desc="vision warm-up", unit="step", disable=None, leave=False):
        if len(order) < bs:
            order += torch.randperm(len(captions), generator=gen).tolist()
        idx, order = order[:bs], order[bs:]
        with autocast():
            f = _pooled(model, pixels[idx])
        loss = sum(torch.nn.functional.cross_entropy(heads[k](f.float()), labels[k][idx].to(f.device))
                   for k in labels if (labels[k][idx] >= 0).any())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        last = loss.item()
        first = last if step == 0 else first
        curve.append({"step": step + 1, "loss": round(last, 5)})
        _log_progress("vision warm-up", step + 1, total, last)
    model.model.vision_tower.eval()
    return {"warmup_loss_first": round(first, 4), "warmup_loss_last": round(last, 4), "warmup_steps": total,
            "_heads": heads}


def probe_accuracy(model: Any, heads: Any, pixels: Any, captions: list[str], groups: dict[str, list[str]]) -> dict[str, float]:
    """Held-out accuracy of the warm-up heads: is the attribute readable from the vision features?"""
    import torch

    labels = group_labels(captions, groups)
    with torch.no_grad():
        f = _pooled(model, pixels).float()
    out = {}
    for k, head in heads.items():
        ok = labels[k] >= 0
        if ok.any():
            out[k] = round((head(f).argmax(1).cpu()[ok] == labels[k][ok]).float().mean().item(), 4)
    return out


def prompt_text(tokenizer: Any, prompt: str, chat: bool) -> str:
    """The text before the caption: the prompt as a user turn of the chat template, or as is."""
    if not chat:
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)


def encode(tokenizer: Any, prompt: str, caption: str, n_image_tokens: int, image_token: str) -> tuple[list[int], int]:
    """Token ids of prompt text (image token expanded) + caption + eos; and the prompt's length."""
    prompt_ids = tokenizer(prompt.replace(image_token, image_token * n_image_tokens),
                           add_special_tokens=False)["input_ids"]
    cap_ids = tokenizer(caption + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
    return prompt_ids + cap_ids, len(prompt_ids)


def collate(batch: list[tuple[list[int], int]], pad_id: int) -> tuple[Any, Any, Any]:
    """Right-padded ids, attention mask, and target positions (row, position of the predicting token)."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    rows, cols = [], []
    for r, (seq, plen) in enumerate(batch):
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
        for pos in range(plen, len(seq)):
            rows.append(r)
            cols.append(pos - 1)  # the hidden state at pos-1 predicts token pos
    return ids, mask, (torch.tensor(rows), torch.tensor(cols))


def prefix_cache(model: Any, prefix_ids: list[int], autocast: Any = contextlib.nullcontext) -> Any:
    """Keys and values of the token prefix every sample shares (the system prompt), computed once.

    Returns per-layer (key, value) tensors with batch 1, or None for an empty prefix.
    """
    import torch

    if not prefix_ids:
        return None
    lm = model.model.language_model
    ids = torch.tensor([prefix_ids], device=next(model.parameters()).device)
    with torch.no_grad(), autocast():
        out = lm(input_ids=ids, use_cache=True)
    return [(layer.keys.detach(), layer.values.detach()) for layer in out.cache.layers]


def caption_loss(model: Any, ids: Any, mask: Any, pixels: Any, targets: tuple[Any, Any],
                 reduction: str = "mean", autocast: Any = contextlib.nullcontext, prefix: Any = None) -> Any:
    """Cross-entropy on caption tokens; lm_head applied only at the target positions.

    `prefix` (from prefix_cache): the first len(prefix) tokens of every row are that shared prefix;
    its cached keys/values are reused instead of recomputing them.
    """
    import torch
    from transformers import DynamicCache

    dev = pixels.device
    ids, mask = ids.to(dev), mask.to(dev)
    rows, cols = targets[0].to(dev), targets[1].to(dev)
    kwargs: dict[str, Any] = {}
    skip = 0
    if prefix is not None:
        skip = prefix[0][0].shape[-2]
        b = ids.shape[0]
        kwargs["cache"] = DynamicCache(
            [(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in prefix], config=model.config)
    with autocast():
        hidden = model.model(input_ids=ids[:, skip:], attention_mask=mask, pixel_values=pixels,
                             **kwargs).last_hidden_state
        logits = model.lm_head(hidden[rows, cols - skip])
    return torch.nn.functional.cross_entropy(logits.float(), ids[rows, cols + 1], reduction=reduction)


def bf16_autocast(setting: str, device: Any) -> Any:
    """A factory of autocast contexts: bf16 where supported (setting auto) or forced (true)."""
    import torch

    if setting == "false":
        return contextlib.nullcontext
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    else:
        ok = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if setting == "true" or ok:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def evaluate_captions(model: Any, encoded: list[tuple[list[int], int]], pixels: Any, pad_id: int,
                      batch_size: int = 16, prefix: Any = None,
                      autocast: Any = contextlib.nullcontext) -> dict[str, float]:
    """Mean per-token caption loss with the right images and with images rolled by one."""
    import torch

    tot = {"right": 0.0, "shuffled": 0.0}
    n_tok = 0
    with torch.no_grad():
        for b in range(0, len(encoded), batch_size):
            ids, mask, tg = collate(encoded[b: b + batch_size], pad_id)
            px = pixels[b: b + batch_size]
            tot["right"] += caption_loss(model, ids, mask, px, tg, "sum", autocast, prefix).item()
            tot["shuffled"] += caption_loss(model, ids, mask, torch.roll(pixels, 1, 0)[b: b + batch_size], tg,
                                            "sum", autocast, prefix).item()
            n_tok += len(tg[0])
    return {"caption_loss": round(tot["right"] / n_tok, 4),
            "caption_loss_shuffled_images": round(tot["shuffled"] / n_tok, 4)}


def generate_captions(model: Any, tokenizer: Any, prompt: str, pixels: Any, n_image_tokens: int,
                      image_token: str, max_new_tokens: int, batch_size: int = 16,
                      autocast: Any = contextlib.nullcontext) -> list[str]:
    import torch

    ids = tokenizer(prompt.replace(image_token, image_token * n_image_tokens), add_special_tokens=False,
                    return_tensors="pt")["input_ids"].to(pixels.device)
    out = []
    with torch.no_grad(), autocast():
        for b in range(0, len(pixels), batch_size):
            px = pixels[b: b + batch_size]
            batch_ids = ids.expand(len(px), -1)
            gen = model.generate(input_ids=batch_ids, attention_mask=torch.ones_like(batch_ids), pixel_values=px,
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            out += tokenizer.batch_decode(gen[:, batch_ids.shape[1]:], skip_special_tokens=True)
    return [o.strip() for o in out]


def word_accuracy(generated: list[str], references: list[str], groups: dict[str, list[str]]) -> dict[str, float]:
    """Per group: share of references naming a group word whose generation names the same one first."""
    out = {}
    for name, group in groups.items():
        hits = total = 0
        for g, r in zip(generated, references):
            ref = next((w for w in words(r) if w in group), None)
            if ref is None:
                continue
            total += 1
            hits += next((w for w in words(g) if w in group), None) == ref
        if total:
            out[name] = round(hits / total, 4)
    return out


def align_captions(model: Any, encoded: list[tuple[list[int], int]], pixels: Any, p: PretrainParams, seed: int,
                   pad_id: int, curve: list[dict[str, Any]], autocast: Any, prefix: Any = None) -> dict[str, float]:
    """Phase 2: LLM frozen; projector (and vision tower at its own rate) learn to caption."""
    import torch
    from tqdm import tqdm

    for prm in model.parameters():
        prm.requires_grad_(False)
    projector = list(model.model.multi_modal_projector.parameters())
    vision = list(model.model.vision_tower.parameters()) if p.vision_learning_rate > 0 else []
    for prm in projector + vision:
        prm.requires_grad_(True)
    groups = [{"params": projector, "lr": p.learning_rate}]
    if vision:
        groups.append({"params": vision, "lr": p.vision_learning_rate})
    opt = torch.optim.AdamW(groups, weight_decay=p.weight_decay)
    total, warm = p.max_steps, max(1, round(p.warmup_ratio * p.max_steps))

    def lr_at(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(seed + 1)
    order: list[int] = []
    model.eval()  # no dropout; only the chosen parameters get gradients
    first = last = None
    tokens, start = 0, time.time()
    bar = tqdm(range(total), desc="caption alignment", unit="step", disable=None, leave=False)
    for step in bar:
        if len(order) < p.per_device_train_batch_size:
            order += torch.randperm(len(encoded), generator=gen).tolist()
        idx, order = order[: p.per_device_train_batch_size], order[p.per_device_train_batch_size:]
        ids, mask, tg = collate([encoded[i] for i in idx], pad_id)
        loss = caption_loss(model, ids, mask, pixels[idx], tg, autocast=autocast, prefix=prefix)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(projector + vision, 1.0)
        opt.step()
        sched.step()
        tokens += int(mask.sum())
        first = loss.item() if first is None else first
        last = loss.item()
        curve.append({"step": step + 1, "loss": round(last, 5), "lr": round(sched.get_last_lr()[0], 8)})
        bar.set_postfix(loss=f"{last:.3f}")
        _log_progress("caption alignment", step + 1, total, last)
    secs = time.time() - start
    if total:
        log.info("caption alignment: %d steps, %s tokens at %.0f tok/s, loss %.3f -> %.3f", total,
                 f"{tokens:,}", tokens / max(secs, 1e-9), first, last)
    return {"align_steps": total, "align_loss_first": round(first or 0.0, 4), "align_loss_last": round(last or 0.0, 4),
            "align_tokens_per_second": round(tokens / max(secs, 1e-9), 1)}


def _log_progress(what: str, step: int, total: int, loss: float) -> None:
    """A log line at every quarter (progress bars are hidden off a terminal)."""
    if total >= 4 and step % max(1, total // 4) == 0 and step < total:
        log.info("%s: step %d/%d, loss %.3f", what, step, total, loss)


def _write_curve(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _staging(out: Path) -> Path:
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def _swap_in(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)


def pass_through(checkpoint: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Put a user's model folder at `out_dir` (hard links where possible) and check it loads."""
    from transformers import AutoConfig, AutoProcessor

    src, out = Path(checkpoint), Path(out_dir)
    if not (src / "config.json").is_file():
        raise DataError(f"pretrain.checkpoint: {src}: no config.json; expected a Hugging Face model folder")
    if src.resolve() == out.resolve():
        raise DataError(f"pretrain.checkpoint: {src} is the output folder itself")
    try:
        config = AutoConfig.from_pretrained(str(src))
        AutoProcessor.from_pretrained(str(src))
    except Exception as exc:  # transformers raises many types for broken folders
        raise DataError(f"pretrain.checkpoint: {src}: does not load as a model with a processor: {exc}") from None
    if not hasattr(config, "vision_config") or not hasattr(config, "text_config"):
        raise DataError(f"pretrain.checkpoint: {src}: config has no vision_config/text_config (not a LLaVA-style MLLM)")
    if not any(src.glob("*.safetensors")) and not any(src.glob("*.bin")):
        raise DataError(f"pretrain.checkpoint: {src}: no weight files (*.safetensors)")
    tmp = _staging(out)
    shutil.copytree(src, tmp, copy_function=_link_or_copy)
    _swap_in(tmp, out)
    return {"passthrough": 1, "model_type": config.model_type}


def pretrain(p: PretrainParams, seed: int, captions: str | Path, image_root: str | Path, out_dir: str | Path,
             cache_dir: str | Path, plots_dir: str | Path | None = None) -> dict[str, Any]:
    """Train (or pass through) the base MLLM into `out_dir` (HF layout); returns metrics."""
    import torch
    from transformers import AutoProcessor

    from .modeling import build_smollm2_llava, load_mllm

    start = time.time()
    out = Path(out_dir)
    if p.checkpoint:
        return {**pass_through(p.checkpoint, out), "seconds": round(time.time() - start, 2)}
    examples = read_captions(captions, image_root, p.max_captions)
    if len(examples) <= p.eval_captions:
        raise DataError(f"{captions}: {len(examples)} captions, need more than pretrain.eval_captions={p.eval_captions}")
    random.Random(seed).shuffle(examples)
    train, held = examples[: -p.eval_captions], examples[-p.eval_captions:]
    torch.manual_seed(seed)
    work = _staging(out)  # built aside, swapped in at the end: readers never see a half-written model
    work.mkdir(parents=True)
    if p.init == "smollm2":
        model = build_smollm2_llava(work, cache_dir=cache_dir, seed=seed, vision_hidden=p.vision_hidden,
                                    vision_layers=p.vision_layers, vision_heads=p.vision_heads)
        processor = AutoProcessor.from_pretrained(str(work))
    else:
        model, processor = load_mllm(p.init, dtype="float32")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.float().to(device)
    autocast = bf16_autocast(p.bf16, device)
    tok = processor.tokenizer
    vc = model.config.vision_config
    n_img = (vc.image_size // vc.patch_size) ** 2 + (model.config.vision_feature_select_strategy != "default")
    image_token = getattr(processor, "image_token", "<image>")
    if image_token not in p.prompt:
        raise DataError(f"pretrain.prompt must contain {image_token!r}, got {p.prompt!r}")
    t0 = time.time()
    pix_train = pixel_batch(processor, image_root, train).to(device)
    pix_held = pixel_batch(processor, image_root, held).to(device)
    prompt = prompt_text(tok, p.prompt, p.chat_template)
    enc_train = [encode(tok, prompt, e.caption, n_img, image_token) for e in train]
    enc_held = [encode(tok, prompt, e.caption, n_img, image_token) for e in held]
    log.info("%s train / %s held-out captions prepared in %.1f s (%s, bf16 autocast %s)", f"{len(train):,}",
             len(held), time.time() - t0, device, autocast is not contextlib.nullcontext)
    refs = [e.caption for e in held]
    # the tokens before the image are the same in every sample: cache their keys/values once
    n_pre = enc_train[0][0].index(tok.convert_tokens_to_ids(image_token))
    prefix = prefix_cache(model, enc_train[0][0][:n_pre], autocast)

    def measure(tag: str, generate: bool = True) -> dict[str, Any]:
        t = time.time()
        model.eval()
        m: dict[str, Any] = evaluate_captions(model, enc_held, pix_held, tok.pad_token_id, prefix=prefix,
                                              autocast=autocast)
        gens = ["(not generated)"]
        if generate:
            gens = generate_captions(model, tok, prompt, pix_held, n_img, image_token, p.max_new_tokens,
                                     autocast=autocast)
            m["generation_accuracy"] = word_accuracy(gens, refs, p.word_groups)
        log.info("%s: caption loss %.3f (images shuffled: %.3f), generation accuracy %s; e.g. %r for %r [%.0f s]",
                 tag, m["caption_loss"], m["caption_loss_shuffled_images"], m.get("generation_accuracy"), gens[0],
                 refs[0], time.time() - t)
        return m

    before = measure("before", generate=p.generate_before)
    warm_curve: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    t1 = time.time()
    warm = warm_up_vision(model, pix_train, [e.caption for e in train], p, seed, warm_curve, autocast)
    heads = warm.pop("_heads", None)
    if heads is not None:
        warm["warmup_probe_accuracy"] = probe_accuracy(model, heads, pix_held, refs, p.word_groups)
        log.info("vision warm-up: %d steps, loss %.3f -> %.3f, held-out probe accuracy %s [%.0f s]",
                 warm["warmup_steps"], warm["warmup_loss_first"], warm["warmup_loss_last"],
                 warm["warmup_probe_accuracy"], time.time() - t1)
    warm["warmup_seconds"] = round(time.time() - t1, 1)
    t2 = time.time()
    align = align_captions(model, enc_train, pix_train, p, seed, tok.pad_token_id, steps, autocast, prefix)
    align["align_seconds"] = round(time.time() - t2, 1)
    after = measure("after")
    for prm in model.parameters():
        prm.requires_grad_(False)
    model.to("cpu")
    model.save_pretrained(str(work))
    processor.save_pretrained(str(work))
    reloaded, _ = load_mllm(work, dtype="float32")
    ids, mask, tg = collate(enc_held[:4], tok.pad_token_id)
    with torch.no_grad():
        a = caption_loss(model, ids, mask, pix_held[:4].cpu(), tg).item()
        b = caption_loss(reloaded, ids, mask, pix_held[:4].cpu(), tg).item()
    if abs(a - b) > 1e-4:
        raise DataError(f"{work}: the saved model does not reload to the same outputs (loss {a:.5f} vs {b:.5f})")
    _swap_in(work, out)
    if plots_dir is not None:
        _write_curve(steps, Path(plots_dir) / "steps.csv")
        _write_curve(warm_curve, Path(plots_dir) / "warmup.csv")
    return {"passthrough": 0, "train_captions": len(train), "eval_captions": len(held), "before": before,
            "after": after, **warm, **align, "seconds": round(time.time() - start, 1)}
