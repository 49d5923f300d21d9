"""The compression experiment: does the curated ~9% train a better model than all the data, and
than a random subset of the same size?

    align2llava compression --ratios 0.09,0.3 --seeds 0,1,2

queues one `dvc exp run --queue` per (method, keep ratio, seed), runs the queue, then collects
every run's metrics from `dvc exp show --json` into reports/compression.csv and prints mean +- std
per method and ratio. Methods (what the runs set with `-S`):

| method       | select.method | restyle.enabled | what it is                                      |
| ------------ | ------------- | --------------- | ----------------------------------------------- |
| `reward`     | reward        | true            | Align²LLaVA: reward-model selection + restyle    |
| `reward_raw` | reward        | false           | the selection alone (ablation)                  |
| `random`     | random        | false           | random subset, same per-type counts, raw text   |
| `full`       | all           | false           | all the data, raw text (keep ratio 1)           |

The overall keep ratio r is split evenly between the two selection stages: alpha = beta =
sqrt(r) (the paper's 0.3 x 0.3 = 9%). Seeds go to select.seed (the random subset) and
finetune.seed (LoRA init and data order) so that one seed varies both without rerunning the
reward models. Baselines skip restyle: users compare the method against the data they already
have, and restyling all of it is the most expensive step; `reward_raw` separates what selection
and restyle each contribute.

The collection (`experiment_rows`, `summarize`, `format_table`) works on the parsed JSON alone,
so it is tested without DVC.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align2llava.data.io import write_csv
from align2llava.errors import Align2LlavaError
from align2llava.ops.harness import format_checks, harness_checks, headline_checks

log = logging.getLogger(__name__)

METHODS = {
    # method: (select.method, restyle.enabled)
    "reward": ("reward", True),
    "reward_raw": ("reward", False),
    "random": ("random", False),
    "full": ("all", False),
    # demo diagnostics: the records the demo oracle marks clean first (an upper bound for the
    # harness, never the method)
    "oracle": ("oracle", False),
    # the base model, not fine-tuned (keep ratio 0; one run, it does not depend on a seed)
    "base": ("all", False),
}
DEFAULT_METHODS = ("reward", "random", "full")
PREFIX = "cmp"

# CSV columns: (column, stage, metric key)
METRIC_COLUMNS = [
    ("benchmark_accuracy", "evaluate", "benchmark_accuracy"),
    ("benchmark_accuracy_shape", "evaluate", "benchmark_accuracy_shape"),
    ("benchmark_accuracy_color", "evaluate", "benchmark_accuracy_color"),
    ("benchmark_accuracy_yes_no", "evaluate", "benchmark_accuracy_yes_no"),
    ("pope_accuracy", "evaluate", "pope_accuracy"),
    ("pope_f1", "evaluate", "pope_f1"),
    ("pope_yes_ratio", "evaluate", "pope_yes_ratio"),
    ("benchmark_likelihood_accuracy", "evaluate", "benchmark_likelihood_accuracy"),
    ("benchmark_likelihood_accuracy_shape", "evaluate", "benchmark_likelihood_accuracy_shape"),
    ("benchmark_likelihood_accuracy_color", "evaluate", "benchmark_likelihood_accuracy_color"),
    ("benchmark_likelihood_accuracy_yes_no", "evaluate", "benchmark_likelihood_accuracy_yes_no"),
    ("pope_likelihood_accuracy", "evaluate", "pope_likelihood_accuracy"),
    ("pope_likelihood_f1", "evaluate", "pope_likelihood_f1"),
    ("pope_likelihood_yes_ratio", "evaluate", "pope_likelihood_yes_ratio"),
    ("train_records", "finetune", "train_records"),
    ("train_loss", "finetune", "train_loss"),
    ("train_seconds", "finetune", "train_seconds"),
    ("finetune_peak_rss_mb", "finetune", "peak_rss_mb"),
    ("eval_seconds", "evaluate", "eval_seconds"),
    ("restyle_seconds", "restyle", "seconds"),
]
COLUMNS = ["method", "keep_ratio", "seed"] + [c for c, _, _ in METRIC_COLUMNS] + ["experiment", "rev"]
SUMMARY_METRICS = ["benchmark_accuracy", "pope_f1", "pope_accuracy", "benchmark_likelihood_accuracy", "pope_likelihood_f1",
                   "train_records", "train_seconds"]


@dataclass(frozen=True)
class RunSpec:
    method: str
    keep_ratio: float
    seed: int
    prefix: str = PREFIX
    # the method's own `-S` overrides (e.g. full data for one epoch), after the method's settings
    extra: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        pct = f"{self.keep_ratio * 100:g}".replace(".", "p")
        return f"{self.prefix}-{self.method.replace('_', '-')}-{pct}-s{self.seed}"

    def set_params(self) -> dict[str, Any]:
        select_method, restyle = METHODS[self.method]
        alpha = beta = 1.0 if self.method in ("full", "base") else round(math.sqrt(self.keep_ratio), 6)
        out = {
            "select.method": select_method,
            "select.question_keep_ratio": alpha,
            "select.keep_ratio": beta,
            "select.seed": self.seed,
            "finetune.seed": self.seed,
            "restyle.enabled": restyle,
        }
        if self.method == "base":
            out["finetune.mode"] = "none"
        out.update(self.extra)
        return out


def parse_list(text: str, kind: type) -> list[Any]:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise Align2LlavaError(f"cannot read {text!r} as a comma-separated list of {kind.__name__}") from None


def parse_overrides(items: Iterable[str]) -> dict[str, dict[str, str]]:
    """`METHOD:SECTION.KEY=VALUE` strings (the CLI's --set) as {method: {key: value}}."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        m = re.fullmatch(r"([a-z_]+):([A-Za-z_][\w.]*\.[\w]+)=(.*)", item.strip())
        if m is None:
            raise Align2LlavaError(f"--set {item!r}: expected METHOD:SECTION.KEY=VALUE "
                                   "(e.g. full:finetune.num_train_epochs=1)")
        method, key, value = m.groups()
        if method not in METHODS:
            raise Align2LlavaError(f"--set {item!r}: unknown method {method!r} (choose from {', '.join(METHODS)})")
        out.setdefault(method, {})[key] = value
    return out


def plan_runs(ratios: Iterable[float], seeds: Iterable[int], methods: Iterable[str] = DEFAULT_METHODS,
              prefix: str = PREFIX, overrides: dict[str, dict[str, str]] | None = None) -> list[RunSpec]:
    """One run per (method, ratio, seed); `full` once per seed (its keep ratio is 1); `base` once
    (keep ratio 0, first seed: nothing in it depends on a seed). `overrides` adds a method's own
    params to its runs ({"full": {"finetune.num_train_epochs": "1"}})."""
    ratios, seeds, methods = list(ratios), list(seeds), list(methods)
    overrides = overrides or {}
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise Align2LlavaError(f"unknown method {unknown[0]!r} (choose from {', '.join(METHODS)})")
    idle = [m for m in overrides if m not in methods]  # unknown ones included
    if idle:
        raise Align2LlavaError(f"--set names method {idle[0]!r}, which is not among the methods run")
    bad = [r for r in ratios if not 0.0 < r <= 1.0]
    if bad:
        raise Align2LlavaError(f"keep ratio {bad[0]} is not in (0, 1]")
    if not seeds:
        raise Align2LlavaError("no seeds given")
    runs = []
    for seed in seeds:
        for method in methods:
            extra = tuple(sorted(overrides.get(method, {}).items()))
            if method == "base":
                if seed == seeds[0]:
                    runs.append(RunSpec(method, 0.0, seed, prefix, extra))
                continue
            for ratio in [1.0] if method == "full" else ratios:
                runs.append(RunSpec(method, ratio, seed, prefix, extra))
    return runs


def _override(value: Any) -> str:
    """A value as `dvc exp run -S` (Hydra override syntax) reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def queue_command(run: RunSpec, dvc: str = "dvc") -> list[str]:
    cmd = [dvc, "exp", "run", "--queue", "-n", run.name]
    for key, value in run.set_params().items():
        cmd += ["-S", f"{key}={_override(value)}"]
    return cmd


# ---------------------------------------------------------------------------- collection


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def parse_exp_show(data: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Experiments in `dvc exp show --json` output: name, rev, baseline, state, params, metrics.

    params: flat "section.key" from params.yaml; metrics: {stage: {key: value}} with the stage
    taken from the metrics file name (metrics/evaluate.json -> evaluate).
    """
    out = []
    for baseline in data:
        for exp in baseline.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state")
            for rev in exp.get("revs") or []:
                body = rev.get("data") or {}
                params: dict[str, Any] = {}
                for file_data in (body.get("params") or {}).values():
                    _flatten("", (file_data or {}).get("data") or {}, params)
                metrics = {
                    Path(path).stem: (m or {}).get("data") or {}
                    for path, m in (body.get("metrics") or {}).items()
                }
                out.append({
                    "name": rev.get("name") or exp.get("name"),
                    "rev": rev.get("rev"),
                    "baseline": baseline.get("rev"),
                    "state": "failed" if rev.get("error") else (state or "success"),
                    "params": params,
                    "metrics": metrics,
                })
    return out


def method_of(params: dict[str, Any]) -> str | None:
    select, restyle = params.get("select.method"), bool(params.get("restyle.enabled", True))
    if params.get("finetune.mode") == "none":
        return "base"
    for name, (m, r) in METHODS.items():
        if name == "base":
            continue
        if m == select and r == restyle:
            return name
    return None


def experiment_rows(experiments: list[dict[str, Any]], prefix: str = PREFIX) -> list[dict[str, Any]]:
    """One CSV row per successful experiment named `<prefix>-...`; method, ratio and seed are
    read from its params (not its name)."""
    rows = []
    for exp in experiments:
        if not (exp["name"] or "").startswith(prefix + "-") or exp["state"] != "success":
            continue
        p = exp["params"]
        method = method_of(p)
        if method is None:
            continue
        ratio = 1.0 if method == "full" else 0.0 if method == "base" else p.get("select.question_keep_ratio", 1.0) * p.get("select.keep_ratio", 1.0)
        row: dict[str, Any] = {
            "method": method,
            "keep_ratio": round(ratio, 4),
            "seed": p.get("finetune.seed"),
        }
        for col, stage, key in METRIC_COLUMNS:
            row[col] = exp["metrics"].get(stage, {}).get(key)
        row["experiment"], row["rev"] = exp["name"], (exp["rev"] or "")[:10]
        rows.append(row)
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (order[r["method"]], r["keep_ratio"], r["seed"] if r["seed"] is not None else -1))
    return rows


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std


