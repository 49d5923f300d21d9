"""Reading and writing instruction data.

Read: LLaVA JSON list, JSONL, parquet, Hugging Face `save_to_disk` folders, and the
"messages" style ({"messages": [{"role", "content"}], "images": [...]}) of LLaMA-Factory /
ShareGPT exports, converted to LLaVA records. Records without an id get a deterministic
content id. Write: LLaVA JSON, JSONL, parquet, HF folders, messages JSON.

`read_records` never raises on a bad *record*: unparseable entries (a truncated JSONL line, a
null) come back as Problems so callers can report or reject them; it raises DataError only when
the file as a whole cannot be read.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from align2llava.data.records import IMAGE_TOKEN, Problem, content_id
from align2llava.errors import DataError

FORMATS = ("json", "jsonl", "parquet", "hf", "messages")


@dataclass
class Loaded:
    records: list[Any] = field(default_factory=list)
    # Parallel to records: the entry's position in the file (line number - 1 for JSONL).
    indices: list[int] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def detect_format(path: str | Path) -> str:
    p = Path(path)
    if p.is_dir():
        return "hf"
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise DataError(f"{path}: unknown format (use .json, .jsonl, .parquet or an HF folder)")


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: not valid UTF-8 (byte {exc.start}, line {line})") from None


def read_json_any(path: str | Path) -> Any:
    """Parse a whole JSON file with errors that name the file and position."""
    path = Path(path)
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None


def read_records(path: str | Path, fmt: str | None = None) -> Loaded:
    """Read instruction records of any supported format as LLaVA dicts."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    loaded = Loaded()
    if fmt == "jsonl":
        text = _read_text(path)
        for n, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                loaded.problems.append(
                    Problem(str(path), n, None, f"line {n + 1} is not valid JSON: {exc.msg}")
                )
                continue
            loaded.records.append(rec)
            loaded.indices.append(n)
    elif fmt in ("json", "messages"):
        data = read_json_any(path)
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        loaded.records = data
        loaded.indices = list(range(len(data)))
    elif fmt == "parquet":
        loaded.records = _read_parquet(path)
        loaded.indices = list(range(len(loaded.records)))
    elif fmt == "hf":
        loaded.records = _read_hf(path)
        loaded.indices = list(range(len(loaded.records)))
    else:
        raise DataError(f"{path}: unknown format '{fmt}' (choose from {', '.join(FORMATS)})")
    kept, idx = [], []
    for rec, i in zip(loaded.records, loaded.indices):
        if rec is None:
            loaded.problems.append(Problem(str(path), i, None, "expected an object, got null"))
            continue
        kept.append(_normalise(rec))
        idx.append(i)
    loaded.records, loaded.indices = kept, idx
    loaded.problems.sort(key=lambda p: p.index if p.index is not None else -1)
    return loaded


def _read_parquet(path: Path) -> list[Any]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable parquet file: {exc}") from None
    return [_drop_nulls(r) for r in table.to_pylist()]


def _read_hf(path: Path) -> list[Any]:
    if not (path / "dataset_info.json").exists() and not (path / "state.json").exists():
        if (path / "dataset_dict.json").exists():
            raise DataError(f"{path}: is a DatasetDict; point at one split's folder instead")
        raise DataError(f"{path}: not a Hugging Face save_to_disk folder")
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: cannot load Hugging Face dataset: {exc}") from None
    return [_drop_nulls(r) for r in ds.to_list()]


def _drop_nulls(rec: dict[str, Any]) -> dict[str, Any]:
    """Columnar formats fill absent fields with null; drop them so records round-trip."""
    return {k: v for k, v in rec.items() if v is not None}


def _normalise(rec: Any) -> Any:
    """Messages style -> LLaVA; add a content id where missing. Leaves bad shapes to validation."""
    if isinstance(rec, dict) and "conversations" not in rec and isinstance(rec.get("messages"), list):
        rec = messages_to_llava(rec)
    if isinstance(rec, dict) and "id" not in rec and "conversations" in rec:
        rec = {"id": content_id(rec), **rec}
    return rec


_ROLE_TO_FROM = {"user": "human", "human": "human", "assistant": "gpt", "gpt": "gpt"}


def messages_to_llava(rec: dict[str, Any]) -> dict[str, Any]:
    """{"messages": [{"role","content"}], "images": [p]} -> LLaVA record (extras kept)."""
    out: dict[str, Any] = {k: v for k, v in rec.items() if k not in ("messages", "images")}
    convs = []
    for m in rec["messages"]:
        if not isinstance(m, dict):
            convs.append(m)  # left for validation to report
            continue
        role = m.get("role")
        if role == "system":
            out.setdefault("system", m.get("content"))
            continue
        convs.append({"from": _ROLE_TO_FROM.get(role, role), "value": m.get("content")})
    out["conversations"] = convs
    images = rec.get("images")
    if isinstance(images, list) and len(images) == 1:
        out["image"] = images[0]
    elif isinstance(images, str):
        out["image"] = images
    elif images:
        out["images"] = images  # several images: kept, validation reports it
    if "id" not in out:
        out = {"id": content_id(rec), **out}
    return out


