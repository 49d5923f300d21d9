"""The evaluation prompt batch: what generation and likelihood scoring both send the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align2llava.data.images import load_rgb, resolve_image
from align2llava.models.chat import needs_bos, prompt_messages, render


def encode_prompts(model: Any, processor: Any, items: list[Any], *, image_root: str | Path | None,
                   instruction: str = "") -> Any:
    """One user turn per item (image, question, instruction) through the checkpoint's chat
    template with the generation prompt, left-padded on the model's device; the tokenizer adds
    only a BOS the template leaves out; pixel values in the model's dtype."""
    tok = processor.tokenizer
    tok.padding_side = "left"
    texts = [render(processor, prompt_messages(it.question, instruction, it.image is not None), True)
             for it in items]
    images = [load_rgb(resolve_image(image_root, it.image) if image_root else it.image)
              for it in items if it.image is not None]
    inputs = processor(text=texts, images=images or None, padding=True, return_tensors="pt",
                       add_special_tokens=needs_bos(tok, texts[0])).to(next(model.parameters()).device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs
