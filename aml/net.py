"""The retrieval network: backbone maps -> (GLAM) -> (AML projection) -> GeM -> L2N -> (linear head) -> (LayerNorm)
-> L2N -> (FC whitening -> L2N).

State-dict keys follow cirtorch (`features.N.*`, `pool.p`, `whiten.weight/bias`) so published cirtorch
checkpoints load as they are; the AML student head adds `proj.0.weight`, the linear student head `fc.weight`,
the global-local attention module (`aml.glam`) `glam.<part>.*` and `glam.fusion`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from aml.glam import GLAM
from aml.nn import GeM, l2n, projection

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def default_meta(architecture: str, outputdim: int, whitening: bool = False) -> dict[str, Any]:
    """cirtorch's meta dictionary for a GeM network with ImageNet normalisation."""
    return {
        "architecture": architecture,
        "local_whitening": False,
        "pooling": "gem",
        "regional": False,
        "whitening": whitening,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "outputdim": outputdim,
    }


# Student heads: "aml" is the AML paper's Conv1x1 (no bias) -> ReLU before GeM; "linear" pools first, then maps
# the L2-normalised GeM vector with a Linear D_s -> D_t (no bias) and L2-normalises again.
HEADS = ("aml", "linear")
# The embedding's optional norm before its last L2N (NormSoftmax, docs/REFERENCE.md §8): a LayerNorm without affine
# parameters (so no state-dict keys; `meta['layernorm']` records it), which centres every vector at zero: its
# sign bits then split evenly and binarise it (aml.binary).


class RetrievalNet(nn.Module):
    """One L2-normalised global descriptor per image, cirtorch-compatible (docs/REFERENCE.md §2)."""

    def __init__(
        self,
        features: nn.Module,
        out_channels: int,
        *,
        dim: int | None = None,
        head: str = "aml",
        whiten: bool = False,
        glam: Iterable[str] = (),
        layernorm: bool | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """`layernorm` None: as `meta['layernorm']` says (a checkpoint's), else off."""
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head {head!r}: expected one of {HEADS}")
        self.features = features
        self.out_channels = out_channels
        parts = tuple(glam)
        self.glam = GLAM(out_channels, parts) if parts else None
        self.proj = projection(out_channels, dim) if dim is not None and head == "aml" else None
        self.pool = GeM()
        self.fc = nn.Linear(out_channels, dim, bias=False) if dim is not None and head == "linear" else None
        d = dim if dim is not None else out_channels
        self.whiten = nn.Linear(d, d, bias=True) if whiten else None
        self.meta = copy.deepcopy(meta) if meta is not None else default_meta("unknown", d, whiten)
        self.meta["outputdim"] = d
        self.meta["whitening"] = whiten
        layernorm = bool(self.meta.get("layernorm", False)) if layernorm is None else bool(layernorm)
        self.norm = nn.LayerNorm(d, elementwise_affine=False) if layernorm else None
        self.meta.pop("layernorm", None)
        if layernorm:
            self.meta["layernorm"] = True

    @property
    def dim(self) -> int:
        """Output dimension D."""
        if self.proj is not None:
            return self.proj[0].out_channels
        return self.fc.out_features if self.fc is not None else self.out_channels

    @property
    def head(self) -> str | None:
        """The student head: "aml" (1x1 projection before GeM), "linear" (a map after GeM), None (no head)."""
        return "aml" if self.proj is not None else "linear" if self.fc is not None else None

    @property
    def glam_parts(self) -> tuple[str, ...]:
        """The GLAM parts on the backbone's maps (`aml.glam.PARTS` order; () without GLAM)."""
        return self.glam.parts if self.glam is not None else ()

    @property
    def msp(self) -> float:
        """Multi-scale power: the GeM p when GeM gives the output directly, else 1 (as cirtorch with whitening:
        a linear map after pooling makes components negative, which have no real GeM power)."""
        linear_after_pool = self.whiten is not None or self.fc is not None or self.norm is not None
        return 1.0 if linear_after_pool else float(self.pool.p.detach().item())

    @property
    def mean(self) -> list[float]:
        """Per-channel RGB mean the input must be normalised with."""
        return list(self.meta.get("mean", IMAGENET_MEAN))

    @property
    def std(self) -> list[float]:
        """Per-channel RGB std the input must be normalised with."""
        return list(self.meta.get("std", IMAGENET_STD))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The maps (B, C, h, w) a head reads: the backbone's, through GLAM if any (what a closed-form start fits)."""
        o = self.features(x)
        return self.glam(o) if self.glam is not None else o

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps (B, C', h, w) that GeM pools: the trunk's maps, through the student head if any."""
        o = self.trunk(x)
        return self.proj(o) if self.proj is not None else o

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (B, 3, H, W) batch -> (B, D) L2-normalised descriptors."""
        return self.embed_maps(self.maps(x))

    def embed_maps(self, m: torch.Tensor) -> torch.Tensor:
        """Feature maps from `maps` (B, C', h, w) -> (B, D) descriptors: the rest of `forward` (Metrix's feature
        mixup mixes the maps in between)."""
        v = self.pool(m)
        if self.fc is not None:
            v = self.fc(l2n(v))
        v = l2n(self.norm(v) if self.norm is not None else v)
        if self.whiten is not None:
            v = l2n(self.whiten(v))
        return v

    def extra_repr(self) -> str:
        aml = self.meta.get("aml", {})
        return f"architecture={self.meta.get('architecture')}, dim={self.dim}, name={aml.get('name')}"
