"""diagnose (demo diagnostics only): the oracle reader, defect AUROC and rates, the stage, and
that no method stage reads the oracle."""

from __future__ import annotations

import ast
import json

import pytest
import yaml
from click.testing import CliRunner

from align2llava.demo.diagnostics import auroc, defect_auroc, defect_rates, diagnose, read_oracle
from align2llava.errors import DataError
from tests.conftest import ROOT, llava_record
from tests.test_pipeline import imported_modules, module_of, pipeline

# A hand-made demo: five pool records with oracle rows, one (x) without; an oracle row (z) for
# a record not in the pool.
ORACLE = [
    {"id": "a", "defects": [], "turn_defects": {}},
    {"id": "b", "defects": ["generic_question"], "turn_defects": {"0": ["generic_question"]}},
    {"id": "c", "defects": ["hallucinated_color"], "turn_defects": {"1": ["hallucinated_color"]}},
    {"id": "d", "defects": []},
    {"id": "e", "defects": ["hallucinated_color", "wrong_yes_no"],
     "turn_defects": {"0": ["wrong_yes_no"], "1": ["hallucinated_color"]}},
    {"id": "z", "defects": ["omitted_key_fact"], "turn_defects": {"0": ["omitted_key_fact"]}},
]
# id -> (question score, per turn the candidate scores and the best); answer score = mean of bests
SCORES = {"a": (3.0, [([2.0], 0), ([0.5, 2.5], 1)]), "b": (1.0, [([3.0], 0)]),
          "c": (4.0, [([1.0], 0), ([-1.0], 0)]), "d": (0.0, [([0.0], 0)]),
          "e": (5.0, [([-2.0], 0), ([0.0], 0)]), "x": (9.0, [([9.0], 0)])}
POOL = ["a", "b", "c", "d", "e", "x"]
# id -> dropped_at (None: kept)
AUDIT = {"a": None, "b": "question", "c": "answer", "d": None, "e": "answer", "x": None}
SELECTED = ["a", "d", "x"]

# By hand. Clean records a, d: question scores 3, 0; answer scores 2.25, 0; best turns 2, 2.5, 0.
EXPECTED_AUROC = {
    "auroc_generic_question": 0.5,           # 3 > 1, 0 < 1 (b's question score)
    "auroc_turn_generic_question": 0.0,      # 2, 2.5, 0 all below b's turn 3
    "auroc_hallucinated_color": 0.875,       # 2.25 and 0 vs c 0, e -1: 3.5 of 4 (a tie)
    "auroc_turn_hallucinated_color": 0.9167,  # 2, 2.5, 0 vs c's turn 1 (-1), e's turn 1 (0): 5.5 of 6
    "auroc_wrong_yes_no": 1.0,
    "auroc_turn_wrong_yes_no": 1.0,
}
EXPECTED_RATES = {
    # a b c d e (x has no oracle row)
    "pool": {"clean": 0.4, "generic_question": 0.2, "hallucinated_color": 0.4, "wrong_yes_no": 0.2},
    # kept or dropped at the answer step: a c d e (and x)
    "question_kept": {"clean": 0.5, "hallucinated_color": 0.5, "wrong_yes_no": 0.25},
    # a d (and x)
    "selected": {"clean": 1.0},
}


def score_rows():
    rows = []
    for rid, (q, turns) in SCORES.items():
        best = [s[b] for s, b in turns]
        rows.append({"id": rid, "task": "detail", "question_score": q, "answer_score": sum(best) / len(best),
                     "turns": [{"turn": k, "scores": s, "best": b} for k, (s, b) in enumerate(turns)]})
    return rows


def audit_rows():
    return [{"id": rid, "task": "detail", "kept": d is None, "dropped_at": d, "question_score": None,
             "answer_score": None} for rid, d in AUDIT.items()]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_auroc():
    assert auroc([3, 4], [1, 2]) == 1.0 and auroc([1], [2]) == 0.0 and auroc([1, 2], [1, 2]) == 0.5
    assert auroc([1, 2], [2]) == 0.25


def test_defect_auroc_by_hand(tmp_path):
    m = defect_auroc(score_rows(), read_oracle(jsonl(tmp_path / "o.jsonl", ORACLE)))
    assert m == EXPECTED_AUROC  # z (omitted_key_fact) has no score row: no AUROC for it


