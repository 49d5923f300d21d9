"""The easy-vqa world: images and their ground truth (shape, colour, position, size).
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from align2llava.errors import Align2LlavaError, DataError

SHAPES = ("circle", "rectangle", "triangle")
PALETTE = {  # easy-vqa draws with these exact RGB values
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "black": (0, 0, 0), "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (165, 42, 42),
}
COLORS = tuple(PALETTE)


# --------------------------------------------------------------------------------- the world
@dataclass(frozen=True)
class Truth:
    image_id: int
    split: str
    shape: str
    color: str
    position: str  # "upper left" ... "center" ... "lower right"
    size: str  # small / medium / large

    @property
    def image(self) -> str:
        return f"{self.split}/{self.image_id}.png"


def easy_vqa_dir() -> Path:
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        raise Align2LlavaError("package easy-vqa is not installed; run `pip install easy-vqa==1.0`")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def read_split(source: Path, split: str) -> tuple[dict[int, Path], list[tuple[str, str, int]]]:
    """easy-vqa's images {id: path} and QA triples (question, answer, image id) of a split."""
    qfile, idir = source / split / "questions.json", source / split / "images"
    if not qfile.is_file() or not idir.is_dir():
        raise DataError(f"{source / split}: expected questions.json and images/ (easy-vqa layout)")
    try:
        qa = [(str(q), str(a), int(i)) for q, a, i in json.loads(qfile.read_text())]
    except (ValueError, TypeError) as exc:
        raise DataError(f"{qfile}: not easy-vqa questions ([question, answer, image_id]): {exc}") from None
    images = {int(p.stem): p for p in idir.glob("*.png") if p.stem.isdigit()}
    return images, qa


def measure_image(path: Path) -> tuple[str, str, str, str]:
    """(shape, colour, position, size) of the single shape, from the pixels."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    mask = np.abs(a - a[0, 0]).sum(-1) > 60
    if mask.sum() < 4:
        raise DataError(f"{path}: no shape found")
    pix = a[mask]
    dist = {c: int((np.abs(pix - np.array(rgb)).sum(-1) < 30).sum()) for c, rgb in PALETTE.items()}
    color = max(COLORS, key=lambda c: dist[c])
    ys, xs = np.nonzero(mask)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = mask.sum() / (h * w)
    shape = "triangle" if fill < 0.68 else "circle" if fill < 0.93 else "rectangle"
    cy, cx = (ys.min() + ys.max()) / 2 / a.shape[0], (xs.min() + xs.max()) / 2 / a.shape[1]
    row = ("upper", "middle", "lower")[min(int(cy * 3), 2)]
    col = ("left", "middle", "right")[min(int(cx * 3), 2)]
    position = "center" if row == col == "middle" else f"{row} {col}"
    frac = h * w / (a.shape[0] * a.shape[1])
    size = "small" if frac < 0.12 else "medium" if frac < 0.3 else "large"
    return shape, color, position, size


def qa_facts(qa: list[tuple[str, str, int]]) -> dict[int, dict[str, str]]:
    """What easy-vqa's own QA says positively about each image's shape and colour."""
    facts: dict[int, dict[str, str]] = {}
    for q, a, i in qa:
        f = facts.setdefault(i, {})
        w = _words(q)
        if a in SHAPES or a in COLORS:  # "what color is the circle?" -> red
            f["shape" if a in SHAPES else "color"] = a
            named = [x for x in w if x in SHAPES or x in COLORS]
        elif (a == "yes") != bool({"not", "no"} & set(w)):  # "is there a red shape?" -> yes
            named = [x for x in w if x in SHAPES or x in COLORS]
        else:
            named = []
        for x in named:
            f["shape" if x in SHAPES else "color"] = x
    return facts


def load_truths(split: str, ids: list[int], facts: dict[int, dict[str, str]],
                images: dict[int, Path]) -> tuple[dict[int, Truth], int]:
    """Truth per image id, and how many disagree with easy-vqa's QA (expected 0)."""
    from tqdm import tqdm

    out, mismatches = {}, 0
    for i in tqdm(ids, desc=f"measure {split} images", unit="img", disable=None, leave=False):
        shape, color, position, size = measure_image(images[i])
        f = facts.get(i, {})
        if f.get("shape", shape) != shape or f.get("color", color) != color:
            mismatches += 1
            shape, color = f.get("shape", shape), f.get("color", color)
        out[i] = Truth(i, split, shape, color, position, size)
    return out, mismatches


# ------------------------------------------------------------------------ the annotator rubric
_NEG = re.compile(r"\b(no|not|isn't|aren't|doesn't|don't|cannot|can't|without|neither|nor)\b", re.IGNORECASE)
_WORD = re.compile(r"[a-z']+")
POSITIONS = ("upper left", "upper middle", "upper right", "middle left", "center", "middle right",
             "lower left", "lower middle", "lower right")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())
