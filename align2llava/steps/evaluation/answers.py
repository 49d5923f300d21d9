"""Reading answers: the VQA normalisation, the POPE yes/no rule, answer extraction and the
per-question VQA accuracy. The one place these rules live: the evaluation step and the
`evaluate` metric modules in metrics/ (vqa_accuracy, pope) import them from here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$|~:]")


def normalize(text: str) -> str:
    """VQA-style normalisation: lower case, no punctuation or articles, number words as digits."""
    text = text.lower().replace("\n", " ").replace("\t", " ").strip()
    text = re.sub(r"(?<=\d),(?=\d)", "", text)  # 1,000 -> 1000
    text = re.sub(r"\.(?!\d)|(?<!\d)\.", " ", text)  # periods, but not decimal points
    text = text.replace("'", "")  # don't -> dont
    text = _PUNCT.sub(" ", text)
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def _first_occurrence(norm: str, phrase: str) -> int:
    m = re.search(rf"(?<!\S){re.escape(phrase)}(?!\S)", norm)
    return m.start() if m else -1


def yes_no(prediction: str) -> str:
    """The POPE rule: the first of yes/no; else 'no' if the answer says 'not'; else 'yes'."""
    norm = normalize(prediction)
    hits = [(pos, w) for w in ("yes", "no") if (pos := _first_occurrence(norm, w)) >= 0]
    if hits:
        return min(hits)[1]
    return "no" if _first_occurrence(norm, "not") >= 0 else "yes"


def extract_answer(prediction: str, candidates: Iterable[str]) -> str:
    """The candidate answer that occurs first (whole words) in the normalised prediction.

    Longer candidates win ties at the same position ("light blue" over "blue"); with none
    present, the normalised prediction itself.
    """
    norm = normalize(prediction)
    best: tuple[int, int, str] | None = None
    for cand in {normalize(c) for c in candidates}:
        if not cand:
            continue
        pos = _first_occurrence(norm, cand)
        if pos >= 0 and (best is None or (pos, -len(cand)) < best[:2]):
            best = (pos, -len(cand), cand)
    return best[2] if best else norm


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """min(1, matches / min(3, #answers)) over normalised answers."""
    if not answers:
        return 0.0
    pred = normalize(prediction)
    matches = sum(1 for a in answers if normalize(a) == pred)
    return min(1.0, matches / min(3, len(answers)))
