"""annotate-import: the three input formats, strict pairs, the image split, rejects, the stage."""

from __future__ import annotations

import csv
import json
import random

import pytest
import yaml
from click.testing import CliRunner

from align2llava.errors import DataError, RejectBudgetExceeded
from align2llava.steps.annotations.importer import import_annotations, read_pairs, split_images, strict_pairs
from align2llava.steps.annotations.readers import Group
from tests.conftest import assert_summary_keys, make_image


def write(path, data):
    path.write_text(json.dumps(data))
    return path


def q_rec(rid, image, cands, scores):
    return {"id": rid, "image": image, "questions": cands, "score": scores}


def a_rec(rid, image, turns):
    """turns: [(question, answer or [candidates], scores or None)]"""
    convs = []
    for k, (q, a, s) in enumerate(turns):
        convs.append({"from": "human", "value": ("<image>\n" + q) if k == 0 else q})
        turn = {"from": "gpt", "value": a}
        if s is not None:
            turn["score"] = s
        convs.append(turn)
    return {"id": rid, "image": image, "conversations": convs}


def expected_strict(scores_lists):
    """Independent count: all pairs minus tied pairs per group."""
    total = 0
    for scores in scores_lists:
        n = len(scores)
        total += n * (n - 1) // 2
        for v in set(scores):
            c = scores.count(v)
            total -= c * (c - 1) // 2
    return total


# ----------------------------------------------------------------------------- paper format


def test_paper_format_pairs_chosen_margin_and_ties(tmp_path, image_root):
    qf = write(tmp_path / "q.json", [
        q_rec("1", "a.png", [["<image>\nWhat is it?", "Where?"], ["What colour?"], ["Is it?"]], [1.0, 0.5, 0.5]),
    ])
    af = write(tmp_path / "a.json", [
        a_rec("2", "b.png", [
            ("What shape?", ["A circle.", "A square.", "Blue."], [0.2, 0.9, 0.2]),
            ("Colour?", "Blue.", None),
            ("Size?", ["Small.", "Big."], [1, 0]),
        ]),
    ])
    res = import_annotations("align2llava", questions=qf, answers=af, out_dir=tmp_path / "out",
                             image_root=image_root, val_fraction=0.0)
    pairs = read_pairs(tmp_path / "out" / "pairs.jsonl")
    qp = [p for p in pairs if p["kind"] == "question"]
    ap = [p for p in pairs if p["kind"] == "answer"]
    assert len(qp) == 2 and len(ap) == 3
    assert {(p["chosen"], p["rejected"]) for p in qp} == {
        ("What is it?\nWhere?", "What colour?"), ("What is it?\nWhere?", "Is it?")}
    assert all(p["prompt"] == "" and p["margin"] == 0.5 for p in qp)
    by_id = {p["id"]: p for p in ap}
    assert by_id["answer:2#0:1>0"]["chosen"] == "A square."
    assert by_id["answer:2#0:1>0"]["prompt"] == "What shape?"
    assert by_id["answer:2#0:1>0"]["margin"] == pytest.approx(0.7)
    assert by_id["answer:2#2:0>1"]["prompt"] == "Size?"
    m = res.metrics()
    assert m["ties_dropped_question"] == 1 and m["ties_dropped_answer"] == 1
    assert m["groups_answer"] == 2 and m["rejected_rows"] == 0
    assert all(set(p) == {"id", "group", "image", "kind", "prompt", "chosen", "rejected", "margin", "split"} for p in pairs)


