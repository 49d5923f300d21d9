"""GPU profile at LLaVA-1.5-7B's exact dimensions, random weights (nothing downloaded).

    python -m benchmarks.gpu_profile                          # one GPU
    python -m benchmarks.gpu_profile --attn flash_attention_2 --score-batch-sizes 16,32,64,128
    python -m benchmarks.gpu_profile --pool llava_instruct_150k.json --tokenizer /path/to/llava-1.5-7b-hf
    python -m benchmarks.gpu_profile --tiny --device cpu      # the same code on a tiny config (tests)

Builds LlavaForConditionalGeneration with llava-hf/llava-1.5-7b-hf's config (Vicuna-7B: 32
layers, hidden 4096, 32 heads, MLP 11008, vocab 32064; CLIP ViT-L/14 at 336 px, 24 layers,
hidden 1024, features from layer -2, 576 image tokens; a 2-layer gelu projector) on the device,
then measures:

1. Reward-model scoring, the `score` stage's forward (align2llava's RewardModel: LlavaModel
   without the LM head, a linear head at the last token) in bf16 under inference mode, on
   question items (image + `--question-tokens` text tokens) and answer items (image +
   `--answer-tokens`): items/s, tokens/s and peak memory at each batch size of
   `--score-batch-sizes` until memory runs out; it picks the fastest that fits (set
   score.batch_size to it) and prints records/s at `--turns` QA turns per record.
2. Fine-tuning steps as the `finetune` stage runs them with configs/params/llava-1.5-7b.yaml:
   float32 weights with bf16 autocast (the Trainer's bf16 mixed precision), SDPA attention
   (the stages load with transformers' default; --attn applies to scoring), LoRA r 128 on every
   LLM linear layer, the projector trained, the vision tower frozen, gradient checkpointing,
   AdamW, the answer-only loss; `--finetune-batch` sequences of `--seq-len` tokens (576 of them
   image tokens). Prints tokens/s, seconds per step, peak memory and MFU: model FLOPs per token
   = 2 x N_frozen + 6 x N_lora of the LLM's linear layers (frozen weights get no weight
   gradient), + 6 x n_layers x seq x hidden for attention, + the LM head at labelled positions,
   + the vision tower's forward per image; gradient-checkpointing recomputation is not counted.
   Peak bf16 dense TFLOPS: H100/H200 SXM 989, H100 PCIe 756, A100 312, else pass --peak-tflops.
3. The projected time to score LLaVA-Instruct-158k (`--records`, 158,000): one question item
   and one answer item per QA turn, at the measured items/s, on 1 and on 8 GPUs (data-parallel
   shards, assumed to scale linearly); for 1, 2 and 4 turns per record, or exactly for --pool.

The assumptions (text lengths, turns) are printed with the figures; --pool with --tokenizer
replaces them with the pool's own (mean text tokens per item, QA turns per record).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

IMAGE_TOKENS = 576
IMAGE_ID, PAD_ID = 32000, 32001
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0)]
LLAVA15_7B = dict(vocab=32064, hidden=4096, layers=32, heads=32, mlp=11008,
                  v_hidden=1024, v_layers=24, v_heads=16, v_mlp=4096)
TINY = dict(vocab=512, hidden=64, layers=2, heads=4, mlp=128, v_hidden=32, v_layers=2, v_heads=4, v_mlp=64)


def llava_config(dims: dict[str, int], attn: str) -> Any:
    """llava-hf/llava-1.5-7b-hf's config.json (dims = LLAVA15_7B), or the same shape smaller."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=dims["vocab"], hidden_size=dims["hidden"], intermediate_size=dims["mlp"],
                       num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"],
                       num_key_value_heads=dims["heads"], max_position_embeddings=4096, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=dims["v_hidden"], intermediate_size=dims["v_mlp"],
                              num_hidden_layers=dims["v_layers"], num_attention_heads=dims["v_heads"],
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=min(IMAGE_ID, dims["vocab"] - 2),
                         projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=IMAGE_TOKENS,
                         tie_word_embeddings=False)
    config.pad_token_id = min(PAD_ID, dims["vocab"] - 1)
    config._attn_implementation = attn
    return config


def build(config: Any, device: str, dtype: Any) -> Any:
    """A random-weight LlavaForConditionalGeneration made directly on `device` in `dtype`."""
    import torch
    from transformers import LlavaForConditionalGeneration

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(config, attn_implementation=config._attn_implementation)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def batch_inputs(config: Any, batch: int, text_tokens: int, device: str, dtype: Any, seed: int = 0) -> dict[str, Any]:
    """BOS, the image's 576 placeholders, random text ids; random pixels."""
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab_text = min(config.image_token_index, config.text_config.vocab_size) - 3
    text = torch.randint(3, 3 + vocab_text, (batch, text_tokens), generator=g)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long),
                     torch.full((batch, IMAGE_TOKENS), config.image_token_index), text], 1)
    pixels = torch.randn(batch, 3, 336, 336, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, dtype)}


