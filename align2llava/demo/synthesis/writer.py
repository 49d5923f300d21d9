"""The simulated text-only instruction writer, with the defects such writers make.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from align2llava.data.records import SHORT_ANSWER
from align2llava.demo.synthesis.params import CAN_CARRY, QUESTION_DEFECTS
from align2llava.demo.synthesis.world import _NEG, COLORS, SHAPES, Truth, _words

if TYPE_CHECKING:
    from align2llava.demo.synthesis.params import DefectRates

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
    short: bool = False  # a short-answer VQA turn (the question carries SHORT_ANSWER)


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


def asserted_words(text: str) -> set[str]:
    """Words of the sentences that assert something (sentences with a negation are skipped)."""
    out: set[str] = set()
    for sent in re.split(r"(?<=[.!?])\s+", text):
        if not _NEG.search(sent):
            out.update(_words(sent))
    return out


# ------------------------------------------------------------------------------------ the pool
CONV_KINDS = ("color", "shape", "yes_no", "position", "size")
REASON_KINDS = ("sides", "roll", "paint", "analogy", "verify")
YES_NO_KINDS = ("yes_no", "roll", "verify")
VQA_KINDS = ("color", "shape", "yes_no")  # short-answer VQA turns
KINDS = {"conversation": CONV_KINDS, "detail": ("describe",), "complex_reasoning": REASON_KINDS, "vqa": VQA_KINDS}
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


# What a text-only writer says when it has to guess: the words its language prior favours, not a
# uniform draw (hallucinations follow priors), so data with such defects teaches a bias.
COLOR_PRIOR = {"red": 0.35, "blue": 0.25, "green": 0.15, "black": 0.1, "yellow": 0.06, "gray": 0.04,
               "brown": 0.03, "teal": 0.02}
SHAPE_PRIOR = {"circle": 0.6, "rectangle": 0.3, "triangle": 0.1}


def guess(rng: random.Random, prior: dict[str, float], not_this: str, how: str = "sampled") -> str:
    """A wrong value, the true one left out: drawn from the writer's prior ("sampled") or always
    its favourite ("favourite": the prior's mode, as a text-only generator's guesses cluster)."""
    options = [o for o in prior if o != not_this]
    drawn = rng.choices(options, weights=[prior[o] for o in options])[0]  # drawn either way: same pool otherwise
    return max(options, key=lambda o: prior[o]) if how == "favourite" else drawn


def short_answer(kind: str, t: Truth, probe: str = "", flip: bool = False) -> str:
    """The one-word answer of a short-answer VQA turn ("Red", "Circle", "Yes")."""
    if kind == "yes_no":
        return "Yes" if _present(t, probe) != flip else "No"
    return {"color": t.color, "shape": t.shape}[kind].capitalize()


def make_turn(kind: str, rng: random.Random, t: Truth, defect: str | None = None, short: bool = False,
              guesses: str = "sampled", asked: tuple[str, str] | None = None) -> Turn:
    """One QA turn of `kind`, carrying `defect` (None: clean).

    short: a short-answer VQA turn (kinds color, shape, yes_no): the question ends with
    SHORT_ANSWER and the answer is one word. A hallucinated colour or shape is the writer's
    guess (`guess`, from its prior, `guesses` says how); a wrong yes/no on a presence question affirms an absent
    shape or colour (text-only writers say yes to what they are asked about). asked: a given
    (question, probe) instead of the writer's own wording (`ask`).
    """
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
    if asked:
        q, probe = asked
    else:
        probe = _probe(rng, t) if kind in ("yes_no", "verify") else ""
        if kind == "verify":
            probe = t.shape if rng.random() < 0.5 else _other(rng, SHAPES, t.shape)
        if defect == "wrong_yes_no" and kind in ("yes_no", "verify"):  # a "yes" where the truth is no
            absent = [s for s in SHAPES if s != t.shape] + ([] if kind == "verify" else [c for c in COLORS if c != t.color])
            probe = rng.choice(absent)
        q = ask(kind, rng, t, probe)
    view, flip, style = t, False, "verbose"
    if defect == "hallucinated_color":
        view = replace(t, color=guess(rng, COLOR_PRIOR, t.color, guesses))
    elif defect == "hallucinated_shape":
        view = replace(t, shape=guess(rng, SHAPE_PRIOR, t.shape, guesses))
    elif defect == "wrong_yes_no":
        flip = True
    elif defect == "omitted_key_fact":
        style = "omit"
    if short:
        return Turn(kind, f"{q}\n{SHORT_ANSWER}", short_answer(kind, view, probe, flip), probe, short=True)
    return Turn(kind, q, answer(kind, rng, view, probe, style, flip), probe)


def draw_defects(rng: random.Random, task: str, rates: DefectRates) -> list[str]:
    """Conversations: each type independently; single-turn tasks: at most one (categorical)."""
    r = rates.model_dump()
    applicable = list(CAN_CARRY[task])
    if task == "conversation":
        return [d for d in applicable if rng.random() < r[d]]
    x, acc = rng.random(), 0.0
    for d in applicable:
        acc += r[d]
        if x < acc:
            return [d]
    return []


def make_item(task: str, t: Truth, seed: int, rates: DefectRates, vqa_wrong_rate: float = 0.25,
              guesses: str = "sampled", wording: Wording | None = None, vqa_turns: str = "shuffled") -> Item:
    """One pool record of `task` about image `t`; `vqa` records take `vqa_wrong_rate` per turn
    and ask `wording`'s questions when given, their turns ordered as `vqa_turns` says;
    hallucinated values are the writer's guesses, `guesses` says how (`guess`)."""
    rng = random.Random(f"{seed}:{task}:{t.image_id}")
    if task == "vqa":
        return _vqa_item(rng, t, vqa_wrong_rate, guesses, wording, vqa_turns)
    defects = draw_defects(rng, task, rates)
    rng.shuffle(defects)
    n = (rng.choice((2, 3)) if task == "conversation" else 1)
    if task == "conversation" and len(defects) > n:
        n = 3
    defects = defects[:n]
    slots: list[str | None] = defects + [None] * (n - len(defects))
    rng.shuffle(slots)
    kinds_all = KINDS[task]
    used: list[str] = []
    turns, turn_defects = [], {}
    for k, d in enumerate(slots):
        fits = FITS.get(d, kinds_all) if d else kinds_all
        options = [x for x in kinds_all if x in fits and x not in used] or [x for x in kinds_all if x in fits]
        kind = rng.choice(options)
        used.append(kind)
        turns.append(make_turn(kind, rng, t, d, guesses=guesses))
        if d:
            turn_defects[k] = [d]
    return _item(rng, task, t, turns, turn_defects)