def test_unseen_paper_files_give_exactly_the_strict_pair_count(tmp_path, image_root):
    rng = random.Random(7)
    levels = [0.0, 0.25, 0.5, 0.75, 1.0]
    qs, ans, q_scores, a_scores = [], [], [], []
    for i in range(30):
        n = rng.randint(1, 6)
        s = [rng.choice(levels) for _ in range(n)]
        q_scores.append(s)
        qs.append(q_rec(f"q{i}", rng.choice(["a.png", "b.png"]), [[f"q {i} {k}?"] for k in range(n)], s))
        turns = []
        for t in range(rng.randint(1, 3)):
            if rng.random() < 0.7:
                m = rng.randint(1, 5)
                sa = [rng.choice(levels) for _ in range(m)]
                a_scores.append(sa)
                turns.append((f"question {t}?", [f"answer {t} {k}." for k in range(m)], sa))
            else:
                turns.append((f"question {t}?", "plain answer.", None))
        ans.append(a_rec(f"a{i}", rng.choice(["a.png", "b.png"]), turns))
    res = import_annotations("align2llava", questions=write(tmp_path / "q.json", qs),
                             answers=write(tmp_path / "a.json", ans), out_dir=tmp_path / "o",
                             image_root=image_root)
    m = res.metrics()
    assert m["pairs_question"] == expected_strict(q_scores)
    assert m["pairs_answer"] == expected_strict(a_scores)
    assert m["pairs"] > 50
    assert len({p["id"] for p in res.pairs}) == len(res.pairs)


