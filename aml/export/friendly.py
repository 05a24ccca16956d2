"""Export-friendly swaps: TF "same" padding and swish rewritten so traced graphs keep dynamic H and W.

efficientnet-pytorch's `Conv2dDynamicSamePadding` computes its padding with Python `math.ceil` / `max` on
the input size, so a trace bakes the padding of the example size into the graph (wrong at other sizes),
and `MemoryEfficientSwish` is a custom autograd Function the ONNX exporter cannot translate. The modules
here compute the same numbers with shape arithmetic the tracer records (the padding is symbolic in the
ONNX graph) and are swapped in with the original weights: outputs are identical, not approximately equal.

TF same padding along one axis of length i, stride s, effective kernel k_eff = (k - 1) d + 1:
    total(i) = max((ceil(i / s) - 1) s + k_eff - i, 0) = max(r + k_eff - s, 0),  r = (-i) mod s,
    left = total // 2, right = total - left.
Only r depends on i. With stride 1 the padding is a constant: an odd kernel's symmetric (k_eff - 1) / 2 goes
into the Conv itself. With a larger stride the ONNX export writes one Conv with auto_pad=SAME_UPPER, whose
definition (output ceil(i / s), the extra pixel at the end) is TF's, the runtime computing it at every size;
eager and TorchScript compute it from the input's shape into one Pad. No Pad nodes matter on onnxruntime's CPU:
each one sits outside its blocked (NCHWc) convolution layout, so the maps are reordered out of it and back in
around every Pad.
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

    def _total(self, i, axis: int):
        """TF's total padding of an axis of length i (an int, or a traced 0-d tensor in export)."""
        k_eff, s = self.k_eff[axis], self.s[axis]
        if s == 1:
            return max(k_eff - 1, 0)  # a constant: the Pad node gets static pads
        r = (s - i % s) % s
        return r + k_eff - s if k_eff >= s else _clamp0(r + k_eff - s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        th, tw = self._total(x.shape[-2], 0), self._total(x.shape[-1], 1)
        if isinstance(th, int) and isinstance(tw, int) and th == tw == 0:
            return x
        return F.pad(x, [tw // 2, tw - tw // 2, th // 2, th - th // 2])

    def extra_repr(self) -> str:
        return f"k_eff={self.k_eff}, stride={self.s}"


class SameConv2d(nn.Conv2d):
    """nn.Conv2d with TF "same" padding (export-friendly); same parameters as Conv2dDynamicSamePadding."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size, stride=1, dilation=1, groups: int = 1, bias: bool = True
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)
        self.same = TFSamePad(self.kernel_size, self.stride, self.dilation)
        k_eff = self.same.k_eff
        if self.stride == (1, 1) and all(k % 2 for k in k_eff):
            # stride 1, odd kernel: TF "same" is the symmetric (k_eff - 1) / 2 at every size, so it stays in
            # the Conv node (no Pad node, which onnxruntime's NCHWc layout would reorder around)
            self.padding = tuple((k - 1) // 2 for k in k_eff)
            self.same = None
        # what ONNX auto_pad takes (onnxruntime: no dilation; k_eff >= s: the padding is never negative)
        self._auto_pad = self.dilation == (1, 1) and all(k >= s for k, s in zip(k_eff, self.stride, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same is None:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if torch.onnx.is_in_onnx_export() and self._auto_pad:
            # TorchScript traces the Pad instead (it cannot save a Python function)
            return _SameUpperConv.apply(x, self.weight, self.bias, self.stride, self.dilation, self.groups)
        return F.conv2d(self.same(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _SameUpperConv(torch.autograd.Function):
    """A strided TF-"same" convolution traced as one ONNX Conv with auto_pad=SAME_UPPER: ONNX's definition of
    that padding (output ceil(i / s), the odd pixel at the end) is TF's, computed by the runtime at every size."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, dilation, groups):  # noqa: ANN001, ANN205 - autograd.Function API
        same = TFSamePad(weight.shape[-2:], stride, dilation)
        return F.conv2d(same(x), weight, bias, stride, 0, dilation, groups)

    @staticmethod
    def symbolic(g, x, weight, bias, stride, dilation, groups):  # noqa: ANN001, ANN205 - ONNX symbolic API
        k = weight.type().sizes()[-2:]
        inputs = [x, weight] + ([bias] if bias is not None and not bias.node().mustBeNone() else [])
        return g.op(
            "Conv",
            *inputs,
            auto_pad_s="SAME_UPPER",
            kernel_shape_i=list(k),
            strides_i=list(stride),
            dilations_i=list(dilation),
            group_i=groups,
        )


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
