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


# ---------------------------------------------------------------- llava-hf/llava-1.5-7b-hf layout

# The chat template llava-hf/llava-1.5-7b-hf ships (chat_template.json): structured content
# ({"type": "image"} / {"type": "text"} parts), "USER: <image>\n... ASSISTANT: ..." turns,
# {% generation %} around assistant text, no end-of-turn token.
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] "
    "!= 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA15_IMAGE_SIZE, LLAVA15_PATCH_SIZE = 336, 14  # 24 x 24 = 576 image tokens
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def train_llama_tokenizer(corpus: list[str] | None = None, vocab_size: int = 448) -> Any:
    """A Llama-style tokenizer trained here (no download): SentencePiece-like BPE over "▁" words
    with byte fallback, <unk> <s> </s> first, a BOS added to every encoding, then `<image>` and
    `<pad>` as added special tokens and left padding, as llava-hf/llava-1.5-7b-hf's."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=["▁"])
    tok.train_from_iterator(corpus or _LLAMA_CORPUS, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    llama = LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
                           add_bos_token=True, add_eos_token=False, legacy=False)
    llama.add_tokens([IMAGE_TOKEN, "<pad>"], special_tokens=True)
    llama.pad_token = "<pad>"
    llama.padding_side = "left"
    return llama


_LLAMA_CORPUS = _TINY_CORPUS + [
    "USER: ASSISTANT: You are a helpful assistant. You rewrite answers in your own words.",
    "Keep every fact: the same colors, shapes, numbers, positions, objects, and the same yes or no.",
    "Which answer is better? Reply with A or B. Answer A: Answer B: Yes, No, there is one.",
] * 20


def build_llava_hf_like(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    vision_hidden: int = 32,
    shard_size: str = "100KB",
) -> Path:
    """A random-weight LLaVA saved in llava-hf/llava-1.5-7b-hf's exact layout and config, tiny.

    The same files (config.json, generation_config.json, sharded float16
    model-0000k-of-0000n.safetensors + model.safetensors.index.json, preprocessor_config.json naming
    CLIPImageProcessor, processor_config.json, chat_template.json, tokenizer.json,
    tokenizer_config.json, special_tokens_map.json, added_tokens.json; no tokenizer.model) and the
    same choices: CLIP at 336 px / patch 14 (576 image tokens), vision_feature_layer -2, "default"
    feature selection, a gelu projector, a Llama LM whose tokenizer adds a BOS, `<image>` and
    `<pad>` added after the base vocabulary, left padding, the embedding padded to a multiple of
    64, and the checkpoint's own structured-content chat template. Only the sizes are small.
    """
    import json

    import torch
    from transformers import CLIPImageProcessorPil, LlamaConfig, LlavaForConditionalGeneration, LlavaProcessor

    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_llama_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids("<pad>")
    vocab = (len(tokenizer) + 63) // 64 * 64
    text_config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False,
    )
    vision = _vision_config(LLAVA15_IMAGE_SIZE, LLAVA15_PATCH_SIZE, vision_hidden, layers, 4)
    config = _llava_config(text_config, vision, image_id, layers)
    config.pad_token_id = pad_id
    config.image_seq_length = (LLAVA15_IMAGE_SIZE // LLAVA15_PATCH_SIZE) ** 2
    model = LlavaForConditionalGeneration(config).to(torch.float16)
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 1, 2
    model.generation_config.pad_token_id = pad_id
    model.save_pretrained(str(out), max_shard_size=shard_size)
    ip = CLIPImageProcessorPil(size={"shortest_edge": LLAVA15_IMAGE_SIZE},
                               crop_size={"height": LLAVA15_IMAGE_SIZE, "width": LLAVA15_IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=LLAVA15_PATCH_SIZE,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA15_CHAT_TEMPLATE)
    processor.save_pretrained(str(out))
    # the processor/tokenizer files exactly as the checkpoint has them (transformers 5 writes
    # newer variants: chat_template.jinja, a processor_config.json with nested sub-configs)
    for name in ("chat_template.jinja", "processor_config.json", "preprocessor_config.json", "tokenizer_config.json",
                 "special_tokens_map.json", "added_tokens.json"):
        (out / name).unlink(missing_ok=True)

    def write(name: str, data: Any) -> None:
        (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def added(content: str) -> dict[str, Any]:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    write("chat_template.json", {"chat_template": LLAVA15_CHAT_TEMPLATE})
    write("preprocessor_config.json", {
        "crop_size": {"height": LLAVA15_IMAGE_SIZE, "width": LLAVA15_IMAGE_SIZE}, "do_center_crop": True,
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": _CLIP_MEAN, "image_processor_type": "CLIPImageProcessor", "image_std": _CLIP_STD,
        "processor_class": "LlavaProcessor", "resample": 3, "rescale_factor": 1 / 255,
        "size": {"shortest_edge": LLAVA15_IMAGE_SIZE},
    })
    write("processor_config.json", {
        "image_token": IMAGE_TOKEN, "num_additional_image_tokens": 1, "patch_size": LLAVA15_PATCH_SIZE,
        "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default",
    })
    write("tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {"0": added("<unk>"), "1": added("<s>"), "2": added("</s>"),
                                 str(image_id): added(IMAGE_TOKEN), str(pad_id): added("<pad>")},
        "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": False,
        "model_max_length": 1000000000000000019884624838656, "pad_token": "<pad>", "padding_side": "left",
        "processor_class": "LlavaProcessor", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
        "trust_remote_code": False, "unk_token": "<unk>", "use_default_system_prompt": False,
    })
    write("special_tokens_map.json", {
        "bos_token": added("<s>") | {}, "eos_token": added("</s>") | {"special": None},
        "pad_token": added("<pad>") | {}, "unk_token": added("<unk>") | {"special": None},
    })
    write("added_tokens.json", {IMAGE_TOKEN: image_id, "<pad>": pad_id})
    return out
