"""An answer's image grounding under the reward models' base MLLM: the answer reward's second term.

    ground = Grounding.load(base_dir, weight=1.7, image_root="images")
    ground.raw([("cat.jpg", "What colour is it?", "It is red.")])   # [0.41]: mean image PMI
    ground([...])                                                  # weight x that

The answer RM g(I, Q, A) reads style, completeness and relevance from its head; whether the
answer says what the image shows is read here, from the base MLLM's own language model (its LM
head, no LoRA): the mean over the answer's tokens of

    log p(token | image, question, earlier tokens) - log p(token | question, earlier tokens),

both through the checkpoint's chat template (the answer as the assistant's reply). A word the
image makes likely (its colour, its object) gains, a word it contradicts loses, an answer that
says nothing about the image stays near 0. The mean, not the sum, so long and short answers are
on one scale. Measured on the demo (docs/research-log.md): an RM head trained on preference
pairs learns the pairs' writing style and not this comparison, though the base makes it.

`fit_weight` chooses the term's weight on the training pairs before the RM head is trained
(a one-parameter Bradley-Terry fit), and the head is then trained on top of it (the term is a
fixed offset in its loss), so it learns what the term does not explain.

The log-probabilities are evaluate's likelihood scorer's (float32 from the final hidden states);
the batches are sorted by length and fixed by the input, so a shard scores the same whichever
process or run scores it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from align2llava.errors import DataError

log = logging.getLogger(__name__)

FEATURES = ("none", "image_pmi")

Triple = tuple[str | None, str, str]  # (image, question, answer)


class Grounding:
    """The grounding term of one answer reward model: an MLLM with its LM head, and a weight."""

    def __init__(self, model: Any, processor: Any, *, weight: float = 1.0,
                 image_root: str | Path | None = None, batch_size: int = 16):
        from align2llava.steps.evaluation.likelihood import _Scorer

        self.model, self.processor = model, processor
        self.weight, self.image_root, self.batch_size = float(weight), image_root, batch_size
        self.scorer = _Scorer(model, processor)

    @classmethod
    def load(cls, base_model: str | Path, *, weight: float = 1.0, image_root: str | Path | None = None,
             dtype: str = "auto", device: Any = "cpu", batch_size: int = 16) -> "Grounding":
        from align2llava.models.loading import load_mllm
        from align2llava.models.precision import resolve

        model, processor = load_mllm(base_model, dtype="float32")
        resolve(dtype, device, "score").cast(model)
        model.requires_grad_(False)
        model.to(device).eval()
        return cls(model, processor, weight=weight, image_root=image_root, batch_size=batch_size)

    def __call__(self, items: Sequence[Triple], meter: Any = None) -> list[float]:
        """weight x `raw`."""
        return [self.weight * g for g in self.raw(items, meter)]

    def raw(self, items: Sequence[Triple], meter: Any = None) -> list[float]:
        """Mean per-token image PMI of each (image, question, answer); 0.0 without an image.
        `meter` (a Progress) counts two per item: the pass with the image and the one without."""
        from align2llava.models.chat import continuation_ids

        out = [0.0] * len(items)
        rows = [(i, continuation_ids(self.processor, q, a, image=True, span="start"),
                 continuation_ids(self.processor, q, a, image=False, span="start"))
                for i, (image, q, a) in enumerate(items) if image is not None]
        rows.sort(key=lambda r: -len(r[1]))
        for s in range(0, len(rows), self.batch_size):
            chunk = rows[s: s + self.batch_size]
            sums = []
            for with_image, k in ((True, 1), (False, 2)):
                batch = [_Item(items[i][1], items[i][0] if with_image else None) for i, *_ in chunk]
                got = self.scorer.score(batch, [r[k] for r in chunk], image_root=self.image_root, instruction="")
                sums.append([row[0] for row in got])
            for (i, seen, _), a, b in zip(chunk, *sums):
                out[i] = (a - b) / len(seen)
            if meter is not None:
                meter.update(2 * len(chunk), tok=sum(len(r[1]) + len(r[2]) for r in chunk))
        if meter is not None:  # answers without an image need no pass
            meter.update(2 * (len(items) - len(rows)))
        return out


class _Item:  # what the scorer's prompt encoder reads of an item
    def __init__(self, question: str, image: str | None):
        self.question, self.image = question, image


def load_grounding(path: str | Path, meta: dict[str, Any], *, backbone: str | Path | None = None,
                   image_root: str | Path | None = None, dtype: str = "auto", device: Any = "cpu",
                   batch_size: int = 16) -> Grounding | None:
    """The grounding term a reward model's config names (on the model's backbone with its LM
    head, at the config's weight), or None when it has none."""
    from align2llava.models.reward_model import CONFIG_FILE, resolve_backbone

    entry = meta.get("grounding")
    if not entry or entry.get("feature", "none") == "none":
        return None
    if entry.get("feature") not in FEATURES or not isinstance(entry.get("weight"), (int, float)):
        raise DataError(f"{Path(path) / CONFIG_FILE}: grounding {entry!r} is not one this version reads "
                        f"(feature one of {', '.join(FEATURES[1:])}, a numeric weight)")
    base = resolve_backbone(Path(path), meta, backbone)
    return Grounding.load(base, weight=float(entry["weight"]), image_root=image_root, dtype=dtype,
                          device=device, batch_size=batch_size)


def fit_weight(chosen: Sequence[float], rejected: Sequence[float], *, max_weight: float = 100.0) -> float:
    """The weight w >= 0 that maximises sum log sigmoid(w * (chosen - rejected)) (Newton steps).

    0 when the term orders no more pairs right than wrong; capped at `max_weight` (a term that
    separates every pair has no finite maximum)."""
    d = [c - r for c, r in zip(chosen, rejected)]
    if not d or sum(x > 0 for x in d) <= sum(x < 0 for x in d):
        return 0.0
    w = 1.0 / max(1e-6, math.sqrt(sum(x * x for x in d) / len(d)))
    for _ in range(50):
        p = [1.0 / (1.0 + math.exp(min(50.0, w * x))) for x in d]  # sigmoid(-w x)
        grad = sum(x * q for x, q in zip(d, p))
        hess = sum(x * x * q * (1 - q) for x, q in zip(d, p))
        if hess <= 1e-12:
            break
        step = grad / hess
        w = min(max_weight, max(0.0, w + step))
        if abs(step) < 1e-6 * max(1.0, w):
            break
    return w
