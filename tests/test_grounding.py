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


@pytest.mark.parametrize("feature", ["image_pmi", "word_margin"])
def test_answer_rm_with_grounding_saves_its_weight_and_scores_with_it(feature, tiny_llava, image_root, tmp_path):
    from align2llava.models.reward_model import Encoder, answer_text, load_reward_model, score_items
    from align2llava.steps.scoring import ScoreParams, load_reward_models, score_records

    words = {"color": ["Red", "blue", "green", "yellow"], "shape": ["circle", "square"]}
    params = TrainRewardParams(**TINY, layers_to_transform=[-1], learning_rate=3.0e-2, num_train_epochs=2,
                               grounding=feature, grounding_weight=None, grounding_words=words)
    train_reward_model("answer", _pairs(), tiny_llava, params, image_root=image_root, seed=0,
                       out_dir=tmp_path / "answer")
    meta = read_reward_config(tmp_path / "answer")
    entry = meta["grounding"]
    assert entry["feature"] == feature and entry["fitted"] and entry["weight"] >= 0.0
    # word_margin's words travel with the model (lower case), so score checks the same ones
    assert entry.get("words") == ({"color": ["red", "blue", "green", "yellow"], "shape": ["circle", "square"]}
                                  if feature == "word_margin" else None)
    assert 0.0 <= entry["train_pair_accuracy"] <= 1.0
    # the saved model scores head + weight x grounding, as score_records does
    rm, proc, meta = load_reward_model(tmp_path / "answer", dtype="float32")
    ground = load_grounding(tmp_path / "answer", meta, image_root=image_root, dtype="float32")
    assert ground.weight == entry["weight"] and ground.feature == feature
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
    bad["grounding"] = {"feature": "word_margin", "weight": 1.0, "words": {"color": ["red"]}}
    with pytest.raises(DataError, match="reward_config.json: grounding: .*two different words"):
        load_grounding(tmp_path / "answer", bad)


def test_smallest_scales_the_affirmed_reading_only():
    from align2llava.steps.grounding import smallest

    readings = [(None, None), (-0.5, None), (None, -0.5), (1.0, -0.2), (-1.0, 0.3)]
    assert smallest(readings) == [0.0, -0.5, -0.5, -0.2, -1.0]
    assert smallest(readings, 4.0) == [0.0, -0.5, -2.0, -0.8, -1.0]


def test_fit_affirmed_scale_puts_the_affirmed_reading_on_the_own_words_scale():
    from align2llava.steps.grounding import SCALE_GRID, fit_affirmed_scale, smallest

    # the own words' margins separate their pairs at about 1; the affirmed words' (answers with no
    # own word) at about 0.25 and a few wrong, so they count for as much at a scale near 4
    chosen = [(1.0, None), (0.8, None), (1.2, None), (-0.1, None),
              (None, 0.25), (None, 0.3), (None, 0.2), (None, -0.05)]
    rejected = [(-1.0, None), (-1.1, None), (-0.9, None), (0.1, None),
                (None, -0.25), (None, -0.2), (None, -0.3), (None, 0.05)]
    scale, weight = fit_affirmed_scale(chosen, rejected)
    assert 2.0 <= scale <= 8.0 and scale in SCALE_GRID and weight > 0
    assert weight == fit_weight(smallest(chosen, scale), smallest(rejected, scale))
    # nothing affirmed: every scale fits alike, and the tie goes to 1
    own_only = [(o, None) for o, _ in chosen[:4]], [(o, None) for o, _ in rejected[:4]]
    assert fit_affirmed_scale(*own_only)[0] == 1.0
    with pytest.raises(ValueError, match="empty grid"):
        fit_affirmed_scale(chosen, rejected, grid=[])


