"""The answer reward's grounding term (steps.grounding) and how training and scoring use it."""

from __future__ import annotations

import json

import pytest

from align2llava.models.reward_model import read_reward_config
from align2llava.steps.grounding import Grounding, fit_weight, load_grounding
from align2llava.steps.reward_training.train import TrainRewardParams, train_reward_model
from tests.test_reward import TINY, _pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _reference_log_probs(model, processor, image_root, image, question, answer):
    """The answer tokens' log-probs from the model's own logits over the processor's inputs."""
    import torch

    from align2llava.data.images import load_rgb
    from align2llava.models.chat import continuation_ids, needs_bos, prompt_messages, render

    prompt = render(processor, prompt_messages(question, "", image is not None), generation_prompt=True)
    kw = {"images": [load_rgb(image_root / image)]} if image else {}
    enc = processor(text=[prompt], return_tensors="pt", add_special_tokens=needs_bos(processor.tokenizer, prompt), **kw)
    cont = continuation_ids(processor, question, answer, image=image is not None, span="start")
    ids = torch.cat([enc["input_ids"], torch.tensor([cont])], 1)
    extra = {"pixel_values": enc["pixel_values"]} if image else {}
    with torch.no_grad():
        lp = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0].float().log_softmax(-1)
    n = enc["input_ids"].shape[1]
    return [lp[n - 1 + k, t].item() for k, t in enumerate(cont)]


def test_grounding_is_the_mean_image_pmi_of_the_answer_tokens(tiny_llava, image_root):
    ground = Grounding.load(tiny_llava, image_root=image_root, dtype="float32", batch_size=2)
    items = [("a.png", "What color is the shape?", "It is red."),
             ("b.png", "What is in the image?", "A blue square near the top, drawn flat."),
             (None, "Any question?", "No image here."),
             ("a.png", "What color?", "Red.")]
    raw = ground.raw(items)
    for (image, q, a), got in zip(items, raw):
        if image is None:
            assert got == 0.0
            continue
        seen = _reference_log_probs(ground.model, ground.processor, image_root, image, q, a)
        blind = _reference_log_probs(ground.model, ground.processor, image_root, None, q, a)
        assert got == pytest.approx(sum(x - y for x, y in zip(seen, blind)) / len(seen), abs=1e-4)
    assert any(abs(g) > 1e-4 for g in raw)  # the tiny model's image does move its tokens
    # one at a time (other batches, other padding) gives the same values
    assert [Grounding.load(tiny_llava, image_root=image_root, dtype="float32").raw([it])[0] for it in items] \
        == pytest.approx(raw, abs=1e-4)
    ground.weight = 2.5
    assert ground(items) == pytest.approx([2.5 * g for g in raw])


def test_fit_weight_follows_the_pairs():
    assert fit_weight([0.0, 1.0], [1.0, 2.0]) == 0.0  # orders every pair wrong
    assert fit_weight([], []) == 0.0
    w = fit_weight([1.0, 2.0, 0.5, -0.2], [0.0, 1.0, 0.7, -1.0])
    assert 0.5 < w < 50
    # a stronger term (the same pairs, differences halved) needs twice the weight
    assert fit_weight([0.5, 1.0, 0.25, -0.1], [0.0, 0.5, 0.35, -0.5]) == pytest.approx(2 * w, rel=1e-3)
    assert fit_weight([1.0, 2.0], [0.0, 1.0], max_weight=7.0) == 7.0  # separable: capped


def test_answer_rm_with_grounding_saves_its_weight_and_scores_with_it(tiny_llava, image_root, tmp_path):
    from align2llava.models.reward_model import Encoder, answer_text, load_reward_model, score_items
    from align2llava.steps.scoring import ScoreParams, load_reward_models, score_records

    params = TrainRewardParams(**TINY, layers_to_transform=[-1], learning_rate=3.0e-2, num_train_epochs=2,
                               grounding="image_pmi", grounding_weight=None)
    train_reward_model("answer", _pairs(), tiny_llava, params, image_root=image_root, seed=0,
                       out_dir=tmp_path / "answer")
    meta = read_reward_config(tmp_path / "answer")
    entry = meta["grounding"]
    assert entry["feature"] == "image_pmi" and entry["fitted"] and entry["weight"] >= 0.0
    assert 0.0 <= entry["train_pair_accuracy"] <= 1.0
    # the saved model scores head + weight x grounding, as score_records does
    rm, proc, meta = load_reward_model(tmp_path / "answer", dtype="float32")
    ground = load_grounding(tmp_path / "answer", meta, image_root=image_root, dtype="float32")
    assert ground.weight == entry["weight"]
    record = {"id": "r1", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "The shape is red."}]}
    head = score_items(rm, Encoder(proc, meta["max_length"], image_root),
                       [(answer_text("What color is the shape?", "The shape is red."), "a.png")])[0]
    g = ground([("a.png", "What color is the shape?", "The shape is red.")])[0]
    # a question RM for the pair: the stage needs both; the answer folder stands in (kind checked)
    q = train_reward_model("question", _pairs(), tiny_llava, TrainRewardParams(**TINY, layers_to_transform=[-1]),
                           image_root=image_root, seed=0, out_dir=tmp_path / "question")
    assert q.kind == "question"
    sp = ScoreParams(question_model=str(tmp_path / "question"), answer_model=str(tmp_path / "answer"), dtype="float32")
    models = load_reward_models(sp.question_model, sp.answer_model, image_root=image_root, dtype="float32")
    assert models.grounding is not None
    row = score_records(models, [record], batch_size=4)[0]
    assert row["answer_score"] == pytest.approx(head + g, abs=1e-4)
    # a config naming a term this version cannot read is a one-line error
    bad = json.loads((tmp_path / "answer" / "reward_config.json").read_text())
    bad["grounding"] = {"feature": "telepathy", "weight": 1.0}
    (tmp_path / "answer" / "reward_config.json").write_text(json.dumps(bad))
    from align2llava.errors import DataError

    with pytest.raises(DataError, match="grounding"):
        load_grounding(tmp_path / "answer", bad)


def test_without_grounding_nothing_changes(tiny_llava, image_root, tmp_path):
    params = TrainRewardParams(**TINY, layers_to_transform=[-1], num_train_epochs=1)
    train_reward_model("answer", _pairs(8), tiny_llava, params, image_root=image_root, seed=0, out_dir=tmp_path / "a")
    meta = read_reward_config(tmp_path / "a")
    assert meta["grounding"] is None and load_grounding(tmp_path / "a", meta) is None