def test_bad_records_are_rejected_with_reasons(tmp_path, image_root):
    qs = [q_rec(str(i), "a.png", [["Q?"], ["R?"]], [1.0, 0.0]) for i in range(20)]
    qs[3]["score"] = [1.0, "high"]
    qs[5]["score"] = [1.5, 0.0]
    qs[7]["image"] = "missing.png"
    qs[9]["score"] = [1.0]
    del qs[11]["image"]
    res = import_annotations("align2llava", questions=write(tmp_path / "q.json", qs),
                             out_dir=tmp_path / "o", image_root=image_root, reject_budget=5)
    rows = [json.loads(x) for x in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    reasons = {r["index"]: r["reason"] for r in rows}
    assert set(reasons) == {3, 5, 7, 9, 11}
    assert "not a number" in reasons[3] and "outside [0, 1]" in reasons[5]
    assert "not found" in reasons[7] and "parallel" in reasons[9] and "missing image" in reasons[11]
    assert res.metrics()["rejected_rows"] == 5 and res.metrics()["pairs_question"] == 15
    with pytest.raises(RejectBudgetExceeded, match="over the budget of 4"):
        import_annotations("align2llava", questions=tmp_path / "q.json", out_dir=tmp_path / "o2",
                           image_root=image_root, reject_budget=0.2)
    assert (tmp_path / "o2" / "rejects.jsonl").read_text().count("\n") == 5


# ----------------------------------------------------------------------------- Label Studio


def ls_task(tid, group, kind, cands, annotations, prompt="What colour?", image="a.png"):
    return {"id": tid, "data": {"group": group, "image": image, "kind": kind, "prompt": prompt,
                                "candidates": cands}, "annotations": annotations}


def ratings(*values, type_="rating"):
    return {"result": [{"from_name": "r", "to_name": f"candidate_{k}", "type": type_,
                        "value": {type_: v}} for k, v in enumerate(values)]}


def test_labelstudio_ratings_numbers_rankers_and_averaging(tmp_path, image_root):
    tasks = [
        # two annotators, averaged: c0 = (5+3)/2 -> 0.75, c1 = (1+5)/2 -> 0.5, c2 = 3,3 -> 0.5
        ls_task(1, "g1", "answer", ["Red.", "Blue.", "Green."], [ratings(5, 1, 3), ratings(3, 5, 3)]),
        ls_task(2, "g2", "answer", ["Red.", "Blue."], [ratings(2, 4, type_="number"),
                                                        {"result": [], "was_cancelled": True}]),
        ls_task(3, "g3", "question", [["<image>\nWhat?", "Why?"], "How?", "Who?"], [{"result": [
            {"from_name": "rank", "to_name": "list", "type": "ranker",
             "value": {"ranker": {"rank": ["candidate_2", "candidate_0", "candidate_1"]}}}]}]),
        ls_task(4, "g4", "answer", ["A.", "B.", "C."], [{"result": [
            {"type": "ranker", "to_name": "list", "value": {"ranker": {
                "good": ["candidate_1", "candidate_2"], "bad": ["candidate_0"], "_": []}}}]}]),
        ls_task(5, "g5", "answer", ["A.", "B."], [ratings(7, 1)]),  # out of the 1..5 scale
        ls_task(6, "g6", "answer", ["A.", "B."], [ratings(4)]),  # candidate_1 never rated
    ]
    res = import_annotations("labelstudio", input=write(tmp_path / "ls.json", tasks),
                             out_dir=tmp_path / "o", image_root=image_root, reject_budget=2)
    pairs = {p["id"]: p for p in res.pairs}
    assert set(pairs) == {"answer:g1:0>1", "answer:g1:0>2", "answer:g2:1>0",
                          "question:g3:2>0", "question:g3:2>1", "question:g3:0>1",
                          "answer:g4:1>0", "answer:g4:2>0"}
    assert pairs["answer:g1:0>1"]["margin"] == pytest.approx(0.25)
    assert pairs["answer:g2:1>0"]["margin"] == pytest.approx(0.5)
    assert pairs["question:g3:0>1"]["chosen"] == "What?\nWhy?"
    assert pairs["question:g3:2>0"]["margin"] == pytest.approx(0.5)
    m = res.metrics()
    assert m["ties_dropped"] == 2 and m["rejected_rows"] == 2
    rows = [json.loads(x) for x in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    assert "outside 1..5" in rows[0]["reason"] and "no rating for candidate_1" in rows[1]["reason"]


# ----------------------------------------------------------------------------- table


def test_table_csv_and_jsonl(tmp_path, image_root):
    rows = [
        {"group": "g1", "image": "a.png", "kind": "answer", "candidate": "Red.", "score": "0.9", "prompt": "Colour?"},
        {"group": "g1", "image": "a.png", "kind": "answer", "candidate": "Blue.", "score": "0.1", "prompt": "Colour?"},
        {"group": "g1", "image": "a.png", "kind": "answer", "candidate": "Pink.", "score": "0.1", "prompt": "Colour?"},
        {"group": "g2", "image": "b.png", "kind": "question", "candidate": "What?\nWhy?", "score": "1", "prompt": ""},
        {"group": "g2", "image": "b.png", "kind": "question", "candidate": "How?", "score": "0", "prompt": ""},
        {"group": "g2", "image": "b.png", "kind": "question", "candidate": "Who?", "score": "n/a", "prompt": ""},
        {"group": "g1", "image": "a.png", "kind": "answer", "candidate": "Teal.", "score": "0.5", "prompt": "Other?"},
    ]
    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    res = import_annotations("table", input=tmp_path / "t.csv", out_dir=tmp_path / "o",
                             image_root=image_root, reject_budget=2)
    assert sorted(p["id"] for p in res.pairs) == ["answer:g1:0>1", "answer:g1:0>2", "question:g2:0>1"]
    assert res.metrics()["ties_dropped"] == 1 and res.metrics()["rejected_rows"] == 2
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]) + "{broken\n")
    res2 = import_annotations("table", input=tmp_path / "t.jsonl", out_dir=tmp_path / "o2",
                              image_root=image_root, reject_budget=1)
    assert len(res2.pairs) == 3 and res2.metrics()["rejected_rows"] == 1
    assert res2.metrics()["input_rows"] == 6
    (tmp_path / "bad.csv").write_text("group,image,score\n1,a.png,0.5\n")
    with pytest.raises(DataError, match="header lacks column"):
        import_annotations("table", input=tmp_path / "bad.csv", out_dir=tmp_path / "o3")


# ----------------------------------------------------------------------------- split


