"""What the selection kept, by the demo oracle: defect rates in the pool vs the selected set.

    python -m benchmarks.selection_defects                       # data/select/selected.json
    python -m benchmarks.selection_defects --selected data/restyle/curated.json

Demo only: data/synthesize/oracle.jsonl records which defects the generator put in each pool
record (no method stage reads it). A record counts once per defect type it carries; `clean` is
the share with none. The demo-only `diagnose` stage writes the same rates for
data/select/selected.json to metrics/diagnose.json (align2llava.demo.diagnostics.defect_rates);
this script prints them for any selected or curated file.
"""

from __future__ import annotations

from pathlib import Path

import click

from align2llava.ops.clikit import user_errors


@click.command()
@click.option("--oracle", "oracle_file", default="data/synthesize/oracle.jsonl", show_default=True, type=click.Path(path_type=Path))
@click.option("--selected", "selected_file", default="data/select/selected.json", show_default=True, type=click.Path(path_type=Path))
def main(oracle_file: Path, selected_file: Path) -> None:
    """Print defect rates per type: whole pool vs selected records."""
    with user_errors():
        from align2llava.demo.diagnostics import defect_rates, read_oracle, record_ids

        oracle = read_oracle(oracle_file)
        selected = record_ids(selected_file)
        unknown = [i for i in selected if i not in oracle]
        if unknown:
            raise click.ClickException(f"{selected_file}: record id {unknown[0]} is not in {oracle_file}")
    pool, kept = defect_rates(list(oracle), oracle), defect_rates(selected, oracle)
    click.echo(f"{'defect':<22} {'pool':>6} {'selected':>9}   ({len(oracle)} pool, {len(selected)} selected)")
    for k in sorted(set(pool) | set(kept), key=lambda k: (k != "clean", k)):
        click.echo(f"{k:<22} {pool.get(k, 0):>6.3f} {kept.get(k, 0):>9.3f}")


if __name__ == "__main__":
    main()
