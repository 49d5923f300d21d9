"""The simulated human annotator: the rubric applied to the ground truth, with noise.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from align2llava.demo.synthesis.params import STEP
from align2llava.demo.synthesis.world import COLORS, SHAPES, _words
from align2llava.demo.synthesis.writer import ENTITIES, _present, answer_candidates, asserted_words, question_candidates

if TYPE_CHECKING:
    from align2llava.demo.synthesis.params import SynthesizeParams
    from align2llava.demo.synthesis.world import Truth
    from align2llava.demo.synthesis.writer import Item, Turn

SPECIFIC = {"shape", "shapes", "color", "colour", "object", "sides", "edges", "roll", "paint", "located",
            "where", "large", "small", "size", "describe", "description", "elements", "detailed", "detail",
            "analyze", *SHAPES, *COLORS}
REASONING = {"why", "explain", "could", "would", "if", "reasoning", "based", "describe", "detail",
             "detailed", "analyze", "elaborate"}


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
    labelstudio: list[dict[str, Any]]
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


def build_annotations(items: list[Item], p: SynthesizeParams, seed: int) -> Annotations:
    out = Annotations([], [], [])
    ls_id = 0
    for item in items:
        rid, t = item.record["id"], item.truth
        rng = random.Random(f"{seed}:annotate:{rid}")
        groups: list[tuple[str, str, list[str], list[float]]] = []
        qsets = question_candidates(item, rng, p.question_candidates)
        qscores = [annotate(judge_questions(qs, t), rng, p.annotator_noise) for qs in qsets]
        out.question.append({"id": rid, "image": t.image, "questions": qsets, "score": qscores})
        groups.append(("question", "", ["\n".join(q.replace("<image>", "").strip() for q in qs) for qs in qsets],
                       qscores))
        convs = []
        for k, turn in enumerate(item.turns):
            cands = answer_candidates(turn, t, rng, p.answer_candidates)
            scores = [annotate(judge_answer(turn, a, t), rng, p.annotator_noise) for a in cands]
            convs += [dict(item.record["conversations"][2 * k]), {"from": "gpt", "value": cands, "score": scores}]
            groups.append(("answer", turn.question, cands, scores))
        out.answer.append({"id": rid, "image": t.image, "conversations": convs})
        for g, (kind, prompt, cands, scores) in enumerate(groups):
            ls_id += 1
            name = f"{rid}/question" if kind == "question" else f"{rid}/answer/{g - 1}"
            result = [{"from_name": "rating", "to_name": f"candidate_{j}", "type": "rating",
                       "value": {"rating": 1 + round(s * 4)}} for j, s in enumerate(scores)]
            out.labelstudio.append({"id": ls_id, "data": {"group": name, "image": t.image, "kind": kind,
                                                          "prompt": prompt, "candidates": cands},
                                    "annotations": [{"id": ls_id, "result": result}]})
            strict, ties = _pairs(scores)
            out.groups += 1
            out.candidates += len(cands)
            out.pairs += strict
            out.ties += ties
    return out
