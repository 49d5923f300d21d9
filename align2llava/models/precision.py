"""Precision: which dtype weights and matmuls use on this machine.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from align2llava.errors import Align2LlavaError


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


def precision(name: str = "auto", device: Any = "cpu") -> tuple[Any, Any]:
    """(weight dtype, autocast dtype or None) for a dtype setting.

    float32 / bfloat16 / float16: weights in that dtype (low precision: autocast too, so fp32
    adapters and heads mix in). mixed ("mixed" as weight dtype, see cast_backbone): linear
    layers in bf16, the rest (embeddings, norms, hence the residual stream) in fp32, bf16
    autocast. auto: bfloat16 on GPUs that support it; mixed on CPUs with native bf16 (AMX /
    AVX512-BF16: several times faster than fp32, and far steadier than bf16 weights, with which
    the demo's scores moved by up to ~0.9 (std ~1.2) with batch composition); else float32.
    """
    import torch

    if name == "auto":
        if not _is_cpu(device):
            name = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        else:
            name = "mixed" if cpu_has_native_bf16() else "float32"
    if name == "mixed":
        return "mixed", torch.bfloat16
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    return dt, (dt if dt != torch.float32 else None)


def cast_backbone(llava: Any, weight_dtype: Any) -> None:
    """Weights to `weight_dtype`; "mixed": linear layers in bf16 (cast once, not per call),
    everything else (embeddings, norms, so the residual stream) in fp32."""
    import torch

    if weight_dtype != "mixed":
        llava.to(weight_dtype)
        return
    llava.to(torch.float32)
    for m in llava.modules():
        if isinstance(m, torch.nn.Linear):
            m.to(torch.bfloat16)


def _is_cpu(device: Any) -> bool:
    """True for "cpu" and for the "cpu:<rank>" devices accelerate gives CPU processes."""
    return str(device).split(":")[0] == "cpu"


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def native_bf16() -> bool:
    """Whether this machine computes bf16 natively: a CUDA GPU that supports it, or a CPU with
    AMX / AVX512-BF16 (where bf16 matmuls run ~2x faster than fp32 on CPU)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - older torch
        return False


def compute_dtype(name: str = "auto") -> Any:
    """base.dtype as a compute dtype: auto = bf16 where native (GPU or CPU), else fp32."""
    import torch

    if name == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    if name == "float16" and not torch.cuda.is_available():
        raise Align2LlavaError("dtype float16 needs a GPU; use bfloat16 or float32 on a CPU")

    return resolve_dtype(name)


def resolve_restyle_dtype(name: str) -> str:
    """`auto` -> bfloat16 where computed natively (CUDA, or a CPU with AMX/AVX512-BF16), else float32."""
    if name != "auto":
        return name
    import torch

    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "bfloat16" if native else "float32"


def bf16_autocast(setting: str, device: Any) -> Any:
    """A factory of autocast contexts: bf16 where supported (setting auto) or forced (true)."""
    import torch

    if setting == "false":
        return contextlib.nullcontext
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    else:
        ok = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if setting == "true" or ok:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext
