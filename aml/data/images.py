"""Image loading as cirtorch does it (SPEC §3): PIL RGB, Lanczos thumbnail, query crops scaled alike."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from aml.errors import UserError

Bbx = Sequence[float] | None


def _open_rgb(path: str | os.PathLike) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: cannot read image ({type(e).__name__}: {e}); fix or remove it from the list") from e


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


def to_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(3, H, W) float32 tensor of an RGB image in [0, 1], normalised by per-channel mean and std."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(m).div_(s)


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
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: cannot read image ({type(e).__name__}: {e}); fix or remove it from the list") from e


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
