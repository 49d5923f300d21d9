"""Reward models: inputs, corruption, the frozen-prefix cache, training, save/reload, the stage."""

from __future__ import annotations

import csv
import json
import math
import random
import re

import pytest
import yaml
from click.testing import CliRunner

from align2llava.models.reward_model import (
    Encoder,
    answer_text,
    last_token_index,
    load_reward_model,
    question_text,
    score_items,
)
from align2llava.steps.reward_training.pairs import augmentation_pairs, corrupt, image_swap_pairs, mismatch_pairs
from align2llava.steps.reward_training.train import (
    TrainRewardParams,
    build_reward_model,
    pairwise_accuracy,
    train_reward_model,
)
from tests.conftest import assert_summary_keys

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0, dtype="float32", max_length=64,
            per_device_train_batch_size=8, per_device_eval_batch_size=16, warmup_ratio=0.0)


def test_input_texts():
    assert question_text(["What is it? ", "Why?"]) == "What is it?\nWhy?"
    assert answer_text(" Colour? ", "Red. ") == "Question: Colour?\nAnswer: Red."


def test_corruption_changes_text_and_keeps_words():
    rng = random.Random(0)
    text = "the red circle sits in the upper left corner"
    for _ in range(20):
        bad = corrupt(text, "answer", rng)
        assert bad is not None and bad != text
        assert set(bad.split()) <= set(text.split())
    qs = "What colour is it?\nWhere is it?\nHow big is it?"
    for _ in range(20):
        bad = corrupt(qs, "question", rng)
        assert bad is not None and bad != qs
        assert set(bad.split("\n")) <= set(qs.split("\n"))
    assert corrupt("Yes.", "answer", rng) is None
    one = corrupt("What colour is the shape?", "question", rng)
    assert one is not None and one != "What colour is the shape?"


def test_augmentation_rate_and_determinism():
    pairs = [{"group": f"g{i}", "image": "a.png", "prompt": "Q?", "chosen": f"answer number {i} is long",
              "rejected": f"other reply {i} here"} for i in range(200)]
    aug = augmentation_pairs(pairs, "answer", 0.25, seed=0)
    assert 60 <= len(aug) <= 140  # ~100 of 400 distinct candidates
    assert aug == augmentation_pairs(pairs, "answer", 0.25, seed=0)
    assert aug != augmentation_pairs(pairs, "answer", 0.25, seed=1)
    assert all(a["chosen"] != a["rejected"] for a in aug)
    assert augmentation_pairs(pairs, "answer", 0.0, seed=0) == []


def test_mismatch_pairs_use_best_candidates_of_other_images():
    pairs = []
    for g in range(30):
        img = f"img{g % 6}.png"
        # candidate "best g" beats the two others; "mid g" beats "bad g"
        for c, r in ((f"best {g}", f"mid {g}"), (f"best {g}", f"bad {g}"), (f"mid {g}", f"bad {g}")):
            pairs.append({"group": f"g{g}", "image": img, "prompt": "Q?" if g % 2 else "R?",
                          "chosen": c, "rejected": r})
    out = mismatch_pairs(pairs, "answer", 0.5, seed=0)
    assert 8 <= len(out) <= 22
    image_of = {f"best {g}": f"img{g % 6}.png" for g in range(30)}
    for m in out:
        assert m["chosen"].startswith("best ") and m["rejected"].startswith("best ")
        assert image_of[m["chosen"]] == m["image"] != image_of[m["rejected"]]
        g_other = int(m["rejected"].split()[1])
        assert ("Q?" if g_other % 2 else "R?") == m["prompt"]  # same prompt when one exists
    assert out == mismatch_pairs(pairs, "answer", 0.5, seed=0)
    assert mismatch_pairs(pairs, "answer", 0.0, seed=0) == []


def test_image_swap_pairs_keep_the_text_and_change_the_image():
    pairs = []
    for g in range(12):
        img = f"img{g % 4}.png"
        for c, r in ((f"best {g}", f"mid {g}"), (f"best {g}", f"bad {g}"), (f"mid {g}", f"bad {g}")):
            pairs.append({"group": f"g{g}", "image": img, "prompt": "Q?", "chosen": c, "rejected": r})
    out = image_swap_pairs(pairs, "answer", 2, seed=0)
    assert len(out) == 12 * 2  # one best candidate per group, two other images each
    for m in out:
        g = int(m["chosen"].split()[1])
        assert m["chosen"] == m["rejected"] == f"best {g}"
        assert m["image"] == f"img{g % 4}.png" != m["rejected_image"]
        assert m["rejected_image"] in {f"img{i}.png" for i in range(4)}
    assert len({(m["group"], m["rejected_image"]) for m in out}) == len(out)  # no repeated image per text
    assert out == image_swap_pairs(pairs, "answer", 2, seed=0)
    assert out != image_swap_pairs(pairs, "answer", 2, seed=1)
    assert image_swap_pairs(pairs, "answer", 0, seed=0) == []


