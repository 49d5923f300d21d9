"""LLaVA stage 1 for the demo: teach a small vision tower and projector to talk to a frozen LLM.

`pretrain()` builds (or loads) a LLaVA, then trains in two phases on (image, caption) pairs:

1. Vision warm-up (no LLM, cheap): the vision tower's features at the layer LLaVA reads
   (`vision_feature_layer`, CLS dropped), mean-pooled, predict which caption words occur
   (multi-label over the caption vocabulary). This makes shape and colour linearly readable in
   the very features every later stage consumes.
2. Caption alignment (LLaVA stage 1): the LLM is frozen; vision tower and projector learn to
   make it produce the caption after the image, while word anchoring (`demo.pretrain.anchor`,
   the demo's stand-in for CLIP's image-text alignment) keeps the image tokens at a word's norm
   and close to the LLM's embeddings of the words naming the image's shape and colour. Prompt: `params.prompt` ("<image>\\n", LLaVA's
   "plain" pretraining template). Loss on caption tokens only, and lm_head logits are computed
   only at those positions (the 49k-vocab head is a large part of the cost).

Measured on held-out captions, before and after: caption loss with the right images and with
the images shuffled among samples (the gap shows how much the image informs the LLM), and
greedy captions' accuracy on each word group of `params.word_groups` (shape, colour).
`params.checkpoint` passes a user's model through instead (hard links, else a copy).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from align2llava.config import Section
from align2llava.data.images import resolve_image
from align2llava.data.io import read_jsonl_strict, write_csv
from align2llava.demo.pretrain.align import (
    align_captions,
    caption_loss,
    collate,
    encode,
    evaluate_captions,
    generate_captions,
    prefix_cache,
    prompt_text,
    word_accuracy,
)
from align2llava.demo.pretrain.anchor import anchor_accuracy, word_embeddings
from align2llava.demo.pretrain.warmup import group_labels, pixel_batch, probe_accuracy, warm_up_vision
from align2llava.errors import DataError
from align2llava.models.loading import _staging, _swap_in, pass_through
from align2llava.models.precision import resolve

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
    # word anchoring (demo.pretrain.anchor): image tokens pulled towards the LLM's embeddings of
    # the words naming the image's shape and colour, at a word's norm, as CLIP's features line up
    # with text. anchor_steps alone (no LLM) before the caption steps, then anchor_weight x its
    # loss in each. 0 and 0: off.
    anchor_steps: int = Field(300, ge=0)
    anchor_weight: float = Field(1.0, ge=0)
    anchor_temperature: float = Field(0.1, gt=0)
    max_steps: int = Field(80, ge=0)
    per_device_train_batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(3.0e-3, gt=0)  # projector
    vision_learning_rate: float = Field(1.0e-4, ge=0)  # vision tower (0: frozen in phase 2)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_new_tokens: int = Field(16, ge=1)
    generate_before: bool = False  # also caption the held-out images before training (costs time)
    # bf16 autocast for the frozen LLM's matmuls: auto = where the CPU/GPU computes bf16
    # natively (training keeps bf16: models.precision), true = always, false = never.
    bf16: str = Field("auto", pattern="^(auto|true|false)$")


@dataclass
class Example:
    image: str
    caption: str


def read_captions(path: str | Path, image_root: str | Path, limit: int) -> list[Example]:
    """captions.jsonl rows {"id", "image", "caption"} (our own file: read strictly)."""
    def problem(row: dict[str, Any]) -> str | None:
        if not isinstance(row.get("caption"), str) or not row["caption"].strip():
            return 'expected {"id", "image", "caption"} with a non-empty caption'
        if not isinstance(row.get("image"), str):
            return "'image' must be a path string"
        return None

    out = []
    for row in read_jsonl_strict(path, check=problem)[:limit]:
        resolve_image(image_root, row["image"])
        out.append(Example(row["image"], row["caption"].strip()))
    return out


def pretrain(p: PretrainParams, seed: int, captions: str | Path, image_root: str | Path, out_dir: str | Path,
             cache_dir: str | Path, plots_dir: str | Path | None = None) -> dict[str, Any]:
    """Train (or pass through) the base MLLM into `out_dir` (HF layout); returns metrics."""
    import torch
    from transformers import AutoProcessor

    from align2llava.demo.base import build_smollm2_llava
    from align2llava.models.loading import load_mllm

    start = time.time()
    out = Path(out_dir)
    if p.checkpoint:
        m = pass_through(p.checkpoint, out)
        if plots_dir is not None:  # dvc.yaml declares both curves; a pass-through trains nothing
            for name in ("steps.csv", "warmup.csv"):
                write_csv([], Path(plots_dir) / name, ["step", "loss"])
        return {**m, "seconds": round(time.time() - start, 2)}
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
    prec = resolve({"auto": "auto", "true": "bfloat16", "false": "float32"}[p.bf16], device, "pretrain")
    autocast = prec.autocast_factory(device)
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
             len(held), time.time() - t0, device, prec.autocast is not None)
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
    anchor = None
    if p.anchor_steps or p.anchor_weight:
        emb = word_embeddings(model, tok, p.word_groups)
        anchor = ({k: v for k, v in group_labels([e.caption for e in train], p.word_groups).items() if (v >= 0).any()},
                  emb)
    align = align_captions(model, enc_train, pix_train, p, seed, tok.pad_token_id, steps, autocast, prefix, anchor)
    if anchor is not None:
        align["anchor_accuracy"] = anchor_accuracy(model, pix_held, group_labels(refs, p.word_groups), anchor[1])
        log.info("word anchoring: held-out accuracy %s", align["anchor_accuracy"])
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
        write_csv(steps, Path(plots_dir) / "steps.csv")
        write_csv(warm_curve, Path(plots_dir) / "warmup.csv")
    return {"passthrough": 0, "train_captions": len(train), "eval_captions": len(held), "before": before,
            "after": after, **warm, **align, "seconds": round(time.time() - start, 1)}
