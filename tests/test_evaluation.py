"""evaluate: answer normalisation and extraction, POPE and VQA metrics on hand-made rows,
strict benchmark reading, the user eval file's reject budget, batched generation equal to
one-at-a-time, likelihood scoring (the scored span is finetune's, the cached batched scores equal
naive full-sequence scoring under both template kinds), and the stage through CliRunner on a
tiny random LLaVA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from align2llava.errors import Align2LlavaError, ConfigError, DataError, RejectBudgetExceeded
from align2llava.steps.evaluation.evaluation import (
    SHORT_ANSWER,
    YES_NO_TYPES,
    EvaluateParams,
    Item,
    benchmark_metrics,
    extract_answer,
    generate_answers,
    likelihood_metrics,
    normalize,
    pope_metrics,
    read_benchmark,
    read_eval_file,
    score_items,
    vqa_accuracy,
    yes_no,
)
from align2llava.steps.evaluation.likelihood import candidate_sets, continuation_ids, rank_candidates, reply_text
from tests.conftest import ROOT, assert_summary_keys, llava_record


def test_normalize():
    assert normalize("The shape is a Circle.") == "shape is circle"
    assert normalize("Two!") == "2"
    assert normalize("3.5 apples") == "3.5 apples"
    assert normalize("light-blue") == "light blue"
    assert normalize("It isn't red") == "it isnt red"


def test_extract_answer_first_candidate_longest_wins():
    cands = ["red", "blue", "light blue"]
    assert extract_answer("It is a light blue circle, not red.", cands) == "light blue"
    assert extract_answer("Red. Definitely not blue.", cands) == "red"
    assert extract_answer("bluer than ever", cands) == "bluer than ever"  # whole words only
    assert extract_answer("I cannot tell", cands) == "i cannot tell"


def test_yes_no_follows_the_pope_rule():
    assert yes_no("Yes, there is.") == "yes"
    assert yes_no("No.") == "no"
    assert yes_no("There is not a circle") == "no"
    assert yes_no("a red circle") == "yes"
    assert yes_no("no, yes") == "no"


def test_vqa_accuracy():
    assert vqa_accuracy("Red", ["red"]) == 1.0
    assert vqa_accuracy("blue", ["red"]) == 0.0
    ten = ["red"] * 2 + ["dark red"] * 8
    assert vqa_accuracy("red", ten) == pytest.approx(2 / 3)
    assert vqa_accuracy("dark red", ten) == 1.0


def _items():
    return [
        Item("v1", "vqa", "shape", "What shape?", ["circle"], "a.png"),
        Item("v2", "vqa", "shape", "What shape?", ["triangle"], "a.png"),
        Item("v3", "vqa", "color", "What color?", ["red"], "a.png"),
        Item("v4", "vqa", "yes_no", "Is it red?", ["yes"], "a.png"),
        Item("p1", "pope", "pope", "Is there a circle?", ["yes"], "a.png"),
        Item("p2", "pope", "pope", "Is there a circle?", ["yes"], "a.png"),
        Item("p3", "pope", "pope", "Is there a square?", ["no"], "a.png"),
        Item("p4", "pope", "pope", "Is there a square?", ["no"], "a.png"),
    ]


def test_scores_and_metrics_on_known_rows():
    preds = ["It is a circle.", "circle", "red", "No", "Yes", "no", "Yes.", "There is no square."]
    rows = score_items(_items(), preds)
    assert [r["correct"] for r in rows] == [True, False, True, False, True, False, False, True]
    assert rows[0]["extracted"] == "circle" and rows[0]["exact_match"] is False
    m = benchmark_metrics([r for r in rows if r["source"] == "vqa"])
    assert m["benchmark_accuracy"] == 0.5
    assert m["benchmark_accuracy_shape"] == 0.5
    assert m["benchmark_accuracy_color"] == 1.0
    assert m["benchmark_accuracy_yes_no"] == 0.0
    assert m["benchmark_exact_match"] == 0.25
    p = pope_metrics([r for r in rows if r["source"] == "pope"])
    # tp=1 (p1), fn=1 (p2), fp=1 (p3), tn=1 (p4)
    assert p["pope_accuracy"] == 0.5 and p["pope_precision"] == 0.5 and p["pope_recall"] == 0.5
    assert p["pope_f1"] == 0.5 and p["pope_yes_ratio"] == 0.5
    all_yes = pope_metrics(score_items(_items()[4:], ["yes"] * 4))
    assert all_yes["pope_yes_ratio"] == 1.0 and all_yes["pope_recall"] == 1.0
    assert all_yes["pope_f1"] == pytest.approx(2 * 0.5 / 1.5, abs=1e-4)


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_benchmark_is_strict(tmp_path):
    good = {"id": "q1", "image": "a.png", "question": "What shape?", "answer": "circle", "type": "shape"}
    assert read_benchmark(_write_jsonl(tmp_path / "v.jsonl", [good]), "vqa")[0].answers == ["circle"]
    bad = dict(good, id="q2")
    del bad["answer"]
    with pytest.raises(DataError, match=r"v\.jsonl: record 1 \(id q2\): missing 'answer'"):
        read_benchmark(_write_jsonl(tmp_path / "v.jsonl", [good, bad]), "vqa")
    with pytest.raises(DataError, match="must be yes or no"):
        read_benchmark(_write_jsonl(tmp_path / "p.jsonl", [dict(good, type="pope")]), "pope")


def test_eval_file_rejects_against_budget(tmp_path, image_root):
    recs = [llava_record(f"e{i}", "a.png", turns=[("What color?", "red")]) for i in range(4)]
    recs[1]["conversations"][1]["value"] = ["red", "dark red"]  # several gold answers
    recs[2]["image"] = "missing.png"
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(recs))
    items, rejects = read_eval_file(path, image_root, budget=1)
    assert [i.id for i in items] == ["e0", "e1", "e3"] and items[1].answers == ["red", "dark red"]
    assert rejects.count == 1 and rejects.rows[0]["id"] == "e2"
    with pytest.raises(RejectBudgetExceeded, match="rejected 1 of 4"):
        read_eval_file(path, image_root, budget=0.1)


@pytest.fixture(scope="module")
def mllm(tiny_llava):
    from align2llava.models.loading import load_mllm

    return load_mllm(tiny_llava)


def test_batched_generation_equals_one_at_a_time(mllm, image_root):
    model, processor = mllm
    items = [
        Item("1", "vqa", "color", "What color is the shape?", ["red"], "a.png"),
        Item("2", "vqa", "shape", "Is there a long question about the shape here, yes or no?", ["yes"], "b.png"),
        Item("3", "vqa", "color", "Color?", ["blue"], "b.png"),
    ]
    kw = dict(image_root=image_root, max_new_tokens=6, instruction=SHORT_ANSWER)
    batched = generate_answers(model, processor, items, batch_size=3, **kw)
    single = generate_answers(model, processor, items, batch_size=1, **kw)
    assert batched == single and len(batched) == 3 and any(batched)


# ---------------------------------------------------------------------------- likelihood


def test_reply_text_and_candidate_sets(tmp_path):
    from align2llava.config import load_section

    assert reply_text("red") == "Red" and reply_text("light blue", "It is {answer}.") == "It is light blue."
    with pytest.raises(ValueError, match="only {answer} and {Answer}"):
        reply_text("red", "{colour}")
    with pytest.raises(ValueError, match="does not contain"):
        reply_text("red", "Yes")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"evaluate": {"reply_format": "{Answer"}}))
    with pytest.raises(ConfigError, match="reply_format"):
        load_section("evaluate", EvaluateParams, tmp_path / "params.yaml")
    items = _items() + [Item("v5", "vqa", "shape", "What shape?", ["Circle"], "a.png")]
    cands = candidate_sets(items, YES_NO_TYPES)
    # the gold answers of each type, one per normalised form; yes/no for yes/no and POPE
    assert cands == {"shape": ["circle", "triangle"], "color": ["red"], "yes_no": ["no", "yes"],
                     "pope": ["no", "yes"]}
    with pytest.raises(Align2LlavaError, match="no candidate set"):
        candidate_sets([Item("e", "eval", "eval", "Q?", ["a"], None)])


def test_likelihood_metrics_on_known_rows():
    rows = score_items(_items(), ["x"] * 8)
    choices = ["circle", "circle", "red", "yes", "yes", "no", "yes", "no"]
    for r, c in zip(rows, choices):
        r["likelihood_choice"] = c
    m = likelihood_metrics(rows)
    assert m["benchmark_likelihood_accuracy"] == 0.75
    assert m["benchmark_likelihood_accuracy_shape"] == 0.5 and m["benchmark_likelihood_accuracy_yes_no"] == 1.0
    # tp=1 (p1), fn=1 (p2), fp=1 (p3), tn=1 (p4)
    assert (m["pope_likelihood_accuracy"], m["pope_likelihood_precision"], m["pope_likelihood_recall"],
            m["pope_likelihood_f1"], m["pope_likelihood_yes_ratio"]) == (0.5, 0.5, 0.5, 0.5, 0.5)
    assert "pope_likelihood_auroc" not in m  # no scores, no ranking
    # yes - no margins: present p1 2.0, p2 -1.0; absent p3 0.5, p4 -3.0 -> 3 of 4 pairs ordered
    for r, margin in zip(rows[4:], (2.0, -1.0, 0.5, -3.0)):
        r["likelihood_scores"] = {"no": -1.0, "yes": -1.0 + margin}
    assert likelihood_metrics(rows)["pope_likelihood_auroc"] == 0.75
    # every probe below the 0 threshold (yes ratio 0) still ranks perfectly when present ones lead
    for r, margin in zip(rows[4:], (-1.0, -1.5, -4.0, -5.0)):
        r["likelihood_scores"] = {"no": 0.0, "yes": margin}
    assert likelihood_metrics(rows)["pope_likelihood_auroc"] == 1.0
    assert likelihood_metrics(score_items(_items(), ["x"] * 8)) == {}  # no likelihood: no keys


@pytest.fixture(scope="module")
def llava_hf(tmp_path_factory):
    from align2llava.models.build import build_llava_hf_like
    from align2llava.models.loading import load_mllm

    return load_mllm(build_llava_hf_like(tmp_path_factory.mktemp("llava_hf") / "model"), dtype="float32")


@pytest.fixture(params=["chatml", "llava-hf"])
def any_mllm(request):
    """The two template kinds: the demo's ChatML and llava-hf's structured "USER: ... ASSISTANT:"."""
    return request.getfixturevalue("mllm" if request.param == "chatml" else "llava_hf")


def test_scored_tokens_are_the_span_finetune_trains_on(any_mllm):
    from align2llava.models.chat import image_token_count
    from align2llava.steps.finetune.data import IGNORE_INDEX, encode_record

    _, proc = any_mllm
    tok = proc.tokenizer
    question = "What color is the shape?"
    for reply in ("Red", "Light blue", "It is a circle."):
        cont = continuation_ids(proc, question, reply)
        _, labels, problem = encode_record(llava_record("r", "a.png", turns=[(question, reply)]), proc,
                                           image_token_count(proc), 4096)
        assert problem is None and cont == [t for t in labels if t != IGNORE_INDEX]
        # the reply, then the end of the turn (ChatML's <|im_end|>; llava-hf's template writes
        # none, so the tokenizer's EOS, as finetune trains)
        assert tok.decode(cont[:-1]).strip() == reply and cont[-1] == tok.convert_tokens_to_ids(
            "<|im_end|>" if "<|im_end|>" in tok.get_vocab() else tok.eos_token)
        # span "start": the reply's own tokens, the end of the turn left out
        assert continuation_ids(proc, question, reply, span="start") == cont[:-1]
    with pytest.raises(ValueError, match="likelihood span"):
        continuation_ids(proc, question, "Red", span="first")


def _naive_scores(model, proc, item, cands, image_root, span="turn"):
    """Each prompt + candidate as one sequence: no cache, no padding, batch 1."""
    import torch

    from align2llava.data.images import load_rgb
    from align2llava.models.chat import needs_bos, prompt_messages, render

    text = render(proc, prompt_messages(item.question, "", True), True)
    inputs = proc(text=[text], images=[load_rgb(image_root / item.image)], return_tensors="pt",
                  add_special_tokens=needs_bos(proc.tokenizer, text))
    n = inputs["input_ids"].shape[1]
    out = {}
    for c in cands:
        cont = continuation_ids(proc, item.question, reply_text(c), span=span)
        ids = torch.cat([inputs["input_ids"], torch.tensor([cont])], 1)
        with torch.inference_mode():
            logp = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0].float().log_softmax(-1)
        out[c] = sum(float(logp[n - 1 + j, t]) for j, t in enumerate(cont))
    return out


def test_cached_likelihood_equals_naive_scoring(any_mllm, image_root):
    from align2llava.models.chat import prompt_messages, render, text_ids

    model, proc = any_mllm
    items = [
        Item("1", "vqa", "color", "What color is the shape?", ["red"], "a.png"),
        Item("2", "vqa", "shape", "Shape?", ["circle"], "b.png"),
        Item("3", "vqa", "color", "Is this a much longer question about the colour of the shape here?", ["blue"], "b.png"),
        Item("4", "vqa", "shape", "What shape is in the image, and how large is it?", ["square"], "a.png"),
        Item("5", "vqa", "color", "Color?", ["light blue"], "a.png"),
    ]
    cands = {"color": ["red", "blue", "light blue"], "shape": ["circle", "light blue square"]}
    lengths = {len(text_ids(proc.tokenizer, render(proc, prompt_messages(it.question), True))) for it in items}
    assert len(lengths) == len(items)  # every batch is left-padded
    # 2 questions per batch (6 // 3 candidates; 6 // 2 = 3 for shape), candidates of different lengths
    ranked = rank_candidates(model, proc, items, cands, image_root=image_root, batch_size=6)
    assert len(ranked) == len(items)
    for it, got in zip(items, ranked):
        naive = _naive_scores(model, proc, it, cands[it.type], image_root)
        assert list(got["likelihood_scores"]) == cands[it.type]
        for c in cands[it.type]:
            assert got["likelihood_scores"][c] == pytest.approx(naive[c], abs=1e-4), (it.id, c)
        assert got["likelihood_choice"] == max(naive, key=naive.get)
        assert len(set(got["likelihood_scores"].values())) == len(cands[it.type])
    one = rank_candidates(model, proc, items[:1], cands, image_root=image_root, batch_size=1)
    assert one[0]["likelihood_scores"] == pytest.approx(ranked[0]["likelihood_scores"], abs=1e-4)


def test_start_span_scores_the_reply_start(any_mllm, image_root):
    model, proc = any_mllm
    items = [Item("p1", "pope", "pope", "Is there a circle in the image?", ["yes"], "a.png"),
             Item("p2", "pope", "pope", "Is there a red shape?", ["no"], "b.png")]
    cands = {"pope": ["no", "yes"]}
    ranked = rank_candidates(model, proc, items, cands, image_root=image_root, batch_size=4, span="start")
    for it, got in zip(items, ranked):
        naive = _naive_scores(model, proc, it, cands["pope"], image_root, span="start")
        assert got["likelihood_scores"] == pytest.approx(naive, abs=1e-4)
        whole = _naive_scores(model, proc, it, cands["pope"], image_root)
        assert all(naive[c] > whole[c] for c in naive)  # the end of the turn costs probability
    # by their start, "Red" could never lose to "Red light": refused, naming both
    with pytest.raises(Align2LlavaError, match="'red' is a token prefix of 'red light'"):
        rank_candidates(model, proc, items[:1], {"pope": ["red", "red light"]}, image_root=image_root, span="start")


def test_no_image_prior_scores_what_the_image_adds(any_mllm, image_root):
    from dataclasses import replace

    model, proc = any_mllm
    q = "Is there a circle in the image?"
    items = [Item("p1", "pope", "pope", q, ["yes"], "a.png"), Item("p2", "pope", "pope", q, ["no"], "b.png")]
    cands = {"pope": ["no", "yes"]}
    kw = dict(image_root=image_root, batch_size=4, span="start")
    seen = rank_candidates(model, proc, items, cands, **kw)
    cal = rank_candidates(model, proc, items, cands, prior="no_image", **kw)
    # the blind score is the question's without any image: the same for both images
    assert cal[0]["likelihood_blind_scores"] == pytest.approx(cal[1]["likelihood_blind_scores"], abs=1e-4)
    blind = rank_candidates(model, proc, [replace(items[0], image=None)], cands, **kw)[0]["likelihood_scores"]
    assert cal[0]["likelihood_blind_scores"] == pytest.approx(blind, abs=1e-4)
    for s, c in zip(seen, cal):
        assert c["likelihood_scores"] == pytest.approx(
            {k: s["likelihood_scores"][k] - blind[k] for k in cands["pope"]}, abs=1e-4)
        assert c["likelihood_choice"] == max(c["likelihood_scores"], key=c["likelihood_scores"].get)
    with pytest.raises(ValueError, match="likelihood prior"):
        rank_candidates(model, proc, items, cands, prior="text", **kw)


def test_likelihood_needs_a_prefix_stable_template(mllm):
    _, proc = mllm
    own = proc.chat_template
    # the generation prompt says "bot", a rendered reply "assistant": the reply cannot be located
    proc.chat_template = own.replace("{{ '<|im_start|>assistant\n' }}", "{{ '<|im_start|>bot\n' }}")
    assert proc.chat_template != own
    try:
        with pytest.raises(Align2LlavaError, match="not prefix-stable"):
            continuation_ids(proc, "What color?", "Red")
    finally:
        proc.chat_template = own
    with pytest.raises(Align2LlavaError, match="no candidates for question type"):
        rank_candidates(None, proc, _items()[:1], {"color": ["red"]}, image_root=None)


def _bench(tmp_path) -> tuple[Path, Path]:
    vqa = [
        {"id": f"v{i}", "image": img, "question": q, "answer": a, "type": t}
        for i, (img, q, a, t) in enumerate([
            ("a.png", "What shape is in the image?", "rectangle", "shape"),
            ("a.png", "What color is the shape?", "red", "color"),
            ("b.png", "What color is the shape?", "blue", "color"),
            ("b.png", "Is the shape blue?", "yes", "yes_no"),
        ])
    ]
    pope = [
        {"id": f"p{i}", "image": "a.png", "question": f"Is there a {s} in the image?", "answer": a, "type": "pope"}
        for i, (s, a) in enumerate([("rectangle", "yes"), ("circle", "no")])
    ]
    return _write_jsonl(tmp_path / "vqa.jsonl", vqa), _write_jsonl(tmp_path / "pope.jsonl", pope)


def test_stage_cli(tiny_llava, image_root, tmp_path, monkeypatch):
    from stages.evaluate import main

    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    monkeypatch.chdir(tmp_path)
    vqa, pope = _bench(tmp_path)
    eval_file = tmp_path / "mine.json"
    eval_file.write_text(json.dumps([llava_record("u1", "a.png", turns=[("What color?", "red")])]))
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["base"].update(image_root=str(image_root))
    data["evaluate"].update(vqa_file=str(vqa), pope_file=str(pope), max_new_tokens=4, batch_size=4,
                            eval_image_root=str(image_root))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(main, ["--params", "params.yaml", "--model", str(tiny_llava), "--eval-file", str(eval_file)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "metrics" / "evaluate.json").read_text())
    assert_summary_keys(metrics, "evaluate")
    for key in ("benchmark_accuracy", "benchmark_accuracy_shape", "benchmark_accuracy_color",
                "benchmark_accuracy_yes_no", "pope_accuracy", "pope_f1", "pope_yes_ratio",
                "eval_exact_match", "eval_vqa_accuracy", "eval_seconds", "peak_rss_mb"):
        assert key in metrics, key
    assert metrics["benchmark_count"] == 4 and metrics["pope_count"] == 2 and metrics["eval_count"] == 1
    preds = [json.loads(line) for line in open(tmp_path / "data" / "evaluate" / "predictions.jsonl")]
    assert [p["id"] for p in preds] == ["v0", "v1", "v2", "v3", "p0", "p1", "u1"]
    assert all(isinstance(p["prediction"], str) for p in preds)
    assert (tmp_path / "data" / "evaluate" / "rejects.jsonl").read_text() == ""
    # likelihood scores for the benchmark and POPE, none for the user file (no candidate set)
    for key in ("benchmark_likelihood_accuracy", "benchmark_likelihood_accuracy_shape",
                "benchmark_likelihood_accuracy_color", "benchmark_likelihood_accuracy_yes_no",
                "pope_likelihood_accuracy", "pope_likelihood_precision", "pope_likelihood_recall",
                "pope_likelihood_f1", "pope_likelihood_yes_ratio", "likelihood_seconds"):
        assert key in metrics, key
    expected = {"shape": {"rectangle"}, "color": {"red", "blue"}, "yes_no": {"yes", "no"}, "pope": {"yes", "no"}}
    for p in preds[:-1]:
        scores = p["likelihood_scores"]
        assert set(scores) == expected[p["type"]] and p["likelihood_choice"] == max(scores, key=scores.get)
    assert "likelihood_choice" not in preds[-1] and "likelihood_scores" not in preds[-1]
    right = [p["likelihood_choice"] == p["answer"] for p in preds if p["source"] == "vqa"]
    assert metrics["benchmark_likelihood_accuracy"] == sum(right) / len(right)
    data["evaluate"]["likelihood"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(main, ["--params", "params.yaml", "--model", str(tiny_llava)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "metrics" / "evaluate.json").read_text())
    assert "benchmark_accuracy" in metrics and not any("likelihood" in k for k in metrics)


def test_stage_cli_bad_benchmark_is_one_line_error(tiny_llava, image_root, tmp_path, monkeypatch):
    from stages.evaluate import main

    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    monkeypatch.chdir(tmp_path)
    vqa = _write_jsonl(tmp_path / "vqa.jsonl", [{"id": "v0", "image": "a.png", "question": "Q?"}])
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["evaluate"].update(vqa_file=str(vqa), pope_file=None)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(main, ["--params", "params.yaml", "--model", str(tiny_llava)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert f"Error: {vqa}: record 0 (id v0): missing 'answer', 'type'" in res.output
