"""Sharing the curated dataset through a DVC remote, as docs/restyle.md shows: push, a fresh
clone pulls identical bytes, another repository imports it (`dvc import`, `dvc artifacts get`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from align2llava.data.io import write_records
from tests.conftest import ROOT, llava_record

DVC = Path(sys.executable).parent / "dvc"
pytestmark = pytest.mark.skipif(not DVC.exists(), reason="dvc not installed next to this python")


def _env(tmp_path: Path) -> dict[str, str]:
    who = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    return {**os.environ, **who, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp_path / "site")}


def _run(env, cwd, *args):
    cmd = [str(DVC), *args[1:]] if args[0] == "dvc" else list(args)
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(args)}: {out.stdout}{out.stderr}"
    return out.stdout


def test_curated_dataset_round_trips_through_a_local_dvc_remote(tmp_path):
    env = _env(tmp_path)
    team, remote = tmp_path / "team", tmp_path / "remote"
    team.mkdir()
    _run(env, team, "git", "init", "-q")
    _run(env, team, "dvc", "init", "-q")
    records = [llava_record(f"r{i}", task="detail", turns=[("What color is it?", f"It is red ({i}).")]) for i in range(5)]
    curated = write_records(records, team / "data" / "restyle" / "curated.json")
    _run(env, team, "dvc", "add", "-q", "data/restyle/curated.json")
    # the artifact declaration, exactly as in the project's dvc.yaml
    artifacts = {"artifacts": yaml.safe_load((ROOT / "dvc.yaml").read_text())["artifacts"]}
    (team / "dvc.yaml").write_text(yaml.safe_dump(artifacts))
    _run(env, team, "dvc", "remote", "add", "-q", "-d", "shared", str(remote))
    _run(env, team, "git", "add", "-A")
    _run(env, team, "git", "commit", "-qm", "curated dataset")
    _run(env, team, "git", "tag", "-a", "curated-dataset@v1.0.0", "-m", "first curated set")
    _run(env, team, "dvc", "push", "-q")
    assert any(p.is_file() for p in remote.rglob("*"))

    # a teammate: fresh clone, pull, identical bytes
    _run(env, tmp_path, "git", "clone", "-q", str(team), "clone")
    clone = tmp_path / "clone"
    assert not (clone / "data" / "restyle" / "curated.json").exists()
    _run(env, clone, "dvc", "pull", "-q")
    assert (clone / "data" / "restyle" / "curated.json").read_bytes() == curated.read_bytes()

    # another project: dvc import (tracks where it came from) and dvc artifacts get (by name)
    other = tmp_path / "other"
    other.mkdir()
    _run(env, other, "git", "init", "-q")
    _run(env, other, "dvc", "init", "-q")
    _run(env, other, "dvc", "import", "-q", str(team), "data/restyle/curated.json", "-o", "curated.json")
    assert (other / "curated.json").read_bytes() == curated.read_bytes()
    assert (other / "curated.json.dvc").exists()
    _run(env, other, "dvc", "artifacts", "get", str(team), "curated-dataset", "-o", "artifact.json")
    assert (other / "artifact.json").read_bytes() == curated.read_bytes()
