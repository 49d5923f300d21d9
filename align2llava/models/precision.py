"""Precision: the one policy for the dtypes weights and matmuls use, per stage and machine.

This policy decides reproducibility. float32 results depend only on the inputs (to float
rounding); bf16 matmuls round every product's inputs to 8 bits of mantissa, so a result also
depends on how the work is split: batch composition and padding (scores moved by up to ~0.9,
std ~1.2, with bf16 weights on the demo), and the number of threads or processes.

    prec = resolve(setting, device, purpose)   # Precision(weights, autocast)
    prec.cast(module)                          # weights as the policy says
    with prec.autocast_factory(device)(): ...  # matmuls as the policy says

Settings (params.yaml `train_reward.dtype`, `score.dtype`, `restyle.dtype`, `base.dtype` for
finetune and evaluate; `pretrain.bf16` auto/true/false maps to auto/bfloat16/float32):
auto, float32, bfloat16, float16 (GPU only), mixed (fp32 weights with bf16 matmuls).

How a stage applies low precision is fixed by its code (its purpose's *form*):
- cast (train_reward, score: the reward models' own loops): weights cast to the dtype, matmuls
  under autocast; mixed: linear layers cast to bf16 once, everything else (embeddings, norms,
  so the residual stream) fp32, bf16 autocast.
- autocast (finetune, pretrain): fp32 weights, matmuls under autocast (mixed precision
  training: the Trainer's bf16/fp16; mixed is the same as bfloat16 here).
- weights (restyle, evaluate: generation): weights in the dtype, no autocast; mixed does not
  apply.

auto:
- a CUDA GPU with native bf16: bfloat16;
- a CPU with native bf16 (AMX / AVX512-BF16 instructions; several times faster than fp32
  there): train_reward and score mixed (far steadier than bf16 weights), finetune, pretrain
  and restyle bfloat16, evaluate float32 (bf16 generations changed with batch composition: 43
  of 64 answers equal at batch 32 vs 7 on the demo, fp32 ones 64 of 64);
- anything else: float32.

Native bf16 is one detection, `native_bf16(device)`: a CUDA GPU that computes bf16 without
emulation, or a CPU whose /proc/cpuinfo lists amx_bf16 or avx512_bf16 (x86) or bf16 (ARM).
Not oneDNN's `_is_mkldnn_bf16_supported`: that is also true on AVX512 CPUs without bf16
instructions, where oneDNN emulates bf16 more slowly than fp32.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from align2llava.errors import Align2LlavaError

SETTINGS = ("auto", "float32", "bfloat16", "float16", "mixed")
Purpose = Literal["train_reward", "score", "finetune", "pretrain", "restyle", "evaluate"]
# purpose: (form, what auto means on a CPU with native bf16)
PURPOSES: dict[str, tuple[str, str]] = {
    "train_reward": ("cast", "mixed"),
    "score": ("cast", "mixed"),
    "finetune": ("autocast", "bfloat16"),
    "pretrain": ("autocast", "bfloat16"),
    "restyle": ("weights", "bfloat16"),
    "evaluate": ("weights", "float32"),
}


@dataclass(frozen=True)
class Precision:
    """A resolved policy: `weights` float32 | bfloat16 | float16 | mixed; `autocast` bfloat16 |
    float16 | None (matmuls run at full precision)."""

    weights: str
    autocast: str | None

    @property
    def weight_dtype(self) -> Any:
        """The torch dtype to load a checkpoint in (mixed: float32, see `cast`)."""
        return torch_dtype("float32" if self.weights == "mixed" else self.weights)

    @property
    def autocast_dtype(self) -> Any:
        return None if self.autocast is None else torch_dtype(self.autocast)

    def cast(self, module: Any) -> None:
        """Weights to the policy's dtype; mixed: linear layers in bf16 (cast once, not per call),
        everything else (embeddings, norms, so the residual stream) in fp32."""
        import torch

        if self.weights != "mixed":
            module.to(self.weight_dtype)
            return
        module.to(torch.float32)
        for m in module.modules():
            if isinstance(m, torch.nn.Linear):
                m.to(torch.bfloat16)

    def autocast_factory(self, device: Any) -> Callable[[], Any]:
        """A factory of autocast contexts for `device` (a null context when autocast is off)."""
        return functools.partial(autocast, device, self.autocast_dtype)

    def __str__(self) -> str:
        if self.autocast is None or self.autocast == self.weights:
            return self.weights
        return f"{self.weights} weights, {self.autocast} autocast"


def autocast(device: Any, dtype: Any) -> Any:
    """An autocast context for `device` ("cpu", "cuda:1", a torch.device) to `dtype`; None: off."""
    if dtype is None:
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type(device), dtype=dtype)


def device_type(device: Any) -> str:
    """"cpu" for "cpu" and the "cpu:<rank>" devices accelerate gives CPU processes, "cuda" for
    "cuda:0", ..."""
    return str(device).split(":")[0]


def is_cpu(device: Any) -> bool:
    return device_type(device) == "cpu"


def torch_dtype(name: str) -> Any:
    import torch

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise Align2LlavaError(f"unknown weight dtype '{name}' (float32, bfloat16, float16)") from None


def native_bf16(device: Any = "cpu") -> bool:
    """Whether `device` computes bf16 natively (see the module doc)."""
    if is_cpu(device):
        return _cpu_native_bf16()
    if device_type(device) != "cuda":
        return False
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # pragma: no cover - torch without the argument
        return bool(torch.cuda.is_bf16_supported())


@functools.lru_cache(maxsize=1)
def _cpu_native_bf16() -> bool:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def resolve(setting: str, device: Any, purpose: Purpose) -> Precision:
    """The precision `purpose` runs at on `device` for a dtype `setting` (see the module doc)."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r} ({', '.join(PURPOSES)})")
    if setting not in SETTINGS:
        raise Align2LlavaError(f"unknown dtype '{setting}' ({', '.join(SETTINGS)})")
    form, cpu_auto = PURPOSES[purpose]
    mode = setting
    if setting == "auto":
        mode = "float32" if not native_bf16(device) else cpu_auto if is_cpu(device) else "bfloat16"
    if mode == "float16" and is_cpu(device):
        raise Align2LlavaError("dtype float16 needs a GPU; use bfloat16 or float32 on a CPU")
    if mode == "float32":
        return Precision("float32", None)
    amp = "bfloat16" if mode == "mixed" else mode
    if form == "cast":
        return Precision(mode, amp)
    if form == "autocast":
        return Precision("float32", amp)
    if mode == "mixed":
        raise Align2LlavaError(f"dtype mixed does not apply to {purpose} (auto, float32, bfloat16, float16)")
    return Precision(mode, None)
