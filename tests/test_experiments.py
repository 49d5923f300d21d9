"""The compression experiment without DVC: the run plan and its -S overrides, parsing a
`dvc exp show --json` document, rows, mean +- std, and the queue/wait/collect flow against a
fake dvc."""

from __future__ import annotations

import csv
import json
import time

import pytest
from click.testing import CliRunner

from align2llava.errors import Align2LlavaError
from align2llava.ops.experiments import (
    COLUMNS,
    RunSpec,
    compression,
    experiment_rows,
    format_table,
    mean_std,
    parse_exp_show,
    parse_overrides,
    plan_runs,
    queue_command,
    run_cmd,
    summarize,
)


def test_plan_and_overrides():
    runs = plan_runs([0.09, 0.3], [0, 1], ["reward", "random", "full"])
    assert len(runs) == 2 * (2 + 2 + 1)
    assert len({r.name for r in runs}) == len(runs)
    r = RunSpec("random", 0.3, 1)
    p = r.set_params()
    assert p["select.method"] == "random" and p["restyle.enabled"] is False
    assert p["select.question_keep_ratio"] * p["select.keep_ratio"] == pytest.approx(0.3, abs=1e-5)
    assert p["select.seed"] == p["finetune.seed"] == 1
    assert RunSpec("reward", 0.09, 0).set_params()["select.question_keep_ratio"] == 0.3
    assert RunSpec("full", 1.0, 2).set_params()["select.method"] == "all"
    cmd = queue_command(RunSpec("reward_raw", 0.09, 2))
    assert cmd[:6] == ["dvc", "exp", "run", "--queue", "-n", "cmp-reward-raw-9-s2"]
    assert "restyle.enabled=false" in cmd and "select.method=reward" in cmd
    with pytest.raises(Align2LlavaError, match="unknown method 'best'"):
        plan_runs([0.1], [0], ["best"])
    with pytest.raises(Align2LlavaError, match="not in"):
        plan_runs([0.0], [0], ["reward"])


def test_method_overrides():
    extra = parse_overrides(["full:finetune.num_train_epochs=1", "full:finetune.learning_rate=2.0e-4"])
    assert extra == {"full": {"finetune.num_train_epochs": "1", "finetune.learning_rate": "2.0e-4"}}
    runs = plan_runs([0.09], [0, 1], ["reward", "full"], overrides=extra)
    full = [r for r in runs if r.method == "full"]
    assert [r.name for r in full] == ["cmp-full-100-s0", "cmp-full-100-s1"]
    cmd = queue_command(full[0])
    assert cmd[-4:] == ["-S", "finetune.learning_rate=2.0e-4", "-S", "finetune.num_train_epochs=1"]
    assert "select.method=all" in cmd
    assert not any("num_train_epochs" in c for r in runs if r.method == "reward" for c in queue_command(r))
    # an override replaces the method's own setting
    assert RunSpec("random", 0.09, 0, extra=(("restyle.enabled", "true"),)).set_params()["restyle.enabled"] == "true"
    for bad, msg in [("full:epochs=1", "METHOD:SECTION.KEY=VALUE"), ("fulll:finetune.x=1", "unknown method 'fulll'"),
                     ("finetune.x=1", "METHOD:SECTION.KEY=VALUE")]:
        with pytest.raises(Align2LlavaError, match=msg):
            parse_overrides([bad])
    with pytest.raises(Align2LlavaError, match="not among the methods run"):
        plan_runs([0.09], [0], ["reward"], overrides={"full": {"finetune.x": "1"}})


