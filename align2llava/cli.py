"""The `align2llava` command: data tools over the library (the pipeline itself is `dvc repro`)."""

from __future__ import annotations

from pathlib import Path

import click

from .clikit import setup_logging, user_errors


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="align2llava")
def main() -> None:
    """Curate LLaVA-style multimodal instruction data (Align²LLaVA).

    Run the whole pipeline with `dvc repro`; these commands check, convert and import data.
    """
    setup_logging()


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--image-root", type=click.Path(path_type=Path), help="Folder the records' image paths are relative to; images are checked to exist and decode.")
@click.option("--format", "fmt", type=click.Choice(["json", "jsonl", "parquet", "hf", "messages"]), help="Input format (default: from the extension).")
@click.option("--candidates", is_flag=True, help="Allow lists of candidate answers in gpt turns (the answer-preference format).")
@click.option("--max-problems", type=int, default=200, show_default=True, help="Print at most this many problem lines.")
def validate(file: Path, image_root: Path | None, fmt: str | None, candidates: bool, max_problems: int) -> None:
    """Check FILE against the LLaVA record contract; print one line per problem.

    Exit 0 when clean, 1 when any problem is found.
    """
    from .io import read_records
    from .records import validate_records

    with user_errors():
        if image_root is not None and not image_root.is_dir():
            raise click.ClickException(f"{image_root}: image root is not a folder")
        loaded = read_records(file, fmt)
        problems = list(loaded.problems)
        found = validate_records(
            loaded.records, str(file), image_root=image_root, allow_candidates=candidates
        )
        # map positions back to the file's own numbering (JSONL lines may be skipped)
        for p in found:
            problems.append(type(p)(p.file, loaded.indices[p.index], p.id, p.message))
        problems.sort(key=lambda p: (p.index if p.index is not None else -1))
    bad = {p.index for p in problems}
    total = len(loaded.records) + len(loaded.problems)
    for p in problems[:max_problems]:
        click.echo(str(p))
    if len(problems) > max_problems:
        click.echo(f"... {len(problems) - max_problems:,} more problems not shown")
    click.echo(
        f"{file}: {total:,} records, {total - len(bad):,} valid, {len(bad):,} with problems "
        f"({len(problems):,} problems)"
    )
    if problems:
        raise SystemExit(1)


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--from", "src_fmt", type=click.Choice(["json", "jsonl", "parquet", "hf", "messages"]), help="Input format (default: from the extension).")
@click.option("--to", "dst_fmt", type=click.Choice(["json", "jsonl", "parquet", "hf", "messages"]), help="Output format (default: from the extension; a path without one is an HF folder).")
def convert(src: Path, dst: Path, src_fmt: str | None, dst_fmt: str | None) -> None:
    """Convert SRC to DST between LLaVA JSON, JSONL, parquet, HF save_to_disk and messages style.

    Unparseable entries stop the conversion (nothing is dropped silently); run `validate` first.
    """
    from .io import read_records, write_records

    with user_errors():
        loaded = read_records(src, src_fmt)
        if loaded.problems:
            raise click.ClickException(
                f"{loaded.problems[0]} ({len(loaded.problems)} unreadable entries; nothing written)"
            )
        fmt = dst_fmt or (None if dst.suffix else "hf")
        write_records(loaded.records, dst, fmt)
    click.echo(f"wrote {len(loaded.records):,} records to {dst}")


@main.command("import-annotations")
@click.option("--format", "fmt", required=True, type=click.Choice(["align2llava", "labelstudio", "table"]), help="align2llava: the paper's released question/answer files; labelstudio: a Label Studio JSON export; table: CSV/JSONL rows (group, image, kind, candidate, score, prompt).")
@click.option("--questions", type=click.Path(path_type=Path), help="align2llava: the question-preference file.")
@click.option("--answers", type=click.Path(path_type=Path), help="align2llava: the answer-preference file.")
@click.option("--input", "input_", type=click.Path(path_type=Path), help="labelstudio / table: the input file.")
@click.option("--out-dir", required=True, type=click.Path(path_type=Path), help="Writes pairs.jsonl and rejects.jsonl here.")
@click.option("--image-root", type=click.Path(path_type=Path), help="Reject rows whose image is not a file under this folder.")
@click.option("--val-fraction", type=float, default=0.2, show_default=True, help="Fraction of images held out for validation.")
@click.option("--rating-max", type=int, default=5, show_default=True, help="Label Studio rating scale maximum (ratings 1..max map to [0, 1]).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the image split.")
@click.option("--reject-budget", type=float, default=0.01, show_default=True, help="Rejected rows allowed per file: a fraction (< 1) or a count (>= 1).")
def import_annotations_cmd(fmt: str, questions: Path | None, answers: Path | None, input_: Path | None, out_dir: Path, image_root: Path | None, val_fraction: float, rating_max: int, seed: int, reject_budget: float) -> None:
    """Turn human preference annotations into strict (chosen, rejected) pairs: OUT_DIR/pairs.jsonl.

    Every two candidates of a group with different scores make one pair; ties make none.
    """
    from .annotations import import_annotations

    with user_errors():
        if image_root is not None and not image_root.is_dir():
            raise click.ClickException(f"{image_root}: image root is not a folder")
        res = import_annotations(
            fmt, questions=questions, answers=answers, input=input_, out_dir=out_dir,
            image_root=image_root, rating_max=rating_max, val_fraction=val_fraction, seed=seed,
            reject_budget=reject_budget,
        )
    m = res.metrics()
    click.echo(
        f"wrote {m['pairs']:,} pairs to {out_dir / 'pairs.jsonl'}: {m['pairs_question']:,} question, "
        f"{m['pairs_answer']:,} answer ({m['pairs_train']:,} train, {m['pairs_val']:,} val); "
        f"{m['ties_dropped']:,} ties dropped; {m['rejected_rows']:,} rows rejected"
    )


if __name__ == "__main__":
    main()
