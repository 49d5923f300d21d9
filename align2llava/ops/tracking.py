"""MLflow run per stage, nested under one parent run per pipeline run, mirrored into
metrics/<stage>.json for DVC.

    with stage_run("select", params) as run:
        run.log_metrics({"kept": 81})          # final metrics -> MLflow + metrics/select.json
        run.log_step({"loss": 0.3}, step=10)   # curves -> MLflow only
        run.log_text("prompt.txt", prompt)     # long texts as artifacts

Every stage is a separate process; they find their common parent run by a run key
(`pipeline_key`, docs/tracking.md): $ALIGN2LLAVA_RUN when set, else the DVC experiment's name,
else the `dvc repro` process that started the stage, else the git commit + params.yaml. The
parent carries the params, each stage's final metrics as `<stage>.<name>` (so the MLflow UI
compares pipeline runs side by side) and the report's location.

The tracking store is $MLFLOW_TRACKING_URI, else a sqlite file `mlflow.db` at the repo root
(the original repo even when DVC runs the stage in a temporary experiment workspace), with
artifacts in mlruns/ beside the sqlite file. Telemetry is off unless the user turns it on; nothing reaches
the network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from align2llava.models.runtime import peak_rss_mb

log = logging.getLogger(__name__)

OFFLINE_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def offline_env() -> None:
    """Default every telemetry switch off and every hub offline (user settings win)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def repo_root(cwd: Path | None = None) -> Path:
    """The project root; inside `dvc exp run --queue` workspaces, the original repo's root."""
    cwd = (cwd or Path.cwd()).resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def artifact_root() -> str | None:
    """Where new experiments keep artifacts: mlruns/ beside a local sqlite store (MLflow's own
    default, ./mlruns under the working directory, would land in DVC's temporary experiment
    workspaces); None (the server's choice) for other stores."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()
    return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


class StageRun:
    """Handle for one stage's run: collects final metrics, forwards curves to MLflow."""

    def __init__(self, stage: str, mlflow_run: Any, metrics_dir: Path, parent_id: str | None = None):
        self.stage = stage
        self.metrics: dict[str, Any] = {}
        self._run = mlflow_run
        self._metrics_dir = metrics_dir
        self._start = time.monotonic()
        self.parent_id = parent_id

    def _to_parent(self, numeric: dict[str, float]) -> None:
        if self._run is None or self.parent_id is None or not numeric:
            return
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, 0) for k, v in numeric.items()]
        client = MlflowClient()
        for i in range(0, len(items), 500):
            client.log_batch(self.parent_id, metrics=items[i : i + 500])

    def log_resources(self) -> None:
        """`run.wall_seconds` (since the run opened) and `run.peak_rss_mb` (this process)."""
        self.log_metrics({"run": {"wall_seconds": round(time.monotonic() - self._start, 1),
                                  "peak_rss_mb": peak_rss_mb()}})

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        """Final metrics: kept for metrics/<stage>.json; numbers also go to MLflow."""
        self.metrics.update(metrics)
        numeric = {}
        _flatten("", metrics, numeric)
        numeric = {k: float(v) for k, v in numeric.items() if _is_number(v)}
        if numeric and self._run is not None:
            import mlflow

            mlflow.log_metrics(numeric)
            self._to_parent({f"{self.stage}.{k}": v for k, v in numeric.items()})

    def log_pipeline_metrics(self, by_stage: dict[str, dict[str, Any]]) -> None:
        """Other stages' final metrics (their metrics/<stage>.json) onto the parent run as
        `<stage>.<name>`, so a pipeline run whose upstream stages DVC skipped still shows them."""
        numeric: dict[str, Any] = {}
        for stage, metrics in by_stage.items():
            _flatten(stage, metrics, numeric)
        self._to_parent({k: float(v) for k, v in numeric.items() if _is_number(v)})

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        """A folder of files as artifacts of this stage's run."""
        if self._run is not None:
            import mlflow

            mlflow.log_artifacts(str(folder), artifact_path)

    def link_report(self, index: str | Path, artifact: str) -> None:
        """Tag this run and its parent with where the report is: the file in the workspace and
        the copy logged as the artifact `artifact` of this run."""
        if self._run is None:
            return
        import mlflow
        from mlflow.tracking import MlflowClient

        path = str(Path(index).resolve())
        uri = mlflow.get_artifact_uri(artifact)
        tags = {"report": path, "report_artifact": uri}
        mlflow.set_tags(tags)
        if self.parent_id is not None:
            client = MlflowClient()
            for k, v in tags.items():
                client.set_tag(self.parent_id, k, v)
            client.set_tag(self.parent_id, "mlflow.note.content",
                           f"Curation report: `{path}`; artifact `{artifact}` of the report stage's run "
                           f"{self._run.info.run_id} ({uri}).")

    def log_step(self, metrics: dict[str, float], step: int) -> None:
        """A point on a curve (loss, accuracy per step): MLflow only."""
        if self._run is not None:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_text(self, name: str, text: str) -> None:
        if self._run is not None:
            import mlflow

            mlflow.log_text(text, name)

    def write_metrics(self) -> Path:
        self._metrics_dir.mkdir(parents=True, exist_ok=True)
        path = self._metrics_dir / f"{self.stage}.json"
        path.write_text(json.dumps(self.metrics, indent=2, sort_keys=True) + "\n")
        return path


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@contextmanager
def stage_run(
    stage: str,
    params: dict[str, Any],
    *,
    metrics_dir: str | Path = "metrics",
    experiment: str = "align2llava",
) -> Iterator[StageRun]:
    """Open an MLflow run for `stage`, log `params` once, write metrics/<stage>.json at the end.

    Set ALIGN2LLAVA_NO_MLFLOW=1 to skip MLflow (metrics files are still written).
    """
    offline_env()
    if os.environ.get("ALIGN2LLAVA_NO_MLFLOW") == "1":
        run = StageRun(stage, None, Path(metrics_dir))
        yield run
        run.log_resources()
        run.write_metrics()
        return

    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri())
    experiment_id = _experiment(experiment)
    tags = {"stage": stage, "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "workspace"),
            ROLE_TAG: "stage"}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    parent = pipeline_parent(experiment_id, commit)
    tags[KEY_TAG] = parent.data.tags[KEY_TAG]
    name = f"{stage}@{tags['dvc_exp_name']}"
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    client.update_run(parent.info.run_id, status="RUNNING")
    status = "FAILED"
    try:
        with mlflow.start_run(run_name=name, tags=tags, nested=True, parent_run_id=parent.info.run_id,
                              experiment_id=experiment_id) as active:
            flat: dict[str, Any] = {}
            _flatten("", params, flat)
            mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
            mlflow.log_text(json.dumps(params, indent=2, sort_keys=True, default=str), "params.json")
            run = StageRun(stage, active, Path(metrics_dir), parent.info.run_id)
            yield run
            run.log_resources()
            path = run.write_metrics()
            log.info("metrics -> %s and MLflow run %s under %s (%s)", path, active.info.run_id,
                     parent.info.run_id, tracking_uri())
        status = "FINISHED"
    finally:
        client.set_terminated(parent.info.run_id, status)


