"""MLflow run per stage, mirrored into metrics/<stage>.json for DVC.

    with stage_run("select", params) as run:
        run.log_metrics({"kept": 81})          # final metrics -> MLflow + metrics/select.json
        run.log_step({"loss": 0.3}, step=10)   # curves -> MLflow only
        run.log_text("prompt.txt", prompt)     # long texts as artifacts

The tracking store is $MLFLOW_TRACKING_URI, else a sqlite file `mlflow.db` at the repo root
(the original repo even when DVC runs the stage in a temporary experiment workspace).
Telemetry is off unless the user turns it on; nothing reaches the network.
"""

from __future__ import annotations

import json
import logging
import os
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

    def __init__(self, stage: str, mlflow_run: Any, metrics_dir: Path):
        self.stage = stage
        self.metrics: dict[str, Any] = {}
        self._run = mlflow_run
        self._metrics_dir = metrics_dir
        self._start = time.monotonic()

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
    mlflow.set_experiment(experiment)
    tags = {"stage": stage, "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "workspace")}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    name = f"{stage}@{tags['dvc_exp_name']}"
    with mlflow.start_run(run_name=name, tags=tags) as active:
        flat: dict[str, Any] = {}
        _flatten("", params, flat)
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
        mlflow.log_text(json.dumps(params, indent=2, sort_keys=True, default=str), "params.json")
        run = StageRun(stage, active, Path(metrics_dir))
        yield run
        run.log_resources()
        path = run.write_metrics()
        log.info("metrics -> %s and MLflow run %s (%s)", path, active.info.run_id, tracking_uri())
