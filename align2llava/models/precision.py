"""Precision: the one policy for the dtypes weights and matmuls use, per stage and machine.

This policy decides reproducibility. float32 results depend only on the inputs (to float
rounding, ~1e-6); bf16 rounds every matmul input to 8 bits of mantissa, so a tiny difference
anywhere (batch composition and padding, how a kernel splits the work over threads or
processes) can flip a rounding and grow through the layers: with bf16 on a CPU with native bf16
the demo's scores moved by up to ~0.9 (std ~1.2, bf16 weights) with batch composition and by up
to 0.98 (std ~2, mixed) between 1 and 2 threads per process, which changed 2 of the 81 selected
records. Whether threads matter depends on the CPU's kernels: on an AMD Zen 5 (AVX512-BF16, no
AMX) random models up to SmolLM2's size gave bit-identical scores and generations at 1 and 2
threads in every dtype (`python -m benchmarks.precision_spread`). So with `auto`, everything whose
output is compared across runs runs in float32 on a CPU: the scores `select` thresholds, the
evaluation answers, and restyle (its bf16 matmuls are the same kernels as scoring's, and one
flipped greedy token changes the rest of a rewrite).

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
- a CUDA GPU with native bf16: bfloat16 for every stage (GPU results depend on the GPU and its
  kernels anyway; set float32 where they must not move);
- a CPU with native bf16 (AMX / AVX512-BF16 instructions): score, restyle and evaluate float32
  (reproducible across thread and process counts; mixed / bfloat16 stay available: they scored
  1.9x / 3.4x faster than float32 with a SmolLM2-sized random model at 1 thread on the Zen 5
  above); the training stages keep bf16: train_reward mixed (far steadier than bf16 weights),
  finetune and pretrain bf16 autocast. Training is where the CPU time goes, and its output is
  a model judged by its held-out metrics rather than compared number for number; a rerun on
  the same machine and thread count still gives the same model. Set dtype float32
  (pretrain.bf16 false) for models that do not depend on the thread count either;
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
Purpose = Literal["train_reward", "score", "finetune", "pretrain", "restyle", "evaluate", "annotation_tasks"]
# purpose: (form, what auto means on a CPU with native bf16)
PURPOSES: dict[str, tuple[str, str]] = {
    "train_reward": ("cast", "mixed"),
    "score": ("cast", "float32"),
    "finetune": ("autocast", "bfloat16"),
    "pretrain": ("autocast", "bfloat16"),
    "restyle": ("weights", "float32"),
    "evaluate": ("weights", "float32"),
    # sampled candidates for people to rate: reproducible like restyle's generations
    "annotation_tasks": ("weights", "float32"),
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
