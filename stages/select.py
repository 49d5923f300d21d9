"""DVC stage `select`: keep the top alpha by question score, then the top beta by answer score,
per task type (or a same-size baseline: random, length, all).

    python -m stages.select            # reads params.yaml (base, select)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from align2llava.ops.clikit import CONTEXT, setup_logging, stage_options, user_errors

log = logging.getLogger(__name__)


@click.command(context_settings=CONTEXT)
@stage_options("select")
@click.option("--scores", default="data/score/scores.jsonl", show_default=True, type=click.Path(path_type=Path), help="Score sidecar written by the `score` stage.")
@click.option("--out-dir", metavar="DIR", default=Path("data/select"), show_default=True, type=click.Path(path_type=Path), help="Where selected.json and audit.jsonl go.")
@click.option("--plots-dir", metavar="DIR", default=Path("plots/select"), show_default=True, type=click.Path(path_type=Path), help="Where funnel.csv and histogram.csv go.")
def main(params_file: Path, metrics_dir: Path, verbose: bool, scores: Path, out_dir: Path, plots_dir: Path) -> None:
    """Select the curated subset of the pool (base.pool) from its reward scores."""
    setup_logging(verbose)
    with user_errors():
        from align2llava.config import load_base, load_section
        from align2llava.ops.tracking import stage_run
        from align2llava.steps.selection import SelectParams, run_select

        base = load_base(params_file)
        params = load_section("select", SelectParams, params_file)
        resolved = {"base": base.model_dump(), "select": params.model_dump()}
        t0 = time.perf_counter()
        with stage_run("select", resolved, metrics_dir=metrics_dir) as run:
            clean = None
            if params.method == "oracle":  # the diagnostic upper bound: the demo world's defect oracle
                from align2llava.demo.diagnostics import clean_flags, read_oracle

                clean = clean_flags(read_oracle(params.oracle))
            result = run_select(base.pool, scores, params, out_dir, plots_dir, clean)
            run.log_metrics(result.metrics)
        m = result.metrics
        for name, c in result.counts.items():
            log.info("%s: %s -> %s by question -> %s by answer", name, f"{c['pool']:,}", f"{c['question']:,}", f"{c['answer']:,}")
        log.info(
            "method %s: kept %s/%s (%.1f%%) in %.1f s -> %s",
            params.method, f"{m['kept']:,}", f"{m['pool']:,}", 100 * m["keep_ratio_overall"],
            time.perf_counter() - t0, out_dir / "selected.json",
        )


if __name__ == "__main__":
    main()
