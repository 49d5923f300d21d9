"""MLflow grouping: the stages of one pipeline run nest under one parent run (docs/tracking.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from align2llava.ops.tracking import KEY_TAG, dvc_invocation, pipeline_key, stage_run
from tests.conftest import ROOT
from tests.test_pipeline import DVC


def runs_with_key(key: str):
    import mlflow

    return mlflow.search_runs(experiment_names=["align2llava"], output_format="list",
                              filter_string=f"tags.{KEY_TAG} = '{key}'")


def _stages(run_ids_by_stage):
    return {r.data.tags.get("stage"): r for r in run_ids_by_stage}


@pytest.fixture
def no_run_env(monkeypatch):
    for k in ("ALIGN2LLAVA_RUN", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE"):
        monkeypatch.delenv(k, raising=False)


def test_stages_of_one_experiment_share_a_parent(tmp_path, monkeypatch, no_run_env):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("select:\n  keep_ratio: 0.3\n")
    monkeypatch.setenv("DVC_EXP_NAME", "exp-grouped")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    with stage_run("select", {"select": {"keep_ratio": 0.3}}) as run:
        run.log_metrics({"kept": 9})
    with stage_run("restyle", {"restyle": {"enabled": True}}) as run:
        run.log_metrics({"accepted": 2})
    runs = _stages(runs_with_key("exp:exp-grouped@abc123"))
    assert set(runs) == {None, "select", "restyle"}  # the parent has no stage tag
    parent = runs[None]
    assert parent.data.tags["align2llava_role"] == "pipeline" and parent.info.status == "FINISHED"
    assert runs["select"].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert runs["restyle"].data.tags["mlflow.parentRunId"] == parent.info.run_id
    # The parent carries params.yaml and each stage's final metrics, prefixed by stage.
    assert parent.data.params["select.keep_ratio"] == "0.3"
    assert parent.data.metrics["select.kept"] == 9 and parent.data.metrics["restyle.accepted"] == 2

    # Another experiment: another parent.
    monkeypatch.setenv("DVC_EXP_NAME", "exp-other")
    with stage_run("select", {}) as run:
        run.log_metrics({"kept": 3})
    other = _stages(runs_with_key("exp:exp-other@abc123"))
    assert set(other) == {None, "select"} and other[None].info.run_id != parent.info.run_id


def test_failed_stage_marks_the_parent_failed(tmp_path, monkeypatch, no_run_env):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN2LLAVA_RUN", "nightly 7")  # sanitised into the key
    with pytest.raises(RuntimeError):
        with stage_run("score", {}):
            raise RuntimeError("boom")
    runs = _stages(runs_with_key("run:nightly_7"))
    assert runs["score"].info.status == "FAILED" and runs[None].info.status == "FAILED"
    with stage_run("score", {}):
        pass
    runs = runs_with_key("run:nightly_7")
    assert len([r for r in runs if r.data.tags.get("stage") == "score"]) == 2
    assert next(r for r in runs if r.data.tags.get("stage") is None).info.status == "FINISHED"


def test_run_key_precedence(tmp_path, monkeypatch, no_run_env):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("a: 1\n")
    key, how = pipeline_key("0123456789abcdef")
    assert key.startswith("config:0123456789ab:") and how == "git commit + params.yaml"
    (tmp_path / "params.yaml").write_text("a: 2\n")
    assert pipeline_key("0123456789abcdef")[0] != key  # other params, other parent
    monkeypatch.setenv("DVC_EXP_NAME", "e1")
    assert pipeline_key("x")[0] == "exp:e1@"
    monkeypatch.setenv("ALIGN2LLAVA_RUN", "mine")
    assert pipeline_key("x") == ("run:mine", "ALIGN2LLAVA_RUN")


def _fake_proc(root: Path, pid: int, ppid: int, argv: list[str], start: int) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    rest = ["S", str(ppid)] + ["0"] * 17 + [str(start)] + ["0"] * 5
    (d / "stat").write_text(f"{pid} (python3 (x)) " + " ".join(rest) + "\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


def test_dvc_invocation_walks_up_to_the_dvc_process(tmp_path, monkeypatch):
    proc = tmp_path / "proc"
    (proc / "sys/kernel/random").mkdir(parents=True)
    (proc / "sys/kernel/random/boot_id").write_text("deadbeef-0000\n")
    _fake_proc(proc, 100, 1, ["/usr/bin/bash"], 5)
    _fake_proc(proc, 200, 100, ["/venv/bin/python", "/venv/bin/dvc", "repro"], 777)
    _fake_proc(proc, 300, 200, ["/bin/sh", "-c", "python -m stages.select"], 800)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert dvc_invocation(proc, ppid=300) is None  # not started by DVC
    monkeypatch.setenv("DVC_STAGE", "select")
    assert dvc_invocation(proc, ppid=300) == "deadbeef:200:777"
    _fake_proc(proc, 400, 100, ["/bin/sh", "-c", "x"], 900)
    assert dvc_invocation(proc, ppid=400) is None  # no dvc among the ancestors


STAGE = """
import sys
from align2llava.ops.tracking import stage_run
with stage_run(sys.argv[1], {{}}, metrics_dir="metrics") as run:
    run.log_metrics({{"n": {n}}})
open(sys.argv[1] + ".done", "w").write("1")
"""


@pytest.mark.skipif(DVC is None or not Path("/proc/self/stat").exists(), reason="needs dvc and /proc (Linux)")
def test_dvc_repro_stages_nest_under_one_parent(tmp_path, no_run_env):
    """A real `dvc repro` of two stages, each its own process: both runs share one parent,
    keyed by the dvc process."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "stage.py").write_text(STAGE.format(n=1))
    spec = {"stages": {name: {"cmd": f"{sys.executable} stage.py {name}", "deps": ["stage.py"] + ([dep] if dep else []),
                              "outs": [f"{name}.done"], "metrics": [{f"metrics/{name}.json": {"cache": False}}]}
                       for name, dep in (("one", None), ("two", "one.done"))}}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([str(DVC), "init", "-q"], cwd=repo, check=True, env=env)
    out = subprocess.run([str(DVC), "repro"], cwd=repo, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr

    import mlflow

    runs = mlflow.search_runs(experiment_names=["align2llava"], output_format="list",
                              filter_string="tags.align2llava_run_key LIKE 'repro:%'")
    stages = [r for r in runs if r.data.tags.get("stage") in ("one", "two")]
    parents = {r.data.tags["mlflow.parentRunId"] for r in stages}
    assert len(stages) == 2 and len(parents) == 1
    parent = next(r for r in runs if r.info.run_id in parents)
    assert parent.data.metrics["one.n"] == 1 and parent.data.metrics["two.n"] == 1
    assert parent.data.tags["run_key_from"] == "dvc process"
