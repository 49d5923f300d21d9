"""Shared fixtures: isolated MLflow/HF caches, tiny images, a tiny random LLaVA."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A demo world small enough for tests (overrides of params.yaml's synthesize section).
TINY_WORLD = {"pool_per_task": 8, "annotate_fraction": 0.5, "benchmark_vqa_per_type": 4, "benchmark_pope": 6,
              "captions": 12}


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


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    """A random-weight LLaVA folder (HF layout): 2-layer Llama + 2-layer CLIP, 32x32 images."""
    from align2llava.models.build import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava") / "model", seed=0)


def make_image(path: Path, color=(200, 30, 30), size=(32, 32), mode="RGB") -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, (240, 240, 240))
    for x in range(size[0] // 4, 3 * size[0] // 4):
        for y in range(size[1] // 4, 3 * size[1] // 4):
            img.putpixel((x, y), color)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)
    return path


def llava_record(rid: str, image: str | None = "a.png", task: str | None = None, turns=None):
    turns = turns or [("What color is the shape?", "It is red.")]
    convs = []
    for k, (q, a) in enumerate(turns):
        if k == 0 and image is not None:
            q = "<image>\n" + q
        convs += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    rec = {"id": rid, "conversations": convs}
    if image is not None:
        rec["image"] = image
    if task is not None:
        rec["task"] = task
    return rec


@pytest.fixture
def image_root(tmp_path) -> Path:
    root = tmp_path / "images"
    make_image(root / "a.png")
    make_image(root / "b.png", color=(30, 30, 200))
    return root
