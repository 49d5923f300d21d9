"""Can an MLLM say whether a named colour or shape is in the image? (Demo world only.)

    python -m benchmarks.presence_probe                         # models/instruct, 200 test images
    python -m benchmarks.presence_probe --model models/pretrain --images 100

Presence is what POPE and the benchmark's yes/no questions ask, and what the reward models would
need to catch the pool's wrong "Yes" answers. For each easy-vqa test image (the benchmark's; no
stage trains on them) one question about its colour and one about its shape, each about the
true word or, half the time, another word of its group, asked two ways: in the instruct stage's
own wording ("Is there a blue shape in the image?") and with the short-answer instruction of the
pool's vqa records. The model's answer is its reply's first token: log p(Yes) - log p(No), read
by the grounding term's word-margin code with the group {yes, no}. Printed per form: the AUROC of
that margin for present over absent (0.5: it does not look), and how often it says yes to each.
Then what the answer reward's grounding term reads of a bare "Yes" to the same questions: the
margin of the word the question names among its group (colours, shapes), read in a neutral
statement ("The image shows a blue"; steps/grounding.py, affirmed words), and its AUROC.

With --pool, also the pool's vqa turns answered "Yes" and the AUROC of the margin for the right
ones over the wrong ones (the demo oracle's wrong_yes_no): what a reward model built on this base
could see of that defect.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import click

from align2llava.ops.clikit import setup_logging, user_errors

FORMS = {"instruct wording": "", "short answer": "\nAnswer the question using a single word or phrase."}


@click.command()
@click.option("--model", "model_dir", default="models/instruct", show_default=True, type=click.Path(path_type=Path))
@click.option("--image-root", default="data/synthesize/images", show_default=True, type=click.Path(path_type=Path))
@click.option("--images", "n_images", default=200, show_default=True, type=click.IntRange(min=10))
@click.option("--pool", "pool_file", type=click.Path(path_type=Path), help="Also the pool's vqa 'Yes' answers (with --oracle).")
@click.option("--oracle", "oracle_file", default="data/synthesize/oracle.jsonl", show_default=True, type=click.Path(path_type=Path))
@click.option("--pool-answers", default=600, show_default=True, type=click.IntRange(min=1), help="The first N of them.")
@click.option("--seed", default=0, show_default=True)
def main(model_dir: Path, image_root: Path, n_images: int, pool_file: Path | None, oracle_file: Path,
         pool_answers: int, seed: int) -> None:
    """Print presence AUROC and yes ratios of MODEL's first reply token."""
    setup_logging()
    with user_errors():
        from align2llava.data.records import qa_pairs
        from align2llava.demo.diagnostics import read_oracle
        from align2llava.demo.synthesis.instruct_data import PRESENCE, _a
        from align2llava.demo.synthesis.world import COLORS, SHAPES, measure_image
        from align2llava.steps.evaluation.ranking import auroc
        from align2llava.steps.grounding import Grounding

        rng = random.Random(seed)
        tests = sorted((image_root / "test").glob("*.png"), key=lambda p: int(p.stem))
        if not tests:
            raise click.UsageError(f"{image_root / 'test'}: no easy-vqa test images (run the synthesize stage)")
        cases = []  # (image, question, present)
        for path in rng.sample(tests, min(n_images, len(tests))):
            shape, color, *_ = measure_image(path)
            # one wording of each kind from the instruct stage's own: "Is there a {x} shape in the
            # image?", "Does the image show {a_x}?"
            for words, true, template in ((COLORS, color, PRESENCE["color"][0]), (SHAPES, shape, PRESENCE["shape"][2])):
                present = rng.random() < 0.5
                x = true if present else rng.choice([w for w in words if w != true])
                q = template.format(x=x, a_x=_a(x))
                cases.append((str(path.relative_to(image_root)), q, present))
        ground = Grounding.load(model_dir, feature="word_margin", words={"answer": ["yes", "no"]},
                                image_root=image_root, dtype="float32")
        click.echo(f"{model_dir}: {len(cases)} presence questions on {min(n_images, len(tests))} test images")
        for form, suffix in FORMS.items():
            margins = ground.raw([(im, q + suffix, "Yes") for im, q, _ in cases])
            pos = [m for m, c in zip(margins, cases) if c[2]]
            neg = [m for m, c in zip(margins, cases) if not c[2]]
            click.echo(f"  {form:<17} AUROC present > absent {auroc(pos, neg):.3f}; says yes to present "
                       f"{sum(m > 0 for m in pos) / len(pos):.2f}, to absent {sum(m > 0 for m in neg) / len(neg):.2f}")
        term = Grounding(ground.model, ground.processor, feature="word_margin",
                         words={"color": list(COLORS), "shape": list(SHAPES)}, image_root=image_root)
        margins = term.raw([(im, q, "Yes") for im, q, _ in cases])
        pos = [m for m, c in zip(margins, cases) if c[2]]
        neg = [m for m, c in zip(margins, cases) if not c[2]]
        click.echo(f"  'Yes' as the term reads it: AUROC present > absent {auroc(pos, neg):.3f}; margin > 0 for present "
                   f"{sum(m > 0 for m in pos) / len(pos):.2f}, for absent {sum(m > 0 for m in neg) / len(neg):.2f}")
        if pool_file is not None:
            pool = json.loads(pool_file.read_text(encoding="utf-8"))
            oracle = read_oracle(oracle_file)
            items, wrong = [], []
            for rec in pool:
                if rec.get("task") != "vqa" or rec["id"] not in oracle:
                    continue
                bad = oracle[rec["id"]].get("turn_defects", {})
                for k, (q, a) in enumerate(qa_pairs(rec)):
                    if a.strip().lower() == "yes":
                        items.append((rec["image"], q, a))
                        wrong.append("wrong_yes_no" in bad.get(str(k), []))
            if not items:
                raise click.UsageError(f"{pool_file}: no vqa turn answered 'Yes'")
            items, wrong = items[:pool_answers], wrong[:pool_answers]
            for name, reader in (("first token", ground), ("term", term)):
                margins = reader.raw(items)
                right = [m for m, w in zip(margins, wrong) if not w]
                bad_m = [m for m, w in zip(margins, wrong) if w]
                click.echo(f"  pool vqa 'Yes' answers: {len(items)} ({len(bad_m)} wrong); AUROC right > wrong, "
                           f"{name}: {auroc(right, bad_m) if right and bad_m else float('nan'):.3f}")


if __name__ == "__main__":
    main()
