"""The probe batch: a deterministic image-like input on which an exported graph is traced and checked against
torch (bottom layer: `aml.export` and the onnxruntime extraction backend both use it)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aml.net import IMAGENET_MEAN, IMAGENET_STD


def probe_batch(
    h: int,
    w: int,
    seed: int,
    batch: int = 2,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """A deterministic image-like float32 batch: blocky random colours plus pixel noise in [0, 1], normalised
    with `mean` / `std` (activations in the range real images give, which int8 calibration expects)."""
    rng = np.random.default_rng(seed)
    blocks = rng.uniform(0, 1, (batch, 3, h // 8 + 1, w // 8 + 1))
    x = np.repeat(np.repeat(blocks, 8, axis=2), 8, axis=3)[:, :, :h, :w]
    x = x + rng.normal(0, 0.05, (batch, 3, h, w))
    m = np.asarray(mean, np.float64).reshape(1, 3, 1, 1)
    s = np.asarray(std, np.float64).reshape(1, 3, 1, 1)
    return ((x.clip(0, 1) - m) / s).astype(np.float32)
