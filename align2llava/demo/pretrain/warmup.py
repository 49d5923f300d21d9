"""Pretraining phase 1: vision tower warm-up on caption words (no LLM).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align2llava.data.images import load_rgb, resolve_image

if TYPE_CHECKING:
    from align2llava.demo.pretrain.pretrain import Example, PretrainParams

log = logging.getLogger(__name__)

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


def _log_progress(what: str, step: int, total: int, loss: float) -> None:
    """A log line at every quarter (progress bars are hidden off a terminal)."""
    if total >= 4 and step % max(1, total // 4) == 0 and step < total:
        log.info("%s: step %d/%d, loss %.3f", what, step, total, loss)
