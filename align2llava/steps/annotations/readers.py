"""Readers for annotation files: the paper's released format and tables (Label Studio exports:
labelstudio.py).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align2llava.data.images import resolve_image
from align2llava.data.io import read_json_any
from align2llava.data.records import strip_image_token
from align2llava.data.rejects import Rejects
from align2llava.errors import DataError

KINDS = ("question", "answer")
# Two scores closer than this are a tie (averaged ratings are not exact in binary).
TIE_EPS = 1e-9


@dataclass
class Group:
    """Scored candidates that compete with each other (one question set, or one answer turn)."""

    group: str
    image: str
    kind: str
    prompt: str
    candidates: list[str]
    scores: list[float]
    # Label Studio: each completed annotation's scores, one per candidate (scores = their mean).
    ratings: list[list[float]] = field(default_factory=list)


# ----------------------------------------------------------------------------- validation


def _score(value: Any) -> float:
    """A score in [0, 1] or DataError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"score {value!r} is not a number")
    try:
        s = float(value)
    except ValueError:
        raise DataError(f"score {value!r} is not a number") from None
    if not math.isfinite(s) or s < 0.0 or s > 1.0:
        raise DataError(f"score {value!r} is outside [0, 1]")
    return s


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not strip_image_token(value):
        raise DataError(f"{what} must be a non-empty string, got {_short(value)}")
    return strip_image_token(value)


def _question_set(value: Any, what: str) -> str:
    """A question candidate: a list of human turns (or one string) -> turns joined by newlines."""
    if isinstance(value, str):
        return _text(value, what)
    if not isinstance(value, list) or not value:
        raise DataError(f"{what} must be a non-empty list of questions, got {_short(value)}")
    return "\n".join(_text(q, f"{what} turn {t}") for t, q in enumerate(value))


def _image(value: Any, image_root: str | Path | None) -> str:
    if value is None or value == "":
        raise DataError("missing image")
    if not isinstance(value, str):
        raise DataError(f"image must be a path string, got {_short(value)}")
    if image_root is not None:
        path = resolve_image(image_root, value)
        if not path.is_file():
            raise DataError(f"image file '{value}' not found under {image_root}")
    return value


def _short(v: Any) -> str:
    s = json.dumps(v, ensure_ascii=False, default=str)
    return s if len(s) <= 60 else s[:57] + "..."


def _rid(rec: Any) -> Any:
    return rec.get("id") if isinstance(rec, dict) else None


