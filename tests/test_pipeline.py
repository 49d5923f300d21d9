"""dvc.yaml, params.yaml and stages/ agree; a param change makes only downstream stages stale."""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from tests.conftest import ROOT

_dvc = Path(sys.executable).parent / "dvc"
DVC = _dvc if _dvc.exists() else None
REQUIRED = ["annotate-import", "train-reward", "score", "select", "restyle", "finetune", "evaluate"]


def pipeline():
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def params():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def module_of(name: str) -> str:
    return "stages." + name.replace("-", "_")


def imported_modules(path: Path) -> set[str]:
    """The align2llava module files `path` imports, directly or through other modules (imports
    inside functions included). `load_metric("<name>")` in a module loads the Hugging Face
    `evaluate` module metrics/<name>/<name>.py next to it by path: that counts as an import."""
    seen: set[str] = set()
    todo = [path]
    while todo:
        current = todo.pop()
        tree = ast.parse(current.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "load_metric"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                name = node.args[0].value
                script = current.parent / "metrics" / name / f"{name}.py"
                assert script.is_file(), f"{current}: load_metric({name!r}) but no {script}"
                rel = str(script.relative_to(ROOT))
                if rel not in seen:
                    seen.add(rel)
                    todo.append(script)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("align2llava"):
                assert node.level == 0, f"{path}: relative import of {node.module}"
                base = node.module.replace(".", "/")
                candidates = [f"{base}.py"] + [f"{base}/{a.name}.py" for a in node.names]
                for rel in candidates:
                    if (ROOT / rel).is_file() and rel not in seen:
                        seen.add(rel)
                        todo.append(ROOT / rel)
    return seen


def test_package_inits_hold_no_code():
    """Importing a module runs its packages' __init__.py: they hold only a docstring (and the
    version), so the deps of a stage are exactly the module files it imports."""
    for init in (ROOT / "align2llava").rglob("__init__.py"):
        body = ast.parse(init.read_text()).body
        kinds = [type(n).__name__ for n in body]
        assert kinds in (["Expr"], ["Expr", "Assign"]), f"{init}: {kinds}"


def test_all_method_stages_are_declared():
    assert set(REQUIRED) <= set(pipeline())


@pytest.mark.parametrize("name", sorted(pipeline()))
def test_stage_is_consistent(name):
    stage = pipeline()[name]
    mod = module_of(name)
    script = ROOT / (mod.replace(".", "/") + ".py")
    assert stage["cmd"] in (f"python -m {mod}", f"${{base.launcher}} -m {mod}"), stage["cmd"]
    assert script.exists()
    deps = set(stage.get("deps", []))
    assert str(script.relative_to(ROOT)) in deps
    # The library modules the stage imports, transitively, are exactly its library deps.
    used = imported_modules(script)
    listed = {d for d in deps if d.startswith("align2llava/")}
    assert used - listed == set(), f"{name}: missing from deps: {sorted(used - listed)}"
    assert listed - used == set(), f"{name}: deps it does not import: {sorted(listed - used)}"
    # Params: `base` plus its own section, all present in params.yaml.
    # (or keys of `base` by name: instruct must not rerun when base.pool changes)
    sections = [(p if isinstance(p, str) else next(iter(p))).split(".")[0] for p in stage.get("params", [])]
    assert "base" in sections and name.replace("-", "_") in sections
    assert set(sections) <= set(params())


def test_every_params_section_is_used():
    used = {(p if isinstance(p, str) else next(iter(p))).split(".")[0] for s in pipeline().values()
            for p in s.get("params", [])}
    assert set(params()) == used


@pytest.mark.parametrize("name", sorted(pipeline()))
def test_stage_help(name):
    mod = importlib.import_module(module_of(name))
    res = CliRunner().invoke(mod.main, ["--help"])
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output and len(res.output.splitlines()) > 3


SHARED_OPTIONS = ["--params FILE", "--metrics-dir DIR", "-v, --verbose", "-h, --help"]


@pytest.mark.parametrize("name", sorted(pipeline()))
def test_stage_help_lists_the_shared_options(name):
    """Every stage names the same things alike, and logs under its module's name."""
    mod = importlib.import_module(module_of(name))
    res = CliRunner().invoke(mod.main, ["-h"])
    assert res.exit_code == 0, res.output
    opts = [line.split()[0].rstrip(",") for line in res.output.splitlines() if line.lstrip().startswith("-")]
    # a stage with outputs beyond its metrics file says where they go with --out-dir
    for opt in SHARED_OPTIONS + (["--out-dir DIR"] if pipeline()[name].get("outs") else []):
        assert opt in res.output, f"{name}: --help lacks {opt}"
    section = name.replace("-", "_")
    assert f"sections `base` and `{section}`" in res.output and f"Where {section}.json goes" in res.output
    # outputs are folders named --out-dir / --plots-dir, never --out or --plots
    assert not {"--out", "--plots", "--output"} & set(opts), opts
    assert mod.log.name == mod.__name__


@pytest.mark.parametrize("name", sorted(pipeline()))
def test_stage_refuses_unknown_param_key(name, tmp_path):
    section = name.replace("-", "_")
    data = params()
    data[section] = dict(data[section] or {}, no_such_key=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    mod = importlib.import_module(module_of(name))
    res = CliRunner().invoke(mod.main, ["--params", str(tmp_path / "params.yaml")])
    assert res.exit_code == 1
    assert f"unknown key '{section}.no_such_key'" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("name", sorted(pipeline()))
def test_stage_missing_input_is_one_line_error(name, tmp_path, monkeypatch):
    """Run in a folder holding only params.yaml: the first input it reads is missing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN2LLAVA_NO_MLFLOW", "1")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    mod = importlib.import_module(module_of(name))
    args = ["--source", str(tmp_path / "no-easy-vqa")] if name == "synthesize" else []
    res = CliRunner().invoke(mod.main, args)
    assert res.exit_code == 1, res.output
    assert res.output.startswith("Error: ") and len(res.output.strip().splitlines()) == 1, res.output
    assert "Traceback" not in res.output


def _git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


# Derives a stage's outputs from its declared deps (${section.key} resolved from params.yaml,
# as DVC does) and params.
STUB = """
import hashlib, json, pathlib, re, sys, yaml
name = sys.argv[1]
stage = yaml.safe_load(open("dvc.yaml"))["stages"][name]
params = yaml.safe_load(open("params.yaml"))
def resolve(text):
    def get(m):
        value = params
        for key in m.group(1).split("."):
            value = value[key]
        return str(value)
    return re.sub(r"\\$\\{([^}]+)\\}", get, text)
h = hashlib.sha1(json.dumps([params.get(s) for s in stage.get("params", [])], sort_keys=True).encode())
for dep in stage.get("deps", []):
    p = pathlib.Path(resolve(dep))
    for f in sorted([p] if p.is_file() else p.rglob("*")):
        if f.is_file():
            h.update(f.read_bytes())
# every dep of any stage inside a folder output is made too (models/train_reward/question)
inner = [resolve(d) for s in yaml.safe_load(open("dvc.yaml"))["stages"].values() for d in s.get("deps", [])]
for entry in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
    p = pathlib.Path(entry if isinstance(entry, str) else next(iter(entry)))
    if "." in p.name:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"h": h.hexdigest()}))
        continue
    for d in [p] + [pathlib.Path(d) for d in inner if pathlib.Path(d).parent == p]:
        d.mkdir(parents=True, exist_ok=True)
        (d / "out").write_text(json.dumps({"h": h.hexdigest()}))
