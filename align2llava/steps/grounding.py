"""An answer's image grounding under the reward models' base MLLM: the answer reward's second term.

    ground = Grounding.load(base_dir, weight=1.7, image_root="images")
    ground.raw([("cat.jpg", "What colour is it?", "It is red.")])   # [0.41]: mean image PMI
    ground([...])                                                  # weight x that
    Grounding.load(base_dir, feature="word_margin", words={"color": ["red", "blue", "green"]})

The answer RM g(I, Q, A) reads style, completeness and relevance from its head; whether the
answer says what the image shows is read here, from the base MLLM's own language model (its LM
head, no LoRA). Two features:

`image_pmi`: the mean over the answer's tokens of

    log p(token | image, question, earlier tokens) - log p(token | question, earlier tokens),

both through the checkpoint's chat template (the answer as the assistant's reply). A word the
image makes likely (its colour, its object) gains, a word it contradicts loses, an answer that
says nothing about the image stays near 0. The mean, not the sum, so long and short answers are
on one scale. But an answer's PMI level also depends on its sentence form and on how many of its
words are visual, so it ranks answers to one question far better than answers across a pool
(docs/research-log.md).

`word_margin`: a check of the answer's visual words against the base's own reading of the
image, in the manner of CHAIR's object vocabulary. `words` names groups of words of which an
image shows one (colours; shapes; for real data e.g. the animals of a data set whose images
hold one). At every group word in the answer (not after a negation in the same clause: "No, it
is red" states red, "not a red circle" states nothing), the base, given the image, the question
and the answer so far, compares the word written with the others of its group as the next token
(by its first token): the margin log p(written) - max log p(other). The feature is the answer's
smallest margin (0 when it names no group word): negative where the base, looking at the image,
would have written another word of the group; positive where it confirms every one. The words
compete at one place of one sentence, so sentence form and length cancel. One forward pass per
answer that names a group word, as far as its last one; none for the rest. Measured on the demo:
answer RM 0.870 against 0.725 without the term.

An answer that begins with "yes" also affirms the group words its question states ("Is there a
red shape?" "Yes."), words it need not repeat. Each is read the same way in a neutral statement,
the reply "The image shows a red" to "What is in the image?" (one short pass per image and
article, for all its answers' words), and counts in the smallest margin. The base cannot be
asked the question itself: on the demo its first reply token (log p(Yes) - log p(No)) ranks
present over absent words at chance (AUROC 0.52), while this reading of the same words ranks
them at 0.98 (`benchmarks.presence_probe`).
A "no" denies the question as a whole ("Is the blue shape a circle?" "No."), not each of its
words, so it affirms nothing. The neutral statement is another context than the answer's own, so
its margins need not be on the same scale: `affirmed_scale` multiplies them before the smallest
is taken (1: as read; `fit_affirmed_scale` fits it with the weight).

`fit_weight` chooses the term's weight on the training pairs before the RM head is trained
(a one-parameter Bradley-Terry fit), and the head is then trained on top of it (the term is a
fixed offset in its loss), so it learns what the term does not explain. `fit_affirmed_scale`
chooses the affirmed words' scale and the weight together (the weight's fit at each scale of a
grid, the most likely pair).

The log-probabilities are evaluate's likelihood scorer's (float32 from the final hidden states);
the batches are sorted by length and fixed by the input, so a shard scores the same whichever
process or run scores it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from align2llava.errors import DataError

log = logging.getLogger(__name__)

FEATURES = ("none", "image_pmi", "word_margin")
# words after which a group word states nothing about the image, up to the end of the clause
NEGATIONS = frozenset({"no", "not", "nor", "neither", "never", "without", "none", "nothing"})
# how word_margin reads a word that a "yes" affirms: the base's reply to this question, the word after it
AFFIRM_QUESTION = "What is in the image?"
AFFIRM_REPLY = "The image shows {a} {word}"

_CLAUSE_END = re.compile(r"[,.;:!?()]")
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")

# fit_affirmed_scale's grid: 2^(k/4) for k = -12..12 (1/8 to 8)
SCALE_GRID = tuple(2.0 ** (k / 4) for k in range(-12, 13))

Triple = tuple[str | None, str, str]  # (image, question, answer)
Reading = tuple[float | None, float | None]  # (own words' smallest margin, affirmed words'), None: none read


class Grounding:
    """The grounding term of one answer reward model: an MLLM with its LM head, and a weight."""

    def __init__(self, model: Any, processor: Any, *, feature: str = "image_pmi", weight: float = 1.0,
                 words: Mapping[str, Sequence[str]] | None = None, image_root: str | Path | None = None,
                 batch_size: int = 16, affirmed_scale: float = 1.0):
        from align2llava.steps.evaluation.likelihood import _Scorer

        if feature not in FEATURES[1:]:
            raise ValueError(f"grounding feature {feature!r}: one of {', '.join(FEATURES[1:])}")
        if not (math.isfinite(affirmed_scale) and affirmed_scale > 0):
            raise ValueError(f"grounding affirmed_scale {affirmed_scale!r}: a positive number")
        self.words = check_words(words or {}) if feature == "word_margin" else {}
        self._group_of = {w: g for g, ws in self.words.items() for w in ws}
        self._statements: dict[str, tuple[list[int], int, dict[str, int], list[int]]] = {}
        self.model, self.processor, self.feature = model, processor, feature
        self.weight, self.image_root, self.batch_size = float(weight), image_root, batch_size
        self.affirmed_scale = float(affirmed_scale)
        self.scorer = _Scorer(model, processor)
        # forward passes per answer (the meter's unit): with and without the image, or one
        self.passes = 2 if feature == "image_pmi" else 1

    @classmethod
    def load(cls, base_model: str | Path, *, feature: str = "image_pmi", weight: float = 1.0,
             words: Mapping[str, Sequence[str]] | None = None, image_root: str | Path | None = None,
             dtype: str = "auto", device: Any = "cpu", batch_size: int = 16,
             affirmed_scale: float = 1.0) -> "Grounding":
        from align2llava.models.loading import load_mllm
        from align2llava.models.precision import resolve

        model, processor = load_mllm(base_model, dtype="float32")
        # training's "mixed" (bf16 matmuls) is for gradients: the term is read as score reads it
        resolve("auto" if dtype == "mixed" else dtype, device, "score").cast(model)
        model.requires_grad_(False)
        model.to(device).eval()
        return cls(model, processor, feature=feature, weight=weight, words=words, image_root=image_root,
                   batch_size=batch_size, affirmed_scale=affirmed_scale)

    def __call__(self, items: Sequence[Triple], meter: Any = None) -> list[float]:
        """weight x `raw`."""
        return [self.weight * g for g in self.raw(items, meter)]

    def raw(self, items: Sequence[Triple], meter: Any = None) -> list[float]:
        """The feature of each (image, question, answer); 0.0 without an image. `meter` (a
        Progress) counts `passes` per item."""
        if self.feature == "word_margin":
            return smallest(self.readings(items, meter), self.affirmed_scale)
        return self._image_pmi(items, meter)

    def _image_pmi(self, items: Sequence[Triple], meter: Any = None) -> list[float]:
        """Mean per-token image PMI of each (image, question, answer): two passes per item, with
        the image and without."""
        from align2llava.models.chat import continuation_ids

        out = [0.0] * len(items)
        rows = [(i, continuation_ids(self.processor, q, a, image=True, span="start"),
                 continuation_ids(self.processor, q, a, image=False, span="start"))
                for i, (image, q, a) in enumerate(items) if image is not None]
        rows.sort(key=lambda r: -len(r[1]))
        for s in range(0, len(rows), self.batch_size):
            chunk = rows[s: s + self.batch_size]
            sums = []
            for with_image, k in ((True, 1), (False, 2)):
                batch = [_Item(items[i][1], items[i][0] if with_image else None) for i, *_ in chunk]
                got = self.scorer.score(batch, [r[k] for r in chunk], image_root=self.image_root, instruction="")
                sums.append([row[0] for row in got])
            for (i, seen, _), a, b in zip(chunk, *sums):
                out[i] = (a - b) / len(seen)
            if meter is not None:
                meter.update(2 * len(chunk), tok=sum(len(r[1]) + len(r[2]) for r in chunk))
        if meter is not None:  # answers without an image need no pass
            meter.update(2 * (len(items) - len(rows)))
        return out

    def readings(self, items: Sequence[Triple], meter: Any = None) -> list[Reading]:
        """word_margin's two readings of each (image, question, answer): the smallest margin of
        the group words the answer states and that of those its "yes" affirms (module doc), None
        where there is none; one pass per answer that has an image and names a group word, and
        one per image (and article) for the affirmed words of all its answers."""
        if self.feature != "word_margin":
            raise ValueError(f"grounding feature {self.feature!r} has no word readings")
        affirmed: list[float | None] = [None] * len(items)
        wanted = {i: affirmed_words(q, a, self.words) for i, (image, q, a) in enumerate(items) if image is not None}
        read = self._affirmed({(items[i][0], w) for i, ws in wanted.items() for w in ws})
        for i, ws in wanted.items():
            margins = [read[(items[i][0], w)] for w in ws if (items[i][0], w) in read]
            if margins:
                affirmed[i] = min(margins)
        own: list[float | None] = [None] * len(items)
        rows = []
        for i, (image, q, a) in enumerate(items):
            if image is not None:
                cont, sites = word_sites(self.processor, q, a, self.words)
                if sites:  # the tokens after the last site's cannot move its margins
                    rows.append((i, cont[: max(step for step, _ in sites) + 1], sites))
        rows.sort(key=lambda r: -len(r[1]))
        for s in range(0, len(rows), self.batch_size):
            chunk = rows[s: s + self.batch_size]
            batch = [_Item(items[i][1], items[i][0]) for i, *_ in chunk]
            got = self.scorer.at_steps(batch, [r[1] for r in chunk], [r[2] for r in chunk],
                                       image_root=self.image_root, instruction="")
            for (i, *_), sites in zip(chunk, got):
                own[i] = min(lp[0] - max(lp[1:]) for lp in sites)
            if meter is not None:
                meter.update(len(chunk), tok=sum(len(r[1]) for r in chunk))
        if meter is not None:
            meter.update(len(items) - len(rows))
        return list(zip(own, affirmed))

    def _affirmed(self, wanted: set[tuple[str, str]]) -> dict[tuple[str, str], float]:
        """{(image, word): the word's margin as the next word of AFFIRM_REPLY}: one pass per
        image and article, reading every group word at once. A word that cannot be placed there,
        or whose group's others share its first token, is left out."""
        rows: dict[tuple[str, str], list[str]] = {}
        for image, word in sorted(wanted):
            if word in self._statement(_article(word))[2]:  # else it cannot be read (docstring)
                rows.setdefault((image, _article(word)), []).append(word)
        keys = sorted(rows)
        read: dict[tuple[str, str], float] = {}
        for s in range(0, len(keys), self.batch_size):
            chunk = keys[s: s + self.batch_size]
            statements = [self._statement(article) for _, article in chunk]
            got = self.scorer.at_steps([_Item(AFFIRM_QUESTION, image) for image, _ in chunk],
                                       [st[0] for st in statements], [[(st[1], st[3])] for st in statements],
                                       image_root=self.image_root, instruction="")
            for (image, article), (_, _, first, ids), [lps] in zip(chunk, statements, got):
                lp = dict(zip(ids, lps))
                for word in rows[(image, article)]:
                    others = {first[o] for o in self.words[self._group_of[word]] if o in first} - {first.get(word)}
                    if word in first and others:
                        read[(image, word)] = lp[first[word]] - max(lp[t] for t in others)
        return read

    def _statement(self, article: str) -> tuple[list[int], int, dict[str, int], list[int]]:
        """AFFIRM_REPLY's tokens with `article` up to where the word's first token is predicted:
        (those tokens, that step, {word: its first token}, the distinct first tokens)."""
        if article not in self._statements:
            from align2llava.models.chat import continuation_ids

            ws = [w for w in self._group_of if _article(w) == article]
            written = {w: continuation_ids(self.processor, AFFIRM_QUESTION, AFFIRM_REPLY.format(a=article, word=w),
                                           image=True, span="start") for w in ws}
            some = next(iter(written.values()), [])
            step = _common_prefix(list(written.values()))
            # one word of an article has nothing to be compared with (it is left out)
            first = {w: ids[step] for w, ids in written.items() if len(ids) > step} if len(written) > 1 else {}
            self._statements[article] = (some[: step + 1], step, first, sorted(set(first.values())))
        return self._statements[article]


def check_words(words: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Word groups as word_margin reads them (lower case); ValueError unless every group has two
    words or more, each a single word, and no word is in two groups."""
    out: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for g, ws in words.items():
        low = [str(w).lower() for w in ws]
        if len(set(low)) < 2:
            raise ValueError(f"grounding words: group {g!r} needs two different words or more")
        for w in low:
            if not _WORD.fullmatch(w):
                raise ValueError(f"grounding words: {w!r} in group {g!r} is not a single word")
            if seen.setdefault(w, g) != g:
                raise ValueError(f"grounding words: {w!r} is in groups {seen[w]!r} and {g!r}")
        out[str(g)] = list(dict.fromkeys(low))
    if not out:
        raise ValueError("grounding feature word_margin needs grounding words (groups of words an image shows one of)")
    return out


def stated_words(text: str, words: Mapping[str, Sequence[str]]) -> list[re.Match[str]]:
    """The group words `text` states: not after a negation in the same clause (a clause ends at
    , . ; : ! ? ( ) and before "but")."""
    vocabulary = {w for ws in words.values() for w in ws}
    out = []
    negated, end = False, 0
    for m in _WORD.finditer(text):
        low = m.group().lower()
        if _CLAUSE_END.search(text, end, m.start()) or low == "but":
            negated = False
        end = m.end()
        if low in NEGATIONS or low.endswith("n't"):
            negated = True
        if low in vocabulary and not negated:
            out.append(m)
    return out


def word_sites(processor: Any, question: str, answer: str, words: Mapping[str, Sequence[str]]
               ) -> tuple[list[int], list[tuple[int, list[int]]]]:
    """The answer's reply tokens and, for each group word it states (`stated_words`), its site:
    (the step of the reply where the word's first token is predicted, [the written word's first
    token, then every other word's of its group whose first token differs]). A word whose
    alternatives cannot be placed at that step (the tokenizer merges it with what precedes) is
    left out."""
    from align2llava.models.chat import continuation_ids

    group_of = {w: g for g, ws in words.items() for w in ws}
    cont: list[int] | None = None
    sites = []
    for m in stated_words(answer, words):
        word, low = m.group(), m.group().lower()
        if cont is None:
            cont = continuation_ids(processor, question, answer, image=True, span="start")
        head = answer[: m.start()]
        written = [continuation_ids(processor, question, head + _as_written(w, word), image=True, span="start")
                   for w in words[group_of[low]]]
        step = _common_prefix(written)
        mine = words[group_of[low]].index(low)
        if cont[:step] != written[mine][:step] or any(len(ids) <= step for ids in written):
            continue
        first = written[mine][step]
        others = sorted({ids[step] for ids in written} - {first})
        if others:
            sites.append((step, [first, *others]))
    return cont or [], sites


def affirmed_words(question: str, answer: str, words: Mapping[str, Sequence[str]]) -> list[str]:
    """The group words (lower case) an answer whose first word is "yes" affirms: those its
    question states (`stated_words`); [] for any other answer."""
    first = _WORD.search(answer)
    if first is None or first.group().lower() != "yes":
        return []
    return list(dict.fromkeys(m.group().lower() for m in stated_words(question, words)))


def smallest(readings: Sequence[Reading], affirmed_scale: float = 1.0) -> list[float]:
    """word_margin's feature from its readings: the smaller of the own words' margin and
    `affirmed_scale` x the affirmed words' (of those read), 0.0 when neither was read."""
    out = []
    for own, affirmed in readings:
        present = [m for m in (own, None if affirmed is None else affirmed_scale * affirmed) if m is not None]
        out.append(min(present) if present else 0.0)
    return out


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _common_prefix(seqs: list[list[int]]) -> int:
    n = 0
    while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    return n


def _as_written(candidate: str, word: str) -> str:
    """`candidate` in `word`'s case: "Red" for a capitalised word, "RED" for an upper-case one."""
    if word.isupper() and len(word) > 1:
        return candidate.upper()
    return candidate.capitalize() if word[:1].isupper() else candidate


class _Item:  # what the scorer's prompt encoder reads of an item
    def __init__(self, question: str, image: str | None):
        self.question, self.image = question, image


def load_grounding(path: str | Path, meta: dict[str, Any], *, backbone: str | Path | None = None,
                   image_root: str | Path | None = None, dtype: str = "auto", device: Any = "cpu",
                   batch_size: int = 16) -> Grounding | None:
    """The grounding term a reward model's config names (on the model's backbone with its LM
    head, at the config's weight), or None when it has none."""
    from align2llava.models.reward_model import CONFIG_FILE, resolve_backbone

    entry = meta.get("grounding")
    if not entry or entry.get("feature", "none") == "none":
        return None
    feature = entry.get("feature")
    scale = entry.get("affirmed_scale", 1.0)
    if feature not in FEATURES or not isinstance(entry.get("weight"), (int, float)) \
            or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise DataError(f"{Path(path) / CONFIG_FILE}: grounding {entry!r} is not one this version reads "
                        f"(feature one of {', '.join(FEATURES[1:])}, a numeric weight, a positive affirmed_scale)")
    words = entry.get("words") if feature == "word_margin" else None
    if feature == "word_margin":
        try:
            check_words(words if isinstance(words, dict) else {})
        except ValueError as exc:
            raise DataError(f"{Path(path) / CONFIG_FILE}: grounding: {exc}") from None
    base = resolve_backbone(Path(path), meta, backbone)
    return Grounding.load(base, feature=feature, weight=float(entry["weight"]), words=words, image_root=image_root,
                          dtype=dtype, device=device, batch_size=batch_size, affirmed_scale=float(scale))


def fit_weight(chosen: Sequence[float], rejected: Sequence[float], *, max_weight: float = 100.0) -> float:
    """The weight w >= 0 that maximises sum log sigmoid(w * (chosen - rejected)) (Newton steps).

    0 when the term orders no more pairs right than wrong; capped at `max_weight` (a term that
    separates every pair has no finite maximum)."""
    d = [c - r for c, r in zip(chosen, rejected)]
    if not d or sum(x > 0 for x in d) <= sum(x < 0 for x in d):
        return 0.0
    w = 1.0 / max(1e-6, math.sqrt(sum(x * x for x in d) / len(d)))
    for _ in range(50):
        p = [1.0 / (1.0 + math.exp(min(50.0, w * x))) for x in d]  # sigmoid(-w x)
        grad = sum(x * q for x, q in zip(d, p))
        hess = sum(x * x * q * (1 - q) for x, q in zip(d, p))
        if hess <= 1e-12:
            break
        step = grad / hess
        w = min(max_weight, max(0.0, w + step))
        if abs(step) < 1e-6 * max(1.0, w):
            break
    return w


def fit_affirmed_scale(chosen: Sequence[Reading], rejected: Sequence[Reading], *,
                       grid: Sequence[float] = SCALE_GRID, max_weight: float = 100.0) -> tuple[float, float]:
    """(affirmed_scale, weight): at each scale of `grid`, `fit_weight` on the pairs' `smallest`
    features; the pair of the highest Bradley-Terry log-likelihood (on a tie, the scale nearest 1)."""
    best: tuple[float, float, float] | None = None  # (log-likelihood, scale, weight)
    for scale in sorted(grid, key=lambda g: (abs(math.log(g)), g)):
        c, r = smallest(chosen, scale), smallest(rejected, scale)
        w = fit_weight(c, r, max_weight=max_weight)
        ll = sum(_log_sigmoid(w * (a - b)) for a, b in zip(c, r))
        if best is None or ll > best[0] + 1e-9:
            best = (ll, scale, w)
    if best is None:
        raise ValueError("fit_affirmed_scale: an empty grid")
    return best[1], best[2]


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))
