"""Does the base MLLM carry the image's colour and shape into the reward models' text positions?

    python -m benchmarks.grounding_probe                    # models/pretrain, 400 pool images
    python -m benchmarks.grounding_probe --base DIR --images 200

Demo world only. Each pool image is put through the base's LLM in the answer RM's input format
(image, a "Question:" line, an "Answer:" line that names no colour or shape), and linear probes
(ridge regression, one-vs-rest, trained on 70% of the images, tested on the rest) read the
image's true colour (8 classes) and shape (3) from the hidden states entering each of several
LLM layers: the mean over the image tokens, and the last token (where the reward head reads).
High last-token accuracy at the RM's first adapted layer means the image's content is there for
the adapted layers to compare with the answer's words; chance is 0.125 (colour), 0.333 (shape).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from align2llava.ops.clikit import setup_logging, user_errors

TEXT = "Question: What is shown in the image?\nAnswer: The image shows"


def ridge_accuracy(x, y, classes: int, train_share: float = 0.7, lam: float = 10.0) -> float:
    """Held-out accuracy of a one-vs-rest ridge probe (features standardised on all rows)."""
    import numpy as np

    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    n = int(len(x) * train_share)
    targets = np.eye(classes)[y[:n]]
    w = np.linalg.solve(x[:n].T @ x[:n] + lam * np.eye(x.shape[1]), x[:n].T @ targets)
    return float(((x[n:] @ w).argmax(1) == y[n:]).mean())


@click.command()
@click.option("--base", "base_model", default="models/pretrain", show_default=True, type=click.Path(path_type=Path))
@click.option("--pool", "pool_file", default="data/synthesize/pool.json", show_default=True, type=click.Path(path_type=Path))
@click.option("--image-root", default="data/synthesize/images", show_default=True, type=click.Path(path_type=Path))
@click.option("--images", "n_images", default=400, show_default=True, type=click.IntRange(min=20))
@click.option("--layers", default="0,8,16,22,26,30", show_default=True, help="Comma-separated layer indices (hidden states entering them; the last = the output).")
def main(base_model: Path, pool_file: Path, image_root: Path, n_images: int, layers: str) -> None:
    """Print probe accuracy for colour and shape per layer and position."""
    setup_logging()
    with user_errors():
        import numpy as np
        import torch

        from align2llava.demo.synthesis.world import COLORS, SHAPES, measure_image
        from align2llava.models.loading import load_mllm
        from align2llava.models.reward_model import Encoder

        images = sorted({r["image"] for r in json.loads(pool_file.read_text(encoding="utf-8")) if r.get("image")})
        images = images[:n_images]
        model, processor = load_mllm(base_model, dtype="float32")
        model.eval()
        n_layers = len(model.model.language_model.layers)
        wanted = [int(v) for v in layers.split(",")]
        if any(not 0 <= k <= n_layers for k in wanted):
            raise click.ClickException(f"--layers: the LLM has layers 0..{n_layers - 1} (and {n_layers}, its output)")
        enc = Encoder(processor, 256, image_root)
        feats: dict[tuple[int, str], list] = {(k, w): [] for k in wanted for w in ("image", "last")}
        with torch.inference_mode():
            for s in range(0, len(images), 32):
                chunk = images[s : s + 32]
                batch = enc.batch([(enc.ids(TEXT, True), im) for im in chunk])
                hidden = model.model(**batch, output_hidden_states=True).hidden_states
                is_image = (batch["input_ids"] == enc.image_token_id)[..., None]
                for k in wanted:
                    feats[(k, "image")].append(((hidden[k] * is_image).sum(1) / is_image.sum(1)).numpy())
                    feats[(k, "last")].append(hidden[k][:, -1].numpy())
        truth = [measure_image(image_root / im) for im in images]
        colour = np.array([COLORS.index(t[1]) for t in truth])
        shape = np.array([SHAPES.index(t[0]) for t in truth])

    click.echo(f"{len(images)} pool images, {base_model}; probe accuracy on {len(images) - int(len(images) * 0.7)} held out")
    click.echo(f"{'layer':>5}  {'image tokens: colour':>20}  {'shape':>5}  {'last token: colour':>18}  {'shape':>5}")
    for k in wanted:
        row = [ridge_accuracy(np.concatenate(feats[(k, w)]), y, n)
               for w in ("image", "last") for y, n in ((colour, len(COLORS)), (shape, len(SHAPES)))]
        click.echo(f"{k:>5}  {row[0]:>20.2f}  {row[1]:>5.2f}  {row[2]:>18.2f}  {row[3]:>5.2f}")


if __name__ == "__main__":
    main()