# ----------------------------------------------------------------------------- the parent run

RUN_ENV = "ALIGN2LLAVA_RUN"
KEY_TAG = "align2llava_run_key"
ROLE_TAG = "align2llava_role"  # "pipeline" on the parent, "stage" on each stage's run


def _experiment(name: str) -> str:
    """The experiment's id, created on first use with its artifacts at `artifact_root()`."""
    import mlflow

    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_root())
    except Exception:  # created meanwhile by another stage process
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _proc_start(proc: Path, pid: int) -> tuple[int, str, list[str]] | None:
    """(parent pid, start time in clock ticks, argv) of a process, from /proc; None if gone."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
        argv = (proc / str(pid) / "cmdline").read_bytes().decode("utf-8", "replace").split("\0")
    except (OSError, ValueError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[1]), fields[19], [a for a in argv if a]


def _is_dvc(argv: list[str]) -> bool:
    if argv and Path(argv[0]).name == "dvc":
        return True
    if len(argv) > 1 and Path(argv[1]).name == "dvc":
        return True
    return len(argv) > 2 and argv[1] == "-m" and argv[2] == "dvc"


def dvc_invocation(proc: Path = Path("/proc"), ppid: int | None = None) -> str | None:
    """`<boot>:<pid>:<start>` of the `dvc` process (repro, exp run) that started this stage:
    DVC runs each stage command as its grandchild (dvc -> shell -> python). None when DVC did not
    start us ($DVC_STAGE unset) or there is no /proc (not Linux)."""
    if not os.environ.get("DVC_STAGE"):
        return None
    try:
        boot = (proc / "sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        boot = ""
    pid = os.getppid() if ppid is None else ppid
    for _ in range(16):
        if pid <= 1:
            return None
        info = _proc_start(proc, pid)
        if info is None:
            return None
        parent, start, argv = info
        if _is_dvc(argv):
            return f"{boot}:{pid}:{start}"
        pid = parent
    return None


def _params_hash(path: Path = Path("params.yaml")) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    except OSError:
        return "none"


def pipeline_key(commit: str | None = None) -> tuple[str, str]:
    """(run key, what it came from): which parent run a stage's run is nested under.

    1. $ALIGN2LLAVA_RUN, when set: the user's name for the run (one parent per value);
    2. $DVC_EXP_NAME (+ baseline commit), set by `dvc exp run`: one parent per experiment;
    3. the `dvc repro` process that started the stage: one parent per repro;
    4. else (a stage run by hand): the git commit and a hash of ./params.yaml.
    """
    user = os.environ.get(RUN_ENV, "").strip()
    if user:
        return f"run:{re.sub(r'[^A-Za-z0-9._:@/+-]', '_', user)[:200]}", RUN_ENV
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        base = os.environ.get("DVC_EXP_BASELINE_REV", "")[:12]
        return f"exp:{re.sub(r'[^A-Za-z0-9._:@/+-]', '_', exp)}@{base}", "DVC_EXP_NAME"
    dvc = dvc_invocation()
    if dvc:
        return f"repro:{dvc}", "dvc process"
    return f"config:{(commit or 'nogit')[:12]}:{_params_hash()}", "git commit + params.yaml"


def _run_name(key: str, how: str, commit: str | None) -> str:
    short = (commit or "nogit")[:7]
    if how == "DVC_EXP_NAME":
        return f"pipeline {os.environ.get('DVC_EXP_NAME')}"
    if how == RUN_ENV:
        return f"pipeline {os.environ.get(RUN_ENV, '').strip()}"
    if how == "dvc process":
        return f"pipeline repro {short} {time.strftime('%Y-%m-%d %H:%M')}"
    return f"pipeline stages {short}"


def pipeline_parent(experiment_id: str, commit: str | None) -> Any:
    """The parent run of this pipeline run (pipeline_key), created with the params on first use."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    key, how = pipeline_key(commit)
    client = MlflowClient()
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.{KEY_TAG} = '{key}' and tags.{ROLE_TAG} = 'pipeline'",
        max_results=1, order_by=["attributes.start_time DESC"])
    if found:
        return found[0]
    tags = {KEY_TAG: key, ROLE_TAG: "pipeline", "run_key_from": how,
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "workspace")}
    if commit:
        tags["git_commit"] = commit
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc_exp_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    run = client.create_run(experiment_id, run_name=_run_name(key, how, commit), tags=tags)
    flat: dict[str, Any] = {}
    try:
        from align2llava.config import read_params

        _flatten("", read_params(), flat)
    except Exception:  # no params.yaml here (a stage run elsewhere): the stages log their own
        flat = {}
    items = [Param(k, str(v)[:500]) for k, v in flat.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    log.info("MLflow parent run %s for %s (%s)", run.info.run_id, key, how)
    return client.get_run(run.info.run_id)
