"""The demo's instruction-tuning data for its reward models' base (`instruct.json`).

The paper's reward models start from LLaVA-1.5 after its instruction tuning: a model whose
answers already follow the image. The demo's stage-1 model has only learnt to caption, and a
reward model built on it cannot tell a right colour from a wrong one. The `instruct` stage tunes
it on these records first. They are correct by construction and cover the facts the defects
get wrong, in many sentence forms, with the fact at varied positions in the sentence:

- colour, shape and description questions (easy-vqa's own questions and others), answered in
  full sentences or, after the short-answer instruction, in one word;
- presence questions ("Is there a blue shape?"), half of them about an absent colour or shape,
  answered yes or no with the fact that decides it;
- matching questions: does a description fit the image? (half the time it names another colour
  or shape): image-text matching, the supervision CLIP gives LLaVA's vision tower.

Records use train images no pool, mix or benchmark record uses; the wording is this module's
own, not the pool writer's.
"""

from __future__ import annotations

import random
from typing import Any

from align2llava.data.records import SHORT_ANSWER
from align2llava.demo.synthesis.world import COLORS, SHAPES, Truth


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


COLOR_QUESTIONS = ("What color is the {s}?", "What is the color of the shape?", "Which color is the object?",
                   "What colour does the shape have?", "Tell me the color of the figure.", "What color is it?")
SHAPE_QUESTIONS = ("What shape is shown?", "What is the shape in the image?", "Which shape do you see?",
                   "What kind of figure is drawn here?", "Name the shape in this picture.", "What is the {c} shape?")
DESCRIBE_QUESTIONS = ("What is in the image?", "Describe the picture.", "What do you see?",
                      "Give a short description of this image.", "What does the image contain?")
COLOR_ANSWERS = ("The {s} is {c}.", "It is {c}.", "{C}.", "The color is {c}.", "The figure is colored {c}.",
                 "This is {a_c} {s}.", "It has a {c} color.", "I see {a_c} {s}.", "The shape in the picture is {c}.")
SHAPE_ANSWERS = ("It is {a_s}.", "The shape is {a_s}.", "{A_s}.", "This is {a_c} {s}.", "I can see {a_s}.",
                 "The figure is {a_s}, colored {c}.", "It is a {c} {s}.", "The image shows {a_s}.")
DESCRIBE_ANSWERS = ("{A_c} {s} on a plain background.", "The image shows {a_c} {s}.", "There is {a_c} {s} in the picture.",
                    "A single {s}, {c} in color.", "I see one shape: {a_c} {s}.", "It is a picture of {a_c} {s}.")
PRESENCE = {"color": ("Is there a {x} shape in the image?", "Is the shape {x}?", "Is the object {x}?"),
            "shape": ("Is there {a_x} in the image?", "Is the shape {a_x}?", "Does the image show {a_x}?")}
MATCH_QUESTIONS = ("Does this description match the image: \"{d}\"?", "Is this a correct caption for the image: \"{d}\"?",
                   "Someone described the image as \"{d}\". Are they right?")
MATCH_DESCRIPTIONS = ("{A_c} {s}.", "{A_c} {s} on a plain background.", "The picture shows {a_c} {s}.")


def _fill(template: str, color: str, shape: str, **extra: str) -> str:
    return template.format(c=color, C=color.capitalize(), s=shape, a_s=_a(shape), A_s=_a(shape).capitalize(),
                           a_c=_a(color), A_c=_a(color).capitalize(), **extra)


def _presence(rng: random.Random, t: Truth) -> tuple[str, str]:
    kind = rng.choice(("color", "shape"))
    true = t.color if kind == "color" else t.shape
    present = rng.random() < 0.5
    x = true if present else rng.choice([w for w in (COLORS if kind == "color" else SHAPES) if w != true])
    q = rng.choice(PRESENCE[kind]).format(x=x, a_x=_a(x))
    fact = _fill(rng.choice(("it is {a_c} {s}", "the shape is {a_c} {s}", "the image shows {a_c} {s}")), t.color, t.shape)
    return q, ("Yes, " if present else "No, ") + fact + "."


def _match(rng: random.Random, t: Truth) -> tuple[str, str]:
    color, shape = t.color, t.shape
    right = rng.random() < 0.5
    if not right:
        if rng.random() < 0.5:
            color = rng.choice([c for c in COLORS if c != t.color])
        else:
            shape = rng.choice([s for s in SHAPES if s != t.shape])
    d = _fill(rng.choice(MATCH_DESCRIPTIONS), color, shape)
    q = rng.choice(MATCH_QUESTIONS).format(d=d)
    truth = _fill("{a_c} {s}", t.color, t.shape)
    return q, ("Yes, it shows " if right else "No, it shows ") + truth + "."


def _turn(kind: str, rng: random.Random, t: Truth) -> tuple[str, str]:
    c, s = t.color, t.shape
    if kind == "presence":
        return _presence(rng, t)
    if kind == "match":
        return _match(rng, t)
    questions, answers = {"color": (COLOR_QUESTIONS, COLOR_ANSWERS), "shape": (SHAPE_QUESTIONS, SHAPE_ANSWERS),
                          "describe": (DESCRIBE_QUESTIONS, DESCRIBE_ANSWERS)}[kind]
    q = _fill(rng.choice(questions), c, s)
    if kind != "describe" and rng.random() < 0.3:  # short answers, LLaVA-1.5's VQA form
        return f"{q}\n{SHORT_ANSWER}", (c if kind == "color" else s).capitalize()
    return q, _fill(rng.choice(answers), c, s)


KINDS = {"color": 0.3, "shape": 0.3, "presence": 0.15, "match": 0.15, "describe": 0.1}


def instruct_record(t: Truth, seed: int, n: int = 0) -> dict[str, Any]:
    """The `n`-th one-turn conversation about `t`'s image, of a kind drawn by `KINDS`' weights.
    One turn only: in a longer conversation a later answer can be read off an earlier one's
    words, and the model would learn that instead of looking."""
    rng = random.Random(f"{seed}:instruct:{t.split}:{t.image_id}:{n}")
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    q, a = _turn(kind, rng, t)
    return {"id": f"instruct-{t.split}-{t.image_id:06d}-{n}", "image": t.image,
            "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]}