def test_pair_data_encodes_the_rejected_image_of_a_swap_pair():
    from align2llava.steps.reward_training.train import _PairData

    class Enc:
        def ids(self, text, has_image):
            return [len(text), int(has_image)]

    pairs = [{"group": "g", "image": "a.png", "prompt": "Q?", "chosen": "t", "rejected": "t", "rejected_image": "b.png"},
             {"group": "g", "image": "a.png", "prompt": "Q?", "chosen": "t", "rejected": "u"}]
    data = _PairData("answer", pairs, Enc())
    (c0, r0), (c1, r1) = data.pairs
    assert c0 == c1 and data.items[c0][1] == "a.png"
    assert data.items[r0][1] == "b.png" and data.items[r1][1] == "a.png"
    assert len(data.items) == 3


def test_length_baseline_ranks_pairs_by_token_count():
    from align2llava.steps.reward_training.train import _PairData

    class Enc:  # one token per word
        def ids(self, text, has_image):
            return text.split()

    pairs = [{"group": "g", "image": "a.png", "prompt": "Q?", "chosen": c, "rejected": r}
             for c, r in [("a b c", "a"), ("a b", "c d e f"), ("x y", "z w"), ("one two three four", "five")]]
    # "Question: Q?\nAnswer: " adds the same tokens to both: longer chosen 2, shorter 1, a tie
    assert _PairData("answer", pairs, Enc()).length_baseline() == (2 + 0.5) / 4


def test_pairwise_accuracy_and_last_token():
    import torch

    assert pairwise_accuracy([1, 2, 3, 0], [0, 2, 1, 1]) == pytest.approx(0.625)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 3, 3]


def test_encoder_expands_image_and_truncates(tiny_llava, image_root):
    from align2llava.models.loading import load_mllm

    _, proc = load_mllm(tiny_llava, dtype="float32")
    enc = Encoder(proc, 40, image_root)
    ids = enc.ids("Question: What colour?\nAnswer: Red.", True)
    assert ids.count(enc.image_token_id) == enc.n_image_tokens == 16
    assert enc.ids("x " * 100, True)[:16] == [enc.image_token_id] * 16
    assert len(enc.ids("word " * 100, True)) == 40
    assert enc.image_token_id not in enc.ids("No image here.", False)
    b = enc.batch([(ids, "a.png"), (enc.ids("Hi.", False), None), (ids[:20], "b.png")])
    assert b["pixel_values"].shape[0] == 2
    assert b["attention_mask"].sum(1).tolist() == [len(ids), len(enc.ids("Hi.", False)), 20]


def _pairs(n_groups=24, val_every=4):
    """Text-separable pairs: the chosen answer names the colour, the rejected one is evasive."""
    colours = ["red", "blue", "green", "yellow"]
    out = []
    for g in range(n_groups):
        c = colours[g % 4]
        img = "a.png" if g % 2 else "b.png"
        cands = [f"The shape is {c}.", f"It is a {c} circle.", "The picture contains one object.",
                 "It sits near the top left corner."]
        split = "val" if g % val_every == 0 else "train"
        for i in range(2):
            for j in range(2, 4):
                out.append({"id": f"answer:g{g}:{i}>{j}", "group": f"g{g}", "image": img, "kind": "answer",
                            "prompt": "What color is the shape?", "chosen": cands[i], "rejected": cands[j],
                            "margin": 0.5, "split": split})
        out.append({"id": f"question:q{g}", "group": f"q{g}", "image": img, "kind": "question", "prompt": "",
                    "chosen": "What color is the shape?\nWhat shape is in the image?",
                    "rejected": "Describe the image.", "margin": 0.5, "split": split})
    return out


