"""Why the demo's answer RM misses hallucinations: validation pairs by kind of conflict.

    python -m benchmarks.answer_rm_diagnosis                  # demo pairs, answer RM, base
    python -m benchmarks.answer_rm_diagnosis --limit 60       # quicker look

Demo world only (it knows the easy-vqa colour and shape words and reads the image's true
colour and shape from its pixels). Every validation answer pair is put in one class: `colour`
(chosen and rejected name different colours, or either asserts a colour the image does not
have), `shape` (the same for shapes), `yes/no` (one says yes, the other no) or `other`
(neither side gets the image wrong: style, omissions, generic answers). The first three need
the image to be told apart. For each class it prints the pair count and two pairwise
accuracies:

- `answer RM`: the trained answer reward model (what metrics/train_reward.json averages);
- `base LM`: the base MLLM's own log-likelihood of each answer, up to and including its first
  word that conflicts with the other answer, given the image and the question (chat
  template). It asks whether the base itself can tell which colour or shape the image shows in
  a question-answer context: an RM built on the base has no better eyes than that.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import click

from align2llava.demo.synthesis.world import COLORS, SHAPES, measure_image
from align2llava.demo.synthesis.writer import asserted_words
from align2llava.ops.clikit import setup_logging, user_errors

WORDS = {"colour": set(COLORS), "shape": set(SHAPES), "yes/no": {"yes", "no"}}
CLASSES = ("colour", "shape", "yes/no", "other")


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def conflict(chosen: str, rejected: str, shape: str | None = None, colour: str | None = None) -> str:
    """The pair's class; with the image's true shape and colour, one-sided mistakes count too."""
    a, b = _words(chosen), _words(rejected)
    asserted = asserted_words(chosen) | asserted_words(rejected)
    for name, true in (("colour", colour), ("shape", shape)):
        s = WORDS[name]
        if a & s and b & s and a & s != b & s:
            return name
        if true is not None and asserted & s - {true}:
            return name
    if ("yes" in a) != ("yes" in b):
        return "yes/no"
    return "other"


def _prefix_to_conflict(text: str, other: str, cls: str) -> str | None:
    """`text` up to and including its first word (of the class) that `other` lacks."""
    own = (_words(text) & WORDS[cls]) - _words(other)
    if not own:
        return None
    m = re.search(r"\b(" + "|".join(sorted(own)) + r")\b", text, re.IGNORECASE)
    return text[: m.end()] if m else None


def base_loglik(model: Any, processor: Any, image: Any, question: str, answer: str) -> float:
    """Sum of log p(answer tokens | image, question) under the base MLLM's chat template."""
    import torch

    from align2llava.models.chat import prompt_messages, render

    prompt = render(processor, prompt_messages(question), generation_prompt=True)
    n = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"].shape[1]
    enc = processor(text=[prompt + answer], images=[image], return_tensors="pt")
    with torch.inference_mode():
        logits = model(**enc).logits[0, n - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, enc["input_ids"][0, n:, None]).sum().item()


@click.command()
@click.option("--pairs", "pairs_file", default="data/annotate_import/pairs.jsonl", show_default=True, type=click.Path(path_type=Path))
@click.option("--answer-model", default="models/train_reward/answer", show_default=True, type=click.Path(path_type=Path))
@click.option("--base", "base_model", default="models/pretrain", show_default=True, type=click.Path(path_type=Path))
@click.option("--image-root", default="data/synthesize/images", show_default=True, type=click.Path(path_type=Path))
@click.option("--limit", type=int, default=None, help="At most this many validation pairs.")
def main(pairs_file: Path, answer_model: Path, base_model: Path, image_root: Path, limit: int | None) -> None:
    """Print answer-RM and base-LM pairwise accuracy per kind of conflict."""
    setup_logging()
    with user_errors():
        from align2llava.data.images import load_rgb
        from align2llava.models.loading import load_mllm
        from align2llava.models.reward_model import Encoder, load_reward_model, pair_text, score_items

        pairs = [json.loads(line) for line in pairs_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        val = [p for p in pairs if p["kind"] == "answer" and p["split"] == "val"][:limit]
        if not val:
            raise click.ClickException(f"{pairs_file}: no validation answer pairs")

        rm, processor, meta = load_reward_model(answer_model, backbone=base_model)
        enc = Encoder(processor, meta["max_length"], image_root)
        items = [(pair_text("answer", p["prompt"], text), p["image"]) for p in val for text in (p["chosen"], p["rejected"])]
        rewards = score_items(rm, enc, items, batch_size=32)
        del rm

        model, processor = load_mllm(base_model, dtype="float32")
        model.eval()
        rm_hits: dict[str, list[bool]] = defaultdict(list)
        lm_hits: dict[str, list[bool]] = defaultdict(list)
        truth = {im: measure_image(image_root / im)[:2] for im in sorted({p["image"] for p in val})}
        for i, p in enumerate(val):
            cls = conflict(p["chosen"], p["rejected"], *truth[p["image"]])
            rm_hits[cls].append(rewards[2 * i] > rewards[2 * i + 1])
            if cls == "other":
                continue
            a = _prefix_to_conflict(p["chosen"], p["rejected"], cls)
            b = _prefix_to_conflict(p["rejected"], p["chosen"], cls)
            if a is None or b is None:
                continue
            image = load_rgb(image_root / p["image"])
            question = p["prompt"]
            lm_hits[cls].append(base_loglik(model, processor, image, question, a)
                                > base_loglik(model, processor, image, question, b))

    def acc(hits: list[bool]) -> str:
        return f"{sum(hits) / len(hits):.3f} ({len(hits)})" if hits else "-"

    click.echo(f"{len(val)} validation answer pairs from {pairs_file}")
    click.echo(f"{'conflict':<8}  {'pairs':>5}  {'answer RM':>12}  {'base LM':>12}")
    for cls in CLASSES:
        click.echo(f"{cls:<8}  {len(rm_hits[cls]):>5}  {acc(rm_hits[cls]):>12}  {acc(lm_hits[cls]):>12}")
    every = [h for c in CLASSES for h in rm_hits[c]]
    click.echo(f"{'all':<8}  {len(every):>5}  {acc(every):>12}")


if __name__ == "__main__":
    main()
