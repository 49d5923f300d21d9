"""The demo world: an instruction pool, simulated annotations and a benchmark from easy-vqa.

easy-vqa (MIT, on PyPI) ships 64x64 images of one shape (circle, rectangle, triangle) in one of
8 colours on a light background, with QA pairs, split into train (4,000 images) and test (1,000).
`synthesize()` turns it into what the Align²LLaVA pipeline consumes:

- `pool.json`: LLaVA records with an extra `"task"` (`conversation`: 2-3 turns; `detail`;
  `complex_reasoning`), one train image each, ids `evqa-<image:06d>-<task>`. They are written as
  a text-only generator writes from a caption (verbose, "Certainly! In the image, ..."), with
  defects at the rates of `SynthesizeParams.defect_rates`.
- `oracle.jsonl`: which defects each record carries (for diagnosis; no curation stage reads it).
- `annotations/`: candidate question sets and answers for a share of the pool's records, scored
  by a *simulated* annotator (`judge_question`, `judge_answer`) that reads the text and checks it
  against the ground truth with the rubric of METHOD.md, plus noise; scores on a 0.25 grid.
- `benchmark/`: easy-vqa's test QA (shape / color / yes_no) and POPE-style presence probes.
- `captions.jsonl`: true short captions of train images (LLaVA stage-1 data).

Defect types (the names used in `oracle.jsonl`):

- `hallucinated_color`: an answer names a colour the shape does not have.
- `hallucinated_shape`: an answer names a shape that is not there.
- `wrong_yes_no`: a yes/no answer is inverted (conversation and complex_reasoning only).
- `omitted_key_fact`: an answer talks around the question without the fact it asks for.
- `generic_question`: a turn is a generic question with a vague, content-free answer.
- `unanswerable_question`: a turn asks about something absent (a dog, people, a shape that is
  not there) and its answer confidently makes it up.

Each rate is the share of records of a task that carry that defect (`wrong_yes_no` over the
tasks it applies to). Single-turn records carry at most one defect; conversations draw each
type independently, one per turn. Ground truth (shape, colour) comes from the pixels (exact
easy-vqa palette, fill ratio of the bounding box) and is cross-checked against easy-vqa's own QA.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import Field

from .config import Section
from .errors import Align2LlavaError, DataError
from .io import write_jsonl, write_records

log = logging.getLogger(__name__)

TASKS = ("conversation", "detail", "complex_reasoning")
SHAPES = ("circle", "rectangle", "triangle")
PALETTE = {  # easy-vqa draws with these exact RGB values
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "black": (0, 0, 0), "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (165, 42, 42),
}
COLORS = tuple(PALETTE)
DEFECTS = ("hallucinated_color", "hallucinated_shape", "wrong_yes_no", "omitted_key_fact",
           "generic_question", "unanswerable_question")
QUESTION_DEFECTS = ("generic_question", "unanswerable_question")
STEP = 0.25  # annotator scores lie on this grid; Label Studio rating = 1 + round(score * 4)


class DefectRates(Section):
    hallucinated_color: float = Field(0.12, ge=0, le=1)
    hallucinated_shape: float = Field(0.10, ge=0, le=1)
    wrong_yes_no: float = Field(0.10, ge=0, le=1)
    omitted_key_fact: float = Field(0.10, ge=0, le=1)
    generic_question: float = Field(0.08, ge=0, le=1)
    unanswerable_question: float = Field(0.08, ge=0, le=1)


class SynthesizeParams(Section):
    """The `synthesize:` section of params.yaml."""

    pool_per_task: int = Field(300, ge=1)
    defect_rates: DefectRates = DefectRates()
    annotate_fraction: float = Field(0.10, ge=0, le=1)  # share of pool records annotated
    question_candidates: int = Field(4, ge=2)  # per annotated record, the original included
    answer_candidates: int = Field(4, ge=2)  # per annotated turn, the original included
    annotator_noise: float = Field(0.15, ge=0, le=1)  # chance a score moves one 0.25 step
    benchmark_vqa_per_type: int = Field(100, ge=0)
    benchmark_pope: int = Field(200, ge=0)
    captions: int = Field(4000, ge=0)  # train images captioned for pretraining (at most 4,000)


# --------------------------------------------------------------------------------- the world
@dataclass(frozen=True)
class Truth:
    image_id: int
    split: str
    shape: str
    color: str
    position: str  # "upper left" ... "center" ... "lower right"
    size: str  # small / medium / large

    @property
    def image(self) -> str:
        return f"{self.split}/{self.image_id}.png"


def easy_vqa_dir() -> Path:
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        raise Align2LlavaError("package easy-vqa is not installed; run `pip install easy-vqa==1.0`")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def read_split(source: Path, split: str) -> tuple[dict[int, Path], list[tuple[str, str, int]]]:
    """easy-vqa's images {id: path} and QA triples (question, answer, image id) of a split."""
    qfile, idir = source / split / "questions.json", source / split / "images"
    if not qfile.is_file() or not idir.is_dir():
        raise DataError(f"{source / split}: expected questions.json and images/ (easy-vqa layout)")
    try:
        qa = [(str(q), str(a), int(i)) for q, a, i in json.loads(qfile.read_text())]
    except (ValueError, TypeError) as exc:
        raise DataError(f"{qfile}: not easy-vqa questions ([question, answer, image_id]): {exc}") from None
    images = {int(p.stem): p for p in idir.glob("*.png") if p.stem.isdigit()}
    return images, qa


