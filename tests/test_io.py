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
