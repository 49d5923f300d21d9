"""Extra training pairs for the reward models: corruptions, mismatches, image swaps.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

# ----------------------------------------------------------------------------- corruption


def corrupt(text: str, kind: str, rng: random.Random) -> str | None:
    """A degraded version of a candidate, or None when no corruption changes it.

    answer: word shuffle or a random subset of the words (in order);
    question: shuffle / crop / duplicate the questions of the set (word shuffle for one question).
    """
    ops: list[Callable[[], str]] = []
    if kind == "question":
        qs = [q for q in text.split("\n") if q.strip()]
        if len(qs) > 1:
            ops += [lambda: "\n".join(rng.sample(qs, len(qs))),
                    lambda: "\n".join(qs[: rng.randint(1, len(qs) - 1)])]
        if qs:
            ops.append(lambda: "\n".join(qs + [rng.choice(qs)]))
        if len(qs) == 1:
            ops.append(lambda: _shuffle_words(qs[0], rng))
    else:
        words = text.split()
        if len(words) >= 2:
            ops += [lambda: _shuffle_words(text, rng), lambda: _subset_words(words, rng)]
    rng.shuffle(ops)
    for op in ops:
        out = op()
        if out.strip() and out != text:
            return out
    return None


def _shuffle_words(text: str, rng: random.Random) -> str:
    words = text.split()
    return " ".join(rng.sample(words, len(words)))


def _subset_words(words: list[str], rng: random.Random) -> str:
    keep = max(1, min(len(words) - 1, round(len(words) * rng.uniform(0.3, 0.7))))
    idx = sorted(rng.sample(range(len(words)), keep))
    return " ".join(words[i] for i in idx)


def augmentation_pairs(pairs: Sequence[dict[str, Any]], kind: str, rate: float, seed: int) -> list[dict[str, Any]]:
    """(candidate > corrupted candidate) pairs for a `rate` share of the distinct candidates.

    Drawn once per training run from the seed (not per epoch), so reruns are identical.
    """
    rng = random.Random(f"{seed}:{kind}:corrupt")
    seen: dict[tuple[str, str, str, str], None] = {}
    for p in pairs:
        for text in (p["chosen"], p["rejected"]):
            seen.setdefault((p["group"], p["image"], p["prompt"], text), None)
    out = []
    for group, image, prompt, text in seen:
        if rng.random() >= rate:
            continue
        bad = corrupt(text, kind, rng)
        if bad is not None:
            out.append({"group": group, "image": image, "prompt": prompt, "chosen": text,
                        "rejected": bad, "augmented": True})
    return out


def _group_info(pairs: Sequence[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """Per group, its (image, prompt)."""
    info: dict[str, tuple[str, str]] = {}
    for p in pairs:
        info.setdefault(p["group"], (p["image"], p["prompt"]))
    return info


def _best_candidates(pairs: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Per group, its candidates that are chosen in some pair and rejected in none."""
    rejected: dict[str, set[str]] = {}
    for p in pairs:
        rejected.setdefault(p["group"], set()).add(p["rejected"])
    best: dict[str, list[str]] = {}
    for p in pairs:
        b = best.setdefault(p["group"], [])
        if p["chosen"] not in rejected[p["group"]] and p["chosen"] not in b:
            b.append(p["chosen"])
    return best


def mismatch_pairs(pairs: Sequence[dict[str, Any]], kind: str, rate: float, seed: int) -> list[dict[str, Any]]:
    """(top candidate of a group > a top candidate written for another image) pairs.

    An extension beyond the paper (off at rate 0): image-text mismatch negatives make the RM
    look at the image. For each group, with probability `rate`, its best candidate (one never
    rejected in the group) is preferred, on the group's own image and prompt, over a best
    candidate of a random group on a different image (same prompt when one exists).
    """
    if rate <= 0:
        return []
    rng = random.Random(f"{seed}:{kind}:mismatch")
    info = _group_info(pairs)
    best = _best_candidates(pairs)
    groups = sorted(g for g in best if best[g])
    by_prompt: dict[str, list[str]] = {}
    for g in groups:
        by_prompt.setdefault(info[g][1], []).append(g)
    out = []
    for g in groups:
        if rng.random() >= rate:
            continue
        image, prompt = info[g]
        pool = [o for o in by_prompt[prompt] if info[o][0] != image] or [o for o in groups if info[o][0] != image]
        if not pool:
            continue
        other = rng.choice(pool)
        chosen, bad = rng.choice(best[g]), rng.choice(best[other])
        if chosen != bad:
            out.append({"group": g, "image": image, "prompt": prompt, "chosen": chosen, "rejected": bad,
                        "augmented": True})
    return out


def image_swap_pairs(pairs: Sequence[dict[str, Any]], kind: str, swaps: int, seed: int) -> list[dict[str, Any]]:
    """(best candidate on its own image > the same text on another image) pairs, `swaps` per
    best candidate.

    An extension beyond the paper (off at 0): both sides hold the same text, so only looking
    at the image can tell them apart; the RM learns image-text agreement from every annotated
    group, not only from the few pairs whose candidates disagree about what the image shows.
    The other images are drawn (seeded) from the training pairs' images other than the group's.
    """
    if swaps <= 0:
        return []
    rng = random.Random(f"{seed}:{kind}:image-swap")
    info = _group_info(pairs)
    images = sorted({p["image"] for p in pairs if p.get("image")})
    out = []
    for g, texts in sorted(_best_candidates(pairs).items()):
        image, prompt = info[g]
        others = [im for im in images if im != image]
        if not image or not others:
            continue
        for text in texts:
            for other in rng.sample(others, min(swaps, len(others))):
                out.append({"group": g, "image": image, "prompt": prompt, "chosen": text, "rejected": text,
                            "rejected_image": other, "augmented": True})
    return out