def test_answer_rm_fits_and_saves_the_affirmed_scale(tiny_llava, image_root, tmp_path):
    from pydantic import ValidationError

    from align2llava.errors import DataError

    params = TrainRewardParams(**TINY, layers_to_transform=[-1], num_train_epochs=1, grounding="word_margin",
                               grounding_words=WORDS, grounding_affirmed_scale=None)
    pairs = _pairs(8)
    for p in pairs[::2]:  # yes/no answers too, so that some affirm their question's words
        if p["kind"] == "answer":
            p.update(prompt="Is the red shape a circle?", chosen="Yes.", rejected="No, it is blue.")
    train_reward_model("answer", pairs, tiny_llava, params, image_root=image_root, seed=0, out_dir=tmp_path / "a")
    meta = read_reward_config(tmp_path / "a")
    entry = meta["grounding"]
    assert entry["affirmed_scale_fitted"] is True and entry["affirmed_scale"] > 0
    ground = load_grounding(tmp_path / "a", meta, image_root=image_root, dtype="float32")
    assert ground.affirmed_scale == entry["affirmed_scale"] and ground.weight == entry["weight"]
    # a scale given as 1 leaves the entry as it was before the key existed
    params = TrainRewardParams(**TINY, layers_to_transform=[-1], num_train_epochs=1, grounding="word_margin",
                               grounding_words=WORDS, grounding_affirmed_scale=1.0)
    train_reward_model("answer", pairs, tiny_llava, params, image_root=image_root, seed=0, out_dir=tmp_path / "b")
    assert "affirmed_scale" not in read_reward_config(tmp_path / "b")["grounding"]
    # the scale is word_margin's (null, the default, is ignored by the others); a config with a
    # scale that is not positive is a one-line error
    with pytest.raises(ValidationError, match="grounding_affirmed_scale"):
        TrainRewardParams(**TINY, grounding="image_pmi", grounding_affirmed_scale=2.0)
    assert TrainRewardParams(**TINY, grounding="none").grounding_affirmed_scale is None
    bad = {**meta, "grounding": {**entry, "affirmed_scale": 0}}
    with pytest.raises(DataError, match="reward_config.json: grounding .*positive affirmed_scale"):
        load_grounding(tmp_path / "a", bad)


def test_without_grounding_nothing_changes(tiny_llava, image_root, tmp_path):
    params = TrainRewardParams(**TINY, layers_to_transform=[-1], num_train_epochs=1, grounding="none")
    train_reward_model("answer", _pairs(8), tiny_llava, params, image_root=image_root, seed=0, out_dir=tmp_path / "a")
    meta = read_reward_config(tmp_path / "a")
    assert meta["grounding"] is None and load_grounding(tmp_path / "a", meta) is None


WORDS = {"color": ["red", "blue", "green", "yellow"], "shape": ["circle", "square", "triangle"]}


def test_word_sites_find_stated_group_words_and_skip_negated_ones(tiny_llava):
    from align2llava.models.chat import continuation_ids
    from align2llava.models.loading import load_mllm
    from align2llava.steps.grounding import word_sites

    _, processor = load_mllm(tiny_llava, dtype="float32")
    q = "What is in the image?"
    answer = "Red square, not a blue circle; no green here. It is a SQUARE."
    cont, sites = word_sites(processor, q, answer, WORDS)
    assert cont == continuation_ids(processor, q, answer, image=True, span="start")
    # Red, square and SQUARE are stated; blue and circle (after "not a") and green (after "no") are not
    assert len(sites) == 3
    for (step, ids), word in zip(sites, ["Red", " square", " SQUARE"]):
        head = answer[: answer.index(word.strip(), 0 if word != " SQUARE" else 40)]
        # the step is where the word begins: the answer's tokens before it are the stem's
        assert cont[:step] == continuation_ids(processor, q, head + "x", image=True, span="start")[:step]
        assert ids[0] == continuation_ids(processor, q, head + word.strip(), image=True, span="start")[step]
        assert len(set(ids)) == len(ids) and len(ids) >= 2
    assert word_sites(processor, q, "Nothing to see.", WORDS) == ([], [])


def _reference_rows(model, processor, image_root, image, question, answer):
    """The model's full log-prob row before each answer token (its own logits, no cache)."""
    import torch

    from align2llava.data.images import load_rgb
    from align2llava.models.chat import continuation_ids, needs_bos, prompt_messages, render

    prompt = render(processor, prompt_messages(question, "", True), generation_prompt=True)
    enc = processor(text=[prompt], return_tensors="pt", add_special_tokens=needs_bos(processor.tokenizer, prompt),
                    images=[load_rgb(image_root / image)])
    cont = continuation_ids(processor, question, answer, image=True, span="start")
    ids = torch.cat([enc["input_ids"], torch.tensor([cont])], 1)
    with torch.no_grad():
        lp = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                   pixel_values=enc["pixel_values"]).logits[0].float().log_softmax(-1)
    n = enc["input_ids"].shape[1]
    return lp[n - 1: n - 1 + len(cont)]


