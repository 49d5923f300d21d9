"""The simulated human annotator: the rubric applied to the ground truth, with noise.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from align2llava.data.records import strip_image_token
from align2llava.demo.synthesis.params import STEP
from align2llava.demo.synthesis.world import COLORS, SHAPES, _words
from align2llava.demo.synthesis.writer import ENTITIES, _present, answer_candidates, asserted_words, question_candidates
from align2llava.steps.annotations.tasks import RecordCandidates, build_tasks

if TYPE_CHECKING:
    from align2llava.demo.synthesis.params import SynthesizeParams
    from align2llava.demo.synthesis.world import Truth
    from align2llava.demo.synthesis.writer import Item, Turn

SPECIFIC = {"shape", "shapes", "color", "colour", "object", "sides", "edges", "roll", "paint", "located",
            "where", "large", "small", "size", "describe", "description", "elements", "detailed", "detail",
            "analyze", *SHAPES, *COLORS}
REASONING = {"why", "explain", "could", "would", "if", "reasoning", "based", "describe", "detail",
             "detailed", "analyze", "elaborate"}
EPOCH = datetime(2024, 1, 1, tzinfo=timezone.utc)  # the simulated export's clock (deterministic)


def judge_question(question: str, t: Truth) -> float:
    """Rubric for one question: grounded and answerable, specific, needs reasoning."""
    w = _words(question)
    if any(e in w for e in ENTITIES):
        return 0.0  # asks about something that is not in the image
    if w and w[0] in ("what", "which", "where", "how") and any(s in w and s != t.shape for s in SHAPES):
        return 0.0  # presupposes a shape that is not there
    if not SPECIFIC & set(w):
        return 0.25  # generic: nothing to ground it in the image
    return 1.0 if REASONING & set(w) else 0.75


def judge_questions(questions: list[str], t: Truth) -> float:
    """Mean rubric score of a question set; a repeated question counts as generic."""
    seen, scores = set(), []
    for q in questions:
        key = q.replace("<image>", "").strip().lower()
        scores.append(0.25 if key in seen else judge_question(key, t))
        seen.add(key)
    return sum(scores) / len(scores)


def judge_answer(turn: Turn, ans: str, t: Truth) -> float:
    """Rubric for one answer: factually right about the image, covers the key fact, helpful."""
    said = asserted_words(ans)
    words = set(_words(ans))
    if any(e in said for e in ENTITIES):
        return 0.0  # describes something absent as present
    if any(c in said and c != t.color for c in COLORS) or any(s in said and s != t.shape for s in SHAPES):
        return 0.0  # wrong colour or shape
    yn = next((x for x in _words(ans) if x in ("yes", "no")), None)
    kind = turn.kind
    if kind in ("yes_no", "verify", "roll"):
        truth = (t.shape == "circle") if kind == "roll" else _present(t, turn.probe) if kind == "yes_no" \
            else turn.probe == t.shape
        if yn is not None and (yn == "yes") != truth:
            return 0.0
        key = yn is not None
    elif kind == "unanswerable":
        return 0.75 if t.color in words and t.shape in words else 0.5  # says it is not there
    elif kind == "generic":
        key = t.color in words and t.shape in words
        return 0.75 if key else 0.25
    else:
        need = {"color": [t.color], "shape": [t.shape], "position": [], "size": [t.size],
                "describe": [t.color, t.shape], "sides": [t.shape], "paint": [t.color],
                "analogy": [t.shape]}[kind]
        key = all(n in words for n in need) and (kind != "position" or t.position in ans.lower())
    if not key:
        return 0.5
    if turn.short:  # asked for a single word or phrase: that is the complete answer
        return 1.0 if len(_words(ans)) <= 3 else 0.75
    return 1.0 if len(_words(ans)) >= 8 else 0.75


def annotate(score: float, rng: random.Random, noise: float) -> float:
    """The annotator's recorded score: rubric, then an occasional one-step slip, on the 0.25 grid."""
    if rng.random() < noise:
        score += rng.choice((-STEP, STEP))
    return round(min(1.0, max(0.0, round(score / STEP) * STEP)), 2)


@dataclass
class Annotations:
    question: list[dict[str, Any]]  # the released question-preference format
    answer: list[dict[str, Any]]  # the released answer-preference format
    tasks: list[dict[str, Any]]  # Label Studio tasks, as annotation-tasks writes them
    labelstudio: list[dict[str, Any]]  # the same tasks annotated: an export as Label Studio writes it
    groups: int = 0
    candidates: int = 0
    pairs: int = 0
    ties: int = 0


