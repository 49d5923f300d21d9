"""score: pool items, batched scoring, resume, 2 processes, rejects, the stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from align2llava.data.records import IMAGE_TOKEN
from align2llava.steps.scoring import (
    ScoreParams,
    load_pool,
    load_reward_models,
    read_scores,
    record_items,
    score_pool,
    score_records,
)
from tests.conftest import ROOT, assert_summary_keys, llava_record, make_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def tiny_rms(tiny_llava, tmp_path_factory):
    """Untrained but non-trivial question and answer RMs (random head and LoRA) on tiny_llava."""
    import torch

    from align2llava.models.reward_model import save_reward_model
    from align2llava.steps.reward_training.train import TrainRewardParams, build_reward_model

    out = tmp_path_factory.mktemp("rms")
    params = TrainRewardParams(lora_r=4, lora_alpha=8, lora_dropout=0.0, dtype="float32",
                               layers_to_transform=[-1], train_projector=False, max_length=64)
    for seed, kind in enumerate(("question", "answer")):
        rm, _ = build_reward_model(tiny_llava, params)
        torch.manual_seed(seed)
        torch.nn.init.normal_(rm.head.weight)
        for n, p in rm.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.3)
        save_reward_model(rm, out / kind, kind=kind, backbone=str(tiny_llava), max_length=64)
    return out


def pool_records():
    recs = []
    turns = [("What color is the shape?", "It is red."), ("Where is it?", "Top left."),
             ("Is it big?", "No, it is small.")]
    for i in range(11):
        rec = llava_record(f"r{i:02d}", "a.png" if i % 2 else "b.png", task="conversation",
                           turns=turns[: 1 + i % 3])
        recs.append(rec)
    recs[4]["conversations"][1]["value"] = ["It is red.", "It is blue.", "A dog."]
    recs[4]["conversations"][1]["score"] = [1.0, 0.0, 0.0]
    recs.append(llava_record("text-only", None, task="detail", turns=[("Say hi.", "Hi there.")]))
    return recs


def answer_candidates(recs) -> int:
    """Candidate answers in `recs` (a gpt turn holds one answer or a list of them)."""
    return sum(len(t["value"]) if isinstance(t["value"], list) else 1
               for r in recs for t in r["conversations"] if t["from"] == "gpt")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def params_for(rms, tmp_path, **kw):
    return ScoreParams(question_model=str(rms / "question"), answer_model=str(rms / "answer"),
                       dtype="float32", work_dir=str(tmp_path / "work"), **kw)


def test_record_items_candidates_and_text():
    rec = llava_record("x", "a.png", turns=[("What?", ["A.", "B."]), ("Why?", "C.")])
    q, turns = record_items(rec)
    assert q == "What?\nWhy?" and IMAGE_TOKEN not in q
    assert turns == [["Question: What?\nAnswer: A.", "Question: What?\nAnswer: B."],
                     ["Question: Why?\nAnswer: C."]]


def test_score_records_rows(tiny_rms, image_root):
    models = load_reward_models(tiny_rms / "question", tiny_rms / "answer", image_root=image_root, dtype="float32")
    recs = pool_records()
    rows = score_records(models, recs, batch_size=4)
    assert [r["id"] for r in rows] == [r["id"] for r in recs]
    r4 = rows[4]
    assert len(r4["turns"][0]["scores"]) == 3
    assert r4["turns"][0]["best"] == max(range(3), key=lambda i: r4["turns"][0]["scores"][i])
    for r in rows:
        best = [t["scores"][t["best"]] for t in r["turns"]]
        assert r["answer_score"] == pytest.approx(sum(best) / len(best), abs=1e-6)
        assert r["task"] in ("conversation", "detail")
    assert len({r["question_score"] for r in rows}) > 2
    # batching and order do not change a record's scores
    one = score_records(models, [recs[7]], batch_size=1)[0]
    assert one["question_score"] == pytest.approx(rows[7]["question_score"], abs=1e-4)
    assert one["answer_score"] == pytest.approx(rows[7]["answer_score"], abs=1e-4)


def test_resume_after_interruption_gives_identical_output(tiny_rms, image_root, tmp_path):
    recs = pool_records()
    p = params_for(tiny_rms, tmp_path, shard_size=3, batch_size=4)
    full = score_pool(recs, p, tmp_path / "full.jsonl", image_root=image_root)
    answers = answer_candidates(recs)
    assert answers == 24  # 21 turns in 11 records (+2: one turn has 3 candidates), a text-only one
    assert full.shards == 4 and full.shards_resumed == 0
    assert (full.records, full.answer_items, full.records_this_run, full.items_this_run) == (12, answers, 12, 12 + answers)
    assert full.records_per_s_this_run == pytest.approx(12 / full.scoring_seconds_this_run)
    p2 = params_for(tiny_rms, tmp_path / "b", shard_size=3, batch_size=4)
    assert score_pool(recs, p2, tmp_path / "resumed.jsonl", image_root=image_root, stop_after_shards=2) is None
    assert not (tmp_path / "resumed.jsonl").exists()
    (tmp_path / "b/work/shard-00002.jsonl.tmp").write_text("half a shard")  # killed mid-write
    again = score_pool(recs, p2, tmp_path / "resumed.jsonl", image_root=image_root)
    assert again.shards_resumed == 2
    # counts describe the whole output; the run figures only the 2 shards scored now
    assert (again.records, again.answer_items) == (12, answers)
    assert again.records_this_run == 6 and again.items_this_run == 6 + answer_candidates(recs[6:])
    assert (tmp_path / "resumed.jsonl").read_bytes() == (tmp_path / "full.jsonl").read_bytes()
    assert not list((tmp_path / "b/work").glob("shard-*.jsonl"))
    # shards made from other inputs are not reused
    p3 = params_for(tiny_rms, tmp_path / "c", shard_size=3, batch_size=4)
    score_pool(recs, p3, tmp_path / "c.jsonl", image_root=image_root, stop_after_shards=1)
    changed = [dict(r) for r in recs]
    changed[0] = llava_record("r00", "a.png", task="conversation", turns=[("Other?", "Yes.")])
    s = score_pool(changed, p3, tmp_path / "c.jsonl", image_root=image_root)
    assert s.shards_resumed == 0


def test_two_processes_match_one(tiny_rms, image_root, tmp_path):
    """The stage under torchrun with 2 CPU processes, resuming 2 shards (one of each process),
    writes the same file as one process; its metrics count both processes' work."""
    import torch

    from align2llava.config import BaseParams
    from align2llava.data.io import write_records

    recs = pool_records()
    write_records(recs, tmp_path / "pool.json")
    score = {"question_model": str(tiny_rms / "question"), "answer_model": str(tiny_rms / "answer"),
             "dtype": "float32", "shard_size": 2, "batch_size": 4,
             "work_dir": str(tmp_path / "work2")}
    assert torch.get_num_threads() == 1  # as each torchrun process below (OMP_NUM_THREADS=1)
    score_pool(recs, ScoreParams(**{**score, "work_dir": str(tmp_path / "work1")}),
               tmp_path / "one.jsonl", image_root=image_root)
    base = {"seed": 0, "pool": str(tmp_path / "pool.json"), "image_root": str(image_root)}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"base": base, "score": score}))
    # shards 0 and 1 finished by an earlier, interrupted run (the stage's fingerprint: base params)
    assert score_pool(recs, ScoreParams(**score), tmp_path / "unused.jsonl", image_root=image_root,
                      extra_fingerprint=BaseParams(**base).model_dump(), stop_after_shards=2) is None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "stages.score", "--params", "params.yaml", "--out-dir", "out2"]
    env = dict(os.environ, ALIGN2LLAVA_NO_MLFLOW="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics" / "score.json").read_text())
    assert metrics["processes"] == 2 and metrics["scored"] == 12 and metrics["shards"] == 6
    assert metrics["answer_items"] == answer_candidates(recs) and metrics["shards_resumed"] == 2
    assert metrics["scored_this_run"] == 8 and metrics["items_this_run"] == 8 + answer_candidates(recs[4:])
    two = (tmp_path / "out2" / "scores.jsonl").read_bytes()
    assert len(two.splitlines()) == 12
    assert two == (tmp_path / "one.jsonl").read_bytes()