def measure_image(path: Path) -> tuple[str, str, str, str]:
    """(shape, colour, position, size) of the single shape, from the pixels."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    mask = np.abs(a - a[0, 0]).sum(-1) > 60
    if mask.sum() < 4:
        raise DataError(f"{path}: no shape found")
    pix = a[mask]
    dist = {c: int((np.abs(pix - np.array(rgb)).sum(-1) < 30).sum()) for c, rgb in PALETTE.items()}
    color = max(COLORS, key=lambda c: dist[c])
    ys, xs = np.nonzero(mask)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = mask.sum() / (h * w)
    shape = "triangle" if fill < 0.68 else "circle" if fill < 0.93 else "rectangle"
    cy, cx = (ys.min() + ys.max()) / 2 / a.shape[0], (xs.min() + xs.max()) / 2 / a.shape[1]
    row = ("upper", "middle", "lower")[min(int(cy * 3), 2)]
    col = ("left", "middle", "right")[min(int(cx * 3), 2)]
    position = "center" if row == col == "middle" else f"{row} {col}"
    frac = h * w / (a.shape[0] * a.shape[1])
    size = "small" if frac < 0.12 else "medium" if frac < 0.3 else "large"
    return shape, color, position, size


def qa_facts(qa: list[tuple[str, str, int]]) -> dict[int, dict[str, str]]:
    """What easy-vqa's own QA says positively about each image's shape and colour."""
    facts: dict[int, dict[str, str]] = {}
    for q, a, i in qa:
        f = facts.setdefault(i, {})
        w = _words(q)
        if a in SHAPES or a in COLORS:  # "what color is the circle?" -> red
            f["shape" if a in SHAPES else "color"] = a
            named = [x for x in w if x in SHAPES or x in COLORS]
        elif (a == "yes") != bool({"not", "no"} & set(w)):  # "is there a red shape?" -> yes
            named = [x for x in w if x in SHAPES or x in COLORS]
        else:
            named = []
        for x in named:
            f["shape" if x in SHAPES else "color"] = x
    return facts


def load_truths(split: str, ids: list[int], facts: dict[int, dict[str, str]],
                images: dict[int, Path]) -> tuple[dict[int, Truth], int]:
    """Truth per image id, and how many disagree with easy-vqa's QA (expected 0)."""
    from tqdm import tqdm

    out, mismatches = {}, 0
    for i in tqdm(ids, desc=f"measure {split} images", unit="img", disable=None, leave=False):
        shape, color, position, size = measure_image(images[i])
        f = facts.get(i, {})
        if f.get("shape", shape) != shape or f.get("color", color) != color:
            mismatches += 1
            shape, color = f.get("shape", shape), f.get("color", color)
        out[i] = Truth(i, split, shape, color, position, size)
    return out, mismatches