def summarize(rows: list[dict[str, Any]], metrics: list[str] = SUMMARY_METRICS) -> list[dict[str, Any]]:
    """Mean and std of each metric per (method, keep_ratio), with the number of seeds."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["keep_ratio"]), []).append(r)
    out = []
    for (method, ratio), rs in groups.items():
        item: dict[str, Any] = {"method": method, "keep_ratio": ratio, "seeds": len(rs)}
        for m in metrics:
            vals = [float(r[m]) for r in rs if r.get(m) is not None]
            item[m] = mean_std(vals) if vals else None
        out.append(item)
    return out


def format_table(summary: list[dict[str, Any]], metrics: list[str] = SUMMARY_METRICS) -> str:
    """A Markdown table: one line per (method, keep ratio), mean +- std per metric."""
    head = ["method", "keep ratio", "seeds"] + metrics
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [s["method"], f"{s['keep_ratio']:.2f}", str(s["seeds"])]
        for m in metrics:
            v = s.get(m)
            if v is None:
                cells.append("")
            elif m in ("train_records",):
                cells.append(f"{v[0]:.0f}")
            elif m.endswith("seconds"):
                cells.append(f"{v[0]:.0f}" + ("" if v[1] is None else f" +- {v[1]:.0f}"))
            else:
                cells.append(f"{v[0]:.3f}" + ("" if v[1] is None else f" +- {v[1]:.3f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- running DVC


Runner = Callable[[list[str]], str]


def run_cmd(cmd: list[str]) -> str:
    """Run a command; its stdout, or an error with the last lines of its output.

    This interpreter's folder goes first on PATH, so that the queue workers DVC starts run the
    stages' `python -m stages...` with this environment's python. Output goes through temporary
    files, not pipes: `dvc queue start` leaves a worker running that inherits them, and a pipe
    would make this call wait for the whole queue.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.run(cmd, stdout=out, stderr=err, text=True, env=env)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        tail = "\n".join((stdout + stderr).strip().splitlines()[-5:])
        raise Align2LlavaError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {tail}")
    return stdout


