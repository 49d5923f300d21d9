"""The LLaVA record contract: one test per kind of bad input."""

from __future__ import annotations

import pytest

from align2llava.data.images import load_rgb, resolve_image
from align2llava.data.records import validate_records
from align2llava.errors import DataError
from tests.conftest import llava_record, make_image


def problems(recs, root=None):
    return [p.message for p in validate_records(recs, "f.json", image_root=root)]


def test_valid_records_have_no_problems(image_root):
    recs = [llava_record("a", "a.png"), llava_record("b", "b.png"), llava_record("c", None)]
    assert problems(recs, image_root) == []


@pytest.mark.parametrize("mutate,expected", [
    (lambda r: r["conversations"][0].update({"from": "gpt"}), "turn 0 is from 'gpt', expected 'human'"),
    (lambda r: r["conversations"][1].update({"from": "human"}), "turn 1 is from 'human', expected 'gpt'"),
    (lambda r: r["conversations"][1].update({"value": "  "}), "turn 1 'value' is empty"),
    (lambda r: r["conversations"][1].update({"value": None}), "turn 1 'value' must be a string, got null"),
    (lambda r: r["conversations"][0].update({"value": "no token"}), "must contain '<image>' exactly once"),
    (lambda r: r.pop("conversations"), "missing 'conversations'"),
    (lambda r: r.update({"conversations": []}), "'conversations' must be a non-empty list"),
    (lambda r: r.pop("id"), "missing 'id'"),
    (lambda r: r["conversations"].pop(), "the last human turn has no answer"),
    (lambda r: r.update({"image": None}) or r.pop("image"), "contains '<image>' but the record has no image"),
])
def test_each_contract_violation_is_named(image_root, mutate, expected):
    rec = llava_record("x", "a.png")
    mutate(rec)
    assert any(expected in m for m in problems([rec], image_root)), problems([rec], image_root)


def test_non_object_records_and_duplicate_ids(image_root):
    found = validate_records([None, [1], llava_record("a"), llava_record("a")], "f.json", image_root=image_root)
    text = [str(p) for p in found]
    assert "f.json: record 0: expected an object, got null" in text
    assert "f.json: record 1: expected an object, got list" in text
    assert "f.json: record 3 (id a): duplicate id (first at record 2)" in text


@pytest.mark.parametrize("path,expected", [
    ("/etc/passwd", "is absolute"),
    ("../outside.png", "escapes the image root"),
    ("sub/../../outside.png", "escapes the image root"),
    ("missing.png", "not found"),
])
def test_image_paths_must_stay_inside_root_and_exist(image_root, path, expected):
    rec = llava_record("x", path)
    assert any(expected in m for m in problems([rec], image_root))


def test_symlink_escaping_root_is_refused(tmp_path, image_root):
    outside = make_image(tmp_path / "outside.png")
    (image_root / "link.png").symlink_to(outside)
    with pytest.raises(DataError, match="outside the image root"):
        resolve_image(image_root, "link.png")


def test_truncated_image_is_reported(image_root):
    data = (image_root / "a.png").read_bytes()
    (image_root / "trunc.png").write_bytes(data[: len(data) // 2])
    msgs = problems([llava_record("x", "trunc.png")], image_root)
    assert any("does not decode" in m for m in msgs)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16"])
def test_other_colour_modes_load_as_rgb(tmp_path, mode):
    path = make_image(tmp_path / f"img_{mode.replace(';', '')}.png", mode=mode)
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (32, 32)


def test_candidate_answers_only_with_flag(image_root):
    rec = llava_record("x", "a.png")
    rec["conversations"][1] = {"from": "gpt", "value": ["Red.", "Blue."], "score": [1.0, 0.0]}
    assert problems([rec], image_root)
    ok = validate_records([rec], "f.json", image_root=image_root, allow_candidates=True)
    assert ok == []
