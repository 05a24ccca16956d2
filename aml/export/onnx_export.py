"""ONNX export with dynamic batch, height and width, and the structural check.

Exporter choice (torch 2.14): `torch.onnx.export(..., dynamo=True)` needs the `onnxscript` package, which is
not a dependency here (it is not installed), so we use the TorchScript-based exporter (`dynamo=False`).
With `dynamic_axes` it records the shape arithmetic of `aml.export.friendly.TFSamePad` as Shape / Mod /
Slice nodes, so EfficientNet's TF "same" padding stays correct at every input size; verification runs the
graph at three other sizes (square, portrait, landscape) against the PyTorch student.
"""

from __future__ import annotations

import os
import warnings

import onnx
import torch
from torch import nn

from aml.sidecar import INPUT, OUTPUT

OPSET = 17


def export_onnx(
    module: nn.Module, path: str | os.PathLike, example: torch.Tensor, *, static_shape: bool = False, maps: bool = False
) -> None:
    """Trace `module` on `example` (B, 3, H, W) and write an ONNX graph with dynamic batch / height / width
    (`static_shape`: height and width fixed to the example's, batch dynamic); `maps`: the output is (B, C, h, w)
    feature maps, whose h and w are dynamic too."""
    sides = {} if static_shape else {2: "height", 3: "width"}
    module.eval()
    out_axes = {0: "batch", 2: "map_height", 3: "map_width"} if maps else {0: "batch"}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # the exporter's own deprecation notices; a TracerWarning about data-dependent control flow is
        # harmless here only because verification re-runs the graph at other sizes and fails loudly
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        # TFSamePad's slices have dynamic bounds, so the exporter cannot constant-fold them: expected
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT],
            output_names=[OUTPUT],
            do_constant_folding=True,
            dynamic_axes={INPUT: {0: "batch", **sides}, OUTPUT: out_axes},
        )


def check_onnx(path: str | os.PathLike) -> None:
    """onnx.checker with full shape/type inference (raises onnx.checker.ValidationError)."""
    onnx.checker.check_model(str(path), full_check=True)