def exp_show(runner: Runner = run_cmd, dvc: str = "dvc", rev: str | None = None) -> list[dict[str, Any]]:
    cmd = [dvc, "exp", "show", "--json", "--no-pager"] + (["--rev", rev] if rev else [])
    text = runner(cmd)
    try:
        return parse_exp_show(json.loads(text))
    except json.JSONDecodeError as exc:
        raise Align2LlavaError(f"`dvc exp show --json` printed something that is not JSON: {exc}") from None


def queue_runs(runs: list[RunSpec], existing: set[str], runner: Runner = run_cmd, dvc: str = "dvc") -> list[RunSpec]:
    """Queue the runs not already present (finished or queued) as experiments; returns them."""
    queued = []
    for run in runs:
        if run.name in existing:
            log.info("%s: already there, not queued again", run.name)
            continue
        runner(queue_command(run, dvc))
        queued.append(run)
        log.info("queued %s: %s", run.name, " ".join(f"-S {k}={_override(v)}" for k, v in run.set_params().items()))
    return queued


# consecutive failed polls of `dvc exp show` that wait_for lets pass (its docstring)
SHOW_RETRIES = 5


def wait_for(names: set[str], *, runner: Runner = run_cmd, dvc: str = "dvc", rev: str | None = None,
             poll_s: float = 30.0, timeout_s: float | None = None, sleep: Callable[[float], None] = time.sleep) -> list[dict[str, Any]]:
    """Poll `dvc exp show` until none of `names` is queued or running; returns the experiments.

    A poll that fails is tried again at the next one, up to `SHOW_RETRIES` in a row: `dvc exp
    show` fails now and then while a queue worker sets up or removes a run's temporary folder
    ("directory '.dvc/tmp/exps/tmp.../.dvc' does not exist"), and the runs go on regardless."""
    start = time.monotonic()
    last = None
    failures = 0
    while True:
        try:
            shown = exp_show(runner, dvc, rev)
        except Align2LlavaError as exc:
            failures += 1
            if failures > SHOW_RETRIES:
                raise
            log.warning("dvc exp show failed (%d of %d tries in a row), polling again: %s", failures,
                        SHOW_RETRIES + 1, str(exc).splitlines()[-1])
            sleep(poll_s)
            continue
        failures = 0
        exps = [e for e in shown if e["name"] in names]
        states = [e["state"] for e in exps]
        pending = sum(s in ("queued", "running") for s in states) + len(names - {e["name"] for e in exps})
        done = sum(s == "success" for s in states)
        failed = sum(s == "failed" for s in states)
        status = (done, failed, pending)
        if status != last:
            log.info("experiments: %d done, %d failed, %d to go (%.0f min)", done, failed, pending,
                     (time.monotonic() - start) / 60)
            last = status
        if pending == 0:
            return exps
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise Align2LlavaError(f"experiments still running after {timeout_s:.0f} s; collect later with --collect-only")
        sleep(poll_s)


