"""Stage A's seed annotation, our side of it: candidates to rate, as Label Studio tasks and a table.

For a seeded sample of pool records, stratified by task type, `make_annotation_tasks`
(candidates.py) has an MLLM write extra candidates: question sets for the instruction and
answers for each of its questions; candidate 0 is always the original. This module writes them
(and the demo's simulated candidates, synthesize) to the output folder:

- `tasks.json`: Label Studio tasks, one per group of competing candidates: first the question
  group of every sampled record (pool order), then every answer group (pool order, turn order).
  `data` holds `record_id`, `task_type`, `kind` ("question" | "answer"), `turn` (answer groups:
  the QA pair index; null for questions), `image` (the URL Label Studio shows, from
  `image_url`), `image_path` (the path under base.image_root), `heading`, `prompt` (answer
  groups: the question), `n_candidates` and `candidate_0` .. `candidate_<n-1>` (a question set
  is its questions, one per line).
- `labeling_config.xml`: the labeling interface: the image, the rubric, and one Rating
  (`rating_<k>` on `candidate_<k>`, 1..rating_max stars) per candidate.
- `candidates.csv` / `candidates.jsonl`: the same candidates, one row per candidate with an
  empty `score` column in [0, 1] (`annotate_import.format: table` reads them back filled in).
- `rejects.jsonl`: pool records left out (invalid, image missing, no usable generation).

The importer (align2llava/steps/annotations/labelstudio.py) maps an export back through
`record_id`, `kind`, `turn` and `image_path`: groups are `<record id>` (questions) and
`<record id>#<turn>` (answers), as in the paper's released files.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

from pydantic import Field, field_validator

from align2llava.config import Section
from align2llava.data.records import strip_image_token

LOCAL_FILES = "/data/local-files/?d={path}"
# The paper's criteria (docs/method.md, Stage A): objective, then subjective.
RUBRIC_OBJECTIVE = (
    ("grounded", "about what the image shows, not about things that are absent"),
    ("answerable", "can be answered from the image alone"),
    ("correct", "every fact about the image is right (colours, shapes, objects, counts, yes/no)"),
    ("complete", "covers the key details the question asks for"),
)
RUBRIC_SUBJECTIVE = (
    ("useful", "worth asking and worth reading"),
    ("needs reasoning", "asks for or gives more than a glance (a description, an explanation)"),
    ("clear", "well written, unambiguous"),
)
HEADINGS = {
    "question": "Rate each candidate question set (all questions of the instruction, one per line).",
    "answer": "Rate each candidate answer to the question below.",
}
DEFAULT_QUESTION_PROMPT = (
    "Here is a question about this image: {question}\n"
    "Write one different question about the image in the same style. Reply with the question only."
)
DEFAULT_ANSWER_PROMPT = "{question}"


class AnnotationTasksParams(Section):
    """The `annotation_tasks:` section of params.yaml."""

    # The MLLM that writes the candidates (HF layout); null: base.base_model.
    model: str | None = None
    # Pool records to sample, spread over task types in proportion to their size (largest
    # remainder), seeded by base.seed. More than the pool holds: all of it.
    records: int = Field(3, ge=1)  # your pool: hundreds
    # Extra candidates per group; candidate 0, the original, comes on top.
    question_candidates: int = Field(1, ge=1)  # your pool: 3
    answer_candidates: int = Field(1, ge=1)  # your pool: 3
    # Sampling (temperature 0 would write the same candidate every time).
    temperature: float = Field(0.8, gt=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_new_tokens: int = Field(32, ge=1)  # per answer (7B on a GPU: 256)
    question_max_new_tokens: int = Field(24, ge=1)  # per question (7B: 48)
    # Prompts. A question set is rewritten turn by turn ({question}: the original turn); an
    # answer is written for {question} after the conversation's earlier original turns.
    question_prompt: str = DEFAULT_QUESTION_PROMPT
    answer_prompt: str = DEFAULT_ANSWER_PROMPT
    # An empty generation is sampled again, at most this many times in all.
    max_tries: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Label Studio: ratings 1..rating_max (mapped to [0, 1] on import) and the URL of each
    # image: {path} is base.image_root/<image>, {image} the path under the image root. The
    # default serves the image root through local-files storage (docs/annotation.md).
    rating_max: int = Field(5, ge=2)
    image_url: str = LOCAL_FILES
    # Invalid pool records and records without usable candidates allowed: a fraction of the
    # pool (< 1) or a count (>= 1).
    reject_budget: float = Field(0.01, ge=0.0)

    @field_validator("question_prompt", "answer_prompt")
    @classmethod
    def _one_placeholder(cls, v: str) -> str:
        try:
            v.format(question="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"a prompt may hold only the placeholder {{question}} ({{{{ and }}}} for braces): {exc!r}")
        return v

    @field_validator("image_url")
    @classmethod
    def _url_placeholders(cls, v: str) -> str:
        try:
            v.format(path="", image="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"image_url may hold only the placeholders {{path}} and {{image}}: {exc!r}")
        return v


@dataclass
class RecordCandidates:
    """One sampled record's candidates; index 0 is the original everywhere."""

    record_id: str
    task_type: str | None
    image: str
    question_sets: list[list[str]]  # each: the human turns, image token removed
    answers: list[tuple[str, list[str]]]  # per turn: (question, candidate answers)


