"""Which LLM layers and linear modules LoRA adapts: one peft target regex for every stage.
"""

from __future__ import annotations

import re

from align2llava.errors import Align2LlavaError

LLM_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def resolve_layers(layers: list[int] | None, n_layers: int, section: str = "") -> list[int] | None:
    """Sorted distinct LLM layer indices (negative ones count from the top); None: every layer."""
    if layers is None:
        return None
    if not layers:
        raise Align2LlavaError(f"{section}layers_to_transform is empty (null: every layer)")
    for i in layers:
        if not -n_layers <= i < n_layers:
            raise Align2LlavaError(
                f"{section}layers_to_transform: layer {i} does not exist (the LLM has {n_layers} layers)"
            )
    return sorted({i % n_layers for i in layers})


def lora_regex(modules: list[str] | str, layers: list[int] | None = None, n_layers: int | None = None,
               section: str = "") -> str:
    """A peft `target_modules` regex: the linear layers named `modules` ("all-linear": LLM_LINEAR)
    of the LLM's decoder layers `layers` (negative: from the top; None: all), never the vision
    tower or lm_head. `section` ("finetune.") prefixes error messages.

    The reward models' saved adapter_config.json holds this string: keep its form.
    """
    names = LLM_LINEAR if modules == "all-linear" else list(modules)
    if not names:
        raise Align2LlavaError(f"{section}lora_target_modules is empty")
    if layers is not None and n_layers is None:
        raise ValueError("n_layers is needed with layers")
    resolved = resolve_layers(layers, n_layers or 0, section)
    idx = "\\d+" if resolved is None else "|".join(str(i) for i in resolved)
    mods = "|".join(re.escape(m) for m in names)
    return rf"(.*\.)?language_model\.layers\.({idx})\.[^.]+\.({mods})"
