"""Reward models f(I, Q) and g(I, Q, A): a LLaVA backbone with a scalar head (docs/method.md).

- Backbone: any LLaVA-architecture checkpoint folder (HF layout), without its LM head: the
  reward is read from the last non-padding token's final hidden state by a linear head
  (hidden -> 1, no bias). No chat template.
- Inputs: f = image, then all human turns joined by newlines; g = image, "Question: ..." line,
  "Answer: ..." line (`question_text`, `answer_text`).
- Training: Bradley-Terry loss on strict pairs plus corruption pairs (candidate > corrupted
  candidate) with probability `corruption_rate` per distinct candidate; LoRA on the LLM's linear
  layers (all of them, or only `layers_to_transform`), or a frozen LLM with a trainable projector.
  accelerate places it on CPU, one GPU or several processes.
- Frozen-prefix cache: when only the top LLM layers adapt (and the projector and vision tower are
  frozen) the hidden states entering the first adapted layer never change, so they are computed
  once and each step runs only the adapted layers: same result, several times faster.
- Saved layout (`save_reward_model`, `load_reward_model`): DIR/reward_config.json (kind, backbone
  reference and fingerprint, input format, max length), DIR/reward_head.safetensors (head and,
  if trained, projector weights) and, for LoRA, the peft adapter (adapter_config.json,
  adapter_model.safetensors). The backbone is named relative to DIR when it lies inside the
  working directory (the project), so the folders survive a move, a clone and `dvc pull`
  together with it; else by its absolute path. Its content fingerprint is checked at load.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

from align2llava.data.images import load_rgb, resolve_image
from align2llava.errors import Align2LlavaError, DataError
from align2llava.models.batching import pad_batch
from align2llava.models.precision import autocast, is_cpu, resolve

KINDS = ("question", "answer")
CONFIG_FILE = "reward_config.json"
HEAD_FILE = "reward_head.safetensors"
FORMAT = "align2llava-reward-model/2"


# ----------------------------------------------------------------------------- inputs


def question_text(questions: str | Sequence[str]) -> str:
    """f's text: all human turns of an instruction joined by newlines."""
    if isinstance(questions, str):
        return questions.strip()
    return "\n".join(q.strip() for q in questions)


def answer_text(question: str, answer: str) -> str:
    """g's text: a Question line and an Answer line."""
    return f"Question: {question.strip()}\nAnswer: {answer.strip()}"


class Encoder:
    """Text + image -> token ids and pixel values for the reward models (no chat template)."""

    def __init__(self, processor: Any, max_length: int, image_root: str | Path | None = None,
                 cache_images: int = 4096):
        from PIL import Image

        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.image_token = getattr(processor, "image_token", "<image>")
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        dummy = Image.new("RGB", (32, 32))
        enc = processor(text=[self.image_token], images=[dummy], return_tensors="pt")
        self.n_image_tokens = int((enc["input_ids"] == self.image_token_id).sum())
        self.max_length = max_length
        if max_length < self.n_image_tokens + 4:
            raise Align2LlavaError(
                f"max_length {max_length} leaves no room for text after {self.n_image_tokens} image tokens"
            )
        self.image_root = image_root
        self._pixels: OrderedDict[str, Any] = OrderedDict()
        self._cache_images = cache_images

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def ids(self, text: str, has_image: bool) -> list[int]:
        """Token ids with the image placeholder expanded, cut to max_length (text end dropped)."""
        prefix = f"{self.image_token}\n" if has_image else ""
        ids = self.tokenizer(prefix + text, add_special_tokens=True)["input_ids"]
        if has_image:
            k = ids.index(self.image_token_id)
            ids = ids[:k] + [self.image_token_id] * self.n_image_tokens + ids[k + 1 :]
        return ids[: self.max_length]

    def pixels(self, image: str) -> Any:
        """Pixel values of one image (relative to image_root), cached."""
        px = self._pixels.get(image)
        if px is not None:
            self._pixels.move_to_end(image)
            return px
        path = resolve_image(self.image_root, image) if self.image_root is not None else Path(image)
        px = self.image_processor(images=[load_rgb(path)], return_tensors="pt")["pixel_values"][0]
        self._pixels[image] = px
        if len(self._pixels) > self._cache_images:
            self._pixels.popitem(last=False)
        return px

    def batch(self, items: Sequence[tuple[list[int], str | None]], dtype: Any = None) -> dict[str, Any]:
        """Right-padded batch of (ids, image) items."""
        import torch

        out = pad_batch([ids for ids, _ in items], self.pad_id)
        images = [self.pixels(im) for _, im in items if im is not None]
        if images:
            px = torch.stack(images)
            out["pixel_values"] = px.to(dtype) if dtype is not None else px
        return out


