"""train-reward: the question RM f(I, Q) and the answer RM g(I, Q, A) on preference pairs.

Reads data/annotate_import/pairs.jsonl and the reward models' base (train_reward.base_model), writes
models/train_reward/{question,answer}/ (reloadable with align2llava.reward.load_reward_model),
plots/train_reward/{question,answer}.csv (step, loss, val_accuracy) and
metrics/train_reward.json. Several GPUs: `accelerate launch --num_processes N -m stages.train_reward`.
"""

from __future__ import annotations

import csv
import logging
from contextlib import nullcontext
from pathlib import Path

import click

from align2llava.config import load_base, load_section
from align2llava.models.runtime import process_state
from align2llava.ops.clikit import CONTEXT, setup_logging, stage_options, user_errors
from align2llava.ops.tracking import stage_run
from align2llava.steps.annotations.importer import read_pairs
from align2llava.steps.reward_training.train import TrainRewardParams, train_reward_model

log = logging.getLogger(__name__)


@click.command(context_settings=CONTEXT)
@stage_options("train_reward")
@click.option("--pairs", default="data/annotate_import/pairs.jsonl", show_default=True, type=click.Path(path_type=Path), help="Preference pairs from annotate-import.")
@click.option("--out-dir", metavar="DIR", default=Path("models/train_reward"), show_default=True, type=click.Path(path_type=Path), help="One sub-folder per reward model.")
@click.option("--plots-dir", metavar="DIR", default=Path("plots/train_reward"), show_default=True, type=click.Path(path_type=Path), help="Loss / accuracy curves, one CSV per reward model.")
def main(params_file: Path, metrics_dir: Path, verbose: bool, pairs: Path, out_dir: Path, plots_dir: Path) -> None:
    """Train the question and answer reward models (Bradley-Terry, LoRA or frozen LLM)."""
    setup_logging(verbose)
    with user_errors():
        base = load_base(params_file)
        p = load_section("train_reward", TrainRewardParams, params_file)
        data = read_pairs(pairs)
        is_main = process_state().is_main_process
        params = {"base": base.model_dump(), "train_reward": p.model_dump()}
        with stage_run("train_reward", params, metrics_dir=metrics_dir) if is_main else nullcontext() as run:
            for kind in p.kinds:
                def on_step(row: dict, kind: str = kind) -> None:  # main process only
                    run.log_step({f"{kind}_{k}": v for k, v in row.items() if k != "step" and v is not None},
                                 step=row["step"])

                res = train_reward_model(kind, data, p.base_model, p, image_root=base.image_root,
                                         seed=base.seed, out_dir=out_dir / kind,
                                         on_step=on_step if is_main else None)
                if not is_main:
                    continue
                plots_dir.mkdir(parents=True, exist_ok=True)
                with open(plots_dir / f"{kind}.csv", "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=["step", "loss", "val_accuracy"])
                    writer.writeheader()
                    writer.writerows(res.curve)
                run.log_metrics({
                    f"{kind}_val_pairwise_accuracy": res.val_accuracy,
                    f"{kind}_val_length_baseline_accuracy": res.val_length_baseline,
                    f"{kind}_train_pairs": res.train_pairs,
                    f"{kind}_corruption_pairs": res.augmented_pairs,
                    f"{kind}_val_pairs": res.val_pairs,
                    f"{kind}_steps": res.steps,
                    f"{kind}_final_loss": res.final_loss,
                    f"{kind}_train_seconds": round(res.seconds, 1),
                    f"{kind}_trainable_params": res.trainable_params,
                })
                log.info("%s RM: val pairwise accuracy %s (longer text wins: %s) on %s pairs; %d steps in %.0f s -> %s",
                         kind, _fmt(res.val_accuracy), _fmt(res.val_length_baseline), f"{res.val_pairs:,}",
                         res.steps, res.seconds, out_dir / kind)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    main()
