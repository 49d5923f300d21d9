"""POPE metrics as a Hugging Face `evaluate` module, loaded by path (no Hub, works offline):

    import evaluate
    from align2llava.steps.evaluation.evaluation import metric_path

    pope = evaluate.load(metric_path("pope"), keep_in_memory=True)
    pope.compute(predictions=["Yes, there is.", "There is no dog."], references=["yes", "yes"])
    # {'accuracy': 0.5, 'precision': 1.0, 'recall': 0.5, 'f1': 0.666..., 'yes_ratio': 0.5}

The answer is read with POPE's rule from align2llava/steps/evaluation/answers.py, which the
evaluation step uses too (docs/evaluation-metrics.md).
"""

import datasets
import evaluate

from align2llava.steps.evaluation.answers import normalize, yes_no

_DESCRIPTION = """\
POPE (Li et al., 2023), the polling-based object probing evaluation: yes/no questions "Is there
a <object> in the image?" about objects that are and are not in the image. Each answer is read
with the official POPE rule (the first of "yes"/"no" in the normalised answer; else "no" when it
says "not"; else "yes"). Returns accuracy, precision, recall and F1 with "yes" as the positive
class, and the share of "yes" answers (a model that always says yes has yes_ratio 1 and recall 1).
"""

_CITATION = """\
@inproceedings{li2023pope,
  title     = {Evaluating Object Hallucination in Large Vision-Language Models},
  author    = {Li, Yifan and Du, Yifan and Zhou, Kun and Wang, Jinpeng and Zhao, Wayne Xin and
               Wen, Ji-Rong},
  booktitle = {Proceedings of the 2023 Conference on Empirical Methods in Natural Language Processing (EMNLP)},
  year      = {2023}
}
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (list of str): the model's answers (free text; the POPE rule reads yes or no).
    references (list of str): the gold answers, each "yes" or "no".
Returns:
    accuracy, precision, recall, f1 (float): "yes" is the positive class; precision, recall and
        f1 are 0.0 where undefined (no "yes" answers, no "yes" questions).
    yes_ratio (float): the share of answers read as "yes".
Examples:
    >>> pope = evaluate.load(metric_path("pope"))  # align2llava.steps.evaluation.evaluation
    >>> pope.compute(predictions=["No.", "yes"], references=["no", "no"])
    {'accuracy': 0.5, 'precision': 0.0, 'recall': 0.0, 'f1': 0.0, 'yes_ratio': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Pope(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
            codebase_urls=["https://github.com/RUCAIBox/POPE"],
            reference_urls=["https://arxiv.org/abs/2305.10355"],
        )

    def _compute(self, predictions, references):
        if len(predictions) != len(references) or not predictions:
            raise ValueError("pope: one or more predictions, each with its reference")
        gold = [normalize(r) for r in references]
        bad = next((r for r, g in zip(references, gold) if g not in ("yes", "no")), None)
        if bad is not None:
            raise ValueError(f"pope: references must be yes or no, got {bad!r}")
        read = [yes_no(p) for p in predictions]
        tp = sum(1 for r, g in zip(read, gold) if r == "yes" and g == "yes")
        fp = sum(1 for r, g in zip(read, gold) if r == "yes" and g == "no")
        fn = sum(1 for r, g in zip(read, gold) if r == "no" and g == "yes")
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        return {
            "accuracy": sum(1 for r, g in zip(read, gold) if r == g) / len(read),
            "precision": precision,
            "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": sum(1 for r in read if r == "yes") / len(read),
        }
