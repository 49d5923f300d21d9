"""The instruct stage (the reward models' base) and its grounding check, on a tiny random LLaVA."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from align2llava.demo.grounding import GROUPS, Case, grounding_cases, word_preference
from align2llava.demo.synthesis.instruct_data import instruct_record
from align2llava.demo.synthesis.world import easy_vqa_dir, load_truths, qa_facts, read_split
from tests.conftest import ROOT, assert_summary_keys


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """8 easy-vqa train images; a 'pool' of 4 (answers in another style) and 8 instruct records."""
    root = tmp_path_factory.mktemp("instruct_world")
    images, qa = read_split(easy_vqa_dir(), "train")
    ids = sorted(images)[:8]
    truths, _ = load_truths("train", ids, qa_facts(qa), images)
    for i in ids:
        (root / "images" / "train").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(images[i], root / "images" / "train" / f"{i}.png")
    pool = []
    for i in ids[:4]:
        t = truths[i]
        wrong = "red" if t.color != "red" else "blue"
        pool.append({"id": f"p{i}", "image": t.image, "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"},
            {"from": "gpt", "value": f"Certainly! The image shows a {t.color} {t.shape}."},
            {"from": "human", "value": "And its colour?"},  # a wrong first colour: no case from this turn
            {"from": "gpt", "value": f"It looks {wrong}."}]})
    (root / "pool.json").write_text(json.dumps(pool))
    (root / "instruct.json").write_text(json.dumps([instruct_record(truths[i], 0, n) for i in ids[4:] for n in (0, 1)]))
    return root


def test_grounding_cases_cut_true_answers_before_the_fact(world):
    pool = json.loads((world / "pool.json").read_text())
    cases = grounding_cases(pool, world / "images", per_group=10, seed=0)
    assert sorted(c.group for c in cases) == ["color"] * 4 + ["shape"] * 4
    for c in cases:
        rec = next(r for r in pool if r["id"] == c.id)
        answer = rec["conversations"][1]["value"]
        assert c.question == "What is shown?"  # <image> stripped; the first turn only (the second is wrong)
        assert answer.startswith(c.prefix + c.word) and c.prefix.startswith("Certainly! The image shows a")
    assert len(grounding_cases(pool, world / "images", per_group=1, seed=0)) == 2


def test_word_preference_compares_the_true_word_with_each_other(tiny_llava, world):
    """Every word of a group taken in turn as the true one: each pair is won by one side, so the
    mean win rate over the group is exactly 0.5; which word is true must matter."""
    from align2llava.models.loading import load_mllm

    model, processor = load_mllm(tiny_llava, dtype="float32")
    image = "train/" + sorted(p.name for p in (world / "images" / "train").iterdir())[0]
    cases = [Case(f"c{w}", image, "What color is it?", "It is ", w, "color") for w in GROUPS["color"]]
    m = word_preference(model, processor, cases, world / "images", batch_size=16)
    assert m["color_cases"] == 8 and "shape" not in m
    singles = [word_preference(model, processor, [c], world / "images")["color"] for c in cases]
    assert sum(singles) / len(singles) == pytest.approx(0.5, abs=1e-3)  # ties would pull it below
    assert len(set(singles)) > 1
    assert m["color"] == pytest.approx(sum(singles) / len(singles), abs=1e-3)
    assert m["color_top1"] <= 1 / 8 + 1e-9


def _params(tmp_path: Path, tiny_llava: Path, world: Path, **section) -> Path:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["base"].update(base_model=str(tiny_llava), dtype="float32")
    tune = {**data["instruct"]["tune"], "max_steps": 3, "per_device_train_batch_size": 2, "lora_r": 4, "lora_alpha": 8,
            "layers_to_transform": None, "checkpoint_dir": str(tmp_path / "ckpt")}
    data["instruct"] = {**data["instruct"], "grounding_cases": 2, "tune": tune, **section}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _invoke(tmp_path: Path, tiny_llava: Path, world: Path, **section):
    from stages.instruct import main

    args = ["--params", str(_params(tmp_path, tiny_llava, world, **section)), "--data", str(world / "instruct.json"),
            "--pool", str(world / "pool.json"), "--image-root", str(world / "images"),
            "--out-dir", str(tmp_path / "model"), "--metrics-dir", str(tmp_path / "metrics"),
            "--plots-dir", str(tmp_path / "plots")]
    return CliRunner().invoke(main, args)


def test_instruct_tunes_reports_grounding_and_saves_a_loadable_model(tiny_llava, world, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    from align2llava.models.loading import load_mllm

    res = _invoke(tmp_path, tiny_llava, world)
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "metrics" / "instruct.json").read_text())
    assert_summary_keys(m, "instruct")
    assert m["passthrough"] == 0 and m["steps"] == 3 and m["train_records"] == 8
    for when in ("grounding_before", "grounding_after"):
        assert m[when]["color_cases"] == 2 and m[when]["shape_cases"] == 2
        assert 0.0 <= m[when]["color"] <= 1.0 and 0.0 <= m[when]["shape"] <= 1.0
    assert (tmp_path / "plots" / "steps.csv").read_text().startswith("step,loss")
    model, processor = load_mllm(tmp_path / "model", dtype="float32")
    # "after" measures the saved (merged) model, "before" the base
    cases = grounding_cases(json.loads((world / "pool.json").read_text()), world / "images", 2, 0)
    assert word_preference(model, processor, cases, world / "images") == m["grounding_after"]
    base, _ = load_mllm(tiny_llava, dtype="float32")
    changed = [n for n, p in model.named_parameters() if not p.equal(dict(base.named_parameters())[n])]
    assert changed and all("language_model" in n for n in changed)  # LoRA merged; projector frozen


def test_a_checkpoint_passes_through_untouched(tiny_llava, world, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    res = _invoke(tmp_path, tiny_llava, world, checkpoint=str(tiny_llava))
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "metrics" / "instruct.json").read_text())
    assert m["passthrough"] == 1
    assert (tmp_path / "model" / "config.json").read_bytes() == (tiny_llava / "config.json").read_bytes()
    bad = _invoke(tmp_path, tiny_llava, world, checkpoint=str(tmp_path / "nowhere"))
    assert bad.exit_code == 1 and bad.output.startswith("Error: instruct.checkpoint: ") and "Traceback" not in bad.output
