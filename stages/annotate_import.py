"""annotate-import: human preference annotations -> strict (chosen, rejected) pairs.

Reads the files named in params.yaml `annotate_import` (the paper's released question/answer
files, a Label Studio export, checked against the tasks file annotation-tasks wrote, or a plain
table), writes data/annotate_import/pairs.jsonl and
rejects.jsonl (docs/formats.md) and metrics/annotate_import.json.

    python -m stages.annotate_import            # reads params.yaml (base, annotate_import)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from align2llava.config import load_base, load_section
from align2llava.ops.clikit import CONTEXT, setup_logging, stage_options, user_errors
from align2llava.ops.tracking import stage_run
from align2llava.steps.annotations.importer import AnnotateImportParams, import_annotations

log = logging.getLogger(__name__)


@click.command(context_settings=CONTEXT)
@stage_options("annotate_import")
@click.option("--out-dir", metavar="DIR", default=Path("data/annotate_import"), show_default=True, type=click.Path(path_type=Path), help="Where pairs.jsonl and rejects.jsonl go.")
def main(params_file: Path, metrics_dir: Path, verbose: bool, out_dir: Path) -> None:
    """Import human preference annotations as reward-model training pairs."""
    setup_logging(verbose)
    with user_errors():
        base = load_base(params_file)
        p = load_section("annotate_import", AnnotateImportParams, params_file)
        t0 = time.time()
        logged = {"base": base.model_dump(), "annotate_import": p.model_dump()}
        with stage_run("annotate_import", logged, metrics_dir=metrics_dir) as run:
            res = import_annotations(
                p.format,
                questions=p.questions,
                answers=p.answers,
                input=p.input,
                tasks=p.tasks,
                out_dir=out_dir,
                image_root=base.image_root if p.check_images else None,
                rating_max=p.rating_max,
                val_fraction=p.val_fraction,
                seed=base.seed,
                reject_budget=p.reject_budget,
            )
            m = res.metrics()
            run.log_metrics(m)
        log.info(
            "wrote %s pairs (%s question, %s answer; %s train, %s val), %s ties dropped, "
            "%s rows rejected, in %.1f s -> %s",
            f"{m['pairs']:,}", f"{m['pairs_question']:,}", f"{m['pairs_answer']:,}",
            f"{m['pairs_train']:,}", f"{m['pairs_val']:,}", f"{m['ties_dropped']:,}",
            f"{m['rejected_rows']:,}", time.time() - t0, out_dir / "pairs.jsonl",
        )
        if "annotations" in m:  # a Label Studio export
            log.info("%s annotations by %s annotators (%s cancelled), %s tasks not annotated, %s skipped; "
                     "agreement (Krippendorff's alpha, interval) %s over %s candidates rated twice or more",
                     f"{m['annotations']:,}", m["annotators"], m["annotations_cancelled"],
                     m["tasks_unannotated"], m["tasks_skipped"], m["agreement_alpha"], m["agreement_units"])


if __name__ == "__main__":
    main()
