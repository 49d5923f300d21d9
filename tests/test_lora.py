"""One LoRA target regex (models.lora.lora_regex) for the reward models and finetune."""

from __future__ import annotations

import re

import pytest

from align2llava.errors import Align2LlavaError
from align2llava.models.lora import LLM_LINEAR, lora_regex, resolve_layers

MODS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"


def test_reward_models_string_is_unchanged():
    # saved in models/train_reward/*/adapter_config.json (a DVC output): this exact form
    assert lora_regex(LLM_LINEAR, None, 30) == r"(.*\.)?language_model\.layers\.(\d+)\.[^.]+\.(" + MODS + ")"
    layers = resolve_layers([-4, -3, -2, -1], 30)
    assert layers == [26, 27, 28, 29]
    assert lora_regex(LLM_LINEAR, layers, 30) == (
        r"(.*\.)?language_model\.layers\.(26|27|28|29)\.[^.]+\.(" + MODS + ")")
    assert lora_regex(["q.proj"], [0], 2) == r"(.*\.)?language_model\.layers\.(0)\.[^.]+\.(q\.proj)"


def _old_finetune_regex(names, layers, n_layers):
    """The regex finetune used before it shared lora_regex (the reference for the module set)."""
    alt = "|".join(re.escape(n) for n in names)
    if layers is None:
        return rf".*language_model\..*\.({alt})"
    nums = "|".join(str(i) for i in sorted({i % n_layers for i in layers}))
    return rf".*language_model\.layers\.({nums})\..*\.({alt})"


@pytest.mark.parametrize("layers", [None, [-2, -1], [0]])
@pytest.mark.parametrize("names", [LLM_LINEAR, ["q_proj", "down_proj"]])
def test_finetune_adapts_the_same_modules_as_before(mllm_modules, layers, names):
    names_, n_layers = mllm_modules
    new = {m for m in names_ if re.fullmatch(lora_regex(names, layers, n_layers), m)}
    old = {m for m in names_ if re.fullmatch(_old_finetune_regex(names, layers, n_layers), m)}
    assert new == old and new
    assert not any("vision_tower" in m or "lm_head" in m for m in new)


def test_peft_wraps_the_same_layers(tiny_llava):
    from peft import LoraConfig, get_peft_model

    from align2llava.models.loading import load_mllm

    wrapped = []
    for rx in (lora_regex(LLM_LINEAR, [-2, -1], 2), _old_finetune_regex(LLM_LINEAR, [-2, -1], 2)):
        model, _ = load_mllm(tiny_llava)
        peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=rx))
        wrapped.append(sorted(n for n, _ in peft.named_parameters() if "lora_A" in n))
    assert wrapped[0] == wrapped[1] and len(wrapped[0]) == 2 * len(LLM_LINEAR)


def test_bad_layers_and_modules_are_one_line_errors():
    with pytest.raises(Align2LlavaError, match=r"finetune\.layers_to_transform: layer 4 does not exist"):
        lora_regex(["q_proj"], [4], 4, "finetune.")
    with pytest.raises(Align2LlavaError, match="layer -5 does not exist"):
        resolve_layers([-5], 4)
    with pytest.raises(Align2LlavaError, match="layers_to_transform is empty"):
        resolve_layers([], 4)
    with pytest.raises(Align2LlavaError, match="lora_target_modules is empty"):
        lora_regex([], None, 4)


@pytest.fixture(scope="module")
def mllm_modules(tiny_llava):
    from align2llava.models.loading import load_mllm

    model, _ = load_mllm(tiny_llava)
    return [n for n, _ in model.named_modules()], model.config.text_config.num_hidden_layers


def test_reward_model_adapter_config_holds_the_string(tiny_llava):
    from align2llava.steps.reward_training.train import TrainRewardParams, build_reward_model

    params = TrainRewardParams(lora_r=2, lora_alpha=4, dtype="float32", max_length=64, layers_to_transform=[-1],
                               train_projector=False)
    rm, _ = build_reward_model(tiny_llava, params)
    assert rm.backbone.peft_config["default"].target_modules == (
        r"(.*\.)?language_model\.layers\.(1)\.[^.]+\.(" + MODS + ")")
