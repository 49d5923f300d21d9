"""Stage `evaluate`: the fine-tuned model on the demo benchmark, the POPE probe and, when
`evaluate.eval_file` is set, a user eval file in LLaVA format with gold answers."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from align2llava.config import load_base, load_section
from align2llava.data.io import write_jsonl
from align2llava.data.rejects import Rejects
from align2llava.ops.clikit import CONTEXT, setup_logging, stage_options, user_errors
from align2llava.ops.tracking import stage_run
from align2llava.steps.evaluation.evaluation import EvaluateParams, evaluate

log = logging.getLogger(__name__)


@click.command(context_settings=CONTEXT)
@stage_options("evaluate")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default="models/finetune", show_default=True, help="The model to evaluate (HF layout).")
@click.option("--eval-file", type=click.Path(path_type=Path), help="A LLaVA-format file with gold answers (overrides evaluate.eval_file).")
@click.option("--out-dir", metavar="DIR", type=click.Path(path_type=Path), default=Path("data/evaluate"), show_default=True, help="Where predictions.jsonl and rejects.jsonl go.")
def main(params_file: Path, metrics_dir: Path, verbose: bool, model_dir: Path, eval_file: Path | None, out_dir: Path) -> None:
    """Answer every benchmark question with batched greedy generation and score the answers;
    with evaluate.likelihood, also rank each benchmark and POPE question's candidate answers by
    the model's log-likelihood of replying them (evaluate.reply_format; not for a user file).

    Metrics: benchmark_accuracy (+ per type), pope_accuracy/f1/yes_ratio,
    benchmark_likelihood_accuracy (+ per type), pope_likelihood_accuracy/f1/yes_ratio, and
    eval_exact_match, eval_vqa_accuracy for a user file -> metrics/evaluate.json; answers,
    likelihood_choice and likelihood_scores -> predictions.jsonl.
    """
    setup_logging(verbose)
    with user_errors():
        base = load_base(params_file)
        params = load_section("evaluate", EvaluateParams, params_file)
        if eval_file is not None:
            params = params.model_copy(update={"eval_file": str(eval_file)})
        logged = {"base": base.model_dump(), "evaluate": params.model_dump()}
        with stage_run("evaluate", logged, metrics_dir=metrics_dir) as run:
            result = evaluate(params, model_dir=model_dir, image_root=base.image_root, dtype=base.dtype)
            write_jsonl(result.predictions, out_dir / "predictions.jsonl")
            (result.rejects or Rejects(str(params.eval_file), params.reject_budget)).write(out_dir / "rejects.jsonl")
            run.log_metrics(result.metrics)
    shown = {k: v for k, v in result.metrics.items() if k.endswith(("accuracy", "f1", "yes_ratio", "match"))}
    log.info("predictions -> %s; %s", out_dir / "predictions.jsonl", ", ".join(f"{k}={v}" for k, v in shown.items()))


if __name__ == "__main__":
    main()
