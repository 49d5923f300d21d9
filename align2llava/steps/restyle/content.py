"""The restyle content check: facts a rewrite must keep, and rewrite clean-up.
"""

from __future__ import annotations

import re

# ------------------------------------------------------------------------------ content check
COLORS = {
    "red", "green", "blue", "yellow", "black", "white", "gray", "brown", "teal", "orange",
    "purple", "pink", "cyan", "magenta", "violet", "gold", "silver", "beige", "navy", "maroon",
    "olive", "turquoise", "indigo",
}
SHAPES = {
    "circle", "square", "rectangle", "triangle", "ellipse", "oval", "star", "hexagon",
    "pentagon", "octagon", "diamond", "polygon", "sphere", "cube", "cone", "cylinder", "heart",
    "cross", "arrow", "line", "dot", "ring",
}
POSITIONS = {"left", "right", "top", "bottom", "center"}
SIZES = {"small", "medium", "large"}
NUMBERS = {
    "zero": 0, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
    "dozen": 12, "pair": 2, "both": 2, "twice": 2,
}
# Object nouns (COCO's 80 categories, common scene and everyday nouns, parts of shapes). Meta
# and region words (image, picture, scene, shape, object, color, background) are deliberately
# absent: a rewrite may swap them freely.
OBJECTS = set(["person", "man", "woman", "child", "boy", "girl", "baby", "people", "player", "rider", "bicycle", "bike", "car", "motorcycle", "airplane", "plane", "bus", "train", "truck", "boat", "ship", "hydrant", "sign", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "bag", "tie", "suitcase", "frisbee", "skis", "ski", "snowboard", "ball", "kite", "bat", "glove", "skateboard", "surfboard", "racket", "bottle", "glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "pizza", "donut", "cake", "chair", "couch", "sofa", "plant", "bed", "table", "toilet", "tv", "television", "laptop", "mouse", "remote", "keyboard", "phone", "microwave", "oven", "toaster", "sink", "refrigerator", "fridge", "book", "clock", "vase", "scissors", "teddy", "toothbrush", "tree", "grass", "flower", "sky", "cloud", "sun", "moon", "water", "sea", "ocean", "river", "lake", "beach", "sand", "snow", "mountain", "hill", "road", "street", "sidewalk", "building", "house", "wall", "floor", "window", "door", "roof", "fence", "field", "park", "city", "room", "kitchen", "bathroom", "desk", "shelf", "lamp", "mirror", "curtain", "painting", "paint", "tube", "coin", "button", "box", "ring", "wheel", "tire", "pole", "wire", "rope", "flag", "food", "plate", "fruit", "vegetable", "bread", "meat", "cheese", "egg", "text", "word", "letter", "logo", "wood", "paper", "screen", "slice", "shadow", "border", "edge", "corner", "side", "sparrow", "pigeon", "duck", "fish", "animal", "vehicle", "hat", "shirt", "jacket", "coat", "dress", "shoe", "helmet", "glasses"])
IRREGULAR = {"people": "person", "men": "man", "women": "woman", "children": "child",
             "mice": "mouse", "knives": "knife", "leaves": "leaf", "shelves": "shelf",
             "geese": "goose", "feet": "foot", "teeth": "tooth"}
ALIASES = {
    "grey": "gray", "golden": "gold", "circular": "circle", "rectangular": "rectangle",
    "triangular": "triangle", "spherical": "sphere", "cubic": "cube", "upper": "top",
    "lower": "bottom", "centre": "center", "middle": "center", "central": "center",
    "centered": "center", "centred": "center", "big": "large", "tiny": "small", "photo": None,
    "bicycles": "bicycle", "tv": "television", "sofa": "couch", "fridge": "refrigerator",
    "bike": "bicycle", "plane": "airplane",
}
NEGATIONS = {"not", "no", "none", "never", "nothing", "neither", "nor", "without", "cannot",
             "nobody", "nowhere"}
_TOKEN = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")
_SENT_START = re.compile(r"(^|[.!?:;]\s+|\n)[\"'(\[]*$")
CATEGORIES = ("color", "shape", "count", "position", "size", "object", "name")


def _singular(word: str) -> str:
    if word in IRREGULAR:
        return IRREGULAR[word]
    for suffix, repl in (("ies", "y"), ("ves", "f"), ("es", ""), ("s", "")):
        if word.endswith(suffix) and len(word) > len(suffix) + 2:
            stem = word[: -len(suffix)] + repl
            if stem in OBJECTS or stem in SHAPES or stem in COLORS:
                return stem
    return word


def facts(text: str) -> dict[str, set[str]]:
    """The checkable facts of one answer, by category (words normalised: grey->gray, circles->circle)."""
    out: dict[str, set[str]] = {c: set() for c in CATEGORIES}
    tokens = list(_TOKEN.finditer(text))
    for i, m in enumerate(tokens):
        raw = m.group(0)
        w = raw.lower()
        nxt = tokens[i + 1].group(0).lower() if i + 1 < len(tokens) else ""
        if w.endswith("n't"):
            continue
        w = ALIASES.get(w, w) if w in ALIASES else _singular(w)
        if w is None:
            continue
        if w.isdigit():
            if int(w) != 1:
                out["count"].add(str(int(w)))
        elif w in NUMBERS:
            out["count"].add(str(NUMBERS[w]))
        elif w in COLORS:
            out["color"].add(w)
        elif w in SHAPES:
            out["shape"].add(w)
        elif w in POSITIONS and not (w == "right" and nxt.startswith("angle")):
            out["position"].add(w)
        elif w in SIZES:
            out["size"].add(w)
        elif w in OBJECTS:
            out["object"].add(w)
        elif raw[0].isupper() and raw != "I" and not _SENT_START.search(text[: m.start()]):
            out["name"].add(w)
    return out


_OPENER = re.compile(
    r"^\s*(?:certainly|sure|great question|good question|of course|absolutely|indeed|well|okay|ok)"
    r"\s*[!.,]\s*",
    re.IGNORECASE,
)


def polarity(text: str) -> str | None:
    """'yes' / 'no' when the answer opens with it (after an interjection like "Sure!"), else None."""
    m = _TOKEN.search(_OPENER.sub("", text, count=1))
    w = m.group(0).lower() if m else ""
    return w if w in ("yes", "no") else None


def first_yes_no(text: str) -> str | None:
    for m in _TOKEN.finditer(text):
        w = m.group(0).lower()
        if w in ("yes", "no"):
            return w
    return None


def negated(text: str) -> bool:
    """Whether the answer negates anything beyond an opening yes/no."""
    tokens = [m.group(0).lower() for m in _TOKEN.finditer(_OPENER.sub("", text, count=1))]
    if tokens and tokens[0] in ("yes", "no"):
        tokens = tokens[1:]
    return any(t in NEGATIONS or t.endswith("n't") for t in tokens)


def check_content(original: str, rewrite: str, min_ratio: float = 0.5, max_ratio: float = 1.5) -> list[str]:
    """Failures of the rule-based content check (empty list: the rewrite passes).

    A failure reads `lost color: red`, `added object: dog`, `polarity: yes -> no`,
    `negation lost`, `negation added`, `too short: 5/20 words`, `too long: 40/20 words`.
    """
    fails: list[str] = []
    before, after = facts(original), facts(rewrite)
    for cat in CATEGORIES:
        for w in sorted(before[cat] - after[cat]):
            fails.append(f"lost {cat}: {w}")
        for w in sorted(after[cat] - before[cat]):
            fails.append(f"added {cat}: {w}")
    pol = polarity(original)
    if pol is not None and first_yes_no(rewrite) != pol:
        fails.append(f"polarity: {pol} -> {first_yes_no(rewrite) or 'none'}")
    elif pol is None and polarity(rewrite) is not None:
        fails.append(f"polarity: none -> {polarity(rewrite)}")
    neg_b, neg_a = negated(original), negated(rewrite)
    if neg_b != neg_a:
        fails.append("negation lost" if neg_b else "negation added")
    n_b, n_a = len(_TOKEN.findall(original)), len(_TOKEN.findall(rewrite))
    if n_a < min_ratio * n_b:
        fails.append(f"too short: {n_a}/{n_b} words")
    if n_a > max_ratio * n_b:
        fails.append(f"too long: {n_a}/{n_b} words")
    return fails


def failure_kind(failure: str) -> str:
    """`lost color: red` -> `lost_color`; `too short: 5/20 words` -> `too_short`."""
    return failure.split(":")[0].replace(" ", "_")


_PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|certainly|of course|okay|ok)[!,.]\s*)?"
    r"(?:here(?:'s| is) (?:the |a |my )?(?:rewritten |new )?(?:answer|version)\s*[:.]\s*|"
    r"(?:rewritten |new )?answer\s*:\s*)",
    re.IGNORECASE,
)


def clean_rewrite(text: str) -> str:
    """Strip a leading label ("Answer:", "Here is the rewritten answer:") and wrapping quotes."""
    text = _PREAMBLE.sub("", text.strip(), count=1).strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def _norm(text: str) -> str:
    return " ".join(_TOKEN.findall(text.lower()))


def repetitive(original: str, rewrite: str, n: int = 6) -> bool:
    """Whether the rewrite repeats a run of n words more often than the original does (a
    degenerate loop such as a sentence written twice)."""
    def grams(text: str) -> dict[tuple[str, ...], int]:
        words = _norm(text).split()
        out: dict[tuple[str, ...], int] = {}
        for i in range(len(words) - n + 1):
            g = tuple(words[i: i + n])
            out[g] = out.get(g, 0) + 1
        return out

    before = grams(original)
    return any(c > 1 and c > before.get(g, 0) for g, c in grams(rewrite).items())