def test_defect_auroc_reads_the_worst_turn_when_select_does(tmp_path, monkeypatch):
    oracle = read_oracle(jsonl(tmp_path / "o.jsonl", ORACLE))
    # worst best-candidate turn: clean a 2.0, d 0.0; c -1.0, e -2.0: every clean record above
    expected = {**EXPECTED_AUROC, "auroc_hallucinated_color": 1.0}
    assert defect_auroc(score_rows(), oracle, "min") == expected
    assert defect_auroc(score_rows(), oracle, "mean") == EXPECTED_AUROC
    # the stage takes the aggregation from select.turn_aggregate
    from stages.diagnose import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    args = _demo_files(tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**params, "select": {"turn_aggregate": "min"}}))
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "metrics/diagnose.json").read_text())["defect_auroc"] == expected


def test_defect_auroc_as_the_score_stage_had_it(tmp_path):
    """The case the score stage's test had, same figures."""
    rows = [{"id": str(i), "task": "detail", "question_score": float(i), "answer_score": float(-i),
             "turns": [{"turn": 0, "scores": [float(-i)], "best": 0}]} for i in range(6)]
    oracle = [{"id": "0", "defects": []}, {"id": "1", "defects": []},
              {"id": "2", "defects": ["generic_question"], "turn_defects": {"0": ["generic_question"]}},
              {"id": "3", "defects": ["hallucinated_color"], "turn_defects": {"0": ["hallucinated_color"]}},
              {"id": "4", "defects": []}, {"id": "5", "defects": ["hallucinated_color"]}]
    m = defect_auroc(rows, read_oracle(jsonl(tmp_path / "o.jsonl", oracle)))
    # clean ids 0,1,4: question scores 0,1,4 vs generic id 2 -> 1 of 3 above; answer scores
    # 0,-1,-4 vs -3,-5 -> 5 of 6; turns 0,-1,-4 vs -2 (generic) and vs -3 (colour; id 5 has no
    # turn defect) -> 2 of 3 each
    assert m == {"auroc_generic_question": 0.3333, "auroc_turn_generic_question": 0.6667,
                 "auroc_hallucinated_color": 0.8333, "auroc_turn_hallucinated_color": 0.6667}


def test_defect_rates_by_hand():
    oracle = {o["id"]: o for o in ORACLE}
    assert defect_rates(["a", "b", "e", "z"], oracle) == {
        "clean": 0.25, "generic_question": 0.25, "hallucinated_color": 0.25, "omitted_key_fact": 0.25,
        "wrong_yes_no": 0.25}
    assert defect_rates([], oracle) == {}


def test_diagnose_by_hand(tmp_path):
    oracle = read_oracle(jsonl(tmp_path / "o.jsonl", ORACLE))
    m = diagnose(oracle, score_rows(), POOL, SELECTED, audit_rows())
    assert m == {"oracle_rows": 6, "pool": 6, "pool_without_oracle": 1, "question_kept": 5, "selected": 3,
                 "selected_without_oracle": 1, "defect_auroc": EXPECTED_AUROC, "defect_rates": EXPECTED_RATES}


@pytest.mark.parametrize("line, problem", [
    ('{"id": "a", "defects": []', "line 2 is not valid JSON"),
    ('["a"]', "line 2: expected an object, got list"),
    ('{"defects": []}', "line 2: missing or invalid 'id'"),
    ('{"id": "b"}', "line 2 (id b): 'defects' must be a list of defect names"),
    ('{"id": "b", "defects": "generic_question"}', "line 2 (id b): 'defects' must be a list"),
    ('{"id": "b", "defects": [], "turn_defects": {"0": "wrong_yes_no"}}', "line 2 (id b): 'turn_defects' must map"),
    ('{"id": "a", "defects": []}', "line 2 (id a): duplicate id"),
])
def test_malformed_oracle_is_one_error_naming_the_line(tmp_path, line, problem):
    path = tmp_path / "o.jsonl"
    path.write_text('{"id": "a", "defects": []}\n' + line + "\n")
    with pytest.raises(DataError) as exc:
        read_oracle(path)
    assert str(exc.value).startswith(f"{path}: ") and problem in str(exc.value)


