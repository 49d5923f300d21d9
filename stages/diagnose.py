"""DVC stage `diagnose` (demo diagnostics only): how the reward models and the selection did by
the demo's defect oracle -> metrics/diagnose.json.

    python -m stages.diagnose          # reads params.yaml (base, diagnose, select.turn_aggregate)

Reads diagnose.oracle (data/synthesize/oracle.jsonl), data/score/scores.jsonl, base.pool,
data/select/selected.json and data/select/audit.jsonl. No method stage reads the oracle; this
one only reads files, so editing the oracle reruns nothing expensive.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from align2llava.ops.clikit import CONTEXT, setup_logging, stage_options, user_errors

log = logging.getLogger(__name__)


@click.command(context_settings=CONTEXT)
@stage_options("diagnose")
@click.option("--scores", default="data/score/scores.jsonl", show_default=True, type=click.Path(path_type=Path), help="Score sidecar written by the `score` stage.")
@click.option("--selected", default="data/select/selected.json", show_default=True, type=click.Path(path_type=Path), help="The selected records (`select` stage).")
@click.option("--audit", default="data/select/audit.jsonl", show_default=True, type=click.Path(path_type=Path), help="The selection audit (`select` stage).")
def main(params_file: Path, metrics_dir: Path, verbose: bool, scores: Path, selected: Path, audit: Path) -> None:
    """Demo diagnostics: defect AUROC of the scores, oracle defect rates of pool vs selected."""
    setup_logging(verbose)
    with user_errors():
        from align2llava.config import load_base, load_section
        from align2llava.demo.diagnostics import (
            DiagnoseParams,
            diagnose,
            read_audit,
            read_oracle,
            read_score_rows,
            record_ids,
        )
        from align2llava.ops.tracking import stage_run
        from align2llava.steps.selection import SelectParams

        base = load_base(params_file)
        params = load_section("diagnose", DiagnoseParams, params_file)
        aggregate = load_section("select", SelectParams, params_file).turn_aggregate
        oracle = read_oracle(params.oracle)
        rows, pool_ids, selected_ids = read_score_rows(scores), record_ids(base.pool), record_ids(selected)
        audit_rows = read_audit(audit)
        resolved = {"base": base.model_dump(), "diagnose": params.model_dump(), "select": {"turn_aggregate": aggregate}}
        with stage_run("diagnose", resolved, metrics_dir=metrics_dir) as run:
            m = diagnose(oracle, rows, pool_ids, selected_ids, audit_rows, aggregate)
            run.log_metrics(m)
    if m["pool_without_oracle"]:
        log.warning("%s of %s pool records have no oracle row in %s (left out of the rates)",
                    f"{m['pool_without_oracle']:,}", f"{m['pool']:,}", params.oracle)
    rates = m["defect_rates"]
    log.info("demo oracle: clean %.3f in the pool, %.3f in the %s selected -> %s",
             rates["pool"].get("clean", float("nan")), rates["selected"].get("clean", float("nan")),
             f"{m['selected']:,}", metrics_dir / "diagnose.json")


if __name__ == "__main__":
    main()
