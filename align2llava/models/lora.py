"""Which LLM layers and linear modules LoRA adapts.
"""

from __future__ import annotations

import re

from align2llava.errors import Align2LlavaError

LLM_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_regex(n_layers: int, layers: list[int] | None, modules: list[str]) -> str:
    idx = "\\d+" if layers is None else "|".join(str(i) for i in layers)
    mods = "|".join(re.escape(m) for m in modules)
    return rf"(.*\.)?language_model\.layers\.({idx})\.[^.]+\.({mods})"


def resolve_layers(layers: list[int] | None, n_layers: int) -> list[int] | None:
    if layers is None:
        return None
    out = sorted({i % n_layers if -n_layers <= i < n_layers else -1 for i in layers})
    if not out or out[0] < 0:
        raise Align2LlavaError(f"layers_to_transform {layers} is outside the LLM's {n_layers} layers")
    return out


# ---------------------------------------------------------------------------- model


def target_regex(
    target_modules: list[str] | str, layers: list[int] | None = None, n_layers: int | None = None
) -> str:
    """A peft target regex restricted to the LLM's linear layers (never vision or lm_head),
    optionally to some of its layers (negative indices count from the top)."""
    names = LLM_LINEAR if target_modules == "all-linear" else list(target_modules)
    if not names:
        raise Align2LlavaError("finetune.lora_target_modules is empty")
    alt = "|".join(re.escape(n) for n in names)
    if layers is None:
        return rf".*language_model\..*\.({alt})"
    if n_layers is None:
        raise ValueError("n_layers is needed with layers")
    idx = set()
    for i in layers:
        if not -n_layers <= i < n_layers:
            raise Align2LlavaError(
                f"finetune.layers_to_transform: layer {i} does not exist (the LLM has {n_layers})"
            )
        idx.add(i % n_layers)
    nums = "|".join(str(i) for i in sorted(idx))
    return rf".*language_model\.layers\.({nums})\..*\.({alt})"
