"""Can the harness see data quality? Fine-tune the base on a per-task subset of a demo pool and
evaluate it on a benchmark slice, outside the pipeline (no scoring or restyle needed).

    python -m benchmarks.harness_probe --method oracle --seed 0 --out-dir .cache/probe/A-oracle-0
    python -m benchmarks.harness_probe --method random --seed 0 --out-dir .cache/probe/A-random-0
    python -m benchmarks.harness_probe --method base --out-dir .cache/probe/base \\
        --set evaluate.likelihood_span=start --set evaluate.likelihood_prior=no_image

Demo only. Methods: oracle (per task, a seeded shuffle, then the records the demo oracle marks
clean first), defective (the records it marks defective first: a lower bound), random (the seeded shuffle), all (the whole pool), base (no fine-tune),
given (the dataset --data names: the select stage's data/select/selected.json for the reward path's
selection without restyle, restyle's data/restyle/curated.json with it). The
benchmark slice is the first --per-type questions of each vqa type and --pope-per-answer
present and absent POPE probes of the benchmark folder. Params come from params.yaml with base
pointed at the pool and the checkpoint, and any --set SECTION.KEY=YAML. Every fine-tune also trains on finetune.mix
(by default the pool folder's vqa_mix.json; --mix none for the subset alone). Prints one JSON row
(evaluate's metrics, the subset's clean share, seconds) and appends it to --results;
`python -m benchmarks.harness_summary RESULTS` prints a series' table and the harness check.
--reuse-model evaluates a finished run's model again (on a larger slice: the first 100 per type
and 100 + 100 POPE probes are the whole demo benchmark), into bench-N-M/ and eval-N-M/.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import click
import yaml

from align2llava.ops.clikit import user_errors


def subset(pool: list[dict], oracle: dict[str, bool], method: str, seed: int, per_task: int,
           keep_ratio: float | None = None) -> list[dict]:
    """Per task: `per_task` records, or round(keep_ratio x the task's records) (half up) when set."""
    by_task: dict[str, list[dict]] = {}
    for r in pool:
        by_task.setdefault(r["task"], []).append(r)
    out = []
    for task, recs in sorted(by_task.items()):
        recs = list(recs)
        random.Random(f"{seed}:{task}").shuffle(recs)
        if method in ("oracle", "defective"):  # stable: clean (defective) first, shuffled within
            recs.sort(key=lambda r: oracle[r["id"]] == (method == "defective"))
        n = per_task if keep_ratio is None else int(keep_ratio * len(recs) + 0.5)
        out += recs if method == "all" else recs[:n]
    return out


def bench_slice(src: Path, dst: Path, per_type: int, pope_per_answer: int) -> None:
    vqa = [json.loads(x) for x in (src / "vqa.jsonl").read_text().splitlines()]
    pope = [json.loads(x) for x in (src / "pope.jsonl").read_text().splitlines()]
    rows = [r for t in ("shape", "color", "yes_no") for r in [r for r in vqa if r["type"] == t][:per_type]]
    probes = [r for a in ("yes", "no") for r in [r for r in pope if r["answer"] == a][:pope_per_answer]]
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (dst / "pope.jsonl").write_text("".join(json.dumps(r) + "\n" for r in probes))


@click.command()
@click.option("--pool-dir", default="data/synthesize", show_default=True, type=click.Path(path_type=Path),
              help="A synthesize output folder (pool.json, oracle.jsonl, images/).")
@click.option("--method", type=click.Choice(["oracle", "defective", "random", "all", "base", "given"]), required=True)
@click.option("--data", "data_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="--method given: the LLaVA JSON dataset to fine-tune on (its ids are looked up in the oracle).")
@click.option("--seed", default=0, show_default=True)
@click.option("--per-task", default=27, show_default=True, help="Records per task type (27 of 300: 9%).")
@click.option("--keep-ratio", type=float, default=None,
              help="Per task, this share of its records (half up), instead of --per-task (pools of unequal tasks).")
@click.option("--base-model", default="models/pretrain", show_default=True, type=click.Path(path_type=Path))
@click.option("--bench-dir", default="data/synthesize/benchmark", show_default=True, type=click.Path(path_type=Path))
@click.option("--bench-images", default="data/synthesize/images", show_default=True, type=click.Path(path_type=Path))
@click.option("--per-type", default=50, show_default=True, help="Benchmark questions per vqa type.")
@click.option("--pope-per-answer", default=50, show_default=True)
@click.option("--mix", default=None, help="finetune.mix: records added to every fine-tune's subset "
              "[default: vqa_mix.json of --pool-dir]; 'none' for the subset alone.")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=YAML", help="Override a param.")
@click.option("--out-dir", required=True, type=click.Path(path_type=Path))
@click.option("--results", default=".cache/probe/results.jsonl", show_default=True, type=click.Path(path_type=Path))
@click.option("--reuse-model", is_flag=True, help="Evaluate the model a finished run left in OUT_DIR/model (same "
              "options) instead of fine-tuning again, e.g. on a larger --per-type / --pope-per-answer slice.")
def main(pool_dir: Path, method: str, data_file: Path | None, seed: int, per_task: int, keep_ratio: float | None, base_model: Path, bench_dir: Path,
         bench_images: Path, per_type: int, pope_per_answer: int, mix: str | None, sets: tuple[str, ...], out_dir: Path,
         results: Path, reuse_model: bool) -> None:
    """Fine-tune on one subset (or none) and evaluate; print and append one result row."""
    with user_errors():
        if (method == "given") != (data_file is not None):
            raise click.UsageError("--data goes with --method given, and --method given needs --data")
        out_dir = out_dir.resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        # the first slice keeps the folder names of earlier runs; another slice gets its own
        tag = "" if (per_type, pope_per_answer) == (50, 50) else f"-{per_type}-{pope_per_answer}"
        bench, eval_dir = out_dir / f"bench{tag}", out_dir / f"eval{tag}"
        bench_slice(bench_dir, bench, per_type, pope_per_answer)
        params = yaml.safe_load(Path("params.yaml").read_text())
        params["base"].update(pool=str(pool_dir / "pool.json"), image_root=str(pool_dir / "images"),
                              base_model=str(base_model))
        params["finetune"].update(checkpoint_dir=str(out_dir / "checkpoints"), resume=False, seed=seed,
                                  mix=None if mix == "none" else mix or str(pool_dir / "vqa_mix.json"))
        params["evaluate"].update(vqa_file=str(bench / "vqa.jsonl"), pope_file=str(bench / "pope.jsonl"),
                                  image_root=str(bench_images))
        for s in sets:
            key, _, value = s.partition("=")
            section, _, name = key.partition(".")
            params[section][name] = yaml.safe_load(value)
        model = out_dir / "model" if method != "base" else base_model
        reuse = reuse_model and method != "base"
        if reuse:
            trained = out_dir / "params.yaml"
            if not (model / "config.json").is_file() or not trained.is_file():
                raise click.UsageError(f"--reuse-model: {out_dir} holds no finished run's model")
            if yaml.safe_load(trained.read_text())["finetune"] != params["finetune"]:
                raise click.UsageError(f"--reuse-model: {trained}: the model was fine-tuned with other finetune params")
        params_file = out_dir / f"params{tag}.yaml"
        params_file.write_text(yaml.safe_dump(params))
        env = {**os.environ, "ALIGN2LLAVA_NO_MLFLOW": "1"}
        common = ["--params", str(params_file), "--metrics-dir", str(out_dir)]
        t0 = time.perf_counter()
        row: dict = {"method": method, "data": str(data_file) if data_file else None, "seed": seed, "pool": str(pool_dir), "set": list(sets), "keep_ratio": keep_ratio,
                     "per_type": per_type, "pope_per_answer": pope_per_answer, "reused_model": reuse}
        if method != "base":
            pool = json.loads((pool_dir / "pool.json").read_text())
            oracle = {r["id"]: not r["defects"] for r in map(json.loads, (pool_dir / "oracle.jsonl").read_text().splitlines())}
            if data_file is None:
                chosen = subset(pool, oracle, method, seed, per_task, keep_ratio)
            else:
                chosen = json.loads(data_file.read_text())
                unknown = [r.get("id") for r in chosen if r.get("id") not in oracle]
                if unknown:
                    raise click.UsageError(f"{data_file}: {len(unknown)} records not in {pool_dir / 'oracle.jsonl'}, "
                                           f"first id {unknown[0]!r}")
            (out_dir / "subset.json").write_text(json.dumps(chosen))
            row.update(records=len(chosen), clean_share=round(sum(oracle[r["id"]] for r in chosen) / len(chosen), 3))
            if not reuse:
                subprocess.run([sys.executable, "-m", "stages.finetune", *common, "--data", str(out_dir / "subset.json"),
                                "--out-dir", str(model), "--plots-dir", str(out_dir)], env=env, check=True)
        t1 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "stages.evaluate", "--params", str(params_file), "--metrics-dir", str(eval_dir),
                        "--model", str(model), "--out-dir", str(eval_dir)], env=env, check=True)
        if method != "base":
            row.update(mix_records=json.loads((out_dir / "finetune.json").read_text())["mix_records"])
        metrics = json.loads((eval_dir / "evaluate.json").read_text())
        row.update({k: v for k, v in metrics.items() if k.startswith(("benchmark", "pope"))})
        row.update(finetune_s=None if reuse else round(t1 - t0), evaluate_s=round(time.perf_counter() - t1))
        results.parent.mkdir(parents=True, exist_ok=True)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        click.echo(json.dumps(row))


if __name__ == "__main__":
    main()
