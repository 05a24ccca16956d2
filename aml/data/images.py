"""Image loading as cirtorch does it (docs/REFERENCE.md §3): PIL RGB, Lanczos thumbnail, query crops scaled alike.

Torch-free (numpy and PIL only): the torch extraction path (`aml.extract`, the trainer) and the onnxruntime
path (`aml.onnx_embed`) both load images here, so they see the same pixels. Image lists are read here too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from aml.errors import UserError

Bbx = Sequence[float] | None
A = TypeVar("A")


_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _unreadable(path: str | os.PathLike, e: Exception) -> UserError:
    return UserError(f"{path}: cannot read image ({type(e).__name__}: {e}); fix or remove it from the list")


# Integer modes of more than 8 bits (16-bit grayscale PNG, TIFF): PIL's convert("RGB") clips them to 255 (white).
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_8bit(im: Image.Image) -> Image.Image:
    """An image of a 16-bit integer mode as 8-bit grayscale ('L'): 0..65535 -> 0..255 (x / 257, rounded), the
    exact inverse of 8-bit x 257; other modes unchanged."""
    if im.mode not in WIDE_MODES:
        return im
    a = np.asarray(im).astype(np.float32)
    return Image.fromarray(np.rint(np.clip(a, 0, 65535) / 257).astype(np.uint8), mode="L")


def _open_rgb(path: str | os.PathLike) -> Image.Image:
    try:
        with Image.open(path) as im:
            return to_8bit(im).convert("RGB")
    except _UNREADABLE as e:
        raise _unreadable(path, e) from e


def load_image(path: str | os.PathLike, size: int, bbx: Bbx = None) -> Image.Image:
    """RGB image with longest side `size` (thumbnail: keeps aspect, never upscales, Lanczos).

    With `bbx = (x1, y1, x2, y2)` (a revisitop query), the full image is cropped first and the crop is
    scaled by the factor the full image would get: thumbnail to `size * max(crop) / max(full)`.
    """
    img = _open_rgb(path)
    if bbx is not None:
        full = max(img.size)
        try:
            img = img.crop(tuple(bbx))
        except (ValueError, TypeError) as e:
            raise UserError(f"{path}: bbx {tuple(bbx)} is not a box x1 y1 x2 y2 with x1 <= x2, y1 <= y2 ({e})") from e
        size = size * max(img.size) / full
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    return img


def check_bbxs(bbxs: Sequence[Bbx] | None, n: int) -> None:
    """UserError unless `bbxs` is None or has one entry (a box or None) per image."""
    if bbxs is not None and len(bbxs) != n:
        raise UserError(f"{len(bbxs)} bounding boxes for {n} images; give one per image (None for no box)")


def to_array(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, H, W) float32 array of an RGB image in [0, 1], normalised by per-channel mean and std."""
    a = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    x = np.empty(a.shape, dtype=np.float32)
    np.divide(a, np.float32(255), out=x, dtype=np.float32)  # in place: the same float32 values, 3x faster
    x -= np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    x /= np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return x


def same_shape_groups(
    items: Iterable[tuple[int, A]], stack: Callable[[list[A]], Any] = np.stack
) -> list[tuple[list[int], Any]]:
    """Stack (index, image array) pairs by shape: [(indices, stack(images))], first-seen order.

    `stack` is `np.stack` for numpy arrays (onnxruntime path) or `torch.stack` for tensors (torch path).
    """
    groups: dict[tuple[int, ...], list[tuple[int, A]]] = {}
    for i, x in items:
        groups.setdefault(tuple(x.shape), []).append((i, x))
    return [([i for i, _ in g], stack([x for _, x in g])) for g in groups.values()]


def read_image_list(path: str | os.PathLike, what: str = "image list") -> list[str]:
    """Image paths from a text file, one per line: relative paths are relative to the file's folder; blank
    lines and lines starting with '#' (comments) are skipped. Used by every command that reads a list
    (extract, embed, export --calib-images, evaluate --distractors)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: {what} not found; give a text file with one image path per line")
    raw = p.read_bytes()
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        text = None
    if text is None or "\0" in text:
        raise UserError(f"{p}: the {what} is not a text list (binary content); give a text file, one image path a line")
    lines = [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), start=1)]
    kept = [(n, ln) for n, ln in lines if ln and not ln.startswith("#")]
    paths = [ln if os.path.isabs(ln) else str(p.parent / ln) for _, ln in kept]
    if not paths:
        raise UserError(f"{p}: the {what} is empty; one image path per line ('#' starts a comment)")
    check_unique(paths, [n for n, _ in kept], p, "image")
    return paths


def check_unique(paths: Sequence[str], lines: Sequence[int], where: str | os.PathLike, what: str) -> None:
    """UserError naming the file and the line numbers of the first image listed twice (a duplicate would match
    itself: a test set scored as perfect, a database answering twice)."""
    seen: dict[str, int] = {}
    for path, line in zip(paths, lines, strict=True):
        key = os.path.normpath(path)
        if key in seen:
            n = sum(os.path.normpath(q) == key for q in paths)
            raise UserError(
                f"{where}: lines {seen[key]} and {line} list the same {what} {path} ({n} times in all); list each "
                "image once"
            )
        seen[key] = line


def thumbnail_size(width: int, height: int, size: float) -> tuple[int, int]:
    """The (width, height) PIL's `thumbnail((size, size))` produces, computed without touching pixels."""
    x = y = math.floor(size)
    if x >= width and y >= height:
        return width, height
    aspect = width / height
    if x / y >= aspect:
        x = max(min(math.floor(y * aspect), math.ceil(y * aspect), key=lambda n: abs(aspect - n / y)), 1)
    else:
        y = max(
            min(math.floor(x / aspect), math.ceil(x / aspect), key=lambda n: 0 if n == 0 else abs(aspect - x / n)), 1
        )
    return x, y


def header_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file from its header (no decoding); UserError when unreadable."""
    try:
        with Image.open(path) as im:
            return im.size
    except _UNREADABLE as e:
        raise _unreadable(path, e) from e


def loaded_size(width: int, height: int, size: int, bbx: Bbx = None) -> tuple[int, int]:
    """The (width, height) `load_image` returns for an image of the given full size (for batching by size)."""
    if bbx is not None:
        full = max(width, height)
        x0, y0, x1, y1 = (int(round(v)) for v in bbx)
        width, height = abs(x1 - x0), abs(y1 - y0)
        size = size * max(width, height) / full
    return thumbnail_size(width, height, size)


def size_key(sizes: Sequence[tuple[int, int]] | np.ndarray) -> np.ndarray:
    """(N,) int64 key of (width, height) pairs that sorts by width, then height: the one key batching by size uses."""
    wh = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    return wh[:, 0] * (1 << 24) + wh[:, 1]
