"""annotation-tasks: candidates for a sample of the pool, ready to rate in Label Studio.

Samples `annotation_tasks.records` records of base.pool (stratified by task type, seeded by
base.seed), has the MLLM (annotation_tasks.model, default base.base_model) write extra candidate
question sets and answers with the image in view, and writes data/annotation_tasks/: tasks.json
and labeling_config.xml (a Label Studio project), candidates.csv / candidates.jsonl (the same as a
table), rejects.jsonl, plus metrics/annotation_tasks.json. Rate them (docs/annotation.md), export,
then point annotate_import at the export and run annotate-import.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from align2llava.config import load_base, load_section
from align2llava.ops.clikit import CONTEXT, setup_logging, stage_options, user_errors
from align2llava.ops.tracking import stage_run
from align2llava.steps.annotations.candidates import make_annotation_tasks
from align2llava.steps.annotations.tasks import AnnotationTasksParams

log = logging.getLogger(__name__)
OUT_DIR = Path("data/annotation_tasks")


@click.command(context_settings=CONTEXT)
@stage_options("annotation_tasks")
@click.option("--out-dir", metavar="DIR", default=OUT_DIR, show_default=True, type=click.Path(path_type=Path), help="Where the tasks, the labeling config and the table go.")
def main(params_file: Path, metrics_dir: Path, verbose: bool, out_dir: Path) -> None:
    """Write candidate questions and answers for a pool sample as Label Studio tasks."""
    setup_logging(verbose)
    with user_errors():
        base = load_base(params_file)
        p = load_section("annotation_tasks", AnnotationTasksParams, params_file)
        model = p.model or base.base_model
        with stage_run("annotation_tasks", {"base": base.model_dump(), "annotation_tasks": p.model_dump()},
                       metrics_dir=metrics_dir) as run:
            m = make_annotation_tasks(p, pool=base.pool, image_root=base.image_root, model=model,
                                      out_dir=out_dir, seed=base.seed)
            run.log_metrics(m)
    log.info("%s records (%s) -> %s tasks (%s question, %s answer), %s candidates; %s generations "
             "(%s retried) in %.1f s; %s rejected -> %s", m["records"],
             ", ".join(f"{t} {n}" for t, n in m["records_by_type"].items()), m["tasks"], m["tasks_question"],
             m["tasks_answer"], f"{m['candidates']:,}", f"{m['generations']:,}", m["retries"],
             m["generation_seconds"], m["rejected"], out_dir)


if __name__ == "__main__":
    main()
