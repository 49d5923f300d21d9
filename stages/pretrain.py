"""Stage `pretrain`: the demo's base MLLM (LLaVA stage 1), or a user's checkpoint passed through.

Writes models/pretrain/ in Hugging Face layout (config.json, model.safetensors, processor,
tokenizer, chat template), loadable with align2llava.models.loading.load_mllm.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from align2llava.config import load_base, load_section
from align2llava.demo.pretrain.pretrain import PretrainParams, pretrain
from align2llava.ops.clikit import CONTEXT, setup_logging, stage_options, user_errors
from align2llava.ops.tracking import repo_root, stage_run

log = logging.getLogger(__name__)


@click.command(context_settings=CONTEXT)
@stage_options("pretrain")
@click.option("--captions", type=click.Path(path_type=Path), default=Path("data/synthesize/captions.jsonl"),
              show_default=True, help="Captions JSONL ({\"id\", \"image\", \"caption\"}).")
@click.option("--image-root", type=click.Path(path_type=Path), default=Path("data/synthesize/images"),
              show_default=True, help="Folder the captions' image paths are relative to.")
@click.option("--out-dir", metavar="DIR", type=click.Path(path_type=Path), default=Path("models/pretrain"),
              show_default=True, help="Where the model is saved (HF layout).")
@click.option("--cache-dir", metavar="DIR", type=click.Path(path_type=Path), default=None,
              help="Where SmolLM2's GGUF is converted to safetensors once [default: <repo>/.cache/smollm2].")
@click.option("--plots-dir", metavar="DIR", type=click.Path(path_type=Path), default=Path("plots/pretrain"), show_default=True,
              help="Where steps.csv and warmup.csv (step, loss) go.")
def main(params_file: Path, metrics_dir: Path, verbose: bool, captions: Path, image_root: Path, out_dir: Path,
         cache_dir: Path | None, plots_dir: Path) -> None:
    """Train the vision tower and projector of a LLaVA on captions with the LLM frozen."""
    setup_logging(verbose)
    with user_errors():
        base = load_base(params_file)
        params = load_section("pretrain", PretrainParams, params_file)
        logged = {"base": base.model_dump(), "pretrain": params.model_dump()}
        with stage_run("pretrain", logged, metrics_dir=metrics_dir) as run:
            m = pretrain(params, base.seed, captions, image_root, out_dir,
                         cache_dir or repo_root() / ".cache" / "smollm2", plots_dir)
            run.log_metrics(m)
    if m["passthrough"]:
        log.info("passed %s through to %s (%s) in %.1f s", params.checkpoint, out_dir, m["model_type"], m["seconds"])
        return
    b, a = m["before"], m["after"]
    log.info("held-out caption loss %.3f -> %.3f (shuffled images %.3f -> %.3f); greedy-caption accuracy %s",
             b["caption_loss"], a["caption_loss"], b["caption_loss_shuffled_images"],
             a["caption_loss_shuffled_images"], a["generation_accuracy"])
    log.info("saved %s in %.0f s (warm-up %.0f s, alignment %.0f s)", out_dir, m["seconds"],
             m.get("warmup_seconds", 0), m.get("align_seconds", 0))


if __name__ == "__main__":
    main()
