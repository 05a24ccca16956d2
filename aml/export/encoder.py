"""The module that gets exported: a student RetrievalNet, optionally with the teacher's Lw folded in.

    encoder(x) = l2n(P net(x) - P m)   with --whiten (x -> P (x - m), then L2N: cirtorch Lw as a Linear)
    encoder(x) = net(x)                otherwise

fp16 keeps float32 inputs and outputs: the backbone and the projection run in float16, GLAM, GeM, L2N and the
whitening stay float32 (GeM's x^p overflows float16 for activations above ~40 with p = 3; GLAM's unscaled
attention logits can too).
"""

from __future__ import annotations

import torch
from torch import nn

from aml.export.friendly import make_export_friendly
from aml.net import RetrievalNet
from aml.nn import l2n
from aml.sidecar import PRECISIONS
from aml.whiten import Lw


class Encoder(nn.Module):
    """Normalised (B, 3, H, W) float32 batch -> (B, D) L2-normalised vectors in the teacher's space."""

    def __init__(self, net: RetrievalNet, lw: Lw | None = None) -> None:
        super().__init__()
        self.net = net
        self.lw = None if lw is None else lw.as_linear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.net(x)
        return l2n(self.lw(v)) if self.lw is not None else v


class Float16(nn.Module):
    """Run `module` in float16 between float32 boundaries (casts in, casts back out)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.half()).float()


def reference_encoder(net: RetrievalNet, lw: Lw | None = None) -> Encoder:
    """The float32 PyTorch encoder the export must reproduce (the student as trained, unmodified modules)."""
    return Encoder(net, lw).eval()


def export_encoder(net: RetrievalNet, lw: Lw | None = None, precision: str = "fp32") -> tuple[Encoder, dict[str, int]]:
    """An export-ready copy: friendly modules swapped in, eval mode, fp16 body when asked.

    int8 is quantised after export (onnxruntime), so its torch module is the float32 one.
    Returns (encoder, {swapped class name: count}).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; expected one of {PRECISIONS}")
    friendly, counts = make_export_friendly(net)
    if precision == "fp16":
        friendly.features = Float16(friendly.features)
        if friendly.proj is not None:
            friendly.proj = Float16(friendly.proj)
    enc = Encoder(friendly, lw).eval()
    enc.requires_grad_(False)
    return enc, counts
