"""Summarise harness-probe runs: mean +- std per method and the harness check.

    python -m benchmarks.harness_summary .cache/probe/h3000.jsonl

Reads the rows `benchmarks/harness_probe.py --results FILE` appended (one series of runs per
file: the same pool, benchmark slice and overrides) and prints the compression experiment's
table and its three checks (align2llava/ops/harness.py) on them. The probe's `all` is the
experiment's `full`; rows written before the probe recorded its keep ratio take --keep-ratio.
A `given` run is named by --name DATA=METHOD (`--name data/select/selected.json=reward`: the
reward path's selection counts as the experiment's `reward` in the headline checks), else
"given DATA".
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from align2llava.errors import Align2LlavaError
from align2llava.ops.clikit import user_errors
from align2llava.ops.experiments import format_table, summarize
from align2llava.ops.harness import format_checks, harness_checks, headline_checks

METRICS = ["benchmark_accuracy", "benchmark_accuracy_color", "benchmark_accuracy_shape", "benchmark_accuracy_yes_no",
           "pope_yes_ratio", "benchmark_likelihood_accuracy", "pope_likelihood_auroc", "train_records", "train_seconds"]


def experiment_rows(lines: list[str], source: str, keep_ratio: float, names: dict[str, str] | None = None) -> list[dict]:
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            r = json.loads(line)
            method = {"all": "full"}.get(r["method"], r["method"])
            if method == "given":
                method = (names or {}).get(r["data"], f"given {r['data']}")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise Align2LlavaError(f"{source}: line {n}: not a harness-probe row ({e})") from None
        ratio = {"full": 1.0, "base": 0.0}.get(method, r.get("keep_ratio", keep_ratio))
        rows.append({**r, "method": method, "keep_ratio": ratio, "train_records": r.get("records"),
                     "train_seconds": r.get("finetune_s")})
    return rows


@click.command()
@click.argument("results", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--keep-ratio", default=0.09, show_default=True, help="For subset rows that do not record theirs.")
@click.option("--name", "names", multiple=True, metavar="DATA=METHOD", help="The method a `given` run on DATA counts as.")
def main(results: Path, keep_ratio: float, names: tuple[str, ...]) -> None:
    with user_errors():
        bad = [x for x in names if "=" not in x]
        if bad:
            raise click.UsageError(f"--name {bad[0]!r}: expected DATA=METHOD")
        lines = [x for x in results.read_text().splitlines() if x.strip()]
        rows = experiment_rows(lines, str(results), keep_ratio, dict(x.rsplit("=", 1) for x in names))
        if not rows:
            raise Align2LlavaError(f"{results}: no rows")
        click.echo(format_table(summarize(rows, METRICS), METRICS))
        click.echo()
        click.echo(format_checks(harness_checks(rows)))
        click.echo(format_checks(headline_checks(rows)))


if __name__ == "__main__":
    main()
