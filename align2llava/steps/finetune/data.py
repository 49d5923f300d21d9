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
from align2llava.models.chat import assistant_spans, image_token_count, to_messages


@dataclass
class Example:
    id: str
    input_ids: list[int]
    labels: list[int]
    image: Path | None


def encode_record(
    record: dict[str, Any], processor: Any, n_image_tokens: int, max_length: int
) -> tuple[list[int], list[int], str | None]:
    """Token ids and labels of one record, or (.., .., problem) when it cannot be trained on."""
    messages = to_messages(record)
    if record.get("image") is not None:
        messages[0]["content"] = messages[0]["content"].replace(
            IMAGE_TOKEN, IMAGE_TOKEN * n_image_tokens, 1
        )
    text, spans = assistant_spans(processor, messages)
    enc = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    k = 0
    for i, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k < len(spans) and spans[k][0] <= start < spans[k][1] and end > start:
            labels[i] = ids[i]
    n_img = sum(1 for t in ids if t == processor.image_token_id)
    expected = n_image_tokens if record.get("image") is not None else 0
    if n_img != expected:
        return ids, labels, f"has {n_img} image tokens after tokenizing, expected {expected}"
    if len(ids) > max_length:
        last_img = max((i for i, t in enumerate(ids) if t == processor.image_token_id), default=-1)
        if last_img >= max_length:
            return ids, labels, (
                f"the image's tokens end at position {last_img + 1}, past max_length={max_length}"
            )
        ids, labels = ids[:max_length], labels[:max_length]
    if all(lab == IGNORE_INDEX for lab in labels):
        total = len(enc["input_ids"])
        return ids, labels, (
            f"no answer tokens left to train on (labels fully masked; {total} tokens, "
            f"max_length={max_length}): raise max_length or shorten the record"
        )
    return ids, labels, None


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
