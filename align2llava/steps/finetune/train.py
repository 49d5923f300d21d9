"""LLaVA visual instruction tuning (LLaVA-1.5 stage 2) of an HF-layout LLaVA on LLaVA JSON.

    examples = prepare_examples(records, processor, file="curated.json", max_length=512)
    result = finetune(params, base_model="models/pretrain", data="curated.json",
                      image_root="images", out_dir="models/finetune")

Loss only on assistant turns. Labels come from the chat template itself: the conversation is
rendered with the processor's template, the character span of each assistant reply is found by
rendering the conversation up to that reply with and without it, and a token is trained on when
its offset (from the tokenizer's offset mapping) starts inside such a span. Nothing depends on
hand-counted separator lengths, so a template change cannot silently mask a whole sample; a
record whose labels end up fully masked anyway (e.g. truncated away by `max_length`) is an error
that names the file, record and id.

Training runs through the transformers Trainer (accelerate underneath: one CPU, one GPU or
`accelerate launch` on many). LoRA (peft) on the LLM's linear layers with the projector trained
at its own learning rate, or full fine-tuning; the vision tower stays frozen unless asked.
Checkpoints are HF-layout `checkpoint-N/` folders, resumed automatically when the data and
params are the same; the final model is saved merged, loadable by `models.loading.load_mllm`.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator

from align2llava.config import Section
from align2llava.data.io import fingerprint, read_records_strict, write_csv
from align2llava.data.records import validate_records
from align2llava.errors import Align2LlavaError, DataError
from align2llava.models.lora import LLM_LINEAR, lora_regex
from align2llava.models.precision import resolve
from align2llava.models.runtime import cpu_seconds, peak_memory_mb, process_state
from align2llava.progress import Progress
from align2llava.steps.finetune.data import IGNORE_INDEX, InstructionDataset, collate, prepare_examples

log = logging.getLogger(__name__)

PROJECTOR = "multi_modal_projector"
VISION_TOWER = "vision_tower"


class FinetuneParams(Section):
    """The `finetune:` section. Names follow LLaVA's train.py / transformers TrainingArguments.
    Defaults are the demo's params.yaml values (a test keeps them equal); `paper:` comments give
    LLaVA-1.5's stage-2 settings."""

    # "lora": peft LoRA on the LLM + trainable projector; "full": LLM and projector trained.
    # paper: lora. none: save the base unchanged (the not-fine-tuned baseline of the compression
    # experiment)
    mode: Literal["lora", "full", "none"] = "lora"
    seed: int = 0
    learning_rate: float = 2.0e-4  # paper: 2.0e-4
    # The projector's own learning rate (LLaVA's mm_projector_lr); null: learning_rate.
    mm_projector_lr: float | None = 2.0e-5  # paper: 2.0e-5
    num_train_epochs: float = 3.0  # paper: 1
    # > 0 overrides num_train_epochs (as in transformers).
    max_steps: int = -1
    # paper: global batch 128 (per_device_train_batch_size x processes x gradient_accumulation_steps)
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.03  # paper: 0.03
    lr_scheduler_type: str = "cosine"  # paper: cosine
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # Tokens per example (image tokens included); longer records are cut at the end.
    max_length: int = 512  # paper: 2048
    lora_r: int = 16  # paper: 128
    lora_alpha: int = 32  # paper: 256
    lora_dropout: float = 0.05  # paper: 0.05
    # Linear layers of the LLM that get LoRA ("all-linear": every one); never vision or lm_head.
    lora_target_modules: list[str] | Literal["all-linear"] = LLM_LINEAR  # paper: every LLM linear layer
    # LLM layer indices that get LoRA (negative: from the top; null: all, as the paper). With the
    # projector frozen too, backward stops at the lowest of them: much cheaper on small hardware.
    layers_to_transform: list[int] | None = [-4, -3, -2, -1]
    # LLaVA's name: keep the projector frozen (false: it trains at mm_projector_lr, as the paper).
    freeze_mm_mlp_adapter: bool = True
    tune_vision_tower: bool = False
    # LLaVA JSON/JSONL records trained on next to the selection in every fine-tune, never curated
    # or rewritten: the fixed part of the mix (LLaVA-1.5 tunes on academic VQA next to the
    # instruction data). null: the selection alone.
    mix: str | None = None
    gradient_checkpointing: bool = False
    # Batch records of similar length together (less padding; LLaVA's group_by_modality_length).
    group_by_length: bool = True
    logging_steps: int = 1
    save_steps: int = 20
    save_total_limit: int = 1
    # Trainer checkpoints (HF layout); a rerun with the same data and params resumes from the
    # last one. Removed after a successful run unless keep_checkpoints.
    checkpoint_dir: str = ".cache/finetune/checkpoints"
    keep_checkpoints: bool = False
    resume: bool = True
    dataloader_num_workers: int = 0

    @field_validator("warmup_ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("must be in [0, 1)")
        return v

    @field_validator("per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "lora_r")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v


def prepare_model(model: Any, params: FinetuneParams) -> Any:
    """Freeze/unfreeze and wrap with LoRA as params say; returns the model to train."""
    for p in model.parameters():
        p.requires_grad = False
    if params.mode == "full":
        for name, p in model.named_parameters():
            frozen = (VISION_TOWER in name and not params.tune_vision_tower) or (
                PROJECTOR in name and params.freeze_mm_mlp_adapter
            )
            p.requires_grad = not frozen
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=params.lora_r,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        target_modules=lora_regex(
            params.lora_target_modules,
            params.layers_to_transform,
            model.config.text_config.num_hidden_layers,
            "finetune.",
        ),
        modules_to_save=([] if params.freeze_mm_mlp_adapter else [PROJECTOR])
        + ([VISION_TOWER] if params.tune_vision_tower else []),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    if not any("lora_" in n for n, _ in peft_model.named_parameters()):
        raise Align2LlavaError(
            f"finetune.lora_target_modules {params.lora_target_modules} match no linear layer of the LLM"
        )
    return peft_model


def param_groups(model: Any, params: FinetuneParams) -> list[dict[str, Any]]:
    """Trainable parameters in groups: the projector at mm_projector_lr, the rest at learning_rate."""
    proj, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (proj if PROJECTOR in name else rest).append(p)
    groups = []
    if rest:
        groups.append({"params": rest, "lr": params.learning_rate, "weight_decay": params.weight_decay})
    if proj:
        lr = params.mm_projector_lr if params.mm_projector_lr is not None else params.learning_rate
        groups.append({"params": proj, "lr": lr, "weight_decay": params.weight_decay})
    return groups


def answer_loss(model: Any, inputs: dict[str, Any], num_items: Any = None) -> tuple[Any, Any]:
    """Next-token cross-entropy on labelled positions, with lm_head logits computed only at the
    positions whose next token is labelled in some row of the batch (the 49k-vocab head is a
    large part of a small model's cost). Summed and divided by `num_items` (the labelled tokens
    of the whole accumulated batch) when given, else the batch's mean."""
    import torch.nn.functional as F

    inputs = dict(inputs)
    labels = inputs.pop("labels")
    target = labels[:, 1:]
    keep = (target != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
    y = target[:, keep]
    total = F.cross_entropy(
        outputs.logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    denom = num_items if num_items is not None else (y != IGNORE_INDEX).sum().clamp(min=1)
    return total / denom, outputs


def merged(model: Any) -> Any:
    """The plain LLaVA model to save: LoRA merged into the weights, projector copies swapped in."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


# ---------------------------------------------------------------------------- training


@dataclass
class FinetuneResult:
    metrics: dict[str, Any]
    steps: list[dict[str, float]]  # [{"step", "loss", "learning_rate"}]
    model: Any = None  # the merged model, as saved


def prepare_checkpoint_dir(folder: Path, stamp: str, resume: bool) -> None:
    """Keep `folder`'s checkpoints only when resuming from the same data and params."""
    old = folder / "fingerprint.txt"
    if folder.is_dir() and (not resume or not old.exists() or old.read_text().strip() != stamp):
        if resume and any(folder.glob("checkpoint-*")):
            log.info("%s: checkpoints are from other data or params; starting fresh", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    old.write_text(stamp + "\n")


def last_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint-N folder in `folder`, if any."""
    from transformers.trainer_utils import get_last_checkpoint

    found = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    return Path(found) if found else None


def finetune(
    params: FinetuneParams,
    *,
    base_model: str | Path,
    data: str | Path,
    image_root: str | Path,
    out_dir: str | Path,
    dtype: str = "auto",
    on_step: Any = None,
) -> FinetuneResult:
    """Fine-tune `base_model` on the LLaVA JSON `data`; save the merged model to `out_dir`.

    `on_step(step, {"loss": ..., "learning_rate": ...})` is called at every logging step.
    """
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

    from align2llava.models.loading import load_mllm

    data, out_dir, base_model = Path(data), Path(out_dir), Path(base_model)
    records = _read_valid(data, image_root)
    if not records:
        raise DataError(f"{data}: no records to fine-tune on")
    mix = Path(params.mix) if params.mix else None
    mix_records = _read_valid(mix, image_root) if mix else []
    clash = sorted({str(r["id"]) for r in records} & {str(r["id"]) for r in mix_records})
    if clash:
        raise DataError(f"{mix}: record id {clash[0]!r} is also in {data} ({len(clash)} shared ids): "
                        "finetune.mix must hold other records than the selection")

    set_seed(params.seed)
    model, processor = load_mllm(base_model, dtype="float32")
    if params.mode == "none":
        save_model(model, processor, out_dir)
        log.info("mode none: %s saved unchanged to %s (no training)", base_model, out_dir)
        metrics = {"train_records": 0, "mix_records": 0, "steps": 0, "train_loss": None, "first_loss": None,
                   "final_loss": None, "train_seconds": 0.0, **peak_memory_mb()}
        return FinetuneResult(metrics, [], model)
    examples = [e for recs, f in ((records, data), (mix_records, mix)) if recs
                for e in prepare_examples(recs, processor, file=str(f), max_length=params.max_length, image_root=image_root)]
    n_tokens = sum(len(e.input_ids) for e in examples)
    n_answer = sum(sum(1 for t in e.labels if t != IGNORE_INDEX) for e in examples)
    log.info(
        "encoded %s records: %s tokens, %s of them answer tokens (%.0f%%)",
        f"{len(examples):,}", f"{n_tokens:,}", f"{n_answer:,}", 100 * n_answer / max(n_tokens, 1),
    )
    model.config.use_cache = False
    model = prepare_model(model, params)
    if params.gradient_checkpointing:
        model.enable_input_require_grads()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("training %s of %s parameters (%s)", f"{trainable:,}", f"{total:,}", params.mode)

    ckpt_dir = Path(params.checkpoint_dir)
    # what a checkpoint was made from (resume only when it matches): data, params, base model
    stamp = fingerprint(data, *([mix] if mix else []), base_model / "config.json", extra=[params.model_dump(), str(base_model.resolve())])[:16]
    state = process_state()
    if state.is_main_process:  # one process tidies the checkpoint folder, the others wait
        prepare_checkpoint_dir(ckpt_dir, stamp, params.resume)
    state.wait_for_everyone()
    resume_from = last_checkpoint(ckpt_dir) if params.resume else None

    # fp32 weights; bf16/fp16 autocast (mixed precision) where the hardware computes it natively
    prec = resolve(dtype, "cuda" if torch.cuda.is_available() else "cpu", "finetune")
    bf16, fp16 = prec.autocast == "bfloat16", prec.autocast == "float16"
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        seed=params.seed,
        learning_rate=params.learning_rate,
        num_train_epochs=params.num_train_epochs,
        max_steps=params.max_steps,
        per_device_train_batch_size=params.per_device_train_batch_size,
        gradient_accumulation_steps=params.gradient_accumulation_steps,
        warmup_steps=params.warmup_ratio,  # transformers 5: a float < 1 is a ratio
        lr_scheduler_type=params.lr_scheduler_type,
        weight_decay=params.weight_decay,
        max_grad_norm=params.max_grad_norm,
        activation_checkpointing=params.gradient_checkpointing,
        logging_steps=params.logging_steps,
        save_strategy="steps",
        save_steps=params.save_steps,
        save_total_limit=params.save_total_limit,
        bf16=bf16,
        fp16=fp16,
        use_cpu=bf16 and not torch.cuda.is_available(),  # bf16 autocast on a CPU with native bf16
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=params.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=None,
    )

    class LlavaTrainer(Trainer):
        def create_optimizer(self, model=None):  # projector at its own learning rate
            if self.optimizer is None:
                cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model or self.model)
                kwargs.pop("lr", None)
                self.optimizer = cls(param_groups(model or self.model, params), **kwargs)
            return self.optimizer

        def _get_train_sampler(self, train_dataset=None):
            if not params.group_by_length:
                return super()._get_train_sampler(train_dataset)
            from transformers.trainer_pt_utils import LengthGroupedSampler

            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                lengths=[len(e.input_ids) for e in examples],
            )

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = answer_loss(model, inputs, num_items_in_batch)
            self.loss_is_scaled_for_ga = num_items_in_batch is not None
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    class StepLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and on_step is not None:
                on_step(state.global_step, {"loss": logs["loss"], "learning_rate": logs.get("learning_rate", 0.0)})

    # a log line every 30 s with steps/s, tokens/s (all processes, from the epoch's token count) and ETA
    per_step = math.ceil(len(examples) / (params.per_device_train_batch_size * params.gradient_accumulation_steps
                                          * state.num_processes))
    step_tokens = n_tokens / max(per_step, 1)

    class ProgressLog(TrainerCallback):
        meter: Progress | None = None

        def on_train_begin(self, args, st, control, **kw):
            if st.is_world_process_zero:
                self.meter = Progress(st.max_steps, "finetune", "steps", log, initial=st.global_step, bar=False)

        def on_step_end(self, args, st, control, **kw):
            if self.meter is not None:
                self.meter.update(1, tok=step_tokens)

        def on_log(self, args, st, control, logs=None, **kw):
            if self.meter is not None and logs and "loss" in logs:
                self.meter.status = f"loss {logs['loss']:.4f}"

        def on_train_end(self, args, st, control, **kw):
            if self.meter is not None:
                self.meter.close()

    pad = processor.tokenizer.pad_token_id
    trainer = LlavaTrainer(
        model=model,
        args=args,
        train_dataset=InstructionDataset(examples, processor),
        data_collator=lambda batch: collate(batch, pad),
        callbacks=[StepLog(), ProgressLog()],
    )
    if resume_from:
        log.info("resuming from %s", resume_from)
    t0, c0 = time.perf_counter(), cpu_seconds()
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0

    steps = [
        {"step": h["step"], "loss": h["loss"], "learning_rate": h.get("learning_rate", 0.0)}
        for h in trainer.state.log_history
        if "loss" in h
    ]
    # unwrapped: no DDP wrapper, no mixed-precision forward patch; LoRA merged into the weights
    final = merged(trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False))
    if trainer.is_world_process_zero():
        save_model(final, processor, out_dir)
        if not params.keep_checkpoints:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    epochs = float(trainer.state.epoch or 0.0)
    # share of all steps that this run did (the rest came from a resumed checkpoint)
    run_share = 1.0 - (_step_of(resume_from) if resume_from else 0) / max(trainer.state.global_step, 1)
    metrics: dict[str, Any] = {
        "dtype": "bf16 mixed" if bf16 else "fp16 mixed" if fp16 else "fp32",
        "train_records": len(records),  # the selection's; the mix's below
        "mix_records": len(mix_records),
        "train_tokens": n_tokens,
        "answer_tokens": n_answer,
        "train_loss": round(float(output.training_loss), 6),
        "first_loss": round(steps[0]["loss"], 6) if steps else None,
        "final_loss": round(steps[-1]["loss"], 6) if steps else None,
        "steps": trainer.state.global_step,
        "epochs": round(epochs, 3),
        "train_seconds": round(seconds, 2),
        # CPU time of this process (all threads): comparable across loads on a shared machine
        "train_cpu_seconds": round(cpu, 2),
        "tokens_per_second": round(n_tokens * epochs * run_share / max(seconds, 1e-9), 1),
        "trainable_params": trainable,
        "total_params": total,
        "resumed_from_step": _step_of(resume_from) if resume_from else 0,
        **peak_memory_mb(),
    }
    log.info(
        "trained %s steps (%.2f epochs) in %.0f s at %s tok/s; loss %.4f -> %.4f",
        metrics["steps"], epochs, seconds, f"{metrics['tokens_per_second']:,.0f}",
        metrics["first_loss"] or float("nan"), metrics["final_loss"] or float("nan"),
    )
    return FinetuneResult(metrics, steps, final)


def _read_valid(path: Path, image_root: str | Path) -> list[dict[str, Any]]:
    """The LLaVA records of `path`; the first bad one is an error naming the file and record."""
    records = read_records_strict(path)
    problems = validate_records(records, str(path), image_root=image_root, check_images=False)
    if problems:
        raise DataError(str(problems[0]) + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
    return records


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def save_model(model: Any, processor: Any, out_dir: Path) -> Path:
    """Save model + processor (HF layout) through a temporary folder, then swap it in."""
    model.config.use_cache = True
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    processor.save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)
    return out_dir


def write_steps_csv(steps: list[dict[str, float]], path: str | Path) -> Path:
    """plots/finetune/steps.csv: step, loss (6 decimals), learning_rate (3 significant digits)."""
    rows = [[s["step"], f"{s['loss']:.6f}", f"{s['learning_rate']:.3e}"] for s in steps]
    return write_csv(rows, path, ["step", "loss", "learning_rate"])