class Meter:
    """Wall time with device synchronisation, and peak memory (CUDA allocator, else RSS)."""

    def __init__(self, device: str):
        import torch

        self.cuda = device.startswith("cuda") and torch.cuda.is_available()

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float:
        import torch

        from align2llava.models.runtime import peak_rss_mb

        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**30
        return peak_rss_mb() / 1024

    def oom(self, exc: BaseException) -> bool:
        import torch

        return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


@dataclass
class ScoreRow:
    batch: int
    question_items_s: float
    answer_items_s: float
    tokens_s: float
    peak_gb: float


def profile_scoring(model: Any, config: Any, device: str, batch_sizes: list[int], q_tokens: int, a_tokens: int,
                    repeats: int, meter: Meter) -> list[ScoreRow]:
    """The score stage's forward at each batch size until one does not fit."""
    import torch

    from align2llava.models.reward_model import RewardModel

    rm = RewardModel(model.model, config.text_config.hidden_size).to(device)
    rm.head.to(torch.float32)
    torch.nn.init.normal_(rm.head.weight)
    dtype = next(model.parameters()).dtype
    rows = []
    for bs in batch_sizes:
        meter.reset()
        try:
            rates = []
            with torch.inference_mode():
                for k, n_text in enumerate((q_tokens, a_tokens)):
                    inputs = batch_inputs(config, bs, n_text, device, dtype, seed=k)
                    rm(**inputs)  # warm-up (kernels, allocator)
                    meter.sync()
                    t0 = time.perf_counter()
                    for _ in range(repeats):
                        rm(**inputs)
                    meter.sync()
                    rates.append(bs * repeats / (time.perf_counter() - t0))
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            if not meter.oom(exc):
                raise
            print(f"  batch {bs}: out of memory; stopping the sweep")
            break
        length = 1 + IMAGE_TOKENS + (q_tokens + a_tokens) / 2
        rows.append(ScoreRow(bs, rates[0], rates[1], (rates[0] + rates[1]) / 2 * length, meter.peak_gb()))
        r = rows[-1]
        print(f"  batch {bs:4d}: question {r.question_items_s:8.1f} items/s, answer {r.answer_items_s:8.1f} "
              f"items/s, ~{r.tokens_s:,.0f} tokens/s, peak {r.peak_gb:.1f} GB")
    del rm
    return rows


def seconds_per_record(row: ScoreRow, turns: float) -> float:
    """One question item and one answer item per QA turn."""
    return 1.0 / row.question_items_s + turns / row.answer_items_s


def projection(row: ScoreRow, turns: float, records: int, gpus: int = 1) -> float:
    """Hours to score `records` on `gpus` (data-parallel shards, linear scaling assumed)."""
    return records * seconds_per_record(row, turns) / gpus / 3600


def finetune_flops_per_token(model: Any, config: Any, seq_len: int, labelled: float) -> float:
    """Model FLOPs per token of one LoRA training step (see the module docstring)."""
    lm = model.get_base_model().model.language_model if hasattr(model, "get_base_model") else model.model.language_model
    frozen = lora = 0
    for name, p in lm.layers.named_parameters():
        if "lora_" in name:
            lora += p.numel()
        elif p.dim() == 2:
            frozen += p.numel()
    t = config.text_config
    attention = 6 * t.num_hidden_layers * seq_len * t.hidden_size
    head = 6 * t.hidden_size * t.vocab_size * labelled  # fwd + input grad + ... at labelled positions only
    vision = model.get_base_model().model.vision_tower if hasattr(model, "get_base_model") else model.model.vision_tower
    n_vision = sum(p.numel() for p in vision.parameters() if p.dim() == 2)
    vision_per_token = 2 * n_vision * (IMAGE_TOKENS + 1) / seq_len
    return 2 * frozen + 6 * lora + attention + head + vision_per_token


def device_peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_TFLOPS:
        if key in name:
            return value
    return None


