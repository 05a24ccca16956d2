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
from torch.utils.data import Dataset

from aml.data.images import load_image
from aml.extract import to_tensor, torch_groups


class ImageTensors(Dataset):
    """Normalised image tensors of a path list at one training size (thumbnail semantics)."""

    def __init__(self, paths: Sequence[str], size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.paths, self.size, self.mean, self.std = list(paths), size, mean, std

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_tensor(load_image(self.paths[i], self.size), self.mean, self.std)


def forward_by_size(model: nn.Module, images: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Embed a list of (3, H, W) images: one forward per distinct size, rows back in input order."""
    order: list[int] = []
    parts: list[torch.Tensor] = []
    for idx, x in torch_groups(enumerate(images)):
        order += idx
        parts.append(model(x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)))
    return torch.cat(parts)[torch.as_tensor(np.argsort(order))].float()


def size_buckets(order: np.ndarray, sizes: np.ndarray, batch_size: int, window: int = 50) -> list[np.ndarray]:
    """Split `order` into batches, sorting each window of `window` batches by image size first.

    Keeps the epoch's randomness at the window scale while making most batches single-size.
    """
    batches: list[np.ndarray] = []
    span = batch_size * window
    for start in range(0, len(order), span):
        chunk = order[start : start + span]
        chunk = chunk[np.argsort(sizes[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return batches