@pytest.mark.parametrize("dtype", ["float32", "mixed"])
def test_prefix_cache_gives_the_same_rewards(dtype, tiny_llava, image_root):
    import torch

    from align2llava.steps.reward_training.train import _cache_prefix, _PairData, _rewards_of

    params = TrainRewardParams(**{**TINY, "dtype": dtype}, layers_to_transform=[-1], train_projector=False)
    rm, proc = build_reward_model(tiny_llava, params)
    assert rm.start_layer == 1
    torch.nn.init.normal_(rm.head.weight)
    for n, p in rm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    enc = Encoder(proc, 64, image_root)
    data = _PairData("answer", [p for p in _pairs(4) if p["kind"] == "answer"], enc)
    cache = _cache_prefix(rm, enc, data, 3, "cpu", "test")
    idx = list(range(len(data.items)))
    rm.eval()
    with torch.no_grad():
        full = _rewards_of(rm, data, None, enc, idx, "cpu", torch.float32)
        cached = _rewards_of(rm, data, cache, enc, idx, "cpu", torch.float32)
    assert full.std() > 1e-3
    if dtype == "float32":
        torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)
    else:  # bf16 matmuls: same up to bf16 rounding
        assert rm.autocast_dtype == torch.bfloat16
        torch.testing.assert_close(cached, full, rtol=0.05, atol=0.05 * float(full.abs().max()))


