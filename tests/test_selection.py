"""Selection: exact per-type counts, tie-breaking, candidates, baselines, audit, the stage CLI."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from align2llava.errors import DataError
from align2llava.steps.selection import SelectParams, keep_count, parse_scores, resolve_candidates, select
from tests.conftest import assert_summary_keys, llava_record

TASKS = ("conversation", "detail", "complex_reasoning")


def make_pool(n_per_task=20, seed=0, with_task=True):
    rng = random.Random(seed)
    pool, rows = [], []
    for task in TASKS:
        for i in range(n_per_task):
            rid = f"{task[:4]}-{i:03d}"
            n_turns = 2 if task == "conversation" else 1
            turns = [(f"Question {k} " + "word " * rng.randint(1, 9), f"Answer {k} " + "x " * rng.randint(1, 9)) for k in range(n_turns)]
            rec = llava_record(rid, task=task if with_task else None, turns=turns)
            scores = []
            for k in range(n_turns):
                if i % 5 == 0 and k == 0:  # a turn with three candidate answers
                    gpt = rec["conversations"][2 * k + 1]
                    gpt["value"] = [gpt["value"], f"better {rid}", f"worse {rid}"]
                    gpt["score"] = [0.5, 1.0, 0.0]
                    scores.append([rng.random(), rng.random() + 2.0, rng.random() - 2.0])
                else:
                    scores.append([rng.random()])
            turns_rows = [{"turn": k, "scores": s, "best": max(range(len(s)), key=s.__getitem__)} for k, s in enumerate(scores)]
            rows.append(
                {
                    "id": rid,
                    "task": task,
                    "question_score": round(rng.gauss(0, 1), 1),  # rounded: many ties
                    "answer_score": sum(max(s) for s in scores) / n_turns,
                    "turns": turns_rows,
                }
            )
            pool.append(rec)
    return pool, rows


def test_keep_count_rounds_half_up_exactly():
    assert keep_count(0.3, 300) == 90
    assert keep_count(0.3, 90) == 27
    assert keep_count(0.5, 5) == 3  # 2.5 -> 3 (Python's round would give 2)
    assert keep_count(0.3, 20) == 6 and keep_count(0.3, 6) == 2
    assert keep_count(1.0, 7) == 7 and keep_count(0.0, 7) == 0


def test_reward_selection_counts_order_and_best_candidate():
    pool, rows = make_pool()
    scores = parse_scores(rows)
    res = select(pool, scores, SelectParams())
    for task in TASKS:
        assert res.counts[task] == {"pool": 20, "question": 6, "answer": 2}
    assert res.metrics["kept"] == 6 and res.metrics["keep_ratio_overall"] == pytest.approx(0.1)
    # exactly the expected ids: top 6 by question score (ties by id), then top 2 by answer
    for task in TASKS:
        ids = [r["id"] for r in rows if r["task"] == task]
        q = sorted(ids, key=lambda i: (-scores[i].question_score, i))[:6]
        a = sorted(q, key=lambda i: (-scores[i].answer_score, i))[:2]
        assert {r["id"] for r in res.selected if r["task"] == task} == set(a)
    # pool order kept; candidate lists resolved to the best-scoring one, no score lists left
    pool_pos = {r["id"]: i for i, r in enumerate(pool)}
    assert [pool_pos[r["id"]] for r in res.selected] == sorted(pool_pos[r["id"]] for r in res.selected)
    for rec in res.selected:
        for t in rec["conversations"]:
            assert isinstance(t["value"], str) and "score" not in t
    # audit: every pool id once, kept exactly the selected ones
    assert [a["id"] for a in res.audit] == [r["id"] for r in pool]
    assert {a["id"] for a in res.audit if a["kept"]} == {r["id"] for r in res.selected}
    assert {a["dropped_at"] for a in res.audit} == {None, "question", "answer"}
    assert sum(a["dropped_at"] == "question" for a in res.audit) == 3 * 14


def test_resolve_candidates_picks_best_or_original():
    rec = llava_record("r", turns=[("Q?", "orig")])
    rec["conversations"][1] = {"from": "gpt", "value": ["orig", "good", "bad"], "score": [0.5, 1, 0]}
    assert resolve_candidates(rec, [1])["conversations"][1] == {"from": "gpt", "value": "good"}
    assert resolve_candidates(rec, None)["conversations"][1]["value"] == "orig"
    assert rec["conversations"][1]["value"] == ["orig", "good", "bad"]  # input untouched


def test_ties_are_broken_by_id_not_file_order():
    pool, rows = make_pool()
    for r in rows:
        r["question_score"], r["answer_score"] = 0.0, 0.0
    a = select(pool, parse_scores(rows), SelectParams())
    b = select(pool[::-1], parse_scores(rows[::-1]), SelectParams())
    assert {r["id"] for r in a.selected} == {r["id"] for r in b.selected}
    assert {r["id"] for r in a.selected} == {f"{t[:4]}-{i:03d}" for t in TASKS for i in (0, 1)}


@pytest.mark.parametrize("method", ["random", "length"])
def test_baselines_have_the_same_counts_and_keep_original_candidates(method):
    pool, rows = make_pool()
    scores = parse_scores(rows)
    reward = select(pool, scores, SelectParams())
    res = select(pool, scores, SelectParams(method=method))
    assert res.counts == reward.counts
    assert {r["id"] for r in res.selected} != {r["id"] for r in reward.selected}
    for rec in res.selected:
        assert not rec["conversations"][1]["value"].startswith(("better", "worse"))


def test_random_is_seeded_by_select_seed():
    pool, rows = make_pool()
    scores = parse_scores(rows)
    ids = lambda s: [r["id"] for r in select(pool, scores, SelectParams(method="random", seed=s)).selected]
    assert ids(0) == ids(0)
    assert ids(0) != ids(1)


def test_method_all_keeps_every_scored_record():
    pool, rows = make_pool()
    res = select(pool, parse_scores(rows[1:]), SelectParams(method="all"))
    assert len(res.selected) == len(pool) - 1
    assert res.audit[0]["dropped_at"] == "unscored" and res.audit[0]["answer_score"] is None
    assert res.metrics["unscored"] == 1


def test_records_without_task_use_task_map_or_default():
    pool, rows = make_pool(with_task=False)
    res = select(pool, parse_scores(rows), SelectParams())
    assert res.counts == {"all": {"pool": 60, "question": 18, "answer": 5}}
    res = select(pool, parse_scores(rows), SelectParams(task_map={"^conv": "conv", "^deta": "det"}, default_task="other"))
    assert set(res.counts) == {"conv", "det", "other"} and res.counts["other"]["answer"] == 2


def test_bad_scores_are_errors_that_name_the_id():
    pool, rows = make_pool(n_per_task=2)
    bad = [dict(rows[0], answer_score="high")]
    with pytest.raises(DataError, match="line 1 .id conv-000.*numbers"):
        parse_scores(bad)
    with pytest.raises(DataError, match="duplicate id"):
        parse_scores([rows[0], rows[0]])
    with pytest.raises(DataError, match="not in the pool"):
        select(pool[1:], parse_scores(rows), SelectParams())
    wrong_turns = [dict(r, turns=r["turns"][:1]) if r["task"] == "conversation" else r for r in rows]
    with pytest.raises(DataError, match="scored turns"):
        select(pool, parse_scores(wrong_turns), SelectParams())


def test_params_are_strict():
    from align2llava.config import parse_section
    from align2llava.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown key 'select.keep_ration'"):
        parse_section({"keep_ration": 0.3}, "select", SelectParams)
    with pytest.raises(ConfigError, match="select.question_keep_ratio"):
        parse_section({"question_keep_ratio": 1.5}, "select", SelectParams)
    with pytest.raises(ConfigError, match="select.method"):
        parse_section({"method": "best"}, "select", SelectParams)


def _write_inputs(tmp_path: Path, method="reward"):
    pool, rows = make_pool()
    (tmp_path / "pool.json").write_text(json.dumps(pool))
    (tmp_path / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "params.yaml").write_text(
        f"base:\n  pool: {tmp_path / 'pool.json'}\nselect:\n  method: {method}\n"
        "  question_keep_ratio: 0.5\n  keep_ratio: 0.5\n"
    )
    return pool


def test_stage_cli_writes_outputs_and_metrics(tmp_path):
    from stages.select import main

    pool = _write_inputs(tmp_path)
    args = ["--params", str(tmp_path / "params.yaml"), "--scores", str(tmp_path / "scores.jsonl"),
            "--out-dir", str(tmp_path / "out"), "--plots-dir", str(tmp_path / "plots"),
            "--metrics-dir", str(tmp_path / "metrics")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    selected = json.loads((tmp_path / "out" / "selected.json").read_text())
    assert len(selected) == 3 * 5  # per type: 20 -> 10 -> 5
    audit = [json.loads(x) for x in (tmp_path / "out" / "audit.jsonl").read_text().splitlines()]
    assert sorted(a["id"] for a in audit) == sorted(r["id"] for r in pool)
    assert set(audit[0]) == {"id", "task", "kept", "dropped_at", "question_score", "answer_score"}
    metrics = json.loads((tmp_path / "metrics" / "select.json").read_text())
    assert_summary_keys(metrics, "select")
    assert metrics["keep_ratio_overall"] == pytest.approx(0.25)
    assert metrics["per_task"]["detail"] == {"pool": 20, "question": 10, "answer": 5, "keep_ratio": 0.25}
    funnel = list(csv.DictReader(open(tmp_path / "plots" / "funnel.csv")))
    assert funnel[0] == {"step": "1 pool (all types)", "count": "60"}
    assert funnel[2] == {"step": "3 after answer (all types)", "count": "15"}
    hist = list(csv.DictReader(open(tmp_path / "plots" / "histogram.csv")))
    assert len(hist) == 20 and sum(int(h["count"]) for h in hist) == 2 * 60


def test_stage_cli_bad_input_is_one_line_error(tmp_path):
    from stages.select import main

    _write_inputs(tmp_path)
    (tmp_path / "scores.jsonl").write_text('{"id": "conv-000"}\n{not json\n')
    res = CliRunner().invoke(main, ["--params", str(tmp_path / "params.yaml"), "--scores", str(tmp_path / "scores.jsonl"),
                                    "--out-dir", str(tmp_path / "out"), "--metrics-dir", str(tmp_path / "m")])
    assert res.exit_code == 1
    assert res.output.startswith("Error: ") and "line 2 is not valid JSON" in res.output
    assert "Traceback" not in res.output


# ----------------------------------------------------------------------------- oracle (diagnostic)


def _clean_flags(pool):
    """Every third record has a question defect, every fourth an answer defect."""
    return {r["id"]: (i % 3 != 0, i % 3 != 0 and i % 4 != 0) for i, r in enumerate(pool)}


def test_oracle_fills_the_same_counts_with_clean_records_first():
    pool, rows = make_pool()
    scores, clean = parse_scores(rows), _clean_flags(pool)
    oracle = select(pool, scores, SelectParams(method="oracle"), clean)
    reward = select(pool, scores, SelectParams(method="reward"))
    assert oracle.counts == reward.counts  # 20 -> 6 -> 2 per type
    assert all(clean[r["id"]] == (True, True) for r in oracle.selected)
    q_kept = [a["id"] for a in oracle.audit if a["dropped_at"] in (None, "answer")]
    assert all(clean[i][0] for i in q_kept)
    # baselines keep the original answer, never the reward model's choice of candidate
    assert all(not isinstance(t["value"], list) for r in oracle.selected for t in r["conversations"])
    by_seed = {s: [r["id"] for r in select(pool, scores, SelectParams(method="oracle", seed=s), clean).selected]
               for s in (0, 1)}
    assert by_seed[0] != by_seed[1]  # the seed decides among equally clean records
    assert by_seed[0] == [r["id"] for r in oracle.selected]


def test_oracle_flags_only_with_the_oracle_method():
    pool, rows = make_pool()
    scores = parse_scores(rows)
    with pytest.raises(DataError, match="method 'oracle' needs the clean flags"):
        select(pool, scores, SelectParams(method="oracle"))
    with pytest.raises(DataError, match="only it takes them"):
        select(pool, scores, SelectParams(method="reward"), _clean_flags(pool))
    clean = _clean_flags(pool)
    del clean[pool[0]["id"]]
    with pytest.raises(DataError, match=f"no row for pool record {pool[0]['id']}"):
        select(pool, scores, SelectParams(method="oracle"), clean)


def test_stage_reads_the_oracle_for_the_oracle_method_only(tmp_path):
    from stages.select import main

    pool = _write_inputs(tmp_path)
    args = ["--params", str(tmp_path / "params.yaml"), "--scores", str(tmp_path / "scores.jsonl"),
            "--out-dir", str(tmp_path / "out"), "--plots-dir", str(tmp_path / "plots"),
            "--metrics-dir", str(tmp_path / "metrics")]
    with (tmp_path / "params.yaml").open("a") as f:
        f.write(f"  oracle: {tmp_path / 'oracle.jsonl'}\n")
    # the reward path: a missing oracle file is never opened
    assert CliRunner().invoke(main, args).exit_code == 0
    text = (tmp_path / "params.yaml").read_text().replace("method: reward", "method: oracle")
    (tmp_path / "params.yaml").write_text(text)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and res.output.startswith("Error: ") and "oracle.jsonl: file not found" in res.output
    rows = [{"id": r["id"], "defects": [] if i % 2 else ["hallucinated_color"]} for i, r in enumerate(pool)]
    (tmp_path / "oracle.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    selected = json.loads((tmp_path / "out" / "selected.json").read_text())
    defective = {r["id"] for r in rows if r["defects"]}
    assert len(selected) == 15 and not {r["id"] for r in selected} & defective


def test_turn_aggregate_min_ranks_records_by_their_worst_turn():
    pool, rows = make_pool()
    for r in rows:  # conversations: two turns, one good; the mean hides the bad one
        if r["task"] == "conversation":
            i = int(r["id"][-3:])
            good, bad = 5.0 + i * 0.01, (-5.0 if i % 2 else 4.0) + i * 0.01
            r["turns"] = [{"turn": 0, "scores": [good], "best": 0}, {"turn": 1, "scores": [bad], "best": 0}]
            r["answer_score"] = 10.0 - (good + bad) / 2  # the file's mean, made to disagree
            r["question_score"] = 0.0
    scores = parse_scores(rows)
    mean = {r["id"] for r in select(pool, scores, SelectParams()).selected if r["task"] == "conversation"}
    worst = {r["id"] for r in select(pool, scores, SelectParams(turn_aggregate="min")).selected
             if r["task"] == "conversation"}
    q = sorted((r["id"] for r in rows if r["task"] == "conversation"))[:6]  # question ties: by id
    assert worst == {"conv-004", "conv-002"}  # the even ones (bad turn 4.0), highest worst turn
    assert mean == {"conv-001", "conv-003"} and set(q) >= mean | worst  # mean reads answer_score
    # the other tasks (one turn) select the same records either way
    assert ({r["id"] for r in select(pool, scores, SelectParams()).selected} - mean
            == {r["id"] for r in select(pool, scores, SelectParams(turn_aggregate="min")).selected} - worst)


def test_a_turn_score_that_is_not_a_finite_number_is_an_error():
    _, rows = make_pool(n_per_task=2)
    bad = dict(rows[0], turns=[dict(rows[0]["turns"][0], scores=["x"], best=0)])
    with pytest.raises(DataError, match=r"line 1 \(id conv-000\): turns\[0\].*finite number"):
        parse_scores([bad])

    from align2llava.config import parse_section
    from align2llava.errors import ConfigError

    with pytest.raises(ConfigError, match="select.turn_aggregate"):
        parse_section({"turn_aggregate": "median"}, "select", SelectParams)
