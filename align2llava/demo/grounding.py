"""Does a model's own likelihood follow the image? The demo's check of a reward model's base.

A reward model built on an MLLM can only tell a right colour from a wrong one if the MLLM can.
`grounding_cases` takes answers from pool records (the pool's own sentence forms) that name the
image's true colour or shape, cut each just before that word; `word_preference` asks the model,
given the image and the question, how often it prefers the true word over each wrong one
(summed log-probability of the answer up to and including the word; the prefix is shared, so
the word decides). Chance is 0.5. Demo world only: the truth is read from the image's pixels.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align2llava.data.images import resolve_image
from align2llava.data.records import strip_image_token
from align2llava.demo.synthesis.world import COLORS, SHAPES, measure_image

GROUPS = {"color": COLORS, "shape": SHAPES}
_WORD = re.compile(r"[A-Za-z]+")


@dataclass(frozen=True)
class Case:
    """An answer prefix ending just before `word`, the image's true colour or shape."""

    id: str
    image: str
    question: str
    prefix: str
    word: str  # as written in the answer (its capitalisation)
    group: str  # color | shape


def _first_fact(answer: str, group: str) -> re.Match[str] | None:
    words = set(GROUPS[group])
    return next((m for m in _WORD.finditer(answer) if m.group().lower() in words), None)


def grounding_cases(records: list[dict[str, Any]], image_root: str | Path, per_group: int, seed: int) -> list[Case]:
    """Up to `per_group` cases per group from the answers of `records` (LLaVA JSON) whose first
    colour (shape) word is the image's true one, at most one per record and group, sampled."""
    by_group: dict[str, list[Case]] = {g: [] for g in GROUPS}
    truths: dict[str, tuple[str, str]] = {}
    for r in records:
        image = str(r["image"])
        if image not in truths:
            shape, color, *_ = measure_image(resolve_image(image_root, image))
            truths[image] = (color, shape)
        truth = dict(zip(("color", "shape"), truths[image]))
        turns = r["conversations"]
        for g in GROUPS:
            for k in range(1, len(turns), 2):
                m = _first_fact(turns[k]["value"], g)
                if m is not None:
                    if m.group().lower() == truth[g]:
                        q = strip_image_token(turns[k - 1]["value"]).strip()
                        by_group[g].append(Case(str(r["id"]), image, q, turns[k]["value"][: m.start()], m.group(), g))
                    break
    rng = random.Random(f"{seed}:grounding")
    out = []
    for g, cases in by_group.items():
        out += rng.sample(cases, min(per_group, len(cases)))
    return out


def _as_written(candidate: str, word: str) -> str:
    return candidate.capitalize() if word[:1].isupper() else candidate


def word_preference(model: Any, processor: Any, cases: list[Case], image_root: str | Path,
                    batch_size: int = 32) -> dict[str, Any]:
    """Per group: the share of (true word, wrong word) comparisons the true word wins, and the
    share of cases where it beats every wrong word (`<group>_top1`); `cases` counts."""
    from align2llava.steps.evaluation.likelihood import _Scorer, continuation_ids

    model.eval()
    scorer = _Scorer(model, processor)
    out: dict[str, Any] = {}
    for g, words in GROUPS.items():
        group = [c for c in cases if c.group == g]
        if not group:
            continue
        per = max(1, batch_size // len(words))
        wins = top = 0
        for start in range(0, len(group), per):
            batch = group[start: start + per]
            conts = [continuation_ids(processor, c.question, c.prefix + _as_written(w, c.word), span="start")
                     for c in batch for w in words]
            for c, row in zip(batch, scorer.score(batch, conts, image_root=image_root, instruction="")):
                true = row[words.index(c.word.lower())]
                beaten = [true > s for w, s in zip(words, row) if w != c.word.lower()]
                wins += sum(beaten)
                top += all(beaten)
        out[g] = round(wins / (len(group) * (len(words) - 1)), 4)
        out[f"{g}_top1"] = round(top / len(group), 4)
        out[f"{g}_cases"] = len(group)
    return out