# ------------------------------------------------------------------------------ text writing
def _a(word: str) -> str:
    return ("an " if word[:1] in ("a", "e", "i", "o", "u") else "a ") + word


SIDES = {"circle": "zero straight sides", "triangle": "three straight sides", "rectangle": "four straight sides"}
LOOKS = {"circle": "round, curved outline", "triangle": "three straight edges and three corners",
         "rectangle": "four straight edges and four right-angled corners"}
THINGS = {"circle": "a coin, a button or a ball", "triangle": "a slice of pizza or a roof seen from the side",
          "rectangle": "a book, a door or a phone screen"}
OPENERS = ("Certainly! ", "Sure! ", "Great question! ", "")
CLOSERS = (" Overall, the image has a clean and minimalistic composition.",
           " This simple composition makes the object the clear focal point of the image.",
           " The high contrast between the object and the background makes it easy to notice.", "")
ENTITIES = ("dog", "cat", "car", "people", "person", "tree", "bird", "text", "clouds", "building")
GENERIC_Q = ("What do you think about this image?", "What is interesting about this picture?",
             "Can you tell me more about this?", "What are your thoughts on what is shown here?",
             "What does this image make you feel?")
GENERIC_A = ("This is an interesting image with a simple composition. It can evoke different feelings in "
             "different viewers, and there are many ways to interpret what it shows. Overall, it is a "
             "pleasant image to look at and invites further reflection.",
             "Certainly! The image is quite thought-provoking. Images like this one often carry a "
             "deeper meaning, and each viewer may take away something slightly different from it, "
             "depending on their own experiences and perspective.",
             "That is a great question! The picture has a certain charm to it. It reminds us that "
             "even simple scenes can be visually engaging and worth a closer look.")
UNANSWERABLE = (  # (question, made-up answer); {color} {shape} are filled from the truth
    ("What is the dog in the image doing?", "The dog is lying calmly beside the {color} {shape}, looking "
     "relaxed as it rests on the floor. Its posture suggests that it is enjoying a quiet moment."),
    ("How many people are standing in the background?", "There are three people standing in the "
     "background, chatting near the {color} {shape}. They appear to be casually dressed."),
    ("What does the text written below the shape say?", "The text below the {color} {shape} reads "
     "\"Welcome\", written in a clean and simple font that matches the minimalistic style."),
    ("What brand is the car parked next to the shape?", "The car parked next to the {color} {shape} "
     "appears to be a compact sedan, most likely a Toyota, judging by its rounded design."),
    ("What kind of bird is perched on top of the shape?", "The bird perched on the {color} {shape} looks "
     "like a small sparrow, with its wings folded as it rests."),
)


@dataclass(frozen=True)
class Turn:
    """One question-answer pair and what it asks (for the generator and the annotator)."""

    kind: str
    question: str
    answer: str
    probe: str = ""  # yes/no kinds: the attribute asked about (a shape or a colour)


def _probe(rng: random.Random, t: Truth) -> str:
    """A shape or colour to ask about: present half the time."""
    if rng.random() < 0.5:
        return t.shape if rng.random() < 0.5 else t.color
    pool = [s for s in SHAPES if s != t.shape] if rng.random() < 0.5 else [c for c in COLORS if c != t.color]
    return rng.choice(pool)


def _present(t: Truth, probe: str) -> bool:
    return probe in (t.shape, t.color)


