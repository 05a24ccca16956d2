"""GLAM: global-local attention on the last feature maps (Song, Han, Avrithis, WACV 2022; docs/REFERENCE.md §8).

F (B, C, h, w) are the backbone's maps. Four attentions, each switchable, in two branches:

    local channel   A_lc = sigmoid(conv1d_k(GAP(F)))                      (B, C, 1, 1)   ECA-Net's
    local spatial   A_ls = conv1x1(cat[F', dil1(F'), dil2(F'), dil3(F')])  (B, 1, h, w)   F' = conv1x1(F): c' channels,
                                                                                         dilK: 3x3 at dilation K
    local branch    F_lc = F * A_lc + F,   F_l = F_lc * A_ls + F_lc
    global channel  q, k = sigmoid(conv1d_k(GAP(F))) (B, C); A_gc = softmax(k^T q) (C x C); G_c = V A_gc, V = F
    global spatial  Q, K, V = conv1x1(F) (B, c', hw); A_gs = softmax(K^T Q) (hw x hw); G_s = conv1x1(V A_gs)
    global branch   F_gc = F * G_c,   F_g = F_gc * G_s + F_gc
    fusion          F_gl = w_0 F + w_l F_l + w_g F_g,   w = softmax(learned logits)

then GeM (in `aml.net.RetrievalNet`). Both softmaxes normalise over keys: output channel / location j is a convex
combination of the values (the paper's `softmax(K^T Q)`, written batch-first as `softmax(Q K^T, -1) V`). A part
switched off is the identity in its place (F_lc = F, F_l = F_lc, F_gc = F, F_g = F_gc); a branch with no part
on is left out of the fusion. k is ECA's adaptive kernel (odd, ~ (log2 C + 1) / 2); c' = C / 8.

The start, chosen so that adding GLAM keeps a pretrained student's descriptors: the two spatial attentions'
last 1x1 convs start at zero (A_ls = 0, G_s = 0: those parts start as the identity) and the local channel
conv1d starts at zero (A_lc = 1/2 everywhere: F_lc = 1.5 F, a scale GeM and L2N remove). Without global channel
attention GLAM therefore starts as an exact positive multiple of F, and the descriptor is unchanged. Global
channel attention is quadratic in F (F * (V A_gc)) and cannot start as the identity; it keeps the default init
(near-uniform A_gc: G_c ~ the channel mean at each location, an energy weighting of the locations). The fusion
starts with equal weights (1/3 each with both branches). Measured on lite0's maps of 10 UKBench images at 224 px,
every part on: the GeM descriptors keep cosine >= 0.9994 to those without GLAM. The student's closed-form start
is fitted on the maps through GLAM (`RetrievalNet.trunk`), so it is exact whatever GLAM starts as.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from aml.errors import UserError

PARTS = ("local-channel", "local-spatial", "global-channel", "global-spatial")  # the config's spelling, in order
LOCAL, GLOBAL = PARTS[:2], PARTS[2:]
REDUCTION = 8  # c' = C / REDUCTION channels in the spatial attentions
DILATIONS = (1, 2, 3)


def parse_parts(spec: str | Iterable[str] | None, where: str = "--glam") -> tuple[str, ...]:
    """The GLAM parts a spec names, in PARTS order: "none" / "" / None -> (), "all" -> PARTS, or a comma list."""
    if spec is None:
        return ()
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n for n in names if n and n != "none"]
    if names == ["all"]:
        return PARTS
    bad = [n for n in names if n not in PARTS]
    if bad:
        raise UserError(f"{where} {bad[0]}: unknown GLAM part; use all, none or a comma list of {', '.join(PARTS)}")
    return tuple(p for p in PARTS if p in names)


def spec_of(parts: Iterable[str]) -> str:
    """The config spelling of a set of parts: "none", "all" or the comma list (inverse of `parse_parts`)."""
    parts = parse_parts(list(parts))
    return "all" if parts == PARTS else ",".join(parts) or "none"


def attr(part: str) -> str:
    """The submodule (and state-dict key) name of a part: local-channel -> local_channel."""
    return part.replace("-", "_")


def eca_kernel(channels: int, gamma: int = 2, b: int = 1) -> int:
    """ECA-Net's adaptive 1-D kernel size: the odd integer nearest above |(log2 C + b) / gamma|."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class LocalChannelAttention(nn.Module):
    """A_lc = sigmoid(conv1d_k(GAP(F))): (B, C, h, w) -> (B, C, 1, 1), each channel weighted from its k neighbours."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        k = eca_kernel(channels)
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)
        nn.init.zeros_(self.conv.weight)  # A_lc = 1/2: F_lc = 1.5 F at the start

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        p = f.mean(dim=(2, 3)).unsqueeze(1)  # (B, 1, C)
        return torch.sigmoid(self.conv(p)).transpose(1, 2).unsqueeze(-1)  # (B, C, 1, 1)


class LocalSpatialAttention(nn.Module):
    """A_ls: (B, C, h, w) -> (B, 1, h, w), from 3x3 convs at dilations 1, 2, 3 of the reduced maps."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.dilated = nn.ModuleList(nn.Conv2d(reduced, reduced, 3, padding=d, dilation=d) for d in DILATIONS)
        self.out = nn.Conv2d(reduced * (1 + len(DILATIONS)), 1, 1)
        nn.init.zeros_(self.out.weight)  # A_ls = 0: the part starts as the identity
        nn.init.zeros_(self.out.bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        r = self.reduce(f)  # (B, c', h, w)
        return self.out(torch.cat([r, *(conv(r) for conv in self.dilated)], dim=1))  # (B, 1, h, w)


class GlobalChannelAttention(nn.Module):
    """G_c = V softmax(k^T q): (B, C, h, w) -> (B, C, h, w), every output channel a convex mix of all channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        k = eca_kernel(channels)
        self.query = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)
        self.key = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        p = f.mean(dim=(2, 3)).unsqueeze(1)  # (B, 1, C)
        q = torch.sigmoid(self.query(p)).transpose(1, 2)  # (B, C, 1): query of each output channel
        k = torch.sigmoid(self.key(p))  # (B, 1, C): key of each input channel
        a = torch.softmax(q * k, dim=-1)  # (B, C_out, C_in), rows sum to 1 (the paper's A_gc transposed)
        return (a @ f.flatten(2)).view_as(f)  # (B, C, hw) -> (B, C, h, w)


class GlobalSpatialAttention(nn.Module):
    """G_s = conv1x1(V softmax(K^T Q)): (B, C, h, w) -> (B, C, h, w), every location a convex mix of all locations."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.query = nn.Conv2d(channels, reduced, 1)
        self.key = nn.Conv2d(channels, reduced, 1)
        self.value = nn.Conv2d(channels, reduced, 1)
        self.out = nn.Conv2d(reduced, channels, 1)
        nn.init.zeros_(self.out.weight)  # G_s = 0: the part starts as the identity
        nn.init.zeros_(self.out.bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        v = self.value(f)  # (B, c', h, w)
        q = self.query(f).flatten(2).transpose(1, 2)  # (B, hw, c')
        k = self.key(f).flatten(2)  # (B, c', hw)
        a = torch.softmax(q @ k, dim=-1)  # (B, hw_q, hw_k), rows sum to 1 (the paper's A_gs transposed)
        g = v.flatten(2) @ a.transpose(1, 2)  # (B, c', hw_q)
        return self.out(g.view_as(v))  # (B, C, h, w)


class GLAM(nn.Module):
    """The global-local attention module: (B, C, h, w) maps -> (B, C, h, w) maps, the enabled `parts` only."""

    def __init__(self, channels: int, parts: Iterable[str] = PARTS) -> None:
        super().__init__()
        self.parts = parse_parts(list(parts))
        if not self.parts:
            raise ValueError("GLAM with no part: leave the module out instead")
        reduced = max(channels // REDUCTION, 1)
        built = {
            "local-channel": lambda: LocalChannelAttention(channels),
            "local-spatial": lambda: LocalSpatialAttention(channels, reduced),
            "global-channel": lambda: GlobalChannelAttention(channels),
            "global-spatial": lambda: GlobalSpatialAttention(channels, reduced),
        }
        for part in PARTS:
            setattr(self, attr(part), built[part]() if part in self.parts else None)
        self.local = any(p in self.parts for p in LOCAL)
        self.global_ = any(p in self.parts for p in GLOBAL)
        self.fusion = nn.Parameter(torch.zeros(1 + int(self.local) + int(self.global_)))  # logits of w_0, [w_l], [w_g]

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        out = [f]
        if self.local:
            fl = f if self.local_channel is None else f * self.local_channel(f) + f
            out.append(fl if self.local_spatial is None else fl * self.local_spatial(f) + fl)
        if self.global_:
            fg = f if self.global_channel is None else f * self.global_channel(f)
            out.append(fg if self.global_spatial is None else fg * self.global_spatial(f) + fg)
        w = torch.softmax(self.fusion, dim=0)
        return sum(w[i] * x for i, x in enumerate(out))

    def extra_repr(self) -> str:
        return f"parts={spec_of(self.parts)}"


def parts_in(state_dict_keys: Iterable[str], prefix: str = "glam.") -> tuple[str, ...]:
    """The GLAM parts a state dict holds (its `glam.<part>.*` keys), in PARTS order."""
    held = {k[len(prefix) :].split(".", 1)[0] for k in state_dict_keys if k.startswith(prefix)}
    return tuple(p for p in PARTS if attr(p) in held)
