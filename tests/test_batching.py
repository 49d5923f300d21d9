"""One padding helper (models.batching.pad_batch) behind every stage's batches."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from align2llava.models.batching import IGNORE_INDEX, pad_batch

SEQS = [[5, 6, 7], [8], [9, 10]]
PAD = 3
RIGHT_IDS = [[5, 6, 7], [8, 3, 3], [9, 10, 3]]
RIGHT_MASK = [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
LEFT_IDS = [[5, 6, 7], [3, 3, 8], [3, 9, 10]]
LEFT_MASK = [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


def _check(t, expected):
    import torch

    assert t.dtype == torch.long and t.tolist() == expected


@pytest.mark.parametrize("side,ids,mask", [("right", RIGHT_IDS, RIGHT_MASK), ("left", LEFT_IDS, LEFT_MASK)])
def test_pad_batch_both_sides(side, ids, mask):
    labels = [[-100, 6, 7], [8], [-100, 10]]
    b = pad_batch(SEQS, PAD, side=side, labels=labels)
    _check(b["input_ids"], ids)
    _check(b["attention_mask"], mask)
    lab = [[IGNORE_INDEX if m == 0 else None for m in row] for row in mask]
    for r, row in enumerate(labels):  # the labels sit where the tokens sit
        cols = [c for c, m in enumerate(mask[r]) if m]
        for c, v in zip(cols, row):
            lab[r][c] = v
    _check(b["labels"], lab)
    assert set(pad_batch(SEQS, PAD, side=side)) == {"input_ids", "attention_mask"}


def test_pad_batch_rejects_bad_input():
    with pytest.raises(ValueError):
        pad_batch([], 0)
    with pytest.raises(ValueError, match="lengths"):
        pad_batch([[1, 2]], 0, labels=[[1]])


def test_finetune_collate():
    import torch

    from align2llava.steps.finetune.data import collate

    batch = [{"input_ids": s, "labels": [-100] + s[1:]} for s in SEQS]
    batch[0]["pixel_values"] = torch.zeros(3, 2, 2)
    out = collate(batch, PAD)
    _check(out["input_ids"], RIGHT_IDS)
    _check(out["attention_mask"], RIGHT_MASK)
    _check(out["labels"], [[-100, 6, 7], [-100, -100, -100], [-100, 10, -100]])
    assert out["pixel_values"].shape == (1, 3, 2, 2)


def test_pretrain_collate():
    from align2llava.demo.pretrain.align import collate

    ids, mask, (rows, cols) = collate([(s, 1) for s in SEQS], PAD)
    _check(ids, RIGHT_IDS)
    _check(mask, RIGHT_MASK)
    assert rows.tolist() == [0, 0, 2] and cols.tolist() == [0, 1, 0]


def test_reward_encoder_batch():
    from align2llava.models.reward_model import Encoder

    enc = object.__new__(Encoder)
    enc.tokenizer = SimpleNamespace(pad_token_id=PAD)
    out = enc.batch([(s, None) for s in SEQS])
    _check(out["input_ids"], RIGHT_IDS)
    _check(out["attention_mask"], RIGHT_MASK)
    assert "pixel_values" not in out
    enc.tokenizer = SimpleNamespace(pad_token_id=None)  # no pad token: 0
    assert enc.batch([([1], None), ([1, 2], None)])["input_ids"].tolist() == [[1, 0], [1, 2]]


@pytest.mark.parametrize("side,ids,mask", [("right", RIGHT_IDS, RIGHT_MASK), ("left", LEFT_IDS, LEFT_MASK)])
def test_inner_llm_batch_ids(side, ids, mask):
    from align2llava.steps.restyle.llm import InnerLLM

    llm = object.__new__(InnerLLM)
    llm.tok, llm.device = SimpleNamespace(pad_token_id=PAD), "cpu"
    got_ids, got_mask = llm._batch_ids(SEQS, side)
    _check(got_ids, ids)
    _check(got_mask, mask)
