"""Scoring throughput: batched with length bucketing vs one record at a time, same records.

    python -m benchmarks.score_throughput                 # the demo's reward models and pool
    python -m benchmarks.score_throughput --records 256 --batch-size 64
    python -m benchmarks.score_throughput --tiny          # tiny random models, a quick check

Prints records/s and items/s (one item = one reward-model forward of one text) for both ways,
the speed-up, and the largest score difference between them: float noise in float32 (score.dtype
auto on a CPU); with bf16 matmuls (auto on a GPU, or mixed / bfloat16) padding and batch
composition move scores by more (up to 0.17 on the demo, where scores have a standard deviation
of ~2). benchmarks/precision_spread.py compares thread counts.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click

from align2llava.ops.clikit import setup_logging, user_errors


def _tiny_setup(tmp: Path) -> tuple[Path, Path, Path, list[dict]]:
    import torch

    from align2llava.models.build import build_tiny_llava, llava_record, make_image
    from align2llava.models.reward_model import save_reward_model
    from align2llava.steps.reward_training.train import TrainRewardParams, build_reward_model

    base = build_tiny_llava(tmp / "base")
    params = TrainRewardParams(lora_r=4, lora_alpha=8, layers_to_transform=[-1], train_projector=False,
                               dtype="float32", max_length=96)
    for kind in ("question", "answer"):
        rm, _ = build_reward_model(base, params)
        torch.nn.init.normal_(rm.head.weight)
        save_reward_model(rm, tmp / kind, kind=kind, backbone=str(base), max_length=96)
    root = tmp / "images"
    make_image(root / "a.png")
    words = ["the", "red", "circle", "sits", "near", "the", "top", "left", "corner", "of", "the", "light", "image"]
    recs = [llava_record(f"r{i}", "a.png", turns=[("What is shown?", " ".join(words[: 3 + i % 10]))] * (1 + i % 3))
            for i in range(64)]
    return tmp / "question", tmp / "answer", root, recs


@click.command()
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(path_type=Path))
@click.option("--records", "n", default=128, show_default=True, help="Pool records to score (from the start of the pool).")
@click.option("--batch-size", type=int, default=None, help="Batched run's batch size (default: score.batch_size).")
@click.option("--tiny", is_flag=True, help="Tiny random models and a synthetic pool (quick check).")
def main(params_file: Path, n: int, batch_size: int | None, tiny: bool) -> None:
    """Print scoring throughput batched vs one record at a time."""
    setup_logging()
    with user_errors():
        import torch

        from align2llava.config import load_base, load_section
        from align2llava.steps.scoring import ScoreParams, load_pool, load_reward_models, score_records

        tmp = tempfile.TemporaryDirectory()
        if tiny:
            qdir, adir, root, recs = _tiny_setup(Path(tmp.name))
            dtype, bs = "float32", batch_size or 32
        else:
            base = load_base(params_file)
            p = load_section("score", ScoreParams, params_file)
            qdir, adir, root = Path(p.question_model), Path(p.answer_model), Path(base.image_root)
            recs, _, _ = load_pool(base.pool, root, 1.0, decode_images=False)
            dtype, bs = p.dtype, batch_size or p.batch_size
        recs = recs[:n]
        models = load_reward_models(qdir, adir, image_root=root, dtype=dtype)
        items = sum(1 + sum(len(t) for t in _turns(r)) for r in recs)
        score_records(models, recs[:2], bs)  # warm-up

        t = time.perf_counter()
        batched = score_records(models, recs, bs)
        tb = time.perf_counter() - t
        t = time.perf_counter()
        single = [score_records(models, [r], 1)[0] for r in recs]
        ts = time.perf_counter() - t

        diff = max(max(abs(a["question_score"] - b["question_score"]), abs(a["answer_score"] - b["answer_score"]))
                   for a, b in zip(batched, single))
        click.echo(f"{len(recs)} records, {items} reward-model items, torch threads {torch.get_num_threads()}, "
                   f"score.dtype {dtype}: weights {next(models.answer.parameters()).dtype}, "
                   f"autocast {models.answer.autocast_dtype}")
        click.echo(f"batched (batch {bs}, length-bucketed): {tb:7.2f} s  {len(recs) / tb:8.1f} rec/s  {items / tb:8.1f} items/s")
        click.echo(f"one record at a time:                {ts:7.2f} s  {len(recs) / ts:8.1f} rec/s  {items / ts:8.1f} items/s")
        click.echo(f"speed-up x{ts / tb:.1f}; largest score difference {diff:.2e}")
        tmp.cleanup()


def _turns(rec: dict) -> list:
    from align2llava.steps.scoring import record_items

    return record_items(rec)[1]


if __name__ == "__main__":
    main()
