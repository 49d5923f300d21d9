"""DVC stage `restyle`: the inner LLM rewrites each selected answer, then reviews original vs
rewrite; a rewrite is kept only if the review prefers it and the content check passes.

    python -m stages.restyle           # reads params.yaml (base, restyle)
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from align2llava.ops.clikit import CONTEXT, setup_logging, stage_options, user_errors

log = logging.getLogger(__name__)


@click.command(context_settings=CONTEXT)
@stage_options("restyle")
@click.option("--selected", default="data/select/selected.json", show_default=True, type=click.Path(path_type=Path), help="The selection written by the `select` stage.")
@click.option("--out-dir", metavar="DIR", default=Path("data/restyle"), show_default=True, type=click.Path(path_type=Path), help="Where curated.json and log.jsonl go.")
def main(params_file: Path, metrics_dir: Path, verbose: bool, selected: Path, out_dir: Path) -> None:
    """Rewrite and review the selected answers with the inner LLM (base.base_model)."""
    setup_logging(verbose)
    with user_errors():
        from align2llava.config import load_base, load_section
        from align2llava.ops.tracking import stage_run
        from align2llava.steps.restyle.llm import prompt_texts
        from align2llava.steps.restyle.restyle import RestyleParams, run_restyle

        base = load_base(params_file)
        params = load_section("restyle", RestyleParams, params_file)
        resolved = {"base": base.model_dump(), "restyle": params.model_dump()}
        with stage_run("restyle", resolved, metrics_dir=metrics_dir) as run:
            run.log_text("prompts.json", prompt_texts())
            result = run_restyle(selected, params, base_model=base.base_model, seed=base.seed,
                                 out_dir=out_dir)
            run.log_metrics(result.metrics)
        m = result.metrics
        if not params.enabled:
            log.info("restyle disabled: passed %s records through unchanged", f"{m['records']:,}")
            return
        log.info(
            "accepted %s/%s rewrites (%.1f%%) in %s records; rejected %s; NLL %.3f -> %.3f; "
            "%s s (cache %s hits, %s misses) -> %s",
            f"{m['accepted']:,}", f"{m['turns']:,}", 100 * m["acceptance_rate"], f"{m['records_changed']:,}",
            m["rejections"], m["nll_before"], m["nll_after"], m["seconds"], m["cache_hits"],
            m["cache_misses"], out_dir / "curated.json",
        )


if __name__ == "__main__":
    main()
