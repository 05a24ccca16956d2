"""TorchScript export by tracing the export-friendly encoder (shape arithmetic is traced, so H and W stay
dynamic; verification re-runs the saved module at three sizes)."""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn


def export_torchscript(module: nn.Module, path: str | os.PathLike, example: torch.Tensor) -> None:
    """Trace `module` on `example` (B, 3, H, W) and save the TorchScript module."""
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", category=FutureWarning)  # torch.jit.trace deprecation notice
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(module, (example,), check_trace=False)
        traced.save(str(path))


def load_torchscript(path: str | os.PathLike):
    """Load a saved TorchScript encoder on the CPU, eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()
