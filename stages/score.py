"""score: both reward models over the whole pool -> data/score/scores.jsonl (sidecar keyed by id).

Reads base.pool (bad records -> data/score/rejects.jsonl within score.reject_budget) and
models/train_reward/{question,answer}. Resumable from finished shards; data-parallel with
`accelerate launch --num_processes N -m stages.score` (GPUs) or `torchrun --nproc_per_node N -m
stages.score` (CPU processes), output identical to one process.
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
from align2llava.steps.scoring import ScoreParams, load_pool, score_pool

log = logging.getLogger(__name__)


@click.command(context_settings=CONTEXT)
@stage_options("score")
@click.option("--out-dir", metavar="DIR", default=Path("data/score"), show_default=True, type=click.Path(path_type=Path), help="Where scores.jsonl and rejects.jsonl go.")
@click.option("--stop-after-shards", type=int, default=None, hidden=True, help="Stop after N new shards (tests resuming).")
def main(params_file: Path, metrics_dir: Path, verbose: bool, out_dir: Path, stop_after_shards: int | None) -> None:
    """Score every pool record with the question and answer reward models."""
    setup_logging(verbose)
    with user_errors():
        base = load_base(params_file)
        p = load_section("score", ScoreParams, params_file)
        state = process_state()
        records, rejects, total = load_pool(base.pool, base.image_root, p.reject_budget, p.decode_images)
        if state.is_main_process:
            rejects.write(out_dir / "rejects.jsonl")
        rejects.check(total, out_dir / "rejects.jsonl")
        params = {"base": base.model_dump(), "score": p.model_dump()}
        with stage_run("score", params, metrics_dir=metrics_dir) if state.is_main_process else nullcontext() as run:
            s = score_pool(records, p, out_dir / "scores.jsonl", image_root=base.image_root,
                           extra_fingerprint=base.model_dump(), stop_after_shards=stop_after_shards)
            if s is None or run is None:
                return
            rate = s.records_per_s_this_run
            metrics = {
                # the whole output (data/score/scores.jsonl), resumed shards included
                "records": total, "scored": s.records, "rejected": rejects.count,
                "answer_items": s.answer_items, "shards": s.shards, "shards_resumed": s.shards_resumed,
                "processes": s.processes, "seconds": round(s.seconds, 1),
                # what this run scored, over all processes (model loading excluded)
                "scored_this_run": s.records_this_run, "items_this_run": s.items_this_run,
                "scoring_seconds_this_run": round(s.scoring_seconds_this_run, 1),
                "records_per_s_this_run": round(rate, 2) if rate is not None else None,
            }
            run.log_metrics(metrics)
        log.info("%s records scored (%s rejected) -> %s; this run scored %s in %.0f s (%s rec/s) over %d "
                 "process(es), %d of %d shards resumed", f"{s.records:,}", f"{rejects.count:,}",
                 out_dir / "scores.jsonl", f"{s.records_this_run:,}", s.scoring_seconds_this_run,
                 "n/a" if rate is None else f"{rate:.1f}", s.processes, s.shards_resumed, s.shards)


if __name__ == "__main__":
    main()