@pytest.mark.parametrize("method,dtype", [("lora", "float32"), ("frozen", "float32"), ("lora", "mixed")])
def test_training_learns_saves_and_reloads(method, dtype, tiny_llava, image_root, tmp_path):
    import torch

    params = TrainRewardParams(**{**TINY, "dtype": dtype}, method=method, train_projector=method == "frozen",
                               layers_to_transform=[-1] if method == "lora" else None,
                               learning_rate=3.0e-2, projector_learning_rate=1.0e-2,
                               num_train_epochs=8 if method == "lora" else 4, eval_steps=5,
                               corruption_rate=0.25)
    before, _ = build_reward_model(tiny_llava, params)
    before_state = {n: p.detach().clone() for n, p in before.named_parameters()}
    res = train_reward_model("answer", _pairs(), tiny_llava, params, image_root=image_root,
                             seed=0, out_dir=tmp_path / "rm")
    losses = [r["loss"] for r in res.curve]
    assert all(l == l and l < 10 for l in losses)  # finite
    k = max(3, len(losses) // 4)
    assert sum(losses[-k:]) / k < sum(losses[:k]) / k - 0.05
    # every chosen answer there is shorter than its rejected one: the length-only ranking is
    # always wrong, and the RM is not ranking by length
    assert res.val_accuracy >= 0.9 and res.val_length_baseline == 0.0
    assert res.train_pairs == 72 and res.val_pairs == 24 and res.augmented_pairs > 0
    assert any(r["val_accuracy"] is not None for r in res.curve[:-1])
    after = dict(res.model.named_parameters())
    trained = [n for n, p in after.items() if p.requires_grad]
    assert trained and all(not torch.equal(after[n], before_state[n]) for n in trained)
    frozen = "backbone.base_model.model.language_model.layers.0.self_attn.q_proj.weight" if method == "lora" \
        else "backbone.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(after[frozen], before_state[frozen])
    files = {p.name for p in (tmp_path / "rm").iterdir()}
    assert {"reward_config.json", "reward_head.safetensors"} <= files
    assert ("adapter_model.safetensors" in files) == (method == "lora")
    items = [(answer_text("What color is the shape?", t), im) for t, im in
             [("The shape is red.", "a.png"), ("It sits near the top left corner.", "b.png"), ("Blue.", None)]]
    mem = score_items(res.model, res.encoder, items, batch_size=2)
    rm2, proc2, meta = load_reward_model(tmp_path / "rm", dtype=dtype)
    assert meta["kind"] == "answer" and meta["backbone"] == str(tiny_llava)
    again = score_items(rm2, Encoder(proc2, meta["max_length"], image_root), items, batch_size=3)
    tol = 1e-4 if dtype == "float32" else 0.02 * (max(mem) - min(mem))
    assert again == pytest.approx(mem, abs=tol)
    assert mem[0] > mem[1]


def test_stage_trains_both_models(tiny_llava, image_root, tmp_path, monkeypatch):
    from stages.train_reward import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in _pairs(8)))
    # the reward models start from train_reward.base_model, not base.base_model (the model tuned)
    params = {"base": {"seed": 0, "base_model": str(tmp_path / "not-read"), "image_root": str(image_root)},
              "train_reward": {**TINY, "base_model": str(tiny_llava), "layers_to_transform": [-1], "train_projector": False,
                               "num_train_epochs": 1, "learning_rate": 1.0e-2, "eval_steps": 0}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    res = CliRunner().invoke(main, ["--pairs", "pairs.jsonl"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "metrics/train_reward.json").read_text())
    assert_summary_keys(metrics, "train_reward")
    for kind in ("question", "answer"):
        # 8 groups, every 4th held out: 2 val groups; 4 answer pairs or 1 question pair a group
        per_group = 4 if kind == "answer" else 1
        assert metrics[f"{kind}_train_pairs"] == 6 * per_group and metrics[f"{kind}_val_pairs"] == 2 * per_group
        assert (tmp_path / f"models/train_reward/{kind}/reward_config.json").exists()
        with open(tmp_path / f"plots/train_reward/{kind}.csv") as f:
            rows = list(csv.DictReader(f))
        assert rows and list(rows[0]) == ["step", "loss", "val_accuracy"]
        assert [int(r["step"]) for r in rows] == list(range(1, metrics[f"{kind}_steps"] + 1))
        # the metric is the curve's last validation, a share of the val pairs (ties count half)
        acc = metrics[f"{kind}_val_pairwise_accuracy"]
        assert acc == pytest.approx(float(rows[-1]["val_accuracy"]))
        halves = 2 * acc * metrics[f"{kind}_val_pairs"]
        assert halves == pytest.approx(round(halves), abs=1e-9)
        # the question pairs' chosen sets are longer, the answer pairs' chosen answers shorter
        assert metrics[f"{kind}_val_length_baseline_accuracy"] == (1.0 if kind == "question" else 0.0)
        assert f"{kind}_val_pairwise_accuracy_before" not in metrics
    (tmp_path / "pairs.jsonl").write_text('{"id": 1}\n')
    res = CliRunner().invoke(main, ["--pairs", "pairs.jsonl"])
    assert res.exit_code == 1 and "lacks keys" in res.output and "Traceback" not in res.output


def test_soft_min_pooling_is_zero_for_equal_tokens_and_follows_the_lowest_text_token():
    import torch

    from align2llava.models.reward_model import RewardModel

    rm = RewardModel(torch.nn.Identity(), 3, pooling="last+min", text_start=2)
    rm.token_head.weight.data = torch.tensor([[1.0, 0.0, 0.0]])
    h = torch.zeros(2, 6, 3)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    h[:, :2, 0] = -100.0  # image positions (before text_start): never pooled
    h[1, 4:, 0] = -100.0  # padding: never pooled
    torch.testing.assert_close(rm._soft_min(h, mask), torch.zeros(2))
    h[0, 3, 0] = -8.0  # one text token that contradicts: the reward drops by about its score
    low = rm._soft_min(h, mask)[0].item()
    assert -8.0 < low < -8.0 + math.log(4) + 1e-4
    with pytest.raises(ValueError, match="pooling"):
        RewardModel(torch.nn.Identity(), 3, pooling="mean")


def test_last_token_pooling_trains_and_reloads_without_a_token_head(tiny_llava, image_root, tmp_path):
    params = TrainRewardParams(**TINY, layers_to_transform=[-1], pooling="last", num_train_epochs=1)
    res = train_reward_model("answer", _pairs(8), tiny_llava, params, image_root=image_root, seed=0, out_dir=tmp_path / "rm")
    assert res.model.token_head is None
    rm2, _, meta = load_reward_model(tmp_path / "rm", dtype="float32")
    assert meta["pooling"] == "last" and rm2.token_head is None


def test_rm_seeds_benchmark_trains_once_per_seed_and_prints_the_spread(tiny_llava, image_root, tmp_path, monkeypatch):
    from benchmarks.rm_seeds import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in _pairs(8)))
    params = {"base": {"seed": 0, "image_root": str(image_root)},
              "train_reward": {**TINY, "base_model": str(tiny_llava), "layers_to_transform": [-1], "train_projector": False,
                               "num_train_epochs": 1, "learning_rate": 1.0e-2, "eval_steps": 0}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    res = CliRunner().invoke(main, ["--kind", "answer", "--seeds", "0,3", "--pairs", "pairs.jsonl"])
    assert res.exit_code == 0, res.output
    accs = [float(a) for a in re.findall(r"seed \d: answer RM val pairwise accuracy ([\d.]+) on 8 pairs", res.output)]
    assert len(accs) == 2 and all(0 <= a <= 1 for a in accs)
    mean = re.search(r"mean ([\d.]+) \+- ([\d.]+) \(sample std, 2 seeds\)", res.output)
    assert mean and float(mean.group(1)) == pytest.approx(sum(accs) / 2, abs=6e-4)
    assert not list(tmp_path.glob("models"))  # nothing written next to the project's models
    res = CliRunner().invoke(main, ["--seeds", "one", "--pairs", "pairs.jsonl"])
    assert res.exit_code == 2 and "--seeds" in res.output and "Traceback" not in res.output
