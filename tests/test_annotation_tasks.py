"""annotation-tasks and the Label Studio round trip: tasks -> an export as Label Studio writes it
-> pairs; agreement; bad exports; the stage and the CLI on a tiny random MLLM."""

from __future__ import annotations

import copy
import csv
import itertools
import json
import xml.etree.ElementTree as ET

import pytest
import yaml
from click.testing import CliRunner

from align2llava.errors import DataError, RejectBudgetExceeded
from align2llava.steps.annotations.agreement import krippendorff_alpha_interval
from align2llava.steps.annotations.candidates import allocate, make_annotation_tasks, sample_records
from align2llava.steps.annotations.importer import import_annotations, read_pairs
from align2llava.steps.annotations.labelstudio import image_from_url
from align2llava.steps.annotations.tasks import AnnotationTasksParams, image_url
from tests.conftest import llava_record, make_image

# ----------------------------------------------------------------------------- agreement


def _alpha_by_pairs(units):
    """Reference: Krippendorff's definition with explicit loops over ordered value pairs."""
    units = [u for u in units if len(u) >= 2]
    values = [v for u in units for v in u]
    n = len(values)
    d_o = sum(sum((a - b) ** 2 for a, b in itertools.permutations(u, 2)) / (len(u) - 1) for u in units) / n
    d_e = sum((a - b) ** 2 for a, b in itertools.permutations(values, 2)) / (n * (n - 1))
    return 1 - d_o / d_e


def test_alpha_matches_hand_computed_values():
    # units (1, 2), (3, 3): D_o = (2 + 0) / 4 = 0.5; D_e = 22 / 12; alpha = 1 - 6/22 = 8/11
    assert krippendorff_alpha_interval([[1, 2], [3, 3]]) == pytest.approx(8 / 11)
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 observers x 12 units,
    # interval alpha 0.849 (the `krippendorff` package gives 0.8491071 on the same data)
    units = [[1, 1, 1], [2, 2, 3, 2], [3, 3, 3, 3], [3, 3, 3, 3], [2, 2, 2, 2], [1, 2, 3, 4], [4, 4, 4, 4],
             [1, 1, 2, 1], [2, 2, 2, 2], [5, 5, 5], [1, 1], [3]]
    assert krippendorff_alpha_interval(units) == pytest.approx(0.849, abs=5e-4)
    assert krippendorff_alpha_interval(units) == pytest.approx(_alpha_by_pairs(units))
    # stars or scores: alpha does not depend on a linear rescaling
    assert krippendorff_alpha_interval([[(v - 1) / 4 for v in u] for u in units]) == pytest.approx(
        krippendorff_alpha_interval(units))
    assert krippendorff_alpha_interval([[1, 1], [0, 0], [0.5, 0.5]]) == 1.0
    assert krippendorff_alpha_interval([[1], [0.5]]) is None  # nobody rated twice
    assert krippendorff_alpha_interval([[1, 1], [1, 1]]) is None  # no variation at all


# ----------------------------------------------------------------------------- sampling


def test_sample_is_stratified_seeded_and_in_pool_order():
    assert allocate({"a": 5, "b": 3, "c": 2}, 5) == {"a": 3, "b": 1, "c": 1}  # 2.5, 1.5, 1.0
    assert allocate({"a": 5, "b": 3}, 20) == {"a": 5, "b": 3}
    pool = [llava_record(f"c{i}", task="conversation") for i in range(20)]
    pool += [llava_record(f"d{i}", task="detail") for i in range(10)]
    pool.sort(key=lambda r: r["id"][1:].zfill(3))  # interleave the types
    s = sample_records(pool, 6, seed=0)
    assert sum(r["task"] == "conversation" for r in s) == 4 and sum(r["task"] == "detail" for r in s) == 2
    assert [pool.index(r) for r in s] == sorted(pool.index(r) for r in s)
    assert s == sample_records(pool, 6, seed=0)
    assert s != sample_records(pool, 6, seed=1)
    assert len(sample_records(pool, 99, seed=0)) == 30


# ----------------------------------------------------------------------------- the round trip

POOL = [
    llava_record("r1", "a.png", "conversation", [("What colour is it?", "Red."), ("Where is it?", "Centre.")]),
    llava_record("r2", "b.png", "conversation", [("Is it round?", "Yes."), ("How big?", "Small.")]),
    llava_record("r3", "a.png", "detail", [("Describe the image.", "A red square.")]),
    llava_record("r4", "b.png", "complex_reasoning", [("Why is it blue?", "It was painted.")]),
]