# ----------------------------------------------------------------------------- model


def _torch_module() -> Any:
    import torch

    return torch.nn.Module


def last_token_index(attention_mask: Any) -> Any:
    """Index of the last non-padding token per row (left or right padding)."""
    import torch

    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (pos + 1)).argmax(-1)


POOLINGS = ("last", "last+min")


class RewardModel(_torch_module()):  # type: ignore[misc]
    """LLaVA backbone (LlavaModel, possibly peft-wrapped) + a linear head on the last token."""

    def __init__(self, backbone: Any, hidden_size: int, start_layer: int | None = None,
                 pooling: str = "last", text_start: int = 0):
        import torch

        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(hidden_size, 1, bias=False)
        torch.nn.init.zeros_(self.head.weight)
        if pooling not in POOLINGS:
            raise ValueError(f"reward pooling {pooling!r}: one of {', '.join(POOLINGS)}")
        # pooling "last+min": a second head scores every text token (from `text_start`, after
        # the image) and the reward adds their soft minimum, relative to their count
        self.pooling, self.text_start = pooling, text_start
        self.token_head = None
        if pooling == "last+min":
            self.token_head = torch.nn.Linear(hidden_size, 1, bias=False)
            torch.nn.init.zeros_(self.token_head.weight)
        # First adapted LLM layer when a frozen-prefix cache is used, else None.
        self.start_layer = start_layer
        self.autocast_dtype: Any = None

    def use_autocast(self, dtype: Any) -> None:
        """Run the backbone under autocast to `dtype` (bf16/fp16; None: off): matmuls in low
        precision, fp32 adapters without casting every activation to fp32; the head stays fp32."""
        import torch

        if dtype in (torch.bfloat16, torch.float16):
            self.autocast_dtype = dtype
            for m in self.backbone.modules():
                if hasattr(m, "cast_input_dtype_enabled"):
                    m.cast_input_dtype_enabled = False

    def _amp(self, device_type: str) -> Any:
        return autocast(device_type, self.autocast_dtype)

    def llava(self) -> Any:
        bb = self.backbone
        return bb.get_base_model() if hasattr(bb, "get_base_model") else bb

    def forward(self, input_ids: Any = None, attention_mask: Any = None, pixel_values: Any = None,
                hidden: Any = None) -> Any:
        """Rewards [B]. Given `hidden` (cached states entering `start_layer`), runs only the top."""

        with self._amp(attention_mask.device.type):
            if hidden is not None:
                lm = self.llava().language_model
                with _only_layers(lm, self.start_layer, None):
                    h = lm(inputs_embeds=hidden, attention_mask=attention_mask).last_hidden_state
            else:
                h = self.backbone(
                    input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values
                ).last_hidden_state
        idx = last_token_index(attention_mask)
        last = h[torch_arange(h.shape[0], h.device), idx]
        reward = self.head(last.to(self.head.weight.dtype)).squeeze(-1)
        if self.token_head is not None:
            reward = reward + self._soft_min(h, attention_mask)
        return reward

    def _soft_min(self, h: Any, attention_mask: Any) -> Any:
        """-logsumexp(-r_t) + log(n) over the text tokens' scores r_t: 0 when they are all
        equal, pulled down by the lowest (one token that contradicts the image)."""
        import torch

        r = self.token_head(h.to(self.token_head.weight.dtype)).squeeze(-1)
        # each token's place among the row's real tokens (left or right padding alike)
        place = attention_mask.long().cumsum(-1) - 1
        mask = attention_mask.bool() & (place >= self.text_start)
        n = mask.sum(-1).clamp(min=1)
        return -torch.logsumexp((-r).masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0) + n.log()

    def prefix_hidden(self, input_ids: Any, attention_mask: Any, pixel_values: Any = None) -> Any:
        """Hidden states entering layer `start_layer` (the frozen prefix), no grad."""
        import torch

        lm = self.llava().language_model
        captured: list[Any] = []
        hook = lm.norm.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            with torch.no_grad(), self._amp(input_ids.device.type), _only_layers(lm, 0, self.start_layer):
                self.llava()(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
        finally:
            hook.remove()
        return captured[0]


def torch_arange(n: int, device: Any) -> Any:
    import torch

    return torch.arange(n, device=device)


class _only_layers:
    """Temporarily run a decoder stack on layers[start:stop] (same modules, same weights)."""

    def __init__(self, lm: Any, start: int | None, stop: int | None):
        self.lm, self.start, self.stop = lm, start, stop

    def __enter__(self) -> None:
        self.saved = self.lm.layers
        self.lm.layers = self.saved[self.start : self.stop]

    def __exit__(self, *exc: Any) -> None:
        self.lm.layers = self.saved


def pair_text(kind: str, prompt: str, candidate: str) -> str:
    return question_text(candidate) if kind == "question" else answer_text(prompt, candidate)


# ----------------------------------------------------------------------------- scoring


def score_items(
    rm: RewardModel,
    encoder: Encoder,
    items: Sequence[tuple[str, str | None]],
    *,
    batch_size: int = 32,
    device: Any = "cpu",
    progress: str | None = None,
    meter: Any = None,
) -> list[float]:
    """Rewards of (text, image) items, batched by length (longest first), in input order.

    `progress` names a bar of its own; `meter` (an align2llava.progress.Progress) is advanced
    by the items and tokens of every batch instead."""
    import torch

    from align2llava.progress import Progress

    encoded = [(encoder.ids(t, im is not None), im) for t, im in items]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    out = [0.0] * len(items)
    dtype = next(p.dtype for p in rm.llava().parameters())
    rm.eval()
    own = meter is None and progress is not None
    if own:
        meter = Progress(len(items), progress, "items")
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            batch = encoder.batch([encoded[i] for i in chunk], dtype=dtype)
            batch = {k: v.to(device) for k, v in batch.items()}
            r = rm(**batch).float().cpu().tolist()
            for i, v in zip(chunk, r):
                out[i] = v
            if meter is not None:
                meter.update(len(chunk), tok=sum(len(encoded[i][0]) for i in chunk))
    if own:
        meter.close()
    return out


# ----------------------------------------------------------------------------- save / load


def backbone_reference(backbone: str | Path, out_dir: str | Path) -> str:
    """How reward_config.json names the backbone: relative to the reward-model folder when the
    backbone lies inside the working directory (the project root for DVC stages), else its
    absolute path (a checkpoint elsewhere on the machine)."""
    b, cwd = Path(backbone).resolve(), Path.cwd().resolve()
    if b == cwd or cwd in b.parents:
        return Path(os.path.relpath(b, Path(out_dir).resolve())).as_posix()
    return b.as_posix()


def save_reward_model(rm: RewardModel, out_dir: str | Path, *, kind: str, backbone: str,
                      max_length: int, grounding: dict[str, Any] | None = None) -> Path:
    """DIR/reward_config.json + DIR/reward_head.safetensors (+ the peft adapter). `grounding`:
    the answer RM's grounding term ({"feature", "weight", ...}; steps.grounding), added to the
    head's reward by whoever scores with it (`steps.grounding.load_grounding`)."""
    from safetensors.torch import save_file

    from align2llava.models.loading import checkpoint_fingerprint

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"head.weight": rm.head.weight.detach().float().cpu().contiguous()}
    if rm.token_head is not None:
        tensors["token_head.weight"] = rm.token_head.weight.detach().float().cpu().contiguous()
    proj = rm.llava().multi_modal_projector
    trained_projector = any(p.requires_grad for p in proj.parameters())
    if trained_projector:
        for n, p in proj.state_dict().items():
            tensors[f"multi_modal_projector.{n}"] = p.detach().float().cpu().contiguous()
    save_file(tensors, str(out / HEAD_FILE))
    lora = hasattr(rm.backbone, "peft_config")
    if lora:
        rm.backbone.save_pretrained(str(out))
    meta = {
        "format": FORMAT,
        "kind": kind,
        # relative to this folder (or absolute, see backbone_reference)
        "backbone": backbone_reference(backbone, out),
        "backbone_fingerprint": checkpoint_fingerprint(backbone),
        "adapter": "lora" if lora else None,
        "projector_in_head_file": trained_projector,
        "hidden_size": int(rm.head.weight.shape[1]),
        "pooling": rm.pooling,
        "text_start": rm.text_start,
        "max_length": max_length,
        "grounding": grounding,
        "input": "image, then human turns joined by newlines" if kind == "question"
        else "image, then 'Question: ...' and 'Answer: ...' lines",
    }
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_reward_config(path: str | Path) -> dict[str, Any]:
    f = Path(path) / CONFIG_FILE
    if not f.exists():
        raise DataError(f"{path}: no {CONFIG_FILE}; not a reward model saved by train-reward")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{f}: not valid JSON: {exc.msg}") from None
    for key in ("kind", "backbone", "hidden_size", "max_length"):
        if key not in meta:
            raise DataError(f"{f}: missing key '{key}'")
    return meta


