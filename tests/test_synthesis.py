"""The demo world: pool, oracle, simulated annotations, benchmark, captions."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from align2llava.data.io import read_jsonl_strict, read_records_strict
from align2llava.data.records import validate_records
from align2llava.demo.synthesis.annotator import judge_answer, judge_question
from align2llava.demo.synthesis.params import DEFECTS, QUESTION_DEFECTS, TASKS, DefectRates, SynthesizeParams
from align2llava.demo.synthesis.synthesize import measured_rates
from align2llava.demo.synthesis.world import COLORS, SHAPES, Truth, _words, measure_image
from align2llava.demo.synthesis.writer import make_item
from tests.conftest import ROOT, TINY_WORLD, assert_summary_keys


def _params_file(tmp_path: Path, **section) -> Path:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["synthesize"] = {**data["synthesize"], **section}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run(tmp_path: Path, out: Path, **section):
    from stages.synthesize import main

    params = _params_file(tmp_path, **{**TINY_WORLD, **section})
    return CliRunner().invoke(main, ["--params", str(params), "--out-dir", str(out),
                                     "--metrics-dir", str(tmp_path / "metrics")])


MIX = 6  # vqa_mix records in the test world (the default is none)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("synth")
    mp = pytest.MonkeyPatch()
    mp.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    res = _run(tmp, tmp / "a", vqa_mix=MIX)
    assert res.exit_code == 0, res.output
    res2 = _run(tmp, tmp / "b", vqa_mix=MIX)
    assert res2.exit_code == 0, res2.output
    mp.undo()
    return tmp


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_rerun_is_byte_identical(world):
    a, b = _tree_digest(world / "a"), _tree_digest(world / "b")
    assert a == b
    assert "pool.json" in a and "annotations/labelstudio.json" in a and "benchmark/pope.jsonl" in a


def test_pool_is_valid_llava_with_tasks(world):
    out = world / "a"
    pool = read_records_strict(out / "pool.json")
    assert validate_records(pool, "pool.json", image_root=out / "images") == []
    assert Counter(r["task"] for r in pool) == {t: TINY_WORLD["pool_per_task"] for t in TASKS}
    for r in pool:
        assert r["id"] == f"evqa-{int(r['image'].split('/')[1][:-4]):06d}-{r['task']}"
        assert r["image"].startswith("train/")
        n_turns = len(r["conversations"]) // 2
        assert n_turns in {"conversation": (2, 3), "vqa": (3, 4, 5)}.get(r["task"], (1,))
        if r["task"] == "vqa":  # short answers, as LLaVA-1.5's mix has them
            for q, a in zip(r["conversations"][::2], r["conversations"][1::2]):
                assert q["value"].replace("\n<image>", "").endswith("\nAnswer the question using a single word or phrase.")
                assert len(a["value"].split()) == 1 and a["value"][0].isupper()
    oracle = read_jsonl_strict(out / "oracle.jsonl")
    assert [o["id"] for o in oracle] == [r["id"] for r in pool]
    for o in oracle:
        assert set(o) == {"id", "task", "defects", "turn_defects"}
        assert set(o["defects"]) <= set(DEFECTS)
        assert sorted({d for ds in o["turn_defects"].values() for d in ds}) == o["defects"]


def test_metrics_keys(world):
    m = json.loads((world / "metrics" / "synthesize.json").read_text())
    assert_summary_keys(m, "synthesize")
    assert m["pool"]["total"] == len(TASKS) * TINY_WORLD["pool_per_task"]
    assert set(m["defect_rate"]) == set(DEFECTS)
    for key in ("groups", "candidates", "strict_pairs", "tie_rate"):
        assert key in m["annotations"]
    assert m["benchmark"]["pope"] == TINY_WORLD["benchmark_pope"]
    assert m["vqa_mix"] == MIX
    assert 0 <= m["truth_pixel_qa_disagreements"] <= 2  # a few tiny shapes fool the fill ratio


def test_annotation_files_in_released_format(world):
    out = world / "a"
    pool = {r["id"]: r for r in read_records_strict(out / "pool.json")}
    questions = json.loads((out / "annotations" / "question.json").read_text())
    answers = json.loads((out / "annotations" / "answer.json").read_text())
    ls = json.loads((out / "annotations" / "labelstudio.json").read_text())
    tasks = json.loads((out / "annotations" / "tasks.json").read_text())
    assert len(questions) == len(answers) == round(0.5 * TINY_WORLD["pool_per_task"]) * len(TASKS)
    # the export holds the tasks file's tasks, in its order (questions, then answers), as imported
    assert [t["data"] for t in ls] == [t["data"] for t in tasks]
    assert [t["data"]["kind"] for t in tasks] == ["question"] * len(questions) + ["answer"] * (len(tasks) - len(questions))
    ls_by_group = {(t["data"]["record_id"], t["data"]["kind"], t["data"]["turn"]): t for t in ls}
    for q in questions:
        assert set(q) == {"id", "image", "questions", "score"}
        rec = pool[q["id"]]
        assert q["questions"][0] == [c["value"] for c in rec["conversations"] if c["from"] == "human"]
        assert "<image>" in q["questions"][0][0]
        assert not any("<image>" in s for cand in q["questions"][1:] for s in cand)
        assert len(q["questions"]) == len(q["score"]) == 4
        assert all(s in (0.0, 0.25, 0.5, 0.75, 1.0) for s in q["score"])
        task = ls_by_group[(q["id"], "question", None)]
        assert task["data"]["prompt"] == "" and task["data"]["image_path"] == q["image"]
        assert task["data"]["image"] == f"/data/local-files/?d=data/synthesize/images/{q['image']}"
        ratings = [r["value"]["rating"] for r in task["annotations"][0]["result"]]
        assert ratings == [1 + round(s * 4) for s in q["score"]]
        assert task["data"]["candidate_0"] == "\n".join(s.replace("<image>", "").strip() for s in q["questions"][0])
    assert validate_records(answers, "answer.json", image_root=out / "images", allow_candidates=True) == []
    for a in answers:
        assert set(a) == {"id", "image", "conversations"}
        rec = pool[a["id"]]
        for k in range(0, len(a["conversations"]), 2):
            human, gpt = a["conversations"][k], a["conversations"][k + 1]
            assert human == rec["conversations"][k]
            assert gpt["value"][0] == rec["conversations"][k + 1]["value"]
            assert len(gpt["value"]) == len(gpt["score"]) == 4
            task = ls_by_group[(a["id"], "answer", k // 2)]
            assert task["data"]["prompt"] == human["value"].replace("<image>", "").strip()
            assert [task["data"][f"candidate_{j}"] for j in range(task["data"]["n_candidates"])] == gpt["value"]
            result = task["annotations"][0]["result"]
            assert {r["type"] for r in result} == {"rating"} and {r["origin"] for r in result} == {"manual"}
            assert task["annotations"][0]["was_cancelled"] is False and task["predictions"] == []
            assert [r["to_name"] for r in result] == [f"candidate_{j}" for j in range(4)]
            assert [r["value"]["rating"] for r in result] == [1 + round(s * 4) for s in gpt["score"]]
    assert [t["id"] for t in ls] == list(range(1, len(ls) + 1))


@pytest.mark.parametrize("annotators", [1, 2])
def test_label_studio_path_gives_the_released_files_pairs(world, tmp_path, monkeypatch, annotators):
    """annotate-import of the simulated Label Studio export (checked against the tasks file) and
    of the released-format files: the same pairs, same ids, same order; with two annotators the
    released files hold their mean and agreement is measured."""
    from align2llava.steps.annotations.importer import import_annotations

    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    out = world / "a"
    if annotators > 1:
        out = tmp_path / "w"
        res = _run(tmp_path, out, annotators=annotators)
        assert res.exit_code == 0, res.output
    ann = out / "annotations"
    ls = import_annotations("labelstudio", input=ann / "labelstudio.json", tasks=ann / "tasks.json",
                            out_dir=tmp_path / "ls", image_root=out / "images")
    paper = import_annotations("align2llava", questions=ann / "question.json", answers=ann / "answer.json",
                               out_dir=tmp_path / "paper", image_root=out / "images")
    assert ls.pairs == paper.pairs and len(ls.pairs) > 50
    assert (tmp_path / "ls" / "pairs.jsonl").read_bytes() == (tmp_path / "paper" / "pairs.jsonl").read_bytes()
    m = ls.metrics()
    assert m["annotators"] == annotators and m["rejected_rows"] == 0
    assert m["annotations"] == annotators * m["groups_question"] + annotators * m["groups_answer"]
    if annotators == 1:
        assert m["agreement_alpha"] is None and m["agreement_units"] == 0
    else:
        # the same rubric with independent one-step slips at rate 0.15: high, not perfect
        assert 0.8 < m["agreement_alpha"] < 1.0


def test_benchmark_and_captions(world):
    out = world / "a"
    vqa = read_jsonl_strict(out / "benchmark" / "vqa.jsonl")
    pope = read_jsonl_strict(out / "benchmark" / "pope.jsonl")
    assert Counter(r["type"] for r in vqa) == {"shape": 4, "color": 4, "yes_no": 4}
    assert Counter(r["answer"] for r in pope) == {"yes": 3, "no": 3}
    pool_images = {r["image"] for r in read_records_strict(out / "pool.json")}
    for r in vqa + pope:
        assert set(r) == {"id", "image", "question", "answer", "type"}
        assert r["image"].startswith("test/") and r["image"] not in pool_images
        assert (out / "images" / r["image"]).is_file()
        shape, color, _, _ = measure_image(out / "images" / r["image"])
        if r["type"] == "shape":
            assert r["answer"] == shape
        if r["type"] == "color":
            assert r["answer"] == color
        if r["type"] == "pope":
            asked = next(w for w in r["question"].lower().rstrip("?").split() if w in SHAPES + COLORS)
            assert (r["answer"] == "yes") == (asked in (shape, color))
    caps = read_jsonl_strict(out / "captions.jsonl")
    assert len(caps) == TINY_WORLD["captions"]
    for c in caps:
        shape, color, _, _ = measure_image(out / "images" / c["image"])
        assert f"{color} {shape}" in c["caption"]


def _mix_checks(out: Path) -> list[dict]:
    """The mix's records: valid, on train images no pool record or benchmark question uses, three
    short-answer turns each in a shuffled order; returned for the kind's own checks."""
    mix = read_records_strict(out / "vqa_mix.json")
    assert len(mix) == MIX and not validate_records(mix, "vqa_mix.json", image_root=out / "images")
    pool_images = {r["image"] for r in read_records_strict(out / "pool.json")}
    bench = read_jsonl_strict(out / "benchmark" / "vqa.jsonl") + read_jsonl_strict(out / "benchmark" / "pope.jsonl")
    assert not {r["image"] for r in mix} & (pool_images | {r["image"] for r in bench})
    assert all(r["image"].startswith("train/") for r in mix)
    for r in mix:
        turns = r["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 3 and turns[0]["value"].startswith("<image>\n")
        assert all(t["value"].endswith("\nAnswer the question using a single word or phrase.") for t in turns[::2])
    assert len({r["conversations"][0]["value"].split()[1] for r in mix}) > 1  # not always the same first question
    return mix


def test_easy_vqa_mix_is_easy_vqas_own_qa(world):
    from align2llava.demo.synthesis.world import easy_vqa_dir, read_split

    _, qa = read_split(easy_vqa_dir(), "train")
    own = {(q.lower(), a, i) for q, a, i in qa}
    for r in _mix_checks(world / "a"):
        i = int(r["image"].removeprefix("train/").removesuffix(".png"))
        turns, kinds = r["conversations"], []
        for h, g in zip(turns[::2], turns[1::2]):
            q = h["value"].removeprefix("<image>\n").removesuffix("\nAnswer the question using a single word or phrase.")
            assert (q.lower(), g["value"].lower(), i) in own  # easy-vqa's wording and answer, not the writer's
            a = g["value"].lower()
            kinds.append("shape" if a in SHAPES else "color" if a in COLORS else "yes_no")
        assert sorted(kinds) == ["color", "shape", "yes_no"]


def test_layout_mix_teaches_the_short_form_without_the_benchmarks_facts(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    res = _run(tmp_path, tmp_path / "o", vqa_mix=MIX, vqa_mix_kind="layout")
    assert res.exit_code == 0, res.output
    for r in _mix_checks(tmp_path / "o"):
        _, _, position, size = measure_image(tmp_path / "o" / "images" / r["image"])
        turns, kinds = r["conversations"], []
        for h, g in zip(turns[::2], turns[1::2]):
            q, a = h["value"], g["value"]
            assert not set(_words(q + " " + a)) & set(SHAPES + COLORS)  # never what the benchmark asks
            if a.lower() in (position, size):
                kinds.append("position" if a.lower() == position else "size")
            else:
                side = next(w for w in ("left", "right", "upper", "lower") if w in _words(q))
                assert a == ("Yes" if side in position.split() else "No"), (q, a, position)
                kinds.append("side")
        assert sorted(kinds) == ["position", "side", "size"], turns


def test_hallucinated_colours_contradict_the_pixels(world):
    out = world / "a"
    pool = {r["id"]: r for r in read_records_strict(out / "pool.json")}
    for o in read_jsonl_strict(out / "oracle.jsonl"):
        rec = pool[o["id"]]
        _, color, _, _ = measure_image(out / "images" / rec["image"])
        for turn, defects in o["turn_defects"].items():
            text = rec["conversations"][2 * int(turn) + 1]["value"].lower().split()
            named = {w.strip(".,!") for w in text} & set(COLORS)
            if "hallucinated_color" in defects:
                assert named and color not in named


def _truths(n: int) -> list[Truth]:
    rng = random.Random(1)
    return [Truth(i, "train", rng.choice(SHAPES), rng.choice(COLORS), "center", "medium") for i in range(n)]


def test_defect_rates_near_params():
    rates = DefectRates(hallucinated_color=0.2, hallucinated_shape=0.1, wrong_yes_no=0.15,
                        omitted_key_fact=0.1, generic_question=0.05, unanswerable_question=0.1)
    items = [make_item(task, t, 0, rates) for task in TASKS if task != "vqa" for t in _truths(400)]
    measured = measured_rates(items)["overall"]
    for d in DEFECTS:
        assert abs(measured[d] - getattr(rates, d)) < 0.035, (d, measured[d])
    clean = [make_item("detail", t, 0, DefectRates(**{d: 0.0 for d in DEFECTS})) for t in _truths(50)]
    assert all(not i.turn_defects for i in clean)


def test_vqa_answers_are_wrong_at_the_rate_and_the_way_a_text_only_writer_errs():
    items = [make_item("vqa", t, 0, DefectRates(), vqa_wrong_rate=0.3) for t in _truths(600)]
    turns = [(i, k, turn) for i in items for k, turn in enumerate(i.turns)]
    wrong = [(i, k, turn) for i, k, turn in turns if k in i.turn_defects]
    assert abs(len(wrong) / len(turns) - 0.3) < 0.03
    guessed = Counter(turn.answer.lower() for i, k, turn in wrong if turn.kind == "color")
    # guesses follow the writer's prior (red, then blue), not a uniform draw over the 7 others
    assert guessed.most_common(1)[0][0] == "red" and guessed["red"] > 2 * guessed["yellow"]
    assert {turn.answer for i, k, turn in wrong if turn.kind == "yes_no"} == {"Yes"}
    assert all(i.turn_defects[k] == [{"color": "hallucinated_color", "shape": "hallucinated_shape",
                                      "yes_no": "wrong_yes_no"}[turn.kind]] for i, k, turn in wrong)
    assert all(judge_answer(turn, turn.answer, i.truth) == (0.0 if k in i.turn_defects else 1.0)
               for i, k, turn in turns)


def test_favourite_guesses_are_the_writers_mode_and_keep_the_defect_rates():
    truths = _truths(600)
    sampled = [make_item("vqa", t, 0, DefectRates(), vqa_wrong_rate=0.3) for t in truths]
    fav = [make_item("vqa", t, 0, DefectRates(), vqa_wrong_rate=0.3, guesses="favourite") for t in truths]
    wrong = {"color": Counter(), "shape": Counter()}
    for i, j in zip(sampled, fav):
        assert i.turn_defects == j.turn_defects  # same records, same defective turns
        for k, turn in enumerate(j.turns):
            if k in j.turn_defects and turn.kind in wrong:
                truth = getattr(j.truth, turn.kind)
                # red (blue where red is the truth); circle (rectangle where it is a circle)
                mode = {"color": ("red", "blue"), "shape": ("circle", "rectangle")}[turn.kind]
                assert turn.answer.lower() == (mode[1] if truth == mode[0] else mode[0]), (turn, truth)
                wrong[turn.kind][turn.answer.lower()] += 1
    assert set(wrong["color"]) == {"red", "blue"} and set(wrong["shape"]) == {"circle", "rectangle"}
    # the verbose tasks' hallucinations follow the same rule
    t = Truth(1, "train", "triangle", "green", "center", "medium")
    rates = DefectRates(**{d: 1.0 if d == "hallucinated_color" else 0.0 for d in DEFECTS})
    item = make_item("detail", t, 0, rates, guesses="favourite")
    assert "red" in item.turns[0].answer and "green" not in item.turns[0].answer


def test_annotator_separates_clean_from_defective():
    """The rubric, without noise, scores every generated defect below every clean turn."""
    for task in TASKS:
        for t in _truths(150):
            item = make_item(task, t, 3, SynthesizeParams().defect_rates)
            for k, turn in enumerate(item.turns):
                d = item.turn_defects.get(k, [None])[0]
                a, q = judge_answer(turn, turn.answer, t), judge_question(turn.question, t)
                if d is None:
                    assert a >= 0.75 and q >= 0.75, (turn, t)
                elif d in QUESTION_DEFECTS:
                    assert q <= 0.25 and a <= 0.25, (d, turn, t)
                else:
                    assert a <= 0.5, (d, turn, t)


def test_bad_source_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    from stages.synthesize import main

    params = _params_file(tmp_path, **TINY_WORLD)
    (tmp_path / "src" / "train").mkdir(parents=True)
    res = CliRunner().invoke(main, ["--params", str(params), "--out-dir", str(tmp_path / "o"),
                                    "--source", str(tmp_path / "src")])
    assert res.exit_code == 1
    assert res.output.startswith("Error: ") and "questions.json" in res.output
    assert "Traceback" not in res.output


def test_a_vqa_mix_larger_than_the_images_left_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    res = _run(tmp_path, tmp_path / "o", vqa_mix=4000)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.startswith("Error: synthesize.vqa_mix: 4,000 records asked") and res.output.count("\n") == 1


def test_pool_sizes_set_a_tasks_count_and_leave_the_others(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    res = _run(tmp_path, tmp_path / "o", pool_sizes={"vqa": 13})
    assert res.exit_code == 0, res.output
    pool = read_records_strict(tmp_path / "o" / "pool.json")
    assert Counter(r["task"] for r in pool) == {**{t: TINY_WORLD["pool_per_task"] for t in TASKS}, "vqa": 13}
    assert len({r["image"] for r in pool}) == len(pool)  # one image per record, whatever the sizes
    assert json.loads((tmp_path / "metrics" / "synthesize.json").read_text())["pool"]["vqa"] == 13


def test_a_pool_larger_than_easy_vqas_train_split_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    res = _run(tmp_path, tmp_path / "o", pool_sizes={"vqa": 3990})
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.startswith("Error: synthesize.pool_per_task / pool_sizes: 4,014 pool images needed")
    assert res.output.count("\n") == 1


def test_easy_vqa_wording_asks_easy_vqas_questions_and_errs_like_the_writer(tmp_path, monkeypatch):
    from align2llava.demo.synthesis.world import easy_vqa_dir, read_split

    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    res = _run(tmp_path, tmp_path / "o", vqa_wording="easy_vqa", pool_sizes={"vqa": 60}, vqa_wrong_rate=0.3)
    assert res.exit_code == 0, res.output
    _, qa = read_split(easy_vqa_dir(), "train")
    own = {(q.lower(), a, i) for q, a, i in qa}
    oracle = {o["id"]: o for o in read_jsonl_strict(tmp_path / "o" / "oracle.jsonl")}
    asked = right = wrong = wrong_yes_no = wrong_yes = 0
    clean_yes_no: Counter = Counter()
    for r in (r for r in read_records_strict(tmp_path / "o" / "pool.json") if r["task"] == "vqa"):
        i = int(r["image"].removeprefix("train/").removesuffix(".png"))
        turns = r["conversations"]
        assert 3 <= len(turns) // 2 <= 5
        questions = [h["value"].replace("<image>\n", "").replace("\n<image>", "") for h in turns[::2]]
        assert len(set(questions)) == len(questions)
        for k, (q, g) in enumerate(zip(questions, turns[1::2])):
            q = q.removesuffix("\nAnswer the question using a single word or phrase.")
            if g["value"] in ("Yes", "No") and str(k) not in oracle[r["id"]]["turn_defects"]:
                clean_yes_no[g["value"]] += 1
            truth = {a for qq, a, ii in own if qq == q.lower() and ii == i}
            if not truth:  # the image has no easy-vqa question of this kind left: the writer's own
                continue
            asked += 1
            assert q[0].isupper() and not {"not", "no"} & set(_words(q))
            marked = str(k) in oracle[r["id"]]["turn_defects"]
            assert (g["value"].lower() in truth) != marked, (r["id"], q, g["value"], truth)
            right += not marked
            wrong += marked
            wrong_yes_no += marked and g["value"] in ("Yes", "No")
            wrong_yes += marked and g["value"] == "Yes"
    assert asked >= 0.8 * 60 * 3  # most turns are easy-vqa's questions
    assert 0.2 < wrong / asked < 0.4
    assert wrong_yes_no and wrong_yes / wrong_yes_no > 0.8  # a wrong yes/no is mostly a "yes" to an absent thing
    assert 0.35 < clean_yes_no["Yes"] / sum(clean_yes_no.values()) < 0.65  # right ones: present and absent alike


@pytest.mark.parametrize("wording", ["writer", "easy_vqa"])
def test_yes_no_first_asks_one_yes_no_before_anything_names_the_image(tmp_path, monkeypatch, wording):
    from align2llava.demo.synthesis.world import COLORS, SHAPES

    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    res = _run(tmp_path, tmp_path / "o", vqa_wording=wording, pool_sizes={"vqa": 40}, vqa_turns="yes_no_first")
    assert res.exit_code == 0, res.output
    vqa = [r for r in read_records_strict(tmp_path / "o" / "pool.json") if r["task"] == "vqa"]
    assert len(vqa) == 40
    kinds: Counter = Counter()
    for r in vqa:
        answers = [g["value"] for g in r["conversations"][1::2]]
        assert len(answers) == 3 and answers[0] in ("Yes", "No")
        assert not {"Yes", "No"} & set(answers[1:]), r["id"]  # then colour and shape, one each
        kinds.update(("color" if a.lower() in COLORS else "shape" if a.lower() in SHAPES else a) for a in answers[1:])
    assert kinds["color"] + kinds["shape"] == 80 and min(kinds["color"], kinds["shape"]) >= 30


def test_instruct_set_is_correct_and_on_images_no_other_record_uses(world):
    from align2llava.demo.synthesis.writer import asserted_words

    out = world / "a"
    inst = read_records_strict(out / "instruct.json")
    assert validate_records(inst, "instruct.json", image_root=out / "images") == []
    assert len(inst) == TINY_WORLD["instruct_images"] == len({r["image"] for r in inst})
    others = {r["image"] for f in ("pool.json", "vqa_mix.json") for r in read_records_strict(out / f)}
    assert others and not {r["image"] for r in inst} & others
    for r in inst:
        shape, color, *_ = measure_image(out / "images" / r["image"])
        q, a = (t["value"] for t in r["conversations"])
        assert q.startswith("<image>\n") and len(r["conversations"]) == 2
        said = {w for w in asserted_words(a) if w in COLORS + SHAPES}
        if a.startswith("No, it shows") or a.startswith("Yes, it shows"):  # caption matching: the truth follows
            said = {w for w in _words(a.split("shows", 1)[1]) if w in COLORS + SHAPES}
        assert said <= {shape, color}, (q, a, shape, color)


def test_instruct_answers_are_right_for_every_kind():
    from align2llava.demo.synthesis.instruct_data import KINDS, _turn

    t = Truth(7, "train", "triangle", "teal", "center", "small")
    seen = Counter()
    for n in range(400):
        rng = random.Random(n)
        kind = list(KINDS)[n % len(KINDS)]
        q, a = _turn(kind, rng, t)
        seen[kind] += 1
        words = set(_words(a))
        if kind in ("color", "shape", "describe"):
            assert words & {"teal", "triangle"} and not words & (set(COLORS + SHAPES) - {"teal", "triangle"}), (q, a)
        else:  # presence / matching: yes exactly when the question names the truth only
            named = set(_words(q)) & set(COLORS + SHAPES)
            assert a.startswith("Yes" if named <= {"teal", "triangle"} else "No"), (q, a)
            assert a.endswith("teal triangle."), a
    assert set(seen) == set(KINDS)


def test_more_instruct_images_than_left_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    res = _run(tmp_path, tmp_path / "o", instruct_images=3990)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.startswith("Error: synthesize.instruct_images: 3,990 asked") and res.output.count("\n") == 1
