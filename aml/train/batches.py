"""Student (and, for view targets, frozen teacher) forward passes on variable-size training images, batched by size.

BatchNorm stays in eval mode during AML training, so every image's vector depends on that image
alone: grouping same-size images into one forward gives exactly the per-image result (tested), only
faster. No crops or padding change what the student sees.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from aml.data.images import header_size, load_image, size_key
from aml.extract import to_tensor, torch_groups
from aml.train.augment import Views


class ImageTensors(Dataset):
    """Normalised image tensors of a path list at one training size (thumbnail semantics)."""

    def __init__(self, paths: Sequence[str], size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.paths, self.size, self.mean, self.std = list(paths), size, mean, std

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_tensor(load_image(self.paths[i], self.size), self.mean, self.std)


class StepImages(Dataset):
    """The images of each training step (a list of tensors per step, indices `batches[i]` into `images`), each
    as `views` shows it to the student (aml.train.augment)."""

    def __init__(self, images: ImageTensors, batches: list[np.ndarray], views: Views) -> None:
        self.images, self.batches, self.views = images, batches, views

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        return self.views.step([self.images[j] for j in self.batches[i]], i)


def raw_sizes(paths: Sequence[str], idx: np.ndarray) -> np.ndarray:
    """A sortable size key per image `idx` of `paths` (header read only), used to make batches single-size."""
    return size_key([header_size(paths[i]) for i in idx])


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


@dataclass(frozen=True)
class Embedder:
    """How a training step embeds images with the student: `model` the module that runs (DDP-wrapped or the
    student), `net` the student itself (its maps, for feature mixup), on `device`, under `amp` (none | bf16 | fp16)."""

    model: nn.Module
    net: nn.Module
    device: torch.device
    amp: str = "none"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The mixed-precision context of the step's forwards (none: no context)."""
        if self.amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        """(N, D) float32 student vectors of `images` (with grad), batched by size under `autocast`."""
        with self.autocast():
            return forward_by_size(self.model, images, self.device)


class TeacherEmbedder:
    """The frozen teacher's vectors of the images a step shows the student (`--view-targets view`,
    aml.train.augment): `net` in eval mode on `device`, without grad, batched by size. The step's tensors are
    normalised with the student's `mean` / `std`; they are renormalised to the teacher's when those differ."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], device: torch.device) -> None:
        self.net = net.to(device).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.device = device
        s_mean, s_std, t_mean, t_std = (torch.tensor(v).view(3, 1, 1) for v in (mean, std, net.mean, net.std))
        same = torch.equal(s_mean, t_mean) and torch.equal(s_std, t_std)
        # x_t = (x_s * std_s + mean_s - mean_t) / std_t, one affine map per channel
        self.scale, self.shift = (None, None) if same else (s_std / t_std, (s_mean - t_mean) / t_std)

    @torch.no_grad()
    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        """(N, D) float32 teacher vectors of `images` (student-normalised (3, H, W) tensors), in input order."""
        if self.scale is not None:
            images = [x * self.scale + self.shift for x in images]
        return forward_by_size(self.net, images, self.device)