def test_word_margin_is_the_smallest_margin_of_the_stated_words(tiny_llava, image_root):
    from align2llava.models.chat import continuation_ids
    from align2llava.steps.grounding import word_sites

    ground = Grounding.load(tiny_llava, feature="word_margin", words=WORDS, image_root=image_root,
                            dtype="float32", batch_size=2)
    assert ground.passes == 1
    items = [("a.png", "What color is the shape?", "It is a red square."),
             ("b.png", "Describe it.", "A blue circle, drawn flat."),
             ("a.png", "Anything?", "Hard to say."),          # no group word: 0, no pass
             (None, "What color?", "Red.")]                    # no image: 0
    got = ground.raw(items)
    assert got[2] == 0.0 and got[3] == 0.0
    for (image, q, a), value in zip(items[:2], got[:2]):
        rows = _reference_rows(ground.model, ground.processor, image_root, image, q, a)
        _, sites = word_sites(ground.processor, q, a, WORDS)
        assert len(sites) == 2
        margins = []
        for (step, ids), group in zip(sites, ("color", "shape")):
            # the alternatives are the first tokens of the answer with each other group word there
            word = next(w for w in WORDS[group] if w in a.lower())
            head = a[: a.lower().index(word)]
            alts = {continuation_ids(ground.processor, q, head + w, image=True, span="start")[step]
                    for w in WORDS[group] if w != word}
            assert set(ids[1:]) == alts - {ids[0]}
            margins.append(rows[step, ids[0]].item() - max(rows[step, t].item() for t in ids[1:]))
        assert value == pytest.approx(min(margins), abs=1e-4)
    # one at a time gives the same values (batching and padding do not move them)
    assert [ground.raw([it])[0] for it in items] == pytest.approx(got, abs=1e-4)
    # the sign: the base's own favourite colour for the image scores >= 0, any other < 0
    q = "What color is the shape?"
    rows = _reference_rows(ground.model, ground.processor, image_root, "a.png", q, "It is red.")
    step, ids = word_sites(ground.processor, q, "It is red.", WORDS)[1][0]
    firsts = {w: continuation_ids(ground.processor, q, "It is " + w, image=True, span="start")[step]
              for w in WORDS["color"]}
    favourite = max(WORDS["color"], key=lambda w: rows[step, firsts[w]].item())
    other = next(w for w in WORDS["color"] if w != favourite)
    fav, oth = ground.raw([("a.png", q, f"It is {favourite}."), ("a.png", q, f"It is {other}.")])
    assert fav >= 0.0 > oth


def test_a_yes_affirms_the_group_words_of_its_question():
    from align2llava.steps.grounding import affirmed_words

    q = "Is there a red circle in the image?"
    assert affirmed_words(q, "Yes.", WORDS) == ["red", "circle"]
    assert affirmed_words(q, "yes, it is", WORDS) == ["red", "circle"]
    assert affirmed_words("Is it RED? Red, I mean.", "Yes", WORDS) == ["red"]
    assert affirmed_words(q, "No.", WORDS) == []               # a no denies the whole question
    assert affirmed_words(q, "It is yes.", WORDS) == []        # not an answer that begins with yes
    assert affirmed_words("Is there no red shape?", "Yes.", WORDS) == []  # negated in the question
    assert affirmed_words("Is it big?", "Yes.", WORDS) == []


