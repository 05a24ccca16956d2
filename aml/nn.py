"""The small pieces every retrieval net shares: GeM pooling, L2 normalisation, the student head, rescaling.

Learned whitening (Lw) lives in `aml.whiten`."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

EPS = 1e-6


def l2n(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """L2-normalise rows of a (B, D) tensor, cirtorch style: x / (||x|| + eps)."""
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + eps)


def gem(x: torch.Tensor, p: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Generalised-mean pooling of (B, C, H, W) feature maps to (B, C)."""
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class GeM(nn.Module):
    """GeM pooling with one learnable exponent p (initialised to 3, as cirtorch)."""

    def __init__(self, p: float = 3.0, eps: float = EPS) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, eps={self.eps}"


def projection(in_channels: int, out_dim: int) -> nn.Sequential:
    """The AML student head before pooling: 1x1 conv to the teacher's dimension (no bias), then ReLU."""
    return nn.Sequential(nn.Conv2d(in_channels, out_dim, kernel_size=1, bias=False), nn.ReLU(inplace=False))


def rescale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Bilinearly rescale a normalised (B, 3, H, W) batch, as cirtorch multi-scale extraction does."""
    if scale == 1:
        return x
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