def ask(kind: str, rng: random.Random, t: Truth, probe: str = "") -> str:
    """A question of `kind` about image `t`."""
    c, s = t.color, t.shape
    options = {
        "color": ["What color is the shape in the image?", f"What color is the {s}?",
                  "Can you tell me the color of the object shown in the image?", f"Which color does the {s} have?"],
        "shape": ["What shape is shown in the image?", f"What kind of shape is the {c} object?",
                  "Which geometric shape appears in this picture?", "What is the shape of the object in the image?"],
        "yes_no": [f"Is there {_a(probe)}{'' if probe in SHAPES else ' shape'} in the image?",
                   f"Does the image contain {_a(probe)}{'' if probe in SHAPES else ' shape'}?"],
        "position": ["Where is the shape located in the image?", f"In which part of the image is the {s}?"],
        "size": ["How large is the shape relative to the image?", f"Is the {s} small or large compared to the frame?"],
        "describe": ["Describe the following image in detail.", "What do you see in this image? Describe it in detail.",
                     "Can you elaborate on the elements of the picture provided?",
                     "Analyze the image in a comprehensive and detailed manner.",
                     "Write a detailed description of the given image."],
        "sides": ["How many sides does the shape in the image have, and how can you tell?",
                  "Counting its edges, how many straight sides does the object in the picture have? Explain."],
        "roll": ["If the shape in the image were cut out of wood and set on its edge, could it roll easily? Explain why.",
                 "Could the object in this picture roll smoothly across a table if it were a solid piece? Why or why not?"],
        "paint": ["If someone wanted to paint an exact copy of this shape, what color of paint would they need?",
                  "Which paint color would an artist need to reproduce the object in this image faithfully?"],
        "analogy": ["What real-world object could the shape in this image remind someone of, and why?",
                    "Based on its form and color, what everyday item might this shape represent?"],
        "verify": [f"Is the {c} shape in the image {_a(probe)}? Please explain your reasoning."],
    }
    return rng.choice(options[kind])


def answer(kind: str, rng: random.Random, t: Truth, probe: str = "", style: str = "verbose",
           flip: bool = False) -> str:
    """An answer about `t` (pass a corrupted Truth to hallucinate).

    style: verbose (generator style), concise (short and factual), omit (skirts the key fact).
    flip: invert a yes/no answer. Fact sentences never contain negation words: the annotator
    skips negated sentences when it looks for contradictions.
    """
    c, s, pos, size = t.color, t.shape, t.position, t.size
    o, z = rng.choice(OPENERS), rng.choice(CLOSERS)
    if style == "omit":
        return rng.choice([
            "Looking at the image, the object has a distinctive appearance that stands out clearly against "
            "the light background, which makes it easy to notice at first glance." + z,
            "The image shows a single geometric object on a plain, light background. It is simple, yet it "
            "draws the viewer's attention immediately." + z,
        ])
    if kind in ("yes_no", "verify", "roll"):
        yes = (s == "circle") if kind == "roll" else _present(t, probe) if kind == "yes_no" else probe == s
        yes = yes != flip
        head = "Yes" if yes else "No"
        if kind == "roll":
            why = (f"The object is {_a(s)}, and its {LOOKS[s]} lets it turn smoothly along the surface."
                   if s == "circle" else f"The object is {_a(s)}, and its flat edges and sharp corners stop it.")
            return f"{head}. {why}" if style == "concise" else f"{head}. {why} A solid {s} would behave this way on any flat table." + z
        if kind == "verify":
            what = f"The {c} shape is {_a(s)}, recognizable by its {LOOKS[s]}."
            return f"{head}. {what}" if style == "concise" else f"{head}, {'it is' if yes else 'it is not'}. {what}" + z
        if yes:
            return f"Yes. The image contains {_a(probe)}{'' if probe in SHAPES else ' shape'}." if style == "concise" \
                else f"Yes, there is {_a(probe)}{'' if probe in SHAPES else ' shape'} in the image. It stands out " \
                     f"clearly against the light background." + z
        return (f"No. The image shows {_a(c)} {s}." if style == "concise" else
                f"No, there is no {probe}{'' if probe in SHAPES else ' shape'} in the image. The only object "
                f"shown is {_a(c)} {s} in the {pos} of the image." + z)
    if style == "concise":
        return {
            "color": f"It is {c}.", "shape": f"It is {_a(s)}.", "position": f"It is in the {pos} of the image.",
            "size": f"It is {size}.", "describe": f"{_a(c).capitalize()} {s} in the {pos} of a light background.",
            "sides": f"It is {_a(s)}, so it has {SIDES[s]}.", "paint": f"{c.capitalize()} paint.",
            "analogy": f"The {c} {s} could be {THINGS[s]}.",
        }[kind]
    body = {
        "color": f"In the image, the {s} is {c}. Its {c} color stands out clearly against the light background, "
                 f"making it the most noticeable element of the scene.",
        "shape": f"In the image, there is {_a(c)} {s}. It is the only object in the scene, and it is easy to "
                 f"recognize thanks to its {LOOKS[s]}.",
        "position": f"The {c} {s} is located in the {pos} of the image. Its placement gives the composition a "
                    f"simple and balanced look.",
        "size": f"The {c} {s} is {size} relative to the frame. It occupies a {size} portion of the image.",
        "describe": f"The image features a single {c} {s} set against a plain, light background. The {s} is "
                    f"{size} and positioned in the {pos} of the frame. With its {LOOKS[s]}, it has a clean, "
                    f"geometric look. The strong contrast between the {c} {s} and the pale background draws the viewer's "
                    f"attention directly to it.",
        "sides": f"The object in the image is {_a(c)} {s}. With its {LOOKS[s]}, it has {SIDES[s]}.",
        "paint": f"To paint an exact copy of the shape, they would need {c} paint. The {s} in the image is a solid "
                 f"{c} color, so a single tube of {c} paint would be enough.",
        "analogy": f"The {c} {s} could remind someone of {THINGS[s]}. Its {LOOKS[s]} and its {c} color bring "
                   f"such everyday items to mind.",
    }[kind]
    return o + body + z