def profile_finetune(config: Any, device: str, batch: int, seq_len: int, steps: int, checkpointing: bool,
                     meter: Meter) -> dict[str, Any]:
    """Fine-tune steps as the finetune stage runs them with the llava-1.5-7b preset."""
    import torch
    import yaml

    from align2llava.steps.finetune.data import IGNORE_INDEX
    from align2llava.steps.finetune.train import FinetuneParams, answer_loss, param_groups, prepare_model

    preset = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/params/llava-1.5-7b.yaml").read_text())
    params = FinetuneParams(**preset["finetune"])
    meter.reset()
    # as the stage loads it: float32 weights (bf16 autocast), transformers' default attention (SDPA)
    config._attn_implementation = "eager" if config._attn_implementation == "eager" else "sdpa"
    model = build(config, device, torch.float32)
    model.config.use_cache = False
    model = prepare_model(model, params)
    if checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5, as the Trainer calls it
            model.activation_checkpointing_enable()
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW(param_groups(model, params), fused=meter.cuda)
    inputs = batch_inputs(config, batch, seq_len - 1 - IMAGE_TOKENS, device, torch.float32)
    labels = inputs["input_ids"].clone()
    answer_from = 1 + IMAGE_TOKENS + (seq_len - 1 - IMAGE_TOKENS) // 4  # the last 3/4 of the text: the answers
    labels[:, :answer_from] = IGNORE_INDEX
    inputs["labels"] = labels
    amp = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=meter.cuda)
    times = []
    for step in range(steps + 1):  # the first step warms up
        meter.sync()
        t0 = time.perf_counter()
        with amp:
            loss, _ = answer_loss(model, inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), params.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        meter.sync()
        if step:
            times.append(time.perf_counter() - t0)
    step_s = sum(times) / len(times)
    labelled = (labels != IGNORE_INDEX).float().mean().item()
    flops = finetune_flops_per_token(model, config, seq_len, labelled)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = {"step_s": step_s, "tokens_s": batch * seq_len / step_s, "peak_gb": meter.peak_gb(),
           "flops_per_token": flops, "trainable": trainable, "loss": float(loss.detach())}
    del model, opt
    return out


def pool_stats(pool: Path, tokenizer_dir: Path) -> tuple[float, float, float]:
    """(mean question-item text tokens, mean answer-item text tokens, mean QA turns) of a pool."""
    from transformers import AutoTokenizer

    from align2llava.data.io import read_records
    from align2llava.steps.scoring import record_items

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    loaded = read_records(pool)
    q_len = a_len = turns = n_a = 0
    for rec in loaded.records:
        q, per_turn = record_items(rec)
        q_len += len(tok(q, add_special_tokens=False)["input_ids"])
        turns += len(per_turn)
        for cands in per_turn:
            for text in cands:
                a_len += len(tok(text, add_special_tokens=False)["input_ids"])
                n_a += 1
    n = max(len(loaded.records), 1)
    return q_len / n, a_len / max(n_a, 1), turns / n


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@click.command()
@click.option("--device", default="cuda", show_default=True, help="cuda, cuda:1, or cpu (only with --tiny).")
@click.option("--attn", type=click.Choice(["sdpa", "flash_attention_2", "eager"]), default="sdpa", show_default=True,
              help="Attention kernels (flash_attention_2 needs the flash-attn package).")
@click.option("--score-batch-sizes", default="1,4,8,16,32,64,128", show_default=True,
              help="Scoring batch sizes to sweep (stops at the first that does not fit).")
