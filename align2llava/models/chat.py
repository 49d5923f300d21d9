"""Chat templates: rendering conversations and finding the assistant's spans.
"""

from __future__ import annotations

from typing import Any

from align2llava.data.records import IMAGE_TOKEN, strip_image_token
from align2llava.errors import Align2LlavaError

# ChatML, as SmolLM2-Instruct uses; the tiny test tokenizer gets the same template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------- data


def to_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """LLaVA conversations -> chat messages; `<image>` moved to the start of the first turn."""
    msgs = []
    has_image = record.get("image") is not None
    for t, turn in enumerate(record["conversations"]):
        role = "user" if turn["from"] == "human" else "assistant"
        text = turn["value"]
        if t == 0 and has_image:
            text = f"{IMAGE_TOKEN}\n{strip_image_token(text)}"
        msgs.append({"role": role, "content": text})
    return msgs


def prompt_messages(question: str, instruction: str = "", image: bool = True) -> list[dict[str, str]]:
    """One user turn for generation (evaluation): image, question, optional instruction."""
    text = strip_image_token(question)
    if instruction:
        text = f"{text}\n{instruction}"
    return [{"role": "user", "content": f"{IMAGE_TOKEN}\n{text}" if image else text}]


def render(processor: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def assistant_spans(processor: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages`; return the text and the character span of every assistant reply.

    A reply's span runs from the end of the conversation-so-far with the generation prompt to
    the end of the conversation including the reply, trailing whitespace excluded (so the
    end-of-turn token is trained on, the newline after it is not).
    """
    full = render(processor, messages)
    spans = []
    for j, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = render(processor, messages[:j], generation_prompt=True)
        upto = render(processor, messages[: j + 1])
        if not (full.startswith(before) and full.startswith(upto) and len(upto) > len(before)):
            raise Align2LlavaError(
                "the chat template is not prefix-stable (rendering a conversation's first turns "
                "is not a prefix of rendering all of it), so assistant turns cannot be located"
            )
        spans.append((len(before), len(upto.rstrip())))
    return full, spans


def image_token_count(processor: Any) -> int:
    """How many placeholder tokens one image expands to (asked of the processor once)."""
    from PIL import Image

    size = _crop_size(processor)
    blank = Image.new("RGB", (size, size))
    out = processor(text=[IMAGE_TOKEN], images=[blank], add_special_tokens=False)
    return sum(1 for t in out["input_ids"][0] if t == processor.image_token_id)


def _crop_size(processor: Any) -> int:
    from align2llava.models.loading import image_size

    return image_size(processor)