# ------------------------------------------------------------------------ the annotator rubric
_NEG = re.compile(r"\b(no|not|isn't|aren't|doesn't|don't|cannot|can't|without|neither|nor)\b", re.I)
_WORD = re.compile(r"[a-z']+")
SPECIFIC = {"shape", "shapes", "color", "colour", "object", "sides", "edges", "roll", "paint", "located",
            "where", "large", "small", "size", "describe", "description", "elements", "detailed", "detail",
            "analyze", *SHAPES, *COLORS}
REASONING = {"why", "explain", "could", "would", "if", "reasoning", "based", "describe", "detail",
             "detailed", "analyze", "elaborate"}
POSITIONS = ("upper left", "upper middle", "upper right", "middle left", "center", "middle right",
             "lower left", "lower middle", "lower right")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def asserted_words(text: str) -> set[str]:
    """Words of the sentences that assert something (sentences with a negation are skipped)."""
    out: set[str] = set()
    for sent in re.split(r"(?<=[.!?])\s+", text):
        if not _NEG.search(sent):
            out.update(_words(sent))
    return out


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


# ------------------------------------------------------------------------------------ the pool
CONV_KINDS = ("color", "shape", "yes_no", "position", "size")
REASON_KINDS = ("sides", "roll", "paint", "analogy", "verify")
YES_NO_KINDS = ("yes_no", "roll", "verify")
FITS = {  # answer defect -> the kinds whose answers can carry it
    "hallucinated_color": ("color", "position", "size", "describe", "paint", "analogy", "sides"),
    "hallucinated_shape": ("shape", "position", "size", "describe", "sides", "analogy"),
    "wrong_yes_no": YES_NO_KINDS,
    "omitted_key_fact": CONV_KINDS + REASON_KINDS + ("describe",),
}


@dataclass
class Item:
    """A pool record with what the generator knows about it."""

    record: dict[str, Any]
    truth: Truth
    turns: list[Turn]
    turn_defects: dict[int, list[str]]


def _other(rng: random.Random, options: tuple[str, ...], not_this: str) -> str:
    return rng.choice([o for o in options if o != not_this])