@click.option("--question-tokens", default=40, show_default=True, help="Text tokens of a question item (assumed; --pool measures).")
@click.option("--answer-tokens", default=160, show_default=True, help="Text tokens of an answer item (assumed; --pool measures).")
@click.option("--repeats", default=5, show_default=True, help="Timed forward passes per batch size and item kind.")
@click.option("--finetune-batch", default=16, show_default=True, help="Sequences per fine-tune step (per GPU; the preset's).")
@click.option("--seq-len", default=1024, show_default=True, help="Tokens per fine-tune sequence, 577 of them BOS + image.")
@click.option("--steps", default=3, show_default=True, help="Timed fine-tune steps (after one warm-up step).")
@click.option("--no-checkpointing", is_flag=True, help="Fine-tune without gradient checkpointing.")
@click.option("--records", default=158_000, show_default=True, help="Pool size for the projection (LLaVA-Instruct-158k).")
@click.option("--pool", type=click.Path(path_type=Path, exists=True), help="A LLaVA pool: measure its text lengths and turns.")
@click.option("--tokenizer", type=click.Path(path_type=Path, exists=True), help="A llava-hf folder whose tokenizer counts --pool's tokens.")
@click.option("--peak-tflops", type=float, help="The device's peak dense bf16 TFLOPS, for MFU.")
@click.option("--skip-finetune", is_flag=True)
@click.option("--tiny", is_flag=True, help="A tiny config of the same shape (quick check on any machine).")
def main(device: str, attn: str, score_batch_sizes: str, question_tokens: int, answer_tokens: int, repeats: int,
         finetune_batch: int, seq_len: int, steps: int, no_checkpointing: bool, records: int, pool: Path | None,
         tokenizer: Path | None, peak_tflops: float | None, skip_finetune: bool, tiny: bool) -> None:
    """Print reward-model scoring and LoRA fine-tune throughput at LLaVA-1.5-7B's dimensions."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.ClickException("no CUDA device; this profile is for GPUs (use --tiny --device cpu to check the code)")
    if device == "cpu" and not tiny:
        raise click.ClickException("a 7B model on a CPU would take hours; add --tiny")
    turns_list = [1.0, 2.0, 4.0]
    if pool is not None:
        if tokenizer is None:
            raise click.ClickException("--pool needs --tokenizer (a llava-hf folder) to count tokens")
        q_mean, a_mean, turns = pool_stats(pool, tokenizer)
        question_tokens, answer_tokens, turns_list = round(q_mean), round(a_mean), [turns]
        print(f"pool {pool}: {question_tokens} text tokens per question item, {answer_tokens} per answer item, "
              f"{turns:.2f} QA turns per record")
    meter = Meter(device)
    name = torch.cuda.get_device_name(device) if meter.cuda else "cpu"
    config = llava_config(TINY if tiny else LLAVA15_7B, attn)
    dtype = torch.bfloat16 if meter.cuda else torch.float32
    print(f"device {name}; {'tiny config' if tiny else 'llava-1.5-7b dimensions'}, random weights, "
          f"attention {attn}, torch {torch.__version__}")

    t0 = time.perf_counter()
    model = build(config, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built {n_params / 1e9:.2f}B parameters in {time.perf_counter() - t0:.0f} s ({str(dtype).split('.')[-1]})")
    print(f"scoring (reward-model forward, {str(dtype).split('.')[-1]}, inference mode): question items "
          f"{1 + IMAGE_TOKENS + question_tokens} tokens, answer items {1 + IMAGE_TOKENS + answer_tokens} tokens")
    rows = profile_scoring(model, config, device, _ints(score_batch_sizes), question_tokens, answer_tokens,
                           repeats, meter)
    del model
    if not rows:
        raise click.ClickException("not even the smallest scoring batch fits")
    best = max(rows, key=lambda r: seconds_per_record(r, 1.0) ** -1)
    print(f"picked score.batch_size {best.batch}: {best.question_items_s:.1f} question + {best.answer_items_s:.1f} "
          f"answer items/s, ~{best.tokens_s:,.0f} tokens/s, peak {best.peak_gb:.1f} GB")
    for turns in turns_list:
        per_s = 1.0 / seconds_per_record(best, turns)
        print(f"  {turns:.2f} QA turns per record: {per_s:.1f} records/s; {records:,} records: "
              f"{projection(best, turns, records):.2f} h on 1 GPU, {projection(best, turns, records, 8):.2f} h on 8")

    if skip_finetune:
        return
    print(f"fine-tune step (LoRA r 128 on every LLM linear layer, projector trained, fp32 weights + bf16 autocast, "
          f"gradient checkpointing {'off' if no_checkpointing else 'on'}): {finetune_batch} x {seq_len} tokens")
    batch = finetune_batch
    while True:
        try:
            ft = profile_finetune(config, device, batch, seq_len, steps, not no_checkpointing, meter)
            break
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            if not meter.oom(exc) or batch == 1:
                raise
            batch //= 2
            print(f"  out of memory; trying {batch} sequences per step (raise gradient_accumulation_steps to match)")
    peak = device_peak_tflops(name, peak_tflops)
    achieved = ft["tokens_s"] * ft["flops_per_token"] / 1e12
    mfu = f"{100 * achieved / peak:.1f}% of {peak:.0f} TFLOPS" if peak else "n/a (pass --peak-tflops)"
    print(f"  {ft['tokens_s']:,.0f} tokens/s, {ft['step_s']:.2f} s/step at {batch} x {seq_len}, peak "
          f"{ft['peak_gb']:.1f} GB, {ft['trainable'] / 1e6:.0f}M trainable; {achieved:.1f} model TFLOPS, MFU {mfu}")
    per_epoch = records * 0.09 * (seq_len) / ft["tokens_s"] / 3600  # the curated 9%
    if math.isfinite(per_epoch):
        print(f"  one epoch over a 9% selection of {records:,} records at {seq_len} tokens each: "
              f"{per_epoch:.2f} h on 1 GPU")


if __name__ == "__main__":
    main()
