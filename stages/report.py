"""DVC stage `report`: the curation report, reports/curation/index.html (offline, self-contained):
funnel, score distributions, kept and dropped records, restyle rewrites, model metrics.

    python -m stages.report            # reads params.yaml (base, select, report)

Open reports/curation/index.html in a browser (file:// works); it is also an MLflow artifact of
this stage's run, linked from the pipeline's parent run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from align2llava.ops.clikit import CONTEXT, setup_logging, stage_options, user_errors

log = logging.getLogger(__name__)


@click.command(context_settings=CONTEXT)
@stage_options("report")
@click.option("--scores", default="data/score/scores.jsonl", show_default=True, type=click.Path(path_type=Path), help="Score sidecar written by the `score` stage.")
@click.option("--audit", default="data/select/audit.jsonl", show_default=True, type=click.Path(path_type=Path), help="Selection audit written by the `select` stage.")
@click.option("--restyle-dir", default="data/restyle", show_default=True, type=click.Path(path_type=Path), help="Where the `restyle` stage wrote curated.json and log.jsonl.")
@click.option("--compression", default="reports/compression.csv", show_default=True, type=click.Path(path_type=Path), help="The compression experiment's table (shown when it exists).")
@click.option("--out-dir", metavar="DIR", default=Path("reports/curation"), show_default=True, type=click.Path(path_type=Path), help="The report folder (index.html, thumbs/, ids/).")
def main(params_file: Path, metrics_dir: Path, verbose: bool, scores: Path, audit: Path, restyle_dir: Path,
         compression: Path, out_dir: Path) -> None:
    """Write the curation report of the pool (base.pool) from the pipeline's outputs."""
    setup_logging(verbose)
    with user_errors():
        from align2llava.config import load_base, load_section
        from align2llava.ops.tracking import stage_run
        from align2llava.report.report import ReportInputs, ReportParams, run_report
        from align2llava.steps.selection import SelectParams

        base = load_base(params_file)
        select = load_section("select", SelectParams, params_file)
        params = load_section("report", ReportParams, params_file)
        resolved = {"base": base.model_dump(), "report": params.model_dump()}
        inputs = ReportInputs(pool=base.pool, image_root=base.image_root, scores=scores, audit=audit,
                              restyle_log=restyle_dir / "log.jsonl", curated=restyle_dir / "curated.json",
                              metrics_dir=metrics_dir, compression=compression, select_method=select.method)
        with stage_run("report", resolved, metrics_dir=metrics_dir) as run:
            result = run_report(inputs, params, out_dir)
            run.log_metrics(result.metrics)
            run.log_artifacts(out_dir, "curation")
            run.log_pipeline_metrics(result.stage_metrics)
            run.link_report(result.index, "curation/index.html")
        m = result.metrics
        if m["images_missing"]:
            log.warning("%s gallery images were missing or unreadable under %s (shown as 'image missing')",
                        f"{m['images_missing']:,}", base.image_root)
        log.info("report of %s records (%s kept, %s gallery cards) in %.1f s, %.1f MB -> %s",
                 f"{m['records']:,}", f"{m['kept']:,}", f"{m['gallery_cards']:,}", m["seconds"],
                 m["folder_bytes"] / 1e6, result.index)


if __name__ == "__main__":
    main()
