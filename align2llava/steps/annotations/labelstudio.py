"""Label Studio JSON exports -> scored candidate groups.

An export is the JSON list Label Studio writes (Export > JSON): per task `id`, `data` (as
imported), `annotations` [{`id`, `result` [{`id`, `from_name`, `to_name`, `type`, `value`,
`origin`, ...}], `was_cancelled`, `ground_truth`, `completed_by`, `created_at`, `lead_time`, ...}],
`predictions`, `created_at`, `project`, ... Only `data` and the annotations' `result`,
`was_cancelled` and `completed_by` are read; predictions, drafts and everything else are ignored.

Task data, two forms:
- as annotation-tasks writes it (tasks.py): `record_id`, `kind`, `turn`, `image_path`,
  `n_candidates`, `candidate_<k>`, `prompt`; the group is `<record id>` (questions) or
  `<record id>#<turn>` (answers), the image is `image_path` whatever URL `image` holds;
- the older own variant: `group`, `kind`, `image`, `prompt`, `candidates` [...].
A task without `image_path` has its image read from `image`: a plain relative path, or a
local-files URL `/data/local-files/?d=<path>` whose `d` is taken, made relative to the image
root by its longest tail that names a file there. Upload URLs (`/data/upload/<project>/<file>`:
Label Studio renames uploads) and other URLs cannot be mapped back and are rejected.

With a tasks file (`tasks`), every exported task must be one of its tasks: same record id, kind,
turn, image path and candidates (an unknown record id, or an edited candidate, is a reject).

Ratings: a result of type `rating` (value.rating, 1..rating_max) or `number` (value.number,
same scale) with `to_name` "candidate_<k>", or a `ranker` (value.ranker: a name -> candidate ids
best first; several buckets: tiers, best first). Score = (rating - 1) / (rating_max - 1); ranks
spread evenly over [0, 1]. Every completed annotation must score every candidate. Several
annotations of a task (several annotators) are averaged per candidate: the group's score is the
mean. Cancelled (skipped) annotations are ignored; a task with no annotation, or only cancelled
ones, is not annotated yet: counted (`tasks_unannotated`, `tasks_skipped`), not rejected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, urlsplit

from align2llava.data.images import resolve_image
from align2llava.data.io import read_json_any
from align2llava.data.rejects import Rejects
from align2llava.errors import DataError
from align2llava.steps.annotations.readers import KINDS, Group, _image, _list_of, _question_set, _rid, _short, _text

LOCAL_FILES_PATH = "/data/local-files/"


@dataclass
class ExportStats:
    """What an export held besides the groups (for the import's metrics)."""

    annotations: int = 0
    cancelled: int = 0
    unannotated: int = 0
    skipped: int = 0
    multi_annotated: int = 0
    annotators: set[str] = field(default_factory=set)

    def metrics(self) -> dict[str, Any]:
        return {"annotations": self.annotations, "annotations_cancelled": self.cancelled,
                "annotators": len(self.annotators), "tasks_unannotated": self.unannotated,
                "tasks_skipped": self.skipped, "tasks_multi_annotated": self.multi_annotated}


# ----------------------------------------------------------------------------- images


def image_from_url(value: Any, image_root: str | Path | None) -> str:
    """The path under the image root that a task's `image` names (see the module doc)."""
    if not isinstance(value, str) or not value:
        raise DataError(f"data.image must be a path or URL string, got {_short(value)}")
    parts = urlsplit(value)
    if parts.path.endswith(LOCAL_FILES_PATH):
        d = parse_qs(parts.query).get("d")
        if not d or not d[0]:
            raise DataError(f"image URL '{value}' has no 'd' parameter")
        return _local_file(d[0], value, image_root)
    if "/data/upload/" in parts.path:
        raise DataError(f"image '{value}' is a Label Studio upload (renamed on upload), which cannot be "
                        "mapped to a file under the image root; the task data needs 'image_path' "
                        "(annotation-tasks writes it)")
    if parts.scheme or parts.netloc:
        raise DataError(f"image URL '{value}' cannot be mapped to a file under the image root; the task "
                        "data needs 'image_path' (annotation-tasks writes it)")
    return _image(value, image_root)


def _local_file(d: str, url: str, image_root: str | Path | None) -> str:
    tail = [p for p in PurePosixPath(d.replace("\\", "/")).parts if p not in ("/", "")]
    if image_root is None:
        return "/".join(tail)
    for k in range(len(tail)):
        rel = "/".join(tail[k:])
        try:
            if resolve_image(image_root, rel).is_file():
                return rel
        except DataError:
            continue
    raise DataError(f"image URL '{url}': no tail of '{d}' is a file under {image_root}")


# ----------------------------------------------------------------------------- tasks file


def read_tasks_file(path: str | Path) -> dict[tuple[str, str, int | None], dict[str, Any]]:
    """Our own tasks file (annotation-tasks), read strictly: (record id, kind, turn) -> data."""
    path = Path(path)
    data = read_json_any(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of tasks, got {type(data).__name__}")
    out: dict[tuple[str, str, int | None], dict[str, Any]] = {}
    for i, task in enumerate(data):
        d = task.get("data") if isinstance(task, dict) else None
        if not isinstance(d, dict) or "record_id" not in d or d.get("kind") not in KINDS:
            raise DataError(f"{path}: task {i} is not an annotation-tasks task (data.record_id, data.kind)")
        out[(str(d["record_id"]), d["kind"], d.get("turn"))] = d
    return out


# ----------------------------------------------------------------------------- reading


def read_labelstudio(
    path: str | Path,
    rejects: Rejects,
    image_root: str | Path | None = None,
    rating_max: int = 5,
    tasks: dict[tuple[str, str, int | None], dict[str, Any]] | None = None,
    stats: ExportStats | None = None,
) -> tuple[list[Group], int]:
    """A Label Studio export -> one group per annotated task. Returns (groups, tasks read)."""
    path = Path(path)
    data = _list_of(path)
    stats = stats if stats is not None else ExportStats()
    record_ids = {key[0] for key in tasks} if tasks is not None else None
    groups: list[Group] = []
    seen: dict[str, int] = {}
    for i, task in enumerate(data):
        try:
            g = _task_group(task, image_root, rating_max, tasks, record_ids, stats)
            if g is None:
                continue
            if g.group in seen:
                raise DataError(f"duplicate group '{g.group}' (first at task {seen[g.group]})")
        except DataError as exc:
            rejects.add(i, _rid(task), str(exc), task)
            continue
        seen[g.group] = i
        groups.append(g)
    return groups, len(data)


def _task_group(task: Any, image_root: str | Path | None, rating_max: int,
                tasks: dict[tuple[str, str, int | None], dict[str, Any]] | None,
                record_ids: set[str] | None, stats: ExportStats) -> Group | None:
    if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
        raise DataError("expected a task object with a 'data' object")
    anns = task.get("annotations", [])
    if not isinstance(anns, list) or not all(isinstance(a, dict) for a in anns):
        raise DataError("'annotations' must be a list of objects")
    done = [a for a in anns if not a.get("was_cancelled")]
    if not done:
        if anns:
            stats.skipped += 1
        else:
            stats.unannotated += 1
        stats.cancelled += len(anns)
        return None
    d = task["data"]
    if "record_id" in d:
        group, kind, image, prompt, cands = _own_task(d, image_root, tasks, record_ids)
    else:
        group, kind, image, prompt, cands = _old_task(d, image_root)
    ratings = []
    for a, ann in enumerate(anns):
        if ann.get("was_cancelled"):
            continue
        result = ann.get("result")
        if not isinstance(result, list):
            raise DataError(f"annotation {a}: 'result' must be a list")
        scores = _annotation_scores(result, len(cands), rating_max, a)
        missing = [k for k in range(len(cands)) if k not in scores]
        if missing:
            who = f" (completed_by {_short(ann.get('completed_by'))})" if "completed_by" in ann else ""
            raise DataError(f"annotation {a}{who} has no rating for candidate_{missing[0]}"
                            + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        ratings.append([scores[k] for k in range(len(cands))])
    stats.annotations += len(done)
    stats.cancelled += len(anns) - len(done)
    stats.multi_annotated += len(done) > 1
    for ann in done:
        who = ann.get("completed_by")
        if isinstance(who, dict):
            who = who.get("id", who.get("email"))
        if who is not None:
            stats.annotators.add(str(who))
    mean = [sum(r[k] for r in ratings) / len(ratings) for k in range(len(cands))]
    return Group(group, image, kind, prompt, cands, mean, ratings)


def _own_task(d: dict[str, Any], image_root: str | Path | None,
              tasks: dict[tuple[str, str, int | None], dict[str, Any]] | None,
              record_ids: set[str] | None) -> tuple[str, str, str, str, list[str]]:
    rid = d.get("record_id")
    if rid is None or rid == "" or isinstance(rid, (bool, list, dict)):
        raise DataError("data.record_id is missing")
    rid = str(rid)
    kind = d.get("kind")
    if kind not in KINDS:
        raise DataError(f"data.kind must be 'question' or 'answer', got {_short(kind)}")
    turn = d.get("turn")
    if kind == "answer" and (isinstance(turn, bool) or not isinstance(turn, int) or turn < 0):
        raise DataError(f"data.turn must be a turn index for an answer task, got {_short(turn)}")
    if kind == "question" and turn is not None:
        raise DataError(f"data.turn must be null for a question task, got {_short(turn)}")
    n = d.get("n_candidates")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f"data.n_candidates must be a positive count, got {_short(n)}")
    raw = []
    for k in range(n):
        if f"candidate_{k}" not in d:
            raise DataError(f"data.candidate_{k} is missing (n_candidates is {n})")
        raw.append(d[f"candidate_{k}"])
    cands = [(_question_set if kind == "question" else _text)(c, f"data.candidate_{k}") for k, c in enumerate(raw)]
    prompt = _text(d.get("prompt"), "data.prompt") if kind == "answer" else ""
    image_path = d.get("image_path")
    if tasks is not None:
        if rid not in (record_ids or set()):
            raise DataError(f"unknown record id '{rid}' (not in the tasks file)")
        ref = tasks.get((rid, kind, turn))
        if ref is None:
            raise DataError(f"record '{rid}' has no {kind} task" + (f" for turn {turn}" if kind == "answer" else "")
                            + " in the tasks file")
        if image_path is not None and image_path != ref.get("image_path"):
            raise DataError(f"data.image_path '{image_path}' is not the tasks file's '{ref.get('image_path')}'")
        image_path = ref.get("image_path")
        if ref.get("n_candidates") != n:
            raise DataError(f"{n} candidates, the tasks file has {ref.get('n_candidates')}")
        for k in range(n):
            if ref.get(f"candidate_{k}") != raw[k]:
                raise DataError(f"data.candidate_{k} differs from the tasks file's")
    image = _image(image_path, image_root) if image_path is not None else image_from_url(d.get("image"), image_root)
    group = rid if kind == "question" else f"{rid}#{turn}"
    return group, kind, image, prompt, cands


def _old_task(d: dict[str, Any], image_root: str | Path | None) -> tuple[str, str, str, str, list[str]]:
    group = d.get("group")
    if group is None or group == "" or isinstance(group, (bool, list, dict)):
        raise DataError("data.record_id (or data.group) is missing")
    kind = d.get("kind")
    if kind not in KINDS:
        raise DataError(f"data.kind must be 'question' or 'answer', got {_short(kind)}")
    image = image_from_url(d.get("image"), image_root)
    cands_raw = d.get("candidates")
    if not isinstance(cands_raw, list) or not cands_raw:
        raise DataError("data.candidates must be a non-empty list")
    if kind == "question":
        return str(group), kind, image, "", [_question_set(c, f"candidate {k}") for k, c in enumerate(cands_raw)]
    cands = [_text(c, f"candidate {k}") for k, c in enumerate(cands_raw)]
    return str(group), kind, image, _text(d.get("prompt"), "data.prompt"), cands


def _candidate_index(name: Any, n: int, where: str) -> int:
    if isinstance(name, str) and name.startswith("candidate_") and name[10:].isdigit():
        k = int(name[10:])
        if k < n:
            return k
    raise DataError(f"{where}: '{name}' is not one of candidate_0..candidate_{n - 1}")


def _annotation_scores(result: list[Any], n: int, rating_max: int, a: int) -> dict[int, float]:
    """Scores in [0, 1] by candidate index from one annotation's results."""
    out: dict[int, float] = {}
    for r, item in enumerate(result):
        where = f"annotation {a} result {r}"
        if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
            raise DataError(f"{where}: expected an object with a 'value' object")
        kind, value = item.get("type"), item["value"]
        if kind in ("rating", "number"):
            k = _candidate_index(item.get("to_name"), n, where)
            raw = value.get(kind)
            if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
                raise DataError(f"{where}: {kind} {raw!r} is not a number")
            if not 1 <= raw <= rating_max:
                raise DataError(f"{where}: {kind} {raw!r} is outside 1..{rating_max}")
            out[k] = (float(raw) - 1.0) / (rating_max - 1)
        elif kind == "ranker":
            out.update(_ranker_scores(value.get("ranker"), n, where))
        else:
            continue  # other controls (comments, choices) carry no score
    return out


def _ranker_scores(ranker: Any, n: int, where: str) -> dict[int, float]:
    """One ordered list (best first) or several buckets (tiers, best first) -> scores."""
    if isinstance(ranker, list):
        tiers = [[c] for c in ranker]
    elif isinstance(ranker, dict):
        lists = [v for key, v in ranker.items() if key != "_"]
        if not lists or not all(isinstance(v, list) for v in lists):
            raise DataError(f"{where}: ranker value must map names to lists of candidate ids")
        tiers = [[c] for c in lists[0]] if len(lists) == 1 else [list(v) for v in lists]
    else:
        raise DataError(f"{where}: ranker value must be a list or an object")
    tiers = [t for t in tiers if t]
    out: dict[int, float] = {}
    for t, tier in enumerate(tiers):
        for name in tier:
            k = _candidate_index(name, n, where)
            if k in out:
                raise DataError(f"{where}: candidate_{k} is ranked twice")
            out[k] = 1.0 - t / (len(tiers) - 1) if len(tiers) > 1 else 1.0
    return out


__all__ = ["ExportStats", "image_from_url", "read_labelstudio", "read_tasks_file"]
