"""The demo's instruction-tuned MLLM, the reward models' base (LLaVA-1.5's place in the paper).

The paper trains its reward models from LLaVA-1.5-7B after instruction tuning, a model whose
answers follow the image; the demo's stage-1 model (`pretrain`) has only learnt to caption.
`instruct()` tunes it with the fine-tuning code (`steps.finetune`, the recipe in
`params.tune`) on `instruct.json`, correct short conversations about train images that no pool,
mix or benchmark record uses (`demo.synthesis.instruct_data`), and saves the merged model.
The compression experiment's fine-tunes still start from the stage-1 model; only the reward
models start from this one.

Before and after, it measures what the issue of a reward model's base is: how often the model's
own likelihood prefers the image's true colour (shape) word over a wrong one inside the pool's
own answers (`demo.grounding`; the pool's images are held out from the tuning data).
`params.checkpoint` passes a model that is already instruction-tuned through instead (a user's
llava-hf checkpoint: the paper's reward models start from exactly that).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from align2llava.config import Section
from align2llava.data.io import read_records_strict
from align2llava.demo.grounding import grounding_cases, word_preference
from align2llava.models.loading import pass_through
from align2llava.steps.finetune.train import FinetuneParams, finetune

log = logging.getLogger(__name__)


class InstructParams(Section):
    """The `instruct:` section of params.yaml."""

    # An instruction-tuned model folder (HF layout) to pass through instead of training; null: train.
    checkpoint: str | None = None
    # Pool answers per group (colour, shape) the grounding check compares words in (0: skip it).
    grounding_cases: int = Field(100, ge=0)
    # The fine-tuning recipe (finetune's keys; its `mix` is not read).
    tune: FinetuneParams = FinetuneParams(learning_rate=1.0e-3, num_train_epochs=1.0,
                                          layers_to_transform=[-8, -7, -6, -5, -4, -3, -2, -1],
                                          checkpoint_dir=".cache/instruct/checkpoints")


def measure(model_dir: str | Path | None, model: Any, cases: list[Any], image_root: str | Path, tag: str) -> dict[str, Any]:
    """word_preference of a saved model (`model_dir`) or a loaded one (`model`)."""
    from align2llava.models.loading import load_mllm

    if not cases:
        return {}
    t = time.time()
    processor = None
    if model is None:
        model, processor = load_mllm(model_dir, dtype="float32")
    else:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(model_dir))
        model = model.float()
    m = word_preference(model, processor, cases, image_root)
    log.info("%s: the true word wins %.3f of colour and %.3f of shape comparisons in pool answers [%.0f s]",
             tag, m.get("color", float("nan")), m.get("shape", float("nan")), time.time() - t)
    return m


def instruct(params: InstructParams, *, base_model: str | Path, data: str | Path, pool: str | Path,
             image_root: str | Path, out_dir: str | Path, seed: int, dtype: str = "auto",
             on_step: Any = None) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Tune `base_model` on `data` (or pass params.checkpoint through) into `out_dir`; returns
    (metrics, loss curve). Grounding cases come from the `pool` records' answers."""
    start = time.time()
    if params.checkpoint:
        m = pass_through(params.checkpoint, out_dir, param="instruct.checkpoint")
        return {**m, "seconds": round(time.time() - start, 1)}, []
    records = read_records_strict(pool) if params.grounding_cases else []
    cases = grounding_cases(records, image_root, params.grounding_cases, seed)
    before = measure(base_model, None, cases, image_root, "before")
    tune = params.tune.model_copy(update={"mix": None})
    result = finetune(tune, base_model=base_model, data=data, image_root=image_root, out_dir=out_dir,
                      dtype=dtype, on_step=on_step)
    after = measure(out_dir, result.model, cases, image_root, "after")
    return {"passthrough": 0, "grounding_before": before, "grounding_after": after, **result.metrics,
            "seconds": round(time.time() - start, 1)}, result.steps