WRONG = {"color": "hallucinated_color", "shape": "hallucinated_shape", "yes_no": "wrong_yes_no"}


# Questions someone else wrote about one image, per VQA kind: (question, probe) pairs, the probe
# being the shape or colour a yes/no question asks about ("" for the others).
Wording = dict[str, list[tuple[str, str]]]


def _vqa_item(rng: random.Random, t: Truth, wrong_rate: float, guesses: str = "sampled",
              wording: Wording | None = None, order: str = "shuffled") -> Item:
    """A short-answer VQA record (LLaVA-1.5's mix): 3-5 one-word QA turns about one image, each
    answer wrong with probability `wrong_rate` (the writer's guess, see `make_turn`).

    wording: ask these questions (each at most once; a kind with none left takes the writer's
    own) instead of the writer's; a yes/no asks about a present shape or colour half the time
    (the writer asks one where easy-vqa has none left), a wrong one about an absent one where
    there is one, answered "Yes".

    order: shuffled (3-5 turns, the extra ones yes/no) or yes_no_first (3 turns: one yes/no, then
    colour and shape in a shuffled order). In a shuffled record most yes/no turns follow a turn
    whose question or answer names the image's shape or colour, so a model can answer them from
    the conversation's words instead of the image; the benchmark asks one question at a time.
    """
    kinds = list(VQA_KINDS)
    rng.shuffle(kinds)
    if order == "yes_no_first":
        kinds = ["yes_no"] + [k for k in kinds if k != "yes_no"]
    else:
        kinds += ["yes_no"] * (rng.choice((3, 4, 5)) - len(kinds))
    turns, turn_defects, asked = [], {}, set()
    for kind in kinds:
        d = WRONG[kind] if rng.random() < wrong_rate else None
        options = [x for x in (wording or {}).get(kind, []) if x[0] not in asked]
        if options:
            if d == "wrong_yes_no":  # the writer's "yes" to what it is asked about
                options = [x for x in options if not _present(t, x[1])] or options
            elif kind == "yes_no":  # about a present thing half the time, as the writer's own are
                want = rng.random() < 0.5
                options = [x for x in options if _present(t, x[1]) == want]
                if not options:  # easy-vqa has none left of that answer: the writer asks one
                    for _ in range(8):
                        probe = rng.choice((t.shape, t.color)) if want else _probe(rng, t)
                        options = [(ask(kind, rng, t, probe), probe)]
                        if options[0][0] not in asked:
                            break
            pick = rng.choice(options)
            asked.add(pick[0])
            turn = make_turn(kind, rng, t, d, short=True, guesses=guesses, asked=pick)
        else:
            for _ in range(8):  # a different question each turn (asked holds them without SHORT_ANSWER)
                turn = make_turn(kind, rng, t, d, short=True, guesses=guesses)
                if turn.question.removesuffix(f"\n{SHORT_ANSWER}") not in asked:
                    break
            asked.add(turn.question.removesuffix(f"\n{SHORT_ANSWER}"))
        if d:
            turn_defects[len(turns)] = [d]
        turns.append(turn)
    return _item(rng, "vqa", t, turns, turn_defects)


def _item(rng: random.Random, task: str, t: Truth, turns: list[Turn], turn_defects: dict[int, list[str]]) -> Item:
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
    kinds_all = KINDS[task]
    plain = [tu.question for tu in item.turns]

    def clean(kind: str) -> str:
        kind = kind if kind in kinds_all else rng.choice(kinds_all)
        return make_turn(kind, rng, t, short=task == "vqa").question

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
    if turn.short:  # one word right or wrong, or the right answer at length (ignoring the instruction)
        right = short_answer(kind, t, turn.probe)
        wrong = short_answer(kind, bad_color if kind == "color" else bad_shape, turn.probe, flip=kind == "yes_no")
        others = [answer(kind, rng, t, turn.probe), answer(kind, rng, t, turn.probe, "concise")]
        rng.shuffle(others)
        return [turn.answer, wrong if turn.answer == right else right] + others[: n - 2]
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


def caption(t: Truth, rng: random.Random) -> str:
    return rng.choice([f"{_a(t.color).capitalize()} {t.shape} on a light background.",
                       f"{_a(t.size).capitalize()} {t.color} {t.shape} in the {t.position} of the image.",
                       f"{_a(t.color).capitalize()} {t.shape}."])
