"""LLaVA stage 1 on a tiny random LLaVA: training, saving, reloading, passing a checkpoint through."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from tests.conftest import ROOT, assert_summary_keys, make_image

COLORS = {"red": (220, 20, 20), "green": (20, 160, 20), "blue": (20, 20, 220)}
TINY = {
    "max_captions": 30, "eval_captions": 6, "word_groups": {"color": list(COLORS)},
    "warmup_steps": 30, "warmup_batch_size": 8, "warmup_learning_rate": 3.0e-3,
    "max_steps": 30, "per_device_train_batch_size": 8, "learning_rate": 3.0e-3,
    "vision_learning_rate": 1.0e-3, "max_new_tokens": 4, "bf16": "false", "anchor_steps": 10,
    "prompt": "<image>\nWhat color is the shape?", "generate_before": True,
}


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("captions")
    names = list(COLORS)
    rows = []
    for i in range(30):
        name = names[i % 3]
        make_image(root / "images" / f"{i}.png", color=COLORS[name])
        rows.append({"id": f"c{i}", "image": f"{i}.png", "caption": f"A {name} square."})
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "captions.jsonl", root / "images"


def _params(tmp_path: Path, **section) -> Path:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["pretrain"] = {**data["pretrain"], **section}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _invoke(tmp_path: Path, captions, **section):
    from stages.pretrain import main

    cap, images = captions
    args = ["--params", str(_params(tmp_path, **section)), "--captions", str(cap), "--image-root", str(images),
            "--out-dir", str(tmp_path / "model"), "--metrics-dir", str(tmp_path / "metrics"),
            "--plots-dir", str(tmp_path / "plots")]
    return CliRunner().invoke(main, args)


@pytest.fixture(scope="module")
def trained(tiny_llava, captions, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    mp = pytest.MonkeyPatch()
    mp.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    res = _invoke(tmp, captions, init=str(tiny_llava), **TINY)
    mp.undo()
    assert res.exit_code == 0, res.output
    return tmp


def test_saved_in_hf_layout_and_reloads(trained):
    from align2llava.models.loading import load_mllm

    out = trained / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json"):
        assert (out / name).is_file(), name
    model, processor = load_mllm(out)
    assert model.config.model_type == "llava"
    assert processor.tokenizer.chat_template


def test_metrics_and_curves(trained):
    m = json.loads((trained / "metrics" / "pretrain.json").read_text())
    # the captions here ("A red square.") name no shape word, so no shape accuracy
    assert_summary_keys(m, "pretrain", absent={"after.generation_accuracy.shape"})
    assert m["passthrough"] == 0
    b, a = m["before"], m["after"]
    for key in ("caption_loss", "caption_loss_shuffled_images", "generation_accuracy"):
        assert key in b and key in a
    assert math.isfinite(a["caption_loss"]) and a["caption_loss"] < b["caption_loss"]
    assert m["align_loss_last"] < m["align_loss_first"]
    assert m["warmup_loss_last"] < m["warmup_loss_first"]
    assert set(m["warmup_probe_accuracy"]) == {"color"}
    steps = (trained / "plots" / "steps.csv").read_text().splitlines()
    assert steps[0] == "step,loss,lr" and len(steps) == 1 + TINY["max_steps"]
    assert len((trained / "plots" / "warmup.csv").read_text().splitlines()) == 1 + TINY["warmup_steps"]


def test_llm_frozen_vision_and_projector_trained(trained, tiny_llava):
    from safetensors.torch import load_file

    before = load_file(str(tiny_llava / "model.safetensors"))
    after = load_file(str(trained / "model" / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not (before[k] == after[k]).all()}
    assert any("multi_modal_projector" in k for k in changed)
    assert any("vision_tower" in k for k in changed)
    assert not any("language_model" in k or "lm_head" in k for k in changed)


def test_prefix_cache_gives_the_same_loss(tiny_llava, captions):
    import torch

    from align2llava.demo.pretrain.align import caption_loss, collate, encode, prefix_cache, prompt_text
    from align2llava.demo.pretrain.pretrain import read_captions
    from align2llava.demo.pretrain.warmup import pixel_batch
    from align2llava.models.loading import load_mllm

    model, processor = load_mllm(tiny_llava)
    tok = processor.tokenizer
    ex = read_captions(captions[0], captions[1], 4)
    prompt = prompt_text(tok, "<image>\nDescribe it.", True)
    enc = [encode(tok, prompt, e.caption, 16, "<image>") for e in ex]
    n_pre = enc[0][0].index(tok.convert_tokens_to_ids("<image>"))
    assert n_pre > 0
    ids, mask, tg = collate(enc, tok.pad_token_id)
    pix = pixel_batch(processor, captions[1], ex)
    with torch.no_grad():
        full = caption_loss(model, ids, mask, pix, tg).item()
        cached = caption_loss(model, ids, mask, pix, tg, prefix=prefix_cache(model, enc[0][0][:n_pre])).item()
    assert abs(full - cached) < 1e-5


def test_word_accuracy():
    from align2llava.demo.pretrain.align import word_accuracy

    groups = {"shape": ["circle", "triangle"], "color": ["red", "blue"]}
    acc = word_accuracy(["A red circle.", "A blue circle.", "nothing"],
                        ["A red circle.", "A red triangle.", "A blue circle."], groups)
    assert acc == {"shape": round(1 / 3, 4), "color": round(1 / 3, 4)}


def test_checkpoint_passes_through(tiny_llava, captions, tmp_path, monkeypatch):
    from align2llava.models.loading import load_mllm

    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    res = _invoke(tmp_path, captions, checkpoint=str(tiny_llava))
    assert res.exit_code == 0, res.output
    out = tmp_path / "model"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tiny_llava.iterdir())
    assert (out / "model.safetensors").read_bytes() == (tiny_llava / "model.safetensors").read_bytes()
    load_mllm(out)
    assert json.loads((tmp_path / "metrics" / "pretrain.json").read_text())["passthrough"] == 1


def test_bad_checkpoint_is_a_one_line_error(captions, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    (tmp_path / "empty").mkdir()
    res = _invoke(tmp_path, captions, checkpoint=str(tmp_path / "empty"))
    assert res.exit_code == 1
    assert res.output.startswith("Error: pretrain.checkpoint:") and "config.json" in res.output
    assert "Traceback" not in res.output


def test_prompt_without_image_token_is_refused(tiny_llava, captions, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    res = _invoke(tmp_path, captions, init=str(tiny_llava), **{**TINY, "prompt": "Describe."})
    assert res.exit_code == 1 and "pretrain.prompt" in res.output


def test_word_scores_pick_the_word_an_image_token_matches():
    import torch

    from align2llava.demo.pretrain.anchor import anchor_loss, word_scores

    emb = torch.randn(3, 16)
    tokens = torch.randn(2, 5, 16)
    tokens[0, 3] = 4 * emb[2]  # image 0 holds a token along word 2's embedding
    tokens[1, 0] = emb[1]
    scores = word_scores(tokens, emb)
    assert scores.shape == (2, 3)
    assert scores[0].argmax() == 2 and scores[1].argmax() == 1
    assert torch.isclose(scores[0, 2], torch.tensor(1.0), atol=1e-5)

    class Fake:  # anchor_loss on given tokens: the right labels cost less than wrong ones
        pass
    from align2llava.demo.pretrain import anchor as mod
    real = mod.image_tokens
    mod.image_tokens = lambda model, px: tokens
    try:
        emb_norm = {"w": emb, "_norm": emb.norm(dim=-1).median()}
        right = anchor_loss(Fake(), None, {"w": torch.tensor([2, 1])}, emb_norm, 0.1)
        wrong = anchor_loss(Fake(), None, {"w": torch.tensor([0, 2])}, emb_norm, 0.1)
    finally:
        mod.image_tokens = real
    assert right < wrong


def test_word_anchoring_trains_and_reports_held_out_accuracy(tiny_llava, captions, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    res = _invoke(tmp_path, captions, init=str(tiny_llava),
                  **{**TINY, "warmup_steps": 0, "max_steps": 4, "anchor_steps": 40, "anchor_weight": 1.0})
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "metrics" / "pretrain.json").read_text())
    assert m["anchor_steps"] == 40 and m["anchor_loss_last"] < m["anchor_loss_first"]
    assert set(m["anchor_accuracy"]) == {"color"} and 0.0 <= m["anchor_accuracy"]["color"] <= 1.0
    before = load_file(str(tiny_llava / "model.safetensors"))
    after = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert not any(("language_model" in k or "lm_head" in k) and not (before[k] == after[k]).all() for k in before)
