"""Word anchoring: image tokens that read like the words naming what the image shows.

A real LLaVA's vision tower is CLIP, trained contrastively so that its image features line up
with the text that names their content; the projector then maps features that are already
language-shaped. The demo's vision tower is small and starts from nothing, so its projected
tokens carry shape and colour (a linear probe reads them) in a form the frozen LLM can caption
from, but cannot compare with a word of the question: asked "Is there a blue shape?", the
instruction-tuned model answers at chance, while the same LLM given the image's content in words
learns the comparison from a few hundred examples (docs/research-log.md).

Anchoring is the demo's stand-in for CLIP's image-text alignment. For each word group
(`pretrain.word_groups`: shapes, colours), every word is represented by the LLM's own input
embedding of " word" (the mean over its tokens). An image's score for a word is the largest
cosine similarity between one of its projected tokens and that embedding; a cross-entropy over
the group's words (temperature `anchor_temperature`) pulls some image token towards the word the
caption names and away from the others, and (1 - that token's cosine) pulls it the rest of the
way. Every image token is also held at the norm of a word embedding (the squared log of the
ratio to the median norm of the LLM's vocabulary): left alone, the projector's tokens grow to
~80 times a word's norm, so the LLM's layers barely change them and read them as no word at all.
The LLM stays frozen and the architecture is LLaVA's own: only the vision tower and projector
weights change.
"""

from __future__ import annotations

from typing import Any

from align2llava.demo.pretrain.warmup import vision_features


def word_embeddings(model: Any, tokenizer: Any, groups: dict[str, list[str]]) -> dict[str, Any]:
    """Per group, a [words, hidden] matrix: the frozen input embedding of " word" (mean over tokens);
    and under "_norm" the median norm of the vocabulary's embeddings."""
    import torch

    table = model.get_input_embeddings().weight.detach()
    out = {"_norm": table.float().norm(dim=-1).median()}
    for name, ws in groups.items():
        rows = [table[torch.tensor(tokenizer(" " + w, add_special_tokens=False)["input_ids"])].mean(0) for w in ws]
        out[name] = torch.stack(rows).float()
    return out


def image_tokens(model: Any, pixel_values: Any) -> Any:
    """The projected image tokens the LLM reads, [batch, tokens, hidden]."""
    return model.model.multi_modal_projector(vision_features(model, pixel_values))


def word_scores(tokens: Any, embeddings: Any) -> Any:
    """[batch, words]: each word's best cosine similarity over an image's tokens."""
    import torch.nn.functional as F

    sims = F.normalize(tokens.float(), dim=-1) @ F.normalize(embeddings, dim=-1).T  # [b, t, w]
    return sims.amax(1)


def anchor_loss(model: Any, pixel_values: Any, labels: dict[str, Any], embeddings: dict[str, Any],
                temperature: float) -> Any:
    """Mean over groups of the cross-entropy of the word scores against each image's word (-100: none)
    plus (1 - the right word's score), and the image tokens' squared log norm ratio to a word's."""
    import torch
    import torch.nn.functional as F

    tokens = image_tokens(model, pixel_values)
    losses = []
    for k, y in labels.items():
        y = y.to(tokens.device)
        ok = y >= 0
        if ok.any():
            scores = word_scores(tokens, embeddings[k])
            losses.append(F.cross_entropy(scores[ok] / temperature, y[ok])
                          + (1 - scores[ok].gather(1, y[ok, None])).mean())
    norm = torch.log(tokens.float().norm(dim=-1) / embeddings["_norm"]).pow(2).mean()
    return sum(losses) / max(1, len(losses)) + norm


def anchor_accuracy(model: Any, pixel_values: Any, labels: dict[str, Any], embeddings: dict[str, Any]) -> dict[str, float]:
    """Held-out: share of images whose best-scoring word of a group is the caption's."""
    import torch

    with torch.no_grad():
        tokens = image_tokens(model, pixel_values)
    out = {}
    for k, y in labels.items():
        ok = y >= 0
        if ok.any():
            pred = word_scores(tokens, embeddings[k]).argmax(1).cpu()
            out[k] = round((pred[ok] == y[ok]).float().mean().item(), 4)
    return out
