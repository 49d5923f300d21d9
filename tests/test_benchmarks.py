"""The demo diagnosis scripts in benchmarks/: pair classes, noise ceiling, grounding probe."""

from __future__ import annotations

import re

import pytest
import yaml
from click.testing import CliRunner

from tests.conftest import ROOT, TINY_WORLD


def _tiny_world(tmp_path, monkeypatch, **synthesize):
    """A tiny demo world and its annotate-import pairs under tmp_path (the working folder)."""
    from stages.annotate_import import main as annotate_import
    from stages.synthesize import main as synthesize_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["synthesize"] = {**params["synthesize"], **TINY_WORLD, **synthesize}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for cmd in (synthesize_main, annotate_import):
        res = CliRunner().invoke(cmd, [])
        assert res.exit_code == 0, res.output


def _rows(output: str) -> dict[tuple[str, str], list[str]]:
    return {(r[0], r[1]): r[2:] for r in (line.split() for line in output.splitlines())
            if len(r) == 7 and r[0] in ("question", "answer")}


def test_conflict_classes_use_the_image_truth():
    from benchmarks.answer_rm_diagnosis import conflict

    right, wrong = "In the image, the circle is red.", "In the image, the circle is blue."
    vague = "The object has a distinctive appearance."
    assert conflict(right, wrong) == "colour"
    # one-sided: only the true colour tells that the rejected answer is wrong
    assert conflict(vague, wrong) == "other"
    assert conflict(vague, wrong, shape="circle", colour="red") == "colour"
    assert conflict(vague, "In the image, there is a red triangle.", shape="circle", colour="red") == "shape"
    # a negated sentence asserts nothing: "no blue shape" is right about a red circle
    assert conflict("No, there is no blue shape. It is a red circle.", vague, shape="circle", colour="red") == "other"
    assert conflict("Yes. It is a red circle.", "No. It is a red circle.", shape="circle", colour="red") == "yes/no"


def test_ridge_probe_reads_a_linear_code_and_not_noise():
    import numpy as np

    from benchmarks.grounding_probe import ridge_accuracy

    rng = np.random.default_rng(0)
    y = rng.integers(0, 8, 400)
    x = np.eye(8)[y] @ rng.normal(size=(8, 32)) + 0.1 * rng.normal(size=(400, 32))
    assert ridge_accuracy(x, y, 8) > 0.95
    assert ridge_accuracy(rng.normal(size=(400, 32)), y, 8) < 0.3


def test_annotation_ceiling_is_exact_without_annotator_noise(tmp_path, monkeypatch):
    from benchmarks.annotation_ceiling import main

    _tiny_world(tmp_path, monkeypatch, annotator_noise=0.0)
    res = CliRunner().invoke(main, [])
    assert res.exit_code == 0, res.output
    rows = _rows(res.output)
    assert ("answer", "train") in rows and ("question", "train") in rows
    for pairs, agree, tie, flipped, ceiling in rows.values():
        assert agree == pairs and tie == flipped == "0" and ceiling == "1.000"


def test_annotation_ceiling_counts_flips_from_noise(tmp_path, monkeypatch):
    from benchmarks.annotation_ceiling import main

    _tiny_world(tmp_path, monkeypatch, annotator_noise=0.6)
    res = CliRunner().invoke(main, [])
    assert res.exit_code == 0, res.output
    rows = _rows(res.output)
    for pairs, agree, tie, flipped, ceiling in rows.values():
        assert int(agree) + int(tie) + int(flipped) == int(pairs)
        assert float(ceiling) == pytest.approx((int(agree) + int(tie) / 2) / int(pairs), abs=5e-4)
    assert any(int(r[3]) > 0 for r in rows.values())  # noise reversed some pairs
    # pairs of another world are refused with a one-line error
    other = tmp_path / "other.jsonl"
    line = (tmp_path / "data/annotate_import/pairs.jsonl").read_text().splitlines()[0]
    other.write_text(line.replace('"chosen": "', '"chosen": "not in this world ') + "\n")
    res = CliRunner().invoke(main, ["--pairs", str(other)])
    assert res.exit_code == 1 and "Error:" in res.output and "Traceback" not in res.output


