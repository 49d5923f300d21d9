"""Do scores and generations depend on the thread count? float32 vs bf16, on tiny random models.

    python -m benchmarks.precision_spread                       # hidden 64, 48 records, 1 vs 2 threads
    python -m benchmarks.precision_spread --hidden 576 --layers 30 --image-size 64 --no-restyle

Builds two random reward models (random head and LoRA, like the tests' fixtures) on a tiny random
LLaVA, then scores the same synthetic pool once per dtype and thread count, each in its own
process (OMP_NUM_THREADS and torch.set_num_threads set before the first op), at score.batch_size
32. Prints per dtype: seconds per run, the largest |score difference| between the first thread
count and each other, how many records' question or answer score changed, and the time
relative to float32. Then the same for the inner LLM (restyle's InnerLLM on the same base):
greedy rewrites that changed and the largest review-logit difference, float32 vs bfloat16.
Timings on a shared machine are noisy; the differences are what the precision policy
(align2llava.models.precision) is about.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from align2llava.ops.clikit import setup_logging, user_errors

WORDS = ("the red circle sits near the top left corner of the light image and a blue square is below it "
         "while a green triangle shape points to the right").split()


def build(tmp: Path, hidden: int, n_records: int, layers: int = 2, image_size: int = 32) -> dict:
    """Tiny base, two reward models and a pool under `tmp`; returns the paths."""
    import torch

    from align2llava.models.build import build_tiny_llava, llava_record, make_image
    from align2llava.models.reward_model import save_reward_model
    from align2llava.steps.reward_training.train import TrainRewardParams, build_reward_model

    base = build_tiny_llava(tmp / "base", hidden=hidden, layers=layers, image_size=image_size)
    params = TrainRewardParams(lora_r=4, lora_alpha=8, lora_dropout=0.0, dtype="float32",
                               layers_to_transform=[-1], train_projector=False, max_length=96)
    for seed, kind in enumerate(("question", "answer")):
        rm, _ = build_reward_model(base, params)
        torch.manual_seed(seed)
        torch.nn.init.normal_(rm.head.weight)
        for n, p in rm.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.3)
        save_reward_model(rm, tmp / kind, kind=kind, backbone=str(base), max_length=96)
    make_image(tmp / "images" / "a.png")
    make_image(tmp / "images" / "b.png", color=(30, 30, 200))
    recs = []
    for i in range(n_records):
        turns = [(" ".join(WORDS[k: k + 4 + i % 5]) + "?", " ".join(WORDS[i % 7: i % 7 + 5 + (i * 3 + k) % 14]) + ".")
                 for k in range(1 + i % 3)]
        recs.append(llava_record(f"r{i:03d}", "a.png" if i % 2 else "b.png", task="conversation", turns=turns))
    (tmp / "pool.json").write_text(json.dumps(recs))
    return {"base": str(base), "question": str(tmp / "question"), "answer": str(tmp / "answer"),
            "images": str(tmp / "images"), "pool": str(tmp / "pool.json")}


def worker(spec: dict) -> dict:
    """One run in this process: score the pool (or run the inner LLM) at spec's dtype."""
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["what"] == "score":
        from align2llava.steps.scoring import load_reward_models, score_records

        models = load_reward_models(spec["question"], spec["answer"], image_root=spec["images"], dtype=spec["dtype"])
        recs = json.loads(Path(spec["pool"]).read_text())
        score_records(models, recs[:2], 32)  # warm-up
        t = time.perf_counter()
        rows = score_records(models, recs, 32)
        return {"seconds": time.perf_counter() - t,
                "scores": {r["id"]: [r["question_score"], r["answer_score"]] for r in rows}}
    from align2llava.steps.restyle.llm import REVIEW_LABELS, InnerLLM, review_messages, rewrite_messages

    llm = InnerLLM(spec["base"], dtype=spec["dtype"], batch_size=16)
    recs = json.loads(Path(spec["pool"]).read_text())[:16]
    qa = [(r["conversations"][0]["value"].replace("<image>\n", ""), r["conversations"][1]["value"]) for r in recs]
    t = time.perf_counter()
    texts = [g["text"] for g in llm.generate([llm.chat(rewrite_messages(q, a)) for q, a in qa], [24] * len(qa))]
    logits = llm.choice_logits([llm.chat(review_messages(q, a, a[::-1])) for q, a in qa], REVIEW_LABELS)
    return {"seconds": time.perf_counter() - t, "texts": texts, "logits": logits}