"""


def test_param_change_reruns_only_downstream(tmp_path):
    """The real graph with each command swapped for a stub that derives its outputs from its
    declared deps and params: a select param change reruns select and what is downstream."""
    if DVC is None:
        pytest.skip("dvc not installed next to this python")
    repo = tmp_path / "repo"
    repo.mkdir()
    for item in ["params.yaml", "stages", "align2llava"]:
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / item)
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, stage in spec["stages"].items():
        stage["cmd"] = f"{sys.executable} stub.py {name}"
    (repo / "dvc.yaml").write_text(yaml.safe_dump(spec))
    (repo / "stub.py").write_text(STUB)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    _git(repo, "init", "-q")
    subprocess.run([str(DVC), "init", "-q"], cwd=repo, check=True, env=env)

    order: list[str] = []

    def repro():
        out = subprocess.run([str(DVC), "repro"], cwd=repo, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        order[:] = [line.split("'")[1] for line in out.stdout.splitlines() if line.startswith("Running stage")]
        return set(order)

    assert repro() == set(spec["stages"])
    # report does not depend on evaluate, but runs after it, so it shows this run's benchmark.
    assert order[-1] == "report" and order.index("evaluate") < order.index("report")
    assert repro() == set()
    data = params()
    data["select"]["keep_ratio"] = 0.5
    (repo / "params.yaml").write_text(yaml.safe_dump(data))
    assert repro() == {"select", "diagnose", "restyle", "finetune", "evaluate", "report"}
    # the demo diagnostics are a leaf: pointing them elsewhere reruns nothing of the method
    (repo / "elsewhere.jsonl").write_text("{}\n")
    data["diagnose"]["oracle"] = "elsewhere.jsonl"
    (repo / "params.yaml").write_text(yaml.safe_dump(data))
    assert repro() == {"diagnose"}