def llava_to_messages(rec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: v for k, v in rec.items() if k not in ("conversations", "image", "system")}
    msgs = []
    if "system" in rec:
        msgs.append({"role": "system", "content": rec["system"]})
    for t in rec["conversations"]:
        msgs.append({"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]})
    out["messages"] = msgs
    if rec.get("image") is not None:
        out["images"] = [rec["image"]]
    return out


def read_records_strict(path: str | Path) -> list[dict[str, Any]]:
    """Our own intermediate files: any problem is an error."""
    loaded = read_records(path)
    if loaded.problems:
        raise DataError(str(loaded.problems[0]))
    return loaded.records


def write_records(records: Iterable[dict[str, Any]], path: str | Path, fmt: str | None = None) -> Path:
    """Write records atomically (temp file + rename)."""
    path = Path(path)
    records = list(records)
    fmt = fmt or detect_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        from datasets import Dataset

        try:
            Dataset.from_list(records).save_to_disk(str(path))
        except Exception as exc:
            raise DataError(f"{path}: cannot write as a Hugging Face dataset: {exc}") from None
        return path
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pq.write_table(pa.Table.from_pylist(records), tmp)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise DataError(f"{path}: records do not fit one parquet schema: {exc}") from None
    elif fmt == "jsonl":
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    elif fmt == "json":
        tmp.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    elif fmt == "messages":
        msgs = [llava_to_messages(r) for r in records]
        tmp.write_text(json.dumps(msgs, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    else:
        raise DataError(f"{path}: unknown format '{fmt}' (choose from {', '.join(FORMATS)})")
    os.replace(tmp, path)
    return path


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    return write_records(rows, path, "jsonl")


def write_csv(rows: Iterable[Any], path: str | Path, columns: Sequence[str] | None = None) -> Path:
    """A CSV file (DVC plots, reports), written atomically in Python's csv dialect: commas, \r\n
    line ends, quotes only where needed; None is an empty cell.

    `rows` of dicts: one column per name in `columns` (default: the first row's keys; a missing
    key is an empty cell, other keys are left out), after a header line. `rows` of sequences:
    written as they are, after `columns` as the header line when given. No rows and no columns:
    an empty file.
    """
    path = Path(path)
    rows = list(rows)
    if rows and isinstance(rows[0], dict):
        columns = list(columns) if columns is not None else list(rows[0])
        rows = [[r.get(c) for c in columns] for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if columns is not None:
            w.writerow(columns)
        w.writerows(rows)
    os.replace(tmp, path)
    return path


def fingerprint(*paths: str | Path, extra: Any = None, suffixes: Sequence[str] | None = None) -> str:
    """sha256 (hex) of what a cache or resume key is made from: file contents and `extra`.

    A file counts with its name and bytes; a folder with every file below it (sorted; only those
    ending in one of `suffixes` when given), each by its relative path and bytes; a missing path
    by its name. Where a path lies does not count (put it in `extra` when it should). `extra` is
    anything JSON can write (other objects by their str()), keys sorted.
    """
    h = hashlib.sha256()
    for p in map(Path, paths):
        h.update(b"\0path\0")
        if p.is_dir():
            files = sorted(f for f in p.rglob("*")
                           if f.is_file() and (suffixes is None or f.name.endswith(tuple(suffixes))))
            for f in files:
                h.update(f.relative_to(p).as_posix().encode() + b"\0" + _file_digest(f))
        elif p.is_file():
            h.update(p.name.encode() + b"\0" + _file_digest(p))
        else:
            h.update(b"missing\0" + p.name.encode())
    if extra is not None:
        h.update(b"\0extra\0" + json.dumps(extra, sort_keys=True, ensure_ascii=False, default=str).encode())
    return h.hexdigest()


def _file_digest(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.digest()


def read_jsonl_strict(
    path: str | Path,
    *,
    required: Sequence[str] = (),
    check: Callable[[dict[str, Any]], str | None] | None = None,
    missing_hint: str | None = None,
) -> list[dict[str, Any]]:
    """Our own JSONL files, read strictly: each non-blank line one JSON object, holding every
    key in `required`, for which `check(row)` returns None (else the problem, e.g. "has kind
    'x'"). The first problem is a one-line DataError naming the file and line:
    `pairs.jsonl: line 3 lacks keys kind (of id, kind, split)`. `missing_hint` says what writes
    the file when it does not exist ("run the score stage first").
    """
    path = Path(path)
    if missing_hint and not path.exists():
        raise DataError(f"{path}: file not found ({missing_hint})")
    rows = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {n} is not valid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {n} is not a JSON object")
        missing = [k for k in required if k not in row]
        if missing:
            raise DataError(f"{path}: line {n} lacks keys {', '.join(missing)} (of {', '.join(required)})")
        problem = check(row) if check is not None else None
        if problem:
            raise DataError(f"{path}: line {n}: {problem}")
        rows.append(row)
    return rows


__all__ = [
    "FORMATS",
    "IMAGE_TOKEN",
    "Loaded",
    "detect_format",
    "read_json_any",
    "read_records",
    "read_records_strict",
    "write_records",
    "write_jsonl",
    "write_csv",
    "fingerprint",
    "read_jsonl_strict",
    "messages_to_llava",
    "llava_to_messages",
]
