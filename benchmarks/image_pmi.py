"""Would the base's own image-grounded likelihood make a better answer reward? A design check.

    python -m benchmarks.image_pmi                        # models/train_reward/answer and its base
    python -m benchmarks.image_pmi --limit 200 --images 100

Demo world only. For every answer, the feature is its image PMI under the reward model's base
(the MLLM named in the answer RM's reward_config.json, with its own LM head, no LoRA): the mean
over the answer's tokens of log p(token | image, question, earlier tokens) minus the same without
the image, through the base's chat template. An answer that names what the image shows gains
from the image, one that names something else loses, an evasive one neither. No training.

The feature is `align2llava.steps.grounding` (train_reward.grounding: image_pmi); the answer
RM's reward here is the one `score` uses (its head, plus its own grounding term when it has one).

Printed: validation pairwise accuracy per kind of conflict (as `answer_rm_diagnosis`) of the
answer RM, of the PMI alone and of RM + w * PMI, with w chosen on the *training* pairs (the
weight that orders most of them right, from a fixed grid); the defect AUROC of the three on
the independent test pool of `benchmarks.test_pool_auroc`, and their paired accuracy there (clean
over defective for the same image and question); and, for every w of the grid, the
validation accuracy and test-pool AUROCs of RM + w * PMI (the trade-off a fixed weight makes).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import click

from align2llava.ops.clikit import setup_logging, user_errors

GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def _accuracy(pairs: list[tuple[int, int]], score: list[float]) -> float:
    return sum((score[c] > score[r]) + 0.5 * (score[c] == score[r]) for c, r in pairs) / max(1, len(pairs))


@click.command()
@click.option("--pairs", "pairs_file", default="data/annotate_import/pairs.jsonl", show_default=True, type=click.Path(path_type=Path))
@click.option("--answer-model", default="models/train_reward/answer", show_default=True, type=click.Path(path_type=Path))
@click.option("--image-root", default="data/synthesize/images", show_default=True, type=click.Path(path_type=Path))
@click.option("--limit", type=int, default=None, help="At most this many training pairs (validation: all).")
@click.option("--images", "n_images", default=200, show_default=True, help="Test-pool images (4 answers each).")
@click.option("--feature", type=click.Choice(["image_pmi", "word_margin"]), default="image_pmi", show_default=True,
              help="The grounding feature (steps.grounding); word_margin checks the demo world's colour and shape words.")
def main(pairs_file: Path, answer_model: Path, image_root: Path, limit: int | None, n_images: int, feature: str) -> None:
    """Print answer-RM, image-PMI and combined accuracy on the pairs and AUROC on the test pool."""
    setup_logging()
    with user_errors():
        from align2llava.demo.synthesis.world import COLORS, SHAPES, measure_image
        from align2llava.models.reward_model import (
            Encoder,
            answer_text,
            load_reward_model,
            read_reward_config,
            resolve_backbone,
            score_items,
        )
        from align2llava.steps.grounding import Grounding
        from benchmarks.answer_rm_diagnosis import CLASSES, conflict
        from benchmarks.test_pool_auroc import defect_auroc, paired_accuracy, read_test_images, write_test_pool

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
        ground = Grounding.load(base, feature=feature, words={"color": COLORS, "shape": SHAPES},
                                image_root=image_root, dtype="float32")
        feat = ground.raw(items)
        ground.image_root = None  # the test pool's images are absolute paths
        feat_pool = ground.raw([(str(r.image), r.question, r.answer) for r in pool])
        own = float((meta.get("grounding") or {}).get("weight") or 0.0)
        if own and (meta.get("grounding") or {}).get("feature") != feature:
            raise click.UsageError(f"{answer_model} has a {meta['grounding']['feature']} grounding term; pass that --feature")
        if own:  # the RM's own grounding term, as score adds it
            rm_scores = [a + own * b for a, b in zip(rm_scores, feat)]
            rm_pool = [a + own * b for a, b in zip(rm_pool, feat_pool)]

    f, combo = ("image PMI", "RM + w PMI") if feature == "image_pmi" else ("word margin", "RM + w margin")
    best = max(GRID, key=lambda w: (_accuracy(index["train"], [a + w * b for a, b in zip(rm_scores, feat)]), -w))
    combined = [a + best * b for a, b in zip(rm_scores, feat)]
    truth_of = {im: measure_image(image_root / im)[:2] for im in {p["image"] for p in val}}
    classes: dict[str, list[int]] = defaultdict(list)
    for k, p in enumerate(val):
        classes[conflict(p["chosen"], p["rejected"], *truth_of[p["image"]])].append(k)
    click.echo(f"answer RM {answer_model} (base {base}; its own grounding weight {own:g}); w = {best} chosen on {len(train)} training pairs "
               f"(training accuracy RM {_accuracy(index['train'], rm_scores):.3f}, combined "
               f"{_accuracy(index['train'], combined):.3f})")
    click.echo(f"{'validation':<10}  {'pairs':>5}  {'answer RM':>9}  {f:>11}  {combo:>13}")
    for cls in (*CLASSES, "all"):
        ks = list(range(len(val))) if cls == "all" else classes[cls]
        ps = [index["val"][k] for k in ks]
        click.echo(f"{cls:<10}  {len(ps):>5}  {_accuracy(ps, rm_scores):>9.3f}  {_accuracy(ps, feat):>11.3f}  "
                   f"{_accuracy(ps, combined):>13.3f}")
    click.echo(f"test pool ({len(pool)} answers on {len(images)} easy-vqa test images): defect AUROC")
    scored = {"answer RM": rm_pool, f: feat_pool,
              combo: [a + best * b for a, b in zip(rm_pool, feat_pool)]}
    aurocs = {name: defect_auroc(pool, s) for name, s in scored.items()}
    for d in aurocs["answer RM"]:
        click.echo(f"{d:<20}  " + "  ".join(f"{name} {aurocs[name][d]:.3f}" for name in scored))
    click.echo("test pool, same image and question: how often the clean answer outscores the defective one")
    paired = {name: paired_accuracy(pool, s) for name, s in scored.items()}
    for d in paired["answer RM"]:
        click.echo(f"{d:<20}  " + "  ".join(f"{name} {paired[name][d]:.3f}" for name in scored))
    defects = list(aurocs["answer RM"])
    click.echo(f"{combo} for every w of the grid: training / validation pair accuracy, test-pool AUROC")
    click.echo(f"{'w':>6}  {'train':>6}  {'val':>6}  " + "  ".join(f"{d:>18}" for d in defects))
    for w in GRID:
        pairs = [a + w * b for a, b in zip(rm_scores, feat)]
        auc = defect_auroc(pool, [a + w * b for a, b in zip(rm_pool, feat_pool)])
        click.echo(f"{w:>6g}  {_accuracy(index['train'], pairs):>6.3f}  {_accuracy(index['val'], pairs):>6.3f}  "
                   + "  ".join(f"{auc[d]:>18.3f}" for d in defects))


if __name__ == "__main__":
    main()
