"""BatchNorm during distillation: frozen statistics (AML), estimated from data first when the student has none.

AML keeps every BatchNorm in eval mode, on the ImageNet statistics of the pretrained student. A student that
starts from random weights has no statistics (mean 0, variance 1): measured on mobilenetv2, activations
shrink ~10x per stage and every image gets the same vector, so nothing trains. Estimating the statistics
once on training images, then freezing them as usual, gives such a student a working start.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from aml.train.batches import ImageTensors, forward_by_size, raw_sizes, size_buckets


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def set_train_mode(model: nn.Module) -> None:
    """Train mode with every BatchNorm frozen in eval mode (AML: statistics stay ImageNet's)."""
    model.train()
    for m in batchnorms(model):
        m.eval()


@torch.no_grad()
def estimate_batchnorm(model: nn.Module, batches: Iterable[list[torch.Tensor]], device: torch.device) -> int:
    """Set every BatchNorm's running statistics to their average over `batches` of images; returns images seen.

    Each forward normalises with its own batch statistics, so deeper layers are estimated on the
    distribution the earlier, already-normalised layers produce. Leaves the model in eval mode.
    """
    norms = batchnorms(model)
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over forwards
        m.train()
    seen = 0
    for images in batches:
        forward_by_size(model, images, device)
        seen += len(images)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()
    return seen


def estimate_on_images(
    model: nn.Module, paths: Sequence[str], *, count: int, size: int, batch_size: int, seed: int, device: torch.device
) -> int:
    """`estimate_batchnorm` on `count` of the training images `paths` (drawn under `seed`), at image size `size`,
    in same-size batches of `batch_size`; returns images seen."""
    rng = np.random.default_rng([seed, 1])
    idx = rng.permutation(len(paths))[:count]
    images = ImageTensors(paths, size, model.mean, model.std)
    batches = size_buckets(np.arange(len(idx)), raw_sizes(paths, idx), batch_size)
    return estimate_batchnorm(model, ([images[i] for i in idx[b]] for b in batches), device)
