"""Can the demo's LLM answer a presence question when it is told the image's content in words?

An upper bound for POPE-style grounding on the demo, with the vision tower taken out: SmolLM2
reads "The image shows a red circle." before each POPE question of the demo benchmark and we
compare p(Yes) with p(No) at the reply's first token (POPE likelihood AUROC, accuracy and yes
ratio), zero-shot and after each epoch of LoRA tuning on --examples such questions about train
images (balanced, shape and colour probes, the benchmark's wording and short-answer instruction).

    python -m benchmarks.presence_in_words --examples 400 --epochs 2

If the LLM learns the comparison in words from a few hundred examples while the MLLM fine-tuned
on as many image questions answers POPE at chance, the visual pathway (how the image tokens
present shape and colour to the LLM), not the LLM, is what keeps presence from being learnt.
Demo only; prints one line per measurement.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import click

from align2llava.ops.clikit import user_errors

INSTRUCTION = "Answer the question using a single word or phrase."


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def probe_question(truth, rng: random.Random) -> tuple[str, bool]:
    """A POPE-style question about `truth`'s shape or colour, present or absent at even odds."""
    from align2llava.demo.synthesis.world import COLORS, SHAPES

    yes, on_shape = rng.random() < 0.5, rng.random() < 0.5
    if on_shape:
        x = truth.shape if yes else rng.choice([s for s in SHAPES if s != truth.shape])
        return f"Is there {_article(x)} in the image?", yes
    x = truth.color if yes else rng.choice([c for c in COLORS if c != truth.color])
    return f"Is there {_article(x)} shape in the image?", yes


def auroc(pos: list[float], neg: list[float]) -> float:
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / max(1, len(pos) * len(neg))


@click.command()
@click.option("--bench-dir", default="data/synthesize/benchmark", show_default=True, type=click.Path(path_type=Path))
@click.option("--examples", default=400, show_default=True, help="Training questions (one per train image).")
@click.option("--epochs", default=2, show_default=True)
@click.option("--layers", default=4, show_default=True, help="LoRA on the LLM's top N layers (0: all).")
@click.option("--learning-rate", default=1.0e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
def main(bench_dir: Path, examples: int, epochs: int, layers: int, learning_rate: float, seed: int) -> None:
    """Zero-shot and tuned presence answers of the demo LLM given the image's content in words."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align2llava.demo.base import smollm2_safetensors
    from align2llava.demo.synthesis.world import easy_vqa_dir, load_truths, qa_facts, read_split
    from align2llava.models.lora import LLM_LINEAR
    from align2llava.ops.tracking import repo_root

    with user_errors():
        torch.manual_seed(seed)
        lm_dir = smollm2_safetensors(repo_root() / ".cache" / "smollm2")
        tok = AutoTokenizer.from_pretrained(str(lm_dir))
        model = AutoModelForCausalLM.from_pretrained(str(lm_dir), dtype=torch.float32)
        pope = [json.loads(x) for x in (bench_dir / "pope.jsonl").read_text().splitlines()]
        src = easy_vqa_dir()
        test_images, test_qa = read_split(src, "test")
        ids = sorted({int(Path(p["image"]).stem) for p in pope})
        test_truths, _ = load_truths("test", ids, qa_facts(test_qa), test_images)
        train_images, train_qa = read_split(src, "train")
        rng = random.Random(seed)
        train_ids = rng.sample(sorted(train_images), examples)
        train_truths, _ = load_truths("train", train_ids, qa_facts(train_qa), train_images)

        def prompt(truth, question: str) -> str:
            text = f"The image shows {_article(truth.color)} {truth.shape}.\n{question}\n{INSTRUCTION}"
            return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False)

        train = []
        for i in train_ids:
            q, yes = probe_question(train_truths[i], rng)
            train.append((prompt(train_truths[i], q), "Yes" if yes else "No"))
        yes_id, no_id = tok.encode("Yes")[0], tok.encode("No")[0]

        def measure(tag: str, t0: float) -> None:
            model.eval()
            margins, labels = [], []
            with torch.no_grad():
                for p in pope:
                    enc = tok(prompt(test_truths[int(Path(p["image"]).stem)], p["question"]), return_tensors="pt")
                    logp = model(**enc).logits[0, -1].log_softmax(-1)
                    margins.append((logp[yes_id] - logp[no_id]).item())
                    labels.append(p["answer"] == "yes")
            pos = [m for m, y in zip(margins, labels) if y]
            neg = [m for m, y in zip(margins, labels) if not y]
            acc = sum((m > 0) == y for m, y in zip(margins, labels)) / len(labels)
            click.echo(f"{tag}: POPE in words ({len(pope)} probes): AUROC {auroc(pos, neg):.3f}, accuracy {acc:.3f}, "
                       f"yes ratio {sum(m > 0 for m in margins) / len(margins):.2f} [{time.time() - t0:.0f} s]")

        t0 = time.time()
        measure("zero-shot", t0)
        n_layers = model.config.num_hidden_layers
        model = get_peft_model(model, LoraConfig(
            r=16, lora_alpha=32, target_modules=LLM_LINEAR,
            layers_to_transform=list(range(n_layers - layers, n_layers)) if layers else None))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
        for epoch in range(epochs):
            rng.shuffle(train)
            model.train()
            for b in range(0, len(train), 8):
                loss = 0.0
                for text, answer in train[b: b + 8]:
                    n_prompt = len(tok(text)["input_ids"])
                    ids = tok(text + answer, return_tensors="pt")["input_ids"]
                    logits = model(input_ids=ids).logits[0, n_prompt - 1:-1]
                    loss = loss + torch.nn.functional.cross_entropy(logits, ids[0, n_prompt:])
                (loss / len(train[b: b + 8])).backward()
                opt.step()
                opt.zero_grad()
            measure(f"after epoch {epoch + 1} ({examples} examples, LoRA on {layers or 'all'} layers)", t0)


if __name__ == "__main__":
    main()