def make_turn(kind: str, rng: random.Random, t: Truth, defect: str | None = None) -> Turn:
    """One QA turn of `kind`, carrying `defect` (None: clean)."""
    if defect == "generic_question":
        return Turn("generic", rng.choice(GENERIC_Q), rng.choice(GENERIC_A))
    if defect == "unanswerable_question":
        if rng.random() < 0.3:  # presupposes a shape that is not there
            wrong = _other(rng, SHAPES, t.shape)
            return Turn("unanswerable", f"What color is the {wrong} in the image?",
                        f"Certainly! The {wrong} in the image is {t.color}. It stands out clearly against the light "
                        f"background.")
        q, a = rng.choice(UNANSWERABLE)
        return Turn("unanswerable", q, a.format(color=t.color, shape=t.shape))
    probe = _probe(rng, t) if kind in ("yes_no", "verify") else ""
    if kind == "verify":
        probe = t.shape if rng.random() < 0.5 else _other(rng, SHAPES, t.shape)
    q = ask(kind, rng, t, probe)
    view, flip, style = t, False, "verbose"
    if defect == "hallucinated_color":
        view = replace(t, color=_other(rng, COLORS, t.color))
    elif defect == "hallucinated_shape":
        view = replace(t, shape=_other(rng, SHAPES, t.shape))
    elif defect == "wrong_yes_no":
        flip = True
    elif defect == "omitted_key_fact":
        style = "omit"
    return Turn(kind, q, answer(kind, rng, view, probe, style, flip), probe)


def draw_defects(rng: random.Random, task: str, rates: DefectRates) -> list[str]:
    """Conversations: each type independently; single-turn tasks: at most one (categorical)."""
    r = rates.model_dump()
    applicable = [d for d in DEFECTS if not (d == "wrong_yes_no" and task == "detail")]
    if task == "conversation":
        return [d for d in applicable if rng.random() < r[d]]
    x, acc = rng.random(), 0.0
    for d in applicable:
        acc += r[d]
        if x < acc:
            return [d]
    return []


def make_item(task: str, t: Truth, seed: int, rates: DefectRates) -> Item:
    rng = random.Random(f"{seed}:{task}:{t.image_id}")
    defects = draw_defects(rng, task, rates)
    rng.shuffle(defects)
    n = (rng.choice((2, 3)) if task == "conversation" else 1)
    if task == "conversation" and len(defects) > n:
        n = 3
    defects = defects[:n]
    slots: list[str | None] = defects + [None] * (n - len(defects))
    rng.shuffle(slots)
    kinds_all = {"conversation": CONV_KINDS, "detail": ("describe",), "complex_reasoning": REASON_KINDS}[task]
    used: list[str] = []
    turns, turn_defects = [], {}
    for k, d in enumerate(slots):
        fits = FITS.get(d, kinds_all) if d else kinds_all
        options = [x for x in kinds_all if x in fits and x not in used] or [x for x in kinds_all if x in fits]
        kind = rng.choice(options)
        used.append(kind)
        turns.append(make_turn(kind, rng, t, d))
        if d:
            turn_defects[k] = [d]
    convs = []
    for k, turn in enumerate(turns):
        q = turn.question
        if k == 0:
            q = f"<image>\n{q}" if rng.random() < 0.8 else f"{q}\n<image>"
        convs += [{"from": "human", "value": q}, {"from": "gpt", "value": turn.answer}]
    record = {"id": f"evqa-{t.image_id:06d}-{task}", "image": t.image, "conversations": convs, "task": task}
    return Item(record, t, turns, turn_defects)


def oracle_row(item: Item) -> dict[str, Any]:
    defects = sorted({d for ds in item.turn_defects.values() for d in ds})
    return {"id": item.record["id"], "task": item.record["task"], "defects": defects,
            "turn_defects": {str(k): v for k, v in sorted(item.turn_defects.items())}}