def test_plan_oracle_and_base_rows():
    runs = plan_runs([0.09, 0.3], [0, 1, 2], ["oracle", "random", "base"])
    assert [(r.method, r.keep_ratio, r.seed) for r in runs if r.method == "base"] == [("base", 0.0, 0)]
    assert len([r for r in runs if r.method == "oracle"]) == 2 * 3
    o = RunSpec("oracle", 0.09, 1).set_params()
    assert o["select.method"] == "oracle" and o["restyle.enabled"] is False and "finetune.mode" not in o
    b = RunSpec("base", 0.0, 0).set_params()
    assert b["finetune.mode"] == "none" and b["restyle.enabled"] is False
    assert b["select.question_keep_ratio"] == b["select.keep_ratio"] == 1.0
    assert RunSpec("base", 0.0, 0).name == "cmp-base-0-s0"


def _exp(name, method, ratio, seed, acc, f1=0.5, restyle=None, state="success", error=None, mode="lora"):
    restyle = (method == "reward") if restyle is None else restyle
    alpha = 1.0 if method == "all" else ratio ** 0.5
    return {
        "revs": [{
            "rev": f"{abs(hash(name)):040d}"[:40],
            "name": name,
            "error": error,
            "data": {
                "params": {"params.yaml": {"data": {
                    "select": {"method": method, "question_keep_ratio": alpha, "keep_ratio": alpha, "seed": seed},
                    "restyle": {"enabled": restyle},
                    "finetune": {"seed": seed, "learning_rate": 2e-4, "mode": mode},
                }}},
                "metrics": {
                    "metrics/evaluate.json": {"data": {"benchmark_accuracy": acc, "pope_f1": f1, "eval_seconds": 40.0}},
                    "metrics/finetune.json": {"data": {"train_seconds": 100 * ratio, "train_records": int(900 * ratio)}},
                },
            },
        }],
        "executor": {"state": state},
        "name": name,
    }


def exp_show_doc(exps):
    """The shape `dvc exp show --json` prints: workspace, then the baseline with its experiments."""
    return [
        {"rev": "workspace", "name": None, "data": {}, "error": None, "experiments": None},
        {"rev": "a" * 40, "name": "main", "data": {}, "error": None, "experiments": exps},
    ]


EXPS = [
    _exp("cmp-reward-9-s0", "reward", 0.09, 0, 0.70),
    _exp("cmp-reward-9-s1", "reward", 0.09, 1, 0.60),
    _exp("cmp-random-9-s0", "random", 0.09, 0, 0.50, restyle=False),
    _exp("cmp-full-100-s0", "all", 1.0, 0, 0.65),
    _exp("cmp-reward-raw-9-s0", "reward", 0.09, 0, 0.62, restyle=False),
    _exp("cmp-random-9-s1", "random", 0.09, 1, 0.9, restyle=False, state="failed", error={"msg": "failed"}),
    _exp("other-exp", "reward", 0.09, 0, 0.99),
    _exp("cmp-oracle-9-s0", "oracle", 0.09, 0, 0.75, restyle=False),
    _exp("cmp-base-0-s0", "all", 1.0, 0, 0.55, restyle=False, mode="none"),
]


def test_parse_and_rows():
    exps = parse_exp_show(exp_show_doc(EXPS))
    assert len(exps) == len(EXPS)
    first = exps[0]
    assert first["params"]["select.method"] == "reward" and first["metrics"]["evaluate"]["benchmark_accuracy"] == 0.7
    assert exps[5]["state"] == "failed"
    rows = experiment_rows(exps)
    assert [(r["method"], r["keep_ratio"], r["seed"]) for r in rows] == [
        ("reward", 0.09, 0), ("reward", 0.09, 1), ("reward_raw", 0.09, 0), ("random", 0.09, 0), ("full", 1.0, 0),
        ("oracle", 0.09, 0), ("base", 0.0, 0),
    ]
    assert rows[0]["benchmark_accuracy"] == 0.7 and rows[0]["train_records"] == 81
    assert rows[0]["pope_accuracy"] is None  # missing metrics stay empty, not zero


