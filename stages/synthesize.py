"""Stage `synthesize`: the demo world from the easy-vqa package.

Writes data/synthesize/: images/, pool.json, oracle.jsonl, captions.jsonl, annotations/
(simulated) and benchmark/. See align2llava/demo/synthesis/synthesize.py for what each holds.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from align2llava.config import load_base, load_section
from align2llava.demo.synthesis.params import TASKS, SynthesizeParams
from align2llava.demo.synthesis.synthesize import synthesize
from align2llava.ops.clikit import CONTEXT, setup_logging, stage_options, user_errors
from align2llava.ops.tracking import stage_run

log = logging.getLogger(__name__)


@click.command(context_settings=CONTEXT)
@stage_options("synthesize")
@click.option("--out-dir", metavar="DIR", type=click.Path(path_type=Path), default=Path("data/synthesize"),
              show_default=True, help="Where images/, pool.json, oracle.jsonl, captions.jsonl, annotations/ and benchmark/ go.")
@click.option("--source", type=click.Path(path_type=Path), default=None,
              help="An easy-vqa data folder (train/ and test/); default: the installed package's.")
def main(params_file: Path, metrics_dir: Path, verbose: bool, out_dir: Path, source: Path | None) -> None:
    """Build the demo's instruction pool, simulated annotations, benchmark and captions."""
    setup_logging(verbose)
    with user_errors():
        base = load_base(params_file)
        params = load_section("synthesize", SynthesizeParams, params_file)
        logged = {"base": base.model_dump(), "synthesize": params.model_dump()}
        with stage_run("synthesize", logged, metrics_dir=metrics_dir) as run:
            m = synthesize(params, base.seed, out_dir, source, base.image_root)
            run.log_metrics(m)
    pool, ann = m["pool"], m["annotations"]
    log.info("pool: %s records (%s), %.1f%% clean", f"{pool['total']:,}",
             ", ".join(f"{pool[t]} {t}" for t in TASKS), 100 * m["clean_fraction"]["all"])
    log.info("defect rates: %s", ", ".join(f"{k} {v:.1%}" for k, v in m["defect_rate"].items()))
    log.info("annotations: %s records, %s groups, %s candidates, %s strict pairs, tie rate %.1f%%",
             ann["records"], ann["groups"], ann["candidates"], f"{ann['strict_pairs']:,}",
             100 * ann["tie_rate"])
    log.info("benchmark: %s vqa + %s pope; %s captions; %s images -> %s in %.1f s",
             sum(m["benchmark"][t] for t in ("shape", "color", "yes_no")), m["benchmark"]["pope"],
             f"{m['captions']:,}", f"{m['images']:,}", out_dir, m["seconds"])


if __name__ == "__main__":
    main()
