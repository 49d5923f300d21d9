"""Chat templates: rendering conversations and finding the assistant's spans.

Messages are built here as {"role", "content": str}, `<image>` in the text where the image goes.
Two kinds of checkpoint template render them:
- plain-string content (ChatML: the demo's SmolLM2 and the tiny test models): passed as they are;
- structured content, a list of {"type": "image"} / {"type": "text", "text": ...} parts
  (llava-hf/llava-1.5-7b-hf's "USER: <image>\\n... ASSISTANT: ..."), which renders nothing for a
  plain string: each message is converted to parts first (`template_messages`).
Which kind a template is, is asked of the template itself once (`takes_structured_content`).
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
_PROBE = "zqxj probe 7"
# What of a reply `continuation_ids` returns: the whole turn (end of turn included) or its start.
SPANS = ("turn", "start")
_STRUCTURED: dict[str, bool] = {}


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


# ---------------------------------------------------------------------------- templates


def tokenizer_of(processor: Any) -> Any:
    return getattr(processor, "tokenizer", None) or processor


def template_of(processor: Any) -> str | None:
    """The chat template a processor (or tokenizer) renders with."""
    return getattr(processor, "chat_template", None) or getattr(tokenizer_of(processor), "chat_template", None)


def _try_render(tokenizer: Any, template: str, messages: list[dict[str, Any]]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    except Exception:  # a template written for the other content kind may raise (str + list)
        return ""


def takes_structured_content(tokenizer: Any, template: str) -> bool:
    """True when `template` renders a message's text only from structured parts (llava-hf's),
    False when it renders plain-string content (ChatML). Asked once per template."""
    if template not in _STRUCTURED:
        plain = _try_render(tokenizer, template, [{"role": "user", "content": _PROBE}])
        if _PROBE in plain:
            _STRUCTURED[template] = False
        elif _PROBE in _try_render(tokenizer, template, [{"role": "user", "content": _parts(_PROBE)}]):
            _STRUCTURED[template] = True
        else:
            raise Align2LlavaError(
                "the chat template renders a user message's text neither from a plain string nor from "
                "[{'type': 'text', 'text': ...}] parts; cannot prompt through it"
            )
    return _STRUCTURED[template]


def _parts(content: str) -> list[dict[str, str]]:
    n = content.count(IMAGE_TOKEN)
    text = content.replace(IMAGE_TOKEN, "").strip() if n else content
    return [{"type": "image"}] * n + [{"type": "text", "text": text}]


def template_messages(tokenizer: Any, template: str, messages: list[dict[str, str]]) -> list[dict[str, Any]]:
    """`messages` in the form `template` takes: as they are, or each content as parts (images first)."""
    if not takes_structured_content(tokenizer, template):
        return messages
    return [{"role": m["role"], "content": _parts(m["content"])} for m in messages]


def render(processor: Any, messages: list[dict[str, str]], generation_prompt: bool = False,
           template: str | None = None) -> str:
    """`messages` rendered by `template` (default: the processor's own chat template)."""
    tok = tokenizer_of(processor)
    own = template or template_of(processor)
    if own and takes_structured_content(tok, own):
        return tok.apply_chat_template(
            template_messages(tok, own, messages), chat_template=own, tokenize=False,
            add_generation_prompt=generation_prompt,
        )
    if template is not None:
        return tok.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    return processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def reply_lead(processor: Any, template: str | None = None) -> str:
    """What the template writes between the generation prompt and a reply's text (" " after
    llava-hf's "ASSISTANT:", "" after ChatML's "<|im_start|>assistant\n"): text that continues
    a prompt with a given start of the reply must begin with it."""
    user = [{"role": "user", "content": "Q"}]
    before = render(processor, user, generation_prompt=True, template=template)
    upto = render(processor, [*user, {"role": "assistant", "content": _PROBE}], template=template)
    at = upto.find(_PROBE)
    return upto[len(before):at] if upto.startswith(before) and at >= len(before) else ""


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


# ---------------------------------------------------------------------------- tokens


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer's special tokens are exactly a BOS put first (Llama's are;
    ChatML/GPT-2 style tokenizers add none)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return tokenizer("a", add_special_tokens=True)["input_ids"] == [bos, *plain]


def needs_bos(tokenizer: Any, text: str) -> bool:
    """True when `text` (a rendered template, tokenized without special tokens) must get the
    tokenizer's BOS in front: the tokenizer adds one by default and the template did not."""
    return adds_bos(tokenizer) and not text.startswith(tokenizer.bos_token)


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered prompt: no special tokens added, except a BOS the template left out."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id, *ids] if needs_bos(tokenizer, text) else ids


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


# ---------------------------------------------------------------------------- replies


def continuation_ids(processor: Any, question: str, reply: str, *, instruction: str = "",
                     image: bool = True, span: str = "turn") -> list[int]:
    """Token ids of `reply` after the evaluation prompt. span "turn": the assistant's whole turn,
    what the template renders after the generation prompt, trailing whitespace excluded, plus the
    tokenizer's EOS when that holds no special token (finetune's labels).
    span "start": the reply's own tokens only, no end of turn (the reply begins with it)."""
    if span not in SPANS:
        raise ValueError(f"likelihood span {span!r}: one of {', '.join(SPANS)}")
    tok = processor.tokenizer
    user = prompt_messages(question, instruction, image)
    prompt = render(processor, user, generation_prompt=True)
    if span == "start":
        full = prompt + reply_lead(processor) + reply  # llava-hf's " " after "ASSISTANT:"
    else:
        full = render(processor, [*user, {"role": "assistant", "content": reply}]).rstrip()
    head, ids = text_ids(tok, prompt), text_ids(tok, full)
    if not full.startswith(prompt) or ids[: len(head)] != head or len(ids) == len(head):
        raise Align2LlavaError(
            f"scoring a reply: the prompt's tokens are not a prefix of the prompt followed by the reply "
            f"{reply!r} (the chat template or the tokenizer is not prefix-stable), so the reply's tokens "
            "cannot be scored (evaluate.likelihood: false turns that scoring off)"
        )
    cont = ids[len(head):]
    if span == "turn" and tok.eos_token_id is not None and not set(cont) & set(tok.all_special_ids):
        cont.append(tok.eos_token_id)
    return cont
