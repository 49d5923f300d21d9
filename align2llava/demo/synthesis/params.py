"""The `synthesize:` section and the demo world's task and defect names.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from align2llava.config import Section

TASKS = ("conversation", "detail", "complex_reasoning", "vqa")
DEFECTS = ("hallucinated_color", "hallucinated_shape", "wrong_yes_no", "omitted_key_fact",
           "generic_question", "unanswerable_question")
QUESTION_DEFECTS = ("generic_question", "unanswerable_question")
# The defects a task's records can carry (detail has no yes/no turn; vqa's one-word answers are
# right or wrong, its questions are grounded).
CAN_CARRY = {"conversation": DEFECTS, "complex_reasoning": DEFECTS,
             "detail": tuple(d for d in DEFECTS if d != "wrong_yes_no"),
             "vqa": ("hallucinated_color", "hallucinated_shape", "wrong_yes_no")}
STEP = 0.25  # annotator scores lie on this grid; Label Studio rating = 1 + round(score * 4)


class DefectRates(Section):
    hallucinated_color: float = Field(0.12, ge=0, le=1)
    hallucinated_shape: float = Field(0.10, ge=0, le=1)
    wrong_yes_no: float = Field(0.10, ge=0, le=1)
    omitted_key_fact: float = Field(0.10, ge=0, le=1)
    generic_question: float = Field(0.08, ge=0, le=1)
    unanswerable_question: float = Field(0.08, ge=0, le=1)


class SynthesizeParams(Section):
    """The `synthesize:` section of params.yaml."""

    pool_per_task: int = Field(300, ge=1)
    # per-task counts that replace pool_per_task for those tasks ({vqa: 1500}); {}: none
    pool_sizes: dict[Literal["conversation", "detail", "complex_reasoning", "vqa"], PositiveInt] = {}
    defect_rates: DefectRates = DefectRates()
    # vqa records (short answers): the chance each one-word answer is the writer's wrong guess
    vqa_wrong_rate: float = Field(0.25, ge=0, le=1)
    # vqa records' questions: the writer's own wording, or easy-vqa's own questions about that image
    vqa_wording: Literal["writer", "easy_vqa"] = "writer"
    # vqa records' turns: shuffled (3-5 turns, extra yes/no ones last) or yes_no_first (one yes/no,
    # asked before any turn names the image's shape or colour, then colour and shape shuffled), so
    # that no yes/no answer can be read off the conversation's earlier words
    vqa_turns: Literal["shuffled", "yes_no_first"] = "shuffled"
    # a hallucinated colour or shape: drawn from the writer's prior, or always its favourite
    guesses: Literal["sampled", "favourite"] = "sampled"
    annotate_fraction: float = Field(0.10, ge=0, le=1)  # share of pool records annotated
    question_candidates: int = Field(4, ge=2)  # per annotated record, the original included
    answer_candidates: int = Field(4, ge=2)  # per annotated turn, the original included
    annotator_noise: float = Field(0.15, ge=0, le=1)  # chance a score moves one 0.25 step
    annotators: int = Field(1, ge=1)  # simulated annotators per task, each with its own noise
    benchmark_vqa_per_type: int = Field(100, ge=0)
    benchmark_pope: int = Field(200, ge=0)
    captions: int = Field(4000, ge=0)  # train images captioned for pretraining (at most 4,000)
    # short-answer records on train images outside the pool: the fine-tuning mix's fixed part
    # (vqa_mix.json), never curated
    vqa_mix: int = Field(0, ge=0)
    # instruct.json: correct one-turn conversations on train images outside the pool and the mix,
    # the instruction tuning of the reward models' base (demo.synthesis.instruct_data)
    instruct_images: int = Field(2000, ge=0)
    instruct_per_image: int = Field(1, ge=1)
    # easy_vqa: easy-vqa's own QA (shape, colour, yes/no: the benchmark's facts); layout: where
    # the shape is and how large (none of them)
    vqa_mix_kind: Literal["easy_vqa", "layout"] = "easy_vqa"

    def task_sizes(self) -> dict[str, int]:
        """Pool records per task type, in `TASKS` order."""
        return {t: self.pool_sizes.get(t, self.pool_per_task) for t in TASKS}
