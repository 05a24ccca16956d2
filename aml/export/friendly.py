"""Export-friendly swaps: TF "same" padding and swish rewritten so traced graphs keep dynamic H and W.

efficientnet-pytorch's `Conv2dDynamicSamePadding` computes its padding with Python `math.ceil` / `max` on
the input size, so a trace bakes the padding of the example size into the graph (wrong at other sizes),
and `MemoryEfficientSwish` is a custom autograd Function the ONNX exporter cannot translate. The modules
here compute the same numbers with shape arithmetic the tracer records (the padding is symbolic in the
ONNX graph) and are swapped in with the original weights: outputs are identical, not approximately equal.

TF same padding along one axis of length i, stride s, effective kernel k_eff = (k - 1) d + 1:
    total(i) = max((ceil(i / s) - 1) s + k_eff - i, 0) = max(r + k_eff - s, 0),  r = (-i) mod s,
    left = total // 2, right = total - left.
Only r depends on i, so we pad once by the largest left / right over r (constants) and slice the start
and stop that the actual r asks for (a dynamic Slice in ONNX). With stride 1, r = 0 and total = k_eff - 1 at
every size; for an odd k_eff that is symmetric, so `SameConv2d` passes it as the convolution's own padding
(no Pad node: int8 QDQ graphs then keep the tensor quantised between convolutions, onnxruntime having no
quantised Pad fusion).
"""

from __future__ import annotations

import copy
import importlib

import torch
from torch import nn
from torch.nn import functional as F


def _pair(v: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def _clamp0(v):
    """max(v, 0) for a Python int (eager) or a traced 0-d tensor (export)."""
    return v.clamp(min=0) if torch.is_tensor(v) else max(v, 0)


class TFSamePad(nn.Module):
    """Zero padding of (B, C, H, W) maps exactly as TensorFlow "SAME" does, traceable with dynamic H, W."""

    def __init__(self, kernel_size, stride, dilation=1) -> None:
        super().__init__()
        k, s, d = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.k_eff = tuple((k[a] - 1) * d[a] + 1 for a in range(2))
        self.s = s
        self.max_lr = tuple(self._max_left_right(self.k_eff[a], s[a]) for a in range(2))

    @staticmethod
    def _max_left_right(k_eff: int, s: int) -> tuple[int, int]:
        totals = [max(r + k_eff - s, 0) for r in range(s)]
        return max(t // 2 for t in totals), max(t - t // 2 for t in totals)

    @property
    def static_padding(self) -> tuple[int, int] | None:
        """(ph, pw) symmetric padding equal to this TF padding at every input size (stride 1, odd k_eff), else None."""
        if self.s != (1, 1) or any(k % 2 == 0 for k in self.k_eff):
            return None
        return (self.k_eff[0] - 1) // 2, (self.k_eff[1] - 1) // 2

    def _window(self, i, axis: int):
        """(start, stop) of the TF-padded axis inside the generously padded one, for an axis of length i."""
        k_eff, s = self.k_eff[axis], self.s[axis]
        r = (s - i % s) % s
        total = r + k_eff - s if k_eff >= s else _clamp0(r + k_eff - s)
        start = self.max_lr[axis][0] - total // 2
        return start, start + i + total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (lh, rh), (lw, rw) = self.max_lr
        if lh + rh + lw + rw == 0:
            return x
        h, w = x.shape[-2], x.shape[-1]
        x = F.pad(x, [lw, rw, lh, rh])
        if self.s[0] > 1:
            h0, h1 = self._window(h, 0)
            x = x[:, :, h0:h1]
        if self.s[1] > 1:
            w0, w1 = self._window(w, 1)
            x = x[:, :, :, w0:w1]
        return x

    def extra_repr(self) -> str:
        return f"k_eff={self.k_eff}, stride={self.s}, max_pad={self.max_lr}"


class SameConv2d(nn.Conv2d):
    """nn.Conv2d with TF "same" padding (export-friendly); same parameters as Conv2dDynamicSamePadding."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size, stride=1, dilation=1, groups: int = 1, bias: bool = True
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)
        self.same = TFSamePad(self.kernel_size, self.stride, self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        static = self.same.static_padding
        if static is not None:
            return F.conv2d(x, self.weight, self.bias, self.stride, static, self.dilation, self.groups)
        return F.conv2d(self.same(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SameMaxPool2d(nn.Module):
    """Max pooling after TF "same" zero padding (as efficientnet-pytorch's MaxPool2dDynamicSamePadding)."""

    def __init__(self, kernel_size, stride, dilation=1, ceil_mode: bool = False) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.ceil_mode = ceil_mode
        self.same = TFSamePad(self.kernel_size, self.stride, self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(self.same(x), self.kernel_size, self.stride, 0, self.dilation, self.ceil_mode)


class Swish(nn.Module):
    """x * sigmoid(x) with plain ops (MemoryEfficientSwish's forward without its autograd Function)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def _efficientnet_classes() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """The dynamic-same conv, max-pool and memory-efficient swish classes of the installed EfficientNets."""
    convs, pools, swishes = [], [], []
    for name in ("efficientnet_pytorch.utils", "efficientnet_lite_pytorch.utils"):
        try:
            u = importlib.import_module(name)
        except ImportError:
            continue
        convs.append(u.Conv2dDynamicSamePadding)
        pools.append(u.MaxPool2dDynamicSamePadding)
        swishes.append(u.MemoryEfficientSwish)
    return tuple(convs), tuple(pools), tuple(swishes)


def _replacement(m: nn.Module, convs: tuple, pools: tuple, swishes: tuple) -> nn.Module | None:
    if convs and isinstance(m, convs):
        new = SameConv2d(
            m.in_channels, m.out_channels, m.kernel_size, m.stride, m.dilation, m.groups, m.bias is not None
        )
        new.load_state_dict(m.state_dict())
        return new.train(m.training)
    if pools and isinstance(m, pools):
        if m.return_indices or _pair(m.padding) != (0, 0):
            raise ValueError(f"{type(m).__name__} with return_indices or extra padding: no export-friendly swap")
        return SameMaxPool2d(m.kernel_size, m.stride, m.dilation, m.ceil_mode)
    if swishes and isinstance(m, swishes):
        return Swish()
    return None


def make_export_friendly(model: nn.Module) -> tuple[nn.Module, dict[str, int]]:
    """A deep copy of `model` with export-friendly modules swapped in (same weights): (copy, counts)."""
    model = copy.deepcopy(model)
    classes = _efficientnet_classes()
    counts: dict[str, int] = {}
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            new = _replacement(child, *classes)
            if new is not None:
                setattr(parent, child_name, new)
                key = type(child).__name__
                counts[key] = counts.get(key, 0) + 1
    return model, counts