def test_split_is_by_image_and_deterministic():
    groups = [Group(f"g{i}", f"img{i % 40}.png", "answer", "Q?", ["a", "b", "c"], [1.0, 0.5, 0.0])
              for i in range(200)]
    pairs, ties = strict_pairs(groups)
    assert len(pairs) == 600 and ties["answer"] == 0
    val = split_images((p["image"] for p in pairs), 0.25, seed=0)
    assert len(val) == 10
    assert val == split_images([f"img{i}.png" for i in range(39, -1, -1)], 0.25, seed=0)
    assert val != split_images((p["image"] for p in pairs), 0.25, seed=1)


def test_import_split_has_no_image_on_both_sides(tmp_path):
    qs = [q_rec(str(i), f"img{i % 25}.png", [["A?"], ["B?"]], [1.0, 0.0]) for i in range(100)]
    res = import_annotations("align2llava", questions=write(tmp_path / "q.json", qs),
                             out_dir=tmp_path / "o", val_fraction=0.2, seed=3)
    train = {p["image"] for p in res.pairs if p["split"] == "train"}
    val = {p["image"] for p in res.pairs if p["split"] == "val"}
    assert not train & val and len(val) == 5 and len(train) == 20


# ----------------------------------------------------------------------------- stage and CLI


def test_stage_writes_pairs_and_metrics(tmp_path, monkeypatch):
    from stages.annotate_import import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    make_image(tmp_path / "images" / "a.png")
    make_image(tmp_path / "images" / "b.png")
    write(tmp_path / "q.json", [q_rec("1", "a.png", [["A?"], ["B?"], ["C?"]], [1, 0.5, 0.5])])
    write(tmp_path / "a.json", [a_rec("2", "b.png", [("Q?", ["x.", "y."], [0, 1])]),
                                a_rec("3", "zz.png", [("Q?", ["x.", "y."], [0, 1])])])
    params = {"base": {"seed": 0, "image_root": "images"},
              "annotate_import": {"format": "align2llava", "questions": "q.json", "answers": "a.json",
                                  "reject_budget": 1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    res = CliRunner().invoke(main, [])
    assert res.exit_code == 0, res.output
    pairs = read_pairs(tmp_path / "data/annotate_import/pairs.jsonl")
    assert len(pairs) == 3
    metrics = json.loads((tmp_path / "metrics/annotate_import.json").read_text())
    # one annotator per candidate in this fixture: no agreement to measure
    assert_summary_keys(metrics, "annotate_import", absent=frozenset({"agreement_alpha"}))
    assert {"pairs_question", "pairs_answer", "ties_dropped", "rejected_rows"} <= set(metrics)
    assert metrics["pairs_question"] == 2 and metrics["ties_dropped"] == 1
    assert metrics["rejected_rows"] == 1
    params["annotate_import"]["reject_budget"] = 0.01
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    res = CliRunner().invoke(main, [])
    assert res.exit_code == 1 and "Error:" in res.output and "zz.png" in res.output
    assert "Traceback" not in res.output


def test_cli_import_annotations(tmp_path, image_root):
    from align2llava.ops.cli import main

    tasks = [ls_task(1, "g1", "answer", ["Red.", "Blue."], [ratings(5, 2)])]
    write(tmp_path / "ls.json", tasks)
    res = CliRunner().invoke(main, ["import-annotations", "--format", "labelstudio", "--input",
                                    str(tmp_path / "ls.json"), "--out-dir", str(tmp_path / "o"),
                                    "--image-root", str(image_root)])
    assert res.exit_code == 0, res.output
    assert "wrote 1 pairs" in res.output
    assert read_pairs(tmp_path / "o" / "pairs.jsonl")[0]["chosen"] == "Red."
    res = CliRunner().invoke(main, ["import-annotations", "--format", "labelstudio",
                                    "--out-dir", str(tmp_path / "o")])
    assert res.exit_code == 1 and "needs an input file" in res.output