# ----------------------------------------------------------------------------- annotations
def question_candidates(item: Item, rng: random.Random, n: int) -> list[list[str]]:
    """Candidate 0: the original human turns (with <image>); then LLM-like alternatives."""
    t, task = item.truth, item.record["task"]
    orig = [c["value"] for c in item.record["conversations"] if c["from"] == "human"]
    kinds_all = {"conversation": CONV_KINDS, "detail": ("describe",), "complex_reasoning": REASON_KINDS}[task]
    plain = [tu.question for tu in item.turns]

    def clean(kind: str) -> str:
        kind = kind if kind in kinds_all else rng.choice(kinds_all)
        return make_turn(kind, rng, t).question

    rewrite = [clean(tu.kind) for tu in item.turns]  # paraphrased, defective questions corrected
    fresh = [clean(k) for k in rng.sample(kinds_all, min(len(plain), len(kinds_all)))]
    corrupt = list(plain)
    corrupt[rng.randrange(len(plain))] = make_turn("", rng, t, rng.choice(QUESTION_DEFECTS)).question
    duplicated = plain + [plain[rng.randrange(len(plain))]]
    generic = rng.sample(GENERIC_Q, min(len(plain), len(GENERIC_Q)))
    alts = [rewrite, fresh, corrupt, duplicated, generic]
    rng.shuffle(alts)
    return [orig] + alts[: n - 1]


def answer_candidates(turn: Turn, t: Truth, rng: random.Random, n: int) -> list[str]:
    """Candidate 0: the original answer; then corrected, rewritten and corrupted alternatives."""
    kind = turn.kind
    if kind in ("generic", "unanswerable"):
        subject = "what it asks about" if kind == "generic" else "that"
        good = [f"The image shows {_a(t.color)} {t.shape} in the {t.position} of a light background.",
                f"There is nothing like {subject} in the image. It only shows {_a(t.color)} {t.shape} on a light "
                f"background."]
        bad = [make_turn("", rng, t, "unanswerable_question").answer, rng.choice(GENERIC_A)]
        alts = good + bad
        rng.shuffle(alts)
        return [turn.answer] + alts[: n - 1]
    bad_color = replace(t, color=_other(rng, COLORS, t.color))
    bad_shape = replace(t, shape=_other(rng, SHAPES, t.shape))
    corrected = answer(kind, rng, t, turn.probe)
    others = [answer(kind, rng, t, turn.probe, "concise"), answer(kind, rng, t, turn.probe, "omit")]
    if kind in YES_NO_KINDS:
        others.append(answer(kind, rng, t, turn.probe, "verbose", flip=True))
    if kind in FITS["hallucinated_color"]:
        others.append(answer(kind, rng, bad_color, turn.probe))
    if kind in FITS["hallucinated_shape"]:
        others.append(answer(kind, rng, bad_shape, turn.probe))
    rng.shuffle(others)
    return [turn.answer, corrected] + others[: n - 2]


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
        typ = "shape" if a in SHAPES else "color" if a in COLORS else "yes_no"
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


def caption(t: Truth, rng: random.Random) -> str:
    return rng.choice([f"{_a(t.color).capitalize()} {t.shape} on a light background.",
                       f"{_a(t.size).capitalize()} {t.color} {t.shape} in the {t.position} of the image.",
                       f"{_a(t.color).capitalize()} {t.shape}."])


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
        pool = [i for i in items if not (d == "wrong_yes_no" and i.record["task"] == "detail")]
        has = sum(any(d in ds for ds in i.turn_defects.values()) for i in pool)
        out["overall"][d] = round(has / max(1, len(pool)), 4)
    for task, its in by_task.items():
        out["by_task"][task] = {d: round(sum(any(d in ds for ds in i.turn_defects.values()) for i in its)
                                         / max(1, len(its)), 4) for d in DEFECTS}
        out["clean_fraction"][task] = round(sum(not i.turn_defects for i in its) / max(1, len(its)), 4)
    out["clean_fraction"]["all"] = round(sum(not i.turn_defects for i in items) / max(1, len(items)), 4)
    return out


