"""The demo world: an instruction pool, simulated annotations and a benchmark from easy-vqa.

easy-vqa (MIT, on PyPI) ships 64x64 images of one shape (circle, rectangle, triangle) in one of
8 colours on a light background, with QA pairs, split into train (4,000 images) and test (1,000).
`synthesize()` turns it into what the Align²LLaVA pipeline consumes:

- `pool.json`: LLaVA records with an extra `"task"` (`conversation`: 2-3 turns; `detail`;
  `complex_reasoning`; `vqa`: 3-5 short-answer turns, as in LLaVA-1.5's mix, each question
  ending "Answer the question using a single word or phrase."), one train image each, ids
  `evqa-<image:06d>-<task>`, `pool_per_task` of each task (`pool_sizes` sets a task's own
  count). They are written as a text-only generator writes from a caption (verbose, "Certainly!
  In the image, ..."; one word for `vqa`), with defects at the rates of
  `SynthesizeParams.defect_rates` (`vqa`: each answer wrong with `vqa_wrong_rate`). `vqa`
  records ask the writer's own questions, or with `vqa_wording: easy_vqa` easy-vqa's own
  questions about their image (the benchmark's wording), still answered by the writer.
- `oracle.jsonl`: which defects each record carries (for diagnosis; no curation stage reads it).
- `annotations/`: candidate question sets and answers for a share of the pool's records, scored
  by a *simulated* annotator (`judge_question`, `judge_answer`) that reads the text and checks it
  against the ground truth with the paper's rubric (docs/method.md), plus noise; scores on a 0.25 grid.
- `benchmark/`: easy-vqa's test QA (shape / color / yes_no) and POPE-style presence probes.
- `captions.jsonl`: true short captions of train images (LLaVA stage-1 data).
- `instruct.json`: correct one-turn conversations on other train images (`instruct_images` x
  `instruct_per_image`), the instruction tuning of the reward models' base (`instruct` stage).
- `vqa_mix.json`: the fixed, correct part of the fine-tuning mix (`vqa_mix` records, none by
  default), as LLaVA-1.5 tunes on academic VQA next to LLaVA-Instruct: short-answer records on
  train images no pool record uses, three questions each in a shuffled order, each ending in the
  short-answer instruction. `vqa_mix_kind` easy_vqa: easy-vqa's own QA (its wording and
  answers), one shape, one colour and one yes/no question; layout: where the shape is, how large
  and whether it is on a given side (answers from the pixels), so the form the benchmark asks in
  without any of its facts. `finetune.mix` adds it to every fine-tune whatever the selection; no
  stage curates it.

Defect types (the names used in `oracle.jsonl`):

- `hallucinated_color`: an answer names a colour the shape does not have: the writer's guess,
  drawn from its prior (red and blue most often, `writer.COLOR_PRIOR`), not uniformly, so data
  with these defects teaches a bias, as language priors do in machine-written data.
- `hallucinated_shape`: an answer names a shape that is not there (a guess from `SHAPE_PRIOR`).
- `wrong_yes_no`: a yes/no answer is wrong (not in detail records); on presence questions it is a
  "yes" to a shape or colour that is absent (the yes-bias of generated data).
- `omitted_key_fact`: an answer talks around the question without the fact it asks for.
- `generic_question`: a turn is a generic question with a vague, content-free answer.
- `unanswerable_question`: a turn asks about something absent (a dog, people, a shape that is
  not there) and its answer confidently makes it up.

Each rate is the share of records of a task that carry that defect (over the tasks that can carry
it, `params.CAN_CARRY`; vqa records carry only the first three). Single-turn records carry at most one defect; conversations draw each
type independently, one per turn. Ground truth (shape, colour) comes from the pixels (exact
easy-vqa palette, fill ratio of the bounding box) and is cross-checked against easy-vqa's own QA.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align2llava.data.io import write_jsonl, write_records
from align2llava.data.records import SHORT_ANSWER
from align2llava.demo.synthesis.annotator import build_annotations
from align2llava.demo.synthesis.instruct_data import instruct_record
from align2llava.demo.synthesis.params import CAN_CARRY, DEFECTS, TASKS
from align2llava.demo.synthesis.world import COLORS, SHAPES, _words, easy_vqa_dir, load_truths, qa_facts, read_split
from align2llava.demo.synthesis.writer import _a, caption, make_item, oracle_row
from align2llava.errors import DataError
from align2llava.steps.annotations.tasks import labeling_config

if TYPE_CHECKING:
    from align2llava.demo.synthesis.params import SynthesizeParams
    from align2llava.demo.synthesis.world import Truth
    from align2llava.demo.synthesis.writer import Item, Wording


# ---------------------------------------------------------------------------- easy-vqa's QA
def _qa_type(answer: str) -> str:
    return "shape" if answer in SHAPES else "color" if answer in COLORS else "yes_no"


def easy_vqa_wording(qa: list[tuple[str, str, int]]) -> dict[int, Wording]:
    """easy-vqa's own questions per image and kind, as the pool's vqa records ask them
    (`vqa_wording: easy_vqa`): capitalised, negated yes/no questions left out (as the benchmark
    leaves them out), each yes/no with the shape or colour it asks about."""
    out: dict[int, Wording] = {}
    for q, a, i in sorted(qa, key=lambda x: (x[2], x[0], x[1])):
        typ, words = _qa_type(a), _words(q)
        if typ == "yes_no" and {"not", "no"} & set(words):
            continue
        probe = next((w for w in words if w in SHAPES or w in COLORS), "") if typ == "yes_no" else ""
        out.setdefault(i, {}).setdefault(typ, []).append((q[0].upper() + q[1:], probe))
    return out


# ------------------------------------------------------------------- benchmark and captions
def build_benchmark(qa: list[tuple[str, str, int]], images: dict[int, Path], p: SynthesizeParams,
                    seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """easy-vqa test QA per type (negated yes/no questions left out) and balanced POPE probes.

    Also returns how many probed images' pixel truth disagreed with easy-vqa's QA.
    """
    rng = random.Random(f"{seed}:benchmark")
    order = sorted(qa, key=lambda x: (x[2], x[0]))
    rng.shuffle(order)
    picked: dict[str, list[tuple[str, str, int]]] = {"shape": [], "color": [], "yes_no": []}
    seen: dict[str, set[int]] = {k: set() for k in picked}
    for q, a, i in order:
        typ = _qa_type(a)
        if typ == "yes_no" and {"not", "no"} & set(_words(q)):
            continue
        want = p.benchmark_vqa_per_type
        if typ == "yes_no":  # balanced: half yes, half no
            want = (want + (a == "yes")) // 2
            if sum(x[1] == a for x in picked[typ]) >= want:
                continue
        elif len(picked[typ]) >= want:
            continue
        if i in seen[typ] or i not in images:
            continue
        seen[typ].add(i)
        picked[typ].append((q, a, i))
    vqa = []
    for typ in ("shape", "color", "yes_no"):
        for q, a, i in sorted(picked[typ], key=lambda x: (x[2], x[0])):
            vqa.append({"id": f"vqa-{typ}-{i:04d}", "image": f"test/{i}.png", "question": q[0].upper() + q[1:],
                        "answer": a, "type": typ})
    pope = []
    ids = sorted(images)
    rng.shuffle(ids)
    ids = sorted(ids[: min(p.benchmark_pope, len(ids))])
    truths, mism = load_truths("test", ids, qa_facts(qa), images)
    for k in range(p.benchmark_pope):
        t = truths[ids[k % len(ids)]]
        yes, on_shape = k % 2 == 0, (k // 2) % 2 == 0
        if on_shape:
            x = t.shape if yes else rng.choice([s for s in SHAPES if s != t.shape])
            q = f"Is there {_a(x)} in the image?"
        else:
            x = t.color if yes else rng.choice([c for c in COLORS if c != t.color])
            q = f"Is there {_a(x)} shape in the image?"
        pope.append({"id": f"pope-{k:04d}", "image": t.image, "question": q, "answer": "yes" if yes else "no",
                     "type": "pope"})
    return vqa, pope, mism


MIX_QUESTIONS = {
    "position": ("Where is the shape in the image?", "Where is the object located?", "In which part of the image is the object?"),
    "size": ("How large is the shape?", "Is the object small, medium or large?", "What size is the shape relative to the image?"),
    "side": ("Is the shape on the {side} side of the image?", "Is the object in the {side} part of the image?"),
}
SIDES = ("left", "right", "upper", "lower")


def easy_vqa_mix(qa: list[tuple[str, str, int]], exclude: set[int], n: int, seed: int) -> list[dict[str, Any]]:
    """`n` short-answer records from easy-vqa's own QA (its wording and answers) of images outside
    `exclude`: one shape, one colour and one yes/no question each, in a shuffled order."""
    by_image: dict[int, dict[str, list[tuple[str, str]]]] = {}
    for q, a, i in sorted(qa, key=lambda x: (x[2], x[0], x[1])):
        if i not in exclude:
            typ = _qa_type(a)
            by_image.setdefault(i, {}).setdefault(typ, []).append((q, a))
    ids = [i for i in sorted(by_image) if len(by_image[i]) == 3]
    if n > len(ids):
        raise DataError(f"synthesize.vqa_mix: {n:,} records asked, {len(ids):,} train images outside the pool have "
                        "a shape, a colour and a yes/no question")
    rng = random.Random(f"{seed}:vqa_mix")
    rng.shuffle(ids)
    out = []
    for i in sorted(ids[:n]):
        types = ["shape", "color", "yes_no"]
        rng.shuffle(types)
        qa_pairs = []
        for typ in types:
            q, a = rng.choice(by_image[i][typ])
            qa_pairs.append((q[0].upper() + q[1:], a.capitalize()))
        out.append(_short_answer_record(i, f"train/{i}.png", qa_pairs))
    return out


def layout_mix(truths: dict[int, Truth], seed: int) -> list[dict[str, Any]]:
    """A short-answer record per image of `truths` about where its shape is and how large (see the
    module doc): the short-answer form without the facts the benchmark asks."""
    rng = random.Random(f"{seed}:vqa_mix")
    out = []
    for i in sorted(truths):
        t = truths[i]
        kinds = list(MIX_QUESTIONS)
        rng.shuffle(kinds)
        qa_pairs = []
        for kind in kinds:
            q = rng.choice(MIX_QUESTIONS[kind])
            if kind == "side":  # half the time a side the shape is on, else one it is not on
                on = [x for x in SIDES if x in t.position.split()]
                side = rng.choice(on if on and rng.random() < 0.5 else [x for x in SIDES if x not in on])
                q, a = q.format(side=side), "Yes" if side in on else "No"
            else:
                a = (t.position if kind == "position" else t.size).capitalize()
            qa_pairs.append((q, a))
        out.append(_short_answer_record(i, t.image, qa_pairs))
    return out


def _image_id(image: str) -> int:
    return int(image.removesuffix(".png").split("/")[1])


def instruct_set(train_ids: list[int], exclude: set[int], qa: list[tuple[str, str, int]],
                 images: dict[int, Path], p: SynthesizeParams, seed: int) -> list[dict[str, Any]]:
    """instruct.json: `instruct_per_image` records on each of `instruct_images` train images
    outside `exclude` (the pool's and the mix's), sampled."""
    free = sorted(set(train_ids) - exclude)
    if p.instruct_images > len(free):
        raise DataError(f"synthesize.instruct_images: {p.instruct_images:,} asked, {len(free):,} train images lie "
                        "outside the pool and the mix (easy-vqa has 4,000)")
    ids = sorted(random.Random(f"{seed}:instruct:images").sample(free, p.instruct_images))
    truths = load_truths("train", ids, qa_facts(qa), images)[0]
    return [instruct_record(truths[i], seed, n) for i in ids for n in range(p.instruct_per_image)]


def _short_answer_record(image_id: int, image: str, qa_pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """A mix record: each question followed by the short-answer instruction, `<image>` first."""
    turns = []
    for k, (q, a) in enumerate(qa_pairs):
        text = f"{q}\n{SHORT_ANSWER}"
        turns += [{"from": "human", "value": "<image>\n" + text if k == 0 else text}, {"from": "gpt", "value": a}]
    return {"id": f"mix-{image_id:06d}", "image": image, "conversations": turns}


# ------------------------------------------------------------------------------- the stage
def _write_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def measured_rates(items: list[Item]) -> dict[str, Any]:
    """Share of records carrying each defect, overall (over applicable tasks) and per task."""
    by_task: dict[str, list[Item]] = {task: [i for i in items if i.record["task"] == task] for task in TASKS}
    out: dict[str, Any] = {"overall": {}, "by_task": {}, "clean_fraction": {}}
    for d in DEFECTS:
        pool = [i for i in items if d in CAN_CARRY[i.record["task"]]]
        has = sum(any(d in ds for ds in i.turn_defects.values()) for i in pool)
        out["overall"][d] = round(has / max(1, len(pool)), 4)
    for task, its in by_task.items():
        out["by_task"][task] = {d: round(sum(any(d in ds for ds in i.turn_defects.values()) for i in its)
                                         / max(1, len(its)), 4) for d in DEFECTS}
        out["clean_fraction"][task] = round(sum(not i.turn_defects for i in its) / max(1, len(its)), 4)
    out["clean_fraction"]["all"] = round(sum(not i.turn_defects for i in items) / max(1, len(items)), 4)
    return out


def synthesize(p: SynthesizeParams, seed: int, out_dir: str | Path,
               source: str | Path | None = None, image_root: str = "data/synthesize/images") -> dict[str, Any]:
    """Write the demo world to `out_dir` (see the module doc); returns metrics.

    `image_root`: base.image_root, the image folder as the Label Studio tasks name it.
    """
    start = time.time()
    out, source = Path(out_dir), Path(source) if source else easy_vqa_dir()
    train_images, train_qa = read_split(source, "train")
    test_images, test_qa = read_split(source, "test")
    sizes = p.task_sizes()
    n_pool = sum(sizes.values())
    if n_pool > len(train_images):
        raise DataError(f"synthesize.pool_per_task / pool_sizes: {n_pool:,} pool images needed, "
                        f"{len(train_images):,} available")
    train_ids = sorted(train_images)
    pool_ids = list(train_ids)
    random.Random(f"{seed}:pool").shuffle(pool_ids)
    pool_ids = pool_ids[:n_pool]
    cap_ids = train_ids[: p.captions]
    truths, mism = load_truths("train", sorted(set(pool_ids) | set(cap_ids)), qa_facts(train_qa),
                               train_images)
    items = []
    start_at = 0
    wording = easy_vqa_wording(train_qa) if p.vqa_wording == "easy_vqa" else None
    for task in TASKS:
        block = sorted(pool_ids[start_at: start_at + sizes[task]])
        start_at += sizes[task]
        items += [make_item(task, truths[i], seed, p.defect_rates, p.vqa_wrong_rate, p.guesses,
                            None if wording is None else wording.get(i, {}), p.vqa_turns) for i in block]
    rng = random.Random(f"{seed}:annotated")
    annotated = []
    for task in TASKS:
        its = [i for i in items if i.record["task"] == task]
        annotated += sorted(rng.sample(its, round(p.annotate_fraction * len(its))), key=lambda i: i.record["id"])
    ann = build_annotations(annotated, p, seed, image_root)
    vqa, pope, mism_test = build_benchmark(test_qa, test_images, p, seed)
    if p.vqa_mix_kind == "easy_vqa":
        mix = easy_vqa_mix(train_qa, set(pool_ids), p.vqa_mix, seed)
    else:
        outside = sorted(set(train_ids) - set(pool_ids))
        if p.vqa_mix > len(outside):
            raise DataError(f"synthesize.vqa_mix: {p.vqa_mix:,} records asked, {len(outside):,} train images lie "
                            "outside the pool")
        mix_ids = sorted(random.Random(f"{seed}:vqa_mix:images").sample(outside, p.vqa_mix))
        mix = layout_mix(load_truths("train", mix_ids, qa_facts(train_qa), train_images)[0], seed)
    inst = instruct_set(train_ids, set(pool_ids) | {_image_id(r["image"]) for r in mix}, train_qa, train_images, p, seed)
    caps = [{"id": f"cap-{i:06d}", "image": truths[i].image,
             "caption": caption(truths[i], random.Random(f"{seed}:caption:{i}"))} for i in cap_ids]

    if out.exists():
        for name in ("images", "annotations", "benchmark"):
            shutil.rmtree(out / name, ignore_errors=True)
    used = sorted({(t.split, t.image_id) for t in truths.values()}
                  | {(r["image"].split("/")[0], _image_id(r["image"])) for r in vqa + pope + mix + inst})
    from tqdm import tqdm

    for split, i in tqdm(used, desc="copy images", unit="img", disable=None, leave=False):
        dst = out / "images" / split / f"{int(i)}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile((train_images if split == "train" else test_images)[int(i)], dst)
    write_records([i.record for i in items], out / "pool.json", "json")
    write_jsonl([oracle_row(i) for i in items], out / "oracle.jsonl")
    write_jsonl(caps, out / "captions.jsonl")
    write_records(mix, out / "vqa_mix.json", "json")
    write_records(inst, out / "instruct.json", "json")
    _write_json(ann.question, out / "annotations" / "question.json")
    _write_json(ann.answer, out / "annotations" / "answer.json")
    _write_json(ann.tasks, out / "annotations" / "tasks.json")
    sizes = [t["data"]["n_candidates"] for t in ann.tasks] or [1]
    (out / "annotations" / "labeling_config.xml").write_text(labeling_config(max(sizes), 5, min(sizes)),
                                                              encoding="utf-8")
    _write_json(ann.labelstudio, out / "annotations" / "labelstudio.json")
    (out / "annotations" / "README.md").write_text(ANNOTATIONS_README, encoding="utf-8")
    write_jsonl(vqa, out / "benchmark" / "vqa.jsonl")
    write_jsonl(pope, out / "benchmark" / "pope.jsonl")

    rates = measured_rates(items)
    return {
        "pool": {"total": len(items), **{t: sum(i.record["task"] == t for i in items) for t in TASKS},
                 "turns": sum(len(i.turns) for i in items)},
        "defect_rate": rates["overall"],
        "defect_rate_by_task": rates["by_task"],
        "clean_fraction": rates["clean_fraction"],
        "annotations": {"records": len(annotated), "annotators": p.annotators, "groups": ann.groups, "candidates": ann.candidates,
                        "strict_pairs": ann.pairs, "tied_pairs": ann.ties,
                        "tie_rate": round(ann.ties / max(1, ann.pairs + ann.ties), 4)},
        "benchmark": {**{t: sum(r["type"] == t for r in vqa) for t in ("shape", "color", "yes_no")},
                      "pope": len(pope), "pope_yes_fraction": round(sum(r["answer"] == "yes" for r in pope)
                                                                    / max(1, len(pope)), 4)},
        "captions": len(caps),
        "vqa_mix": len(mix),
        "instruct": {"records": len(inst), "images": len({r["image"] for r in inst})},
        "images": len(used),
        # images whose pixel-measured shape/colour disagreed with easy-vqa's QA (the QA wins)
        "truth_pixel_qa_disagreements": mism + mism_test,
        "seconds": round(time.time() - start, 2),
    }


ANNOTATIONS_README = """\
# Demo annotations: simulated, not human

