"""The one precision policy (align2llava.models.precision): what every stage runs at."""

from __future__ import annotations

import pytest

from align2llava.errors import Align2LlavaError
from align2llava.models import precision
from align2llava.models.precision import PURPOSES, Precision, is_cpu, native_bf16, resolve

# auto on a CPU with native bf16, per purpose: (weights, autocast). Inference (whose numbers are
# compared across runs) in float32, reproducible across thread counts; training keeps bf16.
NATIVE_CPU_AUTO = {
    "train_reward": ("mixed", "bfloat16"),
    "score": ("float32", None),
    "finetune": ("float32", "bfloat16"),
    "pretrain": ("float32", "bfloat16"),
    "restyle": ("float32", None),
    "evaluate": ("float32", None),
    "annotation_tasks": ("float32", None),
}


@pytest.fixture
def native(monkeypatch):
    def set_native(value: bool) -> None:
        monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": value)

    return set_native


def test_cpu_devices_of_accelerate_processes_count_as_cpu():
    assert is_cpu("cpu") and is_cpu("cpu:1") and not is_cpu("cuda:0")


@pytest.mark.parametrize("purpose", sorted(PURPOSES))
def test_auto_on_a_cpu_with_native_bf16(purpose, native):
    native(True)
    p = resolve("auto", "cpu", purpose)
    assert (p.weights, p.autocast) == NATIVE_CPU_AUTO[purpose]
    assert resolve("auto", "cpu:1", purpose) == p  # an accelerate CPU process decides the same


@pytest.mark.parametrize("purpose", sorted(PURPOSES))
def test_auto_without_native_bf16_is_float32(purpose, native):
    native(False)
    assert resolve("auto", "cpu", purpose) == Precision("float32", None)
    assert resolve("auto", "cuda:0", purpose) == Precision("float32", None)


@pytest.mark.parametrize("purpose", sorted(PURPOSES))
def test_auto_on_a_gpu_with_bf16_is_bfloat16(purpose, native):
    native(True)
    form = PURPOSES[purpose][0]
    expected = {"cast": ("bfloat16", "bfloat16"), "autocast": ("float32", "bfloat16"),
                "weights": ("bfloat16", None)}[form]
    p = resolve("auto", "cuda:0", purpose)
    assert (p.weights, p.autocast) == expected


@pytest.mark.parametrize("purpose", sorted(PURPOSES))
def test_explicit_settings_do_not_depend_on_the_machine(purpose, native):
    for value in (True, False):
        native(value)
        assert resolve("float32", "cpu", purpose) == Precision("float32", None)
        bf = resolve("bfloat16", "cpu", purpose)
        assert "bfloat16" in (bf.weights, bf.autocast)


def test_forms_apply_bf16_as_their_code_does():
    assert resolve("bfloat16", "cpu", "score") == Precision("bfloat16", "bfloat16")
    assert resolve("mixed", "cpu", "train_reward") == Precision("mixed", "bfloat16")
    assert resolve("mixed", "cpu", "finetune") == Precision("float32", "bfloat16")
    assert resolve("bfloat16", "cpu", "restyle") == Precision("bfloat16", None)
    with pytest.raises(Align2LlavaError, match="mixed does not apply to evaluate"):
        resolve("mixed", "cpu", "evaluate")


def test_bad_settings_are_one_line_errors():
    with pytest.raises(Align2LlavaError, match="unknown dtype 'fp8'"):
        resolve("fp8", "cpu", "score")
    with pytest.raises(Align2LlavaError, match="float16 needs a GPU"):
        resolve("float16", "cpu", "finetune")
    with pytest.raises(ValueError, match="unknown purpose"):
        resolve("auto", "cpu", "train")  # type: ignore[arg-type]


def test_mixed_casts_linear_layers_only_and_autocast_factory():
    import torch

    m = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    p = resolve("mixed", "cpu", "score")
    p.cast(m)
    assert [x.dtype for x in m.parameters()] == [torch.float32] * 3 + [torch.bfloat16] * 2
    with p.autocast_factory("cpu")():
        y = m[2](m[1](m[0](torch.tensor([1, 2]))))
    assert y.dtype == torch.bfloat16
    with resolve("float32", "cpu", "score").autocast_factory("cpu")():
        assert torch.nn.functional.linear(torch.ones(1, 2), torch.ones(3, 2)).dtype == torch.float32


def test_native_bf16_detection_reads_cpu_flags(monkeypatch, tmp_path):
    assert native_bf16("mps") is False
    precision._cpu_native_bf16.cache_clear()
    try:
        real = precision.Path

        def fake(flags: str):
            f = tmp_path / "cpuinfo"
            f.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n")
            monkeypatch.setattr(precision, "Path", lambda p: f if p == "/proc/cpuinfo" else real(p))
            monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
            precision._cpu_native_bf16.cache_clear()
            return native_bf16("cpu")

        assert fake("avx512f avx512_bf16") is True
        assert fake("amx_tile amx_bf16") is True
        assert fake("avx512f avx512bw") is False  # AVX512 without bf16 instructions: emulated, not native
    finally:
        precision._cpu_native_bf16.cache_clear()