def test_grounding_probe_runs_on_a_tiny_model(tmp_path, monkeypatch, tiny_llava):
    from benchmarks.grounding_probe import main

    _tiny_world(tmp_path, monkeypatch)
    res = CliRunner().invoke(main, ["--base", str(tiny_llava), "--images", "20", "--layers", "0,2"])
    assert res.exit_code == 0, res.output
    rows = [line.split() for line in res.output.splitlines() if re.match(r"\s*\d+\s+\d\.\d\d", line)]
    assert [r[0] for r in rows] == ["0", "2"] and all(len(r) == 5 for r in rows)
    # each figure is a share of the held-out images (30% of those probed), printed to 2 places
    n = int(re.search(r"(\d+) pool images, ", res.output).group(1))
    held = n - int(n * 0.7)
    assert 10 <= n <= 20 and f"probe accuracy on {held} held out" in res.output
    for v in (float(v) for r in rows for v in r[1:]):
        assert abs(v * held - round(v * held)) <= 0.005 * held and 0 <= round(v * held) <= held
    res = CliRunner().invoke(main, ["--base", str(tiny_llava), "--images", "20", "--layers", "9"])
    assert res.exit_code != 0 and "--layers" in res.output


BENCHMARKS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_runs_as_a_module_without_path_edits_or_tests(name):
    """`python -m benchmarks.<name>` from the repo root: no sys.path edits, nothing from tests/."""
    import ast
    import importlib

    path = ROOT / "benchmarks" / f"{name}.py"
    tree = ast.parse(path.read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m == "tests" or m.startswith("tests.")}, imported
    assert "sys.path" not in path.read_text()
    assert f"python -m benchmarks.{name}" in (ast.get_docstring(tree) or "")
    res = CliRunner().invoke(importlib.import_module(f"benchmarks.{name}").main, ["--help"])
    assert res.exit_code == 0 and "Usage:" in res.output, res.output


def test_precision_spread_compares_thread_counts():
    from benchmarks.precision_spread import main

    res = CliRunner().invoke(main, ["--records", "6", "--dtypes", "float32", "--threads", "1,2", "--no-restyle"])
    assert res.exit_code == 0, res.output
    rows = [line.split() for line in res.output.splitlines() if line.startswith("float32 ")]
    assert [r[1] for r in rows] == ["1", "2"]
    assert all(float(r[3]) == 0.0 and r[4] == "0/6" for r in rows)  # float32: the same scores


def test_harness_probe_reuse_model_refuses_a_folder_without_a_finished_run(tmp_path):
    from click.testing import CliRunner

    from benchmarks.harness_probe import main

    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "vqa.jsonl").write_text('{"id": "q", "image": "a.png", "question": "What colour?", "answer": "red", "type": "color"}\n')
    (bench / "pope.jsonl").write_text('{"id": "p", "image": "a.png", "question": "Is there a circle?", "answer": "no", "type": "pope"}\n')
    out = CliRunner().invoke(main, ["--method", "oracle", "--reuse-model", "--bench-dir", str(bench),
                                    "--out-dir", str(tmp_path / "run")])
    assert out.exit_code != 0 and "holds no finished run's model" in out.output and "Traceback" not in out.output


def test_presence_in_words_questions_are_balanced_and_true_to_the_image():
    import random
    from types import SimpleNamespace

    from benchmarks.presence_in_words import auroc, probe_question

    truth = SimpleNamespace(shape="circle", color="teal")
    rng = random.Random(0)
    asked = [probe_question(truth, rng) for _ in range(400)]
    assert 0.4 < sum(yes for _, yes in asked) / len(asked) < 0.6
    for q, yes in asked:
        named = "circle" in q or "teal" in q
        assert named == yes, q
    assert auroc([2.0, 3.0], [0.0, 1.0]) == 1.0 and auroc([0.0], [1.0]) == 0.0 and auroc([1.0], [1.0]) == 0.5