def _list_of(path: Path) -> list[Any]:
    data = read_json_any(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- readers


def read_question_file(
    path: str | Path, rejects: Rejects, image_root: str | Path | None = None
) -> tuple[list[Group], int]:
    """The released question-preference file -> one group per record. Returns (groups, rows)."""
    path = Path(path)
    data = _list_of(path)
    groups: list[Group] = []
    seen: dict[str, int] = {}
    for i, rec in enumerate(data):
        try:
            if not isinstance(rec, dict):
                raise DataError(f"expected an object, got {_short(rec)}")
            rid = rec.get("id")
            if rid is None or rid == "" or isinstance(rid, (bool, list, dict)):
                raise DataError("missing 'id'")
            key = str(rid)
            if key in seen:
                raise DataError(f"duplicate id (first at record {seen[key]})")
            image = _image(rec.get("image"), image_root)
            qs, scores = rec.get("questions"), rec.get("score")
            if not isinstance(qs, list) or not qs:
                raise DataError("'questions' must be a non-empty list of candidates")
            if not isinstance(scores, list) or len(scores) != len(qs):
                raise DataError(
                    f"'score' must be a list parallel to 'questions' ({len(qs)} candidates)"
                )
            cands = [_question_set(q, f"candidate {k}") for k, q in enumerate(qs)]
            vals = [_score(s) for s in scores]
        except DataError as exc:
            rejects.add(i, _rid(rec), str(exc), rec)
            continue
        seen[key] = i
        groups.append(Group(key, image, "question", "", cands, vals))
    return groups, len(data)


def read_answer_file(
    path: str | Path, rejects: Rejects, image_root: str | Path | None = None
) -> tuple[list[Group], int]:
    """The released answer-preference file -> one group per gpt turn holding candidates."""
    path = Path(path)
    data = _list_of(path)
    groups: list[Group] = []
    seen: dict[str, int] = {}
    for i, rec in enumerate(data):
        try:
            found = _answer_groups(rec, image_root)
            key = str(rec["id"])
            if key in seen:
                raise DataError(f"duplicate id (first at record {seen[key]})")
        except DataError as exc:
            rejects.add(i, _rid(rec), str(exc), rec)
            continue
        seen[key] = i
        groups.extend(found)
    return groups, len(data)


def _answer_groups(rec: Any, image_root: str | Path | None) -> list[Group]:
    if not isinstance(rec, dict):
        raise DataError(f"expected an object, got {_short(rec)}")
    rid = rec.get("id")
    if rid is None or rid == "" or isinstance(rid, (bool, list, dict)):
        raise DataError("missing 'id'")
    image = _image(rec.get("image"), image_root)
    convs = rec.get("conversations")
    if not isinstance(convs, list) or len(convs) < 2 or len(convs) % 2:
        raise DataError("'conversations' must be a non-empty list of human/gpt turn pairs")
    out = []
    for k in range(0, len(convs), 2):
        q, a = convs[k], convs[k + 1]
        if not isinstance(q, dict) or q.get("from") != "human":
            raise DataError(f"turn {k} must be from 'human'")
        if not isinstance(a, dict) or a.get("from") != "gpt":
            raise DataError(f"turn {k + 1} must be from 'gpt'")
        question = _text(q.get("value"), f"turn {k} 'value'")
        value = a.get("value")
        if isinstance(value, list):
            scores = a.get("score")
            if not isinstance(scores, list) or len(scores) != len(value):
                raise DataError(
                    f"turn {k + 1} 'score' must be a list parallel to its {len(value)} candidates"
                )
            cands = [_text(v, f"turn {k + 1} candidate {c}") for c, v in enumerate(value)]
            vals = [_score(s) for s in scores]
            out.append(Group(f"{rid}#{k // 2}", image, "answer", question, cands, vals))
        else:
            _text(value, f"turn {k + 1} 'value'")
    return out


TABLE_COLUMNS = ("group", "image", "kind", "candidate", "score")


def read_table(
    path: str | Path, rejects: Rejects, image_root: str | Path | None = None
) -> tuple[list[Group], int]:
    """CSV (header row) or JSONL rows {group, image, kind, candidate, score, prompt}."""
    path = Path(path)
    before = rejects.count
    rows = _table_rows(path, rejects)
    unparsed = rejects.count - before  # JSONL lines that are not JSON
    by_group: dict[str, Group] = {}
    order: list[str] = []
    for i, row in rows:
        try:
            if not isinstance(row, dict):
                raise DataError(f"expected an object, got {_short(row)}")
            missing = [c for c in TABLE_COLUMNS if row.get(c) in (None, "")]
            if missing and missing != ["image"]:
                raise DataError(f"missing column value(s): {', '.join(missing)}")
            group = str(row["group"])
            kind = row["kind"]
            if kind not in KINDS:
                raise DataError(f"kind must be 'question' or 'answer', got {_short(kind)}")
            image = _image(row.get("image"), image_root)
            score = _score(row["score"])
            text = _text(row["candidate"], "candidate")
            prompt = "" if kind == "question" else _text(row.get("prompt"), "prompt")
            g = by_group.get(group)
            if g is None:
                by_group[group] = Group(group, image, kind, prompt, [text], [score])
                order.append(group)
                continue
            if (g.image, g.kind, g.prompt) != (image, kind, prompt):
                raise DataError(
                    f"group '{group}' already has image/kind/prompt "
                    f"{_short([g.image, g.kind, g.prompt])}; this row differs"
                )
            g.candidates.append(text)
            g.scores.append(score)
        except DataError as exc:
            rejects.add(i, row.get("group") if isinstance(row, dict) else None, str(exc), row)
    return [by_group[g] for g in order], len(rows) + unparsed


def _table_rows(path: Path, rejects: Rejects) -> list[tuple[int, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise DataError(f"{path}: file not found") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
        reader = csv.DictReader(text.splitlines(keepends=True), delimiter="\t" if suffix == ".tsv" else ",")
        header = reader.fieldnames or []
        absent = [c for c in TABLE_COLUMNS if c not in header]
        if absent:
            raise DataError(f"{path}: header lacks column(s) {', '.join(absent)}")
        return list(enumerate(reader))
    if suffix == ".jsonl":
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise DataError(f"{path}: file not found") from None
        rows: list[tuple[int, Any]] = []
        for n, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as exc:
                rejects.add(n, None, f"line {n + 1} is not valid JSON: {exc.msg}", line)
        return rows
    if suffix == ".json":
        return list(enumerate(_list_of(path)))
    raise DataError(f"{path}: a table must be .csv, .tsv, .jsonl or .json")
