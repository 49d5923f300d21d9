"""Shared fixtures: isolated MLflow/HF caches, tiny images, a tiny random LLaVA."""

from __future__ import annotations

from pathlib import Path

import pytest

# the tiny records and images the tests build (in the library, so benchmarks use them too)
from align2llava.models.build import llava_record, make_image

__all__ = ["ROOT", "TINY_WORLD", "assert_summary_keys", "llava_record", "make_image"]

ROOT = Path(__file__).resolve().parents[1]

# A demo world small enough for tests (overrides of params.yaml's synthesize section).
TINY_WORLD = {"pool_per_task": 8, "annotate_fraction": 0.5, "benchmark_vqa_per_type": 4, "benchmark_pope": 6,
              "captions": 12, "instruct_images": 6}


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    yield
    # accelerate keeps process-wide singletons (mixed precision, device): a test that ran a
    # bf16 Trainer must not leak its state into the next test's Accelerator.
    try:
        from accelerate.state import AcceleratorState
    except ImportError:
        return
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and one thread is robust on a busy machine.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    """A random-weight LLaVA folder (HF layout): 2-layer Llama + 2-layer CLIP, 32x32 images."""
    from align2llava.models.build import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava") / "model", seed=0)


@pytest.fixture
def image_root(tmp_path) -> Path:
    root = tmp_path / "images"
    make_image(root / "a.png")
    make_image(root / "b.png", color=(30, 30, 200))
    return root


def assert_summary_keys(metrics: dict, stage: str, absent: frozenset[str] = frozenset()) -> None:
    """Every figure `align2llava summary` prints for `stage` is in the stage's metrics, except
    `absent` ones the test's fixture cannot produce."""
    from align2llava.ops.summary import HEADLINES, _get

    missing = {key for _, key in HEADLINES[stage] if _get(metrics, key) is None}
    assert missing == set(absent), f"{stage}: summary keys missing from its metrics: {sorted(missing)}"