def _demo_files(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "pool.json").write_text(json.dumps([llava_record(i) for i in POOL]))
    jsonl(tmp_path / "oracle.jsonl", ORACLE)
    jsonl(tmp_path / "scores.jsonl", score_rows())
    jsonl(tmp_path / "audit.jsonl", audit_rows())
    (tmp_path / "selected.json").write_text(json.dumps([llava_record(i) for i in SELECTED]))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"base": {"pool": "pool.json"}, "diagnose": {"oracle": "oracle.jsonl"}, "select": {}}))
    return ["--scores", "scores.jsonl", "--selected", "selected.json", "--audit", "audit.jsonl"]


def test_stage_writes_demo_diagnostics(tmp_path, monkeypatch):
    from stages.diagnose import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    res = CliRunner().invoke(main, _demo_files(tmp_path))
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "metrics/diagnose.json").read_text())
    assert m["defect_auroc"] == EXPECTED_AUROC and m["defect_rates"] == EXPECTED_RATES
    assert m["pool_without_oracle"] == 1 and m["selected_without_oracle"] == 1 and "wall_seconds" in m["run"]


def test_stage_logs_to_mlflow(tmp_path, monkeypatch):
    import mlflow

    from stages.diagnose import main

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, _demo_files(tmp_path))
    assert res.exit_code == 0, res.output
    run = mlflow.search_runs(experiment_names=["align2llava"], filter_string="tags.stage = 'diagnose'",
                             output_format="list")[0]
    assert run.data.metrics["defect_rates.pool.clean"] == 0.4
    assert run.data.params["diagnose.oracle"] == "oracle.jsonl"


def test_stage_malformed_oracle_is_one_line_error(tmp_path, monkeypatch):
    from stages.diagnose import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    args = _demo_files(tmp_path)
    with (tmp_path / "oracle.jsonl").open("a") as f:
        f.write('{"id": "q", "defects": [1]}\n')
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip() == "Error: oracle.jsonl: line 7 (id q): 'defects' must be a list of defect names"
    assert not (tmp_path / "metrics/diagnose.json").exists()


def test_selection_defects_benchmark_prints_the_rates(tmp_path, monkeypatch):
    from benchmarks.selection_defects import main

    jsonl(tmp_path / "oracle.jsonl", ORACLE)
    (tmp_path / "selected.json").write_text(json.dumps([llava_record(i) for i in ["a", "b", "e"]]))
    res = CliRunner().invoke(main, ["--oracle", str(tmp_path / "oracle.jsonl"),
                                    "--selected", str(tmp_path / "selected.json")])
    assert res.exit_code == 0, res.output
    rows = {r[0]: r[1:] for r in (line.split() for line in res.output.splitlines()[1:])}
    # pool: the 6 oracle rows; selected a, b, e
    assert rows["clean"] == ["0.333", "0.333"] and rows["generic_question"] == ["0.167", "0.333"]
    assert rows["omitted_key_fact"] == ["0.167", "0.000"]


# ----------------------------------------------------------------------------- the method path

# select reads the oracle for its diagnostic method `oracle` only (tests/test_selection.py checks
# that the reward path does not)
METHOD_STAGES = ["annotate-import", "train-reward", "score", "restyle", "finetune", "evaluate"]


def test_no_method_module_imports_the_demo():
    for layer in ("steps", "models", "data"):
        for path in sorted((ROOT / "align2llava" / layer).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                assert not any(n.startswith("align2llava.demo") for n in names), f"{path} imports {names}"


@pytest.mark.parametrize("name", METHOD_STAGES)
def test_method_stages_do_not_read_the_oracle(name):
    script = ROOT / (module_of(name).replace(".", "/") + ".py")
    assert "oracle" not in script.read_text()
    assert not [m for m in imported_modules(script) if m.startswith("align2llava/demo/")]
    stage = pipeline()[name]
    assert not [d for d in stage.get("deps", []) if "oracle" in d]
    assert "oracle" not in json.dumps(yaml.safe_load((ROOT / "params.yaml").read_text())[name.replace("-", "_")])
