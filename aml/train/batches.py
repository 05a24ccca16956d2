"""Student forward passes on variable-size training images, batched by size.

BatchNorm stays in eval mode during AML training, so every image's vector depends on that image
alone: grouping same-size images into one forward gives exactly the per-image result (tested), only
faster. No crops or padding change what the student sees.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from aml.data.images import load_image, to_tensor


class ImageTensors(Dataset):
    """Normalised image tensors of a path list at one training size (thumbnail semantics)."""

    def __init__(self, paths: Sequence[str], size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.paths, self.size, self.mean, self.std = list(paths), size, mean, std

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_tensor(load_image(self.paths[i], self.size), self.mean, self.std)


def _as_list(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    return batch


def image_loader(paths: Sequence[str], size: int, mean, std, *, batch_size: int, workers: int) -> DataLoader:
    """Ordered loader of image tensors in chunks of `batch_size` (a list of (3, H, W) tensors each)."""
    return DataLoader(ImageTensors(paths, size, mean, std), batch_size=batch_size, shuffle=False,
                      num_workers=workers, collate_fn=_as_list, persistent_workers=False)


def forward_by_size(model: nn.Module, images: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Embed a list of (3, H, W) images: one forward per distinct size, rows back in input order."""
    shapes = [tuple(im.shape) for im in images]
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(shapes):
        groups.setdefault(s, []).append(i)
    out: list[torch.Tensor | None] = [None] * len(images)
    for idx in groups.values():
        x = torch.stack([images[i] for i in idx]).to(device, non_blocking=True)
        v = model(x.contiguous(memory_format=torch.channels_last))
        for j, i in enumerate(idx):
            out[i] = v[j]
    return torch.stack(out).float()  # type: ignore[arg-type]


def size_buckets(order: np.ndarray, sizes: np.ndarray, batch_size: int, window: int = 50) -> list[np.ndarray]:
    """Split `order` into batches, sorting each window of `window` batches by image size first.

    Keeps the epoch's randomness at the window scale while making most batches single-size.
    """
    batches: list[np.ndarray] = []
    span = batch_size * window
    for start in range(0, len(order), span):
        chunk = order[start:start + span]
        chunk = chunk[np.argsort(sizes[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    return batches
