"""Strict params loading and the per-stage tracking helper."""

from __future__ import annotations

import json

import pytest

from align2llava.config import BaseParams, Section, load_section
from align2llava.errors import ConfigError
from align2llava.ops.tracking import repo_root, stage_run


class Demo(Section):
    ratio: float = 0.3
    name: str = "x"


def write(tmp_path, text):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def test_load_section_typed(tmp_path):
    p = write(tmp_path, "demo:\n  ratio: 2.0e-5\n")
    assert load_section("demo", Demo, p).ratio == pytest.approx(2e-5)


@pytest.mark.parametrize("text,expected", [
    ("demo:\n  ratoi: 0.1\n", "unknown key 'demo.ratoi'"),
    ("demo:\n  ratio: abc\n", "demo.ratio:"),
    ("other: {}\n", "missing section 'demo'"),
    ("demo: [1, 2]\n", "section 'demo' must be a mapping"),
    ("demo: {a: [\n", "not valid YAML"),
])
def test_bad_params_name_file_and_key(tmp_path, text, expected):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match=expected) as err:
        load_section("demo", Demo, p)
    assert str(p) in str(err.value) and "\n" not in str(err.value)


def test_repo_params_base_section_loads():
    from tests.conftest import ROOT

    base = load_section("base", BaseParams, ROOT / "params.yaml")
    assert base.base_model


def test_stage_run_writes_metrics_and_mlflow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")
    with stage_run("select", {"select": {"keep_ratio": 0.3}}) as run:
        run.log_step({"loss": 1.0}, step=0)
        run.log_metrics({"kept": 9, "per_type": {"detail": 3}, "note": "ok"})
    data = json.loads((tmp_path / "metrics" / "select.json").read_text())
    resources = data.pop("run")
    assert data == {"kept": 9, "per_type": {"detail": 3}, "note": "ok"}
    assert set(resources) == {"wall_seconds", "peak_rss_mb"} and resources["peak_rss_mb"] > 10

    import mlflow

    runs = mlflow.search_runs(experiment_names=["align2llava"], output_format="list")
    r = runs[0]
    assert r.data.tags["stage"] == "select" and r.data.tags["dvc_exp_name"] == "exp-1"
    assert r.data.params["select.keep_ratio"] == "0.3"
    assert r.data.metrics["kept"] == 9 and r.data.metrics["per_type.detail"] == 3
    assert r.data.metrics["run.peak_rss_mb"] == resources["peak_rss_mb"]


def test_repo_root_inside_dvc_queue_workspace(tmp_path):
    ws = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "run" / "abc"
    assert repo_root(ws) == tmp_path / "proj"
    assert repo_root(tmp_path) == tmp_path


def _sections() -> dict[str, type[Section]]:
    """Every params section's class, from the one registry (align2llava.ops.preset)."""
    from align2llava.ops.preset import SECTIONS, section_model

    return {name: section_model(name) for name in SECTIONS}


def test_every_params_section_has_a_class():
    from align2llava.config import read_params
    from tests.conftest import ROOT

    assert set(_sections()) == set(read_params(ROOT / "params.yaml"))


# Keys whose params.yaml value is the demo's input file, where null means "none given": the
# annotation files and finetune.mix. A default naming the demo's file would make a params.yaml
# that leaves the key out read the demo's simulated annotations into the user's pairs, or train
# the user's model on the demo's shapes, without a word; with null, the kind is skipped or the
# format's check says "needs an input file", and finetune trains on the selection alone. Other
# repo paths (base.pool, score.question_model, evaluate.vqa_file, ...) are defaults: leaving
# them out points at the same layout the stages' --out-dir defaults write.
DEMO_INPUT_FILES = {"annotate_import": {"questions", "answers", "input", "tasks"}, "finetune": {"mix"}}


@pytest.mark.parametrize("name", sorted(_sections()))
def test_code_defaults_equal_params_yaml(name):
    """Section() is what params.yaml says, so code that builds a section without the file (a
    library call, a notebook) gets the demo's values; the paper's settings are comments (params.yaml,
    the classes, docs/method.md)."""
    from align2llava.config import parse_section, read_params
    from tests.conftest import ROOT

    cls = _sections()[name]
    committed = parse_section(read_params(ROOT / "params.yaml")[name], name, cls)
    want, got = committed.model_dump(), cls().model_dump()
    excluded = DEMO_INPUT_FILES.get(name, set())
    assert all(got[k] is None and want[k] for k in excluded)
    # json text tells 3 from 3.0 (an int default where params.yaml holds a float)
    differ = {k: (got[k], want[k]) for k in want if k not in excluded and json.dumps(got[k]) != json.dumps(want[k])}
    assert differ == {}, f"{name}: (code default, params.yaml value): {differ}"
    assert cls().model_copy(update={k: want[k] for k in excluded}) == committed
