"""Typed, strict loading of params.yaml sections.

Each step module declares its own section as a pydantic model derived from `Section`
(extra keys forbidden). `load_section("select", SelectParams)` reads params.yaml and fails
with one line naming the file and the key when a key is unknown, missing or mistyped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from align2llava.errors import ConfigError

PARAMS_FILE = "params.yaml"


class Section(BaseModel):
    """Base for a params.yaml section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseParams(Section):
    """The `base` section: choices shared by several stages."""

    seed: int = 0
    # The MLLM every stage starts from (HF layout, llava-hf/llava-1.5-7b-hf style).
    base_model: str = "models/pretrain"
    # Where the instruction pool and its images come from.
    pool: str = "data/synthesize/pool.json"
    image_root: str = "data/synthesize/images"
    # finetune's and evaluate's precision (models.precision): auto = bf16 on a GPU; on a CPU,
    # finetune bf16 autocast where native, evaluate float32; or float32 / bfloat16 / float16.
    dtype: str = "auto"
    # How the heavy stages are started (dvc.yaml: `${base.launcher} -m stages.<name>`):
    # "python", or "accelerate launch --num_processes 8" for many GPUs / nodes.
    launcher: str = "python"


S = TypeVar("S", bound=Section)


def read_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def parse_section(data: Any, name: str, model: type[S], path: str | Path = PARAMS_FILE) -> S:
    """Validate one section's mapping; errors name the file and the dotted key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: section '{name}' must be a mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join([name, *(str(p) for p in err["loc"])])
        if err["type"] == "extra_forbidden":
            msg = f"{path}: unknown key '{key}'"
        elif err["type"] == "missing":
            msg = f"{path}: missing key '{key}'"
        else:
            msg = f"{path}: {key}: {err['msg']} (got {err.get('input')!r})"
        more = len(exc.errors()) - 1
        raise ConfigError(msg + (f" (+{more} more)" if more else "")) from None


def load_section(name: str, model: type[S], path: str | Path = PARAMS_FILE) -> S:
    """Load section `name` of params.yaml strictly as `model`."""
    data = read_params(path)
    if name not in data:
        raise ConfigError(f"{path}: missing section '{name}'")
    return parse_section(data[name], name, model, path)


def load_base(path: str | Path = PARAMS_FILE) -> BaseParams:
    return load_section("base", BaseParams, path)
