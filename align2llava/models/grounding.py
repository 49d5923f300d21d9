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

Scores are float32 from the final hidden states; the batches are sorted by length and fixed by
the input, so a shard scores the same whichever process or run scores it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from align2llava.data.images import load_rgb, resolve_image

log = logging.getLogger(__name__)

FEATURES = ("none", "image_pmi")

Triple = tuple[str | None, str, str]  # (image, question, answer)


class Grounding:
    """The grounding term of one answer reward model: an MLLM with its LM head, and a weight."""

    def __init__(self, model: Any, processor: Any, *, weight: float = 1.0,
                 image_root: str | Path | None = None, batch_size: int = 16):
        import torch

        self.model, self.processor, self.tok = model, processor, processor.tokenizer
        self.weight, self.image_root, self.batch_size = float(weight), image_root, batch_size
        self.body = model.model  # LlavaModel: no LM head
        self.device = next(model.parameters()).device
        self.lm_head = model.get_output_embeddings().weight.detach().to(torch.float32)
        self._pixels: dict[str, Any] = {}
        self._prompts: dict[tuple[str, bool], list[int]] = {}

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
        """Mean per-token image PMI of each (image, question, answer); 0.0 without an image."""
        seen = self.token_log_probs(items, with_image=True, meter=meter)
        blind = self.token_log_probs(items, with_image=False, meter=meter)
        out = []
        for (image, _, _), a, b in zip(items, seen, blind):
            out.append(0.0 if image is None or not a else sum(x - y for x, y in zip(a, b)) / len(a))
        return out

    # ------------------------------------------------------------------ log-probabilities

    def _prompt_ids(self, question: str, with_image: bool) -> list[int]:
        from align2llava.models.chat import prompt_messages, render, text_ids

        key = (question, with_image)
        if key not in self._prompts:
            text = render(self.processor, prompt_messages(question, "", with_image), generation_prompt=True)
            ids = text_ids(self.tok, text)
            if with_image:  # the placeholder expanded as the processor expands it
                tid = self.processor.image_token_id
                k = ids.index(tid)
                ids = ids[:k] + [tid] * self._n_image_tokens() + ids[k + 1:]
            self._prompts[key] = ids
        return self._prompts[key]

    def _n_image_tokens(self) -> int:
        if not hasattr(self, "_n_img"):
            from align2llava.models.chat import image_token_count

            self._n_img = image_token_count(self.processor)
        return self._n_img

    def _pixel(self, image: str) -> Any:
        if image not in self._pixels:
            path = resolve_image(self.image_root, image) if self.image_root is not None else Path(image)
            px = self.processor.image_processor(images=[load_rgb(path)], return_tensors="pt")["pixel_values"][0]
            self._pixels[image] = px
            if len(self._pixels) > 4096:
                self._pixels.pop(next(iter(self._pixels)))
        return self._pixels[image]

    def token_log_probs(self, items: Sequence[Triple], *, with_image: bool, meter: Any = None) -> list[list[float]]:
        """Per item, log p of each of the answer's tokens after the prompt (with or without its image)."""
        import torch

        from align2llava.models.batching import pad_batch
        from align2llava.models.chat import continuation_ids

        rows: list[tuple[list[int], int, str | None]] = []
        for image, question, answer in items:
            use = with_image and image is not None
            prompt = self._prompt_ids(question, use)
            cont = continuation_ids(self.processor, question, answer, image=use, span="start")
            rows.append((prompt + cont, len(prompt), image if use else None))
        # rows with an image and rows without one go in separate batches (one pixel tensor each)
        order = sorted(range(len(rows)), key=lambda i: (rows[i][2] is None, -len(rows[i][0])))
        out: list[list[float]] = [[] for _ in rows]
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        dtype = next(self.model.parameters()).dtype
        chunks, cur = [], []
        for i in order:
            if cur and (len(cur) == self.batch_size or (rows[cur[0]][2] is None) != (rows[i][2] is None)):
                chunks.append(cur)
                cur = []
            cur.append(i)
        if cur:
            chunks.append(cur)
        with torch.inference_mode():
            for chunk in chunks:
                batch = pad_batch([rows[i][0] for i in chunk], pad, side="right", device=self.device)
                imgs = [rows[i][2] for i in chunk if rows[i][2] is not None]
                kw = {"pixel_values": torch.stack([self._pixel(im) for im in imgs]).to(self.device, dtype)} if imgs else {}
                hidden = self.body(**batch, **kw).last_hidden_state
                for row, i in enumerate(chunk):
                    ids, start, _ = rows[i]
                    h = hidden[row, start - 1: len(ids) - 1].float()
                    lp = torch.nn.functional.linear(h, self.lm_head).log_softmax(-1)
                    target = torch.tensor(ids[start:], device=lp.device)
                    out[i] = lp.gather(1, target[:, None])[:, 0].tolist()
                if meter is not None:  # one per item per pass (raw makes two)
                    meter.update(len(chunk), tok=sum(len(rows[i][0]) for i in chunk))
        return out


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
