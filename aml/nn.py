"""The small pieces every retrieval net shares: GeM pooling, L2 normalisation, Lw whitening."""

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


class L2N(nn.Module):
    """L2 normalisation as a module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2n(x)


def apply_lw(x: torch.Tensor, m: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """Apply learned post-whitening (cirtorch meta['Lw']): x -> l2n(P (x - m)), x is (B, D), m is (D,)."""
    return l2n((x - m.reshape(1, -1)) @ P.T)


def lw_as_linear(m: torch.Tensor, P: torch.Tensor) -> nn.Linear:
    """Lw whitening folded into one Linear layer (x -> P x - P m), for export and fast inference."""
    lin = nn.Linear(P.shape[1], P.shape[0], bias=True)
    with torch.no_grad():
        lin.weight.copy_(P)
        lin.bias.copy_(-(P @ m.reshape(-1)))
    return lin


def projection(in_channels: int, out_dim: int) -> nn.Sequential:
    """The AML student head before pooling: 1x1 conv to the teacher's dimension (no bias), then ReLU."""
    return nn.Sequential(nn.Conv2d(in_channels, out_dim, kernel_size=1, bias=False), nn.ReLU(inplace=False))


def rescale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Bilinearly rescale a normalised (B, 3, H, W) batch, as cirtorch multi-scale extraction does."""
    if scale == 1:
        return x
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