def test_word_margin_of_a_yes_counts_the_affirmed_words(tiny_llava, image_root):
    from align2llava.steps.grounding import AFFIRM_QUESTION, word_sites

    ground = Grounding.load(tiny_llava, feature="word_margin", words=WORDS, image_root=image_root,
                            dtype="float32", batch_size=2)
    q = "Is the red shape a circle?"
    red, circle = ground.raw([("a.png", AFFIRM_QUESTION, "The image shows a red"),
                              ("a.png", AFFIRM_QUESTION, "The image shows a circle")])
    # the answer's own word, read in its own context (the model's logits)
    rows = _reference_rows(ground.model, ground.processor, image_root, "a.png", q, "Yes, it is blue.")
    [(step, ids)] = word_sites(ground.processor, q, "Yes, it is blue.", WORDS)[1]
    own = rows[step, ids[0]].item() - max(rows[step, t].item() for t in ids[1:])
    four = [("a.png", q, "Yes."), ("a.png", q, "Yes, it is blue."), ("a.png", q, "No."), (None, q, "Yes.")]
    got = ground.raw(four)
    assert red != circle
    assert got[0] == pytest.approx(min(red, circle), abs=1e-4)
    assert got[1] == pytest.approx(min(red, circle, own), abs=1e-4)
    assert got[2] == 0.0 and got[3] == 0.0   # a no names no word and affirms none; no image: no reading
    # the two readings apart: the own words' and the affirmed words' smallest margins, None: none read
    readings = ground.readings(four)
    assert readings[0][0] is None and readings[0][1] == pytest.approx(min(red, circle), abs=1e-4)
    assert readings[1][0] == pytest.approx(own, abs=1e-4) and readings[1][1] == readings[0][1]
    assert readings[2] == (None, None) and readings[3] == (None, None)
    # affirmed_scale multiplies the affirmed reading before the smallest is taken
    ground.affirmed_scale = 3.0
    assert ground.raw(four) == pytest.approx([3 * min(red, circle), min(3 * min(red, circle), own), 0.0, 0.0],
                                             abs=1e-4)
    ground.affirmed_scale = 1.0
    # one reading per image serves every answer about it; alone, each scores the same
    more = [("b.png", q, "Yes."), ("a.png", "Is it green?", "yes"), ("b.png", "Is it a square?", "Yes.")]
    together = ground.raw(more + [("a.png", q, "Yes.")])
    assert together == pytest.approx([ground.raw([it])[0] for it in more] + [got[0]], abs=1e-4)
    assert len(set(round(v, 4) for v in together)) == 4


def test_an_affirmed_word_that_cannot_be_read_leaves_the_answer_own_margin(tiny_llava, image_root):
    from align2llava.models.chat import continuation_ids
    from align2llava.steps.grounding import word_sites

    # "orange" is the only word read after "an": nothing to compare it with, so it is not read
    words = {"color": [*WORDS["color"], "orange"], "shape": WORDS["shape"]}
    ground = Grounding.load(tiny_llava, feature="word_margin", words=words, image_root=image_root,
                            dtype="float32", batch_size=2)
    q = "Is it orange?"
    rows = _reference_rows(ground.model, ground.processor, image_root, "a.png", q, "Yes, it is red.")
    step = word_sites(ground.processor, q, "Yes, it is red.", words)[1][0][0]
    firsts = {w: continuation_ids(ground.processor, q, "Yes, it is " + w, image=True, span="start")[step]
              for w in words["color"]}
    favourite = max(words["color"], key=lambda w: rows[step, firsts[w]].item())
    answer = f"Yes, it is {favourite}."
    [(step, ids)] = word_sites(ground.processor, q, answer, words)[1]
    rows = _reference_rows(ground.model, ground.processor, image_root, "a.png", q, answer)
    own = rows[step, ids[0]].item() - max(rows[step, t].item() for t in ids[1:])
    assert own > 0.0  # so a stray 0 from the unread word would show
    assert ground.raw([("a.png", q, answer)])[0] == pytest.approx(own, abs=1e-4)
    assert ground.raw([("a.png", q, "Yes.")]) == [0.0]


def test_word_margin_words_are_checked():
    from align2llava.steps.grounding import check_words

    with pytest.raises(ValueError, match="two different words"):
        check_words({"color": ["red", "Red"]})
    with pytest.raises(ValueError, match="in groups"):
        check_words({"a": ["red", "blue"], "b": ["red", "green"]})
    with pytest.raises(ValueError, match="single word"):
        check_words({"a": ["light blue", "red"]})
    with pytest.raises(ValueError, match="needs grounding words"):
        check_words({})
    # in params.yaml: a one-line error naming the section
    from align2llava.config import parse_section
    from align2llava.errors import ConfigError

    with pytest.raises(ConfigError, match="train_reward.*two different words"):
        parse_section({"grounding": "word_margin", "grounding_words": {"color": ["red"]}}, "train_reward",
                      TrainRewardParams)
    assert TrainRewardParams(grounding="word_margin", grounding_words=WORDS).grounding_words == WORDS
