"""finetune: answer-only labels from the chat template, the fully-masked error, LoRA and full
training on a tiny random LLaVA (loss falls, parameters change, the saved model reloads to the
same outputs), resuming from a checkpoint, and the stage through CliRunner."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from align2llava.errors import Align2LlavaError, DataError
from align2llava.models.chat import image_token_count
from align2llava.models.lora import lora_regex
from align2llava.steps.finetune.data import IGNORE_INDEX, InstructionDataset, collate, encode_record, prepare_examples
from align2llava.steps.finetune.train import (
    FinetuneParams,
    answer_loss,
    finetune,
    last_checkpoint,
    prepare_checkpoint_dir,
)
from tests.conftest import assert_summary_keys, llava_record

TURNS = [("What color is the shape?", "It is red."), ("Is there a shape?", "Yes.")]


@pytest.fixture(scope="module")
def mllm(tiny_llava):
    from align2llava.models.loading import load_mllm

    return load_mllm(tiny_llava)


def labelled_text(processor, ids, labels) -> list[str]:
    """Decoded runs of consecutive labelled tokens."""
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(processor.tokenizer.decode(cur))
            cur = []
    if cur:
        runs.append(processor.tokenizer.decode(cur))
    return runs


def test_labels_cover_exactly_the_assistant_turns(mllm):
    _, processor = mllm
    rec = llava_record("r0", "a.png", turns=TURNS)
    n = image_token_count(processor)
    ids, labels, problem = encode_record(rec, processor, n, max_length=512)
    assert problem is None
    assert labelled_text(processor, ids, labels) == ["It is red.<|im_end|>", "Yes.<|im_end|>"]
    assert sum(t == processor.image_token_id for t in ids) == n == 16
    # <image> after the text is moved first, as LLaVA does; labels do not change
    rec2 = llava_record("r1", None, turns=TURNS)
    rec2["image"] = "a.png"
    rec2["conversations"][0]["value"] = TURNS[0][0] + "\n<image>"
    ids2, labels2, _ = encode_record(rec2, processor, n, max_length=512)
    assert (ids2, labels2) == (ids, labels)


def test_text_only_record_has_no_image_tokens(mllm):
    _, processor = mllm
    ids, labels, problem = encode_record(llava_record("t", None, turns=TURNS), processor, 16, 512)
    assert problem is None and processor.image_token_id not in ids
    assert labelled_text(processor, ids, labels) == ["It is red.<|im_end|>", "Yes.<|im_end|>"]


def test_fully_masked_record_is_an_error_naming_file_record_and_id(mllm, image_root):
    _, processor = mllm
    long_q = "Describe every detail of the shape in the picture please " * 6
    records = [
        llava_record("ok-0", "a.png"),
        llava_record("long-1", "a.png", turns=[(long_q, "Red.")]),
    ]
    # fits: the first record trains
    n_first = len(encode_record(records[0], processor, 16, 10_000)[0])
    with pytest.raises(DataError) as err:
        prepare_examples(records, processor, file="cur.json", max_length=n_first + 2, image_root=image_root)
    msg = str(err.value)
    assert msg.startswith("cur.json: record 1 (id long-1): no answer tokens left to train on")
    assert f"max_length={n_first + 2}" in msg
    # with room for the answer the same record is fine
    examples = prepare_examples(records, processor, file="cur.json", max_length=512, image_root=image_root)
    assert [e.id for e in examples] == ["ok-0", "long-1"]


def test_image_cut_by_max_length_is_an_error(mllm, image_root):
    _, processor = mllm
    with pytest.raises(DataError, match=r"record 0 \(id a\): the image's tokens end at position"):
        prepare_examples([llava_record("a", "a.png")], processor, file="f.json", max_length=10, image_root=image_root)


def test_answer_loss_equals_the_models_own_loss(mllm, image_root):
    import torch

    model, processor = mllm
    recs = [llava_record("a", "a.png", turns=TURNS), llava_record("b", "b.png"), llava_record("c", None)]
    ds = InstructionDataset(prepare_examples(recs, processor, file="f", max_length=512, image_root=image_root), processor)
    batch = collate([ds[i] for i in range(3)], processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape[0] == 2  # only records with images
    with torch.no_grad():
        ref = model(**batch).loss
        mine, out = answer_loss(model, batch)
    assert torch.isfinite(mine) and abs(mine.item() - ref.item()) < 1e-5
    assert out.logits.shape[1] < batch["input_ids"].shape[1]  # lm_head ran on fewer positions


def test_target_regex_limits_lora_to_llm_layers():
    import re

    rx = lora_regex(["q_proj", "down_proj"], [-1, 0], 4)
    assert re.fullmatch(rx, "model.language_model.layers.3.self_attn.q_proj")
    assert re.fullmatch(rx, "model.language_model.layers.0.mlp.down_proj")
    assert not re.fullmatch(rx, "model.language_model.layers.2.self_attn.q_proj")
    assert not re.fullmatch(rx, "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj")
    assert not re.fullmatch(lora_regex("all-linear"), "lm_head")
    with pytest.raises(Align2LlavaError, match="layer 4 does not exist"):
        lora_regex(["q_proj"], [4], 4)


@pytest.fixture
def train_data(tmp_path, image_root) -> Path:
    recs = []
    for i in range(8):
        img, col = ("a.png", "red") if i % 2 == 0 else ("b.png", "blue")
        recs.append(llava_record(f"r{i}", img, turns=[("What color is the shape?", f"It is {col}.")]))
    path = tmp_path / "curated.json"
    path.write_text(json.dumps(recs))
    return path


def _params(tmp_path, **kw) -> FinetuneParams:
    base = dict(
        lora_r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=5e-3, mm_projector_lr=1e-3,
        freeze_mm_mlp_adapter=False, per_device_train_batch_size=4, max_steps=8, warmup_ratio=0.0,
        lr_scheduler_type="constant", save_steps=100, max_length=256, layers_to_transform=None,
        checkpoint_dir=str(tmp_path / "ckpt"),
    )
    return FinetuneParams(**{**base, **kw})


def _state(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_finetune_trains_changes_params_and_reloads(mode, tiny_llava, train_data, image_root, tmp_path):
    import torch

    from align2llava.models.loading import load_mllm

    out = tmp_path / "model"
    result = finetune(
        _params(tmp_path, mode=mode), base_model=tiny_llava, data=train_data, image_root=image_root, out_dir=out,
        dtype="float32",
    )
    losses = [s["loss"] for s in result.steps]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2
    m = result.metrics
    assert m["steps"] == 8 and m["train_records"] == 8 and m["train_seconds"] > 0 and m["peak_rss_mb"] > 0
    assert not (tmp_path / "ckpt").exists()  # removed after success

    before, after = _state(tiny_llava), _state(out)
    assert set(before) == set(after)  # merged: plain LLaVA weights, no LoRA keys
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("layers.1.self_attn.q_proj" in k and "vision" not in k for k in changed)
    assert any("multi_modal_projector" in k for k in changed)
    assert not any("vision_tower" in k for k in changed)

    model, processor = load_mllm(out)
    ds = InstructionDataset(
        prepare_examples(json.loads(train_data.read_text())[:2], processor, file="f", max_length=256, image_root=image_root),
        processor,
    )
    batch = collate([ds[0], ds[1]], processor.tokenizer.pad_token_id)
    result.model.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, result.model(**batch).logits, atol=1e-5)


def test_frozen_projector_and_top_layers_only(tiny_llava, train_data, image_root, tmp_path):
    import torch

    out = tmp_path / "model"
    params = _params(tmp_path, freeze_mm_mlp_adapter=True, layers_to_transform=[-1], max_steps=2)
    finetune(params, base_model=tiny_llava, data=train_data, image_root=image_root, out_dir=out, dtype="float32")
    before, after = _state(tiny_llava), _state(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("language_model" in k and "layers.1." in k for k in changed)


def test_mode_none_saves_the_base_unchanged(tiny_llava, train_data, image_root, tmp_path):
    import torch

    out = tmp_path / "model"
    result = finetune(_params(tmp_path, mode="none"), base_model=tiny_llava, data=train_data, image_root=image_root,
                      out_dir=out, dtype="float32")
    assert result.steps == [] and result.metrics["train_records"] == 0 and result.metrics["steps"] == 0
    before, after = _state(tiny_llava), _state(out)
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)


def test_mix_records_are_trained_on_next_to_the_selection(tiny_llava, train_data, image_root, tmp_path):
    recs = [llava_record(f"m{i}", "a.png", turns=[("What shape is it?", "Circle")]) for i in range(3)]
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps(recs))
    params = _params(tmp_path, mix=str(mix), max_steps=-1, num_train_epochs=1)
    result = finetune(params, base_model=tiny_llava, data=train_data, image_root=image_root,
                      out_dir=tmp_path / "model", dtype="float32")
    m = result.metrics
    assert (m["train_records"], m["mix_records"], m["steps"]) == (8, 3, 3)  # 11 records, batches of 4


@pytest.mark.parametrize("problem", ["shared id", "bad record", "missing file"])
def test_a_bad_mix_is_an_error_naming_the_mix_file(problem, tiny_llava, train_data, image_root, tmp_path):
    mix = tmp_path / "mix.json"
    if problem == "shared id":
        mix.write_text(json.dumps([llava_record("r3", "a.png", turns=[("Q?", "A")])]))
    elif problem == "bad record":
        mix.write_text(json.dumps([{"id": "m0", "image": "a.png", "conversations": []}]))
    with pytest.raises(DataError, match=str(mix)) as err:
        finetune(_params(tmp_path, mix=str(mix)), base_model=tiny_llava, data=train_data, image_root=image_root,
                 out_dir=tmp_path / "model", dtype="float32")
    assert "\n" not in str(err.value)
    if problem == "shared id":
        assert "'r3' is also in" in str(err.value)


class Stop(Exception):
    pass


def test_interrupted_run_resumes_from_last_checkpoint(tiny_llava, train_data, image_root, tmp_path):
    params = _params(tmp_path, save_steps=2, max_steps=6)

    def crash(step, values):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        finetune(params, base_model=tiny_llava, data=train_data, image_root=image_root,
                 out_dir=tmp_path / "m", on_step=crash, dtype="float32")
    ckpts = sorted(p.name for p in (tmp_path / "ckpt").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2"]
    assert (tmp_path / "ckpt" / "checkpoint-2" / "adapter_model.safetensors").exists()
    seen = []
    result = finetune(params, base_model=tiny_llava, data=train_data, image_root=image_root,
                      out_dir=tmp_path / "m", on_step=lambda s, v: seen.append(s), dtype="float32")
    assert result.metrics["resumed_from_step"] == 2 and result.metrics["steps"] == 6
    assert seen == [3, 4, 5, 6]
    assert [s["step"] for s in result.steps] == [1, 2, 3, 4, 5, 6]  # curve includes resumed history



def test_checkpoints_of_other_data_or_params_are_not_resumed(tmp_path):
    folder = tmp_path / "ckpt"
    (folder / "checkpoint-4").mkdir(parents=True)
    (folder / "fingerprint.txt").write_text("abc\n")
    prepare_checkpoint_dir(folder, "abc", resume=True)
    assert last_checkpoint(folder) == folder / "checkpoint-4"
    prepare_checkpoint_dir(folder, "other", resume=True)
    assert last_checkpoint(folder) is None and (folder / "fingerprint.txt").read_text() == "other\n"
    (folder / "checkpoint-2").mkdir()
    prepare_checkpoint_dir(folder, "other", resume=False)
    assert last_checkpoint(folder) is None


def _write_params(tmp_path, tiny_llava, image_root, **finetune_kw) -> Path:
    from tests.conftest import ROOT

    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["base"].update(base_model=str(tiny_llava), image_root=str(image_root))
    data["finetune"].update(
        max_steps=3, per_device_train_batch_size=4, lora_r=4, lora_alpha=8,
        checkpoint_dir=str(tmp_path / "ckpt"), layers_to_transform=[-1], **{"mix": None, **finetune_kw}
    )
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_stage_cli(tiny_llava, train_data, image_root, tmp_path, monkeypatch):
    from stages.finetune import main

    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    monkeypatch.chdir(tmp_path)
    params = _write_params(tmp_path, tiny_llava, image_root)
    res = CliRunner().invoke(main, ["--params", str(params), "--data", str(train_data)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "metrics" / "finetune.json").read_text())
    assert_summary_keys(metrics, "finetune")
    for key in ("train_loss", "first_loss", "final_loss", "train_seconds", "tokens_per_second",
                "peak_rss_mb", "steps", "train_records", "trainable_params"):
        assert key in metrics
    rows = list(csv.DictReader(open(tmp_path / "plots" / "finetune" / "steps.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and all(float(r["loss"]) > 0 for r in rows)
    assert (tmp_path / "models" / "finetune" / "config.json").exists()
    assert (tmp_path / "models" / "finetune" / "processor_config.json").exists()


def test_stage_cli_masked_record_is_one_line_error(tiny_llava, image_root, tmp_path, monkeypatch):
    from stages.finetune import main

    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "curated.json"
    data.write_text(json.dumps([llava_record("x-7", "a.png", turns=[("Q " * 80, "A.")])]))
    params = _write_params(tmp_path, tiny_llava, image_root, max_length=60)
    res = CliRunner().invoke(main, ["--params", str(params), "--data", str(data)])
    assert res.exit_code == 1
    assert f"Error: {data}: record 0 (id x-7): no answer tokens left to train on" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "models" / "finetune").exists()
