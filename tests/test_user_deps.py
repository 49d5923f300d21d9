"""dvc.yaml's deps follow params: a user's pool, images, annotations and base model, anywhere on
the machine, are deps of exactly the stages that read them (through ${...} interpolation)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.test_pipeline import DVC, STUB, _git

# what editing the pool reruns: score and what follows it, and the stages that read the pool too
DOWNSTREAM_OF_SCORE = {"annotation-tasks", "score", "select", "diagnose", "restyle", "finetune", "evaluate", "report"}


def _user_files(user: Path) -> dict[str, Path]:
    (user / "images").mkdir(parents=True)
    (user / "images" / "a.png").write_bytes(b"png a")
    (user / "annotations").mkdir()
    files = {
        "pool": user / "pool.jsonl",
        "questions": user / "annotations" / "question.json",
        "answers": user / "annotations" / "answer.json",
        "input": user / "annotations" / "labelstudio.json",
        "model": user / "llava" / "config.json",
        "image": user / "images" / "a.png",
    }
    (user / "llava").mkdir()
    for key in ("pool", "questions", "answers", "input", "model"):
        files[key].write_text(json.dumps({"file": key}))
    return files


def test_editing_a_users_file_reruns_exactly_what_reads_it(tmp_path):
    """Each user file is a dep of exactly the stages that read it, wherever it lives."""
    if DVC is None:
        pytest.skip("dvc not installed next to this python")
    repo, user = tmp_path / "repo", tmp_path / "user"
    repo.mkdir()
    for item in ["params.yaml", "stages", "align2llava"]:
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / item)
    files = _user_files(user)
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["base"].update(pool=str(files["pool"]), image_root=str(user / "images"), base_model=str(user / "llava"))
    data["annotate_import"].update(questions=str(files["questions"]), answers=str(files["answers"]),
                                   input=str(files["input"]))
    (repo / "params.yaml").write_text(yaml.safe_dump(data))
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, stage in spec["stages"].items():
        stage["cmd"] = f"{sys.executable} stub.py {name}"
    (repo / "dvc.yaml").write_text(yaml.safe_dump(spec))
    (repo / "stub.py").write_text(STUB)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    _git(repo, "init", "-q")
    subprocess.run([str(DVC), "init", "-q"], cwd=repo, check=True, env=env)

    def run(*args):
        out = subprocess.run([str(DVC), *args], cwd=repo, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    ran = {line.split("'")[1] for line in run("repro").splitlines() if line.startswith("Running stage")}
    assert ran == set(spec["stages"])

    def readers(key):
        """The stages whose deps change when the user edits `key`'s file (then put back)."""
        before = files[key].read_bytes()
        files[key].write_bytes(before + b" ")
        try:
            return set(json.loads(run("status", "--json")))
        finally:
            files[key].write_bytes(before)

    # no reward model is retrained; annotation-tasks samples the pool, diagnose and report read it
    assert readers("pool") == {"annotation-tasks", "score", "select", "diagnose", "report"}
    assert readers("questions") == {"annotate-import"}
    assert readers("input") == {"annotate-import"}
    # the reward models read models/instruct, the instruct stage's output, made from the model
    assert readers("model") == {"annotation-tasks", "instruct", "restyle", "finetune"}
    assert readers("image") == {"annotation-tasks", "annotate-import", "train-reward", "score", "finetune",
                                "evaluate", "report"}
    assert json.loads(run("status", "--json")) == {}
    # and an edit reruns its readers and what follows them
    files["pool"].write_bytes(files["pool"].read_bytes() + b" ")
    ran = {line.split("'")[1] for line in run("repro").splitlines() if line.startswith("Running stage")}
    assert ran == DOWNSTREAM_OF_SCORE
