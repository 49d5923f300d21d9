"""Reading and writing every supported format; lossless round trips."""

from __future__ import annotations

import json

import pytest

from align2llava.data.io import read_records, write_records
from align2llava.errors import DataError
from tests.conftest import llava_record


def _records():
    return [
        llava_record("r1", "a.png", task="conversation",
                     turns=[("What color?", "Red."), ("What shape?", "A circle.")]),
        llava_record("r2", "b.png", task="detail"),
        {**llava_record("r3", None), "source": {"k": 1}},
    ]


@pytest.mark.parametrize("fmt,name", [("json", "d.json"), ("jsonl", "d.jsonl"), ("parquet", "d.parquet"), ("hf", "d_hf"), ("messages", "d.json")])
def test_round_trip_is_lossless(tmp_path, fmt, name):
    recs = _records()
    if fmt in ("parquet", "hf"):  # columnar formats need one schema: drop the nested extra
        recs = [{k: v for k, v in r.items() if k != "source"} for r in recs]
    path = write_records(recs, tmp_path / name, fmt)
    back = read_records(path, "json" if fmt == "messages" else None)
    assert back.problems == []
    assert back.records == recs


def test_messages_style_converts_and_gets_deterministic_ids(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": "<image>What is it?"},
                          {"role": "assistant", "content": "A circle."}],
             "images": ["a.png"]}]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    a = read_records(tmp_path / "m.json").records
    b = read_records(tmp_path / "m.json").records
    assert a == b
    rec = a[0]
    assert rec["image"] == "a.png" and rec["system"] == "be brief"
    assert [t["from"] for t in rec["conversations"]] == ["human", "gpt"]
    assert isinstance(rec["id"], str) and len(rec["id"]) == 16


def test_jsonl_truncated_last_line_is_a_problem_not_a_crash(tmp_path):
    good = json.dumps(llava_record("r1"))
    (tmp_path / "d.jsonl").write_text(good + "\n" + good[:20])
    loaded = read_records(tmp_path / "d.jsonl")
    assert len(loaded.records) == 1
    assert len(loaded.problems) == 1 and "line 2 is not valid JSON" in str(loaded.problems[0])


@pytest.mark.parametrize("content,expected", [
    (b"[{\"id\": 1,", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not valid UTF-8"),
    (b"{\"id\": 1}", "expected a JSON list"),
])
def test_unreadable_files_raise_one_line_data_errors(tmp_path, content, expected):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(DataError, match=expected) as err:
        read_records(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="unknown format"):
        read_records(tmp_path / "x.csv")
    with pytest.raises(DataError, match="file not found"):
        read_records(tmp_path / "missing.json")


def test_fingerprint_keys_on_contents_not_location(tmp_path):
    from align2llava.data.io import fingerprint

    for d in ("a", "b"):
        (tmp_path / d / "sub").mkdir(parents=True)
        (tmp_path / d / "config.json").write_text("{}")
        (tmp_path / d / "sub" / "w.safetensors").write_bytes(b"\x00\x01")
        (tmp_path / d / "README.md").write_text(d)
    a, b = tmp_path / "a", tmp_path / "b"
    assert fingerprint(a, suffixes=(".json", ".safetensors")) == fingerprint(b, suffixes=(".json", ".safetensors"))
    assert fingerprint(a) != fingerprint(b)  # README.md differs and counts without a suffix filter
    before = fingerprint(a, extra={"batch": 4})
    assert before != fingerprint(a, extra={"batch": 8}) and before != fingerprint(a)
    (a / "sub" / "w.safetensors").write_bytes(b"\x00\x02")
    assert fingerprint(a, extra={"batch": 4}) != before
    assert fingerprint(a / "config.json", a / "x") != fingerprint(a / "config.json")  # a missing path counts
    assert fingerprint(a / "config.json", b / "README.md") != fingerprint(b / "README.md", a / "config.json")
    assert fingerprint(extra=[{"id": 1}]) == fingerprint(extra=[{"id": 1}]) != fingerprint(extra=[{"id": 2}])
    assert len(before) == 64


@pytest.mark.parametrize("content,message", [
    ('{"id": 1, "k": 2}\n{"id": 2\n', "line 2 is not valid JSON"),
    ('{"id": 1, "k": 2}\n\n[1, 2]\n', "line 3 is not a JSON object"),
    ('{"id": 1}\n', "line 1 lacks keys k (of id, k)"),
    ('{"id": 1, "k": -1}\n', "line 1: k must be >= 0"),
])
def test_read_jsonl_strict_names_file_and_line(tmp_path, content, message):
    from align2llava.data.io import read_jsonl_strict

    f = tmp_path / "rows.jsonl"
    f.write_text(content)
    with pytest.raises(DataError) as exc:
        read_jsonl_strict(f, required=("id", "k"), check=lambda r: "k must be >= 0" if r["k"] < 0 else None)
    assert str(exc.value).startswith(f"{f}: {message}")
    assert "\n" not in str(exc.value)


def test_read_jsonl_strict_reads_rows_as_written(tmp_path):
    from align2llava.data.io import read_jsonl_strict

    f = tmp_path / "rows.jsonl"
    rows = [{"id": "a", "conversations": [], "k": 1}, {"messages": [], "k": 2}]  # never normalised
    f.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in rows).encode() + b"\n\n")
    assert read_jsonl_strict(f, required=("k",)) == rows
    with pytest.raises(DataError, match=r"file not found \(run the score stage first\)"):
        read_jsonl_strict(tmp_path / "none.jsonl", missing_hint="run the score stage first")
    with pytest.raises(DataError, match="file not found"):
        read_jsonl_strict(tmp_path / "none.jsonl")


def test_pairs_and_scores_readers_share_it(tmp_path):
    from align2llava.steps.annotations.importer import PAIR_KEYS, read_pairs
    from align2llava.steps.scoring import read_scores

    pair = {k: "x" for k in PAIR_KEYS} | {"kind": "question", "split": "train"}
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps(pair) + "\n" + json.dumps({**pair, "split": "test"}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl: line 2: has kind 'question' / split 'test'"):
        read_pairs(f)
    with pytest.raises(DataError, match="run annotate-import first"):
        read_pairs(tmp_path / "no.jsonl")
    f = tmp_path / "scores.jsonl"
    f.write_text('{"id": "a", "task": null, "question_score": 1, "answer_score": 2, "turns": []}\n{"id": "b"}\n')
    with pytest.raises(DataError, match=r"scores.jsonl: line 2 lacks keys task, question_score"):
        read_scores(f)
