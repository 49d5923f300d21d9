"""Padding token-id sequences into a batch: the one helper every stage's batches go through.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

IGNORE_INDEX = -100  # the label of a position no loss is computed on (transformers' convention)


def pad_batch(
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    *,
    side: Literal["right", "left"] = "right",
    labels: Sequence[Sequence[int]] | None = None,
    device: Any = None,
) -> dict[str, Any]:
    """{"input_ids", "attention_mask"} (+ "labels", padded with IGNORE_INDEX) as long tensors
    [len(seqs), longest]; each row's tokens sit at the right end with left padding, at the left
    end with right padding; the mask is 1 on tokens, 0 on padding."""
    import torch

    if not seqs:
        raise ValueError("pad_batch needs at least one sequence")
    if labels is not None and [len(x) for x in labels] != [len(x) for x in seqs]:
        raise ValueError("pad_batch: labels must have the lengths of their sequences")
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    lab = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long) if labels is not None else None
    for i, x in enumerate(seqs):
        cols = slice(width - len(x), width) if side == "left" else slice(0, len(x))
        ids[i, cols] = torch.tensor(x, dtype=torch.long)
        mask[i, cols] = 1
        if lab is not None:
            lab[i, cols] = torch.tensor(labels[i], dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask}
    if lab is not None:
        out["labels"] = lab
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out
