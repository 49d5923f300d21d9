"""The curation report at scale: time and size of reports/curation for a pool of N records.

    python -m benchmarks.report_scale                     # 158,000 records (LLaVA-Instruct-158k)
    python -m benchmarks.report_scale --records 900       # the demo's size

Makes a synthetic run in a temporary folder (pool, scores, the real selection's audit, a
restyle log for the kept records, 64 distinct images), builds the report and prints the time of
each part, the page's size, the whole folder's size, the gallery's card count and the id index's
shard count, and how long headless Chromium takes to load and screenshot the page (when
`chromium` is on PATH).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import click

TASKS = ("conversation", "detail", "complex_reasoning")


def synthesize(tmp: Path, n: int, seed: int = 0) -> dict[str, Path]:
    from align2llava.models.build import make_image
    from align2llava.steps.selection import SelectParams, parse_scores, select

    rng = random.Random(seed)
    images = tmp / "images"
    for i in range(64):
        make_image(images / f"{i}.png", color=(rng.randrange(256), rng.randrange(256), rng.randrange(256)), size=(64, 64))
    pool, rows = [], []
    for i in range(n):
        task = TASKS[i % 3]
        turns = 2 if task == "conversation" else 1
        convs = []
        for k in range(turns):
            q = ("<image>\n" if k == 0 else "") + f"What is shown in part {k} of picture {i}?"
            a = " ".join(rng.choice(("The", "circle", "is", "red", "small", "left", "shape", "image")) for _ in range(30))
            convs += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        pool.append({"id": f"rec-{i:07d}", "image": f"{i % 64}.png", "conversations": convs, "task": task})
        ts = [round(rng.gauss(2, 1.5), 4) for _ in range(turns)]
        rows.append({"id": f"rec-{i:07d}", "task": task, "question_score": round(rng.gauss(3, 2), 4),
                     "answer_score": round(sum(ts) / turns, 4),
                     "turns": [{"turn": k, "scores": [s], "best": 0} for k, s in enumerate(ts)]})
    sel = select(pool, parse_scores(rows), SelectParams())
    paths = {"pool": tmp / "pool.json", "images": images, "scores": tmp / "scores.jsonl", "audit": tmp / "audit.jsonl",
             "log": tmp / "log.jsonl", "metrics": tmp / "metrics"}
    paths["pool"].write_text(json.dumps(pool))
    paths["scores"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["audit"].write_text("".join(json.dumps(r) + "\n" for r in sel.audit))
    with open(paths["log"], "w") as f:
        for rec in sel.selected:
            for k in range(len(rec["conversations"]) // 2):
                orig = rec["conversations"][2 * k + 1]["value"]
                reason = rng.choice((None, "review", "content_check", "unchanged"))
                f.write(json.dumps({"id": rec["id"], "turn": k, "original": orig, "rewrite": orig.replace("red", "blue"),
                                    "verdict": "rewrite" if reason is None else "original", "check": {"passed": True, "failures": []},
                                    "kept": "rewrite" if reason is None else "original", "reason": reason,
                                    "p_rewrite": 0.6, "review_logodds": [0.4], "rewrite_label": "A"}) + "\n")
    paths["metrics"].mkdir()
    return paths


@click.command()
@click.option("--records", default=158_000, show_default=True, help="Pool size.")
@click.option("--keep", is_flag=True, help="Keep the temporary folder and print its path.")
def main(records: int, keep: bool) -> None:
    from align2llava.report.report import ReportInputs, ReportParams, run_report

    tmp = Path(tempfile.mkdtemp(prefix="report-scale-"))
    t0 = time.perf_counter()
    p = synthesize(tmp, records)
    t_syn = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = run_report(ReportInputs(pool=p["pool"], image_root=p["images"], scores=p["scores"], audit=p["audit"],
                                restyle_log=p["log"], curated=tmp / "none.json", metrics_dir=p["metrics"],
                                compression=None, dvc_lock=None), ReportParams(), tmp / "report")
    t_rep = time.perf_counter() - t0
    m = r.metrics
    print(f"records            {records:,}  (synthetic run made in {t_syn:.1f} s)")
    print(f"report build       {t_rep:.1f} s")
    print(f"index.html         {m['index_bytes'] / 1e6:.2f} MB, {m['gallery_cards']} gallery cards, "
          f"{m['restyle_examples']} restyle examples")
    print(f"folder             {m['folder_bytes'] / 1e6:.2f} MB ({m['thumbnails']} thumbnails, {m['id_shards']} id shards)")
    chromium = shutil.which("chromium")
    if chromium:
        t0 = time.perf_counter()
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp / 'profile'}",
                        f"--screenshot={tmp / 'shot.png'}", "--window-size=1280,2000", r.index.as_uri()],
                       capture_output=True, timeout=300)
        print(f"chromium load+shot {time.perf_counter() - t0:.1f} s (browser start included)")
    if keep:
        print(tmp)
    else:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