def synthesize(p: SynthesizeParams, seed: int, out_dir: str | Path,
               source: str | Path | None = None) -> dict[str, Any]:
    """Write the demo world to `out_dir` (see the module doc); returns metrics."""
    start = time.time()
    out, source = Path(out_dir), Path(source) if source else easy_vqa_dir()
    train_images, train_qa = read_split(source, "train")
    test_images, test_qa = read_split(source, "test")
    n_pool = p.pool_per_task * len(TASKS)
    if n_pool > len(train_images):
        raise DataError(f"synthesize.pool_per_task: {n_pool:,} pool images needed, {len(train_images):,} available")
    train_ids = sorted(train_images)
    pool_ids = list(train_ids)
    random.Random(f"{seed}:pool").shuffle(pool_ids)
    pool_ids = pool_ids[:n_pool]
    cap_ids = train_ids[: p.captions]
    truths, mism = load_truths("train", sorted(set(pool_ids) | set(cap_ids)), qa_facts(train_qa),
                               train_images)
    items = []
    for k, task in enumerate(TASKS):
        block = sorted(pool_ids[k * p.pool_per_task: (k + 1) * p.pool_per_task])
        items += [make_item(task, truths[i], seed, p.defect_rates) for i in block]
    rng = random.Random(f"{seed}:annotated")
    annotated = []
    for task in TASKS:
        its = [i for i in items if i.record["task"] == task]
        annotated += sorted(rng.sample(its, round(p.annotate_fraction * len(its))), key=lambda i: i.record["id"])
    ann = build_annotations(annotated, p, seed)
    vqa, pope, mism_test = build_benchmark(test_qa, test_images, p, seed)
    caps = [{"id": f"cap-{i:06d}", "image": truths[i].image,
             "caption": caption(truths[i], random.Random(f"{seed}:caption:{i}"))} for i in cap_ids]

    if out.exists():
        for name in ("images", "annotations", "benchmark"):
            shutil.rmtree(out / name, ignore_errors=True)
    used = sorted({(t.split, t.image_id) for t in truths.values()}
                  | {tuple(r["image"].removesuffix(".png").split("/")) for r in vqa + pope})
    from tqdm import tqdm

    for split, i in tqdm(used, desc="copy images", unit="img", disable=None, leave=False):
        dst = out / "images" / split / f"{int(i)}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile((train_images if split == "train" else test_images)[int(i)], dst)
    write_records([i.record for i in items], out / "pool.json", "json")
    write_jsonl([oracle_row(i) for i in items], out / "oracle.jsonl")
    write_jsonl(caps, out / "captions.jsonl")
    _write_json(ann.question, out / "annotations" / "question.json")
    _write_json(ann.answer, out / "annotations" / "answer.json")
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
        "annotations": {"records": len(annotated), "groups": ann.groups, "candidates": ann.candidates,
                        "strict_pairs": ann.pairs, "tied_pairs": ann.ties,
                        "tie_rate": round(ann.ties / max(1, ann.pairs + ann.ties), 4)},
        "benchmark": {**{t: sum(r["type"] == t for r in vqa) for t in ("shape", "color", "yes_no")},
                      "pope": len(pope), "pope_yes_fraction": round(sum(r["answer"] == "yes" for r in pope)
                                                                    / max(1, len(pope)), 4)},
        "captions": len(caps),
        "images": len(used),
        # images whose pixel-measured shape/colour disagreed with easy-vqa's QA (the QA wins)
        "truth_pixel_qa_disagreements": mism + mism_test,
        "seconds": round(time.time() - start, 2),
    }


ANNOTATIONS_README = """\
# Demo annotations: simulated, not human

These files stand in for the paper's human seed set on the demo world (easy-vqa images). A
scripted annotator (align2llava/synthesis.py: judge_question, judge_answer, annotate) reads each
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
- labelstudio.json: the same judgements as a Label Studio export: one task per group
  ("<id>/question" or "<id>/answer/<turn>"), ratings 1..5 = 1 + round(score * 4).
"""