These files stand in for the paper's human seed set on the demo world (easy-vqa images). A
scripted annotator (align2llava/demo/synthesis/annotator.py: judge_question, judge_answer, annotate) reads each
candidate and checks it against the image's ground truth (shape and colour from the pixels):

- questions: grounded and answerable (0 for absent things or a wrong presupposed shape), specific
  (0.25 for generic ones), needing reasoning or a description (1.0, else 0.75); a question set
  scores the mean, a repeated question counts as generic;
- answers: 0 for a wrong colour, shape or yes/no, or an absent object described as present;
  0.5 when the key fact is missing; 1.0 when right and complete, 0.75 when right but terse.

Then, with probability `synthesize.annotator_noise`, the score slips one 0.25 step up or down
(annotator noise), and scores are kept on the 0.25 grid, so ties are common.

- question.json: [{"id", "image", "questions": [[q, ...], ...], "score": [...]}], candidate 0 is
  the pool's original (it carries "<image>").
- answer.json: LLaVA records whose gpt turns hold candidate lists with a parallel "score" list;
  candidate 0 is the pool's original answer.
- tasks.json: the same candidates as Label Studio tasks, exactly as `annotation-tasks` writes
  them for a user's pool (one task per group: every question group, then every answer group),
  and labeling_config.xml, the labeling interface for them.
- labelstudio.json: those tasks annotated, as Label Studio exports them (task and annotation
  ids, timestamps, result ids with origin, completed_by, predictions); one annotation per
  simulated annotator (`synthesize.annotators`), ratings 1..5 = 1 + round(score * 4). With
  several annotators, question.json and answer.json hold the mean score.
"""
