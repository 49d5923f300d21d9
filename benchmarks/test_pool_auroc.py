"""Do the reward models find defects written in a way no training record was? Defect AUROC on an
independent test pool.

    python -m benchmarks.test_pool_auroc                          # models/train_reward, 200 images
    python -m benchmarks.test_pool_auroc --images 100 --answer-model DIR --question-model DIR

Demo world only. The pool here is written by this script, not by the demo's writer
(`demo.synthesis.writer`) nor by the instruct stage's data (`demo.synthesis.instruct_data`): its
own questions, its own sentence forms (the fact at other places in the sentence), its own defect
wordings, on easy-vqa *test* images (no reward model, caption or instruction record uses one).
Per image it writes one clean record and one of each defect:

- `hallucinated_color` / `hallucinated_shape`: the same answer form naming a colour (shape) the
  image does not have, drawn uniformly (not from a text-only writer's prior);
- `evasive`: an answer that avoids the question ("Hard to say from this picture alone.");
- `generic_question`: a question that asks nothing about this image, with a vague answer
  (scored by the question RM).

It prints, per defect, the AUROC of the clean records' scores over the defective ones (1.0: every
clean answer scores above every defective one; 0.5: chance), the answer RM for answer defects
and the question RM for the generic questions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import click

from align2llava.demo.synthesis.world import COLORS, SHAPES
from align2llava.ops.clikit import setup_logging, user_errors

# Question, then answer forms; {c} colour, {s} shape, {a_s} "a circle". None of these sentences is
# a template of the demo writer or of instruct_data (tests/test_benchmarks.py checks).
FORMS = (
    ("How would you characterise the figure in this picture?", "What we have here is {a_c} {s}, drawn flat."),
    ("Which hue does the figure have?", "To my eye the figure's hue is {c}, and its outline is that of {a_s}."),
    ("What geometric form can be seen?", "Geometrically speaking it is {a_s}; its fill is {c}."),
    ("Could you summarise the picture for me?", "A lone {c} {s} sits on an otherwise empty canvas."),
    ("What is the main object and what does it look like?", "The main object: {a_s}, painted {c}."),
    ("Describe the figure's colour and form.", "Its colour is {c} and its form is that of {a_s}."),
)
EVASIVE = ("Hard to say from this picture alone.", "I would rather not guess what it is.",
           "That depends on how you look at it.", "It could be many things, really.")
GENERIC = (("What mood does this evoke?", "It evokes a calm and neutral mood."),
           ("Why might someone make such a picture?", "Perhaps as a simple exercise or illustration."),
           ("What is interesting about this?", "Its simplicity is what makes it interesting."))
DEFECTS = ("hallucinated_color", "hallucinated_shape", "evasive", "generic_question")


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _fill(answer: str, color: str, shape: str) -> str:
    return answer.format(c=color, s=shape, a_s=_a(shape), a_c=_a(color))


@dataclass(frozen=True)
class Record:
    image: Path
    question: str
    answer: str
    defect: str | None  # None: clean


def write_test_pool(images: dict[int, Path], truth: dict[int, tuple[str, str]], n: int, seed: int) -> list[Record]:
    """One clean record and one per defect for each of `n` sampled images ({id: (shape, colour)})."""
    rng = random.Random(f"{seed}:test-pool")
    out = []
    for i in sorted(rng.sample(sorted(truth), min(n, len(truth)))):
        shape, color = truth[i]
        q, form = rng.choice(FORMS)
        wrong_c = rng.choice([c for c in COLORS if c != color])
        wrong_s = rng.choice([s for s in SHAPES if s != shape])
        gq, ga = rng.choice(GENERIC)
        out += [Record(images[i], q, _fill(form, color, shape), None),
                Record(images[i], q, _fill(form, wrong_c, shape), "hallucinated_color"),
                Record(images[i], q, _fill(form, color, wrong_s), "hallucinated_shape"),
                Record(images[i], q, rng.choice(EVASIVE), "evasive"),
                Record(images[i], gq, ga, "generic_question")]
    return out


def read_test_images(limit: int, seed: int) -> tuple[dict[int, Path], dict[int, tuple[str, str]]]:
    """easy-vqa test images and their (shape, colour), read from the pixels, `limit` sampled."""
    from align2llava.demo.synthesis.world import easy_vqa_dir, measure_image, read_split

    images, _ = read_split(easy_vqa_dir(), "test")
    ids = sorted(random.Random(f"{seed}:test-pool:images").sample(sorted(images), min(limit, len(images))))
    return {i: images[i] for i in ids}, {i: measure_image(images[i])[:2] for i in ids}


def defect_auroc(records: list[Record], scores: list[float]) -> dict[str, float]:
    from align2llava.steps.evaluation.ranking import auroc

    clean = [s for r, s in zip(records, scores) if r.defect is None]
    return {d: auroc(clean, [s for r, s in zip(records, scores) if r.defect == d])
            for d in DEFECTS if any(r.defect == d for r in records)}


def paired_accuracy(records: list[Record], scores: list[float]) -> dict[str, float]:
    """Per defect: how often the clean answer outscores the defective one written for the same
    image and question (ties count half). Unlike `defect_auroc` it compares no two images."""
    clean = {(str(r.image), r.question): s for r, s in zip(records, scores) if r.defect is None}
    wins: dict[str, list[float]] = {}
    for r, s in zip(records, scores):
        c = clean.get((str(r.image), r.question))
        if r.defect is not None and c is not None:
            wins.setdefault(r.defect, []).append((c > s) + 0.5 * (c == s))
    return {d: sum(w) / len(w) for d, w in wins.items()}


@click.command()
@click.option("--question-model", default="models/train_reward/question", show_default=True, type=click.Path(path_type=Path))
@click.option("--answer-model", default="models/train_reward/answer", show_default=True, type=click.Path(path_type=Path))
@click.option("--images", "n_images", default=200, show_default=True, help="Test images (5 records each).")
@click.option("--seed", default=0, show_default=True)
def main(question_model: Path, answer_model: Path, n_images: int, seed: int) -> None:
    """Print the reward models' defect AUROC on an independently written test pool."""
    setup_logging()
    with user_errors():
        from align2llava.models.reward_model import (
            Encoder,
            load_reward_model,
            pair_text,
            question_text,
            score_items,
        )
        from align2llava.steps.grounding import load_grounding

        images, truth = read_test_images(n_images, seed)
        records = write_test_pool(images, truth, n_images, seed)
        scores: dict[str, list[float]] = {}
        for kind, path in (("answer", answer_model), ("question", question_model)):
            rm, processor, meta = load_reward_model(path, dtype="float32")
            enc = Encoder(processor, meta["max_length"], None)
            items = [(pair_text("answer", r.question, r.answer) if kind == "answer" else question_text(r.question),
                      str(r.image)) for r in records]
            scores[kind] = score_items(rm, enc, items, batch_size=32)
            del rm
            grounding = load_grounding(path, meta, dtype="float32") if kind == "answer" else None
            if grounding is not None:  # the answer reward's grounding term, as score adds it
                extra = grounding([(str(r.image), r.question, r.answer) for r in records])
                scores[kind] = [s + g for s, g in zip(scores[kind], extra)]
                del grounding
    answer = defect_auroc([r for r in records if r.defect != "generic_question"],
                          [s for r, s in zip(records, scores["answer"]) if r.defect != "generic_question"])
    question = defect_auroc([r for r in records if r.defect in (None, "generic_question")],
                            [s for r, s in zip(records, scores["question"]) if r.defect in (None, "generic_question")])
    click.echo(f"test pool: {len(records)} records on {len(images)} easy-vqa test images (seed {seed})")
    click.echo(f"{'defect':<20}  {'RM':<8}  AUROC (clean over defective; 0.5 chance)")
    for d, v in answer.items():
        click.echo(f"{d:<20}  {'answer':<8}  {v:.3f}")
    for d, v in question.items():
        click.echo(f"{d:<20}  {'question':<8}  {v:.3f}")


if __name__ == "__main__":
    main()
