"""The Hugging Face `evaluate` modules in align2llava/steps/evaluation/metrics/: loaded by path,
offline, from a read-only copy; the evaluation step's figures through them equal those of the
pure-Python formulas they replaced; shipped as package data."""

from __future__ import annotations

import random
import shutil
import stat

import pytest

from align2llava.errors import DataError
from align2llava.steps.evaluation.evaluation import (
    METRICS_DIR,
    Item,
    benchmark_metrics,
    eval_file_metrics,
    load_metric,
    metric_path,
    normalize,
    pope_metrics,
    score_items,
)
from tests.conftest import ROOT

# ----------------------------------------------------------------------------- the formulas before


def _mean(xs):
    return round(sum(xs) / len(xs), 4) if xs else 0.0


def old_benchmark_metrics(rows, prefix="benchmark"):
    out = {f"{prefix}_accuracy": _mean([float(r["correct"]) for r in rows]),
           f"{prefix}_exact_match": _mean([float(r["exact_match"]) for r in rows]),
           f"{prefix}_count": len(rows)}
    for t in sorted({r["type"] for r in rows}):
        out[f"{prefix}_accuracy_{t}"] = _mean([float(r["correct"]) for r in rows if r["type"] == t])
    return out


def old_pope_metrics(rows):
    tp = sum(1 for r in rows if r["extracted"] == "yes" and normalize(r["answer"]) == "yes")
    fp = sum(1 for r in rows if r["extracted"] == "yes" and normalize(r["answer"]) == "no")
    fn = sum(1 for r in rows if r["extracted"] == "no" and normalize(r["answer"]) == "yes")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"pope_accuracy": _mean([float(r["correct"]) for r in rows]), "pope_precision": round(precision, 4),
            "pope_recall": round(recall, 4), "pope_f1": round(f1, 4),
            "pope_yes_ratio": _mean([float(r["extracted"] == "yes") for r in rows]), "pope_count": len(rows)}


def old_eval_file_metrics(rows):
    return {"eval_exact_match": _mean([float(r["exact_match"]) for r in rows]),
            "eval_vqa_accuracy": _mean([r["vqa_accuracy"] for r in rows]), "eval_count": len(rows)}


# ----------------------------------------------------------------------------- a hand-made set

VQA = [  # (type, gold, prediction)
    ("shape", "circle", "It is a circle."), ("shape", "triangle", "circle"), ("shape", "rectangle", "A Rectangle!"),
    ("color", "red", "red"), ("color", "light blue", "The circle is light-blue."), ("color", "blue", "light blue"),
    ("color", "gray", "grey"), ("yes_no", "yes", "Yes, it is."), ("yes_no", "no", "It is not red."),
    ("yes_no", "no", "yes"), ("count", "2", "two"), ("count", "3", "There are 3."),
]
POPE = [("yes", "Yes"), ("yes", "There is no circle."), ("no", "yes."), ("no", "The image does not show one."),
        ("no", "NO"), ("yes", "a red circle"), ("yes", "no, yes")]
EVAL = [  # (gold answers, prediction)
    (["red"], "red"), (["red"], " Red. "), (["red"] * 2 + ["dark red"] * 8, "red"),
    (["red"] * 2 + ["dark red"] * 8, "dark red"), (["2", "two"], "two"), (["blue", "navy"], "green"),
]


def hand_made_rows():
    items = [Item(f"v{i}", "vqa", t, "Q?", [g], "a.png") for i, (t, g, _) in enumerate(VQA)]
    items += [Item(f"p{i}", "pope", "pope", "Is there?", [g], "a.png") for i, (g, _) in enumerate(POPE)]
    items += [Item(f"e{i}", "eval", "eval", "Q?", g, "a.png") for i, (g, _) in enumerate(EVAL)]
    return score_items(items, [p for *_, p in VQA] + [p for _, p in POPE] + [p for _, p in EVAL])


def by_source(rows, source):
    return [r for r in rows if r["source"] == source]


def test_same_figures_as_before_on_a_hand_made_set():
    rows = hand_made_rows()
    vqa, pope, ev = by_source(rows, "vqa"), by_source(rows, "pope"), by_source(rows, "eval")
    assert benchmark_metrics(vqa) == old_benchmark_metrics(vqa)
    assert pope_metrics(pope) == old_pope_metrics(pope)
    assert eval_file_metrics(ev) == old_eval_file_metrics(ev)
    # and by hand: correct v0, v2, v3, v4, v7, v8, v10, v11 (8 of 12); whole generation v2, v3, v10
    assert benchmark_metrics(vqa)["benchmark_accuracy"] == round(8 / 12, 4)
    assert benchmark_metrics(vqa)["benchmark_exact_match"] == round(3 / 12, 4)
    assert benchmark_metrics(vqa)["benchmark_accuracy_color"] == 0.5
    # read yes, no, yes, no, no, yes, no: tp 2 (p0, p5), fp 1 (p2), fn 2 (p1, p6), tn 2
    assert pope_metrics(pope) == {"pope_accuracy": round(4 / 7, 4), "pope_precision": 0.6667, "pope_recall": 0.5,
                                  "pope_f1": 0.5714, "pope_yes_ratio": round(3 / 7, 4), "pope_count": 7}
    # vqa accuracy per question 1, 1, 2/3, 1, 1, 0
    assert eval_file_metrics(ev)["eval_vqa_accuracy"] == round((4 + 2 / 3) / 6, 4)


