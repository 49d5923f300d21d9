"""Would the base's own image-grounded likelihood make a better answer reward? A design check.

    python -m benchmarks.image_pmi                        # models/train_reward/answer and its base
    python -m benchmarks.image_pmi --limit 200 --images 100

Demo world only. For every answer, the feature is its image PMI under the reward model's base
(the MLLM named in the answer RM's reward_config.json, with its own LM head, no LoRA): the mean
over the answer's tokens of log p(token | image, question, earlier tokens) minus the same without
the image, through the base's chat template. An answer that names what the image shows gains
from the image, one that names something else loses, an evasive one neither. No training.

Printed: validation pairwise accuracy per kind of conflict (as `answer_rm_diagnosis`) of the
answer RM, of the PMI alone and of RM + w * PMI, with w chosen on the *training* pairs (the
weight that orders most of them right, from a fixed grid); and the defect AUROC of the three on
the independent test pool of `benchmarks.test_pool_auroc`.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import click

from align2llava.ops.clikit import setup_logging, user_errors

GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


class _Item:
    def __init__(self, id: str, question: str, image: str | None):
        self.id, self.question, self.image = id, question, image


def image_pmi(model: Any, processor: Any, items: list[tuple[str, str, str]], image_root: Path | None,
              batch_size: int = 16) -> list[float]:
    """Mean per-token image PMI of each (image, question, answer)."""
    from align2llava.progress import Progress
    from align2llava.steps.evaluation.likelihood import _Scorer, continuation_ids

    scorer = _Scorer(model, processor)
    out: list[float] = []
    progress = Progress(len(items), "image PMI", "answers", logging.getLogger(__name__))
    for s in range(0, len(items), batch_size):
        chunk = items[s: s + batch_size]
        sums = []
        for with_image in (True, False):
            batch = [_Item(str(k), q, im if with_image else None) for k, (im, q, _) in enumerate(chunk)]
            conts = [continuation_ids(processor, q, a, image=with_image, span="start") for _, q, a in chunk]
            sums.append([row[0] for row in scorer.score(batch, conts, image_root=image_root, instruction="")])
            if with_image:
                lengths = [len(c) for c in conts]
        out += [(a - b) / n for a, b, n in zip(sums[0], sums[1], lengths)]
        progress.update(len(chunk))
    progress.close()
    return out


def _accuracy(pairs: list[tuple[int, int]], score: list[float]) -> float:
    return sum((score[c] > score[r]) + 0.5 * (score[c] == score[r]) for c, r in pairs) / max(1, len(pairs))


@click.command()
@click.option("--pairs", "pairs_file", default="data/annotate_import/pairs.jsonl", show_default=True, type=click.Path(path_type=Path))
@click.option("--answer-model", default="models/train_reward/answer", show_default=True, type=click.Path(path_type=Path))
@click.option("--image-root", default="data/synthesize/images", show_default=True, type=click.Path(path_type=Path))
@click.option("--limit", type=int, default=None, help="At most this many training pairs (validation: all).")
@click.option("--images", "n_images", default=200, show_default=True, help="Test-pool images (4 answers each).")
def main(pairs_file: Path, answer_model: Path, image_root: Path, limit: int | None, n_images: int) -> None:
    """Print answer-RM, image-PMI and combined accuracy on the pairs and AUROC on the test pool."""
    setup_logging()
    with user_errors():
        from align2llava.demo.synthesis.world import measure_image
        from align2llava.models.loading import load_mllm
        from align2llava.models.reward_model import (
            Encoder,
            answer_text,
            load_reward_model,
            read_reward_config,
            resolve_backbone,
            score_items,
        )
        from benchmarks.answer_rm_diagnosis import CLASSES, conflict
        from benchmarks.test_pool_auroc import defect_auroc, read_test_images, write_test_pool

        rows = [json.loads(line) for line in pairs_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        answer = [p for p in rows if p["kind"] == "answer"]
        train = [p for p in answer if p["split"] == "train"][:limit]
        val = [p for p in answer if p["split"] == "val"]
        if not train or not val:
            raise click.ClickException(f"{pairs_file}: needs training and validation answer pairs")
        texts: dict[tuple[str, str, str], int] = {}
        index: dict[str, list[tuple[int, int]]] = {"train": [], "val": []}
        for split, ps in (("train", train), ("val", val)):
            for p in ps:
                ids = [texts.setdefault((p["image"], p["prompt"], t), len(texts)) for t in (p["chosen"], p["rejected"])]
                index[split].append((ids[0], ids[1]))
        items = list(texts)
        images, truth = read_test_images(n_images, 0)
        pool = [r for r in write_test_pool(images, truth, n_images, 0) if r.defect != "generic_question"]

        rm, processor, meta = load_reward_model(answer_model, dtype="float32")
        enc = Encoder(processor, meta["max_length"], image_root)
        rm_scores = score_items(rm, enc, [(answer_text(q, a), im) for im, q, a in items], batch_size=32)
        enc_abs = Encoder(processor, meta["max_length"], None)
        rm_pool = score_items(rm, enc_abs, [(answer_text(r.question, r.answer), str(r.image)) for r in pool], batch_size=32)
        del rm
        base = resolve_backbone(answer_model, read_reward_config(answer_model))
        model, processor = load_mllm(base, dtype="float32")
        model.eval()
        pmi = image_pmi(model, processor, items, image_root)
        pmi_pool = image_pmi(model, processor, [(str(r.image), r.question, r.answer) for r in pool], None)

    best = max(GRID, key=lambda w: (_accuracy(index["train"], [a + w * b for a, b in zip(rm_scores, pmi)]), -w))
    combined = [a + best * b for a, b in zip(rm_scores, pmi)]
    truth_of = {im: measure_image(image_root / im)[:2] for im in {p["image"] for p in val}}
    classes: dict[str, list[int]] = defaultdict(list)
    for k, p in enumerate(val):
        classes[conflict(p["chosen"], p["rejected"], *truth_of[p["image"]])].append(k)
    click.echo(f"answer RM {answer_model} (base {base}); w = {best} chosen on {len(train)} training pairs "
               f"(training accuracy RM {_accuracy(index['train'], rm_scores):.3f}, combined "
               f"{_accuracy(index['train'], combined):.3f})")
    click.echo(f"{'validation':<10}  {'pairs':>5}  {'answer RM':>9}  {'image PMI':>9}  {'RM + w PMI':>10}")
    for cls in (*CLASSES, "all"):
        ks = list(range(len(val))) if cls == "all" else classes[cls]
        ps = [index["val"][k] for k in ks]
        click.echo(f"{cls:<10}  {len(ps):>5}  {_accuracy(ps, rm_scores):>9.3f}  {_accuracy(ps, pmi):>9.3f}  "
                   f"{_accuracy(ps, combined):>10.3f}")
    click.echo(f"test pool ({len(pool)} answers on {len(images)} easy-vqa test images): defect AUROC")
    scored = {"answer RM": rm_pool, "image PMI": pmi_pool,
              "RM + w PMI": [a + best * b for a, b in zip(rm_pool, pmi_pool)]}
    aurocs = {name: defect_auroc(pool, s) for name, s in scored.items()}
    for d in aurocs["answer RM"]:
        click.echo(f"{d:<20}  " + "  ".join(f"{name} {aurocs[name][d]:.3f}" for name in scored))


if __name__ == "__main__":
    main()
