"""The `align2llava` command: data tools over the library (the pipeline itself is `dvc repro`)."""

from __future__ import annotations

from pathlib import Path

import click

from align2llava.ops.clikit import setup_logging, user_errors


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
    from align2llava.data.io import read_records
    from align2llava.data.records import validate_records

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
    from align2llava.data.io import read_records, write_records

    with user_errors():
        loaded = read_records(src, src_fmt)
        if loaded.problems:
            raise click.ClickException(
                f"{loaded.problems[0]} ({len(loaded.problems)} unreadable entries; nothing written)"
            )
        fmt = dst_fmt or (None if dst.suffix else "hf")
        write_records(loaded.records, dst, fmt)
    click.echo(f"wrote {len(loaded.records):,} records to {dst}")


@main.command("annotation-tasks")
@click.option("--pool", required=True, type=click.Path(path_type=Path), help="The instruction pool (LLaVA JSON/JSONL/parquet/HF/messages).")
@click.option("--image-root", required=True, type=click.Path(path_type=Path), help="Folder the records' image paths are relative to.")
@click.option("--model", required=True, type=click.Path(path_type=Path), help="The MLLM that writes the candidates (HF layout, e.g. your base checkpoint).")
@click.option("--out-dir", required=True, type=click.Path(path_type=Path), help="Writes tasks.json, labeling_config.xml, candidates.csv/.jsonl and rejects.jsonl here.")
@click.option("--records", type=int, default=300, show_default=True, help="Pool records to sample (stratified by task type).")
@click.option("--question-candidates", type=int, default=3, show_default=True, help="Extra question sets per record (the original is candidate 0).")
@click.option("--answer-candidates", type=int, default=3, show_default=True, help="Extra answers per turn (the original is candidate 0).")
@click.option("--temperature", type=float, default=0.8, show_default=True, help="Sampling temperature (> 0).")
@click.option("--max-new-tokens", type=int, default=128, show_default=True, help="Token cap per answer.")
@click.option("--image-url", default="/data/local-files/?d={path}", show_default=True, help="URL Label Studio shows per image: {path} = IMAGE_ROOT/<image>, {image} = the path under the image root.")
@click.option("--rating-max", type=int, default=5, show_default=True, help="Stars per rating (1..max map to [0, 1]).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample and of sampling.")
@click.option("--reject-budget", type=float, default=0.01, show_default=True, help="Records left out allowed: a fraction of the pool (< 1) or a count (>= 1).")
def annotation_tasks_cmd(pool: Path, image_root: Path, model: Path, out_dir: Path, records: int, question_candidates: int,
                         answer_candidates: int, temperature: float, max_new_tokens: int, image_url: str,
                         rating_max: int, seed: int, reject_budget: float) -> None:
    """Sample pool records, have the MLLM write extra candidates, write a Label Studio project.

    Prompts and the other settings: the `annotation_tasks:` section of params.yaml (the DVC
    stage annotation-tasks); docs/annotation.md walks through rating and importing.
    """
    from pydantic import ValidationError

    from align2llava.steps.annotations.candidates import make_annotation_tasks
    from align2llava.steps.annotations.tasks import AnnotationTasksParams

    with user_errors():
        if not image_root.is_dir():
            raise click.ClickException(f"{image_root}: image root is not a folder")
        try:
            p = AnnotationTasksParams(records=records, question_candidates=question_candidates,
                                      answer_candidates=answer_candidates, temperature=temperature,
                                      max_new_tokens=max_new_tokens, image_url=image_url, rating_max=rating_max,
                                      reject_budget=reject_budget)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise click.ClickException(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None
        m = make_annotation_tasks(p, pool=pool, image_root=image_root, model=model, out_dir=out_dir, seed=seed)
    click.echo(
        f"wrote {m['tasks']:,} tasks ({m['tasks_question']:,} question, {m['tasks_answer']:,} answer; "
        f"{m['candidates']:,} candidates) for {m['records']:,} records to {out_dir / 'tasks.json'}, "
        f"with {out_dir / 'labeling_config.xml'} and {out_dir / 'candidates.csv'}; {m['rejected']:,} records rejected"
    )


@main.command("import-annotations")
@click.option("--format", "fmt", required=True, type=click.Choice(["align2llava", "labelstudio", "table"]), help="align2llava: the paper's released question/answer files; labelstudio: a Label Studio JSON export; table: CSV/JSONL rows (group, image, kind, candidate, score, prompt).")
@click.option("--questions", type=click.Path(path_type=Path), help="align2llava: the question-preference file.")
@click.option("--answers", type=click.Path(path_type=Path), help="align2llava: the answer-preference file.")
@click.option("--input", "input_", type=click.Path(path_type=Path), help="labelstudio / table: the input file.")
@click.option("--tasks", type=click.Path(path_type=Path), help="labelstudio: the tasks file the export came from (annotation-tasks writes it); every exported task must be one of its tasks.")
@click.option("--out-dir", required=True, type=click.Path(path_type=Path), help="Writes pairs.jsonl and rejects.jsonl here.")
@click.option("--image-root", type=click.Path(path_type=Path), help="Reject rows whose image is not a file under this folder.")
@click.option("--val-fraction", type=float, default=0.2, show_default=True, help="Fraction of images held out for validation.")
@click.option("--rating-max", type=int, default=5, show_default=True, help="Label Studio rating scale maximum (ratings 1..max map to [0, 1]).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the image split.")
@click.option("--reject-budget", type=float, default=0.01, show_default=True, help="Rejected rows allowed per file: a fraction (< 1) or a count (>= 1).")
def import_annotations_cmd(fmt: str, questions: Path | None, answers: Path | None, input_: Path | None, tasks: Path | None, out_dir: Path, image_root: Path | None, val_fraction: float, rating_max: int, seed: int, reject_budget: float) -> None:
    """Turn human preference annotations into strict (chosen, rejected) pairs: OUT_DIR/pairs.jsonl.

    Every two candidates of a group with different scores make one pair; ties make none.
    """
    from align2llava.steps.annotations.importer import import_annotations

    with user_errors():
        if image_root is not None and not image_root.is_dir():
            raise click.ClickException(f"{image_root}: image root is not a folder")
        res = import_annotations(
            fmt, questions=questions, answers=answers, input=input_, tasks=tasks, out_dir=out_dir,
            image_root=image_root, rating_max=rating_max, val_fraction=val_fraction, seed=seed,
            reject_budget=reject_budget,
        )
    m = res.metrics()
    click.echo(
        f"wrote {m['pairs']:,} pairs to {out_dir / 'pairs.jsonl'}: {m['pairs_question']:,} question, "
        f"{m['pairs_answer']:,} answer ({m['pairs_train']:,} train, {m['pairs_val']:,} val); "
        f"{m['ties_dropped']:,} ties dropped; {m['rejected_rows']:,} rows rejected"
    )
    if "annotations" in m:
        click.echo(
            f"{m['annotations']:,} annotations by {m['annotators']} annotators ({m['annotations_cancelled']} cancelled); "
            f"{m['tasks_unannotated']} tasks not annotated, {m['tasks_skipped']} skipped; agreement "
            f"(Krippendorff's alpha, interval): {m['agreement_alpha']} over {m['agreement_units']} candidates rated twice or more"
        )


@main.command()
@click.option("--ratios", default="0.09,0.3", show_default=True, help="Overall keep ratios (alpha x beta, split evenly) for the selected runs.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Seeds; each sets select.seed and finetune.seed.")
@click.option("--methods", default="reward,random,full", show_default=True, help="Of: reward (selection + restyle), reward_raw (selection only), random, full, oracle (demo: clean records first, an upper bound), base (not fine-tuned).")
@click.option("--jobs", "-j", type=int, default=1, show_default=True, help="Experiments run at a time (dvc queue start -j).")
@click.option("--out", "out_csv", type=click.Path(path_type=Path), default="reports/compression.csv", show_default=True, help="Per-run CSV (a DVC plot); a Markdown table goes next to it (.md).")
@click.option("--prefix", default="cmp", show_default=True, help="Experiment names are PREFIX-METHOD-PERCENT-sSEED.")
@click.option("--rev", help="Baseline commit the experiments hang off (default: HEAD).")
@click.option("--collect-only", is_flag=True, help="Queue and run nothing; collect what has finished.")
@click.option("--dry-run", is_flag=True, help="Print the `dvc exp run --queue` commands and stop.")
@click.option("--poll", "poll_s", type=float, default=30.0, show_default=True, help="Seconds between progress checks.")
@click.option("--timeout", "timeout_s", type=float, help="Give up waiting after this many seconds (runs continue; collect later).")
@click.option("--set", "overrides", multiple=True, metavar="METHOD:KEY=VALUE", help="A method's own param for its runs, repeatable: full:finetune.num_train_epochs=1.")
def compression(ratios: str, seeds: str, methods: str, jobs: int, out_csv: Path, prefix: str, rev: str | None,
                collect_only: bool, dry_run: bool, poll_s: float, timeout_s: float | None,
                overrides: tuple[str, ...]) -> None:
    """The compression experiment: reward-curated vs random subsets vs full data.

    Queues one `dvc exp run --queue -S ...` per method, keep ratio and seed (runs already
    finished are reused, failed ones rerun), runs the queue, waits, collects every run's
    metrics from `dvc exp show --json` into OUT and prints mean +- std per method and ratio.
    Run it from the repo root with the pipeline committed and reproduced once (`make demo`).
    """
    import shlex
    import sys

    from align2llava.ops.experiments import compression as run_compression
    from align2llava.ops.experiments import parse_list, parse_overrides, plan_runs, queue_command

    with user_errors():
        ratio_list, seed_list = parse_list(ratios, float), parse_list(seeds, int)
        method_list = parse_list(methods, str)
        extra = parse_overrides(overrides)
        if dry_run:
            for run in plan_runs(ratio_list, seed_list, method_list, prefix, extra):
                click.echo(shlex.join(queue_command(run)))
            return
        dvc = str(Path(sys.executable).with_name("dvc"))
        result = run_compression(
            ratio_list, seed_list, method_list, out_csv=out_csv, out_md=out_csv.with_suffix(".md"),
            jobs=jobs, prefix=prefix, collect_only=collect_only, rev=rev, poll_s=poll_s,
            timeout_s=timeout_s, command_line="align2llava compression " + shlex.join(sys.argv[2:]),
            dvc=dvc if Path(dvc).exists() else "dvc", overrides=extra,
        )
    click.echo(result.table)
    click.echo(result.checks)
    click.echo(f"{len(result.rows)} runs -> {out_csv}" + (f"; failed: {', '.join(result.failed)}" if result.failed else ""))


@main.command()
@click.argument("preset", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--params", "params_file", type=click.Path(path_type=Path), default="params.yaml", show_default=True, help="The params file to edit.")
@click.option("--dry-run", is_flag=True, help="Print what would change; write nothing.")
def preset(preset: Path, params_file: Path, dry_run: bool) -> None:
    """Apply a params preset (e.g. configs/params/llava-1.5-7b.yaml) to params.yaml.

    Each key of PRESET replaces that key of params.yaml (comments kept); every section is then
    checked as the stages load it, before anything is written.
    """
    from align2llava.ops.preset import apply_preset

    with user_errors():
        changes = apply_preset(preset, params_file, write=not dry_run)
    for key, old, new in changes:
        click.echo(f"{key}: {old!r} -> {new!r}")
    verb = "would change" if dry_run else "changed"
    click.echo(f"{params_file}: {verb} {len(changes)} keys from {preset}")


@main.command()
@click.option("--metrics-dir", type=click.Path(path_type=Path), default="metrics", show_default=True, help="Where the stages wrote their metrics.")
def summary(metrics_dir: Path) -> None:
    """The headline figures of each stage that ran, one line per stage (from metrics/*.json)."""
    from align2llava.ops.summary import summary_lines

    with user_errors():
        lines = summary_lines(metrics_dir)
    click.echo("\n".join(lines))


@main.command("plots-template")
@click.argument("path", type=click.Path(path_type=Path), default=".dvc/plots/offline.html")
def plots_template(path: Path) -> None:
    """Write PATH: a page template for `dvc plots show` with Vega inlined (no CDN, works
    offline). .dvc/config's plots.html_template points DVC at the default PATH."""
    from align2llava.report.charts import write_offline_template

    with user_errors():
        out = write_offline_template(path)
    click.echo(f"{out} ({out.stat().st_size / 1e6:.1f} MB): dvc plots show --html-template {out}")


if __name__ == "__main__":
    main()
