"""`align2llava validate` and `convert` as a user runs them."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from align2llava.ops.cli import main
from tests.conftest import llava_record


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_validate_clean_file_exits_0(tmp_path, image_root):
    f = write(tmp_path / "ok.json", [llava_record("a", "a.png"), llava_record("b", "b.png")])
    res = run("validate", f, "--image-root", image_root)
    assert res.exit_code == 0, res.output
    assert "2 records, 2 valid, 0 with problems" in res.output


def test_validate_reports_one_line_per_problem_and_exits_1(tmp_path, image_root):
    bad = llava_record("b", "missing.png")
    bad["conversations"][0]["from"] = "gpt"
    f = write(tmp_path / "bad.json", [llava_record("a", "a.png"), bad, None])
    res = run("validate", f, "--image-root", image_root)
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert any(l.startswith(f"{f}: record 1 (id b): turn 0 is from 'gpt'") for l in lines)
    assert any(l.startswith(f"{f}: record 1 (id b): image file") and "not found" in l for l in lines)
    assert f"{f}: record 2: expected an object, got null" in lines
    assert lines[-1].endswith("3 records, 1 valid, 2 with problems (3 problems)")
    assert "Traceback" not in res.output


@pytest.mark.parametrize("content", [b"not json at all", b"\xc3\x28\xa0\xa1", b"[1, 2", b'{"a": 1}', b"null"])
def test_validate_unreadable_file_is_one_line_error(tmp_path, content):
    f = tmp_path / "x.json"
    f.write_bytes(content)
    res = run("validate", f)
    assert res.exit_code == 1
    assert res.output.startswith("Error: ") and len(res.output.strip().splitlines()) == 1
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_validate_truncated_jsonl_names_the_line(tmp_path):
    good = json.dumps(llava_record("a", None))
    f = tmp_path / "x.jsonl"
    f.write_text(good + "\n" + good + "\n" + good[:15])
    res = run("validate", f)
    assert res.exit_code == 1
    assert f"{f}: record 2: line 3 is not valid JSON" in res.output


def test_convert_round_trip_all_formats(tmp_path):
    recs = [llava_record("a", "a.png", task="detail"), llava_record("b", None, task="conversation")]
    src = write(tmp_path / "in.json", recs)
    res = run("convert", src, tmp_path / "out.parquet")
    assert res.exit_code == 0, res.output
    assert run("convert", tmp_path / "out.parquet", tmp_path / "hf_dir").exit_code == 0
    assert run("convert", tmp_path / "hf_dir", tmp_path / "m.json", "--to", "messages").exit_code == 0
    msgs = json.loads((tmp_path / "m.json").read_text())
    assert msgs[0]["messages"][0]["role"] == "user" and msgs[0]["images"] == ["a.png"]
    assert run("convert", tmp_path / "m.json", tmp_path / "back.jsonl").exit_code == 0
    back = [json.loads(l) for l in (tmp_path / "back.jsonl").read_text().splitlines()]
    assert back == recs


def test_convert_refuses_unreadable_entries(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps(llava_record("a", None)) + "\n{broken\n")
    res = run("convert", f, tmp_path / "y.json")
    assert res.exit_code == 1 and "line 2 is not valid JSON" in res.output
    assert not (tmp_path / "y.json").exists()


def test_summary_prints_headlines_in_pipeline_order_with_cost(tmp_path):
    m = tmp_path / "metrics"
    m.mkdir()
    (m / "evaluate.json").write_text(json.dumps({"benchmark_accuracy": 0.5, "pope_f1": 0.6689,
                                                 "run": {"wall_seconds": 61.2, "peak_rss_mb": 1536.0}}))
    (m / "train_reward.json").write_text(json.dumps({"question_val_pairwise_accuracy": 0.8141,
                                                     "question_val_length_baseline_accuracy": 0.5}))
    (m / "score.json").write_text(json.dumps({"scored": 1200, "answer_items": 3456, "rejected": 0,
                                              "records_per_s_this_run": 10.93}))
    (m / "custom.json").write_text(json.dumps({"b": 2, "a": 1.25, "note": "x"}))
    result = CliRunner().invoke(main, ["summary", "--metrics-dir", str(m)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "train_reward  question RM val acc 0.814, longer-text baseline 0.500",
        "score         records 1,200, answers 3,456, rejected 0, this run rec/s 10.930",
        "evaluate      benchmark accuracy 0.500, POPE F1 0.669  [61 s, 1.5 GB peak]",
        "custom        a 1.250, b 2",
    ]


def test_summary_prints_the_demo_diagnostics_line(tmp_path):
    (tmp_path / "select.json").write_text(json.dumps({"kept": 81, "pool": 900}))
    (tmp_path / "diagnose.json").write_text(json.dumps(
        {"pool_without_oracle": 0, "defect_rates": {"pool": {"clean": 0.5}, "selected": {"clean": 0.6049}}}))
    result = CliRunner().invoke(main, ["summary", "--metrics-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1] == (
        "diagnose  demo oracle: clean in pool 0.500, in selected 0.605, pool without oracle 0")


def test_summary_broken_metrics_file_is_one_line_error(tmp_path):
    (tmp_path / "select.json").write_text("{oops")
    result = CliRunner().invoke(main, ["summary", "--metrics-dir", str(tmp_path)])
    assert result.exit_code == 1 and "select.json: not a readable JSON metrics file" in result.output
    assert "Traceback" not in result.output
