"""How well a perfect reader of the demo's rubric would do on the reward-model pairs.

    python -m benchmarks.annotation_ceiling            # params.yaml's synthesize section

The demo's annotations are the rubric's score plus annotator noise (one 0.25 slip with
probability `synthesize.annotator_noise`). This rebuilds the demo world in a temporary folder,
recording each candidate's noise-free rubric score, and prints, per kind and split, the share of
annotate-import's strict pairs whose order the rubric agrees with, ties counted as half: the
pairwise accuracy of a reward model that knew the rubric exactly. It tells whether the
annotations' noise, rather than the model, caps validation accuracy. Demo world only.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from align2llava.ops.clikit import setup_logging, user_errors


@click.command()
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(path_type=Path))
@click.option("--pairs", "pairs_file", default="data/annotate_import/pairs.jsonl", show_default=True,
              type=click.Path(path_type=Path), help="annotate-import's pairs of the same world.")
def main(params_file: Path, pairs_file: Path) -> None:
    """Print the rubric's agreement with the annotated pairs (the noise ceiling)."""
    setup_logging()
    with user_errors():
        from align2llava.config import load_base, load_section
        from align2llava.data.records import strip_image_token
        from align2llava.demo.synthesis import annotator
        from align2llava.demo.synthesis.params import SynthesizeParams
        from align2llava.demo.synthesis.synthesize import synthesize
        from align2llava.models.reward_model import question_text
        from align2llava.steps.annotations.importer import read_pairs

        base = load_base(params_file)
        params = load_section("synthesize", SynthesizeParams, params_file)
        rubric: dict[tuple[str, str, str, str], float] = {}
        judge_answer, judge_questions = annotator.judge_answer, annotator.judge_questions

        def answer(turn, ans, t):
            rubric[("answer", t.image, turn.question, ans)] = s = judge_answer(turn, ans, t)
            return s

        def questions(qs, t):
            text = question_text([strip_image_token(q) for q in qs])  # as annotate-import writes it
            rubric[("question", t.image, "", text)] = s = judge_questions(qs, t)
            return s

        annotator.judge_answer, annotator.judge_questions = answer, questions
        try:
            with tempfile.TemporaryDirectory() as tmp:
                synthesize(params, base.seed, tmp)
        finally:
            annotator.judge_answer, annotator.judge_questions = judge_answer, judge_questions
        pairs = read_pairs(pairs_file)

    click.echo(f"{'kind':<9} {'split':<6} {'pairs':>6} {'agree':>6} {'tie':>5} {'flipped':>8} {'ceiling':>8}")
    for kind in ("question", "answer"):
        for split in ("train", "val"):
            sel = [p for p in pairs if p["kind"] == kind and p["split"] == split]
            if not sel:
                continue
            try:
                diffs = [rubric[(kind, p["image"], p["prompt"], p["chosen"])]
                         - rubric[(kind, p["image"], p["prompt"], p["rejected"])]
                         for p in sel]
            except KeyError as e:
                raise click.ClickException(f"{pairs_file}: a candidate of {e} is not in the demo world of "
                                           f"{params_file}; rerun annotate-import on it") from None
            agree, tie = sum(d > 0 for d in diffs), sum(d == 0 for d in diffs)
            click.echo(f"{kind:<9} {split:<6} {len(sel):>6} {agree:>6} {tie:>5} {len(sel) - agree - tie:>8} "
                       f"{(agree + tie / 2) / len(sel):>8.3f}")


if __name__ == "__main__":
    main()