_SCORE_AT = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from align2llava.steps.scoring import ScoreParams, load_reward_models, score_records
from tests.test_scoring import pool_records
models = load_reward_models(sys.argv[2] + "/question", sys.argv[2] + "/answer", image_root=sys.argv[3],
                            dtype=ScoreParams().dtype)
print(json.dumps([str(models.question.autocast_dtype), score_records(models, pool_records(), 4)]))
"""


def test_default_scores_do_not_depend_on_the_thread_count(tiny_rms, image_root):
    """score.dtype's default (auto) on a CPU: float32, and the same scores at 1 and 2 threads."""
    from align2llava.models.precision import resolve

    assert ScoreParams().dtype == "auto" and str(resolve("auto", "cpu", "score")) == "float32"
    procs = [subprocess.Popen([sys.executable, "-c", _SCORE_AT, str(n), str(tiny_rms), str(image_root)], cwd=ROOT,
                              env=dict(os.environ, OMP_NUM_THREADS=str(n), PYTHONPATH=str(ROOT)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (1, 2)]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    (amp1, one), (amp2, two) = outs
    assert amp1 == amp2 == "None"  # no bf16 autocast under the default on a CPU
    assert len(one) == len(pool_records()) and one == two


def test_load_pool_rejects_bad_records(tmp_path, image_root):
    recs = pool_records()
    recs[2]["conversations"][0]["from"] = "gpt"
    recs[3]["image"] = "missing.png"
    recs.append(dict(recs[0]))  # duplicate id
    (tmp_path / "pool.json").write_text(json.dumps(recs))
    good, rejects, total = load_pool(tmp_path / "pool.json", image_root, 3)
    assert total == 13 and len(good) == 10 and rejects.count == 3
    reasons = [r["reason"] for r in rejects.rows]
    assert "expected 'human'" in reasons[0] and "not found" in reasons[1] and "duplicate id" in reasons[2]


def test_stage_writes_scores_rejects_and_metrics(tiny_rms, tmp_path, monkeypatch):
    from stages.score import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    make_image(tmp_path / "images" / "a.png")
    make_image(tmp_path / "images" / "b.png", color=(30, 30, 200))
    recs = pool_records()
    recs[5]["conversations"][1]["value"] = ""
    (tmp_path / "pool.json").write_text(json.dumps(recs))
    score = {"question_model": str(tiny_rms / "question"), "answer_model": str(tiny_rms / "answer"),
             "dtype": "float32", "reject_budget": 1, "shard_size": 4,
             "work_dir": "work"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"base": {"seed": 0, "pool": "pool.json", "image_root": "images"}, "score": score}))
    res = CliRunner().invoke(main, ["--stop-after-shards", "1"])  # interrupted after one shard
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "data/score/scores.jsonl").exists()
    res = CliRunner().invoke(main, ["-v"])
    assert res.exit_code == 0, res.output
    rows = read_scores(tmp_path / "data/score/scores.jsonl")
    assert len(rows) == 11 and "r05" not in {r["id"] for r in rows}
    assert all(set(r) == {"id", "task", "question_score", "answer_score", "turns"} for r in rows)
    rejects = (tmp_path / "data/score/rejects.jsonl").read_text().splitlines()
    assert len(rejects) == 1 and "empty" in json.loads(rejects[0])["reason"]
    m = json.loads((tmp_path / "metrics/score.json").read_text())
    assert_summary_keys(m, "score")
    good = [r for r in recs if r["id"] != "r05"]
    assert m["records"] == 12 and m["scored"] == 11 and m["rejected"] == 1
    assert m["answer_items"] == answer_candidates(good) == sum(len(t["scores"]) for r in rows for t in r["turns"])
    assert (m["shards"], m["shards_resumed"], m["scored_this_run"]) == (3, 1, 7)
    assert m["items_this_run"] == 7 + answer_candidates(good[4:]) and m["records_per_s_this_run"] > 0
    assert "defect_auroc" not in m  # demo diagnostics live in the diagnose stage
    score["reject_budget"] = 0.01
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"base": {"seed": 0, "pool": "pool.json", "image_root": "images"}, "score": score}))
    res = CliRunner().invoke(main, [])
    assert res.exit_code == 1 and "over the budget" in res.output and "Traceback" not in res.output