def test_same_figures_as_before_on_random_answers():
    rng = random.Random(0)
    words = ["yes", "no", "not", "red", "light blue", "blue", "circle", "two", "2", "the", "a", "It's", "."]
    say = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 5)))  # noqa: E731
    items = [Item(f"v{i}", "vqa", rng.choice(["color", "shape", "yes_no"]), "Q?",
                  [rng.choice(["red", "blue", "light blue", "circle", "yes", "no"])], None) for i in range(150)]
    items += [Item(f"p{i}", "pope", "pope", "Q?", [rng.choice(["yes", "no"])], None) for i in range(150)]
    items += [Item(f"e{i}", "eval", "eval", "Q?", [rng.choice(["red", "2", "blue"]) for _ in range(rng.randint(1, 10))],
                   None) for i in range(150)]
    rows = score_items(items, [say() for _ in items])
    vqa, pope, ev = by_source(rows, "vqa"), by_source(rows, "pope"), by_source(rows, "eval")
    assert benchmark_metrics(vqa) == old_benchmark_metrics(vqa)
    assert pope_metrics(pope) == old_pope_metrics(pope)
    assert eval_file_metrics(ev) == old_eval_file_metrics(ev)


# ----------------------------------------------------------------------------- the modules


def test_modules_load_by_path_with_info():
    import evaluate

    vqa = evaluate.load(metric_path("vqa_accuracy"))
    assert isinstance(vqa, evaluate.Metric) and vqa.name == "vqa_accuracy"
    assert "Visual Question Answering" in vqa.citation and "min(1" in vqa.description
    assert vqa.compute(predictions=["Two", "red"], references=[["2", "two", "3"], ["blue"]]) == {
        "vqa_accuracy": pytest.approx((2 / 3 + 0) / 2)}
    assert vqa.compute(predictions=["A circle."], references=["circle"]) == {"vqa_accuracy": 1.0}
    with pytest.raises(ValueError, match="all strings or all lists"):  # evaluate would cast one to the other
        vqa.compute(predictions=["Two", "blue"], references=[["2", "two", "3"], "blue"])
    pope = evaluate.load(metric_path("pope"))
    assert pope.name == "pope" and "Object Hallucination" in pope.citation and "yes_ratio" in pope.inputs_description
    assert pope.compute(predictions=["Yes, there is.", "There is no dog.", "nope"], references=["yes", "yes", "no"]) == {
        "accuracy": pytest.approx(1 / 3), "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="references must be yes or no"):
        pope.compute(predictions=["yes"], references=["maybe"])


def test_modules_load_offline_from_a_read_only_copy_in_any_folder(tmp_path, monkeypatch):
    import os

    import evaluate

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    copy = tmp_path / "checkout" / "pope"
    shutil.copytree(METRICS_DIR / "pope", copy)
    for p in [copy / "pope.py", copy]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    monkeypatch.chdir(tmp_path)
    try:
        m = evaluate.load(str(copy), keep_in_memory=True)
        assert m.compute(predictions=["no"], references=["no"])["accuracy"] == 1.0
        assert sorted(p.name for p in copy.iterdir()) == ["pope.py"]  # nothing written next to it
    finally:
        copy.chmod(0o755)
    # the module is copied into HF_HOME/modules (tests: under tmp), never into the checkout
    assert list((evaluate.config.HF_MODULES_CACHE / "evaluate_modules" / "metrics" / "pope").rglob("pope.py"))
    assert ROOT not in evaluate.config.HF_MODULES_CACHE.parents
    # the step finds its modules from the package, not the working folder
    assert load_metric("vqa_accuracy").compute(predictions=["x"], references=[["x"]]) == {"vqa_accuracy": 1.0}


def test_unknown_module_is_a_data_error():
    with pytest.raises(DataError, match="no evaluate module 'bleu'"):
        metric_path("bleu")


def test_module_files_are_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = "align2llava.steps.evaluation"
    shipped = {p for pattern in spec[package] for p in (ROOT / package.replace(".", "/")).glob(pattern)}
    modules = set(METRICS_DIR.glob("*/*.py"))
    assert modules and modules <= shipped
    assert {p.parent.name for p in modules} == {"vqa_accuracy", "pope"}
    assert all(p.stem == p.parent.name for p in modules)  # evaluate.load(folder) needs <folder>/<folder>.py
