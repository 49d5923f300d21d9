"""LLaVA models built from configs: tiny random-weight ones for tests and benchmarks, and the
tiny records and images they read (tests/conftest.py and benchmarks/ use these).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align2llava.models.chat import CHATML_TEMPLATE
from align2llava.models.loading import IMAGE_TOKEN


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


def make_image(path: str | Path, color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (32, 32),
               mode: str = "RGB") -> Path:
    """A PNG of a `color` square (the middle half) on a light background, saved in `mode`."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, (240, 240, 240))
    for x in range(size[0] // 4, 3 * size[0] // 4):
        for y in range(size[1] // 4, 3 * size[1] // 4):
            img.putpixel((x, y), color)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)
    return path


def llava_record(rid: str, image: str | None = "a.png", task: str | None = None,
                 turns: list[tuple[Any, Any]] | None = None) -> dict[str, Any]:
    """A LLaVA record: `turns` (question, answer) pairs, `<image>` in the first question when it
    has an image; an answer may be a list of candidates."""
    turns = turns or [("What color is the shape?", "It is red.")]
    convs = []
    for k, (q, a) in enumerate(turns):
        if k == 0 and image is not None:
            q = IMAGE_TOKEN + "\n" + q
        convs += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    rec: dict[str, Any] = {"id": rid, "conversations": convs}
    if image is not None:
        rec["image"] = image
    if task is not None:
        rec["task"] = task
    return rec