def baseline_rev(runner: Runner = run_cmd) -> str:
    return runner(["git", "rev-parse", "HEAD"]).strip()



@dataclass
class CompressionResult:
    runs: list[RunSpec]
    rows: list[dict[str, Any]]
    table: str
    failed: list[str]
    checks: str = ""


def compression(
    ratios: list[float],
    seeds: list[int],
    methods: list[str],
    *,
    out_csv: str | Path = "reports/compression.csv",
    out_md: str | Path | None = "reports/compression.md",
    jobs: int = 1,
    prefix: str = PREFIX,
    collect_only: bool = False,
    rev: str | None = None,
    poll_s: float = 30.0,
    timeout_s: float | None = None,
    command_line: str = "",
    runner: Runner = run_cmd,
    dvc: str = "dvc",
    overrides: dict[str, dict[str, str]] | None = None,
) -> CompressionResult:
    """Queue the missing runs (failed ones again), run the queue, wait, collect, write reports.
    A run already finished under its name is reused as it is, whatever `overrides` now say."""
    runs = plan_runs(ratios, seeds, methods, prefix, overrides)
    names = {r.name for r in runs}
    if not collect_only:
        current = {e["name"]: e["state"] for e in exp_show(runner, dvc, rev)}
        failed_before = [n for n in names if current.get(n) == "failed"]
        if failed_before:
            runner([dvc, "exp", "remove", *sorted(failed_before)])
            log.info("removed %d failed runs to queue them again", len(failed_before))
        keep = {n for n, s in current.items() if s in ("success", "queued", "running")}
        queued = queue_runs(runs, keep, runner, dvc)
        if queued or any(current.get(n) in ("queued", "running") for n in names):
            runner([dvc, "queue", "start", "-j", str(jobs)])
            log.info("started %d queue worker(s) for %d runs", jobs, len(queued))
        wait_for(names, runner=runner, dvc=dvc, rev=rev, poll_s=poll_s, timeout_s=timeout_s)
    exps = [e for e in exp_show(runner, dvc, rev) if e["name"] in names]
    failed = sorted(e["name"] for e in exps if e["state"] == "failed")
    rows = experiment_rows(exps, prefix)
    if not rows:
        raise Align2LlavaError(
            f"no finished experiments named {prefix}-* at this baseline"
            + (f" ({len(failed)} failed: see `dvc queue logs {failed[0]}`)" if failed else "")
        )
    write_csv(rows, out_csv, COLUMNS)
    table = format_table(summarize(rows))
    checks = format_checks(harness_checks(rows))
    headline = format_checks(headline_checks(rows))
    if out_md:
        Path(out_md).write_text(
            "# Compression experiment\n\n"
            + (f"Made by `{command_line}`.\n\n" if command_line else "")
            + table + "\n\n"
            + f"Per run: `{out_csv}`. Mean +- sample std over seeds.\n\n"
            + "## Harness check (can the experiment see data quality?)\n\n" + checks + "\n"
            + "\n## Headline (does the reward-curated subset beat random and full data?)\n\n" + headline + "\n"
            + (f"\nFailed runs: {', '.join(failed)}\n" if failed else ""),
            encoding="utf-8",
        )
    return CompressionResult(runs, rows, table, failed, checks)
