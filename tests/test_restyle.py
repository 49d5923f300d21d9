"""Restyle: the content check, the decision logic (fake LLM), the cache, the inner LLM on a tiny
random model, and the stage CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from align2llava.steps.restyle.content import check_content, clean_rewrite
from align2llava.steps.restyle.llm import InnerLLM, ResponseCache
from align2llava.steps.restyle.restyle import RestyleParams, collect_turns, restyle
from tests.conftest import assert_summary_keys, llava_record

# ------------------------------------------------------------------------------ content check
ORIG = "Yes, there is a red circle in the upper left of the image. It is next to a dog."


@pytest.mark.parametrize(
    "rewrite",
    [
        "Yes. The image shows a red circle at the top left, just beside a dog.",
        "Yes, a circular red shape sits in the top-left area, next to a dog.",
        "Yes! A red circle is in the upper left part, and a dog is next to it.",
    ],
)
def test_check_passes_faithful_paraphrases(rewrite):
    assert check_content(ORIG, rewrite) == []


@pytest.mark.parametrize(
    "rewrite, failure",
    [
        ("Yes, there is a blue circle in the upper left, next to a dog.", "lost color: red"),
        ("Yes, there is a red circle in the upper left, next to a dog.", None),
        ("Yes, there is a red triangle in the upper left, next to a dog.", "added shape: triangle"),
        ("Yes, there is a red circle in the upper right, next to a dog.", "lost position: left"),
        ("Yes, there is a red circle in the upper left, next to a cat.", "added object: cat"),
        ("Yes, there are two red circles in the upper left, next to a dog.", "added count: 2"),
        ("No, there is a red circle in the upper left of it, next to a dog.", "polarity: yes -> no"),
        ("There is a red circle in the upper left of the image, next to a dog.", "polarity: yes -> none"),
        ("Yes, there is no red circle in the upper left, next to a dog.", "negation added"),
        ("Yes, a red circle in the upper left next to a dog near Paris.", "added name: paris"),
        ("Yes, a red circle.", "too short: 4/19 words"),
    ],
)
def test_check_catches_lost_or_contradicted_facts(rewrite, failure):
    fails = check_content(ORIG, rewrite)
    if failure is None:
        assert fails == []
    else:
        assert failure in fails, fails


def test_check_details():
    # grey == gray, plurals, centre/middle == center, "right-angled" is not a position
    assert check_content("Two grey squares sit in the middle.", "Two gray squares are in the centre.") == []
    assert check_content("It has four right-angled corners.", "It has four corners, all right-angled.") == []
    assert "lost count: 4" in check_content("It has four corners.", "It has several corners.")
    assert "negation lost" in check_content("There are no other objects.", "There are other objects too.")
    assert "lost name: toyota" in check_content("The car is most likely a Toyota.", "The car is most likely a sedan.")
    assert check_content("Certainly! Yes, it is a circle.", "Yes, it is a circle.") == []
    assert "too long: 12/4 words" in check_content("It is a circle.", "It is a circle and it is a circle that is round.")


def test_repetitive_flags_loops_not_the_original_own_repeats():
    from align2llava.steps.restyle.content import repetitive

    orig = "The circle sits in the upper left corner. It is small."
    assert repetitive(orig, "The circle sits in the upper left corner. The circle sits in the upper left corner.")
    assert not repetitive(orig, "A small circle sits in the top left corner.")
    twice = "It is a red circle on the left. It is a red circle on the left."
    assert not repetitive(twice, twice + " ")


def test_clean_rewrite_strips_labels_and_quotes():
    assert clean_rewrite('Answer: "It is red."') == "It is red."
    assert clean_rewrite("Sure! Here is the rewritten answer: It is red.") == "It is red."
    assert clean_rewrite("  It is red.  ") == "It is red."


# ----------------------------------------------------------------------------- fake LLM logic
class FakeLLM:
    """Rewrites from a table; the judge prefers whatever answer contains 'neat' (or always 'A')."""

    fingerprint = "fake-model"

    def __init__(self, table: dict[str, tuple[str, bool]], judge: str = "neat"):
        self.table, self.judge, self.calls = table, judge, {"generate": 0, "review": 0, "nll": 0}

    def chat(self, messages):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def n_tokens(self, text):
        return len(text.split())

    def generate(self, prompts, caps):
        self.calls["generate"] += 1
        out = []
        for p in prompts:
            answer = p.rsplit("Answer: ", 1)[1].split("<assistant>")[0]
            prefix = p.rsplit("<assistant>", 1)[1]
            text, finished = self.table[answer]
            out.append({"text": text.removeprefix(prefix),
                        "finished": finished, "tokens": len(text.split())})
        return out

    def choice_logits(self, prompts, labels):
        self.calls["review"] += 1
        out = []
        for p in prompts:
            a = p.split("Answer A: ")[1].split("\n\nAnswer B: ")[0]
            if self.judge == "always_a":
                out.append([2.0, 0.0])
            else:
                out.append([1.0, -1.0] if "neat" in a else [-1.0, 1.0])
        return out

    def nll(self, prompts, responses):
        self.calls["nll"] += 1
        return [(2.0 * len(r.split()) if "neat" not in r else 1.0 * len(r.split()), len(r.split())) for r in responses]


TABLE = {
    "It is a red circle.": ("It is a neat red circle.", True),  # accepted
    "Yes, the circle is red.": ("Yes, the circle is blue and neat.", True),  # content check
    "The circle sits at the top.": ("A circle sits at the top.", True),  # review prefers original
    "It is small.": ("It is small and small and small and", False),  # truncated
    "It is large.": ("It is large.", True),  # unchanged
}


def _records():
    return [
        llava_record("r1", turns=[("What is it?", "It is a red circle."), ("Is it red?", "Yes, the circle is red.")]),
        llava_record("r2", image=None, turns=[("Where is it?", "The circle sits at the top.")], task="detail"),
        llava_record("r3", turns=[("Size?", "It is small."), ("And now?", "It is large.")]),
    ]


def test_restyle_decisions_log_and_metrics(tmp_path):
    llm = FakeLLM(TABLE)
    recs = _records()
    res = restyle(recs, llm, RestyleParams(), seed=0, cache=ResponseCache(tmp_path, llm.fingerprint))
    reasons = {(r["id"], r["turn"]): r["reason"] for r in res.log}
    assert reasons == {("r1", 0): None, ("r1", 1): "content_check", ("r2", 0): "review",
                       ("r3", 0): "truncated", ("r3", 1): "unchanged"}
    assert res.records[0]["conversations"][1]["value"] == "It is a neat red circle."
    assert res.records[0]["conversations"][3]["value"] == "Yes, the circle is red."
    assert [r["id"] for r in res.records] == ["r1", "r2", "r3"] and res.records[1]["task"] == "detail"
    assert recs[0]["conversations"][1]["value"] == "It is a red circle."  # input untouched
    row = res.log[1]
    assert row["check"]["passed"] is False and "lost color: red" in row["check"]["failures"]
    assert res.log[0]["verdict"] == "rewrite" and res.log[0]["kept"] == "rewrite" and res.log[0]["p_rewrite"] > 0.5
    m = res.metrics
    assert m["acceptance_rate"] == pytest.approx(1 / 5) and m["accepted"] == 1 and m["records_changed"] == 1
    assert m["rejections"] == {"content_check": 1, "review": 1, "truncated": 1, "unchanged": 1}
    assert m["check_failures"]["lost_color"] == 1 and m["check_failures"]["added_color"] == 1
    # the fake NLL: 2/token for originals, 1/token for "neat" rewrites
    assert m["nll_before"] == pytest.approx(2.0)
    assert m["nll_after"] < m["nll_before"] and m["nll_accepted_after"] == pytest.approx(1.0)


def test_review_orders_cancel_position_bias(tmp_path):
    """A judge that always answers "A": with one seeded order the verdict is a coin flip by
    position; with both orders the log-odds cancel and nothing is preferred."""
    table = {f"Answer {i} is here.": (f"Answer {i} is shown here.", True) for i in range(12)}
    recs = [llava_record(f"r{i}", turns=[("Q?", f"Answer {i} is here.")]) for i in range(12)]
    one = restyle(recs, FakeLLM(table, "always_a"), RestyleParams(review_orders=1), seed=0, cache=ResponseCache(None, "x"))
    verdicts = [r["verdict"] for r in one.log]
    assert 0 < verdicts.count("rewrite") < 12
    assert all((r["rewrite_label"] == "A") == (r["verdict"] == "rewrite") for r in one.log)
    other_seed = restyle(recs, FakeLLM(table, "always_a"), RestyleParams(review_orders=1), seed=1, cache=ResponseCache(None, "x"))
    assert [r["verdict"] for r in other_seed.log] != verdicts
    both = restyle(recs, FakeLLM(table, "always_a"), RestyleParams(review_orders=2), seed=0, cache=ResponseCache(None, "x"))
    assert all(r["verdict"] == "original" and r["p_rewrite"] == 0.5 for r in both.log)


def test_cache_makes_reruns_cheap_and_identical(tmp_path):
    llm = FakeLLM(TABLE)
    first = restyle(_records(), llm, RestyleParams(), seed=0, cache=ResponseCache(tmp_path, llm.fingerprint))
    assert llm.calls["generate"] > 0
    llm2 = FakeLLM(TABLE)
    cache = ResponseCache(tmp_path, llm2.fingerprint)
    again = restyle(_records(), llm2, RestyleParams(), seed=0, cache=cache)
    assert llm2.calls == {"generate": 0, "review": 0, "nll": 0}
    assert again.records == first.records and again.log == first.log
    assert again.metrics["cache_misses"] == 0
    assert again.metrics["cache_hits"] == first.metrics["cache_misses"] + first.metrics["cache_hits"] > 0
    # another model, or other generation settings: no hits
    llm3 = FakeLLM(TABLE)
    llm3.fingerprint = "other-model"
    restyle(_records(), llm3, RestyleParams(), seed=0, cache=ResponseCache(tmp_path, llm3.fingerprint))
    assert llm3.calls["generate"] > 0
    llm4 = FakeLLM(TABLE)
    restyle(_records(), llm4, RestyleParams(max_length_ratio=3.0), seed=0, cache=ResponseCache(tmp_path, llm4.fingerprint))
    assert llm4.calls["generate"] > 0


def test_collect_turns_refuses_unresolved_candidates():
    from align2llava.errors import DataError

    rec = llava_record("r", turns=[("Q?", "A.")])
    rec["conversations"][1]["value"] = ["A.", "B."]
    with pytest.raises(DataError, match="id r.*candidate lists"):
        collect_turns([rec])


# ------------------------------------------------------------------------- tiny real model
@pytest.fixture(scope="module")
def tiny_llm(tiny_llava):
    return InnerLLM(tiny_llava, dtype="float32")


def test_inner_llm_nll_matches_a_full_forward(tiny_llm):
    import torch

    prompt = tiny_llm.chat([{"role": "user", "content": "What color is the shape?"}])
    (total, n), _ = tiny_llm.nll([prompt, prompt + "x"], ["It is blue.", "The shape is red."])
    ids_p = tiny_llm.tok(prompt, add_special_tokens=False).input_ids
    ids_r = tiny_llm.tok("It is blue.", add_special_tokens=False).input_ids
    with torch.inference_mode():
        logits = tiny_llm.model(input_ids=torch.tensor([ids_p + ids_r])).logits[0]
    ref = torch.nn.functional.cross_entropy(logits[len(ids_p) - 1: -1], torch.tensor(ids_r), reduction="sum")
    assert n == len(ids_r) and total == pytest.approx(float(ref), rel=1e-4)
    assert math.isfinite(total) and total > 0


def test_inner_llm_generate_matches_hf_generate_with_shared_prefix_and_padding(tiny_llm):
    import torch

    short = tiny_llm.chat([{"role": "user", "content": "Is there a triangle?"}])
    long = tiny_llm.chat([{"role": "user", "content": "Describe the image in detail, the shape and its color."}])
    ids = tiny_llm.tok(short, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.inference_mode():
        ref = tiny_llm.model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, eos_token_id=-1,
                                      pad_token_id=tiny_llm.tok.pad_token_id)[0, ids.shape[1]:].tolist()
    alone = tiny_llm.generate([short], [8])[0]
    assert alone["tokens"] == 8 and not alone["finished"]  # random weights rarely stop
    assert alone["text"] == tiny_llm.tok.decode(ref, skip_special_tokens=True)
    batched = tiny_llm.generate([long, short], [5, 8])  # shared prefix, left padding, own caps
    assert batched[1]["text"] == alone["text"] and batched[0]["tokens"] <= 5
    no_prefix = tiny_llm.generate(["red circle blue", short], [8, 8])  # nothing shared
    assert no_prefix[1]["text"] == alone["text"]
    logits = tiny_llm.choice_logits([short, long], ("A", "B"))
    assert len(logits) == 2 and all(len(x) == 2 and all(math.isfinite(v) for v in x) for x in logits)


# ------------------------------------------------------------------------------- stage CLI
def _stage_inputs(tmp_path: Path, model: Path, enabled: bool = True) -> list[str]:
    recs = _records()
    (tmp_path / "selected.json").write_text(json.dumps(recs))
    (tmp_path / "params.yaml").write_text(
        f"base:\n  base_model: {model}\nrestyle:\n  enabled: {str(enabled).lower()}\n  dtype: float32\n"
        f"  batch_size: 4\n  max_new_tokens: 12\n  cache_dir: {tmp_path / 'cache'}\n"
    )
    return ["--params", str(tmp_path / "params.yaml"), "--selected", str(tmp_path / "selected.json"),
            "--out-dir", str(tmp_path / "out"), "--metrics-dir", str(tmp_path / "metrics")]


def test_stage_cli_on_tiny_model_and_cached_rerun(tmp_path, tiny_llava):
    from stages.restyle import main

    args = _stage_inputs(tmp_path, tiny_llava)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    curated = json.loads((tmp_path / "out" / "curated.json").read_text())
    assert [r["id"] for r in curated] == ["r1", "r2", "r3"]
    log_rows = [json.loads(x) for x in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert len(log_rows) == 5 and {"id", "turn", "original", "rewrite", "verdict", "check", "kept", "reason"} <= set(log_rows[0])
    m = json.loads((tmp_path / "metrics" / "restyle.json").read_text())
    assert_summary_keys(m, "restyle")
    for key in ("acceptance_rate", "rejections", "nll_before", "nll_after", "turns", "cache_misses"):
        assert key in m
    assert m["turns"] == 5 and math.isfinite(m["nll_before"]) and m["nll_before"] > 0
    assert m["cache_misses"] > 0
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    m2 = json.loads((tmp_path / "metrics" / "restyle.json").read_text())
    assert m2["cache_misses"] == 0 and m2["cache_hits"] == m["cache_misses"] + m["cache_hits"]
    assert json.loads((tmp_path / "out" / "curated.json").read_text()) == curated
    assert [json.loads(x) for x in (tmp_path / "out" / "log.jsonl").read_text().splitlines()] == log_rows


def test_stage_cli_disabled_passes_through(tmp_path):
    from stages.restyle import main

    args = _stage_inputs(tmp_path, tmp_path / "no-model-needed", enabled=False)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out" / "curated.json").read_text()) == _records()
    assert (tmp_path / "out" / "log.jsonl").read_text() == ""
    assert json.loads((tmp_path / "metrics" / "restyle.json").read_text())["acceptance_rate"] == 0.0


def test_stage_cli_bad_selection_is_one_line_error(tmp_path):
    from stages.restyle import main

    args = _stage_inputs(tmp_path, tmp_path / "missing-model")
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and res.output.startswith("Error: ") and "config.json" in res.output
    (tmp_path / "selected.json").write_text("[{\"id\": 1}")
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "not valid JSON" in res.output and "Traceback" not in res.output


def test_docs_show_the_prompts_in_use():
    from align2llava.steps.restyle import llm as r

    doc = (Path(__file__).resolve().parents[1] / "docs" / "restyle.md").read_text()
    flat = " ".join(doc.split())
    for text in (r.REWRITE_SYSTEM, r.REVIEW_SYSTEM, *r.REWRITE_EXAMPLE):
        assert " ".join(text.split()) in flat, text
    for line in (*r.REWRITE_USER.split("\n"), *r.REVIEW_USER.split("\n")):
        assert line.strip() in doc, line


def test_inner_llm_no_repeat_ngram_breaks_loops(tiny_llm, monkeypatch):
    prompt = tiny_llm.chat([{"role": "user", "content": "Describe the image."}])
    seen = []
    decode = tiny_llm.tok.decode
    monkeypatch.setattr(tiny_llm.tok, "decode", lambda ids, **kw: seen.append(list(ids)) or decode(ids, **kw))

    def bigrams():
        tiny_llm.generate([prompt], [24])
        ids = seen.pop()
        return [tuple(ids[i: i + 2]) for i in range(len(ids) - 1)]

    free = bigrams()
    assert len(set(free)) < len(free)  # a random tiny model loops
    monkeypatch.setattr(tiny_llm, "no_repeat_ngram", 2)
    banned = bigrams()
    assert len(banned) > 2 and len(set(banned)) == len(banned)
