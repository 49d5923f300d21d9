"""VQA accuracy as a Hugging Face `evaluate` module, loaded by path (no Hub, works offline):

    import evaluate
    from align2llava.steps.evaluation.evaluation import metric_path

    vqa = evaluate.load(metric_path("vqa_accuracy"), keep_in_memory=True)
    vqa.compute(predictions=["Two", "red"], references=[["2", "two", "3"], ["blue"]])
    # {'vqa_accuracy': 0.3333...}: 2/3 for the first question, 0 for the second

The normalisation and the per-question score live in align2llava/steps/evaluation/answers.py,
which the evaluation step uses too (docs/evaluation-metrics.md).
"""

import datasets
import evaluate

from align2llava.steps.evaluation.answers import vqa_accuracy

_DESCRIPTION = """\
VQA accuracy (Antol et al., 2015): a question's score is min(1, n / min(3, k)), where n of its
k gold answers equal the prediction after VQA-style normalisation (lower case, punctuation and
articles removed, number words as digits). With 10 annotators that is the usual
min(1, #humans who gave the answer / 3) (the official evaluation also averages it over the 10
leave-one-out subsets of annotators; this module does not); with one gold answer it is
normalised exact match. The result is the mean over questions.
"""

_CITATION = """\
@inproceedings{antol2015vqa,
  title     = {{VQA}: Visual Question Answering},
  author    = {Antol, Stanislaw and Agrawal, Aishwarya and Lu, Jiasen and Mitchell, Margaret and
               Batra, Dhruv and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle = {Proceedings of the IEEE International Conference on Computer Vision (ICCV)},
  year      = {2015}
}
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (list of str): the model's answers, one per question.
    references (list of str, or list of list of str): the gold answer(s) of each question
        (several annotators: a list); all strings or all lists, not mixed.
Returns:
    vqa_accuracy (float): the mean VQA accuracy over the questions, in [0, 1].
Examples:
    >>> vqa = evaluate.load(metric_path("vqa_accuracy"))  # align2llava.steps.evaluation.evaluation
    >>> vqa.compute(predictions=["A circle."], references=[["circle"]])
    {'vqa_accuracy': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VqaAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Value("string")}),
            ],
            reference_urls=["https://visualqa.org/evaluation.html", "https://arxiv.org/abs/1505.00468"],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of predictions and references (all strings or all lists of strings).
        """
        # evaluate picks the input format from the first reference and casts the rest to it,
        # so a batch mixing strings and lists would be scored wrong without a word
        if references is not None and len({isinstance(r, str) for r in references}) > 1:
            raise ValueError("vqa_accuracy: references must be all strings or all lists of strings")
        return super().add_batch(predictions=predictions, references=references, **kwargs)

    def _compute(self, predictions, references):
        if len(predictions) != len(references) or not predictions:
            raise ValueError("vqa_accuracy: one or more predictions, each with its references")
        scores = [vqa_accuracy(p, [r] if isinstance(r, str) else list(r)) for p, r in zip(predictions, references)]
        return {"vqa_accuracy": sum(scores) / len(scores)}
