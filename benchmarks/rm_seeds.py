"""How much a reward model's validation accuracy moves with the training seed alone.

    python -m benchmarks.rm_seeds --kind answer --seeds 1,2      # ~5 min per seed on 2 CPU cores

Trains the reward model of `--kind` as train-reward does (params.yaml's train_reward section, the
committed pairs of annotate-import) once per seed, into a temporary folder, and prints each
seed's validation pairwise accuracy, the grounding term's fitted weight, and their mean and sample
std. The seed draws the corruption pairs, the batch order and the head's initialisation; the
validation pairs are annotate-import's and do not move, so the spread is the training's alone.
`dvc exp run -S base.seed=N` instead redraws the whole demo world (pool, annotations, images).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import click

from align2llava.ops.clikit import setup_logging, user_errors


@click.command()
@click.option("--kind", type=click.Choice(["question", "answer"]), default="answer", show_default=True)
@click.option("--seeds", default="1,2", show_default=True, help="Comma-separated training seeds.")
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(path_type=Path))
@click.option("--pairs", default="data/annotate_import/pairs.jsonl", show_default=True, type=click.Path(path_type=Path))
def main(kind: str, seeds: str, params_file: Path, pairs: Path) -> None:
    """Print KIND's validation pairwise accuracy for each training seed."""
    setup_logging()
    with user_errors():
        from align2llava.config import load_base, load_section
        from align2llava.models.reward_model import read_reward_config
        from align2llava.steps.annotations.importer import read_pairs
        from align2llava.steps.reward_training.train import TrainRewardParams, train_reward_model

        try:
            seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise click.BadParameter(f"{seeds!r}: expected comma-separated integers", param_hint="--seeds") from None
        base = load_base(params_file)
        params = load_section("train_reward", TrainRewardParams, params_file)
        data = read_pairs(pairs)
        accs = []
        for seed in seed_list:
            with tempfile.TemporaryDirectory() as out:
                res = train_reward_model(kind, data, params.base_model, params, image_root=base.image_root,
                                         seed=seed, out_dir=out)
                config = read_reward_config(out)
            weight = (config.get("grounding") or {}).get("weight")
            if res.val_accuracy is None:
                raise click.ClickException(f"{pairs}: no {kind} validation pairs")
            accs.append(res.val_accuracy)
            click.echo(f"seed {seed}: {kind} RM val pairwise accuracy {res.val_accuracy:.3f} on {res.val_pairs} pairs"
                       + (f", term weight {weight:.3f}" if isinstance(weight, float) else ""))
        if len(accs) > 1:
            click.echo(f"mean {statistics.mean(accs):.3f} +- {statistics.stdev(accs):.3f} (sample std, {len(accs)} seeds)")


if __name__ == "__main__":
    main()