def resolve_backbone(path: Path, meta: dict[str, Any], backbone: str | Path | None = None) -> Path:
    """The backbone folder of the reward model at `path`, its fingerprint checked.

    `backbone` (given) wins; else reward_config.json's reference, relative to `path` (format 2)
    or, in folders written before it (format 1), to the working directory.
    """
    from align2llava.models.loading import checkpoint_fingerprint

    named = meta["backbone"]
    if backbone is not None:
        base, how = Path(backbone), "given"
    elif meta.get("format") == "align2llava-reward-model/1":
        base, how = Path(named), "reward_config.json, relative to the working directory"
    else:
        base, how = path / named, "reward_config.json, relative to the reward-model folder"
    if not (base / "config.json").is_file():
        raise DataError(f"{path}: its backbone {base} ({how}: {named if backbone is None else backbone}) is not a "
                        "model folder; point score.backbone (or backbone=) at the checkpoint it was trained on")
    want = meta.get("backbone_fingerprint")
    if want is not None:
        got = checkpoint_fingerprint(base)
        if got != want:
            raise DataError(f"{path}: backbone {base} is not the checkpoint this reward model was trained on "
                            f"(content fingerprint {got[:12]}, reward_config.json has {want[:12]}); point "
                            "score.backbone (or backbone=) at that checkpoint, or retrain the reward models")
    return base


