"""Image paths under an image root, and decoding to RGB."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from align2llava.errors import DataError


def resolve_image(image_root: str | Path, rel: str) -> Path:
    """Resolve `rel` under `image_root`; refuse absolute paths and escapes through `..`/links."""
    if not isinstance(rel, str) or not rel:
        raise DataError(f"image path must be a non-empty string, got {rel!r}")
    pure = PurePosixPath(rel.replace("\\", "/"))
    if pure.is_absolute() or Path(rel).is_absolute() or (len(rel) > 1 and rel[1] == ":"):
        raise DataError(f"image path '{rel}' is absolute; it must be relative to the image root")
    if ".." in pure.parts:
        raise DataError(f"image path '{rel}' escapes the image root through '..'")
    root = Path(image_root).resolve()
    path = (root / pure).resolve()
    if path != root and root not in path.parents:
        raise DataError(f"image path '{rel}' resolves outside the image root {root}")
    return path


def check_image(path: Path) -> None:
    """Raise DataError unless `path` exists and fully decodes."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"image file '{path}' not found")
    try:
        with Image.open(path) as im:
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"image file '{path}' does not decode: {exc}") from None


def load_rgb(path: str | Path) -> Any:
    """Open an image (grayscale, RGBA, palette, ...) and return it as an RGB PIL image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "RGB":
                return im.copy()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                bg = Image.new("RGB", rgba.size, (255, 255, 255))
                bg.paste(rgba, mask=rgba.getchannel("A"))
                return bg
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image file '{path}' not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"image file '{path}' does not decode: {exc}") from None
