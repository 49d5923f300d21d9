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

DOWNSTREAM_OF_SCORE = {"score", "select", "restyle", "finetune", "evaluate"}


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

    def repro():
        out = subprocess.run([str(DVC), "repro"], cwd=repo, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        return {line.split("'")[1] for line in out.stdout.splitlines() if line.startswith("Running stage")}

    assert repro() == set(spec["stages"])
    assert repro() == set()

    def edit(key):
        with open(files[key], "ab") as f:
            f.write(b" ")
        return repro()

    # the pool is read by score and select only: no reward model is retrained
    assert edit("pool") == DOWNSTREAM_OF_SCORE
    # annotations: imported again, both reward models retrained, everything after rerun
    assert edit("questions") == {"annotate-import", "train-reward"} | DOWNSTREAM_OF_SCORE
    assert edit("input") == {"annotate-import", "train-reward"} | DOWNSTREAM_OF_SCORE
    # the base model: every stage that loads it (not annotate-import, not the demo's stages)
    assert edit("model") == {"train-reward"} | DOWNSTREAM_OF_SCORE
    # an image: every stage that reads images under base.image_root
    assert edit("image") == {"annotate-import", "train-reward"} | DOWNSTREAM_OF_SCORE