def load_reward_model(path: str | Path, *, backbone: str | Path | None = None, dtype: str = "auto",
                      device: str = "cpu", merge: bool = True) -> tuple[RewardModel, Any, dict[str, Any]]:
    """(reward model, processor, config) from a folder written by save_reward_model.

    The backbone is the one reward_config.json names (`resolve_backbone`); `backbone` points at
    it elsewhere (its fingerprint must still match). `merge`
    folds the LoRA adapter into float32 weights for faster inference (never into bf16 ones:
    rounding would wipe out the small LoRA deltas).
    """
    import torch
    from safetensors.torch import load_file

    from align2llava.models.loading import load_mllm

    path = Path(path)
    meta = read_reward_config(path)
    base = resolve_backbone(path, meta, backbone)
    model, processor = load_mllm(base, dtype="float32")
    llava = model.model
    del model
    prec = resolve(dtype, device, "score")
    prec.cast(llava)
    llava.requires_grad_(False)
    tensors = load_file(str(path / HEAD_FILE))
    if meta.get("projector_in_head_file"):
        proj = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("multi_modal_projector.")}
        llava.vision_tower.to(torch.float32)
        llava.multi_modal_projector.to(torch.float32).load_state_dict(proj)
    bb: Any = llava
    if meta.get("adapter") == "lora":
        from peft import PeftModel

        bb = PeftModel.from_pretrained(llava, str(path), is_trainable=False)
        if merge and prec.weights == "float32":  # a bf16 merge would round the small LoRA deltas away
            bb = bb.merge_and_unload()
    hidden = llava.config.text_config.hidden_size
    if hidden != meta["hidden_size"] or tensors["head.weight"].shape != (1, hidden):
        raise DataError(f"{path}: head size {tuple(tensors['head.weight'].shape)} does not fit backbone "
                        f"{base} (hidden size {hidden})")
    if is_cpu(device):
        llava.set_attn_implementation("eager")  # as in training (see build_reward_model)
    rm = RewardModel(bb, hidden, pooling=meta.get("pooling", "last"), text_start=int(meta.get("text_start", 0)))
    rm.head.weight.data.copy_(tensors["head.weight"])
    if rm.token_head is not None:
        if "token_head.weight" not in tensors:
            raise DataError(f"{path}: reward_config.json says pooling {rm.pooling} but {HEAD_FILE} has no token_head.weight")
        rm.token_head.weight.data.copy_(tensors["token_head.weight"])
    rm.to(device).eval()
    rm.use_autocast(prec.autocast_dtype)
    return rm, processor, meta