# ----------------------------------------------------------------------------- Label Studio


def image_url(template: str, image_root: str | Path, image: str) -> str:
    """The URL Label Studio shows for `image` (a path under the image root), from `template`
    with {path} (image root / image, no leading slash) and {image}, both URL-quoted."""
    root = PurePosixPath(str(image_root).replace("\\", "/")).as_posix()
    path = image if root in ("", ".") else f"{root.rstrip('/')}/{image}"
    # local-files paths are relative to LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT ("/" for an
    # absolute image root)
    return template.format(path=quote(path.lstrip("/"), safe="/"), image=quote(image, safe="/"))


def group_name(record_id: str, kind: str, turn: int | None) -> str:
    """The pair-file group of a task: as the paper's released files name them."""
    return record_id if kind == "question" else f"{record_id}#{turn}"


def task_groups(items: list[RecordCandidates]) -> list[dict[str, Any]]:
    """Groups in task order: every question group (pool order), then every answer group."""
    out = []
    for it in items:
        out.append({"record": it, "kind": "question", "turn": None, "prompt": "",
                     "candidates": ["\n".join(qs) for qs in it.question_sets]})
    for it in items:
        for k, (question, answers) in enumerate(it.answers):
            out.append({"record": it, "kind": "answer", "turn": k, "prompt": question,
                         "candidates": list(answers)})
    return out


def build_tasks(items: list[RecordCandidates], image_root: str | Path,
                url_template: str = LOCAL_FILES) -> list[dict[str, Any]]:
    """Label Studio tasks (import format: [{"data": {...}}]) for the candidates' groups.

    Label Studio refuses a task that lacks a variable of the labeling config, so groups with
    fewer candidates than the largest carry the spare `candidate_<k>` as "" (n_candidates says
    how many are real; the config leaves those ratings optional).
    """
    groups = task_groups(items)
    slots = max((len(g["candidates"]) for g in groups), default=0)
    tasks = []
    for g in groups:
        it: RecordCandidates = g["record"]
        data: dict[str, Any] = {
            "record_id": it.record_id, "task_type": it.task_type, "kind": g["kind"], "turn": g["turn"],
            "image": image_url(url_template, image_root, it.image), "image_path": it.image,
            "heading": HEADINGS[g["kind"]], "prompt": g["prompt"], "n_candidates": len(g["candidates"]),
        }
        for k in range(slots):
            data[f"candidate_{k}"] = g["candidates"][k] if k < len(g["candidates"]) else ""
        tasks.append({"data": data})
    return tasks


def rubric_lines(rating_max: int) -> list[str]:
    obj = "; ".join(f"{name}: {text}" for name, text in RUBRIC_OBJECTIVE)
    sub = "; ".join(f"{name}: {text}" for name, text in RUBRIC_SUBJECTIVE)
    return [
        f"Objective criteria. {obj}.",
        f"Subjective criteria. {sub}.",
        f"Scale: 1 star = fails an objective criterion (not grounded, not answerable, wrong); "
        f"{rating_max} stars = meets every objective criterion and is useful, needs reasoning and "
        f"is clear; in between, the more criteria met, the more stars. Equal candidates may get "
        f"equal stars. Stars map to scores in [0, 1]: (stars - 1) / {rating_max - 1}.",
    ]