def test_mean_std_and_table():
    assert mean_std([1.0]) == (1.0, None)  # one seed: no spread to report
    m, s = mean_std([0.6, 0.7])
    assert m == pytest.approx(0.65) and s == pytest.approx(0.0707107, abs=1e-6)
    summary = summarize(experiment_rows(parse_exp_show(exp_show_doc(EXPS))))
    reward = next(x for x in summary if x["method"] == "reward")
    assert reward["seeds"] == 2 and reward["benchmark_accuracy"][0] == pytest.approx(0.65)
    table = format_table(summary)
    assert "| reward | 0.09 | 2 | 0.650 +- 0.071 |" in table
    assert "| full | 1.00 | 1 | 0.650 |" in table


class FakeDvc:
    """Answers the dvc commands the experiment issues; queued runs finish on `queue start`."""

    def __init__(self, exps):
        self.exps = {e["name"]: e for e in exps}
        self.calls: list[list[str]] = []

    def __call__(self, cmd):
        self.calls.append(cmd)
        if cmd[1:3] == ["exp", "show"]:
            return json.dumps(exp_show_doc(list(self.exps.values())))
        if cmd[1:3] == ["exp", "remove"]:
            for n in cmd[3:]:
                self.exps.pop(n)
            return ""
        if cmd[1:4] == ["exp", "run", "--queue"]:
            name = cmd[cmd.index("-n") + 1]
            sets = dict(a.split("=", 1) for a in cmd[cmd.index("-S"):] if a != "-S")
            method = {"reward": "reward", "random": "random", "all": "all"}[sets["select.method"]]
            ratio = float(sets["select.question_keep_ratio"]) * float(sets["select.keep_ratio"])
            self.exps[name] = _exp(name, method, ratio, int(sets["finetune.seed"]), 0.55,
                                   restyle=sets["restyle.enabled"] == "true", state="queued")
            return ""
        if cmd[1:3] == ["queue", "start"]:
            for e in self.exps.values():
                if e["executor"]["state"] == "queued":
                    e["executor"]["state"] = "success"
            return ""
        raise AssertionError(f"unexpected command {cmd}")


def test_compression_queues_missing_reruns_failed_and_collects(tmp_path):
    fake = FakeDvc(EXPS)
    out = tmp_path / "reports" / "compression.csv"
    result = compression([0.09], [0, 1], ["reward", "random", "full"], out_csv=out,
                         out_md=tmp_path / "reports" / "compression.md", runner=fake, poll_s=0,
                         command_line="align2llava compression --ratios 0.09 --seeds 0,1")
    queued = [c[c.index("-n") + 1] for c in fake.calls if c[1:4] == ["exp", "run", "--queue"]]
    # finished runs are reused; the failed one is removed and queued again; the missing one added
    assert sorted(queued) == ["cmp-full-100-s1", "cmp-random-9-s1"]
    assert ["dvc", "exp", "remove", "cmp-random-9-s1"] in fake.calls
    assert ["dvc", "queue", "start", "-j", "1"] in fake.calls
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == COLUMNS
    assert {(r["method"], r["seed"]) for r in rows} == {
        ("reward", "0"), ("reward", "1"), ("random", "0"), ("random", "1"), ("full", "0"), ("full", "1"),
    }
    assert not result.failed
    md = (tmp_path / "reports" / "compression.md").read_text()
    assert "align2llava compression --ratios 0.09 --seeds 0,1" in md and "| random | 0.09 | 2 |" in md
    assert "## Harness check" in md and "oracle beats random at 9%" in md and result.checks in md


def test_collect_only_runs_nothing_and_fails_clearly_without_results(tmp_path):
    fake = FakeDvc([])
    with pytest.raises(Align2LlavaError, match="no finished experiments named cmp-"):
        compression([0.09], [0], ["reward"], out_csv=tmp_path / "c.csv", out_md=None,
                    runner=fake, collect_only=True)
    assert all(c[1:3] == ["exp", "show"] for c in fake.calls)


