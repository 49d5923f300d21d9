"""Params presets: overlays of params.yaml (configs/params/*.yaml), applied with comments kept.

    align2llava preset configs/params/llava-1.5-7b.yaml --dry-run
    align2llava preset configs/params/llava-1.5-7b.yaml

A preset holds some keys of some sections; each replaces that key in params.yaml. Every section
of the result is then loaded strictly, as the stages load it (an unknown or mistyped key is an
error), before params.yaml is written.
"""

from __future__ import annotations

import importlib
import io
from pathlib import Path
from typing import Any

from align2llava.config import parse_section
from align2llava.errors import ConfigError

SECTIONS = {
    "base": "align2llava.config:BaseParams",
    "synthesize": "align2llava.demo.synthesis.params:SynthesizeParams",
    "pretrain": "align2llava.demo.pretrain.pretrain:PretrainParams",
    "instruct": "align2llava.demo.instruct:InstructParams",
    "annotate_import": "align2llava.steps.annotations.importer:AnnotateImportParams",
    "train_reward": "align2llava.steps.reward_training.train:TrainRewardParams",
    "score": "align2llava.steps.scoring:ScoreParams",
    "select": "align2llava.steps.selection:SelectParams",
    "restyle": "align2llava.steps.restyle.restyle:RestyleParams",
    "finetune": "align2llava.steps.finetune.train:FinetuneParams",
    "evaluate": "align2llava.steps.evaluation.evaluation:EvaluateParams",
    "annotation_tasks": "align2llava.steps.annotations.tasks:AnnotationTasksParams",
    "diagnose": "align2llava.demo.diagnostics:DiagnoseParams",
    "report": "align2llava.report.report:ReportParams",
}


def section_model(name: str) -> Any:
    module, cls = SECTIONS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def check_params(data: dict[str, Any], path: str | Path) -> None:
    """Every known section of `data` loads strictly (as the stages load it)."""
    for name, section in data.items():
        if name in SECTIONS:
            parse_section(section, name, section_model(name), path)


def _yaml_float(x: float) -> str:
    """A float as params.yaml writes them: a dot and a signed exponent (2.0e-5), so that YAML 1.1
    readers (PyYAML, DVC) read a float, not the string "2e-05"."""
    text = repr(x)
    if "e" not in text or not x == x or x in (float("inf"), float("-inf")):
        return text
    mantissa, exponent = f"{x:e}".split("e")
    mantissa = mantissa.rstrip("0")
    return f"{mantissa}0e{int(exponent):+d}" if mantissa.endswith(".") else f"{mantissa}e{int(exponent):+d}"


def _round_trip() -> Any:
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    rt.representer.add_representer(float, lambda r, x: r.represent_scalar("tag:yaml.org,2002:float", _yaml_float(x)))
    return rt


def apply_preset(preset: str | Path, params_file: str | Path = "params.yaml", *,
                 write: bool = True) -> list[tuple[str, Any, Any]]:
    """Put every key of `preset` into `params_file`; return the (key, old, new) that changed."""
    import yaml

    from align2llava.config import read_params

    overlay = read_params(preset)
    rt = _round_trip()
    doc = rt.load(Path(params_file).read_text(encoding="utf-8"))
    changes = []
    for name, keys in overlay.items():
        if name not in doc:
            raise ConfigError(f"{preset}: section '{name}' is not in {params_file}")
        if not isinstance(keys, dict):
            raise ConfigError(f"{preset}: section '{name}' must be a mapping of keys")
        for key, value in keys.items():
            old = doc[name].get(key) if doc[name] is not None else None
            if old != value or key not in (doc[name] or {}):
                doc[name][key] = value
                changes.append((f"{name}.{key}", old, value))
    out = io.StringIO()
    rt.dump(doc, out)
    text = out.getvalue()
    check_params(yaml.safe_load(text), f"{params_file} with {preset}")
    if write:
        Path(params_file).write_text(text, encoding="utf-8")
    return changes