def labeling_config(n_slots: int, rating_max: int = 5, n_required: int | None = None) -> str:
    """The Label Studio labeling config (XML) for tasks with up to n_slots candidates.

    Ratings of the first n_required slots (default: all) are required; tasks with fewer
    candidates leave the spare slots empty and unrated.
    """
    n_required = n_slots if n_required is None else n_required
    lines = [
        "<View>",
        "  <Style>.htx-text { white-space: pre-wrap; }</Style>",
        '  <Header value="$heading" size="4"/>',
        '  <Header value="$record_id" size="6"/>',
        '  <Image name="image" value="$image" maxWidth="512px"/>',
        '  <Header value="Rubric" size="5"/>',
    ]
    lines += [f"  <Header value={quoteattr(line)} size=\"6\"/>" for line in rubric_lines(rating_max)]
    lines.append('  <Text name="prompt" value="$prompt" selectionEnabled="false"/>')
    for k in range(n_slots):
        req = "true" if k < n_required else "false"
        lines += [
            f'  <Header value="Candidate {k}" size="5"/>',
            f'  <Text name="candidate_{k}" value="$candidate_{k}" selectionEnabled="false"/>',
            f'  <Rating name="rating_{k}" toName="candidate_{k}" maxRating="{rating_max}" required="{req}"/>',
        ]
    lines.append("</View>")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the table

TABLE_FIELDS = ("group", "record_id", "kind", "turn", "image", "prompt", "candidate_index", "candidate", "score")


def candidate_rows(items: list[RecordCandidates]) -> list[dict[str, Any]]:
    """One row per candidate, in task order, with an empty score to fill in."""
    rows = []
    for g in task_groups(items):
        it: RecordCandidates = g["record"]
        for k, c in enumerate(g["candidates"]):
            rows.append({"group": group_name(it.record_id, g["kind"], g["turn"]), "record_id": it.record_id,
                         "kind": g["kind"], "turn": "" if g["turn"] is None else g["turn"], "image": it.image,
                         "prompt": g["prompt"], "candidate_index": k, "candidate": c, "score": ""})
    return rows


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_tasks(items: list[RecordCandidates], out_dir: str | Path, *, image_root: str | Path,
                url_template: str = LOCAL_FILES, rating_max: int = 5) -> dict[str, int]:
    """tasks.json, labeling_config.xml, candidates.csv and candidates.jsonl into out_dir."""
    out = Path(out_dir)
    tasks = build_tasks(items, image_root, url_template)
    _write_text(out / "tasks.json", json.dumps(tasks, ensure_ascii=False, indent=1) + "\n")
    sizes = [t["data"]["n_candidates"] for t in tasks] or [1]
    _write_text(out / "labeling_config.xml", labeling_config(max(sizes), rating_max, min(sizes)))
    rows = candidate_rows(items)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "candidates.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TABLE_FIELDS)
        w.writeheader()
        w.writerows(rows)
    _write_text(out / "candidates.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"tasks": len(tasks), "tasks_question": sum(t["data"]["kind"] == "question" for t in tasks),
            "tasks_answer": sum(t["data"]["kind"] == "answer" for t in tasks), "candidates": len(rows)}


def original_candidates(rec: dict[str, Any]) -> RecordCandidates:
    """A record's own question set and answers, as candidate 0 of each group."""
    convs = rec["conversations"]
    questions = [strip_image_token(convs[i]["value"]) for i in range(0, len(convs), 2)]
    answers = [(q, [convs[2 * k + 1]["value"]]) for k, q in enumerate(questions)]
    task = rec.get("task")
    return RecordCandidates(str(rec["id"]), str(task) if task is not None else None, rec["image"],
                            [questions], answers)


__all__ = [
    "AnnotationTasksParams",
    "RecordCandidates",
    "build_tasks",
    "candidate_rows",
    "group_name",
    "labeling_config",
    "original_candidates",
    "write_tasks",
]