def test_cli_dry_run_prints_queue_commands():
    from align2llava.ops.cli import main

    res = CliRunner().invoke(main, ["compression", "--dry-run", "--ratios", "0.09", "--seeds", "0,1", "--methods", "reward,full"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("dvc exp run --queue -n cmp-") for line in lines)
    bad = CliRunner().invoke(main, ["compression", "--dry-run", "--ratios", "x"])
    assert bad.exit_code == 1 and "Error: cannot read 'x'" in bad.output


def test_run_cmd_returns_when_the_command_exits_not_when_its_daemon_does():
    # `dvc queue start` leaves a worker holding the command's stdout; the call must not wait for it
    start = time.monotonic()
    out = run_cmd(["sh", "-c", "sleep 30 & echo started"])
    assert out.strip() == "started" and time.monotonic() - start < 20


def test_run_cmd_failure_names_the_command_and_its_last_lines():
    with pytest.raises(Align2LlavaError, match=r"`sh -c .*` failed \(exit 3\): boom"):
        run_cmd(["sh", "-c", "echo boom >&2; exit 3"])


def _rows(method, values, ratio=0.09, yes=0.5):
    return [{"method": method, "keep_ratio": ratio, "seed": s, "benchmark_accuracy": v, "pope_yes_ratio": yes}
            for s, v in enumerate(values)]


def test_harness_check_oracle_gap_needs_twice_the_combined_spread_and_three_seeds():
    from align2llava.ops.harness import oracle_vs_random

    clear = oracle_vs_random(_rows("oracle", [0.62, 0.60, 0.64]) + _rows("random", [0.50, 0.52, 0.51]), "benchmark_accuracy")
    assert clear.passed is True and "gap +0.110" in clear.line()
    # same means, wide spread: 2 x sqrt(0.1^2 + 0.01^2) > gap
    noisy = oracle_vs_random(_rows("oracle", [0.52, 0.62, 0.72]) + _rows("random", [0.50, 0.52, 0.51]), "benchmark_accuracy")
    assert noisy.passed is False
    # a tiny gap with no spread still needs 0.03
    assert oracle_vs_random(_rows("oracle", [0.52] * 3) + _rows("random", [0.50] * 3), "benchmark_accuracy").passed is False
    two = oracle_vs_random(_rows("oracle", [0.62, 0.60]) + _rows("random", [0.50, 0.52]), "benchmark_accuracy")
    assert two.passed is None and "3 seeds each needed" in two.detail
    # runs at another ratio do not count
    assert oracle_vs_random(_rows("oracle", [0.6] * 3, ratio=0.3) + _rows("random", [0.5] * 3), "benchmark_accuracy").passed is None


def test_harness_check_full_vs_base_and_pope_yes_ratio():
    from align2llava.ops.harness import format_checks, harness_checks

    rows = (_rows("full", [0.56, 0.58], ratio=1.0) + _rows("base", [0.50], ratio=0.0, yes=1.0)
            + _rows("oracle", [0.6], yes=0.1) + _rows("random", [0.5], yes=0.8))
    oracle, full, pope = harness_checks(rows)
    assert full.passed is True and "gap +0.070" in full.detail
    assert harness_checks(_rows("full", [0.52], ratio=1.0) + _rows("base", [0.50], ratio=0.0))[1].passed is False
    # the base is not fine-tuned: its all-yes does not count; the oracle's 0.1 does, 0.8 is in range
    assert pope.passed is False and "3 of 4 runs in range" in pope.detail and "oracle seed 0: 0.10" in pope.detail
    text = format_checks([oracle, full, pope])
    assert text.count("\n") == 2 and "**not decided**" in text and "**NOT met**" in text


def test_harness_summary_reads_probe_rows_and_names_a_bad_line(tmp_path):
    from benchmarks.harness_summary import main

    f = tmp_path / "runs.jsonl"
    rows = [{"method": m, "seed": s, "benchmark_accuracy": a, "pope_yes_ratio": 0.5, "records": 10, "finetune_s": 60}
            for m, s, a in [("oracle", 0, 0.6), ("random", 0, 0.5), ("all", 0, 0.58), ("base", 0, 0.5)]]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = CliRunner().invoke(main, [str(f)])
    assert out.exit_code == 0, out.output
    assert "| full | 1.00 | 1 | 0.580 |" in out.output and "| base | 0.00 | 1 | 0.500 |" in out.output
    assert "full data beats the base (benchmark_accuracy): **met**" in out.output
    f.write_text(f.read_text() + "{oops\n")
    out = CliRunner().invoke(main, [str(f)])
    assert out.exit_code != 0 and f"{f}: line 5: not a harness-probe row" in out.output and "Traceback" not in out.output


def test_headline_checks_reward_against_random_and_full():
    from align2llava.ops.harness import headline_checks

    rows = (_rows("reward", [0.62, 0.60, 0.64]) + _rows("random", [0.50, 0.52, 0.51])
            + _rows("full", [0.61], ratio=1.0))
    beats, full = headline_checks(rows)
    assert beats.passed is True and "gap +0.110" in beats.detail and "at least" not in beats.detail
    assert full.passed is True and "gap +0.010" in full.detail
    # a full model above the curated one fails the second; no full run leaves it undecided
    assert headline_checks(rows[:6] + _rows("full", [0.65], ratio=1.0))[1].passed is False
    assert headline_checks(rows[:6])[1].passed is None
    # a small gap with no spread counts here (the 0.03 floor is the harness check's)
    assert headline_checks(_rows("reward", [0.52] * 3) + _rows("random", [0.51] * 3))[0].passed is True


def test_harness_summary_names_given_runs_by_their_data(tmp_path):
    from benchmarks.harness_summary import main

    f = tmp_path / "runs.jsonl"
    rows = [{"method": m, "data": d, "seed": s, "benchmark_accuracy": a, "pope_yes_ratio": 0.5, "records": 10,
             "finetune_s": 60, "keep_ratio": 0.09}
            for m, d, s, a in [("given", "sel.json", 0, 0.6), ("given", "sel.json", 1, 0.62), ("given", "sel.json", 2, 0.61),
                               ("random", None, 0, 0.5), ("random", None, 1, 0.52), ("random", None, 2, 0.51),
                               ("given", "cur.json", 0, 0.7)]]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = CliRunner().invoke(main, [str(f), "--name", "sel.json=reward"])
    assert out.exit_code == 0, out.output
    assert "reward beats random at 9% (benchmark_accuracy): **met**" in out.output
    assert "| given cur.json | 0.09 | 1 | 0.700 |" in out.output
    out = CliRunner().invoke(main, [str(f), "--name", "sel.json"])
    assert out.exit_code != 0 and "expected DATA=METHOD" in out.output and "Traceback" not in out.output


def test_wait_for_polls_again_after_a_failed_show_and_gives_up_after_the_retries():
    from align2llava.ops.experiments import SHOW_RETRIES, wait_for

    done = json.dumps(exp_show_doc([_exp("cmp-random-9-s0", "random", 0.09, 0, 0.5)]))
    answers = iter([Align2LlavaError("`dvc exp show` failed (exit 1): directory '.dvc/tmp/exps/tmp1/.dvc' does not exist"),
                    Align2LlavaError("failed again"), done])

    def flaky(cmd):
        got = next(answers)
        if isinstance(got, Exception):
            raise got
        return got

    sleeps = []
    exps = wait_for({"cmp-random-9-s0"}, runner=flaky, sleep=sleeps.append)
    assert [e["name"] for e in exps] == ["cmp-random-9-s0"] and len(sleeps) == 2

    def broken(cmd):
        raise Align2LlavaError("`dvc exp show` failed (exit 1): not a DVC repository")

    sleeps.clear()
    with pytest.raises(Align2LlavaError, match="not a DVC repository"):
        wait_for({"cmp-random-9-s0"}, runner=broken, sleep=sleeps.append)
    assert len(sleeps) == SHOW_RETRIES
