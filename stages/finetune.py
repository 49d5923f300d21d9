"""Stage `finetune`: LLaVA visual instruction tuning of the base MLLM on the curated set.

    python -m stages.finetune                      # one CPU or GPU
    accelerate launch -m stages.finetune           # many GPUs (or set base.launcher for dvc repro)
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import click

from align2llava.config import load_base, load_section
from align2llava.models.runtime import process_state
from align2llava.ops.clikit import CONTEXT, setup_logging, stage_options, user_errors
from align2llava.ops.tracking import stage_run
from align2llava.steps.finetune.train import FinetuneParams, finetune, write_steps_csv

log = logging.getLogger(__name__)


@click.command(context_settings=CONTEXT)
@stage_options("finetune")
@click.option("--data", type=click.Path(path_type=Path), default="data/restyle/curated.json", show_default=True, help="Training records (LLaVA JSON); images resolve under base.image_root.")
@click.option("--out-dir", metavar="DIR", type=click.Path(path_type=Path), default=Path("models/finetune"), show_default=True, help="Where the merged model is saved (HF layout).")
@click.option("--plots-dir", metavar="DIR", type=click.Path(path_type=Path), default=Path("plots/finetune"), show_default=True, help="Where steps.csv (step, loss) goes.")
def main(params_file: Path, metrics_dir: Path, verbose: bool, data: Path, out_dir: Path, plots_dir: Path) -> None:
    """Fine-tune base.base_model on DATA: loss on assistant turns only, LoRA or full.

    Checkpoints go to finetune.checkpoint_dir and an interrupted run resumes from the last one.
    Metrics: losses, train_seconds, tokens_per_second, peak memory -> metrics/finetune.json.
    """
    setup_logging(verbose)
    with user_errors():
        base = load_base(params_file)
        params = load_section("finetune", FinetuneParams, params_file)
        logged = {"base": base.model_dump(), "finetune": params.model_dump()}
        is_main = process_state().is_main_process  # under `accelerate launch`, one writes
        with stage_run("finetune", logged, metrics_dir=metrics_dir) if is_main else nullcontext() as run:
            result = finetune(
                params,
                base_model=base.base_model,
                data=data,
                image_root=base.image_root,
                out_dir=out_dir,
                dtype=base.dtype,
                on_step=(lambda step, values: run.log_step(values, step)) if is_main else None,
            )
            if is_main:
                write_steps_csv(result.steps, plots_dir / "steps.csv")
                run.log_metrics(result.metrics)
                log.info("model -> %s, loss curve -> %s", out_dir, plots_dir / "steps.csv")


if __name__ == "__main__":
    main()
