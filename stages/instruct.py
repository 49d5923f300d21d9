"""Stage `instruct`: the demo's instruction-tuned MLLM that the reward models start from.

Writes models/instruct/ (HF layout). The paper's reward models start from an instruction-tuned
LLaVA; with your own (already instruction-tuned) checkpoint set instruct.checkpoint to it and
this stage passes it through. Demo world only otherwise: it reads the demo's files (--data,
--pool, --image-root), never base.pool, so your pool is not an input of it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from align2llava.config import load_base, load_section
from align2llava.demo.instruct import InstructParams, instruct
from align2llava.ops.clikit import CONTEXT, setup_logging, stage_options, user_errors
from align2llava.ops.tracking import stage_run
from align2llava.steps.finetune.train import write_steps_csv

log = logging.getLogger(__name__)


@click.command(context_settings=CONTEXT)
@stage_options("instruct")
@click.option("--data", type=click.Path(path_type=Path), default=Path("data/synthesize/instruct.json"),
              show_default=True, help="Instruction records (LLaVA JSON); images resolve under base.image_root.")
@click.option("--pool", type=click.Path(path_type=Path), default=Path("data/synthesize/pool.json"), show_default=True,
              help="The demo pool whose answers the grounding check reads (held out from DATA).")
@click.option("--image-root", type=click.Path(path_type=Path), default=Path("data/synthesize/images"),
              show_default=True, help="Folder the images of DATA and the pool are relative to.")
@click.option("--out-dir", metavar="DIR", type=click.Path(path_type=Path), default=Path("models/instruct"),
              show_default=True, help="Where the merged model is saved (HF layout).")
@click.option("--plots-dir", metavar="DIR", type=click.Path(path_type=Path), default=Path("plots/instruct"),
              show_default=True, help="Where steps.csv (step, loss) goes.")
def main(params_file: Path, metrics_dir: Path, verbose: bool, data: Path, pool: Path, image_root: Path, out_dir: Path,
         plots_dir: Path) -> None:
    """Instruction-tune base.base_model on DATA (or pass instruct.checkpoint through)."""
    setup_logging(verbose)
    with user_errors():
        base = load_base(params_file)
        params = load_section("instruct", InstructParams, params_file)
        logged = {"base": base.model_dump(), "instruct": params.model_dump()}
        with stage_run("instruct", logged, metrics_dir=metrics_dir) as run:
            m, steps = instruct(params, base_model=base.base_model, data=data, pool=pool, image_root=image_root,
                                out_dir=out_dir, seed=base.seed, dtype=base.dtype,
                                on_step=lambda step, values: run.log_step(values, step))
            write_steps_csv(steps, plots_dir / "steps.csv")  # a passed-through model: the header only
            run.log_metrics(m)
    log.info("model -> %s in %.0f s", out_dir, m["seconds"])


if __name__ == "__main__":
    main()