def test_independent_test_pool_is_true_to_the_image_and_shares_no_sentence_form():
    import inspect
    from pathlib import Path

    from align2llava.demo.synthesis import instruct_data, writer
    from align2llava.demo.synthesis.world import COLORS, SHAPES, _words
    from benchmarks.test_pool_auroc import DEFECTS, EVASIVE, FORMS, GENERIC, defect_auroc, write_test_pool

    truth = {i: (SHAPES[i % 3], COLORS[i % 8]) for i in range(40)}
    records = write_test_pool({i: Path(f"{i}.png") for i in truth}, truth, 30, seed=0)
    assert len(records) == 30 * 5 and {r.defect for r in records} == {None, *DEFECTS}
    for r in records:
        shape, color = truth[int(r.image.stem)]
        named = set(_words(r.answer)) & set(COLORS + SHAPES)
        if r.defect is None:
            assert named == {shape, color}, r
        elif r.defect.startswith("hallucinated"):
            right = shape if r.defect == "hallucinated_color" else color
            assert right in named and len(named) == 2 and named != {shape, color}, r
        else:
            assert not named, r
    # written here, not by the demo's writer or the instruct data: no sentence of either reappears
    others = inspect.getsource(writer) + inspect.getsource(instruct_data)
    for text in [q for q, _ in FORMS] + [a for _, a in FORMS] + list(EVASIVE) + [x for pair in GENERIC for x in pair]:
        for piece in re.split(r"\{[a-z_]+\}", text):
            words = piece.strip(" ,.;:").split()
            if len(words) >= 4:
                assert " ".join(words) not in others, piece
    # AUROC: clean over defective
    scores = [0.0 if r.defect else 1.0 for r in records]
    assert set(defect_auroc(records, scores).values()) == {1.0}


def test_paired_accuracy_compares_within_an_image_where_auroc_compares_across():
    from pathlib import Path

    from align2llava.demo.synthesis.world import COLORS, SHAPES
    from benchmarks.test_pool_auroc import defect_auroc, paired_accuracy, write_test_pool

    truth = {i: (SHAPES[i % 3], COLORS[i % 8]) for i in range(20)}
    records = write_test_pool({i: Path(f"{i}.png") for i in truth}, truth, 20, seed=0)
    # a per-image level far larger than the clean answer's lead: right within each image, not across
    scores = [10.0 * int(r.image.stem) + (0.0 if r.defect else 1.0) for r in records]
    paired = paired_accuracy(records, scores)
    # generic questions are other questions: no clean answer to the same one
    assert set(paired) == {"hallucinated_color", "hallucinated_shape", "evasive"}
    assert set(paired.values()) == {1.0}
    assert all(a < 0.6 for a in defect_auroc(records, scores).values())
    # reversed within each image: 0
    assert set(paired_accuracy(records, [-s for s in scores]).values()) == {0.0}


def test_harness_probe_given_needs_data_and_names_records_outside_the_pool(tmp_path):
    from click.testing import CliRunner

    from benchmarks.harness_probe import main

    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "vqa.jsonl").write_text('{"id": "q", "image": "a.png", "question": "What colour?", "answer": "red", "type": "color"}\n')
    (bench / "pope.jsonl").write_text('{"id": "p", "image": "a.png", "question": "Is there a circle?", "answer": "no", "type": "pope"}\n')
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "pool.json").write_text('[{"id": "a", "task": "vqa"}]')
    (pool / "oracle.jsonl").write_text('{"id": "a", "defects": []}\n')
    data = tmp_path / "selected.json"
    data.write_text('[{"id": "a"}, {"id": "zz"}]')
    common = ["--bench-dir", str(bench), "--pool-dir", str(pool), "--out-dir", str(tmp_path / "run")]
    out = CliRunner().invoke(main, ["--method", "given", *common])
    assert out.exit_code != 0 and "needs --data" in out.output and "Traceback" not in out.output
    out = CliRunner().invoke(main, ["--method", "given", "--data", str(data), *common])
    assert out.exit_code != 0 and "1 records not in" in out.output and "'zz'" in out.output