def _pairs(scores: list[float]) -> tuple[int, int]:
    strict = ties = 0
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            if scores[i] == scores[j]:
                ties += 1
            else:
                strict += 1
    return strict, ties


def _mean(ratings: list[list[float]]) -> list[float]:
    """Per candidate, the mean over annotators (as annotate-import averages them)."""
    return [sum(r[k] for r in ratings) / len(ratings) for k in range(len(ratings[0]))]


def _stamp(minutes: int) -> str:
    return (EPOCH + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _region_id(*key: Any) -> str:
    return hashlib.sha1(":".join(map(str, key)).encode()).hexdigest()[:10]


def export_task(tid: int, data: dict[str, Any], ratings: list[list[float]]) -> dict[str, Any]:
    """One task as a Label Studio JSON export holds it: one annotation per simulated annotator."""
    anns = []
    for j, scores in enumerate(ratings):
        aid = (tid - 1) * len(ratings) + j + 1
        result = [{"id": _region_id(tid, j, k), "type": "rating", "value": {"rating": 1 + round(s * 4)},
                   "origin": "manual", "to_name": f"candidate_{k}", "from_name": f"rating_{k}"}
                  for k, s in enumerate(scores)]
        anns.append({"id": aid, "completed_by": j + 1, "result": result, "was_cancelled": False,
                     "ground_truth": False, "created_at": _stamp(2 * aid), "updated_at": _stamp(2 * aid),
                     "lead_time": round(5.0 + 2.5 * len(scores), 1), "result_count": 0, "task": tid, "project": 1})
    return {"id": tid, "data": data, "annotations": anns, "predictions": [], "created_at": _stamp(0),
            "updated_at": _stamp(2 * tid * len(ratings)), "project": 1}


def build_annotations(items: list[Item], p: SynthesizeParams, seed: int,
                      image_root: str = "data/synthesize/images") -> Annotations:
    """Candidates and simulated judgements in the released format and through Label Studio.

    Annotator 0 draws its noise from the same random stream as the candidates (as before there
    were several); annotator j > 0 rates the same candidates by the same rubric with noise from
    its own stream. The released files hold the mean over annotators.
    """
    out = Annotations([], [], [], [])
    ratings: dict[tuple[str, str, int | None], list[list[float]]] = {}
    cands_by_record = []
    for item in items:
        rid, t = item.record["id"], item.truth
        rng = random.Random(f"{seed}:annotate:{rid}")
        others = [random.Random(f"{seed}:annotate:{j}:{rid}") for j in range(1, p.annotators)]
        qsets = question_candidates(item, rng, p.question_candidates)
        qtrue = [judge_questions(qs, t) for qs in qsets]
        qrat = [[annotate(s, rng, p.annotator_noise) for s in qtrue]]
        qrat += [[annotate(s, o, p.annotator_noise) for s in qtrue] for o in others]
        out.question.append({"id": rid, "image": t.image, "questions": qsets, "score": _mean(qrat)})
        ratings[(rid, "question", None)] = qrat
        convs, turns = [], []
        for k, turn in enumerate(item.turns):
            cands = answer_candidates(turn, t, rng, p.answer_candidates)
            atrue = [judge_answer(turn, a, t) for a in cands]
            arat = [[annotate(s, rng, p.annotator_noise) for s in atrue]]
            arat += [[annotate(s, o, p.annotator_noise) for s in atrue] for o in others]
            human = item.record["conversations"][2 * k]
            convs += [dict(human), {"from": "gpt", "value": cands, "score": _mean(arat)}]
            turns.append((strip_image_token(human["value"]), cands))
            ratings[(rid, "answer", k)] = arat
        out.answer.append({"id": rid, "image": t.image, "conversations": convs})
        cands_by_record.append(RecordCandidates(rid, item.record.get("task"), t.image,
                                                [[strip_image_token(q) for q in qs] for qs in qsets], turns))
    out.tasks = build_tasks(cands_by_record, image_root)
    for tid, task in enumerate(out.tasks, start=1):
        d = task["data"]
        rat = ratings[(d["record_id"], d["kind"], d["turn"])]
        out.labelstudio.append(export_task(tid, d, rat))
        strict, ties = _pairs(_mean(rat))
        out.groups += 1
        out.candidates += d["n_candidates"]
        out.pairs += strict
        out.ties += ties
    return out
