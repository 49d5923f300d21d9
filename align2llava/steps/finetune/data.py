"""Fine-tuning data: LLaVA records to token ids with answer-only labels, and batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align2llava.data.images import load_rgb, resolve_image
from align2llava.data.records import IMAGE_TOKEN, Problem
from align2llava.errors import DataError
from align2llava.models.batching import IGNORE_INDEX, pad_batch
from align2llava.models.chat import assistant_spans, image_token_count, needs_bos, to_messages


@dataclass
class Example:
    id: str
    input_ids: list[int]
    labels: list[int]
    image: Path | None


def encode_record(
    record: dict[str, Any], processor: Any, n_image_tokens: int, max_length: int
) -> tuple[list[int], list[int], str | None]:
    """Token ids and labels of one record, or (.., .., problem) when it cannot be trained on.

    The conversation is rendered by the checkpoint's own chat template with one `<image>`,
    which is then expanded to the image's `n_image_tokens` placeholders. Labels are the
    assistant spans (`assistant_spans`). A BOS the tokenizer adds by default but the template
    leaves out is put first (Llama); where the template ends a reply with no special token of
    its own (llava-hf's "ASSISTANT: ... "), the tokenizer's EOS follows each reply and is
    trained on, as in LLaVA-1.5's own "ASSISTANT: ...</s>", so the model still learns to stop.
    """
    tok = processor.tokenizer
    text, spans = assistant_spans(processor, to_messages(record))
    if record.get("image") is not None and IMAGE_TOKEN in text:
        at = text.index(IMAGE_TOKEN)
        grow = len(IMAGE_TOKEN) * (n_image_tokens - 1)
        text = text[:at] + IMAGE_TOKEN * n_image_tokens + text[at + len(IMAGE_TOKEN):]
        spans = [(s + grow if s > at else s, e + grow if e > at else e) for s, e in spans]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    if needs_bos(tok, text):
        ids, offsets = [tok.bos_token_id, *ids], [(0, 0), *offsets]
    labels = [IGNORE_INDEX] * len(ids)
    reply = [-1] * len(ids)  # which assistant span a labelled token belongs to
    k = 0
    for i, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k < len(spans) and spans[k][0] <= start < spans[k][1] and end > start:
            labels[i], reply[i] = ids[i], k
    ids, labels = _end_replies(ids, labels, reply, tok)
    n_img = sum(1 for t in ids if t == processor.image_token_id)
    expected = n_image_tokens if record.get("image") is not None else 0
    if n_img != expected:
        return ids, labels, f"has {n_img} image tokens after tokenizing, expected {expected}"
    total = len(ids)
    if len(ids) > max_length:
        last_img = max((i for i, t in enumerate(ids) if t == processor.image_token_id), default=-1)
        if last_img >= max_length:
            return ids, labels, (
                f"the image's tokens end at position {last_img + 1}, past max_length={max_length}"
            )
        ids, labels = ids[:max_length], labels[:max_length]
    if all(lab == IGNORE_INDEX for lab in labels):
        return ids, labels, (
            f"no answer tokens left to train on (labels fully masked; {total} tokens, "
            f"max_length={max_length}): raise max_length or shorten the record"
        )
    return ids, labels, None


def _end_replies(ids: list[int], labels: list[int], reply: list[int], tok: Any) -> tuple[list[int], list[int]]:
    """After the last token of every reply whose tokens hold no special token (no end-of-turn of
    the template's own), insert the tokenizer's EOS, labelled."""
    eos, special = tok.eos_token_id, set(tok.all_special_ids)
    last: dict[int, int] = {}
    ended: set[int] = set()
    for i, k in enumerate(reply):
        if k >= 0:
            last[k] = i
            if ids[i] in special:
                ended.add(k)
    after = {i for k, i in last.items() if k not in ended}
    if eos is None or not after:
        return ids, labels
    out_ids: list[int] = []
    out_labels: list[int] = []
    for i, (t, lab) in enumerate(zip(ids, labels)):
        out_ids.append(t)
        out_labels.append(lab)
        if i in after:
            out_ids.append(eos)
            out_labels.append(eos)
    return out_ids, out_labels


def prepare_examples(
    records: list[dict[str, Any]],
    processor: Any,
    *,
    file: str,
    max_length: int,
    image_root: str | Path | None = None,
) -> list[Example]:
    """Encode every record; any record that cannot be trained on is an error naming it."""
    n_image_tokens = image_token_count(processor)
    examples: list[Example] = []
    problems: list[Problem] = []
    for i, rec in enumerate(records):
        ids, labels, problem = encode_record(rec, processor, n_image_tokens, max_length)
        if problem:
            problems.append(Problem(file, i, rec.get("id"), problem))
            continue
        image = None
        if rec.get("image") is not None:
            image = resolve_image(image_root, rec["image"]) if image_root else Path(rec["image"])
        examples.append(Example(str(rec["id"]), ids, labels, image))
    if problems:
        more = f" (+{len(problems) - 1} more records)" if len(problems) > 1 else ""
        raise DataError(str(problems[0]) + more)
    return examples


class InstructionDataset:
    """A torch-style dataset over encoded examples; images are decoded lazily."""

    def __init__(self, examples: list[Example], processor: Any):
        self.examples = examples
        self.processor = processor

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ex = self.examples[i]
        item: dict[str, Any] = {"input_ids": ex.input_ids, "labels": ex.labels}
        if ex.image is not None:
            pixels = self.processor.image_processor(images=[load_rgb(ex.image)], return_tensors="pt")
            item["pixel_values"] = pixels["pixel_values"][0]
        return item


def collate(batch: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad a batch; pixel_values for the examples that have an image, in order."""
    import torch

    out = pad_batch([b["input_ids"] for b in batch], pad_token_id, labels=[b["labels"] for b in batch])
    pixels = [b["pixel_values"] for b in batch if "pixel_values" in b]
    if pixels:
        out["pixel_values"] = torch.stack(pixels)
    return out
