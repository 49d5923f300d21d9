"""The LLaVA instruction-record contract and its validation.

A record: {"id": str, "image": "rel/path.jpg" (absent for text-only),
           "conversations": [{"from": "human"|"gpt", "value": str}, ...], ...extra fields kept}
The first human turn carries "<image>" (before or after the text) iff the record has an image.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from align2llava.data.images import check_image, resolve_image
from align2llava.errors import DataError

IMAGE_TOKEN = "<image>"
# LLaVA-1.5's instruction after short-answer VQA questions, in its training mix and its benchmarks.
SHORT_ANSWER = "Answer the question using a single word or phrase."
ROLES = ("human", "gpt")


@dataclass(frozen=True)
class Problem:
    """Something wrong with one record of one file."""

    file: str
    index: int | None  # 0-based position in the file (None: the whole file)
    id: Any
    message: str

    def __str__(self) -> str:
        if self.index is None:
            return f"{self.file}: {self.message}"
        where = f"record {self.index}" + (f" (id {self.id})" if self.id is not None else "")
        return f"{self.file}: {where}: {self.message}"


def content_id(record: dict[str, Any], prefix: str = "") -> str:
    """A deterministic id from a record's content (used where the input has none)."""
    blob = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
    return prefix + hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


def record_problems(
    record: Any,
    *,
    image_root: str | Path | None = None,
    check_images: bool = True,
    allow_candidates: bool = False,
) -> list[str]:
    """Everything wrong with one record (empty list: valid).

    `allow_candidates`: a gpt turn's value may be a list of candidate answers (the released
    answer-preference format), with a parallel "score" list.
    """
    if not isinstance(record, dict):
        return [f"expected an object, got {_kind(record)}"]
    problems: list[str] = []
    rid = record.get("id")
    if rid is None:
        problems.append("missing 'id'")
    elif not isinstance(rid, (str, int)) or isinstance(rid, bool) or rid == "":
        problems.append(f"'id' must be a non-empty string, got {_kind(rid)}")
    convs = record.get("conversations")
    if convs is None:
        problems.append("missing 'conversations'")
        return problems
    if not isinstance(convs, list) or not convs:
        problems.append(f"'conversations' must be a non-empty list, got {_kind(convs)}")
        return problems
    has_image = "image" in record and record["image"] is not None
    for t, turn in enumerate(convs):
        if not isinstance(turn, dict):
            problems.append(f"turn {t} must be an object, got {_kind(turn)}")
            continue
        role = turn.get("from")
        expected = ROLES[t % 2]
        if role not in ROLES:
            problems.append(f"turn {t} has 'from' {role!r}, expected 'human' or 'gpt'")
        elif role != expected:
            problems.append(f"turn {t} is from '{role}', expected '{expected}'")
        value = turn.get("value")
        if allow_candidates and role == "gpt" and isinstance(value, list):
            if not value or not all(isinstance(v, str) and v.strip() for v in value):
                problems.append(f"turn {t} candidate answers must be non-empty strings")
            scores = turn.get("score")
            if scores is not None and (not isinstance(scores, list) or len(scores) != len(value)):
                problems.append(f"turn {t} 'score' must be a list parallel to its candidates")
            continue
        if not isinstance(value, str):
            problems.append(f"turn {t} 'value' must be a string, got {_kind(value)}")
            continue
        if not value.strip():
            problems.append(f"turn {t} 'value' is empty")
        n_tok = value.count(IMAGE_TOKEN)
        if t == 0:
            if has_image and n_tok != 1:
                problems.append(
                    f"turn 0 must contain '{IMAGE_TOKEN}' exactly once for a record with an "
                    f"image (found {n_tok})"
                )
            if not has_image and n_tok:
                problems.append(f"turn 0 contains '{IMAGE_TOKEN}' but the record has no image")
        elif n_tok:
            problems.append(f"turn {t} contains '{IMAGE_TOKEN}'; only the first human turn may")
    if len(convs) % 2:
        problems.append(f"conversation has {len(convs)} turns; the last human turn has no answer")
    if has_image:
        image = record["image"]
        if not isinstance(image, str) or not image:
            problems.append(f"'image' must be a non-empty path string, got {_kind(image)}")
        elif image_root is not None:
            try:
                path = resolve_image(image_root, image)
                if check_images:
                    check_image(path)
            except DataError as exc:
                problems.append(str(exc))
    return problems


def validate_records(
    records: Iterable[Any],
    file: str,
    *,
    image_root: str | Path | None = None,
    check_images: bool = True,
    allow_candidates: bool = False,
) -> list[Problem]:
    """Problems of every record plus duplicate ids, in file order."""
    out: list[Problem] = []
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        rid = rec.get("id") if isinstance(rec, dict) else None
        for msg in record_problems(
            rec, image_root=image_root, check_images=check_images, allow_candidates=allow_candidates
        ):
            out.append(Problem(file, i, rid, msg))
        if isinstance(rid, (str, int)) and not isinstance(rid, bool):
            key = str(rid)
            if key in seen:
                out.append(Problem(file, i, rid, f"duplicate id (first at record {seen[key]})"))
            else:
                seen[key] = i
    return out


def human_turns(record: dict[str, Any]) -> list[str]:
    """All human turns' text, with the image token removed."""
    return [
        strip_image_token(t["value"]) for t in record["conversations"] if t.get("from") == "human"
    ]


def qa_pairs(record: dict[str, Any]) -> list[tuple[str, Any]]:
    """(question, answer) per turn; an answer may be a list of candidates."""
    convs = record["conversations"]
    return [
        (strip_image_token(convs[i]["value"]), convs[i + 1]["value"])
        for i in range(0, len(convs) - 1, 2)
    ]


def strip_image_token(text: str) -> str:
    return text.replace(IMAGE_TOKEN, "").strip()


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    return {dict: "object", list: "list", str: "string", bool: "boolean"}.get(
        type(v), type(v).__name__
    )