def fake_generator(calls=None, empty=()):
    """Deterministic stand-in for the MLLM: numbered texts; prompts whose last message is one
    of `empty` come back empty (a model that fails on them)."""

    def gen(prompts, seed):
        if calls is not None:
            calls.append(len(prompts))
        out = []
        for i, pr in enumerate(prompts):
            last = pr.messages[-1]["content"]
            if last in empty:
                out.append("  ")
            elif "different question" in last:
                out.append(f"1. Generated question {seed}-{i}?\nextra line")
            else:
                out.append(f"Generated answer {seed}-{i}.")
        return out

    return gen


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A pool, its images and the annotation-tasks output, with the cwd at tmp_path."""
    monkeypatch.chdir(tmp_path)
    make_image(tmp_path / "images" / "a.png")
    make_image(tmp_path / "images" / "b.png", color=(30, 30, 200))
    (tmp_path / "pool.json").write_text(json.dumps(POOL))
    p = AnnotationTasksParams(records=4, question_candidates=2, answer_candidates=2)
    m = make_annotation_tasks(p, pool="pool.json", image_root="images", model="unused", out_dir="out",
                              generator=fake_generator())
    return tmp_path, m


def test_tasks_config_and_table(project):
    tmp, m = project
    assert m["records"] == 4 and m["tasks"] == 10 and m["tasks_question"] == 4 and m["tasks_answer"] == 6
    tasks = json.loads((tmp / "out" / "tasks.json").read_text())
    assert [t["data"]["kind"] for t in tasks] == ["question"] * 4 + ["answer"] * 6
    d0 = tasks[0]["data"]
    assert d0["record_id"] == "r1" and d0["task_type"] == "conversation" and d0["turn"] is None
    assert d0["image"] == "/data/local-files/?d=images/a.png" and d0["image_path"] == "a.png"
    assert d0["n_candidates"] == 3 and d0["candidate_0"] == "What colour is it?\nWhere is it?"
    assert d0["candidate_1"].count("\n") == 1 and "Generated question" in d0["candidate_1"]
    a1 = tasks[5]["data"]  # r1, turn 1
    assert (a1["record_id"], a1["turn"], a1["prompt"], a1["candidate_0"]) == ("r1", 1, "Where is it?", "Centre.")
    assert a1["candidate_2"].startswith("Generated answer")
    root = ET.fromstring((tmp / "out" / "labeling_config.xml").read_text())
    ratings = root.findall("Rating")
    assert [(r.get("name"), r.get("toName"), r.get("maxRating"), r.get("required")) for r in ratings] == [
        (f"rating_{k}", f"candidate_{k}", "5", "true") for k in range(3)]
    assert {t.get("value") for t in root.findall("Text")} == {"$prompt", "$candidate_0", "$candidate_1", "$candidate_2"}
    assert root.find("Image").get("value") == "$image"
    rubric = " ".join(h.get("value") for h in root.findall("Header")).lower()
    for word in ("grounded", "answerable", "correct", "complete", "useful", "needs reasoning", "clear"):
        assert word in rubric
    rows = list(csv.DictReader(open(tmp / "out" / "candidates.csv", encoding="utf-8")))
    assert len(rows) == 30 and all(r["score"] == "" for r in rows)
    assert rows[0]["group"] == "r1" and rows[-1]["group"] == "r4#0"
    assert [json.loads(x) for x in (tmp / "out" / "candidates.jsonl").read_text().splitlines()][3]["candidate_index"] == 0


def test_unequal_candidate_counts_pad_the_spare_slots(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image(tmp_path / "images" / "a.png")
    make_image(tmp_path / "images" / "b.png")
    (tmp_path / "pool.json").write_text(json.dumps(POOL[2:]))
    p = AnnotationTasksParams(records=2, question_candidates=1, answer_candidates=2)
    make_annotation_tasks(p, pool="pool.json", image_root="images", model="unused", out_dir="out",
                          generator=fake_generator())
    tasks = [t["data"] for t in json.loads((tmp_path / "out" / "tasks.json").read_text())]
    assert [(d["kind"], d["n_candidates"], d["candidate_2"] == "") for d in tasks] == [
        ("question", 2, True), ("question", 2, True), ("answer", 3, False), ("answer", 3, False)]
    root = ET.fromstring((tmp_path / "out" / "labeling_config.xml").read_text())
    assert [r.get("required") for r in root.findall("Rating")] == ["true", "true", "false"]
    export = [{"id": i + 1, "data": d, "annotations": [_annotation(i + 1, i + 1, 1, [5, 1, 3][: d["n_candidates"]])]}
              for i, d in enumerate(tasks)]
    (tmp_path / "export.json").write_text(json.dumps(export))
    res = import_annotations("labelstudio", input="export.json", tasks="out/tasks.json", out_dir="imp",
                             image_root="images")
    assert (res.metrics()["pairs_question"], res.metrics()["pairs_answer"], res.metrics()["rejected_rows"]) == (2, 6, 0)


def _result(k, stars, rid):
    return {"id": f"{rid}{k}", "type": "rating", "value": {"rating": stars}, "origin": "manual",
            "to_name": f"candidate_{k}", "from_name": f"rating_{k}"}


def _annotation(aid, tid, who, stars, cancelled=False):
    return {"id": aid, "completed_by": who, "result": [] if cancelled else [_result(k, s, f"x{aid}_") for k, s in enumerate(stars)],
            "was_cancelled": cancelled, "ground_truth": False, "created_at": "2024-05-01T10:00:00.000000Z",
            "updated_at": "2024-05-01T10:00:00.000000Z", "lead_time": 12.5, "result_count": 0, "task": tid,
            "project": 3}


def label_studio_export(tasks):
    """The tasks as Label Studio exports them after annotation (see the test below for who
    rated what); images stay the local-files URLs Label Studio served."""
    out = []
    for tid, t in enumerate(tasks, start=1):
        anns = []
        if tid <= 8:
            anns.append(_annotation(100 + tid, tid, 1, [5, 3, 1]))
        if tid in (2, 4):
            anns.append(_annotation(200 + tid, tid, 2, [1, 3, 5]))
        if tid == 6:
            anns.append(_annotation(206, tid, 2, [5, 3, 3]))
        if tid in (1, 9):
            anns.append(_annotation(300 + tid, tid, 3, [], cancelled=True))
        out.append({"id": tid, "data": copy.deepcopy(t["data"]), "annotations": anns, "drafts": [],
                    "predictions": [{"id": tid, "model_version": "m1", "score": 0.5, "result": [
                        _result(k, s, f"p{tid}_") for k, s in enumerate([1, 3, 5])]}],
                    "created_at": "2024-05-01T09:00:00.000000Z", "updated_at": "2024-05-01T10:00:00.000000Z",
                    "inner_id": tid, "total_annotations": len(anns), "cancelled_annotations": 0,
                    "total_predictions": 1, "project": 3, "updated_by": None})
    return out


def test_round_trip_tasks_to_export_to_pairs(project):
    tmp, _ = project
    tasks = json.loads((tmp / "out" / "tasks.json").read_text())
    (tmp / "export.json").write_text(json.dumps(label_studio_export(tasks)))
    res = import_annotations("labelstudio", input="export.json", tasks="out/tasks.json", out_dir="imp",
                             image_root="images", val_fraction=0.0)
    m = res.metrics()
    # tasks 1-4 questions, 5-10 answers; one annotator [5,3,1] -> 3 pairs per task (1, 3, 5, 7, 8);
    # task 6 averages [5,3,1] and [5,3,3] -> [5,3,2], 3 pairs; tasks 2 and 4 average to [3,3,3]:
    # 3 ties each; task 9 was only skipped (cancelled), task 10 never annotated.
    assert (m["pairs"], m["pairs_question"], m["pairs_answer"]) == (18, 6, 12)
    assert (m["ties_dropped"], m["ties_dropped_question"], m["groups_question"], m["groups_answer"]) == (6, 6, 4, 4)
    assert (m["annotations"], m["annotations_cancelled"], m["annotators"]) == (11, 2, 2)
    assert (m["tasks_unannotated"], m["tasks_skipped"], m["tasks_multi_annotated"], m["rejected_rows"]) == (1, 1, 3, 0)
    pairs = {p["id"]: p for p in read_pairs(tmp / "imp" / "pairs.jsonl")}
    q = pairs["question:r1:0>1"]
    assert q["chosen"] == "What colour is it?\nWhere is it?" and q["image"] == "a.png" and q["prompt"] == ""
    a = pairs["answer:r1#1:0>2"]  # task 6 (r1's turn 1): mean scores [1, 0.5, 0.25]
    assert a["margin"] == pytest.approx(0.75) and a["prompt"] == "Where is it?" and a["chosen"] == "Centre."
    assert "answer:r2#0:0>1" in pairs and not any(p.startswith("question:r2:") for p in pairs)
    units = [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]] * 2 + [[1.0, 1.0], [0.5, 0.5], [0.0, 0.5]]
    assert m["agreement_units"] == 9
    assert m["agreement_alpha"] == pytest.approx(_alpha_by_pairs(units), abs=1e-4)
    assert m["agreement_alpha_question"] == pytest.approx(_alpha_by_pairs(units[:6]), abs=1e-4)
    # the same candidates scored in the table instead: 10 groups x 3 strictly ordered candidates
    rows = list(csv.DictReader(open(tmp / "out" / "candidates.csv", encoding="utf-8")))
    for r in rows:
        r["score"] = str(1 - int(r["candidate_index"]) / 2)
    with open(tmp / "scored.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    res2 = import_annotations("table", input="scored.csv", out_dir="imp2", image_root="images")
    assert (res2.metrics()["pairs"], res2.metrics()["pairs_question"]) == (30, 12)
    assert {p["id"] for p in res2.pairs} >= set(pairs)


def test_bad_exports_are_rejected_with_one_line_reasons(project):
    tmp, _ = project
    tasks = json.loads((tmp / "out" / "tasks.json").read_text())
    export = label_studio_export(tasks)
    export[0]["annotations"][0]["result"].pop(2)  # candidate_2 unrated
    export[2]["data"]["record_id"] = "nope"  # unknown record id
    export[4]["annotations"][0]["result"][1]["value"]["rating"] = 6  # off the 1..5 scale
    export[6]["data"]["candidate_1"] = "Edited after import."
    export[7]["data"]["turn"] = 7  # a turn the tasks file does not have
    (tmp / "bad.json").write_text(json.dumps(export))
    res = import_annotations("labelstudio", input="bad.json", tasks="out/tasks.json", out_dir="imp",
                             image_root="images", reject_budget=5)
    rows = [json.loads(x) for x in (tmp / "imp" / "rejects.jsonl").read_text().splitlines()]
    reasons = {r["index"]: r["reason"] for r in rows}
    assert set(reasons) == {0, 2, 4, 6, 7} and all("\n" not in r for r in reasons.values())
    assert "annotation 0 (completed_by 1) has no rating for candidate_2" in reasons[0]
    assert "unknown record id 'nope'" in reasons[2]
    assert "rating 6 is outside 1..5" in reasons[4]
    assert "data.candidate_1 differs from the tasks file" in reasons[6]
    assert "has no answer task for turn 7" in reasons[7]
    assert res.metrics()["rejected_rows"] == 5 and res.metrics()["pairs"] == 3  # only task 6 left (task 2: ties)
    with pytest.raises(RejectBudgetExceeded, match=r"bad.json: rejected 5 of 10 records.*no rating for candidate_2"):
        import_annotations("labelstudio", input="bad.json", tasks="out/tasks.json", out_dir="imp2", image_root="images")
    from align2llava.ops.cli import main

    out = CliRunner().invoke(main, ["import-annotations", "--format", "labelstudio", "--input", "bad.json",
                                    "--tasks", "out/tasks.json", "--out-dir", "imp3", "--image-root", "images"])
    errors = [line for line in out.output.splitlines() if line.startswith("Error")]
    assert out.exit_code == 1 and len(errors) == 1 and errors[0].startswith("Error: bad.json: rejected 5 of 10")
    assert "Traceback" not in out.output


def test_images_as_label_studio_serves_them(tmp_path):
    assert image_url("/data/local-files/?d={path}", "data/imgs", "train/7 a.png") == "/data/local-files/?d=data/imgs/train/7%20a.png"
    assert image_url("/data/local-files/?d={path}", "/srv/imgs", "7.png") == "/data/local-files/?d=srv/imgs/7.png"
    assert image_url("https://h.org/i/{image}", "/srv/imgs", "train/7.png") == "https://h.org/i/train/7.png"
    root = tmp_path / "data" / "imgs"
    make_image(root / "train" / "79.png")
    assert image_from_url("/data/local-files/?d=train/79.png", root) == "train/79.png"
    assert image_from_url("/data/local-files/?d=data/imgs/train/79.png", root) == "train/79.png"
    assert image_from_url("http://localhost:8080/data/local-files/?d=data%2Fimgs%2Ftrain%2F79.png", root) == "train/79.png"
    assert image_from_url("train/79.png", root) == "train/79.png"
    for url, what in [("/data/upload/3/e875f554-79.png", "Label Studio upload"),
                      ("https://example.org/79.png", "cannot be mapped"),
                      ("/data/local-files/?d=train/80.png", "no tail of 'train/80.png' is a file")]:
        with pytest.raises(DataError, match=what):
            image_from_url(url, root)
    # the older own variant (data.group) with Label Studio's URL, as in the reported export
    task = {"id": 7, "data": {"group": "g", "image": "/data/local-files/?d=train/79.png", "kind": "answer",
                              "prompt": "Colour?", "candidates": ["Red.", "Blue."]},
            "annotations": [_annotation(1, 7, 1, [5, 1])], "predictions": []}
    (tmp_path / "old.json").write_text(json.dumps([task]))
    res = import_annotations("labelstudio", input=tmp_path / "old.json", out_dir=tmp_path / "o", image_root=root)
    assert [(p["id"], p["image"]) for p in res.pairs] == [("answer:g:0>1", "train/79.png")]


def test_empty_generations_are_retried_then_the_record_is_rejected(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image(tmp_path / "images" / "a.png")
    make_image(tmp_path / "images" / "b.png")
    (tmp_path / "pool.json").write_text(json.dumps(POOL + [llava_record("r5", "missing.png", "detail")]))
    calls = []
    p = AnnotationTasksParams(records=5, question_candidates=1, answer_candidates=1, max_tries=2, reject_budget=2)
    m = make_annotation_tasks(p, pool="pool.json", image_root="images", model="unused", out_dir="out",
                              generator=fake_generator(calls, empty=("How big?",)))
    # r2's second turn never gets an answer: 2 tries, then r2 is rejected; r5's image is missing
    assert calls == [12, 1] and m["retries"] == 1 and m["records"] == 3 and m["rejected"] == 2
    rows = {r["id"]: r["reason"] for r in map(json.loads, (tmp_path / "out" / "rejects.jsonl").read_text().splitlines())}
    assert rows["r2"] == "the model wrote an empty answer 1 to turn 1 in 2 tries"
    assert "missing.png" in rows["r5"] and "not found" in rows["r5"]
    assert {t["data"]["record_id"] for t in json.loads((tmp_path / "out" / "tasks.json").read_text())} == {"r1", "r3", "r4"}


# ----------------------------------------------------------------------------- stage and CLI


def test_stage_and_cli_on_a_tiny_mllm(tmp_path, monkeypatch, tiny_llava):
    from align2llava.ops.cli import main as cli
    from stages.annotation_tasks import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    make_image(tmp_path / "images" / "a.png")
    make_image(tmp_path / "images" / "b.png", color=(30, 30, 200))
    (tmp_path / "pool.json").write_text(json.dumps(POOL))
    params = {"base": {"seed": 0, "base_model": str(tiny_llava), "pool": "pool.json", "image_root": "images"},
              "annotation_tasks": {"records": 3, "question_candidates": 1, "answer_candidates": 1,
                                   "max_new_tokens": 6, "question_max_new_tokens": 6, "reject_budget": 3}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    res = CliRunner().invoke(main, [])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "metrics" / "annotation_tasks.json").read_text())
    assert m["pool"] == 4 and m["records"] + m["rejected"] == 3 and m["records"] >= 1
    tasks = json.loads((tmp_path / "data" / "annotation_tasks" / "tasks.json").read_text())
    assert len(tasks) == m["tasks"] and all(t["data"]["n_candidates"] == 2 and t["data"]["candidate_1"].strip() for t in tasks)
    assert m["generations"] >= 2 * m["records"]
    res = CliRunner().invoke(cli, ["annotation-tasks", "--pool", "pool.json", "--image-root", "images", "--model",
                                   str(tiny_llava), "--out-dir", "cli", "--records", "2", "--max-new-tokens", "4",
                                   "--reject-budget", "2"])
    assert res.exit_code == 0, res.output
    assert "tasks" in res.output and (tmp_path / "cli" / "labeling_config.xml").is_file()
    params["annotation_tasks"]["question_prompt"] = "Ask about {n} things: {question}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    res = CliRunner().invoke(main, [])
    assert res.exit_code == 1 and "annotation_tasks.question_prompt: Value error, a prompt may hold only" in res.output
    res = CliRunner().invoke(cli, ["annotation-tasks", "--pool", "pool.json", "--image-root", "images", "--model",
                                   str(tiny_llava), "--out-dir", "cli", "--temperature", "0"])
    assert res.exit_code == 1 and "Error: --temperature: Input should be greater than 0" in res.output
    assert "Traceback" not in res.output
