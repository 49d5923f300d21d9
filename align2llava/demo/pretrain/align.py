"""Pretraining phase 2: caption alignment through the frozen LLM.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from align2llava.demo.pretrain.warmup import _log_progress, words
from align2llava.models.batching import pad_batch

if TYPE_CHECKING:
    from align2llava.demo.pretrain.pretrain import PretrainParams

log = logging.getLogger(__name__)

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

    padded = pad_batch([seq for seq, _ in batch], pad_id)
    rows, cols = [], []
    for r, (seq, plen) in enumerate(batch):
        for pos in range(plen, len(seq)):
            rows.append(r)
            cols.append(pos - 1)  # the hidden state at pos-1 predicts token pos
    return padded["input_ids"], padded["attention_mask"], (torch.tensor(rows), torch.tensor(cols))


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
                   pad_id: int, curve: list[dict[str, Any]], autocast: Any, prefix: Any = None,
                   anchor: tuple[dict[str, Any], dict[str, Any]] | None = None) -> dict[str, float]:
    """Phase 2: LLM frozen; projector (and vision tower at its own rate) learn to caption.

    `anchor` (per-group word labels of every caption, word embeddings): anchor_steps of word
    anchoring alone first (no LLM forward: cheap), then anchor_weight x the anchoring loss is
    added to every caption step (demo.pretrain.anchor)."""
    import torch
    from tqdm import tqdm

    from align2llava.demo.pretrain.anchor import anchor_loss

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
    anchored: dict[str, float] = {}
    if anchor is not None and p.anchor_steps:
        anchored = _anchor_only(model, pixels, anchor, p, seed, projector + vision)

    def anchor_term(idx: list[int]) -> Any:
        if anchor is None or not p.anchor_weight:
            return 0.0
        labels = {k: v[idx] for k, v in anchor[0].items()}
        return p.anchor_weight * anchor_loss(model, pixels[idx], labels, anchor[1], p.anchor_temperature)

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
        (loss + anchor_term(idx)).backward()
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
            "align_tokens_per_second": round(tokens / max(secs, 1e-9), 1), **anchored}


def _anchor_only(model: Any, pixels: Any, anchor: tuple[dict[str, Any], dict[str, Any]], p: PretrainParams,
                 seed: int, params: list[Any]) -> dict[str, float]:
    """anchor_steps of word anchoring alone (vision tower and projector; the LLM is not run)."""
    import torch
    from tqdm import tqdm

    from align2llava.demo.pretrain.anchor import anchor_loss

    opt = torch.optim.AdamW([{"params": list(model.model.multi_modal_projector.parameters()), "lr": p.learning_rate}]
                            + ([{"params": list(model.model.vision_tower.parameters()), "lr": p.vision_learning_rate}]
                               if p.vision_learning_rate > 0 else []))
    total = p.anchor_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    gen = torch.Generator().manual_seed(seed + 2)
    labels, emb = anchor
    bs = min(p.warmup_batch_size, len(pixels))
    order: list[int] = []
    first = last = 0.0
    for step in tqdm(range(total), desc="word anchoring", unit="step", disable=None, leave=False):
        if len(order) < bs:
            order += torch.randperm(len(pixels), generator=gen).tolist()
        idx, order = order[:bs], order[bs:]
        loss = anchor_loss(model, pixels[idx], {k: v[idx] for k, v in labels.items()}, emb, p.anchor_temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        last = loss.item()
        first = last if step == 0 else first
        _log_progress("word anchoring", step + 1, total, last)
    return {"anchor_steps": total, "anchor_loss_first": round(first, 4), "anchor_loss_last": round(last, 4)}