def run_worker(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    out = subprocess.run([sys.executable, "-m", "benchmarks.precision_spread", "--worker", json.dumps(spec)],
                         env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise click.ClickException(f"worker {spec['what']} {spec['dtype']} x{spec['threads']} failed: "
                                   f"{out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--hidden", default=64, show_default=True, help="Hidden size of the tiny LLaVA.")
@click.option("--layers", default=2, show_default=True, help="Its layers (LLM and vision tower).")
@click.option("--image-size", default=32, show_default=True, help="Its image size (patch 8).")
@click.option("--records", "n_records", default=48, show_default=True, help="Pool records to score.")
@click.option("--threads", default="1,2", show_default=True, help="Thread counts to compare (first = reference).")
@click.option("--dtypes", default="float32,mixed,bfloat16", show_default=True, help="score.dtype settings to run.")
@click.option("--restyle/--no-restyle", default=True, show_default=True, help="Also compare the inner LLM.")
@click.option("--worker", "worker_spec", default=None, hidden=True)
def main(hidden: int, layers: int, image_size: int, n_records: int, threads: str, dtypes: str, restyle: bool, worker_spec: str | None) -> None:
    """Print the score and generation spread across thread counts per dtype."""
    if worker_spec:
        click.echo(json.dumps(worker(json.loads(worker_spec))))
        return
    setup_logging()
    with user_errors():
        counts = [int(x) for x in threads.split(",")]
        settings = dtypes.split(",")
        with tempfile.TemporaryDirectory() as tmp:
            paths = build(Path(tmp), hidden, n_records, layers, image_size)
            n_img = (image_size // 8) ** 2
            click.echo(f"tiny LLaVA hidden {hidden}, {layers} layers, {n_img} image tokens; {n_records} records; "
                       f"threads {counts}; "
                       f"torch intra-op threads per run set in a fresh process")
            from align2llava.models.precision import native_bf16, resolve

            click.echo(f"this CPU: native bf16 {native_bf16('cpu')}; auto means score {resolve('auto', 'cpu', 'score')}, "
                       f"restyle {resolve('auto', 'cpu', 'restyle')}")
            click.echo(f"{'score.dtype':12} {'threads':>7} {'s/run':>7} {'max |d score|':>14} {'records changed':>16} "
                       f"{'time / float32':>15}")
            base_time: dict[int, float] = {}
            for dt in settings:
                runs = {n: run_worker({**paths, "what": "score", "dtype": dt, "threads": n}) for n in counts}
                ref = runs[counts[0]]["scores"]
                for n in counts:
                    s = runs[n]["scores"]
                    diff = max(abs(a - b) for k in ref for a, b in zip(ref[k], s[k]))
                    changed = sum(ref[k] != s[k] for k in ref)
                    secs = runs[n]["seconds"]
                    if dt == "float32":
                        base_time[n] = secs
                    ratio = f"{secs / base_time[n]:.2f}" if n in base_time else "-"
                    click.echo(f"{dt:12} {n:7d} {secs:7.3f} {diff:14.2e} {changed:9d}/{len(ref):<6d} {ratio:>15}")
            if not restyle:
                return
            click.echo(f"\n{'restyle.dtype':13} {'threads':>7} {'s/run':>7} {'rewrites changed':>17} "
                       f"{'max |d review logit|':>21}")
            for dt in ("float32", "bfloat16"):
                runs = {n: run_worker({**paths, "what": "restyle", "dtype": dt, "threads": n}) for n in counts}
                ref = runs[counts[0]]
                for n in counts:
                    r = runs[n]
                    changed = sum(a != b for a, b in zip(ref["texts"], r["texts"]))
                    diff = max(abs(a - b) for x, y in zip(ref["logits"], r["logits"]) for a, b in zip(x, y))
                    click.echo(f"{dt:13} {n:7d} {r['seconds']:7.3f} {changed:10d}/{len(r['texts']):<6d} {diff:21.2e}")


if __name__ == "__main__":
    main()
